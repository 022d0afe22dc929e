"""fastgate.routing.health against real HTTP(S) servers on 127.0.0.1 that this file scripts.

Each server is asyncio.start_server answering a scripted status per request, or hanging, or
closing, or sending garbage; a closed port stands for a refused connect. The pool is a small
real object with the ServerPool attributes the checker uses; it records every
`set_healthy()` call together with how many check requests the server had received by then,
so transitions are asserted by request count, never by timing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from fastgate._core.conn import Engine
from pydantic import ValidationError

from fastgate.config.compile import compile_runtime
from fastgate.config.schema import HealthCheck, Service, parse_config
from fastgate.routing.health import HealthChecker, host_header, probe, request_head

TEST_TIMEOUT = 10.0
LOOPS = ("asyncio", "uvloop")
SECRET = "body-secret-7f3a"  # sent in response bodies: must never be logged

CA = trustme.CA()
OTHER_CA = trustme.CA()
LEAF = CA.issue_cert("api.internal", "127.0.0.1")


def run(coro: Awaitable[Any], loop_name: str = "asyncio") -> Any:
    """Run `coro` on a fresh stdlib or uvloop loop, bounded so a hung test fails."""
    if loop_name == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, TEST_TIMEOUT))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CheckServer:
    """Answers check requests: `script[i]` for request i, then `status`, or misbehaves by
    `mode` ("hang", "garbage", "close", "interim"). Records every request head."""

    def __init__(
        self,
        status: int = 200,
        script: tuple[int, ...] = (),
        mode: str = "answer",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.status = status
        self.script = script
        self.mode = mode
        self.ssl_context = ssl_context
        self.heads: list[bytes] = []
        self.eofs = 0  # connections the client closed while we waited (hang mode)

    @property
    def requests(self) -> int:
        return len(self.heads)

    async def __aenter__(self) -> CheckServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            index = len(self.heads)
            self.heads.append(head)
            if self.mode == "hang":
                if not await reader.read(1):
                    self.eofs += 1
                return
            if self.mode == "garbage":
                writer.write(b"this is not HTTP\r\n\r\n")
            elif self.mode == "close":
                pass
            else:
                status = self.script[index] if index < len(self.script) else self.status
                body = f"{SECRET} {status}".encode()
                interim = b"HTTP/1.1 100 Continue\r\n\r\n" if self.mode == "interim" else b""
                writer.write(
                    interim + b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body))
                )
                writer.write(body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class FakePool:
    """The ServerPool duck type; set_healthy calls are recorded as (requests seen, value)."""

    def __init__(
        self,
        port: int,
        server: CheckServer | None = None,
        *,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{host}:{port}"
        self.host = host
        self.port = port
        self.ssl = tls
        self.server_hostname = server_hostname
        self.healthy = True
        self.calls: list[tuple[int, bool]] = []
        self._server = server

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self.calls.append((self._server.requests if self._server else -1, healthy))


def check(**options: Any) -> HealthCheck:
    return HealthCheck.model_validate(options)


def runtime(services: dict[str, tuple[HealthCheck | None, list[FakePool]]]) -> SimpleNamespace:
    """A Runtime's shape: config.services (schema) and services[name].pools (compiled)."""
    config = SimpleNamespace(
        services={
            name: Service.model_validate(
                {
                    "servers": [{"url": p.url} for p in pools],
                    "health_check": hc.model_dump() if hc is not None else None,
                }
            )
            for name, (hc, pools) in services.items()
        }
    )
    compiled = {
        name: SimpleNamespace(name=name, pools=tuple(p)) for name, (_, p) in services.items()
    }
    return SimpleNamespace(config=config, services=compiled)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    return ctx


def server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    LEAF.configure_cert(ctx)
    return ctx


# ---- transitions (rise / fall), through real checks ------------------------------------------


@pytest.mark.parametrize(
    ("script", "fall", "rise", "calls"),
    [
        pytest.param(
            (503, 503, 200, 503, 503, 503, 200, 200),
            3,
            2,
            [(6, False), (8, True)],
            id="down-after-exactly-fall-failures-in-a-row-up-after-rise-passes",
        ),
        pytest.param(
            (503, 200, 503, 200, 503, 200), 2, 1, [], id="failures-not-in-a-row-never-down"
        ),
        pytest.param((500,), 1, 1, [(1, False), (2, True)], id="fall-1-rise-1"),
        pytest.param(
            (503, 503, 200, 503, 200, 200, 200),
            2,
            3,
            [(2, False), (7, True)],
            id="a-failure-restarts-the-rise-count",
        ),
    ],
)
def test_transitions_after_exactly_fall_and_rise(
    script: tuple[int, ...], fall: int, rise: int, calls: list[tuple[int, bool]]
) -> None:
    async def main() -> None:
        async with CheckServer(script=script) as server:
            pool = FakePool(server.port, server)
            hc = check(interval=0.02, timeout=1, fall=fall, rise=rise)
            checker = HealthChecker(runtime({"api": (hc, [pool])}))
            checker.start()
            await until(lambda: server.requests >= len(script) + 2)
            checker.stop()
            await until(lambda: checker.running == 0)
            assert pool.calls == calls
            state = checker.state()["api"][pool.url]
            assert state["healthy"] is pool.healthy
            assert state["checks"] >= len(script) + 1

    run(main())


def test_transition_logs_one_line_each_without_the_body(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> FakePool:
        async with CheckServer(script=(503, 503)) as server:
            pool = FakePool(server.port, server)
            checker = HealthChecker(
                runtime({"api": (check(interval=0.02, fall=2, rise=1), [pool])})
            )
            checker.start()
            await until(lambda: len(pool.calls) == 2)
            checker.stop()
            return pool

    with caplog.at_level(logging.INFO, logger="fastgate.health"):
        pool = run(main())
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "fastgate.health"]
    assert lines == [
        (
            logging.WARNING,
            f"health: service api server {pool.url} is DOWN (2 checks failed in a row): status 503",
        ),
        (
            logging.INFO,
            f"health: service api server {pool.url} is UP (1 checks passed in a row): status 200",
        ),
    ]
    assert SECRET not in caplog.text


# ---- one probe: statuses and reasons ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "passed"),
    [
        pytest.param(200, (), True, id="default-200"),
        pytest.param(399, (), True, id="default-399"),
        pytest.param(302, (), True, id="default-redirect"),
        pytest.param(400, (), False, id="default-400"),
        pytest.param(503, (), False, id="default-503"),
        pytest.param(503, (503,), True, id="listed-503"),
        pytest.param(200, (204,), False, id="unlisted-200"),
        pytest.param(204, (200, 204), True, id="listed-204"),
    ],
)
def test_expected_statuses(status: int, expected: tuple[int, ...], passed: bool) -> None:
    async def main() -> tuple[bool, str]:
        async with CheckServer(status=status) as server:
            pool = FakePool(server.port, server)
            hc = check(expected_statuses=list(expected))
            return await probe(pool, hc, request_head(hc, pool))

    assert run(main()) == (passed, f"status {status}")


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        pytest.param("hang", "timeout", id="hang-is-timeout"),
        pytest.param("garbage", "invalid response: invalid HTTP version in response", id="garbage"),
        pytest.param("close", "connection closed before any response", id="closed"),
        pytest.param("refused", "connection refused", id="refused"),
        pytest.param("interim", "status 200", id="interim-1xx-skipped"),
    ],
)
def test_probe_reasons(mode: str, reason: str, loop_name: str) -> None:
    async def main() -> tuple[bool, str, int]:
        async with CheckServer(mode=mode) as server:
            port = closed_port() if mode == "refused" else server.port
            pool = FakePool(port, server)
            hc = check(timeout=0.3)
            result = await probe(pool, hc, request_head(hc, pool))
            if mode == "hang":
                await until(lambda: server.eofs == 1)  # the timed-out connection was closed
            return (*result, server.eofs)

    passed, got, _ = run(main(), loop_name)
    assert (passed, got) == (mode == "interim", reason)


@pytest.mark.parametrize(
    ("options", "pool_host", "lines"),
    [
        pytest.param(
            {},
            "127.0.0.1",
            [b"GET / HTTP/1.1", b"Host: 127.0.0.1:{port}"],
            id="default-host-with-port",
        ),
        pytest.param(
            {"host": "api.internal", "path": "/healthz?deep=1", "method": "HEAD"},
            "127.0.0.1",
            [b"HEAD /healthz?deep=1 HTTP/1.1", b"Host: api.internal"],
            id="configured-host-path-method",
        ),
        pytest.param(
            {"path": "/ready"},
            "localhost",
            [b"GET /ready HTTP/1.1", b"Host: localhost:{port}"],
            id="server-host-name",
        ),
    ],
)
def test_request_sent(options: dict[str, Any], pool_host: str, lines: list[bytes]) -> None:
    async def main() -> tuple[int, bytes, tuple[bool, str]]:
        async with CheckServer() as server:
            pool = FakePool(server.port, server, host=pool_host)
            hc = check(**options)
            result = await probe(pool, hc, request_head(hc, pool))
            return server.port, server.heads[0], result

    port, head, result = run(main())
    assert result == (True, "status 200")
    expected = [line.replace(b"{port}", str(port).encode()) for line in lines]
    assert head.split(b"\r\n") == [
        *expected,
        b"User-Agent: fastgate-health",
        b"Connection: close",
        b"",
        b"",
    ]


@pytest.mark.parametrize(
    ("host", "port", "tls", "value"),
    [
        pytest.param("10.0.0.1", 80, False, "10.0.0.1", id="http-default-port"),
        pytest.param("10.0.0.1", 443, False, "10.0.0.1:443", id="http-on-443"),
        pytest.param("api.internal", 443, True, "api.internal", id="https-default-port"),
        pytest.param("::1", 8443, True, "[::1]:8443", id="ipv6-bracketed"),
    ],
)
def test_host_header(host: str, port: int, tls: bool, value: str) -> None:
    pool = FakePool(port, host=host, tls=ssl.create_default_context() if tls else None)
    assert host_header(pool) == value


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("a b", id="space"),
        pytest.param("x\r\nX-Injected: 1", id="crlf"),
        pytest.param("", id="empty"),
        pytest.param("h\u00e9", id="not-ascii"),
    ],
)
def test_unsafe_host_is_refused_by_the_schema(host: str) -> None:
    with pytest.raises(ValidationError, match="printable ASCII"):
        check(host=host)


# ---- TLS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize(
    ("ca", "name", "passed", "reason"),
    [
        pytest.param(CA, "api.internal", True, "status 200", id="verified-name"),
        pytest.param(CA, "127.0.0.1", True, "status 200", id="verified-ip"),
        pytest.param(
            OTHER_CA,
            "api.internal",
            False,
            "TLS: unable to get local issuer certificate",
            id="unknown-ca",
        ),
        pytest.param(CA, "other.internal", False, "TLS: Hostname mismatch", id="name-mismatch"),
    ],
)
def test_tls_check(ca: trustme.CA, name: str, passed: bool, reason: str, loop_name: str) -> None:
    async def main() -> tuple[bool, str, list[bytes]]:
        async with CheckServer(ssl_context=server_context()) as server:
            pool = FakePool(server.port, server, tls=client_context(ca), server_hostname=name)
            hc = check(timeout=2)
            result = await probe(pool, hc, request_head(hc, pool))
            return (*result, server.heads)

    ok, got, heads = run(main(), loop_name)
    assert ok is passed
    assert got.startswith(reason), got
    assert len(heads) == (1 if passed else 0)


# ---- the checker's lifecycle ------------------------------------------------------------------


def test_stop_cancels_every_check_and_is_idempotent() -> None:
    async def main() -> None:
        async with CheckServer() as fast, CheckServer(mode="hang") as hung:
            pools = [FakePool(fast.port, fast), FakePool(hung.port, hung)]
            checker = HealthChecker(runtime({"api": (check(interval=0.02, timeout=5), pools)}))
            assert len(checker) == 2
            checker.start()
            checker.start()  # a second start adds nothing
            await until(lambda: fast.requests >= 3 and hung.requests == 1)
            assert checker.running == 2
            checker.stop()
            checker.stop()
            await until(lambda: checker.running == 0)
            await until(lambda: hung.eofs == 1)  # the check in flight dropped its connection
            seen = fast.requests
            await asyncio.sleep(0.2)  # ten intervals: nothing more is sent
            assert fast.requests == seen
            assert hung.requests == 1
            checker.start()  # a stopped checker stays stopped
            assert checker.running == 0

    run(main())


def test_state_and_fresh_start() -> None:
    async def main() -> None:
        async with CheckServer(status=503) as down, CheckServer() as up:
            stale = FakePool(down.port, down)
            stale.healthy = False  # as a previous generation may have left it
            ok = FakePool(up.port, up)
            unchecked = FakePool(closed_port())
            checker = HealthChecker(
                runtime(
                    {
                        "api": (check(interval=0.02, fall=2), [stale, ok]),
                        "static": (None, [unchecked]),
                    }
                )
            )
            assert checker.state() == {
                "api": {
                    stale.url: {"healthy": True, "last": None, "checks": 0},
                    ok.url: {"healthy": True, "last": None, "checks": 0},
                }
            }
            checker.start()
            assert stale.healthy is True  # every server starts healthy
            await until(lambda: down.requests >= 2 and up.requests >= 2)
            await until(lambda: not stale.healthy)
            checker.stop()
            state = checker.state()["api"]
            assert state[stale.url]["healthy"] is False
            assert state[stale.url]["last"] == "status 503"
            assert state[ok.url]["healthy"] is True
            assert state[ok.url]["last"] == "status 200"
            assert state[ok.url]["checks"] >= 2
            assert unchecked.calls == []

    run(main())


def test_drives_the_compiled_server_pools() -> None:
    """The real Runtime and ServerPool objects (not the fake): the 503 server is marked
    unhealthy in C, the other stays healthy."""

    async def main() -> None:
        async with CheckServer(status=503) as down, CheckServer() as up:
            config = parse_config(
                {
                    "entrypoints": {"web": {"address": f"127.0.0.1:{closed_port()}"}},
                    "services": {
                        "api": {
                            "servers": [
                                {"url": f"http://127.0.0.1:{down.port}"},
                                {"url": f"http://127.0.0.1:{up.port}"},
                            ],
                            "health_check": {"interval": 0.02, "fall": 2},
                        }
                    },
                    "routes": [{"name": "api", "match": {"path": "/"}, "service": "api"}],
                }
            )
            engine = Engine(asyncio.get_running_loop(), None, tick_interval=1.0)
            compiled = compile_runtime(config, engine)
            checker = HealthChecker(compiled)
            bad, good = compiled.services["api"].pools
            assert len(checker) == 2 and bad.healthy and good.healthy
            checker.start()
            try:
                await until(lambda: not bad.healthy and up.requests >= 2)
                assert good.healthy
            finally:
                checker.stop()
                compiled.retire()
                engine.close()
            state = checker.state()["api"]
            assert (state[bad.url]["healthy"], state[bad.url]["last"]) == (False, "status 503")
            assert (state[good.url]["healthy"], state[good.url]["last"]) == (True, "status 200")

    run(main())
