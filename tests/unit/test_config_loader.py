"""Loading: YAML and TOML, ${VAR} interpolation, FASTGATE_* variables, overrides, proxy mode."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import typing
import warnings
from typing import Any

import pydantic
import pytest

from fastgate.config import loader
from fastgate.config.loader import (
    ENV_VARS,
    ConfigWarning,
    EnvVar,
    build_config,
    load_config,
    proxy_config,
    read_config_file,
)
from fastgate.config.schema import Config
from fastgate.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]

YAML = """\
workers: 2
log_level: warning
limits:
  max_body_bytes: 1048576
timeouts:
  upstream_response: 15
entrypoints:
  web:
    address: "0.0.0.0:8080"
    forwarded:
      trusted_ips: ["10.0.0.0/8"]
routes:
  - name: api
    match:
      hosts: [api.example.com]
      path: /v1
      methods: [GET, POST]
    priority: 5
    middlewares: [limit]
    service: api
services:
  api:
    servers:
      - url: http://10.0.0.5:8000
        weight: 2
      - url: http://10.0.0.6:8000
    timeouts:
      upstream_connect: 1.5
middlewares:
  limit:
    type: rate_limit
    rate: 100
    per: 1s
admin:
  enabled: false
"""

TOML = """\
workers = 2
log_level = "warning"

[limits]
max_body_bytes = 1048576

[timeouts]
upstream_response = 15

[entrypoints.web]
address = "0.0.0.0:8080"
forwarded = { trusted_ips = ["10.0.0.0/8"] }

[[routes]]
name = "api"
match = { hosts = ["api.example.com"], path = "/v1", methods = ["GET", "POST"] }
priority = 5
middlewares = ["limit"]
service = "api"

[services.api]
servers = [
  { url = "http://10.0.0.5:8000", weight = 2 },
  { url = "http://10.0.0.6:8000" },
]
timeouts = { upstream_connect = 1.5 }

[middlewares.limit]
type = "rate_limit"
rate = 100
per = "1s"

[admin]
enabled = false
"""


def write(tmp_path: pathlib.Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def minimal(**extra: Any) -> dict[str, Any]:
    return {"entrypoints": {"web": {"address": "127.0.0.1:8080"}}, **extra}


def get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [pytest.param(".yaml", id="yaml"), pytest.param(".yml", id="yml")])
def test_yaml_and_toml_give_equal_configs(tmp_path: pathlib.Path, ext: str) -> None:
    from_yaml = load_config(write(tmp_path, "c" + ext, YAML), env={})
    from_toml = load_config(write(tmp_path, "c.toml", TOML), env={})
    assert from_yaml == from_toml
    assert from_yaml.services["api"].servers[0].weight == 2
    assert from_yaml.middlewares["limit"].options == {"rate": 100, "per": "1s"}
    assert from_yaml.effective_timeouts("api").upstream_connect == 1.5
    assert from_yaml.effective_timeouts("api").upstream_response == 15


def test_embedded_default_loads_and_validates() -> None:
    config = load_config(env={})
    assert config == load_config(None, {}, {})
    assert list(config.entrypoints) == ["web"]
    assert config.entrypoints["web"].address == "127.0.0.1:8080"
    assert (config.admin.address, config.admin.enabled) == ("127.0.0.1:9901", True)
    assert (config.demo_origin.address, config.demo_origin.enabled) == ("127.0.0.1:8081", True)
    assert [s.url for s in config.services["demo"].servers] == ["http://127.0.0.1:8081"]
    (route,) = config.routes
    assert (route.match.path, route.match.path_type, route.service) == ("/", "prefix", "demo")


def test_embedded_default_states_every_scalar_default() -> None:
    """The default file shows the schema defaults; it must not drift from them."""
    raw = read_config_file(None)
    schema_defaults = Config.model_validate(minimal()).model_dump()
    for section in ("limits", "timeouts", "pool"):
        assert raw[section] == schema_defaults[section], section
    for key in ("workers", "log_level", "drain_timeout"):
        assert raw[key] == schema_defaults[key], key
    assert raw["admin"] == schema_defaults["admin"]


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        pytest.param("c.json", "{}", "unknown file type; use .yaml, .yml or .toml", id="extension"),
        pytest.param("c.yaml", "a: [", "invalid YAML at line 1, column 5: ", id="bad YAML"),
        pytest.param("c.toml", "a = ", "invalid TOML: ", id="bad TOML"),
        pytest.param(
            "c.yaml", "- a\n- b\n", "the top level must be a mapping, got list", id="list"
        ),
        pytest.param(
            "c.yaml",
            "workers: 1\nworkers: 2\n",
            "invalid YAML at line 2, column 1: duplicate key 'workers' (first at line 1)",
            id="duplicate key refused",
        ),
    ],
)
def test_file_errors_name_the_file(
    tmp_path: pathlib.Path, name: str, text: str, reason: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.path == path
    assert info.value.reason.startswith(reason)


def test_duplicate_key_error_gives_the_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "c.yaml", "workers: 1\nlimits: {}\nworkers: 2\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: duplicate key 'workers' \(first"):
        load_config(path, env={})


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.path == path
    assert info.value.reason.startswith("cannot read: ")


def test_empty_file_is_an_empty_config(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "c.yaml", ""), env={})
    assert info.value.errors == [("entrypoints", "at least one entrypoint is required")]


def test_empty_yaml_sections_mean_defaults(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "c.yaml", "limits:\nroutes:\nmiddlewares:\nentrypoints:\n  web:\n")
    config = load_config(path, env={"FASTGATE_LISTEN": "127.0.0.1:7001"})
    assert config.limits == Config.model_fields["limits"].default
    assert (config.routes, config.middlewares) == ((), {})
    assert config.entrypoints["web"].address == "127.0.0.1:7001"


# --- ${VAR} interpolation -------------------------------------------------------------------

INTERPOLATION = [
    pytest.param("0.0.0.0:${PORT}", {"PORT": "9000"}, "0.0.0.0:9000", id="set"),
    pytest.param("0.0.0.0:${PORT:-8000}", {}, "0.0.0.0:8000", id="default when unset"),
    pytest.param("0.0.0.0:${PORT:-8000}", {"PORT": ""}, "0.0.0.0:8000", id="default when empty"),
    pytest.param("0.0.0.0:${PORT:-8000}", {"PORT": "7"}, "0.0.0.0:7", id="set beats default"),
    pytest.param("${HOST}:${PORT}", {"HOST": "::1", "PORT": "1"}, "::1:1", id="two references"),
]


@pytest.mark.parametrize(("template", "env", "expected"), INTERPOLATION)
def test_interpolation(template: str, env: dict[str, str], expected: str) -> None:
    data = loader._interpolate({"a": [{"b": template}]}, env, (), problems := [])
    assert problems == []
    assert data == {"a": [{"b": expected}]}


def test_interpolation_escape_and_non_strings() -> None:
    data = {"p": "^/x$${1}", "n": 5, "t": True, "l": ["${A}"]}
    assert loader._interpolate(data, {"A": "a"}, (), problems := []) == {
        "p": "^/x${1}",
        "n": 5,
        "t": True,
        "l": ["a"],
    }
    assert problems == []


def test_interpolation_feeds_typed_values(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """\
        workers: ${W:-3}
        entrypoints:
          web: {address: "127.0.0.1:${PORT}"}
        admin: {enabled: "${ADMIN:-false}"}
        """,
    )
    config = load_config(path, env={"PORT": "9100"})
    assert (config.workers, config.entrypoints["web"].port, config.admin.enabled) == (
        3,
        9100,
        False,
    )


def test_missing_variables_are_errors_naming_each_key(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """\
        entrypoints:
          web: {address: "${LISTEN}"}
        services:
          s: {servers: [{url: "http://a"}, {url: "http://${B_HOST}:80"}]}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.errors == [
        ("entrypoints.web.address", "environment variable LISTEN is not set"),
        ("services.s.servers[1].url", "environment variable B_HOST is not set"),
    ]


def test_malformed_reference_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(minimal(log_level="${LEVEL"), env={})
    assert info.value.errors == [
        ("log_level", "malformed ${...} in '${LEVEL' (write $${ for a literal ${)")
    ]


# --- FASTGATE_* variables -------------------------------------------------------------------

SAMPLES: dict[str, tuple[str, Any]] = {
    "int": ("300", 300),
    "float": ("2.5", 2.5),
    "bool": ("false", False),
    "level": ("DEBUG", "debug"),
    "address": ("127.0.0.1:7000", "127.0.0.1:7000"),
    "path": ("/var/log/fastgate/x.log", "/var/log/fastgate/x.log"),
    "log_format": ("Combined", "combined"),
}
# Booleans whose default is false are set to true (the sample must differ from the default).
TRUE_SAMPLE = ("on", True)
BAD: dict[str, tuple[str, str]] = {
    "int": ("seven", "expected an integer, got 'seven'"),
    "float": ("soon", "expected a number of seconds, got 'soon'"),
    "bool": ("maybe", "expected true/false (or 1/0, yes/no, on/off), got 'maybe'"),
    "level": ("loud", "expected debug, info, warning or error, got 'loud'"),
    "address": ("nowhere", "expected host:port, got 'nowhere'"),
    "path": ("  ", 'expected "-" (stdout), "stderr" or a file path'),
    "log_format": ("xml", "expected json, common or combined, got 'xml'"),
}
SIMPLE_VARS = [pytest.param(v, id=v.name) for v in ENV_VARS if "<" not in v.name]


def test_table_kinds_have_samples() -> None:
    assert {v.kind for v in ENV_VARS} <= set(SAMPLES) == set(BAD)


@pytest.mark.parametrize("var", SIMPLE_VARS)
def test_each_variable_is_applied(var: EnvVar) -> None:
    text, expected = SAMPLES[var.kind]
    key = "entrypoints.web.address" if var.key == "listen" else var.key
    if var.kind == "bool" and get(build_config(minimal(), env={}), key) is False:
        text, expected = TRUE_SAMPLE
    config = build_config(minimal(), env={var.name: text})
    assert get(config, key) == expected
    assert get(config, key) != get(build_config(minimal(), env={}), key)


@pytest.mark.parametrize("var", SIMPLE_VARS)
def test_each_variable_names_itself_on_a_bad_value(var: EnvVar) -> None:
    text, reason = BAD[var.kind]
    with pytest.raises(ConfigError) as info:
        build_config(minimal(), env={var.name: text})
    assert info.value.errors == [(var.name, reason)]


@pytest.mark.parametrize(
    ("name", "text", "path", "reason"),
    [
        pytest.param(
            "FASTGATE_WORKERS",
            "-2",
            "workers",
            "Input should be greater than or equal to 0 (got -2) (from FASTGATE_WORKERS)",
            id="workers range",
        ),
        pytest.param(
            "FASTGATE_HEAD_TIMEOUT",
            "0",
            "timeouts.head",
            "Input should be greater than 0 (got 0.0) (from FASTGATE_HEAD_TIMEOUT)",
            id="timeout range",
        ),
        pytest.param(
            "FASTGATE_LISTEN",
            "127.0.0.1:9901",
            "admin.address",
            "address 127.0.0.1:9901 is already used by entrypoints.web",
            id="clash caused by a variable",
        ),
    ],
)
def test_out_of_range_variable_is_named(name: str, text: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(minimal(), env={name: text})
    assert info.value.errors == [(path, reason)]


def test_all_variable_problems_are_reported_together() -> None:
    env = {"FASTGATE_WORKERS": "x", "FASTGATE_MAX_HEADERS": "y", "FASTGATE_POOL_MAX_IDLE": "-1"}
    with pytest.raises(ConfigError) as info:
        build_config(minimal(), env=env)
    assert [p for p, _ in info.value.errors] == [
        "FASTGATE_MAX_HEADERS",
        "FASTGATE_WORKERS",
        "pool.max_idle",
    ]


def test_listen_with_several_entrypoints_is_an_error() -> None:
    data = minimal()
    data["entrypoints"]["api"] = {"address": "127.0.0.1:8081"}
    with pytest.raises(ConfigError) as info:
        build_config(data, env={"FASTGATE_LISTEN": "127.0.0.1:1"})
    assert info.value.errors == [
        (
            "FASTGATE_LISTEN",
            "the config has several entrypoints (web, api); "
            "set FASTGATE_ENTRYPOINT_<NAME>_ADDRESS for each instead",
        )
    ]


def test_named_entrypoint_variables() -> None:
    data = {
        "entrypoints": {
            "web": {"address": "127.0.0.1:8080"},
            "internal-api": {"address": "127.0.0.1:8081"},
        }
    }
    env = {
        "FASTGATE_ENTRYPOINT_WEB_ADDRESS": "0.0.0.0:80",
        "FASTGATE_ENTRYPOINT_INTERNAL_API_ADDRESS": "[::1]:81",
    }
    config = build_config(data, env=env)
    assert config.entrypoints["web"].address == "0.0.0.0:80"
    assert config.entrypoints["internal-api"].address == "[::1]:81"


def test_named_entrypoint_variable_beats_listen() -> None:
    env = {"FASTGATE_LISTEN": "127.0.0.1:1", "FASTGATE_ENTRYPOINT_WEB_ADDRESS": "127.0.0.1:2"}
    assert build_config(minimal(), env=env).entrypoints["web"].address == "127.0.0.1:2"


@pytest.mark.parametrize(
    ("env", "error"),
    [
        pytest.param(
            {"FASTGATE_ENTRYPOINT_API_ADDRESS": "127.0.0.1:1"},
            (
                "FASTGATE_ENTRYPOINT_API_ADDRESS",
                "no entrypoint is named like 'API' (entrypoints: web)",
            ),
            id="unknown entrypoint",
        ),
        pytest.param(
            {"FASTGATE_ENTRYPOINT_WEB_ADDRESS": "127.0.0.1"},
            ("FASTGATE_ENTRYPOINT_WEB_ADDRESS", "expected host:port, got '127.0.0.1'"),
            id="bad address",
        ),
    ],
)
def test_named_entrypoint_variable_errors(env: dict[str, str], error: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(minimal(), env=env)
    assert info.value.errors == [error]


def test_unknown_variable_warns_with_a_suggestion() -> None:
    with pytest.warns(ConfigWarning) as record:
        config = build_config(minimal(), env={"FASTGATE_WORKER": "4"})
    assert config.workers == 0
    assert [str(w.message) for w in record] == [
        "unknown environment variable FASTGATE_WORKER ignored; did you mean FASTGATE_WORKERS?"
    ]


def test_known_variables_do_not_warn() -> None:
    env = {name: "1" for name in loader.OTHER_ENV_VARS} | {"FASTGATE_WORKERS": "1", "PATH": "/"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_config(minimal(), env=env)


# --- precedence and overrides ---------------------------------------------------------------


def test_precedence_default_file_env_overrides(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """\
        workers: 2
        log_level: warning
        drain_timeout: 5
        entrypoints: {web: {address: "127.0.0.1:8080"}}
        """,
    )
    env = {"FASTGATE_WORKERS": "3", "FASTGATE_LOG_LEVEL": "error"}
    config = load_config(path, env=env, overrides={"workers": 4})
    assert config.timeouts.head == 10.0  # default
    assert config.drain_timeout == 5.0  # file
    assert config.log_level == "error"  # env over file
    assert config.workers == 4  # override over env over file
    assert load_config(path, env=env).workers == 3
    assert load_config(path, env={}).workers == 2


def test_overrides_take_dotted_keys_listen_and_skip_none() -> None:
    config = build_config(
        minimal(),
        env={"FASTGATE_LISTEN": "127.0.0.1:1"},
        overrides={"listen": "127.0.0.1:2", "limits.max_body_bytes": 10, "workers": None},
    )
    assert config.entrypoints["web"].address == "127.0.0.1:2"
    assert config.limits.max_body_bytes == 10
    assert config.workers == 0


def test_bad_override_names_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(minimal(), env={}, overrides={"workers": -5})
    assert info.value.errors == [
        ("workers", "Input should be greater than or equal to 0 (got -5) (from override 'workers')")
    ]


def test_build_config_does_not_mutate_its_input() -> None:
    data = minimal(workers="${W:-1}")
    build_config(data, env={"FASTGATE_LISTEN": "127.0.0.1:5"})
    assert data == minimal(workers="${W:-1}")


# --- proxy mode -----------------------------------------------------------------------------


def test_proxy_config_shape() -> None:
    data = proxy_config("127.0.0.1:8000", ["http://127.0.0.1:9000", "127.0.0.1:9001"], 2)
    assert data == {
        "workers": 2,
        "entrypoints": {"web": {"address": "127.0.0.1:8000"}},
        "services": {
            "upstream": {
                "servers": [{"url": "http://127.0.0.1:9000"}, {"url": "http://127.0.0.1:9001"}]
            }
        },
        "routes": [{"name": "proxy", "match": {"path": "/"}, "service": "upstream"}],
    }
    config = build_config(data, env={})
    assert [s.port for s in config.services["upstream"].servers] == [9000, 9001]
    assert config.routes_for("web")[0].service == "upstream"


def test_proxy_config_bare_port_and_no_workers() -> None:
    data = proxy_config("8000", ["h:1"], None)
    assert "workers" not in data
    assert data["entrypoints"]["web"]["address"] == "127.0.0.1:8000"


def test_environment_applies_on_top_of_proxy_config() -> None:
    data = proxy_config("127.0.0.1:8000", ["http://127.0.0.1:9000"], 2)
    env = {"FASTGATE_WORKERS": "6", "FASTGATE_UPSTREAM_RESPONSE_TIMEOUT": "3"}
    config = build_config(data, env=env)
    assert (config.workers, config.timeouts.upstream_response) == (6, 3.0)


def test_proxy_config_bad_target_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(proxy_config("127.0.0.1:8000", ["ftp://x"], None), env={})
    assert info.value.errors[0][0] == "services.upstream.servers[0].url"


# --- documentation and import weight --------------------------------------------------------


def test_docs_list_every_variable() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for var in ENV_VARS:
        assert f"`{var.name}`" in docs, var.name
        assert f"`{var.key}`" in docs, var.key


def _fields(model: type[pydantic.BaseModel]) -> typing.Iterator[str]:
    for name, field in model.model_fields.items():
        yield name
        for arg in [field.annotation, *typing.get_args(field.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel):
                    yield from _fields(inner)


def test_docs_mention_every_schema_key() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted({f for f in _fields(Config) if f"`{f}`" not in docs and f != "options"})
    assert missing == []


def test_importing_config_stays_light() -> None:
    code = (
        "import sys, fastgate.config, fastgate.cli; "
        "heavy = [m for m in ('uvloop', 'httptools', 'fastgate.server', 'fastgate._core.conn') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
