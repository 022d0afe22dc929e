"""A small upstream whose behaviour is set per process, for the service tests (balancing,
retries, outlier detection, circuit breaker): run several, each with its own answer.

Run it as `python tests/integration/services_origin.py --name a --status 503 [--delay S]
[--mode reset]`; it prints `PORT <n>` once listening on 127.0.0.1 (never another address).

Rules it obeys:
- every answer carries `X-Server: <name>`, so a test knows which server answered;
- it counts only data requests, after their body is read whole: total, per method, per path,
  the most in flight at once, and (length, sha256) of every request body; control requests
  (paths starting with `/_`) are never counted;
- `GET /_stats` reports the counters as JSON; `GET /_set?status=N&delay=S&mode=M` changes
  the answer of later data requests (a test makes a failing server healthy with it).

Data paths:
  /reset-head          RST as soon as the request is read (whatever the mode)
  .../sleep/S          the normal answer after S seconds (on top of --delay)
  /slowbody/N/S        200 with Content-Length N, then one body byte every S seconds
  anything else        the normal answer: `--status` (default 200) after `--delay` seconds,
                       body JSON {name, method, path, body_length, body_sha256}
`--mode reset` makes every data request end in a reset (as /reset-head) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import struct
import sys
from typing import Any

STATE: dict[str, Any] = {"name": "origin", "status": 200, "delay": 0.0, "mode": "normal"}
STATS: dict[str, Any] = {
    "requests": 0,
    "methods": {},
    "paths": {},
    "inflight": 0,
    "max_inflight": 0,
    "bodies": [],  # [length, sha256] of each data request's body, in arrival order
}
REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway"}


class Reset(Exception):
    """The connection was reset on purpose."""


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The request body by its framing (Content-Length or chunked; none = empty)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def answer(writer: asyncio.StreamWriter, status: int, body: bytes, close: bool) -> None:
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
        f"X-Server: {STATE['name']}",
        f"Content-Length: {len(body)}",
        "Content-Type: application/json",
    ]
    if close:
        head.append("Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def control(path: str, query: dict[str, str]) -> bytes:
    if path == "/_set":
        for key, kind in (("status", int), ("delay", float), ("mode", str)):
            if key in query:
                STATE[key] = kind(query[key])
        return json.dumps(STATE).encode()
    return json.dumps({**STATS, "name": STATE["name"]}).encode()


async def data(writer: asyncio.StreamWriter, method: str, path: str, body: bytes) -> bytes:
    """Count the request and produce its answer (or reset, or stream a slow body)."""
    STATS["requests"] += 1
    STATS["methods"][method] = STATS["methods"].get(method, 0) + 1
    STATS["paths"][path] = STATS["paths"].get(path, 0) + 1
    STATS["bodies"].append([len(body), hashlib.sha256(body).hexdigest()])
    if path == "/reset-head" or STATE["mode"] == "reset":
        reset(writer)
        raise Reset
    parts = path.split("/")
    delay = STATE["delay"]
    if "sleep" in parts[:-1]:
        delay += float(parts[parts.index("sleep") + 1])
    if delay:
        await asyncio.sleep(delay)
    if len(parts) == 4 and parts[1] == "slowbody":
        n, gap = int(parts[2]), float(parts[3])
        writer.write(
            f"HTTP/1.1 200 OK\r\nX-Server: {STATE['name']}\r\nContent-Length: {n}\r\n\r\n".encode()
        )
        for _ in range(n):
            await asyncio.sleep(gap)
            writer.write(b"s")
            await writer.drain()
        raise Reset  # the response is out; nothing more to write
    doc = {
        "name": STATE["name"],
        "method": method,
        "path": path,
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return json.dumps(doc).encode()


async def serve_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await read_body(reader, headers)
            path, _, qs = target.partition("?")
            query = dict(p.partition("=")[::2] for p in qs.split("&") if p)
            close = "close" in headers.get("connection", "").lower()
            if path.startswith("/_"):
                answer(writer, 200, control(path, query), close)
            else:
                STATS["inflight"] += 1
                STATS["max_inflight"] = max(STATS["max_inflight"], STATS["inflight"])
                try:
                    out = await data(writer, method, path, body)
                    answer(writer, STATE["status"], out, close)
                finally:
                    STATS["inflight"] -= 1
            await writer.drain()
            if close:
                return
    except (Reset, ConnectionError, asyncio.IncompleteReadError):
        return
    except asyncio.CancelledError:
        return  # shutting down with a request still sleeping: nothing to report
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main_async(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(serve_conn, "127.0.0.1", port, backlog=512)
    sys.stdout.write(f"PORT {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    await stop
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="origin")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--mode", choices=("normal", "reset"), default="normal")
    args = parser.parse_args()
    STATE.update(name=args.name, status=args.status, delay=args.delay, mode=args.mode)
    asyncio.run(main_async(args.port))


if __name__ == "__main__":
    main()
