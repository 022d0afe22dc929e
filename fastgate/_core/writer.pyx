# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Head writers for the relay.

Theory of operation: the parser left every header as four offsets into the raw head plus a
flag byte (httphead.pxd). Writing the next hop's head is then a sequence of memcpy calls from
`raw` into one preallocated bytes object: the size is bounded by len(raw) plus the lines we add,
so we allocate once, fill, and shrink with _PyBytes_Resize. No Python object is made per header.

Rules applied (RFC 9110 §7.6.1 hop-by-hop, §7.6.2 Via is not added; RFC 9112 §9.6 close):
- headers flagged HF_HOP (the standard list and any named in Connection) are not forwarded;
- X-Forwarded-* / Forwarded / X-Real-IP from an untrusted peer are dropped and replaced;
  from a trusted proxy the incoming X-Forwarded-For chain is extended with the peer address;
- absolute-form targets become origin-form and Host is rewritten to the target's authority
  (RFC 9112 §3.2.2);
- an HTTP/1.0 client's request goes upstream as HTTP/1.0 with `Connection: keep-alive`, so the
  response cannot be chunked (a 1.0 client could not read it).

Request ids and trace context (W3C Trace Context Level 1; `traceresponse` from Level 2):
- exactly one X-Request-ID and one traceparent go upstream, both ours (the client's values
  only when they were valid and trusted, decided before we are called); client lines are never
  copied, so a second, invalid or untrusted value cannot reach the service;
- tracestate is passed on (joined into one line) only for a continued trace and only when it is
  at most 512 bytes of printable ASCII; otherwise it is dropped (the spec: no tracestate
  without a valid traceparent);
- every response to the client carries our X-Request-ID and traceresponse; an upstream's own
  lines of those names are dropped;
- trace and span ids come from xoshiro256** seeded from os.urandom per worker: unique, not
  secret (they are sent in clear to both sides anyway).
"""

from http import HTTPStatus

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from libc.string cimport memcpy, memset
from libc.stdint cimport uint8_t, uint32_t

from fastgate._core.httphead cimport (
    Head, RequestHead, ResponseHead, header_name_is, HF_HOP, HF_HOST, HF_FORWARDED, HF_REQUEST_ID, HF_FRAMING,
    HF_TRACE, FRAMING_LENGTH, FRAMING_CHUNKED,
)
from libc.stdint cimport uint64_t
import os

from cpython.ref cimport Py_DECREF

cdef extern from "Python.h":
    # Raw-pointer forms: the head is written into a fresh bytes object and shrunk in place,
    # which needs the only reference to it (so no Python variable may hold it meanwhile).
    PyObject *new_bytes "PyBytes_FromStringAndSize"(const char *s, Py_ssize_t n) except NULL
    char *bytes_buffer "PyBytes_AS_STRING"(PyObject *b)
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize) except -1


cdef inline bytes finish(PyObject *tmp, Py_ssize_t size):
    """Shrink the raw bytes object to `size` and hand its reference to Python."""
    _PyBytes_Resize(&tmp, size)
    cdef bytes r = <bytes>tmp
    Py_DECREF(r)
    return r


cdef class ForwardInfo:
    def __init__(self, bytes client_ip, bytes proto=b"http", bint trusted=False,
                 bint forwarded_header=False):
        self.client_ip = client_ip
        self.proto = proto
        self.trusted = trusted
        self.forwarded_header = forwarded_header


cdef inline char *put(char *o, const char *s, Py_ssize_t n) noexcept:
    memcpy(o, s, n)
    return o + n


cdef inline char *put_bytes(char *o, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(o, PyBytes_AS_STRING(b), n)
    return o + n


cdef inline char *put_framing(char *o, Head h) noexcept:
    """The one framing line we send: the message's framing as we parsed it. Duplicate or empty
    Content-Length / Transfer-Encoding lines that we accepted are never passed on, so the next
    hop cannot read a different framing than we did (request smuggling)."""
    cdef char digits[24]
    cdef int n = 0
    cdef long long v = h.content_length
    if h.framing == FRAMING_CHUNKED:
        return put(o, "Transfer-Encoding: chunked\r\n", 28)
    o = put(o, "Content-Length: ", 16)
    if v == 0:
        digits[0] = b'0'
        n = 1
    while v > 0:
        digits[n] = <char>(48 + v % 10)
        v //= 10
        n += 1
    while n > 0:
        n -= 1
        o[0] = digits[n]
        o += 1
    return put(o, "\r\n", 2)


# ---------------------------------------------------------------------------------------------
# Trace context: ids, parser, the per-request TraceCtx

cdef uint64_t _rng[4]
cdef uint8_t _LHEX[256]         # 1 for the 16 lowercase hex digits (the spec allows no others)


cdef void _init_lhex() noexcept:
    cdef int c
    for c in range(256):
        _LHEX[c] = (c >= 48 and c <= 57) or (c >= 97 and c <= 102)


_init_lhex()


cdef inline uint64_t _rotl(uint64_t x, int k) noexcept nogil:
    return (x << k) | (x >> (64 - k))


cdef inline uint64_t _next64() noexcept nogil:
    # xoshiro256** (Blackman & Vigna): fast, 256-bit state, passes BigCrush. Not a CSPRNG:
    # trace ids are identifiers, never secrets.
    cdef uint64_t r = _rotl(_rng[1] * 5, 7) * 9
    cdef uint64_t t = _rng[1] << 17
    _rng[2] ^= _rng[0]
    _rng[3] ^= _rng[1]
    _rng[1] ^= _rng[2]
    _rng[0] ^= _rng[3]
    _rng[2] ^= t
    _rng[3] = _rotl(_rng[3], 45)
    return r


cdef void trace_seed(bytes seed):
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(seed)
    cdef int i
    if PyBytes_GET_SIZE(seed) < 32:
        raise ValueError("trace_seed needs 32 bytes")
    for i in range(4):
        memcpy(&_rng[i], p + 8 * i, 8)
    if _rng[0] == 0 and _rng[1] == 0 and _rng[2] == 0 and _rng[3] == 0:
        _rng[0] = 1                 # the one state xoshiro cannot leave


trace_seed(os.urandom(32))


cdef inline void _put_hex32(char *o, uint64_t v) noexcept nogil:
    # SWAR: the 8 nibbles of the low 32 bits of v spread one per byte, then each byte made a
    # lowercase hex digit ('0' + n, plus 39 more for n >= 10). The nibble order is permuted,
    # which does not matter for random bits (and keeps a non-zero value non-zero).
    v &= 0xFFFFFFFFULL
    v = (v | (v << 16)) & 0x0000FFFF0000FFFFULL
    v = (v | (v << 8)) & 0x00FF00FF00FF00FFULL
    v = (v | (v << 4)) & 0x0F0F0F0F0F0F0F0FULL
    v += 0x3030303030303030ULL + (((v + 0x0606060606060606ULL) >> 4) & 0x0101010101010101ULL) * 0x27
    memcpy(o, &v, 8)


cdef inline void _put_hex64(char *o, uint64_t v) noexcept nogil:
    """16 lowercase hex digits for the random value v (not its big-endian spelling)."""
    _put_hex32(o, v)
    _put_hex32(o + 8, v >> 32)


cdef inline uint64_t _nonzero64() noexcept nogil:
    # All-zero trace and span ids are invalid; one draw in 2**64 is zero.
    cdef uint64_t v = _next64()
    while v == 0:
        v = _next64()
    return v


cdef inline bint _lhex_run(const uint8_t *p, Py_ssize_t n, bint *nonzero) noexcept nogil:
    cdef Py_ssize_t i
    cdef bint nz = False
    for i in range(n):
        if not _LHEX[p[i]]:
            return False
        if p[i] != 48:
            nz = True
    nonzero[0] = nz
    return True


cdef int parse_traceparent(const uint8_t *p, Py_ssize_t n, TraceCtx *t) noexcept nogil:
    cdef bint nz
    cdef uint8_t fl
    if n < TRACEPARENT_LEN:
        return -1
    if not _LHEX[p[0]] or not _LHEX[p[1]] or (p[0] == b'f' and p[1] == b'f'):
        return -1                       # version: two lowercase hex digits, ff is invalid
    if p[2] != b'-' or p[35] != b'-' or p[52] != b'-':
        return -1
    if not _lhex_run(p + 3, 32, &nz) or not nz:
        return -1                       # trace id: 32 lowercase hex, not all zero
    if not _lhex_run(p + 36, 16, &nz) or not nz:
        return -1                       # parent id: 16 lowercase hex, not all zero
    if not _LHEX[p[53]] or not _LHEX[p[54]]:
        return -1
    if p[0] == b'0' and p[1] == b'0':
        if n != TRACEPARENT_LEN:
            return -1                   # version 00 has exactly these fields
        memcpy(t.value + 53, p + 53, 2)
    else:
        if n > TRACEPARENT_LEN and p[55] != b'-':
            return -1                   # a future version: the 00 fields, then '-' or the end
        # Its other flag bits may mean something else: keep only "sampled" (bit 0).
        fl = (p[54] - 48) if p[54] <= b'9' else (p[54] - 87)
        t.value[53] = b'0'
        t.value[54] = b'1' if fl & 1 else b'0'
    memcpy(t.value + 3, p + 3, 32)
    memcpy(t.parent, p + 36, 16)
    return 0


cdef void trace_begin(TraceCtx *t, RequestHead h, bint keep, bint sampled) noexcept:
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef const uint32_t *off
    cdef Py_ssize_t i, found = -1
    t.state = TRACE_STARTED
    if keep:
        for i in range(h.n_headers):
            if h.flags[i] & HF_TRACE:
                off = h.offs + 4 * i
                if header_name_is(raw, off, "traceparent", 11):
                    if found >= 0:
                        found = -2              # two traceparent lines: neither is believed
                        break
                    found = i
        if found >= 0:
            off = h.offs + 4 * found
            if parse_traceparent(<const uint8_t *>raw + off[2], off[3] - off[2], t) == 0:
                t.state = TRACE_CONTINUED
    if t.state == TRACE_STARTED:
        _put_hex64(t.value + 3, _nonzero64())
        _put_hex64(t.value + 19, _next64())
        t.value[53] = b'0'
        t.value[54] = b'1' if sampled else b'0'
        memset(t.parent, 48, 16)
    t.value[0] = b'0'
    t.value[1] = b'0'
    t.value[2] = b'-'
    t.value[35] = b'-'
    _put_hex64(t.value + 36, _nonzero64())
    t.value[52] = b'-'


cdef bytes trace_value(const TraceCtx *t):
    if t == NULL or t.state == TRACE_NONE:
        return None
    return PyBytes_FromStringAndSize(t.value, TRACEPARENT_LEN)


cdef inline char *put_trace_line(char *o, const char *name, Py_ssize_t nlen,
                                 const TraceCtx *t) noexcept:
    o = put(o, name, nlen)
    o = put(o, t.value, TRACEPARENT_LEN)
    return put(o, "\r\n", 2)


cdef Py_ssize_t tracestate_size(const char *raw, RequestHead h) noexcept:
    """Joined size of the request's tracestate lines (non-empty ones, ',' between), or -1 when
    they are not to be passed on: over 512 bytes, or a byte outside printable ASCII."""
    cdef Py_ssize_t i, j, total = 0
    cdef const uint32_t *off
    cdef uint8_t c
    for i in range(h.n_headers):
        if h.flags[i] & HF_TRACE:
            off = h.offs + 4 * i
            if not header_name_is(raw, off, "tracestate", 10) or off[3] == off[2]:
                continue
            for j in range(off[2], off[3]):
                c = <uint8_t>raw[j]
                if c < 0x20 or c > 0x7e:
                    return -1
            total += (off[3] - off[2]) + (1 if total else 0)
            if total > 512:
                return -1
    return total


cdef char *put_tracestate(char *o, const char *raw, RequestHead h) noexcept:
    cdef Py_ssize_t i
    cdef const uint32_t *off
    cdef bint first = True
    o = put(o, "tracestate: ", 12)
    for i in range(h.n_headers):
        if h.flags[i] & HF_TRACE:
            off = h.offs + 4 * i
            if not header_name_is(raw, off, "tracestate", 10) or off[3] == off[2]:
                continue
            if not first:
                o[0] = b','
                o += 1
            first = False
            o = put(o, raw + off[2], off[3] - off[2])
    return put(o, "\r\n", 2)


cdef class Trace:
    """A TraceCtx as a Python object: `Trace.begin(head)` runs what a connection runs per
    request; the properties read it back (tests and tools)."""

    @staticmethod
    def begin(RequestHead head, bint keep=True, bint sampled=False):
        cdef Trace t = Trace.__new__(Trace)
        trace_begin(&t.ctx, head, keep, sampled)
        return t

    @property
    def state(self):
        return self.ctx.state

    @property
    def continued(self):
        return self.ctx.state == TRACE_CONTINUED

    @property
    def value(self):
        """The traceparent sent upstream (and the traceresponse sent back), as bytes."""
        return trace_value(&self.ctx)

    @property
    def trace_id(self):
        return PyBytes_FromStringAndSize(self.ctx.value + 3, 32).decode()

    @property
    def span_id(self):
        return PyBytes_FromStringAndSize(self.ctx.value + 36, 16).decode()

    @property
    def parent_id(self):
        return PyBytes_FromStringAndSize(self.ctx.parent, 16).decode()

    @property
    def flags(self):
        return PyBytes_FromStringAndSize(self.ctx.value + 53, 2).decode()


def _parse_traceparent(bytes value not None):
    """(trace id, parent id, flags) as str for a valid traceparent value, else None."""
    cdef TraceCtx t
    if parse_traceparent(<const uint8_t *>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
                         &t) != 0:
        return None
    return (PyBytes_FromStringAndSize(t.value + 3, 32).decode(),
            PyBytes_FromStringAndSize(t.parent, 16).decode(),
            PyBytes_FromStringAndSize(t.value + 53, 2).decode())


def _trace_seed(bytes seed not None):
    trace_seed(seed)


cdef inline bint is_stripped(const char *raw, const uint32_t *off, tuple strip):
    """Header `off` is one of `strip` (lowercase names): the route's middlewares own it."""
    cdef bytes name
    for name in strip:
        if header_name_is(raw, off, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)):
            return True
    return False


cdef bytes build_request_head(RequestHead h, ForwardInfo fi, bytes request_id,
                              bint id_from_client, bytes extra, tuple strip=None,
                              const TraceCtx *trace=NULL, bytes target=None):
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef Py_ssize_t cap, i
    cdef bint has_tracestate = False
    cdef uint32_t *off
    cdef uint8_t fl
    cdef bint have_xff = False
    cdef bytes host = h.host
    cdef char *o
    cdef char *start
    cdef PyObject *tmp

    # Upper bound: the raw head, plus our own lines (each bounded by its inputs).
    cap = (PyBytes_GET_SIZE(h.raw) + 256 + 80 + 2 * PyBytes_GET_SIZE(fi.client_ip)
           + 2 * (PyBytes_GET_SIZE(host) if host is not None else 0)
           + PyBytes_GET_SIZE(request_id)
           + (PyBytes_GET_SIZE(h.upgrade) if h.upgrade is not None else 0)
           + (PyBytes_GET_SIZE(extra) if extra is not None else 0)
           + (PyBytes_GET_SIZE(target) if target is not None else 0))
    tmp = new_bytes(NULL, cap)
    o = start = bytes_buffer(tmp)

    # Request line in origin-form.
    o = put_bytes(o, h.method)
    o[0] = b' '
    o += 1
    if target is not None:
        o = put_bytes(o, target)
    elif h.absolute_form:
        o = put_bytes(o, h.path)
        if h.query is not None:
            o[0] = b'?'
            o = put_bytes(o + 1, h.query)
    else:
        o = put_bytes(o, h.target)
    if h.version == 10:
        o = put(o, " HTTP/1.0\r\n", 11)
    else:
        o = put(o, " HTTP/1.1\r\n", 11)

    # X-Forwarded-For from a trusted proxy: the incoming chain, extended below.
    if fi.trusted:
        for i in range(h.n_headers):
            off = h.offs + 4 * i
            if (h.flags[i] & HF_FORWARDED) and header_name_is(raw, off, "x-forwarded-for", 15):
                if have_xff:
                    o = put(o, ", ", 2)
                else:
                    o = put(o, "X-Forwarded-For: ", 17)
                    have_xff = True
                o = put(o, raw + off[2], off[3] - off[2])
    if have_xff:
        o = put(o, ", ", 2)
    else:
        o = put(o, "X-Forwarded-For: ", 17)
    o = put_bytes(o, fi.client_ip)
    o = put(o, "\r\n", 2)

    for i in range(h.n_headers):
        fl = h.flags[i]
        off = h.offs + 4 * i
        if fl & HF_HOP:
            continue
        if fl & HF_FORWARDED:
            # Trusted: keep proto/host/port as the proxy in front said; the XFF chain is done.
            if not fi.trusted or header_name_is(raw, off, "x-forwarded-for", 15):
                continue
        if fl & HF_REQUEST_ID:
            # Written once below: the client's kept id or ours. Copying the client's lines
            # would pass on extra ids, and ones that failed the token check.
            continue
        if fl & HF_TRACE:
            # traceparent is written once below (ours); tracestate joined there if kept.
            has_tracestate = True
            continue
        if (fl & HF_HOST) and h.absolute_form:
            continue
        if fl & HF_FRAMING:
            continue
        if strip is not None and is_stripped(raw, off, strip):
            continue
        o = put(o, raw + off[0], off[1] - off[0])
        o = put(o, ": ", 2)
        o = put(o, raw + off[2], off[3] - off[2])
        o = put(o, "\r\n", 2)

    if h.framing == FRAMING_LENGTH or h.framing == FRAMING_CHUNKED:
        o = put_framing(o, h)
    if h.absolute_form and host is not None:
        o = put(o, "Host: ", 6)
        o = put_bytes(o, host)
        o = put(o, "\r\n", 2)
    if not fi.trusted or h.find("x-forwarded-proto", 17) < 0:
        o = put(o, "X-Forwarded-Proto: ", 19)
        o = put_bytes(o, fi.proto)
        o = put(o, "\r\n", 2)
    if host is not None and (not fi.trusted or h.find("x-forwarded-host", 16) < 0):
        o = put(o, "X-Forwarded-Host: ", 18)
        o = put_bytes(o, host)
        o = put(o, "\r\n", 2)
    if fi.forwarded_header:
        o = put(o, "Forwarded: for=", 15)
        if b":" in fi.client_ip:
            o = put(o, "\"[", 2)
            o = put_bytes(o, fi.client_ip)
            o = put(o, "]\"", 2)
        else:
            o = put_bytes(o, fi.client_ip)
        o = put(o, ";proto=", 7)
        o = put_bytes(o, fi.proto)
        if host is not None:
            o = put(o, ";host=\"", 7)
            o = put_bytes(o, host)
            o = put(o, "\"", 1)
        o = put(o, "\r\n", 2)
    o = put(o, "X-Request-ID: ", 14)
    o = put_bytes(o, request_id)
    o = put(o, "\r\n", 2)
    if trace != NULL and trace.state != TRACE_NONE:
        o = put_trace_line(o, "traceparent: ", 13, trace)
        # The tracestate lines are within raw, so the cap above already covers them joined.
        if (has_tracestate and trace.state == TRACE_CONTINUED
                and tracestate_size(raw, h) > 0):
            o = put_tracestate(o, raw, h)
    if h.upgrade is not None:
        o = put(o, "Connection: upgrade\r\nUpgrade: ", 30)
        o = put_bytes(o, h.upgrade)
        o = put(o, "\r\n", 2)
    elif h.version == 10:
        o = put(o, "Connection: keep-alive\r\n", 24)
    if extra is not None:
        o = put_bytes(o, extra)
    o = put(o, "\r\n", 2)

    return finish(tmp, o - start)


cdef bytes build_response_head(ResponseHead h, bint close, bint keep_alive_10, bint upgrade,
                               const char *tail, Py_ssize_t tail_len, bytes extra=None,
                               tuple strip=None, bytes request_id=None,
                               const TraceCtx *trace=NULL, bint chunked=False):
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef Py_ssize_t i
    cdef uint32_t *off
    cdef char *o
    cdef char *start
    cdef PyObject *tmp
    cdef bint with_trace = trace != NULL and trace.state != TRACE_NONE
    cdef Py_ssize_t cap = (PyBytes_GET_SIZE(h.raw) + 128 + 96 + tail_len
                           + (PyBytes_GET_SIZE(extra) if extra is not None else 0)
                           + (PyBytes_GET_SIZE(request_id) if request_id is not None else 0))
    cdef bint normalize

    tmp = new_bytes(NULL, cap)
    o = start = bytes_buffer(tmp)
    o = put(o, raw, h.line_end + 2)
    # Framing lines are rewritten only for a message with a body (HEAD, 204 and 304 responses
    # keep their Content-Length as the origin sent it: it describes the resource).
    normalize = h.framing == FRAMING_LENGTH or h.framing == FRAMING_CHUNKED or chunked
    for i in range(h.n_headers):
        if (h.flags[i] & HF_HOP) and not upgrade:
            continue
        if normalize and (h.flags[i] & HF_FRAMING):
            continue
        if (h.flags[i] & HF_REQUEST_ID) and request_id is not None:
            continue                        # ours replaces the service's (one per response)
        off = h.offs + 4 * i
        if ((h.flags[i] & HF_TRACE) and with_trace
                and header_name_is(raw, off, "traceresponse", 13)):
            continue
        if strip is not None and is_stripped(raw, off, strip):
            continue
        o = put(o, raw + off[0], off[1] - off[0])
        o = put(o, ": ", 2)
        o = put(o, raw + off[2], off[3] - off[2])
        o = put(o, "\r\n", 2)
    if chunked:
        o = put(o, "Transfer-Encoding: chunked\r\n", 28)
    elif normalize:
        o = put_framing(o, h)
    if request_id is not None:
        o = put(o, "X-Request-ID: ", 14)
        o = put_bytes(o, request_id)
        o = put(o, "\r\n", 2)
    if with_trace:
        o = put_trace_line(o, "traceresponse: ", 15, trace)
    if extra is not None:
        o = put_bytes(o, extra)
    if not upgrade:
        if close:
            o = put(o, "Connection: close\r\n", 19)
        elif keep_alive_10:
            o = put(o, "Connection: keep-alive\r\n", 24)
    o = put(o, "\r\n", 2)
    if tail_len:
        o = put(o, tail, tail_len)
    return finish(tmp, o - start)


cdef dict REASONS = {
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def reason_phrase(int status):
    """The standard reason phrase for `status` (RFC 9110 §15), "Unknown" when unassigned."""
    phrase = REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
    return phrase


cdef bytes build_error_reply(int status, str message, bytes request_id, bint close,
                             bint head_only, const TraceCtx *trace=NULL):
    # Error replies are rare; clarity over speed. The message is ours (never client input),
    # the request id is a checked token, so no JSON escaping is needed beyond quotes.
    cdef bytes body = (
        b'{"error":"' + message.replace('"', "'").encode() + b'","request_id":"'
        + (request_id or b"") + b'"}\n'
    )
    cdef bytes ids = b"X-Request-ID: " + request_id + b"\r\n" if request_id else b""
    cdef bytes tv = trace_value(trace)
    if tv is not None:
        ids += b"traceresponse: " + tv + b"\r\n"
    cdef bytes head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store\r\n%s%s\r\n"
        % (status, reason_phrase(status).encode(), len(body), ids,
           b"Connection: close\r\n" if close else b"")
    )
    if head_only:
        return head
    return head + body


cdef inline bint id_char(uint8_t c) noexcept:
    return ((c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122)
            or c == 45 or c == 46 or c == 95 or c == 58)


cdef bytes client_request_id(RequestHead h):
    cdef Py_ssize_t i, j, n
    cdef uint32_t *off
    cdef const uint8_t *raw = <const uint8_t *>PyBytes_AS_STRING(h.raw)
    for i in range(h.n_headers):
        if h.flags[i] & HF_REQUEST_ID:
            off = h.offs + 4 * i
            n = off[3] - off[2]
            if n < 1 or n > 128:
                return None
            for j in range(n):
                if not id_char(raw[off[2] + j]):
                    return None
            return PyBytes_FromStringAndSize(<const char *>raw + off[2], n)
    return None


def _build_request_head(RequestHead h, ForwardInfo fi, bytes request_id,
                        bint id_from_client=False, bytes extra=None, tuple strip=None,
                        Trace trace=None, bytes target=None):
    """Python entry for tests: the upstream head for `h` as the relay would send it."""
    return build_request_head(h, fi, request_id, id_from_client, extra, strip,
                              &trace.ctx if trace is not None else NULL, target)


def _build_response_head(ResponseHead h, bint close=False, bint keep_alive_10=False,
                         bint upgrade=False, bytes tail=b"", bytes extra=None, tuple strip=None,
                         bytes request_id=None, Trace trace=None, bint chunked=False):
    """Python entry for tests: the client response head as the relay would send it."""
    return build_response_head(h, close, keep_alive_10, upgrade, PyBytes_AS_STRING(tail),
                               PyBytes_GET_SIZE(tail), extra, strip, request_id,
                               &trace.ctx if trace is not None else NULL, chunked)


def _build_error_reply(int status, str message, bytes request_id, bint close=True,
                       bint head_only=False, Trace trace=None):
    """Python entry for tests and the admin listener."""
    return build_error_reply(status, message, request_id, close, head_only,
                             &trace.ctx if trace is not None else NULL)


def _client_request_id(RequestHead h):
    return client_request_id(h)
