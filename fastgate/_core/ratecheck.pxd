# The rate_limit middleware's C half: rate-limit keys built from a request without Python,
# the limits of one middleware decided in one call, in-flight counters, and the CoreCheck
# that runs them before the Python chain. Read the theory at the top of ratecheck.pyx.
#
# Keys are byte strings made of parts, each written as <kind byte><3-byte big-endian length>
# <value>, so no two different part lists can give the same key (see ratecheck.pyx).

from libc.stdint cimport uint8_t

from fastgate._core.conn cimport ConnCore, CoreCheck
from fastgate._core.httphead cimport RequestHead
from fastgate._core.ratelimit cimport Decision, RateLimiter

cdef enum:
    MAX_LIMITS = 16           # limits in one middleware (the options model refuses more)
    MAX_PARTS = 16            # parts in one key
    KEY_STACK = 256           # keys up to this many bytes are built on the C stack
    MAX_PART_VALUE = 0xFFFFFF # a longer value (a header over 16 MiB) cannot occur

# Part kinds (the first byte of each encoded part). Kinds with a value from outside the
# request head (identity, claims) are supplied by the Python path as `extras`.
cdef enum PartKind:
    PK_CONST = 0x63           # 'c' a constant from the config
    PK_ROUTE = 0x72           # 'r' the route name (scope: route)
    PK_ADDR = 0x61            # 'a' a client address: 4 bytes IPv4, or 16 bytes IPv6 masked
    PK_ADDR_TEXT = 0x75       # 'u' a client address that does not parse, as text
    PK_HEADER = 0x68          # 'h' a request header's value (absent: the PK_ABSENT part)
    PK_ABSENT = 0x2d          # '-' the value this part reads is absent
    PK_EXTRA = 0x78           # 'x' extras[i], given by the caller (identity.*, claim:*)

cdef class NetSet:
    # Trusted proxy networks as (16-byte address, prefix) pairs; IPv4 as v4-mapped IPv6.
    # An address matches only networks of its own family (as `ipaddress` judges `in`).
    cdef uint8_t *addrs       # 16 bytes per net
    cdef int *prefixes        # bits of the 16 bytes (IPv4 /n: 96 + n)
    cdef uint8_t *families    # 4 or 6 per net
    cdef Py_ssize_t n
    cdef bint contains(self, const uint8_t *addr16, int family) noexcept nogil

# The client address of a request (see ratecheck.pyx): the peer, or the X-Forwarded-For walk
# when the peer is a trusted proxy of `nets`. 4 or 6 with the address in `a` (16 bytes, IPv4
# v4-mapped), or 0 with the address's text in text/tlen. Declared for fastgate._core.ipfilter.
cdef int walk_client(bytes peer, bint trusted, NetSet nets, RequestHead head, uint8_t *a,
                     const char **text, Py_ssize_t *tlen) noexcept

cdef class KeyBuilder:
    cdef readonly tuple spec            # the parts as given: (kind, argument) pairs
    cdef readonly int ipv6_prefix       # bits of an IPv6 client address kept (1..128)
    cdef readonly bint needs_extras     # some part is PK_EXTRA: only the Python path can build
    cdef int nparts
    cdef int kinds[MAX_PARTS]
    cdef tuple args                     # per part: bytes (const, route, lowercase header
                                        #   name) or int (extra index) or None (address)
    cdef const char *argp[MAX_PARTS]         # the bytes arguments' buffers (kept alive by args)
    cdef Py_ssize_t argn[MAX_PARTS]          # ... and lengths; for extras argn is the index
    cdef dict netsets                   # EntryConfig -> NetSet, built on first use
    cdef uint8_t v6mask[16]

    # Build the key into `buf` (cap bytes). Returns the key's length; when that is > cap
    # nothing usable was written and the caller retries with a buffer that large. -1 only
    # with a Python error set (a NetSet for a new entrypoint config, or a bad extra).
    # `absent` is set when some part's value was absent (a missing header or extra).
    cdef Py_ssize_t build(self, ConnCore conn, RequestHead head, tuple extras, char *buf,
                          Py_ssize_t cap, bint *absent) except -1
    cdef Py_ssize_t build_from(self, bytes peer, bint trusted, NetSet nets, RequestHead head,
                               tuple extras, char *buf, Py_ssize_t cap,
                               bint *absent) except -1
    cdef NetSet nets_for(self, object cfg)
    cdef bint kinds_need_addr(self) noexcept
    cdef Py_ssize_t put_addr(self, char *buf, Py_ssize_t cap, Py_ssize_t pos, int fam,
                             uint8_t *a, const char *text, Py_ssize_t tlen) noexcept
    cdef Py_ssize_t put_client(self, char *buf, Py_ssize_t cap, Py_ssize_t pos, bytes peer,
                               bint trusted, NetSet nets, RequestHead head) noexcept
    cdef tuple _key(self, bytes peer, bint trusted, NetSet nets, RequestHead head,
                    tuple extras, ConnCore conn)

cdef class LimitSet:
    # The limits of one middleware, decided together: in order, stopping at the first
    # enforcing limit that refuses (dry-run limits are decided and counted, never refuse).
    cdef readonly tuple limiters        # RateLimiter per limit
    cdef readonly int n
    cdef int costs[MAX_LIMITS]
    cdef bint dry[MAX_LIMITS]
    cdef unsigned long long _allowed[MAX_LIMITS]
    cdef unsigned long long _denied[MAX_LIMITS]    # refusals (dry run: would-be refusals)
    cdef unsigned long long _dry_pending[MAX_LIMITS]  # dry-run refusals not yet logged
    cdef long long _dry_log_at[MAX_LIMITS]          # when the next dry-run log may be written
    cdef readonly object dry_log       # dry_log(index, key, refusals since last) or None
    cdef readonly long long dry_log_every_us
    cdef readonly tuple tallies        # hybrid store: per limit a RateLimiter used as a tally
                                       #   (add_c of cost * T per admission), or None
    cdef long long _amounts[MAX_LIMITS]  # cost * T per limit, what an admission adds
    cdef public bint down              # hybrid store: not synced (Redis down, not started):
                                       #   a RateCheck hands its decisions to its fallback

    # One decision for key at now_us. Returns the index of the limit that refused, or -1;
    # `out` holds that limit's decision, or (when admitted) the most restrictive one (least
    # remaining) among the enforcing limits. Calls Python only to log dry-run refusals.
    cdef int decide_c(self, const char *key, Py_ssize_t klen, long long now_us,
                      Decision *out) except -2
    cdef void _log_dry(self, int i, const char *key, Py_ssize_t klen) noexcept

cdef class InFlight:
    # Requests in flight per key, released when their exchange ends. Counts live in a dict
    # (key bytes -> int) holding only keys with requests in flight; `held` maps each
    # connection holding a slot to its key.
    cdef readonly long long limit
    cdef readonly dict counts
    cdef readonly dict held
    cdef readonly unsigned long long refused
    cdef bint acquire_c(self, object conn, const char *key, Py_ssize_t klen) except -1
    cdef void release_c(self, object conn)

cdef class RateCheck(CoreCheck):
    # A route's rate_limit middleware run in C (local store, key parts all from the head).
    cdef readonly KeyBuilder keys
    cdef readonly LimitSet limits       # None when the middleware has only in_flight
    cdef readonly InFlight inflight     # None without in_flight
    cdef readonly object reject         # reject(index, Decision as tuple, key) -> reply
    cdef readonly object reject_busy    # reject_busy(key) -> reply (in_flight refused)
    cdef readonly bint skip_absent      # a key with an absent part is not limited
    cdef readonly object fallback       # fallback(conn, key) -> reply or None, while
                                        #   limits.down (it notes its decision on conn)
    cdef readonly str name              # the middleware's name: the audit line's deny source
    cdef object _decide(self, ConnCore conn, char *buf, Py_ssize_t n)
    cdef void refused(self, ConnCore conn, object reason)
