"""The monitoring files under deploy/: the Grafana dashboard, the Prometheus scrape config and
the alert rules.

Rules checked: the dashboard imports anywhere (a `${DS_PROMETHEUS}` input, every panel bound
to it, schemaVersion 39), every panel has a query, every PromQL expression (dashboard and
alerts) selects only metric names of the exporter's contract (tests/prometheus_server.py
CONTRACT) and the dashboard shows every family; the YAML files parse and `promtool` accepts
them; and `promtool test rules` fires each alert on a synthetic series that should fire it and
stays quiet on one that should not.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prometheus_server as prom

BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return prom.load_dashboard()


@pytest.fixture(scope="module")
def alerts() -> dict[str, Any]:
    return yaml.safe_load(prom.ALERTS_YML.read_text())


def family(series: str) -> str:
    """The contract family of a series name (histogram series -> the histogram)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and prom.CONTRACT.get(base) == "histogram":
            return base
    return series


# ---- the PromQL name extractor ---------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, names",
    [
        pytest.param("up", {"up"}, id="bare name"),
        pytest.param(
            'sum by (route) (rate(fastgate_requests_total{route=~"$route"}[$__rate_interval]))',
            {"fastgate_requests_total"},
            id="aggregation, matcher, range",
        ),
        pytest.param(
            "histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m])))",
            {"a_bucket"},
            id="function with a number argument",
        ),
        pytest.param(
            "a / on (x) group_left (y) b > bool 1e3",
            {"a", "b"},
            id="vector matching, bool, exponent",
        ),
        pytest.param("rate(a[1h] offset 5m) unless b or c and d", {"a", "b", "c", "d"}, id="set"),
        pytest.param('x{l="rate(fake_name)"} - time()', {"x"}, id="string and zero-arg call"),
        pytest.param("sum without (instance) (job:foo:rate5m)", {"job:foo:rate5m"}, id="record"),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert prom.promql_metric_names(expr) == names


# ---- the contract ----------------------------------------------------------------------------


def test_contract_matches_the_exporter_docs() -> None:
    """CONTRACT is a copy: it must list exactly the families docs/observability.md documents."""
    doc = prom.REPO / "docs" / "observability.md"
    rows = re.findall(r"^\| `(fastgate_\w+)` \| (\w+) \|", doc.read_text(), re.MULTILINE)
    assert rows, "no metrics table in docs/observability.md"
    assert dict(rows) == prom.CONTRACT


# ---- the dashboard ---------------------------------------------------------------------------


def test_dashboard_imports_anywhere(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert dashboard["id"] is None  # an exported model carries no database id


def test_every_panel_has_a_datasource_and_a_query(dashboard: dict[str, Any]) -> None:
    panels = prom.dashboard_panels(dashboard)
    assert len(panels) >= 15
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        where = panel["title"]
        assert panel["datasource"] == ds, where
        assert panel["targets"], f"{where}: no target"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"] == ds, where
            assert target["expr"].strip(), where
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, where


@pytest.mark.parametrize("name", ["route", "service", "entrypoint", "instance"])
def test_template_variable(dashboard: dict[str, Any], name: str) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    var = variables[name]
    assert var["type"] == "query"
    assert var["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert re.fullmatch(rf"label_values\(.+,\s*{name}\)", var["definition"]), var["definition"]
    assert var["query"]["query"] == var["definition"]
    assert var["includeAll"] and var["allValue"] == ".*"  # "All" also matches route=""


def test_dashboard_variables_are_defined(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | BUILTIN_VARIABLES
    for expr in prom.dashboard_expressions(dashboard):
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined, f"undefined variables {used - defined} in {expr}"


def test_dashboard_rates_use_the_rate_interval(dashboard: dict[str, Any]) -> None:
    for expr in prom.dashboard_expressions(dashboard):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", f"[{window}] in {expr}"


def test_dashboard_metric_names_are_in_the_contract(dashboard: dict[str, Any]) -> None:
    for expr in prom.dashboard_expressions(dashboard):
        names = prom.promql_metric_names(expr)
        assert names, f"no metric in {expr}"
        unknown = {n for n in names if not prom.allowed(n)}
        assert not unknown, f"{unknown} not in the metrics contract: {expr}"


def test_dashboard_shows_every_family(dashboard: dict[str, Any]) -> None:
    used = {
        family(n)
        for e in prom.dashboard_expressions(dashboard)
        for n in prom.promql_metric_names(e)
    }
    assert set(prom.CONTRACT) - used == set()


# ---- the alert rules and the scrape config ---------------------------------------------------


@pytest.mark.parametrize(
    "alert",
    [
        "FastgateHigh5xxRatio",
        "FastgateUpstreamConnectErrors",
        "FastgateAuthFailureSpike",
        "FastgateRateLimitRejectionsSpike",
        "FastgateConfigReloadFailed",
    ],
)
def test_alert_exists(alerts: dict[str, Any], alert: str) -> None:
    rules = {r["alert"]: r for g in alerts["groups"] for r in g["rules"] if "alert" in r}
    rule = rules[alert]
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_metric_names_are_in_the_contract() -> None:
    for name, expr in prom.alert_expressions().items():
        names = prom.promql_metric_names(expr)
        assert names, f"{name}: no metric in {expr}"
        unknown = {n for n in names if not prom.allowed(n)}
        assert not unknown, f"{name}: {unknown} not in the metrics contract"
        if names != {"up"}:
            assert 'job="fastgate"' in expr, f"{name} must select job=fastgate"


def test_scrape_config_scrapes_fastgate() -> None:
    config = yaml.safe_load(prom.PROMETHEUS_YML.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["fastgate"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert "127.0.0.1:9901" in targets  # the admin listener's default address
    assert any(r["target_label"] == "instance" for r in job["relabel_configs"])


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check", "config", str(prom.PROMETHEUS_YML)], id="check config"),
        pytest.param(["check", "rules", str(prom.ALERTS_YML)], id="check rules"),
    ],
)
def test_promtool_accepts(args: list[str]) -> None:
    result = subprocess.run(
        [prom.require_promtool(), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# ---- the alerts fire when they should (promtool test rules) ----------------------------------

REQ = 'fastgate_requests_total{job="fastgate",instance="gw1",entrypoint="web",method="GET",'


def series(name: str, values: str) -> dict[str, str]:
    return {"series": name, "values": values}


@pytest.mark.parametrize(
    "alert, input_series, eval_time, expected",
    [
        pytest.param(
            "FastgateHigh5xxRatio",
            [
                series(REQ + 'route="api",service="api",code_class="2xx"}', "0+60x30"),
                series(REQ + 'route="api",service="api",code_class="5xx"}', "0+30x30"),
                # 100% 5xx, but one request a minute: under the traffic floor
                series(REQ + 'route="idle",service="api",code_class="5xx"}', "0+1x30"),
            ],
            "15m",
            [{"severity": "critical", "job": "fastgate", "route": "api"}],
            id="5xx ratio over 5% on a busy route",
        ),
        pytest.param(
            "FastgateHigh5xxRatio",
            [
                series(REQ + 'route="api",service="api",code_class="2xx"}', "0+600x30"),
                series(REQ + 'route="api",service="api",code_class="5xx"}', "0+6x30"),
            ],
            "15m",
            [],
            id="1% 5xx stays quiet",
        ),
        pytest.param(
            "FastgateUpstreamConnectErrors",
            [
                series(
                    'fastgate_upstream_connect_errors_total{job="fastgate",instance="gw1",'
                    'service="api",server="http://10.0.0.5:8080"}',
                    "0+60x30",
                )
            ],
            "15m",
            [
                {
                    "severity": "warning",
                    "job": "fastgate",
                    "service": "api",
                    "server": "http://10.0.0.5:8080",
                }
            ],
            id="connect errors 1/s",
        ),
        pytest.param(
            "FastgateAuthFailureSpike",
            [
                # steady 2/s for two hours: a baseline, not a spike
                series(
                    'fastgate_auth_failures_total{job="fastgate",instance="gw1",route="steady",'
                    'middleware="jwt",reason="bad signature"}',
                    "0+120x130",
                ),
                # nothing for an hour, then 5/s
                series(
                    'fastgate_auth_failures_total{job="fastgate",instance="gw1",route="spike",'
                    'middleware="jwt",reason="bad signature"}',
                    "0x60 0+300x70",
                ),
            ],
            "70m",
            [{"severity": "warning", "job": "fastgate", "route": "spike"}],
            id="auth failures from zero to 5/s",
        ),
        pytest.param(
            "FastgateRateLimitRejectionsSpike",
            [
                series(
                    'fastgate_rate_limit_decisions_total{job="fastgate",instance="gw1",'
                    'route="api",decision="allowed"}',
                    "0+240x30",
                ),
                series(
                    'fastgate_rate_limit_decisions_total{job="fastgate",instance="gw1",'
                    'route="api",decision="limited"}',
                    "0+120x30",
                ),
                # a third limited, but one a minute
                series(
                    'fastgate_rate_limit_decisions_total{job="fastgate",instance="gw1",'
                    'route="quiet",decision="limited"}',
                    "0+1x30",
                ),
            ],
            "15m",
            [{"severity": "warning", "job": "fastgate", "route": "api"}],
            id="a third of requests limited",
        ),
        pytest.param(
            "FastgateConfigReloadFailed",
            [
                series(
                    'fastgate_config_reloads_total{job="fastgate",instance="gw1",result="failure"}',
                    "0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
                )
            ],
            "5m",
            [{"severity": "warning", "job": "fastgate", "instance": "gw1", "result": "failure"}],
            id="a reload failed recently",
        ),
        pytest.param(
            "FastgateConfigReloadFailed",
            [
                series(
                    'fastgate_config_reloads_total{job="fastgate",instance="gw1",result="failure"}',
                    "0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
                )
            ],
            "20m",
            [],
            id="an old failure is forgotten",
        ),
        pytest.param(
            "FastgateDown",
            [series('up{job="fastgate",instance="gw1"}', "1 1 0 0 0 0 0")],
            "5m",
            [{"severity": "critical", "job": "fastgate", "instance": "gw1"}],
            id="target down",
        ),
    ],
)
def test_alert_fires(
    tmp_path: Path,
    alert: str,
    input_series: list[dict[str, str]],
    eval_time: str,
    expected: list[dict[str, str]],
) -> None:
    # The rules as shipped, annotations dropped: they are templates, checked by promtool above.
    doc = yaml.safe_load(prom.ALERTS_YML.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(doc))
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {
                        "eval_time": eval_time,
                        "alertname": alert,
                        "exp_alerts": [{"exp_labels": labels} for labels in expected],
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "test.yml"
    test_file.write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run(
        [prom.require_promtool(), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
