"""`type: forward_auth`: ask an external HTTP service whether to admit each request (as
Traefik's ForwardAuth or nginx's auth_request do), and set `ctx.identity` from its answer.

    middlewares:
      sso:
        type: forward_auth
        address: https://auth.internal/verify    # http:// only with allow_plaintext: true
        ca_file: /etc/fastgate/auth-ca.pem       # default: the system roots
        timeout: 2                               # seconds for the whole exchange
        request_headers: [Authorization, Cookie] # client headers the auth service sees
        response_headers: [X-Auth-User, X-Auth-Groups]  # copied upstream on 2xx
        identity: {subject_header: X-Auth-User, groups_header: X-Auth-Groups}
        cache_ttl: 30                            # seconds a decision is kept (0 = off)
        cache_key: [Authorization, Cookie]       # must cover request_headers; :path etc.

The auth request uses the client's method and no body, goes to `address` as configured, and
carries the listed client headers plus X-Forwarded-Method, -Proto, -Host, -Uri, -For and
X-Request-ID. A 2xx answer admits; any other answer is the reply to the client.

Security rules this file obeys:
- Fail closed. A timeout, refused or reset connection, TLS failure, malformed or oversized
  answer is 503 {"error": "auth service unavailable"}, audited; never an admission. The first
  failure logs a warning with the cause (host:port and kind only), the recovery an info line.
- The auth service sees only the configured client headers and X-Forwarded-* / X-Request-ID
  that the gateway makes itself: a client's own X-Forwarded-Uri or -Method could claim a path
  it is not asking for, so those names cannot be listed in `request_headers`.
- `response_headers` are copied upstream only from a 2xx answer, and the client's own copies
  are always stripped (`strip_request_headers`), so a client cannot forge them; a value with
  a control character is dropped, never passed on.
- A non-2xx answer is relayed: its status, end-to-end headers and body (at most
  MAX_REPLY_BODY bytes; a larger answer fails closed). Hop-by-hop headers, those named in
  its Connection header, and Content-Length / Transfer-Encoding are dropped: the gateway
  frames the reply itself.
- `https://` is verified (ca_file or the system roots, host name checked, TLS 1.2 or later).
  `http://` needs `allow_plaintext: true`, since credentials would cross the network in clear.
- Cached decisions (cache_ttl > 0) are keyed by SHA-256 over the `cache_key` values; the
  key must name every header in `request_headers`, so two requests the auth service could tell
  apart by a header never share a decision. Only 2xx admits and 401/403 denies are cached
  (never 5xx, never a deny carrying Set-Cookie), for min(cache_ttl, the answer's max-age);
  no-store / no-cache means not cached. A request with none of the cache_key headers is never
  answered from the cache. The decision must not depend on method, host, path or client
  address unless `cache_key` names `:method`, `:host`, `:path` or `:client_ip`.
- Logs and audit records hold the status and the failure kind, never a header value or body.
- `forward_body: true` sends the request body too (with its Content-Type). The route then
  reads bodies whole, up to `max_body` bytes, before the chain runs (`request_body_limit`:
  the C relay buffers them and answers 413 above it) and sends them on to the service as they
  came. A decision that reads the body cannot be cached (`cache_ttl` must stay 0).

A cache hit returns without creating a coroutine; a miss returns one (the connection stops
reading until it resolves). One pooled keep-alive HttpClient per instance. A kept-alive
connection the auth service closed just as the request went out ("connect" kind) is retried
once within the same timeout, whatever the method: the auth request has no body and asks a
question, it does not act.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
from collections import OrderedDict
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fastgate.auth.common import AuthCommon, AuthOptions, parse_options
from fastgate.client.http import (
    HttpClient,
    HttpClientError,
    HttpResponse,
    cache_max_age,
    split_url,  # the client's own URL check: both must agree
)
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import register
from fastgate.tls.client import verifying_context

log = logging.getLogger("fastgate.forward_auth")

MAX_REPLY_BODY = 65536  # the most body bytes taken from the auth service's answer
CACHE_SIZE = 10000  # cached decisions, least recently used out first
MAX_CACHED_BYTES = 8192  # a decision whose lines or body are larger is not cached
MAX_IDLE = 32  # idle keep-alive connections kept to the auth service
# Below the 5 s idle timeout of common servers (Node.js), so a pooled connection is rarely
# one the server is closing just as a request goes out.
IDLE_TIMEOUT = 4.0
RETRY_MIN = 0.05  # seconds that must be left of the timeout to retry a stale connection

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 field-name
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs except HTAB
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_GATEWAY_SENT = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-method",
        "x-forwarded-uri",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "forwarded",
        "x-request-id",
    }
)
# Never taken from the client for the auth request: framing, hop-by-hop, and what we set.
_NOT_REQUEST_HEADERS = _HOP_BY_HOP | _GATEWAY_SENT | {"host", "content-length", "expect"}
# Never copied upstream from the answer: the gateway writes these or they frame the message.
_NOT_RESPONSE_HEADERS = _HOP_BY_HOP | _GATEWAY_SENT | {"host", "content-length", "expect"}
PSEUDO_KEYS = (":method", ":host", ":path", ":client_ip")
_CACHED_DENY = frozenset({401, 403})
MAX_FORWARD_BODY = 16 << 20  # the most `max_body` may be: bodies are held in memory
DEFAULT_FORWARD_BODY = 64 << 10


class IdentityOptions(BaseModel):
    """Which answer headers become the Identity (each one optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    subject_header: str | None = None
    groups_header: str | None = None  # comma-separated, every line of it
    consumer_header: str | None = None


class ForwardAuthOptions(AuthOptions):
    """`forward_auth` options (plus the common forward_headers / hide_credentials / optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    address: str
    allow_plaintext: bool = False
    ca_file: str | None = None
    timeout: float = Field(2, gt=0, le=60)
    request_headers: list[str] = Field(default_factory=lambda: ["Authorization", "Cookie"])
    forward_body: bool = False
    max_body: int | None = Field(None, ge=1, le=MAX_FORWARD_BODY)
    response_headers: list[str] = Field(default_factory=list)
    identity: IdentityOptions = IdentityOptions()
    cache_ttl: float = Field(0, ge=0, le=86400)
    cache_key: list[str] | None = None


class _Settings:
    """The checks pydantic's field types do not express; ConfigError paths are relative to
    the middleware. Header names are kept as configured (for output) and lowercased (bytes,
    for lookups in the request head)."""

    def __init__(self, opts: ForwardAuthOptions, forward_headers: Any) -> None:
        self.address = opts.address
        self.https = _address(opts.address, opts.allow_plaintext)
        if opts.ca_file is not None and not self.https:
            raise ConfigError("ca_file", "only used with an https:// address")
        self.ssl_context = _tls_context(opts.ca_file) if self.https else None
        if opts.max_body is not None and not opts.forward_body:
            raise ConfigError("max_body", "only used with forward_body: true")
        if opts.forward_body and opts.cache_ttl:
            raise ConfigError(
                "cache_ttl", "must be 0 with forward_body: a decision may read the body"
            )
        self.forward_body = opts.forward_body
        self.max_body = (opts.max_body or DEFAULT_FORWARD_BODY) if opts.forward_body else 0
        self.request_headers = _names(
            opts.request_headers, "request_headers", _NOT_REQUEST_HEADERS, "the gateway sets it"
        )
        if opts.optional and not self.request_headers:
            raise ConfigError(
                "optional", "needs request_headers: a request without any of them passes on"
            )
        self.response_headers = _names(
            opts.response_headers, "response_headers", _NOT_RESPONSE_HEADERS, "the gateway owns it"
        )
        owned = (
            {str(k).lower() for k in forward_headers}
            if isinstance(forward_headers, dict)
            else set()
        )
        for i, name in enumerate(self.response_headers):
            if name.lower() in owned:
                raise ConfigError(f"response_headers[{i}]", "also set by forward_headers")
        ident = opts.identity
        for option in ("subject_header", "groups_header", "consumer_header"):
            value = getattr(ident, option)
            if value is not None and not _TOKEN.fullmatch(value):
                raise ConfigError(f"identity.{option}", "not a valid header name")
        self.subject_header = ident.subject_header
        self.groups_header = ident.groups_header
        self.consumer_header = ident.consumer_header
        self.timeout = float(opts.timeout)
        self.cache_ttl = float(opts.cache_ttl)
        self.cache_key = self._cache_key(opts)

    def _cache_key(self, opts: ForwardAuthOptions) -> tuple[str, ...]:
        if opts.cache_ttl == 0:
            return ()
        if not opts.cache_key:
            raise ConfigError(
                "cache_key", "required with cache_ttl > 0: the request headers a decision is for"
            )
        out: list[str] = []
        for i, name in enumerate(opts.cache_key):
            if name.startswith(":"):
                if name not in PSEUDO_KEYS:
                    raise ConfigError(
                        f"cache_key[{i}]", f"expected one of {', '.join(PSEUDO_KEYS)}"
                    )
                out.append(name)
            elif not _TOKEN.fullmatch(name):
                raise ConfigError(f"cache_key[{i}]", "not a valid header name")
            else:
                out.append(name.lower())
        for i, name in enumerate(self.request_headers):
            if name.lower() not in out:
                raise ConfigError(
                    "cache_key",
                    f"must name {name} (request_headers[{i}]): the auth service sees it, so a "
                    "cached decision must depend on it; or drop it from request_headers",
                )
        return tuple(dict.fromkeys(out))


def _address(url: str, allow_plaintext: bool) -> bool:
    """Check the auth service URL the way HttpClient will; True for https."""
    try:
        parts = split_url(url)
    except ValueError as exc:
        raise ConfigError("address", str(exc)) from None
    if "#" in url:
        raise ConfigError("address", "a fragment is never sent; remove it")
    if parts.scheme == "http" and not allow_plaintext:
        raise ConfigError(
            "address",
            "http:// sends credentials in clear text: use https://, or allow_plaintext: true "
            "(an auth service on the same host only)",
        )
    return parts.scheme == "https"


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate chain and host name checked, TLS 1.2 or later."""
    return verifying_context(ca_file, "ca_file")


def _names(values: list[str], option: str, refused: frozenset[str], why: str) -> tuple[str, ...]:
    out: dict[str, str] = {}
    for i, name in enumerate(values):
        if not _TOKEN.fullmatch(name):
            raise ConfigError(f"{option}[{i}]", "not a valid header name")
        if name.lower() in refused:
            raise ConfigError(f"{option}[{i}]", f"{name} cannot be listed: {why}")
        out.setdefault(name.lower(), name)
    return tuple(out.values())


# ---- what goes to the auth service, and what comes back -------------------------------------


def request_target(head: Any) -> bytes:
    """The client's path and query (origin-form, also for an absolute-form request)."""
    query = head.query
    return head.path if query is None else head.path + b"?" + query


def forwarded_proto(conn: Any) -> str:
    """http or https: the scheme of the client's entrypoint."""
    proto = getattr(conn, "proto", None)
    return proto if proto in ("http", "https") else "http"


def outgoing_headers(ctx: RequestContext, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """The auth request's headers: every line of the listed client headers, then the
    X-Forwarded-* set and X-Request-ID made by the gateway."""
    head = ctx.head
    conn = ctx.conn
    out: list[tuple[str, str]] = []
    for name in names:
        for value in head.get_all(name.lower().encode("latin-1")):
            out.append((name, value.decode("latin-1")))
    out.append(("X-Forwarded-Method", head.method.decode("latin-1")))
    out.append(("X-Forwarded-Proto", forwarded_proto(conn)))
    if head.host:
        out.append(("X-Forwarded-Host", head.host.decode("latin-1")))
    out.append(("X-Forwarded-Uri", request_target(head).decode("latin-1")))
    client_ip = getattr(conn, "client_ip", "")
    if client_ip:
        out.append(("X-Forwarded-For", client_ip))
    rid = getattr(conn, "request_id", None)
    if isinstance(rid, bytes) and rid:
        out.append(("X-Request-ID", rid.decode("latin-1")))
    return out


def _safe(value: str) -> str | None:
    """The value without surrounding blanks, or None when empty or it holds a control char."""
    if _UNSAFE.search(value):
        return None
    value = value.strip(" \t")
    return value or None


def _text(value: str) -> str:
    """Header text (decoded as latin-1 by the client) as UTF-8 when it is valid UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def copied_lines(resp: HttpResponse, names: tuple[str, ...]) -> bytes:
    """`Name: value\\r\\n` for every line of each listed header in a 2xx answer; a value with
    a control character (or an empty one) is dropped. Bytes pass unchanged (latin-1)."""
    lines = []
    for name in names:
        for value in resp.get_all(name):
            safe = _safe(value)
            if safe is not None:
                lines.append(f"{name}: {safe}\r\n")
    return "".join(lines).encode("latin-1")


def relayed_reply(resp: HttpResponse) -> LocalReply:
    """The auth service's non-2xx answer as the client's reply (see the module rules)."""
    named = {
        token.strip().lower()
        for value in resp.get_all("connection")
        for token in value.split(",")
        if token.strip()
    }
    headers = []
    content_type = None
    for name, value in resp.headers:
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower in named or lower == "content-length":
            continue
        if _UNSAFE.search(value):
            continue
        if lower == "content-type":
            if content_type is None:
                content_type = value.strip()
            continue
        headers.append((name, value))
    body = resp.body[:MAX_REPLY_BODY]
    if content_type is None:
        content_type = "application/octet-stream" if body else "text/plain"
    elif content_type == "application/json" and body.startswith(b'{"error"'):
        # LocalReply.encode adds the request id inside such a body, replacing its last byte:
        # without trailing blanks that byte is the closing brace, and the JSON stays valid.
        body = body.rstrip()
    return LocalReply(resp.status, body, tuple(headers), content_type)


# ---- the middleware ---------------------------------------------------------------------------


@register
class ForwardAuth:
    """One `forward_auth` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "forward_auth"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(ForwardAuthOptions, options)
        self.settings = s = _Settings(opts, opts.forward_headers)
        self.name = name
        self.common = AuthCommon(options, name, self.type, credential_headers=s.request_headers)
        owned = [*self.common.strip_request_headers]
        owned += [h.lower().encode("latin-1") for h in s.response_headers]
        self.strip_request_headers: tuple[bytes, ...] = tuple(dict.fromkeys(owned))
        # forward_body: the relay reads bodies whole (up to this size) before the chain runs.
        self.request_body_limit = s.max_body
        self.client = HttpClient(
            ssl_context=s.ssl_context,
            max_idle_per_host=MAX_IDLE,
            idle_timeout=IDLE_TIMEOUT,
            max_response_bytes=MAX_REPLY_BODY,
        )
        self._credentials = tuple(h.lower().encode("latin-1") for h in s.request_headers)
        self._key_headers = tuple(k.encode("latin-1") for k in s.cache_key if not k.startswith(":"))
        self._cache: OrderedDict[bytes, tuple[float, Identity | None, Any]] = OrderedDict()
        self._unavailable = LocalReply.error(503, "auth service unavailable")
        self.clock = time.monotonic
        self.calls = 0  # requests sent to the auth service
        self.hits = 0  # decisions answered from the cache
        self.unavailable = 0  # checks that failed closed
        self._down = False  # the last call could not get an answer

    # ---- per request --------------------------------------------------------------------------

    def on_request(self, ctx: RequestContext) -> LocalReply | Any | None:
        common = self.common
        if common.skip(ctx):
            return None
        head = ctx.head
        if common.optional and not any(head.get(h) is not None for h in self._credentials):
            return None
        key = self.cache_key(ctx) if self.settings.cache_ttl else None
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                if hit[0] > self.clock():
                    self._cache.move_to_end(key)
                    self.hits += 1
                    return self._apply(ctx, hit[1], hit[2])
                del self._cache[key]
        return self._ask(ctx, key)

    def cache_key(self, ctx: RequestContext) -> bytes | None:
        """SHA-256 over the cache_key values (each length-prefixed, absent marked apart from
        empty); None when the request has none of the cache_key headers."""
        head = ctx.head
        if self._key_headers and not any(head.get(h) is not None for h in self._key_headers):
            return None
        digest = hashlib.sha256()
        for name in self.settings.cache_key:
            if name == ":method":
                value: bytes | None = head.method
            elif name == ":host":
                value = head.host
            elif name == ":path":
                value = request_target(head)
            elif name == ":client_ip":
                value = str(getattr(ctx.conn, "client_ip", "")).encode("latin-1")
            else:
                values = head.get_all(name.encode("latin-1"))
                value = b"\n".join(values) if values else None  # LF never occurs in a value
            digest.update(b"-;" if value is None else b"%d:%b;" % (len(value), value))
        return digest.digest()

    def _apply(self, ctx: RequestContext, identity: Identity | None, payload: Any) -> Any:
        if identity is None:
            return self.common.refuse(ctx, _deny_reason(payload.status), payload)
        self.common.admit(ctx, identity, payload)
        return None

    async def _ask(self, ctx: RequestContext, key: bytes | None) -> LocalReply | None:
        method = ctx.head.method.decode("latin-1")
        headers = outgoing_headers(ctx, self.settings.request_headers)
        body = b""
        if self.settings.forward_body:
            body = getattr(ctx.conn, "request_body", None) or b""
            content_type = ctx.head.get(b"content-type")
            if content_type is not None and not any(
                k.lower() == "content-type" for k, _ in headers
            ):
                headers.append(("Content-Type", content_type.decode("latin-1")))
        self.calls += 1
        try:
            resp = await self._exchange(method, headers, body)
        except HttpClientError as exc:
            return self._fail(ctx, exc.kind, str(exc))
        except ValueError as exc:  # a header value the client refuses to send
            return self._fail(ctx, "request", str(exc))
        if self._down:
            self._down = False
            log.info("forward_auth %s: auth service answering again", self.name)
        if 200 <= resp.status < 300:
            identity = self._identity(resp)
            lines = self.common.forward_lines(identity) + copied_lines(
                resp, self.settings.response_headers
            )
            if key is not None and len(lines) <= MAX_CACHED_BYTES:
                self._remember(key, resp, identity, lines)
            self.common.admit(ctx, identity, lines)
            return None
        reply = relayed_reply(resp)
        if (
            key is not None
            and resp.status in _CACHED_DENY
            and len(reply.body) <= MAX_CACHED_BYTES
            and resp.header("set-cookie") is None
        ):
            self._remember(key, resp, None, reply)
        return self.common.refuse(ctx, _deny_reason(resp.status), reply)

    async def _exchange(
        self, method: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> HttpResponse:
        """One auth request, retried once on a "connect" failure while time is left."""
        timeout = self.settings.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        address = self.settings.address
        request = self.client.request
        try:
            return await request(method, address, headers=headers, body=body, timeout=timeout)
        except HttpClientError as exc:
            left = deadline - loop.time()
            if exc.kind != "connect" or left < RETRY_MIN:
                raise
        return await request(method, address, headers=headers, body=body, timeout=left)

    def _identity(self, resp: HttpResponse) -> Identity:
        s = self.settings
        subject = consumer = None
        if s.subject_header is not None:
            subject = _first(resp, s.subject_header)
        if s.consumer_header is not None:
            consumer = _first(resp, s.consumer_header)
        groups: frozenset[str] = frozenset()
        if s.groups_header is not None:
            groups = frozenset(
                _text(g.strip(" \t"))
                for value in resp.get_all(s.groups_header)
                if not _UNSAFE.search(value)
                for g in value.split(",")
                if g.strip(" \t")
            )
        return Identity(
            method="forward_auth", subject=subject or "", consumer=consumer, groups=groups
        )

    def _remember(
        self, key: bytes, resp: HttpResponse, identity: Identity | None, payload: Any
    ) -> None:
        ttl = self.settings.cache_ttl
        max_age = cache_max_age(resp)
        if max_age is not None:
            ttl = min(ttl, max_age)
        if ttl <= 0:
            return
        cache = self._cache
        cache[key] = (self.clock() + ttl, identity, payload)
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)

    def _fail(self, ctx: RequestContext, kind: str, cause: str) -> LocalReply:
        self.unavailable += 1
        if not self._down:
            self._down = True
            log.warning("forward_auth %s: auth service unavailable: %s", self.name, cause)
        else:
            log.debug("forward_auth %s: auth service unavailable: %s", self.name, cause)
        return self.common.refuse(ctx, f"auth service unavailable ({kind})", self._unavailable)

    # ---- operations ---------------------------------------------------------------------------

    def close(self) -> None:
        """This config generation retired: close the pooled connections to the auth service
        (requests still in flight keep theirs until they finish)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (fastgate check): nothing was ever connected
        task = loop.create_task(self.client.close())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    def stats(self) -> dict[str, Any]:
        return {
            "cached": len(self._cache),
            "calls": self.calls,
            "hits": self.hits,
            "unavailable": self.unavailable,
            "failures": dict(self.common.failures),
        }


_CLOSING: set[asyncio.Task[None]] = set()  # strong references until the close finishes


def _first(resp: HttpResponse, name: str) -> str | None:
    value = resp.header(name)
    if value is None:
        return None
    safe = _safe(value)
    return None if safe is None else _text(safe)


def _deny_reason(status: int) -> str:
    return f"denied by auth service ({status})"


__all__ = [
    "ForwardAuth",
    "ForwardAuthOptions",
    "copied_lines",
    "outgoing_headers",
    "relayed_reply",
]
