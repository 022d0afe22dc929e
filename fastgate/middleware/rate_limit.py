"""`type: rate_limit`: GCRA limits per key, an in-flight cap, local or shared through Redis.

    middlewares:
      api_limit:
        type: rate_limit
        key: client_ip                # or [client_ip, "header:X-Tenant"], identity.subject, ...
        limits:
          - {rate: 10/second, burst: 20}
          - {rate: 1000/hour}
        in_flight: 5                  # concurrent requests per key
        scope: route                  # or shared (one bucket for every route using it)
        store: local                  # or redis / hybrid, with redis: <providers.redis name>

Every option, and the behaviour of each store, is in docs/rate-limiting.md. This module is
the small unit STYLE.md §7 asks for: options validated once (fastgate.ratelimit.options),
then per request: extract the key, decide, refuse or continue. Where the request head alone
gives the key and the store is local or hybrid, `core_check(route)` hands the route a C check
(fastgate._core.ratecheck.RateCheck) and this class's `on_request` never runs for it; both
paths share the same buckets and counters. A hybrid check decides in C while its store is
synced with Redis and hands decisions to the store's Python path while it is not (the outage
policy).

What the exchange is told (the access log's rate outcome, the audit line of a refusal): every
decision of the Python path is noted on the connection, `conn.note_rate(RATE_ALLOWED)` for an
admission (a dry-run refusal is one), `note_rate(RATE_LIMITED)` with
`note_deny(DENY_RATE_LIMITED, name, reason)` for a refusal (reason: "limit <i> exceeded", "too
many in flight" or "rate limit store unavailable", fixed phrases, never the key), and
RATE_FALLBACK for an admission by the outage policy while Redis is unavailable. The C check
writes the same into the exchange record itself (fastgate/_core/ratecheck.pyx), except while
the hybrid store is down: then its fallback here notes the decision. A request skipped for an
absent key part gets no decision. The admitted Python path adds no Python frame for this.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastgate._core.accesslog import DENY_RATE_LIMITED, RATE_ALLOWED, RATE_FALLBACK, RATE_LIMITED
from fastgate._core.ratecheck import (
    BUSY_REASON,
    LIMIT_REASONS,
    UNAVAILABLE_REASON,
    InFlight,
    KeyBuilder,
    RateCheck,
)
from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.registry import register
from fastgate.ratelimit.keys import display_key, extras_of, key_spec
from fastgate.ratelimit.local import DryRunLog, limit_set, limiter_for
from fastgate.ratelimit.options import RateLimitOptions, describe, parse_options
from fastgate.ratelimit.replies import Replies

log = logging.getLogger("fastgate.rate_limit")


@register
class RateLimit:
    """One `rate_limit` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "rate_limit"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = self.options = parse_options(options)
        self.name = name
        limits = opts.limits
        self.policy_names = [
            lim.name or (name if len(limits) == 1 else f"{name}-{i}")
            for i, lim in enumerate(limits)
        ]
        self.replies = Replies(opts.headers, self.policy_names, limits, opts.message)
        self.dry_log = DryRunLog(name, limits, self.render, opts.dry_run_log_interval)
        self.local = (
            limit_set(limits, opts.max_keys, dry_log=self.dry_log)
            if limits and opts.store == "local"
            else None
        )
        self.inflight = InFlight(opts.in_flight) if opts.in_flight else None
        self.identity_parts = tuple(p for p in opts.key if not p.in_c)
        self._anonymous = (None,) * len(self.identity_parts)  # extras without an identity
        self.skip_absent = opts.missing_key == "skip"
        self.per_route = opts.scope == "route" or any(p.kind == "route" for p in opts.key)
        self._keys: dict[str | None, KeyBuilder] = {}
        self.store: Any = None  # RedisStore / HybridStore, set by bind()
        self.routes: tuple[str, ...] = ()
        self.workers = 1

    # ---- compile time -----------------------------------------------------------------------

    def bind(self, context: Any) -> None:
        """Learn which routes use this middleware and, for the Redis stores, get the
        provider's client (config compile, once per generation)."""
        self.routes = tuple(context.routes_using(self.name))
        self.workers = context.config.worker_count()
        opts = self.options
        if opts.store == "local" or not opts.limits:
            return
        from fastgate.ratelimit.clients import redis_client
        from fastgate.ratelimit.hybrid import HybridStore
        from fastgate.ratelimit.redis import Outage, RedisStore

        provider = context.config.providers.redis.get(opts.redis)
        if provider is None:
            raise ConfigError("redis", f"unknown redis provider {opts.redis!r}")
        client = redis_client(opts.redis, provider)
        share = opts.expected_instances or context.config.worker_count()
        outage = Outage(
            self.name,
            limit_set(opts.limits, opts.max_keys, share=share),
            opts.on_redis_error == "fail_open",
            share,
        )
        common = dict(
            middleware=self.name,
            client=client,
            emissions=[limiter_for(lim, 1).emission_us for lim in opts.limits],
            bursts=[lim.burst for lim in opts.limits],
            costs=[lim.cost for lim in opts.limits],
            dry_runs=[lim.dry_run for lim in opts.limits],
            outage=outage,
            on_dry_refusal=self.dry_log.note,
        )
        if opts.store == "redis":
            self.store = RedisStore(**common)
        else:
            self.store = HybridStore(
                **common, sync_interval=opts.sync_interval, max_keys=opts.max_keys
            )

    def keys_for(self, route: str) -> KeyBuilder:
        """The key builder of `route` (one per route with scope route, else shared)."""
        slot = route if self.per_route else None
        builder = self._keys.get(slot)
        if builder is None:
            spec = key_spec(self.options, route, prefix=self.options.scope == "route")
            builder = self._keys[slot] = KeyBuilder(spec, self.options.ipv6_prefix)
        return builder

    def core_check(self, route: str) -> RateCheck | None:
        """A C check for `route` when the key needs no identity and the store is local, or
        hybrid (its LimitSet, with the outage policy in Python as the fallback)."""
        opts = self.options
        if opts.in_c:
            limits, fallback = self.local, None
        elif opts.store == "hybrid" and self.store is not None and all(p.in_c for p in opts.key):
            limits, fallback = self.store.limits, self._hybrid_fallback
        else:
            return None
        return RateCheck(
            self.keys_for(route),
            limits,
            self.inflight,
            self._reject,
            self._reject_busy,
            self.skip_absent,
            fallback,
            self.name,
        )

    def _hybrid_fallback(self, conn: Any, key: bytes) -> LocalReply | None:
        """The hybrid C check while its store is not synced: the store's Python path."""
        outage = self.store.outage
        before = outage.local_decisions
        result = self.store.decide(key)  # a HybridStore answers at once
        return self._verdict(result, key, conn, outage.local_decisions != before)

    def describe(self) -> list[str]:
        return describe(self.options, self.routes, self.workers)

    # ---- per request --------------------------------------------------------------------------

    def on_request(self, ctx: RequestContext) -> Any:
        extras: tuple[bytes | None, ...] = ()
        if self.identity_parts:
            identity = ctx.identity
            extras = (
                self._anonymous if identity is None else extras_of(self.identity_parts, identity)
            )
        conn = ctx.conn
        route = ctx.head.route.name
        keys = self._keys.get(route if self.per_route else None) or self.keys_for(route)
        key, absent = keys.key(conn, ctx.head, extras)
        if absent and self.skip_absent:
            return None
        if self.inflight is not None:
            if not self.inflight.acquire(conn, key):
                return self._refuse(conn, self._reject_busy(key), BUSY_REASON)
            conn.on_done(self.inflight.release)
        if self.store is None:
            if self.local is not None:
                index, remaining, _, retry, limit = self.local.decide(key)
                if index >= 0:
                    reply = self._reject(index, remaining, 0, retry, limit, key)
                    return self._refuse(conn, reply, LIMIT_REASONS[index])
            conn.note_rate(RATE_ALLOWED)  # inline: the admitted path adds no Python frame
            return None
        outage = self.store.outage
        before = outage.local_decisions
        result = self.store.decide(key)
        if result is None or type(result) is tuple:
            return self._verdict(result, key, conn, outage.local_decisions != before)
        return self._after(result, key, conn)

    async def _after(self, pending: Any, key: bytes, conn: Any) -> LocalReply | None:
        result = await pending
        # A RedisStore marks its outage down (a decision by the policy) or recovered (Redis
        # answered) just before its coroutine returns, with no await in between, so the flag
        # tells this decision apart from those of concurrent requests.
        return self._verdict(result, key, conn, self.store.outage.down)

    def _verdict(
        self, result: tuple[int, int, int, int] | None, key: bytes, conn: Any, fallback: bool
    ) -> LocalReply | None:
        """Note a store's decision on the connection and answer it (`fallback`: the decision
        came from the outage policy, Redis being unavailable)."""
        if result is None:  # fail_closed while Redis is unavailable
            return self._refuse(conn, self.replies.unavailable(), UNAVAILABLE_REASON)
        index, remaining, _, retry = result
        if index >= 0:
            reply = self._reject(index, remaining, 0, retry, 0, key)
            return self._refuse(conn, reply, LIMIT_REASONS[index])
        conn.note_rate(RATE_FALLBACK if fallback else RATE_ALLOWED)
        return None

    def _refuse(self, conn: Any, reply: LocalReply, reason: str) -> LocalReply:
        """A refusal of the Python path: the exchange's rate outcome and audit facts."""
        conn.note_rate(RATE_LIMITED)
        conn.note_deny(DENY_RATE_LIMITED, self.name, reason)
        return reply

    def _reject(
        self, index: int, remaining: int, reset: int, retry: int, limit: int, key: bytes
    ) -> LocalReply:
        """The 429 of limit `index` (the C check calls it too, after noting the refusal)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rate limit %s: limit %d refused %s", self.name, index, self.render(key))
        return self.replies.limited(index, remaining, retry)

    def _reject_busy(self, key: bytes) -> LocalReply:
        """The in-flight refusal (the C check calls it too, after noting the refusal)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rate limit %s: too many in flight for %s", self.name, self.render(key))
        return self.replies.busy()

    # ---- operations ---------------------------------------------------------------------------

    def render(self, key: bytes) -> str:
        """`key` as log-safe text (header values hashed)."""
        return display_key(key, self.options.ipv6_prefix)

    def stats(self) -> dict[str, Any]:
        """Counters: per limit allowed/denied, in-flight refusals, Redis outages."""
        out: dict[str, Any] = {"limits": []}
        if self.local is not None:
            out["limits"] = self.local.stats()
        elif self.store is not None:
            out["limits"] = self.store.stats()
            out["outages"] = self.store.outage.outages
            out["local_decisions"] = self.store.outage.local_decisions
        if self.inflight is not None:
            out["in_flight_refused"] = self.inflight.refused
        return out

    def close(self) -> None:
        """The generation is retired: stop background work (the hybrid sync)."""
        close = getattr(self.store, "close", None)
        if close is not None:
            close()


__all__ = ["RateLimit", "RateLimitOptions"]
