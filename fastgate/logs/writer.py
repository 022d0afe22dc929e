"""LogWriter: where one log stream's lines go, and the stream's writer thread that puts them there.

Rules this file obeys:
- The event loop never writes and never waits: the writer is the stream's own C thread
  (`LogStream.start_writer`, fastgate/_core/accesslog.pyx), which swaps the stream's batch
  buffer under a lock and writes the full one without the GIL, while the loop formats lines
  into the other. A line that finds the buffer full is dropped and counted (`dropped`), never
  waited for: a slow disk costs log lines, never request latency or unbounded memory.
- Whole lines only. On a pipe, FIFO or socket (several workers may share one, e.g. the
  container's stdout) every write is at most PIPE_BUF bytes cut at a line end, so the kernel
  keeps each write atomic and lines from different processes never interleave; a single line
  longer than PIPE_BUF is written alone. A regular file is opened O_APPEND (each write lands
  at the end, whoever else appends) and written with one write per batch.
- The file is opened here, on the caller's thread, so a path that cannot be opened is a
  config error at start or reload (OSError), not a silent loss later. Files are created 0640
  (the log may hold client addresses and identities) with O_CLOEXEC.
- Write errors (ENOSPC, EPIPE ...) never stop the thread: the lines of the failed batch are
  counted (`error_lines`) and `check_errors()` (called from the loop once a second) logs them
  at most once per ERROR_LOG_INTERVAL.
- `reopen()` (SIGUSR1, after logrotate renamed the file) opens the path again and hands the
  new descriptor to the thread, which switches between two batches and closes the old one:
  no line is lost or split. stdout and stderr are never reopened or closed (not ours).
- `close(timeout)` lets the thread write what is pending, close the file and end; it waits at
  most `timeout` seconds (a stuck disk cannot hold a drain forever).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from typing import Any

__all__ = ["ERROR_LOG_INTERVAL", "STDERR", "STDOUT", "LogWriter", "is_stream"]

log = logging.getLogger("fastgate.logs")

STDOUT = "-"
STDERR = "stderr"
ERROR_LOG_INTERVAL = 10.0  # seconds between two logged write errors of one writer
FILE_MODE = 0o640
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def is_stream(fd: int) -> bool:
    """A pipe, FIFO or socket: writes must be PIPE_BUF pieces at line ends."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return True  # unknown: the careful way
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class LogWriter:
    """The destination of one stream: `path` is "-" (the gateway's stdout: `stdout_fd`, the
    worker's duplicate of it, see fastgate/server/worker.py), "stderr", or a file."""

    def __init__(self, path: str, name: str = "access", stdout_fd: int = 1) -> None:
        self.path = path
        self.name = name
        self.owned = path not in (STDOUT, STDERR)
        self.fd = self._open() if self.owned else (stdout_fd if path == STDOUT else 2)
        self.stream: Any = None
        self._errors_seen = 0
        self._last_logged = -ERROR_LOG_INTERVAL

    def attach(self, stream: Any, interval: float) -> None:
        """Start `stream`'s writer thread on this destination (written every `interval`
        seconds, or as soon as the stream's flush_at bytes wait)."""
        stream.start_writer(self.fd, is_stream(self.fd), interval, self.owned)
        self.stream = stream

    @property
    def error_lines(self) -> int:
        """Lines lost to failed writes."""
        return self.stream.error_lines if self.stream is not None else 0

    def check_errors(self) -> None:
        """Log new write failures (from the loop; at most once per ERROR_LOG_INTERVAL)."""
        if self.stream is None:
            return
        errors, errno = self.stream.write_errors
        if errors <= self._errors_seen:
            return
        self._errors_seen = errors
        now = time.monotonic()
        if now - self._last_logged < ERROR_LOG_INTERVAL:
            return
        self._last_logged = now
        log.error(
            "%s log: cannot write to %s (%s); %d lines dropped so far (errors are logged at "
            "most every %gs)",
            self.name,
            "stdout" if self.path == STDOUT else self.path,
            os.strerror(errno) if errno else "write failed",
            self.error_lines,
            ERROR_LOG_INTERVAL,
        )

    def reopen(self) -> None:
        """Open the path again for the later batches (logrotate renamed the file)."""
        if not self.owned or self.stream is None:
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error(
                "%s log: cannot reopen %s, still writing the old file: %s",
                self.name,
                self.path,
                exc.strerror or exc,
            )
            return
        self.stream.reopen(fd, is_stream(fd), True)

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is pending and close; True when done within `timeout` seconds."""
        if self.stream is None:
            if self.owned and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            return True
        return bool(self.stream.stop_writer(timeout))

    def _open(self) -> int:
        return os.open(self.path, _OPEN_FLAGS, FILE_MODE)
