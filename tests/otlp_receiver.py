"""A loopback OTLP/HTTP trace receiver for tests: parses every export strictly, can misbehave.

`OtlpReceiver()` listens on 127.0.0.1 (a free port) in a thread and accepts
`POST /v1/traces` with `Content-Type: application/json`. Each body is checked the way the
OTLP specification asks of a receiver and then parsed with the official definitions:
`google.protobuf.json_format.Parse(..., ExportTraceServiceRequest())` from
`opentelemetry.proto.collector.trace.v1.trace_service_pb2` (package opentelemetry-proto),
with unknown fields refused. OTLP/JSON differs from the plain protobuf JSON mapping in one
point: trace and span ids are hex strings, not base64. The receiver checks each id is lowercase
hex of the right length (a hex string is also valid base64, so Parse alone would silently
accept it as the wrong bytes) and hands Parse the base64 form. 64-bit integers
(start/end times, intValue) must be decimal strings, enums integers.

An export that fails a check is answered 400 and its reason kept in `errors`: tests assert
that list is empty. Scripted answers (`answer(...)`) make the receiver reply 500, 429 with a
Retry-After, or hang (never answer until released), one export each, in order; then 200 again.
With an `ssl_context` it serves https (tests use a trustme CA).

Without opentelemetry-proto `require_otlp_proto()` skips the test, except under CI
(CI=true), where it fails: CI must `pip install opentelemetry-proto`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

HEX = {"traceId": re.compile(r"[0-9a-f]{32}\Z"), "spanId": re.compile(r"[0-9a-f]{16}\Z")}
HEX["parentSpanId"] = HEX["spanId"]
DECIMAL = re.compile(r"(0|[1-9][0-9]*)\Z")
HANG_LIMIT = 30.0  # a hanging answer is given up after this long, even if nobody releases it
HANG = "hang"


def require_otlp_proto() -> Any:
    """The ExportTraceServiceRequest class; skip (fail under CI=true) without the package."""
    try:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    except ImportError:
        message = (
            "opentelemetry-proto is not installed: the OTLP export tests parse exports with "
            "the official definitions (pip install opentelemetry-proto)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return trace_service_pb2.ExportTraceServiceRequest


class ExportError(ValueError):
    """The body is not a valid OTLP/JSON ExportTraceServiceRequest."""


def _check_int64(value: Any, where: str) -> None:
    if not isinstance(value, str) or not DECIMAL.match(value):
        raise ExportError(f"{where}: a 64-bit integer must be a decimal string, got {value!r}")


def _check_attributes(attributes: Any, where: str) -> None:
    if not isinstance(attributes, list):
        raise ExportError(f"{where}: attributes must be a list")
    for i, attr in enumerate(attributes):
        value = attr.get("value", {}) if isinstance(attr, dict) else {}
        if "intValue" in value:
            _check_int64(value["intValue"], f"{where}[{i}].intValue")


def _hex_ids_to_base64(span: dict[str, Any], where: str) -> None:
    """OTLP/JSON ids (hex) -> the protobuf JSON mapping's bytes (base64), checking them."""
    for key, pattern in HEX.items():
        if key not in span:
            if key != "parentSpanId":
                raise ExportError(f"{where}: no {key}")
            continue
        value = span[key]
        if key == "parentSpanId" and value == "":
            continue
        if not isinstance(value, str) or not pattern.match(value):
            raise ExportError(f"{where}.{key}: not lowercase hex of the right length: {value!r}")
        if key != "parentSpanId" and not value.strip("0"):
            raise ExportError(f"{where}.{key}: all zero")
        span[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")


def parse_export(body: bytes, message_class: Any) -> Any:
    """A strict parse of one OTLP/JSON export body into an ExportTraceServiceRequest."""
    from google.protobuf import json_format

    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ExportError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceSpans"), list):
        raise ExportError("no resourceSpans list")
    for r, resource_spans in enumerate(doc["resourceSpans"]):
        _check_attributes(
            resource_spans.get("resource", {}).get("attributes", []), f"resourceSpans[{r}]"
        )
        for s, scope_spans in enumerate(resource_spans.get("scopeSpans", [])):
            for i, span in enumerate(scope_spans.get("spans", [])):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                if not isinstance(span, dict):
                    raise ExportError(f"{where}: not an object")
                _hex_ids_to_base64(span, where)
                for key in ("startTimeUnixNano", "endTimeUnixNano"):
                    _check_int64(span.get(key), f"{where}.{key}")
                if not isinstance(span.get("kind"), int):
                    raise ExportError(f"{where}.kind: an enum must be an integer")
                _check_attributes(span.get("attributes", []), f"{where}.attributes")
    message = message_class()
    try:
        json_format.Parse(json.dumps(doc), message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ExportError(f"protobuf: {exc}") from None
    return message


@dataclass
class Received:
    """One POST as received: lowercase header names, the raw body, the answer given."""

    headers: dict[str, str]
    body: bytes
    status: int
    message: Any = None  # the parsed ExportTraceServiceRequest when it was accepted
    at: float = field(default_factory=time.monotonic)


class OtlpReceiver:
    """The receiver (see the module docstring). `url` is the endpoint to export to."""

    def __init__(self, message_class: Any, ssl_context: ssl.SSLContext | None = None) -> None:
        self.message_class = message_class
        self.requests: list[Received] = []
        self.errors: list[str] = []
        self._script: deque[tuple[int, dict[str, str]] | str] = deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        if ssl_context is not None:  # https: the handshake runs in accept(), per connection
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "http" if ssl_context is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    # ---- control ------------------------------------------------------------------------------

    def answer(self, *replies: int | tuple[int, dict[str, str]] | str) -> None:
        """Script the next answers, one per export: a status, (status, headers), or HANG."""
        with self._lock:
            for reply in replies:
                self._script.append((reply, {}) if isinstance(reply, int) else reply)

    def release(self) -> None:
        """Let hanging answers go (they answer 504 then)."""
        self._release.set()

    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.message is not None]

    def spans(self) -> list[Any]:
        """Every span of every accepted export, in arrival order."""
        return [
            span
            for received in self.accepted()
            for resource_spans in received.message.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def wait_requests(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `n` POSTs were answered; returns them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.requests) < n and time.monotonic() < deadline:
                self._changed.wait(max(0.0, deadline - time.monotonic()))
            return list(self.requests)

    def wait_spans(self, n: int, timeout: float = 10.0) -> list[Any]:
        """Wait until at least `n` spans were accepted; returns them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while time.monotonic() < deadline:
                count = sum(
                    len(ss.spans)
                    for r in self.requests
                    if r.message is not None
                    for rs in r.message.resource_spans
                    for ss in rs.scope_spans
                )
                if count >= n:
                    break
                self._changed.wait(max(0.0, min(0.1, deadline - time.monotonic())))
        return self.spans()

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    # ---- serving ------------------------------------------------------------------------------

    def _next_answer(self) -> tuple[int, dict[str, str]] | str | None:
        with self._lock:
            return self._script.popleft() if self._script else None

    def _record(self, received: Received) -> None:
        with self._changed:
            self.requests.append(received)
            self._changed.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                scripted = receiver._next_answer()
                if scripted == HANG:
                    receiver._release.wait(HANG_LIMIT)
                    receiver._record(Received(headers, body, 504))
                    self.close_connection = True
                    return
                if scripted is not None:
                    status, extra = scripted
                    receiver._record(Received(headers, body, status))
                    self._reply(status, b'{"message":"scripted"}', extra)
                    return
                problem = None
                message = None
                if self.path != "/v1/traces":
                    problem = f"path {self.path!r}"
                elif headers.get("content-type", "").split(";")[0].strip() != "application/json":
                    problem = f"content-type {headers.get('content-type')!r}"
                else:
                    try:
                        message = parse_export(body, receiver.message_class)
                    except ExportError as exc:
                        problem = str(exc)
                if problem is not None:
                    with receiver._lock:
                        receiver.errors.append(problem)
                    receiver._record(Received(headers, body, 400))
                    self._reply(400, json.dumps({"message": problem}).encode(), {})
                    return
                receiver._record(Received(headers, body, 200, message))
                self._reply(200, b"{}", {})

        return Handler
