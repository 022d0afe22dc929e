"""LogRuntime: one worker's log streams, their writers, counting, reload and drain.

Rules this file obeys:
- Nothing here runs per request, and nothing here writes: the C side formats each line into
  a stream's batch buffer (fastgate/_core/accesslog.pyx) and the stream's own writer thread
  (C, no GIL; fastgate/logs/writer.py) swaps and writes the buffers. The loop never touches
  a batch.
- Off costs nothing: with access, audit and span export all off, `engine.alog` is None and
  the connection formats nothing; a stream that is off does not exist.
- Nothing is lost on purpose and every loss is counted: lines refused by a full buffer
  (`LogStream.dropped`), lines a write error lost (`error_lines`), spans the exporter could
  not send, Python audit events over their rate limit; once a second the growth of `lines`
  and of all those drops is added to the metric slot's K_LOG rows (stream "access",
  "audit", "spans"), which /metrics reports as fastgate_access_log_dropped_total.
- Reload: a config whose log sections (and credential query parameters) are unchanged keeps
  the running streams and writers; otherwise new ones are built first (a file that cannot be
  opened refuses the reload, naming the key), installed in the engine, and then the old
  writers write what they hold and stop: no line is lost. Route rules (sample, errors) come
  with the compiled routes and need no rebuild.
- Drain: `close()` after the last exchange ended waits (bounded, in an executor thread) for
  the writer threads to write everything and stop.
- The query keys whose values are redacted are the configured ones plus every query
  parameter an auth middleware of the config reads a credential from (jwt_auth
  `token_from: query:NAME`, api_key `query: NAME`), so a credential in a URL is never logged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Iterable
from typing import Any

from fastgate._core import accesslog, ratecheck
from fastgate._core.stats import OFFSETS
from fastgate.config.schema import Config
from fastgate.errors import ConfigError
from fastgate.logs import events
from fastgate.logs.writer import LogWriter

__all__ = [
    "CLOSE_TIMEOUT",
    "COUNT_INTERVAL",
    "K_LOG",
    "LogRuntime",
    "Sink",
    "credential_query_keys",
    "log_settings",
]

log = logging.getLogger("fastgate.logs")

K_LOG = 5  # stats.pxd: the (stream,) table
COUNT_INTERVAL = 1.0  # seconds between copies into the metric slot
CLOSE_TIMEOUT = 5.0  # seconds a drain or reload waits for the writers
FLUSH_AT = 256 << 10  # the writer thread is woken as soon as this much waits


def credential_query_keys(config: Config) -> tuple[str, ...]:
    """Query parameters the config's auth middlewares read credentials from."""
    keys: dict[str, None] = {}
    for mw in config.middlewares.values():
        options = mw.options
        if mw.type == "jwt_auth":
            source = options.get("token_from")
            if isinstance(source, str) and source.startswith("query:"):
                keys[source.partition(":")[2].strip()] = None
        elif mw.type == "api_key":
            name = options.get("query")
            if isinstance(name, str):
                keys[name] = None
    return tuple(k for k in keys if k)


def log_settings(config: Config) -> tuple[Any, ...]:
    """What the streams and writers are built from: equal settings keep them on reload."""
    return (config.access_log, config.audit_log, config.tracing, credential_query_keys(config))


def redact_keys(config: Config) -> tuple[str, ...]:
    keys = (*config.access_log.redact_query_keys, *credential_query_keys(config))
    return tuple(dict.fromkeys(k.lower() for k in keys))


class Sink:
    """One stream of one worker: its LogStream and who empties it (its LogWriter thread, or
    the span exporter which takes from the stream itself), with the counts already copied
    to the metric slot."""

    def __init__(self, name: str, stream: Any, writer: LogWriter | None) -> None:
        self.name = name
        self.stream = stream
        self.writer = writer
        self.exporter: Any = None
        self.extra_dropped = 0  # Python audit events dropped before reaching the stream
        self.copied = (0, 0)  # (lines, dropped) already added to the slot

    def counts(self) -> tuple[int, int]:
        """(lines accepted, lines dropped anywhere) so far."""
        dropped = self.stream.dropped + self.extra_dropped
        if self.writer is not None:
            dropped += self.writer.error_lines
        if self.exporter is not None:
            dropped += getattr(self.exporter, "dropped_spans", 0)
            dropped += getattr(self.exporter, "failed_spans", 0)
        return self.stream.lines, dropped


class LogRuntime:
    """The streams, writers and AccessLog of one worker for one set of log settings."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        shard: Any = None,
        stdout_fd: int = 1,
    ) -> None:
        self.loop = loop
        self.shard = shard
        self.settings = log_settings(config)
        self.sinks: dict[str, Sink] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._rows: dict[str, int] = {}
        self.closed = False
        try:
            self._build(config, stdout_fd)
        except BaseException:
            self._close_writers_now()
            raise
        access, audit, spans = (self.sinks.get(n) for n in ("access", "audit", "spans"))
        if access is None and audit is None and spans is None:
            self.alog = None
        else:
            cfg = config.access_log
            self.alog = accesslog.AccessLog(
                access=access.stream if access else None,
                audit=audit.stream if audit else None,
                spans=spans.stream if spans else None,
                format=cfg.format,
                sample=cfg.sample,
                log_errors=cfg.always_log_errors,
                redact=redact_keys(config),
                drop_query=cfg.drop_query,
            )

    # ---- building ----------------------------------------------------------------------------

    def _build(self, config: Config, stdout_fd: int) -> None:
        sections = (
            ("access", "access_log", config.access_log),
            ("audit", "audit_log", config.audit_log),
        )
        for name, key, cfg in sections:
            if not cfg.enabled:
                continue
            stream = _stream(cfg.buffer_bytes)
            try:
                writer = LogWriter(cfg.path, name, stdout_fd)
            except OSError as exc:
                raise ConfigError(
                    f"{key}.path", f"cannot open {cfg.path}: {exc.strerror or exc}"
                ) from None
            self.sinks[name] = Sink(name, stream, writer)
            writer.attach(stream, cfg.flush_interval)
        otlp_cfg = config.tracing.otlp
        if otlp_cfg is not None:
            try:
                from fastgate.logs import otlp
            except ImportError:
                log.warning("tracing.otlp is set but OTLP export not available in this build")
            else:
                sink = Sink("spans", _stream(otlp_cfg.buffer_bytes), None)
                sink.exporter = otlp.start(sink.stream, otlp_cfg)
                self.sinks["spans"] = sink

    def install(self, engine: Any) -> None:
        """Make the engine write through this runtime (None: nothing is logged)."""
        engine.alog = self.alog
        engine.client_resolver = getattr(ratecheck, "resolved_client_ip", None)
        audit = self.sinks.get("audit")
        events.install(audit.stream if audit is not None else None)

    def start(self) -> None:
        """Arm the once-a-second count (the writer threads run from the build)."""
        if self.shard is not None:
            self._timers[""] = self.loop.call_later(COUNT_INTERVAL, self._count_tick)

    def _count_tick(self) -> None:
        if self.closed:
            return
        self.count()
        self._timers[""] = self.loop.call_later(COUNT_INTERVAL, self._count_tick)

    # ---- counting ----------------------------------------------------------------------------

    def count(self) -> None:
        """Add each stream's growth of lines and drops to the slot's K_LOG rows; log new
        write errors."""
        for sink in self.sinks.values():
            if sink.writer is not None:
                sink.writer.check_errors()
        if self.shard is None:
            return
        audit = self.sinks.get("audit")
        if audit is not None:
            audit.extra_dropped += events.take_dropped()
        for name, sink in self.sinks.items():
            lines, dropped = sink.counts()
            old_lines, old_dropped = sink.copied
            sink.copied = (lines, dropped)
            row = self._rows.get(name)
            if row is None:
                row = self._rows[name] = self.shard.register_log(name)
            if lines > old_lines:
                self.shard.add_count(K_LOG, row, OFFSETS["log_lines"], lines - old_lines)
            if dropped > old_dropped:
                self.shard.add_count(K_LOG, row, OFFSETS["log_dropped"], dropped - old_dropped)

    # ---- signals, reload, drain --------------------------------------------------------------

    def reopen(self) -> None:
        """SIGUSR1: every file writer opens its path again (after logrotate's rename)."""
        for sink in self.sinks.values():
            if sink.writer is not None:
                sink.writer.reopen()

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Stop the exporter, wait (bounded, off the loop) for the writers to write what
        they hold and stop, count one last time; True when all finished in time."""
        if self.closed:
            return True
        self.closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        done = True
        for sink in self.sinks.values():
            if sink.exporter is not None:
                done = await _close_exporter(sink.exporter, timeout) and done
        writers = [s.writer for s in self.sinks.values() if s.writer is not None]
        if writers:
            done = await self.loop.run_in_executor(None, _close_all, writers, timeout) and done
        self.count()
        if not done:
            log.warning("log writers did not finish within %gs; some lines may be lost", timeout)
        return done

    def _close_writers_now(self) -> None:
        for sink in self.sinks.values():
            if sink.writer is not None:
                sink.writer.close(0)


def _stream(capacity: int) -> Any:
    return accesslog.LogStream(capacity, min(FLUSH_AT, capacity // 2))


def _close_all(writers: Iterable[LogWriter], timeout: float) -> bool:
    """Close the writers (in parallel: each has its own thread) within `timeout` overall."""
    writers = list(writers)
    deadline = time.monotonic() + timeout
    ok = True
    for w in writers:
        ok = w.close(max(0.0, deadline - time.monotonic())) and ok
    return ok


async def _close_exporter(exporter: Any, timeout: float) -> bool:
    close = getattr(exporter, "close", None)
    if close is None:
        return True
    try:
        result = close()
        if inspect.isawaitable(result):
            await asyncio.wait_for(result, timeout)
    except asyncio.TimeoutError:
        return False
    except Exception:
        log.exception("OTLP exporter: close failed")
        return False
    return True
