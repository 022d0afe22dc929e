# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay: one client connection, its current upstream exchange, and the pools.

Theory of operation
-------------------
A client connection is a state machine over two half-exchanges (conn.pxd: ReqState and
RespState). Bytes from the client are consumed in place from the buffer uvloop hands us (the
common case: a whole request per read, parsed without copying); only a partial head or bytes
of a pipelined next request are kept, in one bytearray. The exchange is strictly sequential:
the next pipelined request is parsed only when the current response has ended, so responses go
back in order and the pipeline costs no extra memory beyond the bounded input buffer.

Per request, the only Python-level work is the route's middleware chain (`Engine.dispatch`),
and only for routes that have one. Parsing, routing, the upstream head, the response head and
body framing are C calls (httphead, router, writer, body).

Bodies are never buffered whole: request body bytes are written upstream as they arrive,
response body bytes are written to the client as they arrive, and when either side's write
buffer passes uvloop's high-water mark the other side stops reading (pause_writing ->
pause_reading) until it drains (resume_writing). Memory per connection is therefore bounded
by the two transports' high-water marks plus the head limits.

Framing: Content-Length is counted down; chunked bodies are relayed verbatim while
ChunkedScanner finds their end and refuses bad framing; a response without either is
delimited by the upstream closing, and then the client connection is closed after it too.
HEAD, 1xx, 204 and 304 responses have no body (RFC 9112 §6.3). Interim 1xx responses (100
Continue) are forwarded, so `Expect: 100-continue` works end to end; 101 turns the connection
into a tunnel when the client asked for that upgrade.

Timers: one coarse ticker per worker walks the live connections (Engine.tick); each connection
keeps one deadline and what it guards (TimerKind). No call_later per request.

Upstream connections live in a per-server LIFO idle pool; one goes back to the pool only
after a delimited response that did not announce `Connection: close`. A reused connection that
dies before answering a body-less request is retried once on a fresh connection (the keep-alive
race of RFC 9112 §9.3.1), nothing else is retried here.

An https:// server's pool carries its service's client SSLContext (fastgate/tls/client.py:
verified chain and name, SNI) and the transport is TLS; pooling is unchanged. The connect
deadline covers the TCP connect and the handshake (connection_made comes after it). A
failed handshake, or a TLS error on an established upstream connection (a TLS 1.3 server
refusing our client certificate says so after our handshake is done), is a 502 "upstream
TLS failure", never a clean end of a close-delimited body: a TLS error cannot be an EOF. (A
TCP close without close_notify still ends a close-delimited body, as it does in plain HTTP.)

A client's FIN is a half-close (RFC 9112 §9.6): the requests it completed before it are still
answered, in order, then the connection closes; inside a tunnel the FIN is passed upstream.
"""

import asyncio
import hashlib
import logging
import os
from collections import deque
import struct
from socket import SO_LINGER, SOL_SOCKET
from ssl import SSLError

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.tuple cimport PyTuple_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport qsort
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memcpy, memset, memcmp
from cpython.unicode cimport PyUnicode_Check

from fastgate._core.httphead cimport (
    RequestHead, ResponseHead, Limits, find_head_end, parse_request_head, parse_response_head,
    header_name_is,
    FRAMING_NONE, FRAMING_LENGTH, FRAMING_CHUNKED, FRAMING_CLOSE, last_error_reason,
)
from fastgate._core.body cimport ChunkedScanner
from fastgate._core.router cimport Router
from fastgate._core.stats cimport (
    Shard, ExchangeRecord, monotonic_ns, method_class, K_ENTRY, K_SERVER, EW_OPENED, EW_CLOSED,
    SW_OPENED, SW_CLOSED, SW_CONNECT_ERRORS, SW_TLS_ERRORS, RATE_NONE, DENY_NONE, K_SERVICE,
    SW_EJECTIONS, SW_UNHEALTHY, SW_RETRIES, VW_RETRIES, VW_BUDGET_EXHAUSTED, VW_CB_OPENED,
    VW_CB_OPEN, VW_CB_REJECTED, VW_QUEUED, VW_REJECTED, VW_NO_SERVER,
)
from fastgate._core.accesslog cimport (
    AccessLog, LogFields, Text, SAMPLE_ALL, WANT_SPAN, PRE_SERVICE, PRE_SERVER, FMT_COMBINED,
)
from fastgate._core.accesslog import json_string, names_fragment
from fastgate._core.compress cimport CompressRule, Encoder, negotiate
from fastgate._core.writer cimport (
    ForwardInfo, build_request_head, build_response_head, build_error_reply, client_request_id,
    TraceCtx, trace_begin, trace_seed, trace_value, trust_allows, TRACE_NONE, TRACE_CONTINUED,
    TRUST_ALWAYS, TRUST_TRUSTED, TRUST_NEVER,
)

cdef enum:
    PAUSE_UPSTREAM_FULL = 1    # the upstream's write buffer is full (request body)
    PAUSE_PIPELINE = 2         # pipelined input held while an exchange is in flight
    PAUSE_DISPATCH = 4         # a middleware is waiting on I/O
    MAX_RESPONSE_HEAD = 65536
    LINGER_MS = 2000           # after an error close, read and discard for this long
    TAIL_COPY_MAX = 65536      # body bytes sent in the same write as the response head

cdef tuple COMPRESS_STRIP = (b"etag", b"accept-ranges")
cdef bytes LINGER_RESET = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close sends RST
cdef double TLS_LOG_INTERVAL = 60.0   # seconds between logged TLS failures, per server
_log = logging.getLogger("fastgate.upstream")



cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL


cdef inline void set_bytes(Text *t, bytes b) noexcept:
    """Point a log Text at a bytes object (absent when None); the caller keeps b alive."""
    if b is not None:
        t.p = PyBytes_AS_STRING(b)
        t.n = PyBytes_GET_SIZE(b)


cdef inline void set_text(Text *t, object s):
    """Point a log Text at a str's cached UTF-8 (absent unless a str); the caller keeps s
    alive. A str that cannot be encoded (lone surrogates) is left absent."""
    cdef Py_ssize_t n = 0
    if s is not None and PyUnicode_Check(s):
        try:
            t.p = PyUnicode_AsUTF8AndSize(s, &n)
            t.n = n
        except UnicodeError:
            t.p = NULL


cdef inline void header_text(Text *t, RequestHead h, const char *name, Py_ssize_t n):
    """Point a log Text at the first value of header `name` (lowercase) in h.raw."""
    cdef Py_ssize_t i = h.find(name, n)
    cdef const uint32_t *off
    if i >= 0:
        off = h.offs + 4 * i
        t.p = PyBytes_AS_STRING(h.raw) + off[2]
        t.n = off[3] - off[2]


cdef class Engine:
    """Per-worker state shared by all connections: clock, timers, pools, request ids."""

    def __init__(self, loop, dispatch=None, double tick_interval=0.5, Shard shard=None):
        self.loop = loop
        # Counters always go somewhere: private memory when no supervisor slot is given.
        self.shard = shard if shard is not None else Shard()
        self.dispatch = dispatch
        self.conns = set()
        self.upstreams = set()
        self.pools = []
        self.now = loop.time()
        self.tick_interval = tick_interval
        self.rid_prefix = os.urandom(8).hex().encode()
        self.rid_counter = 0
        trace_seed(os.urandom(32))   # trace/span ids: this worker's own sequence
        self.ticker = loop.call_later(tick_interval, self._tick)

    cdef bytes next_request_id(self):
        # 32 hex digits: 16 random per worker, then a 64-bit counter. Unique, not secret.
        cdef char buf[32]
        cdef unsigned long long v
        cdef int i
        memcpy(buf, PyBytes_AS_STRING(self.rid_prefix), 16)
        self.rid_counter += 1
        v = self.rid_counter
        for i in range(31, 15, -1):
            buf[i] = b"0123456789abcdef"[v & 15]
            v >>= 4
        return PyBytes_FromStringAndSize(buf, 32)

    cdef void register_pool(self, ServerPool pool):
        self.pools.append(pool)

    def _tick(self):
        cdef ConnCore c
        cdef ServerPool p
        cdef double late
        self.now = self.loop.time()
        # Deadlines were set from a clock up to one period stale, so a timer is only due one
        # period after its deadline: it never fires early, and at most two periods late.
        late = self.now - self.tick_interval
        for c in list(self.conns):
            if c.timer != T_NONE and late >= c.deadline:
                c.tick(self.now)
        for p in self.pools:
            p.expire(self.now)
        if any((<ServerPool>p).closed and (<ServerPool>p).active == 0 for p in self.pools):
            # Retired generations' pools: nothing lent out any more, forget them.
            self.pools = [p for p in self.pools
                          if not ((<ServerPool>p).closed and (<ServerPool>p).active == 0)]
        self.ticker = self.loop.call_later(self.tick_interval, self._tick)

    def set_tick_interval(self, double seconds):
        self.tick_interval = max(0.02, min(seconds, 1.0))

    def start_drain(self):
        """Stop keep-alive: idle connections close now, busy ones after their response."""
        cdef ConnCore c
        self.draining = True
        for c in list(self.conns):
            if c.rq == RQ_HEAD and c.rs == RS_NONE and PyByteArray_GET_SIZE(c.inbuf) == 0:
                c.rq = RQ_CLOSED
                c.transport.close()
            else:
                c.close_after = True

    def abort_all(self):
        """Reset every client connection still open (the drain deadline passed)."""
        cdef ConnCore c
        for c in list(self.conns):
            c.abort()

    def close(self):
        """Stop the ticker and close every idle upstream connection."""
        cdef ServerPool p
        if self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None
        for p in self.pools:
            p.close_idle()

    def stats(self):
        return {
            "requests": self.requests,
            "responses": self.responses,
            "errors": self.errors,
            "client_connections": len(self.conns),
            "upstream_connections": len(self.upstreams),
        }


_TRUST_MODES = {"always": TRUST_ALWAYS, "trusted": TRUST_TRUSTED, "never": TRUST_NEVER}


def _trust_mode(str mode):
    """forwarded.trust_trace_context / trust_request_id as a writer.TrustMode."""
    try:
        return _TRUST_MODES[mode]
    except KeyError:
        raise ValueError(f"trust mode must be always, trusted or never, not {mode!r}") from None


cdef class EntryConfig:
    def __init__(self, Router router, Limits limits, double head_timeout=10.0,
                 double idle_timeout=60.0, double body_timeout=60.0, long long max_body=0,
                 bytes proto=b"http", trusted_nets=(), bint forwarded_header=False,
                 Py_ssize_t max_held=262144, str trust_trace_context="always",
                 str trust_request_id="always", bint trace_sampled=False,
                 int max_connections=0, double min_body_rate=0.0):
        self.router = router
        self.max_connections = max_connections
        self.min_body_rate = min_body_rate
        self.trust_trace = _trust_mode(trust_trace_context)
        self.trust_request_id = _trust_mode(trust_request_id)
        self.trace_sampled = trace_sampled
        self.max_held = max_held
        self.limits = limits
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.max_body = max_body
        self.proto = proto
        self.trusted_nets = tuple(trusted_nets)
        self.forwarded_header = forwarded_header

    def is_trusted(self, str ip):
        import ipaddress
        if not self.trusted_nets:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_nets)


cdef class EntryPoint:
    def __init__(self, str name, EntryConfig cfg):
        self.name = name
        self.cfg = cfg


cdef inline bint method_idempotent(bytes m) noexcept:
    """RFC 9110 §9.2.2 idempotent methods: sending one twice has the effect of once."""
    return (m == b"GET" or m == b"HEAD" or m == b"OPTIONS" or m == b"PUT" or m == b"DELETE"
            or m == b"TRACE")


cdef tuple rewrite_prefix(Route route, RequestHead h):
    """(upstream target, stripped prefix or None) for the route's strip_prefixes and
    add_prefix: the first prefix matching at a segment boundary is removed (`/api` strips
    `/api` and `/api/x`, never `/apix`), then add_prefix is put in front; the query stays."""
    cdef bytes path = h.path
    cdef bytes stripped = None
    cdef Py_ssize_t n
    if route.strip_prefixes is not None:
        for prefix in route.strip_prefixes:
            n = PyBytes_GET_SIZE(<bytes>prefix)
            if path.startswith(prefix) and (
                    PyBytes_GET_SIZE(path) == n or path[n] == 47 or prefix == b"/"):
                stripped = <bytes>prefix
                path = path[n:] if prefix != b"/" else path
                if not path.startswith(b"/"):
                    path = b"/" + path
                break
    if route.add_prefix is not None:
        path = route.add_prefix + path
    if h.query is not None:
        path = path + b"?" + h.query
    return path, stripped


cdef class ServerPool:
    def __init__(self, Engine engine, str url, str host, int port, int max_idle=256,
                 double idle_timeout=60.0, double connect_timeout=5.0,
                 double response_timeout=60.0, double idle_body_timeout=60.0,
                 ssl=None, str server_hostname=None):
        self.url = url
        self.host = host
        self.port = port
        # TLS to this server: the context verifies it (fastgate/tls/client.py); the name is
        # sent as SNI (not for an IP literal) and checked against the certificate.
        self.ssl = ssl
        self.server_hostname = (server_hostname or host) if ssl is not None else None
        self.idle = []
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.idle_body_timeout = idle_body_timeout
        self.shard = engine.shard
        self.weight = 1
        self.healthy = True
        engine.register_pool(self)

    def set_healthy(self, bint healthy):
        """The active health check's verdict (fastgate/routing/health.py): an unhealthy
        server leaves its service's rotation until it is healthy again."""
        if healthy == self.healthy:
            return
        self.healthy = healthy
        self.shard.add(K_SERVER, self.stats_row, SW_UNHEALTHY,
                       <unsigned long long>-1 if healthy else 1)

    cdef UpstreamCore acquire(self):
        cdef UpstreamCore up
        while self.idle:
            up = <UpstreamCore>self.idle.pop()
            if not up.closing:
                self.active += 1
                return up
        return None

    cdef void release(self, UpstreamCore up):
        self.active -= 1
        up.client = None
        if self.closed or up.closing or len(self.idle) >= self.max_idle:
            up.close()
            return
        if up.read_paused:
            up.resume_reading()
        up.reused = True
        up.idle_since = up.engine.now
        self.idle.append(up)

    cdef void expire(self, double now):
        cdef UpstreamCore up
        # Oldest first: the list is LIFO, so stale connections sit at the front.
        while self.idle:
            up = <UpstreamCore>self.idle[0]
            if now - up.idle_since < self.idle_timeout and not up.closing:
                break
            self.idle.pop(0)
            up.close()

    def close_idle(self):
        """Close idle connections and stop pooling (the config generation is retired)."""
        cdef UpstreamCore up
        self.closed = True
        for up in self.idle:
            up.close()
        self.idle = []
        if not self.healthy:     # the unhealthy gauge counts live generations only
            self.set_healthy(True)

    def idle_count(self):
        return len(self.idle)

    def _forget(self, UpstreamCore up):
        try:
            self.idle.remove(up)
        except ValueError:
            pass

    cdef str tls_failed(self, object exc, double now):
        """Count a TLS failure and log its reason (at most once a minute per server: a
        broken certificate fails every request). Returns the client's error message."""
        self.tls_errors += 1
        self.shard.add(K_SERVER, self.stats_row, SW_TLS_ERRORS, 1)
        if self.tls_logged == 0 or now - self.tls_logged >= TLS_LOG_INTERVAL:
            self.tls_logged = now
            _log.warning("upstream %s: TLS failure: %s", self.url,
                         getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
                         or exc)
        return "upstream TLS failure"


cdef bint is_tls_failure(ServerPool pool, object exc):
    """Whether a failed connect to `pool` failed in TLS rather than in TCP: an SSLError, or
    (for a TLS server) the peer dropping us mid-handshake. Refused/unreachable stay TCP."""
    if pool.ssl is None:
        return False
    return isinstance(exc, (SSLError, ConnectionResetError, ConnectionAbortedError, EOFError))


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64's finalizer: spreads FNV's low-entropy output over the ring
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline uint64_t hash_bytes(const char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <unsigned char>p[i]
        h *= 0x100000001b3ULL
    return mix64(h)


cdef inline uint64_t next_rand(uint64_t *s) noexcept nogil:
    # xorshift64*: balancing needs spread, not secrecy
    cdef uint64_t x = s[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    s[0] = x
    return x * 0x2545F4914F6CDD1DULL


cdef int cookie_value(RequestHead h, bytes name, const char **out) noexcept:
    """Length of cookie `name`'s value in the request's Cookie lines (*out points at it),
    or -1 when absent. Cookie pairs are `name=value` separated by `;` and optional spaces."""
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef const char *cname = PyBytes_AS_STRING(name)
    cdef Py_ssize_t cn = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t i, a, e, s
    cdef const uint32_t *off
    for i in range(h.n_headers):
        off = h.offs + 4 * i
        if not header_name_is(raw, off, "cookie", 6):
            continue
        a = off[2]
        e = off[3]
        while a < e:
            while a < e and (raw[a] == b' ' or raw[a] == b';'):
                a += 1
            s = a
            while a < e and raw[a] != b';':
                a += 1
            # raw[s:a] is one pair
            if a - s > cn and raw[s + cn] == b'=' and memcmp(raw + s, cname, cn) == 0:
                out[0] = raw + s + cn + 1
                return <int>(a - s - cn - 1)
    return -1


cdef int _ring_cmp(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0]
    cdef uint64_t y = (<const uint64_t *>b)[0]
    return -1 if x < y else (1 if x > y else 0)


cdef class Service:
    """A named set of servers, the balancer that picks one, and what happens when they fail:
    health (active checks set ServerPool.healthy; outlier detection ejects), retries with a
    budget, a circuit breaker, and a concurrency limit with a queue. docs/services.md has the
    rules; they are all per worker process."""

    def __init__(self, str name, servers, weights=None):
        cdef int i
        cdef ServerPool p
        pools = tuple(servers)
        if not pools:
            raise ValueError("a service needs at least one server")
        if weights is None:
            weights = [1] * len(pools)
        self.name = name
        self.pools = pools
        self.n = len(pools)
        self.weights = <long *>PyMem_Malloc(self.n * sizeof(long))
        self.current = <long *>PyMem_Malloc(self.n * sizeof(long))
        self.scratch = <int *>PyMem_Malloc(self.n * sizeof(int))
        if self.weights == NULL or self.current == NULL or self.scratch == NULL:
            raise MemoryError()
        for i in range(self.n):
            p = <ServerPool>pools[i]
            p.weight = max(1, int(weights[i]))
            self.weights[i] = p.weight
            self.current[i] = 0
            p.sticky_id = hashlib.sha256(f"{name}\0{p.url}".encode()).hexdigest()[:16].encode()
        self.rng = int.from_bytes(os.urandom(8), "little") | 1
        self.balancer = BAL_ROUND_ROBIN
        self.retry_attempts = 0
        self.cb_err_ratio = -1.0
        self.cb_slow_ratio = -1.0
        self.queue = deque()
        # Counted on the overflow row until the compiler registers the service's own.
        self.shard = (<ServerPool>pools[0]).shard
        self.stats_row = 0

    def __dealloc__(self):
        PyMem_Free(self.weights)
        PyMem_Free(self.current)
        PyMem_Free(self.scratch)
        PyMem_Free(self.ring_hash)
        PyMem_Free(self.ring_pool)

    # ---- configuration (compile time) ------------------------------------------------------

    def set_balancer(self, str kind, str hash_on="client_ip", str name=None,
                     str cookie="fg_server", cookie_max_age=None):
        kinds = {"round_robin": BAL_ROUND_ROBIN, "least_request": BAL_LEAST_REQUEST,
                 "random": BAL_RANDOM, "hash": BAL_HASH, "sticky_cookie": BAL_STICKY}
        self.balancer = kinds[kind]
        if self.balancer == BAL_HASH:
            self.hash_on = {"client_ip": HASH_CLIENT_IP, "header": HASH_HEADER,
                            "cookie": HASH_COOKIE}[hash_on]
            if self.hash_on != HASH_CLIENT_IP:
                if not name:
                    raise ValueError(f"hash on {hash_on} needs a name")
                self.key_name = name.lower().encode() if self.hash_on == HASH_HEADER \
                    else name.encode()
            self.build_ring()
        elif self.balancer == BAL_STICKY:
            self.cookie_name = cookie.encode()
            attrs = "; Path=/; HttpOnly; SameSite=Lax"
            if cookie_max_age is not None:
                attrs += f"; Max-Age={int(cookie_max_age)}"
            self.cookie_attrs = attrs.encode()

    cdef void build_ring(self):
        # 160 points per unit of weight (ketama's count), at most 40,000 points in all.
        cdef int i, k, per, total = 0
        cdef ServerPool p
        cdef long wsum = 0
        for i in range(self.n):
            wsum += self.weights[i]
        per = max(1, min(160, <int>(40000 // max(wsum, 1))))
        for i in range(self.n):
            total += per * self.weights[i]
        self.ring_hash = <uint64_t *>PyMem_Malloc(total * 2 * sizeof(uint64_t))
        self.ring_pool = <int *>PyMem_Malloc(total * sizeof(int))
        if self.ring_hash == NULL or self.ring_pool == NULL:
            raise MemoryError()
        total = 0
        for i in range(self.n):
            p = <ServerPool>self.pools[i]
            for k in range(per * self.weights[i]):
                point = f"{p.url}#{k}".encode()
                self.ring_hash[2 * total] = hash_bytes(PyBytes_AS_STRING(point),
                                                       PyBytes_GET_SIZE(point))
                self.ring_hash[2 * total + 1] = <uint64_t>i
                total += 1
        qsort(self.ring_hash, total, 2 * sizeof(uint64_t), _ring_cmp)
        for k in range(total):
            self.ring_pool[k] = <int>self.ring_hash[2 * k + 1]
            self.ring_hash[k] = self.ring_hash[2 * k]
        self.ring_n = total

    def set_health(self, bint active_checks, bint panic):
        """`active_checks`: a health checker sets the servers' `healthy`; `panic`: when no
        server is usable, use them all rather than answer 503."""
        self.panic = panic
        self.guarded = self.guarded or active_checks

    def set_outlier_detection(self, int consecutive_errors, double base_ejection,
                              double max_ejection, int max_ejected_percent):
        self.od_on = True
        self.guarded = True
        self.od_consecutive = consecutive_errors
        self.od_base = base_ejection
        self.od_max = max(max_ejection, base_ejection)
        self.od_max_percent = max_ejected_percent

    def set_retries(self, int attempts, on=("connect_failure",), statuses=(),
                    double budget_percent=20.0, int min_per_second=3):
        names = {"connect_failure": RETRY_CONNECT, "reset": RETRY_RESET,
                 "timeout": RETRY_TIMEOUT}
        self.retry_attempts = attempts
        self.retry_on = 0
        for word in on:
            self.retry_on |= names[word]
        self.retry_statuses[0] = 0
        self.retry_statuses[1] = 0
        for status in statuses:
            if not 500 <= status <= 599:
                raise ValueError(f"retry status {status} is not 500..599")
            k = status - 500
            self.retry_statuses[k >> 6] |= (<uint64_t>1) << (k & 63)
            self.retry_on |= RETRY_STATUS
        self.budget_ratio = budget_percent / 100.0
        self.budget_min = min_per_second * WINDOW_BUCKETS

    def set_circuit_breaker(self, double window, int min_requests, error_ratio, slow_ratio,
                            double slow_threshold, double open_for, int half_open_requests):
        self.cb_on = True
        self.cb_bucket = window / WINDOW_BUCKETS
        self.cb_min = min_requests
        self.cb_err_ratio = -1.0 if error_ratio is None else error_ratio
        self.cb_slow_ratio = -1.0 if slow_ratio is None else slow_ratio
        self.cb_slow_ns = <long long>(slow_threshold * 1e9)
        self.cb_open_for = open_for
        self.cb_probes = half_open_requests

    def set_limits(self, int max_concurrent, int max_queue, double queue_timeout):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout

    def attach_stats(self, Shard shard, int row):
        self.shard = shard
        self.stats_row = row

    # ---- picking ---------------------------------------------------------------------------

    cdef bint usable(self, ServerPool p, double now, ServerPool avoid, bint any_state) noexcept:
        if p is avoid:
            return False
        return any_state or not self.guarded or (p.healthy and p.ejected_until <= now)

    cdef ServerPool pick(self, ConnCore conn, ServerPool avoid):
        """The server for this attempt (not `avoid`, the one a retry leaves, unless it is the
        only one left), or None: no usable server and no panic mode."""
        cdef double now
        cdef int i
        if self.n == 1 and not self.guarded:
            return <ServerPool>self.pools[0]
        now = conn.engine.now
        i = self.choose(conn, now, avoid, False)
        if i < 0 and avoid is not None:
            i = self.choose(conn, now, None, False)
        if i < 0 and self.panic:
            i = self.choose(conn, now, None, True)
        if i < 0:
            return None
        return <ServerPool>self.pools[i]

    cdef int choose(self, ConnCore conn, double now, ServerPool avoid, bint any_state):
        cdef int i, best = -1, m = 0, a, b
        cdef long total = 0
        cdef ServerPool p, q
        cdef const char *key = NULL
        cdef int klen = -1
        cdef uint64_t h
        cdef int lo, hi, mid, k
        cdef bytes ip
        kind = self.balancer
        if kind == BAL_STICKY:
            klen = cookie_value(conn.head, self.cookie_name, &key)
            if klen == 16:
                for i in range(self.n):
                    p = <ServerPool>self.pools[i]
                    if (memcmp(PyBytes_AS_STRING(p.sticky_id), key, 16) == 0
                            and self.usable(p, now, avoid, any_state)):
                        return i
            kind = BAL_ROUND_ROBIN
            best = self.choose_rr(now, avoid, any_state)
            if best >= 0:
                p = <ServerPool>self.pools[best]
                # The last pick's cookie (a retry replaces the first pick's), sent once.
                # Secure when the client came over TLS (it then never leaks to plain HTTP).
                conn.sticky_line = (b"Set-Cookie: " + self.cookie_name + b"=" + p.sticky_id
                                    + self.cookie_attrs
                                    + (b"; Secure\r\n" if conn.fwd.proto == b"https"
                                       else b"\r\n"))
            return best
        if kind == BAL_HASH:
            if self.hash_on == HASH_CLIENT_IP:
                if conn.fwd.trusted and conn.engine.client_resolver is not None:
                    ip = conn.engine.client_resolver(conn)
                else:
                    ip = conn.fwd.client_ip
                key = PyBytes_AS_STRING(ip)
                klen = <int>PyBytes_GET_SIZE(ip)
            elif self.hash_on == HASH_HEADER:
                i = conn.head.find(PyBytes_AS_STRING(self.key_name),
                                   PyBytes_GET_SIZE(self.key_name))
                if i >= 0:
                    key = PyBytes_AS_STRING(conn.head.raw) + conn.head.offs[4 * i + 2]
                    klen = conn.head.offs[4 * i + 3] - conn.head.offs[4 * i + 2]
            else:
                klen = cookie_value(conn.head, self.key_name, &key)
            if klen < 0:
                return self.choose_rr(now, avoid, any_state)   # no key: spread
            h = hash_bytes(key, klen)
            lo = 0
            hi = self.ring_n
            while lo < hi:
                mid = (lo + hi) >> 1
                if self.ring_hash[mid] < h:
                    lo = mid + 1
                else:
                    hi = mid
            for k in range(self.ring_n):
                i = self.ring_pool[(lo + k) % self.ring_n]
                if self.usable(<ServerPool>self.pools[i], now, avoid, any_state):
                    return i
            return -1
        if kind == BAL_RANDOM:
            for i in range(self.n):
                if self.usable(<ServerPool>self.pools[i], now, avoid, any_state):
                    total += self.weights[i]
            if total == 0:
                return -1
            total = <long>(next_rand(&self.rng) % <uint64_t>total)
            for i in range(self.n):
                if self.usable(<ServerPool>self.pools[i], now, avoid, any_state):
                    total -= self.weights[i]
                    if total < 0:
                        return i
            return -1
        if kind == BAL_LEAST_REQUEST:
            for i in range(self.n):
                if self.usable(<ServerPool>self.pools[i], now, avoid, any_state):
                    self.scratch[m] = i
                    m += 1
            if m <= 1:
                return self.scratch[0] if m == 1 else -1
            a = <int>(next_rand(&self.rng) % <uint64_t>m)
            b = <int>(next_rand(&self.rng) % <uint64_t>(m - 1))
            if b >= a:          # two distinct candidates
                b += 1
            a = self.scratch[a]
            b = self.scratch[b]
            p = <ServerPool>self.pools[a]
            q = <ServerPool>self.pools[b]
            # fewer requests in flight per unit of weight wins
            if q.active * self.weights[a] < p.active * self.weights[b]:
                return b
            return a
        return self.choose_rr(now, avoid, any_state)

    cdef int choose_rr(self, double now, ServerPool avoid, bint any_state) noexcept:
        # Smooth weighted round robin: weights 5,1,1 give a a b a c a a, not a a a a a b c.
        cdef int i, best = -1
        cdef long total = 0
        for i in range(self.n):
            if not self.usable(<ServerPool>self.pools[i], now, avoid, any_state):
                continue
            self.current[i] += self.weights[i]
            total += self.weights[i]
            if best < 0 or self.current[i] > self.current[best]:
                best = i
        if best >= 0:
            self.current[best] -= total
        return best

    # ---- outcomes --------------------------------------------------------------------------

    cdef int admit(self, double now):
        """Circuit breaker: 0 refuse (open), 1 pass, 2 pass as a half-open probe."""
        if self.cb_state == CB_OPEN:
            if now < self.cb_opened_at + self.cb_open_for:
                self.shard.add(K_SERVICE, self.stats_row, VW_CB_REJECTED, 1)
                return 0
            self.cb_state = CB_HALF_OPEN
            self.cb_probe_ok = 0
            self.cb_probe_inflight = 0
            _log.info("service %s: circuit half-open, probing", self.name)
        if self.cb_state == CB_HALF_OPEN:
            if self.cb_probe_inflight + self.cb_probe_ok < self.cb_probes:
                self.cb_probe_inflight += 1
                return 2
            self.shard.add(K_SERVICE, self.stats_row, VW_CB_REJECTED, 1)
            return 0
        return 1

    cdef void open_circuit(self, double now, str why):
        if self.cb_state == CB_CLOSED:
            self.shard.add(K_SERVICE, self.stats_row, VW_CB_OPEN, 1)
        self.cb_state = CB_OPEN
        self.cb_opened_at = now
        self.shard.add(K_SERVICE, self.stats_row, VW_CB_OPENED, 1)
        _log.warning("service %s: circuit open for %.3gs (%s)", self.name, self.cb_open_for, why)

    cdef void close_circuit(self):
        cdef int k
        self.cb_state = CB_CLOSED
        self.shard.add(K_SERVICE, self.stats_row, VW_CB_OPEN, <unsigned long long>-1)
        for k in range(WINDOW_BUCKETS):
            self.cb_epoch[k] = -1
        _log.info("service %s: circuit closed", self.name)

    cdef void record(self, ServerPool pool, int outcome, long long latency_ns, bint probe,
                     double now):
        cdef bint failed = outcome != OUT_OK
        cdef bint slow = latency_ns > self.cb_slow_ns if self.cb_slow_ratio >= 0 else False
        cdef long long epoch
        cdef int b, k, ejected = 0
        cdef unsigned long long total = 0, errs = 0, slows = 0
        cdef double back_off
        cdef ServerPool q
        if self.od_on:
            if not failed:
                pool.consecutive_errors = 0
                if pool.ejections and now > pool.ejected_until + self.od_max:
                    pool.ejections = 0      # healthy for a long while: back-off starts over
            else:
                pool.consecutive_errors += 1
                if pool.consecutive_errors >= self.od_consecutive and pool.ejected_until <= now:
                    for k in range(self.n):
                        q = <ServerPool>self.pools[k]
                        if q.ejected_until > now:
                            ejected += 1
                    if self.od_max_percent > 0 and (
                            ejected == 0 or (ejected + 1) * 100 <= self.od_max_percent * self.n):
                        pool.ejections += 1
                        back_off = min(self.od_base * pool.ejections, self.od_max)
                        pool.ejected_until = now + back_off
                        pool.consecutive_errors = 0
                        self.shard.add(K_SERVER, pool.stats_row, SW_EJECTIONS, 1)
                        _log.warning("service %s: server %s ejected for %.3gs after %d errors "
                                     "in a row", self.name, pool.url, back_off,
                                     self.od_consecutive)
        if not self.cb_on:
            return
        if probe:
            self.cb_probe_inflight -= 1
            if failed or slow:
                self.open_circuit(now, "a half-open probe failed")
            else:
                self.cb_probe_ok += 1
                if self.cb_probe_ok >= self.cb_probes and self.cb_state == CB_HALF_OPEN:
                    self.close_circuit()
            return
        if self.cb_state != CB_CLOSED:
            return
        epoch = <long long>(now / self.cb_bucket)
        b = epoch % WINDOW_BUCKETS
        if self.cb_epoch[b] != epoch:
            self.cb_epoch[b] = epoch
            self.cb_total[b] = 0
            self.cb_err[b] = 0
            self.cb_slow[b] = 0
        self.cb_total[b] += 1
        self.cb_err[b] += failed
        self.cb_slow[b] += slow
        if not (failed or slow):
            return
        for k in range(WINDOW_BUCKETS):
            if self.cb_epoch[k] > epoch - WINDOW_BUCKETS:
                total += self.cb_total[k]
                errs += self.cb_err[k]
                slows += self.cb_slow[k]
        if total < <unsigned long long>self.cb_min:
            return
        if self.cb_err_ratio >= 0 and errs >= self.cb_err_ratio * total:
            self.open_circuit(now, f"{errs} of {total} requests failed")
        elif self.cb_slow_ratio >= 0 and slows >= self.cb_slow_ratio * total:
            self.open_circuit(now, f"{slows} of {total} requests were slow")

    cdef void note_request(self, double now) noexcept:
        cdef long long sec = <long long>now
        cdef int b = sec % WINDOW_BUCKETS
        if self.win_sec[b] != sec:
            self.win_sec[b] = sec
            self.win_req[b] = 0
            self.win_retry[b] = 0
        self.win_req[b] += 1

    cdef bint budget_allows(self, double now):
        """A retry now keeps retries within budget_percent of the window's requests (or
        within the floor of min_per_second), so retries cannot multiply an outage."""
        cdef long long sec = <long long>now
        cdef int b, k
        cdef unsigned long long reqs = 0, retries = 0
        for k in range(WINDOW_BUCKETS):
            if self.win_sec[k] > sec - WINDOW_BUCKETS:
                reqs += self.win_req[k]
                retries += self.win_retry[k]
        if retries >= <unsigned long long>self.budget_min and retries >= self.budget_ratio * reqs:
            self.shard.add(K_SERVICE, self.stats_row, VW_BUDGET_EXHAUSTED, 1)
            return False
        b = sec % WINDOW_BUCKETS
        if self.win_sec[b] != sec:
            self.win_sec[b] = sec
            self.win_req[b] = 0
            self.win_retry[b] = 0
        self.win_retry[b] += 1
        self.shard.add(K_SERVICE, self.stats_row, VW_RETRIES, 1)
        return True

    cdef void release(self, ConnCore conn):
        """The exchange of `conn` is over: its slot, probe and queue place are given back,
        and the next queued request (if any) goes."""
        cdef ConnCore waiter
        if conn.queued:
            conn.queued = False
            try:
                self.queue.remove(conn)
            except ValueError:
                pass
        if conn.probe:
            conn.probe = False
            self.cb_probe_inflight -= 1
        if not conn.holds_slot:
            return
        conn.holds_slot = False
        self.inflight -= 1
        if self.waking:
            return
        self.waking = True
        try:
            while self.queue and self.inflight < self.max_concurrent:
                waiter = <ConnCore>self.queue.popleft()
                if not waiter.queued or waiter.rq != RQ_DISPATCH:
                    continue
                waiter.queued = False
                waiter.holds_slot = True
                self.inflight += 1
                waiter.set_read_pause(PAUSE_DISPATCH, False)
                waiter.begin_upstream()
        finally:
            self.waking = False

    def retire(self):
        """The config generation is retired: its open-circuit gauge is given back."""
        if self.cb_state != CB_CLOSED:
            self.cb_state = CB_CLOSED
            self.shard.add(K_SERVICE, self.stats_row, VW_CB_OPEN, <unsigned long long>-1)

    def state(self):
        """Balancer and resilience state, for tests and the admin listener."""
        return {
            "inflight": self.inflight,
            "queued": len(self.queue),
            "circuit": ("closed", "open", "half_open")[self.cb_state],
            "servers": {
                (<ServerPool>p).url: {
                    "healthy": (<ServerPool>p).healthy,
                    "ejected_until": (<ServerPool>p).ejected_until,
                    "active": (<ServerPool>p).active,
                } for p in self.pools
            },
        }


cdef class CoreCheck:
    """Base of the checks a route runs in C before its Python middleware chain."""

    cdef object check(self, ConnCore conn, RequestHead head):
        return None

    cdef void complete(self, ConnCore conn):
        pass


cdef class CredentialCache:
    """Verified credentials of one auth middleware, for the C fast path (see conn.pxd).

    Rules: a hit is an exact match of the whole header value (a dict compares the bytes), the
    header must appear exactly once, and the entry's deadline (the credential's expiry or the
    middleware's cache time, whichever is first) must not have passed at the request's
    arrival. Anything else is a miss and the Python middleware decides, as without the cache.
    The middleware puts entries only after a full verification and empties the cache whenever
    what it verified against changes (key rotation, a store change), so a hit never outlives
    the answer it stands for. Bounded: past `max_entries` the cache starts over."""

    def __init__(self, bytes header, Py_ssize_t max_entries=10000):
        if not header or header != header.lower():
            raise ValueError("header must be a non-empty lowercase name")
        self.header = header
        self.entries = {}
        self.max_entries = max_entries

    def put(self, bytes value, double ttl, identity, bytes lines):
        """Remember `value` (the header's whole value) as verified for `ttl` more seconds."""
        if ttl <= 0 or self.max_entries <= 0:
            return
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[value] = (monotonic_ns() + <long long>(ttl * 1e9), identity, lines or None)

    def discard(self, bytes value):
        self.entries.pop(value, None)

    def clear(self):
        self.entries.clear()

    def __len__(self):
        return len(self.entries)

    def find(self, RequestHead h, double later=0.0):
        """Python entry for tests: lookup() at now + `later` seconds."""
        return self.lookup(h, monotonic_ns() + <long long>(later * 1e9))

    cdef tuple lookup(self, RequestHead h, long long now_ns):
        cdef const char *raw = PyBytes_AS_STRING(h.raw)
        cdef const uint32_t *off
        cdef const uint32_t *found = NULL
        cdef Py_ssize_t i
        cdef object entry
        if not self.entries:
            return None
        for i in range(h.n_headers):
            off = h.offs + 4 * i
            if header_name_is(raw, off, PyBytes_AS_STRING(self.header),
                              PyBytes_GET_SIZE(self.header)):
                if found != NULL:
                    return None     # twice: let the middleware refuse it
                found = off
        if found == NULL:
            return None
        entry = self.entries.get(PyBytes_FromStringAndSize(raw + found[2], found[3] - found[2]))
        if entry is None or <long long>(<tuple>entry)[0] <= now_ns:
            return None
        self.hits += 1
        return <tuple>entry


cdef class Route:
    def __init__(self, str name, Service service, tuple chain=(), bytes extra_headers=None,
                 tuple checks=(), strip_headers=(), long long buffer_body=0,
                 bytes response_headers=None, response_strip=(), CredentialCache fast_auth=None,
                 timeouts=None, long long max_body=-1, strip_prefixes=(), bytes add_prefix=None,
                 compress=None):
        for c in checks:
            if not isinstance(c, CoreCheck):
                raise TypeError(f"route {name!r}: {c!r} is not a CoreCheck")
        self.name = name
        self.service = service
        self.checks = checks
        self.chain = chain
        self.extra_headers = extra_headers
        # Headers the route's middlewares own (identity headers, credentials): a client's copy
        # is never passed on. Lowercase bytes; None keeps the common case one pointer test.
        names = tuple(dict.fromkeys(n.lower() for n in strip_headers))
        for n in names:
            if not isinstance(n, bytes) or not n:
                raise TypeError(f"route {name!r}: strip_headers must be non-empty bytes")
        self.strip_headers = names or None
        # A middleware that must see the body (forward_auth's forward_body) asks for it to be
        # read whole, up to this many bytes, before the chain runs; 0 keeps bodies streamed.
        if buffer_body < 0:
            raise ValueError(f"route {name!r}: buffer_body must be >= 0")
        self.buffer_body = buffer_body
        # Response headers the route's middlewares own (HSTS, security headers): the
        # service's own copies are dropped and these lines sent instead.
        self.response_headers = response_headers or None
        names = tuple(dict.fromkeys(n.lower() for n in response_strip))
        for n in names:
            if not isinstance(n, bytes) or not n:
                raise TypeError(f"route {name!r}: response_strip must be non-empty bytes")
        self.response_strip = names or None
        # The first Python middleware's verified credentials, checked in C (CredentialCache).
        if fast_auth is not None and not chain:
            raise ValueError(f"route {name!r}: fast_auth stands for chain[0]; the chain is empty")
        self.fast_auth = fast_auth
        # Upstream timeouts: (connect, response, idle, total); absent = the first server's.
        if timeouts is None:
            p = <ServerPool>service.pools[0]
            timeouts = (p.connect_timeout, p.response_timeout, p.idle_body_timeout, 0.0)
        self.connect_timeout, self.response_timeout, self.idle_timeout, self.total_timeout = (
            timeouts)
        self.max_body = max_body
        # Path prefixes rewritten in C at forward time (strip_prefix / add_prefix middlewares).
        self.strip_prefixes = tuple(strip_prefixes) or None
        self.add_prefix = add_prefix or None
        self.compress = compress
        # Logged by default; the compiler sets the route's access_log sample and errors rule.
        self.log_sample = SAMPLE_ALL
        self.log_errors = True


cdef class UpstreamCore:
    """One connection to an upstream server; forwards its events to the attached client."""

    def __init__(self, Engine engine, ServerPool pool):
        self.engine = engine
        self.pool = pool
        self.pending = []

    def connection_made(self, transport):
        self.transport = transport
        self._write = transport.write
        self.connected = True
        self.engine.upstreams.add(self)
        if self.closing:
            transport.close()
            return
        for data in self.pending:
            self._write(data)
        self.pending = None
        if self.read_paused:
            transport.pause_reading()
        if self.client is not None:
            self.client.upstream_connected()

    def data_received(self, bytes data):
        if self.client is not None:
            self.client.on_upstream_data(data)
        else:
            # An idle upstream must not talk: whatever it says is not ours to relay.
            self.close()

    def eof_received(self):
        return False

    def __call__(self):
        # The protocol factory given to loop.create_connection is the instance itself.
        return self

    def _connect_done(self, fut):
        cdef ConnCore c
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is None:
            return
        self.closing = True
        self.pool.connect_errors += 1
        self.engine.shard.add(K_SERVER, self.pool.stats_row, SW_CONNECT_ERRORS, 1)
        if not self.connected:      # no connection_lost will come: the gauge's close
            self.engine.shard.add(K_SERVER, self.pool.stats_row, SW_CLOSED, 1)
        message = "upstream connect failed"
        if is_tls_failure(self.pool, exc):
            message = self.pool.tls_failed(exc, self.engine.now)
        c = self.client
        if c is not None and c.up is self:
            c.upstream_error(OUT_CONNECT, 502, message)

    def connection_lost(self, exc):
        cdef ConnCore c = self.client
        self.closing = True
        self.engine.upstreams.discard(self)
        self.engine.shard.add(K_SERVER, self.pool.stats_row, SW_CLOSED, 1)
        if c is not None and isinstance(exc, SSLError) and c.up is self:
            # Not a close: a TLS error ends no message and is never retried.
            if c.rs == RS_HEAD:
                c.observe(OUT_RESET)
            c.upstream_failed(502, self.pool.tls_failed(exc, self.engine.now))
        elif c is not None:
            c.on_upstream_lost(self)
        else:
            self.pool._forget(self)
        self.transport = None
        self._write = None

    def pause_writing(self):
        if self.client is not None:
            self.client.set_read_pause(PAUSE_UPSTREAM_FULL, True)

    def resume_writing(self):
        if self.client is not None:
            self.client.set_read_pause(PAUSE_UPSTREAM_FULL, False)

    cdef void send(self, bytes data):
        if self.connected:
            if not self.closing:
                self._write(data)
        else:
            self.pending.append(data)

    cdef void close(self):
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    cdef void pause_reading(self):
        if not self.read_paused:
            self.read_paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    cdef void resume_reading(self):
        if self.read_paused:
            self.read_paused = False
            if self.transport is not None and not self.closing:
                self.transport.resume_reading()




cdef class ConnCore:
    """The client side of the relay; the asyncio protocol methods are implemented here in C."""

    def __init__(self, Engine engine, EntryPoint ep):
        self.engine = engine
        self.ep = ep
        self.inbuf = bytearray()
        self.rq = RQ_HEAD
        self.rs = RS_NONE

    # ---- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport):
        cdef EntryConfig cfg = self.ep.cfg
        self.transport = transport
        self._write = transport.write
        self.cfg = cfg
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else "unknown"
        self.fwd = ForwardInfo(ip.encode(), cfg.proto, cfg.is_trusted(ip), cfg.forwarded_header)
        self.engine.conns.add(self)
        self.rec.ep_row = cfg.stats_entry
        self.engine.shard.add(K_ENTRY, self.rec.ep_row, EW_OPENED, 1)
        self.ep.open_connections += 1
        # Refresh the coarse clock: in an accept storm the ticker runs late, and a head
        # deadline set from a stale clock would fire before timeouts.head has really passed.
        self.engine.now = self.engine.loop.time()
        if cfg.max_connections and self.ep.open_connections > cfg.max_connections:
            # Over the entrypoint's limit: a short 503 and close, before reading anything.
            self.ep.refused += 1
            self.reply_error(503, "too many connections", True)
            return
        self.timer = T_HEAD
        self.deadline = self.engine.now + cfg.head_timeout
        if self.engine.draining:
            self.close_after = True

    def data_received(self, bytes data):
        cdef Py_ssize_t n, used
        if self.rq == RQ_TUNNEL:
            if self.up is not None:
                self.up.send(data)
            return
        if self.rq >= RQ_CLOSED:
            return
        if PyByteArray_GET_SIZE(self.inbuf) == 0:
            n = PyBytes_GET_SIZE(data)
            self.in_consume = True
            used = self.consume(data, PyBytes_AS_STRING(data), n)
            self.in_consume = False
            if used < n and self.rq < RQ_CLOSED:
                self.inbuf += data[used:]
                self.hold_check()
        else:
            self.inbuf += data
            self.drain_inbuf()

    def eof_received(self):
        # A half-closed client may still read its response (RFC 9112 §9.6): keep the
        # transport open while an exchange is in flight, close once it is done.
        if self.rq == RQ_LINGER:
            return False
        if self.rq == RQ_TUNNEL:
            # Pass the half-close through the tunnel; it ends when the upstream closes (its
            # connection_lost closes us). Without this both sides would wait forever.
            if self.up is not None and self.up.transport is not None and not self.up.closing:
                self.up.transport.write_eof()
                return True
            return False
        if self.rq == RQ_BODY or self.rq == RQ_BUFFER:
            self.abort()          # the body can never complete
            return False
        if self.rs != RS_NONE or self.rq == RQ_DISPATCH:
            # Requests already received (pipelined behind this one) are still answered;
            # finish_exchange closes once none is left.
            self.eof = True
            if PyByteArray_GET_SIZE(self.inbuf) == 0:
                self.close_after = True
            return True
        return False

    def connection_lost(self, exc):
        if self.rec.active:
            self.end_exchange()    # cut short (abort, tunnel end, client gone)
        self.engine.shard.add(K_ENTRY, self.rec.ep_row, EW_CLOSED, 1)
        self.ep.open_connections -= 1
        if self.done_hooks is not None:
            self.run_done_hooks()
        self.rq = RQ_CLOSED
        self.timer = T_NONE
        self.engine.conns.discard(self)
        self.detach_up(False)
        self.transport = None
        self._write = None

    def pause_writing(self):
        self.write_paused = True
        if self.up is not None:
            self.up.pause_reading()
        if self.timer != T_SEND:
            self.timer = T_SEND
            self.deadline = self.engine.now + self.cfg.idle_timeout

    def resume_writing(self):
        self.write_paused = False
        if self.up is not None:
            self.up.resume_reading()
        if self.timer == T_SEND:
            if self.up is not None:
                self.arm_upstream(self.route.idle_timeout)
            else:
                self.timer = T_IDLE
                self.deadline = self.engine.now + self.cfg.idle_timeout

    # ---- client input ----------------------------------------------------------------------

    cdef void hold_check(self):
        if PyByteArray_GET_SIZE(self.inbuf) > self.cfg.max_held and self.rq != RQ_HEAD:
            self.set_read_pause(PAUSE_PIPELINE, True)

    cdef void drain_inbuf(self):
        cdef Py_ssize_t used
        if self.in_consume or self.rq >= RQ_CLOSED:
            return
        self.in_consume = True
        used = self.consume(self.inbuf, PyByteArray_AS_STRING(self.inbuf),
                            PyByteArray_GET_SIZE(self.inbuf))
        self.in_consume = False
        if self.rq >= RQ_CLOSED:
            return
        if used:
            del self.inbuf[:used]
        self.hold_check()

    cdef Py_ssize_t consume(self, object src, const char *p, Py_ssize_t n):
        """Consume client bytes p[0:n] (owned by src); returns how many were used."""
        cdef Py_ssize_t pos = 0, end, k
        cdef bytes raw
        while pos < n:
            if self.rq == RQ_HEAD:
                # RFC 9112 §2.2: ignore empty lines before a request line.
                while self.scan_pos == 0 and pos + 1 < n and p[pos] == 13 and p[pos + 1] == 10:
                    pos += 2
                if pos >= n:
                    break
                end = find_head_end(p + pos, n - pos, self.scan_pos)
                if end == 0:
                    if n - pos > self.cfg.limits.max_head_bytes:
                        self.reply_error(431, "request head too large", True)
                        return n
                    self.scan_pos = n - pos
                    if self.timer == T_IDLE:
                        self.timer = T_HEAD
                        self.deadline = self.engine.now + self.cfg.head_timeout
                    break
                if end < 0:
                    self.reply_error(400, "malformed request head", True)
                    return n
                if pos == 0 and end == n and type(src) is bytes:
                    raw = <bytes>src
                else:
                    raw = PyBytes_FromStringAndSize(p + pos, end)
                pos += end
                self.scan_pos = 0
                if not self.on_head(raw):
                    return n
            elif self.rq == RQ_BODY:
                k = self.forward_body(src, p + pos, n - pos)
                if k < 0:
                    return n
                pos += k
            elif self.rq == RQ_BUFFER:
                k = self.buffer_more(p + pos, n - pos)
                if k < 0:
                    return n
                pos += k
                if self.rq == RQ_BUFFER:
                    break  # all of p used, the body goes on
                if not self.run_chain():
                    return n
            else:
                # RQ_DISPATCH / RQ_SENT: hold the pipelined bytes until the response is done.
                break
        return pos

    cdef bint on_head(self, bytes raw):
        """A complete request head: parse, route, hand off. False when the connection is
        finished with (an error reply went out and the connection closes)."""
        cdef RequestHead h = RequestHead.__new__(RequestHead)
        cdef EntryConfig cfg = self.ep.cfg
        cdef int rc
        cdef object route
        cdef bytes host, rid
        self.cfg = cfg
        self.engine.requests += 1
        self.begin_exchange()
        self.trace.state = TRACE_NONE
        rc = parse_request_head(h, raw, cfg.limits)
        if rc != 0:
            self.reply_error(-rc, (<bytes>last_error_reason).decode("latin-1"), True)
            return False
        self.head = h
        self.rec.method = method_class(h.method)
        self.up_extra = None
        self.request_body = None
        self.body_read = False
        rid = (client_request_id(h) if trust_allows(cfg.trust_request_id, self.fwd.trusted)
               else None)
        trace_begin(&self.trace, h, trust_allows(cfg.trust_trace, self.fwd.trusted),
                    cfg.trace_sampled)
        if rid is None:
            self.request_id = self.engine.next_request_id()
            self.id_from_client = False
        else:
            self.request_id = rid
            self.id_from_client = True
        host = h.host
        if host is None:
            route = cfg.router.match_c(NULL, 0, PyBytes_AS_STRING(h.path),
                                       PyBytes_GET_SIZE(h.path), h.method)
        else:
            route = cfg.router.match_c(PyBytes_AS_STRING(host), PyBytes_GET_SIZE(host),
                                       PyBytes_AS_STRING(h.path), PyBytes_GET_SIZE(h.path),
                                       h.method)
        if route is None:
            self.reply_error(404, "no route", h.framing != FRAMING_NONE)
            return self.rq < RQ_CLOSED
        self.max_body = (<Route>route).max_body
        if self.max_body < 0:
            self.max_body = cfg.max_body
        if self.max_body and h.framing == FRAMING_LENGTH and h.content_length > self.max_body:
            self.reply_error(413, "request body too large", True)
            return False
        self.route = <Route>route
        h.route = route
        self.resp_extra = None
        self.sticky_line = None
        self.up_target = None
        self.enc = None
        self.tried = None
        self.attempts = 0
        self.rec.route_row = self.route.stats_local
        self.rec.rate_row = self.route.stats_rate
        self.rq = RQ_DISPATCH
        self.rs = RS_HEAD
        self.resp_started = False
        self.retried = False
        self.req_seen = 0
        for check in self.route.checks:
            verdict = (<CoreCheck>check).check(self, h)
            if verdict is not None:
                self.send_local(verdict)
                return self.rq < RQ_CLOSED
        if self.route.buffer_body and h.framing != FRAMING_NONE:
            return self.start_buffer()
        return self.run_chain()

    cdef bint run_chain(self):
        """Run the route's middleware chain (if any), then forward: the request head is
        parsed and routed, and its body is either still to come or buffered whole. A hit in
        the route's CredentialCache stands for chain[0] (the auth middleware): its identity
        and header lines are taken here and the chain starts after it."""
        cdef tuple entry
        cdef int start = 0
        cdef Route route = self.route
        self.fast_identity = None
        if route.fast_auth is not None:
            entry = route.fast_auth.lookup(self.head, self.rec.t_head_ns)
            if entry is not None:
                self.fast_identity = entry[1]
                if entry[2] is not None:
                    self.up_extra = (<bytes>entry[2] if self.up_extra is None
                                     else self.up_extra + <bytes>entry[2])
                start = 1
        self.chain_start = start
        if PyTuple_GET_SIZE(route.chain) > start:
            verdict = self.engine.dispatch(self, self.head)
            if verdict is not None:
                return self.dispatch_verdict(verdict)
        self.forward()
        return self.rq < RQ_CLOSED

    cdef bint start_buffer(self):
        """Read the body into memory before the chain (up to route.buffer_body bytes)."""
        cdef RequestHead h = self.head
        if h.framing == FRAMING_LENGTH and h.content_length > self.route.buffer_body:
            self.reply_error(413, "request body too large", True)
            return False
        self.rq = RQ_BUFFER
        self.body_buf = bytearray()
        if h.framing == FRAMING_LENGTH:
            self.req_remaining = h.content_length
        elif self.body_scan is None:
            self.body_scan = ChunkedScanner(True)
        else:
            self.body_scan.reset()
        if h.expect_continue:
            # The client waits for this before it sends the body we are about to read; the
            # upstream's own 100 later is an interim response the client may also see.
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.timer = T_BODY
        self.start_body_window()
        return True

    cdef Py_ssize_t buffer_more(self, const char *p, Py_ssize_t n):
        """Append body bytes to the buffer; -1 after an error reply. Leaves RQ_BUFFER (for
        RQ_DISPATCH) when the body is complete."""
        cdef Py_ssize_t k
        cdef bint done
        if self.head.framing == FRAMING_LENGTH:
            k = n if n <= self.req_remaining else <Py_ssize_t>self.req_remaining
            self.req_remaining -= k
            done = self.req_remaining == 0
        else:
            k = self.body_scan.scan(p, n)
            if k < 0:
                self.reply_error(400, "bad chunked framing", True)
                return -1
            done = self.body_scan.done
        self.body_buf += PyBytes_FromStringAndSize(p, k)
        self.rec.req_bytes += k
        # Chunked: bound the bytes on the wire as they come (framing may double tiny chunks),
        # then the decoded size once whole.
        if (self.head.framing == FRAMING_CHUNKED
                and PyByteArray_GET_SIZE(self.body_buf) > 2 * self.route.buffer_body + 65536):
            self.reply_error(413, "request body too large", True)
            return -1
        if done:
            if self.head.framing == FRAMING_LENGTH:
                self.request_body = bytes(self.body_buf)
            else:
                self.request_body = self.body_scan.payload
                if PyBytes_GET_SIZE(self.request_body) > self.route.buffer_body:
                    self.reply_error(413, "request body too large", True)
                    return -1
            self.rq = RQ_DISPATCH
            self.timer = T_NONE
            self.body_read = True
        elif self.timer == T_BODY:
            self.rearm_body()
        return k

    cdef bint dispatch_verdict(self, object verdict):
        # An awaitable: stop reading until it resolves. Anything else is a LocalReply.
        if hasattr(verdict, "__await__"):
            self.set_read_pause(PAUSE_DISPATCH, True)
            fut = asyncio.ensure_future(verdict)
            fut.add_done_callback(self._dispatch_done)
            return True
        self.send_local(verdict)
        return self.rq < RQ_CLOSED

    def _dispatch_done(self, fut):
        if self.rq >= RQ_CLOSED:
            return
        self.set_read_pause(PAUSE_DISPATCH, False)
        try:
            verdict = fut.result()
        except Exception:
            self.reply_error(500, "middleware error", True)
            return
        if verdict is not None:
            self.send_local(verdict)
        else:
            self.forward()
            self.drain_inbuf()

    cdef void send_local(self, object reply):
        """Answer with a middleware's LocalReply: `reply.encode(request_id, close)` bytes."""
        cdef bint unread = self.head.framing != FRAMING_NONE and not self.body_read
        cdef bint close = unread or not self.head.keep_alive or self.close_after
        self.rs = RS_NONE
        self.rec.status = getattr(reply, "status", 0)
        self.engine.responses += 1
        self.body_buf = None
        # The request body was not read: linger on close, as after an error reply.
        self.linger = unread
        out = reply.encode(self.request_id, close, self.head.method == b"HEAD",
                           trace_value(&self.trace))
        self.rec.resp_bytes += len(out)
        self._write(out)
        self.finish_exchange(close)

    cdef UpstreamCore connect(self, ServerPool pool):
        """A new upstream connection; client reading pauses until it is made."""
        cdef UpstreamCore up = UpstreamProtocol(self.engine, pool)
        pool.active += 1
        pool.connects += 1
        self.engine.shard.add(K_SERVER, pool.stats_row, SW_OPENED, 1)
        if pool.ssl is None:
            coro = self.engine.loop.create_connection(up, pool.host, pool.port)
        else:
            coro = self.engine.loop.create_connection(
                up, pool.host, pool.port, ssl=pool.ssl, server_hostname=pool.server_hostname,
                ssl_handshake_timeout=pool.connect_timeout)
        fut = asyncio.ensure_future(coro)
        fut.add_done_callback(up._connect_done)
        self.set_read_pause(PAUSE_UPSTREAM_FULL, True)
        self.arm_upstream(self.route.connect_timeout)
        return up

    def upstream_connected(self):
        self.set_read_pause(PAUSE_UPSTREAM_FULL, False)
        if self.rq == RQ_BODY:
            self.timer = T_BODY
            self.start_body_window()
        elif self.up is not None:
            self.arm_upstream(self.route.response_timeout)

    cdef void forward(self):
        """The chain passed: admission (circuit breaker, concurrency limit and queue), then
        the first attempt."""
        cdef Service svc = self.route.service
        cdef int verdict
        if svc.cb_on:
            verdict = svc.admit(self.engine.now)
            if verdict == 0:
                self.reply_error(503, "circuit open", self.head.framing != FRAMING_NONE)
                return
            self.probe = verdict == 2
        if svc.max_concurrent:
            if svc.inflight >= svc.max_concurrent:
                if len(svc.queue) < svc.max_queue:
                    # Wait for a slot (Service.release), reading nothing meanwhile.
                    self.queued = True
                    svc.queue.append(self)
                    svc.shard.add(K_SERVICE, svc.stats_row, VW_QUEUED, 1)
                    self.set_read_pause(PAUSE_DISPATCH, True)
                    self.timer = T_QUEUE
                    self.deadline = self.engine.now + svc.queue_timeout
                    return
                svc.shard.add(K_SERVICE, svc.stats_row, VW_REJECTED, 1)
                self.reply_error(503, "service at capacity", self.head.framing != FRAMING_NONE)
                return
            svc.inflight += 1
            self.holds_slot = True
        self.begin_upstream()

    cdef void begin_upstream(self):
        """Pick a server, build the upstream head, send it, and start the body."""
        cdef RequestHead h = self.head
        cdef Route route = self.route
        cdef Service svc = route.service
        cdef ServerPool pool
        cdef bytes extra, prefix = None
        self.total_deadline = (self.engine.now + route.total_timeout
                               if route.total_timeout > 0 else 0.0)
        if svc.retry_attempts:
            svc.note_request(self.engine.now)
        pool = svc.pick(self, None)
        if pool is None:
            svc.shard.add(K_SERVICE, svc.stats_row, VW_NO_SERVER, 1)
            self.reply_error(503, "no healthy server", h.framing != FRAMING_NONE)
            return
        extra = route.extra_headers
        if self.up_extra is not None:
            extra = self.up_extra if extra is None else extra + self.up_extra
        if self.up_target is None and (route.strip_prefixes is not None
                                       or route.add_prefix is not None):
            self.up_target, prefix = rewrite_prefix(route, h)
            if prefix is not None:
                line = b"X-Forwarded-Prefix: " + prefix + b"\r\n"
                extra = line if extra is None else extra + line
        self.up_head = build_request_head(h, self.fwd, self.request_id, self.id_from_client,
                                          extra, route.strip_headers, &self.trace,
                                          self.up_target)
        self.rec.route_row = route.stats_row
        self.rec.t_up_start_ns = monotonic_ns()
        self.attach(pool, None)
        self.up.send(self.up_head)
        self.req_framing = h.framing
        if h.framing == FRAMING_LENGTH and h.content_length > 0:
            self.rq = RQ_BODY
            self.req_remaining = h.content_length
        elif h.framing == FRAMING_CHUNKED:
            self.rq = RQ_BODY
            if self.req_chunks is None:
                self.req_chunks = ChunkedScanner()
            else:
                self.req_chunks.reset()
        else:
            self.request_sent()
            return
        if self.up.connected:
            self.timer = T_BODY
            self.start_body_window()
        if self.body_buf is not None:
            # The body was read before the chain ran: send it as it came (same framing).
            buffered = bytes(self.body_buf)
            self.body_buf = None
            self.forward_body(buffered, PyBytes_AS_STRING(buffered), PyBytes_GET_SIZE(buffered))

    cdef void attach(self, ServerPool pool, list pending):
        """Lend this exchange a connection to `pool` (pooled, or a new one) and send it the
        bytes of an earlier attempt that never connected (`pending`)."""
        cdef UpstreamCore up = pool.acquire()
        if up is None:
            up = self.connect(pool)
        up.client = self
        self.up = up
        self.tried = pool
        self.observed = False
        self.rec.server_row = pool.stats_row
        self.log_pool = pool
        if pending is not None:
            for data in pending:
                up.send(data)
            if up.connected and self.rq == RQ_SENT:
                self.arm_upstream(self.route.response_timeout)
            elif up.connected and self.rq == RQ_BODY:
                self.timer = T_BODY
                self.deadline = self.engine.now + self.cfg.body_timeout

    cdef void start_body_window(self):
        """The request body starts (or resumes after the gateway itself stopped reading):
        guard it with timeouts.body from now, and measure its rate from now."""
        self.body_t0 = self.engine.now
        self.body_seen0 = self.rec.req_bytes
        self.deadline = self.engine.now + self.cfg.body_timeout

    cdef void rearm_body(self):
        """Body bytes arrived: move the body deadline, unless the body is slower than
        limits.min_body_rate once it has run longer than timeouts.body (a trickle that keeps
        each gap short would otherwise hold the connection for as long as it likes): then the
        deadline stays and 408 comes when it passes."""
        cdef double now = self.engine.now
        cdef double elapsed = now - self.body_t0
        cdef EntryConfig cfg = self.cfg
        if (cfg.min_body_rate > 0 and elapsed > cfg.body_timeout
                and self.rec.req_bytes - self.body_seen0 < cfg.min_body_rate * elapsed):
            return
        self.deadline = now + cfg.body_timeout

    cdef void arm_upstream(self, double seconds):
        """Guard the upstream for `seconds`, never past the route's total deadline."""
        cdef double d = self.engine.now + seconds
        if self.total_deadline and self.total_deadline < d:
            d = self.total_deadline
        self.timer = T_UPSTREAM
        self.deadline = d

    cdef void observe(self, int outcome):
        """Tell the service how this attempt went (outlier detection, circuit breaker), once."""
        cdef Service svc
        cdef bint probe
        if self.observed or self.tried is None:
            return
        self.observed = True
        svc = self.route.service
        if not (svc.od_on or svc.cb_on):
            return
        probe = self.probe
        self.probe = False
        svc.record(self.tried, outcome, monotonic_ns() - self.rec.t_up_start_ns, probe,
                   self.engine.now)

    cdef bint retry(self, int outcome):
        """Try another server after `outcome`, when that is safe and allowed: True when a new
        attempt is under way. A connect failure sent nothing, so its bytes (held while
        connecting) go to the next server whatever the method; anything else is retried only
        for an idempotent method whose request had no body and before any of the response
        reached the client: a POST is never sent twice."""
        cdef Service svc = self.route.service
        cdef UpstreamCore old = self.up
        cdef list pending = None
        cdef ServerPool pool
        if (self.attempts >= svc.retry_attempts or self.resp_started or self.rq >= RQ_CLOSED
                or old is None or self.tried is None):
            return False
        if outcome == OUT_CONNECT:
            if not (svc.retry_on & RETRY_CONNECT) or old.connected or old.pending is None:
                return False
            pending = old.pending
        else:
            if outcome == OUT_RESET and not (svc.retry_on & RETRY_RESET):
                return False
            if outcome == OUT_TIMEOUT and not (svc.retry_on & RETRY_TIMEOUT):
                return False
            if outcome == OUT_5XX and not (svc.retry_on & RETRY_STATUS):
                return False
            if (self.rq != RQ_SENT or self.req_framing != FRAMING_NONE
                    or not method_idempotent(self.head.method)):
                return False
            pending = [self.up_head]
        if self.total_deadline and self.engine.now >= self.total_deadline:
            return False
        if not svc.budget_allows(self.engine.now):
            return False
        self.attempts += 1
        old.pending = []            # those bytes go to the next server, not this one
        self.detach_up(False)
        if self.upbuf is not None:
            del self.upbuf[:]
        self.up_scan = 0
        pool = svc.pick(self, self.tried)
        if pool is None:
            return False
        self.shard_retry(pool)
        self.attach(pool, pending)
        return True

    cdef void shard_retry(self, ServerPool pool):
        self.engine.shard.add(K_SERVER, pool.stats_row, SW_RETRIES, 1)

    cdef void upstream_error(self, int outcome, int status, str message):
        """An attempt failed before its response started: record it, retry if allowed,
        else answer `status`."""
        self.observe(outcome)
        if self.retry(outcome):
            return
        self.upstream_failed(status, message)

    cdef Py_ssize_t forward_body(self, object src, const char *p, Py_ssize_t n):
        """Send request body bytes upstream; returns bytes used, -1 when the request failed."""
        cdef Py_ssize_t k
        cdef bint done
        if self.req_framing == FRAMING_LENGTH:
            k = n if n <= self.req_remaining else <Py_ssize_t>self.req_remaining
            self.req_remaining -= k
            done = self.req_remaining == 0
        else:
            k = self.req_chunks.scan(p, n)
            if k < 0:
                self.upstream_failed(400, "bad chunked framing")
                return -1
            done = self.req_chunks.done
            self.req_seen += k
            if self.max_body and self.req_seen > self.max_body:
                # Counted on the wire (chunk framing included): a bound, not an exact size.
                self.upstream_failed(413, "request body too large")
                return -1
        if not self.body_read:     # a buffered body was counted as it was read
            self.rec.req_bytes += k
        if k == n and type(src) is bytes and p == PyBytes_AS_STRING(src):
            self.up.send(<bytes>src)
        elif k:
            self.up.send(PyBytes_FromStringAndSize(p, k))
        if done:
            self.request_sent()
        elif self.timer == T_BODY:
            self.rearm_body()
        return k

    cdef void request_sent(self):
        self.rq = RQ_SENT
        if self.rs == RS_NONE:
            # The response already ended (the upstream answered before the body finished).
            self.finish_exchange(True)
            return
        if self.up is not None and self.up.connected and self.rs == RS_HEAD:
            self.arm_upstream(self.route.response_timeout)

    # ---- upstream events -------------------------------------------------------------------

    cdef void on_upstream_data(self, bytes data):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const char *p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t pos = 0, end, tail
        cdef ResponseHead rh = None
        cdef int rc
        cdef bint close, upgrade, done
        cdef bytes out, raw

        if self.rs == RS_BODY:
            self.relay_body(data, p, n)
            return
        if self.rs == RS_TUNNEL:
            self.rec.resp_bytes += n
            self._write(data)
            return
        if self.rs != RS_HEAD:
            return
        if self.upbuf is not None and PyByteArray_GET_SIZE(self.upbuf) > 0:
            self.upbuf += data
            data = bytes(self.upbuf)
            del self.upbuf[:]
            p = PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        while True:
            end = find_head_end(p + pos, n - pos, self.up_scan)
            if end == 0:
                if n - pos > MAX_RESPONSE_HEAD:
                    self.upstream_failed(502, "upstream response head too large")
                    return
                self.up_scan = n - pos
                if self.upbuf is None:
                    self.upbuf = bytearray()
                self.upbuf += data[pos:]
                return
            if end < 0:
                self.upstream_failed(502, "malformed upstream response")
                return
            self.up_scan = 0
            if pos == 0 and end == n:
                raw = data
            else:
                raw = PyBytes_FromStringAndSize(p + pos, end)
            pos += end
            rh = ResponseHead.__new__(ResponseHead)
            rc = parse_response_head(rh, raw, self.head.method == b"HEAD")
            if rc != 0:
                self.upstream_failed(502, "malformed upstream response")
                return
            if rh.status >= 200 or rh.status == 101:
                break
            # Interim response (100 Continue, 103 Early Hints): forwarded as is.
            self.rec.resp_bytes += PyBytes_GET_SIZE(raw)
            self._write(raw)
            if pos == n:
                return

        if rh.status >= 500:
            self.observe(OUT_5XX)
            svc = self.route.service
            if ((<Service>svc).retry_on & RETRY_STATUS and rh.status <= 599
                    and ((<Service>svc).retry_statuses[(rh.status - 500) >> 6]
                         >> ((rh.status - 500) & 63)) & 1
                    and self.retry(OUT_5XX)):
                return
        else:
            self.observe(OUT_OK)
        upgrade = rh.status == 101
        if upgrade and self.head.upgrade is None:
            self.upstream_failed(502, "unexpected 101 from upstream")
            return
        close = (not self.head.keep_alive or self.close_after or rh.framing == FRAMING_CLOSE
                 or self.rq != RQ_SENT or self.engine.draining)
        if close:
            self.close_after = True
        self.resp = rh
        self.rec.status = rh.status
        self.resp_started = True
        self.resp_framing = rh.framing
        if upgrade:
            self._write(build_response_head(rh, False, False, True, NULL, 0, None, None,
                                            self.request_id, &self.trace))
            self.rec.resp_bytes += PyBytes_GET_SIZE(raw)    # about the head we sent
            self.rq = RQ_TUNNEL
            self.rs = RS_TUNNEL
            self.timer = T_NONE
            if pos < n:
                self._write(PyBytes_FromStringAndSize(p + pos, n - pos))
            if PyByteArray_GET_SIZE(self.inbuf):
                self.up.send(bytes(self.inbuf))
                del self.inbuf[:]
            self.set_read_pause(PAUSE_PIPELINE, False)
            return

        # The start of the body that came with the head leaves in the same write.
        tail = 0
        done = False
        if rh.framing == FRAMING_LENGTH:
            tail = n - pos if n - pos <= rh.content_length else <Py_ssize_t>rh.content_length
            self.resp_remaining = rh.content_length - tail
            done = self.resp_remaining == 0
        elif rh.framing == FRAMING_CHUNKED:
            if self.resp_chunks is None:
                self.resp_chunks = ChunkedScanner()
            else:
                self.resp_chunks.reset()
            tail = self.resp_chunks.scan(p + pos, n - pos)
            if tail < 0:
                # Nothing has gone to the client yet: it gets a clean 502, not a cut connection.
                self.resp_started = False
                self.upstream_failed(502, "bad chunked framing from upstream")
                return
            done = self.resp_chunks.done
        elif rh.framing == FRAMING_CLOSE:
            tail = n - pos
        else:
            done = True
        resp_lines = self.route.response_headers
        if self.resp_extra is not None:
            resp_lines = self.resp_extra if resp_lines is None else resp_lines + self.resp_extra
        if self.sticky_line is not None:
            resp_lines = (self.sticky_line if resp_lines is None
                          else resp_lines + self.sticky_line)
        if self.route.compress is not None:
            self.enc = negotiate(<CompressRule>self.route.compress, self.head, rh)
            if self.enc is not None:
                self.send_compressed_head(rh, close, resp_lines, p + pos, tail)
                if self.enc is None:        # bad framing: a 502 went out instead
                    return
                pos += tail
                if done:
                    if pos < n:
                        self.up.closing = True
                    self.response_done()
                    return
                self.rs = RS_BODY
                self.arm_upstream(self.route.idle_timeout)
                return
        if tail <= TAIL_COPY_MAX:
            out = build_response_head(rh, close, self.head.version == 10 and not close, False,
                                      p + pos, tail, resp_lines,
                                      self.route.response_strip, self.request_id, &self.trace)
            self.rec.resp_bytes += PyBytes_GET_SIZE(out)
            self._write(out)
        else:
            self._write(build_response_head(rh, close, self.head.version == 10 and not close,
                                            False, NULL, 0, resp_lines,
                                            self.route.response_strip, self.request_id,
                                            &self.trace))
            self._write(PyBytes_FromStringAndSize(p + pos, tail))
            self.rec.resp_bytes += tail + PyBytes_GET_SIZE(raw)     # about the head we sent
        pos += tail
        if done:
            if pos < n:
                self.up.closing = True      # bytes beyond the framing: not reusable
            self.response_done()
            return
        self.rs = RS_BODY
        self.arm_upstream(self.route.idle_timeout)

    cdef void send_compressed_head(self, ResponseHead rh, bint close, bytes lines,
                                   const char *tail, Py_ssize_t n):
        """The head of a response the route's compress rule encodes (self.enc): chunked, its
        Content-Encoding and Vary lines, no Content-Length or Accept-Ranges, and a strong
        ETag made weak (the bytes differ from the service's representation); then the
        encoded start of the body."""
        cdef Encoder enc = <Encoder>self.enc
        cdef tuple strip = COMPRESS_STRIP
        etag = rh.get(b"etag")
        extra = enc.head_lines
        if etag is not None and not etag.startswith(b"W/"):
            extra += b"ETag: W/" + etag + b"\r\n"
        if self.route.response_strip is not None:
            strip = strip + self.route.response_strip
        if lines is not None:
            extra += lines
        body = enc.feed(tail, n)
        if body is None:
            self.enc = None
            self.resp_started = False
            self.upstream_failed(502, "bad chunked framing from upstream")
            return
        out = build_response_head(rh, close, False, False, NULL, 0, extra, strip,
                                  self.request_id, &self.trace, True)
        self.rec.resp_bytes += PyBytes_GET_SIZE(out) + PyBytes_GET_SIZE(body)
        self._write(out + body if body else out)

    cdef void relay_body(self, object src, const char *p, Py_ssize_t n):
        """Write response body bytes to the client; finish the exchange at its end."""
        cdef Py_ssize_t k
        cdef bint done = False
        if self.resp_framing == FRAMING_LENGTH:
            k = n if n <= self.resp_remaining else <Py_ssize_t>self.resp_remaining
            self.resp_remaining -= k
            done = self.resp_remaining == 0
        elif self.resp_framing == FRAMING_CHUNKED:
            k = self.resp_chunks.scan(p, n)
            if k < 0:
                self.upstream_failed(502, "bad chunked framing from upstream")
                return
            done = self.resp_chunks.done
        else:
            k = n
        if self.enc is not None:
            out = (<Encoder>self.enc).feed(p, k)
            if out is None:
                self.abort()            # the client sees a cut body, never a short whole one
                return
            if out:
                self.rec.resp_bytes += PyBytes_GET_SIZE(out)
                self._write(out)
        elif k == n:
            self.rec.resp_bytes += k
            self._write(src)
        elif k:
            self.rec.resp_bytes += k
            self._write(PyBytes_FromStringAndSize(p, k))
        if done:
            if k < n:
                self.up.closing = True      # bytes beyond the framing: not reusable
            self.response_done()
        elif self.timer == T_UPSTREAM:
            self.arm_upstream(self.route.idle_timeout)

    def on_upstream_lost(self, UpstreamCore up):
        if up is not self.up:
            return
        if self.rs == RS_TUNNEL:
            self.detach_up(False)
            self.rq = RQ_CLOSED
            if self.transport is not None:
                self.transport.close()
            return
        if self.rs == RS_BODY and self.resp_framing == FRAMING_CLOSE:
            self.response_done()
            return
        if (self.rs == RS_HEAD and up.reused and not self.retried and self.rq == RQ_SENT
                and self.req_framing == FRAMING_NONE and method_idempotent(self.head.method)
                and (self.upbuf is None or PyByteArray_GET_SIZE(self.upbuf) == 0)):
            # Keep-alive race (RFC 9112 §9.3.1): the server closed an idle connection as we
            # reused it. A body-less idempotent request is safe to send again, once, on a new
            # connection (a POST never: the server may have acted on it before closing).
            self.retried = True
            self.detach_up(False)
            up = self.connect(self.tried)
            up.client = self
            self.up = up
            up.send(self.up_head)
            return
        if self.rs == RS_HEAD:
            self.upstream_error(OUT_RESET, 502, "upstream closed the connection")
            return
        self.upstream_failed(502, "upstream closed the connection")

    cdef void detach_up(self, bint reusable):
        """Give the upstream connection back to its pool, or close it."""
        cdef UpstreamCore up = self.up
        if up is None:
            return
        self.up = None
        if reusable and not up.closing:
            up.pool.release(up)
        else:
            up.client = None
            up.pool.active -= 1
            up.close()
        self.set_read_pause(PAUSE_UPSTREAM_FULL, False)

    cdef void upstream_failed(self, int status, str message):
        """The upstream cannot complete this exchange: answer if nothing was sent yet."""
        self.detach_up(False)
        if self.upbuf is not None:
            del self.upbuf[:]
        self.up_scan = 0
        if self.resp_started or self.rq >= RQ_CLOSED:
            self.abort()
            return
        self.reply_error(status, message, self.rq != RQ_SENT)

    cdef void response_done(self):
        # The upstream connection goes back to the pool only when its response was delimited
        # and did not announce a close (`Connection: close`, or HTTP/1.0 without keep-alive):
        # a server that said so closes next, and a request sent on it would be lost.
        cdef bint reusable = (self.resp_framing != FRAMING_CLOSE and self.rq == RQ_SENT
                              and self.resp is not None and self.resp.keep_alive)
        if self.enc is not None:
            out = (<Encoder>self.enc).finish()
            self.enc = None
            if out is None:
                self.abort()
                return
            self.rec.resp_bytes += PyBytes_GET_SIZE(out)
            self._write(out)
        self.resp = None
        self.rec.t_up_end_ns = monotonic_ns()
        self.engine.responses += 1
        self.served += 1
        self.rs = RS_NONE
        self.detach_up(reusable)
        # While the request body is still arriving we cannot find the next request's start:
        # close, lingering so the rest of the body does not reset the response away.
        self.linger = self.rq != RQ_SENT
        self.finish_exchange(self.close_after or self.rq != RQ_SENT)

    cdef void add_done(self, object hook):
        if self.done_hooks is None:
            self.done_hooks = [hook]
        else:
            self.done_hooks.append(hook)

    def add_response_headers(self, bytes lines):
        """Header lines (`Name: value\r\n`, validated by the caller) added to this request's
        response from the service (CORS, sticky cookies): per request, unlike the route's."""
        self.resp_extra = lines if self.resp_extra is None else self.resp_extra + lines

    def set_upstream_target(self, bytes target):
        """The request-target sent upstream for this request (origin-form, validated by the
        caller: replace_path_regex)."""
        if not target.startswith(b"/"):
            raise ValueError("the upstream target must be in origin-form (start with /)")
        self.up_target = target

    def add_upstream_headers(self, bytes lines):
        """Header lines (`Name: value\r\n` each, already validated) for this request's
        upstream head: how an auth middleware passes the identity on. Reset per request."""
        self.up_extra = lines if self.up_extra is None else self.up_extra + lines

    @property
    def client_ip(self):
        """The TCP peer's address as text (for audit lines and auth decisions)."""
        return self.fwd.client_ip.decode("latin-1") if self.fwd is not None else ""

    @property
    def peer_certificate(self):
        """The client's certificate as DER bytes, or None (plain TCP, or no certificate sent).

        On a TLS entrypoint with client_auth optional/required the handshake has verified it
        against the client CA (a certificate that fails verification fails the handshake, so
        no request ever arrives). Looked up once per connection: renegotiation is off, so it
        cannot change while the connection lives."""
        if not self.peer_cert_known and self.transport is not None:
            self.peer_cert_known = True
            ssl_object = self.transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.peer_cert = ssl_object.getpeercert(True)
        return self.peer_cert

    @property
    def proto(self):
        """"http" or "https": the scheme of this entrypoint (what X-Forwarded-Proto says)."""
        return self.fwd.proto.decode("latin-1") if self.fwd is not None else "http"

    @property
    def tls_version(self):
        """The negotiated TLS version ("TLSv1.3", ...), or None on a plain TCP connection."""
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None

    def on_done(self, callback):
        """Call `callback(conn)` when the current exchange ends, however it ends."""
        self.add_done(callback)

    cdef void run_done_hooks(self):
        cdef list hooks = self.done_hooks
        self.done_hooks = None
        for hook in hooks:
            if isinstance(hook, CoreCheck):
                (<CoreCheck>hook).complete(self)
            else:
                try:
                    hook(self)
                except Exception:
                    import logging
                    logging.getLogger("fastgate.conn").exception("on_done hook failed")

    cdef void begin_exchange(self):
        """A request head arrived (or an error before one): start its ExchangeRecord."""
        cdef int ep_row = self.rec.ep_row
        self.rec = ExchangeRecord(active=True, t_head_ns=monotonic_ns(), t_up_start_ns=0,
                                  t_up_end_ns=0, t_end_ns=0, status=0, method=7, req_bytes=0,
                                  resp_bytes=0, ep_row=ep_row,
                                  route_row=self.ep.cfg.stats_noroute, server_row=-1,
                                  rate=RATE_NONE, rate_row=0, deny=DENY_NONE)
        if self.identity is not None:
            self.identity = None
        if self.log_pool is not None:
            self.log_pool = None

    cdef void end_exchange(self):
        """THE exchange-end hook: every exchange ends here exactly once (finish_exchange,
        or connection_lost for one cut short). self.rec is complete (status 0: nothing was
        sent), and self.head / self.request_id / self.route are still set when it came
        through finish_exchange: an access-log writer reads the same record here."""
        if not self.rec.active:
            return
        self.rec.active = False
        if (self.holds_slot or self.probe or self.queued) and self.route is not None:
            self.route.service.release(self)
        self.rec.t_end_ns = self.rec.t_up_end_ns if self.rec.t_up_end_ns else monotonic_ns()
        self.engine.shard.record_exchange(&self.rec)
        if self.engine.alog is not None:
            self.log_exchange(self.engine.alog)
        if self.rec.deny != DENY_NONE:
            self.deny_source = None
            self.deny_reason = None

    cdef void log_exchange(self, AccessLog alog):
        """Hand the finished exchange to the log streams that want it (accesslog.pxd): the
        fields are pointers into objects held here, formatted in C; nothing is built when
        no stream wants the exchange."""
        cdef LogFields f
        cdef Route route = self.route
        cdef RequestHead h = self.head
        cdef const char *tv = self.trace.value
        cdef char flag = tv[54]       # low hex digit of the trace flags: bit 0 is "sampled"
        cdef bint sampled = self.trace.state != TRACE_NONE and (
            ((flag - 48) if flag <= 57 else (flag - 87)) & 1)
        cdef int want
        if route is not None:
            want = alog.select(&self.rec, route.log_sample, route.log_errors, sampled)
        else:
            want = alog.select(&self.rec, alog.sample, alog.log_errors, sampled)
        if want == 0:
            return
        memset(&f, 0, sizeof(f))
        f.rec = &self.rec
        # Every object a Text points into is held by a local until write() returns.
        request_id = self.request_id
        set_bytes(&f.request_id, request_id)
        if self.trace.state != TRACE_NONE:
            f.trace_id.p = tv + 3
            f.trace_id.n = 32
            f.span_id.p = tv + 36
            f.span_id.n = 16
            if self.trace.state == TRACE_CONTINUED:
                f.parent_span_id.p = self.trace.parent
                f.parent_span_id.n = 16
            f.trace_sampled = sampled
        fwd = self.fwd
        if fwd is not None:
            if self.fwd.trusted and self.engine.client_resolver is not None and h is not None:
                # Behind a trusted proxy: the X-Forwarded-For walk (ratecheck), one call.
                client_ip = self.engine.client_resolver(self)
            else:
                client_ip = self.fwd.client_ip
            set_bytes(&f.client_ip, client_ip)
        identity = self.identity if self.identity is not None else self.fast_identity
        if identity is not None:
            id_method = getattr(identity, "method", None)
            id_subject = getattr(identity, "subject", None)
            id_consumer = getattr(identity, "consumer", None)
            set_text(&f.id_method, id_method)
            set_text(&f.id_subject, id_subject)
            set_text(&f.id_consumer, id_consumer)
            if f.id_method.p == NULL:
                f.id_method.p = "unknown"
                f.id_method.n = 7
        ep_name = self.ep.name
        if route is not None:
            if route.log_names_ep is not ep_name:
                # Once per route (and entrypoint): the names as the line writes them.
                route.log_names = names_fragment(ep_name, route.name)
                route.log_names_ep = ep_name
                route.log_service = (json_string(route.service.name)
                                     if route.service is not None else None)
            set_bytes(&f.names, route.log_names)
            set_bytes(&f.service, route.log_service)
            f.preescaped = PRE_SERVICE
            if route.log_names is None or want & WANT_SPAN:
                set_text(&f.entrypoint, ep_name)
                route_name = route.name
                set_text(&f.route, route_name)
        else:
            set_text(&f.entrypoint, ep_name)
        pool = self.log_pool
        if pool is not None:
            if pool.url_json is None:
                pool.url_json = json_string(pool.url)
            set_bytes(&f.server, pool.url_json)
            f.preescaped |= PRE_SERVER
        f.http_minor = -1
        if h is not None:
            set_bytes(&f.method, h.method)
            set_bytes(&f.target, h.target)
            f.http_minor = 1 if h.version == 11 else 0
            header_text(&f.user_agent, h, b"user-agent", 10)
            if alog.format == FMT_COMBINED:
                header_text(&f.referer, h, b"referer", 7)      # only that format shows it
        if PyBytes_GET_SIZE(self.cfg.proto) == 5:      # b"https": a TLS entrypoint
            if self.tls_name is None:
                version = self.tls_version
                self.tls_name = version.encode("ascii", "replace") if version else b""
            if PyBytes_GET_SIZE(self.tls_name):
                set_bytes(&f.tls_version, self.tls_name)
        deny_source = self.deny_source
        deny_reason = self.deny_reason
        if self.rec.deny != DENY_NONE:
            set_text(&f.deny_source, deny_source)
            set_text(&f.deny_reason, deny_reason)
        alog.write(&f, want)

    def note_deny(self, int event, source, reason):
        """The gateway's policy refused this request (a stats.DenyEvent): the audit stream
        records who refused it and why. The first refusal of an exchange is kept."""
        if not self.rec.active or self.rec.deny != DENY_NONE:
            return
        self.rec.deny = event
        self.deny_source = source
        self.deny_reason = reason

    def note_rate(self, int outcome):
        """A rate-limit decision on this request (stats.RateOutcome); the worst one counts."""
        if self.rec.active and outcome > self.rec.rate:
            self.rec.rate = outcome

    cdef void finish_exchange(self, bint close):
        """The response is out: close, or go back to reading the next request."""
        self.end_exchange()
        if self.done_hooks is not None:
            self.run_done_hooks()
        self.head = None
        self.route = None
        self.up_head = None
        self.request_id = None
        self.trace.state = TRACE_NONE
        self.body_buf = None
        self.request_body = None
        if close:
            self.close_client(self.linger)
            return
        self.rq = RQ_HEAD
        self.timer = T_IDLE
        self.deadline = self.engine.now + self.cfg.idle_timeout
        self.set_read_pause(PAUSE_PIPELINE, False)
        if PyByteArray_GET_SIZE(self.inbuf) and not self.in_consume:
            self.drain_inbuf()
        if self.eof and self.rq == RQ_HEAD and not self.in_consume:
            # The client half-closed and every complete request it sent has been answered.
            self.rq = RQ_CLOSED
            self.timer = T_NONE
            if self.transport is not None:
                self.transport.close()

    cdef void close_client(self, bint linger):
        """Close the client connection; after an error, linger first.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the reply still in flight (a 413 sent while the client is uploading). So after an
        error we send FIN (write_eof, after the reply is flushed), keep reading and discarding
        for at most LINGER_MS, and close on the client's EOF or at that deadline.
        """
        self.timer = T_NONE
        if self.transport is None:
            self.rq = RQ_CLOSED
            return
        if not linger or self.eof or not self.transport.can_write_eof():
            self.rq = RQ_CLOSED
            self.transport.close()
            return
        self.rq = RQ_LINGER
        del self.inbuf[:]
        self.transport.write_eof()
        if self.read_pause:
            self.read_pause = 0
            self.transport.resume_reading()
        self.timer = T_LINGER
        self.deadline = self.engine.now + LINGER_MS / 1000.0

    def abort_now(self):
        """Reset the connection at once (the drain deadline passed)."""
        self.abort()

    # ---- errors and timers -----------------------------------------------------------------

    cdef void reply_error(self, int status, str message, bint close):
        cdef bint head_only = self.head is not None and self.head.method == b"HEAD"
        close = close or self.close_after or self.rq == RQ_BODY
        # Unread input may follow an error: linger rather than reset the reply away.
        self.linger = close
        if self.request_id is None:
            self.request_id = self.engine.next_request_id()
        if not self.rec.active:
            self.begin_exchange()    # an error before any head
        self.rec.status = status
        self.engine.errors += 1
        self.engine.responses += 1
        self.detach_up(False)
        self.rs = RS_NONE
        if self._write is not None:
            out = build_error_reply(status, message, self.request_id, close, head_only,
                                    &self.trace)
            self.rec.resp_bytes += PyBytes_GET_SIZE(out)
            self._write(out)
        self.finish_exchange(close)

    cdef void abort(self):
        """Close both sides now (the response cannot be completed)."""
        self.detach_up(False)
        self.rq = RQ_CLOSED
        self.rs = RS_NONE
        self.timer = T_NONE
        if self.transport is not None:
            self.transport.abort()

    cdef void set_read_pause(self, int reason, bint on):
        cdef int before = self.read_pause
        if on:
            self.read_pause |= reason
        else:
            self.read_pause &= ~reason
        if self.transport is None or self.rq >= RQ_CLOSED:
            return
        if before == 0 and self.read_pause != 0:
            self.transport.pause_reading()
        elif before != 0 and self.read_pause == 0:
            self.transport.resume_reading()
            if self.rq == RQ_BODY and self.timer == T_BODY:
                self.start_body_window()     # the pause was ours: not the client's slowness

    cdef void tick(self, double now):
        cdef int kind = self.timer
        self.timer = T_NONE
        if kind == T_HEAD:
            if PyByteArray_GET_SIZE(self.inbuf) or self.scan_pos:
                self.reply_error(408, "request head timeout", True)
            else:
                self.rq = RQ_CLOSED
                self.transport.close()
        elif kind == T_IDLE:
            self.rq = RQ_CLOSED
            self.transport.close()
        elif kind == T_BODY:
            self.upstream_failed(408, "request body timeout")
        elif kind == T_UPSTREAM:
            if self.up is not None and not self.up.connected:
                # Still connecting: the server is unreachable, as documented for
                # timeouts.upstream_connect (502), not slow to answer (504).
                self.upstream_error(OUT_CONNECT, 502, "upstream connect timeout")
            elif self.rs == RS_HEAD:
                self.upstream_error(OUT_TIMEOUT, 504, "upstream timeout")
            else:
                self.upstream_failed(504, "upstream timeout")
        elif kind == T_QUEUE:
            svc = self.route.service
            (<Service>svc).shard.add(K_SERVICE, (<Service>svc).stats_row, VW_REJECTED, 1)
            (<Service>svc).release(self)
            self.reply_error(503, "service queue timeout", self.head.framing != FRAMING_NONE)
        elif kind == T_SEND:
            # The client stopped reading: reset rather than close, so the kernel drops the
            # queued response at once instead of keeping it (and the socket) for a minute.
            if self.transport is not None:
                sock = self.transport.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(SOL_SOCKET, SO_LINGER, LINGER_RESET)
                    except OSError:
                        pass
            self.abort()
        elif kind == T_LINGER:
            self.rq = RQ_CLOSED
            self.transport.close()

    @property
    def state(self):
        """(request state, response state): for tests and the admin listener."""
        return (self.rq, self.rs)

    @property
    def trace_id(self):
        """The current request's W3C trace id (32 lowercase hex), None between requests."""
        if self.trace.state == TRACE_NONE:
            return None
        return PyBytes_FromStringAndSize(self.trace.value + 3, 32).decode()

    @property
    def span_id(self):
        """The gateway's span id for the current request: the parent id sent upstream."""
        if self.trace.state == TRACE_NONE:
            return None
        return PyBytes_FromStringAndSize(self.trace.value + 36, 16).decode()

    @property
    def parent_span_id(self):
        """The caller's span id when the request continued the client's trace, else None."""
        if self.trace.state != TRACE_CONTINUED:
            return None
        return PyBytes_FromStringAndSize(self.trace.parent, 16).decode()


class UpstreamProtocol(UpstreamCore, asyncio.Protocol):
    """The asyncio face of UpstreamCore."""

    __slots__ = ()


class DownstreamProtocol(ConnCore, asyncio.Protocol):
    """The asyncio face of ConnCore: the class given to loop.create_server."""

    __slots__ = ()
