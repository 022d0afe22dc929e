"""`KeyManager`: the verification keys of one `jwt_auth` middleware, from a JWKS URL or from
OIDC discovery, fetched and refreshed in the background on the worker's event loop.

    jwks_url: https://id.example.com/.well-known/jwks.json     # or, with `issuer`:
    issuer_discovery: true    # GET {issuer}/.well-known/openid-configuration -> jwks_uri

Security rules this file obeys:
- The accepted algorithms come from the config only. A JWK is used only when its `kty`/`crv`
  fits every configured algorithm (RSA for RS*/PS*, EC P-256 for ES256, EC P-384 for ES384,
  OKP Ed25519/Ed448 for EdDSA), its `use` (if present) is "sig" and its `alg` (if present) is
  one of the configured algorithms; any other key is skipped, as is an RSA key shorter than
  2048 bits. HS* algorithms never use a JWKS (a shared secret is never published), and `oct`
  or private keys (`d`) are never loaded.
- Keys are built by PyJWT (`PyJWK`, jwt.algorithms); the public key object is kept, not the
  PyJWK, so the token's `alg` (checked against the configured list by `jwt.decode`) picks the
  verification algorithm among the configured ones, and the key type is checked once more
  against what each algorithm needs. No hand-written crypto.
- A token's `kid` selects the key; `jku`, `x5u`, `jwk`, `x5c` are never read or fetched. A
  token without `kid` is verified only when the set has exactly one usable key.
- Every URL is https (verified TLS: the system roots, or only `jwks_ca_file`) unless
  `allow_insecure_jwks_http` says otherwise; that holds for a discovered `jwks_uri` too. The
  discovery document's `issuer` must equal the configured issuer exactly, else it is refused.
- Fetching is asynchronous (fastgate.client.http.HttpClient), never on the request's path
  unless a request has to wait for keys, and bounded: `jwks_timeout` for a whole fetch
  (discovery included), a 1 MiB document, at most 100 keys per set (more: the set is refused),
  a `kid` of at most 256 characters.
- Unknown kids: at most one fetch per `jwks_min_refresh` seconds, single flight (concurrent
  requests await the one fetch). A kid still unknown after a fetch is cached negatively until
  the next successful fetch, so a flood of invented kids costs a dict lookup each.
- A failed fetch (unreachable, timeout, non-200, bad JSON, no usable key) keeps the last good
  keys, logs a warning without any key material or token, and is retried with backoff
  (jwks_min_refresh doubling up to jwks_refresh). Until a first set arrives, nothing verifies.
- When a fetched set differs from the current one, `on_rotate` is called (the middleware
  flushes its verification cache): a removed key stops verifying even cached tokens.
- A config reload builds a new manager that fetches afresh (a reload is also how an operator
  makes sure a revoked key is gone). Only if that first fetch fails does it fall back to the
  last good set this process fetched from the same source (same URL or issuer, algorithms,
  trust and http setting), so a reload while the IdP is down is not an outage.
- The background task holds only a weak reference to the manager: when the middleware is
  retired (`close()`) or garbage, the task ends. No idle connection is pooled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from fastgate.client.http import HttpClient, HttpClientError, cache_max_age

log = logging.getLogger("fastgate.auth.jwks")

MAX_KEYS = 100
MAX_DOCUMENT = 1 << 20
MAX_KID = 256
MIN_RSA_BITS = 2048
MAX_REFRESH = 86400.0
MAX_NEGATIVE = 4096  # unknown kids remembered; past that, the min_refresh gate alone bounds
MAX_REMEMBERED = 64  # last good sets kept per source for the next config generation
DISCOVERY_PATH = "/.well-known/openid-configuration"
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")

# algorithm -> the (kty, crv) a JWK must have to verify it (crv None: no curve).
_SHAPES: dict[str, frozenset[tuple[str, str | None]]] = {
    **{alg: frozenset({("RSA", None)}) for alg in ("RS256", "RS384", "RS512")},
    **{alg: frozenset({("RSA", None)}) for alg in ("PS256", "PS384", "PS512")},
    "ES256": frozenset({("EC", "P-256")}),
    "ES384": frozenset({("EC", "P-384")}),
    "EdDSA": frozenset({("OKP", "Ed25519"), ("OKP", "Ed448")}),
}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
_PUBLIC_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


class KeySetError(Exception):
    """A fetched document that cannot be used (the message names no key material)."""


def key_shapes(algorithms: list[str]) -> frozenset[tuple[str, str | None]]:
    """The JWK (kty, crv) pairs that can verify every one of `algorithms`; ValueError when an
    algorithm can never come from a JWKS (HS*) or when no key type fits them all."""
    shapes: frozenset[tuple[str, str | None]] | None = None
    for alg in algorithms:
        if alg not in _SHAPES:
            raise ValueError(f"{alg} can never use a JWKS (a shared secret is never published)")
        shapes = _SHAPES[alg] if shapes is None else shapes & _SHAPES[alg]
    if not shapes:
        raise ValueError(
            "with a JWKS every configured algorithm must use the same key type "
            "(e.g. [RS256, PS256]); use one middleware per key type"
        )
    return shapes


def token_kid(token: bytes) -> str | None:
    """The `kid` of a token's header (jwt.DecodeError when the header is not readable). Only
    the kid is taken from the unverified header, never the algorithm or any URL."""
    kid = jwt.get_unverified_header(token).get("kid")
    if kid is None:
        return None
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID:
        return ""  # never matches a key (kids are non-empty): refused as unknown, no fetch
    return kid


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one fetched set: kid -> keys (a kid may name several), the one key
    a token without kid may use (when the set has exactly one), and a fingerprint to see
    whether a newer set differs."""

    by_kid: dict[str, tuple[Any, ...]]
    only: Any
    fingerprint: frozenset[str]
    skipped: int

    def __len__(self) -> int:
        return len(self.fingerprint)


def parse_key_set(doc: Any, algorithms: list[str]) -> KeySet:
    """The usable keys of a JWKS document (RFC 7517 §5); KeySetError when there are none."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySetError("not a JWK set (an object with a `keys` list)")
    entries = doc["keys"]
    if len(entries) > MAX_KEYS:
        raise KeySetError(f"{len(entries)} keys in the set, more than {MAX_KEYS}")
    shapes = key_shapes(algorithms)
    by_kid: dict[str, list[Any]] = {}
    usable: list[Any] = []
    prints: set[str] = set()
    for entry in entries:
        key = _usable_key(entry, algorithms, shapes)
        if key is None:
            continue
        usable.append(key)
        prints.add(json.dumps(entry, sort_keys=True))
        kid = entry.get("kid")
        if kid is not None:
            by_kid.setdefault(kid, []).append(key)
    if not usable:
        raise KeySetError(f"no usable key among {len(entries)} (for {', '.join(algorithms)})")
    return KeySet(
        by_kid={kid: tuple(keys) for kid, keys in by_kid.items()},
        only=usable[0] if len(usable) == 1 else None,
        fingerprint=frozenset(prints),
        skipped=len(entries) - len(usable),
    )


def _usable_key(entry: Any, algorithms: list[str], shapes: frozenset) -> Any:
    """The public key of one JWK, or None when it must not verify these algorithms."""
    if not isinstance(entry, dict):
        return None
    kid = entry.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID):
        return None
    if "use" in entry and entry["use"] != "sig":
        return None
    if "alg" in entry and entry["alg"] not in algorithms:
        return None
    kty, crv = entry.get("kty"), entry.get("crv")
    if (kty, crv if kty != "RSA" else None) not in shapes:
        return None
    if any(member in entry for member in _PRIVATE_MEMBERS):
        return None  # a private (or symmetric) key published by mistake is never used
    try:
        # The algorithm only tells PyJWT which key class to build: every configured one
        # fits this kty/crv. Only the key object is kept (see the module docstring).
        key = jwt.PyJWK(entry, algorithm=algorithms[0]).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
        return None
    if not isinstance(key, _PUBLIC_TYPES):
        return None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, _CURVES[crv]):
        return None
    return key


@dataclass(frozen=True, slots=True)
class JwksSettings:
    """Where the keys come from and how often they are fetched (validated by jwt_auth)."""

    algorithms: tuple[str, ...]
    jwks_url: str | None = None  # exactly one of jwks_url and discovery_issuer
    discovery_issuer: str | None = None
    ssl_context: ssl.SSLContext | None = None  # None: the system trust store
    ca_file: str | None = None  # where ssl_context came from (identifies the source)
    allow_http: bool = False
    refresh: float = 300.0
    min_refresh: float = 10.0
    timeout: float = 5.0


def check_url(url: Any, allow_http: bool) -> str | None:
    """Why `url` cannot be fetched from (None when it can): http(s), a host, no userinfo."""
    if not isinstance(url, str) or not url.isascii() or not url.isprintable() or " " in url:
        return "expected an http(s) URL"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "http" and not allow_http:
        return "must be https (allow_insecure_jwks_http: true allows http)"
    if scheme not in ("http", "https"):
        return "expected an http(s) URL"
    if not parts.hostname or "@" in parts.netloc:
        return "expected an http(s) URL with a host and no credentials"
    return None


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0 §4: the issuer, less a trailing slash, + the well-known
    path."""
    return issuer.rstrip("/") + DISCOVERY_PATH


# (source) -> the last key set fetched from it in this process, for the next generation's
# manager to fall back on when its first fetch fails (see the module docstring).
_LAST_GOOD: OrderedDict[tuple[Any, ...], KeySet] = OrderedDict()


def _source(settings: JwksSettings) -> tuple[Any, ...]:
    return (
        settings.jwks_url,
        settings.discovery_issuer,
        settings.algorithms,
        settings.ca_file,
        settings.allow_http,
    )


class KeyManager:
    """The current key set of one middleware and the work that keeps it fresh."""

    def __init__(
        self,
        settings: JwksSettings,
        name: str,
        on_rotate: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.on_rotate = on_rotate
        self.algorithms = list(settings.algorithms)
        # No idle pool: a fetch every few minutes gains nothing from keep-alive, and with no
        # pooled connection there is nothing to close (nor to await) when the task ends.
        self.client = HttpClient(ssl_context=settings.ssl_context, max_idle_per_host=0)
        self.keys: KeySet | None = None
        self.jwks_uri = settings.jwks_url
        self._source = _source(settings)
        self._discovered_until = 0.0  # monotonic time the discovered jwks_uri is fresh until
        self._negative: set[str] = set()
        self._last_attempt = float("-inf")  # monotonic start of the last fetch
        self._next_at = 0.0  # monotonic time of the next scheduled fetch
        self._failures = 0
        self._fetching: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.fetches = 0
        self.fetch_failures = 0
        self.rotations = 0
        self.last_error: str | None = None

    # ---- what a request asks ----------------------------------------------------------------

    def find(self, kid: str | None) -> tuple[Any, ...] | None:
        """The keys a token with this kid may be verified with, or None (unknown)."""
        keys = self.keys
        if keys is None:
            return None
        if kid is None:
            return (keys.only,) if keys.only is not None else None
        return keys.by_kid.get(kid)

    def must_wait(self, kid: str | None) -> bool:
        """True when a fetch (running, or allowed now) could still bring this kid's key:
        the request should await `refresh_for`. False: answer now (unknown / unavailable)."""
        if self.keys is not None and (kid is None or kid == "" or kid in self._negative):
            return False
        return self._fetching is not None or self._may_fetch()

    @property
    def ready(self) -> bool:
        return self.keys is not None

    async def refresh_for(self, kid: str | None) -> tuple[Any, ...] | None:
        """Await the running fetch, or start one when min_refresh allows, at most `timeout`
        seconds; then the keys for `kid` (None: still unknown, now cached negatively)."""
        found = self.find(kid)
        if found is not None:
            return found
        self.ensure_started()
        task = self._fetching
        if task is None and self._may_fetch():
            task = self._start_fetch()
        if task is not None:
            await asyncio.wait({task}, timeout=self.settings.timeout)
        found = self.find(kid)
        if found is None and kid and self.keys is not None and len(self._negative) < MAX_NEGATIVE:
            self._negative.add(kid)
        return found

    # ---- lifecycle --------------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the background refresh on the running loop (once; never after close)."""
        if self._runner is not None or self._closed:
            return
        runner = asyncio.get_running_loop().create_task(
            _run(weakref.ref(self)), name=f"jwks:{self.name}"
        )
        self._runner = runner
        finalizer = weakref.finalize(self, runner.cancel)
        finalizer.atexit = False

    async def start(self) -> bool:
        """Start the background refresh and await the first key set (bounded by the
        timeout); True when keys are there."""
        self.ensure_started()
        if self.keys is None:
            await self.refresh_for(None)
        return self.keys is not None

    def close(self) -> None:
        """Stop refreshing (the middleware is retired); a fetch in flight is aborted."""
        self._closed = True
        for task in (self._fetching, self._runner):
            if task is not None:
                task.cancel()

    # ---- fetching ---------------------------------------------------------------------------

    def _may_fetch(self) -> bool:
        return (
            not self._closed and time.monotonic() - self._last_attempt >= self.settings.min_refresh
        )

    def _start_fetch(self) -> asyncio.Task[None]:
        """The one fetch in flight (single flight: started only when none runs)."""
        if self._fetching is None:
            self._last_attempt = time.monotonic()
            task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(self._fetched)
            self._fetching = task
        return self._fetching

    def _fetched(self, task: asyncio.Task[None]) -> None:
        if self._fetching is task:
            self._fetching = None

    async def _fetch(self) -> None:
        """One fetch; installs the new set or records the failure. Never raises (but for
        cancellation): the last good keys stay in place on any failure."""
        self.fetches += 1
        try:
            async with asyncio.timeout(self.settings.timeout):
                keys, max_age = await self._download()
        except (HttpClientError, KeySetError, ValueError) as exc:
            self._failed(str(exc))
        except TimeoutError:
            self._failed(f"no key set within {self.settings.timeout:g} s")
        else:
            self._install(keys, max_age)

    async def _download(self) -> tuple[KeySet, float | None]:
        settings = self.settings
        if settings.discovery_issuer is not None and (
            self.jwks_uri is None or time.monotonic() >= self._discovered_until
        ):
            await self._discover(settings.discovery_issuer)
        assert self.jwks_uri is not None
        try:
            doc, max_age = await self._get_json(self.jwks_uri, "JWKS")
            return parse_key_set(doc, self.algorithms), max_age
        except (HttpClientError, KeySetError):
            self._discovered_until = 0.0  # the jwks_uri may have moved: discover again
            raise

    async def _discover(self, issuer: str) -> None:
        doc, max_age = await self._get_json(discovery_url(issuer), "discovery document")
        if not isinstance(doc, dict):
            raise KeySetError("discovery document is not a JSON object")
        if doc.get("issuer") != issuer:
            raise KeySetError("discovery document names another issuer; refused")
        uri = doc.get("jwks_uri")
        why = check_url(uri, self.settings.allow_http)
        if why is not None:
            raise KeySetError(f"discovery document jwks_uri: {why}")
        self.jwks_uri = uri
        self._discovered_until = time.monotonic() + self._interval(max_age)

    async def _get_json(self, url: str, what: str) -> tuple[Any, float | None]:
        response = await self.client.request(
            "GET",
            url,
            headers=(("Accept", "application/json"),),
            timeout=self.settings.timeout,
            max_body=MAX_DOCUMENT,
        )
        where = _where(url)
        if response.status != 200:
            raise KeySetError(f"{what} from {where}: HTTP {response.status}")
        try:
            doc = json.loads(response.body)
        except (ValueError, RecursionError):
            raise KeySetError(f"{what} from {where}: not valid JSON") from None
        return doc, cache_max_age(response)

    def _interval(self, max_age: float | None) -> float:
        settings = self.settings
        seconds = settings.refresh if max_age is None else max_age
        return min(max(seconds, settings.min_refresh), MAX_REFRESH)

    def _install(self, keys: KeySet, max_age: float | None) -> None:
        old = self.keys
        self.keys = keys
        self._negative.clear()
        self._failures = 0
        self.last_error = None
        self._next_at = time.monotonic() + self._interval(max_age)
        if old is None or old.fingerprint != keys.fingerprint:
            if old is not None:
                self.rotations += 1
                log.info("jwt_auth %s: new key set (%d keys)", self.name, len(keys))
            self.on_rotate()
        if keys.skipped:
            log.debug("jwt_auth %s: %d keys skipped (type/use/alg)", self.name, keys.skipped)
        _LAST_GOOD[self._source] = keys
        _LAST_GOOD.move_to_end(self._source)
        while len(_LAST_GOOD) > MAX_REMEMBERED:
            _LAST_GOOD.popitem(last=False)

    def _failed(self, reason: str) -> None:
        self.fetch_failures += 1
        self._failures = min(self._failures + 1, 32)
        settings = self.settings
        backoff = min(settings.min_refresh * 2 ** (self._failures - 1), settings.refresh)
        self._next_at = time.monotonic() + max(backoff, settings.min_refresh)
        self.last_error = reason
        if self.keys is not None:
            kept = "keeping the last good keys"
        elif (remembered := _LAST_GOOD.get(self._source)) is not None:
            self.keys = remembered
            kept = "keeping the last good keys (fetched before the reload)"
        else:
            kept = "no keys yet"
        log.warning(
            "jwt_auth %s: key fetch failed (%s); %s, retry in %.0f s",
            self.name,
            reason,
            kept,
            backoff,
        )

    # ---- operations -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "keys": len(self.keys) if self.keys is not None else 0,
            "fetches": self.fetches,
            "fetch_failures": self.fetch_failures,
            "rotations": self.rotations,
            "unknown_kids": len(self._negative),
            "last_error": self.last_error,
        }


async def _run(ref: weakref.ReferenceType[KeyManager]) -> None:
    """The scheduled refreshes. Holds the manager only while a fetch runs, so a retired or
    dropped middleware is not kept alive by its own background task (a finalizer cancels
    the task when the manager goes)."""
    while True:
        manager = ref()
        if manager is None or manager._closed:
            return
        delay = manager._next_at - time.monotonic()
        if delay <= 0:
            task = manager._start_fetch()
            del manager
            await asyncio.wait({task})
            continue
        del manager
        await asyncio.sleep(delay)


def _where(url: str) -> str:
    """host:port of a URL, for messages (never its path or query)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return f"{parts.hostname}:{port}"


__all__ = [
    "MAX_DOCUMENT",
    "MAX_KEYS",
    "MAX_KID",
    "JwksSettings",
    "KeyManager",
    "KeySet",
    "KeySetError",
    "check_url",
    "discovery_url",
    "key_shapes",
    "parse_key_set",
    "token_kid",
]
