"""Config `type` -> middleware class. Each middleware module registers itself here."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from fastgate.errors import ConfigError

_TYPES: dict[str, Callable[..., Any]] = {}


def register(cls: Callable[..., Any]) -> Callable[..., Any]:
    """Class decorator: make `cls` available under its `type` name."""
    _TYPES[cls.type] = cls
    return cls


def build(name: str, type_name: str, options: dict[str, Any]) -> Any:
    """Instantiate middleware `name`; unknown types name the key path."""
    cls = _TYPES.get(type_name)
    if cls is None and re.fullmatch(r"[a-z][a-z0-9_]*", type_name):
        # Module name = config type (DESIGN.md §3): importing it registers the class.
        try:
            importlib.import_module(f"fastgate.middleware.{type_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fastgate.middleware.{type_name}":
                raise
        cls = _TYPES.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_TYPES)) or "none yet"
        raise ConfigError(
            f"middlewares.{name}.type", f"unknown type {type_name!r} (known: {known})"
        )
    return cls(options, name)
