"""`type: mtls_auth`: identify the caller by the client certificate of its TLS connection.

    entrypoints:
      websecure:
        address: 0.0.0.0:8443
        tls:
          certificates: [{cert_file: /etc/fg/server.pem, key_file: /etc/fg/server.key}]
          client_auth: optional            # or required
          client_ca_file: /etc/fg/clients-ca.pem
    middlewares:
      clients:
        type: mtls_auth
        subjects: [billing-service]        # allow list: the identity subject (see below)
        san_dns: [billing.internal]        # allow list: any DNS subjectAltName
        forward_client_cert: true          # X-Forwarded-Client-Cert to the service
        forward_headers: {X-Client: subject}

The identity: method "mtls", subject = the certificate's subject CN, or its first
subjectAltName when it has no CN (or the whole RFC 4514 subject when it has neither); claims
fingerprint_sha256, subject, issuer (RFC 4514 strings), san_dns, san_uri (tuples), serial
(hex).

Security rules this file obeys:
- The certificate is the one the TLS handshake verified against the entrypoint's
  client_ca_file (`ConnCore.peer_certificate`); this file never verifies anything itself and
  never reads a certificate from a request header. On an entrypoint that does not ask for
  client certificates (plain HTTP, or client_auth: none) every request is refused (a warning
  at compile names the route).
- No certificate: 401 "client certificate required". There is no WWW-Authenticate challenge
  for TLS client authentication, so the 401 has none (RFC 9110 §11.6.1 wants one; no scheme
  exists for this). A certificate outside the allow lists: 403 "certificate not allowed".
  Allow lists match exactly (no patterns); a certificate passes when its subject is in
  `subjects` or one of its DNS names is in `san_dns`.
- `X-Forwarded-Client-Cert` (Envoy's XFCC form: `Hash=<sha256>;Subject="...";URI="...";
  DNS="..."`) is always stripped from what the client sent when this middleware is on the
  route, and set from the verified certificate with `forward_client_cert: true`. Values are
  quoted, `"` and `\\` escaped, anything outside printable ASCII percent-encoded: a
  certificate's text can never split the head.
- Parsed certificates are cached by their DER bytes (bounded, oldest out first) with the
  verdict and header lines, so a kept-alive connection costs one dict lookup per request.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, ClassVar

from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import ConfigDict, Field

from fastgate.auth.common import AuthCommon, AuthOptions, parse_options
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import register

log = logging.getLogger("fastgate.mtls_auth")

XFCC = "X-Forwarded-Client-Cert"
# subjectAltName kinds that read as text (the subject when a certificate has no CN).
_TEXT_NAMES = (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name, x509.IPAddress)
_XFCC_LOWER = XFCC.lower().encode("latin-1")


class MtlsAuthOptions(AuthOptions):
    """`subjects`, `san_dns`, `forward_client_cert`, `cache_size`, plus the common options."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    subjects: list[str] | None = None
    san_dns: list[str] | None = None
    forward_client_cert: bool = False
    cache_size: int = Field(1000, ge=0, le=1_000_000)


def _validate(opts: MtlsAuthOptions) -> None:
    """What pydantic's types do not say; paths relative to the middleware."""
    for option in ("subjects", "san_dns"):
        values = getattr(opts, option)
        if values is None:
            continue
        if not values:
            raise ConfigError(option, "an empty allow list refuses everyone; leave it out")
        for i, value in enumerate(values):
            if not value.strip():
                raise ConfigError(f"{option}[{i}]", "expected a non-empty name")
    headers = opts.forward_headers if isinstance(opts.forward_headers, dict) else {}
    if any(str(h).lower() == XFCC.lower() for h in headers):
        raise ConfigError("forward_headers", f"{XFCC} is set by forward_client_cert")


@register
class MtlsAuth:
    """One `mtls_auth` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "mtls_auth"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        self.options = opts = parse_options(MtlsAuthOptions, options)
        _validate(opts)
        self.name = name
        self.common = AuthCommon(options, name, self.type)
        # A client's own XFCC never reaches the service, whether or not we set one.
        self.strip_request_headers = tuple(
            dict.fromkeys((*self.common.strip_request_headers, _XFCC_LOWER))
        )
        self._subjects = frozenset(opts.subjects) if opts.subjects is not None else None
        self._san_dns = (
            frozenset(n.lower().rstrip(".") for n in opts.san_dns)
            if opts.san_dns is not None
            else None
        )
        self._missing = LocalReply.error(401, "client certificate required")
        self._unreadable = LocalReply.error(401, "unreadable client certificate")
        self._forbidden = LocalReply.error(403, "certificate not allowed")
        # DER -> (identity, upstream header lines); identity None = not allowed, or
        # unreadable when the lines are None.
        self._cache: dict[bytes, tuple[Identity | None, bytes | None]] = {}
        self.parsed = 0  # certificates parsed (cache misses)

    def bind(self, context: Any) -> None:
        """Warn about routes served where no client certificate is ever asked for."""
        config = context.config
        using = set(context.routes_using(self.name))
        for route in config.routes:
            if route.name not in using:
                continue
            for ep_name in route.entrypoints or tuple(config.entrypoints):
                ep = config.entrypoints.get(ep_name)
                tls = getattr(ep, "tls", None)
                if ep is not None and (tls is None or tls.client_auth == "none"):
                    log.warning(
                        "mtls_auth %s on route %s: entrypoint %s does not ask for client "
                        "certificates (tls.client_auth), so every request there is refused",
                        self.name,
                        route.name,
                        ep_name,
                    )

    # ---- per request --------------------------------------------------------------------------

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        common = self.common
        if common.skip(ctx):
            return None
        der = ctx.conn.peer_certificate
        if der is None:
            return common.missing(ctx, self._missing)
        hit = self._cache.get(der)
        if hit is None:
            hit = self._learn(der)
        identity, lines = hit
        if identity is None:
            if lines is None:
                return common.refuse(ctx, "unreadable certificate", self._unreadable)
            return common.refuse(ctx, "certificate not allowed", self._forbidden)
        common.admit(ctx, identity, lines)
        return None

    def _learn(self, der: bytes) -> tuple[Identity | None, bytes | None]:
        """Parse `der` once: its identity (or refusal) and header lines, cached."""
        self.parsed += 1
        try:
            cert = x509.load_der_x509_certificate(der)
            identity = certificate_identity(cert, der)
        except ValueError:
            result: tuple[Identity | None, bytes | None] = (None, None)
        else:
            if self._allowed(identity):
                lines = self.common.forward_lines(identity)
                if self.options.forward_client_cert:
                    lines += xfcc_line(identity)
                result = (identity, lines)
            else:
                result = (None, b"")
        size = self.options.cache_size
        if size:
            cache = self._cache
            if len(cache) >= size:
                del cache[next(iter(cache))]
            cache[der] = result
        return result

    def _allowed(self, identity: Identity) -> bool:
        if self._subjects is None and self._san_dns is None:
            return True
        if self._subjects is not None and identity.subject in self._subjects:
            return True
        if self._san_dns is not None:
            return any(name.lower() in self._san_dns for name in identity.claim("san_dns", ()))
        return False

    # ---- operations ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "cached": len(self._cache),
            "parsed": self.parsed,
            "failures": dict(self.common.failures),
        }


def certificate_identity(cert: x509.Certificate, der: bytes) -> Identity:
    """The Identity for a verified client certificate (see the module docstring)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = list(san)
    except x509.ExtensionNotFound:
        names = []
    dns = tuple(n.value for n in names if isinstance(n, x509.DNSName))
    uris = tuple(n.value for n in names if isinstance(n, x509.UniformResourceIdentifier))
    subject_dn = cert.subject.rfc4514_string()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    texts = [str(n.value) for n in names if isinstance(n, _TEXT_NAMES)]
    if cns:
        value = cns[0].value
        subject = value if isinstance(value, str) else value.decode("utf-8", "replace")
    else:
        subject = texts[0] if texts else subject_dn
    return Identity(
        method="mtls",
        subject=subject,
        claims=(
            ("fingerprint_sha256", hashlib.sha256(der).hexdigest()),
            ("subject", subject_dn),
            ("issuer", cert.issuer.rfc4514_string()),
            ("san_dns", dns),
            ("san_uri", uris),
            ("serial", format(cert.serial_number, "x")),
        ),
    )


def _quote(value: str) -> str:
    """A quoted XFCC value: `"` and `\\` escaped, non-printable / non-ASCII percent-encoded."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
    return '"' + "".join(out) + '"'


def xfcc_line(identity: Identity) -> bytes:
    """The `X-Forwarded-Client-Cert` header line (Envoy's element syntax) for `identity`."""
    parts = [f"Hash={identity.claim('fingerprint_sha256')}"]
    parts.append(f"Subject={_quote(identity.claim('subject', ''))}")
    parts.extend(f"URI={_quote(u)}" for u in identity.claim("san_uri", ()))
    parts.extend(f"DNS={_quote(d)}" for d in identity.claim("san_dns", ()))
    return f"{XFCC}: {';'.join(parts)}\r\n".encode("ascii")


__all__ = ["MtlsAuth", "MtlsAuthOptions", "certificate_identity", "xfcc_line"]
