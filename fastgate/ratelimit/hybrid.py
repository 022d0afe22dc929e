"""The `hybrid` store: decide locally, reconcile with Redis every `sync_interval`.

Each worker keeps a TAT per key and limit (the GCRA arithmetic of fastgate._core.ratelimit,
in Python integers, exact) and decides alone: no Redis round trip on the request path. What it
admits is recorded as consumption (cost x T microseconds per request). Every sync_interval
(default 50 ms) one background task pushes, for every key touched since the last sync, the
consumption to Redis with SYNC_SCRIPT, which adds it to the shared TAT (from Redis's `TIME`)
and returns the shared debt (TAT - now); the local TAT becomes the later of its own and
now + that debt. All of one sync goes out in one write (the client auto-pipelines).

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
until a sync succeeds again; consumption during an outage is not pushed afterwards.

Memory: at most `max_keys` keys per limit; past that, keys whose bucket is full are dropped,
then the oldest inserted. Keys touched between two syncs are held once more for the push.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastgate._core.ratelimit import gcra, monotonic_us
from fastgate.ratelimit.redis import SYNC_SCRIPT, Outage, Result, redis_keys
from fastgate.redis import RedisClient, RedisReplyError

__all__ = ["HybridStore"]

log = logging.getLogger("fastgate.rate_limit")


class HybridStore:
    """Local decisions reconciled with Redis; see the module docstring."""

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
        self.prefix = b"fg:rl:" + middleware.encode() + b":"
        self.emissions = tuple(emissions)
        self.bursts = tuple(bursts)
        self.costs = tuple(costs)
        self.dry_runs = tuple(dry_runs)
        self.count = len(self.emissions)
        self.outage = outage
        self.on_dry_refusal = on_dry_refusal
        self.sync_interval = sync_interval
        self.max_keys = max_keys
        self.tats: list[dict[bytes, int]] = [{} for _ in range(self.count)]
        self.pending: dict[bytes, list[int]] = {}
        self.allowed = [0] * self.count
        self.denied = [0] * self.count
        self.syncs = 0
        self.sync_failed = False
        self._task: asyncio.Task | None = None
        self._closed = False

    # ---- the request path -------------------------------------------------------------------

    def decide(self, key: bytes) -> Result:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self.sync_failed or not self.client.available:
            return self.outage.decide(key, "sync failed" if self.sync_failed else "not connected")
        now = monotonic_us()
        used = self.pending.get(key)
        if used is None:
            used = self.pending[key] = [0] * self.count
        best: tuple[int, int, int, int] | None = None
        for i in range(self.count):
            tats = self.tats[i]
            # The compiled arithmetic; period = T and rate 1 make its emission exactly T.
            allowed, store, remaining, reset, retry = gcra(
                tats.get(key, 0), now, self.emissions[i], 1.0, self.bursts[i], self.costs[i]
            )
            if allowed:
                self.allowed[i] += 1
                if store > now:
                    if key not in tats and len(tats) >= self.max_keys:
                        self._shrink(tats, now)
                    tats[key] = store
                used[i] += self.costs[i] * self.emissions[i]
                if not self.dry_runs[i] and (best is None or remaining < best[1]):
                    best = (-1, remaining, reset, retry)
            else:
                self.denied[i] += 1
                if self.dry_runs[i]:
                    self.on_dry_refusal(i, key)
                else:
                    return i, remaining, reset, retry
        return best if best is not None else (-1, 0, 0, 0)

    def _shrink(self, tats: dict[bytes, int], now: int) -> None:
        """Make room: drop full buckets (they carry nothing), then the oldest inserted."""
        for k in [k for k, t in tats.items() if t <= now]:
            del tats[k]
        excess = len(tats) - self.max_keys * 7 // 8
        if excess > 0:
            for k in list(itertools.islice(tats, excess)):
                del tats[k]

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

    async def sync(self) -> None:
        """Push what was consumed since the last sync and pull the shared debts."""
        batch, self.pending = self.pending, {}
        if not self.client.available:
            return  # requests meanwhile follow the outage policy; the client reconnects
        if not batch:
            if self.sync_failed:
                await self._probe()
            return
        sent: list[tuple[bytes, int, Any]] = []
        for key, used in batch.items():
            names = redis_keys(self.prefix, key, self.count)
            for i in range(self.count):
                sent.append((key, i, self.client.evalsha(SYNC_SCRIPT.sha, [names[i]], [used[i]])))
        results = await asyncio.gather(*(f for _, _, f in sent), return_exceptions=True)
        now = monotonic_us()
        failure: BaseException | None = None
        for (key, i, _), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                failure = result
                continue
            debt = int(result)
            if debt > 0:
                tats = self.tats[i]
                if tats.get(key, 0) < now + debt:
                    tats[key] = now + debt
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
        self.outage.begin(failure)

    def _merge(self, batch: dict[bytes, list[int]]) -> None:
        for key, used in batch.items():
            mine = self.pending.setdefault(key, [0] * self.count)
            for i, us in enumerate(used):
                mine[i] += us

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
        return [{"allowed": a, "denied": d} for a, d in zip(self.allowed, self.denied, strict=True)]
