"""Request ids and W3C trace context through a real gateway (docs/observability.md).

The origin's /headers echoes the head it received, so each test checks both hops: what the
service saw (one X-Request-ID, one traceparent: the client's trace id with the gateway's span
as parent) and what the client got back (the same X-Request-ID and a traceresponse naming the
gateway's span), on relayed responses, the gateway's own errors and middleware refusals.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    Client,
    Gateway,
    Origin,
    Response,
    assert_error,
    base_config,
    build_request,
    free_port,
    get,
)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
VALID = f"00-{TID}-{PID}-01"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def entrypoint(**forwarded: Any) -> dict[str, Any]:
    return {"address": f"127.0.0.1:{free_port()}", "forwarded": forwarded}


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    middlewares = {
        "jwt": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": "s" * 64},
    }
    routes = [
        {"name": "auth", "match": {"hosts": ["auth.test"]}, "service": "origin",
         "middlewares": ["jwt"]},
        {"name": "origin", "match": {"hosts": ["origin.test"]}, "service": "origin"},
    ]  # fmt: skip
    entrypoints = {
        "web": entrypoint(),
        "never": entrypoint(trust_trace_context="never", trust_request_id="never"),
        "trusted": entrypoint(trusted_ips=["127.0.0.1"], trust_trace_context="trusted"),
        "untrusted": entrypoint(
            trusted_ips=["192.0.2.0/24"], trust_trace_context="trusted", trust_request_id="trusted"
        ),
        "sampled": entrypoint(trace_sampled=True),
    }
    cfg = base_config(origin.port, middlewares=middlewares, routes=routes, entrypoints=entrypoints)
    return start_gateway(cfg)


def exchange(gateway: Gateway, headers: dict[str, str], entrypoint: str = "web") -> tuple:
    """(origin saw: name -> values, the response to the client)."""
    with Client(gateway.address(entrypoint)) as c:
        c.send(build_request("GET", "/headers", headers))
        resp = c.read_response()
    assert resp.status == 200, resp.body
    seen: dict[str, list[str]] = {}
    for k, v in resp.json()["headers"]:
        seen.setdefault(k.lower(), []).append(v)
    return seen, resp


def one_trace(values: list[str] | None) -> tuple[str, str, str]:
    assert values is not None and len(values) == 1, values
    m = TRACEPARENT.match(values[0])
    assert m is not None, values
    return m.group(1), m.group(2), m.group(3)


def assert_ids_returned(resp: Response, request_id: str, traceparent: str) -> None:
    """The client sees one X-Request-ID and one traceresponse: the ones the service got."""
    assert resp.all("X-Request-ID") == [request_id]
    assert resp.all("traceresponse") == [traceparent]


def test_client_trace_is_continued(gw: Gateway) -> None:
    seen, resp = exchange(gw, {"traceparent": VALID, "tracestate": "vendor=1,other=x"})
    trace_id, parent, flags = one_trace(seen.get("traceparent"))
    assert (trace_id, flags) == (TID, "01")
    assert parent != PID  # the gateway's span is the service's parent
    assert seen.get("tracestate") == ["vendor=1,other=x"]
    assert len(seen["x-request-id"]) == 1 and HEX32.match(seen["x-request-id"][0])
    assert_ids_returned(resp, seen["x-request-id"][0], seen["traceparent"][0])


def test_trace_started_when_absent_or_invalid(gw: Gateway) -> None:
    for headers in ({}, {"traceparent": VALID.upper(), "tracestate": "vendor=1"}):
        seen, resp = exchange(gw, headers)
        trace_id, _, flags = one_trace(seen.get("traceparent"))
        assert trace_id != TID and flags == "00"
        assert "tracestate" not in seen  # never without its traceparent
        assert_ids_returned(resp, seen["x-request-id"][0], seen["traceparent"][0])


def test_each_request_is_its_own_span(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        spans, ids = set(), set()
        for _ in range(3):
            c.send(build_request("GET", "/headers", {"traceparent": VALID}))
            resp = c.read_response()
            trace_id, span, _ = one_trace(resp.all("traceresponse"))
            assert trace_id == TID
            spans.add(span)
            ids.add(resp.header("X-Request-ID"))
    assert len(spans) == 3 and len(ids) == 3


@pytest.mark.parametrize(
    ("entry", "continued", "rid_kept"),
    [
        pytest.param("never", False, False, id="never: a new trace and id"),
        pytest.param("trusted", True, True, id="trusted peer: continued"),
        pytest.param("untrusted", False, False, id="peer not in trusted_ips: a new trace and id"),
    ],
)
def test_trust_settings(gw: Gateway, entry: str, continued: bool, rid_kept: bool) -> None:
    headers = {"traceparent": VALID, "tracestate": "v=1", "X-Request-ID": "client-7"}
    seen, resp = exchange(gw, headers, entry)
    trace_id, _, _ = one_trace(seen.get("traceparent"))
    assert (trace_id == TID) is continued
    assert ("tracestate" in seen) is continued
    assert (seen["x-request-id"] == ["client-7"]) is rid_kept
    assert_ids_returned(resp, seen["x-request-id"][0], seen["traceparent"][0])


def test_started_traces_sampled_when_configured(gw: Gateway) -> None:
    seen, _ = exchange(gw, {}, "sampled")
    assert one_trace(seen.get("traceparent"))[2] == "01"


def test_gateway_404_carries_the_ids(gw: Gateway) -> None:
    resp = get(gw.addr, "/x", host="unknown.test", headers={"traceparent": VALID})
    doc = assert_error(resp, 404)
    assert resp.all("X-Request-ID") == [doc["request_id"]]
    assert one_trace(resp.all("traceresponse"))[0] == TID


def test_malformed_request_gets_a_request_id(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: origin.test\r\nBad Header: x\r\n\r\n")
        resp = c.read_response()
    doc = assert_error(resp, 400)
    assert resp.all("X-Request-ID") == [doc["request_id"]]
    assert resp.all("traceresponse") == []  # no head, no trace


def test_middleware_refusal_carries_the_ids(gw: Gateway) -> None:
    resp = get(
        gw.addr, "/headers", host="auth.test",
        headers={"traceparent": VALID, "X-Request-ID": "client-9"},
    )  # fmt: skip
    assert resp.status == 401
    assert resp.json()["request_id"] == "client-9"
    assert resp.all("X-Request-ID") == ["client-9"]
    trace_id, span, flags = one_trace(resp.all("traceresponse"))
    assert (trace_id, flags) == (TID, "01") and span != PID


# ---- an upstream that sends its own ids ------------------------------------------------------


UPSTREAM_IDS = (
    b"HTTP/1.1 200 OK\r\nX-Request-ID: upstream-id\r\n"
    b"traceresponse: 00-11111111111111111111111111111111-2222222222222222-01\r\n"
    b"Content-Length: 2\r\n\r\nok"
)


@pytest.fixture
def chatty_origin() -> Iterator[int]:
    """A one-thread origin on 127.0.0.1 answering every request with its own ids."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                buf = b""
                try:
                    while not stop.is_set():
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                        while b"\r\n\r\n" in buf:
                            _, buf = buf.split(b"\r\n\r\n", 1)
                            conn.sendall(UPSTREAM_IDS)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def test_upstream_ids_are_replaced(
    chatty_origin: int, start_gateway: Callable[[dict[str, Any]], Gateway]
) -> None:
    gw = start_gateway(base_config(chatty_origin))
    resp = get(gw.addr, "/", headers={"traceparent": VALID, "X-Request-ID": "client-1"})
    assert resp.status == 200 and resp.body == b"ok"
    assert resp.all("X-Request-ID") == ["client-1"]
    trace_id, span, _ = one_trace(resp.all("traceresponse"))
    assert trace_id == TID and span not in (PID, "2222222222222222")
