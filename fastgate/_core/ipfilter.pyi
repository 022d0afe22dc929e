"""The ip_filter middleware's check in C (see the rules at the top of ipfilter.pyx)."""

from typing import Any

from fastgate._core.conn import CoreCheck
from fastgate._core.ratecheck import NetSet

PASS: int
DENIED: int
NOT_ALLOWED: int
DENIED_REASON: str  # "client address denied"
NOT_ALLOWED_REASON: str  # "client address not allowed"
REASONS: dict[int, str]

class IpCheck(CoreCheck):
    """Refuse a request whose client address is in `deny`, or (with a non-empty `allow`)
    in none of `allow`; `reply` is returned as is, `name` is the audit source."""

    allow: NetSet
    deny: NetSet
    reply: Any
    name: str
    denied: int
    not_allowed: int
    def __init__(self, allow: NetSet, deny: NetSet, reply: Any, name: str = "") -> None: ...
    def decide(self, conn: Any) -> Any:
        """The check for the Python path (ip_filter later in a chain): the same decision,
        counts and deny note; the reply, or None when the request passes."""
