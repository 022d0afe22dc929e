"""`fastgate audit` and fastgate/audit.py: each rule on a config that triggers it and one that
does not, the text and JSON output, exit codes, secrets never printed, the embedded default
audited, and the admin `/audit` endpoint on a real loopback listener."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pathlib
import socket
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from fastgate.audit import FORMAT, SEVERITIES, audit, format_text, secret_rules
from fastgate.cli import main
from fastgate.config.loader import build_config
from fastgate.server.admin import audit_document, start_admin

JWT_SECRET = "env-jwt-secret-" + "s" * 40  # comes from ${JWT_SECRET}: never printed either
LITERALS = {
    "jwt": "literal-jwt-secret-" + "q" * 40,
    "redis": "literal-redis-password-7f3a",
    "otlp": "Bearer literal-otlp-token-91c2",
    "header": "literal-upstream-key-5d8e",
    "ldap": "literal-ldap-bind-password-2b6c",
    "url": "literal-url-password-4e1f",
}
ENV = {"JWT_SECRET": JWT_SECRET}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FASTGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("JWT_SECRET", JWT_SECRET)


def clean() -> dict[str, Any]:
    """A config with no finding at all: every rule below changes one thing in it."""
    return {
        "zero_trust": True,
        "entrypoints": {
            "web": {
                "address": "0.0.0.0:8443",
                "tls": {
                    "certificates": [{"cert_file": "/etc/fg/cert.pem", "key_file": "/etc/fg/k.pem"}]
                },
            }
        },
        "services": {
            "api": {
                "servers": [{"url": "https://10.0.0.5:8443"}],
                "tls": {"ca_file": "/etc/fg/ca.pem"},
            }
        },
        "middlewares": {
            "jwt": {
                "type": "jwt_auth",
                "algorithms": ["HS256"],
                "secret": "${JWT_SECRET}",
                "audience": "api",
                "issuer": "https://id.example.com",
            },
            "limit": {"type": "rate_limit", "rate": "100/minute"},
        },
        "routes": [
            {
                "name": "api",
                "match": {"path": "/api"},
                "middlewares": ["jwt", "limit"],
                "service": "api",
            }
        ],
        "access_log": {"enabled": True},
        "admin": {"address": "127.0.0.1:9901"},
    }


def findings(raw: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(id, where) -> severity of every finding for the raw mapping `raw`."""
    report = audit(build_config(raw, env=ENV), raw, "test")
    return {(f.id, f.where): f.severity for f in report.findings}


def edit(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    raw = clean()
    change(raw)
    return raw


def test_the_clean_config_has_no_finding() -> None:
    assert findings(clean()) == {}


def _route(raw: dict[str, Any], **changes: Any) -> None:
    raw["routes"][0].update(changes)


def _mw(name: str, **options: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["middlewares"][name].update(options)

    return change


def _add_mw(name: str, spec: dict[str, Any], first: bool = False) -> Callable[..., None]:
    def change(raw: dict[str, Any]) -> None:
        raw["middlewares"][name] = spec
        mws = raw["routes"][0]["middlewares"]
        mws.insert(0, name) if first else mws.append(name)

    return change


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return change


def _both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        for c in changes:
            c(raw)

    return change


PLAIN_WEB = _both(
    _set("entrypoints.web", {"address": "0.0.0.0:8080", "allow_plaintext": True}),
)
HTTP_API = _both(
    _set("services.api", {"servers": [{"url": "http://10.0.0.5:8000"}], "allow_plaintext": True})
)
NO_ZT = _set("zero_trust", False)

# (change, the finding it must give as (id, where, severity), a finding it must not give)
RULES = [
    pytest.param(
        lambda r: _route(r, middlewares=["limit"]),
        ("FG001", "routes[0]", "high"),
        id="FG001 route without auth: high",
    ),
    pytest.param(
        lambda r: _route(r, middlewares=["limit"], match={"methods": ["GET", "HEAD"]}),
        ("FG001", "routes[0]", "medium"),
        id="FG001 read-only route without auth: medium",
    ),
    pytest.param(
        lambda r: _route(r, middlewares=["jwt"]),
        ("FG002", "routes[0]", "medium"),
        id="FG002 route without rate limit",
    ),
    pytest.param(
        _mw("jwt", optional=True),
        ("FG003", "routes[0].middlewares", "high"),
        id="FG003 every auth middleware optional",
    ),
    pytest.param(
        _both(NO_ZT, _set("entrypoints.web", {"address": "0.0.0.0:8080"})),
        ("FG010", "entrypoints.web.tls", "high"),
        id="FG010 plain entrypoint off loopback",
    ),
    pytest.param(
        PLAIN_WEB,
        ("FG011", "entrypoints.web.allow_plaintext", "medium"),
        id="FG011 plain entrypoint allowed explicitly",
    ),
    pytest.param(
        HTTP_API,
        ("FG012", "services.api.servers[0].url", "medium"),
        id="FG012 plain upstream off loopback",
    ),
    pytest.param(
        _both(NO_ZT, _set("services.api.tls.insecure_skip_verify", True)),
        ("FG013", "services.api.tls.insecure_skip_verify", "high"),
        id="FG013 upstream TLS without verification",
    ),
    pytest.param(
        _set("entrypoints.web.forwarded", {"trusted_ips": ["0.0.0.0/0"]}),
        ("FG014", "entrypoints.web.forwarded.trusted_ips", "medium"),
        id="FG014 forwarded headers trusted from everyone",
    ),
    pytest.param(
        _both(NO_ZT, _set("admin.address", "0.0.0.0:9901")),
        ("FG020", "admin.address", "critical"),
        id="FG020 admin listener off loopback",
    ),
    pytest.param(
        _set("access_log.enabled", False),
        ("FG021", "access_log.enabled", "low"),
        id="FG021 access log off",
    ),
    pytest.param(
        _set("audit_log.enabled", False),
        ("FG022", "audit_log.enabled", "medium"),
        id="FG022 audit log off",
    ),
    pytest.param(
        _set("demo_origin.enabled", True),
        ("FG023", "demo_origin.enabled", "info"),
        id="FG023 demo origin on",
    ),
    pytest.param(
        lambda r: _route(r, access_log=False),
        ("FG024", "routes[0].access_log", "info"),
        id="FG024 route not access-logged",
    ),
    pytest.param(
        lambda r: r["middlewares"]["jwt"].pop("audience"),
        ("FG030", "middlewares.jwt.audience", "high"),
        id="FG030 jwt without audience",
    ),
    pytest.param(
        lambda r: r["middlewares"]["jwt"].pop("issuer"),
        ("FG031", "middlewares.jwt.issuer", "medium"),
        id="FG031 jwt without issuer",
    ),
    pytest.param(
        _set(
            "middlewares.jwt",
            {
                "type": "jwt_auth",
                "algorithms": ["RS256"],
                "jwks_url": "http://id.example.com/jwks",
                "allow_insecure_jwks_http": True,
                "audience": "api",
                "issuer": "https://id.example.com",
            },
        ),
        ("FG032", "middlewares.jwt.allow_insecure_jwks_http", "high"),
        id="FG032 jwks over plain http",
    ),
    pytest.param(
        _add_mw(
            "dir",
            {
                "type": "ldap_auth",
                "url": "ldap://ldap.example.org",
                "allow_plaintext_bind": True,
                "user_dn_template": "uid={user},dc=example,dc=org",
            },
        ),
        ("FG033", "middlewares.dir.url", "high"),
        id="FG033 ldap bind in clear text",
    ),
    pytest.param(
        _add_mw(
            "fa",
            {"type": "forward_auth", "address": "http://auth.internal/v", "allow_plaintext": True},
        ),
        ("FG034", "middlewares.fa.address", "medium"),
        id="FG034 forward_auth in clear text",
    ),
    pytest.param(
        _add_mw("authz", {"type": "authorize", "require": {"scopes": ["a"]}, "dry_run": True}),
        ("FG040", "middlewares.authz.dry_run", "high"),
        id="FG040 authorize dry_run",
    ),
    pytest.param(
        _set(
            "middlewares.limit",
            {"type": "rate_limit", "limits": [{"rate": "1/s"}, {"rate": "9/s", "dry_run": True}]},
        ),
        ("FG040", "middlewares.limit.limits[1].dry_run", "high"),
        id="FG040 rate_limit dry_run in limits",
    ),
    pytest.param(
        _mw("limit", dry_run=True),
        ("FG040", "middlewares.limit.dry_run", "high"),
        id="FG040 rate_limit dry_run inline",
    ),
    pytest.param(
        _mw("jwt", secret=LITERALS["jwt"]),
        ("FG050", "middlewares.jwt.secret", "high"),
        id="FG050 literal secret",
    ),
    pytest.param(
        _mw("jwt", secret="${JWT_SECRET:-" + LITERALS["jwt"] + "}"),
        ("FG051", "middlewares.jwt.secret", "medium"),
        id="FG051 secret with a default in the file",
    ),
    pytest.param(
        _add_mw("cors", {"type": "cors", "allow_origins": ["*"]}),
        ("FG060", "middlewares.cors.allow_origins", "low"),
        id="FG060 cors any origin on an authenticated route",
    ),
    pytest.param(
        _add_mw("gz", {"type": "compress"}),
        ("FG061", "routes[0].middlewares", "low"),
        id="FG061 compression on an authenticated route",
    ),
    pytest.param(
        NO_ZT,
        ("FG070", "zero_trust", "info"),
        id="FG070 zero_trust off",
    ),
]


@pytest.mark.parametrize(("change", "expected"), RULES)
def test_rule_fires(change: Callable[[dict[str, Any]], None], expected: tuple[str, ...]) -> None:
    rule, where, severity = expected
    got = findings(edit(change))
    assert got.get((rule, where)) == severity, got


# Near misses: (change, the rule that must stay quiet)
QUIET = [
    pytest.param(
        _both(NO_ZT, _set("entrypoints.web", {"address": "127.0.0.1:8080"})),
        "FG010",
        id="plain entrypoint on loopback",
    ),
    pytest.param(
        _both(NO_ZT, _set("services.api", {"servers": [{"url": "http://127.0.0.1:8000"}]})),
        "FG012",
        id="plain upstream on loopback",
    ),
    pytest.param(
        _both(
            _mw("jwt", optional=True),
            _add_mw("authz", {"type": "authorize", "require": {"scopes": ["a"]}}),
        ),
        "FG003",
        id="optional auth with an enforcing authorize",
    ),
    pytest.param(
        lambda r: (
            _route(r, middlewares=["moved"])
            or r["middlewares"].update(moved={"type": "redirect", "to": "/new"})
        ),
        "FG001",
        id="a redirect-only route needs no auth",
    ),
    pytest.param(
        _both(
            NO_ZT,
            _set("entrypoints.web", {"address": "0.0.0.0:8080"}),
            lambda r: _route(r, middlewares=["https"]),
            _set("middlewares.https", {"type": "redirect_https"}),
        ),
        "FG010",
        id="a plain entrypoint that only redirects to https",
    ),
    pytest.param(
        _add_mw("cors", {"type": "cors", "allow_origins": ["https://app.example.com"]}),
        "FG060",
        id="cors with listed origins",
    ),
    pytest.param(
        _mw("jwt", secret="$${literal}" + "x" * 40),
        "FG051",
        id="an escaped $${ is no reference",
    ),
    pytest.param(
        _mw("limit", key="client_ip"),
        "FG050",
        id="rate_limit key is not a secret",
    ),
    pytest.param(
        _mw("jwt", forward_headers={"X-Auth-Token": "subject"}),
        "FG050",
        id="forward_headers name identity fields, not secrets",
    ),
    pytest.param(
        _add_mw("hdr", {"type": "headers", "response": {"set": {"Set-Cookie": "seen=1"}}}),
        "FG050",
        id="a response Set-Cookie is not a secret",
    ),
    pytest.param(
        _both(
            lambda r: _route(r, middlewares=["limit"]),
            lambda r: r["entrypoints"]["web"]["tls"].update(
                client_auth="required", client_ca_file="/etc/fg/clients.pem"
            ),
        ),
        "FG001",
        id="a client certificate required in the handshake is authentication",
    ),
]


@pytest.mark.parametrize(("change", "rule"), QUIET)
def test_rule_stays_quiet(change: Callable[[dict[str, Any]], None], rule: str) -> None:
    got = findings(edit(change))
    assert not [k for k in got if k[0] == rule], got


def test_escaped_reference_is_a_literal_secret() -> None:
    raw = edit(_mw("jwt", secret="$${literal}" + "x" * 40))
    assert findings(raw).get(("FG050", "middlewares.jwt.secret")) == "high"


# --- secrets anywhere in the file, never printed ----------------------------------------------


def leaky() -> dict[str, Any]:
    raw = clean()
    raw["zero_trust"] = False
    raw["middlewares"]["jwt"]["secret"] = LITERALS["jwt"]
    raw["middlewares"]["hdr"] = {
        "type": "headers",
        "request": {"set": {"X-Api-Key": LITERALS["header"], "X-Tenant": "acme"}},
    }
    raw["routes"][0]["middlewares"].append("hdr")
    raw["providers"] = {
        "redis": {"main": {"address": "10.0.0.9:6379", "password": LITERALS["redis"]}}
    }
    raw["tracing"] = {
        "otlp": {
            "endpoint": "https://otel.example.com/v1/traces",
            "headers": {"Authorization": LITERALS["otlp"]},
        }
    }
    raw["middlewares"]["dir"] = {
        "type": "ldap_auth",
        "url": f"ldaps://reader:{LITERALS['url']}@ldap.example.org",
        "bind_dn": "cn=reader,dc=example,dc=org",
        "bind_password": LITERALS["ldap"],
        "base_dn": "dc=example,dc=org",
    }
    return raw


LEAKY_WHERES = {
    "middlewares.jwt.secret",
    "middlewares.hdr.request.set.X-Api-Key",
    "providers.redis.main.password",
    "tracing.otlp.headers.Authorization",
    "middlewares.dir.bind_password",
    "middlewares.dir.url",
}


def test_secret_rules_name_every_literal_secret_by_key_path() -> None:
    got = {f.where for f in secret_rules(leaky()) if f.id == "FG050"}
    assert got == LEAKY_WHERES


def write(tmp_path: pathlib.Path, raw: dict[str, Any], name: str = "gw.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("fmt", [pytest.param("text", id="text"), pytest.param("json", id="json")])
def test_secret_values_are_never_printed(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    assert main(["audit", "-c", write(tmp_path, leaky()), "--format", fmt]) == 0
    out, err = capsys.readouterr()
    for secret in [*LITERALS.values(), JWT_SECRET]:
        assert secret not in out and secret not in err
        for part in secret.split():
            assert len(part) < 12 or part not in out
    for where in LEAKY_WHERES:
        assert where in out


# --- output and exit codes ---------------------------------------------------------------------


def test_json_layout(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = edit(lambda r: _route(r, middlewares=["limit"]))
    assert main(["audit", "-c", write(tmp_path, raw), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == FORMAT
    assert doc["secrets_checked"] is True
    assert doc["summary"] == {
        "findings": {"critical": 0, "high": 1, "medium": 0, "low": 0, "info": 0},
        "highest": "high",
    }
    (route,) = doc["routes"]
    assert route["name"] == "api"
    assert route["match"] == {"hosts": [], "path": "/api", "path_type": "prefix", "methods": []}
    assert route["entrypoints"] == [
        {
            "name": "web",
            "address": "0.0.0.0:8443",
            "loopback": False,
            "tls": True,
            "min_version": "1.2",
            "ciphers": "intermediate",
            "client_auth": "none",
        }
    ]
    assert route["authentication"] == [] and route["authentication_enforced"] is False
    assert route["rate_limits"][0]["store"] == "local"
    assert route["rate_limits"][0]["limits"][0]["burst"] == 100
    assert route["access_log"] == "on"
    assert doc["services"]["api"]["tls"] == {
        "verify": True,
        "ca": "/etc/fg/ca.pem",
        "min_version": "1.2",
        "mtls": False,
    }
    (finding,) = doc["findings"]
    assert set(finding) == {"id", "severity", "title", "where", "why", "fix"}
    assert finding["id"] == "FG001"


def test_text_lists_findings_by_severity_then_routes(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = edit(_set("audit_log.enabled", False))
    raw["middlewares"]["jwt"] = {"type": "api_key", "store": "/var/lib/fastgate/c.db"}
    raw["routes"][0]["access_log"] = {"sample": 0.25}
    assert main(["audit", "-c", write(tmp_path, raw)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"fastgate audit: {tmp_path / 'gw.yaml'}"
    assert lines[1] == "findings: 0 critical, 0 high, 1 medium, 0 low, 0 info"
    assert "MEDIUM FG022 the audit log is off" in lines
    assert "  where: audit_log.enabled" in lines
    assert "    client -> gateway: web 0.0.0.0:8443 TLS 1.2+" in lines
    assert (
        "    gateway -> api: https://10.0.0.5:8443 (TLS 1.2+, verified against /etc/fg/ca.pem)"
        in lines
    )
    assert "    authentication: jwt (api_key)" in lines
    assert any(
        line.startswith("    rate limits: limit (local: 100 requests per minute") for line in lines
    )
    assert "    access log: sampled 0.25" in lines


@pytest.mark.parametrize(
    ("fail_on", "code"),
    [
        pytest.param(None, 0, id="default never fails"),
        pytest.param("none", 0, id="none"),
        pytest.param("critical", 0, id="critical above the worst finding"),
        pytest.param("high", 1, id="high: the worst finding"),
        pytest.param("medium", 1, id="medium below it"),
        pytest.param("info", 1, id="info"),
    ],
)
def test_fail_on(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], fail_on: str | None, code: int
) -> None:
    raw = edit(lambda r: _route(r, middlewares=["limit"]))  # one high finding only
    argv = ["audit", "-c", write(tmp_path, raw)]
    assert main(argv + (["--fail-on", fail_on] if fail_on else [])) == code
    assert "HIGH FG001" in capsys.readouterr().out


def test_clean_config_passes_every_threshold(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, clean())
    for severity in SEVERITIES:
        assert main(["audit", "-c", path, "--fail-on", severity]) == 0


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        pytest.param(["-c", "{missing}"], 2, "cannot read", id="missing file"),
        pytest.param(["-c", "{bad}"], 2, "routes[0].service", id="invalid config"),
        pytest.param(["--fail-on", "severe"], 2, "invalid choice", id="unknown severity"),
        pytest.param(["--format", "xml"], 2, "invalid choice", id="unknown format"),
    ],
)
def test_errors_exit_2(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    bad = clean()
    bad["routes"][0]["service"] = "nope"
    names = {"missing": str(tmp_path / "none.yaml"), "bad": write(tmp_path, bad)}
    assert main(["audit", *(a.format(**names) for a in argv)]) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    assert "Traceback" not in err


def test_toml_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[entrypoints.web]\naddress = "127.0.0.1:8080"\n'
        '[services.api]\nservers = [{url = "http://127.0.0.1:9000"}]\n'
        '[[routes]]\nname = "r"\nservice = "api"\n'
        f'[providers.redis.main]\naddress = "127.0.0.1:6379"\npassword = "{LITERALS["redis"]}"\n'
    )
    assert main(["audit", "-c", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    wheres = {(f["id"], f["where"]) for f in doc["findings"]}
    assert ("FG050", "providers.redis.main.password") in wheres
    assert LITERALS["redis"] not in json.dumps(doc)


def test_embedded_default_is_audited_honestly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--format", "json", "--fail-on", "critical"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "embedded default"
    got = {(f["id"], f["where"], f["severity"]) for f in doc["findings"]}
    assert got == {
        ("FG001", "routes[0]", "high"),  # the demo route has no authentication
        ("FG002", "routes[0]", "medium"),
        ("FG023", "demo_origin.enabled", "info"),
        ("FG070", "zero_trust", "info"),
    }
    assert main(["audit", "--fail-on", "high"]) == 1


def test_report_without_raw_skips_secrets() -> None:
    raw = edit(_mw("jwt", secret=LITERALS["jwt"]))
    report = audit(build_config(raw, env=ENV), None, "x")
    assert report.secrets_checked is False
    assert not [f for f in report.findings if f.id.startswith("FG05")]
    assert "secrets: not checked (no file text to read)" in format_text(report)


# --- the admin /audit -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Owner:
    """What the admin listener reads from its supervisor: `config`, `config_path`, `status`."""

    def __init__(self, raw: dict[str, Any], path: str | None) -> None:
        self.config = build_config(raw, env=ENV)
        self.config_path = path

    def status(self) -> dict[str, Any]:
        return {"ready": True}

    def audit(self) -> dict[str, Any]:
        """As Supervisor.audit: the running config's document."""
        return audit_document(self.config, self.config_path)


async def _ask(owner: Owner, request: bytes) -> tuple[int, bytes]:
    port = free_port()
    server = await start_admin(f"127.0.0.1:{port}", owner.status, None, owner.audit)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize(
    ("method", "code"),
    [
        pytest.param("GET", 200, id="GET"),
        pytest.param("HEAD", 200, id="HEAD"),
        pytest.param("POST", 405, id="POST"),
    ],
)
def test_admin_audit(tmp_path: pathlib.Path, method: str, code: int) -> None:
    raw = edit(_mw("jwt", secret=LITERALS["jwt"]))
    owner = Owner(raw, write(tmp_path, raw))
    request = f"{method} /audit HTTP/1.1\r\nHost: admin\r\n\r\n".encode()
    status, body = asyncio.run(_ask(owner, request))
    assert status == code
    if method == "GET":
        doc = json.loads(body)
        assert doc["format"] == FORMAT and doc["source"] == owner.config_path
        assert ("FG050", "middlewares.jwt.secret") in {
            (f["id"], f["where"]) for f in doc["findings"]
        }
        assert LITERALS["jwt"].encode() not in body
    elif method == "HEAD":
        assert body == b""


def test_admin_audit_follows_the_running_config(tmp_path: pathlib.Path) -> None:
    owner = Owner(clean(), None)  # no file: embedded default or `fastgate proxy`
    audit_fn = owner.audit
    first = audit_fn()
    assert first["findings"] == [] and first["secrets_checked"] is False
    changed = copy.deepcopy(clean())
    changed["audit_log"] = {"enabled": False}
    owner.config = build_config(changed, env=ENV)  # what a reload does
    assert [f["id"] for f in audit_fn()["findings"]] == ["FG022"]


def test_admin_without_an_audit_answers_404() -> None:
    async def ask() -> int:
        port = free_port()
        server = await start_admin(f"127.0.0.1:{port}", lambda: {"ready": True})
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /audit HTTP/1.1\r\nHost: admin\r\n\r\n")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        return int(raw.split(b" ")[1])

    assert asyncio.run(ask()) == 404
