"""Listening sockets: bound with SO_REUSEPORT so every worker accepts on the same address."""

from __future__ import annotations

import socket

from fastgate.config.schema import parse_address


def bind(address: str, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket on `address` (host:port or [v6]:port)."""
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def check_bindable(address: str) -> str | None:
    """None when `address` can be listened on, else the reason (checked before forking).

    The test bind uses SO_REUSEPORT like the workers, so an address held by another gateway
    of the same user is not "in use": a second instance may start beside the first and take
    over its traffic (a hand-over); anything else listening there is reported.
    """
    try:
        bind(address, 1).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
