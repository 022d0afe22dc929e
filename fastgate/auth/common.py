"""What every auth middleware does the same way (DESIGN.md §5).

Options shared by all auth middlewares (`jwt_auth`, `api_key`, `basic_auth`, `ldap_auth`,
`forward_auth`, ...):

    forward_headers:            # identity -> upstream request headers
      X-User-Id: subject        # subject | consumer | method | scopes | roles | groups
      X-User-Email: claim:email # a claim the middleware kept (forward_claims for jwt_auth)
    hide_credentials: false     # true: the credential header is not passed upstream
    optional: false             # true: a request with no credential of this kind (or one
                                # already identified by an earlier middleware) passes on
                                # unidentified; a wrong credential is still refused.
                                # [jwt(optional), api_key(optional), authorize] = either one.

Rules this file obeys:
- A header named in `forward_headers` is always stripped from what the client sent
  (`strip_request_headers`, applied in C by the writer), so a client cannot forge its identity;
  it is then set from the identity, or left absent when the identity has no such value.
- Values are made header-safe: control characters (CR, LF, NUL ...) are refused by dropping the
  header, and non-Latin-1 text is percent-encoded as UTF-8, so a claim can never split a head.
- Refusals are counted by reason (`failures`, and by (route, reason) in `route_failures` for the
  metrics) and noted on the connection (`conn.note_deny(event, middleware name, reason)`): the
  C side writes the audit line at the end of the exchange (route, client address, method,
  path, request id, identity, who refused and why). The reason is a fixed phrase chosen by the
  middleware, never a credential or a value taken from the request.
- The audit event follows the reply's status: 5xx (what auth must ask is down, fail closed)
  is DENY_AUTH_UNAVAILABLE, 403 (a relayed "not you") is DENY_FORBIDDEN, anything else (401, a
  relayed redirect to a login page, ...) is DENY_AUTH_FAILED.
- A connection without `note_deny` (a unit test's stand-in) is tolerated: the refusal is still
  counted and returned.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from fastgate._core.accesslog import DENY_AUTH_FAILED, DENY_AUTH_UNAVAILABLE, DENY_FORBIDDEN
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext, parse_options

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 field-name
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs except HTAB
_SOURCES = ("subject", "consumer", "method", "scopes", "roles", "groups")
# Names the gateway writes itself or that frame the message: never an identity header.
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-request-id",
    }
)
COMMON_OPTIONS = frozenset({"forward_headers", "hide_credentials", "optional"})


class AuthOptions(BaseModel):
    """Base of an auth middleware's pydantic options model: unknown keys are errors, and the
    common options above are accepted here and validated by `AuthCommon`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    forward_headers: Any = None
    hide_credentials: Any = False
    optional: Any = False


Options = TypeVar("Options", bound=AuthOptions)


class AuthCommon:
    """The shared part of one auth middleware instance: forwarding and audit."""

    def __init__(
        self,
        options: dict[str, Any],
        name: str,
        type_name: str,
        credential_headers: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.type_name = type_name
        self.failures: Counter[str] = Counter()
        self.route_failures: Counter[tuple[str, str]] = Counter()  # (route, reason): metrics
        self.headers = _forward_headers(options.get("forward_headers"), name)
        hide = options.get("hide_credentials", False)
        if not isinstance(hide, bool):
            raise ConfigError(f"middlewares.{name}.hide_credentials", "expected true or false")
        self.optional = options.get("optional", False)
        if not isinstance(self.optional, bool):
            raise ConfigError(f"middlewares.{name}.optional", "expected true or false")
        owned = [h.lower().encode("latin-1") for h, _ in self.headers]
        if hide:
            owned += [h.lower().encode("latin-1") for h in credential_headers]
        self.strip_request_headers: tuple[bytes, ...] = tuple(dict.fromkeys(owned))

    def skip(self, ctx: RequestContext) -> bool:
        """An optional middleware leaves a request that is already identified alone."""
        return self.optional and ctx.identity is not None

    def missing(self, ctx: RequestContext, reply: LocalReply) -> LocalReply | None:
        """No credential of this kind: pass on when optional, else refuse with `reply`."""
        if self.optional:
            return None
        return self.refuse(ctx, "missing credentials", reply)

    def forward_lines(self, identity: Identity) -> bytes:
        """The upstream header lines for `identity` (b"" without forward_headers). A
        middleware that caches identities caches these too and passes them to `admit`."""
        return encode_identity_headers(self.headers, identity) if self.headers else b""

    def admit(self, ctx: RequestContext, identity: Identity, lines: bytes | None = None) -> None:
        """Put `identity` on the request and its forward headers on the upstream head."""
        ctx.identity = identity
        if lines is None:
            lines = self.forward_lines(identity)
        if lines:
            ctx.conn.add_upstream_headers(lines)

    def refuse(self, ctx: RequestContext, reason: str, reply: LocalReply) -> LocalReply:
        """Count a refusal and note it on the connection for the audit line (reason: a fixed
        phrase, never a credential)."""
        self.failures[reason] += 1
        self.route_failures[(route_name(ctx), reason)] += 1
        note_deny(ctx, deny_event(reply.status), self.name, reason)
        return reply


def route_name(ctx: RequestContext) -> str:
    """The name of the request's route ("" when it has none)."""
    return getattr(getattr(ctx.head, "route", None), "name", "") or ""


def deny_event(status: int) -> int:
    """The audit event (a stats.DenyEvent) of an auth refusal answered with `status`."""
    if status >= 500:
        return DENY_AUTH_UNAVAILABLE
    if status == 403:
        return DENY_FORBIDDEN
    return DENY_AUTH_FAILED


def note_deny(ctx: RequestContext, event: int, source: str, reason: str) -> None:
    """Tell the connection who refused this request and why (the C side writes the audit
    line at the exchange end); a connection that cannot be told is left alone."""
    note = getattr(ctx.conn, "note_deny", None)
    if note is not None:
        note(event, source, reason)


def _forward_headers(value: Any, name: str) -> tuple[tuple[str, str], ...]:
    at = f"middlewares.{name}.forward_headers"
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(at, "expected a mapping of header name -> identity field")
    out = []
    for header, source in value.items():
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise ConfigError(f"{at}.{header}", "not a valid header name")
        if header.lower() in _RESERVED:
            raise ConfigError(f"{at}.{header}", "the gateway owns this header")
        ok = isinstance(source, str) and (
            source in _SOURCES or (source.startswith("claim:") and len(source) > 6)
        )
        if not ok:
            raise ConfigError(
                f"{at}.{header}", f"expected one of {', '.join(_SOURCES)} or claim:NAME"
            )
        out.append((header, source))
    return tuple(out)


def encode_identity_headers(headers: tuple[tuple[str, str], ...], identity: Identity) -> bytes:
    """`Name: value\\r\\n` lines for the identity; a field with no value is left out."""
    lines = []
    for header, source in headers:
        value = _field(identity, source)
        if value is None:
            continue
        text = _header_safe(value)
        if text is not None:
            lines.append(f"{header}: {text}\r\n")
    return "".join(lines).encode("latin-1")


def _field(identity: Identity, source: str) -> str | None:
    if source.startswith("claim:"):
        value = identity.claim(source[6:])
    else:
        value = getattr(identity, source)
    if value is None or value == "":
        return None
    if isinstance(value, frozenset | set | list | tuple):
        items = sorted(str(v) for v in value)
        return ",".join(items) if items else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return None  # structured claims are not flattened into headers
    return str(value)


def _header_safe(value: str) -> str | None:
    if _UNSAFE.search(value):
        return None
    value = value.strip(" \t")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        value = quote(value, safe=" !#$%&'()*+,-./:;<=>?@[]^_`{|}~")
    return value


__all__ = [
    "COMMON_OPTIONS",
    "AuthCommon",
    "AuthOptions",
    "deny_event",
    "encode_identity_headers",
    "note_deny",
    "parse_options",
    "route_name",
]
