"""BatchWriter: one thread per log destination, writing whole batches of whole lines.

Rules this file obeys:
- The event loop never waits on a disk or a pipe: `submit()` only appends to a queue under a
  lock held for a few instructions. When more than `max_pending` bytes already wait, the
  batch is refused (False) and the caller counts its lines as dropped: a slow disk costs log
  lines, never request latency or unbounded memory.
- Whole lines only. On a pipe, FIFO or socket (several workers may share one, e.g. the
  container's stdout) every write is at most `select.PIPE_BUF` bytes cut at a line end, so
  the kernel keeps each write atomic and lines from different processes never interleave; a
  single line longer than PIPE_BUF is written alone (it may then interleave: it cannot be
  atomic). A regular file is opened O_APPEND (each write lands at the end, whoever else
  appends) and written with one write per batch, looping over partial writes.
- Write errors (ENOSPC, EPIPE, a vanished fd) never stop the thread: the lines not written
  are counted as dropped and the error is logged at most once per ERROR_LOG_INTERVAL.
- `reopen()` (SIGUSR1, after logrotate renamed the file) makes the thread open the path
  again between two writes: later lines go to the new file, none is lost or split. stdout
  and stderr are never reopened or closed (the writer does not own them).
- `close(timeout)` writes everything queued, then closes the file; it waits at most
  `timeout` seconds (the thread is a daemon: a stuck disk cannot hold the process).
- Files are created 0640 (the log may hold client addresses and identities) with O_CLOEXEC.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import stat
import threading
import time

__all__ = ["ERROR_LOG_INTERVAL", "STDERR", "STDOUT", "BatchWriter", "chunks"]

log = logging.getLogger("fastgate.logs")

STDOUT = "-"
STDERR = "stderr"
ERROR_LOG_INTERVAL = 10.0  # seconds between two logged write errors of one writer
FILE_MODE = 0o640
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_PIPE_BUF = select.PIPE_BUF


def chunks(data: bytes, limit: int = _PIPE_BUF) -> list[tuple[int, int]]:
    """(start, end) slices of `data` (whole lines) of at most `limit` bytes each, cut at line
    ends; a line longer than `limit` is a slice of its own. Trailing bytes without a newline
    (never produced by the formatters) form a last slice."""
    out: list[tuple[int, int]] = []
    n = len(data)
    pos = 0
    while pos < n:
        end = pos + limit
        if end >= n:
            out.append((pos, n))
            break
        cut = data.rfind(b"\n", pos, end)
        if cut < 0:  # one line longer than the limit: alone, whole
            cut = data.find(b"\n", end)
            cut = n - 1 if cut < 0 else cut
        out.append((pos, cut + 1))
        pos = cut + 1
    return out


class BatchWriter:
    """Writes the batches of one stream to `path` ("-" stdout, "stderr", or a file) from a
    daemon thread. `stdout_fd` is the descriptor "-" means (the worker's duplicate of the
    gateway's stdout, see fastgate/server/worker.py)."""

    def __init__(
        self, path: str, max_pending: int, name: str = "access", stdout_fd: int = 1
    ) -> None:
        self.path = path
        self.name = name
        self.max_pending = max_pending
        self.owned = path not in (STDOUT, STDERR)
        # Opened here, on the caller's thread, so a path that cannot be opened is a config
        # error at start or reload (OSError), not a silent loss later.
        self.fd = self._open() if self.owned else (stdout_fd if path == STDOUT else 2)
        self.atomic_chunks = self._is_stream(self.fd)
        self.error_lines = 0  # lines lost to write errors (written by the thread only)
        self.written_lines = 0  # lines written (by the thread only)
        self._queue: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._reopen = False
        self._last_error = -ERROR_LOG_INTERVAL
        self._thread = threading.Thread(target=self._run, name=f"fastgate-log-{name}", daemon=True)
        self._thread.start()

    # ---- the loop's side ---------------------------------------------------------------------

    def submit(self, batch: bytes) -> bool:
        """Queue `batch` (whole lines); False when the writer is behind (over max_pending)
        or closed: the caller counts the batch's lines as dropped. Never blocks."""
        if not batch:
            return True
        with self._cond:
            if self._closing or self._pending + len(batch) > self.max_pending:
                return False
            self._queue.append(batch)
            self._pending += len(batch)
            self._cond.notify()
        return True

    @property
    def pending(self) -> int:
        """Bytes queued and not yet taken by the thread."""
        return self._pending

    def reopen(self) -> None:
        """Open the path again before the next write (logrotate renamed the file)."""
        if not self.owned:
            return
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued, close the file; True when done within `timeout` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing and not self._reopen:
                    self._cond.wait()
                reopen, self._reopen = self._reopen, False
                data = b"".join(self._queue) if self._queue else b""
                self._queue.clear()
                self._pending = 0
                closing = self._closing
            if reopen:
                self._do_reopen()
            if data:
                self._write(data)
            if closing and not data:
                break
        if self.owned:
            try:
                os.close(self.fd)
            except OSError:
                pass

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        if self.atomic_chunks and len(data) > _PIPE_BUF:
            parts = chunks(data)
        else:
            parts = [(0, len(data))]
        for start, end in parts:
            try:
                self._write_all(view[start:end])
            except OSError as exc:
                lost = data.count(b"\n", start)
                self.error_lines += lost
                self._log_error(exc, lost)
                return
            self.written_lines += data.count(b"\n", start, end)

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                # Someone made the shared descriptor non-blocking: wait until it takes more.
                select.select([], [self.fd], [], 1.0)
                continue
            except InterruptedError:
                continue
            if n == 0:
                raise OSError(errno.EIO, "write returned 0")
            view = view[n:]

    def _do_reopen(self) -> None:
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
        old, self.fd = self.fd, fd
        self.atomic_chunks = self._is_stream(fd)
        try:
            os.close(old)
        except OSError:
            pass

    def _open(self) -> int:
        return os.open(self.path, _OPEN_FLAGS, FILE_MODE)

    @staticmethod
    def _is_stream(fd: int) -> bool:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return True  # unknown: the careful way
        return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)

    def _log_error(self, exc: OSError, lost: int) -> None:
        now = time.monotonic()
        if now - self._last_error >= ERROR_LOG_INTERVAL:
            self._last_error = now
            log.error(
                "%s log: cannot write to %s (%s); %d lines dropped (errors are logged at most "
                "every %gs)",
                self.name,
                "stdout" if self.path == STDOUT else self.path,
                exc.strerror or exc,
                lost,
                ERROR_LOG_INTERVAL,
            )
