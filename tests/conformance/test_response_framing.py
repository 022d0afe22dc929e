"""RFC 9112 §6.3 response framing, one table row per rule, against `parse_response`.

How long a response body is depends on the request (HEAD), the status (1xx, 204, 304) and
the fields; a gateway that gets it wrong desynchronises its upstream connection. Accepted heads
are checked whole, prefix by prefix and with body bytes after them (STYLE.md §5).
"""

from __future__ import annotations

import pytest

from fastgate._core import httphead
from fastgate._core.httphead import ResponseHead, parse_response
from fastgate.errors import HttpError

NONE = httphead.FRAMING_NONE
LENGTH = httphead.FRAMING_LENGTH
CHUNKED = httphead.FRAMING_CHUNKED
CLOSE = httphead.FRAMING_CLOSE


def resp(start: bytes, *fields: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in (start, *fields)) + b"\r\n"


def parse_three_ways(data: bytes, head_request: bool) -> ResponseHead:
    head, n = parse_response(data, head_request)
    assert type(head) is ResponseHead
    assert n == len(data)
    assert head.raw == data
    for i in range(len(data)):
        assert parse_response(data[:i], head_request) == (None, 0), f"prefix {i}"
    for tail in (b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"):
        head2, n2 = parse_response(data + tail, head_request)
        assert n2 == len(data)
        assert head2.raw == data
        assert (head2.status, head2.framing) == (head.status, head.framing)
    return head


BASE = {
    "status": 200,
    "reason": b"OK",
    "version": 11,
    "keep_alive": True,
    "framing": LENGTH,
    "content_length": 3,
    "upgrade": None,
}

CL3 = b"Content-Length: 3"
TE = b"Transfer-Encoding: chunked"

ACCEPTED = [
    pytest.param(resp(b"HTTP/1.1 200 OK", CL3), False, {}, id="Content-Length body"),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", TE),
        False,
        {"framing": CHUNKED, "content_length": -1},
        id="chunked body",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", b"Content-Length: 3", b"Content-Length: 3"),
        False,
        {},
        id="identical duplicate Content-Length (RFC 9110 §8.6)",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK"),
        False,
        {"framing": CLOSE, "content_length": -1, "keep_alive": False},
        id="no CL or TE: close-delimited, not persistent (§6.3 rule 8)",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", b"Connection: keep-alive"),
        False,
        {"framing": CLOSE, "content_length": -1, "keep_alive": False},
        id="close-delimited even with keep-alive asked",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", CL3, b"Connection: close"),
        False,
        {"keep_alive": False},
        id="Connection close",
    ),
    pytest.param(
        resp(b"HTTP/1.0 200 OK", CL3),
        False,
        {"version": 10, "keep_alive": False},
        id="HTTP/1.0 response is not persistent by default",
    ),
    pytest.param(
        resp(b"HTTP/1.0 200 OK", CL3, b"Connection: keep-alive"),
        False,
        {"version": 10, "keep_alive": True},
        id="HTTP/1.0 keep-alive with a length persists (§9.3)",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", b"Content-Length: 10"),
        True,
        {"framing": NONE, "content_length": -1},
        id="response to HEAD has no body whatever CL says (§6.3 rule 1)",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", TE),
        True,
        {"framing": NONE, "content_length": -1},
        id="response to HEAD has no body whatever TE says",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK"),
        True,
        {"framing": NONE, "content_length": -1},
        id="response to HEAD without CL or TE is not close-delimited",
    ),
    pytest.param(
        resp(b"HTTP/1.1 100 Continue"),
        False,
        {"status": 100, "reason": b"Continue", "framing": NONE, "content_length": -1},
        id="1xx has no body",
    ),
    pytest.param(
        resp(b"HTTP/1.1 103 Early Hints", b"Link: </s.css>; rel=preload"),
        False,
        {"status": 103, "reason": b"Early Hints", "framing": NONE, "content_length": -1},
        id="103 has no body",
    ),
    pytest.param(
        resp(b"HTTP/1.1 101 Switching Protocols", b"Connection: Upgrade", b"Upgrade: websocket"),
        False,
        {
            "status": 101,
            "reason": b"Switching Protocols",
            "framing": NONE,
            "content_length": -1,
            "upgrade": b"websocket",
        },
        id="101 upgrade",
    ),
    pytest.param(
        resp(b"HTTP/1.1 204 No Content", CL3),
        False,
        {"status": 204, "reason": b"No Content", "framing": NONE, "content_length": -1},
        id="204 has no body whatever CL says",
    ),
    pytest.param(
        resp(b"HTTP/1.1 204 No Content"),
        False,
        {"status": 204, "reason": b"No Content", "framing": NONE, "content_length": -1},
        id="204 without CL is not close-delimited",
    ),
    pytest.param(
        resp(b"HTTP/1.1 304 Not Modified", CL3),
        False,
        {"status": 304, "reason": b"Not Modified", "framing": NONE, "content_length": -1},
        id="304 has no body whatever CL says",
    ),
    pytest.param(
        resp(b"HTTP/1.1 304 Not Modified", TE),
        False,
        {"status": 304, "reason": b"Not Modified", "framing": NONE, "content_length": -1},
        id="304 has no body whatever TE says",
    ),
    pytest.param(
        resp(b"HTTP/1.1 404 ", CL3),
        False,
        {"status": 404, "reason": b""},
        id="empty reason-phrase (§4)",
    ),
    pytest.param(
        resp(b"HTTP/1.1 500 Very\tBad \x80 Day", CL3),
        False,
        {"status": 500, "reason": b"Very\tBad \x80 Day"},
        id="reason-phrase with HTAB, SP and obs-text",
    ),
    pytest.param(
        resp(b"HTTP/1.1 299 Whatever", b"Content-Length: 0"),
        False,
        {"status": 299, "reason": b"Whatever", "content_length": 0},
        id="unregistered status code",
    ),
]


@pytest.mark.parametrize(("data", "head_request", "fields"), ACCEPTED)
def test_accepted(data: bytes, head_request: bool, fields: dict) -> None:
    head = parse_three_ways(data, head_request)
    want = {**BASE, **fields}
    assert {name: getattr(head, name) for name in want} == want
    assert type(head.reason) is bytes


def test_response_headers_in_order() -> None:
    data = resp(
        b"HTTP/1.1 200 OK",
        b"Set-Cookie: a=1",
        b"Content-Length: 3",
        b"set-cookie: b=2 ",
    )
    head = parse_three_ways(data, False)
    assert head.headers() == [
        (b"Set-Cookie", b"a=1"),
        (b"Content-Length", b"3"),
        (b"set-cookie", b"b=2"),
    ]
    assert head.get_all(b"SET-COOKIE") == [b"a=1", b"b=2"]
    assert head.n_headers == 3


# Every fault in a response head is 502: the gateway answers its client for the upstream's
# error (RFC 9110 §15.6.3; RFC 9112 §5.2 names 502 for obs-fold in a response).
# Framing errors are checked only when the request was not HEAD: a response to HEAD ends at
# its empty line whatever CL and TE say (§6.3 rule 1 comes first).
FRAMING_REFUSED = [
    pytest.param(
        resp(b"HTTP/1.1 200 OK", CL3, TE),
        502,
        id="TE with CL: smuggling / splitting attempt (§6.1, §6.3 rule 3)",
    ),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", b"Content-Length: 3", b"Content-Length: 4"),
        502,
        id="differing Content-Length (§6.3 rule 5)",
    ),
    pytest.param(resp(b"HTTP/1.1 200 OK", b"Content-Length: -3"), 502, id="negative CL"),
    pytest.param(resp(b"HTTP/1.1 200 OK", b"Content-Length: 3x"), 502, id="CL with a letter"),
    pytest.param(
        resp(b"HTTP/1.1 200 OK", b"Content-Length: 1234567890123456789"),
        502,
        id="CL of 19 digits",
    ),
]

SYNTAX_REFUSED = [
    pytest.param(resp(b"HTTP/1.1 200 OK", CL3, b" folded"), 502, id="obs-fold (§5.2)"),
    pytest.param(resp(b"HTTP/1.1 200 OK", b"Content-Length : 3"), 502, id="SP before colon"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3\n\r\n", 502, id="bare LF"),
    pytest.param(resp(b"HTTP/1.1 200 OK", b"X: a\rb", CL3), 502, id="bare CR"),
    pytest.param(resp(b"HTTP/1.1 200 OK", b"X: a\x00b", CL3), 502, id="NUL in a value"),
    pytest.param(resp(b"HTTP/1.1 20 OK", CL3), 502, id="two-digit status"),
    pytest.param(resp(b"HTTP/1.1 2000 OK", CL3), 502, id="four-digit status"),
    pytest.param(resp(b"HTTP/1.1 2x0 OK", CL3), 502, id="status not digits"),
    pytest.param(resp(b"HTTP/1.1  200 OK", CL3), 502, id="two SP before status"),
    pytest.param(resp(b"http/1.1 200 OK", CL3), 502, id="lowercase version"),
    pytest.param(resp(b"HTTP/1.1x 200 OK", CL3), 502, id="malformed version"),
    pytest.param(resp(b"HTTP/2.0 200 OK", CL3), 502, id="HTTP/2.0 status-line"),
    pytest.param(resp(b"HTTP/1.2 200 OK", CL3), 502, id="HTTP/1.2 status-line"),
]


def refused(data: bytes, status: int, head_request: bool) -> None:
    for payload in (data, data + b"abc"):
        with pytest.raises(HttpError) as err:
            parse_response(payload, head_request)
        assert err.value.status == status, err.value
    for i in range(len(data)):
        try:
            result = parse_response(data[:i], head_request)
        except HttpError as exc:
            assert exc.status == status, f"prefix {i}: {exc}"
        else:
            assert result == (None, 0), f"prefix {i} accepted"


@pytest.mark.parametrize(("data", "status"), FRAMING_REFUSED)
def test_framing_refused(data: bytes, status: int) -> None:
    refused(data, status, head_request=False)


@pytest.mark.parametrize(("data", "status"), SYNTAX_REFUSED)
@pytest.mark.parametrize("head_request", [False, True], ids=["GET", "HEAD"])
def test_syntax_refused(data: bytes, status: int, head_request: bool) -> None:
    refused(data, status, head_request)
