"""fastgate.auth.passwords: argon2id for the store, bcrypt/argon2 from htpasswd, weak hashes
refused at load time with the line named and the hash not shown."""

from __future__ import annotations

from pathlib import Path

import argon2
import bcrypt
import pytest

from fastgate.auth.passwords import (
    hash_password,
    is_supported,
    load_htpasswd,
    verify_or_dummy,
    verify_password,
)
from fastgate.errors import ConfigError

FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8192)


def bcrypt_hash(password: str, prefix: str = "$2y$") -> str:
    return prefix + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()[4:]


def test_store_hash_is_salted_argon2id() -> None:
    first, second = hash_password("s3cret"), hash_password("s3cret")
    assert first.startswith("$argon2id$") and first != second
    assert verify_password(first, "s3cret") and not verify_password(first, "s3cret ")


@pytest.mark.parametrize(
    "hashed",
    [
        pytest.param(bcrypt_hash("pw", "$2y$"), id="bcrypt 2y (Apache)"),
        pytest.param(bcrypt_hash("pw", "$2b$"), id="bcrypt 2b"),
        pytest.param(bcrypt_hash("pw", "$2a$"), id="bcrypt 2a"),
        pytest.param(FAST_ARGON2.hash("pw"), id="argon2id"),
    ],
)
def test_verify_supported(hashed: str) -> None:
    assert is_supported(hashed)
    assert verify_password(hashed, "pw")
    assert not verify_password(hashed, "pW")


@pytest.mark.parametrize(
    "hashed",
    [
        pytest.param("$apr1$abc$defghijklmnopqrstuv", id="apr1 md5"),
        pytest.param("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", id="sha1"),
        pytest.param("pw", id="plain"),
        pytest.param("$2y$04$broken", id="broken bcrypt"),
        pytest.param("$argon2id$v=19$broken", id="broken argon2"),
    ],
)
def test_verify_refuses_weak_or_broken(hashed: str) -> None:
    assert not verify_password(hashed, "pw")


def test_long_password_never_matches_bcrypt_prefix() -> None:
    hashed = bcrypt_hash("a" * 72)
    assert verify_password(hashed, "a" * 72)
    assert not verify_password(hashed, "a" * 72 + "tail")  # bcrypt would ignore the tail


def test_dummy_for_unknown_user() -> None:
    assert verify_or_dummy(None, "anything") is False
    assert verify_or_dummy(bcrypt_hash("pw"), "pw") is True


def test_load_htpasswd(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# users\nalice:{bcrypt_hash('a')}\n\nbob:{FAST_ARGON2.hash('b')}\n")
    users = load_htpasswd(path, "middlewares.b.htpasswd")
    assert sorted(users) == ["alice", "bob"]
    assert verify_password(users["alice"], "a") and verify_password(users["bob"], "b")


@pytest.mark.parametrize(
    "text, words",
    [
        pytest.param(
            "carol:$apr1$xyz$abcdefghijklmnopqrstuv\n",
            ":1: user 'carol' has a weak",
            id="md5 refused",
        ),
        pytest.param(
            "a:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", ":1: user 'a' has a weak", id="sha1 refused"
        ),
        pytest.param("# c\nnocolon\n", ":2: expected user:hash", id="no colon"),
        pytest.param("a:$2y$04$x\na:$2y$04$y\n", ":2: user 'a' appears twice", id="twice"),
    ],
)
def test_load_htpasswd_refuses(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_htpasswd(path, "middlewares.b.htpasswd")
    (where, why), *_ = err.value.errors
    assert where == "middlewares.b.htpasswd" and words in why
    assert "$apr1$" not in why and "{SHA}" not in why  # the hash is never shown


def test_load_htpasswd_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_htpasswd(tmp_path / "nope", "middlewares.b.htpasswd")
