# Head writers: one C pass from a parsed head to the bytes sent on the next hop.

from libc.stdint cimport uint8_t

from fastgate._core.httphead cimport RequestHead, ResponseHead

# W3C Trace Context (https://www.w3.org/TR/trace-context/). Per request the connection keeps
# one TraceCtx: the traceparent value the gateway sends upstream, already formatted, so the
# writers only copy it. It is also the `traceresponse` value (Trace Context Level 2) sent back
# to the client: the same trace id and the gateway's own span id.
cdef enum TraceState:
    TRACE_NONE = 0        # no request head yet: no traceparent / traceresponse written
    TRACE_CONTINUED = 1   # the client's valid traceparent: its trace id and flags kept
    TRACE_STARTED = 2     # absent, invalid or not trusted: a new random trace id

cdef enum TrustMode:      # forwarded.trust_trace_context / trust_request_id
    TRUST_ALWAYS = 0      # keep a valid incoming value from anyone
    TRUST_TRUSTED = 1     # only from forwarded.trusted_ips
    TRUST_NEVER = 2       # always make our own

cdef enum:
    TRACEPARENT_LEN = 55  # "00-" 32 hex "-" 16 hex "-" 2 hex

cdef struct TraceCtx:
    char value[55]        # "00-<trace id>-<gateway span id>-<flags>", lowercase hex
    char parent[16]       # the caller's parent id (TRACE_CONTINUED), else "0" * 16
    uint8_t state         # a TraceState

# Parse a traceparent value (already trimmed of OWS): 0 and t.value's trace id / flags and
# t.parent filled when valid, -1 otherwise (t untouched then). Version 00 must be exactly 55
# characters; a higher version (not ff) is read as 00 when the 00 fields are followed by the
# end or '-', and only its sampled flag is kept (we send version 00).
cdef int parse_traceparent(const uint8_t *p, Py_ssize_t n, TraceCtx *t) noexcept nogil

# Start the request's trace: continue the client's single valid traceparent when `keep`,
# else a new trace id (flags 01 when `sampled`, else 00); always a new span id for our hop.
cdef void trace_begin(TraceCtx *t, RequestHead h, bint keep, bint sampled) noexcept

# Reseed the trace-id generator (xoshiro256**, per process) from 32 bytes (os.urandom(32)).
cdef void trace_seed(bytes seed)

# t.value as bytes (the traceresponse / traceparent value), None when t.state is TRACE_NONE.
cdef bytes trace_value(const TraceCtx *t)

# Whether an incoming value is kept under `mode` from a peer that is (not) trusted.
cdef inline bint trust_allows(int mode, bint trusted) noexcept nogil:
    return mode == TRUST_ALWAYS or (mode == TRUST_TRUSTED and trusted)

cdef class Trace:
    # A TraceCtx held by a Python object (tests, tools).
    cdef TraceCtx ctx

cdef class ForwardInfo:
    # Per client connection, computed once at accept: who is on the other end.
    cdef readonly bytes client_ip      # textual address of the peer
    cdef readonly bytes proto          # b"http" or b"https"
    cdef readonly bint trusted         # the peer is a trusted proxy: keep its X-Forwarded-*
    cdef readonly bint forwarded_header  # also emit RFC 7239 Forwarded

# Upstream request head: request line (origin-form, HTTP/1.1 or HTTP/1.0 for a 1.0 client),
# end-to-end headers as sent, hop-by-hop and Connection-named ones dropped, untrusted
# X-Forwarded-*/Forwarded dropped, then X-Forwarded-For/-Proto/-Host, optional Forwarded,
# X-Request-ID (exactly one: `request_id`, which is the client's when it was kept; client
# X-Request-ID lines are never copied), traceparent (exactly one: `trace.value`) and, for a
# continued trace, the client's tracestate lines joined into one when valid (<= 512 bytes,
# printable ASCII), Connection/Upgrade for an upgrade, `extra`. Incoming traceparent /
# tracestate / traceresponse lines are never copied.
# Headers named in `strip` (lowercase bytes) are dropped: the middlewares own those names.
# `target` (origin-form, already validated) replaces the request-target (path rewriting).
cdef bytes build_request_head(RequestHead h, ForwardInfo fi, bytes request_id,
                              bint id_from_client, bytes extra, tuple strip=*,
                              const TraceCtx *trace=*, bytes target=*)

# Client response head: status line as sent, hop-by-hop headers dropped (kept for a 101
# upgrade), `Connection: close` when `close`, `Connection: keep-alive` for an HTTP/1.0 client
# kept alive; `tail` bytes (the start of the body) appended so head and a small body leave in
# one write. Headers named in `strip` (lowercase) are dropped and `extra` lines added: what the
# route's middlewares set on responses (security headers). With `request_id` the upstream's
# X-Request-ID lines are replaced by ours; with a `trace` its traceresponse lines are replaced
# by ours (the client sees one of each). `chunked`: the body is re-framed by the relay
# (compression): the service's framing lines are dropped for `Transfer-Encoding: chunked`.
cdef bytes build_response_head(ResponseHead h, bint close, bint keep_alive_10, bint upgrade,
                               const char *tail, Py_ssize_t tail_len, bytes extra=*,
                               tuple strip=*, bytes request_id=*, const TraceCtx *trace=*,
                               bint chunked=*)

# A gateway-generated reply: short JSON {"error": ..., "request_id": ...}, with X-Request-ID
# and (given a started trace) traceresponse headers.
cdef bytes build_error_reply(int status, str message, bytes request_id, bint close,
                             bint head_only, const TraceCtx *trace=*)

# The request id to keep from the client, or None when absent or not a safe token.
cdef bytes client_request_id(RequestHead h)
