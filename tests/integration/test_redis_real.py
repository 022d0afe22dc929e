"""The Redis client against real redis-server processes (tests/redis_server.py starts them).

Covers commands and reply types, auto-pipelining (round trips counted by the client), binary
safety, error replies, EVALSHA with NOSCRIPT reload, AUTH (password and ACL user), SELECT
isolation, command timeouts, a server killed and restarted on the same port, TLS and mutual
TLS, Sentinel discovery and re-discovery, and hash tags on a cluster-enabled node.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import pytest

from fastgate.redis import (
    RedisClient,
    RedisReplyError,
    RedisUnavailable,
    Script,
    SentinelConfig,
    hash_tag,
    key_slot,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis_server as helpers

redis_servers = helpers.redis_servers
redis_server = helpers.redis_server
RedisServer = helpers.RedisServer
RedisServers = helpers.RedisServers
LOOPS = helpers.LOOPS
run_on = helpers.run_on
free_port = helpers.free_port

SECRET = "s3cret-Pa55word-xyz"
COUNTER = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def wait_connected(client: RedisClient, timeout: float = 5.0) -> None:
    await wait_until(lambda: client.connected, timeout)


def client_count(server: RedisServer) -> int:
    """Connections the server has, not counting the control connection that asks."""
    return len(server.command("CLIENT", "LIST").splitlines()) - 1


# ---- commands and pipelining -----------------------------------------------------------------


@pytest.mark.parametrize("loop_name", LOOPS)
def test_basic_commands(redis_server: RedisServer, loop_name: str) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port)
        await client.connect()
        assert client.connected and client.available
        assert await client.ping() == b"PONG"
        assert await client.execute("SET", "greeting", "hello") == b"OK"
        assert await client.execute("GET", "greeting") == b"hello"
        assert await client.execute("GET", "missing") is None
        assert await client.execute("INCRBY", "n", 5) == 5
        assert await client.execute("INCRBYFLOAT", "f", 0.5) == b"0.5"
        assert await client.execute("RPUSH", "l", b"a", b"b", 3) == 3
        assert await client.execute("LRANGE", "l", 0, -1) == [b"a", b"b", b"3"]
        assert await client.execute("DEL", "greeting", "n", "f", "l") == 4
        stats = client.stats()
        assert stats["commands"] == 9 and stats["errors"] == 0 and stats["timeouts"] == 0
        await client.close()
        assert not client.connected
        assert client_count(redis_server) == 0

    run_on(loop_name, body())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_thousand_commands_in_one_turn_take_one_write(
    redis_server: RedisServer, loop_name: str
) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port)
        await client.connect()
        before = client.stats()
        replies = await asyncio.gather(*(client.execute("INCR", "counter") for _ in range(1000)))
        after = client.stats()
        assert replies == list(range(1, 1001))  # in order, each matched to its own command
        assert after["commands"] - before["commands"] == 1000
        assert after["writes"] - before["writes"] == 1
        await client.close()

    run_on(loop_name, body())


def test_concurrent_tasks_share_writes(redis_server: RedisServer) -> None:
    async def one(client: RedisClient, i: int) -> tuple[bytes, bytes]:
        await client.execute("SET", f"k{i}", f"v{i}")
        return await client.execute("GET", f"k{i}"), await client.execute("GET", "k0")

    async def body() -> None:
        client = RedisClient(port=redis_server.port)
        await client.connect()
        before = client.stats()["writes"]
        results = await asyncio.gather(*(one(client, i) for i in range(500)))
        assert results == [(f"v{i}".encode(), b"v0") for i in range(500)]
        # 1,500 requests in three waves; each wave is one write (allow a split wave or two).
        writes = client.stats()["writes"] - before
        assert 3 <= writes <= 5, writes
        await client.close()

    run_on("uvloop", body())


def test_binary_safe_values(redis_server: RedisServer) -> None:
    values = {
        b"all-bytes": bytes(range(256)),
        b"crlf\r\nkey\x00": b"\r\n$3\r\n*1\r\n-ERR not an error\r\n",
        b"empty": b"",
        b"large": bytes(range(256)) * 4096,  # 1 MiB: many reads for one reply
        "ключ".encode(): "значение".encode(),
    }

    async def body() -> None:
        client = RedisClient(port=redis_server.port)
        for key, value in values.items():
            client.execute("SET", key, value)
        got = await asyncio.gather(*(client.execute("GET", key) for key in values))
        assert got == list(values.values())
        assert all(type(v) is bytes for v in got)
        await client.close()

    run_on("uvloop", body())


def test_error_replies(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port)
        await client.execute("SET", "s", "x")
        futures = [
            client.execute("INCR", "s"),
            client.execute("LPUSH", "s", "y"),
            client.execute("NOSUCHCOMMAND"),
            client.execute("GET", "s"),
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert type(results[0]) is RedisReplyError and results[0].code == "ERR"
        assert "not an integer" in results[0].message
        assert type(results[1]) is RedisReplyError and results[1].code == "WRONGTYPE"
        assert type(results[2]) is RedisReplyError and "unknown command" in str(results[2])
        assert results[3] == b"x"  # neighbours in the same pipeline are unaffected
        assert client.connected  # an error reply is not a connection problem
        assert client.stats()["errors"] == 3
        await client.close()

    run_on("uvloop", body())


def test_eval_script_reloads_after_noscript(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port)
        with pytest.raises(RedisReplyError) as info:
            await client.evalsha(COUNTER.sha, ["c"], [1])
        assert info.value.code == "NOSCRIPT"
        assert await client.eval_script(COUNTER, ["c"], [2]) == 2  # loaded, then retried
        assert await client.eval_script(COUNTER, ["c"], [3]) == 5  # straight EVALSHA
        assert await client.execute("SCRIPT", "FLUSH") == b"OK"
        assert await client.eval_script(COUNTER, [b"c"], [4]) == 9  # reloaded again
        assert await client.execute("SCRIPT", "EXISTS", COUNTER.sha) == [1]
        assert await client.script_load("return 7") == Script("return 7").sha
        with pytest.raises(RedisReplyError, match=r"^LIMIT broken$"):
            await client.eval_script(Script("return redis.error_reply('LIMIT broken')"))
        await client.close()

    run_on("uvloop", body())


# ---- authentication and databases -----------------------------------------------------------


def test_auth_with_password(redis_servers: RedisServers, caplog: pytest.LogCaptureFixture) -> None:
    server = redis_servers.start(password=SECRET)
    caplog.set_level(logging.DEBUG, logger="fastgate.redis")

    async def body() -> list[Exception]:
        errors: list[Exception] = []
        good = RedisClient(port=server.port, password=SECRET)
        assert await good.execute("SET", "k", "v") == b"OK"
        await good.close()

        wrong = "Wr0ng-" + SECRET
        bad = RedisClient(port=server.port, password=wrong, max_backoff=0.1)
        with pytest.raises(RedisUnavailable, match="authentication") as info:
            await bad.connect()
        assert "WRONGPASS" in str(info.value)
        errors.append(info.value)
        with pytest.raises(RedisUnavailable) as info:
            await bad.execute("GET", "k")  # fails fast: the client is backing off
        errors.append(info.value)
        assert wrong not in repr(bad)
        await bad.close()

        anonymous = RedisClient(port=server.port)
        with pytest.raises(RedisUnavailable, match="NOAUTH") as info:
            await anonymous.execute("GET", "k")
        errors.append(info.value)
        await anonymous.close()
        return errors

    errors = run_on("uvloop", body())
    for exc in errors:
        for text in (str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)):
            assert SECRET not in text
    assert SECRET not in caplog.text
    assert "authentication" in caplog.text  # the outage was logged, without the secret


def test_auth_with_acl_user(redis_servers: RedisServers) -> None:
    server = redis_servers.start()
    server.command("ACL", "SETUSER", "limiter", "on", f">{SECRET}", "~rl:*", "+@all")

    async def body() -> None:
        client = RedisClient(port=server.port, username="limiter", password=SECRET)
        assert await client.execute("SET", "rl:a", 1) == b"OK"
        assert await client.execute("ACL", "WHOAMI") == b"limiter"
        with pytest.raises(RedisReplyError, match="NOPERM"):
            await client.execute("SET", "other", 1)  # the ACL user's key pattern applies
        await client.close()

        stranger = RedisClient(port=server.port, username="nobody", password=SECRET)
        with pytest.raises(RedisUnavailable, match="WRONGPASS") as info:
            await stranger.connect()
        assert SECRET not in str(info.value)
        await stranger.close()

    run_on("uvloop", body())


def test_select_db_isolation(redis_server: RedisServer) -> None:
    async def body() -> None:
        zero = RedisClient(port=redis_server.port)
        three = RedisClient(port=redis_server.port, db=3, password=None)
        await asyncio.gather(zero.execute("SET", "k", "zero"), three.execute("SET", "k", "three"))
        assert await zero.execute("GET", "k") == b"zero"
        assert await three.execute("GET", "k") == b"three"
        assert await three.execute("DBSIZE") == 1
        await zero.close()
        await three.close()
        assert redis_server.command("SELECT", 3) == b"OK"

        out_of_range = RedisClient(port=redis_server.port, db=99)
        with pytest.raises(RedisUnavailable, match="SELECT 99 failed"):
            await out_of_range.execute("SET", "k", "must not land in db 0")
        await out_of_range.close()
        assert redis_server.command("GET", "k") == b"zero"

    run_on("uvloop", body())


# ---- timeouts, loss, reconnect ----------------------------------------------------------------


def test_command_timeout_then_recovery(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port, command_timeout=0.2, max_backoff=0.2)
        await client.connect()
        start = time.monotonic()
        sleeping = client.execute("DEBUG", "SLEEP", "0.8")
        behind = client.execute("GET", "k")
        with pytest.raises(RedisUnavailable, match=r"timed out after 0\.2 s"):
            await sleeping
        assert time.monotonic() - start < 0.45  # promptly, not when the server wakes
        with pytest.raises(RedisUnavailable, match="timed out"):
            await behind
        assert not client.available
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")  # fails fast while reconnecting
        await wait_connected(client, timeout=5.0)
        assert await client.execute("SET", "k", "after") == b"OK"
        stats = client.stats()
        assert stats["timeouts"] == 2 and stats["reconnects"] == 1
        await client.close()
        await asyncio.sleep(0.05)
        assert client_count(redis_server) == 0

    run_on("uvloop", body())


def test_timeout_fails_only_the_late_command(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port, command_timeout=0.4, max_backoff=0.2)
        await client.execute("SET", "k", "v")
        start = time.monotonic()
        slow = client.execute("DEBUG", "SLEEP", "0.6")  # answered at ~0.6 s, deadline 0.4 s
        await asyncio.sleep(0.35)
        behind = client.execute("GET", "k")  # deadline ~0.75 s: the drained reply is in time
        with pytest.raises(RedisUnavailable, match="timed out"):
            await slow
        assert time.monotonic() - start < 0.55
        assert await behind == b"v"  # same connection, FIFO still in step after the timeout
        await wait_connected(client, timeout=5.0)
        assert await client.execute("GET", "k") == b"v"
        stats = client.stats()
        assert stats["timeouts"] == 1 and stats["unavailable"] == 0
        await client.close()

    run_on("uvloop", body())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_server_killed_and_restarted(redis_server: RedisServer, loop_name: str) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port, command_timeout=5.0, max_backoff=0.2)
        await client.execute("SET", "before", 1)
        blocked = client.execute("BLPOP", "never-filled", 0)  # in flight when the server dies
        await asyncio.sleep(0.05)
        redis_server.kill()
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"closed by the server|lost"):
            await blocked
        assert time.monotonic() - start < 1.0
        assert not client.available and not client.connected

        start = time.monotonic()
        failures = 0
        for _ in range(20):  # while down: each command fails at once, nothing queues
            with pytest.raises(RedisUnavailable):
                await client.execute("GET", "before")
            failures += 1
            await asyncio.sleep(0.02)
        loop_time = time.monotonic() - start
        assert failures == 20 and loop_time < 2.0

        redis_server.start()  # same port, empty data (no persistence)
        await wait_connected(client, timeout=5.0)
        assert client.available
        assert await client.execute("GET", "before") is None
        assert await client.execute("SET", "after", 1) == b"OK"
        stats = client.stats()
        assert stats["reconnects"] == 1 and stats["unavailable"] >= 21
        await client.close()

    run_on(loop_name, body())


def test_first_command_before_server_exists(redis_servers: RedisServers) -> None:
    port = free_port()

    async def body() -> None:
        client = RedisClient(port=port, max_backoff=0.2)
        with pytest.raises(RedisUnavailable, match="failed"):
            await client.execute("PING")
        await asyncio.to_thread(redis_servers.start, port=port)
        await wait_connected(client, timeout=5.0)
        assert await client.ping() == b"PONG"
        await client.close()

    run_on("uvloop", body())


def test_close_fails_in_flight_and_leaves_no_connection(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = RedisClient(port=redis_server.port, command_timeout=5.0)
        await client.connect()
        assert client_count(redis_server) == 1
        blocked = client.execute("BLPOP", "nothing", 0)
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(RedisUnavailable, match="closed"):
            await blocked
        await client.close()  # idempotent
        await asyncio.sleep(0.05)
        assert client_count(redis_server) == 0

    run_on("uvloop", body())


# ---- TLS -------------------------------------------------------------------------------------


def test_tls(redis_servers: RedisServers) -> None:
    server = redis_servers.start(tls=True, password=SECRET)

    async def body() -> None:
        ctx = redis_servers.tls.client_context()
        client = RedisClient(port=server.port, password=SECRET, ssl=ctx)
        assert await client.execute("SET", "k", b"over tls") == b"OK"
        replies = await asyncio.gather(*(client.execute("INCR", "n") for _ in range(200)))
        assert replies == list(range(1, 201))
        assert (await client.execute("CLIENT", "INFO")).count(b"fd=") == 1
        await client.close()

        import ssl

        untrusting = RedisClient(
            port=server.port, password=SECRET, ssl=ssl.create_default_context()
        )
        with pytest.raises(RedisUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await untrusting.connect()
        await untrusting.close()

        plain = RedisClient(port=server.port, password=SECRET, connect_timeout=0.5)
        with pytest.raises(RedisUnavailable):
            await plain.connect()  # plain text to a TLS port never completes a handshake
        await plain.close()

    run_on("uvloop", body())


def test_mutual_tls(redis_servers: RedisServers) -> None:
    server = redis_servers.start(tls=True, tls_auth_clients=True)

    async def body() -> None:
        with_cert = RedisClient(
            port=server.port, ssl=redis_servers.tls.client_context(client_cert=True)
        )
        assert await with_cert.ping() == b"PONG"
        await with_cert.close()
        without = RedisClient(port=server.port, ssl=redis_servers.tls.client_context())
        with pytest.raises(RedisUnavailable):
            await without.connect()
        await without.close()

    run_on("uvloop", body())


# ---- Sentinel --------------------------------------------------------------------------------


def test_sentinel_discovery(redis_servers: RedisServers) -> None:
    master = redis_servers.start(password=SECRET)
    sentinel = redis_servers.start_sentinel(master, "cache", password="sentinel-" + SECRET)

    async def body() -> None:
        config = SentinelConfig(
            [("127.0.0.1", free_port()), f"127.0.0.1:{sentinel.port}"],  # the first is dead
            "cache",
            password="sentinel-" + SECRET,
        )
        client = RedisClient(password=SECRET, db=2, sentinel=config)
        assert await client.execute("SET", "via", "sentinel") == b"OK"
        assert client.connected
        await client.close()
        assert master.command("SELECT", 2) == b"OK"

        unknown = RedisClient(sentinel=SentinelConfig([f"127.0.0.1:{sentinel.port}"], "cache"))
        with pytest.raises(RedisUnavailable, match=r"NOAUTH|no sentinel") as info:
            await unknown.connect()  # no sentinel password: every sentinel refuses
        assert SECRET not in str(info.value)
        await unknown.close()

        wrong_name = SentinelConfig(
            [f"127.0.0.1:{sentinel.port}"], "nope", password="sentinel-" + SECRET
        )
        lost = RedisClient(password=SECRET, sentinel=wrong_name)
        with pytest.raises(RedisUnavailable, match="does not know this master"):
            await lost.connect()
        await lost.close()

    run_on("uvloop", body())
    # The write went to the master's db 2, found through the sentinel.
    conn_check = master.command(
        "EVAL", "redis.call('SELECT', 2) return redis.call('GET', 'via')", 0
    )
    assert conn_check == b"sentinel"


def test_sentinel_rediscovers_after_master_change(redis_servers: RedisServers) -> None:
    first = redis_servers.start()
    second = redis_servers.start()
    sentinel = redis_servers.start_sentinel(first, "rl")

    async def body() -> None:
        config = SentinelConfig([("127.0.0.1", sentinel.port)], "rl")
        client = RedisClient(sentinel=config, max_backoff=0.2)
        assert await client.execute("SET", "where", "first") == b"OK"
        # Point the sentinel at the second server (what a failover does), then lose the first.
        sentinel.command("SENTINEL", "REMOVE", "rl")
        sentinel.command("SENTINEL", "MONITOR", "rl", "127.0.0.1", second.port, 1)
        first.kill()
        await wait_until(lambda: not client.connected)
        await wait_connected(client, timeout=5.0)
        assert await client.execute("SET", "where", "second") == b"OK"
        assert client.stats()["reconnects"] == 1
        await client.close()

    run_on("uvloop", body())
    assert second.command("GET", "where") == b"second"


def test_sentinel_named_replica_is_refused(redis_servers: RedisServers) -> None:
    master = redis_servers.start()
    replica = redis_servers.start(config=[f"replicaof 127.0.0.1 {master.port}"])
    sentinel = redis_servers.start_sentinel(replica, "stale")  # a view that lags a failover

    async def body() -> None:
        client = RedisClient(sentinel=SentinelConfig([("127.0.0.1", sentinel.port)], "stale"))
        with pytest.raises(RedisUnavailable, match="is a slave, not a master"):
            await client.connect()
        assert not client.available
        await client.close()

    run_on("uvloop", body())


# ---- cluster hash tags -----------------------------------------------------------------------


def test_hash_tags_on_a_cluster_node(redis_servers: RedisServers) -> None:
    node = redis_servers.start(
        config=[
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            "cluster-node-timeout 5000",
            f"cluster-port {free_port()}",  # else the bus is port + 10000, maybe past 65535
        ]
    )
    node.command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    two_keys = Script("redis.call('INCR', KEYS[1]) return redis.call('INCRBY', KEYS[2], ARGV[1])")

    async def body() -> None:
        client = RedisClient(port=node.port)
        await wait_until_cluster_ok(client)
        identities = [b"user:42", b"10.1.2.3", b"", b"}evil{", b"a{b}c", "ключ".encode()]
        for identity in identities:
            tag = hash_tag(identity)
            keys = [tag + b":tat", tag + b":count"]
            assert await client.execute("CLUSTER", "KEYSLOT", keys[0]) == key_slot(keys[0])
            assert await client.eval_script(two_keys, keys, [5]) == 5
        with pytest.raises(RedisReplyError, match="CROSSSLOT"):
            await client.eval_script(two_keys, [b"user:42:tat", b"user:42:count"], [1])
        await client.close()

    run_on("uvloop", body())


async def wait_until_cluster_ok(client: RedisClient) -> None:
    deadline = time.monotonic() + 5.0
    while b"cluster_state:ok" not in await client.execute("CLUSTER", "INFO"):
        assert time.monotonic() < deadline, "single-node cluster never became ok"
        await asyncio.sleep(0.05)
