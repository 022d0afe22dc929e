"""The blocking half of `ldap_auth`: one ldap3 conversation per credential check.

    check (search mode):  open [+ StartTLS] -> bind service account -> search the user
                          -> search their groups -> bind as the user -> unbind
    check (direct mode):  open [+ StartTLS] -> bind as the user (DN from the template)
                          -> search their groups (as the user) -> unbind

Rules this file obeys:
- Everything here blocks on the network: callers run `LdapDirectory.authenticate` on the
  shared auth pool (`fastgate.auth.basic_credentials.shared_pool`), never on the event loop.
  Each operation is bounded by `timeout` seconds (connect timeout, socket receive timeout,
  server-side search time limit).
- User input reaches LDAP only escaped: `escape_rdn` in a DN template, `escape_filter_chars`
  in filters (RFC 4514 / RFC 4515). Templates are filled in one pass by a regular expression,
  never by `str.format`, so a value cannot inject a placeholder. A user name with control
  characters is refused before any LDAP traffic.
- An empty password never reaches a bind: an empty-password simple bind is an
  "unauthenticated bind" that many servers accept as anonymous (RFC 4513 §5.1.2).
- A search that finds several entries for one user name is a refusal, never "take the first".
- Referrals are never followed (`auto_referrals=False`): following one would send the
  credentials to whatever server the referral names. Connections are read-only.
- TLS uses a stdlib `ssl.SSLContext` built once from the config: certificate chain and host
  name verified by OpenSSL, TLS 1.2 or later. ldap3's own host-name matching (on
  `ssl.match_hostname`, removed in Python 3.12) is not used.
- A fresh connection per check, unbound before returning: nothing is shared between threads
  and no connection stays bound as a user. One check costs a TCP (and TLS) handshake; the
  success cache in front of it makes that rare.
- Outcomes: a `DirectoryUser` (right password), None (wrong password, unknown or ambiguous
  user), or `DirectoryUnavailable` raised (the directory cannot be reached or answered
  something unexpected, the service account was refused): the caller fails closed.
- Passwords are never logged nor put in an exception message.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPInvalidDnError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

log = logging.getLogger(__name__)

MAX_USER_CHARS = 256
MAX_GROUPS = 1000
# Bind result codes that mean "these credentials do not work" (RFC 4511 §4.1.9): a missing
# entry, a wrong password, a locked or disabled account. Anything else is a directory fault.
_REFUSED = frozenset({32, 34, 48, 49, 50, 53})
_NOT_FOUND = 32  # noSuchObject: a search base that does not exist (or is hidden from us)
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DirectoryUnavailable(Exception):
    """The check could not be completed; the message names the cause, never a credential."""


@dataclass(frozen=True, slots=True)
class DirectoryUser:
    """A user whose password the directory accepted."""

    dn: str
    groups: frozenset[str]


@dataclass(frozen=True)
class DirectorySettings:
    """Validated connection and lookup settings (see fastgate.middleware.ldap_auth)."""

    host: str
    port: int
    use_ssl: bool = False
    start_tls: bool = False
    tls_context: ssl.SSLContext | None = None
    timeout: int = 5
    user_dn_template: str | None = None  # direct mode
    bind_dn: str | None = None  # search mode: the service account
    bind_password: str | None = field(default=None, repr=False)
    base_dn: str | None = None
    user_filter: str | None = None
    group_base_dn: str | None = None
    group_filter: str = "(&(objectClass=groupOfNames)(member={dn}))"


def fill(template: str, **values: str) -> str:
    """`template` with each `{name}` replaced by values[name] (already escaped), in one pass."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def user_dn(template: str, user: str) -> str:
    """The DN for `user` from a template like `uid={user},ou=people,dc=example,dc=org`."""
    return fill(template, user=escape_rdn(user))


def user_filter(template: str, user: str) -> str:
    """The search filter for `user` from a template like `(uid={user})`."""
    return fill(template, user=escape_filter_chars(user))


def group_filter(template: str, dn: str, user: str) -> str:
    """The group search filter from a template naming `{dn}` and/or `{user}`."""
    return fill(template, dn=escape_filter_chars(dn), user=escape_filter_chars(user))


def acceptable_user(user: str) -> bool:
    """A name worth asking the directory about: non-empty, bounded, no control characters."""
    return 0 < len(user) <= MAX_USER_CHARS and not _CONTROL.search(user)


class _ContextTls(ldap3.Tls):
    """ldap3's TLS hook, wrapping sockets with our verified SSLContext (see the docstring)."""

    def __init__(self, context: ssl.SSLContext, host: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = context
        self._host = host

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket, server_hostname=self._host, do_handshake_on_connect=do_handshake
        )


class LdapDirectory:
    """Checks credentials against one directory; thread-safe (nothing shared but counters)."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self._tls = (
            _ContextTls(settings.tls_context, settings.host)
            if settings.tls_context is not None
            else None
        )
        self._lock = threading.Lock()
        self.counters = {"user_binds": 0, "service_binds": 0, "searches": 0}

    def authenticate(self, user: str, password: str) -> DirectoryUser | None:
        """Check `user`/`password`; None when refused. Blocking: run it on the auth pool."""
        if not password or not acceptable_user(user):
            return None
        conn = self._connect()
        try:
            if self.settings.user_dn_template is not None:
                return self._direct(conn, user, password)
            return self._search_then_bind(conn, user, password)
        except LDAPInvalidDnError:
            return None  # a DN the server returned or we built is unusable: no such user
        except (LDAPException, OSError) as exc:
            raise DirectoryUnavailable(_describe(exc)) from None
        finally:
            try:
                conn.unbind()
            except (LDAPException, OSError):
                pass

    # ---- the two modes -----------------------------------------------------------------------

    def _direct(self, conn: ldap3.Connection, user: str, password: str) -> DirectoryUser | None:
        s = self.settings
        assert s.user_dn_template is not None
        dn = user_dn(s.user_dn_template, user)
        if not self._bind(conn, dn, password, "user_binds"):
            return None
        return DirectoryUser(dn, self._groups(conn, dn, user))

    def _search_then_bind(
        self, conn: ldap3.Connection, user: str, password: str
    ) -> DirectoryUser | None:
        s = self.settings
        assert s.bind_dn and s.bind_password and s.base_dn and s.user_filter
        if not self._bind(conn, s.bind_dn, s.bind_password, "service_binds"):
            raise DirectoryUnavailable("the service account (bind_dn) was refused")
        dn = self._find_user(conn, user)
        if dn is None:
            # The same one bind an existing user costs, so the time to answer does not tell
            # an unknown user from a wrong password.
            self._bind(conn, s.bind_dn, s.bind_password, "service_binds")
            return None
        groups = self._groups(conn, dn, user)  # read as the service account, before the
        if not self._bind(conn, dn, password, "user_binds"):  # connection becomes the user's
            return None
        return DirectoryUser(dn, groups)

    # ---- operations --------------------------------------------------------------------------

    def _connect(self) -> ldap3.Connection:
        s = self.settings
        server = ldap3.Server(
            s.host,
            port=s.port,
            use_ssl=s.use_ssl,
            tls=self._tls,
            connect_timeout=s.timeout,
            get_info=ldap3.NONE,
        )
        conn = ldap3.Connection(
            server,
            authentication=ldap3.ANONYMOUS,
            auto_bind=ldap3.AUTO_BIND_NONE,
            auto_referrals=False,
            read_only=True,
            raise_exceptions=False,
            receive_timeout=s.timeout,  # whole seconds: ldap3 packs it into SO_RCVTIMEO
            return_empty_attributes=False,
        )
        try:
            conn.open(read_server_info=False)
            if s.start_tls and not conn.start_tls(read_server_info=False):
                raise DirectoryUnavailable("StartTLS was refused")
        except (LDAPException, OSError) as exc:
            raise DirectoryUnavailable(_describe(exc)) from None
        return conn

    def _bind(self, conn: ldap3.Connection, dn: str, password: str, counter: str) -> bool:
        """True when the bind succeeded, False when the credentials were refused."""
        self._count(counter)
        if conn.rebind(user=dn, password=password, read_server_info=False):
            return True
        code = (conn.result or {}).get("result")
        if code in _REFUSED:
            return False
        raise DirectoryUnavailable(f"bind answered {_result(conn)}")

    def _search(
        self, conn: ldap3.Connection, base: str, flt: str, attributes: Any, size_limit: int
    ) -> list[dict[str, Any]]:
        self._count("searches")
        conn.search(
            base,
            flt,
            search_scope=ldap3.SUBTREE,
            attributes=attributes,
            size_limit=size_limit,
            time_limit=self.settings.timeout,
        )
        code = (conn.result or {}).get("result")
        if code == _NOT_FOUND:
            log.warning("ldap search base %r does not exist (or is not visible)", base)
            return []
        if code not in (0, 4):  # success, sizeLimitExceeded (the entries up to the limit)
            raise DirectoryUnavailable(f"search answered {_result(conn)}")
        return [r for r in conn.response or () if r.get("type") == "searchResEntry"]

    def _find_user(self, conn: ldap3.Connection, user: str) -> str | None:
        s = self.settings
        assert s.base_dn and s.user_filter
        entries = self._search(
            conn, s.base_dn, user_filter(s.user_filter, user), [ldap3.NO_ATTRIBUTES], 2
        )
        if len(entries) > 1:
            log.warning("ldap user_filter matched several entries for one name: refused")
        if len(entries) != 1:
            return None
        return str(entries[0]["dn"])

    def _groups(self, conn: ldap3.Connection, dn: str, user: str) -> frozenset[str]:
        s = self.settings
        if s.group_base_dn is None:
            return frozenset()
        flt = group_filter(s.group_filter, dn, user)
        entries = self._search(conn, s.group_base_dn, flt, ["cn"], MAX_GROUPS)
        names: set[str] = set()
        for entry in entries:
            values = (entry.get("attributes") or {}).get("cn") or ()
            names.update(str(v) for v in (values if isinstance(values, list) else [values]))
        return frozenset(names)

    def _count(self, counter: str) -> None:
        with self._lock:
            self.counters[counter] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)


def _result(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    return f"{result.get('result')} {result.get('description', '')}".strip()


def _describe(exc: BaseException) -> str:
    """A short cause for logs: the exception's kind and text (ldap3 and OSError messages name
    addresses and protocol errors, never the credentials of the bind)."""
    if isinstance(exc, DirectoryUnavailable):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = [
    "MAX_USER_CHARS",
    "DirectorySettings",
    "DirectoryUnavailable",
    "DirectoryUser",
    "LdapDirectory",
    "acceptable_user",
    "fill",
    "group_filter",
    "placeholders",
    "user_dn",
    "user_filter",
]
