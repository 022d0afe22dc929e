"""Micro benchmark of the local rate limiter: decisions per second and memory per key.

Run: PYTHONPATH=. python benchmarks/micro_ratelimit.py [--quick]. Three ways to make the same
decisions:

* `RateLimiter.decide()` from a Python loop (what a Python middleware pays, loop included);
* `decide_c` in a C loop (`ratelimit._bench`): what the connection code pays per request;
* a pure-Python GCRA over a dict (below), the same integer arithmetic, for comparison.

Keys are "10.a.b.c" address strings, cycled; one-hour buckets, so after the first pass over
the keys every decision finds its key (a hit; the first pass, not timed, inserts). The Python
loops pass a fixed `now` per round; the C loop advances the clock 1 us per decision.
Memory: bytes per key at 1,000,000 keys from `memory_bytes() / len` and from the process RSS
delta (the slot array is 64 bytes a slot at load <= 7/8).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import timeit

from fastgate._core.ratelimit import RateLimiter, _bench


class DictGcra:
    """GCRA over a dict of TATs, in integer microseconds: the pure-Python baseline."""

    def __init__(self, rate: float, period: float = 1.0, burst: int = 1) -> None:
        self.T = int(int(period * 1e6 + 0.5) / rate + 0.5)
        self.burst = burst
        self.tau = self.T * burst
        self.tat: dict[bytes, int] = {}

    def decide(self, key: bytes, cost: int, now_us: int) -> tuple[bool, int, int, int]:
        tat = self.tat.get(key, now_us)
        if tat < now_us:
            tat = now_us
        new_tat = tat + cost * self.T
        if cost <= self.burst and new_tat - now_us <= self.tau:
            self.tat[key] = new_tat
            return True, (self.tau - (new_tat - now_us)) // self.T, new_tat - now_us, 0
        retry = new_tat - self.tau - now_us if cost <= self.burst else -1
        return False, max(0, (self.tau - (tat - now_us)) // self.T), tat - now_us, retry


def keys_for(n: int) -> list[bytes]:
    return [b"10.%d.%d.%d" % ((i >> 16) & 255, (i >> 8) & 255, i & 255) for i in range(n)]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def py_loop_ns(decide, keys: list[bytes], nows: list) -> float:
    """Best ns per decision of `for k in keys: decide(k, 1, now)`, one round per `now`, with
    the cyclic GC off while timing (as timeit does)."""
    best = float("inf")
    gc.disable()
    try:
        for now in nows:
            t0 = timeit.default_timer()
            for k in keys:
                decide(k, 1, now)
            best = min(best, (timeit.default_timer() - t0) / len(keys) * 1e9)
    finally:
        gc.enable()
    return best


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = (1, 1000, 100_000) if quick else (1, 1000, 100_000, 1_000_000)
    total = 200_000 if quick else 2_000_000
    warm = RateLimiter(1.0, 3600.0, 1)  # let the CPU clock up before the first row
    _bench(total, 1, warm)
    py_loop_ns(warm.decide, keys_for(1) * total, [1.0])
    print(f"{'keys':>9}  {'decide() py':>13}  {'decide_c loop':>13}  {'dict GCRA py':>13}")
    for nkeys in sizes:
        reps = max(1, total // nkeys)
        keys = keys_for(nkeys) * reps if nkeys < total else keys_for(nkeys)
        # One-hour buckets: after the first pass over the keys every decision is a hit.
        rl_py = RateLimiter(1.0, 3600.0, 1, max_keys=max(1_000_000, nkeys))
        py = py_loop_ns(rl_py.decide, keys, [1.0, 2.0, 3.0, 4.0])
        rl_c = RateLimiter(1.0, 3600.0, 1, max_keys=max(1_000_000, nkeys))
        _bench(nkeys, nkeys, rl_c)  # insert every key first
        c = min(_bench(total, nkeys, rl_c) for _ in range(3)) / total
        base = DictGcra(1.0, 3600.0, 1)
        pure = py_loop_ns(base.decide, keys, [1_000_000, 2_000_000, 3_000_000, 4_000_000])
        print(
            f"{nkeys:9,d}  {py:8.1f} ns/op  {c:8.1f} ns/op  {pure:8.1f} ns/op"
            f"   ({1e3 / py:5.2f} / {1e3 / c:5.1f} / {1e3 / pure:5.2f} M decisions/s)"
        )
        del keys, rl_py, rl_c, base
        gc.collect()

    n = 100_000 if quick else 1_000_000
    print(f"\nmemory at {n:,d} keys of 8-12 bytes (each case in a fresh process)")
    for case in (f"table {n}", f"table {2 * n}", "dict"):
        kind, *arg = case.split()
        out = subprocess.run(
            [sys.executable, __file__, "--memory", kind, str(n), *arg],
            capture_output=True,
            text=True,
            check=True,
        )
        print(out.stdout.rstrip())


def memory_child(kind: str, n: int, max_keys: int) -> None:
    """One memory measurement in a fresh process: RSS before and after storing n keys."""
    if kind == "dict":
        keys = keys_for(n)
        before = rss_bytes()
        base = DictGcra(1.0, 3600.0, 1)
        for i, k in enumerate(keys):
            base.decide(k, 1, 1_000_000 + i)
        delta = rss_bytes() - before
        print(f"  dict GCRA in Python (keys allocated before):   {delta / n:6.1f} B/key RSS")
        return
    before = rss_bytes()
    rl = RateLimiter(1.0, 3600.0, 1, max_keys=max_keys)
    fill_ns = _bench(n, n, rl) / n
    delta = rss_bytes() - before
    assert len(rl) == n
    print(
        f"  RateLimiter max_keys={max_keys:>9,d}: {rl.memory_bytes() / n:6.1f} B/key "
        f"memory_bytes, {delta / n:6.1f} B/key RSS; fill {fill_ns:4.0f} ns/key (from empty)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:
        kind, n = sys.argv[2], int(sys.argv[3])
        memory_child(kind, n, int(sys.argv[4]) if len(sys.argv) > 4 else n)
    else:
        main()
