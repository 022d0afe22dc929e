"""An upstream that misbehaves on request, run as its own process so a test can kill or stop it.

Run it as `python tests/integration/fault_origin.py --port 0 --name A`; it prints `PORT <n>`
once listening on 127.0.0.1. Being a separate process is the point: the fault tests SIGKILL it
mid-response and SIGSTOP it to make it hang, which an in-process origin cannot model.

Rules this file obeys:
- loopback only; plain asyncio streams, HTTP/1.1 with keep-alive; a request body is framed by
  Content-Length only (the tests never send chunked bodies here) and read whole first;
- every request except `/_stats` is counted under `"<METHOD> <target>"` once its body is read,
  before the misbehaviour, so a test can prove how many times the gateway sent it;
- every response carries `X-Server: <name>` so a test can tell which server answered.

The misbehaviour is chosen by the path (the query carries its numbers):

  /ok                       200, body `<name> <target>`
  /delay?head=S             the same after S seconds
  /slowbody?size=N&piece=P&gap=S
                            200 with Content-Length N, then P bytes of `b` every S seconds
  /status?code=C            status C with a short body
  /reset                    RST right after the request is read (nothing answered)
  /close                    FIN right after the request is read (nothing answered)
  /hang                     never answers (the connection stays open)
  /garbage                  a head that is not HTTP, then FIN
  /badchunk[?late=1]        a chunked 200 whose second chunk size is not hex, in the same write
                            as the head, or 100 ms after a valid first chunk with `late`
  /_stats                   JSON {"name", "requests": {"<METHOD> <target>": count}}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import sys
from urllib.parse import parse_qs, urlsplit

COUNTS: dict[str, int] = {}
NAME = "origin"


def _head(status: int, headers: list[tuple[str, str]], reason: str = "Status") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", f"X-Server: {NAME}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _response(status: int, body: bytes) -> bytes:
    return _head(status, [("Content-Length", str(len(body)))]) + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, target, lower-cased headers, body), or None at EOF between requests."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, target, headers, body


async def _answer(method: str, target: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
    """Act out the path's behaviour; True when the connection may serve another request."""
    url = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    path = url.path
    if path == "/ok":
        writer.write(_response(200, f"{NAME} {target}".encode()))
    elif path == "/delay":
        await asyncio.sleep(float(query.get("head", "0")))
        writer.write(_response(200, f"{NAME} {target}".encode()))
    elif path == "/slowbody":
        size, piece, gap = int(query["size"]), int(query["piece"]), float(query["gap"])
        writer.write(_head(200, [("Content-Length", str(size))]))
        sent = 0
        while sent < size:
            take = min(piece, size - sent)
            writer.write(b"b" * take)
            await writer.drain()
            sent += take
            if sent < size:
                await asyncio.sleep(gap)
    elif path == "/status":
        code = int(query.get("code", "200"))
        writer.write(_response(code, f"status {code} from {NAME}".encode()))
    elif path == "/reset":
        _reset(writer)
        return False
    elif path == "/close":
        writer.close()
        return False
    elif path == "/hang":
        await asyncio.Event().wait()  # cancelled when the server stops
    elif path == "/garbage":
        writer.write(b"THIS IS NOT HTTP\r\nat all\r\n\r\n")
        writer.close()
        return False
    elif path == "/badchunk":
        good = _head(200, [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n"
        bad = b"ZZ\r\nbroken\r\n0\r\n\r\n"
        if query.get("late"):
            writer.write(good)
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(bad)
        else:
            writer.write(good + bad)
        await writer.drain()
        writer.close()
        return False
    else:
        writer.write(_response(404, b"no such fault endpoint"))
    await writer.drain()
    return True


async def _serve_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            req = await _read_request(reader)
            if req is None:
                break
            method, target, _headers, body = req
            if target == "/_stats":
                doc = {"name": NAME, "requests": COUNTS}
                writer.write(_response(200, json.dumps(doc).encode()))
                await writer.drain()
                continue
            key = f"{method} {target}"
            COUNTS[key] = COUNTS.get(key, 0) + 1
            if not await _answer(method, target, body, writer):
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    except asyncio.CancelledError:
        # Shutdown (SIGTERM) cancels the handlers; ending quietly keeps Python 3.11's stream
        # callback from logging the cancellation as an error.
        pass
    finally:
        writer.transport.abort()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve_conn, "127.0.0.1", port, backlog=1024)
    sys.stdout.write(f"PORT {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop
    server.close()


def main() -> None:
    global NAME
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="origin")
    args = parser.parse_args()
    NAME = args.name
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
