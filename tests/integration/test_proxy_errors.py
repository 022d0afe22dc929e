"""Gateway-generated errors: status, JSON body, whether the connection closes, and recovery.

Every case checks the exact status and the `{"error", "request_id"}` body, then that the
gateway still serves a new connection. Malformed requests must also close the connection
(recv returns b"" after the response): after a framing error nothing that follows can be
trusted (RFC 9112 §9.6, §11.2).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    Client,
    Gateway,
    Origin,
    assert_error,
    assert_reply_then_lingering_close,
    assert_serves,
    base_config,
    build_request,
    chunk_encode,
    get,
    wait_for,
)

H = b"Host: origin.test\r\n"


def exchange(addr, data: bytes, head_request: bool = False):
    """Send `data`, read one response; returns (response, closed afterwards)."""
    with Client(addr) as c:
        c.send(data)
        resp = c.read_response(head_request=head_request)
        return resp, c.is_closed(timeout=3)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(
            b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            id="Content-Length with Transfer-Encoding",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n",
            400,
            id="bad chunk size",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhelloXX0\r\n\r\n",
            400,
            id="chunk data without CRLF",
        ),
        pytest.param(
            b"GET /echo HTTP/1.1\r\n" + H + b"X-Folded: a\r\n b\r\n\r\n", 400, id="obs-fold"
        ),
        pytest.param(b"GET /echo HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, id="no Host"),
        pytest.param(b"GET /echo HTTP/1.1\r\n" + H + H + b"\r\n", 400, id="two Hosts"),
        pytest.param(
            b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            id="differing Content-Lengths",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
            400,
            id="negative Content-Length",
        ),
        pytest.param(
            b"GET /echo HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n", 400, id="space in a header name"
        ),
        pytest.param(b"GET  /echo HTTP/1.1\r\n" + H + b"\r\n", 400, id="double space"),
        pytest.param(b"GET /echo HTTP/1.1\n" + H + b"\r\n", 400, id="bare LF"),
        pytest.param(b"GET /echo HTTP/2.0\r\n" + H + b"\r\n", 505, id="HTTP/2.0 version"),
        pytest.param(
            b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n",
            501,
            id="Transfer-Encoding gzip",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            id="Transfer-Encoding gzip, chunked",
        ),
        pytest.param(b"CONNECT origin.test:443 HTTP/1.1\r\n" + H + b"\r\n", 501, id="CONNECT"),
        pytest.param(
            b"GET /echo HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n",
            431,
            id="head over max_head_bytes",
        ),
        pytest.param(
            b"GET /echo HTTP/1.1\r\n"
            + H
            + b"".join(b"X-H%d: v\r\n" % i for i in range(120))
            + b"\r\n",
            431,
            id="more than max_headers",
        ),
        pytest.param(
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
            414,
            id="target over max_target",
        ),
    ],
)
def test_malformed_request_answered_and_closed(gateway: Gateway, data: bytes, status: int) -> None:
    resp, closed = exchange(gateway.addr, data)
    assert_error(resp, status)
    assert resp.header("Connection") == "close"
    assert closed, "the connection must close after a malformed request"
    assert_serves(gateway.addr)


def test_head_larger_than_limit_without_end_is_431(gateway: Gateway) -> None:
    # The head never ends: refused once it passes max_head_bytes, not when it completes.
    with Client(gateway.addr) as c:
        c.send(b"GET /echo HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 17000)
        resp = c.read_response()
        assert_error(resp, 431)
        assert c.is_closed()
    assert_serves(gateway.addr)


def test_malformed_pipelined_request_after_a_good_one(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(build_request("GET", "/echo-path/good") + b"GET /x HTTP/1.1\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == b"/echo-path/good"
        assert_error(c.read_response(), 400)
        assert c.is_closed()


def test_no_route_is_404_and_keeps_the_connection(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        resp = c.request("GET", "/anything", host="unknown.test")
        doc = assert_error(resp, 404)
        assert doc["error"] == "no route"
        assert resp.header("Connection") is None
        # A body-less request that was refused leaves the connection usable.
        resp = c.request("GET", "/echo-path/after-404")
        assert resp.body == b"/echo-path/after-404"


def test_no_route_with_a_body_closes(gateway: Gateway) -> None:
    # The unread body would be taken for the next request: the gateway closes instead.
    resp, closed = exchange(
        gateway.addr, build_request("POST", "/x", body=b"abc", host="unknown.test")
    )
    assert_error(resp, 404)
    assert closed


def test_no_route_head_request_has_no_body(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        resp = c.request("HEAD", "/x", host="unknown.test")
        assert resp.status == 404
        assert int(resp.header("Content-Length")) > 0
        assert c.request("GET", "/echo-path/after-head").body == b"/echo-path/after-head"


@pytest.mark.parametrize(
    ("host", "path", "status", "message"),
    [
        pytest.param("dead.test", "/x", 502, "upstream connect failed", id="connection refused"),
        pytest.param("origin.test", "/reset-head", 502, None, id="reset before the head"),
        pytest.param(
            "origin.test",
            "/garbage",
            502,
            "malformed upstream response",
            id="garbage response head",
        ),
        pytest.param(
            "origin.test",
            "/status/200?cl=abc",
            502,
            "malformed upstream response",
            id="bad Content-Length from the origin",
        ),
    ],
)
def test_upstream_failure_is_502(
    gateway: Gateway, host: str, path: str, status: int, message: str | None
) -> None:
    with Client(gateway.addr) as c:
        resp = c.request("GET", path, host=host)
        doc = assert_error(resp, status)
        if message is not None:
            assert doc["error"] == message
        # The client connection survives an upstream failure of a body-less request.
        assert c.request("GET", "/echo-path/after").body == b"/echo-path/after"
    assert_serves(gateway.addr)


def test_upstream_hang_is_504_after_response_timeout(gateway: Gateway) -> None:
    # hang.test: upstream_response 1 s; the origin would answer after 5 s.
    start = time.monotonic()
    resp = get(gateway.addr, "/sleep/5", host="hang.test")
    elapsed = time.monotonic() - start
    doc = assert_error(resp, 504)
    assert doc["error"] == "upstream timeout"
    assert 0.7 <= elapsed < 3.0, elapsed
    assert_serves(gateway.addr)


def test_upstream_connect_timeout(gateway: Gateway) -> None:
    # blackhole.test: connects hang; upstream_connect is 1 s for that service.
    start = time.monotonic()
    resp = get(gateway.addr, "/x", host="blackhole.test")
    elapsed = time.monotonic() - start
    doc = assert_error(resp, 502)
    assert doc["error"] == "upstream connect timeout"
    assert 0.7 <= elapsed < 3.0, elapsed
    assert_serves(gateway.addr)


def test_upstream_within_response_timeout_is_fine(gateway: Gateway) -> None:
    resp = get(gateway.addr, "/sleep/0.3", host="hang.test")
    assert resp.status == 200
    assert resp.body == b"slept"


def test_upstream_reset_mid_response_aborts_client(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(build_request("GET", "/reset"))
        status, _, headers, _ = c.read_head()
        assert status == 200
        assert dict(headers)["Content-Length"] == str(1 << 20)
        # The body cannot be completed: the client connection is cut short, never padded or
        # reused for the next response.
        got = b""
        with pytest.raises((EOFError, ConnectionResetError)):
            got = c.read_exact(1 << 20)
        assert got == b""
    assert_serves(gateway.addr)


def test_bad_chunked_framing_with_the_head_is_502(gateway: Gateway) -> None:
    # The bad chunk arrives with the head: nothing was sent to the client, so it gets a 502.
    with Client(gateway.addr) as c:
        doc = assert_error(c.request("GET", "/badchunk"), 502)
        assert doc["error"] == "bad chunked framing from upstream"
        assert c.request("GET", "/echo-path/after").body == b"/echo-path/after"


def test_bad_chunked_framing_mid_body_aborts_the_client(gateway: Gateway) -> None:
    # The head and a good chunk were relayed already: the response can only be cut short.
    with Client(gateway.addr) as c:
        c.send(build_request("GET", "/badchunk?late=1"))
        status, _, _, _ = c.read_head()
        assert status == 200
        with pytest.raises((EOFError, ConnectionResetError)):
            c.read_chunked()
        # Only the valid prefix arrived, never the bytes after the bad size line.
        assert b"broken" not in bytes(c.buf)
    assert_serves(gateway.addr)


def test_stalled_head_is_408(gateway: Gateway) -> None:
    # timeouts.head is 1 s in the shared gateway. Timers run on a coarse clock (a tick is a
    # quarter of the shortest client timeout), so the reply may come up to a tick early.
    with Client(gateway.addr) as c:
        c.send(b"GET /echo-path/x HTTP/1.1\r\nHost: or")
        start = time.monotonic()
        resp = c.read_response()
        elapsed = time.monotonic() - start
        assert_error(resp, 408)
        assert 0.7 <= elapsed < 3.0, elapsed
        assert c.is_closed()
    assert_serves(gateway.addr)


def test_stalled_head_after_a_request_is_408(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        assert c.request("GET", "/echo-path/1").status == 200
        c.send(b"GET /echo-path/2 HTTP/1.1\r\n")
        start = time.monotonic()
        assert_error(c.read_response(), 408)
        assert time.monotonic() - start < 3.0
        assert c.is_closed()


def test_idle_connection_without_bytes_is_closed_silently(gateway: Gateway) -> None:
    # No request started: nothing to answer, the connection just closes after head timeout.
    with Client(gateway.addr) as c:
        start = time.monotonic()
        assert c.is_closed(timeout=5)
        assert time.monotonic() - start < 3.0


# ---- a gateway of their own: limits.max_body_bytes 1024; idle, body, upstream_idle 1 s ------


@pytest.fixture(scope="module")
def strict(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg: dict[str, Any] = base_config(
        origin.port,
        limits={"max_body_bytes": 1024},
        timeouts={"body": 1, "upstream_idle": 1, "idle": 1},
    )
    gw = Gateway(cfg, tmp_path_factory.mktemp("strict")).start()
    yield gw
    gw.stop()


def test_content_length_over_limit_is_413(strict: Gateway) -> None:
    resp, closed = exchange(strict.addr, build_request("POST", "/echo", {"Content-Length": "1025"}))
    doc = assert_error(resp, 413)
    assert doc["error"] == "request body too large"
    assert closed
    assert_serves(strict.addr)


def test_413_reaches_a_client_that_keeps_uploading(strict: Gateway) -> None:
    # The gateway answers 413 at the head while the client goes on sending 8 MiB before it
    # reads anything, as an uploader does: the reply must arrive whole, then the close.
    total = 8 << 20
    received = b""
    with socket.create_connection(strict.addr, timeout=10) as sock:
        sock.sendall(build_request("POST", "/echo", {"Content-Length": str(total)}))
        try:
            sock.sendall(b"u" * total)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            pass
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert received.endswith(b"}\n")
    assert_serves(strict.addr)


def test_error_close_lingers_instead_of_resetting(strict: Gateway) -> None:
    # After an error reply the gateway half-closes (FIN) and goes on reading and discarding,
    # so a client still sending is not reset: closing a socket with unread input makes the
    # kernel send RST and drop the reply's unsent bytes on a real network (RFC 9112 §9.6).
    request = build_request("POST", "/echo", {"Content-Length": "100000"}) + b"v" * 1000
    assert_reply_then_lingering_close(strict.addr, request, 413)


def test_content_length_at_limit_passes(strict: Gateway) -> None:
    with Client(strict.addr) as c:
        body = b"z" * 1024
        resp = c.request("POST", "/echo", body=body)
        assert resp.status == 200
        assert resp.body == body


def test_chunked_body_over_limit_is_413(strict: Gateway) -> None:
    body = b"y" * 4000
    resp, closed = exchange(
        strict.addr,
        build_request("POST", "/echo", {"Transfer-Encoding": "chunked"})
        + chunk_encode(body, (500,)),
    )
    assert_error(resp, 413)
    assert closed
    assert_serves(strict.addr)


def test_chunked_body_under_limit_passes(strict: Gateway) -> None:
    body = b"w" * 900
    with Client(strict.addr) as c:
        c.send(
            build_request("POST", "/echo", {"Transfer-Encoding": "chunked"})
            + chunk_encode(body, (100,))
        )
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == body


def test_stalled_request_body_is_408(strict: Gateway, origin: Origin) -> None:
    with Client(strict.addr) as c:
        c.send(build_request("POST", "/echo", {"Content-Length": "100"}) + b"only ten..")
        start = time.monotonic()
        resp = c.read_response()
        elapsed = time.monotonic() - start
        doc = assert_error(resp, 408)
        assert doc["error"] == "request body timeout"
        assert 0.7 <= elapsed < 3.0, elapsed
        assert c.is_closed()
    assert_serves(strict.addr)


def test_stalled_response_body_aborts_the_client(strict: Gateway, origin: Origin) -> None:
    # The head and 100 of 1000 bytes came; then the origin is silent past upstream_idle. The
    # response cannot be completed or replaced: the client connection is cut.
    with Client(strict.addr) as c:
        c.send(build_request("GET", "/stall"))
        status, _, headers, _ = c.read_head()
        assert status == 200
        assert dict(headers)["Content-Length"] == "1000"
        start = time.monotonic()
        with pytest.raises((EOFError, ConnectionResetError)):
            c.read_exact(1000)
        assert 0.7 <= time.monotonic() - start < 3.0
        assert bytes(c.buf) == b"s" * 100
    # ... and the stalled upstream connection is closed, not pooled.
    assert wait_for(lambda: "/stall" not in origin.stats()["inflight"].values(), timeout=2)
    assert_serves(strict.addr)


def test_idle_keep_alive_connection_closed_silently(strict: Gateway) -> None:
    with Client(strict.addr) as c:
        assert c.request("GET", "/echo-path/1").status == 200
        start = time.monotonic()
        assert c.is_closed(timeout=5)
        assert 0.7 <= time.monotonic() - start < 3.0
