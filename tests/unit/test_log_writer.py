"""BatchWriter (fastgate/logs/writer.py): whole lines on shared pipes, O_APPEND files that
reopen after a rename, bounded pending bytes, close writes everything, errors counted.

Real pipes, FIFOs and files; real threads. Every wait is bounded."""

from __future__ import annotations

import json
import os
import select
import threading
import time
from pathlib import Path

import pytest

from fastgate.logs.writer import BatchWriter, chunks

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


# ---- chunking ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, limit, expected",
    [
        pytest.param(b"", 8, [], id="nothing"),
        pytest.param(b"ab\n", 8, [(0, 3)], id="one short line"),
        pytest.param(b"ab\ncd\n", 8, [(0, 6)], id="fits whole"),
        pytest.param(b"abc\ndef\ngh\n", 8, [(0, 8), (8, 11)], id="cut at the last line end"),
        pytest.param(b"abcdefghij\nk\n", 8, [(0, 11), (11, 13)], id="a long line alone"),
        pytest.param(b"a\nbcdefghijkl\nm\n", 8, [(0, 2), (2, 14), (14, 16)], id="long middle"),
        pytest.param(b"abcdefgh\n", 8, [(0, 9)], id="one byte over: alone"),
        pytest.param(b"abcdefg\n", 8, [(0, 8)], id="exactly the limit"),
    ],
)
def test_chunks_cut_at_line_ends(data: bytes, limit: int, expected: list[tuple[int, int]]) -> None:
    got = chunks(data, limit)
    assert got == expected
    assert b"".join(data[a:b] for a, b in got) == data
    for a, b in got:
        assert data[a:b].endswith(b"\n")
        assert b - a <= limit or data[a:b].count(b"\n") == 1


# ---- pipes: no interleaving ----------------------------------------------------------------


def test_two_writers_on_one_fifo_never_interleave_lines(tmp_path: Path) -> None:
    """Two writer threads (one through a FIFO path, one through a '-' descriptor on the
    same FIFO) write batches far over PIPE_BUF; every line arrives whole."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(rfd, True)
    extra_fd = os.open(fifo, os.O_WRONLY)  # the "stdout" of the second writer
    reader = Reader(rfd)  # started once a writer holds the FIFO (else: EOF at once)
    reader.start()
    a = BatchWriter(str(fifo), 1 << 24, "a")
    b = BatchWriter("-", 1 << 24, "b", stdout_fd=extra_fd)
    assert a.atomic_chunks and b.atomic_chunks
    per_writer, per_batch = 600, 50
    for start in range(0, per_writer, per_batch):
        for w, writer in ((0, a), (1, b)):
            batch = b"".join(
                line(w, n, pad=(n * 37) % 300) for n in range(start, start + per_batch)
            )
            assert len(batch) > PIPE_BUF
            assert writer.submit(batch)
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
    assert a.written_lines == b.written_lines == per_writer
    assert a.error_lines == b.error_lines == 0


def test_a_line_longer_than_pipe_buf_is_written_whole(tmp_path: Path) -> None:
    r, w = os.pipe()
    reader = Reader(r)
    reader.start()
    writer = BatchWriter("-", 1 << 20, "long", stdout_fd=w)
    long_line = line(0, 1, pad=3 * PIPE_BUF)
    batch = line(0, 0) + long_line + line(0, 2)
    assert writer.submit(batch)
    assert writer.close(5)
    os.close(w)
    reader.join(5)
    os.close(r)
    assert bytes(reader.data) == batch


# ---- files ---------------------------------------------------------------------------------


def test_file_is_appended_with_mode_0640(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"existing\n")
    writer = BatchWriter(str(path), 1 << 20, "access")
    assert not writer.atomic_chunks
    assert writer.submit(b"one\ntwo\n")
    assert writer.close(5)
    assert path.read_bytes() == b"existing\none\ntwo\n"
    fresh = tmp_path / "new.log"
    os.umask(old := os.umask(0))
    BatchWriter(str(fresh), 1 << 20).close(5)
    assert fresh.stat().st_mode & 0o777 == 0o640 & ~old


def test_reopen_after_rename_sends_later_lines_to_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    writer = BatchWriter(str(path), 1 << 20, "access")
    assert writer.submit(b"before-1\nbefore-2\n")
    assert wait_until(lambda: path.exists() and path.read_bytes().count(b"\n") == 2)
    os.rename(path, rotated)
    assert writer.submit(b"still-old\n")  # not reopened yet: the renamed file gets it
    assert wait_until(lambda: rotated.read_bytes().count(b"\n") == 3)
    writer.reopen()
    assert wait_until(path.exists)
    assert writer.submit(b"after-1\nafter-2\n")
    assert writer.close(5)
    assert rotated.read_bytes() == b"before-1\nbefore-2\nstill-old\n"
    assert path.read_bytes() == b"after-1\nafter-2\n"


def test_reopen_failure_keeps_writing_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    writer = BatchWriter(str(path), 1 << 20, "access")
    os.rename(path, tmp_path / "moved.log")
    directory.rmdir()  # the path cannot be created again
    writer.reopen()
    assert writer.submit(b"kept\n")
    assert writer.close(5)
    assert (tmp_path / "moved.log").read_bytes() == b"kept\n"
    assert writer.error_lines == 0


def test_close_writes_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer = BatchWriter(str(path), 1 << 26, "access")
    batches = [b"".join(line(0, i * 100 + j) for j in range(100)) for i in range(200)]
    for batch in batches:
        assert writer.submit(batch)
    assert writer.close(10)
    assert path.read_bytes() == b"".join(batches)
    assert writer.written_lines == 20000
    assert not writer.submit(b"late\n")  # closed: refused, the caller counts it


def test_unopenable_path_raises_at_construction(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        BatchWriter(str(tmp_path / "missing-dir" / "a.log"), 1 << 20)


# ---- bounds and errors ---------------------------------------------------------------------


def test_max_pending_refuses_batches_when_the_writer_is_behind() -> None:
    """A pipe nobody reads: the thread blocks on a full pipe, batches queue up to
    max_pending, then submit() refuses (never blocks) until the writer catches up."""
    r, w = os.pipe()
    limit = 64 << 10
    writer = BatchWriter("-", limit, "slow", stdout_fd=w)
    batch = b"".join(line(0, i, pad=100) for i in range(100))  # ~12 KiB
    accepted = refused = 0
    start = time.monotonic()
    for _ in range(200):  # ~2.4 MiB offered against a 64 KiB pipe + 64 KiB queue
        if writer.submit(batch):
            accepted += 1
        else:
            refused += 1
    assert time.monotonic() - start < 5  # never blocked on the full pipe
    assert refused > 0 and accepted > 0
    assert writer.pending <= limit
    reader = Reader(r)
    reader.start()
    assert writer.close(10)
    os.close(w)
    reader.join(10)
    os.close(r)
    # Exactly the accepted batches arrived, whole.
    assert bytes(reader.data) == batch * accepted
    assert writer.written_lines == 100 * accepted


def test_write_errors_are_counted_and_the_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r, w = os.pipe()
    os.close(r)  # EPIPE on every write
    writer = BatchWriter("-", 1 << 20, "broken", stdout_fd=w)
    assert writer.submit(b"a\nb\nc\n")
    assert wait_until(lambda: writer.error_lines == 3)
    assert writer.submit(b"d\n")
    assert wait_until(lambda: writer.error_lines == 4)
    assert writer.close(5)
    os.close(w)
    messages = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(messages) == 1  # at most one per ERROR_LOG_INTERVAL
    assert "3 lines dropped" in messages[0]


def test_stdout_and_stderr_are_not_closed_or_reopened() -> None:
    r, w = os.pipe()
    writer = BatchWriter("-", 1 << 20, "out", stdout_fd=w)
    writer.reopen()  # a no-op for a descriptor the writer does not own
    assert writer.submit(b"x\n")
    assert writer.close(5)
    os.write(w, b"y\n")  # still open
    os.close(w)
    assert os.read(r, 100) == b"x\ny\n"
    os.close(r)
    err = BatchWriter("stderr", 1 << 20, "err")
    assert err.fd == 2 and not err.owned
    assert err.close(5)
    os.fstat(2)  # still open
