"""`type: replace_path_regex`: rewrite the path sent upstream with a regular expression.

    middlewares:
      legacy:
        type: replace_path_regex
        regex: '^/old/(.*)'
        replacement: '/new/\\1'      # Python re: \\1, \\g<name>

`/old/a?x=1` reaches the service as `/new/a?x=1`, with `X-Replaced-Path: /old/a`.

Rules this file obeys:
- The pattern is compiled once, at construction (a bad pattern or a replacement naming a
  group the pattern lacks is a config error). It works on the raw path bytes as the client
  sent them (percent-escapes not decoded), replacing every match like `re.sub`; the query is
  never part of it and is kept as it was. A path that does not match is forwarded unchanged.
- The new path must start with `/` and hold only visible ASCII (no spaces, control
  characters, `#` or `?`) to be a valid origin-form target: anything else is answered 400
  "bad rewritten path" and never sent.
- The original path goes upstream as X-Replaced-Path; the client's own X-Replaced-Path is
  dropped (`strip_request_headers`), so the service can trust the one it sees.
- Middlewares after this one, and the router, still see the client's path: only the
  upstream copy changes (`conn.set_upstream_target`).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext, parse_options
from fastgate.middleware.registry import register

_TARGET_PATH = re.compile(rb"/[\x21-\x22\x24-\x3e\x40-\x7e]*")  # visible ASCII but # and ?


class ReplacePathRegexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    regex: str
    replacement: str


@register
class ReplacePathRegex:
    """Regex rewrite of the upstream path (see the module docstring)."""

    type: ClassVar[str] = "replace_path_regex"
    strip_request_headers: ClassVar[tuple[bytes, ...]] = (b"x-replaced-path",)
    # compile refuses it beside strip_prefix/add_prefix: one way to rewrite a route's path
    rewrites_target: ClassVar[bool] = True

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(ReplacePathRegexOptions, options or {})
        self.name = name
        try:
            pattern = opts.regex.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError("regex", "ASCII only (paths are matched as sent, escaped)") from None
        try:
            self.regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError("regex", f"not a valid regular expression: {exc}") from None
        try:
            self.replacement = opts.replacement.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(
                "replacement", "ASCII only: percent-encode other characters"
            ) from None
        try:
            self.regex.sub(self.replacement, b"")  # checks \1 / \g<name> against the groups
        except (re.error, IndexError) as exc:
            raise ConfigError("replacement", f"not a valid replacement: {exc}") from None
        self.rewritten = 0
        self.refused = 0

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        head = ctx.head
        path = head.path
        new, count = self.regex.subn(self.replacement, path)
        if count == 0:
            return None
        if not _TARGET_PATH.fullmatch(new):
            self.refused += 1
            return LocalReply.error(400, "bad rewritten path")
        query = head.query
        ctx.conn.set_upstream_target(new + (b"?" + query if query else b""))
        ctx.conn.add_upstream_headers(b"X-Replaced-Path: " + path + b"\r\n")
        self.rewritten += 1
        return None

    def stats(self) -> dict[str, Any]:
        return {"rewritten": self.rewritten, "refused": self.refused}


__all__ = ["ReplacePathRegex", "ReplacePathRegexOptions"]
