"""Fuzzing findings as plain tests, and every HTTP seed of tests/fuzz/corpus/http asserted
against the documented result of the parser (fastgate/_core/httphead.pyi, body.pyi).

The seed table doubles as the list of smuggling and edge shapes the fuzzer starts from: a seed
added to the corpus must get a row here (test_every_seed_has_a_row), so the corpus cannot
drift from the documented behaviour. Seeds are named by kind: `req-*` a request (parsed with
parse_request), `resp-*` a response (parse_response), `chunk-*` a chunked body on its own
(ChunkedScanner). A row gives the framing of an accepted head, or the exact HttpError status;
for a chunked body "done"/"pending" and the payload so far, or 400.

How to add a finding: README.md of tests/fuzz ("From a crash to a regression test").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastgate._core import httphead
from fastgate._core.body import ChunkedScanner
from fastgate._core.httphead import parse_request, parse_response
from fastgate.errors import HttpError

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "http"

NONE = httphead.FRAMING_NONE
LENGTH = httphead.FRAMING_LENGTH
CHUNKED = httphead.FRAMING_CHUNKED
CLOSE = httphead.FRAMING_CLOSE

# name -> framing of the accepted head, or the HttpError status
HEADS = {
    # accepted requests
    "req-get-minimal": NONE,
    "req-get-query": NONE,
    "req-http10-no-host": NONE,  # Host is required in HTTP/1.1 only (RFC 9112 §3.2)
    "req-http10-keepalive": NONE,
    "req-post-content-length": LENGTH,
    "req-post-chunked": CHUNKED,
    "req-chunked-extensions": CHUNKED,
    "req-te-uppercase": CHUNKED,  # codings are case-insensitive (RFC 9110 §10.1.4)
    "req-te-empty-element": CHUNKED,  # empty list elements are ignored (RFC 9110 §5.6.1.2)
    "req-absolute-form": NONE,
    "req-options-asterisk": NONE,
    "req-ipv6-host": NONE,
    "req-empty-host": NONE,  # an empty Host is valid (RFC 9112 §3.2)
    "req-upgrade-websocket": NONE,
    "req-expect-continue": LENGTH,
    "req-pipelined": NONE,
    "req-identical-content-length": LENGTH,  # identical values merge (RFC 9110 §8.6)
    "req-extension-method": NONE,
    "req-obs-text-value": NONE,
    "req-tab-in-value": NONE,
    "req-connection-names-framing": LENGTH,  # Connection cannot strip the framing fields
    "req-long-header-line": NONE,
    # refused requests: request smuggling shapes (RFC 9112 §6.1, §6.3, §11.2)
    "req-cl-and-te": 400,
    "req-te-and-cl": 400,
    "req-te-chunked-q": 501,  # a coding other than a lone `chunked`
    "req-te-gzip-chunked": 501,
    "req-te-xchunked": 501,
    "req-te-chunked-twice": 400,
    "req-te-http10": 400,
    "req-te-space-before-colon": 400,
    "req-te-obs-fold": 400,
    "req-te-vertical-tab": 400,
    "req-cl-differing": 400,
    "req-cl-list-differing": 400,
    "req-cl-plus-sign": 400,
    "req-cl-negative": 400,
    "req-cl-19-digits": 400,  # at most 18 digits: no int64 overflow
    "req-cl-hex": 400,
    # refused requests: line and field syntax (RFC 9112 §2.2, §3, §5)
    "req-obs-fold": 400,
    "req-bare-lf": 400,
    "req-bare-lf-in-head": 400,
    "req-bare-cr": 400,
    "req-nul-in-value": 400,
    "req-nul-in-target": 400,
    "req-ctl-in-value": 400,
    "req-del-in-value": 400,
    "req-space-before-colon": 400,
    "req-space-in-name": 400,
    "req-empty-name": 400,
    "req-no-colon": 400,
    "req-no-host-http11": 400,
    "req-duplicate-host": 400,
    "req-host-with-space": 400,
    "req-host-userinfo": 400,
    "req-absolute-userinfo": 400,
    "req-absolute-ftp": 400,
    "req-fragment": 400,
    "req-asterisk-get": 400,
    "req-double-space": 400,
    "req-tab-separator": 400,
    "req-leading-crlf": 400,
    "req-leading-space-field": 400,
    "req-non-token-method": 400,
    "req-http09-simple": 400,
    "req-version-garbage": 400,
    "req-version-lowercase": 400,
    "req-version-2": 505,
    "req-version-0-9": 505,
    "req-connect": 501,
    # refused requests: size limits (Limits defaults)
    "req-too-many-headers": 431,
    "req-head-too-large": 431,
    "req-long-target": 414,
    # responses: accepted
    "resp-200-content-length": LENGTH,
    "resp-200-chunked": CHUNKED,
    "resp-te-gzip-chunked": CHUNKED,  # final coding chunked: relayed as is
    "resp-close-delimited": CLOSE,
    "resp-http10": LENGTH,
    "resp-no-reason": LENGTH,
    "resp-empty-reason": LENGTH,
    "resp-204": NONE,
    "resp-304-with-length": NONE,
    "resp-100-continue": NONE,
    # responses: every fault is the gateway's 502
    "resp-cl-and-te": 502,
    "resp-te-gzip": 502,
    "resp-cl-differing": 502,
    "resp-obs-fold": 502,
    "resp-bare-lf": 502,
    "resp-status-999": 502,
    "resp-status-two-digits": 502,
    "resp-version-2": 502,
    "resp-nul-in-reason": 502,
    "resp-space-before-colon": 502,
}

# name -> ("done" | "pending", payload so far, bytes consumed) or 400
CHUNKS = {
    "chunk-simple": ("done", b"hello", 15),
    "chunk-uppercase-hex": ("done", b"0123456789", 20),
    "chunk-16-digits": ("done", b"hello", 30),
    "chunk-extension": ("done", b"hello", 26),
    "chunk-extension-quoted": ("done", b"hello", 26),
    "chunk-bws-extension": ("done", b"hello", 18),
    "chunk-trailer": ("done", b"", 28),
    "chunk-then-next-request": ("done", b"", 5),  # the next request is left over
    "chunk-incomplete": ("pending", b"hel", 6),
    "chunk-size-max": ("pending", b"abc", 21),  # 2**63-1 is a valid size
    "chunk-17-digits": 400,
    "chunk-size-over-int63": 400,
    "chunk-size-ffff-overflow": 400,
    "chunk-0x-size": 400,
    "chunk-negative-size": 400,
    "chunk-empty-size": 400,
    "chunk-space-after-size": 400,
    "chunk-bare-lf": 400,
    "chunk-bare-cr": 400,
    "chunk-data-overrun": 400,
    "chunk-nul-in-extension": 400,
    "chunk-long-extension": 400,
    "chunk-trailer-obs-fold": 400,
    "chunk-trailer-bad-name": 400,
}


def head_outcome(data: bytes, response: bool) -> int:
    try:
        head, n = parse_response(data) if response else parse_request(data)
    except HttpError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return exc.status
    assert head is not None and n == len(head.raw) and data.startswith(head.raw)
    return head.framing


def chunk_outcome(data: bytes) -> tuple[str, bytes, int] | int:
    scanner = ChunkedScanner(collect=True)
    try:
        used = scanner.feed(data)
    except HttpError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return exc.status
    return ("done" if scanner.done else "pending", scanner.payload, used)


def test_every_seed_has_a_row() -> None:
    names = {p.name for p in CORPUS.iterdir()}
    assert names == set(HEADS) | set(CHUNKS)


@pytest.mark.parametrize(("name", "expected"), [pytest.param(n, e, id=n) for n, e in HEADS.items()])
def test_head_seed(name: str, expected: int) -> None:
    data = (CORPUS / name).read_bytes()
    assert head_outcome(data, response=name.startswith("resp-")) == expected


@pytest.mark.parametrize(
    ("name", "expected"), [pytest.param(n, e, id=n) for n, e in CHUNKS.items()]
)
def test_chunk_seed(name: str, expected: tuple[str, bytes, int] | int) -> None:
    assert chunk_outcome((CORPUS / name).read_bytes()) == expected


def test_connection_cannot_strip_framing() -> None:
    """req-connection-names-framing: Content-Length and Host stay, named or not."""
    head, _ = parse_request((CORPUS / "req-connection-names-framing").read_bytes())
    assert (head.framing, head.content_length, head.host) == (LENGTH, 2, b"a")
    flags = dict(zip([n.lower() for n, _ in head.headers()], head.header_flags(), strict=True))
    assert not flags[b"content-length"] & httphead.HF_HOP
    assert not flags[b"host"] & httphead.HF_HOP


# ---------------------------------------------------------------------------------------------
# Findings. None of these is a parser bug: each was an input the fuzzer's oracle could not
# classify, where fastgate's answer is the documented one; the test pins that answer.

FINDINGS = [
    pytest.param(
        # atheris, fuzz_http: llhttp refuses the obs-text octet in the extension name at once;
        # the scanner checks extension octets only (obs-text is allowed) and judges the line
        # at its CRLF.
        b'5;n\xd3="as\x9a',
        ("pending", b"", 9),
        ("pending", b"hello", 16),
        id="obs-text in an unfinished chunk extension",
    ),
    pytest.param(
        # atheris, fuzz_http: "F " may be the BWS before ";" (RFC 9112 §7.1.1), so the scanner
        # waits; llhttp refuses the space at once. Finished by CRLF, both refuse.
        b"F ",
        ("pending", b"", 2),
        400,
        id="space after a chunk size, line unfinished",
    ),
    pytest.param(
        # atheris, fuzz_http: the scanner refuses a size past 2**63-1 as soon as its digits
        # show it ("chunk size overflow"); llhttp waits for the CRLF.
        b"80000000000000bc",
        400,
        400,
        id="size past 2**63-1 refused before its CRLF",
    ),
]


@pytest.mark.parametrize(("body", "now", "finished"), FINDINGS)
def test_finding(body: bytes, now: tuple[str, bytes, int] | int, finished) -> None:
    assert chunk_outcome(body) == now
    assert chunk_outcome(body + b"\r\nhello") == finished


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(b"Transfer-Encoding: chunked", id="Transfer-Encoding"),
        pytest.param(b"Content-Length: 5", id="Content-Length"),
    ],
)
def test_framing_field_in_trailers_refused(field: bytes) -> None:
    """atheris, fuzz_http (fixed): framing fields in the trailer section are
    refused, as llhttp does (RFC 9110 §6.5.1, RFC 9112 §7.1.2)."""
    assert chunk_outcome(b"0\r\n" + field + b"\r\n\r\n") == 400


EMPTY_HOST_TARGETS = [
    # atheris, fuzz_http: llhttp accepts these, the differential's grammar admits them; RFC 9110
    # §4.2.1 says a recipient MUST reject an http URI with an empty host, as fastgate does.
    pytest.param(b"http://", id="no authority"),
    pytest.param(b"http://?up@/", id="query right after //"),
    pytest.param(b"http://:80/", id="port only"),
    pytest.param(b"https:///x", id="https, empty"),
    pytest.param(b"http://[]/", id="empty brackets"),
]


@pytest.mark.parametrize("target", EMPTY_HOST_TARGETS)
def test_empty_host_in_absolute_form_refused(target: bytes) -> None:
    assert head_outcome(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", False) == 400


def test_reg_name_characters_accepted() -> None:
    """atheris, fuzz_http: httptools.parse_url refuses these RFC 3986 reg-names; fastgate
    accepts them and splits host, path and query as written."""
    head, _ = parse_request(b"GET http://a.examp~le/p?q=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (head.host, head.path, head.query) == (b"a.examp~le", b"/p", b"q=1")
    head, _ = parse_request(b"GET http://a_b!$'=:/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (head.host, head.path, head.query) == (b"a_b!$'=:", b"/", None)


@pytest.mark.parametrize("host", [b"Host::", b"Host: :80", b"host: :"])
def test_empty_host_with_port_refused(host: bytes) -> None:
    """atheris, fuzz_http: an empty host with a port is refused (llhttp accepts it)."""
    assert head_outcome(b"GET / HTTP/1.1\r\n" + host + b"\r\n\r\n", False) == 400


def test_interim_response_with_transfer_encoding_has_no_body() -> None:
    """atheris, fuzz_http: a 199 with Transfer-Encoding ends at its empty line (RFC 9112 §6.3);
    llhttp went on to read a chunked body after it."""
    data = b"HTTP/1.1 199 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe"
    head, n = parse_response(data)
    assert (head.status, head.framing, n) == (199, NONE, data.index(b"5\r\n"))


def test_cl_equal_only_as_numbers_refused() -> None:
    """atheris, fuzz_http: "1" and "01" are merged as one Content-Length; llhttp refuses, and
    RFC 9110 §8.6 lets a recipient merge identical values only."""
    data = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\ncontent-length:01\r\n\r\nx"
    assert head_outcome(data, False) == 400
