"""`type: api_key`: identify the caller by an API key from the consumer store.

    middlewares:
      keys:
        type: api_key
        store: /var/lib/fastgate/consumers.db   # default: see default_store_path()
        header: X-API-Key                        # where the key is
        query: null                              # opt-in query parameter, e.g. api_key
        forward_headers: {X-Consumer: consumer}
        hide_credentials: true

Keys are made with `fastgate keys add CONSUMER` and look like `fgk_<key_id>_<secret>`.

Security rules this file obeys:
- The store is opened read-only in spirit: never with create=True, so a wrong `store` path is
  a ConfigError naming `store`, not a new empty store that refuses everyone.
- A key is checked against the in-memory snapshot (`Snapshot.check_key`: constant-time
  compare, one HMAC even for an unknown id), synchronously; the file is read only by the
  shared `StoreWatcher`, off the event loop, so a revoked key is refused within a second of
  `fastgate keys revoke`. A valid key is then remembered (key -> identity, until its expiry
  and at most VERIFIED_TTL) for as long as the snapshot it was checked against is current:
  any change to the store empties that cache, so it never masks a revocation, and a repeat
  costs one dict lookup instead of an HMAC (3 µs here). Wrong keys are never remembered.
- The first request on a loop waits for a check of the store (off the loop) before it is
  decided: the snapshot loaded when the middleware was built may be old.
- A missing key answers 401 with `WWW-Authenticate: ApiKey realm="fastgate", header="..."`;
  a wrong, revoked or expired key answers 401 "invalid api key" (one phrase for all three, so
  the reply does not tell which ids exist); more than one key in the request is refused.
  The key is never logged or echoed.
- `hide_credentials` strips the key header from the upstream request. A key sent in the
  query string is not removed upstream (not supported yet): prefer the header.
"""

from __future__ import annotations

import asyncio
import re
import time
import warnings
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from pydantic import field_validator

from fastgate._core.conn import CredentialCache
from fastgate.auth.common import AuthCommon, AuthOptions, parse_options
from fastgate.auth.consumers import Consumer, Snapshot, StoreWatcher, default_store_path
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import register

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 field-name
_QUERY_NAME = re.compile(r"[A-Za-z0-9._~-]+")
MAX_VERIFIED_KEYS = 10000
VERIFIED_TTL = 60.0  # seconds; a store change clears the cache sooner
# Headers that frame or route the message: a key can never travel in them.
_NOT_A_KEY_HEADER = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"}
)


class ApiKeyOptions(AuthOptions):
    """`store`, `header`, `query`, plus the common auth options."""

    store: str | None = None
    header: str = "X-API-Key"
    query: str | None = None

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _TOKEN.fullmatch(value):
            raise ValueError("not a valid header name")
        if value.lower() in _NOT_A_KEY_HEADER:
            raise ValueError("this header frames the message; it cannot carry a key")
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: str | None) -> str | None:
        if value is not None and not _QUERY_NAME.fullmatch(value):
            raise ValueError("expected a query parameter name (letters, digits, . _ ~ -)")
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("expected a file path")
        return value


@register
class ApiKey:
    """One `api_key` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "api_key"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(ApiKeyOptions, options)
        self.name = name
        self.common = AuthCommon(options, name, self.type, credential_headers=(opts.header,))
        self.strip_request_headers = self.common.strip_request_headers
        self.path = opts.store if opts.store is not None else str(default_store_path())
        self._header = opts.header.lower().encode("latin-1")
        self._query = opts.query
        if opts.query is not None and opts.hide_credentials is True:
            warnings.warn(
                f"middlewares.{name}.hide_credentials: the `{opts.query}` query parameter is "
                "still passed upstream (only the header is hidden)",
                stacklevel=2,
            )
        try:
            self.watcher = StoreWatcher.for_path(self.path)
        except FileNotFoundError:
            raise ConfigError(
                "store",
                f"no consumer store at {self.path}: create it with `fastgate consumers add`",
            ) from None
        except Exception as exc:  # not a store, unreadable, a broken file
            raise ConfigError(
                "store", f"cannot open the consumer store {self.path}: {exc}"
            ) from None
        # RFC 9110 §11.6.1: every 401 carries a challenge, saying where the key goes.
        challenge = f'ApiKey realm="fastgate", header="{opts.header}"'
        self._missing = LocalReply.error(401, "missing api key", WWW_Authenticate=challenge)
        self._invalid = LocalReply.error(401, "invalid api key", WWW_Authenticate=challenge)
        self.clock = time.time
        self.verified = 0
        # Keys verified against `_snapshot`: key -> (valid until, identity, header lines). A
        # new snapshot (any change to the store) empties it, so a revocation is never masked.
        self._snapshot: Snapshot | None = None
        self._verified: dict[bytes, tuple[float, Identity, bytes]] = {}
        # The same answers for the C fast path (this middleware first on a route: a repeat
        # runs no Python); emptied by the watcher the moment a new snapshot is installed, so
        # a revocation reaches it within the watcher's interval like everything else.
        self.credential_cache = CredentialCache(self._header, MAX_VERIFIED_KEYS)
        self._on_snapshot = _clearer(self.credential_cache)
        self.watcher.add_listener(self._on_snapshot)
        self._closed = False

    # ---- per request --------------------------------------------------------------------------

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        common = self.common
        if common.skip(ctx):
            return None
        key = self._extract(ctx.head)
        if not key:
            return common.missing(ctx, self._missing)
        if key is _AMBIGUOUS:
            return common.refuse(ctx, "more than one api key", self._invalid)
        watcher = self.watcher
        if not watcher.running and asyncio._get_running_loop() is not None:
            return self._decide_fresh(ctx, key)  # first request on this loop: check first
        snapshot = watcher.current()
        if snapshot is not self._snapshot:
            self._snapshot = snapshot  # keys may have been revoked: forget what was verified
            self._verified.clear()
        hit = self._verified.get(key)
        if hit is not None and hit[0] > self.clock():
            self.common.admit(ctx, hit[1], hit[2])
            return None
        return self._decide(ctx, key, snapshot)

    def _decide(self, ctx: RequestContext, key: bytes, snapshot: Snapshot) -> LocalReply | None:
        found = snapshot.check_key(key)
        now = self.clock()
        if found is None or (found[1] is not None and now >= found[1]):
            return self.common.refuse(ctx, "invalid api key", self._invalid)
        consumer, expires = found
        self.verified += 1
        identity = _identity(consumer)
        lines = self.common.forward_lines(identity)
        if snapshot is self._snapshot:
            if len(self._verified) >= MAX_VERIFIED_KEYS:
                self._verified.clear()
            until = now + VERIFIED_TTL if expires is None else min(now + VERIFIED_TTL, expires)
            self._verified[key] = (until, identity, lines)
            raw = ctx.head.get(self._header)
            if raw is not None:  # the key came in the header: the C fast path may answer it
                self.credential_cache.put(raw, until - now, identity, lines)
        self.common.admit(ctx, identity, lines)
        return None

    async def _decide_fresh(self, ctx: RequestContext, key: bytes) -> LocalReply | None:
        snapshot = await self.watcher.fresh()
        return self._decide(ctx, key, snapshot)

    def _extract(self, head: Any) -> bytes | None:
        values = head.get_all(self._header)
        if values:
            return values[0].strip() if len(values) == 1 else _AMBIGUOUS
        if self._query is None or not head.query:
            return None
        found = [
            value
            for name, value in parse_qsl(head.query.decode("latin-1"), keep_blank_values=True)
            if name == self._query
        ]
        if len(found) > 1:
            return _AMBIGUOUS
        return found[0].strip().encode("latin-1", "replace") if found else None

    # ---- operations ---------------------------------------------------------------------------

    def close(self) -> None:
        """Called when this config generation retires: release the shared watcher."""
        if not self._closed:
            self._closed = True
            self.watcher.remove_listener(self._on_snapshot)
            self.watcher.stop()

    def stats(self) -> dict[str, Any]:
        snapshot = self.watcher.current()
        return {
            "keys": len(snapshot),
            "consumers": snapshot.consumers,
            "store_version": snapshot.version,
            "verified": self.verified,
            "failures": dict(self.common.failures),
        }


_AMBIGUOUS = b"\x00ambiguous"  # a sentinel that no real key equals (keys are ASCII text)


def _clearer(cache: CredentialCache) -> Any:
    """A snapshot listener that empties `cache` (and holds nothing else)."""

    def clear(_snapshot: Snapshot) -> None:
        cache.clear()

    return clear


def _identity(consumer: Consumer) -> Identity:
    return Identity(
        method="api_key",
        subject=consumer.name,
        consumer=consumer.name,
        scopes=consumer.scopes,
        roles=consumer.roles,
        groups=consumer.groups,
    )


__all__ = ["ApiKey", "ApiKeyOptions"]
