"""Tools for the flood and slow-attack tests: a swarm of raw attacker sockets, a legitimate
client measured while they run, and views of the worker process (fds, sockets, memory).

Rules this file obeys:
- Everything is bounded: every loop has a deadline, every socket is closed in `close()` (the
  tests call it in `finally`), and counts come from the caller.
- Attackers are non-blocking sockets driven from ONE thread through a selector (epoll): ten
  thousand threads would measure the test process, not the gateway.
- The legitimate client is a thread with its own keep-alive connection doing sequential GETs;
  it records what it saw and never raises, so the test asserts on its record.
- Worker facts are read from /proc (Linux only), never from the gateway's own counters: the
  point is to check the gateway from the outside.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ORIGIN_HOST, Addr, Client

# Linux TCP states (include/net/tcp_states.h), the first byte of TCP_INFO.
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (capped by the hard limit);
    returns the new soft limit. Gateways started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def accepted_connections(pid: int, port: int) -> int:
    """TCP connections the process holds whose local port is `port` (accepted client
    connections of that entrypoint; the listening socket is not counted)."""
    inodes = _socket_inodes(pid)
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local_port = int(parts[1].rsplit(":", 1)[1], 16)
        state = int(parts[3], 16)
        if local_port == port and state != 0x0A and int(parts[9]) in inodes:  # 0A = LISTEN
            count += 1
    return count


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of a socket (TCP_INFO tcpi_state), without reading from it."""
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[:1])[0]


def percentile(values: list[float], pct: float) -> float:
    """The pct-th percentile (nearest rank) of values; 0.0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100.0 * len(ordered)) - 1))
    return ordered[rank]


# ---- the legitimate client -------------------------------------------------------------------


class LegitClient:
    """Sequential GETs on one keep-alive connection in a thread, while an attack runs.

    Why one connection: a gateway that stalls or drops an established, well-behaved client
    under attack is the failure we look for; a new connection per request would hide it
    behind the accept queue. Any error is recorded (and the connection replaced) so the test
    sees it in `failures` and `connections`.
    """

    def __init__(
        self,
        addr: Addr,
        host: str = ORIGIN_HOST,
        path: str = "/echo-path/legit",
        pause: float = 0.005,
    ) -> None:
        self.addr = addr
        self.host = host
        self.path = path
        self.pause = pause
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="legit-client", daemon=True)

    def __enter__(self) -> LegitClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the legitimate client is stuck"

    def _run(self) -> None:
        client: Client | None = None
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = Client(self.addr, timeout=5)
                        self.connections += 1
                    start = time.monotonic()
                    resp = client.request("GET", self.path, host=self.host)
                    elapsed = time.monotonic() - start
                    if resp.status == 200 and resp.body == self.path.encode():
                        self.latencies.append(elapsed)
                    else:
                        self.failures.append(f"status {resp.status}: {resp.body[:100]!r}")
                except (OSError, EOFError, ValueError, AssertionError) as e:
                    self.failures.append(repr(e))
                    if client is not None:
                        client.close()
                    client = None
                    self._stop.wait(0.05)
                self._stop.wait(self.pause)
        finally:
            if client is not None:
                client.close()

    @property
    def served(self) -> int:
        return len(self.latencies)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    def summary(self) -> str:
        return (
            f"{self.served} served on {self.connections} connection(s), "
            f"p50 {percentile(self.latencies, 50) * 1000:.1f} ms, p99 {self.p99 * 1000:.1f} ms, "
            f"max {max(self.latencies, default=0) * 1000:.1f} ms, {len(self.failures)} failures"
        )

    def assert_served(self, minimum: int = 50, p99_bound: float = 0.5) -> None:
        """A functional bound, not a benchmark: kept being served, on its one connection,
        with no request slower than the bound for 99% of them."""
        print(f"legitimate client: {self.summary()}")  # shown with -s, and on failure
        assert self.failures == [], f"legitimate client failures: {self.failures[:5]}"
        assert self.connections == 1, f"legitimate client needed {self.connections} connections"
        assert self.served >= minimum, f"only {self.served} legitimate requests served"
        assert self.p99 < p99_bound, f"legitimate p99 {self.p99 * 1000:.0f} ms"


# ---- the attackers ---------------------------------------------------------------------------


@dataclass
class Peer:
    """One attacker connection and what it saw."""

    sock: socket.socket
    payload: bytes
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    opened_at: float = 0.0
    closed_at: float | None = None  # when the gateway's EOF or reset was seen
    reset: bool = False
    error: str | None = None  # a failure to connect

    @property
    def lifetime(self) -> float:
        assert self.closed_at is not None
        return self.closed_at - self.opened_at


class Swarm:
    """`count` attacker connections to `addr`, each with a payload to send (whole, or a few
    bytes per step), driven from the calling thread. `read=False` never reads from them (the
    client-that-never-reads attack); `rcvbuf` shrinks their receive buffers first."""

    def __init__(
        self, addr: Addr, count: int, payload: bytes = b"", read: bool = True, rcvbuf: int = 0
    ) -> None:
        self.addr = addr
        self.count = count
        self.payload = payload
        self.read = read
        self.rcvbuf = rcvbuf
        self.peers: list[Peer] = []
        self.selector = selectors.DefaultSelector()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for peer in self.peers:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(peer.sock)
            peer.sock.close()
        self.selector.close()

    @property
    def open_peers(self) -> list[Peer]:
        return [p for p in self.peers if p.closed_at is None and p.error is None]

    def connect(self, batch: int = 256, timeout: float = 10.0) -> float:
        """Open every connection, `batch` handshakes in flight at a time (so the listen queue
        is never what refuses them); returns the seconds it took. A failed connect is kept
        in its peer's `error`."""
        start = time.monotonic()
        deadline = start + timeout
        pending: dict[socket.socket, Peer] = {}
        made = 0
        while made < self.count or pending:
            while made < self.count and len(pending) < batch:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                if self.rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                sock.setblocking(False)
                peer = Peer(sock, self.payload)
                self.peers.append(peer)
                made += 1
                code = sock.connect_ex(self.addr)
                if code not in (0, 115):  # 115 = EINPROGRESS
                    peer.error = f"connect errno {code}"
                    continue
                pending[sock] = peer
                self.selector.register(sock, selectors.EVENT_WRITE, peer)
            left = deadline - time.monotonic()
            if left <= 0:
                for peer in pending.values():
                    peer.error = "connect timeout"
                break
            for key, _ in self.selector.select(min(left, 0.5)):
                peer = key.data
                del pending[peer.sock]
                code = peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    peer.error = f"connect errno {code}"
                    self.selector.unregister(peer.sock)
                    continue
                peer.opened_at = time.monotonic()
                if self.read:
                    self.selector.modify(peer.sock, selectors.EVENT_READ, peer)
                else:
                    self.selector.unregister(peer.sock)
        return time.monotonic() - start

    def _send(self, peer: Peer, n: int) -> None:
        """Send up to n more payload bytes (what the kernel takes now)."""
        if peer.closed_at is not None or peer.error is not None or peer.sent >= len(peer.payload):
            return
        try:
            peer.sent += peer.sock.send(peer.payload[peer.sent : peer.sent + n])
        except BlockingIOError:
            pass
        except OSError:  # reset or broken pipe: the gateway cut it; the read side records it
            self._closed(peer, reset=True)

    def _closed(self, peer: Peer, reset: bool) -> None:
        if peer.closed_at is None:
            peer.closed_at = time.monotonic()
            peer.reset = reset
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(peer.sock)
            # Close at once: frees the fd, and ends the gateway's lingering close by EOF.
            peer.sock.close()

    def _read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._closed(peer, reset=True)
            return
        if data:
            peer.received += data
        else:
            self._closed(peer, reset=False)

    def run(self, duration: float, step: int = 0, interval: float = 0.1) -> None:
        """For `duration` seconds (or until every peer is closed): every `interval` send each
        open peer its next `step` payload bytes (step 0: send nothing), and read whatever
        arrives, recording EOFs and resets."""
        deadline = time.monotonic() + duration
        next_send = time.monotonic()
        while self.open_peers and (now := time.monotonic()) < deadline:
            if step and now >= next_send:
                for peer in self.open_peers:
                    self._send(peer, step)
                next_send = now + interval
            wait = max(0.0, min(deadline, next_send if step else deadline) - time.monotonic())
            if not self.read:
                time.sleep(min(wait, 0.05))
                continue
            for key, _ in self.selector.select(min(wait, 0.05)):
                self._read(key.data)

    def send_whole(self, upto: int | None = None, timeout: float = 10.0) -> None:
        """Send each peer its whole payload, or its first `upto` bytes (partial writes are
        resumed; for payloads the kernel takes at once, not for flow-controlled ones)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [p for p in self.open_peers if p.sent < (upto or len(p.payload))]
            if not left:
                return
            for peer in left:
                self._send(peer, (upto or len(peer.payload)) - peer.sent)
            if self.read:
                for key, _ in self.selector.select(0):
                    self._read(key.data)
        raise AssertionError("attackers could not send their payloads in time")

    def reset_on_close(self) -> None:
        """Make closing the open peers send a reset (SO_LINGER 0): no TIME_WAIT is left on
        this side, so ten thousand client-side closes do not eat the ephemeral port range."""
        for peer in self.open_peers:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def poll_closed_by_state(self) -> int:
        """For peers that never read: mark as closed those whose TCP state says the gateway
        reset (CLOSE) or half-closed (CLOSE_WAIT) them; returns how many are closed."""
        for peer in self.open_peers:
            state = tcp_state(peer.sock)
            if state in (TCP_CLOSE, TCP_CLOSE_WAIT):
                self._closed(peer, reset=state == TCP_CLOSE)
        return sum(1 for p in self.peers if p.closed_at is not None)
