"""Every _core module must be the compiled extension, never a silently imported .py twin."""

import importlib
import importlib.machinery

import pytest

MODULES = [
    "httphead", "body", "router", "writer", "conn", "ratelimit", "ratecheck", "stats", "accesslog",
    "ipfilter",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_core_module_is_a_compiled_extension(name: str) -> None:
    mod = importlib.import_module(f"fastgate._core.{name}")
    assert mod.__file__ is not None
    assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), mod.__file__
