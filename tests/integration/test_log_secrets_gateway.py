"""No credential reaches any log: a real gateway is sent known secrets, and afterwards no byte
of its access log, its audit stream, or its own stdout/stderr (supervisor and workers, at
log level debug) holds any of them, in any form they travelled in.

The secrets, each sent on requests that are let through AND on requests that are refused:
- JWTs in `Authorization: Bearer` (jwt_auth) and in a query parameter (jwt_auth `token_from:
  query:...`, a name that is not in the default redact list: the gateway must add it);
- API keys in `X-API-Key` and in a query parameter (api_key `query:`, also a custom name);
- a Basic password (basic_auth with an htpasswd user), wrong and right;
- `?password=...&token=...&api_key=...&client_secret=...` on a route without auth;
- a cookie value, and the HS256 key of the config itself.

Forms checked: as sent, percent-encoded (how query values travel), base64 (Basic), and for
JWTs each of their payload and signature segments. The access log must show `REDACTED` where
the query values were. Both the json and the combined formats are checked.

Rules these tests obey: real processes on 127.0.0.1 only, bounded polls of the log files,
and the logs are shown to carry lines of the requests sent (an empty log proves nothing).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bcrypt
import jwt
import pytest
from conftest import Client, Gateway, Origin, base_config

from fastgate.auth.consumers import ConsumerStore

FLUSH_WAIT = 10.0


def unique(label: str) -> str:
    """A secret no log could hold by chance; `+/=` make its percent-encoded form differ."""
    return f"{label}+{secrets.token_hex(12)}/="


HS_KEY = "hs-" + secrets.token_hex(32)
QUERY = {  # on every request, allowed or refused
    "password": unique("pw"),
    "token": unique("tok"),
    "api_key": unique("ak"),
    "client_secret": unique("cs"),
}
COOKIE = unique("cookie")
BASIC_USER, BASIC_PW, BASIC_WRONG = "carol", unique("basicpw"), unique("wrongpw")
JWT_QUERY, KEY_QUERY = "tok_custom", "key_custom"  # not in the default redact list


def make_jwt(key: str = HS_KEY) -> str:
    """A fresh HS256 token: the jti makes every one (payload and signature) unique."""
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 300, "jti": secrets.token_hex(16)}
    return jwt.encode(claims, key, "HS256")


def query_string(extra: dict[str, str] | None = None) -> str:
    items = {**QUERY, **(extra or {})}
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in items.items()) + "&keep=visible"


def jwt_forms(token: str) -> list[str]:
    _, payload, signature = token.split(".")
    return [token, payload, signature]


def forms(secret: str) -> set[str]:
    """The ways `secret` could show up in a log."""
    return {
        secret,
        quote(secret, safe=""),
        quote(secret),
        base64.b64encode(secret.encode()).decode(),
    }


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "consumers.db"
    with ConsumerStore(path, create=True) as s:
        s.add_consumer("shop")
    return path


def add_key(store: Path) -> tuple[str, str]:
    """(the whole key, its secret part)."""
    with ConsumerStore(store) as s:
        key_id, key = s.add_key("shop")
    return key, key.split(f"_{key_id}_", 1)[1]


@pytest.mark.parametrize("fmt", ["json", "combined"])
def test_no_secret_in_any_log(
    origin: Origin,
    start_gateway: Callable[[dict[str, Any]], Gateway],
    tmp_path: Path,
    store: Path,
    fmt: str,
) -> None:
    htpasswd = tmp_path / "users.htpasswd"
    hashed = bcrypt.hashpw(BASIC_PW.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{BASIC_USER}:$2y${hashed[4:]}\n")
    middlewares = {
        "jwt": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": HS_KEY},
        "jwtq": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": HS_KEY,
                 "token_from": f"query:{JWT_QUERY}"},
        "keys": {"type": "api_key", "store": str(store), "query": KEY_QUERY,
                 "hide_credentials": False},
        "basic": {"type": "basic_auth", "htpasswd": str(htpasswd)},
    }  # fmt: skip
    routes = [{"name": "plain", "match": {"hosts": ["plain.test"]}, "service": "origin"}]
    routes += [
        {"name": n, "match": {"hosts": [f"{n}.test"]}, "service": "origin", "middlewares": [n]}
        for n in middlewares
    ]
    access = tmp_path / "access.log"
    cfg = base_config(
        origin.port,
        log_level="debug",
        middlewares=middlewares,
        routes=routes,
        access_log={"enabled": True, "path": str(access), "format": fmt},
        audit_log={"enabled": True, "path": "stderr"},  # the default: into the captured log
    )
    gw = start_gateway(cfg)

    key_good, key_secret = add_key(store)
    key_q, key_q_secret = add_key(store)
    key_bad = f"fgk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    jwt_good, jwt_bad = make_jwt(), make_jwt(key="w" * 64)
    jwtq_good, jwtq_bad = make_jwt(), make_jwt(key="v" * 64)
    basic_good = base64.b64encode(f"{BASIC_USER}:{BASIC_PW}".encode()).decode()
    basic_bad = base64.b64encode(f"{BASIC_USER}:{BASIC_WRONG}".encode()).decode()
    cookie = {"Cookie": f"session={quote(COOKIE, safe='')}; theme=dark"}
    # (host, path and query, headers, expected status)
    plan: list[tuple[str, str, dict[str, str], int]] = [
        ("plain.test", "/echo-path/p?" + query_string(),
         {**cookie, "Authorization": f"Bearer {jwt_good}"}, 200),
        ("jwt.test", "/echo-path/j?" + query_string(),
         {**cookie, "Authorization": f"Bearer {jwt_good}"}, 200),
        ("jwt.test", "/echo-path/j?" + query_string(),
         {**cookie, "Authorization": f"Bearer {jwt_bad}"}, 401),
        ("jwtq.test", "/echo-path/q?" + query_string({JWT_QUERY: jwtq_good}), cookie, 200),
        ("jwtq.test", "/echo-path/q?" + query_string({JWT_QUERY: jwtq_bad}), cookie, 401),
        ("keys.test", "/echo-path/k?" + query_string(), {"X-API-Key": key_good}, 200),
        ("keys.test", "/echo-path/k?" + query_string(), {"X-API-Key": key_bad}, 401),
        ("keys.test", "/echo-path/k?" + query_string({KEY_QUERY: key_q}), cookie, 200),
        ("keys.test", "/echo-path/k?" + query_string({KEY_QUERY: key_bad}), cookie, 401),
        ("basic.test", "/echo-path/b?" + query_string(),
         {**cookie, "Authorization": f"Basic {basic_good}"}, 200),
        ("basic.test", "/echo-path/b?" + query_string(),
         {**cookie, "Authorization": f"Basic {basic_bad}"}, 401),
    ]  # fmt: skip
    statuses = []
    with Client(gw.addr) as c:
        for host, target, headers, _ in plan:
            resp = c.request("GET", target, {**headers, "Referer": "http://ref.test/"}, host=host)
            statuses.append(resp.status)
    assert statuses == [status for *_, status in plan]

    lines = wait_count(access, len(plan))
    refused = sum(1 for *_, status in plan if status >= 400)
    assert wait_for_audit(gw.log, refused), "the audit lines never reached the worker's stderr"
    assert len(lines) == len(plan), lines

    # The query values were replaced, the harmless one kept; custom credential parameters too.
    text = access.read_text()
    redacted = "?" + "&".join(f"{k}=REDACTED" for k in QUERY) + "&"
    assert text.count(redacted) == text.count("&keep=visible") == len(plan), text
    assert text.count(f"{JWT_QUERY}=REDACTED") == 2, text
    assert text.count(f"{KEY_QUERY}=REDACTED") == 2, text

    leaks: set[str] = {HS_KEY, COOKIE, BASIC_PW, BASIC_WRONG, key_good, key_secret, key_q,
                       key_q_secret, key_bad, basic_good, basic_bad, *QUERY.values()}  # fmt: skip
    for token in (jwt_good, jwt_bad, jwtq_good, jwtq_bad):
        leaks.update(jwt_forms(token))
    gw.stop()  # every line flushed and every process gone: the logs are complete
    logs = {"access": access.read_bytes(), "gateway stdout/stderr": gw.log.read_bytes()}
    found = [
        (name, form[:12] + "...")
        for name, data in logs.items()
        for secret in leaks
        for form in forms(secret)
        if form.encode() in data
    ]
    assert found == [], f"secrets in the logs: {found}"


def wait_count(path: Path, count: int) -> list[str]:
    """The lines of `path` once it has `count` (bounded wait), and a little after."""
    deadline = time.monotonic() + FLUSH_WAIT
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # a line too many would show up now
    return path.read_text().splitlines() if path.exists() else lines


def wait_for_audit(log: Path, count: int) -> bool:
    """Whether `count` audit lines reached the gateway's captured stderr in time."""
    deadline = time.monotonic() + FLUSH_WAIT
    while time.monotonic() < deadline:
        found = 0
        for line in log.read_text(errors="replace").splitlines():
            try:
                found += json.loads(line).get("type") == "audit"
            except (ValueError, AttributeError):
                pass  # the gateway's own log lines
        if found >= count:
            return True
        time.sleep(0.05)
    return False
