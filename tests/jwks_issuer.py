"""A small local JWKS / OIDC issuer for the jwt_auth key-set tests, on 127.0.0.1.

Import with `tests/` on sys.path (`from jwks_issuer import Issuer`). It runs in-process, on a
thread with its own asyncio event loop, so a test drives it directly while the gateway (a
subprocess) or a KeyManager (on the test's own loop) fetches from it:

    with Issuer(tls=trustme.CA()) as idp:          # tls=None: plain http
        idp.add_key("a", rsa_private_key)           # published as a public JWK, kid "a"
        token = idp.token("a", sub="alice")         # RS256 by default for RSA keys
        idp.url, idp.jwks_url, idp.ca_file          # ca_file: the CA PEM (TLS only)
        idp.count(idp.jwks_path)                    # requests seen per path

It serves `/.well-known/openid-configuration` ({"issuer", "jwks_uri"}; `discovery_issuer`
overrides the issuer it names) and `jwks_path` (the public JWKs, in insertion order, plus any
`raw_keys`; `jwks_body` replaces the body, e.g. with bad JSON). `cache_control` sets the JWKS
response's Cache-Control header (None: no header). Keys can be added and removed at any time.

`down(mode)` makes it fail: "refuse" (the listener is closed: connections are refused),
"close" (a request is read, then the connection closed without an answer), "hang" (a request
is read and never answered), "error" (500). Every mode closes the open (kept-alive)
connections first. `up()` serves again. Connections are HTTP/1.1 keep-alive with
Content-Length framing; everything is stopped at `stop()`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

DISCOVERY_PATH = "/.well-known/openid-configuration"
MODES = ("up", "refuse", "close", "hang", "error")
_MAX_HEAD = 65536


def public_jwk(private_key: Any, kid: str | None, **fields: Any) -> dict[str, Any]:
    """The public JWK of a private key, with `kid` (when not None) and any extra members."""
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    else:
        raise TypeError(f"unsupported key {type(public).__name__}")
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(fields)
    return jwk


def default_alg(private_key: Any) -> str:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384"}[private_key.curve.name]
    return "EdDSA"


class Issuer:
    """The issuer server; see the module docstring."""

    def __init__(self, tls: Any = None, jwks_path: str = "/jwks.json") -> None:
        self.tls_ca = tls  # a trustme.CA, or None for plain http
        self.jwks_path = jwks_path
        self.cache_control: str | None = None
        self.discovery_issuer: str | None = None  # None: the issuer's own URL
        self.jwks_uri: str | None = None  # None: jwks_url
        self.jwks_body: bytes | None = None
        self.raw_keys: list[Any] = []
        self._keys: dict[str, dict[str, Any]] = {}
        self._private: dict[str, tuple[Any, str]] = {}
        self._counts: Counter[str] = Counter()
        self._mode = "up"
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._released: asyncio.Event | None = None  # set: hanging requests end
        self._ssl: ssl.SSLContext | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.ca_file: str | None = None
        self.port = 0

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> Issuer:
        if self.tls_ca is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jwks-issuer-")
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_ca.issue_cert("127.0.0.1").configure_cert(ctx)
            self._ssl = ctx
            ca_path = Path(self._tmp.name, "ca.pem")
            self.tls_ca.cert_pem.write_to_path(str(ca_path))
            self.ca_file = str(ca_path)
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Issuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_ca is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return self.url + self.jwks_path

    # ---- keys -------------------------------------------------------------------------------

    def add_key(
        self, kid: str, private_key: Any, alg: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Publish the public half of `private_key` as `kid`; `fields` adds JWK members
        (use, alg, ...). Tokens for it come from `token(kid, ...)`."""
        jwk = public_jwk(private_key, kid, **fields)
        with self._lock:
            self._keys[kid] = jwk
            self._private[kid] = (private_key, alg or default_alg(private_key))
        return jwk

    def remove_key(self, kid: str) -> None:
        """Stop publishing `kid` (tokens can still be signed with it, for the tests)."""
        with self._lock:
            self._keys.pop(kid, None)

    def token(
        self, kid: str | None, *, key_of: str | None = None, headers: dict | None = None, **claims
    ) -> str:
        """A token signed with the key added as `key_of` (default: `kid`), header kid `kid`
        (None: no kid); claims default to sub=alice, iat=now, exp=now+600."""
        private_key, alg = self._private[key_of or kid]  # type: ignore[index]
        now = int(time.time())
        payload = {"sub": "alice", "iat": now, "exp": now + 600, **claims}
        head = dict(headers or {})
        if kid is not None:
            head["kid"] = kid
        return jwt.encode(payload, private_key, alg, head)

    # ---- behaviour --------------------------------------------------------------------------

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def down(self, mode: str = "refuse") -> None:
        assert mode in MODES and mode != "up", mode
        self._call(self._set_mode(mode))

    def up(self) -> None:
        self._call(self._set_mode("up"))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._released = asyncio.Event()
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self._ssl, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_mode(self, mode: str) -> None:
        assert self._released is not None
        self._released.set()  # requests hanging in an earlier mode end now
        self._released = asyncio.Event()
        self._drop_connections()
        with self._lock:
            old, self._mode = self._mode, mode
        if mode == "refuse" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif old == "refuse" and self._server is None:
            await self._listen()

    def _drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _shutdown(self) -> None:
        if self._released is not None:
            self._released.set()
        self._drop_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                if len(head) > _MAX_HEAD:
                    return
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = line.split(" ")
                if len(parts) != 3:
                    return
                path = parts[1].split("?", 1)[0]
                with self._lock:
                    self._counts[path] += 1
                    mode = self._mode
                released = self._released
                if mode == "close":
                    return
                if mode == "hang":
                    assert released is not None
                    await released.wait()
                    return
                status, headers, body = self._answer(path, mode)
                lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}"]
                lines += [f"{k}: {v}" for k, v in headers]
                lines.append(f"Content-Length: {len(body)}")
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    def _answer(self, path: str, mode: str) -> tuple[int, list[tuple[str, str]], bytes]:
        if mode == "error":
            return 500, [("Content-Type", "text/plain")], b"down"
        headers = [("Content-Type", "application/json")]
        with self._lock:
            if path == DISCOVERY_PATH:
                doc: Any = {
                    "issuer": self.discovery_issuer or self.url,
                    "jwks_uri": self.jwks_uri or self.jwks_url,
                    "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                }
                return 200, headers, json.dumps(doc).encode()
            if path != self.jwks_path:
                return 404, headers, b'{"error": "not found"}'
            if self.cache_control is not None:
                headers.append(("Cache-Control", self.cache_control))
            if self.jwks_body is not None:
                return 200, headers, self.jwks_body
            doc = {"keys": [*self._keys.values(), *self.raw_keys]}
        return 200, headers, json.dumps(doc).encode()


__all__ = ["DISCOVERY_PATH", "Issuer", "default_alg", "public_jwk"]
