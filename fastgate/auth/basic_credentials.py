"""What `basic_auth` and `ldap_auth` share: the Basic header, a success cache, and a bounded
pool for the blocking checks (password hashes, LDAP binds).

Rules this file obeys:
- `Authorization: Basic` is parsed strictly (RFC 7617): base64 with padding, UTF-8, a colon;
  anything else is "malformed", never guessed at.
- The success cache is keyed by an HMAC of `user:password` under a random per-process key, so
  the cache never holds a password or a hash that could be attacked offline; entries live
  `ttl` seconds and the whole cache is dropped when the user source changes (`clear`).
  Failures are never cached: a wrong password costs a full check every time, bounded below.
- Blocking checks run on a small thread pool with a bounded queue: past `max_pending` waiting
  checks, `BlockingPool.submit` returns None and the caller answers 503 rather than letting a
  flood of bad passwords queue without end (each costs tens of milliseconds by design).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastgate.middleware.base import Identity

T = TypeVar("T")
MALFORMED = "malformed"


def basic_or_verdict(ctx: Any, common: Any, missing: Any, malformed: Any) -> tuple[str, str] | Any:
    """The request's (user, password) for a Basic middleware, or the verdict to return
    instead: None (an optional middleware passes on; or the request is already identified)
    or a LocalReply (`missing` / `malformed`, counted and audited by `common`)."""
    if common.skip(ctx):
        return None
    credentials = parse_basic(ctx.head.get(b"authorization"))
    if credentials is None:
        return common.missing(ctx, missing)
    if credentials == MALFORMED:
        return common.refuse(ctx, "malformed credentials", malformed)
    return credentials


def parse_basic(value: bytes | None) -> tuple[str, str] | str | None:
    """(user, password) from an `Authorization` value; None when it is absent or another
    scheme; MALFORMED when it says Basic but does not decode to `user:password`."""
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return MALFORMED
    user, sep, password = decoded.partition(":")
    if not sep or not user or any(ord(c) < 0x20 or c == "\x7f" for c in decoded):
        return MALFORMED
    return user, password


class SuccessCache:
    """Recently verified (user, password) pairs -> Identity, for `ttl` seconds."""

    def __init__(self, ttl: float, size: int = 10000) -> None:
        self.ttl = ttl
        self.size = size
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        self.clock: Callable[[], float] = time.monotonic

    def digest(self, user: str, password: str) -> bytes:
        message = user.encode() + b"\x00" + password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def get(self, digest: bytes) -> Identity | None:
        hit = self._entries.get(digest)
        if hit is None:
            return None
        if hit[0] <= self.clock():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return hit[1]

    def put(self, digest: bytes, identity: Identity) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        self._entries[digest] = (self.clock() + self.ttl, identity)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class BlockingPool:
    """A few threads for blocking checks, with a cap on how many may wait."""

    def __init__(self, threads: int = 2, max_pending: int = 64, name: str = "auth") -> None:
        self.max_pending = max_pending
        self.pending = 0
        self.rejected = 0
        self._threads = threads
        self._name = name
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T] | None:
        """Run `fn(*args)` off the loop; None when `max_pending` checks already wait."""
        if self.pending >= self.max_pending:
            self.rejected += 1
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=self._name)
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Any) -> None:
        self.pending -= 1

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


_SHARED: BlockingPool | None = None


def shared_pool() -> BlockingPool:
    """The worker's one pool for blocking auth checks: shared by every middleware instance,
    so config reloads (new instances) never leave threads behind."""
    global _SHARED
    if _SHARED is None:
        _SHARED = BlockingPool(threads=4, max_pending=128)
    return _SHARED


__all__ = [
    "MALFORMED",
    "BlockingPool",
    "SuccessCache",
    "basic_or_verdict",
    "parse_basic",
    "shared_pool",
]
