"""`fastgate consumers` and `fastgate keys`, run as the real command (`python -m fastgate`):
output, exit codes (0 ok, 1 one-line error, no traceback), the key shown once, the default
store location, and that what the command writes is what the middleware reads."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgate.auth.consumers import ConsumerStore

ROOT = Path(__file__).resolve().parents[2]


def fastgate(
    *args: str, data_dir: Path, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FASTGATE_")}
    environ["FASTGATE_DATA_DIR"] = str(data_dir)
    environ["PYTHONPATH"] = str(ROOT) + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fastgate", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def ok(*args: str, data_dir: Path, stdin: str | None = None) -> str:
    result = fastgate(*args, data_dir=data_dir, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def failed(*args: str, data_dir: Path) -> str:
    result = fastgate(*args, data_dir=data_dir)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_lifecycle(data_dir: Path) -> None:
    db = data_dir / "consumers.db"
    out = ok(
        "consumers", "add", "alice", "--groups", "eng,ops", "--scopes", "read", data_dir=data_dir
    )
    assert "alice" in out
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700

    result = fastgate(
        "keys", "add", "alice", "--label", "ci", "--expires", "30d", data_dir=data_dir
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert result.stdout == key + "\n"  # the key alone on stdout, for scripts
    assert key.startswith("fgk_") and len(key) == 60
    key_id = key[4:16]
    assert "will not be shown again" in result.stderr and key_id in result.stderr
    assert key not in result.stderr

    listing = ok("keys", "list", data_dir=data_dir)
    assert key_id in listing and "alice" in listing and "ci" in listing and "active" in listing
    assert key[17:] not in listing

    doc = json.loads(ok("keys", "list", "alice", "--json", data_dir=data_dir))
    assert len(doc) == 1
    entry = doc[0]
    assert (entry["key_id"], entry["consumer"], entry["label"], entry["status"]) == (
        key_id,
        "alice",
        "ci",
        "active",
    )
    assert entry["revoked"] is None
    assert 29.9 * 86400 < entry["expires"] - time.time() <= 30 * 86400
    assert key[17:] not in json.dumps(doc)

    with ConsumerStore(db) as store:
        assert store.snapshot().verify_key(key, time.time()).name == "alice"

    assert key_id in ok("keys", "revoke", key_id, data_dir=data_dir)
    doc = json.loads(ok("keys", "list", "--json", data_dir=data_dir))
    assert doc[0]["status"] == "revoked" and doc[0]["revoked"] is not None
    with ConsumerStore(db) as store:
        assert store.snapshot().verify_key(key, time.time()) is None

    consumers = json.loads(ok("consumers", "list", "--json", data_dir=data_dir))
    assert consumers == [
        {
            "name": "alice",
            "groups": ["eng", "ops"],
            "roles": [],
            "scopes": ["read"],
            "password": False,
            "active_keys": 0,
        }
    ]
    table = ok("consumers", "list", data_dir=data_dir).splitlines()
    assert table[0].split() == ["NAME", "GROUPS", "ROLES", "SCOPES", "PASSWORD", "KEYS"]
    assert table[1].split() == ["alice", "eng,ops", "-", "read", "no", "0"]

    ok("consumers", "remove", "alice", data_dir=data_dir)
    assert json.loads(ok("consumers", "list", "--json", data_dir=data_dir)) == []
    assert json.loads(ok("keys", "list", "--json", data_dir=data_dir)) == []


def test_passwd_from_stdin(data_dir: Path) -> None:
    from fastgate.auth.passwords import verify_password

    ok("consumers", "add", "alice", data_dir=data_dir)
    ok("consumers", "passwd", "alice", "--password-stdin", data_dir=data_dir, stdin="s3cret pw\n")
    with ConsumerStore(data_dir / "consumers.db") as store:
        consumer, hashed = store.snapshot().password_hash("alice")
    assert consumer.name == "alice" and verify_password(hashed, "s3cret pw")
    assert json.loads(ok("consumers", "list", "--json", data_dir=data_dir))[0]["password"] is True
    assert b"s3cret pw" not in (data_dir / "consumers.db").read_bytes()


def test_explicit_store_option(tmp_path: Path) -> None:
    """--store wins over FASTGATE_DATA_DIR, on every action."""
    elsewhere = tmp_path / "elsewhere" / "c.db"
    unused = tmp_path / "unused"
    ok("consumers", "add", "bob", "--store", str(elsewhere), data_dir=unused)
    key = ok("keys", "add", "bob", "--store", str(elsewhere), data_dir=unused).strip()
    doc = json.loads(ok("keys", "list", "--json", "--store", str(elsewhere), data_dir=unused))
    assert [k["key_id"] for k in doc] == [key[4:16]]
    assert not unused.exists()


@pytest.mark.parametrize(
    "setup, args, message",
    [
        pytest.param([], ["keys", "list"], "no consumer store at", id="no store for list"),
        pytest.param([], ["keys", "revoke", "abc"], "no consumer store at", id="no store, revoke"),
        pytest.param([], ["consumers", "remove", "x"], "no consumer store", id="no store, remove"),
        pytest.param(
            [["consumers", "add", "alice"]],
            ["consumers", "add", "alice"],
            "already exists",
            id="duplicate consumer",
        ),
        pytest.param([], ["consumers", "add", "a b"], "bad consumer name", id="bad name"),
        pytest.param(
            [["consumers", "add", "alice"]],
            ["consumers", "add", "bob", "--groups", "a;b c"],
            "bad group",
            id="bad group",
        ),
        pytest.param([], ["keys", "add", "nobody"], "no consumer 'nobody'", id="key for nobody"),
        pytest.param(
            [["consumers", "add", "alice"]],
            ["keys", "revoke", "000000000000"],
            "no active key",
            id="unknown key id",
        ),
        pytest.param(
            [["consumers", "add", "alice"]],
            ["consumers", "remove", "bob"],
            "no consumer 'bob'",
            id="remove unknown",
        ),
        pytest.param(
            [["consumers", "add", "alice"]],
            ["keys", "list", "bob"],
            "no consumer 'bob'",
            id="list keys of unknown",
        ),
        pytest.param(
            [["consumers", "add", "alice"]],
            ["consumers", "passwd", "alice", "--password-stdin"],
            "the password is empty",
            id="empty password",
        ),
        pytest.param(
            [["consumers", "add", "alice"]],
            ["consumers", "passwd", "bob", "--password-stdin"],
            "no consumer 'bob'",
            id="password for unknown",
        ),
    ],
)
def test_errors(data_dir: Path, setup: list[list[str]], args: list[str], message: str) -> None:
    for step in setup:
        ok(*step, data_dir=data_dir)
    assert message in failed(*args, data_dir=data_dir)
    if args[1] != "add":
        assert (data_dir / "consumers.db").exists() == bool(setup)  # only `add` creates it


def test_revoke_twice(data_dir: Path) -> None:
    ok("consumers", "add", "alice", data_dir=data_dir)
    key_id = ok("keys", "add", "alice", data_dir=data_dir)[4:16]
    ok("keys", "revoke", key_id, data_dir=data_dir)
    assert "no active key" in failed("keys", "revoke", key_id, data_dir=data_dir)


@pytest.mark.parametrize(
    "expires, seconds",
    [
        pytest.param("3600s", 3600, id="seconds"),
        pytest.param("15m", 900, id="minutes"),
        pytest.param("12h", 43200, id="hours"),
        pytest.param("2d", 172800, id="days"),
    ],
)
def test_expires(data_dir: Path, expires: str, seconds: int) -> None:
    ok("consumers", "add", "alice", data_dir=data_dir)
    before = time.time()
    ok("keys", "add", "alice", "--expires", expires, data_dir=data_dir)
    (entry,) = json.loads(ok("keys", "list", "--json", data_dir=data_dir))
    assert before + seconds - 1 <= entry["expires"] <= time.time() + seconds


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("3x", id="unit"),
        pytest.param("0d", id="zero"),
        pytest.param("d", id="no number"),
    ],
)
def test_bad_expires_is_a_usage_error(data_dir: Path, value: str) -> None:
    result = fastgate("keys", "add", "alice", "--expires", value, data_dir=data_dir)
    assert result.returncode == 2  # argparse usage error, as for every command
    assert "expected a duration" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_the_commands(data_dir: Path) -> None:
    out = ok("--help", data_dir=data_dir)
    assert "consumers" in out and "keys" in out
    assert "--store" in ok("keys", "add", "--help", data_dir=data_dir)
