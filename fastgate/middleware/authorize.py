"""`type: authorize`: per-route rules over the `Identity` an earlier auth middleware set.

    middlewares:
      orders_access:
        type: authorize
        require:                         # the rule for every method (all conditions must hold)
          scopes: [orders:read]          # all of these scopes
          roles_any: [admin, support]    # at least one of these roles
          roles_all: [staff]             # all of these roles
          groups_any: [ops]
          groups_all: []
          claims:                        # claims the auth middleware kept (forward_claims)
            tenant: {equals: acme}       # or {in: [a, b]} or {matches: "^acme-[0-9]+$"}
          methods: [jwt, mtls]           # how the caller authenticated (Identity.method)
        methods:                         # per HTTP method rules replace `require`
          GET: {scopes: [orders:read]}
          POST: {scopes: [orders:write]}
          "*": {}                        # other methods (else `require`, else admitted)
        consumers: {allow: [shop], deny: [legacy]}
        allow_anonymous: false
        dry_run: false

DESIGN.md §5: auth middlewares answer 401 (who are you?), `authorize` answers 403 (not you).

Rules this file obeys:
- No identity: 401 with a Bearer challenge, unless `allow_anonymous`; then the request is
  checked as an empty identity, so any rule with a condition (and `consumers.allow`) denies it
  with 403 and only a rule without conditions admits it.
- The rule for a request: `methods[METHOD]`, else `methods["*"]`, else `require`, else none
  (admit). HEAD uses the GET rule when HEAD is not listed (a HEAD answers what a GET would,
  without the body). A request method is looked up as sent, then uppercased, so `get` cannot
  slip past a `GET` rule.
- The 403 body is a fixed `forbidden`: which condition failed goes only to the audit line
  (noted on the connection, `conn.note_deny`: DENY_FORBIDDEN for a 403, DENY_AUTH_FAILED for
  the 401 without an identity; the C side writes the line at the exchange end) and the denial
  counter. Every reason is a fixed phrase made from config names, never a value taken from
  the request or the identity, so the counter stays bounded.
- An empty condition list is the same as leaving the key out (no condition).
- Claim values compare by JSON type: a string never equals a number, `true` never equals 1. A
  list claim holds when one of its items does. `matches` is a full match, strings only, and is
  compiled when the config is loaded.
- `dry_run` decides and counts every denial (reason prefixed `dry_run: `) and logs it on the
  `fastgate.authorize` logger (INFO: route, client, method, path, reason; never a credential
  or a claim value), then admits: a dry-run denial is no refusal, so it is not noted on the
  connection and writes no audit line.
- Rules are compiled once into predicates; per request: a dict lookup and a few set
  operations, synchronous, nothing awaited.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from fastgate._core.accesslog import DENY_AUTH_FAILED, DENY_FORBIDDEN
from fastgate.auth.common import note_deny, route_name
from fastgate.errors import ConfigError
from fastgate.middleware.base import Identity, LocalReply, RequestContext
from fastgate.middleware.registry import register

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §9.1 method = token
_HTTP_METHODS = frozenset("GET HEAD POST PUT PATCH DELETE OPTIONS CONNECT TRACE".split())
_ANONYMOUS = Identity(method="", subject="")  # what an allowed anonymous request is checked as
_UNAUTHORIZED = LocalReply.error(
    401, "authentication required", WWW_Authenticate='Bearer realm="fastgate"'
)
_FORBIDDEN = LocalReply.error(403, "forbidden")
DRY_RUN = "dry_run: "
log = logging.getLogger("fastgate.authorize")

# ---- options ----------------------------------------------------------------------------------

Name = Annotated[str, StringConstraints(strict=True, min_length=1)]


def _scalar(value: Any) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    raise ValueError("expected a string, a number or true/false")


Scalar = Annotated[Any, AfterValidator(_scalar)]


def _auth_method(name: str) -> str:
    # `require.methods` lists auth methods; HTTP methods go under the top-level `methods`.
    if name in _HTTP_METHODS:
        raise ValueError(
            f"{name!r} is an HTTP method: list auth methods here (jwt, mtls, ...) and put "
            "per-HTTP-method rules under the top-level `methods`"
        )
    return name


AuthMethodName = Annotated[Name, AfterValidator(_auth_method)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClaimRule(_Model):
    """One claim condition: exactly one of `equals`, `in`, `matches`."""

    equals: Scalar = None
    in_: Annotated[list[Scalar], Field(min_length=1)] | None = Field(default=None, alias="in")
    matches: Annotated[str, StringConstraints(strict=True)] | None = None

    @field_validator("matches")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one(self) -> ClaimRule:
        given = [f for f in ("equals", "in_", "matches") if f in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("expected exactly one of equals, in, matches")
        return self


class Rule(_Model):
    """Conditions that must all hold; an empty list is no condition."""

    scopes: list[Name] = []
    roles_any: list[Name] = []
    roles_all: list[Name] = []
    groups_any: list[Name] = []
    groups_all: list[Name] = []
    claims: dict[Name, ClaimRule] = {}
    methods: list[AuthMethodName] = []


class Consumers(_Model):
    allow: list[Name] = []
    deny: list[Name] = []


class AuthorizeOptions(_Model):
    require: Rule | None = None
    methods: dict[str, Rule] = {}
    consumers: Consumers = Consumers()
    allow_anonymous: StrictBool = False
    dry_run: StrictBool = False


def parse(options: Any) -> AuthorizeOptions:
    """Validate the options; ConfigError lists every problem by key path (relative to the
    middleware: `claims.tenant.matches`, `methods.GET.scopes[0]`)."""
    from fastgate.config.schema import format_path, pydantic_errors

    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError("", "expected a mapping of options")
    try:
        opts = AuthorizeOptions.model_validate(options)
    except ValidationError as exc:
        raise ConfigError.from_errors(pydantic_errors(exc, AuthorizeOptions)) from None
    problems = []
    seen: dict[str, str] = {}
    for key in opts.methods:
        upper = key.upper()
        if key != "*" and not _TOKEN.fullmatch(key):
            problems.append((format_path(("methods", key)), "not a valid HTTP method name"))
        elif upper in seen:
            problems.append((format_path(("methods", key)), f"same method as {seen[upper]}"))
        seen[upper] = key
    if problems:
        raise ConfigError.from_errors(problems)
    return opts


# ---- predicates: identity -> None (holds) or the reason it does not --------------------------

Check = Callable[[Identity], str | None]


class AllOf:
    """Every name in `field` (scopes, roles, groups)."""

    __slots__ = ("field", "names", "noun")

    def __init__(self, field: str, noun: str, names: list[str]) -> None:
        self.field, self.noun, self.names = field, noun, frozenset(names)

    def __call__(self, identity: Identity) -> str | None:
        have = getattr(identity, self.field)
        if self.names <= have:
            return None
        return f"missing {self.noun} {min(self.names - have)}"


class AnyOf:
    """At least one name in `field`."""

    __slots__ = ("field", "names", "reason")

    def __init__(self, field: str, noun: str, names: list[str]) -> None:
        self.field, self.names = field, frozenset(names)
        self.reason = f"missing {noun} (any of {', '.join(sorted(self.names))})"

    def __call__(self, identity: Identity) -> str | None:
        return None if not self.names.isdisjoint(getattr(identity, self.field)) else self.reason


class AuthMethod:
    """How the caller authenticated (`Identity.method`) is one of these."""

    __slots__ = ("names",)

    def __init__(self, names: list[str]) -> None:
        self.names = frozenset(names)

    def __call__(self, identity: Identity) -> str | None:
        return None if identity.method in self.names else "auth method not allowed"


class ConsumerAllow:
    __slots__ = ("names",)

    def __init__(self, names: list[str]) -> None:
        self.names = frozenset(names)

    def __call__(self, identity: Identity) -> str | None:
        return None if identity.consumer in self.names else "consumer not allowed"


class ConsumerDeny:
    __slots__ = ("names",)

    def __init__(self, names: list[str]) -> None:
        self.names = frozenset(names)

    def __call__(self, identity: Identity) -> str | None:
        return "consumer denied" if identity.consumer in self.names else None


def _key(value: Any) -> tuple[str, Any] | None:
    """A claim value as (JSON type, value): `"1"`, `1` and `true` are three different things."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    return None  # objects, null: never equal to a configured scalar


class Claim:
    """One claim condition; a list claim holds when one of its items does."""

    __slots__ = ("keys", "mismatch", "missing", "name", "pattern")

    def __init__(self, name: str, rule: ClaimRule) -> None:
        self.name = name
        values = [rule.equals] if rule.in_ is None and rule.matches is None else rule.in_ or []
        self.keys = frozenset(_key(v) for v in values)
        self.pattern = re.compile(rule.matches) if rule.matches is not None else None
        self.mismatch = f"claim {name} mismatch"
        self.missing = f"claim {name} missing"

    def __call__(self, identity: Identity) -> str | None:
        value = identity.claim(self.name)
        if value is None:
            return self.missing
        items = value if isinstance(value, list | tuple) else (value,)
        pattern = self.pattern
        for item in items:
            if pattern is None:
                if _key(item) in self.keys:
                    return None
            elif isinstance(item, str) and pattern.fullmatch(item):
                return None
        return self.mismatch


def compile_rule(rule: Rule | None) -> tuple[Check, ...]:
    """The checks of one rule, cheapest first (the first failing one names the reason)."""
    if rule is None:
        return ()
    checks: list[Check] = []
    if rule.methods:
        checks.append(AuthMethod(rule.methods))
    if rule.scopes:
        checks.append(AllOf("scopes", "scope", rule.scopes))
    for field, noun in (("roles", "role"), ("groups", "group")):
        names_all = getattr(rule, f"{field}_all")
        names_any = getattr(rule, f"{field}_any")
        if names_all:
            checks.append(AllOf(field, noun, names_all))
        if names_any:
            checks.append(AnyOf(field, noun, names_any))
    checks.extend(Claim(name, claim) for name, claim in rule.claims.items())
    return tuple(checks)


# ---- the middleware ---------------------------------------------------------------------------


@register
class Authorize:
    """One `authorize` middleware instance (see the module docstring)."""

    type: ClassVar[str] = "authorize"

    def __init__(self, options: dict[str, Any], name: str) -> None:
        opts = parse(options)
        self.name = name
        self.allow_anonymous = opts.allow_anonymous
        self.dry_run = opts.dry_run
        consumers: tuple[Check, ...] = ()
        if opts.consumers.deny:
            consumers += (ConsumerDeny(opts.consumers.deny),)
        if opts.consumers.allow:
            consumers += (ConsumerAllow(opts.consumers.allow),)
        rules = {k.upper(): consumers + compile_rule(r) for k, r in opts.methods.items()}
        fallback = rules.pop("*", None)
        if fallback is None:
            fallback = consumers + compile_rule(opts.require)
        if "GET" in rules and "HEAD" not in rules:
            rules["HEAD"] = rules["GET"]
        self.default: tuple[Check, ...] = fallback
        self.rules: dict[bytes, tuple[Check, ...]] = {
            k.encode("latin-1"): v for k, v in rules.items()
        }
        self.denials: Counter[str] = Counter()
        self.route_failures: Counter[tuple[str, str]] = Counter()  # (route, reason): metrics

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        identity = ctx.identity
        if identity is None:
            if not self.allow_anonymous:
                return self._deny(ctx, _UNAUTHORIZED, "no identity")
            identity = _ANONYMOUS
        method = ctx.head.method
        checks = self.rules.get(method)
        if checks is None:
            checks = self.rules.get(method.upper(), self.default)
        for check in checks:
            reason = check(identity)
            if reason is not None:
                return self._deny(ctx, _FORBIDDEN, reason)
        return None

    def _deny(self, ctx: RequestContext, reply: LocalReply, reason: str) -> LocalReply | None:
        """Count a denial and note it for the audit line; in dry-run mode log it and admit
        the request anyway."""
        if self.dry_run:
            reason = DRY_RUN + reason
        route = route_name(ctx)
        self.denials[reason] += 1
        self.route_failures[(route, reason)] += 1
        if self.dry_run:
            if log.isEnabledFor(logging.INFO):
                head = ctx.head
                log.info(
                    "dry run: would deny %d route=%s client=%s %s %s by %s: %s",
                    reply.status,
                    route,
                    getattr(ctx.conn, "client_ip", ""),
                    head.method.decode("latin-1"),
                    head.path.decode("latin-1"),
                    self.name,
                    reason,
                )
            return None
        event = DENY_FORBIDDEN if reply.status == 403 else DENY_AUTH_FAILED
        note_deny(ctx, event, self.name, reason)
        return reply

    # ---- operations ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "denials": dict(self.denials)}


__all__ = ["Authorize", "AuthorizeOptions", "ClaimRule", "Rule"]
