"""Configuration: the typed schema, and loading it from a file, the environment and the CLI.

Importing this package is cheap (pydantic and PyYAML only): `fastgate check` and the
supervisor use it without loading the server or the compiled core.
"""

from fastgate.config.loader import (
    ENV_VARS,
    ConfigWarning,
    build_config,
    load_config,
    proxy_config,
)
from fastgate.config.schema import Config, parse_address, parse_config
from fastgate.errors import ConfigError

__all__ = [
    "ENV_VARS",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "build_config",
    "load_config",
    "parse_address",
    "parse_config",
    "proxy_config",
]
