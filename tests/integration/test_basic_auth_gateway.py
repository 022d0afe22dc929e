"""The basic_auth middleware in a real gateway: 401 with a Basic challenge without or with bad
credentials, 200 with good ones (bcrypt and argon2 htpasswd users, consumer-store users), the
identity forwarded with client-forged copies stripped, hide_credentials, and both user sources
picked up live when they change."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest
from conftest import Client, Gateway, Origin, assert_error, base_config, get, wait_for

from fastgate.auth.consumers import ConsumerStore

CHALLENGE = 'Basic realm="fastgate", charset="UTF-8"'
ALICE_PW = "alice-integration-pw"
BOB_PW = "bob:integration pw"


def bcrypt_hash(password: str) -> str:
    return "$2y$" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()[4:]


def argon2_hash(password: str) -> str:
    return argon2.PasswordHasher(time_cost=1, memory_cost=8192).hash(password)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def write_htpasswd(path: Path, entries: dict[str, str]) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text("".join(f"{user}:{hashed}\n" for user, hashed in entries.items()))
    tmp.replace(path)  # as an admin's tool would: the gateway never reads half a file


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users.htpasswd"
    write_htpasswd(path, {"alice": bcrypt_hash(ALICE_PW), "bob": argon2_hash(BOB_PW)})
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A consumer store with `carol` (password `carol-pw`)."""
    path = tmp_path / "consumers.db"
    with ConsumerStore(path, create=True) as s:
        s.add_consumer("carol", groups=["billing"], roles=["viewer"])
        s.set_password("carol", "carol-pw")
    return path


@pytest.fixture
def gw(
    origin: Origin,
    start_gateway: Callable[[dict[str, Any]], Gateway],
    users: Path,
    store: Path,
) -> Gateway:
    middlewares: dict[str, Any] = {
        "staff": {
            "type": "basic_auth",
            "htpasswd": str(users),
            "groups": {"ops": ["alice"]},
            "forward_headers": {"X-User": "subject", "X-Groups": "groups"},
        },
        "hidden": {
            "type": "basic_auth",
            "htpasswd": str(users),
            "realm": "hidden area",
            "forward_headers": {"X-User": "subject"},
            "hide_credentials": True,
        },
        "consumers": {
            "type": "basic_auth",
            "store": str(store),
            "forward_headers": {
                "X-User": "subject",
                "X-Consumer": "consumer",
                "X-Groups": "groups",
            },
            "hide_credentials": True,
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


def seen_headers(resp: Any) -> list[tuple[str, str]]:
    """The request head the origin received, names lowercased."""
    assert resp.status == 200, (resp.raw_head, resp.body)
    return [(k.lower(), v) for k, v in resp.json()["headers"]]


@pytest.mark.parametrize(
    "host, headers, message, challenge",
    [
        pytest.param("staff.test", {}, "authentication required", CHALLENGE, id="no credentials"),
        pytest.param(
            "staff.test", {"Authorization": "Bearer x.y.z"}, "authentication required",
            CHALLENGE, id="another scheme",
        ),
        pytest.param(
            "staff.test", {"Authorization": "Basic %%%"}, "malformed credentials", CHALLENGE,
            id="malformed",
        ),
        pytest.param(
            "staff.test", basic("alice", "guess-1234"), "invalid credentials", CHALLENGE,
            id="wrong password",
        ),
        pytest.param(
            "staff.test", basic("mallory", "guess-1234"), "invalid credentials", CHALLENGE,
            id="unknown user",
        ),
        pytest.param(
            "hidden.test", basic("bob", "guess-1234"), "invalid credentials",
            'Basic realm="hidden area", charset="UTF-8"', id="configured realm",
        ),
    ],
)  # fmt: skip
def test_refused(
    gw: Gateway, host: str, headers: dict[str, str], message: str, challenge: str
) -> None:
    resp = get(gw.addr, "/headers", host=host, headers={**headers, "X-User": "root"})
    doc = assert_error(resp, 401)
    assert doc["error"] == message
    assert resp.header("www-authenticate") == challenge
    assert b"guess-1234" not in resp.raw_head + resp.body
    assert "guess-1234" not in gw.log.read_text()


@pytest.mark.parametrize(
    "user, password, groups",
    [
        pytest.param("alice", ALICE_PW, "ops", id="bcrypt $2y$ user with a group"),
        pytest.param("bob", BOB_PW, None, id="argon2id user, colon in the password"),
    ],
)
def test_valid_credentials_reach_origin(
    gw: Gateway, user: str, password: str, groups: str | None
) -> None:
    forged = {"X-User": "root", "X-Groups": "admins", "X-Other": "kept"}
    with Client(gw.addr) as c:
        # Twice on one connection: the second answer comes from the success cache.
        for _ in range(2):
            resp = c.request(
                "GET", "/headers", host="staff.test", headers={**basic(user, password), **forged}
            )
            seen = seen_headers(resp)
            assert [v for k, v in seen if k == "x-user"] == [user]
            assert [v for k, v in seen if k == "x-groups"] == ([groups] if groups else [])
            assert ("x-other", "kept") in seen
            # Without hide_credentials the service gets the Authorization header as sent.
            assert ("authorization", basic(user, password)["Authorization"]) in seen


def test_hide_credentials(gw: Gateway) -> None:
    resp = get(gw.addr, "/headers", host="hidden.test", headers=basic("alice", ALICE_PW))
    seen = seen_headers(resp)
    assert ("x-user", "alice") in seen
    assert not [k for k, _ in seen if k == "authorization"]


def test_htpasswd_change_is_picked_up(gw: Gateway, users: Path) -> None:
    assert (
        get(gw.addr, "/headers", host="staff.test", headers=basic("alice", ALICE_PW)).status == 200
    )
    write_htpasswd(users, {"alice": bcrypt_hash("alice-rotated"), "bob": argon2_hash(BOB_PW)})

    def rotated() -> bool:
        resp = get(gw.addr, "/headers", host="staff.test", headers=basic("alice", "alice-rotated"))
        return resp.status == 200

    assert wait_for(rotated, timeout=10, interval=0.2)
    old = get(gw.addr, "/headers", host="staff.test", headers=basic("alice", ALICE_PW))
    assert_error(old, 401)


def test_consumer_store_users(gw: Gateway) -> None:
    forged = {"X-Consumer": "root", "X-User": "root"}
    resp = get(gw.addr, "/headers", host="consumers.test",
               headers={**basic("carol", "carol-pw"), **forged})  # fmt: skip
    seen = seen_headers(resp)
    assert [v for k, v in seen if k == "x-user"] == ["carol"]
    assert [v for k, v in seen if k == "x-consumer"] == ["carol"]
    assert [v for k, v in seen if k == "x-groups"] == ["billing"]
    assert not [k for k, _ in seen if k == "authorization"]
    for headers in (basic("carol", "nope"), basic("alice", ALICE_PW)):  # htpasswd users: no
        assert_error(get(gw.addr, "/headers", host="consumers.test", headers=headers), 401)


def test_consumer_store_change_is_picked_up(gw: Gateway, store: Path) -> None:
    good = basic("carol", "carol-pw")
    assert get(gw.addr, "/headers", host="consumers.test", headers=good).status == 200
    with ConsumerStore(store) as s:
        s.set_password("carol", "carol-pw-2")

    def refused() -> bool:
        return get(gw.addr, "/headers", host="consumers.test", headers=good).status == 401

    assert wait_for(refused, timeout=10, interval=0.2)  # the cached success was dropped
    new = get(gw.addr, "/headers", host="consumers.test", headers=basic("carol", "carol-pw-2"))
    assert new.status == 200
