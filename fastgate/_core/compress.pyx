# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
#
# Response compression (gzip, brotli) — theory of operation
# ==========================================================
#
# The relay asks negotiate() once per response of a route that has a CompressRule. It returns
# an Encoder only when every rule below holds; otherwise the response passes through
# byte for byte. The Encoder turns the upstream body, in whatever framing it came, into a
# compressed body framed as chunked for the client (the relay sends "Transfer-Encoding:
# chunked" and the Encoder's head_lines instead of the upstream's Content-Length /
# Transfer-Encoding).
#
# negotiate() rules (all must hold):
# - Accept-Encoding (RFC 9110 §12.5.3), every line of it, accepts the algorithm:
#     Accept-Encoding = #( codings [ weight ] )      codings = content-coding / "identity" / "*"
#     weight = OWS ";" OWS "q=" qvalue               qvalue = ( "0" [ "." 0*3DIGIT ] )
#                                                           / ( "1" [ "." 0*3("0") ] )
#   Tokens are case-insensitive. A coding's q is its own entry's (the first entry wins when a
#   coding is listed twice), else that of "*", else 0: not acceptable. An entry whose q does
#   not parse ("q=2", "q=0.5x", "q =1") is ignored as a whole, so a garbled refusal never
#   turns into an acceptance. "identity" is not an algorithm. Among the rule's algorithms
#   (in the rule's order) the one with the highest q > 0 wins; ties go to the rule's order.
#   No Accept-Encoding at all: nothing is compressed (a client that sends none rarely wants
#   it, and caches key on the header).
# - The request is HTTP/1.1 (an HTTP/1.0 client cannot read chunked) and not HEAD.
# - The response status is 200, 201, 202 or 203 (never 204/206/304/1xx/3xx) and the response
#   has a body: Content-Length > 0, chunked, or close-delimited.
# - Content-Length, when known, is >= min_bytes (tiny bodies grow when compressed).
# - No Content-Encoding line (already encoded, even "identity"), no Content-Range line
#   (partial content must stay byte-exact), no Cache-Control directive no-transform
#   (RFC 9110 §7.7: an intermediary must not transform such a response).
# - Exactly one Content-Type line, whose media type (before ";", OWS trimmed, lowercase) is
#   in the rule's list: exact ("application/json") or by a "type/*" entry ("text/*").
#   No Content-Type, or two of them: not compressed.
#
# Encoder:
# - gzip is zlib's deflate with the gzip wrapper (wbits 31); br is brotli.Compressor with a
#   512 KiB window (BROTLI_LGWIN), which bounds the memory of one response (gzip: ~256 KiB).
# - Chunked input is decoded by a strict ChunkedScanner (body.pyx, collect=True): bad framing
#   makes feed() return None, and finish() returns None unless the chunked body ended. Bytes
#   after the end and upstream trailers are dropped (the compressed body has no trailers).
# - Streaming: for chunked and close-delimited input each feed() that brought payload ends
#   with a sync flush (Z_SYNC_FLUSH / brotli flush()), so what the upstream sent (server-sent
#   events, long polls) reaches the client at once. A Content-Length body is a whole
#   document: it is fed without flushing for a better ratio (the compressor still emits as
#   its buffers fill, so nothing grows without bound).
# - Output is chunks "<hex size>\r\n<data>\r\n"; an empty output is b"", never a zero-size
#   chunk (which would end the body early). finish() ends with the last-chunk "0\r\n\r\n".
#
# Bounds: negotiate() is one pass over the response's header lines and one pass over each
# Accept-Encoding value, in C, without Python calls except to make the media-type bytes and the
# encoder. feed() costs the compression of the n bytes given; memory per Encoder is the
# compressor's state plus one piece of output.

import zlib

from libc.stdint cimport uint32_t

from fastgate._core.body cimport ChunkedScanner
from fastgate._core.httphead cimport (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    METHOD_HEAD,
    RequestHead,
    ResponseHead,
    header_name_is,
)

from fastgate._core.httphead import parse_request, parse_response

try:
    import brotli as _brotli_module
except ImportError:                          # optional: br is then skipped (see CompressRule)
    _brotli_module = None

BROTLI_AVAILABLE = _brotli_module is not None
ALGORITHMS = ("br", "gzip")
DEFAULT_ALGORITHMS = ("br", "gzip")
DEFAULT_CONTENT_TYPES = (
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/problem+json",
    "image/svg+xml",
    "application/x-ndjson",
)

cdef object _brotli = _brotli_module
cdef object _compressobj = zlib.compressobj
cdef int _DEFLATED = zlib.DEFLATED
cdef int _Z_SYNC_FLUSH = zlib.Z_SYNC_FLUSH
cdef int _Z_FINISH = zlib.Z_FINISH
cdef bytes _GZIP_LINES = b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
cdef bytes _BR_LINES = b"Content-Encoding: br\r\nVary: Accept-Encoding\r\n"
cdef bytes _LAST_CHUNK = b"0\r\n\r\n"

cdef enum:
    Q_UNSET = -1
    Q_BAD = -2
    MAX_MEDIA_TYPE = 255                    # a longer media type is not in any list


# ---- Accept-Encoding -------------------------------------------------------------------------

cdef inline bint _ows(unsigned char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    if c >= 65 and c <= 90:
        return c + 32
    return c


cdef int _qvalue(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    # qvalue in thousandths (0..1000), or Q_BAD. RFC 9110 §12.4.2.
    cdef int base, frac = 0, digits = 0
    cdef Py_ssize_t i
    if n < 1 or n > 5:
        return Q_BAD
    if s[0] == 48:
        base = 0
    elif s[0] == 49:
        base = 1000
    else:
        return Q_BAD
    if n == 1:
        return base
    if s[1] != 46:                           # "."
        return Q_BAD
    for i in range(2, n):
        if s[i] < 48 or s[i] > 57:
            return Q_BAD
        if base == 1000 and s[i] != 48:
            return Q_BAD
        frac = frac * 10 + (s[i] - 48)
        digits += 1
    while digits < 3:
        frac *= 10
        digits += 1
    return base + frac


cdef int _entry_q(const unsigned char *s, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # The weight of the parameters s[a:b] (after the coding's first ";"): 1000 without q,
    # Q_BAD when a "q" parameter does not parse. Other parameters are ignored.
    cdef int q = 1000
    cdef Py_ssize_t end, na, nb, va, vb, eq
    while a < b:
        end = a
        while end < b and s[end] != 59:      # ";"
            end += 1
        eq = a
        while eq < end and s[eq] != 61:      # "="
            eq += 1
        na = a
        nb = eq
        while na < nb and _ows(s[na]):
            na += 1
        while nb > na and _ows(s[nb - 1]):
            nb -= 1
        if nb - na == 1 and _lower(s[na]) == 113:     # "q"
            if eq == end or eq != nb:        # no "=", or blanks before it: not RFC weight
                return Q_BAD
            va = eq + 1
            vb = end
            while vb > va and _ows(s[vb - 1]):
                vb -= 1
            q = _qvalue(s + va, vb - va)
            if q == Q_BAD:
                return Q_BAD
        a = end + 1
    return q


cdef void _scan_accept(const unsigned char *s, Py_ssize_t a, Py_ssize_t b, int *q) noexcept nogil:
    # Fold one Accept-Encoding value s[a:b] into q[ALG_BR], q[ALG_GZIP], q[ALG_STAR]
    # (Q_UNSET until an entry names the coding; the first valid entry wins).
    cdef Py_ssize_t end, ca, cb, semi, n
    cdef int w, which
    while a < b:
        end = a
        while end < b and s[end] != 44:      # ","
            end += 1
        semi = a
        while semi < end and s[semi] != 59:
            semi += 1
        ca = a
        cb = semi
        while ca < cb and _ows(s[ca]):
            ca += 1
        while cb > ca and _ows(s[cb - 1]):
            cb -= 1
        n = cb - ca
        which = -1
        if n == 1 and s[ca] == 42:           # "*"
            which = ALG_STAR
        elif n == 2 and _lower(s[ca]) == 98 and _lower(s[ca + 1]) == 114:          # br
            which = ALG_BR
        elif (n == 4 and _lower(s[ca]) == 103 and _lower(s[ca + 1]) == 122
              and _lower(s[ca + 2]) == 105 and _lower(s[ca + 3]) == 112):          # gzip
            which = ALG_GZIP
        if which >= 0 and q[which] == Q_UNSET:
            w = _entry_q(s, semi + 1, end) if semi < end else 1000
            if w != Q_BAD:
                q[which] = w
        a = end + 1


cdef int _choose(CompressRule rule, RequestHead req) noexcept:
    # The rule's algorithm with the highest acceptable q, or -1.
    cdef int q[3]
    cdef int k, alg, w, best = -1, best_q = 0
    cdef Py_ssize_t i
    cdef const uint32_t *off
    cdef const char *raw = req.raw
    cdef bint seen = False
    q[0] = Q_UNSET
    q[1] = Q_UNSET
    q[2] = Q_UNSET
    for i in range(req.n_headers):
        off = req.offs + 4 * i
        if header_name_is(raw, off, b"accept-encoding", 15):
            seen = True
            _scan_accept(<const unsigned char *>raw, off[2], off[3], q)
    if not seen:
        return -1
    for k in range(rule.n_algs):
        alg = rule.algs[k]
        w = q[alg]
        if w == Q_UNSET:
            w = q[ALG_STAR] if q[ALG_STAR] != Q_UNSET else 0
        if w > best_q:
            best = alg
            best_q = w
    return best


# ---- response checks -------------------------------------------------------------------------

cdef bint _no_transform(const unsigned char *s, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # Cache-Control value s[a:b] has the directive no-transform (RFC 9111 §5.2.2.6).
    cdef const char *word = b"no-transform"
    cdef Py_ssize_t end, na, nb, i
    cdef bint same
    while a < b:
        end = a
        while end < b and s[end] != 44:
            end += 1
        na = a
        nb = a
        while nb < end and s[nb] != 61:
            nb += 1
        while na < nb and _ows(s[na]):
            na += 1
        while nb > na and _ows(s[nb - 1]):
            nb -= 1
        if nb - na == 12:
            same = True
            for i in range(12):
                if _lower(s[na + i]) != <unsigned char>word[i]:
                    same = False
                    break
            if same:
                return True
        a = end + 1
    return False


cdef bint _type_listed(CompressRule rule, const unsigned char *s, Py_ssize_t a,
                       Py_ssize_t b):
    # The media type of Content-Type value s[a:b] is in the rule's list.
    cdef Py_ssize_t end = a, slash = -1, i, n
    cdef unsigned char buf[MAX_MEDIA_TYPE]
    while end < b and s[end] != 59:
        end += 1
    while end > a and _ows(s[end - 1]):
        end -= 1
    n = end - a
    if n == 0 or n > MAX_MEDIA_TYPE:
        return False
    for i in range(n):
        buf[i] = _lower(s[a + i])
        if buf[i] == 47 and slash < 0:       # "/"
            slash = i
    if slash <= 0 or slash == n - 1:
        return False
    if (<const char *>buf)[:n] in rule.exact_types:
        return True
    return (<const char *>buf)[:slash] in rule.wild_types


cdef Encoder negotiate(CompressRule rule, RequestHead req, ResponseHead resp):
    cdef int framing, alg
    cdef Py_ssize_t i, ct = -1
    cdef const uint32_t *off
    cdef const char *raw
    if rule is None or req is None or resp is None or rule.n_algs == 0:
        return None
    if resp.status < 200 or resp.status > 203:
        return None
    framing = resp.framing
    if framing == FRAMING_LENGTH:
        if resp.content_length <= 0 or resp.content_length < rule.min_bytes:
            return None
    elif framing != FRAMING_CHUNKED and framing != FRAMING_CLOSE:
        return None
    if req.version != 11 or req.method is METHOD_HEAD:
        return None
    raw = resp.raw
    for i in range(resp.n_headers):
        off = resp.offs + 4 * i
        if header_name_is(raw, off, b"content-type", 12):
            if ct >= 0:
                return None
            ct = i
        elif (header_name_is(raw, off, b"content-encoding", 16)
              or header_name_is(raw, off, b"content-range", 13)):
            return None
        elif header_name_is(raw, off, b"cache-control", 13):
            if _no_transform(<const unsigned char *>raw, off[2], off[3]):
                return None
    if ct < 0:
        return None
    off = resp.offs + 4 * ct
    if not _type_listed(rule, <const unsigned char *>raw, off[2], off[3]):
        return None
    alg = _choose(rule, req)
    if alg < 0:
        return None
    return _new_encoder(rule, alg, framing)


cdef Encoder _new_encoder(CompressRule rule, int alg, int framing):
    cdef Encoder enc = Encoder.__new__(Encoder)
    enc.alg = alg
    if alg == ALG_GZIP:
        enc.comp = _compressobj(rule.gzip_level, _DEFLATED, 31)
        enc.head_lines = _GZIP_LINES
        enc.algorithm = "gzip"
    else:
        enc.comp = _brotli.Compressor(quality=rule.brotli_quality, lgwin=BROTLI_LGWIN)
        enc.head_lines = _BR_LINES
        enc.algorithm = "br"
    enc.sync = framing != FRAMING_LENGTH
    enc.scanner = ChunkedScanner(collect=True) if framing == FRAMING_CHUNKED else None
    return enc


cdef inline bytes _chunk(bytes data):
    # One chunked-framed chunk; b"" for no data (a zero-size chunk would end the body).
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


cdef class CompressRule:
    """What one route compresses, and how (see the module comment for the rules)."""

    def __init__(self, algorithms=DEFAULT_ALGORITHMS, long long min_bytes=1024,
                 content_types=DEFAULT_CONTENT_TYPES, int gzip_level=6, int brotli_quality=4):
        cdef list names = []
        cdef set exact = set()
        cdef set wild = set()
        cdef str name, t, kind, sub
        if min_bytes < 0:
            raise ValueError("min_bytes must be >= 0")
        if not 1 <= gzip_level <= 9:
            raise ValueError("gzip_level must be 1..9")
        if not 0 <= brotli_quality <= 11:
            raise ValueError("brotli_quality must be 0..11")
        for name in algorithms:
            if name not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {name!r} (known: br, gzip)")
            if name in names:
                raise ValueError(f"algorithm {name!r} is listed twice")
            names.append(name)
        # br without the brotli package is skipped: the middleware says so at config time.
        names = [n for n in names if n != "br" or BROTLI_AVAILABLE]
        self.n_algs = len(names)
        for i, name in enumerate(names):
            self.algs[i] = ALG_BR if name == "br" else ALG_GZIP
        self.algorithms = tuple(names)
        lowered = []
        for t in content_types:
            t = t.lower()
            kind, slash, sub = t.partition("/")
            if (not slash or not kind or not sub or "*" in kind or "/" in sub
                    or ("*" in sub and sub != "*") or not t.isascii()
                    or len(t) > MAX_MEDIA_TYPE or any(c in " \t;," for c in t)):
                raise ValueError(f"content type {t!r} is not type/subtype or type/*")
            if sub == "*":
                wild.add(kind.encode("ascii"))
            else:
                exact.add(t.encode("ascii"))
            lowered.append(t)
        self.exact_types = frozenset(exact)
        self.wild_types = frozenset(wild)
        self.content_types = tuple(lowered)
        self.min_bytes = min_bytes
        self.gzip_level = gzip_level
        self.brotli_quality = brotli_quality

    def __repr__(self):
        return (f"CompressRule(algorithms={self.algorithms!r}, min_bytes={self.min_bytes}, "
                f"content_types={self.content_types!r}, gzip_level={self.gzip_level}, "
                f"brotli_quality={self.brotli_quality})")


cdef class Encoder:
    """The compressor of one response; made by negotiate() only."""

    def __init__(self):
        raise TypeError("Encoder objects are made by negotiate()")

    cdef bytes feed(self, const char *p, Py_ssize_t n):
        cdef Py_ssize_t r
        cdef list parts
        cdef list out
        cdef object comp = self.comp
        if self.failed or self.finished:
            return None
        if n <= 0:
            return b""
        if self.scanner is not None:
            r = self.scanner.scan(p, n)
            if r < 0:
                self.failed = True
                self.comp = None
                return None
            parts = self.scanner._parts
            if not parts:
                return b""
            self.scanner._parts = []
        else:
            parts = [p[:n]]
        out = []
        if self.alg == ALG_GZIP:
            for part in parts:
                out.append(comp.compress(part))
            if self.sync:
                out.append(comp.flush(_Z_SYNC_FLUSH))
        else:
            for part in parts:
                out.append(comp.process(part))
            if self.sync:
                out.append(comp.flush())
        return _chunk(b"".join(out))

    cdef bytes finish(self):
        cdef bytes tail
        if self.failed or self.finished:
            return None
        if self.scanner is not None and not self.scanner.done:
            self.failed = True
            self.comp = None
            return None
        self.finished = True
        if self.alg == ALG_GZIP:
            tail = self.comp.flush(_Z_FINISH)
        else:
            tail = self.comp.finish()
        self.comp = None                    # free the compressor's state now
        return _chunk(tail) + _LAST_CHUNK

    def push(self, data):
        """feed() for tests and tools: `data` is upstream body bytes in the response framing."""
        cdef bytes b = bytes(data)
        return self.feed(b, len(b))

    def end(self):
        """finish() for tests and tools."""
        return self.finish()


def negotiate_heads(CompressRule rule, bytes req_head, bytes resp_head):
    """Parse a request head and its response head and run negotiate(): the Encoder, or None.

    For tests and tools: the relay calls the cdef negotiate() with heads it already parsed.
    """
    req, n = parse_request(req_head)
    if req is None:
        raise ValueError("incomplete request head")
    resp, n = parse_response(resp_head, req.method == b"HEAD")
    if resp is None:
        raise ValueError("incomplete response head")
    return negotiate(rule, req, resp)


def compress_body(CompressRule rule, bytes req_head, bytes resp_head, list pieces):
    """negotiate_heads(), then feed() every piece and finish(): the chunked client body.

    None when negotiate() declines or the upstream body is bad (see Encoder.feed()).
    """
    cdef Encoder enc = negotiate_heads(rule, req_head, resp_head)
    cdef list out = []
    cdef bytes b
    if enc is None:
        return None
    for piece in pieces:
        b = enc.push(piece)
        if b is None:
            return None
        out.append(b)
    b = enc.finish()
    if b is None:
        return None
    out.append(b)
    return b"".join(out)
