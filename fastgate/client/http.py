"""`HttpClient`: a small pooled async HTTP/1.1 client for the gateway's own outgoing requests.

Used off the proxy's hot path (JWKS/OIDC key fetches, forward auth, health checks), so it is
built on asyncio streams and works on uvloop and on the stdlib loop alike.

Rules this file obeys:
- Responses are read with the gateway's own strict parser (`_core.httphead.parse_response`,
  `_core.body.ChunkedScanner`): a response the proxy would refuse from an upstream is refused
  here too (kind "protocol"), never repaired.
- Everything is bounded. One `timeout` covers connect, TLS handshake, sending and the whole
  response. The body is bounded by `max_body` (kind "too_large", checked against
  Content-Length before reading), the head by RESPONSE_MAX_HEAD_BYTES, interim 1xx responses
  by MAX_INTERIM; the idle pool by `max_idle_per_host` and `idle_timeout`.
- A connection goes back to the pool only after a complete, well-framed response that allows
  keep-alive (HTTP/1.1 without `Connection: close`, not close-delimited) and left no stray
  bytes behind. Any error, timeout or cancellation aborts the connection: a pooled connection
  is never half-read, so one response can never be read as the answer to another request.
- Nothing a caller passes can split or reframe the request. The URL must be printable ASCII
  (no whitespace, no control characters, no userinfo); header names must be tokens and values
  hold no CR, LF, NUL or other control character (HTAB allowed); Host, Content-Length,
  Transfer-Encoding and Connection belong to the client. Each refusal is a ValueError raised
  before any byte is sent.
- Error messages say what failed and for which host:port. They never contain a header value,
  the body, or the URL's path and query: any of these may carry a credential.
- TLS verifies by default: `ssl.create_default_context()` (system trust store, host name
  check on), built once on first https use, off the event loop (it reads files). An IP-literal
  URL is checked against the certificate's IP addresses.
- A pooled connection the server closed while idle, found out only after the request was
  written (no response byte received), is retried once on a new connection for GET, HEAD and
  OPTIONS. Never for other methods: the server may have acted on the request.

Error kinds (`HttpClientError.kind`): "connect" (no connection, or it was closed or reset
before any response byte), "timeout", "tls" (handshake or certificate failure, TLS error
later), "protocol" (malformed or truncated response, 101 Switching Protocols), "too_large".
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from fastgate._core.body import ChunkedScanner
from fastgate._core.httphead import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    ResponseHead,
    parse_response,
)
from fastgate.errors import HttpError

READ_SIZE = 65536
MAX_INTERIM = 16  # interim 1xx responses skipped before the final one; more is a protocol error
DELTA_SECONDS_CAP = 2**31  # RFC 9111 §1.2.2: a larger delta-seconds is taken as 2**31
CLOSE_WAIT = 1.0  # seconds close() waits for pooled connections to finish closing

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_LENGTH_METHODS = frozenset({"POST", "PUT", "PATCH"})  # always send Content-Length, even 0
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.6.2
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # field-value: no CTL but HTAB (§5.5)
_URL_CHARS = re.compile(r"[\x21-\x7e]+\Z")
_REG_NAME = re.compile(r"[A-Za-z0-9._~-]+\Z")


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class HttpClientError(Exception):
    """An outgoing request failed; `kind` is one of "connect", "timeout", "tls", "protocol",
    "too_large", so callers can map it (e.g. timeout -> 504) without parsing the message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response: header names as sent, values decoded as latin-1, the whole body."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]


class Url(NamedTuple):
    scheme: str
    host: str  # for connecting and for the certificate check: no brackets
    port: int
    target: str  # origin-form: path[?query]
    host_header: str  # [v6]:port / host:port, the port only when not the scheme's default
    where: str  # host:port for error messages (never the path or query)


def split_url(url: str) -> Url:
    """Split an http(s) URL, refusing what could smuggle bytes into the request line."""
    if not isinstance(url, str) or not _URL_CHARS.match(url):
        raise ValueError("url must be printable ASCII without spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("url scheme must be http or https")
    if "@" in parts.netloc:
        raise ValueError("credentials in the url are not supported (send a header instead)")
    host = parts.hostname
    if not host:
        raise ValueError("url has no host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("url has an invalid IPv6 address") from None
        bracketed = f"[{host}]"
    elif _REG_NAME.match(host):
        bracketed = host
    else:
        raise ValueError("url has an invalid host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("url has an invalid port") from None
    default = 443 if scheme == "https" else 80
    if port is None:
        port = default
    elif port == 0:
        raise ValueError("url has an invalid port")
    target = parts.path or "/"
    if not target.startswith("/"):
        raise ValueError("url path must start with /")
    if parts.query:
        target += "?" + parts.query
    host_header = bracketed if port == default else f"{bracketed}:{port}"
    return Url(scheme, host, port, target, host_header, f"{bracketed}:{port}")


def _build_head(method: str, url: Url, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """The request head; ValueError for any caller input that is not safe to send as is."""
    if not isinstance(method, str) or not _TOKEN.match(method):
        raise ValueError("method is not a token")
    lines = [f"{method} {url.target} HTTP/1.1", f"Host: {url.host_header}"]
    user_agent = True
    for index, item in enumerate(headers):
        name, value = item
        # An invalid name is not echoed: it might be a whole "Name: secret" line.
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ValueError(f"header #{index}: the name is not a token")
        lower = name.lower()
        if lower in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by the client, not the caller")
        if not isinstance(value, str) or _BAD_VALUE.search(value):
            raise ValueError(f"header {name!r}: the value holds CR, LF, NUL or a control char")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"header {name!r}: the value is not latin-1") from None
        if lower == "user-agent":
            user_agent = False
        lines.append(f"{name}: {value}")
    if user_agent:
        lines.insert(2, "User-Agent: fastgate")
    if body or method in _LENGTH_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


class _Stale(Exception):
    """The connection ended before any response byte (retryable when idempotent and reused)."""


class _Conn:
    """One open connection and, while pooled, when it became idle."""

    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def unusable(self) -> bool:
        """True when the peer closed the idle connection or sent bytes nobody asked for.

        Unsolicited bytes (a server's "408 Request Timeout" before it closes an idle
        connection) would otherwise be read as the answer to the next request. `_buffer` is
        StreamReader's private buffer (stable since 3.4; uvloop uses the same class).
        """
        reader = self.reader
        return (
            reader.at_eof()
            or reader.exception() is not None
            or self.writer.transport.is_closing()
            or bool(getattr(reader, "_buffer", b""))
        )

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        """Drop the connection now, without flushing (error, timeout, cancellation)."""
        self.writer.transport.abort()


class HttpClient:
    """A pooled HTTP/1.1 client: keep-alive per (scheme, host, port), strict parsing, bounded.

    Idle connections are kept per (scheme, host, port), at most `max_idle_per_host`, reused
    newest first; one idle longer than `idle_timeout` seconds is closed when the pool is next
    looked at. Concurrent requests to one host each use their own connection. `close()` closes
    the idle connections; a request still running then closes its connection when it ends
    instead of pooling it, and later requests still work, each on a connection of its own.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle_per_host: int = 8,
        idle_timeout: float = 30.0,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        if max_idle_per_host < 0:
            raise ValueError("max_idle_per_host must be >= 0")
        if not idle_timeout > 0:
            raise ValueError("idle_timeout must be > 0")
        if max_response_bytes < 0:
            raise ValueError("max_response_bytes must be >= 0")
        self._ssl = ssl_context
        self._max_idle = max_idle_per_host
        self._idle_timeout = idle_timeout
        self._max_response_bytes = max_response_bytes
        self._pool: dict[tuple[str, str, int], list[_Conn]] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float = 5.0,
        max_body: int | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole response; HttpClientError on any failure.

        ValueError (before anything is sent) for an unusable URL, method, header or argument.
        """
        target = split_url(url)
        body = bytes(body)
        head = _build_head(method, target, headers, body)
        limit = self._max_response_bytes if max_body is None else max_body
        if limit < 0:
            raise ValueError("max_body must be >= 0")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        try:
            return await asyncio.wait_for(self._send(method, target, head, body, limit), timeout)
        except asyncio.TimeoutError:
            raise HttpClientError(
                "timeout", f"{method} {target.where}: no complete response within {timeout:g} s"
            ) from None

    async def close(self) -> None:
        """Close every idle pooled connection (waiting at most CLOSE_WAIT seconds)."""
        self._closed = True
        conns = [conn for idle in self._pool.values() for conn in idle]
        self._pool.clear()
        for conn in conns:
            conn.close()
        if conns:
            closing = [asyncio.ensure_future(conn.writer.wait_closed()) for conn in conns]
            for task in closing:  # their errors are of no interest, even if we are cancelled
                task.add_done_callback(_ignore_result)
            await asyncio.wait(closing, timeout=CLOSE_WAIT)

    # -- pool ---------------------------------------------------------------------------------

    def _take_idle(self, key: tuple[str, str, int]) -> _Conn | None:
        """The newest usable idle connection for `key`; expired and dead ones are closed."""
        idle = self._pool.get(key)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle and now - idle[0].idle_since > self._idle_timeout:  # oldest first
            idle.pop(0).close()
        found = None
        while idle:
            conn = idle.pop()
            if not conn.unusable():
                found = conn
                break
            conn.close()
        if not idle:
            del self._pool[key]
        return found

    def _put_idle(self, key: tuple[str, str, int], conn: _Conn) -> None:
        if self._closed or self._max_idle == 0:
            conn.close()
            return
        idle = self._pool.setdefault(key, [])
        if len(idle) >= self._max_idle:
            idle.pop(0).close()  # keep the newest: it is the least likely to be closed soon
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    # -- one request --------------------------------------------------------------------------

    async def _send(
        self, method: str, url: Url, head: bytes, body: bytes, limit: int
    ) -> HttpResponse:
        key = (url.scheme, url.host, url.port)
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return await self._exchange(key, conn, method, url, head, body, limit)
            except _Stale:
                if method not in IDEMPOTENT_METHODS:
                    raise HttpClientError(
                        "connect",
                        f"{method} {url.where}: the kept-alive connection closed before any "
                        "response (not retried: the method is not idempotent)",
                    ) from None
        conn = await self._connect(url)
        try:
            return await self._exchange(key, conn, method, url, head, body, limit)
        except _Stale:
            raise HttpClientError(
                "connect", f"{method} {url.where}: the connection closed before any response"
            ) from None

    async def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # Loading the system trust store reads files: keep it off the event loop.
            loop = asyncio.get_running_loop()
            ctx = await loop.run_in_executor(None, ssl.create_default_context)
            if self._ssl is None:
                self._ssl = ctx
        return self._ssl

    async def _connect(self, url: Url) -> _Conn:
        ctx = await self._tls_context() if url.scheme == "https" else None
        try:
            reader, writer = await asyncio.open_connection(
                url.host,
                url.port,
                ssl=ctx,
                server_hostname=url.host if ctx is not None else None,
                limit=READ_SIZE,
            )
        except ssl.SSLError as exc:
            detail = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
            raise HttpClientError("tls", f"{url.where}: TLS handshake failed: {detail}") from exc
        except OSError as exc:
            detail = exc.strerror or type(exc).__name__
            raise HttpClientError("connect", f"{url.where}: cannot connect: {detail}") from exc
        return _Conn(reader, writer)

    async def _exchange(
        self,
        key: tuple[str, str, int],
        conn: _Conn,
        method: str,
        url: Url,
        head: bytes,
        body: bytes,
        limit: int,
    ) -> HttpResponse:
        """Run one request on `conn`; pool it after a clean keep-alive response, else drop it."""
        try:
            response, reusable = await _Exchange(conn, method, url.where, limit).run(head, body)
        except BaseException:
            conn.abort()  # error, timeout or cancellation: never pool a half-read connection
            raise
        if reusable:
            self._put_idle(key, conn)
        else:
            conn.close()
        return response


class _Exchange:
    """Writes one request and reads its response off one connection."""

    __slots__ = ("buf", "conn", "limit", "method", "received", "where")

    def __init__(self, conn: _Conn, method: str, where: str, limit: int) -> None:
        self.conn = conn
        self.method = method
        self.where = where
        self.limit = limit
        self.buf = bytearray()
        self.received = False  # any response byte yet (before that, a closed conn is _Stale)

    def _fail(self, kind: str, what: str) -> HttpClientError:
        return HttpClientError(kind, f"{self.method} {self.where}: {what}")

    async def run(self, head: bytes, body: bytes) -> tuple[HttpResponse, bool]:
        writer = self.conn.writer
        try:
            if len(body) < READ_SIZE:
                writer.write(head + body)  # one segment for the usual small request
            else:
                writer.write(head)
                writer.write(body)
            await writer.drain()
        except ssl.SSLError as exc:
            raise self._fail("tls", f"TLS error while sending: {exc.reason}") from exc
        except OSError:
            raise _Stale from None
        resp_head = await self._read_head()
        framing = resp_head.framing
        if framing == FRAMING_NONE:
            payload, extra = b"", bool(self.buf)
        elif framing == FRAMING_LENGTH:
            payload, extra = await self._read_length(resp_head.content_length)
        elif framing == FRAMING_CHUNKED:
            payload, extra = await self._read_chunked()
        else:
            payload, extra = await self._read_to_eof(), False
        response = HttpResponse(
            status=resp_head.status,
            reason=resp_head.reason.decode("latin-1"),
            headers=tuple(
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in resp_head.headers()
            ),
            body=payload,
        )
        reusable = resp_head.keep_alive and framing != FRAMING_CLOSE and not extra
        return response, reusable

    async def _read(self) -> bytes:
        """The next bytes (b"" at EOF); a reset before any response byte raises _Stale."""
        try:
            data = await self.conn.reader.read(READ_SIZE)
        except ssl.SSLError as exc:
            raise self._fail("tls", f"TLS error while reading: {exc.reason}") from exc
        except OSError as exc:
            if not self.received:
                raise _Stale from None
            raise self._fail("protocol", "connection lost inside the response") from exc
        if data:
            self.received = True
        elif not self.received:
            raise _Stale
        return data

    async def _read_head(self) -> ResponseHead:
        interim = 0
        while True:
            head = None
            if self.buf:
                try:
                    head, size = parse_response(bytes(self.buf), self.method == "HEAD")
                except HttpError as exc:
                    raise self._fail("protocol", f"invalid response head: {exc.reason}") from None
            if head is None:
                data = await self._read()
                if not data:
                    raise self._fail("protocol", "connection closed inside the response head")
                self.buf += data
                continue
            del self.buf[:size]
            if head.status >= 200:
                return head
            if head.status == 101:
                raise self._fail("protocol", "unexpected 101 Switching Protocols")
            interim += 1  # 100 Continue, 103 Early Hints, ...: the final response follows
            if interim > MAX_INTERIM:
                raise self._fail("protocol", "too many interim (1xx) responses")

    def _too_large(self) -> HttpClientError:
        return self._fail("too_large", f"response body over {self.limit} bytes")

    async def _read_length(self, length: int) -> tuple[bytes, bool]:
        if length > self.limit:
            raise self._too_large()
        buf = self.buf
        while len(buf) < length:
            data = await self._read()
            if not data:
                raise self._fail("protocol", "connection closed inside the response body")
            buf += data
        return bytes(buf[:length]), len(buf) > length

    async def _read_chunked(self) -> tuple[bytes, bool]:
        scanner = ChunkedScanner(collect=True)
        data = bytes(self.buf)
        unchecked = 0  # bytes fed since the decoded size was last measured
        while True:
            try:
                used = scanner.feed(data)
            except HttpError as exc:
                raise self._fail("protocol", f"invalid chunked body: {exc.reason}") from None
            unchecked += used
            # The decoded size is never more than the bytes fed, and measuring it joins the
            # pieces: measure once per `limit` bytes fed, so the cost stays linear and the
            # memory held stays below twice the limit plus one read.
            if unchecked > self.limit or scanner.done:
                unchecked = 0
                payload = scanner.payload
                if len(payload) > self.limit:
                    raise self._too_large()
                if scanner.done:
                    return payload, used < len(data)
            data = await self._read()
            if not data:
                raise self._fail("protocol", "connection closed inside the chunked body")

    async def _read_to_eof(self) -> bytes:
        """A close-delimited body (RFC 9112 §6.3 item 8): everything until the server closes."""
        buf = self.buf
        while True:
            if len(buf) > self.limit:
                raise self._too_large()
            data = await self._read()
            if not data:
                return bytes(buf)
            buf += data


# -- freshness (RFC 9111) ---------------------------------------------------------------------


def _directives(value: str) -> list[tuple[str, str | None]]:
    """Cache-Control directives as (lowercase name, argument or None); quoted args unquoted."""
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(value)
    while i < n:
        j = i
        while j < n and value[j] not in ",=":
            j += 1
        name = value[i:j].strip().lower()
        arg: str | None = None
        if j < n and value[j] == "=":
            j += 1
            while j < n and value[j] in " \t":
                j += 1
            if j < n and value[j] == '"':  # quoted-string: a comma inside does not split
                chars = []
                j += 1
                while j < n and value[j] != '"':
                    if value[j] == "\\" and j + 1 < n:
                        j += 1
                    chars.append(value[j])
                    j += 1
                arg = "".join(chars)
                while j < n and value[j] != ",":
                    j += 1
            else:
                k = j
                while k < n and value[k] != ",":
                    k += 1
                arg = value[j:k].strip()
                j = k
        if name:
            out.append((name, arg))
        i = j + 1
    return out


def _delta_seconds(arg: str | None) -> float | None:
    """delta-seconds = 1*DIGIT (RFC 9111 §1.2.2), capped at 2**31; None when invalid."""
    if not arg or not arg.isascii() or not arg.isdigit():
        return None
    digits = arg.lstrip("0") or "0"
    return float(DELTA_SECONDS_CAP if len(digits) > 10 else min(int(digits), DELTA_SECONDS_CAP))


def _http_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def cache_max_age(headers: tuple[tuple[str, str], ...] | HttpResponse) -> float | None:
    """How many seconds a response may be reused, from its headers; None when they say nothing.

    Cache-Control (RFC 9111 §5.2.2, all its lines together): `no-store` or `no-cache` -> 0;
    else the first valid `s-maxage`, else the first valid `max-age` (a non-negative integer;
    anything else is ignored). Otherwise Expires - Date, when both are present (0 when
    Expires is in the past or is not a valid date, RFC 9111 §5.3); else None. `private` and
    other directives are ignored: the gateway caches for itself.
    """
    pairs = headers.headers if isinstance(headers, HttpResponse) else headers
    found: list[tuple[str, str | None]] = []
    expires = date = None
    for name, value in pairs:
        lower = name.lower()
        if lower == "cache-control":
            found.extend(_directives(value))
        elif lower == "expires" and expires is None:
            expires = value
        elif lower == "date" and date is None:
            date = value
    names = {name for name, _ in found}
    if "no-store" in names or "no-cache" in names:
        return 0.0
    for wanted in ("s-maxage", "max-age"):
        for name, arg in found:
            if name == wanted:
                seconds = _delta_seconds(arg)
                if seconds is not None:
                    return seconds
    if expires is None or date is None:
        return None
    sent = _http_date(date)
    if sent is None:
        return None
    until = _http_date(expires)
    if until is None:
        return 0.0
    return max(0.0, (until - sent).total_seconds())
