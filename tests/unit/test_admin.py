"""The admin listener: /healthz, /readyz (200/503 JSON), 404, 405 with Allow, 400, 500."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from fastgate.server.admin import start_admin

READY = {"ready": True, "generation": 3, "pids": [11, 12], "last_reload": "ok"}
NOT_READY = {"ready": False, "generation": 1, "pids": [11], "last_reload": "none"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def exchange(status: Any, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Start the admin listener, send `request` on one connection, read to EOF."""
    address = f"127.0.0.1:{free_port()}"
    server = await start_admin(address, status)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(address.split(":")[1]))
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert headers["connection"] == "close"
    return int(lines[0].split(" ")[1]), headers, body


def ask(status: Any, request: bytes) -> tuple[int, dict[str, str], bytes]:
    return asyncio.run(exchange(status, request))


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("doc", "request_bytes", "code", "body"),
    [
        pytest.param(READY, get("/healthz"), 200, {"status": "ok"}, id="healthz"),
        pytest.param(
            NOT_READY, get("/healthz"), 200, {"status": "ok"}, id="healthz when not ready"
        ),
        pytest.param(READY, get("/readyz"), 200, READY, id="readyz ready"),
        pytest.param(NOT_READY, get("/readyz"), 503, NOT_READY, id="readyz not ready"),
        pytest.param(READY, get("/readyz?verbose=1"), 200, READY, id="query ignored"),
        pytest.param(READY, get("/nope"), 404, {"error": "not found"}, id="unknown path"),
        pytest.param(
            READY, get("/nope", "POST"), 404, {"error": "not found"}, id="unknown path, POST"
        ),
        pytest.param(
            READY, get("/readyz", "POST"), 405, {"error": "method not allowed"}, id="POST readyz"
        ),
        pytest.param(
            READY, get("/healthz", "DELETE"), 405, {"error": "method not allowed"}, id="DELETE"
        ),
        pytest.param(READY, b"GARBAGE\r\n\r\n", 400, {"error": "bad request line"}, id="no target"),
        pytest.param(
            READY,
            b"GET /healthz SPDY/3\r\n\r\n",
            400,
            {"error": "bad request line"},
            id="not HTTP/1.x",
        ),
    ],
)
def test_admin_answers(
    doc: dict[str, Any], request_bytes: bytes, code: int, body: dict[str, Any]
) -> None:
    got_code, headers, raw = ask(lambda: doc, request_bytes)
    assert got_code == code
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert int(headers["content-length"]) == len(raw)
    assert json.loads(raw) == body
    assert ("allow" in headers) == (code == 405)
    if code == 405:
        assert headers["allow"] == "GET, HEAD"


def test_head_has_headers_and_no_body() -> None:
    code, headers, raw = ask(lambda: READY, get("/readyz", "HEAD"))
    assert code == 200
    assert int(headers["content-length"]) == len(json.dumps(READY)) + 1
    assert raw == b""


def test_status_is_asked_for_each_request() -> None:
    calls = []

    def status() -> dict[str, Any]:
        calls.append(1)
        return READY

    ask(status, get("/readyz"))
    ask(status, get("/healthz"))
    assert len(calls) == 1


def test_a_failing_status_is_a_500_not_a_dropped_connection() -> None:
    def status() -> dict[str, Any]:
        raise RuntimeError("boom")

    code, _, raw = ask(status, get("/readyz"))
    assert code == 500
    assert json.loads(raw) == {"error": "internal error"}


def test_an_oversized_head_is_closed_without_an_answer() -> None:
    async def scenario() -> bytes:
        address = f"127.0.0.1:{free_port()}"
        server = await start_admin(address, lambda: READY)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(address[10:]))
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
                await writer.drain()
                return await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:  # closed with our bytes unread: also no answer
                return b""
            finally:
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == b""
