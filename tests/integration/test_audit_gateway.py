"""The admin `/audit` of a real gateway: the posture report of the running config as JSON
(the same document as `fastgate audit --format json`), secret values never in it, the same
methods as the other admin endpoints, and the report following a reload."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from conftest import Client, Gateway, Origin, assert_error, base_config, wait_for

from fastgate.audit import FORMAT

SECRET = "audit-literal-secret-" + "z" * 43  # written in the file on purpose (FG050)


def admin_request(gw: Gateway, method: str, path: str = "/audit") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*gw.admin, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def audit_doc(gw: Gateway) -> dict[str, Any]:
    status, _, body = admin_request(gw, "GET")
    assert status == 200, body
    assert SECRET.encode() not in body
    return json.loads(body)


def wheres(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(f["id"], f["where"]) for f in doc["findings"]}


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    middlewares = {
        "jwt": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": SECRET},
        "limit": {"type": "rate_limit", "rate": "50/second"},
    }
    routes = [
        {"name": "private", "match": {"path": "/p"}, "middlewares": ["jwt", "limit"]},
        {"name": "open", "match": {"path": "/"}},
    ]
    for route in routes:
        route["service"] = "origin"
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


def test_audit_reports_the_running_config(gw: Gateway) -> None:
    with Client(gw.addr) as c:  # the gateway serves the config the report describes
        assert_error(c.request("GET", "/p/x", host="origin.test"), 401)
    doc = audit_doc(gw)
    assert doc["format"] == FORMAT
    assert doc["source"] == str(gw.directory / "fastgate.yaml")
    assert doc["secrets_checked"] is True
    routes = {r["name"]: r for r in doc["routes"]}
    assert set(routes) == {"private", "open"}
    assert routes["private"]["authentication"] == [
        {"name": "jwt", "type": "jwt_auth", "optional": False}
    ]
    assert routes["private"]["rate_limits"][0]["store"] == "local"
    assert routes["open"]["authentication"] == [] and routes["open"]["rate_limits"] == []
    (hop,) = routes["open"]["entrypoints"]
    assert hop["name"] == "web" and hop["tls"] is False and hop["loopback"] is True
    found = wheres(doc)
    assert {
        ("FG001", "routes[1]"),
        ("FG002", "routes[1]"),
        ("FG030", "middlewares.jwt.audience"),
        ("FG031", "middlewares.jwt.issuer"),
        ("FG050", "middlewares.jwt.secret"),
    } <= found
    assert not [w for w in found if w[1].startswith("routes[0]")]  # private is covered
    assert doc["summary"]["highest"] == "high"


@pytest.mark.parametrize(
    ("method", "code"),
    [
        pytest.param("HEAD", 200, id="HEAD: headers only"),
        pytest.param("POST", 405, id="POST refused"),
        pytest.param("DELETE", 405, id="DELETE refused"),
    ],
)
def test_audit_methods(gw: Gateway, method: str, code: int) -> None:
    status, headers, body = admin_request(gw, method)
    assert status == code
    assert headers["Cache-Control"] == "no-store"
    assert headers["Content-Type"] == "application/json"
    if method == "HEAD":
        assert body == b"" and int(headers["Content-Length"]) > 100
    else:
        assert headers["Allow"] == "GET, HEAD"


def test_audit_follows_a_reload(gw: Gateway) -> None:
    assert ("FG022", "audit_log.enabled") not in wheres(audit_doc(gw))
    config = dict(gw.config, audit_log={"enabled": False})
    (gw.directory / "fastgate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # The supervisor polls the file every second; the report reads its running config.
    assert wait_for(lambda: ("FG022", "audit_log.enabled") in wheres(audit_doc(gw)), 15)
    assert (gw.readyz() or {}).get("generation") == 2
