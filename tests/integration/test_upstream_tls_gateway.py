"""TLS to upstream services through a real gateway, against a real TLS origin in this process.

The origin (`TlsOrigin`: asyncio, trustme certificates) counts TCP connections and
handshakes, records the SNI of every ClientHello and the client certificate it verified, and
answers `/headers` (what it saw, as JSON), `/bytes/N` (N deterministic bytes) and `/echo`
(the request body). Cases: verified https upstreams (CA file, IP literal, SNI = server_name),
byte-exact bodies, pooled TLS connections reused, the refusals (wrong CA, name mismatch,
system roots that do not know the CA, a client certificate demanded) as 502 "upstream TLS
failure" distinct from a refused connect, insecure_skip_verify with its warning, mTLS to the
service, a CA file change reloading (and a broken one refused), and zero_trust in
`fastgate check`.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import REPO, Client, Gateway, Response, assert_error, base_config, free_port, wait_for

CA = trustme.CA()
OTHER_CA = trustme.CA()
CLIENT_CA = trustme.CA()
SERVER = CA.issue_cert("api.internal", "localhost", "127.0.0.1")
GATEWAY_CLIENT = CLIENT_CA.issue_cert("gateway.internal", common_name="fastgate-gw")
MiB = 1 << 20
TLS_FAILURE = "upstream TLS failure"


def pattern(n: int) -> bytes:
    """N deterministic bytes that are not a repeating short cycle."""
    block = bytes((i * 7 + i // 256) & 0xFF for i in range(65521))  # a prime-sized block
    return (block * (n // len(block) + 1))[:n]


# ---- the TLS origin -----------------------------------------------------------------------------


class TlsOrigin:
    """An HTTPS/1.1 origin on 127.0.0.1: a thread per connection, blocking `ssl` sockets (a
    failed handshake sends its alert, as real servers do)."""

    def __init__(self, leaf: trustme.LeafCert, client_ca: trustme.CA | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(self.ctx)
        self.ctx.set_alpn_protocols(["http/1.1"])
        if client_ca is not None:
            client_ca.configure_trust(self.ctx)
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.sni_callback = self._hello
        self.accepted = 0  # TCP connections
        self.handshakes = 0  # TLS handshakes completed (server side)
        self.hellos: list[str | None] = []  # the SNI of every ClientHello
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _hello(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.hellos.append(name)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as sock:
                self.handshakes += 1
                peer = sock.getpeercert()
                subject = dict(x[0] for x in peer["subject"]) if peer else None
                buf = bytearray()
                while not self.stopping.is_set():
                    while b"\r\n\r\n" not in buf:
                        data = sock.recv(65536)
                        if not data:
                            return
                        buf += data
                    end = buf.index(b"\r\n\r\n") + 4
                    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                    del buf[:end]
                    method, path, _ = lines[0].split(" ", 2)
                    headers = [tuple(x.split(": ", 1)) for x in lines[1:] if x]
                    length = int({k.lower(): v for k, v in headers}.get("content-length", 0))
                    while len(buf) < length:
                        data = sock.recv(65536)
                        if not data:
                            return
                        buf += data
                    body = bytes(buf[:length])
                    del buf[:length]
                    if path.startswith("/bytes/"):
                        out = pattern(int(path.removeprefix("/bytes/")))
                    elif path == "/echo":
                        out = body
                    else:
                        seen = {
                            "method": method,
                            "path": path,
                            "headers": headers,
                            "client_subject": subject,
                            "alpn": sock.selected_alpn_protocol(),
                        }
                        out = json.dumps(seen).encode()
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
        except (OSError, ssl.SSLError):
            pass  # a refused handshake, or the gateway closed its pooled connection
        finally:
            raw.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture(scope="module")
def tls_origin() -> Iterator[TlsOrigin]:
    o = TlsOrigin(SERVER)
    yield o
    o.stop()


@pytest.fixture(scope="module")
def mtls_origin() -> Iterator[TlsOrigin]:
    o = TlsOrigin(SERVER, client_ca=CLIENT_CA)
    yield o
    o.stop()


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pems")
    out = {"ca": str(d / "ca.pem"), "other-ca": str(d / "other-ca.pem")}
    CA.cert_pem.write_to_path(out["ca"])
    OTHER_CA.cert_pem.write_to_path(out["other-ca"])
    out["client.pem"], out["client.key"] = str(d / "client.pem"), str(d / "client.key")
    GATEWAY_CLIENT.cert_chain_pems[0].write_to_path(out["client.pem"])
    GATEWAY_CLIENT.private_key_pem.write_to_path(out["client.key"])
    return out


# ---- the gateway --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port where TCP connects succeed (the kernel's backlog) but nobody ever speaks TLS."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield listener.getsockname()[1]


def services(
    tls: TlsOrigin, mtls: TlsOrigin, pems: dict[str, str], silent: int = 0
) -> dict[str, Any]:
    """One service per scenario; the route to each is chosen by Host `<name>.test`."""
    at = f"https://127.0.0.1:{tls.port}"
    ca = {"ca_file": pems["ca"]}
    client = {"cert_file": pems["client.pem"], "key_file": pems["client.key"]}
    return {
        "named": {"servers": [{"url": at}], "tls": {**ca, "server_name": "api.internal"}},
        "ip": {"servers": [{"url": at}], "tls": ca},
        "localhost": {"servers": [{"url": f"https://localhost:{tls.port}"}], "tls": ca},
        "wrongca": {
            "servers": [{"url": at}],
            "tls": {"ca_file": pems["other-ca"], "server_name": "api.internal"},
        },
        "mismatch": {"servers": [{"url": at}], "tls": {**ca, "server_name": "other.internal"}},
        "sysroots": {"servers": [{"url": at}]},
        "insecure": {
            "servers": [{"url": at}],
            "tls": {"insecure_skip_verify": True, "server_name": "whatever.test"},
        },
        "refused": {"servers": [{"url": f"https://127.0.0.1:{free_port()}"}], "tls": ca},
        "silent": {
            "servers": [{"url": f"https://127.0.0.1:{silent or free_port()}"}],
            "tls": ca,
            "timeouts": {"upstream_connect": 1},
        },
        "mtls-none": {"servers": [{"url": f"https://127.0.0.1:{mtls.port}"}], "tls": ca},
        "mtls": {
            "servers": [{"url": f"https://127.0.0.1:{mtls.port}"}],
            "tls": {**ca, **client, "min_version": "1.3"},
        },
    }


def gateway_config(svc: dict[str, Any]) -> dict[str, Any]:
    routes = [{"name": n, "match": {"hosts": [f"{n}.test"]}, "service": n} for n in svc]
    return base_config(1, services=svc, routes=routes)


@pytest.fixture
def gw(
    start_gateway: Callable[[dict[str, Any]], Gateway],
    tls_origin: TlsOrigin,
    mtls_origin: TlsOrigin,
    pems: dict[str, str],
    silent_port: int,
) -> Gateway:
    return start_gateway(gateway_config(services(tls_origin, mtls_origin, pems, silent_port)))


def fetch(gw: Gateway, service: str, path: str = "/headers", **kw: Any) -> Response:
    with Client(gw.addr) as c:
        return c.request("GET", path, host=f"{service}.test", **kw)


# ---- verified TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "sni"),
    [
        pytest.param("named", "api.internal", id="server_name is the SNI and the name checked"),
        pytest.param("localhost", "localhost", id="the URL's host by default"),
        pytest.param("ip", None, id="IP literal: IP SAN checked, no SNI"),
    ],
)
def test_verified_upstream(gw: Gateway, tls_origin: TlsOrigin, service: str, sni: str) -> None:
    hellos = len(tls_origin.hellos)
    resp = fetch(gw, service)
    assert resp.status == 200, (resp.raw_head, resp.body)
    seen = resp.json()
    assert seen["path"] == "/headers" and seen["alpn"] == "http/1.1"
    assert seen["client_subject"] is None  # no client certificate configured
    assert tls_origin.hellos[hellos:] == [sni]


def test_bodies_byte_for_byte_and_pooled_reuse(gw: Gateway, tls_origin: TlsOrigin) -> None:
    accepted, handshakes = tls_origin.accepted, tls_origin.handshakes
    big = pattern(MiB)
    with Client(gw.addr) as c:
        for n in (0, 1, 1000, MiB):
            resp = c.request("GET", f"/bytes/{n}", host="named.test")
            assert resp.status == 200 and resp.body == pattern(n), (n, len(resp.body))
        resp = c.request("POST", "/echo", host="named.test", body=big)
        assert resp.status == 200 and resp.body == big
        resp = c.request("POST", "/echo", host="named.test", body=b"small")
        assert resp.body == b"small"
    # A second client connection gets the same pooled upstream connection.
    for _ in range(3):
        assert fetch(gw, "named", "/bytes/10").body == pattern(10)
    assert tls_origin.accepted - accepted == 1
    assert tls_origin.handshakes - handshakes == 1


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "message"),
    [
        pytest.param("wrongca", TLS_FAILURE, id="certificate from another CA"),
        pytest.param("mismatch", TLS_FAILURE, id="name mismatch"),
        pytest.param("sysroots", TLS_FAILURE, id="system roots do not know the CA"),
        pytest.param("mtls-none", TLS_FAILURE, id="service demands a client certificate"),
        pytest.param("refused", "upstream connect failed", id="nothing listens: not TLS"),
    ],
)
def test_upstream_refusals_are_502(gw: Gateway, service: str, message: str) -> None:
    for _ in range(2):  # again: nothing was pooled or left hanging by the first
        doc = assert_error(fetch(gw, service), 502)
        assert doc["error"] == message
    assert fetch(gw, "named").status == 200  # and everything else goes on


def test_silent_tls_server_times_out(gw: Gateway) -> None:
    """The connect deadline covers the handshake: whichever of the gateway's connect timer
    and the handshake timeout (both upstream_connect) fires first, the reply is a 502."""
    for _ in range(2):
        doc = assert_error(fetch(gw, "silent"), 502)
        assert doc["error"] in ("upstream connect timeout", TLS_FAILURE)
    assert fetch(gw, "named").status == 200


def test_tls_failure_is_logged_without_secrets(gw: Gateway, pems: dict[str, str]) -> None:
    assert_error(fetch(gw, "wrongca"), 502)
    assert wait_for(lambda: "TLS failure" in gw.log.read_text())
    log = gw.log.read_text()
    assert "certificate verify failed" in log or "unable to get local issuer" in log, log
    assert Path(pems["client.key"]).read_text().splitlines()[1] not in log


def test_insecure_skip_verify_serves_and_warns(gw: Gateway) -> None:
    resp = fetch(gw, "insecure")
    assert resp.status == 200, resp.body
    assert "services.insecure.tls.insecure_skip_verify" in gw.log.read_text()


def test_mtls_to_the_service(gw: Gateway, mtls_origin: TlsOrigin) -> None:
    handshakes = mtls_origin.handshakes
    resp = fetch(gw, "mtls")
    assert resp.status == 200, resp.body
    assert resp.json()["client_subject"]["commonName"] == "fastgate-gw"
    assert mtls_origin.handshakes - handshakes == 1


# ---- reload on a file change ------------------------------------------------------------------


def _replace(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def test_ca_file_change_reloads(
    start_gateway: Callable[[dict[str, Any]], Gateway],
    tls_origin: TlsOrigin,
    tmp_path: Path,
) -> None:
    ca_file = str(tmp_path / "trust.pem")
    _replace(ca_file, CA.cert_pem.bytes())
    svc = {
        "named": {
            "servers": [{"url": f"https://127.0.0.1:{tls_origin.port}"}],
            "tls": {"ca_file": ca_file, "server_name": "api.internal"},
        }
    }
    gw = start_gateway(gateway_config(svc))
    assert fetch(gw, "named").status == 200

    _replace(ca_file, b"not a certificate\n")  # refused: the running generation serves on
    assert wait_for(lambda: "refused" in (gw.readyz() or {}).get("last_reload", ""))
    assert "services.named.tls.ca_file" in gw.readyz()["last_reload"]
    assert fetch(gw, "named").status == 200

    _replace(ca_file, OTHER_CA.cert_pem.bytes())  # good file, other CA: new pools refuse
    assert wait_for(lambda: fetch(gw, "named").status == 502, timeout=8)
    assert_error(fetch(gw, "named"), 502)


# ---- zero trust in `fastgate check` ------------------------------------------------------------


def check(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "fastgate", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
    )


def test_zero_trust_in_fastgate_check(
    tmp_path: Path, tls_origin: TlsOrigin, pems: dict[str, str]
) -> None:
    plain = base_config(free_port(), zero_trust=True)
    out = check(tmp_path, plain)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "error: entrypoints.web.tls: zero_trust refuses" in out.stderr
    assert "error: services.origin.servers[0].url: zero_trust refuses" in out.stderr

    plain["entrypoints"]["web"]["allow_plaintext"] = True
    plain["services"]["origin"]["allow_plaintext"] = True
    out = check(tmp_path, plain)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("ok")

    svc = services(tls_origin, tls_origin, pems)
    insecure = gateway_config({"insecure": svc["insecure"]})
    out = check(tmp_path, insecure)  # without zero_trust: accepted, and the risk is listed
    assert out.returncode == 0, out.stderr
    assert "services.insecure.tls.insecure_skip_verify" in out.stderr
    insecure.update(zero_trust=True, admin={"address": f"0.0.0.0:{free_port()}"})
    insecure["entrypoints"]["web"]["allow_plaintext"] = True
    insecure["services"]["insecure"]["allow_plaintext"] = True
    out = check(tmp_path, insecure)
    assert out.returncode == 2
    errors = sorted(line for line in out.stderr.splitlines() if line.startswith("error: "))
    assert [e.split(":")[1].strip() for e in errors] == [
        "admin.address",
        "services.insecure.tls.insecure_skip_verify",
    ], out.stderr
