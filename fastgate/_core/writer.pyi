"""Head writers for the relay (upstream request head, client response head, error replies)
and the per-request W3C trace context (traceparent upstream, traceresponse back).

The `_`-prefixed functions are the Python entries of the C writers, for tests and tools; the
relay calls the C functions directly.
"""

from fastgate._core.httphead import RequestHead, ResponseHead

class ForwardInfo:
    client_ip: bytes
    proto: bytes
    trusted: bool
    forwarded_header: bool
    def __init__(
        self,
        client_ip: bytes,
        proto: bytes = b"http",
        trusted: bool = False,
        forwarded_header: bool = False,
    ) -> None: ...

class Trace:
    """One request's trace context, as a connection keeps it."""

    @staticmethod
    def begin(head: RequestHead, keep: bool = True, sampled: bool = False) -> Trace:
        """Continue the head's single valid traceparent when `keep`, else start a new trace
        (flags 01 when `sampled`); always a new span id for the gateway's hop."""
    @property
    def state(self) -> int:
        """0 none, 1 continued from the client, 2 started by the gateway."""
    @property
    def continued(self) -> bool: ...
    @property
    def value(self) -> bytes | None:
        """`00-<trace id>-<span id>-<flags>`: traceparent upstream, traceresponse back."""
    @property
    def trace_id(self) -> str: ...
    @property
    def span_id(self) -> str:
        """The gateway's span: the parent id the service receives."""
    @property
    def parent_id(self) -> str:
        """The caller's parent id for a continued trace, else 16 zeros."""
    @property
    def flags(self) -> str: ...

def reason_phrase(status: int) -> str:
    """The standard reason phrase for `status`, "Unknown" when unassigned."""

def _parse_traceparent(value: bytes) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid traceparent value, else None."""

def _trace_seed(seed: bytes) -> None:
    """Reseed this process's trace-id generator (32 bytes)."""

def _build_request_head(
    h: RequestHead,
    fi: ForwardInfo,
    request_id: bytes,
    id_from_client: bool = False,
    extra: bytes | None = None,
    strip: tuple[bytes, ...] | None = None,
    trace: Trace | None = None,
    target: bytes | None = None,
) -> bytes: ...
def _build_response_head(
    h: ResponseHead,
    close: bool = False,
    keep_alive_10: bool = False,
    upgrade: bool = False,
    tail: bytes = b"",
    extra: bytes | None = None,
    strip: tuple[bytes, ...] | None = None,
    request_id: bytes | None = None,
    trace: Trace | None = None,
    chunked: bool = False,
) -> bytes: ...
def _build_error_reply(
    status: int,
    message: str,
    request_id: bytes,
    close: bool = True,
    head_only: bool = False,
    trace: Trace | None = None,
) -> bytes: ...
def _client_request_id(h: RequestHead) -> bytes | None: ...
