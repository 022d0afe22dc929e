"""fastgate._core.stats: slot files, name tables, counters, histograms (real tmpfs files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastgate._core import stats

BUCKETS, OFFSETS, OVERFLOW, Shard = stats.BUCKETS, stats.OFFSETS, stats.OVERFLOW, stats.Shard

K_ROUTE, K_SERVER, K_ENTRY, K_RATE, K_AUTH = range(5)
N_CLASSES, N_BUCKETS = 5, 15


@pytest.fixture
def slot(tmp_path: Path) -> str:
    return str(tmp_path / "slot-0")


def words_of(shard: Shard, kind: int, labels: tuple[str, ...]) -> tuple[int, ...]:
    return dict(shard.table(kind))[labels]


def test_fresh_slot_has_only_overflow_rows(slot: str) -> None:
    s = Shard(slot)
    for kind in range(5):
        assert s.table(kind) == [(OVERFLOW[kind], s.table(kind)[0][1])]
        assert not any(s.table(kind)[0][1])
    assert os.stat(slot).st_size == stats.slot_size()
    # Sparse: only the pages written are backed.
    assert os.stat(slot).st_blocks * 512 < 1 << 20


@pytest.mark.parametrize(
    ("register", "args", "kind"),
    [
        pytest.param("register_route", ("web", "api", "svc"), K_ROUTE, id="route"),
        pytest.param("register_server", ("svc", "http://10.0.0.1:80"), K_SERVER, id="server"),
        pytest.param("register_entry", ("web",), K_ENTRY, id="entry"),
        pytest.param("register_rate", ("api",), K_RATE, id="rate"),
        pytest.param("register_auth", ("api", "jwt", "bad signature"), K_AUTH, id="auth"),
    ],
)
def test_register_returns_the_same_row(slot: str, register: str, args: tuple, kind: int) -> None:
    s = Shard(slot)
    row = getattr(s, register)(*args)
    assert row == 1  # row 0 is the overflow row
    assert getattr(s, register)(*args) == row
    assert s.table(kind)[row][0] == args


def test_no_route_row_is_distinct(slot: str) -> None:
    s = Shard(slot)
    assert s.register_route("web", "", "") != s.register_route("web", "api", "")
    assert s.register_route("web", "api", "") != s.register_route("web", "api", "svc")


def test_record_counts_method_class_and_bytes(slot: str) -> None:
    s = Shard(slot)
    row = s.register_route("web", "api", "svc")
    s.record(row, 200, method=0, seconds=0.003, req_bytes=10, resp_bytes=100)
    s.record(row, 503, method=2, seconds=0.2, req_bytes=5, resp_bytes=50)
    s.record(row, 0, method=0, seconds=0.1, resp_bytes=7)  # nothing sent: bytes only
    w = words_of(s, K_ROUTE, ("web", "api", "svc"))
    assert w[OFFSETS["requests"] + 0 * N_CLASSES + 1] == 1  # GET 2xx
    assert w[OFFSETS["requests"] + 2 * N_CLASSES + 4] == 1  # POST 5xx
    assert sum(w[OFFSETS["requests"] : OFFSETS["requests"] + 40]) == 2
    assert w[OFFSETS["req_bytes"]] == 15
    assert w[OFFSETS["resp_bytes"]] == 157
    assert w[OFFSETS["sum_ns"] + 1] == 3_000_000


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        pytest.param(0.0, 0, id="zero"),
        pytest.param(0.0005, 0, id="on-the-first-bound"),
        pytest.param(0.0006, 1, id="just-above"),
        pytest.param(1.0, 10, id="one-second"),
        pytest.param(10.0, 13, id="last-finite"),
        pytest.param(11.0, 14, id="inf"),
    ],
)
def test_histogram_bucket(slot: str, seconds: float, bucket: int) -> None:
    s = Shard(slot)
    row = s.register_route("web", "api", "svc")
    s.record(row, 200, seconds=seconds)
    w = words_of(s, K_ROUTE, ("web", "api", "svc"))
    first = OFFSETS["buckets"] + 1 * N_BUCKETS  # class 2xx
    assert [i for i in range(N_BUCKETS) if w[first + i]] == [bucket]
    assert len(BUCKETS) == N_BUCKETS and BUCKETS[-1] == float("inf")


def test_upstream_histogram_only_when_forwarded(slot: str) -> None:
    s = Shard(slot)
    row = s.register_route("web", "api", "svc")
    srv = s.register_server("svc", "http://a:1")
    s.record(row, 200, seconds=0.01, server_row=srv, upstream_seconds=0.004)
    s.record(row, 502, seconds=0.01, server_row=srv)  # never completed upstream
    w = words_of(s, K_SERVER, ("svc", "http://a:1"))
    assert sum(w[OFFSETS["up_buckets"] : OFFSETS["up_buckets"] + N_BUCKETS]) == 1
    assert w[OFFSETS["up_buckets"] + 3] == 1  # <= 5 ms
    assert w[OFFSETS["up_sum_ns"]] == 4_000_000


def test_reopened_slot_keeps_rows_and_counters(slot: str) -> None:
    s = Shard(slot)
    row = s.register_route("web", "api", "svc")
    ep = s.register_entry("web")
    s.record(row, 200)
    s.add_count(K_ENTRY, ep, OFFSETS["conn_opened"], 3)
    s.add_count(K_ENTRY, ep, OFFSETS["conn_closed"], 1)
    s.close()
    again = Shard(slot)  # a restarted worker in the same slot
    assert again.register_route("web", "api", "svc") == row
    assert again.register_route("web", "new", "svc") == row + 1  # appended after them
    w = words_of(again, K_ROUTE, ("web", "api", "svc"))
    assert w[OFFSETS["requests"] + 1] == 1
    again.record(row, 200)
    assert words_of(again, K_ROUTE, ("web", "api", "svc"))[OFFSETS["requests"] + 1] == 2
    # The previous process's connections are gone: the gauge restarts at 0.
    e = words_of(again, K_ENTRY, ("web",))
    assert e[OFFSETS["conn_opened"]] == 3 and e[OFFSETS["conn_closed"]] == 3


def test_full_table_and_long_labels_share_the_overflow_row(slot: str) -> None:
    s = Shard(slot)
    rows = {s.register_rate(f"r{i}") for i in range(5000)}
    assert len(rows) == 4095 + 1  # 4095 own rows, then the overflow row 0
    assert s.register_rate("r4999") == 0
    assert s.register_rate("r1") == 2
    assert s.register_route("web", "x" * 300, "svc") == 0
    s.add_count(K_RATE, 0, OFFSETS["limited"], 1)
    assert dict(s.table(K_RATE))[("_other",)][OFFSETS["limited"]] == 1


def test_reader_sees_a_writer_in_another_mapping(slot: str) -> None:
    w = Shard(slot)
    r = Shard(slot, readonly=True)
    row = w.register_auth("api", "jwt", "missing credentials")
    w.add_count(K_AUTH, row, 0, 2)
    assert dict(r.table(K_AUTH))[("api", "jwt", "missing credentials")][0] == 2
    assert r.pid == os.getpid()
    with pytest.raises(IndexError):
        w.add_count(K_AUTH, 4096, 0, 1)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\0" * 100, id="short"),
    ],
)
def test_reader_refuses_incomplete_slot(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "slot-9"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        Shard(str(path), readonly=True)


def test_private_shard_counts_in_memory() -> None:
    s = Shard()
    assert s.path is None
    row = s.register_entry("web")
    s.add_count(K_ENTRY, row, 0, 1)
    assert dict(s.table(K_ENTRY))[("web",)][0] == 1
