"""Per-worker metric shards in shared memory (see stats.pyx for the theory of operation)."""

from typing import Final

BUCKETS: Final[tuple[float, ...]]  # histogram upper bounds in seconds, the last is +Inf
METHODS: Final[tuple[str, ...]]  # the `method` label values, index = method class
CLASSES: Final[tuple[str, ...]]  # the `code_class` label values ("1xx" .. "5xx")
KINDS: Final[tuple[str, ...]]  # table names by kind number: route server entry rate auth log
OVERFLOW: Final[tuple[tuple[str, ...], ...]]  # the labels of each table's row 0
WORDS: Final[dict[str, int]]  # words per row of each table
OFFSETS: Final[dict[str, int]]  # word offsets inside a row, by name

def slot_size() -> int:
    """Bytes of one slot file (sparse on tmpfs)."""

class Shard:
    """One worker's slot: `Shard(path)` to write (created if missing, continued if present),
    `Shard(path, readonly=True)` to read, `Shard()` for private memory."""

    path: str | None
    def __init__(self, path: str | None = None, readonly: bool = False) -> None: ...
    def close(self) -> None:
        """Unmap (the counters stay in the file)."""
    def register_route(self, entrypoint: str, route: str, service: str) -> int:
        """The row of (entrypoint, route, service); the same row when already registered,
        0 (the overflow row) when the table is full or the labels too long."""
    def register_server(self, service: str, server: str) -> int: ...
    def register_entry(self, entrypoint: str) -> int: ...
    def register_rate(self, route: str) -> int: ...
    def register_auth(self, route: str, middleware: str, reason: str) -> int: ...
    def register_log(self, stream: str) -> int: ...
    def register_service(self, service: str) -> int: ...
    def add_count(self, kind: int, row: int, word: int, n: int) -> None:
        """Add `n` to one word; IndexError outside the tables."""
    def record(
        self,
        route_row: int,
        status: int,
        method: int = 0,
        seconds: float = 0.0,
        req_bytes: int = 0,
        resp_bytes: int = 0,
        server_row: int = -1,
        upstream_seconds: float = -1.0,
        rate: int = 0,
        rate_row: int = 0,
    ) -> None:
        """Count one exchange as the connection does at its end (for tests); `rate` is a
        RateOutcome (0 none, 1 allowed, 2 fallback, 3 limited) counted on row `rate_row`."""
    @property
    def pid(self) -> int:
        """The pid of the process that last opened the slot for writing."""
    def table(self, kind: int) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
        """(labels, words) of every registered row of `kind`, row order."""
