"""The exchange-end hook (ConnCore.end_exchange -> log_exchange) feeds the C log streams: a
real ConnCore on a fake transport, an AccessLog with real LogStreams, lines read back."""

from __future__ import annotations

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

from fastgate._core.accesslog import (
    DENY_AUTH_FAILED,
    DENY_FORBIDDEN,
    RATE_ALLOWED,
    RATE_LIMITED,
    AccessLog,
    LogStream,
)
from fastgate._core.httphead import Limits
from fastgate._core.router import Router, RouteSpec
from fastgate.middleware.base import Identity, LocalReply

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"


@pytest.fixture
def engine() -> Iterator[Engine]:
    yield from running_engine()


def streams(engine: Engine, **options: Any) -> tuple[LogStream, LogStream, LogStream]:
    access, audit, spans = LogStream(), LogStream(), LogStream()
    engine.alog = AccessLog(access=access, audit=audit, spans=spans, **options)
    return access, audit, spans


def lines(stream: LogStream) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.take().splitlines()]


def serve(
    engine: Engine,
    raw: bytes,
    dispatch: Any = None,
    peer: str = "192.0.2.7",
    route_options: dict[str, Any] | None = None,
) -> list[bytes]:
    """One client connection: send `raw`, return what the client got, close."""
    if dispatch is not None:
        engine.dispatch = dispatch
    pool = ServerPool(engine, "http://127.0.0.1:9", "127.0.0.1", 9)
    route = Route("api", Service("backend", [pool]), chain=("mw",) if dispatch else ())
    for key, value in (route_options or {}).items():
        setattr(route, key, value)
    cfg = EntryConfig(Router([RouteSpec(route, "/api")]), Limits())
    conn = DownstreamProtocol(engine, EntryPoint("web", cfg))
    transport = FakeTransport((peer, 5555))
    conn.connection_made(transport)
    conn.data_received(raw)
    conn.connection_lost(None)
    return transport.written


def refuse_with(status: int, event: int, identity: Identity | None = None) -> Any:
    def dispatch(conn: Any, head: Any) -> LocalReply:
        conn.note_rate(RATE_ALLOWED)
        if identity is not None:
            conn.identity = identity
        conn.note_deny(event, "guard", "bad credential")
        return LocalReply.error(status, "refused")

    return dispatch


def test_a_refused_request_gives_one_access_and_one_audit_line(engine: Engine) -> None:
    access, audit, spans = streams(engine)
    who = Identity(method="jwt", subject="alice", consumer="acme")
    raw = (b"GET /api/x?token=SEKRET&a=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: t/1\r\n"
           b"X-Request-ID: rid-1\r\ntraceparent: 00-" + TID.encode() + b"-" + PID.encode()
           + b"-01\r\n\r\n")  # fmt: skip
    serve(engine, raw, refuse_with(403, DENY_FORBIDDEN, who))
    (line,) = lines(access)
    assert line["type"] == "access" and line["status"] == 403
    assert line["request_id"] == "rid-1" and line["trace_id"] == TID
    assert line["client_ip"] == "192.0.2.7" and line["user_agent"] == "t/1"
    assert (line["entrypoint"], line["route"], line["service"]) == ("web", "api", "backend")
    assert line["server"] is None and line["upstream_ms"] is None  # never forwarded
    assert line["identity"] == {"method": "jwt", "subject": "alice", "consumer": "acme"}
    assert (line["rate_limit"], line["auth"]) == ("allowed", "forbidden")
    assert line["method"] == "GET" and line["protocol"] == "HTTP/1.1"
    (event,) = lines(audit)
    assert (event["event"], event["source"], event["reason"]) == (
        "forbidden",
        "guard",
        "bad credential",
    )
    assert event["identity"]["subject"] == "alice" and event["status"] == 403
    (span,) = lines(spans)  # the caller's trace was sampled (flags 01)
    assert span["traceId"] == TID and span["parentSpanId"] == PID
    assert span["spanId"] == line["span_id"]


def test_no_secret_from_the_query_reaches_any_stream(engine: Engine) -> None:
    access, audit, spans = streams(engine, redact=["token"])
    serve(
        engine,
        b"GET /api/x?token=SEKRET HTTP/1.1\r\nHost: h\r\n\r\n",
        refuse_with(401, DENY_AUTH_FAILED),
    )
    text = access.take() + audit.take() + spans.take()
    assert b"SEKRET" not in text and b"token=REDACTED" in text


@pytest.mark.parametrize(
    ("raw", "status", "route"),
    [
        pytest.param(b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n", 404, None, id="no route"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n", 400, None, id="ambiguous framing"),
    ],
)  # fmt: skip
def test_gateway_errors_are_logged(
    engine: Engine, raw: bytes, status: int, route: str | None
) -> None:
    access, audit, _ = streams(engine)
    serve(engine, raw)
    (line,) = lines(access)
    assert line["status"] == status and line["route"] == route
    assert line["identity"] is None and line["auth"] is None and line["rate_limit"] is None
    assert audit.take() == b""  # an error is not a policy refusal


def test_the_identity_a_credential_cache_hit_gives_is_logged(engine: Engine) -> None:
    access, _, _ = streams(engine)
    who = Identity(method="api_key", subject="k1", consumer=None)

    def dispatch(conn: Any, head: Any) -> LocalReply:
        conn.identity = who
        return LocalReply.error(429, "slow down")

    serve(engine, b"GET /api HTTP/1.1\r\nHost: h\r\n\r\n", dispatch)
    (line,) = lines(access)
    assert line["identity"] == {"method": "api_key", "subject": "k1", "consumer": None}
    assert line["auth"] == "ok"


def test_a_route_with_its_log_off_writes_only_audit_lines(engine: Engine) -> None:
    access, audit, _ = streams(engine)
    off = {"log_sample": 0, "log_errors": False}
    serve(
        engine,
        b"GET /api HTTP/1.1\r\nHost: h\r\n\r\n",
        refuse_with(401, DENY_AUTH_FAILED),
        route_options=off,
    )
    assert access.take() == b""
    assert [e["event"] for e in lines(audit)] == ["auth_failed"]


def test_rate_outcome_keeps_the_worst_and_counts_per_route(engine: Engine) -> None:
    access, _, _ = streams(engine)
    row = engine.shard.register_rate("api")

    def dispatch(conn: Any, head: Any) -> LocalReply:
        conn.note_rate(RATE_LIMITED)
        conn.note_rate(RATE_ALLOWED)  # a later, milder decision does not hide the refusal
        return LocalReply.error(429, "slow down")

    serve(
        engine, b"GET /api HTTP/1.1\r\nHost: h\r\n\r\n", dispatch, route_options={"stats_rate": row}
    )
    assert lines(access)[0]["rate_limit"] == "limited"
    table = dict(engine.shard.table(3))
    assert table[("api",)][:3] == (0, 1, 0)  # allowed, limited, fallback


def test_a_pipelined_second_request_does_not_inherit_the_first_ones_identity(
    engine: Engine,
) -> None:
    access, _, _ = streams(engine)
    who = Identity(method="jwt", subject="alice")
    calls: list[int] = []

    def dispatch(conn: Any, head: Any) -> LocalReply:
        calls.append(1)
        if len(calls) == 1:
            conn.identity = who
            conn.note_deny(DENY_FORBIDDEN, "guard", "scope")
        return LocalReply.error(403 if len(calls) == 1 else 404, "x")

    req = b"GET /api HTTP/1.1\r\nHost: h\r\n\r\n"
    serve(engine, req + req, dispatch)
    first, second = lines(access)
    assert first["identity"]["subject"] == "alice" and first["auth"] == "forbidden"
    assert second["identity"] is None and second["auth"] is None
