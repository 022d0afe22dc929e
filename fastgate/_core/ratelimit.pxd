# Local rate limiter: GCRA (one theoretical arrival time, TAT, per key) over a bounded C hash
# table keyed by bytes. All time is int64 microseconds of CLOCK_MONOTONIC. The arithmetic, the
# table and the bounds are written down at the top of ratelimit.pyx; read that first.
#
# Callers in C (the connection code, the hybrid store) use:
#   monotonic_us()                    the clock (one clock_gettime; pass a coarse loop time
#                                     to decide_c instead, so the hot path makes no syscall)
#   RateLimiter.decide_c(...)         one decision for one key; no Python, no allocation for
#                                     keys <= RL_INLINE_KEY bytes (except table growth)
#   gcra_c(...)                       the bare arithmetic, no table (the Redis script's twin)

cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef enum:
    RL_INLINE_KEY = 40        # keys up to this many bytes live inside the slot

ctypedef struct Decision:
    bint allowed
    long long remaining       # cost-1 requests that would pass right after this decision
    long long reset_after_us  # until the bucket is full again (TAT - now, >= 0)
    long long retry_after_us  # denied: until this same request would pass; 0 when allowed;
                              # -1 when never (cost > burst)
    long long limit           # the burst (bucket capacity), for RateLimit-Limit headers

ctypedef union SlotKey:
    char buf[RL_INLINE_KEY]   # klen <= RL_INLINE_KEY
    char *heap                # klen > RL_INLINE_KEY: malloc'd copy, owned by the slot

ctypedef struct Slot:         # 64 bytes: one cache line (the array is 64-byte aligned)
    uint64_t hash             # seeded hash of the key bytes
    int64_t tat               # theoretical arrival time, microseconds
    uint32_t klen
    uint32_t dist             # robin hood probe distance + 1; 0 marks an empty slot
    SlotKey key

ctypedef struct GcraParams:   # one limit, prepared once by gcra_params()
    int64_t emission          # T, microseconds, >= 1
    int64_t burst             # >= 1
    int64_t tau               # T * burst
    uint64_t inv              # floor((2**64 - 1) / T): division by T as a multiply

# The clock: CLOCK_MONOTONIC in microseconds (the clock of time.monotonic()).
cpdef long long monotonic_us() noexcept nogil

# Fill `p` for emission T >= 1 and burst >= 1 with T * burst <= 2**61 (not checked here; the
# Python constructors validate).
cdef void gcra_params(GcraParams *p, int64_t emission, int64_t burst) noexcept nogil

# GCRA for one request, no table. `tat` is the stored TAT (any value <= now for a key without
# state), cost >= 0 (negative is treated as 0), |now|, |tat| <= 2**61. Fills `out` and returns
# the TAT to store: the new one when allowed, `tat` unchanged when denied.
cdef int64_t gcra_c(int64_t tat, int64_t now, const GcraParams *p, int64_t cost,
                    Decision *out) noexcept nogil

@cython.final
cdef class RateLimiter:
    cdef readonly double rate         # requests per period
    cdef readonly double period       # seconds
    cdef readonly long long burst     # bucket capacity (>= 1)
    cdef readonly Py_ssize_t max_keys # hard bound on stored keys
    cdef readonly long long emission_us   # T = round(period_us / rate)
    cdef readonly unsigned long long evictions  # live buckets forgotten because the table was full
    cdef readonly unsigned long long reclaimed  # full buckets removed (sweep or eviction)
    cdef readonly unsigned long long overflowed # add_c calls dropped: a tally table was full
    cdef GcraParams _p
    cdef void *_raw                   # allocation holding _slots (aligned inside it)
    cdef Slot *_slots
    cdef Py_ssize_t _cap              # slots in the array
    cdef Py_ssize_t _cap_max          # the array never grows beyond this
    cdef Py_ssize_t _count            # occupied slots (== len)
    cdef Py_ssize_t _cursor           # incremental sweep position
    cdef Py_ssize_t _heap_bytes       # bytes malloc'd for long keys

    cdef void *_calloc_slots(self, Py_ssize_t cap) noexcept nogil
    cdef void _install(self, void *raw, Py_ssize_t cap) noexcept nogil
    cdef int _reset(self, Py_ssize_t cap) noexcept nogil
    cdef void _free_table(self) noexcept nogil
    cdef Py_ssize_t _find(self, uint64_t h, const char *key, Py_ssize_t klen) noexcept nogil
    cdef void _place(self, Slot cur) noexcept nogil
    cdef void _delete(self, Py_ssize_t pos) noexcept nogil
    cdef int _grow(self) noexcept nogil
    cdef void _evict(self, uint64_t h, int64_t now) noexcept nogil
    cdef void _sweep(self, int64_t now, int steps) noexcept nogil
    cdef void _insert(self, uint64_t h, const char *key, Py_ssize_t klen, int64_t tat,
                      int64_t now) noexcept nogil

    # One decision for `key` at `now_us` (the caller's clock, microseconds, non-decreasing per
    # limiter). Fills `out`, returns out.allowed. Never raises, never calls Python, makes no
    # syscall. A negative cost counts as 0; klen outside [0, 2**32) is denied as never
    # (retry_after_us = -1) and stores nothing.
    cdef bint decide_c(self, const char *key, Py_ssize_t klen, long long now_us, int cost,
                       Decision *out) noexcept

    # The hybrid store's sync (see "Tally tables" in ratelimit.pyx). raise_tat stores
    # max(stored TAT, tat_us) for key (inserting, with eviction, when absent and tat_us is in
    # the future). add_c uses the table as a tally, key -> accumulated amount (the slot's tat
    # field): no GCRA, no sweep, no eviction; when max_keys keys are held the amount is
    # dropped and `overflowed` counts it. drain() returns the tally and empties it.
    cpdef raise_tat(self, bytes key, long long tat_us)
    cdef void add_c(self, const char *key, Py_ssize_t klen, long long amount) noexcept
