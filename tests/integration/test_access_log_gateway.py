"""The access log and the audit stream through a real gateway (supervisor + 2 workers):
one JSON line per request with the right fields, the CLF format, a route that turns its log
off, sampling 0 with errors still logged, rotation by SIGUSR1 to the supervisor, audit lines
for a 401 and a 429 in their own file, the dropped-lines metric (0 normally, > 0 with a tiny
buffer under a flood, the gateway answering throughout).

Rules these tests obey: real processes on 127.0.0.1 only; counts are bounded; every wait is
a bounded poll of a file or of /metrics (the writers flush every flush_interval)."""

from __future__ import annotations

import http.client
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from conftest import Client, Gateway, Origin, base_config, build_request, get

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "fastgate" / "logs" / "access-log.schema.json"
FLUSH = 0.05  # flush_interval of these gateways
WAIT = 10.0  # seconds a line may take to reach its file
CLF = re.compile(
    r"^(?P<ip>\S+) - (?P<user>\S+) "
    r"\[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000)\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+|-)$'
)
SEKRET = "SEKRET-do-not-log-4711"


def validator() -> Callable[[dict[str, Any]], None]:
    """Validate against the documented schema when it and jsonschema are there, else check
    the documented keys (the schema is another helper's deliverable)."""
    try:
        from jsonschema import Draft202012Validator

        schema = json.loads(SCHEMA_FILE.read_text())
    except (ImportError, OSError):
        keys = {"time", "type", "request_id", "client_ip", "status", "path", "route"}

        def check_keys(doc: dict[str, Any]) -> None:
            assert keys <= set(doc), doc

        return check_keys
    return Draft202012Validator(schema).validate


def read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    assert not data or data.endswith(b"\n"), f"{path} ends inside a line"
    return data.decode().splitlines()


def wait_lines(path: Path, count: int, timeout: float = WAIT) -> list[str]:
    """Poll until `path` has at least `count` lines (bounded), then a little more to see
    that no extra line follows."""
    deadline = time.monotonic() + timeout
    lines = read_lines(path)
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = read_lines(path)
    time.sleep(FLUSH * 4)
    return read_lines(path)


def log_config(origin: Origin, directory: Path, **access: Any) -> dict[str, Any]:
    return base_config(
        origin.port,
        workers=2,
        access_log={
            "enabled": True,
            "path": str(directory / "access.log"),
            "flush_interval": FLUSH,
            **access,
        },
        audit_log={"path": str(directory / "audit.log"), "flush_interval": FLUSH},
    )


def scrape(gw: Gateway) -> str:
    conn = http.client.HTTPConnection(*gw.admin, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def dropped(gw: Gateway, stream: str) -> float:
    m = re.search(
        rf'^fastgate_access_log_dropped_total{{stream="{stream}"}} (\S+)$', scrape(gw), re.M
    )
    assert m, f"no fastgate_access_log_dropped_total for {stream}"
    return float(m.group(1))


# ---- JSON lines ------------------------------------------------------------------------------


def test_one_json_line_per_request(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    gw = start_gateway(log_config(origin, tmp_path))
    n = 24
    ids = {}
    for i in range(n):
        path = f"/echo-path/r{i}?token={SEKRET}&a={i}"
        resp = get(gw.addr, path, headers={"User-Agent": "logtest/1.0"})
        assert resp.status == 200
        ids[resp.header("X-Request-ID")] = i
    lines = wait_lines(tmp_path / "access.log", n)
    assert len(lines) == n
    check = validator()
    seen = set()
    for raw in lines:
        assert SEKRET not in raw
        doc = json.loads(raw)
        check(doc)
        i = ids[doc["request_id"]]
        seen.add(i)
        assert doc["type"] == "access"
        assert (doc["method"], doc["protocol"], doc["status"]) == ("GET", "HTTP/1.1", 200)
        assert doc["path"] == f"/echo-path/r{i}?token=REDACTED&a={i}"
        assert (doc["entrypoint"], doc["route"], doc["service"]) == ("web", "origin", "origin")
        assert doc["server"] == f"http://127.0.0.1:{origin.port}"
        assert doc["client_ip"] == "127.0.0.1"
        assert doc["user_agent"] == "logtest/1.0"
        assert doc["bytes_out"] > 0 and doc["duration_ms"] >= 0
        assert doc["identity"] is None and doc["auth"] is None and doc["tls"] is None
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", doc["time"])
    assert seen == set(range(n))
    assert dropped(gw, "access") == 0
    assert dropped(gw, "audit") == 0


def test_common_log_format(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    gw = start_gateway(log_config(origin, tmp_path, format="common"))
    for i in range(5):
        assert get(gw.addr, f"/echo-path/c{i}?password={SEKRET}").status == 200
    lines = wait_lines(tmp_path / "access.log", 5)
    assert len(lines) == 5
    requests = set()
    for raw in lines:
        m = CLF.match(raw)
        assert m, raw
        assert SEKRET not in raw
        assert (m["ip"], m["user"], m["status"]) == ("127.0.0.1", "-", "200")
        assert int(m["bytes"]) > 0
        requests.add(m["request"])
    assert requests == {f"GET /echo-path/c{i}?password=REDACTED HTTP/1.1" for i in range(5)}


# ---- what gets logged ------------------------------------------------------------------------


def test_route_with_its_log_off_writes_nothing(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    cfg = log_config(origin, tmp_path)
    cfg["routes"] = [
        {"name": "quiet", "match": {"path": "/echo-path/quiet"}, "service": "origin",
         "access_log": False},
        {"name": "loud", "match": {"path": "/"}, "service": "origin"},
    ]  # fmt: skip
    gw = start_gateway(cfg)
    for i in range(6):
        assert get(gw.addr, f"/echo-path/quiet/{i}").status == 200
        assert get(gw.addr, f"/echo-path/loud{i}").status == 200
    lines = wait_lines(tmp_path / "access.log", 6)
    routes = [json.loads(x)["route"] for x in lines]
    assert routes.count("loud") == 6
    assert "quiet" not in routes


def test_sample_zero_still_logs_errors(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    cfg = log_config(origin, tmp_path, sample=0.0)
    cfg["routes"] = [{"name": "origin", "match": {"hosts": ["origin.test"]}, "service": "origin"}]
    gw = start_gateway(cfg)
    for i in range(10):
        assert get(gw.addr, f"/echo-path/ok{i}").status == 200
    assert get(gw.addr, "/status/503").status == 503
    assert get(gw.addr, "/nowhere", host="unknown.test").status == 404
    lines = wait_lines(tmp_path / "access.log", 2)
    docs = [json.loads(x) for x in lines]
    assert sorted((d["status"], d["route"]) for d in docs) == [(404, None), (503, "origin")]


# ---- rotation --------------------------------------------------------------------------------


def test_sigusr1_to_the_supervisor_reopens_the_files(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    gw = start_gateway(log_config(origin, tmp_path))
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    for i in range(8):
        assert get(gw.addr, f"/echo-path/before{i}").status == 200
    assert len(wait_lines(path, 8)) == 8
    path.rename(rotated)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + WAIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), "no worker reopened the access log"
    # Both workers reopen; a request can land on either: the new file gets every later line.
    time.sleep(0.5)
    for i in range(8):
        assert get(gw.addr, f"/echo-path/after{i}").status == 200
    after = wait_lines(path, 8)
    before = read_lines(rotated)
    assert sorted(json.loads(x)["path"] for x in before) == sorted(
        f"/echo-path/before{i}" for i in range(8)
    )
    assert sorted(json.loads(x)["path"] for x in after) == sorted(
        f"/echo-path/after{i}" for i in range(8)
    )
    for pid in gw.pids:  # the workers survived the signal
        assert Path(f"/proc/{pid}").exists()


# ---- audit -----------------------------------------------------------------------------------


def test_audit_lines_for_a_401_and_a_429(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    cfg = log_config(origin, tmp_path)
    cfg["workers"] = 1  # the local rate limit counts per worker
    cfg["middlewares"] = {
        "jwt": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": "s" * 40},
        "once": {"type": "rate_limit", "rate": "1/hour", "burst": 1},
    }
    cfg["routes"] = [
        {"name": "api", "match": {"hosts": ["api.test"]}, "service": "origin",
         "middlewares": ["jwt"]},
        {"name": "limited", "match": {"hosts": ["limited.test"]}, "service": "origin",
         "middlewares": ["once"]},
    ]  # fmt: skip
    gw = start_gateway(cfg)
    assert get(gw.addr, "/x", host="api.test").status == 401
    assert get(gw.addr, "/echo-path/y", host="limited.test").status == 200
    assert get(gw.addr, "/echo-path/y", host="limited.test").status == 429
    audit = [json.loads(x) for x in wait_lines(tmp_path / "audit.log", 2)]
    assert [(a["event"], a["status"], a["source"], a["route"]) for a in audit] == [
        ("auth_failed", 401, "jwt", "api"),
        ("rate_limited", 429, "once", "limited"),
    ]
    for a in audit:
        assert a["type"] == "audit" and a["client_ip"] == "127.0.0.1"
    access = [json.loads(x) for x in wait_lines(tmp_path / "access.log", 3)]
    assert sorted(a["status"] for a in access) == [200, 401, 429]


# ---- drops -----------------------------------------------------------------------------------


def test_tiny_buffer_under_a_flood_drops_and_keeps_answering(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    """64 KiB buffers, long lines (2 KiB paths, 512-byte user agents and referers), and
    pipelined 404s answered in one go: lines are dropped and counted, and the gateway
    answers every request."""
    cfg = log_config(origin, tmp_path, buffer_bytes=65536, flush_interval=0.5)
    cfg["routes"] = [{"name": "origin", "match": {"hosts": ["origin.test"]}, "service": "origin"}]
    gw = start_gateway(cfg)
    long_path = "/" + "p" * 2100
    headers = {"User-Agent": "u" * 600, "Referer": "r" * 600}
    per_conn, conns = 60, 6
    request = build_request("GET", long_path, headers, host="unknown.test")
    answered = 0
    clients = [Client(gw.addr) for _ in range(conns)]
    try:
        for c in clients:
            c.send(request * per_conn)
        for c in clients:
            for _ in range(per_conn):
                assert c.read_response().status == 404
                answered += 1
    finally:
        for c in clients:
            c.close()
    assert answered == per_conn * conns
    assert get(gw.addr, "/echo-path/alive").status == 200
    # Every request is a line in the file or counted as dropped (counted once a second).
    total = answered + 1
    deadline = time.monotonic() + WAIT
    lost = dropped(gw, "access")
    while len(read_lines(tmp_path / "access.log")) + lost < total:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        lost = dropped(gw, "access")
    assert lost > 0
    assert len(read_lines(tmp_path / "access.log")) + lost == total


# ---- reload and drain ------------------------------------------------------------------------


def test_reload_to_a_new_path_loses_no_line(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    cfg = log_config(origin, tmp_path, flush_interval=5)  # only the reload hands lines over
    gw = start_gateway(cfg)
    for i in range(6):
        assert get(gw.addr, f"/echo-path/old{i}").status == 200
    cfg["access_log"] = {**cfg["access_log"], "path": str(tmp_path / "new.log")}
    (gw.directory / "fastgate.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    status = gw.readyz() or {}
    while time.monotonic() < deadline and not (
        status.get("generation") == 2 and status.get("workers_current") == 2
    ):
        time.sleep(0.05)
        status = gw.readyz() or {}
    assert status.get("workers_current") == 2, status
    # The old file got its lines when the old streams were closed, not 5 s later.
    assert sorted(json.loads(x)["path"] for x in read_lines(tmp_path / "access.log")) == sorted(
        f"/echo-path/old{i}" for i in range(6)
    )
    for i in range(4):
        assert get(gw.addr, f"/echo-path/new{i}").status == 200
    gw.stop()  # the drain writes what is buffered
    assert sorted(json.loads(x)["path"] for x in read_lines(tmp_path / "new.log")) == sorted(
        f"/echo-path/new{i}" for i in range(4)
    )


def test_drain_writes_every_buffered_line(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    gw = start_gateway(log_config(origin, tmp_path, flush_interval=30))
    for i in range(20):
        assert get(gw.addr, f"/echo-path/d{i}").status == 200
    assert read_lines(tmp_path / "access.log") == []  # still buffered (30 s interval)
    gw.stop()
    lines = read_lines(tmp_path / "access.log")
    assert sorted(json.loads(x)["path"] for x in lines) == sorted(
        f"/echo-path/d{i}" for i in range(20)
    )
