"""`type: jwt_auth`: verify a JWT bearer token with a configured key and set `ctx.identity`.

    middlewares:
      api_auth:
        type: jwt_auth
        algorithms: [RS256]
        public_key_file: /etc/fastgate/issuer.pem   # or public_key: <PEM text>
        # secret: ${JWT_SECRET}                      # for HS256/384/512 (at least 32 bytes)
        # jwks_url: https://id.example.com/.well-known/jwks.json
        # issuer_discovery: true                     # {issuer}/.well-known/openid-configuration
        issuer: https://id.example.com
        audience: api
        leeway: 30                                   # seconds, for exp / nbf / iat
        required_claims: [exp]
        token_from: header                           # header:NAME, cookie:NAME, query:NAME
        scopes_claim: scope                          # default: `scope` (text) or `scp` (list)
        roles_claim: realm_access.roles              # dotted paths reach nested claims
        forward_claims: [email, tenant]

Exactly one key source: `secret`, `public_key`, `public_key_file` (one static key), or
`jwks_url` / `issuer_discovery` (a key set fetched and refreshed by fastgate.auth.jwks, whose
docstring has its rules; options jwks_ca_file, allow_insecure_jwks_http, jwks_refresh,
jwks_min_refresh, jwks_timeout).

Security rules this file obeys:
- The accepted algorithms come from the config only. PyJWT's `algorithms=` refuses a token
  whose header `alg` is not in that list (`none` can never be configured), and `alg` is never
  read to choose a key. HS* and asymmetric algorithms cannot be mixed in one middleware:
  that is what stops RS->HS key confusion (a public key used as an HMAC secret); HS* can
  never use a JWKS.
- With a static key the `kid` header is ignored. With a key set, `kid` (and only `kid`) is
  read from the unverified header to select the key; `jku`, `x5u`, `jwk` and `x5c` are
  always ignored: nothing a token says is ever fetched.
- With a key set, a token whose kid is unknown is refused ("unknown key") after at most one
  fetch per jwks_min_refresh; until a first key set arrives, requests with a token wait for
  it (at most jwks_timeout) and get 503 "keys unavailable" (Retry-After: 1) if it fails:
  fail closed. A new key set flushes the verification cache below.
- exp / nbf / iat are checked with `leeway`; iss / aud when configured (a token carrying an
  `aud` is refused when no audience is configured, as RFC 7519 §4.1.3 asks).
- A failure answers 401 with a `WWW-Authenticate: Bearer` challenge (RFC 6750 §3); the
  description is a fixed phrase and never echoes the token, nor does the debug log.

Verified tokens are cached until their `exp` (bounded, least recently used out first), with
the identity and its upstream header lines, so a client repeating its token costs one dict
lookup. The dict is keyed by the token bytes themselves: a dict compares the whole key on a
hash match, so a hit is exact, and it saves the SHA-256 of every request (about 1 µs here, 6%
of a proxied request's CPU). Memory stays bounded by cache_size x max_token_bytes. The cache
belongs to the instance: a config reload builds a new one, empty. A cached token (or one whose
kid is known) is answered synchronously; a coroutine is returned only to await a key fetch.
"""

from __future__ import annotations

import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from fastgate._core.conn import CredentialCache
from fastgate.auth.common import COMMON_OPTIONS, AuthCommon
from fastgate.auth.jwks import JwksSettings, KeyManager, check_url, key_shapes, token_kid
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import register
from fastgate.tls.client import verifying_context

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS256": (rsa.RSAPublicKey,),
    "RS384": (rsa.RSAPublicKey,),
    "RS512": (rsa.RSAPublicKey,),
    "PS256": (rsa.RSAPublicKey,),
    "PS384": (rsa.RSAPublicKey,),
    "PS512": (rsa.RSAPublicKey,),
    "ES256": (ec.EllipticCurvePublicKey,),
    "ES384": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
ALGORITHMS = HMAC_ALGORITHMS | frozenset(_KEY_TYPES)
MIN_SECRET_BYTES = 32

_OPTIONS = (
    frozenset(
        {
            "algorithms",
            "secret",
            "public_key",
            "public_key_file",
            "jwks_url",
            "issuer_discovery",
            "jwks_ca_file",
            "allow_insecure_jwks_http",
            "jwks_refresh",
            "jwks_min_refresh",
            "jwks_timeout",
            "issuer",
            "audience",
            "leeway",
            "required_claims",
            "token_from",
            "max_token_bytes",
            "scopes_claim",
            "roles_claim",
            "groups_claim",
            "consumer_claim",
            "forward_claims",
            "cache_size",
        }
    )
    | COMMON_OPTIONS
)
_KEY_SOURCES = ("secret", "public_key", "public_key_file", "jwks_url", "issuer_discovery")
_JWKS_SOURCES = ("jwks_url", "issuer_discovery")
_JWKS_TUNING = (
    "jwks_ca_file",
    "allow_insecure_jwks_http",
    "jwks_refresh",
    "jwks_min_refresh",
    "jwks_timeout",
)

# PyJWT error -> the fixed error_description we send (never anything from the token).
_DESCRIPTIONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuedAtError, "bad iat claim"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidKeyError, "unusable key"),
    (jwt.DecodeError, "malformed token"),
)


class _Options:
    """The validated options; `path(option)` names a key as `middlewares.<name>.<option>`."""

    def __init__(self, options: dict[str, Any], name: str) -> None:
        self.name = name
        if not isinstance(options, dict):
            raise ConfigError(self.path(""), "expected a mapping of options")
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigError(self.path(unknown[0]), "unknown option")
        self.algorithms = self._algorithms(options.get("algorithms"))
        self.issuer = self._names(options, "issuer", allow_one=True, default=None)
        self.jwks: JwksSettings | None = None
        self.key = self._key(options)
        audience = self._names(options, "audience", allow_one=True, default=None)
        self.audience = audience
        self.leeway = self._number(options, "leeway", 30, minimum=0)
        self.required_claims = self._names(options, "required_claims", default=["exp"])
        self.token_from = self._token_from(options.get("token_from", "header"))
        self.max_token_bytes = int(self._number(options, "max_token_bytes", 8192, minimum=16))
        self.scopes_claim = self._claim(options, "scopes_claim")
        self.roles_claim = self._claim(options, "roles_claim")
        self.groups_claim = self._claim(options, "groups_claim")
        self.consumer_claim = self._claim(options, "consumer_claim")
        self.forward_claims = tuple(self._names(options, "forward_claims", default=[]))
        self.cache_size = int(self._number(options, "cache_size", 10000, minimum=0))

    def path(self, option: str) -> str:
        return f"middlewares.{self.name}.{option}" if option else f"middlewares.{self.name}"

    def _algorithms(self, value: Any) -> list[str]:
        at = self.path("algorithms")
        if value is None:
            raise ConfigError(at, "required: the list of accepted algorithms, e.g. [RS256]")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ConfigError(at, "expected a non-empty list of algorithm names")
        for i, alg in enumerate(value):
            if not isinstance(alg, str) or alg not in ALGORITHMS:
                why = "never accepted" if str(alg).lower() == "none" else "not supported"
                raise ConfigError(
                    f"{at}[{i}]", f"{alg!r} is {why} (allowed: {', '.join(sorted(ALGORITHMS))})"
                )
        symmetric = {a for a in value if a in HMAC_ALGORITHMS}
        if symmetric and len(symmetric) != len(set(value)):
            raise ConfigError(
                at, "HS* and asymmetric algorithms cannot be mixed (key confusion); use two"
            )
        return list(dict.fromkeys(value))

    def _key(self, options: dict[str, Any]) -> Any:
        """The static key (or None with a key set, then in `self.jwks`)."""
        discovery = options.get("issuer_discovery", False)
        if not isinstance(discovery, bool):
            raise ConfigError(self.path("issuer_discovery"), "expected true or false")
        given = [k for k in _KEY_SOURCES if k in options and options[k] is not False]
        jwks = [k for k in given if k in _JWKS_SOURCES]
        if jwks and self.algorithms[0] in HMAC_ALGORITHMS:
            raise ConfigError(
                self.path(jwks[0]),
                "HS* algorithms can never use a JWKS (a shared secret is never published)",
            )
        if not jwks:
            for option in _JWKS_TUNING:
                if option in options:
                    raise ConfigError(self.path(option), "only with jwks_url or issuer_discovery")
        if self.algorithms[0] in HMAC_ALGORITHMS:
            if given != ["secret"]:
                raise ConfigError(self.path("secret"), "HS* algorithms need `secret` (only)")
            secret = options["secret"]
            if not isinstance(secret, str):
                raise ConfigError(self.path("secret"), "expected text (e.g. ${JWT_SECRET})")
            data = secret.encode()
            if len(data) < MIN_SECRET_BYTES:
                raise ConfigError(
                    self.path("secret"), f"at least {MIN_SECRET_BYTES} bytes, got {len(data)}"
                )
            if b"-----BEGIN" in data or data.startswith(b"ssh-"):
                raise ConfigError(self.path("secret"), "looks like a public key, not a secret")
            return data
        if len(given) != 1 or given[0] == "secret":
            raise ConfigError(
                self.path("public_key"),
                "asymmetric algorithms need exactly one of public_key, public_key_file, "
                "jwks_url or issuer_discovery",
            )
        option = given[0]
        if option in _JWKS_SOURCES:
            self.jwks = self._jwks(options, option)
            return None
        value = options[option]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.path(option), "expected text")
        if option == "public_key_file":
            try:
                value = Path(value).read_text()
            except OSError as exc:
                raise ConfigError(self.path(option), f"cannot read: {exc.strerror}") from None
        try:
            key = load_pem_public_key(value.encode())
        except (ValueError, TypeError):
            raise ConfigError(self.path(option), "not a PEM public key") from None
        for alg in self.algorithms:
            if not isinstance(key, _KEY_TYPES[alg]):
                raise ConfigError(
                    self.path(option), f"a {type(key).__name__} cannot verify {alg} tokens"
                )
        return key

    def _jwks(self, options: dict[str, Any], source: str) -> JwksSettings:
        try:
            key_shapes(self.algorithms)
        except ValueError as exc:
            raise ConfigError(self.path("algorithms"), str(exc)) from None
        allow_http = options.get("allow_insecure_jwks_http", False)
        if not isinstance(allow_http, bool):
            raise ConfigError(self.path("allow_insecure_jwks_http"), "expected true or false")
        if source == "jwks_url":
            url, issuer = options["jwks_url"], None
            why = check_url(url, allow_http)
        else:
            url, issuer = None, self.issuer
            if not isinstance(issuer, str):
                raise ConfigError(
                    self.path("issuer"), "issuer_discovery needs one `issuer` (its URL)"
                )
            why = check_url(issuer, allow_http)
            source = "issuer"
        if why is not None:
            raise ConfigError(self.path(source), why)
        min_refresh = self._number(options, "jwks_min_refresh", 10, minimum=1)
        refresh = self._number(options, "jwks_refresh", 300, minimum=1)
        if refresh < min_refresh or refresh > 86400:
            raise ConfigError(
                self.path("jwks_refresh"), "expected jwks_min_refresh <= jwks_refresh <= 86400"
            )
        timeout = self._number(options, "jwks_timeout", 5, minimum=0.1)
        if timeout > 60:
            raise ConfigError(self.path("jwks_timeout"), "expected at most 60 seconds")
        return JwksSettings(
            algorithms=tuple(self.algorithms),
            jwks_url=url,
            discovery_issuer=issuer,
            ssl_context=self._ca_context(options.get("jwks_ca_file"), url or issuer),
            ca_file=options.get("jwks_ca_file"),
            allow_http=allow_http,
            refresh=float(refresh),
            min_refresh=float(min_refresh),
            timeout=float(timeout),
        )

    def _ca_context(self, ca_file: Any, url: str) -> ssl.SSLContext | None:
        """Verified TLS trusting only `ca_file` (None: the client's system trust store).
        Built once with the config (as public_key_file is read), never per fetch."""
        if ca_file is None:
            return None
        at = self.path("jwks_ca_file")
        if not isinstance(ca_file, str) or not ca_file:
            raise ConfigError(at, "expected the path of a PEM CA bundle")
        if not url.lower().startswith("https:"):
            raise ConfigError(at, "only for an https URL")
        return verifying_context(ca_file, at)

    def _names(
        self, options: dict[str, Any], option: str, *, allow_one: bool = False, default: Any
    ) -> Any:
        value = options.get(option, default)
        if value is None or value == default:
            return value
        if allow_one and isinstance(value, str) and value:
            return value
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise ConfigError(self.path(option), "expected a list of non-empty strings")

    def _number(self, options: dict[str, Any], option: str, default: float, minimum: float):
        value = options.get(option, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ConfigError(self.path(option), f"expected a number >= {minimum}")
        return value

    def _claim(self, options: dict[str, Any], option: str) -> tuple[str, ...] | None:
        value = options.get(option)
        if value is None:
            return None
        if not isinstance(value, str) or not all(value.split(".")):
            raise ConfigError(self.path(option), "expected a claim name (dotted for nesting)")
        return tuple(value.split("."))

    def _token_from(self, value: Any) -> tuple[str, str]:
        at = self.path("token_from")
        if value == "header":
            return ("bearer", "authorization")
        if isinstance(value, str):
            kind, _, name = value.partition(":")
            if kind in ("header", "cookie", "query") and name.strip():
                name = name.strip()
                return (kind, name.lower() if kind == "header" else name)
        raise ConfigError(at, "expected header, header:NAME, cookie:NAME or query:NAME")


@register
class JwtAuth:
    """One `jwt_auth` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "jwt_auth"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        self.options = opts = _Options(options, name)
        self.name = name
        credential = "authorization" if opts.token_from[0] == "bearer" else opts.token_from[1]
        creds = (credential,) if opts.token_from[0] in ("bearer", "header") else ()
        self.common = AuthCommon(options, name, self.type, creds)
        self.strip_request_headers = self.common.strip_request_headers
        self._decode_options = {"require": list(opts.required_claims)}
        self._header = opts.token_from[1].encode("latin-1")
        self._cache: OrderedDict[bytes, tuple[float, Identity, bytes]] = OrderedDict()
        # A token in a header is also remembered in C (when this middleware comes first on a
        # route, the connection checks it there and no Python runs for a repeat): keyed by the
        # header's whole value, for the same time as `_cache`, emptied with it.
        self.credential_cache: CredentialCache | None = None
        if opts.token_from[0] in ("bearer", "header") and opts.cache_size:
            self.credential_cache = CredentialCache(self._header, opts.cache_size)
        self.clock = time.time
        self.verified = 0  # tokens verified with the key (cache misses that got that far)
        # With a key set: a new set flushes the caches (a closure over the two caches is all
        # the manager holds, so the manager's task never keeps the middleware alive).
        self.keys: KeyManager | None = None
        if opts.jwks is not None:
            self.keys = KeyManager(
                opts.jwks, name, on_rotate=_flusher(self._cache, self.credential_cache)
            )

    # ---- per request --------------------------------------------------------------------------

    def on_request(self, ctx: RequestContext) -> LocalReply | Awaitable[Any] | None:
        common = self.common
        if common.skip(ctx):
            return None
        token = self._extract(ctx.head)
        if not token:
            return common.missing(ctx, self._challenge(None, "missing bearer token"))
        if len(token) > self.options.max_token_bytes:
            return self._refuse(ctx, "token too large")
        hit = self._cache.get(token)
        if hit is not None and hit[0] > self.clock():
            self._cache.move_to_end(token)
            common.admit(ctx, hit[1], hit[2])
            return None
        if self.keys is not None:
            return self._with_key_set(ctx, token)
        return self._check(ctx, token, (self.options.key,))

    def _check(self, ctx: RequestContext, token: bytes, keys: tuple[Any, ...]) -> LocalReply | None:
        """Verify `token` with `keys` (the first that verifies), then admit or refuse."""
        common = self.common
        try:
            claims = self._verify(token, keys)
        except (jwt.InvalidTokenError, jwt.InvalidKeyError) as exc:
            return self._refuse(ctx, _describe(exc))
        identity = self._identity(claims)
        lines = common.forward_lines(identity)
        if self._remember(token, claims, identity, lines) and self.credential_cache is not None:
            raw = ctx.head.get(self._header)
            if raw is not None:
                ttl = float(claims["exp"]) - self.clock()
                self.credential_cache.put(raw, ttl, identity, lines)
        common.admit(ctx, identity, lines)
        return None

    def _extract(self, head: Any) -> bytes | None:
        kind, name = self.options.token_from
        if kind == "bearer":
            value = head.get(b"authorization")
            if value is None:
                return None
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
        if kind == "header":
            value = head.get(self._header)
            return value.strip() if value is not None else None
        if kind == "cookie":
            for header in head.get_all(b"cookie"):
                for pair in header.split(b";"):
                    key, sep, value = pair.strip().partition(b"=")
                    if sep and key == self._header:
                        return value.strip().strip(b'"')
            return None
        query = head.query
        if not query:
            return None
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == name:
                return value.encode("latin-1")
        return None

    def _with_key_set(self, ctx: RequestContext, token: bytes) -> Any:
        """Select the key by the token's kid: verify now when it is known, else await a fetch
        (a coroutine) when one may bring it, else refuse."""
        try:
            kid = token_kid(token)
        except jwt.InvalidTokenError:
            return self._refuse(ctx, "malformed token")
        manager = self.keys
        assert manager is not None
        keys = manager.find(kid)
        if keys is not None:
            return self._check(ctx, token, keys)
        if manager.must_wait(kid):
            return self._after_fetch(ctx, token, kid)
        return self._no_key(ctx)

    async def _after_fetch(self, ctx: RequestContext, token: bytes, kid: str | None) -> Any:
        assert self.keys is not None
        keys = await self.keys.refresh_for(kid)
        if keys is None:
            return self._no_key(ctx)
        return self._check(ctx, token, keys)

    def _no_key(self, ctx: RequestContext) -> LocalReply:
        assert self.keys is not None
        if not self.keys.ready:
            reply = LocalReply.error(503, "keys unavailable", Retry_After="1")
            return self.common.refuse(ctx, "keys unavailable", reply)
        return self._refuse(ctx, "unknown key")

    def _verify(self, token: bytes, keys: tuple[Any, ...]) -> dict[str, Any]:
        opts = self.options
        self.verified += 1
        last = len(keys) - 1
        for i, key in enumerate(keys):
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=opts.algorithms,
                    audience=opts.audience,
                    issuer=opts.issuer,
                    leeway=opts.leeway,
                    options=self._decode_options,
                )
            except jwt.InvalidSignatureError:
                # Several published keys may share a kid: try the next one, if any.
                if i == last:
                    raise
        raise jwt.InvalidSignatureError("no key")

    def _identity(self, claims: dict[str, Any]) -> Identity:
        opts = self.options
        if opts.scopes_claim is not None:
            scopes = _strings(_lookup(claims, opts.scopes_claim))
        else:
            scopes = _strings(claims.get("scope")) | _strings(claims.get("scp"))
        consumer = _lookup(claims, opts.consumer_claim) if opts.consumer_claim else None
        sub = claims.get("sub")
        return Identity(
            method="jwt",
            subject="" if sub is None else str(sub),
            consumer=None if consumer is None else str(consumer),
            scopes=scopes,
            roles=_strings(_lookup(claims, opts.roles_claim)) if opts.roles_claim else frozenset(),
            groups=(
                _strings(_lookup(claims, opts.groups_claim)) if opts.groups_claim else frozenset()
            ),
            claims=tuple((n, claims[n]) for n in opts.forward_claims if n in claims),
        )

    def _remember(
        self, token: bytes, claims: dict[str, Any], identity: Identity, lines: bytes
    ) -> bool:
        """Cache a verified token until its exp; False when it is not cached."""
        exp = claims.get("exp")
        size = self.options.cache_size
        # Without an exp there is no moment the answer stops being true: verify every time.
        if size == 0 or isinstance(exp, bool) or not isinstance(exp, int | float):
            return False
        cache = self._cache
        cache[token] = (float(exp), identity, lines)
        cache.move_to_end(token)
        while len(cache) > size:
            cache.popitem(last=False)
        return True

    def _refuse(self, ctx: RequestContext, description: str) -> LocalReply:
        return self.common.refuse(ctx, description, self._challenge(description))

    def _challenge(self, description: str | None, message: str = "invalid token") -> LocalReply:
        if description is None:
            challenge = 'Bearer realm="fastgate"'
        else:
            challenge = (
                f'Bearer realm="fastgate", error="invalid_token", error_description="{description}"'
            )
        return LocalReply.error(401, message, WWW_Authenticate=challenge)

    # ---- operations ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cached": len(self._cache),
            "fast_hits": self.credential_cache.hits if self.credential_cache is not None else 0,
            "verified": self.verified,
            "failures": dict(self.common.failures),
        }
        if self.keys is not None:
            out["jwks"] = self.keys.stats()
        return out

    def close(self) -> None:
        """Retired by a reload: stop the key set's background refresh."""
        if self.keys is not None:
            self.keys.close()


def _flusher(cache: OrderedDict[bytes, Any], fast: CredentialCache | None) -> Any:
    """Empty both verification caches (on a key rotation)."""

    def flush() -> None:
        cache.clear()
        if fast is not None:
            fast.clear()

    return flush


def _describe(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}"  # a name from the config, not from the token
    for kind, text in _DESCRIPTIONS:
        if isinstance(exc, kind):
            return text
    return "invalid token"


def _lookup(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> frozenset[str]:
    """A claim holding names: a space-separated string (OAuth `scope`) or a list."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(str(v) for v in value if isinstance(v, str | int))
    return frozenset()


__all__ = ["ALGORITHMS", "JwtAuth"]
