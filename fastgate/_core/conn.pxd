# The relay: client connections (ConnCore), upstream connections (UpstreamCore), their pools,
# and the per-worker Engine that owns timers and counters. Read this before conn.pyx.

from fastgate._core.httphead cimport RequestHead, ResponseHead, Limits
from fastgate._core.body cimport ChunkedScanner
from fastgate._core.router cimport Router
from fastgate._core.stats cimport Shard, ExchangeRecord
from fastgate._core.accesslog cimport AccessLog
from fastgate._core.writer cimport ForwardInfo, TraceCtx
from libc.stdint cimport uint64_t

cdef enum ReqState:
    RQ_HEAD = 0        # waiting for (the rest of) a request head
    RQ_DISPATCH = 1    # head parsed; a middleware is waiting on I/O or the upstream connects
    RQ_BODY = 2        # streaming the request body upstream
    RQ_SENT = 3        # request fully sent; waiting for the response to finish
    RQ_TUNNEL = 4      # after 101 Switching Protocols: bytes relayed both ways
    RQ_BUFFER = 5      # reading the request body into memory before the middleware chain runs
    RQ_CLOSED = 6      # this and every state after it: the exchange is over (`rq >= RQ_CLOSED`)
    RQ_LINGER = 7      # error reply sent, FIN sent; discarding input until EOF or deadline

cdef enum RespState:
    RS_NONE = 0        # no exchange in flight
    RS_HEAD = 1        # waiting for the response head
    RS_BODY = 2        # relaying the response body
    RS_TUNNEL = 3

cdef enum TimerKind:
    T_NONE = 0
    T_HEAD = 1         # client head read (408)
    T_IDLE = 2         # keep-alive idle between requests (silent close)
    T_BODY = 3         # idle gap in the request body (408)
    T_UPSTREAM = 4     # upstream connect (502), response head (504), idle gap in its body (abort)
    T_SEND = 5         # the client does not read what we send (abort)
    T_LINGER = 6       # end of the lingering close
    T_QUEUE = 7        # waiting for a slot of a service at max_concurrent (503)

cdef enum Balance:     # Service.balancer
    BAL_ROUND_ROBIN = 0    # smooth weighted round robin (nginx's)
    BAL_LEAST_REQUEST = 1  # power of two choices on requests in flight / weight
    BAL_RANDOM = 2         # weighted random
    BAL_HASH = 3           # consistent hash ring on a key (client IP, header, cookie)
    BAL_STICKY = 4         # the server named by a cookie the gateway set

cdef enum HashOn:
    HASH_CLIENT_IP = 0
    HASH_HEADER = 1
    HASH_COOKIE = 2

cdef enum Outcome:     # how one attempt at a server went (outlier detection, breaker, retries)
    OUT_OK = 0             # a response head below 500
    OUT_5XX = 1            # a 5xx response head
    OUT_CONNECT = 2        # connect (or TLS handshake) failed or timed out: nothing was sent
    OUT_RESET = 3          # the connection closed or failed before the response head
    OUT_TIMEOUT = 4        # no response head in time

cdef enum RetryOn:     # Service.retry_on bits
    RETRY_CONNECT = 1
    RETRY_RESET = 2
    RETRY_TIMEOUT = 4
    RETRY_STATUS = 8

cdef enum BreakerState:
    CB_CLOSED = 0
    CB_OPEN = 1
    CB_HALF_OPEN = 2

cdef enum:
    WINDOW_BUCKETS = 10    # buckets of the retry-budget and circuit-breaker windows

cdef class Engine:
    cdef readonly object loop
    cdef public object dispatch            # dispatch(conn, head) for routes with a chain
    cdef readonly double now                # coarse clock, refreshed by the ticker and at accept
    cdef readonly set conns                 # live client connections
    cdef readonly set upstreams             # live upstream connections
    cdef list pools                         # every ServerPool in use, for idle expiry
    cdef object ticker
    cdef double tick_interval
    cdef bytes rid_prefix
    cdef unsigned long long rid_counter
    cdef readonly bint draining
    cdef readonly Shard shard               # this worker's metric slot (stats.pxd)
    cdef public AccessLog alog              # access/audit/span streams (fastgate/logs), or None
    cdef public object client_resolver      # conn -> client IP bytes behind a trusted proxy
    cdef readonly unsigned long long requests     # requests whose head was parsed
    cdef readonly unsigned long long responses    # exchanges completed
    cdef readonly unsigned long long errors       # gateway-generated error replies
    cdef bytes next_request_id(self)
    cdef void register_pool(self, ServerPool pool)

cdef class EntryConfig:
    # Immutable per config generation; swapped on reload (EntryPoint.cfg).
    cdef readonly Router router
    cdef readonly Limits limits
    cdef readonly double head_timeout
    cdef readonly double idle_timeout
    cdef readonly double body_timeout
    cdef readonly long long max_body
    cdef readonly bytes proto
    cdef readonly int max_connections      # open client connections per worker; 0 = no limit
    cdef readonly double min_body_rate     # request body bytes/s after timeouts.body; 0 = off
    cdef readonly object trusted_nets      # tuple of ipaddress networks
    cdef readonly bint forwarded_header
    cdef public int stats_entry            # stats K_ENTRY row of the entrypoint
    cdef public int stats_noroute          # stats K_ROUTE row (entrypoint, "", ""): no route
    cdef readonly int trust_trace          # a writer.TrustMode for incoming traceparent
    cdef readonly int trust_request_id     # a writer.TrustMode for incoming X-Request-ID
    cdef readonly bint trace_sampled       # flags 01 on the traces the gateway starts
    cdef readonly Py_ssize_t max_held      # pipelined input held before reading pauses

cdef class EntryPoint:
    cdef public EntryConfig cfg
    cdef readonly str name
    cdef readonly int open_connections     # client connections open now (max_connections)
    cdef readonly unsigned long long refused  # connections refused at max_connections

cdef class ServerPool:
    # One upstream server and its idle keep-alive connections (LIFO).
    cdef readonly str host
    cdef readonly int port
    cdef readonly str url
    cdef bytes url_json                    # url as a JSON string, for the access log (lazy)
    cdef list idle
    cdef readonly int max_idle
    cdef readonly double idle_timeout
    cdef readonly double connect_timeout
    cdef readonly double response_timeout
    cdef readonly double idle_body_timeout
    cdef readonly int active               # connections lent to clients
    cdef readonly unsigned long long connects
    cdef readonly unsigned long long connect_errors
    cdef readonly object ssl               # ssl.SSLContext for an https:// server, else None
    cdef readonly str server_hostname      # SNI and the name verified (None: plain TCP)
    cdef readonly unsigned long long tls_errors   # TLS handshakes or sessions that failed
    cdef Shard shard
    cdef public int stats_row              # stats K_SERVER row (service, url)
    cdef double tls_logged                 # when a TLS failure was last logged (rate limit)
    cdef bint closed
    # Balancing and health (Service); the engine.now clock.
    cdef readonly int weight
    cdef readonly bint healthy             # the active health check's verdict (True at start)
    cdef readonly double ejected_until     # outlier detection: out of rotation until then
    cdef readonly int consecutive_errors
    cdef readonly int ejections            # ejections so far (the back-off multiplier)
    cdef readonly bytes sticky_id          # sticky_cookie value naming this server
    cdef UpstreamCore acquire(self)
    cdef void release(self, UpstreamCore up)
    cdef void expire(self, double now)
    cdef str tls_failed(self, object exc, double now)

cdef class Service:
    # The servers behind one name and the policies that pick one and handle its failures
    # (docs/services.md). Everything here runs in C per request; the state is per worker.
    cdef readonly str name
    cdef readonly tuple pools              # distinct ServerPool, config order
    cdef int n
    cdef long *weights
    cdef long *current                     # smooth weighted round robin state
    cdef int *scratch                      # n ints: candidate indices (least_request)
    cdef uint64_t rng                      # xorshift64* state (random, least_request)
    cdef readonly int balancer             # a Balance
    cdef int hash_on                       # a HashOn
    cdef bytes key_name                    # hash: lowercase header name, or the cookie name
    cdef uint64_t *ring_hash               # hash: the ring, sorted, and each point's pool index
    cdef int *ring_pool
    cdef int ring_n
    cdef bytes cookie_name                 # sticky_cookie
    cdef bytes cookie_attrs                # "; Path=/; HttpOnly; SameSite=Lax[; Max-Age=N]"
    cdef readonly bint panic               # every server unusable: use them all (else 503)
    cdef bint guarded                      # health checks or outlier detection: test usable()
    # outlier detection
    cdef bint od_on
    cdef int od_consecutive, od_max_percent
    cdef double od_base, od_max
    # retries and their budget
    cdef readonly int retry_attempts
    cdef int retry_on                      # RetryOn bits
    cdef uint64_t retry_statuses[2]        # bit (status - 500) for 500..599
    cdef double budget_ratio
    cdef int budget_min                    # retries per window always allowed
    cdef long long win_sec[10]
    cdef unsigned int win_req[10]
    cdef unsigned int win_retry[10]
    # circuit breaker
    cdef bint cb_on
    cdef readonly int cb_state             # a BreakerState
    cdef double cb_bucket                  # seconds per bucket (window / WINDOW_BUCKETS)
    cdef long long cb_epoch[10]
    cdef unsigned int cb_total[10]
    cdef unsigned int cb_err[10]
    cdef unsigned int cb_slow[10]
    cdef int cb_min
    cdef double cb_err_ratio, cb_slow_ratio   # < 0: not judged
    cdef long long cb_slow_ns
    cdef double cb_open_for, cb_opened_at
    cdef int cb_probes, cb_probe_ok, cb_probe_inflight
    # concurrency
    cdef readonly int max_concurrent, max_queue
    cdef readonly double queue_timeout
    cdef readonly int inflight
    cdef object queue                      # collections.deque of waiting ConnCore
    cdef bint waking
    cdef Shard shard
    cdef public int stats_row              # stats K_SERVICE row
    cdef ServerPool pick(self, ConnCore conn, ServerPool avoid)
    cdef int choose(self, ConnCore conn, double now, ServerPool avoid, bint any_state)
    cdef int choose_rr(self, double now, ServerPool avoid, bint any_state) noexcept
    cdef void build_ring(self)
    cdef void open_circuit(self, double now, str why)
    cdef void close_circuit(self)
    cdef bint usable(self, ServerPool p, double now, ServerPool avoid, bint any_state) noexcept
    cdef int admit(self, double now)
    cdef void record(self, ServerPool pool, int outcome, long long latency_ns, bint probe,
                     double now)
    cdef void note_request(self, double now) noexcept
    cdef bint budget_allows(self, double now)
    cdef void release(self, ConnCore conn)

cdef class CoreCheck:
    # A request check run in C before the Python chain (DESIGN.md §2: no Python frame for a
    # check that needs none, e.g. a local rate limit on the client address). Subclasses (in
    # other _core modules) override check(); it returns None to continue, or a reply object
    # with `encode(request_id: bytes, close: bool) -> bytes`. A check that holds something
    # for the request's lifetime calls conn.add_done(self) and is told in complete().
    cdef object check(self, ConnCore conn, RequestHead head)
    cdef void complete(self, ConnCore conn)

cdef class CredentialCache:
    # Verified credentials of the route's first auth middleware, looked up in C so a repeat
    # costs no Python at all: exact header value -> (deadline in monotonic ns, identity,
    # upstream header lines). Filled and emptied by the middleware (Python), read here.
    cdef readonly bytes header             # lowercase header name the credential is in
    cdef dict entries
    cdef readonly Py_ssize_t max_entries
    cdef readonly unsigned long long hits
    cdef tuple lookup(self, RequestHead h, long long now_ns)

cdef class Route:
    cdef readonly str name
    cdef readonly tuple checks             # CoreCheck objects, run first, in C
    cdef readonly tuple chain              # middlewares, built once at compile
    cdef readonly CredentialCache fast_auth  # chain[0]'s verified credentials, or None
    cdef readonly Service service
    cdef readonly double connect_timeout   # the route's effective upstream timeouts
    cdef readonly double response_timeout  #   (its own over its service's over the global)
    cdef readonly double idle_timeout
    cdef readonly double total_timeout     # 0 = none
    cdef readonly long long max_body       # request body bytes (413); -1 = the entrypoint's
    cdef readonly tuple strip_prefixes     # path prefixes removed upstream (first match); None
    cdef readonly bytes add_prefix         # path prefix added upstream; None
    cdef readonly object compress          # a compress.CompressRule, or None
    cdef readonly bytes extra_headers      # preformatted request header lines
    cdef readonly tuple strip_headers      # lowercase names never passed upstream; None = none
    cdef readonly long long buffer_body    # >0: read bodies up to this size before the chain
    cdef readonly bytes response_headers   # lines added to every response on this route
    cdef readonly tuple response_strip     # lowercase names dropped from responses; None = none
    cdef public int stats_row              # stats K_ROUTE row (entrypoint, route, service)
    cdef public int stats_local            # ... (entrypoint, route, ""): answered locally
    cdef public int stats_rate             # stats K_RATE row (route,): its rate-limit decisions
    cdef public unsigned int log_sample    # access log: u32 sample threshold (0 = off,
                                           #   accesslog.SAMPLE_ALL = every request)
    cdef public bint log_errors            # access log: status >= 400 (or none) always logged
    cdef bytes log_names                   # accesslog.names_fragment for log_names_ep (lazy)
    cdef object log_names_ep               # the entrypoint name that fragment was made for
    cdef bytes log_service                 # the service name as a JSON string (lazy)

cdef class UpstreamCore:
    cdef object transport
    cdef object _write
    cdef Engine engine
    cdef ServerPool pool
    cdef ConnCore client                   # attached client, None while idle
    cdef list pending                      # writes before the connection is made
    cdef bint connected
    cdef bint closing
    cdef bint reused                       # it served an exchange before this one
    cdef bint read_paused
    cdef double idle_since
    cdef void send(self, bytes data)
    cdef void close(self)
    cdef void pause_reading(self)
    cdef void resume_reading(self)

cdef class ConnCore:
    cdef object transport
    cdef object _write
    cdef Engine engine
    cdef EntryPoint ep
    cdef EntryConfig cfg
    cdef ForwardInfo fwd
    cdef bytearray inbuf
    cdef Py_ssize_t scan_pos
    cdef bint in_consume
    cdef int rq
    cdef int rs
    cdef readonly RequestHead head
    cdef readonly bytes request_id
    cdef bint id_from_client
    cdef TraceCtx trace                    # this request's trace context (writer.pxd)
    cdef Route route
    cdef UpstreamCore up
    cdef bytes up_head
    cdef bytes up_extra                    # this request's header lines from middlewares
    cdef readonly object fast_identity     # the identity a CredentialCache hit gave, or None
    cdef readonly int chain_start          # 1 when that hit stands for chain[0]
    cdef public object identity            # the chain's Identity (set by dispatch), or None
    cdef public object deny_source         # who refused this request (middleware name), or None
    cdef public object deny_reason         # why (a fixed phrase), with rec.deny
    cdef bytes tls_name                    # negotiated TLS version for the log (lazy, per conn)
    cdef ServerPool log_pool               # the server this exchange went to (access log)
    cdef void log_exchange(self, AccessLog alog)
    cdef long long req_remaining
    cdef int req_framing
    cdef ChunkedScanner req_chunks
    cdef ChunkedScanner resp_chunks
    cdef ResponseHead resp
    cdef int resp_framing
    cdef long long resp_remaining
    cdef bytearray upbuf
    cdef Py_ssize_t up_scan
    cdef bint resp_started
    cdef bint close_after
    cdef bint eof                          # the client half-closed; close once idle
    cdef bint retried
    cdef ServerPool tried                  # the server of the attempt in flight
    cdef int attempts                      # retries made for this request
    cdef bint observed                     # this attempt's outcome was recorded
    cdef bint holds_slot                   # counted in its service's inflight
    cdef bint probe                        # a half-open circuit-breaker probe
    cdef bint queued                       # waiting in its service's queue
    cdef double total_deadline             # route total timeout (engine.now clock); 0 = none
    cdef double body_t0                    # when the body's rate window started
    cdef long long body_seen0              # rec.req_bytes then
    cdef long long max_body                # this request's body limit (route, else entry)
    cdef bytes resp_extra                  # this request's response header lines
    cdef bytes sticky_line                 # sticky_cookie: the Set-Cookie line of the pick
    cdef bytes up_target                   # request-target sent upstream (None: the client's)
    cdef object enc                        # compress.Encoder of this response, or None
    cdef int read_pause
    cdef bint write_paused
    cdef double deadline
    cdef int timer
    cdef readonly unsigned long long served
    cdef bint linger                       # the next close lingers (an error may leave input)
    cdef list done_hooks                   # CoreCheck or callables told when the exchange ends
    cdef void add_done(self, object hook)
    cdef void run_done_hooks(self)
    cdef void close_client(self, bint linger)

    cdef long long req_seen               # chunked request bytes seen (max_body)
    cdef bytearray body_buf                # RQ_BUFFER: the body as received (wire framing)
    cdef ChunkedScanner body_scan          # RQ_BUFFER, chunked: finds the end, decodes
    cdef readonly bytes request_body       # the decoded buffered body, for the chain
    cdef bint body_read                    # this request's body was read whole (no linger)
    cdef bint start_buffer(self)
    cdef Py_ssize_t buffer_more(self, const char *p, Py_ssize_t n)
    cdef bint run_chain(self)
    cdef object peer_cert                  # TLS client certificate (DER) or None; lazy
    cdef bint peer_cert_known              # peer_cert was looked up (once per connection)
    cdef Py_ssize_t consume(self, object src, const char *p, Py_ssize_t n)
    cdef void hold_check(self)
    cdef void drain_inbuf(self)
    cdef bint on_head(self, bytes raw)
    cdef bint dispatch_verdict(self, object verdict)
    cdef void send_local(self, object reply)
    cdef UpstreamCore connect(self, ServerPool pool)
    cdef void forward(self)
    cdef void begin_upstream(self)
    cdef void attach(self, ServerPool pool, list pending)
    cdef void arm_upstream(self, double seconds)
    cdef void start_body_window(self)
    cdef void rearm_body(self)
    cdef void observe(self, int outcome)
    cdef bint retry(self, int outcome)
    cdef void upstream_error(self, int outcome, int status, str message)
    cdef void shard_retry(self, ServerPool pool)
    cdef Py_ssize_t forward_body(self, object src, const char *p, Py_ssize_t n)
    cdef void request_sent(self)
    cdef void on_upstream_data(self, bytes data)
    cdef void relay_body(self, object src, const char *p, Py_ssize_t n)
    cdef void send_compressed_head(self, ResponseHead rh, bint close, bytes lines,
                                   const char *tail, Py_ssize_t n)
    cdef void detach_up(self, bint reusable)
    cdef void upstream_failed(self, int status, str message)
    cdef void response_done(self)
    cdef ExchangeRecord rec                # the exchange in flight, for metrics (stats.pxd)
    cdef void begin_exchange(self)
    cdef void end_exchange(self)
    cdef void finish_exchange(self, bint close)
    cdef void reply_error(self, int status, str message, bint close)
    cdef void abort(self)
    cdef void set_read_pause(self, int reason, bint on)
    cdef void tick(self, double now)
