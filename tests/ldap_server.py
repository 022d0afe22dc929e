"""A real OpenLDAP `slapd` for the ldap_auth tests, and the fixtures that start it.

Import into a test module with `tests/` on sys.path (`from ldap_server import ldap_server`).
Each server gets its own directory under the test's tmp path: a cn=config made with
`slapadd -n0` from an LDIF (back_mdb module, suffix dc=example,dc=org, rootdn cn=admin), an
mdb database seeded offline with `slapadd -n1` ({SSHA} password hashes made here), a trustme CA
and a server certificate for 127.0.0.1 only (so `localhost` is a hostname mismatch), and a log.
slapd runs in the foreground (`-d stats`, its log on stderr to a file) as the current user,
listening on `ldap://127.0.0.1:PORT/` (StartTLS offered) and `ldaps://127.0.0.1:PORT2/`.
`start()` waits until the admin can bind (10 s, the log tail on failure); `stop()`, `pause()`
(SIGSTOP: connections open, nothing answers) and `resume()` drive failure tests; every process
is stopped at teardown.

The directory allows unauthenticated binds (`olcAllows: bind_anon_dn`, a DN with an empty
password succeeds as anonymous, as on many servers): that is what makes the empty-password
tests meaningful, the middleware must refuse before any bind.

Without slapd/slapadd the fixtures skip the test, except under CI (CI=true), where a missing
server is a failure: CI must install it (Debian/Ubuntu: apt-get install slapd ldap-utils).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "admin-Secret-9"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PASSWORD = "reader-Secret-7"
# uid -> password. bob's has a colon and non-ASCII text (Basic splits at the first colon, the
# password is UTF-8); the third user's uid needs escaping both in a DN and in a filter.
SPECIAL_USER = "o,brien*(x)"
USERS = {
    "alice": "alice-Secret-1",
    "bob": "b0b:pässwörd",
    SPECIAL_USER: "special-Secret-3",
}
# group cn -> member uids
GROUP_MEMBERS = {"ops": ("alice",), "dev": ("alice", "bob"), "qa": (SPECIAL_USER,)}

_MODULE_DIRS = (
    "/usr/lib/ldap",
    "/usr/lib/openldap",
    "/usr/lib64/openldap",
    "/usr/libexec/openldap",
)
_SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema")


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/local/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
        None,
    )


def require_slapd() -> tuple[str, str]:
    """(slapd, slapadd) paths; pytest.skip (or pytest.fail under CI=true) when missing."""
    slapd, slapadd = _find("slapd"), _find("slapadd")
    schema = next((d for d in _SCHEMA_DIRS if Path(d, "core.ldif").is_file()), None)
    if slapd is None or slapadd is None or schema is None:
        message = (
            "slapd/slapadd (and the core schema LDIF) were not found: the ldap_auth tests need "
            "a real OpenLDAP server (Debian/Ubuntu: apt-get install slapd ldap-utils)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return slapd, slapadd


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssha(password: str) -> str:
    """An OpenLDAP {SSHA} userPassword value (salted SHA-1: test data only)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def user_dn(uid: str) -> str:
    from ldap3.utils.dn import escape_rdn

    return f"uid={escape_rdn(uid)},{PEOPLE}"


class LdapServer:
    """One slapd process with its config, data, certificates and log in `directory`."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.slapd, self.slapadd = require_slapd()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ldaps_port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}"
        self.base_dn = SUFFIX
        self.people_dn = PEOPLE
        self.groups_dn = GROUPS
        self.admin_dn = ADMIN_DN
        self.admin_password = ADMIN_PASSWORD
        self.reader_dn = READER_DN
        self.reader_password = READER_PASSWORD
        self.users = dict(USERS)
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert = self.ca.issue_cert("127.0.0.1")
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(self.cert_file))
        cert.private_key_pem.write_to_path(str(self.key_file))
        self.log = directory / "slapd.log"
        self.proc: subprocess.Popen | None = None
        self._configure()

    def __repr__(self) -> str:
        return f"<LdapServer {self.url} {self.ldaps_url}>"

    # ---- setup -------------------------------------------------------------------------------

    def _configure(self) -> None:
        confdir = self.directory / "slapd.d"
        dbdir = self.directory / "db"
        confdir.mkdir()
        dbdir.mkdir()
        (self.directory / "config.ldif").write_text(self._config_ldif(dbdir))
        (self.directory / "data.ldif").write_text(_data_ldif())
        self._slapadd("-n0", "config.ldif")
        self._slapadd("-n1", "data.ldif")

    def _slapadd(self, database: str, ldif: str) -> None:
        result = subprocess.run(
            [self.slapadd, database, "-F", str(self.directory / "slapd.d"), "-l", ldif],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"slapadd {database} {ldif} failed:\n{result.stdout}{result.stderr}")

    def _config_ldif(self, dbdir: Path) -> str:
        modules = next((d for d in _MODULE_DIRS if Path(d, "back_mdb.so").exists()), None)
        schema = next(d for d in _SCHEMA_DIRS if Path(d, "core.ldif").is_file())
        module_entry = (
            f"dn: cn=module{{0}},cn=config\nobjectClass: olcModuleList\ncn: module{{0}}\n"
            f"olcModulePath: {modules}\nolcModuleLoad: back_mdb\n\n"
            if modules
            else ""  # back_mdb built into slapd
        )
        return (
            "dn: cn=config\n"
            "objectClass: olcGlobal\n"
            "cn: config\n"
            f"olcPidFile: {self.directory / 'slapd.pid'}\n"
            "olcAllows: bind_anon_dn\n"
            f"olcTLSCACertificateFile: {self.ca_file}\n"
            f"olcTLSCertificateFile: {self.cert_file}\n"
            f"olcTLSCertificateKeyFile: {self.key_file}\n"
            "\n"
            f"{module_entry}"
            "dn: cn=schema,cn=config\nobjectClass: olcSchemaConfig\ncn: schema\n\n"
            f"include: file://{schema}/core.ldif\n\n"
            f"include: file://{schema}/cosine.ldif\n\n"
            f"include: file://{schema}/inetorgperson.ldif\n\n"
            "dn: olcDatabase={-1}frontend,cn=config\n"
            "objectClass: olcDatabaseConfig\n"
            "objectClass: olcFrontendConfig\n"
            "olcDatabase: {-1}frontend\n"
            "\n"
            "dn: olcDatabase={0}config,cn=config\n"
            "objectClass: olcDatabaseConfig\n"
            "olcDatabase: {0}config\n"
            "olcAccess: {0}to * by * none\n"
            "\n"
            "dn: olcDatabase={1}mdb,cn=config\n"
            "objectClass: olcDatabaseConfig\n"
            "objectClass: olcMdbConfig\n"
            "olcDatabase: {1}mdb\n"
            f"olcSuffix: {SUFFIX}\n"
            f"olcRootDN: {ADMIN_DN}\n"
            f"olcRootPW: {ssha(ADMIN_PASSWORD)}\n"
            f"olcDbDirectory: {dbdir}\n"
            "olcDbMaxSize: 16777216\n"
            "olcAccess: {0}to attrs=userPassword by self write by anonymous auth by * none\n"
            "olcAccess: {1}to * by users read by * none\n"
        )

    # ---- process -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> LdapServer:
        """Start slapd (again, on the same ports) and wait until the admin can bind."""
        urls = f"{self.url}/ {self.ldaps_url}/"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.slapd, "-d", "stats", "-h", urls, "-F", str(self.directory / "slapd.d")],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"{self} exited with {self.proc.returncode}:\n{self.log_tail()}")
                if self._answers():
                    return self
                if time.monotonic() > deadline:
                    pytest.fail(f"{self} not answering after {START_TIMEOUT} s:\n{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()  # never leave a half-started slapd behind
            raise

    def _answers(self) -> bool:
        """The admin binds on ldap:// and the ldaps:// port accepts connections."""
        import ldap3

        try:
            with socket.create_connection(("127.0.0.1", self.ldaps_port), timeout=1.0):
                pass
            conn = self.admin_connection(timeout=1)
        except (OSError, ldap3.core.exceptions.LDAPException):
            return False
        ok = conn.bound
        conn.unbind()
        return ok

    def admin_connection(self, timeout: int = 5):  # -> ldap3.Connection
        """A plain ldap:// connection bound as the rootdn, for tests that change the data."""
        import ldap3

        server = ldap3.Server(self.url, connect_timeout=timeout, get_info=ldap3.NONE)
        return ldap3.Connection(
            server,
            self.admin_dn,
            self.admin_password,
            auto_bind=ldap3.AUTO_BIND_NO_TLS,
            receive_timeout=timeout,  # whole seconds: ldap3 packs it into SO_RCVTIMEO
        )

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, slapd answers nothing."""
        if self.running:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if not self.running:
            return
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


def _data_ldif() -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups",
        (
            f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: reader\nuserPassword: {ssha(READER_PASSWORD)}"
        ),
    ]
    for uid, password in USERS.items():
        entries.append(
            f"dn:: {_b64(user_dn(uid))}\nobjectClass: inetOrgPerson\nuid:: {_b64(uid)}\n"
            f"cn:: {_b64(uid)}\nsn: test\nuserPassword: {ssha(password)}"
        )
    for cn, members in GROUP_MEMBERS.items():
        lines = [f"dn: cn={cn},{GROUPS}", "objectClass: groupOfNames", f"cn: {cn}"]
        lines += [f"member:: {_b64(user_dn(uid))}" for uid in members]
        entries.append("\n".join(lines))
    return "\n\n".join(entries) + "\n"


def _b64(text: str) -> str:
    """LDIF `attr:: base64` form: safe for any value (commas, UTF-8, leading spaces)."""
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def ldap_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LdapServer]:
    """One seeded slapd shared by a test module; tests must not change its data or stop it
    (use `own_ldap_server` for that)."""
    require_slapd()
    server = LdapServer(tmp_path_factory.mktemp("slapd"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_ldap_server(tmp_path: Path) -> Iterator[LdapServer]:
    """A seeded slapd for one test, which may stop, pause or change it."""
    require_slapd()
    server = LdapServer(tmp_path / "slapd")
    try:
        yield server.start()
    finally:
        server.stop()
