"""A real `prometheus` server for tests, and the metric names our deploy files may use.

Import into a test module with `tests/` on sys.path (`import prometheus_server as prom`).

The server: `PrometheusServers(directory).start(jobs)` runs /usr/bin/prometheus (Debian
package `prometheus`) on a free 127.0.0.1 port, with a generated config that scrapes the given
targets every second (and evaluates rules every second), its TSDB, config and log under
`directory`. It is ready when `/-/ready` answers 200; `stop_all()` sends SIGTERM (SIGKILL after
10 s). Every wait is bounded. The `prometheus_servers` fixture wraps it for one test.

Without `prometheus` (or `promtool`) on PATH the fixtures skip the test with a message saying
so, except under CI (CI=true), where a missing program is a failure: CI must install it.

The names: `CONTRACT` is the exporter's metric families as agreed with the dashboards
(name -> type; see docs on the admin listener's /metrics), `allowed_names()` expands it into
the series names Prometheus stores (histograms: `_bucket`, `_sum`, `_count`), and
`promql_metric_names()` lists the metric names an expression selects, so tests can check the
dashboard and alert rules against the contract.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

START_TIMEOUT = 20.0
REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "fastgate-dashboard.json"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERTS_YML = REPO / "deploy" / "prometheus" / "alerts.yml"


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        message = (
            f"{program} was not found on PATH: these tests need the real Prometheus "
            "(Debian/Ubuntu: apt-get install prometheus)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_prometheus() -> str:
    """The prometheus path; pytest.skip (or pytest.fail under CI=true) when there is none."""
    return _require("prometheus")


def require_promtool() -> str:
    """The promtool path; pytest.skip (or pytest.fail under CI=true) when there is none."""
    return _require("promtool")


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_time(text: str) -> float:
    """An RFC 3339 time from the Prometheus API (nanoseconds allowed) as a Unix time."""
    return datetime.fromisoformat(text).timestamp()


class PrometheusServer:
    """One prometheus process; `api()`, `query()` and the `wait_*` methods talk to its HTTP API."""

    def __init__(self, directory: Path, config: dict[str, Any], port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = directory / "prometheus.log"
        self.config_file = directory / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<PrometheusServer 127.0.0.1:{self.port}>"

    def start(self) -> PrometheusServer:
        argv = [
            require_prometheus(),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=info",
        ]
        self.proc = subprocess.Popen(
            argv, cwd=self.directory, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._get("/-/ready", timeout=1.0) == 200:
                return self
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self} not ready after {START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _get(self, path: str, timeout: float) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                resp.read()
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """GET /api/v1/<path>; the `data` of a success, AssertionError on an API error."""
        query = urllib.parse.urlencode(list(params))
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            doc = json.loads(e.read() or b"{}")
        assert doc.get("status") == "success", f"{path} {params}: {doc}"
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", [("query", expr)])
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}, not a vector"
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields at most one series (None when it yields none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} gave {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_value(
        self, expr: str, predicate: Callable[[float | None], bool], timeout: float = 10.0
    ) -> float | None:
        """Poll `expr` until `predicate(value)` holds or `timeout` passes; the last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(expr)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.2)

    def wait_query(self, expr: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll `expr` until it yields at least one series or `timeout` passes; the result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

    def targets(self, job: str) -> list[dict[str, Any]]:
        active = self.api("targets", [("state", "active")])["activeTargets"]
        return [t for t in active if t["labels"].get("job") == job]

    def wait_for_scrape(self, job: str, after: float, timeout: float = 15.0) -> None:
        """Wait until every target of `job` was scraped successfully by a scrape that started
        after Unix time `after` (so the scrape saw whatever happened before)."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.targets(job)
            if targets and all(
                t["health"] == "up" and _parse_time(t["lastScrape"]) > after for t in targets
            ):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{self}: job {job} not scraped after {after}: {targets}")
            time.sleep(0.2)

    def wait_rules_evaluated(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Every loaded rule once evaluated (health no longer "unknown"); the rules."""
        deadline = time.monotonic() + timeout
        while True:
            rules = [r for g in self.api("rules")["groups"] for r in g["rules"]]
            if rules and all(r["health"] != "unknown" for r in rules):
                return rules
            if time.monotonic() > deadline:
                pytest.fail(f"{self}: rules not evaluated in {timeout} s: {rules}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


class PrometheusServers:
    """Starts Prometheus servers under one directory and stops them all; see the docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[PrometheusServer] = []

    def start(
        self,
        jobs: Mapping[str, Sequence[str]] | None = None,
        *,
        self_scrape: bool = False,
        rule_files: Sequence[Path] = (),
    ) -> PrometheusServer:
        """A server scraping each job's targets ("host:port", path /metrics) every second;
        with `self_scrape` also itself as job "prometheus"; `rule_files` loaded as given."""
        require_prometheus()
        directory = self.directory / f"prometheus{len(self.started)}"
        directory.mkdir(parents=True)
        port = free_port()
        scrape = [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in (jobs or {}).items()
        ]
        if self_scrape:
            scrape.append(
                {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            )
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape,
        }
        server = PrometheusServer(directory, config, port)
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()


@pytest.fixture
def prometheus_servers(tmp_path: Path) -> Iterator[PrometheusServers]:
    """Factory of real prometheus processes, all stopped at teardown."""
    require_prometheus()
    servers = PrometheusServers(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


# ---- the metric names the deploy files may use -----------------------------------------------

# The exporter's families (the contract between the exporter and the dashboards).
CONTRACT: dict[str, str] = {
    "fastgate_requests_total": "counter",
    "fastgate_request_duration_seconds": "histogram",
    "fastgate_request_bytes_total": "counter",
    "fastgate_response_bytes_total": "counter",
    "fastgate_upstream_request_duration_seconds": "histogram",
    "fastgate_upstream_connect_errors_total": "counter",
    "fastgate_upstream_tls_errors_total": "counter",  # beyond the brief; docs/observability.md
    "fastgate_upstream_connections": "gauge",
    "fastgate_client_connections": "gauge",
    "fastgate_tls_handshakes_total": "counter",
    "fastgate_rate_limit_decisions_total": "counter",
    "fastgate_auth_failures_total": "counter",
    "fastgate_upstream_health": "gauge",
    "fastgate_config_reloads_total": "counter",
    "fastgate_config_last_reload_timestamp_seconds": "gauge",
    "fastgate_config_generation": "gauge",
    "fastgate_workers": "gauge",
    "fastgate_worker_cpu_seconds_total": "counter",
    "fastgate_worker_resident_memory_bytes": "gauge",
    "fastgate_access_log_dropped_total": "counter",
    "fastgate_upstream_ejections_total": "counter",
    "fastgate_upstream_retries_total": "counter",
    "fastgate_service_retries_total": "counter",
    "fastgate_service_retry_budget_exhausted_total": "counter",
    "fastgate_service_circuit_opened_total": "counter",
    "fastgate_service_circuit_open": "gauge",
    "fastgate_service_circuit_rejected_total": "counter",
    "fastgate_service_queued_total": "counter",
    "fastgate_service_capacity_rejected_total": "counter",
    "fastgate_service_no_server_total": "counter",
}
# Series Prometheus itself adds to every scrape.
SCRAPE_NAMES = frozenset({"up"})


def allowed_names() -> frozenset[str]:
    """Every series name the exporter may produce (histograms as their three series)."""
    names: set[str] = set()
    for name, kind in CONTRACT.items():
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return frozenset(names)


def allowed(name: str) -> bool:
    """True for a contract series, a scrape series, or the supervisor's process_* metrics."""
    return name in allowed_names() or name in SCRAPE_NAMES or name.startswith("process_")


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not glued to a number (5m, 1e3), a $variable or a field (.x).
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan", "atan2"}
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers left once strings, label matchers,
    ranges and label lists are removed, minus function calls and keywords."""
    text = _STRINGS.sub(" ", expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group()
        if word.lower() in _KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's graph panels (rows excluded, collapsed rows' panels included)."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var.get("definition", ""))
        if m:
            exprs.append(m.group(1))
    return exprs


def grafana_to_promql(expr: str, window: str = "1m") -> str:
    """A dashboard expression as Prometheus runs it with every selector on "All": the
    interval variables become `window`, the template variables the regex `.*`."""
    text = re.sub(r"\$\{?__(?:rate_interval|interval|range)\}?", window, expr)
    return re.sub(r"\$\{?\w+\}?", ".*", text)


def alert_expressions() -> dict[str, str]:
    """alerts.yml: rule name (alert or record) -> expression."""
    doc = yaml.safe_load(ALERTS_YML.read_text())
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in doc["groups"]
        for rule in group["rules"]
    }
