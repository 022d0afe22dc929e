"""Active health checks: every worker asks each server of a checked service on its own.

    services:
      api:
        servers: [{url: "http://10.0.0.1:8080"}, {url: "http://10.0.0.2:8080"}]
        health_check: {path: /healthz, interval: 5, timeout: 2, rise: 2, fall: 3}
        when_all_unhealthy: fail        # in C, by the balancer: 503 (or `panic`: use all)

Rules this file obeys:
- One HealthChecker per worker per config generation: fastgate/server/worker.py starts it
  once the runtime is in use and stops it when that runtime is retired (reload, drain). Every
  server of every service with a `health_check` gets one asyncio task. Nothing here blocks
  the event loop: asyncio streams only (name resolution runs in the loop's executor).
- A server starts HEALTHY, in every new generation too: a new config serves at once and the
  checks can only take a server out. It goes down after `fall` failed checks in a row and
  comes back after `rise` passed checks in a row. Each transition calls `pool.set_healthy()`
  once (the C balancer then skips, or picks again, that server) and logs one line: warning
  when down, info when up, with the service, the server URL and the reason.
- One check is one new connection: `METHOD path HTTP/1.1`, `Host:` the check's `host` (else
  the server's host, with its port when not the scheme's default), `User-Agent:
  fastgate-health`, `Connection: close`. An https server is checked over TLS with the
  service's own client context and verified name (pool.ssl, pool.server_hostname): a server
  the proxy could not talk to is not healthy either. `timeout` bounds connect, TLS
  handshake, sending and reading the response head, together.
- Only the response head is read, with the gateway's strict parser (a head the proxy would
  refuse fails the check); then the connection is aborted. A body is never read, kept or
  logged. Interim 1xx responses are skipped (at most MAX_INTERIM); 101 is a final status.
- Healthy means: the status is in `expected_statuses`, or 200-399 when that is empty.
- Reasons are fixed phrases made from what we know, never text the server sent beyond its
  status code: "status 503", "timeout", "connection refused", "TLS: <ssl reason>", ...
- The first check of a server runs at a random point of its first interval and later ones
  every interval ±10 % (JITTER): N workers and N servers do not check in lockstep. A check
  slower than the interval is followed by the next at once; there is never more than one
  check in flight per server.
- stop() cancels every task and waits for nothing; it is idempotent, and a stopped checker
  never starts again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastgate._core.httphead import parse_response
from fastgate.config.schema import HealthCheck
from fastgate.errors import HttpError

__all__ = ["HealthChecker", "Pool", "host_header", "probe", "request_head"]

log = logging.getLogger("fastgate.health")

JITTER = 0.1  # later checks every interval * [0.9, 1.1]
MAX_INTERIM = 8  # 1xx responses skipped before the final one
READ_SIZE = 16384
USER_AGENT = "fastgate-health"


class Pool(Protocol):
    """What the checker needs of a server: fastgate._core.conn.ServerPool has all of it."""

    @property
    def url(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def ssl(self) -> ssl.SSLContext | None: ...
    @property
    def server_hostname(self) -> str | None: ...
    @property
    def healthy(self) -> bool: ...
    def set_healthy(self, healthy: bool) -> None: ...


class _Refused(Exception):
    """The server answered, but not with a usable response head (the message is the reason)."""


def host_header(pool: Pool) -> str:
    """The server's Host value: host (IPv6 in brackets), with `:port` unless the default."""
    host = f"[{pool.host}]" if ":" in pool.host else pool.host
    default = 443 if pool.ssl is not None else 80
    return host if pool.port == default else f"{host}:{pool.port}"


def request_head(check: HealthCheck, pool: Pool) -> bytes:
    """The check request for `pool` (the schema refuses a `path` or `host` that could split
    the head; the default Host comes from the server URL, which the schema parsed)."""
    host = check.host if check.host is not None else host_header(pool)
    return (
        f"{check.method} {check.path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def is_expected(check: HealthCheck, status: int) -> bool:
    """Whether `status` passes `check`: listed in expected_statuses, or 200-399 by default."""
    if check.expected_statuses:
        return status in check.expected_statuses
    return 200 <= status <= 399


async def probe(pool: Pool, check: HealthCheck, head: bytes) -> tuple[bool, str]:
    """Run one check against `pool`: (passed, reason). Never raises but for cancellation."""
    try:
        async with asyncio.timeout(check.timeout):
            status = await _ask(pool, head, check.method == "HEAD")
    except TimeoutError:
        return False, "timeout"
    except ssl.SSLError as exc:  # before OSError: it is one
        detail = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
        return False, f"TLS: {detail}"
    except ConnectionRefusedError:
        return False, "connection refused"
    except ConnectionResetError:
        return False, "connection reset"
    except socket.gaierror:
        return False, "cannot resolve the host name"
    except OSError as exc:
        return False, (exc.strerror or type(exc).__name__).lower()
    except _Refused as exc:
        return False, str(exc)
    return is_expected(check, status), f"status {status}"


async def _ask(pool: Pool, head: bytes, head_request: bool) -> int:
    """Send `head` on a new connection and return the final status of the response head."""
    tls = pool.ssl
    reader, writer = await asyncio.open_connection(
        pool.host,
        pool.port,
        ssl=tls,
        server_hostname=(pool.server_hostname or pool.host) if tls is not None else None,
        limit=READ_SIZE,
    )
    try:
        writer.write(head)
        await writer.drain()
        buf = b""
        interim = 0
        while True:
            parsed = None
            if buf:
                try:
                    parsed, size = parse_response(buf, head_request)
                except HttpError as exc:
                    raise _Refused(f"invalid response: {exc.reason}") from None
            if parsed is None:
                data = await reader.read(READ_SIZE)
                if not data:
                    where = "inside the response head" if buf else "before any response"
                    raise _Refused(f"connection closed {where}")
                buf += data
                continue
            if parsed.status >= 200 or parsed.status == 101:
                return parsed.status
            interim += 1
            if interim > MAX_INTERIM:
                raise _Refused("too many interim (1xx) responses")
            buf = buf[size:]
    finally:
        writer.transport.abort()  # the body is of no interest; never linger on it


@dataclass(eq=False, slots=True)
class _Server:
    """One checked server: its rise/fall counters and what the last check said."""

    service: str
    pool: Pool
    check: HealthCheck
    head: bytes
    healthy: bool = True
    last: str | None = None  # the last check's reason; None before the first check
    checks: int = 0
    passes: int = 0  # in a row
    failures: int = 0  # in a row

    def record(self, passed: bool, reason: str) -> None:
        """Count one check; on a transition tell the pool and log one line."""
        self.checks += 1
        self.last = reason
        if passed:
            self.failures = 0
            self.passes += 1
            if not self.healthy and self.passes >= self.check.rise:
                self.healthy = True
                self.pool.set_healthy(True)
                log.info(
                    "health: service %s server %s is UP (%d checks passed in a row): %s",
                    self.service,
                    self.pool.url,
                    self.passes,
                    reason,
                )
        else:
            self.passes = 0
            self.failures += 1
            if self.healthy and self.failures >= self.check.fall:
                self.healthy = False
                self.pool.set_healthy(False)
                log.warning(
                    "health: service %s server %s is DOWN (%d checks failed in a row): %s",
                    self.service,
                    self.pool.url,
                    self.failures,
                    reason,
                )


class HealthChecker:
    """The active checks of one runtime (one config generation) in one worker.

    `runtime` needs `.config.services` (name -> schema Service) and `.services` (name -> an
    object with `.pools`, the service's distinct servers): fastgate.config.compile.Runtime.
    """

    def __init__(self, runtime: Any) -> None:
        self._servers: list[_Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        compiled: Mapping[str, Any] = runtime.services
        for name, svc in runtime.config.services.items():
            check = svc.health_check
            service = compiled.get(name)
            if check is None or service is None:
                continue
            for pool in service.pools:
                self._servers.append(_Server(name, pool, check, request_head(check, pool)))

    def __len__(self) -> int:
        """How many servers are checked."""
        return len(self._servers)

    @property
    def running(self) -> int:
        """How many check tasks are still alive (0 once stop() has taken effect)."""
        return sum(not task.done() for task in self._tasks)

    def start(self) -> None:
        """Start one task per server on the running loop; every server starts healthy."""
        if self._tasks or self._stopped:
            return
        loop = asyncio.get_running_loop()
        for server in self._servers:
            if not server.pool.healthy:
                server.pool.set_healthy(True)
            task = loop.create_task(self._watch(server), name=f"health {server.pool.url}")
            self._tasks.append(task)  # a strong reference: the loop keeps only weak ones

    def stop(self) -> None:
        """Cancel every check (a check in flight aborts its connection); idempotent."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()

    def state(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{service: {server url: {"healthy", "last" (reason or None), "checks"}}}."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for server in self._servers:
            out.setdefault(server.service, {})[server.pool.url] = {
                "healthy": server.healthy,
                "last": server.last,
                "checks": server.checks,
            }
        return out

    async def _watch(self, server: _Server) -> None:
        loop = asyncio.get_running_loop()
        interval = server.check.interval
        await asyncio.sleep(random.uniform(0.0, interval))
        while True:
            started = loop.time()
            try:
                passed, reason = await probe(server.pool, server.check, server.head)
                server.record(passed, reason)
            except Exception:  # a bug must not end this server's checks silently
                log.exception(
                    "health: service %s server %s: check failed", server.service, server.pool.url
                )
            pause = interval * random.uniform(1.0 - JITTER, 1.0 + JITTER)
            await asyncio.sleep(max(0.0, started + pause - loop.time()))
