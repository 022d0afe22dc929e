"""GCRA rate limiting per key (one theoretical arrival time per key, int64 microseconds) in a C
hash table with bounded memory. The exact arithmetic, shared with the Redis script, is in the
module docstring of ratelimit.pyx: T = floor(period_us / rate + 0.5), tau = T * burst; a
request of cost c at now passes iff max(tat, now) + c*T - now <= tau, and then stores that
value as the new TAT. A key whose bucket is full (TAT <= now) carries no state: it is not
stored, and it is the first to be reclaimed or evicted.
"""

def monotonic_us() -> int:
    """CLOCK_MONOTONIC in integer microseconds (the clock of time.monotonic())."""

def gcra(
    tat_us: int, now_us: int, period_us: int, rate: float, burst: int, cost: int = 1
) -> tuple[bool, int, int, int, int]:
    """One GCRA decision without a table: the reference for the Redis script.

    tat_us: stored TAT (0, or anything <= now_us, for a key without state). Returns
    (allowed, new_tat_us, remaining, reset_after_us, retry_after_us): new_tat_us is the value
    to store (tat_us unchanged when denied); remaining counts cost-1 requests that would pass
    next; reset_after_us is the time until the bucket is full again; retry_after_us is 0 when
    allowed, the exact wait when denied, -1 when cost > burst (never). ValueError when rate or
    period_us give T < 1 or T * burst > 2**61, burst < 1, cost < 0, or a time is beyond
    +-2**61.
    """

class RateLimiter:
    """`rate` requests per `period` seconds per key, bursts up to `burst` (0: max(1,
    ceil(rate))), at most `max_keys` keys stored (64 bytes a slot, load <= 7/8: about 73 bytes
    per key when full, plus copies of keys longer than 40 bytes). ValueError on a bad argument
    (rate or period not finite and > 0, burst < 0, max_keys < 1, T < 1 us).

    Not thread-safe (one per worker event loop). `now` values must not decrease.
    """

    rate: float
    period: float
    burst: int
    max_keys: int
    emission_us: int
    evictions: int
    """Buckets with state dropped because max_keys keys were stored (each may let that key
    through up to `burst` extra requests). Non-zero means max_keys is too small."""
    reclaimed: int
    """Full buckets removed by the sweep or by eviction (harmless)."""
    overflowed: int
    """Tally use: add() calls for a new key dropped because max_keys keys were held."""

    def __init__(
        self, rate: float, period: float = 1.0, burst: int = 0, max_keys: int = 1_000_000
    ) -> None: ...
    def decide(
        self, key: bytes, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float, float]:
        """(allowed, remaining, reset_after, retry_after) for `cost` (>= 0) units of `key` at
        `now` (seconds of the monotonic clock, rounded to the microsecond; None reads it).
        retry_after is 0.0 when allowed and inf when cost > burst. ValueError for cost < 0 or
        a non-finite now."""
    def __len__(self) -> int:
        """Keys stored (buckets that may carry state)."""
    def memory_bytes(self) -> int:
        """Bytes allocated by the table: the slot array and the long keys' copies."""
    def clear(self) -> None:
        """Forget every key and return to the initial 16-slot array."""
    def raise_tat(self, key: bytes, tat_us: int) -> None:
        """Store max(stored TAT, tat_us) for `key` (inserted, with eviction at max_keys, when
        absent and tat_us is after now). The hybrid store's sync."""
    def tat(self, key: bytes) -> int | None:
        """The stored TAT (tally: the sum) of `key`, or None when it holds no slot."""
    def add(self, key: bytes, amount: int) -> None:
        """Tally use: add `amount` to `key`'s sum (dropped, and counted in `overflowed`, for a
        new key when max_keys keys are held)."""
    def drain(self) -> list[tuple[bytes, int]]:
        """Tally use: every (key, sum) held; the table is emptied."""
    def _check(self) -> None:
        """Raise AssertionError if a table invariant is broken (tests only; O(capacity))."""
    def _probe_stats(self) -> tuple[int, int, float, int]:
        """(keys, slots, mean probe length, longest probe) (benchmarks and tests)."""

def _bench(n: int, nkeys: int, limiter: RateLimiter | None = None, step_us: int = 1) -> int:
    """Nanoseconds for n decide_c calls in a C loop over nkeys keys "10.a.b.c" (cycled), the
    clock advancing step_us per call. For benchmarks/micro_ratelimit.py."""
