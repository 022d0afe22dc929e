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
    """Run the route's chain for one request; see the module docstring for the result."""
    ctx = RequestContext(conn, head)
    i = 0
    for mw in head.route.chain:
        verdict = mw.on_request(ctx)
        if verdict is not None:
            if type(verdict) is LocalReply:
                return verdict
            return _resume(ctx, head.route.chain, i, verdict)
        i += 1
    return None


async def _resume(ctx: RequestContext, chain: tuple, index: int, pending: Any) -> Any:
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
