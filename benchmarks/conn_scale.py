#!/usr/bin/env python3
"""Connection scale: what one idle keep-alive client connection costs a fastgate worker.

What runs (everything on 127.0.0.1, in a temp dir removed at the end):
- an nginx origin (benchmarks/run.py's `origin.nginx.conf`, started with run.py's functions);
- `fastgate run` with ONE worker, `timeouts.idle` of an hour (no idle connection is closed
  during the run), no connection cap, the admin listener off;
- a client in this process (asyncio, uvloop when importable) that opens connections in steps
  up to `--steps` (default 1,000, 5,000, 10,000 in all), `--concurrency` at a time; each
  connection sends one `GET /` and must get `200` with the origin's body and stay open
  (keep-alive), then stays idle.

Measured: the worker's VmRSS (/proc/PID/status) and open descriptors (/proc/PID/fd) before
the first connection (after a warm-up) and after each step once the worker is quiet
(`--settle` seconds); the supervisor's RSS beside it. Reported: the least-squares slope of
the worker's RSS over the number of open connections, in bytes per idle connection, and each
step's own increment. Proof that one worker served them all: the gateway's process tree has
exactly one worker, every connection got its 200, the worker holds at least that many
descriptors, and at the end every connection is asked a second time and must answer 200 again
(it was kept open, not silently closed).

Rules this file obeys:
- The open-file limit is raised to the hard limit (the gateway inherits it); a step that
  cannot fit in it is refused before anything starts.
- Only processes this script started are stopped (run.py's `Processes`: by process group id).
- Standard library plus uvloop when importable.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402
from soak import fd_count, read_reply, run_loop, slope, status_kib  # noqa: E402

DEFAULT_OUT = HERE / "results"
DEFAULT_STEPS = (1000, 5000, 10000)
IDLE_TIMEOUT = 3600.0
FD_HEADROOM = 200  # descriptors beyond the connections: the gateway's own, ours, the origin's
REQUEST = b"GET / HTTP/1.1\r\nHost: scale.local\r\nUser-Agent: fastgate-conn-scale\r\n\r\n"
CONNECT_TIMEOUT = 30.0


def gateway_config(port: int, origin_port: int) -> dict[str, Any]:
    """One worker, one entrypoint, one route to the origin; idle connections kept an hour."""
    return {
        "workers": 1,
        "admin": {"enabled": False},
        "timeouts": {"idle": IDLE_TIMEOUT},
        "entrypoints": {"web": {"address": f"127.0.0.1:{port}", "backlog": 4096}},
        "services": {"origin": {"servers": [{"url": f"http://127.0.0.1:{origin_port}"}]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "service": "origin"}],
    }


def bytes_per_connection(points: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """From (open connections, worker RSS KiB) points, the first at 0: the least-squares
    bytes per connection, and each step's own (RSS increase / connections added)."""
    fit = slope([float(n) for n, _ in points], [float(r) for _, r in points]) * 1024
    steps = []
    for (n0, r0), (n1, r1) in itertools.pairwise(points):
        per = (r1 - r0) * 1024 / (n1 - n0) if n1 != n0 else None
        steps.append({"from": n0, "to": n1, "bytes_per_conn": None if per is None else round(per)})
    return {"bytes_per_conn": round(fit), "steps": steps}


class Clients:
    """The idle client connections, opened and asked in batches of `concurrency`."""

    def __init__(self, port: int, body: bytes, concurrency: int) -> None:
        self.port = port
        self.body = body
        self.sem = asyncio.Semaphore(concurrency)
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.outcomes: Counter[str] = Counter()

    async def _ask(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        writer.write(REQUEST)
        await writer.drain()
        status, body, closes = await read_reply(reader)
        if status != 200:
            return str(status)
        if body != self.body:
            return "body differs"
        return "closed by gateway" if closes else "200"

    async def _open_one(self) -> str:
        async with self.sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError) as exc:
                return f"connect {type(exc).__name__}"
            try:
                outcome = await asyncio.wait_for(self._ask(reader, writer), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                outcome = f"request {type(e).__name__}"
            if outcome == "200":
                self.conns.append((reader, writer))
            else:
                writer.close()
            return outcome

    async def open(self, count: int) -> Counter[str]:
        """Open `count` more connections, one GET / each; the outcomes (`200` = kept)."""
        results = await asyncio.gather(*(self._open_one() for _ in range(count)))
        got = Counter(results)
        self.outcomes.update(got)
        return got

    async def ask_all_again(self) -> Counter[str]:
        """A second GET / on every open connection: each must still answer 200."""

        async def again(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
            async with self.sem:
                try:
                    return await asyncio.wait_for(self._ask(reader, writer), CONNECT_TIMEOUT)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                    return f"request {type(exc).__name__}"

        return Counter(await asyncio.gather(*(again(r, w) for r, w in self.conns)))

    def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns.clear()


def measure(worker: int, supervisor: int, settle: float) -> dict[str, Any]:
    """After `settle` seconds: the worker's and the supervisor's RSS and the worker's fds."""
    time.sleep(settle)
    return {
        "worker_rss_kib": status_kib(worker),
        "worker_fds": fd_count(worker),
        "supervisor_rss_kib": status_kib(supervisor),
    }


def markdown(report: dict[str, Any]) -> str:
    """The human report: per step RSS and fds, the bytes per idle connection, the proof."""
    r, fit = report["result"], report["result"]["fit"]
    lines = [
        f"# fastgate idle keep-alive connections — {report['timestamp']}",
        "",
        f"One worker (`workers: 1`, `timeouts.idle: {IDLE_TIMEOUT:g}`), connections opened "
        f"{report['config']['concurrency']} at a time; each sent one `GET /` (200, 12 B body, "
        "kept alive) and then stayed idle. RSS measured after "
        f"{report['config']['settle']} s of quiet (commit "
        f"{report['machine'].get('git_commit') or '?'}).",
        "",
        f"**{fit['bytes_per_conn']:,} bytes per idle connection** (least-squares slope of the "
        f"worker's RSS over open connections, {len(report['steps'])} steps from 0).",
        "",
        "| open connections | worker RSS MiB | worker fds | fds - connections | "
        "supervisor RSS MiB | this step: bytes/conn | outcomes |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    per_step = {s["to"]: s["bytes_per_conn"] for s in fit["steps"]}
    for step in report["steps"]:
        outcomes = ", ".join(f"{k}: {v:,}" for k, v in step.get("outcomes", {}).items())
        per = per_step.get(step["open"])
        lines.append(
            f"| {step['open']:,} | {step['worker_rss_kib'] / 1024:.1f} | {step['worker_fds']} "
            f"| {step['worker_fds'] - step['open']} | {step['supervisor_rss_kib'] / 1024:.1f} "
            f"| {'' if per is None else f'{per:,}'} | {outcomes or '(baseline)'} |"
        )
    lines += [
        "",
        f"Served by one worker: {'**yes**' if r['one_worker_served_all'] else '**NO**'} — "
        f"workers in the gateway's process tree: {r['workers_seen']}; connections that got "
        f"200: {r['served']:,} of {r['asked']:,}; worker descriptors at the top step: "
        f"{r['worker_fds_at_top']:,}; a second `GET /` on every open connection at the end: "
        + ", ".join(f"{k}: {v:,}" for k, v in r["second_round"].items())
        + ".",
        "",
        "`fds - connections` is what the worker holds besides the client connections: its own "
        "files and sockets and the pooled upstream connections (up to `pool.max_idle`, opened "
        "while the first step's requests ran concurrently). It stays put after the first step, "
        "so the later steps' RSS is the idle client connections' alone.",
    ]
    return "\n".join(lines)


def write_results(out: Path, stamp: str, report: dict[str, Any]) -> list[Path]:
    """results/conn-scale-<stamp>.json and .md; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"conn-scale-{stamp}"
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    return paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Memory per idle keep-alive connection of one fastgate worker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                    help="total open connections after each step (increasing)")  # fmt: skip
    ap.add_argument("--concurrency", type=int, default=200, help="connections opened at once")
    ap.add_argument("--settle", type=float, default=3.0, help="quiet seconds before measuring")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the results")
    args = ap.parse_args(argv)
    try:
        args.steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        ap.error("--steps: integers, comma-separated")
    if not args.steps or args.steps != sorted(set(args.steps)) or args.steps[0] < 1:
        ap.error("--steps: increasing positive integers")
    if args.concurrency < 1 or args.settle < 0:
        ap.error("--concurrency >= 1, --settle >= 0")
    return args


def check_fd_limit(top: int) -> None:
    """Raise RLIMIT_NOFILE to the hard limit; refuse a top step that cannot fit in it."""
    bench.raise_fd_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if top + FD_HEADROOM > soft:
        raise bench.BenchError(
            f"{top:,} connections need about {top + FD_HEADROOM:,} descriptors per process; "
            f"the limit is {soft:,} (raise it: ulimit -n)"
        )


async def scale(
    port: int, body: bytes, steps: Sequence[int], concurrency: int, settle: float, pids: list[int]
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Warm up, measure the baseline, open connections step by step measuring after each,
    then ask every connection again."""
    loop = asyncio.get_running_loop()
    supervisor, worker = pids
    warm = Clients(port, body, concurrency)
    await warm.open(50)
    warm.close()
    clients = Clients(port, body, concurrency)
    base = await loop.run_in_executor(None, measure, worker, supervisor, settle)
    results = [{"open": 0, **base}]
    print(f"baseline: worker RSS {base['worker_rss_kib'] / 1024:.1f} MiB, fds {base['worker_fds']}")
    for target in steps:
        got = await clients.open(target - len(clients.conns))
        m = await loop.run_in_executor(None, measure, worker, supervisor, settle)
        results.append({"open": len(clients.conns), "target": target, **m, "outcomes": dict(got)})
        print(
            f"{len(clients.conns):>6} open: worker RSS {m['worker_rss_kib'] / 1024:.1f} MiB, "
            f"fds {m['worker_fds']}, outcomes {dict(got)}",
            flush=True,
        )
    again = await clients.ask_all_again()
    print(f"second GET / on every connection: {dict(again)}")
    clients.close()
    return results, again


def main(argv: Sequence[str] | None = None) -> int:
    """Start the origin and a 1-worker gateway, open the connections, write the report."""
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bench._raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="fastgate-conn-scale-"))
    procs = bench.Processes(workdir)
    try:
        if not shutil.which("nginx") or not shutil.which("taskset"):
            raise bench.BenchError("missing program: nginx or taskset")
        check_fd_limit(args.steps[-1])
        machine = bench.machine_info(["fastgate"])
        bodies = bench.make_www(workdir / "www")
        origin = bench.start_nginx(
            procs, "origin", "origin.nginx.conf", bench.LOAD_CORE,
            {"port": bench.free_port(), "www": workdir / "www"},
        )  # fmt: skip
        port = bench.free_port()
        path = workdir / "conn-scale.yaml"
        path.write_text(json.dumps(gateway_config(port, origin.port), indent=2) + "\n")
        argv_gw = [sys.executable, "-m", "fastgate", "run", "-c", str(path)]
        gw, log = procs.start("gateway", argv_gw, cwd=bench.REPO, env=bench.fastgate_env())
        bench.wait_for_port("gateway", port, gw, [log], bench.STARTUP_TIMEOUT)
        time.sleep(1.0)
        workers = [p for p in bench.process_tree(gw.pid) if p != gw.pid]
        if len(workers) != 1:
            raise bench.BenchError(f"expected one worker process, found {len(workers)}")

        async def go() -> tuple[list[dict[str, Any]], Counter[str]]:
            return await scale(
                port, bodies["small"], args.steps, args.concurrency, args.settle,
                [gw.pid, workers[0]],
            )  # fmt: skip

        steps, again = run_loop(go())
        workers_after = [p for p in bench.process_tree(gw.pid) if p != gw.pid]
        if gw.poll() is not None:
            raise bench.BenchError(f"the gateway exited:\n{bench.tail(log)}")
    except bench.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: processes stopped, no results written", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    top = steps[-1]
    served = sum(s["outcomes"].get("200", 0) for s in steps[1:])
    asked = sum(sum(s["outcomes"].values()) for s in steps[1:])
    one_worker = (
        workers_after == workers
        and served == asked == top["open"] == args.steps[-1]
        and (top["worker_fds"] or 0) >= top["open"]
        and again == Counter({"200": top["open"]})
    )
    report = {
        "schema": 1,
        "timestamp": started.isoformat(timespec="seconds"),
        "machine": machine,
        "config": {
            "steps": args.steps,
            "concurrency": args.concurrency,
            "settle": args.settle,
            "idle_timeout": IDLE_TIMEOUT,
            "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        },
        "steps": steps,
        "result": {
            "fit": bytes_per_connection([(s["open"], s["worker_rss_kib"]) for s in steps]),
            "workers_seen": len(workers_after),
            "served": served,
            "asked": asked,
            "worker_fds_at_top": top["worker_fds"],
            "second_round": dict(again),
            "one_worker_served_all": one_worker,
        },
    }
    written = write_results(args.out, stamp, report)
    print()
    print(markdown(report))
    print("written: " + ", ".join(str(p) for p in written))
    return 0 if one_worker else 1


if __name__ == "__main__":
    sys.exit(main())
