"""The consumer store: consumers, keys and passwords in SQLite; what the file holds (never a
clear key), verification of keys against a snapshot, change detection across connections, and
the watcher that keeps a serving process's snapshot current."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastgate.auth import consumers as consumers_mod
from fastgate.auth.consumers import (
    Consumer,
    ConsumerStore,
    KeyInfo,
    Snapshot,
    StoreWatcher,
    default_store_path,
)
from fastgate.auth.passwords import verify_password


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "consumers.db"


@pytest.fixture
def store(db: Path) -> Iterator[ConsumerStore]:
    s = ConsumerStore(db, create=True)
    yield s
    s.close()


def other_char(c: str) -> str:
    return "B" if c != "B" else "C"


# ---- the file --------------------------------------------------------------------------------


def test_created_private(db: Path) -> None:
    with ConsumerStore(db, create=True) as s:
        s.add_consumer("alice")
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        # SQLite gives its WAL and shared-memory files the database's mode.
        for extra in db.parent.iterdir():
            assert stat.S_IMODE(extra.stat().st_mode) == 0o600, extra
        (mode,) = s._db.execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"


def test_missing_file_not_created(db: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no consumer store at .*fastgate consumers add"):
        ConsumerStore(db)
    assert not db.exists()
    assert not db.parent.exists()


def test_not_a_store(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    import sqlite3

    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ValueError, match="not a fastgate consumer store"):
        ConsumerStore(other)


@pytest.mark.parametrize(
    "env, root, expected",
    [
        pytest.param({"FASTGATE_DATA_DIR": "/srv/fg"}, True, "/srv/fg/consumers.db", id="env"),
        pytest.param({}, True, "/var/lib/fastgate/consumers.db", id="root"),
        pytest.param(
            {"XDG_DATA_HOME": "/home/u/data"}, False, "/home/u/data/fastgate/consumers.db", id="xdg"
        ),
        pytest.param(
            {"HOME": "/home/u"}, False, "/home/u/.local/share/fastgate/consumers.db", id="home"
        ),
    ],
)
def test_default_store_path(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], root: bool, expected: str
) -> None:
    for name in ("FASTGATE_DATA_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    assert default_store_path() == Path(expected)


# ---- consumers -------------------------------------------------------------------------------


def test_consumers(store: ConsumerStore) -> None:
    alice = store.add_consumer("alice", groups=["eng"], roles=["admin"], scopes=["read", "write"])
    assert alice == Consumer(
        "alice", frozenset({"eng"}), frozenset({"admin"}), frozenset({"read", "write"})
    )
    store.add_consumer("bob@example.com")
    assert store.get_consumer("alice") == alice
    assert [c.name for c in store.list_consumers()] == ["alice", "bob@example.com"]
    updated = store.update_consumer("alice", scopes=["read"])
    assert updated == Consumer("alice", alice.groups, alice.roles, frozenset({"read"}))
    assert store.get_consumer("alice") == updated
    assert store.remove_consumer("alice") is True
    assert store.remove_consumer("alice") is False
    assert store.get_consumer("alice") is None


@pytest.mark.parametrize(
    "call, message",
    [
        pytest.param(lambda s: s.add_consumer("alice"), "already exists", id="duplicate"),
        pytest.param(lambda s: s.add_consumer("a b"), "bad consumer name", id="space in name"),
        pytest.param(lambda s: s.add_consumer(""), "bad consumer name", id="empty name"),
        pytest.param(lambda s: s.add_consumer("x" * 129), "bad consumer name", id="name too long"),
        pytest.param(lambda s: s.add_consumer("b", groups=["a,b"]), "bad group", id="comma"),
        pytest.param(lambda s: s.add_consumer("b", scopes="read"), "not one string", id="str"),
        pytest.param(lambda s: s.update_consumer("nobody", roles=[]), "no consumer", id="update"),
        pytest.param(lambda s: s.add_key("nobody"), "no consumer", id="key for nobody"),
        pytest.param(lambda s: s.set_password("nobody", "pw"), "no consumer", id="pw for nobody"),
        pytest.param(lambda s: s.set_password("alice", ""), "empty", id="empty password"),
        pytest.param(lambda s: s.add_key("alice", label="a\nb"), "label", id="label with LF"),
    ],
)
def test_mistakes(store: ConsumerStore, call, message: str) -> None:
    store.add_consumer("alice")
    with pytest.raises(ValueError, match=message):
        call(store)


def test_password(store: ConsumerStore) -> None:
    alice = store.add_consumer("alice", groups=["eng"])
    store.add_consumer("bob")
    store.set_password("alice", "correct horse")
    snap = store.snapshot()
    assert snap.password_hash("bob") is None
    assert snap.password_hash("nobody") is None
    consumer, hashed = snap.password_hash("alice")
    assert consumer == alice
    assert hashed.startswith("$argon2id$")
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "wrong")
    assert b"correct horse" not in store.path.read_bytes()


# ---- keys ------------------------------------------------------------------------------------


def test_key_format_and_verify(store: ConsumerStore) -> None:
    alice = store.add_consumer("alice", scopes=["read"])
    key_id, key = store.add_key("alice", label="ci")
    assert len(key_id) == 12 and int(key_id, 16) >= 0
    prefix, kid, secret = key[:4], key[4:16], key[17:]
    assert (prefix, kid, key[16]) == ("fgk_", key_id, "_")
    assert len(secret) == 43
    snap = store.snapshot()
    now = time.time()
    assert snap.verify_key(key, now) == alice
    assert snap.verify_key(key.encode(), now) == alice
    assert len(snap) == 1


def test_key_never_stored_in_clear(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    keys = [store.add_key("alice")[1] for _ in range(3)]
    store.close()
    files = b"".join(p.read_bytes() for p in store.path.parent.iterdir())
    for key in keys:
        secret = key[17:].encode()
        assert secret not in files
        assert key.encode() not in files
        assert key[4:16].encode() in files  # the id is public and stored


def test_salts_differ(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    for _ in range(5):
        store.add_key("alice")
    rows = store._db.execute("SELECT salt, hash FROM keys").fetchall()
    assert len({bytes(salt) for salt, _ in rows}) == 5
    assert all(len(bytes(salt)) == 16 and len(bytes(h)) == 32 for salt, h in rows)


def test_list_and_revoke(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    store.add_consumer("bob")
    a1, key1 = store.add_key("alice", label="one", expires=2e9)
    b1, _ = store.add_key("bob")
    infos = store.list_keys()
    assert [k.key_id for k in infos] == [a1, b1]
    assert infos[0] == KeyInfo(a1, "alice", "one", infos[0].created, 2e9, None)
    assert [k.key_id for k in store.list_keys("bob")] == [b1]
    assert key1 not in repr(infos)
    assert store.revoke_key(a1) is True
    assert store.revoke_key(a1) is False  # already revoked
    assert store.revoke_key("000000000000") is False
    revoked = store.list_keys("alice")[0]
    assert revoked.revoked is not None and revoked.status(time.time()) == "revoked"


def test_remove_consumer_removes_keys(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    _, key = store.add_key("alice")
    store.set_password("alice", "pw")
    store.remove_consumer("alice")
    assert store.list_keys() == []
    snap = store.snapshot()
    assert snap.verify_key(key, time.time()) is None
    assert snap.password_hash("alice") is None
    # A new consumer of the same name does not inherit anything.
    store.add_consumer("alice")
    assert store.snapshot().verify_key(key, time.time()) is None


@pytest.mark.parametrize(
    "change, when, accepted",
    [
        pytest.param(lambda key: key, 0, True, id="the key"),
        pytest.param(
            lambda key: key[:-2] + other_char(key[-2]) + key[-1], 0, False, id="wrong secret"
        ),
        pytest.param(lambda key: key[:17], 0, False, id="no secret"),
        pytest.param(lambda key: key + "x", 0, False, id="longer"),
        pytest.param(lambda key: "fgk_000000000000" + key[16:], 0, False, id="unknown id"),
        pytest.param(lambda key: key.upper(), 0, False, id="case changed"),
        pytest.param(lambda key: "fgk_" + key[4:16].upper() + key[16:], 0, False, id="upper id"),
        pytest.param(lambda key: key.replace("fgk_", "fgx_"), 0, False, id="prefix"),
        pytest.param(lambda key: key + "é", 0, False, id="non-ascii"),
        pytest.param(lambda key: "", 0, False, id="empty"),
        pytest.param(lambda key: key, 3599, True, id="just before expiry"),
        pytest.param(lambda key: key, 3600, False, id="expired"),
    ],
)
def test_verify_key(store: ConsumerStore, change, when: float, accepted: bool) -> None:
    alice = store.add_consumer("alice")
    now = time.time()
    _, key = store.add_key("alice", expires=now + 3600)
    result = store.snapshot().verify_key(change(key), now + when)
    assert result == (alice if accepted else None)


def test_revoked_key_refused(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    key_id, key = store.add_key("alice")
    _, other = store.add_key("alice")
    before = store.snapshot()
    store.revoke_key(key_id)
    after = store.snapshot()
    now = time.time()
    assert before.verify_key(key, now) is not None  # a snapshot is a fixed view
    assert after.verify_key(key, now) is None
    assert after.verify_key(other, now) is not None


def test_unknown_id_still_costs_one_hmac(store: ConsumerStore, monkeypatch) -> None:
    store.add_consumer("alice")
    _, key = store.add_key("alice")
    snap = store.snapshot()
    calls: list[bytes] = []
    real = consumers_mod.hmac.digest

    def counting(k: bytes, msg: bytes, digest: str) -> bytes:
        calls.append(msg)
        return real(k, msg, digest)

    monkeypatch.setattr(consumers_mod.hmac, "digest", counting)
    for candidate in ("fgk_000000000000" + key[16:], key[:-2] + other_char(key[-2]) + key[-1], key):
        calls.clear()
        snap.verify_key(candidate, time.time())
        assert len(calls) == 1, candidate[:16]
    calls.clear()
    snap.verify_key("garbage", time.time())
    assert calls == []  # malformed: nothing to compute


# ---- change detection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s.add_consumer("carol"), id="add consumer"),
        pytest.param(lambda s: s.add_key("alice"), id="add key"),
        pytest.param(lambda s: s.revoke_key(s.list_keys()[0].key_id), id="revoke key"),
        pytest.param(lambda s: s.update_consumer("alice", roles=["r"]), id="update consumer"),
        pytest.param(lambda s: s.remove_consumer("alice"), id="remove consumer"),
        pytest.param(lambda s: s.set_password("alice", "pw"), id="set password"),
    ],
)
def test_data_version_changes(store: ConsumerStore, change) -> None:
    store.add_consumer("alice")
    store.add_key("alice")
    with ConsumerStore(store.path) as other:
        mine, theirs = store.data_version(), other.data_version()
        assert store.data_version() == mine  # stable while nothing changes
        change(other)  # a commit by another connection
        assert store.data_version() != mine
        assert other.data_version() != theirs  # and by this one


def test_data_version_sees_external_writes(store: ConsumerStore) -> None:
    """A change made with another tool (not through this module) is seen too."""
    import sqlite3

    store.add_consumer("alice")
    before = store.data_version()
    raw = sqlite3.connect(store.path)
    raw.execute("UPDATE consumers SET roles = '[\"x\"]'")
    raw.commit()
    raw.close()
    assert store.data_version() != before


def test_snapshot_version(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    first = store.snapshot()
    assert isinstance(first, Snapshot)
    assert first.version == store.data_version()
    store.add_key("alice")
    assert store.snapshot().version != first.version


# ---- the watcher -----------------------------------------------------------------------------


def test_watcher_missing_store(db: Path) -> None:
    with pytest.raises(FileNotFoundError):
        StoreWatcher.for_path(db)
    assert not db.exists()


def test_watcher_shared_per_path(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    first = StoreWatcher.for_path(store.path)
    same = StoreWatcher.for_path(str(store.path.parent / "." / store.path.name))
    try:
        assert same is first
    finally:
        same.stop()
    # One user left: still shared and open.
    assert StoreWatcher.for_path(store.path) is first
    first.stop()
    first.stop()
    fresh = StoreWatcher.for_path(store.path)
    try:
        assert fresh is not first
    finally:
        fresh.stop()


def test_watcher_refreshes_on_the_loop(store: ConsumerStore) -> None:
    alice = store.add_consumer("alice")
    key_id, key = store.add_key("alice")
    watcher = StoreWatcher(store.path, interval=0.05)
    seen: list[Snapshot] = []
    watcher.add_listener(seen.append)

    async def scenario() -> float:
        assert watcher.current().verify_key(key, time.time()) == alice  # starts the task
        start = time.monotonic()
        # The revocation comes from another connection, as from `fastgate keys revoke`.
        await asyncio.get_running_loop().run_in_executor(None, store.revoke_key, key_id)
        while watcher.current().verify_key(key, time.time()) is not None:
            assert time.monotonic() - start < 1.0, "revocation not seen within 1 s"
            await asyncio.sleep(0.01)
        return time.monotonic() - start

    try:
        asyncio.run(scenario())
    finally:
        watcher.stop()
    assert len(seen) >= 1 and seen[-1] is watcher.current()
    assert watcher.refreshes >= 1


def test_watcher_without_loop_stays_put(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    watcher = StoreWatcher(store.path)
    try:
        first = watcher.current()
        assert watcher.current() is first
        assert watcher.refresh() is False  # nothing changed
        store.add_key("alice")
        assert watcher.current() is first  # no loop: no task
        assert watcher.refresh() is True
        assert len(watcher.current()) == 1
    finally:
        watcher.stop()


def test_watcher_follows_a_replaced_file(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    _, old_key = store.add_key("alice")
    watcher = StoreWatcher(store.path)
    try:
        store.close()
        for extra in store.path.parent.iterdir():
            extra.unlink()
        # Gone: the last snapshot stays in force (fail static), the error is the caller's.
        with pytest.raises(FileNotFoundError):
            watcher.refresh()
        assert watcher.current().verify_key(old_key, time.time()) is not None
        # Made again (e.g. restored from a backup): the watcher reads the new file.
        with ConsumerStore(store.path, create=True) as again:
            again.add_consumer("bob")
            _, new_key = again.add_key("bob")
        assert watcher.refresh() is True
        now = time.time()
        assert watcher.current().verify_key(old_key, now) is None
        assert watcher.current().verify_key(new_key, now).name == "bob"
    finally:
        watcher.stop()


def test_watcher_listeners(store: ConsumerStore) -> None:
    store.add_consumer("alice")
    watcher = StoreWatcher(store.path)
    seen: list[int] = []
    kept, removed = (lambda s: seen.append(1)), (lambda s: seen.append(2))
    try:
        watcher.add_listener(kept)
        watcher.add_listener(removed)
        watcher.remove_listener(removed)
        watcher.remove_listener(removed)  # twice is harmless
        store.add_key("alice")
        assert watcher.refresh() is True
        assert seen == [1]
    finally:
        watcher.stop()
