"""fastgate.tls.client and the upstream TLS keys: the client context's settings, what a
service's `tls` section refuses (by key path), what compiling puts on each ServerPool, a real
in-process handshake (names, IP SANs, client certificates), the files the supervisor watches,
and the zero_trust cross-check."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from fastgate._core.conn import Engine

from fastgate.config.compile import compile_runtime
from fastgate.config.schema import Server, UpstreamTls, parse_config
from fastgate.errors import ConfigError
from fastgate.server.supervisor import watched_files
from fastgate.tls.client import build_client_context, server_hostname, upstream_files

NOW = datetime.datetime.now(datetime.timezone.utc)
CA = trustme.CA()
OTHER_CA = trustme.CA()
SERVER = CA.issue_cert("api.internal", "127.0.0.1")
CLIENT = CA.issue_cert("gw.internal", common_name="gateway")
EXPIRED = CA.issue_cert(
    "gw.internal",
    not_before=NOW - datetime.timedelta(days=9),
    not_after=NOW - datetime.timedelta(1),
)
AT = "services.api.tls"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Every PEM the tests use, written under tmp_path; name -> path."""
    out: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        out[name] = str(tmp_path / name)
        Path(out[name]).write_bytes(data)

    put("ca.pem", CA.cert_pem.bytes())
    put("client.pem", CLIENT.cert_chain_pems[0].bytes())
    put("client.key", CLIENT.private_key_pem.bytes())
    put("other.key", EXPIRED.private_key_pem.bytes())
    put("expired.pem", EXPIRED.cert_chain_pems[0].bytes())
    put("expired.key", EXPIRED.private_key_pem.bytes())
    put("garbage.pem", b"hello\n")
    key = load_pem_private_key(CLIENT.private_key_pem.bytes(), None)
    put(
        "encrypted.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    )
    out["missing"] = str(tmp_path / "nope.pem")
    return out


def _tls(files: dict[str, str], **keys: str | bool) -> UpstreamTls:
    """An UpstreamTls whose file keys name `files` entries."""
    resolved = {k: files.get(v, v) if isinstance(v, str) else v for k, v in keys.items()}
    return UpstreamTls.model_validate(resolved)


# ---- the context -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "version"),
    [
        pytest.param({}, ssl.TLSVersion.TLSv1_2, id="defaults"),
        pytest.param({"min_version": "1.3"}, ssl.TLSVersion.TLSv1_3, id="1.3"),
        pytest.param({"min_version": 1.3}, ssl.TLSVersion.TLSv1_3, id="unquoted 1.3 in YAML"),
    ],
)
def test_context_verifies_by_default(keys: dict[str, Any], version: ssl.TLSVersion) -> None:
    ctx = build_client_context(AT, UpstreamTls.model_validate(keys))
    assert ctx.protocol == ssl.PROTOCOL_TLS_CLIENT
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == version
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION


def test_no_tls_section_means_system_roots() -> None:
    ctx = build_client_context(AT, None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    trusted = ssl.create_default_context().get_ca_certs()
    assert len(ctx.get_ca_certs()) == len(trusted)


def test_ca_file_replaces_the_system_roots(files: dict[str, str]) -> None:
    ctx = build_client_context(AT, _tls(files, ca_file="ca.pem"))
    assert len(ctx.get_ca_certs()) == 1


def test_insecure_skip_verify_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fastgate.tls"):
        ctx = build_client_context(AT, UpstreamTls(insecure_skip_verify=True))
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert [r.getMessage() for r in caplog.records if f"{AT}.insecure_skip_verify" in r.message]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        pytest.param({"ca_file": "missing"}, [("ca_file", "cannot read")], id="CA unreadable"),
        pytest.param(
            {"ca_file": "garbage.pem"}, [("ca_file", "no PEM certificate")], id="CA not PEM"
        ),
        pytest.param(
            {"cert_file": "garbage.pem", "key_file": "client.key"},
            [("cert_file", "not a PEM certificate")],
            id="client certificate not PEM",
        ),
        pytest.param(
            {"cert_file": "client.pem", "key_file": "missing"},
            [("key_file", "cannot read")],
            id="key unreadable",
        ),
        pytest.param(
            {"cert_file": "client.pem", "key_file": "other.key"},
            [("key_file", "does not match")],
            id="key of another certificate",
        ),
        pytest.param(
            {"cert_file": "client.pem", "key_file": "encrypted.key"},
            [("key_file", "encrypted private key")],
            id="encrypted key",
        ),
        pytest.param(
            {"cert_file": "expired.pem", "key_file": "expired.key"},
            [("cert_file", "expired on")],
            id="expired client certificate",
        ),
        pytest.param(
            {"ca_file": "garbage.pem", "cert_file": "client.pem", "key_file": "other.key"},
            [("ca_file", "no PEM certificate"), ("key_file", "does not match")],
            id="every problem at once",
        ),
    ],
)
def test_refused_files_name_their_key(
    files: dict[str, str], keys: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    with pytest.raises(ConfigError) as info:
        build_client_context(AT, _tls(files, **keys))
    errors = info.value.errors
    assert [path for path, _ in errors] == [f"{AT}.{key}" for key, _ in expected]
    for (_, reason), (_, want) in zip(errors, expected, strict=True):
        assert want in reason
    assert "PRIVATE KEY" not in str(info.value)


def test_client_certificate_is_loaded(files: dict[str, str]) -> None:
    ctx = build_client_context(AT, _tls(files, cert_file="client.pem", key_file="client.key"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED  # a client certificate changes no checks


@pytest.mark.parametrize(
    ("url", "name", "expected"),
    [
        pytest.param("https://api.internal:8443", None, "api.internal", id="URL host"),
        pytest.param("https://10.0.0.7", "api.internal", "api.internal", id="server_name"),
        pytest.param("https://[::1]:8443", None, "::1", id="IPv6 literal"),
    ],
)
def test_server_hostname(url: str, name: str | None, expected: str) -> None:
    tls = UpstreamTls(server_name=name) if name else None
    assert server_hostname(tls, Server(url=url)) == expected


# ---- a real handshake with the context -----------------------------------------------------------


@pytest.mark.parametrize(
    ("hostname", "client", "ok"),
    [
        pytest.param("api.internal", False, True, id="DNS name in the certificate"),
        pytest.param("127.0.0.1", False, True, id="IP literal checked against IP SAN"),
        pytest.param("other.internal", False, False, id="name mismatch"),
        pytest.param("api.internal", True, True, id="client certificate shown"),
    ],
)
def test_handshake(files: dict[str, str], hostname: str, client: bool, ok: bool) -> None:
    keys = {"cert_file": "client.pem", "key_file": "client.key"} if client else {}
    ctx = build_client_context(AT, _tls(files, ca_file="ca.pem", **keys))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    SERVER.configure_cert(server_ctx)
    CA.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    server_ctx.set_alpn_protocols(["http/1.1"])
    seen: list[Any] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert"))
        writer.close()

    async def main() -> str | None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname), 5
            )
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message
        finally:
            server.close()
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        writer.close()
        await asyncio.sleep(0.05)
        return alpn

    result = asyncio.run(main())
    if not ok:
        assert result is not None and "mismatch" in result
        return
    assert result == "http/1.1"
    if client:
        assert seen and dict(x[0] for x in seen[0]["subject"])["commonName"] == "gateway"


# ---- schema, compile, watched files --------------------------------------------------------------


def document(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "entrypoints": {"web": {"address": "127.0.0.1:18080"}},
        "services": {"api": {"servers": [{"url": "http://10.0.0.1:8080"}]}},
        "routes": [{"name": "r", "service": "api"}],
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    ("service", "path", "reason"),
    [
        pytest.param(
            {"servers": [{"url": "http://a"}], "tls": {}},
            "services.api.tls",
            "only used with https://",
            id="tls on an http-only service",
        ),
        pytest.param(
            {"servers": [{"url": "https://a"}], "tls": {"cert_file": "/c.pem"}},
            "services.api.tls",
            "both or neither",
            id="certificate without key",
        ),
        pytest.param(
            {"servers": [{"url": "https://a"}], "tls": {"server_name": "bad name"}},
            "services.api.tls.server_name",
            "invalid host",
            id="server_name not a host name",
        ),
        pytest.param(
            {"servers": [{"url": "https://a"}], "tls": {"min_version": "1.1"}},
            "services.api.tls.min_version",
            "",
            id="TLS 1.1",
        ),
        pytest.param(
            {"servers": [{"url": "https://a"}], "tls": {"verify": False}},
            "services.api.tls.verify",
            "unknown key",
            id="unknown key",
        ),
    ],
)
def test_schema_refuses(service: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(document(services={"api": service}))
    assert [p for p, _ in info.value.errors] == [path]
    assert reason in info.value.errors[0][1]


@pytest.fixture
def engine() -> Iterator[Engine]:
    loop = asyncio.new_event_loop()
    eng = Engine(loop, None, tick_interval=1.0)
    yield eng
    eng.close()
    loop.close()


def test_compile_puts_the_context_on_https_pools(engine: Engine, files: dict[str, str]) -> None:
    servers = [{"url": "http://10.0.0.1"}, {"url": "https://10.0.0.2"}, {"url": "https://h.test"}]
    services = {
        "api": {"servers": servers, "tls": {"ca_file": files["ca.pem"]}},
        "named": {"servers": [{"url": "https://10.0.0.3"}], "tls": {"server_name": "n.test"}},
        "same": {"servers": [{"url": "https://10.0.0.4"}], "tls": {"ca_file": files["ca.pem"]}},
    }
    runtime = compile_runtime(parse_config(document(services=services)), engine)
    try:
        plain, by_ip, by_name = runtime.services["api"].pools
        assert plain.ssl is None and plain.server_hostname is None
        assert isinstance(by_ip.ssl, ssl.SSLContext) and by_ip.server_hostname == "10.0.0.2"
        assert by_name.ssl is by_ip.ssl and by_name.server_hostname == "h.test"
        assert (by_ip.host, by_ip.port) == ("10.0.0.2", 443)
        (named,) = runtime.services["named"].pools
        assert named.server_hostname == "n.test" and named.ssl is not by_ip.ssl
        (same,) = runtime.services["same"].pools
        assert same.ssl is by_ip.ssl  # equal settings share one context
    finally:
        runtime.retire()


def test_compile_refuses_a_bad_file(engine: Engine, files: dict[str, str]) -> None:
    services = {"api": {"servers": [{"url": "https://a"}], "tls": {"ca_file": files["missing"]}}}
    with pytest.raises(ConfigError) as info:
        compile_runtime(parse_config(document(services=services)), engine)
    assert [p for p, _ in info.value.errors] == ["services.api.tls.ca_file"]


def test_upstream_files_are_watched(files: dict[str, str]) -> None:
    tls = {"ca_file": files["ca.pem"], "cert_file": files["client.pem"]}
    tls["key_file"] = files["client.key"]
    services = {
        "api": {"servers": [{"url": "https://a"}], "tls": tls},
        "other": {"servers": [{"url": "https://b"}], "tls": {"ca_file": files["ca.pem"]}},
        "plain": {"servers": [{"url": "http://c"}]},
    }
    config = parse_config(document(services=services))
    expected = (files["ca.pem"], files["client.pem"], files["client.key"])
    assert upstream_files(config) == expected
    assert watched_files(config) == expected  # no entrypoint TLS here


# ---- zero trust ----------------------------------------------------------------------------------

HTTPS = {"servers": [{"url": "https://a"}]}
TLS_EP = {
    "address": "127.0.0.1:18443",
    "tls": {"certificates": [{"cert_file": "c", "key_file": "k"}]},
}


@pytest.mark.parametrize(
    ("overrides", "paths"),
    [
        pytest.param({}, [], id="off: plaintext is fine"),
        pytest.param(
            {"zero_trust": True},
            ["entrypoints.web.tls", "services.api.servers[0].url"],
            id="plaintext entrypoint and server",
        ),
        pytest.param(
            {
                "zero_trust": True,
                "entrypoints": {"web": TLS_EP},
                "services": {"api": {"servers": [{"url": "https://a"}, {"url": "HTTP://b"}]}},
            },
            ["services.api.servers[1].url"],
            id="one plaintext server among https",
        ),
        pytest.param(
            {
                "zero_trust": True,
                "entrypoints": {"web": {"address": "127.0.0.1:18080", "allow_plaintext": True}},
                "services": {"api": {"servers": [{"url": "http://a"}], "allow_plaintext": True}},
            },
            [],
            id="allow_plaintext on both",
        ),
        pytest.param(
            {
                "zero_trust": True,
                "entrypoints": {"web": TLS_EP},
                "services": {
                    "api": {**HTTPS, "allow_plaintext": True, "tls": {"insecure_skip_verify": True}}
                },
            },
            ["services.api.tls.insecure_skip_verify"],
            id="insecure_skip_verify never allowed",
        ),
        pytest.param(
            {
                "zero_trust": True,
                "entrypoints": {"web": TLS_EP},
                "services": {"api": HTTPS},
                "admin": {"address": "0.0.0.0:19901"},
            },
            ["admin.address"],
            id="admin off loopback",
        ),
        pytest.param(
            {
                "zero_trust": True,
                "entrypoints": {"web": TLS_EP},
                "services": {"api": HTTPS},
                "admin": {"address": "[::1]:19901"},
            },
            [],
            id="admin on IPv6 loopback",
        ),
        pytest.param(
            {
                "zero_trust": True,
                "entrypoints": {"web": TLS_EP},
                "services": {"api": HTTPS},
                "admin": {"address": "0.0.0.0:19901", "enabled": False},
            },
            [],
            id="admin disabled",
        ),
        pytest.param(
            {"zero_trust": "yes", "services": {"api": HTTPS}},
            ["entrypoints.web.tls"],
            id="zero_trust as YAML yes",
        ),
        pytest.param(
            {
                "entrypoints": {"web": {"address": "127.0.0.1:18080", "allow_plaintext": True}},
                "services": {"api": {**HTTPS, "tls": {"insecure_skip_verify": True}}},
            },
            [],
            id="allow_plaintext and insecure are fine without zero_trust",
        ),
    ],
)
def test_zero_trust(overrides: dict[str, Any], paths: list[str]) -> None:
    doc = document(**overrides)
    if not paths:
        assert parse_config(doc).zero_trust is bool(overrides.get("zero_trust", False))
        return
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert [p for p, _ in info.value.errors] == paths
    assert all("zero_trust" in reason for _, reason in info.value.errors)
