"""The jwt_auth middleware: valid tokens -> Identity, every refusal -> 401 with a challenge,
where the token comes from, the verification cache, and option errors with key paths."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fastgate._core.accesslog import DENY_AUTH_FAILED
from fastgate._core.httphead import parse_request
from fastgate.errors import ConfigError
from fastgate.middleware import jwt_auth as jwt_auth_mod
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.jwt_auth import JwtAuth
from fastgate.middleware.registry import build

SECRET = "s" * 64
OTHER_SECRET = "o" * 64


def _pem(public_key: Any) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
RSA_PEM = _pem(RSA_KEY.public_key())
EC_PEM = _pem(EC_KEY.public_key())
ED_PEM = _pem(ED_KEY.public_key())

KEYS: dict[str, tuple[dict[str, Any], Any]] = {
    "HS256": ({"secret": SECRET}, SECRET),
    "RS256": ({"public_key": RSA_PEM}, RSA_KEY),
    "PS256": ({"public_key": RSA_PEM}, RSA_KEY),
    "ES256": ({"public_key": EC_PEM}, EC_KEY),
    "EdDSA": ({"public_key": ED_PEM}, ED_KEY),
}


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 600}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def token(alg: str = "HS256", key: Any = None, headers: dict | None = None, **extra: Any) -> str:
    return jwt.encode(claims(**extra), KEYS[alg][1] if key is None else key, alg, headers)


def middleware(alg: str = "HS256", **options: Any) -> JwtAuth:
    return JwtAuth({"algorithms": [alg], **KEYS[alg][0], **options}, "auth")


def request(
    tok: str | bytes | None = None, *, where: str = "bearer", target: str = "/api"
) -> RequestContext:
    lines = [f"GET {target} HTTP/1.1", "Host: api.test"]
    if tok is not None:
        tok = tok if isinstance(tok, str) else tok.decode("latin-1")
        if where == "bearer":
            lines.append(f"Authorization: Bearer {tok}")
        elif where == "header":
            lines.append(f"X-Token: {tok}")
        elif where == "cookie":
            lines.append(f"Cookie: theme=dark; session={tok}; other=1")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=None, head=head)


def refusal(reply: Any) -> tuple[str, str]:
    """(error message, WWW-Authenticate) of a 401 reply."""
    assert isinstance(reply, LocalReply)
    assert reply.status == 401
    headers = dict(reply.headers)
    return json.loads(reply.body)["error"], headers["WWW-Authenticate"]


def challenge(description: str) -> str:
    return f'Bearer realm="fastgate", error="invalid_token", error_description="{description}"'


# ---- valid tokens -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alg",
    [
        pytest.param("HS256", id="HS256 secret"),
        pytest.param("RS256", id="RS256 public key"),
        pytest.param("PS256", id="PS256 public key"),
        pytest.param("ES256", id="ES256 public key"),
        pytest.param("EdDSA", id="EdDSA Ed25519 public key"),
    ],
)
def test_valid_token_sets_identity(alg: str) -> None:
    mw = middleware(
        alg,
        issuer="https://id.test",
        audience="api",
        roles_claim="realm_access.roles",
        groups_claim="groups",
        consumer_claim="azp",
        forward_claims=["email", "absent"],
    )
    tok = token(
        alg,
        iss="https://id.test",
        aud="api",
        scope="read write",
        realm_access={"roles": ["admin", "ops"]},
        groups=["eng"],
        azp="web-app",
        email="alice@example.com",
    )
    ctx = request(tok)
    assert mw.on_request(ctx) is None
    assert ctx.identity == Identity(
        method="jwt",
        subject="alice",
        consumer="web-app",
        scopes=frozenset({"read", "write"}),
        roles=frozenset({"admin", "ops"}),
        groups=frozenset({"eng"}),
        claims=(("email", "alice@example.com"),),
    )
    assert tok not in repr(ctx.identity)


@pytest.mark.parametrize(
    "options, extra, scopes",
    [
        pytest.param({}, {"scope": "a b"}, {"a", "b"}, id="scope is space separated"),
        pytest.param({}, {"scp": ["x", "y"]}, {"x", "y"}, id="scp is a list"),
        pytest.param({}, {}, set(), id="no scope claim"),
        pytest.param({"scopes_claim": "perms"}, {"perms": ["p"]}, {"p"}, id="custom claim"),
        pytest.param({"scopes_claim": "a.b"}, {"a": {"b": "n m"}}, {"n", "m"}, id="nested claim"),
    ],
)
def test_scopes(options: dict, extra: dict, scopes: set[str]) -> None:
    ctx = request(token(**extra))
    assert middleware(**options).on_request(ctx) is None
    assert ctx.identity is not None and ctx.identity.scopes == scopes


# ---- refusals -------------------------------------------------------------------------------


def _unsigned(payload: dict[str, Any], header: dict[str, Any]) -> str:
    def b64(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


def _key_confusion() -> str:
    # The RS256 public key (PEM text) used as an HMAC secret: PyJWT refuses to sign with it,
    # so build the HS256 signature by hand the way an attacker would.
    import hashlib
    import hmac

    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    sig = hmac.new(RSA_PEM.encode(), head + b"." + body, hashlib.sha256).digest()
    return (head + b"." + body + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()


@pytest.mark.parametrize(
    "alg, options, tok, description",
    [
        pytest.param(
            "HS256",
            {},
            lambda: token(exp=int(time.time()) - 100),
            "token expired",
            id="expired past leeway",
        ),
        pytest.param(
            "HS256",
            {},
            lambda: token(nbf=int(time.time()) + 300),
            "token not yet valid",
            id="nbf in the future",
        ),
        pytest.param(
            "HS256",
            {"issuer": "https://id.test"},
            lambda: token(iss="https://evil.test"),
            "wrong issuer",
            id="wrong issuer",
        ),
        pytest.param(
            "HS256",
            {"audience": "api"},
            lambda: token(aud="other"),
            "wrong audience",
            id="wrong audience",
        ),
        pytest.param(
            "HS256",
            {"audience": "api"},
            lambda: token(),
            "missing claim aud",
            id="audience configured, token has none",
        ),
        pytest.param(
            "HS256",
            {"required_claims": ["exp", "jti"]},
            lambda: token(),
            "missing claim jti",
            id="missing required claim",
        ),
        pytest.param(
            "HS256", {}, lambda: token(exp=None), "missing claim exp", id="exp required by default"
        ),
        pytest.param(
            "HS256", {}, lambda: token(key=OTHER_SECRET), "bad signature", id="bad HS signature"
        ),
        pytest.param(
            "RS256", {}, lambda: token("RS256", key=RSA_OTHER), "bad signature", id="other RSA key"
        ),
        pytest.param(
            "HS256",
            {},
            lambda: _unsigned(claims(), {"alg": "none", "typ": "JWT"}),
            "algorithm not allowed",
            id="alg none",
        ),
        pytest.param(
            "RS256", {}, _key_confusion, "algorithm not allowed", id="RS256 key as HS256 secret"
        ),
        pytest.param(
            "HS256",
            {},
            lambda: jwt.encode(claims(), SECRET, "HS384"),
            "algorithm not allowed",
            id="alg not in the configured list",
        ),
        pytest.param(
            "HS256",
            {"max_token_bytes": 64},
            lambda: token(),
            "token too large",
            id="token larger than max_token_bytes",
        ),
        pytest.param("HS256", {}, lambda: "not-a-jwt", "malformed token", id="malformed"),
        pytest.param("HS256", {}, lambda: "a.b.c", "malformed token", id="three garbage segments"),
        pytest.param(
            "RS256",
            {},
            lambda: token(
                "RS256",
                key=RSA_OTHER,
                headers={
                    "jku": "http://127.0.0.1:1/keys",
                    "x5u": "http://127.0.0.1:1/cert",
                    "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
                },
            ),
            "bad signature",
            id="jku x5u jwk headers ignored",
        ),
    ],
)
def test_refused(alg: str, options: dict, tok: Any, description: str) -> None:
    text = tok()
    mw = middleware(alg, leeway=30, **options)
    ctx = request(text)
    message, www = refusal(mw.on_request(ctx))
    assert message == "invalid token"
    assert www == challenge(description)
    assert text not in www and ctx.identity is None


def test_leeway_accepts_recently_expired() -> None:
    ctx = request(token(exp=int(time.time()) - 10))
    assert middleware(leeway=30).on_request(ctx) is None
    assert ctx.identity is not None


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no authorization header"),
        pytest.param({"Authorization": "Basic YWxpY2U6cHc="}, id="another scheme"),
        pytest.param({"Authorization": "Bearer"}, id="bearer without a token"),
    ],
)
def test_no_token_challenge_only(headers: dict[str, str]) -> None:
    lines = ["GET / HTTP/1.1", "Host: a"] + [f"{k}: {v}" for k, v in headers.items()]
    head, _ = parse_request(("\r\n".join(lines) + "\r\n\r\n").encode())
    message, www = refusal(middleware().on_request(RequestContext(conn=None, head=head)))
    assert message == "missing bearer token"
    assert www == 'Bearer realm="fastgate"'


class DenyRecorder:
    """A client connection's record of refusals (what the audit line is written from)."""

    def __init__(self) -> None:
        self.denies: list[tuple[int, str, str]] = []

    def note_deny(self, event: int, source: str, reason: str) -> None:
        self.denies.append((event, source, reason))


def test_refusal_is_noted_without_token(caplog: pytest.LogCaptureFixture) -> None:
    text = token(key=OTHER_SECRET)
    ctx = request(text)
    ctx.conn = DenyRecorder()
    with caplog.at_level("DEBUG"):
        refusal(middleware().on_request(ctx))
    ((event, source, reason),) = ctx.conn.denies
    assert (event, source) == (DENY_AUTH_FAILED, "auth") and "bad signature" in reason
    assert text.split(".")[2] not in reason
    assert text not in caplog.text and text.split(".")[2] not in caplog.text


# ---- where the token comes from -------------------------------------------------------------


@pytest.mark.parametrize(
    "token_from, where, target, found",
    [
        pytest.param("header", "bearer", "/", True, id="Authorization Bearer"),
        pytest.param("header:X-Token", "header", "/", True, id="named header"),
        pytest.param("header:X-Token", "bearer", "/", False, id="named header absent"),
        pytest.param("cookie:session", "cookie", "/", True, id="cookie"),
        pytest.param("cookie:session", "bearer", "/", False, id="cookie absent"),
        pytest.param("query:access_token", None, "/p?a=1&access_token={}", True, id="query"),
        pytest.param("header", None, "/p?access_token={}", False, id="query only if configured"),
    ],
)
def test_token_from(token_from: str, where: str | None, target: str, found: bool) -> None:
    tok = token()
    ctx = request(tok if where else None, where=where or "bearer", target=target.format(tok))
    reply = middleware(token_from=token_from).on_request(ctx)
    if found:
        assert reply is None and ctx.identity is not None
        assert ctx.identity.subject == "alice"
    else:
        assert refusal(reply) == ("missing bearer token", 'Bearer realm="fastgate"')


def test_bearer_scheme_is_case_insensitive() -> None:
    head, _ = parse_request(
        f"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: bearer {token()}\r\n\r\n".encode()
    )
    ctx = RequestContext(conn=None, head=head)
    assert middleware().on_request(ctx) is None and ctx.identity is not None


# ---- the verification cache ----------------------------------------------------------------


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = jwt_auth_mod.jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt_auth_mod.jwt, "decode", counting)
    return calls


def test_cache_hit_skips_verification(decode_calls: list[int]) -> None:
    mw = middleware()
    tok = token()
    first, second = request(tok), request(tok)
    assert mw.on_request(first) is None and mw.on_request(second) is None
    assert len(decode_calls) == 1
    assert second.identity is first.identity
    # A rebuilt middleware (a reload) starts with an empty cache.
    assert middleware().on_request(request(tok)) is None
    assert len(decode_calls) == 2


def test_cache_honours_exp(decode_calls: list[int]) -> None:
    mw = middleware(leeway=0)
    exp = int(time.time()) + 60
    tok = token(exp=exp)
    assert mw.on_request(request(tok)) is None
    mw.clock = lambda: exp - 1
    assert mw.on_request(request(tok)) is None
    assert len(decode_calls) == 1
    mw.clock = lambda: exp  # past exp: the cached identity is not used, the token re-verified
    assert mw.on_request(request(tok)) is None
    assert len(decode_calls) == 2


def test_cache_is_bounded_lru(decode_calls: list[int]) -> None:
    mw = middleware(cache_size=2)
    a, b, c = (token(jti=str(i)) for i in range(3))
    for tok in (a, b, a, c):  # a is used again before c arrives, so b is the one dropped
        assert mw.on_request(request(tok)) is None
    assert len(decode_calls) == 4 - 1
    assert mw.stats()["cached"] == 2
    assert mw.on_request(request(a)) is None
    assert len(decode_calls) == 3
    assert mw.on_request(request(b)) is None
    assert len(decode_calls) == 4


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"cache_size": 0}, id="cache disabled"),
        pytest.param({"required_claims": []}, id="token without exp"),
    ],
)
def test_not_cached(options: dict, decode_calls: list[int]) -> None:
    mw = middleware(**options)
    tok = token(exp=None) if options.get("required_claims") == [] else token()
    for _ in range(3):
        assert mw.on_request(request(tok)) is None
    assert len(decode_calls) == 3


def test_failures_are_not_cached(decode_calls: list[int]) -> None:
    mw = middleware()
    tok = token(key=OTHER_SECRET)
    for _ in range(2):
        refusal(mw.on_request(request(tok)))
    assert len(decode_calls) == 2


# ---- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path, words",
    [
        pytest.param({"secret": SECRET}, "algorithms", "required", id="algorithms required"),
        pytest.param({"algorithms": []}, "algorithms", "non-empty", id="empty algorithms"),
        pytest.param(
            {"algorithms": ["none"], "secret": SECRET},
            "algorithms[0]",
            "never accepted",
            id="none refused",
        ),
        pytest.param(
            {"algorithms": ["HS256", "ES512"], "secret": SECRET},
            "algorithms[1]",
            "not supported",
            id="unknown algorithm",
        ),
        pytest.param(
            {"algorithms": ["HS256", "RS256"], "secret": SECRET},
            "algorithms",
            "cannot be mixed",
            id="HS mixed with RS refused",
        ),
        pytest.param({"algorithms": ["HS256"]}, "secret", "need `secret`", id="secret missing"),
        pytest.param(
            {"algorithms": ["HS256"], "secret": "short"}, "secret", "at least 32", id="short"
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": RSA_PEM},
            "secret",
            "public key",
            id="PEM as HMAC secret",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "public_key": RSA_PEM},
            "secret",
            "only",
            id="HS with a public key",
        ),
        pytest.param({"algorithms": ["RS256"]}, "public_key", "exactly one", id="no key"),
        pytest.param(
            {"algorithms": ["RS256"], "public_key": "nope"},
            "public_key",
            "PEM",
            id="not a PEM",
        ),
        pytest.param(
            {"algorithms": ["RS256"], "public_key_file": "/nonexistent/key.pem"},
            "public_key_file",
            "cannot read",
            id="unreadable key file",
        ),
        pytest.param(
            {"algorithms": ["ES256"], "public_key": RSA_PEM},
            "public_key",
            "cannot verify ES256",
            id="key type does not fit the algorithm",
        ),
        pytest.param(
            {"algorithms": ["RS256", "ES256"], "public_key": RSA_PEM},
            "public_key",
            "cannot verify ES256",
            id="one key for two families",
        ),
        pytest.param(
            {**KEYS["HS256"][0], "algorithms": ["HS256"], "leeway": -1},
            "leeway",
            ">=",
            id="negative leeway",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "token_from": "body:x"},
            "token_from",
            "header:NAME",
            id="bad token_from",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "token_from": "query:"},
            "token_from",
            "query:NAME",
            id="token_from without a name",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "required_claims": "exp"},
            "required_claims",
            "list",
            id="required_claims not a list",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "cache_size": True},
            "cache_size",
            "number",
            id="cache_size bool",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "roles_claim": "a..b"},
            "roles_claim",
            "claim name",
            id="bad claim path",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "jwks_uri": "http://x"},
            "jwks_uri",
            "unknown option",
            id="unknown option",
        ),
        pytest.param(
            {"algorithms": ["HS256"], "secret": SECRET, "jwks_url": "https://x/keys"},
            "jwks_url",
            "never use a JWKS",
            id="HS256 with a JWKS URL refused",
        ),
    ],
)
def test_option_errors(options: dict, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        JwtAuth(options, "auth")
    assert info.value.path == f"middlewares.auth.{path}"
    assert words in info.value.reason


def test_public_key_file(tmp_path: Any) -> None:
    path = tmp_path / "key.pem"
    path.write_text(RSA_PEM)
    mw = JwtAuth({"algorithms": ["RS256", "PS256"], "public_key_file": str(path)}, "auth")
    ctx = request(token("PS256"))
    assert mw.on_request(ctx) is None and ctx.identity is not None


def test_registered_by_type() -> None:
    mw = build("auth", "jwt_auth", {"algorithms": ["HS256"], "secret": SECRET})
    assert isinstance(mw, JwtAuth) and mw.type == "jwt_auth"


def test_static_key_ignores_kid() -> None:
    # Only a key set selects by kid; with one configured key any kid is irrelevant.
    ctx = request(token("RS256", headers={"kid": "whatever"}))
    assert middleware("RS256").on_request(ctx) is None and ctx.identity is not None
