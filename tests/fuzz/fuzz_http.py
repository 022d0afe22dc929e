"""atheris harness for fastgate's HTTP framing: request heads, response heads, chunked bodies.

Run it through `python tests/fuzz/run_fuzz.py --target http` (a copy of the corpus, bounded
time), or by hand: `PYTHONPATH=. python tests/fuzz/fuzz_http.py CORPUS_DIR -max_total_time=60`;
with file arguments instead of a directory it replays them (a crash file, to reproduce it).

Rules this file obeys:
- The parsers under test are compiled Cython (`fastgate._core.httphead`, `.body`): atheris
  cannot instrument them, so its coverage feedback comes from the Python oracle it does
  instrument (the classifier of tests/differential) and from the input's shape. The bugs are
  found by the oracles below, not by a sanitizer.
- One oracle, not two: the differential check against llhttp (httptools) is the one of
  tests/differential/test_httphead_vs_httptools.py, imported, never copied. When fastgate
  accepts a head, llhttp must too and agree on method, target, version, headers, framing and
  keep-alive; when fastgate accepts a chunked body, the payload must equal llhttp's. A
  difference is allowed only when that module lists it (fastgate stricter per RFC 9112, with
  the exact status). Anything else raises AssertionError, which atheris reports as a crash.
- Invariants of our own, on top: a request parsed with small Limits is either refused with
  431/414 or reads exactly as with the default limits (a limit only cuts, never changes a
  reading); a response accepted for GET is accepted for HEAD with the same fields and no body;
  every refusal is an HttpError with a documented status and a non-empty reason.
- Exemptions from the differential are judged from the input bytes (never from our own
  verdict alone) and each is tested in tests/unit/test_fuzz_harness.py: documented size limits
  llhttp does not have, a chunk size line not finished yet, an http(s) target with an empty
  host (RFC 9110 §4.2.1: MUST reject), a bodiless response. A fastgate bug found here is
  fixed and pinned in tests/unit/test_fuzz_regressions.py, never exempted for long.
- Any other exception escaping the parsers (TypeError, SystemError, MemoryError...) is a crash.
- No I/O, no randomness: the same input always gives the same verdict, so a crash file
  replays (the README says how to turn one into a test).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httptools

from fastgate._core.body import ChunkedScanner
from fastgate._core.httphead import (
    DEFAULT_LIMITS,
    FRAMING_CHUNKED,
    FRAMING_NONE,
    MAX_HEADERS_CAP,
    RESPONSE_MAX_HEAD_BYTES,
    Limits,
    parse_request,
    parse_response,
)
from fastgate.errors import HttpError

HERE = Path(__file__).resolve().parent
DIFFERENTIAL_DIR = HERE.parent / "differential"
DIFFERENTIAL = "test_httphead_vs_httptools"

# Documented refusal statuses (fastgate/_core/httphead.pyi, body.pyi).
REQUEST_STATUSES = frozenset({400, 414, 431, 501, 505})
RESPONSE_STATUSES = frozenset({502})

# Small enough that short fuzz inputs reach every limit; the defaults need 16 KiB heads.
SMALL_LIMITS = Limits(max_head_bytes=256, max_headers=6, max_target=48)
LIMIT_STATUSES = frozenset({414, 431})
HEX_DIGITS = b"0123456789abcdefABCDEF"
RESPONSE_SIZE_REASONS = frozenset({"response head too large", "too many headers"})
# fastgate/_core/body.pyx: MAX_SIZE_LINE and the default max_trailer_bytes, and their reasons
MAX_SIZE_LINE = 4096
MAX_TRAILER_BYTES = 16384
CHUNK_SIZE_REASONS = frozenset({"chunk size line too long", "trailer section too large"})

_oracle: ModuleType | None = None


def oracle() -> ModuleType:
    """The differential module (imported once, from its directory, under its own name)."""
    global _oracle
    if _oracle is None:
        if str(DIFFERENTIAL_DIR) not in sys.path:
            sys.path.insert(0, str(DIFFERENTIAL_DIR))
        _oracle = __import__(DIFFERENTIAL)
    return _oracle


def _request(data: bytes, limits: Limits | None = None):
    """(head, n) or the HttpError status, checking that a refusal is documented."""
    try:
        return parse_request(data, limits)
    except HttpError as exc:
        assert exc.status in REQUEST_STATUSES, (data, exc)
        assert isinstance(exc.reason, str) and exc.reason, (data, exc)
        return exc.status


def _fields(head) -> tuple:
    return (
        head.raw,
        head.method,
        head.target,
        head.path,
        head.query,
        head.host,
        head.version,
        head.framing,
        head.content_length,
        head.keep_alive,
        head.upgrade,
        head.expect_continue,
        head.headers(),
    )


def check_limits(data: bytes) -> None:
    """Small limits refuse with 431/414 or read the head exactly as the default limits do."""
    small = _request(data, SMALL_LIMITS)
    full = _request(data)
    if isinstance(small, int):
        if small in LIMIT_STATUSES:
            assert over_limits(data, SMALL_LIMITS), (data, small)
        else:
            assert small == full, (data, small, full)
    elif small[0] is None:
        assert full == (None, 0), (data, full)
    else:
        assert not isinstance(full, int) and full[1] == small[1], (data, small, full)
        assert _fields(small[0]) == _fields(full[0]), data


def over_limits(data: bytes, limits: Limits | None = None, response: bool = False) -> bool:
    """The head breaks a documented size limit (head bytes, header lines, target length),
    judged from the bytes alone."""
    limits = limits or DEFAULT_LIMITS
    max_head = RESPONSE_MAX_HEAD_BYTES if response else limits.max_head_bytes
    max_headers = MAX_HEADERS_CAP if response else limits.max_headers
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 4]
    if (end < 0 and len(data) >= max_head) or len(head) > max_head:
        return True
    if head.count(b"\n") - 2 > max_headers:  # every line ends in LF: start, fields, empty
        return True
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return not response and len(parts) > 1 and len(parts[1]) > limits.max_target


@dataclass
class Walk:
    """A chunked body read leniently from its bytes: the size lines with a CRLF, the last size
    line still without one (None when there is none), the trailer section (None before it)."""

    lines: list[bytes]
    open_line: bytes | None = None
    trailers: bytes | None = None


def walk_chunks(body: bytes) -> Walk:
    walk, pos = Walk([]), 0
    while pos < len(body):
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            walk.open_line = body[pos:]
            return walk
        line = body[pos:eol]
        walk.lines.append(line)
        digits = re.match(rb"[0-9A-Fa-f]{1,16}", line)
        if digits is None:
            return walk
        size = int(digits.group(), 16)
        if size == 0:
            end = body.find(b"\r\n\r\n", eol)
            walk.trailers = body[eol + 2 :] if end < 0 else body[eol + 2 : end + 2]
            return walk
        pos = eol + 2 + size
        if body[pos : pos + 2] != b"\r\n":
            return walk  # data overrun, or not all here yet: no further size line
        pos += 2
    return walk


def chunks_over_limits(body: bytes) -> bool:
    """A size line over MAX_SIZE_LINE or a trailer section over the default trailer bound."""
    walk = walk_chunks(body)
    lines = [*walk.lines, walk.open_line or b""]
    return any(len(line) > MAX_SIZE_LINE for line in lines) or (
        walk.trailers is not None and len(walk.trailers) > MAX_TRAILER_BYTES
    )


def unfinished_size_line(body: bytes, seen) -> bool:
    """The body ends inside a size line on which the scanner and llhttp already differ: the
    scanner waits where llhttp refused, or refused where llhttp waits.

    The scanner judges a size line's extensions when its CRLF arrives (a space after the size
    may still be the BWS before ";"; extension octets are checked, their grammar is not: RFC
    9112 §7.1.1), and a size past 16 digits or 2**63-1 at once. The differential judges
    finished size lines only, so an unfinished one is judged here by the verdict the line gets
    once finished with CRLF: check_chunked on that must pass (a crash otherwise).
    """
    walk = walk_chunks(body)
    if walk.open_line is None or walk.trailers is not None:
        return False
    scanner = ChunkedScanner()
    try:
        scanner.feed(body)
    except HttpError:
        refused = True
    else:
        refused = False
        if scanner.done:
            return False
    llhttp_refused = seen.error is not None and "chunk" in str(seen.error)
    if refused == llhttp_refused or (refused and seen.error is not None):
        return False
    check_chunked(body + b"\r\n")
    return True


def exempt(data: bytes, response: bool) -> bool:
    """Whether the input falls under a rule judged here rather than by the differential.

    llhttp has no size limits, so the differential does not list them: a 431/414 (a 502
    "too large"/"too many headers" for a response), or a chunked body refused for a long size
    line or trailer section, is exempt when the bytes bear it out, and a crash when they do
    not. So are a chunked body ending in a size line judged differently (unfinished_size_line),
    an http(s) target or Host with an empty host (empty_uri_host, empty_host_with_port), a
    bodiless response (bodiless_response).
    """
    try:
        head, n = parse_response(data) if response else parse_request(data)
    except HttpError as exc:
        sized = exc.reason in RESPONSE_SIZE_REASONS if response else exc.status in LIMIT_STATUSES
        if sized:
            assert over_limits(data, response=response), (data, exc)
        empty = not response and (empty_uri_host(data) or empty_host_with_port(data))
        return sized or (exc.status == 400 and empty)
    if head is None:
        return False
    if response and (head.status < 200 or head.status in (204, 304)):
        return bodiless_response(data, head)
    if head.framing != FRAMING_CHUNKED:
        return False
    body = data[n:]
    seen = oracle().llhttp(data, response)
    return chunk_size_refusal(body) or unfinished_size_line(body, seen)


def empty_uri_host(data: bytes) -> bool:
    """The target is an http(s) URI with an empty host ("http://", "http://:80/", "http://[]/").

    RFC 9110 §4.2.1/§4.2.2: a recipient MUST reject such a URI as invalid, so the 400 is right;
    the differential's grammar admits an empty reg-name and llhttp accepts it, so it is judged
    here (an oracle gap to close in tests/differential)."""
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3:
        return False
    absolute = oracle().ABSOLUTE_RE.fullmatch(parts[1])
    if absolute is None or parts[1].split(b":", 1)[0].lower() not in (b"http", b"https"):
        return False
    authority = absolute.group(1)
    host = authority[1 : authority.find(b"]")] if authority[:1] == b"[" else authority
    return host.split(b":", 1)[0] == b"" if authority[:1] != b"[" else host == b""


def empty_host_with_port(data: bytes) -> bool:
    """A Host field with a port and an empty host (`Host: :80`, `Host::`): the authority of an
    http URI with an empty host, which RFC 9110 §4.2.1 says to reject (see empty_uri_host)."""
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"host" and value.strip(b" \t")[:1] == b":":
            return True
    return False


def bodiless_response(data: bytes, head) -> bool:
    """A 1xx, 204 or 304 response ends at its empty line whatever CL or TE say (RFC 9112 §6.3
    items 1-2); llhttp reads a body after some of them (a 1xx with Transfer-Encoding), so only
    the head is compared: status and fields as llhttp saw them, and no body for us."""
    diff = oracle()
    seen = diff.llhttp(data, True)
    assert head.framing == FRAMING_NONE, data
    if seen.headers_done:
        want = [(n, v.rstrip(diff.OWS)) for n, v in seen.headers]
        assert (head.status, head.headers()) == (seen.status, want), data
    return True


def chunk_size_refusal(body: bytes) -> bool:
    """The scanner refused the body for a size limit (a long size line, a large trailer
    section); the bytes must bear it out."""
    try:
        ChunkedScanner().feed(body)
    except HttpError as exc:
        if exc.reason in CHUNK_SIZE_REASONS:
            assert chunks_over_limits(body), (body, exc)
            return True
    return False


def check_head_response(data: bytes) -> None:
    """A response accepted after GET is accepted after HEAD: same fields, framing NONE."""
    try:
        head, n = parse_response(data)
    except HttpError as exc:
        assert exc.status in RESPONSE_STATUSES and exc.reason, (data, exc)
        return
    if head is None:
        return
    head2, n2 = parse_response(data, True)
    assert n2 == n and head2.framing == FRAMING_NONE, data
    assert (head2.status, head2.reason, head2.version, head2.headers()) == (
        head.status,
        head.reason,
        head.version,
        head.headers(),
    ), data


def check_chunked(data: bytes) -> None:
    """The chunked scanner, fed whole, byte by byte and with a next request, against llhttp
    (the differential module's own chunked test body, minus hypothesis)."""
    diff = oracle()
    seen = diff.llhttp(diff.CHUNKED_HEAD + data)
    if chunk_size_refusal(data) or unfinished_size_line(data, seen):
        return
    verdict, payload = diff.scan_three_ways(data)
    facts = diff.analyse(diff.CHUNKED_HEAD + data)
    shown = f"body: {data!r}\nllhttp: {seen.verdict} {seen.error!r}\nours: {verdict}"
    if verdict == "done" and seen.complete:
        assert payload == b"".join(seen.body), shown
    elif verdict == "reject" and seen.error is not None and not seen.complete:
        pass
    elif verdict == "pending" and not seen.complete and seen.error is None:
        pass
    elif verdict == "reject":
        rule = diff.classify(diff.WE_REFUSE, facts, seen, 400, "body")
        assert rule is not None, f"we refuse, llhttp does not: unlisted\n{shown}"
    else:
        rule = diff.classify(diff.WE_ACCEPT, facts, seen)
        assert rule is not None, f"llhttp refuses, we do not: unlisted\n{shown}"


def differential(data: bytes, response: bool) -> None:
    """The differential module's check; where httptools' URL parser (the oracle's, not
    llhttp's request parser) refuses a target llhttp accepted, compare_without_parse_url."""
    diff = oracle()
    try:
        diff.differential(data, response=response)
    except httptools.HttpParserInvalidURLError:
        compare_without_parse_url(data)


def compare_without_parse_url(data: bytes) -> None:
    """Both parsers accepted a head whose target httptools.parse_url refuses (it knows too few
    reg-name characters: "~", "!", "$", "_", "%41"... are RFC 3986 §3.2.2). The target must
    then be valid by the differential's own grammar, and the fields must agree with llhttp and
    with the target split by that grammar."""
    diff = oracle()
    seen = diff.llhttp(data)
    head, _ = parse_request(data)
    shown = f"input: {data!r}\nllhttp: {seen.verdict} {seen.error!r}"
    assert head is not None and seen.headers_done, shown
    assert not diff.target_bad(diff.analyse(data)), shown
    assert (head.method, head.target) == (seen.method, seen.url), shown
    assert head.headers() == [(n, v.rstrip(diff.OWS)) for n, v in seen.headers], shown
    absolute = diff.ABSOLUTE_RE.fullmatch(head.target)
    if absolute is not None:
        want = (absolute.group(1), absolute.group(2) or b"/", absolute.group(3))
    else:
        path, mark, query = head.target.partition(b"?")
        hosts = [v.strip(diff.OWS) for n, v in seen.headers if n.lower() == b"host"]
        want = (hosts[0] if hosts else None, path, query if mark else None)
    assert (head.host, head.path, head.query) == want, shown


def TestOneInput(data: bytes) -> None:  # the name atheris and libFuzzer look for
    """One input through every oracle that fits its shape. A status line makes it a response;
    otherwise it is a request; a leading hex digit also makes it a chunked body."""
    response = data.startswith(b"HTTP/")
    if not exempt(data, response):
        differential(data, response)
    if response:
        check_head_response(data)
    else:
        check_limits(data)
    if data and data[0] in HEX_DIGITS:
        check_chunked(data)


def main(argv: list[str]) -> None:
    """Fuzz (a corpus directory argument) or replay (file arguments) under libFuzzer."""
    import atheris  # only the fuzzing entry point needs it; the tests replay without it

    # Instrument the Python oracle so its branches guide the fuzzer; the Cython parsers are
    # C extensions, which instrument_imports() passes over.
    with atheris.instrument_imports(include=[DIFFERENTIAL]):
        oracle()
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
