"""Upstream faults through the real gateway: servers that die, hang, reset, dribble, or lie.

Each test starts its own one-worker gateway and its own fault_origin.py processes (so it can
SIGKILL or SIGSTOP them), all on 127.0.0.1, and checks:
- the client gets the documented answer (fastgate/_core/conn.pyx): connect refused -> 502;
  no head within upstream_response -> 504; closed before the head -> 502; garbage head ->
  502; a failure after the response started -> the client connection is cut (short body,
  then EOF), never a hang;
- no client waits past its socket timeout (every socket has one; a hang fails the test);
- the worker did not crash (the same pid in /readyz) and still serves a healthy route;
- a request that may have reached a server is never retried unless its method is idempotent
  and it has no body: the origins count what they received, and a POST or PATCH arrives once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Client,
    Gateway,
    Origin,
    assert_error,
    base_config,
    build_request,
    spawn_origin,
)

CLIENT_TIMEOUT = 8.0  # seconds any client socket waits; a read past it means a hang
LIVE_HOST = "live.test"


class FaultOrigin:
    """tests/integration/fault_origin.py as a child process: kill it, stop it, count at it."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc, self.port = spawn_origin("fault_origin.py", log, "--name", name)
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self) -> dict[str, int]:
        """How many times each `<METHOD> <target>` reached this origin."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/_stats")
            resp = conn.getresponse()
            assert resp.status == 200
            return json.loads(resp.read())["requests"]
        finally:
            conn.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        text = self.log.read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]


@pytest.fixture
def fault_origins(tmp_path: Path) -> Iterator[Callable[[str], FaultOrigin]]:
    started: list[FaultOrigin] = []

    def start(name: str) -> FaultOrigin:
        o = FaultOrigin(name, tmp_path / f"fault-{name}.log")
        started.append(o)
        return o

    yield start
    for o in started:
        o.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultOrigin]:
    """A healthy origin behind `live.test`: proves the gateway still serves after a fault."""
    o = FaultOrigin("live", tmp_path_factory.mktemp("live") / "live.log")
    yield o
    o.stop()


@pytest.fixture
def fault_gateway(
    start_gateway: Callable[[dict[str, Any]], Gateway], live: FaultOrigin
) -> Callable[..., Gateway]:
    """A one-worker gateway: `faulty.test` (any other host) -> the given servers with the given
    service options; `live.test` -> the healthy origin."""

    def start(servers: list[str], route_timeouts: dict | None = None, **service: Any) -> Gateway:
        route: dict[str, Any] = {"name": "faulty", "match": {"path": "/"}, "service": "faulty"}
        if route_timeouts:
            route["timeouts"] = route_timeouts
        config = base_config(
            live.port,
            services={
                "faulty": {"servers": [{"url": url} for url in servers], **service},
                "live": {"servers": [{"url": live.url}]},
            },
            routes=[
                {
                    "name": "live",
                    "match": {"hosts": [LIVE_HOST]},
                    "service": "live",
                    "priority": 10,
                },
                route,
            ],
        )
        return start_gateway(config)

    return start


NO_RETRIES = {"attempts": 0}


def request(
    gw: Gateway, method: str, target: str, body: bytes = b"", headers: dict | None = None
) -> Any:
    """One request on a new connection; the response (a cut or hang raises)."""
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        return c.request(method, target, headers=headers, body=body, host="faulty.test")


def read_until_cut(c: Client, on_head: Callable[[], None] | None = None) -> tuple[int, int]:
    """Read a 200 whose body gets cut: (Content-Length announced, body bytes received before
    EOF); `on_head` runs once the head is in. A body that never ends times out (TimeoutError
    fails the test)."""
    status, _reason, headers, _raw = c.read_head()
    assert status == 200, headers
    if on_head is not None:
        on_head()
    length = int(dict((k.lower(), v) for k, v in headers)["content-length"])
    received = len(c.buf)
    c.buf.clear()
    while True:
        try:
            data = c.sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not data:
            break
        received += len(data)
    return length, received


def assert_healthy(gw: Gateway) -> None:
    """Same worker as at start (no crash), and it answers a healthy route."""
    doc = gw.readyz()
    assert doc is not None and doc["ready"], doc
    assert doc["pids"] == [gw.worker_pid], f"the worker was replaced: {doc['pids']}"
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        resp = c.request("GET", "/ok", host=LIVE_HOST)
    assert resp.status == 200
    assert resp.body == b"live /ok"


def total(origins: list[FaultOrigin], key: str) -> int:
    return sum(o.requests().get(key, 0) for o in origins)


# ---- 1. killed while idle ----------------------------------------------------------------------


def test_killed_idle_origin_without_retries_is_502(fault_origins, fault_gateway) -> None:
    a = fault_origins("A")
    gw = fault_gateway([a.url], retries=NO_RETRIES)
    assert request(gw, "GET", "/ok").body == b"A /ok"  # a pooled connection now exists
    a.kill()
    doc = assert_error(request(gw, "GET", "/ok"), 502)
    assert doc["error"] == "upstream connect failed"
    assert_healthy(gw)


def test_killed_idle_origin_with_connect_retries_goes_to_the_other(
    fault_origins, fault_gateway
) -> None:
    a, b = fault_origins("A"), fault_origins("B")
    gw = fault_gateway([a.url, b.url], retries={"attempts": 1, "retry_on": ["connect_failure"]})
    answered = {request(gw, "GET", f"/ok?warm={i}").body.split()[0] for i in range(4)}
    assert answered == {b"A", b"B"}
    a.kill()
    for i in range(4):
        resp = request(gw, "GET", f"/ok?after={i}")
        assert resp.status == 200, resp.body
        assert resp.body == f"B /ok?after={i}".encode()
    assert_healthy(gw)


# ---- 2. killed mid-response --------------------------------------------------------------------


def test_killed_mid_response_cuts_the_client(fault_origins, fault_gateway) -> None:
    a = fault_origins("A")
    gw = fault_gateway([a.url], retries=NO_RETRIES)
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        c.send(build_request("GET", "/slowbody?size=1000000&piece=4096&gap=0.05", host="x"))
        length, received = read_until_cut(c, on_head=a.kill)
    assert length == 1_000_000
    assert received < length
    assert_healthy(gw)


# ---- 3. stopped (hangs) ------------------------------------------------------------------------


def test_stopped_origin_is_504_after_upstream_response(fault_origins, fault_gateway) -> None:
    a = fault_origins("A")
    gw = fault_gateway([a.url], retries=NO_RETRIES, timeouts={"upstream_response": 0.5})
    assert request(gw, "GET", "/ok").status == 200
    a.pause()
    try:
        start = time.monotonic()
        doc = assert_error(request(gw, "GET", "/ok?stopped=1"), 504)
        assert doc["error"] == "upstream timeout"
        assert time.monotonic() - start >= 0.4  # the timer fired, not some other failure
    finally:
        a.resume()
    resp = request(gw, "GET", "/ok?resumed=1")
    assert resp.status == 200
    assert resp.body == b"A /ok?resumed=1"
    assert_healthy(gw)


# ---- 4. reset mid-body -------------------------------------------------------------------------


def test_reset_mid_body_cuts_the_client(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]
) -> None:
    gw = start_gateway(base_config(origin.port))
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        c.send(build_request("GET", "/reset"))
        length, received = read_until_cut(c)
    assert length == 1 << 20
    assert 0 < received < length
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        resp = c.request("GET", "/echo-path/after-reset")
    assert resp.status == 200 and resp.body == b"/echo-path/after-reset"
    assert gw.readyz()["pids"] == [gw.worker_pid]


# ---- 5. slow ---------------------------------------------------------------------------------


def test_slow_head_within_upstream_response_is_200(fault_origins, fault_gateway) -> None:
    a = fault_origins("A")
    # The route's upstream_response (1 s) overrides the service's (0.2 s).
    gw = fault_gateway(
        [a.url],
        route_timeouts={"upstream_response": 1},
        retries=NO_RETRIES,
        timeouts={"upstream_response": 0.2},
    )
    resp = request(gw, "GET", "/delay?head=0.3")
    assert resp.status == 200
    assert resp.body == b"A /delay?head=0.3"
    assert_healthy(gw)


def test_dribbled_body_past_upstream_idle_is_cut(fault_origins, fault_gateway) -> None:
    a = fault_origins("A")
    gw = fault_gateway(
        [a.url], retries=NO_RETRIES, timeouts={"upstream_response": 1, "upstream_idle": 0.5}
    )
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        c.send(build_request("GET", "/slowbody?size=300&piece=100&gap=1", host="x"))
        length, received = read_until_cut(c)
    assert length == 300
    assert received == 100  # the first piece, then the 1 s gap passes upstream_idle
    assert_healthy(gw)


# ---- 6. garbage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "error"),
    [
        pytest.param("/garbage", "malformed upstream response", id="garbage head"),
        pytest.param("/badchunk", "bad chunked framing from upstream", id="bad chunk with head"),
        pytest.param("/close", "upstream closed the connection", id="closed before the head"),
        pytest.param("/reset", "upstream closed the connection", id="reset before the head"),
    ],
)
def test_garbage_or_nothing_before_the_body_is_502(
    fault_origins, fault_gateway, target: str, error: str
) -> None:
    a = fault_origins("A")
    gw = fault_gateway([a.url], retries=NO_RETRIES)
    doc = assert_error(request(gw, "GET", target), 502)
    assert doc["error"] == error
    assert_healthy(gw)


def test_bad_chunk_after_the_response_started_is_cut(fault_origins, fault_gateway) -> None:
    a = fault_origins("A")
    gw = fault_gateway([a.url], retries=NO_RETRIES)
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        c.send(build_request("GET", "/badchunk?late=1", host="x"))
        status, _reason, headers, _raw = c.read_head()
        assert status == 200
        assert ("Transfer-Encoding", "chunked") in headers
        assert c.read_line() == b"5\r\n"
        assert c.read_exact(7) == b"hello\r\n"
        rest = bytearray(c.buf)
        with contextlib.suppress(ConnectionResetError):
            while data := c.sock.recv(1 << 16):
                rest += data
    # The bad size line is never relayed, and the chunked body never gets its last chunk.
    assert b"ZZ" not in rest
    assert not rest.endswith(b"0\r\n\r\n")
    assert_healthy(gw)


# ---- 7. never an unsafe retry ------------------------------------------------------------------

RETRY_ALL = {
    "attempts": 3,
    "retry_on": ["connect_failure", "reset", "timeout"],
    "statuses": [502, 503],
}


@pytest.mark.parametrize(
    ("target", "status", "error"),
    [
        pytest.param("/reset", 502, "upstream closed the connection", id="reset"),
        pytest.param("/status?code=503", 503, None, id="503"),
        pytest.param("/hang", 504, "upstream timeout", id="hang"),
    ],
)
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_request_with_a_body_is_never_sent_twice(
    fault_origins, fault_gateway, method: str, target: str, status: int, error: str | None
) -> None:
    servers = [fault_origins("A"), fault_origins("B")]
    gw = fault_gateway(
        [o.url for o in servers], retries=RETRY_ALL, timeouts={"upstream_response": 0.5}
    )
    # Both servers get a pooled connection first, so the request goes on a reused one and
    # the keep-alive race retry is tested as well as the retry policy.
    assert {request(gw, "GET", "/ok").body[:1] for _ in range(2)} == {b"A", b"B"}
    resp = request(gw, method, target, body=b'{"charge": 100}')
    if error is None:
        assert resp.status == status
        assert resp.body.startswith(b"status 503 from ")
    else:
        assert assert_error(resp, status)["error"] == error
    assert total(servers, f"{method} {target}") == 1
    assert_healthy(gw)


@pytest.mark.parametrize(
    ("target", "status"),
    [
        pytest.param("/reset", 502, id="reset"),
        pytest.param("/status?code=503", 503, id="503"),
        pytest.param("/hang", 504, id="hang"),
    ],
)
def test_get_in_the_same_situation_is_retried(
    fault_origins, fault_gateway, target: str, status: int
) -> None:
    servers = [fault_origins("A"), fault_origins("B")]
    gw = fault_gateway(
        [o.url for o in servers], retries=RETRY_ALL, timeouts={"upstream_response": 0.5}
    )
    resp = request(gw, "GET", target)
    assert resp.status == status
    # Retried on the other server: at least once, at most `attempts` times.
    counts = [o.requests().get(f"GET {target}", 0) for o in servers]
    assert 2 <= sum(counts) <= 1 + RETRY_ALL["attempts"], counts
    assert min(counts) >= 1, counts
    assert_healthy(gw)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_bodyless_post_on_a_reused_connection_is_not_resent(
    fault_origins, fault_gateway, method: str
) -> None:
    """The keep-alive race retry (a reused connection lost before the head) must not cover a
    non-idempotent method: the server may have acted on it (RFC 9112 §9.3.1.1)."""
    a = fault_origins("A")
    gw = fault_gateway([a.url], retries=NO_RETRIES)
    with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
        assert c.request("GET", "/ok", host="x").status == 200  # pools a connection
        resp = c.request(method, "/reset", host="x")  # no body: no framing at all
    assert_error(resp, 502)
    assert a.requests().get(f"{method} /reset", 0) == 1
    assert_healthy(gw)


# ---- 8. many clients while a server dies -------------------------------------------------------


def test_concurrent_clients_while_an_origin_is_killed(fault_origins, fault_gateway) -> None:
    a, b = fault_origins("A"), fault_origins("B")
    gw = fault_gateway(
        [a.url, b.url],
        retries={"attempts": 1, "retry_on": ["connect_failure"]},
        timeouts={"upstream_response": 3},
    )
    outcomes: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        target = f"/slowbody?size=20000&piece=2000&gap=0.05&i={i}"
        try:
            with Client(gw.addr, timeout=CLIENT_TIMEOUT) as c:
                c.send(build_request("GET", target, host="x"))
                try:
                    resp = c.read_response()
                    result: tuple[str, Any] = ("response", (resp.status, len(resp.body)))
                except (EOFError, ConnectionResetError) as exc:
                    result = ("cut", str(exc))
        except TimeoutError as exc:  # a hang: the failure this test looks for
            result = ("hang", repr(exc))
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # responses are half way through their bodies
    a.kill()
    for t in threads:
        t.join(CLIENT_TIMEOUT + 5)
    assert not any(t.is_alive() for t in threads), "a client thread never finished"
    assert len(outcomes) == 50
    hangs = [o for o in outcomes if o[0] == "hang"]
    assert not hangs, hangs
    for kind, value in outcomes:
        if kind == "response":
            status, length = value
            assert (status, length) == (200, 20000) or status in (502, 503, 504), value
    complete = sum(1 for o in outcomes if o == ("response", (200, 20000)))
    assert complete >= 1, outcomes  # B kept serving
    for i in range(2):  # and still does: A's turn is a refused connect, retried on B
        assert request(gw, "GET", f"/ok?after={i}").body == f"B /ok?after={i}".encode()
    assert_healthy(gw)
