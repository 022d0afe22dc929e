"""Process lifecycle, end to end: reload, refusal, drain, restart, several workers, start-up.

Every test runs the real `python -m fastgate run` (a supervisor and its worker processes) on
127.0.0.1 against small origins from lifecycle_origin.py, under bounded load (a few client
threads for a few seconds). What each test proves is in its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from lifecycle_origin import Origin, expected_body  # this directory, put on sys.path by pytest

from fastgate.config.schema import parse_config
from fastgate.server.demo_origin import start_demo_origin
from fastgate.server.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGATE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def wait_for(what: str, check: Callable[[], Any], timeout: float = 5.0, step: float = 0.05):
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(step)


def config(upstream: Origin, workers: int = 1, **overrides: Any) -> dict[str, Any]:
    """One entrypoint `web` on a free port, every path to `upstream`, admin on a free port."""
    cfg: dict[str, Any] = {
        "workers": workers,
        "drain_timeout": 5,
        "entrypoints": {"web": {"address": f"127.0.0.1:{free_port()}"}},
        "routes": [{"name": "all", "match": {"path": "/"}, "service": "up"}],
        "services": {"up": {"servers": [{"url": upstream.url}]}},
        "admin": {"address": f"127.0.0.1:{free_port()}"},
    }
    cfg.update(overrides)
    return cfg


def pointed_at(cfg: dict[str, Any], upstream: Origin) -> dict[str, Any]:
    """`cfg` with service `up` moved to `upstream`."""
    return {**cfg, "services": {"up": {"servers": [{"url": upstream.url}]}}}


@dataclass
class Gateway:
    """A `python -m fastgate run` process; stderr goes to a file the test can read."""

    directory: Path
    config: dict[str, Any] | None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "gateway.yaml"

    @property
    def stderr_path(self) -> Path:
        return self.directory / "stderr.log"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def address(self) -> tuple[str, int]:
        text = self.env.get("FASTGATE_LISTEN") or self.config["entrypoints"]["web"]["address"]
        host, port = text.rsplit(":", 1)
        return host, int(port)

    def admin(self) -> tuple[str, int]:
        text = self.env.get("FASTGATE_ADMIN_ADDRESS") or self.config["admin"]["address"]
        host, port = text.rsplit(":", 1)
        return host, int(port)

    def write(self, cfg: dict[str, Any] | str) -> None:
        """Replace the config file (the gateway notices on SIGHUP or by polling)."""
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
        tmp = self.directory / "gateway.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.config_path)  # atomic, as editors and config managers do
        if not isinstance(cfg, str):
            self.config = cfg

    def start(self, wait: bool = True) -> Gateway:
        argv = [sys.executable, "-m", "fastgate", "run"]
        if self.config is not None:
            self.write(self.config)
            argv += ["-c", str(self.config_path)]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr_path.open("wb"),
            env=clean_env(**self.env),
            cwd=REPO,
        )
        if wait:
            self.wait_ready()
        return self

    def readyz(self) -> tuple[int, dict[str, Any]] | None:
        try:
            conn = http.client.HTTPConnection(*self.admin(), timeout=2)
            try:
                conn.request("GET", "/readyz")
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def status(self) -> dict[str, Any]:
        got = self.readyz()
        assert got is not None, "admin listener not answering"
        return got[1]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Until /readyz is 200 and every worker serves the current generation."""

        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"gateway exited with {self.proc.returncode}:\n{self.stderr()}")
            got = self.readyz()
            if got and got[0] == 200 and got[1]["workers_current"] == got[1]["workers"]:
                return got[1]
            return None

        return wait_for("the gateway to be ready", ready, timeout)

    def wait_generation(self, generation: int, timeout: float = 5.0) -> dict[str, Any]:
        """Until every worker reports `generation`."""

        def current() -> dict[str, Any] | None:
            got = self.readyz()
            if got is None:
                return None
            doc = got[1]
            gens = {w["generation"] for w in doc["worker_list"]}
            ok = doc["generation"] == generation and gens == {generation} and got[0] == 200
            return doc if ok else None

        return wait_for(f"generation {generation} in every worker", current, timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gateway still running after {timeout}s:\n{self.stderr()}")

    def close(self) -> None:
        """Teardown: whatever the test did, leave no process behind."""
        if self.proc is None:
            return
        pids = []
        got = self.readyz()
        if got:
            pids = got[1]["pids"]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def origins() -> Iterator[Callable[[str], Origin]]:
    started: list[Origin] = []

    def make(name: str) -> Origin:
        started.append(Origin(name).start())
        return started[-1]

    yield make
    for o in started:
        o.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(cfg: dict[str, Any] | None, env: dict[str, str] | None = None) -> Gateway:
        made.append(Gateway(tmp_path / f"gw{len(made)}", cfg, env or {}))
        made[-1].directory.mkdir()
        return made[-1]

    yield make
    for gw in made:
        gw.close()


# ---- clients ---------------------------------------------------------------------------------


@dataclass
class Result:
    started: float
    ended: float
    target: str
    status: int | None = None
    body: bytes = b""
    error: str = ""  # exception, when no complete response came back
    got_bytes: bool = False  # some of a response arrived before the error
    reused: bool = False  # sent on a keep-alive connection that had served before


def fetch(conn: http.client.HTTPConnection, target: str, reused: bool) -> Result:
    """One GET on `conn`, its outcome recorded instead of raised."""
    r = Result(time.monotonic(), 0.0, target, reused=reused)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        r.got_bytes = True
        r.status = resp.status
        r.body = resp.read()
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        r.error = f"{type(exc).__name__}: {exc}"
        r.status = None
        conn.close()
    r.ended = time.monotonic()
    return r


class LoadLoop:
    """`threads` clients sending GETs on keep-alive connections until stopped.

    A client whose connection failed opens a new one; it stops when connecting is refused
    (the gateway stopped listening).
    """

    def __init__(self, address: tuple[str, int], threads: int = 4, prefix: str = "/load") -> None:
        self.address = address
        self.prefix = prefix
        self.results: list[Result] = []
        self.refused_at: list[float] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> LoadLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _run(self, index: int) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=10)
        served = 0
        n = 0
        while not self._stop.is_set():
            n += 1
            if conn.sock is None:
                try:
                    conn.connect()
                except ConnectionRefusedError:
                    self.refused_at.append(time.monotonic())
                    return
                served = 0
            r = fetch(conn, f"{self.prefix}/{index}/{n}", reused=served > 0)
            self.results.append(r)
            served += 1
            if conn.sock is None:
                served = 0
        conn.close()

    def ok(self) -> list[Result]:
        return [r for r in self.results if not r.error]

    def failed(self) -> list[Result]:
        return [r for r in self.results if r.error]


def whose(result: Result, *candidates: Origin) -> str | None:
    """Which origin's exact body this is (None: no one's, e.g. truncated)."""
    for o in candidates:
        if result.body == expected_body(o.name, result.target):
            return o.name
    return None


def get(address: tuple[str, int], target: str, timeout: float = 10) -> Result:
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        return fetch(conn, target, reused=False)
    finally:
        conn.close()


def connection_refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def socket_owners(pids: list[int], local_ports: set[int]) -> dict[int, int]:
    """local port -> pid, for TCP sockets on 127.0.0.1 with those local ports held by `pids`.

    The kernel's socket table gives each port's inode; each process's fd table names the
    inodes it holds.
    """
    inode_of: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        ip_hex, port_hex = fields[1].split(":")
        if ip_hex == "0100007F" and int(port_hex, 16) in local_ports:
            inode_of[fields[9]] = int(port_hex, 16)
    owners: dict[int, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inode_of:
                    owners[inode_of[target[8:-1]]] = pid
    return owners


def serving_pids(gw: Gateway, upstream: Origin, requests: int = 24) -> tuple[set[int], set[str]]:
    """Send `requests` on new connections; returns which worker pids hold the upstream
    connections that carried them, and the distinct request-id prefixes (one per worker)."""
    upstream.peers.clear()
    upstream.request_ids.clear()
    for i in range(requests):
        r = get(gw.address(), f"/who/{i}")
        assert r.status == 200 and whose(r, upstream) == upstream.name, r
    pids = gw.status()["pids"]
    owners = socket_owners(pids, {port for _, port in upstream.peers})
    prefixes = {rid[:16] for rid in upstream.request_ids}
    return set(owners.values()), prefixes


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def fd_count(pid: int) -> int:
    """Open file descriptors of `pid`, the least of a few samples (an admin connection being
    closed right now is not a leak)."""
    counts = []
    for _ in range(5):
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.05)
    return min(counts)


# ---- 1. reload under load --------------------------------------------------------------------


def test_sighup_reload_under_load_drops_nothing(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """SIGHUP five times while 4 keep-alive clients run: every response is a whole 200, each
    reload reaches every worker (generation in /readyz), and once it has, every request
    goes to the new upstream."""
    a, b = origins("A"), origins("B")
    gw = gateway(config(a, workers=2)).start()
    steps: list[tuple[float, float, str]] = []  # (SIGHUP sent, all workers swapped, origin)
    with LoadLoop(gw.address(), threads=4) as load:
        time.sleep(0.3)
        for i, target in enumerate([b, a, b, a, b]):
            gw.write(pointed_at(gw.config, target))
            sent = time.monotonic()
            gw.signal(signal.SIGHUP)
            gw.wait_generation(2 + i)
            steps.append((sent, time.monotonic(), target.name))
            time.sleep(0.35)
        time.sleep(0.3)
    end = time.monotonic()

    assert len(load.ok()) > 200, f"too little load: {len(load.results)} requests"
    assert load.failed() == [], load.failed()[:5]
    assert all(r.status == 200 for r in load.results)
    assert all(whose(r, a, b) for r in load.results), [
        r for r in load.results if not whose(r, a, b)
    ][:3]
    # Between "every worker swapped" and the next SIGHUP, only the new upstream answers.
    windows = [(swapped, nxt[0], name) for (_, swapped, name), nxt in itertools.pairwise(steps)]
    windows.append((steps[-1][1], end, steps[-1][2]))
    for begin, until, name in windows:
        inside = [r for r in load.results if r.started >= begin and r.ended <= until]
        assert inside, f"no requests between {begin} and {until}"
        assert {whose(r, a, b) for r in inside} == {name}
    status = gw.status()
    assert status["generation"] == 6 and status["last_reload"] == "ok"
    assert {w["generation"] for w in status["worker_list"]} == {6}
    assert status["worker_restarts"] == 0

    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(10) == 0
    assert "Traceback" not in gw.stderr()


# ---- 2. bad configs are refused --------------------------------------------------------------


def test_bad_config_is_refused_and_the_old_one_keeps_serving(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """A schema error, then a config that validates but does not compile: both refused with
    their key paths in the log and in /readyz, generation unchanged, the old upstream keeps
    answering; a good config afterwards is taken."""
    a, b = origins("A"), origins("B")
    good = config(a)
    gw = gateway(good).start()

    schema_bad = {**pointed_at(good, b), "routes": [{"match": {"path": "/"}, "service": "nope"}]}
    gw.write(schema_bad)
    gw.signal(signal.SIGHUP)
    doc = wait_for(
        "the schema error to be refused",
        lambda: (s := gw.status())["last_reload"].startswith("refused") and s,
    )
    assert "routes[0].service: unknown service 'nope'" in doc["last_reload"]
    assert doc["generation"] == 1 and doc["ready"]
    assert whose(get(gw.address(), "/still"), a, b) == "A"

    compile_bad = {
        **pointed_at(good, b),
        "routes": [
            {"name": "ok", "match": {"path": "/"}, "service": "up"},
            {"name": "query", "match": {"path": "/q?x=1"}, "service": "up"},
        ],
        "services": {
            "up": {"servers": [{"url": b.url}]},
            "tls": {
                "servers": [{"url": "https://127.0.0.1:9"}],
                "tls": {"ca_file": "/nonexistent/ca.pem"},
            },
        },
        "middlewares": {"mw": {"type": "no_such_middleware"}},
    }
    parse_config(compile_bad)  # the schema accepts it: only compiling finds the problems
    gw.write(compile_bad)
    gw.signal(signal.SIGHUP)
    doc = wait_for(
        "the compile error to be refused",
        lambda: "services.tls" in (s := gw.status())["last_reload"] and s,
    )
    for path in ("services.tls.tls.ca_file", "middlewares.mw.type", "routes[1].match.path"):
        assert path in doc["last_reload"]
        wait_for(f"{path} in the log", lambda p=path: p in gw.stderr())
    assert doc["last_reload"].startswith("refused: ")
    assert doc["generation"] == 1 and doc["ready"]
    assert "routes[0].service: unknown service 'nope'" in gw.stderr()
    r = get(gw.address(), "/still")
    assert r.status == 200 and whose(r, a, b) == "A"

    gw.write(pointed_at(good, b))
    gw.signal(signal.SIGHUP)
    gw.wait_generation(2)
    assert whose(get(gw.address(), "/now"), a, b) == "B"
    assert gw.status()["last_reload"] == "ok"


# ---- 3. SIGTERM drains -----------------------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_and_refuses_new_connections(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """SIGTERM with 6 slow requests (1 s at the origin, 256 KiB bodies) in flight and a
    keep-alive load running: every slow request completes whole; the listeners close at once
    (new connections refused and /readyz 503 while the slow ones still run); every request
    that reached the origin got its response to the client; the exit is 0 well within
    drain_timeout."""
    a = origins("A")
    gw = gateway(config(a, workers=2, drain_timeout=5)).start()
    slow_target = "/sleep/1.0?size=262144"
    slow: list[Result] = []

    def slow_client(i: int) -> None:
        slow.append(get(gw.address(), f"{slow_target}&n={i}"))

    with LoadLoop(gw.address(), threads=2) as load:
        time.sleep(0.3)
        slow_threads = [threading.Thread(target=slow_client, args=(i,)) for i in range(6)]
        for t in slow_threads:
            t.start()
        wait_for("6 slow requests at the origin", lambda: a.in_flight >= 6, 3)
        before = len(load.ok())
        term_at = time.monotonic()
        gw.signal(signal.SIGTERM)
        wait_for("new connections to be refused", lambda: connection_refused(gw.address()), 1)
        refused_at = time.monotonic()
        assert a.in_flight >= 6, "listeners closed only after the slow requests finished"
        draining = gw.readyz()
        assert draining is not None and draining[0] == 503 and draining[1]["stopping"]
        for t in slow_threads:
            t.join(10)
        code = gw.wait_exit(10)
        exited_at = time.monotonic()

    assert code == 0
    assert refused_at - term_at < 1.0
    assert 0.8 < exited_at - term_at < 5.0, exited_at - term_at
    assert len(slow) == 6
    for r in slow:
        assert r.status == 200 and whose(r, a) == "A", (r.status, r.error, len(r.body))
        assert len(r.body) > 262144
    assert before > 50, "the load loop did not run"
    # Nothing came back broken: a response is a whole 200, or nothing arrived at all.
    for r in load.results:
        if r.error:
            assert not r.got_bytes, r
            assert r.ended >= term_at, f"failure before SIGTERM: {r}"
        else:
            assert r.status == 200 and whose(r, a) == "A", r
    # Every request the origin answered reached its client.
    assert a.answered == len(load.ok()) + len(slow)
    assert "Traceback" not in gw.stderr()


def test_drain_ends_at_drain_timeout(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """A request stuck longer than drain_timeout (1 s) is cut at the deadline: the gateway
    exits 0 about 1 s after SIGTERM and the client's connection is closed then."""
    a = origins("A")
    gw = gateway(config(a, drain_timeout=1)).start()
    stuck: list[Result] = []
    t = threading.Thread(target=lambda: stuck.append(get(gw.address(), "/sleep/8", 15)))
    t.start()
    wait_for("the stuck request at the origin", lambda: a.in_flight == 1, 3)
    term_at = time.monotonic()
    gw.signal(signal.SIGTERM)
    code = gw.wait_exit(6)
    exited_at = time.monotonic()
    t.join(10)

    assert code == 0
    assert 0.9 < exited_at - term_at < 3.5, exited_at - term_at
    assert len(stuck) == 1 and stuck[0].error and not stuck[0].got_bytes, stuck
    assert stuck[0].ended - term_at < 3.5
    assert "drain deadline reached, closing 1 connections" in gw.stderr()


# ---- 4. a dead worker is restarted -----------------------------------------------------------


def test_killed_worker_is_restarted(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """kill -9 one of two workers: /readyz shows a new pid and ready again, the new worker
    serves, and the supervisor holds no more file descriptors than before (the dead worker's
    pipes were closed)."""
    a = origins("A")
    gw = gateway(config(a, workers=2)).start()
    assert gw.proc is not None
    before = gw.status()
    fds_before = fd_count(gw.proc.pid)
    victim = before["pids"][0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        got = gw.readyz()
        if got is None or got[0] != 200:
            return None
        pids = got[1]["pids"]
        return got[1] if victim not in pids and len(pids) == 2 else None

    after = wait_for("a replacement worker", replaced, 10)
    new_pid = (set(after["pids"]) - set(before["pids"])).pop()
    assert after["worker_restarts"] == 1
    assert f"worker {victim} was killed by SIGKILL" in after["last_worker_error"]
    assert f"worker {victim} was killed by SIGKILL; restarting" in gw.stderr()
    assert after["worker_list"][-1] == {"pid": new_pid, "ready": True, "generation": 1}
    owners, _ = serving_pids(gw, a)
    assert new_pid in owners
    assert fd_count(gw.proc.pid) == fds_before


def test_worker_start_failures_back_off(caplog: pytest.LogCaptureFixture) -> None:
    """A worker that cannot start is reported (its reason in `last_worker_error` and the log)
    and restarted with exponential back-off: one failing in ~30 ms is restarted after 0.2 s,
    0.4 s, 0.8 s, so about 4 times in 2.5 s, not 10+ times."""
    failing = (
        "import os, sys; sys.stdin.readline(); "
        "print(os.getpid(), 'failed 1 entrypoints.web.address: cannot listen', flush=True); "
        "sys.exit(3)"
    )
    cfg = parse_config(
        {
            "workers": 1,
            "entrypoints": {"web": {"address": "127.0.0.1:1"}},
            "routes": [{"match": {"path": "/"}, "service": "s"}],
            "services": {"s": {"servers": [{"url": "http://127.0.0.1:1"}]}},
        }
    )
    starts: list[float] = []

    class FailingSupervisor(Supervisor):
        worker_argv = (sys.executable, "-c", failing)

        async def start_worker(self) -> Any:
            starts.append(time.monotonic())
            return await super().start_worker()

    async def scenario() -> dict[str, Any]:
        sup = FailingSupervisor(cfg, None)
        await sup.start_worker()
        await asyncio.sleep(2.5)
        status = sup.status()
        sup.stop()
        await sup._wait_workers(5)
        return status

    with caplog.at_level(logging.INFO, logger="fastgate"):
        status = asyncio.run(scenario())
    assert 3 <= len(starts) <= 5, starts
    delays = [
        float(r.getMessage().rsplit(" ", 1)[1].rstrip("s"))
        for r in caplog.records
        if "restarting in" in r.getMessage()
    ]
    assert delays[:3] == [0.2, 0.4, 0.8], delays
    failures = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert failures and "entrypoints.web.address: cannot listen" in failures[0]
    assert "exited with status 3 (entrypoints.web.address: cannot listen)" in caplog.text
    assert not status["ready"] and status["worker_restarts"] >= len(starts) - 1
    assert "entrypoints.web.address: cannot listen" in status["last_worker_error"]


# ---- 5. several workers ----------------------------------------------------------------------


def test_two_workers_both_serve(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """With workers: 2, new connections land on both: the upstream connections that carried
    24 requests are held by both /readyz pids (found through /proc), and the request ids
    carry two worker prefixes."""
    a = origins("A")
    gw = gateway(config(a, workers=2)).start()
    pids = set(gw.status()["pids"])
    assert len(pids) == 2
    owners, prefixes = serving_pids(gw, a)
    assert owners == pids
    assert len(prefixes) == 2


# ---- 7. start-up refusals --------------------------------------------------------------------


@pytest.mark.parametrize(
    "taken",
    [
        pytest.param("entrypoint", id="entrypoint address in use"),
        pytest.param("admin", id="admin address in use"),
    ],
)
def test_address_in_use_exits_2_naming_the_key(
    taken: str, origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    a = origins("A")
    cfg = config(a)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        if taken == "entrypoint":
            cfg["entrypoints"]["web"]["address"] = address
            key = "entrypoints.web.address"
        else:
            cfg["admin"]["address"] = address
            key = "admin.address"
        gw = gateway(cfg).start(wait=False)
        code = gw.wait_exit(START_TIMEOUT)
    assert code == 2
    assert f"error: {key}: cannot listen on {address}" in gw.stderr()
    assert "Traceback" not in gw.stderr()


def test_config_that_does_not_compile_exits_2(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    a = origins("A")
    up = {"servers": [{"url": "https://127.0.0.1:9"}], "tls": {"ca_file": "/nonexistent/ca.pem"}}
    cfg = config(a, services={"up": up})
    gw = gateway(cfg).start(wait=False)
    assert gw.wait_exit(START_TIMEOUT) == 2
    assert "error: services.up.tls.ca_file: cannot read /nonexistent/ca.pem" in gw.stderr()


# ---- 8. the config file is watched -----------------------------------------------------------


def test_config_file_change_reloads_without_a_signal(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """Rewriting the file is enough: the new upstream answers within a few seconds, a bad
    rewrite is refused (old config keeps serving), touching the file without changing the
    config is not a new generation."""
    a, b = origins("A"), origins("B")
    good = config(a)
    gw = gateway(good).start()

    gw.write(pointed_at(good, b))
    wait_for("B to answer", lambda: whose(get(gw.address(), "/x"), a, b) == "B", 5)
    doc = gw.wait_generation(2)
    assert doc["last_reload"] == "ok"

    gw.write("routes: [{service: missing}]\nunknown_key: 1\n")
    doc = wait_for(
        "the bad file to be refused",
        lambda: (s := gw.status())["last_reload"].startswith("refused") and s,
    )
    assert "unknown_key: unknown key" in doc["last_reload"]
    assert doc["generation"] == 2
    assert whose(get(gw.address(), "/y"), a, b) == "B"

    gw.write(pointed_at(good, b))  # the running config again, in a new file
    wait_for("the unchanged config to be noticed", lambda: "unchanged" in gw.stderr(), 5)
    assert gw.status()["generation"] == 2


# ---- 9. the embedded default -----------------------------------------------------------------


def test_no_config_serves_the_demo_origin(gateway: Callable[..., Gateway]) -> None:
    """`python -m fastgate run` with no file: the embedded default proxies to the built-in
    demo origin, /readyz is 200, SIGHUP has nothing to reload, and SIGINT drains like
    SIGTERM (exit 0)."""
    env = {
        "FASTGATE_LISTEN": f"127.0.0.1:{free_port()}",
        "FASTGATE_ADMIN_ADDRESS": f"127.0.0.1:{free_port()}",
        "FASTGATE_WORKERS": "2",  # the default is one per CPU: bounded here
    }
    if not connection_refused(("127.0.0.1", 8081)):
        # The default demo origin port is busy here: the same default file, other ports.
        text = (REPO / "fastgate/config/default.yaml").read_text()
        port = str(free_port())
        gw = gateway(None, env)
        gw.config_path.write_text(text.replace("127.0.0.1:8081", f"127.0.0.1:{port}"))
        gw.env["FASTGATE_CONFIG"] = str(gw.config_path)
    else:
        gw = gateway(None, env)
    gw.start()
    code, doc = gw.readyz() or (0, {})
    assert code == 200 and doc["ready"] and doc["workers"] == 2

    r = get(gw.address(), "/hello?x=1")
    assert r.status == 200, r
    demo = json.loads(r.body)
    assert demo["message"] == "Hello from the fastgate demo origin"
    assert demo["path"] == "/hello?x=1" and demo["forwarded_for"] == "127.0.0.1"
    assert len(demo["request_id"]) == 32

    if "FASTGATE_CONFIG" not in gw.env:
        gw.signal(signal.SIGHUP)
        wait_for("the reload to be declined", lambda: "nothing to reload" in gw.stderr())
        assert gw.status()["generation"] == 1
    gw.signal(signal.SIGINT)
    assert gw.wait_exit(10) == 0
    assert "SIGINT: draining" in gw.stderr()


# ---- robustness ------------------------------------------------------------------------------


def test_workers_follow_a_killed_supervisor(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """kill -9 of the supervisor closes the workers' control pipe: they drain and exit
    instead of serving on, unsupervised."""
    a = origins("A")
    gw = gateway(config(a, workers=2)).start()
    assert gw.proc is not None
    pids = gw.status()["pids"]
    gw.proc.kill()
    gw.proc.wait(5)

    wait_for("the orphaned workers to exit", lambda: all(gone(pid) for pid in pids), 5)
    wait_for("the listener to close", lambda: connection_refused(gw.address()), 2)


def test_reload_changes_the_worker_count(
    origins: Callable[[str], Origin], gateway: Callable[..., Gateway]
) -> None:
    """`workers` raised by a reload starts the missing workers on the new generation; lowered,
    it retires the surplus (drained, not restarted)."""
    a = origins("A")
    cfg = config(a, workers=1)
    gw = gateway(cfg).start()
    first = gw.status()["pids"]
    gw.write({**cfg, "workers": 2})
    gw.signal(signal.SIGHUP)
    two = wait_for(
        "two workers on generation 2",
        lambda: (s := gw.status())["workers_current"] == 2 and s["generation"] == 2 and s,
    )
    assert first[0] in two["pids"] and len(two["pids"]) == 2
    gw.write({**cfg, "workers": 1})
    gw.signal(signal.SIGHUP)
    one = wait_for(
        "one worker on generation 3",
        lambda: (s := gw.status())["generation"] == 3 and len(s["pids"]) == 1 and s["ready"] and s,
    )
    retired = set(two["pids"]) - set(one["pids"])
    assert len(retired) == 1
    for pid in retired:
        wait_for(f"retired worker {pid} to exit", lambda p=pid: gone(p))
    assert "retiring (workers: 1)" in gw.stderr()
    assert gw.status()["worker_restarts"] == 0
    assert get(gw.address(), "/after").status == 200


def test_demo_origin_keeps_request_framing() -> None:
    """The built-in demo origin skips request bodies by Content-Length (also when they arrive
    in pieces), answers pipelined requests in order, and closes on `Connection: close`."""

    async def scenario() -> bytes:
        port = free_port()
        server = await start_demo_origin(f"127.0.0.1:{port}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"56789GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return raw
        finally:
            server.close()
            await server.wait_closed()

    raw = asyncio.run(scenario())
    first, second = raw.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b'"path": "/one"' in first and b'"method": "POST"' in first
    assert b'"path": "/two"' in second and b"Connection: close\r\n" in second
