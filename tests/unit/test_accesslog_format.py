"""fastgate._core.accesslog: the C formatter's lines, redaction, sampling and batch buffers.

The lines are checked against the contract (the log line formats): JSON lines through
json.loads, Common Log Format lines through a regex; the formatter is driven through its test
entry points (AccessLog.write_fields / select_fields), which call the same C write()/select()
the connection calls.
"""

from __future__ import annotations

import codecs
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core import accesslog as al

MAX_LINE, MAX_PATH_LOG, MAX_VALUE_LOG = al.MAX_LINE, al.MAX_PATH_LOG, al.MAX_VALUE_LOG
ACCESS, AUDIT, SPAN = al.WANT_ACCESS, al.WANT_AUDIT, al.WANT_SPAN
TRACE, SPAN_ID, PARENT = (
    b"4bf92f3577b34da6a3ce929d0e0e4736",
    b"00f067aa0ba902b7",
    b"b7ad6b7169203331",
)

ACCESS_KEYS = [
    "time", "type", "request_id", "trace_id", "span_id", "client_ip", "identity", "entrypoint",
    "route", "service", "server", "method", "path", "protocol", "status", "bytes_in",
    "bytes_out", "duration_ms", "upstream_ms", "rate_limit", "auth", "tls", "user_agent",
]  # fmt: skip
AUDIT_KEYS = [
    "time", "type", "event", "reason", "source", "request_id", "trace_id", "client_ip",
    "identity", "entrypoint", "route", "method", "path", "status", "tls", "user_agent",
]  # fmt: skip
TEXT_FIELDS = [
    "request_id", "trace_id", "span_id", "parent_span_id", "client_ip", "id_method",
    "id_subject", "id_consumer", "entrypoint", "route", "service", "server", "method", "target",
    "user_agent", "referer", "tls_version", "deny_source", "deny_reason",
]  # fmt: skip
# Fields the connection passes JSON-safe (checked ids, hex trace ids, the method token): the
# formatter copies them without escaping, and its test entry refuses anything else.
SAFE_FIELDS = {"request_id", "trace_id", "span_id", "parent_span_id", "method"}
SAFE_BYTES = bytes(c for c in range(0x21, 0x7F) if c not in (0x22, 0x5C))

FULL = {
    "status": 200,
    "req_bytes": 17,
    "resp_bytes": 1234,
    "duration_ns": 521_999,
    "upstream_ns": 412_345,
    "rate": al.RATE_ALLOWED,
    "request_id": b"req-1",
    "trace_id": TRACE,
    "span_id": SPAN_ID,
    "client_ip": b"203.0.113.7",
    "id_method": b"jwt",
    "id_subject": b"alice",
    "id_consumer": b"acme",
    "entrypoint": b"web",
    "route": b"api",
    "service": b"backend",
    "server": b"http://127.0.0.1:9000",
    "method": b"GET",
    "target": b"/x?a=1",
    "http_minor": 1,
    "user_agent": b"curl/8.5.0",
    "referer": b"https://example.com/",
    "tls_version": b"TLSv1.3",
}

# Every byte of an invalid UTF-8 sequence is one U+FFFD: Python's error ranges are a lead byte
# and its continuation bytes, so replacing each of their bytes gives exactly that.
codecs.register_error("fg_each_fffd", lambda e: ("\ufffd" * (e.end - e.start), e.end))


def logged(value: bytes) -> str:
    return value.decode("utf-8", "fg_each_fffd")


def streams(capacity: int = 1 << 20, flush_at: int = 64 << 10):
    return tuple(al.LogStream(capacity, flush_at) for _ in range(3))


def write(want: int = ACCESS, fmt: str = "json", redact=(), drop_query=False, **fields) -> list:
    """The bytes each stream (access, audit, spans) got for one exchange."""
    s = streams()
    log = al.AccessLog(*s, format=fmt, redact=redact, drop_query=drop_query, seed=1)
    log.write_fields(want, **fields)
    return [x.take() for x in s]


def access(**fields) -> dict:
    raw = write(ACCESS, **{**FULL, **fields})[0]
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    return json.loads(raw)


# ---- JSON access line -------------------------------------------------------------------


def test_json_access_line_carries_the_values() -> None:
    before = time.time()
    line = access()
    assert list(line) == ACCESS_KEYS
    assert line == {
        **line,
        "type": "access",
        "request_id": "req-1",
        "trace_id": TRACE.decode(),
        "span_id": SPAN_ID.decode(),
        "client_ip": "203.0.113.7",
        "identity": {"method": "jwt", "subject": "alice", "consumer": "acme"},
        "entrypoint": "web",
        "route": "api",
        "service": "backend",
        "server": "http://127.0.0.1:9000",
        "method": "GET",
        "path": "/x?a=1",
        "protocol": "HTTP/1.1",
        "status": 200,
        "bytes_in": 17,
        "bytes_out": 1234,
        "duration_ms": 0.521,
        "upstream_ms": 0.412,
        "rate_limit": "allowed",
        "auth": "ok",
        "tls": "TLSv1.3",
        "user_agent": "curl/8.5.0",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["time"])
    stamp = time.mktime(time.strptime(line["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before - 1 <= stamp + int(line["time"][20:26]) / 1e6 <= time.time() + 1


def test_duration_has_three_decimals_in_the_raw_line() -> None:
    raw = write(ACCESS, **{**FULL, "duration_ns": 1_234_567_891, "upstream_ns": 5_000})[0]
    assert b'"duration_ms":1234.567,' in raw and b'"upstream_ms":0.005,' in raw


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        pytest.param({"duration_ns": -5}, {"duration_ms": 0.0}, id="negative duration is 0"),
        pytest.param({"upstream_ns": None}, {"upstream_ms": None}, id="no upstream"),
        pytest.param({"upstream_ns": 0}, {"upstream_ms": 0.0}, id="upstream of 0 ns"),
        pytest.param({"http_minor": 0}, {"protocol": "HTTP/1.0"}, id="HTTP/1.0"),
        pytest.param({"http_minor": -1}, {"protocol": None}, id="no head: no protocol"),
        pytest.param({"status": 0}, {"status": 0}, id="no response sent"),
        pytest.param({"rate": al.RATE_NONE}, {"rate_limit": None}, id="rate none"),
        pytest.param({"rate": al.RATE_FALLBACK}, {"rate_limit": "fallback"}, id="rate fallback"),
        pytest.param({"rate": al.RATE_LIMITED}, {"rate_limit": "limited"}, id="rate limited"),
        pytest.param({"deny": al.DENY_AUTH_FAILED}, {"auth": "failed"}, id="auth failed"),
        pytest.param({"deny": al.DENY_FORBIDDEN}, {"auth": "forbidden"}, id="forbidden"),
        pytest.param(
            {"deny": al.DENY_AUTH_UNAVAILABLE}, {"auth": "unavailable"}, id="auth unavailable"
        ),
        pytest.param({"deny": al.DENY_IP}, {"auth": "ok"}, id="ip deny keeps auth ok"),
        pytest.param(
            {"deny": al.DENY_RATE_LIMITED, "id_method": None},
            {"auth": None, "identity": None},
            id="rate deny without identity",
        ),
        pytest.param(
            {"id_consumer": None},
            {"identity": {"method": "jwt", "subject": "alice", "consumer": None}},
            id="identity without consumer",
        ),
        pytest.param({"client_ip": None}, {"client_ip": ""}, id="client ip always a string"),
        pytest.param({"target": None}, {"path": None}, id="no target"),
        pytest.param({"trace_id": None, "span_id": None}, {"trace_id": None}, id="no trace"),
    ],
)
def test_json_access_field_rules(fields: dict, expect: dict) -> None:
    line = access(**fields)
    assert {k: line[k] for k in expect} == expect


def test_absent_fields_are_null() -> None:
    raw = write(ACCESS, status=400, http_minor=-1)[0]
    line = json.loads(raw)
    assert list(line) == ACCESS_KEYS
    nulls = set(ACCESS_KEYS) - {"time", "type", "client_ip", "status", "bytes_in", "bytes_out"}
    nulls -= {"duration_ms"}
    assert {k for k, v in line.items() if v is None} == nulls
    assert line["client_ip"] == "" and line["status"] == 400 and line["bytes_out"] == 0


@pytest.mark.parametrize(
    ("value", "expect", "raw"),
    [
        pytest.param(b'say "hi"', 'say "hi"', rb"say \"hi\"", id="quotes"),
        pytest.param(b"a\\b", "a\\b", rb"a\\b", id="backslash"),
        pytest.param(b"a\nb\rc\td", "a\nb\rc\td", rb"a\nb\rc\td", id="short escapes"),
        pytest.param(b"\x01\x1f", "\x01\x1f", rb"\u0001\u001f", id="control bytes"),
        pytest.param(b"del\x7f", "del\x7f", rb"del\u007f", id="0x7f"),
        pytest.param("é€😀".encode(), "é€😀", "é€😀".encode(), id="valid UTF-8 kept"),
        pytest.param(b"a\xffb", "a\ufffdb", rb"a\ufffdb", id="invalid byte"),
        pytest.param(b"\xe2\x82", "\ufffd\ufffd", rb"\ufffd\ufffd", id="cut sequence"),
        pytest.param(b"\xed\xa0\x80", "\ufffd" * 3, rb"\ufffd" * 3, id="surrogate"),
        pytest.param(b"\xc0\xaf", "\ufffd" * 2, rb"\ufffd" * 2, id="overlong"),
        pytest.param(b"\xf4\x90\x80\x80", "\ufffd" * 4, rb"\ufffd" * 4, id="over U+10FFFF"),
        pytest.param(b"0123456789abcdef\x00", "0123456789abcdef\x00", None, id="word then NUL"),
    ],
)
def test_json_escaping(value: bytes, expect: str, raw: bytes | None) -> None:
    line = write(ACCESS, **{**FULL, "user_agent": value})[0]
    assert line.count(b"\n") == 1
    assert json.loads(line)["user_agent"] == expect
    if raw is not None:
        assert b'"user_agent":"' + raw + b'"}' in line


@pytest.mark.parametrize(
    ("field", "value", "expect"),
    [
        pytest.param(
            "target",
            b"/" + b"p" * (MAX_PATH_LOG + 100),
            "/" + "p" * (MAX_PATH_LOG - 1) + "...",
            id="long path",
        ),
        pytest.param(
            "target", b"/" + b"p" * (MAX_PATH_LOG - 1), "/" + "p" * 2047, id="path at limit"
        ),
        pytest.param("user_agent", b"u" * 600, "u" * MAX_VALUE_LOG + "...", id="long user agent"),
        pytest.param(
            "user_agent",
            b"a" * (MAX_VALUE_LOG - 1) + "é".encode() * 10,
            "a" * (MAX_VALUE_LOG - 1) + "...",
            id="cut backs off to the sequence start",
        ),
        pytest.param(
            "user_agent",
            b"a" * (MAX_VALUE_LOG - 2) + "😀".encode() * 2,
            "a" * (MAX_VALUE_LOG - 2) + "...",
            id="4-byte sequence not split",
        ),
        pytest.param(
            "id_subject", b"s" * 1000, "s" * MAX_VALUE_LOG + "...", id="long identity subject"
        ),
    ],
)
def test_truncation(field: str, value: bytes, expect: str) -> None:
    line = access(**{field: value})
    key = {"target": "path", "id_subject": "identity"}.get(field, field)
    got = line[key]["subject"] if field == "id_subject" else line[key]
    assert got == expect


@pytest.mark.parametrize("fmt", ["json", "common", "combined"])
@pytest.mark.parametrize("stuffing", [b"\x01", b"\xff", b"\xe2\x82\xac", b"a"])
def test_every_line_is_bounded_whatever_the_input(fmt: str, stuffing: bytes) -> None:
    huge = {name: stuffing * 20000 for name in TEXT_FIELDS if name not in SAFE_FIELDS}
    huge["request_id"] = huge["method"] = huge["parent_span_id"] = b"A" * 20000
    huge["target"] = b"/" + stuffing * 20000
    huge["trace_id"], huge["span_id"] = TRACE, SPAN_ID
    lines = write(ACCESS | AUDIT | SPAN, fmt, deny=al.DENY_FORBIDDEN, trace_sampled=True, **huge)
    for i, raw in enumerate(lines):
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        assert len(raw) <= MAX_LINE
        if fmt == "json" or i > 0:
            json.loads(raw)


# ---- redaction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "redact", "drop_query", "expect"),
    [
        pytest.param(b"/p?token=abc&x=1", ["token"], False, b"/p?token=REDACTED&x=1", id="plain"),
        pytest.param(b"/p?TOKEN=abc", ["Token"], False, b"/p?TOKEN=REDACTED", id="case"),
        pytest.param(b"/p?%74oken=abc", ["token"], False, b"/p?%74oken=REDACTED", id="escaped key"),
        pytest.param(b"/p?%54OKEN=abc", ["token"], False, b"/p?%54OKEN=REDACTED", id="escape+case"),
        pytest.param(b"/p?%zzoken=abc", ["token"], False, b"/p?%zzoken=abc", id="bad escape kept"),
        pytest.param(b"/p?%=1&%4=2", ["%"], False, b"/p?%=REDACTED&%4=2", id="lone percent"),
        pytest.param(b"/p?token&x=1", ["token"], False, b"/p?token&x=1", id="key without ="),
        pytest.param(
            b"/p?token=a&token=b&t=c",
            ["token"],
            False,
            b"/p?token=REDACTED&token=REDACTED&t=c",
            id="repeated keys",
        ),
        pytest.param(b"/p?token=", ["token"], False, b"/p?token=REDACTED", id="empty value"),
        pytest.param(b"/p?t=a=b", ["t"], False, b"/p?t=REDACTED", id="value with ="),
        pytest.param(b"/p?", ["token"], False, b"/p?", id="empty query"),
        pytest.param(b"?", ["token"], False, b"?", id="question mark alone"),
        pytest.param(b"/p?a=1&&b=2", ["b"], False, b"/p?a=1&&b=REDACTED", id="empty element"),
        pytest.param(b"/p/token=x", ["token"], False, b"/p/token=x", id="no query"),
        pytest.param(b"/p?tokens=x", ["token"], False, b"/p?tokens=x", id="longer key"),
        pytest.param(b"/p?x=1&token=a", (), True, b"/p", id="drop query"),
        pytest.param(b"/p?", (), True, b"/p", id="drop empty query"),
        pytest.param(
            b"/p?a=1&k=2&b=3", ["a", "b"], False, b"/p?a=REDACTED&k=2&b=REDACTED", id="two keys"
        ),
    ],
)
def test_redact_target(target: bytes, redact: list, drop_query: bool, expect: bytes) -> None:
    assert al.redact_target(target, redact, drop_query) == expect
    line = json.loads(
        write(ACCESS, redact=redact, drop_query=drop_query, **{**FULL, "target": target})[0]
    )
    assert line["path"] == expect.decode()


def test_redaction_of_a_long_target_never_shows_the_value() -> None:
    target = b"/p?" + b"a=1&" * 600 + b"token=SEKRET&x=1"
    raw = write(ACCESS, redact=["token"], **{**FULL, "target": target})[0]
    assert b"SEKRET" not in raw and json.loads(raw)["path"].endswith("...")
    assert al.redact_target(target, ["token"]).endswith(b"token=REDACTED&x=1")


@pytest.mark.parametrize("fmt", ["json", "common", "combined"])
def test_no_secret_leak(fmt: str) -> None:
    fields = {**FULL, "target": b"/p?access_token=SEKRET&x=1", "deny": al.DENY_AUTH_FAILED}
    lines = write(ACCESS | AUDIT | SPAN, fmt, redact=["access_token"], trace_sampled=True, **fields)
    assert all(lines)
    for raw in lines:
        assert b"SEKRET" not in raw and b"access_token=REDACTED&x=1" in raw


@pytest.mark.parametrize(
    ("redact", "error"),
    [
        pytest.param("token", TypeError, id="a string, not a list"),
        pytest.param([""], ValueError, id="empty key"),
        pytest.param([b"token"], ValueError, id="bytes key"),
        pytest.param(["tökén"], ValueError, id="non-ASCII key"),
        pytest.param(["k" * 257], ValueError, id="too long"),
    ],
)
def test_bad_redact_keys(redact, error: type) -> None:
    with pytest.raises(error):
        al.AccessLog(redact=redact)


def test_redact_keys_stored_lowercase() -> None:
    assert al.AccessLog(redact=["Token", "API_KEY", "token"]).redact == (b"token", b"api_key")


# ---- Common Log Format ------------------------------------------------------------------

QUOTED = r'"((?:[^"\\]|\\.)*)"'
CLF = re.compile(
    r"(\S+) - (\S+) \[(\d\d)/([A-Z][a-z]{2})/(\d{4}):(\d\d):(\d\d):(\d\d) \+0000\] "
    + QUOTED
    + r" (\d+) (\d+|-)(?: "
    + QUOTED
    + " "
    + QUOTED
    + r")?\n"
)


def clf(fmt: str = "common", **fields) -> tuple:
    raw = write(ACCESS, fmt, **{**FULL, **fields})[0]
    m = CLF.fullmatch(raw.decode("ascii"))
    assert m, raw
    return m.groups()


def test_common_line() -> None:
    g = clf()
    assert (g[0], g[1], g[8], g[9], g[10]) == (
        "203.0.113.7",
        "alice",
        "GET /x?a=1 HTTP/1.1",
        "200",
        "1234",
    )
    assert g[11] is None
    stamp = time.strptime(" ".join(g[2:8]), "%d %b %Y %H %M %S")
    assert abs(time.mktime(stamp) - time.timezone - time.time()) < 5


def test_combined_line() -> None:
    g = clf("combined")
    assert (g[11], g[12]) == ("https://example.com/", "curl/8.5.0")


@pytest.mark.parametrize(
    ("fields", "index", "expect"),
    [
        pytest.param({"resp_bytes": 0}, 10, "-", id="no bytes out"),
        pytest.param({"client_ip": None}, 0, "-", id="no client ip"),
        pytest.param({"id_method": None}, 1, "-", id="no identity"),
        pytest.param({"id_subject": b"bob smith"}, 1, r"bob\x20smith", id="space in subject"),
        pytest.param({"id_subject": b'b"o\\b'}, 1, r"b\"o\\b", id="quote in subject"),
        pytest.param({"method": None}, 8, "-", id="no method"),
        pytest.param({"http_minor": -1}, 8, "-", id="no protocol"),
        pytest.param({"target": None}, 8, "-", id="no target"),
        pytest.param({"http_minor": 0}, 8, "GET /x?a=1 HTTP/1.0", id="HTTP/1.0"),
        pytest.param(
            {"target": '/é\x01\x7f"'.encode()}, 8, r"GET /\xc3\xa9\x01\x7f\" HTTP/1.1", id="escapes"
        ),
        pytest.param({"user_agent": None}, 12, "-", id="no user agent"),
        pytest.param({"referer": b""}, 11, "-", id="empty referer"),
        pytest.param({"user_agent": b"a b"}, 12, "a b", id="space kept in quotes"),
        pytest.param({"status": 0}, 9, "0", id="no status"),
    ],
)
def test_clf_field_rules(fields: dict, index: int, expect: str) -> None:
    assert clf("combined", **fields)[index] == expect


# ---- audit and span lines ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("deny", "event"),
    [pytest.param(k, v, id=v) for k, v in sorted(al.DENY_EVENTS.items())],
)
def test_audit_line_per_deny(deny: int, event: str) -> None:
    fields = {**FULL, "deny": deny, "status": 401, "deny_source": b"jwt", "deny_reason": b"bad"}
    raw = write(AUDIT, redact=["a"], **fields)[1]
    line = json.loads(raw)
    assert list(line) == AUDIT_KEYS
    assert line == {
        **line,
        "type": "audit",
        "event": event,
        "reason": "bad",
        "source": "jwt",
        "request_id": "req-1",
        "trace_id": TRACE.decode(),
        "client_ip": "203.0.113.7",
        "identity": {"method": "jwt", "subject": "alice", "consumer": "acme"},
        "entrypoint": "web",
        "route": "api",
        "method": "GET",
        "path": "/x?a=REDACTED",
        "status": 401,
        "tls": "TLSv1.3",
        "user_agent": "curl/8.5.0",
    }


def test_audit_nulls() -> None:
    line = json.loads(write(AUDIT, deny=al.DENY_IP, status=403)[1])
    assert line["event"] == "ip_denied" and line["reason"] is None and line["source"] is None
    assert line["identity"] is None and line["path"] is None and line["client_ip"] == ""


def span(**fields) -> dict:
    raw = write(SPAN, **{**FULL, **fields})[2]
    assert raw.count(b"\n") == 1
    return json.loads(raw)


def attrs(line: dict) -> dict:
    return {a["key"]: next(iter(a["value"].values())) for a in line["attributes"]}


def test_span_line() -> None:
    now = time.time_ns()
    line = span(parent_span_id=PARENT, duration_ns=2_000_000)
    assert list(line) == [
        "traceId", "spanId", "parentSpanId", "name", "kind", "startTimeUnixNano",
        "endTimeUnixNano", "attributes", "status",
    ]  # fmt: skip
    assert (line["traceId"], line["spanId"], line["parentSpanId"]) == (
        TRACE.decode(),
        SPAN_ID.decode(),
        PARENT.decode(),
    )
    assert line["name"] == "GET api" and line["kind"] == 2 and line["status"] == {"code": 0}
    start, end = int(line["startTimeUnixNano"]), int(line["endTimeUnixNano"])
    assert end - start == 2_000_000 and abs(end - now) < 5_000_000_000
    assert [a["key"] for a in line["attributes"]] == [
        "http.request.method", "url.path", "http.route", "http.response.status_code",
        "client.address", "fastgate.service", "fastgate.server", "fastgate.request_id",
    ]  # fmt: skip
    assert attrs(line) == {
        "http.request.method": "GET",
        "url.path": "/x?a=1",
        "http.route": "api",
        "http.response.status_code": "200",
        "client.address": "203.0.113.7",
        "fastgate.service": "backend",
        "fastgate.server": "http://127.0.0.1:9000",
        "fastgate.request_id": "req-1",
    }


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        pytest.param({}, lambda s: "parentSpanId" not in s, id="no parent: key omitted"),
        pytest.param({"route": None}, lambda s: s["name"] == "GET", id="name without route"),
        pytest.param({"method": None, "route": None}, lambda s: s["name"] == "HTTP", id="HTTP"),
        pytest.param({"status": 500}, lambda s: s["status"] == {"code": 2}, id="5xx is error"),
        pytest.param({"status": 0}, lambda s: s["status"] == {"code": 2}, id="no status: error"),
        pytest.param({"status": 404}, lambda s: s["status"] == {"code": 0}, id="4xx is unset"),
        pytest.param(
            {"route": None, "service": None, "server": None},
            lambda s: set(attrs(s)).isdisjoint(
                {"http.route", "fastgate.service", "fastgate.server"}
            ),
            id="absent attributes omitted",
        ),
        pytest.param(
            {"duration_ns": -7},
            lambda s: s["startTimeUnixNano"] == s["endTimeUnixNano"],
            id="start <= end",
        ),
    ],
)
def test_span_rules(fields: dict, check) -> None:
    assert check(span(**fields))


def test_span_needs_trace_and_span_id() -> None:
    assert write(SPAN, **{**FULL, "trace_id": None})[2] == b""
    assert write(SPAN, **{**FULL, "span_id": None})[2] == b""


# ---- select() -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "deny", "sample", "errors", "sampled", "want"),
    [
        pytest.param(200, 0, 0, True, False, 0, id="sample 0: success not logged"),
        pytest.param(404, 0, 0, True, False, ACCESS, id="sample 0: 4xx logged"),
        pytest.param(502, 0, 0, True, False, ACCESS, id="sample 0: 5xx logged"),
        pytest.param(0, 0, 0, True, False, ACCESS, id="sample 0: no response logged"),
        pytest.param(399, 0, 0, True, False, 0, id="sample 0: 3xx not logged"),
        pytest.param(500, 0, 0, False, False, 0, id="route log off"),
        pytest.param(200, 0, al.SAMPLE_ALL, False, False, ACCESS, id="SAMPLE_ALL"),
        pytest.param(401, 1, 0, False, False, AUDIT, id="audit only when deny"),
        pytest.param(401, 1, al.SAMPLE_ALL, True, True, ACCESS | AUDIT | SPAN, id="all three"),
        pytest.param(200, 0, 0, False, True, SPAN, id="span when sampled"),
    ],
)
def test_select(status: int, deny: int, sample: int, errors: bool, sampled: bool, want: int):
    log = al.AccessLog(*streams(), seed=7)
    assert log.select_fields(status, deny, sample, errors, sampled) == want


def test_select_without_streams() -> None:
    log = al.AccessLog(seed=7)
    assert log.select_fields(500, 1, al.SAMPLE_ALL, True, True) == 0
    log = al.AccessLog(access=al.LogStream(), seed=7)
    assert log.select_fields(500, 1, al.SAMPLE_ALL, True, True) == ACCESS


@pytest.mark.parametrize("seed", [1, 2, 12345, None])
def test_half_sampling(seed) -> None:
    log = al.AccessLog(al.LogStream(), seed=seed)
    half = al.sample_threshold(0.5)
    hits = sum(log.select_fields(200, 0, half, True, False) for _ in range(2000))
    assert 700 <= hits <= 1300


def test_sampling_is_seeded() -> None:
    def draws(seed: int) -> list:
        log = al.AccessLog(al.LogStream(), seed=seed)
        return [log.select_fields(200, 0, 1 << 31, False, False) for _ in range(64)]

    assert draws(3) == draws(3) and draws(3) != draws(4)


@pytest.mark.parametrize(
    ("rate", "threshold"),
    [
        pytest.param(1.0, al.SAMPLE_ALL, id="all"),
        pytest.param(0.0, 0, id="none"),
        pytest.param(0.5, 1 << 31, id="half"),
        pytest.param(0.25, 1 << 30, id="quarter"),
        pytest.param(1 - 1e-12, al.SAMPLE_ALL, id="clamped"),
        pytest.param(2.0, al.SAMPLE_ALL, id="above 1"),
        pytest.param(-1.0, 0, id="below 0"),
    ],
)
def test_sample_threshold(rate: float, threshold: int) -> None:
    assert al.sample_threshold(rate) == threshold
    assert al.SAMPLE_ALL == 0xFFFFFFFF


# ---- LogStream ----------------------------------------------------------------------------


def test_full_buffer_drops_whole_lines() -> None:
    access_stream = al.LogStream(2 * MAX_LINE, 2 * MAX_LINE)
    log = al.AccessLog(access_stream, seed=1)
    for _ in range(100):
        log.write_fields(ACCESS, **FULL)
    assert access_stream.lines + access_stream.dropped == 100
    assert access_stream.dropped > 0 and access_stream.lines > 10
    data = access_stream.take()
    assert data.endswith(b"\n") and access_stream.pending == 0
    lines = data.splitlines()
    assert len(lines) == access_stream.lines
    assert all(json.loads(x)["status"] == 200 for x in lines)
    assert access_stream.take() == b""
    log.write_fields(ACCESS, **FULL)
    assert access_stream.lines == len(lines) + 1


def test_on_ready_once_per_fill() -> None:
    calls = []
    stream = al.LogStream(1 << 16, 1000)
    stream.on_ready = lambda: calls.append(stream.pending)
    log = al.AccessLog(stream, seed=1)
    for _ in range(10):
        log.write_fields(ACCESS, **FULL)
    assert len(calls) == 1 and calls[0] >= 1000
    stream.take()
    for _ in range(10):
        log.write_fields(ACCESS, **FULL)
    assert len(calls) == 2


def test_on_ready_errors_are_swallowed() -> None:
    stream = al.LogStream(1 << 16, 0)
    stream.on_ready = lambda: 1 / 0
    assert stream.write_line(b"x\n") is True
    assert stream.take() == b"x\n"


def test_on_ready_may_take() -> None:
    stream = al.LogStream(1 << 16, 1)
    got = []
    stream.on_ready = lambda: got.append(stream.take())
    assert stream.write_line(b"a\n") and stream.write_line(b"b\n")
    assert got == [b"a\n", b"b\n"] and stream.pending == 0


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"no newline", id="no newline"),
        pytest.param(b"two\nlines\n", id="inner newline"),
        pytest.param(b"x" * MAX_LINE + b"\n", id="too long"),
    ],
)
def test_write_line_validation(line: bytes) -> None:
    stream = al.LogStream()
    with pytest.raises(ValueError):
        stream.write_line(line)
    assert stream.lines == 0 and stream.pending == 0


def test_write_line_until_full() -> None:
    stream = al.LogStream(2 * MAX_LINE, MAX_LINE)
    line = b"y" * (MAX_LINE - 1) + b"\n"
    assert stream.write_line(line) and stream.write_line(line)
    assert stream.write_line(b"z\n") is False
    assert (stream.lines, stream.dropped, stream.pending) == (2, 1, 2 * MAX_LINE)
    assert stream.capacity == 2 * MAX_LINE
    assert stream.take() == line * 2


@pytest.mark.parametrize(
    ("capacity", "flush_at"),
    [
        pytest.param(2 * MAX_LINE - 1, 0, id="capacity too small"),
        pytest.param(1 << 20, (1 << 20) + 1, id="flush_at over capacity"),
        pytest.param(1 << 20, -1, id="negative flush_at"),
    ],
)
def test_log_stream_validation(capacity: int, flush_at: int) -> None:
    with pytest.raises(ValueError):
        al.LogStream(capacity, flush_at)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"format": "xml"}, id="format"),
        pytest.param({"sample": 1.5}, id="sample above 1"),
        pytest.param({"sample": float("nan")}, id="sample NaN"),
    ],
)
def test_access_log_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        al.AccessLog(**kwargs)


def test_write_fields_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError):
        al.AccessLog(al.LogStream()).write_fields(ACCESS, colour=b"red")
    with pytest.raises(TypeError):
        al.AccessLog(al.LogStream()).write_fields(ACCESS, route="api")


def test_constants() -> None:
    assert (al.FMT_JSON, al.FMT_COMMON, al.FMT_COMBINED) == (0, 1, 2)
    assert (ACCESS, AUDIT, SPAN) == (1, 2, 4)
    assert (al.RATE_NONE, al.RATE_ALLOWED, al.RATE_FALLBACK, al.RATE_LIMITED) == (0, 1, 2, 3)
    assert al.DENY_EVENTS == {
        al.DENY_AUTH_FAILED: "auth_failed",
        al.DENY_FORBIDDEN: "forbidden",
        al.DENY_RATE_LIMITED: "rate_limited",
        al.DENY_IP: "ip_denied",
        al.DENY_AUTH_UNAVAILABLE: "auth_unavailable",
    }
    assert (al.DENY_NONE, al.DENY_AUTH_FAILED, al.DENY_AUTH_UNAVAILABLE) == (0, 1, 5)


def test_bench_write_reports_a_cost() -> None:
    log = al.AccessLog(al.LogStream(), redact=["token"], seed=1)
    assert log.bench_write(1000) > 0
    assert log.access.pending == 0


# ---- property: arbitrary bytes ------------------------------------------------------------

text = st.one_of(st.none(), st.binary(max_size=48))
safe_text = st.one_of(st.none(), st.binary(max_size=48).map(
    lambda b: bytes(SAFE_BYTES[c % len(SAFE_BYTES)] for c in b) or None))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {name: safe_text if name in SAFE_FIELDS else text for name in TEXT_FIELDS}
    ),
    st.sampled_from([-1, 0, 1]),
)
def test_arbitrary_bytes_make_valid_json_lines(fields: dict, http_minor: int) -> None:
    fields = {
        **fields,
        "trace_id": fields["trace_id"] or TRACE,
        "span_id": fields["span_id"] or SPAN_ID,
    }
    lines = write(
        ACCESS | AUDIT | SPAN,
        deny=al.DENY_FORBIDDEN,
        http_minor=http_minor,
        trace_sampled=True,
        **fields,
    )
    for raw in lines:
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        json.loads(raw)
    line = json.loads(lines[0])

    def want(name: str):
        value = fields[name]
        return None if value is None else logged(value)

    simple = ["request_id", "trace_id", "span_id", "entrypoint", "route", "service", "server"]
    simple += ["method", "user_agent"]
    assert {k: line[k] for k in simple} == {k: want(k) for k in simple}
    assert line["path"] == want("target") and line["tls"] == want("tls_version")
    assert line["client_ip"] == (want("client_ip") or "")
    if fields["id_method"] is None:
        assert line["identity"] is None
    else:
        assert line["identity"] == {
            "method": want("id_method"),
            "subject": want("id_subject"),
            "consumer": want("id_consumer"),
        }
    audit = json.loads(lines[1])
    assert (audit["reason"], audit["source"]) == (want("deny_reason"), want("deny_source"))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({"redact": ["token"]}, '"https://a.example/p?token=REDACTED&x=1"',
                     id="the referer's query keys are redacted like the path's"),
        pytest.param({"drop_query": True}, '"https://a.example/p"', id="drop_query drops it"),
    ],
)  # fmt: skip
def test_combined_referer_hides_secrets(options: dict, expected: str) -> None:
    stream = al.LogStream()
    log = al.AccessLog(access=stream, format="combined", **options)
    log.write_fields(
        al.WANT_ACCESS, status=200, client_ip=b"192.0.2.1", method=b"GET", target=b"/",
        http_minor=1, referer=b"https://a.example/p?token=SEKRET&x=1", user_agent=b"ua",
    )  # fmt: skip
    line = stream.take().decode()
    assert "SEKRET" not in line and f" {expected} " in line


@pytest.mark.parametrize(
    ("entrypoint", "route"),
    [
        pytest.param("web", "api", id="plain names"),
        pytest.param("web", None, id="no route"),
        pytest.param('we"b\\', "r\u00e9\x01", id="escaped like any field"),
    ],
)
def test_names_fragment_is_what_the_line_would_hold(entrypoint: str, route: str | None) -> None:
    fragment = al.names_fragment(entrypoint, route)
    assert json.loads("{" + fragment.decode() + "}") == {"entrypoint": entrypoint, "route": route}
    with_fragment, without = al.LogStream(), al.LogStream()
    common = dict(status=200, client_ip=b"192.0.2.1", method=b"GET", target=b"/", http_minor=1)
    al.AccessLog(access=without).write_fields(
        al.WANT_ACCESS, entrypoint=entrypoint.encode(), route=route and route.encode(), **common
    )
    al.AccessLog(access=with_fragment).write_fields(al.WANT_ACCESS, names=fragment, **common)
    strip = re.compile(rb'"time":"[^"]*"')
    assert strip.sub(b"", with_fragment.take()) == strip.sub(b"", without.take())


def test_a_long_names_fragment_is_not_kept() -> None:
    assert al.names_fragment("e" * 600, "r") is None


@pytest.mark.parametrize("field", sorted(SAFE_FIELDS))
@pytest.mark.parametrize("value", [b'a"b', b"a\\b", b"a b", b"\xff", b"\x01"])
def test_fields_copied_without_escaping_must_be_safe(field: str, value: bytes) -> None:
    with pytest.raises(ValueError, match=field):
        al.AccessLog(access=al.LogStream()).write_fields(al.WANT_ACCESS, **{field: value})


def test_a_long_safe_field_is_cut_like_any_other() -> None:
    line = access(request_id=b"r" * 1000)
    assert line["request_id"] == "r" * MAX_VALUE_LOG + "..."


@pytest.mark.parametrize("value", ["backend", 'sv"c\\', "http://10.0.0.5:9000", "x" * 2000])
def test_preescaped_service_and_server_read_as_the_plain_fields(value: str) -> None:
    encoded = value.encode()
    pre = dict(service=al.json_string(value), server=al.json_string(value),
               preescaped=al.PRE_SERVICE | al.PRE_SERVER)  # fmt: skip
    for want in (al.WANT_ACCESS, al.WANT_SPAN):
        plain, escaped = al.LogStream(), al.LogStream()
        common = dict(status=200, method=b"GET", target=b"/", http_minor=1, trace_id=TRACE,
                      span_id=SPAN_ID, trace_sampled=True)  # fmt: skip
        al.AccessLog(access=plain, spans=plain).write_fields(
            want, service=encoded, server=encoded, **common
        )
        al.AccessLog(access=escaped, spans=escaped).write_fields(want, **pre, **common)
        strip = re.compile(rb'"time":"[^"]*"|"(start|end)TimeUnixNano":"\d+"')
        assert strip.sub(b"", escaped.take()) == strip.sub(b"", plain.take())
