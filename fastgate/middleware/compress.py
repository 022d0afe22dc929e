"""`type: compress`: gzip / brotli compression of the service's responses on a route.

    middlewares:
      squeeze:
        type: compress
        algorithms: [br, gzip]       # preference order when the client accepts both equally
        min_bytes: 1024              # a Content-Length below this is sent as is
        content_types: [text/*, application/json]
        gzip_level: 6                # 1-9
        brotli_quality: 4            # 0-11

Rules this file obeys:
- Zero per-request Python: the class has no `on_request`. compile.py reads `compress_rule`
  (a fastgate._core.compress.CompressRule) onto the route, and the relay asks the C
  `negotiate()` per response (rules in fastgate/_core/compress.pyx).
- Never compressed: responses already encoded (any Content-Encoding), partial ones (206,
  Content-Range), bodiless ones (HEAD, 204, 304, 1xx, 3xx), tiny ones (Content-Length below
  `min_bytes`), `Cache-Control: no-transform`, content types not listed, clients that do not
  list the algorithm in Accept-Encoding with q > 0, and HTTP/1.0 clients (no chunked).
- BREACH / CRIME: a compressed response's length leaks how much of it repeats. A response
  that reflects attacker-chosen input (a query parameter echoed in the page) next to a
  secret (a CSRF token, a session id) lets an attacker who sees the encrypted length guess
  the secret byte by byte, TLS or not. So compression is opt-in per route: put it on
  routes serving public or non-secret data (assets, public APIs), not on pages that mix
  secrets with reflected input, unless the service masks its tokens per response.
- `br` needs the `brotli` package: without it br is skipped (logged once here, at config
  time); a config naming only br is refused, since it would silently compress nothing.
- Options are validated strictly: unknown keys, wrong types, repeated algorithms and content
  types that are not `type/subtype` or `type/*` are ConfigErrors naming the key path.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fastgate._core import compress as core
from fastgate._core.compress import DEFAULT_CONTENT_TYPES, CompressRule
from fastgate.errors import ConfigError
from fastgate.middleware.base import parse_options
from fastgate.middleware.registry import register

log = logging.getLogger("fastgate.compress")

# RFC 9110 §8.3.1 media type: token "/" token, here with "*" allowed only as the whole subtype.
_NAME = r"[!#$%&'+\-.^_`|~0-9A-Za-z]+"
_MEDIA = re.compile(rf"{_NAME}/(?:{_NAME}|\*)")


def _media_type(value: str) -> str:
    if not _MEDIA.fullmatch(value):
        raise ValueError(f"{value!r} is not a media type like type/subtype or type/*")
    return value.lower()


class CompressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    algorithms: list[Literal["br", "gzip"]] = Field(default=["br", "gzip"], min_length=1)
    min_bytes: int = Field(default=1024, ge=0)
    content_types: list[Annotated[str, AfterValidator(_media_type)]] = Field(
        default=list(DEFAULT_CONTENT_TYPES), min_length=1
    )
    gzip_level: int = Field(default=6, ge=1, le=9)
    brotli_quality: int = Field(default=4, ge=0, le=11)


@register
class Compress:
    """Response compression for a route (see the module docstring)."""

    type: ClassVar[str] = "compress"
    # No on_request on purpose: the relay negotiates per response in C.

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(CompressOptions, options or {})
        self.name = name
        _no_repeats("algorithms", opts.algorithms)
        _no_repeats("content_types", opts.content_types)
        algorithms = list(opts.algorithms)
        if "br" in algorithms and not core.BROTLI_AVAILABLE:
            algorithms.remove("br")
            if not algorithms:
                raise ConfigError(
                    "algorithms",
                    "br needs the brotli package, which is not installed: add gzip",
                )
            log.warning(
                "compress %s: the brotli package is not installed: br is skipped, "
                "responses are compressed with %s only",
                name,
                ", ".join(algorithms),
            )
        self.compress_rule = CompressRule(
            algorithms=tuple(algorithms),
            min_bytes=opts.min_bytes,
            content_types=tuple(opts.content_types),
            gzip_level=opts.gzip_level,
            brotli_quality=opts.brotli_quality,
        )

    def stats(self) -> dict[str, Any]:
        """The effective settings (nothing secret here)."""
        rule = self.compress_rule
        return {
            "algorithms": list(rule.algorithms),
            "min_bytes": rule.min_bytes,
            "content_types": list(rule.content_types),
            "gzip_level": rule.gzip_level,
            "brotli_quality": rule.brotli_quality,
        }


def _no_repeats(key: str, values: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        first = seen.setdefault(value, i)
        if first != i:
            raise ConfigError(f"{key}[{i}]", f"{value} is already listed at {key}[{first}]")


__all__ = ["Compress", "CompressOptions"]
