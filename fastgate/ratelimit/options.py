"""The rate_limit middleware's options: parsed, validated, and put into words.

Pure Python (pydantic), importable without the compiled core, so `fastgate check` can explain
a configuration on any machine. Limits are written as a person says them:

    rate: 100/minute            # also "10/s", "5/30s", "1000 per hour", or rate: 100 + per: 1m
    burst: 20                   # bucket size: requests that may come at once (default: rate)
    cost: 1                     # what one request spends

Errors name the option's key path relative to the middleware (`limits[0].rate`); the config
compiler puts `middlewares.<name>.` in front.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fastgate.errors import ConfigError

__all__ = [
    "KeyPart",
    "Limit",
    "RateLimitOptions",
    "describe",
    "parse_duration",
    "parse_key",
    "parse_options",
    "parse_rate",
]

MAX_LIMITS = 16
MAX_KEY_PARTS = 15  # one more is reserved for the route (scope: route)

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_UNIT_WORDS = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)?\s*([a-z]+)?\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/|per\b)\s*(.+?)\s*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.1 field-name


def parse_duration(value: Any) -> float:
    """Seconds from a number (seconds) or text: `50ms`, `1s`, `30s`, `minute`, `1.5h`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value.lower())
        if not match or (match.group(1) is None and match.group(2) is None):
            raise ValueError(f"expected a duration like 50ms, 1s, 5m or 1h, got {value!r}")
        number, unit = match.groups()
        if unit is not None and unit not in _UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {value!r} (use ms, s, m, h or d)")
        seconds = float(number or 1) * (_UNITS[unit] if unit else 1.0)
    else:
        raise ValueError(f"expected a duration, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be > 0, got {value!r}")
    return seconds


def parse_rate(text: str) -> tuple[float, float]:
    """`100/minute`, `10/s`, `5/30s`, `1000 per hour` -> (requests, period seconds)."""
    match = _RATE.match(text.lower())
    if not match:
        raise ValueError(
            f"expected a rate like 100/minute, 10/s or 5/30s, got {text!r} "
            "(or give rate as a number with `per`)"
        )
    count = float(match.group(1))
    if count <= 0:
        raise ValueError(f"the rate must be more than 0 requests, got {text!r}")
    return count, parse_duration(match.group(2))


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def period_words(period: float) -> str:
    """60 -> "minute", 30 -> "30 seconds", 0.5 -> "0.5 seconds"."""
    if period in _UNIT_WORDS:
        return _UNIT_WORDS[period]
    for size in (86400.0, 3600.0, 60.0):
        if period > size and period % size == 0:
            return f"{_number(period / size)} {_UNIT_WORDS[size]}s"
    return f"{_number(period)} seconds"


# --- keys -------------------------------------------------------------------------------------


class KeyPart(BaseModel):
    """One part of a key: what it reads and whether the Python path is needed for it."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["client_ip", "header", "route", "const", "subject", "consumer", "claim"]
    arg: str = ""

    @property
    def in_c(self) -> bool:
        """Computable from the request head alone (the C path)."""
        return self.kind in ("client_ip", "header", "route", "const")

    @property
    def secret(self) -> bool:
        """Its value may be a credential: logs show a hash of it, never the value."""
        return self.kind == "header"

    def words(self) -> str:
        return {
            "client_ip": "client IP",
            "header": f"{self.arg} header",
            "route": "route",
            "const": f"'{self.arg}'",
            "subject": "identity subject",
            "consumer": "consumer",
            "claim": f"'{self.arg}' claim",
        }[self.kind]


def parse_key(text: str) -> KeyPart:
    """`client_ip`, `header:X-Api-Key`, `route`, `identity.subject`, `identity.consumer`,
    `claim:tenant`, `const:global` (a constant: one bucket for everyone)."""
    if not isinstance(text, str):
        raise ValueError(f"a key part is a string, got {text!r}")
    name, sep, arg = text.partition(":")
    name = name.strip().lower()
    arg = arg.strip()
    simple = {
        "client_ip": "client_ip",
        "ip": "client_ip",
        "route": "route",
        "identity.subject": "subject",
        "subject": "subject",
        "identity.consumer": "consumer",
        "consumer": "consumer",
    }
    if not sep and name in simple:
        return KeyPart(kind=simple[name])
    if sep and name == "header":
        if not _HEADER_NAME.match(arg):
            raise ValueError(f"invalid header name {arg!r} in key {text!r}")
        return KeyPart(kind="header", arg=arg.lower())
    if sep and name in ("claim", "identity.claim"):
        if not arg:
            raise ValueError(f"claim needs a name: claim:NAME, got {text!r}")
        return KeyPart(kind="claim", arg=arg)
    if sep and name == "const":
        if not arg:
            raise ValueError(f"const needs a value: const:NAME, got {text!r}")
        return KeyPart(kind="const", arg=arg)
    raise ValueError(
        f"unknown key {text!r}: use client_ip, header:NAME, route, identity.subject, "
        "identity.consumer, claim:NAME or const:VALUE"
    )


def _key_parts(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return tuple(parse_key(v) if isinstance(v, str) else v for v in value)
    return value


Key = Annotated[tuple[KeyPart, ...], BeforeValidator(_key_parts)]


# --- the model --------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(value: Any) -> Any:
    return parse_duration(value) if value is not None else value


Duration = Annotated[float, BeforeValidator(_duration)]


class Limit(_Model):
    """One GCRA limit: `rate` requests per `per` seconds, bursts of up to `burst`."""

    rate: float = Field(description="requests per period: 100/minute, or a number with `per`")
    per: Duration = Field(0.0, description="the period when `rate` is a number; default 1s")
    burst: int = Field(0, ge=0, description="bucket size; 0 = the rate rounded up, at least 1")
    cost: int = Field(1, ge=0, le=1_000_000, description="units one request spends")
    dry_run: bool = Field(False, description="decide, count and log, but never refuse")
    name: str = Field("", description="policy name in RateLimit headers")

    @model_validator(mode="before")
    @classmethod
    def _rate_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("rate"), str):
            data = dict(data)
            if "per" in data:
                raise ValueError("per: give it only with a numeric rate (100/minute has one)")
            try:
                data["rate"], data["per"] = parse_rate(data["rate"])
            except ValueError as exc:
                raise ValueError(f"rate: {exc}") from None
        return data

    @field_validator("rate")
    @classmethod
    def _positive(cls, rate: float) -> float:
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError("rate must be more than 0 requests")
        return rate

    @field_validator("name")
    @classmethod
    def _token(cls, name: str) -> str:
        if name and not _HEADER_NAME.match(name):
            raise ValueError(f"a policy name is letters, digits and -._~ only, got {name!r}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Limit:
        per = self.per or 1.0
        object.__setattr__(self, "per", per)
        if self.rate / per > 1e6:
            raise ValueError("rate: at most 1,000,000 requests per second")
        if per / self.rate > 86400 * 366 * 100:
            raise ValueError("rate: at least one request per 100 years")
        if self.burst == 0:
            object.__setattr__(self, "burst", max(1, math.ceil(self.rate)))
        if self.burst > 1_000_000_000:
            raise ValueError("burst: must be at most 1,000,000,000")
        if self.cost > self.burst:
            raise ValueError(
                f"cost: {self.cost} is more than the burst {self.burst}: every request "
                "would be refused"
            )
        return self

    @property
    def per_second(self) -> float:
        return self.rate / self.per

    def words(self, dry_run_note: bool = True) -> str:
        """`100 requests per minute, bursts up to 20`."""
        unit = "request" if self.rate == 1 else "requests"
        text = f"{_number(self.rate)} {unit} per {period_words(self.per)}"
        text += f", bursts up to {self.burst}"
        if self.cost != 1:
            text += f", each request costs {self.cost}"
        if self.dry_run and dry_run_note:
            text += " (dry run: counted and logged, never refused)"
        return text


class RateLimitOptions(_Model):
    """Everything a `type: rate_limit` middleware accepts (see docs/rate-limiting.md)."""

    limits: tuple[Limit, ...] = ()
    key: Key = Field(default_factory=lambda: (KeyPart(kind="client_ip"),))
    scope: Literal["route", "shared"] = "route"
    in_flight: int = Field(0, ge=0, le=1_000_000, description="concurrent requests per key")
    store: Literal["local", "redis", "hybrid"] = "local"
    redis: str = Field("", description="providers.redis name (redis and hybrid stores)")
    sync_interval: Duration = Field(0.05, ge=0.001, le=10.0, description="hybrid sync period")
    on_redis_error: Literal["fail_open", "fail_closed"] = "fail_open"
    expected_instances: int = Field(
        0, ge=0, le=100_000, description="gateway workers sharing a limit; 0 = this host's"
    )
    headers: Literal["ietf", "legacy", "none"] = "ietf"
    ipv6_prefix: int = Field(64, ge=1, le=128)
    missing_key: Literal["share", "skip"] = "share"
    max_keys: int = Field(1_000_000, ge=1, le=1 << 32)
    message: str = Field("rate limit exceeded", max_length=200)
    dry_run_log_interval: Duration = Field(10.0)

    @model_validator(mode="before")
    @classmethod
    def _one_limit_inline(cls, data: Any) -> Any:
        """`rate`/`per`/`burst`/`cost`/`dry_run`/`name` at the top are one limit."""
        if not isinstance(data, dict):
            return data
        inline = {k: data[k] for k in ("rate", "per", "burst", "cost", "dry_run") if k in data}
        if not inline:
            return data
        if "limits" in data:
            raise ValueError("give either `rate` (one limit) or `limits` (a list), not both")
        rest = {k: v for k, v in data.items() if k not in inline}
        return {**rest, "limits": [inline]}

    @model_validator(mode="after")
    def _consistent(self) -> RateLimitOptions:
        if not self.limits and not self.in_flight:
            raise ValueError("nothing to limit: give `rate`, `limits` or `in_flight`")
        if len(self.limits) > MAX_LIMITS:
            raise ValueError(f"limits: at most {MAX_LIMITS} limits per middleware")
        if not self.key:
            raise ValueError("key: at least one part")
        if len(self.key) > MAX_KEY_PARTS:
            raise ValueError(f"key: at most {MAX_KEY_PARTS} parts")
        if self.store != "local" and not self.redis:
            raise ValueError(f"redis: store {self.store} needs a providers.redis name here")
        names = [lim.name for lim in self.limits if lim.name]
        if len(names) != len(set(names)):
            raise ValueError("limits: limit names must be unique")
        return self

    @property
    def in_c(self) -> bool:
        """Can run as a CoreCheck: local store and every key part read from the head."""
        return self.store == "local" and all(p.in_c for p in self.key)

    def key_words(self) -> str:
        return " and ".join(p.words() for p in self.key)


_FIELDS_IN_REASONS = ("rate", "per", "burst", "cost", "key", "redis", "limits", "name")


def parse_options(options: dict[str, Any]) -> RateLimitOptions:
    """Validate `options`; ConfigError lists every problem with its key path, relative to
    the middleware, as written in the file (`limits[0].rate`, or `rate` for the one-limit
    form)."""
    from fastgate.config.schema import pydantic_errors

    try:
        return RateLimitOptions.model_validate(options)
    except ValidationError as exc:
        inline = isinstance(options, dict) and "limits" not in options
        errors = []
        for path, reason in pydantic_errors(exc, RateLimitOptions):
            # Whole-model checks name their field first in the reason ("cost: ...").
            field, sep, rest = reason.partition(": ")
            if sep and field in _FIELDS_IN_REASONS and not path.endswith(field):
                path, reason = (f"{path}.{field}" if path else field), rest
            if inline and path.startswith("limits[0]"):
                path = path.removeprefix("limits[0]").lstrip(".")
            errors.append((path, reason))
        raise ConfigError.from_errors(errors) from None


# --- words ------------------------------------------------------------------------------------


def describe(
    options: RateLimitOptions, routes: list[str] | tuple[str, ...], workers: int = 1
) -> list[str]:
    """What the limits do, one line each, e.g.
    `100 requests per minute per client IP, bursts up to 20, shared by routes a, b`.
    `workers` is the worker processes per gateway (local counts are per worker)."""
    who = f"per {options.key_words()}"
    if options.scope == "shared":
        where = f"shared by routes {', '.join(routes)}" if routes else "shared (no route uses it)"
    else:
        where = (
            f"counted separately on each route ({', '.join(routes)})"
            if len(routes) > 1
            else (f"on route {routes[0]}" if routes else "no route uses it")
        )
    lines = [f"{lim.words().replace(',', f' {who},', 1)}, {where}" for lim in options.limits]
    if options.in_flight:
        lines.append(f"at most {options.in_flight} requests in flight {who}, {where}")
    if options.store == "local":
        spread = (
            f"; with {workers} workers a client whose connections spread over them may get "
            f"up to {workers}x"
            if workers > 1
            else ""
        )
        lines.append(f"counted in each worker process (store: local{spread})")
    elif options.store == "redis":
        lines.append(
            f"counted in Redis '{options.redis}', one decision per request, pipelined with "
            "the others of the same loop turn (store: redis)"
        )
    else:
        lines.append(
            f"decided in each worker, synced with Redis '{options.redis}' every "
            f"{_number(options.sync_interval * 1000)} ms (store: hybrid)"
        )
    if options.store != "local":
        if options.on_redis_error == "fail_open":
            share = options.expected_instances or workers
            lines.append(
                f"if Redis fails: each worker enforces 1/{share} of each limit locally (fail_open)"
            )
        else:
            lines.append("if Redis fails: requests are refused with 503 (fail_closed)")
    if options.missing_key == "skip":
        lines.append("requests without the key's value are not limited")
    return lines
