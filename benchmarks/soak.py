#!/usr/bin/env python3
"""Soak: fastgate under steady mixed traffic for minutes; is its memory flat, its latency steady?

What runs (everything on 127.0.0.1, in a temp dir removed at the end):
- `fastgate run` with 2 workers (no core pinning: the gateway, the origin, Redis and the load
  generator share the machine), an nginx origin (benchmarks/run.py's `origin.nginx.conf`,
  started with run.py's functions), a redis-server for the `redis` rate-limit store (run.py's
  `RedisServer`), a throwaway CA and server certificate (tls_targets.py) for a TLS entrypoint,
  and the admin listener, whose /metrics is scraped every interval as Prometheus would.
- A load generator in this process (asyncio): every traffic class of `MIX` is sent open-loop at
  its own fixed rate (requests are due at t0 + i/rate whether or not earlier ones finished;
  up to MAX_CONNS connections per class), so a stall of the gateway is not hidden by the
  generator waiting for it (no coordinated omission). Latency runs from the moment the
  generator starts a request (a wait for a free connection included) to the reply's last
  byte. The generator's own lateness against the schedule (timer wake-up: a few ms at p99 on
  a small VM, even idle) is recorded apart, per interval, as `lag_p99_ms`, so it neither
  inflates the gateway's figures nor goes unseen. Connections are kept alive and recycled
  after `REQUESTS_PER_CONN` requests, so connection and TLS set-up and tear-down are part of
  the soak. Every reply is checked: the status the class expects (429 also counts as expected
  for the rate-limited classes, 401 for the credential-less one) and the body byte for byte.
- Every `--interval` seconds: VmRSS (/proc/PID/status) and open descriptors (/proc/PID/fd) of
  the supervisor and each worker (and, for context, the origin and Redis), and per traffic
  class the requests, p50/p99/max latency and error counts of that interval.

Verdict "RSS flat after warm-up": the first half of the run is warm-up; over the second half,
for the supervisor and for each worker, the least-squares slope of RSS must be below
`--max-slope` KiB/min AND max - min below `--max-spread` MiB. A worker that was restarted
(a new pid) fails the verdict. Errors (anything but the expected statuses and bodies) are
reported beside it.

Rules this file obeys:
- The JWT secret and token are made for the run (`secrets`) and never printed or written to
  the report; the report names the classes, not their credentials.
- Only processes this script started are stopped (run.py's `Processes`: by process group id).
- Standard library plus what the project already depends on (PyJWT for the token, trustme or
  cryptography for the certificate, uvloop when importable); matplotlib, when installed
  (`pip install .[bench]`), adds a PNG of RSS and p99 over time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402
from tls_targets import TlsFiles, make_certificates  # noqa: E402

DEFAULT_OUT = HERE / "results"
MIB = 1024 * 1024
UPLOAD_BYTES = MIB  # the origin's client_max_body_size is nginx's default, 1m: exactly fits
REQUESTS_PER_CONN = 100  # then the client closes the connection and opens a new one
REQUEST_TIMEOUT = 15.0  # a reply not complete by then is an error ("timeout")
MAX_PENDING = 500  # due requests of one class waiting for a connection; beyond: "overload"
MAX_CONNS = 32  # connections per traffic class
# The thresholds of the "RSS flat" verdict (CLI defaults; see `rss_verdict`).
MAX_SLOPE_KIB_PER_MIN = 256.0
MAX_SPREAD_MIB = 8.0
# The rate limits, 18/s against the 20/s the rl classes send: ~10% answered 429. The redis
# store is shared by the workers. The local store counts per worker; the generator reuses the
# most recently idle connection first, so at this rate a class's requests ride one
# connection (one worker) at a time and the per-worker limit sees the whole 20/s.
RL_LOCAL_RATE, RL_REDIS_RATE = 18, 18
GATEWAY_ROLES = ("supervisor", "worker")
REPLIED = ("status", "body")  # error kinds of a request that got a reply (and a latency)


@dataclass(frozen=True)
class TrafficClass:
    """One kind of request the generator sends at a fixed rate, and what it must get back."""

    name: str
    rate: float  # requests per second
    host: str  # the Host header, which picks the route
    path: str = "/"
    method: str = "GET"
    tls: bool = False  # to the TLS entrypoint
    auth: bool = False  # with the run's JWT
    upload: int = 0  # request body bytes
    body: str = "small"  # the expected reply body: a key of bench.SIZES
    expect: tuple[int, ...] = (200,)  # the statuses that are not errors
    body_status: int = 200  # the status whose body is checked


MIX: tuple[TrafficClass, ...] = (
    TrafficClass("plain", 80, "plain.soak"),
    TrafficClass("plain-16k", 20, "plain.soak", "/16k.bin", body="16k"),
    TrafficClass("jwt", 40, "jwt.soak", auth=True),
    TrafficClass("jwt-missing", 2, "jwt.soak", expect=(401,), body_status=0),
    TrafficClass("rl-local", 20, "rl-local.soak", expect=(200, 429)),
    TrafficClass("rl-redis", 20, "rl-redis.soak", expect=(200, 429)),
    TrafficClass("tls", 30, "plain.soak", tls=True),
    TrafficClass("download-1m", 2, "plain.soak", "/1m.bin", body="1m"),
    TrafficClass("upload-1m", 2, "upload.soak", method="POST", upload=UPLOAD_BYTES),
)


# --------------------------------------------------------------------------------------------
# The gateway's config


def gateway_config(
    *,
    port: int,
    tls_port: int,
    admin_port: int,
    origin_port: int,
    redis_port: int,
    tls: TlsFiles,
    jwt_secret: str,
    workdir: Path,
    access_log: bool = True,
    workers: int = 2,
) -> dict[str, Any]:
    """The soak gateway: a plain and a TLS entrypoint, one route per traffic host (plain,
    JWT HS256, local and redis rate limits, upload), one service (the origin), the admin
    listener, and the access and audit logs written to files in `workdir`."""

    def route(name: str, middlewares: Sequence[str] = ()) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"hosts": [f"{name}.soak"], "path": "/"},
            "middlewares": list(middlewares),
            "service": "origin",
        }

    def limit(rate: int, store: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "type": "rate_limit",
            "rate": f"{rate}/second",
            "burst": rate,
            "key": "client_ip",
            "store": store,
        }
        if store != "local":
            options["redis"] = "soak"
        return options

    certificate = {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file)}
    return {
        "workers": workers,
        "admin": {"address": f"127.0.0.1:{admin_port}"},
        "entrypoints": {
            "web": {"address": f"127.0.0.1:{port}"},
            "websecure": {
                "address": f"127.0.0.1:{tls_port}",
                "tls": {"certificates": [certificate], "min_version": "1.2"},
            },
        },
        "services": {"origin": {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}},
        "providers": {"redis": {"soak": {"address": f"127.0.0.1:{redis_port}"}}},
        "middlewares": {
            "jwt": {"type": "jwt_auth", "algorithms": ["HS256"], "secret": jwt_secret},
            "rl_local": limit(RL_LOCAL_RATE, "local"),
            "rl_redis": limit(RL_REDIS_RATE, "redis"),
        },
        "routes": [
            route("plain"),
            route("jwt", ["jwt"]),
            route("rl-local", ["rl_local"]),
            route("rl-redis", ["rl_redis"]),
            route("upload"),
        ],
        "access_log": {"enabled": access_log, "path": str(workdir / "access.log")},
        "audit_log": {"path": str(workdir / "audit.log")},
    }


def make_token(secret: str, lifetime: float) -> str:
    """An HS256 token for the `jwt` class, valid for the whole run."""
    import jwt

    now = int(time.time())
    claims = {"sub": "soak-user", "iat": now, "exp": now + int(lifetime), "scope": "soak"}
    return jwt.encode(claims, secret, "HS256")


# --------------------------------------------------------------------------------------------
# Sampling /proc


def status_kib(pid: int, key: str = "VmRSS", proc: Path = Path("/proc")) -> int | None:
    """A `kB` field of /proc/PID/status (VmRSS by default), or None if the process is gone."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    return parse_status_kib(text, key)


def parse_status_kib(text: str, key: str) -> int | None:
    """`VmRSS:	  12345 kB` -> 12345 (None if the line is absent, as for a zombie)."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                return int(parts[0])
            return None
    return None


def fd_count(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Open descriptors of a process (entries of /proc/PID/fd), or None if it is gone."""
    try:
        return len(os.listdir(proc / str(pid) / "fd"))
    except OSError:
        return None


def sample_processes(roles: dict[str, int], gateway_pid: int) -> list[dict[str, Any]]:
    """RSS and descriptors of the gateway's supervisor and every worker (its descendants, found
    by run.py's `process_tree`), and of the processes in `roles` (name -> pid)."""
    procs = [("supervisor", gateway_pid)]
    procs += [("worker", pid) for pid in bench.process_tree(gateway_pid) if pid != gateway_pid]
    procs += list(roles.items())
    out = []
    for role, pid in procs:
        rss, fds = status_kib(pid), fd_count(pid)
        if rss is not None:
            out.append({"role": role, "pid": pid, "rss_kib": rss, "fds": fds})
    return out


# --------------------------------------------------------------------------------------------
# Statistics and the verdict (pure functions over the samples)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0.0 with fewer than 2 distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def rss_series(samples: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, int]]]:
    """(seconds, RSS KiB) per gateway process, keyed `supervisor` or `worker <pid>`."""
    series: dict[str, list[tuple[float, int]]] = {}
    for sample in samples:
        for p in sample["processes"]:
            if p["role"] not in GATEWAY_ROLES:
                continue
            key = "supervisor" if p["role"] == "supervisor" else f"worker {p['pid']}"
            series.setdefault(key, []).append((sample["t"], p["rss_kib"]))
    return series


def rss_verdict(
    points: Sequence[tuple[float, int]],
    duration: float,
    max_slope: float = MAX_SLOPE_KIB_PER_MIN,
    max_spread: float = MAX_SPREAD_MIB,
) -> dict[str, Any]:
    """Is one process's RSS flat after warm-up? Over the samples at t >= duration/2 (the
    first half is warm-up): the least-squares slope (KiB/min) must be < `max_slope` and
    max - min (MiB) < `max_spread`. A process not sampled over the whole second half (a
    restarted worker, or one that died) is not flat. Fewer than 3 samples: no verdict (None)."""
    half = duration / 2
    late = [(t, rss) for t, rss in points if t >= half]
    result: dict[str, Any] = {
        "samples": len(late),
        "first_kib": points[0][1] if points else None,
        "last_kib": points[-1][1] if points else None,
        "max_kib": max((r for _, r in points), default=None),
    }
    if len(late) < 3:
        return {**result, "slope_kib_per_min": None, "spread_mib": None, "flat": None}
    s = slope([t / 60 for t, _ in late], [float(r) for _, r in late])
    spread = (max(r for _, r in late) - min(r for _, r in late)) / 1024
    whole = points[0][0] <= half and late[-1][0] >= duration - 1e-9
    result.update(
        slope_kib_per_min=round(s, 1),
        spread_mib=round(spread, 2),
        covers_second_half=whole,
        flat=bool(s < max_slope and spread < max_spread and whole),
    )
    return result


def summarize(
    samples: Sequence[dict[str, Any]],
    duration: float,
    max_slope: float = MAX_SLOPE_KIB_PER_MIN,
    max_spread: float = MAX_SPREAD_MIB,
) -> dict[str, Any]:
    """The report's summary: the RSS verdict of every gateway process, descriptors, and per
    traffic class the requests, statuses, errors and the worst interval p99."""
    processes = {
        key: rss_verdict(points, duration, max_slope, max_spread)
        for key, points in rss_series(samples).items()
    }
    fds: dict[str, dict[str, int]] = {}
    for sample in samples:
        for p in sample["processes"]:
            key = p["role"] if p["role"] != "worker" else f"worker {p['pid']}"
            if p.get("fds") is None:
                continue
            entry = fds.setdefault(key, {"first": p["fds"], "min": p["fds"], "max": p["fds"]})
            entry["min"], entry["max"] = min(entry["min"], p["fds"]), max(entry["max"], p["fds"])
            entry["last"] = p["fds"]
    classes: dict[str, dict[str, Any]] = {}
    for sample in samples:
        for name, t in sample["traffic"].items():
            c = classes.setdefault(
                name, {"requests": 0, "statuses": Counter(), "errors": Counter(), "p99_ms": []}
            )
            c["requests"] += t["requests"]
            c["statuses"].update(t["statuses"])
            c["errors"].update(t["errors"])
            if t["p99_ms"] is not None:
                c["p99_ms"].append(t["p99_ms"])
    traffic = {
        name: {
            "requests": c["requests"],
            "statuses": dict(sorted(c["statuses"].items())),
            "errors": dict(sorted(c["errors"].items())),
            "worst_interval_p99_ms": max(c["p99_ms"], default=None),
            "median_interval_p99_ms": percentile(c["p99_ms"], 50),
        }
        for name, c in classes.items()
    }
    errors = sum(sum(c["errors"].values()) for c in traffic.values())
    verdicts = [v["flat"] for v in processes.values()]
    flat = bool(verdicts) and all(v is True for v in verdicts)
    workers = [k for k in processes if k.startswith("worker ")]
    return {
        "rss_flat": flat if all(v is not None for v in verdicts) else None,
        "thresholds": {"max_slope_kib_per_min": max_slope, "max_spread_mib": max_spread},
        "processes": processes,
        "fds": fds,
        "worker_pids_seen": len(workers),
        "requests": sum(c["requests"] for c in traffic.values()),
        "errors": errors,
        "traffic": traffic,
    }


# --------------------------------------------------------------------------------------------
# Report


def fmt_ms(value: float | None) -> str:
    """Milliseconds with 2 significant-ish decimals, or an en dash."""
    if value is None:
        return "\u2013"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The human report: verdict, RSS per process, descriptors, traffic, intervals."""
    s, cfg = report["summary"], report["config"]
    th = s["thresholds"]
    verdict = {True: "**RSS flat after warm-up**", False: "**RSS NOT flat**", None: "no verdict"}
    lines = [
        f"# fastgate soak — {report['timestamp']}",
        "",
        f"{cfg['minutes']} min, {cfg['workers']} workers, sampled every {cfg['interval']} s; "
        f"offered load {cfg['offered_rps']:.0f} req/s in {len(cfg['mix'])} classes "
        f"(commit {report['machine'].get('git_commit') or '?'}"
        f"{', dirty' if report['machine'].get('git_dirty') else ''}).",
        "",
        f"Verdict: {verdict[s['rss_flat']]} — over the second half of the run (the first half "
        f"is warm-up), every gateway process's RSS slope < {th['max_slope_kib_per_min']:g} "
        f"KiB/min and max - min < {th['max_spread_mib']:g} MiB, no worker restarted. "
        f"Requests {s['requests']:,}, errors {s['errors']:,}.",
        "",
        "| process | RSS first | RSS last | RSS max | 2nd-half slope KiB/min | "
        "2nd-half max-min MiB | fds min-max | flat |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, v in s["processes"].items():
        fd = s["fds"].get(key, {})
        flat = {True: "yes", False: "**no**", None: "\u2013"}[v["flat"]]
        lines.append(
            f"| {key} | {_mib(v['first_kib'])} | {_mib(v['last_kib'])} | {_mib(v['max_kib'])} "
            f"| {_num(v['slope_kib_per_min'])} | {_num(v['spread_mib'])} "
            f"| {fd.get('min', '?')}-{fd.get('max', '?')} | {flat} |"
        )
    lines += [
        "",
        "| class | rate/s | requests | statuses | errors | median interval p99 ms | "
        "worst interval p99 ms |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    rates = {c["name"]: c["rate"] for c in cfg["mix"]}
    for name, t in s["traffic"].items():
        statuses = ", ".join(f"{k}: {v:,}" for k, v in t["statuses"].items()) or "\u2013"
        errors = ", ".join(f"{k}: {v:,}" for k, v in t["errors"].items()) or "0"
        lines.append(
            f"| {name} | {rates.get(name, 0):g} | {t['requests']:,} | {statuses} | {errors} "
            f"| {fmt_ms(t['median_interval_p99_ms'])} | {fmt_ms(t['worst_interval_p99_ms'])} |"
        )
    lines += [
        "",
        "Per interval (all classes; RSS in MiB):",
        "",
        "| t s | requests | errors | p50 ms | p99 ms | max ms | gen lag p99 ms | supervisor RSS "
        "| workers RSS | workers fds | load 1m |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for sample in report["samples"]:
        a = sample["all"]
        sup = [p for p in sample["processes"] if p["role"] == "supervisor"]
        workers = [p for p in sample["processes"] if p["role"] == "worker"]
        lines.append(
            f"| {sample['t']:.0f} | {a['requests']:,} | {a['errors']} | {fmt_ms(a['p50_ms'])} "
            f"| {fmt_ms(a['p99_ms'])} | {fmt_ms(a['max_ms'])} | {fmt_ms(a.get('lag_p99_ms'))} "
            f"| {_mib(sup[0]['rss_kib']) if sup else '?'} "
            f"| {' / '.join(_mib(p['rss_kib']) for p in workers)} "
            f"| {' / '.join(str(p['fds']) for p in workers)} | {sample.get('loadavg_1m', 0):.2f} |"
        )
    lines += [
        "",
        "Open loop at a fixed rate per class: a request is sent when it is due, whether or not "
        "earlier ones were answered, so a stall of the gateway shows in p99 instead of being "
        "hidden. Latency runs from the request's start (a wait for a free connection included) "
        "to the reply's last byte; `gen lag` is the generator's own lateness against its "
        "schedule (p99 of the interval), kept out of the latency. Errors are "
        "anything but the statuses a class expects (429 counts as expected for the rate-limited "
        "classes, 401 for `jwt-missing`) and a body that differs from the origin's.",
    ]
    return "\n".join(lines)


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f}"


def _num(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:g}"


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """A PNG of each gateway process's RSS and the interval p99 over time, if matplotlib is
    installed (False otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_rss, ax_p99) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for key, points in rss_series(report["samples"]).items():
        ax_rss.plot([t / 60 for t, _ in points], [r / 1024 for _, r in points], label=key)
    half = report["config"]["minutes"] / 2
    ax_rss.axvline(half, color="grey", linestyle=":", label="end of warm-up")
    ax_rss.set_ylabel("RSS MiB")
    ax_rss.legend(fontsize="small")
    names = sorted({n for s in report["samples"] for n in s["traffic"]})
    for name in ["all", *names]:
        xs, ys = [], []
        for s in report["samples"]:
            t = s["all"] if name == "all" else s["traffic"].get(name)
            if t and t["p99_ms"] is not None:
                xs.append(s["t"] / 60)
                ys.append(t["p99_ms"])
        ax_p99.plot(xs, ys, label=name, linewidth=2.0 if name == "all" else 0.8)
    ax_p99.set_yscale("log")
    ax_p99.set_ylabel("p99 ms per interval")
    ax_p99.set_xlabel("minutes")
    ax_p99.legend(fontsize="x-small", ncol=3)
    fig.suptitle(f"fastgate soak {report['timestamp']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_results(out: Path, stamp: str, report: dict[str, Any]) -> list[Path]:
    """results/soak-<stamp>.json, .md and (with matplotlib) .png; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"soak-{stamp}"
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    if write_plot(report, base.with_suffix(".png")):
        paths.append(base.with_suffix(".png"))
    return paths


# --------------------------------------------------------------------------------------------
# The load generator


@dataclass
class Bucket:
    """What one traffic class got in one interval."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lags_ms: list[float] = field(default_factory=list)  # how late the generator started each

    def as_dict(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            # Replies (each has a latency) plus requests that got none.
            "requests": len(lat) + sum(v for k, v in self.errors.items() if k not in REPLIED),
            "p50_ms": _round(percentile(lat, 50)),
            "p99_ms": _round(percentile(lat, 99)),
            "max_ms": _round(max(lat, default=None)),
            "lag_p99_ms": _round(percentile(self.lags_ms, 99)),
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class HttpError(Exception):
    """A reply the client could not read as HTTP/1.1."""


@dataclass
class Conn:
    """One client connection and how many requests it carried."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used: int = 0

    def close(self) -> None:
        self.writer.close()


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server closes) of one HTTP/1.1 reply (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"bad status line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    closes = headers.get("connection", "").lower() == "close"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return int(parts[1]), b"".join(chunks), closes
    length = int(headers.get("content-length", "0"))
    return int(parts[1]), await reader.readexactly(length), closes


class LoadGen:
    """Open-loop traffic at fixed rates per class, with a pool of keep-alive connections each."""

    def __init__(
        self,
        mix: Sequence[TrafficClass],
        ports: dict[bool, int],
        bodies: dict[str, bytes],
        ssl_context: ssl.SSLContext,
        token: str,
    ) -> None:
        self.mix = mix
        self.ports = ports  # tls? -> port
        self.bodies = bodies
        self.ssl_context = ssl_context
        self.upload = b"u" * max((c.upload for c in mix), default=0)
        self.requests = {c.name: self._request(c, token) for c in mix}
        self.idle: dict[str, list[Conn]] = {c.name: [] for c in mix}
        self.slots = {c.name: asyncio.Semaphore(MAX_CONNS) for c in mix}
        self.pending: dict[str, set[asyncio.Task[None]]] = {c.name: set() for c in mix}
        self.buckets: dict[str, Bucket] = {c.name: Bucket() for c in mix}

    def _request(self, c: TrafficClass, token: str) -> bytes:
        lines = [f"{c.method} {c.path} HTTP/1.1", f"Host: {c.host}", "User-Agent: fastgate-soak"]
        if c.auth:
            lines.append(f"Authorization: Bearer {token}")
        if c.upload:
            lines += ["Content-Type: application/octet-stream", f"Content-Length: {c.upload}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def take(self) -> dict[str, dict[str, Any]]:
        """This interval's figures per class (and start the next interval)."""
        buckets, self.buckets = self.buckets, {c.name: Bucket() for c in self.mix}
        return {name: b.as_dict() for name, b in buckets.items()}

    async def run(self, seconds: float) -> None:
        """Send every class at its rate for `seconds`, then wait for the last replies."""
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(self._class(c, stop_at) for c in self.mix))
        tasks = [t for ts in self.pending.values() for t in ts]
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 5)
        for conns in self.idle.values():
            for conn in conns:
                conn.close()

    async def _class(self, c: TrafficClass, stop_at: float) -> None:
        t0, i = time.monotonic(), 0
        pending = self.pending[c.name]
        while (due := t0 + i / c.rate) < stop_at:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            i += 1
            if len(pending) >= MAX_PENDING:
                self.buckets[c.name].errors["overload"] += 1
                continue
            task = asyncio.create_task(self._one(c, due))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _one(self, c: TrafficClass, due: float) -> None:
        start = time.monotonic()
        self.buckets[c.name].lags_ms.append((start - due) * 1000)
        async with self.slots[c.name]:
            held: list[Conn] = []  # the connection, once there is one, to close on failure
            try:
                status, body, closes = await asyncio.wait_for(
                    self._exchange(c, held), REQUEST_TIMEOUT
                )
            except asyncio.TimeoutError:
                self._fail(c, held, "timeout")
                return
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
                self._fail(c, held, type(exc).__name__)
                return
            except (HttpError, ValueError, asyncio.LimitOverrunError):
                self._fail(c, held, "bad reply")
                return
            conn = held[0]
            bucket = self.buckets[c.name]
            bucket.latencies_ms.append((time.monotonic() - start) * 1000)
            bucket.statuses[str(status)] += 1
            if status not in c.expect:
                bucket.errors["status"] += 1
            elif status == c.body_status and body != self.bodies[c.body]:
                bucket.errors["body"] += 1
            if closes or conn.used >= REQUESTS_PER_CONN:
                conn.close()
            else:
                self.idle[c.name].append(conn)

    async def _exchange(self, c: TrafficClass, held: list[Conn]) -> tuple[int, bytes, bool]:
        conn = await self._connect(c)
        held.append(conn)
        conn.used += 1
        conn.writer.write(self.requests[c.name])
        if c.upload:
            conn.writer.write(self.upload[: c.upload])
        await conn.writer.drain()
        return await read_reply(conn.reader)

    def _fail(self, c: TrafficClass, held: list[Conn], kind: str) -> None:
        self.buckets[c.name].errors[kind] += 1
        for conn in held:
            conn.close()

    async def _connect(self, c: TrafficClass) -> Conn:
        idle = self.idle[c.name]
        if idle:
            return idle.pop()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            self.ports[c.tls],
            ssl=self.ssl_context if c.tls else None,
            server_hostname="127.0.0.1" if c.tls else None,
            limit=4 * MIB,
        )
        return Conn(reader, writer)


def merge_all(traffic: dict[str, dict[str, Any]], raw: Iterable[Bucket]) -> dict[str, Any]:
    """The interval's figures over every class (percentiles of the pooled latencies)."""
    pooled = Bucket()
    for b in raw:
        pooled.latencies_ms += b.latencies_ms
        pooled.lags_ms += b.lags_ms
        pooled.errors.update(b.errors)
        pooled.statuses.update(b.statuses)
    d = pooled.as_dict()
    d["errors"] = sum(pooled.errors.values())
    d["requests"] = sum(t["requests"] for t in traffic.values())
    return d


# --------------------------------------------------------------------------------------------
# The run


def scrape_metrics(admin_port: int) -> int | None:
    """GET /metrics on the admin listener (as Prometheus would); its status, None on error."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


async def soak(
    load: LoadGen,
    seconds: float,
    interval: float,
    gateway_pid: int,
    others: dict[str, int],
    admin_port: int,
    progress: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Run the load for `seconds`, sampling every `interval`; the samples."""
    loop = asyncio.get_running_loop()
    samples: list[dict[str, Any]] = []
    t0 = loop.time()
    runner = asyncio.create_task(load.run(seconds))
    tick = 1
    while not runner.done():
        due = t0 + tick * interval
        if due > t0 + seconds + 1e-6:
            break
        await asyncio.sleep(max(0.0, due - loop.time()))
        raw = list(load.buckets.values())
        traffic = load.take()
        procs = await loop.run_in_executor(None, sample_processes, others, gateway_pid)
        metrics = await loop.run_in_executor(None, scrape_metrics, admin_port)
        sample = {
            "t": round(loop.time() - t0, 2),
            "processes": procs,
            "traffic": traffic,
            "all": merge_all(traffic, raw),
            "metrics_status": metrics,
            "loadavg_1m": os.getloadavg()[0],  # the machine's, others' processes included
        }
        samples.append(sample)
        progress(sample)
        tick += 1
    await runner
    return samples


def progress_line(sample: dict[str, Any]) -> str:
    """One console line per interval."""
    a = sample["all"]
    rss = " ".join(
        f"{p['role'][0]}{p['pid']}={p['rss_kib'] / 1024:.1f}M/{p['fds']}fd"
        for p in sample["processes"]
        if p["role"] in GATEWAY_ROLES
    )
    return (
        f"t={sample['t']:>6.0f}s req={a['requests']:>6} err={a['errors']:<3} "
        f"p50={fmt_ms(a['p50_ms']):>6}ms p99={fmt_ms(a['p99_ms']):>7}ms  {rss}"
    )


def check_config(path: Path) -> None:
    """`fastgate check -c path` must accept the generated config."""
    done = subprocess.run(
        [sys.executable, "-m", "fastgate", "check", "-c", str(path)],
        capture_output=True, text=True, cwd=bench.REPO, env=bench.fastgate_env(), timeout=60,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise bench.BenchError(f"fastgate check refused the soak config:\n{done.stderr}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Soak fastgate with mixed traffic; is RSS flat? (benchmarks/README.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    ap.add_argument("--rate-scale", type=float, default=1.0, help="multiply every class's rate")
    ap.add_argument("--max-slope", type=float, default=MAX_SLOPE_KIB_PER_MIN,
                    help="RSS verdict: second-half slope limit, KiB/min")  # fmt: skip
    ap.add_argument("--max-spread", type=float, default=MAX_SPREAD_MIB,
                    help="RSS verdict: second-half max - min limit, MiB")  # fmt: skip
    ap.add_argument("--classes", default=",".join(c.name for c in MIX),
                    help="the traffic classes sent (comma-separated)")  # fmt: skip
    ap.add_argument("--no-access-log", action="store_true", help="run without the access log")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the results")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.rate_scale <= 0 or args.workers < 1:
        ap.error("--minutes, --interval, --rate-scale must be > 0 and --workers >= 1")
    args.classes = [n.strip() for n in args.classes.split(",") if n.strip()]
    if not args.classes or set(args.classes) - {c.name for c in MIX}:
        ap.error(f"--classes: some of {','.join(c.name for c in MIX)}")
    if args.minutes * 60 < 3 * args.interval:
        ap.error("the run must hold at least 3 intervals")
    return args


def scaled_mix(scale: float, names: Sequence[str] | None = None) -> tuple[TrafficClass, ...]:
    """The classes of MIX named in `names` (all by default), every rate times `scale`."""
    return tuple(
        dataclasses.replace(c, rate=c.rate * scale) for c in MIX if names is None or c.name in names
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Start the origin, Redis and the gateway, soak, write the report."""
    args = parse_args(argv)
    mix = scaled_mix(args.rate_scale, args.classes)
    seconds = args.minutes * 60
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bench._raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="fastgate-soak-"))
    procs = bench.Processes(workdir)
    redis = None
    try:
        for prog in ("nginx", "redis-server", "taskset"):
            if not shutil.which(prog):
                raise bench.BenchError(f"missing program: {prog}")
        bench.raise_fd_limit()
        machine = bench.machine_info(["fastgate", "fastgate-rl-redis"])
        bodies = bench.make_www(workdir / "www")
        origin = bench.start_nginx(
            procs, "origin", "origin.nginx.conf", bench.LOAD_CORE,
            {"port": bench.free_port(), "www": workdir / "www"},
        )  # fmt: skip
        redis = bench.RedisServer(procs, "soak")
        tls = make_certificates(workdir / "tls")
        secret = secrets.token_urlsafe(48)
        port, tls_port, admin_port = bench.free_port(), bench.free_port(), bench.free_port()
        config = gateway_config(
            port=port, tls_port=tls_port, admin_port=admin_port, origin_port=origin.port,
            redis_port=redis.port, tls=tls, jwt_secret=secret, workdir=workdir,
            access_log=not args.no_access_log, workers=args.workers,
        )  # fmt: skip
        path = workdir / "soak.yaml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the secret
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        check_config(path)
        argv_gw = [sys.executable, "-m", "fastgate", "run", "-c", str(path)]
        gw, gw_log = procs.start("gateway", argv_gw, cwd=bench.REPO, env=bench.fastgate_env())
        for p in (port, tls_port, admin_port):
            bench.wait_for_port("gateway", p, gw, [gw_log], bench.STARTUP_TIMEOUT)
        time.sleep(1.0)  # let every worker bind before the first connections
        ctx = ssl.create_default_context(cafile=str(tls.ca_file))
        token = make_token(secret, seconds + 3600)
        others = {"origin": origin.proc.pid, "redis": redis.proc.pid}
        print(f"soak: {args.minutes:g} min, {sum(c.rate for c in mix):.0f} req/s offered")

        async def go() -> list[dict[str, Any]]:
            load = LoadGen(mix, {False: port, True: tls_port}, bodies, ctx, token)
            return await soak(
                load, seconds, args.interval, gw.pid, others, admin_port,
                lambda s: print(progress_line(s), flush=True),
            )  # fmt: skip

        samples = run_loop(go())
        if gw.poll() is not None:
            raise bench.BenchError(f"the gateway exited:\n{bench.tail(gw_log)}")
    except bench.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: processes stopped, no results written", file=sys.stderr)
        return 130
    finally:
        if redis is not None:
            redis.close()
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarize(samples, seconds, args.max_slope, args.max_spread)
    report = {
        "schema": 1,
        "timestamp": started.isoformat(timespec="seconds"),
        "machine": machine,
        "config": {
            "minutes": args.minutes,
            "interval": args.interval,
            "workers": args.workers,
            "access_log": not args.no_access_log,
            "offered_rps": sum(c.rate for c in mix),
            "requests_per_conn": REQUESTS_PER_CONN,
            "rate_limits": {"local_per_worker": RL_LOCAL_RATE, "redis": RL_REDIS_RATE},
            "mix": [{**dataclasses.asdict(c), "expect": list(c.expect)} for c in mix],
        },
        "summary": summary,
        "samples": samples,
    }
    written = write_results(args.out, stamp, report)
    print()
    print(markdown(report))
    print("written: " + ", ".join(str(p) for p in written))
    return 0 if summary["rss_flat"] and summary["errors"] == 0 else 1


def run_loop(coro: Any) -> Any:
    """Run on uvloop when importable (as the gateway does), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
