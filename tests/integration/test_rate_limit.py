"""The rate_limit middleware with the local store, through a real gateway process.

One gateway serves every scenario, each on its own route (chosen by Host), so buckets never
leak between tests: burst then 429 with each header style, per-key independence, route and
shared scope, X-Forwarded-For from a trusted proxy, dry run, in-flight limits with a slow
upstream, and the Python path (an identity key). Every request from these tests comes from
127.0.0.1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    Client,
    Gateway,
    Origin,
    Response,
    assert_reply_then_lingering_close,
    base_config,
    free_port,
)

PER_MINUTE_3 = {"type": "rate_limit", "rate": "3/minute"}


def route(name: str, middlewares: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"hosts": [f"{name}.test"]},
        "service": "origin",
        "middlewares": middlewares,
        **extra,
    }


@pytest.fixture(scope="module")
def gw(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    middlewares = {
        "ietf": PER_MINUTE_3,
        "legacy": {**PER_MINUTE_3, "headers": "legacy"},
        "quiet": {**PER_MINUTE_3, "headers": "none", "message": "easy, tiger"},
        "keyed": {
            "type": "rate_limit",
            "rate": "2/minute",
            "key": "header:X-Client",
            "missing_key": "skip",
        },
        "two": {
            "type": "rate_limit",
            "key": "header:X-Client",
            "limits": [{"rate": "100/s", "name": "fast"}, {"rate": "2/hour", "name": "slow"}],
        },
        "dry": {
            "type": "rate_limit",
            "key": "header:X-Api-Key",
            "limits": [{"rate": "1/hour", "dry_run": True}],
            "dry_run_log_interval": 0.001,
        },
        "inflight": {"type": "rate_limit", "in_flight": 2},
        "shared": {"type": "rate_limit", "rate": "2/minute", "scope": "shared"},
        "perroute": {"type": "rate_limit", "rate": "2/minute", "scope": "route"},
        "forwarded": {"type": "rate_limit", "rate": "1/minute"},
        "linger": {"type": "rate_limit", "rate": "1/minute"},
        "identity": {
            "type": "rate_limit",
            "rate": "2/minute",
            "key": ["client_ip", "identity.subject"],
        },
    }
    routes = [
        route("ietf", ["ietf"]),
        route("linger", ["linger"]),
        route("legacy", ["legacy"]),
        route("quiet", ["quiet"]),
        route("keyed", ["keyed"]),
        route("two", ["two"]),
        route("dry", ["dry"]),
        route("inflight", ["inflight"]),
        route("shared-a", ["shared"]),
        route("shared-b", ["shared"]),
        route("route-a", ["perroute"]),
        route("route-b", ["perroute"]),
        route("forwarded", ["forwarded"], entrypoints=["trusted"]),
        route("identity", ["identity"]),
    ]
    config = base_config(
        origin.port,
        middlewares=middlewares,
        routes=routes,
        entrypoints={
            "web": {"address": f"127.0.0.1:{free_port()}"},
            "trusted": {
                "address": f"127.0.0.1:{free_port()}",
                "forwarded": {"trusted_ips": ["127.0.0.1/32", "10.0.0.0/8"]},
            },
        },
    )
    gateway = Gateway(config, tmp_path_factory.mktemp("ratelimit")).start()
    yield gateway
    gateway.stop()


def send(
    gw: Gateway,
    host: str,
    n: int,
    path: str = "/echo-path/x",
    headers: dict[str, str] | None = None,
    entrypoint: str = "web",
) -> list[Response]:
    """`n` requests on one keep-alive connection."""
    with Client(gw.address(entrypoint)) as c:
        return [c.request("GET", path, headers=headers, host=f"{host}.test") for _ in range(n)]


def statuses(responses: list[Response]) -> list[int]:
    return [r.status for r in responses]


def test_burst_then_429_with_ietf_headers(gw: Gateway) -> None:
    responses = send(gw, "ietf", 5)
    assert statuses(responses) == [200, 200, 200, 429, 429]
    refused = responses[3]
    assert refused.header("RateLimit-Policy") == '"ietf";q=3;w=60'
    assert refused.header("RateLimit") == '"ietf";r=0;t=20'
    assert refused.header("Retry-After") == "20"  # T = 60 s / 3: the next token
    assert refused.header("Content-Type") == "application/json"
    doc = refused.json()
    assert doc["error"] == "rate limit exceeded" and doc["retry_after"] == 20
    assert len(doc["request_id"]) == 32
    assert responses[0].body == b"/echo-path/x"


def test_legacy_headers(gw: Gateway) -> None:
    refused = send(gw, "legacy", 4)[3]
    assert refused.status == 429
    assert (
        refused.header("X-RateLimit-Limit"),
        refused.header("X-RateLimit-Remaining"),
        refused.header("X-RateLimit-Reset"),
        refused.header("Retry-After"),
    ) == ("3", "0", "20", "20")
    assert refused.header("RateLimit") is None


def test_no_rate_headers_but_retry_after(gw: Gateway) -> None:
    refused = send(gw, "quiet", 4)[3]
    assert refused.status == 429 and refused.header("Retry-After") == "20"
    assert not any(k.lower().startswith(("ratelimit", "x-ratelimit")) for k, _ in refused.headers)
    assert refused.json()["error"] == "easy, tiger"


def test_keys_are_independent(gw: Gateway) -> None:
    assert statuses(send(gw, "keyed", 3, headers={"X-Client": "a"})) == [200, 200, 429]
    assert statuses(send(gw, "keyed", 3, headers={"X-Client": "b"})) == [200, 200, 429]
    assert statuses(send(gw, "keyed", 1, headers={"X-Client": "a"})) == [429]
    # missing_key: skip -- requests without the header are not limited
    assert statuses(send(gw, "keyed", 4)) == [200] * 4


def test_the_tighter_of_two_limits_refuses(gw: Gateway) -> None:
    responses = send(gw, "two", 3, headers={"X-Client": "t"})
    assert statuses(responses) == [200, 200, 429]
    assert responses[2].header("RateLimit-Policy") == '"fast";q=100;w=1, "slow";q=2;w=3600'
    assert responses[2].header("RateLimit") == '"slow";r=0;t=1800'


def test_scope_route_counts_each_route_alone_and_shared_counts_together(gw: Gateway) -> None:
    assert statuses(send(gw, "route-a", 3)) == [200, 200, 429]
    assert statuses(send(gw, "route-b", 3)) == [200, 200, 429]
    assert statuses(send(gw, "shared-a", 1) + send(gw, "shared-b", 2)) == [200, 200, 429]
    assert statuses(send(gw, "shared-a", 1)) == [429]


def test_forwarded_clients_behind_a_trusted_proxy_are_apart(gw: Gateway) -> None:
    def from_client(ip: str, n: int) -> list[int]:
        # 10.9.9.9 is a trusted proxy hop: skipped; the client is the address left of it
        headers = {"X-Forwarded-For": f"{ip}, 10.9.9.9"}
        return statuses(send(gw, "forwarded", n, headers=headers, entrypoint="trusted"))

    assert from_client("198.51.100.1", 2) == [200, 429]
    assert from_client("198.51.100.2", 2) == [200, 429]
    assert from_client("2001:db8:5:5::1", 1) == [200]
    assert from_client("2001:db8:5:5::2", 1) == [429]  # same /64


def test_dry_run_admits_counts_and_logs_without_the_secret(gw: Gateway) -> None:
    secret = "sk_live_0123456789abcdef"
    assert statuses(send(gw, "dry", 4, headers={"X-Api-Key": secret})) == [200] * 4
    log = gw.log.read_text()
    assert "dry run: limit 0 (1 request per hour, bursts up to 1) would refuse" in log
    assert "would refuse route=dry header=#" in log
    assert secret not in log


def test_in_flight_limit_with_a_slow_upstream(gw: Gateway) -> None:
    results: list[int] = []
    barrier = threading.Barrier(3)

    def slow() -> None:
        with Client(gw.addr) as c:
            barrier.wait()
            results.append(c.request("GET", "/sleep/0.6", host="inflight.test").status)

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [200, 200, 429]
    # the slots came back when the responses ended
    assert statuses(send(gw, "inflight", 2)) == [200, 200]
    busy = send(gw, "inflight", 1)  # one at a time on one connection: never busy
    assert busy[0].status == 200


def test_in_flight_refusal_body(gw: Gateway) -> None:
    results: list[Response] = []
    barrier = threading.Barrier(3)

    def slow() -> None:
        with Client(gw.addr) as c:
            barrier.wait()
            results.append(c.request("GET", "/sleep/0.5", host="inflight.test"))

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    (refused,) = [r for r in results if r.status == 429]
    assert refused.json()["error"] == "too many requests in flight"


def test_python_path_identity_key(gw: Gateway) -> None:
    # No auth middleware runs before it, so the identity part is absent and all anonymous
    # requests from one address share a bucket -- through the Python chain, not the C check.
    assert statuses(send(gw, "identity", 3)) == [200, 200, 429]
    refused = send(gw, "identity", 1)[0]
    assert refused.header("RateLimit") == '"identity";r=0;t=30'


def test_refusal_of_a_request_with_a_body_lingers_instead_of_resetting(gw: Gateway) -> None:
    # A 429 answered before the body was read: the gateway half-closes and reads on, so a
    # client still sending is not reset (a reset would drop the reply on a real network).
    head = b"POST /up HTTP/1.1\r\nHost: linger.test\r\nContent-Length: 100000\r\n\r\n"
    with Client(gw.addr) as c:
        assert c.request("GET", "/echo", host="linger.test").status != 429  # spends the bucket
    assert_reply_then_lingering_close(gw.addr, head + b"v" * 1000, 429)
