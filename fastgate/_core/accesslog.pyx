# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Access log, audit stream and span records, formatted in C (accesslog.pxd, DESIGN.md §6).

Theory of operation
-------------------
At the exchange-end hook the connection asks `AccessLog.select()` which streams want the
exchange, fills a `LogFields` of pointers into objects it holds, and calls `write()`, which
formats each line straight into that stream's `LogStream` buffer. Python takes whole batches
(`LogStream.take`) and writes them from a thread (fastgate/logs): the event loop never waits
on a disk or a pipe. The line formats are the contract in docs/access-log.md.

Rules this file obeys
---------------------
- Never a credential in a line: the query of the request target is redacted before anything
  is formatted. A query element whose percent-decoded key equals (ASCII case-insensitively)
  a configured `redact` key has its value replaced by `REDACTED`; the decision is made on
  the whole element of the original target, so a line cut at its length limit can end
  inside "REDACTED" but never inside a hidden value. `drop_query` logs no query at all.
  Identity fields are the subject / method / consumer names, never the credential; the deny
  reason is a fixed phrase chosen by the middleware.
- Every line is valid and one line: strings are JSON-escaped (control bytes, 0x7f, quotes,
  backslashes; every byte of an invalid UTF-8 sequence becomes U+FFFD) or, in the Common Log
  Format, `\\xHH`-escaped, so a client cannot inject a line break or a fake field.
- Bounded: a line is at most MAX_LINE bytes, whatever the input. Each value is cut at its
  own limit (MAX_PATH_LOG for the path, MAX_VALUE_LOG for everything else) without splitting
  a UTF-8 sequence, then `...` is appended; and the escaped strings of one line share a
  budget of MAX_LINE - LINE_SLACK bytes (a value that would pass it is cut there the same
  way), LINE_SLACK covering every key, number and null of the longest line form.
- Never blocking, never waiting: a line that does not fit in its stream's buffer is dropped
  and counted (`LogStream.dropped`). `select()` and `write()` create no Python object and
  cannot raise; the stream's `on_ready` callback (called once per fill, when the buffer
  passes `flush_at`) is the only Python code on the path, and its exceptions are swallowed.
- Wall clock: one clock_gettime(CLOCK_REALTIME) per write(); the date part of the timestamps
  is formatted with gmtime_r only when the second changes (cached per process).
- Sampling: xorshift64* per AccessLog, seeded from os.urandom (or `seed`, for tests). A
  sample threshold is a u32: an exchange is logged when the draw's high 32 bits are below it;
  SAMPLE_ALL logs all without a draw. Not a CSPRNG: sampling is not a security decision.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp, memcpy, memset, strlen
from libc.time cimport time_t, tm
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from fastgate._core.stats cimport (
    ExchangeRecord, RATE_NONE, RATE_ALLOWED, RATE_FALLBACK, RATE_LIMITED, DENY_NONE,
    DENY_AUTH_FAILED, DENY_FORBIDDEN, DENY_RATE_LIMITED, DENY_IP, DENY_AUTH_UNAVAILABLE,
)

cdef extern from "<time.h>" nogil:
    tm *gmtime_r(const time_t *timep, tm *result)

cdef extern from *:
    """
    /* Borrowed, refcount-free reads of the redact tuple (a tuple of bytes, fixed at
       construction): the write path takes no reference and makes no object. */
    static inline Py_ssize_t fg_tuple_len(PyObject *t) { return PyTuple_GET_SIZE(t); }
    static inline const char *fg_key(PyObject *t, Py_ssize_t i, Py_ssize_t *n) {
        PyObject *b = PyTuple_GET_ITEM(t, i);
        *n = PyBytes_GET_SIZE(b);
        return PyBytes_AS_STRING(b);
    }
    """
    Py_ssize_t tuple_size "fg_tuple_len"(PyObject *t) nogil
    const char *tuple_key "fg_key"(PyObject *t, Py_ssize_t i, Py_ssize_t *n) nogil

# The enum constant is an int to Cython (-1 when made a Python int): convert this one instead.
cdef unsigned int _SAMPLE_ALL = SAMPLE_ALL

cdef enum:
    LINE_SLACK = 2048       # room kept after the string budget: keys, numbers, nulls
    MAX_KEY = 256           # longest redact key (bytes); a longer query key never matches
    PATH_BUF = MAX_PATH_LOG + 8     # the redacted path, enough to know it is over the limit
    REFERER_BUF = MAX_VALUE_LOG + 8 # the redacted referer (combined format), likewise
    MAX_NAMES = 512                 # longest names_fragment kept
    SAFE_MAX = 128                  # longest pre-checked field copied without escaping

DENY_EVENTS = {
    DENY_AUTH_FAILED: "auth_failed",
    DENY_FORBIDDEN: "forbidden",
    DENY_RATE_LIMITED: "rate_limited",
    DENY_IP: "ip_denied",
    DENY_AUTH_UNAVAILABLE: "auth_unavailable",
}

# ---------------------------------------------------------------------------------------------
# Byte classes and small writers

cdef uint8_t _JCLASS[256]   # JSON: 0 copy, 1 escape, 2 non-ASCII (UTF-8 check)
cdef uint8_t _CCLASS[256]   # CLF: 0 copy, 1 \xHH or backslash escape
cdef const char *_HEXD = b"0123456789abcdef"
cdef const char *_MONTHS = b"JanFebMarAprMayJunJulAugSepOctNovDec"


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        _JCLASS[c] = 2 if c >= 0x80 else (1 if c < 0x20 or c == 0x7f or c == 34 or c == 92
                                            else 0)
        _CCLASS[c] = 1 if c < 0x20 or c >= 0x7f or c == 34 or c == 92 else 0


_init_tables()


cdef inline char *_put(char *o, const char *s) noexcept nogil:
    """A C string literal (the compiler folds strlen of a literal)."""
    cdef size_t n = strlen(s)
    memcpy(o, s, n)
    return o + n


cdef inline char *_uint(char *o, unsigned long long v) noexcept nogil:
    cdef char tmp[24]
    cdef int k = 0
    while True:
        tmp[k] = <char>(48 + v % 10)
        v //= 10
        k += 1
        if v == 0:
            break
    while k > 0:
        k -= 1
        o[0] = tmp[k]
        o += 1
    return o


cdef inline char *_int(char *o, long long v) noexcept nogil:
    if v < 0:
        o[0] = b'-'
        return _uint(o + 1, <unsigned long long>0 - <unsigned long long>v)
    return _uint(o, <unsigned long long>v)


cdef inline char *_ms(char *o, long long ns) noexcept nogil:
    """Milliseconds with 3 decimals (microsecond resolution, truncated; never negative)."""
    cdef unsigned long long us
    if ns < 0:
        ns = 0
    us = <unsigned long long>ns // 1000
    o = _uint(o, us // 1000)
    us %= 1000
    o[0] = b'.'
    o[1] = <char>(48 + us // 100)
    o[2] = <char>(48 + us // 10 % 10)
    o[3] = <char>(48 + us % 10)
    return o + 4


cdef inline void _two(char *o, int v) noexcept nogil:
    o[0] = <char>(48 + v // 10 % 10)
    o[1] = <char>(48 + v % 10)


# ---------------------------------------------------------------------------------------------
# Wall clock, with the date formatted once per second

cdef time_t _clock_sec = -1
cdef char _iso[20]          # "YYYY-MM-DDTHH:MM:SS."
cdef char _clf[28]          # "[dd/Mon/YYYY:HH:MM:SS +0000]"


cdef void _set_second(time_t sec) noexcept nogil:
    global _clock_sec
    cdef tm t
    cdef int year
    gmtime_r(&sec, &t)
    year = t.tm_year + 1900
    if year < 0:
        year = 0
    elif year > 9999:
        year = 9999
    _two(_iso, year // 100)
    _two(_iso + 2, year)
    _iso[4] = b'-'
    _two(_iso + 5, t.tm_mon + 1)
    _iso[7] = b'-'
    _two(_iso + 8, t.tm_mday)
    _iso[10] = b'T'
    _two(_iso + 11, t.tm_hour)
    _iso[13] = b':'
    _two(_iso + 14, t.tm_min)
    _iso[16] = b':'
    _two(_iso + 17, t.tm_sec)
    _iso[19] = b'.'
    _clf[0] = b'['
    _two(_clf + 1, t.tm_mday)
    _clf[3] = b'/'
    memcpy(_clf + 4, _MONTHS + 3 * t.tm_mon, 3)
    _clf[7] = b'/'
    memcpy(_clf + 8, _iso, 4)
    _clf[12] = b':'
    memcpy(_clf + 13, _iso + 11, 8)
    memcpy(_clf + 21, b" +0000]", 7)
    _clock_sec = sec


cdef inline void _now(timespec *ts) noexcept nogil:
    clock_gettime(CLOCK_REALTIME, ts)
    if ts.tv_sec != _clock_sec:
        _set_second(ts.tv_sec)


cdef inline char *_time_json(char *o, const timespec *ts) noexcept nogil:
    # "time":"YYYY-MM-DDTHH:MM:SS.uuuuuuZ"
    cdef long us = ts.tv_nsec // 1000
    o = _put(o, b'"time":"')
    memcpy(o, _iso, 20)
    o += 20
    _two(o, us // 10000)
    _two(o + 2, us // 100)
    _two(o + 4, us)
    return _put(o + 6, b'Z"')


# ---------------------------------------------------------------------------------------------
# Escaping

cdef inline int _utf8_len(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    """Length of the valid UTF-8 sequence at s[0] (n bytes available), 0 when invalid
    (overlong forms, surrogates and code points over U+10FFFF are invalid)."""
    cdef uint8_t c = s[0]
    cdef uint8_t b
    if c < 0x80:
        return 1
    if c < 0xC2:
        return 0
    if c < 0xE0:
        return 2 if n >= 2 and (s[1] & 0xC0) == 0x80 else 0
    if n < 3 or (s[2] & 0xC0) != 0x80:
        return 0
    b = s[1]
    if c < 0xF0:
        if c == 0xE0:
            return 3 if 0xA0 <= b <= 0xBF else 0
        if c == 0xED:
            return 3 if 0x80 <= b <= 0x9F else 0
        return 3 if (b & 0xC0) == 0x80 else 0
    if c > 0xF4 or n < 4 or (s[3] & 0xC0) != 0x80:
        return 0
    if c == 0xF0:
        return 4 if 0x90 <= b <= 0xBF else 0
    if c == 0xF4:
        return 4 if 0x80 <= b <= 0x8F else 0
    return 4 if (b & 0xC0) == 0x80 else 0


cdef inline Py_ssize_t _cut(const uint8_t *s, Py_ssize_t n, Py_ssize_t limit) noexcept nogil:
    """How many bytes of s to log: n when n <= limit, else `limit` backed off to the start of
    the UTF-8 sequence that the cut would split."""
    cdef Py_ssize_t k = limit
    if n <= limit:
        return n
    while k > limit - 3 and k > 0 and (s[k] & 0xC0) == 0x80:
        k -= 1
    return k


cdef inline uint64_t _special8(uint64_t x, bint space) noexcept nogil:
    """Non-zero when one of the 8 bytes in x needs escaping: >= 0x7f, < 0x20, '"', '\\'
    (or ' ' when `space`). Exact for "any", which is all the fast path asks (SWAR: Mycroft's
    has-zero-byte and has-less-than tests)."""
    cdef uint64_t y, r
    r = x | (x + 0x0101010101010101ULL)                             # >= 0x7f sets bit 7
    r |= (x - 0x2020202020202020ULL) & ~x                           # < 0x20
    y = x ^ 0x2222222222222222ULL
    r |= (y - 0x0101010101010101ULL) & ~y                           # '"'
    y = x ^ 0x5C5C5C5C5C5C5C5CULL
    r |= (y - 0x0101010101010101ULL) & ~y                           # '\\'
    if space:
        y = x ^ 0x2020202020202020ULL
        r |= (y - 0x0101010101010101ULL) & ~y                       # ' '
    return r & 0x8080808080808080ULL


cdef char *_jbody(char *o, char *end, const char *p, Py_ssize_t n,
                  Py_ssize_t limit) noexcept nogil:
    """The JSON-escaped contents of p[:n] (no quotes): cut at `limit` input bytes, or where
    the output would pass `end`, with `...` appended when cut (the result stays <= end)."""
    cdef const uint8_t *s = <const uint8_t *>p
    cdef Py_ssize_t m = _cut(s, n, limit)
    cdef Py_ssize_t i = 0
    cdef int k
    cdef uint8_t c, cls
    cdef uint64_t x
    cdef bint cut = m < n
    cdef char *stop = end - 9       # the widest unit (6, or 8 plain bytes) and "..."
    while i < m:
        if o > stop:
            cut = True
            break
        if i + 8 <= m:              # the common case: 8 plain ASCII bytes at a time
            memcpy(&x, s + i, 8)
            if _special8(x, False) == 0:
                memcpy(o, &x, 8)
                o += 8
                i += 8
                continue
        c = s[i]
        cls = _JCLASS[c]
        if cls == 0:
            o[0] = <char>c
            o += 1
            i += 1
        elif cls == 1:
            o[0] = b'\\'
            if c == 34 or c == 92:
                o[1] = <char>c
                o += 2
            elif c == 10:
                o[1] = b'n'
                o += 2
            elif c == 13:
                o[1] = b'r'
                o += 2
            elif c == 9:
                o[1] = b't'
                o += 2
            else:
                memcpy(o + 1, b"u00", 3)
                o[4] = _HEXD[c >> 4]
                o[5] = _HEXD[c & 15]
                o += 6
            i += 1
        else:
            k = _utf8_len(s + i, m - i)
            if k == 0:
                memcpy(o, b"\\ufffd", 6)
                o += 6
                i += 1
            else:
                memcpy(o, s + i, k)
                o += k
                i += k
    if cut:
        memcpy(o, b"...", 3)
        o += 3
    return o


cdef inline char *_js(char *o, char *end, const Text *t, Py_ssize_t limit) noexcept nogil:
    """A Text as a JSON string, or null when absent."""
    if t.p == NULL:
        return _put(o, b"null")
    o[0] = b'"'
    o = _jbody(o + 1, end, t.p, t.n, limit)
    o[0] = b'"'
    return o + 1



cdef inline char *_jsafe(char *o, char *end, const Text *t) noexcept nogil:
    """A Text the caller guarantees is JSON-safe (printable ASCII without '"' or '\\': the
    request id the writer checked or made, the hex trace ids, the method token the parser
    checked), as a JSON string without an escaping pass; a long one takes the escaping path,
    which keeps to the line's budget. absent -> null."""
    if t.p == NULL:
        return _put(o, b"null")
    if t.n > SAFE_MAX:
        return _js(o, end, t, MAX_VALUE_LOG)
    o[0] = b'"'
    memcpy(o + 1, t.p, t.n)
    o[t.n + 1] = b'"'
    return o + t.n + 2


cdef inline char *_jpre(char *o, char *end, const Text *t, int pre) noexcept nogil:
    """A Text as a JSON string; with `pre` it already is one (json_string(), quotes
    included) and is copied, or cut to "..." when the line's budget has no room for it."""
    if not pre or t.p == NULL:
        return _js(o, end, t, MAX_VALUE_LOG)
    if o + t.n > end:
        return _put(o, b'"..."')
    memcpy(o, t.p, t.n)
    return o + t.n


def json_string(str value not None):
    """`value` as a JSON string (quotes included), escaped and cut exactly as write() does a
    field: what a connection may keep per route or server and pass pre-escaped (PRE_*)."""
    cdef Text t
    cdef char buf[MAX_VALUE_LOG * 6 + 16]
    b = value.encode("utf-8", "surrogateescape")
    t.p = PyBytes_AS_STRING(b)
    t.n = PyBytes_GET_SIZE(b)
    cdef char *o = _js(buf, buf + sizeof(buf), &t, MAX_VALUE_LOG)
    return PyBytes_FromStringAndSize(buf, o - buf)


cdef inline char *_names(char *o, char *end, const LogFields *f) noexcept nogil:
    """`,"entrypoint":...,"route":...`: the route's preformatted fragment (names_fragment) when
    the connection has one, else the two fields escaped now."""
    if f.names.p != NULL:
        if o + 1 + f.names.n > end:
            # No room left in this line's string budget: the names are cut to nothing.
            return _put(o, b',"entrypoint":"...","route":"..."')
        o[0] = b','
        memcpy(o + 1, f.names.p, f.names.n)
        return o + 1 + f.names.n
    o = _put(o, b',"entrypoint":')
    o = _js(o, end, &f.entrypoint, MAX_VALUE_LOG)
    o = _put(o, b',"route":')
    return _js(o, end, &f.route, MAX_VALUE_LOG)


def names_fragment(str entrypoint not None, str route=None):
    """`"entrypoint":"<e>","route":"<r>"` (route null when None) escaped exactly as write()
    escapes them: the connection keeps one per route so the names are not escaped per line.
    None when the fragment would be longer than MAX_NAMES bytes (then each line escapes the
    names itself, within its length budget)."""
    cdef Text e, r
    cdef char buf[2 * MAX_VALUE_LOG * 6 + 64]
    cdef char *o = buf
    eb = entrypoint.encode("utf-8", "surrogateescape")
    e.p = PyBytes_AS_STRING(eb)
    e.n = PyBytes_GET_SIZE(eb)
    r.p = NULL
    r.n = 0
    if route is not None:
        rb = route.encode("utf-8", "surrogateescape")
        r.p = PyBytes_AS_STRING(rb)
        r.n = PyBytes_GET_SIZE(rb)
    o = _put(o, b'"entrypoint":')
    o = _js(o, buf + sizeof(buf), &e, MAX_VALUE_LOG)
    o = _put(o, b',"route":')
    o = _js(o, buf + sizeof(buf), &r, MAX_VALUE_LOG)
    if o - buf > MAX_NAMES:
        return None
    return PyBytes_FromStringAndSize(buf, o - buf)

cdef inline char *_jsraw(char *o, char *end, const char *p, Py_ssize_t n,
                         Py_ssize_t limit) noexcept nogil:
    if p == NULL:
        return _put(o, b"null")
    o[0] = b'"'
    o = _jbody(o + 1, end, p, n, limit)
    o[0] = b'"'
    return o + 1


cdef char *_cbody(char *o, char *end, const char *p, Py_ssize_t n, Py_ssize_t limit,
                  bint space) noexcept nogil:
    """Common Log Format escaping of p[:n]: `"` and `\\` backslash-escaped, bytes < 0x20 or
    >= 0x7f (and spaces when `space`) as \\xHH; cut like _jbody."""
    cdef const uint8_t *s = <const uint8_t *>p
    cdef Py_ssize_t m = _cut(s, n, limit)
    cdef Py_ssize_t i = 0
    cdef uint8_t c
    cdef uint64_t x
    cdef bint cut = m < n
    cdef char *stop = end - 11      # the widest unit (4, or 8 plain bytes) and "..."
    while i < m:
        if o > stop:
            cut = True
            break
        if i + 8 <= m:
            memcpy(&x, s + i, 8)
            if _special8(x, space) == 0:
                memcpy(o, &x, 8)
                o += 8
                i += 8
                continue
        c = s[i]
        if _CCLASS[c] == 0 and not (space and c == 32):
            o[0] = <char>c
            o += 1
        elif c == 34 or c == 92:
            o[0] = b'\\'
            o[1] = <char>c
            o += 2
        else:
            o[0] = b'\\'
            o[1] = b'x'
            o[2] = _HEXD[c >> 4]
            o[3] = _HEXD[c & 15]
            o += 4
        i += 1
    if cut:
        memcpy(o, b"...", 3)
        o += 3
    return o


cdef inline char *_cfield(char *o, char *end, const Text *t, Py_ssize_t limit) noexcept nogil:
    """An unquoted CLF field: `-` when absent or empty, spaces escaped."""
    if t.p == NULL or t.n == 0:
        o[0] = b'-'
        return o + 1
    return _cbody(o, end, t.p, t.n, limit, True)


cdef inline char *_cquoted(char *o, char *end, const Text *t, Py_ssize_t limit) noexcept nogil:
    o[0] = b'"'
    if t.p == NULL or t.n == 0:
        o[1] = b'-'
        o += 2
    else:
        o = _cbody(o + 1, end, t.p, t.n, limit, False)
    o[0] = b'"'
    return o + 1


# ---------------------------------------------------------------------------------------------
# Query redaction

cdef inline int _hexval(uint8_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef bint _key_matches(const uint8_t *k, Py_ssize_t n, PyObject *keys) noexcept nogil:
    """The query key k[:n], percent-decoded (invalid escapes kept) and ASCII-lowercased,
    equals one of `keys` (a tuple of lowercase bytes)."""
    cdef uint8_t buf[MAX_KEY]
    cdef Py_ssize_t i = 0, m = 0, j
    cdef int h1, h2
    cdef uint8_t c
    cdef const char *key
    cdef Py_ssize_t key_n
    while i < n:
        if m == MAX_KEY:
            return False
        c = k[i]
        i += 1
        if c == 37 and i + 1 < n:       # '%' and two more bytes
            h1 = _hexval(k[i])
            h2 = _hexval(k[i + 1])
            if h1 >= 0 and h2 >= 0:
                c = <uint8_t>(h1 * 16 + h2)
                i += 2
        if 65 <= c <= 90:
            c += 32
        buf[m] = c
        m += 1
    for j in range(tuple_size(keys)):
        key = tuple_key(keys, j, &key_n)
        if key_n == m and memcmp(key, buf, m) == 0:
            return True
    return False


cdef inline Py_ssize_t _copy(char *dst, Py_ssize_t o, Py_ssize_t cap, const void *src,
                             Py_ssize_t n) noexcept nogil:
    if n > cap - o:
        n = cap - o
    memcpy(dst + o, src, n)
    return o + n


cdef Py_ssize_t _redact(char *dst, Py_ssize_t cap, const char *p, Py_ssize_t n,
                        PyObject *keys, bint drop_query) noexcept nogil:
    """The target p[:n] with its query redacted, into dst (at most `cap` bytes: a longer
    result is cut there). Query elements are split on '&'; an element whose key matches has
    the value after its first '=' replaced by REDACTED. Returns the bytes written."""
    cdef const uint8_t *s = <const uint8_t *>p
    cdef const uint8_t *q = <const uint8_t *>memchr(s, b'?', n)
    cdef const uint8_t *amp
    cdef const uint8_t *eq
    cdef Py_ssize_t o, i, e, ke
    if q == NULL:
        return _copy(dst, 0, cap, s, n)
    i = q - s
    o = _copy(dst, 0, cap, s, i if drop_query else i + 1)
    if drop_query:
        return o
    i += 1
    while o < cap:
        amp = <const uint8_t *>memchr(s + i, b'&', n - i)
        e = n if amp == NULL else amp - s
        eq = <const uint8_t *>memchr(s + i, b'=', e - i)
        ke = e if eq == NULL else eq - s
        if ke < e and _key_matches(s + i, ke - i, keys):
            o = _copy(dst, o, cap, s + i, ke + 1 - i)
            o = _copy(dst, o, cap, b"REDACTED", 8)
        else:
            o = _copy(dst, o, cap, s + i, e - i)
        if e >= n:
            break
        o = _copy(dst, o, cap, b"&", 1)
        i = e + 1
    return o


def _redact_keys(redact):
    """The redact option as stored: a tuple of distinct lowercase ASCII bytes."""
    if isinstance(redact, (str, bytes)):
        raise TypeError("redact must be an iterable of str keys, not a single string")
    keys = []
    for key in redact:
        if not isinstance(key, str) or not key:
            raise ValueError(f"redact: {key!r} is not a non-empty str key")
        if not key.isascii():
            raise ValueError(f"redact: {key!r} is not ASCII")
        b = key.encode("ascii").lower()
        if len(b) > MAX_KEY:
            raise ValueError(f"redact: keys are at most {MAX_KEY} bytes")
        if b not in keys:
            keys.append(b)
    return tuple(keys)


def redact_target(bytes target not None, redact=(), bint drop_query=False):
    """The request target as it is logged, before escaping and the length cut (tests)."""
    cdef tuple keys = _redact_keys(redact)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(target)
    # Growth: each REDACTED (8 bytes) needs a matched element of at least "k=" and a "&".
    cdef Py_ssize_t cap = 5 * n + 16
    cdef char *buf = <char *>malloc(cap)
    cdef Py_ssize_t m
    if buf == NULL:
        raise MemoryError()
    try:
        m = _redact(buf, cap, PyBytes_AS_STRING(target), n, <PyObject *>keys, drop_query)
        return PyBytes_FromStringAndSize(buf, m)
    finally:
        free(buf)


def sample_threshold(double rate):
    """The u32 sample threshold for a rate in 0.0..1.0: 1.0 -> SAMPLE_ALL, 0.0 -> 0."""
    if rate != rate:
        raise ValueError("sample rate is NaN")
    if rate >= 1.0:
        return _SAMPLE_ALL
    if rate <= 0.0:
        return 0
    return min(int(rate * 4294967296.0), _SAMPLE_ALL)


# ---------------------------------------------------------------------------------------------
# Line formatters: each writes one whole line at `line` (MAX_LINE bytes of room) and returns
# its length. `path` is the redacted target (NULL when there is none).

cdef inline char *_identity(char *o, char *end, const LogFields *f) noexcept nogil:
    if f.id_method.p == NULL:
        return _put(o, b"null")
    o = _put(o, b'{"method":')
    o = _js(o, end, &f.id_method, MAX_VALUE_LOG)
    o = _put(o, b',"subject":')
    o = _js(o, end, &f.id_subject, MAX_VALUE_LOG)
    o = _put(o, b',"consumer":')
    o = _js(o, end, &f.id_consumer, MAX_VALUE_LOG)
    o[0] = b'}'
    return o + 1


cdef inline char *_protocol(char *o, int http_minor) noexcept nogil:
    if http_minor == 0:
        return _put(o, b'"HTTP/1.0"')
    if http_minor == 1:
        return _put(o, b'"HTTP/1.1"')
    return _put(o, b"null")


cdef inline char *_client_ip(char *o, char *end, const LogFields *f) noexcept nogil:
    if f.client_ip.p == NULL:
        return _put(o, b'""')
    return _js(o, end, &f.client_ip, MAX_VALUE_LOG)


cdef Py_ssize_t _access_json(char *line, const LogFields *f, const timespec *ts,
                             const char *path, Py_ssize_t path_n) noexcept nogil:
    cdef const ExchangeRecord *r = f.rec
    cdef char *end = line + (MAX_LINE - LINE_SLACK)
    cdef char *o = line
    o[0] = b'{'
    o = _time_json(o + 1, ts)
    o = _put(o, b',"type":"access","request_id":')
    o = _jsafe(o, end, &f.request_id)
    o = _put(o, b',"trace_id":')
    o = _jsafe(o, end, &f.trace_id)
    o = _put(o, b',"span_id":')
    o = _jsafe(o, end, &f.span_id)
    o = _put(o, b',"client_ip":')
    o = _client_ip(o, end, f)
    o = _put(o, b',"identity":')
    o = _identity(o, end, f)
    o = _names(o, end, f)
    o = _put(o, b',"service":')
    o = _jpre(o, end, &f.service, f.preescaped & PRE_SERVICE)
    o = _put(o, b',"server":')
    o = _jpre(o, end, &f.server, f.preescaped & PRE_SERVER)
    o = _put(o, b',"method":')
    o = _jsafe(o, end, &f.method)
    o = _put(o, b',"path":')
    o = _jsraw(o, end, path, path_n, MAX_PATH_LOG)
    o = _put(o, b',"protocol":')
    o = _protocol(o, f.http_minor)
    o = _put(o, b',"status":')
    o = _int(o, r.status)
    o = _put(o, b',"bytes_in":')
    o = _int(o, r.req_bytes)
    o = _put(o, b',"bytes_out":')
    o = _int(o, r.resp_bytes)
    o = _put(o, b',"duration_ms":')
    o = _ms(o, r.t_end_ns - r.t_head_ns)
    o = _put(o, b',"upstream_ms":')
    if r.t_up_start_ns != 0 and r.t_up_end_ns != 0:
        o = _ms(o, r.t_up_end_ns - r.t_up_start_ns)
    else:
        o = _put(o, b"null")
    o = _put(o, b',"rate_limit":')
    if r.rate == RATE_ALLOWED:
        o = _put(o, b'"allowed"')
    elif r.rate == RATE_FALLBACK:
        o = _put(o, b'"fallback"')
    elif r.rate == RATE_LIMITED:
        o = _put(o, b'"limited"')
    else:
        o = _put(o, b"null")
    o = _put(o, b',"auth":')
    if r.deny == DENY_AUTH_FAILED:
        o = _put(o, b'"failed"')
    elif r.deny == DENY_FORBIDDEN:
        o = _put(o, b'"forbidden"')
    elif r.deny == DENY_AUTH_UNAVAILABLE:
        o = _put(o, b'"unavailable"')
    elif f.id_method.p != NULL:
        o = _put(o, b'"ok"')
    else:
        o = _put(o, b"null")
    o = _put(o, b',"tls":')
    o = _js(o, end, &f.tls_version, MAX_VALUE_LOG)
    o = _put(o, b',"user_agent":')
    o = _js(o, end, &f.user_agent, MAX_VALUE_LOG)
    o = _put(o, b"}\n")
    return o - line


cdef Py_ssize_t _access_clf(char *line, const LogFields *f, const char *path,
                            Py_ssize_t path_n, bint combined) noexcept nogil:
    cdef const ExchangeRecord *r = f.rec
    cdef char *end = line + (MAX_LINE - LINE_SLACK)
    cdef char *o = line
    o = _cfield(o, end, &f.client_ip, MAX_VALUE_LOG)
    o = _put(o, b" - ")
    if f.id_method.p != NULL:
        o = _cfield(o, end, &f.id_subject, MAX_VALUE_LOG)
    else:
        o[0] = b'-'
        o += 1
    o[0] = b' '
    memcpy(o + 1, _clf, 28)
    o = _put(o + 29, b' "')
    if f.method.p == NULL or path == NULL or (f.http_minor != 0 and f.http_minor != 1):
        o[0] = b'-'
        o += 1
    else:
        o = _cbody(o, end, f.method.p, f.method.n, MAX_VALUE_LOG, False)
        o[0] = b' '
        o = _cbody(o + 1, end, path, path_n, MAX_PATH_LOG, False)
        if f.http_minor == 1:
            o = _put(o, b" HTTP/1.1")
        else:
            o = _put(o, b" HTTP/1.0")
    o = _put(o, b'" ')
    o = _int(o, r.status)
    o[0] = b' '
    o += 1
    if r.resp_bytes > 0:
        o = _int(o, r.resp_bytes)
    else:
        o[0] = b'-'
        o += 1
    if combined:
        o[0] = b' '
        o = _cquoted(o + 1, end, &f.referer, MAX_VALUE_LOG)
        o[0] = b' '
        o = _cquoted(o + 1, end, &f.user_agent, MAX_VALUE_LOG)
    o[0] = b'\n'
    return o + 1 - line


cdef Py_ssize_t _audit_json(char *line, const LogFields *f, const timespec *ts,
                            const char *path, Py_ssize_t path_n) noexcept nogil:
    cdef const ExchangeRecord *r = f.rec
    cdef char *end = line + (MAX_LINE - LINE_SLACK)
    cdef char *o = line
    cdef int deny = r.deny
    o[0] = b'{'
    o = _time_json(o + 1, ts)
    o = _put(o, b',"type":"audit","event":')
    if deny == DENY_AUTH_FAILED:
        o = _put(o, b'"auth_failed"')
    elif deny == DENY_FORBIDDEN:
        o = _put(o, b'"forbidden"')
    elif deny == DENY_RATE_LIMITED:
        o = _put(o, b'"rate_limited"')
    elif deny == DENY_IP:
        o = _put(o, b'"ip_denied"')
    elif deny == DENY_AUTH_UNAVAILABLE:
        o = _put(o, b'"auth_unavailable"')
    else:
        o = _put(o, b'"denied"')        # not a DenyEvent: still recorded
    o = _put(o, b',"reason":')
    o = _js(o, end, &f.deny_reason, MAX_VALUE_LOG)
    o = _put(o, b',"source":')
    o = _js(o, end, &f.deny_source, MAX_VALUE_LOG)
    o = _put(o, b',"request_id":')
    o = _jsafe(o, end, &f.request_id)
    o = _put(o, b',"trace_id":')
    o = _jsafe(o, end, &f.trace_id)
    o = _put(o, b',"client_ip":')
    o = _client_ip(o, end, f)
    o = _put(o, b',"identity":')
    o = _identity(o, end, f)
    o = _names(o, end, f)
    o = _put(o, b',"method":')
    o = _jsafe(o, end, &f.method)
    o = _put(o, b',"path":')
    o = _jsraw(o, end, path, path_n, MAX_PATH_LOG)
    o = _put(o, b',"status":')
    o = _int(o, r.status)
    o = _put(o, b',"tls":')
    o = _js(o, end, &f.tls_version, MAX_VALUE_LOG)
    o = _put(o, b',"user_agent":')
    o = _js(o, end, &f.user_agent, MAX_VALUE_LOG)
    o = _put(o, b"}\n")
    return o - line


cdef inline char *_attr(char *o, const char *key) noexcept nogil:
    o = _put(o, b'{"key":"')
    o = _put(o, key)
    return _put(o, b'","value":{"stringValue":')


cdef Py_ssize_t _span_json(char *line, const LogFields *f, const timespec *ts,
                           const char *path, Py_ssize_t path_n) noexcept nogil:
    cdef const ExchangeRecord *r = f.rec
    cdef char *end = line + (MAX_LINE - LINE_SLACK)
    cdef char *o = line
    cdef long long d = r.t_end_ns - r.t_head_ns
    cdef unsigned long long t_end = <unsigned long long>ts.tv_sec * 1000000000ULL + ts.tv_nsec
    if d < 0:
        d = 0
    if <unsigned long long>d > t_end:
        d = <long long>t_end
    o = _put(o, b'{"traceId":')
    o = _jsafe(o, end, &f.trace_id)
    o = _put(o, b',"spanId":')
    o = _jsafe(o, end, &f.span_id)
    if f.parent_span_id.p != NULL:
        o = _put(o, b',"parentSpanId":')
        o = _js(o, end, &f.parent_span_id, MAX_VALUE_LOG)
    o = _put(o, b',"name":"')
    if f.method.p == NULL:
        o = _put(o, b"HTTP")
    else:
        o = _jbody(o, end, f.method.p, f.method.n, MAX_VALUE_LOG)
        if f.route.p != NULL:
            o[0] = b' '
            o = _jbody(o + 1, end, f.route.p, f.route.n, MAX_VALUE_LOG)
    o = _put(o, b'","kind":2,"startTimeUnixNano":"')
    o = _uint(o, t_end - <unsigned long long>d)
    o = _put(o, b'","endTimeUnixNano":"')
    o = _uint(o, t_end)
    o = _put(o, b'","attributes":[')
    if f.method.p != NULL:
        o = _attr(o, b"http.request.method")
        o = _jsafe(o, end, &f.method)
        o = _put(o, b"}},")
    if path != NULL:
        o = _attr(o, b"url.path")
        o = _jsraw(o, end, path, path_n, MAX_PATH_LOG)
        o = _put(o, b"}},")
    if f.route.p != NULL:
        o = _attr(o, b"http.route")
        o = _js(o, end, &f.route, MAX_VALUE_LOG)
        o = _put(o, b"}},")
    o = _put(o, b'{"key":"http.response.status_code","value":{"intValue":"')
    o = _int(o, r.status)
    o = _put(o, b'"}},')
    o = _attr(o, b"client.address")
    o = _client_ip(o, end, f)
    o = _put(o, b"}},")
    if f.service.p != NULL:
        o = _attr(o, b"fastgate.service")
        o = _jpre(o, end, &f.service, f.preescaped & PRE_SERVICE)
        o = _put(o, b"}},")
    if f.server.p != NULL:
        o = _attr(o, b"fastgate.server")
        o = _jpre(o, end, &f.server, f.preescaped & PRE_SERVER)
        o = _put(o, b"}},")
    o = _attr(o, b"fastgate.request_id")
    o = _jsafe(o, end, &f.request_id)
    o = _put(o, b'}}],"status":{"code":')
    if r.status >= 500 or r.status == 0:
        o = _put(o, b"2}}\n")
    else:
        o = _put(o, b"0}}\n")
    return o - line


# ---------------------------------------------------------------------------------------------
# Sampling PRNG

cdef inline uint64_t _splitmix64(uint64_t x) noexcept nogil:
    """Spreads a seed (a small test integer too) over the whole state."""
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef inline uint32_t _draw(unsigned long long *state) noexcept nogil:
    # xorshift64* (Vigna): the high 32 bits of the product are its best bits.
    cdef uint64_t x = state[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    state[0] = x
    return <uint32_t>((x * 0x2545F4914F6CDD1DULL) >> 32)


# ---------------------------------------------------------------------------------------------
# LogStream

cdef void _notify(LogStream s) noexcept:
    """on_ready() once per fill; its exceptions must not reach the connection."""
    s.notified = True
    callback = s.on_ready
    try:
        callback()
    except Exception:
        pass


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_condattr_init(pthread_condattr_t *a)
    int pthread_condattr_setclock(pthread_condattr_t *a, int clock)
    int pthread_condattr_destroy(pthread_condattr_t *a)
    int pthread_cond_init(pthread_cond_t *c, const pthread_condattr_t *a)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *t)
    int pthread_create(pthread_t *t, const void *attr, void *(*fn)(void *) noexcept nogil,
                       void *arg)
    int pthread_timedjoin_np(pthread_t t, void **ret, const timespec *abstime)

cdef extern from "<string.h>" nogil:
    void *memrchr(const void *s, int c, size_t n)

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLOUT

cdef extern from "<unistd.h>" nogil:
    ssize_t c_write "write"(int fd, const void *buf, size_t n)
    int c_close "close"(int fd)

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR
    int EAGAIN

cdef extern from "<limits.h>":
    int PIPE_BUF


cdef Py_ssize_t _write_all(int fd, const char *p, size_t n) noexcept nogil:
    """Write p[:n] whole (retrying partial writes, EINTR, and EAGAIN on a descriptor someone
    made non-blocking); 0, or -1 with errno set."""
    cdef ssize_t k
    cdef pollfd pfd
    while n > 0:
        k = c_write(fd, p, n)
        if k < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                pfd.fd = fd
                pfd.events = POLLOUT
                poll(&pfd, 1, 1000)
                continue
            return -1
        p += k
        n -= k
    return 0


cdef size_t _count_lines(const char *p, size_t n) noexcept nogil:
    cdef size_t lines = 0
    cdef const char *q
    while n > 0:
        q = <const char *>memchr(p, b'\n', n)
        if q == NULL:
            break
        lines += 1
        n -= (q + 1) - p
        p = q + 1
    return lines


cdef void _write_batch(Writer *w, int fd, bint chunked, const char *p, size_t n) noexcept nogil:
    """Write one batch of whole lines: at once to a file (O_APPEND keeps it whole), or in
    pieces of at most PIPE_BUF bytes cut at line ends to a pipe or socket, so the kernel keeps
    each piece atomic and lines of workers sharing the pipe never interleave (a line longer
    than PIPE_BUF goes alone). A failed write loses the rest of the batch, counted."""
    cdef size_t pos = 0, stop
    cdef const char *q
    while pos < n:
        stop = n
        if chunked and n - pos > <size_t>PIPE_BUF:
            q = <const char *>memrchr(p + pos, b'\n', PIPE_BUF)
            if q != NULL:
                stop = (q + 1) - p
            else:
                q = <const char *>memchr(p + pos, b'\n', n - pos)
                stop = n if q == NULL else <size_t>((q + 1) - p)
        if _write_all(fd, p + pos, stop - pos) < 0:
            w.last_errno = errno
            w.errors += 1
            w.error_lines += _count_lines(p + pos, n - pos)
            return
        w.written_bytes += stop - pos
        pos = stop


cdef void *_writer_main(void *arg) noexcept nogil:
    """The writer thread: sleep until the stream passes flush_at (commit signals), the
    interval passes, a reopen or a stop; swap the buffers under the lock; write unlocked."""
    cdef Writer *w = <Writer *>arg
    cdef Writer *c = w
    cdef timespec deadline
    cdef char *full
    cdef size_t n
    cdef int fd
    cdef bint chunked, stop
    pthread_mutex_lock(&w.lock)
    while True:
        if c.length[0] < c.flush_at and not w.stopping and w.new_fd < 0:
            clock_gettime(CLOCK_MONOTONIC, &deadline)
            deadline.tv_sec += w.interval_ns // 1000000000
            deadline.tv_nsec += w.interval_ns % 1000000000
            if deadline.tv_nsec >= 1000000000:
                deadline.tv_sec += 1
                deadline.tv_nsec -= 1000000000
            pthread_cond_timedwait(&w.cond, &w.lock, &deadline)
        if w.new_fd >= 0:
            if w.owned:
                c_close(w.fd)
            w.fd = w.new_fd
            w.owned = w.new_owned
            w.chunked = w.new_chunked
            w.new_fd = -1
        n = c.length[0]
        full = c.buf[0]
        if n:
            c.buf[0] = w.spare
            w.spare = full
            c.length[0] = 0
        c.notified[0] = False
        stop = w.stopping
        fd = w.fd
        chunked = w.chunked
        pthread_mutex_unlock(&w.lock)
        if n:
            _write_batch(w, fd, chunked, full, n)
        pthread_mutex_lock(&w.lock)
        if stop and c.length[0] == 0:
            break
    if w.owned:
        c_close(w.fd)
        w.owned = False
    pthread_mutex_unlock(&w.lock)
    return NULL


cdef class LogStream:
    """One stream's batch buffer in one worker (see accesslog.pyi)."""

    def __cinit__(self):
        self.buf = NULL
        self.length = 0
        self.capacity = 0
        self.notified = False
        self.w = NULL

    def __init__(self, Py_ssize_t capacity=1 << 20, Py_ssize_t flush_at=64 << 10):
        if self.w != NULL:
            raise RuntimeError("the stream has a writer thread")
        if capacity < 2 * MAX_LINE:
            raise ValueError(f"capacity must be at least {2 * MAX_LINE} bytes")
        if flush_at < 0 or flush_at > capacity:
            raise ValueError("flush_at must be within 0..capacity")
        if self.buf != NULL:
            free(self.buf)
            self.buf = NULL
        self.buf = <char *>malloc(capacity)
        if self.buf == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.flush_at = flush_at
        self.length = 0
        self.notified = False

    def __dealloc__(self):
        # A running writer holds a reference (keepalive): it has ended or was never started.
        if self.w != NULL:
            pthread_cond_destroy(&self.w.cond)
            pthread_mutex_destroy(&self.w.lock)
            free(self.w.spare)
            free(self.w)
            self.w = NULL
        if self.buf != NULL:
            free(self.buf)
            self.buf = NULL

    cdef char *reserve(self, size_t n) noexcept:
        if self.w != NULL:
            pthread_mutex_lock(&self.w.lock)
        if self.length + n > self.capacity:     # also when not initialised (capacity 0)
            return NULL
        return self.buf + self.length

    cdef void commit(self, size_t n) noexcept:
        self.length += n
        self.lines += 1
        if self.w != NULL:
            if not self.notified and self.length >= self.flush_at:
                self.notified = True
                pthread_cond_signal(&self.w.cond)
            pthread_mutex_unlock(&self.w.lock)
        elif not self.notified and self.length >= self.flush_at and self.on_ready is not None:
            _notify(self)

    cdef void drop(self) noexcept:
        self.dropped += 1
        if self.w != NULL:
            pthread_mutex_unlock(&self.w.lock)

    # ---- the writer thread ---------------------------------------------------------------

    def start_writer(self, int fd, bint chunked=False, double interval=0.2, bint owned=True):
        """Write this stream's batches to `fd` from a thread of its own (no GIL): woken when
        flush_at bytes wait, else every `interval` seconds. `chunked`: fd is a pipe or socket
        (writes of at most PIPE_BUF bytes at line ends). `owned`: the writer closes fd when
        it is replaced (reopen) or stopped."""
        cdef Writer *w
        cdef pthread_condattr_t attr
        if self.w != NULL:
            raise RuntimeError("the stream already has a writer thread")
        if self.buf == NULL:
            raise RuntimeError("the stream is not initialised")
        if not 0.001 <= interval <= 3600:
            raise ValueError("interval must be within 0.001..3600 seconds")
        w = <Writer *>malloc(sizeof(Writer))
        if w == NULL:
            raise MemoryError()
        memset(w, 0, sizeof(Writer))
        w.spare = <char *>malloc(self.capacity)
        if w.spare == NULL:
            free(w)
            raise MemoryError()
        pthread_mutex_init(&w.lock, NULL)
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&w.cond, &attr)
        pthread_condattr_destroy(&attr)
        w.fd = fd
        w.new_fd = -1
        w.owned = owned
        w.chunked = chunked
        w.interval_ns = <long long>(interval * 1e9)
        w.buf = &self.buf
        w.length = &self.length
        w.notified = &self.notified
        w.flush_at = self.flush_at
        self.w = w
        if pthread_create(&w.thread, NULL, _writer_main, w) != 0:
            self.w = NULL
            pthread_cond_destroy(&w.cond)
            pthread_mutex_destroy(&w.lock)
            free(w.spare)
            free(w)
            raise OSError("cannot start the log writer thread")
        self.keepalive = self

    def reopen(self, int fd, bint chunked=False, bint owned=True):
        """Write later batches to `fd` (after logrotate renamed the file); the writer closes
        the old descriptor if it owned it. A batch is never split between the two."""
        if self.w == NULL:
            raise RuntimeError("the stream has no writer thread")
        with nogil:
            pthread_mutex_lock(&self.w.lock)
            if self.w.new_fd >= 0 and self.w.new_owned:
                c_close(self.w.new_fd)      # two reopens before the thread saw the first
            self.w.new_fd = fd
            self.w.new_owned = owned
            self.w.new_chunked = chunked
            pthread_cond_signal(&self.w.cond)
            pthread_mutex_unlock(&self.w.lock)

    def stop_writer(self, double timeout=5.0):
        """Write what is pending, end the thread, close an owned fd. True when done within
        `timeout` seconds; False leaves the thread finishing on its own (a stuck disk)."""
        cdef timespec deadline
        cdef int rc
        if self.w == NULL or self.keepalive is None:
            return True
        with nogil:
            pthread_mutex_lock(&self.w.lock)
            self.w.stopping = True
            pthread_cond_signal(&self.w.cond)
            pthread_mutex_unlock(&self.w.lock)
            clock_gettime(CLOCK_REALTIME, &deadline)
            deadline.tv_sec += <time_t>timeout
            deadline.tv_nsec += <long>((timeout - <time_t>timeout) * 1e9)
            if deadline.tv_nsec >= 1000000000:
                deadline.tv_sec += 1
                deadline.tv_nsec -= 1000000000
            rc = pthread_timedjoin_np(self.w.thread, NULL, &deadline)
        if rc != 0:
            return False
        self.keepalive = None       # joined: the stream may be freed (it frees the writer)
        return True

    @property
    def writer_running(self):
        return self.w != NULL and self.keepalive is not None

    @property
    def written_bytes(self):
        """Bytes the writer thread wrote."""
        return self.w.written_bytes if self.w != NULL else 0

    @property
    def error_lines(self):
        """Lines the writer thread lost to failed writes."""
        return self.w.error_lines if self.w != NULL else 0

    @property
    def write_errors(self):
        """(failed writes, errno of the last one)."""
        if self.w == NULL:
            return (0, 0)
        return (self.w.errors, self.w.last_errno)

    # ---- Python consumers ----------------------------------------------------------------

    def take(self):
        """All pending bytes (whole lines), b"" when none; empties the buffer and re-arms
        on_ready. Not with a writer thread (it takes them itself)."""
        cdef bytes out = b""
        if self.w != NULL:
            raise RuntimeError("the stream's writer thread takes its batches")
        if self.length:
            out = PyBytes_FromStringAndSize(self.buf, self.length)
        self.length = 0
        self.notified = False
        return out

    def write_line(self, bytes line not None):
        """Append one preformatted line (Python-made audit events); False when dropped."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
        cdef const char *p = PyBytes_AS_STRING(line)
        cdef char *o
        if n == 0 or n > MAX_LINE or p[n - 1] != b'\n':
            raise ValueError(f"a log line ends with one newline and is at most {MAX_LINE} bytes")
        if memchr(p, b'\n', n - 1) != NULL:
            raise ValueError("a log line must not contain a newline before its end")
        o = self.reserve(n)
        if o == NULL:
            self.drop()
            return False
        memcpy(o, p, n)
        self.commit(n)
        return True

    @property
    def pending(self):
        """Bytes waiting for take() or the writer thread."""
        return self.length

    @property
    def capacity(self):
        return self.capacity

    @property
    def flush_at(self):
        return self.flush_at


# ---------------------------------------------------------------------------------------------
# AccessLog

cdef dict _FORMATS = {"json": FMT_JSON, "common": FMT_COMMON, "combined": FMT_COMBINED}


cdef inline void _set_text(Text *t, object value, list keep) except *:
    if value is None:
        t.p = NULL
        t.n = 0
    elif isinstance(value, bytes):
        keep.append(value)
        t.p = PyBytes_AS_STRING(value)
        t.n = PyBytes_GET_SIZE(value)
    else:
        raise TypeError(f"text fields are bytes or None, not {type(value).__name__}")


cdef inline void _set_safe(Text *t, object value, list keep, str name) except *:
    """_set_text for the fields the connection guarantees JSON-safe (see _jsafe): the test
    entry refuses what the connection could never pass."""
    if value is not None and (not isinstance(value, bytes) or any(
            c < 0x21 or c > 0x7e or c == 0x22 or c == 0x5c for c in value)):
        raise ValueError(f"{name}: printable ASCII without quotes or backslashes only")
    _set_text(t, value, keep)


cdef inline void _line(PyObject *stream, int kind, int fmt, const LogFields *f,
                       const timespec *ts, const char *path, Py_ssize_t path_n) noexcept:
    """Format one line into the stream, or count it dropped. `stream` is borrowed from the
    AccessLog (no refcount traffic on the hot path); commit() touches nothing after it
    calls on_ready, so a callback that rebuilds the AccessLog cannot pull it from under us."""
    cdef char *o = (<LogStream>stream).reserve(MAX_LINE)
    cdef Py_ssize_t n
    if o == NULL:
        (<LogStream>stream).drop()
        return
    if kind == WANT_ACCESS:
        if fmt == FMT_JSON:
            n = _access_json(o, f, ts, path, path_n)
        else:
            n = _access_clf(o, f, path, path_n, fmt == FMT_COMBINED)
    elif kind == WANT_AUDIT:
        n = _audit_json(o, f, ts, path, path_n)
    else:
        n = _span_json(o, f, ts, path, path_n)
    (<LogStream>stream).commit(n)


cdef class AccessLog:
    """The per-worker log formatter (see accesslog.pyi)."""

    def __cinit__(self):
        self.redact = ()
        self.sample = _SAMPLE_ALL
        self.log_errors = True
        self.rng = 1

    def __init__(self, LogStream access=None, LogStream audit=None, LogStream spans=None,
                 str format="json", double sample=1.0, bint log_errors=True, redact=(),
                 bint drop_query=False, seed=None):
        fmt = _FORMATS.get(format)
        if fmt is None:
            raise ValueError(f"format must be one of {', '.join(_FORMATS)}, not {format!r}")
        if not 0.0 <= sample <= 1.0:
            raise ValueError("sample must be within 0.0..1.0")
        self.access = access
        self.audit = audit
        self.spans = spans
        self.format = fmt
        self.sample = sample_threshold(sample)
        self.log_errors = log_errors
        self.redact = _redact_keys(redact)
        self.drop_query = drop_query
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.rng = _splitmix64(<uint64_t>(seed & 0xFFFFFFFFFFFFFFFF))
        if self.rng == 0:
            self.rng = 1                # the one state xorshift cannot leave

    @property
    def redact(self):
        """The redacted query keys (lowercase bytes)."""
        return self.redact

    @property
    def drop_query(self):
        return self.drop_query

    cdef int select(self, const ExchangeRecord *rec, unsigned int sample, bint errors,
                    bint sampled) noexcept:
        cdef int want = 0
        if self.access is not None:
            if sample == SAMPLE_ALL or (errors and (rec.status >= 400 or rec.status == 0)):
                want = WANT_ACCESS
            elif sample != 0 and _draw(&self.rng) < sample:
                want = WANT_ACCESS
        if rec.deny != DENY_NONE and self.audit is not None:
            want |= WANT_AUDIT
        if sampled and self.spans is not None:
            want |= WANT_SPAN
        return want

    cdef void write(self, const LogFields *f, int want) noexcept:
        cdef timespec ts
        cdef char pbuf[PATH_BUF]
        cdef char rbuf[REFERER_BUF]
        cdef LogFields g
        cdef const char *path = f.target.p
        cdef Py_ssize_t path_n = f.target.n
        cdef const char *q
        _now(&ts)
        if path != NULL:
            q = <const char *>memchr(path, b'?', path_n)
            if q != NULL:
                if self.drop_query:
                    path_n = q - path
                elif tuple_size(<PyObject *>self.redact) != 0:
                    path_n = _redact(pbuf, PATH_BUF, path, path_n, <PyObject *>self.redact,
                                     False)
                    path = pbuf
        if want & WANT_ACCESS and self.access is not None:
            if (self.format == FMT_COMBINED and f.referer.p != NULL
                    and memchr(f.referer.p, b'?', f.referer.n) != NULL):
                # A referring URL carries the other page's query: the same keys are hidden.
                g = f[0]
                if self.drop_query:
                    g.referer.n = <const char *>memchr(f.referer.p, b'?', f.referer.n) - f.referer.p
                else:
                    g.referer.n = _redact(rbuf, REFERER_BUF, f.referer.p, f.referer.n,
                                          <PyObject *>self.redact, False)
                    g.referer.p = rbuf
                _line(<PyObject *>self.access, WANT_ACCESS, self.format, &g, &ts, path, path_n)
            else:
                _line(<PyObject *>self.access, WANT_ACCESS, self.format, f, &ts, path, path_n)
        if want & WANT_AUDIT and self.audit is not None:
            _line(<PyObject *>self.audit, WANT_AUDIT, FMT_JSON, f, &ts, path, path_n)
        if (want & WANT_SPAN and self.spans is not None and f.trace_id.p != NULL
                and f.span_id.p != NULL):
            _line(<PyObject *>self.spans, WANT_SPAN, FMT_JSON, f, &ts, path, path_n)

    # ---- test entry points ---------------------------------------------------------------

    def select_fields(self, int status, int deny, unsigned int sample, bint errors,
                      bint sampled):
        """select() for an exchange of `status` / `deny` (tests)."""
        cdef ExchangeRecord rec
        memset(&rec, 0, sizeof(rec))
        rec.status = status
        rec.deny = deny
        return self.select(&rec, sample, errors, sampled)

    def write_fields(self, int want, **fields):
        """write() from keyword arguments (tests): see accesslog.pyi."""
        cdef ExchangeRecord rec
        cdef LogFields f
        cdef list keep = []
        cdef long long base = 1000000000000
        memset(&rec, 0, sizeof(rec))
        memset(&f, 0, sizeof(f))
        rec.status = fields.pop("status", 200)
        rec.req_bytes = fields.pop("req_bytes", 0)
        rec.resp_bytes = fields.pop("resp_bytes", 0)
        rec.t_head_ns = base
        rec.t_end_ns = base + <long long>fields.pop("duration_ns", 0)
        upstream_ns = fields.pop("upstream_ns", None)
        if upstream_ns is not None:
            rec.t_up_start_ns = base
            rec.t_up_end_ns = base + <long long>upstream_ns
        rec.rate = fields.pop("rate", RATE_NONE)
        rec.deny = fields.pop("deny", DENY_NONE)
        rec.server_row = -1
        f.rec = &rec
        _set_safe(&f.request_id, fields.pop("request_id", None), keep, "request_id")
        _set_safe(&f.trace_id, fields.pop("trace_id", None), keep, "trace_id")
        _set_safe(&f.span_id, fields.pop("span_id", None), keep, "span_id")
        _set_safe(&f.parent_span_id, fields.pop("parent_span_id", None), keep,
                  "parent_span_id")
        f.trace_sampled = fields.pop("trace_sampled", False)
        _set_text(&f.client_ip, fields.pop("client_ip", None), keep)
        _set_text(&f.id_method, fields.pop("id_method", None), keep)
        _set_text(&f.id_subject, fields.pop("id_subject", None), keep)
        _set_text(&f.id_consumer, fields.pop("id_consumer", None), keep)
        _set_text(&f.entrypoint, fields.pop("entrypoint", None), keep)
        _set_text(&f.route, fields.pop("route", None), keep)
        _set_text(&f.service, fields.pop("service", None), keep)
        _set_text(&f.server, fields.pop("server", None), keep)
        _set_safe(&f.method, fields.pop("method", None), keep, "method")
        _set_text(&f.target, fields.pop("target", None), keep)
        f.http_minor = fields.pop("http_minor", 1)
        _set_text(&f.user_agent, fields.pop("user_agent", None), keep)
        _set_text(&f.referer, fields.pop("referer", None), keep)
        _set_text(&f.tls_version, fields.pop("tls_version", None), keep)
        _set_text(&f.deny_source, fields.pop("deny_source", None), keep)
        _set_text(&f.deny_reason, fields.pop("deny_reason", None), keep)
        _set_text(&f.names, fields.pop("names", None), keep)
        f.preescaped = fields.pop("preescaped", 0)
        if fields:
            raise TypeError(f"unknown fields: {', '.join(sorted(fields))}")
        self.write(&f, want)

    def bench_write(self, long long n):
        """Test-only cost probe: write() a typical access line n times into the access stream
        (emptied in place, without a copy, when full); returns nanoseconds per line."""
        cdef ExchangeRecord rec
        cdef LogFields f
        cdef timespec t0, t1
        cdef long long i
        cdef LogStream s = self.access
        if s is None or n <= 0:
            raise ValueError("bench_write needs an access stream and n > 0")
        memset(&rec, 0, sizeof(rec))
        memset(&f, 0, sizeof(f))
        rec.status = 200
        rec.resp_bytes = 1234
        rec.t_head_ns = 1000000000
        rec.t_up_start_ns = 1000020000
        rec.t_up_end_ns = 1000412000
        rec.t_end_ns = 1000521000
        rec.rate = RATE_ALLOWED
        f.rec = &rec
        f.request_id.p = b"5f2b8c1e9a7d4e3fb6c0a1d2e3f40516"
        f.request_id.n = 32
        f.trace_id.p = b"4bf92f3577b34da6a3ce929d0e0e4736"
        f.trace_id.n = 32
        f.span_id.p = b"00f067aa0ba902b7"
        f.span_id.n = 16
        f.client_ip.p = b"203.0.113.7"
        f.client_ip.n = 11
        f.id_method.p = b"jwt"
        f.id_method.n = 3
        f.id_subject.p = b"alice"
        f.id_subject.n = 5
        f.id_consumer.p = b"acme"
        f.id_consumer.n = 4
        f.entrypoint.p = b"web"
        f.entrypoint.n = 3
        f.route.p = b"api"
        f.route.n = 3
        f.service.p = b"backend"
        f.service.n = 7
        f.server.p = b"http://127.0.0.1:9000"
        f.server.n = 21
        f.method.p = b"GET"
        f.method.n = 3
        f.target.p = b"/api/v1/users?id=42&token=abc123&page=2"
        f.target.n = 39
        f.http_minor = 1
        f.user_agent.p = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
        f.user_agent.n = 70
        f.tls_version.p = b"TLSv1.3"
        f.tls_version.n = 7
        clock_gettime(CLOCK_MONOTONIC, &t0)
        for i in range(n):
            if s.length + MAX_LINE > s.capacity:
                s.length = 0
            self.write(&f, WANT_ACCESS)
        clock_gettime(CLOCK_MONOTONIC, &t1)
        s.length = 0
        return ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n


# Python-visible copies of the C-level names
globals().update(
    FMT_JSON=FMT_JSON,
    FMT_COMMON=FMT_COMMON,
    FMT_COMBINED=FMT_COMBINED,
    WANT_ACCESS=WANT_ACCESS,
    WANT_AUDIT=WANT_AUDIT,
    WANT_SPAN=WANT_SPAN,
    PRE_SERVICE=PRE_SERVICE,
    PRE_SERVER=PRE_SERVER,
    SAMPLE_ALL=_SAMPLE_ALL,
    MAX_LINE=MAX_LINE,
    MAX_PATH_LOG=MAX_PATH_LOG,
    MAX_VALUE_LOG=MAX_VALUE_LOG,
    RATE_NONE=RATE_NONE,
    RATE_ALLOWED=RATE_ALLOWED,
    RATE_FALLBACK=RATE_FALLBACK,
    RATE_LIMITED=RATE_LIMITED,
    DENY_NONE=DENY_NONE,
    DENY_AUTH_FAILED=DENY_AUTH_FAILED,
    DENY_FORBIDDEN=DENY_FORBIDDEN,
    DENY_RATE_LIMITED=DENY_RATE_LIMITED,
    DENY_IP=DENY_IP,
    DENY_AUTH_UNAVAILABLE=DENY_AUTH_UNAVAILABLE,
)
