"""The redirect middleware: a fixed `to` (path or URL, the query kept or not), a regex
rewrite of the full URL, the Host check, the Location checks (no open redirect, no header
injection, percent-encoding), and option errors with key paths. Through a gateway:
tests/integration/test_rewrite_gateway.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fastgate._core.httphead import parse_request
from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.redirect import Redirect, location_ok, valid_host
from fastgate.middleware.registry import build


class Conn:
    """The connection attributes redirect reads."""

    client_ip = "127.0.0.1"
    request_id = b"0" * 32

    def __init__(self, proto: str = "http") -> None:
        self.proto = proto


def ctx(target: str, host: str = "example.com", proto: str = "http") -> RequestContext:
    raw = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=Conn(proto), head=head)


def location(reply: LocalReply | None) -> str:
    assert isinstance(reply, LocalReply), reply
    assert reply.body == b""
    assert [name for name, _ in reply.headers] == ["Location"]
    return reply.headers[0][1]


@pytest.mark.parametrize(
    ("options", "target", "status", "expected"),
    [
        pytest.param({"to": "/new"}, "/old?a=1&b=2", 302, "/new?a=1&b=2",
                     id="path keeps the query by default"),
        pytest.param({"to": "/new?x=1", "status": 301}, "/old?a=1", 301, "/new?x=1&a=1",
                     id="query appended to the path's own"),
        pytest.param({"to": "/new#top"}, "/old?a=1", 302, "/new?a=1#top",
                     id="query before the fragment"),
        pytest.param({"to": "/new", "keep_query": False}, "/old?a=1", 302, "/new",
                     id="keep_query off"),
        pytest.param({"to": "/new"}, "/old?", 302, "/new", id="empty query"),
        pytest.param({"to": "/new"}, '/old?q="<x>"', 302, "/new?q=%22%3Cx%3E%22",
                     id="query percent-encoded"),
        pytest.param({"to": "https://other.example/landing", "status": 308}, "/x?a=1", 308,
                     "https://other.example/landing", id="URL drops the query by default"),
        pytest.param({"to": "https://other.example/landing", "keep_query": True}, "/x?a=1",
                     302, "https://other.example/landing?a=1", id="URL keep_query"),
    ],
)  # fmt: skip
def test_to(options: dict[str, Any], target: str, status: int, expected: str) -> None:
    mw = Redirect(options, "r")
    reply = mw.on_request(ctx(target))
    assert reply is not None and reply.status == status
    assert location(reply) == expected
    assert mw.stats()["redirected"] == 1


def test_to_path_never_uses_host() -> None:
    reply = Redirect({"to": "/login"}, "r").on_request(ctx("/x", host="evil.test"))
    assert location(reply) == "/login"


WWW = {"regex": r"^https?://example\.com/(.*)", "replacement": r"https://www.example.com/\1"}


@pytest.mark.parametrize(
    ("options", "target", "host", "proto", "expected"),
    [
        pytest.param(WWW, "/a/b?c=1", "example.com", "http", "https://www.example.com/a/b?c=1",
                     id="www"),
        pytest.param(WWW, "/", "EXAMPLE.com", "https", "https://www.example.com/",
                     id="host lowercased"),
        pytest.param({"regex": r"^(?P<s>https?)://[^/]+/old/(?P<rest>.*)",
                      "replacement": r"\g<s>://new.example/\g<rest>"}, "/old/x", "a.test",
                     "https", "https://new.example/x", id="named groups, scheme from conn"),
        pytest.param({"regex": r"/docs/(.*)$", "replacement": r"/manual/\1"}, "/docs/a b"
                     .replace(" ", "%20"), "a.test", "http", "http://a.test/manual/a%20b",
                     id="partial match keeps the rest, escapes kept"),
        pytest.param({"regex": r"^http://[^/]+(/.*)$", "replacement": r"\1"}, "/p?x=1",
                     "a.test:8080", "http", "/p?x=1", id="to a path"),
        pytest.param({"regex": r"^http://[^/]+/go/(.*)$", "replacement": r"/to/\1 <x>"},
                     '/go/"a"', "a.test", "http", "/to/%22a%22%20%3Cx%3E",
                     id="request data percent-encoded"),
        pytest.param({"regex": r"^http://[^/]+/u/(.*)$", "replacement": "/ü/\\1"},
                     "/u/x", "a.test", "http", "/%C3%BC/x", id="non-ASCII replacement"),
        pytest.param({"regex": r"^http://\[::1\]:81/(.*)$", "replacement": r"/\1"},
                     "/v6", "[::1]:81", "http", "/v6", id="IPv6 host"),
    ],
)  # fmt: skip
def test_regex(options: dict[str, Any], target: str, host: str, proto: str, expected: str) -> None:
    reply = Redirect(options, "r").on_request(ctx(target, host, proto))
    assert reply is not None and reply.status == 302
    assert location(reply) == expected


def test_regex_no_match_continues() -> None:
    mw = Redirect(WWW, "r")
    assert mw.on_request(ctx("/a", host="www.example.com")) is None
    assert mw.stats() == {"redirected": 0, "not_matched": 1}


@pytest.mark.parametrize(
    ("options", "target", "host", "error"),
    [
        pytest.param({"regex": r"^http://[^/]+(/.*)$", "replacement": r"\1"}, "//evil.test/",
                     "a.test", "bad redirect target", id="protocol-relative result"),
        pytest.param({"regex": r"^http://[^/]+/go/(.*)$", "replacement": r"/\1"}, "/go//evil.test",
                     "a.test", "bad redirect target", id="double slash result"),
        pytest.param({"regex": r"^http://[^/]+/go/(.*)$", "replacement": r"\1"},
                     "/go/javascript:alert(1)", "a.test", "bad redirect target",
                     id="javascript scheme"),
        pytest.param({"regex": r"^http://[^/]+/go/(.*)$", "replacement": r"\1"},
                     "/go/https://u@evil.test/", "a.test", "bad redirect target", id="user info"),
        pytest.param(WWW, "/", "a_b.test", "a redirect needs a valid Host", id="underscore host"),
        pytest.param(WWW, "/", "a.test:", "a redirect needs a valid Host", id="empty port"),
        pytest.param(WWW, "/", "-a.test", "a redirect needs a valid Host", id="label hyphen"),
        pytest.param(WWW, "/", "a..test", "a redirect needs a valid Host", id="empty label"),
    ],
)  # fmt: skip
def test_regex_refused(options: dict[str, Any], target: str, host: str, error: str) -> None:
    reply = Redirect(options, "r").on_request(ctx(target, host))
    assert isinstance(reply, LocalReply) and reply.status == 400
    assert json.loads(reply.body) == {"error": error}


def test_backslash_is_encoded() -> None:
    """`/\\host` is read as `//host` by browsers: the `\\` becomes %5C, a plain path."""
    mw = Redirect({"regex": r"^http://[^/]+/go/(.*)$", "replacement": r"/\1"}, "r")
    assert location(mw.on_request(ctx("/go/\\evil.test", "a.test"))) == "/%5Cevil.test"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param("/a", True, id="path"),
        pytest.param("https://a.test:8443/x?y#z", True, id="URL"),
        pytest.param("HTTP://A.test", True, id="scheme case"),
        pytest.param("//a.test", False, id="protocol-relative"),
        pytest.param("/\\a.test", False, id="slash backslash"),
        pytest.param("ftp://a.test/", False, id="other scheme"),
        pytest.param("https:///x", False, id="no host"),
        pytest.param("https://u:p@a.test/", False, id="user info"),
        pytest.param("a/b", False, id="relative"),
        pytest.param("/a\r\nSet-Cookie: x", False, id="line break"),
        pytest.param("/a b", False, id="space"),
        pytest.param("/é", False, id="non-ASCII"),
        pytest.param("", False, id="empty"),
    ],
)
def test_location_ok(value: str, ok: bool) -> None:
    assert location_ok(value) is ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        pytest.param(b"a.test", True, id="name"),
        pytest.param(b"a.test:8080", True, id="name and port"),
        pytest.param(b"10.0.0.1:80", True, id="IPv4"),
        pytest.param(b"[2001:db8::1]:443", True, id="IPv6 and port"),
        pytest.param(b"[2001:db8::1]", True, id="IPv6"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"a.test:123456", False, id="port too long"),
        pytest.param(b"a.test:x", False, id="port not digits"),
        pytest.param(b"a/b", False, id="slash"),
        pytest.param(b"a@b", False, id="at"),
        pytest.param(b"a" * 64 + b".test", False, id="label too long"),
    ],
)
def test_valid_host(host: bytes, ok: bool) -> None:
    assert valid_host(host) is ok


@pytest.mark.parametrize(
    ("options", "path"),
    [
        pytest.param({}, "", id="neither to nor regex"),
        pytest.param({"to": "/a", "regex": "x", "replacement": "y"}, "", id="both"),
        pytest.param({"to": "/a", "replacement": "y"}, "replacement", id="replacement with to"),
        pytest.param({"regex": "x"}, "replacement", id="regex without replacement"),
        pytest.param({"regex": "(", "replacement": "y"}, "regex", id="bad regex"),
        pytest.param({"regex": "(a)", "replacement": r"\2"}, "replacement", id="missing group"),
        pytest.param({"regex": "(a)", "replacement": r"\g<n>"}, "replacement",
                     id="unknown group name"),
        pytest.param({"regex": "(a)", "replacement": "/x\r\nY: z"}, "replacement",
                     id="line break in replacement"),
        pytest.param({"regex": "a", "replacement": "b", "keep_query": True}, "keep_query",
                     id="keep_query with regex"),
        pytest.param({"to": "//evil.test"}, "to", id="protocol-relative to"),
        pytest.param({"to": "javascript:alert(1)"}, "to", id="javascript to"),
        pytest.param({"to": "/a\nb"}, "to", id="line break in to"),
        pytest.param({"to": "https://u@a.test/"}, "to", id="user info in to"),
        pytest.param({"to": "/a", "status": 200}, "status", id="not a redirect status"),
        pytest.param({"to": "/a", "status": "301"}, "status", id="status as text"),
        pytest.param({"to": "/a", "permanent": True}, "permanent", id="unknown key"),
    ],
)  # fmt: skip
def test_config_errors(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        Redirect(options, "r")
    assert info.value.path == path, info.value.errors


def test_registered() -> None:
    assert isinstance(build("r", "redirect", {"to": "/a"}), Redirect)
