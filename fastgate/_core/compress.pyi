"""Response compression (gzip, brotli) for the relay: negotiate() and the Encoder.

The relay uses the C API (compress.pxd). From Python: CompressRule (built by the `compress`
middleware), negotiate_heads() and compress_body() for tests and tools. The rules are in the
module comment of compress.pyx.
"""

from collections.abc import Iterable

BROTLI_AVAILABLE: bool  # the `brotli` package imports; without it "br" is skipped
ALGORITHMS: tuple[str, ...]  # ("br", "gzip")
DEFAULT_ALGORITHMS: tuple[str, ...]  # ("br", "gzip"): preference order
DEFAULT_CONTENT_TYPES: tuple[str, ...]  # text/*, application/json, ... (see compress.pyx)

class CompressRule:
    """What one route compresses and how. Immutable."""

    algorithms: tuple[str, ...]  # in preference order, "br" dropped when brotli is missing
    content_types: tuple[str, ...]  # lowercase; "type/subtype" or "type/*"
    min_bytes: int
    gzip_level: int
    brotli_quality: int
    def __init__(
        self,
        algorithms: Iterable[str] = ...,
        min_bytes: int = 1024,
        content_types: Iterable[str] = ...,
        gzip_level: int = 6,
        brotli_quality: int = 4,
    ) -> None:
        """ValueError on an unknown or repeated algorithm, min_bytes < 0, a level out of range
        (gzip 1-9, brotli 0-11) or a content type that is not type/subtype or type/*."""

class Encoder:
    """The compressor of one response (made by negotiate only)."""

    head_lines: bytes  # b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
    algorithm: str  # "gzip" or "br"
    def push(self, data: bytes) -> bytes | None:
        """feed(): upstream body bytes in the response's framing -> chunked client bytes
        (b"" when nothing is ready); None on bad chunked framing."""
    def end(self) -> bytes | None:
        """finish(): the last chunk(s) and "0\\r\\n\\r\\n"; None after a failure, a second
        call, or when a chunked body has not ended."""

def negotiate_heads(rule: CompressRule, req_head: bytes, resp_head: bytes) -> Encoder | None:
    """Parse both heads (HttpError when malformed, ValueError when incomplete) and negotiate."""

def compress_body(
    rule: CompressRule, req_head: bytes, resp_head: bytes, pieces: list[bytes]
) -> bytes | None:
    """The whole chunked client body; None when not compressed or the upstream body is bad."""
