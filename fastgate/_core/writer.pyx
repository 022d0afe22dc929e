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
"""

from http import HTTPStatus

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint32_t

from fastgate._core.httphead cimport (
    Head, RequestHead, ResponseHead, header_name_is, HF_HOP, HF_HOST, HF_FORWARDED, HF_REQUEST_ID, HF_FRAMING,
    FRAMING_LENGTH, FRAMING_CHUNKED,
)

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


cdef inline bint is_stripped(const char *raw, const uint32_t *off, tuple strip):
    """Header `off` is one of `strip` (lowercase names): the route's middlewares own it."""
    cdef bytes name
    for name in strip:
        if header_name_is(raw, off, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)):
            return True
    return False


cdef bytes build_request_head(RequestHead h, ForwardInfo fi, bytes request_id,
                              bint id_from_client, bytes extra, tuple strip=None):
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef Py_ssize_t cap, i
    cdef uint32_t *off
    cdef uint8_t fl
    cdef bint have_xff = False
    cdef bytes host = h.host
    cdef char *o
    cdef char *start
    cdef PyObject *tmp

    # Upper bound: the raw head, plus our own lines (each bounded by its inputs).
    cap = (PyBytes_GET_SIZE(h.raw) + 256 + 2 * PyBytes_GET_SIZE(fi.client_ip)
           + 2 * (PyBytes_GET_SIZE(host) if host is not None else 0)
           + PyBytes_GET_SIZE(request_id)
           + (PyBytes_GET_SIZE(h.upgrade) if h.upgrade is not None else 0)
           + (PyBytes_GET_SIZE(extra) if extra is not None else 0))
    tmp = new_bytes(NULL, cap)
    o = start = bytes_buffer(tmp)

    # Request line in origin-form.
    o = put_bytes(o, h.method)
    o[0] = b' '
    o += 1
    if h.absolute_form:
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
                               tuple strip=None):
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef Py_ssize_t i
    cdef uint32_t *off
    cdef char *o
    cdef char *start
    cdef PyObject *tmp
    cdef Py_ssize_t cap = (PyBytes_GET_SIZE(h.raw) + 128 + tail_len
                           + (PyBytes_GET_SIZE(extra) if extra is not None else 0))
    cdef bint normalize

    tmp = new_bytes(NULL, cap)
    o = start = bytes_buffer(tmp)
    o = put(o, raw, h.line_end + 2)
    # Framing lines are rewritten only for a message with a body (HEAD, 204 and 304 responses
    # keep their Content-Length as the origin sent it: it describes the resource).
    normalize = h.framing == FRAMING_LENGTH or h.framing == FRAMING_CHUNKED
    for i in range(h.n_headers):
        if (h.flags[i] & HF_HOP) and not upgrade:
            continue
        if normalize and (h.flags[i] & HF_FRAMING):
            continue
        off = h.offs + 4 * i
        if strip is not None and is_stripped(raw, off, strip):
            continue
        o = put(o, raw + off[0], off[1] - off[0])
        o = put(o, ": ", 2)
        o = put(o, raw + off[2], off[3] - off[2])
        o = put(o, "\r\n", 2)
    if normalize:
        o = put_framing(o, h)
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
                             bint head_only):
    # Error replies are rare; clarity over speed. The message is ours (never client input),
    # the request id is a checked token, so no JSON escaping is needed beyond quotes.
    cdef bytes body = (
        b'{"error":"' + message.replace('"', "'").encode() + b'","request_id":"'
        + (request_id or b"") + b'"}\n'
    )
    cdef bytes head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store\r\n%s\r\n"
        % (status, reason_phrase(status).encode(), len(body),
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
                        bint id_from_client=False, bytes extra=None, tuple strip=None):
    """Python entry for tests: the upstream head for `h` as the relay would send it."""
    return build_request_head(h, fi, request_id, id_from_client, extra, strip)


def _build_response_head(ResponseHead h, bint close=False, bint keep_alive_10=False,
                         bint upgrade=False, bytes tail=b"", bytes extra=None, tuple strip=None):
    """Python entry for tests: the client response head as the relay would send it."""
    return build_response_head(h, close, keep_alive_10, upgrade, PyBytes_AS_STRING(tail),
                               PyBytes_GET_SIZE(tail), extra, strip)


def _build_error_reply(int status, str message, bytes request_id, bint close=True,
                       bint head_only=False):
    """Python entry for tests and the admin listener."""
    return build_error_reply(status, message, request_id, close, head_only)


def _client_request_id(RequestHead h):
    return client_request_id(h)
