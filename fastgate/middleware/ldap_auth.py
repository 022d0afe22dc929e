"""`type: ldap_auth`: HTTP Basic credentials (RFC 7617) checked by binding to an LDAP
directory, setting `ctx.identity` (method "ldap", the user's groups, their DN as claim `dn`).

    middlewares:
      staff:
        type: ldap_auth
        url: ldaps://ldap.example.org            # or ldap://... with start_tls: true
        ca_file: /etc/fastgate/ldap-ca.pem       # default: the system roots
        # direct bind: the user's DN from a template
        user_dn_template: "uid={user},ou=people,dc=example,dc=org"
        # ... or search then bind, with a service account:
        # bind_dn: cn=reader,dc=example,dc=org
        # bind_password: ${LDAP_READER_PASSWORD}
        # base_dn: ou=people,dc=example,dc=org
        # user_filter: "(&(objectClass=inetOrgPerson)(uid={user}))"
        group_base_dn: ou=groups,dc=example,dc=org
        group_filter: "(&(objectClass=groupOfNames)(member={dn}))"   # cn values -> groups
        timeout: 5                               # whole seconds per LDAP operation
        cache_ttl: 30                            # seconds a verified user:password is kept
        realm: fastgate
        forward_headers: {X-User: subject, X-Groups: groups}

Security rules this file obeys (the LDAP conversation itself: fastgate.auth.ldap_directory):
- User names are escaped before they reach LDAP: `escape_rdn` in the DN template,
  `escape_filter_chars` in filters, so `*`, `)(uid=*`, `\\`, `,` or NUL cannot change what is
  asked; a name with control characters never reaches the directory.
- An empty password is refused before any bind: an empty-password simple bind is an
  "unauthenticated bind" that many servers accept as anonymous (RFC 4513 §5.1.2).
- Passwords never leave over plain text unless the config says so loudly: `ldap://` needs
  `start_tls: true`, or `allow_plaintext_bind: true` (a local test directory); `ldaps://` and
  StartTLS verify the certificate chain (`ca_file` or the system roots) and the host name.
- ldap3 runs only on the worker's bounded auth pool (`shared_pool()`), never on the event
  loop; a full pool answers 503 `Retry-After: 1`.
- Fail closed: a directory that is down, slow (past `timeout`), refuses TLS or the service
  account answers 503 "directory unavailable", audited with that reason; it never lets a
  request through. The first failure logs a warning with the cause, the recovery an info line.
- Wrong password, unknown user and ambiguous user all answer the same 401 "invalid
  credentials" with the Basic challenge. Replies, logs and audit records never hold the
  password; the audit record has no user name either (people type passwords there).
- Verified pairs are kept `cache_ttl` seconds by an HMAC under a per-process key
  (SuccessCache); failures and unavailability are never cached. A cached identity outlives a
  password change or a group change in the directory by at most `cache_ttl`.
- One fresh LDAP connection per check (see ldap_directory), unbound at its end.

The subject is the user name as the client typed it (LDAP matching is usually
case-insensitive: `ALICE` may bind as alice); the entry's DN, as the directory spells it in
search mode, is the `dn` claim.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.dn import parse_dn
from pydantic import ConfigDict, Field, field_validator

from fastgate.auth import ldap_directory as directory_mod
from fastgate.auth.basic_credentials import (
    BlockingPool,
    SuccessCache,
    basic_or_verdict,
    shared_pool,
)
from fastgate.auth.common import AuthCommon, AuthOptions, parse_options
from fastgate.auth.ldap_directory import (
    DirectorySettings,
    DirectoryUnavailable,
    DirectoryUser,
    LdapDirectory,
)
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import register
from fastgate.tls.client import verifying_context

log = logging.getLogger("fastgate.ldap_auth")

# RFC 9110 §5.6.4 qdtext without HTAB and obs-text: no `"` or `\`, so no escaping is needed.
_REALM = re.compile(r"[ !#-\[\]-~]{1,128}")
DEFAULT_GROUP_FILTER = "(&(objectClass=groupOfNames)(member={dn}))"
# A check is connect, StartTLS, two binds and two searches at most, each bounded by `timeout`
# inside ldap3; this is the loop's own bound on the whole, should one of those not hold.
_OPERATIONS = 6


class LdapAuthOptions(AuthOptions):
    """`ldap_auth` options (plus the common forward_headers / hide_credentials / optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    url: str
    start_tls: bool = False
    allow_plaintext_bind: bool = False
    ca_file: str | None = None
    user_dn_template: str | None = None
    bind_dn: str | None = None
    bind_password: Any = Field(None, repr=False)
    base_dn: str | None = None
    user_filter: str | None = None
    group_base_dn: str | None = None
    group_filter: str | None = None
    timeout: int = Field(5, ge=1, le=300)
    cache_ttl: float = Field(30, ge=0, le=3600)
    realm: str = "fastgate"

    @field_validator("bind_password", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        # Checked here, not by a `str` type: pydantic's type errors quote the input value.
        if value is not None and not isinstance(value, str):
            raise ValueError("expected text, e.g. ${LDAP_BIND_PASSWORD}")
        return value


def settings_from(opts: LdapAuthOptions) -> DirectorySettings:
    """The checks pydantic's field types do not express; ConfigError paths are relative to
    the middleware."""
    host, port, use_ssl = _url(opts.url)
    if use_ssl and opts.start_tls:
        raise ConfigError("start_tls", "ldaps:// is TLS already; start_tls is for ldap://")
    tls = use_ssl or opts.start_tls
    if not tls and not opts.allow_plaintext_bind:
        raise ConfigError(
            "url",
            "ldap:// without start_tls sends passwords in clear text: use ldaps://, "
            "start_tls: true, or allow_plaintext_bind: true (a local test directory only)",
        )
    if opts.ca_file is not None and not tls:
        raise ConfigError("ca_file", "only used with ldaps:// or start_tls: true")
    if not _REALM.fullmatch(opts.realm):
        raise ConfigError(
            "realm", "1 to 128 printable ASCII characters, without a double quote or backslash"
        )
    common = {
        "host": host,
        "port": port,
        "use_ssl": use_ssl,
        "start_tls": opts.start_tls,
        "tls_context": _tls_context(opts.ca_file) if tls else None,
        "timeout": opts.timeout,
        **_groups(opts),
    }
    search = ("bind_dn", "bind_password", "base_dn", "user_filter")
    if opts.user_dn_template is not None:
        for option in search:
            if getattr(opts, option) is not None:
                raise ConfigError(option, "only with user_filter (search then bind)")
        _template(opts.user_dn_template, "user_dn_template", {"user"}, frozenset({"user"}))
        _dn(directory_mod.user_dn(opts.user_dn_template, "x"), "user_dn_template")
        return DirectorySettings(**common, user_dn_template=opts.user_dn_template)
    if opts.user_filter is None:
        raise ConfigError(
            "user_dn_template",
            "give user_dn_template (direct bind) or user_filter with bind_dn, bind_password "
            "and base_dn (search then bind)",
        )
    for option in search:
        value = getattr(opts, option)
        if value is None or not value.strip():
            why = "an empty password binds anonymously" if option == "bind_password" else ""
            raise ConfigError(option, f"required with user_filter{': ' if why else ''}{why}")
    _template(opts.user_filter, "user_filter", {"user"}, frozenset({"user"}))
    _filter(directory_mod.user_filter(opts.user_filter, "x"), "user_filter")
    _dn(opts.bind_dn, "bind_dn")
    _dn(opts.base_dn, "base_dn")
    return DirectorySettings(
        **common,
        bind_dn=opts.bind_dn,
        bind_password=opts.bind_password,
        base_dn=opts.base_dn,
        user_filter=opts.user_filter,
    )


def _url(url: str) -> tuple[str, int, bool]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError("url", "not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise ConfigError("url", "expected ldap://host[:port] or ldaps://host[:port]")
    if not parts.hostname or parts.username or parts.password:
        raise ConfigError("url", "expected a host name and no user information")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("url", "a server URL only: the DNs and filters are separate options")
    use_ssl = scheme == "ldaps"
    return parts.hostname, port or (636 if use_ssl else 389), use_ssl


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate chain and host name checked, TLS 1.2 or later."""
    return verifying_context(ca_file, "ca_file")


def _groups(opts: LdapAuthOptions) -> dict[str, Any]:
    if opts.group_base_dn is None:
        if opts.group_filter is not None:
            raise ConfigError("group_filter", "needs group_base_dn")
        return {}
    _dn(opts.group_base_dn, "group_base_dn")
    flt = opts.group_filter or DEFAULT_GROUP_FILTER
    _template(flt, "group_filter", {"dn", "user"})
    _filter(directory_mod.group_filter(flt, "cn=x", "x"), "group_filter")
    return {"group_base_dn": opts.group_base_dn, "group_filter": flt}


def _template(
    text: str, option: str, allowed: set[str], required: frozenset[str] = frozenset()
) -> None:
    found = directory_mod.placeholders(text)
    unknown = found - allowed
    if unknown:
        raise ConfigError(option, f"unknown placeholder {{{sorted(unknown)[0]}}}")
    if not found or not required <= found:
        names = " or ".join(f"{{{n}}}" for n in sorted(required or allowed))
        raise ConfigError(option, f"must contain {names}")


def _dn(value: str | None, option: str) -> None:
    try:
        if not value or not parse_dn(value):
            raise ValueError
    except (LDAPException, ValueError):
        raise ConfigError(option, "not a valid DN (RFC 4514)") from None


def _filter(value: str, option: str) -> None:
    try:
        parse_filter(
            value, None, auto_escape=False, auto_encode=False, validator=None, check_names=False
        )
    except (LDAPException, ValueError, IndexError):
        raise ConfigError(option, "not a valid LDAP filter (RFC 4515)") from None


@register
class LdapAuth:
    """One `ldap_auth` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "ldap_auth"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        self.options = opts = parse_options(LdapAuthOptions, options)
        self.directory = LdapDirectory(settings_from(opts))
        self.name = name
        self.common = AuthCommon(options, name, self.type, credential_headers=("authorization",))
        self.strip_request_headers = self.common.strip_request_headers
        self.cache = SuccessCache(opts.cache_ttl)
        self.pool: BlockingPool = shared_pool()
        self.deadline = float(opts.timeout * _OPERATIONS + 1)
        challenge = f'Basic realm="{opts.realm}", charset="UTF-8"'
        self._missing = LocalReply.error(401, "authentication required", WWW_Authenticate=challenge)
        self._malformed = LocalReply.error(401, "malformed credentials", WWW_Authenticate=challenge)
        self._invalid = LocalReply.error(401, "invalid credentials", WWW_Authenticate=challenge)
        self._busy = LocalReply.error(503, "authentication busy", Retry_After="1")
        self._unavailable = LocalReply.error(503, "directory unavailable", Retry_After="5")
        self.checks = 0  # directory checks started (cache misses)
        self.busy = 0  # checks refused because the pool's queue was full
        self.unavailable = 0  # checks that ended in "directory unavailable"
        self._down = False  # the last check could not reach the directory

    # ---- per request --------------------------------------------------------------------------

    def on_request(self, ctx: RequestContext) -> LocalReply | Any | None:
        common = self.common
        credentials = basic_or_verdict(ctx, common, self._missing, self._malformed)
        if type(credentials) is not tuple:
            return credentials
        user, password = credentials
        if not password:  # never bind with it: RFC 4513 §5.1.2 unauthenticated bind
            return common.refuse(ctx, "empty password", self._invalid)
        if not directory_mod.acceptable_user(user):
            return common.refuse(ctx, "invalid credentials", self._invalid)
        digest = self.cache.digest(user, password)
        identity = self.cache.get(digest)
        if identity is not None:
            common.admit(ctx, identity)
            return None
        future = self.pool.submit(self.directory.authenticate, user, password)
        if future is None:
            self.busy += 1
            return common.refuse(ctx, "auth busy", self._busy)
        self.checks += 1
        return self._finish(ctx, future, user, digest)

    async def _finish(
        self,
        ctx: RequestContext,
        future: asyncio.Future[DirectoryUser | None],
        user: str,
        digest: bytes,
    ) -> LocalReply | None:
        try:
            # shield: on our timeout the thread still runs; the pool counts it until it ends.
            found = await asyncio.wait_for(asyncio.shield(future), self.deadline)
        except DirectoryUnavailable as exc:
            return self._directory_down(ctx, str(exc))
        except TimeoutError:
            return self._directory_down(ctx, f"no answer within {self.deadline:g} s")
        except Exception as exc:  # an ldap3 surprise, or the pool shut down: fail closed
            return self._directory_down(ctx, f"check failed: {type(exc).__name__}")
        if self._down:
            self._down = False
            log.info("ldap_auth %s: directory answering again", self.name)
        if found is None:
            return self.common.refuse(ctx, "invalid credentials", self._invalid)
        identity = Identity(
            method="ldap", subject=user, groups=found.groups, claims=(("dn", found.dn),)
        )
        self.cache.put(digest, identity)
        self.common.admit(ctx, identity)
        return None

    def _directory_down(self, ctx: RequestContext, cause: str) -> LocalReply:
        self.unavailable += 1
        if not self._down:
            self._down = True
            log.warning("ldap_auth %s: directory unavailable: %s", self.name, cause)
        else:
            log.debug("ldap_auth %s: directory unavailable: %s", self.name, cause)
        return self.common.refuse(ctx, "directory unavailable", self._unavailable)

    # ---- operations ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: `binds` are user binds sent to the directory (cache hits send none)."""
        counters = self.directory.stats()
        return {
            "cached": len(self.cache),
            "checks": self.checks,
            "binds": counters["user_binds"],
            "service_binds": counters["service_binds"],
            "searches": counters["searches"],
            "busy": self.busy,
            "unavailable": self.unavailable,
            "failures": dict(self.common.failures),
        }


__all__ = ["LdapAuth", "LdapAuthOptions", "settings_from"]
