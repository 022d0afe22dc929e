"""A worker process: one uvloop event loop serving every entrypoint of the current config.

The worker owns an Engine (timers, pools, counters) and one Runtime per config generation.

Talking to the supervisor: control messages arrive on stdin as JSON lines, `start` first (the
config to serve and its generation), then `reload` (a newer config, already validated and
compiled once by the supervisor). Status goes back as text lines `<pid> <word> <generation>
[<reason>]` on a private duplicate of the original stdout: `ready`, `reloaded`,
`reload-failed`, `failed` (could not start; exit status 3; generation 0 when unknown). File
descriptor 1 is pointed at stderr before anything else runs, so a stray print() cannot
corrupt the status stream.

Reload: compile the new Runtime and bind any new listener addresses first; only when both
succeed is each entrypoint's `cfg` swapped, so a failure keeps the running generation whole.
Messages are applied one at a time, in order. A TLS entrypoint keeps its listener and base
SSL context; its `TlsListener` is given the new generation's certificates, so new handshakes
use them and established connections are untouched. Turning TLS on or off, changing
handshake_timeout or the client-certificate policy (client_auth, CA or CRL contents) moves
the entrypoint to a new listener (like an address change; see fastgate/tls/server.py).

Metrics: the start message names the worker's slot file (`stats`); the Engine counts there in
C (fastgate/_core/stats.pyx, rate-limit decisions per route included), and a timer copies the
Python-side tallies (auth failures, TLS handshakes) into it once a second
(fastgate/metrics/copier.py).
A slot that cannot be opened is logged and the worker serves anyway, uncounted.

Logs (fastgate/logs, docs/logging.md): a LogRuntime builds the access, audit and span
streams and their writer threads from the config and installs them in the Engine
(`engine.alog`); a reload that changes the log sections builds new ones and closes the old
ones after handing over their last lines. SIGUSR1 makes every file writer reopen its path
(log rotation). Log lines never go to the status stream: fd 1 is stderr here, so a log whose
path is "-" writes to the duplicate of the gateway's stdout that the supervisor passes
(`stdout_fd` in the start message); without one (run standalone) "-" means fd 1 as found
when `run_worker` was called, or stderr under the supervisor.

Active health checks (fastgate/routing/health.py): each runtime gets its own HealthChecker,
started once that runtime is in use (start, reload) and stopped when it is retired (reload,
drain); a new generation's checker starts fresh, with every server healthy.

Drain (SIGTERM/SIGINT, or stdin closing because the supervisor is gone): close the listeners,
stop keep-alive (idle connections close now, busy ones after their response), wait for the
in-flight requests up to drain_timeout, then exit; the process exit closes whatever is still
open at the deadline. The log buffers are taken and written (bounded wait) after the last
exchange ended, so no line of a drained request is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import uvloop

from fastgate._core.conn import DownstreamProtocol, Engine, EntryPoint
from fastgate._core.stats import Shard
from fastgate.config.compile import Runtime, compile_runtime
from fastgate.config.schema import Config, Entrypoint, parse_config
from fastgate.errors import ConfigError
from fastgate.logs.runtime import LogRuntime, log_settings
from fastgate.metrics.copier import TallyCopier, copy_forever, copy_once
from fastgate.routing.health import HealthChecker
from fastgate.server.dispatch import dispatch
from fastgate.server.listener import bind
from fastgate.tls.server import TlsListener, describe, listener_shape

log = logging.getLogger("fastgate.worker")

EXIT_START_FAILED = 3
# During a drain, connections accepted at the last moment (still idle) are closed this often.
_REDRAIN_INTERVAL = 0.25


class Worker:
    """Listeners, the engine and the current runtime of one worker process."""

    def __init__(
        self,
        config: Config,
        generation: int,
        status_fd: int | None,
        stopping: asyncio.Event | None = None,
        stats_path: str | None = None,
        stdout_fd: int = 1,
    ) -> None:
        self.config = config
        self.generation = generation
        self.status_fd = status_fd
        self.loop = asyncio.get_running_loop()
        shard = _open_slot(stats_path)
        self.engine = Engine(self.loop, dispatch, tick_interval=_tick_for(config), shard=shard)
        self.copier = TallyCopier(self.engine.shard)
        self._copying: asyncio.Task[None] | None = None
        self.runtime: Runtime = compile_runtime(config, self.engine)
        self.health: HealthChecker | None = None  # the runtime's active checks, once started
        self.stdout_fd = stdout_fd  # where a log with path "-" goes (never the status fd)
        try:
            self.logs = LogRuntime(config, self.loop, self.engine.shard, stdout_fd)
        except ConfigError:
            self.runtime.retire()
            raise
        self.logs.install(self.engine)
        self.entrypoints: dict[str, EntryPoint] = {}
        self.servers: dict[str, tuple[str, asyncio.AbstractServer]] = {}
        self.tls: dict[str, TlsListener] = {}  # the TLS entrypoints' listeners
        self.stopping = stopping or asyncio.Event()
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending = b""
        self._control_fd: int | None = None
        self._applier: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind every entrypoint (all or none) and start serving."""
        socks = _bind_all(self.config.entrypoints)
        for name, sock in socks.items():
            await self._serve(name, sock)
        self.logs.start()
        self._check_health()
        self._copying = self.loop.create_task(
            copy_forever(self.copier, lambda: (self.runtime, self.tls))
        )

    async def _serve(self, name: str, sock: socket.socket) -> None:
        ep = self.config.entrypoints[name]
        entry = EntryPoint(name, self.runtime.entries[name])
        engine = self.engine
        generation = self.runtime.tls.get(name)
        if ep.tls is None or generation is None:
            server = await self.loop.create_server(
                lambda: DownstreamProtocol(engine, entry), sock=sock, backlog=ep.backlog
            )
        else:
            tls = TlsListener(generation)
            server = await self.loop.create_server(
                tls.protocol_factory(engine, entry),
                sock=sock,
                backlog=ep.backlog,
                ssl=tls.context,
                ssl_handshake_timeout=ep.tls.handshake_timeout,
            )
            self.tls[name] = tls
        self.entrypoints[name] = entry
        self.servers[name] = (ep.address, server)

    async def reload(self, config: Config, generation: int) -> None:
        """Swap to `config`; raises ConfigError (and keeps serving the old one) on failure."""
        runtime = compile_runtime(config, self.engine)
        changed = {
            name: ep
            for name, ep in config.entrypoints.items()
            if name not in self.servers
            or self.servers[name][0] != ep.address
            or listener_shape(ep.tls) != listener_shape(self.config.entrypoints[name].tls)
            or (name in self.tls and not self.tls[name].can_swap(runtime.tls[name]))
        }
        logs = None
        try:
            if log_settings(config) != self.logs.settings:
                logs = LogRuntime(config, self.loop, self.engine.shard, self.stdout_fd)
            socks = _bind_all(changed)
        except ConfigError:
            runtime.retire()
            if logs is not None:
                await logs.close(0)
            raise
        old = self.runtime
        self.runtime = runtime
        self.config = config
        self.generation = generation
        for name, entry in self.entrypoints.items():
            if name in runtime.entries and name not in changed:
                entry.cfg = runtime.entries[name]
                if name in self.tls:
                    self.tls[name].swap(runtime.tls[name])
        for name in list(self.servers):
            if name not in config.entrypoints or name in changed:
                # Connections accepted there keep the old cfg until they close.
                self.servers.pop(name)[1].close()
                del self.entrypoints[name]
                self.tls.pop(name, None)
        for name, sock in socks.items():
            await self._serve(name, sock)
        self.engine.set_tick_interval(_tick_for(config))
        logging.getLogger().setLevel(config.log_level.upper())
        old.retire()
        self._check_health()
        if logs is not None:
            # New exchanges log through the new streams; the old ones are emptied and closed.
            old_logs, self.logs = self.logs, logs
            logs.install(self.engine)
            logs.start()
            await old_logs.close()
        log.info("worker %d: config generation %d in use", os.getpid(), generation)

    # ---- the control channel ---------------------------------------------------------------

    def listen_control(self, fd: int, pending: bytes) -> None:
        """Read control messages from `fd`; `pending` holds bytes read before the loop ran."""
        self._control_fd = fd
        self._pending = pending
        self._split_messages()
        self.loop.add_reader(fd, self._on_control)
        self._applier = self.loop.create_task(self._apply_messages())

    def _on_control(self) -> None:
        assert self._control_fd is not None
        try:
            data = os.read(self._control_fd, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The supervisor is gone: nobody can stop or restart us, so drain and exit.
            self.loop.remove_reader(self._control_fd)
            log.warning("worker %d: control channel closed; draining", os.getpid())
            self.stopping.set()
            return
        self._pending += data
        self._split_messages()

    def _split_messages(self) -> None:
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            try:
                self.messages.put_nowait(json.loads(line))
            except ValueError:
                log.error("worker %d: unreadable control message ignored", os.getpid())

    async def _apply_messages(self) -> None:
        while True:
            msg = await self.messages.get()
            if msg.get("op") != "reload" or self.stopping.is_set():
                continue
            generation = int(msg.get("generation", self.generation + 1))
            try:
                await self.reload(parse_config(msg["config"]), generation)
            except ConfigError as exc:
                reason = "; ".join(exc.lines())
                log.error(
                    "worker %d: reload refused, keeping generation %d: %s",
                    os.getpid(),
                    self.generation,
                    reason,
                )
                self.status("reload-failed", generation, reason)
            except Exception as exc:  # a bug must not take the control channel down
                log.exception("worker %d: reload failed", os.getpid())
                self.status("reload-failed", generation, f"{type(exc).__name__}: {exc}")
            else:
                self.status("reloaded", generation)

    def reopen_logs(self) -> None:
        """SIGUSR1: the log files are opened again (after logrotate renamed them)."""
        log.info("worker %d: reopening log files", os.getpid())
        self.logs.reopen()

    def status(self, word: str, generation: int, reason: str = "") -> None:
        """One status line to the supervisor (a no-op when run without one)."""
        if self.status_fd is None:
            return
        _write_status(self.status_fd, word, generation, reason)

    # ---- draining --------------------------------------------------------------------------

    async def drain(self, timeout: float) -> int:
        """Stop accepting, finish in-flight requests; returns how many were cut (reset) at
        the deadline."""
        for _, server in self.servers.values():
            server.close()
        self.servers.clear()
        self.engine.start_drain()
        deadline = self.loop.time() + timeout
        next_sweep = self.loop.time() + _REDRAIN_INTERVAL
        while self.engine.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
            if self.loop.time() >= next_sweep:
                # A connection accepted just before the listener closed sits idle with no
                # request; it would otherwise hold the drain until its head timeout.
                self.engine.start_drain()
                next_sweep = self.loop.time() + _REDRAIN_INTERVAL
        left = len(self.engine.conns)
        for line in describe(self.tls.items()):
            log.info("worker %d: %s", os.getpid(), line)
        self.engine.abort_all()
        self.engine.close()
        if self._copying is not None:
            self._copying.cancel()
        # Every exchange has ended (and logged): write the last lines, then count.
        await self.logs.close()
        copy_once(self.copier, self.runtime, self.tls)
        if self.health is not None:
            self.health.stop()
        self.runtime.retire()
        return left

    def _check_health(self) -> None:
        """Stop the retired runtime's health checks and start the current one's."""
        if self.health is not None:
            self.health.stop()
        self.health = HealthChecker(self.runtime)
        self.health.start()


def _bind_all(entrypoints: Mapping[str, Entrypoint]) -> dict[str, socket.socket]:
    """Listening sockets for `entrypoints`, all or none: ConfigError names the address key."""
    socks: dict[str, socket.socket] = {}
    for name, ep in entrypoints.items():
        try:
            socks[name] = bind(ep.address, ep.backlog)
        except OSError as exc:
            for sock in socks.values():
                sock.close()
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"entrypoints.{name}.address", f"cannot listen on {ep.address}: {reason}"
            ) from None
    return socks


def _open_slot(path: str | None) -> Shard | None:
    """This worker's metric slot, or None (private counters) when it cannot be opened."""
    if path is None:
        return None
    try:
        return Shard(path)
    except (OSError, ValueError) as exc:
        log.error("worker %d: metrics slot %s unusable, not counting: %s", os.getpid(), path, exc)
        return None


def _tick_for(config: Config) -> float:
    """The ticker period: a quarter of the shortest timeout, between 20 ms and 1 s."""
    return max(0.02, min(1.0, config.shortest_timeout() / 4))


def _write_status(fd: int, word: str, generation: int, reason: str) -> None:
    parts = [str(os.getpid()), word, str(generation)]
    if reason:
        parts.append(" ".join(reason.split()))  # one line
    try:
        os.write(fd, (" ".join(parts) + "\n").encode())
    except OSError:
        pass  # the supervisor is gone; stdin closing tells us to stop


async def _main(
    config: Config,
    generation: int,
    control_fd: int | None,
    status_fd: int | None,
    pending: bytes = b"",
    stats_path: str | None = None,
    stdout_fd: int = 1,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Reloads come through the supervisor; a stray SIGHUP must not kill the worker.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    try:
        worker = Worker(config, generation, status_fd, stop, stats_path, stdout_fd)
        loop.add_signal_handler(signal.SIGUSR1, worker.reopen_logs)
        await worker.start()
    except ConfigError as exc:
        reason = "; ".join(exc.lines())
        log.error("worker %d: cannot start: %s", os.getpid(), reason)
        if status_fd is not None:
            _write_status(status_fd, "failed", generation, reason)
        return EXIT_START_FAILED
    if control_fd is not None:
        worker.listen_control(control_fd, pending)
    worker.status("ready", generation)
    await stop.wait()
    log.info("worker %d: draining (up to %gs)", os.getpid(), worker.config.drain_timeout)
    left = await worker.drain(worker.config.drain_timeout)
    if left:
        log.warning("worker %d: drain deadline reached, closing %d connections", os.getpid(), left)
    log.info("worker %d: stopped", os.getpid())
    return 0


def run_worker(
    config: Config,
    generation: int = 1,
    control_fd: int | None = None,
    status_fd: int | None = None,
    pending: bytes = b"",
    stats_path: str | None = None,
    stdout_fd: int = 1,
) -> int:
    """Run a worker until it is told to stop; returns the exit code. `stdout_fd` is where
    logs with path "-" go."""
    return uvloop.run(
        _main(config, generation, control_fd, status_fd, pending, stats_path, stdout_fd)
    )


def config_payload(config: Config) -> dict[str, Any]:
    """The plain-data form of a validated config, as sent to workers."""
    return config.model_dump(mode="json")


def _read_first_line(fd: int) -> tuple[bytes, bytes]:
    """The first line on `fd` (blocking) and whatever was read after it."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"", b""
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


def main() -> int:
    """`python -m fastgate.server.worker`: the supervisor's child (see the module docstring)."""
    # SIGUSR1 (log rotation) must not kill a worker before its handler is installed.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    status_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    first, pending = _read_first_line(0)
    if not first:
        return EXIT_START_FAILED
    try:
        msg = json.loads(first)
        generation = int(msg.get("generation", 1))
        config = parse_config(msg["config"])
        stats_path = msg.get("stats")
        if stats_path is not None and not isinstance(stats_path, str):
            raise TypeError("stats must be a path")
        # The gateway's stdout for logs with path "-" (fd 1 here is stderr: status safety).
        stdout_fd = msg.get("stdout_fd", 2)
        if stdout_fd is None:
            stdout_fd = 2
        if isinstance(stdout_fd, bool) or not isinstance(stdout_fd, int) or stdout_fd < 0:
            raise TypeError("stdout_fd must be a file descriptor")
    except ConfigError as exc:
        reason = "; ".join(exc.lines())
        log.error("worker %d: cannot start: %s", os.getpid(), reason)
        _write_status(status_fd, "failed", 0, reason)
        return EXIT_START_FAILED
    except (ValueError, KeyError, TypeError) as exc:
        _write_status(status_fd, "failed", 0, f"bad start message: {exc}")
        return EXIT_START_FAILED
    logging.getLogger().setLevel(config.log_level.upper())
    os.set_blocking(0, False)
    return run_worker(
        config,
        generation,
        0,
        status_fd,
        pending=pending,
        stats_path=stats_path,
        stdout_fd=stdout_fd,
    )


if __name__ == "__main__":
    raise SystemExit(main())
