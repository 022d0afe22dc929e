"""One connection to a Redis server: an asyncio Protocol, a hiredis reader, a FIFO of futures.

Theory of operation.
- Replies arrive in the order commands were written (RESP2 has no request ids), so each
  command's future goes into a FIFO as the command is buffered, and each parsed reply resolves
  the oldest future. `hiredis.Reader` parses in C; `data_received` drains every complete reply
  in one pass, and a partial reply simply waits in the reader for more bytes.
- Auto-pipelining: `send` only appends the encoded command to a buffer and, once per event-loop
  turn, schedules `_flush` with `loop.call_soon`; `_flush` joins the buffer into ONE
  `transport.write`. Everything issued during a turn (including by callbacks that run before
  the flush) shares one write and so one round trip. `Stats.writes` counts the writes.
- The handshake (AUTH, SELECT, ROLE, or a PING) is written by `open` before any user command
  and answered first; its futures live in their own FIFO, which is drained before the user
  FIFO. User commands sent before the handshake ends wait in the buffer and are written by
  `mark_ready`, so a failed AUTH or SELECT never lets a command run as the wrong user or in
  the wrong database.
- Timeouts cost one timer per connection, not one per command: every command gets the same
  deadline offset, so the FIFO is in deadline order and the single timer is armed for the
  oldest unanswered command (re-armed lazily when it fires). A command past its deadline fails
  alone, with RedisUnavailable, and keeps its place in the FIFO so that its late reply, if it
  comes, is matched and dropped. A late reply means a stuck, slow or partitioned server, so the
  connection is then retired: it takes no new command, tells the owner (who reconnects after
  a short jittered delay and fails new commands fast meanwhile), lets the commands already in
  flight be answered or reach their own deadlines, and then closes. A command that expires
  before the handshake ended was never written and is simply dropped.
- `close(reason)` is the one way down (our decision, the peer's close, a protocol error): it
  fails every waiting future with RedisUnavailable(reason), aborts the transport and tells the
  owner through `on_lost`. Nothing here raises into the event loop.

Bounds: the user FIFO holds the commands of at most one command_timeout of traffic; the reader
buffers at most one partial reply beyond what has been parsed.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from ssl import SSLContext
from typing import Any

import hiredis
from hiredis import pack_command

from fastgate.redis.errors import RedisReplyError, RedisUnavailable

_MORE = object()  # what hiredis.Reader.gets() returns while a reply is incomplete
_EARLY = 0.001  # loop timers may fire up to a clock tick early; treat that as on time


class Stats:
    """Counters shared by a client and its connections (see `RedisClient.stats`)."""

    __slots__ = ("commands", "errors", "reconnects", "timeouts", "unavailable", "writes")

    def __init__(self) -> None:
        self.commands = 0  # commands accepted onto a connection (sent, or queued for its connect)
        self.writes = 0  # transport.write calls: round trips
        self.reconnects = 0  # successful connects after the first
        self.errors = 0  # error replies to user commands
        self.timeouts = 0  # commands failed by their deadline
        self.unavailable = 0  # commands failed fast or dropped with their connection

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; see the module docstring. Owned by `RedisClient`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        command_timeout: float | None,
        *,
        accepting: bool = False,
        on_lost: Callable[[Connection, str], None] | None = None,
    ) -> None:
        self._loop = loop
        self._stats = stats
        self._timeout = command_timeout
        self._on_lost = on_lost
        # May user commands be sent now? True once ready, and during a connect whose owner
        # wants commands to wait for it (the client's first, lazy connect).
        self.accepting = accepting
        self.ready = False  # handshake done: buffered commands are written each turn
        self.retiring = False  # after a timeout: drain what is in flight, then close
        self.closed = False
        self.reason = ""
        self.peer = "redis"
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(notEnoughData=_MORE, replyError=RedisReplyError)
        self._setup: deque[asyncio.Future] = deque()
        self._waiters: deque[tuple[asyncio.Future, float]] = deque()
        self._buf: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self.down: asyncio.Future[str] = loop.create_future()  # set by close(), with the reason
        self.lost: asyncio.Future[None] = loop.create_future()  # set when the transport is gone

    # ---- sending --------------------------------------------------------------------------

    def send(self, payload: bytes) -> asyncio.Future:
        """Queue one encoded command; the future gets its reply (or RedisError)."""
        loop = self._loop
        fut = loop.create_future()
        deadline = math.inf if self._timeout is None else loop.time() + self._timeout
        self._waiters.append((fut, deadline))
        self._buf.append(payload)
        self._stats.commands += 1
        if self.ready and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._timer is None and deadline != math.inf:
            self._timer = loop.call_at(deadline, self._check_deadlines)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        buf = self._buf
        if not buf or not self.ready:
            return
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        try:
            self._transport.write(data)
        except Exception as exc:  # a transport closing under us (uvloop raises RuntimeError)
            self.close(f"write to {self.peer} failed: {_describe(exc)}")
            return
        self._stats.writes += 1

    def mark_ready(self) -> None:
        """The handshake succeeded: write what waited for it, then pipeline per turn."""
        if self.closed:
            return
        self.ready = True
        self.accepting = True
        self._flush()

    # ---- connecting -----------------------------------------------------------------------

    async def open(
        self,
        host: str,
        port: int,
        *,
        ssl: SSLContext | None = None,
        setup: Sequence[tuple[str, tuple]] = (),
        timeout: float,
        secret: str | None = None,
    ) -> list[Any]:
        """Connect and run the handshake; return the setup commands' replies.

        `setup` is a list of (label, args); each is sent before any user command, in one write,
        and an error reply to any of them fails the connect with RedisUnavailable naming the
        label (never the args: AUTH carries the password). `secret` is cut out of the server's
        messages in case a server echoes it. Everything is bounded by `timeout` seconds.
        """
        loop = self._loop
        self.peer = f"{host}:{port}"
        deadline = loop.time() + timeout
        extra: dict[str, Any] = {"ssl": ssl, "server_hostname": host} if ssl is not None else {}
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, host, port, **extra), timeout
            )
        except asyncio.TimeoutError:
            raise RedisUnavailable(f"connect to {self.peer} timed out after {timeout} s") from None
        except OSError as exc:
            raise RedisUnavailable(f"connect to {self.peer} failed: {_describe(exc)}") from None
        if self.closed:
            raise RedisUnavailable(self.reason)
        if not setup:
            return []
        futures = []
        for _ in setup:
            fut = loop.create_future()
            self._setup.append(fut)
            futures.append(fut)
        self._transport.write(b"".join(pack_command(args) for _, args in setup))
        self._stats.writes += 1
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), max(deadline - loop.time(), 0)
            )
        except asyncio.TimeoutError:
            raise RedisUnavailable(
                f"{self.peer} did not answer the connection handshake within {timeout} s"
            ) from None
        if self.closed:
            raise RedisUnavailable(self.reason)
        for (label, _), reply in zip(setup, replies, strict=True):
            if isinstance(reply, RedisUnavailable):
                raise RedisUnavailable(str(reply)) from None
            if isinstance(reply, RedisReplyError):
                message = reply.message
                if secret:
                    message = message.replace(secret, "***")
                raise RedisUnavailable(f"{self.peer}: {label} failed: {message}") from None
        return replies

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self.closed:
            transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(f"protocol error from {self.peer}: {exc}")
                return
            if reply is _MORE:
                break
            if self._setup:
                fut = self._setup.popleft()
                if not fut.done():
                    if type(reply) is RedisReplyError:
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
                continue
            if not self._waiters:
                self.close(f"reply without a request from {self.peer}")
                return
            fut = self._waiters.popleft()[0]
            if fut.done():  # timed out, or cancelled by its caller
                continue
            if type(reply) is RedisReplyError:
                self._stats.errors += 1
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
        if self.retiring and not self._waiters:
            self.close(self.reason)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.close(f"connection to {self.peer} closed by the server")
        else:
            self.close(f"connection to {self.peer} lost: {_describe(exc)}")
        if not self.lost.done():
            self.lost.set_result(None)

    # ---- deadlines and closing ------------------------------------------------------------

    def _check_deadlines(self) -> None:
        self._timer = None
        waiters = self._waiters
        if self.closed or not waiters:
            return
        now = self._loop.time() + _EARLY
        message = f"{self.peer}: command timed out after {self._timeout} s"
        if not self.ready:
            # Still connecting: the late commands were never written; drop them from both queues.
            dropped = 0
            while waiters and waiters[0][1] <= now:
                fut = waiters.popleft()[0]
                dropped += 1
                if not fut.done():
                    self._stats.timeouts += 1
                    fut.set_exception(RedisUnavailable(message + " (waiting for the connection)"))
            del self._buf[:dropped]
            if waiters:
                self._timer = self._loop.call_at(waiters[0][1], self._check_deadlines)
            return
        # Written and unanswered: fail each late command alone; it keeps its FIFO slot.
        expired = 0
        next_deadline = None
        for fut, deadline in waiters:
            if deadline > now:
                next_deadline = deadline
                break
            if not fut.done():
                expired += 1
                fut.set_exception(RedisUnavailable(message))
        self._stats.timeouts += expired
        if expired and not self.retiring:
            self.retire(f"{self.peer}: connection retired after a command timeout")
        if next_deadline is not None:
            self._timer = self._loop.call_at(next_deadline, self._check_deadlines)
        elif self.retiring:
            self.close(self.reason)  # every command left is past its deadline: stop waiting

    def retire(self, reason: str) -> None:
        """Take no new command and tell the owner now; close once the FIFO drains."""
        if self.retiring or self.closed:
            return
        self.retiring = True
        self.accepting = False
        self.reason = reason
        if not self.down.done():
            self.down.set_result(reason)
        if self._on_lost is not None:
            self._on_lost(self, reason)

    def close(self, reason: str) -> None:
        """Go down for `reason`: fail every waiting command, abort the transport, tell the owner."""
        if self.closed:
            return
        self.closed = True
        self.ready = False
        self.accepting = False
        self.retiring = False
        self.reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buf.clear()
        setup, self._setup = self._setup, deque()
        waiters, self._waiters = self._waiters, deque()
        for fut in setup:
            if not fut.done():
                fut.set_exception(RedisUnavailable(reason))
        for fut, _ in waiters:
            if not fut.done():
                self._stats.unavailable += 1
                fut.set_exception(RedisUnavailable(reason))
        if self._transport is not None:
            self._transport.abort()
        elif not self.lost.done():
            self.lost.set_result(None)  # never connected: nothing to wait for
        if not self.down.done():
            self.down.set_result(reason)
            if self._on_lost is not None:
                self._on_lost(self, reason)  # (a retired connection told its owner already)


def _describe(exc: BaseException) -> str:
    """An OS or TLS error in a few words (these never carry a password)."""
    return str(exc) or type(exc).__name__
