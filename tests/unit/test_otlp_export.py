"""fastgate.logs.otlp against a real loopback OTLP receiver (tests/receiver.py).

Span lines go into a real LogStream (fastgate._core.accesslog): formatted by the C formatter
itself (AccessLog.write_fields, WANT_SPAN) where the content matters, or written with
write_line where only the count does. The receiver parses every export strictly with the
official OTLP protobuf definitions, so a passing test means a collector would accept it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for the receiver

from otlp_receiver import HANG, OtlpReceiver, require_otlp_proto

import fastgate
from fastgate.client.http import HttpResponse
from fastgate.logs import otlp

TEST_TIMEOUT = 30.0
SECRET = "Bearer s3cr3t-otlp-token"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver(require_otlp_proto())
    yield server
    server.stop()


def accesslog() -> Any:
    from fastgate._core import accesslog as module  # compiled: part of the build, never skipped

    return module


def run(coro: Awaitable[Any]) -> Any:
    """Run on a fresh uvloop loop (the worker's loop), bounded so a hung test fails."""
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, TEST_TIMEOUT))
    finally:
        loop.close()


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def config(endpoint: str, **overrides: Any) -> SimpleNamespace:
    cfg = {
        "endpoint": endpoint,
        "headers": {"Authorization": SECRET, "X-Tenant": "acme"},
        "timeout": 2.0,
        "ca_file": None,
        "service_name": "edge-gw",
        "flush_interval": 0.05,
        "buffer_bytes": 1 << 20,
        "max_pending_bytes": 8 << 20,
    }
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def tid(i: int) -> str:
    return f"{i + 1:032x}"


def sid(i: int) -> str:
    return f"{0xA000 + i:016x}"


def span_line(i: int) -> bytes:
    """A span line shaped like the C side's (for tests that only count spans)."""
    doc = {
        "traceId": tid(i),
        "spanId": sid(i),
        "name": "GET api",
        "kind": 2,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000000000500000",
        "attributes": [
            {"key": "http.request.method", "value": {"stringValue": "GET"}},
            {"key": "http.response.status_code", "value": {"intValue": "200"}},
            {"key": "fastgate.request_id", "value": {"stringValue": f"req-{i}"}},
        ],
        "status": {"code": 0},
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def write_spans(stream: Any, start: int, count: int) -> None:
    for i in range(start, start + count):
        assert stream.write_line(span_line(i))


def attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out


def total(exporter: otlp.OtlpExporter) -> int:
    return exporter.sent_spans + exporter.failed_spans + exporter.dropped_spans


# ---- content: what the C side writes arrives as the collector reads it ----------------------


C_SPANS = [
    pytest.param(
        {"method": b"GET", "route": b"api", "status": 200, "parent_span_id": None},
        {"name": "GET api", "parent": b"", "status_code": 0, "route": "api"},
        id="root span, route",
    ),
    pytest.param(
        {"method": b"POST", "route": b"orders", "status": 503,
         "parent_span_id": b"00f067aa0ba902b7"},
        {"name": "POST orders", "parent": bytes.fromhex("00f067aa0ba902b7"), "status_code": 2,
         "route": "orders"},
        id="child span, 5xx is an error",
    ),
    pytest.param(
        {"method": b"GET", "route": None, "status": 404, "parent_span_id": None},
        {"name": "GET", "parent": b"", "status_code": 0, "route": None},
        id="no route",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "want"), C_SPANS)
def test_c_span_lines_arrive_as_otlp(
    receiver: OtlpReceiver, fields: dict[str, Any], want: dict[str, Any]
) -> None:
    al = accesslog()
    stream = al.LogStream()
    log = al.AccessLog(spans=stream)
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "b7ad6b7169203331"

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url))
        log.write_fields(
            al.WANT_SPAN,
            request_id=b"rid-1",
            trace_id=trace_id.encode(),
            span_id=span_id.encode(),
            trace_sampled=True,
            client_ip=b"192.0.2.7",
            entrypoint=b"web",
            service=b"backend",
            server=b"http://127.0.0.1:9000",
            target=b"/v1/items",
            http_minor=1,
            duration_ns=1_500_000,
            **fields,
        )
        await until(lambda: receiver.spans())
        await exporter.close()
        return exporter

    exporter = run(main())
    assert receiver.errors == []
    (span,) = receiver.spans()
    assert span.trace_id == bytes.fromhex(trace_id)
    assert span.span_id == bytes.fromhex(span_id)
    assert span.parent_span_id == want["parent"]
    assert span.name == want["name"]
    assert span.kind == 2  # SPAN_KIND_SERVER
    assert span.status.code == want["status_code"]
    assert 0 < span.start_time_unix_nano <= span.end_time_unix_nano
    got = attrs(span)
    assert got["http.request.method"] == fields["method"].decode()
    assert got["http.response.status_code"] == fields["status"]
    assert got["url.path"] == "/v1/items"
    assert got["client.address"] == "192.0.2.7"
    assert got["fastgate.request_id"] == "rid-1"
    assert got.get("http.route") == want["route"]
    assert exporter.stats()["sent_spans"] == 1
    assert exporter.failed_spans == exporter.dropped_spans == 0


def test_resource_scope_and_headers(receiver: OtlpReceiver) -> None:
    """One export: the resource names the service and this process, the scope is fastgate,
    and the configured headers are sent (with Content-Type and a User-Agent)."""
    stream = accesslog().LogStream()

    async def main() -> None:
        exporter = otlp.start(stream, config(receiver.url))
        write_spans(stream, 0, 3)
        await until(lambda: len(receiver.spans()) == 3)
        await exporter.close()

    run(main())
    assert receiver.errors == []
    (received,) = receiver.accepted()
    assert received.headers["authorization"] == SECRET
    assert received.headers["x-tenant"] == "acme"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["user-agent"] == f"fastgate/{fastgate.__version__}"
    (resource_spans,) = received.message.resource_spans
    resource = attrs(resource_spans.resource)
    assert resource["service.name"] == "edge-gw"
    assert resource["process.pid"] == __import__("os").getpid()
    assert resource["service.instance.id"].endswith(f":{resource['process.pid']}")
    assert resource["host.name"] == socket.gethostname()
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "fastgate"
    assert scope_spans.scope.version == fastgate.__version__
    assert [s.trace_id.hex() for s in scope_spans.spans] == [tid(i) for i in range(3)]


def test_large_batch_is_split_at_line_ends(receiver: OtlpReceiver) -> None:
    """1200 spans taken at once go out as requests of at most 512 spans, all of them."""
    stream = accesslog().LogStream(capacity=4 << 20)
    count = 1200

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url, flush_interval=0.3))
        write_spans(stream, 0, count)
        await until(lambda: len(receiver.spans()) == count)
        await exporter.close()
        return exporter

    exporter = run(main())
    assert receiver.errors == []
    sizes = [
        sum(len(ss.spans) for rs in r.message.resource_spans for ss in rs.scope_spans)
        for r in receiver.accepted()
    ]
    assert max(sizes) <= otlp.MAX_SPANS_PER_REQUEST
    assert len(sizes) >= 3
    assert [s.trace_id.hex() for s in receiver.spans()] == [tid(i) for i in range(count)]
    assert exporter.sent_spans == count


# ---- faults -----------------------------------------------------------------------------------


def test_error_answer_counts_failed_and_keeps_going(
    receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    stream = accesslog().LogStream()
    receiver.answer(500)

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url))
        write_spans(stream, 0, 4)
        await until(lambda: exporter.failed_spans == 4)
        write_spans(stream, 4, 2)
        await until(lambda: exporter.sent_spans == 2)
        await exporter.close()
        return exporter

    with caplog.at_level(logging.WARNING, logger="fastgate.otlp"):
        exporter = run(main())
    assert exporter.failed_spans == 4
    assert exporter.dropped_spans == 0
    assert [s.trace_id.hex() for s in receiver.spans()] == [tid(4), tid(5)]
    assert "HTTP 500" in caplog.text
    assert f"127.0.0.1:{receiver.port}" in caplog.text
    assert "s3cr3t" not in caplog.text  # never a header value
    assert "/v1/traces" not in caplog.text  # nor the endpoint's path


def test_warnings_are_rate_limited(
    receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    stream = accesslog().LogStream()
    receiver.answer(500, 500, 500)

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url))
        for i in range(3):
            write_spans(stream, i, 1)
            await until(lambda i=i: exporter.failed_spans == i + 1)
        await exporter.close()
        return exporter

    with caplog.at_level(logging.WARNING, logger="fastgate.otlp"):
        exporter = run(main())
    assert exporter.failed_spans == 3
    assert len([r for r in caplog.records if r.name == "fastgate.otlp"]) == 1


def test_throttled_export_is_resent_after_retry_after(receiver: OtlpReceiver) -> None:
    stream = accesslog().LogStream()
    receiver.answer((429, {"Retry-After": "1"}))

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url))
        write_spans(stream, 0, 3)
        await until(lambda: len(receiver.spans()) == 3)
        await exporter.close()
        return exporter

    exporter = run(main())
    first, second = receiver.requests
    assert first.status == 429 and second.status == 200
    assert first.body == second.body  # the same batch, resent
    assert second.at - first.at >= 0.9  # it waited for Retry-After
    assert exporter.sent_spans == 3 and exporter.failed_spans == 0


def test_throttled_too_often_is_failed(receiver: OtlpReceiver) -> None:
    stream = accesslog().LogStream()
    receiver.answer(*[(503, {"Retry-After": "0"})] * otlp.MAX_ATTEMPTS)

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url))
        write_spans(stream, 0, 2)
        await until(lambda: exporter.failed_spans == 2)
        write_spans(stream, 2, 1)
        await until(lambda: exporter.sent_spans == 1)
        await exporter.close()
        return exporter

    exporter = run(main())
    assert len(receiver.requests) == otlp.MAX_ATTEMPTS + 1
    assert exporter.failed_spans == 2


def test_hung_collector_times_out_and_pending_is_bounded(receiver: OtlpReceiver) -> None:
    """One request in flight: while it hangs, later batches queue up to max_pending_bytes and
    the rest are dropped; the hung one fails at `timeout`; the queued ones are sent after."""
    stream = accesslog().LogStream()
    receiver.answer(HANG)
    line = len(span_line(0))
    pending = 10 * line + line // 2  # room for 10 queued spans

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url, timeout=3.0, max_pending_bytes=pending))
        write_spans(stream, 0, 2)  # -> the request that hangs
        await until(lambda: exporter.requests == 1)
        for i in range(2, 32, 3):  # 10 batches of 3 while it hangs
            write_spans(stream, i, 3)
            await asyncio.sleep(0.08)  # one flush each
        await until(lambda: exporter.failed_spans == 2)
        await until(lambda: total(exporter) == 32)
        await exporter.close()
        return exporter

    exporter = run(main())
    receiver.release()
    assert exporter.failed_spans == 2
    assert exporter.dropped_spans == 32 - 2 - exporter.sent_spans
    assert 3 <= exporter.sent_spans <= 10
    assert exporter.dropped_spans >= 20
    assert len(receiver.spans()) == exporter.sent_spans
    assert receiver.errors == []


def test_unreachable_collector_counts_failed() -> None:
    stream = accesslog().LogStream()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(f"http://127.0.0.1:{port}/v1/traces"))
        write_spans(stream, 0, 5)
        await until(lambda: exporter.failed_spans == 5)
        await exporter.close()
        return exporter

    exporter = run(main())
    assert exporter.sent_spans == 0 and exporter.requests >= 1


def test_https_collector_verified_with_ca_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """https: ca_file is trusted (spans arrive); without it the system roots refuse the
    self-made CA: a TLS failure, counted, never an unverified send."""
    import trustme  # a test dependency: never skipped

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = OtlpReceiver(require_otlp_proto(), ssl_context=server_ctx)
    trusted, untrusted = accesslog().LogStream(), accesslog().LogStream()

    async def main() -> tuple[otlp.OtlpExporter, otlp.OtlpExporter]:
        good = otlp.start(trusted, config(server.url, ca_file=str(ca_file)))
        bad = otlp.start(untrusted, config(server.url))
        write_spans(trusted, 0, 2)
        write_spans(untrusted, 2, 2)
        await until(lambda: good.sent_spans == 2 and bad.failed_spans == 2)
        await good.close()
        await bad.close()
        return good, bad

    try:
        with caplog.at_level(logging.WARNING, logger="fastgate.otlp"):
            good, bad = run(main())
    finally:
        server.stop()
    assert "TLS handshake failed" in caplog.text
    assert server.url.startswith("https://")
    assert [s.trace_id.hex() for s in server.spans()] == [tid(0), tid(1)]
    assert good.failed_spans == 0 and bad.sent_spans == 0


def test_close_sends_what_is_pending(receiver: OtlpReceiver) -> None:
    """With a flush timer that never fires, close() takes the stream and sends it."""
    stream = accesslog().LogStream()

    async def main() -> otlp.OtlpExporter:
        exporter = otlp.start(stream, config(receiver.url, flush_interval=3600))
        write_spans(stream, 0, 7)
        await asyncio.sleep(0.1)
        assert receiver.requests == []
        await exporter.close()
        assert stream.on_ready is None
        return exporter

    exporter = run(main())
    assert len(receiver.spans()) == 7
    assert exporter.sent_spans == 7
    assert stream.pending == 0


def test_close_is_bounded_by_timeout(receiver: OtlpReceiver) -> None:
    stream = accesslog().LogStream()
    receiver.answer(HANG)

    async def main() -> tuple[otlp.OtlpExporter, float]:
        loop = asyncio.get_running_loop()
        exporter = otlp.start(stream, config(receiver.url, flush_interval=3600, timeout=1))
        write_spans(stream, 0, 4)
        began = loop.time()
        await exporter.close()
        return exporter, loop.time() - began

    exporter, took = run(main())
    receiver.release()
    assert exporter.failed_spans == 4 and exporter.sent_spans == 0
    assert took < 3.0


def test_on_ready_triggers_an_early_flush(receiver: OtlpReceiver) -> None:
    """A stream that passes its flush mark is taken at once, not at the next timer tick."""
    al = accesslog()
    stream = al.LogStream(capacity=4 * al.MAX_LINE, flush_at=2048)

    async def main() -> None:
        exporter = otlp.start(stream, config(receiver.url, flush_interval=3600))
        write_spans(stream, 0, 8)  # > 2048 bytes
        await until(lambda: len(receiver.spans()) == 8, timeout=5)
        await exporter.close()

    run(main())


# ---- configuration and helpers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"endpoint": "ftp://127.0.0.1/v1/traces"}, "scheme", id="not http"),
        pytest.param({"endpoint": "http://u:p@127.0.0.1/v1/traces"}, "credentials", id="userinfo"),
        pytest.param({"headers": {"X-Key": "a\r\nInjected: 1"}}, "X-Key", id="CRLF in a value"),
        pytest.param({"headers": {"Bad Name": "x"}}, "not a token", id="bad header name"),
        pytest.param({"headers": {"Content-Type": "text/plain"}}, "set by", id="content-type"),
        pytest.param({"headers": {"Host": "evil"}}, "Host", id="host"),
        pytest.param({"ca_file": "/etc/ssl/ca.pem"}, "https", id="ca_file with http"),
        pytest.param({"timeout": 0}, "> 0", id="timeout 0"),
    ],
)
def test_invalid_settings_are_refused_at_start(overrides: dict[str, Any], message: str) -> None:
    cfg = config("http://127.0.0.1:4318/v1/traces")
    cfg.__dict__.update(overrides)
    with pytest.raises(ValueError, match=message) as info:
        otlp.OtlpExporter(None, cfg)
    assert "Injected" not in str(info.value)  # a refused value is not echoed


def test_secret_header_values_are_accepted() -> None:
    from pydantic import SecretStr

    cfg = config("http://127.0.0.1:4318/v1/traces", headers={"Authorization": SecretStr(SECRET)})
    exporter = otlp.OtlpExporter(None, cfg)
    assert ("Authorization", SECRET) in exporter.headers


def response(retry_after: str | None) -> HttpResponse:
    headers = () if retry_after is None else (("Retry-After", retry_after),)
    return HttpResponse(status=429, reason="Too Many Requests", headers=headers, body=b"")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("3", 3.0, id="delta-seconds"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("100000", otlp.MAX_PAUSE, id="bounded"),
        pytest.param(None, otlp.DEFAULT_PAUSE, id="absent"),
        pytest.param("soon", otlp.DEFAULT_PAUSE, id="invalid"),
        pytest.param("-5", otlp.DEFAULT_PAUSE, id="negative"),
        pytest.param("Wed, 21 Oct 2015 07:28:10 GMT", 10.0, id="http-date"),
        pytest.param("Wed, 21 Oct 2015 07:27:00 GMT", 0.0, id="http-date past"),
    ],
)
def test_retry_after(value: str | None, seconds: float) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert otlp.retry_after(response(value), now=now) == seconds


@pytest.mark.parametrize(
    ("body", "rejected"),
    [
        pytest.param(b"{}", 0, id="full success"),
        pytest.param(b"", 0, id="empty body"),
        pytest.param(b'{"partialSuccess":{}}', 0, id="empty partial success"),
        pytest.param(b'{"partialSuccess":{"rejectedSpans":"3","errorMessage":"x"}}', 3, id="3"),
        pytest.param(b"not json", 0, id="unreadable"),
    ],
)
def test_partial_success(body: bytes, rejected: int) -> None:
    resp = HttpResponse(status=200, reason="OK", headers=(), body=body)
    assert otlp._rejected(resp)[0] == rejected
