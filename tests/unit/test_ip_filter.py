"""ip_filter: allow/deny decisions on the client address, through real ConnCore exchanges
(conn_harness), in C (IpCheck, the route's leading check) and in Python (on_request, the
middleware later in a chain); the refusal read back from the audit stream."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
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

from fastgate._core.accesslog import AccessLog, LogStream
from fastgate._core.httphead import Limits
from fastgate._core.ipfilter import IpCheck
from fastgate._core.ratecheck import resolved_client_ip
from fastgate._core.router import Router, RouteSpec
from fastgate.errors import ConfigError
from fastgate.middleware.base import RequestContext
from fastgate.middleware.ip_filter import IpFilter

DENIED = "client address denied"
NOT_ALLOWED = "client address not allowed"


@pytest.fixture
def engine() -> Iterator[Engine]:
    for eng in running_engine():
        # An admitted request connects upstream (asyncio.ensure_future): the engine's loop
        # must be the current one, whatever an earlier test left set.
        asyncio.set_event_loop(eng.loop)
        try:
            yield eng
        finally:
            asyncio.set_event_loop(None)


def exchange(
    engine: Engine,
    mw: IpFilter,
    in_c: bool,
    peer: str,
    xff: str | None = None,
    trusted: tuple[str, ...] = (),
) -> tuple[bytes, list[dict[str, Any]]]:
    """One request from `peer` on a route guarded by `mw` (as its C check, or in the Python
    chain); returns (what the client got, the audit lines)."""
    access, audit = LogStream(), LogStream()
    engine.alog = AccessLog(access=access, audit=audit, spans=LogStream())
    engine.client_resolver = resolved_client_ip
    engine.dispatch = lambda conn, head: mw.on_request(RequestContext(conn=conn, head=head))
    pool = ServerPool(engine, "http://127.0.0.1:9", "127.0.0.1", 9)
    service = Service("backend", [pool])
    if in_c:
        check = mw.core_check("api")
        assert isinstance(check, IpCheck)
        route = Route("api", service, checks=(check,))
    else:
        route = Route("api", service, chain=("mw",))
    nets = [ipaddress.ip_network(t) for t in trusted]
    cfg = EntryConfig(Router([RouteSpec(route, "/api")]), Limits(), trusted_nets=nets)
    conn = DownstreamProtocol(engine, EntryPoint("web", cfg))
    transport = FakeTransport((peer, 5555))
    conn.connection_made(transport)
    extra = b"X-Forwarded-For: " + xff.encode() + b"\r\n" if xff is not None else b""
    conn.data_received(b"GET /api/x HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n")
    conn.connection_lost(None)
    events = [json.loads(line) for line in audit.take().splitlines()]
    return b"".join(transport.written), events


DECISIONS = [
    pytest.param({"allow": ["192.0.2.7"]}, "192.0.2.7", None, id="v4-allow-exact-32"),
    pytest.param({"allow": ["192.0.2.7/32"]}, "192.0.2.8", NOT_ALLOWED, id="v4-outside-32"),
    pytest.param({"allow": ["10.0.0.0/8"]}, "10.200.1.1", None, id="v4-allow-cidr"),
    pytest.param({"deny": ["10.0.0.0/8"]}, "10.200.1.1", DENIED, id="v4-deny-cidr"),
    pytest.param({"deny": ["10.0.0.0/8"]}, "11.0.0.1", None, id="v4-deny-other-passes"),
    pytest.param({"allow": ["0.0.0.0/0"]}, "203.0.113.1", None, id="v4-allow-slash0"),
    pytest.param({"deny": ["0.0.0.0/0"]}, "203.0.113.1", DENIED, id="v4-deny-slash0"),
    pytest.param({"deny": ["::/0"]}, "203.0.113.1", None, id="v6-slash0-not-v4"),
    pytest.param({"allow": ["::/0"]}, "203.0.113.1", NOT_ALLOWED, id="v4-not-in-v6-allow"),
    pytest.param({"allow": ["2001:db8::/32"]}, "2001:db8:1::5", None, id="v6-allow"),
    pytest.param({"allow": ["2001:db8::/32"]}, "2001:db9::5", NOT_ALLOWED, id="v6-outside"),
    pytest.param({"deny": ["2001:db8::1/128"]}, "2001:db8::1", DENIED, id="v6-deny-128"),
    pytest.param({"deny": ["2001:db8::1"]}, "2001:db8::2", None, id="v6-deny-other-passes"),
    pytest.param({"deny": ["10.0.0.0/8"]}, "::ffff:10.1.2.3", DENIED, id="v4-mapped-peer-is-v4"),
    pytest.param({"allow": ["::ffff:10.0.0.0/104"]}, "10.1.2.3", None, id="v4-mapped-net-is-v4"),
    pytest.param(
        {"allow": ["10.0.0.0/8"], "deny": ["10.9.0.0/16"]}, "10.9.1.1", DENIED, id="deny-wins"
    ),
    pytest.param(
        {"allow": ["10.0.0.0/8"], "deny": ["10.9.0.0/16"]}, "10.8.1.1", None, id="allow-and-deny"
    ),
    pytest.param({"allow": [], "deny": ["10.0.0.0/8"]}, "1.1.1.1", None, id="allow-empty"),
    pytest.param({"allow": ["10.0.0.0/8"]}, "unix-socket", NOT_ALLOWED, id="no-address-allow"),
    pytest.param({"deny": ["10.0.0.0/8"]}, "unix-socket", None, id="no-address-deny-only"),
]


@pytest.mark.parametrize("in_c", [True, False], ids=["c", "python"])
@pytest.mark.parametrize(("options", "peer", "reason"), DECISIONS)
def test_decision(
    engine: Engine, in_c: bool, options: dict[str, Any], peer: str, reason: str | None
) -> None:
    mw = IpFilter(options, "guard")
    reply, events = exchange(engine, mw, in_c, peer)
    if reason is None:
        assert events == []
        assert not reply.startswith(b"HTTP/1.1 403")
        return
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b'"error": "forbidden"' in reply and peer.encode() not in reply
    (event,) = events
    assert (event["event"], event["source"], event["reason"]) == ("ip_denied", "guard", reason)
    assert event["status"] == 403 and event["route"] == "api"
    counts = mw.stats()
    assert counts["denied" if reason == DENIED else "not_allowed"] == 1


FORWARDED = [
    pytest.param("203.0.113.9", ("127.0.0.1/32",), DENIED, id="trusted-proxy-xff-denied"),
    pytest.param("198.51.100.1", ("127.0.0.1/32",), None, id="trusted-proxy-xff-passes"),
    pytest.param(
        "203.0.113.9, 10.0.0.2", ("127.0.0.1/32", "10.0.0.0/8"), DENIED, id="walks-trusted-hops"
    ),
    pytest.param("198.51.100.1, 203.0.113.9", ("127.0.0.1/32",), DENIED, id="rightmost-untrusted"),
    pytest.param("203.0.113.9", (), None, id="untrusted-peer-xff-ignored"),
]


@pytest.mark.parametrize("in_c", [True, False], ids=["c", "python"])
@pytest.mark.parametrize(("xff", "trusted", "reason"), FORWARDED)
def test_behind_a_trusted_proxy(
    engine: Engine, in_c: bool, xff: str, trusted: tuple[str, ...], reason: str | None
) -> None:
    mw = IpFilter({"deny": ["203.0.113.0/24"]}, "edge")
    reply, events = exchange(engine, mw, in_c, "127.0.0.1", xff=xff, trusted=trusted)
    if reason is None:
        assert events == [] and not reply.startswith(b"HTTP/1.1 403")
        return
    (event,) = events
    assert (event["event"], event["source"], event["reason"]) == ("ip_denied", "edge", reason)
    assert event["client_ip"] == "203.0.113.9"


@pytest.mark.parametrize("in_c", [True, False], ids=["c", "python"])
def test_status_404_hides_the_route(engine: Engine, in_c: bool) -> None:
    mw = IpFilter({"allow": ["10.0.0.0/8"], "status": 404}, "hide")
    reply, events = exchange(engine, mw, in_c, "192.0.2.1")
    assert reply.startswith(b"HTTP/1.1 404 ") and b'"error": "no route"' in reply
    assert [e["event"] for e in events] == ["ip_denied"]


INVALID = [
    pytest.param({}, "allow", id="both-empty"),
    pytest.param({"allow": [], "deny": []}, "allow", id="both-empty-lists"),
    pytest.param({"allow": ["10.0.0.1", "10.0.0.0/8", "nope"]}, "allow[2]", id="bad-entry"),
    pytest.param({"deny": ["10.0.0.1/8"]}, "deny[0]", id="host-bits-set"),
    pytest.param({"deny": ["10.0.0.0/33"]}, "deny[0]", id="prefix-too-long"),
    pytest.param({"allow": [7]}, "allow[0]", id="not-a-string"),
    pytest.param({"allow": "10.0.0.0/8"}, "allow", id="not-a-list"),
    pytest.param({"deny": ["10.0.0.0/8"], "status": 401}, "status", id="bad-status"),
    pytest.param({"deny": ["10.0.0.0/8"], "alow": []}, "alow", id="unknown-key"),
]


@pytest.mark.parametrize(("options", "path"), INVALID)
def test_invalid_options_name_the_key(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        IpFilter(options, "bad")
    assert path in [p for p, _ in info.value.errors]
