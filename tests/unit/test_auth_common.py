"""fastgate.auth.common: identity headers (validated, header-safe, client copies owned),
optional auth, refusals noted on the connection (the audit line's facts, never a credential),
option parsing with key paths."""

from __future__ import annotations

from typing import Any

import pytest

from fastgate._core.accesslog import DENY_AUTH_FAILED, DENY_AUTH_UNAVAILABLE, DENY_FORBIDDEN
from fastgate._core.httphead import parse_request
from fastgate.auth.common import (
    AuthCommon,
    AuthOptions,
    encode_identity_headers,
    parse_options,
)
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext

ALICE = Identity(
    method="jwt",
    subject="alice",
    consumer="shop",
    scopes=frozenset({"b", "a"}),
    groups=frozenset(),
    claims=(("email", "alice@example.org"), ("admin", True), ("nested", {"x": 1})),
)


class Conn:
    """What AuthCommon uses of a client connection; it records the refusals noted on it."""

    client_ip = "192.0.2.9"
    request_id = b"rid-1"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.denies: list[tuple[int, str, str]] = []

    def add_upstream_headers(self, lines: bytes) -> None:
        self.lines.append(lines)

    def note_deny(self, event: int, source: str, reason: str) -> None:
        self.denies.append((event, source, reason))


def ctx(path: bytes = b"/orders?id=1") -> RequestContext:
    head, _ = parse_request(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None
    return RequestContext(conn=Conn(), head=head)


@pytest.mark.parametrize(
    "source, expected",
    [
        pytest.param("subject", b"X-V: alice\r\n", id="subject"),
        pytest.param("consumer", b"X-V: shop\r\n", id="consumer"),
        pytest.param("method", b"X-V: jwt\r\n", id="method"),
        pytest.param("scopes", b"X-V: a,b\r\n", id="set sorted, comma-joined"),
        pytest.param("groups", b"", id="empty set leaves the header out"),
        pytest.param("claim:email", b"X-V: alice@example.org\r\n", id="claim"),
        pytest.param("claim:admin", b"X-V: true\r\n", id="boolean claim"),
        pytest.param("claim:nested", b"", id="structured claim not flattened"),
        pytest.param("claim:absent", b"", id="absent claim left out"),
    ],
)
def test_identity_header_values(source: str, expected: bytes) -> None:
    assert encode_identity_headers((("X-V", source),), ALICE) == expected


@pytest.mark.parametrize(
    "subject, expected",
    [
        pytest.param("a\r\nX-Admin: 1", b"", id="CRLF injection drops the header"),
        pytest.param("a\x00b", b"", id="NUL drops the header"),
        pytest.param("a\tb", b"X-V: a\tb\r\n", id="HTAB is allowed"),
        pytest.param("Zoë", b"X-V: Zo\xeb\r\n", id="latin-1 kept as is"),
        pytest.param("名前", b"X-V: %E5%90%8D%E5%89%8D\r\n", id="other text percent-encoded"),
    ],
)
def test_identity_header_values_are_header_safe(subject: str, expected: bytes) -> None:
    identity = Identity(method="jwt", subject=subject)
    assert encode_identity_headers((("X-V", "subject"),), identity) == expected


@pytest.mark.parametrize(
    "options, path, reason",
    [
        pytest.param({"forward_headers": ["X-User"]}, "forward_headers", "mapping", id="list"),
        pytest.param(
            {"forward_headers": {"X User": "subject"}},
            "X User",
            "header name",
            id="bad header name",
        ),
        pytest.param(
            {"forward_headers": {"Host": "subject"}}, "Host", "gateway owns", id="reserved header"
        ),
        pytest.param(
            {"forward_headers": {"X-Request-ID": "subject"}},
            "X-Request-ID",
            "gateway owns",
            id="request id is the gateway's",
        ),
        pytest.param(
            {"forward_headers": {"X-U": "password"}}, "X-U", "expected one of", id="unknown source"
        ),
        pytest.param(
            {"forward_headers": {"X-U": "claim:"}},
            "X-U",
            "expected one of",
            id="claim without a name",
        ),
        pytest.param(
            {"hide_credentials": "yes"},
            "hide_credentials",
            "true or false",
            id="hide_credentials not a boolean",
        ),
        pytest.param({"optional": 1}, "optional", "true or false", id="optional not a boolean"),
    ],
)
def test_bad_common_options(options: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        AuthCommon(options, "mw", "jwt_auth", ("authorization",))
    (where, why), *_ = err.value.errors
    assert where.startswith("middlewares.mw.") and where.endswith(path)
    assert reason in why


@pytest.mark.parametrize(
    "options, owned",
    [
        pytest.param({}, (), id="nothing owned by default"),
        pytest.param(
            {"forward_headers": {"X-User": "subject"}}, (b"x-user",), id="forwarded headers owned"
        ),
        pytest.param({"hide_credentials": True}, (b"authorization",), id="hidden credential"),
        pytest.param(
            {"forward_headers": {"Authorization": "subject"}, "hide_credentials": True},
            (b"authorization",),
            id="listed once",
        ),
    ],
)
def test_owned_headers(options: dict[str, Any], owned: tuple[bytes, ...]) -> None:
    common = AuthCommon(options, "mw", "jwt_auth", ("Authorization",))
    assert common.strip_request_headers == owned


def test_admit_sets_identity_and_upstream_lines() -> None:
    common = AuthCommon({"forward_headers": {"X-User": "subject"}}, "mw", "jwt_auth")
    c = ctx()
    common.admit(c, ALICE)
    assert c.identity is ALICE
    assert c.conn.lines == [b"X-User: alice\r\n"]
    # Cached lines are used as given (no recomputation).
    c2 = ctx()
    common.admit(c2, ALICE, b"X-User: cached\r\n")
    assert c2.conn.lines == [b"X-User: cached\r\n"]


def test_optional_skip_and_missing() -> None:
    reply = LocalReply.error(401, "missing")
    required = AuthCommon({}, "mw", "jwt_auth")
    optional = AuthCommon({"optional": True}, "mw", "jwt_auth")
    c = ctx()
    assert required.missing(c, reply) is reply
    assert required.failures["missing credentials"] == 1
    assert optional.missing(c, reply) is None
    assert not optional.skip(c)
    c.identity = ALICE
    assert optional.skip(c) and not required.skip(c)


@pytest.mark.parametrize(
    "status, event",
    [
        pytest.param(401, DENY_AUTH_FAILED, id="401 is an auth failure"),
        pytest.param(302, DENY_AUTH_FAILED, id="a relayed redirect to a login is one too"),
        pytest.param(403, DENY_FORBIDDEN, id="a relayed 403 is forbidden"),
        pytest.param(503, DENY_AUTH_UNAVAILABLE, id="503: fail closed, auth unavailable"),
        pytest.param(500, DENY_AUTH_UNAVAILABLE, id="any 5xx is unavailable"),
    ],
)
def test_refusal_is_counted_and_noted_on_the_connection(
    status: int, event: int, caplog: pytest.LogCaptureFixture
) -> None:
    common = AuthCommon({}, "keys", "api_key")
    c = ctx()
    with caplog.at_level("DEBUG"):
        reply = common.refuse(c, "invalid api key", LocalReply.error(status, "no"))
    assert reply.status == status and common.failures == {"invalid api key": 1}
    assert common.route_failures == {("", "invalid api key"): 1}  # no route on this head
    # The connection writes the audit line at the exchange end: who refused, why.
    assert c.conn.denies == [(event, "keys", "invalid api key")]
    assert caplog.records == []  # no Python log record per refusal any more


def test_missing_credentials_are_noted_unless_optional() -> None:
    reply = LocalReply.error(401, "missing")
    c = ctx()
    AuthCommon({"optional": True}, "mw", "jwt_auth").missing(c, reply)
    assert c.conn.denies == []
    AuthCommon({}, "mw", "jwt_auth").missing(c, reply)
    assert c.conn.denies == [(DENY_AUTH_FAILED, "mw", "missing credentials")]


@pytest.mark.parametrize(
    "conn",
    [
        pytest.param(None, id="no connection"),
        pytest.param(object(), id="a connection that cannot be told"),
    ],
)
def test_refusal_without_note_deny_still_counts(conn: object) -> None:
    head, _ = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    common = AuthCommon({}, "keys", "api_key")
    reply = LocalReply.error(401, "no")
    assert common.refuse(RequestContext(conn=conn, head=head), "bad", reply) is reply
    assert common.failures == {"bad": 1}


class Model(AuthOptions):
    header: str = "X-API-Key"
    ttl: float = 1.0


def test_parse_options_paths() -> None:
    assert parse_options(Model, {"optional": True}).optional is True
    with pytest.raises(ConfigError) as err:
        parse_options(Model, {"heder": "x", "ttl": "soon"})
    paths = sorted(p for p, _ in err.value.errors)
    assert paths == ["heder", "ttl"]
