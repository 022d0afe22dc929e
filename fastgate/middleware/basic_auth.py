"""`type: basic_auth`: HTTP Basic authentication (RFC 7617) against an htpasswd file or the
consumer store, setting `ctx.identity`.

    middlewares:
      staff:
        type: basic_auth
        htpasswd: /etc/fastgate/users.htpasswd   # bcrypt or argon2 entries only
        # store: default                         # ... or the consumer store (path or `default`)
        realm: fastgate                          # the challenge's realm
        cache_ttl: 30                            # seconds a verified user:password is kept
        groups: {ops: [alice, bob]}              # htpasswd only: group membership
        forward_headers: {X-User: subject}
        hide_credentials: true

Security rules this file obeys:
- Passwords are checked with slow salted hashes only (fastgate.auth.passwords: bcrypt and
  argon2; MD5/SHA-1/crypt/plain htpasswd lines are refused when loading, naming the line).
- A check never runs on the event loop: it goes to the worker's bounded pool
  (`shared_pool()`); when that pool's queue is full the answer is 503 `Retry-After: 1`, so a
  flood of guesses cannot queue without end.
- An unknown user costs the same work as a known one and gets the same 401 as a wrong
  password: the reply never tells which part was wrong. For htpasswd users the check runs
  against the file's first hash (a decoy: same algorithm and cost as the real users, result
  ignored), since `verify_or_dummy`'s argon2 dummy would take a different time than the
  file's bcrypt hashes; store users are all argon2id, like that dummy.
- Replies, logs and audit records never hold the password or a hash; the challenge is fixed
  text built from the configured realm. Refusals go to the audit stream without the user name
  (people type passwords into the user field).
- Verified pairs are remembered `cache_ttl` seconds by an HMAC under a per-process key
  (fastgate.auth.basic_credentials.SuccessCache); failures are never cached. The cache is
  dropped whenever the user source changes (htpasswd reload, store refresh), and a check that
  started before such a change is not cached when it ends.
- The htpasswd file is watched with one `os.stat` per second at most (on the loop: it is
  cheap); a changed file is read off the loop. A file that fails to load (unreadable, weak
  hash, bad line) keeps the users loaded before and logs a warning naming the line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import ConfigDict, Field

from fastgate.auth.basic_credentials import (
    BlockingPool,
    SuccessCache,
    basic_or_verdict,
    shared_pool,
)
from fastgate.auth.common import AuthCommon, AuthOptions, parse_options
from fastgate.auth.passwords import load_htpasswd, verify_or_dummy
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import register

log = logging.getLogger("fastgate.basic_auth")

# RFC 9110 §5.6.4 qdtext without HTAB and obs-text: no `"` or `\`, so no escaping is needed.
_REALM = re.compile(r"[ !#-\[\]-~]{1,128}")
_GROUP = re.compile(r"[^\x00-\x1f\x7f,]+")  # groups are forwarded comma-joined
RELOAD_INTERVAL = 1.0  # seconds between two looks at the htpasswd file


class BasicAuthOptions(AuthOptions):
    """`basic_auth` options (plus the common forward_headers / hide_credentials / optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    htpasswd: str | None = None
    store: str | None = None
    realm: str = "fastgate"
    cache_ttl: float = Field(30, ge=0, le=3600)
    groups: dict[str, list[str]] | None = None


def _validate(opts: BasicAuthOptions) -> None:
    """The checks pydantic's field types do not express; paths relative to the middleware."""
    if (opts.htpasswd is None) == (opts.store is None):
        raise ConfigError("htpasswd", "give exactly one of htpasswd (a file) or store")
    for option in ("htpasswd", "store"):
        value = getattr(opts, option)
        if value is not None and not value.strip():
            raise ConfigError(option, "expected a path")
    if not _REALM.fullmatch(opts.realm):
        raise ConfigError(
            "realm", "1 to 128 printable ASCII characters, without a double quote or backslash"
        )
    if opts.groups is not None:
        if opts.store is not None:
            raise ConfigError("groups", "with store, groups come from the consumer store")
        for group, users in opts.groups.items():
            if not _GROUP.fullmatch(group):
                raise ConfigError(f"groups.{group}", "not a valid group name")
            for i, user in enumerate(users):
                if not user or ":" in user:
                    raise ConfigError(f"groups.{group}[{i}]", "not a valid user name")


# ---- where users come from -------------------------------------------------------------------


class _Source(Protocol):
    """A user source: `lookup` gives (hash, identity) or (None, None) for an unknown user;
    `poll` is called per request (cheap) and bumps `generation` when the users changed."""

    generation: int

    def poll(self, pool: BlockingPool) -> None: ...

    def lookup(self, user: str) -> tuple[str | None, Identity | None]: ...

    def close(self) -> None: ...


def _signature(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file: mtime, size and inode (a file replaced by rename)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _decoy(users: dict[str, str]) -> str | None:
    """The hash an unknown user's password is checked against (None: verify_or_dummy's)."""
    return next(iter(users.values()), None)


class _Htpasswd:
    """Users from an htpasswd file, reloaded off the loop when the file changes."""

    def __init__(
        self,
        path: str,
        groups: dict[str, list[str]] | None,
        name: str,
        on_change: Callable[[], None],
    ) -> None:
        self.path = path
        self.name = name
        self.on_change = on_change
        self.signature = _signature(path)  # before reading: a later change shows as new
        self.users = load_htpasswd(path, "htpasswd")
        self.decoy = _decoy(self.users)
        self.groups: dict[str, frozenset[str]] = {}
        for group, members in (groups or {}).items():
            for user in members:
                self.groups[user] = self.groups.get(user, frozenset()) | {group}
        self.generation = 0
        self.reloads = 0
        self.clock: Callable[[], float] = time.monotonic
        self.next_check = self.clock() + RELOAD_INTERVAL
        self.reloading: asyncio.Future[dict[str, str]] | None = None

    def lookup(self, user: str) -> tuple[str | None, Identity | None]:
        hashed = self.users.get(user)
        if hashed is None:
            return self.decoy, None  # checked, then refused whatever the result
        return hashed, Identity(
            method="basic", subject=user, groups=self.groups.get(user, frozenset())
        )

    def poll(self, pool: BlockingPool) -> None:
        now = self.clock()
        if now < self.next_check or self.reloading is not None:
            return
        self.next_check = now + RELOAD_INTERVAL
        signature = _signature(self.path)
        if signature == self.signature:
            return
        if signature is None:
            self.signature = None
            log.warning(
                "basic_auth %s: cannot stat %s; keeping the %d users loaded before",
                self.name,
                self.path,
                len(self.users),
            )
            return
        future = pool.submit(load_htpasswd, self.path, "htpasswd")
        if future is None:
            return  # the pool is full: look again in a second
        self.reloading = future
        future.add_done_callback(lambda done: self._loaded(done, signature))

    def _loaded(self, future: asyncio.Future[dict[str, str]], signature: Any) -> None:
        self.reloading = None
        if future.cancelled():
            return
        self.signature = signature  # a broken file is not retried until it changes again
        exc = future.exception()
        if exc is not None:
            reason = exc.reason if isinstance(exc, ConfigError) else type(exc).__name__
            log.warning(
                "basic_auth %s: htpasswd not reloaded (%s); keeping the %d users loaded before",
                self.name,
                reason,
                len(self.users),
            )
            return
        self.users = future.result()
        self.decoy = _decoy(self.users)
        self.generation += 1
        self.reloads += 1
        self.on_change()
        log.info("basic_auth %s: reloaded %s (%d users)", self.name, self.path, len(self.users))

    def close(self) -> None:
        """Nothing runs in the background between two requests."""


class _Store:
    """Users from the consumer store (fastgate.auth.consumers), kept current by its shared
    `StoreWatcher` (which reloads the snapshot off the loop when the store changes)."""

    def __init__(self, path: str, name: str, on_change: Callable[[], None]) -> None:
        import sqlite3

        from fastgate.auth import consumers  # only when used: it brings in sqlite3

        location = consumers.default_store_path() if path == "default" else Path(path)
        try:
            self.watcher = consumers.StoreWatcher.for_path(location)
        except (OSError, ValueError, sqlite3.Error) as exc:
            raise ConfigError("store", f"cannot open the consumer store: {exc}") from None
        self.snapshot = self.watcher.current()
        self.name = name
        self.on_change = on_change
        self.generation = 0
        self.closed = False

    def poll(self, pool: BlockingPool) -> None:
        """Follow the watcher's snapshot. `current()` on the loop also starts the watcher's
        refresh task. A new snapshot object means the store changed: that is when the cache
        is dropped. No listener is registered: the shared watcher outlives this instance (a
        config reload builds a new one) and has no way to remove one, and the cache is only
        read right after this check anyway."""
        snapshot = self.watcher.current()
        if snapshot is not self.snapshot:
            self.snapshot = snapshot
            self.generation += 1
            self.on_change()

    def close(self) -> None:
        """Give back this instance's use of the shared watcher (once)."""
        if not self.closed:
            self.closed = True
            self.watcher.stop()

    def lookup(self, user: str) -> tuple[str | None, Identity | None]:
        found = self.snapshot.password_hash(user)
        if found is None:
            return None, None
        consumer, hashed = found
        return hashed, Identity(
            method="basic",
            subject=user,
            consumer=consumer.name,
            scopes=frozenset(consumer.scopes),
            roles=frozenset(consumer.roles),
            groups=frozenset(consumer.groups),
        )


# ---- the middleware --------------------------------------------------------------------------


@register
class BasicAuth:
    """One `basic_auth` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "basic_auth"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        self.options = opts = parse_options(BasicAuthOptions, options)
        _validate(opts)
        self.name = name
        self.common = AuthCommon(options, name, self.type, credential_headers=("authorization",))
        self.strip_request_headers = self.common.strip_request_headers
        self.cache = SuccessCache(opts.cache_ttl)
        self.pool: BlockingPool = shared_pool()
        self.source: _Source
        if opts.htpasswd is not None:
            self.source = _Htpasswd(opts.htpasswd, opts.groups, name, self.cache.clear)
        else:
            assert opts.store is not None
            self.source = _Store(opts.store, name, self.cache.clear)
        challenge = f'Basic realm="{opts.realm}", charset="UTF-8"'
        self._missing = LocalReply.error(401, "authentication required", WWW_Authenticate=challenge)
        self._malformed = LocalReply.error(401, "malformed credentials", WWW_Authenticate=challenge)
        self._invalid = LocalReply.error(401, "invalid credentials", WWW_Authenticate=challenge)
        self._busy = LocalReply.error(503, "authentication busy", Retry_After="1")
        self.verified = 0  # password checks run (cache misses)
        self.busy = 0  # checks refused because the pool's queue was full

    # ---- per request --------------------------------------------------------------------------

    def on_request(
        self, ctx: RequestContext
    ) -> LocalReply | Coroutine[Any, Any, LocalReply | None] | None:
        common = self.common
        credentials = basic_or_verdict(ctx, common, self._missing, self._malformed)
        if type(credentials) is not tuple:
            return credentials
        user, password = credentials
        source = self.source
        source.poll(self.pool)
        digest = self.cache.digest(user, password)
        identity = self.cache.get(digest)
        if identity is not None:
            common.admit(ctx, identity)
            return None
        hashed, identity = source.lookup(user)
        future = self.pool.submit(verify_or_dummy, hashed, password)
        if future is None:
            self.busy += 1
            return common.refuse(ctx, "auth busy", self._busy)
        self.verified += 1
        return self._finish(ctx, future, digest, identity, source.generation)

    async def _finish(
        self,
        ctx: RequestContext,
        future: asyncio.Future[bool],
        digest: bytes,
        identity: Identity | None,
        generation: int,
    ) -> LocalReply | None:
        try:
            ok = await future
        except Exception as exc:  # the pool was shut down under us: not the client's fault
            log.warning("basic_auth %s: password check failed: %s", self.name, type(exc).__name__)
            return self.common.refuse(ctx, "auth busy", self._busy)
        if not ok or identity is None:  # no identity: an unknown user checked against a decoy
            return self.common.refuse(ctx, "invalid credentials", self._invalid)
        if generation == self.source.generation:
            self.cache.put(digest, identity)
        self.common.admit(ctx, identity)
        return None

    # ---- operations ---------------------------------------------------------------------------

    def close(self) -> None:
        """Called when this config generation retires: release the store's shared watcher."""
        self.source.close()

    def stats(self) -> dict[str, Any]:
        return {
            "cached": len(self.cache),
            "verified": self.verified,
            "failures": dict(self.common.failures),
            "busy": self.busy,
        }


__all__ = ["BasicAuth", "BasicAuthOptions"]
