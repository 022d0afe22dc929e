"""Key sets for jwt_auth (fastgate.auth.jwks): which JWKs may verify which algorithms, kid
selection, the unknown-kid gate (negative cache, one fetch per jwks_min_refresh), Cache-Control,
OIDC discovery, an IdP that fails (the last good keys stay), rotation flushing the cache, and
the option errors. Fetches go to a real local issuer (tests/jwks_issuer.py) over HTTP, or
HTTPS with a trustme CA."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import inspect
import json
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fastgate._core.httphead import parse_request
from fastgate.auth import jwks as jwks_mod
from fastgate.auth.jwks import KeySetError, key_shapes, parse_key_set, token_kid
from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.jwt_auth import JwtAuth

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jwks_issuer import Issuer, public_jwk

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
EC_256 = ec.generate_private_key(ec.SECP256R1())
EC_384 = ec.generate_private_key(ec.SECP384R1())
ED = ed25519.Ed25519PrivateKey.generate()
MIN_REFRESH = 1  # the smallest jwks_min_refresh the options allow
TEST_TIMEOUT = 30


def run(coro: Any) -> Any:
    """Run one test body on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


def request(tok: str) -> RequestContext:
    raw = f"GET /api HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {tok}\r\n\r\n".encode()
    head, _ = parse_request(raw)
    return RequestContext(conn=None, head=head)


async def call(mw: JwtAuth, tok: str) -> tuple[Any, RequestContext]:
    """on_request and, when it returns a coroutine, its result."""
    ctx = request(tok)
    verdict = mw.on_request(ctx)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict, ctx


def description(reply: Any) -> str:
    """The error_description of a 401 reply."""
    assert isinstance(reply, LocalReply) and reply.status == 401, reply
    www = dict(reply.headers)["WWW-Authenticate"]
    return www.split('error_description="', 1)[1].rstrip('"')


def assert_unavailable(reply: Any) -> None:
    assert isinstance(reply, LocalReply) and reply.status == 503, reply
    assert json.loads(reply.body) == {"error": "keys unavailable"}
    assert dict(reply.headers)["Retry-After"] == "1"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


async def await_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


@pytest.fixture
def idp() -> Iterator[Issuer]:
    with Issuer() as issuer:
        issuer.add_key("a", RSA_A)
        yield issuer


def middleware(idp: Issuer, algorithms: tuple[str, ...] = ("RS256",), **options: Any) -> JwtAuth:
    base = {
        "algorithms": list(algorithms),
        "jwks_url": idp.jwks_url,
        "allow_insecure_jwks_http": True,
        "jwks_min_refresh": MIN_REFRESH,
        "jwks_timeout": 2,
    }
    return JwtAuth({**base, **options}, "auth")


# ---- which JWKs may verify which algorithms ---------------------------------------------------


def _jwk(key: Any, kid: str | None = "k", **fields: Any) -> dict[str, Any]:
    return public_jwk(key, kid, **fields)


def _private_rsa() -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(RSA_B, as_dict=True)
    return {**jwk, "kid": "k"}


@pytest.mark.parametrize(
    "algorithms, entry, usable",
    [
        pytest.param(["RS256"], lambda: _jwk(RSA_B), True, id="RSA for RS256"),
        pytest.param(["RS256", "PS256"], lambda: _jwk(RSA_B), True, id="RSA for RS256+PS256"),
        pytest.param(["RS256"], lambda: _jwk(RSA_B, use="sig"), True, id="use sig"),
        pytest.param(["RS256"], lambda: _jwk(RSA_B, alg="RS256"), True, id="alg configured"),
        pytest.param(["ES256"], lambda: _jwk(EC_256), True, id="P-256 for ES256"),
        pytest.param(["ES384"], lambda: _jwk(EC_384), True, id="P-384 for ES384"),
        pytest.param(["EdDSA"], lambda: _jwk(ED), True, id="Ed25519 for EdDSA"),
        pytest.param(["RS256"], lambda: _jwk(EC_256), False, id="EC key for RS256 skipped"),
        pytest.param(["ES256"], lambda: _jwk(RSA_B), False, id="RSA key for ES256 skipped"),
        pytest.param(["ES256"], lambda: _jwk(EC_384), False, id="P-384 for ES256 skipped"),
        pytest.param(["ES384"], lambda: _jwk(EC_256), False, id="P-256 for ES384 skipped"),
        pytest.param(["EdDSA"], lambda: _jwk(EC_256), False, id="EC key for EdDSA skipped"),
        pytest.param(
            ["ES256"],
            lambda: {**_jwk(EC_256), "crv": "P-384"},
            False,
            id="P-256 coordinates labelled P-384 skipped",
        ),
        pytest.param(["RS256"], lambda: _jwk(RSA_B, use="enc"), False, id="use enc skipped"),
        pytest.param(["RS256"], lambda: _jwk(RSA_B, alg="RS512"), False, id="alg mismatch"),
        pytest.param(["RS256"], lambda: _jwk(RSA_B, alg="HS256"), False, id="alg HS256 skipped"),
        pytest.param(
            ["RS256"],
            lambda: {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "kid": "k"},
            False,
            id="oct key skipped",
        ),
        pytest.param(["RS256"], _private_rsa, False, id="private RSA JWK skipped"),
        pytest.param(["RS256"], lambda: _jwk(RSA_B, kid="x" * 257), False, id="kid too long"),
        pytest.param(["RS256"], lambda: {**_jwk(RSA_B), "kid": 7}, False, id="kid not text"),
        pytest.param(["RS256"], lambda: {**_jwk(RSA_B), "n": "!!"}, False, id="bad modulus"),
        pytest.param(["RS256"], lambda: _jwk(RSA_1024), False, id="RSA 1024 bits skipped"),
        pytest.param(["RS256"], lambda: "not-a-jwk", False, id="entry not an object"),
    ],
)
def test_jwk_filtering(algorithms: list[str], entry: Callable[[], Any], usable: bool) -> None:
    good = _jwk(RSA_A if algorithms[0][:2] in ("RS", "PS") else EC_256, kid="good")
    if algorithms == ["ES384"]:
        good = _jwk(EC_384, kid="good")
    if algorithms == ["EdDSA"]:
        good = _jwk(ED, kid="good")
    keys = parse_key_set({"keys": [good, entry()]}, algorithms)
    assert "good" in keys.by_kid
    assert ("k" in keys.by_kid) is usable
    assert keys.skipped == (0 if usable else 1)


@pytest.mark.parametrize(
    "doc, words",
    [
        pytest.param([], "not a JWK set", id="not an object"),
        pytest.param({"keys": {}}, "not a JWK set", id="keys not a list"),
        pytest.param({"keys": []}, "no usable key", id="empty set"),
        pytest.param({"keys": [_jwk(RSA_A, use="enc")]}, "no usable key", id="only enc keys"),
        pytest.param(
            {"keys": [_jwk(RSA_A, kid=str(i)) for i in range(jwks_mod.MAX_KEYS + 1)]},
            "more than 100",
            id="oversize set refused",
        ),
    ],
)
def test_key_set_refused(doc: Any, words: str) -> None:
    with pytest.raises(KeySetError) as info:
        parse_key_set(doc, ["RS256"])
    assert words in str(info.value)


def test_key_set_at_the_limit() -> None:
    doc = {"keys": [_jwk(RSA_A, kid=str(i)) for i in range(jwks_mod.MAX_KEYS)]}
    assert len(parse_key_set(doc, ["RS256"]).by_kid) == jwks_mod.MAX_KEYS


@pytest.mark.parametrize(
    "algorithms, words",
    [
        pytest.param(["HS256"], "never use a JWKS", id="HS256"),
        pytest.param(["RS256", "ES256"], "same key type", id="RSA and EC mixed"),
        pytest.param(["ES256", "ES384"], "same key type", id="two curves"),
    ],
)
def test_key_shapes_refused(algorithms: list[str], words: str) -> None:
    with pytest.raises(ValueError) as info:
        key_shapes(algorithms)
    assert words in str(info.value)


def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "header, kid",
    [
        pytest.param({"alg": "RS256", "kid": "abc"}, "abc", id="kid"),
        pytest.param({"alg": "RS256"}, None, id="no kid"),
        pytest.param({"alg": "RS256", "kid": ""}, "", id="empty kid never matches"),
        pytest.param({"alg": "RS256", "kid": "x" * 257}, "", id="kid too long never matches"),
        pytest.param({"alg": "RS256", "kid": 5}, jwt.InvalidTokenError, id="kid not text"),
        pytest.param(["not", "an", "object"], jwt.InvalidTokenError, id="header not an object"),
    ],
)
def test_token_kid(header: Any, kid: Any) -> None:
    tok = f"{_b64(header)}.{_b64({'sub': 'a'})}.c2ln".encode()
    if isinstance(kid, type):
        with pytest.raises(kid):
            token_kid(tok)
    else:
        assert token_kid(tok) == kid


# ---- kid selection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "published, kid, key_of, headers, outcome",
    [
        pytest.param(["a", "b"], "b", "b", {}, None, id="kid selects among two keys"),
        pytest.param(["a"], None, "a", {}, None, id="no kid, exactly one key"),
        pytest.param(["a", "b"], None, "a", {}, "unknown key", id="no kid, two keys"),
        pytest.param(["a", "b"], "a", "b", {}, "bad signature", id="kid of another key"),
        pytest.param(
            ["a"],
            "a",
            "b",
            {"jku": "{url}/evil", "x5u": "{url}/evil", "x5c": ["AAAA"], "jwk": {"kty": "RSA"}},
            "bad signature",
            id="jku x5u x5c jwk ignored, never fetched",
        ),
    ],
)
def test_kid_selection(
    idp: Issuer,
    published: list[str],
    kid: str | None,
    key_of: str,
    headers: dict[str, Any],
    outcome: str | None,
) -> None:
    idp.remove_key("a")
    for name in ("a", "b"):
        idp.add_key(name, RSA_A if name == "a" else RSA_B)
        if name not in published:
            idp.remove_key(name)
    headers = {k: v.format(url=idp.url) if isinstance(v, str) else v for k, v in headers.items()}
    tok = idp.token(kid, key_of=key_of, headers=headers)
    mw = middleware(idp)

    async def body() -> Any:
        return await call(mw, tok)

    reply, ctx = run(body())
    if outcome is None:
        assert reply is None and ctx.identity is not None and ctx.identity.subject == "alice"
    else:
        assert description(reply) == outcome and ctx.identity is None
    assert idp.count("/evil") == 0


def test_keys_sharing_a_kid_are_each_tried(idp: Issuer) -> None:
    idp.add_key("b", RSA_B)  # to sign with B below
    idp.raw_keys = [public_jwk(RSA_B, "a")]  # B published under kid "a" as well
    mw = middleware(idp)

    async def body() -> None:
        for key_of in ("a", "b"):
            reply, ctx = await call(mw, idp.token("a", key_of=key_of))
            assert reply is None and ctx.identity is not None
        tampered = idp.token("a", jti="x")[:-4] + "AAAA"
        reply, _ = await call(mw, tampered)
        assert description(reply) == "bad signature"

    run(body())


def test_key_confusion_with_a_jwk_as_hmac_secret(idp: Issuer) -> None:
    # An attacker who reads the JWKS signs HS256 with the published modulus: `alg` comes from
    # the configured list only, so the token is refused before any key is tried as a secret.
    # (PyJWT will not sign with a JWK as secret, so the signature is made by hand.)
    secret = base64.urlsafe_b64decode(public_jwk(RSA_A, "a")["n"] + "==")
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'a'})}.{_b64({'sub': 'eve'})}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    tok = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    mw = middleware(idp)
    reply, _ = run(call(mw, tok))
    assert description(reply) == "algorithm not allowed"


@pytest.mark.parametrize(
    "algorithms, key",
    [
        pytest.param(("ES256",), EC_256, id="ES256"),
        pytest.param(("EdDSA",), ED, id="EdDSA"),
        pytest.param(("RS256", "PS256"), RSA_A, id="PS256 with an RSA key, no alg member"),
    ],
)
def test_other_key_types(idp: Issuer, algorithms: tuple[str, ...], key: Any) -> None:
    idp.remove_key("a")
    idp.add_key("k", key, alg=algorithms[-1])
    mw = middleware(idp, algorithms)
    reply, ctx = run(call(mw, idp.token("k")))
    assert reply is None and ctx.identity is not None


# ---- the first fetch, the synchronous path, fail closed ---------------------------------------


def test_first_request_awaits_the_first_fetch_then_synchronous(idp: Issuer) -> None:
    mw = middleware(idp)
    tok, other = idp.token("a"), idp.token("a", jti="2")

    async def body() -> None:
        first = mw.on_request(request(tok))
        assert inspect.isawaitable(first)
        assert await first is None
        for t in (tok, other):  # cached, then a known kid: no coroutine
            ctx = request(t)
            assert mw.on_request(ctx) is None and ctx.identity is not None

    run(body())
    assert idp.count(idp.jwks_path) == 1
    assert mw.stats()["jwks"]["keys"] == 1 and mw.stats()["cached"] == 2


@pytest.mark.parametrize("mode", ["refuse", "hang", "error"])
def test_no_keys_yet_fails_closed(idp: Issuer, mode: str) -> None:
    idp.down(mode)
    # A long refresh window: a slow machine must not reach the next fetch within the test.
    mw = middleware(idp, jwks_timeout=0.5, jwks_min_refresh=60, jwks_refresh=300)
    tok = idp.token("a")

    async def body() -> None:
        reply, ctx = await call(mw, tok)
        assert_unavailable(reply)
        assert ctx.identity is None
        assert await await_until(lambda: mw.stats()["jwks"]["fetch_failures"] == 1)
        # Inside jwks_min_refresh: answered at once, no second fetch.
        again = mw.on_request(request(tok))
        assert not inspect.isawaitable(again)
        assert_unavailable(again)

    run(body())
    assert mw.stats()["jwks"]["fetch_failures"] == 1
    assert mw.stats()["failures"] == {"keys unavailable": 2}


# ---- unknown kids: one fetch per jwks_min_refresh, negative cache ------------------------------


def test_flood_of_random_kids_costs_one_fetch(idp: Issuer) -> None:
    mw = middleware(idp)

    async def body() -> None:
        assert await mw.keys.start()
        await asyncio.sleep(MIN_REFRESH + 0.05)  # the window after the first fetch is over
        flood = [idp.token(uuid.uuid4().hex, key_of="a") for _ in range(200)]
        replies = await asyncio.gather(*(call(mw, t) for t in flood))
        assert [description(r) for r, _ in replies] == ["unknown key"] * 200
        assert idp.count(idp.jwks_path) == 2  # the 200 concurrent requests shared one fetch
        for t in [idp.token(uuid.uuid4().hex, key_of="a") for _ in range(200)]:
            reply = mw.on_request(request(t))
            assert not inspect.isawaitable(reply)  # inside the window: refused at once
            assert description(reply) == "unknown key"
        assert idp.count(idp.jwks_path) == 2

    run(body())
    stats = mw.stats()
    assert stats["failures"] == {"unknown key": 400}
    assert stats["jwks"]["fetches"] == 2 and stats["jwks"]["unknown_kids"] == 200


def test_unknown_kid_cached_negatively_until_next_successful_fetch(idp: Issuer) -> None:
    mw = middleware(idp)
    tok = idp.token("ghost", key_of="a")

    async def body() -> None:
        assert await mw.keys.start()
        await asyncio.sleep(MIN_REFRESH + 0.05)
        reply, _ = await call(mw, tok)  # fetches once, then remembered as unknown
        assert description(reply) == "unknown key"
        await asyncio.sleep(MIN_REFRESH + 0.05)  # the window is open again, but ...
        again = mw.on_request(request(tok))
        assert not inspect.isawaitable(again)  # ... a known-unknown kid fetches nothing
        assert description(again) == "unknown key"

    run(body())
    assert idp.count(idp.jwks_path) == 2


# ---- Cache-Control and the scheduled refresh --------------------------------------------------


def test_max_age_honoured(idp: Issuer) -> None:
    idp.cache_control = "public, max-age=1"
    mw = middleware(idp, jwks_refresh=300)

    async def body() -> None:
        assert await mw.keys.start()
        assert await await_until(lambda: idp.count(idp.jwks_path) >= 3, timeout=6)

    run(body())


def test_no_cache_header_uses_jwks_refresh(idp: Issuer) -> None:
    mw = middleware(idp, jwks_refresh=3)

    async def body() -> None:
        assert await mw.keys.start()
        await asyncio.sleep(1.5)
        assert idp.count(idp.jwks_path) == 1  # not the 1 s of max-age above
        assert await await_until(lambda: idp.count(idp.jwks_path) == 2, timeout=6)

    run(body())


@pytest.mark.parametrize(
    "max_age, seconds",
    [
        pytest.param(None, 300, id="no header: jwks_refresh"),
        pytest.param(60.0, 60, id="max-age"),
        pytest.param(0.0, 10, id="no-store: jwks_min_refresh"),
        pytest.param(2.0**31, 86400, id="at most a day"),
    ],
)
def test_refresh_interval_clamped(idp: Issuer, max_age: float | None, seconds: float) -> None:
    mw = JwtAuth({"algorithms": ["RS256"], "jwks_url": "https://id.test/keys"}, "auth")
    assert mw.keys is not None and mw.keys._interval(max_age) == seconds


# ---- discovery --------------------------------------------------------------------------------


def test_discovery_follows_jwks_uri() -> None:
    with Issuer(tls=trustme.CA(), jwks_path="/oauth/v2/certs") as idp:
        idp.add_key("a", RSA_A)
        mw = JwtAuth(
            {
                "algorithms": ["RS256"],
                "issuer": idp.url,
                "issuer_discovery": True,
                "jwks_ca_file": idp.ca_file,
            },
            "auth",
        )
        reply, ctx = run(call(mw, idp.token("a", iss=idp.url)))
        assert reply is None and ctx.identity is not None
        assert idp.count("/.well-known/openid-configuration") == 1
        assert idp.count("/oauth/v2/certs") == 1


@pytest.mark.parametrize(
    "setup, words",
    [
        pytest.param(
            lambda idp: setattr(idp, "discovery_issuer", "https://evil.test"),
            "another issuer",
            id="issuer mismatch refused",
        ),
        pytest.param(
            lambda idp: setattr(idp, "discovery_issuer", idp.url + "/"),
            "another issuer",
            id="issuer with another trailing slash refused",
        ),
        pytest.param(
            lambda idp: setattr(idp, "jwks_uri", "http://127.0.0.1:9/keys"),
            "must be https",
            id="http jwks_uri refused",
        ),
    ],
)
def test_discovery_refused(setup: Callable[[Issuer], None], words: str) -> None:
    with Issuer(tls=trustme.CA()) as idp:
        idp.add_key("a", RSA_A)
        setup(idp)
        mw = JwtAuth(
            {
                "algorithms": ["RS256"],
                "issuer": idp.url,
                "issuer_discovery": True,
                "jwks_ca_file": idp.ca_file,
            },
            "auth",
        )
        reply, _ = run(call(mw, idp.token("a", iss=idp.url)))
        assert_unavailable(reply)
        assert words in mw.stats()["jwks"]["last_error"]
        assert idp.count(idp.jwks_path) == 0


def test_tls_needs_the_configured_ca() -> None:
    with Issuer(tls=trustme.CA()) as idp, Issuer(tls=trustme.CA()) as other:
        idp.add_key("a", RSA_A)
        mw = JwtAuth(
            {"algorithms": ["RS256"], "jwks_url": idp.jwks_url, "jwks_ca_file": other.ca_file},
            "auth",
        )
        reply, _ = run(call(mw, idp.token("a")))
        assert_unavailable(reply)
        assert "TLS" in mw.stats()["jwks"]["last_error"]
        assert idp.count(idp.jwks_path) == 0


# ---- a failing IdP: the last good keys stay -----------------------------------------------------


@pytest.mark.parametrize(
    "fail",
    [
        pytest.param(lambda idp: idp.down("refuse"), id="refused"),
        pytest.param(lambda idp: idp.down("close"), id="closed"),
        pytest.param(lambda idp: idp.down("hang"), id="hangs"),
        pytest.param(lambda idp: idp.down("error"), id="5xx"),
        pytest.param(lambda idp: setattr(idp, "jwks_body", b"{not json"), id="bad JSON"),
        pytest.param(lambda idp: setattr(idp, "jwks_body", b'{"keys": []}'), id="empty set"),
        pytest.param(
            lambda idp: setattr(idp, "jwks_body", b" " * (jwks_mod.MAX_DOCUMENT + 1)),
            id="over 1 MiB",
        ),
    ],
)
def test_idp_failure_keeps_last_good_keys(
    idp: Issuer, fail: Callable[[Issuer], None], caplog: pytest.LogCaptureFixture
) -> None:
    mw = middleware(idp, jwks_timeout=0.5)
    fresh = idp.token("a", jti="not-cached-yet")

    async def body() -> None:
        assert await mw.keys.start()
        fail(idp)
        await asyncio.sleep(MIN_REFRESH + 0.05)
        reply, _ = await call(mw, idp.token("unknown", key_of="a"))  # triggers a fetch
        assert description(reply) == "unknown key"
        reply, ctx = await call(mw, fresh)
        assert reply is None and ctx.identity is not None

    with caplog.at_level("WARNING", logger="fastgate.auth.jwks"):
        run(body())
    assert mw.stats()["jwks"]["fetch_failures"] == 1
    assert "keeping the last good keys" in caplog.text
    assert fresh not in caplog.text and public_jwk(RSA_A, "a")["n"] not in caplog.text


def test_reload_fetches_afresh_then_falls_back_when_the_idp_is_down(idp: Issuer) -> None:
    tok = idp.token("a")
    for built in range(2):  # a reload builds a new middleware: it fetches again
        reply, ctx = run(call(middleware(idp), tok))
        assert reply is None and ctx.identity is not None
        assert idp.count(idp.jwks_path) == built + 1
    idp.down("refuse")
    after_reload = middleware(idp)
    reply, ctx = run(call(after_reload, tok))
    assert reply is None and ctx.identity is not None  # the last good set of this process
    assert after_reload.stats()["jwks"]["fetch_failures"] == 1
    other_source = middleware(idp, algorithms=("RS256", "PS256"))  # not the same source
    assert_unavailable(run(call(other_source, tok))[0])


# ---- rotation -----------------------------------------------------------------------------------


def test_rotation_add_then_remove_flushes_the_cache(idp: Issuer) -> None:
    mw = middleware(idp)
    old = idp.token("a")

    async def body() -> None:
        reply, _ = await call(mw, old)
        assert reply is None and mw.stats()["cached"] == 1
        idp.add_key("b", RSA_B)
        await asyncio.sleep(MIN_REFRESH + 0.05)
        reply, ctx = await call(mw, idp.token("b"))  # unknown kid -> one fetch -> found
        assert reply is None and ctx.identity is not None
        assert mw.stats()["jwks"]["rotations"] == 1
        assert mw.on_request(request(old)) is None  # key a still published: still fine
        idp.remove_key("a")
        await asyncio.sleep(MIN_REFRESH + 0.05)
        reply, _ = await call(mw, idp.token("c", key_of="b"))  # any unknown kid refreshes
        assert description(reply) == "unknown key"
        assert mw.stats()["jwks"]["rotations"] == 2
        reply = mw.on_request(request(old))  # was cached: the rotation flushed it
        assert not inspect.isawaitable(reply)
        assert description(reply) == "unknown key"

    run(body())
    assert idp.count(idp.jwks_path) == 3  # the first, then one per unknown kid (b, c)


def test_unchanged_set_keeps_the_cache(idp: Issuer) -> None:
    idp.cache_control = "max-age=1"
    mw = middleware(idp)

    async def body() -> None:
        reply, _ = await call(mw, idp.token("a"))
        assert reply is None
        assert await await_until(lambda: idp.count(idp.jwks_path) >= 2, timeout=5)
        assert mw.stats()["cached"] == 1 and mw.stats()["jwks"]["rotations"] == 0

    run(body())


# ---- the background task ends with the middleware ----------------------------------------------


def test_background_task_stops_when_closed_or_dropped(idp: Issuer) -> None:
    async def body() -> None:
        closed = middleware(idp)
        assert await closed.keys.start()
        runner = closed.keys._runner
        closed.close()
        await asyncio.sleep(0.05)
        assert runner.done()

        dropped = middleware(idp)
        assert await dropped.keys.start()
        runner = dropped.keys._runner
        ref = weakref.ref(dropped.keys)
        del dropped
        gc.collect()
        assert ref() is None
        await asyncio.sleep(0.05)
        assert runner.done()

    run(body())


# ---- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path, words",
    [
        pytest.param(
            {"jwks_url": "http://id.test/keys"}, "jwks_url", "must be https", id="http refused"
        ),
        pytest.param({"jwks_url": "ftp://id.test/k"}, "jwks_url", "http(s)", id="not http"),
        pytest.param(
            {"jwks_url": "https://u:p@id.test/k"}, "jwks_url", "no credentials", id="userinfo"
        ),
        pytest.param(
            {"jwks_url": "https://id.test/k", "public_key_file": "/x.pem"},
            "public_key",
            "exactly one",
            id="two key sources",
        ),
        pytest.param(
            {"issuer_discovery": True}, "issuer", "needs one `issuer`", id="discovery, no issuer"
        ),
        pytest.param(
            {"issuer_discovery": True, "issuer": ["https://a", "https://b"]},
            "issuer",
            "needs one `issuer`",
            id="discovery with two issuers",
        ),
        pytest.param(
            {"issuer_discovery": "yes", "issuer": "https://id.test"},
            "issuer_discovery",
            "true or false",
            id="discovery not a bool",
        ),
        pytest.param(
            {"issuer_discovery": True, "issuer": "http://id.test"},
            "issuer",
            "must be https",
            id="http issuer for discovery",
        ),
        pytest.param(
            {"public_key_file": "/x.pem", "jwks_refresh": 60},
            "jwks_refresh",
            "only with jwks_url",
            id="jwks option without a key set",
        ),
        pytest.param(
            {"jwks_url": "https://id.test/k", "jwks_min_refresh": 0},
            "jwks_min_refresh",
            ">= 1",
            id="min_refresh 0",
        ),
        pytest.param(
            {"jwks_url": "https://id.test/k", "jwks_refresh": 5, "jwks_min_refresh": 10},
            "jwks_refresh",
            "jwks_min_refresh <= jwks_refresh",
            id="refresh below min_refresh",
        ),
        pytest.param(
            {"jwks_url": "https://id.test/k", "jwks_timeout": 120},
            "jwks_timeout",
            "at most 60",
            id="timeout too long",
        ),
        pytest.param(
            {"jwks_url": "https://id.test/k", "allow_insecure_jwks_http": "true"},
            "allow_insecure_jwks_http",
            "true or false",
            id="allow_insecure not a bool",
        ),
        pytest.param(
            {"jwks_url": "https://id.test/k", "jwks_ca_file": "/nonexistent/ca.pem"},
            "jwks_ca_file",
            "no such file",
            id="missing CA file",
        ),
        pytest.param(
            {"jwks_url": "https://id.test/k", "jwks_ca_file": __file__},
            "jwks_ca_file",
            "not a PEM CA certificate",
            id="CA file not PEM",
        ),
        pytest.param(
            {
                "jwks_url": "http://id.test/k",
                "allow_insecure_jwks_http": True,
                "jwks_ca_file": __file__,
            },
            "jwks_ca_file",
            "only for an https URL",
            id="CA file with http",
        ),
        pytest.param(
            {"algorithms": ["RS256", "ES256"], "jwks_url": "https://id.test/k"},
            "algorithms",
            "same key type",
            id="RSA and EC algorithms with one key set",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "issuer_discovery": True, "issuer": "https://id.test"},
            "issuer_discovery",
            "never use a JWKS",
            id="HS256 with discovery",
        ),
    ],
)
def test_option_errors(options: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        JwtAuth({"algorithms": ["RS256"], **options}, "auth")
    assert info.value.path == f"middlewares.auth.{path}"
    assert words in info.value.reason


def test_http_allowed_only_when_asked() -> None:
    mw = JwtAuth(
        {
            "algorithms": ["RS256"],
            "jwks_url": "http://127.0.0.1:1/keys",
            "allow_insecure_jwks_http": True,
        },
        "auth",
    )
    assert mw.keys is not None and mw.keys.settings.allow_http
    assert mw.options.key is None
