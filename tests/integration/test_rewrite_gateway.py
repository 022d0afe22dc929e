"""strip_prefix, add_prefix, replace_path_regex and redirect through a real gateway: the
origin's /headers and /echo-path/ endpoints show the request-target it received (and the
X-Forwarded-Prefix / X-Replaced-Path the gateway sent), redirects are answered without the
origin, and a rewrite never leaks into the next request on a kept-alive connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import Client, Gateway, Origin, assert_error, base_config

MIDDLEWARES: dict[str, dict[str, Any]] = {
    "strip": {"type": "strip_prefix", "prefixes": ["/api/v1", "/api"]},
    "add": {"type": "add_prefix", "prefix": "/echo-path"},
    "both_strip": {"type": "strip_prefix", "prefixes": ["/public"]},
    "both_add": {"type": "add_prefix", "prefix": "/echo-path/in"},
    "replace": {"type": "replace_path_regex", "regex": "^/old/(.*)", "replacement": r"/\1"},
    "broken": {"type": "replace_path_regex", "regex": "^/x/(.*)", "replacement": r"\1"},
    "moved": {"type": "redirect", "to": "/new-home", "status": 301},
    "www": {
        "type": "redirect",
        "regex": r"^http://www\.test(?::\d+)?/(p/.*)",
        "replacement": r"https://example.test/\1",
        "status": 308,
    },
}
ROUTES = {
    "strip": ["strip"],
    "add": ["add"],
    "both": ["both_strip", "both_add"],
    "replace": ["replace"],
    "broken": ["broken"],
    "moved": ["moved"],
    "www": ["www"],
}


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    routes = [
        {"name": name, "match": {"hosts": [f"{name}.test"]}, "service": "origin",
         "middlewares": chain}
        for name, chain in ROUTES.items()
    ]  # fmt: skip
    return start_gateway(base_config(origin.port, middlewares=MIDDLEWARES, routes=routes))


def seen(resp: Any) -> tuple[str, dict[str, list[str]]]:
    """(request-target, headers by lowercase name) as the origin received them (/headers)."""
    assert resp.status == 200, (resp.raw_head, resp.body)
    doc = resp.json()
    headers: dict[str, list[str]] = {}
    for name, value in doc["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return doc["target"], headers


@pytest.mark.parametrize(
    ("path", "target", "prefix"),
    [
        pytest.param("/api/headers?x=1&y", "/headers?x=1&y", "/api", id="prefix and query"),
        pytest.param("/api/v1/headers", "/headers", "/api/v1", id="first matching prefix"),
    ],
)
def test_strip_prefix(gw: Gateway, path: str, target: str, prefix: str) -> None:
    with Client(gw.addr) as c:
        resp = c.request("GET", path, host="strip.test", headers={"X-Forwarded-Prefix": "/evil"})
    got, headers = seen(resp)
    assert got == target
    assert headers["x-forwarded-prefix"] == [prefix]  # the client's copy is dropped


def test_strip_prefix_boundaries(gw: Gateway) -> None:
    """The origin's 404 body names the path it got."""
    with Client(gw.addr) as c:
        root = c.request("GET", "/api", host="strip.test")
        inner = c.request("GET", "/api/v1x/y", host="strip.test")
        nomatch = c.request("GET", "/apix/headers", host="strip.test")
        after = c.request(
            "GET", "/headers", host="strip.test", headers={"X-Forwarded-Prefix": "/evil"}
        )
    assert root.status == 404 and root.body == b"no such origin endpoint: /"
    assert inner.status == 404 and inner.body == b"no such origin endpoint: /v1x/y"
    assert nomatch.status == 404 and nomatch.body == b"no such origin endpoint: /apix/headers"
    target, headers = seen(after)  # nothing stripped: no X-Forwarded-Prefix, the client's gone
    assert target == "/headers" and "x-forwarded-prefix" not in headers


@pytest.mark.parametrize(
    ("host", "path", "body"),
    [
        pytest.param("add.test", "/a/b?q=1", b"/echo-path/a/b", id="add"),
        pytest.param("add.test", "/", b"/echo-path/", id="add to root"),
        pytest.param("both.test", "/public/x", b"/echo-path/in/x", id="strip then add"),
        pytest.param("both.test", "/other", b"/echo-path/in/other", id="add without strip"),
    ],
)
def test_add_prefix(gw: Gateway, host: str, path: str, body: bytes) -> None:
    with Client(gw.addr) as c:
        resp = c.request("GET", path, host=host)
    assert resp.status == 200 and resp.body == body


def test_replace_path_regex(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        rewritten = c.request(
            "GET", "/old/headers?k=v", host="replace.test", headers={"X-Replaced-Path": "/evil"}
        )
        untouched = c.request(
            "GET", "/headers", host="replace.test", headers={"X-Replaced-Path": "/evil"}
        )
        again = c.request("GET", "/old/headers", host="replace.test")
    target, headers = seen(rewritten)
    assert target == "/headers?k=v"
    assert headers["x-replaced-path"] == ["/old/headers"]
    target, headers = seen(untouched)  # same connection: the previous rewrite is gone
    assert target == "/headers" and "x-replaced-path" not in headers
    target, headers = seen(again)
    assert target == "/headers" and headers["x-replaced-path"] == ["/old/headers"]


def test_bad_rewritten_path(gw: Gateway, origin: Origin) -> None:
    before = origin.stats()["requests"]
    with Client(gw.addr) as c:
        resp = c.request("GET", "/x/headers", host="broken.test")
        doc = assert_error(resp, 400)
        ok = c.request("GET", "/headers", host="broken.test")
    assert doc["error"] == "bad rewritten path"
    assert seen(ok)[0] == "/headers"
    assert origin.stats()["requests"] - before == 2  # the /headers one (+ this /_stats call)


def test_redirects(gw: Gateway, origin: Origin) -> None:
    before = origin.stats()["requests"]
    with Client(gw.addr) as c:
        moved = c.request("GET", "/old?a=1", host="moved.test")
        www_miss = c.request("GET", "/headers", host="WWW.test:81")
    with Client(gw.addr) as c:  # a reply before the body was read closes the connection
        www = c.request("POST", "/p/q?z=2", host="www.test", body=b"data")
    assert moved.status == 301 and moved.header("location") == "/new-home?a=1"
    assert www.status == 308 and www.header("location") == "https://example.test/p/q?z=2"
    assert seen(www_miss)[0] == "/headers"  # no match: the request goes on to the origin
    assert origin.stats()["requests"] - before == 2
