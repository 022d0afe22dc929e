"""The `compress` middleware: its options (defaults, key-path errors), the CompressRule it
exposes for compile.py, and what happens when the brotli package is missing. The rules of
negotiate() themselves are tested in test_compress_core.py."""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any

import pytest

from fastgate._core import compress as core
from fastgate._core.compress import CompressRule, compress_body, negotiate_heads
from fastgate.errors import ConfigError
from fastgate.middleware import registry
from fastgate.middleware.compress import Compress

REQ_BOTH = b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip, br\r\n\r\n"
REQ_GZIP = b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n"


def need_brotli() -> None:
    """Skip without brotli, except under CI=true where it must be installed."""
    if not core.BROTLI_AVAILABLE:
        message = "the brotli package is not installed: the br tests need it (pip install brotli)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def dechunk(data: bytes) -> bytes:
    """The payload of a complete chunked body (framing is checked in test_compress_core.py)."""
    out = []
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert data == b"\r\n"
            return b"".join(out)
        out.append(data[:size])
        data = data[size + 2 :]


def resp(content_type: str, length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nContent-Length: %d\r\n\r\n" % (
        content_type.encode(),
        length,
    )


def test_defaults() -> None:
    need_brotli()
    mw = registry.build("squeeze", "compress", {})
    assert isinstance(mw, Compress)
    assert not hasattr(mw, "on_request")
    rule = mw.compress_rule
    assert isinstance(rule, CompressRule)
    assert rule.algorithms == ("br", "gzip")
    assert rule.min_bytes == 1024
    assert rule.content_types == core.DEFAULT_CONTENT_TYPES
    assert (rule.gzip_level, rule.brotli_quality) == (6, 4)
    assert mw.stats()["algorithms"] == ["br", "gzip"]


def test_options_reach_the_rule() -> None:
    mw = Compress(
        {
            "algorithms": ["gzip"],
            "min_bytes": 10,
            "content_types": ["Application/Vnd.Api+Json", "font/*"],
            "gzip_level": 9,
            "brotli_quality": 11,
        },
        "c",
    )
    rule = mw.compress_rule
    assert rule.algorithms == ("gzip",)
    assert rule.content_types == ("application/vnd.api+json", "font/*")
    assert (rule.min_bytes, rule.gzip_level, rule.brotli_quality) == (10, 9, 11)
    body = b"x" * 10
    out = compress_body(rule, REQ_BOTH, resp("font/woff", len(body)), [body])
    assert out is not None
    assert zlib.decompress(dechunk(out), wbits=31) == body
    assert negotiate_heads(rule, REQ_BOTH, resp("font/woff", 9)) is None  # below min_bytes
    assert negotiate_heads(rule, REQ_BOTH, resp("text/html", 2000)) is None  # not listed


def test_algorithm_order_is_the_preference() -> None:
    need_brotli()
    gzip_first = Compress({"algorithms": ["gzip", "br"]}, "c").compress_rule
    enc = negotiate_heads(gzip_first, REQ_BOTH, resp("text/plain", 4096))
    assert enc is not None
    assert enc.algorithm == "gzip"
    enc = negotiate_heads(Compress({}, "c").compress_rule, REQ_BOTH, resp("text/plain", 4096))
    assert enc is not None
    assert enc.algorithm == "br"


@pytest.mark.parametrize(
    ("options", "path"),
    [
        pytest.param({"level": 5}, "level", id="unknown key"),
        pytest.param({"algorithms": ["gzip", "zstd"]}, "algorithms[1]", id="unknown algorithm"),
        pytest.param({"algorithms": "gzip"}, "algorithms", id="algorithms not a list"),
        pytest.param({"algorithms": []}, "algorithms", id="no algorithm"),
        pytest.param({"algorithms": ["gzip", "gzip"]}, "algorithms[1]", id="repeated algorithm"),
        pytest.param({"min_bytes": -1}, "min_bytes", id="negative min_bytes"),
        pytest.param({"min_bytes": "1k"}, "min_bytes", id="min_bytes not an int"),
        pytest.param({"min_bytes": 1.5}, "min_bytes", id="min_bytes float"),
        pytest.param({"content_types": []}, "content_types", id="no content type"),
        pytest.param({"content_types": ["text/html", "html"]}, "content_types[1]",
                     id="no slash"),
        pytest.param({"content_types": ["*/*"]}, "content_types[0]", id="wildcard type"),
        pytest.param({"content_types": ["text/h*"]}, "content_types[0]",
                     id="partial wildcard"),
        pytest.param({"content_types": ["text/html; charset=utf-8"]}, "content_types[0]",
                     id="parameters"),
        pytest.param({"content_types": ["text/html", "Text/HTML"]}, "content_types[1]",
                     id="repeated content type"),
        pytest.param({"content_types": [7]}, "content_types[0]", id="content type not str"),
        pytest.param({"gzip_level": 0}, "gzip_level", id="gzip level 0"),
        pytest.param({"gzip_level": 10}, "gzip_level", id="gzip level 10"),
        pytest.param({"gzip_level": "6"}, "gzip_level", id="gzip level as text"),
        pytest.param({"gzip_level": True}, "gzip_level", id="gzip level bool"),
        pytest.param({"brotli_quality": -1}, "brotli_quality", id="brotli quality -1"),
        pytest.param({"brotli_quality": 12}, "brotli_quality", id="brotli quality 12"),
    ],
)  # fmt: skip
def test_option_errors_name_the_key(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        Compress(options, "c")
    assert info.value.path == path


def test_errors_are_all_listed() -> None:
    with pytest.raises(ConfigError) as info:
        Compress({"gzip_level": 0, "brotli_quality": 99, "colour": "red"}, "c")
    assert {path for path, _ in info.value.errors} == {"gzip_level", "brotli_quality", "colour"}


def test_without_brotli(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A host without the brotli package: br is skipped with one warning, br alone refused."""
    monkeypatch.setattr(core, "BROTLI_AVAILABLE", False)
    with caplog.at_level(logging.WARNING, logger="fastgate.compress"):
        mw = Compress({}, "squeeze")
    assert mw.compress_rule.algorithms == ("gzip",)
    warnings = [r for r in caplog.records if r.name == "fastgate.compress"]
    assert len(warnings) == 1
    assert "brotli" in warnings[0].getMessage()
    assert "squeeze" in warnings[0].getMessage()
    enc = negotiate_heads(mw.compress_rule, REQ_BOTH, resp("text/plain", 4096))
    assert enc is not None
    assert enc.algorithm == "gzip"
    req_br = b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: br\r\n\r\n"
    assert negotiate_heads(mw.compress_rule, req_br, resp("text/plain", 4096)) is None
    with pytest.raises(ConfigError) as info:
        Compress({"algorithms": ["br"]}, "squeeze")
    assert info.value.path == "algorithms"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastgate.compress"):
        Compress({"algorithms": ["gzip"]}, "quiet")
    assert not caplog.records


def test_stats_show_the_settings() -> None:
    stats = Compress({"algorithms": ["gzip"], "min_bytes": 0}, "c").stats()
    assert stats == {
        "algorithms": ["gzip"],
        "min_bytes": 0,
        "content_types": list(core.DEFAULT_CONTENT_TYPES),
        "gzip_level": 6,
        "brotli_quality": 4,
    }


def test_gzip_request_gets_gzip_with_default_options() -> None:
    rule = Compress({}, "c").compress_rule
    body = b"{" + b'"k": "value", ' * 200 + b"}"
    out = compress_body(rule, REQ_GZIP, resp("application/json", len(body)), [body])
    assert out is not None
    assert out.endswith(b"0\r\n\r\n")
