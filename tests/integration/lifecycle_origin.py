"""A small HTTP/1.1 origin for the lifecycle tests, on 127.0.0.1 in a background thread.

Every response body is `"<name> <target>\\n"` followed by `size` filler bytes (`?size=N`), so
a test can tell which origin answered and whether the body arrived whole. `/sleep/<seconds>`
waits before answering. The origin remembers the peer address of every connection (the
gateway's side of its upstream connections) and the X-Request-ID of every request, and counts
requests in flight and answered.
"""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import parse_qs, urlsplit


def expected_body(name: str, target: str) -> bytes:
    """The exact body `Origin(name)` answers `target` with."""
    query = parse_qs(urlsplit(target).query)
    size = int(query.get("size", ["0"])[0])
    return f"{name} {target}\n".encode() + b"." * size


class Origin:
    """Start with `Origin("A").start()`; `stop()` closes it and its connections."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.peers: list[tuple[str, int]] = []
        self.request_ids: list[str] = []
        self.in_flight = 0
        self.answered = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Origin:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[:2])
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        key, _, value = line.partition(":")
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                self.request_ids.append(headers.get("x-request-id", ""))
                self.in_flight += 1
                try:
                    path = urlsplit(target).path
                    if path.startswith("/sleep/"):
                        await asyncio.sleep(float(path.split("/")[2]))
                    body = expected_body(self.name, target)
                    close = headers.get("connection", "").lower() == "close"
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: %d\r\n%s\r\n"
                        % (len(body), b"Connection: close\r\n" if close else b"")
                    )
                    writer.write(b"" if method == "HEAD" else body)
                    await writer.drain()
                    self.answered += 1
                finally:
                    self.in_flight -= 1
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
