# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
#
# Chunked transfer coding scanner (RFC 9112 §7.1) — theory of operation
# =====================================================================
#
# The relay forwards a chunked body to the other side byte for byte; it never re-encodes.
# What it needs from this module is (a) where the body ends inside a received buffer, so the
# rest is the next pipelined message, and (b) a refusal of any framing that another parser
# could read differently (request smuggling starts exactly there). So the scanner is a byte
# state machine that keeps O(1) state between calls and never buffers input: each call looks
# at the bytes it is given once, left to right, and any split of the input (inside a size
# line, a CRLF, the last-chunk or the trailer section) gives the same answer as the whole.
#
#   chunked-body   = *chunk last-chunk trailer-section CRLF            §7.1
#   chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
#   chunk-size     = 1*HEXDIG
#   last-chunk     = 1*("0") [ chunk-ext ] CRLF
#   chunk-ext      = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )   §7.1.1
#   trailer-section = *( field-line CRLF )                             §7.1.2
#   field-line     = field-name ":" OWS field-value OWS                §5 (no obs-fold: §5.2)
#
# States (a table, after h11): SIZE_START -hex-> SIZE -CR-> SIZE_LF -LF-> DATA (size > 0)
# or TRAILER_START (size == 0); SIZE -SP/HTAB-> SIZE_BWS -";"-> EXT; SIZE -";"-> EXT -CR->
# SIZE_LF; DATA -(size bytes)-> DATA_CR -CR-> DATA_LF -LF-> SIZE_START; TRAILER_START -tchar->
# TRAILER_NAME -":"-> TRAILER_VALUE -CR-> TRAILER_LF -LF-> TRAILER_START; TRAILER_START -CR->
# END_LF -LF-> DONE. Every other byte in every state is an error (ERROR is sticky).
#
# Choices where the grammar leaves room, all on the strict side:
# - Whitespace after the size is only the BWS before ";" (§7.1.1). "1a \r\n" and "1a\t\r\n"
#   are refused: the grammar has no whitespace there, and parsers that trim it disagree with
#   parsers that do not. Whitespace before the size is refused too (not 1*HEXDIG).
# - chunk-size: at most 16 hex digits (leading zeros count, so "000a" is fine but a size line
#   of 17 digits is not) and a value <= 2**63-1 (§7.1: "recipients MUST anticipate
#   potentially large hexadecimal numerals and prevent parsing errors due to integer
#   conversion overflows"). Both are "chunk size overflow".
# - chunk-ext is accepted and ignored (§7.1.1), but only VCHAR, obs-text, SP and HTAB may
#   appear in it; its grammar is not checked further. A size line (size + extensions, CRLF
#   not counted) over MAX_SIZE_LINE bytes is refused, so extensions cannot be used to make us
#   scan forever (§7.1.1: a server ought to limit the total length of chunk extensions).
# - Line endings are CRLF only: a bare LF, a CR not followed by LF, or a NUL anywhere in the
#   framing is an error (§2.2 permits recipients to accept bare LF; a gateway must not, since
#   its upstream may not).
# - chunk-data must be followed by exactly CRLF; a byte there means the data was longer than
#   the size said.
# - Trailer fields: name = 1*tchar directly followed by ":" (§5.1: no whitespace before the
#   colon), value = VCHAR / obs-text / SP / HTAB. A line that starts with SP or HTAB is
#   obs-fold and refused (§5.2). The trailer section (field lines with their CRLFs, not the
#   final empty line) is bounded by max_trailer_bytes. A trailer named Content-Length or
#   Transfer-Encoding is refused (§6.5.1 of RFC 9110: framing fields are not allowed in
#   trailers, and an upstream that merged them into the header section would reframe).
#
# Bounds: O(n) time per call, each byte visited at most once; chunk data is skipped by count
# (remaining -= n), so a 16 KiB chunk costs O(1) whatever the split. O(1) memory per scanner
# (collect=True, for tests and small bodies, keeps the decoded data: O(body)). The runs over
# extension and trailer bytes stop at the limit, so a refused line costs at most the limit.
# scan() makes no Python call except on the error path and in collect mode.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer

from fastgate.errors import HttpError

cdef object _HttpError = HttpError

cdef enum _State:
    S_SIZE_START = 0       # first byte of a chunk-size (the zeroed initial state)
    S_SIZE                 # more hex digits, or ";", SP/HTAB, CR
    S_SIZE_BWS             # whitespace after the size: only ";" may follow
    S_EXT                  # chunk extensions, up to CR
    S_SIZE_LF              # CR seen at the end of the size line
    S_DATA                 # `remaining` bytes of chunk data
    S_DATA_CR              # CRLF after the data
    S_DATA_LF
    S_TRAILER_START        # start of a trailer line (or of the final empty line)
    S_TRAILER_NAME
    S_TRAILER_VALUE
    S_TRAILER_LF
    S_END_LF               # CR of the final empty line seen
    S_DONE
    S_ERROR

cdef enum:
    MAX_SIZE_DIGITS = 16
    MAX_SIZE_LINE = 4096   # bytes in a size line, CRLF excluded
    CL_TCHAR = 1           # token character (RFC 9110 §5.6.2)
    CL_TEXT = 2            # VCHAR / obs-text / SP / HTAB: extension and field-value bytes
    NO_HEX = 0xFF

cdef unsigned long long SIZE_SHIFT_LIMIT = 1ULL << 59   # value * 16 + 15 fits in 2**63-1 below it

cdef unsigned char HEXVAL[256]
cdef unsigned char CLS[256]


cdef void _init_tables() noexcept:
    cdef int c
    cdef const char *tspecial = b"!#$%&'*+-.^_`|~"
    for c in range(256):
        HEXVAL[c] = NO_HEX
        CLS[c] = 0
    for c in range(10):
        HEXVAL[c + 48] = c
    for c in range(6):
        HEXVAL[c + 65] = c + 10
        HEXVAL[c + 97] = c + 10
    for c in range(0x21, 0x7F):
        CLS[c] = CL_TEXT
    for c in range(0x80, 0x100):
        CLS[c] = CL_TEXT
    CLS[0x20] = CL_TEXT
    CLS[0x09] = CL_TEXT
    for c in range(48, 58):
        CLS[c] |= CL_TCHAR
    for c in range(65, 91):
        CLS[c] |= CL_TCHAR
        CLS[c + 32] |= CL_TCHAR
    while tspecial[0]:
        CLS[<unsigned char>tspecial[0]] |= CL_TCHAR
        tspecial += 1


_init_tables()

# Reasons (they become HttpError(400, reason)).
cdef const char *E_SIZE_INVALID = b"invalid chunk size"
cdef const char *E_SIZE_EMPTY = b"empty chunk size"
cdef const char *E_SIZE_OVERFLOW = b"chunk size overflow"
cdef const char *E_SIZE_WS = b"whitespace after chunk size"
cdef const char *E_EXT_INVALID = b"invalid character in chunk extension"
cdef const char *E_LINE_LONG = b"chunk size line too long"
cdef const char *E_BARE_CR = b"bare CR in chunked body"
cdef const char *E_BARE_LF = b"bare LF in chunked body"
cdef const char *E_NUL = b"NUL in chunked body"
cdef const char *E_DATA_CRLF = b"missing CRLF after chunk data"
cdef const char *E_TRAILER_NAME = b"invalid trailer field name"
cdef const char *E_TRAILER_VALUE = b"invalid character in trailer field value"
cdef const char *E_OBS_FOLD = b"obs-fold in trailer section"
cdef const char *E_TRAILER_LARGE = b"trailer section too large"
cdef const char *E_TRAILER_FRAMING = b"framing field in trailer section"
# Trailer names refused (RFC 9110 §6.5.1: framing fields are not allowed in trailers; an
# upstream that merged them into the header section would reframe the message).
cdef const char *TN_CL = b"content-length"     # 14
cdef const char *TN_TE = b"transfer-encoding"  # 17


cdef inline int trailer_name_match(int mask, Py_ssize_t pos, unsigned char c) noexcept nogil:
    """Which refused trailer names (bit 1: Content-Length, bit 2: Transfer-Encoding) the name
    can still be after its byte `c` at `pos` (case-insensitive)."""
    if c >= 65 and c <= 90:
        c += 32
    if (mask & 1) and (pos >= 14 or <unsigned char>TN_CL[pos] != c):
        mask &= ~1
    if (mask & 2) and (pos >= 17 or <unsigned char>TN_TE[pos] != c):
        mask &= ~2
    return mask
cdef const char *E_NOMEM = b"out of memory collecting chunk data"


cdef inline const char *_bad(unsigned char c, const char *other) noexcept:
    # The specific reason for the two bytes the brief names everywhere, else the state's own.
    if c == 10:
        return E_BARE_LF
    if c == 0:
        return E_NUL
    return other


cdef class ChunkedScanner:
    """Strict incremental chunked-body scanner; see the module comment."""

    def __init__(self, bint collect=False, Py_ssize_t max_trailer_bytes=16384):
        if max_trailer_bytes < 0:
            raise ValueError("max_trailer_bytes must be >= 0")
        self.collect = collect
        self.max_trailer_bytes = max_trailer_bytes
        self._parts = [] if collect else None
        self.reset()

    cpdef void reset(self) noexcept:
        """Forget the current message so the scanner can read the next one."""
        self.state = S_SIZE_START
        self.remaining = 0
        self.size_digits = 0
        self.line_bytes = 0
        self.trailer_bytes = 0
        self.done = False
        self.error = None
        if self._parts is not None:
            del self._parts[:]

    cdef Py_ssize_t scan(self, const char *p, Py_ssize_t n) noexcept:
        cdef const unsigned char *s = <const unsigned char *>p
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t take, end
        cdef int state = self.state
        cdef unsigned long long remaining = self.remaining
        cdef int digits = self.size_digits
        cdef Py_ssize_t line = self.line_bytes
        cdef Py_ssize_t trailer = self.trailer_bytes
        cdef Py_ssize_t max_trailer = self.max_trailer_bytes
        cdef unsigned char c, v
        cdef const char *reason = NULL

        if state == S_DONE:
            return 0
        if state == S_ERROR:
            return -1

        while i < n:
            if state == S_DATA:
                # Skip the data by count; only collect mode looks at it.
                take = n - i
                if remaining <= <unsigned long long>take:
                    take = <Py_ssize_t>remaining
                    state = S_DATA_CR
                remaining -= <unsigned long long>take
                if self.collect:
                    try:
                        self._parts.append(p[i:i + take])
                    except BaseException:
                        reason = E_NOMEM
                        break
                i += take
                continue

            c = s[i]
            if state == S_SIZE_START or state == S_SIZE:
                v = HEXVAL[c]
                if v != NO_HEX:
                    if digits == MAX_SIZE_DIGITS or remaining >= SIZE_SHIFT_LIMIT:
                        reason = E_SIZE_OVERFLOW
                        break
                    remaining = (remaining << 4) | v
                    digits += 1
                    line += 1
                    state = S_SIZE
                elif state == S_SIZE_START:
                    reason = E_SIZE_EMPTY if c == 13 or c == 59 else _bad(c, E_SIZE_INVALID)
                    break
                elif c == 13:
                    state = S_SIZE_LF
                elif c == 59:                       # ";"
                    line += 1
                    state = S_EXT
                elif c == 32 or c == 9:             # BWS before ";" (§7.1.1)
                    line += 1
                    state = S_SIZE_BWS
                else:
                    reason = _bad(c, E_SIZE_INVALID)
                    break
                i += 1
            elif state == S_EXT:
                end = i + (MAX_SIZE_LINE + 1 - line)
                if end > n:
                    end = n
                take = i
                while i < end and CLS[s[i]] & CL_TEXT:
                    i += 1
                line += i - take
                if line > MAX_SIZE_LINE:
                    reason = E_LINE_LONG
                    break
                if i == n:
                    break
                c = s[i]
                if c != 13:
                    reason = _bad(c, E_EXT_INVALID)
                    break
                state = S_SIZE_LF
                i += 1
            elif state == S_SIZE_LF:
                if c != 10:
                    reason = E_BARE_CR
                    break
                digits = 0
                line = 0
                state = S_DATA if remaining != 0 else S_TRAILER_START
                i += 1
            elif state == S_DATA_CR:
                if c != 13:
                    reason = _bad(c, E_DATA_CRLF)
                    break
                state = S_DATA_LF
                i += 1
            elif state == S_DATA_LF:
                if c != 10:
                    reason = E_DATA_CRLF
                    break
                state = S_SIZE_START
                i += 1
            elif state == S_SIZE_BWS:
                if c == 59:
                    state = S_EXT
                elif c != 32 and c != 9:
                    reason = _bad(c, E_SIZE_WS)
                    break
                line += 1
                if line > MAX_SIZE_LINE:
                    reason = E_LINE_LONG
                    break
                i += 1
            elif state == S_TRAILER_START:
                if c == 13:
                    state = S_END_LF
                elif CLS[c] & CL_TCHAR:
                    trailer += 1
                    state = S_TRAILER_NAME
                    # In trailer states `digits` holds the refused names still possible and
                    # `line` the name's length so far.
                    digits = trailer_name_match(3, 0, c)
                    line = 1
                elif c == 32 or c == 9:
                    reason = E_OBS_FOLD
                    break
                else:
                    reason = _bad(c, E_TRAILER_NAME)
                    break
                if trailer > max_trailer:
                    reason = E_TRAILER_LARGE
                    break
                i += 1
            elif state == S_TRAILER_NAME or state == S_TRAILER_VALUE:
                end = i + (max_trailer + 1 - trailer)
                if end > n:
                    end = n
                take = i
                v = CL_TCHAR if state == S_TRAILER_NAME else CL_TEXT
                if state == S_TRAILER_NAME:
                    while i < end and CLS[s[i]] & v:
                        if digits:
                            digits = trailer_name_match(digits, line, s[i])
                        line += 1
                        i += 1
                else:
                    while i < end and CLS[s[i]] & v:
                        i += 1
                trailer += i - take
                if trailer > max_trailer:
                    reason = E_TRAILER_LARGE
                    break
                if i == n:
                    break
                c = s[i]
                if state == S_TRAILER_NAME:
                    if c != 58:                     # ":" right after the name (§5.1)
                        reason = _bad(c, E_TRAILER_NAME)
                        break
                    if ((digits & 1) and line == 14) or ((digits & 2) and line == 17):
                        reason = E_TRAILER_FRAMING
                        break
                    digits = 0
                    line = 0
                    state = S_TRAILER_VALUE
                else:
                    if c != 13:
                        reason = _bad(c, E_TRAILER_VALUE)
                        break
                    state = S_TRAILER_LF
                trailer += 1
                if trailer > max_trailer:
                    reason = E_TRAILER_LARGE
                    break
                i += 1
            elif state == S_TRAILER_LF:
                if c != 10:
                    reason = E_BARE_CR
                    break
                trailer += 1
                if trailer > max_trailer:
                    reason = E_TRAILER_LARGE
                    break
                state = S_TRAILER_START
                i += 1
            else:                                   # S_END_LF
                if c != 10:
                    reason = E_BARE_CR
                    break
                i += 1
                self.state = S_DONE
                self.done = True
                self.remaining = 0
                self.line_bytes = 0
                self.trailer_bytes = trailer
                return i

        if reason != NULL:
            self.state = S_ERROR
            self.error = reason.decode("ascii")
            return -1
        self.state = state
        self.remaining = remaining
        self.size_digits = digits
        self.line_bytes = line
        self.trailer_bytes = trailer
        return i

    def feed(self, data):
        """Consume `data` (any bytes-like object); return how many bytes belong to this message.

        Less than len(data) only when the message ended inside it; 0 once the message is done.
        Raises HttpError(400, reason) on bad framing, and again on every later call until
        reset().
        """
        cdef Py_buffer buf
        cdef Py_ssize_t r
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            r = self.scan(<const char *>buf.buf, buf.len)
        finally:
            PyBuffer_Release(&buf)
        if r < 0:
            raise _HttpError(400, self.error)
        return r

    @property
    def payload(self):
        """The decoded chunk data so far (only with collect=True; else ValueError)."""
        if not self.collect:
            raise ValueError("payload needs ChunkedScanner(collect=True)")
        return b"".join(self._parts)
