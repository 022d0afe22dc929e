"""Active health checks in a real gateway: a service of two real origins (`FlipOrigin`, in
this process) whose `/health` status a test flips. A server whose checks fail gets no
traffic within a bounded time and gets it again once its checks pass; with every server down,
`when_all_unhealthy: fail` answers 503 and `panic` serves anyway; a reload starts a fresh
checker (every server healthy again). The origins record each check request's head, so the
Host / User-Agent / Connection headers the checker sends are asserted too.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml
from conftest import Gateway, assert_error, base_config, get, wait_for

WAIT = 8.0  # seconds a transition may take (interval 0.2 s * fall 2, and much slack)
HOST = "pair.test"


class FlipOrigin:
    """An HTTP/1.1 origin on 127.0.0.1: `/health` answers `health_status`; any other path
    answers 200 with the origin's name as the body (so a test sees who served it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health_status = 200
        self.checks: list[dict[str, str]] = []  # the headers of every /health request
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def do_GET(self) -> None:
                if self.path == "/health":
                    with origin.lock:
                        origin.checks.append({k.lower(): v for k, v in self.headers.items()})
                    status, body = origin.health_status, b"health-body"
                else:
                    status, body = 200, origin.name.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def check_count(self) -> int:
        with self.lock:
            return len(self.checks)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pair() -> Iterator[tuple[FlipOrigin, FlipOrigin]]:
    a, b = FlipOrigin("A"), FlipOrigin("B")
    yield a, b
    a.stop()
    b.stop()


def pair_config(
    a: FlipOrigin, b: FlipOrigin, when_all_unhealthy: str = "fail", fall: int = 2
) -> dict[str, Any]:
    service = {
        "servers": [{"url": a.url}, {"url": b.url}],
        "health_check": {"path": "/health", "interval": 0.2, "timeout": 1, "fall": fall, "rise": 2},
        "when_all_unhealthy": when_all_unhealthy,
    }
    return base_config(
        a.port,
        services={"pair": service},
        routes=[{"name": "pair", "match": {"hosts": [HOST]}, "service": "pair"}],
    )


def served_by(gw: Gateway, n: int = 6) -> list[str]:
    """Who answered each of `n` requests (each on a new client connection)."""
    out = []
    for i in range(n):
        resp = get(gw.addr, f"/who/{i}", host=HOST)
        assert resp.status == 200, (resp.raw_head, resp.body)
        out.append(resp.body.decode())
    return out


def down_line(origin: FlipOrigin) -> str:
    return f"health: service pair server {origin.url} is DOWN"


def test_unhealthy_server_gets_no_traffic_until_it_passes_again(
    pair: tuple[FlipOrigin, FlipOrigin], start_gateway: Callable[[dict[str, Any]], Gateway]
) -> None:
    a, b = pair
    gw = start_gateway(pair_config(a, b))
    assert set(served_by(gw)) == {"A", "B"}  # both start healthy: traffic at once

    a.health_status = 503
    assert wait_for(lambda: set(served_by(gw)) == {"B"}, timeout=WAIT)
    assert set(served_by(gw, 10)) == {"B"}  # and it stays out
    log = gw.log.read_text()
    assert f"{down_line(a)} (2 checks failed in a row): status 503" in log
    assert down_line(b) not in log
    assert "health-body" not in log  # a check's body is never read, let alone logged

    a.health_status = 200
    assert wait_for(lambda: set(served_by(gw)) == {"A", "B"}, timeout=WAIT)

    # What the checker sent: the server's host:port, its own User-Agent, one request per
    # connection.
    for origin in (a, b):
        assert origin.check_count() >= 2
        with origin.lock:
            seen = list(origin.checks)
        for headers in seen:
            assert headers["host"] == f"127.0.0.1:{origin.port}"
            assert headers["user-agent"] == "fastgate-health"
            assert headers["connection"] == "close"


@pytest.mark.parametrize(
    ("mode", "status"),
    [
        pytest.param("fail", 503, id="fail-answers-503"),
        pytest.param("panic", 200, id="panic-serves-anyway"),
    ],
)
def test_all_unhealthy(
    pair: tuple[FlipOrigin, FlipOrigin],
    start_gateway: Callable[[dict[str, Any]], Gateway],
    mode: str,
    status: int,
) -> None:
    a, b = pair
    a.health_status = b.health_status = 503
    gw = start_gateway(pair_config(a, b, when_all_unhealthy=mode))
    assert wait_for(
        lambda: all(down_line(o) in gw.log.read_text() for o in (a, b)), timeout=WAIT
    ), gw.log.read_text()[-2000:]
    seen = set()
    for i in range(6):
        resp = get(gw.addr, f"/who/{i}", host=HOST)
        if status == 503:
            assert_error(resp, 503)
        else:
            assert resp.status == 200, (resp.raw_head, resp.body)
            seen.add(resp.body.decode())
    if mode == "panic":
        assert seen == {"A", "B"}  # panic uses every server, not just one


def test_reload_starts_a_fresh_checker(
    pair: tuple[FlipOrigin, FlipOrigin], start_gateway: Callable[[dict[str, Any]], Gateway]
) -> None:
    a, b = pair
    a.health_status = 503
    cfg = pair_config(a, b)
    gw = start_gateway(cfg)
    assert wait_for(lambda: set(served_by(gw)) == {"B"}, timeout=WAIT)

    # Generation 2 needs 50 failures (10 s) to take A out: until then A is healthy again.
    cfg["services"]["pair"]["health_check"]["fall"] = 50  # same addresses, new generation
    (gw.directory / "fastgate.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    status = gw.readyz() or {}
    while time.monotonic() < deadline and not (
        status.get("generation") == 2 and status.get("workers_current") == 1
    ):
        time.sleep(0.05)
        status = gw.readyz() or {}
    assert status.get("workers_current") == 1, status
    assert set(served_by(gw)) == {"A", "B"}
