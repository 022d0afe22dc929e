"""The authorize middleware: each condition (scopes, roles, groups, claims, auth methods),
per-method rules, consumers, anonymous requests (401 vs allow_anonymous), dry-run, what the
403 body says and what is noted on the connection for the audit line, and option errors with
key paths."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from fastgate._core.accesslog import DENY_AUTH_FAILED, DENY_FORBIDDEN
from fastgate._core.httphead import parse_request
from fastgate.errors import ConfigError
from fastgate.middleware.authorize import Authorize
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import build


class Conn:
    """The bits of a client connection a middleware may touch."""

    client_ip = "127.0.0.9"
    request_id = b"0123456789abcdef0123456789abcdef"

    def __init__(self) -> None:
        self.upstream: list[bytes] = []
        self.denies: list[tuple[int, str, str]] = []

    def add_upstream_headers(self, lines: bytes) -> None:
        self.upstream.append(lines)

    def note_deny(self, event: int, source: str, reason: str) -> None:
        self.denies.append((event, source, reason))


def ident(
    *,
    method: str = "jwt",
    consumer: str | None = None,
    scopes: tuple[str, ...] = (),
    roles: tuple[str, ...] = (),
    groups: tuple[str, ...] = (),
    **claims: Any,
) -> Identity:
    return Identity(
        method=method,
        subject="alice",
        consumer=consumer,
        scopes=frozenset(scopes),
        roles=frozenset(roles),
        groups=frozenset(groups),
        claims=tuple(claims.items()),
    )


def request(identity: Identity | None, method: str = "GET") -> RequestContext:
    raw = f"{method} /orders/7 HTTP/1.1\r\nHost: api.test\r\n\r\n".encode()
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=Conn(), head=head, identity=identity)


def decide(options: dict[str, Any], identity: Identity | None, method: str = "GET") -> Any:
    """None when admitted, else the reply's status."""
    ctx = request(identity, method)
    reply = Authorize(options, "authz").on_request(ctx)
    assert ctx.identity is identity  # authorize reads the identity, never replaces it
    assert ctx.conn.upstream == []
    if reply is None:
        return None
    assert isinstance(reply, LocalReply)
    return reply.status


def reason_of(options: dict[str, Any], identity: Identity | None, method: str = "GET") -> str:
    """The single denial reason counted for one request."""
    mw = Authorize(options, "authz")
    mw.on_request(request(identity, method))
    (reason,) = mw.stats()["denials"]
    return reason


# ---- conditions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, identity, expected",
    [
        pytest.param({}, ident(), None, id="no conditions admits any identity"),
        pytest.param({"scopes": ["a", "b"]}, ident(scopes=("a", "b", "c")), None, id="scopes all"),
        pytest.param({"scopes": ["a", "b"]}, ident(scopes=("a",)), 403, id="scopes one missing"),
        pytest.param({"scopes": []}, ident(), None, id="empty list is no condition"),
        pytest.param({"roles_any": ["x", "y"]}, ident(roles=("y",)), None, id="roles any hit"),
        pytest.param({"roles_any": ["x", "y"]}, ident(roles=("z",)), 403, id="roles any miss"),
        pytest.param({"roles_all": ["x", "y"]}, ident(roles=("x", "y")), None, id="roles all"),
        pytest.param({"roles_all": ["x", "y"]}, ident(roles=("x",)), 403, id="roles all miss"),
        pytest.param({"roles_any": ["x"]}, ident(groups=("x",)), 403, id="a group is no role"),
        pytest.param({"groups_any": ["ops"]}, ident(groups=("ops",)), None, id="groups any"),
        pytest.param({"groups_any": ["ops"]}, ident(groups=()), 403, id="groups any miss"),
        pytest.param({"groups_all": ["a", "b"]}, ident(groups=("b", "a")), None, id="groups all"),
        pytest.param({"groups_all": ["a", "b"]}, ident(groups=("b",)), 403, id="groups all miss"),
        pytest.param({"scopes": ["s"]}, ident(roles=("s",)), 403, id="a role is no scope"),
        pytest.param({"methods": ["mtls"]}, ident(method="mtls"), None, id="auth method in set"),
        pytest.param({"methods": ["mtls"]}, ident(method="jwt"), 403, id="auth method not in set"),
        pytest.param(
            {"scopes": ["r"], "roles_any": ["admin"], "methods": ["jwt"]},
            ident(scopes=("r",), roles=("admin",)),
            None,
            id="all conditions hold",
        ),
        pytest.param(
            {"scopes": ["r"], "roles_any": ["admin"]},
            ident(scopes=("r",)),
            403,
            id="one of several conditions fails",
        ),
    ],
)
def test_conditions(rule: dict[str, Any], identity: Identity, expected: int | None) -> None:
    assert decide({"require": rule}, identity) == expected


@pytest.mark.parametrize(
    "claim, identity, expected",
    [
        pytest.param({"equals": "acme"}, ident(tenant="acme"), None, id="equals string"),
        pytest.param({"equals": "acme"}, ident(tenant="other"), 403, id="equals other string"),
        pytest.param({"equals": "acme"}, ident(), 403, id="claim missing"),
        pytest.param({"equals": "acme"}, ident(tenant=None), 403, id="claim null"),
        pytest.param({"equals": 42}, ident(tenant=42), None, id="equals number"),
        pytest.param({"equals": 42}, ident(tenant=42.0), None, id="int equals float"),
        pytest.param({"equals": 42}, ident(tenant="42"), 403, id="string is not a number"),
        pytest.param({"equals": "42"}, ident(tenant=42), 403, id="number is not a string"),
        pytest.param({"equals": True}, ident(tenant=True), None, id="equals true"),
        pytest.param({"equals": True}, ident(tenant=1), 403, id="1 is not true"),
        pytest.param({"equals": 1}, ident(tenant=True), 403, id="true is not 1"),
        pytest.param({"equals": "a"}, ident(tenant={"a": 1}), 403, id="object never equals"),
        pytest.param({"equals": "b"}, ident(tenant=["a", "b"]), None, id="list holds an item"),
        pytest.param({"equals": "c"}, ident(tenant=["a", "b"]), 403, id="list lacks the item"),
        pytest.param({"equals": "a"}, ident(tenant=[["a"]]), 403, id="nested list never"),
        pytest.param({"in": ["a", "b"]}, ident(tenant="b"), None, id="in hit"),
        pytest.param({"in": ["a", "b"]}, ident(tenant="c"), 403, id="in miss"),
        pytest.param({"in": [1, "x"]}, ident(tenant=1), None, id="in mixed types"),
        pytest.param({"in": [1, "x"]}, ident(tenant="1"), 403, id="in typed miss"),
        pytest.param({"in": ["a"]}, ident(tenant=["z", "a"]), None, id="in with list claim"),
        pytest.param({"matches": "acme-[0-9]+"}, ident(tenant="acme-12"), None, id="matches"),
        pytest.param(
            {"matches": "acme-[0-9]+"}, ident(tenant="acme-12x"), 403, id="matches is full match"
        ),
        pytest.param(
            {"matches": "acme-[0-9]+"}, ident(tenant="xacme-12"), 403, id="matches is anchored"
        ),
        pytest.param({"matches": "[0-9]+"}, ident(tenant=12), 403, id="matches strings only"),
        pytest.param({"matches": "a.*"}, ident(tenant=[1, "abc"]), None, id="matches a list item"),
    ],
)
def test_claims(claim: dict[str, Any], identity: Identity, expected: int | None) -> None:
    assert decide({"require": {"claims": {"tenant": claim}}}, identity) == expected


def test_all_claims_must_hold() -> None:
    rule = {"require": {"claims": {"tenant": {"equals": "acme"}, "tier": {"in": ["gold"]}}}}
    assert decide(rule, ident(tenant="acme", tier="gold")) is None
    assert decide(rule, ident(tenant="acme", tier="silver")) == 403


# ---- which rule applies -----------------------------------------------------------------------

PER_METHOD = {
    "require": {"scopes": ["base"]},
    "methods": {"GET": {"scopes": ["read"]}, "post": {"scopes": ["write"]}},
}
WITH_DEFAULT = {**PER_METHOD, "methods": {**PER_METHOD["methods"], "*": {"scopes": ["other"]}}}


@pytest.mark.parametrize(
    "options, method, scopes, expected",
    [
        pytest.param(PER_METHOD, "GET", ("read",), None, id="GET rule"),
        pytest.param(PER_METHOD, "GET", ("base",), 403, id="GET rule replaces require"),
        pytest.param(PER_METHOD, "POST", ("write",), None, id="lowercase key is uppercased"),
        pytest.param(PER_METHOD, "POST", ("read",), 403, id="POST needs write"),
        pytest.param(PER_METHOD, "DELETE", ("base",), None, id="unlisted method uses require"),
        pytest.param(PER_METHOD, "DELETE", ("read", "write"), 403, id="require still applies"),
        pytest.param(PER_METHOD, "HEAD", ("read",), None, id="HEAD uses the GET rule"),
        pytest.param(PER_METHOD, "HEAD", ("base",), 403, id="HEAD is not open by default"),
        pytest.param(PER_METHOD, "get", ("base",), 403, id="lowercase request method"),
        pytest.param(PER_METHOD, "get", ("read",), None, id="lowercase request method, GET rule"),
        pytest.param(WITH_DEFAULT, "PUT", ("other",), None, id="star rule for other methods"),
        pytest.param(WITH_DEFAULT, "PUT", ("base",), 403, id="star rule replaces require"),
        pytest.param(WITH_DEFAULT, "GET", ("read",), None, id="listed method beats star"),
        pytest.param(
            {"methods": {"GET": {"scopes": ["read"]}}}, "PUT", (), None, id="no rule admits"
        ),
        pytest.param(
            {"methods": {"GET": {}, "HEAD": {"scopes": ["h"]}}},
            "HEAD",
            (),
            403,
            id="listed HEAD has its own rule",
        ),
    ],
)
def test_rule_by_method(
    options: dict[str, Any], method: str, scopes: tuple[str, ...], expected: int | None
) -> None:
    assert decide(options, ident(scopes=scopes), method) == expected


@pytest.mark.parametrize(
    "consumers, consumer, expected",
    [
        pytest.param({"allow": ["shop", "billing"]}, "shop", None, id="allowed consumer"),
        pytest.param({"allow": ["shop"]}, "other", 403, id="consumer not in allow"),
        pytest.param({"allow": ["shop"]}, None, 403, id="no consumer, allow list"),
        pytest.param({"deny": ["legacy"]}, "legacy", 403, id="denied consumer"),
        pytest.param({"deny": ["legacy"]}, "shop", None, id="not denied"),
        pytest.param({"deny": ["legacy"]}, None, None, id="no consumer, deny list"),
        pytest.param({"allow": ["a"], "deny": ["a"]}, "a", 403, id="deny wins over allow"),
        pytest.param({"allow": []}, "x", None, id="empty allow is no condition"),
    ],
)
def test_consumers(consumers: dict[str, Any], consumer: str | None, expected: int | None) -> None:
    assert decide({"consumers": consumers}, ident(consumer=consumer)) == expected
    # Consumers apply to per-method rules too, before them.
    options = {"consumers": consumers, "methods": {"GET": {}}}
    assert decide(options, ident(consumer=consumer)) == expected


# ---- anonymous requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, expected",
    [
        pytest.param({}, 401, id="no identity -> 401"),
        pytest.param({"require": {"scopes": ["r"]}}, 401, id="401 before any rule"),
        pytest.param({"allow_anonymous": True}, None, id="allowed, no conditions"),
        pytest.param(
            {"allow_anonymous": True, "require": {}}, None, id="allowed, empty rule admits"
        ),
        pytest.param(
            {"allow_anonymous": True, "require": {"scopes": ["r"]}}, 403, id="allowed, scope rule"
        ),
        pytest.param(
            {"allow_anonymous": True, "require": {"claims": {"t": {"equals": "x"}}}},
            403,
            id="allowed, claim rule",
        ),
        pytest.param(
            {"allow_anonymous": True, "require": {"methods": ["jwt"]}},
            403,
            id="allowed, auth method rule",
        ),
        pytest.param(
            {"allow_anonymous": True, "methods": {"GET": {}}, "require": {"scopes": ["r"]}},
            None,
            id="allowed, open GET rule",
        ),
        pytest.param(
            {"allow_anonymous": True, "consumers": {"allow": ["shop"]}},
            403,
            id="allowed, consumer allow list",
        ),
        pytest.param(
            {"allow_anonymous": True, "consumers": {"deny": ["legacy"]}},
            None,
            id="allowed, deny list names nobody anonymous",
        ),
    ],
)
def test_anonymous(options: dict[str, Any], expected: int | None) -> None:
    assert decide(options, None) == expected


def test_401_reply_has_a_bearer_challenge() -> None:
    reply = Authorize({}, "authz").on_request(request(None))
    assert isinstance(reply, LocalReply) and reply.status == 401
    assert dict(reply.headers) == {"WWW-Authenticate": 'Bearer realm="fastgate"'}
    assert json.loads(reply.body) == {"error": "authentication required"}


# ---- what is said where -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, identity, method, reason",
    [
        pytest.param(
            {"methods": {"POST": {"scopes": ["orders:write", "orders:read"]}}},
            ident(scopes=("orders:read",)),
            "POST",
            "missing scope orders:write",
            id="scope",
        ),
        pytest.param(
            {"require": {"roles_any": ["support", "admin"]}},
            ident(roles=("guest",)),
            "GET",
            "missing role (any of admin, support)",
            id="roles any",
        ),
        pytest.param(
            {"require": {"groups_all": ["ops", "eng"]}},
            ident(groups=("eng",)),
            "GET",
            "missing group ops",
            id="groups all",
        ),
        pytest.param(
            {"require": {"claims": {"tenant": {"equals": "acme"}}}},
            ident(tenant="evil"),
            "GET",
            "claim tenant mismatch",
            id="claim mismatch",
        ),
        pytest.param(
            {"require": {"claims": {"tenant": {"equals": "acme"}}}},
            ident(),
            "GET",
            "claim tenant missing",
            id="claim missing",
        ),
        pytest.param(
            {"require": {"methods": ["mtls"]}},
            ident(method="jwt"),
            "GET",
            "auth method not allowed",
            id="auth method",
        ),
        pytest.param(
            {"consumers": {"deny": ["legacy"]}},
            ident(consumer="legacy"),
            "GET",
            "consumer denied",
            id="consumer denied",
        ),
        pytest.param(
            {"consumers": {"allow": ["shop"]}},
            ident(consumer="evil-corp"),
            "GET",
            "consumer not allowed",
            id="consumer not allowed (the name is not in the reason)",
        ),
        pytest.param({}, None, "GET", "no identity", id="no identity"),
    ],
)
def test_reason_goes_to_audit_not_body(
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    identity: Identity | None,
    method: str,
    reason: str,
) -> None:
    mw = Authorize(options, "authz")
    ctx = request(identity, method)
    with caplog.at_level("DEBUG"):
        reply = mw.on_request(ctx)
    assert isinstance(reply, LocalReply)
    status = 401 if identity is None else 403
    assert reply.status == status
    # The body is a fixed phrase per status: nothing of the rule or the identity leaks.
    body = {403: {"error": "forbidden"}, 401: {"error": "authentication required"}}[status]
    assert json.loads(reply.body) == body
    # The reason goes to the connection, which writes the audit line (route, client, method,
    # path, request id, identity come from the exchange there).
    event = DENY_FORBIDDEN if status == 403 else DENY_AUTH_FAILED
    assert ctx.conn.denies == [(event, "authz", reason)]
    assert caplog.records == []
    assert mw.stats()["denials"] == {reason: 1}
    assert mw.route_failures == {("", reason): 1}  # the head has no route here


def test_denials_are_counted_by_reason() -> None:
    mw = Authorize({"require": {"scopes": ["r"]}, "consumers": {"deny": ["x"]}}, "authz")
    for identity in (ident(), ident(), ident(consumer="x"), ident(scopes=("r",)), None):
        mw.on_request(request(identity))
    assert mw.stats() == {
        "dry_run": False,
        "denials": {"missing scope r": 2, "consumer denied": 1, "no identity": 1},
    }


@pytest.mark.parametrize(
    "options, identity, reason, status",
    [
        pytest.param(
            {"require": {"scopes": ["admin"]}},
            ident(),
            "dry_run: missing scope admin",
            403,
            id="would be 403",
        ),
        pytest.param({}, None, "dry_run: no identity", 401, id="would be 401"),
    ],
)
def test_dry_run_admits_and_logs(
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    identity: Identity | None,
    reason: str,
    status: int,
) -> None:
    mw = Authorize({**options, "dry_run": True}, "authz")
    ctx = request(identity)
    with caplog.at_level(logging.INFO, logger="fastgate.authorize"):
        assert mw.on_request(ctx) is None
    assert ctx.conn.denies == []  # a dry-run denial is no refusal: no audit line
    (record,) = [r for r in caplog.records if r.name == "fastgate.authorize"]
    text = record.getMessage()
    assert f"would deny {status}" in text and text.endswith(f"by authz: {reason}")
    assert "client=127.0.0.9 GET /orders/7" in text
    assert mw.stats() == {"dry_run": True, "denials": {reason: 1}}


def test_dry_run_admitted_request_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    mw = Authorize({"require": {"scopes": ["r"]}, "dry_run": True}, "authz")
    ctx = request(ident(scopes=("r",)))
    with caplog.at_level(logging.INFO, logger="fastgate.authorize"):
        assert mw.on_request(ctx) is None
    assert caplog.records == [] and ctx.conn.denies == []
    assert mw.stats()["denials"] == {}


def test_connection_without_note_deny_still_refuses() -> None:
    head, _ = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    mw = Authorize({"require": {"scopes": ["r"]}}, "authz")
    for conn in (None, object()):
        reply = mw.on_request(RequestContext(conn=conn, head=head, identity=ident()))
        assert isinstance(reply, LocalReply) and reply.status == 403
    assert mw.stats()["denials"] == {"missing scope r": 2}


def test_registered_under_its_type() -> None:
    mw = build("authz", "authorize", {"require": {"scopes": ["r"]}})
    assert isinstance(mw, Authorize)
    assert mw.on_request(request(ident(scopes=("r",)))) is None


def test_decision_is_synchronous() -> None:
    # Never a coroutine: the allow path returns None, the deny path a LocalReply, directly.
    mw = Authorize({"require": {"scopes": ["r"]}}, "authz")
    assert mw.on_request(request(ident(scopes=("r",)))) is None
    assert isinstance(mw.on_request(request(ident())), LocalReply)


# ---- option errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path, reason",
    [
        pytest.param(
            {"require": {"claims": {"tenant": {"matches": "acme-("}}}},
            "require.claims.tenant.matches",
            "not a valid regular expression: missing ), unterminated subpattern at position 5",
            id="bad regex",
        ),
        pytest.param(
            {"require": {"scope": ["r"]}},
            "require.scope",
            "unknown key; did you mean 'scopes'?",
            id="unknown condition key",
        ),
        pytest.param(
            {"methods": {"GET": {"roles": ["r"]}}},
            "methods.GET.roles",
            "unknown key; did you mean 'roles_any'?",
            id="unknown key in a method rule",
        ),
        pytest.param(
            {"requires": {}},
            "requires",
            "unknown key; did you mean 'require'?",
            id="unknown top-level key",
        ),
        pytest.param(
            {"consumers": {"alow": ["a"]}},
            "consumers.alow",
            "unknown key; did you mean 'allow'?",
            id="unknown consumers key",
        ),
        pytest.param(
            {"require": {"claims": {"t": {"equal": "a"}}}},
            "require.claims.t.equal",
            "unknown key; did you mean 'equals'?",
            id="unknown claim operator",
        ),
        pytest.param(
            {"require": {"claims": {"t": {"equals": "a", "in": ["b"]}}}},
            "require.claims.t",
            "expected exactly one of equals, in, matches",
            id="two claim operators",
        ),
        pytest.param(
            {"require": {"claims": {"t": {}}}},
            "require.claims.t",
            "expected exactly one of equals, in, matches",
            id="no claim operator",
        ),
        pytest.param(
            {"require": {"claims": {"t": {"equals": None}}}},
            "require.claims.t.equals",
            "expected a string, a number or true/false",
            id="claim equals null",
        ),
        pytest.param(
            {"require": {"claims": {"t": {"in": ["a", {"b": 1}]}}}},
            "require.claims.t.in[1]",
            "expected a string, a number or true/false",
            id="claim in with an object",
        ),
        pytest.param(
            {"require": {"claims": {"t": {"in": []}}}},
            "require.claims.t.in",
            "List should have at least 1 item after validation, not 0",
            id="claim in empty",
        ),
        pytest.param(
            {"require": {"scopes": ["ok", 5]}},
            "require.scopes[1]",
            "Input should be a valid string (got 5)",
            id="scope not a string",
        ),
        pytest.param(
            {"require": {"roles_any": "admin"}},
            "require.roles_any",
            "Input should be a valid list (got 'admin')",
            id="roles not a list",
        ),
        pytest.param(
            {"require": {"methods": ["jwt", "POST"]}},
            "require.methods[1]",
            "'POST' is an HTTP method: list auth methods here (jwt, mtls, ...) and put "
            "per-HTTP-method rules under the top-level `methods`",
            id="HTTP method in auth methods",
        ),
        pytest.param(
            {"methods": {"GE T": {}}},
            "methods['GE T']",
            "not a valid HTTP method name",
            id="method not a token",
        ),
        pytest.param(
            {"methods": {"get": {}, "GET": {}}},
            "methods.GET",
            "same method as get",
            id="method twice",
        ),
        pytest.param(
            {"allow_anonymous": "yes"},
            "allow_anonymous",
            "Input should be a valid boolean (got 'yes')",
            id="allow_anonymous not a bool",
        ),
        pytest.param(
            {"dry_run": 1},
            "dry_run",
            "Input should be a valid boolean (got 1)",
            id="dry_run not a bool",
        ),
        pytest.param(["require"], "", "expected a mapping of options", id="not a mapping"),
    ],
)
def test_option_errors(options: Any, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        Authorize(options, "authz")
    assert info.value.errors == [(path, reason)]


def test_option_errors_are_all_listed() -> None:
    with pytest.raises(ConfigError) as info:
        Authorize({"require": {"scopez": [], "claims": {"a": {"matches": "("}}}}, "authz")
    assert {p for p, _ in info.value.errors} == {"require.scopez", "require.claims.a.matches"}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(None, id="no options"),
        pytest.param({}, id="empty mapping"),
        pytest.param(
            {
                "require": {
                    "scopes": [],
                    "roles_any": [],
                    "roles_all": [],
                    "groups_any": [],
                    "groups_all": [],
                    "claims": {},
                    "methods": [],
                },
                "methods": {"*": {}},
                "consumers": {"allow": [], "deny": []},
            },
            id="every list empty",
        ),
    ],
)
def test_options_without_conditions_only_require_an_identity(options: Any) -> None:
    mw = Authorize(options, "authz")
    assert mw.on_request(request(ident())) is None
    reply = mw.on_request(request(None))
    assert isinstance(reply, LocalReply) and reply.status == 401
