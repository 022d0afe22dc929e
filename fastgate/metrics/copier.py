"""Copy the Python-side tallies of a worker into its metric slot, once a second.

What is copied: auth refusals (`AuthCommon.route_failures` of every auth middleware,
`Authorize.route_failures`) into the K_AUTH table, and TLS handshakes of each TLS listener
(`TlsListener` completed / failed) into the K_ENTRY table. Rate-limit decisions are not
copied: the connection counts them per route in C when the exchange ends (the exchange
record's rate outcome, fastgate/_core/stats.pyx record_exchange), on both the C and the
Python path of the rate_limit middleware.

Rules this file obeys:
- Never on the request path: the tallies are plain ints the middlewares keep anyway; a timer
  reads them and adds the difference since its last look to the slot's counters.
- Counters only grow: each source object is remembered with the values last copied from it,
  so a reload (new middleware objects starting from 0) or a retired listener neither
  double-counts nor goes back. An object that left the runtime is read one last time, then
  forgotten.
- Labels are bounded: middleware and route names come from the config, reasons are the fixed
  audit phrases. Auth refusals are tallied by (route, reason) where they happen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from fastgate._core.stats import OFFSETS, Shard

log = logging.getLogger("fastgate.metrics")

K_ENTRY, K_AUTH = 2, 4
INTERVAL = 1.0  # seconds between copies


def auth_failures(mw: Any) -> Mapping[tuple[str, str], int]:
    """(route, reason) -> count of one auth middleware (AuthCommon.route_failures) or
    authorize (its own route_failures); route "" when the refusal had no route."""
    common = getattr(mw, "common", None)
    failures = getattr(common, "route_failures", None)
    if failures is None:
        failures = getattr(mw, "route_failures", None)
    return failures if isinstance(failures, Mapping) else {}


class TallyCopier:
    """Adds the growth of each tally to the slot (see the module docstring)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        # id -> (kind, object, name, values last copied); the object is kept referenced so
        # its id cannot be reused while it is remembered.
        self.seen: dict[int, tuple[str, Any, str, dict[Any, int]]] = {}

    def _delta(self, obj: Any, key: Any, value: int) -> int:
        values = self.seen[id(obj)][3]
        last = values.get(key, 0)
        values[key] = value
        return value - last if value >= last else value

    def copy(self, runtime: Any, tls: Mapping[str, Any]) -> None:
        """One pass over the runtime's middlewares and the TLS listeners."""
        live: set[int] = set()
        for kind, objects in (("mw", runtime.middlewares), ("tls", tls)):
            for name, obj in objects.items():
                live.add(id(obj))
                entry = self.seen.get(id(obj))
                if entry is None or entry[1] is not obj:
                    self.seen[id(obj)] = (kind, obj, name, {})
        # Objects gone from the runtime since the last pass get one last read here.
        for kind, obj, name, _ in list(self.seen.values()):
            try:
                if kind == "tls":
                    self._copy_tls(name, obj)
                else:
                    self._copy_middleware(name, obj)
            except Exception:  # a tally we cannot read must not stop the others
                log.exception("metrics: cannot read the tallies of %s", name)
        for key in [k for k in self.seen if k not in live]:
            del self.seen[key]

    def _copy_tls(self, entrypoint: str, listener: Any) -> None:
        row = self.shard.register_entry(entrypoint)
        for word, value in (("tls_ok", listener.completed), ("tls_failed", listener.failed)):
            n = self._delta(listener, word, value)
            if n:
                self.shard.add_count(K_ENTRY, row, OFFSETS[word], n)

    def _copy_middleware(self, name: str, mw: Any) -> None:
        for (where, reason), value in list(auth_failures(mw).items()):
            n = self._delta(mw, (where, reason), value)
            if n:
                row = self.shard.register_auth(where, name, str(reason))
                self.shard.add_count(K_AUTH, row, OFFSETS["failures"], n)


async def copy_forever(copier: TallyCopier, sources: Any, interval: float = INTERVAL) -> None:
    """Copy every `interval` seconds; `sources()` gives (runtime, tls listeners) now."""
    while True:
        await asyncio.sleep(interval)
        copier.copy(*sources())


def copy_once(copier: TallyCopier, runtime: Any, tls: Mapping[str, Any]) -> None:
    """A last copy (at drain), never raising."""
    try:
        copier.copy(runtime, tls)
    except Exception:
        log.exception("metrics: final copy failed")


__all__ = ["TallyCopier", "auth_failures", "copy_forever", "copy_once"]
