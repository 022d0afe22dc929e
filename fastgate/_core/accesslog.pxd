# Access log, audit stream and span records, formatted in C (DESIGN.md §6). Read this before
# accesslog.pyx.
#
# At the one exchange-end hook (ConnCore.end_exchange) the connection asks AccessLog.select()
# which streams want this exchange (a few compares and, when sampling, one PRNG step); only
# then does it fill a LogFields (pointers into objects it holds: no copies, no Python
# objects made) and call AccessLog.write(), which formats the line straight into each
# stream's batch buffer. Python takes whole batches (LogStream.take) and writes them from a
# thread (fastgate/logs/writer.py): the event loop never waits on a disk or a pipe. A line
# that does not fit in a stream's buffer is dropped and counted, never waited for.

from fastgate._core.stats cimport ExchangeRecord

cdef enum LogFormat:
    FMT_JSON = 0          # one JSON object per line (docs/access-log.md, the schema)
    FMT_COMMON = 1        # NCSA Common Log Format
    FMT_COMBINED = 2      # Common + "referer" "user-agent"

cdef enum LogWant:        # AccessLog.select() result bits
    WANT_ACCESS = 1
    WANT_AUDIT = 2
    WANT_SPAN = 4

cdef enum:                # LogFields.preescaped bits: the Text is already a JSON string
    PRE_SERVICE = 1       #   (json_string(): quotes included), copied as it is
    PRE_SERVER = 2

cdef enum:
    SAMPLE_ALL = 0xFFFFFFFF   # a u32 sample threshold that logs every exchange
    MAX_LINE = 16384          # a stream keeps at least this much room for the next line
    MAX_PATH_LOG = 2048       # request-target bytes logged (then "..." is appended)
    MAX_VALUE_LOG = 512       # user agent / referer / identity / reason bytes logged

cdef struct Text:
    const char *p         # NULL: absent (JSON null, CLF "-")
    Py_ssize_t n

cdef struct LogFields:
    # request_id, trace_id, span_id, parent_span_id and method must be JSON-safe (printable
    # ASCII without '"' or '\\'): they are copied without an escaping pass. The connection's
    # are: ids it made or checked (writer.client_request_id), hex trace ids, the method token
    # the parser checked.
    const ExchangeRecord *rec   # status, bytes, times (monotonic ns), rate, deny
    Text request_id
    Text trace_id               # 32 lowercase hex, or absent
    Text span_id                # 16 lowercase hex: the gateway's span
    Text parent_span_id         # 16 hex of the caller's span, absent when the trace started here
    bint trace_sampled          # the traceparent flags say sampled
    Text client_ip              # after trusted-proxy resolution
    Text id_method              # identity; id_method absent means no identity
    Text id_subject
    Text id_consumer
    Text entrypoint
    Text route                  # absent: no route matched / error before routing
    Text service
    Text server                 # the server URL the request went to; absent: not forwarded
    Text method                 # absent: no request head (an error before one)
    Text target                 # request-target as received (query redacted when written)
    int http_minor              # 0 or 1 (HTTP/1.x); -1 when there is no head
    Text user_agent
    Text referer
    Text tls_version            # "TLSv1.3", ...; absent on plain TCP
    Text deny_source            # the middleware (config name) that refused, when rec.deny
    Text deny_reason            # a fixed phrase, never a credential
    Text names                  # optional: names_fragment(entrypoint, route) of this route,
                                #   used instead of escaping `entrypoint` and `route` per line
    int preescaped              # PRE_* bits: service / server are json_string() values

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass

cdef struct Writer:
    # The stream's writer thread (a pthread: it never takes the GIL). It swaps the stream's
    # buffer with `spare` under `lock` and writes the full one to `fd` while the loop fills
    # the other. Counters are written by the thread only and read by Python (aligned words).
    pthread_mutex_t lock
    pthread_cond_t cond
    pthread_t thread
    char *spare                 # the buffer being written (capacity bytes)
    int fd                      # where batches go
    int new_fd                  # >= 0: switch to it before the next batch (reopen)
    bint owned                  # the writer closes fd when it is replaced or stopped
    bint new_owned
    bint chunked                # a pipe or socket: writes of at most PIPE_BUF at line ends
    bint new_chunked
    bint stopping               # write what is left, then end
    long long interval_ns       # a partial batch is written after this long
    unsigned long long written_bytes
    unsigned long long error_lines    # lines a failed write lost
    unsigned long long errors         # failed writes
    int last_errno
    char **buf                  # the stream's own fields (the LogStream outlives the thread)
    size_t *length
    bint *notified
    size_t flush_at

cdef class LogStream:
    # One stream's batch buffer in one worker. Filled by AccessLog.write (and write_line).
    # Emptied either by take() (a Python consumer: the OTLP sender), with `on_ready()` called
    # once when the length passes `flush_at` so the owner can schedule a take() soon; or by a
    # writer thread (start_writer: the access and audit logs), which is woken at flush_at and
    # otherwise writes every interval. With a writer, reserve() takes its lock and
    # commit()/drop() release it: a line is formatted under the lock (a few hundred ns).
    cdef char *buf
    cdef size_t length
    cdef size_t capacity
    cdef size_t flush_at
    cdef bint notified
    cdef public object on_ready
    cdef readonly unsigned long long lines      # lines accepted
    cdef readonly unsigned long long dropped    # lines refused: no room
    cdef Writer *w                              # NULL: no writer thread
    cdef object keepalive                       # self while the writer thread runs
    # Room for n more bytes (n <= MAX_LINE): a pointer to write at, or NULL (then the line
    # is dropped and counted by the caller through drop()). Every reserve() is followed by
    # exactly one commit() or drop().
    cdef char *reserve(self, size_t n) noexcept
    # The line written at the reserved pointer is `n` bytes long (its '\n' included).
    cdef void commit(self, size_t n) noexcept
    cdef void drop(self) noexcept

cdef class AccessLog:
    # One per worker, built by fastgate/logs from the config; the Engine holds it
    # (Engine.alog) and every connection of the worker writes through it.
    cdef readonly LogStream access         # None: the access log is off
    cdef readonly LogStream audit          # None: the audit stream is off
    cdef readonly LogStream spans          # None: span export (OTLP) is off
    cdef readonly int format               # a LogFormat, for the access stream
    cdef readonly unsigned int sample      # threshold for exchanges without a route
    cdef readonly bint log_errors          # ... and whether their errors are always logged
    cdef tuple redact                      # lowercase bytes: query keys whose values are hidden
    cdef bint drop_query                   # log the path without its query at all
    cdef unsigned long long rng            # xorshift64* state for sampling
    # Which streams take this exchange: WANT_* bits. `sample` / `errors` are the route's
    # (Route.log_sample / Route.log_errors), or the AccessLog's own for an exchange with no
    # route. Access: sample == SAMPLE_ALL, or a PRNG draw below `sample`, or (errors and
    # (status >= 400 or status == 0)); never when sample == 0 and not such an error... and
    # never when the route turned its log off (sample 0, errors False). Audit: rec.deny != 0.
    # Span: the spans stream is on and `sampled` (the trace's sampled flag).
    cdef int select(self, const ExchangeRecord *rec, unsigned int sample, bint errors,
                    bint sampled) noexcept
    # Format the exchange into each stream named in `want`; drops are counted per stream.
    cdef void write(self, const LogFields *f, int want) noexcept
