"""Route-table and balancer targets for benchmarks/run.py: plain fastgate, bigger configs.

- fastgate-routes10, fastgate-routes1000: `fastgate run` with a table of 10 / 1,000 routes
  (`route_table`): distinct prefixes `/svcNNNN`, some exact paths, host-specific routes (exact
  and `*.wildcard`), 1% regex routes (at least one), method filters, spread over 4 services
  that all point at the origin. No catch-all `/`: it would win over every regex route (a
  prefix beats a regex at equal priority), and regex routes given a higher priority instead
  would be tried on every request, which measures the regexes, not the table's size. As
  written, every route is reachable and a regex is tried only when no exact or prefix route
  matched (not on the measured path). wrk asks `/svcMMMM/v1/<size path>` where route
  MMMM = N // 2 sits in the MIDDLE of the table and is a GET/HEAD prefix route; both targets
  have the same path shape (zero-padded numbers: the same length), so only the table size
  differs. The origin answers these paths from files `populate_www` adds to its
  document root (the small body as `index.html`, the others as hard links of the root's
  files): the origin's work for the small body is a static file, not nginx's in-memory
  `return` of `/`, so compare these two targets with each other, not with `fastgate`.
- fastgate-rr1, fastgate-rr4: one route `/`, one service `upstream` with `balancer:
  round_robin` and 1 / 4 servers. rr4's servers are 4 distinct origin nginx processes (the
  run's origin plus 3 started from the same template, document root and core by run.py), so
  the gateway keeps 4 upstream pools and connections really spread; rr1 is `fastgate`'s
  config with the balancer spelled out.

Rules this file obeys:
- Standard library only; no process is started here (run.py does that, and reuses
  `start_rl_gateway`: `fastgate check` first, then `fastgate run`, 1 worker, admin off).
- A target is checked, not trusted: a probe gateway with the same config plus the admin
  listener answers a few requests, and its `/metrics` must show every probe request counted
  on the intended route (table targets: the middle route, nothing on any other), or spread
  evenly over every server (rr targets). Only then is the measured gateway started (admin
  off, as in every other fastgate target).
- Everything listens on and connects to 127.0.0.1 only; nothing here is a secret.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

TABLE_TARGETS = {"fastgate-routes10": 10, "fastgate-routes1000": 1000}
RR_TARGETS = {"fastgate-rr1": 1, "fastgate-rr4": 4}
ROUTE_TARGETS = (*TABLE_TARGETS, *RR_TARGETS)
# Each target of a pair against the smaller setup, within each round (run.py's route table).
PAIRS = {"fastgate-routes1000": "fastgate-routes10", "fastgate-rr4": "fastgate-rr1"}
SERVICES = ("bench", "pool1", "pool2", "pool3")  # every one points at the origin
BALANCER = "round_robin"
PROBE_REQUESTS = 8  # a multiple of 4: round robin gives each of rr4's servers the same share
METRICS_TIMEOUT = 10.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+([0-9.eE+-]+)\s*$", re.M)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class RouteCheckError(Exception):
    """A probe did not show the request path the target claims to measure."""


# --------------------------------------------------------------------------------------------
# Configs


def bench_index(n: int) -> int:
    """The index of the route wrk's requests match: the middle of an `n`-route table."""
    return n // 2


def bench_route(n: int) -> str:
    """The name of that route."""
    return f"svc{bench_index(n):04d}"


def bench_prefix(n: int) -> str:
    """What run.py puts before every size's path (`/`, `/16k.bin`, ...) for this table."""
    return f"/svc{bench_index(n):04d}/v1"


def _route(i: int, n: int) -> dict[str, Any]:
    """Route `i` of `n`: the kind follows `i`, so a bigger table has the same mix; the middle
    one is always a GET/HEAD prefix route."""
    base = f"/svc{i:04d}"
    route: dict[str, Any] = {"name": f"svc{i:04d}", "service": SERVICES[1 + i % 3]}
    if i == bench_index(n):
        route["service"] = SERVICES[0]
        match: dict[str, Any] = {"path": base, "methods": ["GET", "HEAD"]}
    elif i % 100 == 7:  # 1% regex (one in a table of 10)
        match = {"path": base + r"/items/[0-9]+", "path_type": "regex", "methods": ["GET"]}
    elif i % 20 == 3:  # 5% exact host
        match = {"hosts": [f"api{i}.example.com"], "path": base}
    elif i % 20 == 13:  # 5% wildcard host
        match = {"hosts": [f"*.tenant{i}.example.com"], "path": base}
    elif i % 10 == 4:  # 10% exact path
        match = {"path": base + "/health", "path_type": "exact", "methods": ["GET", "HEAD"]}
    elif i % 10 == 8:  # 10% write-only prefix
        match = {"path": base + "/v1", "methods": ["POST", "PUT", "PATCH", "DELETE"]}
    elif i % 2 == 0:
        match = {"path": base, "methods": ["GET", "HEAD"]}
    else:
        match = {"path": base}
    route["match"] = match
    return route


def route_table(n: int) -> list[dict[str, Any]]:
    """`n` routes (n >= 3, so that the middle one is neither the first nor the last)."""
    if n < 3:
        raise ValueError("a route table needs at least 3 routes")
    return [_route(i, n) for i in range(n)]


def _config(
    port: int, services: dict[str, Any], routes: list[dict[str, Any]], admin_port: int | None
) -> dict[str, Any]:
    """The shape every generated fastgate target has: 1 worker, one entrypoint `web`; the
    admin listener only for a probe (then on `admin_port`)."""
    admin: dict[str, Any] = {"enabled": False}
    if admin_port is not None:
        admin = {"enabled": True, "address": f"127.0.0.1:{admin_port}"}
    return {
        "workers": 1,
        "admin": admin,
        "entrypoints": {"web": {"address": f"127.0.0.1:{port}"}},
        "services": services,
        "routes": routes,
    }


def table_config(
    port: int, origin_port: int, n: int, admin_port: int | None = None
) -> dict[str, Any]:
    """A table target's config: `route_table(n)`, the 4 services at the origin."""
    server = {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}
    services = {name: dict(server) for name in SERVICES}
    return _config(port, services, route_table(n), admin_port)


def rr_config(port: int, origin_ports: list[int], admin_port: int | None = None) -> dict[str, Any]:
    """An rr target's config: `fastgate proxy`'s route `proxy` on `/` to service `upstream`,
    whose servers are `origin_ports`, balanced round robin."""
    servers = [{"url": f"http://127.0.0.1:{p}"} for p in origin_ports]
    services = {"upstream": {"servers": servers, "balancer": BALANCER}}
    routes = [{"name": "proxy", "match": {"path": "/"}, "service": "upstream"}]
    return _config(port, services, routes, admin_port)


def populate_www(www: Path, prefix: str, small_body: bytes) -> None:
    """Make the origin answer `<prefix>/<file>` like `/<file>` (hard links of the root's
    files) and `<prefix>/` with `small_body` (its `index.html`)."""
    folder = www / prefix.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    for item in www.iterdir():
        if item.is_file():
            try:
                os.link(item, folder / item.name)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                shutil.copyfile(item, folder / item.name)
    (folder / "index.html").write_bytes(small_body)


# --------------------------------------------------------------------------------------------
# Probes


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The labelled samples of a Prometheus text exposition: (name, labels, value)."""
    return [
        (m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3)))
        for m in _SAMPLE.finditer(text)
    ]


def requests_by_route(text: str) -> dict[str, int]:
    """Requests answered per route (`fastgate_requests_total`, summed over the other labels)."""
    counts: dict[str, int] = {}
    for name, labels, value in parse_metrics(text):
        if name == "fastgate_requests_total" and labels.get("route"):
            counts[labels["route"]] = counts.get(labels["route"], 0) + int(value)
    return counts


def requests_by_server(text: str, service: str) -> dict[str, int]:
    """Upstream requests per server URL of `service` (the upstream duration histogram's
    `_count`)."""
    counts: dict[str, int] = {}
    for name, labels, value in parse_metrics(text):
        if name == "fastgate_upstream_request_duration_seconds_count":
            if labels.get("service") == service and "server" in labels:
                counts[labels["server"]] = counts.get(labels["server"], 0) + int(value)
    return counts


def check_table(counts: dict[str, int], n: int, sent: int) -> str:
    """Every one of `sent` probe requests on the middle route, none elsewhere; a verdict."""
    want = bench_route(n)
    others = {route: c for route, c in counts.items() if route != want and c}
    if counts.get(want, 0) != sent or others:
        raise RouteCheckError(
            f"{sent} requests to {bench_prefix(n)}/ were counted {counts} by route; expected "
            f"all on {want!r} (route {bench_index(n) + 1} of {n})"
        )
    return f"{sent} requests matched route {want!r}, number {bench_index(n) + 1} of {n}"


def check_spread(counts: dict[str, int], ports: list[int], sent: int) -> str:
    """`sent` probe requests split evenly over every server (round robin); a verdict."""
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    got = [counts.get(url, 0) for url in urls]
    if got != [sent // len(urls)] * len(urls) or set(counts) - set(urls):
        raise RouteCheckError(
            f"{sent} requests reached the servers {counts}; expected {sent // len(urls)} on each "
            f"of {urls}"
        )
    return f"{sent} requests spread {got} over {len(urls)} origin server(s)"


def fetch_metrics(admin_port: int, ready: Callable[[str], bool]) -> str:
    """`/metrics` of a probe gateway, asked again (bounded) until `ready(text)`; the last
    text (the check that follows reports what it lacks)."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    deadline = time.monotonic() + METRICS_TIMEOUT
    text = ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # loopback only
                text = resp.read().decode()
        except OSError:
            text = ""
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def send_probe(port: int, path: str, count: int) -> None:
    """`count` GETs of `path` on one keep-alive connection; each must answer 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(count):
            conn.request("GET", path, headers={"Host": "bench.local"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RouteCheckError(f"GET {path} answered {resp.status}")
    except (OSError, http.client.HTTPException) as exc:
        raise RouteCheckError(f"GET {path}: {exc!r}") from exc
    finally:
        conn.close()


def probe_route_target(name: str, port: int, admin_port: int, origin_ports: list[int]) -> str:
    """Probe the gateway of target `name` (its config with the admin listener on
    `admin_port`); a verdict for the console, or RouteCheckError."""
    if name in TABLE_TARGETS:
        n = TABLE_TARGETS[name]
        send_probe(port, bench_prefix(n) + "/", PROBE_REQUESTS)
        text = fetch_metrics(
            admin_port, lambda t: sum(requests_by_route(t).values()) >= PROBE_REQUESTS
        )
        return check_table(requests_by_route(text), n, PROBE_REQUESTS)
    send_probe(port, "/", PROBE_REQUESTS)
    text = fetch_metrics(
        admin_port, lambda t: sum(requests_by_server(t, "upstream").values()) >= PROBE_REQUESTS
    )
    return check_spread(requests_by_server(text, "upstream"), origin_ports, PROBE_REQUESTS)


def route_table_md(
    rows: dict[str, dict],
    targets: list[str] | tuple[str, ...],
    many: bool,
    fmt_spread: Callable[[dict[str, float] | None, int, bool], str],
) -> list[str]:
    """Under a scenario's table: each route target against the smaller setup of its pair and
    against plain fastgate, ratios within each round (nothing when no route target ran)."""
    names = [name for name in targets if name in ROUTE_TARGETS]
    if not names:
        return []
    lines = [
        "Route table size and upstream count (ratios within each round; the table targets' "
        "origin serves a static file for the small body, so their ratio to `fastgate` is not "
        "the router's cost alone):",
        "",
        "| target | compared with | req/s | req/s ratio | CPU µs/req | CPU ratio "
        "| req/s ratio to fastgate |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        row, pair = rows[name], rows[name].get("route_pair") or {}
        base = pair.get("baseline")
        shown = base if base in targets else f"({base} not run)" if base else "\u2013"
        vs = row.get("vs_fastgate") or {}
        cells = [
            name,
            shown,
            fmt_spread(row["rps"], 0, False),
            fmt_spread(pair.get("rps_ratio"), 2, many),
            fmt_spread(row["cpu_us_per_req"], 1, many),
            fmt_spread(pair.get("cpu_ratio"), 2, many),
            fmt_spread(vs.get("rps_ratio"), 2, many),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
