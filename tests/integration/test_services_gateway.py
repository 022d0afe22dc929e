"""Services through a real gateway: balancers, retries, outlier detection, the circuit
breaker, service and entrypoint limits, route timeouts.

Each test runs its own gateway (`workers: 1`, so the per-worker balancer and breaker state is
deterministic) in front of 1-3 `services_origin.py` processes, each answering as told on its
command line and naming itself in `X-Server`; a test tells which server answered from that
header and from each origin's own request counters (`/_stats`, asked directly). A closed port
stands for a dead server. Everything listens on 127.0.0.1; every test is bounded (< 10 s).

Rules the tests hold the gateway to: a connect failure may be retried for any request (nothing
was sent), but a request that reached a server is retried only for an idempotent method without
a body (a POST is never sent twice); an open circuit, a full service or an ejected-only service
answer 503 without touching a server.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
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
    Response,
    assert_error,
    assert_no_traceback,
    base_config,
    chunk_encode,
    free_port,
    spawn_origin,
    wait_for,
)

HOST = "svc.test"


class SvcOrigin:
    """`services_origin.py` as a subprocess: one upstream server with a fixed behaviour."""

    def __init__(self, log: Path, name: str, *args: str) -> None:
        self.name = name
        self.log = log
        self.proc, self.port = spawn_origin("services_origin.py", log, "--name", name, *args)
        self.url = f"http://127.0.0.1:{self.port}"

    def _get(self, target: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", target, headers={"Connection": "close"})
            resp = conn.getresponse()
            assert resp.status == 200
            return json.loads(resp.read())
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        return self._get("/_stats")

    def requests(self) -> int:
        return self.stats()["requests"]

    def set(self, **kw: Any) -> None:
        self._get("/_set?" + "&".join(f"{k}={v}" for k, v in kw.items()))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert_no_traceback(self.log)


@pytest.fixture
def make_origin(tmp_path: Path) -> Iterator[Callable[..., SvcOrigin]]:
    started: list[SvcOrigin] = []

    def make(name: str, *args: str) -> SvcOrigin:
        o = SvcOrigin(tmp_path / f"origin-{name}.log", name, *args)
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


def service_config(
    servers: list[Any],
    service: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """One service `svc` over `servers` (SvcOrigin, a URL, or (server, weight)); by default
    one route for every request."""
    members = []
    for s in servers:
        weight = 1
        if isinstance(s, tuple):
            s, weight = s
        members.append({"url": s if isinstance(s, str) else s.url, "weight": weight})
    svc = {"servers": members, **(service or {})}
    if routes is None:
        routes = [{"name": "svc", "match": {"path": "/"}, "service": "svc"}]
    return base_config(0, services={"svc": svc}, routes=routes, **overrides)


def dead_url() -> str:
    """A server nobody listens on: its connects are refused."""
    return f"http://127.0.0.1:{free_port()}"


def request(
    addr: tuple[str, int],
    method: str = "GET",
    path: str = "/x",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    source: str | None = None,
) -> Response:
    """One request on a fresh connection (from `source` address when given)."""
    c = Client.__new__(Client)
    c.sock = socket.create_connection(
        addr, timeout=10, source_address=(source, 0) if source else None
    )
    c.buf = bytearray()
    with c:
        return c.request(method, path, headers=headers, body=body, host=HOST)


def server_of(resp: Response) -> str | None:
    return resp.header("x-server")


def scrape(gw: Gateway) -> str:
    conn = http.client.HTTPConnection(*gw.admin, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def metric(gw: Gateway, name: str, service: str = "svc") -> float:
    """The value of counter `name` for `service` (0 when absent)."""
    for line in scrape(gw).splitlines():
        if line.startswith(name + "{") and f'service="{service}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


Start = Callable[[dict[str, Any]], Gateway]


# ---- balancers -------------------------------------------------------------------------------


def test_round_robin_weights_are_exact_and_smooth(make_origin: Callable, start_gateway: Start):
    a, b = make_origin("a"), make_origin("b")
    gw = start_gateway(service_config([(a, 3), (b, 1)]))
    seq = ""
    with Client(gw.addr) as c:
        for _ in range(40):
            resp = c.request("GET", "/x", host=HOST)
            assert resp.status == 200
            seq += server_of(resp)
    assert seq.count("a") == 30 and seq.count("b") == 10
    assert (a.requests(), b.requests()) == (30, 10)
    # Smooth: one b in every 4 in a row, never a run of 4 a's (not a a a b a a a b... bunched
    # as a a a a ... b b).
    assert "bb" not in seq and "aaaa" not in seq, seq
    assert all(seq[i : i + 4].count("b") == 1 for i in range(0, 37)), seq


def test_random_spreads_by_weight(make_origin: Callable, start_gateway: Start):
    a, b = make_origin("a"), make_origin("b")
    gw = start_gateway(service_config([(a, 3), (b, 1)], {"balancer": "random"}))
    with Client(gw.addr) as c:
        for _ in range(200):
            assert c.request("GET", "/x", host=HOST).status == 200
    na, nb = a.requests(), b.requests()
    assert na + nb == 200
    assert 110 <= na <= 190 and nb >= 10, (na, nb)


def test_least_request_prefers_the_idle_server(make_origin: Callable, start_gateway: Start):
    slow, fast = make_origin("slow", "--delay", "1.5"), make_origin("fast")
    gw = start_gateway(service_config([slow, fast], {"balancer": "least_request"}))
    results: list[Response] = []

    def one() -> None:
        results.append(request(gw.addr))

    threads = []
    for _ in range(10):
        t = threading.Thread(target=one)
        t.start()
        threads.append(t)
        time.sleep(0.05)  # the fast server has answered before the next request comes
    for t in threads:
        t.join(10)
    assert len(results) == 10 and all(r.status == 200 for r in results)
    # While the slow server holds one request, every new one goes to the idle server: the
    # slow one gets at most the very first (a tie), round robin would have given it 5.
    assert slow.requests() <= 1
    assert fast.requests() >= 9


def _hash_key(kind: str, user: int) -> dict[str, Any]:
    if kind == "header":
        return {"headers": {"X-User": f"user-{user}"}}
    if kind == "cookie":
        return {"headers": {"Cookie": f"theme=dark; sid=user-{user}"}}
    return {"source": f"127.0.0.{user + 2}"}


@pytest.mark.parametrize(
    ("balancer", "kind"),
    [
        pytest.param(
            {"type": "hash", "hash_on": "header", "name": "X-User"}, "header", id="header"
        ),
        pytest.param({"type": "hash", "hash_on": "cookie", "name": "sid"}, "cookie", id="cookie"),
        pytest.param({"type": "hash", "hash_on": "client_ip"}, "client_ip", id="client_ip"),
    ],
)
def test_hash_keeps_a_key_on_one_server(
    make_origin: Callable, start_gateway: Start, balancer: dict[str, Any], kind: str
):
    origins = [make_origin(n) for n in ("a", "b", "c")]
    gw = start_gateway(service_config(origins, {"balancer": balancer}))
    users = 20 if kind != "client_ip" else 10
    placed: dict[int, set[str]] = {}
    for user in range(users):
        for _ in range(5):
            resp = request(gw.addr, **_hash_key(kind, user))
            assert resp.status == 200
            placed.setdefault(user, set()).add(server_of(resp))
    assert all(len(s) == 1 for s in placed.values()), placed
    # The keys spread: more than one server is used.
    assert len(set().union(*placed.values())) >= 2, placed
    assert sum(o.requests() for o in origins) == users * 5


# ---- sticky cookie ---------------------------------------------------------------------------


def _cookie(resp: Response) -> str:
    cookies = [v for v in resp.all("set-cookie") if v.startswith("fg_server=")]
    assert len(cookies) == 1, resp.all("set-cookie")
    return cookies[0]


def test_sticky_cookie_sets_then_sticks(make_origin: Callable, start_gateway: Start):
    a, b = make_origin("a"), make_origin("b")
    gw = start_gateway(service_config([a, b], {"balancer": "sticky_cookie"}))
    first = request(gw.addr)
    assert first.status == 200
    cookie = _cookie(first)
    value = cookie.split(";")[0].split("=", 1)[1]
    assert len(value) == 16 and int(value, 16) >= 0
    assert cookie == f"fg_server={value}; Path=/; HttpOnly; SameSite=Lax"
    home = server_of(first)
    for _ in range(10):
        resp = request(gw.addr, headers={"Cookie": f"other=1; fg_server={value}"})
        assert resp.status == 200 and server_of(resp) == home
        assert resp.all("set-cookie") == []  # a valid cookie is not set again
    # Without the cookie, round robin: the other server is used too.
    others = {server_of(request(gw.addr)) for _ in range(4)}
    assert others == {"a", "b"}


def test_sticky_cookie_is_secure_over_tls(
    make_origin: Callable, start_gateway: Start, tmp_path: Path
) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("gw.test")
    cert, key = tmp_path / "gw.pem", tmp_path / "gw.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    a, b = make_origin("a"), make_origin("b")
    cfg = service_config([a, b], {"balancer": "sticky_cookie"})
    cfg["entrypoints"]["web"]["tls"] = {
        "certificates": [{"cert_file": str(cert), "key_file": str(key)}]
    }
    gw = start_gateway(cfg)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(gw.addr, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="gw.test") as tls:
            tls.sendall(b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200")
    cookies = [line for line in head.split("\r\n") if line.lower().startswith("set-cookie:")]
    assert len(cookies) == 1
    assert cookies[0].endswith("; Path=/; HttpOnly; SameSite=Lax; Secure"), cookies


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("0123456789abcdef", id="unknown-16-hex"),
        pytest.param("zz", id="short"),
        pytest.param("", id="empty"),
    ],
)
def test_sticky_cookie_unknown_value_gets_a_new_one(
    make_origin: Callable, start_gateway: Start, value: str
):
    a, b = make_origin("a"), make_origin("b")
    gw = start_gateway(
        service_config([a, b], {"balancer": {"type": "sticky_cookie", "cookie_max_age": 3600}})
    )
    resp = request(gw.addr, headers={"Cookie": f"fg_server={value}"})
    assert resp.status == 200
    cookie = _cookie(resp)
    new = cookie.split(";")[0].split("=", 1)[1]
    assert new != value and len(new) == 16
    assert cookie.endswith("; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600")
    again = request(gw.addr, headers={"Cookie": f"fg_server={new}"})
    assert server_of(again) == server_of(resp)


def test_sticky_cookie_naming_an_ejected_server_moves(make_origin: Callable, start_gateway: Start):
    bad, good = make_origin("bad", "--status", "503"), make_origin("good")
    service = {
        "balancer": "sticky_cookie",
        "outlier_detection": {"consecutive_errors": 1, "base_ejection": 5},
    }
    gw = start_gateway(service_config([bad, good], service))
    first = request(gw.addr)  # round robin: the first server, which fails and is ejected
    assert server_of(first) == "bad" and first.status == 503
    stale = _cookie(first).split(";")[0].split("=", 1)[1]
    resp = request(gw.addr, headers={"Cookie": f"fg_server={stale}"})
    assert resp.status == 200 and server_of(resp) == "good"
    assert _cookie(resp).split(";")[0].split("=", 1)[1] != stale
    assert bad.requests() == 1


def test_sticky_cookie_after_a_retry_is_set_once(make_origin: Callable, start_gateway: Start):
    good = make_origin("good")
    service = {"balancer": "sticky_cookie", "retries": {"attempts": 1}}
    gw = start_gateway(service_config([dead_url(), good], service))
    resp = request(gw.addr)  # round robin: the dead server first, retried to the live one
    assert resp.status == 200 and server_of(resp) == "good"
    value = _cookie(resp).split(";")[0].split("=", 1)[1]
    assert server_of(request(gw.addr, headers={"Cookie": f"fg_server={value}"})) == "good"


# ---- retries ---------------------------------------------------------------------------------


BODY = bytes(range(256)) * 800  # 200 KiB, not all of it in the first read


@pytest.mark.parametrize(
    ("method", "body"),
    [pytest.param("GET", b"", id="GET"), pytest.param("POST", BODY, id="POST-body")],
)
def test_connect_failure_is_retried_on_the_other_server(
    make_origin: Callable, start_gateway: Start, method: str, body: bytes
):
    live = make_origin("live")
    gw = start_gateway(service_config([dead_url(), live], {"retries": {"attempts": 1}}))
    for _ in range(4):  # round robin puts every other first attempt on the dead server
        resp = request(gw.addr, method, "/upload", body=body)
        assert resp.status == 200 and server_of(resp) == "live"
        doc = resp.json()
        assert doc["body_length"] == len(body)
        assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    stats = live.stats()
    assert stats["methods"] == {method: 4}


def test_no_retry_with_zero_attempts(make_origin: Callable, start_gateway: Start):
    live = make_origin("live")
    gw = start_gateway(service_config([dead_url(), live], {"retries": {"attempts": 0}}))
    statuses = sorted(request(gw.addr).status for _ in range(2))
    assert statuses == [200, 502]


@pytest.mark.parametrize(
    ("on", "expected"),
    [
        pytest.param(["connect_failure", "reset"], 200, id="on-reset"),
        pytest.param(["connect_failure"], 502, id="not-on-reset"),
    ],
)
def test_reset_is_retried_for_get_only_when_asked(
    make_origin: Callable, start_gateway: Start, on: list[str], expected: int
):
    rst, ok = make_origin("rst", "--mode", "reset"), make_origin("ok")
    gw = start_gateway(service_config([rst, ok], {"retries": {"attempts": 1, "retry_on": on}}))
    resp = request(gw.addr)  # round robin: the resetting server first
    if expected == 200:
        assert resp.status == 200 and server_of(resp) == "ok"
    else:
        assert_error(resp, 502)
    assert rst.requests() == 1
    assert ok.requests() == (1 if expected == 200 else 0)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(b"payload", {}, id="with-body"),
        pytest.param(b"", {}, id="no-body"),
    ],
)
def test_post_to_a_reset_is_never_retried(
    make_origin: Callable, start_gateway: Start, body: bytes, headers: dict[str, str]
):
    a, b = make_origin("a"), make_origin("b")
    service = {"retries": {"attempts": 3, "retry_on": ["connect_failure", "reset"]}}
    gw = start_gateway(service_config([a, b], service))
    resp = request(gw.addr, "POST", "/reset-head", headers=headers, body=body)
    assert_error(resp, 502)
    posts = sum(o.stats()["methods"].get("POST", 0) for o in (a, b))
    assert posts == 1


def test_post_without_body_on_a_reused_connection_is_not_resent(
    make_origin: Callable, start_gateway: Start
):
    only = make_origin("only")
    gw = start_gateway(service_config([only], {"retries": {"attempts": 0}}))
    with Client(gw.addr) as c:
        assert c.request("GET", "/warm", host=HOST).status == 200  # pools the connection
        # POST without Content-Length: no body; the server resets it on the pooled connection.
        resp = c.request("POST", "/reset-head", host=HOST)
    assert_error(resp, 502)
    assert only.stats()["methods"].get("POST", 0) == 1


def test_status_retried_for_get_not_for_post(make_origin: Callable, start_gateway: Start):
    bad, good = make_origin("bad", "--status", "503"), make_origin("good")
    service = {"retries": {"attempts": 1, "statuses": [503]}}
    gw = start_gateway(service_config([bad, good], service))
    with Client(gw.addr) as c:
        for _ in range(4):
            resp = c.request("GET", "/x", host=HOST)
            assert resp.status == 200 and server_of(resp) == "good"
    assert bad.stats()["methods"] == {"GET": 2}  # every other first attempt, each retried
    assert good.stats()["methods"] == {"GET": 4}
    posts = [request(gw.addr, "POST", "/x", body=b"once") for _ in range(2)]
    assert sorted(server_of(r) for r in posts) == ["bad", "good"]
    assert sorted(r.status for r in posts) == [200, 503]  # the 503 reaches the client as is
    assert bad.stats()["methods"]["POST"] == 1 and good.stats()["methods"]["POST"] == 1


@pytest.mark.parametrize(
    ("on", "expected"),
    [
        pytest.param(["connect_failure", "timeout"], 200, id="on-timeout"),
        pytest.param(["connect_failure"], 504, id="not-on-timeout"),
    ],
)
def test_timeout_is_retried_when_asked(
    make_origin: Callable, start_gateway: Start, on: list[str], expected: int
):
    slow, fast = make_origin("slow", "--delay", "3"), make_origin("fast")
    service = {"retries": {"attempts": 1, "retry_on": on}, "timeouts": {"upstream_response": 0.3}}
    gw = start_gateway(service_config([slow, fast], service))
    resp = request(gw.addr)  # round robin: the slow server first
    if expected == 200:
        assert resp.status == 200 and server_of(resp) == "fast"
    else:
        assert_error(resp, 504)
    assert slow.requests() == 1


def test_retry_budget_of_zero_allows_no_retry(make_origin: Callable, start_gateway: Start):
    live = make_origin("live")
    retries = {"attempts": 3, "budget_percent": 0, "min_per_second": 0}
    gw = start_gateway(service_config([dead_url(), live], {"retries": retries}))
    resp = request(gw.addr)  # round robin: the dead server first, and no retry allowed
    assert_error(resp, 502)
    assert live.requests() == 0
    assert wait_for(
        lambda: metric(gw, "fastgate_service_retry_budget_exhausted_total") >= 1, timeout=5
    ), scrape(gw)
    assert metric(gw, "fastgate_service_retries_total") == 0


# ---- outlier detection and when_all_unhealthy ------------------------------------------------


def test_outlier_ejected_then_back(make_origin: Callable, start_gateway: Start):
    bad, good = make_origin("bad", "--status", "503"), make_origin("good")
    od = {"consecutive_errors": 3, "base_ejection": 1.5, "max_ejected_percent": 50}
    gw = start_gateway(service_config([bad, good], {"outlier_detection": od}))
    with Client(gw.addr) as c:
        seen = [server_of(c.request("GET", "/x", host=HOST)) for _ in range(6)]
        assert seen.count("bad") == 3  # round robin until its third error
        assert bad.requests() == 3
        ejected_at = time.monotonic()
        for _ in range(10):
            resp = c.request("GET", "/x", host=HOST)
            assert resp.status == 200 and server_of(resp) == "good"
        assert bad.requests() == 3
        assert time.monotonic() - ejected_at < 1.2  # all of that was inside the ejection
    # After base_ejection it is back in rotation.
    assert wait_for(lambda: request(gw.addr).status == 503, timeout=4, interval=0.1)
    assert bad.requests() == 4


def test_max_ejected_percent_keeps_one_of_two(make_origin: Callable, start_gateway: Start):
    a, b = make_origin("a", "--status", "503"), make_origin("b", "--status", "503")
    od = {"consecutive_errors": 2, "base_ejection": 5, "max_ejected_percent": 50}
    gw = start_gateway(service_config([a, b], {"outlier_detection": od}))
    with Client(gw.addr) as c:
        for _ in range(4):  # a, b, a (ejected), b
            assert c.request("GET", "/x", host=HOST).status == 503
        later = [c.request("GET", "/x", host=HOST) for _ in range(6)]
    # b failed twice too, but ejecting it would leave none: it keeps serving (its own 503).
    assert {server_of(r) for r in later} == {"b"}
    assert (a.requests(), b.requests()) == (2, 8)


@pytest.mark.parametrize(
    "mode", [pytest.param("fail", id="fail"), pytest.param("panic", id="panic")]
)
def test_when_all_unhealthy(make_origin: Callable, start_gateway: Start, mode: str):
    only = make_origin("only", "--status", "503")
    service = {
        "outlier_detection": {
            "consecutive_errors": 1,
            "base_ejection": 5,
            "max_ejected_percent": 100,
        },
        "when_all_unhealthy": mode,
    }
    gw = start_gateway(service_config([only], service))
    assert server_of(request(gw.addr)) == "only"  # its error ejects it
    resp = request(gw.addr)
    if mode == "fail":
        assert assert_error(resp, 503)["error"] == "no healthy server"
        assert only.requests() == 1
    else:
        assert resp.status == 503 and server_of(resp) == "only"
        assert only.requests() == 2


# ---- circuit breaker -------------------------------------------------------------------------


def test_circuit_opens_then_probes_and_closes(make_origin: Callable, start_gateway: Start):
    only = make_origin("only", "--status", "503")
    cb = {
        "error_ratio": 0.5,
        "min_requests": 4,
        "window": 5,
        "open_for": 1,
        "half_open_requests": 2,
    }
    gw = start_gateway(service_config([only], {"circuit_breaker": cb}))
    with Client(gw.addr) as c:
        for _ in range(4):
            resp = c.request("GET", "/x", host=HOST)
            assert resp.status == 503 and server_of(resp) == "only"
    assert only.requests() == 4
    opened = time.monotonic()
    for _ in range(5):
        doc = assert_error(request(gw.addr), 503)
        assert doc["error"] == "circuit open"
    assert only.requests() == 4  # refused without reaching the server
    assert time.monotonic() - opened < 0.9
    only.set(status=200)
    # After open_for, probes go through; two successes close the circuit.
    assert wait_for(lambda: request(gw.addr).status == 200, timeout=4, interval=0.1)
    for _ in range(5):
        resp = request(gw.addr)
        assert resp.status == 200 and server_of(resp) == "only"
    assert wait_for(lambda: metric(gw, "fastgate_service_circuit_opened_total") == 1)
    assert metric(gw, "fastgate_service_circuit_rejected_total") >= 5


def test_circuit_opens_on_slow_answers(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    cb = {
        "error_ratio": None,
        "slow_ratio": 0.5,
        "slow_threshold": 0.1,
        "min_requests": 2,
        "window": 5,
        "open_for": 5,
    }
    gw = start_gateway(service_config([only], {"circuit_breaker": cb}))
    for _ in range(2):
        assert request(gw.addr, path="/sleep/0.3").status == 200
    assert assert_error(request(gw.addr), 503)["error"] == "circuit open"
    assert only.requests() == 2


# ---- limits ----------------------------------------------------------------------------------


def _send(addr: tuple[str, int], path: str, out: dict[str, Any], key: str) -> threading.Thread:
    def run() -> None:
        out[key] = request(addr, path=path)
        out[key + "_at"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_service_queue_then_capacity(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    limits = {"max_concurrent": 1, "max_queue": 1, "queue_timeout": 3}
    gw = start_gateway(service_config([only], {"limits": limits}))
    out: dict[str, Any] = {}
    t1 = _send(gw.addr, "/sleep/0.8", out, "first")
    assert wait_for(lambda: only.stats()["inflight"] == 1, timeout=3)
    t2 = _send(gw.addr, "/second", out, "second")
    time.sleep(0.15)  # the second is queued in the gateway (it cannot reach the server)
    assert only.requests() == 1
    third = request(gw.addr)
    assert assert_error(third, 503)["error"] == "service at capacity"
    t1.join(5)
    t2.join(5)
    assert out["first"].status == 200 and out["second"].status == 200
    assert out["second_at"] >= out["first_at"]  # served only once the first was done
    assert only.stats()["max_inflight"] == 1
    assert only.requests() == 2


def test_service_queue_timeout(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    limits = {"max_concurrent": 1, "max_queue": 1, "queue_timeout": 0.3}
    gw = start_gateway(service_config([only], {"limits": limits}))
    out: dict[str, Any] = {}
    t1 = _send(gw.addr, "/sleep/1.5", out, "first")
    assert wait_for(lambda: only.stats()["inflight"] == 1, timeout=3)
    started = time.monotonic()
    second = request(gw.addr)
    assert assert_error(second, 503)["error"] == "service queue timeout"
    assert time.monotonic() - started < 1.2  # before the first request's answer
    t1.join(5)
    assert out["first"].status == 200
    assert only.requests() == 1


@pytest.mark.parametrize(
    "framing", [pytest.param("length", id="content-length"), pytest.param("chunked", id="chunked")]
)
def test_route_max_body_bytes(make_origin: Callable, start_gateway: Start, framing: str):
    only = make_origin("only")
    routes = [
        {"name": "small", "match": {"path": "/small"}, "service": "svc", "max_body_bytes": 10},
        {"name": "any", "match": {"path": "/"}, "service": "svc"},
    ]
    gw = start_gateway(service_config([only], routes=routes))
    data = b"x" * 11
    if framing == "chunked":
        kw = {"headers": {"Transfer-Encoding": "chunked"}, "body": chunk_encode(data, (11,))}
    else:
        kw = {"body": data}
    resp = request(gw.addr, "POST", "/small", **kw)
    assert_error(resp, 413)
    resp = request(gw.addr, "POST", "/other", **kw)
    assert resp.status == 200 and resp.json()["body_length"] == 11
    ok = request(gw.addr, "POST", "/small", body=b"y" * 10)
    assert ok.status == 200 and ok.json()["body_length"] == 10


def test_entrypoint_max_connections(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    cfg = service_config([only])
    cfg["entrypoints"]["web"]["max_connections"] = 2
    gw = start_gateway(cfg)
    c1, c2 = Client(gw.addr), Client(gw.addr)
    try:
        for c in (c1, c2):
            assert c.request("GET", "/x", host=HOST).status == 200
        with Client(gw.addr) as c3:
            doc = assert_error(c3.read_response(), 503)
            assert doc["error"] == "too many connections"
            assert c3.is_closed(3)
        c1.close()

        def served() -> bool:
            with Client(gw.addr) as c:
                return c.request("GET", "/x", host=HOST).status == 200

        assert wait_for(served, timeout=3)
        assert c2.request("GET", "/x", host=HOST).status == 200
    finally:
        c1.close()
        c2.close()


def test_entrypoint_max_headers(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    cfg = service_config([only])
    cfg["entrypoints"]["web"]["limits"] = {"max_headers": 5}
    gw = start_gateway(cfg)
    four = {f"X-H{i}": "v" for i in range(4)}  # with Host: 5 fields
    assert request(gw.addr, headers=four).status == 200
    five = {f"X-H{i}": "v" for i in range(5)}
    assert_error(request(gw.addr, headers=five), 431)
    assert only.requests() == 1


# ---- timeouts --------------------------------------------------------------------------------


def test_route_response_timeout_overrides_the_service(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    routes = [
        {
            "name": "quick",
            "match": {"path": "/quick"},
            "service": "svc",
            "timeouts": {"upstream_response": 0.3},
        },
        {"name": "patient", "match": {"path": "/"}, "service": "svc"},
    ]
    gw = start_gateway(service_config([only], routes=routes))
    assert_error(request(gw.addr, path="/quick/sleep/1"), 504)
    # Same service, no override: the service's (default) timeout lets a 0.5 s answer through.
    resp = request(gw.addr, path="/sleep/0.5")
    assert resp.status == 200 and server_of(resp) == "only"


def test_upstream_total_before_the_head(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    routes = [
        {
            "name": "total",
            "match": {"path": "/"},
            "service": "svc",
            "timeouts": {"upstream_total": 0.5},
        }
    ]
    gw = start_gateway(service_config([only], routes=routes))
    started = time.monotonic()
    assert_error(request(gw.addr, path="/sleep/1.5"), 504)
    assert time.monotonic() - started < 1.4


def test_upstream_total_cuts_a_slow_body(make_origin: Callable, start_gateway: Start):
    only = make_origin("only")
    routes = [
        {
            "name": "total",
            "match": {"path": "/"},
            "service": "svc",
            "timeouts": {"upstream_total": 0.5, "upstream_idle": 5},
        }
    ]
    gw = start_gateway(service_config([only], routes=routes))
    started = time.monotonic()
    with Client(gw.addr) as c:
        c.send(b"GET /slowbody/30/0.1 HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        status, _reason, headers, _raw = c.read_head()
        assert status == 200
        assert dict((k.lower(), v) for k, v in headers)["content-length"] == "30"
        got = b""
        with pytest.raises((EOFError, ConnectionResetError)):
            got = c.read_exact(30)
        got = bytes(c.buf)
    assert len(got) < 30  # cut: 30 bytes would take 3 s
    assert time.monotonic() - started < 2.0
