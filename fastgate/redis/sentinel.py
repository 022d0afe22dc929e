"""Finding the master through Redis Sentinel (the Sentinel client guidelines, steps 1-3).

Ask each sentinel in turn `SENTINEL get-master-addr-by-name <name>`; the first that names an
address wins and moves to the front of the list, so later lookups ask it first. The client
then connects to that address and sends `ROLE` in its handshake: a master that was demoted
(the sentinel's view may lag a failover) answers `slave`, and the connect fails and is retried
through discovery with backoff. After any connection loss the client discovers again, so a
failover is followed without restarting anything.

Sentinels are asked over short-lived connections of their own (AUTH with the sentinel's
credentials when given; sentinels have no databases, so no SELECT).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from ssl import SSLContext

from hiredis import pack_command

from fastgate.redis.connection import Connection, Stats
from fastgate.redis.errors import RedisError, RedisUnavailable

Address = tuple[str, int]


@dataclass(frozen=True)
class SentinelConfig:
    """Where the sentinels are and which master to ask them for.

    `addresses` are (host, port) pairs or "host:port" strings. `password` (and `username`, for
    an ACL user) authenticate to the sentinels, not to the master: the master's credentials are
    the client's own. `ssl` is used for the sentinel connections when given. The password is
    kept out of the repr.
    """

    addresses: Sequence[Address | str]
    master_name: str
    password: str | None = field(default=None, repr=False)
    username: str | None = None
    ssl: SSLContext | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parsed = tuple(_address(a) for a in self.addresses)
        if not parsed:
            raise ValueError("SentinelConfig needs at least one sentinel address")
        if not self.master_name:
            raise ValueError("SentinelConfig needs a master name")
        if self.username is not None and self.password is None:
            raise ValueError("a sentinel username needs a password")
        object.__setattr__(self, "addresses", parsed)


def _address(value: Address | str) -> Address:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"sentinel address {value!r} is not host:port")
        return host.strip("[]"), int(port)
    host, port = value
    return str(host), int(port)


class MasterLocator:
    """Asks the sentinels of one `SentinelConfig` where the master is."""

    def __init__(self, config: SentinelConfig) -> None:
        self.config = config
        self._order: list[Address] = list(config.addresses)  # type: ignore[arg-type]
        self._stats = Stats()  # sentinel traffic is not counted as the client's

    async def locate(self, timeout: float) -> Address:
        """The master's (host, port), or RedisUnavailable naming what each sentinel said."""
        problems = []
        for address in list(self._order):
            where = f"{address[0]}:{address[1]}"
            try:
                reply = await self._ask(address, timeout)
            except RedisError as exc:
                text = str(exc)
                problems.append(text if where in text else f"{where}: {text}")
                continue
            if not reply:
                problems.append(f"{where}: does not know this master")
                continue
            self._order.remove(address)
            self._order.insert(0, address)
            return reply[0].decode("ascii", "replace"), int(reply[1])
        raise RedisUnavailable(
            f"no sentinel named master {self.config.master_name!r}: " + "; ".join(problems)
        )

    async def _ask(self, address: Address, timeout: float) -> list | None:
        config = self.config
        loop = asyncio.get_running_loop()
        conn = Connection(loop, self._stats, timeout)
        if config.password is None:
            setup = [("PING", ("PING",))]
        elif config.username is None:
            setup = [("sentinel authentication (AUTH)", ("AUTH", config.password))]
        else:
            setup = [("sentinel authentication (AUTH)", ("AUTH", config.username, config.password))]
        try:
            await conn.open(
                address[0],
                address[1],
                ssl=config.ssl,
                setup=setup,
                timeout=timeout,
                secret=config.password,
            )
            conn.mark_ready()
            payload = pack_command(("SENTINEL", "get-master-addr-by-name", config.master_name))
            return await conn.send(payload)
        finally:
            conn.close("sentinel query done")
