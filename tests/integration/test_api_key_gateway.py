"""The api_key middleware in a real gateway, with the store managed by the real CLI while the
gateway runs: a key reaches the origin with X-Consumer set from the store (a client-forged one
is dropped) and the key header hidden; a key revoked with `fastgate keys revoke` is refused,
and a key made with `fastgate keys add` accepted, within a second."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Client, Gateway, Origin, assert_error, base_config

CHALLENGE = 'ApiKey realm="fastgate", header="X-API-Key"'


def cli(store: Path, *args: str) -> str:
    """`fastgate <args> --store <store>` as a user would run it; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGATE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "fastgate", *args, "--store", str(store)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "consumers.db"
    cli(path, "consumers", "add", "alice", "--scopes", "read,write")
    cli(path, "consumers", "add", "bob")
    return path


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], store: Path) -> Gateway:
    middlewares = {
        "keys": {
            "type": "api_key",
            "store": str(store),
            "forward_headers": {"X-Consumer": "consumer", "X-Scopes": "scopes"},
            "hide_credentials": True,
        },
        "plain": {"type": "api_key", "store": str(store), "header": "X-Key"},
    }
    routes = [
        {
            "name": name,
            "match": {"hosts": [f"{name}.test"]},
            "service": "origin",
            "middlewares": [name],
        }
        for name in ("keys", "plain")
    ]
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


def seen_headers(resp: Any) -> dict[str, list[str]]:
    """The origin's view of the request headers, by lowercase name."""
    assert resp.status == 200, resp.body
    out: dict[str, list[str]] = {}
    for name, value in resp.json()["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def call(gw: Gateway, key: str | None, host: str = "keys.test", **headers: str) -> Any:
    if key is not None:
        headers["X-API-Key" if host == "keys.test" else "X-Key"] = key
    with Client(gw.addr) as c:
        return c.request("GET", "/headers", headers=headers, host=host)


def test_key_reaches_origin_with_identity(gw: Gateway, store: Path) -> None:
    key = cli(store, "keys", "add", "alice").strip()
    with Client(gw.addr) as c:
        for _ in range(2):  # the first request on a fresh worker checks the store first
            resp = c.request(
                "GET",
                "/headers",
                headers={"X-API-Key": key, "X-Consumer": "mallory", "X-Scopes": "admin"},
                host="keys.test",
            )
            seen = seen_headers(resp)
            assert seen["x-consumer"] == ["alice"]  # the forged value is gone
            assert seen["x-scopes"] == ["read,write"]
            assert "x-api-key" not in seen  # hide_credentials


def test_key_passed_on_without_hide(gw: Gateway, store: Path) -> None:
    key = cli(store, "keys", "add", "bob").strip()
    seen = seen_headers(call(gw, key, host="plain.test"))
    assert seen["x-key"] == [key]
    assert "x-consumer" not in seen


@pytest.mark.parametrize(
    "key, message",
    [
        pytest.param(None, "missing api key", id="no key"),
        pytest.param("fgk_000000000000_" + "A" * 43, "invalid api key", id="unknown key"),
        pytest.param("not-a-key", "invalid api key", id="malformed"),
    ],
)
def test_refused(gw: Gateway, key: str | None, message: str) -> None:
    resp = call(gw, key)
    assert assert_error(resp, 401)["error"] == message
    assert resp.header("www-authenticate") == CHALLENGE


def _wait(gw: Gateway, key: str, status: int, limit: float) -> float:
    """Seconds until a request with `key` gets `status` (polling every 20 ms)."""
    start = time.monotonic()
    while True:
        resp = call(gw, key)
        if resp.status == status:
            return time.monotonic() - start
        assert time.monotonic() - start < limit, f"still {resp.status} after {limit} s"
        time.sleep(0.02)


def test_revoke_and_add_while_running(gw: Gateway, store: Path) -> None:
    key = cli(store, "keys", "add", "alice", "--label", "old").strip()
    assert call(gw, key).status == 200  # the worker's refresh task is running from here on
    other = cli(store, "keys", "add", "bob").strip()
    _wait(gw, other, 200, limit=1.5)

    cli(store, "keys", "revoke", key[4:16])
    elapsed = _wait(gw, key, 401, limit=3.0)
    assert elapsed < 1.5, f"revocation took {elapsed:.2f} s"
    assert assert_error(call(gw, key), 401)["error"] == "invalid api key"
    assert call(gw, other).status == 200  # other keys are untouched

    new = cli(store, "keys", "add", "alice", "--label", "new").strip()
    elapsed = _wait(gw, new, 200, limit=3.0)
    assert elapsed < 1.5, f"a new key took {elapsed:.2f} s"
    assert seen_headers(call(gw, new))["x-consumer"] == ["alice"]

    cli(store, "consumers", "remove", "bob")
    elapsed = _wait(gw, other, 401, limit=3.0)
    assert elapsed < 1.5, f"removing a consumer took {elapsed:.2f} s"
