"""The `compress` middleware through a real gateway: responses are encoded on the fly for
clients that accept gzip or br, whatever the upstream framing (Content-Length, chunked,
close-delimited), and decode to exactly the bytes the origin sent; everything the rules
exclude passes through unchanged (docs/compression.md)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Client, Gateway, Origin, base_config
from origin import stream_bytes


def _brotli() -> Any:
    """The brotli module (a test extra): missing fails under CI, skips elsewhere."""
    try:
        import brotli
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("brotli is not installed (pip install -e '.[test]')")
        pytest.skip("brotli is not installed")
    return brotli


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    types = ["text/*", "application/json"]
    middlewares = {
        "zip": {"type": "compress", "content_types": types, "min_bytes": 1024},
        "gzonly": {"type": "compress", "algorithms": ["gzip"], "content_types": types},
    }
    routes = [
        {"name": "zip", "match": {"hosts": ["zip.test"]}, "service": "origin",
         "middlewares": ["zip"]},
        {"name": "gz", "match": {"hosts": ["gz.test"]}, "service": "origin",
         "middlewares": ["gzonly"]},
        {"name": "plain", "match": {"hosts": ["plain.test"]}, "service": "origin"},
    ]  # fmt: skip
    return start_gateway(base_config(origin.port, middlewares=middlewares, routes=routes))


def fetch(gw: Gateway, path: str, host: str = "zip.test", **headers: str) -> Any:
    with Client(gw.addr) as c:
        return c.request("GET", path, host=host, headers=headers)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/bytes/200000?type=text/plain", id="content-length"),
        pytest.param("/chunked/200000?type=text/plain", id="chunked"),
        pytest.param("/close/200000?type=text/plain", id="close-delimited"),
    ],
)
def test_gzip_round_trip_for_every_upstream_framing(gw: Gateway, path: str) -> None:
    resp = fetch(gw, path, **{"Accept-Encoding": "gzip"})
    assert resp.status == 200
    assert resp.header("content-encoding") == "gzip"
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.header("content-length") is None
    assert "Accept-Encoding" in resp.all("vary")
    assert zlib.decompress(resp.body, wbits=31) == stream_bytes(200000)


def test_brotli_preferred_when_accepted(gw: Gateway) -> None:
    brotli = _brotli()
    resp = fetch(gw, "/bytes/50000?type=text/plain", **{"Accept-Encoding": "gzip, br"})
    assert resp.header("content-encoding") == "br"
    assert brotli.decompress(resp.body) == stream_bytes(50000)
    # A route that only offers gzip answers gzip to the same client.
    resp = fetch(
        gw, "/bytes/50000?type=text/plain", host="gz.test", **{"Accept-Encoding": "gzip, br"}
    )
    assert resp.header("content-encoding") == "gzip"
    assert zlib.decompress(resp.body, wbits=31) == stream_bytes(50000)


@pytest.mark.parametrize(
    ("host", "path", "headers"),
    [
        pytest.param("zip.test", "/bytes/50000?type=text/plain", {}, id="no Accept-Encoding"),
        pytest.param(
            "zip.test", "/bytes/50000?type=text/plain", {"Accept-Encoding": "gzip;q=0"}, id="q=0"
        ),
        pytest.param(
            "zip.test",
            "/bytes/100?type=text/plain",
            {"Accept-Encoding": "gzip"},
            id="below min_bytes",
        ),
        pytest.param(
            "plain.test",
            "/bytes/50000?type=text/plain",
            {"Accept-Encoding": "gzip"},
            id="other route",
        ),
    ],
)
def test_passes_through_unchanged(
    gw: Gateway, host: str, path: str, headers: dict[str, str]
) -> None:
    resp = fetch(gw, path, host=host, **headers)
    assert resp.status == 200
    assert resp.header("content-encoding") is None
    size = int(path.split("?")[0].rsplit("/", 1)[1])
    assert resp.header("content-length") == str(size)
    assert resp.body == stream_bytes(size)


def test_head_is_not_compressed(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        resp = c.request("HEAD", "/bytes/50000?type=text/plain", host="zip.test",
                         headers={"Accept-Encoding": "gzip"})  # fmt: skip
    assert resp.status == 200
    assert resp.header("content-encoding") is None
    assert resp.header("content-length") == "50000"


def test_keep_alive_across_compressed_responses(gw: Gateway) -> None:
    with Client(gw.addr) as c:
        for size in (30000, 70000, 5000):
            resp = c.request("GET", f"/chunked/{size}?type=text/plain", host="zip.test",
                             headers={"Accept-Encoding": "gzip"})  # fmt: skip
            assert resp.header("content-encoding") == "gzip"
            assert zlib.decompress(resp.body, wbits=31) == stream_bytes(size)
        # The connection still carries an uncompressed exchange after them.
        resp = c.request("GET", "/bytes/2000?type=text/plain", host="zip.test")
        assert resp.body == stream_bytes(2000)
