"""The mtls_auth middleware: a verified client certificate (DER from the connection) ->
Identity; none -> 401 without a challenge; allow lists -> 403; the XFCC line and its
quoting; the per-certificate cache; option errors with key paths."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastgate._core.httphead import parse_request
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.mtls_auth import MtlsAuth, certificate_identity, xfcc_line
from fastgate.middleware.registry import build

KEY = ec.generate_private_key(ec.SECP256R1())
ISSUER = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Client CA")])


def make_cert(
    cn: str | None = "client-1",
    dns: tuple[str, ...] = ("client.test",),
    uris: tuple[str, ...] = (),
    org: str | None = None,
    serial: int = 0xABC123,
) -> bytes:
    """A client certificate as DER (signature not checked here: the handshake does that)."""
    attrs = []
    if org is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ISSUER)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(KEY, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


CERT = make_cert(uris=("spiffe://example.org/svc",))


class Conn:
    """The connection as a middleware sees it: peer_certificate and the upstream lines."""

    def __init__(self, der: bytes | None) -> None:
        self.peer_certificate = der
        self.client_ip = "127.0.0.1"
        self.request_id = b"0" * 32
        self.lines: list[bytes] = []

    def add_upstream_headers(self, lines: bytes) -> None:
        self.lines.append(lines)


def request(der: bytes | None, identity: Identity | None = None) -> RequestContext:
    head = parse_request(b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n")
    return RequestContext(conn=Conn(der), head=head, identity=identity)


def middleware(**options: Any) -> MtlsAuth:
    return build("clients", "mtls_auth", options)


def refusal(reply: Any) -> tuple[int, bytes, dict[str, str]]:
    assert isinstance(reply, LocalReply)
    return reply.status, reply.body, dict(reply.headers)


# ---- identity ----------------------------------------------------------------------------------


def test_identity_from_certificate() -> None:
    mw = middleware()
    ctx = request(CERT)
    assert mw.on_request(ctx) is None
    identity = ctx.identity
    assert identity is not None
    assert (identity.method, identity.subject, identity.consumer) == ("mtls", "client-1", None)
    assert dict(identity.claims) == {
        "fingerprint_sha256": hashlib.sha256(CERT).hexdigest(),
        "subject": "CN=client-1",
        "issuer": "CN=Test Client CA",
        "san_dns": ("client.test",),
        "san_uri": ("spiffe://example.org/svc",),
        "serial": "abc123",
    }
    assert ctx.conn.lines == []  # nothing to forward without forward options


@pytest.mark.parametrize(
    "der, subject",
    [
        pytest.param(make_cert(cn="svc"), "svc", id="common name"),
        pytest.param(make_cert(cn=None, dns=("a.test", "b.test")), "a.test", id="first DNS"),
        pytest.param(
            make_cert(cn=None, dns=("a.test",), uris=("spiffe://x/y",)),
            "spiffe://x/y",
            id="first SAN of any text kind",
        ),
        pytest.param(make_cert(cn=None, dns=(), org="Org"), "O=Org", id="neither: the DN"),
    ],
)
def test_subject_choice(der: bytes, subject: str) -> None:
    identity = certificate_identity(x509.load_der_x509_certificate(der), der)
    assert identity.subject == subject


# ---- refusals ----------------------------------------------------------------------------------


def test_no_certificate_is_401_without_challenge() -> None:
    mw = middleware()
    ctx = request(None)
    status, body, headers = refusal(mw.on_request(ctx))
    assert (status, headers) == (401, {})
    assert b"client certificate required" in body
    assert ctx.identity is None
    assert mw.stats()["failures"] == {"missing credentials": 1}


def test_optional_passes_without_certificate_and_skips_identified() -> None:
    mw = middleware(optional=True, forward_client_cert=True)
    ctx = request(None)
    assert mw.on_request(ctx) is None and ctx.identity is None and ctx.conn.lines == []
    earlier = Identity(method="jwt", subject="alice")
    ctx = request(CERT, identity=earlier)
    assert mw.on_request(ctx) is None and ctx.identity is earlier


@pytest.mark.parametrize(
    "options, der, allowed",
    [
        pytest.param({"subjects": ["client-1"]}, CERT, True, id="subject listed"),
        pytest.param({"subjects": ["client-2"]}, CERT, False, id="subject not listed"),
        pytest.param({"subjects": ["CN=client-1"]}, CERT, False, id="subject is not the DN"),
        pytest.param({"subjects": ["client-*"]}, CERT, False, id="no patterns"),
        pytest.param({"san_dns": ["CLIENT.test"]}, CERT, True, id="DNS listed, any case"),
        pytest.param({"san_dns": ["other.test"]}, CERT, False, id="DNS not listed"),
        pytest.param(
            {"subjects": ["nobody"], "san_dns": ["client.test"]}, CERT, True, id="either list"
        ),
    ],
)
def test_allow_lists(options: dict[str, Any], der: bytes, allowed: bool) -> None:
    mw = middleware(**options)
    ctx = request(der)
    reply = mw.on_request(ctx)
    if allowed:
        assert reply is None and ctx.identity is not None
    else:
        status, body, _ = refusal(reply)
        assert status == 403 and b"certificate not allowed" in body
        assert ctx.identity is None
        assert mw.stats()["failures"] == {"certificate not allowed": 1}


def test_unreadable_certificate_is_refused() -> None:
    mw = middleware()
    status, body, _ = refusal(mw.on_request(request(b"\x30\x03not a certificate")))
    assert status == 401 and b"unreadable" in body


# ---- forwarding --------------------------------------------------------------------------------


def test_forward_headers_and_xfcc() -> None:
    mw = middleware(
        forward_client_cert=True,
        forward_headers={"X-User": "subject", "X-Fp": "claim:fingerprint_sha256"},
    )
    ctx = request(CERT)
    assert mw.on_request(ctx) is None
    fp = hashlib.sha256(CERT).hexdigest()
    assert ctx.conn.lines == [
        (
            f"X-User: client-1\r\nX-Fp: {fp}\r\n"
            f'X-Forwarded-Client-Cert: Hash={fp};Subject="CN=client-1";'
            f'URI="spiffe://example.org/svc";DNS="client.test"\r\n'
        ).encode()
    ]
    assert set(mw.strip_request_headers) == {b"x-user", b"x-fp", b"x-forwarded-client-cert"}


def test_client_xfcc_is_stripped_even_without_forwarding() -> None:
    assert middleware().strip_request_headers == (b"x-forwarded-client-cert",)


def test_xfcc_values_are_quoted_and_header_safe() -> None:
    der = make_cert(cn='ev"il\\, CN=root;x=y\r\nX-Injected: 1 ü', dns=("a.test",))
    line = xfcc_line(certificate_identity(x509.load_der_x509_certificate(der), der))
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1
    assert all(0x20 <= b < 0x7F for b in line[:-2])
    subject = line.split(b";Subject=", 1)[1].split(b";DNS=")[0]
    assert subject.startswith(b'"') and subject.endswith(b'"')
    assert b'\\"' in subject and b"\\\\" in subject  # the quote and backslash escaped
    assert b"%0D%0A" in subject and b"%C3%BC" in subject


# ---- the cache ---------------------------------------------------------------------------------


def test_certificate_parsed_once_and_cache_bounded() -> None:
    mw = middleware(cache_size=2, forward_client_cert=True)
    for _ in range(3):
        ctx = request(CERT)
        assert mw.on_request(ctx) is None
        assert len(ctx.conn.lines) == 1
    assert mw.stats()["parsed"] == 1
    others = [make_cert(serial=n) for n in (1, 2, 3)]
    for der in others:
        assert mw.on_request(request(der)) is None
    assert mw.stats()["cached"] == 2 and mw.stats()["parsed"] == 4
    refused = middleware(subjects=["nobody"])
    for _ in range(2):
        assert refusal(refused.on_request(request(CERT)))[0] == 403
    assert refused.stats()["parsed"] == 1  # the refusal is cached too


# ---- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path",
    [
        pytest.param({"subject": ["x"]}, "middlewares.clients.subject", id="unknown option"),
        pytest.param({"subjects": []}, "middlewares.clients.subjects", id="empty allow list"),
        pytest.param({"san_dns": ["ok", " "]}, "middlewares.clients.san_dns[1]", id="blank name"),
        pytest.param({"subjects": "x"}, "middlewares.clients.subjects", id="not a list"),
        pytest.param(
            {"forward_client_cert": "yes"},
            "middlewares.clients.forward_client_cert",
            id="not a boolean",
        ),
        pytest.param({"cache_size": -1}, "middlewares.clients.cache_size", id="negative cache"),
        pytest.param(
            {
                "forward_client_cert": True,
                "forward_headers": {"X-Forwarded-Client-Cert": "subject"},
            },
            "middlewares.clients.forward_headers",
            id="XFCC is ours",
        ),
        pytest.param(
            {"forward_headers": {"X-User": "nope"}},
            "middlewares.clients.forward_headers.X-User",
            id="common option checked",
        ),
    ],
)
def test_option_errors(options: dict[str, Any], path: str) -> None:
    from fastgate.config.compile import check_runtime
    from fastgate.config.schema import parse_config

    config = parse_config(
        {
            "entrypoints": {"web": {"address": "127.0.0.1:8080"}},
            "services": {"s": {"servers": [{"url": "http://127.0.0.1:9"}]}},
            "middlewares": {"clients": {"type": "mtls_auth", **options}},
            "routes": [{"service": "s", "middlewares": ["clients"]}],
        }
    )
    with pytest.raises(ConfigError) as info:
        check_runtime(config)
    assert path in [p for p, _ in info.value.errors], info.value.errors


def test_bind_warns_when_no_entrypoint_asks_for_certificates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastgate.config.compile import check_runtime
    from fastgate.config.schema import parse_config

    config = parse_config(
        {
            "entrypoints": {"web": {"address": "127.0.0.1:8080"}},
            "services": {"s": {"servers": [{"url": "http://127.0.0.1:9"}]}},
            "middlewares": {"clients": {"type": "mtls_auth"}},
            "routes": [{"name": "api", "service": "s", "middlewares": ["clients"]}],
        }
    )
    with caplog.at_level("WARNING", logger="fastgate.mtls_auth"):
        check_runtime(config)
    assert "route api: entrypoint web does not ask for client certificates" in caplog.text
