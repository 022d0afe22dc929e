"""A real upstream server for the integration tests: raw HTTP/1.1 on asyncio (uvloop).

Run it as `python tests/integration/origin.py --port N` (N = 0 picks a free port); it prints
`PORT <n>` on stdout once listening. It is deliberately hand-written rather than built on an
HTTP library, so that tests can make it misbehave in exact, byte-level ways (garbage heads,
resets, bodies on 204, closing a kept-alive connection as a request arrives).

Every response carries `X-Conn-Id: <n>`, the origin's number for the TCP connection, so a test
can tell which upstream connection served it. `GET /_stats` (asked directly, not through the
gateway) reports counters as JSON; connections whose first request is a `/_...` control
request are not counted as data connections.

Endpoints (the body of the request is always read whole, by its framing, before answering,
except where noted):

  /echo                the request body, byte for byte, with Content-Length
  /echo-path/<x>       the request path as the body (pipelining tests)
  /headers             the received request head as JSON (method, target, version, headers)
  /bytes/N             N bytes of the deterministic stream (see `stream_bytes`), Content-Length;
                       written with flow control, progress visible in /_stats `last_stream`
  /chunked/N           the same bytes as chunked with varied chunk sizes (`chunk_plan`);
                       `?trailer=1` adds a trailer field
  /close/N             the same bytes, close-delimited (no length), then FIN
                       (/bytes, /chunked, /close: `?type=T` adds `Content-Type: T`)
  /status/N            status N; `?cl=K` sends `Content-Length: K` and `?body=K` K body bytes,
                       defaults: 204/304 neither, others a short body with its length
  /sleep/S             answers after S seconds
  /reset               head (Content-Length 1 MiB), 64 KiB of body, then RST
  /interim             100 Continue, 103 Early Hints (separate writes), then 200 `final`
  /dribble             a 200 response written one byte at a time
  /badchunk            a chunked body whose second chunk size is not hex, in one write
                       with the head, or 50 ms later with `?late=1`
  /stall               head (Content-Length 1000), 100 bytes of body, then silence
  /early               403 with `Connection: close` as soon as the head is read, before
                       the body (which is then read and dropped), then close
  /reset-head          RST as soon as the request is read, before any response byte
  /garbage             a head that is not HTTP, then close
  /upload              streamed: sha256 and length of the body as JSON; answers
                       `Expect: 100-continue` with `HTTP/1.1 100 Continue` before reading it;
                       `?pause=S` stops reading the body for S seconds first
  /ws                  Upgrade: 101 Switching Protocols, `hello\\n`, then echoes every byte

Per-request controls (headers): `X-Origin-Keepalive: S` closes the connection after S idle
seconds; `X-Origin-Close: 1` answers with `Connection: close` and closes;
`X-Origin-Junk-After: 1` writes junk on the connection 50 ms after the response;
`X-Origin-Drop-Next: 1` makes the next request on the connection be answered by
closing it without a response (the keep-alive race a proxy must retry).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import socket
import struct
import sys

BLOCK_SIZE = 1 << 20
# A fixed pseudo-random 1 MiB block; the stream of N bytes is this block repeated, cut at N.
BLOCK = random.Random(20240601).randbytes(BLOCK_SIZE)
PIECE = 256 * 1024


def stream_bytes(n: int, offset: int = 0) -> bytes:
    """Bytes [offset, offset + n) of the deterministic stream (for tests; small n)."""
    out = bytearray()
    pos = offset
    while len(out) < n:
        start = pos % BLOCK_SIZE
        take = min(n - len(out), BLOCK_SIZE - start)
        out += BLOCK[start : start + take]
        pos += take
    return bytes(out)


def stream_sha256(n: int) -> str:
    """sha256 of the first n bytes of the stream."""
    h = hashlib.sha256()
    view = memoryview(BLOCK)
    left = n
    while left:
        take = min(left, BLOCK_SIZE)
        h.update(view[:take])
        left -= take
    return h.hexdigest()


CHUNK_SIZES = (1, 10, 4096, 65536, 3, 100_000)


def chunk_plan(n: int) -> list[int]:
    """Chunk sizes /chunked/N uses: cycling CHUNK_SIZES, the last one cut to fit."""
    sizes = []
    i = 0
    while n > 0:
        k = min(CHUNK_SIZES[i % len(CHUNK_SIZES)], n)
        sizes.append(k)
        n -= k
        i += 1
    return sizes


def chunked_body(n: int, trailer: bool = False) -> bytes:
    """The exact bytes /chunked/N sends after its head."""
    out = bytearray()
    pos = 0
    for k in chunk_plan(n):
        out += b"%x\r\n" % k + stream_bytes(k, pos) + b"\r\n"
        pos += k
    out += b"0\r\n"
    if trailer:
        out += b"X-Trailer: done\r\n"
    out += b"\r\n"
    return bytes(out)


REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    418: "I'm a teapot",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

STATS: dict = {
    "accepted": 0,  # every accepted connection
    "control": 0,  # of which control connections (first request /_...)
    "open": [],  # ids of open connections
    "closed_by_peer": [],  # ids whose peer (the gateway) closed them
    "dropped": [],  # ids closed by X-Origin-Drop-Next
    "requests": 0,
    "inflight": {},  # connection id -> path of the request being answered
    "last_stream": None,  # {"conn", "total", "sent", "paused", "pauses", "done", "sha256"}
    "last_upload": None,
}


class BadRequest(Exception):
    pass


class Request:
    def __init__(self, method: str, target: str, version: str, headers: list) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.lower = {}
        for name, value in headers:
            self.lower.setdefault(name.lower(), value)
        self.path, _, self.query_string = target.partition("?")
        self.query = {}
        for part in self.query_string.split("&"):
            if part:
                k, _, v = part.partition("=")
                self.query[k] = v

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.lower.get(name, default)


class Origin(asyncio.Protocol):
    next_id = 0

    def __init__(self) -> None:
        Origin.next_id += 1
        self.id = Origin.next_id
        self.buf = bytearray()
        self.early = False
        self.transport = None
        self.req: Request | None = None
        self.body_mode = None  # None | "length" | "chunked"
        self.body_left = 0
        self.chunk_state = "size"
        self.body_parts: list[bytes] | None = None
        self.body_hash = None
        self.body_len = 0
        self.busy = False  # a response is being produced
        self.tunnel = False
        self.paused = False
        self.stream = None  # generator state of a flow-controlled response
        self.first = True
        self.control = False
        self.keepalive_timer = None
        self.keepalive = None
        self.drop_next = False
        self.closing = False
        self.pending_timer = None

    # ---- connection events -----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)
        STATS["accepted"] += 1
        STATS["open"].append(self.id)

    def connection_lost(self, exc) -> None:
        if self.id in STATS["open"]:
            STATS["open"].remove(self.id)
        STATS["inflight"].pop(str(self.id), None)
        if not self.closing:
            STATS["closed_by_peer"].append(self.id)
        for t in (self.keepalive_timer, self.pending_timer):
            if t is not None:
                t.cancel()
        self.stream = None
        self.transport = None

    def eof_received(self):
        return False

    def pause_writing(self) -> None:
        self.paused = True
        if self.stream is not None:
            self.stream["paused"] = True
            self.stream["pauses"] += 1

    def resume_writing(self) -> None:
        self.paused = False
        if self.stream is not None:
            self.stream["paused"] = False
            self.pump()

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        if self.keepalive_timer is not None:
            self.keepalive_timer.cancel()
            self.keepalive_timer = None
        self.buf += data
        try:
            self.process()
        except BadRequest as exc:
            self.respond(400, str(exc).encode(), close=True)

    # ---- request parsing -------------------------------------------------------------------

    def process(self) -> None:
        while self.transport is not None and not self.closing:
            if self.req is None:
                if self.busy:
                    return
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                self.start_request(head)
                if self.req is None:
                    return
            elif not self.read_body():
                return

    def start_request(self, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            raise BadRequest("bad request line") from None
        headers = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise BadRequest("bad header line")
            headers.append([name, value.strip(" \t")])
        req = Request(method, target, version, headers)
        STATS["requests"] += 1
        if self.first:
            self.first = False
            if req.path.startswith("/_"):
                self.control = True
                STATS["control"] += 1
        if self.drop_next:
            STATS["dropped"].append(self.id)
            self.close()
            return
        self.req = req
        self.raw_head = head
        te = (req.get("transfer-encoding") or "").lower()
        if te:
            self.body_mode = "chunked"
            self.chunk_state = "size"
        elif int(req.get("content-length") or 0) > 0:
            self.body_mode = "length"
            self.body_left = int(req.get("content-length"))
        else:
            self.body_mode = None
        self.body_parts = []
        self.body_hash = hashlib.sha256()
        self.body_len = 0
        self.hash_only = req.path == "/upload"
        self.early = False
        if self.hash_only and "pause" in req.query:
            # Stop reading the body for a while: the proxy in front must hold the client back.
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(float(req.query["pause"]), self.resume)
        if self.hash_only and (req.get("expect") or "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.continue_sent = True
        else:
            self.continue_sent = False
        if req.path == "/reset-head":
            self.reset()
        elif req.path == "/early":
            # Refuse at once, before the body; the body is still read (and dropped) after.
            self.transport.write(
                self.head_bytes(403, [("Content-Length", "10"), ("Connection", "close")])
                + b"forbidden\n"
            )
            self.early = True

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def body_data(self, data: bytes) -> None:
        self.body_len += len(data)
        if self.early:
            return
        if self.hash_only:
            self.body_hash.update(data)
        else:
            self.body_parts.append(data)

    def read_body(self) -> bool:
        """Consume body bytes from buf; True when the request is complete and answered."""
        if self.body_mode == "length":
            take = min(self.body_left, len(self.buf))
            if take:
                self.body_data(bytes(self.buf[:take]))
                del self.buf[:take]
                self.body_left -= take
            if self.body_left:
                return False
        elif self.body_mode == "chunked":
            while True:
                if self.chunk_state == "size":
                    end = self.buf.find(b"\r\n")
                    if end < 0:
                        return False
                    line = bytes(self.buf[:end]).split(b";")[0].strip()
                    del self.buf[: end + 2]
                    try:
                        size = int(line, 16)
                    except ValueError:
                        raise BadRequest("bad chunk size") from None
                    if size == 0:
                        self.chunk_state = "trailer"
                    else:
                        self.body_left = size
                        self.chunk_state = "data"
                elif self.chunk_state == "data":
                    take = min(self.body_left, len(self.buf))
                    if take:
                        self.body_data(bytes(self.buf[:take]))
                        del self.buf[:take]
                        self.body_left -= take
                    if self.body_left:
                        return False
                    self.chunk_state = "crlf"
                elif self.chunk_state == "crlf":
                    if len(self.buf) < 2:
                        return False
                    if self.buf[:2] != b"\r\n":
                        raise BadRequest("missing CRLF after chunk")
                    del self.buf[:2]
                    self.chunk_state = "size"
                else:  # trailer section: lines until an empty one
                    end = self.buf.find(b"\r\n")
                    if end < 0:
                        return False
                    del self.buf[: end + 2]
                    if end == 0:
                        break
        req = self.req
        self.req = None
        self.busy = True
        self.handle(req, b"".join(self.body_parts))
        return True

    # ---- responses -------------------------------------------------------------------------

    def head_bytes(self, status: int, headers: list, reason: str | None = None) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"X-Conn-Id: {self.id}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def wants_close(self, req: Request) -> bool:
        conn = (req.get("connection") or "").lower()
        if req.version == "HTTP/1.0":
            return "keep-alive" not in conn
        return "close" in conn

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: list | None = None,
        close: bool = False,
        head_only: bool = False,
    ) -> None:
        headers = list(headers or [])
        headers.append(("Content-Length", str(len(body))))
        if close:
            headers.append(("Connection", "close"))
        out = self.head_bytes(status, headers)
        if not head_only:
            out += body
        self.transport.write(out)
        self.done(close)

    def done(self, close: bool) -> None:
        """The response is out: close or wait for the next request."""
        self.busy = False
        STATS["inflight"].pop(str(self.id), None)
        if close:
            self.close()
            return
        if self.keepalive is not None:
            self.keepalive_timer = asyncio.get_running_loop().call_later(self.keepalive, self.close)
        if self.buf:
            asyncio.get_running_loop().call_soon(self.process)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        self.closing = True
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def handle(self, req: Request, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self.early:
            self.done(True)
            return
        if req.get("x-origin-keepalive"):
            self.keepalive = float(req.get("x-origin-keepalive"))
        if req.get("x-origin-drop-next"):
            self.drop_next = True
        if req.get("x-origin-junk-after"):
            loop.call_later(0.05, lambda: self.transport and self.transport.write(b"JUNK\r\n\r\n"))
        close = self.wants_close(req) or bool(req.get("x-origin-close"))
        head_only = req.method == "HEAD"
        path = req.path
        STATS["inflight"][str(self.id)] = path
        parts = path.split("/")
        if path == "/_stats":
            doc = dict(STATS)
            self.respond(
                200, json.dumps(doc).encode(), [("Content-Type", "application/json")], close=close
            )
        elif path == "/echo":
            self.respond(
                200,
                body,
                [("Content-Type", "application/octet-stream")],
                close=close,
                head_only=head_only,
            )
        elif path.startswith("/echo-path/"):
            self.respond(200, path.encode(), close=close, head_only=head_only)
        elif path == "/headers":
            doc = {
                "method": req.method,
                "target": req.target,
                "version": req.version,
                "headers": req.headers,
                "body_length": len(body),
            }
            self.respond(
                200,
                json.dumps(doc).encode(),
                [("Content-Type", "application/json")],
                close=close,
                head_only=head_only,
            )
        elif path == "/upload":
            doc = {
                "length": self.body_len,
                "sha256": self.body_hash.hexdigest(),
                "continue_sent": self.continue_sent,
            }
            STATS["last_upload"] = doc
            self.respond(
                200, json.dumps(doc).encode(), [("Content-Type", "application/json")], close=close
            )
        elif len(parts) == 3 and parts[1] in ("bytes", "chunked", "close"):
            self.start_stream(parts[1], int(parts[2]), req, close, head_only)
        elif len(parts) == 3 and parts[1] == "status":
            self.status(int(parts[2]), req, close, head_only)
        elif len(parts) == 3 and parts[1] == "sleep":
            self.pending_timer = loop.call_later(
                float(parts[2]), lambda: self.transport and self.respond(200, b"slept", close=close)
            )
        elif path == "/interim":
            # Two interim responses in separate writes, then the final one.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            loop.call_later(
                0.05, lambda: self.transport and self.respond(200, b"final", close=close)
            )
        elif path == "/dribble":
            # The whole response one byte per write, 1 ms apart.
            out = self.head_bytes(200, [("Content-Length", "7")]) + b"dribble"
            self.dribble(out, close)
        elif path == "/badchunk":
            good = self.head_bytes(200, [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n"
            bad = b"ZZ\r\nbroken\r\n0\r\n\r\n"
            if req.query.get("late"):
                self.transport.write(good)
                loop.call_later(0.05, lambda: self.transport and self.transport.write(bad))
            else:
                self.transport.write(good + bad)
            self.done(close)
        elif path == "/stall":
            # A head and part of the body, then silence (the connection stays open).
            self.transport.write(self.head_bytes(200, [("Content-Length", "1000")]) + b"s" * 100)
        elif path == "/reset":
            self.transport.write(
                self.head_bytes(200, [("Content-Length", str(BLOCK_SIZE))]) + BLOCK[: 64 * 1024]
            )
            loop.call_later(0.05, self.reset)
        elif path == "/reset-head":
            self.reset()
        elif path == "/garbage":
            self.transport.write(b"THIS IS NOT HTTP\r\nat all\r\n\r\n")
            self.close()
        elif path == "/ws":
            upgrade = req.get("upgrade")
            if not upgrade or "upgrade" not in (req.get("connection") or "").lower():
                self.respond(400, b"not an upgrade", close=close)
                return
            self.tunnel = True
            self.transport.write(
                self.head_bytes(101, [("Connection", "Upgrade"), ("Upgrade", upgrade)]) + b"hello\n"
            )
            if self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                self.transport.write(data)
        else:
            self.respond(404, b"no such origin endpoint: " + path.encode(), close=close)

    def dribble(self, out: bytes, close: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(out[:1])
        if len(out) > 1:
            asyncio.get_running_loop().call_later(0.001, self.dribble, out[1:], close)
        else:
            self.done(close)

    def status(self, code: int, req: Request, close: bool, head_only: bool) -> None:
        headers = []
        if code in (204, 304):
            body = b"x" * int(req.query.get("body", 0))
            if "cl" in req.query:
                headers.append(("Content-Length", req.query["cl"]))
        else:
            body = (
                b"x" * int(req.query.get("body", 0))
                if "body" in req.query
                else (b"status %d\n" % code)
            )
            headers.append(("Content-Length", req.query.get("cl", str(len(body)))))
        if close:
            headers.append(("Connection", "close"))
        out = self.head_bytes(code, headers)
        if not head_only:
            out += body
        # One write, so that a proxy sees any stray body bytes together with the head.
        self.transport.write(out)
        self.done(close)

    def start_stream(self, kind: str, n: int, req: Request, close: bool, head_only: bool) -> None:
        if kind == "bytes":
            headers = [("Content-Length", str(n))]
        elif kind == "chunked":
            headers = [("Transfer-Encoding", "chunked")]
            if req.query.get("trailer"):
                headers.append(("Trailer", "X-Trailer"))
        else:
            headers = [("Connection", "close")]
            close = True
        if close and kind != "close":
            headers.append(("Connection", "close"))
        if req.query.get("type"):
            headers.append(("Content-Type", req.query["type"].replace("%2F", "/")))
        self.transport.write(self.head_bytes(200, headers))
        if head_only:
            self.done(close)
            return
        # The stream's progress is its /_stats entry, updated as it goes.
        self.stream = STATS["last_stream"] = {
            "conn": self.id,
            "kind": kind,
            "total": n,
            "sent": 0,
            "paused": self.paused,
            "pauses": 0,
            "done": False,
            "sha256": None,
            "close": close,
            "chunk": 0,
            "trailer": bool(req.query.get("trailer")),
        }
        self.plan = chunk_plan(n) if kind == "chunked" else None
        self.stream_hash = hashlib.sha256()
        self.pump()

    def pump(self) -> None:
        s = self.stream
        view = memoryview(BLOCK)
        while s is not None and not self.paused and self.transport is not None:
            left = s["total"] - s["sent"]
            if left == 0:
                if s["kind"] == "chunked":
                    self.transport.write(
                        b"0\r\nX-Trailer: done\r\n\r\n" if s["trailer"] else b"0\r\n\r\n"
                    )
                s["done"] = True
                s["sha256"] = self.stream_hash.hexdigest()
                self.stream = None
                self.done(s["close"])
                return
            start = s["sent"] % BLOCK_SIZE
            if s["kind"] == "chunked":
                take = self.plan[s["chunk"]]
                s["chunk"] += 1
                piece = stream_bytes(take, s["sent"])
                self.transport.write(b"%x\r\n" % take + piece + b"\r\n")
            else:
                take = min(left, BLOCK_SIZE - start, PIECE)
                piece = view[start : start + take]
                self.transport.write(piece)
            self.stream_hash.update(piece)
            s["sent"] += take


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Origin, "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {bound}\n")
    sys.stdout.flush()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    await stop
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a fastgate dependency
        runner = asyncio.run
    runner(serve(args.port))


if __name__ == "__main__":
    main()
