"""The embedded consumer store: consumers, their API keys and passwords, in one SQLite file.

Written by the `fastgate consumers` / `fastgate keys` commands, read by the `api_key` and
`basic_auth` middlewares. A serving process never queries the file per request: it holds a
`Snapshot` (everything serving needs, in memory) that a `StoreWatcher` replaces off the event
loop within a second of any committed change, in any process.

Rules this file obeys:
- An API key is `fgk_<key_id>_<secret>`: key_id is 12 public hex characters, the secret is
  `secrets.token_urlsafe(32)` (256 random bits). Only key_id, a 16-byte random salt and
  HMAC-SHA256(salt, secret) are stored. A fast salted hash is right here: 256 random bits
  cannot be guessed offline, unlike a password. The clear key is returned once by `add_key`,
  never stored, logged or kept in a `Snapshot`.
- Verification compares hashes with `hmac.compare_digest`, and a well-formed key whose id is
  unknown (or revoked) still costs one HMAC, so timing does not tell ids apart.
- Passwords are stored as `passwords.hash_password` (argon2id) hashes, never in clear.
- The file is created 0600 (its directory 0700 when fastgate creates it); SQLite gives the
  WAL and shared-memory files the database file's mode. Opening never creates the file unless
  asked (`create=True`): a typo in a gateway config must not serve from a new, empty store.
- Every write bumps a change counter in the same transaction, so `data_version` changes
  whenever any process commits a change through this module.
- Everything here is blocking (file I/O): on an event loop, run it in an executor;
  `StoreWatcher` does so with its own one-thread executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("fastgate.auth.consumers")

KEY_PREFIX = "fgk_"
NAME = re.compile(r"[A-Za-z0-9._@-]{1,128}")
# A group, role or scope: printable ASCII without space or comma (they are joined with commas
# in forwarded headers).
ITEM = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,128}")
_KEY = re.compile(rb"fgk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_SCHEMA_VERSION = 1
_BUSY_TIMEOUT_MS = 5000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    groups TEXT NOT NULL,
    roles TEXT NOT NULL,
    scopes TEXT NOT NULL,
    password TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    consumer TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    label TEXT,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL
);
CREATE INDEX IF NOT EXISTS keys_consumer ON keys (consumer);
"""


def default_store_path() -> Path:
    """$FASTGATE_DATA_DIR/consumers.db; else /var/lib/fastgate/consumers.db for root; else
    $XDG_DATA_HOME/fastgate/consumers.db (XDG_DATA_HOME defaults to ~/.local/share)."""
    data_dir = os.environ.get("FASTGATE_DATA_DIR")
    if data_dir:
        return Path(data_dir) / "consumers.db"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/fastgate/consumers.db")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "fastgate" / "consumers.db"


@dataclass(frozen=True, slots=True)
class Consumer:
    """Who an API key or password belongs to, and what it may do."""

    name: str
    groups: frozenset[str]
    roles: frozenset[str]
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never its secret. Times are Unix seconds."""

    key_id: str
    consumer: str
    label: str | None
    created: float
    expires: float | None
    revoked: float | None

    def status(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"


# ---- the file --------------------------------------------------------------------------------


def _create_file(path: Path) -> None:
    """Make `path` (0600) and, if missing, its directory (0700), before SQLite opens it."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    os.chmod(path, 0o600)


class ConsumerStore:
    """One connection to the store file. Methods raise ValueError for a caller's mistake
    (bad or unknown name), sqlite3.Error for a broken file."""

    def __init__(self, path: str | Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            _create_file(self.path)
        elif not self.path.is_file():
            raise FileNotFoundError(
                f"no consumer store at {self.path}: create it with `fastgate consumers add`"
            )
        # mode=rw: SQLite must not create a file we did not create ourselves (with its mode).
        uri = self.path.resolve().as_uri() + "?mode=rw"
        self._db = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=5.0
        )
        try:
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if create:
                self._init_schema()
            self._check_schema()
        except BaseException:
            self._db.close()
            raise

    def _init_schema(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
        # Idempotent statements, so two processes creating the store at once both succeed.
        db.executescript(_SCHEMA)
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?), ('changes', 0)",
            (_SCHEMA_VERSION,),
        )

    def _check_schema(self) -> None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is None:
            raise ValueError(f"{self.path} is not a fastgate consumer store")
        if row[0] != _SCHEMA_VERSION:
            raise ValueError(f"{self.path}: unsupported store schema version {row[0]}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that also bumps the change counter (see `data_version`)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'changes'")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ConsumerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- consumers -----------------------------------------------------------------------------

    def add_consumer(
        self,
        name: str,
        groups: Iterable[str] = (),
        roles: Iterable[str] = (),
        scopes: Iterable[str] = (),
    ) -> Consumer:
        consumer = Consumer(_name(name), _items(groups), _items(roles), _items(scopes))
        with self._write() as db:
            if self._exists(name):
                raise ValueError(f"consumer {name!r} already exists")
            db.execute(
                "INSERT INTO consumers (name, groups, roles, scopes, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, *_encode(consumer), time.time()),
            )
        return consumer

    def update_consumer(
        self,
        name: str,
        *,
        groups: Iterable[str] | None = None,
        roles: Iterable[str] | None = None,
        scopes: Iterable[str] | None = None,
    ) -> Consumer:
        """Replace the given sets; None leaves one as it is."""
        with self._write() as db:
            old = self.get_consumer(name)
            if old is None:
                raise ValueError(f"no consumer {name!r}")
            new = Consumer(
                name,
                old.groups if groups is None else _items(groups),
                old.roles if roles is None else _items(roles),
                old.scopes if scopes is None else _items(scopes),
            )
            db.execute(
                "UPDATE consumers SET groups = ?, roles = ?, scopes = ? WHERE name = ?",
                (*_encode(new), name),
            )
        return new

    def remove_consumer(self, name: str) -> bool:
        """Remove a consumer with its keys and password; False when there is none."""
        with self._write() as db:
            db.execute("DELETE FROM keys WHERE consumer = ?", (name,))
            return db.execute("DELETE FROM consumers WHERE name = ?", (name,)).rowcount == 1

    def get_consumer(self, name: str) -> Consumer | None:
        row = self._db.execute(
            "SELECT name, groups, roles, scopes FROM consumers WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else _consumer(row)

    def list_consumers(self) -> list[Consumer]:
        rows = self._db.execute(
            "SELECT name, groups, roles, scopes FROM consumers ORDER BY name"
        ).fetchall()
        return [_consumer(row) for row in rows]

    def has_password(self, name: str) -> bool:
        row = self._db.execute("SELECT password FROM consumers WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] is not None

    def set_password(self, name: str, password: str) -> None:
        """Store an argon2id hash of `password` (tens of milliseconds: blocking)."""
        # Imported here: the hashers cost an argon2 hash at import, which key-only users
        # (the api_key middleware, `fastgate keys`) need not pay.
        from fastgate.auth.passwords import hash_password

        if not password:
            raise ValueError("the password is empty")
        hashed = hash_password(password)
        with self._write() as db:
            cur = db.execute("UPDATE consumers SET password = ? WHERE name = ?", (hashed, name))
            if cur.rowcount != 1:
                raise ValueError(f"no consumer {name!r}")

    def _exists(self, name: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM consumers WHERE name = ?", (name,)).fetchone()
            is not None
        )

    # ---- keys ----------------------------------------------------------------------------------

    def add_key(
        self, consumer: str, label: str | None = None, expires: float | None = None
    ) -> tuple[str, str]:
        """A new key for `consumer`: (key_id, key). The key is shown to the caller only."""
        if label is not None and (len(label) > 200 or any(ord(c) < 0x20 for c in label)):
            raise ValueError("a label is at most 200 printable characters")
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        digest = hmac.digest(salt, secret.encode("ascii"), "sha256")
        with self._write() as db:
            if not self._exists(consumer):
                raise ValueError(f"no consumer {consumer!r}")
            while True:
                key_id = secrets.token_hex(6)
                taken = db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone()
                if taken is None:
                    break
            db.execute(
                "INSERT INTO keys (key_id, consumer, salt, hash, label, created, expires) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key_id, consumer, salt, digest, label, time.time(), expires),
            )
        return key_id, f"{KEY_PREFIX}{key_id}_{secret}"

    def list_keys(self, consumer: str | None = None) -> list[KeyInfo]:
        query = "SELECT key_id, consumer, label, created, expires, revoked FROM keys"
        args: tuple[Any, ...] = ()
        if consumer is not None:
            query += " WHERE consumer = ?"
            args = (consumer,)
        rows = self._db.execute(query + " ORDER BY created, key_id", args).fetchall()
        return [KeyInfo(*row) for row in rows]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key now; False when there is no such key or it is already revoked."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL",
                (time.time(), key_id),
            )
            return cur.rowcount == 1

    # ---- serving -------------------------------------------------------------------------------

    def data_version(self) -> int:
        """A number that changes whenever any connection commits a change: SQLite's
        `data_version` (other connections' commits, even by other tools) combined with the
        change counter that this module's writes bump (this connection's own commits)."""
        (external,) = self._db.execute("PRAGMA data_version").fetchone()
        (changes,) = self._db.execute("SELECT value FROM meta WHERE key = 'changes'").fetchone()
        return (external << 64) | (changes & 0xFFFFFFFFFFFFFFFF)

    def snapshot(self) -> Snapshot:
        """Everything serving needs, read in one transaction (blocking)."""
        db = self._db
        db.execute("BEGIN")
        try:
            version = self.data_version()
            consumers = {
                row[0]: (_consumer(row[:4]), row[4])
                for row in db.execute("SELECT name, groups, roles, scopes, password FROM consumers")
            }
            keys = {}
            for key_id, name, salt, digest, expires in db.execute(
                "SELECT key_id, consumer, salt, hash, expires FROM keys WHERE revoked IS NULL"
            ):
                owner = consumers.get(name)
                if owner is not None:
                    keys[key_id.encode("ascii")] = (bytes(salt), bytes(digest), expires, owner[0])
        finally:
            db.execute("COMMIT")
        passwords = {name: (c, pw) for name, (c, pw) in consumers.items() if pw is not None}
        return Snapshot(version, keys, passwords, len(consumers))


def _name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"bad consumer name {name!r}: 1 to 128 of A-Z a-z 0-9 . _ @ -")
    return name


def _items(values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str):
        raise ValueError("expected a list of names, not one string")
    out = frozenset(values)
    for value in out:
        if not isinstance(value, str) or not ITEM.fullmatch(value):
            raise ValueError(
                f"bad group/role/scope {value!r}: 1 to 128 printable ASCII, no space or comma"
            )
    return out


def _encode(consumer: Consumer) -> tuple[str, str, str]:
    return (
        json.dumps(sorted(consumer.groups)),
        json.dumps(sorted(consumer.roles)),
        json.dumps(sorted(consumer.scopes)),
    )


def _consumer(row: tuple[Any, ...]) -> Consumer:
    name, groups, roles, scopes = row
    return Consumer(
        name,
        frozenset(json.loads(groups)),
        frozenset(json.loads(roles)),
        frozenset(json.loads(scopes)),
    )


# ---- the in-memory view ----------------------------------------------------------------------

_DUMMY_SALT = secrets.token_bytes(16)
_DUMMY_HASH = secrets.token_bytes(32)


class Snapshot:
    """The store as it was at `version`: active keys (salt, hash, expiry, owner) by id and
    password hashes by consumer name. Never holds a clear key."""

    __slots__ = ("_keys", "_passwords", "consumers", "version")

    def __init__(
        self,
        version: int,
        keys: dict[bytes, tuple[bytes, bytes, float | None, Consumer]],
        passwords: dict[str, tuple[Consumer, str]],
        consumers: int = 0,
    ) -> None:
        self.version = version
        self._keys = keys
        self._passwords = passwords
        self.consumers = consumers

    def __len__(self) -> int:
        """The number of active (unrevoked) keys."""
        return len(self._keys)

    def verify_key(self, key: str | bytes, now: float) -> Consumer | None:
        """The owner of `key`, or None when it is malformed, unknown, revoked, expired or its
        secret is wrong. A well-formed key always costs one HMAC (see the module rules)."""
        found = self.check_key(key)
        if found is None or (found[1] is not None and now >= found[1]):
            return None
        return found[0]

    def check_key(self, key: str | bytes) -> tuple[Consumer, float | None] | None:
        """(owner, expiry time or None) of a valid key whatever the time; None when it is
        malformed, unknown, revoked or its secret is wrong. For callers that cache the
        answer until the expiry (or the next snapshot)."""
        if isinstance(key, str):
            try:
                key = key.encode("ascii")
            except UnicodeEncodeError:
                return None
        match = _KEY.fullmatch(key)
        if match is None:
            return None
        entry = self._keys.get(match[1])
        if entry is None:
            hmac.compare_digest(hmac.digest(_DUMMY_SALT, match[2], "sha256"), _DUMMY_HASH)
            return None
        salt, digest, expires, consumer = entry
        if not hmac.compare_digest(hmac.digest(salt, match[2], "sha256"), digest):
            return None
        return consumer, expires

    def password_hash(self, name: str) -> tuple[Consumer, str] | None:
        """(consumer, its argon2 hash); None when there is no such consumer or no password."""
        return self._passwords.get(name)


# ---- keeping a snapshot current in a serving process -----------------------------------------

_EXECUTOR: ThreadPoolExecutor | None = None


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _executor() -> ThreadPoolExecutor:
    """One thread per process for every watcher's refresh: bounded, and refreshes are rare."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="fastgate-store")
    return _EXECUTOR


class StoreWatcher:
    """One per store path per process (`for_path` returns the shared one): holds the current
    `Snapshot` and, once `current()` has been called on a running loop, checks `data_version`
    every `interval` seconds off the loop and loads a new snapshot when it changed, so a
    revocation is in force within a second. Listeners are called (on the loop) after each new
    snapshot. A failed refresh keeps the last good snapshot and is logged; a file replaced at
    the same path (deleted and made again, restored) is reopened.

    `for_path` counts its callers and `stop()` undoes one call: the task and the connection end
    when the last user stops, so a config reload (new middlewares built, then the old ones
    closed) keeps the shared watcher running.
    """

    _shared: ClassVar[dict[Path, StoreWatcher]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str | Path, interval: float = 0.5) -> None:
        self.path = Path(path)
        self.interval = interval
        self._store = ConsumerStore(self.path)
        self._lock = threading.Lock()
        try:
            self._file = _file_id(self.path)
            self._seen: int | None = self._store.data_version()
            self._snapshot = self._store.snapshot()
        except BaseException:
            self._store.close()
            raise
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._users = 1
        self._stopped = False
        self._key: Path | None = None
        self.refreshes = 0
        self.refresh_errors = 0

    @classmethod
    def for_path(cls, path: str | Path) -> StoreWatcher:
        """The process's watcher of `path` (created, and its snapshot loaded, on first use).
        Raises FileNotFoundError when there is no store file."""
        key = Path(path).resolve()
        with cls._shared_lock:
            watcher = cls._shared.get(key)
            if watcher is not None:
                watcher._users += 1
                return watcher
            watcher = cls(key)
            watcher._key = key
            cls._shared[key] = watcher
            return watcher

    def current(self) -> Snapshot:
        """The current snapshot; starts the refresh task when called on a running loop."""
        task = self._task
        if (task is None or task.done()) and not self._stopped:
            self._start()
        return self._snapshot

    @property
    def running(self) -> bool:
        """True while the refresh task runs: the snapshot is then at most ~`interval` old."""
        task = self._task
        return task is not None and not task.done()

    async def fresh(self) -> Snapshot:
        """The snapshot after checking the store now, off the loop (and the refresh task
        started). For the first request after an idle start: the snapshot loaded when the
        middleware was built may be hours old. A failed check keeps the last snapshot."""
        self.current()
        try:
            snapshot = await asyncio.get_running_loop().run_in_executor(_executor(), self._poll)
        except Exception as exc:
            self.refresh_errors += 1
            log.warning(
                "consumer store %s: check failed, using the last snapshot: %s", self.path, exc
            )
            snapshot = None
        if snapshot is not None:
            self._install(snapshot)
        return self._snapshot

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving (config check, tests): the snapshot stays as loaded
        self._task = loop.create_task(self._run())

    def add_listener(self, fn: Callable[[Snapshot], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Snapshot], None]) -> None:
        """Undo `add_listener` (a middleware instance retiring from a shared watcher)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def stop(self) -> None:
        """One user is done with the watcher; the last one stops the task and closes."""
        with self._shared_lock:
            self._users -= 1
            if self._users > 0 or self._stopped:
                return
            self._stopped = True
            if self._key is not None and self._shared.get(self._key) is self:
                del self._shared[self._key]
        if self._task is not None:
            self._task.cancel()
            self._task = None
        with self._lock:
            self._store.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped:
            await asyncio.sleep(self.interval)
            try:
                snapshot = await loop.run_in_executor(_executor(), self._poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.refresh_errors += 1
                log.warning(
                    "consumer store %s: refresh failed, keeping the last snapshot: %s",
                    self.path,
                    exc,
                )
                continue
            if snapshot is not None:
                self._install(snapshot)

    def refresh(self) -> bool:
        """Load a new snapshot now if the store changed (blocking); True when it did."""
        snapshot = self._poll()
        if snapshot is None:
            return False
        self._install(snapshot)
        return True

    def _poll(self) -> Snapshot | None:
        with self._lock:
            if self._stopped:
                return None
            if _file_id(self.path) != self._file:
                self._reopen()
            version = self._store.data_version()
            if version == self._seen:
                return None
            snapshot = self._store.snapshot()
            self._seen = version
            return snapshot

    def _reopen(self) -> None:
        """The path names another file now (deleted and made again, or replaced by a restore):
        the open connection would go on reading the old one, so follow the path."""
        store = ConsumerStore(self.path)  # FileNotFoundError when it is gone: keep the old
        self._store.close()
        self._store = store
        self._file = _file_id(self.path)
        self._seen = None
        log.info("consumer store %s: the file was replaced; reopened it", self.path)

    def _install(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self.refreshes += 1
        for fn in list(self._listeners):
            try:
                fn(snapshot)
            except Exception:
                log.exception("consumer store %s: a snapshot listener failed", self.path)


__all__ = [
    "KEY_PREFIX",
    "Consumer",
    "ConsumerStore",
    "KeyInfo",
    "Snapshot",
    "StoreWatcher",
    "default_store_path",
]
