"""TLS termination on an entrypoint: certificates, SNI, client certificates, reload.

    entrypoints:
      websecure:
        address: 0.0.0.0:8443
        tls:
          certificates:                      # the first is the default certificate
            - {cert_file: /etc/fg/a.pem, key_file: /etc/fg/a.key}
          min_version: "1.2"                 # or "1.3"
          ciphers: intermediate              # or modern (TLS 1.3 only)
          handshake_timeout: 10
          client_auth: none                  # none | optional | required
          client_ca_file: /etc/fg/clients-ca.pem
          crl_file: null

Rules this file obeys:
- The stdlib `ssl` module does all TLS; `cryptography` only parses PEM (names, validity, and
  that a key belongs to its certificate). No hand-written crypto.
- Every file is read and checked when a config is compiled (`build_generation`), so
  `fastgate check`, the supervisor's pre-check and each worker refuse the same broken file
  with the same key path (`entrypoints.<ep>.tls.certificates[1].key_file`), and a reload that
  fails leaves the running generation serving. Unreadable or non-PEM files, a key that does
  not match, an expired certificate or CRL are errors; a certificate expiring within
  EXPIRY_WARNING_DAYS is logged (once per process). No key material is ever logged.
- Protocol: TLS 1.2 at least (1.3 with `ciphers: modern`), ALPN offers http/1.1 only,
  compression and renegotiation off, session tickets on (the OpenSSL default). OCSP stapling
  is not available: Python's ssl module cannot staple.
- Client certificates: `optional` asks (CERT_OPTIONAL), `required` demands (CERT_REQUIRED).
  Either way a certificate that does not chain to client_ca_file, has expired, or (with
  crl_file, VERIFY_CRL_CHECK_LEAF) is revoked fails the handshake: a certificate seen on a
  connection (`ConnCore.peer_certificate`) has been verified.
- SNI: one SSLContext per certificate. The listener's base context, handed to create_server
  once, holds no certificate of its own: its sni_callback moves every handshake (with SNI or
  without) to a context of the current generation: exact name, then `*.parent` (one label
  only), else the default (first) certificate. If the callback ever failed, the handshake
  would fail rather than serve a stale certificate.
- Reload: `TlsListener.swap` replaces the generation in one assignment; new handshakes use it,
  connections already established keep what they negotiated. What OpenSSL copies from the
  base context into each new connection (verify mode, protocol versions, verify flags,
  options) is set on the base context by swap too; the certificate and the client CA store
  come from the per-certificate context the callback picks. handshake_timeout belongs to the
  listening server, so a change of it (or TLS on/off) needs a new listener (`listener_shape`).
- Session resumption (tickets, session ids) skips certificate verification, and the session
  state lives in the base context. So a change of the client-certificate policy (client_auth,
  or the contents of client_ca_file / crl_file) is never swapped in place: the entrypoint
  gets a new listener with a fresh base context (`TlsListener.can_swap`), and no session
  from before the change can be resumed. Certificate renewals swap in place.
- Audit: a client handshake that fails certificate verification (no certificate when one is
  required, one that does not chain, has expired or is revoked) writes a `tls_verify_failed`
  audit event (fastgate/logs/events.py) with the ssl library's reason phrase, never any
  certificate contents. The failure is seen in the listener's SSLObject class
  (`sslobject_class`), which knows the entrypoint but not the peer: the event's client_ip
  is "" (uvloop does not tell the application of a failed server-side handshake).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fastgate._core.conn import DownstreamProtocol, Engine, EntryPoint
from fastgate.config.schema import Config, EntrypointTls
from fastgate.errors import ConfigError
from fastgate.logs.events import audit_event

__all__ = [
    "ALPN",
    "CIPHERS",
    "EXPIRY_WARNING_DAYS",
    "TlsGeneration",
    "TlsListener",
    "build_generation",
    "certificate_files",
    "listener_shape",
    "sni_lookup",
]

log = logging.getLogger("fastgate.tls")

EXPIRY_WARNING_DAYS = 14
ALPN = ("http/1.1",)
# TLS 1.2 suites (TLS 1.3 suites are OpenSSL's defaults, all AEAD with ephemeral keys).
# intermediate: Mozilla's "intermediate" list (v5.7). The DHE suites stay inert unless DH
# parameters are loaded, which fastgate never does. modern: TLS 1.3 only, so the list is
# just a safe floor should a TLS 1.2 handshake ever be allowed: ECDHE + AEAD.
_ECDHE_AEAD = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
CIPHERS = {
    "modern": _ECDHE_AEAD,
    "intermediate": _ECDHE_AEAD
    + ":DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305",
}
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_warned: set[tuple[str, int]] = set()  # (path, serial) already warned about in this process

T = TypeVar("T")


# ---- SNI ---------------------------------------------------------------------------------------


def sni_lookup(server_name: str, exact: Mapping[str, T], wildcard: Mapping[str, T]) -> T | None:
    """The entry for `server_name`: an exact name first, then `*.parent` covering exactly one
    more label (`a.b.test` matches `*.b.test`; `x.a.b.test` and `b.test` do not); None when
    neither covers it. Names compare lowercased, without a trailing dot."""
    name = server_name.lower().rstrip(".")
    hit = exact.get(name)
    if hit is None:
        label, dot, parent = name.partition(".")
        if dot and label and parent:
            hit = wildcard.get(parent)
    return hit


class TlsGeneration:
    """The contexts of one entrypoint in one config generation (immutable once built)."""

    __slots__ = ("default", "exact", "serials", "settings", "trust", "wildcard")

    def __init__(
        self,
        settings: EntrypointTls,
        contexts: list[ssl.SSLContext],
        names: list[tuple[str, ...]],
        serials: list[int],
        trust: bytes = b"",
    ) -> None:
        self.settings = settings
        self.trust = trust  # digest of the client-certificate policy (mode, CA and CRL bytes)
        self.default = contexts[0]
        self.serials = tuple(serials)  # of each certificate, in config order (for tests/ops)
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for ctx, cert_names in zip(contexts, names, strict=True):
            for name in cert_names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], ctx)  # the first certificate wins
                else:
                    self.exact.setdefault(name, ctx)

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a ClientHello's server name (None: the client sent no SNI)."""
        if server_name:
            hit = sni_lookup(server_name, self.exact, self.wildcard)
            if hit is not None:
                return hit
        return self.default


# ---- building a generation -----------------------------------------------------------------------


def apply_settings(ctx: ssl.SSLContext, tls: EntrypointTls) -> None:
    """The settings every context of an entrypoint shares (base and per certificate)."""
    ctx.minimum_version = _VERSIONS[tls.version]
    ctx.set_ciphers(CIPHERS[tls.ciphers])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(ALPN))
    ctx.verify_mode = _VERIFY[tls.client_auth]
    if tls.crl_file is not None:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    else:
        ctx.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF


def new_context(tls: EntrypointTls) -> ssl.SSLContext:
    """A server context with the entrypoint's settings and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_settings(ctx, tls)
    return ctx


def build_generation(
    at: str, tls: EntrypointTls, now: datetime.datetime | None = None
) -> TlsGeneration:
    """Read and check every file of `tls` and build its contexts.

    `at` is the section's key path (`entrypoints.websecure.tls`). Raises ConfigError listing
    every problem, each naming its key."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    errors: list[tuple[str, str]] = []
    trust = hashlib.sha256(tls.client_auth.encode())
    if tls.client_ca_file is not None:
        trust.update(check_ca(f"{at}.client_ca_file", tls.client_ca_file, errors))
    if tls.crl_file is not None:
        trust.update(_check_crl(f"{at}.crl_file", tls.crl_file, now, errors))
    trust_ok = not errors
    contexts: list[ssl.SSLContext] = []
    names: list[tuple[str, ...]] = []
    serials: list[int] = []
    for i, pair in enumerate(tls.certificates):
        where = f"{at}.certificates[{i}]"
        leaf = check_pair(where, pair.cert_file, pair.key_file, now, errors)
        if leaf is None:
            continue
        dns = _dns_names(leaf)
        if i > 0 and not dns:
            errors.append(
                (
                    f"{where}.cert_file",
                    "no DNS names in subjectAltName; only the first (default) certificate "
                    "may have none",
                )
            )
            continue
        ctx = new_context(tls)
        try:
            ctx.load_cert_chain(pair.cert_file, pair.key_file)
        except ssl.SSLError as exc:
            errors.append((f"{where}.cert_file", f"OpenSSL refused it: {exc.reason or exc}"))
            continue
        except OSError as exc:
            errors.append((f"{where}.cert_file", f"cannot read: {exc.strerror or exc}"))
            continue
        if trust_ok and not _load_client_trust(ctx, tls, at, errors):
            trust_ok = False  # said once; the other certificates would repeat it
            continue
        contexts.append(ctx)
        names.append(dns)
        serials.append(leaf.serial_number)
    if errors:
        raise ConfigError.from_errors(list(dict.fromkeys(errors)))
    return TlsGeneration(tls, contexts, names, serials, trust.digest())


def _read(path: str, key: str, errors: list[tuple[str, str]]) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        errors.append((key, f"cannot read {path}: {exc.strerror or exc}"))
        return None


def check_pair(
    where: str,
    cert_file: str,
    key_file: str,
    now: datetime.datetime,
    errors: list[tuple[str, str]],
) -> x509.Certificate | None:
    """The leaf certificate of `cert_file` when it and `key_file` are usable, else None."""
    cert_key, key_key = f"{where}.cert_file", f"{where}.key_file"
    cert_pem = _read(cert_file, cert_key, errors)
    key_pem = _read(key_file, key_key, errors)
    leaf = None
    if cert_pem is not None:
        try:
            leaf = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError:
            errors.append((cert_key, "not a PEM certificate"))
    key = None
    if key_pem is not None:
        try:
            key = load_pem_private_key(key_pem, password=None)
        except TypeError:
            errors.append((key_key, "an encrypted private key is not supported"))
        except (ValueError, UnsupportedAlgorithm):
            errors.append((key_key, "not a PEM private key"))
    if leaf is None or key is None:
        return None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        errors.append((key_key, "does not match the certificate in cert_file"))
        return None
    if leaf.not_valid_after_utc <= now:
        errors.append((cert_key, f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"))
        return None
    _warn_validity(cert_file, leaf, now)
    return leaf


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _warn_validity(path: str, leaf: x509.Certificate, now: datetime.datetime) -> None:
    """Log (once per process and certificate) one that expires soon or is not valid yet."""
    mark = (path, leaf.serial_number)
    if mark in _warned:
        return
    left = leaf.not_valid_after_utc - now
    if left < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        _warned.add(mark)
        log.warning(
            "certificate %s expires in %.1f days (%s UTC)",
            path,
            left.total_seconds() / 86400,
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M}",
        )
    elif leaf.not_valid_before_utc > now:
        _warned.add(mark)
        log.warning(
            "certificate %s is not valid before %s UTC (clients will refuse it until then)",
            path,
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M}",
        )


def _dns_names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        dict.fromkeys(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    )


def check_ca(key: str, path: str, errors: list[tuple[str, str]]) -> bytes:
    """The CA file's bytes (b"" when unreadable, noted in `errors`)."""
    data = _read(path, key, errors)
    if data is None:
        return b""
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        errors.append((key, "no PEM certificate in it"))
    return data


def _check_crl(key: str, path: str, now: datetime.datetime, errors: list[tuple[str, str]]) -> bytes:
    """The CRL file's bytes (b"" when unreadable, noted in `errors`)."""
    data = _read(path, key, errors)
    if data is None:
        return b""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        errors.append((key, "not a PEM CRL"))
        return data
    next_update = crl.next_update_utc
    if next_update is not None and next_update <= now:
        errors.append(
            (
                key,
                f"expired on {next_update:%Y-%m-%d %H:%M} UTC (its next update is due): "
                "every client certificate would be refused",
            )
        )
    return data


def _load_client_trust(
    ctx: ssl.SSLContext, tls: EntrypointTls, at: str, errors: list[tuple[str, str]]
) -> bool:
    """Load the client CA and CRL into `ctx`; False (with the error noted) if OpenSSL
    refuses one."""
    for option, path in (("client_ca_file", tls.client_ca_file), ("crl_file", tls.crl_file)):
        if path is None:
            continue
        try:
            ctx.load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            errors.append((f"{at}.{option}", f"OpenSSL refused it: {reason}"))
            return False
    return True


# ---- serving ----------------------------------------------------------------------------------


def listener_shape(tls: EntrypointTls | None) -> tuple[float, ...] | None:
    """What a listening server is created with and a reload cannot change in place: a change
    here means a new listener (None: plain HTTP)."""
    return None if tls is None else (tls.handshake_timeout,)


def certificate_files(config: Config) -> tuple[str, ...]:
    """Every certificate, key, CA and CRL file the config names (the supervisor watches them
    and reloads when one changes)."""
    files: dict[str, None] = {}
    for ep in config.entrypoints.values():
        if ep.tls is not None:
            files.update(dict.fromkeys(ep.tls.files()))
    return tuple(files)


class TlsListener:
    """One TLS entrypoint of a worker: the base context given to create_server (never
    replaced), the current generation its SNI callback reads, handshake counters."""

    def __init__(self, generation: TlsGeneration) -> None:
        self.generation = generation
        self.context = new_context(generation.settings)
        self.context.sni_callback = self._on_hello
        self.completed = 0  # handshakes that reached the HTTP layer
        self.failed = 0  # connections that closed before their handshake finished

    def can_swap(self, generation: TlsGeneration) -> bool:
        """Whether `generation` may be swapped in: only when the client-certificate policy
        (mode, CA and CRL contents) is the same. Sessions live in the base context, and a
        resumed session is not verified again, so a new policy gets a new listener (a fresh
        base context: no session from before the change can be resumed)."""
        return generation.trust == self.generation.trust

    def swap(self, generation: TlsGeneration) -> None:
        """Serve new handshakes with `generation`; established connections are untouched."""
        apply_settings(self.context, generation.settings)
        self.generation = generation

    def _on_hello(self, ssl_object: Any, server_name: str | None, _base: Any) -> None:
        ssl_object.context = self.generation.select(server_name)

    def protocol_factory(self, engine: Engine, entry: EntryPoint) -> Callable[[], Any]:
        """The create_server factory: a DownstreamProtocol that counts its handshake. The
        base context's SSLObjects report verification failures for `entry` (audit)."""
        listener = self
        self.context.sslobject_class = audited_sslobject_class(entry.name)
        return lambda: _TlsDownstream(engine, entry, listener)

    def stats(self) -> dict[str, Any]:
        return {
            "handshakes": self.completed,
            "handshake_failures": self.failed,
            "certificates": len(self.generation.serials),
        }


class _TlsDownstream(DownstreamProtocol):
    """DownstreamProtocol on a TLS listener. The transport calls connection_made only once
    the handshake is done, so a protocol collected without it is a failed (or abandoned)
    handshake: a plaintext request, a bad client certificate, a timeout. One Python frame
    per connection, none per request."""

    __slots__ = ("_listener", "_made")

    def __init__(self, engine: Engine, entry: EntryPoint, listener: TlsListener) -> None:
        super().__init__(engine, entry)
        self._listener = listener
        self._made = False

    def connection_made(self, transport: Any) -> None:
        self._made = True
        self._listener.completed += 1
        super().connection_made(transport)

    def __del__(self) -> None:
        if not getattr(self, "_made", True):
            self._listener.failed += 1


# OpenSSL reasons (besides a failed chain check) that mean "the client certificate is not
# acceptable"; other handshake failures (protocol versions, ciphers, plaintext) are not audit
# events: they are counted as failed handshakes only.
_CERT_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"})


def verify_failure_reason(exc: ssl.SSLError) -> str | None:
    """The fixed phrase for a client-certificate failure (the library's reason string, e.g.
    "certificate verify failed: certificate revoked"), or None for another SSL error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or "unknown reason"
        return f"certificate verify failed: {message}"
    reason = getattr(exc, "reason", None)
    if reason in _CERT_REASONS:
        return str(reason).lower().replace("_", " ")
    return None


class _AuditedSSLObject(ssl.SSLObject):
    """SSLObject of a TLS listener: a handshake that fails certificate verification writes a
    `tls_verify_failed` audit event (rate-limited in fastgate/logs/events.py)."""

    entrypoint = ""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            reason = verify_failure_reason(exc)
            if reason is not None:
                audit_event(
                    "tls_verify_failed",
                    reason=reason,
                    client_ip="",
                    entrypoint=self.entrypoint,
                    tls=self.version(),
                )
            raise


def audited_sslobject_class(entrypoint: str) -> type[ssl.SSLObject]:
    """An SSLObject class whose failed certificate checks name `entrypoint`."""
    return type("AuditedSSLObject", (_AuditedSSLObject,), {"entrypoint": entrypoint})


def describe(listeners: Iterable[tuple[str, TlsListener]]) -> list[str]:
    """One line per TLS entrypoint with its handshake counters (logged at drain)."""
    return [
        f"entrypoint {name}: {t.completed} TLS handshakes, {t.failed} failed or abandoned"
        for name, t in listeners
    ]
