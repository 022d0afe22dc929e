"""Strict HTTP/1.1 head parser (RFC 9112) for requests and responses.

Errors raise `fastgate.errors.HttpError(status, reason)`:
400 malformed (bad token, obs-fold, space before colon, bare CR/LF, NUL, CL+TE, bad/differing
Content-Length, missing or repeated Host on HTTP/1.1), 414 target too long, 431 head or header
count over the limits, 501 a Transfer-Encoding other than a final lone `chunked`, 505 unknown
version. The parse functions return (None, 0) while the head is incomplete.
CONNECT requests are answered 501 (no forward proxying). Every fault in a response head is 502.
"""

FRAMING_NONE: int
FRAMING_LENGTH: int
FRAMING_CHUNKED: int
FRAMING_CLOSE: int

# HeaderFlag bits, as returned by Head.header_flags()
HF_HOP: int
HF_HOST: int
HF_FORWARDED: int
HF_REQUEST_ID: int
HF_FRAMING: int
HF_EXPECT: int
HF_TRACE: int  # traceparent / tracestate / traceresponse

MAX_HEADERS_CAP: int  # the most header lines any head may have (Limits.max_headers <= this)
RESPONSE_MAX_HEAD_BYTES: int  # response heads have no Limits; a larger one is a 502

# RequestHead.method is one of these very objects for the nine known methods
METHOD_GET: bytes
METHOD_HEAD: bytes
METHOD_POST: bytes
METHOD_PUT: bytes
METHOD_DELETE: bytes
METHOD_PATCH: bytes
METHOD_OPTIONS: bytes
METHOD_CONNECT: bytes
METHOD_TRACE: bytes

class Limits:
    max_head_bytes: int
    max_headers: int
    max_target: int
    def __init__(
        self, max_head_bytes: int = 16384, max_headers: int = 100, max_target: int = 8192
    ) -> None:
        """ValueError unless all are positive and max_headers <= MAX_HEADERS_CAP."""

DEFAULT_LIMITS: Limits

class Head:
    raw: bytes
    version: int
    keep_alive: bool
    framing: int
    content_length: int
    n_headers: int
    upgrade: bytes | None
    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """First value of header `name` (case-insensitive), materialised on demand."""
    def get_all(self, name: bytes) -> list[bytes]: ...
    def headers(self) -> list[tuple[bytes, bytes]]:
        """All (name, value) pairs in order, names as sent."""
    def header_flags(self) -> list[int]:
        """The HF_* bit set of each header, in order (tests, diagnostics)."""
    def header_spans(self) -> list[tuple[int, int, int, int]]:
        """(name start, name end, value start, value end) offsets into `raw` per header."""
    @property
    def start_line_end(self) -> int:
        """Offset of the CRLF that ends the start line."""
    def __len__(self) -> int:
        """The number of header lines (n_headers)."""

class RequestHead(Head):
    method: bytes
    target: bytes
    path: bytes
    query: bytes | None
    host: bytes | None
    expect_continue: bool
    absolute_form: bool
    route: object

class ResponseHead(Head):
    status: int
    reason: bytes

def parse_request(data: bytes, limits: Limits | None = None) -> tuple[RequestHead | None, int]:
    """Parse the request head at the start of `data`; (head, head length) or (None, 0)."""

def parse_response(data: bytes, head_request: bool = False) -> tuple[ResponseHead | None, int]:
    """Parse the response head at the start of `data`; (head, head length) or (None, 0)."""
