"""strip_prefix, add_prefix and replace_path_regex: the prefix rules (what compile.py folds
into the route), the regex rewrite through conn.set_upstream_target / add_upstream_headers,
and option errors with key paths. The upstream targets through a gateway are checked in
tests/integration/test_rewrite_gateway.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fastgate._core.httphead import parse_request
from fastgate.errors import ConfigError
from fastgate.middleware.add_prefix import AddPrefix
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.registry import build
from fastgate.middleware.replace_path_regex import ReplacePathRegex
from fastgate.middleware.strip_prefix import StripPrefix, check_prefix


class RecordingConn:
    """The connection calls replace_path_regex makes, recorded."""

    client_ip = "127.0.0.1"
    request_id = b"0" * 32

    def __init__(self) -> None:
        self.targets: list[bytes] = []
        self.upstream_lines: list[bytes] = []

    def set_upstream_target(self, target: bytes) -> None:
        self.targets.append(target)

    def add_upstream_headers(self, lines: bytes) -> None:
        self.upstream_lines.append(lines)


def ctx(target: str) -> RequestContext:
    raw = f"GET {target} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=RecordingConn(), head=head)


# ---- strip_prefix / add_prefix ------------------------------------------------------------


def test_strip_prefix_attributes() -> None:
    mw = build("s", "strip_prefix", {"prefixes": ["/api/v1", "/api", "/b%20c"]})
    assert isinstance(mw, StripPrefix)
    assert mw.strip_prefixes == (b"/api/v1", b"/api", b"/b%20c")
    assert mw.strip_request_headers == (b"x-forwarded-prefix",)
    assert not hasattr(mw, "on_request")  # folded into the route, done in C
    assert mw.stats() == {"prefixes": ["/api/v1", "/api", "/b%20c"]}


def test_add_prefix_attributes() -> None:
    mw = build("a", "add_prefix", {"prefix": "/v2/x_y~"})
    assert isinstance(mw, AddPrefix)
    assert mw.add_prefix == b"/v2/x_y~"
    assert not hasattr(mw, "on_request")


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        pytest.param("api", "must start with /", id="no leading slash"),
        pytest.param("/", "changes nothing", id="slash alone"),
        pytest.param("/api/", "must not end with /", id="trailing slash"),
        pytest.param("/api?x", "no ? or #", id="query"),
        pytest.param("/api#x", "no ? or #", id="fragment"),
        pytest.param("/a%2Fb", "encoded /", id="encoded slash upper"),
        pytest.param("/a%2fb", "encoded /", id="encoded slash lower"),
        pytest.param("/a%5cb", "encoded /", id="encoded backslash"),
        pytest.param("/a%zz", "malformed escape", id="bad escape"),
        pytest.param("/a%2", "malformed escape", id="short escape"),
        pytest.param("/a//b", "empty, . or .. segment", id="empty segment"),
        pytest.param("/a/./b", "empty, . or .. segment", id="dot segment"),
        pytest.param("/a/..", "empty, . or .. segment", id="dot-dot segment"),
        pytest.param("/a b", "visible ASCII", id="space"),
        pytest.param("/a\tb", "visible ASCII", id="tab"),
        pytest.param("/a\r\nX: y", "visible ASCII", id="line break"),
        pytest.param("/caf\u00e9", "visible ASCII", id="non-ASCII"),
        pytest.param('/a"b', "visible ASCII", id="quote is not a path character"),
        pytest.param("/a\\b", "visible ASCII", id="backslash"),
    ],
)
def test_prefix_rules(prefix: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_prefix("prefix", prefix)
    assert info.value.path == "prefix" and why in info.value.reason
    with pytest.raises(ConfigError) as info:
        StripPrefix({"prefixes": ["/ok", prefix]}, "s")
    assert info.value.path == "prefixes[1]"
    with pytest.raises(ConfigError) as info:
        AddPrefix({"prefix": prefix}, "a")
    assert info.value.path == "prefix"


@pytest.mark.parametrize(
    ("options", "path", "why"),
    [
        pytest.param({"prefixes": ["/api", "/api/v1"]}, "prefixes[1]", "never used",
                     id="shadowed by a shorter one"),
        pytest.param({"prefixes": ["/api", "/api"]}, "prefixes[1]", "never used", id="twice"),
        pytest.param({"prefixes": []}, "prefixes", "", id="empty list"),
        pytest.param({"prefixes": "/api"}, "prefixes", "", id="not a list"),
        pytest.param({}, "prefixes", "required", id="missing"),
        pytest.param({"prefixes": ["/a"], "prefix": "/b"}, "prefix", "unknown key",
                     id="unknown key"),
    ],
)  # fmt: skip
def test_strip_prefix_errors(options: dict[str, Any], path: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        StripPrefix(options, "s")
    assert info.value.path == path and why in info.value.reason


def test_strip_prefix_not_shadowed_without_boundary() -> None:
    """`/api` does not match `/apix`, so `/apix` after it is reachable."""
    assert StripPrefix({"prefixes": ["/api", "/apix"]}, "s").strip_prefixes == (b"/api", b"/apix")


@pytest.mark.parametrize(
    ("options", "path"),
    [
        pytest.param({}, "prefix", id="missing"),
        pytest.param({"prefix": ["/a"]}, "prefix", id="not a string"),
        pytest.param({"prefix": "/a", "prefixes": ["/b"]}, "prefixes", id="unknown key"),
    ],
)
def test_add_prefix_errors(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        AddPrefix(options, "a")
    assert info.value.path == path


# ---- replace_path_regex -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "target", "upstream"),
    [
        pytest.param({"regex": "^/old/(.*)", "replacement": r"/new/\1"}, "/old/a?x=1",
                     b"/new/a?x=1", id="query kept"),
        pytest.param({"regex": "^/old/(.*)", "replacement": r"/new/\1"}, "/old/", b"/new/",
                     id="no query"),
        pytest.param({"regex": "^/old/(.*)", "replacement": r"/new/\1"}, "/old/a?", b"/new/a",
                     id="empty query dropped"),
        pytest.param({"regex": "/v1/", "replacement": "/v2/"}, "/a/v1/b/v1/c",
                     b"/a/v2/b/v2/c", id="every match replaced"),
        pytest.param({"regex": r"^/u/(?P<id>\d+)$", "replacement": r"/users/\g<id>/profile"},
                     "/u/42?full", b"/users/42/profile?full", id="named group"),
        pytest.param({"regex": "^/a%20b", "replacement": "/c"}, "/a%20b/x", b"/c/x",
                     id="raw escapes, not decoded"),
    ],
)  # fmt: skip
def test_replace_path(options: dict[str, Any], target: str, upstream: bytes) -> None:
    mw = ReplacePathRegex(options, "r")
    c = ctx(target)
    assert mw.on_request(c) is None
    assert c.conn.targets == [upstream]
    original = target.split("?", 1)[0].encode()
    assert c.conn.upstream_lines == [b"X-Replaced-Path: " + original + b"\r\n"]
    assert mw.stats() == {"rewritten": 1, "refused": 0}


def test_no_match_forwards_unchanged() -> None:
    mw = ReplacePathRegex({"regex": "^/old/", "replacement": "/new/"}, "r")
    c = ctx("/other/old/?x")
    assert mw.on_request(c) is None
    assert c.conn.targets == [] and c.conn.upstream_lines == []


def test_owns_replaced_path_header() -> None:
    mw = build("r", "replace_path_regex", {"regex": "a", "replacement": "b"})
    assert mw.strip_request_headers == (b"x-replaced-path",)


@pytest.mark.parametrize(
    ("options", "target"),
    [
        pytest.param({"regex": "^/", "replacement": ""}, "/a", id="no leading slash"),
        pytest.param({"regex": "^/(.*)", "replacement": r"/\1 x"}, "/a", id="space"),
        pytest.param({"regex": "^/(.*)", "replacement": "/\\1\t"}, "/a", id="tab"),
        pytest.param({"regex": "^/(.*)", "replacement": r"/\1#frag"}, "/a", id="fragment"),
        pytest.param({"regex": "^/(.*)", "replacement": r"/\1?q"}, "/a", id="question mark"),
        pytest.param({"regex": "^/a", "replacement": "/\x00"}, "/a", id="NUL"),
        pytest.param({"regex": "^/a", "replacement": "/x\r\nX-Evil: 1"}, "/a", id="line break"),
        pytest.param({"regex": "^/a", "replacement": "/x\x7f"}, "/a", id="DEL"),
    ],
)  # fmt: skip
def test_bad_rewritten_path(options: dict[str, Any], target: str) -> None:
    mw = ReplacePathRegex(options, "r")
    c = ctx(target)
    reply = mw.on_request(c)
    assert isinstance(reply, LocalReply) and reply.status == 400
    assert json.loads(reply.body) == {"error": "bad rewritten path"}
    assert c.conn.targets == [] and c.conn.upstream_lines == []
    assert mw.stats() == {"rewritten": 0, "refused": 1}


@pytest.mark.parametrize(
    ("options", "path"),
    [
        pytest.param({"regex": "(", "replacement": "/"}, "regex", id="bad regex"),
        pytest.param({"regex": "é", "replacement": "/"}, "regex", id="non-ASCII regex"),
        pytest.param({"regex": "(a)", "replacement": r"/\2"}, "replacement", id="missing group"),
        pytest.param({"regex": "(a)", "replacement": r"/\g<x>"}, "replacement",
                     id="unknown group name"),
        pytest.param({"regex": "a", "replacement": "/é"}, "replacement",
                     id="non-ASCII replacement"),
        pytest.param({"regex": "a"}, "replacement", id="missing replacement"),
        pytest.param({"replacement": "/"}, "regex", id="missing regex"),
        pytest.param({"regex": "a", "replacement": "/", "count": 1}, "count", id="unknown key"),
    ],
)  # fmt: skip
def test_replace_path_errors(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        ReplacePathRegex(options, "r")
    assert info.value.path == path, info.value.errors
