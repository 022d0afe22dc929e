"""The cors middleware through a real gateway: preflights are answered by the gateway (the
service never sees them), actual requests from an allowed origin get the CORS headers, the
service's own Access-Control-* headers never reach the client on a cors route, and the
per-request headers do not leak to the next request on a kept-alive connection.

The service here is a tiny HTTP/1.1 server in this file (127.0.0.1, a thread) that answers
every request with a permissive CORS policy of its own, counting what it receives."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import Client, Gateway, assert_error, base_config

APP = "https://app.example.com"
SERVICE_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Credentials", "true"),
    ("Access-Control-Expose-Headers", "X-Secret"),
    ("Access-Control-Max-Age", "99999"),
    ("Vary", "Accept-Encoding"),
)


class PermissiveService(ThreadingHTTPServer):
    """Answers `ok` with SERVICE_HEADERS; `requests` lists the (method, path) it received."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PermissiveService

    def _answer(self) -> None:
        self.server.requests.append((self.command, self.path))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        for name, value in SERVICE_HEADERS:
            self.send_header(name, value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = do_OPTIONS = do_PUT = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[PermissiveService]:
    server = PermissiveService()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def gw(service: PermissiveService, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    middlewares = {
        "cors": {
            "type": "cors",
            "allow_origins": [APP, "https://*.example.org"],
            "allow_methods": ["GET", "POST", "PUT"],
            "allow_headers": ["Content-Type", "X-Api-Version"],
            "expose_headers": ["X-Request-ID"],
            "allow_credentials": True,
            "max_age": 120,
        },
        "open": {"type": "cors", "allow_origins": ["*"]},
    }
    routes = [
        {"name": name, "match": {"hosts": [f"{name}.test"]}, "service": "svc",
         "middlewares": [name]}
        for name in ("cors", "open")
    ] + [{"name": "plain", "match": {"hosts": ["plain.test"]}, "service": "svc"}]  # fmt: skip
    services = {"svc": {"servers": [{"url": f"http://127.0.0.1:{service.server_port}"}]}}
    config = base_config(0, middlewares=middlewares, routes=routes, services=services)
    return start_gateway(config)


def cors_headers(resp: Any) -> dict[str, list[str]]:
    """The Access-Control-* response headers, by lowercase name, every value."""
    out: dict[str, list[str]] = {}
    for name, value in resp.headers:
        if name.lower().startswith("access-control-"):
            out.setdefault(name.lower(), []).append(value)
    return out


def test_preflight_answered_by_gateway(gw: Gateway, service: PermissiveService) -> None:
    headers = {
        "Origin": "https://a.example.org",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type,x-api-version",
    }
    with Client(gw.addr) as c:
        resp = c.request("OPTIONS", "/items/1", headers=headers, host="cors.test")
    assert resp.status == 204
    assert cors_headers(resp) == {
        "access-control-allow-origin": ["https://a.example.org"],
        "access-control-allow-methods": ["GET, POST, PUT"],
        "access-control-allow-headers": ["content-type, x-api-version"],
        "access-control-max-age": ["120"],
        "access-control-allow-credentials": ["true"],
    }
    assert resp.header("vary") == (
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    )
    assert service.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"},
                     id="origin"),
        pytest.param({"Origin": APP, "Access-Control-Request-Method": "DELETE"}, id="method"),
        pytest.param({"Origin": APP, "Access-Control-Request-Method": "POST",
                      "Access-Control-Request-Headers": "x-other"}, id="header"),
        pytest.param({"Origin": "null", "Access-Control-Request-Method": "GET"}, id="null"),
    ],
)  # fmt: skip
def test_preflight_refused(
    gw: Gateway, service: PermissiveService, headers: dict[str, str]
) -> None:
    with Client(gw.addr) as c:
        resp = c.request("OPTIONS", "/items/1", headers=headers, host="cors.test")
    doc = assert_error(resp, 403)
    assert doc["error"].startswith("CORS preflight refused: ")
    assert cors_headers(resp) == {}
    assert service.requests == []


def test_actual_requests_on_one_connection(gw: Gateway, service: PermissiveService) -> None:
    """Allowed origin: the gateway's CORS headers only (the service's `*` and its other
    Access-Control-* are dropped). Then, on the same connection, a request without Origin and
    one from another origin: no CORS headers at all (nothing carried over)."""
    with Client(gw.addr) as c:
        allowed = c.request("GET", "/items", headers={"Origin": APP}, host="cors.test")
        bare = c.request("GET", "/items", host="cors.test")
        other = c.request("POST", "/items", headers={"Origin": "https://evil.test"},
                          host="cors.test", body=b"x")  # fmt: skip
        again = c.request("GET", "/items", headers={"Origin": APP}, host="cors.test")
    assert allowed.status == 200 and allowed.body == b"ok"
    expected = {
        "access-control-allow-origin": [APP],
        "access-control-allow-credentials": ["true"],
        "access-control-expose-headers": ["X-Request-ID"],
    }
    assert cors_headers(allowed) == expected
    assert cors_headers(again) == expected
    for resp in (bare, other):
        assert resp.status == 200 and resp.body == b"ok"
        assert cors_headers(resp) == {}
    for resp in (allowed, bare, other, again):
        vary = {v.strip() for value in resp.all("vary") for v in value.split(",")}
        assert vary == {"Origin", "Accept-Encoding"}, resp.raw_head
    assert [m for m, _ in service.requests] == ["GET", "GET", "POST", "GET"]


def test_options_without_request_method_reaches_service(
    gw: Gateway, service: PermissiveService
) -> None:
    with Client(gw.addr) as c:
        resp = c.request("OPTIONS", "/items", headers={"Origin": APP}, host="cors.test")
    assert resp.status == 200 and resp.body == b"ok"
    assert cors_headers(resp)["access-control-allow-origin"] == [APP]
    assert service.requests == [("OPTIONS", "/items")]


def test_star_and_plain_routes(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        star = c.request("GET", "/", headers={"Origin": "https://any.test"}, host="open.test")
        preflight = c.request(
            "OPTIONS",
            "/",
            headers={"Origin": "https://any.test", "Access-Control-Request-Method": "POST"},
            host="open.test",
        )
        plain = c.request("GET", "/", headers={"Origin": "https://any.test"}, host="plain.test")
    assert cors_headers(star) == {"access-control-allow-origin": ["*"]}
    assert preflight.status == 204
    assert preflight.header("access-control-allow-origin") == "*"
    assert preflight.header("access-control-allow-credentials") is None
    # A route without cors passes the service's own policy through untouched.
    assert cors_headers(plain) == {
        name.lower(): [value] for name, value in SERVICE_HEADERS if name != "Vary"
    }
