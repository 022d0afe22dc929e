"""The ldap_auth middleware without a directory: option errors with key paths, the escaping
that keeps user names from changing a DN or a filter, and the refusals decided before any
LDAP traffic (missing, malformed, empty password, control characters). A directory nobody
listens on shows the fail-closed 503. The real slapd tests are in
tests/integration/test_ldap_auth_gateway.py."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import socket
from typing import Any

import pytest
import trustme
from ldap3.utils.dn import parse_dn

from fastgate._core.accesslog import DENY_AUTH_UNAVAILABLE
from fastgate._core.httphead import parse_request
from fastgate.auth import ldap_directory as ld
from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.ldap_auth import LdapAuth
from fastgate.middleware.registry import build

CHALLENGE = 'Basic realm="fastgate", charset="UTF-8"'
TEMPLATE = "uid={user},ou=people,dc=example,dc=org"
SECRET = "n0t-in-any-log"


class Conn:
    """The least of a client connection the middleware touches."""

    client_ip = "192.0.2.7"
    request_id = b"0" * 32

    def __init__(self) -> None:
        self.upstream: list[bytes] = []
        self.denies: list[tuple[int, str, str]] = []

    def add_upstream_headers(self, lines: bytes) -> None:
        self.upstream.append(lines)

    def note_deny(self, event: int, source: str, reason: str) -> None:
        """The connection's record of a refusal (the audit line's who and why)."""
        self.denies.append((event, source, reason))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(authorization: str | None = None) -> RequestContext:
    lines = ["GET /api HTTP/1.1", "Host: api.test"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=Conn(), head=head)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def middleware(**options: Any) -> LdapAuth:
    base: dict[str, Any] = {
        "url": f"ldap://127.0.0.1:{closed_port()}",
        "allow_plaintext_bind": True,
        "user_dn_template": TEMPLATE,
        "timeout": 1,
    }
    return LdapAuth({**base, **options}, "staff")


def run(mw: LdapAuth, ctx: RequestContext) -> LocalReply | None:
    """on_request on a running loop (the pool needs one), awaited when it returns one."""

    async def call() -> Any:
        result = mw.on_request(ctx)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, 20)
        return result

    return asyncio.run(call())


def message(reply: LocalReply) -> str:
    return json.loads(reply.body)["error"]


# ---- options -----------------------------------------------------------------------------------

SEARCH = {
    "url": "ldaps://ldap.example.org",
    "bind_dn": "cn=reader,dc=example,dc=org",
    "bind_password": SECRET,
    "base_dn": "dc=example,dc=org",
    "user_filter": "(uid={user})",
}
DIRECT = {"url": "ldaps://ldap.example.org", "user_dn_template": TEMPLATE}


@pytest.mark.parametrize(
    "options, path, reason",
    [
        pytest.param({"user_dn_template": TEMPLATE}, "url", "required", id="no url"),
        pytest.param({**DIRECT, "url": "http://x"}, "url", "ldap://", id="http url"),
        pytest.param({**DIRECT, "url": "ldaps://"}, "url", "host name", id="no host"),
        pytest.param({**DIRECT, "url": "ldaps://u:p@h"}, "url", "user information", id="userinfo"),
        pytest.param(
            {**DIRECT, "url": "ldaps://h/dc=x?uid"}, "url", "server URL only", id="url with DN"
        ),
        pytest.param({**DIRECT, "url": "ldaps://h:99999"}, "url", "not a valid URL", id="port"),
        pytest.param(
            {**DIRECT, "url": "ldap://h"}, "url", "clear text", id="plaintext refused by default"
        ),
        pytest.param(
            {**DIRECT, "url": "ldap://h", "allow_plaintext_bind": "yes"},
            "allow_plaintext_bind",
            "boolean",
            id="allow_plaintext_bind must be a real boolean",
        ),
        pytest.param(
            {**DIRECT, "start_tls": True}, "start_tls", "TLS already", id="ldaps plus start_tls"
        ),
        pytest.param(
            {**DIRECT, "url": "ldap://h", "allow_plaintext_bind": True, "ca_file": "/x"},
            "ca_file",
            "only used with",
            id="ca_file without TLS",
        ),
        pytest.param({**DIRECT, "ca_file": "/nonexistent/ca.pem"}, "ca_file", "no such", id="ca"),
        pytest.param({**DIRECT, "ca_file": "/etc/hostname"}, "ca_file", "PEM", id="ca not PEM"),
        pytest.param({"url": "ldaps://h"}, "user_dn_template", "give", id="no mode"),
        pytest.param(
            {**DIRECT, "bind_dn": "cn=r,dc=x"}, "bind_dn", "only with user_filter", id="mixed"
        ),
        pytest.param(
            {**DIRECT, "user_dn_template": "uid=alice,dc=x"},
            "user_dn_template",
            "must contain {user}",
            id="template without {user}",
        ),
        pytest.param(
            {**DIRECT, "user_dn_template": "uid={name},dc=x"},
            "user_dn_template",
            "unknown placeholder {name}",
            id="unknown placeholder",
        ),
        pytest.param(
            {**DIRECT, "user_dn_template": "{user}"},
            "user_dn_template",
            "not a valid DN",
            id="template is not a DN",
        ),
        pytest.param(
            {**SEARCH, "bind_password": ""},
            "bind_password",
            "binds anonymously",
            id="empty service password",
        ),
        pytest.param(
            {k: v for k, v in SEARCH.items() if k != "base_dn"}, "base_dn", "required", id="base"
        ),
        pytest.param(
            {**SEARCH, "user_filter": "(uid={user}"}, "user_filter", "filter", id="bad filter"
        ),
        pytest.param(
            {**SEARCH, "user_filter": "(uid=alice)"}, "user_filter", "{user}", id="no {user}"
        ),
        pytest.param({**SEARCH, "bind_dn": "reader"}, "bind_dn", "DN", id="bind_dn not a DN"),
        pytest.param(
            {**DIRECT, "group_filter": "(member={dn})"},
            "group_filter",
            "needs group_base_dn",
            id="group_filter alone",
        ),
        pytest.param(
            {**DIRECT, "group_base_dn": "dc=x", "group_filter": "(member={x})"},
            "group_filter",
            "unknown placeholder",
            id="group_filter placeholder",
        ),
        pytest.param(
            {**DIRECT, "group_base_dn": "dc=x", "group_filter": "(member=x)"},
            "group_filter",
            "{dn} or {user}",
            id="group_filter names nobody",
        ),
        pytest.param({**DIRECT, "timeout": 2.5}, "timeout", "integer", id="fractional timeout"),
        pytest.param({**DIRECT, "timeout": 0}, "timeout", "greater", id="zero timeout"),
        pytest.param({**DIRECT, "cache_ttl": -1}, "cache_ttl", "greater", id="negative ttl"),
        pytest.param({**DIRECT, "realm": 'a"b'}, "realm", "double quote", id="realm quote"),
        pytest.param({**DIRECT, "userfilter": "x"}, "userfilter", "unknown key", id="typo"),
    ],
)
def test_option_errors(options: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        LdapAuth(options, "staff")
    assert err.value.path == path
    assert reason in err.value.reason


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(12345678, id="a number"),
        pytest.param(["x"], id="a list"),
    ],
)
def test_bind_password_errors_never_quote_it(value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        LdapAuth({**SEARCH, "bind_password": value}, "staff")
    assert err.value.path == "bind_password"
    assert str(value) not in str(err.value)


@pytest.mark.parametrize(
    "options, host, port, use_ssl, start_tls",
    [
        pytest.param(DIRECT, "ldap.example.org", 636, True, False, id="ldaps default port"),
        pytest.param(
            {**DIRECT, "url": "ldap://ldap.example.org", "start_tls": True},
            "ldap.example.org",
            389,
            False,
            True,
            id="ldap + StartTLS",
        ),
        pytest.param(
            {**DIRECT, "url": "ldap://127.0.0.1:3389", "allow_plaintext_bind": True},
            "127.0.0.1",
            3389,
            False,
            False,
            id="plaintext when allowed",
        ),
        pytest.param(SEARCH, "ldap.example.org", 636, True, False, id="search mode"),
    ],
)
def test_valid_options(
    options: dict[str, Any], host: str, port: int, use_ssl: bool, start_tls: bool
) -> None:
    mw = build("staff", "ldap_auth", dict(options))
    s = mw.directory.settings
    assert (s.host, s.port, s.use_ssl, s.start_tls) == (host, port, use_ssl, start_tls)
    assert (s.tls_context is not None) == (use_ssl or start_tls)
    if s.tls_context is not None:
        assert s.tls_context.check_hostname
        assert s.tls_context.minimum_version >= __import__("ssl").TLSVersion.TLSv1_2
    assert SECRET not in repr(s) and SECRET not in repr(mw.options)  # out of reprs and logs


def test_ca_file_is_loaded(tmp_path: Any) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    mw = LdapAuth({**DIRECT, "ca_file": str(tmp_path / "ca.pem")}, "staff")
    context = mw.directory.settings.tls_context
    assert context is not None
    assert len(context.get_ca_certs()) == 1


# ---- escaping ----------------------------------------------------------------------------------

INJECTIONS = [
    pytest.param("*", id="star"),
    pytest.param(")(uid=*", id="close-and-or"),
    pytest.param("alice)(|(uid=*", id="filter or"),
    pytest.param("\\", id="backslash"),
    pytest.param("a\x00b", id="NUL"),
    pytest.param("alice,ou=admins", id="comma adds an RDN"),
    pytest.param("alice+cn=admin", id="plus adds an AVA"),
    pytest.param("#616c696365", id="leading hash"),
    pytest.param(" alice ", id="edge spaces"),
    pytest.param('"alice";<x>=', id="quote semicolon angle equals"),
]


@pytest.mark.parametrize(
    "user, expected",
    [
        pytest.param("*", "(uid=\\2a)", id="star"),
        pytest.param(")(uid=*", "(uid=\\29\\28uid=\\2a)", id="close-and-or"),
        pytest.param("\\", "(uid=\\5c)", id="backslash"),
        pytest.param("a\x00b", "(uid=a\\00b)", id="NUL"),
        pytest.param("\\2a", "(uid=\\5c2a)", id="an escape sequence stays text"),
        pytest.param("{user}", "(uid={user})", id="a placeholder in the value stays text"),
        pytest.param("ali ce", "(uid=ali ce)", id="plain"),
    ],
)
def test_filter_escaping(user: str, expected: str) -> None:
    assert ld.user_filter("(uid={user})", user) == expected


@pytest.mark.parametrize("user", INJECTIONS)
def test_filter_value_never_adds_filter_syntax(user: str) -> None:
    flt = ld.user_filter("(&(objectClass=person)(uid={user}))", user)
    value = flt[len("(&(objectClass=person)(uid=") : -2]
    assert not set(value) & set("*()\x00"), flt
    assert ld.group_filter("(|(member={dn})(memberUid={user}))", "uid=x,dc=y", user).count("(") == 3


@pytest.mark.parametrize(
    "user, expected",
    [
        pytest.param(
            "alice,ou=admins", "uid=alice\\,ou\\=admins,ou=people,dc=example,dc=org", id="comma"
        ),
        pytest.param("a+cn=b", "uid=a\\+cn\\=b,ou=people,dc=example,dc=org", id="plus"),
        pytest.param("\\", "uid=\\\\,ou=people,dc=example,dc=org", id="backslash"),
        pytest.param("#x", "uid=\\#x,ou=people,dc=example,dc=org", id="leading hash"),
        pytest.param("x ", "uid=x\\ ,ou=people,dc=example,dc=org", id="trailing space"),
    ],
)
def test_dn_escaping(user: str, expected: str) -> None:
    assert ld.user_dn(TEMPLATE, user) == expected


@pytest.mark.parametrize("user", [p for p in INJECTIONS if p.id != "NUL"])
def test_dn_value_stays_one_rdn(user: str) -> None:
    parts = parse_dn(ld.user_dn(TEMPLATE, user))
    assert len(parts) == 4  # uid=..., ou=people, dc=example, dc=org
    assert parts[0][0] == "uid" and parts[1:] == parse_dn("ou=people,dc=example,dc=org")[:]
    assert parts[0][2] == ","  # one AVA: a `+` would have joined a second one


@pytest.mark.parametrize(
    "user, ok",
    [
        pytest.param("alice", True, id="plain"),
        pytest.param("o,brien*(x)", True, id="specials are escaped, not refused"),
        pytest.param("", False, id="empty"),
        pytest.param("a\x00b", False, id="NUL"),
        pytest.param("a\nb", False, id="LF"),
        pytest.param("a\x7fb", False, id="DEL"),
        pytest.param("x" * ld.MAX_USER_CHARS, True, id="longest"),
        pytest.param("x" * (ld.MAX_USER_CHARS + 1), False, id="too long"),
    ],
)
def test_acceptable_user(user: str, ok: bool) -> None:
    assert ld.acceptable_user(user) is ok


# ---- refusals before any LDAP traffic ---------------------------------------------------------


@pytest.mark.parametrize(
    "authorization, status, text, reason",
    [
        pytest.param(None, 401, "authentication required", "missing credentials", id="none"),
        pytest.param("Bearer abc", 401, "authentication required", "missing credentials"),
        pytest.param("Basic !!!", 401, "malformed credentials", "malformed credentials"),
        pytest.param(
            "Basic " + base64.b64encode(b"al\x00ice:pw").decode(),
            401,
            "malformed credentials",
            "malformed credentials",
            id="NUL in the user name",
        ),
        pytest.param(basic("alice", ""), 401, "invalid credentials", "empty password"),
        pytest.param(
            basic("x" * 300, "pw"), 401, "invalid credentials", "invalid credentials", id="long"
        ),
    ],
)
def test_refused_without_a_bind(
    authorization: str | None, status: int, text: str, reason: str
) -> None:
    mw = middleware()  # its directory port is closed: any bind attempt would be a 503
    reply = mw.on_request(request(authorization))
    assert isinstance(reply, LocalReply), "decided synchronously, without the pool"
    assert reply.status == status
    assert message(reply) == text
    assert dict(reply.headers)["WWW-Authenticate"] == CHALLENGE
    assert mw.common.failures == {reason: 1}
    assert mw.stats()["checks"] == 0 and mw.stats()["binds"] == 0


def test_directory_refuses_empty_password_and_control_characters_itself() -> None:
    """Defence in depth: the blocking half refuses them too, before opening a connection
    (the port is closed, so an attempt would raise DirectoryUnavailable)."""
    directory = middleware().directory
    assert directory.authenticate("alice", "") is None
    assert directory.authenticate("al\x00ice", "pw") is None
    assert directory.stats() == {"user_binds": 0, "service_binds": 0, "searches": 0}


def test_optional_passes_without_credentials() -> None:
    mw = middleware(optional=True)
    ctx = request()
    assert mw.on_request(ctx) is None
    assert ctx.identity is None


def test_directory_down_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    mw = middleware()
    with caplog.at_level("DEBUG"):
        ctxs = [request(basic("alice", SECRET)) for _ in range(2)]
        replies = [run(mw, ctx) for ctx in ctxs]
    for reply in replies:
        assert isinstance(reply, LocalReply) and reply.status == 503
        assert message(reply) == "directory unavailable"
    assert mw.common.failures == {"directory unavailable": 2}
    assert mw.stats()["cached"] == 0 and mw.stats()["unavailable"] == 2
    # Each refusal is noted on its connection for the audit line: fail closed, unavailable.
    for ctx in ctxs:
        assert ctx.conn.denies == [(DENY_AUTH_UNAVAILABLE, mw.name, "directory unavailable")]
    warnings = [
        r for r in caplog.records if r.name == "fastgate.ldap_auth" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1, "one warning per outage, not one per request"
    assert "Connection refused" in warnings[0].getMessage()
    assert SECRET not in caplog.text


def test_registered_under_its_type() -> None:
    mw = build("staff", "ldap_auth", {**DIRECT})
    assert isinstance(mw, LdapAuth) and mw.type == "ldap_auth"
    assert mw.strip_request_headers == ()
    hidden = build("staff", "ldap_auth", {**DIRECT, "hide_credentials": True})
    assert hidden.strip_request_headers == (b"authorization",)
