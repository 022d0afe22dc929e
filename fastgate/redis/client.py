"""`RedisClient`: one auto-pipelined connection that reconnects by itself and fails fast.

States (`_state`):
    IDLE        never started; the first command (or `connect()`) starts the connect
    CONNECTING  an attempt is running: discovery (Sentinel), TCP/TLS connect, handshake
    CONNECTED   commands are written once per loop turn (see `connection.py`)
    BACKOFF     down; a background task retries after an exponential, jittered delay
    CLOSED      `close()` was called; every command fails at once

Commands wait for a connect only during the very first attempt (so a lazily used client works
without a `connect()` call); at any other time while not CONNECTED, `execute` returns an
already failed future at once: nothing queues while Redis is down, and `available` tells
callers in advance. Each command is bounded by `command_timeout` from the moment it is
issued, queued or not. One background task per client owns the connect/backoff cycle; it
catches everything, logs an outage once (and its end), and never lets a Redis problem out as
anything but RedisError on the commands' futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from ssl import SSLContext
from typing import Any

from hiredis import pack_command

from fastgate.redis.connection import Connection, Stats
from fastgate.redis.errors import RedisError, RedisReplyError, RedisUnavailable
from fastgate.redis.resp import Script
from fastgate.redis.sentinel import MasterLocator, SentinelConfig

log = logging.getLogger("fastgate.redis")

BASE_BACKOFF = 0.05  # seconds; the first retry comes after 25-50 ms

_IDLE = "idle"
_CONNECTING = "connecting"
_CONNECTED = "connected"
_BACKOFF = "backoff"
_CLOSED = "closed"


def backoff_delay(
    attempt: int,
    cap: float,
    base: float = BASE_BACKOFF,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `attempt` (0-based): "equal jitter".

    The ceiling doubles per attempt from `base` up to `cap`; the delay is uniform in
    [ceiling/2, ceiling), so it never exceeds `cap` and many gateway workers that lost the same
    Redis do not retry in lock step.
    """
    ceiling = min(cap, base * (2 ** min(attempt, 62)))
    return ceiling / 2 + rand() * ceiling / 2


class RedisClient:
    """A small asyncio Redis client for RESP2: auto-pipelined, reconnecting, fail-fast.

    `execute(*args)` is a plain function that buffers the command and returns a future, so a
    burst of calls in one loop turn costs one write. Replies are bytes, int, list or None; an
    error reply raises RedisReplyError; anything that keeps Redis from answering (down,
    backing off, timed out, connection lost, handshake refused) raises RedisUnavailable. AUTH
    (`password`, or `username` + `password` for an ACL user) and SELECT `db` run on every
    connect before any command. With `sentinel`, the master is looked up through Sentinel on
    every connect and checked with ROLE; `host`/`port` are then unused. `ssl` (an
    SSLContext) enables TLS, with the host name (or IP) checked against the certificate.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: SSLContext | None = None,
        connect_timeout: float = 1.0,
        command_timeout: float | None = 0.5,
        max_backoff: float = 5.0,
        sentinel: SentinelConfig | None = None,
    ) -> None:
        if username is not None and password is None:
            raise ValueError("a Redis username needs a password")
        if db < 0:
            raise ValueError("db must be >= 0")
        if connect_timeout <= 0 or (command_timeout is not None and command_timeout <= 0):
            raise ValueError("timeouts must be > 0")
        if max_backoff <= 0:
            raise ValueError("max_backoff must be > 0")
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self._password = password
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_backoff = max_backoff
        self.sentinel = sentinel
        self._locator = MasterLocator(sentinel) if sentinel is not None else None
        self._stats = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = _IDLE
        self._conn: Connection | None = None
        self._retired: set[Connection] = set()  # retired after a timeout, still draining
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Future | None = None
        self._attempt_waiters: list[asyncio.Future] = []
        self._down_reason = "not connected"
        self._outage_logged = False
        self._ever_connected = False
        self._setup = self._setup_commands()

    def __repr__(self) -> str:
        where = (
            f"sentinel={self.sentinel.master_name!r}"
            if self.sentinel
            else f"{self.host}:{self.port}"
        )
        auth = ", password=***" if self._password is not None else ""
        user = f", username={self.username!r}" if self.username is not None else ""
        return f"<RedisClient {where} db={self.db}{user}{auth} {self._state}>"

    # ---- public surface -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and its handshake done."""
        return self._state == _CONNECTED

    @property
    def available(self) -> bool:
        """True when a command issued now will be sent (not failed fast); False while down,
        reconnecting or closed. Callers check it to apply their Redis-down policy at once."""
        conn = self._conn
        return self._state == _IDLE or (conn is not None and conn.accepting)

    def stats(self) -> dict[str, int]:
        """Counters: commands, writes (round trips), reconnects, errors (error replies),
        timeouts, unavailable (commands failed fast or dropped with a connection)."""
        return self._stats.as_dict()

    def execute(self, *args: bytes | str | int | float) -> asyncio.Future:
        """Send one command (name and arguments) and return a future of its reply.

        Arguments are encoded as RESP bulk strings (TypeError for other types, raised here).
        The command is written with everything else issued in this loop turn.
        """
        payload = pack_command(args)
        conn = self._conn
        if conn is None:
            if self._state != _IDLE:
                return self._fail_fast()
            conn = self._start()
        elif not conn.accepting:
            return self._fail_fast()
        return conn.send(payload)

    def ping(self) -> asyncio.Future:
        """PING; the future's result is b"PONG"."""
        return self.execute("PING")

    def evalsha(
        self, sha: str, keys: Sequence[bytes | str] = (), args: Sequence[Any] = ()
    ) -> asyncio.Future:
        """EVALSHA sha numkeys *keys *args (a NOSCRIPT reply raises RedisReplyError)."""
        return self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def script_load(self, script: Script | str | bytes) -> str:
        """SCRIPT LOAD; returns the SHA1 the server gives the script."""
        source = script.source if isinstance(script, Script) else script
        sha = await self.execute("SCRIPT", "LOAD", source)
        return sha.decode("ascii")

    async def eval_script(
        self, script: Script, keys: Sequence[bytes | str] = (), args: Sequence[Any] = ()
    ) -> Any:
        """Run `script` by EVALSHA; on NOSCRIPT (a restart, SCRIPT FLUSH, a failover) load it
        and try once more."""
        try:
            return await self.evalsha(script.sha, keys, args)
        except RedisReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        await self.script_load(script)
        return await self.evalsha(script.sha, keys, args)

    async def connect(self) -> None:
        """Connect now (or wait for the attempt in progress); RedisUnavailable if it fails.

        Optional: commands connect lazily. After a failure the client keeps retrying in the
        background; calling `connect` again during the backoff makes the next attempt now.
        """
        if self._state == _CLOSED:
            raise RedisUnavailable("the Redis client is closed")
        if self._state == _CONNECTED:
            return
        if self._task is None:
            self._start()
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        waiter = self._loop.create_future()
        self._attempt_waiters.append(waiter)
        await waiter

    async def close(self) -> None:
        """Fail every waiting command, stop reconnecting, and close the connection."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._down_reason = "the Redis client is closed"
        conns = [c for c in (self._conn, *self._retired) if c is not None]
        self._conn = None
        self._retired = set()
        task, self._task = self._task, None
        for conn in conns:
            conn.close(self._down_reason)
        self._finish_attempt(RedisUnavailable(self._down_reason))
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conn in conns:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)

    # ---- the connect/backoff cycle --------------------------------------------------------

    def _setup_commands(self) -> list[tuple[str, tuple]]:
        setup: list[tuple[str, tuple]] = []
        if self._password is not None:
            auth = (self._password,) if self.username is None else (self.username, self._password)
            setup.append(("authentication (AUTH)", ("AUTH", *auth)))
        if self.db:
            setup.append((f"SELECT {self.db}", ("SELECT", self.db)))
        if self._locator is not None:
            setup.append(("ROLE", ("ROLE",)))
        if not setup:
            setup.append(("PING", ("PING",)))  # a connect is only good once the server answers
        return setup

    def _start(self) -> Connection:
        self._loop = asyncio.get_running_loop()
        conn = self._new_connection(accepting=True)
        self._task = self._loop.create_task(self._run(conn))
        return conn

    def _new_connection(self, accepting: bool) -> Connection:
        conn = Connection(
            self._loop,
            self._stats,
            self.command_timeout,
            accepting=accepting,
            on_lost=self._on_lost,
        )
        self._conn = conn
        self._state = _CONNECTING
        return conn

    def _fail_fast(self) -> asyncio.Future:
        loop = self._loop or asyncio.get_running_loop()
        fut = loop.create_future()
        self._stats.unavailable += 1
        fut.set_exception(RedisUnavailable(f"Redis unavailable: {self._down_reason}"))
        return fut

    async def _run(self, conn: Connection) -> None:
        attempt = 0
        while True:
            try:
                await self._establish(conn)
            except asyncio.CancelledError:
                conn.close(self._down_reason)
                raise
            except Exception as exc:  # never let a Redis problem end the cycle
                if isinstance(exc, RedisError):
                    reason = str(exc)
                else:
                    reason = f"unexpected {type(exc).__name__} while connecting"
                    log.error("redis: %s", reason, exc_info=True)
                conn.close(reason)
                self._went_down(reason)
                self._finish_attempt(RedisUnavailable(reason))
                await self._sleep(backoff_delay(attempt, self.max_backoff))
                attempt += 1
                conn = self._new_connection(accepting=False)
                continue
            attempt = 0
            self._came_up(conn)
            reason = await conn.down
            self._went_down(reason)
            await self._sleep(backoff_delay(0, self.max_backoff))
            attempt = 1
            conn = self._new_connection(accepting=False)

    async def _establish(self, conn: Connection) -> None:
        if self._locator is not None:
            host, port = await self._locator.locate(self.connect_timeout)
        else:
            host, port = self.host, self.port
        replies = await conn.open(
            host,
            port,
            ssl=self.ssl,
            setup=self._setup,
            timeout=self.connect_timeout,
            secret=self._password,
        )
        if self._locator is not None:
            role = replies[-1]
            if not role or role[0] != b"master":
                name = role[0].decode("ascii", "replace") if role else "?"
                raise RedisUnavailable(f"{host}:{port} (from sentinel) is a {name}, not a master")

    def _came_up(self, conn: Connection) -> None:
        if self._ever_connected:
            self._stats.reconnects += 1
        if self._outage_logged:
            log.warning("redis %s: connected again", conn.peer)
        self._ever_connected = True
        self._outage_logged = False
        self._state = _CONNECTED
        conn.mark_ready()
        self._finish_attempt(None)

    def _on_lost(self, conn: Connection, reason: str) -> None:
        # Called synchronously when a connection goes down (or is retired after a timeout), so
        # that commands issued right after fail fast instead of reaching that connection.
        if conn.retiring:
            self._retired = {c for c in self._retired if not c.closed}
            self._retired.add(conn)  # still draining: close() must not forget it
        if conn is self._conn and self._state == _CONNECTED:
            self._state = _BACKOFF
            self._conn = None
            self._down_reason = reason

    def _went_down(self, reason: str) -> None:
        if self._state == _CLOSED:
            return
        self._state = _BACKOFF
        self._conn = None
        self._down_reason = reason
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("redis unavailable (%s); reconnecting with backoff", reason)
        else:
            log.debug("redis still unavailable: %s", reason)

    def _finish_attempt(self, exc: RedisError | None) -> None:
        waiters, self._attempt_waiters = self._attempt_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(RedisUnavailable(str(exc)))

    async def _sleep(self, delay: float) -> None:
        wake = self._wake = self._loop.create_future()
        handle = self._loop.call_later(delay, _resolve, wake)
        try:
            await wake
        finally:
            handle.cancel()
            self._wake = None


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
