"""Message bodies through the real gateway: exact bytes in both directions, every framing.

Request bodies go to the origin's /echo (returned byte for byte) with Content-Length and
chunked framing; response bodies come from /bytes (Content-Length), /chunked (relayed
verbatim, chunk framing and trailer included) and /close (close-delimited). Then the framing
corner cases: bodiless responses (HEAD, 204, 304) that announce a length, interim responses
(100 Continue), and a deep pipeline.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time

import pytest
from conftest import (
    ORIGIN_HOST,
    Client,
    Gateway,
    MiB,
    build_request,
    chunk_encode,
    chunked_body,
    stream_bytes,
)

SIZES = [
    pytest.param(0, id="empty"),
    pytest.param(1, id="1 byte"),
    pytest.param(16 * 1024, id="16 KiB"),
    pytest.param(MiB, id="1 MiB"),
]


@pytest.mark.parametrize("size", SIZES)
def test_get_response_with_content_length(gateway: Gateway, size: int) -> None:
    conn = http.client.HTTPConnection(*gateway.addr, timeout=10)
    conn.request("GET", f"/bytes/{size}", headers={"Host": ORIGIN_HOST})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200
    assert resp.getheader("Content-Length") == str(size)
    assert body == stream_bytes(size)
    # The connection is kept: a second request on it works.
    conn.request("GET", "/echo-path/again", headers={"Host": ORIGIN_HOST})
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"/echo-path/again")
    conn.close()


@pytest.mark.parametrize("size", SIZES)
def test_post_content_length_body_echoed(gateway: Gateway, size: int) -> None:
    body = stream_bytes(size, offset=12345)
    conn = http.client.HTTPConnection(*gateway.addr, timeout=10)
    conn.request("POST", "/echo", body=body, headers={"Host": ORIGIN_HOST})
    resp = conn.getresponse()
    got = resp.read()
    assert resp.status == 200
    assert resp.getheader("Content-Length") == str(size)
    assert got == body
    conn.close()


@pytest.mark.parametrize("size", SIZES)
def test_post_chunked_body_echoed(gateway: Gateway, size: int) -> None:
    body = stream_bytes(size, offset=777)
    with Client(gateway.addr) as c:
        for _ in range(2):  # twice on one connection: the chunked end is found exactly
            c.send(
                build_request("POST", "/echo", {"Transfer-Encoding": "chunked"})
                + chunk_encode(body)
            )
            resp = c.read_response()
            assert resp.status == 200
            assert resp.body == body


def test_chunked_request_body_sent_one_byte_at_a_time(gateway: Gateway) -> None:
    body = b"hello, chunked world"
    data = build_request("POST", "/echo", {"Transfer-Encoding": "chunked"}) + chunk_encode(
        body, (3, 1, 5)
    )
    with Client(gateway.addr) as c:
        for i in range(len(data)):
            c.send(data[i : i + 1])
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == body


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "trailer", [pytest.param(False, id="no trailer"), pytest.param(True, id="trailer")]
)
def test_chunked_response_relayed_verbatim(gateway: Gateway, size: int, trailer: bool) -> None:
    query = "?trailer=1" if trailer else ""
    with Client(gateway.addr) as c:
        resp = c.request("GET", f"/chunked/{size}{query}")
        assert resp.status == 200
        assert resp.header("Transfer-Encoding") == "chunked"
        assert resp.header("Content-Length") is None
        assert resp.raw_body == chunked_body(size, trailer)
        assert resp.body == stream_bytes(size)
        resp = c.request("GET", "/echo-path/after-chunked")
        assert resp.body == b"/echo-path/after-chunked"


@pytest.mark.parametrize("size", SIZES)
def test_close_delimited_response(gateway: Gateway, size: int) -> None:
    with Client(gateway.addr) as c:
        resp = c.request("GET", f"/close/{size}")
        assert resp.status == 200
        assert resp.header("Content-Length") is None
        assert resp.header("Transfer-Encoding") is None
        # The gateway cannot delimit it otherwise either: it says so and closes.
        assert resp.header("Connection") == "close"
        assert resp.body == stream_bytes(size)


@pytest.mark.parametrize(
    ("method", "path", "status", "length"),
    [
        pytest.param("HEAD", "/bytes/100", 200, "100", id="HEAD with Content-Length"),
        pytest.param("HEAD", "/chunked/100", 200, None, id="HEAD with chunked"),
        pytest.param("GET", "/status/204?cl=5", 204, "5", id="204 with Content-Length"),
        pytest.param("GET", "/status/304?cl=100", 304, "100", id="304 with Content-Length"),
        pytest.param("GET", "/status/204", 204, None, id="204 plain"),
        pytest.param(
            "GET",
            "/status/204?cl=5&body=5",
            204,
            "5",
            id="204 with stray body bytes from the origin",
        ),
        pytest.param(
            "GET", "/status/304?body=7", 304, None, id="304 with stray body bytes from the origin"
        ),
    ],
)
def test_bodiless_responses(
    gateway: Gateway, method: str, path: str, status: int, length: str | None
) -> None:
    with Client(gateway.addr) as c:
        c.send(build_request(method, path))
        status_got, _, headers, _ = c.read_head()
        assert status_got == status
        assert dict((k.lower(), v) for k, v in headers).get("content-length") == length
        # Nothing follows the head: no body bytes arrive, not even late.
        c.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        c.sock.settimeout(10)
        assert not c.buf
        resp = c.request("GET", "/echo-path/next")
        assert resp.status == 200
        assert resp.body == b"/echo-path/next"


def test_expect_100_continue_relayed_from_origin(gateway: Gateway) -> None:
    body = stream_bytes(100_000)
    with Client(gateway.addr) as c:
        c.send(
            build_request(
                "POST", "/upload", {"Content-Length": str(len(body)), "Expect": "100-continue"}
            )
        )
        interim = c.read_response(interim=True)
        assert interim.raw_head == b"HTTP/1.1 100 Continue\r\n\r\n"
        c.send(body)
        resp = c.read_response()
        assert resp.status == 200
        doc = resp.json()
        assert doc["continue_sent"] is True
        assert doc["length"] == len(body)
        assert doc["sha256"] == hashlib.sha256(body).hexdigest()
        resp = c.request("GET", "/echo-path/after-continue")
        assert resp.body == b"/echo-path/after-continue"


def test_expect_100_continue_not_invented_by_the_gateway(gateway: Gateway) -> None:
    # /echo never sends 100 Continue: the gateway must not answer it on the origin's behalf,
    # and the client's body sent after a wait (RFC 9110 §10.1.1) still goes through.
    body = b"x" * 1000
    with Client(gateway.addr) as c:
        c.send(
            build_request(
                "POST", "/echo", {"Content-Length": str(len(body)), "Expect": "100-continue"}
            )
        )
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        c.sock.settimeout(10)
        c.send(body)
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == body


def test_one_thousand_pipelined_requests_answered_in_order(gateway: Gateway) -> None:
    n = 1000
    data = b"".join(build_request("GET", f"/echo-path/{i}") for i in range(n))
    start = time.monotonic()
    with Client(gateway.addr, timeout=30) as c:
        c.send(data)  # one write
        for i in range(n):
            resp = c.read_response()
            assert resp.status == 200, i
            assert resp.body == f"/echo-path/{i}".encode()
        # Nothing extra after the last response.
        c.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
    assert time.monotonic() - start < 20


def test_pipelined_requests_with_bodies(gateway: Gateway) -> None:
    # Request bodies in both framings, and large responses with requests queued behind them.
    sizes = (0, 5, 70_000, 1, 300_000)
    data = b""
    expected = []
    for i, k in enumerate(sizes):
        b = stream_bytes(k, offset=k)
        if i % 2:
            data += build_request("POST", "/echo", {"Transfer-Encoding": "chunked"})
            data += chunk_encode(b)
        else:
            data += build_request("POST", "/echo", {"Content-Length": str(len(b))}) + b
        expected.append(b)
        data += build_request("GET", f"/bytes/{2 * MiB + k}")
        expected.append(stream_bytes(2 * MiB + k))
    with Client(gateway.addr) as c:
        c.send(data)
        for b in expected:
            resp = c.read_response()
            assert resp.status == 200
            assert resp.body == b


def test_early_response_after_whole_body_keeps_the_connection(gateway: Gateway) -> None:
    # /early answers 403 as soon as it has the head; the small body was already relayed, so
    # the client connection stays usable (the upstream one, which said close, is not pooled).
    with Client(gateway.addr) as c:
        resp = c.request("POST", "/early", body=b"b" * 100)
        assert resp.status == 403
        assert resp.body == b"forbidden\n"
        assert resp.header("Connection") is None
        assert c.request("POST", "/echo", body=b"next").body == b"next"


def test_early_response_during_the_body_closes_the_connection(gateway: Gateway) -> None:
    # The response comes while half of the body is still unsent: the gateway relays it and
    # closes, since the rest of the body would otherwise be read as the next request.
    with Client(gateway.addr) as c:
        c.send(build_request("POST", "/early", {"Content-Length": str(MiB)}) + b"b" * (MiB // 2))
        resp = c.read_response()
        assert resp.status == 403
        assert resp.body == b"forbidden\n"
        assert resp.header("Connection") == "close"
        assert c.is_closed()


def test_origin_body_longer_than_its_content_length_is_cut(gateway: Gateway) -> None:
    # The origin sends 10 bytes with `Content-Length: 5`: the client gets 5, and the extra
    # bytes are not taken for the next response.
    with Client(gateway.addr) as c:
        resp = c.request("GET", "/status/200?cl=5&body=10")
        assert resp.status == 200
        assert resp.body == b"xxxxx"
        resp = c.request("GET", "/echo-path/after-extra")
        assert resp.status == 200
        assert resp.body == b"/echo-path/after-extra"


def test_deep_pipeline_beyond_the_held_input_bound(gateway: Gateway) -> None:
    # ~600 KiB of pipelined requests: more than the gateway holds before it stops reading, so
    # reading pauses and resumes as responses go out. The client reads while it writes.
    n = 3000
    pad = "p" * 150
    data = b"".join(build_request("GET", f"/echo-path/{i}", {"X-Pad": pad}) for i in range(n))
    assert len(data) > 512 * 1024
    with Client(gateway.addr, timeout=30) as c:
        sender = threading.Thread(target=c.send, args=(data,))
        sender.start()
        for i in range(n):
            resp = c.read_response()
            assert resp.body == f"/echo-path/{i}".encode()
        sender.join(10)


def test_concurrent_clients(gateway: Gateway) -> None:
    errors: list[str] = []

    def client(k: int) -> None:
        try:
            with Client(gateway.addr, timeout=30) as c:
                for i in range(20):
                    body = stream_bytes(k * 97 + i, offset=k)
                    resp = c.request("POST", "/echo", body=body)
                    if resp.status != 200 or resp.body != body:
                        errors.append(f"client {k} request {i}: {resp.status}")
        except Exception as exc:  # reported below, with the others
            errors.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_interim_responses_relayed_before_the_final_one(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(build_request("GET", "/interim"))
        first = c.read_response(interim=True)
        assert first.raw_head == b"HTTP/1.1 100 Continue\r\n\r\n"
        second = c.read_response(interim=True)
        assert second.raw_head == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        final = c.read_response()
        assert final.status == 200
        assert final.body == b"final"
        assert c.request("GET", "/echo-path/next").body == b"/echo-path/next"


def test_response_dribbled_byte_by_byte(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        for _ in range(2):
            resp = c.request("GET", "/dribble")
            assert resp.status == 200
            assert resp.body == b"dribble"


def test_request_head_sent_byte_by_byte(gateway: Gateway) -> None:
    data = build_request("POST", "/echo", body=b"abc") + build_request("GET", "/echo-path/2")
    with Client(gateway.addr) as c:
        for i in range(len(data)):
            c.send(data[i : i + 1])
        assert c.read_response().body == b"abc"
        assert c.read_response().body == b"/echo-path/2"
