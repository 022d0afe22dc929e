"""Route lookup for the gateway: host (exact, `*.wildcard`, any), path (exact, prefix, regex),
method. Among all routes that match, the highest `priority` wins; on equal priority the most
specific wins: exact host > longer wildcard > any host; then exact path > longer prefix > regex
(earlier regex first); then the earlier declared route. Precisely, the winner has the largest
key (priority, host_rank, path_rank, -declaration_index), with host_rank (2, 0) exact,
(1, len(suffix)) wildcard, (0, 0) no hosts, and path_rank (2, len) exact, (1, len) prefix,
(0, 0) regex (lengths in bytes).

Host: None means absent (only routes without hosts match). `[v6]:port` keeps the bracketed
address; otherwise the port (from the first ':') and one trailing '.' are dropped; ASCII case
is ignored. `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
Prefixes match on segment boundaries: `/api` matches `/api`, `/api/` and `/api/x`, not
`/apix`; a prefix ending in `/` matches everything below it (`/` matches every path). Regexes
are compiled from the UTF-8 bytes of the path and must `fullmatch` the request path. Methods
are exact: HEAD is not implied by GET. Lookup cost does not grow with the number of
exact/prefix routes (hash tables walked once along the host and once along the path).
"""

from dataclasses import dataclass

@dataclass(frozen=True)
class RouteSpec:
    """One route. Raises ValueError on an invalid field (message names the field and the fix).

    path_type is exact/prefix/regex; exact and prefix paths start with '/' and are visible
    ASCII without '?' or '#'; hosts are stored lowercased (IPv6 without brackets, one trailing
    dot removed); methods are uppercase HTTP tokens; priority fits in 64 bits; target is not
    None. Lists are accepted for hosts and methods and stored as tuples.
    """

    target: object
    path: str = "/"
    path_type: str = "prefix"  # "exact" | "prefix" | "regex"
    hosts: tuple[str, ...] = ()  # empty = any host
    methods: tuple[str, ...] = ()  # empty = any method
    priority: int = 0

class Router:
    def __init__(self, routes: list[RouteSpec]) -> None:
        """Compile the routes (TypeError for a non-RouteSpec); the table is immutable."""
    def match(self, host: bytes | None, path: bytes, method: bytes) -> object | None:
        """The winning route's target for this request, or None when no route matches."""
    def __len__(self) -> int: ...
