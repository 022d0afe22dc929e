"""The C Service as the compiler builds it: pools and weights, the balancer and resilience
settings taken from the config, `state()`, and the set_* calls refusing what they cannot do.

Picking a server needs a live ConnCore; the distributions (round robin 3:1, random, hash,
sticky cookies, least request) are proved through a real gateway in
tests/integration/test_services_gateway.py. Rules checked here: every config field reaches the
Service unchanged, sticky ids are stable and reveal nothing but a hash, a bad setting raises at
compile time (never per request), and the ticker honours the shortest service/route timer.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastgate._core.conn import Engine, ServerPool, Service

from fastgate.config.compile import Runtime, check_runtime, compile_runtime
from fastgate.config.schema import parse_config
from fastgate.errors import ConfigError
from fastgate.server.worker import _tick_for

A = "http://127.0.0.1:18001"
B = "http://127.0.0.1:18002"
C = "http://127.0.0.1:18003"


@pytest.fixture
def engine() -> Iterator[Engine]:
    loop = asyncio.new_event_loop()
    eng = Engine(loop, None, tick_interval=1.0)
    yield eng
    eng.close()
    loop.close()


def document(service: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    svc = {"servers": [{"url": A, "weight": 3}, {"url": B}], **(service or {})}
    data: dict[str, Any] = {
        "entrypoints": {"web": {"address": "127.0.0.1:18080"}},
        "services": {"svc": svc},
        "routes": [{"name": "r", "match": {"path": "/"}, "service": "svc"}],
    }
    data.update(overrides)
    return data


def compile_service(engine: Engine, service: dict[str, Any] | None = None) -> Service:
    runtime: Runtime = compile_runtime(parse_config(document(service)), engine)
    return runtime.services["svc"]


# ---- pools, weights, state ---------------------------------------------------------------


def test_pools_and_weights_in_config_order(engine: Engine) -> None:
    svc = compile_service(engine)
    assert svc.name == "svc"
    assert [p.url for p in svc.pools] == [A, B]
    assert [p.weight for p in svc.pools] == [3, 1]
    assert [(p.host, p.port) for p in svc.pools] == [("127.0.0.1", 18001), ("127.0.0.1", 18002)]


def test_state_of_a_fresh_service(engine: Engine) -> None:
    svc = compile_service(engine)
    assert svc.state() == {
        "inflight": 0,
        "queued": 0,
        "circuit": "closed",
        "servers": {url: {"healthy": True, "ejected_until": 0.0, "active": 0} for url in (A, B)},
    }


def test_unhealthy_server_shows_in_state(engine: Engine) -> None:
    svc = compile_service(engine)
    svc.pools[1].set_healthy(False)
    state = svc.state()
    assert state["servers"][B]["healthy"] is False
    assert state["servers"][A]["healthy"] is True
    svc.pools[1].set_healthy(True)
    assert svc.state()["servers"][B]["healthy"] is True


def test_sticky_ids_are_stable_and_distinct(engine: Engine) -> None:
    svc = compile_service(engine, {"balancer": "sticky_cookie"})
    ids = [p.sticky_id for p in svc.pools]
    assert ids == [
        hashlib.sha256(f"svc\0{url}".encode()).hexdigest()[:16].encode() for url in (A, B)
    ]
    assert len(set(ids)) == 2
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    # Another compile (a reload, another worker) names the servers the same way.
    again = compile_service(engine, {"balancer": "sticky_cookie"})
    assert [p.sticky_id for p in again.pools] == ids
    # The url is not readable from the cookie value.
    assert all(b"18001" not in i and b"127" not in i for i in ids)


# ---- config -> Service ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("balancer", "kind"),
    [
        pytest.param("round_robin", 0, id="round_robin"),
        pytest.param("least_request", 1, id="least_request"),
        pytest.param("random", 2, id="random"),
        pytest.param({"type": "hash"}, 3, id="hash-client_ip"),
        pytest.param({"type": "hash", "hash_on": "header", "name": "X-User"}, 3, id="hash-header"),
        pytest.param({"type": "hash", "hash_on": "cookie", "name": "sid"}, 3, id="hash-cookie"),
        pytest.param("sticky_cookie", 4, id="sticky_cookie"),
    ],
)
def test_balancer_kind_reaches_the_service(engine: Engine, balancer: Any, kind: int) -> None:
    assert compile_service(engine, {"balancer": balancer}).balancer == kind


@pytest.mark.parametrize(
    ("service", "attrs"),
    [
        pytest.param({}, {"retry_attempts": 1, "panic": False, "max_concurrent": 0}, id="defaults"),
        pytest.param({"retries": {"attempts": 4}}, {"retry_attempts": 4}, id="retry-attempts"),
        pytest.param({"when_all_unhealthy": "panic"}, {"panic": True}, id="panic"),
        pytest.param(
            {"limits": {"max_concurrent": 7, "max_queue": 3, "queue_timeout": 0.25}},
            {"max_concurrent": 7, "max_queue": 3, "queue_timeout": 0.25},
            id="limits",
        ),
        pytest.param({"circuit_breaker": {}}, {"cb_state": 0}, id="breaker-closed"),
    ],
)
def test_settings_reach_the_service(
    engine: Engine, service: dict[str, Any], attrs: dict[str, Any]
) -> None:
    svc = compile_service(engine, service)
    assert {k: getattr(svc, k) for k in attrs} == attrs


def test_retire_leaves_a_closed_circuit(engine: Engine) -> None:
    svc = compile_service(engine, {"circuit_breaker": {"min_requests": 1}})
    svc.retire()
    assert svc.state()["circuit"] == "closed"


# ---- what the setters refuse ---------------------------------------------------------------


def bare(engine: Engine) -> Service:
    return Service("bare", [ServerPool(engine, A, "127.0.0.1", 18001)])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(lambda s: s.set_balancer("fastest"), KeyError, "fastest", id="bad-kind"),
        pytest.param(
            lambda s: s.set_balancer("hash", "body", "x"), KeyError, "body", id="bad-hash-on"
        ),
        pytest.param(
            lambda s: s.set_balancer("hash", "header", None),
            ValueError,
            "needs a name",
            id="hash-header-without-name",
        ),
        pytest.param(
            lambda s: s.set_balancer("hash", "cookie", ""),
            ValueError,
            "needs a name",
            id="hash-cookie-empty-name",
        ),
        pytest.param(
            lambda s: s.set_retries(1, ("connect_failure",), (499,)),
            ValueError,
            "499",
            id="status-below-500",
        ),
        pytest.param(
            lambda s: s.set_retries(1, ("connect_failure",), (600,)),
            ValueError,
            "600",
            id="status-beyond-599",
        ),
        pytest.param(
            lambda s: s.set_retries(1, ("always",)), KeyError, "always", id="bad-retry-on"
        ),
    ],
)
def test_setters_refuse(engine: Engine, call: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(bare(engine))


def test_service_needs_servers() -> None:
    with pytest.raises(ValueError, match="at least one server"):
        Service("empty", [])


def test_good_statuses_are_accepted(engine: Engine) -> None:
    svc = bare(engine)
    svc.set_retries(2, ("connect_failure", "reset", "timeout"), (500, 502, 503, 563))
    assert svc.retry_attempts == 2


@pytest.mark.parametrize(
    ("service", "path"),
    [
        pytest.param(
            {"balancer": {"type": "hash", "hash_on": "header"}}, "balancer", id="hash-no-name"
        ),
        pytest.param({"balancer": "fastest"}, "balancer", id="unknown-balancer"),
        pytest.param({"retries": {"statuses": [404]}}, "retries", id="status-4xx"),
        pytest.param({"circuit_breaker": {"error_ratio": None}}, "circuit_breaker", id="cb-none"),
        pytest.param({"retries": {"retry_on": ["always"]}}, "retries", id="retry-on"),
    ],
)
def test_config_refuses(service: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(document(service))
    assert any(f"services.svc.{path}" in p for p, _ in info.value.errors), info.value.errors


@pytest.mark.parametrize("status", [500, 563, 564, 599])
def test_every_5xx_status_can_be_retried(status: int) -> None:
    check_runtime(parse_config(document({"retries": {"statuses": [status]}})))


def test_a_status_below_500_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        check_runtime(parse_config(document({"retries": {"statuses": [404]}})))
    assert any("services.svc.retries.statuses" in p for p, _ in info.value.errors)


# ---- the ticker honours service and route timers ----------------------------------------


@pytest.mark.parametrize(
    ("service", "route", "at_most"),
    [
        pytest.param({}, {}, 1.0, id="defaults"),
        pytest.param({}, {"timeouts": {"upstream_response": 0.3}}, 0.075, id="route-response"),
        pytest.param({}, {"timeouts": {"upstream_total": 0.5}}, 0.125, id="route-total"),
        pytest.param(
            {"limits": {"max_concurrent": 1, "max_queue": 1, "queue_timeout": 0.2}},
            {},
            0.05,
            id="queue-timeout",
        ),
        pytest.param({"circuit_breaker": {"open_for": 0.4}}, {}, 0.1, id="open-for"),
        pytest.param({"outlier_detection": {"base_ejection": 0.8}}, {}, 0.2, id="base-ejection"),
        pytest.param({"timeouts": {"upstream_connect": 0.01}}, {}, 0.02, id="floor"),
    ],
)
def test_tick_follows_the_shortest_timer(
    service: dict[str, Any], route: dict[str, Any], at_most: float
) -> None:
    doc = document(service)
    doc["routes"][0].update(route)
    tick = _tick_for(parse_config(doc))
    assert 0.02 <= tick <= at_most
