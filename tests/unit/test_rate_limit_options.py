"""The rate_limit middleware's options, words, replies, and how compile places it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastgate._core.conn import Engine

from fastgate._core.ratecheck import RateCheck
from fastgate.config.compile import Runtime, compile_runtime, split_chain
from fastgate.config.explain import summarize
from fastgate.config.schema import parse_config
from fastgate.errors import ConfigError
from fastgate.middleware.rate_limit import RateLimit
from fastgate.ratelimit.options import (
    Limit,
    describe,
    parse_duration,
    parse_options,
    parse_rate,
)
from fastgate.ratelimit.replies import Replies, quota_window

# ---- rates and durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("100/minute", (100.0, 60.0), id="per minute"),
        pytest.param("10/s", (10.0, 1.0), id="per second, short unit"),
        pytest.param("5/30s", (5.0, 30.0), id="per 30 seconds"),
        pytest.param("1000 per hour", (1000.0, 3600.0), id="words"),
        pytest.param(" 2.5 / 1.5h ", (2.5, 5400.0), id="fractions and spaces"),
        pytest.param("7/DAY", (7.0, 86400.0), id="any case"),
        pytest.param("1/500ms", (1.0, 0.5), id="milliseconds"),
    ],
)
def test_rates_as_a_person_writes_them(text: str, expected: tuple[float, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "text", ["fast", "100", "/minute", "0/s", "10/fortnight", "10/-1s", "ten/s"]
)
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("50ms", 0.05), ("1s", 1.0), ("minute", 60.0), ("2h", 7200.0), (0.25, 0.25), (3, 3.0)],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "0s", -1, "5 parsecs", True, None, [1]])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# ---- options: defaults and errors ---------------------------------------------------------


def test_defaults_for_one_inline_limit() -> None:
    opts = parse_options({"rate": "100/minute"})
    (limit,) = opts.limits
    assert (limit.rate, limit.per, limit.burst, limit.cost, limit.dry_run) == (
        100.0,
        60.0,
        100,
        1,
        False,
    )
    assert [p.kind for p in opts.key] == ["client_ip"]
    assert (opts.scope, opts.store, opts.headers, opts.ipv6_prefix) == (
        "route",
        "local",
        "ietf",
        64,
    )
    assert opts.in_c


@pytest.mark.parametrize(
    ("options", "in_c"),
    [
        pytest.param(
            {"rate": "1/s", "key": ["client_ip", "header:X-A", "route", "const:x"]},
            True,
            id="head-only parts run in C",
        ),
        pytest.param({"rate": "1/s", "key": "identity.subject"}, False, id="identity: Python"),
        pytest.param({"rate": "1/s", "key": "claim:tenant"}, False, id="claim: Python"),
        pytest.param(
            {"rate": "1/s", "store": "redis", "redis": "main"}, False, id="redis store: Python"
        ),
    ],
)
def test_which_options_run_in_c(options: dict, in_c: bool) -> None:
    assert parse_options(options).in_c is in_c


@pytest.mark.parametrize(
    ("options", "path", "fragment"),
    [
        pytest.param({"rate": "fast"}, "rate", "expected a rate", id="inline rate"),
        pytest.param(
            {"limits": [{"rate": "1/s"}, {"rate": "x"}]},
            "limits[1].rate",
            "expected a rate",
            id="second limit's rate",
        ),
        pytest.param({"rate": "5/s", "cost": 9}, "cost", "more than the burst", id="cost"),
        pytest.param({"rate": 5, "per": "1x"}, "per", "unknown time unit", id="per unit"),
        pytest.param(
            {"limits": [{"rate": "1/s", "per": 2}]},
            "limits[0].per",
            "numeric rate",
            id="per with a text rate",
        ),
        pytest.param(
            {"limits": [{"rate": "1/s", "burst": -1}]},
            "limits[0].burst",
            "greater than or equal to 0",
            id="negative burst",
        ),
        pytest.param({"rate": "2000000/s"}, "rate", "1,000,000", id="too fast"),
        pytest.param({"rate": "1/s", "key": "cookie:x"}, "key", "unknown key", id="key kind"),
        pytest.param(
            {"rate": "1/s", "key": "header:bad name"}, "key", "invalid header", id="header name"
        ),
        pytest.param({"rate": "1/s", "scope": "global"}, "scope", "route", id="scope"),
        pytest.param(
            {"rate": "1/s", "store": "redis"},
            "redis",
            "providers.redis",
            id="redis store needs a provider",
        ),
        pytest.param({"rate": "1/s", "ipv6_prefix": 200}, "ipv6_prefix", "128", id="prefix"),
        pytest.param({"rate": "1/s", "bogus": 1}, "bogus", "unknown key", id="unknown option"),
        pytest.param({}, "", "nothing to limit", id="nothing"),
        pytest.param({"rate": "1/s", "limits": []}, "", "not both", id="both forms"),
        pytest.param(
            {"limits": [{"rate": "1/s", "name": "a"}, {"rate": "2/s", "name": "a"}]},
            "limits",
            "unique",
            id="duplicate policy names",
        ),
    ],
)
def test_option_errors_name_the_key(options: dict, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_options(options)
    assert any(p == path and fragment in r for p, r in info.value.errors), info.value.errors


@pytest.fixture
def engine() -> Iterator[Engine]:
    loop = asyncio.new_event_loop()
    eng = Engine(loop, None, tick_interval=1.0)
    yield eng
    eng.close()
    loop.close()


def document(
    middlewares: dict[str, Any], routes: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "entrypoints": {"web": {"address": "127.0.0.1:18080"}},
        "services": {"api": {"servers": [{"url": "http://127.0.0.1:9000"}]}},
        "middlewares": middlewares,
        "routes": routes
        or [
            {
                "name": "a",
                "match": {"path": "/"},
                "service": "api",
                "middlewares": list(middlewares),
            }
        ],
        **extra,
    }


def test_compile_reports_option_errors_with_full_key_paths(engine: Engine) -> None:
    config = parse_config(
        document({"api_limit": {"type": "rate_limit", "limits": [{"rate": "100/fortnight"}]}})
    )
    with pytest.raises(ConfigError) as info:
        compile_runtime(config, engine)
    assert info.value.errors[0][0] == "middlewares.api_limit.limits[0].rate"


def test_unknown_redis_provider_is_a_schema_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            document(
                {"l": {"type": "rate_limit", "rate": "1/s", "store": "redis", "redis": "mian"}},
                providers={"redis": {"main": {"address": "127.0.0.1:6379"}}},
            )
        )
    assert ("middlewares.l.redis", "unknown redis provider 'mian'; did you mean 'main'?") in (
        info.value.errors
    )


@pytest.mark.parametrize(
    ("provider", "path", "fragment"),
    [
        pytest.param({}, "providers.redis.main", "give address", id="nowhere"),
        pytest.param(
            {"address": "127.0.0.1:6379", "host": "x"},
            "providers.redis.main",
            "not address and host",
            id="two places",
        ),
        pytest.param(
            {"address": "nope"}, "providers.redis.main.address", "host:port", id="bad address"
        ),
        pytest.param(
            {"host": "r", "username": "u"},
            "providers.redis.main",
            "password",
            id="user without password",
        ),
        pytest.param(
            {"sentinel": {"addresses": [], "master": "m"}},
            "providers.redis.main.sentinel.addresses",
            "at least one",
            id="sentinels",
        ),
        pytest.param(
            {"host": "r", "command_timeout": 0},
            "providers.redis.main.command_timeout",
            "greater than 0",
            id="timeout",
        ),
    ],
)
def test_redis_provider_errors(provider: dict, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            document(
                {},
                routes=[{"name": "a", "service": "api"}],
                providers={"redis": {"main": provider}},
            )
        )
    assert any(p == path and fragment in r for p, r in info.value.errors), info.value.errors


def test_redis_provider_forms() -> None:
    config = parse_config(
        document(
            {},
            routes=[{"name": "a", "service": "api"}],
            providers={
                "redis": {
                    "plain": {"address": "127.0.0.1:6380", "db": 2, "password": "pw"},
                    "host": {"host": "redis.internal", "tls": "/etc/ca.pem"},
                    "ha": {"sentinel": {"addresses": ["10.0.0.1:26379"], "master": "mymaster"}},
                }
            },
        )
    )
    redis = config.providers.redis
    assert redis["plain"].endpoint() == ("127.0.0.1", 6380)
    assert redis["host"].endpoint() == ("redis.internal", 6379)
    assert redis["ha"].sentinel is not None and redis["ha"].sentinel.master == "mymaster"
    assert "pw" not in repr(redis["plain"])


# ---- compile: C checks and the Python chain ------------------------------------------------


class PyOnly:
    """A middleware without a C form (like an auth middleware)."""

    def on_request(self, ctx: Any) -> None:
        return None


def test_split_chain_moves_only_a_leading_run() -> None:
    first = RateLimit({"rate": "1/s"}, "first")
    second = RateLimit({"rate": "1/s", "key": "header:x-a"}, "second")
    identity = RateLimit({"rate": "1/s", "key": "identity.subject"}, "identity")
    auth = PyOnly()
    checks, chain = split_chain("r", (first, second, auth, identity))
    assert [type(c) for c in checks] == [RateCheck, RateCheck] and chain == (auth, identity)
    checks, chain = split_chain("r", (auth, first))
    assert checks == () and chain == (auth, first)
    checks, chain = split_chain("r", (identity, first))
    assert checks == () and chain == (identity, first)


def test_compiled_route_runs_the_limit_in_c(engine: Engine) -> None:
    config = parse_config(document({"lim": {"type": "rate_limit", "rate": "10/s"}}))
    runtime: Runtime = compile_runtime(config, engine)
    route = runtime.entries["web"].router.match(None, b"/x", b"GET")
    assert len(route.checks) == 1 and route.chain == ()
    assert runtime.middlewares["lim"].routes == ("a",)
    runtime.retire()


def test_retire_closes_middlewares(engine: Engine) -> None:
    closed: list[str] = []

    class Closing:
        def close(self) -> None:
            closed.append("x")

    Runtime(parse_config(document({})), {}, {}, (), {"x": Closing()}).retire()
    assert closed == ["x"]


# ---- words -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "routes", "expected"),
    [
        pytest.param(
            {"rate": "100/minute", "burst": 20, "scope": "shared"},
            ["a", "b"],
            "100 requests per minute per client IP, bursts up to 20, shared by routes a, b",
            id="the issue's example",
        ),
        pytest.param(
            {"rate": "5/30s", "key": ["client_ip", "header:X-Tenant"]},
            ["a", "b"],
            "5 requests per 30 seconds per client IP and x-tenant header, bursts up to 5, "
            "counted separately on each route (a, b)",
            id="combined key, per route",
        ),
        pytest.param(
            {"rate": 1, "per": "1h", "cost": 1, "key": "identity.consumer", "dry_run": True},
            ["a"],
            "1 request per hour per consumer, bursts up to 1 (dry run: counted and logged, "
            "never refused), on route a",
            id="singular, dry run",
        ),
    ],
)
def test_each_limit_in_words(options: dict, routes: list[str], expected: str) -> None:
    assert describe(parse_options(options), routes)[0] == expected


def test_store_and_failure_policy_in_words() -> None:
    lines = describe(
        parse_options(
            {
                "rate": "10/s",
                "in_flight": 3,
                "store": "hybrid",
                "redis": "main",
                "expected_instances": 4,
            }
        ),
        ["a"],
        2,
    )
    assert lines[1:] == [
        "at most 3 requests in flight per client IP, on route a",
        "decided in each worker, synced with Redis 'main' every 50 ms (store: hybrid)",
        "if Redis fails: each worker enforces 1/4 of each limit locally (fail_open)",
    ]
    closed = describe(
        parse_options(
            {"rate": "10/s", "store": "redis", "redis": "m", "on_redis_error": "fail_closed"}
        ),
        ["a"],
    )
    assert closed[-1] == "if Redis fails: requests are refused with 503 (fail_closed)"


def test_fastgate_check_prints_the_limits() -> None:
    config = parse_config(
        document(
            {
                "api_limit": {
                    "type": "rate_limit",
                    "rate": "100/minute",
                    "burst": 20,
                    "scope": "shared",
                }
            },
            routes=[
                {
                    "name": "a",
                    "match": {"path": "/a"},
                    "service": "api",
                    "middlewares": ["api_limit"],
                },
                {
                    "name": "b",
                    "match": {"path": "/b"},
                    "service": "api",
                    "middlewares": ["api_limit"],
                },
            ],
            workers=1,
        )
    )
    lines = summarize(config, "test.yaml")
    at = lines.index("  api_limit: rate_limit")
    assert lines[at + 1 : at + 3] == [
        "    100 requests per minute per client IP, bursts up to 20, shared by routes a, b",
        "    counted in each worker process (store: local)",
    ]


# ---- replies ---------------------------------------------------------------------------------


def limits(*specs: dict) -> list[Limit]:
    return list(parse_options({"limits": list(specs)}).limits)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        pytest.param({"rate": "100/minute"}, (100, 60), id="whole"),
        pytest.param({"rate": "1/500ms"}, (2, 1), id="sub-second window"),
        pytest.param({"rate": 2.5, "per": 1}, (2, 1), id="fractional rate rounds"),
        pytest.param({"rate": "1/1.5s"}, (1, 2), id="fractional window"),
    ],
)
def test_quota_and_window_are_integers(limit: dict, expected: tuple[int, int]) -> None:
    assert quota_window(limits(limit)[0]) == expected


def reply_headers(style: str) -> tuple[dict[str, str], dict[str, Any], int]:
    ls = limits(
        {"rate": "10/s", "name": "burst"},
        {"rate": "1000/hour", "name": "hourly"},
        {"rate": "1/s", "dry_run": True, "name": "trial"},
    )
    reply = Replies(style, [lim.name for lim in ls], ls, "slow down").limited(1, 0, 2_300_000)
    raw = reply.encode(b"abc", False)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 429 Too Many Requests"
    return dict(line.split(": ", 1) for line in lines[1:]), json.loads(body), reply.status


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        pytest.param(
            "ietf",
            {
                "Retry-After": "3",
                "RateLimit-Policy": '"burst";q=10;w=1, "hourly";q=1000;w=3600',
                "RateLimit": '"hourly";r=0;t=3',
            },
            id="ietf draft fields",
        ),
        pytest.param(
            "legacy",
            {
                "Retry-After": "3",
                "X-RateLimit-Limit": "1000",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "3",
            },
            id="legacy X-RateLimit",
        ),
        pytest.param("none", {"Retry-After": "3"}, id="none"),
    ],
)
def test_429_headers_and_body(style: str, expected: dict[str, str]) -> None:
    headers, body, status = reply_headers(style)
    assert status == 429
    assert {
        k: v
        for k, v in headers.items()
        if k not in ("Content-Type", "Content-Length", "Cache-Control", "X-Request-ID")
    } == expected
    assert headers["X-Request-ID"] == "abc"
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert body == {"error": "slow down", "retry_after": 3, "request_id": "abc"}


def test_busy_and_unavailable_replies() -> None:
    r = Replies("ietf", ["x"], limits({"rate": "1/s"}), "m")
    assert r.busy().status == 429
    assert json.loads(r.busy().body) == {"error": "too many requests in flight"}
    unavailable = r.unavailable()
    assert unavailable.status == 503 and ("Retry-After", "1") in unavailable.headers
