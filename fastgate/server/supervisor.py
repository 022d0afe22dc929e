"""The supervisor: validates config, runs N worker processes, reloads, drains, restarts.

Workers are separate Python processes (`fastgate.server.worker.main`) rather than forks
of this one: the supervisor runs an asyncio loop, and a fork from inside a running loop would
leave the child with the parent's loop state. Each worker binds its listeners with
SO_REUSEPORT, so the kernel spreads connections across them and the supervisor never touches
client traffic. The pipes and status words are described in worker.py.

Reload (SIGHUP, or the config file changing on disk; the file's mtime, size and inode are
polled every second): the new config is loaded, validated and compiled once here, and new
listen addresses are test-bound, before any worker sees it. A bad config is refused with every
problem logged by key path; `/readyz` shows `last_reload: "refused: ..."`, and the workers keep
the running generation. A good one gets the next generation number and is sent to every
worker, which swaps it in and reports the generation it serves (`/readyz` `workers_current`).
A file change that leaves the config equal to the running one is not a new generation; a
SIGHUP always is. The certificate, key, CA and CRL files that TLS entrypoints name are polled
the same way: a change to one of them reloads (a new generation even though the config text
is the same), so renewed certificates are picked up without a restart; a broken one is
refused like a bad config and the running certificates keep serving.

Stop (SIGTERM or SIGINT): `/readyz` turns 503, workers get SIGTERM and drain (drain_timeout),
a worker still running `drain_timeout + KILL_GRACE` seconds later is killed, then the admin
listener and the demo origin close and the process exits 0.

Logs (docs/logging.md): SIGUSR1 is forwarded to every worker, which reopens its log files
(logrotate renames a file, then signals the supervisor). The supervisor itself writes its own
messages to stderr and has nothing to reopen. A worker's stdout is the status pipe, so the
supervisor hands each worker a duplicate of its own stdout (`stdout_fd` in the start
message, passed with pass_fds) for the logs whose path is "-". Workers ignore SIGUSR1 from
their first statement on (WORKER_CODE), until their handler is installed, so a rotation
while a worker starts cannot kill it; a worker younger than USR1_SETTLE gets the signal again
once it is that old (it may have opened the file just before the rename).

Metrics (DESIGN.md §6): each worker gets a slot number (the lowest free one; a restarted
worker takes its predecessor's) and the path of its slot file in the start message; it counts
there in C. `/metrics` on the admin listener sums every slot (fastgate/metrics/collector.py)
and adds what only the supervisor knows: reloads, generation, workers' CPU and memory. The
slot directory is removed when the supervisor exits.

A worker that dies is restarted with the current config. Deaths in quick succession (uptime
under STABLE_UPTIME) back off exponentially from RESTART_DELAY to MAX_RESTART_DELAY, so a
worker that cannot start (its reason is logged and shown as `last_worker_error`) does not
spin the machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

import fastgate
from fastgate.config.compile import check_runtime
from fastgate.config.schema import Config
from fastgate.errors import ConfigError
from fastgate.metrics.collector import GatewayCollector, GatewayState, build_registry, render
from fastgate.metrics.slots import StatsDir, free_slot
from fastgate.server.listener import check_bindable
from fastgate.server.worker import config_payload
from fastgate.tls.client import upstream_files
from fastgate.tls.server import certificate_files

log = logging.getLogger("fastgate")

WATCH_INTERVAL = 1.0  # seconds between config file checks
KILL_GRACE = 5.0  # beyond drain_timeout, before a draining worker is killed
RESTART_DELAY = 0.2
MAX_RESTART_DELAY = 10.0
STABLE_UPTIME = 10.0  # a worker that ran this long resets the back-off
USR1_SETTLE = 1.0  # a worker this young gets a forwarded SIGUSR1 again at this age

FileStamp = tuple[int, int, int, int]


class WorkerHandle:
    """A running worker process and what it last reported."""

    def __init__(self, proc: asyncio.subprocess.Process, generation: int, slot: int = 0) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.slot = slot  # its metric slot (fastgate/metrics/slots.py); reused on restart
        self.ready = False
        self.generation = generation  # the config generation it serves
        self.started = time.monotonic()
        self.retiring = False  # asked to stop because `workers` was lowered
        self.error = ""  # why it could not start, when it said so


# The workers import the very fastgate this process runs (installed, or a checkout on
# PYTHONPATH): `python -m` would put the current directory first on sys.path, and from a
# source checkout after `pip install .` that is a copy without the compiled extensions.
PACKAGE_ROOT = str(Path(fastgate.__file__).resolve().parent.parent)
WORKER_CODE = (
    "import signal; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
    "import sys; sys.path.insert(0, %r); from fastgate.server.worker import main; sys.exit(main())"
)


class Supervisor:
    """Owns the workers, the admin listener and the demo origin of one `fastgate run`."""

    worker_argv: tuple[str, ...] = (sys.executable, "-c", WORKER_CODE % PACKAGE_ROOT)

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        self.reload_config = reload_config
        self.config_path = config_path
        self.workers: list[WorkerHandle] = []
        self.pending_starts = 0
        self.stopping = False
        self.generation = 1
        self.payload = config_payload(config)
        self.last_reload = "none"
        self.restarts = 0
        self.quick_deaths = 0
        self.last_worker_error = ""
        self.file_stamp = _stamp(config_path)
        self.tls_stamps = _stamps(watched_files(config))
        self.stop_requested = asyncio.Event()
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.cancel_on_stop: set[asyncio.Task[Any]] = set()
        # Metrics: the workers' slot files, and what only the supervisor counts.
        self.stats_dir = StatsDir()
        self.reload_counts = {"success": 0, "failure": 0}
        self.loaded_at = time.time()
        self.metrics_registry = build_registry(GatewayCollector(self.stats_dir, self.metrics_state))
        # The gateway's stdout, for the workers' logs with path "-" (their own fd 1 is the
        # status pipe). Not inheritable: passed explicitly to each worker.
        self.stdout_fd = _dup_stdout()

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The /readyz document."""
        live = self._live()
        ready = [w for w in live if w.ready]
        target = self.config.worker_count()
        return {
            "ready": not self.stopping and len(ready) >= target,
            "stopping": self.stopping,
            "workers": target,
            "workers_ready": len(ready),
            "workers_current": sum(1 for w in ready if w.generation == self.generation),
            "generation": self.generation,
            "last_reload": self.last_reload,
            "worker_restarts": self.restarts,
            "last_worker_error": self.last_worker_error,
            "pids": [w.pid for w in live],
            "worker_list": [
                {"pid": w.pid, "ready": w.ready, "generation": w.generation} for w in live
            ],
        }

    def _live(self) -> list[WorkerHandle]:
        return [w for w in self.workers if not w.retiring]

    def metrics_state(self) -> GatewayState:
        """What /metrics needs from the supervisor (read at each scrape)."""
        return GatewayState(
            workers=[(w.slot, w.pid) for w in self.workers],
            generation=self.generation,
            reloads=dict(self.reload_counts),
            last_reload=self.loaded_at,
            servers=[
                (name, server.url)
                for name, svc in self.config.services.items()
                for server in svc.servers
            ],
            tls_entrypoints=[n for n, ep in self.config.entrypoints.items() if ep.tls],
        )

    def metrics(self, accept: str) -> tuple[bytes, str]:
        """The /metrics body and content type for a scrape's Accept header."""
        return render(self.metrics_registry, accept)

    def audit(self) -> dict[str, Any]:
        """The /audit document of the running config (blocking: the admin runs it off-loop)."""
        from fastgate.server.admin import audit_document

        return audit_document(self.config, self.config_path)

    # ---- workers ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], stop_cancels: bool = False) -> None:
        """Run `coro` as a task that is kept referenced; `stop_cancels`: stop() cancels it
        (pending restarts, the file watcher; not the watchers that see workers exit)."""
        tasks = self.cancel_on_stop if stop_cancels else self.tasks
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def start_worker(self) -> WorkerHandle | None:
        """Spawn one worker with the current config; None (and a retry later) on failure."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.worker_argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=() if self.stdout_fd is None else (self.stdout_fd,),
            )
        except OSError as exc:
            self.last_worker_error = f"cannot spawn a worker: {exc}"
            log.error("%s", self.last_worker_error)
            self._schedule_restart(quick=True)
            return None
        handle = WorkerHandle(proc, self.generation, free_slot(w.slot for w in self.workers))
        self.workers.append(handle)
        self._send(
            handle,
            {
                "op": "start",
                "generation": self.generation,
                "config": self.payload,
                "stats": self.stats_dir.slot_path(handle.slot),
                "stdout_fd": self.stdout_fd,
            },
        )
        self._spawn(self._watch(handle))
        log.info("worker %d started (generation %d)", handle.pid, self.generation)
        if self.stopping:  # stop() came while it was being spawned
            _signal(handle, signal.SIGTERM)
        return handle

    def _send(self, handle: WorkerHandle, msg: dict[str, Any]) -> None:
        stdin = handle.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(json.dumps(msg).encode() + b"\n")

    async def _watch(self, handle: WorkerHandle) -> None:
        """Read the worker's status lines until it exits, then restart it if it should."""
        assert handle.proc.stdout is not None
        try:
            while line := await handle.proc.stdout.readline():
                self._on_status(handle, line)
        except (ValueError, ConnectionError):  # an over-long line; the pipe is unusable
            log.error("worker %d: unreadable status; stopping it", handle.pid)
            _signal(handle, signal.SIGKILL)
        code = await handle.proc.wait()
        if handle.proc.stdin is not None:
            handle.proc.stdin.close()  # or the pipe (and its fd) lives on after the child
        self.workers.remove(handle)
        self._exited(handle, code)

    def _on_status(self, handle: WorkerHandle, line: bytes) -> None:
        parts = line.decode("utf-8", "replace").rstrip("\n").split(" ", 3)
        word = parts[1] if len(parts) > 1 else ""
        generation = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
        reason = parts[3] if len(parts) > 3 else ""
        if word == "ready":
            handle.ready = True
            handle.generation = generation or handle.generation
            log.info("worker %d ready (generation %d)", handle.pid, handle.generation)
        elif word == "reloaded" and generation is not None:
            handle.generation = generation
            if all(w.generation == self.generation for w in self._live() if w.ready):
                log.info("all workers serve generation %d", self.generation)
        elif word == "reload-failed":
            self.last_reload = f"failed in worker {handle.pid}: {reason}"
            log.error(
                "worker %d refused generation %s and keeps generation %d: %s",
                handle.pid,
                generation,
                handle.generation,
                reason,
            )
        elif word == "failed":
            handle.error = reason
            self.last_worker_error = f"worker {handle.pid}: {reason}"
            log.error("worker %d cannot start: %s", handle.pid, reason)

    def _exited(self, handle: WorkerHandle, code: int) -> None:
        how = _describe_exit(code)
        if self.stopping or handle.retiring:
            log.info("worker %d %s", handle.pid, how)
            if self.stopping and not self.workers:
                self.done.set()
            return
        quick = time.monotonic() - handle.started < STABLE_UPTIME
        if not handle.error:
            self.last_worker_error = f"worker {handle.pid} {how}"
        delay = self._schedule_restart(quick)
        log.error(
            "worker %d %s%s; restarting in %.1fs",
            handle.pid,
            how,
            f" ({handle.error})" if handle.error else "",
            delay,
        )

    def _schedule_restart(self, quick: bool) -> float:
        self.quick_deaths = self.quick_deaths + 1 if quick else 1
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (self.quick_deaths - 1))
        self.restarts += 1
        self.pending_starts += 1
        self._spawn(self._restart_later(delay), stop_cancels=True)
        return delay

    async def _restart_later(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            if not self.stopping and len(self._live()) < self.config.worker_count():
                await self.start_worker()
        finally:
            self.pending_starts -= 1

    def _adjust_worker_count(self) -> None:
        """Start or retire workers after `workers` changed in a reload."""
        target = self.config.worker_count()
        live = self._live()
        missing = target - len(live) - self.pending_starts
        for _ in range(missing):
            self._spawn(self.start_worker())
        for handle in live[target:]:
            handle.retiring = True
            log.info("worker %d retiring (workers: %d)", handle.pid, target)
            _signal(handle, signal.SIGTERM)

    # ---- reload ----------------------------------------------------------------------------

    def reload(self, trigger: str = "SIGHUP", only_if_changed: bool = False) -> None:
        """Load, validate and compile the config again; send it to the workers if it is good."""
        if self.stopping:
            return
        if self.reload_config is None:
            log.info("%s: nothing to reload (no config file)", trigger)
            return
        self.file_stamp = _stamp(self.config_path)
        tls_stamps = _stamps(watched_files(self.config))
        try:
            config = self.reload_config()
            # Stamped before the files are read: a change while checking is seen next round.
            tls_stamps = _stamps(watched_files(config))
            if only_if_changed and config == self.config and tls_stamps == self.tls_stamps:
                log.info("%s: the config is unchanged; nothing to do", trigger)
                return
            self._check(config)
        except ConfigError as exc:
            self.tls_stamps = tls_stamps
            self.reload_counts["failure"] += 1
            self.last_reload = "refused: " + "; ".join(exc.lines())
            log.error(
                "%s: new config refused, generation %d keeps serving:\n%s",
                trigger,
                self.generation,
                "\n".join(f"  {line}" for line in exc.lines()),
            )
            return
        except Exception as exc:  # a bug here must not take the supervisor down
            self.tls_stamps = tls_stamps
            self.reload_counts["failure"] += 1
            self.last_reload = f"refused: internal error: {exc}"
            log.exception(
                "%s: reload failed, generation %d keeps serving", trigger, self.generation
            )
            return
        self.tls_stamps = tls_stamps
        self._apply(config)
        log.info(
            "%s: config generation %d sent to %d workers",
            trigger,
            self.generation,
            len(self._live()),
        )

    def _check(self, config: Config) -> None:
        """What a worker would refuse, refused here first (ConfigError by key path)."""
        check_runtime(config)
        in_use = {ep.address for ep in self.config.entrypoints.values()}
        problems = []
        for name, ep in config.entrypoints.items():
            if ep.address in in_use:
                continue
            reason = check_bindable(ep.address)
            if reason:
                problems.append(
                    (f"entrypoints.{name}.address", f"cannot listen on {ep.address}: {reason}")
                )
        if problems:
            raise ConfigError.from_errors(problems)
        for key in ("admin", "demo_origin"):
            if getattr(config, key) != getattr(self.config, key):
                log.warning("%s: changes take effect at the next restart", key)

    def _apply(self, config: Config) -> None:
        self.config = config
        self.generation += 1
        self.payload = config_payload(config)
        self.last_reload = "ok"
        self.reload_counts["success"] += 1
        self.loaded_at = time.time()
        logging.getLogger().setLevel(config.log_level.upper())
        msg = {"op": "reload", "generation": self.generation, "config": self.payload}
        for handle in self._live():
            self._send(handle, msg)
        self._adjust_worker_count()

    async def _watch_file(self) -> None:
        """Reload when the config file or a TLS file it names changes on disk (polled;
        cheap and dependable)."""
        while not self.stopping:
            await asyncio.sleep(WATCH_INTERVAL)
            stamp = _stamp(self.config_path)
            if stamp is not None and stamp != self.file_stamp:
                await asyncio.sleep(0.1)
                if _stamp(self.config_path) != stamp:
                    continue  # still being written: look again next round
                self.reload("config file change", only_if_changed=True)
                continue
            # Missing for a moment (an editor's or certbot's rename dance) is not a change.
            stamps = _stamps(self.tls_stamps)
            if any(v is not None and v != self.tls_stamps[k] for k, v in stamps.items()):
                await asyncio.sleep(0.1)
                if _stamps(self.tls_stamps) != stamps:
                    continue  # still being written (a certificate and its key, one by one)
                self.reload("certificate file change")

    # ---- logs ------------------------------------------------------------------------------

    def reopen_logs(self) -> None:
        """SIGUSR1: every worker reopens its log files (after logrotate renamed them)."""
        log.info("SIGUSR1: workers reopen their log files")
        loop = asyncio.get_running_loop()
        for handle in self.workers:
            _signal(handle, signal.SIGUSR1)
            age = time.monotonic() - handle.started
            if age < USR1_SETTLE:
                loop.call_later(USR1_SETTLE - age, _signal_if_running, handle, signal.SIGUSR1)

    # ---- stop ------------------------------------------------------------------------------

    def stop(self, why: str = "SIGTERM") -> None:
        """Drain every worker; run() returns once they have exited."""
        if self.stopping:
            return
        self.stopping = True
        log.info(
            "%s: draining %d workers (up to %gs)", why, len(self.workers), self.config.drain_timeout
        )
        for task in list(self.cancel_on_stop):
            task.cancel()
        for handle in self.workers:
            _signal(handle, signal.SIGTERM)
        if not self.workers:
            self.done.set()
        self.stop_requested.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        try:
            return await self._run()
        finally:
            self.stats_dir.remove()
            if self.stdout_fd is not None:
                os.close(self.stdout_fd)
                self.stdout_fd = None

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.stop, "SIGINT")
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        servers = await self._start_listeners()
        if servers is None:
            return 2
        for name, ep in self.config.entrypoints.items():
            log.info(
                "entrypoint %s on %s://%s", name, "http" if ep.tls is None else "https", ep.address
            )
        if self.config.admin.enabled:
            log.info(
                "admin on http://%s (/healthz, /readyz, /metrics, /audit)",
                self.config.admin.address,
            )
        for _ in range(self.config.worker_count()):
            if self.stopping:
                break
            await self.start_worker()
        if self.config_path is not None:
            self._spawn(self._watch_file(), stop_cancels=True)
        await self.stop_requested.wait()
        killed = await self._wait_workers(self.config.drain_timeout + KILL_GRACE)
        for task in list(self.tasks):
            task.cancel()
        for server in servers:
            server.close()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        log.info("stopped")
        return 1 if killed else 0

    async def _start_listeners(self) -> list[asyncio.AbstractServer] | None:
        """The demo origin and the admin listener; None (reported) when one cannot listen."""
        from fastgate.server.admin import start_admin
        from fastgate.server.demo_origin import start_demo_origin

        wanted = []
        if self.config.demo_origin.enabled:
            address = self.config.demo_origin.address
            wanted.append(("demo_origin.address", address, start_demo_origin(address)))
        if self.config.admin.enabled:
            address = self.config.admin.address
            wanted.append(
                (
                    "admin.address",
                    address,
                    start_admin(address, self.status, self.metrics, self.audit),
                )
            )
        servers: list[asyncio.AbstractServer] = []
        for key, address, starting in wanted:
            try:
                servers.append(await starting)
            except OSError as exc:
                print(
                    f"error: {key}: cannot listen on {address}: {exc.strerror or exc}",
                    file=sys.stderr,
                )
                for server in servers:
                    server.close()
                for _, _, never in wanted[len(servers) + 1 :]:
                    never.close()
                return None
        return servers

    async def _wait_workers(self, timeout: float) -> int:
        """Wait for the draining workers; kill those still running after `timeout`."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
            return 0
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            pass
        stuck = list(self.workers)
        for handle in stuck:
            log.error("worker %d did not finish draining in %gs; killing it", handle.pid, timeout)
            _signal(handle, signal.SIGKILL)
        try:
            await asyncio.wait_for(self.done.wait(), 5)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            log.error("workers %s did not exit", [w.pid for w in self.workers])
        return len(stuck)


def _signal(handle: WorkerHandle, sig: int) -> None:
    try:
        handle.proc.send_signal(sig)
    except ProcessLookupError:
        pass  # already gone; its watcher will see the exit


def _signal_if_running(handle: WorkerHandle, sig: int) -> None:
    if handle.proc.returncode is None:
        _signal(handle, sig)


def _dup_stdout() -> int | None:
    """A private, non-inheritable duplicate of fd 1 (None when there is no stdout)."""
    try:
        return os.dup(1)
    except OSError:
        return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stamp(path: str | None) -> FileStamp | None:
    """What tells a changed file apart: mtime, size, inode, device (None when missing)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _stamps(paths: Iterable[str]) -> dict[str, FileStamp | None]:
    return {path: _stamp(path) for path in paths}


def watched_files(config: Config) -> tuple[str, ...]:
    """The TLS files a change of which reloads: the entrypoints' certificates, keys, CAs and
    CRLs, and the services' upstream CA, client certificate and key files."""
    return tuple(dict.fromkeys(certificate_files(config) + upstream_files(config)))


def serve(
    config: Config,
    config_path: str | None = None,
    reload_config: Callable[[], Config] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the process exit code.

    `overrides` are the command-line settings `config` was built with; reloads apply them
    again, so a reload cannot undo `--listen` or `--workers`.
    """
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    if reload_config is None and config_path is not None:
        from fastgate.config.loader import load_config

        def reload_config() -> Config:
            return load_config(config_path, os.environ, overrides)

    problems = []
    for name, ep in config.entrypoints.items():
        reason = check_bindable(ep.address)
        if reason:
            problems.append(f"entrypoints.{name}.address: cannot listen on {ep.address}: {reason}")
    try:
        check_runtime(config)
    except ConfigError as exc:
        problems.extend(exc.lines())
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    return asyncio.run(Supervisor(config, reload_config, config_path).run())
