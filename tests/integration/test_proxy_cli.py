"""The one-route form, `fastgate proxy --listen ADDR --to URL`, end to end."""

from __future__ import annotations

from pathlib import Path

from conftest import Client, Gateway, Origin, build_request, chunk_encode, free_port, stream_bytes


def test_proxy_command_relays_and_stops_cleanly(origin: Origin, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    admin = f"127.0.0.1:{free_port()}"
    gw = Gateway(
        {
            "entrypoints": {"web": {"address": listen}},
            "admin": {"address": admin},
            "drain_timeout": 3,
        },
        tmp_path,
        argv=["proxy", "--listen", listen, "--to", origin.url, "--workers", "1"],
        env={"FASTGATE_ADMIN_ADDRESS": admin, "FASTGATE_DRAIN_TIMEOUT": "3"},
    ).start()
    try:
        assert len(gw.pids) == 1
        body = stream_bytes(300_000)
        with Client(gw.addr) as c:
            # Any host and path: the single route is `/` for everything.
            resp = c.request("GET", "/echo-path/cli", host="anything.example")
            assert resp.status == 200
            assert resp.body == b"/echo-path/cli"
            c.send(build_request("POST", "/echo", {"Transfer-Encoding": "chunked"}))
            c.send(chunk_encode(body))
            resp = c.read_response()
            assert resp.status == 200
            assert resp.body == body
    finally:
        gw.stop()
