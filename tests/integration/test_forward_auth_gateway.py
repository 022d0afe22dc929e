"""forward_auth in a real gateway with the test auth service (tests/forward_auth_service.py,
in a thread of this process): a good token reaches the origin with the auth service's
X-Auth-* headers (a client's forged copy stripped), a denial is the auth service's own answer
(401 with its challenge and body, 302 with its Location) and the origin sees nothing, a slow
or absent auth service fails closed with 503, cached decisions spare the auth service, and
the auth service sees the gateway's X-Forwarded-* set and the client's credential."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Client,
    Gateway,
    Origin,
    assert_error,
    base_config,
    build_request,
    chunk_encode,
    free_port,
    get,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for the service
from forward_auth_service import CHALLENGE, AuthService, running_service

TIMEOUT = 1.0
BODY_LIMIT = 4096
IDENTITY = {"subject_header": "X-Auth-User", "groups_header": "X-Auth-Groups"}


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthService]:
    with running_service(slow_seconds=TIMEOUT + 4) as svc:
        yield svc


@pytest.fixture(scope="module")
def gw(
    origin: Origin, auth: AuthService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    common: dict[str, Any] = {
        "type": "forward_auth",
        "address": auth.url,
        "allow_plaintext": True,
        "timeout": TIMEOUT,
        "request_headers": ["Authorization"],
        "response_headers": ["X-Auth-User", "X-Auth-Groups"],
        "identity": IDENTITY,
        "forward_headers": {"X-Subject": "subject"},
    }
    middlewares = {
        "fa": common,
        "cached": {**common, "cache_ttl": 30, "cache_key": ["Authorization"]},
        "down": {**common, "address": f"http://127.0.0.1:{free_port()}/verify"},
        "body": {**common, "forward_body": True, "max_body": BODY_LIMIT},
    }
    routes = [
        {"name": n, "match": {"hosts": [f"{n}.test"]}, "service": "origin", "middlewares": [n]}
        for n in middlewares
    ]
    config = base_config(origin.port, middlewares=middlewares, routes=routes)
    gateway = Gateway(config, tmp_path_factory.mktemp("forward_auth_gw")).start()
    yield gateway
    gateway.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def origin_headers(resp: Any) -> list[tuple[str, str]]:
    assert resp.status == 200, (resp.raw_head, resp.body)
    return [(k.lower(), v) for k, v in resp.json()["headers"]]


def test_admitted_with_auth_headers_and_forged_ones_stripped(
    gw: Gateway, auth: AuthService
) -> None:
    forged = {"X-Auth-User": "root", "x-auth-groups": "admin", "X-Subject": "root"}
    resp = get(gw.addr, "/headers?q=1", host="fa.test", headers={**bearer("good"), **forged})
    seen = origin_headers(resp)
    expected = {"x-auth-user": "alice", "x-auth-groups": "ops", "x-subject": "alice"}
    for name, value in expected.items():  # each once, from the auth service, none forged
        assert [v for k, v in seen if k == name] == [value], seen
    assert ("authorization", "Bearer good") in seen  # not hidden
    # What the auth service was asked, by whom, about what.
    asked = auth.last
    assert (asked.method, asked.target) == ("GET", "/verify")
    assert asked.header("authorization") == "Bearer good"
    assert asked.header("x-forwarded-method") == "GET"
    assert asked.header("x-forwarded-uri") == "/headers?q=1"
    assert asked.header("x-forwarded-host") == "fa.test"
    assert asked.header("x-forwarded-proto") == "http"
    assert asked.header("x-forwarded-for") == "127.0.0.1"
    assert asked.header("x-request-id") == dict(seen)["x-request-id"]  # one id end to end
    assert asked.header("x-auth-user") is None  # only the listed client headers


@pytest.mark.parametrize(
    "token, status, header, value, body",
    [
        pytest.param(
            "bad",
            401,
            "www-authenticate",
            CHALLENGE,
            b"token rejected by the auth service\n",
            id="401 with the auth service's challenge and body",
        ),
        pytest.param(
            "redirect",
            302,
            "location",
            "https://login.example/start?rd=/headers",
            b"",
            id="302 to the login page",
        ),
        pytest.param(
            "nothing",
            401,
            "www-authenticate",
            'Bearer realm="auth"',
            b"no credentials",
            id="unknown token",
        ),
    ],
)
def test_denial_is_relayed_and_origin_sees_nothing(
    gw: Gateway, origin: Origin, token: str, status: int, header: str, value: str, body: bytes
) -> None:
    before = origin.stats()["requests"]
    with Client(gw.addr) as c:
        resp = c.request("GET", "/headers", headers=bearer(token), host="fa.test")
        assert resp.status == status, (resp.raw_head, resp.body)
        assert resp.header(header) == value
        assert resp.body == body
        # The connection stays usable: the next request on it is admitted.
        assert c.request("GET", "/headers", headers=bearer("good"), host="fa.test").status == 200
    assert origin.stats()["requests"] == before + 2  # the admitted one and this /_stats


@pytest.mark.parametrize(
    "host, token, limit",
    [
        pytest.param("fa.test", "slow", TIMEOUT + 2.0, id="slow auth service: timeout"),
        pytest.param("down.test", "good", 3.0, id="nobody listening"),
    ],
)
def test_fails_closed(gw: Gateway, origin: Origin, host: str, token: str, limit: float) -> None:
    before = origin.stats()["requests"]
    start = time.monotonic()
    resp = get(gw.addr, "/headers", host=host, headers=bearer(token))
    elapsed = time.monotonic() - start
    doc = assert_error(resp, 503)
    assert doc["error"] == "auth service unavailable"
    assert elapsed < limit, f"took {elapsed:.1f} s"  # bounded by the timeout, not the service
    assert origin.stats()["requests"] == before + 1  # only this /_stats


def test_post_body_goes_to_origin_not_to_auth_service(gw: Gateway, auth: AuthService) -> None:
    with Client(gw.addr) as c:
        resp = c.request("POST", "/echo", headers=bearer("good"), body=b"payload", host="fa.test")
    assert resp.status == 200 and resp.body == b"payload"
    assert (auth.last.method, auth.last.body) == ("POST", b"")
    assert auth.last.header("x-forwarded-method") == "POST"


@pytest.mark.parametrize(
    "token, status, calls",
    [
        pytest.param("good", 200, 1, id="admit cached"),
        pytest.param("bad", 401, 1, id="401 cached"),
        pytest.param("nostore", 200, 3, id="Cache-Control: no-store respected"),
        pytest.param("error", 500, 3, id="500 never cached"),
    ],
)
def test_cache(gw: Gateway, auth: AuthService, token: str, status: int, calls: int) -> None:
    before = auth.count
    with Client(gw.addr) as c:
        for _ in range(3):
            resp = c.request("GET", "/headers", headers=bearer(token), host="cached.test")
            assert resp.status == status, (resp.raw_head, resp.body)
            if status == 200:
                assert ("x-auth-user", "alice") in origin_headers(resp)
    assert auth.count - before == calls


# ---- forward_body: the route reads the body first; both the auth service and the origin
# get it byte for byte ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param("length", id="Content-Length"),
        pytest.param("chunked", id="chunked, decoded for the auth service"),
        pytest.param("continue", id="Expect: 100-continue answered by the gateway"),
    ],
)
def test_forward_body_reaches_auth_service_and_origin(
    gw: Gateway, auth: AuthService, framing: str
) -> None:
    body = bytes(range(256)) * 10  # 2,560 bytes, every byte value
    headers = {**bearer("echo"), "Content-Type": "application/octet-stream"}
    with Client(gw.addr) as c:
        if framing == "chunked":
            headers["Transfer-Encoding"] = "chunked"
            resp = c.request("POST", "/echo", headers=headers, body=chunk_encode(body, (7, 300)),
                             host="body.test")  # fmt: skip
        elif framing == "continue":
            headers.update({"Expect": "100-continue", "Content-Length": str(len(body))})
            c.send(build_request("POST", "/echo", headers, b"", "body.test"))
            interim = c.read_response(interim=True)
            assert interim.status == 100
            c.send(body)
            resp = c.read_response()
            while resp.status == 100:  # the origin's own interim answer may follow
                resp = c.read_response()
        else:
            resp = c.request("POST", "/echo", headers=headers, body=body, host="body.test")
        assert resp.status == 200, resp.body
        assert resp.body == body  # the origin got it whole
        seen = auth.last
        assert seen.body == body and seen.header("content-type") == "application/octet-stream"
        # The connection stays usable after a buffered body.
        again = c.request("GET", "/headers", headers=bearer("good"), host="body.test")
        assert again.status == 200


def test_forward_body_over_the_limit_is_413(gw: Gateway, auth: AuthService) -> None:
    before = len(auth.requests)
    with Client(gw.addr) as c:
        resp = c.request("POST", "/echo", headers=bearer("echo"), body=b"x" * (BODY_LIMIT + 1),
                         host="body.test")  # fmt: skip
    assert_error(resp, 413)
    assert len(auth.requests) == before  # never asked


def test_forward_body_refusal_keeps_the_connection(gw: Gateway, auth: AuthService) -> None:
    with Client(gw.addr) as c:
        resp = c.request("POST", "/echo", headers=bearer("bad"), body=b"secret payload",
                         host="body.test")  # fmt: skip
        assert resp.status == 401 and resp.body == b"token rejected by the auth service\n"
        assert auth.last.body == b"secret payload"
        again = c.request("GET", "/headers", headers=bearer("good"), host="body.test")
        assert again.status == 200  # the body was read: no need to close
