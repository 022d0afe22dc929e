"""LogRuntime (fastgate/logs/runtime.py) and Python audit events (fastgate/logs/events.py):
the streams built from the config, hand-over on `on_ready` and on the timer, counting into
a private Shard's K_LOG rows, writer drops, close, reload settings; TLS client-certificate
failures as audit events (fastgate/tls/server.py) through real memory-BIO handshakes.

Real LogStreams, writer threads, files and pipes; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from fastgate._core import accesslog
from fastgate._core.stats import OFFSETS, Shard
from fastgate.config.schema import Config, parse_config
from fastgate.errors import ConfigError
from fastgate.logs import events
from fastgate.logs.events import AUDIT_KEYS, format_event
from fastgate.logs.runtime import (
    FLUSH_AT,
    K_LOG,
    LogRuntime,
    credential_query_keys,
    log_settings,
    redact_keys,
)
from fastgate.tls.server import audited_sslobject_class, verify_failure_reason


def config(**extra: Any) -> Config:
    return parse_config(
        {
            "entrypoints": {"web": {"address": "127.0.0.1:8080"}},
            "services": {"api": {"servers": [{"url": "http://127.0.0.1:9000"}]}},
            "routes": [{"name": "api", "service": "api"}],
            **extra,
        }
    )


def files(tmp_path: Path, **access: Any) -> Config:
    return config(
        access_log={"enabled": True, "path": str(tmp_path / "access.log"), **access},
        audit_log={"path": str(tmp_path / "audit.log")},
    )


def access_line(n: int, pad: int = 0) -> bytes:
    return b'{"type":"access","n":%d,"pad":"%s"}\n' % (n, b"x" * pad)


def log_rows(shard: Shard) -> dict[str, tuple[int, int]]:
    return {
        labels[0]: (words[OFFSETS["log_lines"]], words[OFFSETS["log_dropped"]])
        for labels, words in shard.table(K_LOG)
    }


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class FakeEngine:
    """What install() sets: the two public Engine attributes."""

    alog: Any = "unset"
    client_resolver: Any = "unset"


# ---- building --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, streams",
    [
        pytest.param({"audit_log": {"enabled": False}}, (), id="all off: no AccessLog"),
        pytest.param({}, ("audit",), id="defaults: audit only"),
        pytest.param({"access_log": {"enabled": True}}, ("access", "audit"), id="access + audit"),
        pytest.param(
            {"access_log": {"enabled": True}, "audit_log": {"enabled": False}},
            ("access",),
            id="access only",
        ),
    ],
)
def test_streams_built_from_the_config(extra: dict[str, Any], streams: tuple[str, ...]) -> None:
    async def main() -> None:
        runtime = LogRuntime(config(**extra), asyncio.get_running_loop())
        engine = FakeEngine()
        runtime.install(engine)
        assert tuple(runtime.sinks) == streams
        if not streams:
            assert runtime.alog is None and engine.alog is None
        else:
            alog = runtime.alog
            assert engine.alog is alog
            for name in ("access", "audit", "spans"):
                stream = getattr(alog, name)
                sink = runtime.sinks.get(name)
                assert (stream is None) == (sink is None)
                if sink is not None:
                    assert stream is sink.stream
                    assert stream.capacity == 1048576
        assert await runtime.close(5)

    run(main())


def test_access_log_settings_reach_the_access_log(tmp_path: Path) -> None:
    cfg = files(tmp_path, format="combined", sample=0.0, always_log_errors=False)

    async def main() -> None:
        runtime = LogRuntime(cfg, asyncio.get_running_loop())
        assert runtime.alog.format == accesslog.FMT_COMBINED
        assert (runtime.alog.sample, runtime.alog.log_errors) == (0, False)
        assert await runtime.close(5)

    run(main())


def test_unopenable_path_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    cfg = config(access_log={"enabled": True, "path": str(tmp_path / "no" / "such" / "a.log")})

    async def main() -> None:
        with pytest.raises(ConfigError) as info:
            LogRuntime(cfg, asyncio.get_running_loop())
        assert info.value.errors[0][0] == "access_log.path"
        assert "cannot open" in info.value.errors[0][1]

    run(main())


def test_credential_query_parameters_are_redacted_too() -> None:
    cfg = config(
        middlewares={
            "jwt": {"type": "jwt_auth", "secret": "x" * 32, "token_from": "query:Access"},
            "jwt_header": {"type": "jwt_auth", "secret": "x" * 32},
            "keys": {"type": "api_key", "store": "/tmp/keys.db", "query": "X-Key"},
        }
    )
    assert credential_query_keys(cfg) == ("Access", "X-Key")
    keys = redact_keys(cfg)
    assert "access" in keys and "x-key" in keys and "token" in keys
    assert len(keys) == len(set(keys))
    # A new credential parameter is a change of the log settings (the redaction list).
    assert log_settings(cfg) != log_settings(config())
    assert log_settings(config()) == log_settings(config())
    assert log_settings(config(access_log={"sample": 0.5})) != log_settings(config())


# ---- hand-over -------------------------------------------------------------------------------


def test_the_writer_is_woken_at_flush_at_before_the_interval(tmp_path: Path) -> None:
    cfg = files(tmp_path, flush_interval=60)
    path = tmp_path / "access.log"

    async def main() -> None:
        runtime = LogRuntime(cfg, asyncio.get_running_loop())
        runtime.start()
        stream = runtime.sinks["access"].stream
        n = 0
        while stream.pending < FLUSH_AT:  # the flush threshold of a 1 MiB buffer
            assert stream.write_line(access_line(n, pad=200))
            n += 1
        assert await eventually(lambda: path.exists() and path.read_bytes().count(b"\n") == n)
        assert stream.pending == 0
        assert await runtime.close(5)
        lines = path.read_bytes().splitlines()
        assert [json.loads(x)["n"] for x in lines] == list(range(n))

    run(main())


def test_the_interval_writes_what_is_pending(tmp_path: Path) -> None:
    cfg = files(tmp_path, flush_interval=0.05)
    path = tmp_path / "access.log"

    async def main() -> None:
        runtime = LogRuntime(cfg, asyncio.get_running_loop())
        runtime.start()
        assert runtime.sinks["access"].stream.write_line(access_line(1))
        assert await eventually(lambda: path.exists() and path.read_bytes() == access_line(1))
        assert await runtime.close(5)

    run(main())


def test_close_writes_everything_and_counts(tmp_path: Path) -> None:
    shard = Shard()
    cfg = files(tmp_path, flush_interval=60)

    async def main() -> None:
        runtime = LogRuntime(cfg, asyncio.get_running_loop(), shard)
        runtime.start()
        stream = runtime.sinks["access"].stream
        for n in range(500):
            assert stream.write_line(access_line(n))
        assert await runtime.close(5)
        assert (tmp_path / "access.log").read_bytes().count(b"\n") == 500
        assert runtime.closed

    run(main())
    assert log_rows(shard)["access"] == (500, 0)


# ---- counting --------------------------------------------------------------------------------


def test_drops_and_lost_lines_counted_into_k_log_and_the_loop_never_blocks() -> None:
    """Access log to a pipe nobody reads: the writer thread blocks on the full pipe, the
    stream's buffers fill and later lines are dropped at once; when the pipe breaks, the lines
    of the blocked write are lost and counted too. K_LOG gets each growth once."""
    shard = Shard()
    r, w = os.pipe()
    cfg = config(
        access_log={"enabled": True, "path": "-", "buffer_bytes": 65536, "flush_interval": 60},
        audit_log={"enabled": False},
    )

    async def main() -> None:
        runtime = LogRuntime(cfg, asyncio.get_running_loop(), shard, stdout_fd=w)
        sink = runtime.sinks["access"]
        started = time.monotonic()
        accepted = sum(bool(sink.stream.write_line(access_line(n, pad=1000))) for n in range(1000))
        assert time.monotonic() - started < 5
        assert 0 < accepted < 1000 and sink.stream.dropped == 1000 - accepted
        runtime.count()
        assert log_rows(shard)["access"] == (accepted, 1000 - accepted)
        runtime.count()  # the growth only: nothing new
        assert log_rows(shard)["access"] == (accepted, 1000 - accepted)
        os.close(r)  # the writer's blocked write fails: its lines count as dropped too
        assert await eventually(lambda: sink.writer.error_lines > 0)
        assert await runtime.close(5)
        lines, dropped = log_rows(shard)["access"]
        assert lines == accepted
        assert dropped == sink.stream.dropped + sink.writer.error_lines
        assert "audit" not in log_rows(shard)  # audit_log off: no stream, no row

    run(main())
    os.close(w)


# ---- audit events ----------------------------------------------------------------------------


def test_audit_event_line_has_the_audit_keys_in_order() -> None:
    line = format_event(
        "tls_verify_failed",
        {"reason": "certificate verify failed: certificate revoked", "entrypoint": "websecure"},
        now=1795842003.123456,
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = json.loads(line)
    assert tuple(doc) == AUDIT_KEYS
    assert doc["time"] == "2026-11-28T05:00:03.123456Z"
    assert (doc["type"], doc["event"], doc["entrypoint"]) == (
        "audit",
        "tls_verify_failed",
        "websecure",
    )
    assert doc["client_ip"] == "" and doc["request_id"] is None and doc["status"] is None
    long = json.loads(format_event("x", {"reason": "r" * 2000}))["reason"]
    assert long == "r" * 512 + "..."
    with pytest.raises(TypeError):
        format_event("x", {"password": "never"})


def test_audit_events_written_rate_limited_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "_tokens", events.BURST)  # a full burst to start with
    shard = Shard()
    cfg = config(audit_log={"path": str(tmp_path / "audit.log")})

    async def main() -> None:
        runtime = LogRuntime(cfg, asyncio.get_running_loop(), shard)
        runtime.install(FakeEngine())
        events.take_dropped()
        written = sum(events.audit_event("tls_verify_failed", reason="r") for _ in range(300))
        assert events.BURST - 5 <= written < 300  # the burst, then the rate limit
        runtime.count()
        assert log_rows(shard)["audit"] == (written, 300 - written)
        assert await runtime.close(5)
        lines = (tmp_path / "audit.log").read_bytes().splitlines()
        assert len(lines) == written
        assert all(json.loads(x)["event"] == "tls_verify_failed" for x in lines)
        events.install(None)
        assert not events.audit_event("tls_verify_failed")  # audit off: a no-op

    run(main())


# ---- TLS client-certificate failures -----------------------------------------------------------


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLError | None:
    """A handshake through memory BIOs; the server's SSLError, or None when it succeeded."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="gw.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", client), ("s", server)):
            if done[key]:
                continue
            try:
                obj.do_handshake()
                done[key] = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as exc:
                if key == "s":
                    return exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["s"]:
            return None
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    ca, other = trustme.CA(), trustme.CA()
    return {
        "ca": ca,
        "server": ca.issue_cert("gw.test"),
        "client": ca.issue_cert("client@example.test"),
        "stranger": other.issue_cert("stranger@example.test"),
    }


def server_context(pki: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki["server"].configure_cert(ctx)
    pki["ca"].configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslobject_class = audited_sslobject_class("websecure")
    return ctx


def client_context(pki: dict[str, Any], cert: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki["ca"].configure_trust(ctx)
    if cert is not None:
        pki[cert].configure_cert(ctx)
    return ctx


@pytest.mark.parametrize(
    "cert, reason",
    [
        pytest.param(None, "peer did not return a certificate", id="no certificate"),
        pytest.param(
            "stranger",
            "certificate verify failed: unable to get local issuer certificate",
            id="untrusted issuer",
        ),
        pytest.param("client", None, id="good certificate: no event"),
    ],
)
def test_tls_verification_failures_are_audit_events(
    pki: dict[str, Any], cert: str | None, reason: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "_tokens", events.BURST)  # whatever earlier tests spent
    stream = accesslog.LogStream(1 << 16, 1 << 15)
    events.install(stream)
    events.take_dropped()
    try:
        error = handshake(server_context(pki), client_context(pki, cert))
    finally:
        events.install(None)
    lines = stream.take().splitlines()
    if reason is None:
        assert error is None and lines == []
        return
    assert error is not None and verify_failure_reason(error) == reason
    (line,) = lines
    doc = json.loads(line)
    assert tuple(doc) == AUDIT_KEYS
    assert (doc["event"], doc["reason"], doc["entrypoint"]) == (
        "tls_verify_failed",
        reason,
        "websecure",
    )
    assert "stranger@example.test" not in line.decode()  # never certificate contents


def test_other_tls_failures_are_not_audit_events() -> None:
    assert (
        verify_failure_reason(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version")) is None
    )
