"""`type: add_prefix`: put a path prefix in front of the path sent upstream, so a service
that lives under `/v2` can be published at `/`.

    middlewares:
      v2:
        type: add_prefix
        prefix: /v2

`/users?x=1` reaches the service as `/v2/users?x=1` (and `/` as `/v2/`).

Rules this file obeys:
- Zero per-request Python: the class has no `on_request`. compile.py folds `add_prefix` into
  the route and the C forwarder builds the upstream target, after any strip_prefix of the
  route; the query is kept. Middlewares on the route and the router still see the client's
  path.
- The prefix follows the same rules as strip_prefix's (`check_prefix`): it starts with `/`,
  does not end with `/`, is not `/` alone, has no empty, `.` or `..` segment, no `?` or `#`,
  only visible ASCII, and no encoded `/` or `\\` (%2F, %5C) or malformed escape.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from fastgate.middleware.base import parse_options
from fastgate.middleware.registry import register
from fastgate.middleware.strip_prefix import check_prefix


class AddPrefixOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    prefix: str


@register
class AddPrefix:
    """Prefix the upstream path (see the module docstring)."""

    type: ClassVar[str] = "add_prefix"
    # No on_request on purpose: the forwarder does the work in C.

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(AddPrefixOptions, options or {})
        self.name = name
        self.add_prefix: bytes = check_prefix("prefix", opts.prefix)

    def stats(self) -> dict[str, Any]:
        return {"prefix": self.add_prefix.decode()}


__all__ = ["AddPrefix", "AddPrefixOptions"]
