"""The soak and connection-scale benchmarks' parts (benchmarks/soak.py, conn_scale.py).

- The generated gateway configs validate and compile: every traffic class's Host and path
  reach the route meant for it on both entrypoints, with the middleware it exercises; the
  connection-scale config has one worker and an hour of idle time.
- The /proc sampler: VmRSS parsing (table), a real process's RSS and descriptors, a fake
  /proc, a gone pid, and a real process tree (a "supervisor" with one child "worker").
- Statistics and the verdict on synthetic samples: percentile, slope, flat / leaking /
  spiky / restarted / too short; the report writer (JSON + Markdown); the PNG only when
  matplotlib is installed (skipped otherwise; not needed in CI).
- The load generator's HTTP reader and the generator itself against a real loopback server:
  the counts, the statuses that are errors, bodies checked; conn_scale's clients keep their
  connections open and a second request on each answers 200.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastgate._core.conn import Engine

from fastgate.config.compile import compile_runtime
from fastgate.config.loader import build_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import conn_scale  # noqa: E402
import soak  # noqa: E402
import tls_targets  # noqa: E402

SMALL = b"hello world\n"
BODIES = {"small": SMALL, "16k": b"s" * 16384, "1m": b"m" * 1024}


# ---- configs ---------------------------------------------------------------------------------


@contextmanager
def compiled(config: dict[str, Any]) -> Iterator[Any]:
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


def soak_config(tmp_path: Path) -> dict[str, Any]:
    tls = tls_targets.make_certificates(tmp_path / "tls")
    return soak.gateway_config(
        port=18080, tls_port=18443, admin_port=19901, origin_port=18081, redis_port=16379,
        tls=tls, jwt_secret="s" * 48, workdir=tmp_path,
    )  # fmt: skip


EXPECTED_ROUTE = {
    "plain": ("plain", ()),
    "plain-16k": ("plain", ()),
    "jwt": ("jwt", ("jwt",)),
    "jwt-missing": ("jwt", ("jwt",)),
    "rl-local": ("rl-local", ("rl_local",)),
    "rl-redis": ("rl-redis", ("rl_redis",)),
    "tls": ("plain", ()),
    "download-1m": ("plain", ()),
    "upload-1m": ("upload", ()),
}


def test_soak_mix_covers_every_kind_of_traffic_the_issue_names() -> None:
    names = {c.name for c in soak.MIX}
    assert names == set(EXPECTED_ROUTE)
    by_name = {c.name: c for c in soak.MIX}
    assert by_name["tls"].tls and by_name["jwt"].auth and not by_name["jwt-missing"].auth
    assert by_name["upload-1m"].method == "POST" and by_name["upload-1m"].upload == 1 << 20
    assert by_name["download-1m"].body == "1m"
    assert 429 in by_name["rl-local"].expect and 429 in by_name["rl-redis"].expect
    assert all(c.rate > 0 for c in soak.MIX)


@pytest.mark.parametrize("name", list(EXPECTED_ROUTE), ids=str)
def test_soak_config_routes_each_class_to_its_route(tmp_path: Path, name: str) -> None:
    config = soak_config(tmp_path)
    c = {c.name: c for c in soak.MIX}[name]
    route, middlewares = EXPECTED_ROUTE[name]
    declared = {r["name"]: tuple(r["middlewares"]) for r in config["routes"]}
    assert declared[route] == middlewares
    with compiled(config) as runtime:
        for entry in ("web", "websecure"):
            target = runtime.entries[entry].router.match(
                c.host.encode(), c.path.encode(), c.method.encode()
            )
            assert target is not None and target.name == route


def test_soak_config_shape(tmp_path: Path) -> None:
    config = soak_config(tmp_path)
    built = build_config(config, env={})
    assert built.workers == 2
    assert built.entrypoints["websecure"].tls is not None
    assert built.entrypoints["web"].tls is None
    assert built.middlewares["rl_redis"].options["store"] == "redis"
    assert built.middlewares["rl_local"].options["store"] == "local"
    assert built.middlewares["jwt"].options["algorithms"] == ["HS256"]
    assert built.access_log.enabled and built.access_log.path == str(tmp_path / "access.log")
    assert all(a.startswith("127.0.0.1:") for a in (built.admin.address,))
    # The secret goes only to the config file (written 0600 by main), not to the mix.
    assert "s" * 48 not in json.dumps([c.__dict__ for c in soak.MIX], default=str)


def test_conn_scale_config() -> None:
    config = conn_scale.gateway_config(18080, 18081)
    built = build_config(config, env={})
    assert built.workers == 1 and built.timeouts.idle == 3600
    assert built.entrypoints["web"].max_connections == 0
    assert not built.admin.enabled
    with compiled(config) as runtime:
        assert runtime.entries["web"].router.match(b"scale.local", b"/", b"GET") is not None


# ---- /proc sampler ---------------------------------------------------------------------------

STATUS = "Name:\tpython\nVmPeak:\t  200 kB\nVmRSS:\t   12345 kB\nThreads:\t1\n"


@pytest.mark.parametrize(
    ("text", "key", "want"),
    [
        pytest.param(STATUS, "VmRSS", 12345, id="rss"),
        pytest.param(STATUS, "VmPeak", 200, id="other kB field"),
        pytest.param("Name:\tzombie\nState:\tZ (zombie)\n", "VmRSS", None, id="zombie: no line"),
        pytest.param("VmRSS:\t12 MB\n", "VmRSS", None, id="not kB"),
        pytest.param("VmRSSx:\t1 kB\n", "VmRSS", None, id="prefix is not the key"),
        pytest.param("", "VmRSS", None, id="empty"),
    ],
)
def test_parse_status_kib(text: str, key: str, want: int | None) -> None:
    assert soak.parse_status_kib(text, key) == want


def test_status_and_fds_of_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "42" / "fd").mkdir(parents=True)
    (tmp_path / "42" / "status").write_text(STATUS)
    for n in range(3):
        (tmp_path / "42" / "fd" / str(n)).touch()
    assert soak.status_kib(42, proc=tmp_path) == 12345
    assert soak.fd_count(42, proc=tmp_path) == 3
    assert soak.status_kib(43, proc=tmp_path) is None
    assert soak.fd_count(43, proc=tmp_path) is None


def test_real_process_rss_and_fds(tmp_path: Path) -> None:
    pid = os.getpid()
    statm_pages = int(Path("/proc/self/statm").read_text().split()[1])
    rss = soak.status_kib(pid)
    assert rss is not None and abs(rss - statm_pages * os.sysconf("SC_PAGE_SIZE") // 1024) < 4096
    before = soak.fd_count(pid)
    assert before is not None
    with (tmp_path / "f").open("w"):
        assert soak.fd_count(pid) == before + 1


def test_sample_processes_finds_supervisor_and_worker(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import subprocess, sys, time, pathlib;"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
        f"pathlib.Path({str(ready)!r}).write_text(str(c.pid)); time.sleep(30)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (ready.exists() and ready.read_text()):
            assert time.monotonic() < deadline, "the child process did not start"
            time.sleep(0.02)
        child = int(ready.read_text())
        sample = soak.sample_processes({"self": os.getpid()}, parent.pid)
        roles = {(p["role"], p["pid"]) for p in sample}
        assert roles == {("supervisor", parent.pid), ("worker", child), ("self", os.getpid())}
        assert all(p["rss_kib"] > 1000 and p["fds"] >= 3 for p in sample)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(5)


# ---- statistics, verdict, report -------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "want"),
    [
        pytest.param([], 99, None, id="empty"),
        pytest.param([5.0], 99, 5.0, id="one"),
        pytest.param([float(i) for i in range(1, 101)], 50, 50.0, id="p50 of 1..100"),
        pytest.param([float(i) for i in range(1, 101)], 99, 99.0, id="p99 of 1..100"),
        pytest.param([3.0, 1.0, 2.0], 100, 3.0, id="unsorted max"),
    ],
)
def test_percentile(values: list[float], q: float, want: float | None) -> None:
    assert soak.percentile(values, q) == want


@pytest.mark.parametrize(
    ("xs", "ys", "want"),
    [
        pytest.param([0, 1, 2], [1, 3, 5], 2.0, id="line"),
        pytest.param([0, 1, 2], [4, 4, 4], 0.0, id="flat"),
        pytest.param([1], [1], 0.0, id="one point"),
        pytest.param([2, 2], [1, 5], 0.0, id="no spread in x"),
    ],
)
def test_slope(xs: list[float], ys: list[float], want: float) -> None:
    assert soak.slope(xs, ys) == pytest.approx(want)


def series(duration: float, step: float, rss: Any) -> list[tuple[float, int]]:
    return [(t * step, int(rss(t * step))) for t in range(1, int(duration / step) + 1)]


@pytest.mark.parametrize(
    ("points", "flat"),
    [
        pytest.param(series(600, 10, lambda t: 50_000 + (t % 20)), True, id="flat"),
        pytest.param(
            series(600, 10, lambda t: 30_000 + min(t, 200) * 100), True, id="grows in warm-up"
        ),
        pytest.param(series(600, 10, lambda t: 50_000 + t * 10), False, id="leak 600 KiB/min"),
        pytest.param(
            series(600, 10, lambda t: 50_000 + (20_000 if t == 500 else 0)),
            False,
            id="one 20 MiB spike",
        ),
        pytest.param(
            [p for p in series(600, 10, lambda t: 50_000) if p[0] < 480], False, id="died"
        ),
        pytest.param(
            [p for p in series(600, 10, lambda t: 50_000) if p[0] > 400], False, id="restarted"
        ),
        pytest.param(series(600, 200, lambda t: 50_000), None, id="too few samples"),
    ],
)
def test_rss_verdict(points: list[tuple[float, int]], flat: bool | None) -> None:
    assert soak.rss_verdict(points, 600, max_slope=256, max_spread=8)["flat"] is flat


def synthetic_samples(leak_kib_per_s: float = 0.0, errors: int = 0) -> list[dict[str, Any]]:
    samples = []
    for i in range(1, 13):
        t = i * 10.0
        traffic = {
            "plain": {"requests": 800, "p50_ms": 0.5, "p99_ms": 2.0 + i % 3, "max_ms": 9.0,
                      "lag_p99_ms": 1.0, "statuses": {"200": 800}, "errors": {}},
            "rl-redis": {"requests": 200, "p50_ms": 0.6, "p99_ms": 3.0, "max_ms": 5.0,
                         "lag_p99_ms": 1.0, "statuses": {"200": 180, "429": 20},
                         "errors": {"timeout": errors} if errors else {}},
        }  # fmt: skip
        samples.append(
            {
                "t": t,
                "processes": [
                    {"role": "supervisor", "pid": 1, "rss_kib": 58_000, "fds": 12},
                    {"role": "worker", "pid": 2, "rss_kib": 55_000, "fds": 30},
                    {
                        "role": "worker",
                        "pid": 3,
                        "rss_kib": 55_000 + int(leak_kib_per_s * t),
                        "fds": 28,
                    },
                    {"role": "origin", "pid": 4, "rss_kib": 9_000 + i * 1000, "fds": 9},
                ],
                "traffic": traffic,
                "all": {
                    "requests": 1000,
                    "errors": errors,
                    "p50_ms": 0.5,
                    "p99_ms": 3.0,
                    "max_ms": 9.0,
                    "lag_p99_ms": 1.0,
                },
                "metrics_status": 200,
                "loadavg_1m": 0.5,
            }
        )
    return samples


def report_of(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "timestamp": "2026-11-28T00:00:00+00:00",
        "machine": {"git_commit": "abc1234", "git_dirty": False},
        "config": {"minutes": 2, "interval": 10, "workers": 2, "offered_rps": 100,
                   "mix": [{"name": "plain", "rate": 80}, {"name": "rl-redis", "rate": 20}]},
        "summary": soak.summarize(samples, 120),
        "samples": samples,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("leak", "errors", "flat"),
    [
        pytest.param(0.0, 0, True, id="flat, no errors"),
        pytest.param(20.0, 0, False, id="one worker leaking 1.2 MiB/min"),
        pytest.param(0.0, 3, True, id="flat with errors reported"),
    ],
)
def test_summarize(leak: float, errors: int, flat: bool) -> None:
    s = soak.summarize(synthetic_samples(leak, errors), 120)
    assert s["rss_flat"] is flat
    assert set(s["processes"]) == {"supervisor", "worker 2", "worker 3"}  # not the origin
    assert s["processes"]["worker 3"]["flat"] is flat
    assert s["requests"] == 12 * 1000 and s["errors"] == 12 * errors
    assert s["traffic"]["rl-redis"]["statuses"] == {"200": 12 * 180, "429": 12 * 20}
    assert s["traffic"]["plain"]["worst_interval_p99_ms"] == 4.0
    assert s["fds"]["worker 2"] == {"first": 30, "min": 30, "max": 30, "last": 30}


def test_write_results_json_and_markdown(tmp_path: Path) -> None:
    report = report_of(synthetic_samples())
    paths = soak.write_results(tmp_path, "20261128T000000Z", report)
    assert paths[:2] == [
        tmp_path / "soak-20261128T000000Z.json",
        tmp_path / "soak-20261128T000000Z.md",
    ]
    assert json.loads(paths[0].read_text())["summary"]["rss_flat"] is True
    md = paths[1].read_text()
    assert "**RSS flat after warm-up**" in md and "256 KiB/min" in md and "8 MiB" in md
    assert "| worker 3 | 53.7 | 53.7 | 53.7 | 0 | 0 | 28-28 | yes |" in md
    assert md.count("\n| 1") >= 1 and md.count("| 120 |") == 1  # the last interval's row
    leaking = soak.markdown(report_of(synthetic_samples(leak_kib_per_s=20)))
    assert "**RSS NOT flat**" in leaking and "| **no** |" in leaking


def test_plot_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="optional extra `bench`; not needed in CI")
    path = tmp_path / "soak.png"
    assert soak.write_plot(report_of(synthetic_samples()), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert soak.write_plot(report_of(synthetic_samples()), tmp_path / "x.png") is False
    paths = soak.write_results(tmp_path, "t", report_of(synthetic_samples()))
    assert [p.suffix for p in paths] == [".json", ".md"]


@pytest.mark.parametrize(
    ("points", "fit", "steps"),
    [
        pytest.param([(0, 1000), (1000, 2000), (2000, 3000)], 1024, [1024, 1024], id="1 KiB"),
        pytest.param([(0, 1000), (1000, 1000)], 0, [0], id="nothing"),
    ],
)
def test_bytes_per_connection(points: list[tuple[int, int]], fit: int, steps: list[int]) -> None:
    result = conn_scale.bytes_per_connection(points)
    assert result["bytes_per_conn"] == fit
    assert [s["bytes_per_conn"] for s in result["steps"]] == steps


@pytest.mark.parametrize(
    ("argv", "ok"),
    [
        pytest.param(["--minutes", "3"], True, id="3 minutes"),
        pytest.param(["--minutes", "0.1"], False, id="under 3 intervals"),
        pytest.param(["--classes", "plain,nope"], False, id="unknown class"),
        pytest.param(["--rate-scale", "0"], False, id="no rate"),
    ],
)
def test_soak_args(argv: list[str], ok: bool) -> None:
    if ok:
        assert soak.parse_args(argv).minutes == 3
    else:
        with pytest.raises(SystemExit):
            soak.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "steps"),
    [
        pytest.param([], [1000, 5000, 10000], id="default"),
        pytest.param(["--steps", "10,20"], [10, 20], id="custom"),
        pytest.param(["--steps", "20,10"], None, id="decreasing"),
        pytest.param(["--steps", "x"], None, id="not a number"),
    ],
)
def test_conn_scale_args(argv: list[str], steps: list[int] | None) -> None:
    if steps is not None:
        assert conn_scale.parse_args(argv).steps == steps
    else:
        with pytest.raises(SystemExit):
            conn_scale.parse_args(argv)


# ---- the HTTP client parts against a real loopback server ------------------------------------


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tiny keep-alive origin: `/` 200 hello, `/500` 500, `/chunked` chunked, `/close`
    200 then close, `/bad` garbage; a request body (Content-Length) is read and dropped."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            path = lines[0].split(" ")[1]
            length = [int(x.split(":")[1]) for x in lines if x.lower().startswith("content-l")]
            if length:
                await reader.readexactly(length[0])
            if path == "/bad":
                writer.write(b"NOPE\r\n\r\n")
            elif path == "/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"6\r\nhello \r\n6\r\nworld\n\r\n0\r\n\r\n")  # fmt: skip
            else:
                status = b"500 Oops" if path == "/500" else b"200 OK"
                close = b"Connection: close\r\n" if path == "/close" else b""
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Length: 12\r\n%s\r\n%s" % (status, close, SMALL)
                )
            await writer.drain()
            if path == "/close":
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@asynccontextmanager
async def origin() -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize(
    ("path", "want"),
    [
        pytest.param("/", (200, SMALL, False), id="content-length"),
        pytest.param("/500", (500, SMALL, False), id="status"),
        pytest.param("/chunked", (200, SMALL, False), id="chunked"),
        pytest.param("/close", (200, SMALL, True), id="connection close"),
        pytest.param("/bad", soak.HttpError, id="not HTTP"),
    ],
)
def test_read_reply(path: str, want: Any) -> None:
    async def go() -> Any:
        async with origin() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                return await soak.read_reply(reader)
            except soak.HttpError as exc:
                return type(exc)
            finally:
                writer.close()

    assert run(go()) == want


def test_load_generator_counts_and_errors() -> None:
    mix = (
        soak.TrafficClass("ok", 40, "a"),
        soak.TrafficClass("server-error", 10, "a", "/500"),
        soak.TrafficClass("upload", 5, "a", method="POST", upload=4096),
        soak.TrafficClass("wrong-body", 5, "a", body="16k"),
    )

    async def go() -> dict[str, Any]:
        async with origin() as port:
            load = soak.LoadGen(mix, {False: port, True: port}, BODIES, None, "tok")  # type: ignore[arg-type]
            await load.run(1.0)
            raw = list(load.buckets.values())
            traffic = load.take()
            return {"traffic": traffic, "all": soak.merge_all(traffic, raw)}

    got = run(go())
    t = got["traffic"]
    assert t["ok"]["requests"] == 40 and t["ok"]["errors"] == {}
    assert t["ok"]["statuses"] == {"200": 40} and t["ok"]["p99_ms"] is not None
    assert t["server-error"]["errors"] == {"status": 10}
    assert t["upload"]["statuses"] == {"200": 5} and t["upload"]["errors"] == {}
    assert t["wrong-body"]["errors"] == {"body": 5}
    assert got["all"]["requests"] == 60 and got["all"]["errors"] == 15


def test_conn_scale_clients_keep_connections_open() -> None:
    async def go() -> tuple[Counter[str], Counter[str], int]:
        async with origin() as port:
            clients = conn_scale.Clients(port, SMALL, concurrency=8)
            first = await clients.open(30)
            open_now = len(clients.conns)
            again = await clients.ask_all_again()
            clients.close()
            return first, again, open_now

    first, again, open_now = run(go())
    assert first == Counter({"200": 30}) and open_now == 30
    assert again == Counter({"200": 30})
