"""TLS to upstream services: one verifying client SSLContext per service.

    services:
      api:
        servers: [{url: https://api.internal:8443}]
        tls:                                   # optional for https:// servers
          ca_file: /etc/fg/internal-ca.pem     # trust these CAs instead of the system roots
          cert_file: /etc/fg/gw-client.pem     # client certificate (mTLS to the service) ...
          key_file: /etc/fg/gw-client.key      # ... and its key (both or neither)
          server_name: api.internal            # SNI and the name checked (default: URL host)
          min_version: "1.2"                   # or "1.3"
          insecure_skip_verify: false

Rules this file obeys:
- Verification is on unless the config says `insecure_skip_verify: true`: the context is
  PROTOCOL_TLS_CLIENT (CERT_REQUIRED, check_hostname), trusting `ca_file` when given, else the
  system roots. The name checked is `server_name` or the URL's host; an IP literal is checked
  against the certificate's IP subjectAltNames (OpenSSL does it when server_hostname is an IP,
  and no SNI is sent for it). Skipping verification is logged as a warning each time a config
  is compiled (start, every reload, `fastgate check`), and zero_trust refuses it outright
  (config/schema.py `_check_zero_trust`).
- Protocol: TLS 1.2 at least, ALPN offers http/1.1 only (the relay speaks HTTP/1.1),
  compression and renegotiation off. Certificates are never checked against revocation lists.
- Every file is read and checked when a config is compiled, with the same helpers (and the
  same refusals) as the entrypoint side (fastgate/tls/server.py): unreadable or non-PEM
  files, a key that does not match its certificate, an expired client certificate, a CA file
  without a certificate are ConfigErrors at their key path (`services.api.tls.cert_file`), so
  `fastgate check`, the supervisor's pre-check and every worker refuse them alike and a reload
  that fails leaves the running generation serving. No key material is ever logged.
- The supervisor watches the files `upstream_files` lists, like the entrypoint certificates:
  a change reloads, the new contexts go to new pools, and the old pools' idle connections are
  closed (those in use finish their exchange on the old session).
"""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Callable

from fastgate.config.schema import Config, Server, UpstreamTls
from fastgate.errors import ConfigError
from fastgate.tls.server import check_ca, check_pair

__all__ = [
    "ALPN",
    "build_client_context",
    "server_hostname",
    "upstream_files",
    "verifying_context",
]

log = logging.getLogger("fastgate.tls")

ALPN = ("http/1.1",)
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_DEFAULTS = UpstreamTls()


def build_client_context(
    at: str, tls: UpstreamTls | None, now: datetime.datetime | None = None
) -> ssl.SSLContext:
    """The client context for a service's https:// servers; `tls` None means the defaults.

    `at` is the section's key path (`services.api.tls`), used in errors and the warning.
    Raises ConfigError listing every problem, each naming its key."""
    settings = tls or _DEFAULTS
    now = now or datetime.datetime.now(datetime.timezone.utc)
    errors: list[tuple[str, str]] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = _VERSIONS[settings.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(ALPN))
    if settings.ca_file is not None:
        key = f"{at}.ca_file"
        check_ca(key, settings.ca_file, errors)
        if not errors:
            _load(key, lambda: ctx.load_verify_locations(cafile=settings.ca_file), errors)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.cert_file is not None and settings.key_file is not None:
        before = len(errors)
        check_pair(at, settings.cert_file, settings.key_file, now, errors)
        if len(errors) == before:
            _load(
                f"{at}.cert_file",
                lambda: ctx.load_cert_chain(settings.cert_file, settings.key_file),
                errors,
            )
    if settings.insecure_skip_verify:
        ctx.check_hostname = False  # before verify_mode: CERT_NONE needs it off
        ctx.verify_mode = ssl.CERT_NONE
        log.warning(
            "%s.insecure_skip_verify: the service's certificate and name are NOT checked; "
            "anyone on the network path can impersonate it",
            at,
        )
    if errors:
        raise ConfigError.from_errors(list(dict.fromkeys(errors)))
    return ctx


def _load(key: str, load: Callable[[], object], errors: list[tuple[str, str]]) -> None:
    """Run an OpenSSL loader; note its refusal under `key`."""
    try:
        load()
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        errors.append((key, f"OpenSSL refused it: {reason}"))


def server_hostname(tls: UpstreamTls | None, server: Server) -> str:
    """The name sent as SNI and checked against the certificate: `server_name`, else the
    host of the server's URL (an IP literal is checked against IP subjectAltNames)."""
    if tls is not None and tls.server_name is not None:
        return tls.server_name
    return server.host


def upstream_files(config: Config) -> tuple[str, ...]:
    """Every CA, certificate and key file the services' `tls` sections name (the supervisor
    watches them and reloads when one changes)."""
    files: dict[str, None] = {}
    for service in config.services.values():
        if service.tls is not None:
            files.update(dict.fromkeys(service.tls.files()))
    return tuple(files)


def verifying_context(ca_file: str | None, at: str) -> ssl.SSLContext:
    """A client context for the gateway's own calls (IdP, LDAP, auth services): chain and
    host name checked against `ca_file` (instead of the system roots) when given, TLS 1.2 or
    later. A CA file that cannot be used is a ConfigError at `at`."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (ssl.SSLError, ValueError):  # before OSError, ssl.SSLError's base class
        raise ConfigError(at, "not a PEM CA certificate") from None
    except FileNotFoundError:
        raise ConfigError(at, "no such file") from None
    except OSError as exc:
        raise ConfigError(at, f"cannot read: {exc.strerror}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
