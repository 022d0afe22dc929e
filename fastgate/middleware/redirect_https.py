"""`type: redirect_https`: answer plain-HTTP requests with a redirect to the same URL on
HTTPS, so clients that typed `http://` end up encrypted.

    middlewares:
      to_https:
        type: redirect_https
        port: 443          # the HTTPS port in Location (left out when 443)
        permanent: true    # 301/308 (default); false: 302/307

Put it on the routes of the plain entrypoint (the HTTPS entrypoint's routes need nothing).

Rules this file obeys:
- GET and HEAD get 301 (or 302); every other method gets 308 (or 307), which keeps the method
  and body (RFC 9110 §15.4), so a POST is not silently turned into a GET.
- The Location is built from the request's Host (its port replaced) and target; a Host that
  is not a plain host name, IPv4 or bracketed IPv6 literal gets 400 rather than being echoed
  into a header (no open redirect through a crafted Host, no header injection).
- A request on a connection that is already HTTPS passes on untouched.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from fastgate.middleware.base import LocalReply, RequestContext, parse_options
from fastgate.middleware.registry import register

_HOST = re.compile(
    rb"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
    rb"(?::[0-9]{1,5})?"
)


class RedirectHttpsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    port: int = Field(443, ge=1, le=65535)
    permanent: StrictBool = True


@register
class RedirectHttps:
    """Redirect to https:// (see the module docstring)."""

    type: ClassVar[str] = "redirect_https"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(RedirectHttpsOptions, options or {})
        self.name = name
        self.port = b"" if opts.port == 443 else b":%d" % opts.port
        self.safe_status, self.other_status = (301, 308) if opts.permanent else (302, 307)
        self.redirected = 0

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        if getattr(ctx.conn, "proto", "http") == "https":
            return None
        head = ctx.head
        match = _HOST.fullmatch(head.host or b"")
        if match is None:
            return LocalReply.error(400, "a redirect to https needs a valid Host")
        target = head.path + (b"?" + head.query if head.query is not None else b"")
        location = b"https://" + match["host"] + self.port + target
        status = self.safe_status if head.method in (b"GET", b"HEAD") else self.other_status
        self.redirected += 1
        return LocalReply(
            status,
            b"",
            (("Location", location.decode("latin-1")),),
            content_type="text/plain",
        )

    def stats(self) -> dict[str, Any]:
        return {"redirected": self.redirected}


__all__ = ["RedirectHttps", "RedirectHttpsOptions"]
