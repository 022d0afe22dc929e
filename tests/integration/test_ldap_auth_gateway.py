"""ldap_auth against a real OpenLDAP slapd (tests/ldap_server.py): first the middleware in
this process (direct bind, search then bind with a service account, groups, StartTLS and
ldaps with the trustme CA, a wrong CA and a wrong host name refused, injection attempts,
empty passwords, the success cache, a stopped or frozen slapd answering 503), then through a
real gateway (401 challenges, 200 with identity headers the origin sees, forged ones
stripped, a directory that is down answering 503)."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import Client, Gateway, Origin, assert_error, base_config, free_port

from fastgate._core.accesslog import DENY_AUTH_UNAVAILABLE
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.ldap_auth import LdapAuth

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for ldap_server
import ldap_server as helpers

ldap_server = helpers.ldap_server  # fixtures
own_ldap_server = helpers.own_ldap_server
LdapServer = helpers.LdapServer
SPECIAL_USER = helpers.SPECIAL_USER
USERS = helpers.USERS
user_dn = helpers.user_dn

CHALLENGE = 'Basic realm="fastgate", charset="UTF-8"'
TEMPLATE = "uid={user},ou=people,dc=example,dc=org"


class Conn:
    """The least of a client connection the middleware touches."""

    client_ip = "127.0.0.1"
    request_id = b"0" * 32

    def __init__(self) -> None:
        self.upstream: list[bytes] = []
        self.denies: list[tuple[int, str, str]] = []

    def add_upstream_headers(self, lines: bytes) -> None:
        self.upstream.append(lines)

    def note_deny(self, event: int, source: str, reason: str) -> None:
        """What the exchange record keeps for the audit stream."""
        self.denies.append((event, source, reason))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(user: str | None = None, password: str = "") -> RequestContext:
    from fastgate._core.httphead import parse_request

    lines = ["GET /api HTTP/1.1", "Host: api.test"]
    if user is not None:
        lines.append(f"Authorization: {basic(user, password)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=Conn(), head=head)


def run(mw: LdapAuth, ctx: RequestContext) -> LocalReply | None:
    """on_request on a running loop (the auth pool needs one), awaited when it must wait."""

    async def call() -> Any:
        result = mw.on_request(ctx)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, 30)
        return result

    return asyncio.run(call())


def message(reply: LocalReply) -> str:
    return json.loads(reply.body)["error"]


def direct(server: LdapServer, **options: Any) -> LdapAuth:
    base = {
        "url": server.url,
        "allow_plaintext_bind": True,
        "user_dn_template": TEMPLATE,
        "group_base_dn": server.groups_dn,
        "timeout": 2,
    }
    return LdapAuth({**base, **options}, "staff")


def search(server: LdapServer, **options: Any) -> LdapAuth:
    base = {
        "url": server.url,
        "allow_plaintext_bind": True,
        "bind_dn": server.reader_dn,
        "bind_password": server.reader_password,
        "base_dn": server.base_dn,
        "user_filter": "(&(objectClass=inetOrgPerson)(uid={user}))",
        "group_base_dn": server.groups_dn,
        "timeout": 2,
    }
    return LdapAuth({**base, **options}, "staff")


MODES = [pytest.param(direct, id="direct bind"), pytest.param(search, id="search then bind")]


# ---- who gets in -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", MODES)
@pytest.mark.parametrize(
    "user, groups",
    [
        pytest.param("alice", {"ops", "dev"}, id="alice"),
        pytest.param("bob", {"dev"}, id="bob: colon and UTF-8 in the password"),
        pytest.param(SPECIAL_USER, {"qa"}, id="a uid that needs escaping everywhere"),
    ],
)
def test_right_password_admits_with_groups(
    ldap_server: LdapServer, make: Callable[..., LdapAuth], user: str, groups: set[str]
) -> None:
    mw = make(ldap_server, forward_headers={"X-User": "subject", "X-Groups": "groups"})
    ctx = request(user, ldap_server.users[user])
    assert run(mw, ctx) is None
    identity = ctx.identity
    assert identity is not None
    assert (identity.method, identity.subject, identity.groups) == ("ldap", user, groups)
    assert identity.claim("dn").lower().startswith("uid=")
    assert identity.claim("dn").lower().endswith(",ou=people,dc=example,dc=org")
    header = f"X-User: {user}\r\nX-Groups: {','.join(sorted(groups))}\r\n".encode()
    assert ctx.conn.upstream == [header]
    assert mw.stats()["binds"] == 1


@pytest.mark.parametrize("make", MODES)
@pytest.mark.parametrize(
    "user, password, reason",
    [
        pytest.param("alice", "wrong", "invalid credentials", id="wrong password"),
        pytest.param("alice", "alice-secret-1", "invalid credentials", id="password case"),
        pytest.param("nobody", "alice-Secret-1", "invalid credentials", id="unknown user"),
        pytest.param("alice", "", "empty password", id="empty password"),
    ],
)
def test_wrong_credentials_are_401(
    ldap_server: LdapServer,
    make: Callable[..., LdapAuth],
    user: str,
    password: str,
    reason: str,
) -> None:
    mw = make(ldap_server)
    ctx = request(user, password)
    reply = run(mw, ctx)
    assert isinstance(reply, LocalReply) and reply.status == 401
    assert message(reply) == "invalid credentials"
    assert dict(reply.headers)["WWW-Authenticate"] == CHALLENGE
    assert ctx.identity is None
    assert mw.common.failures == {reason: 1}
    if reason == "empty password":
        assert mw.stats()["binds"] == 0 and mw.stats()["service_binds"] == 0


def test_this_slapd_accepts_unauthenticated_binds(ldap_server: LdapServer) -> None:
    """The empty-password refusal above is ours: this directory would have said yes (as
    anonymous) to a DN with an empty password (RFC 4513 §5.1.2)."""
    whoami = shutil.which("ldapwhoami")
    if whoami is None:
        why = "ldapwhoami not found (Debian/Ubuntu: apt-get install ldap-utils)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    result = subprocess.run(
        [whoami, "-x", "-H", ldap_server.url, "-D", user_dn("alice")],
        input="",
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "anonymous"


@pytest.mark.parametrize("make", MODES)
@pytest.mark.parametrize(
    "user",
    [
        pytest.param("*", id="star"),
        pytest.param("ali*", id="prefix star"),
        pytest.param("alice*", id="trailing star"),
        pytest.param(")(uid=*", id="close-and-or"),
        pytest.param("alice)(uid=*", id="alice or anyone"),
        pytest.param("*)(uid=*))(|(uid=*", id="classic or-injection"),
        pytest.param("alice)(|(objectClass=*", id="or objectClass"),
        pytest.param("\\", id="backslash"),
        pytest.param("alice\\", id="trailing backslash"),
        pytest.param("\\61lice", id="escaped a"),
        pytest.param("alice,ou=people", id="comma"),
        pytest.param("alice+uid=bob", id="plus"),
        pytest.param("o,brien*", id="prefix of the special uid"),
    ],
)
def test_injection_attempts_are_401(
    ldap_server: LdapServer, make: Callable[..., LdapAuth], user: str
) -> None:
    """With alice's (and the special user's) real password: an unescaped name would match
    her entry, or several; escaped, none matches and nothing gets in."""
    mw = make(ldap_server)
    for password in (ldap_server.users["alice"], ldap_server.users[SPECIAL_USER]):
        ctx = request(user, password)
        reply = run(mw, ctx)
        assert isinstance(reply, LocalReply), f"{user!r} got in"
        assert reply.status == 401 and message(reply) == "invalid credentials"
        assert ctx.identity is None


@pytest.mark.parametrize("make", MODES)
def test_nul_in_the_name_never_reaches_the_directory(
    ldap_server: LdapServer, make: Callable[..., LdapAuth]
) -> None:
    mw = make(ldap_server)
    assert mw.directory.authenticate("alice\x00", ldap_server.users["alice"]) is None
    assert mw.directory.authenticate("\x00", ldap_server.users["alice"]) is None
    assert mw.directory.stats() == {"user_binds": 0, "service_binds": 0, "searches": 0}


def test_search_mode_uses_the_service_account(ldap_server: LdapServer) -> None:
    mw = search(ldap_server)
    assert run(mw, request("alice", ldap_server.users["alice"])) is None
    assert run(mw, request("nobody", "whatever")) is not None
    stats = mw.stats()
    # alice: service bind, user search, group search, user bind; nobody: service bind, user
    # search, and one more service bind so an unknown name costs what a known one does.
    assert (stats["binds"], stats["service_binds"], stats["searches"]) == (1, 3, 3)


def test_wrong_service_password_is_503(ldap_server: LdapServer) -> None:
    mw = search(ldap_server, bind_password="not-the-reader-password")
    reply = run(mw, request("alice", ldap_server.users["alice"]))
    assert isinstance(reply, LocalReply) and reply.status == 503
    assert message(reply) == "directory unavailable"
    assert mw.common.failures == {"directory unavailable": 1}


def test_search_ambiguous_user_is_refused(ldap_server: LdapServer) -> None:
    """A filter that matches several entries for one name refuses, never takes the first."""
    mw = search(ldap_server, user_filter="(|(uid={user})(objectClass=inetOrgPerson))")
    reply = run(mw, request("alice", ldap_server.users["alice"]))
    assert isinstance(reply, LocalReply) and reply.status == 401
    assert mw.stats()["binds"] == 0


# ---- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("make", MODES)
@pytest.mark.parametrize("how", ["start_tls", "ldaps"])
def test_tls_with_the_right_ca(
    ldap_server: LdapServer, make: Callable[..., LdapAuth], how: str
) -> None:
    if how == "start_tls":
        tls = {"url": ldap_server.url, "start_tls": True}
    else:
        tls = {"url": ldap_server.ldaps_url}
    mw = make(ldap_server, allow_plaintext_bind=False, ca_file=str(ldap_server.ca_file), **tls)
    ctx = request("alice", ldap_server.users["alice"])
    assert run(mw, ctx) is None
    assert ctx.identity is not None and ctx.identity.groups == {"ops", "dev"}


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param({"start_tls": True, "ca": "other"}, id="StartTLS, another CA"),
        pytest.param({"ldaps": True, "ca": "other"}, id="ldaps, another CA"),
        pytest.param({"ldaps": True, "ca": None}, id="ldaps, system roots"),
        pytest.param({"ldaps": True, "ca": "right", "host": "localhost"}, id="ldaps, wrong name"),
        pytest.param(
            {"start_tls": True, "ca": "right", "host": "localhost"}, id="StartTLS, wrong name"
        ),
    ],
)
def test_tls_refuses_an_untrusted_server(
    ldap_server: LdapServer, other_ca_file: str, tls: dict[str, Any]
) -> None:
    """The certificate is for 127.0.0.1 only, signed by the test CA: anything else is a
    directory we cannot trust, so the answer is 503 and no password was sent."""
    host = tls.get("host", "127.0.0.1")
    if tls.get("ldaps"):
        options: dict[str, Any] = {"url": f"ldaps://{host}:{ldap_server.ldaps_port}"}
    else:
        options = {"url": f"ldap://{host}:{ldap_server.port}", "start_tls": True}
    if tls["ca"] == "right":
        options["ca_file"] = str(ldap_server.ca_file)
    elif tls["ca"] == "other":
        options["ca_file"] = other_ca_file
    mw = direct(ldap_server, allow_plaintext_bind=False, **options)
    reply = run(mw, request("alice", ldap_server.users["alice"]))
    assert isinstance(reply, LocalReply) and reply.status == 503
    assert message(reply) == "directory unavailable"
    assert mw.stats()["binds"] == 0


# ---- the cache ---------------------------------------------------------------------------------


def test_cache_hit_sends_no_second_bind(ldap_server: LdapServer) -> None:
    mw = direct(ldap_server)
    password = ldap_server.users["alice"]
    first, second = request("alice", password), request("alice", password)
    assert run(mw, first) is None
    reply = mw.on_request(second)  # a hit is answered synchronously, no coroutine
    assert reply is None and second.identity == first.identity
    assert mw.stats()["binds"] == 1 and mw.stats()["cached"] == 1
    # A wrong password for a cached user is checked (and refused) every time.
    for _ in range(2):
        assert run(mw, request("alice", "wrong")) is not None
    assert mw.stats()["binds"] == 3


def test_cache_ttl_zero_binds_every_time(ldap_server: LdapServer) -> None:
    mw = direct(ldap_server, cache_ttl=0)
    for _ in range(2):
        assert run(mw, request("alice", ldap_server.users["alice"])) is None
    assert mw.stats()["binds"] == 2 and mw.stats()["cached"] == 0


# ---- a directory that fails ---------------------------------------------------------------------


def test_stopped_slapd_is_503(
    own_ldap_server: LdapServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = own_ldap_server
    cached, uncached = direct(server), direct(server, cache_ttl=0)
    password = server.users["alice"]
    for mw in (cached, uncached):
        assert run(mw, request("alice", password)) is None
    server.stop()
    refused = [request("alice", password), request("bob", server.users["bob"])]
    with caplog.at_level("INFO"):
        reply = run(uncached, refused[0])
        assert isinstance(reply, LocalReply) and reply.status == 503
        assert message(reply) == "directory unavailable"
        assert dict(reply.headers)["Retry-After"] == "5"
        assert run(cached, refused[1]).status == 503
        # A pair verified before the outage is served from the cache until cache_ttl.
        assert run(cached, request("alice", password)) is None
    assert [ctx.conn.denies for ctx in refused] == [
        [(DENY_AUTH_UNAVAILABLE, mw.name, "directory unavailable")] for mw in (uncached, cached)
    ]
    assert password not in caplog.text and server.users["bob"] not in caplog.text
    server.start()
    assert run(uncached, request("alice", password)) is None  # back without a restart


def test_frozen_slapd_times_out_to_503(own_ldap_server: LdapServer) -> None:
    """SIGSTOP: connections are accepted by the kernel, nothing answers; `timeout` ends it."""
    mw = direct(own_ldap_server, timeout=1)
    own_ldap_server.pause()
    try:
        reply = run(mw, request("alice", own_ldap_server.users["alice"]))
    finally:
        own_ldap_server.resume()
    assert isinstance(reply, LocalReply) and reply.status == 503
    assert message(reply) == "directory unavailable"


# ---- through a real gateway ---------------------------------------------------------------------


@pytest.fixture
def gw(
    origin: Origin,
    start_gateway: Callable[[dict[str, Any]], Gateway],
    ldap_server: LdapServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    monkeypatch.setenv("LDAP_TEST_READER_PASSWORD", ldap_server.reader_password)
    identity = {"X-User": "subject", "X-Groups": "groups", "X-User-Dn": "claim:dn"}
    middlewares = {
        "direct": {
            "type": "ldap_auth",
            "url": ldap_server.url,
            "start_tls": True,
            "ca_file": str(ldap_server.ca_file),
            "user_dn_template": TEMPLATE,
            "group_base_dn": ldap_server.groups_dn,
            "forward_headers": identity,
            "hide_credentials": True,
        },
        "search": {
            "type": "ldap_auth",
            "url": ldap_server.ldaps_url,
            "ca_file": str(ldap_server.ca_file),
            "bind_dn": ldap_server.reader_dn,
            "bind_password": "${LDAP_TEST_READER_PASSWORD}",
            "base_dn": ldap_server.base_dn,
            "user_filter": "(uid={user})",
            "group_base_dn": ldap_server.groups_dn,
            "forward_headers": identity,
            "realm": "staff area",
        },
        "down": {
            "type": "ldap_auth",
            "url": f"ldap://127.0.0.1:{free_port()}",
            "allow_plaintext_bind": True,
            "user_dn_template": TEMPLATE,
            "timeout": 1,
        },
    }
    routes = [
        {
            "name": name,
            "match": {"hosts": [f"{name}.test"]},
            "service": "origin",
            "middlewares": [name],
        }
        for name in middlewares
    ]
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


@pytest.mark.parametrize(
    "host, headers, error, challenge",
    [
        pytest.param("direct.test", {}, "authentication required", CHALLENGE, id="none"),
        pytest.param(
            "search.test",
            {},
            "authentication required",
            'Basic realm="staff area", charset="UTF-8"',
            id="none, own realm",
        ),
        pytest.param(
            "direct.test",
            {"Authorization": basic("alice", "wrong")},
            "invalid credentials",
            CHALLENGE,
            id="wrong password",
        ),
        pytest.param(
            "search.test",
            {"Authorization": basic("*", USERS["alice"])},
            "invalid credentials",
            'Basic realm="staff area", charset="UTF-8"',
            id="star",
        ),
        pytest.param(
            "direct.test",
            {"Authorization": basic("alice", "")},
            "invalid credentials",
            CHALLENGE,
            id="empty password",
        ),
        pytest.param(
            "direct.test",
            {"Authorization": "Basic not-base64!"},
            "malformed credentials",
            CHALLENGE,
            id="malformed",
        ),
    ],
)
def test_gateway_refuses(
    gw: Gateway, host: str, headers: dict[str, str], error: str, challenge: str
) -> None:
    with Client(gw.addr) as c:
        resp = c.request("GET", "/headers", headers=headers, host=host)
    assert assert_error(resp, 401)["error"] == error
    assert resp.header("www-authenticate") == challenge


@pytest.mark.parametrize(
    "host, hidden",
    [
        pytest.param("direct.test", True, id="direct bind over StartTLS, hide_credentials"),
        pytest.param("search.test", False, id="search then bind over ldaps, ${VAR} password"),
    ],
)
def test_gateway_admits_and_forwards_identity(
    gw: Gateway, ldap_server: LdapServer, host: str, hidden: bool
) -> None:
    auth = basic("alice", ldap_server.users["alice"])
    forged = {"X-User": "root", "X-Groups": "admins", "X-User-Dn": "cn=admin,dc=example,dc=org"}
    with Client(gw.addr) as c:
        # Twice on one connection: the second answer comes from the success cache.
        for _ in range(2):
            resp = c.request(
                "GET", "/headers", headers={"Authorization": auth, **forged}, host=host
            )
            assert resp.status == 200, resp.body
            seen = [tuple(h) for h in resp.json()["headers"]]
            names = [name.lower() for name, _ in seen]
            assert ("X-User", "alice") in seen
            assert ("X-Groups", "dev,ops") in seen
            assert ("X-User-Dn", "uid=alice,ou=people,dc=example,dc=org") in seen
            for name in forged:  # the client's copies are gone, only ours remain
                assert names.count(name.lower()) == 1
            assert ("authorization" in names) is not hidden, seen


def test_gateway_directory_down_is_503(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        resp = c.request(
            "GET", "/headers", headers={"Authorization": basic("alice", "x")}, host="down.test"
        )
    assert assert_error(resp, 503)["error"] == "directory unavailable"
    assert resp.header("retry-after") == "5"
    assert resp.header("www-authenticate") is None
