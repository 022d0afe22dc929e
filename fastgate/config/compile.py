"""Config -> Runtime: the immutable objects one worker serves a config generation with.

Compiled once per worker per generation; a reload compiles a new Runtime and swaps each
entrypoint's `cfg`, so a request always sees one whole generation. Failing here leaves the
running generation untouched.

Some problems can only be found here, not by the schema: certificate, key and CA files that
do not load (entrypoint and upstream TLS), a middleware type nobody registered or options its
class refuses, a route path the router refuses. They are reported like schema errors, as one
ConfigError listing every `(key path, reason)`. The supervisor runs `check_runtime` on every
new config before any worker sees it, so a config that would not compile is refused as a
whole, never half-applied.

Each compiled Route carries its access-log rule (`log_sample`, a u32 threshold from
accesslog.sample_threshold, and `log_errors`: the route's `access_log` settings over the
global ones; `access_log: false` is 0 / False) and its K_RATE metric row (`stats_rate`), so
the exchange end decides and counts in C. A change of these is a plain reload: the log
streams themselves are not rebuilt for it (fastgate/logs/runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from fastgate._core import accesslog
from fastgate._core.conn import Engine, EntryConfig, Route, ServerPool, Service
from fastgate._core.httphead import Limits
from fastgate._core.router import Router, RouteSpec
from fastgate.config.schema import Config, UpstreamTls
from fastgate.config.schema import Route as RouteConfig
from fastgate.errors import ConfigError
from fastgate.middleware import registry
from fastgate.tls.client import build_client_context, server_hostname
from fastgate.tls.server import TlsGeneration, build_generation

__all__ = [
    "BuildContext",
    "Runtime",
    "check_runtime",
    "compile_runtime",
    "owned_headers",
    "request_headers",
    "response_headers",
    "route_log_rule",
    "split_chain",
]

log = logging.getLogger("fastgate.config")


@dataclass(frozen=True)
class Runtime:
    """One config generation as a worker serves it."""

    config: Config
    entries: dict[str, EntryConfig]
    services: dict[str, Service]
    pools: tuple[ServerPool, ...]
    middlewares: dict[str, Any] = field(default_factory=dict)
    tls: dict[str, TlsGeneration] = field(default_factory=dict)  # TLS entrypoints' contexts

    def retire(self) -> None:
        """Stop pooling this generation's upstream connections (busy ones finish first) and
        stop its middlewares' background work (those that have a `close()`)."""
        for pool in self.pools:
            pool.close_idle()
        for service in self.services.values():
            service.retire()
        for name, mw in self.middlewares.items():
            close = getattr(mw, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("middleware %s: close failed", name)


@dataclass(frozen=True)
class BuildContext:
    """What a middleware may learn of the whole config at compile time, through its optional
    `bind(context)` method (called once, right after it is built): the config itself (e.g.
    `providers`) and which routes use it."""

    config: Config

    def routes_using(self, middleware: str) -> tuple[str, ...]:
        return tuple(r.name for r in self.config.routes if middleware in r.middlewares)


def split_chain(route: str, chain: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(C checks, Python chain) for a route: each leading middleware whose `core_check(route)`
    gives a CoreCheck runs as that check, in C, before the Python chain. Only a leading run is
    moved, so the order of everything stays as configured (a check never jumps ahead of,
    say, an auth middleware whose identity a later limit reads)."""
    checks = []
    for mw in chain:
        hook = getattr(mw, "core_check", None)
        check = hook(route) if hook is not None else None
        if check is None:
            break
        checks.append(check)
    return tuple(checks), chain[len(checks) :]


def owned_headers(chain: tuple[Any, ...]) -> tuple[bytes, ...]:
    """Request header names the route's middlewares own (their `strip_request_headers`):
    identity headers they set and credentials they consume. A client's own copy of such a
    header never reaches the service, so a service can trust what it sees (DESIGN.md §5)."""
    names: dict[bytes, None] = {}
    for mw in chain:
        for name in getattr(mw, "strip_request_headers", ()):
            names[name.lower()] = None
    return tuple(names)


def request_headers(chain: tuple[Any, ...]) -> bytes | None:
    """Header lines added to every request the route sends upstream: each middleware's
    `request_header_lines` (validated `Name: value\r\n` lines, e.g. the `headers` type's
    set / add), in chain order. The client's copies of `set` names are dropped through
    `strip_request_headers` (owned_headers). None when there are none."""
    lines = b"".join(getattr(mw, "request_header_lines", b"") for mw in chain)
    return lines or None


def response_headers(chain: tuple[Any, ...]) -> tuple[bytes | None, tuple[bytes, ...]]:
    """(header lines, names to drop) for the route's responses: each middleware's
    `response_header_lines` (validated `Name: value\r\n` lines, in chain order) replace the
    service's own headers of the names in `strip_response_headers`."""
    lines = b"".join(getattr(mw, "response_header_lines", b"") for mw in chain)
    names: dict[bytes, None] = {}
    for mw in chain:
        for name in getattr(mw, "strip_response_headers", ()):
            names[name.lower()] = None
    return (lines or None), tuple(names)


def route_log_rule(config: Config, route: RouteConfig) -> tuple[int, bool]:
    """(Route.log_sample, Route.log_errors) for `route`: its own `access_log` settings over
    the global `access_log` ones; `access_log: false` is (0, False): never logged."""
    rule = route.access_log
    sample = config.access_log.sample
    errors = config.access_log.always_log_errors
    if rule is not None:
        if not rule.enabled:
            return 0, False
        if rule.sample is not None:
            sample = rule.sample
        if rule.always_log_errors is not None:
            errors = rule.always_log_errors
    return accesslog.sample_threshold(sample), errors


def _route_field(message: str) -> str:
    """The `match` key a RouteSpec complaint is about (its message starts with the field)."""
    for word, key in (("path", "path"), ("host", "hosts"), ("method", "methods")):
        if message.startswith(word):
            return f".{key}"
    return ""


def _build_services(
    config: Config, engine: Engine, errors: list[tuple[str, str]]
) -> tuple[dict[str, Service], list[ServerPool]]:
    pools: list[ServerPool] = []
    services: dict[str, Service] = {}
    # Services with the same upstream TLS settings share one client context (loading the
    # system roots takes tens of ms); an insecure one is built per service, so each warns.
    contexts: dict[UpstreamTls | None, ssl.SSLContext] = {}
    for name, svc in config.services.items():
        timeouts = config.effective_timeouts(name)
        pool_cfg = config.effective_pool(name)
        members = []
        context = contexts.get(svc.tls)
        if context is None and any(server.tls for server in svc.servers):
            try:
                context = build_client_context(f"services.{name}.tls", svc.tls)
            except ConfigError as exc:
                errors.extend(exc.errors)
                continue
            if svc.tls is None or not svc.tls.insecure_skip_verify:
                contexts[svc.tls] = context
        for server in svc.servers:
            pool = ServerPool(
                engine,
                server.url,
                server.host,
                server.port,
                max_idle=pool_cfg.max_idle,
                idle_timeout=pool_cfg.idle_timeout,
                connect_timeout=timeouts.upstream_connect,
                response_timeout=timeouts.upstream_response,
                idle_body_timeout=timeouts.upstream_idle,
                ssl=context if server.tls else None,
                server_hostname=server_hostname(svc.tls, server) if server.tls else None,
            )
            # Metric rows are fixed here, not per request (fastgate/_core/stats.pyx).
            pool.stats_row = engine.shard.register_server(name, server.url)
            members.append(pool)
        pools.extend(members)
        if len(members) == len(svc.servers):
            services[name] = build_service(name, svc, members, engine)
    return services, pools


def build_service(name: str, svc: Any, members: list[ServerPool], engine: Engine) -> Service:
    """The C Service for `services.<name>`: balancer, health, retries, breaker, limits."""
    service = Service(name, members, [s.weight for s in svc.servers])
    service.attach_stats(engine.shard, engine.shard.register_service(name))
    b = svc.balancer
    service.set_balancer(b.type, b.hash_on, b.name, b.cookie, b.cookie_max_age)
    service.set_health(svc.health_check is not None, svc.when_all_unhealthy == "panic")
    od = svc.outlier_detection
    if od is not None:
        service.set_outlier_detection(
            od.consecutive_errors, od.base_ejection, od.max_ejection, od.max_ejected_percent
        )
    r = svc.retries
    service.set_retries(r.attempts, r.retry_on, r.statuses, r.budget_percent, r.min_per_second)
    cb = svc.circuit_breaker
    if cb is not None:
        service.set_circuit_breaker(
            cb.window,
            cb.min_requests,
            cb.error_ratio,
            cb.slow_ratio,
            cb.slow_threshold,
            cb.open_for,
            cb.half_open_requests,
        )
    lim = svc.limits
    service.set_limits(lim.max_concurrent, lim.max_queue, lim.queue_timeout)
    return service


def path_rules(chain: tuple[Any, ...]) -> tuple[tuple[bytes, ...], bytes | None, Any]:
    """(strip_prefixes, add_prefix, compress rule) of a route: what its strip_prefix,
    add_prefix and compress middlewares ask, done in C (no per-request Python)."""
    strip: list[bytes] = []
    add: bytes | None = None
    rule = None
    for mw in chain:
        strip.extend(getattr(mw, "strip_prefixes", ()))
        prefix = getattr(mw, "add_prefix", None)
        if prefix is not None:
            add = prefix if add is None else add + prefix
        rule = getattr(mw, "compress_rule", None) or rule
    return tuple(strip), add, rule


def _build_middlewares(config: Config, errors: list[tuple[str, str]]) -> dict[str, Any]:
    """Every named middleware, built once (unused ones too, so their options are checked)."""
    built: dict[str, Any] = {}
    context = BuildContext(config)
    for name, mw in config.middlewares.items():
        at = f"middlewares.{name}"
        try:
            obj = registry.build(name, mw.type, dict(mw.options))
            bind = getattr(obj, "bind", None)
            if bind is not None:
                bind(context)
            built[name] = obj
        except ConfigError as exc:
            # A middleware may name its key relative to itself (`rate`) or in full.
            errors.extend(
                (p if p.startswith(at) else f"{at}.{p}" if p else at, r) for p, r in exc.errors
            )
        except (ValueError, TypeError) as exc:
            errors.append((at, str(exc)))
    return built


def compile_runtime(config: Config, engine: Engine) -> Runtime:
    """Build routers, services, pools and middleware chains for every entrypoint.

    Raises ConfigError listing every problem; nothing is left registered that matters then
    (the pools built so far are closed).
    """
    errors: list[tuple[str, str]] = []
    services, pools = _build_services(config, engine, errors)
    chains = _build_middlewares(config, errors)

    entries: dict[str, EntryConfig] = {}
    tls: dict[str, TlsGeneration] = {}
    shard = engine.shard
    for ep_name, ep in config.entrypoints.items():
        head_limits = config.entry_limits(ep_name)
        limits = Limits(
            max_head_bytes=head_limits.max_head_bytes,
            max_headers=head_limits.max_headers,
            max_target=head_limits.max_target,
        )
        if ep.tls is not None:
            try:
                tls[ep_name] = build_generation(f"entrypoints.{ep_name}.tls", ep.tls)
            except ConfigError as exc:
                errors.extend(exc.errors)
        specs = []
        for i, route in enumerate(config.routes):
            if route.entrypoints and ep_name not in route.entrypoints:
                continue
            service = services.get(route.service)
            chain = tuple(chains.get(m) for m in route.middlewares)
            if service is None or None in chain:
                continue  # already reported under services / middlewares
            strip = owned_headers(chain)
            buffer_body = max((getattr(mw, "request_body_limit", 0) for mw in chain), default=0)
            response_lines, response_strip = response_headers(chain)
            request_lines = request_headers(chain)  # the only source of extra_headers today
            strip_prefixes, add_prefix, compress = path_rules(chain)
            if (strip_prefixes or add_prefix) and any(
                getattr(mw, "rewrites_target", False) for mw in chain
            ):
                errors.append(
                    (
                        f"routes[{i}].middlewares",
                        "replace_path_regex and strip_prefix/add_prefix on one route: "
                        "use one way of rewriting the path",
                    )
                )
                continue
            timeouts = config.route_timeouts(route)
            # A middleware without on_request (security_headers, headers) works through the route's
            # static response headers alone: it costs nothing per request.
            chain = tuple(mw for mw in chain if getattr(mw, "on_request", None) is not None)
            checks, chain = split_chain(route.name, chain)
            # The first Python middleware's verified credentials are looked up in C.
            fast_auth = getattr(chain[0], "credential_cache", None) if chain else None
            try:
                target = Route(
                    route.name,
                    service,
                    chain,
                    extra_headers=request_lines,
                    checks=checks,
                    strip_headers=strip,
                    buffer_body=buffer_body,
                    response_headers=response_lines,
                    response_strip=response_strip,
                    fast_auth=fast_auth,
                    timeouts=(
                        timeouts.upstream_connect,
                        timeouts.upstream_response,
                        timeouts.upstream_idle,
                        timeouts.upstream_total or 0.0,
                    ),
                    max_body=-1 if route.max_body_bytes is None else route.max_body_bytes,
                    strip_prefixes=strip_prefixes,
                    add_prefix=add_prefix,
                    compress=compress,
                )
                target.stats_row = shard.register_route(ep_name, route.name, route.service)
                target.stats_local = shard.register_route(ep_name, route.name, "")
                target.stats_rate = shard.register_rate(route.name)
                target.log_sample, target.log_errors = route_log_rule(config, route)
                specs.append(
                    RouteSpec(
                        target=target,
                        path=route.match.path,
                        path_type=route.match.path_type,
                        hosts=tuple(route.match.hosts),
                        methods=tuple(route.match.methods),
                        priority=route.priority,
                    )
                )
            except ValueError as exc:
                problem = (f"routes[{i}].match{_route_field(str(exc))}", str(exc))
                if problem not in errors:  # a route on several entrypoints fails once
                    errors.append(problem)
        try:
            router = Router(specs)
        except (ValueError, TypeError) as exc:
            errors.append((f"entrypoints.{ep_name}", f"cannot build the route table: {exc}"))
            continue
        entries[ep_name] = EntryConfig(
            router,
            limits,
            head_timeout=config.timeouts.head,
            idle_timeout=config.timeouts.idle,
            body_timeout=config.timeouts.body,
            max_body=config.limits.max_body_bytes,
            proto=b"https" if ep.tls is not None else b"http",
            trusted_nets=ep.forwarded.networks(),
            forwarded_header=ep.forwarded.forwarded_header,
            trust_trace_context=ep.forwarded.trust_trace_context,
            trust_request_id=ep.forwarded.trust_request_id,
            trace_sampled=ep.forwarded.trace_sampled,
            max_held=config.limits.max_pipeline_bytes,
            max_connections=ep.max_connections,
            min_body_rate=config.limits.min_body_rate,
        )
        entries[ep_name].stats_entry = shard.register_entry(ep_name)
        entries[ep_name].stats_noroute = shard.register_route(ep_name, "", "")
    runtime = Runtime(config, entries, services, tuple(pools), chains, tls)
    if errors:
        runtime.retire()
        raise ConfigError.from_errors(errors)
    return runtime


def check_runtime(config: Config) -> None:
    """Compile `config` once and throw the result away: the checks every worker would make,
    made in the supervisor before a worker sees the config. Raises ConfigError.

    The engine runs on a private, never-started event loop, so nothing is scheduled on the
    caller's loop and no connection is opened.
    """
    loop = asyncio.new_event_loop()
    try:
        engine = Engine(loop, None, tick_interval=1.0)
        try:
            compile_runtime(config, engine).retire()
        finally:
            engine.close()
    finally:
        loop.close()
