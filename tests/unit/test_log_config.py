"""The log sections of the config (schema.py): defaults, the route override forms, bad values
named by key path, the FASTGATE_* variables; and the compiled route rule (compile.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastgate._core.conn import Engine

from fastgate._core import accesslog
from fastgate.config.compile import compile_runtime, route_log_rule
from fastgate.config.loader import build_config, load_config
from fastgate.config.schema import DEFAULT_REDACT_KEYS, parse_config
from fastgate.errors import ConfigError


def minimal(**extra: Any) -> dict[str, Any]:
    return {
        "entrypoints": {"web": {"address": "127.0.0.1:8080"}},
        "services": {"api": {"servers": [{"url": "http://127.0.0.1:9000"}]}},
        "routes": [{"name": "api", "service": "api"}],
        **extra,
    }


def with_route_log(value: Any) -> dict[str, Any]:
    return minimal(routes=[{"name": "api", "service": "api", "access_log": value}])


def test_schema_defaults() -> None:
    config = parse_config(minimal())
    access, audit = config.access_log, config.audit_log
    assert (access.enabled, access.path, access.format) == (False, "-", "json")
    assert (access.sample, access.always_log_errors, access.drop_query) == (1.0, True, False)
    assert access.redact_query_keys == DEFAULT_REDACT_KEYS
    assert {"token", "password", "api_key", "client_secret", "sig"} <= set(DEFAULT_REDACT_KEYS)
    assert (access.buffer_bytes, access.flush_interval) == (1048576, 0.2)
    assert (audit.enabled, audit.path, audit.buffer_bytes) == (True, "stderr", 1048576)
    assert config.tracing.otlp is None
    assert config.routes[0].access_log is None


def test_embedded_default_turns_the_access_log_on_to_stdout() -> None:
    config = load_config(env={})
    assert (config.access_log.enabled, config.access_log.path) == (True, "-")
    assert config.audit_log.enabled


def test_otlp_defaults_and_secret_headers() -> None:
    config = parse_config(
        minimal(tracing={"otlp": {"headers": {"Authorization": "Bearer s3cret-value"}}})
    )
    otlp = config.tracing.otlp
    assert otlp is not None
    assert otlp.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert (otlp.timeout, otlp.service_name, otlp.flush_interval) == (5.0, "fastgate", 1.0)
    assert (otlp.buffer_bytes, otlp.max_pending_bytes, otlp.ca_file) == (1048576, 8388608, None)
    assert "s3cret-value" not in repr(config)  # headers may hold secrets: repr=False


@pytest.mark.parametrize(
    "value, enabled, sample, errors",
    [
        pytest.param(None, None, None, None, id="absent: inherit"),
        pytest.param(True, True, None, None, id="true: the global rule"),
        pytest.param(False, False, None, None, id="false: off"),
        pytest.param({"sample": 0.1}, True, 0.1, None, id="own sample"),
        pytest.param(
            {"sample": 0, "always_log_errors": False}, True, 0.0, False, id="sample 0, no errors"
        ),
        pytest.param({"enabled": False}, False, None, None, id="mapping with enabled false"),
    ],
)
def test_route_override_forms(value: Any, enabled: Any, sample: Any, errors: Any) -> None:
    rule = parse_config(with_route_log(value)).routes[0].access_log
    if enabled is None:
        assert rule is None
        return
    assert rule is not None
    assert (rule.enabled, rule.sample, rule.always_log_errors) == (enabled, sample, errors)


@pytest.mark.parametrize(
    "data, path, reason",
    [
        pytest.param(
            minimal(access_log={"format": "xml"}), "access_log.format", "'json'", id="format"
        ),
        pytest.param(
            minimal(access_log={"sample": 1.5}), "access_log.sample", "less than", id="sample"
        ),
        pytest.param(
            minimal(access_log={"buffer_bytes": 4096}),
            "access_log.buffer_bytes",
            "65536",
            id="buffer too small",
        ),
        pytest.param(
            minimal(audit_log={"flush_interval": 0}),
            "audit_log.flush_interval",
            "greater than",
            id="flush interval",
        ),
        pytest.param(
            minimal(audit_log={"path": "  "}), "audit_log.path", "file path", id="empty path"
        ),
        pytest.param(
            minimal(access_log={"redact_query_keys": ["ok", ""]}),
            "access_log.redact_query_keys[1]",
            "query parameter name",
            id="empty redact key",
        ),
        pytest.param(
            minimal(access_log={"colour": True}), "access_log.colour", "unknown key", id="unknown"
        ),
        pytest.param(
            with_route_log({"sample": -1}), "routes[0].access_log.sample", "greater", id="route"
        ),
        pytest.param(
            with_route_log("sometimes"),
            "routes[0].access_log",
            "expected true, false or a mapping",
            id="route word",
        ),
        pytest.param(
            with_route_log({"smaple": 1}),
            "routes[0].access_log.smaple",
            "did you mean 'sample'",
            id="route typo",
        ),
        pytest.param(
            minimal(tracing={"otlp": {"endpoint": "udp://collector:4318"}}),
            "tracing.otlp.endpoint",
            "http:// or https://",
            id="otlp scheme",
        ),
        pytest.param(
            minimal(tracing={"otlp": {"endpoint": "https://u:p@collector/v1/traces"}}),
            "tracing.otlp.endpoint",
            "credentials",
            id="otlp userinfo",
        ),
        pytest.param(
            minimal(tracing={"otlp": {"headers": {"X-Key": "a\r\nInjected: 1"}}}),
            "tracing.otlp.headers",
            "CR, LF",
            id="otlp header injection",
        ),
        pytest.param(
            minimal(tracing={"otlp": {"headers": {"Content-Type": "text/plain"}}}),
            "tracing.otlp.headers",
            "set by the exporter itself",
            id="otlp own header",
        ),
        pytest.param(
            minimal(tracing={"otlp": {"ca_file": "/etc/ca.pem"}}),
            "tracing.otlp",
            "https://",
            id="otlp ca_file needs https",
        ),
    ],
)
def test_bad_values_name_the_key_path(data: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    errors = dict(info.value.errors)
    assert path in errors, info.value.errors
    assert reason in errors[path]


@pytest.mark.parametrize(
    "env, key, expected",
    [
        pytest.param({"FASTGATE_ACCESS_LOG_ENABLED": "yes"}, "enabled", True, id="enabled"),
        pytest.param(
            {"FASTGATE_ACCESS_LOG_PATH": "/var/log/fg.log"}, "path", "/var/log/fg.log", id="path"
        ),
        pytest.param({"FASTGATE_ACCESS_LOG_FORMAT": "Combined"}, "format", "combined", id="fmt"),
    ],
)
def test_access_log_environment_variables(env: dict[str, str], key: str, expected: Any) -> None:
    config = build_config(minimal(), env=env)
    assert getattr(config.access_log, key) == expected


def test_audit_log_path_variable() -> None:
    config = build_config(minimal(), env={"FASTGATE_AUDIT_LOG_PATH": "/var/log/audit.log"})
    assert config.audit_log.path == "/var/log/audit.log"


def test_bad_format_variable_names_itself() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(minimal(), env={"FASTGATE_ACCESS_LOG_FORMAT": "xml"})
    assert [p for p, _ in info.value.errors] == ["FASTGATE_ACCESS_LOG_FORMAT"]


# ---- the compiled route rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    "global_log, route_log, expected",
    [
        pytest.param({}, None, (1.0, True), id="inherit the defaults"),
        pytest.param({"sample": 0.25}, None, (0.25, True), id="inherit the global sample"),
        pytest.param({"sample": 0.25}, True, (0.25, True), id="true is the global rule"),
        pytest.param({}, False, (0.0, False), id="off: sample 0, no errors"),
        pytest.param({"sample": 0.5}, {"sample": 0.1}, (0.1, True), id="own sample"),
        pytest.param(
            {"always_log_errors": False},
            {"always_log_errors": True},
            (1.0, True),
            id="own errors rule",
        ),
        pytest.param({}, {"sample": 0.0}, (0.0, True), id="sample 0, errors still logged"),
    ],
)
def test_route_log_rule(global_log: dict[str, Any], route_log: Any, expected: Any) -> None:
    config = parse_config({**with_route_log(route_log), "access_log": global_log})
    sample, errors = route_log_rule(config, config.routes[0])
    assert (sample, errors) == (accesslog.sample_threshold(expected[0]), expected[1])
    if expected[0] == 1.0:
        assert sample == accesslog.SAMPLE_ALL
    if expected[0] == 0.0:
        assert sample == 0


def test_compiled_routes_carry_the_log_rule_and_rate_row() -> None:
    config = parse_config(
        minimal(
            access_log={"enabled": True, "sample": 0.5},
            routes=[
                {"name": "a", "service": "api", "match": {"path": "/a"}},
                {"name": "b", "service": "api", "match": {"path": "/b"}, "access_log": False},
                {
                    "name": "c",
                    "service": "api",
                    "match": {"path": "/c"},
                    "access_log": {"sample": 1},
                },
            ],
        )
    )
    loop = asyncio.new_event_loop()
    try:
        engine = Engine(loop, None, tick_interval=1.0)
        runtime = compile_runtime(config, engine)
        routes = {}
        for entry in runtime.entries.values():
            for path in ("/a", "/b", "/c"):
                route = entry.router.match(b"h", path.encode(), b"GET")
                routes[route.name] = route
        half = accesslog.sample_threshold(0.5)
        assert (routes["a"].log_sample, routes["a"].log_errors) == (half, True)
        assert (routes["b"].log_sample, routes["b"].log_errors) == (0, False)
        assert routes["c"].log_sample == accesslog.SAMPLE_ALL
        rate_rows = {r.stats_rate for r in routes.values()}
        assert len(rate_rows) == 3 and 0 not in rate_rows
        runtime.retire()
        engine.close()
    finally:
        loop.close()
