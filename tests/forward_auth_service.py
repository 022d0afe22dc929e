"""A small auth service for the forward_auth tests: raw HTTP/1.1 on asyncio, 127.0.0.1 only.

Hand-written like tests/integration/origin.py, so a test controls every byte of the answer.
Use `AuthService` on a running loop (`await svc.start()`, `await svc.close()`), or
`running_service()` to run one on its own loop in a thread (for a gateway in another
process); either way `https=TlsFiles(...)` serves TLS with a trustme certificate.

It decides by the token in `Authorization: Bearer <token>`:

  good       200, X-Auth-User: alice, X-Auth-Groups: ops
  bob        200, X-Auth-User: bob, X-Auth-Groups on two lines (dev, qa / web)
  nostore    200 like good, with Cache-Control: no-store
  bad        401 with a WWW-Authenticate challenge and a text body
  forbidden  403 with a JSON body
  cookie     401 with a Set-Cookie (never to be cached)
  redirect   302 to https://login.example/start?rd=<X-Forwarded-Uri>
  slow       answers 200 (as good) after `slow_seconds`
  error      500
  drop       closes the connection without an answer
  echo       200 with the request body it got as its body
  (other)    401 "no credentials"

`cache_control`, when set, is sent as Cache-Control on every 2xx, 401 and 403 answer that
sets none itself. It counts requests (`count`) and records each one (`requests`, `last`:
method, target, headers as (name, value) pairs, body). Bounds: heads up to 64 KiB, bodies up
to 1 MiB by Content-Length (chunked bodies are answered 400), keep-alive until the client
closes or sends `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_HEAD = 65536
MAX_BODY = 1 << 20
REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 500: "Internal Server Error"}  # fmt: skip
CHALLENGE = 'Bearer realm="auth", error="invalid_token"'


@dataclass(frozen=True)
class Seen:
    """One request as the auth service received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class TlsFiles:
    """A trustme CA and a certificate for 127.0.0.1 / localhost, written as PEM files."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "auth-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_context)


class _Conn(asyncio.Protocol):
    def __init__(self, service: AuthService) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.service.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.conns.discard(self)
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self) -> None:
        if self.busy or self.transport is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.send(400, b"head too large", [], close=True)
            return
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ")
        except ValueError:
            self.send(400, b"bad request line", [], close=True)
            return
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip(" \t")))
        probe = Seen(method, target, headers, b"")
        if probe.header("transfer-encoding") is not None:
            self.send(400, b"chunked bodies are not supported here", [], close=True)
            return
        length = int(probe.header("content-length") or 0)
        if length > MAX_BODY:
            self.send(400, b"body too large", [], close=True)
            return
        if len(self.buf) < end + 4 + length:
            return  # wait for the whole body
        body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        seen = Seen(method, target, headers, body)
        self.service.record(seen)
        self.busy = True
        self.task = asyncio.ensure_future(self.answer(seen))

    async def answer(self, seen: Seen) -> None:
        close = "close" in (seen.header("connection") or "").lower()
        status, headers, body = await self.service.decide(seen)
        if status == 0:  # drop: close without an answer
            if self.transport is not None:
                self.transport.close()
            return
        self.send(status, body, headers, close=close)

    def send(self, status: int, body: bytes, headers: list[tuple[str, str]], close: bool) -> None:
        if self.transport is None:
            return
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.busy = False
        self.task = None
        if close:
            self.transport.close()
        elif self.buf:
            asyncio.get_running_loop().call_soon(self.process)


class AuthService:
    """The service on the running loop; see the module docstring for what it answers."""

    def __init__(self, https: TlsFiles | None = None, slow_seconds: float = 5.0) -> None:
        self.https = https
        self.slow_seconds = slow_seconds
        self.cache_control: str | None = None
        self.count = 0
        self.requests: list[Seen] = []
        self.conns: set[_Conn] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.https is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/verify"

    @property
    def last(self) -> Seen:
        assert self.requests, "the auth service got no request"
        return self.requests[-1]

    def record(self, seen: Seen) -> None:
        self.count += 1
        self.requests.append(seen)
        del self.requests[:-100]  # bounded: the last 100 are enough for any test

    async def start(self) -> AuthService:
        ctx = self.https.server_context if self.https is not None else None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0, ssl=ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        await self.server.wait_closed()

    async def decide(self, seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers, body) for a request; status 0 means close without answering."""
        auth = seen.header("authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        cc = [("Cache-Control", self.cache_control)] if self.cache_control else []
        alice = [("X-Auth-User", "alice"), ("X-Auth-Groups", "ops")]
        if token == "good":
            return 200, alice + cc, b""
        if token == "bob":
            groups = [("X-Auth-Groups", "dev, qa"), ("X-Auth-Groups", "web")]
            return 200, [("X-Auth-User", "bob"), *groups, *cc], b""
        if token == "nostore":
            return 200, [*alice, ("Cache-Control", "no-store")], b""
        if token == "bad":
            headers = [("WWW-Authenticate", CHALLENGE), ("Content-Type", "text/plain"), *cc]
            return 401, headers, b"token rejected by the auth service\n"
        if token == "forbidden":
            body = json.dumps({"message": "not in group ops"}).encode()
            return 403, [("Content-Type", "application/json"), *cc], body
        if token == "cookie":
            return 401, [("Set-Cookie", "session=; Max-Age=0"), *cc], b"log in again"
        if token == "redirect":
            rd = seen.header("x-forwarded-uri") or "/"
            return 302, [("Location", f"https://login.example/start?rd={rd}")], b""
        if token == "slow":
            await asyncio.sleep(self.slow_seconds)
            return 200, alice, b""
        if token == "error":
            return 500, [("Content-Type", "text/plain")], b"auth backend broken"
        if token == "drop":
            return 0, [], b""
        if token == "echo":
            return 200, alice, seen.body
        return 401, [("WWW-Authenticate", 'Bearer realm="auth"'), *cc], b"no credentials"


@contextlib.contextmanager
def running_service(**options: Any) -> Iterator[AuthService]:
    """An AuthService on its own event loop in a daemon thread, for the duration."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    service = AuthService(**options)
    try:
        asyncio.run_coroutine_threadsafe(service.start(), loop).result(10)
        yield service
    finally:
        if service.server is not None:
            asyncio.run_coroutine_threadsafe(service.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
