"""The `redis` store: every decision made by one Lua script in Redis, with Redis's clock.

One EVALSHA per request decides every limit of the middleware for its key, atomically, with
the arithmetic of `fastgate._core.ratelimit.gcra` (read its module docstring): integer
microseconds, `now` from Redis `TIME`, so the gateways' own clocks (and their skew) play no
part. The limits are decided in order and the script stops at the first enforcing limit that
refuses, as the local LimitSet does; dry-run limits never stop it. A key's TAT is stored with
`SET key tat PX <ms until the bucket is full again>`, so an idle key disappears by itself
exactly when it would carry no state.

Keys: `fg:rl:<middleware>:{<digest>}:<limit index>`. The digest is BLAKE2b-128 of the
encoded limiter key (fastgate/_core/ratecheck.pyx), so header values (API keys) are never
stored, and the braces make it the cluster hash tag: every limit of one decision lands in one
slot (Redis Cluster specification, hash tags), as a script touching several keys requires.

Lua numbers are doubles: exact for integers below 2**53 (Redis TIME in microseconds stays
below that until the year 2255). The one division whose result is floored, remaining =
floor(room / T), is corrected by one step either way, so it is exact for any operands below
2**52; SET writes the TAT with `%d` (a 64-bit integer in Redis's Lua), never in exponent form.

`SYNC_SCRIPT` is the hybrid store's: add what one instance consumed to a key's TAT and read
the result back.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastgate._core.ratecheck import LimitSet
from fastgate.redis import RedisClient, Script, hash_tag

__all__ = [
    "DECIDE_SCRIPT",
    "DECIDE_SCRIPT_TEST",
    "SYNC_SCRIPT",
    "SYNC_SCRIPT_TEST",
    "Outage",
    "RedisStore",
    "decide_args",
    "redis_keys",
    "unpack_decisions",
]

# The clock, and a test-only variant that takes `now` as the last argument (so the unit test
# can drive the script and gcra() with the same times). Only the clock line differs.
_CLOCK = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000000 + tonumber(t[2])"
_CLOCK_TEST = "local now = tonumber(ARGV[#ARGV])"

_DECIDE = """
-- GCRA for every limit of one decision. KEYS[i]: limit i's TAT. ARGV per limit i (4 each):
-- T (emission interval, us), burst, cost, dry_run (1/0). Returns 5 integers per limit:
-- evaluated, allowed, remaining, reset_after_us, retry_after_us (-1: never).
{clock}
local out = {{}}
local stopped = false
for i = 1, #KEYS do
  local base = (i - 1) * 4
  local T = tonumber(ARGV[base + 1])
  local burst = tonumber(ARGV[base + 2])
  local cost = tonumber(ARGV[base + 3])
  local dry = ARGV[base + 4] == '1'
  if stopped then
    for _ = 1, 5 do out[#out + 1] = 0 end
  else
    local tau = T * burst
    local stored = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
    local tat = stored
    if tat < now then tat = now end
    local allowed, after, retry = 0, tat, 0
    if cost > burst then
      retry = -1
    else
      local new_tat = tat + cost * T
      if new_tat - now <= tau then
        allowed, after = 1, new_tat
        if new_tat > now and new_tat ~= stored then
          local ms = math.floor((new_tat - now + 999) / 1000)
          redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', ms)
        end
      else
        retry = new_tat - tau - now
      end
    end
    local room = tau - (after - now)
    local remaining = 0
    if room > 0 then
      remaining = math.floor(room / T)
      if remaining * T > room then remaining = remaining - 1
      elseif (remaining + 1) * T <= room then remaining = remaining + 1 end
    end
    out[#out + 1] = 1
    out[#out + 1] = allowed
    out[#out + 1] = remaining
    out[#out + 1] = after - now
    out[#out + 1] = retry
    if allowed == 0 and not dry then stopped = true end
  end
end
return out
"""

_SYNC = """
-- Hybrid sync: KEYS[1] a TAT; ARGV[1] microseconds consumed elsewhere (cost x T, summed).
-- Adds them (from now when the bucket is full) and returns the TAT minus now: the debt.
{clock}
local stored = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local tat = stored
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1])
if tat > now and tat ~= stored then
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now + 999) / 1000))
end
return tat - now
"""

DECIDE_SCRIPT = Script(_DECIDE.format(clock=_CLOCK))
DECIDE_SCRIPT_TEST = Script(_DECIDE.format(clock=_CLOCK_TEST))
SYNC_SCRIPT = Script(_SYNC.format(clock=_CLOCK))
SYNC_SCRIPT_TEST = Script(_SYNC.format(clock=_CLOCK_TEST))


def digest(key: bytes) -> bytes:
    """The stored (and logged) stand-in of a limiter key: 32 hex digits of BLAKE2b-128."""
    return hashlib.blake2b(key, digest_size=16).hexdigest().encode("ascii")


def redis_keys(prefix: bytes, key: bytes, count: int) -> list[bytes]:
    """The TAT keys of `count` limits for one limiter key (one cluster slot)."""
    base = prefix + hash_tag(digest(key)) + b":"
    return [base + b"%d" % i for i in range(count)]


def decide_args(
    emissions: Sequence[int], bursts: Sequence[int], costs: Sequence[int], dry_runs: Sequence[bool]
) -> list[int]:
    """The script's ARGV for these limits (constant per middleware: build it once)."""
    args: list[int] = []
    for t, b, c, d in zip(emissions, bursts, costs, dry_runs, strict=True):
        args += [t, b, c, 1 if d else 0]
    return args


def unpack_decisions(reply: Sequence[int], dry_runs: Sequence[bool]) -> tuple[int, int, int, int]:
    """(refused index or -1, remaining, reset_after_us, retry_after_us) from the script's
    reply: the refusing enforcing limit, else the admitting enforcing limit with the least
    remaining (as LimitSet.decide)."""
    best: tuple[int, int, int, int] | None = None
    for i, dry in enumerate(dry_runs):
        evaluated, allowed, remaining, reset, retry = reply[5 * i : 5 * i + 5]
        if not evaluated or dry:
            continue
        if not allowed:
            return i, remaining, reset, retry
        if best is None or remaining < best[1]:
            best = (-1, remaining, reset, retry)
    return best if best is not None else (-1, 0, 0, 0)


log = logging.getLogger("fastgate.rate_limit")

# A store's decision: (refused limit index or -1, remaining, reset_after_us, retry_after_us);
# None means "refuse with 503" (Redis unavailable and the policy is fail_closed).
Result = tuple[int, int, int, int] | None


def key_prefix(middleware: str) -> bytes:
    """Where a middleware's buckets live in Redis; every Redis-backed store uses it."""
    return b"fg:rl:" + middleware.encode() + b":"


class Outage:
    """What a Redis-backed store does while Redis cannot answer, and the record of it.

    fail_open decides with `fallback` (the limits divided among the instances expected to
    share them); fail_closed answers None (503). The first failure of an outage is logged
    (once), every decision made without Redis is counted, and the first success after it
    logs the end with that count.
    """

    def __init__(self, middleware: str, fallback: LimitSet, fail_open: bool, share: int) -> None:
        self.middleware = middleware
        self.fallback = fallback
        self.fail_open = fail_open
        self.share = share
        self.down = False
        self.outages = 0
        self.local_decisions = 0  # decided (or refused) without Redis, over all outages
        self._this_outage = 0

    def begin(self, why: object) -> None:
        """Redis failed: log it if this starts an outage."""
        if not self.down:
            self.down = True
            self.outages += 1
            self._this_outage = 0
            if self.fail_open:
                action = f"each worker enforces 1/{self.share} of each limit locally"
            else:
                action = "refusing requests with 503 (fail_closed)"
            log.warning(
                "rate limit %s: Redis unavailable (%s); %s until it returns",
                self.middleware,
                why,
                action,
            )

    def decide(self, key: bytes, why: object) -> Result:
        """A decision without Redis, per the policy."""
        self.begin(why)
        self.local_decisions += 1
        self._this_outage += 1
        if not self.fail_open:
            return None
        index, remaining, reset, retry, _ = self.fallback.decide(key)
        return index, remaining, reset, retry

    def recovered(self) -> None:
        if self.down:
            self.down = False
            log.warning(
                "rate limit %s: Redis is back; %d decision(s) were made without it",
                self.middleware,
                self._this_outage,
            )


class RedisStore:
    """Each decision by DECIDE_SCRIPT on `client`; see the module docstring."""

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
    ) -> None:
        self.client = client
        self.prefix = key_prefix(middleware)
        self.args = decide_args(emissions, bursts, costs, dry_runs)
        self.dry_runs = tuple(dry_runs)
        self.count = len(self.dry_runs)
        self.outage = outage
        self.on_dry_refusal = on_dry_refusal
        self.allowed = [0] * self.count
        self.denied = [0] * self.count

    def decide(self, key: bytes) -> Any:
        """A Result now when Redis is known to be down, else a coroutine resolving to one."""
        if not self.client.available:
            return self.outage.decide(key, "not connected")
        return self._ask(key)

    async def _ask(self, key: bytes) -> Result:
        try:
            reply = await self.client.eval_script(
                DECIDE_SCRIPT, redis_keys(self.prefix, key, self.count), self.args
            )
            self._count(reply, key)
            result = unpack_decisions(reply, self.dry_runs)
        except Exception as exc:  # RedisError, or a reply of the wrong shape: never a 500
            return self.outage.decide(key, exc)
        self.outage.recovered()
        return result

    def _count(self, reply: Sequence[int], key: bytes) -> None:
        for i in range(self.count):
            if reply[5 * i]:
                if reply[5 * i + 1]:
                    self.allowed[i] += 1
                else:
                    self.denied[i] += 1
                    if self.dry_runs[i]:
                        self.on_dry_refusal(i, key)

    def stats(self) -> list[dict[str, int]]:
        return [{"allowed": a, "denied": d} for a, d in zip(self.allowed, self.denied, strict=True)]
