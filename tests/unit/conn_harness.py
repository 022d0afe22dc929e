"""A real ConnCore without sockets, for unit tests of what the connection does in C: a
transport that records writes, and an Engine on a private loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastgate._core.conn import Engine


class FakeTransport:
    """The asyncio transport a ConnCore writes to (the connection itself is real)."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False  # close at once after an error reply (no lingering close)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def running_engine() -> Iterator[Engine]:
    """For a test's `engine` fixture (`yield from running_engine()`): an Engine on a private
    loop, closed with its loop afterwards."""
    loop = asyncio.new_event_loop()
    eng = Engine(loop, None, tick_interval=1.0)
    yield eng
    eng.close()
    loop.close()
