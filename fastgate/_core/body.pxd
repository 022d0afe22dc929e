# Body framing: a strict incremental chunked scanner (RFC 9112 §7.1).
# The relay forwards chunked bodies verbatim; the scanner only finds where the message ends
# and refuses bad framing. It keeps O(1) state between calls, so any split of the input works.
# Chunk data is skipped by count (never read) unless collect=True, which keeps copies of it.

cdef class ChunkedScanner:
    cdef int state                        # a private _State value (body.pyx)
    cdef unsigned long long remaining     # size being read, then bytes left in the chunk's data
    cdef int size_digits                  # hex digits seen in the current chunk-size
    cdef Py_ssize_t line_bytes            # bytes in the current size/ext line (CRLF excluded)
    cdef Py_ssize_t trailer_bytes         # bytes in the trailer section so far
    cdef Py_ssize_t max_trailer_bytes
    cdef readonly bint done
    cdef readonly bint collect
    cdef list _parts                      # decoded data pieces (collect=True only)
    # Scan n bytes. Returns how many bytes belong to this message (== n unless the message ended
    # inside the input), or -1 on bad framing (reason in `error`). After done: returns 0. After
    # an error: returns -1 again until reset().
    cdef Py_ssize_t scan(self, const char *p, Py_ssize_t n) noexcept
    cdef readonly str error
    # Forget everything: ready for the next message (keeps collect and max_trailer_bytes).
    cpdef void reset(self) noexcept
