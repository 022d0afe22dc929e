"""The forward_auth middleware in this process against the test auth service
(tests/forward_auth_service.py) on 127.0.0.1: option errors with key paths, which headers
the auth service sees, the cache (key, TTL, Cache-Control, what is never cached), copying
answer headers upstream without unsafe values, the relayed denial, and failing closed (no
listener, timeout, a connection dropped, a TLS certificate from an unknown CA). The same
middleware through a real gateway: tests/integration/test_forward_auth_gateway.py."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from fastgate._core.httphead import parse_request
from fastgate.auth.common import deny_event
from fastgate.client.http import HttpResponse
from fastgate.errors import ConfigError
from fastgate.middleware import forward_auth as fa
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.forward_auth import ForwardAuth, copied_lines, relayed_reply
from fastgate.middleware.registry import build

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for the service
from forward_auth_service import AuthService, TlsFiles

ADDRESS = "https://auth.internal/verify"
DROP = object()  # an option value that means: leave the option out


class Conn:
    """The least of a client connection the middleware touches."""

    client_ip = "192.0.2.7"
    request_id = b"f" * 32

    def __init__(self, tls_version: str | None = None, request_body: bytes | None = None) -> None:
        self.upstream: list[bytes] = []
        self.tls_version = tls_version
        self.proto = "https" if tls_version else "http"
        self.request_body = request_body
        self.denies: list[tuple[int, str, str]] = []

    def add_upstream_headers(self, lines: bytes) -> None:
        self.upstream.append(lines)

    def note_deny(self, event: int, source: str, reason: str) -> None:
        """The connection's record of a refusal (the audit line's who and why)."""
        self.denies.append((event, source, reason))


class Clock:
    """A clock the test moves by hand (the middleware's `clock`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(
    token: str | None = "good",
    target: str = "/api/items?page=2",
    method: str = "GET",
    extra: tuple[tuple[str, str], ...] = (),
    host: str | None = "api.test",
    conn: Conn | None = None,
) -> RequestContext:
    lines = [f"{method} {target} HTTP/1.1" if host else f"{method} {target} HTTP/1.0"]
    if host:
        lines.append(f"Host: {host}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in extra]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=conn or Conn(), head=head)


def middleware(svc: AuthService, **options: Any) -> ForwardAuth:
    base: dict[str, Any] = {"address": svc.url, "request_headers": ["Authorization"]}
    if svc.https is None:
        base["allow_plaintext"] = True
    return ForwardAuth({**base, **options}, "sso")


async def call(mw: ForwardAuth, ctx: RequestContext) -> LocalReply | None:
    result = mw.on_request(ctx)
    if inspect.isawaitable(result):
        result = await asyncio.wait_for(result, 10)
    return result


def with_service(test: Callable[[AuthService], Awaitable[None]], **options: Any) -> None:
    """Run `test(svc)` on a fresh loop with a started auth service, closed afterwards."""

    async def main() -> None:
        svc = await AuthService(**options).start()
        try:
            await test(svc)
        finally:
            await svc.close()

    asyncio.run(main())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path, reason",
    [
        pytest.param({"address": DROP}, "address", "required", id="no address"),
        pytest.param({"address": "ftp://a/x"}, "address", "http or https", id="ftp"),
        pytest.param({"address": "https://u:p@a/x"}, "address", "credentials", id="userinfo"),
        pytest.param({"address": "https://a/x#f"}, "address", "fragment", id="fragment"),
        pytest.param({"address": "https://a b/x"}, "address", "printable", id="space"),
        pytest.param({"address": "http://a/x"}, "address", "clear text", id="http refused"),
        pytest.param(
            {"address": "http://a/x", "allow_plaintext": "yes"},
            "allow_plaintext",
            "boolean",
            id="allow_plaintext must be a real boolean",
        ),
        pytest.param(
            {"address": "http://a/x", "allow_plaintext": True, "ca_file": "/x"},
            "ca_file",
            "only used with",
            id="ca_file without https",
        ),
        pytest.param({"ca_file": "/nonexistent/ca.pem"}, "ca_file", "no such", id="ca missing"),
        pytest.param({"ca_file": "/etc/hostname"}, "ca_file", "PEM", id="ca not PEM"),
        pytest.param({"timeout": 0}, "timeout", "greater", id="zero timeout"),
        pytest.param({"timeout": "2"}, "timeout", "number", id="timeout as text"),
        pytest.param({"max_body": 1024}, "max_body", "forward_body", id="max_body alone"),
        pytest.param(
            {"forward_body": True, "max_body": 0}, "max_body", "greater", id="max_body zero"
        ),
        pytest.param(
            {"forward_body": True, "max_body": (16 << 20) + 1},
            "max_body",
            "less",
            id="max_body over 16 MiB",
        ),
        pytest.param(
            {"forward_body": True, "cache_ttl": 5, "cache_key": ["Authorization"]},
            "cache_ttl",
            "forward_body",
            id="body decisions are not cached",
        ),
        pytest.param(
            {"request_headers": ["Authorization", "Bad Name"]},
            "request_headers[1]",
            "not a valid header name",
            id="request header name",
        ),
        pytest.param(
            {"request_headers": ["X-Forwarded-Uri"]},
            "request_headers[0]",
            "the gateway sets it",
            id="client X-Forwarded-Uri refused",
        ),
        pytest.param(
            {"request_headers": ["host"]}, "request_headers[0]", "cannot be listed", id="Host"
        ),
        pytest.param(
            {"request_headers": "Authorization"}, "request_headers", "list", id="not a list"
        ),
        pytest.param(
            {"response_headers": ["Content-Length"]},
            "response_headers[0]",
            "the gateway owns it",
            id="framing header copied upstream",
        ),
        pytest.param(
            {"response_headers": ["X-User"], "forward_headers": {"x-user": "subject"}},
            "response_headers[0]",
            "forward_headers",
            id="set twice",
        ),
        pytest.param(
            {"identity": {"subject_header": "X User"}},
            "identity.subject_header",
            "header name",
            id="identity header name",
        ),
        pytest.param({"identity": {"user": "X"}}, "identity.user", "unknown key", id="typo"),
        pytest.param({"cache_ttl": 10}, "cache_key", "required", id="cache without key"),
        pytest.param(
            {"cache_ttl": 10, "cache_key": [":query", "authorization", "cookie"]},
            "cache_key[0]",
            ":path",
            id="unknown pseudo-name",
        ),
        pytest.param(
            {"cache_ttl": 10, "cache_key": ["Authorization"]},
            "cache_key",
            "must name Cookie",
            id="key misses a header the service sees",
        ),
        pytest.param({"cache_ttl": -1}, "cache_ttl", "greater", id="negative ttl"),
        pytest.param(
            {"optional": True, "request_headers": []}, "optional", "request_headers", id="opt"
        ),
        pytest.param({"adress": ADDRESS}, "adress", "unknown key", id="unknown option"),
    ],
)
def test_option_errors(options: dict[str, Any], path: str, reason: str) -> None:
    given = {k: v for k, v in {"address": ADDRESS, **options}.items() if v is not DROP}
    with pytest.raises(ConfigError) as err:
        ForwardAuth(given, "sso")
    assert err.value.path == path, err.value
    assert reason in err.value.reason, err.value


def test_valid_options_and_owned_headers(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    mw = build(
        "sso",
        "forward_auth",
        {
            "address": ADDRESS,
            "ca_file": str(tmp_path / "ca.pem"),
            "request_headers": ["Authorization", "Cookie", "authorization"],
            "response_headers": ["X-Auth-User", "X-Auth-Groups"],
            "forward_headers": {"X-User": "subject"},
            "hide_credentials": True,
            "cache_ttl": 30,
            "cache_key": ["Authorization", "cookie", ":path"],
            "forward_body": False,
        },
    )
    s = mw.settings
    assert s.request_headers == ("Authorization", "Cookie")  # deduplicated, first spelling
    assert s.cache_key == ("authorization", "cookie", ":path")
    assert s.ssl_context is not None and s.ssl_context.check_hostname
    assert len(s.ssl_context.get_ca_certs()) == 1
    # The client's copies of identity and copied headers, and the credentials (hidden).
    assert set(mw.strip_request_headers) == {
        b"x-user",
        b"authorization",
        b"cookie",
        b"x-auth-user",
        b"x-auth-groups",
    }


# ---- what the auth service sees ----------------------------------------------------------------


@pytest.mark.parametrize(
    "ctx, options, expected",
    [
        pytest.param(
            request("good", extra=(("Cookie", "a=1"), ("Cookie", "b=2"), ("X-Other", "no"))),
            {"request_headers": ["Authorization", "Cookie"]},
            [
                ("Authorization", "Bearer good"),
                ("Cookie", "a=1"),
                ("Cookie", "b=2"),
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "api.test"),
                ("X-Forwarded-Uri", "/api/items?page=2"),
                ("X-Forwarded-For", "192.0.2.7"),
                ("X-Request-ID", "f" * 32),
            ],
            id="listed headers, every line, then the gateway's X-Forwarded-*",
        ),
        pytest.param(
            request(
                "good",
                extra=(("X-Forwarded-Uri", "/public"), ("X-Forwarded-Method", "GET")),
                method="DELETE",
            ),
            {},
            [
                ("Authorization", "Bearer good"),
                ("X-Forwarded-Method", "DELETE"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "api.test"),
                ("X-Forwarded-Uri", "/api/items?page=2"),
                ("X-Forwarded-For", "192.0.2.7"),
                ("X-Request-ID", "f" * 32),
            ],
            id="a client's own X-Forwarded-Uri and -Method never reach the service",
        ),
        pytest.param(
            request(None, target="http://api.test/a/b", conn=Conn(tls_version="TLSv1.3")),
            {"request_headers": []},
            [
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "api.test"),
                ("X-Forwarded-Uri", "/a/b"),
                ("X-Forwarded-For", "192.0.2.7"),
                ("X-Request-ID", "f" * 32),
            ],
            id="absolute-form target sent as origin-form, https from a TLS connection",
        ),
        pytest.param(
            request("good", host=None, target="/x"),
            {},
            [
                ("Authorization", "Bearer good"),
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Uri", "/x"),
                ("X-Forwarded-For", "192.0.2.7"),
                ("X-Request-ID", "f" * 32),
            ],
            id="HTTP/1.0 without Host: no X-Forwarded-Host",
        ),
    ],
)
def test_auth_request_headers(
    ctx: RequestContext, options: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    async def test(svc: AuthService) -> None:
        mw = middleware(svc, **options)
        await call(mw, ctx)
        seen = svc.last
        assert seen.method == ctx.head.method.decode()  # the client's method
        assert seen.target == "/verify"
        assert seen.body == b""
        sent = [(k, v) for k, v in seen.headers if k not in ("Host", "User-Agent")]
        sent = [(k, v) for k, v in sent if k != "Content-Length"]
        assert sent == expected
        assert seen.header("host") == f"127.0.0.1:{svc.port}"
        await mw.client.close()

    with_service(test)


# ---- decisions ---------------------------------------------------------------------------------


def test_admit_sets_identity_and_copies_headers_upstream() -> None:
    async def test(svc: AuthService) -> None:
        mw = middleware(
            svc,
            response_headers=["X-Auth-User", "X-Auth-Groups"],
            identity={"subject_header": "X-Auth-User", "groups_header": "X-Auth-Groups"},
            forward_headers={"X-Subject": "subject"},
        )
        ctx = request("bob", method="POST")
        assert await call(mw, ctx) is None
        assert ctx.identity is not None
        assert ctx.identity.method == "forward_auth"
        assert ctx.identity.subject == "bob"
        assert ctx.identity.groups == {"dev", "qa", "web"}
        assert ctx.conn.upstream == [
            b"X-Subject: bob\r\nX-Auth-User: bob\r\n"
            b"X-Auth-Groups: dev, qa\r\nX-Auth-Groups: web\r\n"
        ]
        assert svc.last.method == "POST" and svc.last.header("content-length") == "0"
        await mw.client.close()

    with_service(test)


@pytest.mark.parametrize(
    "token, status, headers, body, content_type",
    [
        pytest.param(
            "bad",
            401,
            (("WWW-Authenticate", 'Bearer realm="auth", error="invalid_token"'),),
            b"token rejected by the auth service\n",
            "text/plain",
            id="401 with its challenge and body",
        ),
        pytest.param(
            "forbidden",
            403,
            (),
            b'{"message": "not in group ops"}',
            "application/json",
            id="403 JSON",
        ),
        pytest.param(
            "redirect",
            302,
            (("Location", "https://login.example/start?rd=/api/items?page=2"),),
            b"",
            "text/plain",
            id="302 to the login page",
        ),
        pytest.param(
            "error",
            500,
            (),
            b"auth backend broken",
            "text/plain",
            id="500 passed on",
        ),
    ],
)
def test_denial_is_the_auth_service_answer(
    token: str,
    status: int,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
    content_type: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(svc: AuthService) -> None:
        mw = middleware(svc)
        ctx = request(token)
        with caplog.at_level(logging.INFO):
            reply = await call(mw, ctx)
        assert reply == LocalReply(status, body, headers, content_type)
        assert ctx.identity is None and ctx.conn.upstream == []
        assert mw.stats()["failures"] == {f"denied by auth service ({status})": 1}
        # Noted on the connection for the audit line (event by status: common.deny_event).
        assert [(d[1], d[2]) for d in ctx.conn.denies] == [
            (mw.name, f"denied by auth service ({status})")
        ]
        assert ctx.conn.denies[0][0] == deny_event(status)
        assert token not in caplog.text  # the credential is never logged
        await mw.client.close()

    with_service(test)


def test_optional_passes_requests_without_credentials_unasked() -> None:
    async def test(svc: AuthService) -> None:
        mw = middleware(svc, optional=True)
        ctx = request(None)
        assert mw.on_request(ctx) is None  # synchronously: no auth request at all
        assert ctx.identity is None and svc.count == 0
        assert isinstance(await call(mw, request("bad")), LocalReply)  # a wrong one still fails
        assert svc.count == 1
        await mw.client.close()

    with_service(test)


# ---- failing closed ----------------------------------------------------------------------------


def _assert_unavailable(reply: LocalReply | None) -> None:
    assert reply is not None and reply.status == 503
    assert json.loads(reply.body) == {"error": "auth service unavailable"}


@pytest.mark.parametrize(
    "token, kind, asked",
    [
        pytest.param("slow", "timeout", 1, id="past the timeout"),
        pytest.param("drop", "connect", 2, id="closed without an answer: retried once"),
    ],
)
def test_fails_closed(token: str, kind: str, asked: int, caplog: pytest.LogCaptureFixture) -> None:
    async def test(svc: AuthService) -> None:
        mw = middleware(svc, timeout=0.5)
        ctx = request(token)
        with caplog.at_level(logging.INFO):
            reply = await call(mw, ctx)
            _assert_unavailable(reply)
            assert ctx.identity is None and ctx.conn.upstream == []
            assert svc.count == asked
            assert mw.stats()["failures"] == {f"auth service unavailable ({kind})": 1}
            assert "auth service unavailable" in caplog.text  # the warning
            assert token not in caplog.text
            # The next good request gets in: a failure is never remembered.
            assert await call(mw, request("good")) is None
        assert "answering again" in caplog.text
        await mw.client.close()

    with_service(test, slow_seconds=3)


def test_nobody_listening_fails_closed() -> None:
    async def main() -> None:
        mw = ForwardAuth(
            {"address": f"http://127.0.0.1:{closed_port()}/verify", "allow_plaintext": True},
            "sso",
        )
        _assert_unavailable(await call(mw, request("good")))
        assert mw.stats()["unavailable"] == 1

    asyncio.run(main())


def test_https_with_ca_file_and_unknown_ca(tmp_path: Path) -> None:
    tls = TlsFiles(tmp_path / "tls")

    async def test(svc: AuthService) -> None:
        trusted = middleware(svc, ca_file=str(tls.ca_file))
        ctx = request("good")
        assert await call(trusted, ctx) is None and ctx.identity is not None
        system_roots = middleware(svc)  # the test CA is not a system root
        _assert_unavailable(await call(system_roots, request("good")))
        assert system_roots.stats()["failures"] == {"auth service unavailable (tls)": 1}
        await trusted.client.close()
        await system_roots.client.close()

    with_service(test, https=tls)


# ---- the cache ---------------------------------------------------------------------------------


CACHED = {"cache_ttl": 30, "cache_key": ["Authorization"]}


@pytest.mark.parametrize(
    "token, cache_control, options, fresh_at, stale_at",
    [
        pytest.param("good", None, {}, 29.0, 30.5, id="admit kept cache_ttl"),
        pytest.param("good", "max-age=5", {}, 4.0, 5.5, id="shorter max-age wins"),
        pytest.param("good", "max-age=300", {}, 29.0, 30.5, id="longer max-age capped"),
        pytest.param("bad", None, {}, 29.0, 30.5, id="401 deny kept"),
        pytest.param("forbidden", "s-maxage=2", {}, 1.0, 2.5, id="403 deny with s-maxage"),
    ],
)
def test_cache_ttl(
    token: str,
    cache_control: str | None,
    options: dict[str, Any],
    fresh_at: float,
    stale_at: float,
) -> None:
    async def test(svc: AuthService) -> None:
        svc.cache_control = cache_control
        mw = middleware(svc, **CACHED, **options)
        mw.clock = clock = Clock()
        first = await call(mw, request(token))
        assert svc.count == 1
        clock.now += fresh_at
        ctx = request(token)
        hit = mw.on_request(ctx)
        assert not inspect.isawaitable(hit)  # a hit answers without a coroutine
        assert hit == first
        assert svc.count == 1 and mw.stats()["hits"] == 1
        if first is None:
            assert ctx.identity is not None and ctx.identity.method == "forward_auth"
        else:
            assert mw.stats()["failures"] == {f"denied by auth service ({first.status})": 2}
        clock.now += stale_at - fresh_at
        assert await call(mw, request(token)) == first
        assert svc.count == 2
        await mw.client.close()

    with_service(test)


@pytest.mark.parametrize(
    "token, cache_control",
    [
        pytest.param("nostore", None, id="no-store"),
        pytest.param("good", "no-cache", id="no-cache"),
        pytest.param("good", "max-age=0", id="max-age 0"),
        pytest.param("cookie", None, id="a deny with Set-Cookie"),
        pytest.param("error", None, id="500"),
        pytest.param("redirect", None, id="302"),
        pytest.param(None, None, id="no cache_key header in the request"),
    ],
)
def test_not_cached(token: str | None, cache_control: str | None) -> None:
    async def test(svc: AuthService) -> None:
        svc.cache_control = cache_control
        mw = middleware(svc, **CACHED)
        for _ in range(2):
            await call(mw, request(token))
        assert svc.count == 2
        assert mw.stats()["cached"] == 0
        await mw.client.close()

    with_service(test)


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fa, "CACHE_SIZE", 2)

    async def test(svc: AuthService) -> None:
        mw = middleware(svc, **CACHED)
        for token in ("good", "bob", "bad"):
            await call(mw, request(token))
        assert mw.stats()["cached"] == 2
        assert not inspect.isawaitable(mw.on_request(request("bad")))  # newest kept
        coro = mw.on_request(request("good"))
        assert inspect.isawaitable(coro)  # the oldest went out
        await coro
        await mw.client.close()

    with_service(test)


def _key(mw: ForwardAuth, **kw: Any) -> bytes | None:
    return mw.cache_key(request(**kw))


@pytest.mark.parametrize(
    "cache_key, a, b, same",
    [
        pytest.param(["authorization"], {}, {"target": "/other"}, True, id="path not in key"),
        pytest.param(["authorization", ":path"], {}, {"target": "/other"}, False, id=":path"),
        pytest.param(
            ["authorization", ":path"], {}, {"target": "/api/items?page=3"}, False, id="query"
        ),
        pytest.param(["authorization", ":method"], {}, {"method": "POST"}, False, id=":method"),
        pytest.param(["authorization", ":host"], {}, {"host": "b.test"}, False, id=":host"),
        pytest.param(["authorization"], {}, {"token": "bob"}, False, id="other token"),
        pytest.param(
            ["authorization", "x-tenant"],
            {"extra": (("X-Tenant", ""),)},
            {},
            False,
            id="empty value differs from absent",
        ),
        pytest.param(
            ["authorization", "x-tenant"],
            {"extra": (("X-Tenant", "a"), ("X-Tenant", "b"))},
            {"extra": (("X-Tenant", "a, b"),)},
            False,
            id="two lines differ from one joined line",
        ),
        pytest.param(
            ["authorization", "x-tenant"],
            {"token": "a", "extra": (("X-Tenant", "b"),)},
            {"token": "ab", "extra": (("X-Tenant", ""),)},
            False,
            id="values cannot shift between fields",
        ),
    ],
)
def test_cache_key(cache_key: list[str], a: dict[str, Any], b: dict[str, Any], same: bool) -> None:
    mw = ForwardAuth(
        {"address": ADDRESS, "request_headers": ["Authorization"], "cache_ttl": 5,
         "cache_key": cache_key},
        "sso",
    )  # fmt: skip
    key_a, key_b = _key(mw, **a), _key(mw, **b)
    assert key_a is not None and len(key_a) == 32  # a SHA-256 digest, not the credential
    assert (key_a == key_b) is same
    assert _key(mw, token=None) is None  # no cache_key header: never from the cache


# ---- answer headers ----------------------------------------------------------------------------


def _response(*headers: tuple[str, str], status: int = 200, body: bytes = b"") -> HttpResponse:
    return HttpResponse(status, "", tuple(headers), body)


@pytest.mark.parametrize(
    "headers, expected",
    [
        pytest.param(
            [("X-Auth-User", "alice"), ("x-auth-groups", "ops, dev")],
            b"X-Auth-User: alice\r\nX-Auth-Groups: ops, dev\r\n",
            id="copied with the configured spelling",
        ),
        pytest.param(
            [("X-Auth-User", "ali\r\nX-Admin: yes"), ("X-Auth-Groups", "ops")],
            b"X-Auth-Groups: ops\r\n",
            id="CR LF dropped",
        ),
        pytest.param([("X-Auth-User", "a\x00b")], b"", id="NUL dropped"),
        pytest.param([("X-Auth-User", "a\x1bb")], b"", id="other control char dropped"),
        pytest.param([("X-Auth-User", "  ")], b"", id="empty dropped"),
        pytest.param(
            [("X-Auth-User", "j\xfcrgen\tk")], b"X-Auth-User: j\xfcrgen\tk\r\n", id="bytes kept"
        ),
        pytest.param(
            [("X-Auth-Groups", "a"), ("X-Auth-Groups", "b")],
            b"X-Auth-Groups: a\r\nX-Auth-Groups: b\r\n",
            id="every line",
        ),
        pytest.param([("X-Other", "x"), ("Set-Cookie", "s=1")], b"", id="unlisted not copied"),
    ],
)
def test_copied_lines(headers: list[tuple[str, str]], expected: bytes) -> None:
    assert copied_lines(_response(*headers), ("X-Auth-User", "X-Auth-Groups")) == expected


def test_identity_from_unsafe_or_utf8_values() -> None:
    mw = ForwardAuth(
        {
            "address": ADDRESS,
            "identity": {
                "subject_header": "X-User",
                "groups_header": "X-Groups",
                "consumer_header": "X-Consumer",
            },
        },
        "sso",
    )
    utf8 = "jürgen".encode().decode("latin-1")  # as the client decodes the bytes
    ident = mw._identity(
        _response(("X-User", utf8), ("X-Groups", " a,,b "), ("X-Groups", "c\x01"),
                  ("X-Consumer", "app-1"))
    )  # fmt: skip
    assert (ident.subject, ident.groups, ident.consumer) == ("jürgen", {"a", "b"}, "app-1")
    assert mw._identity(_response(("X-User", "a\x7f"))).subject == ""


def test_relayed_reply_drops_hop_by_hop_and_framing() -> None:
    resp = _response(
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "5"),
        ("Content-Type", "text/html"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("WWW-Authenticate", "Basic"),
        ("X-Bad", "a\x01"),
        status=401,
        body=b"x" * (fa.MAX_REPLY_BODY + 10),
    )
    reply = relayed_reply(resp)
    assert reply.status == 401 and reply.content_type == "text/html"
    assert reply.headers == (
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("WWW-Authenticate", "Basic"),
    )
    assert len(reply.body) == fa.MAX_REPLY_BODY
    # A JSON body shaped like the gateway's own errors still encodes to valid JSON.
    json_reply = relayed_reply(
        _response(("Content-Type", "application/json"), status=403, body=b'{"error": "no"}\n')
    )
    wire = json_reply.encode(b"r" * 32, False)
    assert json.loads(wire.split(b"\r\n\r\n", 1)[1]) == {"error": "no", "request_id": "r" * 32}


@pytest.mark.parametrize(
    "options, limit",
    [
        pytest.param({}, 0, id="bodies stay streamed"),
        pytest.param({"forward_body": True}, 64 << 10, id="default limit"),
        pytest.param({"forward_body": True, "max_body": 100}, 100, id="configured limit"),
    ],
)
def test_request_body_limit(options: dict[str, Any], limit: int) -> None:
    """What the route reads whole before the chain runs (Route.buffer_body)."""
    mw = ForwardAuth({"address": "http://127.0.0.1:9/v", "allow_plaintext": True, **options}, "f")
    assert mw.request_body_limit == limit
