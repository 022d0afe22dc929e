"""atheris harness for the router (`fastgate._core.router`): random route tables and requests,
each lookup checked against the naive oracle of tests/unit/test_router.py.

Run it through `python tests/fuzz/run_fuzz.py --target router`, or by hand:
`PYTHONPATH=. python tests/fuzz/fuzz_router.py CORPUS_DIR -max_total_time=60` (file arguments
replay a crash file instead).

An input is text, one item per line (LF), fields split on single spaces, so that a seed reads
as a table and a crash file as a test case:

    R <exact|prefix|regex> <path> [h=<host>,<host>...] [m=<METHOD>,...] [p=<priority>]
    Q <method> <host, or - for none> [<path, empty when left out>]

Every route line also asks for its own path (with its first host and method), so that most
lookups hit something. Lines of any other shape are ignored.

Rules this file obeys:
- The router is compiled Cython, which atheris cannot instrument: its coverage feedback comes
  from this file and the oracle (instrumented), and the bugs are found by the oracle. The
  oracle is test_router.py's own (`oracle()`: scan every route, keep the matches, take the
  largest key), imported, never copied.
- Documented refusals are not findings: RouteSpec raises ValueError for an invalid field
  (the line is dropped). Any other exception from RouteSpec, Router or match is a crash, and
  so is any lookup where the router and the oracle disagree.
- Route fields are read as UTF-8 (request paths stay bytes), so a regex on a UTF-8 path works.
- Regex routes exercise the router, not Python's `re` engine: a pattern with a repeated
  group that holds a quantifier, or more than three quantifiers, is dropped (catastrophic
  backtracking would be a timeout in both the router and the oracle, and a route's regex is
  operator input).
- Bounded: at most MAX_ROUTES routes, MAX_REQUESTS requests, paths of MAX_PATH bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from fastgate._core.router import Router, RouteSpec

HERE = Path(__file__).resolve().parent
ORACLE_DIR = HERE.parent / "unit"
ORACLE = "test_router"

MAX_ROUTES = 32
MAX_REQUESTS = 48
MAX_PATH = 256
MAX_QUANTIFIERS = 3
QUANTIFIERS = "*+?{"

_oracle: ModuleType | None = None


def oracle() -> ModuleType:
    """tests/unit/test_router.py (imported once, from its directory, under its own name)."""
    global _oracle
    if _oracle is None:
        if str(ORACLE_DIR) not in sys.path:
            sys.path.insert(0, str(ORACLE_DIR))
        _oracle = __import__(ORACLE)
    return _oracle


def safe_regex(pattern: str) -> bool:
    """A pattern the backtracking engine runs in small polynomial time (see the rules): no
    repeated group holding a quantifier, few quantifiers. Escapes and classes are not parsed,
    which only drops more patterns than needed."""
    if sum(pattern.count(q) for q in QUANTIFIERS) > MAX_QUANTIFIERS:
        return False
    opens: list[int] = []
    for i, c in enumerate(pattern):
        if c == "(":
            opens.append(i)
        elif c == ")" and opens:
            start = opens.pop()
            quantified = pattern[i + 1 : i + 2] in ("*", "+", "{")  # "?" repeats nothing
            if quantified and any(q in pattern[start:i] for q in QUANTIFIERS):
                return False
    return True


def route_from(fields: list[bytes], index: int) -> RouteSpec | None:
    """A RouteSpec from an `R` line, or None when the line is off-format or RouteSpec refuses
    it (ValueError, the documented refusal)."""
    if len(fields) < 3:
        return None
    kind, path = fields[1].decode("latin-1"), fields[2].decode("utf-8", "replace")
    if kind == "regex" and not safe_regex(path):
        return None
    options: dict[str, object] = {}
    for field in fields[3:]:
        key, _, value = field.decode("latin-1").partition("=")
        if key == "h":
            options["hosts"] = value.split(",")
        elif key == "m":
            options["methods"] = value.split(",")
        elif key == "p":
            try:
                options["priority"] = int(value)
            except ValueError:
                return None
    try:
        return RouteSpec(target=f"r{index}", path=path, path_type=kind, **options)
    except ValueError:
        return None


def parse(data: bytes) -> tuple[list[RouteSpec], list[tuple[bytes | None, bytes, bytes]]]:
    """The route table and the requests an input describes."""
    specs: list[RouteSpec] = []
    requests: list[tuple[bytes | None, bytes, bytes]] = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if fields[0] == b"R" and len(specs) < MAX_ROUTES:
            spec = route_from(fields, len(specs))
            if spec is not None:
                specs.append(spec)
                host = spec.hosts[0].encode() if spec.hosts else None
                method = spec.methods[0].encode() if spec.methods else b"GET"
                if spec.path_type != "regex":
                    requests.append((host, spec.path.encode(), method))
        elif fields[0] == b"Q" and len(fields) >= 3:
            host = None if fields[2] == b"-" else fields[2]
            path = fields[3] if len(fields) > 3 else b""
            requests.append((host, path[:MAX_PATH], fields[1]))
    return specs, requests[:MAX_REQUESTS]


def TestOneInput(data: bytes) -> None:  # the name atheris and libFuzzer look for
    """Build the table, then every lookup must equal the oracle's answer."""
    specs, requests = parse(data)
    router = Router(specs)
    assert len(router) == len(specs)
    want = oracle().oracle
    for host, path, method in requests:
        got = router.match(host, path, method)
        expected = want(specs, host, path, method)
        assert got == expected, (specs, host, path, method, got, expected)


def main(argv: list[str]) -> None:
    """Fuzz (a corpus directory argument) or replay (file arguments) under libFuzzer."""
    import atheris  # only the fuzzing entry point needs it; the tests replay without it

    # The oracle and this harness are Python and instrumented; the router is a C extension.
    with atheris.instrument_imports(include=[ORACLE]):
        oracle()
    atheris.instrument_func(route_from)
    atheris.instrument_func(parse)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
