"""Micro benchmark of the router: ns per Router.match for 10 vs 1,000 prefix routes.

Run: python benchmarks/micro_router.py [--quick]. The numbers include the Python call into
Router.match (the "call overhead" line measures that alone with a builtin method of the same
arity); the connection code calls the C-level match_c and pays only the rest. Lookup cost
should not grow with the number of exact/prefix routes.
"""

from __future__ import annotations

import sys
import timeit

from fastgate._core.router import Router, RouteSpec


def prefix_routes(n: int) -> list[RouteSpec]:
    return [RouteSpec(f"svc{i}", f"/svc{i}/v1") for i in range(n)] + [RouteSpec("root", "/")]


def host_routes(n: int) -> list[RouteSpec]:
    routes = [RouteSpec(f"h{i}", f"/svc{i}/v1", hosts=[f"h{i}.example.com"]) for i in range(n)]
    routes += [RouteSpec(f"w{i}", "/", hosts=[f"*.z{i}.example.com"]) for i in range(n)]
    return [*routes, RouteSpec("root", "/")]


def ns_per_call(fn, args, number: int) -> float:
    names = {"fn": fn, **{f"a{i}": a for i, a in enumerate(args)}}
    stmt = "fn(" + ", ".join(f"a{i}" for i in range(len(args))) + ")"
    best = min(timeit.repeat(stmt, globals=names, number=number, repeat=5))
    return best / number * 1e9


def row(label: str, ns: float) -> None:
    print(f"{label:56s} {ns:7.1f} ns/match")


def main() -> None:
    number = 20_000 if "--quick" in sys.argv else 200_000
    empty: dict[bytes, None] = {}
    row("call overhead alone (dict.get miss, 2 args)", ns_per_call(empty.get, (b"k", None), number))
    one = Router([RouteSpec("only", "/")])
    row("1 route, no hosts", ns_per_call(one.match, (b"a.com", b"/api/users/42", b"GET"), number))
    cases = [
        ("hit /svc{k}/v1/items/42", lambda n: (b"api.example.com", f"/svc{n // 2}/v1/items/42")),
        ("fall back to /: /nothing/here", lambda n: (b"api.example.com", "/nothing/here")),
        ("no Host, 140-byte path", lambda n: (None, f"/svc{n - 1}/v1/" + "seg/" * 30 + "end")),
    ]
    for n in (10, 1000):
        router = Router(prefix_routes(n))
        for label, make in cases:
            host, path = make(n)
            ns = ns_per_call(router.match, (host, path.encode(), b"GET"), number)
            row(f"{n:5d} prefix routes, {label}", ns)
    for n in (10, 1000):
        router = Router(host_routes(n))
        host = f"h{n // 2}.example.com:8443".encode()
        ns = ns_per_call(router.match, (host, f"/svc{n // 2}/v1/x".encode(), b"GET"), number)
        row(f"{n:5d} exact-host + {n} wildcard routes, exact host", ns)
        host = f"a.b.z{n // 2}.example.com".encode()
        ns = ns_per_call(router.match, (host, b"/q", b"GET"), number)
        row(f"{n:5d} exact-host + {n} wildcard routes, wildcard", ns)


if __name__ == "__main__":
    main()
