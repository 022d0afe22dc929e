"""The `hybrid` store: decide locally, reconcile with Redis every `sync_interval`.

Each worker keeps a TAT per key and limit in C (a LimitSet over one RateLimiter per limit,
fastgate._core.ratelimit/ratecheck: the same tables and arithmetic as the `local` store) and
decides alone: no Redis round trip on the request path, and where the key comes from the
request head the decision runs as the route's CoreCheck, with no Python call at all. What it
admits is recorded, also in C, as consumption: cost x T microseconds added to the key's sum in
a tally table per limit (a second RateLimiter used as a key -> amount map). Every
sync_interval (default 50 ms) one background task drains the tallies and pushes, for every key
admitted since the last sync, the consumption to Redis with SYNC_SCRIPT, which adds it to the
shared TAT (from Redis's `TIME`) and returns the shared debt (TAT - now); the local TAT
becomes the later of its own and now + that debt (RateLimiter.raise_tat). All of one sync goes
out in one write (the client auto-pipelines).

Overshoot bound. Between two syncs an instance does not see what the others admitted. Let N
be the instances sharing a key, r = rate/per, b the burst, and L = sync_interval + one Redis
round trip (how stale an instance's view can be). Over any window of length W the instances
together admit at most

    r * W + b + (N - 1) * (b + r * L)

requests: the exact GCRA allowance (r * W + b) plus, for each other instance, at most one
bucket it could spend before hearing of the rest (b) and what refills while it is deaf
(r * L). Once the debt is known everywhere, every instance waits for it, so the excess does
not accumulate: over long windows the admitted rate converges to r. Example: 200/s, burst
10, 2 instances, 50 ms sync over 3 s: at most 610 + 1 * (10 + 200 * 0.051) = 630.2, 3.3 %
over; the same load in the `redis` store admits within 2 % of 610.

Redis down: the sync fails (or the client reports it unavailable) and the store follows the
outage policy (fail_open: the local share `limit / expected_instances`; fail_closed: 503)
until a sync succeeds again; consumption during an outage is not pushed afterwards. The C
check learns of it through the LimitSet's `down` flag, which the store sets while it is not
synced (also before its sync task has started: the first request starts it): then the check
hands its decisions to the Python path (`decide`), which applies the policy. The flag follows
the client's availability at each sync (within sync_interval) and at every Python decision.

Memory: at most `max_keys` keys per limit in the TAT tables (as the local store: full buckets
reclaimed, then sampled eviction of the oldest TAT), and at most `max_keys` keys per limit in
the tallies between two syncs. When a tally is full, the consumption of further new keys is
enforced locally but not pushed (counted in `tally_overflows`): the sync pushes what the
tally holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastgate._core.ratecheck import LimitSet
from fastgate._core.ratelimit import RateLimiter, monotonic_us
from fastgate.ratelimit.redis import SYNC_SCRIPT, Outage, Result, key_prefix, redis_keys
from fastgate.redis import RedisClient, RedisReplyError

__all__ = ["HybridStore"]

log = logging.getLogger("fastgate.rate_limit")


class HybridStore:
    """Local decisions (in C) reconciled with Redis; see the module docstring."""

    def __init__(
        self,
        middleware: str,
        client: RedisClient,
        emissions: Sequence[int],
        bursts: Sequence[int],
        costs: Sequence[int],
        dry_runs: Sequence[bool],
        outage: Outage,
        on_dry_refusal: Callable[[int, bytes], None],
        sync_interval: float,
        max_keys: int,
    ) -> None:
        self.client = client
        self.prefix = key_prefix(middleware)
        self.emissions = tuple(emissions)
        self.bursts = tuple(bursts)
        self.costs = tuple(costs)
        self.dry_runs = tuple(dry_runs)
        self.count = len(self.emissions)
        self.outage = outage
        self.on_dry_refusal = on_dry_refusal
        self.sync_interval = sync_interval
        self.max_keys = max_keys
        # Rate 1 per period T (seconds) makes the emission interval exactly T microseconds.
        self.tats = tuple(
            RateLimiter(1.0, t / 1e6, burst=b, max_keys=max_keys)
            for t, b in zip(self.emissions, self.bursts, strict=True)
        )
        self.tallies = tuple(
            RateLimiter(1.0, 1.0, burst=1, max_keys=max_keys) for _ in range(self.count)
        )
        self.limits = LimitSet(
            self.tats,
            self.costs,
            self.dry_runs,
            dry_log=self._dry_refusal,
            dry_log_every=0.0,
            tallies=self.tallies,
        )
        self.limits.down = True  # until the sync task runs (the first decision starts it)
        self.syncs = 0
        self.sync_failed = False
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Keys (per limit, summed) admitted since the last sync, waiting to be pushed."""
        return sum(len(t) for t in self.tallies)

    @property
    def tally_overflows(self) -> int:
        return sum(t.overflowed for t in self.tallies)

    def _dry_refusal(self, index: int, key: bytes, refusals: int) -> None:
        self.on_dry_refusal(index, key)

    # ---- the request path (Python; the C check calls it only while `limits.down`) ------------

    def decide(self, key: bytes) -> Result:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())
        down = self.sync_failed or not self.client.available
        self.limits.down = down or self._task is None
        if down:
            return self.outage.decide(key, "sync failed" if self.sync_failed else "not connected")
        index, remaining, reset, retry, _ = self.limits.decide(key)
        return index, remaining, reset, retry

    # ---- the sync task ----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the syncing
                log.exception("rate limit hybrid sync failed")
            self.limits.down = self.sync_failed or not self.client.available

    async def sync(self) -> None:
        """Push what was consumed since the last sync and pull the shared debts."""
        batch = [tally.drain() for tally in self.tallies]
        if not self.client.available:
            return  # requests meanwhile follow the outage policy; the client reconnects
        if not any(batch):
            if self.sync_failed:
                await self._probe()
            return
        sent: list[tuple[bytes, int, Any]] = []
        for i, entries in enumerate(batch):
            for key, used in entries:
                name = redis_keys(self.prefix, key, self.count)[i]
                sent.append((key, i, self.client.evalsha(SYNC_SCRIPT.sha, [name], [used])))
        results = await asyncio.gather(*(f for _, _, f in sent), return_exceptions=True)
        now = monotonic_us()
        failure: BaseException | None = None
        for (key, i, _), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                failure = result
                continue
            debt = int(result)
            if debt > 0:
                self.tats[i].raise_tat(key, now + debt)
        self.syncs += 1
        if failure is None:
            self.sync_failed = False
            self.outage.recovered()
            return
        if isinstance(failure, RedisReplyError) and failure.code == "NOSCRIPT":
            with contextlib.suppress(Exception):
                await self.client.script_load(SYNC_SCRIPT)
            self._merge(batch)  # pushed again next time; nothing was lost
            return
        self.sync_failed = True
        self.limits.down = True
        self.outage.begin(failure)

    def _merge(self, batch: list[list[tuple[bytes, int]]]) -> None:
        for tally, entries in zip(self.tallies, batch, strict=True):
            for key, used in entries:
                tally.add(key, used)

    async def _probe(self) -> None:
        try:
            await self.client.ping()
        except Exception:
            return
        self.sync_failed = False
        self.outage.recovered()

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def stats(self) -> list[dict[str, int]]:
        return self.limits.stats()
