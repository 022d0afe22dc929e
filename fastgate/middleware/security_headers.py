"""`type: security_headers`: HSTS and the other browser security headers on every response of
the route, set by the gateway so no service can forget them.

    middlewares:
      secure:
        type: security_headers
        hsts: {max_age: 31536000, include_subdomains: true, preload: false}   # or false
        content_type_options: true            # X-Content-Type-Options: nosniff
        frame_options: DENY                   # DENY | SAMEORIGIN | false
        referrer_policy: strict-origin-when-cross-origin   # or false
        content_security_policy: "default-src 'none'"       # default: not set
        permissions_policy: null              # e.g. "camera=(), geolocation=()"
        cross_origin_opener_policy: null      # e.g. same-origin
        headers: {X-Robots-Tag: noindex}      # any other header, set as given
        remove: [Server, X-Powered-By]        # the service's headers that must not leak

Rules this file obeys:
- Everything is decided at config time: the middleware has no `on_request`, so the route
  pays nothing per request; the compiled route carries the header lines and the C writer adds
  them to each response head (`response_header_lines`), dropping the service's own headers of
  the same names first (`strip_response_headers`) so a service cannot weaken them (a second,
  laxer Content-Security-Policy would be enforced together with ours, a second HSTS would be
  ambiguous).
- Values are validated: header names are tokens, values have no control characters, HSTS
  max-age is a whole number of seconds, and `preload` needs the max-age and
  `includeSubDomains` the preload list demands (hstspreload.org: at least one year).
- HSTS only means something over HTTPS (RFC 6797 §8.1: browsers ignore it on plain HTTP);
  it is sent on whatever entrypoint the route serves, which is harmless.
- Replies the gateway makes itself (401, 429, 502 ...) do not carry these headers.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from fastgate.errors import ConfigError
from fastgate.middleware.registry import register

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
PRELOAD_MIN_AGE = 31536000
# Framing and connection management are the gateway's: never set or removed by config.
_RESERVED = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "trailer"}
)


class Hsts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    max_age: int = Field(31536000, ge=0, le=10 * 31536000)
    include_subdomains: StrictBool = False
    preload: StrictBool = False


class SecurityHeadersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    hsts: Any = None  # a mapping (Hsts), false, or absent for the defaults: checked below
    content_type_options: StrictBool = True
    frame_options: Literal["DENY", "SAMEORIGIN", False] = "DENY"
    referrer_policy: str | Literal[False] = "strict-origin-when-cross-origin"
    content_security_policy: str | None = None
    permissions_policy: str | None = None
    cross_origin_opener_policy: str | None = None
    headers: dict[str, str] = {}
    remove: list[str] = []


@register
class SecurityHeaders:
    """Static response headers for a route (see the module docstring)."""

    type: ClassVar[str] = "security_headers"
    on_request = None  # nothing per request: the route's response head carries the lines

    def __init__(self, options: dict[str, Any], name: str) -> None:
        from fastgate.config.schema import pydantic_errors

        try:
            opts = SecurityHeadersOptions.model_validate(options or {})
        except ValidationError as exc:
            raise ConfigError.from_errors(pydantic_errors(exc, SecurityHeadersOptions)) from None
        hsts: Hsts | None = None
        if opts.hsts is not False:
            try:
                hsts = Hsts.model_validate({} if opts.hsts in (None, True) else opts.hsts)
            except ValidationError as exc:
                problems = pydantic_errors(exc, Hsts)
                raise ConfigError.from_errors([(f"hsts.{p}", r) for p, r in problems]) from None
        self.name = name
        headers = _standard(opts, hsts)
        for header, value in opts.headers.items():
            headers.append((f"headers.{header}", header, value))
        seen: dict[str, str] = {}
        for at, header, value in headers:
            _check(at, header, value)
            if header.lower() in seen:
                raise ConfigError(at, f"{header} is already set by {seen[header.lower()]}")
            seen[header.lower()] = at
        removed = []
        for i, header in enumerate(opts.remove):
            _check(f"remove[{i}]", header, "")
            removed.append(header)
        self.headers = tuple((h, v) for _, h, v in headers)
        self.response_header_lines = "".join(f"{h}: {v}\r\n" for h, v in self.headers).encode(
            "latin-1"
        )
        self.strip_response_headers = tuple(
            dict.fromkeys(h.lower().encode("latin-1") for h in [*seen, *removed])
        )

    def stats(self) -> dict[str, Any]:
        return {"headers": [h for h, _ in self.headers], "removed": self.strip_response_headers}


def _standard(opts: SecurityHeadersOptions, hsts: Hsts | None) -> list[tuple[str, str, str]]:
    """(key path, header, value) for the named options that are on."""
    out = []
    if hsts is not None:
        if hsts.preload and (hsts.max_age < PRELOAD_MIN_AGE or not hsts.include_subdomains):
            raise ConfigError(
                "hsts.preload",
                f"needs max_age >= {PRELOAD_MIN_AGE} and include_subdomains: true",
            )
        value = f"max-age={hsts.max_age}"
        if hsts.include_subdomains:
            value += "; includeSubDomains"
        if hsts.preload:
            value += "; preload"
        out.append(("hsts", "Strict-Transport-Security", value))
    if opts.content_type_options:
        out.append(("content_type_options", "X-Content-Type-Options", "nosniff"))
    if opts.frame_options is not False:
        out.append(("frame_options", "X-Frame-Options", opts.frame_options))
    named = (
        ("referrer_policy", "Referrer-Policy", opts.referrer_policy),
        ("content_security_policy", "Content-Security-Policy", opts.content_security_policy),
        ("permissions_policy", "Permissions-Policy", opts.permissions_policy),
        ("cross_origin_opener_policy", "Cross-Origin-Opener-Policy",
         opts.cross_origin_opener_policy),
    )  # fmt: skip
    for at, header, value in named:
        if value is not None and value is not False:
            out.append((at, header, value))
    return out


def _check(at: str, header: str, value: str) -> None:
    if not _TOKEN.fullmatch(header):
        raise ConfigError(at, f"{header!r} is not a valid header name")
    if header.lower() in _RESERVED:
        raise ConfigError(at, f"{header} belongs to the gateway's framing")
    if _UNSAFE.search(value) or value != value.strip(" \t"):
        raise ConfigError(at, "the value has control characters or surrounding blanks")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(at, "the value must be Latin-1 text") from None


__all__ = ["SecurityHeaders", "SecurityHeadersOptions"]
