#!/usr/bin/env python3
"""fastgate against its peers: wrk through each reverse proxy, ratios to nginx in the same run.

Method (benchmarks/README.md has the details):

- The proxy under test runs on core 0 (`taskset -c 0`), one worker / one thread. The origin
  (nginx, one worker: 12 B from memory, 16 KiB and 1 MiB static files) and wrk share core 1.
- Every response body is checked byte-for-byte through every target before anything is
  measured, and keep-alive must hold.
- Rounds are interleaved (round -> scenario -> target: A B C A B C ...); each recorded run is
  preceded by an unrecorded warm-up run. A wrk run with socket errors or non-2xx responses is
  invalid and left out of the medians.
- Reported per target: req/s (median, min-max), the ratio to nginx computed within each round,
  p50/p99 latency, and the proxy's CPU µs per request (utime+stime of the proxy's process tree
  from /proc/PID/stat before and after the run, divided by the requests wrk counted).
- Rate-limit targets (`fastgate-rl-local`, `-hybrid`, `-redis`): `fastgate run` with a
  `rate_limit` middleware that never trips on the route, each against its own redis-server on
  the load core for the hybrid and redis stores; a probe first shows that the same config with
  a small limit answers 429. Reported besides: req/s and CPU ratios to plain `fastgate` in the
  same round, and Redis commands, round trips and CPU per request.
- Auth targets (`fastgate-jwt-hs256`, `-jwt-rs256`, `-jwt-rs256-nocache`, `fastgate-apikey`;
  benchmarks/auth_targets.py): one auth middleware on the route, the credential sent by wrk on
  every request; a probe first shows a request without it answers 401. Reported besides: the
  req/s and CPU ratios to plain `fastgate` in the same round.
- TLS targets (`nginx-tls`, `fastgate-tls`; benchmarks/tls_targets.py): the `nginx` and
  `fastgate` proxies terminating TLS with the same certificate and key, made for the run;
  wrk speaks https. A probe first shows the certificate verifies against the run's CA and
  whether a session resumes. Reported besides: req/s and CPU ratios to the plain counterpart
  and fastgate-tls to nginx-tls, in the same round.
- Access-log target (`fastgate-log`; benchmarks/log_targets.py): plain `fastgate`'s config
  with the JSON access log to a file in the run's directory; a probe first shows a request
  is logged, and around every run the lines written are compared with the requests wrk
  counted (drops from /metrics). Reported besides: the req/s and CPU ratios to plain
  `fastgate` in the same round, and lines / requests / drops.
- Route targets (`fastgate-routes10`, `-routes1000`, `fastgate-rr1`, `-rr4`;
  benchmarks/route_targets.py): plain `fastgate` with a 10 / 1,000-route table (wrk asks for
  the middle route), or one service round robin over 1 / 4 origin nginx processes; a probe
  first shows, from /metrics, the intended route matched or the servers shared the requests.
  Reported besides: req/s and CPU ratios to the smaller setup in the same round.
- Scenarios are `keep-alive` (wrk's connections stay open) or, with `--handshake close`,
  `close`: wrk sends `Connection: close`, so every request pays a new TCP connection (and a
  TLS handshake, resumed from wrk's previous session) on the target. A check first shows
  that every target answers such a request and closes the connection.

Standard library only (the TLS targets' certificate is made with trustme or cryptography,
imported when they are asked for); matplotlib, when installed, adds a PNG chart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import http.client
import json
import os
import platform
import pwd
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from auth_targets import AUTH_TARGETS, auth_middleware, fastgate_cli
from log_targets import (
    LOG_TARGETS,
    AccessLogFile,
    LogCheckError,
    log_config,
    log_summary,
    probe_line,
)
from route_targets import (
    PAIRS,
    ROUTE_TARGETS,
    RR_TARGETS,
    TABLE_TARGETS,
    RouteCheckError,
    bench_prefix,
    populate_www,
    probe_route_target,
    route_table_md,
    rr_config,
    table_config,
)
from tls_targets import (
    FASTGATE_TLS,
    KEY_TYPE,
    MIN_VERSION,
    NGINX_TLS,
    TLS_TARGETS,
    CertificateError,
    TlsFiles,
    fastgate_tls_config,
    make_certificates,
    nginx_tls_values,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
DEFAULT_OUT = HERE / "results"

PROXY_CORE = 0  # the proxy under test
LOAD_CORE = 1  # the origin and wrk
# fastgate with a `rate_limit` middleware on its route, by store (docs/rate-limiting.md).
RL_TARGETS = {
    "fastgate-rl-local": "local",
    "fastgate-rl-hybrid": "hybrid",
    "fastgate-rl-redis": "redis",
}
ALL_TARGETS = (
    "origin", "nginx", "haproxy", "fastgate", *RL_TARGETS, *AUTH_TARGETS, *TLS_TARGETS,
    *LOG_TARGETS, *ROUTE_TARGETS,
)  # fmt: skip
# How wrk's connections live: `keep-alive`, or `close` (a new connection per request).
HANDSHAKES = ("keep-alive", "close")
# Targets with a middleware on the route (or the access log on), compared with plain
# `fastgate` in the same round.
MIDDLEWARE_TARGETS = (*RL_TARGETS, *AUTH_TARGETS, *LOG_TARGETS)
DEFAULT_TARGETS = ("origin", "nginx", "haproxy", "fastgate", "fastgate-rl-local")
BASELINE = "nginx"
FASTGATE = "fastgate"  # the baseline of the rate-limit targets: the same proxy, no middleware
# A limit that never trips: the schema's highest rate (1,000,000/s, a 1 µs emission interval)
# and a bucket of 10^8. The probe limit trips on the request after PROBE_BURST.
RL_RATE, RL_BURST = "1000000/second", 100_000_000
PROBE_RATE, PROBE_BURST = "1/minute", 2
DEFAULT_FASTGATE_CMD = (
    "{python} -m fastgate proxy --listen 127.0.0.1:{port} "
    "--to http://127.0.0.1:{origin_port} --workers 1"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
DASH = "\u2013"  # en dash: ranges and empty cells in the markdown
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
WRK_GRACE = 30.0
TLS_RPS_GOAL = 0.5  # the TLS issue's target: fastgate-tls >= 0.5x nginx-tls req/s, keep-alive
NOISY_PCT = 5.0  # other processes' share of a core above which a table is flagged noisy


class BenchError(Exception):
    """A condition that stops the run, with a message meant for the person running it."""


@dataclass(frozen=True)
class Size:
    """One response size the origin serves: a key for the CLI, its path and its label."""

    key: str
    path: str
    label: str
    filename: str | None  # None: the body comes from the origin's `return` directive
    length: int


SIZES: dict[str, Size] = {
    s.key: s
    for s in (
        Size("small", "/", "12 B", None, 12),
        Size("16k", "/16k.bin", "16 KiB", "16k.bin", 16 * 1024),
        Size("1m", "/1m.bin", "1 MiB", "1m.bin", 1024 * 1024),
    )
}
SMALL_BODY = b"hello world\n"


@dataclass(frozen=True)
class Scenario:
    """A load shape: one response size, one number of connections, and whether they stay
    open (`keep-alive`) or each request comes on a new one (`close`)."""

    size: Size
    connections: int
    handshake: str = "keep-alive"

    @property
    def name(self) -> str:
        """Short name used in JSON keys and progress lines, e.g. `small c50`, and
        `small c50 close` for a new connection per request."""
        base = f"{self.size.key} c{self.connections}"
        return base if self.handshake == "keep-alive" else f"{base} {self.handshake}"

    @property
    def title(self) -> str:
        """Heading for the markdown table."""
        how = (
            "keep-alive"
            if self.handshake == "keep-alive"
            else "new connection per request (`Connection: close`)"
        )
        return f"{self.size.label} body · {how} · {self.connections} connections"


@dataclass
class Target:
    """A running thing wrk can be pointed at: a proxy, or the origin itself."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    proxied: bool  # False for the origin measured direct: no proxy CPU to report
    redis: RedisServer | None = None  # the Redis of a hybrid or redis rate-limit target
    headers: tuple[tuple[str, str], ...] = ()  # sent on every request (an auth credential)
    scheme: str = "http"  # "https": a TLS target
    ca_file: Path | None = None  # the CA that signed an https target's certificate
    access_log: AccessLogFile | None = None  # a log target's access log, counted per run
    path_prefix: str = ""  # before every path asked (a route table target's middle route)
    origins: tuple[subprocess.Popen[bytes], ...] = ()  # more origin servers (fastgate-rr4)

    def url(self, path: str) -> str:
        """The URL of `path` on this target, as wrk is given it."""
        return f"{self.scheme}://127.0.0.1:{self.port}{self.path_prefix}{path}"

    def connection(self, timeout: float = 10) -> http.client.HTTPConnection:
        """A (not yet connected) client connection to this target; over TLS, verifying the
        certificate against the run's CA and the name 127.0.0.1."""
        if self.scheme == "http":
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=timeout, context=self.client_context()
        )

    def client_context(self) -> ssl.SSLContext:
        """A new client SSLContext that trusts only the run's CA (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


@dataclass
class WrkResult:
    """What one wrk run reported."""

    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    latency_us: dict[str, float] = field(default_factory=dict)
    # Empty only when wrk finished cleanly with no socket errors and no non-2xx responses.
    errors: list[str] = field(default_factory=list)
    output: str = ""


@dataclass
class Run:
    """One recorded wrk run through one target, with the proxy CPU it cost."""

    round: int
    scenario: str
    size: str
    connections: int
    target: str
    valid: bool
    errors: list[str]
    requests: int
    seconds: float
    rps: float
    latency_us: dict[str, float]
    cpu_us_per_req: float | None
    origin_cpu_us_per_req: float | None
    # % of each core used by processes that are not ours during the run (noise), and steal.
    other_load_pct: dict[str, float]
    proxy_pids: list[int]
    wrk_output: str
    # Redis targets: what the run cost Redis (`RedisServer.delta`), else None.
    redis: dict[str, Any] | None = None
    handshake: str = "keep-alive"  # the scenario's: "keep-alive" or "close"
    # Log targets: lines written during the warm-up and recorded runs against the requests
    # wrk counted in both (`AccessLogFile.delta`), else None.
    access_log: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Every child process this run started, so that all of them are stopped at the end.

    Each child gets its own session (and so its own process group, whose id is the child's
    pid): a Ctrl-C reaches only this script, which then stops the groups it started, by id.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start a long-running child with stdout and stderr in `<workdir>/<name>.log`."""
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("wb")
        self._logs.append(log)
        proc = self.spawn(argv, stdout=log, cwd=cwd, env=env)
        return proc, log_path

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a child in its own session and remember it for `stop_all`."""
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"cannot start {shlex.join(argv)}: {exc}") from exc
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one child's process group now (SIGTERM, then SIGKILL after a grace)."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        if not _wait_group_gone(proc.pid, STOP_TIMEOUT):
            print(f"warning: process group {proc.pid} did not exit", file=sys.stderr)
        self.forget(proc)

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """Drop a child that has exited on its own (a finished wrk run)."""
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left after a grace."""
        alive = [p for p in self._procs if p.poll() is None]
        for proc in alive:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in alive:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Group members (nginx workers, fastgate workers) may outlive their leader.
        for proc in self._procs:
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            if not _wait_group_gone(proc.pid, STOP_TIMEOUT):
                print(f"warning: process group {proc.pid} did not exit", file=sys.stderr)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group `pgid` (one we created); ignore a group already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process of group `pgid` is left (orphans are reaped by init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.02)
    return False


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so the cleanup in `main` runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_for_port(
    name: str, port: int, proc: subprocess.Popen[bytes], logs: Iterable[Path], timeout: float
) -> None:
    """Wait until 127.0.0.1:`port` accepts a connection; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            details = "\n".join(f"--- {p}\n{tail(p)}" for p in logs)
            raise BenchError(f"{name} exited with status {proc.returncode}\n{details}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            details = "\n".join(f"--- {p}\n{tail(p)}" for p in logs)
            raise BenchError(
                f"{name} did not listen on 127.0.0.1:{port} in {timeout:.0f}s\n{details}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Targets


def render(template: str, dest: Path, values: dict[str, str | int]) -> Path:
    """Fill `@name@` placeholders of a file in benchmarks/peers/ and write it to `dest`."""
    text = (PEERS / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    config_lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    leftover = re.search(r"@[a-z_]+@", "\n".join(config_lines))
    if leftover:
        raise BenchError(f"{template}: placeholder {leftover.group(0)} has no value")
    dest.write_text(text)
    return dest


def nginx_user_directive() -> str:
    """`user` line for nginx: as root, workers run as the current user (Debian has no group
    `nobody`, nginx's default); otherwise nothing, since nginx cannot switch users."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    return f"user {user} {group};"


def make_www(root: Path) -> dict[str, bytes]:
    """Write the origin's static files; return the expected body for each size key."""
    root.mkdir(parents=True)
    rng = random.Random(20261127)  # the same bytes every run
    expected = {}
    for size in SIZES.values():
        if size.filename is None:
            expected[size.key] = SMALL_BODY
            continue
        body = rng.randbytes(size.length)
        (root / size.filename).write_bytes(body)
        expected[size.key] = body
    return expected


def start_nginx(
    procs: Processes, name: str, template: str, core: int, values: dict[str, str | int]
) -> Target:
    """Start an nginx (origin or proxy) in its own prefix under the run's temp dir."""
    prefix = procs.workdir / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = render(
        template,
        prefix / "nginx.conf",
        {"prefix": prefix, "user": nginx_user_directive(), **values},
    )
    error_log = prefix / "error.log"
    argv = ["taskset", "-c", str(core), "nginx", "-p", f"{prefix}/", "-c", str(conf)]
    argv += ["-e", str(error_log)]  # not the packaged /var/log/nginx/error.log
    proc, log = procs.start(name, argv)
    port = int(values["port"])
    wait_for_port(name, port, proc, [log, error_log], STARTUP_TIMEOUT)
    return Target(name, port, proc, log, proxied=name != "origin")


def start_haproxy(procs: Processes, origin_port: int) -> Target:
    """Start HAProxy (one thread, foreground) pinned to the proxy core."""
    prefix = procs.workdir / "haproxy"
    prefix.mkdir()
    port = free_port()
    conf = render(
        "haproxy.cfg",
        prefix / "haproxy.cfg",
        {"prefix": prefix, "port": port, "origin_port": origin_port},
    )
    argv = ["taskset", "-c", str(PROXY_CORE), "haproxy", "-db", "-f", str(conf)]
    proc, log = procs.start("haproxy", argv)
    wait_for_port("haproxy", port, proc, [log], STARTUP_TIMEOUT)
    return Target("haproxy", port, proc, log, proxied=True)


def fastgate_argv(template: str, port: int, origin_port: int) -> list[str]:
    """The fastgate command line from its template ({python}, {port}, {origin_port})."""
    try:
        cmd = template.format(
            python=shlex.quote(sys.executable), port=port, origin_port=origin_port
        )
    except (KeyError, IndexError) as exc:
        raise BenchError(f"--fastgate-cmd: unknown placeholder {exc}") from exc
    return ["taskset", "-c", str(PROXY_CORE), *shlex.split(cmd)]


def start_fastgate(procs: Processes, origin_port: int, template: str) -> Target:
    """Start fastgate from the repository checkout, pinned to the proxy core. Its admin
    listener is off (FASTGATE_ADMIN_ENABLED=false unless set) as in the generated configs of
    the other fastgate targets, so it matches them and two runs do not both want port 9901."""
    port = free_port()
    argv = fastgate_argv(template, port, origin_port)
    print(f"fastgate: {shlex.join(argv)}")
    env = fastgate_env()
    env.setdefault("FASTGATE_ADMIN_ENABLED", "false")
    proc, log = procs.start("fastgate", argv, cwd=REPO, env=env)
    wait_for_port("fastgate", port, proc, [log], STARTUP_TIMEOUT)
    return Target("fastgate", port, proc, log, proxied=True)


# --------------------------------------------------------------------------------------------
# Rate-limit targets: fastgate with a `rate_limit` middleware, and the Redis it may use

# Counters of Redis's `INFO stats` that a run's delta is taken of.
_REDIS_COUNTERS = (
    "total_commands_processed",
    "total_reads_processed",
    "total_net_input_bytes",
    "total_net_output_bytes",
)
# The commands that run a script; the rate-limit stores send nothing else once connected.
_SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
_RE_SEGS_OUT = re.compile(r"\bdata_segs_out:(\d+)")
_RE_CMDSTAT = re.compile(r"^cmdstat_([^:]+):calls=(\d+),", re.M)


class RedisServer:
    """A redis-server on the load core for one rate-limit target, and what it is asked.

    Measured around each recorded run (`snapshot` before and after, `delta`):
    - scripts: the EVALSHA (or EVAL) calls of INFO commandstats, what the gateway sends: one
      per decision in the redis store, one per touched key per sync in the hybrid store;
    - commands: INFO stats `total_commands_processed`, which also counts the commands each
      script runs inside Redis (TIME, GET, SET: 4 per decision in all);
    - round trips: the data segments the gateway's connection(s) to Redis sent, from the
      kernel's TCP_INFO (`ss -ti`, tcpi_data_segs_out). The client writes each loop turn's
      commands in one write, and with TCP_NODELAY (asyncio's default) each write leaves as one
      segment while it fits one (64 KiB on loopback: ~400 decisions; at most one per client
      connection is in flight here). Checked against the client's own `stats()["writes"]`
      from 1 to 200 concurrent callers: equal within 1. Redis's `total_reads_processed` (its
      read events; lower when writes arrive faster than Redis reads) is kept as a cross-check;
    - the CPU of redis-server (it shares the load core with wrk and the origin).
    The INFO queries go over one persistent connection of ours, which `ss` leaves out; what one
    query adds to the counters is measured once at start (`probe_cost`) and subtracted.
    """

    def __init__(self, procs: Processes, name: str) -> None:
        self.name = f"{name}-redis"
        self.port = free_port()
        workdir = procs.workdir / self.name
        workdir.mkdir()
        argv = [
            "taskset", "-c", str(LOAD_CORE), "redis-server", "--bind", "127.0.0.1",
            "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        self.proc, self.log = procs.start(self.name, argv)
        wait_for_port(self.name, self.port, self.proc, [self.log], STARTUP_TIMEOUT)
        self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self._file = self._sock.makefile("rb")
        self._own = f"127.0.0.1:{self._sock.getsockname()[1]}"
        first, second = self.info(), self.info()
        self.probe_cost = {k: v - first.get(k, 0) for k, v in second.items()}

    def close(self) -> None:
        """Close our INFO connection (the server is stopped with the other processes)."""
        self._file.close()
        self._sock.close()

    def info(self) -> dict[str, int]:
        """The integer fields of `INFO stats`, and the calls of each command of
        `INFO commandstats` as `calls:<command>`."""
        try:
            self._sock.sendall(b"*3\r\n$4\r\nINFO\r\n$5\r\nstats\r\n$12\r\ncommandstats\r\n")
            head = self._file.readline()
            if not head.startswith(b"$"):
                raise BenchError(f"{self.name}: INFO answered {head[:80]!r}")
            body = self._file.read(int(head[1:]) + 2)
        except OSError as exc:
            raise BenchError(f"{self.name}: INFO failed: {exc!r}") from exc
        text = body.decode("ascii", "replace")
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if value.isdigit():
                fields[key] = int(value)
        for match in _RE_CMDSTAT.finditer(text):
            fields[f"calls:{match.group(1)}"] = int(match.group(2))
        if missing := [k for k in _REDIS_COUNTERS if k not in fields]:
            raise BenchError(f"{self.name}: INFO stats lacks {', '.join(missing)}")
        return fields

    def gateway_segments(self) -> dict[str, int] | None:
        """Data segments sent so far by each established connection to this Redis except our
        own, by local address (None without `ss`)."""
        if not shutil.which("ss"):
            return None
        argv = ["ss", "-tinH", "state", "established", f"( dport = :{self.port} )"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        segments: dict[str, int] = {}
        local = None
        for line in out.stdout.splitlines():
            if line and not line[0].isspace():  # Recv-Q Send-Q Local:Port Peer:Port
                fields = line.split()
                local = fields[2] if len(fields) >= 4 else None
                if local is not None:
                    segments[local] = 0
            elif local is not None and (match := _RE_SEGS_OUT.search(line)):
                segments[local] = int(match.group(1))  # absent while it is 0
        segments.pop(self._own, None)
        return segments

    def snapshot(self) -> tuple[dict[str, int], dict[str, int] | None, dict[int, int]]:
        """INFO counters, the gateway's segments and redis-server's CPU ticks, now."""
        return self.info(), self.gateway_segments(), cpu_ticks([self.proc.pid])

    def delta(
        self,
        before: tuple[dict[str, int], dict[str, int] | None, dict[int, int]],
        after: tuple[dict[str, int], dict[str, int] | None, dict[int, int]],
    ) -> tuple[dict[str, Any], list[str]]:
        """What happened between two snapshots (less our one INFO), and what makes it wrong."""
        info = {k: v - before[0].get(k, 0) - self.probe_cost.get(k, 0) for k, v in after[0].items()}
        seg_before, seg_after = before[1], after[1]
        errors = []
        round_trips: float | None = None
        if seg_before is not None and seg_after is not None:
            if seg_before.keys() != seg_after.keys():
                errors.append("the gateway's connections to Redis changed during the run")
            elif not seg_after:
                errors.append("no gateway connection to Redis")
            else:
                round_trips = float(sum(seg_after[k] - seg_before[k] for k in seg_after))
        result: dict[str, Any] = {
            "scripts": float(sum(info.get(f"calls:{c}", 0) for c in _SCRIPT_COMMANDS)),
            "commands": float(info["total_commands_processed"]),
            "round_trips": round_trips,
            "read_events": float(info["total_reads_processed"]),
            "net_input_bytes": float(info["total_net_input_bytes"]),
            "net_output_bytes": float(info["total_net_output_bytes"]),
            "cpu_us": cpu_delta_us(before[2], after[2]),
        }
        # Every command's calls, for checking the figures above afterwards.
        result["command_calls"] = {
            k.partition(":")[2]: v for k, v in sorted(info.items()) if k.startswith("calls:") and v
        }
        return result, errors


def rl_config(
    store: str,
    port: int,
    origin_port: int,
    redis_port: int | None,
    *,
    middleware: str,
    rate: str,
    burst: int,
) -> dict[str, Any]:
    """The config of a rate-limit target: `fastgate proxy`'s (one entrypoint, route `proxy` on
    `/`, service `upstream`; see fastgate.config.loader.proxy_config) with a `rate_limit`
    middleware on the route, 1 worker, the admin listener off."""
    limit: dict[str, Any] = {
        "type": "rate_limit",
        "rate": rate,
        "burst": burst,
        "key": "client_ip",
        "store": store,
    }
    route = {"name": "proxy", "match": {"path": "/"}, "service": "upstream"}
    config: dict[str, Any] = {
        "workers": 1,
        "admin": {"enabled": False},
        "entrypoints": {"web": {"address": f"127.0.0.1:{port}"}},
        "services": {"upstream": {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}},
        "routes": [{**route, "middlewares": [middleware]}],
        "middlewares": {middleware: limit},
    }
    if redis_port is not None:
        limit["redis"] = "bench"  # sync_interval and the failure policy keep their defaults
        config["providers"] = {"redis": {"bench": {"address": f"127.0.0.1:{redis_port}"}}}
    return config


def fastgate_env() -> dict[str, str]:
    """The environment fastgate runs in: the repository checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start_rl_gateway(
    procs: Processes, name: str, config: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], Path, int, list[str]]:
    """Write `config` (JSON, which is YAML), check it with `fastgate check`, start
    `fastgate run` pinned to the proxy core; return the process, its log, its port and the
    middleware summary `fastgate check` printed."""
    path = procs.workdir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    check = subprocess.run(
        [sys.executable, "-m", "fastgate", "check", "-c", str(path)],
        capture_output=True, text=True, cwd=REPO, env=fastgate_env(), timeout=60, check=False,
    )  # fmt: skip
    if check.returncode != 0:
        raise BenchError(f"{name}: fastgate check failed:\n{check.stdout}{check.stderr}")
    summary = _middleware_summary(check.stdout)
    argv = ["taskset", "-c", str(PROXY_CORE), sys.executable, "-m", "fastgate", "run"]
    argv += ["-c", str(path), "--workers", "1"]
    proc, log = procs.start(name, argv, cwd=REPO, env=fastgate_env())
    port = int(config["entrypoints"]["web"]["address"].rsplit(":", 1)[1])
    wait_for_port(name, port, proc, [log], STARTUP_TIMEOUT)
    return proc, log, port, summary


def _middleware_summary(text: str) -> list[str]:
    """The lines of `fastgate check` output under `middlewares:`, stripped."""
    lines = text.splitlines()
    try:
        start = lines.index("middlewares:") + 1
    except ValueError:
        return []
    block = []
    for line in lines[start:]:
        if not line.startswith(" "):
            break
        block.append(line.strip())
    return block


def probe_rate_limit(
    procs: Processes, name: str, store: str, origin_port: int, redis: RedisServer | None
) -> None:
    """Show that the middleware decides on the request path with this store: the target's
    config with a limit of PROBE_BURST at once (under another middleware name, so it shares no
    Redis key with the measured one) must answer 200 PROBE_BURST times, then 429."""
    config = rl_config(
        store,
        free_port(),
        origin_port,
        redis.port if redis else None,
        middleware="rl_probe",
        rate=PROBE_RATE,
        burst=PROBE_BURST,
    )
    proc, _, port, _ = start_rl_gateway(procs, f"{name}-probe", config)
    statuses = []
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(PROBE_BURST + 1):
                conn.request("GET", "/", headers={"Host": "bench.local"})
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"{name}: rate-limit probe: {exc!r}") from exc
        finally:
            conn.close()
    finally:
        procs.stop(proc)
    if statuses != [200] * PROBE_BURST + [429]:
        raise BenchError(
            f"{name}: a limit of {PROBE_BURST} at once answered {statuses}, expected "
            f"{PROBE_BURST} x 200 then 429: the rate limit is not on the request path"
        )
    print(f"check: {name}: a {PROBE_RATE} burst {PROBE_BURST} limit answered {statuses}")


def start_rl_target(
    procs: Processes, name: str, origin_port: int, summaries: dict[str, list[str]]
) -> Target:
    """Start one rate-limit target (and its Redis, for the hybrid and redis stores) after the
    probe showed its limit is applied; record `fastgate check`'s summary in `summaries`."""
    store = RL_TARGETS[name]
    redis = RedisServer(procs, name) if store != "local" else None
    probe_rate_limit(procs, name, store, origin_port, redis)
    config = rl_config(
        store,
        free_port(),
        origin_port,
        redis.port if redis else None,
        middleware="rl",
        rate=RL_RATE,
        burst=RL_BURST,
    )
    proc, log, port, summaries[name] = start_rl_gateway(procs, name, config)
    print(f"{name}: " + "; ".join(summaries[name][1:]))
    return Target(name, port, proc, log, proxied=True, redis=redis)


def auth_config(port: int, origin_port: int, options: dict[str, Any]) -> dict[str, Any]:
    """An auth target's config: `rl_config`'s shape with one auth middleware on the route."""
    config = rl_config("local", port, origin_port, None, middleware="auth", rate="1/s", burst=1)
    config["middlewares"] = {"auth": options}
    return config


def start_auth_target(
    procs: Processes, name: str, origin_port: int, summaries: dict[str, list[str]]
) -> Target:
    """Start one auth target after showing that its middleware refuses a request without the
    credential (401) and admits one with it (200)."""
    try:
        options, header = auth_middleware(name, procs.workdir, fastgate_cli(REPO, fastgate_env()))
    except RuntimeError as exc:
        raise BenchError(f"{name}: {exc}") from exc
    config = auth_config(free_port(), origin_port, options)
    proc, log, port, summaries[name] = start_rl_gateway(procs, name, config)
    statuses = []
    for headers in ({}, dict([header])):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Host": "bench.local", **headers})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"{name}: auth probe: {exc!r}") from exc
        finally:
            conn.close()
    if statuses != [401, 200]:
        raise BenchError(
            f"{name}: without / with the credential answered {statuses}, "
            "expected [401, 200]: the auth middleware is not on the request path"
        )
    print(f"check: {name}: without the credential 401, with it 200")
    return Target(name, port, proc, log, proxied=True, headers=(header,))


def start_log_target(procs: Processes, name: str, origin_port: int) -> Target:
    """Start the access-log target after showing that a request is logged: a GET / must
    appear in the file as a JSON access line with status 200."""
    log = AccessLogFile(procs.workdir / f"{name}.access.log", free_port())
    config = log_config(free_port(), origin_port, log.admin_port, log.path)
    proc, plog, port, _ = start_rl_gateway(procs, name, config)
    start = log.size()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": "bench.local"})
        conn.getresponse().read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{name}: access-log probe: {exc!r}") from exc
    finally:
        conn.close()
    try:
        doc = probe_line(log, start)
    except LogCheckError as exc:
        raise BenchError(f"{name}: {exc}") from exc
    print(f"check: {name}: GET / logged to {log.path.name} ({doc['duration_ms']} ms)")
    return Target(name, port, proc, plog, proxied=True, access_log=log)


def start_route_target(procs: Processes, name: str, origin_port: int) -> Target:
    """Start a route-table or round-robin target (rr4: and its 3 more origin servers) after a
    probe gateway with the same config showed, from its /metrics, that the requests matched
    the middle route or were shared by every server."""
    www, prefix, origins = procs.workdir / "www", "", []
    if name in RR_TARGETS:
        for k in range(1, RR_TARGETS[name]):
            values: dict[str, str | int] = {"port": free_port(), "www": www}
            origins.append(
                start_nginx(procs, f"{name}-origin{k}", "origin.nginx.conf", LOAD_CORE, values)
            )
        ports = [origin_port, *(o.port for o in origins)]
    else:
        prefix, ports = bench_prefix(TABLE_TARGETS[name]), [origin_port]
        populate_www(www, prefix, SMALL_BODY)

    def config(port: int, admin_port: int | None) -> dict[str, Any]:
        if name in RR_TARGETS:
            return rr_config(port, ports, admin_port)
        return table_config(port, origin_port, TABLE_TARGETS[name], admin_port)

    admin_port = free_port()
    proc, _, port, _ = start_rl_gateway(procs, f"{name}-probe", config(free_port(), admin_port))
    try:
        verdict = probe_route_target(name, port, admin_port, ports)
    except RouteCheckError as exc:
        raise BenchError(f"{name}: {exc}") from exc
    finally:
        procs.stop(proc)
    print(f"check: {name}: {verdict}")
    proc, log, port, _ = start_rl_gateway(procs, name, config(free_port(), None))
    extra = tuple(o.proc for o in origins)
    return Target(name, port, proc, log, proxied=True, path_prefix=prefix, origins=extra)


def start_tls_target(
    procs: Processes, name: str, origin_port: int, files: TlsFiles, probes: dict[str, dict]
) -> Target:
    """Start nginx-tls or fastgate-tls with the run's certificate; `probe_tls` it into
    `probes`."""
    port = free_port()
    if name == NGINX_TLS:
        values = nginx_tls_values(port, origin_port, files)
        target = start_nginx(procs, name, "proxy-tls.nginx.conf", PROXY_CORE, values)
    else:
        config = fastgate_tls_config(port, origin_port, files)
        proc, log, port, _ = start_rl_gateway(procs, name, config)
        target = Target(name, port, proc, log, proxied=True)
    target.scheme, target.ca_file = "https", files.ca_file
    probes[name] = {**probe_tls(target), "made_with": files.made_with}
    return target


def get_close(
    target: Target,
    context: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """GET / with `Connection: close` (and the target's headers) on a new connection, read
    until the target closes it; over TLS, verifying the certificate against the run's CA for
    127.0.0.1 (with `context`, else `target.client_context()`) and offering `session` (one
    of the same context). Returns the raw reply and, over TLS, the protocol, cipher, the
    session to offer next and whether this one was resumed. A target that keeps the
    connection open past 10 s raises BenchError."""
    lines = [f"GET {target.path_prefix}/ HTTP/1.1", "Host: bench.local", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in target.headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    info: dict[str, Any] = {}
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", target.port), timeout=10) as raw:
            sock: socket.socket = raw
            if target.scheme == "https":
                context = context or target.client_context()
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
            with sock:  # the SSLSocket took over raw's descriptor
                sock.sendall(request)
                while chunk := sock.recv(65536):
                    reply += chunk
                if isinstance(sock, ssl.SSLSocket):
                    cipher = sock.cipher()
                    info = {
                        "protocol": sock.version(),
                        "cipher": cipher[0] if cipher else None,
                        "session": sock.session,  # TLS 1.3: its ticket came with the reply
                        "resumed": sock.session_reused,
                    }
    except TimeoutError as exc:
        raise BenchError(
            f"{target.name}: GET / with Connection: close: the connection was not closed "
            f"within 10 s ({len(reply)} bytes read)"
        ) from exc
    except (OSError, ssl.SSLError) as exc:
        raise BenchError(f"{target.name}: GET / with Connection: close: {exc!r}") from exc
    return reply, info


def probe_tls(target: Target) -> dict[str, Any]:
    """Two TLS connections to `target`, one GET / each: the certificate must verify against
    the run's CA, and the second offers the first's session, as wrk does when it reconnects.
    Returns the protocol, cipher and whether the session was resumed."""
    context = target.client_context()
    reply, first = get_close(target, context)
    if not reply.startswith(b"HTTP/1.1 200 "):
        raise BenchError(f"{target.name}: TLS probe answered {reply[:40]!r}")
    _, second = get_close(target, context, first["session"])
    seen = {"protocol": first["protocol"], "cipher": first["cipher"]}
    seen["session_resumed"] = second["resumed"]
    resumed = "resumed" if second["resumed"] else "NOT resumed"
    print(
        f"check: {target.name}: {seen['protocol']} {seen['cipher']}, certificate verified, "
        f"session {resumed} on reconnect"
    )
    return seen


def start_targets(
    procs: Processes,
    names: Sequence[str],
    fastgate_cmd: str,
    summaries: dict[str, list[str]],
    tls_probes: dict[str, dict],
) -> tuple[Target, dict[str, Target], dict[str, bytes]]:
    """Start the origin and every requested target; return origin, targets by name, bodies.
    The rate-limit targets' `fastgate check` summaries go in `summaries`, the TLS targets'
    probes in `tls_probes`."""
    expected = make_www(procs.workdir / "www")
    origin_port = free_port()
    origin = start_nginx(
        procs,
        "origin",
        "origin.nginx.conf",
        LOAD_CORE,
        {"port": origin_port, "www": procs.workdir / "www"},
    )
    targets: dict[str, Target] = {}
    tls_files = None
    if any(name in TLS_TARGETS for name in names):
        try:
            tls_files = make_certificates(procs.workdir / "tls")
        except CertificateError as exc:
            raise BenchError(str(exc)) from exc
    for name in names:
        if name == "origin":
            targets[name] = origin
        elif name == "nginx":
            values: dict[str, str | int] = {"port": free_port(), "origin_port": origin_port}
            targets[name] = start_nginx(procs, "nginx", "proxy.nginx.conf", PROXY_CORE, values)
        elif name == "haproxy":
            targets[name] = start_haproxy(procs, origin_port)
        elif name == "fastgate":
            targets[name] = start_fastgate(procs, origin_port, fastgate_cmd)
        elif name in RL_TARGETS:
            targets[name] = start_rl_target(procs, name, origin_port, summaries)
        elif name in AUTH_TARGETS:
            targets[name] = start_auth_target(procs, name, origin_port, summaries)
        elif name in LOG_TARGETS:
            targets[name] = start_log_target(procs, name, origin_port)
        elif name in ROUTE_TARGETS:
            targets[name] = start_route_target(procs, name, origin_port)
        elif name in TLS_TARGETS and tls_files is not None:
            targets[name] = start_tls_target(procs, name, origin_port, tls_files, tls_probes)
    return origin, targets, expected


def check_bodies(
    targets: Iterable[Target], sizes: Sequence[Size], expected: dict[str, bytes]
) -> None:
    """GET every size twice on one connection through every target; bodies must match the
    origin's byte for byte, status must be 200 and the connection must stay open."""
    for target in targets:
        conn = target.connection()
        try:
            for size in sizes:
                for attempt in (1, 2):
                    try:
                        headers = {"Host": "bench.local", **dict(target.headers)}
                        conn.request("GET", target.path_prefix + size.path, headers=headers)
                        resp = conn.getresponse()
                        body = resp.read()
                    except (OSError, http.client.HTTPException) as exc:
                        raise BenchError(f"{target.name} GET {size.path}: {exc!r}") from exc
                    where = f"{target.name} GET {size.path} (request {attempt})"
                    if resp.status == 429 and target.name in RL_TARGETS:
                        raise BenchError(f"{where}: 429: the never-tripping limit refused")
                    if resp.status != 200:
                        raise BenchError(f"{where}: status {resp.status}")
                    if body != expected[size.key]:
                        raise BenchError(
                            f"{where}: body differs from the origin's "
                            f"({len(body)} bytes, expected {len(expected[size.key])})"
                        )
                    if resp.will_close:
                        raise BenchError(f"{where}: connection not kept alive")
            print(f"check: {target.name}: {', '.join(s.key for s in sizes)} bodies identical")
        finally:
            conn.close()


def check_close(targets: Iterable[Target], expected: dict[str, bytes]) -> None:
    """For the `close` scenarios: a GET / with `Connection: close` through every target must
    answer 200 with the origin's body, and the target must then close the connection (so
    every request of such a run really comes on a new connection)."""
    for target in targets:
        reply, _ = get_close(target)
        head, _, body = reply.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 ") or body != expected["small"]:
            raise BenchError(
                f"{target.name}: GET / with Connection: close answered {head[:40]!r} "
                f"and {len(body)} body bytes"
            )
        print(f"check: {target.name}: Connection: close answered 200 and closed")


# --------------------------------------------------------------------------------------------
# Measurement


def read_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime in ticks) of a process from /proc/PID/stat, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]) + int(rest[12])


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (nginx master + worker, fastgate supervisor + workers).

    /proc/PID/task/*/children needs CONFIG_PROC_CHILDREN, so parents are read from every
    /proc/PID/stat instead."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = read_stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return sorted(tree)


def cpu_ticks(pids: Iterable[int]) -> dict[int, int]:
    """utime+stime ticks of each live pid."""
    ticks = {}
    for pid in pids:
        stat = read_stat(pid)
        if stat is not None:
            ticks[pid] = stat[1]
    return ticks


def core_ticks() -> dict[int, tuple[int, int]]:
    """(user+nice+system, steal) ticks of each CPU from /proc/stat."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *fields = line.split()
            ticks = [int(f) for f in fields]
            cores[int(name[3:])] = (ticks[0] + ticks[1] + ticks[2], ticks[7])
    return cores


def children_cpu_us() -> float:
    """CPU µs of this script's reaped children (a finished wrk run counts here)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1e6


def other_load(
    before: dict[int, tuple[int, int]],
    after: dict[int, tuple[int, int]],
    ours_us: dict[int, float],
    wall_us: float,
) -> dict[str, float]:
    """% of the proxy and load cores busy with processes other than ours, and the highest
    steal %, between two `core_ticks` snapshots; `ours_us` is our CPU µs on each core."""
    result: dict[str, float] = {}
    steal = 0.0
    for core in (PROXY_CORE, LOAD_CORE):
        busy_us = (after[core][0] - before[core][0]) * 1e6 / CLK_TCK
        result[f"core{core}"] = max(0.0, busy_us - ours_us.get(core, 0.0)) * 100 / wall_us
        steal = max(steal, (after[core][1] - before[core][1]) * 1e6 / CLK_TCK * 100 / wall_us)
    result["steal"] = steal
    return result


def cpu_delta_us(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU µs used between two `cpu_ticks` snapshots (a process that appeared counts whole)."""
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks * 1e6 / CLK_TCK


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_RE_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_RE_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_RE_PCT = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RE_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_RE_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(output: str) -> WrkResult:
    """Requests, req/s, latency percentiles (µs) and errors from `wrk --latency` output."""
    result = WrkResult(output=output)
    requests = _RE_REQUESTS.search(output)
    rps = _RE_RPS.search(output)
    pcts = {m.group(1): float(m.group(2)) * _UNITS_US[m.group(3)] for m in _RE_PCT.finditer(output)}
    if not requests or not rps or not {"50", "99"} <= pcts.keys():
        result.errors.append("wrk output not understood")
        return result
    result.requests = int(requests.group(1))
    result.seconds = float(requests.group(2)) * _UNITS_US[requests.group(3)] / 1e6
    result.rps = float(rps.group(1))
    result.latency_us = {f"p{k}": v for k, v in sorted(pcts.items())}
    sock = _RE_SOCKET.search(output)
    if sock:
        kinds = ("connect", "read", "write", "timeout")
        counts = [f"{n} {k}" for k, n in zip(kinds, map(int, sock.groups()), strict=True) if n]
        if counts:
            result.errors.append("socket errors: " + ", ".join(counts))
    non2xx = _RE_NON2XX.search(output)
    if non2xx and int(non2xx.group(1)):
        result.errors.append(f"{non2xx.group(1)} non-2xx/3xx responses")
    if result.requests == 0:
        result.errors.append("no requests completed")
    return result


def run_wrk(procs: Processes, target: Target, scenario: Scenario, seconds: int) -> WrkResult:
    """One wrk run on the load core: one thread, N connections, `seconds` long, with the
    target's headers on every request. In a `close` scenario every request says
    `Connection: close`: wrk counts the reply and reconnects (over TLS offering the session
    it had, which the target may resume)."""
    argv = [
        "taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{scenario.connections}",
        f"-d{seconds}s", "--latency", target.url(scenario.size.path),
    ]  # fmt: skip
    headers = list(target.headers)
    if scenario.handshake == "close":
        headers.append(("Connection", "close"))
    for name, value in headers:
        argv[-1:-1] = ["-H", f"{name}: {value}"]
    proc = procs.spawn(argv, stdout=subprocess.PIPE)
    # On Ctrl-C the exception leaves wrk registered, so `Processes.stop_all` ends it.
    try:
        out, _ = proc.communicate(timeout=seconds + WRK_GRACE)
        late = False
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        late = True
    procs.forget(proc)
    result = parse_wrk(out.decode(errors="replace"))
    if late:
        result.errors.append("wrk did not finish in time")
    elif proc.returncode != 0:
        result.errors.append(f"wrk exited with status {proc.returncode}")
    return result


def measure(
    procs: Processes,
    target: Target,
    origin: Target,
    scenario: Scenario,
    round_no: int,
    duration: int,
    warmup: int,
) -> Run:
    """A warm-up run (not recorded), then a recorded run with the proxy's and origin's CPU
    (and, for a target with a Redis, what the run cost Redis)."""
    log_mark = target.access_log.mark() if target.access_log else None
    warm = run_wrk(procs, target, scenario, warmup) if warmup > 0 else None
    proxy_pids = process_tree(target.proc.pid) if target.proxied else []
    origin_pids = [p for o in (origin.proc, *target.origins) for p in process_tree(o.pid)]
    redis_before = target.redis.snapshot() if target.redis else None
    proxy_before, origin_before = cpu_ticks(proxy_pids), cpu_ticks(origin_pids)
    cores_before, wrk_before, t0 = core_ticks(), children_cpu_us(), time.monotonic()
    wrk = run_wrk(procs, target, scenario, duration)
    cores_after, wrk_after, t1 = core_ticks(), children_cpu_us(), time.monotonic()
    proxy_after, origin_after = cpu_ticks(proxy_pids), cpu_ticks(origin_pids)
    proxy_us = cpu_delta_us(proxy_before, proxy_after)
    origin_us = cpu_delta_us(origin_before, origin_after)
    ours = {PROXY_CORE: proxy_us, LOAD_CORE: origin_us + wrk_after - wrk_before}
    errors = list(wrk.errors)
    if target.name in RL_TARGETS and any("non-2xx" in e for e in wrk.errors):
        errors.append("a never-tripping rate limit must answer no 429")
    redis = None
    if target.redis and redis_before:
        redis, redis_errors = target.redis.delta(redis_before, target.redis.snapshot())
        errors += redis_errors
        ours[LOAD_CORE] += redis["cpu_us"] or 0.0
        errors += redis_use_errors(RL_TARGETS[target.name], redis, wrk.requests)
    access_log = None
    if target.access_log and log_mark:
        counted = [r for r in (warm, wrk) if r is not None]
        access_log = target.access_log.delta(
            log_mark, sum(r.requests for r in counted), len(counted), scenario.connections
        )
        errors += access_log["errors"]
    if target.proc.poll() is not None:
        errors.append(f"{target.name} exited with status {target.proc.returncode}")
    if target.proxied and proxy_after.keys() != proxy_before.keys():
        errors.append("a proxy process exited during the run: CPU figure incomplete")
    per_req = wrk.requests or 1
    return Run(
        round=round_no,
        scenario=scenario.name,
        size=scenario.size.key,
        connections=scenario.connections,
        target=target.name,
        valid=not errors,
        errors=errors,
        requests=wrk.requests,
        seconds=wrk.seconds,
        rps=wrk.rps,
        latency_us=wrk.latency_us,
        cpu_us_per_req=proxy_us / per_req if target.proxied else None,
        origin_cpu_us_per_req=origin_us / per_req,
        other_load_pct=other_load(cores_before, cores_after, ours, (t1 - t0) * 1e6),
        proxy_pids=proxy_pids,
        wrk_output=wrk.output,
        redis=redis,
        handshake=scenario.handshake,
        access_log=access_log,
    )


def redis_use_errors(store: str, redis: dict[str, Any], requests: int) -> list[str]:
    """A Redis store that did not use Redis measured the local fallback (fail_open), not
    itself: the redis store runs one script per decision, the hybrid store syncs."""
    scripts = redis["scripts"]
    if store == "redis" and scripts < requests:
        return [
            f"Redis ran {scripts:.0f} scripts for {requests} requests: some decisions did "
            "not reach Redis (outage, local fallback)"
        ]
    if store == "hybrid" and requests and scripts <= 0:
        return ["the hybrid store sent Redis no sync during the run"]
    return []


# --------------------------------------------------------------------------------------------
# Summary and reports


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """Median, min and max of a non-empty list; None for an empty one."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def round_ratios(
    runs: Sequence[Run], scenario: str, target: str, baseline: str
) -> tuple[list[float], list[float]]:
    """req/s and CPU µs/req of `target` ÷ those of `baseline`, one pair per round in which
    both runs of `scenario` are valid."""
    by_key = {(r.round, r.scenario, r.target): r for r in runs}
    rps_ratio, cpu_ratio = [], []
    for rnd in sorted({r.round for r in runs}):
        run, base = by_key.get((rnd, scenario, target)), by_key.get((rnd, scenario, baseline))
        if not (run and base and run.valid and base.valid and base.rps):
            continue
        rps_ratio.append(run.rps / base.rps)
        if run.cpu_us_per_req is not None and base.cpu_us_per_req:
            cpu_ratio.append(run.cpu_us_per_req / base.cpu_us_per_req)
    return rps_ratio, cpu_ratio


def per_request(runs: Sequence[Run], key: str, scale: float) -> dict[str, float] | None:
    """Spread of a Redis figure of each run (`Run.redis[key]`) times `scale`, per request."""
    values = []
    for r in runs:
        value = r.redis.get(key) if r.redis is not None else None
        if value is not None and r.requests:
            values.append(value * scale / r.requests)
    return spread(values)


def summarize(runs: Sequence[Run], scenarios: Sequence[Scenario], targets: Sequence[str]) -> dict:
    """Per scenario and target: medians and min-max across rounds of the valid runs, and the
    ratios to nginx computed within each round (rounds where both runs are valid). The
    rate-limit targets also get their ratios to plain fastgate, computed the same way, and the
    Redis ones their Redis figures per request; the TLS targets their ratios to their plain
    counterpart, and fastgate-tls its ratios to nginx-tls."""
    summary: dict[str, dict[str, Any]] = {}
    for sc in scenarios:
        summary[sc.name] = {}
        for name in targets:
            mine = [r for r in runs if r.scenario == sc.name and r.target == name]
            ok = [r for r in mine if r.valid]
            rps_ratio, cpu_ratio = round_ratios(runs, sc.name, name, BASELINE)
            cpu = [r.cpu_us_per_req for r in ok if r.cpu_us_per_req is not None]
            if name in RL_TARGETS:
                fg_rps, fg_cpu = round_ratios(runs, sc.name, name, FASTGATE)
                vs_fastgate = FASTGATE in targets
                rate_limit: dict[str, Any] | None = {
                    "store": RL_TARGETS[name],
                    "rps_ratio_fastgate": spread(fg_rps) if vs_fastgate else None,
                    "cpu_ratio_fastgate": spread(fg_cpu) if vs_fastgate else None,
                    "redis_scripts_per_1k": per_request(ok, "scripts", 1000),
                    "redis_commands_per_1k": per_request(ok, "commands", 1000),
                    "redis_round_trips_per_1k": per_request(ok, "round_trips", 1000),
                    "redis_read_events_per_1k": per_request(ok, "read_events", 1000),
                    "redis_cpu_us_per_req": per_request(ok, "cpu_us", 1),
                }
            else:
                rate_limit = None
            tls = None
            if name in TLS_TARGETS:
                plain = TLS_TARGETS[name]
                pl_rps, pl_cpu = round_ratios(runs, sc.name, name, plain)
                tls = {
                    "plain": plain,
                    "rps_ratio_plain": spread(pl_rps) if plain in targets else None,
                    "cpu_ratio_plain": spread(pl_cpu) if plain in targets else None,
                }
                if name == FASTGATE_TLS:
                    ng_rps, ng_cpu = round_ratios(runs, sc.name, name, NGINX_TLS)
                    tls["rps_ratio_nginx_tls"] = spread(ng_rps) if NGINX_TLS in targets else None
                    tls["cpu_ratio_nginx_tls"] = spread(ng_cpu) if NGINX_TLS in targets else None
            route_pair = None
            if name in PAIRS:
                pr_rps, pr_cpu = round_ratios(runs, sc.name, name, PAIRS[name])
                have = PAIRS[name] in targets
                route_pair = {
                    "baseline": PAIRS[name],
                    "rps_ratio": spread(pr_rps) if have else None,
                    "cpu_ratio": spread(pr_cpu) if have else None,
                }
            vs_fastgate = None
            if (name in MIDDLEWARE_TARGETS or name in ROUTE_TARGETS) and FASTGATE in targets:
                fg_rps, fg_cpu = round_ratios(runs, sc.name, name, FASTGATE)
                vs_fastgate = {"rps_ratio": spread(fg_rps), "cpu_ratio": spread(fg_cpu)}
            summary[sc.name][name] = {
                "runs": len(mine),
                "valid": len(ok),
                "rps": spread([r.rps for r in ok]),
                "rps_ratio": spread(rps_ratio) if BASELINE in targets else None,
                "p50_us": spread([r.latency_us["p50"] for r in ok]),
                "p99_us": spread([r.latency_us["p99"] for r in ok]),
                "cpu_us_per_req": spread(cpu),
                "cpu_ratio": spread(cpu_ratio) if BASELINE in targets else None,
                "origin_cpu_us_per_req": spread([r.origin_cpu_us_per_req or 0.0 for r in ok]),
                "other_load_pct_max": {
                    key: max((r.other_load_pct[key] for r in mine), default=0.0)
                    for key in (f"core{PROXY_CORE}", f"core{LOAD_CORE}", "steal")
                },
                "rate_limit": rate_limit,
                "vs_fastgate": vs_fastgate,
                "tls": tls,
                "access_log": log_summary([r.access_log for r in mine])
                if name in LOG_TARGETS
                else None,
                "route_pair": route_pair,
            }
    return summary


def fmt_num(value: float, digits: int = 0) -> str:
    """A number with thousands separators."""
    return f"{value:,.{digits}f}"


def fmt_latency(us: float) -> str:
    """A latency in µs below 1 ms, in ms above."""
    return f"{us:.0f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def fmt_spread(stats: dict[str, float] | None, digits: int, with_range: bool) -> str:
    """`median` or `median (min-max)` for a table cell; a dash when there is nothing."""
    if not stats:
        return DASH
    med = fmt_num(stats["median"], digits)
    if not with_range or stats["min"] == stats["max"]:
        return med
    return f"{med} ({fmt_num(stats['min'], digits)}{DASH}{fmt_num(stats['max'], digits)})"


def markdown(
    summary: dict,
    runs: Sequence[Run],
    scenarios: Sequence[Scenario],
    targets: Sequence[str],
    meta: dict,
) -> str:
    """The report: machine and settings, one table per scenario, then the invalid runs."""
    cfg, mach = meta["config"], meta["machine"]
    many = cfg["rounds"] > 1
    lines = [
        f"# fastgate benchmark — {meta['timestamp']}",
        "",
        f"- machine: {mach['nproc']} CPUs ({mach['cpu_model']}), Linux {mach['kernel']}, "
        f"load average at start {mach['loadavg']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()),
        f"- {cfg['rounds']} interleaved round(s), {cfg['duration']} s per run after a "
        f"{cfg['warmup']} s warm-up; proxy on core {PROXY_CORE} (1 worker), origin nginx and "
        f"wrk (-t1) on core {LOAD_CORE}",
        f"- req/s: median (min{DASH}max) across rounds; ratios to nginx computed within each "
        "round; p50/p99: medians; CPU µs/req: the proxy's process tree utime+stime ÷ requests",
    ]
    if rl := cfg.get("rate_limit"):
        lines.append(
            f"- rate-limit targets: `fastgate run`, 1 worker, `rate_limit` on the route "
            f"(key client_ip, {rl['rate']}, burst {rl['burst']:,}; hybrid: default "
            f"sync_interval), Redis on core {LOAD_CORE}; ratios to plain fastgate computed "
            "within each round; Redis scripts: EVALSHA calls (what the gateway sends), "
            "commands: all Redis ran (a script runs 3 more), round trips: data segments the "
            "gateway sent Redis (TCP_INFO; one per auto-pipelined write)"
        )
    if tls := cfg.get("tls"):
        lines.append(
            f"- TLS targets: the same certificate and key for both ({tls['certificate']}), "
            f"TLS {tls['min_version']} and up, session resumption on; the probe client "
            f"(Python's OpenSSL) negotiated {tls['negotiated']}; on reconnect "
            f"{tls['resumption']} the previous session, as wrk's reconnects in `close` "
            "scenarios offer it"
        )
    if "close" in cfg.get("handshakes", ()):
        lines.append(
            "- `close` scenarios: wrk sends `Connection: close`, the target closes after each "
            "reply and wrk reconnects; latency is from the request's write (after connect and "
            "handshake) to the reply"
        )
    lines.append("")
    for sc in scenarios:
        lines += [
            f"## {sc.title}",
            "",
            f"| target | req/s | min{DASH}max | ratio to nginx | p50 | p99 | CPU µs/req "
            "| CPU ratio to nginx | valid runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in targets:
            s = summary[sc.name][name]
            rps = s["rps"]
            rng = f"{fmt_num(rps['min'])}{DASH}{fmt_num(rps['max'])}" if rps else DASH
            cells = [
                name,
                fmt_num(rps["median"]) if rps else DASH,
                rng,
                fmt_spread(s["rps_ratio"], 2, many),
                fmt_latency(s["p50_us"]["median"]) if s["p50_us"] else DASH,
                fmt_latency(s["p99_us"]["median"]) if s["p99_us"] else DASH,
                fmt_spread(s["cpu_us_per_req"], 1, many),
                fmt_spread(s["cpu_ratio"], 2, many),
                f"{s['valid']}/{s['runs']}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", other_load_note([summary[sc.name][name] for name in targets]), ""]
        lines += rate_limit_table(summary[sc.name], targets, many)
        lines += auth_table(summary[sc.name], targets, many)
        lines += log_table(summary[sc.name], targets, many)
        lines += route_table_md(summary[sc.name], targets, many, fmt_spread)
        lines += tls_table(summary[sc.name], targets, many, sc.handshake)
    bad = [r for r in runs if not r.valid]
    if bad:
        lines += ["## Invalid runs (left out of the figures)", ""]
        lines += [
            f"- round {r.round}, {r.scenario}, {r.target}: {'; '.join(r.errors)}" for r in bad
        ]
        lines.append("")
    return "\n".join(lines)


def rate_limit_table(rows: dict[str, dict], targets: Sequence[str], many: bool) -> list[str]:
    """Under a scenario's table: each rate-limit target against plain fastgate in the same
    round, and what it asked of Redis per request (nothing when no such target ran)."""
    names = [name for name in targets if name in RL_TARGETS]
    if not names:
        return []
    lines = [
        f"Rate limit on the route (never tripping; ratios to `{FASTGATE}` in the same round):",
        "",
        "| target | store | req/s | req/s ratio to fastgate | CPU µs/req | CPU ratio to fastgate "
        "| Redis scripts / 1k req | Redis commands / 1k req | Redis round trips / 1k req "
        "| Redis CPU µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        row, rl = rows[name], rows[name]["rate_limit"]
        cells = [
            name,
            rl["store"],
            fmt_spread(row["rps"], 0, False),
            fmt_spread(rl["rps_ratio_fastgate"], 2, many),
            fmt_spread(row["cpu_us_per_req"], 1, many),
            fmt_spread(rl["cpu_ratio_fastgate"], 2, many),
            fmt_spread(rl["redis_scripts_per_1k"], 1, many),
            fmt_spread(rl["redis_commands_per_1k"], 1, many),
            fmt_spread(rl["redis_round_trips_per_1k"], 1, many),
            fmt_spread(rl["redis_cpu_us_per_req"], 1, many),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if FASTGATE not in targets:
        lines += ["", f"(`{FASTGATE}` was not among the targets: no ratios.)"]
    return [*lines, ""]


def auth_table(rows: dict[str, dict], targets: Sequence[str], many: bool) -> list[str]:
    """Under a scenario's table: each auth target against plain fastgate in the same round;
    overhead = 1 - (req/s ratio), the figure the auth issue's targets are stated in."""
    names = [name for name in targets if name in AUTH_TARGETS]
    if not names:
        return []
    if FASTGATE not in targets:
        return [f"(Auth targets ran without `{FASTGATE}` among the targets: no ratios.)", ""]
    lines = [
        f"Auth on the route (credential on every request; ratios to `{FASTGATE}` in the same "
        "round):",
        "",
        "| target | req/s | req/s ratio to fastgate | overhead (median) | CPU µs/req "
        "| CPU ratio to fastgate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        row, vs = rows[name], rows[name]["vs_fastgate"] or {}
        ratio = vs.get("rps_ratio")
        overhead = f"{(1 - ratio['median']) * 100:.1f}%" if ratio else DASH
        cells = [
            name,
            fmt_spread(row["rps"], 0, False),
            fmt_spread(ratio, 2, many),
            overhead,
            fmt_spread(row["cpu_us_per_req"], 1, many),
            fmt_spread(vs.get("cpu_ratio"), 2, many),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def log_table(rows: dict[str, dict], targets: Sequence[str], many: bool) -> list[str]:
    """Under a scenario's table: the access-log target against plain fastgate in the same
    round (overhead = 1 - req/s ratio, as for auth), and the lines it wrote against the
    requests wrk counted (warm-ups included; a run may log the requests it left in flight)."""
    names = [name for name in targets if name in LOG_TARGETS]
    if not names:
        return []
    if FASTGATE not in targets:
        return [f"(Log targets ran without `{FASTGATE}` among the targets: no ratios.)", ""]
    lines = [
        f"Access log on (JSON to a file; ratios to `{FASTGATE}` in the same round):",
        "",
        "| target | req/s | req/s ratio to fastgate | overhead (median) | CPU µs/req "
        "| CPU ratio to fastgate | lines written | requests counted | dropped | bytes/line |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        row, vs = rows[name], rows[name]["vs_fastgate"] or {}
        ratio, log = vs.get("rps_ratio"), rows[name]["access_log"] or {}
        overhead = f"{(1 - ratio['median']) * 100:.1f}%" if ratio else DASH
        per_line = log.get("bytes_per_line")
        cells = [
            name,
            fmt_spread(row["rps"], 0, False),
            fmt_spread(ratio, 2, many),
            overhead,
            fmt_spread(row["cpu_us_per_req"], 1, many),
            fmt_spread(vs.get("cpu_ratio"), 2, many),
            fmt_num(log["lines"]) if log else DASH,
            fmt_num(log["requests"]) if log else DASH,
            fmt_num(log["dropped"]) if log.get("dropped") is not None else DASH,
            f"{per_line:.0f}" if per_line else DASH,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def tls_table(
    rows: dict[str, dict], targets: Sequence[str], many: bool, handshake: str
) -> list[str]:
    """Under a scenario's table: each TLS target against its plain counterpart in the same
    round, then fastgate-tls against nginx-tls (the issue's target: >= 0.5x on keep-alive)."""
    names = [name for name in targets if name in TLS_TARGETS]
    if not names:
        return []
    lines = [
        "TLS termination (same certificate; ratios to the plain counterpart in the same round):",
        "",
        "| target | plain | req/s | req/s ratio to plain | CPU µs/req | CPU ratio to plain |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in names:
        row, tls = rows[name], rows[name]["tls"]
        cells = [
            name,
            tls["plain"] if tls["plain"] in targets else f"({tls['plain']} not run)",
            fmt_spread(row["rps"], 0, False),
            fmt_spread(tls["rps_ratio_plain"], 2, many),
            fmt_spread(row["cpu_us_per_req"], 1, many),
            fmt_spread(tls["cpu_ratio_plain"], 2, many),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if FASTGATE_TLS in names and NGINX_TLS in names:
        tls = rows[FASTGATE_TLS]["tls"]
        rps, cpu = tls["rps_ratio_nginx_tls"], tls["cpu_ratio_nginx_tls"]
        line = (
            f"`{FASTGATE_TLS}` ÷ `{NGINX_TLS}` within each round: req/s "
            f"{fmt_spread(rps, 2, many)}, CPU µs/req {fmt_spread(cpu, 2, many)}"
        )
        if handshake == "keep-alive" and rps:
            verdict = "met" if rps["median"] >= TLS_RPS_GOAL else "**not met**"
            line += f"; target ≥ {TLS_RPS_GOAL}x nginx-tls req/s on keep-alive: {verdict}"
        lines += [line + ".", ""]
    return lines


def other_load_note(rows: Sequence[dict]) -> str:
    """One line under a table: how busy the cores were with processes other than the run's
    (another job on the machine makes every figure of the table suspect)."""
    peak = {
        key: max(row["other_load_pct_max"][key] for row in rows)
        for key in rows[0]["other_load_pct_max"]
    }
    core0, core1 = peak[f"core{PROXY_CORE}"], peak[f"core{LOAD_CORE}"]
    flag = "**Noisy:** " if max(peak.values()) > NOISY_PCT else ""
    return (
        f"{flag}other processes used up to {core0:.0f}% of core {PROXY_CORE} and "
        f"{core1:.0f}% of core {LOAD_CORE} during these runs; steal up to {peak['steal']:.0f}%."
    )


def write_chart(
    summary: dict, scenarios: Sequence[Scenario], targets: Sequence[str], path: Path
) -> bool:
    """A PNG with req/s and CPU µs/req per scenario and target, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_rps, ax_cpu) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(targets))
    xs = range(len(scenarios))
    for i, name in enumerate(targets):
        for ax, key in ((ax_rps, "rps"), (ax_cpu, "cpu_us_per_req")):
            stats = [summary[sc.name][name][key] for sc in scenarios]
            med = [s["median"] if s else 0.0 for s in stats]
            err = [
                [s["median"] - s["min"] if s else 0.0 for s in stats],
                [s["max"] - s["median"] if s else 0.0 for s in stats],
            ]
            ax.bar([x + i * width for x in xs], med, width, yerr=err, capsize=2, label=name)
    titles = (f"req/s (median, min{DASH}max)", "proxy CPU µs per request")
    for ax, title in zip((ax_rps, ax_cpu), titles, strict=True):
        ax.set_title(title)
        ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in xs])
        ax.set_xticklabels([sc.name for sc in scenarios])
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def command_output(argv: Sequence[str], cwd: Path | None = None) -> str | None:
    """First line of a command's combined output, or None if it cannot run."""
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=30, cwd=cwd, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_info(targets: Sequence[str]) -> dict:
    """CPU count and model, kernel, load, tool versions and the repository commit."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "nginx": command_output(["nginx", "-v"]),
        "wrk": command_output(["wrk", "-v"]),
    }
    if "haproxy" in targets:
        versions["haproxy"] = command_output(["haproxy", "-v"])
    if any(t in (FASTGATE, FASTGATE_TLS, *MIDDLEWARE_TARGETS, *ROUTE_TARGETS) for t in targets):
        versions["fastgate"] = command_output(
            [sys.executable, "-c", "import fastgate; print(getattr(fastgate, '__version__', '?'))"],
            cwd=REPO,
        )
    if any(RL_TARGETS.get(t, "local") != "local" for t in targets):
        versions["redis"] = command_output(["redis-server", "--version"])
    if any(t in TLS_TARGETS for t in targets):
        versions["openssl-python"] = ssl.OPENSSL_VERSION
        versions["openssl-nginx"] = nginx_openssl()
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain"])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "clk_tck": CLK_TCK,
        "versions": {k: _short_version(v) for k, v in versions.items()},
        "git_commit": commit if commit and re.fullmatch(r"[0-9a-f]+", commit) else None,
        "git_dirty": bool(dirty),
    }


def nginx_openssl() -> str | None:
    """The OpenSSL nginx runs with (`nginx -V`: "running with", else "built with")."""
    try:
        out = subprocess.run(
            ["nginx", "-V"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout + out.stderr
    match = re.search(r"running with (OpenSSL [^ )]+)", text) or re.search(
        r"built with (OpenSSL [^ )]+)", text
    )
    return match.group(1) if match else None


def _short_version(line: str | None) -> str:
    """`nginx version: nginx/1.22.1` → `1.22.1`; the line itself if no version is seen."""
    if not line:
        return "unknown"
    match = re.search(r"\d+\.\d+(?:\.\d+)?(?:[-+.~\w]*)?", line)
    return match.group(0) if match else line


# --------------------------------------------------------------------------------------------
# CLI


def csv_list(text: str) -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; lists are comma-separated."""
    ap = argparse.ArgumentParser(
        description="Benchmark fastgate against nginx and HAProxy with wrk (see README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--duration", type=int, default=5, help="seconds per recorded run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each run")
    ap.add_argument("--connections", default="50,200", help="wrk connections per scenario")
    ap.add_argument(
        "--handshake",
        default="keep-alive",
        help="how wrk's connections live, one scenario set each: keep-alive, and/or close "
        "(`Connection: close`: a new TCP connection, and TLS handshake, per request)",
    )
    ap.add_argument("--sizes", default="small,16k", help=f"body sizes: {','.join(SIZES)}")
    ap.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"targets, in run order, from {','.join(ALL_TARGETS)}",
    )
    ap.add_argument(
        "--fastgate-cmd",
        default=DEFAULT_FASTGATE_CMD,
        help="fastgate command line; {python}, {port} and {origin_port} are filled in "
        f"(run from the repository root, prefixed with taskset -c {PROXY_CORE})",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the results")
    args = ap.parse_args(argv)
    args.targets = csv_list(args.targets)
    args.sizes = csv_list(args.sizes)
    args.handshake = csv_list(args.handshake)
    if not args.handshake or [h for h in args.handshake if h not in HANDSHAKES]:
        ap.error(f"--handshake: one or both of {','.join(HANDSHAKES)}")
    if len(set(args.handshake)) != len(args.handshake):
        ap.error("--handshake: no repeats")
    try:
        args.connections = [int(c) for c in csv_list(args.connections)]
    except ValueError:
        ap.error("--connections: integers, comma-separated")
    if unknown := [t for t in args.targets if t not in ALL_TARGETS]:
        ap.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    if len(set(args.targets)) != len(args.targets) or not args.targets:
        ap.error("--targets: a non-empty list without repeats")
    if unknown := [s for s in args.sizes if s not in SIZES]:
        ap.error(f"--sizes: unknown {unknown}; choose from {','.join(SIZES)}")
    if not args.sizes or not args.connections or min(args.connections) < 1:
        ap.error("--sizes and --connections need at least one positive value")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        ap.error("--rounds and --duration must be >= 1, --warmup >= 0")
    return args


def require_tools(targets: Sequence[str]) -> None:
    """Fail with one clear message naming every missing program and the core count needed."""
    needed = {"taskset": "util-linux", "wrk": "wrk", "nginx": "nginx"}
    if "haproxy" in targets:
        needed["haproxy"] = "haproxy"
    if any(RL_TARGETS.get(t, "local") != "local" for t in targets):
        needed["redis-server"] = "redis-server"
    missing = [
        f"{prog} (Debian package {pkg})" for prog, pkg in needed.items() if not shutil.which(prog)
    ]
    if missing:
        raise BenchError("missing programs: " + ", ".join(missing))
    if len(os.sched_getaffinity(0)) < 2:
        raise BenchError("need at least 2 usable CPUs (proxy on core 0, origin and wrk on core 1)")


def raise_fd_limit() -> None:
    """Raise the open-file soft limit to the hard limit; children (HAProxy at maxconn 8000,
    nginx, wrk) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def write_results(
    out: Path, stamp: str, report: dict, md: str, chart: Callable[[Path], bool]
) -> list[Path]:
    """Write `<stamp>.json`, `<stamp>.md`, `latest.md` (and PNGs); return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    json_path, md_path = out / f"{stamp}.json", out / f"{stamp}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(md + "\n")
    shutil.copyfile(md_path, out / "latest.md")
    written += [json_path, md_path, out / "latest.md"]
    png = out / f"{stamp}.png"
    if chart(png):
        shutil.copyfile(png, out / "latest.png")
        written += [png, out / "latest.png"]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Start everything, check bodies, run the interleaved rounds, write the reports."""
    args = parse_args(argv)
    scenarios = [
        Scenario(SIZES[s], c, h)
        for h in args.handshake
        for s in args.sizes
        for c in args.connections
    ]
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="fastgate-bench-"))
    procs = Processes(workdir)
    runs: list[Run] = []
    rl_summaries: dict[str, list[str]] = {}
    tls_probes: dict[str, dict] = {}
    targets: dict[str, Target] = {}
    try:
        require_tools(args.targets)
        raise_fd_limit()
        machine = machine_info(args.targets)
        origin, targets, expected = start_targets(
            procs, args.targets, args.fastgate_cmd, rl_summaries, tls_probes
        )
        check_bodies(targets.values(), [SIZES[s] for s in args.sizes], expected)
        if "close" in args.handshake:
            check_close(targets.values(), expected)
        total = args.rounds * len(scenarios) * len(targets)
        eta = total * (args.duration + args.warmup)
        print(f"{total} runs, about {eta // 60} min {eta % 60} s")
        for round_no in range(1, args.rounds + 1):
            for sc in scenarios:
                for name in args.targets:
                    run = measure(
                        procs, targets[name], origin, sc, round_no, args.duration, args.warmup
                    )
                    runs.append(run)
                    print(progress_line(run, args.rounds))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: processes stopped, no results written", file=sys.stderr)
        return 130
    finally:
        for target in targets.values():
            if target.redis:
                target.redis.close()
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarize(runs, scenarios, args.targets)
    config = {
        "rounds": args.rounds,
        "duration": args.duration,
        "warmup": args.warmup,
        "connections": args.connections,
        "handshakes": args.handshake,
        "sizes": args.sizes,
        "targets": args.targets,
        "fastgate_cmd": args.fastgate_cmd if "fastgate" in args.targets else None,
        "proxy_core": PROXY_CORE,
        "load_core": LOAD_CORE,
    }
    if rl_summaries:
        config["rate_limit"] = {
            "rate": RL_RATE,
            "burst": RL_BURST,
            "key": "client_ip",
            "probe": {"rate": PROBE_RATE, "burst": PROBE_BURST},
            "fastgate_check": rl_summaries,  # `fastgate check`'s words for each target's limit
        }
    if tls_probes:
        config["tls"] = tls_config_note(tls_probes)
    meta = {
        "timestamp": started.isoformat(timespec="seconds"),
        "machine": machine,
        "config": config,
    }
    md = markdown(summary, runs, scenarios, args.targets, meta)
    report = {**meta, "schema": 3, "summary": summary, "runs": [asdict(r) for r in runs]}
    written = write_results(
        args.out, stamp, report, md, lambda p: write_chart(summary, scenarios, args.targets, p)
    )
    print()
    print(md)
    print("written: " + ", ".join(str(p) for p in written))
    return 0 if all(r.valid for r in runs) else 1


def tls_config_note(probes: dict[str, dict]) -> dict[str, Any]:
    """`config.tls` of the report: the certificate, and what the probe client negotiated with
    each TLS target and whether its session was resumed (as wrk's reconnects are)."""
    made_with = {p["made_with"] for p in probes.values()}
    seen = {f"{p['protocol']} {p['cipher']}" for p in probes.values()}
    negotiated = (
        seen.pop()
        if len(seen) == 1
        else ", ".join(f"{name}: {p['protocol']} {p['cipher']}" for name, p in probes.items())
    )
    resumption = ", ".join(
        f"{name} {'resumes' if p['session_resumed'] else 'does NOT resume'}"
        for name, p in probes.items()
    )
    return {
        "certificate": f"{KEY_TYPE}, self-signed CA, made with {'/'.join(sorted(made_with))}",
        "min_version": MIN_VERSION,
        "negotiated": negotiated,
        "resumption": resumption,
        "probes": probes,
    }


def progress_line(run: Run, rounds: int) -> str:
    """One line per recorded run while the suite is going."""
    cpu = f"{run.cpu_us_per_req:.1f} µs/req" if run.cpu_us_per_req is not None else DASH
    head = f"[round {run.round}/{rounds}] {run.scenario:<15} {run.target:<18}"
    if not run.valid:
        return f"{head} INVALID: {'; '.join(run.errors)}"
    p50, p99 = run.latency_us["p50"], run.latency_us["p99"]
    other = "/".join(f"{run.other_load_pct[f'core{c}']:.0f}%" for c in (PROXY_CORE, LOAD_CORE))
    line = (
        f"{head} {fmt_num(run.rps):>9} req/s  p50 {fmt_latency(p50):>9}  "
        f"p99 {fmt_latency(p99):>9}  cpu {cpu:<12}  other load {other}"
    )
    if run.redis and run.requests:
        per_k = 1000 / run.requests
        trips = run.redis["round_trips"]
        line += f"  redis {run.redis['scripts'] * per_k:.1f} scripts/1k"
        line += f" {trips * per_k:.1f} rt/1k" if trips is not None else ""
    if run.access_log:
        line += f"  log {run.access_log['lines']:,} lines / {run.access_log['requests']:,} req"
    return line


if __name__ == "__main__":
    sys.exit(main())
