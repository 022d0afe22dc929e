"""`type: headers`: add, set and remove request headers (what the service receives) and
response headers (what the client receives), with static values decided at config time.

    middlewares:
      tag:
        type: headers
        request:
          set: {X-Tenant: acme}            # the client's copies are dropped, this one sent
          add: {X-Gateway-Tag: edge-1}     # sent after the client's own copies
          remove: [X-Debug]                # the client's copies are dropped
        response:
          set: {Cache-Control: no-store}   # the service's copies are dropped, this one sent
          add: {Vary: Origin}              # sent after the service's own copies
          remove: [Server, X-Powered-By]   # the service's copies are dropped

Rules this file obeys:
- Zero per-request Python: the class has no `on_request`. compile.py reads
  `request_header_lines` / `strip_request_headers` (the route's `extra_headers` /
  `strip_headers`) and `response_header_lines` / `strip_response_headers` (the route's
  `response_headers` / `response_strip`), and the C writer applies them to every head.
- `set` and `remove` drop the other side's copies (the client's on requests, the service's on
  responses), never lines the gateway or another middleware of the route adds. Lines are sent
  in chain order, `set` lines before `add` lines, each in config order.
- Names are RFC 9110 tokens; values are visible ASCII, spaces and tabs inside (no CR, LF,
  NUL or other control bytes, no obs-text, no surrounding blanks), so a config can never
  split or smuggle a header line.
- Names the gateway owns cannot be touched: framing and hop-by-hop headers (Connection,
  Content-Length, Transfer-Encoding, Host, Upgrade, Keep-Alive, TE, Trailer, Proxy-*), the
  request id and trace context (X-Request-ID, traceparent, tracestate, traceresponse), and
  on requests the forwarding headers the gateway writes itself (X-Forwarded-For/-Proto/-Host,
  Forwarded) and Expect (100-continue is the gateway's).
- A name appears at most once per side (set, add and remove are exclusive): `add` plus
  `remove` of one name is what `set` means, so the config says it once, with `set`.
- Values may be credentials (a static upstream Authorization): they are never logged, never
  echoed in an error, and `stats()` reports names only.
- Middlewares on the route still see the client's request as sent; only the upstream copy
  changes. Replies the gateway makes itself (401, 429, 502 ...) carry no response headers.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from fastgate.errors import ConfigError
from fastgate.middleware.base import parse_options
from fastgate.middleware.registry import register

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Visible ASCII, with SP / HTAB only between visible characters (RFC 9110 §5.5 field-value).
_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x21-\x7e \t]*[\x21-\x7e])?)?")
_FRAMING = frozenset(
    {"connection", "content-length", "transfer-encoding", "host", "upgrade", "keep-alive",
     "te", "trailer"}
)  # fmt: skip
_GATEWAY = frozenset({"x-request-id", "traceparent", "tracestate", "traceresponse"})
_GATEWAY_REQUEST = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "expect"}
)


class HeaderEdits(BaseModel):
    """One side's edits (request or response)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: list[str] = []


class HeadersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    request: HeaderEdits = HeaderEdits()
    response: HeaderEdits = HeaderEdits()


@register
class Headers:
    """Static request and response header edits for a route (see the module docstring)."""

    type: ClassVar[str] = "headers"
    # No on_request on purpose: the route's compiled heads carry everything.

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(HeadersOptions, options or {})
        self.name = name
        request = _Side("request", opts.request)
        response = _Side("response", opts.response)
        if request.empty and response.empty:
            raise ConfigError("", "nothing to do: give request or response set / add / remove")
        self.request_header_lines = request.lines
        self.strip_request_headers = request.strip
        self.response_header_lines = response.lines
        self.strip_response_headers = response.strip
        self._names = {"request": request.names, "response": response.names}

    def stats(self) -> dict[str, Any]:
        """Names only: values may be credentials."""
        return dict(self._names)


class _Side:
    """The validated edits of one side, as the writer needs them."""

    def __init__(self, side: str, edits: HeaderEdits) -> None:
        seen: dict[str, str] = {}  # lowercase name -> key path that first used it
        entries: list[tuple[str, str, str]] = []  # (key path, name, value)
        for verb in ("set", "add"):
            for header, value in getattr(edits, verb).items():
                entries.append((f"{side}.{verb}.{header}", header, value))
        removed = [(f"{side}.remove[{i}]", header, "") for i, header in enumerate(edits.remove)]
        for at, header, value in [*entries, *removed]:
            _check_name(side, at, header)
            if not _VALUE.fullmatch(value):
                raise ConfigError(
                    at,
                    "the value must be visible ASCII (spaces and tabs only inside): "
                    "no control characters, line breaks or non-ASCII text",
                )
            first = seen.setdefault(header.lower(), at)
            if first != at:
                raise ConfigError(at, f"{header} is already given at {first} (once per side)")
        self.lines = "".join(f"{h}: {v}\r\n" for _, h, v in entries).encode("ascii")
        strip = [h for h in edits.set] + list(edits.remove)
        self.strip = tuple(h.lower().encode("ascii") for h in strip)
        self.names = {verb: list(getattr(edits, verb)) for verb in ("set", "add", "remove")}
        self.empty = not entries and not removed


def _check_name(side: str, at: str, header: str) -> None:
    if not _TOKEN.fullmatch(header):
        raise ConfigError(at, f"{header!r} is not a valid header name (RFC 9110 token)")
    low = header.lower()
    if low in _FRAMING or low.startswith("proxy-"):
        raise ConfigError(at, f"{header} is a hop-by-hop or framing header: the gateway's")
    if low in _GATEWAY or (side == "request" and low in _GATEWAY_REQUEST):
        raise ConfigError(at, f"{header} is written by the gateway itself")


__all__ = ["HeaderEdits", "Headers", "HeadersOptions"]
