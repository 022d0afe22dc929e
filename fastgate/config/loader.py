"""Where a Config comes from: a file (or the embedded default), the environment, the command line.

Precedence, lowest first: schema defaults < the file < `FASTGATE_*` variables < command-line
overrides. The layers are merged on the raw mapping and validated once at the end, so every
problem is reported together; a value that came from a variable or an override has its source
named beside the key path.

`${VAR}` and `${VAR:-default}` in the file's string values are replaced from the environment
before anything else (`$${` writes a literal `${`). An undefined variable without a default is
an error naming the key that used it.

`ENV_VARS` is the one table of tuning variables; docs/configuration.md lists the same rows.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from fastgate.config.schema import Config, format_path, parse_address, parse_config
from fastgate.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ENV_VARS",
    "ConfigWarning",
    "EnvVar",
    "build_config",
    "load_config",
    "proxy_config",
    "read_config_file",
]


class ConfigWarning(UserWarning):
    """Something in the configuration's surroundings looks wrong but does not stop loading."""


# --- the environment table ------------------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected true/false (or 1/0, yes/no, on/off), got {text!r}")


def _level(text: str) -> str:
    word = text.strip().lower()
    if word not in ("debug", "info", "warning", "error"):
        raise ValueError(f"expected debug, info, warning or error, got {text!r}")
    return word


def _address(text: str) -> str:
    parse_address(text.strip())
    return text.strip()


def _log_path(text: str) -> str:
    if not text.strip():
        raise ValueError('expected "-" (stdout), "stderr" or a file path')
    return text.strip()


def _log_format(text: str) -> str:
    word = text.strip().lower()
    if word not in ("json", "common", "combined"):
        raise ValueError(f"expected json, common or combined, got {text!r}")
    return word


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": _int,
    "float": _float,
    "bool": _bool,
    "level": _level,
    "address": _address,
    "path": _log_path,
    "log_format": _log_format,
}


@dataclass(frozen=True)
class EnvVar:
    """One row of the table: variable name, the config key it sets, its value kind."""

    name: str
    key: str  # dotted key path; "listen" = the address of the only entrypoint
    kind: str  # a _PARSERS key

    def parse(self, text: str) -> Any:
        return _PARSERS[self.kind](text)


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("FASTGATE_WORKERS", "workers", "int"),
    EnvVar("FASTGATE_LOG_LEVEL", "log_level", "level"),
    EnvVar("FASTGATE_DRAIN_TIMEOUT", "drain_timeout", "float"),
    EnvVar("FASTGATE_LISTEN", "listen", "address"),
    EnvVar("FASTGATE_ADMIN_ADDRESS", "admin.address", "address"),
    EnvVar("FASTGATE_ADMIN_ENABLED", "admin.enabled", "bool"),
    EnvVar("FASTGATE_MAX_HEAD_BYTES", "limits.max_head_bytes", "int"),
    EnvVar("FASTGATE_MAX_HEADERS", "limits.max_headers", "int"),
    EnvVar("FASTGATE_MAX_TARGET", "limits.max_target", "int"),
    EnvVar("FASTGATE_MAX_BODY_BYTES", "limits.max_body_bytes", "int"),
    EnvVar("FASTGATE_MAX_PIPELINE_BYTES", "limits.max_pipeline_bytes", "int"),
    EnvVar("FASTGATE_HEAD_TIMEOUT", "timeouts.head", "float"),
    EnvVar("FASTGATE_IDLE_TIMEOUT", "timeouts.idle", "float"),
    EnvVar("FASTGATE_BODY_TIMEOUT", "timeouts.body", "float"),
    EnvVar("FASTGATE_UPSTREAM_CONNECT_TIMEOUT", "timeouts.upstream_connect", "float"),
    EnvVar("FASTGATE_UPSTREAM_RESPONSE_TIMEOUT", "timeouts.upstream_response", "float"),
    EnvVar("FASTGATE_UPSTREAM_IDLE_TIMEOUT", "timeouts.upstream_idle", "float"),
    EnvVar("FASTGATE_UPSTREAM_TOTAL_TIMEOUT", "timeouts.upstream_total", "float"),
    EnvVar("FASTGATE_POOL_MAX_IDLE", "pool.max_idle", "int"),
    EnvVar("FASTGATE_POOL_IDLE_TIMEOUT", "pool.idle_timeout", "float"),
    EnvVar("FASTGATE_ACCESS_LOG_ENABLED", "access_log.enabled", "bool"),
    EnvVar("FASTGATE_ACCESS_LOG_PATH", "access_log.path", "path"),
    EnvVar("FASTGATE_ACCESS_LOG_FORMAT", "access_log.format", "log_format"),
    EnvVar("FASTGATE_AUDIT_LOG_PATH", "audit_log.path", "path"),
    # The address of one named entrypoint: FASTGATE_ENTRYPOINT_WEB_ADDRESS sets entrypoint
    # `web`. The name is matched upper-cased, with `-` and `.` read as `_`.
    EnvVar("FASTGATE_ENTRYPOINT_<NAME>_ADDRESS", "entrypoints.<name>.address", "address"),
)

# Read elsewhere, not configuration values: known, so not warned about.
OTHER_ENV_VARS = frozenset({"FASTGATE_CONFIG", "FASTGATE_DEBUG", "FASTGATE_DATA_DIR"})

_BY_NAME = {v.name: v for v in ENV_VARS if "<" not in v.name}
_ENTRYPOINT_VAR = re.compile(r"^FASTGATE_ENTRYPOINT_(.+)_ADDRESS$")
_LISTEN = "listen"


def _env_name(entrypoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", entrypoint).upper()


# --- reading files --------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a second `routes:` would silently win)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    first_line: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {first_line[key]})",
                key_node.start_mark,
            )
        first_line[key] = key_node.start_mark.line + 1
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, f"invalid YAML{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"invalid YAML: {exc}") from None


def _parse_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"invalid TOML: {exc}") from None


DEFAULT_CONFIG_NAME = "default.yaml"


def read_config_file(path: str | None) -> dict[str, Any]:
    """The raw mapping in a YAML (.yaml/.yml) or TOML (.toml) file; None = the embedded default.

    No interpolation or validation happens here.
    """
    if path is None:
        source = f"<embedded {DEFAULT_CONFIG_NAME}>"
        text = importlib.resources.files("fastgate.config").joinpath(DEFAULT_CONFIG_NAME)
        data = _parse_yaml(text.read_text(encoding="utf-8"), source)
    else:
        source = os.fspath(path)
        ext = os.path.splitext(source)[1].lower()
        if ext not in (".yaml", ".yml", ".toml"):
            raise ConfigError(source, "unknown file type; use .yaml, .yml or .toml")
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, f"cannot read: {exc}") from None
        data = _parse_toml(text, source) if ext == ".toml" else _parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, f"the top level must be a mapping, got {type(data).__name__}")
    return data


# --- ${VAR} interpolation -------------------------------------------------------------------

_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(
    value: Any, env: Mapping[str, str], loc: tuple[Any, ...], errors: list[tuple[str, str]]
) -> Any:
    """`value` with references replaced; problems are appended to `errors` as (path, reason)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, (*loc, k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, (*loc, i), errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "\0{"  # a literal `${`, restored below so it is not read as a reference
        name, default = m.group(1), m.group(2)
        found = env.get(name)
        if default is not None and not found:  # the shell's rule: `:-` also covers empty
            return default
        if found is None:
            errors.append((format_path(loc), f"environment variable {name} is not set"))
            return ""
        return found

    text = _REF.sub(replace, value)
    if "${" in text:
        errors.append(
            (format_path(loc), f"malformed ${{...}} in {value!r} (write $${{ for a literal ${{)")
        )
    return text.replace("\0{", "${")


# --- layering -------------------------------------------------------------------------------


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key path, creating mappings on the way (a non-mapping is left for the
    schema to report)."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return
        node = child
    node[last] = value


def _apply(
    data: dict[str, Any], key: str, value: Any, source: str, origins: dict[str, str]
) -> None:
    """Apply one setting; `listen` sets the address of the only entrypoint."""
    if key != _LISTEN:
        _set(data, key, value)
        origins[key] = source
        return
    entrypoints = data.get("entrypoints")
    if not isinstance(entrypoints, dict) or not entrypoints:
        raise ConfigError(source, "there is no entrypoint to set the address of")
    if len(entrypoints) > 1:
        names = ", ".join(map(str, entrypoints))
        raise ConfigError(
            source,
            f"the config has several entrypoints ({names}); "
            "set FASTGATE_ENTRYPOINT_<NAME>_ADDRESS for each instead",
        )
    name = next(iter(entrypoints))
    _apply(data, f"entrypoints.{name}.address", value, source, origins)


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str], origins: dict[str, str]
) -> list[tuple[str, str]]:
    """Apply the FASTGATE_* variables to `data`; return the problems as (variable, reason)."""
    errors: list[tuple[str, str]] = []
    named: list[tuple[str, str]] = []
    for name in sorted(k for k in env if k.startswith("FASTGATE_")):
        text = env[name]
        var = _BY_NAME.get(name)
        try:
            if var is not None:
                _apply(data, var.key, var.parse(text), name, origins)
            elif _ENTRYPOINT_VAR.match(name):
                named.append((name, text))
            elif name not in OTHER_ENV_VARS:
                known = [*_BY_NAME, *OTHER_ENV_VARS]
                hint = difflib.get_close_matches(name, known, n=1)
                warnings.warn(
                    f"unknown environment variable {name} ignored"
                    + (f"; did you mean {hint[0]}?" if hint else ""),
                    ConfigWarning,
                    stacklevel=4,
                )
        except ConfigError as exc:
            errors.extend(exc.errors)
        except ValueError as exc:
            errors.append((name, str(exc)))
    # After FASTGATE_LISTEN, so the more specific variable wins.
    entrypoints = data.get("entrypoints")
    by_env_name = (
        {_env_name(str(k)): k for k in entrypoints} if isinstance(entrypoints, dict) else {}
    )
    for name, text in named:
        wanted = _ENTRYPOINT_VAR.match(name).group(1)  # type: ignore[union-attr]
        entrypoint = by_env_name.get(wanted)
        if entrypoint is None:
            have = ", ".join(map(str, by_env_name.values())) or "none"
            errors.append((name, f"no entrypoint is named like {wanted!r} (entrypoints: {have})"))
            continue
        try:
            _apply(data, f"entrypoints.{entrypoint}.address", _address(text), name, origins)
        except ValueError as exc:
            errors.append((name, str(exc)))
    return errors


def build_config(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    interpolate: bool = True,
) -> Config:
    """Validate a raw mapping after `${VAR}` interpolation, FASTGATE_* variables and overrides.

    `overrides` keys are dotted key paths (`workers`, `limits.max_body_bytes`,
    `entrypoints.web.address`) or `listen` (the address of the only entrypoint); None values
    are skipped, so unset command-line options can be passed as they are.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = copy.deepcopy(dict(data))
    problems: list[tuple[str, str]] = []
    if interpolate:
        raw = _interpolate(raw, env, (), problems)
    origins: dict[str, str] = {}
    problems += _apply_env(raw, env, origins)
    for key, value in (overrides or {}).items():
        if value is not None:
            try:
                _apply(raw, key, value, f"override {key!r}", origins)
            except ConfigError as exc:
                problems += exc.errors
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        # A key whose ${VAR} failed has a stand-in value: its own complaint would be noise.
        seen = {path for path, _ in problems}
        problems += [
            (p, f"{r} (from {origins[p]})" if p in origins else r)
            for p, r in exc.errors
            if p not in seen
        ]
    if problems:
        raise ConfigError.from_errors(problems)
    return config


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load, layer and validate the configuration; raise ConfigError listing every problem.

    `path` is a .yaml/.yml/.toml file, or None for the embedded default. `env` defaults to
    os.environ; `overrides` are command-line settings (see `build_config`). Unknown FASTGATE_*
    variables give a ConfigWarning.
    """
    return build_config(read_config_file(path), env, overrides)


def proxy_config(listen: str, to: list[str], workers: int | None = None) -> dict[str, Any]:
    """The raw config of `fastgate proxy`: one entrypoint, one route `/`, one service.

    `listen` may be a bare port (bound on 127.0.0.1) and a `to` URL may omit `http://`. The
    result goes through `build_config`, so FASTGATE_* variables still apply on top.
    """
    if listen.isdigit():
        listen = f"127.0.0.1:{listen}"
    servers = [{"url": url if "://" in url else f"http://{url}"} for url in to]
    data: dict[str, Any] = {
        "entrypoints": {"web": {"address": listen}},
        "services": {"upstream": {"servers": servers}},
        "routes": [{"name": "proxy", "match": {"path": "/"}, "service": "upstream"}],
    }
    if workers is not None:
        data["workers"] = workers
    return data
