# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
#
# httphead — the strict HTTP/1.1 head parser (RFC 9112) behind every request and response.
#
# Theory of operation
# -------------------
# 1. find_head_end() looks for the CRLFCRLF that ends a head: every LF must follow a CR
#    (RFC 9112 §2.2: a bare LF is refused, never repaired) and the bytes up to the end must
#    hold no NUL. With SSE2 it tests 16 bytes per step for LF or NUL and judges only those;
#    otherwise (and for buffers under 16 bytes) it hops from LF to LF with memchr. It resumes
#    3 bytes before where the previous call stopped, so a CRLFCRLF split across reads is found
#    and a head dribbled byte by byte is scanned once.
# 2. parse_request_head() / parse_response_head() walk the complete head once, left to right,
#    with pointer loops over 256-entry class tables (tchar, field-value octets, host octets).
#    The head ends with CRLFCRLF (checked first), and no class table admits CR, so every scan
#    stops at the final CR at the latest: the loops carry no bounds checks. Field values and
#    the target, the long runs, are tested eight bytes at a time (SWAR, see below).
#    Each header is recorded as four uint32 offsets into `raw` (name start/end, value
#    start/end with OWS trimmed) plus a flag byte, in a stack scratch array of MAX_HEADERS_CAP
#    entries; one PyMem_Malloc block of the exact size receives them at the end (`offs`, and
#    `flags` right behind it in the same block). The few headers with meaning to the gateway
#    (Host, Content-Length, Transfer-Encoding, Connection, Upgrade, Expect) are recognised by a
#    switch on the name length and a lowercase compare, and judged while walking.
#    No Python object is made per header. A request makes at most: target, path and query
#    (path *is* target when there is no query), host, and the method for unknown methods
#    (known methods are the interned METHOD_* objects). Errors are returned as -status with
#    a static reason in `last_error_reason`; only the Python wrappers raise HttpError.
#
# Bounds
# ------
# A 223-byte GET with 5 fields costs about 3100 instructions end to end (find_head_end, the
# parse, the head object; callgrind), 0.3-0.4 us: benchmarks/micro_httphead.py.
# Work is O(len(head)), plus O(headers x Connection tokens) when a Connection header names
# other headers (rare; the token count is bounded by the head size). Memory: one scratch
# array of 8.5 KiB on the C stack per parse, and 17 bytes per header kept with the head.
# Requests: len(head) <= Limits.max_head_bytes, headers <= Limits.max_headers (431 beyond),
# target <= Limits.max_target (414 beyond). Responses: RESPONSE_MAX_HEAD_BYTES and
# MAX_HEADERS_CAP; any fault in a response head is -502 (the gateway answers 502 for a bad
# upstream).
#
# Rules (RFC 9112 unless noted) and the choices made where the RFC leaves one
# -------------------------------------------------------------------------
# §3    request-line = method SP request-target SP HTTP-version CRLF, single SPs exactly.
#       Method = token (RFC 9110 §5.6.2, case-sensitive, §9.1). Leading empty lines (the
#       §2.2 SHOULD-ignore) are refused with 400: the connection may strip them beforehand.
# §3.2  target: visible ASCII 0x21-0x7E only, and no '#' (a fragment is refused, 400).
#       origin-form "/..." ; absolute-form "http[s]://authority[/path][?query]" (path and
#       host come from it; userinfo '@' refused, RFC 9110 §4.2.4) ; asterisk-form "*" only
#       with OPTIONS ; CONNECT (authority-form) is answered 501: fastgate is no forward proxy.
# §2.3  HTTP/1.1 and HTTP/1.0 only; another well-formed HTTP/d.d -> 505; malformed -> 400.
# §5    field-line = field-name ":" OWS field-value OWS; no whitespace before ':' (§5.1);
#       value octets VCHAR / obs-text / SP / HTAB (RFC 9110 §5.5); obs-fold refused (§5.2),
#       which also covers whitespace between the start-line and the first field (§2.2).
# §3.2  Host: required once in HTTP/1.1, never repeated, valid uri-host[:port] (RFC 3986
#       §3.2.2; IPv6 literals accepted, IPvFuture not). An empty Host is valid (§3.2).
# §6.1  Transfer-Encoding (all lines, combined): exactly one coding, `chunked` -> CHUNKED.
#       Any other coding -> 501 ("gzip, chunked" and "chunked, gzip" alike: the gateway relays
#       chunked bodies verbatim and decodes nothing else); `chunked` twice -> 400; TE with
#       Content-Length -> 400 (§6.3 item 3, smuggling); TE in HTTP/1.0 -> 400 (§6.1).
# §6.2  Content-Length = 1*DIGIT, at most 18 digits; repeated lines or a comma list with one
#       value are merged when the values are the same text ("1" and "01" differ), differing
#       values -> 400 (§6.3 item 5).
# §9.3  keep_alive: HTTP/1.1 unless Connection: close; HTTP/1.0 only with keep-alive.
# §7.6.1 (RFC 9110) hop-by-hop: connection, keep-alive, proxy-connection, te, trailer,
#       upgrade, proxy-authenticate, proxy-authorization, and every field named by a
#       Connection token - except Host and the framing fields, which a Connection token can
#       never strip (that would let a client desynchronise the upstream).
# §10.1.1 (RFC 9110) expect_continue only for `Expect: 100-continue` in HTTP/1.1 (ignored in
#       1.0 as the RFC demands); any other Expect value is let through with expect_continue
#       False (no 417).
# §4, §6.3 responses: "HTTP/1.x SP 3DIGIT [SP reason] CRLF", status 100-599. Framing:
#       HEAD request or 1xx/204/304 -> NONE; Transfer-Encoding whose final coding is chunked
#       (once) -> CHUNKED; any other Transfer-Encoding -> -502 (a gateway does not guess);
#       TE with Content-Length -> -502; Content-Length -> LENGTH; else CLOSE (never keep_alive).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memset

from fastgate.errors import HttpError

# ---------------------------------------------------------------------------------------------
# Module constants (C level and, via globals(), Python level)

last_error_reason = NULL

METHOD_GET = b"GET"
METHOD_HEAD = b"HEAD"
METHOD_POST = b"POST"
METHOD_PUT = b"PUT"
METHOD_DELETE = b"DELETE"
METHOD_PATCH = b"PATCH"
METHOD_OPTIONS = b"OPTIONS"
METHOD_CONNECT = b"CONNECT"
METHOD_TRACE = b"TRACE"

cdef bytes _REASON_OK = b"OK"
cdef bytes _EMPTY = b""
cdef bytes _SLASH = b"/"

# Offsets are uint32: a Limits cannot allow heads whose offsets would not fit.
cdef Py_ssize_t _MAX_HEAD_BYTES_CAP = 1 << 30

# ---------------------------------------------------------------------------------------------
# Character classes (RFC 9110 §5.6.2 tchar, §5.5 field-value, RFC 3986 §3.2.2 reg-name)

cdef uint8_t _TCHAR[256]
cdef uint8_t _VALUE[256]      # field-value / reason-phrase octet: VCHAR obs-text SP HTAB
cdef uint8_t _HOSTC[256]      # reg-name octet: unreserved sub-delims ('%' is handled apart)
cdef uint8_t _HEX[256]
cdef uint8_t _LOWER[256]


cdef void _init_tables() noexcept:
    cdef int c
    cdef const char *tspecial = b"!#$%&'*+-.^_`|~"
    cdef const char *hostspecial = b"-._~!$&'()*+,;="
    cdef bint alnum
    for c in range(256):
        alnum = (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
        _TCHAR[c] = alnum or (c != 0 and memchr(tspecial, c, 15) != NULL)
        _VALUE[c] = (0x21 <= c <= 0x7E) or c >= 0x80 or c == 32 or c == 9
        _HOSTC[c] = alnum or (c != 0 and memchr(hostspecial, c, 15) != NULL)
        _HEX[c] = (48 <= c <= 57) or (65 <= c <= 70) or (97 <= c <= 102)
        _LOWER[c] = c + 32 if 65 <= c <= 90 else c


_init_tables()

# ---------------------------------------------------------------------------------------------
# Many bytes at a time. Field values and targets are long runs of plain octets, so they are
# tested eight at a time (SWAR, the "bit twiddling hacks" hasless/haszero/hasmore tests), and
# find_head_end tests sixteen at a time with SSE2 where the compiler has it. A SWAR mask flags
# every suspect byte; a borrow or carry can only flag a byte *above* a truly suspect one, so
# the lowest flag is exact and, on a little-endian machine, ctz(mask) / 8 is the index of the
# first suspect byte. Elsewhere (big-endian, no SSE2) the byte loops below do the same work.

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__SSE2__) || defined(_M_X64)
      #include <emmintrin.h>
      #define FG_HAVE_SSE2 1
    #else
      #define FG_HAVE_SSE2 0
    #endif
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && \
        (defined(__GNUC__) || defined(__clang__))
      #define FG_LITTLE_ENDIAN 1
      #define fg_ctz64(m) ((Py_ssize_t)__builtin_ctzll(m))
      #define fg_ctz32(m) ((Py_ssize_t)__builtin_ctz(m))
    #else
      #define FG_LITTLE_ENDIAN 0
      static inline Py_ssize_t fg_ctz64(uint64_t m) {
          Py_ssize_t i = 0; while (!(m & 1)) { m >>= 1; i++; } return i;
      }
      static inline Py_ssize_t fg_ctz32(unsigned m) {
          Py_ssize_t i = 0; while (!(m & 1)) { m >>= 1; i++; } return i;
      }
    #endif
    /* Bit i set when p[i] is LF or NUL, for the 16 bytes at p (SSE2 builds only). */
    static inline unsigned fg_lf_nul_mask16(const char *p) {
    #if FG_HAVE_SSE2
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        __m128i lf = _mm_cmpeq_epi8(v, _mm_set1_epi8('\\n'));
        __m128i nul = _mm_cmpeq_epi8(v, _mm_setzero_si128());
        return (unsigned)_mm_movemask_epi8(_mm_or_si128(lf, nul));
    #else
        (void)p;
        return 0;
    #endif
    }
    """
    const bint FG_HAVE_SSE2
    const bint FG_LITTLE_ENDIAN
    Py_ssize_t fg_ctz64(uint64_t m) nogil
    Py_ssize_t fg_ctz32(unsigned int m) nogil
    unsigned int fg_lf_nul_mask16(const char *p) nogil

cdef uint64_t _ONES = 0x0101010101010101ULL
cdef uint64_t _HIGHS = 0x8080808080808080ULL


cdef inline uint64_t _load8(const unsigned char *p) noexcept nogil:
    cdef uint64_t w
    memcpy(&w, p, 8)
    return w


cdef inline uint64_t _value_mask(uint64_t w) noexcept nogil:
    # flags bytes < 0x20 (CTLs; HTAB too, a false alarm the caller steps over) and 0x7F (DEL)
    cdef uint64_t d = w ^ (_ONES * 0x7F)
    return (((w - _ONES * 0x20) & ~w) | ((d - _ONES) & ~d)) & _HIGHS


cdef inline uint64_t _target_mask(uint64_t w) noexcept nogil:
    # flags bytes outside 0x21..0x7E
    return (((w - _ONES * 0x21) & ~w) | ((w + _ONES) | w)) & _HIGHS


cdef inline Py_ssize_t _skip_value(const unsigned char *b, Py_ssize_t pos,
                                   Py_ssize_t n) noexcept nogil:
    # Index of the first octet at or after pos that cannot be in a field value (the CR of the
    # line end for a good line). The head's final CR stops it; words are read only below n.
    cdef uint64_t m
    while True:
        if pos + 8 <= n:
            m = _value_mask(_load8(b + pos))
            if m == 0:
                pos += 8
                continue
            if FG_LITTLE_ENDIAN:
                pos += fg_ctz64(m) >> 3
        if _VALUE[b[pos]]:
            pos += 1
        else:
            return pos


cdef inline Py_ssize_t _skip_target(const unsigned char *b, Py_ssize_t pos,
                                    Py_ssize_t n) noexcept nogil:
    cdef uint64_t m
    while True:
        if pos + 8 <= n:
            m = _target_mask(_load8(b + pos))
            if m == 0:
                pos += 8
                continue
            if FG_LITTLE_ENDIAN:
                return pos + (fg_ctz64(m) >> 3)
        if 0x21 <= b[pos] <= 0x7E:
            pos += 1
        else:
            return pos


# ---------------------------------------------------------------------------------------------
# Header names the gateway knows


cdef enum:  # header kinds
    K_OTHER = 0
    K_HOST = 1
    K_CONTENT_LENGTH = 2
    K_TRANSFER_ENCODING = 3
    K_CONNECTION = 4
    K_UPGRADE = 5
    K_EXPECT = 6
    K_HOP = 7             # hop-by-hop with no meaning to the parser (te, trailer, ...)
    K_FORWARDED = 8
    K_REQUEST_ID = 9
    K_TRACE = 10          # traceparent / tracestate / traceresponse

cdef uint8_t _KIND_FLAGS[11]
_KIND_FLAGS[K_OTHER] = 0
_KIND_FLAGS[K_HOST] = HF_HOST
_KIND_FLAGS[K_CONTENT_LENGTH] = HF_FRAMING
_KIND_FLAGS[K_TRANSFER_ENCODING] = HF_FRAMING
_KIND_FLAGS[K_CONNECTION] = HF_HOP
_KIND_FLAGS[K_UPGRADE] = HF_HOP
_KIND_FLAGS[K_EXPECT] = HF_EXPECT
_KIND_FLAGS[K_HOP] = HF_HOP
_KIND_FLAGS[K_FORWARDED] = HF_FORWARDED
_KIND_FLAGS[K_REQUEST_ID] = HF_REQUEST_ID
_KIND_FLAGS[K_TRACE] = HF_TRACE


cdef inline bint _lc_eq(const unsigned char *p, const char *lit, Py_ssize_t n) noexcept nogil:
    # p (any case) equals the lowercase literal lit
    cdef Py_ssize_t i
    for i in range(n):
        if _LOWER[p[i]] != <unsigned char>lit[i]:
            return False
    return True


cdef inline bint _ci_eq(const unsigned char *a, const unsigned char *b,
                        Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if _LOWER[a[i]] != _LOWER[b[i]]:
            return False
    return True


cdef int _classify(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # Switch on the length, then the first letter, then one lowercase compare.
    cdef unsigned char c0 = _LOWER[p[0]]
    if n == 4:
        if c0 == b'h' and _lc_eq(p, b"host", 4):
            return K_HOST
    elif n == 14:
        if c0 == b'c' and _lc_eq(p, b"content-length", 14):
            return K_CONTENT_LENGTH
    elif n == 10:
        if c0 == b'c':
            if _lc_eq(p, b"connection", 10):
                return K_CONNECTION
        elif c0 == b'k':
            if _lc_eq(p, b"keep-alive", 10):
                return K_HOP
        elif c0 == b't':
            if _lc_eq(p, b"tracestate", 10):
                return K_TRACE
    elif n == 11:
        if c0 == b't' and _lc_eq(p, b"traceparent", 11):
            return K_TRACE
    elif n == 13:
        if c0 == b't' and _lc_eq(p, b"traceresponse", 13):
            return K_TRACE
    elif n == 17:
        if c0 == b't':
            if _lc_eq(p, b"transfer-encoding", 17):
                return K_TRANSFER_ENCODING
        elif c0 == b'x':
            if _lc_eq(p, b"x-forwarded-proto", 17):
                return K_FORWARDED
    elif n == 15:
        if c0 == b'x' and _lc_eq(p, b"x-forwarded-for", 15):
            return K_FORWARDED
    elif n == 16:
        if c0 == b'x':
            if _lc_eq(p, b"x-forwarded-host", 16) or _lc_eq(p, b"x-forwarded-port", 16):
                return K_FORWARDED
        elif c0 == b'p':
            if _lc_eq(p, b"proxy-connection", 16):
                return K_HOP
    elif n == 12:
        if c0 == b'x' and _lc_eq(p, b"x-request-id", 12):
            return K_REQUEST_ID
    elif n == 9:
        if c0 == b'f':
            if _lc_eq(p, b"forwarded", 9):
                return K_FORWARDED
        elif c0 == b'x':
            if _lc_eq(p, b"x-real-ip", 9):
                return K_FORWARDED
    elif n == 7:
        if c0 == b'u':
            if _lc_eq(p, b"upgrade", 7):
                return K_UPGRADE
        elif c0 == b't':
            if _lc_eq(p, b"trailer", 7):
                return K_HOP
    elif n == 6:
        if c0 == b'e' and _lc_eq(p, b"expect", 6):
            return K_EXPECT
    elif n == 2:
        if c0 == b't' and _LOWER[p[1]] == b'e':
            return K_HOP
    elif n == 18:
        if c0 == b'p' and _lc_eq(p, b"proxy-authenticate", 18):
            return K_HOP
    elif n == 19:
        if c0 == b'p' and _lc_eq(p, b"proxy-authorization", 19):
            return K_HOP
    return K_OTHER


# ---------------------------------------------------------------------------------------------
# List fields (RFC 9110 §5.6.1): elements separated by ',' with OWS; empty elements ignored
# where the field is a list (Connection, Transfer-Encoding), refused in Content-Length.


cdef inline Py_ssize_t _next_elem(const unsigned char *b, Py_ssize_t pos, Py_ssize_t end,
                                  Py_ssize_t *es, Py_ssize_t *ee) noexcept nogil:
    # Element starting at pos, trimmed of OWS, in [es, ee); returns the position after its
    # comma, which is > end once the last element has been returned.
    cdef Py_ssize_t i = pos
    cdef Py_ssize_t e
    while i < end and b[i] != b',':
        i += 1
    e = i
    while pos < e and (b[pos] == b' ' or b[pos] == b'\t'):
        pos += 1
    while e > pos and (b[e - 1] == b' ' or b[e - 1] == b'\t'):
        e -= 1
    es[0] = pos
    ee[0] = e
    return i + 1


cdef struct _Scan:
    Py_ssize_t n                # header lines stored
    Py_ssize_t host_count
    Py_ssize_t host_idx
    Py_ssize_t upgrade_idx      # first Upgrade line, -1 if none
    int cl_count                # Content-Length lines
    long long cl_value
    Py_ssize_t cl_pos           # the first value's digits (offset, length): later ones must
    Py_ssize_t cl_len           #   be the same text, not just the same number
    int te_count                # Transfer-Encoding lines
    int te_chunked              # `chunked` codings seen
    int te_other                # other codings seen
    bint te_last_chunked        # the final coding so far is chunked
    bint conn_close
    bint conn_keep_alive
    bint conn_upgrade
    bint conn_other             # a Connection token naming some other header
    bint expect_continue


cdef inline void _scan_init(_Scan *st) noexcept nogil:
    memset(st, 0, sizeof(_Scan))
    st.host_idx = -1
    st.upgrade_idx = -1


cdef int _content_length(const unsigned char *b, Py_ssize_t vs, Py_ssize_t ve,
                         _Scan *st) noexcept nogil:
    # RFC 9112 §6.2/§6.3 item 5: 1*DIGIT; a list of identical values stands for one value.
    global last_error_reason
    cdef Py_ssize_t pos = vs, nxt, es, ee, i
    cdef long long v
    while True:
        nxt = _next_elem(b, pos, ve, &es, &ee)
        if ee == es:
            last_error_reason = b"empty Content-Length"
            return -1
        if ee - es > 18:
            last_error_reason = b"Content-Length too large"
            return -1
        v = 0
        for i in range(es, ee):
            if b[i] < b'0' or b[i] > b'9':
                last_error_reason = b"invalid Content-Length"
                return -1
            v = v * 10 + (b[i] - 48)
        if st.cl_count and (ee - es != st.cl_len or memcmp(b + es, b + st.cl_pos, ee - es) != 0):
            # "1" and "01" are one number but not identical values (§6.3 item 5 allows
            # merging identical ones only); another parser may read them differently.
            last_error_reason = b"differing Content-Length values"
            return -1
        if not st.cl_count:
            st.cl_pos = es
            st.cl_len = ee - es
        st.cl_value = v
        st.cl_count += 1
        if nxt > ve:
            return 0
        pos = nxt


cdef void _transfer_encoding(const unsigned char *b, Py_ssize_t vs, Py_ssize_t ve,
                             _Scan *st) noexcept nogil:
    cdef Py_ssize_t pos = vs, nxt, es, ee
    st.te_count += 1
    while True:
        nxt = _next_elem(b, pos, ve, &es, &ee)
        if ee > es:
            if ee - es == 7 and _lc_eq(b + es, b"chunked", 7):
                st.te_chunked += 1
                st.te_last_chunked = True
            else:
                st.te_other += 1
                st.te_last_chunked = False
        if nxt > ve:
            return
        pos = nxt


cdef void _connection(const unsigned char *b, Py_ssize_t vs, Py_ssize_t ve,
                      _Scan *st) noexcept nogil:
    cdef Py_ssize_t pos = vs, nxt, es, ee, n
    while True:
        nxt = _next_elem(b, pos, ve, &es, &ee)
        n = ee - es
        if n == 5 and _lc_eq(b + es, b"close", 5):
            st.conn_close = True
        elif n == 10 and _lc_eq(b + es, b"keep-alive", 10):
            st.conn_keep_alive = True
        elif n == 7 and _lc_eq(b + es, b"upgrade", 7):
            st.conn_upgrade = True
        elif n > 0:
            st.conn_other = True
        if nxt > ve:
            return
        pos = nxt


cdef void _mark_connection_named(const unsigned char *b, const uint32_t *offs, uint8_t *flags,
                                 Py_ssize_t n) noexcept nogil:
    # RFC 9110 §7.6.1: a field named by a Connection token is hop-by-hop. Host and the framing
    # fields are exempt: dropping them on the way upstream would change the message framing.
    cdef Py_ssize_t i, j, pos, nxt, es, ee, ve, tl
    for i in range(n):
        if offs[4 * i + 1] - offs[4 * i] != 10 or not _lc_eq(b + offs[4 * i], b"connection", 10):
            continue
        pos = offs[4 * i + 2]
        ve = offs[4 * i + 3]
        while True:
            nxt = _next_elem(b, pos, ve, &es, &ee)
            tl = ee - es
            if tl > 0 and not (
                (tl == 5 and _lc_eq(b + es, b"close", 5))
                or (tl == 10 and _lc_eq(b + es, b"keep-alive", 10))
                or (tl == 7 and _lc_eq(b + es, b"upgrade", 7))
            ):
                for j in range(n):
                    if (offs[4 * j + 1] - offs[4 * j] == <uint32_t>tl
                            and not (flags[j] & (HF_HOST | HF_FRAMING))
                            and _ci_eq(b + offs[4 * j], b + es, tl)):
                        flags[j] |= HF_HOP
            if nxt > ve:
                break
            pos = nxt


cdef int _scan_fields(const unsigned char *b, Py_ssize_t pos, Py_ssize_t n,
                      uint32_t *offs, uint8_t *flags, Py_ssize_t max_headers,
                      _Scan *st) noexcept nogil:
    # Field lines from pos to the final CRLF at n - 2 (RFC 9112 §5). Returns 0, -1 for a
    # malformed line, -2 for too many lines. b[n-4:n] is CRLFCRLF, which stops every loop.
    global last_error_reason
    cdef Py_ssize_t ns, ne, vs, ve, i
    cdef unsigned char c
    cdef int kind
    while True:
        c = b[pos]
        if c == b'\r':
            if pos + 2 != n or b[pos + 1] != b'\n':
                last_error_reason = b"bare CR in head"
                return -1
            return 0
        if c == b' ' or c == b'\t':
            last_error_reason = b"obsolete line folding"
            return -1
        ns = pos
        while _TCHAR[b[pos]]:
            pos += 1
        if b[pos] != b':' or pos == ns:
            if pos > ns and (b[pos] == b' ' or b[pos] == b'\t'):
                last_error_reason = b"whitespace before colon"     # RFC 9112 §5.1
            elif pos == ns and b[pos] == b':':
                last_error_reason = b"empty header name"
            else:
                last_error_reason = b"invalid header name"
            return -1
        ne = pos
        pos += 1
        while b[pos] == b' ' or b[pos] == b'\t':
            pos += 1
        vs = pos
        pos = _skip_value(b, pos, n)
        if b[pos] != b'\r' or b[pos + 1] != b'\n':
            last_error_reason = b"invalid character in header value"
            return -1
        ve = pos
        while ve > vs and (b[ve - 1] == b' ' or b[ve - 1] == b'\t'):
            ve -= 1
        pos += 2
        i = st.n
        if i >= max_headers:
            last_error_reason = b"too many headers"
            return -2
        st.n = i + 1
        offs[4 * i] = <uint32_t>ns
        offs[4 * i + 1] = <uint32_t>ne
        offs[4 * i + 2] = <uint32_t>vs
        offs[4 * i + 3] = <uint32_t>ve
        kind = _classify(b + ns, ne - ns)
        flags[i] = _KIND_FLAGS[kind]
        if (kind == K_OTHER or kind == K_HOP or kind == K_FORWARDED or kind == K_REQUEST_ID
                or kind == K_TRACE):
            continue
        if kind == K_HOST:
            st.host_count += 1
            st.host_idx = i
        elif kind == K_CONTENT_LENGTH:
            if _content_length(b, vs, ve, st) < 0:
                return -1
        elif kind == K_TRANSFER_ENCODING:
            _transfer_encoding(b, vs, ve, st)
        elif kind == K_CONNECTION:
            _connection(b, vs, ve, st)
        elif kind == K_UPGRADE:
            if st.upgrade_idx < 0:
                st.upgrade_idx = i
        elif kind == K_EXPECT:
            if ve - vs == 12 and _lc_eq(b + vs, b"100-continue", 12):
                st.expect_continue = True


cdef bint _valid_host(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2); a reg-name may not be empty
    # unless the whole value is (an empty Host is valid, RFC 9112 §3.2). p[n] is never a host
    # octet (it is OWS, CR, '/', '?' or SP), so the reg-name loop needs no bound.
    cdef Py_ssize_t i = 0
    if n == 0:
        return True
    if p[0] == b'[':
        i = 1
        while i < n and (_HEX[p[i]] or p[i] == b':' or p[i] == b'.'):
            i += 1
        if i == 1 or i >= n or p[i] != b']':
            return False
        i += 1
    else:
        while True:
            while _HOSTC[p[i]]:
                i += 1
            if p[i] != b'%' or i >= n:
                break
            if i + 2 >= n or not _HEX[p[i + 1]] or not _HEX[p[i + 2]]:
                return False
            i += 3
        if i == 0 or i > n:
            return False
    if i == n:
        return True
    if p[i] != b':' or n - i - 1 > 5:
        return False
    i += 1
    while i < n:
        if p[i] < b'0' or p[i] > b'9':
            return False
        i += 1
    return True


cdef inline int _version(const unsigned char *p) noexcept nogil:
    # "HTTP/" DIGIT "." DIGIT -> 10/11, -505 for another version, -400 when malformed.
    # The caller guarantees 8 readable bytes.
    if memcmp(p, b"HTTP/", 5) != 0 or p[6] != b'.':
        return -400
    if p[5] < b'0' or p[5] > b'9' or p[7] < b'0' or p[7] > b'9':
        return -400
    if p[5] == b'1' and p[7] == b'1':
        return 11
    if p[5] == b'1' and p[7] == b'0':
        return 10
    return -505


cdef int _store_offsets(Head h, const uint32_t *offs, const uint8_t *flags,
                        Py_ssize_t n) noexcept:
    # One block: 4 uint32 per header, then the flag bytes.
    cdef char *block
    if h.offs != NULL:
        PyMem_Free(h.offs)
        h.offs = NULL
        h.flags = NULL
    h.n_headers = 0
    if n == 0:
        return 0
    block = <char *>PyMem_Malloc(n * (4 * sizeof(uint32_t) + 1))
    if block == NULL:
        return -1
    memcpy(block, offs, n * 4 * sizeof(uint32_t))
    memcpy(block + n * 4 * sizeof(uint32_t), flags, n)
    h.offs = <uint32_t *>block
    h.flags = <uint8_t *>(block + n * 4 * sizeof(uint32_t))
    h.n_headers = n
    return 0


cdef inline bytes _slice(bytes raw, Py_ssize_t a, Py_ssize_t b):
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(raw) + a, b - a)


cdef bytes _method(const unsigned char *p, Py_ssize_t n):
    # Methods are case-sensitive (RFC 9110 §9.1): only the exact spellings are interned.
    cdef const char *m = <const char *>p
    if n == 3:
        if memcmp(m, b"GET", 3) == 0:
            return METHOD_GET
        if memcmp(m, b"PUT", 3) == 0:
            return METHOD_PUT
    elif n == 4:
        if memcmp(m, b"POST", 4) == 0:
            return METHOD_POST
        if memcmp(m, b"HEAD", 4) == 0:
            return METHOD_HEAD
    elif n == 6:
        if memcmp(m, b"DELETE", 6) == 0:
            return METHOD_DELETE
    elif n == 5:
        if memcmp(m, b"PATCH", 5) == 0:
            return METHOD_PATCH
        if memcmp(m, b"TRACE", 5) == 0:
            return METHOD_TRACE
    elif n == 7:
        if memcmp(m, b"OPTIONS", 7) == 0:
            return METHOD_OPTIONS
        if memcmp(m, b"CONNECT", 7) == 0:
            return METHOD_CONNECT
    return PyBytes_FromStringAndSize(m, n)


# ---------------------------------------------------------------------------------------------
# Head objects


cdef class Limits:
    """Request head limits: bytes in the head, header lines, request-target length."""

    def __init__(self, Py_ssize_t max_head_bytes=16384, Py_ssize_t max_headers=100,
                 Py_ssize_t max_target=8192):
        if max_head_bytes <= 0 or max_head_bytes > _MAX_HEAD_BYTES_CAP:
            raise ValueError(f"max_head_bytes must be in 1..{_MAX_HEAD_BYTES_CAP}")
        if max_headers <= 0 or max_headers > MAX_HEADERS_CAP:
            raise ValueError(f"max_headers must be in 1..{MAX_HEADERS_CAP}")
        if max_target <= 0:
            raise ValueError("max_target must be positive")
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_target = max_target

    def __repr__(self):
        return (f"Limits(max_head_bytes={self.max_head_bytes}, max_headers={self.max_headers},"
                f" max_target={self.max_target})")


DEFAULT_LIMITS = Limits()


cdef Py_ssize_t _find_from(Head h, const unsigned char *name, Py_ssize_t nlen,
                           Py_ssize_t i) noexcept:
    # First header at index >= i named `name` (case-insensitive), or -1.
    cdef const unsigned char *b
    cdef const uint32_t *o = h.offs
    if h.n_headers == 0:
        return -1
    b = <const unsigned char *>PyBytes_AS_STRING(h.raw)
    while i < h.n_headers:
        if o[4 * i + 1] - o[4 * i] == <uint32_t>nlen and _ci_eq(b + o[4 * i], name, nlen):
            return i
        i += 1
    return -1


cdef inline bytes _value(Head h, Py_ssize_t i):
    return _slice(h.raw, h.offs[4 * i + 2], h.offs[4 * i + 3])


cdef class Head:
    """A parsed head: `raw` plus offsets; header values become bytes only when asked for."""

    def __dealloc__(self):
        if self.offs != NULL:
            PyMem_Free(self.offs)     # flags live in the same block
            self.offs = NULL
            self.flags = NULL

    cdef Py_ssize_t find(self, const char *name, Py_ssize_t nlen):
        return _find_from(self, <const unsigned char *>name, nlen, 0)

    def get(self, bytes name not None, default=None):
        """First value of header `name` (case-insensitive), materialised on demand."""
        cdef Py_ssize_t i = _find_from(
            self, <const unsigned char *>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), 0)
        if i < 0:
            return default
        return _value(self, i)

    def get_all(self, bytes name not None):
        """Every value of header `name` (case-insensitive), in order; [] when absent."""
        cdef list out = []
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(name)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
        cdef Py_ssize_t i = _find_from(self, p, n, 0)
        while i >= 0:
            out.append(_value(self, i))
            i = _find_from(self, p, n, i + 1)
        return out

    def headers(self):
        """All (name, value) pairs in order, names as sent."""
        cdef list out = []
        cdef Py_ssize_t i
        for i in range(self.n_headers):
            out.append((_slice(self.raw, self.offs[4 * i], self.offs[4 * i + 1]),
                        _value(self, i)))
        return out

    def header_flags(self):
        """The HF_* bit set of every header, in order (for tests and diagnostics)."""
        return [self.flags[i] for i in range(self.n_headers)]

    def header_spans(self):
        """(name start, name end, value start, value end) offsets into `raw` per header."""
        cdef const uint32_t *o = self.offs
        return [(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3])
                for i in range(self.n_headers)]

    @property
    def start_line_end(self):
        """Offset of the CRLF that ends the start line."""
        return self.line_end

    def __len__(self):
        return self.n_headers


cdef class RequestHead(Head):
    """A parsed request head (see httphead.pyi)."""

    def __repr__(self):
        return f"<RequestHead {self.method!r} {self.target!r} HTTP/{self.version // 10}.{self.version % 10}>"


cdef class ResponseHead(Head):
    """A parsed response head (see httphead.pyi)."""

    def __repr__(self):
        return f"<ResponseHead HTTP/{self.version // 10}.{self.version % 10} {self.status}>"


# Python-visible copies of the C-level names
globals().update(
    FRAMING_NONE=FRAMING_NONE,
    FRAMING_LENGTH=FRAMING_LENGTH,
    FRAMING_CHUNKED=FRAMING_CHUNKED,
    FRAMING_CLOSE=FRAMING_CLOSE,
    HF_HOP=HF_HOP,
    HF_HOST=HF_HOST,
    HF_FORWARDED=HF_FORWARDED,
    HF_REQUEST_ID=HF_REQUEST_ID,
    HF_FRAMING=HF_FRAMING,
    HF_EXPECT=HF_EXPECT,
    HF_TRACE=HF_TRACE,
    MAX_HEADERS_CAP=MAX_HEADERS_CAP,
    RESPONSE_MAX_HEAD_BYTES=RESPONSE_MAX_HEAD_BYTES,
    DEFAULT_LIMITS=DEFAULT_LIMITS,
    METHOD_GET=METHOD_GET,
    METHOD_HEAD=METHOD_HEAD,
    METHOD_POST=METHOD_POST,
    METHOD_PUT=METHOD_PUT,
    METHOD_DELETE=METHOD_DELETE,
    METHOD_PATCH=METHOD_PATCH,
    METHOD_OPTIONS=METHOD_OPTIONS,
    METHOD_CONNECT=METHOD_CONNECT,
    METHOD_TRACE=METHOD_TRACE,
)

# ---------------------------------------------------------------------------------------------
# The C interface (httphead.pxd)


cdef inline Py_ssize_t _judge_lf_nul(const char *buf, Py_ssize_t i,
                                     unsigned int m) noexcept nogil:
    # m: bit k set when buf[i + k] is LF or NUL. Judge them in order: the end of the head
    # (> 0), a bad byte (-400), or nothing decided yet (0). A NUL after the end is not seen.
    global last_error_reason
    cdef Py_ssize_t j
    while m:
        j = i + fg_ctz32(m)
        if buf[j] == 0:
            last_error_reason = b"NUL in head"
            return -400
        if j == 0 or buf[j - 1] != b'\r':
            last_error_reason = b"bare LF in head"
            return -400
        if j >= 3 and buf[j - 2] == b'\n' and buf[j - 3] == b'\r':
            return j + 1
        m &= m - 1
    return 0


cdef Py_ssize_t find_head_end(const char *buf, Py_ssize_t n, Py_ssize_t start) noexcept nogil:
    global last_error_reason
    cdef Py_ssize_t s = start - 3
    cdef Py_ssize_t i, r
    cdef const char *p
    cdef const char *e = buf + n
    cdef const char *lf
    cdef Py_ssize_t end
    if s < 0:
        s = 0
    if s >= n:
        return 0
    if FG_HAVE_SSE2 and n >= 16:
        # 16 bytes per step; the last step re-reads an overlapping block ending at n, its
        # already-judged bytes shifted out of the mask.
        i = s
        while i + 16 <= n:
            r = _judge_lf_nul(buf, i, fg_lf_nul_mask16(buf + i))
            if r:
                return r
            i += 16
        if i < n:
            return _judge_lf_nul(buf, i, fg_lf_nul_mask16(buf + n - 16) >> (i - (n - 16)))
        return 0
    # memchr per line (short buffers, builds without SSE2)
    p = buf + s
    while p < e:
        lf = <const char *>memchr(p, b'\n', e - p)
        if lf == NULL:
            break
        if lf == buf or (lf - 1)[0] != b'\r':
            last_error_reason = b"bare LF in head"
            return -400
        if lf - buf >= 3 and (lf - 2)[0] == b'\n' and (lf - 3)[0] == b'\r':
            end = lf - buf + 1
            if memchr(buf + s, 0, end - s) != NULL:
                last_error_reason = b"NUL in head"
                return -400
            return end
        p = lf + 1
    if memchr(buf + s, 0, n - s) != NULL:
        last_error_reason = b"NUL in head"
        return -400
    return 0


cdef int _request(RequestHead h, bytes raw, Limits limits) except -1:
    global last_error_reason
    cdef uint32_t offs[MAX_HEADERS_CAP * 4]
    cdef uint8_t flags[MAX_HEADERS_CAP]
    cdef _Scan st
    cdef const unsigned char *b
    cdef Py_ssize_t n, pos, mend, ts, te, q, line_end, vs, ve, auth_s, auth_e, path_s
    cdef int version, r
    cdef bint absolute = False
    cdef const unsigned char *qp
    cdef bytes method, target, path, query, host, upgrade

    if raw is None:
        last_error_reason = b"no head"
        return -400
    if limits is None:
        limits = DEFAULT_LIMITS
    n = PyBytes_GET_SIZE(raw)
    b = <const unsigned char *>PyBytes_AS_STRING(raw)
    if n > limits.max_head_bytes:
        last_error_reason = b"request head too large"
        return -431
    if n < 4 or memcmp(b + n - 4, b"\r\n\r\n", 4) != 0:
        last_error_reason = b"head does not end with CRLFCRLF"
        return -400

    # request-line (RFC 9112 §3)
    pos = 0
    while _TCHAR[b[pos]]:
        pos += 1
    if pos == 0 or b[pos] != b' ':
        if b[0] == b'\r':
            last_error_reason = b"empty line before the request-line"
        else:
            last_error_reason = b"invalid method"
        return -400
    mend = pos
    ts = pos + 1
    pos = ts
    pos = _skip_target(b, pos, n)
    te = pos
    if te == ts or b[pos] != b' ':
        last_error_reason = b"invalid request-target"
        return -400
    if te - ts > limits.max_target:
        last_error_reason = b"request-target too long"
        return -414
    # RFC 9112 §3.2: a request-target has no fragment ('#' is not a pchar or query char).
    # Refused rather than passed on: `/admin#x` must not match routes as something other
    # than what an upstream that strips the fragment would serve.
    if memchr(b + ts, b'#', te - ts) != NULL:
        last_error_reason = b"fragment in request-target"
        return -400
    pos += 1
    if n - pos < 12:     # "HTTP/1.1" CRLF plus the final CRLF
        last_error_reason = b"invalid HTTP version"
        return -400
    version = _version(b + pos)
    if version < 0:
        last_error_reason = b"unsupported HTTP version" if version == -505 else (
            b"invalid HTTP version")
        return version
    if b[pos + 8] != b'\r' or b[pos + 9] != b'\n':
        last_error_reason = b"invalid request-line ending"
        return -400
    line_end = pos + 8
    if mend == 7 and memcmp(b, b"CONNECT", 7) == 0:
        last_error_reason = b"CONNECT is not supported"
        return -501

    # request-target forms (RFC 9112 §3.2)
    q = -1
    auth_s = auth_e = path_s = 0
    if b[ts] == b'/':
        path_s = ts
    elif b[ts] == b'*':
        if te - ts != 1 or mend != 7 or memcmp(b, b"OPTIONS", 7) != 0:
            last_error_reason = b"asterisk-form is for OPTIONS only"
            return -400
        path_s = ts
    else:
        if te - ts >= 7 and _lc_eq(b + ts, b"http://", 7):
            auth_s = ts + 7
        elif te - ts >= 8 and _lc_eq(b + ts, b"https://", 8):
            auth_s = ts + 8
        else:
            last_error_reason = b"invalid request-target"
            return -400
        auth_e = auth_s
        while auth_e < te and b[auth_e] != b'/' and b[auth_e] != b'?':
            auth_e += 1
        if auth_e == auth_s or not _valid_host(b + auth_s, auth_e - auth_s):
            last_error_reason = b"invalid authority in absolute-form"
            return -400
        absolute = True
        path_s = auth_e
    qp = <const unsigned char *>memchr(b + path_s, b'?', te - path_s)
    if qp != NULL:
        q = qp - b

    # field lines (RFC 9112 §5)
    _scan_init(&st)
    r = _scan_fields(b, line_end + 2, n, offs, flags, limits.max_headers, &st)
    if r == -2:
        return -431
    if r < 0:
        return -400

    # Host (RFC 9112 §3.2)
    if st.host_count > 1:
        last_error_reason = b"more than one Host"
        return -400
    if st.host_count == 0:
        if version == 11:
            last_error_reason = b"missing Host"
            return -400
    else:
        vs = offs[4 * st.host_idx + 2]
        ve = offs[4 * st.host_idx + 3]
        if not _valid_host(b + vs, ve - vs):
            last_error_reason = b"invalid Host"
            return -400

    # framing (RFC 9112 §6.1-6.3)
    if st.te_count:
        if st.cl_count:
            last_error_reason = b"Transfer-Encoding with Content-Length"
            return -400
        if version == 10:
            last_error_reason = b"Transfer-Encoding in HTTP/1.0"
            return -400
        if st.te_other:
            last_error_reason = b"unsupported transfer coding"
            return -501
        if st.te_chunked != 1:
            last_error_reason = b"invalid Transfer-Encoding"
            return -400
        h.framing = FRAMING_CHUNKED
        h.content_length = -1
    elif st.cl_count:
        h.framing = FRAMING_LENGTH
        h.content_length = st.cl_value
    else:
        h.framing = FRAMING_NONE
        h.content_length = -1

    if st.conn_other:
        _mark_connection_named(b, offs, flags, st.n)

    # Python objects: the only allocations of the parse
    method = _method(b, mend)
    target = _slice(raw, ts, te)
    if absolute:
        host = _slice(raw, auth_s, auth_e)
        if q < 0:
            path = _slice(raw, path_s, te) if path_s < te else _SLASH
            query = None
        else:
            path = _slice(raw, path_s, q) if path_s < q else _SLASH
            query = _slice(raw, q + 1, te)
    else:
        if st.host_count:
            host = _slice(raw, offs[4 * st.host_idx + 2], offs[4 * st.host_idx + 3])
        else:
            host = None
        if q < 0:
            path = target
            query = None
        else:
            path = _slice(raw, ts, q)
            query = _slice(raw, q + 1, te)
    # RFC 9110 §7.8: a server MUST ignore Upgrade received in an HTTP/1.0 request.
    if st.conn_upgrade and st.upgrade_idx >= 0 and version == 11:
        upgrade = _slice(raw, offs[4 * st.upgrade_idx + 2], offs[4 * st.upgrade_idx + 3])
    else:
        upgrade = None
    if _store_offsets(h, offs, flags, st.n) < 0:
        raise MemoryError()

    h.raw = raw
    h.version = version
    h.line_end = line_end
    if version == 11:
        h.keep_alive = not st.conn_close
    else:
        h.keep_alive = st.conn_keep_alive and not st.conn_close
    h.upgrade = upgrade
    h.method = method
    h.target = target
    h.path = path
    h.query = query
    h.host = host
    h.expect_continue = st.expect_continue and version == 11
    h.absolute_form = absolute
    return 0


cdef int parse_request_head(RequestHead h, bytes raw, Limits limits) noexcept:
    global last_error_reason
    try:
        return _request(h, raw, limits)
    except BaseException:
        last_error_reason = b"out of memory"
        return -500


cdef int _response(ResponseHead h, bytes raw, bint head_request) except -1:
    global last_error_reason
    cdef uint32_t offs[MAX_HEADERS_CAP * 4]
    cdef uint8_t flags[MAX_HEADERS_CAP]
    cdef _Scan st
    cdef const unsigned char *b
    cdef Py_ssize_t n, pos, rs, line_end
    cdef int version, status, r, framing
    cdef bytes reason, upgrade
    cdef bint keep_alive

    if raw is None:
        last_error_reason = b"no head"
        return -502
    n = PyBytes_GET_SIZE(raw)
    b = <const unsigned char *>PyBytes_AS_STRING(raw)
    if n > RESPONSE_MAX_HEAD_BYTES:
        last_error_reason = b"response head too large"
        return -502
    if n < 16 or memcmp(b + n - 4, b"\r\n\r\n", 4) != 0:
        last_error_reason = b"invalid status-line"
        return -502

    # status-line (RFC 9112 §4); n >= 16 makes the 12 bytes below readable
    version = _version(b)
    if version < 0:
        last_error_reason = b"invalid HTTP version in response"
        return -502
    if (b[8] != b' ' or b[9] < b'1' or b[9] > b'5' or b[10] < b'0' or b[10] > b'9'
            or b[11] < b'0' or b[11] > b'9'):
        last_error_reason = b"invalid status code"
        return -502
    status = (b[9] - 48) * 100 + (b[10] - 48) * 10 + (b[11] - 48)
    if b[12] == b'\r':
        rs = line_end = 12
    elif b[12] == b' ':
        rs = 13
        line_end = _skip_value(b, 13, n)
    else:
        last_error_reason = b"invalid status-line"
        return -502
    if b[line_end] != b'\r' or b[line_end + 1] != b'\n':
        last_error_reason = b"invalid status-line"
        return -502

    _scan_init(&st)
    r = _scan_fields(b, line_end + 2, n, offs, flags, MAX_HEADERS_CAP, &st)
    if r < 0:
        return -502

    # framing (RFC 9112 §6.3)
    if st.te_count and st.cl_count:
        last_error_reason = b"Transfer-Encoding with Content-Length in response"
        return -502
    if head_request or status < 200 or status == 204 or status == 304:
        framing = FRAMING_NONE
    elif st.te_count:
        if st.te_chunked != 1 or not st.te_last_chunked:
            last_error_reason = b"unsupported Transfer-Encoding in response"
            return -502
        framing = FRAMING_CHUNKED
    elif st.cl_count:
        framing = FRAMING_LENGTH
    else:
        framing = FRAMING_CLOSE

    if version == 11:
        keep_alive = not st.conn_close
    else:
        keep_alive = st.conn_keep_alive and not st.conn_close
    if framing == FRAMING_CLOSE:
        keep_alive = False

    if st.conn_other:
        _mark_connection_named(b, offs, flags, st.n)

    if line_end == rs:
        reason = _EMPTY
    elif line_end - rs == 2 and b[rs] == b'O' and b[rs + 1] == b'K':
        reason = _REASON_OK
    else:
        reason = _slice(raw, rs, line_end)
    if st.conn_upgrade and st.upgrade_idx >= 0:
        upgrade = _slice(raw, offs[4 * st.upgrade_idx + 2], offs[4 * st.upgrade_idx + 3])
    else:
        upgrade = None
    if _store_offsets(h, offs, flags, st.n) < 0:
        raise MemoryError()

    h.raw = raw
    h.version = version
    h.line_end = line_end
    h.keep_alive = keep_alive
    h.framing = framing
    h.content_length = st.cl_value if framing == FRAMING_LENGTH else -1
    h.upgrade = upgrade
    h.status = status
    h.reason = reason
    return 0


cdef int parse_response_head(ResponseHead h, bytes raw, bint head_request) noexcept:
    global last_error_reason
    try:
        return _response(h, raw, head_request)
    except BaseException:
        last_error_reason = b"out of memory"
        return -500


# ---------------------------------------------------------------------------------------------
# The Python interface (httphead.pyi)


cdef str _reason():
    if last_error_reason == NULL:
        return "malformed head"
    return (<bytes>last_error_reason).decode("ascii")


def _find_head_end(bytes data not None, Py_ssize_t start=0):
    """find_head_end() for tests: offset past CRLFCRLF, 0 (incomplete) or -400."""
    if start < 0:
        start = 0
    return find_head_end(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), start)


def parse_request(data, Limits limits=None):
    """Parse the request head at the start of `data`; (head, head length) or (None, 0).

    Raises HttpError(status, reason) for a malformed head (400), an oversized head or too many
    headers (431, also when no head end is found within max_head_bytes), a long target (414),
    an unsupported transfer coding or CONNECT (501) and an unknown HTTP version (505). Bytes
    after the head (a body, a pipelined request) are left alone.
    """
    cdef bytes b = data if type(data) is bytes else bytes(data)
    cdef Py_ssize_t n, scan, end
    cdef RequestHead h
    cdef int r
    if limits is None:
        limits = DEFAULT_LIMITS
    n = PyBytes_GET_SIZE(b)
    scan = n if n <= limits.max_head_bytes else limits.max_head_bytes
    end = find_head_end(PyBytes_AS_STRING(b), scan, 0)
    if end < 0:
        raise HttpError(<int>-end, _reason())
    if end == 0:
        if n >= limits.max_head_bytes:
            raise HttpError(431, "request head too large")
        return None, 0
    h = RequestHead.__new__(RequestHead)
    r = parse_request_head(h, b if end == n else _slice(b, 0, end), limits)
    if r < 0:
        raise HttpError(-r, _reason())
    return h, end


def parse_response(data, bint head_request=False):
    """Parse the response head at the start of `data`; (head, head length) or (None, 0).

    `head_request`: the request was HEAD, so the response has no body whatever it says.
    Every fault (including a head over RESPONSE_MAX_HEAD_BYTES) raises HttpError(502, reason):
    the gateway answers a bad upstream with 502.
    """
    cdef bytes b = data if type(data) is bytes else bytes(data)
    cdef Py_ssize_t n, scan, end
    cdef ResponseHead h
    cdef int r
    n = PyBytes_GET_SIZE(b)
    scan = n if n <= RESPONSE_MAX_HEAD_BYTES else RESPONSE_MAX_HEAD_BYTES
    end = find_head_end(PyBytes_AS_STRING(b), scan, 0)
    if end < 0:
        raise HttpError(502, _reason())
    if end == 0:
        if n >= RESPONSE_MAX_HEAD_BYTES:
            raise HttpError(502, "response head too large")
        return None, 0
    h = ResponseHead.__new__(ResponseHead)
    r = parse_response_head(h, b if end == n else _slice(b, 0, end), head_request)
    if r < 0:
        raise HttpError(502 if r != -500 else 500, _reason())
    return h, end
