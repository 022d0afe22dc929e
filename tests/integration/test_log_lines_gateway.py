"""Access-log and audit lines written by a real gateway, checked against the documented schema.

One gateway (2 workers; the access log as JSON to a file, the audit stream to another file)
gets a known mix of requests: 200s (keep-alive, HTTP/1.0, a POST with a body, over TLS), 401
without and with a bad token, 403 for a missing scope, 429 from a local rate limit, 404 for
no route, 400 for a malformed head, and a request cut short by the client. Then:

- every line of both files validates against fastgate/logs/access-log.schema.json, with the
  keys in the documented order;
- there is exactly one access line per request sent, found by its request id (the
  X-Request-ID the client got), with the trace and span ids of the traceresponse header, the
  status, route, identity, auth and rate-limit outcome, and the exact bytes the client read;
- the audit file holds exactly the refusals, each with its event, source and reason;
- the common and combined formats write lines of the documented shape.

Rules these tests obey: real processes on 127.0.0.1 only; every wait is a bounded poll of the
log file (the writer flushes every flush_interval), never a fixed sleep standing in for one.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from conftest import Addr, Client, Gateway, Origin, Response, base_config, free_port
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "fastgate" / "logs" / "access-log.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
ACCESS_KEYS = tuple(SCHEMA["$defs"]["access"]["required"])
AUDIT_KEYS = tuple(SCHEMA["$defs"]["audit"]["required"])

SECRET = "log-lines-secret-" + "z" * 47
UA = "logtest/1.0"
TRACERESPONSE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
CA = trustme.CA()
FLUSH_WAIT = 10.0  # seconds a line may take to reach its file (flush_interval is 0.2 s)


def token(scope: str, key: str = SECRET) -> str:
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 300, "scope": scope}
    return jwt.encode(claims, key, "HS256")


def config(
    origin_port: int, directory: Path, fmt: str = "json", workers: int = 2
) -> dict[str, Any]:
    """Routes by Host: plain.test (no middleware), api.test (jwt_auth HS256 + authorize
    scope `read`), limited.test (a local limit of 2 per minute); entrypoints `web` and
    `websecure` (TLS)."""
    leaf = CA.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "server.pem", directory / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    middlewares = {
        "jwt": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": SECRET},
        "need_read": {"type": "authorize", "require": {"scopes": ["read"]}},
        "rl": {"type": "rate_limit", "rate": "2/minute", "burst": 2},
    }
    routes = [
        {"name": "plain", "match": {"hosts": ["plain.test"]}, "service": "origin"},
        {"name": "api", "match": {"hosts": ["api.test"]}, "service": "origin",
         "middlewares": ["jwt", "need_read"]},
        {"name": "limited", "match": {"hosts": ["limited.test"]}, "service": "origin",
         "middlewares": ["rl"]},
    ]  # fmt: skip
    entrypoints = {
        "web": {"address": f"127.0.0.1:{free_port()}"},
        "websecure": {
            "address": f"127.0.0.1:{free_port()}",
            "tls": {"certificates": [{"cert_file": str(cert), "key_file": str(key)}]},
        },
    }
    return base_config(
        origin_port,
        workers=workers,
        entrypoints=entrypoints,
        middlewares=middlewares,
        routes=routes,
        access_log={"enabled": True, "path": str(directory / "access.log"), "format": fmt},
        audit_log={"enabled": True, "path": str(directory / "audit.log")},
    )


class TlsClient(Client):
    """conftest's Client over TLS, trusting the test CA."""

    def __init__(self, addr: Addr, timeout: float = 10.0) -> None:
        ctx = ssl.create_default_context()
        CA.configure_trust(ctx)
        raw = socket.create_connection(addr, timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        self.buf = bytearray()


def read_lines(path: Path) -> list[str]:
    """The whole lines of a log file so far ([] before it exists)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    assert not data or data.endswith(b"\n"), f"{path} ends inside a line: {data[-200:]!r}"
    return data.decode().splitlines()


def wait_lines(path: Path, count: int) -> list[str]:
    """Poll until `path` has at least `count` lines (bounded); the lines."""
    deadline = time.monotonic() + FLUSH_WAIT
    lines = read_lines(path)
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = read_lines(path)
    return lines


# ---- the mix of requests -------------------------------------------------------------------


@dataclass
class Sent:
    """One request of the mix: its reply (None: cut short, no reply) and what its access line
    must say (`expect`) and, for a refusal, its audit line (`audit`)."""

    case: str
    resp: Response | None
    expect: dict[str, Any]
    audit: dict[str, Any] | None = None


@dataclass
class Run:
    gw: Gateway
    origin_url: str
    sent: dict[str, Sent] = field(default_factory=dict)
    access: list[str] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)


PROXIED = {"route": "plain", "service": "origin", "rate_limit": None, "auth": None}
NOT_FORWARDED = {"server": None, "upstream_ms": None}
CASES = (
    "ok-1", "ok-2", "ok-3", "http10", "post", "jwt-ok", "jwt-none", "jwt-bad", "jwt-scope",
    "rl-1", "rl-2", "rl-3", "notfound", "malformed", "tls", "cut",
)  # fmt: skip


def drive(gw: Gateway, origin_url: str) -> dict[str, Sent]:
    """Send the mix; every request is in CASES."""
    sent: dict[str, Sent] = {}

    def add(case: str, resp: Response | None, expect: dict[str, Any], **audit: Any) -> None:
        sent[case] = Sent(case, resp, expect, audit or None)

    with Client(gw.addr) as c:  # three on one kept-alive connection
        for case in ("ok-1", "ok-2", "ok-3"):
            resp = c.request("GET", f"/echo-path/{case}", {"User-Agent": UA}, host="plain.test")
            add(case, resp, {**PROXIED, "server": origin_url, "path": f"/echo-path/{case}",
                             "user_agent": UA})  # fmt: skip
    with Client(gw.addr) as c:
        c.send(b"GET /echo-path/http10 HTTP/1.0\r\nHost: plain.test\r\n\r\n")
        resp = c.read_response()
        add("http10", resp, {**PROXIED, "protocol": "HTTP/1.0", "user_agent": None})
    with Client(gw.addr) as c:
        resp = c.request("POST", "/echo", body=b"p" * 1000, host="plain.test")
        add("post", resp, {**PROXIED, "method": "POST", "path": "/echo", "bytes_in": 1000})
    with Client(gw.addr) as c:
        bearer = {"Authorization": f"Bearer {token('read')}"}
        resp = c.request("GET", "/echo-path/jwt-ok", bearer, host="api.test")
        alice = {"method": "jwt", "subject": "alice", "consumer": None}
        add("jwt-ok", resp, {"route": "api", "identity": alice, "auth": "ok"})
        resp = c.request("GET", "/echo-path/jwt-none", host="api.test")
        refused = {"route": "api", "identity": None, "auth": "failed", **NOT_FORWARDED}
        add("jwt-none", resp, refused, event="auth_failed", source="jwt",
            reason="missing credentials")  # fmt: skip
        bad = {"Authorization": f"Bearer {token('read', key='w' * 64)}"}
        resp = c.request("GET", "/echo-path/jwt-bad", bad, host="api.test")
        add("jwt-bad", resp, refused, event="auth_failed", source="jwt", reason="bad signature")
        scope = {"Authorization": f"Bearer {token('write')}"}
        resp = c.request("GET", "/echo-path/jwt-scope", scope, host="api.test")
        forbidden = {"route": "api", "identity": alice, "auth": "forbidden", **NOT_FORWARDED}
        add("jwt-scope", resp, forbidden, event="forbidden", source="need_read")
    with Client(gw.addr) as c:  # one connection: one worker's limiter
        for case in ("rl-1", "rl-2", "rl-3"):
            resp = c.request("GET", f"/echo-path/{case}", host="limited.test")
            if resp.status == 429:
                expect = {"route": "limited", "rate_limit": "limited", **NOT_FORWARDED}
                add(case, resp, expect, event="rate_limited", source="rl")
            else:
                add(case, resp, {"route": "limited", "rate_limit": "allowed", "auth": None})
    with Client(gw.addr) as c:
        resp = c.request("GET", "/echo-path/notfound", host="unknown.test")
        add("notfound", resp, {"route": None, "service": None, **NOT_FORWARDED})
    with Client(gw.addr) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: plain.test\r\nBad Header: x\r\n\r\n")
        resp = c.read_response()
        no_head = {
            "method": None,
            "path": None,
            "protocol": None,
            "route": None,
            "service": None,
            "trace_id": None,
            "span_id": None,
            "user_agent": None,
            **NOT_FORWARDED,
        }
        add("malformed", resp, no_head)
    with TlsClient(gw.address("websecure")) as c:
        resp = c.request("GET", "/echo-path/tls", host="plain.test")
        version = c.sock.version()
        add("tls", resp, {**PROXIED, "entrypoint": "websecure", "server": origin_url,
                          "tls": version})  # fmt: skip
    with Client(gw.addr) as c:  # the body stops after 10 of 1000 bytes, then the client leaves
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
        )
        time.sleep(0.2)  # let the gateway read the 10 bytes before the FIN
    add("cut", None, {"status": 0, "method": "POST", "path": "/echo", "bytes_in": 10,
                      "bytes_out": 0, "route": "plain"})  # fmt: skip
    assert tuple(sent) == CASES
    return sent


@pytest.fixture(scope="module")
def run(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    directory = tmp_path_factory.mktemp("loglines")
    gw = Gateway(config(origin.port, directory), directory).start()
    try:
        result = Run(gw, origin.url)
        result.sent = drive(gw, origin.url)
        result.access = wait_lines(directory / "access.log", len(result.sent))
        refusals = sum(1 for s in result.sent.values() if s.audit)
        result.audit = wait_lines(directory / "audit.log", refusals)
        time.sleep(0.5)  # two more flush intervals: a line too many would show up now
        result.access = read_lines(directory / "access.log")
        result.audit = read_lines(directory / "audit.log")
        yield result
    finally:
        gw.stop()


def by_request_id(lines: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for text in lines:
        doc = json.loads(text)
        assert doc["request_id"] not in out, f"two lines for one request id: {text}"
        out[doc["request_id"]] = doc
    return out


# ---- the tests -------------------------------------------------------------------------------


def test_every_line_validates(run: Run) -> None:
    assert run.access and run.audit
    for name, lines, keys in (
        ("access", run.access, ACCESS_KEYS),
        ("audit", run.audit, AUDIT_KEYS),
    ):
        for text in lines:
            doc = json.loads(text)
            assert text.startswith('{"time":"') and text.endswith("}"), text
            problems = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(doc)]
            assert problems == [], f"{name} line fails the schema: {problems}\n{text}"
            assert doc["type"] == name
            assert tuple(doc) == keys, f"{name} keys out of the documented order: {text}"
            if name == "access":  # milliseconds with exactly 3 decimals
                assert re.search(r'"duration_ms":\d+\.\d{3},', text), text
                assert re.search(r'"upstream_ms":(null|\d+\.\d{3}),', text), text


def test_one_access_line_per_request(run: Run) -> None:
    assert len(run.access) == len(run.sent), "\n".join(run.access)
    logged = by_request_id(run.access)
    replied = {s.resp.header("x-request-id") for s in run.sent.values() if s.resp is not None}
    assert None not in replied
    assert replied <= set(logged)
    statuses = sorted(doc["status"] for doc in logged.values())
    expected = sorted(s.resp.status if s.resp else 0 for s in run.sent.values())
    assert statuses == expected


def test_the_mix_got_its_statuses(run: Run) -> None:
    """What the client saw (the premise of the per-line checks below)."""
    got = {case: s.resp.status if s.resp else 0 for case, s in run.sent.items()}
    assert got == {
        "ok-1": 200, "ok-2": 200, "ok-3": 200, "http10": 200, "post": 200, "jwt-ok": 200,
        "jwt-none": 401, "jwt-bad": 401, "jwt-scope": 403, "rl-1": 200, "rl-2": 200,
        "rl-3": 429, "notfound": 404, "malformed": 400, "tls": 200, "cut": 0,
    }  # fmt: skip


def find_line(run: Run, sent: Sent) -> dict[str, Any]:
    logged = by_request_id(run.access)
    if sent.resp is not None:
        rid = sent.resp.header("x-request-id")
        assert rid in logged, f"no access line for {sent.case} ({rid})"
        return logged[rid]
    unanswered = [doc for doc in logged.values() if doc["status"] == 0]
    assert len(unanswered) == 1, unanswered
    return unanswered[0]


@pytest.mark.parametrize("case", CASES)
def test_access_line_fields(run: Run, case: str) -> None:
    sent = run.sent[case]
    doc = find_line(run, sent)
    defaults: dict[str, Any] = {
        "type": "access", "client_ip": "127.0.0.1", "entrypoint": "web", "method": "GET",
        "path": f"/echo-path/{case}", "protocol": "HTTP/1.1", "bytes_in": 0, "tls": None,
        "identity": None, "service": "origin", "user_agent": None,
    }  # fmt: skip
    expect = {**defaults, **sent.expect}
    if sent.resp is not None:
        expect["status"] = sent.resp.status
        # Everything the client read: the head and the body as framed on the wire.
        expect["bytes_out"] = len(sent.resp.raw_head) + len(sent.resp.raw_body)
        expect["request_id"] = sent.resp.header("x-request-id")
        trace = sent.resp.header("traceresponse")
        if trace is not None:
            m = TRACERESPONSE.match(trace)
            assert m is not None, trace
            expect["trace_id"], expect["span_id"] = m.group(1), m.group(2)
        else:
            expect["trace_id"] = expect["span_id"] = None
    assert {k: doc[k] for k in expect} == expect, json.dumps(doc)
    if case == "tls":
        assert doc["tls"] in ("TLSv1.2", "TLSv1.3"), doc
    if expect.get("server") is None and "server" in sent.expect:
        assert doc["upstream_ms"] is None
    elif sent.resp is not None and sent.resp.status == 200:
        assert doc["server"] == run.origin_url and doc["upstream_ms"] is not None
        assert doc["upstream_ms"] <= doc["duration_ms"] + 0.001
    when = dt.datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.timezone.utc
    )
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 300


def test_audit_lines_are_the_refusals(run: Run) -> None:
    logged = by_request_id(run.audit)
    refusals = {s.resp.header("x-request-id"): s for s in run.sent.values() if s.audit}
    assert set(logged) == set(refusals), "\n".join(run.audit)
    for rid, sent in refusals.items():
        doc, access = logged[rid], find_line(run, sent)
        expect = {**sent.audit, "status": sent.resp.status}
        assert {k: doc[k] for k in expect} == expect, json.dumps(doc)
        assert doc["reason"], doc  # a fixed phrase always says why
        for key in ("trace_id", "client_ip", "identity", "entrypoint", "route", "method",
                    "path", "tls", "user_agent"):  # fmt: skip
            assert doc[key] == access[key], (key, doc, access)


# ---- common / combined -----------------------------------------------------------------------

QUOTED = r'"((?:[^"\\]|\\.)*)"'
CLF = re.compile(
    r"^(?P<ip>\S+) - (?P<user>\S+) \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} "
    r"\+0000)\] " + QUOTED.replace("(", "(?P<request>", 1) + r" (?P<status>\d+) (?P<bytes>\d+|-)"
)
COMBINED_TAIL = re.compile(
    " " + QUOTED.replace("(", "(?P<referer>", 1) + " " + QUOTED.replace("(", "(?P<ua>", 1) + "$"
)


@pytest.mark.parametrize("fmt", ["common", "combined"])
def test_clf_formats(
    origin: Origin,
    start_gateway: Callable[[dict[str, Any]], Gateway],
    tmp_path: Path,
    fmt: str,
) -> None:
    gw = start_gateway(config(origin.port, tmp_path, fmt=fmt, workers=1))
    bearer = {"Authorization": f"Bearer {token('read')}", "User-Agent": 'ua "quoted"'}
    replies: list[tuple[Response, str | None, str, str, str]] = []
    with Client(gw.addr) as c:
        headers = {"User-Agent": UA, "Referer": "http://ref.test/a?b=1"}
        resp = c.request("GET", "/echo-path/clf?x=1&token=abc", headers, host="plain.test")
        replies.append((resp, "GET /echo-path/clf?x=1&token=REDACTED HTTP/1.1", "-",
                        "http://ref.test/a?b=1", UA))  # fmt: skip
        resp = c.request("GET", "/echo-path/who", bearer, host="api.test")
        replies.append((resp, "GET /echo-path/who HTTP/1.1", "alice", "-", 'ua \\"quoted\\"'))
        resp = c.request("GET", "/echo-path/none", host="api.test")
        replies.append((resp, "GET /echo-path/none HTTP/1.1", "-", "-", "-"))
    with Client(gw.addr) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: plain.test\r\nBad Header: x\r\n\r\n")
        replies.append((c.read_response(), "-", "-", "-", "-"))
    lines = wait_lines(tmp_path / "access.log", len(replies))
    time.sleep(0.5)
    lines = read_lines(tmp_path / "access.log")
    assert [r[0].status for r in replies] == [200, 200, 401, 400]
    assert len(lines) == len(replies), lines
    # One worker, one connection at a time: the lines are in the order sent.
    for text, (resp, request, user, referer, ua) in zip(lines, replies, strict=True):
        m = CLF.match(text)
        assert m is not None, text
        assert m["ip"] == "127.0.0.1" and m["user"] == user
        assert m["request"] == request and int(m["status"]) == resp.status
        assert m["bytes"] == str(len(resp.raw_head) + len(resp.raw_body))
        dt.datetime.strptime(m["time"], "%d/%b/%Y:%H:%M:%S %z")
        rest = text[m.end() :]
        if fmt == "common":
            assert rest == "", text
        else:
            tail = COMBINED_TAIL.fullmatch(rest)
            assert tail is not None, text
            assert (tail["referer"], tail["ua"]) == (referer, ua)
    # The audit stream stays JSON whatever the access format.
    audit = wait_lines(tmp_path / "audit.log", 1)
    assert [json.loads(t)["event"] for t in audit] == ["auth_failed"]
