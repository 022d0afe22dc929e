"""OTLP/HTTP span export: the gateway's server spans, sent as OTLP/JSON to a collector.

The C side formats one OTLP/JSON `Span` object per line into the worker's `spans` LogStream
(fastgate/_core/accesslog.pxd, WANT_SPAN) for every exchange whose trace is sampled. This
module takes those lines off the event loop's timer, wraps a batch as an
ExportTraceServiceRequest and POSTs it to `tracing.otlp.endpoint` with the gateway's own
HTTP client (fastgate/client/http.py: keep-alive, verified TLS).

Rules this file obeys:
- Off costs nothing. Without `tracing.otlp` no spans stream exists, the C side writes no span
  and this module is never imported: nothing runs and nothing is allocated per request. With
  it, a request costs one formatted line in C; everything here runs once per batch.
- Never blocks the event loop and never waits for the collector on a request's path: the C
  side drops (and counts) a span when the stream's buffer is full, never waits.
- Bounded: at most one request in flight per exporter, at most MAX_SPANS_PER_REQUEST spans per
  request (a batch is cut at line ends), at most `max_pending_bytes` of lines queued behind
  it (more are dropped and counted in `dropped_spans`), each request bounded by `timeout`,
  a Retry-After pause bounded by MAX_PAUSE, `close()` bounded by `timeout`.
- A failed export is dropped, not retried: a non-2xx answer, a timeout or a connection error
  counts the batch's spans in `failed_spans`. Only 429 and 503 (the collector asks us to slow
  down) pause the exporter for Retry-After and resend the batch, at most MAX_ATTEMPTS times.
- Logs at most one warning per WARN_INTERVAL. A log line names the collector's host:port and
  what failed, never a header value (headers usually carry the collector's API key), the
  request body or the endpoint's path and query.
- OTLP/JSON per the OTLP specification: trace and span ids as lowercase hex strings (not
  base64), 64-bit integers as decimal strings, enums as integers, lowerCamelCase keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import fastgate
from fastgate.client.http import HttpClient, HttpClientError, HttpResponse, _build_head, split_url
from fastgate.errors import ConfigError

log = logging.getLogger("fastgate.otlp")

MAX_SPANS_PER_REQUEST = 512
MAX_RESPONSE_BYTES = 64 << 10  # an ExportTraceServiceResponse is tiny
WARN_INTERVAL = 30.0  # seconds between two warnings
MAX_PAUSE = 30.0  # a Retry-After longer than this is cut to it
DEFAULT_PAUSE = 1.0  # 429/503 without a usable Retry-After
MAX_ATTEMPTS = 3  # a throttled batch is sent at most this many times
THROTTLED = frozenset({429, 503})
_RESERVED = frozenset({"content-type"})


def start(stream: Any, cfg: Any) -> OtlpExporter:
    """Start exporting the lines of `stream` (a LogStream) on the running event loop.

    `cfg` is the `tracing.otlp` model or any object with its attributes. ValueError for an
    endpoint or header the HTTP client would refuse (raised now, not at the first export).
    """
    exporter = OtlpExporter(stream, cfg)
    exporter.start()
    return exporter


def _secret(value: Any) -> str:
    """A header value as configured: a plain str, or a pydantic SecretStr."""
    reveal = getattr(value, "get_secret_value", None)
    return reveal() if reveal is not None else str(value)


def _request_wrapper(service_name: str) -> tuple[bytes, bytes]:
    """The ExportTraceServiceRequest around the spans: (bytes before them, bytes after)."""

    def text(key: str, value: str) -> dict[str, Any]:
        return {"key": key, "value": {"stringValue": value}}

    host = socket.gethostname()
    pid = os.getpid()
    resource = {
        "attributes": [
            text("service.name", service_name),
            text("service.instance.id", f"{host}:{pid}"),
            text("host.name", host),
            {"key": "process.pid", "value": {"intValue": str(pid)}},
        ]
    }
    scope = {"name": "fastgate", "version": fastgate.__version__}
    compact = {"separators": (",", ":"), "ensure_ascii": True}
    head = (
        '{"resourceSpans":[{"resource":' + json.dumps(resource, **compact) + ',"scopeSpans":[{'
        '"scope":' + json.dumps(scope, **compact) + ',"spans":['
    )
    return head.encode("ascii"), b"]}]}]}"


def retry_after(response: HttpResponse, now: float | None = None) -> float:
    """Seconds to pause for a 429/503: Retry-After (delta-seconds or HTTP-date, RFC 9110
    §10.2.3) bounded to [0, MAX_PAUSE]; DEFAULT_PAUSE when absent or invalid."""
    value = (response.header("retry-after") or "").strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_PAUSE)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return DEFAULT_PAUSE
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    delta = (when - datetime.fromtimestamp(now, timezone.utc)).total_seconds()
    return min(max(delta, 0.0), MAX_PAUSE)


def _rejected(response: HttpResponse) -> tuple[int, str]:
    """OTLP partial success: (rejectedSpans, errorMessage) from a 2xx JSON answer, else (0, "")."""
    if not response.body:
        return 0, ""
    try:
        doc = json.loads(response.body)
        partial = doc.get("partialSuccess") or {}
        count = int(partial.get("rejectedSpans") or 0)
        message = str(partial.get("errorMessage") or "")
    except (ValueError, TypeError, AttributeError):
        return 0, ""  # a 2xx with an unreadable body is still a success (OTLP/HTTP §Success)
    return max(count, 0), message[:200]


class OtlpExporter:
    """Sends one LogStream's span lines to an OTLP/HTTP collector (see the module docstring).

    Counters: `sent_spans` (accepted by the collector), `failed_spans` (refused, timed out,
    unreachable, rejected as partial success, or left when close() ran out of time),
    `dropped_spans` (never sent: the queue behind the in-flight request was full), `requests`.
    """

    def __init__(self, stream: Any, cfg: Any, *, client: HttpClient | None = None) -> None:
        self.stream = stream
        self.endpoint: str = cfg.endpoint
        url = split_url(self.endpoint)  # ValueError now for an unusable URL
        self.where = url.where
        self.timeout = float(cfg.timeout)
        self.flush_interval = float(cfg.flush_interval)
        self.max_pending_bytes = int(cfg.max_pending_bytes)
        if not self.timeout > 0 or not self.flush_interval > 0:
            raise ValueError("timeout and flush_interval must be > 0")
        self.ca_file: str | None = str(cfg.ca_file) if cfg.ca_file is not None else None
        if self.ca_file is not None and url.scheme != "https":
            raise ValueError("ca_file is only used with an https:// endpoint")
        self.headers = self._headers(cfg.headers or {})
        _build_head("POST", url, self.headers, b"")  # ValueError (naming no value) if unsafe
        self._head, self._tail = _request_wrapper(str(cfg.service_name))
        self._client = client
        self._queue: deque[tuple[list[bytes], int]] = deque()  # (lines, their bytes)
        self.pending_bytes = 0
        self.sent_spans = 0
        self.failed_spans = 0
        self.dropped_spans = 0
        self.requests = 0
        self._inflight = 0  # spans in the request being sent
        self._paused_until = 0.0
        self._last_warning: float | None = None
        self._collect_soon = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @staticmethod
    def _headers(configured: Mapping[str, Any]) -> list[tuple[str, str]]:
        headers = [("Content-Type", "application/json")]
        agent = True
        for name, value in configured.items():
            lower = str(name).lower()
            if lower in _RESERVED:
                raise ValueError(f"header {name!r} is set by the exporter")
            agent = agent and lower != "user-agent"
            headers.append((str(name), _secret(value)))
        if agent:
            headers.append(("User-Agent", f"fastgate/{fastgate.__version__}"))
        return headers

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Hook the stream and start the timer and the sender (needs a running loop)."""
        self._loop = loop = asyncio.get_running_loop()
        self.stream.on_ready = self._on_ready
        self._timer = loop.call_later(self.flush_interval, self._tick)
        self._sender = loop.create_task(self._run(), name="otlp-export")

    async def close(self) -> None:
        """Send what is pending (bounded by `timeout`), then stop; what is left is failed."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.stream.on_ready = None
        self._collect()
        self._wake.set()
        sender = self._sender
        try:
            if sender is not None and not sender.done():
                await asyncio.wait({sender}, timeout=self.timeout)
        finally:  # also when close() itself is cancelled: stop the sender, count what is left
            if sender is not None and not sender.done():
                sender.cancel()
            self.failed_spans += self._inflight + sum(len(lines) for lines, _ in self._queue)
            self._inflight = 0
            self._queue.clear()
            self.pending_bytes = 0
        if sender is not None:
            await asyncio.gather(sender, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    def stats(self) -> dict[str, int]:
        return {
            "sent_spans": self.sent_spans,
            "failed_spans": self.failed_spans,
            "dropped_spans": self.dropped_spans,
            "requests": self.requests,
            "pending_bytes": self.pending_bytes,
        }

    # ---- taking lines off the stream (event loop callbacks, never blocking) -------------------

    def _on_ready(self) -> None:
        """The stream passed its flush mark (called from C, on the loop): take it soon."""
        if not self._collect_soon and not self._closed and self._loop is not None:
            self._collect_soon = True
            self._loop.call_soon(self._collect)

    def _tick(self) -> None:
        self._collect()
        if not self._closed and self._loop is not None:
            self._timer = self._loop.call_later(self.flush_interval, self._tick)

    def _collect(self) -> None:
        self._collect_soon = False
        data = self.stream.take()
        if data:
            self._enqueue(data)

    def _enqueue(self, data: bytes) -> None:
        """Queue a batch of whole lines, cut into requests; drop it when over the bound (a
        batch is always taken into an empty queue, so a small bound cannot stop export)."""
        size = len(data)
        if self._queue and self.pending_bytes + size > self.max_pending_bytes:
            count = data.count(b"\n")
            self.dropped_spans += count
            self._warn(f"the collector is behind: {count} spans dropped")
            return
        lines = data.split(b"\n")
        lines.pop()  # after the last "\n": b"" (take() returns whole lines only)
        for i in range(0, len(lines), MAX_SPANS_PER_REQUEST):
            chunk = lines[i : i + MAX_SPANS_PER_REQUEST]
            self._queue.append((chunk, sum(map(len, chunk)) + len(chunk)))
        self.pending_bytes += size
        self._wake.set()

    def _next_request(self) -> tuple[list[bytes], int]:
        """The next request's lines: queued chunks merged up to MAX_SPANS_PER_REQUEST."""
        lines, size = self._queue.popleft()
        while self._queue and len(lines) + len(self._queue[0][0]) <= MAX_SPANS_PER_REQUEST:
            more, more_size = self._queue.popleft()
            lines = lines + more
            size += more_size
        self.pending_bytes -= size
        return lines, size

    # ---- sending (one task, one request at a time) --------------------------------------------

    async def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        attempts = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                pause = self._paused_until - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                lines, size = self._next_request()
                attempts += 1
                status = await self._send(lines)
                if status in THROTTLED and attempts < MAX_ATTEMPTS:
                    self._queue.appendleft((lines, size))  # admitted already: no bound check
                    self.pending_bytes += size
                    continue
                if status in THROTTLED:
                    self.failed_spans += len(lines)
                    self._warn(f"HTTP {status} {MAX_ATTEMPTS} times: {len(lines)} spans dropped")
                attempts = 0
            if self._closed:
                return

    async def _send(self, lines: list[bytes]) -> int | None:
        """POST one request; counts its spans. Returns 429/503 when it should be resent."""
        count = len(lines)
        body = self._head + b",".join(lines) + self._tail
        self._inflight = count
        self.requests += 1
        try:
            response = await (await self._http()).request(
                "POST", self.endpoint, headers=self.headers, body=body, timeout=self.timeout
            )
        except (HttpClientError, ConfigError, ValueError, OSError) as exc:
            # HttpClientError names host:port and what failed, never a header value or path;
            # ConfigError names the key (an unusable ca_file); others: only their type.
            if isinstance(exc, HttpClientError):
                reason = str(exc)
            elif isinstance(exc, ConfigError):
                reason = str(exc)
            else:
                reason = type(exc).__name__
            self._inflight = 0
            self._fail(count, reason)
            return None
        except Exception as exc:  # a bug must not stop the exporter: count, warn, go on
            self._inflight = 0
            self._fail(count, f"unexpected {type(exc).__name__}")
            return None
        # (Cancelled by close(): _inflight stays set, so close() counts those spans as failed.)
        self._inflight = 0
        status = response.status
        if 200 <= status < 300:
            rejected, message = _rejected(response)
            rejected = min(rejected, count)
            self.sent_spans += count - rejected
            if rejected:
                self.failed_spans += rejected
                self._warn(f"the collector rejected {rejected} spans: {message!r}")
            return status
        if status in THROTTLED:
            assert self._loop is not None
            self._paused_until = self._loop.time() + retry_after(response)
            return status
        self._fail(count, f"HTTP {status}")
        return status

    async def _http(self) -> HttpClient:
        """The HTTP client, made on first use (reading ca_file off the event loop)."""
        if self._client is None:
            context = None
            if self.ca_file is not None:
                from fastgate.tls.client import verifying_context

                loop = asyncio.get_running_loop()
                context = await loop.run_in_executor(
                    None, verifying_context, self.ca_file, "tracing.otlp.ca_file"
                )
            if self._client is None:
                self._client = HttpClient(
                    ssl_context=context,
                    max_idle_per_host=1,
                    max_response_bytes=MAX_RESPONSE_BYTES,
                )
        return self._client

    def _fail(self, count: int, reason: str) -> None:
        self.failed_spans += count
        self._warn(f"{reason}: {count} spans dropped")

    def _warn(self, what: str) -> None:
        """Log at most once per WARN_INTERVAL (the counters keep the full tally)."""
        now = time.monotonic()
        if self._last_warning is not None and now - self._last_warning < WARN_INTERVAL:
            return
        self._last_warning = now
        log.warning(
            "OTLP export to %s: %s (totals: %d failed, %d dropped)",
            self.where,
            what,
            self.failed_spans,
            self.dropped_spans,
        )
