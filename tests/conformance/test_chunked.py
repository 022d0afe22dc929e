"""RFC 9112 §7.1 chunked framing, one table row per rule, against `ChunkedScanner`.

The scanner is incremental, so every body is fed three ways (STYLE.md §5): whole, one byte at
a time (done only after the last byte), and followed by the next message (which it must leave
alone). Every refusal is `HttpError(400)`, whatever the split.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core.body import ChunkedScanner
from fastgate.errors import HttpError

NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


def whole(body: bytes, **kw) -> ChunkedScanner:
    scanner = ChunkedScanner(collect=True, **kw)
    assert scanner.feed(body) == len(body)
    assert scanner.done is True
    return scanner


def bytewise(body: bytes, **kw) -> ChunkedScanner:
    scanner = ChunkedScanner(collect=True, **kw)
    for i in range(len(body)):
        assert scanner.done is False, f"done before byte {i}"
        assert scanner.feed(body[i : i + 1]) == 1, f"byte {i}"
    assert scanner.done is True
    assert scanner.feed(NEXT) == 0
    return scanner


def trailing(body: bytes, **kw) -> ChunkedScanner:
    scanner = ChunkedScanner(collect=True, **kw)
    assert scanner.feed(body + NEXT) == len(body)
    assert scanner.done is True
    return scanner


ACCEPTED = [
    pytest.param(b"0\r\n\r\n", b"", id="last-chunk only"),
    pytest.param(b"5\r\nhello\r\n0\r\n\r\n", b"hello", id="one chunk"),
    pytest.param(b"1\r\na\r\n2\r\nbc\r\n3\r\ndef\r\n0\r\n\r\n", b"abcdef", id="three chunks"),
    pytest.param(b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="uppercase hex size"),
    pytest.param(b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="lowercase hex size"),
    pytest.param(b"00a\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="leading zeros"),
    pytest.param(
        b"000000000000000a\r\n0123456789\r\n0\r\n\r\n",
        b"0123456789",
        id="16 hex digits is the most",
    ),
    pytest.param(b"000\r\n\r\n", b"", id="last-chunk of several zeros (§7.1 1*'0')"),
    pytest.param(b"4\r\n\r\n\x00\xff\r\n0\r\n\r\n", b"\r\n\x00\xff", id="data is opaque"),
    pytest.param(b"3;ext\r\nabc\r\n0\r\n\r\n", b"abc", id="chunk-ext name (§7.1.1)"),
    pytest.param(b"3;a=b;c=d\r\nabc\r\n0\r\n\r\n", b"abc", id="chunk-ext name=value pairs"),
    pytest.param(b'3;a="b c;d"\r\nabc\r\n0\r\n\r\n', b"abc", id="chunk-ext quoted-string"),
    pytest.param(b"3 ;a\r\nabc\r\n0\r\n\r\n", b"abc", id="BWS before ';'"),
    pytest.param(b"3\t;a\r\nabc\r\n0\r\n\r\n", b"abc", id="HTAB BWS before ';'"),
    pytest.param(b"0;last=1\r\n\r\n", b"", id="chunk-ext on the last-chunk"),
    pytest.param(b"3\r\nabc\r\n0\r\nX-T: v\r\n\r\n", b"abc", id="one trailer field (§7.1.2)"),
    pytest.param(
        b"0\r\nX-A: 1\r\nx-b:\r\nX-C: \t sp \x80 \t\r\n\r\n",
        b"",
        id="trailer fields with empty, OWS and obs-text values",
    ),
]


@pytest.mark.parametrize(("body", "payload"), ACCEPTED)
@pytest.mark.parametrize("feed", [whole, bytewise, trailing], ids=["whole", "bytewise", "trailing"])
def test_accepted(body: bytes, payload: bytes, feed) -> None:
    scanner = feed(body)
    assert scanner.error is None
    assert type(scanner.payload) is bytes
    assert scanner.payload == payload


def test_not_collecting_still_frames() -> None:
    scanner = ChunkedScanner()
    assert scanner.collect is False
    body = b"5\r\nhello\r\n0\r\n\r\n"
    assert scanner.feed(body + NEXT) == len(body)
    assert scanner.done is True


def test_largest_size_is_accepted_and_counted() -> None:
    # 2**63-1 bytes announced: the size line is valid and the scanner waits for data.
    scanner = ChunkedScanner()
    assert scanner.feed(b"7fffffffffffffff\r\n") == 18
    assert scanner.feed(b"x" * 4096) == 4096
    assert scanner.done is False
    assert scanner.error is None


def test_data_is_skipped_by_count_whatever_the_split() -> None:
    data = bytes(range(256)) * 64
    body = b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
    for step in (1, 7, 4096, len(body)):
        scanner = ChunkedScanner(collect=True)
        used = sum(scanner.feed(body[i : i + step]) for i in range(0, len(body), step))
        assert used == len(body)
        assert scanner.done is True
        assert scanner.payload == data


REFUSED = [
    pytest.param(b"g\r\n", id="non-hex size"),
    pytest.param(b"5x\r\nhello\r\n", id="size followed by a non-hex byte"),
    pytest.param(b"\r\n", id="empty size"),
    pytest.param(b";a\r\n", id="extension without a size"),
    pytest.param(b"-1\r\n", id="negative size"),
    pytest.param(b"+1\r\na\r\n", id="size with plus"),
    pytest.param(b"0x5\r\nhello\r\n", id="0x prefix"),
    pytest.param(b" 5\r\nhello\r\n", id="SP before the size"),
    pytest.param(b"5 \r\nhello\r\n", id="SP after the size with no extension"),
    pytest.param(b"5\t\r\nhello\r\n", id="HTAB after the size with no extension"),
    pytest.param(b"10000000000000000\r\n", id="17 hex digits: overflow"),
    pytest.param(b"00000000000000001\r\na\r\n", id="17 hex digits with zeros"),
    pytest.param(b"8000000000000000\r\n", id="size of 2**63 is over 2**63-1"),
    pytest.param(b"ffffffffffffffffff\r\n", id="size past 2**64"),
    pytest.param(b"5\r\nhelloX\r\n", id="data longer than the size (missing CRLF)"),
    pytest.param(b"5\r\nhello0\r\n\r\n", id="next size where CRLF belongs"),
    pytest.param(b"5\r\nhello\n0\r\n\r\n", id="bare LF after data"),
    pytest.param(b"5\r\nhello\r0\r\n\r\n", id="bare CR after data"),
    pytest.param(b"5\nhello\r\n0\r\n\r\n", id="bare LF after the size"),
    pytest.param(b"5\rhello\r\n0\r\n\r\n", id="bare CR after the size"),
    pytest.param(b"5;a\nhello\r\n", id="bare LF after an extension"),
    pytest.param(b"0\r\n\n", id="bare LF as the final line"),
    pytest.param(b"0\r\n\rX", id="bare CR as the final line"),
    pytest.param(b"0\r\nX: a\n\r\n", id="bare LF after a trailer field"),
    pytest.param(b"\x005\r\n", id="NUL before the size"),
    pytest.param(b"5\x00\r\n", id="NUL after the size"),
    pytest.param(b"5;a\x00b\r\nhello\r\n", id="NUL in an extension"),
    pytest.param(b"5;a\x01b\r\nhello\r\n", id="CTL in an extension"),
    pytest.param(b"0\r\nX: a\x00\r\n\r\n", id="NUL in a trailer value"),
    pytest.param(b"0\r\nX: a\r\n b\r\n\r\n", id="obs-fold in trailers (§5.2)"),
    pytest.param(b"0\r\n X: a\r\n\r\n", id="trailer section starting with SP"),
    pytest.param(b"0\r\nX : a\r\n\r\n", id="SP before colon in a trailer (§5.1)"),
    pytest.param(b"0\r\nX(Y: a\r\n\r\n", id="non-token trailer name"),
    pytest.param(b"0\r\n: a\r\n\r\n", id="empty trailer name"),
    pytest.param(b"0\r\nX-A\r\n\r\n", id="trailer line without colon"),
]


def check_refused(body: bytes, **kw) -> None:
    with pytest.raises(HttpError) as err:
        ChunkedScanner(**kw).feed(body)
    assert err.value.status == 400

    with pytest.raises(HttpError) as err:
        ChunkedScanner(**kw).feed(body + NEXT)
    assert err.value.status == 400

    scanner = ChunkedScanner(**kw)
    for i in range(len(body)):
        try:
            assert scanner.feed(body[i : i + 1]) == 1, f"byte {i}"
        except HttpError as exc:
            assert exc.status == 400
            break
    else:
        pytest.fail(f"{body!r} accepted when fed byte by byte")
    assert scanner.done is False
    assert isinstance(scanner.error, str) and scanner.error
    with pytest.raises(HttpError) as err:
        scanner.feed(b"0\r\n\r\n")
    assert err.value.status == 400, "an error must be sticky"


@pytest.mark.parametrize("body", REFUSED)
def test_refused(body: bytes) -> None:
    check_refused(body)


def test_trailer_section_over_the_limit() -> None:
    fields = b"X-T: " + b"v" * 20 + b"\r\n"
    ok = b"0\r\n" + fields + b"\r\n"
    assert whole(ok, max_trailer_bytes=len(fields)).payload == b""
    assert bytewise(ok, max_trailer_bytes=len(fields)).payload == b""
    check_refused(b"0\r\n" + fields * 2 + b"\r\n", max_trailer_bytes=len(fields))


def test_default_trailer_limit_is_16_kib() -> None:
    check_refused(b"0\r\n" + (b"X-T: " + b"v" * 1000 + b"\r\n") * 17 + b"\r\n")


def test_endless_extension_is_refused() -> None:
    # §7.1.1: a server ought to limit the total length of chunk extensions; otherwise a
    # client keeps us scanning one size line forever.
    scanner = ChunkedScanner()
    with pytest.raises(HttpError) as err:
        for _ in range(1024):
            scanner.feed(b"1;" + b"a" * 1022)
    assert err.value.status == 400


def encode(chunks: list[bytes], upper: bool, ext: bool, trailers: list[bytes]) -> bytes:
    out = []
    for chunk in chunks:
        size = b"%X" % len(chunk) if upper else b"%x" % len(chunk)
        out.append(size + (b";n=v" if ext else b"") + b"\r\n" + chunk + b"\r\n")
    out.append(b"0\r\n")
    out.extend(b"X-T%d: %s\r\n" % (i, value) for i, value in enumerate(trailers))
    out.append(b"\r\n")
    return b"".join(out)


@settings(max_examples=500, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    upper=st.booleans(),
    ext=st.booleans(),
    trailers=st.lists(st.text("abc xyz", max_size=10).map(str.encode), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    tail=st.sampled_from([b"", NEXT, b"0\r\n\r\n"]),
)
def test_any_split_gives_the_same_answer(chunks, upper, ext, trailers, cuts, tail) -> None:
    body = encode(chunks, upper, ext, [t.strip() for t in trailers])
    data = body + tail
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    scanner = ChunkedScanner(collect=True)
    used = 0
    for a, b in itertools.pairwise(points):
        n = scanner.feed(data[a:b])
        assert 0 <= n <= b - a
        if scanner.done:
            used += n
            break
        assert n == b - a
        used += n
    assert scanner.done is True
    assert used == len(body)
    assert scanner.payload == b"".join(chunks)
