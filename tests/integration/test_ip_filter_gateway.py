"""The ip_filter middleware in a real gateway: a client in the allow list reaches the origin,
one in a deny list gets 403 and an `ip_denied` audit line, and behind a trusted proxy the
X-Forwarded-For client is judged (the proxy itself is not)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, Origin, assert_error, base_config, free_port, get

FLUSH = 0.05
WAIT = 10.0


@pytest.fixture
def gw(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> Gateway:
    middlewares = {
        "local_only": {"type": "ip_filter", "allow": ["127.0.0.1"]},
        "no_loopback": {"type": "ip_filter", "deny": ["127.0.0.0/8"]},
        "no_doc_net": {"type": "ip_filter", "deny": ["203.0.113.0/24"]},
    }
    routes = [
        {
            "name": name,
            "match": {"hosts": [f"{name}.test"]},
            "service": "origin",
            "middlewares": [name],
        }
        for name in middlewares
    ]
    return start_gateway(
        base_config(
            origin.port,
            entrypoints={
                "web": {"address": f"127.0.0.1:{free_port()}"},
                "proxied": {
                    "address": f"127.0.0.1:{free_port()}",
                    "forwarded": {"trusted_ips": ["127.0.0.1"]},
                },
            },
            middlewares=middlewares,
            routes=routes,
            audit_log={"path": str(tmp_path / "audit.log"), "flush_interval": FLUSH},
        )
    )


def audit_events(path: Path, count: int) -> list[dict[str, Any]]:
    """The audit file's events once it has `count` (polled, bounded in time)."""
    deadline = time.monotonic() + WAIT
    while True:
        text = path.read_text() if path.exists() else ""
        events = [json.loads(line) for line in text.splitlines()]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(FLUSH)


def test_allowed_client_reaches_the_origin(gw: Gateway) -> None:
    resp = get(gw.addr, "/echo-path/a", host="local_only.test")
    assert resp.status == 200


def test_denied_client_gets_403_and_an_audit_line(gw: Gateway, tmp_path: Path) -> None:
    resp = get(gw.addr, "/echo-path/b", host="no_loopback.test")
    body = assert_error(resp, 403)
    assert "127.0.0.1" not in json.dumps(body)
    (event,) = audit_events(tmp_path / "audit.log", 1)
    assert (event["event"], event["source"], event["reason"]) == (
        "ip_denied",
        "no_loopback",
        "client address denied",
    )
    assert event["status"] == 403 and event["client_ip"] == "127.0.0.1"
    assert event["request_id"] == resp.header("X-Request-ID")


@pytest.mark.parametrize(
    ("entrypoint", "xff", "status"),
    [
        pytest.param("proxied", "203.0.113.9", 403, id="trusted-proxy-forwards-denied-client"),
        pytest.param("proxied", "198.51.100.1", 200, id="trusted-proxy-forwards-other-client"),
        pytest.param("web", "203.0.113.9", 200, id="untrusted-peer-header-ignored"),
    ],
)
def test_forwarded_client_is_judged_behind_a_trusted_proxy(
    gw: Gateway, tmp_path: Path, entrypoint: str, xff: str, status: int
) -> None:
    resp = get(
        gw.address(entrypoint),
        "/echo-path/c",
        host="no_doc_net.test",
        headers={"X-Forwarded-For": xff},
    )
    assert resp.status == status
    if status == 403:
        (event,) = audit_events(tmp_path / "audit.log", 1)
        assert (event["event"], event["source"]) == ("ip_denied", "no_doc_net")
        assert event["client_ip"] == "203.0.113.9"
