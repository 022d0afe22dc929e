"""The security posture of a configuration: `fastgate audit -c FILE` and the admin `/audit`.

The assessment an API owner makes before exposing APIs, done by the gateway itself: every
route with its authentication, authorization, rate limits, TLS on each hop (client -> gateway
-> service) and logging, then findings ranked by severity. `audit(config, raw)` is a pure
function: it reads nothing, starts nothing, compiles no middleware (so it runs on a CI machine
without the certificate files, stores or compiled core the config names).

Rules this file obeys:
- A secret never appears in a report: findings name key paths (`middlewares.jwt.secret`),
  never values. The views hold only what is not secret (types, names, addresses, file paths,
  rates); header values, passwords and keys are never copied into them.
- Whether a secret came from `${VAR}` can only be seen in the file as written, so the secrets
  rules read the raw (not interpolated) mapping `raw`; without it they are skipped and the
  report says `secrets_checked: false`. A string counts as "from the environment" when it
  holds at least one `${VAR}` reference; `${VAR:-default}` with a non-empty default still
  keeps a secret in the file (FG051).
- Finding ids are stable (docs/audit.md lists them) and the JSON layout is versioned
  (`format`): CI may parse both. Findings are ordered by severity, then id, then key path.
- Middleware options are read as the config gives them and judged tolerantly: an option the
  audit cannot read is shown as "invalid" and left to `fastgate check` to report.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastgate.config.schema import Config, Route, format_path, parse_address
from fastgate.errors import ConfigError
from fastgate.ratelimit.options import parse_options

FORMAT = "fastgate.audit/v1"
SEVERITIES = ("critical", "high", "medium", "low", "info")  # most severe first
RANK = {name: len(SEVERITIES) - i for i, name in enumerate(SEVERITIES)}  # critical=5 .. info=1

AUTH_TYPES = frozenset(
    {"jwt_auth", "api_key", "basic_auth", "ldap_auth", "forward_auth", "mtls_auth"}
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# A key whose name ends in one of these words holds a secret when its value is a string
# (header names are read with `-` as `_`: X-Api-Key, X-Auth-Token, Authorization).
_SECRET_KEY = re.compile(
    r"(?:^|_)(?:password|passwd|secret|token|api_?key|private_key|credentials?|authorization)$"
    r"|^cookie$"
)
# Mappings whose values name identity fields, not secrets (`X-Auth-Token: subject`).
_NOT_SECRET_SECTIONS = frozenset({"forward_headers"})
_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Finding:
    """One problem: a stable id, how bad, where (a key path), why it matters, how to fix."""

    id: str
    severity: str
    title: str
    where: str
    why: str
    fix: str


@dataclass
class Report:
    """What `audit` returns; `to_dict()` is the documented JSON (docs/audit.md)."""

    source: str
    secrets_checked: bool
    gateway: dict[str, Any]
    routes: list[dict[str, Any]]
    services: dict[str, dict[str, Any]]
    findings: list[Finding] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(SEVERITIES, 0)
        for f in self.findings:
            out[f.severity] += 1
        return out

    def highest(self) -> str | None:
        """The most severe finding's severity, None without findings."""
        return max((f.severity for f in self.findings), key=RANK.__getitem__, default=None)

    def fails(self, threshold: str) -> bool:
        """True when a finding is at `threshold` or above (`none` never fails)."""
        if threshold == "none":
            return False
        return any(RANK[f.severity] >= RANK[threshold] for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "secrets_checked": self.secrets_checked,
            "summary": {"findings": self.counts(), "highest": self.highest()},
            "gateway": self.gateway,
            "routes": self.routes,
            "services": self.services,
            "findings": [asdict(f) for f in self.findings],
        }


# --- small judgments -------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (a host name other than localhost is not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _flag(options: Mapping[str, Any], key: str) -> bool:
    return options.get(key) is True


# --- the views -------------------------------------------------------------------------------


def _client_hop(config: Config, name: str) -> dict[str, Any]:
    ep = config.entrypoints[name]
    host = ep.host
    view: dict[str, Any] = {
        "name": name,
        "address": ep.address,
        "loopback": is_loopback(host),
        "tls": ep.tls is not None,
    }
    if ep.tls is not None:
        view.update(min_version=ep.tls.version, ciphers=ep.tls.ciphers)
        view["client_auth"] = ep.tls.client_auth
    else:
        view["allow_plaintext"] = ep.allow_plaintext
    return view


def _service_view(config: Config, name: str) -> dict[str, Any]:
    svc = config.services[name]
    servers = [{"url": s.url, "tls": s.tls, "loopback": is_loopback(s.host)} for s in svc.servers]
    view: dict[str, Any] = {"servers": servers, "allow_plaintext": svc.allow_plaintext}
    if any(s.tls for s in svc.servers):
        tls = svc.tls
        view["tls"] = {
            "verify": not (tls is not None and tls.insecure_skip_verify),
            "ca": (tls.ca_file if tls is not None and tls.ca_file else "system roots"),
            "min_version": tls.min_version if tls is not None else "1.2",
            "mtls": tls is not None and tls.cert_file is not None,
        }
    return view


def _rate_view(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    try:
        opts = parse_options(dict(options))
    except (ConfigError, ValueError, TypeError):
        return {"name": name, "invalid": True}
    return {
        "name": name,
        "store": opts.store,
        "limits": [
            {
                "per_second": lim.per_second,
                "burst": lim.burst,
                "dry_run": lim.dry_run,
                "text": lim.words(),
            }
            for lim in opts.limits
        ],
        "in_flight": opts.in_flight,
    }


def _access_log(config: Config, route: Route) -> str:
    glob = config.access_log
    own = route.access_log
    if not glob.enabled or (own is not None and not own.enabled):
        return "off"
    sample = own.sample if own is not None and own.sample is not None else glob.sample
    return "on" if sample >= 1.0 else f"sampled {sample:g}"


@dataclass
class _Chain:
    """A route's middlewares sorted by what they do for its security."""

    auth: list[dict[str, Any]] = field(default_factory=list)
    authorize: list[dict[str, Any]] = field(default_factory=list)
    rate: list[dict[str, Any]] = field(default_factory=list)
    ip_filter: list[str] = field(default_factory=list)
    cors: list[dict[str, Any]] = field(default_factory=list)
    compress: list[str] = field(default_factory=list)
    redirects_always: bool = False
    client_cert_required: bool = False  # every entrypoint of the route: client_auth required

    def enforced(self) -> bool:
        """An anonymous request is refused: a client certificate demanded in the handshake,
        a required auth middleware, or an enforcing authorize."""
        return (
            self.client_cert_required
            or any(not a["optional"] for a in self.auth)
            or any(not z["allow_anonymous"] and not z["dry_run"] for z in self.authorize)
        )


def _chain(config: Config, route: Route, hops: list[dict[str, Any]]) -> _Chain:
    plain_only = bool(hops) and not any(h["tls"] for h in hops)
    out = _Chain(client_cert_required=bool(hops) and all(_cert_required(h) for h in hops))
    for name in route.middlewares:
        mw = config.middlewares.get(name)
        if mw is None:
            continue
        opts = mw.options
        if mw.type in AUTH_TYPES:
            out.auth.append({"name": name, "type": mw.type, "optional": _flag(opts, "optional")})
        elif mw.type == "authorize":
            out.authorize.append(
                {
                    "name": name,
                    "allow_anonymous": _flag(opts, "allow_anonymous"),
                    "dry_run": _flag(opts, "dry_run"),
                }
            )
        elif mw.type == "rate_limit":
            out.rate.append(_rate_view(name, opts))
        elif mw.type == "ip_filter":
            out.ip_filter.append(name)
        elif mw.type == "cors":
            origins = opts.get("allow_origins")
            wildcard = isinstance(origins, list) and "*" in origins
            out.cors.append(
                {
                    "name": name,
                    "any_origin": wildcard,
                    "credentials": _flag(opts, "allow_credentials"),
                }
            )
        elif mw.type == "compress":
            out.compress.append(name)
        elif (mw.type == "redirect" and opts.get("to")) or (
            mw.type == "redirect_https" and plain_only
        ):
            # Every request that gets this far is redirected: the service is never reached.
            out.redirects_always = True
    return out


def _cert_required(hop: Mapping[str, Any]) -> bool:
    return hop.get("client_auth") == "required"


def _route_entrypoints(config: Config, route: Route) -> list[str]:
    return list(route.entrypoints) or list(config.entrypoints)


# --- the rules -------------------------------------------------------------------------------


class _Findings:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str], Finding] = {}

    def add(self, id: str, severity: str, title: str, where: str, why: str, fix: str) -> None:
        self.items.setdefault((id, where), Finding(id, severity, title, where, why, fix))

    def sorted(self) -> list[Finding]:
        return sorted(self.items.values(), key=lambda f: (-RANK[f.severity], f.id, f.where))


def _route_rules(out: _Findings, config: Config, i: int, route: Route, chain: _Chain) -> None:
    at = f"routes[{i}]"
    if chain.redirects_always:
        return
    methods = set(route.match.methods)
    read_only = bool(methods) and methods <= SAFE_METHODS
    if not chain.auth and not chain.enforced():
        out.add(
            "FG001",
            "medium" if read_only else "high",
            f"route {route.name} has no authentication",
            at,
            "anyone who can reach the entrypoint reaches the service"
            + (" (read-only methods: data can still be read)" if read_only else ""),
            "add an auth middleware (jwt_auth, api_key, basic_auth, ldap_auth, forward_auth, "
            "mtls_auth) to the route's middlewares, or accept this for public content",
        )
    elif not chain.enforced():
        out.add(
            "FG003",
            "high",
            f"route {route.name}: authentication is optional",
            f"{at}.middlewares",
            "every auth middleware has optional: true and no authorize refuses anonymous "
            "requests, so a request without credentials reaches the service",
            "drop optional: true from one auth middleware, or add an authorize middleware "
            "(allow_anonymous: false)",
        )
    if not chain.rate:
        out.add(
            "FG002",
            "medium",
            f"route {route.name} has no rate limit",
            at,
            "one client can send as much as the service takes: floods, credential guessing, "
            "scraping",
            "add a rate_limit middleware (e.g. rate: 100/minute per client_ip)",
        )
    if chain.auth:
        for cors in chain.cors:
            if cors["any_origin"]:
                out.add(
                    "FG060",
                    "low",
                    f"route {route.name}: CORS allows any origin on an authenticated route",
                    f"middlewares.{cors['name']}.allow_origins",
                    "any web site may call this API from its visitors' browsers with the "
                    "tokens its scripts hold",
                    "list the origins of your own front ends instead of *",
                )
        for name in chain.compress:
            out.add(
                "FG061",
                "low",
                f"route {route.name}: compression on an authenticated route",
                f"{at}.middlewares",
                f"`{name}` compresses responses that may mix secrets with text an attacker "
                "can inject (BREACH)",
                "leave compress off routes that return secrets, or make sure responses "
                "never reflect request input next to a secret",
            )
    if _access_log(config, route) == "off" and config.access_log.enabled:
        out.add(
            "FG024",
            "info",
            f"route {route.name} is not access-logged",
            f"{at}.access_log",
            "its requests leave no trace but the audit stream's refusals",
            "remove access_log: false from the route, or sample it",
        )


def _entrypoint_rules(out: _Findings, config: Config, redirect_only: set[str]) -> None:
    for name, ep in config.entrypoints.items():
        at = f"entrypoints.{name}"
        if ep.tls is None and not is_loopback(ep.host) and name not in redirect_only:
            if ep.allow_plaintext:
                out.add(
                    "FG011",
                    "medium",
                    f"entrypoint {name} serves plain HTTP (allowed explicitly)",
                    f"{at}.allow_plaintext",
                    "requests and credentials cross the network unencrypted unless TLS is "
                    "terminated in front of the gateway",
                    "add tls to the entrypoint, or keep this only behind a TLS load balancer",
                )
            else:
                out.add(
                    "FG010",
                    "high",
                    f"entrypoint {name} serves plain HTTP on {ep.address}",
                    f"{at}.tls",
                    "tokens, passwords and data cross the network unencrypted and can be "
                    "read or changed on the way",
                    "add tls (certificates) to the entrypoint; put redirect_https on the plain one",
                )
        for net in ep.forwarded.trusted_ips:
            if ipaddress.ip_network(net).prefixlen == 0:
                out.add(
                    "FG014",
                    "medium",
                    f"entrypoint {name} trusts X-Forwarded-* from every address",
                    f"{at}.forwarded.trusted_ips",
                    "any client can pick the address that ip_filter, rate limits and logs see",
                    "list only the addresses of your own proxies or load balancers",
                )


def _service_rules(out: _Findings, config: Config) -> None:
    for name, svc in config.services.items():
        for i, server in enumerate(svc.servers):
            if not server.tls and not is_loopback(server.host):
                trust = (
                    "zero_trust is on but the service has allow_plaintext"
                    if config.zero_trust
                    else "zero_trust is off"
                )
                out.add(
                    "FG012",
                    "medium",
                    f"service {name} is reached over plain HTTP",
                    f"services.{name}.servers[{i}].url",
                    f"requests, forwarded identities and credentials cross the network "
                    f"unencrypted to {server.host} ({trust})",
                    "use https:// servers (with tls.ca_file for a private CA)",
                )
        if svc.tls is not None and svc.tls.insecure_skip_verify:
            out.add(
                "FG013",
                "high",
                f"service {name} does not verify its servers' certificates",
                f"services.{name}.tls.insecure_skip_verify",
                "anyone on the path can pose as the service: TLS without verification only "
                "stops passive listeners",
                "remove insecure_skip_verify; trust the service's CA with tls.ca_file",
            )


def _middleware_rules(out: _Findings, config: Config) -> None:
    for name, mw in config.middlewares.items():
        opts = mw.options
        at = f"middlewares.{name}"
        if mw.type == "jwt_auth":
            if opts.get("audience") in (None, "", []):
                out.add(
                    "FG030",
                    "high",
                    f"jwt_auth {name} does not check the audience",
                    f"{at}.audience",
                    "a token the issuer made for another service is accepted here",
                    "set audience to the name this API has at the issuer",
                )
            if opts.get("issuer") in (None, "", []):
                out.add(
                    "FG031",
                    "medium",
                    f"jwt_auth {name} does not check the issuer",
                    f"{at}.issuer",
                    "any issuer holding the key (or a key in the set) is accepted",
                    "set issuer to the issuer's URL",
                )
            if _flag(opts, "allow_insecure_jwks_http"):
                out.add(
                    "FG032",
                    "high",
                    f"jwt_auth {name} fetches its keys over plain HTTP",
                    f"{at}.allow_insecure_jwks_http",
                    "whoever can change the key set on the way can sign tokens that pass",
                    "use an https:// jwks_url (jwks_ca_file for a private CA)",
                )
        elif mw.type == "ldap_auth":
            url = opts.get("url")
            plain = (
                isinstance(url, str)
                and url.lower().startswith("ldap://")
                and not _flag(opts, "start_tls")
            )
            if plain and not is_loopback(_url_host(url)):
                out.add(
                    "FG033",
                    "high",
                    f"ldap_auth {name} sends passwords to the directory in clear text",
                    f"{at}.url",
                    "every user's password crosses the network unencrypted",
                    "use ldaps:// or start_tls: true",
                )
        elif mw.type == "forward_auth":
            address = opts.get("address")
            if (
                isinstance(address, str)
                and address.lower().startswith("http://")
                and not is_loopback(_url_host(address))
            ):
                out.add(
                    "FG034",
                    "medium",
                    f"forward_auth {name} sends credentials to its service in clear text",
                    f"{at}.address",
                    "the Authorization and Cookie headers cross the network unencrypted",
                    "use an https:// address",
                )
        _dry_run_rules(out, name, mw.type, opts)


def _dry_run_rules(out: _Findings, name: str, kind: str, opts: Mapping[str, Any]) -> None:
    at = f"middlewares.{name}"
    wheres: list[str] = []
    if _flag(opts, "dry_run"):
        wheres.append(f"{at}.dry_run")
    limits = opts.get("limits")
    if isinstance(limits, list):
        wheres += [
            f"{at}.limits[{i}].dry_run"
            for i, lim in enumerate(limits)
            if isinstance(lim, Mapping) and _flag(lim, "dry_run")
        ]
    for where in wheres:
        out.add(
            "FG040",
            "high",
            f"{kind} {name} is in dry run",
            where,
            "it decides and logs but never refuses: the policy is not enforced",
            "set dry_run: false once the logs show the policy is right",
        )


def _gateway_rules(out: _Findings, config: Config) -> None:
    admin = config.admin
    if admin.enabled and not is_loopback(parse_address(admin.address)[0]):
        # The admin listener has no authentication of its own (no token option exists).
        token = getattr(admin, "token", None)
        out.add(
            "FG020",
            "high" if token else "critical",
            "the admin listener is off loopback",
            "admin.address",
            "metrics, status and the audit are served to the network"
            + ("" if token else " without any authentication"),
            "bind the admin listener to 127.0.0.1 (or a private interface behind a firewall)",
        )
    if config.demo_origin.enabled:
        out.add(
            "FG023",
            "info",
            "the built-in demo origin is on",
            "demo_origin.enabled",
            "a hello-world server runs beside the gateway: a sign of a config not yet made "
            "for production",
            "set demo_origin.enabled: false once services point at your own servers",
        )
    if not config.access_log.enabled:
        out.add(
            "FG021",
            "low",
            "the access log is off",
            "access_log.enabled",
            "there is no record of who called what, for incidents or abuse",
            "set access_log.enabled: true (sample it if volume is a concern)",
        )
    if not config.audit_log.enabled:
        out.add(
            "FG022",
            "medium",
            "the audit log is off",
            "audit_log.enabled",
            "refused logins, forbidden requests and rate-limit refusals leave no trace",
            "set audit_log.enabled: true",
        )
    if not config.zero_trust:
        out.add(
            "FG070",
            "info",
            "zero_trust is off",
            "zero_trust",
            "plain HTTP entrypoints and services and unverified upstream TLS are allowed "
            "without an explicit exception",
            "set zero_trust: true (allow_plaintext marks the deliberate exceptions)",
        )


# --- secrets in the file ---------------------------------------------------------------------


def _walk(value: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _walk(v, (*loc, str(k)))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _walk(v, (*loc, i))
    else:
        yield loc, value


def _is_secret_key(loc: tuple[Any, ...]) -> bool:
    if _NOT_SECRET_SECTIONS.intersection(p for p in loc if isinstance(p, str)):
        return False
    last = next((p for p in reversed(loc) if isinstance(p, str)), "")
    return bool(_SECRET_KEY.search(last.lower().replace("-", "_")))


def _url_password(text: str) -> bool:
    """A URL with a password in its user info (scheme://user:password@host)."""
    if "://" not in text or "@" not in text:
        return False
    try:
        return bool(urlsplit(text).password)
    except ValueError:
        return False


def secret_rules(raw: Mapping[str, Any]) -> list[Finding]:
    """Secrets written literally in the file (FG050), or as a `${VAR:-default}` default
    (FG051). Only key paths are reported."""
    out = _Findings()
    for loc, value in _walk(raw):
        if not isinstance(value, str) or not value.strip():
            continue
        secret_key = _is_secret_key(loc)
        if not secret_key and not _url_password(value):
            continue
        where = format_path(loc)
        refs = [m for m in _REFERENCE.finditer(value) if m.group(0) != "$${"]
        if not refs:
            out.add(
                "FG050",
                "high",
                "a secret is written in the configuration file",
                where,
                "whoever reads the file, its backups or its repository has the secret",
                "write ${VAR} and pass the secret in the environment (a secret store)",
            )
        elif any(m.group(2) for m in refs):
            out.add(
                "FG051",
                "medium",
                "a secret has a default value in the configuration file",
                where,
                "the ${VAR:-default} fallback keeps a usable secret in the file",
                "write ${VAR} without a default, so a missing variable is an error",
            )
    return out.sorted()


# --- the report ------------------------------------------------------------------------------


def audit(config: Config, raw: Mapping[str, Any] | None = None, source: str = "") -> Report:
    """The posture of `config`. `raw` is the file's mapping before `${VAR}` interpolation
    (fastgate.config.loader.read_config_file), needed for the secrets rules; None skips them.
    """
    out = _Findings()
    routes: list[dict[str, Any]] = []
    served: dict[str, list[bool]] = {name: [] for name in config.entrypoints}
    for i, route in enumerate(config.routes):
        entrypoints = _route_entrypoints(config, route)
        hops = [_client_hop(config, name) for name in entrypoints if name in config.entrypoints]
        chain = _chain(config, route, hops)
        for name in entrypoints:
            served.setdefault(name, []).append(chain.redirects_always)
        match = route.match
        routes.append(
            {
                "name": route.name,
                "match": {
                    "hosts": list(match.hosts),
                    "path": match.path,
                    "path_type": match.path_type,
                    "methods": list(match.methods),
                },
                "entrypoints": hops,
                "service": route.service,
                "authentication": chain.auth,
                "authentication_enforced": chain.enforced(),
                "authorization": chain.authorize,
                "rate_limits": chain.rate,
                "ip_filter": chain.ip_filter,
                "cors": chain.cors,
                "compression": bool(chain.compress),
                "redirect_only": chain.redirects_always,
                "access_log": _access_log(config, route),
            }
        )
        _route_rules(out, config, i, route, chain)
    redirect_only = {name for name, flags in served.items() if flags and all(flags)}
    _entrypoint_rules(out, config, redirect_only)
    _service_rules(out, config)
    _middleware_rules(out, config)
    _gateway_rules(out, config)
    findings = out.sorted()
    if raw is not None:
        findings = sorted(
            [*findings, *secret_rules(raw)], key=lambda f: (-RANK[f.severity], f.id, f.where)
        )
    gateway = {
        "zero_trust": config.zero_trust,
        "admin": {
            "enabled": config.admin.enabled,
            "address": config.admin.address,
            "loopback": is_loopback(parse_address(config.admin.address)[0]),
        },
        "access_log": {"enabled": config.access_log.enabled, "sample": config.access_log.sample},
        "audit_log": {"enabled": config.audit_log.enabled, "path": config.audit_log.path},
        "demo_origin": config.demo_origin.enabled,
    }
    services = {name: _service_view(config, name) for name in config.services}
    return Report(source, raw is not None, gateway, routes, services, findings)


# --- text for people -------------------------------------------------------------------------


def _hop_words(hop: Mapping[str, Any]) -> str:
    if hop["tls"]:
        words = f"TLS {hop['min_version']}+"
        if hop["client_auth"] != "none":
            words += f", client certificate {hop['client_auth']}"
    else:
        words = "plain HTTP" + (" (loopback)" if hop["loopback"] else "")
    return f"{hop['name']} {hop['address']} {words}"


def _service_words(view: Mapping[str, Any]) -> str:
    servers = ", ".join(s["url"] for s in view["servers"])
    tls = view.get("tls")
    if tls is None:
        return f"{servers} (plain HTTP)"
    verify = "verified" if tls["verify"] else "NOT VERIFIED"
    mtls = ", client certificate" if tls["mtls"] else ""
    return f"{servers} (TLS {tls['min_version']}+, {verify} against {tls['ca']}{mtls})"


def format_text(report: Report) -> list[str]:
    """The report as lines for people: findings first, then each route."""
    counts = report.counts()
    lines = [
        f"fastgate audit: {report.source}",
        "findings: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
    ]
    if not report.secrets_checked:
        lines.append("secrets: not checked (no file text to read)")
    for f in report.findings:
        lines += [
            "",
            f"{f.severity.upper()} {f.id} {f.title}",
            f"  where: {f.where}",
            f"  why:   {f.why}",
            f"  fix:   {f.fix}",
        ]
    lines += ["", "routes:" if report.routes else "routes: none"]
    for r in report.routes:
        m = r["match"]
        hosts = ",".join(m["hosts"]) or "*"
        methods = ",".join(m["methods"]) or "ANY"
        lines.append(f"  {r['name']}: {hosts} {m['path']} ({m['path_type']}) {methods}")
        for hop in r["entrypoints"]:
            lines.append(f"    client -> gateway: {_hop_words(hop)}")
        view = report.services.get(r["service"])
        if view is not None:
            lines.append(f"    gateway -> {r['service']}: {_service_words(view)}")
        auth = ", ".join(
            f"{a['name']} ({a['type']}{', optional' if a['optional'] else ''})"
            for a in r["authentication"]
        )
        lines.append(f"    authentication: {auth or 'none'}")
        authz = ", ".join(
            z["name"] + (" (dry run)" if z["dry_run"] else "") for z in r["authorization"]
        )
        lines.append(f"    authorization: {authz or 'none'}")
        rates = []
        for rate in r["rate_limits"]:
            if rate.get("invalid"):
                rates.append(f"{rate['name']} (invalid options)")
                continue
            said = "; ".join(lim["text"] for lim in rate["limits"]) or "no limits"
            rates.append(f"{rate['name']} ({rate['store']}: {said})")
        lines.append(f"    rate limits: {', '.join(rates) or 'none'}")
        lines.append(
            f"    ip filter: {', '.join(r['ip_filter']) or 'none'}; "
            f"cors: {_cors_words(r['cors'])}; compression: {'on' if r['compression'] else 'off'}"
        )
        lines.append(f"    access log: {r['access_log']}")
    g = report.gateway
    admin = g["admin"]
    lines += [
        "",
        "admin: " + (admin["address"] if admin["enabled"] else "disabled"),
        f"access log: {'on' if g['access_log']['enabled'] else 'off'}; "
        f"audit log: {'on' if g['audit_log']['enabled'] else 'off'}; "
        f"zero_trust: {'on' if g['zero_trust'] else 'off'}",
    ]
    return lines


def _cors_words(items: Iterable[Mapping[str, Any]]) -> str:
    words = []
    for c in items:
        detail = "any origin" if c["any_origin"] else "listed origins"
        if c["credentials"]:
            detail += ", credentials"
        words.append(f"{c['name']} ({detail})")
    return ", ".join(words) or "none"
