# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
#
# Theory of operation
# -------------------
# A Router is compiled once from a list of RouteSpecs and is immutable afterwards (a config
# reload builds a new one and swaps a reference). Routes are grouped into host *buckets*: one
# per distinct exact host, one per distinct wildcard suffix, and bucket 0 for routes without
# hosts. A lookup
#   1. finds the method's bit: a linear scan over the distinct method names the routes use
#      (a handful; pointer equality first, since httphead interns the known methods);
#   2. normalises the Host value into a 256-byte stack buffer (port and brackets stripped,
#      one trailing dot dropped, ASCII lowercased; RFC 9110 §4.2.3, §7.2; RFC 3986 §3.2.2) and
#      walks it once from the end, with a running FNV-1a hash of the reversed suffix: at each
#      '.' the suffix after it is probed in the wildcard table (only for suffix lengths some
#      wildcard has), at the start the whole host is probed in the exact table. The result is
#      the list of applicable buckets in descending host rank: exact, wildcards longest first,
#      then bucket 0;
#   3. walks the path once from the front with a running FNV-1a hash and, at every segment
#      boundary, probes the prefix table of each applicable bucket (key path[:i] before a '/'
#      and path[:i+1] after it, and the whole path at the end), then probes the exact table
#      with the full hash. Each hit is a run of routes sorted best first; the run is scanned
#      until the first route whose methods allow the request, or until no route left in it can
#      beat the best candidate so far;
#   4. only if a regex route could still beat that candidate (each bucket's regex run is sorted
#      best first, so its head bounds it) calls Pattern.fullmatch in run order.
# Steps 1-3 make no Python call and allocate nothing; step 4 makes one bytes object for the
# path (once per lookup, and only when a regex is actually tried) and one call per regex.
#
# Bounds
# ------
# Lookup cost does not depend on the number of exact or prefix routes: the host walk is
# O(len(host tail)) with at most one probe per '.' at a wildcard-suffix length that exists;
# the path walk is O(len(path)) bytes plus one probe per applicable bucket per segment
# boundary, and stops after the longest prefix key when no exact-path route applies. The
# tables are fixed at construction with load <= 1/2, so a probe sequence is bounded by the
# longest cluster the configuration itself produced: request bytes can choose which cluster,
# never grow one (no hash flooding). Host values longer than 253 bytes (RFC 1035 §2.3.4) can
# match no exact host; only their last 256 bytes are read, enough for every wildcard suffix.
# Stack use: a 256-byte host buffer and two arrays of 258 bucket ids.
#
# RFC notes: methods are case-sensitive (RFC 9110 §9.1) and compared exactly; HEAD is not
# implied by GET. Host is case-insensitive (RFC 9110 §4.2.3). The path is compared as sent
# (RFC 9112 §3.2, no percent-decoding or dot-segment removal: that is the parser's business).

"""Route lookup for the gateway: host (exact, `*.wildcard`, any), path (exact, prefix, regex)
and method, built once into hash tables and matched in C.

Which route wins. For a request (host, path, method) a route *matches* when its host rule, its
path rule and its method rule all hold, and then has the key

    (priority, host_rank, path_rank, -declaration_index)

compared as a tuple; among all matching routes the largest key wins (so the earliest declared
route wins a full tie). The parts:

* host_rank: (2, 0) if one of the route's hosts equals the request host; otherwise (1, len(S))
  for the longest `*.S` among its hosts that matches; (0, 0) for a route without hosts. A route
  with hosts, none of which matches (or a request without Host), does not match.
  The request host is normalised first: a `[v6]` literal keeps what is between the brackets;
  otherwise everything from the first ':' (the port) is dropped, then one trailing '.'; then
  ASCII letters are lowercased. `*.S` matches a host that ends with `.S` and has at least one
  byte before that dot: `*.example.com` matches `a.example.com` and `a.b.example.com`, not
  `example.com`.
* path_rank: (2, len) for an exact path equal to the request path; (1, len) for a prefix P
  that matches: if P ends with '/', the path starts with P; otherwise the path equals P or
  starts with P + '/' (so `/api` matches `/api`, `/api/`, `/api/x`, not `/apix`; `/` matches
  every path starting with '/'); (0, 0) for a regex that `fullmatch`es the request path (as
  bytes: the pattern is compiled from the UTF-8 encoding of the spec's path).
* methods: a route with methods matches only those (exact, case-sensitive); empty = any.

Priorities override specificity: a prefix `/` route with priority 1 beats an exact-host,
exact-path route with priority 0. Lengths count bytes.
"""

import ipaddress
import re
from dataclasses import dataclass

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memset

cdef extern from *:
    """
    #define FG_FNV_OFFSET 0xcbf29ce484222325ULL
    #define FG_FNV_PRIME 0x100000001b3ULL
    #define FG_GOLDEN 0x9e3779b97f4a7c15ULL
    #define FG_MIX1 0xff51afd7ed558ccdULL
    #define FG_MIX2 0xc4ceb9fe1a85ec53ULL
    #define FG_METHOD_OVERFLOW (1ULL << 63)
    """
    const uint64_t FG_FNV_OFFSET
    const uint64_t FG_FNV_PRIME
    const uint64_t FG_GOLDEN
    const uint64_t FG_MIX1
    const uint64_t FG_MIX2
    const uint64_t FG_METHOD_OVERFLOW

cdef enum:
    HOST_RANK_EXACT = 1024     # above every wildcard rank (1 + at most 253)
    MAX_HOST = 253             # longest host name, RFC 1035 §2.3.4 (text form)
    HOST_BUF = 256             # bytes of the Host tail we read
    MAX_BL = 258               # exact + one per '.' in HOST_BUF + any
    TAG_EXACT_HOST = 0
    TAG_WILD_HOST = 1
    KIND_EXACT = 0
    KIND_PREFIX = 1
    METHOD_BITS = 63           # methods 0..62 own a bit; the rest share bit 63 (checked by set)

cdef int64_t PATH_CLASS_PREFIX = (<int64_t>1) << 32
cdef int64_t PATH_CLASS_EXACT = (<int64_t>2) << 32

_PATH_TYPES = ("exact", "prefix", "regex")
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_HOSTS_HELP = "hosts are names (a.example.com), '*.suffix' wildcards or IPv6 literals ([::1])"


# ---------------------------------------------------------------------------------------------
# RouteSpec: validated and normalised once, at construction


def _as_tuple(value, what):
    if isinstance(value, (str, bytes)):
        kind = type(value).__name__
        raise ValueError(f"{what} must be a sequence of strings, not a single {kind}")
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of strings, got {value!r}") from None


def _normalise_host(host):
    if not isinstance(host, str):
        raise ValueError(f"host {host!r}: must be a string; {_HOSTS_HELP}")
    if not host.isascii():
        raise ValueError(f"host {host!r}: not ASCII; write internationalised names in their "
                         f"IDNA (xn--) form")
    h = host.lower()
    if h in ("*", "*."):
        raise ValueError(f"host {host!r}: a bare wildcard; leave hosts empty to match any host")
    if h.startswith("["):
        if not h.endswith("]"):
            raise ValueError(f"host {host!r}: unterminated '['; {_HOSTS_HELP}")
        h = h[1 : len(h) - 1]
    if ":" in h:
        if "%" in h:
            raise ValueError(f"host {host!r}: IPv6 zone identifiers are not supported")
        try:
            ipaddress.IPv6Address(h)
        except ValueError:
            raise ValueError(f"host {host!r}: ':' is only allowed in an IPv6 literal (no port "
                             f"in a route host); {_HOSTS_HELP}") from None
        return h
    if h.endswith("."):
        h = h[: len(h) - 1]
    name = h[2:] if h.startswith("*.") else h
    if not name:
        raise ValueError(f"host {host!r}: empty; leave hosts empty to match any host")
    if len(name) > MAX_HOST:
        raise ValueError(f"host {host!r}: longer than {MAX_HOST} characters")
    for label in name.split("."):
        if not label:
            raise ValueError(f"host {host!r}: empty label; {_HOSTS_HELP}")
        if len(label) > 63:
            raise ValueError(f"host {host!r}: label {label!r} longer than 63 characters")
        if not _LABEL_CHARS.issuperset(label):
            extra = " ('*' only as a whole first label: '*.suffix')" if "*" in label else ""
            raise ValueError(f"host {host!r}: bad character in {label!r}{extra}; {_HOSTS_HELP}")
    return h


def _check_method(method):
    if not isinstance(method, str) or not method or not _TCHAR.issuperset(method):
        raise ValueError(f"method {method!r}: not an HTTP token (RFC 9110 §9.1)")
    if method != method.upper():
        raise ValueError(f"method {method!r}: methods are case-sensitive (RFC 9110 §9.1); "
                         f"write {method.upper()!r}")
    return method


def _check_path(path, path_type):
    if not isinstance(path, str):
        raise ValueError(f"path {path!r}: must be a string")
    if path_type == "regex":
        try:
            return re.compile(path.encode("utf-8"))
        except re.error as exc:
            raise ValueError(f"path {path!r}: invalid regex: {exc}") from None
    if not path.startswith("/"):
        raise ValueError(f"path {path!r}: an {path_type} path must start with '/'")
    for ch in path:
        if not ("!" <= ch <= "~") or ch in "?#":
            raise ValueError(f"path {path!r}: character {ch!r} not allowed in an {path_type} "
                             f"path (no query or fragment; percent-encode the rest)")
    return None


@dataclass(frozen=True)
class RouteSpec:
    """One route: `target` is returned by Router.match when this route wins.

    Validated on construction (ValueError names the field and the fix): path_type is one of
    exact/prefix/regex; exact and prefix paths start with '/' and are visible ASCII without
    '?' or '#'; a regex compiles (as bytes, fullmatch on the path); hosts are names,
    `*.suffix` wildcards or IPv6 literals and are stored lowercased (brackets and one trailing
    dot removed); methods are uppercase HTTP tokens; priority is a 64-bit integer.
    """

    target: object
    path: str = "/"
    path_type: str = "prefix"
    hosts: tuple = ()
    methods: tuple = ()
    priority: int = 0

    def __post_init__(self):
        if self.target is None:
            raise ValueError("target: must not be None (None means 'no route')")
        if self.path_type not in _PATH_TYPES:
            raise ValueError(f"path_type {self.path_type!r}: must be one of "
                             f"{', '.join(_PATH_TYPES)}")
        _check_path(self.path, self.path_type)
        hosts = tuple(_normalise_host(h) for h in _as_tuple(self.hosts, "hosts"))
        methods = tuple(_check_method(m) for m in _as_tuple(self.methods, "methods"))
        p = self.priority
        if not isinstance(p, int) or isinstance(p, bool):
            raise ValueError(f"priority {p!r}: must be an integer")
        if not -(2**63) <= p < 2**63:
            raise ValueError(f"priority {p!r}: out of the 64-bit range")
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "methods", methods)


# ---------------------------------------------------------------------------------------------
# C helpers: hashing, probing, ranking


cdef inline uint64_t _step(uint64_t h, unsigned char c) noexcept nogil:
    return (h ^ c) * FG_FNV_PRIME


cdef inline uint64_t _fin(uint64_t h, int32_t tag) noexcept nogil:
    # Mix the tag in and finalise (murmur3 fmix64) so low bits index the table well.
    h ^= (<uint64_t>tag + 1) * FG_GOLDEN
    h ^= h >> 33
    h *= FG_MIX1
    h ^= h >> 33
    h *= FG_MIX2
    h ^= h >> 33
    return h


cdef inline const RouteSlot *_probe(const RouteSlot *tab, uint64_t mask, uint64_t h,
                                    const char *key, Py_ssize_t klen,
                                    int32_t tag) noexcept nogil:
    cdef uint64_t i = h & mask
    cdef const RouteSlot *s
    while True:
        s = &tab[i]
        if s.klen < 0:
            return NULL
        if (s.hash == h and s.klen == klen and s.tag == tag
                and memcmp(s.key, key, <size_t>klen) == 0):
            return s
        i = (i + 1) & mask


cdef inline bint _beats(int64_t priority, int32_t host_rank, int64_t path_rank, int32_t index,
                        const RouteBest *best) noexcept nogil:
    if best.index < 0:
        return True
    if priority != best.priority:
        return priority > best.priority
    if host_rank != best.host_rank:
        return host_rank > best.host_rank
    if path_rank != best.path_rank:
        return path_rank > best.path_rank
    return index < best.index


cdef RouteSlot *_build_table(list entries, bint reverse, uint64_t *mask_out) except NULL:
    # entries: (tag, key bytes, start, count). Capacity: a power of two >= 2 * entries.
    cdef Py_ssize_t cap = 8, i, k
    cdef RouteSlot *tab
    cdef uint64_t h, j
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef bytes key
    while cap < 2 * len(entries):
        cap *= 2
    tab = <RouteSlot *>PyMem_Malloc(cap * sizeof(RouteSlot))
    if tab == NULL:
        raise MemoryError()
    for i in range(cap):
        tab[i].klen = -1
    for tag, key, start, count in entries:
        p = <const unsigned char *>PyBytes_AS_STRING(key)
        n = PyBytes_GET_SIZE(key)
        h = FG_FNV_OFFSET
        if reverse:
            for k in range(n - 1, -1, -1):
                h = _step(h, p[k])
        else:
            for k in range(n):
                h = _step(h, p[k])
        h = _fin(h, tag)
        j = h & <uint64_t>(cap - 1)
        while tab[j].klen >= 0:
            j = (j + 1) & <uint64_t>(cap - 1)
        tab[j].hash = h
        tab[j].key = <const char *>p
        tab[j].klen = n
        tab[j].tag = tag
        tab[j].start = start
        tab[j].count = count
    mask_out[0] = <uint64_t>(cap - 1)
    return tab


cdef void *_alloc(Py_ssize_t n, size_t size) except NULL:
    cdef void *p = PyMem_Malloc((n if n > 0 else 1) * size)
    if p == NULL:
        raise MemoryError()
    return p


# ---------------------------------------------------------------------------------------------
# Router


cdef class Router:
    """An immutable route table; see the module docstring for which route wins."""

    def __init__(self, routes):
        cdef Py_ssize_t n, i, b
        cdef int32_t idx
        if self._priority != NULL:
            raise RuntimeError("Router is immutable; build a new one")
        specs = tuple(routes)
        for spec in specs:
            if not isinstance(spec, RouteSpec):
                raise TypeError(f"routes must be RouteSpec instances, got {spec!r}")
        if len(specs) >= 2**31 - 1:
            raise ValueError("too many routes")
        n = len(specs)
        self._specs = specs
        self._n = n
        self._keys = []

        method_pos = {}
        bucket_of = {}                  # (tag, host key) -> bucket id
        rank = [0]
        has_exact = [False]
        max_prefix = [-1]
        regex_runs = [[]]
        runs = {}                       # (path tag, path key) -> [route index]
        priorities = []
        path_ranks = []
        masks = []
        method_sets = []
        fullmatch = []
        for idx, spec in enumerate(specs):
            mask = 0
            for m in dict.fromkeys(spec.methods):
                mb = m.encode("ascii")
                pos = method_pos.setdefault(mb, len(method_pos))
                mask |= 1 << min(pos, METHOD_BITS)
            masks.append(mask)
            method_sets.append(frozenset(m.encode("ascii") for m in spec.methods))
            priorities.append(spec.priority)
            path_b = spec.path.encode("utf-8")
            if spec.path_type == "exact":
                path_ranks.append(PATH_CLASS_EXACT | len(path_b))
                fullmatch.append(None)
            elif spec.path_type == "prefix":
                path_ranks.append(PATH_CLASS_PREFIX | len(path_b))
                fullmatch.append(None)
            else:
                path_ranks.append(0)
                fullmatch.append(re.compile(path_b).fullmatch)
            buckets = []
            for host in dict.fromkeys(spec.hosts):
                if host.startswith("*."):
                    hkey = (TAG_WILD_HOST, host[2:].encode("ascii"))
                    hrank = 1 + len(hkey[1])
                else:
                    hkey = (TAG_EXACT_HOST, host.encode("ascii"))
                    hrank = HOST_RANK_EXACT
                b = bucket_of.get(hkey, -1)
                if b < 0:
                    b = len(rank)
                    bucket_of[hkey] = b
                    rank.append(hrank)
                    has_exact.append(False)
                    max_prefix.append(-1)
                    regex_runs.append([])
                buckets.append(b)
            if not buckets:
                buckets.append(0)
            for b in buckets:
                if spec.path_type == "exact":
                    runs.setdefault((2 * b + KIND_EXACT, path_b), []).append(idx)
                    has_exact[b] = True
                elif spec.path_type == "prefix":
                    runs.setdefault((2 * b + KIND_PREFIX, path_b), []).append(idx)
                    max_prefix[b] = max(max_prefix[b], len(path_b))
                else:
                    regex_runs[b].append(idx)

        def best_first(i):
            return (-priorities[i], i)

        members = []
        path_entries = []
        for (tag, key), run in runs.items():
            run.sort(key=best_first)
            path_entries.append((tag, key, len(members), len(run)))
            members.extend(run)
            self._keys.append(key)
        regex_at = []
        for run in regex_runs:
            run.sort(key=best_first)
            regex_at.append((len(members), len(run)))
            members.extend(run)
        host_entries = []
        memset(self._wild_len, 0, sizeof(self._wild_len))
        for (tag, key), b in bucket_of.items():
            host_entries.append((tag, key, b, 1))
            self._keys.append(key)
            if tag == TAG_WILD_HOST:
                self._wild_len[len(key)] = 1
                self._has_wild = True
        self._has_hosts = len(bucket_of) > 0

        self._targets = tuple(spec.target for spec in specs)
        self._fullmatch = tuple(fullmatch)
        self._method_sets = tuple(method_sets)
        self._method_names = tuple(method_pos)
        self._n_mnames = len(self._method_names)

        self._priority = <int64_t *>_alloc(n, sizeof(int64_t))
        self._path_rank = <int64_t *>_alloc(n, sizeof(int64_t))
        self._method_mask = <uint64_t *>_alloc(n, sizeof(uint64_t))
        for i in range(n):
            self._priority[i] = priorities[i]
            self._path_rank[i] = path_ranks[i]
            self._method_mask[i] = masks[i]
        self._members = <int32_t *>_alloc(len(members), sizeof(int32_t))
        for i in range(len(members)):
            self._members[i] = members[i]
        self._n_buckets = len(rank)
        self._buckets = <RouteBucket *>_alloc(self._n_buckets, sizeof(RouteBucket))
        for b in range(self._n_buckets):
            self._buckets[b].host_rank = rank[b]
            self._buckets[b].has_exact = has_exact[b]
            self._buckets[b].max_prefix = max_prefix[b]
            self._buckets[b].regex_start = regex_at[b][0]
            self._buckets[b].regex_count = regex_at[b][1]
        self._mname_ptr = <const char **>_alloc(self._n_mnames, sizeof(char *))
        self._mname_len = <Py_ssize_t *>_alloc(self._n_mnames, sizeof(Py_ssize_t))
        for i in range(self._n_mnames):
            self._mname_ptr[i] = PyBytes_AS_STRING(self._method_names[i])
            self._mname_len[i] = PyBytes_GET_SIZE(self._method_names[i])
        self._host_tab = _build_table(host_entries, True, &self._host_mask)
        self._path_tab = _build_table(path_entries, False, &self._path_mask)

    def __dealloc__(self):
        PyMem_Free(self._priority)
        PyMem_Free(self._path_rank)
        PyMem_Free(self._method_mask)
        PyMem_Free(self._members)
        PyMem_Free(self._buckets)
        PyMem_Free(self._mname_ptr)
        PyMem_Free(self._mname_len)
        PyMem_Free(self._host_tab)
        PyMem_Free(self._path_tab)

    def __len__(self):
        return self._n

    def __repr__(self):
        return f"<Router {self._n} routes>"

    def match(self, bytes host, bytes path not None, bytes method):
        """Return the winning route's target for (host, path, method), or None.

        host is the Host value as sent (None when absent; port, brackets, case and one trailing
        dot are handled here); path is the request path without the query; method is exact.
        """
        if self._priority == NULL:
            raise RuntimeError("Router was not initialised")
        if host is None:
            return self._lookup(NULL, 0, path, len(path), method, path)
        return self._lookup(host, len(host), path, len(path), method, path)

    cdef object match_c(self, const char *host, Py_ssize_t hlen,
                        const char *path, Py_ssize_t plen, bytes method):
        return self._lookup(host, hlen, path, plen, method, None)

    cdef int _method_ok(self, int32_t idx, uint64_t bit, bytes method) except -1:
        cdef uint64_t m = self._method_mask[idx]
        if m == 0:
            return 1
        if (m & bit) == 0:
            return 0
        if bit != FG_METHOD_OVERFLOW:
            return 1
        # Rare: more than 63 distinct methods in one table; the shared bit needs the set.
        return method in <frozenset>self._method_sets[idx]

    cdef int _scan_run(self, const RouteSlot *s, int32_t host_rank, uint64_t bit,
                       bytes method, RouteBest *best) except -1:
        # The run shares host rank and path rank and is sorted by (-priority, index): the first
        # route that cannot beat `best` ends the scan, the first that allows the method wins.
        cdef int32_t j, idx
        for j in range(s.start, s.start + s.count):
            idx = self._members[j]
            if not _beats(self._priority[idx], host_rank, self._path_rank[idx], idx, best):
                return 0
            if self._method_ok(idx, bit, method):
                best.priority = self._priority[idx]
                best.host_rank = host_rank
                best.path_rank = self._path_rank[idx]
                best.index = idx
                return 0
        return 0

    cdef object _lookup(self, const char *host, Py_ssize_t hlen, const char *path,
                        Py_ssize_t plen, bytes method, object path_obj):
        cdef RouteBest best
        cdef int32_t bl[MAX_BL]          # applicable buckets, host rank descending
        cdef int32_t wl[MAX_BL]          # matching wildcard buckets, shortest suffix first
        cdef Py_ssize_t nb = 0, nw = 0, k, i, s, e, n, m, off, suffix, limit = -1
        cdef char hb[HOST_BUF]
        cdef unsigned char c
        cdef uint64_t bit = 0, h
        cdef const char *mp
        cdef Py_ssize_t ml
        cdef const RouteSlot *slot
        cdef const RouteBucket *bk
        cdef int32_t b, j, idx, tag
        cdef bint need_exact = False, walked = False
        if self._buckets == NULL:         # never initialised (Router.__new__ alone)
            return None
        best.index = -1
        best.priority = 0
        best.host_rank = 0
        best.path_rank = 0

        # 1. method -> bit (0: a method no route names; only method-less routes match)
        if self._n_mnames > 0 and method is not None:
            mp = PyBytes_AS_STRING(method)
            ml = PyBytes_GET_SIZE(method)
            for k in range(self._n_mnames):
                if self._mname_len[k] == ml and (
                        self._mname_ptr[k] == mp
                        or memcmp(self._mname_ptr[k], mp, <size_t>ml) == 0):
                    bit = (<uint64_t>1) << (k if k < METHOD_BITS else METHOD_BITS)
                    break

        # 2. host -> buckets
        if host != NULL and self._has_hosts and hlen > 0:
            s = 0
            e = hlen
            if host[0] == b'[':
                i = 1
                while i < hlen and host[i] != b']':
                    i += 1
                if i < hlen:
                    s = 1
                    e = i
            else:
                i = 0
                while i < hlen and host[i] != b':':
                    i += 1
                e = i
                if e > 0 and host[e - 1] == b'.':
                    e -= 1
            n = e - s
            if n > 0:
                m = n if n <= HOST_BUF else HOST_BUF
                off = n - m
                for i in range(m):
                    c = <unsigned char>host[s + off + i]
                    if b'A' <= c <= b'Z':
                        c += 32
                    hb[i] = <char>c
                h = FG_FNV_OFFSET
                i = m - 1
                while i >= 0:
                    c = <unsigned char>hb[i]
                    if c == b'.' and self._has_wild and off + i > 0:
                        suffix = m - 1 - i
                        if 0 < suffix <= MAX_HOST and self._wild_len[suffix]:
                            slot = _probe(self._host_tab, self._host_mask,
                                          _fin(h, TAG_WILD_HOST), hb + i + 1, suffix,
                                          TAG_WILD_HOST)
                            if slot != NULL:
                                wl[nw] = slot.start
                                nw += 1
                    h = _step(h, c)
                    i -= 1
                if off == 0 and n <= MAX_HOST:
                    slot = _probe(self._host_tab, self._host_mask, _fin(h, TAG_EXACT_HOST),
                                  hb, m, TAG_EXACT_HOST)
                    if slot != NULL:
                        bl[nb] = slot.start
                        nb += 1
                while nw > 0:
                    nw -= 1
                    bl[nb] = wl[nw]
                    nb += 1
        bl[nb] = 0
        nb += 1

        # 3. exact and prefix paths: one forward walk, probing at segment boundaries
        for k in range(nb):
            bk = &self._buckets[bl[k]]
            if bk.max_prefix > limit:
                limit = bk.max_prefix
            if bk.has_exact:
                need_exact = True
        if limit >= 0 or need_exact:
            h = FG_FNV_OFFSET
            i = 0
            while i < plen:
                c = <unsigned char>path[i]
                if c == b'/':
                    # path[:i] as a prefix without a trailing '/' (the path continues with '/')
                    if i > 0 and path[i - 1] != b'/' and i <= limit:
                        self._probe_runs(bl, nb, h, path, i, KIND_PREFIX, bit, method, &best)
                    h = _step(h, c)
                    if i + 1 <= limit:
                        self._probe_runs(bl, nb, h, path, i + 1, KIND_PREFIX, bit, method,
                                         &best)
                else:
                    h = _step(h, c)
                i += 1
                if i > limit and not need_exact:
                    break
            else:
                walked = True
            if walked:
                if plen > 0 and path[plen - 1] != b'/' and plen <= limit:
                    self._probe_runs(bl, nb, h, path, plen, KIND_PREFIX, bit, method, &best)
                if need_exact:
                    self._probe_runs(bl, nb, h, path, plen, KIND_EXACT, bit, method, &best)

        # 4. regex, only where one could still beat the best so far
        for k in range(nb):
            bk = &self._buckets[bl[k]]
            for j in range(bk.regex_start, bk.regex_start + bk.regex_count):
                idx = self._members[j]
                if not _beats(self._priority[idx], bk.host_rank, 0, idx, &best):
                    break
                if not self._method_ok(idx, bit, method):
                    continue
                if path_obj is None:
                    path_obj = PyBytes_FromStringAndSize(path, plen)
                if self._fullmatch[idx](path_obj) is not None:
                    best.priority = self._priority[idx]
                    best.host_rank = bk.host_rank
                    best.path_rank = 0
                    best.index = idx
                    break

        if best.index < 0:
            return None
        return <object>PyTuple_GET_ITEM(self._targets, best.index)

    cdef int _probe_runs(self, const int32_t *bl, Py_ssize_t nb, uint64_t h, const char *path,
                         Py_ssize_t plen, int kind, uint64_t bit, bytes method,
                         RouteBest *best) except -1:
        # Probe path[:plen] (running hash h) in each applicable bucket's table of `kind`.
        cdef Py_ssize_t k
        cdef int32_t b, tag
        cdef const RouteBucket *bk
        cdef const RouteSlot *slot
        for k in range(nb):
            b = bl[k]
            bk = &self._buckets[b]
            if kind == KIND_PREFIX:
                if bk.max_prefix < plen:
                    continue
            elif not bk.has_exact:
                continue
            tag = 2 * b + kind
            slot = _probe(self._path_tab, self._path_mask, _fin(h, tag), path, plen, tag)
            if slot != NULL:
                self._scan_run(slot, bk.host_rank, bit, method, best)
        return 0
