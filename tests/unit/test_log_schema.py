"""The documented JSON Schema of access-log and audit lines (fastgate/logs/access-log.schema.json).

Rules these tests hold the schema to (the line formats are published in docs/logging.md):
- It is a valid draft 2020-12 schema, self-contained (every $ref resolves inside the file).
- Every key of each line type is required and no other key is allowed; the required lists
  are in the documented key order (the order the formatter writes).
- Good example lines, table-driven, are accepted; each bad line (a key missing, an extra
  key, a wrong type, a value outside its enum or pattern, a string over its length) is
  rejected, and the error points at the field that is wrong.
- When the C formatter (fastgate._core.accesslog) is built, the lines it writes validate.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "fastgate" / "logs" / "access-log.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
VALIDATOR = Draft202012Validator(SCHEMA)

# The documented key order of each line type.
ACCESS_KEYS = (
    "time", "type", "request_id", "trace_id", "span_id", "client_ip", "identity", "entrypoint",
    "route", "service", "server", "method", "path", "protocol", "status", "bytes_in",
    "bytes_out", "duration_ms", "upstream_ms", "rate_limit", "auth", "tls", "user_agent",
)  # fmt: skip
AUDIT_KEYS = (
    "time", "type", "event", "reason", "source", "request_id", "trace_id", "client_ip",
    "identity", "entrypoint", "route", "method", "path", "status", "tls", "user_agent",
)  # fmt: skip
DENY_EVENTS = ("auth_failed", "forbidden", "rate_limited", "ip_denied", "auth_unavailable")

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
RID = "5f0c7a1e9b2d4c3a0000000000000001"
ALICE = {"method": "jwt", "subject": "alice", "consumer": "acme"}

ACCESS: dict[str, Any] = {
    "time": "2026-11-28T05:00:03.123456Z",
    "type": "access",
    "request_id": RID,
    "trace_id": TID,
    "span_id": SID,
    "client_ip": "127.0.0.1",
    "identity": ALICE,
    "entrypoint": "web",
    "route": "api",
    "service": "backend",
    "server": "http://127.0.0.1:9000",
    "method": "GET",
    "path": "/x?a=1&token=REDACTED",
    "protocol": "HTTP/1.1",
    "status": 200,
    "bytes_in": 0,
    "bytes_out": 123,
    "duration_ms": 0.521,
    "upstream_ms": 0.412,
    "rate_limit": "allowed",
    "auth": "ok",
    "tls": "TLSv1.3",
    "user_agent": "curl/8.5.0",
}
AUDIT: dict[str, Any] = {
    "time": "2026-11-28T05:00:03.123456Z",
    "type": "audit",
    "event": "auth_failed",
    "reason": "bad signature",
    "source": "jwt",
    "request_id": RID,
    "trace_id": TID,
    "client_ip": "127.0.0.1",
    "identity": None,
    "entrypoint": "web",
    "route": "api",
    "method": "GET",
    "path": "/x?token=REDACTED",
    "status": 401,
    "tls": None,
    "user_agent": "curl/8.5.0",
}
# A 400 for a request whose head could not be read: everything about the request is null.
NO_HEAD = {
    "trace_id": None, "span_id": None, "identity": None, "route": None, "service": None,
    "server": None, "method": None, "path": None, "protocol": None, "status": 400,
    "upstream_ms": None, "rate_limit": None, "auth": None, "tls": None, "user_agent": None,
}  # fmt: skip


def line(base: dict[str, Any], **changes: Any) -> str:
    """`base` with `changes` (a value of `...` deletes the key), as the one-line JSON text the
    formatter writes (no spaces), with a trailing newline."""
    doc = copy.deepcopy(base)
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n"


def errors(text: str) -> list[str]:
    """The schema's complaints about one line (empty: valid)."""
    return [e.message for e in VALIDATOR.iter_errors(json.loads(text))]


# ---- the schema itself -----------------------------------------------------------------------


def test_is_a_valid_draft_2020_12_schema() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$id"] and SCHEMA["title"] and SCHEMA["description"]


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        pytest.param("access", ACCESS_KEYS, id="access"),
        pytest.param("audit", AUDIT_KEYS, id="audit"),
    ],
)
def test_every_key_required_in_documented_order(name: str, keys: tuple[str, ...]) -> None:
    sub = SCHEMA["$defs"][name]
    assert tuple(sub["required"]) == keys
    assert tuple(sub["properties"]) == keys
    assert sub["additionalProperties"] is False
    identity = SCHEMA["$defs"]["identity"]["oneOf"][1]
    assert identity["additionalProperties"] is False
    assert tuple(identity["required"]) == ("method", "subject", "consumer")


def test_examples_in_documented_key_order() -> None:
    # The example documents here are the documented lines: a typo in them would hide a gap.
    assert tuple(ACCESS) == ACCESS_KEYS and tuple(AUDIT) == AUDIT_KEYS


def test_every_ref_resolves() -> None:
    """Every $ref in the file points at a $defs entry (a dangling one only fails when a line
    reaches it, so check them all here)."""
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(SCHEMA)
    assert refs
    for ref in refs:
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in SCHEMA["$defs"], ref


# ---- lines the schema accepts ------------------------------------------------------------------


GOOD = [
    pytest.param(line(ACCESS), id="access: the documented example"),
    pytest.param(line(ACCESS, **NO_HEAD), id="access: 400 before a request head"),
    pytest.param(
        line(
            ACCESS,
            identity=None,
            auth=None,
            route=None,
            service=None,
            server=None,
            status=404,
            upstream_ms=None,
            rate_limit=None,
        ),
        id="access: 404 no route",
    ),
    pytest.param(
        line(ACCESS, status=0, bytes_out=0, upstream_ms=None, duration_ms=0.0),
        id="access: cut short (status 0)",
    ),
    pytest.param(
        line(ACCESS, status=429, rate_limit="limited", server=None, upstream_ms=None),
        id="access: rate limited",
    ),
    pytest.param(line(ACCESS, rate_limit="fallback"), id="access: fallback decision"),
    pytest.param(line(ACCESS, identity=None, auth="failed", status=401), id="access: auth failed"),
    pytest.param(line(ACCESS, auth="forbidden", status=403), id="access: forbidden"),
    pytest.param(
        line(ACCESS, identity=None, auth="unavailable", status=503), id="access: unavailable"
    ),
    pytest.param(
        line(ACCESS, identity={"method": "basic", "subject": "bob", "consumer": None}),
        id="access: identity without consumer",
    ),
    pytest.param(line(ACCESS, client_ip=""), id="access: client ip unknown"),
    pytest.param(line(ACCESS, client_ip="2001:db8::1"), id="access: IPv6 client"),
    pytest.param(line(ACCESS, request_id="client-7:a.b_c"), id="access: the client's request id"),
    pytest.param(line(ACCESS, request_id="r" * 128), id="access: 128-char request id"),
    pytest.param(
        line(ACCESS, protocol="HTTP/1.0", tls="TLSv1.2", method="POST", bytes_in=5),
        id="access: HTTP/1.0 POST over TLS 1.2",
    ),
    pytest.param(line(ACCESS, method="M-SEARCH"), id="access: extension method"),
    pytest.param(
        line(ACCESS, user_agent="u" * 512 + "..."), id="access: user agent cut at 512 + ..."
    ),
    pytest.param(line(ACCESS, path="/" + "p" * 2047 + "..."), id="access: path cut at 2048"),
    pytest.param(line(ACCESS, path='/caf\u00e9/\ufffd\u0001"'), id="access: escaped path"),
    pytest.param(line(ACCESS, duration_ms=12, upstream_ms=0), id="access: integral ms"),
    pytest.param(line(ACCESS, time="2026-12-31T23:59:60.000000Z"), id="access: leap second"),
    pytest.param(line(AUDIT), id="audit: auth_failed"),
    *[pytest.param(line(AUDIT, event=event), id=f"audit: {event}") for event in DENY_EVENTS[1:]],
    pytest.param(
        line(AUDIT, event="forbidden", status=403, identity=ALICE, reason="missing scope"),
        id="audit: forbidden with identity",
    ),
    pytest.param(
        line(AUDIT, event="rate_limited", status=429, reason=None, tls="TLSv1.3"),
        id="audit: rate limited, null reason",
    ),
    pytest.param(
        line(
            AUDIT,
            source=None,
            route=None,
            method=None,
            path=None,
            trace_id=None,
            user_agent=None,
            event="ip_denied",
            status=403,
        ),
        id="audit: nulls where allowed",
    ),
    pytest.param(
        line(
            AUDIT,
            event="tls_verify_failed",
            reason="certificate verify failed: unable to get local issuer certificate",
            source=None,
            request_id=None,
            trace_id=None,
            route=None,
            method=None,
            path=None,
            status=None,
            tls=None,
            user_agent=None,
        ),
        id="audit: tls_verify_failed from Python",
    ),
]


@pytest.mark.parametrize("text", GOOD)
def test_accepts(text: str) -> None:
    assert text.endswith("\n") and text.count("\n") == 1
    assert errors(text) == []


# ---- lines the schema rejects ------------------------------------------------------------------


BAD = [
    *[pytest.param(line(ACCESS, **{k: ...}), k, id=f"access: no {k}") for k in ACCESS_KEYS],
    *[pytest.param(line(AUDIT, **{k: ...}), k, id=f"audit: no {k}") for k in AUDIT_KEYS],
    pytest.param(line(ACCESS, extra=1), "extra", id="access: unknown key"),
    pytest.param(line(ACCESS, event="auth_failed"), "event", id="access: audit key"),
    pytest.param(line(AUDIT, service="backend"), "service", id="audit: access-only key"),
    pytest.param(line(ACCESS, type="span"), "type", id="unknown line type"),
    pytest.param(line(ACCESS, type=None), "type", id="null line type"),
    # time
    pytest.param(line(ACCESS, time="2026-11-28T05:00:03Z"), "time", id="time: no fraction"),
    pytest.param(line(ACCESS, time="2026-11-28T05:00:03.123Z"), "time", id="time: millis"),
    pytest.param(
        line(ACCESS, time="2026-11-28T05:00:03.123456+00:00"), "time", id="time: offset not Z"
    ),
    pytest.param(line(ACCESS, time="2026-11-28 05:00:03.123456Z"), "time", id="time: space"),
    pytest.param(line(ACCESS, time="2026-13-28T05:00:03.123456Z"), "time", id="time: month 13"),
    pytest.param(line(ACCESS, time="2026-11-28T24:00:03.123456Z"), "time", id="time: hour 24"),
    pytest.param(line(ACCESS, time=1764306003.123456), "time", id="time: a number"),
    # ids
    pytest.param(line(ACCESS, trace_id=TID.upper()), "trace_id", id="trace_id: uppercase"),
    pytest.param(line(ACCESS, trace_id=TID[:-1]), "trace_id", id="trace_id: 31 hex"),
    pytest.param(line(ACCESS, trace_id="0" * 32), "trace_id", id="trace_id: all zero"),
    pytest.param(line(ACCESS, span_id=TID), "span_id", id="span_id: 32 hex"),
    pytest.param(line(ACCESS, span_id="0" * 16), "span_id", id="span_id: all zero"),
    pytest.param(line(ACCESS, request_id=""), "request_id", id="request_id: empty"),
    pytest.param(line(ACCESS, request_id="a b"), "request_id", id="request_id: a space"),
    pytest.param(line(ACCESS, request_id="r" * 129), "request_id", id="request_id: 129 chars"),
    pytest.param(line(ACCESS, request_id=None), "request_id", id="access: request_id null"),
    # strings that are never null in an access line
    pytest.param(line(ACCESS, client_ip=None), "client_ip", id="client_ip: null"),
    pytest.param(line(ACCESS, entrypoint=None), "entrypoint", id="entrypoint: null"),
    pytest.param(line(ACCESS, entrypoint=""), "entrypoint", id="entrypoint: empty"),
    pytest.param(line(ACCESS, route=""), "route", id="route: empty"),
    # numbers
    pytest.param(line(ACCESS, status="200"), "status", id="status: a string"),
    pytest.param(line(ACCESS, status=True), "status", id="status: a boolean"),
    pytest.param(line(ACCESS, status=99), "status", id="status: 99"),
    pytest.param(line(ACCESS, status=600), "status", id="status: 600"),
    pytest.param(line(ACCESS, status=200.0 + 0.5), "status", id="status: fractional"),
    pytest.param(line(ACCESS, status=None), "status", id="access: status null"),
    pytest.param(line(ACCESS, bytes_in=-1), "bytes_in", id="bytes_in: negative"),
    pytest.param(line(ACCESS, bytes_out=1.5), "bytes_out", id="bytes_out: fractional"),
    pytest.param(line(ACCESS, bytes_out=None), "bytes_out", id="bytes_out: null"),
    pytest.param(line(ACCESS, duration_ms=-0.001), "duration_ms", id="duration: negative"),
    pytest.param(line(ACCESS, duration_ms="0.5"), "duration_ms", id="duration: a string"),
    pytest.param(line(ACCESS, duration_ms=None), "duration_ms", id="duration: null"),
    pytest.param(line(ACCESS, upstream_ms=-1), "upstream_ms", id="upstream_ms: negative"),
    # enums and patterns
    pytest.param(line(ACCESS, rate_limit="denied"), "rate_limit", id="rate_limit: unknown"),
    pytest.param(line(ACCESS, rate_limit="Limited"), "rate_limit", id="rate_limit: case"),
    pytest.param(line(ACCESS, auth="error"), "auth", id="auth: unknown"),
    pytest.param(line(ACCESS, auth="ok", identity=None), "identity", id="auth ok without identity"),
    pytest.param(line(ACCESS, protocol="HTTP/2"), "protocol", id="protocol: HTTP/2"),
    pytest.param(line(ACCESS, protocol="HTTP/1.2"), "protocol", id="protocol: HTTP/1.2"),
    pytest.param(line(ACCESS, protocol="http/1.1"), "protocol", id="protocol: lowercase"),
    pytest.param(line(ACCESS, method="GET /"), "method", id="method: not a token"),
    pytest.param(line(ACCESS, method=""), "method", id="method: empty"),
    pytest.param(line(ACCESS, method=None), "path", id="no method but a path"),
    pytest.param(line(ACCESS, tls="SSLv3"), "tls", id="tls: SSLv3"),
    pytest.param(line(ACCESS, tls="TLSv1.4"), "tls", id="tls: unknown version"),
    # identity
    pytest.param(line(ACCESS, identity="alice"), "identity", id="identity: a string"),
    pytest.param(
        line(ACCESS, identity={"method": "jwt", "subject": "alice"}),
        "identity",
        id="identity: no consumer key",
    ),
    pytest.param(
        line(ACCESS, identity={**ALICE, "scopes": ["a"]}), "identity", id="identity: extra key"
    ),
    pytest.param(
        line(ACCESS, identity={**ALICE, "subject": None}), "identity", id="identity: null subject"
    ),
    pytest.param(
        line(ACCESS, identity={**ALICE, "method": ""}), "identity", id="identity: empty method"
    ),
    pytest.param(
        line(ACCESS, identity={**ALICE, "subject": "s" * 516}),
        "identity",
        id="identity: subject over 512 + ...",
    ),
    # lengths
    pytest.param(line(ACCESS, user_agent="u" * 516), "user_agent", id="user_agent: too long"),
    pytest.param(line(ACCESS, path="/" + "p" * 2051), "path", id="path: too long"),
    # audit
    pytest.param(line(AUDIT, event="login"), "event", id="audit: unknown event"),
    pytest.param(line(AUDIT, event=None), "event", id="audit: null event"),
    *[
        pytest.param(line(AUDIT, event=event, **{key: None}), key, id=f"audit {event}: {key} null")
        for event in ("auth_failed", "rate_limited")
        for key in ("request_id", "entrypoint", "status")
    ],
    pytest.param(line(AUDIT, reason="r" * 516), "reason", id="audit: reason too long"),
    pytest.param(line(AUDIT, source=""), "source", id="audit: empty source"),
    pytest.param(line(AUDIT, status=99), "status", id="audit: status 99"),
    pytest.param(line(AUDIT, client_ip=None), "client_ip", id="audit: client_ip null"),
    pytest.param(line(AUDIT, type="access"), "span_id", id="audit keys under type access"),
    pytest.param(line(ACCESS, type="audit"), "event", id="access keys under type audit"),
]


@pytest.mark.parametrize(("text", "field"), BAD)
def test_rejects(text: str, field: str) -> None:
    doc = json.loads(text)
    found = list(VALIDATOR.iter_errors(doc))
    assert found, f"accepted a bad line: {text}"
    # The complaint names the wrong field: in its path, or (missing/extra keys, and the
    # cross-field rules) in its message.
    where = {str(p) for e in found for p in (*e.absolute_path, *_context_paths(e))}
    messages = " ".join(e.message for e in found) + " " + best_match(found).message
    assert field in where or repr(field) in messages or field in messages, (where, messages)


def _context_paths(error: Any) -> list[Any]:
    """The paths of the sub-errors of a oneOf/anyOf/if-then failure."""
    out: list[Any] = []
    for sub in error.context or ():
        out += [*sub.absolute_path, *_context_paths(sub)]
    return out


# ---- the C formatter's own lines -----------------------------------------------------------


def _accesslog() -> Any:
    """fastgate._core.accesslog (compiled: part of the build, never skipped)."""
    from fastgate._core import accesslog

    return accesslog


FIELDS: dict[str, Any] = {
    "status": 200, "req_bytes": 0, "resp_bytes": 512, "duration_ns": 1_234_567,
    "upstream_ns": 1_000_000, "rate": 1, "deny": 0, "request_id": RID.encode(),
    "trace_id": TID.encode(), "span_id": SID.encode(), "parent_span_id": None,
    "client_ip": b"127.0.0.1", "id_method": b"jwt", "id_subject": b"alice",
    "id_consumer": None, "entrypoint": b"web", "route": b"api", "service": b"backend",
    "server": b"http://127.0.0.1:9000", "method": b"GET", "target": b"/x?token=SEKRET&a=1",
    "http_minor": 1, "user_agent": b"curl/8.5.0", "referer": None, "tls_version": None,
    "deny_source": None, "deny_reason": None, "trace_sampled": False,
}  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({}, id="a proxied request"),
        pytest.param(
            {
                "method": None,
                "target": None,
                "http_minor": -1,
                "route": None,
                "service": None,
                "server": None,
                "trace_id": None,
                "span_id": None,
                "id_method": None,
                "id_subject": None,
                "user_agent": None,
                "upstream_ns": None,
                "status": 400,
                "rate": 0,
            },
            id="no request head",
        ),
        pytest.param(
            {
                "deny": 1,
                "status": 401,
                "id_method": None,
                "id_subject": None,
                "deny_source": b"jwt",
                "deny_reason": b"bad signature",
                "upstream_ns": None,
                "server": None,
            },
            id="auth failed",
        ),
        pytest.param(
            {
                "deny": 3,
                "status": 429,
                "rate": 3,
                "deny_source": b"rl",
                "deny_reason": b"limit 0 exceeded",
                "upstream_ns": None,
                "server": None,
            },
            id="rate limited",
        ),
        pytest.param(
            {
                "status": 0,
                "resp_bytes": 0,
                "upstream_ns": None,
                "tls_version": b"TLSv1.3",
                "user_agent": b'\xff\x00"' * 400,
                "target": b"/" + b"\xc3\xa9" * 1500,
            },
            id="cut short, long and odd bytes",
        ),
    ],
)
def test_formatter_lines_validate(changes: dict[str, Any]) -> None:
    accesslog = _accesslog()
    access, audit = accesslog.LogStream(), accesslog.LogStream()
    alog = accesslog.AccessLog(access=access, audit=audit, redact=["token"])
    fields = {**FIELDS, **changes}
    # select() asks for the audit stream only for a refusal; write() writes what it is asked.
    want = accesslog.WANT_ACCESS | (accesslog.WANT_AUDIT if fields["deny"] else 0)
    alog.write_fields(want, **fields)
    lines = (access.take() + audit.take()).decode().splitlines()
    assert len(lines) == (2 if changes.get("deny") else 1)
    for text in lines:
        doc = json.loads(text)
        assert [e.message for e in VALIDATOR.iter_errors(doc)] == [], text
        assert tuple(doc) == (ACCESS_KEYS if doc["type"] == "access" else AUDIT_KEYS)
        assert "SEKRET" not in text
