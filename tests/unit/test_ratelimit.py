"""Rate limiter tests: the GCRA arithmetic (`gcra`, the Redis script's reference) against
hand-computed cases, RateLimiter over simulated time, the table's bounds (max_keys, eviction,
reclaiming), and property tests against the naive GCRA oracle below."""

from __future__ import annotations

import importlib.machinery
import math
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core import ratelimit as ratelimit_module
from fastgate._core.ratelimit import RateLimiter, _bench, gcra, monotonic_us

SLOT = 64  # bytes per table slot
INLINE = 40  # longest key stored inside its slot

# ---------------------------------------------------------------------------------------------
# The oracle: GCRA from the module docstring, as plainly as possible, with a dict of TATs.


class NaiveGcra:
    def __init__(self, rate: float, period: float, burst: int) -> None:
        period_us = math.floor(period * 1e6 + 0.5)
        self.T = math.floor(period_us / rate + 0.5)
        self.burst = burst
        self.tau = self.T * burst
        self.tat: dict[bytes, int] = {}

    def decide_us(self, key: bytes, cost: int, now: int) -> tuple[bool, int, int, int]:
        """(allowed, remaining, reset_after_us, retry_after_us); retry -1 = never."""
        tat = max(self.tat.get(key, now), now)
        if cost > self.burst:
            allowed, after, retry = False, tat, -1
        elif tat + cost * self.T - now <= self.tau:
            allowed, after, retry = True, tat + cost * self.T, 0
            self.tat[key] = after
        else:
            allowed, after, retry = False, tat, tat + cost * self.T - self.tau - now
        remaining = max(0, (self.tau - (after - now)) // self.T)
        return allowed, remaining, after - now, retry

    def decide(self, key: bytes, cost: int, now: int) -> tuple[bool, int, float, float]:
        allowed, remaining, reset, retry = self.decide_us(key, cost, now)
        return allowed, remaining, reset / 1e6, retry / 1e6 if retry >= 0 else math.inf


def cap_max(max_keys: int) -> int:
    return max(2, -(-max_keys * 8 // 7))


# ---------------------------------------------------------------------------------------------
# gcra(): hand-computed cases. Unless a row says otherwise: period 1 s, rate 2, burst 3, so
# T = 500_000 us and tau = 1_500_000 us; now = 10 s.

NOW = 10_000_000
P, R, B = 1_000_000, 2.0, 3

GCRA_CASES = [
    pytest.param(0, NOW, P, R, B, 1, (True, 10_500_000, 2, 500_000, 0), id="fresh key"),
    pytest.param(
        9_000_000, NOW, P, R, B, 1, (True, 10_500_000, 2, 500_000, 0), id="past TAT = fresh"
    ),
    pytest.param(
        NOW + 500_000, NOW, P, R, B, 1, (True, 11_000_000, 1, 1_000_000, 0), id="second cell"
    ),
    pytest.param(
        NOW + 1_000_000,
        NOW,
        P,
        R,
        B,
        1,
        (True, 11_500_000, 0, 1_500_000, 0),
        id="boundary new_tat - now == tau is allowed",
    ),
    pytest.param(
        NOW + 1_500_000,
        NOW,
        P,
        R,
        B,
        1,
        (False, 11_500_000, 0, 1_500_000, 500_000),
        id="burst exhausted: denied, retry T",
    ),
    pytest.param(
        NOW + 1_000_001,
        NOW,
        P,
        R,
        B,
        1,
        (False, 11_000_001, 0, 1_000_001, 1),
        id="one microsecond past the boundary: retry 1 us",
    ),
    pytest.param(
        11_500_000, 10_500_000, P, R, B, 1, (True, 12_000_000, 0, 1_500_000, 0), id="refill after T"
    ),
    pytest.param(
        11_500_000,
        10_250_000,
        P,
        R,
        B,
        1,
        (False, 11_500_000, 0, 1_250_000, 250_000),
        id="half a T later: retry the other half",
    ),
    pytest.param(0, NOW, P, R, B, 2, (True, 11_000_000, 1, 1_000_000, 0), id="cost 2 from full"),
    pytest.param(
        0, NOW, P, R, B, 3, (True, 11_500_000, 0, 1_500_000, 0), id="cost == burst from full"
    ),
    pytest.param(
        NOW + 1_000_000,
        NOW,
        P,
        R,
        B,
        2,
        (False, 11_000_000, 1, 1_000_000, 500_000),
        id="cost 2 with one cell left: denied, remaining 1",
    ),
    pytest.param(0, NOW, P, R, B, 4, (False, 0, 3, 0, -1), id="cost > burst: never, from full"),
    pytest.param(
        NOW + 1_400_000,
        NOW,
        P,
        R,
        B,
        7,
        (False, 11_400_000, 0, 1_400_000, -1),
        id="cost > burst: never, when spent",
    ),
    pytest.param(
        NOW + 1_000_000, NOW, P, R, B, 0, (True, 11_000_000, 1, 1_000_000, 0), id="cost 0 peeks"
    ),
    pytest.param(0, NOW, P, R, B, 0, (True, NOW, 3, 0, 0), id="cost 0 on a full bucket"),
    pytest.param(
        NOW + 5_000_000,
        NOW,
        P,
        R,
        B,
        1,
        (False, 15_000_000, 0, 5_000_000, 4_000_000),
        id="TAT beyond tau (burst lowered): remaining clamps to 0",
    ),
    pytest.param(
        0, NOW, P, 0.5, 1, 1, (True, 12_000_000, 0, 2_000_000, 0), id="rate 0.5/s: T = 2 s"
    ),
    pytest.param(
        12_000_000,
        11_000_000,
        P,
        0.5,
        1,
        1,
        (False, 12_000_000, 0, 1_000_000, 1_000_000),
        id="rate 0.5/s: 1 s later retry 1 s",
    ),
    pytest.param(
        0, NOW, P, 3.0, 3, 1, (True, 10_333_333, 2, 333_333, 0), id="rate 3/s: T rounds to 333333"
    ),
    pytest.param(0, 100, 5, 2.0, 1, 1, (True, 103, 0, 3, 0), id="T = 2.5 rounds half up to 3"),
    pytest.param(0, 100, 5, 3.0, 1, 1, (True, 102, 0, 2, 0), id="T = 1.67 rounds to 2"),
    pytest.param(0, 100, P, 1e6, 1, 1, (True, 101, 0, 1, 0), id="1e6/s: T = 1 us"),
    pytest.param(
        0,
        NOW,
        3_600_000_000,
        100.0,
        100,
        1,
        (True, 46_000_000, 99, 36_000_000, 0),
        id="100 per hour: T = 36 s",
    ),
    pytest.param(
        -(2**61),
        -5_000_000,
        P,
        R,
        B,
        1,
        (True, -4_500_000, 2, 500_000, 0),
        id="negative clock: fresh key is any TAT <= now",
    ),
    pytest.param(
        0,
        -5_000_000,
        P,
        R,
        B,
        1,
        (False, 0, 0, 5_000_000, 4_000_000),
        id="negative clock: TAT 0 is in the future",
    ),
]


@pytest.mark.parametrize(("tat", "now", "period_us", "rate", "burst", "cost", "want"), GCRA_CASES)
def test_gcra_hand_computed(tat, now, period_us, rate, burst, cost, want) -> None:
    got = gcra(tat, now, period_us, rate, burst, cost)
    assert got == want
    assert [type(v) for v in got] == [bool, int, int, int, int]


# The worked example of the module docstring, one row per step: (now, cost, expected result).
WORKED_EXAMPLE = [
    (0, 1, (True, 500_000, 2, 500_000, 0)),
    (0, 1, (True, 1_000_000, 1, 1_000_000, 0)),
    (0, 1, (True, 1_500_000, 0, 1_500_000, 0)),
    (100_000, 1, (False, 1_500_000, 0, 1_400_000, 400_000)),
    (500_000, 1, (True, 2_000_000, 0, 1_500_000, 0)),
    (1_600_000, 2, (True, 3_000_000, 0, 1_400_000, 0)),
    (1_600_000, 4, (False, 3_000_000, 0, 1_400_000, -1)),
    (9_000_000, 1, (True, 9_500_000, 2, 500_000, 0)),
]


def test_gcra_worked_example_from_the_docstring() -> None:
    assert "yes (1)  1_500_000" in ratelimit_module.__doc__
    tat = 0
    for now, cost, want in WORKED_EXAMPLE:
        got = gcra(tat, now, 1_000_000, 2.0, 3, cost)
        assert got == want, (now, cost)
        tat = got[1]


def test_limiter_replays_the_worked_example() -> None:
    rl = RateLimiter(2.0, 1.0, 3)
    for now, cost, (allowed, _tat, remaining, reset, retry) in WORKED_EXAMPLE:
        want_retry = retry / 1e6 if retry >= 0 else math.inf
        assert rl.decide(b"k", cost, now / 1e6) == (allowed, remaining, reset / 1e6, want_retry)


GCRA_ERRORS = [
    pytest.param(dict(rate=0.0), "rate must be", id="rate 0"),
    pytest.param(dict(rate=-1.0), "rate must be", id="rate negative"),
    pytest.param(dict(rate=math.nan), "rate must be", id="rate nan"),
    pytest.param(dict(rate=math.inf), "rate must be", id="rate inf"),
    pytest.param(dict(period_us=0), "period must be", id="period 0"),
    pytest.param(dict(period_us=1, rate=3.0), "more than one request per microsecond", id="T 0"),
    pytest.param(dict(period_us=2**61, rate=0.5), "too slow", id="T over 2**61"),
    pytest.param(dict(burst=0), "burst must be", id="burst 0"),
    pytest.param(dict(period_us=2**60, rate=1.0, burst=4), "burst must be", id="tau overflow"),
    pytest.param(dict(cost=-1), "cost must be", id="cost negative"),
    pytest.param(dict(now_us=2**61 + 1), "now_us must be", id="now beyond 2**61"),
    pytest.param(dict(tat_us=-(2**61) - 1), "tat_us must be", id="tat beyond -2**61"),
]


@pytest.mark.parametrize(("override", "message"), GCRA_ERRORS)
def test_gcra_errors(override, message) -> None:
    args = dict(tat_us=0, now_us=0, period_us=P, rate=R, burst=B, cost=1) | override
    with pytest.raises(ValueError, match=message):
        gcra(**args)


# ---------------------------------------------------------------------------------------------
# RateLimiter over simulated time.


@pytest.mark.parametrize(
    ("rate", "period", "burst"),
    [
        pytest.param(10.0, 1.0, 10, id="10/s burst 10"),
        pytest.param(2.0, 1.0, 5, id="2/s burst 5"),
        pytest.param(0.5, 1.0, 1, id="0.5/s burst 1"),
        pytest.param(100.0, 60.0, 7, id="100/min burst 7"),
        pytest.param(1.0, 1.0, 1, id="1/s burst 1"),
    ],
)
def test_burst_allows_exactly_burst(rate, period, burst) -> None:
    rl = RateLimiter(rate, period, burst)
    results = [rl.decide(b"client", 1, 5.0) for _ in range(burst + 5)]
    assert [r[0] for r in results] == [True] * burst + [False] * 5
    assert [r[1] for r in results] == [*range(burst - 1, -1, -1), 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("rate", "period", "burst"),
    [
        pytest.param(1.0, 1.0, 1, id="1/s"),
        pytest.param(3.0, 1.0, 3, id="3/s (T rounded)"),
        pytest.param(10.0, 1.0, 5, id="10/s burst 5"),
        pytest.param(100.0, 1.0, 1, id="100/s burst 1"),
        pytest.param(0.5, 1.0, 1, id="0.5/s"),
        pytest.param(50.0, 2.0, 10, id="50 per 2 s"),
        pytest.param(7.0, 1.0, 20, id="7/s burst 20"),
    ],
)
def test_steady_rate_over_ten_seconds(rate, period, burst) -> None:
    rl = RateLimiter(rate, period, burst)
    admitted = sum(rl.decide(b"k", 1, 100 + ms / 1000)[0] for ms in range(10_001))
    assert abs(admitted - (burst + rate * 10 / period)) <= 1


@pytest.mark.parametrize(
    ("rate", "burst", "want"),
    [
        pytest.param(2.5, 0, 3, id="ceil(rate)"),
        pytest.param(0.5, 0, 1, id="at least 1"),
        pytest.param(10.0, 0, 10, id="integral rate"),
        pytest.param(10.0, 4, 4, id="explicit"),
    ],
)
def test_default_burst(rate, burst, want) -> None:
    assert RateLimiter(rate, burst=burst).burst == want


def test_attributes_are_read_only() -> None:
    rl = RateLimiter(4.0, 2.0, 3, max_keys=50)
    assert (rl.rate, rl.period, rl.burst, rl.max_keys) == (4.0, 2.0, 3, 50)
    assert rl.emission_us == 500_000
    assert (rl.evictions, rl.reclaimed) == (0, 0)
    with pytest.raises(AttributeError):
        rl.burst = 9
    assert repr(rl) == "RateLimiter(rate=4.0, period=2.0, burst=3, max_keys=50) with 0 keys"


def test_decision_values_and_types() -> None:
    rl = RateLimiter(2.0, 1.0, 2)
    first = rl.decide(b"k", 1, 1.0)
    assert first == (True, 1, 0.5, 0.0)
    assert [type(v) for v in first] == [bool, int, float, float]
    assert rl.decide(b"k", 1, 1.0) == (True, 0, 1.0, 0.0)
    assert rl.decide(b"k", 1, 1.0) == (False, 0, 1.0, 0.5)
    assert rl.decide(b"k", 1, 1.25) == (False, 0, 0.75, 0.25)
    assert rl.decide(b"k", 3, 1.25) == (False, 0, 0.75, math.inf)
    assert rl.decide(b"k", 0, 1.25) == (True, 0, 0.75, 0.0)


def test_now_is_rounded_to_the_microsecond() -> None:
    rl = RateLimiter(1e6, 1.0, 1)  # T = 1 us
    assert rl.decide(b"k", 1, 0.0)[0] is True
    assert rl.decide(b"k", 1, 0.0000004) == (False, 0, 1e-6, 1e-6)  # 0.4 us -> 0
    assert rl.decide(b"k", 1, 0.0000006)[0] is True  # 0.6 us -> 1


def test_keys_are_independent() -> None:
    rl = RateLimiter(1.0, 1.0, 2)
    assert [rl.decide(b"a", 1, 0.0)[0] for _ in range(3)] == [True, True, False]
    assert rl.decide(b"b", 1, 0.0) == (True, 1, 1.0, 0.0)
    assert rl.decide(b"a", 1, 0.0)[0] is False
    assert len(rl) == 2


TRICKY_KEYS = [
    b"",
    b"\x00",
    b"\x00\x00",
    b"a",
    b"a\x00",
    b"\x00a",
    b"10.0.0.1",
    b"2001:db8:85a3:8d3::/64",
    b"x" * 15,
    b"x" * 16,
    b"x" * 17,
    b"k" * INLINE,
    b"k" * (INLINE - 1) + b"\x00",
    b"k" * (INLINE + 1),
    b"k" * INLINE + b"\x00",
    b"k" * 1000,
    b"k" * 999 + b"j",
    b"j" + b"k" * 999,
    bytes(range(256)),
    bytes(range(255, -1, -1)),
]


def test_tricky_keys_are_distinct_buckets() -> None:
    assert len(set(TRICKY_KEYS)) == len(TRICKY_KEYS)
    rl = RateLimiter(1.0, 3600.0, 1)
    base = rl.memory_bytes()
    for key in TRICKY_KEYS:
        assert rl.decide(key, 1, 1.0)[0] is True, key
    for key in TRICKY_KEYS:
        assert rl.decide(key, 1, 2.0) == (False, 0, 3599.0, 3599.0), key
    assert len(rl) == len(TRICKY_KEYS)
    heap = sum(len(k) for k in TRICKY_KEYS if len(k) > INLINE)
    assert rl.memory_bytes() == 32 * SLOT + SLOT + heap > base  # grew once: 16 -> 32 slots


def test_key_must_be_bytes() -> None:
    rl = RateLimiter(1.0)
    for bad in ("text", bytearray(b"x"), memoryview(b"x"), None, 5):
        with pytest.raises(TypeError):
            rl.decide(bad, 1, 0.0)


CONSTRUCTOR_ERRORS = [
    pytest.param(dict(rate=0.0), "rate must be", id="rate 0"),
    pytest.param(dict(rate=-2.0), "rate must be", id="rate negative"),
    pytest.param(dict(rate=math.nan), "rate must be", id="rate nan"),
    pytest.param(dict(rate=math.inf), "rate must be", id="rate inf"),
    pytest.param(dict(period=0.0), "period must be", id="period 0"),
    pytest.param(dict(period=-1.0), "period must be", id="period negative"),
    pytest.param(dict(period=math.nan), "period must be", id="period nan"),
    pytest.param(dict(period=1e-7), "at least 1 microsecond", id="period rounds to 0 us"),
    pytest.param(dict(rate=3e6), "more than one request per microsecond", id="rate too high"),
    pytest.param(dict(burst=-1), "burst must be", id="burst negative"),
    pytest.param(dict(rate=1.0, period=1e6, burst=2**40), "exceeds 2\\*\\*61", id="tau too big"),
    pytest.param(dict(max_keys=0), "max_keys must be >= 1", id="max_keys 0"),
    pytest.param(dict(max_keys=-5), "max_keys must be >= 1", id="max_keys negative"),
]


@pytest.mark.parametrize(("kwargs", "message"), CONSTRUCTOR_ERRORS)
def test_constructor_errors(kwargs, message) -> None:
    args = dict(rate=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        RateLimiter(**args)


@pytest.mark.parametrize(
    ("cost", "now", "error"),
    [
        pytest.param(-1, 0.0, ValueError, id="negative cost"),
        pytest.param(2**31, 0.0, OverflowError, id="cost beyond C int"),
        pytest.param(1, math.nan, ValueError, id="now nan"),
        pytest.param(1, math.inf, ValueError, id="now inf"),
        pytest.param(1, 3e12, ValueError, id="now beyond 2**61 us"),
        pytest.param(1, "soon", TypeError, id="now not a number"),
    ],
)
def test_decide_errors(cost, now, error) -> None:
    rl = RateLimiter(1.0)
    with pytest.raises(error):
        rl.decide(b"k", cost, now)
    assert len(rl) == 0


def test_clear_forgets_everything_and_shrinks() -> None:
    rl = RateLimiter(1.0, 60.0, 1)
    empty = rl.memory_bytes()
    assert empty == 16 * SLOT + SLOT
    for i in range(1000):
        rl.decide(b"key-%d" % i + b"-" * 50, 1, 1.0)
    assert len(rl) == 1000
    assert rl.memory_bytes() > empty + 1000 * 50
    rl.clear()
    assert len(rl) == 0
    assert rl.memory_bytes() == empty
    assert rl.decide(b"key-1" + b"-" * 50, 1, 1.0)[0] is True


def test_calling_init_again_starts_over() -> None:
    rl = RateLimiter(1.0, 60.0, 1, max_keys=10)
    for i in range(30):
        rl.decide(b"k%d" % i + b"=" * 50, 1, 1.0)
    assert rl.evictions == 20
    rl.__init__(5.0, burst=2)
    assert (rl.rate, rl.burst, rl.max_keys, len(rl), rl.evictions) == (5.0, 2, 1_000_000, 0, 0)
    assert rl.memory_bytes() == 16 * SLOT + SLOT
    assert rl.decide(b"k0" + b"=" * 50, 1, 1.0) == (True, 1, 0.2, 0.0)
    with pytest.raises(ValueError):
        rl.__init__(-1.0)
    assert rl.burst == 2  # a failed re-init changes nothing
    assert len(rl) == 1


def test_monotonic_clock() -> None:
    a = monotonic_us()
    b = time.monotonic() * 1e6
    c = monotonic_us()
    assert isinstance(a, int)
    assert a <= c
    assert a - 50_000 <= b <= c + 50_000


def test_decide_without_now_reads_the_monotonic_clock() -> None:
    rl = RateLimiter(1.0, 1.0, 1)
    assert rl.decide(b"k") == (True, 0, 1.0, 0.0)
    allowed, remaining, reset, retry = rl.decide(b"k")
    assert (allowed, remaining) == (False, 0)
    assert 0.9 < retry <= 1.0
    assert reset == retry  # burst 1: retry when the bucket is full again
    # An explicit time.monotonic() is the same clock.
    assert rl.decide(b"k", 1, time.monotonic())[0] is False
    assert rl.decide(b"k", 1, time.monotonic() + 1.0)[0] is True


# ---------------------------------------------------------------------------------------------
# The table: bound, eviction, reclaiming.


@pytest.mark.parametrize(
    ("max_keys", "key_len"),
    [
        pytest.param(1, 8, id="max_keys 1"),
        pytest.param(7, 8, id="max_keys 7"),
        pytest.param(1000, 12, id="max_keys 1000, inline keys"),
        pytest.param(300, 100, id="max_keys 300, long keys"),
    ],
)
def test_max_keys_is_a_hard_bound(max_keys, key_len) -> None:
    rl = RateLimiter(1.0, 3600.0, 1, max_keys=max_keys)  # every bucket keeps state for 1 h
    for i in range(10 * max_keys):
        key = b"%d" % i
        key += b"." * (key_len - len(key))
        assert rl.decide(key, 1, 1.0)[0] is True
        assert len(rl) <= max_keys
    assert len(rl) == max_keys
    assert rl.evictions == 9 * max_keys
    heap = max_keys * key_len if key_len > INLINE else 0
    assert rl.memory_bytes() <= cap_max(max_keys) * SLOT + SLOT + heap


def test_eviction_prefers_full_buckets_and_old_tats() -> None:
    # burst 10, T = 1 s. 99 keys spend one cell at t=0 (full again at t=1); `precious` spends
    # all ten at t=5 (TAT 15 s, the newest); 99 new keys then spend one cell at t=5 (TAT 6 s).
    rl = RateLimiter(1.0, 1.0, 10, max_keys=100)
    for i in range(99):
        rl.decide(b"old-%d" % i, 1, 0.0)
    assert len(rl) == 99
    assert rl.decide(b"precious", 10, 5.0)[0] is True
    for i in range(99):
        rl.decide(b"new-%d" % i, 1, 5.0)
    assert len(rl) <= 100
    # A stored key peeks (cost 0) remaining 9 (or 0 for precious); a forgotten one 10.
    assert rl.decide(b"precious", 0, 5.0) == (True, 0, 10.0, 0.0)
    lost = sum(rl.decide(b"new-%d" % i, 0, 5.0)[1] == 10 for i in range(99))
    assert lost == rl.evictions
    assert rl.reclaimed + rl.evictions >= 99


def test_without_full_buckets_the_oldest_tat_is_evicted() -> None:
    # max_keys 3: 4 slots, so the 8-slot sample sees every key. All three buckets are live.
    rl = RateLimiter(1.0, 1.0, 10, max_keys=3)
    for key, cost in ((b"b", 5), (b"a", 1), (b"c", 9)):
        rl.decide(key, cost, 0.0)
    assert rl.decide(b"d", 1, 0.5) == (True, 9, 1.0, 0.0)
    assert (len(rl), rl.evictions, rl.reclaimed) == (3, 1, 0)
    assert rl.decide(b"a", 0, 0.5)[1] == 10  # TAT 1 s, the oldest: forgotten (full again)
    assert rl.decide(b"b", 0, 0.5)[1] == 5  # TAT 5 s: kept
    assert rl.decide(b"c", 0, 0.5)[1] == 1  # TAT 9 s: kept
    # Once a bucket is full, it goes first, however young the others are.
    assert rl.decide(b"e", 1, 1.6)[0] is True  # d (TAT 1.5 s) is full at 1.6 s
    assert rl.evictions == 1
    assert rl.decide(b"d", 0, 1.6)[1] == 10


def test_full_buckets_are_reclaimed_not_evicted() -> None:
    # The table is full of full buckets; new keys take their places without a live eviction.
    rl = RateLimiter(1.0, 1.0, 1, max_keys=1000)
    for i in range(1000):
        rl.decide(b"a%d" % i, 1, 0.0)
    assert len(rl) == 1000
    for i in range(900):
        assert rl.decide(b"b%d" % i, 1, 2.0)[0] is True
    assert rl.evictions == 0
    assert rl.reclaimed >= 1000
    assert len(rl) == 900
    assert all(rl.decide(b"b%d" % i, 1, 2.0)[0] is False for i in range(900))


def test_steady_stream_of_distinct_keys_never_evicts() -> None:
    # 1000 new keys a second for 60 s, each bucket full one second after its request: the live
    # set is ~1000 keys; the sweep keeps the table well under max_keys = 2000.
    rl = RateLimiter(1.0, 1.0, 1, max_keys=2000)
    most = 0
    for i in range(60_000):
        assert rl.decide(b"client-%d" % i, 1, i / 1000)[0] is True
        most = max(most, len(rl))
    assert rl.evictions == 0
    assert most <= 1000 + cap_max(2000) // 8 + 8
    assert rl.memory_bytes() <= cap_max(2000) * SLOT + SLOT


@pytest.mark.parametrize(
    ("max_keys", "pool_size"),
    [
        pytest.param(1, 4, id="1 slot of 2, 4 keys"),
        pytest.param(3, 8, id="3 keys max, 8 keys"),
        pytest.param(12, 12, id="12 keys in 14 slots, exact"),
        pytest.param(12, 30, id="12 keys max, 30 keys"),
        pytest.param(40, 40, id="40 keys in 46 slots, exact"),
        pytest.param(40, 100, id="40 keys max, 100 keys"),
    ],
)
def test_table_invariants_under_churn(max_keys, pool_size) -> None:
    # High load in small tables: insert shifts and delete shifts wrap around the array end.
    # Invariants after every decision; with pool_size <= max_keys, exact oracle agreement.
    rng = random.Random(max_keys * 1000 + pool_size)
    pool = [b"k%d" % i + (b"~" * 45 if i % 3 == 0 else b"") for i in range(pool_size)]
    rl = RateLimiter(1.0, 1.0, 4, max_keys=max_keys)
    oracle = NaiveGcra(1.0, 1.0, 4)
    now = 0
    for _ in range(3000):
        now += rng.choice((0, 0, 0, 1, 10_000, 250_000, 1_000_000))
        key = rng.choice(pool)
        cost = rng.randint(0, 4)
        got = rl.decide(key, cost, now / 1e6)
        want = oracle.decide(key, cost, now)
        if pool_size <= max_keys:
            assert got == want
        rl._check()
        assert len(rl) <= max_keys
    if pool_size <= max_keys:
        assert rl.evictions == 0
    else:
        assert rl.evictions > 0


def test_denied_and_peeking_requests_store_nothing() -> None:
    rl = RateLimiter(1.0, 1.0, 2)
    assert rl.decide(b"big", 3, 0.0) == (False, 2, 0.0, math.inf)
    assert rl.decide(b"peek", 0, 0.0) == (True, 2, 0.0, 0.0)
    assert len(rl) == 0


def test_bench_helper_runs_decide_c() -> None:
    rl = RateLimiter(1.0, 3600.0, 1)
    ns = _bench(5000, 1000, rl)
    assert isinstance(ns, int)
    assert ns > 0
    assert len(rl) == 1000
    assert rl.decide(b"10.0.0.0", 1, time.monotonic())[0] is False  # spent by _bench
    with pytest.raises(ValueError):
        _bench(10, 0)


def test_module_is_compiled() -> None:
    assert ratelimit_module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


# ---------------------------------------------------------------------------------------------
# Properties: RateLimiter == oracle when nothing is evicted; the eviction bound when it is.

KEYS = [b"", b"a", b"a\x00", b"10.1.2.3", b"k" * INLINE, b"k" * (INLINE + 1), b"\x00" * 90]
RATES = [0.5, 1.0, 2.0, 3.0, 7.5, 100.0, 1000.0]
PERIODS = [0.001, 0.1, 1.0, 60.0]


@st.composite
def scenarios(draw, n_keys: int):
    rate = draw(st.sampled_from(RATES))
    period = draw(st.sampled_from(PERIODS))
    burst = draw(st.integers(1, 6))
    T = NaiveGcra(rate, period, burst).T
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, n_keys - 1),
                st.integers(0, 12),  # time step in quarters of T ...
                st.integers(0, 3),  # ... plus a few microseconds
                st.integers(0, burst + 1),  # cost, sometimes more than the bucket
            ),
            max_size=80,
        )
    )
    ops, now = [], draw(st.integers(0, 10**12))
    for key, quarters, jitter, cost in steps:
        now += quarters * T // 4 + jitter
        ops.append((key, now, cost))
    return rate, period, burst, ops


def oracle_gcra(tat, now, period_us, rate, burst, cost):
    """The module docstring's arithmetic, line by line, in Python integers."""
    T = math.floor(period_us / rate + 0.5)
    tau = T * burst
    t = max(tat, now)
    if cost > burst:
        return False, tat, max(0, (tau - (t - now)) // T), t - now, -1
    new_tat = t + cost * T
    if new_tat - now <= tau:
        return True, new_tat, max(0, (tau - (new_tat - now)) // T), new_tat - now, 0
    return False, tat, max(0, (tau - (t - now)) // T), t - now, new_tat - tau - now


@settings(max_examples=500, deadline=None)
@given(
    now=st.integers(-(2**60), 2**60),
    ahead=st.integers(-(2**40), 2**45),
    period_us=st.integers(1, 2**40),
    rate=st.one_of(st.integers(1, 10**6).map(float), st.floats(1e-3, 1e6)),
    burst=st.integers(1, 2**20),
    cost=st.integers(0, 2**21),
)
def test_property_gcra_matches_the_formulas(now, ahead, period_us, rate, burst, cost) -> None:
    # Wide ranges: T up to 2**40 us, remaining up to 2**20 (the reciprocal division), times far
    # from zero on both sides, stored TATs in the past and beyond tau.
    T = math.floor(period_us / rate + 0.5)
    if T < 1 or T >= 2**61 or T * burst > 2**61:
        with pytest.raises(ValueError):
            gcra(now + ahead, now, period_us, rate, burst, cost)
        return
    got = gcra(now + ahead, now, period_us, rate, burst, cost)
    assert got == oracle_gcra(now + ahead, now, period_us, rate, burst, cost)


MANY_KEYS = [b"key-%d" % i for i in range(8)] + [b"long-key-%d-" % i + b"=" * 40 for i in range(4)]
POOL = KEYS + MANY_KEYS


@settings(max_examples=300, deadline=None)
@given(scenarios(len(POOL)), st.sampled_from([len(POOL), 10**6]))
def test_property_limiter_matches_oracle(scenario, max_keys) -> None:
    # max_keys = the pool size: a 22-slot table run at high load (shifts wrap around the end)
    # that never has to evict; 10**6: the roomy 16/32-slot table.
    rate, period, burst, ops = scenario
    rl = RateLimiter(rate, period, burst, max_keys=max_keys)
    oracle = NaiveGcra(rate, period, burst)
    period_us = math.floor(period * 1e6 + 0.5)
    for key_index, now, cost in ops:
        key = POOL[key_index]
        ref = gcra(oracle.tat.get(key, 0), now, period_us, rate, burst, cost)
        want = oracle.decide(key, cost, now)
        assert rl.decide(key, cost, now / 1e6) == want
        assert ref[0] == want[0]
        assert ref[1] == oracle.tat.get(key, 0)
        assert (ref[2], ref[3] / 1e6) == want[1:3]
        live = sum(tat > now for tat in oracle.tat.values())
        assert live <= len(rl) <= len(oracle.tat)
        rl._check()
    assert rl.evictions == 0


@settings(max_examples=300, deadline=None)
@given(scenarios(len(MANY_KEYS)), st.integers(1, 8))
def test_property_eviction_bound(scenario, max_keys) -> None:
    # Each forgotten bucket restarts full, so per key: admitted_cost * T <= tau + span (exact
    # GCRA) plus tau per eviction of that key; summed over keys, with evictions counted by the
    # limiter. Decisions stay within their ranges.
    rate, period, burst, ops = scenario
    rl = RateLimiter(rate, period, burst, max_keys=max_keys)
    T, tau = rl.emission_us, rl.emission_us * burst
    admitted: dict[bytes, int] = {}
    first: dict[bytes, int] = {}
    last: dict[bytes, int] = {}
    for key_index, now, cost in ops:
        key = MANY_KEYS[key_index]
        allowed, remaining, reset, retry = rl.decide(key, cost, now / 1e6)
        assert len(rl) <= max_keys
        assert 0 <= remaining <= burst
        assert 0 <= reset * 1e6 <= tau + 0.5
        assert (retry == 0.0) if allowed else (retry > 0.0)
        assert (retry == math.inf) == (cost > burst)
        rl._check()
        if allowed and cost:
            admitted[key] = admitted.get(key, 0) + cost
            first.setdefault(key, now)
            last[key] = now
    bound = sum(tau + last[k] - first[k] for k in admitted) + tau * rl.evictions
    assert sum(admitted.values()) * T <= bound
    assert rl.memory_bytes() <= cap_max(max_keys) * SLOT + SLOT + max_keys * 60


# ---------------------------------------------------------------------------------------------
# The hybrid store's sync: raise_tat and tally tables (add / drain).


@pytest.mark.parametrize(
    ("stored_ahead", "raise_ahead", "want_ahead"),
    [
        pytest.param(None, 2_000_000, 2_000_000, id="absent key, future TAT: inserted"),
        pytest.param(None, -5, None, id="absent key, past TAT: nothing stored (full bucket)"),
        pytest.param(500_000, 2_000_000, 2_000_000, id="stored TAT earlier: raised"),
        pytest.param(3_000_000, 2_000_000, 3_000_000, id="stored TAT later: kept"),
    ],
)
def test_raise_tat_stores_the_later_tat(stored_ahead, raise_ahead, want_ahead) -> None:
    lim = RateLimiter(2.0, 1.0, 10)  # T = 500 ms
    now = monotonic_us()
    if stored_ahead is not None:
        lim.decide(b"k", cost=stored_ahead // 500_000, now=now / 1e6)
        assert lim.tat(b"k") == now + stored_ahead
    lim.raise_tat(b"k", now + raise_ahead)
    assert lim.tat(b"k") == (None if want_ahead is None else now + want_ahead)
    lim._check()


def test_raised_tat_is_what_decisions_see() -> None:
    lim = RateLimiter(2.0, 1.0, 4)  # T = 500 ms, tau = 2 s
    now = monotonic_us()
    lim.raise_tat(b"k", now + 1_500_000)  # the others spent 3 of 4
    assert lim.decide(b"k", now=now / 1e6)[:2] == (True, 0)
    assert lim.decide(b"k", now=now / 1e6)[0] is False


def test_raise_tat_honours_max_keys() -> None:
    lim = RateLimiter(1.0, 1.0, 5, max_keys=8)
    now = monotonic_us()
    for i in range(50):
        lim.raise_tat(b"key-%d" % i, now + 10_000_000 + i)
    assert len(lim) == 8 and lim.evictions == 42
    lim._check()


@pytest.mark.parametrize(
    "key_len", [pytest.param(10, id="inline key"), pytest.param(100, id="heap key")]
)
def test_tally_adds_and_drains(key_len: int) -> None:
    tally = RateLimiter(1.0, 1.0, 1, max_keys=100)
    keys = [bytes([65 + i]) * key_len for i in range(5)]
    for _ in range(3):
        for i, k in enumerate(keys):
            tally.add(k, (i + 1) * 1000)
    tally.add(keys[0], 0)
    assert sorted(tally.drain()) == sorted((k, 3 * (i + 1) * 1000) for i, k in enumerate(keys))
    assert len(tally) == 0 and tally.drain() == []
    assert tally.memory_bytes() == 16 * SLOT + SLOT  # back to the initial array
    tally.add(keys[1], 7)
    assert tally.drain() == [(keys[1], 7)]


def test_tally_full_drops_new_keys_and_counts_them() -> None:
    tally = RateLimiter(1.0, 1.0, 1, max_keys=4)
    for i in range(10):
        tally.add(b"k%d" % i, 1)
    tally.add(b"k0", 5)  # a held key still accumulates
    assert tally.overflowed == 6
    assert sorted(tally.drain()) == [(b"k0", 6), (b"k1", 1), (b"k2", 1), (b"k3", 1)]
    tally.add(b"k9", 1)  # room again after the drain
    assert tally.drain() == [(b"k9", 1)]
