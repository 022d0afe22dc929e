"""/metrics through a real gateway of two workers: exact counter totals for a known mix.

The mix goes over several connections so SO_REUSEPORT spreads it over both workers; every
assertion is on the sum the supervisor reports, never on one worker. Counters the workers
copy once a second (rate-limit decisions) are polled for, with a deadline.
"""

from __future__ import annotations

import http.client
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, Gateway, Origin, base_config, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

GETS, NO_ROUTE, POSTS, LIMITED_TRIES = 30, 5, 4, 3
POST_BODY = b"p" * 100


def scrape(gw: Gateway, accept: str | None = None) -> tuple[str, str]:
    conn = http.client.HTTPConnection(*gw.admin, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode(), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


def samples(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the text format."""
    text, _ = scrape(gw)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict[Any, float], name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def total(data: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in data.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def gw(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = base_config(
        origin.port,
        workers=2,
        middlewares={"once": {"type": "rate_limit", "rate": "1/hour"}},
        routes=[
            {"name": "main", "match": {"hosts": ["main.test"]}, "service": "origin"},
            {
                "name": "limited",
                "match": {"hosts": ["limited.test"]},
                "service": "origin",
                "middlewares": ["once"],
            },
        ],
    )
    config["entrypoints"] = {"web": {"address": f"127.0.0.1:{free_port()}"}}
    g = Gateway(config, tmp_path_factory.mktemp("metrics"))
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def after_mix(gw: Gateway) -> dict[Any, float]:
    """Send the known mix, wait for the copied tallies, then scrape once."""
    statuses: list[int] = []
    for _ in range(6):  # 6 connections x 5 keep-alive GETs
        with Client(gw.addr) as c:
            statuses += [c.request("GET", "/status/200", host="main.test").status for _ in range(5)]
    for _ in range(NO_ROUTE):
        with Client(gw.addr) as c:
            statuses.append(c.request("GET", "/anything", host="nowhere.test").status)
    for _ in range(POSTS):
        with Client(gw.addr) as c:
            statuses.append(
                c.request("POST", "/status/500", body=POST_BODY, host="main.test").status
            )
    with Client(gw.addr) as c:  # one connection: one worker, one bucket
        statuses += [c.request("GET", "/status/200", host="limited.test").status for _ in range(3)]
    assert statuses.count(200) == GETS + 1
    assert statuses.count(404) == NO_ROUTE
    assert statuses.count(500) == POSTS
    assert statuses.count(429) == LIMITED_TRIES - 1
    assert wait_for(
        lambda: (
            value(
                samples(gw),
                "fastgate_rate_limit_decisions_total",
                route="limited",
                decision="limited",
            )
            == 2
        ),
        timeout=10,
        interval=0.2,
    )
    assert wait_for(
        lambda: value(samples(gw), "fastgate_client_connections", entrypoint="web") == 0,
        timeout=10,
    )
    return samples(gw)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param(
            dict(route="main", service="origin", method="GET", code_class="2xx"), GETS, id="get-200"
        ),
        pytest.param(
            dict(route="", service="", method="GET", code_class="4xx"), NO_ROUTE, id="404"
        ),
        pytest.param(
            dict(route="main", service="origin", method="POST", code_class="5xx"),
            POSTS,
            id="post-500",
        ),
        pytest.param(
            dict(route="limited", service="origin", method="GET", code_class="2xx"),
            1,
            id="rate-allowed-forwarded",
        ),
        pytest.param(
            dict(route="limited", service="", method="GET", code_class="4xx"),
            LIMITED_TRIES - 1,
            id="rate-refused-locally",
        ),
    ],
)
def test_request_counters_are_exact(
    after_mix: dict[Any, float], labels: dict[str, str], expected: int
) -> None:
    assert value(after_mix, "fastgate_requests_total", entrypoint="web", **labels) == expected


def test_request_total_and_histogram_count_agree(after_mix: dict[Any, float]) -> None:
    requests = total(after_mix, "fastgate_requests_total")
    assert requests == GETS + NO_ROUTE + POSTS + LIMITED_TRIES
    assert total(after_mix, "fastgate_request_duration_seconds_count") == requests
    inf = total(after_mix, "fastgate_request_duration_seconds_bucket", le="+Inf")
    assert inf == requests
    assert total(after_mix, "fastgate_request_duration_seconds_sum") > 0


def test_upstream_histogram_counts_forwarded_exchanges(after_mix: dict[Any, float]) -> None:
    forwarded = GETS + POSTS + 1
    assert total(after_mix, "fastgate_upstream_request_duration_seconds_count") == forwarded
    assert total(after_mix, "fastgate_upstream_connect_errors_total") == 0
    assert total(after_mix, "fastgate_upstream_health") == 1


def test_bytes_are_plausible(after_mix: dict[Any, float]) -> None:
    assert value(after_mix, "fastgate_request_bytes_total", entrypoint="web", route="main") == (
        POSTS * len(POST_BODY)
    )
    # Every response has at least a status line and headers (> 30 bytes).
    sent = total(after_mix, "fastgate_response_bytes_total")
    assert sent >= 30 * (GETS + NO_ROUTE + POSTS + LIMITED_TRIES)
    assert value(after_mix, "fastgate_response_bytes_total", entrypoint="web", route="") >= (
        30 * NO_ROUTE
    )


def test_rate_limit_decisions(after_mix: dict[Any, float]) -> None:
    decisions = "fastgate_rate_limit_decisions_total"
    assert value(after_mix, decisions, route="limited", decision="allowed") == 1
    assert value(after_mix, decisions, route="limited", decision="limited") == 2


def test_gauges_and_supervisor_metrics(after_mix: dict[Any, float]) -> None:
    assert value(after_mix, "fastgate_client_connections", entrypoint="web") == 0
    assert value(after_mix, "fastgate_workers") == 2
    assert value(after_mix, "fastgate_config_generation") == 1
    assert value(after_mix, "fastgate_config_reloads_total", result="failure") == 0
    assert value(after_mix, "fastgate_config_last_reload_timestamp_seconds") > 1.6e9
    for worker in ("0", "1"):
        assert value(after_mix, "fastgate_worker_resident_memory_bytes", worker=worker) > 1e6
        assert ("fastgate_worker_cpu_seconds_total", (("worker", worker),)) in after_mix
    assert value(after_mix, "process_resident_memory_bytes") > 0
    assert value(after_mix, "fastgate_access_log_dropped_total", stream="access") == 0


def test_openmetrics_when_asked(gw: Gateway) -> None:
    text, ctype = scrape(gw, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "fastgate_requests_total" in text
    text, ctype = scrape(gw)
    assert ctype.startswith("text/plain")
    assert "# EOF" not in text


def test_metrics_refuses_other_methods(gw: Gateway) -> None:
    conn = http.client.HTTPConnection(*gw.admin, timeout=5)
    try:
        conn.request("POST", "/metrics", body=b"")
        resp = conn.getresponse()
        assert resp.status == 405
        assert resp.getheader("Allow") == "GET, HEAD"
    finally:
        conn.close()


def test_a_restarted_worker_continues_its_counters(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]
) -> None:
    gw = start_gateway(base_config(origin.port))
    labels = dict(entrypoint="web", route="origin", service="origin", method="GET")
    labels["code_class"] = "2xx"
    with Client(gw.addr) as c:
        for _ in range(5):
            assert c.request("GET", "/status/200").status == 200
    assert value(samples(gw), "fastgate_requests_total", **labels) == 5
    os.kill(gw.worker_pid, signal.SIGKILL)

    def restarted() -> bool:
        doc = gw.readyz() or {}
        return bool(doc.get("ready")) and doc.get("pids") != [gw.worker_pid]

    assert wait_for(restarted, timeout=15, interval=0.1)
    gw.pids = list((gw.readyz() or {})["pids"])
    assert value(samples(gw), "fastgate_requests_total", **labels) == 5
    with Client(gw.addr) as c:
        assert c.request("GET", "/status/200").status == 200
    data = samples(gw)
    assert value(data, "fastgate_requests_total", **labels) == 6
    assert value(data, "fastgate_client_connections", entrypoint="web") == 0


def test_a_shared_rate_limit_is_counted_per_route(origin: Origin, tmp_path: Path) -> None:
    """One rate_limit middleware on two routes (its default scope: a bucket per route and
    client): each route's decisions are its own rows, none in "_other"."""
    config = base_config(
        origin.port,
        workers=1,
        middlewares={"once": {"type": "rate_limit", "rate": "1/hour"}},
        routes=[
            {"name": "first", "match": {"hosts": ["a.test"]}, "service": "origin",
             "middlewares": ["once"]},
            {"name": "second", "match": {"hosts": ["b.test"]}, "service": "origin",
             "middlewares": ["once"]},
        ],
    )  # fmt: skip
    config["entrypoints"] = {"web": {"address": f"127.0.0.1:{free_port()}"}}
    g = Gateway(config, tmp_path)
    g.start()
    try:
        with Client(g.addr) as c:
            assert c.request("GET", "/status/200", host="a.test").status == 200
            statuses = [c.request("GET", "/status/200", host="b.test").status for _ in range(2)]
            assert statuses == [200, 429]
        decisions = "fastgate_rate_limit_decisions_total"
        assert wait_for(
            lambda: value(samples(g), decisions, route="second", decision="limited") == 1,
            timeout=10,
            interval=0.2,
        )
        data = samples(g)
        assert value(data, decisions, route="first", decision="allowed") == 1
        assert total(data, decisions, route="first") == 1
        assert value(data, decisions, route="second", decision="allowed") == 1
        assert total(data, decisions, route="_other") == 0
    finally:
        g.stop()
