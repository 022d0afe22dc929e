"""Access log, audit stream and span records, formatted in C (see accesslog.pyx for the
theory of operation and the rules: redaction, escaping, bounds, dropping instead of waiting).

The line formats are the contract in docs/access-log.md. The connection calls the C API
(accesslog.pxd: AccessLog.select / write); Python builds the objects, takes the batches and
writes them (fastgate/logs).
"""

from collections.abc import Callable, Iterable
from typing import Final

FMT_JSON: Final[int]  # one JSON object per line
FMT_COMMON: Final[int]  # NCSA Common Log Format
FMT_COMBINED: Final[int]  # Common + "referer" "user-agent"

WANT_ACCESS: Final[int]  # AccessLog.select() result bits
WANT_AUDIT: Final[int]
WANT_SPAN: Final[int]
PRE_SERVICE: Final[int]  # LogFields.preescaped bits (json_string values)
PRE_SERVER: Final[int]

SAMPLE_ALL: Final[int]  # 0xFFFFFFFF: the u32 sample threshold that logs every exchange
MAX_LINE: Final[int]  # the longest line (bytes, newline included); a stream keeps this room
MAX_PATH_LOG: Final[int]  # request-target bytes logged, then "..." is appended
MAX_VALUE_LOG: Final[int]  # bytes logged of any other value (user agent, identity, ...)

# stats.RateOutcome: ExchangeRecord.rate
RATE_NONE: Final[int]
RATE_ALLOWED: Final[int]
RATE_FALLBACK: Final[int]
RATE_LIMITED: Final[int]

# stats.DenyEvent: ExchangeRecord.deny, the audit event of a refusal
DENY_NONE: Final[int]
DENY_AUTH_FAILED: Final[int]
DENY_FORBIDDEN: Final[int]
DENY_RATE_LIMITED: Final[int]
DENY_IP: Final[int]
DENY_AUTH_UNAVAILABLE: Final[int]
DENY_EVENTS: Final[dict[int, str]]  # DENY_* -> audit "event" name ("auth_failed", ...)

def sample_threshold(rate: float) -> int:
    """The u32 threshold for a sample rate: 1.0 -> SAMPLE_ALL, 0.0 -> 0, else
    int(rate * 2**32) clamped to 0..SAMPLE_ALL. ValueError for NaN."""

def names_fragment(entrypoint: str, route: str | None = None) -> bytes | None:
    """`"entrypoint":"..","route":".."` escaped as a line holds them (kept per route by the
    connection so the names are not escaped per line); None when over 512 bytes."""

def json_string(value: str) -> bytes:
    """`value` as a JSON string (quotes included), escaped and cut as a line field is: what
    the connection keeps per route / server and passes pre-escaped (PRE_SERVICE,
    PRE_SERVER)."""

def redact_target(target: bytes, redact: Iterable[str] = (), drop_query: bool = False) -> bytes:
    """The request target with its query redacted as the log writes it, before escaping and
    the MAX_PATH_LOG cut (for tests and docs)."""

class LogStream:
    """One stream's batch buffer in one worker: lines are appended in C and taken in
    batches. A line that does not fit is dropped and counted, never waited for."""

    on_ready: Callable[[], object] | None
    """Called once when the pending bytes reach `flush_at` (so the owner schedules a take());
    again only after the next take(). Its exceptions are swallowed."""
    @property
    def lines(self) -> int:
        """Lines accepted since creation."""
    @property
    def dropped(self) -> int:
        """Lines refused since creation: no room in the buffer."""
    @property
    def pending(self) -> int:
        """Bytes waiting for take() (whole lines)."""
    @property
    def capacity(self) -> int:
        """The buffer size in bytes."""
    @property
    def flush_at(self) -> int: ...
    def __init__(self, capacity: int = 1 << 20, flush_at: int = 64 << 10) -> None:
        """ValueError unless capacity >= 2 * MAX_LINE and 0 <= flush_at <= capacity."""
    def take(self) -> bytes:
        """All pending bytes (whole lines; b"" when none); empties the buffer and re-arms
        on_ready."""
    def write_line(self, line: bytes) -> bool:
        """Append one preformatted line (Python-made audit events): it must end with its only
        b"\\n" and be at most MAX_LINE bytes (ValueError). False, counted as dropped, when the
        buffer has no room."""

class AccessLog:
    """One per worker: the streams and the formatting options. The connection asks select()
    which streams want an exchange and then calls write() (C API)."""

    @property
    def access(self) -> LogStream | None: ...
    @property
    def audit(self) -> LogStream | None: ...
    @property
    def spans(self) -> LogStream | None: ...
    @property
    def format(self) -> int:
        """FMT_JSON / FMT_COMMON / FMT_COMBINED, for the access stream."""
    @property
    def sample(self) -> int:
        """u32 sample threshold for exchanges without a route."""
    @property
    def log_errors(self) -> bool:
        """Whether exchanges without a route are logged on status >= 400 (or none) anyway."""
    @property
    def redact(self) -> tuple[bytes, ...]:
        """The redacted query keys, lowercase ASCII."""
    @property
    def drop_query(self) -> bool: ...
    def __init__(
        self,
        access: LogStream | None = None,
        audit: LogStream | None = None,
        spans: LogStream | None = None,
        format: str = "json",
        sample: float = 1.0,
        log_errors: bool = True,
        redact: Iterable[str] = (),
        drop_query: bool = False,
        seed: int | None = None,
    ) -> None:
        """`format`: "json", "common" or "combined"; `sample`: 0.0..1.0; `redact`: query keys
        (ASCII, matched case-insensitively after percent-decoding) whose values are logged as
        REDACTED; `drop_query`: log paths without their query; `seed`: the sampling PRNG's
        seed (tests; os.urandom otherwise). ValueError / TypeError on bad options."""

    # ---- test entry points (tests only: the gateway uses the C API) ----------------------
    def select_fields(
        self, status: int, deny: int, sample: int, errors: bool, sampled: bool
    ) -> int:
        """select() for an exchange of `status` and `deny`: WANT_* bits (tests)."""
    def write_fields(
        self,
        want: int,
        *,
        status: int = 200,
        req_bytes: int = 0,
        resp_bytes: int = 0,
        duration_ns: int = 0,
        upstream_ns: int | None = None,
        rate: int = 0,
        deny: int = 0,
        request_id: bytes | None = None,
        trace_id: bytes | None = None,
        span_id: bytes | None = None,
        parent_span_id: bytes | None = None,
        trace_sampled: bool = False,
        client_ip: bytes | None = None,
        id_method: bytes | None = None,
        id_subject: bytes | None = None,
        id_consumer: bytes | None = None,
        entrypoint: bytes | None = None,
        route: bytes | None = None,
        service: bytes | None = None,
        server: bytes | None = None,
        method: bytes | None = None,
        target: bytes | None = None,
        http_minor: int = 1,
        user_agent: bytes | None = None,
        referer: bytes | None = None,
        tls_version: bytes | None = None,
        deny_source: bytes | None = None,
        deny_reason: bytes | None = None,
        names: bytes | None = None,
        preescaped: int = 0,
    ) -> None:
        """write() of one exchange built from the arguments (tests): None is an absent field;
        `upstream_ns` None means not forwarded; TypeError on an unknown field."""
    def bench_write(self, n: int) -> float:
        """Cost probe (tests): write() a typical access line n times into the access stream,
        emptied in place when full; returns nanoseconds per line."""
