"""fastgate.auth.basic_credentials: strict Basic parsing (RFC 7617), the success cache, and
the bounded pool for blocking checks."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from fastgate.auth.basic_credentials import MALFORMED, BlockingPool, SuccessCache, parse_basic
from fastgate.middleware.base import Identity


def basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param(None, None, id="absent"),
        pytest.param(b"Bearer abc", None, id="another scheme"),
        pytest.param(basic(b"alice:pw"), ("alice", "pw"), id="plain"),
        pytest.param(b"bAsIc " + base64.b64encode(b"a:b"), ("a", "b"), id="scheme any case"),
        pytest.param(basic(b"alice:p:w"), ("alice", "p:w"), id="colon in password"),
        pytest.param(basic(b"alice:"), ("alice", ""), id="empty password parsed"),
        pytest.param(basic("zoë:pw".encode()), ("zoë", "pw"), id="utf-8"),
        pytest.param(basic(b"alice"), MALFORMED, id="no colon"),
        pytest.param(basic(b":pw"), MALFORMED, id="empty user"),
        pytest.param(basic(b"al\nice:pw"), MALFORMED, id="control character"),
        pytest.param(basic(b"\xff:pw"), MALFORMED, id="not utf-8"),
        pytest.param(b"Basic YWxpY2U6cHc", MALFORMED, id="missing padding"),
        pytest.param(b"Basic !!!!", MALFORMED, id="not base64"),
    ],
)
def test_parse_basic(value: bytes | None, expected: object) -> None:
    assert parse_basic(value) == expected


def test_success_cache_expiry_and_keys() -> None:
    now = [100.0]
    cache = SuccessCache(ttl=30, size=2)
    cache.clock = lambda: now[0]
    who = Identity(method="basic", subject="alice")
    key = cache.digest("alice", "pw")
    assert key != cache.digest("alice", "pW") and b"pw" not in key
    assert SuccessCache(30).digest("alice", "pw") != key  # a per-process random key
    cache.put(key, who)
    assert cache.get(key) is who
    now[0] += 30
    assert cache.get(key) is None and len(cache) == 0
    for user in ("a", "b", "c"):
        cache.put(cache.digest(user, "x"), who)
    assert len(cache) == 2 and cache.get(cache.digest("a", "x")) is None  # oldest out
    cache.clear()
    assert len(cache) == 0


def test_success_cache_off() -> None:
    cache = SuccessCache(ttl=0)
    cache.put(b"k", Identity(method="basic", subject="a"))
    assert cache.get(b"k") is None


def test_blocking_pool_runs_off_loop_and_bounds_pending() -> None:
    async def main() -> None:
        pool = BlockingPool(threads=1, max_pending=2)
        gate = threading.Event()
        loop_thread = threading.get_ident()

        def work(n: int) -> tuple[int, int]:
            gate.wait(5)
            return n, threading.get_ident()

        first, second = pool.submit(work, 1), pool.submit(work, 2)
        assert first is not None and second is not None
        assert pool.submit(work, 3) is None and pool.rejected == 1
        gate.set()
        results = await asyncio.gather(first, second)
        assert [n for n, _ in results] == [1, 2]
        assert all(thread != loop_thread for _, thread in results)
        await asyncio.sleep(0)
        assert pool.pending == 0 and pool.submit(work, 4) is not None
        pool.close()

    asyncio.run(main())
