"""fastgate._core.ratecheck: keys built in C, limit sets, in-flight counters.

The oracle for keys is a few lines of Python over `ipaddress` (`expected`): what the C code
must produce, part by part, from the same request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from conn_harness import FakeTransport, running_engine
from fastgate._core.conn import DownstreamProtocol, Engine, EntryConfig, EntryPoint
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core.httphead import Limits, RequestHead, parse_request
from fastgate._core.ratecheck import (
    PART_KINDS,
    InFlight,
    KeyBuilder,
    LimitSet,
    NetSet,
    RateCheck,
    encode_part,
)
from fastgate._core.ratelimit import RateLimiter, gcra
from fastgate._core.router import Router
from fastgate.ratelimit.keys import display_key

K = PART_KINDS


def head(*headers: str, path: str = "/") -> RequestHead:
    lines = [f"GET {path} HTTP/1.1", "Host: example.test", *headers]
    h, n = parse_request(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    assert h is not None and n > 0
    return h


def addr_part(text: str, prefix: int = 64) -> bytes:
    """The oracle: the encoded client-address part for `text`."""
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return encode_part(K["addr"], ip.packed)
    net = ipaddress.IPv6Network((ip, prefix), strict=False)
    return encode_part(K["addr"], net.network_address.packed)


def key_of(
    spec: list[tuple[str, Any]],
    peer: str,
    h: RequestHead,
    *,
    trusted: bool = False,
    nets: tuple[str, ...] = (),
    extras: tuple = (),
    prefix: int = 64,
) -> bytes:
    key, _ = KeyBuilder(spec, prefix).key_for(peer.encode(), trusted, nets, h, extras)
    assert type(key) is bytes
    return key


# ---- client addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        pytest.param("203.0.113.7", "203.0.113.7", id="ipv4 as 4 bytes"),
        pytest.param("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::", id="ipv6 grouped by /64"),
        pytest.param("2001:db8:1:2::ffff", "2001:db8:1:2::", id="same /64 same key"),
        pytest.param("::ffff:198.51.100.9", "198.51.100.9", id="v4-mapped is the ipv4 key"),
        pytest.param("fe80::1%eth0", "fe80::", id="zone index ignored"),
        pytest.param("::1", "::", id="loopback v6"),
    ],
)
def test_peer_address_key(peer: str, expected: str) -> None:
    assert key_of([("client_ip", None)], peer, head()) == addr_part(expected)


def test_ipv6_prefix_is_configurable() -> None:
    h = head()
    full = key_of([("client_ip", None)], "2001:db8::1", h, prefix=128)
    other = key_of([("client_ip", None)], "2001:db8::2", h, prefix=128)
    assert full == encode_part(K["addr"], ipaddress.ip_address("2001:db8::1").packed)
    assert full != other
    p56 = key_of([("client_ip", None)], "2001:db8:0:ff12::1", h, prefix=56)
    assert p56 == encode_part(K["addr"], ipaddress.ip_address("2001:db8:0:ff00::").packed)


def test_unparseable_peer_is_kept_as_text() -> None:
    assert key_of([("client_ip", None)], "unknown", head()) == encode_part(
        K["addr_text"], b"unknown"
    )


XFF_NETS = ("10.0.0.0/8", "2001:db8:ffff::/48")


@pytest.mark.parametrize(
    ("headers", "trusted", "expected"),
    [
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1"],
            False,
            "10.1.1.1",
            id="untrusted peer: header ignored",
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1"],
            True,
            "198.51.100.1",
            id="trusted peer: the forwarded client",
        ),
        pytest.param(
            ["X-Forwarded-For: 6.6.6.6, 198.51.100.1, 10.2.2.2"],
            True,
            "198.51.100.1",
            id="trusted hops skipped from the right, forged left part ignored",
        ),
        pytest.param(
            ["X-Forwarded-For: 6.6.6.6", "X-Forwarded-For: 198.51.100.1 , 10.2.2.2"],
            True,
            "198.51.100.1",
            id="several field lines are one list",
        ),
        pytest.param(
            ["X-Forwarded-For: 10.3.3.3, 10.2.2.2"],
            True,
            "10.3.3.3",
            id="all hops trusted: the leftmost",
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1:4711"], True, "198.51.100.1", id="ipv4 with port"
        ),
        pytest.param(
            ["X-Forwarded-For: [2001:db8:1:2::9]:443"],
            True,
            "2001:db8:1:2::",
            id="bracketed ipv6 with port, grouped",
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1,,  "], True, "198.51.100.1", id="empty elements skipped"
        ),
        pytest.param(
            ["X-Forwarded-For: 198.51.100.1, 2001:db8:ffff:1::1"],
            True,
            "198.51.100.1",
            id="trusted ipv6 hop skipped",
        ),
        pytest.param([], True, "10.1.1.1", id="trusted peer without the header: the peer"),
        pytest.param(
            ["x-forwarded-for: 192.0.2.5"], True, "192.0.2.5", id="name is case-insensitive"
        ),
    ],
)
def test_x_forwarded_for_walk(headers: list[str], trusted: bool, expected: str) -> None:
    key = key_of([("client_ip", None)], "10.1.1.1", head(*headers), trusted=trusted, nets=XFF_NETS)
    assert key == addr_part(expected)


def test_x_forwarded_for_garbage_stops_the_walk_as_text() -> None:
    h = head("X-Forwarded-For: 198.51.100.1, not-an-ip, 10.2.2.2")
    key = key_of([("client_ip", None)], "10.1.1.1", h, trusted=True, nets=XFF_NETS)
    assert key == encode_part(K["addr_text"], b"not-an-ip")


def test_netset_matches_v4_and_v6_prefixes() -> None:
    nets = NetSet(["10.0.0.0/8", "192.0.2.128/25", "2001:db8::/32", "198.51.100.7"])
    assert len(nets) == 4
    for inside in (
        "10.255.1.2",
        "192.0.2.200",
        "2001:db8:9::1",
        "198.51.100.7",
        "::ffff:10.0.0.1",
        "[2001:db8::5]:80",
        "10.0.0.1:8080",
    ):
        assert nets.contains_text(inside), inside
    for outside in ("11.0.0.1", "192.0.2.127", "2001:db9::1", "198.51.100.8", "junk", ""):
        assert not nets.contains_text(outside), outside


# ---- the other parts ---------------------------------------------------------------------


def test_parts_are_length_prefixed_and_in_order() -> None:
    h = head("X-Tenant: acme", "X-Plan: gold")
    spec = [
        ("route", b"api"),
        ("header", b"X-Tenant"),
        ("const", b"v1"),
        ("client_ip", None),
        ("header", b"x-plan"),
    ]
    assert key_of(spec, "192.0.2.1", h) == b"".join(
        [
            encode_part(K["route"], b"api"),
            encode_part(K["header"], b"acme"),
            encode_part(K["const"], b"v1"),
            addr_part("192.0.2.1"),
            encode_part(K["header"], b"gold"),
        ]
    )


def test_values_cannot_forge_part_boundaries() -> None:
    spec = [("header", b"a"), ("header", b"b")]
    one = key_of(spec, "192.0.2.1", head("A: x,y", "B: z"))
    two = key_of(spec, "192.0.2.1", head("A: x", "B: y,z"))
    assert one != two


def test_absent_header_and_extra_are_marked() -> None:
    kb = KeyBuilder([("header", b"x-api-key"), ("extra", 0)])
    key, absent = kb.key_for(b"192.0.2.1", False, (), head(), (None,))
    assert absent is True
    assert key == encode_part(K["absent"], b"") * 2
    key, absent = kb.key_for(b"192.0.2.1", False, (), head("X-Api-Key: k"), (b"alice",))
    assert absent is False
    assert key == encode_part(K["header"], b"k") + encode_part(K["extra"], b"alice")


def test_header_value_is_trimmed_and_first_line_wins() -> None:
    h = head("X-Tenant:   acme  ", "X-Tenant: other")
    assert key_of([("header", b"x-tenant")], "192.0.2.1", h) == encode_part(K["header"], b"acme")


@pytest.mark.parametrize("size", [200, 252, 253, 5000], ids=lambda n: f"value of {n} bytes")
def test_long_keys_leave_the_stack_buffer_intact(size: int) -> None:
    value = b"k" * size
    h = head("X-Api-Key: " + value.decode())
    key = key_of([("route", b"r"), ("header", b"x-api-key")], "192.0.2.1", h)
    assert key == encode_part(K["route"], b"r") + encode_part(K["header"], value)


@pytest.mark.parametrize(
    ("spec", "prefix", "error"),
    [
        pytest.param([], 64, ValueError, id="empty"),
        pytest.param([("client_ip", None)] * 17, 64, ValueError, id="too many parts"),
        pytest.param([("cookie", b"x")], 64, ValueError, id="unknown kind"),
        pytest.param([("header", "x")], 64, TypeError, id="header name must be bytes"),
        pytest.param([("header", b"")], 64, ValueError, id="empty header name"),
        pytest.param([("extra", -1)], 64, TypeError, id="negative extra"),
        pytest.param([("client_ip", None)], 0, ValueError, id="prefix 0"),
        pytest.param([("client_ip", None)], 129, ValueError, id="prefix 129"),
    ],
)
def test_bad_specs_are_refused(spec: list, prefix: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        KeyBuilder(spec, prefix)


def test_display_hides_header_values() -> None:
    h = head("X-Api-Key: sk_live_very_secret")
    key = key_of(
        [("route", b"api"), ("client_ip", None), ("header", b"x-api-key")], "2001:db8:1:2::7", h
    )
    text = display_key(key, 64)
    assert "sk_live_very_secret" not in text
    assert text.startswith("route=api client_ip=2001:db8:1:2::/64 header=#")


# ---- a real connection ---------------------------------------------------------------------


@pytest.fixture
def engine() -> Iterator[Engine]:
    yield from running_engine()


@pytest.mark.parametrize(
    ("peer", "trusted_nets"),
    [
        pytest.param("10.1.1.1", (), id="peer not trusted"),
        pytest.param("10.1.1.1", (ipaddress.ip_network("10.0.0.0/8"),), id="trusted proxy"),
    ],
)
def test_key_on_a_connection_equals_key_for(engine: Engine, peer: str, trusted_nets: tuple) -> None:
    cfg = EntryConfig(Router([]), Limits(), trusted_nets=trusted_nets)
    conn = DownstreamProtocol(engine, EntryPoint("web", cfg))
    conn.connection_made(FakeTransport((peer, 5555)))
    h = head("X-Forwarded-For: 198.51.100.1, 10.9.9.9")
    kb = KeyBuilder([("client_ip", None), ("header", b"x-forwarded-for")])
    assert kb.key(conn, h) == kb.key_for(peer.encode(), bool(trusted_nets), trusted_nets, h)
    conn.connection_lost(None)


# ---- limit sets -----------------------------------------------------------------------------


def limiter(rate: float, per: float = 1.0, burst: int = 0) -> RateLimiter:
    return RateLimiter(rate, per, burst)


def test_limit_set_agrees_with_gcra_for_one_limit() -> None:
    ls = LimitSet([limiter(2, 1, 3)], [1], [False])
    tat = 0
    for t_us in (0, 0, 0, 100_000, 500_000, 600_000, 9_000_000):
        index, remaining, reset, retry, limit = ls.decide(b"k", now=t_us / 1e6 + 1000)
        allowed, tat, rem, rst, rty = gcra(tat, t_us, 1_000_000, 2.0, 3, 1)
        assert (index < 0, remaining, reset, retry, limit) == (allowed, rem, rst, rty, 3)


def test_first_refusal_stops_later_limits_and_charges_earlier_ones() -> None:
    per_second = limiter(10, 1, 10)
    tiny = limiter(1, 60, 1)
    hourly = limiter(100, 3600, 100)
    ls = LimitSet([per_second, tiny, hourly], [1, 1, 1], [False, False, False])
    assert ls.decide(b"k", now=5.0)[0] == -1
    assert ls.decide(b"k", now=5.0)[0] == 1  # refused by the second limit
    assert [s["allowed"] for s in ls.stats()] == [2, 1, 1]  # the third never saw it
    assert [s["denied"] for s in ls.stats()] == [0, 1, 0]
    assert per_second.decide(b"k", now=5.0)[1] == 7  # 10 - 3: charged twice plus this probe


def test_dry_run_limits_count_and_log_but_admit() -> None:
    logged: list[tuple[int, bytes, int]] = []
    ls = LimitSet(
        [limiter(1, 60, 1), limiter(100, 1, 100)],
        [1, 1],
        [True, False],
        dry_log=lambda i, k, n: logged.append((i, k, n)),
        dry_log_every=10.0,
    )
    results = [ls.decide(b"who", now=1.0 + i * 0.001) for i in range(5)]
    assert all(r[0] == -1 for r in results)
    assert ls.stats() == [{"allowed": 1, "denied": 4}, {"allowed": 5, "denied": 0}]
    assert logged == [(0, b"who", 1)]  # once per 10 s, with the count
    ls.decide(b"who", now=20.0)  # refills: admitted
    ls.decide(b"who", now=20.0)  # refused again: a new report, 3 refusals since the last
    assert logged[-1] == (0, b"who", 4)


def test_most_restrictive_admitting_limit_is_reported() -> None:
    ls = LimitSet([limiter(100, 1, 100), limiter(5, 60, 5)], [1, 1], [False, False])
    index, remaining, _, _, limit = ls.decide(b"k", now=1.0)
    assert (index, remaining, limit) == (-1, 4, 5)


def test_limit_set_validates() -> None:
    with pytest.raises(ValueError):
        LimitSet([], [], [])
    with pytest.raises(ValueError):
        LimitSet([limiter(1)], [1, 2], [False])
    with pytest.raises(ValueError):
        LimitSet([limiter(1)], [-1], [False])
    with pytest.raises(TypeError):
        LimitSet([object()], [1], [False])


# ---- in flight ------------------------------------------------------------------------------


def test_in_flight_counts_per_key_and_releases() -> None:
    inflight = InFlight(2)
    a, b, c, d = (object() for _ in range(4))
    assert inflight.acquire(a, b"k") and inflight.acquire(b, b"k")
    assert not inflight.acquire(c, b"k")
    assert inflight.acquire(d, b"other")
    assert inflight.acquire(a, b"k")  # already holds a slot: not counted twice
    assert inflight.in_flight(b"k") == 2 and inflight.refused == 1
    inflight.release(a)
    inflight.release(a)  # a second release is a no-op
    assert inflight.in_flight(b"k") == 1
    assert inflight.acquire(c, b"k")
    for conn in (b, c, d):
        inflight.release(conn)
    assert inflight.counts == {} and inflight.held == {}


def test_rate_check_refuses_identity_keys_and_empty_configs() -> None:
    with pytest.raises(ValueError):
        RateCheck(KeyBuilder([("extra", 0)]), None, InFlight(1), print, print)
    with pytest.raises(ValueError):
        RateCheck(KeyBuilder([("client_ip", None)]), None, None, print, print)


# ---- property: the X-Forwarded-For walk against a Python oracle ----------------------------

ADDRS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["10.0.0.1", "10.200.3.4", "192.0.2.1", "2001:db8:ffff::9", "::ffff:10.1.2.3"]),
)
NETS = st.lists(
    st.sampled_from(["10.0.0.0/8", "192.0.2.0/24", "2001:db8:ffff::/48", "::/0"]),
    max_size=3,
    unique=True,
)


def oracle_client(peer: str, trusted: bool, nets: list[str], lines: list[list[str]]) -> str:
    networks = [ipaddress.ip_network(n) for n in nets]

    def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in networks)

    if not trusted:
        return peer
    leftmost = None
    for element in reversed([e for line in lines for e in line]):
        ip = ipaddress.ip_address(element)
        if not is_trusted(ip):
            return element
        leftmost = element
    return leftmost if leftmost is not None else peer


@settings(max_examples=300, deadline=None)
@given(
    peer=ADDRS,
    trusted=st.booleans(),
    nets=NETS,
    lines=st.lists(st.lists(ADDRS, min_size=1, max_size=4), max_size=3),
    spaces=st.sampled_from([",", ", ", " ,\t"]),
)
def test_x_forwarded_for_walk_matches_the_oracle(
    peer: str, trusted: bool, nets: list[str], lines: list[list[str]], spaces: str
) -> None:
    h = head(*(f"X-Forwarded-For: {spaces.join(line)}" for line in lines))
    key = key_of([("client_ip", None)], peer, h, trusted=trusted, nets=tuple(nets))
    assert key == addr_part(oracle_client(peer, trusted, nets, lines))


# ---- the hybrid store's tallies -------------------------------------------------------------


def test_limit_set_tallies_what_it_admits() -> None:
    first, second = limiter(10, 1, 2), limiter(100, 1, 100)  # T = 100 ms and 10 ms
    tallies = [RateLimiter(1.0, 1.0, 1), RateLimiter(1.0, 1.0, 1)]
    ls = LimitSet([first, second], [1, 3], [False, False], tallies=tallies)
    assert not ls.down and ls.tallies == tuple(tallies)
    results = [ls.decide(b"k", now=5.0)[0] for _ in range(3)]
    assert results == [-1, -1, 0]  # the third refused by the first limit
    # cost x T per admission; the refusal is charged to neither (the second never saw it)
    assert tallies[0].drain() == [(b"k", 2 * 100_000)]
    assert tallies[1].drain() == [(b"k", 2 * 3 * 10_000)]


def test_limit_set_tallies_validate() -> None:
    with pytest.raises(ValueError):
        LimitSet([limiter(1)], [1], [False], tallies=[])
    with pytest.raises(TypeError):
        LimitSet([limiter(1)], [1], [False], tallies=[object()])
