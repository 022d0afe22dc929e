"""Access-log target for benchmarks/run.py: fastgate writing a JSON access line per request.

- fastgate-log: `fastgate run` with the config `fastgate proxy` builds (entrypoint `web`,
  route `proxy` on `/`, service `upstream` = the origin), 1 worker, as the rate-limit and auth
  targets have it, plus `access_log: {enabled: true, path: <run dir>/fastgate-log.access.log,
  format: json}`: every exchange formatted in C and written by the worker's writer thread to
  a real file on disk (not /dev/null), as a production gateway would. Metrics are always on
  in every fastgate target; the audit stream keeps its default (stderr, refusals only: none
  here). Its ratios to plain `fastgate` in the same round are the cost of the access log.
- The admin listener is on (a free port on 127.0.0.1) so that `/metrics` can tell how many
  lines the worker dropped (`fastgate_access_log_dropped_total{stream="access"}`); it runs in
  the supervisor and costs the request path nothing.

Rules this file obeys:
- Standard library only; no process is started here (run.py does that).
- The log is checked, not trusted: before the target is measured a probe request must show
  up as a JSON access line (status 200) within a few seconds, and around every measured run
  (warm-up and recorded) the lines the file grew by are compared with the requests wrk
  counted. wrk stops with up to `connections` requests in flight per run, which the gateway
  still logs (answered, or status 0 when cut short), so a run may log up to that many lines
  more than wrk counted; fewer lines than requests, beyond what /metrics says was dropped,
  or more than that margin, makes the run invalid (a bug in the log, not noise).
- Counting reads only the bytes appended since the last mark (no re-reading of the file),
  after the file has stopped growing for a few flush intervals (bounded), so a line still in
  the worker's buffer is not missed and is not counted in the next run. Once counted, the
  file is emptied (the gateway appends with O_APPEND, so its next write lands at the new
  end): a long suite does not fill the disk with lines nobody reads.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_TARGETS = ("fastgate-log",)
LOG_FORMAT = "json"
FLUSH_INTERVAL = 0.2  # the schema default; the file is settled after SETTLE_QUIET of silence
SETTLE_QUIET = 3 * FLUSH_INTERVAL
SETTLE_TIMEOUT = 15.0
PROBE_TIMEOUT = 5.0
_DROPPED = re.compile(
    r'^fastgate_access_log_dropped_total\{[^}]*stream="access"[^}]*\}\s+([0-9.eE+]+)\s*$', re.M
)
# The keys of a JSON access line, in order (fastgate/logs/access-log.schema.json).
ACCESS_KEYS = (
    "time", "type", "request_id", "trace_id", "span_id", "client_ip", "identity", "entrypoint",
    "route", "service", "server", "method", "path", "protocol", "status", "bytes_in",
    "bytes_out", "duration_ms", "upstream_ms", "rate_limit", "auth", "tls", "user_agent",
)  # fmt: skip


class LogCheckError(Exception):
    """The access log did not show what the target claims to do."""


def log_config(port: int, origin_port: int, admin_port: int, path: Path) -> dict[str, Any]:
    """The fastgate-log config: `fastgate proxy`'s shape, 1 worker, the access log to `path`."""
    return {
        "workers": 1,
        "admin": {"enabled": True, "address": f"127.0.0.1:{admin_port}"},
        "entrypoints": {"web": {"address": f"127.0.0.1:{port}"}},
        "services": {"upstream": {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}},
        "routes": [{"name": "proxy", "match": {"path": "/"}, "service": "upstream"}],
        "access_log": {"enabled": True, "path": str(path), "format": LOG_FORMAT},
    }


@dataclass
class Mark:
    """Where the file stood before a measured run, and the drops counted by then."""

    offset: int
    dropped: int | None


@dataclass
class AccessLogFile:
    """The access log of one target: marks before a run, counts after it."""

    path: Path
    admin_port: int
    offset: int = 0  # bytes of the file already counted
    totals: dict[str, int] = field(default_factory=lambda: {"lines": 0, "requests": 0})

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def settle(self, at_least: int = 0) -> int:
        """Wait (bounded) until the file is `at_least` bytes and has not grown for
        SETTLE_QUIET seconds; its size."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        size, since = self.size(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(FLUSH_INTERVAL / 2)
            now = self.size()
            if now != size:
                size, since = now, time.monotonic()
            elif size >= at_least and time.monotonic() - since >= SETTLE_QUIET:
                break
        return size

    def count(self, start: int, end: int) -> int:
        """Newlines in bytes [start, end) of the file, read in 1 MiB chunks."""
        lines = 0
        with self.path.open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                left -= len(chunk)
        return lines

    def dropped(self) -> int | None:
        """fastgate_access_log_dropped_total{stream="access"} from /metrics, None if the
        gateway does not export it (or /metrics cannot be read)."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # loopback only
                text = resp.read().decode()
        except OSError:
            return None
        match = _DROPPED.search(text)
        return int(float(match.group(1))) if match else None

    def mark(self) -> Mark:
        """Before a run: let earlier lines land, then remember where the file ends."""
        self.offset = self.settle()
        return Mark(self.offset, self.dropped())

    def delta(self, mark: Mark, requests: int, runs: int, connections: int) -> dict[str, Any]:
        """After `runs` wrk runs that counted `requests` in all: the lines written since
        `mark`, the drops since then, and whether they add up."""
        end = self.settle(at_least=mark.offset + 1)
        lines = self.count(mark.offset, end)
        with self.path.open("r+b") as f:  # counted: make room (writes go on at the new end)
            f.truncate(0)
        self.offset = 0
        now = self.dropped()
        dropped = now - mark.dropped if now is not None and mark.dropped is not None else None
        in_flight = runs * connections  # requests wrk left unfinished: logged, not counted
        errors = []
        if lines + (dropped or 0) < requests:
            errors.append(
                f"access log: {lines:,} lines for {requests:,} requests wrk counted "
                f"({dropped if dropped is not None else 'unknown'} dropped per /metrics)"
            )
        elif lines > requests + in_flight:
            errors.append(
                f"access log: {lines:,} lines for {requests:,} requests wrk counted, more than "
                f"the {in_flight} a run can leave in flight"
            )
        self.totals["lines"] += lines
        self.totals["requests"] += requests
        return {
            "lines": lines,
            "requests": requests,
            "dropped": dropped,
            "in_flight_max": in_flight,
            "bytes": end - mark.offset,
            "errors": errors,
        }


def probe_line(log: AccessLogFile, start: int) -> dict[str, Any]:
    """The first access line written after byte `start` (the probe request's), waited for up
    to PROBE_TIMEOUT; LogCheckError when none comes or it is not a JSON access line."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    while True:
        if log.size() > start:
            with log.path.open("rb") as f:
                f.seek(start)
                first = f.readline()
            if first.endswith(b"\n"):
                break
        if time.monotonic() > deadline:
            raise LogCheckError(f"no access line in {log.path} {PROBE_TIMEOUT:.0f} s after a GET /")
        time.sleep(0.05)
    try:
        doc = json.loads(first)
    except ValueError as exc:
        raise LogCheckError(f"the access line is not JSON: {first[:200]!r}") from exc
    if not isinstance(doc, dict) or tuple(doc) != ACCESS_KEYS or doc["type"] != "access":
        raise LogCheckError(f"not a documented access line: {first[:300]!r}")
    if doc["status"] != 200 or doc["route"] != "proxy":
        raise LogCheckError(f"the probe's line says status {doc['status']}, route {doc['route']}")
    return doc


def log_summary(runs: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Totals over one scenario's runs of a log target: lines, requests, drops, bytes/line."""
    have = [r for r in runs if r]
    if not have:
        return None
    lines = sum(r["lines"] for r in have)
    drops = [r["dropped"] for r in have if r["dropped"] is not None]
    return {
        "lines": lines,
        "requests": sum(r["requests"] for r in have),
        "dropped": sum(drops) if len(drops) == len(have) else None,
        "bytes_per_line": sum(r["bytes"] for r in have) / lines if lines else None,
    }
