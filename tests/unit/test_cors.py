"""The cors middleware: preflights answered (204 with the allowed headers, or 403), actual
requests get Access-Control-Allow-Origin through conn.add_response_headers, origin matching
(exact, wildcard subdomain, `*`, `null`), and option errors with key paths. The whole path
through a gateway is in tests/integration/test_cors_gateway.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fastgate._core.httphead import parse_request
from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.cors import OWNED_RESPONSE_HEADERS, Cors
from fastgate.middleware.registry import build

APP = "https://app.example.com"
BASE: dict[str, Any] = {"allow_origins": [APP, "https://*.example.org", "http://localhost:3000"]}


class RecordingConn:
    """The part of the connection cors uses: it records the response header lines."""

    client_ip = "127.0.0.1"
    request_id = b"0" * 32

    def __init__(self) -> None:
        self.response_lines: list[bytes] = []

    def add_response_headers(self, lines: bytes) -> None:
        self.response_lines.append(lines)


def ctx(method: str = "GET", headers: dict[str, str] | None = None) -> RequestContext:
    lines = [f"{method} /api HTTP/1.1", "Host: api.test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=RecordingConn(), head=head)


def preflight(
    origin: str = APP, method: str = "PUT", req_headers: str | None = None, **extra: str
) -> RequestContext:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if req_headers is not None:
        headers["Access-Control-Request-Headers"] = req_headers
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return ctx("OPTIONS", headers)


def reply_headers(reply: LocalReply) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in reply.headers:
        assert name not in out, f"{name} twice"
        out[name] = value
    return out


def cors(**options: Any) -> Cors:
    return Cors({**BASE, **options}, "cors")


# ---- actual requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "origin", "lines"),
    [
        pytest.param({}, APP, b"Access-Control-Allow-Origin: https://app.example.com\r\n",
                     id="exact origin echoed"),
        pytest.param({}, "HTTPS://App.Example.COM",
                     b"Access-Control-Allow-Origin: HTTPS://App.Example.COM\r\n",
                     id="case-insensitive match, echoed as sent"),
        pytest.param({}, "https://a.b.example.org",
                     b"Access-Control-Allow-Origin: https://a.b.example.org\r\n",
                     id="wildcard subdomain"),
        pytest.param({"allow_credentials": True, "expose_headers": ["X-Total", "X-Page"]},
                     "http://localhost:3000",
                     b"Access-Control-Allow-Origin: http://localhost:3000\r\n"
                     b"Access-Control-Allow-Credentials: true\r\n"
                     b"Access-Control-Expose-Headers: X-Total, X-Page\r\n",
                     id="credentials and exposed headers"),
        pytest.param({"allow_origins": ["*"]}, "https://any.test",
                     b"Access-Control-Allow-Origin: *\r\n", id="star without credentials"),
        pytest.param({"allow_origins": ["https://app.example.com:443"]}, APP,
                     b"Access-Control-Allow-Origin: https://app.example.com\r\n",
                     id="default port in the config is dropped"),
    ],
)  # fmt: skip
def test_actual_request_allowed(options: dict[str, Any], origin: str, lines: bytes) -> None:
    mw = cors(**options)
    c = ctx("GET", {"Origin": origin})
    assert mw.on_request(c) is None
    assert c.conn.response_lines == [lines]
    assert mw.stats()["actual_allowed"] == 1


@pytest.mark.parametrize(
    ("options", "headers"),
    [
        pytest.param({}, {}, id="no Origin"),
        pytest.param({}, {"Origin": "https://evil.test"}, id="other origin"),
        pytest.param({}, {"Origin": "http://app.example.com"}, id="other scheme"),
        pytest.param({}, {"Origin": "https://app.example.com:8443"}, id="other port"),
        pytest.param({}, {"Origin": "https://example.org"}, id="wildcard needs a subdomain"),
        pytest.param({}, {"Origin": "https://x.example.org.evil.test"}, id="wildcard suffix"),
        pytest.param({}, {"Origin": "https://x_y.example.org"}, id="wildcard bad label"),
        pytest.param({}, {"Origin": "null"}, id="null not listed"),
        pytest.param({"allow_origins": ["*"]}, {"Origin": "null"}, id="null not through star"),
        pytest.param({}, {"Origin": "https://app.example.com/"}, id="trailing slash"),
        pytest.param({}, {"Origin": "https://app.example.com\xe9"}, id="non-ASCII"),
        pytest.param({}, {"Origin": APP, "Access-Control-Request-Method": "PUT"},
                     id="GET with ACRM is an actual request"),
    ],
)  # fmt: skip
def test_actual_request_untouched(options: dict[str, Any], headers: dict[str, str]) -> None:
    mw = cors(**options)
    c = ctx("GET", headers)
    assert mw.on_request(c) is None
    expected = 1 if headers.get("Origin") == APP else 0
    assert len(c.conn.response_lines) == expected
    assert mw.stats()["preflight_allowed"] == mw.stats()["preflight_refused"] == 0


def test_null_listed_literally() -> None:
    mw = cors(allow_origins=["null"])
    c = ctx("POST", {"Origin": "null"})
    assert mw.on_request(c) is None
    assert c.conn.response_lines == [b"Access-Control-Allow-Origin: null\r\n"]


def test_options_without_request_method_is_an_actual_request() -> None:
    c = ctx("OPTIONS", {"Origin": APP})
    assert cors().on_request(c) is None
    assert c.conn.response_lines == [b"Access-Control-Allow-Origin: https://app.example.com\r\n"]


def test_static_lines_and_owned_headers() -> None:
    mw = build("c", "cors", BASE)
    assert isinstance(mw, Cors)
    assert mw.response_header_lines == b"Vary: Origin\r\n"
    assert mw.strip_response_headers == OWNED_RESPONSE_HEADERS
    assert b"access-control-allow-origin" in mw.strip_response_headers
    assert all(name == name.lower() for name in mw.strip_response_headers)


# ---- preflights ---------------------------------------------------------------------------

VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


@pytest.mark.parametrize(
    ("options", "request_ctx", "expected"),
    [
        pytest.param({"allow_methods": ["GET", "PUT"]}, preflight(), {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Allow-Methods": "GET, PUT",
            "Access-Control-Max-Age": "600",
            "Vary": VARY,
        }, id="method allowed, no headers asked"),
        pytest.param({"allow_methods": ["PUT"], "allow_headers": ["Content-Type", "X-Ver"],
                      "max_age": 60, "allow_credentials": True},
                     preflight(req_headers="x-ver, content-type"), {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Allow-Methods": "PUT",
            "Access-Control-Allow-Headers": "x-ver, content-type",
            "Access-Control-Max-Age": "60",
            "Access-Control-Allow-Credentials": "true",
            "Vary": VARY,
        }, id="headers echoed, credentials"),
        pytest.param({"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"]},
                     preflight("https://x.test", "PURGE", "x-a,X-B"), {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "PURGE",
            "Access-Control-Allow-Headers": "x-a, x-b",
            "Access-Control-Max-Age": "600",
            "Vary": VARY,
        }, id="star everything"),
        pytest.param({"allow_methods": ["PUT"], "allow_headers": ["*", "Authorization"]},
                     preflight(req_headers="authorization, x-any"), {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Allow-Methods": "PUT",
            "Access-Control-Allow-Headers": "authorization, x-any",
            "Access-Control-Max-Age": "600",
            "Vary": VARY,
        }, id="star headers with Authorization listed"),
        pytest.param({"allow_methods": ["PUT"], "allow_private_network": True},
                     preflight(access_control_request_private_network="true"), {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Allow-Methods": "PUT",
            "Access-Control-Max-Age": "600",
            "Access-Control-Allow-Private-Network": "true",
            "Vary": VARY,
        }, id="private network"),
    ],
)  # fmt: skip
def test_preflight_allowed(
    options: dict[str, Any], request_ctx: RequestContext, expected: dict[str, str]
) -> None:
    mw = cors(**options)
    reply = mw.on_request(request_ctx)
    assert isinstance(reply, LocalReply)
    assert reply.status == 204 and reply.body == b""
    assert reply_headers(reply) == expected
    assert request_ctx.conn.response_lines == []
    assert mw.stats()["preflight_allowed"] == 1


@pytest.mark.parametrize(
    ("options", "request_ctx", "reason"),
    [
        pytest.param({}, preflight("https://evil.test", "GET"), "origin not allowed",
                     id="origin"),
        pytest.param({}, preflight("null", "GET"), "origin not allowed", id="null origin"),
        pytest.param({}, preflight(method="DELETE"), "method not allowed", id="method"),
        pytest.param({}, preflight(method="get"), "method not allowed",
                     id="methods are case-sensitive"),
        pytest.param({}, preflight(method="GET", req_headers="x-custom"), "header not allowed",
                     id="header beyond the safelisted ones"),
        pytest.param({"allow_headers": ["X-A"]}, preflight(method="GET", req_headers="x-a, x-b"),
                     "header not allowed", id="one header of two"),
        pytest.param({"allow_headers": ["*"]}, preflight(method="GET", req_headers="authorization"),
                     "header not allowed", id="star never covers Authorization"),
        pytest.param({"allow_headers": ["*"]}, preflight(method="GET", req_headers="x-a, b\"c"),
                     "header not allowed", id="header name not a token"),
        pytest.param({"allow_methods": ["*"], "allow_origins": ["*"]},
                     preflight(method="BAD(METHOD)"), "method not allowed",
                     id="star method needs a token"),
        pytest.param({}, preflight(method="GET", access_control_request_private_network="true"),
                     "private network access not allowed", id="private network off"),
    ],
)  # fmt: skip
def test_preflight_refused(
    options: dict[str, Any], request_ctx: RequestContext, reason: str
) -> None:
    mw = cors(**options)
    reply = mw.on_request(request_ctx)
    assert isinstance(reply, LocalReply)
    assert reply.status == 403
    assert json.loads(reply.body) == {"error": f"CORS preflight refused: {reason}"}
    headers = reply_headers(reply)
    assert headers == {"Vary": VARY}  # no Access-Control-Allow-Origin at all
    assert mw.stats()["preflight_refused"] == 1


def test_preflight_counts_and_never_reaches_conn() -> None:
    mw = cors(allow_methods=["PUT"])
    for _ in range(3):
        c = preflight()
        assert mw.on_request(c).status == 204
        assert c.conn.response_lines == []
    assert mw.stats() == {"preflight_allowed": 3, "preflight_refused": 0, "actual_allowed": 0}


# ---- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "path"),
    [
        pytest.param({"allow_origins": ["*"], "allow_credentials": True}, "allow_credentials",
                     id="star origin with credentials"),
        pytest.param({"allow_headers": ["*"], "allow_credentials": True}, "allow_headers[0]",
                     id="star headers with credentials"),
        pytest.param({"expose_headers": ["*"], "allow_credentials": True}, "expose_headers[0]",
                     id="star expose with credentials"),
        pytest.param({"allow_methods": ["*"], "allow_credentials": True}, "allow_methods[0]",
                     id="star methods with credentials"),
        pytest.param({"allow_methods": ["GET", "*"]}, "allow_methods[1]", id="star not alone"),
        pytest.param({"allow_origins": ["*", APP]}, "allow_origins", id="star origin not alone"),
        pytest.param({"allow_origins": []}, "allow_origins", id="no origin"),
        pytest.param({"allow_origins": "https://a.test"}, "allow_origins", id="not a list"),
        pytest.param({"allow_origins": [APP, "app.example.com"]}, "allow_origins[1]",
                     id="no scheme"),
        pytest.param({"allow_origins": ["https://a.test/"]}, "allow_origins[0]",
                     id="trailing slash"),
        pytest.param({"allow_origins": ["https://a.test/x"]}, "allow_origins[0]", id="path"),
        pytest.param({"allow_origins": ["https://u@a.test"]}, "allow_origins[0]",
                     id="user info"),
        pytest.param({"allow_origins": ["https://a.test:99999"]}, "allow_origins[0]",
                     id="port out of range"),
        pytest.param({"allow_origins": ["https://*.com"]}, "allow_origins[0]",
                     id="wildcard on a top-level domain"),
        pytest.param({"allow_origins": ["https://a.*.com"]}, "allow_origins[0]",
                     id="wildcard inside"),
        pytest.param({"allow_origins": ["https://a.test\r\nX: y"]}, "allow_origins[0]",
                     id="line break"),
        pytest.param({"allow_origins": [APP, "HTTPS://APP.example.com"]}, "allow_origins[1]",
                     id="listed twice"),
        pytest.param({"allow_headers": ["X A"]}, "allow_headers[0]", id="header not a token"),
        pytest.param({"allow_methods": ["GET", "GET"]}, "allow_methods[1]",
                     id="method twice"),
        pytest.param({"max_age": -1}, "max_age", id="negative max_age"),
        pytest.param({"max_age": 86401}, "max_age", id="max_age over a day"),
        pytest.param({"allow_credentials": "yes"}, "allow_credentials", id="not a bool"),
        pytest.param({"allow_origin": [APP]}, "allow_origin", id="unknown key"),
    ],
)  # fmt: skip
def test_config_errors(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        Cors({**BASE, **options}, "cors")
    assert info.value.path == path, info.value.errors


def test_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        Cors({**BASE, "allow_origin": [APP]}, "cors")
    assert "allow_origins" in info.value.reason
