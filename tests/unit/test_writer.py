"""Head writers: what the next hop receives for a parsed head (writer.pyx)."""

import json

import pytest

from fastgate._core.httphead import parse_request, parse_response
from fastgate._core.writer import (
    ForwardInfo,
    _build_error_reply,
    _build_request_head,
    _build_response_head,
    _client_request_id,
)

UNTRUSTED = ForwardInfo(b"192.0.2.7")
TRUSTED = ForwardInfo(b"10.0.0.1", b"https", True, True)


def upstream(raw: bytes, fi: ForwardInfo = UNTRUSTED, rid: bytes = b"r1") -> list[bytes]:
    head, _ = parse_request(raw)
    kept = _client_request_id(head)
    out = _build_request_head(head, fi, kept or rid, kept is not None)
    assert isinstance(out, bytes) and out.endswith(b"\r\n\r\n")
    return out[:-4].split(b"\r\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n",
            [
                b"GET /a?b=1 HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: x",
                b"User-Agent: t",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x",
                b"X-Request-ID: r1",
            ],
            id="plain GET gains forwarding headers and a request id",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
            b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\n\r\n",
            [
                b"GET / HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: x",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x",
                b"X-Request-ID: r1",
            ],
            id="hop-by-hop and Connection-named headers dropped",
        ),
        pytest.param(
            b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            [
                b"POST /u HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: x",
                b"Content-Length: 5",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x",
                b"X-Request-ID: r1",
            ],
            id="identical duplicate Content-Length forwarded once",
        ),
        pytest.param(
            b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n"
            b"Transfer-Encoding: Chunked\r\n\r\n",
            [
                b"POST /u HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x",
                b"X-Request-ID: r1",
            ],
            id="empty Transfer-Encoding element not passed on",
        ),
        pytest.param(
            b"GET /p HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"X-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\r\n",
            [
                b"GET /p HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: x",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x",
                b"X-Request-ID: r1",
            ],
            id="forwarding headers from an untrusted peer replaced",
        ),
        pytest.param(
            b"GET http://api.example:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n",
            [
                b"GET /p?q HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: api.example:8080",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: api.example:8080",
                b"X-Request-ID: r1",
            ],
            id="absolute-form becomes origin-form with Host from the authority",
        ),
        pytest.param(
            b"GET / HTTP/1.0\r\n\r\n",
            [
                b"GET / HTTP/1.0",
                b"X-Forwarded-For: 192.0.2.7",
                b"X-Forwarded-Proto: http",
                b"X-Request-ID: r1",
                b"Connection: keep-alive",
            ],
            id="HTTP/1.0 client goes upstream as 1.0 with keep-alive",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc-123\r\nX-Request-ID: dup\r\n\r\n",
            [
                b"GET / HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: x",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x",
                b"X-Request-ID: abc-123",
            ],
            id="a valid client request id is kept, once",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: bad id\r\n\r\n",
            [
                b"GET / HTTP/1.1",
                b"X-Forwarded-For: 192.0.2.7",
                b"Host: x",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x",
                b"X-Request-ID: r1",
            ],
            id="an unsafe client request id is replaced",
        ),
    ],
)
def test_upstream_request_head(raw: bytes, expected: list[bytes]) -> None:
    assert upstream(raw) == expected


def test_trusted_proxy_chain_is_extended_and_forwarded_added() -> None:
    lines = upstream(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1, 2.2.2.2\r\n"
        b"X-Forwarded-Proto: https\r\n\r\n",
        TRUSTED,
    )
    assert lines[1] == b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.1"
    assert b"X-Forwarded-Proto: https" in lines
    assert lines.count(b"X-Forwarded-Proto: https") == 1
    assert b'Forwarded: for=10.0.0.1;proto=https;host="x"' in lines


def test_upgrade_is_forwarded_with_its_connection_token() -> None:
    lines = upstream(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert lines[-2:] == [b"Connection: upgrade", b"Upgrade: websocket"]


@pytest.mark.parametrize(
    ("raw", "head_request", "kwargs", "expected"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 5\r\n\r\n",
            False,
            {"tail": b"hello"},
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            id="hop-by-hop dropped, body start in the same bytes",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            False,
            {"close": True},
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
            id="duplicate length once; close announced",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            True,
            {},
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            id="HEAD response keeps the resource length",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            False,
            {"keep_alive_10": True},
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
            id="chunked; keep-alive spelled out for a 1.0 client",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n",
            False,
            {"upgrade": True},
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket"
            b"\r\n\r\n",
            id="101 keeps its upgrade headers",
        ),
    ],
)
def test_client_response_head(raw: bytes, head_request: bool, kwargs: dict, expected: bytes):
    head, _ = parse_response(raw, head_request)
    assert _build_response_head(head, **kwargs) == expected


def test_error_reply_is_short_json_with_the_request_id() -> None:
    raw = _build_error_reply(502, 'upstream "x" failed', b"rid9", True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"error": "upstream 'x' failed", "request_id": "rid9"}
    assert b"\r\nX-Request-ID: rid9\r\n" in head + b"\r\n"  # the header too, not only the body
    assert _build_error_reply(404, "no route", b"r", False, True).endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("strip", "kept"),
    [
        pytest.param(None, [b"X-User: forged", b"Authorization: Basic x", b"x-user: again"],
                     id="nothing stripped"),
        pytest.param((b"x-user",), [b"Authorization: Basic x"], id="every copy, any case"),
        pytest.param((b"x-user", b"authorization"), [], id="several names"),
        pytest.param((b"x-use",), [b"X-User: forged", b"Authorization: Basic x", b"x-user: again"],
                     id="a prefix is not a match"),
    ],
)  # fmt: skip
def test_stripped_headers_and_extra_lines(strip: tuple[bytes, ...] | None, kept: list) -> None:
    raw = (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-User: forged\r\nAuthorization: Basic x\r\n"
        b"x-user: again\r\n\r\n"
    )
    head, _ = parse_request(raw)
    out = _build_request_head(head, UNTRUSTED, b"r1", False, b"X-User: alice\r\n", strip)
    lines = out[:-4].split(b"\r\n")
    names = (b"x-user:", b"authorization:")
    assert [line for line in lines[:-1] if line.lower().startswith(names)] == kept
    assert lines[-1] == b"X-User: alice"  # the middleware's line comes last, always


def test_response_head_with_route_headers() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nServer: origin/1.0\r\nX-Frame-Options: ALLOWALL\r\n"
           b"Content-Length: 2\r\n\r\n")  # fmt: skip
    head, _ = parse_response(raw)
    out = _build_response_head(
        head, extra=b"X-Frame-Options: DENY\r\n", strip=(b"x-frame-options", b"server")
    )
    lines = out[:-4].split(b"\r\n")
    assert lines == [b"HTTP/1.1 200 OK", b"Content-Length: 2", b"X-Frame-Options: DENY"]
    # Without a route's headers the head is as before.
    plain = _build_response_head(head)
    assert b"Server: origin/1.0" in plain and b"ALLOWALL" in plain
