"""What each exchange is told about its refusals and its rate-limit decision.

Rules under test (fastgate/_core/ratecheck.pyx "What the exchange is told",
fastgate/middleware/rate_limit.py, fastgate/auth/common.py):
- The rate_limit C check writes the route's decision into the exchange record (allowed /
  limited) and, for a refusal, the audit facts: event rate_limited, source the middleware's
  name, reason "limit <i> exceeded" / "too many in flight".
- The Python path notes the same through conn.note_rate / note_deny; an admission by the outage
  policy while Redis is unavailable is "fallback", a fail_closed refusal is
  "rate limit store unavailable"; a dry-run refusal is an admission.
- An auth refusal reaches the audit line through AuthCommon (event by status).
- `resolved_client_ip(conn)`: the X-Forwarded-For walk of the key's client_ip part, as text.

Exchanges run through a real ConnCore (conn_harness) with an AccessLog whose streams are read
back: the access line's `rate_limit`, the audit line's `event`/`source`/`reason`, and the
per-route K_RATE counters of the worker's shard.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from conn_harness import FakeTransport, running_engine
from fastgate._core.conn import (
    DownstreamProtocol,
    Engine,
    EntryConfig,
    EntryPoint,
    Route,
    ServerPool,
    Service,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core.accesslog import (
    DENY_AUTH_FAILED,
    DENY_AUTH_UNAVAILABLE,
    DENY_FORBIDDEN,
    AccessLog,
    LogStream,
)
from fastgate._core.httphead import Limits, RequestHead, parse_request, parse_response
from fastgate._core.ratecheck import (
    BUSY_REASON,
    LIMIT_REASONS,
    UNAVAILABLE_REASON,
    client_ip_for,
    resolved_client_ip,
)
from fastgate._core.router import Router, RouteSpec
from fastgate._core.stats import OFFSETS
from fastgate.auth import common
from fastgate.config.schema import parse_config
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.registry import build
from fastgate.redis import RedisUnavailable
from fastgate.server.dispatch import dispatch

K_RATE = 3
XFF_NETS = ("10.0.0.0/8", "2001:db8:ffff::/48")


def head(*headers: str) -> RequestHead:
    raw = ("\r\n".join(["GET / HTTP/1.1", "Host: example.test", *headers]) + "\r\n\r\n").encode()
    h, n = parse_request(raw)
    assert h is not None and n == len(raw)
    return h


# ---- resolved_client_ip: the X-Forwarded-For walk, as text --------------------------------
# The cases of test_ratecheck.py's key tests of the walk; the text is the whole address (an
# IPv6 client is not grouped by ipv6_prefix here).


@pytest.mark.parametrize(
    ("headers", "trusted", "expected"),
    [
        pytest.param(["X-Forwarded-For: 198.51.100.1"], False, b"10.1.1.1", id="untrusted peer"),
        pytest.param(["X-Forwarded-For: 198.51.100.1"], True, b"198.51.100.1", id="trusted"),
        pytest.param(
            ["X-Forwarded-For: 6.6.6.6, 198.51.100.1, 10.2.2.2"],
            True,
            b"198.51.100.1",
            id="trusted hops skipped from the right, forged left part ignored",
        ),
        pytest.param(
            ["X-Forwarded-For: 6.6.6.6", "X-Forwarded-For: 198.51.100.1 , 10.2.2.2"],
            True,
            b"198.51.100.1",
            id="several field lines are one list",
        ),
        pytest.param(
            ["X-Forwarded-For: 10.3.3.3, 10.2.2.2"], True, b"10.3.3.3", id="all trusted: leftmost"
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1:4711"], True, b"198.51.100.1", id="ipv4 with port"
        ),
        pytest.param(
            ["X-Forwarded-For: [2001:db8:1:2::9]:443"],
            True,
            b"2001:db8:1:2::9",
            id="bracketed ipv6 with port, whole address",
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1,,  "], True, b"198.51.100.1", id="empty elements"
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1, 2001:db8:ffff:1::1"],
            True,
            b"198.51.100.1",
            id="trusted ipv6 hop skipped",
        ),
        pytest.param([], True, b"10.1.1.1", id="trusted peer without the header: the peer"),
        pytest.param(
            ["x-forwarded-for: 192.0.2.5"], True, b"192.0.2.5", id="name is case-insensitive"
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1, not-an-ip, 10.2.2.2"],
            True,
            b"not-an-ip",
            id="garbage stops the walk, kept as text",
        ),
        pytest.param(
            ["X-Forwarded-For: ::ffff:198.51.100.9"], True, b"198.51.100.9", id="v4-mapped as v4"
        ),
        pytest.param(
            ["X-Forwarded-For: 2001:0DB8:0000:0000:0000:0000:0000:0001"],
            True,
            b"2001:db8::1",
            id="ipv6 written compressed, lowercase",
        ),
    ],
)
def test_client_ip_walk(headers: list[str], trusted: bool, expected: bytes) -> None:
    got = client_ip_for(b"10.1.1.1", trusted, XFF_NETS, head(*headers))
    assert type(got) is bytes and got == expected


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        pytest.param(b"203.0.113.7", b"203.0.113.7", id="ipv4"),
        pytest.param(b"0.0.0.0", b"0.0.0.0", id="ipv4 zeros"),
        pytest.param(b"255.255.255.255", b"255.255.255.255", id="ipv4 all ones"),
        pytest.param(b"::ffff:198.51.100.9", b"198.51.100.9", id="v4-mapped peer"),
        pytest.param(b"fe80::1%eth0", b"fe80::1", id="zone index dropped"),
        pytest.param(b"unknown", b"unknown", id="not an address: its text"),
        pytest.param(b"::", b"::", id="unspecified"),
        pytest.param(b"::1", b"::1", id="loopback"),
        pytest.param(b"1::", b"1::", id="trailing run"),
        pytest.param(b"1:0:1:0:1:0:1:0", b"1:0:1:0:1:0:1:0", id="single zero groups kept"),
        pytest.param(b"1:0:0:1:0:0:1:1", b"1::1:0:0:1:1", id="tie: the first run"),
        pytest.param(b"1:0:0:1:0:0:0:1", b"1:0:0:1::1", id="the longest run"),
        pytest.param(b"2001:db8:a:b:c:d:e:ffff", b"2001:db8:a:b:c:d:e:ffff", id="no zeros"),
        pytest.param(b"::102:304", b"::102:304", id="no embedded ipv4 form"),
    ],
)
def test_client_ip_of_the_peer(peer: bytes, expected: bytes) -> None:
    assert client_ip_for(peer, False, ()) == expected
    assert client_ip_for(peer, True, XFF_NETS, head()) == expected  # no header: the peer


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_client_ip_text_is_what_ipaddress_writes(packed: bytes) -> None:
    ip = ipaddress.IPv6Address(packed)
    want = str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else ip.compressed
    assert client_ip_for(ip.exploded.encode(), False, ()) == want.encode()
    behind = head(f"X-Forwarded-For: [{ip}]:1")
    assert client_ip_for(b"10.0.0.1", True, ("10.0.0.0/8",), behind) == want.encode()


# ---- real connections -----------------------------------------------------------------------


@pytest.fixture
def engine() -> Iterator[Engine]:
    yield from running_engine()


class Final:
    """The last middleware of a chain: answers 200 itself (no upstream needed)."""

    type = "final"

    def on_request(self, ctx: RequestContext) -> LocalReply:
        return LocalReply(200, b"ok", (), "text/plain")


class Gate:
    """A connection harness: one route, the engine's AccessLog with access and audit streams
    (a Gate made later takes the engine's log over)."""

    def __init__(
        self,
        engine: Engine,
        *,
        checks: tuple = (),
        chain: tuple = (),
        trusted_nets: tuple = (),
        peer: str = "192.0.2.7",
    ) -> None:
        self.engine = engine
        self.access, self.audit = LogStream(), LogStream()
        engine.alog = AccessLog(access=self.access, audit=self.audit)
        engine.dispatch = dispatch
        engine.client_resolver = resolved_client_ip
        pool = ServerPool(engine, "http://127.0.0.1:9", "127.0.0.1", 9)
        self.route = Route("r", Service("s", [pool]), chain=chain, checks=checks)
        self.route.stats_rate = engine.shard.register_rate("r")
        nets = tuple(ipaddress.ip_network(n) for n in trusted_nets)
        cfg = EntryConfig(Router([RouteSpec(self.route, "/")]), Limits(), trusted_nets=nets)
        self.conn = DownstreamProtocol(engine, EntryPoint("web", cfg))
        self.transport = FakeTransport((peer, 5555))
        self.conn.connection_made(self.transport)

    def send(self, *headers: str) -> int:
        """One request, answered at once (by a check or the chain): its response status."""
        before = len(self.transport.written)
        raw = "\r\n".join(["GET /x HTTP/1.1", "Host: a.test", *headers]) + "\r\n\r\n"
        self.conn.data_received(raw.encode())
        resp, _ = parse_response(b"".join(self.transport.written[before:]))
        assert resp is not None
        return resp.status

    async def asend(self, *headers: str) -> int:
        """One request on the running loop, its response awaited (bounded): its status."""
        before = len(self.transport.written)
        raw = "\r\n".join(["GET /x HTTP/1.1", "Host: a.test", *headers]) + "\r\n\r\n"
        self.conn.data_received(raw.encode())
        for _ in range(200):
            if len(self.transport.written) > before:
                break
            await asyncio.sleep(0.01)
        resp, _ = parse_response(b"".join(self.transport.written[before:]))
        assert resp is not None
        return resp.status

    def lines(self, stream: LogStream) -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.take().splitlines()]

    def rate_counts(self) -> tuple[int, int, int]:
        """(allowed, limited, fallback) counted on the route's K_RATE row."""
        row = dict(self.engine.shard.table(K_RATE))[("r",)]
        return row[OFFSETS["allowed"]], row[OFFSETS["limited"]], row[OFFSETS["fallback"]]

    def close(self) -> None:
        self.conn.connection_lost(None)


def rate_limit(name: str, options: dict[str, Any], route: str = "r") -> Any:
    mw = build(name, "rate_limit", options)
    config = parse_config({"entrypoints": {"w": {}}})
    mw.bind(SimpleNamespace(config=config, routes_using=lambda _: [route]))
    return mw


@pytest.mark.parametrize(
    ("options", "statuses", "reason"),
    [
        pytest.param({"rate": "2/hour"}, [200, 200, 429], LIMIT_REASONS[0], id="limit 0"),
        pytest.param(
            {"limits": [{"rate": "5/hour"}, {"rate": "1/hour"}]},
            [200, 429],
            LIMIT_REASONS[1],
            id="limit 1 names its index",
        ),
    ],
)
def test_c_check_tells_the_exchange(
    engine: Engine, options: dict[str, Any], statuses: list[int], reason: str
) -> None:
    mw = rate_limit("rl", options)
    check = mw.core_check("r")
    assert check is not None and check.name == "rl"
    gate = Gate(engine, checks=(check,), chain=(Final(),))
    assert [gate.send() for _ in statuses] == statuses
    access = gate.lines(gate.access)
    want = ["allowed" if s == 200 else "limited" for s in statuses]
    assert [a["rate_limit"] for a in access] == want
    (audit,) = gate.lines(gate.audit)
    assert (audit["event"], audit["source"], audit["reason"]) == ("rate_limited", "rl", reason)
    assert audit["status"] == 429 and audit["route"] == "r"
    assert gate.rate_counts() == (want.count("allowed"), want.count("limited"), 0)
    gate.close()


def test_c_check_in_flight_refusal(engine: Engine) -> None:
    check = rate_limit("busy", {"in_flight": 1}).core_check("r")
    assert check is not None
    holder = Gate(engine, checks=(check,), chain=(Final(),))
    gate = Gate(engine, checks=(check,), chain=(Final(),))  # the engine logs to gate's streams
    # The first request takes the key's one slot and waits in its chain (a pending future).
    engine.dispatch = lambda conn, h: engine.loop.create_future()
    holder.conn.data_received(b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n")
    engine.dispatch = dispatch
    assert gate.send() == 429
    (access,) = gate.lines(gate.access)
    assert access["rate_limit"] == "limited" and access["status"] == 429
    (audit,) = gate.lines(gate.audit)
    assert (audit["event"], audit["source"], audit["reason"]) == (
        "rate_limited",
        "busy",
        BUSY_REASON,
    )
    holder.close()
    gate.close()


def test_python_path_tells_the_exchange(engine: Engine) -> None:
    # A key with the identity is decided in Python (no C check for it).
    mw = rate_limit("who", {"rate": "1/hour", "key": "identity.subject"})
    assert mw.core_check("r") is None
    gate = Gate(engine, chain=(mw, Final()))
    assert [gate.send(), gate.send()] == [200, 429]
    assert [a["rate_limit"] for a in gate.lines(gate.access)] == ["allowed", "limited"]
    (audit,) = gate.lines(gate.audit)
    assert (audit["event"], audit["source"], audit["reason"]) == (
        "rate_limited",
        "who",
        LIMIT_REASONS[0],
    )
    assert gate.rate_counts() == (1, 1, 0)
    gate.close()


def test_python_path_dry_run_refusal_is_an_admission(engine: Engine) -> None:
    mw = rate_limit(
        "dry", {"limits": [{"rate": "1/hour", "dry_run": True}], "key": "identity.subject"}
    )
    gate = Gate(engine, chain=(mw, Final()))
    assert [gate.send(), gate.send()] == [200, 200]
    assert [a["rate_limit"] for a in gate.lines(gate.access)] == ["allowed", "allowed"]
    assert gate.lines(gate.audit) == []
    gate.close()


@pytest.mark.parametrize(
    ("policy", "statuses", "outcomes"),
    [
        pytest.param(
            "fail_open", [200, 429], ["fallback", "limited"], id="fail_open: the local share"
        ),
        pytest.param("fail_closed", [503], ["limited"], id="fail_closed: refused"),
    ],
)
@pytest.mark.parametrize(
    ("store", "known_down"),
    [
        pytest.param("redis", True, id="redis, known down: decided at once"),
        pytest.param("redis", False, id="redis, fails during the request: awaited"),
        pytest.param("hybrid", True, id="hybrid: the C check's fallback"),
    ],
)
def test_redis_unavailable_is_the_outage_policy(
    engine: Engine,
    store: str,
    known_down: bool,
    policy: str,
    statuses: list[int],
    outcomes: list[str],
) -> None:
    # Nothing listens on port 1: every decision is the outage policy's. Known down: a first
    # connection attempt has failed, so the store decides at once (the hybrid store's C check
    # hands the decision to its Python fallback); else the first request's Redis call fails.
    name = f"rl_{store}_{policy}_{known_down}"
    options = {
        "rate": "1/hour",
        "store": store,
        "redis": name,
        "on_redis_error": policy,
        "expected_instances": 1,
    }
    config = parse_config(
        {"entrypoints": {"w": {}}, "providers": {"redis": {name: {"address": "127.0.0.1:1"}}}}
    )

    async def scenario() -> tuple[Gate, list[int]]:
        mw = build(name, "rate_limit", options)
        mw.bind(SimpleNamespace(config=config, routes_using=lambda _: ["r"]))
        client = mw.store.client
        try:
            if known_down:
                with pytest.raises(RedisUnavailable):
                    await client.connect()
                assert not client.available
            check = mw.core_check("r")
            assert (check is not None) == (store == "hybrid")
            if check is not None:
                gate = Gate(engine, checks=(check,), chain=(Final(),))
            else:
                gate = Gate(engine, chain=(mw, Final()))
            return gate, [await gate.asend() for _ in statuses]
        finally:
            mw.close()
            await client.close()

    gate, got = engine.loop.run_until_complete(scenario())
    assert got == statuses
    assert [a["rate_limit"] for a in gate.lines(gate.access)] == outcomes
    reason = LIMIT_REASONS[0] if policy == "fail_open" else UNAVAILABLE_REASON
    (audit,) = gate.lines(gate.audit)
    assert (audit["event"], audit["source"], audit["reason"]) == ("rate_limited", name, reason)
    assert gate.rate_counts() == (0, outcomes.count("limited"), outcomes.count("fallback"))
    gate.close()


@pytest.mark.parametrize(
    ("chain", "headers", "status", "event", "source", "reason"),
    [
        pytest.param(
            ("jwt",),
            [],
            401,
            "auth_failed",
            "jwt",
            "missing credentials",
            id="auth middleware (AuthCommon): no credential",
        ),
        pytest.param(
            ("jwt",),
            ["Authorization: Bearer not.a.jwt"],
            401,
            "auth_failed",
            "jwt",
            None,
            id="auth middleware: a bad token (reason without the token)",
        ),
        pytest.param(
            ("jwt_optional", "authz"),
            [],
            401,
            "auth_failed",
            "authz",
            "no identity",
            id="authorize: no identity is a 401",
        ),
    ],
)
def test_auth_refusal_reaches_the_audit_line(
    engine: Engine,
    chain: tuple[str, ...],
    headers: list[str],
    status: int,
    event: str,
    source: str,
    reason: str | None,
) -> None:
    mws = {
        "jwt": build("jwt", "jwt_auth", {"algorithms": ["HS256"], "secret": "s" * 64}),
        "jwt_optional": build(
            "jwt_optional",
            "jwt_auth",
            {"algorithms": ["HS256"], "secret": "s" * 64, "optional": True},
        ),
        "authz": build("authz", "authorize", {"require": {"scopes": ["admin"]}}),
    }
    gate = Gate(engine, chain=(*(mws[n] for n in chain), Final()))
    assert gate.send(*headers) == status
    (audit,) = gate.lines(gate.audit)
    assert (audit["event"], audit["source"], audit["status"]) == (event, source, status)
    if reason is not None:
        assert audit["reason"] == reason
    assert "not.a.jwt" not in audit["reason"]
    (access,) = gate.lines(gate.access)
    assert access["auth"] == "failed" and access["rate_limit"] is None
    gate.close()


def test_first_refusal_wins(engine: Engine) -> None:
    # A C-check refusal is the exchange's deny; a later note_deny does not replace it.
    check = rate_limit("first", {"rate": "1/hour"}).core_check("r")
    gate = Gate(engine, checks=(check,), chain=(Final(),))
    assert [gate.send(), gate.send()] == [200, 429]
    (audit,) = gate.lines(gate.audit)
    assert audit["source"] == "first"
    gate.close()


def test_deny_event_of_an_auth_refusal() -> None:
    # AuthCommon's event by status, with the accesslog (stats.pxd DenyEvent) values.
    assert [common.deny_event(s) for s in (401, 302, 403, 500, 503)] == [
        DENY_AUTH_FAILED,
        DENY_AUTH_FAILED,
        DENY_FORBIDDEN,
        DENY_AUTH_UNAVAILABLE,
        DENY_AUTH_UNAVAILABLE,
    ]
    assert (DENY_AUTH_FAILED, DENY_FORBIDDEN, DENY_AUTH_UNAVAILABLE) == (1, 2, 5)


def test_client_ip_on_a_connection_behind_a_trusted_proxy(engine: Engine) -> None:
    seen: list[bytes] = []

    def record(conn: Any, h: Any) -> LocalReply:
        seen.append(resolved_client_ip(conn))
        return LocalReply(200, b"", (), "text/plain")

    gate = Gate(engine, chain=("x",), trusted_nets=XFF_NETS, peer="10.1.1.1")
    engine.dispatch = record
    assert gate.send("X-Forwarded-For: 6.6.6.6, [2001:db8:1:2::9]:1, 10.2.2.2") == 200
    assert seen == [b"2001:db8:1:2::9"]
    assert gate.lines(gate.access)[0]["client_ip"] == "2001:db8:1:2::9"
    gate.close()
    untrusted = Gate(engine, chain=("x",), peer="10.1.1.1")
    engine.dispatch = record
    assert untrusted.send("X-Forwarded-For: 6.6.6.6") == 200
    assert seen[-1] == b"10.1.1.1"
    untrusted.close()
