"""`type: ip_filter`: admit or refuse a request by its client address.

    middlewares:
      office_only:
        type: ip_filter
        allow: [10.0.0.0/8, "2001:db8::/32"]   # if set, only these clients pass
        deny: [10.9.0.0/16]                     # these never pass (deny wins over allow)
        status: 403                             # or 404: hide the route

Every option and example is in docs/ip-filter.md.

Rules this file obeys:
- The client address is the one the access log writes: the peer, or, when the peer is a
  trusted proxy of the entrypoint (forwarded.trusted_ips), the X-Forwarded-For walk of
  fastgate/_core/ratecheck.pyx (one walk: the check calls ratecheck.walk_client). Networks
  are ratecheck.NetSets, so an address matches only networks of its own family and a
  v4-mapped IPv6 address is IPv4; a v4-mapped network in the config (::ffff:a.b.c.d/n,
  n >= 96) is stored as the IPv4 network.
- Deny wins: an address in a deny network is refused even if an allow network holds it. With
  an allow list, an address in none of its networks (or no address at all: a Unix socket
  peer, an X-Forwarded-For element that does not parse) is refused.
- A refusal is a fixed reply built once (403 "forbidden", or 404 "no route" like an unknown
  path, so a hidden route looks absent), and the exchange notes DENY_IP with this middleware's
  name and a fixed reason ("client address denied" / "client address not allowed"): the
  `ip_denied` audit line. The reply never says which list refused, nor echoes the address.
- Leading a route's chain, the check runs in C (`core_check`, fastgate._core.ipfilter.IpCheck):
  an admitted request costs no Python call. Elsewhere in the chain `on_request` calls the same
  check (`IpCheck.decide`): one decision, one set of reasons, one count.
"""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from fastgate._core.ipfilter import IpCheck
from fastgate._core.ratecheck import NetSet
from fastgate.errors import ConfigError
from fastgate.middleware.base import LocalReply, RequestContext
from fastgate.middleware.registry import register

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """One allow/deny entry: an IP (a /32 or /128) or a CIDR with no host bits set; a
    v4-mapped IPv6 network of prefix >= 96 becomes its IPv4 network (NetSet matches a
    v4-mapped client address as IPv4)."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IP address or CIDR network: {exc}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


class IpFilterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    allow: list[StrictStr] = Field(default_factory=list, max_length=10000)
    deny: list[StrictStr] = Field(default_factory=list, max_length=10000)
    status: Literal[403, 404] = 403

    @field_validator("allow", "deny", mode="wrap")
    @classmethod
    def _each(cls, value: Any, handler: Any) -> list[str]:
        items = handler(value)
        errors = []
        for i, text in enumerate(items):
            try:
                parse_network(text)
            except ValueError as exc:
                errors.append((i, str(exc)))
        if errors:
            from pydantic_core import InitErrorDetails, PydanticCustomError

            raise ValidationError.from_exception_data(
                "IpFilterOptions",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("value_error", "{error}", {"error": why}),
                        loc=(i,),
                        input=items[i],
                    )
                    for i, why in errors
                ],
            )
        return items


def parse_options(options: Any) -> IpFilterOptions:
    """Validate; ConfigError names each problem by its key path (e.g. `allow[2]`)."""
    from fastgate.config.schema import pydantic_errors

    try:
        opts = IpFilterOptions.model_validate(options or {})
    except ValidationError as exc:
        raise ConfigError.from_errors(pydantic_errors(exc, IpFilterOptions)) from None
    if not opts.allow and not opts.deny:
        raise ConfigError("allow", "an ip_filter needs a non-empty allow or deny list")
    return opts


@register
class IpFilter:
    """Allow/deny lists of networks on the client address (see the module docstring)."""

    type: ClassVar[str] = "ip_filter"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse_options(options)
        self.name = name
        self.options = opts
        self.allow = NetSet([str(parse_network(t)) for t in opts.allow])
        self.deny = NetSet([str(parse_network(t)) for t in opts.deny])
        message = "forbidden" if opts.status == 403 else "no route"
        self.reply = LocalReply.error(opts.status, message)
        # One check for every route and for the Python path: one decision, one count.
        self.check = IpCheck(self.allow, self.deny, self.reply, name)

    def core_check(self, route: str) -> Any:
        """The C check, run before the route's Python chain when ip_filter leads it."""
        return self.check

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        """Later in a chain: the same C decision, called from Python."""
        return self.check.decide(ctx.conn)

    def stats(self) -> dict[str, Any]:
        """Refusals by the deny list and by the allow list (C and Python paths)."""
        return {"denied": self.check.denied, "not_allowed": self.check.not_allowed}


__all__ = ["IpFilter", "IpFilterOptions", "parse_network"]
