"""Helpers for the rate-limit integration tests: configs, a paced load driver, Redis servers.

Import what a test module needs (`from ratelimit_fixtures import ...`; a fixture is used by
naming it, so import it with `# noqa: F401`). `redis_procs` starts real `redis-server`
processes through tests/redis_server.py (failing, not skipping, under CI=true when there is
none).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for redis_server

import pytest  # noqa: E402
from conftest import ORIGIN_HOST, Addr, base_config  # noqa: E402
from redis_server import RedisServer, RedisServers, require_redis_server  # noqa: E402


@pytest.fixture
def redis_procs(tmp_path: Path) -> Iterator[RedisServers]:
    """Real redis-server processes (tests/redis_server.py), stopped at teardown; a missing
    redis-server skips, or fails under CI=true."""
    require_redis_server()
    servers = RedisServers(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    try:
        yield servers
    finally:
        servers.stop_all()


def rl_config(
    origin_port: int,
    middlewares: dict[str, Any],
    routes: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A one-worker gateway config: the given middlewares, and by default one route `api`
    (every path) through all of them, in order."""
    if routes is None:
        routes = [
            {
                "name": "api",
                "match": {"path": "/"},
                "service": "origin",
                "middlewares": list(middlewares),
            }
        ]
    return base_config(origin_port, middlewares=middlewares, routes=routes, **overrides)


def redis_provider(server: RedisServer, **extra: Any) -> dict[str, Any]:
    """`providers` for one Redis named `main`, reconnecting quickly (tests kill it)."""
    settings = {
        "address": f"127.0.0.1:{server.port}",
        "command_timeout": 0.5,
        "connect_timeout": 0.5,
        "max_backoff": 0.2,
        **extra,
    }
    return {"redis": {"main": settings}}


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    per_gateway: list[Counter] = field(default_factory=list)
    first_sent: float = 0.0
    last_sent: float = 0.0
    errors: int = 0

    @property
    def elapsed(self) -> float:
        return self.last_sent - self.first_sent


async def _one_connection(
    addr: Addr,
    times: list[float],
    result: LoadResult,
    counts: Counter,
    path: str,
    headers: dict[str, str],
) -> None:
    reader, writer = await asyncio.open_connection(*addr)
    lines = [f"GET {path} HTTP/1.1", f"Host: {ORIGIN_HOST}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    try:
        for at in times:
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            if not result.first_sent or sent < result.first_sent:
                result.first_sent = sent
            result.last_sent = max(result.last_sent, sent)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            counts[status] += 1
            result.statuses[status] += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(*addr)
    except (OSError, asyncio.IncompleteReadError):
        result.errors += 1
    finally:
        writer.close()


async def paced_load(
    addrs: list[Addr],
    rate: float,
    duration: float,
    connections: int = 4,
    path: str = "/echo-path/load",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Send `rate` requests/s in total for `duration` s, spread evenly over `connections`
    keep-alive connections per address (each request is sent at its slot, or as soon as the
    previous response on its connection is read when running late). Counts the statuses."""
    result = LoadResult(per_gateway=[Counter() for _ in addrs])
    total = len(addrs) * connections
    interval = total / rate
    start = time.monotonic() + 0.05
    n_each = int(duration / interval)
    tasks = []
    for g, addr in enumerate(addrs):
        for c in range(connections):
            offset = (g * connections + c) / rate
            times = [start + offset + k * interval for k in range(n_each)]
            tasks.append(
                _one_connection(addr, times, result, result.per_gateway[g], path, headers or {})
            )
    await asyncio.gather(*tasks)
    return result


def run_load(*args: Any, **kwargs: Any) -> LoadResult:
    return asyncio.run(paced_load(*args, **kwargs))
