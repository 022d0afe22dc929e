"""RFC 9112 request framing, one table row per rule, against `fastgate._core.httphead`.

Every accepted head is checked three ways (STYLE.md §5): the whole head, every shorter prefix
(nothing until the final CRLFCRLF), and with the next pipelined bytes after it (left over,
untouched). Every refused head must raise `HttpError` with exactly the status the rule names,
whether it arrives whole, with bytes after it, or one byte at a time.
"""

from __future__ import annotations

import pytest

from fastgate._core import httphead
from fastgate._core.httphead import Limits, RequestHead, parse_request
from fastgate.errors import HttpError

NONE = httphead.FRAMING_NONE
LENGTH = httphead.FRAMING_LENGTH
CHUNKED = httphead.FRAMING_CHUNKED

NEXT = b"GET /next HTTP/1.1\r\nHost: b\r\n\r\n"


def req(start: bytes, *fields: bytes) -> bytes:
    """A head: start line, field lines, the empty line; every line ends with CRLF."""
    return b"".join(line + b"\r\n" for line in (start, *fields)) + b"\r\n"


def prefixes(data: bytes) -> range:
    """Prefix lengths to try: all of them for small heads, a stride for the big ones."""
    if len(data) <= 2048:
        return range(len(data))
    return range(0, len(data), 61)


def parse_three_ways(data: bytes, limits: Limits | None = None) -> RequestHead:
    """Parse a complete head whole, prefix by prefix and with trailing bytes; return it."""
    head, n = parse_request(data, limits)
    assert type(head) is RequestHead
    assert n == len(data)
    assert type(head.raw) is bytes
    assert head.raw == data
    for i in prefixes(data):
        assert parse_request(data[:i], limits) == (None, 0), f"prefix {i} of {data!r}"
    for tail in (NEXT, b"body bytes", b"\r\n"):
        head2, n2 = parse_request(data + tail, limits)
        assert n2 == len(data)
        assert head2.raw == data
        assert head2.headers() == head.headers()
    return head


def refused_three_ways(data: bytes, status: int, limits: Limits | None = None) -> None:
    """`data` must raise HttpError(status) whole and with trailing bytes; no prefix may be
    accepted, and a prefix that is refused early must be refused with the same status."""
    with pytest.raises(HttpError) as err:
        parse_request(data, limits)
    assert err.value.status == status, err.value
    assert isinstance(err.value.reason, str) and err.value.reason
    with pytest.raises(HttpError) as err:
        parse_request(data + NEXT, limits)
    assert err.value.status == status, err.value
    for i in prefixes(data):
        try:
            result = parse_request(data[:i], limits)
        except HttpError as exc:
            assert exc.status == status, f"prefix {i}: {exc} (want {status})"
        else:
            assert result == (None, 0), f"prefix {i} of {data!r} was accepted"


BASE = {
    "method": b"GET",
    "target": b"/",
    "path": b"/",
    "query": None,
    "version": 11,
    "keep_alive": True,
    "framing": NONE,
    "content_length": -1,
    "host": b"example.com",
    "upgrade": None,
    "expect_continue": False,
    "absolute_form": False,
}

HOST = b"Host: example.com"

ACCEPTED = [
    pytest.param(req(b"GET / HTTP/1.1", HOST), {}, id="minimal HTTP/1.1 GET with Host"),
    pytest.param(
        req(b"GET /a/b?x=1&y HTTP/1.1", HOST),
        {"target": b"/a/b?x=1&y", "path": b"/a/b", "query": b"x=1&y"},
        id="origin-form path and query split at the first '?' (§3.2.1)",
    ),
    pytest.param(
        req(b"GET /a?b?c/d HTTP/1.1", HOST),
        {"target": b"/a?b?c/d", "path": b"/a", "query": b"b?c/d"},
        id="query may contain '?' and '/' (RFC 3986 §3.4)",
    ),
    pytest.param(
        req(b"GET /a? HTTP/1.1", HOST),
        {"target": b"/a?", "path": b"/a", "query": b""},
        id="empty query is b'' not None",
    ),
    pytest.param(
        req(b"GET /%7Euser/a;p=1/%20 HTTP/1.1", HOST),
        {"target": b"/%7Euser/a;p=1/%20", "path": b"/%7Euser/a;p=1/%20"},
        id="path kept as sent, no percent-decoding",
    ),
    pytest.param(
        req(b"GET / HTTP/1.0"),
        {"version": 10, "keep_alive": False, "host": None},
        id="HTTP/1.0 without Host is valid and not persistent (§9.3)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.0", HOST),
        {"version": 10, "keep_alive": False},
        id="HTTP/1.0 with Host",
    ),
    pytest.param(
        req(b"GET / HTTP/1.0", b"Connection: keep-alive"),
        {"version": 10, "keep_alive": True, "host": None},
        id="HTTP/1.0 keep-alive option persists (§9.3)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.0", b"Connection: Foo, KEEP-ALIVE"),
        {"version": 10, "keep_alive": True, "host": None},
        id="Connection options are a case-insensitive list",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"Connection: close"),
        {"keep_alive": False},
        id="HTTP/1.1 Connection close (§9.6)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"Connection: keep-alive, Close"),
        {"keep_alive": False},
        id="close anywhere in the Connection list wins",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"Connection: keep-alive", b"Connection: close"),
        {"keep_alive": False},
        id="close in a second Connection line",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"Connection: closed"),
        {},
        id="'closed' is not the close option",
    ),
    pytest.param(
        req(b"POST /u HTTP/1.1", HOST, b"Content-Length: 5"),
        {"method": b"POST", "target": b"/u", "path": b"/u", "framing": LENGTH, "content_length": 5},
        id="Content-Length framing (§6.3 rule 6)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Content-Length: 0"),
        {"method": b"POST", "framing": LENGTH, "content_length": 0},
        id="Content-Length 0 is length framing",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Content-Length: 5", b"Content-Length: 5"),
        {"method": b"POST", "framing": LENGTH, "content_length": 5},
        id="identical duplicate Content-Length accepted (RFC 9110 §8.6)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Content-Length: \t 7 \t"),
        {"method": b"POST", "framing": LENGTH, "content_length": 7},
        id="Content-Length with OWS around it",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Content-Length: 007"),
        {"method": b"POST", "framing": LENGTH, "content_length": 7},
        id="Content-Length leading zeros",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Content-Length: 999999999999999999"),
        {"method": b"POST", "framing": LENGTH, "content_length": 999999999999999999},
        id="Content-Length of 18 digits is the largest accepted",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked"),
        {"method": b"POST", "framing": CHUNKED},
        id="Transfer-Encoding chunked framing (§6.3 rule 4)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: Chunked"),
        {"method": b"POST", "framing": CHUNKED},
        id="transfer-coding names are case-insensitive (§7)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"content-length: 3"),
        {"method": b"POST", "framing": LENGTH, "content_length": 3},
        id="field names are case-insensitive (RFC 9110 §5.1)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"Connection: Upgrade", b"Upgrade: websocket"),
        {"upgrade": b"websocket"},
        id="Upgrade named by Connection (RFC 9110 §7.8)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"Upgrade: websocket"),
        {},
        id="Upgrade not named by Connection is ignored",
    ),
    pytest.param(
        req(b"GET / HTTP/1.0", HOST, b"Connection: Upgrade", b"Upgrade: websocket"),
        {"version": 10, "keep_alive": False},
        id="Upgrade in HTTP/1.0 is ignored (RFC 9110 §7.8 MUST ignore)",
    ),
    pytest.param(
        req(b"PUT /f HTTP/1.0", HOST, b"Expect: 100-continue", b"Content-Length: 1"),
        {
            "method": b"PUT",
            "target": b"/f",
            "path": b"/f",
            "version": 10,
            "keep_alive": False,
            "framing": LENGTH,
            "content_length": 1,
        },
        id="Expect 100-continue in HTTP/1.0 is ignored (RFC 9110 §10.1.1 MUST ignore)",
    ),
    pytest.param(
        req(b"PUT /f HTTP/1.1", HOST, b"Expect: 100-continue", b"Content-Length: 1"),
        {
            "method": b"PUT",
            "target": b"/f",
            "path": b"/f",
            "expect_continue": True,
            "framing": LENGTH,
            "content_length": 1,
        },
        id="Expect 100-continue (RFC 9110 §10.1.1)",
    ),
    pytest.param(
        req(b"GET http://example.com/p?q HTTP/1.1", b"Host: other.example"),
        {"target": b"http://example.com/p?q", "path": b"/p", "query": b"q", "absolute_form": True},
        id="absolute-form authority overrides Host (§3.2.2)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", b"Host: [::1]:8080"),
        {"host": b"[::1]:8080"},
        id="Host with IP-literal and port",
    ),
    pytest.param(
        req(b"DELETE /x HTTP/1.1", HOST),
        {"method": b"DELETE", "target": b"/x", "path": b"/x"},
        id="DELETE method",
    ),
]


@pytest.mark.parametrize(("data", "fields"), ACCEPTED)
def test_accepted(data: bytes, fields: dict) -> None:
    head = parse_three_ways(data)
    want = {**BASE, **fields}
    got = {name: getattr(head, name) for name in want}
    assert got == want
    for name in ("method", "target", "path"):
        assert type(getattr(head, name)) is bytes


def test_headers_kept_in_order_with_names_as_sent() -> None:
    data = req(
        b"GET / HTTP/1.1",
        b"Host: example.com",
        b"X-MiXeD: \t one two \t",
        b"X-Empty:",
        b"X-Obs: \x80\xff",
        b"x-mixed: second",
        b"Accept: */*",
    )
    head = parse_three_ways(data)
    assert head.headers() == [
        (b"Host", b"example.com"),
        (b"X-MiXeD", b"one two"),
        (b"X-Empty", b""),
        (b"X-Obs", b"\x80\xff"),
        (b"x-mixed", b"second"),
        (b"Accept", b"*/*"),
    ]
    assert head.n_headers == 6
    assert head.get(b"x-mixed") == b"one two"
    assert head.get(b"X-MIXED") == b"one two"
    assert head.get_all(b"x-mixed") == [b"one two", b"second"]
    assert head.get(b"x-missing") is None
    assert head.get(b"x-missing", b"d") == b"d"
    assert head.get_all(b"x-missing") == []
    for name, value in head.headers():
        assert type(name) is bytes and type(value) is bytes


def test_known_method_is_interned() -> None:
    one, _ = parse_request(req(b"GET /a HTTP/1.1", HOST))
    two, _ = parse_request(req(b"GET /b HTTP/1.1", HOST))
    assert one.method is two.method is httphead.METHOD_GET


def test_limits_defaults() -> None:
    limits = Limits()
    assert (limits.max_head_bytes, limits.max_headers, limits.max_target) == (16384, 100, 8192)


def _padded_head(total: int) -> bytes:
    """An otherwise valid head of exactly `total` bytes (one filler field)."""
    start = req(b"GET / HTTP/1.1", HOST, b"X-Pad: ")
    return req(b"GET / HTTP/1.1", HOST, b"X-Pad: " + b"a" * (total - len(start)))


def _many_fields(count: int) -> bytes:
    """A head with `count` field lines, Host included."""
    return req(b"GET / HTTP/1.1", HOST, *(b"X-F%d: v" % i for i in range(count - 1)))


def test_limits_at_the_boundary_are_accepted() -> None:
    data = _padded_head(16384)
    assert len(data) == 16384
    pad = 16384 - len(_padded_head(0))
    assert parse_three_ways(data).get(b"x-pad") == b"a" * pad
    assert parse_three_ways(_many_fields(100)).n_headers == 100
    target = b"/" + b"t" * 8191
    assert parse_three_ways(req(b"GET " + target + b" HTTP/1.1", HOST)).target == target


def test_custom_limits() -> None:
    limits = Limits(max_head_bytes=200, max_headers=3, max_target=16)
    assert parse_three_ways(_many_fields(3), limits).n_headers == 3
    refused_three_ways(_many_fields(4), 431, limits)
    refused_three_ways(req(b"GET /" + b"a" * 16 + b" HTTP/1.1", HOST), 414, limits)
    refused_three_ways(_padded_head(201), 431, limits)


def test_incomplete_head_over_the_limit_is_refused() -> None:
    # A head that has passed max_head_bytes without its CRLFCRLF can never be valid: waiting
    # for more would let a client make us buffer without bound (§2.3, RFC 9110 §15.5.20 431).
    data = b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Pad: " + b"a" * 17000
    with pytest.raises(HttpError) as err:
        parse_request(data)
    assert err.value.status == 431


def cl(value: bytes) -> bytes:
    return req(b"POST / HTTP/1.1", HOST, b"Content-Length: " + value)


REFUSED = [
    # Content-Length and Transfer-Encoding (§6.1, §6.3, RFC 9110 §8.6)
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Content-Length: 5", b"Transfer-Encoding: chunked"),
        400,
        id="CL with TE is an error (§6.1 ought to be handled as an error: we reject)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked", b"Content-Length: 5"),
        400,
        id="TE then CL is an error too",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Content-Length: 5", b"Content-Length: 6"),
        400,
        id="differing Content-Length lines (§6.3 rule 5)",
    ),
    pytest.param(cl(b"5, 6"), 400, id="differing Content-Length list"),
    pytest.param(cl(b"+5"), 400, id="Content-Length with plus sign"),
    pytest.param(cl(b"-1"), 400, id="negative Content-Length"),
    pytest.param(cl(b"5a"), 400, id="Content-Length with trailing letter"),
    pytest.param(cl(b"0x5"), 400, id="hex Content-Length"),
    pytest.param(cl(b"5 5"), 400, id="Content-Length with inner space"),
    pytest.param(cl(b""), 400, id="empty Content-Length"),
    pytest.param(cl(b"1234567890123456789"), 400, id="Content-Length of 19 digits"),
    pytest.param(cl(b"0000000000000000005"), 400, id="Content-Length of 19 digits with zeros"),
    pytest.param(cl(b"99999999999999999999999"), 400, id="Content-Length overflow"),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: gzip"),
        501,
        id="TE gzip not understood (§6.1, RFC 9110 §15.6.2)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: gzip, chunked"),
        501,
        id="TE gzip, chunked: only a lone chunked is decoded",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked, gzip"),
        501,
        id="TE chunked not final (§6.3 rule 4)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked, chunked"),
        400,
        id="TE chunked twice is malformed, not unsupported (§7.1 MUST NOT apply twice)",
    ),
    pytest.param(
        req(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: identity"),
        501,
        id="TE identity is not a coding (removed in RFC 7230)",
    ),
    # Field syntax (§5, RFC 9110 §5.1, §5.5)
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"X-A: one", b" two"),
        400,
        id="obs-fold with SP (§5.2)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"X-A: one", b"\ttwo"),
        400,
        id="obs-fold with HTAB (§5.2)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", b" Host: example.com"),
        400,
        id="whitespace before the first field line (§2.2)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"X-A : v"),
        400,
        id="SP before colon (§5.1 MUST reject)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"X-A\t: v"),
        400,
        id="HTAB before colon (§5.1 MUST reject)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", b"Host : example.com"),
        400,
        id="SP before colon on Host",
    ),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X(A: v"), 400, id="'(' in field name"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X@A: v"), 400, id="'@' in field name"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X/A: v"), 400, id="'/' in field name"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b'X"A: v'), 400, id="DQUOTE in field name"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X A: v"), 400, id="SP inside field name"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X\xe9: v"), 400, id="obs-text in field name"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b": v"), 400, id="empty field name"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X-A"), 400, id="field line without colon"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X-A: a\x01b"), 400, id="CTL in field value"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X-A: a\x7fb"), 400, id="DEL in field value"),
    # Line endings and NUL (§2.2, RFC 9110 §5.5)
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X-A: a\rb"), 400, id="bare CR in field value"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: example.com\rX-A: b\r\n\r\n",
        400,
        id="bare CR as a line end",
    ),
    pytest.param(req(b"GET /a\rb HTTP/1.1", HOST), 400, id="bare CR in the request-line"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: example.com\nX-A: b\r\n\r\n",
        400,
        id="bare LF as a field line end",
    ),
    pytest.param(
        b"GET / HTTP/1.1\nHost: example.com\r\n\r\n",
        400,
        id="bare LF after the request-line",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\nX: y\r\n\r\n",
        400,
        id="bare LF as the empty line",
    ),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X-A: a\nb"), 400, id="bare LF in field value"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X-A: a\x00b"), 400, id="NUL in field value"),
    pytest.param(req(b"GET / HTTP/1.1", HOST, b"X\x00A: b"), 400, id="NUL in field name"),
    pytest.param(req(b"GET /a\x00 HTTP/1.1", HOST), 400, id="NUL in request-target"),
    pytest.param(req(b"G\x00T / HTTP/1.1", HOST), 400, id="NUL in method"),
    # Host (§3.2)
    pytest.param(req(b"GET / HTTP/1.1"), 400, id="HTTP/1.1 without Host (§3.2 MUST 400)"),
    pytest.param(
        req(b"GET / HTTP/1.1", b"X-A: b"),
        400,
        id="HTTP/1.1 with fields but no Host",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"Host: example.com"),
        400,
        id="two identical Host lines (§3.2 MUST 400)",
    ),
    pytest.param(
        req(b"GET / HTTP/1.1", HOST, b"hOST: other.example"),
        400,
        id="two Host lines differing in case",
    ),
    pytest.param(
        req(b"GET / HTTP/1.0", HOST, b"Host: other.example"),
        400,
        id="two Host lines in HTTP/1.0",
    ),
    pytest.param(req(b"GET / HTTP/1.1", b"Host: a b"), 400, id="Host value with SP"),
    pytest.param(req(b"GET / HTTP/1.1", b"Host: a/b"), 400, id="Host value with '/'"),
    pytest.param(req(b"GET / HTTP/1.1", b"Host: u@a"), 400, id="Host value with userinfo"),
    # Version (§2.3, RFC 9110 §15.6.6)
    pytest.param(req(b"GET / HTTP/2.0", HOST), 505, id="HTTP/2.0 in a 1.x head is 505"),
    pytest.param(req(b"GET / HTTP/1.2", HOST), 505, id="HTTP/1.2 unknown minor is 505"),
    pytest.param(req(b"GET / HTTP/0.9", HOST), 505, id="HTTP/0.9 is 505"),
    pytest.param(req(b"GET / HTTP/3.0", HOST), 505, id="HTTP/3.0 is 505"),
    pytest.param(req(b"GET / HTTP/1.1x", HOST), 400, id="HTTP/1.1x is malformed"),
    pytest.param(req(b"GET / http/1.1", HOST), 400, id="lowercase http/1.1 (§2.3 case-sensitive)"),
    pytest.param(req(b"GET / HTTP/1", HOST), 400, id="version without minor"),
    pytest.param(req(b"GET / HTTP/11", HOST), 400, id="version without dot"),
    pytest.param(req(b"GET / HTTP/1.1 ", HOST), 400, id="SP after the version"),
    pytest.param(req(b"GET /", HOST), 400, id="request-line without version (HTTP/0.9 form)"),
    # Request-line (§3)
    pytest.param(req(b"GET  / HTTP/1.1", HOST), 400, id="two SP after the method"),
    pytest.param(req(b"GET /  HTTP/1.1", HOST), 400, id="two SP before the version"),
    pytest.param(req(b"GET\t/ HTTP/1.1", HOST), 400, id="HTAB as separator"),
    pytest.param(req(b" GET / HTTP/1.1", HOST), 400, id="SP before the method"),
    pytest.param(req(b"/ HTTP/1.1", HOST), 400, id="missing method"),
    pytest.param(req(b"G(T / HTTP/1.1", HOST), 400, id="method not a token"),
    pytest.param(req(b"GET /a b HTTP/1.1", HOST), 400, id="SP inside the target"),
    pytest.param(req(b"GET a/b HTTP/1.1", HOST), 400, id="target that is no form of §3.2"),
    pytest.param(req(b"GET /a\x7f HTTP/1.1", HOST), 400, id="DEL in the target"),
    pytest.param(req(b"GET /a#frag HTTP/1.1", HOST), 400, id="fragment in the target (§3.2)"),
    pytest.param(req(b"GET /a?b#c HTTP/1.1", HOST), 400, id="fragment after the query (§3.2)"),
    # Limits (RFC 9110 §15.5.15 414, RFC 6585 §5 431)
    pytest.param(_padded_head(16385), 431, id="head one byte over 16 KiB"),
    pytest.param(_many_fields(101), 431, id="101 field lines"),
    pytest.param(
        req(b"GET /" + b"t" * 8192 + b" HTTP/1.1", HOST),
        414,
        id="target of 8193 bytes",
    ),
]


@pytest.mark.parametrize(("data", "status"), REFUSED)
def test_refused(data: bytes, status: int) -> None:
    refused_three_ways(data, status)
