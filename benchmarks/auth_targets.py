"""Auth targets for benchmarks/run.py: fastgate with one auth middleware on its route.

Each target is `fastgate run` with the same single route as the rate-limit targets and one
auth middleware, and the credential wrk sends on every request (`wrk -H`):

- fastgate-jwt-hs256: `jwt_auth` HS256 (a 64-byte secret), verification cache on (default).
- fastgate-jwt-rs256: `jwt_auth` RS256 (2048-bit key), verification cache on: after the first
  request the token costs a SHA-256 and a dict lookup.
- fastgate-jwt-rs256-nocache: the same with `cache_size: 0`: an RSA verification per request.
- fastgate-apikey: `api_key` with a consumer store made for the run (`fastgate consumers add`,
  `fastgate keys add`).

Every auth target forwards the subject upstream (`forward_headers: {X-User: subject}`), so the
per-request cost includes building that header. The probe in run.py shows the middleware is
on the request path: the same target answers 401 without the credential.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Secrets made for one benchmark run: not secrets anyone uses.
HS_SECRET = "bench-secret-" + "k" * 51
TOKEN_LIFETIME = 24 * 3600

AUTH_TARGETS = ("fastgate-jwt-hs256", "fastgate-jwt-rs256", "fastgate-jwt-rs256-nocache",
                "fastgate-apikey")  # fmt: skip
FORWARD = {"X-User": "subject"}


def _jwt(workdir: Path, alg: str, cache: bool) -> tuple[dict[str, Any], tuple[str, str]]:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    now = int(time.time())
    claims = {"sub": "bench-user", "iat": now, "exp": now + TOKEN_LIFETIME, "scope": "bench"}
    options: dict[str, Any] = {"type": "jwt_auth", "algorithms": [alg], "forward_headers": FORWARD}
    if alg == "HS256":
        token = jwt.encode(claims, HS_SECRET, alg)
        options["secret"] = HS_SECRET
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path = workdir / f"jwt-{alg.lower()}.pem"
        path.write_bytes(pem)
        options["public_key_file"] = str(path)
        token = jwt.encode(claims, key, alg)
    if not cache:
        options["cache_size"] = 0
    return options, ("Authorization", f"Bearer {token}")


def _api_key(
    workdir: Path, run_fastgate: Callable[[list[str]], str]
) -> tuple[dict[str, Any], tuple[str, str]]:
    store = workdir / "consumers.db"
    run_fastgate(["consumers", "add", "bench", "--store", str(store)])
    key = run_fastgate(["keys", "add", "bench", "--store", str(store)]).strip().splitlines()[-1]
    options = {"type": "api_key", "store": str(store), "forward_headers": FORWARD}
    return options, ("X-API-Key", key)


def auth_middleware(
    name: str, workdir: Path, run_fastgate: Callable[[list[str]], str]
) -> tuple[dict[str, Any], tuple[str, str]]:
    """(middleware options, the (header, value) every request carries) for target `name`."""
    if name == "fastgate-jwt-hs256":
        return _jwt(workdir, "HS256", cache=True)
    if name == "fastgate-jwt-rs256":
        return _jwt(workdir, "RS256", cache=True)
    if name == "fastgate-jwt-rs256-nocache":
        return _jwt(workdir, "RS256", cache=False)
    if name == "fastgate-apikey":
        return _api_key(workdir, run_fastgate)
    raise ValueError(f"not an auth target: {name}")


def fastgate_cli(repo: Path, env: dict[str, str]) -> Callable[[list[str]], str]:
    """`fastgate ARGS...` from the checkout; its stdout, or RuntimeError with its stderr."""

    def run(args: list[str]) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "fastgate", *args],
            capture_output=True, text=True, cwd=repo, env=env, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"fastgate {args[0]} {args[1]}: {done.stderr.strip()}")
        return done.stdout

    return run
