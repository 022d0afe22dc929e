"""Shared by the benchmark scripts: a minimal keep-alive origin and a free loopback port."""

from __future__ import annotations

import socket
import textwrap

# Run with `python -c ORIGIN PORT`: prints "ready", then answers every request with 12 bytes.
ORIGIN = textwrap.dedent(
    """
    import asyncio, sys
    class P(asyncio.Protocol):
        def connection_made(self, t): self.t = t; self.b = b""
        def data_received(self, d):
            self.b += d
            while b"\\r\\n\\r\\n" in self.b:
                _, self.b = self.b.split(b"\\r\\n\\r\\n", 1)
                self.t.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 12\\r\\n\\r\\nhello world\\n")
    async def main():
        s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
        print("ready", flush=True)
        await s.serve_forever()
    asyncio.run(main())
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request to a gateway in front of ORIGIN and read its whole response."""
    sock.sendall(request)
    buf = b""
    while not buf.endswith(b"hello world\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk
    return buf
