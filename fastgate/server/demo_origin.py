"""A tiny built-in upstream, so the embedded default config shows a working proxy at once.

It answers every request with a small JSON document describing what it received. It is a
demo, not a server: request bodies must have a Content-Length (anything else is answered
and the connection closed), heads are bounded (64 KiB), and keep-alive follows the request's
Connection header.
"""

from __future__ import annotations

import asyncio
import json

from fastgate.config.schema import parse_address

MAX_HEAD = 65536


class _DemoProtocol(asyncio.Protocol):
    """Answers every request with a small JSON document describing what it received."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.skip = 0  # body bytes of the current request still to discard

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.transport.is_closing():
            if self.skip:
                taken = min(self.skip, len(self.buf))
                self.buf = self.buf[taken:]
                self.skip -= taken
                if self.skip:
                    return
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                if len(self.buf) > MAX_HEAD:
                    self._reply(431, {"error": "request head too large"}, close=True)
                return
            self.buf = rest
            self._request(head)

    def _request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = ([*lines[0].split(" "), "", ""])[:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "0") or "0"
        if "transfer-encoding" in headers or not length.isdigit():
            self._reply(400, {"error": "the demo origin needs a Content-Length body"}, True)
            return
        self.skip = int(length)
        connection = headers.get("connection", "").lower()
        close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
        doc = {
            "message": "Hello from the fastgate demo origin",
            "method": method,
            "path": target,
            "request_id": headers.get("x-request-id"),
            "forwarded_for": headers.get("x-forwarded-for"),
        }
        self._reply(200, doc, close, head_only=method == "HEAD")

    def _reply(self, code: int, doc: dict[str, object], close: bool, head_only: bool = False):
        body = json.dumps(doc, indent=2).encode() + b"\n"
        reason = {200: b"OK", 400: b"Bad Request", 431: b"Request Header Fields Too Large"}
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (
                code,
                reason[code],
                len(body),
                b"Connection: close\r\n" if close else b"",
                b"" if head_only else body,
            )
        )
        if close:
            self.transport.close()


async def start_demo_origin(address: str) -> asyncio.AbstractServer:
    """Listen on `address` and serve the demo document."""
    host, port = parse_address(address)
    return await asyncio.get_running_loop().create_server(_DemoProtocol, host, port)
