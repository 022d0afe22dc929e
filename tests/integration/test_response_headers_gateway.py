"""security_headers and redirect_https through a real gateway: the headers are on every
response of the route (the service's own copies replaced), other routes are untouched, and a
plain-HTTP request is redirected to HTTPS keeping its path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import Client, Gateway, Origin, base_config


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    middlewares = {
        "secure": {
            "type": "security_headers",
            "hsts": {"max_age": 600},
            "headers": {"X-Conn-Id": "hidden"},  # the origin's own X-Conn-Id is replaced
        },
        "to_https": {"type": "redirect_https", "port": 8443},
    }
    routes = [
        {"name": "secure", "match": {"hosts": ["secure.test"]}, "service": "origin",
         "middlewares": ["secure"]},
        {"name": "redirect", "match": {"hosts": ["plain.test"]}, "service": "origin",
         "middlewares": ["to_https"]},
        {"name": "other", "match": {"hosts": ["other.test"]}, "service": "origin"},
    ]  # fmt: skip
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


def test_security_headers_on_every_response(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        for path in ("/headers", "/bytes/100000", "/chunked/5000", "/status/404"):
            resp = c.request("GET", path, host="secure.test")
            assert resp.header("strict-transport-security") == "max-age=600", path
            assert resp.header("x-content-type-options") == "nosniff"
            assert resp.all("x-conn-id") == ["hidden"]
        other = c.request("GET", "/headers", host="other.test")
        assert other.header("strict-transport-security") is None
        assert other.header("x-conn-id") not in (None, "hidden")


def test_plain_http_is_redirected(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        resp = c.request("GET", "/a/b?c=1", host="plain.test")
        assert resp.status == 301
        assert resp.header("location") == "https://plain.test:8443/a/b?c=1"
        post = c.request("POST", "/form", host="plain.test", body=b"x=1")
        assert post.status == 308 and post.header("location") == "https://plain.test:8443/form"
