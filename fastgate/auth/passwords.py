"""Password hashes: argon2id for what fastgate stores, bcrypt and argon2 read from htpasswd.

Rules this file obeys:
- Only slow, salted hashes are accepted: argon2 (`$argon2id$`, `$argon2i$`, `$argon2d$`) and
  bcrypt (`$2y$`, `$2b$`, `$2a$`). htpasswd's MD5 (`$apr1$`), SHA-1 (`{SHA}`), crypt(3) and
  plain text entries are refused when the file is loaded, naming the line, never accepted.
- Verification is constant-time inside the libraries; an unknown user is checked against a
  dummy hash of the same cost (`verify_or_dummy`) so timing does not tell users apart.
- Every function here is blocking (tens of milliseconds by design): callers run it off the
  event loop (fastgate.auth.basic_credentials.BlockingPool).
"""

from __future__ import annotations

from pathlib import Path

import argon2
import bcrypt

from fastgate.errors import ConfigError

_ARGON2 = argon2.PasswordHasher()  # argon2id, the library's current (RFC 9106) defaults
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")
_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
_DUMMY_HASH = _ARGON2.hash("fastgate-dummy-password")


def hash_password(password: str) -> str:
    """An argon2id hash of `password` (PHC string with its own random salt)."""
    return _ARGON2.hash(password)


def is_supported(hashed: str) -> bool:
    return hashed.startswith(_ARGON2_PREFIXES + _BCRYPT_PREFIXES)


def verify_password(hashed: str, password: str) -> bool:
    """True when `password` matches `hashed` (argon2 or bcrypt); False for anything else."""
    if hashed.startswith(_ARGON2_PREFIXES):
        try:
            return _ARGON2.verify(hashed, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if hashed.startswith(_BCRYPT_PREFIXES):
        data = password.encode()
        if len(data) > 72:  # bcrypt ignores (or, in bcrypt>=5, refuses) longer input
            return False
        try:
            # $2y$ (Apache's name) is the same algorithm as $2b$.
            return bcrypt.checkpw(data, ("$2b$" + hashed[4:]).encode())
        except ValueError:
            return False
    return False


def verify_or_dummy(hashed: str | None, password: str) -> bool:
    """`verify_password`, or the same work against a dummy hash when there is no user."""
    if hashed is None:
        verify_password(_DUMMY_HASH, password)
        return False
    return verify_password(hashed, password)


def load_htpasswd(path: str | Path, at: str) -> dict[str, str]:
    """user -> hash from an htpasswd file; ConfigError (at `at`) for an unreadable file or a
    line whose hash is not argon2/bcrypt (the message names the line, not the hash)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(at, f"cannot read {path}: {exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError(at, f"{path}:{number}: expected user:hash")
        if not is_supported(hashed):
            raise ConfigError(
                at,
                f"{path}:{number}: user {user!r} has a weak or unknown hash; "
                "use bcrypt (htpasswd -B) or argon2",
            )
        if user in users:
            raise ConfigError(at, f"{path}:{number}: user {user!r} appears twice")
        users[user] = hashed
    return users


__all__ = ["hash_password", "is_supported", "load_htpasswd", "verify_or_dummy", "verify_password"]
