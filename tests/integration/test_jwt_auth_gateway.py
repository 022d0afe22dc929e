"""The jwt_auth middleware in a real gateway: 401 with a Bearer challenge without or with a
bad token, 200 (and the origin sees the request) with a valid one. One route takes an HS256
secret from `${VAR}`, the other an RS256 public key file."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import Client, Gateway, Origin, assert_error, base_config, get
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SECRET = "integration-secret-" + "x" * 45
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def gw(
    origin: Origin,
    start_gateway: Callable[[dict[str, Any]], Gateway],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    monkeypatch.setenv("JWT_TEST_SECRET", SECRET)  # the gateway inherits the environment
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(
        RSA_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    middlewares = {
        "hs": {
            "type": "jwt_auth",
            "algorithms": ["HS256"],
            "secret": "${JWT_TEST_SECRET}",
            "audience": "api",
        },
        "rs": {"type": "jwt_auth", "algorithms": ["RS256"], "public_key_file": str(key_file)},
        "fw": {
            "type": "jwt_auth",
            "algorithms": ["HS256"],
            "secret": "${JWT_TEST_SECRET}",
            "forward_claims": ["email"],
            "forward_headers": {"X-User": "subject", "X-Email": "claim:email"},
            "hide_credentials": True,
        },
    }
    routes = [
        {
            "name": name,
            "match": {"hosts": [f"{name}.test"]},
            "service": "origin",
            "middlewares": [name],
        }
        for name in ("hs", "rs", "fw")
    ]
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


def _token(key: Any, alg: str, **extra: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "alice", "iat": now, "exp": now + 300, **extra}, key, alg)


@pytest.mark.parametrize(
    "host, headers, challenge",
    [
        pytest.param("hs.test", {}, 'Bearer realm="fastgate"', id="no token"),
        pytest.param(
            "hs.test",
            {"Authorization": "Bearer " + _token("w" * 64, "HS256", aud="api")},
            'Bearer realm="fastgate", error="invalid_token", error_description="bad signature"',
            id="wrong secret",
        ),
        pytest.param(
            "hs.test",
            {"Authorization": "Bearer " + _token(SECRET, "HS256", aud="web")},
            'Bearer realm="fastgate", error="invalid_token", error_description="wrong audience"',
            id="wrong audience",
        ),
        pytest.param(
            "rs.test",
            {"Authorization": "Bearer " + _token(SECRET, "HS256")},
            'Bearer realm="fastgate", error="invalid_token", '
            'error_description="algorithm not allowed"',
            id="HS256 token on an RS256 route",
        ),
    ],
)
def test_refused(gw: Gateway, host: str, headers: dict[str, str], challenge: str) -> None:
    with Client(gw.addr) as c:
        resp = c.request("GET", "/headers", headers=headers, host=host)
    assert_error(resp, 401)
    assert resp.header("www-authenticate") == challenge


@pytest.mark.parametrize(
    "host, key, alg, extra",
    [
        pytest.param("hs.test", SECRET, "HS256", {"aud": "api"}, id="HS256 secret from ${VAR}"),
        pytest.param("rs.test", RSA_KEY, "RS256", {}, id="RS256 public key file"),
    ],
)
def test_valid_token_reaches_origin(
    gw: Gateway, host: str, key: Any, alg: str, extra: dict[str, Any]
) -> None:
    token = _token(key, alg, **extra)
    with Client(gw.addr) as c:
        # Twice on one connection: the second answer comes from the verification cache.
        for _ in range(2):
            resp = c.request(
                "GET", "/headers", headers={"Authorization": f"Bearer {token}"}, host=host
            )
            assert resp.status == 200, resp.body
            seen = resp.json()
            assert seen["target"] == "/headers"
            assert ["Authorization", f"Bearer {token}"] in [list(h) for h in seen["headers"]]


def test_identity_forwarded_and_forged_copies_stripped(gw: Gateway) -> None:
    token = _token(SECRET, "HS256", email="alice@example.org")
    forged = {"X-User": "root", "x-email": "root@example.org", "X-Other": "kept"}
    resp = get(gw.addr, "/headers", host="fw.test",
               headers={"Authorization": f"Bearer {token}", **forged})  # fmt: skip
    assert resp.status == 200, resp.body
    seen = [(k.lower(), v) for k, v in resp.json()["headers"]]
    assert ("x-user", "alice") in seen and ("x-email", "alice@example.org") in seen
    assert ("x-user", "root") not in seen and ("x-email", "root@example.org") not in seen
    assert ("x-other", "kept") in seen
    assert not [k for k, _ in seen if k == "authorization"]  # hide_credentials
    # A refused request never reaches the origin, forged headers or not.
    bad = get(gw.addr, "/headers", host="fw.test", headers=forged)
    assert_error(bad, 401)


def test_head_refusal_has_no_body(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        resp = c.request("HEAD", "/headers", host="hs.test")
        assert resp.status == 401 and resp.body == b""
        assert int(resp.header("content-length") or 0) > 0
        again = c.request("GET", "/headers", host="hs.test")  # the stream is still in step
        assert_error(again, 401)
