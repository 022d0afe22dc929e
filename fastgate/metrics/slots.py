"""The supervisor's slot directory: one shared-memory file per worker slot.

Rules this file obeys:
- The directory is private to the gateway: created with mode 0700 under /dev/shm (tmpfs, so
  the counters never touch a disk) or the system temp directory when /dev/shm is missing, and
  removed when the supervisor exits. Counters live as long as the supervisor: a worker that is
  restarted into the same slot continues them (Prometheus counters must not go backwards).
- A worker writes only its own slot file (`slot-<n>`); the supervisor only reads. Slot numbers
  are small integers reused by a restarted worker, so the number of files is bounded by the
  highest worker count the gateway ever ran with.
- Slot files of retired workers stay: their counters remain part of every total.
- A supervisor that was killed (SIGKILL) cannot remove its directory; the directory name
  carries the supervisor's pid, and the next supervisor removes the directories of dead
  supervisors that belong to the same user (`sweep_stale`), nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable

from fastgate._core.stats import Shard

_SLOT = re.compile(r"slot-(\d+)\Z")
PREFIX = "fastgate-stats-"
_OWNED = re.compile(re.escape(PREFIX) + r"(\d+)-[A-Za-z0-9_]+\Z")


class StatsDir:
    """The directory of slot files (supervisor side)."""

    def __init__(self, path: str | None = None) -> None:
        self._path = path  # created on first use: a Supervisor that never runs leaves nothing

    @property
    def path(self) -> str:
        if self._path is None:
            base = _base_dir()
            sweep_stale(base)
            self._path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)
        return self._path

    def slot_path(self, slot: int) -> str:
        return os.path.join(self.path, f"slot-{slot}")

    def slots(self) -> list[tuple[int, str]]:
        """(slot number, path) of every slot file present, by number."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        found = [(int(m.group(1)), n) for n in names if (m := _SLOT.match(n))]
        return [(slot, os.path.join(self.path, name)) for slot, name in sorted(found)]

    def open_all(self) -> list[tuple[int, Shard]]:
        """Every complete slot, mapped read-only (a slot still being created is skipped)."""
        out = []
        for slot, path in self.slots():
            try:
                out.append((slot, Shard(path, readonly=True)))
            except (OSError, ValueError):
                continue
        return out

    def remove(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)


def free_slot(used: Iterable[int]) -> int:
    """The lowest slot number not in `used` (a restarted worker takes its predecessor's)."""
    taken = set(used)
    slot = 0
    while slot in taken:
        slot += 1
    return slot


def _base_dir() -> str:
    """/dev/shm (tmpfs) when usable, else the system temp directory."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()


def sweep_stale(base: str) -> list[str]:
    """Remove the slot directories in `base` of supervisors that are gone (this user's only);
    returns the paths removed."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = _OWNED.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
