"""docs/reference.md is what tools/gen_config_reference.py makes of the code, and it is whole.

Rules these tests hold:
- The committed file equals a fresh run of the generator, so the reference cannot go stale:
  a schema, middleware or FASTGATE_* change fails here until `make reference` is run.
- Independently of the generator's own walk, every field of every model reachable from
  `Config` (and of every middleware options model) is a row of the reference, every
  registered middleware type has a section, every ENV_VARS row is there, and every local link
  and anchor resolves.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import typing
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from fastgate.config.loader import ENV_VARS
from fastgate.config.schema import Config, Middleware
from fastgate.ratelimit.options import KeyPart

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"


def _load_generator() -> ModuleType:
    path = ROOT / "tools" / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
TEXT = REFERENCE.read_text(encoding="utf-8")
ROW_KEY = re.compile(r"^\| `([^`]+)` \|", re.MULTILINE)
KEYS = set(ROW_KEY.findall(TEXT))


def _models(tp: typing.Any) -> typing.Iterator[type[BaseModel]]:
    """The pydantic models an annotation mentions, at any depth."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp
    for arg in typing.get_args(tp):
        yield from _models(arg)


# Models a value is parsed into rather than written as: `key: "header:X-Tenant"` is text.
OPAQUE = (KeyPart,)


def _reachable(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = list(OPAQUE)
    todo = [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            todo += list(_models(info.annotation))
    return [m for m in seen if m not in OPAQUE]


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def test_committed_reference_is_fresh() -> None:
    assert TEXT == GEN.generate(), "docs/reference.md is stale: run `make reference`"


def test_check_mode_tells_stale_from_fresh(tmp_path: Path) -> None:
    out = tmp_path / "reference.md"
    assert GEN.main(["--out", str(out), "--check"]) == 1  # missing
    assert GEN.main(["--out", str(out)]) == 0
    assert GEN.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    assert GEN.main(["--out", str(out), "--check"]) == 1


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(m, id=m.__name__)
        for m in _reachable(Config)
        if m is not Middleware and m is not Config
    ],
)
def test_every_schema_field_is_a_row(model: type[BaseModel]) -> None:
    for name in _field_names(model):
        assert any(k == name or k.endswith(f".{name}") for k in KEYS), (model, name)


def test_top_level_keys_are_rows() -> None:
    assert set(_field_names(Config)) <= KEYS


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("workers", id="top-level scalar"),
        pytest.param("limits.max_head_bytes", id="section key"),
        pytest.param("entrypoints.<name>.address", id="dict of models"),
        pytest.param("entrypoints.<name>.tls.certificates[].cert_file", id="list in dict"),
        pytest.param("routes[].match.path_type", id="list of models"),
        pytest.param("routes[].access_log.sample", id="bool-or-section"),
        pytest.param("services.<name>.servers[].url", id="service servers"),
        pytest.param("services.<name>.balancer.type", id="balancer shorthand section"),
        pytest.param("services.<name>.retries.retry_on", id="retries"),
        pytest.param("providers.redis.<name>.sentinel.addresses", id="nested dict"),
        pytest.param("tracing.otlp.endpoint", id="optional section"),
        pytest.param("middlewares.<name>.type", id="middleware type"),
        pytest.param("middlewares.<name>.<option>", id="options beside type"),
        pytest.param("middlewares.<name>.limits[].rate", id="rate_limit nested list"),
        pytest.param("middlewares.<name>.require.claims.<name>.in", id="alias of a field"),
        pytest.param("middlewares.<name>.hsts.max_age", id="section given by a note"),
    ],
)
def test_expected_key_paths(key: str) -> None:
    assert key in KEYS


@pytest.mark.parametrize("type_name", sorted(GEN.load_middleware_types()))
def test_every_middleware_type_has_a_section(type_name: str) -> None:
    assert f'<a id="{GEN.anchor("mw", type_name)}"></a>' in TEXT
    cls = GEN.load_middleware_types()[type_name]
    model = GEN.options_model(cls)
    if model is None:  # listed with its docs page instead
        assert f"({GEN.DOC_PAGES.get(type_name, GEN.DEFAULT_DOC_PAGE)})" in TEXT
        return
    for sub in _reachable(model):
        for name in _field_names(sub):
            assert f"`middlewares.<name>.{name}`" in TEXT or any(
                k.startswith("middlewares.<name>.") and k.endswith(f".{name}") for k in KEYS
            ), (type_name, sub.__name__, name)


@pytest.mark.parametrize("var", [pytest.param(v, id=v.name) for v in ENV_VARS])
def test_every_env_var_is_listed_and_on_its_key(var: typing.Any) -> None:
    assert f"| `{var.name}` |" in TEXT
    key = "entrypoints.<name>.address" if var.key == "listen" else var.key
    row = next(line for line in TEXT.splitlines() if line.startswith(f"| `{key}` |"))
    assert f"`{var.name}`" in row


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("providers.redis.<name>.password", "${VAR}", id="repr=False is a secret"),
        pytest.param("tracing.otlp.headers", "${VAR}", id="secret mapping"),
        pytest.param("services.<name>.balancer.cookie", "``", id="backtick in a pattern"),
        pytest.param("workers", "0..1024", id="inclusive range"),
        pytest.param("timeouts.head", "> 0", id="exclusive bound"),
        pytest.param("log_level", "one of `debug`", id="literal choices"),
    ],
)
def test_row_details(text: str, needle: str) -> None:
    row = next(line for line in TEXT.splitlines() if line.startswith(f"| `{text}` |"))
    assert needle in row


def test_links_and_anchors_resolve() -> None:
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', TEXT))
    assert len(anchors) == TEXT.count("<a id=")  # unique
    for target in re.findall(r"\]\(([^)]+)\)", TEXT):
        page, _, fragment = target.partition("#")
        if page.startswith("http"):
            continue
        if page:
            assert (REFERENCE.parent / page).is_file(), target
        elif fragment:
            assert fragment in anchors, target


def test_tables_have_even_columns() -> None:
    """An unescaped `|` in a cell would shift the columns of its row."""
    for block in re.split(r"\n\n", TEXT):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if not lines:
            continue
        widths = {len(re.findall(r"(?<!\\)\|", ln)) for ln in lines}
        assert len(widths) == 1, lines[0]
