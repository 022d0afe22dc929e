"""TLS termination through a real gateway: SNI picks the certificate, the origin sees
X-Forwarded-Proto https, plaintext and silent connections end without disturbing a TLS
client, client certificates (required; optional + mtls_auth with XFCC), certificate reload
from the files without a restart (and a broken file refused), and the protocol versions
`openssl s_client` may use."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import Addr, Client, Gateway, Origin, Response, assert_error, base_config, wait_for
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

SERVER_CA = trustme.CA()
CLIENT_CA = trustme.CA()
OTHER_CA = trustme.CA()
A_CERT = SERVER_CA.issue_cert("a.test")
B_CERT = SERVER_CA.issue_cert("*.b.test")
CLIENT = CLIENT_CA.issue_cert("client.test", common_name="client-1")
STRANGER = OTHER_CA.issue_cert("client.test", common_name="client-1")  # same name, other CA
_NOW = datetime.datetime.now(datetime.timezone.utc)
EXPIRED_CLIENT = CLIENT_CA.issue_cert(
    "client.test",
    common_name="client-1",
    not_before=_NOW - datetime.timedelta(days=10),
    not_after=_NOW - datetime.timedelta(days=1),
)

Files = dict[str, str]


def _write(directory: Path, name: str, leaf: trustme.LeafCert) -> dict[str, str]:
    """cert_file (leaf + chain) and key_file for `leaf`, replaced atomically."""
    pair = {"cert_file": str(directory / f"{name}.pem"), "key_file": str(directory / f"{name}.key")}
    for path, data in (
        (pair["key_file"], leaf.private_key_pem.bytes()),
        (pair["cert_file"], b"".join(p.bytes() for p in leaf.cert_chain_pems)),
    ):
        tmp = path + ".tmp"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    return pair


@pytest.fixture
def files(tmp_path: Path) -> Files:
    out: Files = {}
    for name, leaf in (("a", A_CERT), ("b", B_CERT)):
        pair = _write(tmp_path, name, leaf)
        out[f"{name}.pem"], out[f"{name}.key"] = pair["cert_file"], pair["key_file"]
    for name, ca in (("server-ca", SERVER_CA), ("client-ca", CLIENT_CA)):
        out[name] = str(tmp_path / f"{name}.pem")
        ca.cert_pem.write_to_path(out[name])
    return out


def _tls(files: Files, **extra: Any) -> dict[str, Any]:
    certificates = [
        {"cert_file": files["a.pem"], "key_file": files["a.key"]},
        {"cert_file": files["b.pem"], "key_file": files["b.key"]},
    ]
    return {"certificates": certificates, **extra}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def gw(origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], files: Files) -> Gateway:
    """Entrypoints: `websecure` (two certificates, handshake_timeout 1 s), `optional`
    (client certificates asked for, mtls_auth on its route), `required`."""
    clients = {"client_ca_file": files["client-ca"]}
    entrypoints = {
        "web": {"address": _port()},
        "websecure": {"address": _port(), "tls": _tls(files, handshake_timeout=1)},
        "optional": {"address": _port(), "tls": _tls(files, client_auth="optional", **clients)},
        "required": {"address": _port(), "tls": _tls(files, client_auth="required", **clients)},
    }
    middlewares = {
        "clients": {
            "type": "mtls_auth",
            "forward_client_cert": True,
            "forward_headers": {"X-User": "subject"},
        }
    }
    routes = [
        {
            "name": "mtls",
            "entrypoints": ["optional"],
            "service": "origin",
            "middlewares": ["clients"],
        },
        {"name": "tls", "entrypoints": ["web", "websecure", "required"], "service": "origin"},
    ]
    config = base_config(
        origin.port,
        log_level="info",
        entrypoints=entrypoints,
        middlewares=middlewares,
        routes=routes,
    )
    return start_gateway(config)


# ---- a TLS client -------------------------------------------------------------------------------


class TlsClient(Client):
    """conftest's Client over TLS: trusts the test server CA, sends `sni`, and presents
    `cert` when given."""

    def __init__(
        self,
        addr: Addr,
        sni: str | None = "a.test",
        cert: trustme.LeafCert | None = None,
        ca_file: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        ctx = ssl.create_default_context(cafile=ca_file)
        if ca_file is None:
            SERVER_CA.configure_trust(ctx)
        ctx.check_hostname = False  # SNI tests read the certificate themselves
        if cert is not None:
            cert.configure_cert(ctx)
        raw = socket.create_connection(addr, timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=sni)
        except BaseException:
            raw.close()
            raise
        self.buf = bytearray()

    def peer(self) -> x509.Certificate:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def dns_names(self) -> list[str]:
        san = self.peer().extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return san.value.get_values_for_type(x509.DNSName)


def _seen(resp: Response) -> list[tuple[str, str]]:
    """The request headers the origin received (lowercased names)."""
    assert resp.status == 200, (resp.raw_head, resp.body)
    return [(k.lower(), v) for k, v in resp.json()["headers"]]


def _serial(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def _refused(addr: Addr, cert: trustme.LeafCert | None) -> bool:
    """The gateway ends the handshake: at once, or (TLS 1.3: the client finishes first) on
    the first exchange, with an alert or a close and no response."""
    try:
        with TlsClient(addr, cert=cert) as c:
            c.send(b"GET /headers HTTP/1.1\r\nHost: a.test\r\n\r\n")
            return c.sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def _ended_without_reply(sock: socket.socket, timeout: float = 8.0) -> bytes:
    """Read until the peer closes (or resets); returns what came (never an HTTP reply)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while data := sock.recv(4096):
            got += data
    except ConnectionResetError:
        pass
    assert b"HTTP/" not in got, got
    return got


# ---- termination and SNI -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sni, names",
    [
        pytest.param("a.test", ["a.test"], id="exact"),
        pytest.param("x.b.test", ["*.b.test"], id="wildcard"),
        pytest.param("y.x.b.test", ["a.test"], id="two labels: default"),
        pytest.param("unknown.test", ["a.test"], id="unknown: default"),
        pytest.param(None, ["a.test"], id="no SNI: default"),
    ],
)
def test_sni_selects_certificate(gw: Gateway, sni: str | None, names: list[str]) -> None:
    with TlsClient(gw.address("websecure"), sni=sni) as c:
        assert c.dns_names() == names
        seen = _seen(c.request("GET", "/headers", host=sni or "a.test"))
        assert ("x-forwarded-proto", "https") in seen
    plain = Client(gw.address("web"))
    with plain:
        assert ("x-forwarded-proto", "http") in _seen(plain.request("GET", "/headers"))


def test_plaintext_and_silent_clients_end_alone(gw: Gateway) -> None:
    addr = gw.address("websecure")
    with TlsClient(addr) as tls:
        assert tls.request("GET", "/echo-path/one").body == b"/echo-path/one"
        with socket.create_connection(addr, timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            _ended_without_reply(plain)
        with socket.create_connection(addr, timeout=10) as silent:
            start = time.monotonic()
            assert _ended_without_reply(silent) == b""  # handshake_timeout: 1
            assert time.monotonic() - start < 7
        assert tls.request("GET", "/echo-path/two").body == b"/echo-path/two"
    gw.stop()  # the worker logs its handshake counters as it drains
    log = gw.log.read_text()
    assert "entrypoint websecure: 1 TLS handshakes, 2 failed or abandoned" in log, log[-3000:]


# ---- client certificates -----------------------------------------------------------------------


def test_client_auth_required(gw: Gateway) -> None:
    addr = gw.address("required")
    for cert in (None, STRANGER, EXPIRED_CLIENT):
        assert _refused(addr, cert)
    with TlsClient(addr, cert=CLIENT) as c:
        assert c.request("GET", "/echo-path/ok").status == 200
    # The refusals disturbed nothing: the other entrypoints still serve.
    with TlsClient(gw.address("websecure")) as c:
        assert c.request("GET", "/echo-path/ok").status == 200


def test_client_auth_optional_with_mtls_auth(gw: Gateway) -> None:
    addr = gw.address("optional")
    forged = {"X-Forwarded-Client-Cert": 'Hash=00;Subject="CN=root"', "X-User": "root"}
    with TlsClient(addr) as c:
        resp = c.request("GET", "/headers", headers=forged)
        doc = assert_error(resp, 401)
        assert doc["error"] == "client certificate required"
        assert resp.header("www-authenticate") is None
    assert _refused(addr, STRANGER)  # a certificate is checked even when optional
    client = x509.load_pem_x509_certificate(CLIENT.cert_chain_pems[0].bytes())
    fingerprint = hashlib.sha256(client.public_bytes(Encoding.DER)).hexdigest()
    subject = client.subject.rfc4514_string()
    assert subject.startswith("CN=client-1,")
    with TlsClient(addr, cert=CLIENT) as c:
        for _ in range(2):  # the second request on the kept-alive connection: cached
            seen = _seen(c.request("GET", "/headers", headers=forged))
            assert ("x-user", "client-1") in seen and ("x-user", "root") not in seen
            xfcc = [v for k, v in seen if k == "x-forwarded-client-cert"]
            assert xfcc == [f'Hash={fingerprint};Subject="{subject}";DNS="client.test"'], seen
            assert ("x-forwarded-proto", "https") in seen


# ---- reload ------------------------------------------------------------------------------------


def test_certificate_reload(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    pair = _write(live, "site", A_CERT)
    config = base_config(
        origin.port,
        entrypoints={"websecure": {"address": _port(), "tls": {"certificates": [pair]}}},
    )
    gw = start_gateway(config)
    addr = gw.address("websecure")
    before = TlsClient(addr)
    try:
        assert before.peer().serial_number == _serial(A_CERT)
        assert before.request("GET", "/echo-path/x").status == 200
        renewed = SERVER_CA.issue_cert("a.test")
        _write(live, "site", renewed)

        def new_serial() -> int:
            with TlsClient(addr) as c:
                return c.peer().serial_number

        assert wait_for(lambda: new_serial() == _serial(renewed), timeout=15)
        status = gw.readyz()
        assert status is not None and status["generation"] >= 2
        # The connection made before the reload goes on with what it negotiated.
        assert before.request("GET", "/echo-path/y").status == 200
        assert before.peer().serial_number == _serial(A_CERT)
        generation = status["generation"]

        Path(pair["cert_file"]).write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        key_path = "entrypoints.websecure.tls.certificates[0].cert_file"

        def refused() -> bool:
            doc = gw.readyz() or {}
            return doc.get("last_reload", "").startswith("refused") and key_path in doc.get(
                "last_reload", ""
            )

        assert wait_for(refused, timeout=15)
        assert (gw.readyz() or {})["generation"] == generation
        assert new_serial() == _serial(renewed)  # the last good certificate keeps serving
        assert before.request("GET", "/echo-path/z").status == 200
    finally:
        before.close()


def test_certificate_reload_under_load(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], tmp_path: Path
) -> None:
    """Two clients keep making requests (one kept alive, one with a new handshake each
    time) while the certificate is renewed three times: every request succeeds, and the new
    handshakes end up on the last certificate."""
    import threading

    live = tmp_path / "live"
    live.mkdir()
    pair = _write(live, "site", A_CERT)
    config = base_config(
        origin.port,
        entrypoints={"websecure": {"address": _port(), "tls": {"certificates": [pair]}}},
    )
    gw = start_gateway(config)
    addr = gw.address("websecure")
    stop = threading.Event()
    results: dict[str, list[Any]] = {"kept": [], "new": []}

    def kept_alive() -> None:
        with TlsClient(addr) as c:
            while not stop.is_set():
                results["kept"].append(c.request("GET", "/echo-path/k").status)

    def new_each_time() -> None:
        while not stop.is_set():
            try:
                with TlsClient(addr) as c:
                    results["new"].append((c.request("GET", "/echo-path/n").status,
                                           c.peer().serial_number))  # fmt: skip
            except (OSError, ssl.SSLError) as exc:
                results["new"].append((repr(exc), None))

    threads = [threading.Thread(target=f, daemon=True) for f in (kept_alive, new_each_time)]
    for t in threads:
        t.start()
    try:
        last = A_CERT
        for _ in range(3):
            time.sleep(0.5)
            last = SERVER_CA.issue_cert("a.test")
            _write(live, "site", last)

            def on_new(leaf: trustme.LeafCert = last) -> bool:
                return bool(results["new"]) and results["new"][-1][1] == _serial(leaf)

            assert wait_for(on_new, timeout=15)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert results["kept"] and set(results["kept"]) == {200}
    assert results["new"] and {status for status, _ in results["new"]} == {200}


def test_client_policy_change_gets_a_new_listener(
    origin: Origin, start_gateway: Callable[[dict[str, Any]], Gateway], files: Files
) -> None:
    pair = {"cert_file": files["a.pem"], "key_file": files["a.key"]}
    config = base_config(
        origin.port,
        entrypoints={"websecure": {"address": _port(), "tls": {"certificates": [pair]}}},
    )
    gw = start_gateway(config)
    addr = gw.address("websecure")
    with TlsClient(addr) as before:
        assert before.request("GET", "/echo-path/a").status == 200
        tls = config["entrypoints"]["websecure"]["tls"]
        tls.update(client_auth="required", client_ca_file=files["client-ca"])
        (gw.directory / "fastgate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        assert wait_for(lambda: _refused(addr, None), timeout=15)
        with TlsClient(addr, cert=CLIENT) as c:
            assert c.request("GET", "/echo-path/b").status == 200
        # Established before the change: it keeps going until it closes.
        assert before.request("GET", "/echo-path/c").status == 200
    status = gw.readyz() or {}
    assert status.get("generation") == 2 and status.get("last_reload") == "ok", status


# ---- protocol versions (openssl s_client) ---------------------------------------------------


def _openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the openssl binary is required under CI")
        pytest.skip("openssl binary not found")
    return path


@pytest.mark.parametrize(
    "flag, accepted",
    [
        pytest.param("-tls1_1", False, id="TLS 1.1 refused"),
        pytest.param("-tls1_2", True, id="TLS 1.2"),
        pytest.param("-tls1_3", True, id="TLS 1.3"),
    ],
)
def test_protocol_versions(gw: Gateway, files: Files, flag: str, accepted: bool) -> None:
    host, port = gw.address("websecure")
    argv = [_openssl(), "s_client", "-connect", f"{host}:{port}", "-servername", "a.test"]
    argv += ["-CAfile", files["server-ca"], "-ign_eof", flag]
    if flag == "-tls1_1":
        argv += ["-cipher", "DEFAULT@SECLEVEL=0"]  # so that our client can even offer it
    out = subprocess.run(
        argv,
        input=b"GET /echo-path/v HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        capture_output=True,
        timeout=20,
    )
    text = (out.stdout + out.stderr).decode("latin-1")
    version = {"-tls1_1": "TLSv1.1", "-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[flag]
    if accepted:
        assert f"New, {version}, Cipher is" in text, text
        assert "Verify return code: 0 (ok)" in text, text
        assert "HTTP/1.1 200 OK" in text, text
    else:
        # uvloop closes a failed handshake without flushing the alert: the client sees EOF.
        assert out.returncode != 0
        assert "New, (NONE), Cipher is (NONE)" in text, text
        assert "HTTP/1.1" not in text, text
