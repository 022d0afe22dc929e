"""`type: redirect`: answer the route's requests with a redirect, to a fixed place or to a URL
rewritten from the request's by a regular expression.

    middlewares:
      moved:
        type: redirect
        to: /new-home              # an absolute path, or http(s)://host/path
        status: 301                # 301, 302 (default), 303, 307, 308
        keep_query: true           # default: true for a path, false for a URL
      www:
        type: redirect
        regex: '^https?://example\\.com/(.*)'
        replacement: 'https://www.example.com/\\1'   # Python re: \\1, \\g<name>

Rules this file obeys:
- `to` is checked at config time: an absolute path (not `//` or `/\\`, which browsers read as
  another host) or an http(s) URL with a host and no user info, ASCII with no spaces or
  control characters. A path is sent as it is (a relative Location, RFC 9110 §10.2.2): the
  request's Host is never used, so a crafted Host cannot turn it into an open redirect.
- With `regex`, the pattern is compiled at construction and applied (like `re.sub`) to the
  request's URL `scheme://host/path?query` (scheme of the entrypoint, host lowercased, port
  kept, path and query as sent). No match: the request continues. Before the URL is built
  the Host must be a plain host name, IPv4 or bracketed IPv6 literal with an optional port,
  else 400, so a Host header cannot smuggle a path, user info or a line break into it.
- The result is percent-encoded where a URL may not hold a character as it is (the request's
  parts are copied into it), then it must be an http(s) URL with a valid host or an absolute
  path; anything else (e.g. `//evil.example`) is 400 "bad redirect target", never sent.
- The reply has an empty body and only Location; 307/308 keep the method and body.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, StrictBool

from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext, parse_options
from fastgate.middleware.registry import register

# Characters a URL may carry as they are (RFC 3986 reserved + unreserved, and `%` for the
# escapes already there); everything else is percent-encoded in a rewritten Location.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~-._"
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
_LABEL = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IPV6 = re.compile(rb"\[[0-9A-Fa-f:.]{2,45}\]")


class RedirectOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    to: str | None = None
    regex: str | None = None
    replacement: str | None = None
    status: Literal[301, 302, 303, 307, 308] = 302
    keep_query: StrictBool | None = None


@register
class Redirect:
    """A fixed or regex-rewritten redirect (see the module docstring)."""

    type: ClassVar[str] = "redirect"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(RedirectOptions, options or {})
        self.name = name
        self.status = opts.status
        self.redirected = 0
        self.not_matched = 0
        self.regex: re.Pattern[str] | None = None
        self.replacement = ""
        self.to = ""
        self.keep_query = False
        if (opts.to is None) == (opts.regex is None):
            raise ConfigError("", "give either `to` or `regex` with `replacement`")
        if opts.to is not None:
            if opts.replacement is not None:
                raise ConfigError("replacement", "only with `regex` (not with `to`)")
            if not location_ok(opts.to):
                raise ConfigError(
                    "to",
                    "must be an absolute path (not // or /\\) or an http(s) URL with a host "
                    "and no user info, in ASCII without spaces or control characters",
                )
            self.to = opts.to
            is_path = opts.to.startswith("/")
            self.keep_query = is_path if opts.keep_query is None else opts.keep_query
            return
        if opts.keep_query is not None:
            raise ConfigError("keep_query", "only with `to` (the regex sees the query)")
        if opts.replacement is None:
            raise ConfigError("replacement", "required with `regex`")
        try:
            self.regex = re.compile(opts.regex)
        except re.error as exc:
            raise ConfigError("regex", f"not a valid regular expression: {exc}") from None
        try:
            self.regex.sub(opts.replacement, "")  # checks \1 / \g<name> against the groups
        except (re.error, IndexError) as exc:
            raise ConfigError("replacement", f"not a valid replacement: {exc}") from None
        if re.search(r"[\x00-\x1f\x7f]", opts.replacement):
            raise ConfigError("replacement", "no control characters or line breaks")
        self.replacement = opts.replacement

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        head = ctx.head
        if self.regex is None:
            location = self.to
            if self.keep_query and head.query:
                query = quote(head.query.decode("ascii"), safe=_URL_SAFE)
                location = _with_query(location, query)
            return self.reply(location)
        host = head.host or b""
        if not valid_host(host):
            return LocalReply.error(400, "a redirect needs a valid Host")
        target = head.path + (b"?" + head.query if head.query is not None else b"")
        scheme = getattr(ctx.conn, "proto", "http")
        url = f"{scheme}://{host.lower().decode('ascii')}{target.decode('latin-1')}"
        location, count = self.regex.subn(self.replacement, url)
        if count == 0:
            self.not_matched += 1
            return None
        location = quote(location, safe=_URL_SAFE, encoding="utf-8")
        if not location_ok(location):
            return LocalReply.error(400, "bad redirect target")
        return self.reply(location)

    def reply(self, location: str) -> LocalReply:
        self.redirected += 1
        return LocalReply(self.status, b"", (("Location", location),), content_type="text/plain")

    def stats(self) -> dict[str, Any]:
        return {"redirected": self.redirected, "not_matched": self.not_matched}


def valid_host(host: bytes) -> bool:
    """A Host value safe to put in a URL: DNS labels or IPv4 digits, or a bracketed IPv6
    literal, then an optional port. (The same rule as redirect_https; written here so that
    neither module reaches into the other's private names.)"""
    name, port = host, b""
    if not host.endswith(b"]") and b":" in host:
        name, _, port = host.rpartition(b":")
        if not port.isdigit() or len(port) > 5:
            return False
    if _IPV6.fullmatch(name):
        return True
    labels = name.split(b".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def location_ok(location: str) -> bool:
    """An absolute path (not `//...` or `/\\...`, read as another host by browsers) or an
    http(s) URL with a valid host and no user info; visible ASCII only."""
    if not location or not _VISIBLE_ASCII.fullmatch(location) or "\\" in location:
        return False
    if location.startswith("/"):
        return not location.startswith("//")
    try:
        parts = urlsplit(location)
    except ValueError:
        return False
    netloc = parts.netloc
    return (
        parts.scheme in ("http", "https")
        and location.lower().startswith(parts.scheme + "://")
        and "@" not in netloc
        and valid_host(netloc.encode("ascii"))
    )


def _with_query(location: str, query: str) -> str:
    """`location` with the request's query added before any fragment, after its own."""
    base, hash_, fragment = location.partition("#")
    base += ("&" if "?" in base else "?") + query
    return base + hash_ + fragment


__all__ = ["Redirect", "RedirectOptions", "location_ok", "valid_host"]
