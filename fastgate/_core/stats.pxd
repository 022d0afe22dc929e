# Per-worker metric shards in shared memory (DESIGN.md §6). Read this before stats.pyx.
#
# A Shard is one worker's slot: a file (tmpfs) mapped MAP_SHARED, written by that worker only
# and read by the supervisor's /metrics collector. Label sets are registered at config compile
# (name tables); per request the connection fills an ExchangeRecord and calls record_exchange.

cdef enum:
    ROWS = 4096                 # rows per table (bounded label sets); row 0 is the overflow row
    NAME_BYTES = 256            # per name-table row: u16 length + labels joined by NUL
    N_METHODS = 8               # GET HEAD POST PUT DELETE PATCH OPTIONS other
    N_CLASSES = 5               # 1xx .. 5xx
    N_BUCKETS = 15              # 14 finite bounds + +Inf (non-cumulative in the shard)

cdef enum:                      # tables
    K_ROUTE = 0                 # (entrypoint, route, service)
    K_SERVER = 1                # (service, server)
    K_ENTRY = 2                 # (entrypoint,)
    K_RATE = 3                  # (route,)
    K_AUTH = 4                  # (route, middleware, reason)
    K_LOG = 5                   # (stream,): access / audit / spans (fastgate/logs)
    K_SERVICE = 6               # (service,): retries, circuit breaker, queue (conn.Service)
    N_KINDS = 7

# Word offsets inside one row of each table (u64 each).
cdef enum:                      # K_ROUTE row words
    RW_REQUESTS = 0                                     # [method][class]
    RW_BUCKETS = RW_REQUESTS + N_METHODS * N_CLASSES    # [class][bucket]
    RW_SUM_NS = RW_BUCKETS + N_CLASSES * N_BUCKETS      # [class]
    RW_REQ_BYTES = RW_SUM_NS + N_CLASSES
    RW_RESP_BYTES = RW_REQ_BYTES + 1
    ROUTE_WORDS = 128

cdef enum:                      # K_SERVER row words
    SW_BUCKETS = 0                                      # [bucket]
    SW_SUM_NS = N_BUCKETS
    SW_CONNECT_ERRORS = SW_SUM_NS + 1
    SW_TLS_ERRORS = SW_CONNECT_ERRORS + 1
    SW_OPENED = SW_TLS_ERRORS + 1
    SW_CLOSED = SW_OPENED + 1
    SW_EJECTIONS = SW_CLOSED + 1        # outlier detection ejected the server
    SW_UNHEALTHY = SW_EJECTIONS + 1     # gauge: workers whose active check says unhealthy
    SW_RETRIES = SW_UNHEALTHY + 1       # attempts at this server that were retries
    SERVER_WORDS = 32

cdef enum:                      # K_ENTRY row words
    EW_OPENED = 0
    EW_CLOSED = 1
    EW_TLS_OK = 2
    EW_TLS_FAILED = 3
    ENTRY_WORDS = 8

cdef enum:                      # K_RATE row words
    AW_ALLOWED = 0
    AW_LIMITED = 1
    AW_FALLBACK = 2
    RATE_WORDS = 4

cdef enum:
    AUTH_WORDS = 2              # [0]: failures

cdef enum:                      # K_LOG row words (copied from the LogStreams once a second)
    LW_LINES = 0                # lines written to the stream's buffer
    LW_DROPPED = 1              # lines dropped: buffer full, or the writer fell behind
    LOG_WORDS = 4

cdef enum:                      # K_SERVICE row words
    VW_RETRIES = 0              # retries made
    VW_BUDGET_EXHAUSTED = 1     # retries not made: the retry budget was spent
    VW_CB_OPENED = 2            # the circuit opened (also again after a failed probe)
    VW_CB_OPEN = 3              # gauge: workers whose circuit is open or half-open
    VW_CB_REJECTED = 4          # requests refused by an open circuit (503)
    VW_QUEUED = 5               # requests that waited for a slot (max_concurrent)
    VW_REJECTED = 6             # requests refused at capacity: queue full or timed out (503)
    VW_NO_SERVER = 7            # requests with no usable server (503)
    SERVICE_WORDS = 8
cdef enum RateOutcome:          # ExchangeRecord.rate: the route's rate-limit decision
    RATE_NONE = 0               # no rate limit decided on this request
    RATE_ALLOWED = 1
    RATE_FALLBACK = 2           # admitted by the outage policy (Redis unavailable)
    RATE_LIMITED = 3            # refused (429, or 503 for in-flight / fail-closed)

cdef enum DenyEvent:            # ExchangeRecord.deny: why the gateway refused (audit event)
    DENY_NONE = 0
    DENY_AUTH_FAILED = 1        # 401: missing or invalid credential
    DENY_FORBIDDEN = 2          # 403: an authorization rule refused the identity
    DENY_RATE_LIMITED = 3       # a rate limit or in-flight limit refused
    DENY_IP = 4                 # an IP allow/deny list refused the client
    DENY_AUTH_UNAVAILABLE = 5   # 503: what auth must ask is down (fail closed)

cdef struct ExchangeRecord:
    # One exchange as the connection saw it; filled from head to end, read at the one hook
    # (ConnCore.end_exchange) where metrics are recorded and the access log is written.
    bint active                 # an exchange is in flight (recorded once, then cleared)
    long long t_head_ns         # monotonic: request head complete (or the error noticed)
    long long t_up_start_ns     # request head handed to the upstream connection (0: never)
    long long t_up_end_ns       # upstream response complete (0: not completed)
    long long t_end_ns          # the exchange ended
    int status                  # status sent to the client (0: none was sent)
    int method                  # 0..7, see method_class
    long long req_bytes         # request body bytes received (wire framing)
    long long resp_bytes        # response bytes sent to the client (head + body)
    int ep_row                  # K_ENTRY row
    int route_row               # K_ROUTE row
    int server_row              # K_SERVER row (-1: not forwarded)
    int rate                    # a RateOutcome; the worst decision wins (LIMITED > FALLBACK > ALLOWED)
    int rate_row                # K_RATE row of the route (counted when rate != RATE_NONE)
    int deny                    # a DenyEvent (0: not refused by the gateway's policy)

cdef long long monotonic_ns() noexcept nogil
cdef int method_class(bytes method) noexcept

cdef class Shard:
    cdef char *base
    cdef size_t size
    cdef readonly str path              # None: anonymous (private) memory
    cdef dict rows                      # (kind, labels) -> row, for re-registration
    cdef unsigned long long *words[N_KINDS]
    cdef int nwords[N_KINDS]
    cdef int register(self, int kind, tuple labels) except -1
    cdef void record_exchange(self, ExchangeRecord *r) noexcept
    cdef void add(self, int kind, int row, int word, unsigned long long n) noexcept
