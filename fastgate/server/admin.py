"""The admin listener (loopback by default): /healthz, /readyz, /metrics and /audit.

`/healthz` answers 200 while the supervisor's loop runs (liveness). `/readyz` answers the
supervisor's status document as JSON, 200 when every worker is ready and the gateway is not
stopping, else 503 (readiness). `/metrics` answers the Prometheus exposition of the whole
gateway (fastgate/metrics/collector.py): OpenMetrics when the Accept header asks for
`application/openmetrics-text`, the text format 0.0.4 otherwise. `/audit` answers the
security posture report of the running config as JSON (fastgate/audit.py, the same document
as `fastgate audit --format json`: key paths, never secret values), built off the loop in the
default (bounded) executor since it re-reads the config file. GET and HEAD only (405 with
`Allow` otherwise, RFC 9110 §15.5.6); one request per connection, answered with
`Connection: close`. The request head is bounded (8 KiB, 10 s); anything that does not parse
as a request line gets 400. The admin listener has no authentication: keep it on loopback or
a private network (metrics and the audit carry route and server names, never credentials or
client data).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fastgate.audit import audit as audit_config
from fastgate.config.loader import read_config_file
from fastgate.config.schema import Config, parse_address
from fastgate.errors import ConfigError

MetricsFn = Callable[[str], tuple[bytes, str]]  # Accept header -> (body, content type)
AuditFn = Callable[[], dict[str, Any]]  # the /audit document (blocking: run off the loop)

log = logging.getLogger("fastgate.admin")

MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _accept(head: bytes) -> str:
    """The request's Accept header value ("" when absent)."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"accept":
            return value.strip().decode("latin-1")
    return ""


def _answer(
    method: bytes, path: bytes, status: Callable[[], dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    if path not in (b"/healthz", b"/readyz"):
        return 404, {"error": "not found"}
    if method not in (b"GET", b"HEAD"):
        return 405, {"error": "method not allowed"}
    if path == b"/healthz":
        return 200, {"status": "ok"}
    doc = status()
    return (200 if doc.get("ready") else 503), doc


def audit_document(config: Config, config_path: str | None) -> dict[str, Any]:
    """The /audit JSON of a running `config`. The file is re-read raw (as it is on disk now)
    for the secrets rules; without a file, or if it cannot be read, they are skipped."""
    raw = None
    if config_path is not None:
        try:
            raw = read_config_file(config_path)
        except ConfigError:
            raw = None
    return audit_config(config, raw, config_path or "running config").to_dict()


async def start_admin(
    address: str,
    status: Callable[[], dict[str, Any]],
    metrics: MetricsFn | None = None,
    audit: AuditFn | None = None,
) -> asyncio.AbstractServer:
    """Serve the admin endpoints; `status()` describes the supervisor and its workers,
    `metrics(accept)` renders /metrics and `audit()` the /audit document (404 without them)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,  # not the builtin before Python 3.11
            ConnectionError,
        ):
            writer.close()
            return
        method = b""
        ctype = "application/json"
        body = b""
        try:
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                code, doc = 400, {"error": "bad request line"}
            else:
                method = parts[0]
                path = parts[1].split(b"?", 1)[0]
                if path == b"/metrics" and metrics is not None:
                    if method in (b"GET", b"HEAD"):
                        body, ctype = metrics(_accept(head))
                        code, doc = 200, {}
                    else:
                        code, doc = 405, {"error": "method not allowed"}
                elif path == b"/audit" and audit is not None:
                    if method in (b"GET", b"HEAD"):
                        loop = asyncio.get_running_loop()
                        code, doc = 200, await loop.run_in_executor(None, audit)
                    else:
                        code, doc = 405, {"error": "method not allowed"}
                else:
                    code, doc = _answer(method, path, status)
        except Exception:
            log.exception("admin: request failed")
            code, doc, ctype, body = 500, {"error": "internal error"}, "application/json", b""
        if not body:
            body = json.dumps(doc).encode() + b"\n"
        allow = b"Allow: GET, HEAD\r\n" if code == 405 else b""
        try:
            writer.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Cache-Control: no-store\r\n%sConnection: close\r\n\r\n"
                % (code, _REASONS[code].encode(), ctype.encode("latin-1"), len(body), allow)
            )
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    host, port = parse_address(address)
    return await asyncio.start_server(handle, host, port, limit=MAX_HEAD)
