"""Count Python-level function calls per proxied request (DESIGN.md §2 budget).

The gateway's worker runs in this process on uvloop with `sys.setprofile` installed; an origin
runs in a subprocess and a client thread (not profiled: setprofile is per thread) sends
keep-alive requests. Every Python frame the worker's thread enters is counted, so a
regression that adds Python work to the hot path shows up as a larger number.

    python benchmarks/pycalls.py [--requests 2000]

Scenarios: a plain route (no middleware: expected 0 Python calls per request), a route with
one no-op middleware (expected 3: dispatch, the context, on_request), and a route with
`jwt_auth` (HS256, the subject forwarded upstream): a repeated token is answered by the
route's C credential cache, so expected ~0 (the first request's verification, averaged).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import uvloop

from fastgate.config.schema import parse_config
from fastgate.middleware import registry
from fastgate.server.worker import Worker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _origin import ORIGIN, exchange, free_port


@registry.register
class NoOp:
    """A middleware that does nothing: measures the cost of having a chain at all."""

    type = "pycalls_noop"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        self.name = name

    def on_request(self, ctx: Any) -> None:
        return None


JWT_SECRET = "pycalls-secret-" + "s" * 40


def _token() -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": "bench", "iat": now, "exp": now + 3600}, JWT_SECRET, "HS256")


def client(port: int, path: str, n: int, done: threading.Event, extra: str = "") -> None:
    """Send n keep-alive GETs one after another and read each response whole."""
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(n):
            exchange(s, req)
    done.set()


def measure(
    port: int, path: str, n: int, extra: str = ""
) -> tuple[float, collections.Counter[str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0

    def prof(frame: Any, event: str, arg: Any) -> None:
        nonlocal total
        if event == "call":
            total += 1
            code = frame.f_code
            counts[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1

    async def run() -> None:
        loop = asyncio.get_running_loop()
        done = threading.Event()
        t = threading.Thread(target=client, args=(port, path, n, done, extra), daemon=True)
        sys.setprofile(prof)
        t.start()
        while not done.is_set():
            await asyncio.sleep(0.05)
        sys.setprofile(None)
        await loop.run_in_executor(None, t.join)

    asyncio.get_event_loop().run_until_complete(run())
    return total / n, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument(
        "--budget",
        type=float,
        nargs="+",
        metavar="CALLS",
        help="exit 1 when a scenario makes more Python calls per request than this "
        "(one figure per scenario, in order; fewer figures check fewer scenarios)",
    )
    args = ap.parse_args()
    oport, gport = free_port(), free_port()
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN, str(oport)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert origin.stdout is not None and origin.stdout.readline().strip() == "ready"
        config = parse_config(
            {
                "workers": 1,
                "admin": {"enabled": False},
                "entrypoints": {"web": {"address": f"127.0.0.1:{gport}"}},
                "services": {"o": {"servers": [{"url": f"http://127.0.0.1:{oport}"}]}},
                "middlewares": {
                    "noop": {"type": "pycalls_noop"},
                    "jwt": {
                        "type": "jwt_auth",
                        "algorithms": ["HS256"],
                        "secret": JWT_SECRET,
                        "forward_headers": {"X-User": "subject"},
                    },
                },
                "routes": [
                    {"name": "plain", "match": {"path": "/plain"}, "service": "o"},
                    {
                        "name": "chain",
                        "match": {"path": "/chain"},
                        "service": "o",
                        "middlewares": ["noop"],
                    },
                    {
                        "name": "jwt",
                        "match": {"path": "/jwt"},
                        "service": "o",
                        "middlewares": ["jwt"],
                    },
                ],
            }
        )
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)

        async def start() -> Worker:
            w = Worker(config, None, None)
            await w.start()
            return w

        loop.run_until_complete(start())
        measure(gport, "/plain", 200)  # warm up: upstream connection, caches
        print(f"Python calls per proxied request ({args.requests} keep-alive requests):")
        rows = []
        bearer = f"Authorization: Bearer {_token()}\r\n"
        scenarios = (
            ("plain route", "/plain", ""),
            ("route + 1 no-op middleware", "/chain", ""),
            ("route + jwt_auth (cached)", "/jwt", bearer),
        )
        for name, path, extra in scenarios:
            t0 = time.perf_counter()
            per, counts = measure(gport, path, args.requests, extra)
            dt = time.perf_counter() - t0
            rows.append((name, per))
            top = ", ".join(f"{k}x{v / args.requests:.2f}" for k, v in counts.most_common(4))
            print(f"  {name:<28} {per:6.2f}   ({dt:.2f}s) {top}")
        if args.budget and any(per > b for (_, per), b in zip(rows, args.budget, strict=False)):
            print("over budget", args.budget)
            return 1
        return 0
    finally:
        origin.terminate()
        origin.wait()


if __name__ == "__main__":
    raise SystemExit(main())
