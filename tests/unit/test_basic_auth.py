"""The basic_auth middleware: Basic credentials -> Identity from an htpasswd file (bcrypt and
argon2) or the consumer store; every refusal a 401 with a Basic challenge that never echoes
the password; the success cache, its reset on reload, the busy 503, and option errors."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest

from fastgate._core.accesslog import DENY_AUTH_FAILED
from fastgate._core.httphead import parse_request
from fastgate.auth.basic_credentials import BlockingPool
from fastgate.auth.consumers import ConsumerStore
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.basic_auth import BasicAuth
from fastgate.middleware.registry import build

CHALLENGE = 'Basic realm="fastgate", charset="UTF-8"'
ALICE_PW = "alice-secret-pw"  # bcrypt ($2y$)
BOB_PW = "bob:with:colons ü"  # argon2id; a password may hold colons and non-ASCII


def bcrypt_hash(password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return "$2y$" + hashed[4:]  # the prefix Apache's `htpasswd -B` writes


def argon2_hash(password: str) -> str:
    return argon2.PasswordHasher(time_cost=1, memory_cost=8192).hash(password)


ALICE_HASH = bcrypt_hash(ALICE_PW)
BOB_HASH = argon2_hash(BOB_PW)


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


def write_htpasswd(path: Path, entries: dict[str, str]) -> Path:
    """Write a new file and rename it over the old one (a new inode: the change is seen even
    when the size is the same and the mtime falls in the same clock tick)."""
    new = path.with_suffix(".new")
    new.write_text("# users\n" + "".join(f"{u}:{h}\n" for u, h in entries.items()))
    new.replace(path)
    return path


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return write_htpasswd(tmp_path / "users.htpasswd", {"alice": ALICE_HASH, "bob": BOB_HASH})


def middleware(htpasswd: Path, **options: Any) -> BasicAuth:
    return BasicAuth({"htpasswd": str(htpasswd), **options}, "staff")


async def verdict(mw: BasicAuth, ctx: RequestContext) -> LocalReply | None:
    """What the dispatcher would get: the verdict, awaited when it is a coroutine."""
    result = mw.on_request(ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(test())


def check(mw: BasicAuth, authorization: str | None) -> tuple[LocalReply | None, RequestContext]:
    ctx = request(authorization)
    return run(lambda: verdict(mw, ctx)), ctx


def refusal(reply: Any, status: int = 401) -> str:
    """The error message of a refusal, after checking its status and challenge."""
    assert isinstance(reply, LocalReply)
    assert reply.status == status
    if status == 401:
        assert dict(reply.headers) == {"WWW-Authenticate": CHALLENGE}
    return json.loads(reply.body)["error"]


# ---- what the header holds ---------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "authorization, outcome",
    [
        pytest.param(None, "authentication required", id="no header"),
        pytest.param("Bearer abc.def.ghi", "authentication required", id="another scheme"),
        pytest.param("Basic !!!not-base64", "malformed credentials", id="not base64"),
        pytest.param("Basic " + _b64(b"alice")[:-1], "malformed credentials", id="bad padding"),
        pytest.param("Basic " + _b64(b"alice"), "malformed credentials", id="no colon"),
        pytest.param("Basic " + _b64(b":" + b"pw"), "malformed credentials", id="empty user"),
        pytest.param("Basic " + _b64(b"al\x01ice:pw"), "malformed credentials", id="control char"),
        pytest.param("Basic " + _b64(b"alice:\xff\xfe"), "malformed credentials", id="not UTF-8"),
        pytest.param("Basic", "malformed credentials", id="scheme only"),
        pytest.param(basic("alice", ALICE_PW), "alice", id="bcrypt $2y$ user"),
        pytest.param(basic("bob", BOB_PW), "bob", id="argon2id user, colon in password"),
        pytest.param(
            "basic " + _b64(f"alice:{ALICE_PW}".encode()), "alice", id="scheme is case-insensitive"
        ),
        pytest.param(basic("alice", "wrong"), "invalid credentials", id="wrong password"),
        pytest.param(basic("mallory", "pw"), "invalid credentials", id="unknown user"),
        pytest.param(
            basic("mallory", ALICE_PW),
            "invalid credentials",
            id="unknown user with the password of the first user (checked as the decoy)",
        ),
        pytest.param(basic("alice", ""), "invalid credentials", id="empty password"),
        pytest.param(basic("alice", "x" * 100), "invalid credentials", id="over bcrypt's 72 bytes"),
    ],
)
def test_credentials(htpasswd: Path, authorization: str | None, outcome: str) -> None:
    mw = middleware(htpasswd)
    reply, ctx = check(mw, authorization)
    if outcome in ("alice", "bob"):
        assert reply is None
        assert ctx.identity == Identity(method="basic", subject=outcome)
    else:
        assert refusal(reply) == outcome
        assert ctx.identity is None
        assert mw.stats()["failures"] == {
            "missing credentials" if outcome == "authentication required" else outcome: 1
        }


def test_unknown_user_and_wrong_password_answer_alike(htpasswd: Path) -> None:
    mw = middleware(htpasswd)
    wrong, _ = check(mw, basic("alice", "not-it"))
    unknown, _ = check(mw, basic("nobody", "not-it"))
    assert isinstance(wrong, LocalReply) and wrong == unknown
    assert wrong.encode(b"r" * 32, False) == unknown.encode(b"r" * 32, False)
    # Both ran a full check: the unknown user against the dummy hash.
    assert mw.stats()["verified"] == 2
    assert mw.stats()["failures"] == {"invalid credentials": 2}


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(basic("alice", "Pa55-guess-\u00e9"), id="wrong password"),
        pytest.param(basic("Pa55-guess-\u00e9", "Pa55-guess-\u00e9"), id="unknown user"),
        pytest.param("Basic " + _b64("Pa55-guess-\u00e9".encode()), id="malformed"),
    ],
)
def test_refusal_never_echoes_the_password(
    htpasswd: Path, authorization: str, caplog: pytest.LogCaptureFixture
) -> None:
    mw = middleware(htpasswd)
    with caplog.at_level("DEBUG"):
        reply, _ = check(mw, authorization)
    assert isinstance(reply, LocalReply) and reply.status == 401
    wire = reply.encode(b"r" * 32, False)
    encoded = authorization.split()[1]
    for secret in ("Pa55-guess", encoded):
        assert secret.encode() not in wire
        assert secret not in caplog.text
    assert dict(reply.headers)["WWW-Authenticate"] == CHALLENGE


def test_refusal_is_audited_without_the_password(
    htpasswd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mw = middleware(htpasswd)
    with caplog.at_level("DEBUG"):
        _, ctx = check(mw, basic("alice", "hunter2-guess"))
    # Noted on the connection (the audit line): no user name, no password, a fixed phrase.
    assert ctx.conn.denies == [(DENY_AUTH_FAILED, "staff", "invalid credentials")]
    assert "hunter2" not in caplog.text
    assert _b64(b"alice:hunter2-guess") not in caplog.text


# ---- identity, forwarding and options shared with the other auth middlewares --------------


def test_groups_and_forward_headers(htpasswd: Path) -> None:
    mw = middleware(
        htpasswd,
        groups={"ops": ["alice", "bob"], "admins": ["alice"], "empty": []},
        forward_headers={"X-User": "subject", "X-Groups": "groups", "X-Consumer": "consumer"},
        hide_credentials=True,
    )
    assert set(mw.strip_request_headers) == {
        b"x-user",
        b"x-groups",
        b"x-consumer",
        b"authorization",
    }
    reply, ctx = check(mw, basic("alice", ALICE_PW))
    assert reply is None
    assert ctx.identity == Identity(
        method="basic", subject="alice", groups=frozenset({"ops", "admins"})
    )
    # No consumer for an htpasswd user: that header is left out, not sent empty.
    assert ctx.conn.upstream == [b"X-User: alice\r\nX-Groups: admins,ops\r\n"]
    _, ctx = check(mw, basic("bob", BOB_PW))
    assert ctx.identity is not None and ctx.identity.groups == {"ops"}


def test_credentials_forwarded_unless_hidden(htpasswd: Path) -> None:
    assert middleware(htpasswd).strip_request_headers == ()
    assert middleware(htpasswd, hide_credentials=True).strip_request_headers == (b"authorization",)


def test_custom_realm(htpasswd: Path) -> None:
    reply = middleware(htpasswd, realm="Staff area #2").on_request(request())
    assert isinstance(reply, LocalReply)
    assert dict(reply.headers) == {
        "WWW-Authenticate": 'Basic realm="Staff area #2", charset="UTF-8"'
    }


@pytest.mark.parametrize(
    "authorization, identified_before, outcome",
    [
        pytest.param(None, False, None, id="no credentials pass on"),
        pytest.param("Bearer x", False, None, id="another scheme passes on"),
        pytest.param("Basic %%%", False, "malformed credentials", id="malformed still refused"),
        pytest.param(basic("alice", "no"), False, "invalid credentials", id="wrong still refused"),
        pytest.param(basic("alice", "no"), True, None, id="already identified: skipped"),
    ],
)
def test_optional(
    htpasswd: Path, authorization: str | None, identified_before: bool, outcome: str | None
) -> None:
    mw = middleware(htpasswd, optional=True)
    ctx = request(authorization)
    if identified_before:
        ctx.identity = Identity(method="jwt", subject="carol")
    reply = run(lambda: verdict(mw, ctx))
    if outcome is None:
        assert reply is None
    else:
        assert refusal(reply) == outcome


# ---- the success cache -----------------------------------------------------------------------


def test_cache_hit_skips_the_check(htpasswd: Path) -> None:
    mw = middleware(htpasswd)

    async def scenario() -> None:
        first = mw.on_request(request(basic("bob", BOB_PW)))
        assert inspect.isawaitable(first)  # a miss waits for the pool
        assert await first is None
        ctx = request(basic("bob", BOB_PW))
        assert mw.on_request(ctx) is None  # a hit answers at once, no coroutine
        assert ctx.identity is not None and ctx.identity.subject == "bob"
        # Another password for the same user is not a hit.
        assert refusal(await verdict(mw, request(basic("bob", "other")))) == "invalid credentials"

    run(scenario)
    assert mw.stats() == {
        "cached": 1,
        "verified": 2,
        "failures": {"invalid credentials": 1},
        "busy": 0,
    }


@pytest.mark.parametrize(
    "options, authorization, verified",
    [
        pytest.param({"cache_ttl": 0}, basic("alice", ALICE_PW), 3, id="cache_ttl 0 is off"),
        pytest.param({}, basic("alice", "wrong"), 3, id="failures are never cached"),
        pytest.param({}, basic("mallory", "pw"), 3, id="unknown users are never cached"),
        pytest.param({}, basic("alice", ALICE_PW), 1, id="success cached"),
    ],
)
def test_what_is_cached(
    htpasswd: Path, options: dict[str, Any], authorization: str, verified: int
) -> None:
    mw = middleware(htpasswd, **options)

    async def scenario() -> None:
        for _ in range(3):
            await verdict(mw, request(authorization))

    run(scenario)
    assert mw.stats()["verified"] == verified
    assert mw.stats()["cached"] == (1 if verified == 1 else 0)


def test_cache_entries_expire(htpasswd: Path) -> None:
    mw = middleware(htpasswd, cache_ttl=5)
    now = [1000.0]
    mw.cache.clock = lambda: now[0]
    check(mw, basic("alice", ALICE_PW))
    check(mw, basic("alice", ALICE_PW))
    assert mw.stats()["verified"] == 1
    now[0] += 5.0
    check(mw, basic("alice", ALICE_PW))
    assert mw.stats()["verified"] == 2


# ---- the htpasswd file: weak hashes, reloads ------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("carol:$apr1$abcdefgh$0123456789abcdefghijkl", id="apr1 MD5"),
        pytest.param("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", id="SHA-1"),
        pytest.param("carol:plain-text-password", id="plain"),
        pytest.param("carol:abJnggxhB/yWI", id="crypt DES"),
        pytest.param("carol:$1$saltsalt$abcdefghijklmnopqrstuv", id="crypt MD5"),
        pytest.param("carol:$6$saltsalt$" + "a" * 86, id="crypt SHA-512"),
    ],
)
def test_weak_hash_refused_naming_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "users.htpasswd"
    path.write_text(f"alice:{ALICE_HASH}\n{line}\n")
    with pytest.raises(ConfigError) as err:
        middleware(path)
    assert err.value.path == "htpasswd"
    assert f"{path}:2" in err.value.reason and "'carol'" in err.value.reason
    assert line.split(":", 1)[1] not in str(err.value)  # the hash is never repeated


def _advance(mw: BasicAuth, seconds: float) -> None:
    """Move the htpasswd source's clock so its next poll looks at the file."""
    source: Any = mw.source
    base = source.clock()
    source.clock = lambda: base + seconds


async def _reload(mw: BasicAuth, trigger: str) -> LocalReply | None:
    """One request (which notices the change and starts the reload), then the reload itself."""
    _advance(mw, 1.5)
    result = await verdict(mw, request(trigger))
    source: Any = mw.source
    reloading = source.reloading
    if reloading is not None:
        await asyncio.wait([reloading])  # a broken file ends it with an error: not raised here
        await asyncio.sleep(0)  # its done-callback (the swap, or the warning) has run
    assert source.reloading is None
    return result


def test_reload_on_change_clears_the_cache(htpasswd: Path) -> None:
    mw = middleware(htpasswd)

    async def scenario() -> None:
        assert await verdict(mw, request(basic("alice", ALICE_PW))) is None
        assert mw.stats()["cached"] == 1
        write_htpasswd(htpasswd, {"alice": bcrypt_hash("alice-new-pw"), "bob": BOB_HASH})
        await _reload(mw, basic("bob", BOB_PW))
        assert mw.source.reloads == 1  # type: ignore[attr-defined]
        assert mw.stats()["cached"] == 0
        old = await verdict(mw, request(basic("alice", ALICE_PW)))
        assert refusal(old) == "invalid credentials"
        assert await verdict(mw, request(basic("alice", "alice-new-pw"))) is None

    run(scenario)


def test_unchanged_file_is_not_reread(htpasswd: Path) -> None:
    mw = middleware(htpasswd)

    async def scenario() -> None:
        await _reload(mw, basic("alice", ALICE_PW))
        await _reload(mw, basic("alice", ALICE_PW))

    run(scenario)
    assert mw.source.reloads == 0  # type: ignore[attr-defined]
    assert mw.stats()["cached"] == 1


def test_check_started_before_a_reload_is_not_cached(htpasswd: Path) -> None:
    mw = middleware(htpasswd)

    async def scenario() -> None:
        pending = mw.on_request(request(basic("alice", ALICE_PW)))
        assert inspect.isawaitable(pending)
        write_htpasswd(htpasswd, {"alice": ALICE_HASH, "bob": bcrypt_hash("bob-2")})
        await _reload(mw, basic("bob", "bob-2"))
        assert await pending is None  # admitted: it was right when it started ...
        assert mw.stats()["cached"] == 0  # ... but not remembered across the change

    run(scenario)


@pytest.mark.parametrize(
    "content, why",
    [
        pytest.param(
            f"alice:{ALICE_HASH}\ndave:$apr1$weakweak$SECRETHASHVALUE1234567\n",
            ":2: ",
            id="weak hash",
        ),
        pytest.param("alice\n", ":1: expected user:hash", id="no colon"),
        pytest.param(f"alice:{ALICE_HASH}\nalice:{ALICE_HASH}\n", "appears twice", id="duplicate"),
        pytest.param(b"alice:\xff\xfe\n", "cannot read", id="not UTF-8"),
    ],
)
def test_broken_reload_keeps_the_old_users(
    htpasswd: Path, content: str | bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    mw = middleware(htpasswd)

    async def scenario() -> None:
        if isinstance(content, bytes):
            htpasswd.write_bytes(content)
        else:
            htpasswd.write_text(content)
        with caplog.at_level("INFO", logger="fastgate.basic_auth"):
            assert await _reload(mw, basic("alice", ALICE_PW)) is None
        assert await verdict(mw, request(basic("bob", BOB_PW))) is None  # bob is still there

    run(scenario)
    assert mw.source.reloads == 0  # type: ignore[attr-defined]
    warnings = [r.getMessage() for r in caplog.records if r.name == "fastgate.basic_auth"]
    assert len(warnings) == 1 and why in warnings[0] and "not reloaded" in warnings[0]
    assert "SECRETHASHVALUE" not in caplog.text and ALICE_HASH not in caplog.text


def test_removed_file_keeps_the_old_users(htpasswd: Path) -> None:
    mw = middleware(htpasswd)

    async def scenario() -> None:
        htpasswd.unlink()
        assert await _reload(mw, basic("alice", ALICE_PW)) is None
        write_htpasswd(htpasswd, {"alice": ALICE_HASH})  # back, without bob
        await _reload(mw, basic("alice", ALICE_PW))
        assert refusal(await verdict(mw, request(basic("bob", BOB_PW)))) == "invalid credentials"

    run(scenario)
    assert mw.source.reloads == 1  # type: ignore[attr-defined]


# ---- the bounded pool ------------------------------------------------------------------------


def test_busy_pool_answers_503(htpasswd: Path) -> None:
    mw = middleware(htpasswd)
    mw.pool = BlockingPool(max_pending=0)
    reply, ctx = check(mw, basic("alice", ALICE_PW))
    assert isinstance(reply, LocalReply) and reply.status == 503
    assert json.loads(reply.body)["error"] == "authentication busy"
    assert dict(reply.headers) == {"Retry-After": "1"}
    assert ALICE_PW.encode() not in reply.encode(b"r" * 32, False)
    assert ctx.identity is None
    assert mw.stats() == {"cached": 0, "verified": 0, "failures": {"auth busy": 1}, "busy": 1}
    assert mw.pool.rejected == 1


def test_busy_pool_still_serves_cache_hits(htpasswd: Path) -> None:
    mw = middleware(htpasswd)
    check(mw, basic("alice", ALICE_PW))
    mw.pool = BlockingPool(max_pending=0)
    assert check(mw, basic("alice", ALICE_PW))[0] is None
    assert check(mw, basic("bob", BOB_PW))[0] is not None
    assert mw.stats()["busy"] == 1


# ---- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path, words",
    [
        pytest.param({}, "htpasswd", "exactly one", id="no user source"),
        pytest.param({"store": "default"}, "htpasswd", "exactly one", id="both sources"),
        pytest.param({"htpasswd": ""}, "htpasswd", "expected a path", id="empty htpasswd"),
        pytest.param({"realm": 'a"b'}, "realm", "double quote", id="realm with a quote"),
        pytest.param({"realm": "a\\b"}, "realm", "backslash", id="realm with a backslash"),
        pytest.param({"realm": "a\r\nX: y"}, "realm", "printable", id="realm with CRLF"),
        pytest.param({"realm": ""}, "realm", "printable", id="empty realm"),
        pytest.param({"realm": "r" * 129}, "realm", "128", id="long realm"),
        pytest.param({"realm": 5}, "realm", "string", id="realm not text"),
        pytest.param({"cache_ttl": 3601}, "cache_ttl", "3600", id="cache_ttl too long"),
        pytest.param({"cache_ttl": -1}, "cache_ttl", "0", id="negative cache_ttl"),
        pytest.param({"cache_ttl": "30"}, "cache_ttl", "number", id="cache_ttl as text"),
        pytest.param({"cache_ttl": True}, "cache_ttl", "number", id="cache_ttl as bool"),
        pytest.param({"groups": {"a,b": ["alice"]}}, "groups.a,b", "group", id="comma group"),
        pytest.param({"groups": {"ops": "alice"}}, "groups.ops", "list", id="members not list"),
        pytest.param({"groups": {"ops": [""]}}, "groups.ops[0]", "user", id="empty member"),
        pytest.param({"users": []}, "users", "unknown key", id="unknown option"),
        pytest.param(
            {"hide_credentials": "yes"},
            "hide_credentials",
            "true or false",
            id="common option checked",
        ),
        pytest.param(
            {"forward_headers": {"Host": "subject"}},
            "forward_headers.Host",
            "gateway owns",
            id="reserved forward header",
        ),
    ],
)
def test_option_errors(htpasswd: Path, options: dict[str, Any], path: str, words: str) -> None:
    if options:  # the empty case checks that a user source is required
        options = {"htpasswd": str(htpasswd), **options}
    with pytest.raises(ConfigError) as err:
        BasicAuth(options, "staff")
    assert err.value.path.endswith(path)
    assert words in err.value.reason


@pytest.mark.parametrize(
    "options, path, words",
    [
        pytest.param(
            {"htpasswd": "/nonexistent/users"}, "htpasswd", "cannot read", id="missing file"
        ),
        pytest.param(
            {"store": "/tmp/x.db", "groups": {"ops": ["a"]}},
            "groups",
            "consumer store",
            id="groups with a store",
        ),
        pytest.param({"store": " "}, "store", "expected a path", id="blank store"),
    ],
)
def test_source_option_errors(options: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        BasicAuth(options, "staff")
    assert err.value.path == path
    assert words in err.value.reason


def test_registered_by_type(htpasswd: Path) -> None:
    mw = build("staff", "basic_auth", {"htpasswd": str(htpasswd)})
    assert isinstance(mw, BasicAuth) and mw.type == "basic_auth"


# ---- the consumer store ----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "consumers.db"
    with ConsumerStore(path, create=True) as s:
        s.add_consumer("alice", groups=["ops"], roles=["admin"], scopes=["read"])
        s.set_password("alice", "store-pw")
        s.add_consumer("nopass")
    return path


@pytest.fixture
def store_middleware(store: Path) -> Iterator[Callable[..., BasicAuth]]:
    """Build store-backed middlewares; each takes one use of the process's shared watcher,
    given back at teardown (the last one closes the store)."""
    made: list[BasicAuth] = []

    def make(path: Path | str = store, **options: Any) -> BasicAuth:
        mw = BasicAuth({"store": str(path), **options}, "staff")
        made.append(mw)
        return mw

    yield make
    for mw in made:
        mw.close()


@pytest.mark.parametrize(
    "authorization, outcome",
    [
        pytest.param(basic("alice", "store-pw"), None, id="consumer with a password"),
        pytest.param(basic("alice", "wrong"), "invalid credentials", id="wrong password"),
        pytest.param(basic("nopass", ""), "invalid credentials", id="consumer without password"),
        pytest.param(basic("nobody", "x"), "invalid credentials", id="no such consumer"),
    ],
)
def test_store_users(
    store_middleware: Callable[..., BasicAuth], authorization: str, outcome: str | None
) -> None:
    mw = store_middleware(forward_headers={"X-Consumer": "consumer", "X-Roles": "roles"})
    reply, ctx = check(mw, authorization)
    if outcome is None:
        assert reply is None
        assert ctx.identity == Identity(
            method="basic",
            subject="alice",
            consumer="alice",
            scopes=frozenset({"read"}),
            roles=frozenset({"admin"}),
            groups=frozenset({"ops"}),
        )
        assert ctx.conn.upstream == [b"X-Consumer: alice\r\nX-Roles: admin\r\n"]
    else:
        assert refusal(reply) == outcome


def test_store_change_clears_the_cache(
    store: Path, store_middleware: Callable[..., BasicAuth]
) -> None:
    mw = store_middleware()

    async def scenario() -> None:
        assert await verdict(mw, request(basic("alice", "store-pw"))) is None
        assert mw.on_request(request(basic("alice", "store-pw"))) is None  # cached
        assert mw.stats()["cached"] == 1
        with ConsumerStore(store) as s:
            s.set_password("alice", "store-pw-2")
            s.update_consumer("alice", groups=["ops", "oncall"])
        assert mw.source.watcher.refresh()  # type: ignore[attr-defined]
        old = await verdict(mw, request(basic("alice", "store-pw")))
        assert refusal(old) == "invalid credentials"
        assert mw.stats()["cached"] == 0
        ctx = request(basic("alice", "store-pw-2"))
        assert await verdict(mw, ctx) is None
        assert ctx.identity is not None and ctx.identity.groups == {"ops", "oncall"}

    run(scenario)
    assert mw.stats()["verified"] == 3


def test_store_default_path(
    store_middleware: Callable[..., BasicAuth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTGATE_DATA_DIR", str(tmp_path))  # default = <dir>/consumers.db
    mw = store_middleware("default")
    assert check(mw, basic("alice", "store-pw"))[0] is None


def test_close_releases_the_shared_watcher(store: Path) -> None:
    from fastgate.auth.consumers import StoreWatcher

    first = BasicAuth({"store": str(store)}, "a")
    second = BasicAuth({"store": str(store)}, "b")
    watcher = first.source.watcher  # type: ignore[attr-defined]
    assert second.source.watcher is watcher  # type: ignore[attr-defined]
    first.close()
    first.close()  # once only: the second instance still holds the watcher
    assert StoreWatcher.for_path(store) is watcher
    watcher.stop()  # the use just taken
    second.close()
    fresh = StoreWatcher.for_path(store)  # the last use ended: a new watcher
    assert fresh is not watcher
    fresh.stop()


@pytest.mark.parametrize(
    "content, words",
    [
        pytest.param(None, "no consumer store", id="no file"),
        pytest.param(b"not a database at all, just some text" * 100, "not a fastgate", id="junk"),
    ],
)
def test_store_that_cannot_open(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "consumers.db"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        BasicAuth({"store": str(path)}, "staff")
    assert err.value.path == "store"
    assert words in err.value.reason
