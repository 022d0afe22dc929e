"""fastgate.client.http against raw HTTP servers on 127.0.0.1 that this file scripts byte for byte.

Each server is asyncio.start_server with a handler written here, so the tests control every
byte a response has and observe every byte a request has, plus how many connections the
client opened and whether it closed them.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trustme

from fastgate.client.http import (
    HttpClient,
    HttpClientError,
    HttpResponse,
    cache_max_age,
    split_url,
)

TEST_TIMEOUT = 10.0
LOOPS = ("asyncio", "uvloop")


def run(coro: Awaitable, loop_name: str = "asyncio") -> object:
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
    """Wait until `predicate()` holds (a condition the server observes), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


Handler = Callable[["RawServer", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable]


class RawServer:
    """A raw HTTP server: `handler(server, conn_index, reader, writer)` runs per connection.

    Records every request as (connection index, head bytes, body bytes), counts connections,
    and counts connections the client closed while the server waited for a request.
    """

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.peer_closes = 0
        self.finished = 0  # connections whose handler returned (closed by either side)
        self.requests: list[tuple[int, bytes, bytes]] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()

    def url(self, path: str = "/") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handler(self, index, reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self.finished += 1

    def all_closed(self) -> bool:
        """Every connection has ended: the client keeps none of them."""
        return self.finished == self.connections

    async def read_request(self, index: int, reader: asyncio.StreamReader) -> bytes | None:
        """The next request's head (its body is recorded too); None when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(match[1])) if match else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closes += 1
            return None
        self.requests.append((index, head, body))
        return head


def answer(*responses: bytes, close: bool = False) -> Handler:
    """Answer the i-th request of each connection with responses[i] (the last one repeats);
    with close=True, close the connection after the first answer."""

    async def handler(srv: RawServer, index: int, reader, writer) -> None:
        count = 0
        while await srv.read_request(index, reader) is not None:
            writer.write(responses[min(count, len(responses) - 1)])
            await writer.drain()
            count += 1
            if close:
                return

    return handler


def stall(partial: bytes = b"") -> Handler:
    """Read one request, send `partial` (maybe nothing), then wait until the client closes."""

    async def handler(srv: RawServer, index: int, reader, writer) -> None:
        if await srv.read_request(index, reader) is None:
            return
        writer.write(partial)
        await writer.drain()
        await srv.read_request(index, reader)  # returns None (peer_closes += 1) at EOF

    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- framing and keep-alive -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "response", "close", "body", "reused"),
    [
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            False,
            b"hello",
            True,
            id="content-length",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;name=val\r\nhello\r\n6;x;y="q"\r\n world\r\n0\r\nX-Trailer: t\r\nX-T2: u\r\n\r\n',
            False,
            b"hello world",
            True,
            id="chunked with extensions and trailers",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nuntil the server closes",
            True,
            b"until the server closes",
            False,
            id="close-delimited",
        ),
        pytest.param(
            "HEAD",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            False,
            b"",
            True,
            id="HEAD has no body",
        ),
        pytest.param(
            "GET", b"HTTP/1.1 204 No Content\r\n\r\n", False, b"", True, id="204 has no body"
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            False,
            b"",
            True,
            id="304 has no body",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
            False,
            b"ok",
            True,
            id="interim 100 and 103 skipped",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            False,  # the server would even keep it open: the client must not
            b"ok",
            False,
            id="Connection: close not reused",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            False,
            b"ok",
            False,
            id="HTTP/1.0 not reused",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTRAY",
            False,
            b"ok",
            False,
            id="stray bytes after the body: not reused",
        ),
    ],
)
def test_response_framing(
    method: str, response: bytes, close: bool, body: bytes, reused: bool
) -> None:
    async def body_() -> None:
        async with RawServer(answer(response, close=close)) as srv:
            client = HttpClient()
            try:
                first = await client.request(method, srv.url("/x"))
                second = await client.request(method, srv.url("/x"))
            finally:
                await client.close()
        for resp in (first, second):
            assert type(resp.body) is bytes
            assert resp.body == body
            assert resp.status == int(response.rsplit(b"HTTP/1.", 1)[1][2:5])
        assert len(srv.requests) == 2
        assert srv.connections == (1 if reused else 2)

    run(body_())


def test_response_fields() -> None:
    response = (
        b"HTTP/1.1 201 Created here\r\nX-Multi: a\r\nContent-Length: 0\r\n"
        b"x-multi: b\r\nX-Latin: caf\xe9\r\n\r\n"
    )

    async def body() -> HttpResponse:
        async with RawServer(answer(response)) as srv:
            client = HttpClient()
            try:
                return await client.request("GET", srv.url())
            finally:
                await client.close()

    resp = run(body())
    assert (resp.status, resp.reason) == (201, "Created here")
    assert resp.headers == (
        ("X-Multi", "a"),
        ("Content-Length", "0"),
        ("x-multi", "b"),
        ("X-Latin", "caf\xe9"),
    )
    assert resp.header("X-MULTI") == "a"
    assert resp.get_all("x-Multi") == ["a", "b"]
    assert resp.header("missing") is None
    assert resp.get_all("missing") == []


@pytest.mark.parametrize("loop_name", LOOPS)
def test_keep_alive_reuses_one_connection(loop_name: str) -> None:
    async def body() -> None:
        async with RawServer(answer(OK)) as srv:
            client = HttpClient()
            try:
                for _ in range(3):
                    resp = await client.request("GET", srv.url("/k"))
                    assert (resp.status, resp.body) == (200, b"ok")
            finally:
                await client.close()
            await until(lambda: srv.peer_closes == 1)  # close() closed the pooled connection
        assert srv.connections == 1
        assert [index for index, _, _ in srv.requests] == [0, 0, 0]

    run(body(), loop_name)


@pytest.mark.parametrize(
    ("options", "pause", "connections"),
    [
        pytest.param({}, 0.0, 1, id="reused"),
        pytest.param({"idle_timeout": 0.05}, 0.2, 2, id="idle longer than idle_timeout"),
        pytest.param({"max_idle_per_host": 0}, 0.0, 2, id="pooling off"),
    ],
)
def test_pool_limits(options: dict, pause: float, connections: int) -> None:
    async def body() -> None:
        async with RawServer(answer(OK)) as srv:
            client = HttpClient(**options)
            try:
                await client.request("GET", srv.url())
                await asyncio.sleep(pause)
                await client.request("GET", srv.url())
            finally:
                await client.close()
        assert srv.connections == connections

    run(body())


def test_idle_connections_capped_per_host() -> None:
    """Three requests at once need three connections; with max_idle_per_host=2 one is closed
    when they end, and the two kept serve the next requests."""

    async def body() -> None:
        async def handler(srv: RawServer, index: int, reader, writer) -> None:
            while await srv.read_request(index, reader) is not None:
                await until(lambda: len(srv.requests) >= 3)  # hold answers until all 3 arrived
                writer.write(OK)
                await writer.drain()

        async with RawServer(handler) as srv:
            client = HttpClient(max_idle_per_host=2)
            try:
                first = await asyncio.gather(*(client.request("GET", srv.url()) for _ in range(3)))
                await until(lambda: srv.peer_closes == 1)
                later = [await client.request("GET", srv.url()) for _ in range(4)]
            finally:
                await client.close()
        assert [r.body for r in first + later] == [b"ok"] * 7
        assert srv.connections == 3

    run(body())


def test_requests_after_close_are_not_pooled() -> None:
    async def body() -> None:
        async with RawServer(answer(OK)) as srv:
            client = HttpClient()
            await client.request("GET", srv.url())
            await client.close()
            await until(lambda: srv.peer_closes == 1)
            resp = await client.request("GET", srv.url())
            await until(lambda: srv.peer_closes == 2)  # closed after use, not kept
        assert resp.body == b"ok"
        assert srv.connections == 2

    run(body())


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"max_idle_per_host": -1}, id="max_idle_per_host"),
        pytest.param({"idle_timeout": 0}, id="idle_timeout"),
        pytest.param({"max_response_bytes": -1}, id="max_response_bytes"),
    ],
)
def test_bad_client_options(options: dict) -> None:
    with pytest.raises(ValueError):
        HttpClient(**options)


def test_idle_connection_closed_by_server_is_not_used() -> None:
    """The server closes its keep-alive connection while idle: even a POST then succeeds,
    on a new connection, because the dead one is seen before anything is written on it."""

    async def body() -> None:
        async with RawServer(answer(OK, close=True)) as srv:
            client = HttpClient()
            try:
                await client.request("GET", srv.url())
                await asyncio.sleep(0.2)  # the client's loop sees the FIN meanwhile
                resp = await client.request("POST", srv.url(), body=b"x")
            finally:
                await client.close()
        assert resp.body == b"ok"
        assert srv.connections == 2

    run(body())


def stale_after_first() -> Handler:
    """Connection 0 answers one request, then reads the next one and closes without an answer
    (the race of a server closing an idle connection just as the client reuses it)."""

    async def handler(srv: RawServer, index: int, reader, writer) -> None:
        if index == 0:
            await srv.read_request(index, reader)
            writer.write(OK)
            await writer.drain()
            await srv.read_request(index, reader)
            return
        await answer(OK)(srv, index, reader, writer)

    return handler


@pytest.mark.parametrize("loop_name", LOOPS)
def test_stale_connection_retried_once_for_get(loop_name: str) -> None:
    async def body() -> None:
        async with RawServer(stale_after_first()) as srv:
            client = HttpClient()
            try:
                await client.request("GET", srv.url())
                resp = await client.request("GET", srv.url("/again"))
            finally:
                await client.close()
        assert resp.body == b"ok"
        assert srv.connections == 2
        assert [(index, head.split(b" ")[1]) for index, head, _ in srv.requests] == [
            (0, b"/"),
            (0, b"/again"),
            (1, b"/again"),
        ]

    run(body(), loop_name)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_stale_connection_not_retried_for_post(loop_name: str) -> None:
    async def body() -> None:
        async with RawServer(stale_after_first()) as srv:
            client = HttpClient()
            try:
                await client.request("GET", srv.url())
                with pytest.raises(HttpClientError) as info:
                    await client.request("POST", srv.url("/p"), body=b"once")
            finally:
                await client.close()
        assert info.value.kind == "connect"
        assert f"127.0.0.1:{srv.port}" in str(info.value)
        assert srv.connections == 1
        assert len(srv.requests) == 2

    run(body(), loop_name)


# -- the request on the wire ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "body", "expected_lines"),
    [
        pytest.param(
            "POST",
            [("X-Api-Key", "k1"), ("Accept", "application/json")],
            b"\x00\x01binary\r\n\r\nend\xff",
            ["X-Api-Key: k1", "Accept: application/json", "Content-Length: 16"],
            id="POST body byte for byte",
        ),
        pytest.param(
            "PUT",
            [],
            bytes(range(256)) * 800,
            ["Content-Length: 204800"],
            id="large PUT body",
        ),
        pytest.param("POST", [], b"", ["Content-Length: 0"], id="empty POST says length 0"),
        pytest.param("GET", [("X-A", "1")], b"", ["X-A: 1"], id="GET has no Content-Length"),
        pytest.param(
            "GET",
            [("user-agent", "probe/1"), ("X-Tab", "a\tb")],
            b"",
            ["user-agent: probe/1", "X-Tab: a\tb"],
            id="caller User-Agent replaces ours",
        ),
    ],
)
def test_request_bytes(method: str, headers: list, body: bytes, expected_lines: list[str]) -> None:
    async def body_() -> None:
        async with RawServer(answer(OK)) as srv:
            client = HttpClient()
            try:
                resp = await client.request(
                    method, srv.url("/p/a?q=1&r=%20"), headers=headers, body=body
                )
            finally:
                await client.close()
        assert resp.body == b"ok"
        [(_, head, received)] = srv.requests
        default_ua = (
            [] if any(n.lower() == "user-agent" for n, _ in headers) else ["User-Agent: fastgate"]
        )
        lines = [
            f"{method} /p/a?q=1&r=%20 HTTP/1.1",
            f"Host: 127.0.0.1:{srv.port}",
            *default_ua,
            *expected_lines,
        ]
        assert head == ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        assert received == body

    run(body_())


SECRET = "s3cret-token"


@pytest.mark.parametrize(
    ("method", "url", "headers"),
    [
        pytest.param("GET", "/", [("Authorization", f"Bearer {SECRET}\r\nX: y")], id="CRLF"),
        pytest.param("GET", "/", [("Authorization", f"{SECRET}\n")], id="LF"),
        pytest.param("GET", "/", [("Authorization", f"{SECRET}\r")], id="CR"),
        pytest.param("GET", "/", [("Authorization", f"{SECRET}\x00")], id="NUL"),
        pytest.param("GET", "/", [("Authorization", f"{SECRET}\x01")], id="control char"),
        pytest.param("GET", "/", [("X-Euro", f"{SECRET}\u20ac")], id="not latin-1"),
        pytest.param("GET", "/", [("Bad Name", "v")], id="space in name"),
        pytest.param("GET", "/", [(f"Authorization: {SECRET}", "v")], id="colon in name"),
        pytest.param("GET", "/", [("", "v")], id="empty name"),
        pytest.param("GET", "/", [("Host", "evil.example")], id="Host"),
        pytest.param("POST", "/", [("content-length", "0")], id="Content-Length"),
        pytest.param("POST", "/", [("Transfer-Encoding", "chunked")], id="Transfer-Encoding"),
        pytest.param("GET", "/", [("Connection", "close")], id="Connection"),
        pytest.param("GE T", "/", [], id="method not a token"),
        pytest.param("GET", "/a b", [], id="space in url"),
        pytest.param("GET", "/a\r\nX: y", [], id="CRLF in url"),
        pytest.param("GET", "/\u00e9", [], id="non-ASCII url"),
    ],
)
def test_unsafe_request_refused_before_sending(method: str, url: str, headers: list) -> None:
    async def body() -> None:
        async with RawServer(answer(OK)) as srv:
            client = HttpClient()
            try:
                with pytest.raises(ValueError) as info:
                    await client.request(method, srv.url(url), headers=headers)
            finally:
                await client.close()
            await asyncio.sleep(0.05)
        assert SECRET not in str(info.value)
        assert srv.connections == 0

    run(body())


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://127.0.0.1/", id="scheme"),
        pytest.param("http://user:pw@127.0.0.1/", id="userinfo"),
        pytest.param("http:///path", id="no host"),
        pytest.param("http://127.0.0.1:99999/", id="port out of range"),
        pytest.param("http://127.0.0.1:0/", id="port 0"),
        pytest.param("http://127.0.0.1:x/", id="port not a number"),
        pytest.param("http://[::zz]/", id="bad IPv6"),
        pytest.param("http://a%0d.example/", id="bad host"),
    ],
)
def test_bad_url_refused(url: str) -> None:
    with pytest.raises(ValueError) as info:
        split_url(url)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "host", "port", "target", "host_header"),
    [
        pytest.param("http://[::1]:8080/a?b=c", "::1", 8080, "/a?b=c", "[::1]:8080", id="IPv6"),
        pytest.param("https://[::1]/", "::1", 443, "/", "[::1]", id="IPv6 default port"),
        pytest.param(
            "https://Example.COM/x", "example.com", 443, "/x", "example.com", id="https default"
        ),
        pytest.param("http://h:80", "h", 80, "/", "h", id="explicit default port, no path"),
        pytest.param("http://h:81?q", "h", 81, "/?q", "h:81", id="query without path"),
        pytest.param("http://h/p#frag", "h", 80, "/p", "h", id="fragment dropped"),
    ],
)
def test_split_url(url: str, host: str, port: int, target: str, host_header: str) -> None:
    parts = split_url(url)
    assert (parts.host, parts.port, parts.target, parts.host_header) == (
        host,
        port,
        target,
        host_header,
    )


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        pytest.param(answer(b"HTTP/1.1 2OO OK\r\n\r\n"), "protocol", id="bad status"),
        pytest.param(answer(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"), "protocol", id="bare LF"),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "protocol",
            id="CL and TE",
        ),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "protocol",
            id="TE not chunked",
        ),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            "protocol",
            id="bad chunk size",
        ),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True),
            "protocol",
            id="body truncated",
        ),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", close=True),
            "protocol",
            id="chunked body truncated",
        ),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\nContent-", close=True), "protocol", id="head truncated"
        ),
        pytest.param(
            answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
            "protocol",
            id="101 unasked",
        ),
        pytest.param(
            answer(b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + OK),
            "protocol",
            id="too many interim responses",
        ),
        pytest.param(answer(b"", close=True), "connect", id="closed without a response"),
    ],
)
def test_bad_response(handler: Handler, kind: str) -> None:
    async def body() -> None:
        async with RawServer(handler) as srv:
            client = HttpClient()
            try:
                with pytest.raises(HttpClientError) as info:
                    await client.request("GET", srv.url("/secret-path?token=t0k"))
                await until(srv.all_closed)  # the failed connection was not pooled
            finally:
                await client.close()
        assert info.value.kind == kind
        assert f"127.0.0.1:{srv.port}" in str(info.value)
        assert "t0k" not in str(info.value)

    run(body())


@pytest.mark.parametrize(
    ("response", "close", "max_body", "ok"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + b"x" * 11, False, 10,
                     False, id="content-length over"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * 10, False, 10,
                     True, id="content-length at the limit"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n", False, 10, False,
            id="huge content-length refused before reading",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"1;pad\r\nx\r\n" * 11 + b"0\r\n\r\n",
            False, 10, False, id="chunked over",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"1;pad\r\nx\r\n" * 10 + b"0\r\n\r\n",
            False, 10, True, id="chunked at the limit",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11, True, 10, False,
                     id="close-delimited over"),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10, True, 10, True,
                     id="close-delimited at the limit"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"y" * 300000, False, None,
            False, id="client default max_response_bytes",
        ),
    ],
)  # fmt: skip
def test_body_limit(response: bytes, close: bool, max_body: int | None, ok: bool) -> None:
    async def body() -> None:
        async with RawServer(answer(response, close=close)) as srv:
            client = HttpClient(max_response_bytes=200000)
            try:
                if ok:
                    resp = await client.request("GET", srv.url(), max_body=max_body)
                    assert resp.body == b"x" * 10
                else:
                    with pytest.raises(HttpClientError) as info:
                        await client.request("GET", srv.url(), max_body=max_body)
                    assert info.value.kind == "too_large"
                    await until(srv.all_closed)  # the connection was closed, not pooled
            finally:
                await client.close()

    run(body())


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"", id="no answer at all"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", id="half a body"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="half a head"),
    ],
)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_timeout_closes_the_connection(partial: bytes, loop_name: str) -> None:
    async def body() -> None:
        served = 0

        async def handler(srv: RawServer, index: int, reader, writer) -> None:
            nonlocal served
            served += 1
            if served == 1:
                await stall(partial)(srv, index, reader, writer)
            else:
                await answer(OK)(srv, index, reader, writer)

        async with RawServer(handler) as srv:
            client = HttpClient()
            try:
                with pytest.raises(HttpClientError) as info:
                    await client.request("GET", srv.url(), timeout=0.3)
                await until(lambda: srv.peer_closes == 1)  # the client closed it, not pooled
                resp = await client.request("GET", srv.url())
            finally:
                await client.close()
        assert info.value.kind == "timeout"
        assert f"127.0.0.1:{srv.port}" in str(info.value)
        assert resp.body == b"ok"
        assert srv.connections == 2

    run(body(), loop_name)


def test_cancelled_request_closes_the_connection() -> None:
    async def body() -> None:
        async with RawServer(stall()) as srv:
            client = HttpClient()
            try:
                task = asyncio.ensure_future(client.request("GET", srv.url(), timeout=5))
                await until(lambda: len(srv.requests) == 1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await until(lambda: srv.peer_closes == 1)
            finally:
                await client.close()

    run(body())


def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there

    async def body() -> HttpClientError:
        client = HttpClient()
        try:
            with pytest.raises(HttpClientError) as info:
                await client.request("GET", f"http://127.0.0.1:{port}/")
        finally:
            await client.close()
        return info.value

    error = run(body())
    assert error.kind == "connect"
    assert f"127.0.0.1:{port}" in str(error)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> dict[str, object]:
    ca = trustme.CA()
    other_ca = trustme.CA()

    def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        return ctx

    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return {
        "good": server_context(ca.issue_cert("127.0.0.1")),
        "wrong_name": server_context(ca.issue_cert("other.example")),
        "other_ca": server_context(other_ca.issue_cert("127.0.0.1")),
        "client": trusting,
    }


@pytest.mark.parametrize("loop_name", LOOPS)
def test_https_with_trusted_ca(tls: dict, loop_name: str) -> None:
    async def body() -> None:
        async with RawServer(answer(OK), ssl_context=tls["good"]) as srv:
            client = HttpClient(ssl_context=tls["client"])
            try:
                for _ in range(2):
                    resp = await client.request("GET", srv.url("/tls"))
                    assert (resp.status, resp.body) == (200, b"ok")
            finally:
                await client.close()
        assert srv.connections == 1
        assert srv.requests[0][1].startswith(b"GET /tls HTTP/1.1\r\nHost: 127.0.0.1:")

    run(body(), loop_name)


def quiet_refused_handshakes(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The test server's loop reports the handshakes the client refused; those are expected."""
    if not context.get("message", "").startswith("Error on transport creation"):
        loop.default_exception_handler(context)


@pytest.mark.parametrize(
    ("server", "client_ctx"),
    [
        pytest.param("wrong_name", "client", id="wrong host name"),
        pytest.param("other_ca", "client", id="untrusted CA"),
        pytest.param("good", None, id="default context: system roots only"),
    ],
)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_https_refused(tls: dict, server: str, client_ctx: str | None, loop_name: str) -> None:
    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(quiet_refused_handshakes)
        async with RawServer(answer(OK), ssl_context=tls[server]) as srv:
            client = HttpClient(ssl_context=tls[client_ctx] if client_ctx else None)
            try:
                with pytest.raises(HttpClientError) as info:
                    await client.request("GET", srv.url())
            finally:
                await client.close()
        assert info.value.kind == "tls"
        assert f"127.0.0.1:{srv.port}" in str(info.value)
        assert srv.requests == []

    run(body(), loop_name)


# -- freshness --------------------------------------------------------------------------------

DATE = ("Date", "Sun, 06 Nov 1994 08:49:37 GMT")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([("Cache-Control", "max-age=300")], 300.0, id="max-age"),
        pytest.param([("Cache-Control", "public, max-age=0")], 0.0, id="max-age 0"),
        pytest.param(
            [("Cache-Control", "max-age=300, s-maxage=60")], 60.0, id="s-maxage wins"
        ),
        pytest.param([("Cache-Control", "no-store, max-age=300")], 0.0, id="no-store"),
        pytest.param([("cache-control", "max-age=300"), ("Cache-Control", "No-Cache")], 0.0,
                     id="no-cache on a second line"),
        pytest.param([("Cache-Control", 'no-cache="Set-Cookie", max-age=5')], 0.0,
                     id="qualified no-cache"),
        pytest.param([("Cache-Control", "private, max-age=30")], 30.0, id="private ignored"),
        pytest.param([("Cache-Control", 'max-age="120"')], 120.0, id="quoted max-age"),
        pytest.param([("Cache-Control", 'ext="a, max-age=1", max-age=7')], 7.0,
                     id="comma inside a quoted argument"),
        pytest.param([("Cache-Control", "max-age=abc")], None, id="garbage ignored"),
        pytest.param([("Cache-Control", "max-age=-5")], None, id="negative ignored"),
        pytest.param([("Cache-Control", "max-age=1.5")], None, id="fraction ignored"),
        pytest.param([("Cache-Control", "max-age")], None, id="no argument ignored"),
        pytest.param([("Cache-Control", "max-age=x, max-age=9")], 9.0,
                     id="first valid occurrence"),
        pytest.param([("Cache-Control", "max-age=" + "9" * 5000)], float(2**31),
                     id="huge value capped at 2**31"),
        pytest.param([("Cache-Control", "max-age=00000000000012")], 12.0, id="leading zeros"),
        pytest.param([("Cache-Control", "public")], None, id="says nothing"),
        pytest.param([], None, id="no headers"),
        pytest.param([DATE, ("Expires", "Sun, 06 Nov 1994 09:49:37 GMT")], 3600.0,
                     id="Expires minus Date"),
        pytest.param([DATE, ("Expires", "Sun, 06 Nov 1994 07:49:37 GMT")], 0.0,
                     id="Expires in the past"),
        pytest.param([DATE, ("Expires", "0")], 0.0, id="invalid Expires means expired"),
        pytest.param([("Expires", "Sun, 06 Nov 1994 09:49:37 GMT")], None, id="Expires alone"),
        pytest.param([("Date", "garbage"), ("Expires", "Sun, 06 Nov 1994 09:49:37 GMT")], None,
                     id="invalid Date"),
        pytest.param(
            [DATE, ("Expires", "Sun, 06 Nov 1994 09:49:37 GMT"), ("Cache-Control", "max-age=5")],
            5.0, id="max-age beats Expires",
        ),
        pytest.param([DATE, ("Expires", "Sunday, 06-Nov-94 08:50:37 GMT")], 60.0,
                     id="RFC 850 Expires"),
    ],
)  # fmt: skip
def test_cache_max_age(headers: list[tuple[str, str]], expected: float | None) -> None:
    assert cache_max_age(tuple(headers)) == expected
    response = HttpResponse(status=200, reason="OK", headers=tuple(headers), body=b"")
    assert cache_max_age(response) == expected
