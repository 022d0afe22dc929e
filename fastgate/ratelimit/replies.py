"""The replies a rate limit answers with, and their headers.

`ietf` (the default) follows draft-ietf-httpapi-ratelimit-headers (revisions -09 to -11):

    RateLimit-Policy: "api";q=100;w=60, "api-1";q=1000;w=3600
    RateLimit: "api";r=0;t=3
    Retry-After: 3

RateLimit-Policy is a Structured Fields List (RFC 9651 §3.1) of the enforcing limits, each a
String naming the policy with the quota `q` (requests) and the window `w` (seconds, an
Integer); RateLimit is the one limit that decided (the refusing one), with `r` remaining and
`t` seconds until the same request would pass, which is the point in time Retry-After names
(the draft asks the two to agree). `legacy` sends X-RateLimit-Limit (requests per window),
X-RateLimit-Remaining and X-RateLimit-Reset (seconds, a delta, like `t`), plus Retry-After.
`none` sends only Retry-After (RFC 9110 §10.2.3), which a 429 should always carry (RFC 6585
§4). Seconds are whole and rounded up, so a client that waits that long is not refused again
by the same limit.

The JSON body is `{"error": message, "retry_after": seconds, "request_id": ...}` (the request
id is added by LocalReply.encode). Refusals are rare enough that building them in Python is
fine: the admitted path never comes here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from fastgate.middleware.base import LocalReply
from fastgate.ratelimit.options import Limit

__all__ = ["Replies", "quota_window", "sf_string"]


def sf_string(text: str) -> str:
    """A Structured Fields String (RFC 9651 §3.3.3): quoted, with `\\` and `"` escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quota_window(limit: Limit) -> tuple[int, int]:
    """(q, w): whole requests per whole seconds with q/w as close to rate/per as integers
    allow (the draft's parameters are Integers)."""
    if limit.rate == int(limit.rate) and limit.per == int(limit.per):
        return int(limit.rate), int(limit.per)
    window = max(1, round(limit.per))
    return max(1, round(limit.rate * window / limit.per)), window


def _json(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _seconds(us: int) -> int:
    return max(1, math.ceil(us / 1e6)) if us > 0 else 0


class Replies:
    """Preformatted pieces of one middleware's replies; `limited()` for 429, `busy()` for an
    in-flight refusal, `unavailable()` for fail_closed (503)."""

    def __init__(
        self, style: str, names: Sequence[str], limits: Sequence[Limit], message: str
    ) -> None:
        self.style = style
        self.names = tuple(names)
        self.quotas = tuple(quota_window(lim) for lim in limits)
        self.message = message
        enforcing = [i for i, lim in enumerate(limits) if not lim.dry_run]
        self.policy = ", ".join(
            f"{sf_string(self.names[i])};q={self.quotas[i][0]};w={self.quotas[i][1]}"
            for i in enforcing
        )

    def headers(self, index: int, remaining: int, reset_us: int) -> list[tuple[str, str]]:
        """The rate-limit headers (without Retry-After) for limit `index`'s decision."""
        t = _seconds(reset_us)
        if self.style == "ietf":
            state = f"{sf_string(self.names[index])};r={max(0, remaining)};t={t}"
            return [("RateLimit-Policy", self.policy), ("RateLimit", state)]
        if self.style == "legacy":
            return [
                ("X-RateLimit-Limit", str(self.quotas[index][0])),
                ("X-RateLimit-Remaining", str(max(0, remaining))),
                ("X-RateLimit-Reset", str(t)),
            ]
        return []

    def limited(self, index: int, remaining: int, retry_after_us: int) -> LocalReply:
        """429 for a refusal by limit `index`, retry possible after `retry_after_us`."""
        retry = _seconds(retry_after_us)
        headers = [("Retry-After", str(retry)), *self.headers(index, remaining, retry_after_us)]
        headers.append(("Cache-Control", "no-store"))
        body = _json({"error": self.message, "retry_after": retry})
        return LocalReply(429, body, tuple(headers))

    def busy(self) -> LocalReply:
        """429 for a key with too many requests in flight (no time to wait is known)."""
        body = _json({"error": "too many requests in flight"})
        return LocalReply(429, body, (("Cache-Control", "no-store"),))

    def unavailable(self) -> LocalReply:
        """503 when the shared limit cannot be consulted and the policy is fail_closed."""
        body = _json({"error": "rate limit unavailable"})
        return LocalReply(503, body, (("Retry-After", "1"), ("Cache-Control", "no-store")))
