"""Redis client without a server: RESP encoding, hash tags and slots, the backoff schedule,
Script SHA1s, secrets kept out of reprs, and the connection's reply matching, pipelining and
deadlines driven through a fake transport (whole input, one byte at a time, trailing bytes).
The client's connect path is checked against a port where nothing listens."""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import sys
import time
from pathlib import Path

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate.redis import (
    RedisClient,
    RedisError,
    RedisReplyError,
    RedisUnavailable,
    Script,
    SentinelConfig,
    backoff_delay,
    encode_command,
    hash_tag,
    key_slot,
)
from fastgate.redis.client import BASE_BACKOFF
from fastgate.redis.connection import Connection, Stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis_server as helpers

LOOPS = helpers.LOOPS
run_on = helpers.run_on

SECRET = "pa55-w0rd-never-shown"


# ---- RESP encoding ---------------------------------------------------------------------------


def oracle_encode(args: tuple) -> bytes:
    """RESP2 "array of bulk strings", written from the protocol spec as plainly as possible."""
    out = b"*" + str(len(args)).encode() + b"\r\n"
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int):
            data = str(arg).encode()
        else:
            data = repr(arg).encode()
        out += b"$" + str(len(data)).encode() + b"\r\n" + data + b"\r\n"
    return out


ENCODINGS = [
    pytest.param(("PING",), b"*1\r\n$4\r\nPING\r\n", id="one word"),
    pytest.param(
        ("SET", b"k", b"v"), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", id="bytes arguments"
    ),
    pytest.param(("GET", b""), b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n", id="empty bulk string"),
    pytest.param(
        ("SET", b"a\r\nb", b"\x00\xff"),
        b"*3\r\n$3\r\nSET\r\n$4\r\na\r\nb\r\n$2\r\n\x00\xff\r\n",
        id="binary-safe: CRLF and NUL inside arguments",
    ),
    pytest.param(("ECHO", "é"), b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n", id="str is UTF-8"),
    pytest.param(
        ("INCRBY", "k", -42), b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$3\r\n-42\r\n", id="int decimal"
    ),
    pytest.param(("X", 2**64), b"*2\r\n$1\r\nX\r\n$20\r\n18446744073709551616\r\n", id="big int"),
    pytest.param(("X", 0.1), b"*2\r\n$1\r\nX\r\n$3\r\n0.1\r\n", id="float shortest repr"),
    pytest.param(("X", 1e20), b"*2\r\n$1\r\nX\r\n$5\r\n1e+20\r\n", id="float exponent"),
    pytest.param(("X", float("inf")), b"*2\r\n$1\r\nX\r\n$3\r\ninf\r\n", id="float inf"),
    pytest.param(
        ("X", b"y" * 300), b"*2\r\n$1\r\nX\r\n$300\r\n" + b"y" * 300 + b"\r\n", id="length > 255"
    ),
]


@pytest.mark.parametrize(("args", "expected"), ENCODINGS)
def test_encode_command(args: tuple, expected: bytes) -> None:
    encoded = encode_command(args)
    assert type(encoded) is bytes
    assert encoded == expected
    assert oracle_encode(args) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.text(max_size=20),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=False),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_encode_command_matches_oracle(args: list) -> None:
    assert encode_command(tuple(args)) == oracle_encode(tuple(args))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(True, id="bool is refused, not sent as 1"),
        pytest.param(None, id="None"),
        pytest.param([b"x"], id="list"),
        pytest.param({"a": 1}, id="dict"),
    ],
)
def test_execute_refuses_other_types_at_once(bad: object) -> None:
    # Raised by execute itself, before any connection or event loop is involved.
    client = RedisClient(port=1)
    with pytest.raises(TypeError):
        client.execute("SET", "k", bad)
    assert client.stats()["commands"] == 0


# ---- hash tags and slots ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "tagged"),
    [
        pytest.param(b"user:42", b"{user:42}", id="plain key is wrapped"),
        pytest.param(b"10.0.0.1", b"{10.0.0.1}", id="address"),
        pytest.param(b"", b"{{}", id="empty key is escaped, tag never empty"),
        pytest.param(b"}x", b"{{7d78}", id="leading } cannot empty the tag"),
        pytest.param(b"a{b}c", b"{{617b627d63}", id="own braces cannot pick the tag"),
    ],
)
def test_hash_tag(key: bytes, tagged: bytes) -> None:
    assert hash_tag(key) == tagged
    assert key_slot(tagged + b":tat") == key_slot(tagged + b":count")


def crc_slot(data: bytes) -> int:
    return binascii.crc_hqx(data, 0) % 16384


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        pytest.param(b"123456789", 0x31C3, id="CRC16-XMODEM check value"),
        pytest.param(b"foo", 12182, id="foo"),
        pytest.param(b"somekey", 11058, id="somekey"),
        pytest.param(b"{user1000}.following", crc_slot(b"user1000"), id="tag is hashed"),
        pytest.param(b"foo{}{bar}", crc_slot(b"foo{}{bar}"), id="empty tag: whole key"),
        pytest.param(b"foo{{bar}}zap", crc_slot(b"{bar"), id="first { to first }"),
        pytest.param(b"foo{bar}{zap}", crc_slot(b"bar"), id="first tag only"),
        pytest.param(b"{}", crc_slot(b"{}"), id="only braces"),
        pytest.param(b"a}b{c}", crc_slot(b"c"), id="} before { is plain"),
    ],
)
def test_key_slot(key: bytes, slot: int) -> None:
    assert key_slot(key) == slot
    assert 0 <= slot < 16384


def test_key_slot_empty_tag_hashes_whole_key() -> None:
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=24), st.binary(max_size=24), st.binary(max_size=8))
def test_hash_tag_properties(a: bytes, b: bytes, suffix: bytes) -> None:
    tag = hash_tag(a)
    # Every key derived from one identity lands in one slot, whatever the suffix holds.
    assert key_slot(tag + suffix) == key_slot(tag)
    assert key_slot(tag + b":x" + suffix) == key_slot(tag + b":y")
    # The tag part Redis hashes is never empty.
    start = tag.find(b"{")
    assert start == 0 and tag.find(b"}", start + 1) > 1
    # One-to-one: different identities never share key names.
    assert (hash_tag(a) == hash_tag(b)) == (a == b)


# ---- backoff ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "cap", "low", "high"),
    [
        pytest.param(0, 5.0, BASE_BACKOFF / 2, BASE_BACKOFF, id="first retry is quick"),
        pytest.param(1, 5.0, BASE_BACKOFF, BASE_BACKOFF * 2, id="doubles"),
        pytest.param(4, 5.0, BASE_BACKOFF * 8, BASE_BACKOFF * 16, id="doubles again"),
        pytest.param(7, 5.0, 2.5, 5.0, id="capped at max_backoff"),
        pytest.param(1000, 5.0, 2.5, 5.0, id="huge attempt numbers stay capped"),
        pytest.param(3, 0.1, 0.05, 0.1, id="small cap"),
    ],
)
def test_backoff_delay_bounds(attempt: int, cap: float, low: float, high: float) -> None:
    assert backoff_delay(attempt, cap, rand=lambda: 0.0) == pytest.approx(low)
    top = backoff_delay(attempt, cap, rand=lambda: 0.999999)
    assert low <= top < high or top == pytest.approx(high)
    assert top <= cap


def test_backoff_delay_is_jittered_and_monotone_in_ceiling() -> None:
    delays = {backoff_delay(5, 5.0) for _ in range(50)}
    assert len(delays) > 40  # random, so workers spread out
    ceilings = [backoff_delay(n, 5.0, rand=lambda: 0.999999) for n in range(12)]
    assert ceilings == sorted(ceilings)
    assert max(ceilings) <= 5.0


# ---- scripts, errors, secrets ----------------------------------------------------------------


def test_script_sha1() -> None:
    script = Script("return 1")
    assert script.sha == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
    assert script.source == b"return 1"
    assert Script(b"return 1").sha == script.sha
    lua = "return redis.call('GET', KEYS[1]) -- é"
    assert Script(lua).sha == hashlib.sha1(lua.encode()).hexdigest()
    assert "return" not in repr(script)


def test_error_classes() -> None:
    assert issubclass(RedisReplyError, RedisError)
    assert issubclass(RedisUnavailable, RedisError)
    reader = hiredis.Reader(replyError=RedisReplyError)
    reader.feed(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    err = reader.gets()
    assert type(err) is RedisReplyError
    assert err.code == "NOSCRIPT"
    assert err.message == "NOSCRIPT No matching script. Please use EVAL."


def test_secrets_stay_out_of_reprs() -> None:
    client = RedisClient(username="app", password=SECRET)
    assert SECRET not in repr(client)
    assert "password=***" in repr(client)
    config = SentinelConfig(["127.0.0.1:26379"], "mymaster", password=SECRET)
    assert SECRET not in repr(config)
    sentinel_client = RedisClient(password=SECRET, sentinel=config)
    assert SECRET not in repr(sentinel_client)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"username": "app"}, "username needs a password", id="username alone"),
        pytest.param({"db": -1}, "db", id="negative db"),
        pytest.param({"command_timeout": 0}, "timeouts", id="zero timeout"),
        pytest.param({"max_backoff": 0}, "max_backoff", id="no backoff would spin"),
    ],
)
def test_client_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisClient(**kwargs)


@pytest.mark.parametrize(
    ("addresses", "parsed"),
    [
        pytest.param(["127.0.0.1:26379"], (("127.0.0.1", 26379),), id="host:port string"),
        pytest.param([("h", "26380")], (("h", 26380),), id="tuple with string port"),
        pytest.param(["[::1]:26379"], (("::1", 26379),), id="bracketed IPv6"),
    ],
)
def test_sentinel_config_addresses(addresses: list, parsed: tuple) -> None:
    assert SentinelConfig(addresses, "m").addresses == parsed


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"addresses": [], "master_name": "m"}, id="no sentinels"),
        pytest.param({"addresses": ["h:1"], "master_name": ""}, id="no master name"),
        pytest.param({"addresses": ["nohost"], "master_name": "m"}, id="not host:port"),
    ],
)
def test_sentinel_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SentinelConfig(**kwargs)


# ---- the connection over a fake transport ----------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def ready_connection(timeout: float | None = None) -> tuple[Connection, FakeTransport, Stats]:
    stats = Stats()
    conn = Connection(asyncio.get_running_loop(), stats, timeout)
    transport = FakeTransport()
    conn.connection_made(transport)
    conn.mark_ready()
    return conn, transport, stats


# Each reply as the server sends it, and what the future resolves to.
REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":42\r\n", 42),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    (b"*2\r\n$1\r\nx\r\n$-1\r\n", [b"x", None]),
    (b"-WRONGTYPE Operation against a key\r\n", RedisReplyError),
    (b"$0\r\n\r\n", b""),
    (b"*0\r\n", []),
]
STREAM = b"".join(wire for wire, _ in REPLIES)


def check_resolved(futures: list[asyncio.Future], count: int) -> None:
    """The first `count` futures hold their replies, exactly typed; the rest are pending."""
    for fut, (_, expected) in zip(futures, REPLIES, strict=True):
        if count == 0:
            assert not fut.done()
            continue
        count -= 1
        assert fut.done()
        if expected is RedisReplyError:
            assert type(fut.exception()) is RedisReplyError
            assert fut.exception().code == "WRONGTYPE"
        else:
            assert fut.result() == expected
            assert type(fut.result()) is type(expected)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_replies_whole_input(loop_name: str) -> None:
    async def body() -> None:
        conn, _, stats = ready_connection()
        futures = [conn.send(b"*1\r\n$4\r\nPING\r\n") for _ in REPLIES]
        conn.data_received(STREAM)
        check_resolved(futures, len(REPLIES))
        assert stats.errors == 1
        assert not conn.closed

    run_on(loop_name, body())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_replies_one_byte_at_a_time(loop_name: str) -> None:
    async def body() -> None:
        conn, _, _ = ready_connection()
        futures = [conn.send(b"*1\r\n$4\r\nPING\r\n") for _ in REPLIES]
        ends = []
        total = 0
        for wire, _ in REPLIES:
            total += len(wire)
            ends.append(total)
        for i in range(len(STREAM)):
            conn.data_received(STREAM[i : i + 1])
            # Nothing resolves until its last byte is in.
            check_resolved(futures, sum(1 for end in ends if end <= i + 1))

    run_on(loop_name, body())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_replies_with_trailing_bytes(loop_name: str) -> None:
    async def body() -> None:
        conn, _, _ = ready_connection()
        futures = [conn.send(b"*1\r\n$4\r\nPING\r\n") for _ in REPLIES]
        extra = conn.send(b"*1\r\n$4\r\nPING\r\n")
        conn.data_received(STREAM + b"$5\r\nhel")
        check_resolved(futures, len(REPLIES))
        assert not extra.done()  # the partial reply waits in the reader, untouched
        conn.data_received(b"lo\r\n")
        assert extra.result() == b"hello"

    run_on(loop_name, body())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_one_write_per_loop_turn(loop_name: str) -> None:
    async def body() -> None:
        conn, transport, stats = ready_connection()
        for i in range(1000):
            conn.send(encode_command(("INCR", i)))
        assert transport.writes == []  # nothing written inside the turn
        await asyncio.sleep(0)
        assert len(transport.writes) == 1
        assert transport.writes[0] == b"".join(encode_command(("INCR", i)) for i in range(1000))
        conn.send(encode_command(("PING",)))
        await asyncio.sleep(0)
        assert len(transport.writes) == 2
        assert stats.writes == 2 and stats.commands == 1001

    run_on(loop_name, body())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_cancelled_command_keeps_its_place(loop_name: str) -> None:
    async def body() -> None:
        conn, _, _ = ready_connection()
        first = conn.send(b"x")
        second = conn.send(b"y")
        first.cancel()
        conn.data_received(b"+one\r\n+two\r\n")
        assert second.result() == b"two"

    run_on(loop_name, body())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"!garbage\r\n", "protocol error", id="bad type byte"),
        pytest.param(b"+OK\r\n+OK\r\n+OK\r\n", "reply without a request", id="unsolicited"),
    ],
)
def test_bad_input_closes_and_fails_waiters(data: bytes, reason: str) -> None:
    async def body() -> None:
        lost = []
        stats = Stats()
        conn = Connection(
            asyncio.get_running_loop(), stats, None, on_lost=lambda c, r: lost.append(r)
        )
        transport = FakeTransport()
        conn.connection_made(transport)
        conn.mark_ready()
        futures = [conn.send(b"x"), conn.send(b"y")]
        conn.data_received(data)
        assert conn.closed and transport.aborted
        assert len(lost) == 1 and reason in lost[0]
        for fut in futures:
            if fut.exception() is not None:
                assert type(fut.exception()) is RedisUnavailable
        assert conn.down.result() == lost[0]

    run_on("uvloop", body())


def test_timeout_fails_only_the_late_command_then_drains() -> None:
    async def body() -> None:
        lost = []
        stats = Stats()
        loop = asyncio.get_running_loop()
        conn = Connection(loop, stats, 0.1, on_lost=lambda c, r: lost.append(r))
        transport = FakeTransport()
        conn.connection_made(transport)
        conn.mark_ready()
        late = [conn.send(b"a"), conn.send(b"b")]
        await asyncio.sleep(0.05)
        later = conn.send(b"c")  # deadline 50 ms after the first two
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"timed out after 0\.1 s"):
            await late[0]
        assert time.monotonic() - start < 0.2
        assert "timed out" in str(late[1].exception())
        # Retired: no new commands, the owner told at once, but not closed while `c` may still
        # be answered, and the FIFO still in step.
        assert conn.retiring and not conn.accepting and not conn.closed
        assert not transport.aborted and not later.done()
        assert len(lost) == 1 and "retired after a command timeout" in lost[0]
        conn.data_received(b"+A\r\n+B\r\n")  # the late replies, matched and dropped
        assert not later.done() and not conn.closed
        conn.data_received(b"+C\r\n")
        assert later.result() == b"C"
        assert conn.closed and transport.aborted  # drained, so closed
        assert len(lost) == 1
        assert stats.timeouts == 2 and stats.unavailable == 0

    run_on("uvloop", body())


def test_retired_connection_closes_when_nothing_can_still_be_answered() -> None:
    async def body() -> None:
        conn, transport, stats = ready_connection(timeout=0.05)
        first = conn.send(b"a")
        await asyncio.sleep(0.03)
        second = conn.send(b"b")
        with pytest.raises(RedisUnavailable):
            await first
        assert conn.retiring and not conn.closed
        with pytest.raises(RedisUnavailable, match="timed out"):
            await second  # the server never answers: it reaches its own deadline
        await asyncio.sleep(0)
        assert conn.closed and transport.aborted
        assert stats.timeouts == 2

    run_on("uvloop", body())


def test_timeout_before_handshake_drops_unwritten_commands() -> None:
    async def body() -> None:
        stats = Stats()
        conn = Connection(asyncio.get_running_loop(), stats, 0.05, accepting=True)
        transport = FakeTransport()
        conn.connection_made(transport)
        waiting = [conn.send(b"a"), conn.send(b"b")]
        await asyncio.sleep(0.1)
        for fut in waiting:
            assert "waiting for the connection" in str(fut.exception())
        assert not conn.closed  # the connect may still succeed
        survivor = conn.send(b"c")
        conn.mark_ready()
        assert transport.writes == [b"c"]  # the dropped ones were never written
        conn.data_received(b"+C\r\n")
        assert survivor.result() == b"C"
        assert stats.timeouts == 2

    run_on("uvloop", body())


# ---- the client against a port where nothing listens -----------------------------------------


@pytest.mark.parametrize("loop_name", LOOPS)
def test_client_fails_fast_when_nothing_listens(loop_name: str) -> None:
    async def body() -> None:
        client = RedisClient(port=helpers.free_port(), password=SECRET, max_backoff=0.2)
        assert client.available and not client.connected  # idle: the first command will try
        with pytest.raises(RedisUnavailable, match=r"connect to 127\.0\.0\.1:\d+ failed") as info:
            await client.execute("PING")
        assert SECRET not in str(info.value)
        assert not client.available
        start = time.monotonic()
        futures = [client.execute("GET", "k") for _ in range(1000)]
        assert all(fut.done() for fut in futures)  # failed before any waiting
        assert time.monotonic() - start < 0.5
        for fut in futures:
            assert type(fut.exception()) is RedisUnavailable
        with pytest.raises(RedisUnavailable):
            await client.connect()  # an explicit attempt, failing the same way
        stats = client.stats()
        assert stats["unavailable"] >= 1001
        assert stats["writes"] == 0 and stats["commands"] == 1
        await client.close()
        assert not client.available
        with pytest.raises(RedisUnavailable, match="closed"):
            await client.execute("PING")
        with pytest.raises(RedisUnavailable, match="closed"):
            await client.connect()

    run_on(loop_name, body())
