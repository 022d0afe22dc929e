"""The fuzz harnesses (tests/fuzz) in the suite, two ways:

- in process: each harness's TestOneInput over its whole seed corpus (fast, no atheris needed),
  plus the harness helpers that decide what is exempt from the differential, table-driven, so
  an exemption cannot quietly widen;
- a bounded real atheris pass per target through run_fuzz.py (20 s each, both at once). It
  needs atheris: skipped without it locally, a failure under CI=true.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz_http  # noqa: E402  (tests/fuzz is put on sys.path just above)
import fuzz_router  # noqa: E402
import run_fuzz  # noqa: E402

HARNESSES = {"http": fuzz_http, "router": fuzz_router}
BOUNDED = 20  # seconds of fuzzing per target
RUN = [sys.executable, str(FUZZ / "run_fuzz.py")]


def seeds(target: str) -> list[Path]:
    return sorted((FUZZ / "corpus" / target).iterdir())


def test_targets_have_harness_and_corpus() -> None:
    assert set(run_fuzz.TARGETS) == set(HARNESSES)
    for target in run_fuzz.TARGETS:
        files = seeds(target)
        assert 20 <= len(files) <= 150, (target, len(files))
        # libFuzzer cuts inputs at -max_len: a longer seed would be fuzzed truncated.
        assert all(0 < p.stat().st_size <= run_fuzz.MAX_LEN[target] for p in files), target


@pytest.mark.parametrize(
    ("target", "path"),
    [pytest.param(t, p, id=f"{t}/{p.name}") for t in HARNESSES for p in seeds(t)],
)
def test_seed_passes_every_oracle(target: str, path: Path) -> None:
    HARNESSES[target].TestOneInput(path.read_bytes())


# ---------------------------------------------------------------------------------------------
# The exemptions of fuzz_http, judged from the bytes

G = b"GET / HTTP/1.1\r\nHost: a\r\n"

OVER_LIMITS = [
    pytest.param(G + b"\r\n", False, False, id="small head"),
    pytest.param(G + b"X: " + b"a" * 16400, False, True, id="no end within max_head_bytes"),
    pytest.param(G + b"X: v\r\n" * 100 + b"\r\n", False, True, id="101 header lines"),
    pytest.param(G + b"X: v\r\n" * 99 + b"\r\n", False, False, id="100 header lines"),
    pytest.param(b"GET /" + b"t" * 8192 + b" HTTP/1.1\r\n\r\n", False, True, id="long target"),
    pytest.param(b"GET /" + b"t" * 8190 + b" HTTP/1.1\r\n\r\n", False, False, id="8191 target"),
    pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X:\r\n" * 513 + b"\r\n", True, True, id="513 fields"),
    pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X:\r\n" * 512 + b"\r\n", True, False, id="512 fields"),
]


@pytest.mark.parametrize(("data", "response", "over"), OVER_LIMITS)
def test_over_limits(data: bytes, response: bool, over: bool) -> None:
    assert fuzz_http.over_limits(data, response=response) is over


CHUNK_LIMITS = [
    pytest.param(b"5\r\nhello\r\n0\r\n\r\n", False, id="small body"),
    pytest.param(b"5;" + b"e" * 4094 + b"\r\nhello\r\n", False, id="size line of 4096"),
    pytest.param(b"5;" + b"e" * 4095 + b"\r\nhello\r\n", True, id="size line of 4097"),
    pytest.param(b"5;" + b"e" * 5000, True, id="unterminated long size line"),
    pytest.param(b"1\r\na\r\n5;" + b"e" * 5000, True, id="second size line"),
    pytest.param(b"0\r\n" + b"X: " + b"v" * 16400 + b"\r\n\r\n", True, id="large trailer"),
    pytest.param(b"0\r\nX: v\r\n\r\n", False, id="small trailer"),
    pytest.param(b"5\r\n" + b"e" * 5000, False, id="long data is no size line"),
]


@pytest.mark.parametrize(("body", "over"), CHUNK_LIMITS)
def test_chunks_over_limits(body: bytes, over: bool) -> None:
    assert fuzz_http.chunks_over_limits(body) is over


def test_size_refusal_must_be_borne_out() -> None:
    """A 431 the bytes do not bear out would be a crash: the check is live."""
    data = G + b"X: v\r\n" * 3 + b"\r\n"
    assert fuzz_http.over_limits(data, fuzz_http.SMALL_LIMITS) is False
    assert fuzz_http.exempt(G + b"X: " + b"a" * 16400, response=False) is True
    assert fuzz_http.exempt(G + b"\r\n", response=False) is False


UNFINISHED = [
    pytest.param(b'5;n\xd3="as\x9a', True, id="obs-text in an unfinished extension"),
    pytest.param(b"5;a", False, id="llhttp waits too"),
    pytest.param(b"F ", True, id="space after the size, maybe BWS"),
    pytest.param(b"1\r\na\r\nF ", True, id="second size line"),
    pytest.param(b"5 x", False, id="we refuse: no wait"),
    pytest.param(b'5;n\xd3="as\x9a\r\nhello\r\n', False, id="line finished"),
    pytest.param(b"80000000000000bc", True, id="we refuse a size past 2**63-1 at once"),
    pytest.param(b"1\r\na\r\n00000000000000001", True, id="we refuse a 17th digit at once"),
    pytest.param(b"8000000000000000\r\n", False, id="size line finished"),
]


@pytest.mark.parametrize(("body", "judged"), UNFINISHED)
def test_unfinished_size_line(body: bytes, judged: bool) -> None:
    diff = fuzz_http.oracle()
    seen = diff.llhttp(diff.CHUNKED_HEAD + body)
    assert fuzz_http.unfinished_size_line(body, seen) is judged


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost::\r\n\r\n", id="empty host with port"),
        pytest.param(
            b"HTTP/1.1 199 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nheHTTP/1.0llo\r\n0\r\n\r\n",
            id="1xx with a chunked body llhttp reads",
        ),
    ],
)
def test_exempt_shapes_pass(data: bytes) -> None:
    assert fuzz_http.exempt(data, data.startswith(b"HTTP/")) is True
    fuzz_http.TestOneInput(data)


def test_empty_host_with_port() -> None:
    assert fuzz_http.empty_host_with_port(b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n")
    assert not fuzz_http.empty_host_with_port(b"GET / HTTP/1.1\r\nHost: a:80\r\n\r\n")
    assert not fuzz_http.empty_host_with_port(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")


PARSE_URL_GAPS = [
    pytest.param(b"GET http://a.examp~le/p?q=1 HTTP/1.1\r\nHost: a\r\n\r\n", id="tilde"),
    pytest.param(b"GET http://a_b:/ HTTP/1.1\r\nHost: a\r\n\r\n", id="underscore, empty port"),
    pytest.param(b"GET http://%41!$'=/x?y HTTP/1.1\r\nHost: a\r\n\r\n", id="sub-delims"),
]


@pytest.mark.parametrize("data", PARSE_URL_GAPS)
def test_targets_httptools_parse_url_refuses(data: bytes) -> None:
    """These valid targets make the differential's expected_fields raise (httptools.parse_url);
    the harness compares them without it, and TestOneInput passes."""
    with pytest.raises(fuzz_http.httptools.HttpParserInvalidURLError):
        fuzz_http.oracle().differential(data)
    fuzz_http.compare_without_parse_url(data)
    fuzz_http.TestOneInput(data)


# ---------------------------------------------------------------------------------------------
# fuzz_router's input format and regex filter

SAFE_REGEX = [
    pytest.param("/v1(/.*)?", True, id="optional group"),
    pytest.param("(a|b)*", True, id="repeated group without quantifier"),
    pytest.param("/[a-z]+/x", True, id="plain quantifier"),
    pytest.param("(a+)+", False, id="nested quantifier"),
    pytest.param("((a)+)*", False, id="deeper nesting"),
    pytest.param("(x.*){2}", False, id="counted repeat of a quantifier"),
    pytest.param("a*a*a*a*b", False, id="too many quantifiers"),
]


@pytest.mark.parametrize(("pattern", "safe"), SAFE_REGEX)
def test_safe_regex(pattern: str, safe: bool) -> None:
    assert fuzz_router.safe_regex(pattern) is safe


def test_router_input_format() -> None:
    data = (
        b"R prefix /api h=*.a.com,b.com m=GET,POST p=2\n"
        b"R glob /x\n"  # refused by RouteSpec: dropped
        b"R exact /e\n"
        b"Q PUT - /api/x\n"
        b"Q GET x.a.com\n"
        b"junk line\n"
    )
    specs, requests = fuzz_router.parse(data)
    assert [(s.target, s.path, s.path_type, s.hosts, s.methods, s.priority) for s in specs] == [
        ("r0", "/api", "prefix", ("*.a.com", "b.com"), ("GET", "POST"), 2),
        ("r1", "/e", "exact", (), (), 0),
    ]
    assert requests == [
        (b"*.a.com", b"/api", b"GET"),
        (None, b"/e", b"GET"),
        (None, b"/api/x", b"PUT"),
        (b"x.a.com", b"", b"GET"),
    ]


# ---------------------------------------------------------------------------------------------
# A real atheris pass


def require_atheris() -> None:
    """pytest.skip without atheris (pytest.fail under CI=true, like require_redis_server)."""
    if importlib.util.find_spec("atheris") is None:
        message = (
            "atheris is not installed: the bounded fuzzing pass needs it "
            "(pip install atheris; x86_64 wheels for CPython 3.11)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.slow
def test_bounded_atheris_pass() -> None:
    """Both targets fuzzed for BOUNDED at once, each on a copy of its corpus."""
    require_atheris()
    procs = {
        target: subprocess.Popen(
            [
                sys.executable,
                str(FUZZ / "run_fuzz.py"),
                "--seconds",
                str(BOUNDED),
                "--target",
                target,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for target in run_fuzz.TARGETS
    }
    before = {t: sorted(p.name for p in seeds(t)) for t in run_fuzz.TARGETS}
    for target, proc in procs.items():
        out, _ = proc.communicate(timeout=BOUNDED + 150)
        assert proc.returncode == 0, out
        match = re.search(rf"^{target}: ok: (\d+) inputs", out, re.M)
        assert match is not None and int(match.group(1)) > 0, out
    # The runner fuzzes a copy: the repository's corpus is untouched.
    assert {t: sorted(p.name for p in seeds(t)) for t in run_fuzz.TARGETS} == before
