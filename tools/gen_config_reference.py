"""Write docs/reference.md, the configuration reference, from the code that validates a config.

    python tools/gen_config_reference.py            # (re)write docs/reference.md
    python tools/gen_config_reference.py --check    # exit 1 when the file is stale

Rules this file obeys:
- Every fact comes from the code, never from a second hand-kept list: the pydantic models of
  fastgate/config/schema.py walked from `Config` (dicts of models become `name.<name>.key`,
  lists of models `name[].key`), each registered middleware type's options model (the
  middleware modules are imported so that they register, then `<Class>Options` is looked up
  in the class's module), and the FASTGATE_* variables of fastgate/config/loader.py
  `ENV_VARS`. Types, defaults, bounds (ge/gt/le/lt, lengths, patterns), Literal choices and
  Field descriptions are read from the models; a field declared `repr=False` is a secret.
- The few facts a model cannot state (a field typed `Any` that the middleware checks itself,
  a default filled in by a validator) are in `NOTES`, keyed by `Model.field`; a note whose
  field no longer exists is an error, so a note cannot outlive its field.
- A middleware type without a discoverable options model is listed with its docs page (and
  its accepted option names when the module keeps them in `_OPTIONS`).
- The output is deterministic (model field order, sorted type names, no dates, no absolute
  paths), so tests/unit/test_config_reference.py can require the committed file to equal a
  fresh run: the reference cannot go stale.
- Nothing is started and nothing is read from the environment: importing the modules is all.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import re
import sys
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

OUTPUT = ROOT / "docs" / "reference.md"
_NOT_MIDDLEWARES = frozenset({"base", "registry"})

# Docs page of each middleware type (relative to docs/); a type not listed links to the
# middlewares section of configuration.md.
DOC_PAGES = {
    "add_prefix": "rewrite.md",
    "api_key": "auth/api-keys.md",
    "authorize": "auth/authorize.md",
    "basic_auth": "auth/basic.md",
    "compress": "compression.md",
    "cors": "cors.md",
    "forward_auth": "auth/forward-auth.md",
    "headers": "headers.md",
    "ip_filter": "ip-filter.md",
    "jwt_auth": "auth/jwt.md",
    "ldap_auth": "auth/ldap.md",
    "mtls_auth": "auth/mtls.md",
    "rate_limit": "rate-limiting.md",
    "redirect": "rewrite.md",
    "redirect_https": "security-headers.md",
    "replace_path_regex": "rewrite.md",
    "security_headers": "security-headers.md",
    "strip_prefix": "rewrite.md",
}
DEFAULT_DOC_PAGE = "configuration.md#middlewares"

# Validators whose function name says more than the base type; `opaque`: the value is written
# as text and parsed, so the model behind it is not a section of the file.
_LABELS: dict[str, tuple[str, bool]] = {
    "_check_name": ("name", False),
    "_check_type": ("type name", False),
    "_check_address": ("address (host:port)", False),
    "_check_network": ("IP or CIDR", False),
    "_check_route_host": ("host (or *.wildcard)", False),
    "_check_method": ("method", False),
    "_check_server_url": ("URL", False),
    "_check_file_name": ("file path", False),
    "_check_log_path": ("log path", False),
    "_check_query_key": ("query parameter name", False),
    "_balancer": ("type name or section", False),
    "_route_log": ("boolean or section", False),
    "_duration": ("duration (seconds, or text: 50ms, 1m)", False),
    "_key_parts": ("key part or list of key parts", True),
    "_media_type": ("media type", False),
    "_auth_method": ("auth method name", False),
}


@dataclass(frozen=True)
class Note:
    """What a model cannot say about one field: each given value replaces the derived one."""

    type: str | None = None
    default: str | None = None
    description: str | None = None
    model: type[BaseModel] | None = None  # walk this model as the field's section


def _notes() -> dict[str, Note]:
    from fastgate.middleware.security_headers import Hsts

    return {
        "AuthOptions.forward_headers": Note(
            type="mapping of header name to identity source",
            default="`{}`",
            description="upstream request headers set from the identity: `subject`, "
            "`consumer`, `method`, `scopes`, `roles`, `groups` or `claim:NAME`; the same "
            "headers sent by the client are always removed",
        ),
        "AuthOptions.hide_credentials": Note(
            type="boolean", description="true: the credential header is not passed upstream"
        ),
        "AuthOptions.optional": Note(
            type="boolean",
            description="true: a request without this kind of credential (or already "
            "identified) passes on unidentified; a wrong credential is still refused",
        ),
        "SecurityHeadersOptions.hsts": Note(
            type="section or false",
            default="the section's defaults",
            description="Strict-Transport-Security; false: not sent",
            model=Hsts,
        ),
        "LdapAuthOptions.bind_password": Note(
            type="string", description="the password of `bind_dn` (search mode)"
        ),
        "Route.name": Note(default="`route-<index>`"),
        "RateLimitOptions.key": Note(default='`"client_ip"`'),
    }


# --- type shapes ------------------------------------------------------------------------------


@dataclass
class Shape:
    """How one annotation reads in the reference."""

    text: str
    constraints: list[str] = field(default_factory=list)
    children: list[tuple[str, type[BaseModel]]] = field(default_factory=list)  # (suffix, model)


_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _flatten(meta: Iterable[Any]) -> Iterator[Any]:
    for item in meta:
        if isinstance(item, FieldInfo):
            yield from _flatten(item.metadata)
        yield item


def _label(meta: list[Any]) -> tuple[str | None, bool]:
    for item in meta:
        func = getattr(item, "func", None)
        name = getattr(func, "__name__", None)
        if name in _LABELS:
            return _LABELS[name]
    return None, False


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _bounds(meta: list[Any]) -> list[str]:
    """ge/gt/le/lt, lengths and patterns, as `1..65535`, `> 0`, `min length 1`."""
    found: dict[str, Any] = {}
    for item in meta:
        if isinstance(item, FieldInfo):
            continue
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(item, attr, None)
            if value is not None and attr not in found:
                found[attr] = value
    out: list[str] = []
    if "ge" in found and "le" in found:
        out.append(f"{_num(found['ge'])}..{_num(found['le'])}")
    else:
        out += [f">= {_num(found['ge'])}"] if "ge" in found else []
        out += [f"> {_num(found['gt'])}"] if "gt" in found else []
        out += [f"<= {_num(found['le'])}"] if "le" in found else []
    out += [f"< {_num(found['lt'])}"] if "lt" in found else []
    out += [f"min length {found['min_length']}"] if "min_length" in found else []
    out += [f"max length {found['max_length']}"] if "max_length" in found else []
    out += [f"pattern {code(found['pattern'])}"] if "pattern" in found else []
    return out


def code(text: str) -> str:
    """`text` as a Markdown code span, even when it holds a backtick."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return code(str(value))


def describe(tp: Any, meta: Iterable[Any] = ()) -> Shape:
    """The shape of annotation `tp` with field metadata `meta` (validators, bounds)."""
    items = list(_flatten(meta))
    while typing.get_origin(tp) is Annotated:
        tp, *more = typing.get_args(tp)
        items = list(_flatten(more)) + items
    label, opaque = _label(items)
    shape = _describe_bare(tp)
    shape.constraints = _bounds(items) + shape.constraints
    if label is not None:
        shape.text = label
    if opaque:
        shape.children = []
    return shape


def _describe_bare(tp: Any) -> Shape:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return Shape("any")
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        # A Literal beside other types reads as its values: `string or false`.
        parts = [
            Shape(" or ".join(_literal(v) for v in typing.get_args(a)))
            if typing.get_origin(a) is Literal and len(real) > 1
            else describe(a)
            for a in real
        ]
        texts = list(dict.fromkeys(p.text for p in parts))
        if len(real) < len(args):
            texts.append("null")
        return Shape(
            " or ".join(texts),
            [c for p in parts for c in p.constraints],
            [c for p in parts for c in p.children],
        )
    if origin is Literal:
        kinds = dict.fromkeys(_SCALARS.get(type(v), type(v).__name__) for v in args)
        return Shape(" or ".join(kinds), ["one of " + ", ".join(_literal(v) for v in args)])
    if origin in (tuple, list, set, frozenset):
        item = describe(args[0] if args else Any)
        return Shape(
            f"list of {item.text}",
            [f"each: {c}" for c in item.constraints],
            [(f"[]{suffix}", model) for suffix, model in item.children],
        )
    if origin is dict:
        key, value = describe(args[0]), describe(args[1])
        return Shape(
            f"mapping of {key.text} to {value.text}",
            [f"each value: {c}" for c in value.constraints],
            [(f".<name>{suffix}", model) for suffix, model in value.children],
        )
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return Shape("section", children=[("", tp)])
    if tp in _SCALARS:
        return Shape(_SCALARS[tp])
    return Shape(getattr(tp, "__name__", str(tp)))


# --- values -----------------------------------------------------------------------------------


def _plain(value: Any) -> str:
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(mode="json"))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return json.dumps(value)


def default_text(info: FieldInfo) -> str:
    """The default as the file would write it; `required` when there is none."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, BaseModel):
        return ""  # a section: its own keys have the defaults
    return f"`{_plain(value)}`"


def _doc(obj: Any) -> str:
    """An object's own docstring (not inherited), as one paragraph per blank-line block."""
    text = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", "")
    if not text:
        return ""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if not p.startswith(" "))


def _first_sentence(text: str) -> str:
    first = text.split("\n\n")[0]
    match = re.match(r"(.+?[.!?])(?=\s+[A-Z`(]|$)", first)
    return match.group(1) if match else first


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def anchor(*parts: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", "-".join(parts).lower()).strip("-")


# --- rows and sections ------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    type: str
    default: str
    constraints: str
    env: str
    description: str


@dataclass
class Section:
    """One model at one key path: a heading, its docstring and one row per field."""

    path: str
    title: str
    anchor: str
    intro: str
    rows: list[Row]
    level: int


class Reference:
    """Walks the models and collects every section; `render()` makes the Markdown."""

    def __init__(self) -> None:
        from fastgate.config import loader, schema

        self.schema = schema
        self.loader = loader
        self.notes = _notes()
        self.used_notes: set[str] = set()
        self.env = self._env_by_key()
        self.types = load_middleware_types()

    def _env_by_key(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for var in self.loader.ENV_VARS:
            key = "entrypoints.<name>.address" if var.key == "listen" else var.key
            out.setdefault(key, []).append(var.name)
        return out

    # --- walking

    def walk(
        self, model: type[BaseModel], path: str, level: int, prefix: str, title: str = ""
    ) -> list[Section]:
        """`model` at `path` (key prefix `prefix`), then its sub-sections depth first."""
        sect_anchor = anchor(prefix.rstrip(".") or "top") if not title else anchor(title)
        rows: list[Row] = []
        children: list[tuple[str, type[BaseModel]]] = []
        if model is self.schema.Middleware:
            rows = self._middleware_rows(prefix)
        else:
            for name, info in model.model_fields.items():
                row, kids = self._row(model, name, info, prefix)
                rows.append(row)
                children += kids
        section = Section(
            path=path,
            title=title or f"`{prefix.rstrip('.')}`",
            anchor=sect_anchor,
            intro=_doc(model),
            rows=rows,
            level=level,
        )
        if model is self.schema.Config:
            section.intro = ""  # its docstring speaks to developers; HEADER says it all
        elif model is self.schema.Middleware:
            section.intro = section.intro.split("\n\n")[0]  # the rest is about Python
        out = [section]
        child_level = 2 if model is self.schema.Config else 3
        for key, child in children:
            out += self.walk(child, key, child_level, key + ".")
        return out

    def _row(
        self, model: type[BaseModel], name: str, info: FieldInfo, prefix: str
    ) -> tuple[Row, list[tuple[str, type[BaseModel]]]]:
        key = info.alias or name
        note = self._note(model, name)
        shape = describe(info.annotation, info.metadata)
        children = [(f"{prefix}{key}{suffix}", m) for suffix, m in shape.children]
        if note.model is not None:
            children = [(f"{prefix}{key}", note.model)]
        type_text = note.type or shape.text
        if children:
            type_text = f"[{type_text}](#{anchor(children[0][0])})"
        description = note.description or info.description or ""
        if not description and children:
            description = _first_sentence(_doc(children[0][1]))
        if info.repr is False:
            description += ("; " if description else "") + "secret: write it as `${VAR}`"
        default = note.default if note.default is not None else default_text(info)
        if default == "" and note.model is None and not children:
            default = "`{}`"
        path = f"{prefix}{key}"
        env = ", ".join(f"`{v}`" for v in self.env.get(path, []))
        row = Row(
            key=f"`{path}`",
            type=type_text,
            default=default,
            constraints="; ".join(shape.constraints),
            env=env,
            description=description,
        )
        return row, children

    def _note(self, model: type[BaseModel], name: str) -> Note:
        for cls in model.__mro__:
            key = f"{cls.__name__}.{name}"
            if key in self.notes and name in getattr(cls, "model_fields", {}):
                self.used_notes.add(key)
                return self.notes[key]
        return Note()

    def _middleware_rows(self, prefix: str) -> list[Row]:
        """`middlewares.<name>`: the type, and that type's options beside it."""
        names = ", ".join(f"`{t}`" for t in sorted(self.types))
        return [
            Row(
                key=f"`{prefix}type`",
                type="type name",
                default="required",
                constraints=f"one of {names}",
                env="",
                description="the middleware type; see [Middleware types](#middleware-types)",
            ),
            Row(
                key=f"`{prefix}<option>`",
                type="any",
                default="",
                constraints="",
                env="",
                description="the type's options, written beside `type` (not under an "
                "`options` key); each type's are listed under "
                "[Middleware types](#middleware-types)",
            ),
        ]

    def sections(self) -> tuple[list[Section], list[Section]]:
        """(the schema's sections, the middleware types' sections)."""
        schema = self.walk(self.schema.Config, "", 2, "", title="Top level")
        middleware = [s for t in sorted(self.types) for s in self.middleware_sections(t)]
        unused = set(self.notes) - self.used_notes
        if unused:
            raise SystemExit(f"NOTES name fields that no model has: {sorted(unused)}")
        return schema, middleware

    def middleware_sections(self, type_name: str) -> list[Section]:
        cls = self.types[type_name]
        module = sys.modules[cls.__module__]
        page = DOC_PAGES.get(type_name, DEFAULT_DOC_PAGE)
        summary = _doc(module).split("\n\n")[0]
        summary = re.sub(r"^`type: [a-z_0-9]+`: ", "", summary)
        summary = summary[:1].upper() + summary[1:]
        intro = f"{summary} Explained in [{page.split('#')[0]}]({page})."
        model = options_model(cls)
        prefix = "middlewares.<name>."
        title = f"`{type_name}`"
        if model is None:
            accepted = getattr(module, "_OPTIONS", None)
            if isinstance(accepted, frozenset) and all(isinstance(a, str) for a in accepted):
                names = ", ".join(f"`{a}`" for a in sorted(accepted))
                intro += f" Its options are checked by the middleware itself: {names}."
            else:
                intro += " Its options are checked by the middleware itself (no model)."
            return [Section("", title, anchor("mw", type_name), intro, [], 3)]
        sections = self.walk(model, "", 3, prefix, title=f"mw-{type_name}")
        head = sections[0]
        head.title, head.intro = title, intro + (" " + head.intro if head.intro else "")
        for sub in sections[1:]:
            sub.anchor = anchor("mw", type_name, sub.path.removeprefix(prefix))
            sub.level = 4
        # Links inside this type's tables point at its own sub-sections.
        for sect in sections:
            for row in sect.rows:
                row.type = re.sub(
                    r"\(#middlewares-name-([^)]*)\)",
                    lambda m: f"(#{anchor('mw', type_name, m.group(1))})",
                    row.type,
                )
        return sections

    # --- rendering

    def render(self) -> str:
        schema, middleware = self.sections()
        out = [HEADER, "## Contents\n", "- [Top level](#top-level)"]
        out += [
            f"- [{s.title}](#{s.anchor})" for s in schema if s.level == 2 and s is not schema[0]
        ]
        types_list = ", ".join(f"[`{t}`](#{anchor('mw', t)})" for t in sorted(self.types))
        out.append(f"- [Middleware types](#middleware-types): {types_list}")
        out.append("- [Environment variables](#environment-variables)\n")
        out += [_section(s) for s in schema]
        out.append('<a id="middleware-types"></a>\n\n## Middleware types\n')
        out.append(MIDDLEWARE_INTRO)
        out += [_section(s) for s in middleware]
        out.append(self._env_section())
        return "\n".join(out).rstrip("\n") + "\n"

    def _env_section(self) -> str:
        lines = ['<a id="environment-variables"></a>\n', "## Environment variables\n", ENV_INTRO]
        lines.append("| Variable | Key | Value |")
        lines.append("|---|---|---|")
        for var in self.loader.ENV_VARS:
            key = (
                "`entrypoints.<name>.address` of the only entrypoint"
                if var.key == "listen"
                else f"`{var.key}`"
            )
            lines.append(f"| `{var.name}` | {key} | {ENV_KINDS.get(var.kind, var.kind)} |")
        others = ", ".join(f"`{v}`" for v in sorted(self.loader.OTHER_ENV_VARS))
        lines.append(
            f"\nRead elsewhere, not configuration keys (known, so not warned about): {others}."
        )
        return "\n".join(lines) + "\n"


def _section(sect: Section) -> str:
    parts = [f'<a id="{sect.anchor}"></a>\n', f"{'#' * sect.level} {sect.title}\n"]
    if sect.intro:
        parts.append(sect.intro + "\n")
    if sect.rows:
        parts.append(_table(sect.rows))
    return "\n".join(parts)


def _table(rows: list[Row]) -> str:
    with_env = any(r.env for r in rows)
    head = ["Key", "Type", "Default", "Constraints"] + (["Env"] if with_env else [])
    head.append("Description")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.key, r.type, r.default, r.constraints] + ([r.env] if with_env else [])
        cells.append(r.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# How the value of each kind of variable is written (loader._PARSERS keys).
ENV_KINDS = {
    "int": "integer",
    "float": "seconds",
    "bool": "true/false",
    "level": "debug/info/warning/error",
    "address": "host:port",
    "path": "`-`, `stderr` or a file path",
    "log_format": "json/common/combined",
}

HEADER = """\
# Configuration reference

<!-- GENERATED by tools/gen_config_reference.py from the code: do not edit by hand.
     Regenerate with `make reference`; tests/unit/test_config_reference.py fails when stale. -->

Every key fastgate's configuration file accepts, read from the models that validate it
(`fastgate/config/schema.py` and each middleware type's options model). For the ideas behind
the keys, examples and the rules that span several keys, read
[configuration.md](configuration.md) and the page each section links to.

How to read the tables:

- **Key** is the full key path. `<name>` stands for a name you choose (an entrypoint, a
  service, a middleware...); `[]` means "each item of the list".
- **Default** is the value when the key is absent; `required` keys have none. A section
  (a mapping of keys) has no default of its own: its keys have theirs.
- **Constraints**: `a..b` is an inclusive range; `one of` lists every accepted value.
- **Env** is the `FASTGATE_*` variable that overrides the key (see
  [Environment variables](#environment-variables)). Any string value in the file may also
  read the environment as `${VAR}` or `${VAR:-default}`.
- Durations are seconds (fractions allowed). Unknown keys are errors everywhere.
"""

MIDDLEWARE_INTRO = """\
A middleware is declared under `middlewares.<name>` with its `type` and, beside it, that
type's options. The options are validated when the configuration is compiled (`fastgate
check` and every reload do it too). Key paths below start at the middleware:
`middlewares.<name>.rate` is `rate` beside `type: rate_limit`.
"""

ENV_INTRO = """\
Precedence, lowest first: schema defaults < the file < `FASTGATE_*` variables < the command
line. Booleans accept `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`. For
`FASTGATE_ENTRYPOINT_<NAME>_ADDRESS`, `<NAME>` is the entrypoint name upper-cased with `-` and
`.` written as `_`. `FASTGATE_LISTEN` is an error when the file has several entrypoints.
"""


# --- middleware discovery -----------------------------------------------------------------------


def load_middleware_types() -> dict[str, type]:
    """Import every module of fastgate.middleware (each registers its class) and return the
    registry's `type` -> class map."""
    import fastgate.middleware
    from fastgate.middleware import registry

    for info in pkgutil.iter_modules(fastgate.middleware.__path__):
        if info.name not in _NOT_MIDDLEWARES and not info.name.startswith("_"):
            importlib.import_module(f"fastgate.middleware.{info.name}")
    return dict(registry._TYPES)


def options_model(cls: type) -> type[BaseModel] | None:
    """The pydantic model a middleware validates its options with: an `options_model` class
    attribute, else `<ClassName>Options` in the class's module; None when there is none."""
    candidates = [
        getattr(cls, "options_model", None),
        getattr(sys.modules[cls.__module__], f"{cls.__name__}Options", None),
    ]
    for model in candidates:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model
    return None


# --- entry point ------------------------------------------------------------------------------


def generate() -> str:
    """The reference as Markdown text."""
    return Reference().render()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="the file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run `make reference`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
