"""jwt_auth followed by authorize in a real gateway: the scope a method needs (200 / 403),
consumers, 401 from jwt_auth without a token, 401 from authorize after an optional jwt_auth,
anonymous access to an open GET rule, and a dry-run route that admits and audits."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from conftest import Client, Gateway, Origin, assert_error, base_config

SECRET = "authorize-integration-" + "k" * 42


@pytest.fixture
def gw(
    origin: Origin,
    start_gateway: Callable[[dict[str, Any]], Gateway],
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    monkeypatch.setenv("AUTHZ_TEST_SECRET", SECRET)  # the gateway inherits the environment
    jwt_options = {
        "type": "jwt_auth",
        "algorithms": ["HS256"],
        "secret": "${AUTHZ_TEST_SECRET}",
        "consumer_claim": "azp",
    }
    middlewares = {
        "jwt": jwt_options,
        "jwt_optional": {**jwt_options, "optional": True},
        "orders": {
            "type": "authorize",
            "methods": {"GET": {"scopes": ["orders:read"]}, "POST": {"scopes": ["orders:write"]}},
            "consumers": {"deny": ["legacy"]},
        },
        "audit_only": {"type": "authorize", "dry_run": True, "require": {"scopes": ["admin"]}},
        "public_reads": {
            "type": "authorize",
            "allow_anonymous": True,
            "methods": {"GET": {}},
            "require": {"scopes": ["catalog:write"]},
        },
    }
    chains = {
        "orders": ["jwt", "orders"],
        "dry": ["jwt", "audit_only"],
        "public": ["jwt_optional", "public_reads"],
        "anon": ["jwt_optional", "orders"],
    }
    routes = [
        {"name": name, "match": {"hosts": [f"{name}.test"]}, "service": "origin", "middlewares": m}
        for name, m in chains.items()
    ]
    # log_level info: dry-run denials (fastgate.authorize) reach the gateway's log.
    config = base_config(origin.port, middlewares=middlewares, routes=routes, log_level="info")
    return start_gateway(config)


def bearer(scope: str = "", **extra: Any) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 300, "scope": scope, **extra}
    return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, "HS256")}


def send(gw: Gateway, method: str, host: str, headers: dict[str, str]) -> Any:
    with Client(gw.addr) as c:
        return c.request(method, "/headers", headers=headers, host=host)


@pytest.mark.parametrize(
    "method, host, headers",
    [
        pytest.param("GET", "orders.test", bearer("orders:read"), id="GET with read scope"),
        pytest.param("POST", "orders.test", bearer("orders:write"), id="POST with write scope"),
        pytest.param("GET", "public.test", {}, id="anonymous GET on an open rule"),
        pytest.param("POST", "public.test", bearer("catalog:write"), id="POST with the scope"),
    ],
)
def test_admitted(gw: Gateway, method: str, host: str, headers: dict[str, str]) -> None:
    resp = send(gw, method, host, headers)
    assert resp.status == 200, resp.body
    seen = resp.json()
    assert seen["method"] == method and seen["target"] == "/headers"


@pytest.mark.parametrize(
    "method, host, headers",
    [
        pytest.param("POST", "orders.test", bearer("orders:read"), id="POST without write scope"),
        pytest.param("GET", "orders.test", bearer("orders:write"), id="GET without read scope"),
        pytest.param(
            "GET",
            "orders.test",
            bearer("orders:read", azp="legacy"),
            id="denied consumer",
        ),
        pytest.param("POST", "public.test", {}, id="anonymous POST on a scoped rule"),
    ],
)
def test_forbidden(gw: Gateway, method: str, host: str, headers: dict[str, str]) -> None:
    resp = send(gw, method, host, headers)
    doc = assert_error(resp, 403)
    assert doc["error"] == "forbidden"  # which rule failed is only in the audit log
    assert resp.header("www-authenticate") is None


@pytest.mark.parametrize(
    "host, message",
    [
        pytest.param("orders.test", "missing bearer token", id="jwt_auth answers"),
        pytest.param("anon.test", "authentication required", id="authorize answers"),
    ],
)
def test_no_token_401(gw: Gateway, host: str, message: str) -> None:
    resp = send(gw, "GET", host, {})
    doc = assert_error(resp, 401)
    assert doc["error"] == message
    assert resp.header("www-authenticate") == 'Bearer realm="fastgate"'


def test_dry_run_admits_and_audits(gw: Gateway) -> None:
    headers = bearer("orders:read")
    resp = send(gw, "GET", "dry.test", headers)
    assert resp.status == 200, resp.body
    assert resp.json()["target"] == "/headers"
    # The worker writes the audit record before it forwards; allow its log a moment to flush.
    deadline = time.monotonic() + 5
    while "dry_run: missing scope admin" not in gw.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, gw.log.read_text(errors="replace")[-4000:]
        time.sleep(0.05)
    line = next(
        ln for ln in gw.log.read_text().splitlines() if "dry_run: missing scope admin" in ln
    )
    assert "route=dry" in line and "by audit_only" in line and "GET /headers" in line
    token = headers["Authorization"].split()[1]
    assert token not in gw.log.read_text()  # a credential is never logged
