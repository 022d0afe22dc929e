"""Config -> Runtime: routers, services and pools, chains, and what only compiling can refuse."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastgate._core.conn import Engine, EntryConfig, Route, ServerPool, Service

from fastgate.config.compile import Runtime, check_runtime, compile_runtime
from fastgate.config.schema import parse_config
from fastgate.errors import ConfigError
from fastgate.middleware import registry


class Tag:
    """A stand-in middleware: remembers its name and options; `bad: true` is refused."""

    type = "lc_tag"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        if options.get("bad"):
            raise ConfigError("bad", "must not be true")
        if options.get("broken"):
            raise ValueError("broken options")
        self.name = name
        self.options = options

    def on_request(self, ctx: Any) -> None:
        return None


@pytest.fixture(autouse=True)
def tag_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._TYPES, Tag.type, Tag)


@pytest.fixture
def engine() -> Iterator[Engine]:
    loop = asyncio.new_event_loop()
    eng = Engine(loop, None, tick_interval=1.0)
    yield eng
    eng.close()
    loop.close()


def document(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "timeouts": {"upstream_connect": 2, "upstream_response": 20, "upstream_idle": 30},
        "pool": {"max_idle": 16, "idle_timeout": 45},
        "limits": {"max_body_bytes": 1000},
        "entrypoints": {
            "web": {"address": "127.0.0.1:18080"},
            "internal": {
                "address": "127.0.0.1:18081",
                "forwarded": {"trusted_ips": ["10.0.0.0/8"], "forwarded_header": True},
            },
        },
        "routes": [
            {
                "name": "api",
                "match": {"hosts": ["api.example.com"], "path": "/v1", "methods": ["GET"]},
                "middlewares": ["first", "second"],
                "service": "api",
            },
            {
                "name": "static",
                "match": {"path": "/static/", "path_type": "prefix"},
                "service": "static",
            },
            {
                "name": "admin-only",
                "entrypoints": ["internal"],
                "match": {"path": "/admin"},
                "service": "static",
                "priority": 5,
            },
            {"name": "fallback", "match": {"path": "/"}, "service": "static"},
        ],
        "services": {
            "api": {
                "servers": [
                    {"url": "http://10.0.0.1:8000", "weight": 3},
                    {"url": "http://10.0.0.2"},
                ],
                "timeouts": {"upstream_response": 5},
                "pool": {"max_idle": 2},
            },
            "static": {"servers": [{"url": "http://static.internal:9000"}]},
        },
        "middlewares": {
            "first": {"type": "lc_tag", "label": "one"},
            "second": {"type": "lc_tag"},
        },
    }
    data.update(overrides)
    return data


def compiled(engine: Engine, **overrides: Any) -> Runtime:
    return compile_runtime(parse_config(document(**overrides)), engine)


def refused(engine: Engine, data: dict[str, Any]) -> list[tuple[str, str]]:
    config = parse_config(data)  # valid for the schema: only compiling refuses it
    with pytest.raises(ConfigError) as info:
        compile_runtime(config, engine)
    with pytest.raises(ConfigError) as again:
        check_runtime(config)
    assert again.value.errors == info.value.errors
    return info.value.errors


# ---- routes -> router targets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("entrypoint", "host", "path", "method", "route"),
    [
        pytest.param(
            "web", b"api.example.com", b"/v1/users", b"GET", "api", id="host+prefix+method"
        ),
        pytest.param("web", b"api.example.com", b"/v1", b"POST", "fallback", id="method mismatch"),
        pytest.param("web", b"other.example", b"/v1", b"GET", "fallback", id="host mismatch"),
        pytest.param("web", None, b"/static/app.js", b"GET", "static", id="longer prefix"),
        pytest.param("web", None, b"/admin", b"GET", "fallback", id="route on other entrypoint"),
        pytest.param("internal", None, b"/admin/x", b"GET", "admin-only", id="own entrypoint"),
        pytest.param("internal", b"api.example.com", b"/v1", b"GET", "api", id="all entrypoints"),
    ],
)
def test_routes_become_router_targets(
    engine: Engine, entrypoint: str, host: bytes | None, path: bytes, method: bytes, route: str
) -> None:
    runtime = compiled(engine)
    target = runtime.entries[entrypoint].router.match(host, path, method)
    assert type(target) is Route
    assert target.name == route


def test_route_targets_carry_service_and_chain(engine: Engine) -> None:
    runtime = compiled(engine)
    api = runtime.entries["web"].router.match(b"api.example.com", b"/v1", b"GET")
    assert api.service is runtime.services["api"]
    assert [type(m) for m in api.chain] == [Tag, Tag]
    assert [m.name for m in api.chain] == ["first", "second"]
    assert api.chain[0].options == {"label": "one"}
    static = runtime.entries["web"].router.match(None, b"/static/x", b"GET")
    assert static.chain == ()
    # One instance per middleware name, shared by every route and entrypoint.
    other = runtime.entries["internal"].router.match(b"api.example.com", b"/v1", b"GET")
    assert other.chain[0] is api.chain[0]
    assert len(runtime.entries["web"].router) == 3
    assert len(runtime.entries["internal"].router) == 4


def test_no_routes_compile_to_an_empty_table(engine: Engine) -> None:
    runtime = compiled(engine, routes=[])
    assert runtime.entries["web"].router.match(None, b"/", b"GET") is None


# ---- services and pools ----------------------------------------------------------------------


def test_services_keep_distinct_pools_with_their_weights(engine: Engine) -> None:
    runtime = compiled(engine)
    api = runtime.services["api"]
    assert type(api) is Service and api.name == "api"
    first, second = api.pools
    assert (first.weight, second.weight) == (3, 1)
    assert {id(p) for p in runtime.pools} == {
        id(first),
        id(second),
        id(runtime.services["static"].pools[0]),
    }


@pytest.mark.parametrize(
    ("service", "index", "expected"),
    [
        pytest.param(
            "api",
            0,
            {
                "url": "http://10.0.0.1:8000",
                "host": "10.0.0.1",
                "port": 8000,
                "max_idle": 2,
                "idle_timeout": 45.0,
                "connect_timeout": 2.0,
                "response_timeout": 5.0,
                "idle_body_timeout": 30.0,
            },
            id="service overrides upstream_response and max_idle",
        ),
        pytest.param(
            "api",
            1,
            {"url": "http://10.0.0.2", "host": "10.0.0.2", "port": 80, "max_idle": 2},
            id="port defaults to 80",
        ),
        pytest.param(
            "static",
            0,
            {
                "url": "http://static.internal:9000",
                "host": "static.internal",
                "port": 9000,
                "max_idle": 16,
                "idle_timeout": 45.0,
                "connect_timeout": 2.0,
                "response_timeout": 20.0,
                "idle_body_timeout": 30.0,
            },
            id="no overrides: the global settings",
        ),
    ],
)
def test_pools_get_effective_timeouts_and_pool_settings(
    engine: Engine, service: str, index: int, expected: dict[str, Any]
) -> None:
    pool = compiled(engine).services[service].pools[index]
    assert type(pool) is ServerPool
    assert {key: getattr(pool, key) for key in expected} == expected
    assert pool.active == 0 and pool.idle_count() == 0


def test_entry_configs_carry_limits_timeouts_and_forwarding(engine: Engine) -> None:
    runtime = compiled(engine, timeouts={"head": 3, "idle": 7, "body": 11})
    web, internal = runtime.entries["web"], runtime.entries["internal"]
    assert type(web) is EntryConfig
    assert (web.head_timeout, web.idle_timeout, web.body_timeout) == (3.0, 7.0, 11.0)
    assert web.max_body == 1000 and web.proto == b"http"
    assert web.limits.max_head_bytes == 16384
    assert not web.forwarded_header and not web.is_trusted("10.1.2.3")
    assert internal.forwarded_header and internal.is_trusted("10.1.2.3")
    assert not internal.is_trusted("192.168.0.1")


# ---- what only compiling refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {
                "services": {
                    "api": {
                        "servers": [{"url": "http://10.0.0.1"}, {"url": "https://10.0.0.2"}],
                        "tls": {"ca_file": "/nonexistent/ca.pem"},
                    },
                    "static": {"servers": [{"url": "http://10.0.0.3"}]},
                }
            },
            [("services.api.tls.ca_file", "cannot read /nonexistent/ca.pem")],
            id="unreadable upstream CA file",
        ),
        pytest.param(
            {"middlewares": {"first": {"type": "no_such_type"}, "second": {"type": "lc_tag"}}},
            [("middlewares.first.type", "unknown type 'no_such_type'")],
            id="unknown middleware type",
        ),
        pytest.param(
            {
                "middlewares": {
                    "first": {"type": "lc_tag", "bad": True},
                    "second": {"type": "lc_tag", "broken": 1},
                }
            },
            [
                ("middlewares.first.bad", "must not be true"),
                ("middlewares.second", "broken options"),
            ],
            id="middleware options refused by their class",
        ),
        pytest.param(
            {"routes": [{"name": "q", "match": {"path": "/a?b"}, "service": "static"}]},
            [("routes[0].match.path", "character '?' not allowed")],
            id="path the router refuses",
        ),
    ],
)
def test_compile_errors_name_the_key(
    engine: Engine, overrides: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    errors = refused(engine, document(**overrides))
    assert [path for path, _ in errors] == [path for path, _ in expected]
    for (_, reason), (_, want) in zip(errors, expected, strict=True):
        assert want in reason


def test_every_compile_error_is_reported_at_once(engine: Engine) -> None:
    data = document(
        services={
            "api": {
                "servers": [{"url": "https://10.0.0.1"}],
                "tls": {"ca_file": "/nonexistent/ca.pem"},
            },
            "static": {"servers": [{"url": "http://10.0.0.3"}]},
        },
        middlewares={"first": {"type": "nope"}, "second": {"type": "lc_tag"}},
        routes=[
            {"name": "a", "match": {"path": "/"}, "middlewares": ["first"], "service": "api"},
            {"name": "b", "match": {"path": "/x#y"}, "service": "static"},
        ],
    )
    errors = refused(engine, data)
    # Route `a` uses the failed service and middleware: reported there once, not again.
    assert [path for path, _ in errors] == [
        "services.api.tls.ca_file",
        "middlewares.first.type",
        "routes[1].match.path",
    ]


def test_check_runtime_accepts_a_good_config_and_leaves_no_loop_behind() -> None:
    config = parse_config(document())
    check_runtime(config)
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
