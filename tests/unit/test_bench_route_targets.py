"""The route-table and round-robin benchmark targets (benchmarks/route_targets.py).

- Every generated config validates (fastgate.config.loader.build_config) and compiles
  (compile_runtime); the table targets have exactly 10 / 1,000 routes in the compiled router,
  the benchmark path of every size matches the MIDDLE route (not the first, not the last),
  every other route is reachable by a request of its own, and the mix (regex, host, exact,
  method filters) is what the module docstring says.
- rr configs compile to one round-robin service with 1 / 4 distinct servers.
- The probes' verdicts: a real `fastgate run` (admin on) in front of real loopback origins
  must pass `probe_route_target`; wrong counts from /metrics are refused.
- run.py puts a table target's prefix before every path wrk and the checks ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastgate._core.conn import Engine

from fastgate.config.compile import Runtime, compile_runtime
from fastgate.config.loader import build_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import route_targets as rt  # noqa: E402
import run as bench_run  # noqa: E402
from _origin import ORIGIN, free_port  # noqa: E402

SIZE_PATHS = [size.path for size in bench_run.SIZES.values()]  # "/", "/16k.bin", "/1m.bin"
HOST = b"127.0.0.1:8080"  # what wrk sends: the URL's host


@contextmanager
def compiled(config: dict[str, Any]) -> Iterator[Runtime]:
    """The runtime a worker would build from `config` (no connection is opened)."""
    loop = asyncio.new_event_loop()
    engine = Engine(loop, None, tick_interval=1.0)
    runtime = compile_runtime(build_config(config, env={}), engine)
    try:
        yield runtime
    finally:
        runtime.retire()
        engine.close()
        loop.close()


def route_name(runtime: Runtime, host: bytes | None, path: str, method: bytes = b"GET") -> str:
    target = runtime.entries["web"].router.match(host, path.encode(), method)
    assert target is not None, f"no route for {method!r} {host!r} {path}"
    return target.name


# ---- table targets --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(rt.TABLE_TARGETS))
def test_table_config_has_n_routes_and_wrk_hits_the_middle_one(name: str) -> None:
    n = rt.TABLE_TARGETS[name]
    config = rt.table_config(free_port(), free_port(), n)
    names = [r["name"] for r in config["routes"]]
    assert len(names) == len(set(names)) == n
    middle = names.index(rt.bench_route(n))
    assert middle == n // 2 and 0 < middle < n - 1
    with compiled(config) as runtime:
        assert len(runtime.entries["web"].router) == n
        for path in SIZE_PATHS:
            for method in (b"GET", b"HEAD"):
                got = route_name(runtime, HOST, rt.bench_prefix(n) + path, method)
                assert got == rt.bench_route(n), (path, method)
        # Its method filter holds: a POST there matches nothing (no catch-all route).
        router = runtime.entries["web"].router
        assert router.match(HOST, (rt.bench_prefix(n) + "/").encode(), b"POST") is None


def request_for(route: dict[str, Any]) -> tuple[bytes | None, str, bytes]:
    """A request that only this route of the table should win."""
    match = route["match"]
    host = None
    if match.get("hosts"):
        host = match["hosts"][0].replace("*.", "x.").encode()
    path = match["path"]
    if match.get("path_type") == "regex":
        path = path.replace("[0-9]+", "42")
    elif match.get("path_type", "prefix") == "prefix":
        path += "/x"
    method = match.get("methods", ["GET"])[0].encode()
    return host, path, method


@pytest.mark.parametrize("name", list(rt.TABLE_TARGETS))
def test_every_route_of_the_table_is_reachable(name: str) -> None:
    n = rt.TABLE_TARGETS[name]
    config = rt.table_config(free_port(), free_port(), n)
    with compiled(config) as runtime:
        for route in config["routes"]:
            host, path, method = request_for(route)
            assert route_name(runtime, host, path, method) == route["name"]


@pytest.mark.parametrize(
    ("n", "regex", "hosts", "wildcards", "exact", "with_methods"),
    [
        pytest.param(10, 1, 1, 0, 1, 7, id="10 routes: one regex, one host, one exact"),
        pytest.param(1000, 10, 50, 50, 100, 510, id="1000 routes: 1% regex, 10% host"),
    ],
)
def test_route_mix(
    n: int, regex: int, hosts: int, wildcards: int, exact: int, with_methods: int
) -> None:
    matches = [r["match"] for r in rt.route_table(n)]
    assert sum(m.get("path_type") == "regex" for m in matches) == regex
    assert sum(bool(m.get("hosts")) for m in matches) == hosts + wildcards
    assert sum(m.get("hosts", [""])[0].startswith("*.") for m in matches) == wildcards
    assert sum(m.get("path_type") == "exact" for m in matches) == exact
    assert sum(bool(m.get("methods")) for m in matches) == with_methods
    assert not any(m["path"] == "/" for m in matches)  # no catch-all: every regex reachable


def test_both_tables_ask_for_paths_of_the_same_length() -> None:
    prefixes = {rt.bench_prefix(n) for n in rt.TABLE_TARGETS.values()}
    assert len(prefixes) == 2 and len({len(p) for p in prefixes}) == 1


def test_populate_www_serves_the_prefix_like_the_root(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "16k.bin").write_bytes(b"x" * 16384)
    rt.populate_www(www, "/svc0500/v1", b"hello world\n")
    folder = www / "svc0500" / "v1"
    assert (folder / "index.html").read_bytes() == b"hello world\n"
    assert (folder / "16k.bin").read_bytes() == b"x" * 16384
    rt.populate_www(www, "/svc0500/v1", b"hello world\n")  # twice: nothing to redo


# ---- round-robin targets --------------------------------------------------------------------


@pytest.mark.parametrize("count", [pytest.param(c, id=f"{c} servers") for c in (1, 4)])
def test_rr_config_is_one_round_robin_service(count: int) -> None:
    ports = [free_port() for _ in range(count)]
    config = rt.rr_config(free_port(), ports)
    assert build_config(config, env={}).services["upstream"].balancer.type == "round_robin"
    with compiled(config) as runtime:
        servers = runtime.services["upstream"].pools
        assert len(servers) == len(set(servers)) == count
        assert len(runtime.pools) == count  # one upstream pool per server
        assert route_name(runtime, HOST, "/16k.bin") == "proxy"


# ---- probe verdicts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "ok"),
    [
        pytest.param({"svc0500": 8}, True, id="all on the middle route"),
        pytest.param({"svc0500": 8, "default": 0}, True, id="zero elsewhere is fine"),
        pytest.param({"svc0500": 7, "default": 1}, False, id="one on the catch-all"),
        pytest.param({"svc0000": 8}, False, id="all on the first route"),
        pytest.param({}, False, id="nothing counted"),
    ],
)
def test_check_table(counts: dict[str, int], ok: bool) -> None:
    if ok:
        assert "svc0500" in rt.check_table(counts, 1000, 8)
    else:
        with pytest.raises(rt.RouteCheckError):
            rt.check_table(counts, 1000, 8)


@pytest.mark.parametrize(
    ("got", "ok"),
    [
        pytest.param([2, 2, 2, 2], True, id="even"),
        pytest.param([8, 0, 0, 0], False, id="all on one server"),
        pytest.param([3, 1, 2, 2], False, id="uneven"),
    ],
)
def test_check_spread(got: list[int], ok: bool) -> None:
    ports = [9001, 9002, 9003, 9004]
    counts = {f"http://127.0.0.1:{p}": c for p, c in zip(ports, got, strict=True)}
    if ok:
        assert "[2, 2, 2, 2]" in rt.check_spread(counts, ports, 8)
    else:
        with pytest.raises(rt.RouteCheckError):
            rt.check_spread(counts, ports, 8)


def test_parse_metrics_reads_labels_and_sums_by_route() -> None:
    text = (
        "# TYPE fastgate_requests counter\n"
        'fastgate_requests_total{entrypoint="web",route="a",service="s",method="GET",'
        'code_class="2xx"} 3.0\n'
        'fastgate_requests_total{entrypoint="web",route="a",service="s",method="HEAD",'
        'code_class="2xx"} 2.0\n'
        'fastgate_requests_total{entrypoint="web",route="b",service="s",method="GET",'
        'code_class="4xx"} 1.0\n'
        'fastgate_upstream_request_duration_seconds_count{service="s",'
        'server="http://127.0.0.1:1"} 4.0\n'
    )
    assert rt.requests_by_route(text) == {"a": 5, "b": 1}
    assert rt.requests_by_server(text, "s") == {"http://127.0.0.1:1": 4}
    assert rt.requests_by_server(text, "other") == {}


# ---- the probes against a real gateway and real origins -------------------------------------


@contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, stopped (the group, by its id) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if json.loads(resp.read()).get("ready"):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    pytest.fail(f"not ready: {url}\n{log.read_text()}")


@pytest.mark.parametrize("name", ["fastgate-routes1000", "fastgate-rr4"])
def test_probe_passes_through_a_real_gateway(name: str, tmp_path: Path) -> None:
    count = rt.RR_TARGETS.get(name, 1)
    ports = [free_port() for _ in range(count)]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            argv = [sys.executable, "-u", "-c", ORIGIN, str(port)]
            proc = stack.enter_context(process(argv, tmp_path / f"origin{i}.log"))
            deadline = time.monotonic() + 10
            while b"ready" not in (tmp_path / f"origin{i}.log").read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        port, admin = free_port(), free_port()
        if name in rt.RR_TARGETS:
            config = rt.rr_config(port, ports, admin)
        else:
            config = rt.table_config(port, ports[0], rt.TABLE_TARGETS[name], admin)
        path = tmp_path / "gateway.yaml"
        path.write_text(json.dumps(config))
        log = tmp_path / "gateway.log"
        argv = [sys.executable, "-m", "fastgate", "run", "-c", str(path)]
        gateway = stack.enter_context(process(argv, log))
        wait_ready(f"http://127.0.0.1:{admin}/readyz", gateway, log)
        verdict = rt.probe_route_target(name, port, admin, ports)
        if name in rt.RR_TARGETS:
            assert "[2, 2, 2, 2]" in verdict
        else:
            assert "'svc0500', number 501 of 1000" in verdict


# ---- run.py ---------------------------------------------------------------------------------


def test_run_registers_the_targets_and_prefixes_their_paths() -> None:
    assert set(rt.ROUTE_TARGETS) <= set(bench_run.ALL_TARGETS)
    args = bench_run.parse_args(["--targets", ",".join(rt.ROUTE_TARGETS)])
    assert args.targets == list(rt.ROUTE_TARGETS)
    target = bench_run.Target(
        "fastgate-routes10", 8080, None, Path("x"), proxied=True, path_prefix="/svc0005/v1"
    )  # type: ignore[arg-type]
    assert target.url("/16k.bin") == "http://127.0.0.1:8080/svc0005/v1/16k.bin"
