"""LogWriter (fastgate/logs/writer.py) and the stream's C writer thread it starts: whole lines
on shared pipes, O_APPEND files that reopen after a rename, a full buffer drops (never
blocks), stopping writes everything, errors counted.

Real pipes, FIFOs and files; real threads. Every wait is bounded."""

from __future__ import annotations

import json
import os
import select
import threading
import time
from pathlib import Path

import pytest

from fastgate._core.accesslog import LogStream
from fastgate.logs.writer import LogWriter

PIPE_BUF = select.PIPE_BUF


def line(writer: int, n: int, pad: int = 0) -> bytes:
    return (
        json.dumps({"w": writer, "n": n, "pad": "x" * pad}, separators=(",", ":")).encode() + b"\n"
    )


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def started(
    path: str,
    name: str = "access",
    stdout_fd: int = 1,
    capacity: int = 1 << 20,
    flush_at: int = 64 << 10,
    interval: float = 0.02,
) -> tuple[LogWriter, LogStream]:
    writer = LogWriter(path, name, stdout_fd)
    stream = LogStream(capacity, flush_at)
    writer.attach(stream, interval)
    return writer, stream


def put(stream: LogStream, data: bytes) -> None:
    for raw in data.splitlines(keepends=True):
        assert stream.write_line(raw)


class Reader(threading.Thread):
    """Reads a fd to EOF in the background."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.data = bytearray()

    def run(self) -> None:
        while True:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return
            self.data += chunk


# ---- pipes: no interleaving ----------------------------------------------------------------


def test_two_writers_on_one_fifo_never_interleave_lines(tmp_path: Path) -> None:
    """Two writer threads (one through a FIFO path, one through a '-' descriptor on the
    same FIFO) write batches far over PIPE_BUF; every line arrives whole."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(rfd, True)
    extra_fd = os.open(fifo, os.O_WRONLY)  # the "stdout" of the second writer
    reader = Reader(rfd)
    reader.start()
    a, sa = started(str(fifo), "a", flush_at=32 << 10)
    b, sb = started("-", "b", stdout_fd=extra_fd, flush_at=32 << 10)
    per_writer = 3000
    for n in range(per_writer):
        for w, stream in ((0, sa), (1, sb)):
            assert stream.write_line(line(w, n, pad=(n * 37) % 300))
        if n % 200 == 0:
            time.sleep(0.005)  # let the threads take batches (the buffers are 1 MiB)
    assert a.close(10) and b.close(10)
    os.close(extra_fd)  # the last writer: the reader sees EOF
    reader.join(10)
    assert not reader.is_alive()
    os.close(rfd)
    lines = bytes(reader.data).split(b"\n")
    assert lines[-1] == b""
    seen: dict[int, list[int]] = {0: [], 1: []}
    for raw in lines[:-1]:
        doc = json.loads(raw)  # a torn or interleaved line would not parse
        assert doc["pad"] == "x" * ((doc["n"] * 37) % 300)
        seen[doc["w"]].append(doc["n"])
    assert seen == {0: list(range(per_writer)), 1: list(range(per_writer))}
    assert sa.dropped == sb.dropped == 0
    assert sa.written_bytes + sb.written_bytes == len(reader.data)


def test_a_line_longer_than_pipe_buf_is_written_whole() -> None:
    r, w = os.pipe()
    reader = Reader(r)
    reader.start()
    writer, stream = started("-", "long", stdout_fd=w)
    batch = line(0, 0) + line(0, 1, pad=3 * PIPE_BUF) + line(0, 2)
    put(stream, batch)
    assert writer.close(5)
    os.close(w)
    reader.join(5)
    os.close(r)
    assert bytes(reader.data) == batch


# ---- files ---------------------------------------------------------------------------------


def test_file_is_appended_with_mode_0640(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"existing\n")
    writer, stream = started(str(path))
    put(stream, b"one\ntwo\n")
    assert writer.close(5)
    assert path.read_bytes() == b"existing\none\ntwo\n"
    fresh = tmp_path / "new.log"
    os.umask(old := os.umask(0))
    assert LogWriter(str(fresh)).close(5)  # never attached: the file is closed anyway
    assert fresh.stat().st_mode & 0o777 == 0o640 & ~old


def test_reopen_after_rename_sends_later_lines_to_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    writer, stream = started(str(path))
    put(stream, b"before-1\nbefore-2\n")
    assert wait_until(lambda: path.read_bytes().count(b"\n") == 2)
    os.rename(path, rotated)
    put(stream, b"still-old\n")  # not reopened yet: the renamed file gets it
    assert wait_until(lambda: rotated.read_bytes().count(b"\n") == 3)
    writer.reopen()
    assert wait_until(path.exists)
    put(stream, b"after-1\nafter-2\n")
    assert writer.close(5)
    assert rotated.read_bytes() == b"before-1\nbefore-2\nstill-old\n"
    assert path.read_bytes() == b"after-1\nafter-2\n"


def test_reopen_failure_keeps_writing_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    writer, stream = started(str(path))
    os.rename(path, tmp_path / "moved.log")
    directory.rmdir()  # the path cannot be created again
    writer.reopen()
    put(stream, b"kept\n")
    assert writer.close(5)
    assert (tmp_path / "moved.log").read_bytes() == b"kept\n"
    assert writer.error_lines == 0


def test_close_writes_everything_pending(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer, stream = started(str(path), capacity=8 << 20, interval=60)  # no timed write
    lines = b"".join(line(0, i) for i in range(20000))
    put(stream, lines)
    assert writer.close(10)
    assert path.read_bytes() == lines
    assert stream.written_bytes == len(lines) and stream.dropped == 0
    assert not stream.writer_running


def test_unopenable_path_raises_at_construction(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        LogWriter(str(tmp_path / "missing-dir" / "a.log"))


def test_a_stream_with_a_writer_is_not_taken_from_python(tmp_path: Path) -> None:
    writer, stream = started(str(tmp_path / "a.log"))
    with pytest.raises(RuntimeError):
        stream.take()
    with pytest.raises(RuntimeError):
        stream.start_writer(1)
    assert writer.close(5)


# ---- bounds and errors ---------------------------------------------------------------------


def test_a_full_buffer_drops_lines_and_never_blocks() -> None:
    """A pipe nobody reads: the thread blocks on the full pipe, the stream's two buffers
    fill, later lines are dropped and counted at once; what was accepted arrives whole and in
    order once someone reads."""
    r, w = os.pipe()
    writer, stream = started("-", "slow", stdout_fd=w, capacity=64 << 10, flush_at=16 << 10)
    offered = [line(0, i, pad=100) for i in range(20000)]  # ~2.4 MiB
    start = time.monotonic()
    accepted = [raw for raw in offered if stream.write_line(raw)]
    assert time.monotonic() - start < 5  # never blocked on the full pipe
    assert 0 < len(accepted) < len(offered)
    assert stream.dropped == len(offered) - len(accepted)
    reader = Reader(r)
    reader.start()
    assert writer.close(10)
    os.close(w)
    reader.join(10)
    os.close(r)
    assert bytes(reader.data) == b"".join(accepted)


def test_write_errors_are_counted_and_the_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r, w = os.pipe()
    os.close(r)  # EPIPE on every write (Python ignores SIGPIPE)
    writer, stream = started("-", "broken", stdout_fd=w)
    put(stream, b"a\nb\nc\n")
    assert wait_until(lambda: writer.error_lines == 3)
    writer.check_errors()
    put(stream, b"d\n")
    assert wait_until(lambda: writer.error_lines == 4)
    writer.check_errors()  # within ERROR_LOG_INTERVAL: not logged again
    assert writer.close(5)
    os.close(w)
    messages = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(messages) == 1
    assert "3 lines dropped" in messages[0] and "Broken pipe" in messages[0]
    assert stream.write_errors[0] == 2


def test_stdout_and_stderr_are_not_closed_or_reopened() -> None:
    r, w = os.pipe()
    writer, stream = started("-", "out", stdout_fd=w)
    writer.reopen()  # a no-op for a descriptor the writer does not own
    put(stream, b"x\n")
    assert writer.close(5)
    os.write(w, b"y\n")  # still open
    os.close(w)
    assert os.read(r, 100) == b"x\ny\n"
    os.close(r)
    err = LogWriter("stderr", "err")
    assert err.fd == 2 and not err.owned
    assert err.close(5)
    os.fstat(2)  # still open
