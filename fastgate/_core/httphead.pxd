# The header of the HTTP/1.1 head parser: read this before httphead.pyx.
#
# A head is parsed in two steps, both without Python calls:
#   1. find_head_end(buf, n, start): locate CRLFCRLF, refusing bare LF early;
#   2. parse_request_head / parse_response_head: fill a RequestHead/ResponseHead from the
#      complete head bytes. Errors are returned as -status (400, 414, 431, 501, 505 ...) and the
#      reason is left in `last_error_reason` (a static C string), never raised.
# Header names and values are kept as offsets into `raw`; Python objects are made only when
# someone asks (get(), headers()).

from libc.stdint cimport uint32_t, uint8_t

cdef enum Framing:
    FRAMING_NONE = 0      # no body: request without CL/TE; HEAD response; 1xx/204/304
    FRAMING_LENGTH = 1    # Content-Length bytes follow
    FRAMING_CHUNKED = 2   # chunked transfer coding (the final and only coding)
    FRAMING_CLOSE = 3     # response body delimited by connection close

# Per-header flag bits in Head.flags
cdef enum HeaderFlag:
    HF_HOP = 1            # hop-by-hop: connection, keep-alive, proxy-connection, te, trailer,
                          #   upgrade, proxy-authenticate, proxy-authorization, or named in Connection
    HF_HOST = 2           # host
    HF_FORWARDED = 4      # x-forwarded-for / -proto / -host / -port, forwarded, x-real-ip
    HF_REQUEST_ID = 8     # x-request-id
    HF_FRAMING = 16       # content-length, transfer-encoding
    HF_EXPECT = 32        # expect
    HF_TRACE = 64         # traceparent, tracestate, traceresponse (W3C Trace Context): the
                          #   gateway writes its own, never copies these lines

cdef enum:
    MAX_HEADERS_CAP = 512
    RESPONSE_MAX_HEAD_BYTES = 65536   # responses have no Limits: a bigger head is a 502

cdef const char *last_error_reason

cdef class Limits:
    cdef readonly Py_ssize_t max_head_bytes   # default 16384 -> 431 beyond
    cdef readonly Py_ssize_t max_headers      # default 100   -> 431 beyond
    cdef readonly Py_ssize_t max_target       # default 8192  -> 414 beyond

cdef class Head:
    cdef readonly bytes raw               # the whole head, start line to the final CRLFCRLF
    cdef readonly int version             # 10 or 11
    cdef readonly bint keep_alive         # after Connection: close/keep-alive and version
    cdef readonly int framing             # a Framing value
    cdef readonly long long content_length  # -1 unless framing == FRAMING_LENGTH
    cdef readonly Py_ssize_t n_headers
    cdef Py_ssize_t line_end              # offset of the CRLF that ends the start line
    cdef uint32_t *offs                   # 4 per header: name start, name end, value start,
                                          #   value end (value trimmed of OWS); into raw
    cdef uint8_t *flags                   # n_headers HeaderFlag bit sets (same PyMem block
                                          #   as offs, freed with it in __dealloc__)
    cdef readonly bytes upgrade           # Upgrade value when Connection names upgrade, else None
    cdef Py_ssize_t find(self, const char *name, Py_ssize_t nlen)   # index or -1; name lowercase

cdef class RequestHead(Head):
    cdef readonly bytes method            # interned for the known methods (b"GET" is b"GET")
    cdef readonly bytes target            # request-target as sent
    cdef readonly bytes path              # origin path (absolute-form reduced to its path)
    cdef readonly bytes query             # after '?', without it; None when absent
    cdef readonly bytes host              # Host value (or absolute-form authority); None if absent
    cdef readonly bint expect_continue    # Expect: 100-continue
    cdef readonly bint absolute_form
    cdef public object route              # set by the connection after routing

cdef class ResponseHead(Head):
    cdef readonly int status
    cdef readonly bytes reason

# Returns the offset just past CRLFCRLF when the head is complete, 0 when more bytes are
# needed, -400 on a bare LF or NUL seen before the end. `start` is where the previous call
# stopped looking, so a head dribbled byte by byte is scanned once (O(n) overall).
cdef Py_ssize_t find_head_end(const char *buf, Py_ssize_t n, Py_ssize_t start) noexcept nogil

# Parse buf[0:head_len] (head_len from find_head_end) into h. 0 on success, -status on error.
# `raw` must end with CRLFCRLF; limits None means DEFAULT_LIMITS. -500 only when memory runs
# out. After an error h is unspecified: drop it. h may be reused (its old offsets are freed).
cdef int parse_request_head(RequestHead h, bytes raw, Limits limits) noexcept
# head_request: the request was HEAD (its response has no body whatever it says).
# Every fault is -502 (limits: RESPONSE_MAX_HEAD_BYTES bytes, MAX_HEADERS_CAP lines).
cdef int parse_response_head(ResponseHead h, bytes raw, bint head_request) noexcept

cdef Limits DEFAULT_LIMITS

# The interned methods: RequestHead.method is one of these very objects for the nine known
# methods (exact, case-sensitive spelling), so `h.method is METHOD_GET` is a valid test.
cdef bytes METHOD_GET, METHOD_HEAD, METHOD_POST, METHOD_PUT, METHOD_DELETE
cdef bytes METHOD_PATCH, METHOD_OPTIONS, METHOD_CONNECT, METHOD_TRACE

# Header i's name (offsets `off` = Head.offs + 4*i into `raw`) equals `lower` (n bytes,
# lowercase), compared case-insensitively. For writers and checks that look for one name.
cdef inline bint header_name_is(const char *raw, const uint32_t *off, const char *lower,
                                Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef char c
    if <Py_ssize_t>(off[1] - off[0]) != n:
        return False
    for i in range(n):
        c = raw[off[0] + i]
        if c >= 65 and c <= 90:
            c = c + 32
        if c != lower[i]:
            return False
    return True
