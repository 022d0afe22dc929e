"""jwt_auth with key sets in a real gateway: keys from a JWKS URL over https (trustme CA as
jwks_ca_file), from OIDC discovery (ES256), and over plain http with allow_insecure_jwks_http.
Valid tokens reach the origin, an unknown kid is refused, a rotation works end to end (a new
key is fetched on its first token, a removed key stops verifying even cached tokens), and an
issuer that goes down after the start leaves the known keys working."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import Client, Gateway, Origin, assert_error, base_config, get
from cryptography.hazmat.primitives.asymmetric import ec, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jwks_issuer import Issuer

RSA_1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_1 = ec.generate_private_key(ec.SECP256R1())
MIN_REFRESH = 1


def unknown_key(resp: Any) -> bool:
    assert_error(resp, 401)
    return resp.header("www-authenticate") == (
        'Bearer realm="fastgate", error="invalid_token", error_description="unknown key"'
    )


@pytest.fixture
def tls_idp() -> Iterator[Issuer]:
    """The https issuer: an RSA key for the RS256 route, an EC key for the ES256 one."""
    with Issuer(tls=trustme.CA()) as idp:
        idp.add_key("rs1", RSA_1)
        idp.add_key("ec1", EC_1)
        yield idp


@pytest.fixture
def http_idp() -> Iterator[Issuer]:
    with Issuer() as idp:
        idp.add_key("rs1", RSA_1)
        yield idp


@pytest.fixture
def gw(
    tls_idp: Issuer,
    http_idp: Issuer,
    origin: Origin,
    start_gateway: Callable[[dict[str, Any]], Gateway],
) -> Gateway:
    tuning = {"jwks_min_refresh": MIN_REFRESH, "jwks_timeout": 1}
    middlewares = {
        "rs": {
            "type": "jwt_auth",
            "algorithms": ["RS256"],
            "jwks_url": tls_idp.jwks_url,
            "jwks_ca_file": tls_idp.ca_file,
            **tuning,
        },
        "es": {
            "type": "jwt_auth",
            "algorithms": ["ES256"],
            "issuer": tls_idp.url,
            "issuer_discovery": True,
            "jwks_ca_file": tls_idp.ca_file,
            **tuning,
        },
        "plain": {
            "type": "jwt_auth",
            "algorithms": ["RS256"],
            "jwks_url": http_idp.jwks_url,
            "allow_insecure_jwks_http": True,
            **tuning,
        },
    }
    routes = [
        {
            "name": name,
            "match": {"hosts": [f"{name}.test"]},
            "service": "origin",
            "middlewares": [name],
        }
        for name in middlewares
    ]
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


def call(gw: Gateway, host: str, token: str) -> Any:
    return get(gw.addr, "/headers", host=host, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize(
    "host, issuer, kid, extra",
    [
        pytest.param("rs.test", "tls", "rs1", {}, id="RS256 from an https JWKS URL"),
        pytest.param("es.test", "tls", "ec1", {"iss": True}, id="ES256 from OIDC discovery"),
        pytest.param("plain.test", "http", "rs1", {}, id="RS256 over plain http, allowed"),
    ],
)
def test_valid_token_reaches_origin(
    gw: Gateway, tls_idp: Issuer, http_idp: Issuer, host: str, issuer: str, kid: str, extra: dict
) -> None:
    idp = tls_idp if issuer == "tls" else http_idp
    token = idp.token(kid, **({"iss": idp.url} if extra.get("iss") else {}))
    with Client(gw.addr) as c:
        # Twice on one connection: the first waits for the key set, the second is cached.
        for _ in range(2):
            resp = c.request(
                "GET", "/headers", headers={"Authorization": f"Bearer {token}"}, host=host
            )
            assert resp.status == 200, resp.body
            assert ["Authorization", f"Bearer {token}"] in [list(h) for h in resp.json()["headers"]]
    if host == "es.test":
        assert tls_idp.count("/.well-known/openid-configuration") == 1


@pytest.mark.parametrize(
    "host, kid, key_of",
    [
        pytest.param("rs.test", "nope", "rs1", id="unknown kid"),
        pytest.param("rs.test", "ec1", "ec1", id="an EC key is not a key of the RS256 route"),
        pytest.param("es.test", "rs1", "rs1", id="an RSA key is not a key of the ES256 route"),
    ],
)
def test_unknown_key_refused(
    gw: Gateway, tls_idp: Issuer, host: str, kid: str, key_of: str
) -> None:
    token = tls_idp.token(kid, key_of=key_of, iss=tls_idp.url)
    assert unknown_key(call(gw, host, token))


def test_rotation_end_to_end(gw: Gateway, tls_idp: Issuer) -> None:
    old = tls_idp.token("rs1")
    assert call(gw, "rs.test", old).status == 200
    tls_idp.add_key("rs2", RSA_2)
    time.sleep(MIN_REFRESH + 0.1)
    new = tls_idp.token("rs2")
    assert call(gw, "rs.test", new).status == 200  # its unknown kid fetched the new set
    tls_idp.remove_key("rs1")
    time.sleep(MIN_REFRESH + 0.1)
    assert unknown_key(call(gw, "rs.test", tls_idp.token("other", key_of="rs2")))
    assert unknown_key(call(gw, "rs.test", old))  # cached before: flushed by the rotation
    assert call(gw, "rs.test", new).status == 200


def test_issuer_down_after_start_keeps_known_keys(
    gw: Gateway, tls_idp: Issuer, http_idp: Issuer
) -> None:
    assert call(gw, "rs.test", tls_idp.token("rs1")).status == 200
    assert call(gw, "plain.test", http_idp.token("rs1")).status == 200
    tls_idp.down("refuse")
    http_idp.down("hang")
    time.sleep(MIN_REFRESH + 0.1)
    # An unknown kid makes each route try a fetch, which fails (refused / times out) ...
    assert unknown_key(call(gw, "rs.test", tls_idp.token("x", key_of="rs1")))
    assert unknown_key(call(gw, "plain.test", http_idp.token("x", key_of="rs1")))
    # ... and tokens never seen before, signed with the known key, still verify.
    fresh_tls = tls_idp.token("rs1", jti="fresh")
    assert call(gw, "rs.test", fresh_tls).status == 200
    assert call(gw, "plain.test", http_idp.token("rs1", jti="fresh")).status == 200
    log = gw.log.read_text()
    assert "key fetch failed" in log and "keeping the last good keys" in log
    assert fresh_tls not in log
