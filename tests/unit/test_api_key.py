"""The api_key middleware against a real consumer store: where the key is read (header, opt-in
query), identities, the 401 replies and their challenge, optional mode, which headers are
stripped, what is forwarded, and option errors with key paths."""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastgate._core.httphead import parse_request
from fastgate.auth.consumers import ConsumerStore
from fastgate.errors import ConfigError
from fastgate.middleware.api_key import ApiKey
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import build

CHALLENGE = 'ApiKey realm="fastgate", header="X-API-Key"'


class Conn:
    """The part of a client connection an auth middleware touches."""

    client_ip = "127.0.0.1"
    request_id = b"0" * 32

    def __init__(self) -> None:
        self.upstream: list[bytes] = []

    def add_upstream_headers(self, lines: bytes) -> None:
        self.upstream.append(lines)


@pytest.fixture
def store_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "consumers.db"
    with ConsumerStore(path, create=True) as s:
        s.add_consumer("alice", groups=["eng"], roles=["admin"], scopes=["read", "write"])
        s.add_consumer("bob")
    yield path


@pytest.fixture
def keys(store_path: Path) -> dict[str, str]:
    """alice's key, bob's key, a revoked key and an expired key (all made before the
    middleware loads its snapshot)."""
    with ConsumerStore(store_path) as s:
        out = {"alice": s.add_key("alice")[1], "bob": s.add_key("bob", label="ci")[1]}
        revoked_id, out["revoked"] = s.add_key("alice")
        s.revoke_key(revoked_id)
        out["expired"] = s.add_key("alice", expires=time.time() - 1)[1]
    return out


@pytest.fixture
def make(store_path: Path) -> Iterator[Any]:
    built: list[ApiKey] = []

    def make(**options: Any) -> ApiKey:
        mw = ApiKey({"store": str(store_path), **options}, "keys")
        built.append(mw)
        return mw

    yield make
    for mw in built:
        mw.close()


def request(headers: dict[str, str] | list[tuple[str, str]] = (), target: str = "/api") -> Any:
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"GET {target} HTTP/1.1", "Host: api.test", *(f"{k}: {v}" for k, v in items)]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    head, used = parse_request(raw)
    assert head is not None and used == len(raw)
    return RequestContext(conn=Conn(), head=head)


def refusal(reply: Any) -> tuple[str, str | None]:
    assert isinstance(reply, LocalReply)
    assert reply.status == 401
    return json.loads(reply.body)["error"], dict(reply.headers).get("WWW-Authenticate")


ALICE = Identity(
    method="api_key",
    subject="alice",
    consumer="alice",
    scopes=frozenset({"read", "write"}),
    roles=frozenset({"admin"}),
    groups=frozenset({"eng"}),
)


# ---- where the key is ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, where",
    [
        pytest.param({}, "header:X-API-Key", id="default header"),
        pytest.param({}, "header:x-api-key", id="header name case-insensitive"),
        pytest.param({"header": "X-Key"}, "header:X-Key", id="custom header"),
        pytest.param({"query": "api_key"}, "query:api_key", id="query opt-in"),
        pytest.param({"query": "api_key"}, "header:X-API-Key", id="header still works"),
    ],
)
def test_key_accepted(make, keys: dict[str, str], options: dict, where: str) -> None:
    kind, name = where.split(":")
    key = keys["alice"]
    ctx = request({name: key}) if kind == "header" else request(target=f"/api?x=1&{name}={key}")
    mw = make(**options)
    assert mw.on_request(ctx) is None
    assert ctx.identity == ALICE
    assert key not in repr(ctx.identity)
    assert mw.stats()["verified"] == 1


def test_consumer_without_groups(make, keys: dict[str, str]) -> None:
    ctx = request({"X-API-Key": keys["bob"]})
    assert make().on_request(ctx) is None
    assert ctx.identity == Identity(method="api_key", subject="bob", consumer="bob")


def test_is_synchronous(make, keys: dict[str, str]) -> None:
    """The request path returns None or a LocalReply, never a coroutine to await."""
    mw = make()
    for key in (keys["alice"], "fgk_000000000000_" + "A" * 43, None):
        result = mw.on_request(request({} if key is None else {"X-API-Key": key}))
        assert result is None or isinstance(result, LocalReply)


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, headers, target, reason",
    [
        pytest.param({}, {}, "/api", "missing api key", id="no key"),
        pytest.param({}, {"X-API-Key": ""}, "/api", "missing api key", id="empty header"),
        pytest.param({}, {}, "/api?api_key=K", "missing api key", id="query not enabled"),
        pytest.param({}, {"X-Key": "K"}, "/api", "missing api key", id="other header"),
        pytest.param({}, {"X-API-Key": "nonsense"}, "/api", "invalid api key", id="malformed"),
        pytest.param(
            {},
            {"X-API-Key": "fgk_000000000000_" + "A" * 43},
            "/api",
            "invalid api key",
            id="unknown id",
        ),
        pytest.param({}, {"X-API-Key": "WRONG"}, "/api", "invalid api key", id="wrong secret"),
        pytest.param({}, {"X-API-Key": "REVOKED"}, "/api", "invalid api key", id="revoked"),
        pytest.param({}, {"X-API-Key": "EXPIRED"}, "/api", "invalid api key", id="expired"),
        pytest.param(
            {},
            [("X-API-Key", "K"), ("X-API-Key", "K")],
            "/api",
            "invalid api key",
            id="two key headers",
        ),
        pytest.param(
            {"query": "api_key"},
            {},
            "/api?api_key=K&api_key=K",
            "invalid api key",
            id="two query keys",
        ),
    ],
)
def test_refused(
    make, keys: dict[str, str], options: dict, headers: Any, target: str, reason: str
) -> None:
    alice = keys["alice"]
    wrong = alice[:-2] + ("B" if alice[-2] != "B" else "C") + alice[-1]
    subst = {"K": alice, "WRONG": wrong, "REVOKED": keys["revoked"], "EXPIRED": keys["expired"]}
    items = headers.items() if isinstance(headers, dict) else headers
    headers = [(k, subst.get(v, v)) for k, v in items]
    mw = make(**options)
    ctx = request(headers, target.replace("=K", "=" + alice))
    message, challenge = refusal(mw.on_request(ctx))
    assert message == reason
    assert challenge == CHALLENGE
    assert ctx.identity is None
    assert ctx.conn.upstream == []
    assert sum(mw.stats()["failures"].values()) == 1


def test_challenge_names_the_header(make) -> None:
    _, challenge = refusal(make(header="X-Key").on_request(request()))
    assert challenge == 'ApiKey realm="fastgate", header="X-Key"'


def test_refusal_never_echoes_the_key(make, keys: dict[str, str], caplog) -> None:
    key = keys["revoked"]
    with caplog.at_level("DEBUG"):
        reply = make().on_request(request({"X-API-Key": key}))
    assert key.encode() not in reply.body
    assert key[17:] not in caplog.text


# ---- optional --------------------------------------------------------------------------------


def test_optional(make, keys: dict[str, str]) -> None:
    mw = make(optional=True)
    anonymous = request()
    assert mw.on_request(anonymous) is None and anonymous.identity is None
    message, _ = refusal(mw.on_request(request({"X-API-Key": keys["revoked"]})))
    assert message == "invalid api key"  # a wrong key is still refused
    known = Identity(method="jwt", subject="carol")
    ctx = request({"X-API-Key": keys["revoked"]})
    ctx.identity = known
    assert mw.on_request(ctx) is None and ctx.identity is known  # already identified


# ---- what goes upstream ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, strip",
    [
        pytest.param({}, (), id="nothing by default"),
        pytest.param({"hide_credentials": True}, (b"x-api-key",), id="hide the key header"),
        pytest.param(
            {"hide_credentials": True, "header": "X-Key"}, (b"x-key",), id="hide a custom header"
        ),
        pytest.param(
            {"forward_headers": {"X-Consumer": "consumer"}},
            (b"x-consumer",),
            id="forwarded headers are always stripped",
        ),
        pytest.param(
            {"forward_headers": {"X-Consumer": "consumer"}, "hide_credentials": True},
            (b"x-consumer", b"x-api-key"),
            id="both",
        ),
    ],
)
def test_strip_request_headers(make, options: dict, strip: tuple[bytes, ...]) -> None:
    assert make(**options).strip_request_headers == strip


def test_forward_headers(make, keys: dict[str, str]) -> None:
    mw = make(
        forward_headers={
            "X-Consumer": "consumer",
            "X-Subject": "subject",
            "X-Method": "method",
            "X-Scopes": "scopes",
            "X-Roles": "roles",
            "X-Groups": "groups",
        }
    )
    ctx = request({"X-API-Key": keys["alice"], "X-Consumer": "forged"})
    assert mw.on_request(ctx) is None
    assert ctx.conn.upstream == [
        b"X-Consumer: alice\r\nX-Subject: alice\r\nX-Method: api_key\r\n"
        b"X-Scopes: read,write\r\nX-Roles: admin\r\nX-Groups: eng\r\n"
    ]
    bob = request({"X-API-Key": keys["bob"]})
    assert mw.on_request(bob) is None
    # Empty sets are left out rather than sent empty.
    assert bob.conn.upstream == [b"X-Consumer: bob\r\nX-Subject: bob\r\nX-Method: api_key\r\n"]


def test_query_with_hide_credentials_warns(make) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(query="api_key", hide_credentials=True)
        make(query="api_key")
        make(hide_credentials=True)
    assert [str(w.message) for w in caught] == [
        "middlewares.keys.hide_credentials: the `api_key` query parameter is still passed "
        "upstream (only the header is hidden)"
    ]


# ---- the store -------------------------------------------------------------------------------


def test_sees_store_changes(make, store_path: Path, keys: dict[str, str]) -> None:
    """Outside a loop nothing refreshes by itself; `refresh()` is what the task runs."""
    mw = make()
    assert mw.on_request(request({"X-API-Key": keys["alice"]})) is None
    with ConsumerStore(store_path) as s:
        key_id = s.list_keys("alice")[0].key_id
        s.revoke_key(key_id)
        _, new = s.add_key("bob")
    assert mw.watcher.refresh() is True
    assert refusal(mw.on_request(request({"X-API-Key": keys["alice"]})))[0] == "invalid api key"
    assert mw.on_request(request({"X-API-Key": new})) is None
    stats = mw.stats()
    assert stats["keys"] == 3 and stats["consumers"] == 2  # unrevoked: expired, bob x2


def test_repeated_key_is_remembered_until_the_store_changes(
    make, store_path: Path, keys: dict[str, str]
) -> None:
    mw = make()
    for _ in range(3):
        assert mw.on_request(request({"X-API-Key": keys["alice"]})) is None
    assert mw.verified == 1  # one HMAC, then the per-snapshot cache
    with ConsumerStore(store_path) as s:
        s.revoke_key(s.list_keys("alice")[0].key_id)
    assert mw.watcher.refresh() is True
    assert refusal(mw.on_request(request({"X-API-Key": keys["alice"]})))[0] == "invalid api key"


def test_remembered_key_expires(make, store_path: Path) -> None:
    with ConsumerStore(store_path) as s:
        key = s.add_key("bob", expires=time.time() + 30)[1]
    mw = make()
    mw.watcher.refresh()
    assert mw.on_request(request({"X-API-Key": key})) is None
    mw.clock = lambda: time.time() + 31
    assert refusal(mw.on_request(request({"X-API-Key": key})))[0] == "invalid api key"


def test_instances_share_one_watcher(make) -> None:
    first, second = make(), make(header="X-Other")
    assert first.watcher is second.watcher
    first.close()
    # The other instance still serves from a live watcher (a reload closes the old one).
    assert second.on_request(request()) is not None
    assert second.watcher._stopped is False


# ---- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path, reason",
    [
        pytest.param({"store": "MISSING"}, "store", "no consumer store at", id="missing store"),
        pytest.param({"store": "NOTASTORE"}, "store", "not a fastgate", id="not a store"),
        pytest.param({"store": " "}, "store", "expected a file path", id="blank store"),
        pytest.param({"header": "X API"}, "header", "not a valid header name", id="bad header"),
        pytest.param({"header": "Host"}, "header", "frames the message", id="host header"),
        pytest.param({"query": "a&b"}, "query", "query parameter name", id="bad query"),
        pytest.param({"keyz": 1}, "keyz", "unknown key", id="unknown option"),
        pytest.param(
            {"hide_credentials": "yes"}, "hide_credentials", "true or false", id="hide not bool"
        ),
        pytest.param(
            {"forward_headers": {"Host": "consumer"}},
            "forward_headers.Host",
            "the gateway owns",
            id="reserved forward header",
        ),
    ],
)
def test_option_errors(store_path: Path, options: dict, path: str, reason: str) -> None:
    (store_path.parent / "not-a-store.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    paths = {"MISSING": store_path.parent / "nope" / "c.db", "NOTASTORE": "not-a-store.db"}
    store = options.get("store")
    if store in paths:
        options = {**options, "store": str(store_path.parent / paths[store])}
    full = {"store": str(store_path), **options}
    with pytest.raises(ConfigError) as info:
        build("keys", "api_key", full)
    got_path, got_reason = info.value.errors[0]
    assert got_path.removeprefix("middlewares.keys.") == path
    assert reason in got_reason
    assert not (store_path.parent / "nope").exists()  # never creates the store


def test_missing_store_message(tmp_path: Path) -> None:
    target = tmp_path / "c.db"
    with pytest.raises(ConfigError) as info:
        build("keys", "api_key", {"store": str(target)})
    assert info.value.path == "store"
    assert info.value.reason == (
        f"no consumer store at {target}: create it with `fastgate consumers add`"
    )
    assert not target.exists()


def test_default_store_from_env(
    monkeypatch: pytest.MonkeyPatch, store_path: Path, keys: dict[str, str]
) -> None:
    monkeypatch.setenv("FASTGATE_DATA_DIR", str(store_path.parent))
    mw = ApiKey({}, "keys")
    try:
        assert mw.path == str(store_path)
        assert mw.on_request(request({"X-API-Key": keys["bob"]})) is None
    finally:
        mw.close()


def test_first_request_on_a_loop_checks_the_store(
    make, store_path: Path, keys: dict[str, str]
) -> None:
    """The snapshot loaded at build time may be old when serving starts: the first request on
    a loop waits for a check of the store, later ones are decided synchronously."""
    mw = make()
    with ConsumerStore(store_path) as s:
        s.revoke_key(s.list_keys("alice")[0].key_id)  # after the middleware was built

    async def scenario() -> None:
        first = mw.on_request(request({"X-API-Key": keys["alice"]}))
        assert not isinstance(first, LocalReply) and first is not None  # an awaitable
        message, _ = refusal(await first)
        assert message == "invalid api key"
        assert mw.watcher.running
        again = mw.on_request(request({"X-API-Key": keys["bob"]}))
        assert again is None  # synchronous now: the refresh task keeps the snapshot fresh

    asyncio.run(scenario())
    assert not mw.watcher.running  # the loop is gone, and its task with it
