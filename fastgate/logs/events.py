"""Audit events raised by Python code (the C side writes the per-request ones itself).

    audit_event("tls_verify_failed", reason="certificate verify failed: certificate revoked",
                client_ip="203.0.113.9", entrypoint="websecure")

Rules this file obeys:
- One line per event with exactly the keys and key order of the audit line format
  (docs/logging.md): the keys that do not apply are null, `time` is UTC with microseconds
  like the C lines, `type` is "audit". Values are strings cut at MAX_VALUE characters.
- Never a credential or certificate contents: callers pass fixed reason phrases (the ssl
  library's reason string, never a certificate), a client address, config names.
- Never blocks and never grows: the line goes into the worker's audit LogStream buffer
  (`write_line`), and when it is full the line is dropped and counted there. Python events
  are also rate-limited (RATE per second per worker, burst BURST) so a flood of failing
  handshakes cannot crowd the request audit lines out; the events over the limit are
  counted as dropped (`take_dropped`, added to the audit stream's dropped count).
- A no-op while the audit stream is off (no stream installed).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

__all__ = ["AUDIT_KEYS", "BURST", "RATE", "audit_event", "format_event", "install", "take_dropped"]

# The audit line's keys, in order (the C formatter writes the same).
AUDIT_KEYS = (
    "time",
    "type",
    "event",
    "reason",
    "source",
    "request_id",
    "trace_id",
    "client_ip",
    "identity",
    "entrypoint",
    "route",
    "method",
    "path",
    "status",
    "tls",
    "user_agent",
)
MAX_VALUE = 512  # characters of one value (accesslog.pxd MAX_VALUE_LOG), then "..."
RATE = 100.0  # Python audit events per second per worker
BURST = 100.0

_stream: Any = None  # the current audit LogStream, or None (audit off)
_tokens = BURST
_stamp = time.monotonic()
_dropped = 0  # events refused by the rate limit or a full buffer, not yet counted


def install(stream: Any) -> None:
    """Make `stream` (an accesslog.LogStream, or None) the one events are written to."""
    global _stream
    _stream = stream


def take_dropped() -> int:
    """Events dropped since the last call (the log runtime adds them to the audit row)."""
    global _dropped
    n, _dropped = _dropped, 0
    return n


def _cut(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and len(value) > MAX_VALUE:
        return value[:MAX_VALUE] + "..."
    return value


def format_event(event: str, fields: dict[str, Any], now: float | None = None) -> bytes:
    """One audit line (JSON, '\\n'-terminated) for `event`; unknown field names are a bug
    (TypeError), absent ones are null."""
    unknown = set(fields) - set(AUDIT_KEYS[3:])
    if unknown:
        raise TypeError(f"not audit fields: {sorted(unknown)}")
    stamp = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    doc: dict[str, Any] = {
        "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "type": "audit",
        "event": event,
    }
    for key in AUDIT_KEYS[3:]:
        doc[key] = _cut(fields.get(key))
    if doc["client_ip"] is None:
        doc["client_ip"] = ""  # always a string, as in the C lines
    return json.dumps(doc, separators=(",", ":")).encode("ascii") + b"\n"


def _admit() -> bool:
    global _tokens, _stamp
    now = time.monotonic()
    _tokens = min(BURST, _tokens + (now - _stamp) * RATE)
    _stamp = now
    if _tokens < 1.0:
        return False
    _tokens -= 1.0
    return True


def audit_event(event: str, **fields: Any) -> bool:
    """Write one audit event; False when it was dropped (rate limit, full buffer) or the
    audit stream is off. Keys: reason, source, request_id, trace_id, client_ip, identity
    (a dict or None), entrypoint, route, method, path, status, tls, user_agent."""
    global _dropped
    stream = _stream
    if stream is None:
        return False
    if not _admit():
        _dropped += 1
        return False
    line = format_event(event, fields)
    try:
        return bool(stream.write_line(line))  # a full buffer counts it in stream.dropped
    except ValueError:  # longer than a log line may be: cannot happen with cut values
        _dropped += 1
        return False
