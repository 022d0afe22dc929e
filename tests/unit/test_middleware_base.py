"""LocalReply encoding and the Identity object."""

import json

import pytest

from fastgate.middleware.base import Identity, LocalReply


def split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


@pytest.mark.parametrize(
    ("close", "expect_close"),
    [pytest.param(False, False, id="keep-alive"), pytest.param(True, True, id="close")],
)
def test_error_reply_carries_request_id_and_length(close: bool, expect_close: bool) -> None:
    raw = LocalReply.error(429, "rate limited", retry_after="3").encode(b"abc123", close)
    status, headers, body = split(raw)
    assert status == "HTTP/1.1 429 Too Many Requests"
    assert json.loads(body) == {"error": "rate limited", "request_id": "abc123"}
    assert headers["Content-Length"] == str(len(body))
    assert headers["retry-after"] == "3"
    assert ("Connection" in headers) is expect_close


def test_non_json_reply_is_sent_as_given() -> None:
    raw = LocalReply(302, b"", (("Location", "https://example.com/"),), "text/plain").encode(
        b"id", False
    )
    status, headers, body = split(raw)
    assert status == "HTTP/1.1 302 Found"
    assert headers["Location"] == "https://example.com/"
    assert headers["Content-Length"] == "0"
    assert body == b""


def test_identity_claims() -> None:
    ident = Identity(
        "jwt", "alice", consumer="app", scopes=frozenset({"read"}), claims=(("tenant", "t1"),)
    )
    assert ident.claim("tenant") == "t1"
    assert ident.claim("missing", "d") == "d"
    assert "read" in ident.scopes
    with pytest.raises(AttributeError):
        ident.subject = "mallory"  # type: ignore[misc]


def test_head_reply_has_length_but_no_body() -> None:
    reply = LocalReply.error(401, "no", WWW_Authenticate="Bearer")
    full = reply.encode(b"rid", close=False)
    head_only = reply.encode(b"rid", close=False, head_only=True)
    assert full.startswith(head_only) and head_only.endswith(b"\r\n\r\n")
    body = full[len(head_only) :]
    assert body and f"Content-Length: {len(body)}".encode() in head_only
