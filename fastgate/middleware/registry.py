"""Config `type` -> middleware class. Each middleware module registers itself here."""

from __future__ import annotations

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
    if cls is None:
        known = ", ".join(sorted(_TYPES)) or "none yet"
        raise ConfigError(
            f"middlewares.{name}.type", f"unknown type {type_name!r} (known: {known})"
        )
    return cls(options, name)
