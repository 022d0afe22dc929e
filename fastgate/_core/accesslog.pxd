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

cdef enum:
    SAMPLE_ALL = 0xFFFFFFFF   # a u32 sample threshold that logs every exchange
    MAX_LINE = 16384          # a stream keeps at least this much room for the next line
    MAX_PATH_LOG = 2048       # request-target bytes logged (then "..." is appended)
    MAX_VALUE_LOG = 512       # user agent / referer / identity / reason bytes logged

cdef struct Text:
    const char *p         # NULL: absent (JSON null, CLF "-")
    Py_ssize_t n

cdef struct LogFields:
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

cdef class LogStream:
    # One stream's batch buffer in one worker. Filled by AccessLog.write (and write_line),
    # emptied by take(). When its length passes `flush_at`, `on_ready()` (a Python callable)
    # is called once, so the owner can schedule a take() soon; it is called again only after
    # the next take().
    cdef char *buf
    cdef size_t length
    cdef size_t capacity
    cdef size_t flush_at
    cdef bint notified
    cdef public object on_ready
    cdef readonly unsigned long long lines      # lines accepted
    cdef readonly unsigned long long dropped    # lines refused: no room
    # Room for n more bytes (n <= MAX_LINE): a pointer to write at, or NULL (then the line
    # is dropped and counted by the caller through drop()).
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
