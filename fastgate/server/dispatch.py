"""The one Python call per request, made only for routes that have a middleware chain.

`ConnCore` parses and routes in C; when the route's chain is not empty it calls
`dispatch(conn, head)`. Each middleware may continue (None), answer (LocalReply), or return an
awaitable; then the rest of the chain runs in `_resume` once it resolves.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastgate.middleware.base import LocalReply, RequestContext


def dispatch(conn: Any, head: Any) -> Any:
    """Run the route's chain for one request; see the module docstring for the result.

    When the route's CredentialCache answered for chain[0] in C, the connection carries that
    identity (`fast_identity`) and the chain starts after it (`chain_start`). The identity
    the chain ends with is left on the connection (`conn.identity`) for the access log."""
    ctx = RequestContext(conn, head, conn.fast_identity)
    chain = head.route.chain
    for i in range(conn.chain_start, len(chain)):
        verdict = chain[i].on_request(ctx)
        if verdict is not None:
            if type(verdict) is LocalReply:
                if ctx.identity is not None:
                    conn.identity = ctx.identity
                return verdict
            return _resume(ctx, chain, i, verdict)
    if ctx.identity is not None:
        conn.identity = ctx.identity
    return None


async def _resume(ctx: RequestContext, chain: tuple, index: int, pending: Any) -> Any:
    try:
        verdict = await pending
        if verdict is not None:
            return verdict
        for mw in chain[index + 1 :]:
            verdict = mw.on_request(ctx)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if verdict is not None:
                return verdict
        return None
    finally:
        if ctx.identity is not None:
            ctx.conn.identity = ctx.identity
