# Response compression (gzip, brotli): the header of compress.pyx. Read the theory there.
#
# The relay's use, per response of a route with a CompressRule:
#   enc = negotiate(rule, request_head, response_head)
#   enc is None  -> relay the response unchanged.
#   otherwise    -> drop the upstream's Content-Length and Transfer-Encoding lines, send
#                   "Transfer-Encoding: chunked\r\n" + enc.head_lines with the other headers,
#                   then for every upstream body piece send enc.feed(p, n), and at the end of
#                   the upstream body (known from the upstream framing) send enc.finish().
#                   feed()/finish() returning None means the upstream body is broken (bad
#                   chunked framing, or a chunked body that did not end): close the client
#                   connection without sending a last-chunk, so the client sees a truncated
#                   response and never a well-formed short one.
# feed()/finish() raise only MemoryError. Neither makes I/O or blocks: each costs the CPU time
# of compressing the bytes given (bounded by the piece size the relay reads).

from fastgate._core.body cimport ChunkedScanner
from fastgate._core.httphead cimport RequestHead, ResponseHead

cdef enum:
    ALG_BR = 0                # index into the q-value table and CompressRule.algs
    ALG_GZIP = 1
    ALG_STAR = 2              # "*" in Accept-Encoding (not an algorithm)
    N_ALGS = 2
    BROTLI_LGWIN = 19         # brotli window: 512 KiB, bounds memory per response

cdef class CompressRule:
    # One per route, built at config compile by the `compress` middleware (Python constructor,
    # ValueError on bad arguments). Immutable after construction.
    cdef int algs[N_ALGS]             # ALG_* in preference order (br dropped if no brotli)
    cdef int n_algs
    cdef frozenset exact_types        # lowercase media types, bytes: b"application/json"
    cdef frozenset wild_types         # the type of each "type/*" entry, bytes: b"text"
    cdef readonly tuple algorithms    # the names in algs, e.g. ("br", "gzip")
    cdef readonly tuple content_types # as given, lowercase str
    cdef readonly long long min_bytes # Content-Length below this: not compressed
    cdef readonly int gzip_level      # 1-9
    cdef readonly int brotli_quality  # 0-11

cdef class Encoder:
    # One per compressed response; made only by negotiate().
    cdef readonly bytes head_lines    # b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
    cdef readonly str algorithm       # "gzip" or "br"
    cdef int alg                      # ALG_GZIP or ALG_BR
    cdef object comp                  # zlib compressobj or brotli.Compressor; None after finish
    cdef bint sync                    # flush after each feed: chunked / close-delimited input
    cdef ChunkedScanner scanner       # decodes a chunked upstream body; None otherwise
    cdef bint failed                  # bad framing seen: every later call returns None
    cdef bint finished                # finish() was called: every later call returns None
    # Feed upstream response BODY bytes exactly as they came on the wire in the response's
    # framing (FRAMING_LENGTH: raw payload; FRAMING_CHUNKED: chunked wire bytes, decoded
    # inside; FRAMING_CLOSE: raw payload). Returns the bytes to send to the client: zero or
    # more chunked-framed chunks ("<hex>\r\n<data>\r\n", never a zero-size one), b"" when the
    # compressor has nothing to emit yet. None on bad chunked framing (and after it). Bytes
    # after the end of a chunked body (trailers included) are ignored.
    cdef bytes feed(self, const char *p, Py_ssize_t n)
    # The rest of the compressed stream as a final chunk plus the last-chunk "0\r\n\r\n".
    # None when the encoder failed, was already finished, or a chunked body has not ended.
    cdef bytes finish(self)

# The encoder to use for this response, or None to pass the response through unchanged
# (rule None included). All the rules are in compress.pyx ("negotiate").
cdef Encoder negotiate(CompressRule rule, RequestHead req, ResponseHead resp)
