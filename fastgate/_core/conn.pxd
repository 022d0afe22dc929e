# The relay: client connections (ConnCore), upstream connections (UpstreamCore), their pools,
# and the per-worker Engine that owns timers and counters. Read this before conn.pyx.

from fastgate._core.httphead cimport RequestHead, ResponseHead, Limits
from fastgate._core.body cimport ChunkedScanner
from fastgate._core.router cimport Router
from fastgate._core.stats cimport Shard, ExchangeRecord
from fastgate._core.accesslog cimport AccessLog
from fastgate._core.writer cimport ForwardInfo, TraceCtx

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

cdef class Engine:
    cdef readonly object loop
    cdef public object dispatch            # dispatch(conn, head) for routes with a chain
    cdef readonly double now                # coarse clock, refreshed by the ticker
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
    cdef UpstreamCore acquire(self)
    cdef void release(self, UpstreamCore up)
    cdef void expire(self, double now)
    cdef str tls_failed(self, object exc, double now)

cdef class Service:
    cdef readonly str name
    cdef readonly tuple servers            # ServerPool, expanded by weight
    cdef Py_ssize_t rr
    cdef ServerPool pick(self)

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
    cdef Py_ssize_t forward_body(self, object src, const char *p, Py_ssize_t n)
    cdef void request_sent(self)
    cdef void on_upstream_data(self, bytes data)
    cdef void relay_body(self, object src, const char *p, Py_ssize_t n)
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
