"""`fastgate check` output: a validated Config in words, one fact per line."""

from __future__ import annotations

from fastgate.config.schema import Config, Middleware, Route
from fastgate.errors import ConfigError


def _seconds(value: float) -> str:
    return f"{value:g}s"


def describe_route(route: Route) -> str:
    """`host path (type) methods -> service`, e.g. `* /api (prefix) GET,POST -> api`."""
    match = route.match
    hosts = ",".join(match.hosts) or "*"
    methods = ",".join(match.methods) or "ANY"
    return f"{hosts} {match.path} ({match.path_type}) {methods} -> {route.service}"


def describe_middleware(config: Config, name: str, mw: Middleware) -> list[str]:
    """What a middleware does, in words, for the types that can say (rate_limit: each limit,
    e.g. `100 requests per minute per client IP, bursts up to 20, shared by routes a, b`)."""
    if mw.type != "rate_limit":
        return []
    from fastgate.ratelimit.options import describe, parse_options

    routes = [r.name for r in config.routes if name in r.middlewares]
    try:
        return describe(parse_options(dict(mw.options)), routes, config.worker_count())
    except ConfigError as exc:
        return [f"invalid options: {line}" for line in exc.lines()]


def summarize(config: Config, source: str) -> list[str]:
    """The lines `fastgate check` prints for a valid configuration loaded from `source`."""
    workers = f"{config.workers}" if config.workers else f"{config.worker_count()} (CPU count)"
    lines = [f"config: {source}", f"workers: {workers}, log level: {config.log_level}", ""]

    lines.append("entrypoints:")
    for name, ep in config.entrypoints.items():
        trusted = ", ".join(ep.forwarded.trusted_ips)
        extra = f", trusted proxies: {trusted}" if trusted else ""
        lines.append(f"  {name}: {ep.address}{extra}")

    lines.append("routes:" if config.routes else "routes: none (every request gets 404)")
    for route in config.routes:
        details = []
        if route.priority:
            details.append(f"priority {route.priority}")
        if route.entrypoints:
            details.append(f"on {', '.join(route.entrypoints)}")
        if route.middlewares:
            details.append(f"middlewares {', '.join(route.middlewares)}")
        tail = f"  [{'; '.join(details)}]" if details else ""
        lines.append(f"  {route.name}: {describe_route(route)}{tail}")

    lines.append("services:" if config.services else "services: none")
    for name, service in config.services.items():
        servers = ", ".join(
            s.url if s.weight == 1 else f"{s.url} (weight {s.weight})" for s in service.servers
        )
        t = config.effective_timeouts(name)
        p = config.effective_pool(name)
        lines.append(f"  {name}: {servers}")
        lines.append(
            f"    timeouts: connect {_seconds(t.upstream_connect)}, response "
            f"{_seconds(t.upstream_response)}, idle {_seconds(t.upstream_idle)}; pool: "
            f"{p.max_idle} idle, closed after {_seconds(p.idle_timeout)}"
        )

    if config.middlewares:
        lines.append("middlewares:")
        for name, mw in config.middlewares.items():
            lines.append(f"  {name}: {mw.type}")
            lines.extend(f"    {line}" for line in describe_middleware(config, name, mw))

    t = config.timeouts
    lim = config.limits
    body = "unlimited" if lim.max_body_bytes == 0 else f"{lim.max_body_bytes} bytes"
    lines += [
        f"client timeouts: head {_seconds(t.head)}, idle {_seconds(t.idle)}, "
        f"body {_seconds(t.body)}; drain {_seconds(config.drain_timeout)}",
        f"limits: head {lim.max_head_bytes} bytes, {lim.max_headers} headers, target "
        f"{lim.max_target} bytes, body {body}, {lim.max_pipeline_bytes} bytes pipelined",
        f"admin: {config.admin.address}" if config.admin.enabled else "admin: disabled",
    ]
    if config.demo_origin.enabled:
        lines.append(f"demo origin: {config.demo_origin.address}")
    return lines
