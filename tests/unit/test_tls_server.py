"""fastgate.tls.server: what a TLS section refuses (by key path), SNI selection, the protocol
settings every context gets, and a real in-process handshake through `TlsListener` before
and after `swap` (new certificate, client certificates demanded, a revoked one refused)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fastgate.config.compile import check_runtime
from fastgate.config.schema import EntrypointTls, parse_config
from fastgate.errors import ConfigError
from fastgate.tls.server import (
    CIPHERS,
    TlsListener,
    build_generation,
    certificate_files,
    listener_shape,
    new_context,
    sni_lookup,
)

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC)
CA = trustme.CA()
OTHER_CA = trustme.CA()
CLIENT_CA = trustme.CA()
A_CERT = CA.issue_cert("a.test")
B_CERT = CA.issue_cert("*.b.test", "b.test")
NO_SAN = CA.issue_cert(common_name="nosan")  # trustme puts no SAN without identities
EXPIRED = CA.issue_cert(
    "old.test", not_before=NOW - datetime.timedelta(days=30), not_after=NOW - datetime.timedelta(1)
)
EXPIRING = CA.issue_cert("soon.test", not_after=NOW + datetime.timedelta(days=5))
CLIENT = CLIENT_CA.issue_cert("client.test", common_name="client-1")
REVOKED = CLIENT_CA.issue_cert("revoked.test", common_name="client-2")


def _crl(ca: trustme.CA, revoked: list[int], next_update: datetime.datetime) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = load_pem_private_key(ca.private_key_pem.bytes(), None)
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(NOW - datetime.timedelta(hours=1))
        .next_update(next_update)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - datetime.timedelta(minutes=5))
            .build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _serial(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Every PEM the tests use, written under tmp_path; name -> path."""
    out: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        path = tmp_path / name
        path.write_bytes(data)
        out[name] = str(path)

    for name, leaf in (
        ("a", A_CERT),
        ("b", B_CERT),
        ("nosan", NO_SAN),
        ("expired", EXPIRED),
        ("soon", EXPIRING),
    ):
        put(f"{name}.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        put(f"{name}.key", leaf.private_key_pem.bytes())
    put("client-ca.pem", CLIENT_CA.cert_pem.bytes())
    put("garbage.pem", b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    put("encrypted.key", _encrypted_key(A_CERT))
    put("crl.pem", _crl(CLIENT_CA, [_serial(REVOKED)], NOW + datetime.timedelta(days=1)))
    put("stale-crl.pem", _crl(CLIENT_CA, [], NOW - datetime.timedelta(minutes=1)))
    out["missing"] = str(tmp_path / "missing.pem")
    return out


def _encrypted_key(leaf: trustme.LeafCert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-passphrase"),
    )


def _config(tls: dict[str, Any]) -> dict[str, Any]:
    return {
        "entrypoints": {"websecure": {"address": "127.0.0.1:8443", "tls": tls}},
        "services": {"s": {"servers": [{"url": "http://127.0.0.1:9"}]}},
        "routes": [{"service": "s"}],
    }


def _pair(files: dict[str, str], cert: str, key: str | None = None) -> dict[str, str]:
    return {"cert_file": files[cert], "key_file": files[key or cert.replace(".pem", ".key")]}


def _tls(settings: dict[str, Any]) -> EntrypointTls:
    return EntrypointTls.model_validate(settings)


# ---- what is refused, by key path -----------------------------------------------------------

AT = "entrypoints.websecure.tls"


@pytest.mark.parametrize(
    "make, path, words",
    [
        pytest.param(
            lambda f: {"certificates": [{"cert_file": f["missing"], "key_file": f["a.key"]}]},
            f"{AT}.certificates[0].cert_file",
            "cannot read",
            id="missing cert file",
        ),
        pytest.param(
            lambda f: {"certificates": [_pair(f, "a.pem"), _pair(f, "garbage.pem", "b.key")]},
            f"{AT}.certificates[1].cert_file",
            "not a PEM certificate",
            id="bad PEM certificate",
        ),
        pytest.param(
            lambda f: {"certificates": [_pair(f, "a.pem", "client-ca.pem")]},
            f"{AT}.certificates[0].key_file",
            "not a PEM private key",
            id="bad PEM key",
        ),
        pytest.param(
            lambda f: {"certificates": [_pair(f, "a.pem"), _pair(f, "b.pem", "a.key")]},
            f"{AT}.certificates[1].key_file",
            "does not match",
            id="key mismatch",
        ),
        pytest.param(
            lambda f: {"certificates": [_pair(f, "a.pem", "encrypted.key")]},
            f"{AT}.certificates[0].key_file",
            "encrypted",
            id="encrypted key",
        ),
        pytest.param(
            lambda f: {"certificates": [_pair(f, "expired.pem")]},
            f"{AT}.certificates[0].cert_file",
            "expired on",
            id="expired certificate",
        ),
        pytest.param(
            lambda f: {"certificates": [_pair(f, "a.pem"), _pair(f, "nosan.pem")]},
            f"{AT}.certificates[1].cert_file",
            "no DNS names",
            id="second certificate without DNS names",
        ),
        pytest.param(
            lambda f: {
                "certificates": [_pair(f, "a.pem")],
                "client_auth": "required",
                "client_ca_file": f["missing"],
            },
            f"{AT}.client_ca_file",
            "cannot read",
            id="missing CA file",
        ),
        pytest.param(
            lambda f: {
                "certificates": [_pair(f, "a.pem")],
                "client_auth": "optional",
                "client_ca_file": f["a.key"],
            },
            f"{AT}.client_ca_file",
            "no PEM certificate",
            id="CA file without a certificate",
        ),
        pytest.param(
            lambda f: {
                "certificates": [_pair(f, "a.pem")],
                "client_auth": "required",
                "client_ca_file": f["client-ca.pem"],
                "crl_file": f["a.pem"],
            },
            f"{AT}.crl_file",
            "not a PEM CRL",
            id="bad CRL",
        ),
        pytest.param(
            lambda f: {
                "certificates": [_pair(f, "a.pem")],
                "client_auth": "required",
                "client_ca_file": f["client-ca.pem"],
                "crl_file": f["stale-crl.pem"],
            },
            f"{AT}.crl_file",
            "every client certificate would be refused",
            id="expired CRL",
        ),
    ],
)
def test_compile_refuses_by_key_path(
    files: dict[str, str], make: Callable[[dict[str, str]], dict[str, Any]], path: str, words: str
) -> None:
    config = parse_config(_config(make(files)))  # the shape is fine; the files are not
    with pytest.raises(ConfigError) as info:
        check_runtime(config)
    reasons = [reason for p, reason in info.value.errors if p == path]
    assert reasons and words in reasons[0], info.value.errors


@pytest.mark.parametrize(
    "tls, path, words",
    [
        pytest.param(
            {"certificates": []}, f"{AT}.certificates", "at least one", id="no certificates"
        ),
        pytest.param(
            {
                "certificates": [{"cert_file": "a.pem", "key_file": "a.key"}],
                "client_auth": "required",
            },
            f"{AT}.client_ca_file",
            "needs client_ca_file",
            id="client_auth without CA",
        ),
        pytest.param(
            {
                "certificates": [{"cert_file": "a.pem", "key_file": "a.key"}],
                "client_ca_file": "ca.pem",
            },
            f"{AT}.client_ca_file",
            "only used with client_auth",
            id="CA without client_auth",
        ),
        pytest.param(
            {
                "certificates": [{"cert_file": "a.pem", "key_file": "a.key"}],
                "ciphers": "modern",
                "min_version": "1.2",
            },
            f"{AT}.ciphers",
            "TLS 1.3 only",
            id="modern with 1.2",
        ),
        pytest.param(
            {"certificates": [{"cert_file": "a.pem", "key_file": "a.key"}], "min_version": "1.1"},
            f"{AT}.min_version",
            "",
            id="TLS 1.1",
        ),
        pytest.param(
            {"certificates": [{"cert_file": "a.pem", "key_file": "a.key"}], "ocsp": True},
            f"{AT}.ocsp",
            "unknown key",
            id="unknown key",
        ),
    ],
)
def test_schema_refuses_by_key_path(tls: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(tls))
    reasons = [reason for p, reason in info.value.errors if p == path]
    assert reasons and words in reasons[0], info.value.errors


def test_every_problem_is_reported_at_once(files: dict[str, str]) -> None:
    tls = {
        "certificates": [_pair(files, "expired.pem"), _pair(files, "b.pem", "a.key")],
        "client_auth": "required",
        "client_ca_file": files["missing"],
    }
    with pytest.raises(ConfigError) as info:
        check_runtime(parse_config(_config(tls)))
    assert [p for p, _ in info.value.errors] == [
        f"{AT}.client_ca_file",
        f"{AT}.certificates[0].cert_file",
        f"{AT}.certificates[1].key_file",
    ]


def test_yaml_float_versions_and_defaults() -> None:
    tls = _tls({"certificates": [{"cert_file": "a", "key_file": "b"}], "min_version": 1.3})
    assert tls.min_version == "1.3" and tls.version == "1.3"
    default = _tls({"certificates": [{"cert_file": "a", "key_file": "b"}]})
    assert (default.version, default.ciphers, default.client_auth) == (
        "1.2",
        "intermediate",
        "none",
    )
    assert default.handshake_timeout == 10.0
    modern = _tls({"certificates": [{"cert_file": "a", "key_file": "b"}], "ciphers": "modern"})
    assert modern.version == "1.3"


def test_expiring_certificate_is_logged_once(
    files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    tls = _tls({"certificates": [_pair(files, "soon.pem")]})
    with caplog.at_level(logging.WARNING, logger="fastgate.tls"):
        build_generation(AT, tls)
        build_generation(AT, tls)
    warnings = [r.getMessage() for r in caplog.records if "expires in" in r.getMessage()]
    assert len(warnings) == 1 and files["soon.pem"] in warnings[0]
    assert "BEGIN" not in caplog.text  # no key material in logs


def test_certificate_files_and_listener_shape(files: dict[str, str]) -> None:
    tls = {
        "certificates": [_pair(files, "a.pem"), _pair(files, "b.pem")],
        "client_auth": "optional",
        "client_ca_file": files["client-ca.pem"],
        "crl_file": files["crl.pem"],
    }
    config = parse_config(_config(tls))
    assert certificate_files(config) == tuple(
        files[n] for n in ("a.pem", "a.key", "b.pem", "b.key", "client-ca.pem", "crl.pem")
    )
    assert listener_shape(None) is None
    assert listener_shape(config.entrypoints["websecure"].tls) == (10.0,)


# ---- SNI ---------------------------------------------------------------------------------------

EXACT = {"a.test": "A", "b.test": "B-apex"}
WILD = {"b.test": "B"}


@pytest.mark.parametrize(
    "name, expected",
    [
        pytest.param("a.test", "A", id="exact"),
        pytest.param("A.TEST.", "A", id="case and trailing dot"),
        pytest.param("x.b.test", "B", id="wildcard one label"),
        pytest.param("b.test", "B-apex", id="apex is not the wildcard"),
        pytest.param("y.x.b.test", None, id="wildcard covers one label only"),
        pytest.param(".b.test", None, id="empty label"),
        pytest.param("c.test", None, id="unknown"),
        pytest.param("test", None, id="single label"),
    ],
)
def test_sni_lookup(name: str, expected: str | None) -> None:
    assert sni_lookup(name, EXACT, WILD) == expected


def test_generation_selects_by_sni_then_default(files: dict[str, str]) -> None:
    gen = build_generation(
        AT, _tls({"certificates": [_pair(files, "a.pem"), _pair(files, "b.pem")]})
    )
    a, b = gen.default, gen.exact["b.test"]
    assert gen.serials == (_serial(A_CERT), _serial(B_CERT))
    assert gen.select("a.test") is a
    assert gen.select("x.b.test") is b and gen.select("b.test") is b
    assert gen.select("y.x.b.test") is a
    assert gen.select(None) is a and gen.select("") is a


# ---- protocol settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, version",
    [
        pytest.param({}, ssl.TLSVersion.TLSv1_2, id="intermediate default"),
        pytest.param({"min_version": "1.3"}, ssl.TLSVersion.TLSv1_3, id="intermediate 1.3"),
        pytest.param({"ciphers": "modern"}, ssl.TLSVersion.TLSv1_3, id="modern"),
    ],
)
def test_context_settings(settings: dict[str, Any], version: ssl.TLSVersion) -> None:
    ctx = new_context(_tls({"certificates": [{"cert_file": "a", "key_file": "b"}], **settings}))
    assert ctx.minimum_version == version
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_NO_TICKET  # resumption stays on
    assert ctx.verify_mode == ssl.CERT_NONE
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    preset = settings.get("ciphers", "intermediate")
    assert tls12 == set(CIPHERS[preset].split(":")) & tls12  # nothing beyond the preset
    assert "ECDHE-RSA-AES128-GCM-SHA256" in tls12
    assert all("GCM" in c or "CHACHA20" in c for c in tls12), tls12  # AEAD only
    assert any(c["protocol"] == "TLSv1.3" for c in ctx.get_ciphers())


@pytest.mark.parametrize(
    "client_auth, mode",
    [
        pytest.param("optional", ssl.CERT_OPTIONAL, id="optional"),
        pytest.param("required", ssl.CERT_REQUIRED, id="required"),
    ],
)
def test_client_auth_modes(files: dict[str, str], client_auth: str, mode: int) -> None:
    tls = _tls(
        {
            "certificates": [_pair(files, "a.pem")],
            "client_auth": client_auth,
            "client_ca_file": files["client-ca.pem"],
            "crl_file": files["crl.pem"],
        }
    )
    gen = build_generation(AT, tls)
    assert gen.default.verify_mode == mode
    assert gen.default.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert TlsListener(gen).context.verify_mode == mode


# ---- real handshakes through a TlsListener -----------------------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Server:
    """A uvloop TLS server on 127.0.0.1 in a thread, with `listener.context`."""

    def __init__(self, listener: TlsListener) -> None:
        import uvloop

        self.listener = listener
        self.loop = uvloop.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            self.loop.create_server(
                _Echo, "127.0.0.1", 0, ssl=self.listener.context, ssl_handshake_timeout=5
            )
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the server's loop and wait for it (as a worker's reload would)."""
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        assert done.wait(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[[TlsListener], _Server]]:
    servers: list[_Server] = []

    def start(listener: TlsListener) -> _Server:
        servers.append(_Server(listener))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _connect(port: int, sni: str | None, client: trustme.LeafCert | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    ctx.check_hostname = sni is not None
    if client is not None:
        client.configure_cert(ctx)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=sni)
    except BaseException:
        sock.close()
        raise
    return tls


def _roundtrip(tls: ssl.SSLSocket) -> int:
    """Echo one message (in TLS 1.3 a refused client certificate shows here); the server
    certificate's serial."""
    tls.sendall(b"ping")
    assert tls.recv(4) == b"ping"
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _refused(port: int, client: trustme.LeafCert | None) -> bool:
    """The server ends the handshake: at once, or (TLS 1.3, where the client finishes
    first) on the first read, as an alert or a close without an answer."""
    try:
        with _connect(port, None, client) as tls:
            tls.sendall(b"ping")
            return tls.recv(4) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_listener_sni_and_swap(files: dict[str, str], serve: Callable[..., _Server]) -> None:
    plain = _tls({"certificates": [_pair(files, "a.pem"), _pair(files, "b.pem")]})
    listener = TlsListener(build_generation(AT, plain))
    server = serve(listener)
    with _connect(server.port, "x.b.test") as tls:
        assert _roundtrip(tls) == _serial(B_CERT)
        assert tls.selected_alpn_protocol() is None  # we offered none
    with _connect(server.port, None) as before:
        assert _roundtrip(before) == _serial(A_CERT)
        # Swap: b.test's certificate is the default now, and client certificates are required.
        demanding = _tls(
            {
                "certificates": [_pair(files, "b.pem")],
                "client_auth": "required",
                "client_ca_file": files["client-ca.pem"],
                "crl_file": files["crl.pem"],
            }
        )
        generation = build_generation(AT, demanding)
        server.call(lambda: listener.swap(generation))
        assert _roundtrip(before) == _serial(A_CERT)  # established: untouched
    with pytest.raises(ssl.SSLCertVerificationError):  # a.test is served no more
        _connect(server.port, "a.test", CLIENT).close()
    with _connect(server.port, None, CLIENT) as tls:
        assert _roundtrip(tls) == _serial(B_CERT)
    for client in (None, REVOKED):
        assert _refused(server.port, client)


def test_alpn_offers_http11_only(files: dict[str, str], serve: Callable[..., _Server]) -> None:
    listener = TlsListener(build_generation(AT, _tls({"certificates": [_pair(files, "a.pem")]})))
    server = serve(listener)
    for offered, chosen in ((["h2", "http/1.1"], "http/1.1"), (["h2"], None)):
        ctx = ssl.create_default_context()
        CA.configure_trust(ctx)
        ctx.set_alpn_protocols(offered)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            with ctx.wrap_socket(sock, server_hostname="a.test") as tls:
                assert tls.selected_alpn_protocol() == chosen
                assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_only_certificate_changes_swap_in_place(files: dict[str, str]) -> None:
    def generation(cert: str, **trust: Any) -> Any:
        return build_generation(AT, _tls({"certificates": [_pair(files, cert)], **trust}))

    clients = {"client_auth": "required", "client_ca_file": files["client-ca.pem"]}
    listener = TlsListener(generation("a.pem", **clients))
    assert listener.can_swap(generation("b.pem", **clients))  # a renewed certificate
    assert not listener.can_swap(generation("a.pem"))  # client certificates no longer asked
    assert not listener.can_swap(generation("a.pem", **{**clients, "client_auth": "optional"}))
    assert not listener.can_swap(generation("a.pem", **clients, crl_file=files["crl.pem"]))
    Path(files["client-ca.pem"]).write_bytes(OTHER_CA.cert_pem.bytes())  # a rotated CA
    assert not listener.can_swap(generation("a.pem", **clients))
