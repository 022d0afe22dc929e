# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Metric shards: per-worker counters in shared memory, summed by the supervisor.

Theory of operation
-------------------
DESIGN.md §6: workers count in C, the supervisor's /metrics sums. Each worker owns one slot,
a file in a private tmpfs directory that the supervisor creates (fastgate/metrics/slots.py)
and that the worker maps MAP_SHARED. The supervisor maps every slot read-only.

Single writer, no locks. Only the worker that owns a slot writes it, from its one event-loop
thread, with plain 64-bit adds; an aligned 64-bit store is atomic on x86-64 (and on aarch64),
so a reader sees each word either before or after an increment, never half of one. A reader
may therefore be at most one increment stale per word, and the words of one row may be from
slightly different instants (a request counted whose histogram bucket is not yet): the
exposition is a sum of monotonic counters, so the next scrape is right again.

Label sets are bounded and decided at config compile time. Each table (Kind) has ROWS rows; a
row's labels are written into the slot's name table once, then the table's row count is
published with a release store, so a reader that loads the count with acquire sees whole
names for every row it reads. Tables are append-only: registering a label set that is already
there returns its row, so counters stay monotonic across reloads (a route that disappears
keeps its row and its last values). Row 0 of every table is the overflow row (route "_other",
...): a label set that does not fit (table full, or labels longer than NAME_BYTES) shares it.

A restarted worker re-opens its slot and continues from the values there: Prometheus counters
must not go backwards while the gateway (the supervisor, which owns the directory) lives.

Per request the cost is one ExchangeRecord filled by the connection (two clock_gettime
calls, a few adds) and record_exchange: about 8 word increments, no Python object touched.

Bounds: one slot is HEADER + N_KINDS * ROWS * NAME_BYTES + the counter tables, ~10 MiB of
address space, sparse: tmpfs pages are allocated only where rows were written (a few KiB for
a small config). Histograms are stored per bucket (not cumulative) and made cumulative on
read.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.string cimport memcpy, memcmp, memset
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE, MAP_FAILED
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from *:
    """
    #include <sys/mman.h>
    #ifndef MAP_ANONYMOUS
    #define MAP_ANONYMOUS MAP_ANON
    #endif
    static inline void fg_store_release(unsigned long long *p, unsigned long long v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline unsigned long long fg_load_acquire(const unsigned long long *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    """
    int MAP_ANONYMOUS
    void fg_store_release(unsigned long long *p, unsigned long long v) noexcept nogil
    unsigned long long fg_load_acquire(const unsigned long long *p) noexcept nogil

cdef unsigned long long MAGIC = 0x3153544147544746   # "FGTGATS1": a slot file
cdef enum:
    VERSION = 2
    HEADER = 4096
    # Header words: 0 magic, 1 version, 2 size, 3 pid of the last writer, 8+kind: row counts.
    H_MAGIC = 0
    H_VERSION = 1
    H_SIZE = 2
    H_PID = 3
    H_COUNTS = 8

# Histogram upper bounds (ns), the contract's buckets; the last bucket is +Inf.
cdef long long BOUNDS_NS[14]
BOUNDS_NS[:] = [500000, 1000000, 2500000, 5000000, 10000000, 25000000, 50000000,
                100000000, 250000000, 500000000, 1000000000, 2500000000, 5000000000,
                10000000000]
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, float("inf"))
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other")
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
KINDS = ("route", "server", "entry", "rate", "auth", "log", "service")
OVERFLOW = (("", "_other", ""), ("_other", "_other"), ("_other",), ("_other",),
            ("_other", "_other", "_other"), ("_other",), ("_other",))
WORDS = {"ROUTE": ROUTE_WORDS, "SERVER": SERVER_WORDS, "ENTRY": ENTRY_WORDS,
         "RATE": RATE_WORDS, "AUTH": AUTH_WORDS, "LOG": LOG_WORDS, "SERVICE": SERVICE_WORDS}
# Word offsets, for the reader (fastgate/metrics/collector.py) and the copier.
OFFSETS = {
    "requests": RW_REQUESTS, "buckets": RW_BUCKETS, "sum_ns": RW_SUM_NS,
    "req_bytes": RW_REQ_BYTES, "resp_bytes": RW_RESP_BYTES,
    "up_buckets": SW_BUCKETS, "up_sum_ns": SW_SUM_NS, "connect_errors": SW_CONNECT_ERRORS,
    "tls_errors": SW_TLS_ERRORS, "up_opened": SW_OPENED, "up_closed": SW_CLOSED,
    "conn_opened": EW_OPENED, "conn_closed": EW_CLOSED, "tls_ok": EW_TLS_OK,
    "tls_failed": EW_TLS_FAILED, "allowed": AW_ALLOWED, "limited": AW_LIMITED,
    "fallback": AW_FALLBACK, "failures": 0, "log_lines": LW_LINES, "log_dropped": LW_DROPPED,
    "ejections": SW_EJECTIONS, "unhealthy": SW_UNHEALTHY, "server_retries": SW_RETRIES,
    "retries": VW_RETRIES, "budget_exhausted": VW_BUDGET_EXHAUSTED, "cb_opened": VW_CB_OPENED,
    "cb_open": VW_CB_OPEN, "cb_rejected": VW_CB_REJECTED, "queued": VW_QUEUED,
    "rejected": VW_REJECTED, "no_server": VW_NO_SERVER,
}


cdef long long monotonic_ns() noexcept nogil:
    """CLOCK_MONOTONIC in ns (vDSO: no system call). Engine.now is too coarse to time one
    request; this is read twice per exchange."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int method_class(bytes method) noexcept:
    """0..6 for the seven common methods (RFC 9110 §9.3, exact case), 7 for anything else."""
    cdef const char *m = PyBytes_AS_STRING(method)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(method)
    if n == 3:
        if memcmp(m, b"GET", 3) == 0:
            return 0
        if memcmp(m, b"PUT", 3) == 0:
            return 3
    elif n == 4:
        if memcmp(m, b"HEAD", 4) == 0:
            return 1
        if memcmp(m, b"POST", 4) == 0:
            return 2
    elif n == 5 and memcmp(m, b"PATCH", 5) == 0:
        return 5
    elif n == 6 and memcmp(m, b"DELETE", 6) == 0:
        return 4
    elif n == 7 and memcmp(m, b"OPTIONS", 7) == 0:
        return 6
    return 7


cdef inline int bucket_of(long long ns) noexcept nogil:
    cdef int i
    for i in range(14):
        if ns <= BOUNDS_NS[i]:
            return i
    return 14


cdef size_t _layout(int *nwords, size_t *offsets) noexcept:
    """Fill each table's words per row and byte offset; returns the slot size."""
    cdef int k
    cdef size_t at = HEADER + <size_t>N_KINDS * ROWS * NAME_BYTES
    nwords[K_ROUTE] = ROUTE_WORDS
    nwords[K_SERVER] = SERVER_WORDS
    nwords[K_ENTRY] = ENTRY_WORDS
    nwords[K_RATE] = RATE_WORDS
    nwords[K_AUTH] = AUTH_WORDS
    nwords[K_LOG] = LOG_WORDS
    nwords[K_SERVICE] = SERVICE_WORDS
    for k in range(N_KINDS):
        offsets[k] = at
        at += <size_t>ROWS * nwords[k] * 8
    return at


def slot_size():
    """Bytes of one slot file (sparse on tmpfs)."""
    cdef int nwords[N_KINDS]
    cdef size_t offsets[N_KINDS]
    return _layout(nwords, offsets)


cdef class Shard:
    """One worker's slot. `Shard(path)` opens (creating if needed) the slot file for writing;
    `Shard(path, readonly=True)` maps it for the collector; `Shard()` is private memory (an
    engine without a supervisor: tests, `check_runtime`), so the hot path never tests for
    "no stats"."""

    def __cinit__(self):
        self.base = NULL

    def __init__(self, str path=None, bint readonly=False):
        cdef int nwords[N_KINDS]
        cdef size_t offsets[N_KINDS]
        cdef size_t size = _layout(nwords, offsets)
        cdef void *p
        cdef int k, fd = -1
        cdef unsigned long long *h
        cdef unsigned long long *w
        self.path = path
        self.rows = {}
        if path is None:
            p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        else:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o600)
            try:
                have = os.fstat(fd).st_size
                if have < size:
                    if readonly:
                        raise ValueError(f"{path}: not a complete stats slot")
                    os.ftruncate(fd, size)
                p = mmap(NULL, size, PROT_READ if readonly else PROT_READ | PROT_WRITE,
                         MAP_SHARED, fd, 0)
            finally:
                os.close(fd)
        if p == MAP_FAILED:
            raise OSError(f"cannot map a stats slot of {size} bytes")
        self.base = <char *>p
        self.size = size
        for k in range(N_KINDS):
            self.words[k] = <unsigned long long *>(self.base + offsets[k])
            self.nwords[k] = nwords[k]
        h = <unsigned long long *>self.base
        if h[H_MAGIC] == 0 and not readonly:
            h[H_VERSION] = VERSION
            h[H_SIZE] = size
            fg_store_release(&h[H_MAGIC], MAGIC)
        elif h[H_MAGIC] != MAGIC or h[H_VERSION] != VERSION or h[H_SIZE] != size:
            self.close()
            raise ValueError(f"{path}: not a stats slot of this version")
        if readonly:
            return
        h[H_PID] = os.getpid()
        # A re-opened slot: learn its rows, so re-registering returns them.
        for k in range(N_KINDS):
            for row, labels in enumerate(self._names(k)):
                self.rows[(k, labels)] = row
            if fg_load_acquire(&h[H_COUNTS + k]) == 0:
                self.register(k, OVERFLOW[k])
        # Connections of a previous process in this slot died with it: the gauges (opened -
        # closed) start again from zero, the counters go on.
        for row in range(fg_load_acquire(&h[H_COUNTS + K_ENTRY])):
            w = self.words[K_ENTRY] + <size_t>row * ENTRY_WORDS
            w[EW_CLOSED] = w[EW_OPENED]
        for row in range(fg_load_acquire(&h[H_COUNTS + K_SERVER])):
            w = self.words[K_SERVER] + <size_t>row * SERVER_WORDS
            w[SW_CLOSED] = w[SW_OPENED]

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    def close(self):
        """Unmap (the counters stay in the file)."""
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    # ---- name tables ---------------------------------------------------------------------

    cdef int register(self, int kind, tuple labels) except -1:
        cdef unsigned long long *h = <unsigned long long *>self.base
        cdef unsigned long long n
        cdef bytes text
        cdef char *name
        key = (kind, labels)
        row = self.rows.get(key)
        if row is not None:
            return row
        text = "\0".join(labels).encode("utf-8")
        n = h[H_COUNTS + kind]
        if n >= ROWS or PyBytes_GET_SIZE(text) > NAME_BYTES - 2:
            return 0                # the overflow row
        name = self.base + HEADER + (<size_t>kind * ROWS + n) * NAME_BYTES
        name[0] = PyBytes_GET_SIZE(text) & 0xFF
        name[1] = PyBytes_GET_SIZE(text) >> 8
        memcpy(name + 2, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))
        fg_store_release(&h[H_COUNTS + kind], n + 1)
        self.rows[key] = <int>n
        return <int>n

    def _names(self, int kind):
        cdef unsigned long long *h = <unsigned long long *>self.base
        cdef unsigned long long n = fg_load_acquire(&h[H_COUNTS + kind])
        cdef unsigned long long i
        cdef unsigned char *name
        cdef int length
        out = []
        for i in range(min(n, ROWS)):
            name = <unsigned char *>(self.base + HEADER + (<size_t>kind * ROWS + i) * NAME_BYTES)
            length = name[0] | (name[1] << 8)
            if length > NAME_BYTES - 2:
                length = 0
            text = PyBytes_FromStringAndSize(<char *>name + 2, length).decode("utf-8", "replace")
            out.append(tuple(text.split("\0")))
        return out

    def register_route(self, str entrypoint, str route, str service):
        """The K_ROUTE row of (entrypoint, route, service); route "" for no route."""
        return self.register(K_ROUTE, (entrypoint, route, service))

    def register_server(self, str service, str server):
        return self.register(K_SERVER, (service, server))

    def register_entry(self, str entrypoint):
        return self.register(K_ENTRY, (entrypoint,))

    def register_rate(self, str route):
        return self.register(K_RATE, (route,))

    def register_auth(self, str route, str middleware, str reason):
        return self.register(K_AUTH, (route, middleware, reason))

    def register_log(self, str stream):
        return self.register(K_LOG, (stream,))

    def register_service(self, str service):
        return self.register(K_SERVICE, (service,))

    # ---- counting ------------------------------------------------------------------------

    cdef void add(self, int kind, int row, int word, unsigned long long n) noexcept:
        self.words[kind][<size_t>row * self.nwords[kind] + word] += n

    def add_count(self, int kind, int row, int word, unsigned long long n):
        """Add `n` to one word (the periodic copier of Python-side tallies; tests)."""
        if not (0 <= kind < N_KINDS and 0 <= row < ROWS and 0 <= word < self.nwords[kind]):
            raise IndexError("no such stats word")
        self.add(kind, row, word, n)

    cdef void record_exchange(self, ExchangeRecord *r) noexcept:
        """Count one finished exchange (the hot path: C arithmetic only)."""
        cdef unsigned long long *w = self.words[K_ROUTE] + <size_t>r.route_row * ROUTE_WORDS
        cdef unsigned long long *s
        cdef long long d
        cdef int cls
        w[RW_REQ_BYTES] += r.req_bytes
        w[RW_RESP_BYTES] += r.resp_bytes
        if r.status >= 100:
            cls = r.status // 100 - 1
            if cls > 4:
                cls = 4
            d = r.t_end_ns - r.t_head_ns
            if d < 0:
                d = 0
            w[RW_REQUESTS + r.method * N_CLASSES + cls] += 1
            w[RW_BUCKETS + cls * N_BUCKETS + bucket_of(d)] += 1
            w[RW_SUM_NS + cls] += d
        if r.server_row >= 0 and r.t_up_start_ns and r.t_up_end_ns:
            s = self.words[K_SERVER] + <size_t>r.server_row * SERVER_WORDS
            d = r.t_up_end_ns - r.t_up_start_ns
            if d < 0:
                d = 0
            s[SW_BUCKETS + bucket_of(d)] += 1
            s[SW_SUM_NS] += d
        if r.rate != RATE_NONE:
            # Per route, once per request: the worst of its rate-limit decisions.
            self.words[K_RATE][<size_t>r.rate_row * RATE_WORDS
                               + (AW_ALLOWED if r.rate == RATE_ALLOWED else
                                  AW_FALLBACK if r.rate == RATE_FALLBACK else AW_LIMITED)] += 1

    def record(self, int route_row, int status, int method=0, double seconds=0.0,
               long long req_bytes=0, long long resp_bytes=0, int server_row=-1,
               double upstream_seconds=-1.0, int rate=0, int rate_row=0):
        """record_exchange from Python (tests): one exchange of `seconds`; `rate` a
        RateOutcome (0 none, 1 allowed, 2 fallback, 3 limited) counted on K_RATE `rate_row`."""
        cdef ExchangeRecord r
        if not (0 <= route_row < ROWS and -1 <= server_row < ROWS and 0 <= method < 8):
            raise IndexError("no such row")
        memset(&r, 0, sizeof(r))
        r.route_row = route_row
        r.status = status
        r.method = method
        r.t_head_ns = 1
        r.t_end_ns = 1 + <long long>(seconds * 1e9)
        r.req_bytes = req_bytes
        r.resp_bytes = resp_bytes
        r.server_row = server_row
        if not (0 <= rate <= 3 and 0 <= rate_row < ROWS):
            raise IndexError("no such rate outcome or row")
        r.rate = rate
        r.rate_row = rate_row
        if upstream_seconds >= 0:
            r.t_up_start_ns = 1
            r.t_up_end_ns = 1 + <long long>(upstream_seconds * 1e9)
        self.record_exchange(&r)

    # ---- reading -------------------------------------------------------------------------

    @property
    def pid(self):
        """The pid of the worker that last opened the slot for writing."""
        return (<unsigned long long *>self.base)[H_PID]

    def table(self, int kind):
        """[(labels, words)] for every registered row of `kind` (a consistent name per row;
        each word as of its own last store)."""
        cdef unsigned long long *w
        cdef int nw = self.nwords[kind]
        cdef Py_ssize_t i
        cdef int j
        names = self._names(kind)
        out = []
        for i in range(len(names)):
            w = self.words[kind] + <size_t>i * nw
            out.append((names[i], tuple([w[j] for j in range(nw)])))
        return out
