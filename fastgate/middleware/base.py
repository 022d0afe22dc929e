"""The middleware contract: a chain of objects built once per config, run per request.

A middleware's `on_request(ctx)` returns `None` to continue, a `LocalReply` to answer the
request itself, or an awaitable resolving to one of those when it must wait on I/O (the
connection stops reading until it resolves). See DESIGN.md §2 and STYLE.md §7.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from fastgate._core.writer import reason_phrase
from fastgate.errors import ConfigError

# Response headers only the gateway writes on its own replies (one of each per response).
_GATEWAY_OWNED = frozenset({"x-request-id", "traceresponse"})


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A response the gateway writes itself (401, 403, 429, redirects ...)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"

    @classmethod
    def error(cls, status: int, message: str, **headers: str) -> LocalReply:
        body = json.dumps({"error": message}).encode()
        return cls(status, body, tuple((k.replace("_", "-"), v) for k, v in headers.items()))

    def encode(
        self,
        request_id: bytes,
        close: bool,
        head_only: bool = False,
        traceresponse: bytes | None = None,
    ) -> bytes:
        """The whole response as bytes; a JSON error body gets the request id added.
        `head_only` (a HEAD request): the same head, Content-Length included, no body.
        Every reply carries `X-Request-ID` and, given one, `traceresponse` (the gateway's
        trace context, docs/observability.md): ours only, a middleware's copies are dropped."""
        body = self.body
        if self.content_type == "application/json" and body.startswith(b'{"error"'):
            body = body[:-1] + b',"request_id":"' + request_id + b'"}\n'
        lines = [f"HTTP/1.1 {self.status} {reason_phrase(self.status)}"]
        if self.status in (204, 304):
            body = b""  # no content, and no Content-Length (RFC 9110 §8.6)
        elif body or self.status >= 200:
            lines.append(f"Content-Type: {self.content_type}")
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{k}: {v}" for k, v in self.headers if k.lower() not in _GATEWAY_OWNED)
        if request_id:
            lines.append(f"X-Request-ID: {request_id.decode('latin-1')}")
        if traceresponse:
            lines.append(f"traceresponse: {traceresponse.decode('latin-1')}")
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + body


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling (DESIGN.md §5): set by one auth middleware, read by authorization rules,
    rate-limit keys, logs and forwarded headers. Never holds the credential itself."""

    method: str  # "jwt", "api_key", "basic", "ldap", "mtls", "forward_auth", ...
    subject: str
    consumer: str | None = None
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    claims: tuple[tuple[str, Any], ...] = ()

    def claim(self, name: str, default: Any = None) -> Any:
        """A selected claim kept from the credential (e.g. a JWT claim), or `default`."""
        for key, value in self.claims:
            if key == name:
                return value
        return default


@dataclass(slots=True)
class RequestContext:
    """What middlewares share about one request: its head, the connection, the identity."""

    conn: Any
    head: Any
    identity: Identity | None = None
    notes: dict[str, Any] | None = None  # for middlewares that pass facts down the chain


class Middleware(Protocol):
    """One concern of the request path; module name = config `type` = `type` attribute."""

    type: ClassVar[str]

    def on_request(self, ctx: RequestContext) -> LocalReply | Awaitable[Any] | None: ...


Options = TypeVar("Options", bound=BaseModel)


def parse_options(model: type[Options], options: Any) -> Options:
    """Validate a middleware's `options` with `model`; ConfigError lists each problem by its
    key path relative to the middleware (the compiler puts `middlewares.<name>.` in front)."""
    from fastgate.config.schema import pydantic_errors

    try:
        return model.model_validate(options)
    except ValidationError as exc:
        raise ConfigError.from_errors(pydantic_errors(exc, model)) from None
