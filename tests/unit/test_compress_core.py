"""fastgate._core.compress: negotiate() rules (Accept-Encoding q-values, request and response
checks), and round trips through Encoder feed/finish for every upstream framing (whole input,
every byte boundary, random splits), streaming flushes, bad and truncated chunked input, empty
and large bodies. Decoding the output uses a strict de-chunker written here, so the client
framing is checked too (no zero-size chunk before the end, exact last-chunk)."""

from __future__ import annotations

import os
import re
import zlib
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate._core import compress
from fastgate._core.compress import CompressRule, Encoder, compress_body, negotiate_heads
from fastgate.errors import HttpError

GZIP_LINES = b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
BR_LINES = b"Content-Encoding: br\r\nVary: Accept-Encoding\r\n"
TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(80))


def need_brotli() -> ModuleType:
    """The brotli module; skip without it, except under CI=true where it must be installed."""
    try:
        import brotli
    except ImportError:
        message = "the brotli package is not installed: the br tests need it (pip install brotli)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert compress.BROTLI_AVAILABLE
    return brotli


# ---- heads and decoding ----------------------------------------------------------------------


def request(accept: list[str] | None = None, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} /x HTTP/{version}", "Host: example.test"]
    lines += [f"Accept-Encoding: {value}" for value in accept or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(
    status: int = 200,
    headers: list[str] | None = None,
    length: int | None = 2000,
    chunked: bool = False,
    content_type: str | None = "text/html; charset=utf-8",
) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    lines += headers or []
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


GZ = request(["gzip"])
CHUNKED = response(chunked=True)
CLOSE = response(length=None)


def dechunk(data: bytes, final: bool = True) -> bytes:
    """Strict chunked decoding of what the encoder sent; `final`: must end with the last-chunk."""
    out = []
    i = 0
    while i < len(data) or final:
        j = data.index(b"\r\n", i)
        assert re.fullmatch(rb"[0-9a-f]+", data[i:j]), data[i:j]
        size = int(data[i:j], 16)
        i = j + 2
        if size == 0:
            assert final, "zero-size chunk before the end"
            assert data[i:] == b"\r\n"
            break
        out.append(data[i : i + size])
        assert data[i + size : i + size + 2] == b"\r\n"
        i += size + 2
    return b"".join(out)


def decode(algorithm: str, body: bytes) -> bytes:
    data = dechunk(body)
    if algorithm == "br":
        return need_brotli().decompress(data)
    return zlib.decompress(data, wbits=31)


def to_chunked(body: bytes, sizes: list[int], trailer: bytes = b"") -> bytes:
    """`body` as chunked wire bytes, cut in chunks of `sizes` (cycled), with extensions."""
    out = []
    i = 0
    k = 0
    while i < len(body):
        n = max(1, sizes[k % len(sizes)]) if sizes else len(body)
        piece = body[i : i + n]
        ext = b";x=1" if k % 3 == 1 else b""
        out.append(b"%x%b\r\n%b\r\n" % (len(piece), ext, piece))
        i += n
        k += 1
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


# ---- CompressRule -----------------------------------------------------------------------------


def test_rule_defaults() -> None:
    rule = CompressRule()
    expected = ("br", "gzip") if compress.BROTLI_AVAILABLE else ("gzip",)
    assert rule.algorithms == expected
    assert rule.min_bytes == 1024
    assert rule.gzip_level == 6
    assert rule.brotli_quality == 4
    assert rule.content_types == compress.DEFAULT_CONTENT_TYPES
    assert "text/*" in rule.content_types


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"algorithms": ("zstd",)}, id="unknown algorithm"),
        pytest.param({"algorithms": ("gzip", "gzip")}, id="repeated algorithm"),
        pytest.param({"min_bytes": -1}, id="negative min_bytes"),
        pytest.param({"gzip_level": 0}, id="gzip level 0"),
        pytest.param({"gzip_level": 10}, id="gzip level 10"),
        pytest.param({"brotli_quality": 12}, id="brotli quality 12"),
        pytest.param({"content_types": ("text",)}, id="type without subtype"),
        pytest.param({"content_types": ("*/*",)}, id="wildcard type"),
        pytest.param({"content_types": ("text/x*",)}, id="partial wildcard"),
        pytest.param({"content_types": ("text/html; charset=utf-8",)}, id="parameters"),
    ],
)
def test_rule_refuses(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CompressRule(**kwargs)


def test_encoder_is_not_constructible() -> None:
    with pytest.raises(TypeError):
        Encoder()


# ---- negotiate ---------------------------------------------------------------------------------

GZIP_ONLY = ("gzip",)
BOTH = ("br", "gzip")


@pytest.mark.parametrize(
    ("accept", "algorithms", "expected"),
    [
        pytest.param(None, GZIP_ONLY, None, id="no Accept-Encoding"),
        pytest.param([""], GZIP_ONLY, None, id="empty Accept-Encoding"),
        pytest.param(["gzip"], GZIP_ONLY, "gzip", id="gzip"),
        pytest.param(["GZip"], GZIP_ONLY, "gzip", id="case-insensitive token"),
        pytest.param(["deflate, gzip"], GZIP_ONLY, "gzip", id="in a list"),
        pytest.param(["deflate", "gzip"], GZIP_ONLY, "gzip", id="on a second line"),
        pytest.param(["gzip;q=0"], GZIP_ONLY, None, id="q=0 refuses"),
        pytest.param(["gzip;q=0.000"], GZIP_ONLY, None, id="q=0.000 refuses"),
        pytest.param(["gzip;q=0.001"], GZIP_ONLY, "gzip", id="smallest q accepts"),
        pytest.param(["gzip;q=1.000"], GZIP_ONLY, "gzip", id="q=1.000"),
        pytest.param(["gzip;Q=0.5"], GZIP_ONLY, "gzip", id="Q upper case"),
        pytest.param(["  gzip \t; q=0.5 ,x"], GZIP_ONLY, "gzip", id="OWS around"),
        pytest.param(["gzip;level=1"], GZIP_ONLY, "gzip", id="unknown parameter ignored"),
        pytest.param(["gzip;q=1.001"], GZIP_ONLY, None, id="q over 1: entry ignored"),
        pytest.param(["gzip;q=2"], GZIP_ONLY, None, id="q=2: entry ignored"),
        pytest.param(["gzip;q=0.5x"], GZIP_ONLY, None, id="garbled q: entry ignored"),
        pytest.param(["gzip;q=0.0001"], GZIP_ONLY, None, id="four decimals: entry ignored"),
        pytest.param(["gzip;q =1"], GZIP_ONLY, None, id="blank before =: entry ignored"),
        pytest.param(["gzip;q="], GZIP_ONLY, None, id="empty q: entry ignored"),
        pytest.param(["gzip;q=0", "gzip"], GZIP_ONLY, None, id="first entry wins (refusal)"),
        pytest.param(["gzip, gzip;q=0"], GZIP_ONLY, "gzip", id="first entry wins (accept)"),
        pytest.param(["gzip;q=0.5x, *"], GZIP_ONLY, "gzip", id="bad entry then star"),
        pytest.param(["*"], GZIP_ONLY, "gzip", id="star matches"),
        pytest.param(["*;q=0"], GZIP_ONLY, None, id="star q=0"),
        pytest.param(["gzip;q=0, *"], GZIP_ONLY, None, id="own entry beats star"),
        pytest.param(["identity"], GZIP_ONLY, None, id="identity is no algorithm"),
        pytest.param(["identity;q=1, *;q=0"], GZIP_ONLY, None, id="identity only"),
        pytest.param(["x-gzip"], GZIP_ONLY, None, id="x-gzip is another token"),
        pytest.param(["gzipx, gzi"], GZIP_ONLY, None, id="near tokens"),
        pytest.param(["deflate, compress, zstd"], GZIP_ONLY, None, id="others only"),
        pytest.param(["br"], GZIP_ONLY, None, id="br not in the rule"),
        pytest.param(["gzip, br"], BOTH, "br", id="rule order on a tie"),
        pytest.param(["br;q=0.5, gzip;q=0.5"], ("gzip", "br"), "gzip", id="rule order gzip"),
        pytest.param(["gzip;q=1, br;q=0.5"], BOTH, "gzip", id="highest q wins"),
        pytest.param(["gzip;q=0.4", "br;q=0.9"], BOTH, "br", id="highest q across lines"),
        pytest.param(["BR"], BOTH, "br", id="br case-insensitive"),
        pytest.param(["br;q=0, gzip"], BOTH, "gzip", id="br refused"),
        pytest.param(["gzip;q=0, *"], BOTH, "br", id="star gives br"),
        pytest.param(["br;q=0.1, *;q=0.2"], BOTH, "gzip", id="star beats a low own q"),
    ],
)
def test_accept_encoding(
    accept: list[str] | None, algorithms: tuple[str, ...], expected: str | None
) -> None:
    if "br" in algorithms:
        need_brotli()
    rule = CompressRule(algorithms=algorithms)
    enc = negotiate_heads(rule, request(accept), response())
    if expected is None:
        assert enc is None
    else:
        assert enc is not None
        assert enc.algorithm == expected
        assert enc.head_lines == (GZIP_LINES if expected == "gzip" else BR_LINES)


@pytest.mark.parametrize(
    ("req", "resp", "min_bytes", "compressed"),
    [
        pytest.param(GZ, response(), 1024, True, id="plain 200"),
        pytest.param(request(["gzip"], method="HEAD"), response(), 1024, False, id="HEAD"),
        pytest.param(request(["gzip"], method="POST"), response(), 1024, True, id="POST"),
        pytest.param(request(["gzip"], version="1.0"), response(), 1024, False, id="HTTP/1.0"),
        pytest.param(GZ, response(201), 1024, True, id="201"),
        pytest.param(GZ, response(202), 1024, True, id="202"),
        pytest.param(GZ, response(203), 1024, True, id="203"),
        pytest.param(GZ, response(204, length=None), 1024, False, id="204"),
        pytest.param(GZ, response(206, ["Content-Range: bytes 0-1999/5000"]), 1024, False,
                     id="206"),
        pytest.param(GZ, response(304, length=None), 1024, False, id="304"),
        pytest.param(GZ, response(302), 1024, False, id="302 with a body"),
        pytest.param(GZ, response(404), 1024, False, id="404"),
        pytest.param(GZ, response(500), 1024, False, id="500"),
        pytest.param(GZ, response(headers=["Content-Encoding: gzip"]), 1024, False,
                     id="already gzip"),
        pytest.param(GZ, response(headers=["content-encoding: identity"]), 1024, False,
                     id="any Content-Encoding"),
        pytest.param(GZ, response(headers=["Content-Range: bytes 0-1999/2000"]), 1024, False,
                     id="Content-Range on a 200"),
        pytest.param(GZ, response(headers=["Cache-Control: no-transform"]), 1024, False,
                     id="no-transform"),
        pytest.param(GZ, response(headers=["Cache-Control: public, No-Transform "]), 1024,
                     False, id="no-transform in a list"),
        pytest.param(GZ, response(headers=["Cache-Control: max-age=60", "Cache-Control: "
                                           "no-transform"]), 1024, False,
                     id="no-transform on a second line"),
        pytest.param(GZ, response(headers=["Cache-Control: max-age=60, no-transformer"]),
                     1024, True, id="other directives"),
        pytest.param(GZ, response(content_type=None), 1024, False, id="no Content-Type"),
        pytest.param(GZ, response(content_type="application/json"), 1024, True, id="json"),
        pytest.param(GZ, response(content_type="Application/JSON ; charset=utf-8"), 1024,
                     True, id="json upper case with parameter"),
        pytest.param(GZ, response(content_type="text/plain"), 1024, True, id="text wildcard"),
        pytest.param(GZ, response(content_type="text/event-stream"), 1024, True,
                     id="event stream"),
        pytest.param(GZ, response(content_type="image/svg+xml"), 1024, True, id="svg"),
        pytest.param(GZ, response(content_type="application/x-ndjson"), 1024, True,
                     id="ndjson"),
        pytest.param(GZ, response(content_type="application/problem+json"), 1024, True,
                     id="problem json"),
        pytest.param(GZ, response(content_type="image/png"), 1024, False, id="png"),
        pytest.param(GZ, response(content_type="application/json-seq"), 1024, False,
                     id="json prefix only"),
        pytest.param(GZ, response(content_type="textual/plain"), 1024, False,
                     id="type prefix only"),
        pytest.param(GZ, response(content_type="text"), 1024, False, id="no subtype"),
        pytest.param(GZ, response(content_type="text/"), 1024, False, id="empty subtype"),
        pytest.param(GZ, response(headers=["Content-Type: text/html"]), 1024, False,
                     id="two Content-Type lines"),
        pytest.param(GZ, response(length=1023), 1024, False, id="below min_bytes"),
        pytest.param(GZ, response(length=1024), 1024, True, id="at min_bytes"),
        pytest.param(GZ, response(length=0), 0, False, id="empty body never"),
        pytest.param(GZ, response(length=1), 0, True, id="min_bytes 0"),
        pytest.param(GZ, CHUNKED, 1 << 40, True, id="chunked: length unknown"),
        pytest.param(GZ, CLOSE, 1 << 40, True, id="close-delimited: length unknown"),
    ],
)  # fmt: skip
def test_negotiate_rules(req: bytes, resp: bytes, min_bytes: int, compressed: bool) -> None:
    rule = CompressRule(algorithms=GZIP_ONLY, min_bytes=min_bytes)
    enc = negotiate_heads(rule, req, resp)
    assert (enc is not None) is compressed
    if compressed:
        assert type(enc) is Encoder
        assert enc.head_lines == GZIP_LINES


def test_custom_content_types() -> None:
    rule = CompressRule(algorithms=GZIP_ONLY, content_types=("Application/Vnd.Api+JSON",))
    assert rule.content_types == ("application/vnd.api+json",)
    ok = response(content_type="application/vnd.api+json")
    assert negotiate_heads(rule, GZ, ok) is not None
    assert negotiate_heads(rule, GZ, response(content_type="text/html")) is None


def test_bad_heads_raise() -> None:
    rule = CompressRule()
    with pytest.raises(HttpError):
        negotiate_heads(rule, b"GET / HTTP/1.1\r\n\r\n", response())  # no Host
    with pytest.raises(ValueError):
        negotiate_heads(rule, GZ, b"HTTP/1.1 200 OK\r\n")


# ---- round trips -------------------------------------------------------------------------------

ALGS = [pytest.param("gzip", id="gzip"), pytest.param("br", id="br")]


def rule_for(algorithm: str, **kwargs: Any) -> CompressRule:
    if algorithm == "br":
        need_brotli()
    return CompressRule(algorithms=(algorithm,), **kwargs)


def roundtrip(algorithm: str, resp: bytes, pieces: list[bytes]) -> bytes:
    rule = rule_for(algorithm, min_bytes=0)
    out = compress_body(rule, request([algorithm]), resp, pieces)
    assert type(out) is bytes
    return decode(algorithm, out)


@pytest.mark.parametrize("algorithm", ALGS)
@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([TEXT], id="whole"),
        pytest.param([TEXT[:1], TEXT[1:]], id="first byte alone"),
        pytest.param([TEXT[i : i + 700] for i in range(0, len(TEXT), 700)], id="700 bytes"),
        pytest.param([b"", TEXT, b""], id="empty pieces"),
    ],
)
def test_roundtrip_length(algorithm: str, pieces: list[bytes]) -> None:
    assert roundtrip(algorithm, response(length=len(TEXT)), pieces) == TEXT


@pytest.mark.parametrize("algorithm", ALGS)
def test_roundtrip_close(algorithm: str) -> None:
    pieces = [TEXT[i : i + 333] for i in range(0, len(TEXT), 333)]
    assert roundtrip(algorithm, CLOSE, pieces) == TEXT


@pytest.mark.parametrize("algorithm", ALGS)
def test_roundtrip_chunked_every_split(algorithm: str) -> None:
    body = TEXT[:300]
    wire = to_chunked(body, [1, 17, 100], trailer=b"X-Checksum: abc\r\n")
    for i in range(len(wire) + 1):
        assert roundtrip(algorithm, CHUNKED, [wire[:i], wire[i:]]) == body, i
    assert roundtrip(algorithm, CHUNKED, [wire[i : i + 1] for i in range(len(wire))]) == body


@pytest.mark.parametrize("algorithm", ALGS)
def test_empty_bodies(algorithm: str) -> None:
    assert roundtrip(algorithm, CHUNKED, [b"0\r\n\r\n"]) == b""
    assert roundtrip(algorithm, CLOSE, []) == b""
    assert roundtrip(algorithm, CLOSE, [b""]) == b""


@pytest.mark.parametrize("algorithm", ALGS)
def test_bytes_after_chunked_end_are_ignored(algorithm: str) -> None:
    wire = to_chunked(TEXT, [500])
    assert roundtrip(algorithm, CHUNKED, [wire + b"HTTP/1.1 200 OK\r\n"]) == TEXT


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=2000) | st.text(max_size=1500).map(str.encode),
    sizes=st.lists(st.integers(1, 600), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
)
def test_roundtrip_chunked_random_splits(body: bytes, sizes: list[int], cuts: list[int]) -> None:
    wire = to_chunked(body, sizes)
    points = sorted({min(c, len(wire)) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    assert roundtrip("gzip", CHUNKED, pieces) == body
    if compress.BROTLI_AVAILABLE:
        assert roundtrip("br", CHUNKED, pieces) == body


@pytest.mark.parametrize("algorithm", ALGS)
def test_large_body_streamed(algorithm: str) -> None:
    size = 5 * 1024 * 1024
    unit = b"".join(b"%08d,%s\n" % (i, os.urandom(8).hex().encode()) for i in range(4096))
    body = (unit * (size // len(unit) + 1))[:size]
    rule = rule_for(algorithm)
    enc = negotiate_heads(rule, request([algorithm]), response(length=size))
    assert enc is not None
    out = []
    for i in range(0, size, 64 * 1024):
        piece = enc.push(body[i : i + 64 * 1024])
        assert type(piece) is bytes
        out.append(piece)
    out.append(enc.end())
    wire = b"".join(out)
    assert len(wire) < size // 2
    assert decode(algorithm, wire) == body


# ---- streaming and failure ---------------------------------------------------------------------


def partial(algorithm: str) -> Any:
    if algorithm == "br":
        return need_brotli().Decompressor()
    return zlib.decompressobj(wbits=31)


def inflate(algorithm: str, dec: Any, data: bytes) -> bytes:
    return dec.process(data) if algorithm == "br" else dec.decompress(data)


@pytest.mark.parametrize("algorithm", ALGS)
@pytest.mark.parametrize(
    ("resp", "wire"),
    [
        pytest.param(CHUNKED, lambda ev: b"%x\r\n%b\r\n" % (len(ev), ev), id="chunked"),
        pytest.param(CLOSE, lambda ev: ev, id="close-delimited"),
    ],
)
def test_streamed_input_is_flushed(algorithm: str, resp: bytes, wire: Any) -> None:
    """Each event reaches the client at once (server-sent events through the gateway)."""
    rule = rule_for(algorithm)
    enc = negotiate_heads(rule, request([algorithm]), resp)
    assert enc is not None
    dec = partial(algorithm)
    for i in range(5):
        event = b"data: event %d\n\n" % i
        out = enc.push(wire(event))
        assert out
        assert inflate(algorithm, dec, dechunk(out, final=False)) == event


@pytest.mark.parametrize("algorithm", ALGS)
def test_length_body_is_not_flushed(algorithm: str) -> None:
    """A Content-Length body is one document: the compressor keeps small pieces back."""
    rule = rule_for(algorithm, min_bytes=0)
    enc = negotiate_heads(rule, request([algorithm]), response(length=len(TEXT)))
    assert enc is not None
    out = enc.push(TEXT[:100])
    assert inflate(algorithm, partial(algorithm), dechunk(out, final=False)) == b""
    rest = enc.push(TEXT[100:]) + enc.end()
    assert decode(algorithm, out + rest) == TEXT


def test_framing_only_feed_emits_nothing() -> None:
    enc = negotiate_heads(CompressRule(algorithms=GZIP_ONLY), GZ, CHUNKED)
    assert enc is not None
    assert enc.push(b"1a;ext") == b""
    assert enc.push(b"") == b""


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param([b"zz\r\nhello\r\n0\r\n\r\n"], id="non-hex size"),
        pytest.param([b"5\r\nhello", b"XX0\r\n\r\n"], id="no CRLF after data"),
        pytest.param([b"5\nhello\r\n0\r\n\r\n"], id="bare LF"),
        pytest.param([b"5 \r\nhello\r\n0\r\n\r\n"], id="space after size"),
        pytest.param([b"5\r\nhello\r\n0\r\n X: y\r\n\r\n"], id="obs-fold trailer"),
    ],
)
def test_bad_chunked_input(wire: list[bytes]) -> None:
    rule = CompressRule(algorithms=GZIP_ONLY)
    assert compress_body(rule, GZ, CHUNKED, wire) is None
    enc = negotiate_heads(rule, GZ, CHUNKED)
    assert enc is not None
    results = [enc.push(piece) for piece in wire]
    assert results[-1] is None
    assert enc.push(b"0\r\n\r\n") is None
    assert enc.end() is None


def test_truncated_chunked_body_has_no_end() -> None:
    rule = CompressRule(algorithms=GZIP_ONLY)
    enc = negotiate_heads(rule, GZ, CHUNKED)
    assert enc is not None
    assert enc.push(b"5\r\nhello\r\n")
    assert enc.end() is None
    assert compress_body(rule, GZ, CHUNKED, [b"5\r\nhello\r\n"]) is None


def test_finish_once() -> None:
    enc = negotiate_heads(CompressRule(algorithms=GZIP_ONLY), GZ, CLOSE)
    assert enc is not None
    tail = enc.end()
    assert type(tail) is bytes
    assert tail.endswith(b"\r\n0\r\n\r\n")
    assert enc.end() is None
    assert enc.push(b"late") is None


def test_declined_body_is_none() -> None:
    assert compress_body(CompressRule(), request(None), response(), [TEXT]) is None


def test_gzip_level_is_used() -> None:
    body = TEXT * 20
    sizes = {}
    for level in (1, 9):
        rule = CompressRule(algorithms=GZIP_ONLY, gzip_level=level, min_bytes=0)
        out = compress_body(rule, GZ, response(length=len(body)), [body])
        assert out is not None
        assert decode("gzip", out) == body
        sizes[level] = len(dechunk(out))
    assert sizes[9] <= sizes[1]
