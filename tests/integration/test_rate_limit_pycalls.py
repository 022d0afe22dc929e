"""A rate limit keyed by client IP runs in C: no Python frame per admitted request.

Counted with sys.setprofile (benchmarks/pycalls.py's `measure`) in a subprocess that runs a
worker in-process: a route with a local client-IP limit and an in-flight cap, and one with a
hybrid-store limit (synced with a real redis-server), must make exactly as many Python calls
per request as a plain route (zero), and a route whose key needs the identity (the Python
path) three: the dispatch, the context and on_request. The hybrid sync runs every 10 s here,
so no sync lands inside the measured requests: its cost is per sync interval, not per
request.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ratelimit_fixtures import redis_procs  # noqa: F401  (fixture)
from redis_server import RedisServers

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, subprocess, sys
    import uvloop
    from fastgate.config.schema import parse_config
    from fastgate.server.worker import Worker

    spec = importlib.util.spec_from_file_location("pycalls", "benchmarks/pycalls.py")
    pc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc)
    oport, gport = pc.free_port(), pc.free_port()
    rport = int(sys.argv[1])
    origin = subprocess.Popen([sys.executable, "-c", pc.ORIGIN, str(oport)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert origin.stdout.readline().strip() == "ready"
        config = parse_config({
            "workers": 1,
            "admin": {"enabled": False},
            "entrypoints": {"web": {"address": f"127.0.0.1:{gport}"}},
            "services": {"o": {"servers": [{"url": f"http://127.0.0.1:{oport}"}]}},
            "providers": {"redis": {"main": {"address": f"127.0.0.1:{rport}"}}},
            "middlewares": {
                "ip": {"type": "rate_limit", "rate": "100000/s", "in_flight": 100},
                "hy": {"type": "rate_limit", "rate": "100000/s", "store": "hybrid",
                       "redis": "main", "sync_interval": "10s"},
                "who": {"type": "rate_limit", "rate": "100000/s", "key": "identity.subject"},
            },
            "routes": [
                {"name": "plain", "match": {"path": "/plain"}, "service": "o"},
                {"name": "ip", "match": {"path": "/ip"}, "service": "o",
                 "middlewares": ["ip"]},
                {"name": "who", "match": {"path": "/who"}, "service": "o",
                 "middlewares": ["who"]},
                {"name": "hy", "match": {"path": "/hy"}, "service": "o",
                 "middlewares": ["hy"]},
            ],
        })
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)

        async def start():
            w = Worker(config, None, None)
            await w.start()
            return w

        loop.run_until_complete(start())
        pc.measure(gport, "/plain", 100)
        pc.measure(gport, "/hy", 20)  # the first request starts the sync task (Python)
        for path in ("/plain", "/ip", "/hy", "/who"):
            per, counts = pc.measure(gport, path, 300)
            print(path, per, dict(counts.most_common(6)))
    finally:
        origin.terminate()
        origin.wait()
    """
)


def test_client_ip_limit_adds_no_python_calls(redis_procs: RedisServers) -> None:  # noqa: F811
    server = redis_procs.start()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(server.port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    per = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()}
    assert per["/plain"] <= 0.2, result.stdout  # the profiler's own few calls, amortised
    assert per["/ip"] <= per["/plain"] + 0.05, result.stdout
    assert per["/hy"] <= per["/plain"] + 0.05, result.stdout  # hybrid store: decided in C
    # the Python path, anonymous: dispatch, the context's __init__, on_request
    assert 3 <= per["/who"] - per["/plain"] <= 3.05, result.stdout
