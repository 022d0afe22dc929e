"""Real `redis-server` processes for the Redis client's tests, and the fixtures that start them.

Import the fixtures into a test module (`from redis_server import redis_server, redis_servers`,
with `tests/` on sys.path). Each server gets a free 127.0.0.1 port, a config file, a log and a
working directory under the test's tmp_path, no persistence, and the DEBUG command enabled
(for DEBUG SLEEP). `redis_servers` is the factory: plain servers, servers with requirepass,
TLS servers (a trustme CA and certificates), Sentinels watching a master, and restarts on the
same port. Every process is stopped at teardown.

Without `redis-server` on PATH the fixtures skip the test with a message saying so, except
under CI (CI=true), where a missing server is a failure: CI must install it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hiredis
import pytest

START_TIMEOUT = 10.0


def require_redis_server() -> str:
    """The redis-server path; pytest.skip (or pytest.fail under CI=true) when there is none."""
    path = shutil.which("redis-server")
    if path is None:
        message = (
            "redis-server was not found on PATH: the Redis client tests need a real server "
            "(Debian/Ubuntu: apt-get install redis-server)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsFiles:
    """A trustme CA with a server certificate (127.0.0.1, localhost) and a client certificate,
    written as PEM files for redis-server, and SSL contexts for clients."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.client_cert = self.ca.issue_cert("fastgate-test-client")
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_cert.cert_chain_pems[0].write_to_path(str(self.cert_file))
        self.server_cert.private_key_pem.write_to_path(str(self.key_file))

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """A context that trusts the test CA (and presents the client certificate if asked)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        if client_cert:
            self.client_cert.configure_cert(ctx)
        return ctx


class RedisServer:
    """One redis-server (or Sentinel) process; `start()` again restarts it on the same port."""

    def __init__(
        self,
        directory: Path,
        lines: Sequence[str],
        *,
        port: int,
        password: str | None = None,
        tls: TlsFiles | None = None,
        sentinel: bool = False,
    ) -> None:
        self.directory = directory
        self.port = port
        self.password = password
        self.tls = tls
        self.sentinel = sentinel
        self.log = directory / "redis.log"
        self.conf = directory / ("sentinel.conf" if sentinel else "redis.conf")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<RedisServer 127.0.0.1:{self.port}{' sentinel' if self.sentinel else ''}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        argv = [require_redis_server(), str(self.conf)]
        if self.sentinel:
            argv.append("--sentinel")
        self.proc = subprocess.Popen(
            argv, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.command("PING", timeout=1.0) == b"PONG":
                    return self
            except (OSError, hiredis.HiredisError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self} not answering after {START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def command(self, *args: Any, timeout: float = 5.0) -> Any:
        """Run one command on a fresh blocking connection (AUTH first when a password is set).
        An error reply raises RuntimeError."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            if self.tls is not None:
                sock = self.tls.client_context(client_cert=True).wrap_socket(
                    sock, server_hostname="127.0.0.1"
                )
            commands = [("AUTH", self.password)] if self.password is not None else []
            commands.append(args)
            sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
            reader = hiredis.Reader()
            replies = []
            while len(replies) < len(commands):
                data = sock.recv(65536)
                if not data:
                    raise OSError("connection closed by redis-server")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    replies.append(reply)
        finally:
            sock.close()
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis-server error: {reply}")
        return replies[-1]

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-conversation, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


class RedisServers:
    """The factory behind the `redis_servers` fixture; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[RedisServer] = []
        self._tls: TlsFiles | None = None

    @property
    def tls(self) -> TlsFiles:
        if self._tls is None:
            self._tls = TlsFiles(self.directory / "tls")
        return self._tls

    def _dir(self, kind: str) -> Path:
        path = self.directory / f"{kind}{len(self.started)}"
        path.mkdir()
        return path

    def start(
        self,
        *,
        password: str | None = None,
        tls: bool = False,
        tls_auth_clients: bool = False,
        config: Sequence[str] = (),
        port: int | None = None,
    ) -> RedisServer:
        """A redis-server; with `tls` it listens only on a TLS port (see `tls` for the CA)."""
        directory = self._dir("redis")
        port = port or free_port()
        lines = [
            "bind 127.0.0.1",
            f'dir "{directory}"',
            f'logfile "{directory / "redis.log"}"',
            'save ""',
            "appendonly no",
            "enable-debug-command yes",
        ]
        if tls:
            files = self.tls
            lines += [
                "port 0",
                f"tls-port {port}",
                f'tls-cert-file "{files.cert_file}"',
                f'tls-key-file "{files.key_file}"',
                f'tls-ca-cert-file "{files.ca_file}"',
                f"tls-auth-clients {'yes' if tls_auth_clients else 'no'}",
            ]
        else:
            lines.append(f"port {port}")
        if password is not None:
            lines.append(f"requirepass {password}")
        lines += config
        server = RedisServer(
            directory, lines, port=port, password=password, tls=self.tls if tls else None
        )
        self.started.append(server)
        return server.start()

    def start_sentinel(
        self,
        master: RedisServer,
        master_name: str = "mymaster",
        *,
        password: str | None = None,
    ) -> RedisServer:
        """A Sentinel watching `master` under `master_name` (quorum 1, slow to judge it down,
        so tests decide when the master changes); `password` is the sentinel's requirepass."""
        directory = self._dir("sentinel")
        port = free_port()
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f'dir "{directory}"',
            f'logfile "{directory / "redis.log"}"',
            f"sentinel monitor {master_name} 127.0.0.1 {master.port} 1",
            f"sentinel down-after-milliseconds {master_name} 60000",
        ]
        if master.password is not None:
            lines.append(f"sentinel auth-pass {master_name} {master.password}")
        if password is not None:
            lines.append(f"requirepass {password}")
        server = RedisServer(directory, lines, port=port, password=password, sentinel=True)
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisServers]:
    """Factory of real redis-server processes, all stopped at teardown."""
    require_redis_server()
    servers = RedisServers(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.fixture
def redis_server(redis_servers: RedisServers) -> RedisServer:
    """One plain redis-server (no password, no TLS)."""
    return redis_servers.start()


# ---- running client code -------------------------------------------------------------------

LOOPS = ("uvloop", "asyncio")


def run_on(loop_name: str, coro: Any, timeout: float = 20.0) -> Any:
    """Run `coro` to completion on a new uvloop or stdlib loop, bounded by `timeout` seconds
    (a hung test fails instead of hanging the suite)."""
    if loop_name == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        # A failed test may leave a client's background task behind; end it quietly.
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(_wait_all(leftovers))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _wait_all(tasks: set[asyncio.Task]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
