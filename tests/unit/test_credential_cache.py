"""CredentialCache (conn.pyx): the C fast path for verified credentials. A hit needs the
whole header value, exactly one such header and an unexpired entry; everything else is a
miss that the Python middleware decides."""

from __future__ import annotations

import pytest
from fastgate._core.conn import CredentialCache

from fastgate._core.httphead import parse_request


def head(*lines: str) -> object:
    raw = "GET / HTTP/1.1\r\nHost: a\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n"
    parsed, _ = parse_request(raw.encode())
    assert parsed is not None
    return parsed


@pytest.fixture
def cache() -> CredentialCache:
    c = CredentialCache(b"authorization", 3)
    c.put(b"Bearer good", 60.0, "alice", b"X-User: alice\r\n")
    return c


@pytest.mark.parametrize(
    "lines, hit",
    [
        pytest.param(("Authorization: Bearer good",), True, id="exact value"),
        pytest.param(("authorization:   Bearer good  ",), True, id="any name case, OWS ignored"),
        pytest.param(("Authorization: Bearer goo",), False, id="a prefix is not the value"),
        pytest.param(("Authorization: bearer good",), False, id="bytes compared exactly"),
        pytest.param((), False, id="no header"),
        pytest.param(("Authorization: Bearer good", "Authorization: Bearer good"), False,
                     id="twice: the middleware decides"),
        pytest.param(("X-Authorization: Bearer good",), False, id="another header"),
    ],
)  # fmt: skip
def test_lookup(cache: CredentialCache, lines: tuple[str, ...], hit: bool) -> None:
    found = cache.find(head(*lines))
    if hit:
        assert found is not None and found[1] == "alice" and found[2] == b"X-User: alice\r\n"
    else:
        assert found is None
    assert cache.hits == (1 if hit else 0)


def test_expiry_clear_and_bound(cache: CredentialCache) -> None:
    good = head("Authorization: Bearer good")
    assert cache.find(good, later=59) is not None
    assert cache.find(good, later=61) is None  # past its deadline
    cache.put(b"Bearer never", 0.0, "bob", b"")  # no time left: not kept
    assert len(cache) == 1
    for name in (b"a", b"b", b"c"):
        cache.put(b"Bearer " + name, 60.0, "x", b"")
    assert len(cache) == 1  # the bound (3) was reached: started over
    cache.clear()
    assert cache.find(good) is None and len(cache) == 0
    with pytest.raises(ValueError):
        CredentialCache(b"Authorization")
