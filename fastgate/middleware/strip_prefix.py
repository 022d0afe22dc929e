"""`type: strip_prefix`: remove a path prefix before the request goes upstream, so a service
mounted at `/` can be published under `/api`.

    middlewares:
      api_root:
        type: strip_prefix
        prefixes: [/api/v1, /api]     # the first that matches is stripped

`/api/users?x=1` reaches the service as `/users?x=1`, `/api` as `/`, with
`X-Forwarded-Prefix: /api` so it can build links back to itself.

Rules this file obeys:
- Zero per-request Python: the class has no `on_request`. compile.py folds `strip_prefixes`
  into the route and the C forwarder rewrites the upstream target: the first prefix that
  matches at a segment boundary (`/api` matches `/api` and `/api/x`, never `/apix`) is cut,
  an empty result becomes `/`, the query is kept, and X-Forwarded-Prefix names the prefix.
  The client's own X-Forwarded-Prefix is dropped (`strip_request_headers`), so the service
  can trust the one it sees.
- Middlewares on the route and the router still see the client's path; only the upstream
  copy changes.
- Prefixes are checked at config time (`check_prefix`, shared with add_prefix): they start
  with `/`, do not end with `/`, are not `/` alone (it would strip nothing), have no empty,
  `.` or `..` segment, no `?` or `#`, only visible ASCII, and no percent-escape that decodes
  to `/` or `\\` (`%2F`, `%5C`) nor a malformed one: a prefix must match one way only, so
  `/a%2Fb` and `/a/b` can never be confused. A prefix that an earlier one always shadows
  (`/api` before `/api/v1`) is refused: it could never be used.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fastgate.errors import ConfigError
from fastgate.middleware.base import parse_options
from fastgate.middleware.registry import register

# RFC 3986 pchar and "/" only (no "?" or "#"); "%" only as a full escape, checked below.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]+")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|%2[Ff]|%5[Cc]")


class StripPrefixOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    prefixes: list[str] = Field(min_length=1)


def check_prefix(at: str, prefix: str) -> bytes:
    """`prefix` as the bytes the forwarder compares, or ConfigError at `at` saying why."""
    if not prefix.startswith("/"):
        raise ConfigError(at, f"{prefix!r} must start with /")
    if prefix == "/":
        raise ConfigError(at, "/ alone changes nothing: give a prefix such as /api")
    if prefix.endswith("/"):
        raise ConfigError(at, f"{prefix!r} must not end with / (it matches at a / anyway)")
    if "?" in prefix or "#" in prefix:
        raise ConfigError(at, f"{prefix!r} must be a path: no ? or #")
    if not _PATH_CHARS.fullmatch(prefix):
        raise ConfigError(
            at,
            f"{prefix!r} may only hold visible ASCII path characters (no spaces or control "
            "characters; percent-encode anything else)",
        )
    if _ESCAPE.search(prefix):
        raise ConfigError(
            at, f"{prefix!r} has a malformed escape or an encoded / or \\ (%2F, %5C): ambiguous"
        )
    if any(seg in ("", ".", "..") for seg in prefix[1:].split("/")):
        raise ConfigError(at, f"{prefix!r} has an empty, . or .. segment")
    return prefix.encode("ascii")


@register
class StripPrefix:
    """Strip the first matching path prefix upstream (see the module docstring)."""

    type: ClassVar[str] = "strip_prefix"
    # No on_request on purpose: the forwarder does the work in C.
    strip_request_headers: ClassVar[tuple[bytes, ...]] = (b"x-forwarded-prefix",)

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(StripPrefixOptions, options or {})
        self.name = name
        prefixes: list[bytes] = []
        for i, text in enumerate(opts.prefixes):
            at = f"prefixes[{i}]"
            prefix = check_prefix(at, text)
            for j, earlier in enumerate(prefixes):
                if prefix == earlier or prefix.startswith(earlier + b"/"):
                    raise ConfigError(
                        at, f"never used: prefixes[{j}] {earlier.decode()} matches first"
                    )
            prefixes.append(prefix)
        self.strip_prefixes: tuple[bytes, ...] = tuple(prefixes)

    def stats(self) -> dict[str, Any]:
        return {"prefixes": [p.decode() for p in self.strip_prefixes]}


__all__ = ["StripPrefix", "StripPrefixOptions", "check_prefix"]
