"""OTLP span export through a real gateway (docs: tracing.otlp).

A real gateway with `tracing.otlp` pointed at a loopback receiver (tests/otlp_receiver.py),
which parses every export strictly with the official OTLP definitions. Each sampled
exchange must arrive as one server span whose ids match what the client saw in
`traceresponse`; an unsampled one must not arrive at all; a failing collector must not
disturb the gateway, and its warning must not show the collector's credentials.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, Gateway, Origin, base_config, build_request, free_port, get

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for the receiver

from otlp_receiver import OtlpReceiver, require_otlp_proto

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
SECRET = "Bearer otlp-collector-key-123"
N = 5


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver(require_otlp_proto())
    yield server
    server.stop()


def gateway_config(origin: Origin, receiver: OtlpReceiver, **otlp: Any) -> dict[str, Any]:
    routes = [
        {"name": "dead", "match": {"hosts": ["dead.test"]}, "service": "dead", "priority": 10},
        {"name": "api", "match": {"path": "/"}, "service": "origin"},
    ]
    services = {
        "origin": {"servers": [{"url": f"http://127.0.0.1:{origin.port}"}]},
        "dead": {"servers": [{"url": f"http://127.0.0.1:{free_port()}"}]},
    }
    return base_config(
        origin.port,
        entrypoints={
            "web": {"address": f"127.0.0.1:{free_port()}", "forwarded": {"trace_sampled": True}}
        },
        services=services,
        routes=routes,
        tracing={
            "otlp": {
                "endpoint": receiver.url,
                "flush_interval": 0.2,
                "timeout": 2,
                "service_name": "gw-under-test",
                "headers": {"Authorization": SECRET},
                **otlp,
            }
        },
    )


@pytest.fixture
def gw(
    origin: Origin, receiver: OtlpReceiver, start_gateway: Callable[[dict[str, Any]], Gateway]
) -> Gateway:
    return start_gateway(gateway_config(origin, receiver))


def ask(
    gw: Gateway, headers: dict[str, str], host: str = "origin.test", path: str = "/echo-path/x"
) -> tuple:
    """One GET on a new connection: (status, trace id, gateway span id, flags) from the one
    `traceresponse` the client got."""
    with Client(gw.addr) as c:
        c.send(build_request("GET", path, headers, host=host))
        resp = c.read_response()
    values = resp.all("traceresponse")
    assert len(values) == 1, resp.raw_head
    m = TRACEPARENT.match(values[0])
    assert m is not None, values
    return resp.status, m.group(1), m.group(2), m.group(3)


def by_span(receiver: OtlpReceiver, n: int) -> dict[str, Any]:
    spans = receiver.wait_spans(n, timeout=10)
    assert receiver.errors == []
    return {s.span_id.hex(): s for s in spans}


def attrs(span: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def test_each_sampled_exchange_is_one_server_span(gw: Gateway, receiver: OtlpReceiver) -> None:
    started = [ask(gw, {}, path=f"/echo-path/{i}") for i in range(N)]
    continued = [ask(gw, {"traceparent": f"00-{TID}-{PID}-01"}) for _ in range(N)]
    spans = by_span(receiver, 2 * N)
    assert len(spans) == 2 * N
    for i, (status, trace_id, span_id, flags) in enumerate(started):
        assert (status, flags) == (200, "01")
        span = spans[span_id]
        assert span.trace_id.hex() == trace_id
        assert span.parent_span_id == b""  # the trace started at the gateway
        assert span.name == "GET api"
        assert span.kind == 2  # SERVER
        assert span.status.code == 0
        assert 0 < span.start_time_unix_nano <= span.end_time_unix_nano
        got = attrs(span)
        assert got["http.request.method"] == "GET"
        assert got["http.route"] == "api"
        assert got["http.response.status_code"] == 200
        assert got["url.path"] == f"/echo-path/{i}"
        assert got["client.address"] == "127.0.0.1"
        assert got["fastgate.service"] == "origin"
    for status, trace_id, span_id, _ in continued:
        assert (status, trace_id) == (200, TID)
        span = spans[span_id]
        assert span.trace_id.hex() == TID
        assert span.parent_span_id.hex() == PID  # the client's span is the parent
    for received in receiver.accepted():
        (resource_spans,) = received.message.resource_spans
        resource = attrs(resource_spans.resource)
        assert resource["service.name"] == "gw-under-test"
        assert resource["process.pid"] == gw.worker_pid
    assert all(r.headers.get("authorization") == SECRET for r in receiver.accepted())


def test_unsampled_incoming_trace_gives_no_span(gw: Gateway, receiver: OtlpReceiver) -> None:
    """flags 00 from a trusted client (trust_trace_context: always, the default): no span.
    A sampled request sent after it proves the exporter ran past that point."""
    unsampled = "0af7651916cd43dd8448eb211c80319c"
    status, trace_id, _, flags = ask(gw, {"traceparent": f"00-{unsampled}-{PID}-00"})
    assert (status, trace_id, flags) == (200, unsampled, "00")
    _, after, after_span, _ = ask(gw, {})
    spans = by_span(receiver, 1)
    assert after_span in spans
    time.sleep(0.5)  # two more flush intervals: nothing else arrives
    assert [s.trace_id.hex() for s in receiver.spans()] == [after]


def test_error_exchange_span_status(gw: Gateway, receiver: OtlpReceiver) -> None:
    status, trace_id, span_id, _ = ask(gw, {}, host="dead.test")
    assert status == 502
    span = by_span(receiver, 1)[span_id]
    assert span.trace_id.hex() == trace_id
    assert span.status.code == 2  # ERROR for 5xx
    assert span.name == "GET dead"
    assert attrs(span)["http.response.status_code"] == 502


def test_failing_collector_does_not_disturb_the_gateway(
    gw: Gateway, receiver: OtlpReceiver
) -> None:
    receiver.answer(500)
    for i in range(3):
        resp = get(gw.addr, f"/echo-path/fail-{i}")
        assert resp.status == 200
        assert resp.body == f"/echo-path/fail-{i}".encode()
    deadline = time.monotonic() + 10
    while "OTLP export" not in gw.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = gw.log.read_text()
    assert "OTLP export" in text and "HTTP 500" in text
    assert "otlp-collector-key" not in text  # never the collector's credentials
    # Once the collector recovers, new spans arrive again.
    resp = get(gw.addr, "/echo-path/after")
    assert resp.status == 200

    def paths() -> list[str]:
        return [attrs(s)["url.path"] for s in receiver.spans()]

    deadline = time.monotonic() + 10
    while "/echo-path/after" not in paths() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "/echo-path/after" in paths()
    assert receiver.requests[0].status == 500


def test_shutdown_sends_the_spans_still_held(
    origin: Origin, receiver: OtlpReceiver, start_gateway: Callable[[dict[str, Any]], Gateway]
) -> None:
    """With a flush interval longer than the test, only the drain at shutdown sends them."""
    gw = start_gateway(gateway_config(origin, receiver, flush_interval=60))
    sent = {ask(gw, {}, path=f"/echo-path/late-{i}")[2] for i in range(3)}
    time.sleep(0.3)
    assert receiver.requests == []
    gw.stop()
    assert set(by_span(receiver, 3)) == sent
