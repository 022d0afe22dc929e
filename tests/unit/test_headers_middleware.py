"""The `headers` middleware: the lines and names it compiles to, the config errors it refuses
with key paths, and how compile.py puts it on the route (Route.extra_headers / strip_headers /
response_headers / response_strip). The whole path through a gateway is in
tests/integration/test_headers_gateway.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastgate._core.conn import Engine

from fastgate.config.compile import compile_runtime, request_headers, response_headers
from fastgate.config.schema import parse_config
from fastgate.errors import ConfigError
from fastgate.middleware import registry
from fastgate.middleware.headers import Headers

FULL = {
    "request": {
        "set": {"X-Tenant": "acme", "Authorization": "Bearer static-upstream-token"},
        "add": {"X-Gateway-Tag": "edge 1"},
        "remove": ["X-Debug", "Cookie"],
    },
    "response": {
        "set": {"Cache-Control": "no-store"},
        "add": {"Vary": "Origin"},
        "remove": ["Server"],
    },
}


def test_lines_and_names() -> None:
    mw = Headers(FULL, "h")
    assert mw.request_header_lines == (
        b"X-Tenant: acme\r\nAuthorization: Bearer static-upstream-token\r\n"
        b"X-Gateway-Tag: edge 1\r\n"
    )
    assert mw.strip_request_headers == (b"x-tenant", b"authorization", b"x-debug", b"cookie")
    assert mw.response_header_lines == b"Cache-Control: no-store\r\nVary: Origin\r\n"
    assert mw.strip_response_headers == (b"cache-control", b"server")


def test_no_per_request_code() -> None:
    mw = registry.build("h", "headers", FULL)
    assert isinstance(mw, Headers)
    assert not hasattr(mw, "on_request")


def test_stats_never_show_values() -> None:
    stats = Headers(FULL, "h").stats()
    assert stats["request"] == {
        "set": ["X-Tenant", "Authorization"],
        "add": ["X-Gateway-Tag"],
        "remove": ["X-Debug", "Cookie"],
    }
    assert stats["response"]["remove"] == ["Server"]
    assert "static-upstream-token" not in repr(stats)


@pytest.mark.parametrize(
    ("options", "req", "req_strip", "resp", "resp_strip"),
    [
        pytest.param({"request": {"add": {"X-A": "1"}}}, b"X-A: 1\r\n", (), b"", (),
                     id="request add only: client copies kept"),
        pytest.param({"request": {"remove": ["x-a"]}}, b"", (b"x-a",), b"", (),
                     id="request remove only"),
        pytest.param({"response": {"set": {"X-A": ""}}}, b"", (), b"X-A: \r\n", (b"x-a",),
                     id="empty value"),
        pytest.param({"response": {"add": {"Link": "<a>; rel=x,\t<b>"}}}, b"", (),
                     b"Link: <a>; rel=x,\t<b>\r\n", (), id="tab and punctuation inside"),
        pytest.param({"response": {"remove": ["X-Request-Idx"]}}, b"", (), b"",
                     (b"x-request-idx",), id="reserved name prefix is not reserved"),
        pytest.param({"response": {"set": {"X-Forwarded-For": "x"}}}, b"", (),
                     b"X-Forwarded-For: x\r\n", (b"x-forwarded-for",),
                     id="forwarding names only reserved on requests"),
    ],
)  # fmt: skip
def test_produced(
    options: dict[str, Any],
    req: bytes,
    req_strip: tuple[bytes, ...],
    resp: bytes,
    resp_strip: tuple[bytes, ...],
) -> None:
    mw = Headers(options, "h")
    assert mw.request_header_lines == req
    assert mw.strip_request_headers == req_strip
    assert mw.response_header_lines == resp
    assert mw.strip_response_headers == resp_strip


@pytest.mark.parametrize(
    ("options", "path", "reason"),
    [
        pytest.param({}, "", "nothing to do", id="empty"),
        pytest.param({"request": {}, "response": {"remove": []}}, "", "nothing to do",
                     id="empty sections"),
        pytest.param({"requests": {}}, "requests", "unknown key", id="unknown top key"),
        pytest.param({"request": {"sett": {}}}, "request.sett", "did you mean 'set'",
                     id="unknown verb"),
        pytest.param({"request": {"set": {"X-A": 1}}}, "request.set.X-A", "string",
                     id="value not a string"),
        pytest.param({"request": {"remove": "X-A"}}, "request.remove", "list",
                     id="remove not a list"),
        pytest.param({"request": {"set": {"X A": "1"}}}, "request.set.X A", "header name",
                     id="space in name"),
        pytest.param({"request": {"add": {"X:A": "1"}}}, "request.add.X:A", "header name",
                     id="colon in name"),
        pytest.param({"response": {"add": {"": "1"}}}, "response.add.", "header name",
                     id="empty name"),
        pytest.param({"response": {"remove": ["Séance"]}}, "response.remove[0]", "header name",
                     id="non-ascii name"),
        pytest.param({"request": {"set": {"X-A": "a\r\nX-B: b"}}}, "request.set.X-A",
                     "visible ASCII", id="CRLF in value"),
        pytest.param({"request": {"set": {"X-A": "a\nb"}}}, "request.set.X-A",
                     "visible ASCII", id="LF in value"),
        pytest.param({"response": {"add": {"X-A": "a\x00b"}}}, "response.add.X-A",
                     "visible ASCII", id="NUL in value"),
        pytest.param({"response": {"add": {"X-A": "a\x7fb"}}}, "response.add.X-A",
                     "visible ASCII", id="DEL in value"),
        pytest.param({"response": {"add": {"X-A": "café"}}}, "response.add.X-A",
                     "visible ASCII", id="non-ascii value"),
        pytest.param({"response": {"set": {"X-A": " a"}}}, "response.set.X-A",
                     "visible ASCII", id="leading blank"),
        pytest.param({"response": {"set": {"X-A": "a\t"}}}, "response.set.X-A",
                     "visible ASCII", id="trailing tab"),
        pytest.param({"request": {"set": {"Content-Length": "1"}}}, "request.set.Content-Length",
                     "framing", id="content-length"),
        pytest.param({"request": {"remove": ["transfer-encoding"]}}, "request.remove[0]",
                     "framing", id="transfer-encoding"),
        pytest.param({"request": {"set": {"Host": "x"}}}, "request.set.Host", "framing",
                     id="host"),
        pytest.param({"response": {"remove": ["Connection"]}}, "response.remove[0]", "framing",
                     id="connection"),
        pytest.param({"response": {"add": {"Keep-Alive": "5"}}}, "response.add.Keep-Alive",
                     "framing", id="keep-alive"),
        pytest.param({"request": {"add": {"TE": "trailers"}}}, "request.add.TE", "framing",
                     id="te"),
        pytest.param({"request": {"add": {"Upgrade": "h2c"}}}, "request.add.Upgrade", "framing",
                     id="upgrade"),
        pytest.param({"response": {"add": {"Trailer": "x"}}}, "response.add.Trailer", "framing",
                     id="trailer"),
        pytest.param({"request": {"set": {"Proxy-Authorization": "x"}}},
                     "request.set.Proxy-Authorization", "framing", id="proxy-*"),
        pytest.param({"request": {"set": {"X-Request-ID": "x"}}}, "request.set.X-Request-ID",
                     "gateway itself", id="x-request-id"),
        pytest.param({"response": {"remove": ["x-request-id"]}}, "response.remove[0]",
                     "gateway itself", id="x-request-id on responses"),
        pytest.param({"request": {"add": {"traceparent": "x"}}}, "request.add.traceparent",
                     "gateway itself", id="traceparent"),
        pytest.param({"request": {"remove": ["TraceState"]}}, "request.remove[0]",
                     "gateway itself", id="tracestate"),
        pytest.param({"response": {"set": {"traceresponse": "x"}}},
                     "response.set.traceresponse", "gateway itself", id="traceresponse"),
        pytest.param({"request": {"set": {"X-Forwarded-For": "1.2.3.4"}}},
                     "request.set.X-Forwarded-For", "gateway itself", id="x-forwarded-for"),
        pytest.param({"request": {"remove": ["Forwarded"]}}, "request.remove[0]",
                     "gateway itself", id="forwarded"),
        pytest.param({"request": {"add": {"Expect": "100-continue"}}}, "request.add.Expect",
                     "gateway itself", id="expect"),
        pytest.param({"request": {"set": {"X-A": "1"}, "add": {"x-a": "2"}}}, "request.add.x-a",
                     "already given at request.set.X-A", id="set and add"),
        pytest.param({"response": {"set": {"X-A": "1", "x-A": "2"}}}, "response.set.x-A",
                     "already given", id="set twice, other case"),
        pytest.param({"request": {"add": {"X-A": "1"}, "remove": ["X-A"]}},
                     "request.remove[0]", "already given", id="add and remove: use set"),
        pytest.param({"response": {"remove": ["Server", "server"]}}, "response.remove[1]",
                     "already given at response.remove[0]", id="removed twice"),
    ],
)  # fmt: skip
def test_refused(options: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        Headers(options, "h")
    assert info.value.path == path
    assert reason in info.value.reason


def test_refusal_never_echoes_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        Headers({"request": {"set": {"Authorization": "Bearer secret-value\n"}}}, "h")
    assert "secret-value" not in str(info.value)


def test_same_name_on_both_sides_is_fine() -> None:
    mw = Headers({"request": {"set": {"X-A": "1"}}, "response": {"set": {"X-A": "2"}}}, "h")
    assert mw.request_header_lines == b"X-A: 1\r\n"
    assert mw.response_header_lines == b"X-A: 2\r\n"


# ---- compile.py: the route carries it ------------------------------------------------------


def test_request_headers_join_in_chain_order() -> None:
    one = Headers({"request": {"set": {"X-A": "1"}}}, "one")
    two = Headers({"request": {"add": {"X-B": "2"}}, "response": {"remove": ["Server"]}}, "two")
    assert request_headers((one, two)) == b"X-A: 1\r\nX-B: 2\r\n"
    assert request_headers((two, one)) == b"X-B: 2\r\nX-A: 1\r\n"
    assert request_headers((Headers({"response": {"remove": ["Server"]}}, "r"),)) is None
    assert request_headers(()) is None
    assert response_headers((one, two)) == (None, (b"server",))


@pytest.fixture
def engine() -> Iterator[Engine]:
    loop = asyncio.new_event_loop()
    eng = Engine(loop, None, tick_interval=1.0)
    yield eng
    eng.close()
    loop.close()


def test_compiled_route(engine: Engine) -> None:
    config = parse_config(
        {
            "entrypoints": {"web": {"address": "127.0.0.1:18090"}},
            "services": {"svc": {"servers": [{"url": "http://127.0.0.1:9"}]}},
            "middlewares": {"edit": {"type": "headers", **FULL}},
            "routes": [
                {"name": "edited", "match": {"path": "/e"}, "service": "svc",
                 "middlewares": ["edit"]},
                {"name": "plain", "match": {"path": "/"}, "service": "svc"},
            ],
        }
    )  # fmt: skip
    runtime = compile_runtime(config, engine)
    try:
        router = runtime.entries["web"].router
        edited = router.match(None, b"/e", b"GET")
        assert edited.name == "edited"
        assert edited.chain == ()  # nothing runs per request
        assert edited.extra_headers == Headers(FULL, "x").request_header_lines
        assert edited.strip_headers == (b"x-tenant", b"authorization", b"x-debug", b"cookie")
        assert edited.response_headers == b"Cache-Control: no-store\r\nVary: Origin\r\n"
        assert edited.response_strip == (b"cache-control", b"server")
        plain = router.match(None, b"/", b"GET")
        assert plain.name == "plain"
        assert plain.extra_headers is None and plain.strip_headers is None
    finally:
        runtime.retire()


def test_compile_names_the_full_key_path(engine: Engine) -> None:
    config = parse_config(
        {
            "entrypoints": {"web": {"address": "127.0.0.1:18090"}},
            "services": {"svc": {"servers": [{"url": "http://127.0.0.1:9"}]}},
            "middlewares": {"edit": {"type": "headers", "request": {"set": {"Host": "x"}}}},
            "routes": [{"name": "r", "match": {"path": "/"}, "service": "svc",
                        "middlewares": ["edit"]}],
        }
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        compile_runtime(config, engine)
    assert info.value.path == "middlewares.edit.request.set.Host"
