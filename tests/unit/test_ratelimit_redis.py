"""The Redis rate-limit scripts against `gcra()`, and the redis/hybrid stores, on a real Redis.

The scripts' arithmetic is checked with their test variants, which read `now` from the last
argument instead of Redis TIME (the only line that differs), so the script and the reference
`fastgate._core.ratelimit.gcra` see the same times. Each step runs as MULTI / EVALSHA / PTTL /
PERSIST / EXEC: the TTL the script set is read back, then removed, so that a key never
expires in real time between two steps of the simulated clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastgate._core.ratelimit import RateLimiter, gcra
from fastgate.config.schema import parse_config
from fastgate.ratelimit.clients import build_client, redis_client
from fastgate.ratelimit.hybrid import HybridStore
from fastgate.ratelimit.local import limit_set
from fastgate.ratelimit.options import parse_options
from fastgate.ratelimit.redis import (
    DECIDE_SCRIPT,
    DECIDE_SCRIPT_TEST,
    SYNC_SCRIPT_TEST,
    Outage,
    RedisStore,
    decide_args,
    redis_keys,
    unpack_decisions,
)
from fastgate.redis import RedisClient, key_slot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis_server as helpers

T0 = 1_700_000_000_000_000  # a Redis-TIME-like start, in microseconds


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[helpers.RedisServer]:
    helpers.require_redis_server()
    servers = helpers.RedisServers(tmp_path)
    try:
        yield servers.start()
    finally:
        servers.stop_all()


def step(server: helpers.RedisServer, script: Any, keys: list[bytes], args: list[Any]) -> Any:
    """Run the script once, atomically with reading back and clearing its keys' TTLs."""
    commands = [("MULTI",), ("EVALSHA", script.sha, len(keys), *keys, *args)]
    commands += [("PTTL", k) for k in keys] + [("PERSIST", k) for k in keys] + [("EXEC",)]
    import socket

    import hiredis

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
        reader = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < len(commands):
            reader.feed(sock.recv(65536))
            while (r := reader.gets()) is not False:
                replies.append(r)
    finally:
        sock.close()
    result = replies[-1]
    assert isinstance(result, list), replies
    return result[0], result[1 : 1 + len(keys)]


def load(server: helpers.RedisServer, *scripts: Any) -> None:
    for script in scripts:
        assert server.command("SCRIPT", "LOAD", script.source).decode() == script.sha


def reference(
    tats: list[int], now: int, limits: list[tuple[float, float, int, int, bool]]
) -> tuple[list[int], list[int]]:
    """What the script must return, from gcra(), with the stop-at-first-refusal rule."""
    out: list[int] = []
    stopped = False
    for i, (rate, per, burst, cost, dry) in enumerate(limits):
        if stopped:
            out += [0, 0, 0, 0, 0]
            continue
        allowed, tats[i], remaining, reset, retry = gcra(
            tats[i], now, int(per * 1e6), rate, burst, cost
        )
        out += [1, int(allowed), remaining, reset, retry]
        stopped = not allowed and not dry
    return out, tats


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param([(2.0, 1.0, 3, 1, False)], id="one limit, the worked example's"),
        pytest.param([(3.0, 1.0, 5, 2, False)], id="cost 2, T not a whole divisor"),
        pytest.param(
            [(10.0, 1.0, 10, 1, False), (20.0, 60.0, 20, 1, False)], id="two limits, stop rule"
        ),
        pytest.param([(1.0, 10.0, 1, 1, True), (50.0, 1.0, 5, 1, False)], id="dry run never stops"),
    ],
)
def test_decide_script_matches_gcra(
    redis: helpers.RedisServer, limits: list[tuple[float, float, int, int, bool]]
) -> None:
    load(redis, DECIDE_SCRIPT_TEST)
    rng = random.Random(7)
    emissions = [RateLimiter(r, p, b).emission_us for r, p, b, _, _ in limits]
    args = decide_args(
        emissions,
        [b for _, _, b, _, _ in limits],
        [c for *_, c, _ in limits],
        [d for *_, d in limits],
    )
    keys = redis_keys(b"fg:rl:test:", b"some key", len(limits))
    tats = [0] * len(limits)
    now = T0
    for _ in range(400):
        now += rng.choice([0, 0, 1, 999, 100_000, 333_333, 500_000, 2_000_000, 30_000_000])
        expected, tats = reference(tats, now, limits)
        got, ttls = step(redis, DECIDE_SCRIPT_TEST, keys, [*args, now])
        assert got == expected
        for i, ttl in enumerate(ttls):
            if tats[i] > now and expected[5 * i + 1] and limits[i][3]:
                # set by this step: PX = ceil((TAT - now) / 1 ms), read back in the same
                # MULTI; Redis's clock moves between its commands, by a few ms on a loaded
                # machine (seen: 8 ms in CI), so allow 50 ms of it.
                px = (tats[i] - now + 999) // 1000
                assert px - 50 <= ttl <= px
        stored = [redis.command("GET", k) for k in keys]
        for i, value in enumerate(stored):
            if value is not None:
                assert int(value) == tats[i]
            else:
                assert tats[i] <= now or tats[i] == 0


def test_sync_script_adds_consumption_and_returns_the_debt(redis: helpers.RedisServer) -> None:
    load(redis, SYNC_SCRIPT_TEST)
    key = b"fg:rl:h:{x}:0"
    debt, _ = step(redis, SYNC_SCRIPT_TEST, [key], [300_000, T0])
    assert debt == 300_000
    debt, (ttl,) = step(redis, SYNC_SCRIPT_TEST, [key], [200_000, T0 + 100_000])
    assert debt == 400_000 and ttl in (400, 399)
    debt, _ = step(redis, SYNC_SCRIPT_TEST, [key], [0, T0 + 10_000_000])
    assert debt == 0  # the bucket refilled: nothing owed


def test_production_script_uses_redis_time_and_hash_tags(redis: helpers.RedisServer) -> None:
    keys = redis_keys(b"fg:rl:api:", b"\x00secret-api-key", 2)
    assert len({key_slot(k) for k in keys}) == 1
    assert all(b"secret" not in k for k in keys)
    args = decide_args([1_000_000, 60_000_000], [2, 100], [1, 1], [False, False])
    replies = [redis.command("EVAL", DECIDE_SCRIPT.source, 2, *keys, *args) for _ in range(3)]
    assert [unpack_decisions(r, [False, False])[0] for r in replies] == [-1, -1, 0]
    assert unpack_decisions(replies[1], [False, False])[1] == 0  # the per-second one is tighter
    assert 0 < int(redis.command("PTTL", keys[0])) <= 2000


# ---- stores on a running loop ----------------------------------------------------------------


def options(**extra: Any) -> Any:
    return parse_options({"rate": "2/s", "burst": 2, "store": "redis", "redis": "main", **extra})


def redis_store(server: helpers.RedisServer, fail_open: bool = True) -> RedisStore:
    opts = options()
    client = RedisClient(
        "127.0.0.1", server.port, command_timeout=0.5, connect_timeout=0.5, max_backoff=0.1
    )
    outage = Outage("api", limit_set(opts.limits, 1000, share=2), fail_open, 2)
    return RedisStore("api", client, [500_000], [2], [1], [False], outage, lambda i, k: None)


async def settle(store: Any, key: bytes) -> Any:
    result = store.decide(key)
    return await result if asyncio.iscoroutine(result) else result


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail_open", "fail_closed"])
def test_redis_store_outage_and_recovery(
    redis: helpers.RedisServer, fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fastgate.rate_limit")

    decided: list[int] = []

    async def scenario() -> None:
        store = redis_store(redis, fail_open)
        try:
            assert [(await settle(store, b"k"))[0] for _ in range(3)] == [-1, -1, 0]
            redis.kill()
            results = [await settle(store, b"k2") for _ in range(3)]
            if fail_open:  # the local share: 1 per second, burst 1
                assert [r[0] for r in results] == [-1, 0, 0]
            else:
                assert results == [None, None, None]
            assert store.outage.down and store.outage.outages == 1
            assert store.outage.local_decisions == 3
            redis.start()
            for _ in range(100):
                await asyncio.sleep(0.05)
                result = await settle(store, b"k3")
                if not store.outage.down:
                    break
            assert not store.outage.down and result is not None and result[0] == -1
            decided.append(store.outage.local_decisions)
        finally:
            await store.client.close()

    helpers.run_on("uvloop", scenario())
    text = caplog.text
    assert text.count("Redis unavailable") == 1  # once per outage
    # The 3 decisions above, plus those made while the client was still reconnecting.
    m = re.search(r"Redis is back; (\d+) decision\(s\)", text)
    assert m is not None, text
    assert int(m.group(1)) == decided[0]
    assert decided[0] >= 3


def test_gcra_with_the_emission_as_period_is_the_same_limit() -> None:
    # The hybrid store calls gcra(tat, now, T, 1.0, burst, cost): the same decisions as the
    # limit written as a rate.
    rng = random.Random(3)
    tat = 0
    now = T0
    emission = RateLimiter(7.0, 1.0, 4).emission_us
    for _ in range(2000):
        now += rng.choice([0, 1, 50_000, 142_857, 1_000_000])
        cost = rng.choice([0, 1, 1, 2, 5])
        expected = gcra(tat, now, 1_000_000, 7.0, 4, cost)
        assert gcra(tat, now, emission, 1.0, 4, cost) == expected
        tat = expected[1]


def test_two_hybrid_instances_learn_each_others_consumption(
    redis: helpers.RedisServer,
) -> None:
    async def scenario() -> None:
        clients = [RedisClient("127.0.0.1", redis.port, command_timeout=0.5) for _ in range(2)]
        stores = [
            HybridStore(
                "h",
                c,
                [100_000],
                [5],
                [1],
                [False],
                Outage("h", limit_set(options().limits, 100), True, 2),
                lambda i, k: None,
                sync_interval=3600,
                max_keys=100,
            )
            for c in clients
        ]
        try:
            a, b = stores
            assert [a.decide(b"k")[0] for _ in range(4)] == [-1] * 4  # 4 of 5 spent on a
            await a.sync()  # NOSCRIPT: the script is loaded and the batch kept for next time
            assert a.pending and redis.command("GET", redis_keys(a.prefix, b"k", 1)[0]) is None
            await a.sync()
            assert not a.pending
            assert b.decide(b"k")[0] == -1  # b has not heard yet: 1 more of its own ...
            await b.sync()  # ... pushed, and the shared debt pulled
            assert b.decide(b"k")[0] == 0  # now it knows: 5 of 5 spent
            assert not a.sync_failed and not b.sync_failed
        finally:
            for s in stores:
                s.close()
            for c in clients:
                await c.close()

    helpers.run_on("uvloop", scenario())


# ---- providers ------------------------------------------------------------------------------


def provider(**settings: Any) -> Any:
    return parse_config(
        {"entrypoints": {"w": {}}, "providers": {"redis": {"p": settings}}}
    ).providers.redis["p"]


def test_one_client_per_provider_until_its_settings_change() -> None:
    first = redis_client("rl-test", provider(address="127.0.0.1:1"))
    assert redis_client("rl-test", provider(address="127.0.0.1:1")) is first
    changed = redis_client("rl-test", provider(address="127.0.0.1:2"))
    assert changed is not first and changed.port == 2


@pytest.mark.parametrize("kind", ["tls", "sentinel"])
def test_store_through_tls_and_sentinel_providers(tmp_path: Path, kind: str) -> None:
    helpers.require_redis_server()
    servers = helpers.RedisServers(tmp_path)
    try:
        if kind == "tls":
            server = servers.start(tls=True, password="s3cret")
            settings = {
                "address": f"127.0.0.1:{server.port}",
                "tls": str(servers.tls.ca_file),
                "password": "s3cret",
                "db": 3,
            }
        else:
            master = servers.start()
            sentinel = servers.start_sentinel(master, "main-master")
            settings = {
                "sentinel": {"addresses": [f"127.0.0.1:{sentinel.port}"], "master": "main-master"}
            }
            server = master
        client = build_client(provider(**settings))
        opts = options()
        store = RedisStore(
            "p",
            client,
            [500_000],
            [2],
            [1],
            [False],
            Outage("p", limit_set(opts.limits, 10), False, 1),
            lambda i, k: None,
        )

        async def scenario() -> list[Any]:
            try:
                return [await settle(store, b"k") for _ in range(3)]
            finally:
                await client.close()

        results = helpers.run_on("uvloop", scenario())
        assert [r[0] for r in results] == [-1, -1, 0]
        db = 3 if kind == "tls" else 0
        script = f"redis.call('SELECT', {db}) return redis.call('DBSIZE')"
        assert server.command("EVAL", script, 0) == 1  # the one TAT key, in the chosen db
    finally:
        servers.stop_all()
