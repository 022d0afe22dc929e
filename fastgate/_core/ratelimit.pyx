# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
#
# Theory of operation
# -------------------
# GCRA (the generic cell rate algorithm, ITU-T I.371) is a token bucket kept as one number per
# key: the theoretical arrival time TAT, the instant at which the bucket will be full again.
# A bucket that is full carries no state (TAT <= now means the same as "no TAT"), so only keys
# that spent something in the last T*burst microseconds need a slot. Every quantity is an int64
# count of microseconds; there is no float in a decision, so no drift and no disagreement with
# the Redis script (which uses Redis TIME, also microseconds, and the same integer formulas; see
# the module docstring for the exact arithmetic and a worked example).
#
# The table is open addressing with robin hood linear probing over 64-byte slots (one cache
# line each, the array 64-byte aligned). A slot holds the key's 64-bit hash, its TAT, the key
# length, the probe distance, and the key bytes inline when they fit in 40 bytes (IPv4/IPv6
# text, a /64 prefix, a 32-byte digest, base32/hex-truncated API key ids) or a pointer to a
# malloc'd copy when longer. The home slot is the high bits of hash * capacity (fastrange), so
# any capacity works. Robin hood keeps the table sorted by home slot (cyclically): lookup walks
# from home until the key or a slot closer to its own home than we are to ours (the early exit
# that keeps misses short); insertion puts the new slot in order and moves the run after it
# right by one (one memmove); deletion moves the run after it back by one (backward shift: no
# tombstones, so probe lengths never rot). At load 7/8 the mean probe is 4.5 slots (measured
# 4.46 at 1M keys, longest 43), and they are adjacent cache lines.
#
# The hash is a wyhash-style multiply-fold (64x64 -> 128-bit product, halves xored) over 16-byte
# blocks, keyed with 256 bits from os.urandom at import. Keyed, because the keys are chosen by
# clients (addresses, API keys, header values): with a fixed hash an attacker could aim many
# keys at one probe run and make every decision O(n). It is not a proven PRF like SipHash; it is
# the trade Go's runtime makes on CPUs without AES (a wyhash-derived memhash with a per-process
# seed): two multiplies for a 16-byte key instead of SipHash's rounds, and the attacker never
# sees a hash value, only timing through a network and a gateway that bounds the table anyway.
# A seeded FNV-1a was rejected: the seed is only its starting state, its low output bits depend
# only on low input bits, and a byte-at-a-time loop is slower for 20-byte keys.
#
# Bounds
# ------
# Memory: never more than max_keys entries. The slot array starts at 16 slots and doubles while
# the load would pass 7/8, up to cap_max = ceil(max_keys * 8 / 7) slots (at least 2): 64 bytes
# per slot plus the long keys' copies. At 1,000,000 keys with max_keys = 1,000,000 that is
# 1,142,858 slots = 73.1 bytes per key (memory_bytes; the RSS delta measured by
# benchmarks/micro_ratelimit.py agrees within 3%). Below the bound the array may have just
# doubled: up to 2x that per key (134 bytes per key at 1,000,000 keys with max_keys 2,000,000).
#
# Reclaiming: every decision that finds its key examines 1 slot at a sweep cursor, every insert
# 8; a slot whose TAT <= now is deleted (it is a full bucket: forgetting it changes nothing).
# One full pass therefore takes at most cap/8 inserts, so at most cap/8 full buckets are ever
# waiting to be reclaimed, and a steady stream of distinct keys whose live set fits in
# max_keys - cap/8 never evicts a live bucket. The clock must not run backwards per limiter: a
# bucket reclaimed at `now` would otherwise be missed by a request stamped earlier.
#
# Eviction, only when max_keys keys are stored and a new key must be stored: look at the first
# 8 occupied slots from the new key's home (they are in the cache lines the probe touches),
# delete the first full bucket among them, else the one with the oldest TAT. Evicting a
# non-full bucket resets that key to full: it may then admit up to ceil((TAT - now) / T) <=
# burst requests (of cost 1) more than exact GCRA would, once per eviction of that key. Picking
# the oldest TAT minimises that debt among the sample. `evictions` counts these (a metric: when
# it moves, max_keys is smaller than the live key set).
#
# Time per decision: one hash, one probe run, O(1) integer arithmetic (the one division, for
# `remaining`, is a multiply by a precomputed reciprocal), 1 (hit) or 8 (insert) sweep slots.
# Growth rehashes the array once per doubling (amortised O(1)). No Python object, no syscall,
# no allocation except growth and keys longer than 40 bytes. Measured on a shared 2-core VM
# (benchmarks/micro_ratelimit.py, decide_c in a C loop): ~30 ns per hit while the table is
# cache-resident, ~80 ns at 100k keys, ~200 ns at 1M keys (a cache and TLB miss per decision);
# filling 1M keys from empty, growth included, ~0.6-0.75 us per insert.
#
# Tally tables (the hybrid store). The same table serves two more uses, both for the store's
# sync with Redis (fastgate/ratelimit/hybrid.py). raise_tat(key, tat) stores max(stored, tat),
# inserting like a decision does (growth, then eviction at max_keys) when the key is absent
# and tat is in the future: how the global debt pulled from Redis reaches the local buckets.
# add_c(key, amount) treats a second RateLimiter as a key -> accumulated amount map (the
# consumption, cost * T microseconds, admitted since the last sync): the slot's tat field is
# the sum, there is no GCRA, no sweep and no eviction. When max_keys keys are already held an
# add for a new key is dropped (`overflowed` counts it): the sync pushes what the tally holds,
# and the dropped consumption stays local (this instance enforced it; the others do not learn
# it: within the overshoot bound only if max_keys covers the keys touched per sync interval).
# drain() returns [(key, amount), ...] and empties the table (back to the initial array).
# add_c allocates only for growth and keys over 40 bytes, like decide_c.
#
# Failure: if a long key's copy or a growth cannot be allocated, the decision is still made
# (as for a key without state) and the table stays as it was (growth failure turns into
# eviction); a limiter never raises from decide_c.

"""GCRA rate limiting per key, in C, with bounded memory.

The arithmetic (int64 microseconds; // is floor division, all operands are integers):

    period_us = floor(period_seconds * 1e6 + 0.5)
    T         = floor(period_us / rate + 0.5)    # emission interval; IEEE double division,
                                                 # then floor; must be >= 1
    tau       = T * burst                        # tolerance; burst = capacity >= 1

    decision for a request of cost c >= 0 at `now`, stored TAT `stored` (absent: any value
    <= now, e.g. 0):
        tat = max(stored, now)
        if c > burst:                            # larger than the bucket: never passes
            allowed = False; after = tat; retry_after = -1
        else:
            new_tat = tat + c * T
            if new_tat - now <= tau:             # the boundary (== tau) is allowed
                allowed = True;  after = new_tat; retry_after = 0;  store new_tat
            else:
                allowed = False; after = tat;     retry_after = new_tat - tau - now  # > 0
        remaining   = max(0, (tau - (after - now)) // T)  # cost-1 requests that pass next
        reset_after = after - now                          # until the bucket is full again

`retry_after` is exact: at now + retry_after the same request passes (if nothing else spent
the bucket meanwhile). Headers in whole seconds should round it up. A denied request stores
nothing. The Redis script does exactly this with now = Redis TIME (seconds * 1e6 +
microseconds), `stored` from GET (nil -> 0) and, when allowed, SET new_tat with an expiry of
ceil(reset_after / 1000) ms (by then the bucket is full and the key may vanish). Lua 5.1
numbers are doubles, exact for integers below 2**53 (Redis TIME in microseconds stays below
that until the year 2255); T must come from the same double expression,
`math.floor(period_us / rate + 0.5)`. `gcra()` below is the reference to test it against.

Worked example: rate = 2 per period = 1 s, burst = 3.  period_us = 1_000_000,
T = floor(1e6 / 2 + 0.5) = 500_000, tau = 1_500_000. One key, times in microseconds:

    now        c  stored     tat        new_tat    allowed  stores     remaining  reset      retry
    0          1  (none: 0)  0          500_000    yes      500_000    2          500_000    0
    0          1  500_000    500_000    1_000_000  yes      1_000_000  1          1_000_000  0
    0          1  1_000_000  1_000_000  1_500_000  yes (1)  1_500_000  0          1_500_000  0
    100_000    1  1_500_000  1_500_000  2_000_000  no       -          0          1_400_000  400_000
    500_000    1  1_500_000  1_500_000  2_000_000  yes      2_000_000  0          1_500_000  0
    1_600_000  2  2_000_000  2_000_000  3_000_000  yes      3_000_000  0          1_400_000  0
    1_600_000  4  3_000_000  3_000_000  -          no (2)   -          0          1_400_000  -1
    9_000_000  1  3_000_000  9_000_000  9_500_000  yes      9_500_000  2          500_000    0

(1) new_tat - now == tau: the boundary passes. (2) cost 4 > burst 3: never.
(Row 4: remaining = (1_500_000 - 1_400_000) // 500_000 = 0; retry = 2_000_000 - 1_500_000 -
100_000. Row 6: 3_000_000 - 1_600_000 = 1_400_000 <= tau. Last row: the bucket refilled.)

T is rounded to a whole microsecond, so the enforced rate is period_us / T: with rate 3/s,
T = 333_333 and the limit is 3.000003/s (one extra request in 92 hours). The relative error is
at most 0.5 / T.
"""

import math
import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport ceil, floor, isfinite, llround
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memmove

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <time.h>

    /* 256-bit per-process key of the table hash, filled from os.urandom at import. */
    static uint64_t fg_rl_key[4] = {
        0x2d358dccaa6c78a5ULL, 0x8bb84b93962eacc9ULL, 0x4b33a62ed433d4a3ULL, 0x4d5a2da51de1aa47ULL
    };

    static inline void fg_rl_mul128(uint64_t a, uint64_t b, uint64_t *lo, uint64_t *hi) {
    #if defined(__SIZEOF_INT128__)
        __uint128_t r = (__uint128_t)a * b;
        *lo = (uint64_t)r;
        *hi = (uint64_t)(r >> 64);
    #else
        uint64_t al = (uint32_t)a, ah = a >> 32, bl = (uint32_t)b, bh = b >> 32;
        uint64_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
        uint64_t mid = (ll >> 32) + (uint32_t)lh + (uint32_t)hl;
        *lo = (mid << 32) | (uint32_t)ll;
        *hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
    #endif
    }

    /* The 128-bit product of a and b, its halves xored: the mixing step. */
    static inline uint64_t fg_rl_fold(uint64_t a, uint64_t b) {
        uint64_t lo, hi;
        fg_rl_mul128(a, b, &lo, &hi);
        return lo ^ hi;
    }

    static inline uint64_t fg_rl_rd8(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8); return v;
    }

    static inline uint64_t fg_rl_rd4(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4); return v;
    }

    /* Keyed hash of n bytes. Up to 16 bytes: two (possibly overlapping) reads that together
       cover every byte, one fold. Longer: one fold per 16-byte block chained through h, then
       the last 16 bytes (overlapping the previous block). The length enters the last fold,
       so overlapping reads of different lengths cannot collide by construction. */
    static inline uint64_t fg_rl_hash(const char *key, size_t n) {
        const unsigned char *p = (const unsigned char *)key;
        const uint64_t *k = fg_rl_key;
        uint64_t h = k[2], a, b, lo, hi;
        if (n <= 16) {
            if (n >= 8) { a = fg_rl_rd8(p); b = fg_rl_rd8(p + n - 8); }
            else if (n >= 4) { a = fg_rl_rd4(p); b = fg_rl_rd4(p + n - 4); }
            else if (n > 0) {
                a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8) | p[n - 1]; b = 0;
            }
            else { a = 0; b = 0; }
        } else {
            size_t i = n;
            while (i > 16) {
                h = fg_rl_fold(fg_rl_rd8(p) ^ k[1], fg_rl_rd8(p + 8) ^ h);
                p += 16; i -= 16;
            }
            a = fg_rl_rd8(p + i - 16); b = fg_rl_rd8(p + i - 8);
        }
        fg_rl_mul128(a ^ k[1], b ^ h, &lo, &hi);
        return fg_rl_fold(lo ^ k[0] ^ (uint64_t)n, hi ^ k[3]);
    }

    static inline uint64_t fg_rl_mulhi(uint64_t a, uint64_t b) {
        uint64_t lo, hi;
        fg_rl_mul128(a, b, &lo, &hi);
        return hi;
    }

    /* Home slot of hash h in a table of cap slots: floor(h * cap / 2**64). */
    static inline size_t fg_rl_home(uint64_t h, size_t cap) {
        uint64_t lo, hi;
        fg_rl_mul128(h, (uint64_t)cap, &lo, &hi);
        return (size_t)hi;
    }

    static inline long long fg_rl_clock_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
    }

    static inline long long fg_rl_clock_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    """
    uint64_t fg_rl_key[4]
    uint64_t fg_rl_hash(const char *key, size_t n) nogil
    size_t fg_rl_home(uint64_t h, size_t cap) nogil
    uint64_t fg_rl_mulhi(uint64_t a, uint64_t b) nogil
    long long fg_rl_clock_us() nogil
    long long fg_rl_clock_ns() nogil

cdef enum:
    LOAD_NUM = 7              # the load never exceeds LOAD_NUM / LOAD_DEN
    LOAD_DEN = 8
    INITIAL_CAP = 16
    SWEEP_HIT = 1             # slots examined by a decision that found its key
    SWEEP_INSERT = 8          # ... by a decision that stored a new key
    EVICT_SAMPLE = 8          # occupied slots looked at, from the home slot, to pick a victim
    LINE = 64

cdef int64_t MAX_US = (<int64_t>1) << 61     # |time|, T and tau stay below: no overflow
cdef uint64_t MAX_KLEN = 0xFFFFFFFFULL
cdef double INF = math.inf
cdef object ZERO = 0.0         # retry_after of every allowed decision, allocated once


cdef _init_key(bytes seed):
    memcpy(fg_rl_key, PyBytes_AS_STRING(seed), 32)


_init_key(os.urandom(32))


cpdef long long monotonic_us() noexcept nogil:
    """CLOCK_MONOTONIC in integer microseconds (the clock of time.monotonic())."""
    return fg_rl_clock_us()


cdef void gcra_params(GcraParams *p, int64_t emission, int64_t burst) noexcept nogil:
    p.emission = emission
    p.burst = burst
    p.tau = emission * burst
    p.inv = 0xFFFFFFFFFFFFFFFFULL // <uint64_t>emission


cdef inline int64_t _div_t(int64_t x, const GcraParams *p) noexcept nogil:
    """floor(x / T) for 0 <= x < 2**63, exactly, without a divide instruction (~40 cycles on
    the hot path otherwise). inv = floor((2**64 - 1) / T) >= 2**64 / T - 1, so
    x * inv / 2**64 > x / T - 1 and q = floor(x * inv / 2**64) is floor(x / T) or one less;
    one comparison fixes it."""
    cdef uint64_t q = fg_rl_mulhi(<uint64_t>x, p.inv)
    if <uint64_t>x - q * <uint64_t>p.emission >= <uint64_t>p.emission:
        q += 1
    return <int64_t>q


cdef int64_t gcra_c(int64_t tat, int64_t now, const GcraParams *p, int64_t cost,
                    Decision *out) noexcept nogil:
    cdef int64_t t = tat if tat > now else now
    cdef int64_t after, new_tat, room
    cdef int64_t stored = tat
    if cost < 0:
        cost = 0
    if cost > p.burst:
        out.allowed = False
        out.retry_after_us = -1
        after = t
    else:
        new_tat = t + cost * p.emission
        if new_tat - now <= p.tau:
            out.allowed = True
            out.retry_after_us = 0
            after = new_tat
            stored = new_tat
        else:
            out.allowed = False
            out.retry_after_us = new_tat - p.tau - now
            after = t
    room = p.tau - (after - now)
    out.remaining = _div_t(room, p) if room > 0 else 0
    out.reset_after_us = after - now
    out.limit = p.burst
    return stored


cdef int64_t _emission(int64_t period_us, double rate) except -1:
    """T = floor(period_us / rate + 0.5), validated (ValueError)."""
    if not (rate > 0.0) or not isfinite(rate):
        raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
    if period_us < 1 or period_us > MAX_US:
        raise ValueError(f"period must be between 1 and 2**61 microseconds, got {period_us} us")
    cdef double x = floor(<double>period_us / rate + 0.5)
    if x < 1.0:
        raise ValueError(
            f"rate {rate!r} per {period_us} us is more than one request per microsecond "
            "(the emission interval period/rate rounds to 0 us)"
        )
    if x >= <double>MAX_US:
        raise ValueError(f"rate {rate!r} per {period_us} us is too slow (T over 2**61 us)")
    return <int64_t>x


cdef int64_t _check_us(object value, str name) except? -1:
    cdef long long v = value
    if v < -MAX_US or v > MAX_US:
        raise ValueError(f"{name} must be within +-2**61 microseconds, got {v}")
    return v


def gcra(long long tat_us, long long now_us, long long period_us, double rate, long long burst,
         long long cost=1):
    """The GCRA arithmetic of the module docstring for one request, without a table.

    tat_us is the stored TAT (0, or anything <= now_us, for a key without state); period_us
    and rate give T = floor(period_us / rate + 0.5); burst >= 1; cost >= 0. Returns
    (allowed, new_tat_us, remaining, reset_after_us, retry_after_us): new_tat_us is what to
    store (tat_us unchanged when denied); retry_after_us is 0 when allowed and -1 when the
    request can never pass (cost > burst). ValueError on out-of-range arguments. The Redis
    script's tests compare against this function.
    """
    cdef Decision d
    _check_us(tat_us, "tat_us")
    _check_us(now_us, "now_us")
    cdef int64_t emission = _emission(period_us, rate)
    if burst < 1 or burst > MAX_US // emission:
        raise ValueError(f"burst must be >= 1 with T * burst <= 2**61 us, got {burst}")
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost}")
    cdef GcraParams p
    gcra_params(&p, emission, burst)
    cdef int64_t stored = gcra_c(tat_us, now_us, &p, cost, &d)
    return (
        True if d.allowed else False, stored, d.remaining, d.reset_after_us, d.retry_after_us
    )


cdef inline const char *_slot_key(Slot *s) noexcept nogil:
    if s.klen > RL_INLINE_KEY:
        return s.key.heap
    return s.key.buf


cdef class RateLimiter:
    """GCRA per key: `rate` requests per `period` seconds, bursts of up to `burst`, at most
    `max_keys` keys stored. See the module docstring for the arithmetic."""

    def __cinit__(self):
        # A usable (if arbitrary) limiter even before __init__ runs, so decide_c never sees
        # a NULL table.
        self.rate = 1.0
        self.period = 1.0
        self.burst = 1
        self.max_keys = 1
        self.emission_us = 1_000_000
        gcra_params(&self._p, 1_000_000, 1)
        self._cap_max = 2
        if self._reset(2) < 0:
            raise MemoryError()

    def __init__(self, double rate, double period=1.0, long long burst=0,
                 Py_ssize_t max_keys=1_000_000):
        if not (period > 0.0) or not isfinite(period) or period * 1e6 > <double>MAX_US:
            raise ValueError(f"period must be a finite number of seconds > 0, got {period!r}")
        cdef int64_t period_us = <int64_t>floor(period * 1e6 + 0.5)
        if period_us < 1:
            raise ValueError(f"period must be at least 1 microsecond, got {period!r}")
        cdef int64_t emission = _emission(period_us, rate)
        if burst == 0:
            burst = <long long>ceil(rate) if rate > 1.0 else 1
        if burst < 1:
            raise ValueError(f"burst must be >= 1 (0 means max(1, ceil(rate))), got {burst}")
        if burst > MAX_US // emission:
            raise ValueError(
                f"burst {burst} with an emission interval of {emission} us exceeds 2**61 us"
            )
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        if max_keys > (<Py_ssize_t>1 << 40):
            raise ValueError(f"max_keys must be <= 2**40, got {max_keys}")
        # ceil(max_keys * 8 / 7) slots keep the load at or under 7/8 when full.
        cdef Py_ssize_t cap_max = (max_keys * LOAD_DEN + LOAD_NUM - 1) // LOAD_NUM
        if cap_max < 2:
            cap_max = 2
        if self._reset(min(<Py_ssize_t>INITIAL_CAP, cap_max)) < 0:
            raise MemoryError()
        self.rate = rate
        self.period = period
        self.burst = burst
        self.max_keys = max_keys
        self.emission_us = emission
        gcra_params(&self._p, emission, burst)
        self.evictions = 0
        self.reclaimed = 0
        self.overflowed = 0
        self._cap_max = cap_max

    def __dealloc__(self):
        self._free_table()

    # -- table ----------------------------------------------------------------------------

    cdef void *_calloc_slots(self, Py_ssize_t cap) noexcept nogil:
        """Zeroed memory for `cap` slots plus alignment slack (NULL when out of memory). Big
        blocks come from fresh mmap'd pages, which the kernel zeroes lazily."""
        return calloc(<size_t>cap * sizeof(Slot) + LINE, 1)

    cdef void _install(self, void *raw, Py_ssize_t cap) noexcept nogil:
        """Make `raw` (from _calloc_slots) the empty array, 64-byte aligned inside it."""
        self._raw = raw
        self._slots = <Slot *>((<uintptr_t>raw + LINE - 1) & ~(<uintptr_t>(LINE - 1)))
        self._cap = cap
        self._count = 0
        self._cursor = 0

    cdef int _reset(self, Py_ssize_t cap) noexcept nogil:
        """Replace the table by an empty one of `cap` slots; -1 (and no change) when out of
        memory."""
        cdef void *raw = self._calloc_slots(cap)
        if raw == NULL:
            return -1
        self._free_table()
        self._install(raw, cap)
        return 0

    cdef void _free_table(self) noexcept nogil:
        cdef Py_ssize_t i
        if self._slots != NULL:
            for i in range(self._cap):
                if self._slots[i].dist != 0 and self._slots[i].klen > RL_INLINE_KEY:
                    free(self._slots[i].key.heap)
        free(self._raw)
        self._raw = NULL
        self._slots = NULL
        self._cap = 0
        self._count = 0
        self._cursor = 0
        self._heap_bytes = 0

    cdef Py_ssize_t _find(self, uint64_t h, const char *key, Py_ssize_t klen) noexcept nogil:
        cdef Slot *slots = self._slots
        cdef Py_ssize_t cap = self._cap
        cdef Py_ssize_t pos = <Py_ssize_t>fg_rl_home(h, <size_t>cap)
        cdef uint32_t d = 1
        cdef Slot *s
        while True:
            s = &slots[pos]
            if s.dist < d:
                return -1
            if s.hash == h and s.klen == klen and memcmp(_slot_key(s), key, klen) == 0:
                return pos
            d += 1
            pos += 1
            if pos == cap:
                pos = 0

    cdef void _place(self, Slot cur) noexcept nogil:
        """Robin hood insertion of a slot known to be absent (needs one empty slot).

        A robin hood table is sorted by home slot (cyclically): the new slot goes before the
        first resident whose home is later than its own (dist < ours at that point), and the
        run from there to the next empty slot moves right by one. Same result as swapping
        down the run, but one memmove instead of a 64-byte swap per slot."""
        cdef Slot *slots = self._slots
        cdef Py_ssize_t cap = self._cap
        cdef Py_ssize_t pos = <Py_ssize_t>fg_rl_home(cur.hash, <size_t>cap)
        cdef Py_ssize_t end, i
        cdef uint32_t d = 1
        while slots[pos].dist >= d:
            d += 1
            pos += 1
            if pos == cap:
                pos = 0
        if slots[pos].dist != 0:
            end = pos + 1
            if end == cap:
                end = 0
            while slots[end].dist != 0:
                end += 1
                if end == cap:
                    end = 0
            # Move [pos, end) to [pos + 1, end + 1), cyclically; each moved slot is one
            # further from home.
            if end > pos:
                memmove(&slots[pos + 1], &slots[pos], <size_t>(end - pos) * sizeof(Slot))
                for i in range(pos + 1, end + 1):
                    slots[i].dist += 1
            else:
                memmove(&slots[1], &slots[0], <size_t>end * sizeof(Slot))
                slots[0] = slots[cap - 1]
                memmove(&slots[pos + 1], &slots[pos], <size_t>(cap - 1 - pos) * sizeof(Slot))
                for i in range(0, end + 1):
                    slots[i].dist += 1
                for i in range(pos + 1, cap):
                    slots[i].dist += 1
        cur.dist = d
        slots[pos] = cur
        self._count += 1

    cdef void _delete(self, Py_ssize_t pos) noexcept nogil:
        """Remove the slot at pos; the run after it (up to an empty slot or one at its home)
        moves back by one (backward shift: no tombstones, probe lengths never rot)."""
        cdef Slot *slots = self._slots
        cdef Py_ssize_t cap = self._cap
        cdef Py_ssize_t end, i
        if slots[pos].klen > RL_INLINE_KEY:
            free(slots[pos].key.heap)
            self._heap_bytes -= slots[pos].klen
        end = pos + 1
        if end == cap:
            end = 0
        while slots[end].dist > 1:
            end += 1
            if end == cap:
                end = 0
        # Move (pos, end) to [pos, end - 1), cyclically; slot end - 1 becomes empty.
        if end > pos:
            memmove(&slots[pos], &slots[pos + 1], <size_t>(end - pos - 1) * sizeof(Slot))
            for i in range(pos, end - 1):
                slots[i].dist -= 1
            slots[end - 1].dist = 0
        else:
            memmove(&slots[pos], &slots[pos + 1], <size_t>(cap - 1 - pos) * sizeof(Slot))
            for i in range(pos, cap - 1):
                slots[i].dist -= 1
            if end == 0:
                slots[cap - 1].dist = 0
            else:
                slots[cap - 1] = slots[0]
                slots[cap - 1].dist -= 1
                memmove(&slots[0], &slots[1], <size_t>(end - 1) * sizeof(Slot))
                for i in range(0, end - 1):
                    slots[i].dist -= 1
                slots[end - 1].dist = 0
        self._count -= 1

    cdef int _grow(self) noexcept nogil:
        """Double the array (up to cap_max) and rehash; -1 when that cannot be allocated."""
        cdef Py_ssize_t new_cap = self._cap * 2
        if new_cap > self._cap_max:
            new_cap = self._cap_max
        if new_cap <= self._cap:
            return -1
        cdef void *raw = self._calloc_slots(new_cap)
        if raw == NULL:
            return -1
        cdef void *old_raw = self._raw
        cdef Slot *old = self._slots
        cdef Py_ssize_t old_cap = self._cap, i
        cdef Py_ssize_t cursor = self._cursor
        self._install(raw, new_cap)
        # _place counts the slots again; long keys move with their slots (heap bytes unchanged).
        for i in range(old_cap):
            if old[i].dist != 0:
                self._place(old[i])
        # fastrange keeps hash order, so the same fraction of the table is still swept.
        self._cursor = <Py_ssize_t>(<double>cursor * new_cap / old_cap)
        if self._cursor >= new_cap:
            self._cursor = 0
        free(old_raw)
        return 0

    cdef void _evict(self, uint64_t h, int64_t now) noexcept nogil:
        """Make room for one key whose hash is h: drop the first full bucket among the first
        EVICT_SAMPLE occupied slots from h's home, else the oldest TAT among them."""
        cdef Slot *slots = self._slots
        cdef Py_ssize_t cap = self._cap
        cdef Py_ssize_t pos = <Py_ssize_t>fg_rl_home(h, <size_t>cap)
        cdef Py_ssize_t victim = -1, seen = 0, scanned = 0
        while seen < EVICT_SAMPLE and scanned < cap:
            if slots[pos].dist != 0:
                if slots[pos].tat <= now:
                    victim = pos
                    break
                if victim < 0 or slots[pos].tat < slots[victim].tat:
                    victim = pos
                seen += 1
            scanned += 1
            pos += 1
            if pos == cap:
                pos = 0
        if victim < 0:
            return
        if slots[victim].tat <= now:
            self.reclaimed += 1
        else:
            self.evictions += 1
        self._delete(victim)

    cdef void _sweep(self, int64_t now, int steps) noexcept nogil:
        """Examine `steps` slots at the cursor; delete full buckets (TAT <= now)."""
        cdef Slot *slots = self._slots
        cdef Py_ssize_t cap = self._cap
        cdef Py_ssize_t pos = self._cursor
        cdef int i
        for i in range(steps):
            if slots[pos].dist != 0 and slots[pos].tat <= now:
                self._delete(pos)       # the next slot may have moved into pos: look again
                self.reclaimed += 1
            else:
                pos += 1
                if pos == cap:
                    pos = 0
        self._cursor = pos

    cdef void _insert(self, uint64_t h, const char *key, Py_ssize_t klen, int64_t tat,
                      int64_t now) noexcept nogil:
        cdef Slot cur
        if self._count >= self.max_keys:
            self._evict(h, now)
        elif (self._count + 1) * LOAD_DEN > self._cap * LOAD_NUM and self._grow() < 0:
            self._evict(h, now)
        if self._count >= self.max_keys or self._count + 2 > self._cap:
            return  # defensive: eviction always frees a slot when max_keys >= 1
        cur.hash = h
        cur.tat = tat
        cur.klen = <uint32_t>klen
        cur.dist = 1
        if klen > RL_INLINE_KEY:
            cur.key.heap = <char *>malloc(<size_t>klen)
            if cur.key.heap == NULL:
                return
            memcpy(cur.key.heap, key, <size_t>klen)
            self._heap_bytes += klen
        else:
            memcpy(cur.key.buf, key, <size_t>klen)
        self._place(cur)

    # -- decisions ------------------------------------------------------------------------

    cdef bint decide_c(self, const char *key, Py_ssize_t klen, long long now_us, int cost,
                       Decision *out) noexcept:
        cdef uint64_t h
        cdef Py_ssize_t pos
        cdef int64_t new_tat
        if klen < 0 or <uint64_t>klen > MAX_KLEN:
            out.allowed = False
            out.remaining = 0
            out.reset_after_us = 0
            out.retry_after_us = -1
            out.limit = self.burst
            return False
        h = fg_rl_hash(key, <size_t>klen)
        pos = self._find(h, key, klen)
        if pos >= 0:
            self._slots[pos].tat = gcra_c(self._slots[pos].tat, now_us, &self._p, cost, out)
            self._sweep(now_us, SWEEP_HIT)
        else:
            new_tat = gcra_c(now_us, now_us, &self._p, cost, out)
            if new_tat > now_us:       # allowed and spent something: the bucket has state
                self._insert(h, key, klen, new_tat, now_us)
                self._sweep(now_us, SWEEP_INSERT)
        return out.allowed

    # -- tallies and sync (the hybrid store) ----------------------------------------------

    cpdef raise_tat(self, bytes key, long long tat_us):
        """Store max(stored TAT, tat_us) for `key`; insert it (growth or eviction as for a
        decision) when absent and tat_us is after now."""
        cdef const char *k = PyBytes_AS_STRING(key)
        cdef Py_ssize_t klen = PyBytes_GET_SIZE(key)
        cdef uint64_t h
        cdef Py_ssize_t pos
        cdef int64_t now
        if <uint64_t>klen > MAX_KLEN:
            raise ValueError("key is longer than 2**32 - 1 bytes")
        if tat_us > MAX_US or tat_us < -MAX_US:
            raise ValueError(f"tat must be within +-2**61 microseconds, got {tat_us}")
        h = fg_rl_hash(k, <size_t>klen)
        pos = self._find(h, k, klen)
        if pos >= 0:
            if self._slots[pos].tat < tat_us:
                self._slots[pos].tat = tat_us
            return
        now = fg_rl_clock_us()
        if tat_us > now:
            self._insert(h, k, klen, tat_us, now)
            self._sweep(now, SWEEP_INSERT)

    cdef void add_c(self, const char *key, Py_ssize_t klen, long long amount) noexcept:
        cdef uint64_t h
        cdef Py_ssize_t pos
        if klen < 0 or <uint64_t>klen > MAX_KLEN:
            return
        h = fg_rl_hash(key, <size_t>klen)
        pos = self._find(h, key, klen)
        if pos >= 0:
            self._slots[pos].tat += amount
            return
        if self._count >= self.max_keys:
            self.overflowed += 1
            return
        # now = -MAX_US: should a growth fail, _evict sees no slot as "full" and drops the
        # smallest tally of its sample.
        self._insert(h, key, klen, amount, -MAX_US)

    def add(self, bytes key not None, long long amount):
        """Tally: add `amount` to `key`'s sum (see add_c)."""
        if <uint64_t>PyBytes_GET_SIZE(key) > MAX_KLEN:
            raise ValueError("key is longer than 2**32 - 1 bytes")
        self.add_c(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), amount)

    def tat(self, bytes key not None):
        """The stored TAT (tally: the sum) of `key`, or None when it holds no slot."""
        cdef uint64_t h = fg_rl_hash(PyBytes_AS_STRING(key), <size_t>PyBytes_GET_SIZE(key))
        cdef Py_ssize_t pos = self._find(h, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        return self._slots[pos].tat if pos >= 0 else None

    def drain(self):
        """Tally: [(key, sum), ...] of every key held, and empty the table."""
        cdef Py_ssize_t i
        cdef Slot *s
        out = []
        if self._count == 0:
            return out
        for i in range(self._cap):
            s = &self._slots[i]
            if s.dist != 0:
                out.append((PyBytes_FromStringAndSize(_slot_key(s), s.klen), s.tat))
        if self._reset(min(<Py_ssize_t>INITIAL_CAP, self._cap_max)) < 0:
            raise MemoryError()
        return out

    def decide(self, bytes key not None, int cost=1, now=None):
        """One decision for `key` (bytes) of `cost` (>= 0) at `now` (seconds of the monotonic
        clock; None reads it). Returns (allowed, remaining, reset_after, retry_after) with the
        times in seconds: retry_after is 0.0 when allowed and inf when cost > burst."""
        cdef Decision d
        cdef long long now_us
        if cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        if now is None:
            now_us = fg_rl_clock_us()
        else:
            now_us = _seconds_to_us(now)
        if <uint64_t>PyBytes_GET_SIZE(key) > MAX_KLEN:
            raise ValueError("key is longer than 2**32 - 1 bytes")
        self.decide_c(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), now_us, cost, &d)
        if d.allowed:
            return (True, d.remaining, d.reset_after_us / 1e6, ZERO)
        return (
            False,
            d.remaining,
            d.reset_after_us / 1e6,
            d.retry_after_us / 1e6 if d.retry_after_us >= 0 else INF,
        )

    def __len__(self):
        return self._count

    def memory_bytes(self):
        """Bytes the table has allocated: the slot array (with its alignment slack) and the
        copies of keys longer than 40 bytes (malloc's own headers not counted)."""
        return self._cap * <Py_ssize_t>sizeof(Slot) + LINE + self._heap_bytes

    def clear(self):
        """Forget every key (all buckets full again) and shrink to the initial array."""
        if self._reset(min(<Py_ssize_t>INITIAL_CAP, self._cap_max)) < 0:
            raise MemoryError()

    def _probe_stats(self):
        """(keys, slots, mean probe length, longest probe): a diagnostic for tests."""
        cdef Py_ssize_t i
        cdef uint64_t total = 0, longest = 0
        for i in range(self._cap):
            if self._slots[i].dist != 0:
                total += self._slots[i].dist
                if self._slots[i].dist > longest:
                    longest = self._slots[i].dist
        return self._count, self._cap, <double>total / self._count if self._count else 0.0, longest

    def _check(self):
        """Verify the table's invariants (raise AssertionError naming the broken one): each
        slot's dist is its distance from home + 1, dists grow by at most 1 along a run (sorted
        by home), every stored key is found where it is, count and long-key bytes add up."""
        cdef Py_ssize_t i, home, count = 0, heap = 0
        cdef Slot *s
        for i in range(self._cap):
            s = &self._slots[i]
            if s.dist == 0:
                continue
            count += 1
            if s.klen > RL_INLINE_KEY:
                heap += s.klen
            home = <Py_ssize_t>fg_rl_home(s.hash, <size_t>self._cap)
            if s.dist != (i - home + self._cap) % self._cap + 1:
                raise AssertionError(f"slot {i}: dist {s.dist}, home {home}")
            if s.dist > 1 and self._slots[(i - 1 + self._cap) % self._cap].dist + 1 < s.dist:
                raise AssertionError(f"slot {i}: dist {s.dist} after a shorter run")
            if s.hash != fg_rl_hash(_slot_key(s), s.klen):
                raise AssertionError(f"slot {i}: stale hash")
            if self._find(s.hash, _slot_key(s), s.klen) != i:
                raise AssertionError(f"slot {i}: key not found at its slot")
        if count != self._count or heap != self._heap_bytes:
            raise AssertionError(f"count {count}/{self._count}, heap {heap}/{self._heap_bytes}")
        if self._count > self.max_keys or self._cap > self._cap_max:
            raise AssertionError("over the bound")

    def __repr__(self):
        return (
            f"RateLimiter(rate={self.rate!r}, period={self.period!r}, burst={self.burst}, "
            f"max_keys={self.max_keys}) with {self._count} keys"
        )


cdef long long _seconds_to_us(object now) except? -1:
    cdef double s = now
    if not isfinite(s) or s * 1e6 > <double>MAX_US or s * 1e6 < -<double>MAX_US:
        raise ValueError(f"now must be finite seconds within +-2**61 us, got {now!r}")
    return llround(s * 1e6)


def _bench(Py_ssize_t n, Py_ssize_t nkeys, RateLimiter limiter=None, long long step_us=1):
    """Time n calls of decide_c in a C loop over nkeys preset keys ("10.a.b.c", cycled), the
    clock advancing step_us per call from monotonic_us(). Returns elapsed nanoseconds."""
    if n < 0 or nkeys < 1 or nkeys > (1 << 24):
        raise ValueError("need n >= 0 and 1 <= nkeys <= 2**24")
    if limiter is None:
        limiter = RateLimiter(1000.0)
    cdef char *keys = <char *>malloc(<size_t>nkeys * 16)
    cdef unsigned char *lens = <unsigned char *>malloc(<size_t>nkeys)
    if keys == NULL or lens == NULL:
        free(keys)
        free(lens)
        raise MemoryError()
    cdef Py_ssize_t i, k = 0
    cdef Decision d
    for i in range(nkeys):
        lens[i] = <unsigned char>_format_ip(keys + i * 16, i)
    cdef long long now = fg_rl_clock_us()
    cdef long long t0 = fg_rl_clock_ns()
    for i in range(n):
        limiter.decide_c(keys + k * 16, lens[k], now, 1, &d)
        now += step_us
        k += 1
        if k == nkeys:
            k = 0
    cdef long long t1 = fg_rl_clock_ns()
    free(keys)
    free(lens)
    return t1 - t0


cdef int _format_ip(char *out, Py_ssize_t i) noexcept nogil:
    """Write "10.a.b.c" for i < 2**24 into out; return its length."""
    cdef int n = 0, part, shift, v
    out[0] = b'1'
    out[1] = b'0'
    n = 2
    for shift in range(16, -8, -8):
        out[n] = b'.'
        n += 1
        part = (i >> shift) & 255
        if part >= 100:
            out[n] = <char>(48 + part // 100)
            n += 1
        if part >= 10:
            out[n] = <char>(48 + (part // 10) % 10)
            n += 1
        out[n] = <char>(48 + part % 10)
        n += 1
    return n
