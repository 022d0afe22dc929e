"""Connection reuse on both sides, pool expiry, the keep-alive race, and upgrade tunnels.

The origin stamps every response with `X-Conn-Id` (its number for the TCP connection) and
counts accepted connections, so these tests see exactly which upstream connection served what.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from conftest import Client, Gateway, MiB, Origin, build_request, stream_bytes, wait_for


def conn_id(resp) -> int:
    value = resp.header("X-Conn-Id")
    assert value is not None, resp.raw_head
    return int(value)


def test_keep_alive_both_sides_one_upstream_connection(gateway: Gateway, origin: Origin) -> None:
    # reuse.test has its own pool, untouched by other tests: one upstream connection is made.
    before = origin.data_connections()
    with Client(gateway.addr) as c:
        ids = set()
        for i in range(50):
            method = "POST" if i % 3 == 0 else "GET"
            body = b"b" * i if method == "POST" else b""
            resp = c.request(
                method, "/echo" if body else f"/echo-path/{i}", body=body, host="reuse.test"
            )
            assert resp.status == 200
            assert resp.body == (body or f"/echo-path/{i}".encode())
            ids.add(conn_id(resp))
    assert len(ids) == 1, ids
    assert origin.data_connections() - before == 1


def test_pooled_connection_reused_across_client_connections(
    gateway: Gateway, origin: Origin
) -> None:
    ids = set()
    for i in range(5):
        with Client(gateway.addr) as c:
            resp = c.request("GET", f"/echo-path/{i}", host="reuse.test")
            assert resp.status == 200
            ids.add(conn_id(resp))
    assert len(ids) == 1, ids
    assert ids.pop() in origin.stats()["open"]


def test_pool_idle_timeout_closes_idle_upstream(gateway: Gateway, origin: Origin) -> None:
    # shortpool.test: pool.idle_timeout 0.3 s.
    with Client(gateway.addr) as c:
        first = conn_id(c.request("GET", "/echo-path/a", host="shortpool.test"))
        assert first in origin.stats()["open"]
        # The gateway, not the origin, closes it once it has been idle long enough.
        assert wait_for(lambda: first in origin.stats()["closed_by_peer"], timeout=3.0)
        second = conn_id(c.request("GET", "/echo-path/b", host="shortpool.test"))
    assert second != first


def test_pool_keeps_connection_within_idle_timeout(gateway: Gateway, origin: Origin) -> None:
    with Client(gateway.addr) as c:
        ids = []
        for _ in range(4):
            ids.append(conn_id(c.request("GET", "/echo-path/a", host="shortpool.test")))
            time.sleep(0.05)
    assert len(set(ids)) == 1, ids


def test_reused_connection_closed_by_origin_get_is_retried(
    gateway: Gateway, origin: Origin
) -> None:
    with Client(gateway.addr) as c:
        # The origin answers this, then closes the connection when the next request arrives
        # on it, without answering: the keep-alive race of RFC 9112 §9.3.1.
        resp = c.request("GET", "/echo-path/1", {"X-Origin-Drop-Next": "1"})
        assert resp.status == 200
        doomed = conn_id(resp)
        before = origin.data_connections()
        resp = c.request("GET", "/echo-path/2")
        assert resp.status == 200
        assert resp.body == b"/echo-path/2"
        assert conn_id(resp) != doomed
    stats = origin.stats()
    assert doomed in stats["dropped"]
    assert stats["accepted"] - stats["control"] - before == 1


def test_reused_connection_closed_by_origin_post_is_not_replayed(
    gateway: Gateway, origin: Origin
) -> None:
    # A request with a body is not sent twice (it may have been acted on): 502.
    with Client(gateway.addr) as c:
        doomed = conn_id(c.request("GET", "/echo-path/1", {"X-Origin-Drop-Next": "1"}))
        resp = c.request("POST", "/echo", body=b"once only")
        assert resp.status == 502
    assert doomed in origin.stats()["dropped"]


@pytest.mark.parametrize("gap", [0.05, 0.15, 0.2, 0.25, 0.4])
def test_origin_keep_alive_timeout_never_leaks_a_502(gateway: Gateway, gap: float) -> None:
    # The origin closes idle connections after 0.2 s; requests arriving around that moment
    # find the pooled connection alive, closing or closed. Each must succeed.
    with Client(gateway.addr) as c:
        for i in range(3):
            resp = c.request("GET", f"/echo-path/{i}", {"X-Origin-Keepalive": "0.2"})
            assert resp.status == 200, resp.body
            assert resp.body == f"/echo-path/{i}".encode()
            time.sleep(gap)


def upgrade_request(path: str = "/ws") -> bytes:
    return build_request(
        "GET",
        path,
        {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )


def test_upgrade_tunnels_bytes_both_ways(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(upgrade_request())
        resp = c.read_response()
        assert resp.status == 101
        assert resp.header("Upgrade") == "websocket"
        assert resp.header("Connection") == "Upgrade"
        # The origin speaks first (sent with its 101), then echoes.
        assert c.read_exact(6) == b"hello\n"
        for msg in (b"ping", b"\x00\x01\x02\xff", b"GET / HTTP/1.1\r\n\r\n"):
            c.send(msg)
            assert c.read_exact(len(msg)) == msg
        # A large amount both ways at once, with back-pressure in play.
        big = stream_bytes(4 * MiB, offset=99)
        sender = threading.Thread(target=c.send, args=(big,))
        sender.start()
        got = c.read_exact(len(big))
        sender.join(10)
        assert got == big


def test_upgrade_bytes_sent_with_the_head_reach_the_origin(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(upgrade_request() + b"early bytes")
        resp = c.read_response()
        assert resp.status == 101
        assert c.read_exact(6 + 11) == b"hello\nearly bytes"


def test_upgrade_closed_by_client_closes_the_upstream(gateway: Gateway, origin: Origin) -> None:
    c = Client(gateway.addr)
    c.send(upgrade_request())
    resp = c.read_response()
    assert resp.status == 101
    tunnel = conn_id(resp)
    assert tunnel in origin.stats()["open"]
    c.close()
    # The client's FIN goes through the tunnel; the origin closes and so does the gateway.
    assert wait_for(lambda: tunnel not in origin.stats()["open"], timeout=2)
    with Client(gateway.addr) as c2:
        assert c2.request("GET", "/echo-path/x").body == b"/echo-path/x"


def test_upgrade_half_close_passes_through(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(upgrade_request())
        assert c.read_response().status == 101
        assert c.read_exact(6) == b"hello\n"
        c.send(b"last words")
        c.sock.shutdown(socket.SHUT_WR)
        # The echo still comes back, then the end of the stream.
        assert c.read_to_eof() == b"last words"


def test_upgrade_refused_by_origin_is_a_normal_response(gateway: Gateway) -> None:
    # The origin's /echo-path ignores Upgrade and answers 200: no tunnel, the connection
    # stays HTTP.
    with Client(gateway.addr) as c:
        c.send(upgrade_request("/echo-path/no-ws"))
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == b"/echo-path/no-ws"
        assert c.request("GET", "/echo-path/next").body == b"/echo-path/next"


def test_origin_connection_close_is_not_pooled(gateway: Gateway, origin: Origin) -> None:
    # The origin says `Connection: close` on a response with a length, and closes. Pipelined
    # behind it, a POST (which may not be replayed) must get a new upstream connection, not
    # the one the origin announced it was closing.
    body = b"must arrive once"
    with Client(gateway.addr) as c:
        c.send(
            build_request("GET", "/echo-path/closing", {"X-Origin-Close": "1"})
            + build_request("POST", "/echo", body=body)
        )
        first = c.read_response()
        assert first.status == 200
        assert first.body == b"/echo-path/closing"
        assert first.header("Connection") is None  # hop-by-hop: not relayed to the client
        second = c.read_response()
        assert second.status == 200, second.body
        assert second.body == body
        assert conn_id(second) != conn_id(first)
        assert c.request("GET", "/echo-path/3").status == 200


def test_client_connection_close(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        resp = c.request("GET", "/echo-path/bye", {"Connection": "close"})
        assert resp.status == 200
        assert resp.body == b"/echo-path/bye"
        assert resp.header("Connection") == "close"
        assert c.is_closed()


def test_half_closed_client_still_gets_its_response(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        c.send(build_request("GET", "/bytes/200000"))
        c.sock.shutdown(socket.SHUT_WR)
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == stream_bytes(200000)
        assert c.is_closed()


def test_half_closed_client_gets_every_pipelined_response(gateway: Gateway) -> None:
    # Three complete requests (one without a route), then FIN: all are answered, in order,
    # then the gateway closes.
    with Client(gateway.addr) as c:
        c.send(
            build_request("GET", "/echo-path/0")
            + build_request("GET", "/x", host="unknown.test")
            + build_request("POST", "/echo", body=b"two")
            + build_request("GET", "/bytes/100000")
        )
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_response().body == b"/echo-path/0"
        assert c.read_response().status == 404
        assert c.read_response().body == b"two"
        assert c.read_response().body == stream_bytes(100000)
        assert c.is_closed()


def test_client_gone_mid_response_closes_upstream(gateway: Gateway, origin: Origin) -> None:
    c = Client(gateway.addr)
    c.send(build_request("GET", f"/bytes/{64 * MiB}"))
    assert c.read_head()[0] == 200
    c.read_exact(100_000)
    stream = origin.stats()["last_stream"]
    c.close()
    # The upstream connection cannot be reused mid-body: the gateway closes it.
    assert wait_for(lambda: stream["conn"] in origin.stats()["closed_by_peer"], timeout=3)
    assert not origin.stats()["last_stream"]["done"]
    assert_serves_ok(gateway)


def test_client_reset_while_waiting_closes_upstream(gateway: Gateway, origin: Origin) -> None:
    # A FIN alone may be a half-close (the client still reads, see above); a reset is not.
    c = Client(gateway.addr)
    c.send(build_request("GET", "/sleep/2", host="reuse.test"))
    assert wait_for(lambda: "/sleep/2" in origin.stats()["inflight"].values(), timeout=2)
    inflight = origin.stats()["inflight"]
    (sleeper,) = [int(k) for k, v in inflight.items() if v == "/sleep/2"]
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    # Closed by the gateway well before the origin would have answered.
    assert wait_for(lambda: sleeper in origin.stats()["closed_by_peer"], timeout=1.0)
    assert_serves_ok(gateway)


def assert_serves_ok(gateway: Gateway) -> None:
    with Client(gateway.addr) as c:
        assert c.request("GET", "/echo-path/ok").body == b"/echo-path/ok"


def test_idle_upstream_that_talks_is_dropped(gateway: Gateway, origin: Origin) -> None:
    # Bytes from an idle pooled connection answer nothing: the gateway closes it rather than
    # take them for the start of the next response.
    with Client(gateway.addr) as c:
        first = conn_id(c.request("GET", "/echo-path/1", {"X-Origin-Junk-After": "1"}))
        assert wait_for(lambda: first in origin.stats()["closed_by_peer"], timeout=2)
        resp = c.request("GET", "/echo-path/2")
        assert resp.status == 200
        assert resp.body == b"/echo-path/2"
        assert conn_id(resp) != first
