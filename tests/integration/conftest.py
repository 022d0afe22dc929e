"""Fixtures for the data-plane integration tests: a real origin, the real gateway, raw clients.

Everything runs on 127.0.0.1 with ports found by binding port 0. The gateway is the real thing:
`python -m fastgate run -c <tmp>/fastgate.yaml` (a supervisor and its worker processes), ready
once the admin listener's /readyz answers 200. Its stderr goes to a file; teardown sends
SIGTERM and asserts a clean exit (status 0 within 10 s), no traceback in that log, and a
shutdown quicker than drain_timeout: every test closes its clients, so a worker that still
waits on a client connection at the end has leaked one.

Most tests share one session gateway (`gateway`) whose config has a route per scenario, picked
by the Host header (see `main_config`). Tests that need their own limits, or a fresh worker
whose memory is measured, start one with `start_gateway(config)`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import origin as origin_mod  # noqa: E402  (the origin module, for its deterministic stream)

ORIGIN_HOST = "origin.test"
Addr = tuple[str, int]


def free_port() -> int:
    """A port nobody listens on right now (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGATE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def assert_no_traceback(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, f"{log} has a traceback:\n{text[-4000:]}"


# ---- the origin ------------------------------------------------------------------------------


def spawn_origin(script: str, log: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """Start one of the test origins here (`origin.py`, `fault_origin.py`,
    `services_origin.py`) on a free port: (process, port) once it printed `PORT <n>`."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        env=_clean_env(),
        cwd=REPO,
    )
    line = proc.stdout.readline().decode()
    assert line.startswith("PORT "), f"{script} did not start: {line!r}"
    return proc, int(line.split()[1])


class Origin:
    """`tests/integration/origin.py` running as a subprocess."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc, self.port = spawn_origin("origin.py", log)
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        """The origin's counters (asked directly, on a control connection)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/_stats", headers={"Connection": "close"})
            resp = conn.getresponse()
            assert resp.status == 200
            return json.loads(resp.read())
        finally:
            conn.close()

    def data_connections(self) -> int:
        """Connections accepted so far, not counting control (/_stats) ones."""
        s = self.stats()
        return s["accepted"] - s["control"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert_no_traceback(self.log)


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    o = Origin(tmp_path_factory.mktemp("origin") / "origin.log")
    yield o
    o.stop()


# ---- the gateway -----------------------------------------------------------------------------


def base_config(origin_port: int, **overrides: Any) -> dict[str, Any]:
    """A one-worker config: entrypoint `web` on a free port, every request to the origin."""
    cfg: dict[str, Any] = {
        "workers": 1,
        "log_level": "warning",
        "drain_timeout": 3,
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "demo_origin": {"enabled": False},
        "entrypoints": {"web": {"address": f"127.0.0.1:{free_port()}"}},
        "services": {"origin": {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}},
        "routes": [{"name": "origin", "match": {"path": "/"}, "service": "origin"}],
    }
    cfg.update(overrides)
    return cfg


def main_config(origin_port: int, blackhole_port: int) -> dict[str, Any]:
    """The shared gateway: one route per scenario, chosen by Host.

    origin.test, 127.0.0.1 and localhost -> the origin; any other host (tests use
    unknown.test) has no route; dead.test -> a port with no server; hang.test -> the origin
    with upstream_response 1 s; shortpool.test -> the origin with pool.idle_timeout 0.3 s;
    reuse.test -> the origin with its own pool; blackhole.test -> a port whose connects
    hang, with upstream_connect 1 s. Entrypoint `trusted` believes X-Forwarded-* from
    127.0.0.1 and adds Forwarded.
    """
    origin_url = f"http://127.0.0.1:{origin_port}"
    services = {
        "origin": {"servers": [{"url": origin_url}]},
        "dead": {"servers": [{"url": f"http://127.0.0.1:{free_port()}"}]},
        "hang": {"servers": [{"url": origin_url}], "timeouts": {"upstream_response": 1}},
        "shortpool": {"servers": [{"url": origin_url}], "pool": {"idle_timeout": 0.3}},
        "reuse": {"servers": [{"url": origin_url}]},
        "blackhole": {
            "servers": [{"url": f"http://127.0.0.1:{blackhole_port}"}],
            "timeouts": {"upstream_connect": 1},
        },
    }
    routes = [
        {"name": name, "match": {"hosts": [f"{name}.test"]}, "service": name, "priority": 10}
        for name in ("dead", "hang", "shortpool", "reuse", "blackhole")
    ]
    routes.append(
        {
            "name": "origin",
            "match": {"hosts": [ORIGIN_HOST, "127.0.0.1", "localhost"]},
            "service": "origin",
        }
    )
    return base_config(
        origin_port,
        timeouts={"head": 1},
        entrypoints={
            "web": {"address": f"127.0.0.1:{free_port()}"},
            "trusted": {
                "address": f"127.0.0.1:{free_port()}",
                "forwarded": {"trusted_ips": ["127.0.0.1/32"], "forwarded_header": True},
            },
        },
        services=services,
        routes=routes,
    )


@dataclass
class Gateway:
    """A running `fastgate run -c <config>` and where to reach it.

    With `argv` the gateway is started by that command line instead (`config` then only
    names the addresses it was given) and `env` adds FASTGATE_* variables.
    """

    config: dict[str, Any]
    directory: Path
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.directory / "fastgate.log"

    def address(self, entrypoint: str = "web") -> Addr:
        host, port = self.config["entrypoints"][entrypoint]["address"].rsplit(":", 1)
        return host, int(port)

    @property
    def addr(self) -> Addr:
        return self.address("web")

    @property
    def admin(self) -> Addr:
        host, port = self.config["admin"]["address"].rsplit(":", 1)
        return host, int(port)

    @property
    def worker_pid(self) -> int:
        assert len(self.pids) == 1, self.pids
        return self.pids[0]

    def start(self) -> Gateway:
        argv = self.argv
        if argv is None:
            path = self.directory / "fastgate.yaml"
            path.write_text(yaml.safe_dump(self.config, sort_keys=False))
            argv = ["run", "-c", str(path)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", *argv],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**_clean_env(), **self.env},
            cwd=REPO,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"gateway exited with {self.proc.returncode}:\n{self.log.read_text()}")
            status = self.readyz()
            if status is not None and status.get("ready"):
                self.pids = list(status["pids"])
                return self
            if time.monotonic() > deadline:
                self._kill()
                pytest.fail(f"gateway not ready after 20 s: {status}\n{self.log.read_text()}")
            time.sleep(0.05)

    def _kill(self) -> None:
        """Stop a gateway that failed to start, workers included."""
        assert self.proc is not None
        status = self.readyz() or {}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in status.get("pids", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def readyz(self) -> dict[str, Any] | None:
        try:
            conn = http.client.HTTPConnection(*self.admin, timeout=2)
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            conn.close()
            return doc
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def stop(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"gateway did not exit within 10 s of SIGTERM:\n{self.log.read_text()}")
        assert code == 0, f"gateway exit status {code}:\n{self.log.read_text()[-4000:]}"
        # Every test closes its clients, and idle ones close at once on SIGTERM: a drain that
        # waits for drain_timeout means the worker still counted a connection as live (a leak).
        elapsed = time.monotonic() - start
        assert elapsed < self.config.get("drain_timeout", 30) - 0.5, (
            f"shutdown took {elapsed:.1f} s: a client connection outlived its test"
        )
        for pid in self.pids:
            assert not _alive(pid), f"worker {pid} outlived the supervisor"
        assert_no_traceback(self.log)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    with contextlib.suppress(OSError):
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    return False


@pytest.fixture(scope="session")
def blackhole() -> Iterator[int]:
    """A port where a TCP connect hangs: a listener with backlog 0 that never accepts, its
    queue filled, so further SYNs are dropped."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    listener.close()


@pytest.fixture(scope="session")
def gateway(
    origin: Origin, blackhole: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = Gateway(main_config(origin.port, blackhole), tmp_path_factory.mktemp("gateway")).start()
    yield gw
    gw.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Gateway]]:
    """Start a gateway with a given config; it is stopped (and checked) at teardown."""
    started: list[Gateway] = []

    def start(config: dict[str, Any]) -> Gateway:
        directory = tmp_path / f"gw{len(started)}"
        directory.mkdir()
        gw = Gateway(config, directory)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


# ---- raw HTTP clients ------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes
    raw_body: bytes = b""  # the body as framed on the wire (chunked included)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One TCP connection with exact control of the bytes sent and a small response reader."""

    def __init__(self, addr: Addr, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = bytearray()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.buf += data
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"closed after {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 2]
                return out
            if not self._fill():
                raise EOFError(f"closed inside a line: {bytes(self.buf)!r}")

    def read_head(self) -> tuple[int, str, list[tuple[str, str]], bytes]:
        raw = bytearray(self.read_line())
        while True:
            line = self.read_line()
            raw += line
            if line == b"\r\n":
                break
        lines = bytes(raw).split(b"\r\n")
        version, status, reason = lines[0].decode("latin-1").split(" ", 2)
        assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
        headers = []
        for line in lines[1:-2]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip()))
        return int(status), reason, headers, bytes(raw)

    def read_response(self, head_request: bool = False, interim: bool = False) -> Response:
        """The next response; 1xx are returned only when `interim`, else skipped."""
        while True:
            status, reason, headers, raw = self.read_head()
            if 100 <= status < 200 and status != 101 and not interim:
                continue
            break
        resp = Response(status, reason, headers, b"", raw)
        if head_request or 100 <= status < 200 or status in (204, 304):
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None:
            assert te.lower() == "chunked", te
            resp.body, resp.raw_body = self.read_chunked()
        elif cl is not None:
            resp.body = resp.raw_body = self.read_exact(int(cl))
        else:
            resp.body = resp.raw_body = self.read_to_eof()
        return resp

    def read_chunked(self) -> tuple[bytes, bytes]:
        body = bytearray()
        raw = bytearray()
        while True:
            line = self.read_line()
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                break
            data = self.read_exact(size + 2)
            assert data.endswith(b"\r\n")
            raw += data
            body += data[:-2]
        while True:
            line = self.read_line()
            raw += line
            if line == b"\r\n":
                return bytes(body), bytes(raw)

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the peer closed the connection (recv returns b"") with nothing before."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        host: str = ORIGIN_HOST,
    ) -> Response:
        self.send(build_request(method, path, headers, body, host))
        return self.read_response(head_request=method == "HEAD")


def build_request(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    host: str | None = ORIGIN_HOST,
) -> bytes:
    """A request with Content-Length set from `body` (unless headers frame it otherwise)."""
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    headers = dict(headers or {})
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers):
        headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk_encode(body: bytes, sizes: tuple[int, ...] = (1, 7, 4096, 65536)) -> bytes:
    """`body` as a chunked message body, with chunk sizes cycling through `sizes`."""
    out = bytearray()
    pos = 0
    i = 0
    while pos < len(body):
        k = min(sizes[i % len(sizes)], len(body) - pos)
        out += b"%x\r\n" % k + body[pos : pos + k] + b"\r\n"
        pos += k
        i += 1
    return bytes(out + b"0\r\n\r\n")


def get(addr: Addr, path: str, host: str = ORIGIN_HOST, **kw: Any) -> Response:
    """One request on a fresh connection."""
    with Client(addr) as c:
        return c.request("GET", path, host=host, **kw)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def assert_serves(addr: Addr) -> None:
    """The gateway still answers a plain request on a new connection."""
    resp = get(addr, "/echo-path/still-alive")
    assert resp.status == 200
    assert resp.body == b"/echo-path/still-alive"


def assert_error(resp: Response, status: int) -> dict[str, Any]:
    """A gateway error reply: the status, a JSON body with `error` and a `request_id`."""
    assert resp.status == status, (resp.raw_head, resp.body)
    assert resp.header("content-type") == "application/json"
    doc = resp.json()
    assert set(doc) == {"error", "request_id"}, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert len(doc["request_id"]) == 32 and int(doc["request_id"], 16) >= 0
    return doc


# ---- memory ----------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler:
    """Samples a process's VmRSS every 50 ms in a thread; `growth` is max minus baseline."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss_bytes(pid)
        self.samples: list[int] = [self.baseline]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return max(self.samples) - self.baseline


MiB = 1 << 20
BLOCK = origin_mod.BLOCK
stream_bytes = origin_mod.stream_bytes
stream_sha256 = origin_mod.stream_sha256
chunked_body = origin_mod.chunked_body


def assert_reply_then_lingering_close(addr: Addr, request: bytes, status: int) -> None:
    """Send a request with an unread body; the reply (`status`) must come whole, then FIN,
    and the gateway must go on reading so the client can keep sending without an RST (a reset
    drops the reply's unsent bytes on a real network, RFC 9112 §9.6)."""
    with socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while data := sock.recv(65536):
            received += data
        assert received.startswith(b"HTTP/1.1 %d " % status), received[:200]
        time.sleep(0.2)
        for _ in range(3):
            sock.sendall(b"v" * 20000)  # raises ConnectionResetError / EPIPE after an RST
            time.sleep(0.05)
