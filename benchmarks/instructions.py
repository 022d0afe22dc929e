"""User-space instructions per proxied request, counted by callgrind (repeatable, noise-free).

Wall-clock CPU per request swings by ±20 % on a shared VM, more than the budgets we hold
features to (a local rate limit: ≤ 5 %). Instruction counts do not: the worker runs under
`valgrind --tool=callgrind` twice per scenario, serving N1 and then N2 keep-alive requests from
a client in another process, and (I(N2) - I(N1)) / (N2 - N1) is the cost of one request with
start-up and shutdown cancelled out. Kernel work (loopback TCP, most of a request's CPU here)
is not counted, so the percentages are of the worker's user-space work: an upper bound on the
share of total CPU.

    python benchmarks/instructions.py [--n1 1000 --n2 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _origin import ORIGIN, exchange, free_port  # noqa: E402

# name -> (the route's middleware or None, top-level config added; "{tmp}" in a string value
# is the run's temporary directory).
SCENARIOS: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {
    "plain": (None, {}),
    "rate limit, local, client IP": (
        {
            "type": "rate_limit",
            "rate": "1000000/second",
            "burst": 100_000_000,
            "key": "client_ip",
            "store": "local",
        },
        {},
    ),
    "access log, json, to a file": (
        None,
        {"access_log": {"enabled": True, "path": "{tmp}/access.log", "format": "json"}},
    ),
}


def config_for(
    port: int,
    origin_port: int,
    middleware: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    tmp: str = "",
) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "r", "match": {"path": "/"}, "service": "o"}
    config: dict[str, Any] = {
        "workers": 1,
        "admin": {"enabled": False},
        "entrypoints": {"web": {"address": f"127.0.0.1:{port}"}},
        "services": {"o": {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}},
        "routes": [route],
    }
    if middleware is not None:
        route["middlewares"] = ["m"]
        config["middlewares"] = {"m": middleware}
    for key, value in (extra or {}).items():
        config[key] = {
            k: v.replace("{tmp}", tmp) if isinstance(v, str) else v for k, v in value.items()
        }
    return config


def serve(config_json: str, requests: int) -> int:
    """--serve: run one worker in this process until it has answered `requests` requests."""
    import json

    import uvloop

    from fastgate.config.schema import parse_config
    from fastgate.server.worker import Worker

    config = parse_config(json.loads(config_json))

    async def main() -> None:
        # No polling: the client signals when it is done, so nothing but the requests (and
        # the engine's coarse ticker) runs while callgrind counts.
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
        worker = Worker(config, None, None)
        await worker.start()
        print("ready", flush=True)
        await stop.wait()
        if worker.engine.responses != requests:
            raise SystemExit(f"served {worker.engine.responses} of {requests} requests")

    uvloop.run(main())
    return 0


def client(port: int, requests: int, connections: int = 4) -> None:
    """Send `requests` keep-alive GETs over `connections` connections, reading each whole."""
    req = b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    try:
        for i in range(requests):
            buf = exchange(socks[i % connections], req)
            if not buf.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(buf[:100])
    finally:
        for s in socks:
            s.close()


def count(config: dict[str, Any], requests: int, out: Path) -> int:
    """Total instructions callgrind counted for a worker serving `requests` requests."""
    import json

    # A fixed hash seed makes start-up (dict probing) repeatable between the two runs.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--serve",
            json.dumps(config),
            str(requests),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("worker did not start")
        port = int(config["entrypoints"]["web"]["address"].rsplit(":", 1)[1])
        client(port, requests)
        proc.send_signal(signal.SIGUSR1)
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"worker exited with {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    text = out.read_text()
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if m is None:
        raise RuntimeError(f"no total in {out}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n1", type=int, default=1000)
    ap.add_argument("--n2", type=int, default=5000)
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve[0], int(args.serve[1]))
    origin_port = free_port()
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN, str(origin_port)], stdout=subprocess.PIPE, text=True
    )
    results: dict[str, float] = {}
    try:
        assert origin.stdout is not None and origin.stdout.readline().strip() == "ready"
        with tempfile.TemporaryDirectory() as tmp:
            for name, (mw, extra) in SCENARIOS.items():
                totals = []
                for n in (args.n1, args.n2):
                    t0 = time.monotonic()
                    cfg = config_for(free_port(), origin_port, mw, extra, tmp)
                    totals.append(count(cfg, n, Path(tmp) / f"cg.{len(results)}.{n}"))
                    print(
                        f"  {name}: {n} requests: {totals[-1]:,} instructions "
                        f"({time.monotonic() - t0:.1f}s)",
                        flush=True,
                    )
                results[name] = (totals[1] - totals[0]) / (args.n2 - args.n1)
    finally:
        origin.terminate()
        origin.wait()
    base = results["plain"]
    print(f"\nuser-space instructions per proxied request (callgrind, N = {args.n2} - {args.n1}):")
    print("| scenario | instructions / request | vs plain |")
    print("|---|---:|---:|")
    for name, per in results.items():
        print(f"| {name} | {per:,.0f} | {per / base - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
