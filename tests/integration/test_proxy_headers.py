"""What the origin sees: hop-by-hop headers removed, forwarding headers set, request ids.

The origin's /headers answers with the request head it received (name, value pairs in order),
so every assertion here is on the exact head the gateway wrote upstream (DESIGN.md §2, writer).
"""

from __future__ import annotations

import re

import pytest
from conftest import ORIGIN_HOST, Client, Gateway, assert_error, build_request, get

HEX32 = re.compile(r"^[0-9a-f]{32}$")


class Seen:
    """The head the origin received, from /headers."""

    def __init__(self, doc: dict) -> None:
        self.method = doc["method"]
        self.target = doc["target"]
        self.version = doc["version"]
        self.headers = [(k, v) for k, v in doc["headers"]]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def seen(gateway: Gateway, head: bytes, entrypoint: str = "web") -> Seen:
    with Client(gateway.address(entrypoint)) as c:
        c.send(head)
        resp = c.read_response()
    assert resp.status == 200, resp.body
    return Seen(resp.json())


def seen_headers(gateway: Gateway, headers: dict[str, str], entrypoint: str = "web") -> Seen:
    return seen(gateway, build_request("GET", "/headers", headers), entrypoint)


def test_hop_by_hop_headers_are_not_forwarded(gateway: Gateway) -> None:
    head = (
        b"GET /headers HTTP/1.1\r\n"
        b"Host: origin.test\r\n"
        b"Connection: keep-alive, X-Hop-Named\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Hop-Named: secret\r\n"
        b"X-End-To-End: kept\r\n"
        b"Accept: */*\r\n"
        b"\r\n"
    )
    s = seen(gateway, head)
    for name in (
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-hop-named",
    ):
        assert name not in s.names(), (name, s.headers)
    assert s.all("X-End-To-End") == ["kept"]
    assert s.all("Accept") == ["*/*"]
    assert s.all("Host") == [ORIGIN_HOST]
    assert s.version == "HTTP/1.1"


def test_connection_token_cannot_strip_host_or_framing(gateway: Gateway) -> None:
    body = b"0123456789"
    head = build_request(
        "POST", "/headers", {"Connection": "Host, Content-Length", "Content-Length": "10"}, body
    )
    s = seen(gateway, head)
    assert s.all("Host") == [ORIGIN_HOST]
    assert s.all("Content-Length") == ["10"]


def test_forwarding_headers_added(gateway: Gateway) -> None:
    s = seen_headers(gateway, {})
    assert s.all("X-Forwarded-For") == ["127.0.0.1"]
    assert s.all("X-Forwarded-Proto") == ["http"]
    assert s.all("X-Forwarded-Host") == [ORIGIN_HOST]
    assert s.all("Forwarded") == []


def test_untrusted_peer_forwarding_headers_replaced(gateway: Gateway) -> None:
    s = seen_headers(
        gateway,
        {
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Port": "443",
            "X-Real-IP": "203.0.113.9",
            "Forwarded": "for=203.0.113.9",
        },
    )
    assert s.all("X-Forwarded-For") == ["127.0.0.1"]
    assert s.all("X-Forwarded-Proto") == ["http"]
    assert s.all("X-Forwarded-Host") == [ORIGIN_HOST]
    assert s.all("X-Forwarded-Port") == []
    assert s.all("X-Real-IP") == []
    assert s.all("Forwarded") == []


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param([], "127.0.0.1", id="no chain: the peer"),
        pytest.param(["203.0.113.9"], "203.0.113.9, 127.0.0.1", id="one hop extended"),
        pytest.param(
            ["198.51.100.1, 203.0.113.9"],
            "198.51.100.1, 203.0.113.9, 127.0.0.1",
            id="list extended",
        ),
        pytest.param(
            ["198.51.100.1", "203.0.113.9"],
            "198.51.100.1, 203.0.113.9, 127.0.0.1",
            id="two lines joined and extended",
        ),
    ],
)
def test_trusted_peer_x_forwarded_for_extended(
    gateway: Gateway, sent: list[str], expected: str
) -> None:
    head = b"GET /headers HTTP/1.1\r\nHost: origin.test\r\n"
    for value in sent:
        head += b"X-Forwarded-For: " + value.encode() + b"\r\n"
    s = seen(gateway, head + b"\r\n", entrypoint="trusted")
    assert s.all("X-Forwarded-For") == [expected]


def test_trusted_peer_keeps_proto_and_host_and_adds_forwarded(gateway: Gateway) -> None:
    s = seen_headers(
        gateway, {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example"}, "trusted"
    )
    assert s.all("X-Forwarded-Proto") == ["https"]
    assert s.all("X-Forwarded-Host") == ["api.example"]
    assert s.all("Forwarded") == [f'for=127.0.0.1;proto=http;host="{ORIGIN_HOST}"']


def test_request_id_generated_when_absent(gateway: Gateway) -> None:
    ids = [seen_headers(gateway, {}).all("X-Request-ID") for _ in range(3)]
    for one in ids:
        assert len(one) == 1 and HEX32.match(one[0]), one
    assert len({one[0] for one in ids}) == 3


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param("abc-123", True, id="token kept"),
        pytest.param("req_1.2:3-X", True, id="all allowed characters kept"),
        pytest.param("a" * 128, True, id="128 chars kept"),
        pytest.param("a" * 129, False, id="too long replaced"),
        pytest.param("has space", False, id="space replaced"),
        pytest.param('quote"d', False, id="quote replaced"),
    ],
)
def test_client_request_id(gateway: Gateway, sent: str, kept: bool) -> None:
    got = seen_headers(gateway, {"X-Request-ID": sent}).all("X-Request-ID")
    assert len(got) == 1, got
    if kept:
        assert got == [sent]
    else:
        assert HEX32.match(got[0]), got


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(["a1", "b2"], "a1", id="two valid: the first, once"),
        pytest.param(["a1", "bad id"], "a1", id="valid then invalid: the invalid one dropped"),
        pytest.param(["bad id", "b2"], None, id="invalid first: replaced by a generated id"),
    ],
)
def test_origin_sees_exactly_one_request_id(
    gateway: Gateway, lines: list[str], expected: str | None
) -> None:
    head = b"GET /headers HTTP/1.1\r\nHost: origin.test\r\n"
    head += b"".join(b"X-Request-ID: " + v.encode() + b"\r\n" for v in lines)
    got = seen(gateway, head + b"\r\n").all("X-Request-ID")
    assert len(got) == 1, got
    if expected is None:
        assert HEX32.match(got[0]), got
    else:
        assert got == [expected]


def test_trusted_peer_forwarded_list_extended(gateway: Gateway) -> None:
    s = seen_headers(gateway, {"Forwarded": "for=192.0.2.60;proto=https"}, "trusted")
    assert s.all("Forwarded") == [
        "for=192.0.2.60;proto=https",
        f'for=127.0.0.1;proto=http;host="{ORIGIN_HOST}"',
    ]


def test_client_request_id_in_error_reply(gateway: Gateway) -> None:
    resp = get(gateway.addr, "/x", host="unknown.test", headers={"X-Request-ID": "trace-42"})
    assert resp.status == 404
    assert resp.json()["request_id"] == "trace-42"


def test_error_reply_request_id_generated(gateway: Gateway) -> None:
    assert_error(get(gateway.addr, "/x", host="unknown.test"), 404)


@pytest.mark.parametrize(
    ("target", "origin_target", "host"),
    [
        pytest.param(
            "http://origin.test:8080/headers?q=1&r=2",
            "/headers?q=1&r=2",
            "origin.test:8080",
            id="with port and query",
        ),
        pytest.param("http://origin.test/headers", "/headers", "origin.test", id="no port"),
        pytest.param(
            "HTTP://Origin.Test/headers?",
            "/headers?",
            "Origin.Test",
            id="scheme in capitals, empty query",
        ),
    ],
)
def test_absolute_form_becomes_origin_form(
    gateway: Gateway, target: str, origin_target: str, host: str
) -> None:
    head = f"GET {target} HTTP/1.1\r\nHost: ignored.example\r\nX-Id: 1\r\n\r\n".encode()
    s = seen(gateway, head)
    assert s.target == origin_target
    assert s.all("Host") == [host]
    assert s.all("X-Id") == ["1"]
    assert s.all("X-Forwarded-Host") == [host]


def test_http10_client_keep_alive(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(b"GET /headers HTTP/1.0\r\nHost: origin.test\r\nConnection: keep-alive\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
        s = Seen(resp.json())
        assert s.version == "HTTP/1.0"
        assert s.all("Connection") == ["keep-alive"]
        assert resp.header("Connection") == "keep-alive"
        resp = c.request("GET", "/echo-path/1.1-after-1.0")
        assert resp.body == b"/echo-path/1.1-after-1.0"


def test_http10_client_without_keep_alive_is_closed(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(b"GET /echo-path/ten HTTP/1.0\r\nHost: origin.test\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == b"/echo-path/ten"
        assert c.is_closed()
