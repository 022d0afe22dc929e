"""The typed configuration schema: one set of models for YAML and TOML, with defaults and docs.

Validation happens in two layers, and `parse_config` runs both and reports every problem at
once, each as `(key path, reason)` with paths like `routes[0].match.path_type`:

1. Shape (pydantic): types, ranges, enums, unknown keys, and the values that can be judged on
   their own (addresses, server URLs, IPs/CIDRs, host patterns, methods, names).
2. Cross-checks (`cross_check`): what needs the whole document: route references to services,
   entrypoints and middlewares; unique route names; regex paths compile; at least one
   entrypoint; no two listeners on one address; with `zero_trust`, no plaintext entrypoint or
   server without `allow_plaintext`, no `insecure_skip_verify`, the admin listener on
   loopback. They run over the raw mapping and skip any part whose shape is wrong, so a typo
   in one route does not hide a dangling reference in another.

Every model is frozen and forbids unknown keys, and sequences are tuples: a `Config` is an
immutable value that a reload replaces whole. `Config.model_validate` on its own also runs the
cross-checks (as one error); `parse_config` is the entry point that reports them one by one.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from fastgate.errors import ConfigError

__all__ = [
    "AccessLog",
    "Admin",
    "AuditLog",
    "Config",
    "DemoOrigin",
    "Entrypoint",
    "EntrypointTls",
    "Forwarded",
    "Limits",
    "Match",
    "Middleware",
    "OtlpExport",
    "Pool",
    "PoolOverride",
    "Providers",
    "RedisProvider",
    "RedisSentinel",
    "Route",
    "RouteAccessLog",
    "Server",
    "Service",
    "Timeouts",
    "TlsCertificate",
    "Tracing",
    "UpstreamTimeouts",
    "UpstreamTls",
    "cross_check",
    "format_path",
    "parse_address",
    "parse_config",
]

# --- value checks ---------------------------------------------------------------------------

# RFC 1123 host names, with `_` tolerated because container and compose service names use it.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
# RFC 9110 §5.6.2 token: what a method may be made of.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")
_BOOL = TypeAdapter(bool)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def _check_type(name: str) -> str:
    if not _TYPE.match(name):
        raise ValueError(f"invalid type {name!r}: a lowercase module name like rate_limit")
    return name


def _check_host(host: str) -> str:
    """A host name or an IP literal (IPv6 without brackets here); returns it unchanged."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise ValueError(f"invalid host {host!r}")
    return host


def parse_address(text: str) -> tuple[str, int]:
    """Split a listen address `host:port` or `[ipv6]:port` into (host, port).

    The host is required (use 0.0.0.0 or [::] for every interface) and the port must be
    1-65535. IPv6 hosts come back without brackets. Raises ValueError with the reason.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"expected [ipv6]:port, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, e.g. [{host}]:{port_text}")
        if not host:
            raise ValueError(f"missing host in {text!r} (use 0.0.0.0 for every interface)")
        _check_host(host)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def _check_address(text: str) -> str:
    parse_address(text)
    return text


def _check_network(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set; did you mean {fixed}?") from None
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None
    return text


def _check_route_host(text: str) -> str:
    host = text.lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"invalid IPv6 host {text!r}") from None
        return host
    if ":" in host:
        raise ValueError(f"a route host has no port ({text!r}); ports belong to entrypoints")
    base = host[2:] if host.startswith("*.") else host
    if "*" in base or not _HOSTNAME.match(base):
        raise ValueError(f"invalid host {text!r} (expected example.com or *.example.com)")
    return host


def _check_method(text: str) -> str:
    if not _TOKEN.match(text):
        raise ValueError(f"invalid method {text!r}")
    return text.upper()


def _check_server_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http:// (or https://), got {url!r}")
    if "@" in parts.netloc:
        raise ValueError("credentials in a server URL are not supported")
    if not parts.hostname:
        raise ValueError(f"missing host in {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith("?"):
        raise ValueError(f"a server URL is scheme://host:port only, no path or query: {url!r}")
    if port == 0:
        raise ValueError("port must be 1-65535, got '0'")
    _check_host(parts.hostname)
    return url


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Name = Annotated[str, AfterValidator(_check_name)]
Address = Annotated[str, AfterValidator(_check_address)]
Network = Annotated[str, AfterValidator(_check_network)]
RouteHost = Annotated[str, AfterValidator(_check_route_host)]
Method = Annotated[str, AfterValidator(_check_method)]
ServerUrl = Annotated[str, AfterValidator(_check_server_url)]
Seconds = Annotated[float, Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, data: Any) -> Any:
        # In YAML `limits:` with nothing under it is null; read it as "all defaults".
        return {} if data is None else data


# --- sections -------------------------------------------------------------------------------


class Limits(_Model):
    """Per-connection bounds on what a client may send; beyond them the request is refused."""

    max_head_bytes: int = Field(16384, ge=256, le=1 << 20, description="request head; 431")
    max_headers: int = Field(100, ge=1, le=512, description="header fields per request; 431")
    max_target: int = Field(8192, ge=16, le=1 << 20, description="request-target bytes; 414")
    max_body_bytes: int = Field(0, ge=0, description="request body bytes; 413; 0 = unlimited")
    min_body_rate: float = Field(
        500.0, ge=0.0, description="request body bytes/s once it ran past timeouts.body; 408"
    )
    max_pipeline_bytes: int = Field(
        262144,
        ge=256,
        le=1 << 30,
        description="pipelined input held per connection before reading pauses",
    )


class Timeouts(_Model):
    """Seconds. The first three guard the client side, the `upstream_*` ones the services."""

    head: Seconds = Field(10.0, description="reading a request head; 408 after it")
    idle: Seconds = Field(60.0, description="idle keep-alive client connection")
    body: Seconds = Field(60.0, description="gap between request body reads")
    upstream_connect: Seconds = Field(5.0, description="connecting to a server; 502")
    upstream_response: Seconds = Field(
        60.0, description="response head after the request was sent; 504"
    )
    upstream_idle: Seconds = Field(60.0, description="gap between response body reads")
    upstream_total: Seconds | None = Field(
        None, description="from forwarding to the response's end, retries included; 504"
    )


class UpstreamTimeouts(_Model):
    """A service's (or a route's) override of the `upstream_*` timeouts; unset keys inherit:
    a route's from its service, a service's from the global `timeouts`."""

    upstream_connect: Seconds | None = None
    upstream_response: Seconds | None = None
    upstream_idle: Seconds | None = None
    upstream_total: Seconds | None = None


class LimitsOverride(_Model):
    """An entrypoint's own head limits; unset keys inherit the global `limits`."""

    max_head_bytes: int | None = Field(None, ge=256, le=1 << 20)
    max_headers: int | None = Field(None, ge=1, le=512)
    max_target: int | None = Field(None, ge=16, le=1 << 20)


class Pool(_Model):
    """Idle keep-alive connections kept to each server."""

    max_idle: int = Field(256, ge=0, description="idle connections per server; 0 = no reuse")
    idle_timeout: Seconds = Field(60.0, description="an idle pooled connection is closed after")


class PoolOverride(_Model):
    """A service's override of `pool`; unset keys inherit."""

    max_idle: int | None = Field(None, ge=0)
    idle_timeout: Seconds | None = None


class Forwarded(_Model):
    """Which peers' X-Forwarded-* headers are believed, and whether to add RFC 7239 Forwarded;
    whose X-Request-ID and W3C trace context (traceparent/tracestate) are kept."""

    trusted_ips: tuple[Network, ...] = Field((), description="IPs or CIDR networks")
    forwarded_header: bool = Field(False, description="also send a Forwarded header")
    trust_trace_context: Literal["always", "trusted", "never"] = Field(
        "always", description="whose valid traceparent/tracestate is continued"
    )
    trust_request_id: Literal["always", "trusted", "never"] = Field(
        "always", description="whose valid X-Request-ID is kept"
    )
    trace_sampled: bool = Field(False, description="flags 01 on traces the gateway starts")

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The trusted peers as network objects (a bare IP is a /32 or /128)."""
        return tuple(ipaddress.ip_network(n) for n in self.trusted_ips)


def _tls_version(value: Any) -> Any:
    # YAML reads an unquoted 1.2 as a float.
    return {1.2: "1.2", 1.3: "1.3"}.get(value, value) if isinstance(value, float) else value


def _check_file_name(path: str) -> str:
    if not path.strip():
        raise ValueError("expected a file path")
    return path


FilePath = Annotated[str, AfterValidator(_check_file_name)]


class TlsCertificate(_Model):
    """One server certificate: PEM files, read (and checked) when the runtime is compiled."""

    cert_file: FilePath = Field(description="the certificate, then its intermediates")
    key_file: FilePath = Field(description="its private key (unencrypted PEM)")


class EntrypointTls(_Model):
    """TLS termination on an entrypoint (fastgate/tls/server.py reads the files).

    The first certificate is the default (no SNI, or a name no certificate covers); the
    others are picked by SNI from their DNS subjectAltNames.
    """

    certificates: tuple[TlsCertificate, ...] = Field(description="the first is the default")
    min_version: Annotated[Literal["1.2", "1.3"] | None, BeforeValidator(_tls_version)] = Field(
        None, description='"1.2" (default) or "1.3"; ciphers: modern means 1.3'
    )
    ciphers: Literal["modern", "intermediate"] = Field(
        "intermediate", description="modern: TLS 1.3 only; intermediate: Mozilla's TLS 1.2 list"
    )
    handshake_timeout: Seconds = Field(10.0, description="a handshake not done by then is closed")
    client_auth: Literal["none", "optional", "required"] = Field(
        "none", description="ask for (optional) or demand (required) a client certificate"
    )
    client_ca_file: FilePath | None = Field(
        None, validate_default=True, description="PEM CAs that client certificates chain to"
    )
    crl_file: FilePath | None = Field(
        None, validate_default=True, description="PEM CRL checked for the client certificate"
    )

    @field_validator("certificates")
    @classmethod
    def _some_certificates(
        cls, certificates: tuple[TlsCertificate, ...]
    ) -> tuple[TlsCertificate, ...]:
        if not certificates:
            raise ValueError("at least one certificate (the first is the default)")
        return certificates

    @field_validator("ciphers")
    @classmethod
    def _modern_is_13(cls, ciphers: str, info: ValidationInfo) -> str:
        if ciphers == "modern" and info.data.get("min_version") == "1.2":
            raise ValueError('modern is TLS 1.3 only; set min_version "1.3" or leave it out')
        return ciphers

    @field_validator("client_ca_file")
    @classmethod
    def _ca_needed(cls, path: str | None, info: ValidationInfo) -> str | None:
        auth = info.data.get("client_auth", "none")
        if path is None and auth != "none":
            raise ValueError(f"client_auth: {auth} needs client_ca_file")
        if path is not None and auth == "none":
            raise ValueError("client_ca_file is only used with client_auth optional or required")
        return path

    @field_validator("crl_file")
    @classmethod
    def _crl_needs_auth(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is not None and info.data.get("client_auth", "none") == "none":
            raise ValueError("crl_file is only used with client_auth optional or required")
        return path

    @property
    def version(self) -> str:
        """The effective minimum version: "1.3" with modern ciphers, else min_version/1.2."""
        return "1.3" if self.ciphers == "modern" else self.min_version or "1.2"

    def files(self) -> tuple[str, ...]:
        """Every file this section names (the supervisor watches them for changes)."""
        names = [p for c in self.certificates for p in (c.cert_file, c.key_file)]
        names += [p for p in (self.client_ca_file, self.crl_file) if p is not None]
        return tuple(dict.fromkeys(names))


class Entrypoint(_Model):
    """A listener: one address, bound with SO_REUSEPORT in every worker."""

    address: Address = Field("127.0.0.1:8080", description="host:port or [ipv6]:port")
    backlog: int = Field(1024, ge=1, le=65535, description="listen(2) backlog")
    forwarded: Forwarded = Forwarded()
    tls: EntrypointTls | None = Field(None, description="TLS termination; absent = plain HTTP")
    allow_plaintext: bool = Field(
        False, description="with zero_trust: this entrypoint may serve plain HTTP"
    )
    max_connections: int = Field(
        0, ge=0, description="open client connections per worker; more get 503; 0 = unlimited"
    )
    limits: LimitsOverride | None = Field(None, description="head limits for this entrypoint")

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


class Match(_Model):
    """What a request must look like for the route to apply; every given part must match."""

    hosts: tuple[RouteHost, ...] = Field(
        (), description="exact or *.wildcard host names, lowercased; empty = any host"
    )
    path: str = Field("/", description="a path, a prefix or a regular expression")
    path_type: Literal["exact", "prefix", "regex"] = "prefix"
    methods: tuple[Method, ...] = Field((), description="uppercased; empty = any method")


# --- logs ---------------------------------------------------------------------------------


def _check_log_path(path: str) -> str:
    if not path.strip():
        raise ValueError('expected "-" (stdout), "stderr" or a file path')
    if "\0" in path:
        raise ValueError("a path cannot contain a NUL byte")
    return path


LogPath = Annotated[str, AfterValidator(_check_log_path)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
CookieName = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")]
# The default keys whose query values the access log hides (compared case-insensitively,
# after percent-decoding); the query parameters auth middlewares read credentials from are
# added when the log is built (fastgate/logs/runtime.py).
DEFAULT_REDACT_KEYS = (
    "access_token",
    "api_key",
    "apikey",
    "auth",
    "client_secret",
    "code",
    "id_token",
    "jwt",
    "key",
    "password",
    "passwd",
    "pwd",
    "refresh_token",
    "secret",
    "session",
    "sig",
    "signature",
    "token",
)


def _check_query_key(key: str) -> str:
    if not key or len(key) > 256 or not key.isascii() or not key.isprintable():
        raise ValueError(f"expected a query parameter name (printable ASCII), got {key!r}")
    return key


QueryKey = Annotated[str, AfterValidator(_check_query_key)]


class _LogBuffers(_Model):
    """How one stream's lines travel: a per-worker batch buffer filled in C, taken by the
    stream's writer. A line that does not fit is dropped and counted, never waited for."""

    buffer_bytes: int = Field(
        1048576,
        ge=65536,
        le=1 << 30,
        description="per-worker batch buffer; a line that does not fit is dropped (counted)",
    )
    flush_interval: Seconds = Field(
        0.2, le=60.0, description="seconds between writes (also as soon as 256 KiB wait)"
    )


class AccessLog(_LogBuffers):
    """One line per exchange (formatted in C at the exchange end; fastgate/logs)."""

    enabled: bool = Field(False, description="write the access log")
    path: LogPath = Field("-", description='"-" = stdout, "stderr", or a file (appended, 0640)')
    format: Literal["json", "common", "combined"] = Field(
        "json", description="json (one object per line), common or combined (NCSA)"
    )
    sample: Fraction = Field(1.0, description="fraction of requests logged (0..1)")
    always_log_errors: bool = Field(
        True, description="status >= 400 (or no response) is logged whatever the sample"
    )
    redact_query_keys: tuple[QueryKey, ...] = Field(
        DEFAULT_REDACT_KEYS,
        description="query parameters whose values are logged as REDACTED (case-insensitive)",
    )
    drop_query: bool = Field(False, description="log paths without their query string")


class AuditLog(_LogBuffers):
    """Security events: every refusal by the gateway's policy (401, 403, 429, IP lists, auth
    unavailable) and client TLS certificate failures, one JSON line each."""

    enabled: bool = Field(True, description="write the audit stream")
    path: LogPath = Field("stderr", description='"-" = stdout, "stderr", or a file')


# Framing and routing headers the exporter writes itself.
_OTLP_OWN_HEADERS = frozenset(
    ("content-type", "content-length", "transfer-encoding", "host", "connection")
)


class OtlpExport(_LogBuffers):
    """Spans sent to an OpenTelemetry collector (OTLP/HTTP JSON), one per sampled exchange."""

    max_pending_bytes: int = Field(
        8388608,
        ge=65536,
        le=1 << 32,
        description="bytes of spans waiting behind a slow collector before they are dropped",
    )
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces", description="the collector's OTLP/HTTP traces URL"
    )
    headers: dict[str, str] = Field(
        {}, repr=False, description="extra request headers (values may be ${VAR} secrets)"
    )
    timeout: Seconds = Field(5.0, le=300.0, description="seconds per export request")
    ca_file: FilePath | None = Field(None, description="trust these CAs for an https endpoint")
    service_name: str = Field("fastgate", min_length=1, description="resource service.name")
    flush_interval: Seconds = Field(1.0, le=60.0, description="seconds between exports")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError as exc:
            raise ValueError(f"invalid URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        if "@" in parts.netloc:
            raise ValueError("credentials in the endpoint URL are not supported: use headers")
        return url

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _TOKEN.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in _OTLP_OWN_HEADERS:
                raise ValueError(f"header {name}: set by the exporter itself, not configurable")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name}: the value cannot contain CR, LF or NUL")
        return headers

    @model_validator(mode="after")
    def _ca_needs_https(self) -> OtlpExport:
        if self.ca_file is not None and not self.endpoint.lower().startswith("https://"):
            raise ValueError("ca_file is only used with an https:// endpoint")
        return self


class Tracing(_Model):
    """Trace export. The W3C trace context itself is set per entrypoint (`forwarded`)."""

    otlp: OtlpExport | None = Field(None, description="span export; absent = off (no cost)")


def _route_log(value: Any) -> Any:
    # `access_log: true/false` is shorthand for {enabled: ...}.
    if isinstance(value, bool):
        return {"enabled": value}
    if value is not None and not isinstance(value, Mapping | BaseModel):
        raise ValueError("expected true, false or a mapping {sample, always_log_errors}")
    return value


class RouteAccessLog(_Model):
    """A route's own access-log rule; unset keys inherit the global `access_log` ones.
    In the file `access_log: false` turns the route's log off and `true` is the global rule."""

    enabled: bool = Field(True, description="false: this route's requests are not logged")
    sample: Fraction | None = Field(None, description="fraction of this route's requests logged")
    always_log_errors: bool | None = Field(None, description="errors logged whatever the sample")


class Route(_Model):
    """Requests matching `match` on the listed entrypoints go through `middlewares` to `service`.

    Among matching routes the highest `priority` wins, then the most specific match.
    """

    name: Name = Field(description="unique; defaults to route-<index>")
    entrypoints: tuple[str, ...] = Field((), description="entrypoint names; empty = all")
    match: Match = Match()
    priority: int = 0
    middlewares: tuple[str, ...] = Field((), description="applied in order")
    service: str
    access_log: Annotated[RouteAccessLog | None, BeforeValidator(_route_log)] = Field(
        None, description="false: not logged; true or absent: the global rule; or its own"
    )
    timeouts: UpstreamTimeouts | None = Field(None, description="over the service's timeouts")
    max_body_bytes: int | None = Field(
        None, ge=0, description="request body bytes on this route; 413; 0 = unlimited"
    )


class Server(_Model):
    """One upstream server; https:// ones are reached over TLS (the service's `tls`)."""

    url: ServerUrl = Field(description="http://host:port (port defaults to 80/443)")
    weight: int = Field(1, ge=1, le=1_000_000)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


class UpstreamTls(_Model):
    """How a service's https:// servers are verified, and the client certificate shown to
    them (fastgate/tls/client.py reads the files). Absent: the system roots, the URL's host."""

    ca_file: FilePath | None = Field(None, description="trust these CAs, not the system roots")
    cert_file: FilePath | None = Field(None, description="client certificate (mTLS), PEM")
    key_file: FilePath | None = Field(None, description="its private key (unencrypted PEM)")
    server_name: str | None = Field(None, description="SNI and the name checked; default: host")
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"
    insecure_skip_verify: bool = Field(False, description="no chain or name check (warned)")

    @field_validator("server_name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        return None if name is None else _check_host(name)

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (both or neither)")
        return self

    def files(self) -> tuple[str, ...]:
        """Every file this section names (the supervisor watches them for changes)."""
        names = (self.ca_file, self.cert_file, self.key_file)
        return tuple(dict.fromkeys(p for p in names if p is not None))


def _balancer(value: Any) -> Any:
    """`balancer: least_request` is short for `balancer: {type: least_request}`."""
    return {"type": value} if isinstance(value, str) else value


class Balancer(_Model):
    """How a service picks a server for each request (docs/services.md)."""

    type: Literal["round_robin", "least_request", "random", "hash", "sticky_cookie"] = Field(
        "round_robin", description="smooth weighted round robin by default"
    )
    hash_on: Literal["client_ip", "header", "cookie"] = Field(
        "client_ip", description="hash: what the key is"
    )
    name: str | None = Field(None, description="hash: the header or cookie name")
    cookie: CookieName = Field("fg_server", description="sticky_cookie: the cookie's name")
    cookie_max_age: Seconds | None = Field(None, description="sticky_cookie: absent = session")

    @model_validator(mode="after")
    def _needs_name(self) -> Balancer:
        if self.type == "hash" and self.hash_on != "client_ip" and not self.name:
            raise ValueError(f"hash_on: {self.hash_on} needs `name` (the {self.hash_on} name)")
        if self.name is not None and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", self.name):
            raise ValueError(f"name {self.name!r} is not a header or cookie name")
        return self


class HealthCheck(_Model):
    """Active health check: each worker asks every server of the service on its own."""

    path: str = Field("/", description="the request target asked (origin-form)")
    method: Literal["GET", "HEAD"] = "GET"
    host: str | None = Field(None, description="Host header; default: the server's host")
    interval: Seconds = Field(5.0, le=3600.0, description="seconds between checks")
    timeout: Seconds = Field(2.0, le=300.0, description="seconds a check may take")
    expected_statuses: tuple[Annotated[int, Field(ge=100, le=599)], ...] = Field(
        (), description="statuses that count as healthy; empty = 200-399"
    )
    rise: int = Field(2, ge=1, le=100, description="passes in a row to become healthy")
    fall: int = Field(3, ge=1, le=100, description="failures in a row to become unhealthy")

    @field_validator("host")
    @classmethod
    def _host_value(cls, host: str | None) -> str | None:
        if host is not None and not re.fullmatch(r"[!-~]+", host):
            raise ValueError("must be printable ASCII without spaces (a Host header value)")
        return host

    @field_validator("path")
    @classmethod
    def _origin_form(cls, path: str) -> str:
        if not path.startswith("/") or any(c <= " " or c == "\x7f" for c in path):
            raise ValueError("must start with / and have no spaces or control characters")
        return path


class OutlierDetection(_Model):
    """Passive health: a server failing in a row is ejected for a back-off that grows with
    each ejection (base * ejections, at most `max_ejection`)."""

    consecutive_errors: int = Field(
        5, ge=1, le=10_000, description="5xx answers, connect failures, resets, timeouts"
    )
    base_ejection: Seconds = Field(30.0, description="seconds out after the first ejection")
    max_ejection: Seconds = Field(300.0, description="the longest ejection")
    max_ejected_percent: int = Field(
        50, ge=0, le=100, description="never eject more of the service's servers than this"
    )


class CircuitBreaker(_Model):
    """Per service (per worker): over `window`, too many errors or slow answers open the
    circuit; open answers 503 at once; after `open_for`, `half_open_requests` probes decide."""

    window: Seconds = Field(10.0, le=3600.0, description="seconds of history judged")
    min_requests: int = Field(20, ge=1, description="fewer requests in the window: never opens")
    error_ratio: Fraction | None = Field(
        0.5, description="5xx/connect/timeout share that opens it; null = not judged"
    )
    slow_ratio: Fraction | None = Field(None, description="share of slow answers that opens it")
    slow_threshold: Seconds = Field(1.0, description="an answer slower than this is slow")
    open_for: Seconds = Field(10.0, le=3600.0, description="seconds open before probing")
    half_open_requests: int = Field(3, ge=1, le=1000, description="probes that must succeed")

    @model_validator(mode="after")
    def _judges_something(self) -> CircuitBreaker:
        if self.error_ratio is None and self.slow_ratio is None:
            raise ValueError("set error_ratio or slow_ratio (or both)")
        return self


RetryOn = Literal["connect_failure", "reset", "timeout"]
_IDEMPOTENT = ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")


class Retries(_Model):
    """Trying another server. A connect failure sent nothing, so any request may be retried;
    a reset, a timeout or a retryable status only for an idempotent method without a body."""

    attempts: int = Field(1, ge=0, le=10, description="retries after the first try; 0 = none")
    retry_on: tuple[RetryOn, ...] = Field(("connect_failure",), description="what is retried")
    statuses: tuple[Annotated[int, Field(ge=500, le=599)], ...] = Field(
        (), description="upstream statuses retried (idempotent, body-less requests only)"
    )
    budget_percent: float = Field(
        20.0, ge=0.0, le=100.0, description="retries at most this share of requests (10 s)"
    )
    min_per_second: int = Field(3, ge=0, le=100_000, description="retries always allowed")


class ServiceLimits(_Model):
    """Concurrency per service, per worker: beyond `max_concurrent` requests wait in a queue
    for up to `queue_timeout`, then get 503; a full queue answers 503 at once."""

    max_concurrent: int = Field(0, ge=0, description="requests in flight; 0 = unlimited")
    max_queue: int = Field(0, ge=0, description="requests waiting for a slot")
    queue_timeout: Seconds = Field(1.0, le=300.0, description="seconds a request may wait")


class Service(_Model):
    """A set of servers behind one name: how one is picked, how failures are handled, and
    optional timeout and pool overrides (docs/services.md)."""

    servers: tuple[Server, ...]
    timeouts: UpstreamTimeouts | None = None
    pool: PoolOverride | None = None
    tls: UpstreamTls | None = Field(None, description="for the https:// servers")
    allow_plaintext: bool = Field(
        False, description="with zero_trust: this service may have http:// servers"
    )
    balancer: Annotated[Balancer, BeforeValidator(_balancer)] = Balancer()
    health_check: HealthCheck | None = Field(None, description="active checks; absent = off")
    outlier_detection: OutlierDetection | None = Field(None, description="absent = off")
    when_all_unhealthy: Literal["fail", "panic"] = Field(
        "fail", description="fail: 503; panic: use every server anyway"
    )
    circuit_breaker: CircuitBreaker | None = Field(None, description="absent = off")
    retries: Retries = Retries()
    limits: ServiceLimits = ServiceLimits()

    @field_validator("servers")
    @classmethod
    def _some_servers(cls, servers: tuple[Server, ...]) -> tuple[Server, ...]:
        if not servers:
            raise ValueError("a service needs at least one server")
        return servers

    @field_validator("tls")
    @classmethod
    def _tls_needs_https(cls, tls: UpstreamTls | None, info: ValidationInfo) -> UpstreamTls | None:
        servers = info.data.get("servers")
        if tls is not None and servers and not any(s.tls for s in servers):
            raise ValueError("only used with https:// servers, and every server here is http://")
        return tls


class Middleware(_Model):
    """A named middleware instance: its `type` plus that type's options.

    In the file the options sit beside `type` (`{type: rate_limit, rate: 100}`); here they are
    kept apart in `options`, and serialization puts them back beside `type`. The type's own
    class validates the options when the runtime is compiled.
    """

    type: Annotated[str, AfterValidator(_check_type)]
    options: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _split_options(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            options = dict(data)
            if "type" not in options:
                return {"options": options}
            return {"type": options.pop("type"), "options": options}
        return data

    @model_serializer(mode="wrap")
    def _flatten_options(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            options = data.pop("options", None) or {}
            data.update(options)
        return data


class RedisSentinel(_Model):
    """Find the Redis master through Sentinel: where the sentinels are, the master's name."""

    addresses: tuple[Address, ...] = Field(description="sentinels, host:port each")
    master: Name = Field(description="the name the sentinels monitor the master under")
    username: str | None = None
    password: str | None = Field(None, repr=False, description="the sentinels' own password")

    @field_validator("addresses")
    @classmethod
    def _some(cls, addresses: tuple[str, ...]) -> tuple[str, ...]:
        if not addresses:
            raise ValueError("at least one sentinel address")
        return addresses


class RedisProvider(_Model):
    """A Redis server (or a Sentinel-managed master) that middlewares name, e.g. the
    distributed rate limits. `address` or `host` + `port`, or `sentinel`."""

    address: Address | None = Field(None, description="host:port")
    host: str | None = None
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0, le=100_000)
    username: str | None = Field(None, description="an ACL user (needs password)")
    password: str | None = Field(None, repr=False)
    tls: bool | str = Field(False, description="true, or the path of a CA file to trust")
    sentinel: RedisSentinel | None = None
    connect_timeout: Seconds = Field(1.0, description="seconds to connect and handshake")
    command_timeout: Seconds = Field(0.25, description="seconds a command may take")
    max_backoff: Seconds = Field(5.0, description="longest wait between reconnect attempts")

    @field_validator("host")
    @classmethod
    def _host(cls, host: str | None) -> str | None:
        return None if host is None else _check_host(host)

    @field_validator("tls")
    @classmethod
    def _ca_file(cls, tls: bool | str) -> bool | str:
        if isinstance(tls, str) and not tls:
            raise ValueError("tls is true, false, or the path of a CA file")
        return tls

    @model_validator(mode="after")
    def _where(self) -> RedisProvider:
        given = [k for k in ("address", "host", "sentinel") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of address, host or sentinel, not {' and '.join(given)}")
        if not given:
            raise ValueError("give address (host:port), host, or sentinel")
        if self.username is not None and self.password is None:
            raise ValueError("username needs a password")
        return self

    def endpoint(self) -> tuple[str, int]:
        """(host, port) of a directly addressed server."""
        if self.address is not None:
            return parse_address(self.address)
        return self.host or "127.0.0.1", self.port


class Providers(_Model):
    """Shared back-ends that middlewares refer to by name."""

    redis: dict[Name, RedisProvider] = {}

    @field_validator("redis", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return {} if value is None else value


class Admin(_Model):
    """The admin listener (/metrics, /healthz, /readyz, /audit). Keep it on loopback."""

    address: Address = "127.0.0.1:9901"
    enabled: bool = True


class DemoOrigin(_Model):
    """A built-in hello-world upstream, so the embedded default answers out of the box."""

    address: Address = "127.0.0.1:8081"
    enabled: bool = False


LogLevel = Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)]


class Config(_Model):
    """The whole configuration. Build it with `parse_config` or `fastgate.config.load_config`."""

    workers: int = Field(0, ge=0, le=1024, description="worker processes; 0 = CPU count")
    log_level: LogLevel = "info"
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds SIGTERM waits for in-flight requests"
    )
    zero_trust: bool = Field(
        False, description="refuse plaintext entrypoints/servers and unverified upstream TLS"
    )
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    pool: Pool = Pool()
    entrypoints: dict[Name, Entrypoint] = {}
    routes: tuple[Route, ...] = ()
    services: dict[Name, Service] = {}
    middlewares: dict[Name, Middleware] = {}
    providers: Providers = Providers()
    admin: Admin = Admin()
    demo_origin: DemoOrigin = DemoOrigin()
    access_log: AccessLog = AccessLog()
    audit_log: AuditLog = AuditLog()
    tracing: Tracing = Tracing()

    @field_validator("entrypoints", "services", "middlewares", mode="before")
    @classmethod
    def _empty_mapping(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("routes", mode="before")
    @classmethod
    def _default_route_names(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, list | tuple):
            return [
                {**r, "name": f"route-{i}"} if isinstance(r, Mapping) and "name" not in r else r
                for i, r in enumerate(value)
            ]
        return value

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Config:
        if info.context and info.context.get("cross_checked"):
            return self
        problems = cross_check(self.model_dump())
        if problems:
            raise ValueError("\n".join(f"{path}: {reason}" for path, reason in problems))
        return self

    # --- helpers for the runtime compiler ---

    def worker_count(self) -> int:
        """`workers`, with 0 resolved to the number of CPUs."""
        return self.workers or os.cpu_count() or 1

    def effective_timeouts(self, service: str) -> Timeouts:
        """The global timeouts with `service`'s upstream overrides applied."""
        override = self.services[service].timeouts
        if override is None:
            return self.timeouts
        return self.timeouts.model_copy(update=override.model_dump(exclude_none=True))

    def shortest_timeout(self) -> float:
        """The shortest timeout the connection ticker must honour: client-side ones, every
        route's upstream ones, service queue timeouts, health-check and breaker periods."""
        t = self.timeouts
        values = [t.head, t.idle, t.body]
        for route in self.routes:
            if route.service in self.services:
                rt = self.route_timeouts(route)
                values += [rt.upstream_connect, rt.upstream_response, rt.upstream_idle]
                values += [rt.upstream_total] if rt.upstream_total else []
        if not self.routes:
            values.append(t.upstream_connect)
        for svc in self.services.values():
            if svc.limits.max_concurrent and svc.limits.max_queue:
                values.append(svc.limits.queue_timeout)
            if svc.circuit_breaker is not None:
                values.append(svc.circuit_breaker.open_for)
            if svc.outlier_detection is not None:
                values.append(svc.outlier_detection.base_ejection)
        return min(values)

    def route_timeouts(self, route: Route) -> Timeouts:
        """The timeouts a route's requests run under: its own over its service's."""
        timeouts = self.effective_timeouts(route.service)
        if route.timeouts is None:
            return timeouts
        return timeouts.model_copy(update=route.timeouts.model_dump(exclude_none=True))

    def entry_limits(self, entrypoint: str) -> Limits:
        """The head limits of `entrypoint`: its own over the global `limits`."""
        override = self.entrypoints[entrypoint].limits
        if override is None:
            return self.limits
        return self.limits.model_copy(update=override.model_dump(exclude_none=True))

    def effective_pool(self, service: str) -> Pool:
        """The global pool settings with `service`'s overrides applied."""
        override = self.services[service].pool
        if override is None:
            return self.pool
        return self.pool.model_copy(update=override.model_dump(exclude_none=True))

    def routes_for(self, entrypoint: str) -> tuple[Route, ...]:
        """The routes served on `entrypoint` (those naming it, and those naming none)."""
        return tuple(r for r in self.routes if not r.entrypoints or entrypoint in r.entrypoints)


# --- cross-checks ---------------------------------------------------------------------------


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _section_names(data: Mapping[str, Any], key: str) -> set[str] | None:
    """The names defined in a mapping section, or None when the section is malformed."""
    section = data.get(key, {})
    if section is None:
        return set()
    return {k for k in section if isinstance(k, str)} if isinstance(section, Mapping) else None


def _sequence(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def cross_check(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The checks that need the whole document, over the raw (unvalidated) mapping.

    Returns (path, reason) pairs. Parts with the wrong shape are skipped: the shape check
    reports them, and the rest of the document is still checked.
    """
    errors: list[tuple[str, str]] = []
    entrypoints = _section_names(data, "entrypoints")
    services = _section_names(data, "services")
    middlewares = _section_names(data, "middlewares")
    if entrypoints is not None and not entrypoints:
        errors.append(("entrypoints", "at least one entrypoint is required"))

    seen_names: dict[str, int] = {}
    for i, route in enumerate(_sequence(data.get("routes"))):
        if not isinstance(route, Mapping):
            continue
        at = f"routes[{i}]"
        name = route.get("name", f"route-{i}")
        if isinstance(name, str):
            if name in seen_names:
                errors.append(
                    (
                        f"{at}.name",
                        f"duplicate route name {name!r} (also routes[{seen_names[name]}])",
                    )
                )
            else:
                seen_names[name] = i
        service = route.get("service")
        if isinstance(service, str) and services is not None and service not in services:
            errors.append(
                (f"{at}.service", f"unknown service {service!r}{_did_you_mean(service, services)}")
            )
        for key, known, what in (
            ("entrypoints", entrypoints, "entrypoint"),
            ("middlewares", middlewares, "middleware"),
        ):
            if known is None:
                continue
            for j, ref in enumerate(_sequence(route.get(key))):
                if isinstance(ref, str) and ref not in known:
                    errors.append(
                        (f"{at}.{key}[{j}]", f"unknown {what} {ref!r}{_did_you_mean(ref, known)}")
                    )
        match = route.get("match", {})
        if isinstance(match, Mapping):
            errors.extend(_check_match_path(f"{at}.match.path", match))

    errors.extend(_check_address_clashes(data))
    errors.extend(_check_provider_refs(data))
    errors.extend(_check_zero_trust(data))
    return errors


def _flag(value: Any) -> bool:
    """A raw boolean as the schema reads it (`true`, `"yes"`, 1); anything else is False."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False


def _check_zero_trust(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """With `zero_trust: true`: every entrypoint has tls and every server is https://, each
    unless its section says `allow_plaintext: true`; no service skips certificate checks
    (no opt-out); the admin listener, plain HTTP by design, is on a loopback address."""
    if not _flag(data.get("zero_trust", False)):
        return []
    errors: list[tuple[str, str]] = []
    entrypoints = data.get("entrypoints")
    for name, ep in (entrypoints or {}).items() if isinstance(entrypoints, Mapping) else ():
        ep = {} if ep is None else ep
        if isinstance(ep, Mapping) and ep.get("tls") is None:
            if not _flag(ep.get("allow_plaintext", False)):
                errors.append(
                    (
                        f"entrypoints.{name}.tls",
                        "zero_trust refuses a plain HTTP entrypoint: add tls, or set "
                        "allow_plaintext: true on it",
                    )
                )
    services = data.get("services")
    for name, svc in services.items() if isinstance(services, Mapping) else ():
        if not isinstance(svc, Mapping):
            continue
        if not _flag(svc.get("allow_plaintext", False)):
            for i, server in enumerate(_sequence(svc.get("servers"))):
                url = server.get("url") if isinstance(server, Mapping) else None
                if isinstance(url, str) and url.lower().startswith("http://"):
                    errors.append(
                        (
                            f"services.{name}.servers[{i}].url",
                            "zero_trust refuses a plain http:// server: use https://, or set "
                            "allow_plaintext: true on the service",
                        )
                    )
        tls = svc.get("tls")
        if isinstance(tls, Mapping) and _flag(tls.get("insecure_skip_verify", False)):
            errors.append(
                (
                    f"services.{name}.tls.insecure_skip_verify",
                    "never allowed with zero_trust (allow_plaintext does not cover it)",
                )
            )
    admin = data.get("admin", {})
    if isinstance(admin, Mapping) and _flag(admin.get("enabled", True)):
        address = admin.get("address", Admin.model_fields["address"].default)
        try:
            host = parse_address(address)[0]
        except (ValueError, TypeError, AttributeError):
            host = None  # the shape check reports it
        if host is not None and not _is_loopback(host):
            errors.append(
                (
                    "admin.address",
                    f"zero_trust keeps the (plain HTTP) admin listener on loopback, "
                    f"got {address}: use 127.0.0.1 or [::1]",
                )
            )
    return errors


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_provider_refs(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A middleware option `redis: NAME` names a `providers.redis` entry."""
    providers = data.get("providers") or {}
    redis = providers.get("redis") if isinstance(providers, Mapping) else None
    known = {k for k in redis if isinstance(k, str)} if isinstance(redis, Mapping) else set()
    middlewares = data.get("middlewares")
    errors: list[tuple[str, str]] = []
    if not isinstance(middlewares, Mapping):
        return errors
    for name, mw in middlewares.items():
        ref = mw.get("redis") if isinstance(mw, Mapping) else None
        if isinstance(ref, str) and ref and ref not in known:
            hint = _did_you_mean(ref, known) if known else " (providers.redis defines none)"
            errors.append((f"middlewares.{name}.redis", f"unknown redis provider {ref!r}{hint}"))
    return errors


def _check_match_path(at: str, match: Mapping[str, Any]) -> list[tuple[str, str]]:
    path = match.get("path", "/")
    path_type = match.get("path_type", "prefix")
    if not isinstance(path, str):
        return []
    if path_type == "regex":
        try:
            re.compile(path)
        except re.error as exc:
            return [(at, f"invalid regular expression {path!r}: {exc}")]
    elif path_type in ("exact", "prefix") and not path.startswith("/"):
        return [(at, f"a {path_type} path must start with '/', got {path!r}")]
    return []


def _check_address_clashes(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """No two listeners (entrypoints, admin, demo origin) on one host:port."""
    listeners: list[tuple[str, Any]] = []
    entrypoints = data.get("entrypoints")
    if isinstance(entrypoints, Mapping):
        default = Entrypoint.model_fields["address"].default
        for name, ep in entrypoints.items():
            if isinstance(ep, Mapping) or ep is None:
                listeners.append(
                    (f"entrypoints.{name}.address", (ep or {}).get("address", default))
                )
    for key, model in (("admin", Admin), ("demo_origin", DemoOrigin)):
        section = data.get(key, {})
        if not isinstance(section, Mapping):
            continue
        if section.get("enabled", model.model_fields["enabled"].default) is True:
            default = model.model_fields["address"].default
            listeners.append((f"{key}.address", section.get("address", default)))
    errors: list[tuple[str, str]] = []
    taken: dict[tuple[str, int], str] = {}
    for at, address in listeners:
        try:
            host, port = parse_address(address)
        except (ValueError, TypeError, AttributeError):
            continue
        key = (host.lower(), port)
        if key in taken:
            errors.append((at, f"address {address} is already used by {taken[key]}"))
        else:
            taken[key] = at.removesuffix(".address")
    return errors


# --- errors ---------------------------------------------------------------------------------

_SIMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def format_path(loc: typing.Iterable[int | str]) -> str:
    """A pydantic `loc` tuple as a key path: ('routes', 0, 'match', 'path') → routes[0].match.path.

    Mapping keys that are not plain names are quoted: `services['my svc'].servers`.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _model_at(
    loc: typing.Sequence[int | str], root: type[BaseModel] | None = None
) -> type[BaseModel] | None:
    """The model class that a loc points into (for 'did you mean' on unknown keys)."""
    annotation: Any = Config if root is None else root
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
            continue
        args = typing.get_args(annotation)
        origin = typing.get_origin(annotation)
        if origin is tuple and args and isinstance(part, int):
            annotation = args[0]
        elif origin is dict and len(args) == 2 and isinstance(part, str):
            annotation = args[1]
        else:
            return None
    annotation = _unwrap(annotation)
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def pydantic_errors(
    exc: ValidationError, root: type[BaseModel] | None = None
) -> list[tuple[str, str]]:
    """Turn a pydantic ValidationError into (key path, reason) pairs with plain reasons.
    `root` is the model that was validated (default: the whole Config), for 'did you mean'."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        kind = err["type"]
        reason = err["msg"]
        value = err.get("input")
        if kind == "value_error":
            reason = str(err.get("ctx", {}).get("error", reason))
            if not loc and "\n" in reason:  # the Config-level cross-check, one line per error
                for line in reason.splitlines():
                    path, _, why = line.partition(": ")
                    out.append((path, why))
                continue
        elif kind == "extra_forbidden":
            model = _model_at(loc[:-1], root)
            names = [f.alias or n for n, f in model.model_fields.items()] if model else []
            hint = _did_you_mean(str(loc[-1]), names)
            reason = f"unknown key{hint}"
        elif kind == "missing":
            reason = "required key is missing"
        elif isinstance(value, str | int | float | bool) and value is not None:
            reason = f"{reason} (got {value!r})"
        if loc and loc[-1] == "[key]":
            loc.pop()
        out.append((format_path(loc), reason))
    return out


def _natural(item: tuple[str, str]) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a configuration mapping; raise one ConfigError listing every problem.

    The error's `errors` attribute holds (key path, reason) pairs in document-path order.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the configuration must be a mapping, got {type(data).__name__}")
    errors: list[tuple[str, str]] = []
    config = None
    try:
        config = Config.model_validate(data, context={"cross_checked": True})
    except ValidationError as exc:
        errors.extend(pydantic_errors(exc))
    errors.extend(cross_check(data))
    if errors:
        unique = list(dict.fromkeys(errors))
        raise ConfigError.from_errors(sorted(unique, key=_natural))
    assert config is not None
    return config
