"""A real Prometheus scraping a real gateway's admin /metrics (tests/prometheus_server.py).

The gateway (2 workers) has a plain route, a rate-limited route, a jwt_auth route, a route
that takes a request body and a route whose only server refuses connections. The test sends
known traffic (20 GETs, a 200 then a 429, a 401, a 404 without a route, a 1000-byte POST, a
502), waits until Prometheus has scraped after it, and checks through Prometheus's query API:
the counts equal the traffic sent, every family the dashboard shows and that this traffic
must produce has series, every fastgate_* name exported is in the contract, and the shipped
alert rules evaluate without error on the real series and fire none.

First, the fixture itself is proven on Prometheus scraping its own /metrics.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Client, Gateway, Origin, assert_error, base_config, free_port, get

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prometheus_server as prom

prometheus_servers = prom.prometheus_servers

SECRET = "prometheus-scrape-secret-" + "y" * 40
PLAIN_REQUESTS = 20
BODY = b"b" * 1000

# Families this traffic must produce (TLS, reloads and log drops need other traffic).
PRODUCED = [
    "fastgate_requests_total",
    "fastgate_request_duration_seconds_bucket",
    "fastgate_request_bytes_total",
    "fastgate_response_bytes_total",
    "fastgate_upstream_request_duration_seconds_bucket",
    "fastgate_upstream_connect_errors_total",
    "fastgate_upstream_connections",
    "fastgate_upstream_health",
    "fastgate_client_connections",
    "fastgate_rate_limit_decisions_total",
    "fastgate_auth_failures_total",
    "fastgate_config_generation",
    "fastgate_workers",
    "fastgate_worker_cpu_seconds_total",
    "fastgate_worker_resident_memory_bytes",
]


def panel_queries() -> list:
    """The dashboard's panel queries that this traffic must give data, as pytest params."""
    params = []
    for panel in prom.dashboard_panels(prom.load_dashboard()):
        for target in panel["targets"]:
            if prom.promql_metric_names(target["expr"]) <= set(PRODUCED):
                ident = f"{panel['title']} {target['refId']}"
                params.append(pytest.param(target["expr"], id=ident))
    return params


def route(name: str, service: str = "origin", middlewares: tuple[str, ...] = ()) -> dict:
    return {
        "name": name,
        "match": {"hosts": [f"{name}.test"]},
        "service": service,
        "middlewares": list(middlewares),
    }


def send_traffic(gw: Gateway) -> None:
    """The known traffic; every reply is checked so the counts below are the truth."""
    for i in range(PLAIN_REQUESTS):
        resp = get(gw.addr, f"/echo-path/{i}", host="plain.test")
        assert resp.status == 200 and resp.body == f"/echo-path/{i}".encode()
    with Client(gw.addr) as c:  # one connection, one worker: its local bucket holds 1
        assert c.request("GET", "/echo-path/a", host="limited.test").status == 200
        assert c.request("GET", "/echo-path/b", host="limited.test").status == 429
    assert_error(get(gw.addr, "/headers", host="jwt.test"), 401)
    assert_error(get(gw.addr, "/headers", host="unknown.test"), 404)
    with Client(gw.addr) as c:
        resp = c.request("POST", "/echo", host="upload.test", body=BODY)
        assert resp.status == 200 and resp.body == BODY
    assert_error(get(gw.addr, "/", host="dead.test"), 502)


@pytest.fixture(scope="module")
def scraped(
    origin: Origin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, prom.PrometheusServer]]:
    """A gateway that served the known traffic, and a Prometheus that scraped it since."""
    prom.require_prometheus()
    middlewares = {
        "limit": {"type": "rate_limit", "rate": "1/minute"},
        "jwt": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": "${PROM_TEST_SECRET}"},
    }
    services = {
        "origin": {"servers": [{"url": f"http://127.0.0.1:{origin.port}"}]},
        "dead": {"servers": [{"url": f"http://127.0.0.1:{free_port()}"}]},
    }
    routes = [
        route("plain"),
        route("limited", middlewares=("limit",)),
        route("jwt", middlewares=("jwt",)),
        route("upload"),
        route("dead", service="dead"),
    ]
    config = base_config(
        origin.port, workers=2, middlewares=middlewares, services=services, routes=routes
    )
    gw = Gateway(config, tmp_path_factory.mktemp("gateway"), env={"PROM_TEST_SECRET": SECRET})
    gw.start()
    servers = prom.PrometheusServers(tmp_path_factory.mktemp("prometheus"))
    try:
        admin = "{}:{}".format(*gw.admin)
        server = servers.start({"fastgate": [admin]}, rule_files=[prom.ALERTS_YML])
        send_traffic(gw)
        server.wait_for_scrape("fastgate", after=time.time())
        yield gw, server
    finally:
        servers.stop_all()
        gw.stop()


# ---- the fixture, on Prometheus's own metrics ------------------------------------------------


def test_fixture_scrapes_prometheus_itself(prometheus_servers: prom.PrometheusServers) -> None:
    started = time.time()
    server = prometheus_servers.start(self_scrape=True, rule_files=[prom.ALERTS_YML])
    server.wait_for_scrape("prometheus", after=started)
    assert server.value('up{job="prometheus"}') == 1.0
    assert server.value('count(prometheus_build_info{job="prometheus"})') == 1.0
    # The shipped alert rules load into a real Prometheus and evaluate (on no fastgate data).
    rules = server.wait_rules_evaluated()
    assert {r["name"] for r in rules} == set(prom.alert_expressions())
    assert all(r["health"] == "ok" for r in rules), rules


def test_dashboard_expressions_are_valid_promql(
    prometheus_servers: prom.PrometheusServers,
) -> None:
    server = prometheus_servers.start()
    errors = []
    for expr in prom.dashboard_expressions(prom.load_dashboard()):
        try:
            server.query(prom.grafana_to_promql(expr))
        except AssertionError as e:
            errors.append(f"{expr}: {e}")
    assert errors == []


# ---- the gateway -----------------------------------------------------------------------------


def test_gateway_target_is_up(scraped: tuple[Gateway, prom.PrometheusServer]) -> None:
    _, server = scraped
    assert server.value('up{job="fastgate"} == 1') == 1.0


@pytest.mark.parametrize(
    "expr, expected",
    [
        pytest.param(
            'sum(fastgate_requests_total{route="plain"})', PLAIN_REQUESTS, id="requests on a route"
        ),
        pytest.param(
            'sum(fastgate_requests_total{route="plain", entrypoint="web", service="origin",'
            ' method="GET", code_class="2xx"})',
            PLAIN_REQUESTS,
            id="request labels",
        ),
        pytest.param(
            'sum(fastgate_request_duration_seconds_count{route="plain", code_class="2xx"})',
            PLAIN_REQUESTS,
            id="duration histogram count",
        ),
        pytest.param(
            'sum(fastgate_request_duration_seconds_bucket{route="plain", le="+Inf"})',
            PLAIN_REQUESTS,
            id="duration histogram +Inf bucket",
        ),
        pytest.param(
            'sum(fastgate_requests_total{route="limited", code_class="4xx"})', 1, id="429 counted"
        ),
        pytest.param(
            'sum(fastgate_rate_limit_decisions_total{route="limited", decision="allowed"})',
            1,
            id="rate limit allowed",
        ),
        pytest.param(
            'sum(fastgate_rate_limit_decisions_total{route="limited", decision="limited"})',
            1,
            id="rate limit limited",
        ),
        pytest.param(
            'sum(fastgate_requests_total{route="jwt", code_class="4xx", service=""})',
            1,
            id="401 counted, never forwarded",
        ),
        pytest.param(
            'sum(fastgate_auth_failures_total{route="jwt", middleware="jwt"})', 1, id="auth failure"
        ),
        pytest.param(
            'sum(fastgate_requests_total{route="", code_class="4xx"})', 1, id="404 without a route"
        ),
        pytest.param(
            'sum(fastgate_request_bytes_total{route="upload"})', len(BODY), id="request body bytes"
        ),
        pytest.param(
            'sum(fastgate_requests_total{route="dead", code_class="5xx"})', 1, id="502 counted"
        ),
        pytest.param(
            'sum(fastgate_upstream_request_duration_seconds_count{service="origin"})',
            PLAIN_REQUESTS + 2,  # the plain GETs, the limited route's 200, the POST
            id="upstream requests",
        ),
        pytest.param("sum(fastgate_workers)", 2, id="workers"),
        pytest.param("count(fastgate_worker_cpu_seconds_total)", 2, id="cpu per worker"),
        pytest.param("count(fastgate_worker_resident_memory_bytes > 0)", 2, id="rss per worker"),
        pytest.param(
            'sum(fastgate_upstream_health{service="origin"})', 1, id="upstream healthy by default"
        ),
    ],
)
def test_counts_equal_the_traffic(
    scraped: tuple[Gateway, prom.PrometheusServer], expr: str, expected: float
) -> None:
    _, server = scraped
    # The scrape after the traffic is done; the supervisor may gather its workers' counts a
    # moment later, so poll (bounded) until the value settles on the expected one.
    value = server.wait_value(expr, lambda v: v == expected)
    assert value == expected, f"{expr} = {value}"


@pytest.mark.parametrize(
    "expr, low",
    [
        pytest.param(
            'sum(fastgate_upstream_connect_errors_total{service="dead"})', 1, id="connect errors"
        ),
        pytest.param(
            'sum(fastgate_response_bytes_total{route="upload"})', len(BODY), id="response bytes"
        ),
        pytest.param("max(fastgate_config_generation)", 1, id="config generation"),
    ],
)
def test_at_least(scraped: tuple[Gateway, prom.PrometheusServer], expr: str, low: float) -> None:
    _, server = scraped
    value = server.wait_value(expr, lambda v: v is not None and v >= low)
    assert value is not None and value >= low, f"{expr} = {value}"


@pytest.mark.parametrize("name", PRODUCED)
def test_dashboard_family_has_series(
    scraped: tuple[Gateway, prom.PrometheusServer], name: str
) -> None:
    _, server = scraped
    dashboard = prom.load_dashboard()
    used = {n for e in prom.dashboard_expressions(dashboard) for n in prom.promql_metric_names(e)}
    assert name in used, f"the dashboard does not show {name}"
    count = server.wait_value(f'count({{__name__="{name}", job="fastgate"}})', bool)
    assert count is not None and count > 0, f"no {name} series in the scrape"


@pytest.mark.parametrize("expr", panel_queries())
def test_dashboard_panel_has_data(
    scraped: tuple[Gateway, prom.PrometheusServer], expr: str
) -> None:
    _, server = scraped
    result = server.wait_query(prom.grafana_to_promql(expr))
    assert result, f"no data for {expr}"


def test_exported_names_are_in_the_contract(
    scraped: tuple[Gateway, prom.PrometheusServer],
) -> None:
    _, server = scraped
    names = server.api("label/__name__/values", [("match[]", '{job="fastgate"}')])
    fastgate = {n for n in names if n.startswith("fastgate_")}
    assert fastgate, names
    assert {n for n in fastgate if not prom.allowed(n)} == set()


def test_alert_rules_evaluate_on_real_series(
    scraped: tuple[Gateway, prom.PrometheusServer],
) -> None:
    _, server = scraped
    rules = server.wait_rules_evaluated()
    assert {r["name"] for r in rules} == set(prom.alert_expressions())
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    assert server.api("alerts")["alerts"] == []
