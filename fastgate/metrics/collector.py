"""The supervisor's `/metrics`: every worker slot summed, plus the supervisor's own state.

Rules this file obeys:
- Read-only: slot files are mapped PROT_READ; nothing here can change a worker's counters.
- Sums are by label set across slots, so a request counts once whichever worker served it,
  and a retired or restarted worker's counts stay in the totals. Gauges derived from
  counters (open connections = opened - closed) only take slots whose writer is alive: a
  killed worker's connections died with it.
- Names and labels are the fixed contract of docs/observability.md; label values come only
  from config names, server URLs and fixed enums (never a path or a client address).
- The exposition format follows the scrape's Accept header (OpenMetrics when asked for, the
  Prometheus text format otherwise) through prometheus_client's own encoders.
- The work is bounded by the name tables (ROWS rows per table per slot) and is plain CPU: a
  scrape reads a few KiB of tmpfs pages and /proc/<pid>/stat per worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from fastgate._core.stats import BUCKETS, CLASSES, METHODS, OFFSETS, OVERFLOW, Shard
from fastgate.metrics.slots import StatsDir

K_ROUTE, K_SERVER, K_ENTRY, K_RATE, K_AUTH, K_LOG, K_SERVICE = range(7)
LOG_STREAMS = ("access", "audit")  # always reported (0 when off); "spans" once it counted
N_CLASSES, N_BUCKETS = len(CLASSES), len(BUCKETS)
_LE = [("+Inf" if b == float("inf") else repr(b)) for b in BUCKETS]
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class GatewayState:
    """What the supervisor knows that the slots do not (filled at each scrape)."""

    workers: list[tuple[int, int]] = field(default_factory=list)  # (slot, pid), live ones
    generation: int = 0
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    last_reload: float = 0.0  # unix time of the last successful (re)load
    servers: list[tuple[str, str]] = field(default_factory=list)  # (service, url) configured
    tls_entrypoints: list[str] = field(default_factory=list)


Table = dict[tuple[str, ...], list[int]]


def sum_slots(shards: Iterable[Shard], kind: int, live_pids: set[int] | None = None) -> Table:
    """labels -> words summed over `shards` (only those written by `live_pids`, if given)."""
    total: Table = {}
    for shard in shards:
        if live_pids is not None and shard.pid not in live_pids:
            continue
        for labels, words in shard.table(kind):
            acc = total.get(labels)
            if acc is None:
                total[labels] = list(words)
            else:
                for i, w in enumerate(words):
                    acc[i] += w
    # The overflow row is only shown when something overflowed into it.
    if not any(total.get(OVERFLOW[kind], ())):
        total.pop(OVERFLOW[kind], None)
    return total


def _histogram(words: list[int], first: int, sum_ns: int) -> tuple[list[tuple[str, float]], float]:
    buckets, running = [], 0
    for b in range(N_BUCKETS):
        running += words[first + b]
        buckets.append((_LE[b], running))
    return buckets, words[sum_ns] / 1e9


class GatewayCollector:
    """prometheus_client custom collector over the slot directory and the supervisor."""

    def __init__(self, stats_dir: StatsDir, state: Callable[[], GatewayState]) -> None:
        self.stats_dir = stats_dir
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        opened = self.stats_dir.open_all()
        shards = [s for _, s in opened]
        live = {pid for _, pid in state.workers}
        try:
            yield from self._requests(sum_slots(shards, K_ROUTE))
            yield from self._upstreams(
                sum_slots(shards, K_SERVER), sum_slots(shards, K_SERVER, live), state
            )
            yield from self._entrypoints(
                sum_slots(shards, K_ENTRY), sum_slots(shards, K_ENTRY, live), state
            )
            yield from self._middlewares(sum_slots(shards, K_RATE), sum_slots(shards, K_AUTH))
            yield from self._logs(sum_slots(shards, K_LOG))
            yield from self._services(
                sum_slots(shards, K_SERVICE), sum_slots(shards, K_SERVICE, live)
            )
        finally:
            for s in shards:
                s.close()
        yield from self._supervisor(state)

    def _requests(self, routes: Table) -> Iterator[Metric]:
        req = CounterMetricFamily(
            "fastgate_requests",
            "Requests answered, by route, service, method and status class.",
            labels=["entrypoint", "route", "service", "method", "code_class"],
        )
        dur = HistogramMetricFamily(
            "fastgate_request_duration_seconds",
            "Time from request head received to response sent.",
            labels=["entrypoint", "route", "service", "code_class"],
        )
        req_bytes = CounterMetricFamily(
            "fastgate_request_bytes",
            "Request body bytes received.",
            labels=["entrypoint", "route"],
        )
        resp_bytes = CounterMetricFamily(
            "fastgate_response_bytes",
            "Response bytes sent (head and body).",
            labels=["entrypoint", "route"],
        )
        per_route: dict[tuple[str, str], list[int]] = {}
        for (ep, route, service), w in routes.items():
            for m, method in enumerate(METHODS):
                for c, cls in enumerate(CLASSES):
                    n = w[OFFSETS["requests"] + m * N_CLASSES + c]
                    if n:
                        req.add_metric([ep, route, service, method, cls], n)
            for c, cls in enumerate(CLASSES):
                first = OFFSETS["buckets"] + c * N_BUCKETS
                if any(w[first : first + N_BUCKETS]):
                    buckets, total = _histogram(w, first, OFFSETS["sum_ns"] + c)
                    dur.add_metric([ep, route, service, cls], buckets, total)
            acc = per_route.setdefault((ep, route), [0, 0])
            acc[0] += w[OFFSETS["req_bytes"]]
            acc[1] += w[OFFSETS["resp_bytes"]]
        for (ep, route), (rq, rs) in per_route.items():
            req_bytes.add_metric([ep, route], rq)
            resp_bytes.add_metric([ep, route], rs)
        yield from (req, dur, req_bytes, resp_bytes)

    def _upstreams(self, servers: Table, live: Table, state: GatewayState) -> Iterator[Metric]:
        labels = ["service", "server"]
        dur = HistogramMetricFamily(
            "fastgate_upstream_request_duration_seconds",
            "Time from request sent upstream to response complete.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "fastgate_upstream_connect_errors",
            "Upstream connections that failed (TCP or TLS).",
            labels=labels,
        )
        tls = CounterMetricFamily(
            "fastgate_upstream_tls_errors",
            "Upstream TLS handshakes or sessions that failed.",
            labels=labels,
        )
        conns = GaugeMetricFamily(
            "fastgate_upstream_connections", "Open upstream connections.", labels=labels
        )
        health = GaugeMetricFamily(
            "fastgate_upstream_health",
            "1 when no worker's active health check finds the server unhealthy, else 0.",
            labels=labels,
        )
        ejections = CounterMetricFamily(
            "fastgate_upstream_ejections",
            "Times outlier detection took the server out of rotation.",
            labels=labels,
        )
        retries = CounterMetricFamily(
            "fastgate_upstream_retries",
            "Attempts at the server that were retries of a failed attempt elsewhere.",
            labels=labels,
        )
        for key, w in servers.items():
            buckets, total = _histogram(w, OFFSETS["up_buckets"], OFFSETS["up_sum_ns"])
            dur.add_metric(list(key), buckets, total)
            errors.add_metric(list(key), w[OFFSETS["connect_errors"]])
            tls.add_metric(list(key), w[OFFSETS["tls_errors"]])
            w_live = live.get(key)
            n = w_live[OFFSETS["up_opened"]] - w_live[OFFSETS["up_closed"]] if w_live else 0
            conns.add_metric(list(key), max(n, 0))
            ejections.add_metric(list(key), w[OFFSETS["ejections"]])
            retries.add_metric(list(key), w[OFFSETS["server_retries"]])
        for service, url in state.servers:
            w_live = live.get((service, url))
            down = w_live[OFFSETS["unhealthy"]] if w_live else 0
            health.add_metric([service, url], 0 if 0 < down < 1 << 63 else 1)
        yield from (dur, errors, tls, conns, health, ejections, retries)

    def _services(self, services: Table, live: Table) -> Iterator[Metric]:
        counters = (
            ("retries", "fastgate_service_retries", "Retries made."),
            (
                "budget_exhausted",
                "fastgate_service_retry_budget_exhausted",
                "Retries not made because the retry budget was spent.",
            ),
            ("cb_opened", "fastgate_service_circuit_opened", "Times the circuit breaker opened."),
            (
                "cb_rejected",
                "fastgate_service_circuit_rejected",
                "Requests refused with 503 by an open circuit.",
            ),
            ("queued", "fastgate_service_queued", "Requests that waited for a free slot."),
            (
                "rejected",
                "fastgate_service_capacity_rejected",
                "Requests refused with 503 at max_concurrent: queue full or wait timed out.",
            ),
            (
                "no_server",
                "fastgate_service_no_server",
                "Requests refused with 503: no usable server and no panic mode.",
            ),
        )
        families = [
            (word, CounterMetricFamily(name, doc, labels=["service"]))
            for word, name, doc in counters
        ]
        circuit = GaugeMetricFamily(
            "fastgate_service_circuit_open",
            "Workers whose circuit breaker for the service is open or half-open.",
            labels=["service"],
        )
        for (service,), w in services.items():
            for word, family in families:
                family.add_metric([service], w[OFFSETS[word]])
            w_live = live.get((service,))
            n = w_live[OFFSETS["cb_open"]] if w_live else 0
            circuit.add_metric([service], n if n < 1 << 63 else 0)
        yield from (family for _, family in families)
        yield circuit

    def _entrypoints(self, entries: Table, live: Table, state: GatewayState) -> Iterator[Metric]:
        conns = GaugeMetricFamily(
            "fastgate_client_connections", "Open client connections.", labels=["entrypoint"]
        )
        tls = CounterMetricFamily(
            "fastgate_tls_handshakes",
            "TLS handshakes with clients, by result.",
            labels=["entrypoint", "result"],
        )
        for (ep,), w in entries.items():
            w_live = live.get((ep,))
            n = w_live[OFFSETS["conn_opened"]] - w_live[OFFSETS["conn_closed"]] if w_live else 0
            conns.add_metric([ep], max(n, 0))
            ok, failed = w[OFFSETS["tls_ok"]], w[OFFSETS["tls_failed"]]
            if ok or failed or ep in state.tls_entrypoints:
                tls.add_metric([ep, "ok"], ok)
                tls.add_metric([ep, "failed"], failed)
        yield from (conns, tls)

    def _middlewares(self, rates: Table, auths: Table) -> Iterator[Metric]:
        rate = CounterMetricFamily(
            "fastgate_rate_limit_decisions",
            "Rate-limit decisions, by route and decision.",
            labels=["route", "decision"],
        )
        for (route,), w in rates.items():
            for decision in ("allowed", "limited", "fallback"):
                rate.add_metric([route, decision], w[OFFSETS[decision]])
        auth = CounterMetricFamily(
            "fastgate_auth_failures",
            "Requests refused by an auth or authorize middleware, by reason.",
            labels=["route", "middleware", "reason"],
        )
        for (route, middleware, reason), w in auths.items():
            auth.add_metric([route, middleware, reason], w[OFFSETS["failures"]])
        yield from (rate, auth)

    def _supervisor(self, state: GatewayState) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "fastgate_config_reloads", "Config reloads, by result.", labels=["result"]
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], state.reloads.get(result, 0))
        yield reloads
        yield GaugeMetricFamily(
            "fastgate_config_last_reload_timestamp_seconds",
            "When the running config was loaded (unix time).",
            value=state.last_reload,
        )
        yield GaugeMetricFamily(
            "fastgate_config_generation", "The config generation served.", value=state.generation
        )
        yield GaugeMetricFamily(
            "fastgate_workers", "Worker processes running.", value=len(state.workers)
        )
        cpu = CounterMetricFamily(
            "fastgate_worker_cpu_seconds", "CPU time of each worker.", labels=["worker"]
        )
        rss = GaugeMetricFamily(
            "fastgate_worker_resident_memory_bytes",
            "Resident memory of each worker.",
            labels=["worker"],
        )
        for slot, pid in state.workers:
            usage = proc_usage(pid)
            if usage is not None:
                cpu.add_metric([str(slot)], usage[0])
                rss.add_metric([str(slot)], usage[1])
        yield from (cpu, rss)

    def _logs(self, streams: Table) -> Iterator[Metric]:
        dropped = CounterMetricFamily(
            "fastgate_access_log_dropped",
            "Log lines dropped (buffer full, writer behind, write errors), by stream.",
            labels=["stream"],
        )
        names = dict.fromkeys((*LOG_STREAMS, *(labels[0] for labels in streams)))
        for stream in names:
            w = streams.get((stream,))
            dropped.add_metric([stream], w[OFFSETS["log_dropped"]] if w else 0)
        yield dropped


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds user+system, resident bytes) of `pid` from /proc, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: the fields follow the last ")".
    fields = stat.rsplit(b")", 1)[-1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, rss 24.
    utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
    return (utime + stime) / _TICKS, rss * _PAGE


def build_registry(collector: GatewayCollector) -> CollectorRegistry:
    """A registry of the gateway collector and the supervisor's process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """(body, content type) for a scrape with this Accept header."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


__all__ = ["GatewayCollector", "GatewayState", "build_registry", "proc_usage", "render"]
