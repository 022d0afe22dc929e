"""Bodies are streamed, never buffered whole (DESIGN.md §2): big transfers and a slow reader.

Each test starts its own one-worker gateway so that the worker's memory baseline is clean, and
samples the worker's VmRSS every 50 ms while the transfer runs. Both ends hash what they saw:
the origin hashes the bytes it received or sent, the client hashes what it sent or received.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import (
    BLOCK,
    Client,
    Gateway,
    MiB,
    Origin,
    RssSampler,
    base_config,
    build_request,
    stream_sha256,
)

BIG = 256 * MiB
StartGateway = Callable[[dict[str, Any]], Gateway]


def send_stream(c: Client, n: int, progress: list[int] | None = None) -> str:
    """Send the first n bytes of the origin's deterministic stream; returns their sha256.
    `progress[0]` counts the bytes sent so far."""
    block = memoryview(BLOCK)
    h = hashlib.sha256()
    left = n
    while left:
        piece = block[: min(left, len(block))]
        c.sock.sendall(piece)
        h.update(piece)
        left -= len(piece)
        if progress is not None:
            progress[0] += len(piece)
    return h.hexdigest()


def recv_hashed(c: Client, n: int, h: Any) -> int:
    """Read exactly n body bytes (after what is buffered) into the hash; returns the count."""
    got = 0
    if c.buf:
        take = bytes(c.buf[:n])
        del c.buf[: len(take)]
        h.update(take)
        got = len(take)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while got < n:
        k = c.sock.recv_into(view[: min(len(buf), n - got)])
        if not k:
            raise EOFError(f"closed after {got} of {n} body bytes")
        h.update(view[:k])
        got += k
    return got


@pytest.mark.slow
def test_256_mib_upload_streams_through(origin: Origin, start_gateway: StartGateway) -> None:
    gw = start_gateway(base_config(origin.port))
    start = time.monotonic()
    with RssSampler(gw.worker_pid) as rss, Client(gw.addr, timeout=60) as c:
        c.send(build_request("POST", "/upload", {"Content-Length": str(BIG)}))
        sent_sha = send_stream(c, BIG)
        resp = c.read_response()
    elapsed = time.monotonic() - start
    assert resp.status == 200
    doc = resp.json()
    assert doc["length"] == BIG
    assert doc["sha256"] == sent_sha == stream_sha256(BIG)
    assert rss.growth < 64 * MiB, f"worker RSS grew {rss.growth / MiB:.1f} MiB"
    assert elapsed < 45, elapsed


@pytest.mark.slow
def test_64_mib_chunked_upload_streams_through(origin: Origin, start_gateway: StartGateway) -> None:
    size = 64 * MiB
    gw = start_gateway(base_config(origin.port))
    block = memoryview(BLOCK)
    h = hashlib.sha256()
    with RssSampler(gw.worker_pid) as rss, Client(gw.addr, timeout=60) as c:
        c.send(build_request("POST", "/upload", {"Transfer-Encoding": "chunked"}))
        for _ in range(size // len(block)):
            c.sock.sendall(b"%x\r\n" % len(block))
            c.sock.sendall(block)
            c.sock.sendall(b"\r\n")
            h.update(block)
        c.send(b"0\r\n\r\n")
        resp = c.read_response()
    assert resp.status == 200
    doc = resp.json()
    assert doc["length"] == size
    assert doc["sha256"] == h.hexdigest() == stream_sha256(size)
    assert rss.growth < 64 * MiB, f"worker RSS grew {rss.growth / MiB:.1f} MiB"


@pytest.mark.slow
def test_256_mib_download_streams_through(origin: Origin, start_gateway: StartGateway) -> None:
    gw = start_gateway(base_config(origin.port))
    start = time.monotonic()
    h = hashlib.sha256()
    with RssSampler(gw.worker_pid) as rss, Client(gw.addr, timeout=60) as c:
        c.send(build_request("GET", f"/bytes/{BIG}"))
        status, _, headers, _ = c.read_head()
        assert status == 200
        assert dict(headers)["Content-Length"] == str(BIG)
        assert recv_hashed(c, BIG, h) == BIG
    elapsed = time.monotonic() - start
    stream = origin.stats()["last_stream"]
    assert stream["done"] and stream["sent"] == BIG
    assert h.hexdigest() == stream["sha256"] == stream_sha256(BIG)
    assert rss.growth < 64 * MiB, f"worker RSS grew {rss.growth / MiB:.1f} MiB"
    assert elapsed < 45, elapsed


@pytest.mark.slow
def test_slow_reader_pauses_the_origin(origin: Origin, start_gateway: StartGateway) -> None:
    size = 128 * MiB
    gw = start_gateway(base_config(origin.port))
    h = hashlib.sha256()
    with RssSampler(gw.worker_pid) as rss, Client(gw.addr, timeout=60) as c:
        c.send(build_request("GET", f"/bytes/{size}"))
        status, _, _, _ = c.read_head()
        assert status == 200
        got = 0
        progress = []
        for _ in range(3):
            got += recv_hashed(c, 64 * 1024, h)
            time.sleep(0.5)
            stream = origin.stats()["last_stream"]
            progress.append(stream["sent"])
            # The origin is held back: its transport is paused, far from the end.
            assert stream["paused"], stream
            assert not stream["done"]
            assert stream["sent"] < size // 2, stream
        # While the client sleeps the origin sends (almost) nothing more: back-pressure, not
        # buffering. Each 64 KiB read lets about that much through, give or take a window.
        assert progress[-1] - progress[0] < 8 * MiB, progress
        assert rss.growth < 32 * MiB, f"worker RSS grew {rss.growth / MiB:.1f} MiB"
        got += recv_hashed(c, size - got, h)
    assert got == size
    stream = origin.stats()["last_stream"]
    assert stream["done"] and stream["sent"] == size
    assert h.hexdigest() == stream["sha256"] == stream_sha256(size)
    assert rss.growth < 32 * MiB, f"worker RSS grew {rss.growth / MiB:.1f} MiB"


@pytest.mark.slow
def test_origin_not_reading_pauses_the_uploader(
    origin: Origin, start_gateway: StartGateway
) -> None:
    # The request direction: the origin stops reading the body for 2 s, so the gateway must
    # stop reading the client (the client's sends block) instead of buffering the body.
    size = 128 * MiB
    gw = start_gateway(base_config(origin.port))
    sent = [0]
    result: list[str] = []
    with RssSampler(gw.worker_pid) as rss, Client(gw.addr, timeout=60) as c:
        c.send(build_request("POST", "/upload?pause=2", {"Content-Length": str(size)}))
        t = threading.Thread(target=lambda: result.append(send_stream(c, size, sent)))
        t.start()
        time.sleep(0.8)
        first = sent[0]
        time.sleep(0.5)
        second = sent[0]
        assert second < size // 2, second
        assert second - first <= 2 * MiB, (first, second)
        assert rss.growth < 32 * MiB, f"worker RSS grew {rss.growth / MiB:.1f} MiB"
        t.join(40)
        assert result, "the upload did not finish"
        resp = c.read_response()
    assert resp.status == 200
    doc = resp.json()
    assert doc["length"] == size
    assert doc["sha256"] == result[0] == stream_sha256(size)
    assert rss.growth < 64 * MiB, f"worker RSS grew {rss.growth / MiB:.1f} MiB"
