"""Rate-limit keys, limit sets and in-flight counters for the rate_limit middleware, in C.

A key is a list of parts, each encoded as <kind byte><3-byte big-endian length><value>; see
the theory at the top of ratecheck.pyx (client address rules, the X-Forwarded-For walk, IPv6
prefix grouping, the order in which limits are decided).
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastgate._core.conn import CoreCheck
from fastgate._core.httphead import RequestHead
from fastgate._core.ratelimit import RateLimiter

PART_KINDS: dict[str, int]  # const, route, addr, addr_text, header, absent, extra -> kind byte
LIMIT_REASONS: tuple[str, ...]  # the audit reason of a refusal by limit i: "limit <i> exceeded"
BUSY_REASON: str  # "too many in flight"
UNAVAILABLE_REASON: str  # "rate limit store unavailable" (fail_closed while Redis is down)

def resolved_client_ip(conn: Any) -> bytes:
    """The client address of the request on client connection `conn` as text (b"" when
    unknown): the peer, or behind a trusted proxy the X-Forwarded-For walk (the same as the
    key's client_ip part). IPv4 dotted, IPv6 compressed (RFC 5952, as `ipaddress` writes it,
    never masked), a v4-mapped address as IPv4, an element that does not parse as its text.
    The access log calls it for connections from trusted proxies."""

def client_ip_for(
    peer: bytes, trusted: bool, trusted_nets: Iterable[Any], head: RequestHead | None = None
) -> bytes:
    """`resolved_client_ip` for a request from `peer` (address text) with `head`."""

class NetSet:
    """Trusted proxy networks, matched in C."""

    def __init__(self, networks: Iterable[Any] = ()) -> None: ...
    def __len__(self) -> int: ...
    def contains_text(self, address: str) -> bool:
        """Whether `address` (an IP as a peer name or X-Forwarded-For element has it, port
        and zone allowed) is in one of the networks."""

class KeyBuilder:
    """Builds limiter keys; `spec` is a sequence of (kind, argument): ("const", bytes),
    ("route", bytes), ("client_ip", None), ("header", name bytes), ("extra", index)."""

    spec: tuple[tuple[str, Any], ...]
    ipv6_prefix: int
    needs_extras: bool
    def __init__(self, spec: Iterable[tuple[str, Any]], ipv6_prefix: int = 64) -> None:
        """ValueError/TypeError for an empty spec, more than 16 parts, an unknown kind, a
        wrong argument type, or ipv6_prefix outside 1..128."""
    def key(
        self, conn: Any, head: RequestHead, extras: tuple[bytes | None, ...] = ()
    ) -> tuple[bytes, bool]:
        """(key, some part absent) for a request on client connection `conn`."""
    def key_for(
        self,
        peer: bytes,
        trusted: bool,
        trusted_nets: Iterable[Any],
        head: RequestHead,
        extras: tuple[bytes | None, ...] = (),
    ) -> tuple[bytes, bool]:
        """(key, some part absent) for a request from `peer` (address text); `trusted` says
        the peer is a proxy whose X-Forwarded-For is read, hops in `trusted_nets` skipped."""

def encode_part(kind: int, value: bytes) -> bytes:
    """One encoded key part."""

class LimitSet:
    """The limits of one middleware, decided in order, stopping at the first enforcing limit
    that refuses; dry-run limits are counted but never refuse."""

    limiters: tuple[RateLimiter, ...]
    n: int
    dry_log: Callable[[int, bytes, int], None] | None
    dry_log_every_us: int
    tallies: tuple[RateLimiter, ...] | None
    down: bool
    """Hybrid store: not synced with Redis; a RateCheck hands decisions to its fallback."""
    def __init__(
        self,
        limiters: Sequence[RateLimiter],
        costs: Sequence[int],
        dry_runs: Sequence[bool],
        dry_log: Callable[[int, bytes, int], None] | None = None,
        dry_log_every: float = 10.0,
        tallies: Sequence[RateLimiter] | None = None,
    ) -> None:
        """With `tallies` (hybrid store), each admission adds cost x T of its limit to the
        key's sum in that limit's tally (RateLimiter.add)."""
    def decide(self, key: bytes, now: float | None = None) -> tuple[int, int, int, int, int]:
        """(refused index or -1, remaining, reset_after_us, retry_after_us, limit): of the
        refusing limit, else of the most restrictive enforcing one."""
    def stats(self) -> list[dict[str, int]]:
        """Per limit: allowed and denied (dry run: would-be) decisions."""
    def costs_and_dry_runs(self) -> list[tuple[int, bool]]: ...

class InFlight:
    """At most `limit` requests in flight per key."""

    limit: int
    counts: dict[bytes, int]
    held: dict[Any, bytes]
    refused: int
    def __init__(self, limit: int) -> None: ...
    def acquire(self, conn: Any, key: bytes) -> bool:
        """Take a slot of `key` for the exchange on `conn`; False when none is free."""
    def release(self, conn: Any) -> None:
        """Give back `conn`'s slot (no-op when it holds none)."""
    def in_flight(self, key: bytes) -> int: ...

class RateCheck(CoreCheck):
    """A rate_limit middleware run in C on one route (local or hybrid store, head-only key)."""

    keys: KeyBuilder
    limits: LimitSet | None
    inflight: InFlight | None
    reject: Callable[[int, int, int, int, int, bytes], Any]
    reject_busy: Callable[[bytes], Any]
    skip_absent: bool
    fallback: Callable[[Any, bytes], Any] | None
    name: str
    def __init__(
        self,
        keys: KeyBuilder,
        limits: LimitSet | None,
        inflight: InFlight | None,
        reject: Callable[[int, int, int, int, int, bytes], Any],
        reject_busy: Callable[[bytes], Any],
        skip_absent: bool = False,
        fallback: Callable[[Any, bytes], Any] | None = None,
        name: str = "",
    ) -> None:
        """`fallback(conn, key)` decides (reply or None) instead while `limits.down`, and
        notes its decision on `conn` (note_rate / note_deny). Every other decision is written
        to the connection's exchange record in C: the rate outcome, and for a refusal the
        deny event with `name` as its source and LIMIT_REASONS[i] or BUSY_REASON as why."""
