"""security_headers and redirect_https: what they put on responses and redirects, and the
config errors they refuse with key paths. The C side (writer) is tested in test_writer.py;
the whole path through a gateway in tests/integration/test_response_headers_gateway.py."""

from __future__ import annotations

from typing import Any

import pytest

from fastgate._core.httphead import parse_request
from fastgate.config.compile import response_headers
from fastgate.errors import ConfigError
from fastgate.middleware.base import RequestContext
from fastgate.middleware.redirect_https import RedirectHttps
from fastgate.middleware.security_headers import SecurityHeaders


def lines(mw: SecurityHeaders) -> list[str]:
    return mw.response_header_lines.decode("latin-1").split("\r\n")[:-1]


def test_defaults() -> None:
    mw = SecurityHeaders({}, "s")
    assert lines(mw) == [
        "Strict-Transport-Security: max-age=31536000",
        "X-Content-Type-Options: nosniff",
        "X-Frame-Options: DENY",
        "Referrer-Policy: strict-origin-when-cross-origin",
    ]
    assert mw.on_request is None  # nothing per request
    assert b"strict-transport-security" in mw.strip_response_headers


@pytest.mark.parametrize(
    "options, expected, absent",
    [
        pytest.param(
            {"hsts": {"max_age": 63072000, "include_subdomains": True, "preload": True}},
            "Strict-Transport-Security: max-age=63072000; includeSubDomains; preload",
            None,
            id="hsts preload",
        ),
        pytest.param({"hsts": False}, None, "Strict-Transport-Security", id="hsts off"),
        pytest.param({"frame_options": "SAMEORIGIN"}, "X-Frame-Options: SAMEORIGIN", None,
                     id="sameorigin"),
        pytest.param({"frame_options": False}, None, "X-Frame-Options", id="frame options off"),
        pytest.param({"content_security_policy": "default-src 'none'"},
                     "Content-Security-Policy: default-src 'none'", None, id="csp"),
        pytest.param({"headers": {"X-Robots-Tag": "noindex"}}, "X-Robots-Tag: noindex", None,
                     id="custom header"),
    ],
)  # fmt: skip
def test_options(options: dict[str, Any], expected: str | None, absent: str | None) -> None:
    got = lines(SecurityHeaders(options, "s"))
    if expected is not None:
        assert expected in got
    if absent is not None:
        assert not [line for line in got if line.startswith(absent + ":")]


def test_remove_and_route_collection() -> None:
    a = SecurityHeaders({"remove": ["Server", "X-Powered-By"]}, "a")
    b = SecurityHeaders({"hsts": False, "headers": {"X-Extra": "1"}}, "b")
    joined, strip = response_headers((a, object(), b))
    assert joined == a.response_header_lines + b.response_header_lines
    assert b"server" in strip and b"x-powered-by" in strip and b"x-extra" in strip
    assert response_headers((object(),)) == (None, ())


@pytest.mark.parametrize(
    "options, path, words",
    [
        pytest.param({"hsts": {"max_age": 600, "preload": True}}, "hsts.preload", "max_age",
                     id="preload needs a year and subdomains"),
        pytest.param({"hsts": {"max_age": -1}}, "hsts.max_age", "greater", id="negative age"),
        pytest.param({"frame_options": "ALLOW-FROM x"}, "frame_options", "DENY",
                     id="frame option value"),
        pytest.param({"headers": {"Bad Name": "x"}}, "headers.Bad Name", "header name",
                     id="bad header name"),
        pytest.param({"headers": {"X-A": "a\r\nSet-Cookie: x"}}, "headers.X-A",
                     "control characters", id="CRLF in a value"),
        pytest.param({"headers": {"Content-Length": "0"}}, "headers.Content-Length", "framing",
                     id="framing header"),
        pytest.param({"headers": {"x-frame-options": "SAMEORIGIN"}}, "headers.x-frame-options",
                     "already set", id="twice"),
        pytest.param({"remove": ["Transfer-Encoding"]}, "remove[0]", "framing",
                     id="cannot remove framing"),
        pytest.param({"hsts": {"maxage": 1}}, "hsts.maxage", "did you mean", id="typo"),
    ],
)  # fmt: skip
def test_config_errors(options: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        SecurityHeaders(options, "s")
    (where, why), *_ = err.value.errors
    assert where == path and words in why


class Conn:
    def __init__(self, proto: str) -> None:
        self.proto = proto


def ask(mw: RedirectHttps, raw: bytes, proto: str = "http") -> Any:
    head, _ = parse_request(raw)
    assert head is not None
    return mw.on_request(RequestContext(conn=Conn(proto), head=head))


@pytest.mark.parametrize(
    "raw, options, status, location",
    [
        pytest.param(b"GET /a?b=1 HTTP/1.1\r\nHost: ex.test\r\n\r\n", {}, 301,
                     "https://ex.test/a?b=1", id="GET keeps path and query"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: ex.test:8080\r\n\r\n", {}, 301,
                     "https://ex.test/", id="the plain port is dropped"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: ex.test\r\n\r\n", {"port": 8443}, 301,
                     "https://ex.test:8443/", id="a non-default https port"),
        pytest.param(b"POST /f HTTP/1.1\r\nHost: ex.test\r\nContent-Length: 0\r\n\r\n", {}, 308,
                     "https://ex.test/f", id="POST keeps its method"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", {"permanent": False}, 302,
                     "https://[::1]/", id="IPv6 literal, temporary"),
        pytest.param(b"DELETE /x HTTP/1.1\r\nHost: a.b\r\n\r\n", {"permanent": False}, 307,
                     "https://a.b/x", id="temporary, method kept"),
    ],
)  # fmt: skip
def test_redirects(raw: bytes, options: dict[str, Any], status: int, location: str) -> None:
    reply = ask(RedirectHttps(options, "r"), raw)
    assert reply.status == status
    assert dict(reply.headers)["Location"] == location


def test_https_passes_and_bad_host_is_400() -> None:
    mw = RedirectHttps({}, "r")
    assert ask(mw, b"GET / HTTP/1.1\r\nHost: ex.test\r\n\r\n", proto="https") is None
    assert ask(mw, b"GET / HTTP/1.1\r\nHost: ex_test.evil\r\n\r\n").status == 400
    assert ask(mw, b"GET / HTTP/1.0\r\n\r\n").status == 400  # no Host at all
