"""`type: cors`: the gateway answers CORS preflights and adds the CORS response headers, so
the services behind a route need no CORS code (the Fetch standard's CORS protocol).

    middlewares:
      browser_api:
        type: cors
        allow_origins: [https://app.example.com, "https://*.example.com"]   # or ["*"]
        allow_methods: [GET, HEAD, POST, PUT]     # default GET, HEAD, POST
        allow_headers: [Content-Type, X-Api-Version]   # default: only CORS-safelisted ones
        expose_headers: [X-Request-ID]
        allow_credentials: false                  # cookies / Authorization from browsers
        max_age: 600                              # seconds a browser may cache a preflight
        allow_private_network: false              # Private Network Access preflights

Rules this file obeys:
- A preflight (OPTIONS with Origin and Access-Control-Request-Method) never reaches the
  service: an allowed origin, method, header list (and private-network request) gets 204
  with the Access-Control-Allow-* headers; anything else gets 403 with a JSON error and no
  Access-Control-Allow-Origin, so the browser blocks the real request.
- An actual request from an allowed origin continues and gets Access-Control-Allow-Origin
  (+ -Allow-Credentials, -Expose-Headers) on its response. A request from another origin, or
  without Origin, continues untouched: the browser enforces the policy. Every response of the
  route carries `Vary: Origin` (a static line, nothing per request), so a shared cache never
  hands a response made for one origin to another.
- The gateway owns CORS on the route: the service's own Access-Control-* response headers
  are dropped (`strip_response_headers`), so a service cannot widen the policy.
- Origins are compared exactly (scheme, host and port; case-insensitive, a default port in
  the config is dropped as browsers do). `https://*.example.com` matches any subdomain
  (not example.com itself) on that scheme and port. The `null` origin (sandboxed frames,
  file: pages) is only allowed when listed literally, never through `*`.
- `*` (any origin, any method, any header, all exposed) cannot be combined with
  `allow_credentials: true`: browsers refuse it, and echoing any origin with credentials
  would let every site read a user's data (a config error naming the key). `*` in
  allow_headers never covers Authorization, as in the Fetch standard: list it explicitly.
- Only origins that matched the config are echoed (a wildcard match is checked character by
  character), so nothing a client sends can split a header line.
- The sets are built at construction: a request without Origin costs one header lookup.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from fastgate._core.httphead import METHOD_OPTIONS
from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext, parse_options
from fastgate.middleware.registry import register

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
# An origin's host: DNS labels (or `*.` then labels), an IPv4 address, or a bracketed IPv6.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}|\[[0-9a-f:.]{{2,45}}\]")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_SAFE_METHODS = ("GET", "HEAD", "POST")
_VARY_PREFLIGHT = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
# The service's copies are dropped: the gateway owns CORS on the route.
OWNED_RESPONSE_HEADERS = (
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-expose-headers",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-max-age",
    b"access-control-allow-private-network",
)


class CorsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    allow_origins: list[str] = Field(min_length=1)
    allow_methods: list[str] = list(_SAFE_METHODS)
    allow_headers: list[str] = []
    expose_headers: list[str] = []
    allow_credentials: StrictBool = False
    max_age: int = Field(600, ge=0, le=86400)
    allow_private_network: StrictBool = False


@register
class Cors:
    """CORS preflights answered and CORS response headers added (see the module docstring)."""

    type: ClassVar[str] = "cors"
    strip_response_headers: ClassVar[tuple[bytes, ...]] = OWNED_RESPONSE_HEADERS
    # Static on every response of the route (written in C): see the module docstring.
    response_header_lines: ClassVar[bytes] = b"Vary: Origin\r\n"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(CorsOptions, options or {})
        self.name = name
        creds = opts.allow_credentials
        self.any_origin = opts.allow_origins == ["*"]
        exact, wildcards = _origins(opts.allow_origins, creds)
        self.exact: frozenset[str] = exact
        self.wildcards: tuple[re.Pattern[str], ...] = wildcards
        self.methods = _names("allow_methods", opts.allow_methods, creds, lower=False)
        self.headers = frozenset(_names("allow_headers", opts.allow_headers, creds, lower=True))
        self.any_header = "*" in self.headers  # with Authorization too only if listed
        exposed = _names("expose_headers", opts.expose_headers, creds, lower=False)
        self.credentials = creds
        self.private_network = opts.allow_private_network
        self.max_age = str(opts.max_age)
        self.methods_value = ", ".join(self.methods)
        extra = b"Access-Control-Allow-Credentials: true\r\n" if creds else b""
        if exposed:
            extra += b"Access-Control-Expose-Headers: " + ", ".join(exposed).encode() + b"\r\n"
        self.extra_lines = extra  # after Access-Control-Allow-Origin on actual requests
        # Actual requests from a configured exact origin: the whole lines, looked up once.
        self.lines: dict[bytes, bytes] = {
            o.encode(): b"Access-Control-Allow-Origin: " + o.encode() + b"\r\n" + extra
            for o in exact
        }
        self.counts = {"preflight_allowed": 0, "preflight_refused": 0, "actual_allowed": 0}

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        head = ctx.head
        origin = head.get(b"origin")
        if origin is None:
            return None
        if head.method is METHOD_OPTIONS:
            wanted = head.get(b"access-control-request-method")
            if wanted is not None:
                return self.preflight(head, origin, wanted)
        lines = self.lines.get(origin)
        if lines is None:
            allowed = self.allow_origin(origin)
            if allowed is None:
                return None
            lines = b"Access-Control-Allow-Origin: %s\r\n%s" % (allowed.encode(), self.extra_lines)
        self.counts["actual_allowed"] += 1
        ctx.conn.add_response_headers(lines)
        return None

    def allow_origin(self, origin: bytes) -> str | None:
        """The Access-Control-Allow-Origin value for `origin`, or None when not allowed."""
        try:
            text = origin.decode("ascii")
        except UnicodeDecodeError:
            return None
        low = text.lower()
        if low == "null":
            return text if "null" in self.exact else None
        if self.any_origin:
            return text if self.credentials else "*"
        if low in self.exact or any(w.fullmatch(low) for w in self.wildcards):
            return text  # matched a strict pattern: only origin characters
        return None

    def preflight(self, head: Any, origin: bytes, wanted: bytes) -> LocalReply:
        """204 with the Access-Control-Allow-* headers, or 403 naming what was refused."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return self.refuse("origin not allowed")
        method = wanted.decode("latin-1")
        any_method = self.methods == ("*",)
        if method not in self.methods and not (any_method and _TOKEN.fullmatch(method)):
            return self.refuse("method not allowed")
        requested = _requested_headers(head.get_all(b"access-control-request-headers"))
        if requested is None or not all(map(self.header_allowed, requested)):
            return self.refuse("header not allowed")
        private = head.get(b"access-control-request-private-network") == b"true"
        if private and not self.private_network:
            return self.refuse("private network access not allowed")
        headers = [
            ("Access-Control-Allow-Origin", allowed),
            ("Access-Control-Allow-Methods", method if any_method else self.methods_value),
        ]
        if requested:
            headers.append(("Access-Control-Allow-Headers", ", ".join(requested)))
        headers.append(("Access-Control-Max-Age", self.max_age))
        if self.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        if private:
            headers.append(("Access-Control-Allow-Private-Network", "true"))
        headers.append(("Vary", _VARY_PREFLIGHT))
        self.counts["preflight_allowed"] += 1
        return LocalReply(204, b"", tuple(headers), content_type="text/plain")

    def header_allowed(self, name: str) -> bool:
        if name in self.headers:
            return True
        return self.any_header and name != "authorization"

    def refuse(self, reason: str) -> LocalReply:
        self.counts["preflight_refused"] += 1
        return LocalReply.error(403, f"CORS preflight refused: {reason}", Vary=_VARY_PREFLIGHT)

    def stats(self) -> dict[str, Any]:
        return dict(self.counts)


def _requested_headers(values: list[bytes]) -> list[str] | None:
    """Access-Control-Request-Headers as lowercase names, in order, no duplicates; None when
    a name is not a token (refused, and never echoed)."""
    out: dict[str, None] = {}
    for value in values:
        for part in value.decode("latin-1").split(","):
            name = part.strip(" \t").lower()
            if not name:
                continue
            if not _TOKEN.fullmatch(name):
                return None
            out[name] = None
    return list(out)


def _origins(items: list[str], credentials: bool) -> tuple[frozenset[str], tuple[Any, ...]]:
    """(exact origins, wildcard patterns), normalised; ConfigError naming the entry."""
    if "*" in items:
        if len(items) > 1:
            raise ConfigError("allow_origins", '"*" allows every origin: it must be alone')
        if credentials:
            raise ConfigError(
                "allow_credentials",
                'cannot be true with allow_origins ["*"]: list the origins that may send '
                "credentials (browsers refuse `*` with credentials)",
            )
        return frozenset(), ()
    exact: set[str] = set()
    wildcards: list[re.Pattern[str]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        at = f"allow_origins[{i}]"
        origin = _origin(at, item)
        if origin in seen:
            raise ConfigError(at, f"{item!r} is listed twice")
        seen.add(origin)
        if "://*." in origin:
            scheme, _, rest = origin.partition("://*.")
            wildcards.append(re.compile(rf"{re.escape(scheme)}://(?:{_LABEL}\.)+{re.escape(rest)}"))
        else:
            exact.add(origin)
    return frozenset(exact), tuple(wildcards)


def _origin(at: str, item: str) -> str:
    """One configured origin as browsers serialise it (lowercase, no default port)."""
    low = item.lower()
    if low == "null":
        return "null"
    scheme, sep, authority = low.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ConfigError(at, f"{item!r} is not an origin (scheme://host[:port], or null)")
    host, port = authority, ""
    if re.fullmatch(r".*:[0-9]{1,5}", authority):
        host, _, port = authority.rpartition(":")
        if not 0 < int(port) < 65536:
            raise ConfigError(at, f"{item!r} has a port out of range")
    wildcard = host.startswith("*.")
    bare = host[2:] if wildcard else host
    if not _HOST.fullmatch(bare) or (wildcard and "." not in bare):
        raise ConfigError(
            at,
            f"{item!r} is not an origin: scheme://host[:port] with no path, query or "
            "user; a wildcard is `*.` before at least two labels (https://*.example.com)",
        )
    if port == _DEFAULT_PORTS.get(scheme):
        port = ""
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _names(key: str, items: list[str], credentials: bool, lower: bool) -> tuple[str, ...]:
    """Validated method or header names in config order; `*` only alone, without credentials."""
    out: dict[str, None] = {}
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        if item == "*":
            if credentials:
                raise ConfigError(
                    at, '"*" cannot be used with allow_credentials: true (list the names)'
                )
            if len(items) > 1 and key != "allow_headers":
                raise ConfigError(at, '"*" allows every name: it must be alone')
        elif not _TOKEN.fullmatch(item):
            raise ConfigError(at, f"{item!r} is not a valid name (RFC 9110 token)")
        name = item.lower() if lower else item
        if name in out:
            raise ConfigError(at, f"{item!r} is listed twice")
        out[name] = None
    return tuple(out)


__all__ = ["OWNED_RESPONSE_HEADERS", "Cors", "CorsOptions"]
