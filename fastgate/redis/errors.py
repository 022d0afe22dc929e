"""The client's errors: one base class, a server's error reply, and "Redis cannot answer now".

Callers that protect a request path (the rate limiter) catch `RedisError` and apply their
fail-open or fail-closed policy; nothing here is meant to reach a client as a 500. Messages
name hosts, ports and commands but never a password: the handshake redacts the server's text
before it is put into an exception.
"""

from __future__ import annotations


class RedisError(Exception):
    """Base of every error the Redis client raises."""


class RedisReplyError(RedisError):
    """The server answered the command with an error reply (`-ERR ...`, `-NOSCRIPT ...`).

    hiredis builds these itself from the reply text (one argument: the message), so the
    constructor keeps Exception's signature. `code` is the first word (`ERR`, `WRONGTYPE`,
    `NOSCRIPT`, ...), which is what callers branch on.
    """

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]


class RedisUnavailable(RedisError):
    """No answer can be had: not connected, backing off, the connection dropped while the
    command was in flight, the command timed out, or the (re)connect handshake failed."""
