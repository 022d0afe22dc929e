"""Limiter keys from the options: the KeyBuilder spec, identity values, and log-safe text.

The key bytes are built by `fastgate._core.ratecheck.KeyBuilder` on both paths. The parts it
cannot read from the request head (identity.subject, identity.consumer, claim:NAME) come from
`ctx.identity` (DESIGN.md §5) as `extras`, in the order they appear in the key. When logged,
a key is shown part by part: addresses and the route in clear, header values (which may be
API keys or tokens) only as a short BLAKE2b digest, never in full.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

from fastgate.ratelimit.options import KeyPart, RateLimitOptions

__all__ = ["display_key", "extras_of", "key_spec"]

# Kind bytes of the encoded parts (fastgate/_core/ratecheck.pxd, PartKind).
_CONST, _ROUTE, _ADDR, _ADDR_TEXT, _HEADER, _ABSENT, _EXTRA = b"crauh-x"
_NAMES = {_CONST: "const", _ROUTE: "route", _HEADER: "header", _EXTRA: "identity"}


def key_spec(options: RateLimitOptions, route: str, prefix: bool) -> list[tuple[str, Any]]:
    """KeyBuilder parts for `options.key` on `route`, the route name first when `prefix`
    (scope: route). Identity parts become extras numbered in order."""
    spec: list[tuple[str, Any]] = []
    if prefix:
        spec.append(("route", route.encode()))
    extra = 0
    for part in options.key:
        if part.kind == "client_ip":
            spec.append(("client_ip", None))
        elif part.kind == "header":
            spec.append(("header", part.arg.encode("latin-1")))
        elif part.kind == "route":
            spec.append(("route", route.encode()))
        elif part.kind == "const":
            spec.append(("const", part.arg.encode()))
        else:
            spec.append(("extra", extra))
            extra += 1
    return spec


def _identity_value(part: KeyPart, identity: Any) -> bytes | None:
    if identity is None:
        return None
    if part.kind == "subject":
        value = identity.subject
    elif part.kind == "consumer":
        value = identity.consumer
    else:
        value = identity.claim(part.arg)
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else str(value).encode()


def extras_of(parts: tuple[KeyPart, ...], identity: Any) -> tuple[bytes | None, ...]:
    """The identity values for the extra parts (`parts`: the key's identity parts)."""
    values = []
    for part in parts:
        values.append(_identity_value(part, identity))
    return tuple(values)


def _digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=6).hexdigest()


def display_key(key: bytes, ipv6_prefix: int = 64) -> str:
    """An encoded key as text for logs: `route=api client_ip=203.0.113.7 header=#1a2b3c4d5e6f`."""
    out = []
    pos = 0
    while pos + 4 <= len(key):
        kind = key[pos]
        n = int.from_bytes(key[pos + 1 : pos + 4], "big")
        value = key[pos + 4 : pos + 4 + n]
        pos += 4 + n
        if kind == _ADDR:
            if len(value) == 4:
                out.append(f"client_ip={ipaddress.IPv4Address(value)}")
            else:
                net = ipaddress.IPv6Network((value, ipv6_prefix))
                out.append(f"client_ip={net}")
        elif kind == _ADDR_TEXT:
            out.append(f"client_ip={value.decode('latin-1')!r}")
        elif kind == _ABSENT:
            out.append("(absent)")
        elif kind == _HEADER:
            out.append(f"header=#{_digest(value)}")
        else:
            out.append(f"{_NAMES.get(kind, '?')}={value.decode('utf-8', 'replace')}")
    return " ".join(out)
