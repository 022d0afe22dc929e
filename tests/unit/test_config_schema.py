"""The configuration schema: defaults, every check with its exact key path, the helpers."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pydantic
import pytest

from fastgate.config.schema import (
    Config,
    Pool,
    Server,
    Timeouts,
    format_path,
    parse_address,
    parse_config,
)
from fastgate.errors import ConfigError


def valid() -> dict[str, Any]:
    """A small config that passes every check; cases below break one thing each."""
    return {
        "entrypoints": {
            "web": {"address": "127.0.0.1:8080"},
            "internal": {"address": "[::1]:8090"},
        },
        "routes": [
            {"name": "api", "match": {"path": "/api"}, "service": "api"},
            {"match": {"path": "/"}, "service": "api", "middlewares": ["limit"]},
        ],
        "services": {"api": {"servers": [{"url": "http://127.0.0.1:9000"}]}},
        "middlewares": {"limit": {"type": "rate_limit", "rate": 10}},
    }


def errors_of(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


# --- defaults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        pytest.param("workers", 0, id="workers 0 = CPU count"),
        pytest.param("log_level", "info", id="log level"),
        pytest.param("drain_timeout", 30.0, id="drain timeout"),
        pytest.param("limits.max_head_bytes", 16384, id="max head bytes"),
        pytest.param("limits.max_headers", 100, id="max headers"),
        pytest.param("limits.max_target", 8192, id="max target"),
        pytest.param("limits.max_body_bytes", 0, id="body unlimited"),
        pytest.param("limits.max_pipeline_bytes", 262144, id="max pipeline bytes"),
        pytest.param("timeouts.head", 10.0, id="head timeout"),
        pytest.param("timeouts.idle", 60.0, id="idle timeout"),
        pytest.param("timeouts.body", 60.0, id="body timeout"),
        pytest.param("timeouts.upstream_connect", 5.0, id="connect timeout"),
        pytest.param("timeouts.upstream_response", 60.0, id="response timeout"),
        pytest.param("timeouts.upstream_idle", 60.0, id="upstream idle timeout"),
        pytest.param("pool.max_idle", 256, id="pool max idle"),
        pytest.param("pool.idle_timeout", 60.0, id="pool idle timeout"),
        pytest.param("admin.address", "127.0.0.1:9901", id="admin address"),
        pytest.param("admin.enabled", True, id="admin on"),
        pytest.param("demo_origin.address", "127.0.0.1:8081", id="demo origin address"),
        pytest.param("demo_origin.enabled", False, id="demo origin off"),
        pytest.param("routes", (), id="no routes"),
        pytest.param("services", {}, id="no services"),
        pytest.param("middlewares", {}, id="no middlewares"),
    ],
)
def test_defaults(attr: str, expected: object) -> None:
    value: Any = parse_config({"entrypoints": {"web": {}}})
    for part in attr.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_entrypoint_and_route_defaults() -> None:
    config = parse_config(
        {
            "entrypoints": {"web": {}},
            "routes": [{"service": "s"}],
            "services": {"s": {"servers": [{"url": "http://a"}]}},
        }
    )
    web = config.entrypoints["web"]
    assert (web.address, web.backlog) == ("127.0.0.1:8080", 1024)
    assert (web.forwarded.trusted_ips, web.forwarded.forwarded_header) == ((), False)
    route = config.routes[0]
    assert route.name == "route-0"
    assert (route.entrypoints, route.middlewares, route.priority) == ((), (), 0)
    assert (route.match.hosts, route.match.path, route.match.path_type) == ((), "/", "prefix")
    assert route.match.methods == ()
    server = config.services["s"].servers[0]
    assert (server.weight, server.host, server.port, server.tls) == (1, "a", 80, False)


def test_valid_example_passes() -> None:
    config = parse_config(valid())
    assert [r.name for r in config.routes] == ["api", "route-1"]
    assert config.middlewares["limit"].type == "rate_limit"
    assert config.middlewares["limit"].options == {"rate": 10}


# --- every check, with its key path ---------------------------------------------------------


def case(**changes: Any) -> dict[str, Any]:
    """valid() with dotted-path changes; a value of DELETE removes the key."""
    data = valid()
    for dotted, value in changes.items():
        node: Any = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        key: Any = int(last) if last.isdigit() else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return data


DELETE = object()

CHECKS = [
    # references
    pytest.param(
        case(routes__0__service="x"),
        "routes[0].service",
        "unknown service 'x'",
        id="route names an unknown service",
    ),
    pytest.param(
        case(routes__0__service="apii"),
        "routes[0].service",
        "unknown service 'apii'; did you mean 'api'?",
        id="unknown service with a close name suggests it",
    ),
    pytest.param(
        case(routes__1__entrypoints=["web", "nope"]),
        "routes[1].entrypoints[1]",
        "unknown entrypoint 'nope'",
        id="route names an unknown entrypoint",
    ),
    pytest.param(
        case(routes__1__middlewares=["limit", "auth"]),
        "routes[1].middlewares[1]",
        "unknown middleware 'auth'",
        id="route names an unknown middleware",
    ),
    pytest.param(
        case(routes__1__name="api"),
        "routes[1].name",
        "duplicate route name 'api' (also routes[0])",
        id="route names are unique",
    ),
    pytest.param(
        case(routes__0__name="route-1"),
        "routes[1].name",
        "duplicate route name 'route-1' (also routes[0])",
        id="a given name may clash with a default name",
    ),
    pytest.param(
        case(routes__0__service=DELETE),
        "routes[0].service",
        "required key is missing",
        id="route without a service",
    ),
    pytest.param(
        case(entrypoints={}),
        "entrypoints",
        "at least one entrypoint is required",
        id="no entrypoint",
    ),
    # match
    pytest.param(
        case(routes__0__match={"path": "/(", "path_type": "regex"}),
        "routes[0].match.path",
        "invalid regular expression '/(': missing ), unterminated subpattern at position 1",
        id="regex path must compile",
    ),
    pytest.param(
        case(routes__0__match={"path": "api"}),
        "routes[0].match.path",
        "a prefix path must start with '/', got 'api'",
        id="prefix path starts with a slash",
    ),
    pytest.param(
        case(routes__0__match={"path": "", "path_type": "exact"}),
        "routes[0].match.path",
        "a exact path must start with '/', got ''",
        id="exact path starts with a slash",
    ),
    pytest.param(
        case(routes__0__match={"path_type": "glob"}),
        "routes[0].match.path_type",
        "Input should be 'exact', 'prefix' or 'regex' (got 'glob')",
        id="path type is one of three",
    ),
    pytest.param(
        case(routes__0__match={"hosts": ["example.com:8080"]}),
        "routes[0].match.hosts[0]",
        "a route host has no port ('example.com:8080'); ports belong to entrypoints",
        id="route host without port",
    ),
    pytest.param(
        case(routes__0__match={"hosts": ["ok.com", "a.*.com"]}),
        "routes[0].match.hosts[1]",
        "invalid host 'a.*.com' (expected example.com or *.example.com)",
        id="wildcard only as the first label",
    ),
    pytest.param(
        case(routes__0__match={"methods": ["GET", "NOT A METHOD"]}),
        "routes[0].match.methods[1]",
        "invalid method 'NOT A METHOD'",
        id="method is a token",
    ),
    pytest.param(
        case(routes__0__match={"path": "/", "query": "x"}),
        "routes[0].match.query",
        "unknown key",
        id="unknown key in match",
    ),
    # servers
    pytest.param(
        case(services__api__servers=[{"url": "ftp://h:21"}]),
        "services.api.servers[0].url",
        "scheme must be http:// (or https://), got 'ftp://h:21'",
        id="server URL scheme",
    ),
    pytest.param(
        case(services__api__servers=[{"url": "http://h:1"}, {"url": "http://h:80/api"}]),
        "services.api.servers[1].url",
        "a server URL is scheme://host:port only, no path or query: 'http://h:80/api'",
        id="server URL has no path",
    ),
    pytest.param(
        case(services__api__servers=[{"url": "http://h:80?x=1"}]),
        "services.api.servers[0].url",
        "a server URL is scheme://host:port only, no path or query: 'http://h:80?x=1'",
        id="server URL has no query",
    ),
    pytest.param(
        case(services__api__servers=[{"url": "http://:80"}]),
        "services.api.servers[0].url",
        "missing host in 'http://:80'",
        id="server URL has a host",
    ),
    pytest.param(
        case(services__api__servers=[{"url": "http://h:70000"}]),
        "services.api.servers[0].url",
        "invalid URL 'http://h:70000': Port out of range 0-65535",
        id="server URL port range",
    ),
    pytest.param(
        case(services__api__servers=[{"url": "http://u:p@h:80"}]),
        "services.api.servers[0].url",
        "credentials in a server URL are not supported",
        id="server URL without credentials",
    ),
    pytest.param(
        case(services__api__servers=[]),
        "services.api.servers",
        "a service needs at least one server",
        id="service has servers",
    ),
    pytest.param(
        case(services__api__servers=[{"url": "http://h", "weight": 0}]),
        "services.api.servers[0].weight",
        "Input should be greater than or equal to 1 (got 0)",
        id="weight at least 1",
    ),
    pytest.param(
        case(services__api__timeouts={"upstream_connect": 0}),
        "services.api.timeouts.upstream_connect",
        "Input should be greater than 0 (got 0)",
        id="service timeout override positive",
    ),
    pytest.param(
        case(services__api__timeouts={"connect": 1}),
        "services.api.timeouts.connect",
        "unknown key; did you mean 'upstream_connect'?",
        id="unknown key in a service override suggests the right one",
    ),
    # addresses and networks
    pytest.param(
        case(entrypoints__web__address="127.0.0.1"),
        "entrypoints.web.address",
        "expected host:port, got '127.0.0.1'",
        id="address needs a port",
    ),
    pytest.param(
        case(entrypoints__web__address="127.0.0.1:0"),
        "entrypoints.web.address",
        "port must be 1-65535, got '0'",
        id="port 0 refused",
    ),
    pytest.param(
        case(entrypoints__web__address="::1:80"),
        "entrypoints.web.address",
        "an IPv6 address needs brackets, e.g. [::1]:80",
        id="IPv6 needs brackets",
    ),
    pytest.param(
        case(entrypoints__web__address="[1.2.3.4]:80"),
        "entrypoints.web.address",
        "'1.2.3.4' in brackets is not an IPv6 address",
        id="brackets hold IPv6 only",
    ),
    pytest.param(
        case(entrypoints__web__address=":80"),
        "entrypoints.web.address",
        "missing host in ':80' (use 0.0.0.0 for every interface)",
        id="address needs a host",
    ),
    pytest.param(
        case(admin={"address": "bad host!:80"}),
        "admin.address",
        "invalid host 'bad host!'",
        id="admin address parses",
    ),
    pytest.param(
        case(entrypoints__web__forwarded={"trusted_ips": ["10.0.0.0/8", "10.1.2.3/8"]}),
        "entrypoints.web.forwarded.trusted_ips[1]",
        "'10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?",
        id="CIDR without host bits",
    ),
    pytest.param(
        case(entrypoints__web__forwarded={"trusted_ips": ["localhost"]}),
        "entrypoints.web.forwarded.trusted_ips[0]",
        "'localhost' is not an IP address or CIDR network",
        id="trusted IPs are IPs",
    ),
    pytest.param(
        case(entrypoints__internal={"address": "127.0.0.1:8080"}),
        "entrypoints.internal.address",
        "address 127.0.0.1:8080 is already used by entrypoints.web",
        id="two entrypoints on one address",
    ),
    pytest.param(
        case(entrypoints__web__address="127.0.0.1:9901"),
        "admin.address",
        "address 127.0.0.1:9901 is already used by entrypoints.web",
        id="admin clashes with an entrypoint",
    ),
    # names and scalars
    pytest.param(
        case(services={"my api": {"servers": [{"url": "http://h"}]}}, routes=[]),
        "services['my api']",
        "invalid name 'my api': use letters, digits, '_', '-' and '.'",
        id="names are plain",
    ),
    pytest.param(
        case(middlewares__limit={"rate": 10}),
        "middlewares.limit.type",
        "required key is missing",
        id="middleware needs a type",
    ),
    pytest.param(
        case(middlewares__limit={"type": "Rate-Limit"}),
        "middlewares.limit.type",
        "invalid type 'Rate-Limit': a lowercase module name like rate_limit",
        id="middleware type is a module name",
    ),
    pytest.param(
        case(workers=-1),
        "workers",
        "Input should be greater than or equal to 0 (got -1)",
        id="workers not negative",
    ),
    pytest.param(
        case(log_level="loud"),
        "log_level",
        "Input should be 'debug', 'info', 'warning' or 'error' (got 'loud')",
        id="log level is one of four",
    ),
    pytest.param(
        case(limits={"max_headers": 1000}),
        "limits.max_headers",
        "Input should be less than or equal to 512 (got 1000)",
        id="max headers capped by the parser",
    ),
    pytest.param(
        case(timeouts={"head": -1}),
        "timeouts.head",
        "Input should be greater than 0 (got -1)",
        id="timeouts positive",
    ),
    pytest.param(
        case(tls={}),
        "tls",
        "unknown key",
        id="unknown top-level key",
    ),
    pytest.param(
        case(log_levle="info"),
        "log_levle",
        "unknown key; did you mean 'log_level'?",
        id="typo in a top-level key suggests the right one",
    ),
]


@pytest.mark.parametrize(("data", "path", "reason"), CHECKS)
def test_each_check_names_its_key_path(data: dict[str, Any], path: str, reason: str) -> None:
    assert errors_of(data) == [(path, reason)]


def test_all_errors_are_collected_at_once() -> None:
    data = case(
        routes__0__service="x",
        routes__1__match={"path_type": "glob"},
        workers=-1,
        services__api__servers=[{"url": "ftp://h"}],
    )
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    paths = [path for path, _ in info.value.errors]
    assert paths == [
        "routes[0].service",
        "routes[1].match.path_type",
        "services.api.servers[0].url",
        "workers",
    ]
    assert str(info.value).splitlines() == info.value.lines()
    assert info.value.lines()[0] == "routes[0].service: unknown service 'x'"


def test_errors_sort_by_index_numerically() -> None:
    data = valid()
    data["routes"] = [{"service": "x"} for _ in range(12)]
    paths = [path for path, _ in errors_of(data)]
    assert paths == [f"routes[{i}].service" for i in range(12)]


def test_top_level_must_be_a_mapping() -> None:
    assert errors_of(["not", "a", "mapping"]) == [
        ("", "the configuration must be a mapping, got list")
    ]


def test_model_validate_alone_also_cross_checks() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"routes\[0\]\.service: unknown service"):
        Config.model_validate(case(routes__0__service="x"))


# --- normalisation and helpers --------------------------------------------------------------


def test_hosts_and_methods_are_normalised() -> None:
    config = parse_config(
        case(routes__0__match={"hosts": ["API.Example.com", "*.Example.COM"], "methods": ["get"]})
    )
    assert config.routes[0].match.hosts == ("api.example.com", "*.example.com")
    assert config.routes[0].match.methods == ("GET",)


def test_log_level_is_case_insensitive() -> None:
    assert parse_config(case(log_level="DEBUG")).log_level == "debug"


def test_config_is_frozen() -> None:
    config = parse_config(valid())
    with pytest.raises(pydantic.ValidationError):
        config.workers = 3  # type: ignore[misc]
    assert isinstance(config.routes, tuple)


def test_dump_and_validate_round_trip() -> None:
    config = parse_config(valid())
    dumped = config.model_dump()
    assert dumped["middlewares"]["limit"] == {"type": "rate_limit", "rate": 10}
    assert Config.model_validate(dumped) == config
    assert Config.model_validate_json(config.model_dump_json()) == config
    assert parse_config(config.model_dump(mode="json")) == config  # how workers receive it


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:8080", ("127.0.0.1", 8080), id="IPv4"),
        pytest.param("[::1]:443", ("::1", 443), id="IPv6 in brackets"),
        pytest.param("[::]:1", ("::", 1), id="IPv6 any, lowest port"),
        pytest.param("localhost:65535", ("localhost", 65535), id="host name, highest port"),
        pytest.param("0.0.0.0:80", ("0.0.0.0", 80), id="every interface"),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("127.0.0.1:65536", id="port too high"),
        pytest.param("127.0.0.1:http", id="port not numeric"),
        pytest.param("127.0.0.1:-1", id="negative port"),
        pytest.param("[::1", id="unclosed bracket"),
        pytest.param("[::1]80", id="no colon after bracket"),
        pytest.param("a..b:80", id="empty label"),
    ],
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        pytest.param("http://a", "a", 80, False, id="http default port"),
        pytest.param("https://a", "a", 443, True, id="https default port"),
        pytest.param("http://a:8080/", "a", 8080, False, id="trailing slash allowed"),
        pytest.param("http://[::1]:9000", "::1", 9000, False, id="IPv6 server"),
        pytest.param("http://my_service:80", "my_service", 80, False, id="compose-style name"),
    ],
)
def test_server_url_parts(url: str, host: str, port: int, tls: bool) -> None:
    server = Server(url=url)
    assert (server.host, server.port, server.tls) == (host, port, tls)


def test_forwarded_networks() -> None:
    data = case(entrypoints__web__forwarded={"trusted_ips": ["10.0.0.0/8", "::1"]})
    forwarded = parse_config(data).entrypoints["web"].forwarded
    assert forwarded.networks() == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_effective_timeouts_and_pool_merge_overrides() -> None:
    data = valid()
    data["services"]["slow"] = {
        "servers": [{"url": "http://127.0.0.1:9001"}],
        "timeouts": {"upstream_response": 300},
        "pool": {"max_idle": 4},
    }
    data["timeouts"] = {"upstream_connect": 2}
    config = parse_config(data)
    assert config.effective_timeouts("api") == Timeouts(upstream_connect=2)
    assert config.effective_timeouts("slow") == Timeouts(upstream_connect=2, upstream_response=300)
    assert config.effective_pool("api") == Pool()
    assert config.effective_pool("slow") == Pool(max_idle=4, idle_timeout=60)
    with pytest.raises(KeyError):
        config.effective_timeouts("nope")


def test_routes_for_entrypoint() -> None:
    data = valid()
    data["routes"][0]["entrypoints"] = ["internal"]
    config = parse_config(data)
    assert [r.name for r in config.routes_for("web")] == ["route-1"]
    assert [r.name for r in config.routes_for("internal")] == ["api", "route-1"]


def test_worker_count_resolves_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 7)
    assert parse_config(valid()).worker_count() == 7
    assert parse_config(case(workers=3)).worker_count() == 3


def test_disabled_admin_may_share_an_address() -> None:
    data = case(entrypoints__web__address="127.0.0.1:9901", admin={"enabled": False})
    assert parse_config(data).entrypoints["web"].address == "127.0.0.1:9901"


def test_input_is_not_mutated() -> None:
    data = valid()
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        pytest.param(("routes", 0, "match", "path_type"), "routes[0].match.path_type", id="index"),
        pytest.param(
            ("services", "api", "servers", 2, "url"), "services.api.servers[2].url", id="key"
        ),
        pytest.param(("services", "my api"), "services['my api']", id="odd key quoted"),
        pytest.param(("workers",), "workers", id="top level"),
        pytest.param((), "", id="root"),
    ],
)
def test_format_path(loc: tuple[Any, ...], path: str) -> None:
    assert format_path(loc) == path
