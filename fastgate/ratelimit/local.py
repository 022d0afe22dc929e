"""The `local` store: each worker process decides alone, in C (fastgate._core.ratelimit).

A LimitSet over one RateLimiter per limit. It is also what the Redis stores fall back to when
Redis cannot be reached (fail_open): the same limits divided by the number of instances that
share them, so that together they stay near the configured limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from fastgate._core.ratecheck import LimitSet
from fastgate._core.ratelimit import RateLimiter
from fastgate.ratelimit.options import Limit

__all__ = ["DryRunLog", "limit_set", "limiter_for"]

log = logging.getLogger("fastgate.rate_limit")


def limiter_for(limit: Limit, max_keys: int, share: int = 1) -> RateLimiter:
    """A RateLimiter for `limit`, or for 1/share of it (rate and burst divided; burst >= 1)."""
    return RateLimiter(
        limit.rate / share, limit.per, burst=max(1, limit.burst // share), max_keys=max_keys
    )


class DryRunLog:
    """Logs dry-run refusals at most once per `every` seconds per limit, with the count."""

    def __init__(
        self,
        middleware: str,
        limits: Sequence[Limit],
        render: Callable[[bytes], str],
        every: float,
    ) -> None:
        self.middleware = middleware
        self.words = [lim.words(dry_run_note=False) for lim in limits]
        self.render = render
        self.every = every
        self.pending = [0] * len(limits)
        self.next_at = [0.0] * len(limits)

    def __call__(self, index: int, key: bytes, refusals: int) -> None:
        """LimitSet's callback (it throttles itself)."""
        log.warning(
            "rate limit %s: dry run: limit %d (%s) would refuse %s (%d refusal(s) since the "
            "last report)",
            self.middleware,
            index,
            self.words[index],
            self.render(key),
            refusals,
        )

    def note(self, index: int, key: bytes) -> None:
        """For the Python stores: count one refusal, log when due."""
        self.pending[index] += 1
        now = time.monotonic()
        if now >= self.next_at[index]:
            self.next_at[index] = now + self.every
            count, self.pending[index] = self.pending[index], 0
            self(index, key, count)


def limit_set(
    limits: Sequence[Limit], max_keys: int, share: int = 1, dry_log: DryRunLog | None = None
) -> LimitSet:
    """A LimitSet deciding `limits` (each divided by `share`) in C."""
    return LimitSet(
        [limiter_for(lim, max_keys, share) for lim in limits],
        [lim.cost for lim in limits],
        [lim.dry_run for lim in limits],
        dry_log=dry_log,
        dry_log_every=dry_log.every if dry_log is not None else 10.0,
    )
