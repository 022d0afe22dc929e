"""One RedisClient per `providers.redis` entry per process, shared by every middleware.

A config reload compiles new middlewares; when a provider's settings did not change they get
the very client the old generation used (one connection, no reconnect on reload). A client
whose settings changed is replaced, and the old one is closed once nothing new uses it (on
the running loop; a client never used was never connected). Creating a client opens nothing:
it connects on its first command, so the supervisor's config check makes no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from fastgate.config.schema import RedisProvider
from fastgate.redis import RedisClient, SentinelConfig

__all__ = ["redis_client"]

_clients: dict[str, tuple[str, RedisClient]] = {}


def _ssl_context(tls: bool | str) -> ssl.SSLContext | None:
    if tls is False:
        return None
    if tls is True:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=tls)


def build_client(provider: RedisProvider) -> RedisClient:
    """A new, unconnected client for `provider`."""
    context = _ssl_context(provider.tls)
    sentinel = None
    host, port = "127.0.0.1", 6379
    if provider.sentinel is not None:
        s = provider.sentinel
        sentinel = SentinelConfig(
            s.addresses, s.master, password=s.password, username=s.username, ssl=context
        )
    else:
        host, port = provider.endpoint()
    return RedisClient(
        host,
        port,
        db=provider.db,
        username=provider.username,
        password=provider.password,
        ssl=context,
        connect_timeout=provider.connect_timeout,
        command_timeout=provider.command_timeout,
        max_backoff=provider.max_backoff,
        sentinel=sentinel,
    )


def redis_client(name: str, provider: RedisProvider) -> RedisClient:
    """The process's client for provider `name` with these settings."""
    fingerprint = provider.model_dump_json()
    current = _clients.get(name)
    if current is not None and current[0] == fingerprint:
        return current[1]
    client = build_client(provider)
    _clients[name] = (fingerprint, client)
    if current is not None:
        _close_later(current[1])
    return client


def _close_later(client: RedisClient) -> None:
    with contextlib.suppress(RuntimeError):  # no running loop: it was never connected
        asyncio.get_running_loop().call_later(5.0, lambda: asyncio.ensure_future(client.close()))
