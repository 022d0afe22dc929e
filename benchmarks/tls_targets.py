"""TLS targets for benchmarks/run.py: nginx and fastgate terminating TLS with the same key.

- nginx-tls: `peers/proxy-tls.nginx.conf`, the plain `nginx` target's proxy with
  `listen ... ssl`, TLS 1.2 and 1.3, session tickets and a shared session cache.
- fastgate-tls: `fastgate run` with the config of `fastgate proxy` (one entrypoint `web`,
  route `proxy` on `/`, service `upstream`), 1 worker, admin off, and a `tls` section on the
  entrypoint: the certificate, `min_version: "1.2"`, the default (intermediate) ciphers.

Rules this file obeys:
- Both targets serve the very same certificate and key, made for the run in the run's temp
  dir (`make_certificates`): a throwaway CA and a leaf for 127.0.0.1 and localhost, both
  ECDSA P-256 (trustme's default; the `cryptography` fallback makes the same kind), so a
  handshake costs both servers the same signature. Nothing here is a secret anyone uses; the
  key file is still written 0600 and its contents are never printed.
- Pure helpers only: no process is started here, and `trustme` / `cryptography` are imported
  inside `make_certificates`, so run.py stays standard-library at import time. Without
  either, `make_certificates` raises CertificateError with the fix.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# TLS target -> its plain counterpart (the same proxy without TLS), compared in each round.
TLS_TARGETS = {"nginx-tls": "nginx", "fastgate-tls": "fastgate"}
NGINX_TLS, FASTGATE_TLS = "nginx-tls", "fastgate-tls"
SERVER_NAMES = ("127.0.0.1", "localhost")
MIN_VERSION = "1.2"
CERT_DAYS = 365  # well past fastgate's 14-day expiry warning
KEY_TYPE = "ECDSA P-256"  # the CA's and the server's
CA_KEY_USAGE = dict.fromkeys(
    ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
     "encipher_only", "decipher_only"), False,
) | {"digital_signature": True, "key_cert_sign": True, "crl_sign": True}  # fmt: skip


class CertificateError(Exception):
    """The run's certificate could not be made (neither trustme nor cryptography)."""


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one run: the CA that clients trust, the server certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    made_with: str  # "trustme" or "cryptography"


def make_certificates(directory: Path) -> TlsFiles:
    """A fresh CA and a server certificate for SERVER_NAMES in `directory` (created), with
    trustme when it is importable, else with cryptography."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import trustme
    except ImportError:
        trustme = None
    made_with = "trustme" if trustme is not None else "cryptography"
    files = TlsFiles(
        directory / "ca.pem", directory / "server.pem", directory / "server.key", made_with
    )
    if trustme is not None:
        ca = trustme.CA()
        leaf = ca.issue_cert(*SERVER_NAMES)
        ca_pem = ca.cert_pem.bytes()
        cert_pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        key_pem = leaf.private_key_pem.bytes()
    else:
        ca_pem, cert_pem, key_pem = _with_cryptography()
    files.ca_file.write_bytes(ca_pem)
    files.cert_file.write_bytes(cert_pem)
    fd = os.open(files.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    return files


def _with_cryptography() -> tuple[bytes, bytes, bytes]:
    """(CA PEM, leaf PEM, leaf key PEM) made with cryptography, as trustme would."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise CertificateError(
            "the TLS targets need `trustme` or `cryptography` to make their certificate "
            "(pip install trustme)"
        ) from exc

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=CERT_DAYS)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("fastgate bench CA"))
        .issuer_name(name("fastgate bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(**CA_KEY_USAGE), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.IPAddress(ipaddress.ip_address(SERVER_NAMES[0]))]
    alt_names += [x509.DNSName(n) for n in SERVER_NAMES[1:]]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(SERVER_NAMES[1]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_cert.public_bytes(pem), cert.public_bytes(pem), key_pem


def fastgate_tls_config(port: int, origin_port: int, files: TlsFiles) -> dict[str, Any]:
    """fastgate-tls's config: what `fastgate proxy` builds (entrypoint `web`, route `proxy`
    on `/`, service `upstream` = the origin), 1 worker, admin off, TLS on the entrypoint."""
    tls = {
        "certificates": [{"cert_file": str(files.cert_file), "key_file": str(files.key_file)}],
        "min_version": MIN_VERSION,
    }
    return {
        "workers": 1,
        "admin": {"enabled": False},
        "entrypoints": {"web": {"address": f"127.0.0.1:{port}", "tls": tls}},
        "services": {"upstream": {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}},
        "routes": [{"name": "proxy", "match": {"path": "/"}, "service": "upstream"}],
    }


def nginx_tls_values(port: int, origin_port: int, files: TlsFiles) -> dict[str, str | int]:
    """The `@name@` values of peers/proxy-tls.nginx.conf (besides prefix and user)."""
    return {
        "port": port,
        "origin_port": origin_port,
        "cert_file": str(files.cert_file),
        "key_file": str(files.key_file),
    }
