"""The per-request chain runner: continue, answer, or wait on I/O and resume."""

import asyncio
from types import SimpleNamespace
from typing import Any

from fastgate.middleware.base import LocalReply
from fastgate.server.dispatch import dispatch


class Recorder:
    def __init__(self, log: list[str], name: str, verdict: Any = None, wait: bool = False):
        self.log, self.name, self.verdict, self.wait = log, name, verdict, wait

    def on_request(self, ctx: Any) -> Any:
        self.log.append(self.name)
        if self.wait:

            async def later() -> Any:
                await asyncio.sleep(0)
                return self.verdict

            return later()
        return self.verdict


def head_with(chain: tuple) -> Any:
    return SimpleNamespace(route=SimpleNamespace(chain=chain))


def conn(identity: Any = None, start: int = 0) -> Any:
    """What dispatch reads of the connection: a CredentialCache hit's identity and where the
    chain starts (1 when the hit stood for chain[0])."""
    return SimpleNamespace(fast_identity=identity, chain_start=start)


def test_all_continue_returns_none_in_order() -> None:
    log: list[str] = []
    chain = (Recorder(log, "a"), Recorder(log, "b"))
    assert dispatch(conn(), head_with(chain)) is None
    assert log == ["a", "b"]


def test_a_reply_stops_the_chain() -> None:
    log: list[str] = []
    reply = LocalReply.error(401, "no")
    chain = (Recorder(log, "a", reply), Recorder(log, "b"))
    assert dispatch(conn(), head_with(chain)) is reply
    assert log == ["a"]


def test_an_awaitable_resumes_the_rest_of_the_chain() -> None:
    log: list[str] = []
    reply = LocalReply.error(403, "denied")
    chain = (
        Recorder(log, "a", None, wait=True),
        Recorder(log, "b"),
        Recorder(log, "c", reply, wait=True),
        Recorder(log, "d"),
    )
    pending = dispatch(conn(), head_with(chain))
    assert log == ["a"]
    assert asyncio.run(pending) is reply
    assert log == ["a", "b", "c"]


def test_a_credential_cache_hit_skips_the_first_middleware() -> None:
    log: list[str] = []
    seen: list[Any] = []

    class Reader(Recorder):
        def on_request(self, ctx: Any) -> Any:
            seen.append(ctx.identity)
            return super().on_request(ctx)

    chain = (Recorder(log, "auth"), Reader(log, "next"))
    assert dispatch(conn("alice", 1), head_with(chain)) is None
    assert log == ["next"] and seen == ["alice"]
