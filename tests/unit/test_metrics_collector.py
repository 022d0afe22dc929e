"""fastgate.metrics: summing slots, the exposition, and the copier of Python-side tallies."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastgate._core.stats import OFFSETS, Shard
from fastgate.metrics.collector import (
    GatewayCollector,
    GatewayState,
    build_registry,
    proc_usage,
    render,
    sum_slots,
)
from fastgate.metrics.copier import TallyCopier
from fastgate.metrics.slots import PREFIX, StatsDir, free_slot, sweep_stale
from fastgate.middleware import registry

K_ROUTE, K_SERVER, K_ENTRY, K_RATE, K_AUTH = range(5)
OTHER_PID = 2**22 + 12345  # above the default pid_max: never a live process


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


@pytest.fixture
def stats_dir(tmp_path: Path) -> StatsDir:
    return StatsDir(str(tmp_path))


def test_sum_slots_adds_label_sets_across_workers(stats_dir: StatsDir) -> None:
    a, b = Shard(stats_dir.slot_path(0)), Shard(stats_dir.slot_path(1))
    # Different registration order: rows differ, labels match.
    b.register_route("web", "other", "svc")
    for s in (a, b):
        row = s.register_route("web", "api", "svc")
        s.record(row, 200, seconds=0.001, resp_bytes=10)
    table = sum_slots([s for _, s in stats_dir.open_all()], K_ROUTE)
    w = table[("web", "api", "svc")]
    assert w[OFFSETS["requests"] + 1] == 2
    assert w[OFFSETS["resp_bytes"]] == 20
    assert ("", "_other", "") not in table  # an unused overflow row is not shown


def test_gauges_only_from_live_writers(stats_dir: StatsDir) -> None:
    s = Shard(stats_dir.slot_path(0))
    ep = s.register_entry("web")
    s.add_count(K_ENTRY, ep, OFFSETS["conn_opened"], 4)
    shards = [x for _, x in stats_dir.open_all()]
    assert sum_slots(shards, K_ENTRY, {os.getpid()})[("web",)][OFFSETS["conn_opened"]] == 4
    assert ("web",) not in sum_slots(shards, K_ENTRY, {OTHER_PID})


def state(**kw: object) -> GatewayState:
    base = dict(
        workers=[(0, os.getpid())],
        generation=3,
        servers=[("svc", "http://a:1")],
        tls_entrypoints=["secure"],
        last_reload=1.7e9,
    )
    base.update(kw)
    return GatewayState(**base)  # type: ignore[arg-type]


def test_collector_families(stats_dir: StatsDir) -> None:
    s = Shard(stats_dir.slot_path(0))
    route = s.register_route("web", "api", "svc")
    srv = s.register_server("svc", "http://a:1")
    ep = s.register_entry("web")
    s.record(route, 404, method=1, seconds=0.02, server_row=srv, upstream_seconds=0.01)
    s.add_count(K_ENTRY, ep, OFFSETS["conn_opened"], 2)
    s.add_count(K_ENTRY, ep, OFFSETS["conn_closed"], 1)
    s.add_count(K_AUTH, s.register_auth("api", "keys", "unknown key"), 0, 3)
    reg = build_registry(GatewayCollector(stats_dir, state))
    body, ctype = render(reg, "")
    assert ctype.startswith("text/plain")
    got = parse(body.decode())
    labels = dict(entrypoint="web", route="api", service="svc", code_class="4xx")
    head = tuple(sorted({**labels, "method": "HEAD"}.items()))
    assert got[("fastgate_requests_total", head)] == 1
    le = tuple(sorted({**labels, "le": "0.025"}.items()))
    assert got[("fastgate_request_duration_seconds_bucket", le)] == 1  # cumulative
    le = tuple(sorted({**labels, "le": "0.01"}.items()))
    assert got[("fastgate_request_duration_seconds_bucket", le)] == 0
    up = tuple(sorted(dict(service="svc", server="http://a:1").items()))
    assert got[("fastgate_upstream_request_duration_seconds_count", up)] == 1
    assert got[("fastgate_upstream_health", up)] == 1
    assert got[("fastgate_client_connections", (("entrypoint", "web"),))] == 1
    auth = tuple(sorted(dict(route="api", middleware="keys", reason="unknown key").items()))
    assert got[("fastgate_auth_failures_total", auth)] == 3
    tls = (("entrypoint", "secure"), ("result", "ok"))
    assert ("fastgate_tls_handshakes_total", tls) not in got  # no row: never served
    assert got[("fastgate_config_generation", ())] == 3
    assert got[("fastgate_workers", ())] == 1
    assert got[("fastgate_worker_resident_memory_bytes", (("worker", "0"),))] > 0
    assert got[("process_resident_memory_bytes", ())] > 0


def test_openmetrics_exposition(stats_dir: StatsDir) -> None:
    reg = build_registry(GatewayCollector(stats_dir, state))
    body, ctype = render(reg, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b'fastgate_config_reloads_total{result="success"} 0' in body


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        pytest.param([], 0, id="first"),
        pytest.param([0, 1], 2, id="next"),
        pytest.param([0, 2], 1, id="a-restarted-worker-takes-the-gap"),
    ],
)
def test_free_slot(used: list[int], expected: int) -> None:
    assert free_slot(used) == expected


def test_proc_usage_of_this_process() -> None:
    usage = proc_usage(os.getpid())
    assert usage is not None and usage[0] > 0 and usage[1] > 1 << 20
    assert proc_usage(OTHER_PID) is None


def runtime_with(middlewares: dict[str, object], routes: dict[str, list[str]]) -> SimpleNamespace:
    config = SimpleNamespace(
        routes=[SimpleNamespace(name=r, middlewares=m) for r, m in routes.items()]
    )
    return SimpleNamespace(config=config, middlewares=middlewares)


def test_copier_adds_growth_once_and_survives_a_reload(tmp_path: Path) -> None:
    shard = Shard(str(tmp_path / "slot-0"))
    copier = TallyCopier(shard)
    failures = Counter({("orders", "invalid api key"): 3})
    auth = SimpleNamespace(type="api_key", common=SimpleNamespace(route_failures=failures))
    runtime = runtime_with({"keys": auth}, {"orders": ["keys"]})
    copier.copy(runtime, {})
    copier.copy(runtime, {})  # nothing new: nothing added
    row = ("orders", "keys", "invalid api key")
    assert dict(shard.table(K_AUTH))[row][OFFSETS["failures"]] == 3
    # A reload builds a new middleware that starts from 0: counters keep growing.
    failures2 = Counter({("orders", "invalid api key"): 1})
    auth2 = SimpleNamespace(type="api_key", common=SimpleNamespace(route_failures=failures2))
    failures[("orders", "invalid api key")] += 1  # the old one counted once more as it retired
    copier.copy(runtime_with({"keys": auth2}, {"orders": ["keys"]}), {})
    assert dict(shard.table(K_AUTH))[row][OFFSETS["failures"]] == 5
    assert id(auth) not in copier.seen


def test_copier_leaves_rate_decisions_to_the_connection(tmp_path: Path) -> None:
    # Rate decisions are counted per route in C at the exchange end (the exchange record's
    # rate outcome), not copied from the middleware's tallies.
    shard = Shard(str(tmp_path / "slot-0"))
    copier = TallyCopier(shard)
    rl = registry.build("once", "rate_limit", {"rate": "1/hour"})
    for _ in range(3):
        rl.local.decide(b"k")
    copier.copy(runtime_with({"once": rl}, {"limited": ["once"]}), {})
    assert [labels for labels, _ in shard.table(K_RATE)] == [("_other",)]  # no row registered
    assert all(not any(words) for _, words in shard.table(K_RATE))
    row = shard.register_rate("limited")
    shard.record(0, 429, rate=3, rate_row=row)  # what the connection does at the exchange end
    assert dict(shard.table(K_RATE))[("limited",)][OFFSETS["limited"]] == 1


def test_copier_auth_failures_and_tls(tmp_path: Path) -> None:
    shard = Shard(str(tmp_path / "slot-0"))
    copier = TallyCopier(shard)
    failures = {("a", "unknown key"): 2, ("b", "unknown key"): 1}
    auth = SimpleNamespace(type="api_key", common=SimpleNamespace(route_failures=failures))
    tls = SimpleNamespace(completed=5, failed=1)
    copier.copy(runtime_with({"keys": auth}, {"a": ["keys"], "b": ["keys"]}), {"secure": tls})
    # Used by two routes: refusals are tallied where they happened, route by route.
    table = dict(shard.table(K_AUTH))
    assert table[("a", "keys", "unknown key")][0] == 2
    assert table[("b", "keys", "unknown key")][0] == 1
    e = dict(shard.table(K_ENTRY))[("secure",)]
    assert (e[OFFSETS["tls_ok"]], e[OFFSETS["tls_failed"]]) == (5, 1)


def test_sweep_removes_only_dead_supervisors_directories(tmp_path: Path) -> None:
    dead = tmp_path / f"{PREFIX}{OTHER_PID}-abc123"
    live = tmp_path / f"{PREFIX}{os.getpid()}-def456"
    other = tmp_path / "fastgate-stats-notours"
    for d in (dead, live, other):
        d.mkdir()
        (d / "slot-0").write_bytes(b"x")
    assert sweep_stale(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()


def test_stats_dir_is_created_on_first_use_and_removed() -> None:
    d = StatsDir()
    path = d.path
    assert os.path.basename(path).startswith(f"{PREFIX}{os.getpid()}-")
    assert os.stat(path).st_mode & 0o777 == 0o700
    Shard(d.slot_path(0))
    assert [slot for slot, _ in d.slots()] == [0]
    d.remove()
    assert not os.path.exists(path)
