"""The `headers` middleware through a real gateway: on requests `set` replaces the client's
copies, `add` keeps them, `remove` drops them (as the origin saw the request); on responses
the same on what the origin sent. Other routes are untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import Client, Gateway, Origin, base_config

from fastgate.middleware import registry


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    middlewares = {
        "req": {
            "type": "headers",
            "request": {
                "set": {"X-Tenant": "acme"},
                "add": {"X-Tag": "edge 1"},
                "remove": ["X-Debug"],
            },
        },
        "resp": {
            "type": "headers",
            "response": {"set": {"Content-Type": "text/plain"}, "add": {"X-Conn-Id": "gw"}},
        },
        "hide": {"type": "headers", "response": {"remove": ["X-Conn-Id"]}},
    }
    routes = [
        {"name": name, "match": {"hosts": [f"{name}.test"]}, "service": "origin",
         "middlewares": [name]}
        for name in ("req", "resp", "hide")
    ] + [{"name": "other", "match": {"hosts": ["other.test"]}, "service": "origin"}]  # fmt: skip
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


CLIENT_HEADERS = {
    "X-Tenant": "evil",
    "X-Tag": "client",
    "X-Debug": "1",
    "X-Keep": "yes",
}


def seen(resp: Any, name: str) -> list[str]:
    """Values of `name` in the request head the origin received (from /headers)."""
    assert resp.status == 200
    return [v for k, v in resp.json()["headers"] if k.lower() == name.lower()]


def test_no_per_request_code() -> None:
    mw = registry.build("h", "headers", {"request": {"set": {"X-A": "1"}}})
    assert not hasattr(mw, "on_request")


def test_request_set_add_remove(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        for _ in range(2):  # the second on the same kept-alive connection
            resp = c.request("GET", "/headers", host="req.test", headers=CLIENT_HEADERS)
            assert seen(resp, "x-tenant") == ["acme"]  # set: the client's copy replaced
            assert seen(resp, "x-tag") == ["client", "edge 1"]  # add: the client's kept
            assert seen(resp, "x-debug") == []  # remove
            assert seen(resp, "x-keep") == ["yes"]  # untouched
            assert len(seen(resp, "x-request-id")) == 1
        # Without the client's copies, set and add still send theirs.
        resp = c.request("POST", "/headers", host="req.test", body=b"abc")
        assert seen(resp, "x-tenant") == ["acme"]
        assert seen(resp, "x-tag") == ["edge 1"]
        assert resp.json()["body_length"] == 3
        other = c.request("GET", "/headers", host="other.test", headers=CLIENT_HEADERS)
        assert seen(other, "x-tenant") == ["evil"]
        assert seen(other, "x-tag") == ["client"]
        assert seen(other, "x-debug") == ["1"]


def test_response_set_add_remove(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        for path in ("/headers", "/chunked/5000", "/bytes/70000", "/status/404"):
            resp = c.request("GET", path, host="resp.test")
            assert resp.all("content-type") == ["text/plain"], path  # set
            conn_ids = resp.all("x-conn-id")  # add: the origin's kept, ours after it
            assert len(conn_ids) == 2 and conn_ids[0].isdigit() and conn_ids[1] == "gw", path
            hidden = c.request("GET", path, host="hide.test")
            assert hidden.all("x-conn-id") == [], path  # remove
            assert hidden.status == resp.status
        plain = c.request("GET", "/headers", host="other.test")
        assert plain.all("content-type") == ["application/json"]
        assert len(plain.all("x-conn-id")) == 1
        assert resp.body  # the 404 still has its body
