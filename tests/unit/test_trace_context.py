"""W3C trace context and request ids in the writers (writer.pyx, docs/observability.md).

Rules under test: a valid traceparent (Trace Context Level 1) is continued with its trace id
and flags and a new parent id (the gateway's span); anything else starts a new trace; exactly
one traceparent goes upstream; tracestate only with a continued trace, valid, joined into one
line; every response to the client carries our X-Request-ID and traceresponse (one of each).
"""

from __future__ import annotations

import ipaddress
import os
import re
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
from pydantic import ValidationError

from fastgate._core.httphead import HF_TRACE, Limits, parse_request, parse_response
from fastgate._core.router import Router, RouteSpec
from fastgate._core.writer import (
    ForwardInfo,
    Trace,
    _build_error_reply,
    _build_request_head,
    _build_response_head,
    _parse_traceparent,
    _trace_seed,
)
from fastgate.config.schema import Forwarded
from fastgate.middleware.base import LocalReply

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
VALID = f"00-{TID}-{PID}-01"
HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
FI = ForwardInfo(b"192.0.2.7")


def request(*lines: str) -> bytes:
    return ("GET / HTTP/1.1\r\nHost: x\r\n" + "".join(f"{line}\r\n" for line in lines)).encode(
        "latin-1"
    ) + b"\r\n"


def head_of(*lines: str):
    head, _ = parse_request(request(*lines))
    assert head is not None
    return head


def upstream_lines(*lines: str, keep: bool = True, sampled: bool = False) -> tuple[list, Trace]:
    head = head_of(*lines)
    trace = Trace.begin(head, keep, sampled)
    out = _build_request_head(head, FI, b"rid-1", trace=trace)
    return out[:-4].decode("latin-1").split("\r\n"), trace


def values(lines: list[str], name: str) -> list[str]:
    prefix = name.lower() + ":"
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith(prefix)]


# ---- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(VALID, (TID, PID, "01"), id="version 00, sampled"),
        pytest.param(f"00-{TID}-{PID}-00", (TID, PID, "00"), id="version 00, not sampled"),
        pytest.param(f"00-{TID}-{PID}-ff", (TID, PID, "ff"), id="version 00 keeps every flag"),
        pytest.param(f"01-{TID}-{PID}-01", (TID, PID, "01"), id="future version, 00 fields"),
        pytest.param(
            f"cc-{TID}-{PID}-01-what-the-future-holds",
            (TID, PID, "01"),
            id="future version with extra fields after '-'",
        ),
        pytest.param(f"fe-{TID}-{PID}-03", (TID, PID, "01"), id="future version: sampled bit only"),
        pytest.param(f"01-{TID}-{PID}-02", (TID, PID, "00"), id="future: other bits dropped"),
        pytest.param(f"00-{TID}-{PID}-0", None, id="too short"),
        pytest.param("", None, id="empty"),
        pytest.param(f"00-{TID}-{PID}-01-", None, id="version 00 with a trailing '-'"),
        pytest.param(f"00-{TID}-{PID}-01-extra", None, id="version 00 with extra fields"),
        pytest.param(f"00-{TID}-{PID}-011", None, id="version 00 too long"),
        pytest.param(f"01-{TID}-{PID}-01x", None, id="future version: extra without '-'"),
        pytest.param(f"ff-{TID}-{PID}-01", None, id="version ff"),
        pytest.param(f"0g-{TID}-{PID}-01", None, id="version not hex"),
        pytest.param(f"0A-{TID}-{PID}-01", None, id="version uppercase"),
        pytest.param(f"00-{TID.upper()}-{PID}-01", None, id="trace id uppercase"),
        pytest.param(f"00-{TID}-{PID.upper()}-01", None, id="parent id uppercase"),
        pytest.param(f"00-{TID}-{PID}-0A", None, id="flags uppercase"),
        pytest.param(f"00-{'0' * 32}-{PID}-01", None, id="all-zero trace id"),
        pytest.param(f"00-{TID}-{'0' * 16}-01", None, id="all-zero parent id"),
        pytest.param(f"00-{TID[:-1]}-{PID}0-01", None, id="trace id 31, parent id 17"),
        pytest.param(f"00-{TID}0-{PID[:-1]}-01", None, id="trace id 33, parent id 15"),
        pytest.param(f"00_{TID}-{PID}-01", None, id="wrong separator"),
        pytest.param(f"00-{TID}-{PID}--1", None, id="flags not hex"),
        pytest.param(f" 00-{TID}-{PID}-01", None, id="leading whitespace in the value"),
        pytest.param(f"00- {TID[1:]}-{PID}-01", None, id="whitespace inside"),
        pytest.param(f"00-{TID}-{PID}-01 ", None, id="trailing whitespace (not trimmed here)"),
        pytest.param(f"00-{TID[:16]}z{TID[17:]}-{PID}-01", None, id="non-hex in the trace id"),
    ],
)  # fmt: skip
def test_parse_traceparent(value: str, expected: tuple[str, str, str] | None) -> None:
    assert _parse_traceparent(value.encode("latin-1")) == expected


def test_header_flag_marks_the_trace_headers() -> None:
    head = head_of(f"TraceParent: {VALID}", "tracestate: a=1", "traceresponse: x", "trace: no")
    flags = head.header_flags()
    assert [bool(f & HF_TRACE) for f in flags] == [False, True, True, True, False]


# ---- the per-request trace --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "keep", "continued"),
    [
        pytest.param([f"traceparent: {VALID}"], True, True, id="valid: continued"),
        pytest.param([f"Traceparent:   {VALID}  "], True, True, id="OWS around the value trimmed"),
        pytest.param([f"traceparent: {VALID}"], False, False, id="not trusted: new trace"),
        pytest.param([], True, False, id="absent: new trace"),
        pytest.param([f"traceparent: {VALID.upper()}"], True, False, id="invalid: new trace"),
        pytest.param(
            [f"traceparent: {VALID}", f"traceparent: {VALID}"], True, False,
            id="two traceparent lines: new trace",
        ),
    ],
)  # fmt: skip
def test_trace_begin(lines: list[str], keep: bool, continued: bool) -> None:
    trace = Trace.begin(head_of(*lines), keep)
    assert trace.continued is continued
    m = TRACEPARENT.match(trace.value.decode())
    assert m is not None, trace.value
    assert m.group(1) == trace.trace_id and m.group(2) == trace.span_id
    assert trace.span_id != "0" * 16 and trace.span_id != PID
    if continued:
        assert (trace.trace_id, trace.parent_id, trace.flags) == (TID, PID, "01")
    else:
        assert trace.trace_id != TID and trace.trace_id != "0" * 32
        assert trace.parent_id == "0" * 16 and trace.flags == "00"


def test_started_trace_is_sampled_when_configured() -> None:
    assert Trace.begin(head_of(), True, True).flags == "01"
    assert Trace.begin(head_of(), True, False).flags == "00"
    # A continued trace keeps the client's flags whatever the setting.
    assert Trace.begin(head_of(f"traceparent: 00-{TID}-{PID}-00"), True, True).flags == "00"


def test_ids_are_unique_and_come_from_the_seeded_generator() -> None:
    head = head_of()
    traces = [Trace.begin(head) for _ in range(5000)]
    assert len({t.trace_id for t in traces}) == 5000
    assert len({t.span_id for t in traces}) == 5000
    assert all(HEX32.match(t.trace_id) and HEX16.match(t.span_id) for t in traces[:100])
    _trace_seed(bytes(range(32)))
    first = Trace.begin(head).value
    _trace_seed(bytes(range(32)))
    assert Trace.begin(head).value == first  # the sequence is the seed's
    with pytest.raises(ValueError):
        _trace_seed(b"short")
    _trace_seed(os.urandom(32))


# ---- the upstream head ------------------------------------------------------------------------


def test_continued_trace_upstream() -> None:
    lines, trace = upstream_lines(f"traceparent: {VALID}", "tracestate: vendor=abc")
    assert values(lines, "traceparent") == [f"00-{TID}-{trace.span_id}-01"]
    assert trace.span_id != PID  # the parent id is the gateway's span now
    assert values(lines, "tracestate") == ["vendor=abc"]
    assert values(lines, "x-request-id") == ["rid-1"]


def test_started_trace_upstream() -> None:
    lines, trace = upstream_lines()
    assert values(lines, "traceparent") == [trace.value.decode()]
    assert TRACEPARENT.match(trace.value.decode())
    assert values(lines, "tracestate") == []


@pytest.mark.parametrize(
    ("lines", "keep", "tracestate"),
    [
        pytest.param(["tracestate: a=1"], True, [], id="no traceparent: tracestate dropped"),
        pytest.param(
            [f"traceparent: {VALID.upper()}", "tracestate: a=1"], True, [],
            id="invalid traceparent: tracestate dropped",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate: a=1"], False, [],
            id="untrusted: tracestate dropped",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate: a=1", "X-Other: y", "Tracestate: b=2"], True,
            ["a=1,b=2"], id="several lines joined into one, in order",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate:", "tracestate: b=2"], True, ["b=2"],
            id="empty line ignored",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate: " + "k=" + "v" * 510], True,
            ["k=" + "v" * 510], id="512 bytes kept",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate: " + "k=" + "v" * 511], True, [],
            id="513 bytes dropped",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate: " + "a" * 300, "tracestate: " + "b" * 212],
            True, [], id="over 512 once joined: dropped",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate: a=1\tb=2"], True, [], id="tab dropped",
        ),
        pytest.param(
            [f"traceparent: {VALID}", "tracestate: a=\xe9"], True, [], id="non-ASCII dropped",
        ),
    ],
)  # fmt: skip
def test_tracestate_passing(lines: list[str], keep: bool, tracestate: list[str]) -> None:
    out, _ = upstream_lines(*lines, keep=keep)
    assert values(out, "tracestate") == tracestate
    assert len(values(out, "traceparent")) == 1


def test_incoming_trace_lines_are_never_copied() -> None:
    lines, trace = upstream_lines(
        f"traceparent: {VALID}", f"traceparent: 00-{TID}-{'1' * 16}-00", "traceresponse: x"
    )
    assert values(lines, "traceparent") == [trace.value.decode()]
    assert not trace.continued  # two lines: neither is believed
    assert values(lines, "traceresponse") == []


def test_without_a_trace_no_trace_lines() -> None:
    head = head_of(f"traceparent: {VALID}", "tracestate: a=1")
    out = _build_request_head(head, FI, b"r1").decode()
    assert "traceparent" not in out.lower() and "tracestate" not in out.lower()


def test_trace_lines_do_not_overflow_a_full_head() -> None:
    # Many header lines near the limit: the preallocated size must hold our lines too.
    filler = [f"X-F{i}: " + "v" * 100 for i in range(90)]
    lines, trace = upstream_lines(*filler, f"traceparent: {VALID}", "tracestate: a=1")
    assert values(lines, "traceparent") == [trace.value.decode()]
    assert values(lines, "tracestate") == ["a=1"]
    assert len(values(lines, "x-f89")) == 1


# ---- what the client receives -------------------------------------------------------------------


def test_response_head_carries_our_ids_only() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nX-Request-ID: upstream-id\r\ntraceresponse: 00-"
        + b"1" * 32 + b"-" + b"2" * 16 + b"-01\r\ntraceparent: kept-as-is\r\n"
        b"Content-Length: 2\r\n\r\n"
    )  # fmt: skip
    head, _ = parse_response(raw)
    trace = Trace.begin(head_of(f"traceparent: {VALID}"))
    out = _build_response_head(head, request_id=b"rid-9", trace=trace)
    lines = out[:-4].decode().split("\r\n")
    assert values(lines, "x-request-id") == ["rid-9"]
    assert values(lines, "traceresponse") == [f"00-{TID}-{trace.span_id}-01"]
    assert values(lines, "traceparent") == ["kept-as-is"]  # not ours to judge in a response
    # Without them (the Python entry's defaults) the head is as the upstream sent it.
    plain = _build_response_head(head)
    assert b"X-Request-ID: upstream-id" in plain and b"traceresponse: 00-1111" in plain


def test_error_reply_carries_ids() -> None:
    trace = Trace.begin(head_of())
    raw = _build_error_reply(404, "no route", b"rid-4", False, False, trace)
    head, _ = parse_response(raw)
    assert head.get(b"x-request-id") == b"rid-4"
    assert head.get(b"traceresponse") == trace.value
    # No trace (a head that could not be parsed): the id only.
    head, _ = parse_response(_build_error_reply(400, "bad", b"rid-5"))
    assert head.get(b"x-request-id") == b"rid-5" and head.get(b"traceresponse") is None


@pytest.mark.parametrize(
    ("reply", "trace"),
    [
        pytest.param(LocalReply.error(401, "unauthorized"), b"00-" + b"a" * 32 + b"-" + b"b" * 16
                     + b"-00", id="json error with a trace"),
        pytest.param(LocalReply(301, b"", (("Location", "https://x/"),)), None,
                     id="redirect without a trace"),
        pytest.param(LocalReply(403, b"no", (("X-Request-ID", "forged"),
                                             ("traceresponse", "forged"))), None,
                     id="a middleware's own copies are dropped"),
    ],
)  # fmt: skip
def test_local_reply_carries_ids(reply: LocalReply, trace: bytes | None) -> None:
    raw = reply.encode(b"rid-7", False, False, trace)
    head, _ = parse_response(raw)
    assert head.get_all(b"x-request-id") == [b"rid-7"]
    assert head.get_all(b"traceresponse") == ([trace] if trace else [])
    assert head.status == reply.status


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "modes"),
    [
        pytest.param({}, ("always", "always", False), id="defaults"),
        pytest.param(
            {"trust_trace_context": "trusted", "trust_request_id": "never", "trace_sampled": True},
            ("trusted", "never", True), id="set",
        ),
    ],
)  # fmt: skip
def test_forwarded_trust_options(options: dict, modes: tuple[str, str, bool]) -> None:
    fw = Forwarded(**options)
    assert (fw.trust_trace_context, fw.trust_request_id, fw.trace_sampled) == modes
    cfg = EntryConfig(
        Router([]),
        Limits(),
        trust_trace_context=fw.trust_trace_context,
        trust_request_id=fw.trust_request_id,
        trace_sampled=fw.trace_sampled,
    )
    order = {"always": 0, "trusted": 1, "never": 2}
    assert (cfg.trust_trace, cfg.trust_request_id, cfg.trace_sampled) == (
        order[modes[0]],
        order[modes[1]],
        modes[2],
    )


@pytest.mark.parametrize("key", ["trust_trace_context", "trust_request_id"])
def test_forwarded_trust_option_refuses_unknown_modes(key: str) -> None:
    with pytest.raises(ValidationError):
        Forwarded(**{key: "sometimes"})


# ---- a real client connection (ConnCore) ---------------------------------------------------------


@pytest.fixture
def engine() -> Iterator[Engine]:
    yield from running_engine()


def exchange(engine: Engine, peer: str, cfg_options: dict, *lines: str) -> tuple[dict, Any]:
    """One request through a ConnCore whose route has a chain: the chain (engine.dispatch)
    records what the connection exposes and refuses with a LocalReply (401)."""
    seen: dict[str, Any] = {}

    def dispatch(conn: Any, head: Any) -> LocalReply:
        seen.update(
            trace_id=conn.trace_id,
            span_id=conn.span_id,
            parent=conn.parent_span_id,
            rid=conn.request_id,
        )
        return LocalReply.error(401, "unauthorized")

    engine.dispatch = dispatch
    pool = ServerPool(engine, "http://127.0.0.1:9", "127.0.0.1", 9)
    route = Route("r", Service("s", [pool]), chain=("refuse",))
    cfg = EntryConfig(Router([RouteSpec(route, "/")]), Limits(), **cfg_options)
    conn = DownstreamProtocol(engine, EntryPoint("web", cfg))
    transport = FakeTransport((peer, 5555))
    conn.connection_made(transport)
    conn.data_received(request(*lines))
    head, _ = parse_response(b"".join(transport.written))
    assert head is not None and head.status == 401
    assert conn.trace_id is None and conn.span_id is None  # the exchange is over
    conn.connection_lost(None)
    return seen, head


def test_connection_exposes_and_returns_the_trace(engine: Engine) -> None:
    seen, reply = exchange(engine, "192.0.2.1", {}, f"traceparent: {VALID}", "X-Request-ID: r-1")
    assert (seen["trace_id"], seen["parent"], seen["rid"]) == (TID, PID, b"r-1")
    assert HEX16.match(seen["span_id"]) and seen["span_id"] != PID
    assert reply.get_all(b"traceresponse") == [f"00-{TID}-{seen['span_id']}-01".encode()]
    assert reply.get_all(b"x-request-id") == [b"r-1"]


TRUSTED_NETS = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("mode", "peer", "kept"),
    [
        pytest.param("always", "192.0.2.1", True, id="always: anyone"),
        pytest.param("trusted", "10.1.1.1", True, id="trusted: a trusted proxy"),
        pytest.param("trusted", "192.0.2.1", False, id="trusted: anyone else restarts"),
        pytest.param("never", "10.1.1.1", False, id="never: not even a trusted proxy"),
    ],
)
def test_trust_modes(engine: Engine, mode: str, peer: str, kept: bool) -> None:
    options = {"trusted_nets": TRUSTED_NETS, "trust_trace_context": mode, "trust_request_id": mode}
    seen, reply = exchange(engine, peer, options, f"traceparent: {VALID}", "X-Request-ID: r-2")
    assert (seen["trace_id"] == TID) is kept
    assert (seen["parent"] == PID) if kept else seen["parent"] is None
    assert (seen["rid"] == b"r-2") is kept
    if not kept:
        assert HEX32.match(seen["trace_id"]) and HEX32.match(seen["rid"].decode())
    trace = reply.get(b"traceresponse").decode()
    assert trace == f"00-{seen['trace_id']}-{seen['span_id']}-{'01' if kept else '00'}"


def test_trust_modes_are_independent(engine: Engine) -> None:
    options = {"trust_trace_context": "never", "trust_request_id": "always"}
    seen, _ = exchange(engine, "192.0.2.1", options, f"traceparent: {VALID}", "X-Request-ID: r-3")
    assert seen["rid"] == b"r-3" and seen["trace_id"] != TID


def test_new_traces_sampled_per_entrypoint(engine: Engine) -> None:
    _, reply = exchange(engine, "192.0.2.1", {"trace_sampled": True})
    assert reply.get(b"traceresponse").endswith(b"-01")


def test_unknown_trust_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="always, trusted or never"):
        EntryConfig(Router([]), Limits(), trust_trace_context="sometimes")
