# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
#
# Theory of operation
# -------------------
# The rate_limit middleware (fastgate/middleware/rate_limit.py) has two halves. This is the C
# half: when a route's first middlewares are local-store rate limits whose key comes from the
# request head alone (client address, header values, the route, constants), they run here as
# a CoreCheck, before the Python chain, and an admitted request costs no Python frame: the key
# is written into a stack buffer, each limit is one RateLimiter.decide_c (fastgate/_core/
# ratelimit.pyx), and check() returns None. Python runs only on the rare paths: building the
# 429 reply, logging a dry-run refusal (at most once per limit per `dry_log_every`), and the
# first request from a trusted proxy on a new entrypoint config (its networks are converted
# once). The Python half uses the same KeyBuilder, LimitSet and InFlight objects, so a
# middleware that runs in C on one route and in Python on another (after an auth middleware,
# or with an identity key) shares its buckets between them byte for byte.
#
# Keys. A key is the concatenation of its parts, each encoded as
#     <kind: 1 byte> <length: 3 bytes, big-endian> <value: length bytes>
# Length-prefixing makes the encoding injective: ["a,b", "c"] and ["a", "b,c"] differ, and a
# header value cannot forge another part. Kinds are listed in ratecheck.pxd. An absent value
# (no such header, no identity) is the part PK_ABSENT with an empty value, so every request
# without the header shares one bucket, unless the middleware skips such requests.
#
# Client address (kind PK_ADDR). IPv4 is 4 bytes; IPv6 is 16 bytes with all but the first
# `ipv6_prefix` bits zeroed (RFC 4291 §2.5: a /64 is one subnet, and one host commonly has
# the whole /64, so limiting per /64 stops a client from rotating through its addresses). An
# IPv4-mapped IPv6 address (::ffff:a.b.c.d, RFC 4291 §2.5.5.2, what a dual-stack listener
# reports for IPv4 peers) is keyed as the IPv4 address. A zone index (`%eth0`, RFC 4007 §11)
# is ignored. Text that is no address (a Unix socket peer) is kept as text (PK_ADDR_TEXT).
#
# X-Forwarded-For. Only when the peer is a trusted proxy (ForwardInfo.trusted, from the
# entrypoint's forwarded.trusted_ips) is X-Forwarded-For read. Its field lines form one list
# in order (RFC 9110 §5.3, elements separated by commas with optional whitespace, §5.6.1),
# each proxy appending the address it received from. Walking from the right, every element
# that is a trusted proxy is skipped; the first one that is not is the client. If all are
# trusted, the leftmost is the client; with no X-Forwarded-For the peer itself is. An address
# is trusted when it is in a network of its own family (as Python's `ipaddress` judges `in`,
# and EntryConfig.is_trusted with it: ::/0 does not cover IPv4; a v4-mapped address is IPv4).
# Elements may carry a port (`1.2.3.4:80`, `[2001:db8::1]:80`); an element that does not
# parse stops the walk and is the client, as text: it was written by a trusted proxy, so it
# names whatever that proxy saw, and everything left of it is client-controlled and ignored.
#
# Limits. A LimitSet decides every limit of one middleware for one key, in order, and stops
# at the first enforcing limit that refuses: a refused request is charged to the limits
# before it (they admitted it) but not to those after it. Dry-run limits are decided and
# counted (a dry-run admission is charged like any other) but never refuse. The Redis script
# (fastgate/ratelimit/redis.py) follows the same order and stopping rule.
#
# In flight. InFlight counts the requests of each key whose exchange has not ended; a slot
# is taken before the rate limits are decided (a request refused for concurrency spends no
# rate; one refused by a rate limit holds its slot only until its 429 is written) and given
# back by CoreCheck.complete() (C path) or the conn.on_done callback (Python path) when the
# exchange ends or the connection is lost, whichever comes first. Taking it first is also
# what keeps the Python path leak-free: the slot and its release are registered while the
# connection is known to be open, before any await. Only keys with requests in flight are
# stored.
#
# Hybrid store. A LimitSet built with `tallies` (one RateLimiter per limit used as a key ->
# amount tally, see ratelimit.pyx) adds cost * T to the key's tally on every admission, in C;
# the store's sync task drains the tallies, pushes them to Redis and raises the local TATs
# from the global debts (fastgate/ratelimit/hybrid.py). While the store is not synced (Redis
# down, or its sync task not yet started) it sets `down`, and a RateCheck hands the decision
# to its `fallback` (the Python path, which applies the outage policy): the only Python call
# of the hybrid C path, and only then.
#
# What the exchange is told. The connection's ExchangeRecord (stats.pxd) carries the route's
# rate-limit decision to the metrics and the access log at the exchange end, and a refusal to
# the audit line. The check writes it with plain C field stores: `rec.rate` takes the worst of
# its value and this decision (RATE_ALLOWED, or RATE_LIMITED for a refusal), and a refusal
# that is the exchange's first sets `rec.deny` = DENY_RATE_LIMITED with `deny_source` (the
# middleware's name) and `deny_reason` (a phrase preallocated at import: "limit <i> exceeded",
# "too many in flight"), so an admitted request costs no Python call for it. While the hybrid
# store is down the fallback (Python) decides and tells the connection itself (RATE_FALLBACK
# for an admission by the outage policy). A request whose key has an absent part and is
# skipped gets no decision (RATE_NONE).
#
# The client address for the access log (`resolved_client_ip`) is the same X-Forwarded-For
# walk as the key's client_ip part, written as text: IPv4 dotted, IPv6 in the compressed form
# of RFC 5952 §4 (lowercase, the longest run of two or more zero groups as "::", the first
# such run on a tie: what `ipaddress` writes), never masked by ipv6_prefix, a v4-mapped
# address as IPv4, an element that does not parse as its text. Its NetSets are cached per
# EntryConfig in a module dict emptied when it reaches NETSET_CACHE entries, so reloads
# cannot grow it.
#
# Bounds
# ------
# Per request (C path): one pass over the key parts; a header part is one Head.find (linear
# in the header count, at most Limits.max_headers); client_ip from a trusted proxy walks the
# X-Forwarded-For lines once (linear in their length) and tests each element against the
# trusted networks (linear in their count). Keys up to KEY_STACK bytes live on the stack; a
# longer key (long header values) is built in one malloc'd buffer freed before returning.
# Memory: the RateLimiter tables (bounded by their max_keys), InFlight (one dict entry per
# key with a request in flight, at most the number of open connections), and one NetSet per
# entrypoint config seen (entrypoints x generations of one middleware instance).

"""Rate-limit keys, limit sets and in-flight counters for the rate_limit middleware, in C."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from fastgate._core.conn cimport ConnCore, CoreCheck, EntryConfig
from fastgate._core.httphead cimport HF_FORWARDED, RequestHead, header_name_is
from fastgate._core.ratelimit cimport Decision, RateLimiter, monotonic_us
from fastgate._core.stats cimport DENY_NONE, DENY_RATE_LIMITED, RATE_ALLOWED, RATE_LIMITED
from fastgate._core.writer cimport ForwardInfo

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "<sys/socket.h>" nogil:
    int AF_INET
    int AF_INET6

cdef extern from *:
    """
    #define FG_RC_LLONG_MAX 0x7fffffffffffffffLL
    """
    long long FG_RC_LLONG_MAX

cdef uint8_t V4_MAPPED[12]
memset(V4_MAPPED, 0, 10)
V4_MAPPED[10] = 0xFF
V4_MAPPED[11] = 0xFF

# The audit reasons of a refusal (one object each, made once: the C path only stores them).
LIMIT_REASONS = tuple(f"limit {i} exceeded" for i in range(MAX_LIMITS))
BUSY_REASON = "too many in flight"
UNAVAILABLE_REASON = "rate limit store unavailable"
cdef tuple _LIMIT_REASONS = LIMIT_REASONS
cdef str _BUSY_REASON = BUSY_REASON

_KINDS = {
    "const": PK_CONST,
    "route": PK_ROUTE,
    "client_ip": PK_ADDR,
    "header": PK_HEADER,
    "extra": PK_EXTRA,
}


# ---- addresses -------------------------------------------------------------------------------

cdef int parse_ip(const char *text, Py_ssize_t n, uint8_t *out) noexcept nogil:
    """Parse an address as found in a peer name or an X-Forwarded-For element: IPv4
    (optionally `:port`), IPv6 (optionally `%zone`), `[IPv6]` (optionally `:port`). Writes 16
    bytes (IPv4 as v4-mapped) and returns 4 or 6 (a v4-mapped IPv6 counts as 4); 0 when the
    text is no address."""
    cdef char tmp[64]
    cdef Py_ssize_t i, start = 0, end = n, colons = 0
    if n <= 0:
        return 0
    if text[0] == b'[':
        start = 1
        end = -1
        for i in range(1, n):
            if text[i] == b']':
                end = i
                break
        if end < 0:
            return 0
        if end + 1 < n and text[end + 1] != b':':
            return 0
    else:
        for i in range(n):
            if text[i] == b':':
                colons += 1
        if colons == 1:            # IPv4 with a port
            for i in range(n):
                if text[i] == b':':
                    end = i
                    break
    for i in range(start, end):    # a zone index belongs to the host, not the address
        if text[i] == b'%':
            end = i
            break
    if end - start <= 0 or end - start >= 64:
        return 0
    memcpy(tmp, text + start, end - start)
    tmp[end - start] = 0
    for i in range(end - start):
        if tmp[i] == b':':
            if inet_pton(AF_INET6, tmp, out) != 1:
                return 0
            if memcmp(out, V4_MAPPED, 12) == 0:
                return 4
            return 6
    memcpy(out, V4_MAPPED, 12)
    if inet_pton(AF_INET, tmp, out + 12) != 1:
        return 0
    return 4


cdef class NetSet:
    """Networks as 16-byte prefixes (IPv4 as ::ffff:0:0/96 plus its prefix)."""

    def __cinit__(self):
        self.addrs = NULL
        self.prefixes = NULL
        self.families = NULL
        self.n = 0

    def __init__(self, networks=()):
        import ipaddress
        nets = []
        for net in networks:
            net = ipaddress.ip_network(net, strict=False)
            if net.version == 4:
                nets.append((b"\0" * 10 + b"\xff\xff" + net.network_address.packed,
                             net.prefixlen + 96, 4))
            else:
                nets.append((net.network_address.packed, net.prefixlen, 6))
        self.addrs = <uint8_t *>malloc(16 * len(nets) + 1)
        self.prefixes = <int *>malloc(sizeof(int) * len(nets) + 1)
        self.families = <uint8_t *>malloc(len(nets) + 1)
        if self.addrs == NULL or self.prefixes == NULL or self.families == NULL:
            raise MemoryError()
        cdef bytes packed
        cdef Py_ssize_t i = 0
        for packed, prefix, family in nets:
            memcpy(self.addrs + 16 * i, PyBytes_AS_STRING(packed), 16)
            self.prefixes[i] = prefix
            self.families[i] = family
            i += 1
        self.n = len(nets)

    def __dealloc__(self):
        free(self.addrs)
        free(self.prefixes)
        free(self.families)

    def __len__(self):
        return self.n

    cdef bint contains(self, const uint8_t *addr16, int family) noexcept nogil:
        cdef Py_ssize_t i
        cdef int bits, full, rest
        cdef const uint8_t *net
        for i in range(self.n):
            if self.families[i] != family:
                continue
            net = self.addrs + 16 * i
            bits = self.prefixes[i]
            full = bits >> 3
            rest = bits & 7
            if full and memcmp(net, addr16, full) != 0:
                continue
            if rest and ((net[full] ^ addr16[full]) & <uint8_t>(0xFF << (8 - rest))) != 0:
                continue
            return True
        return False

    def contains_text(self, str address):
        """Whether `address` (text, as parse_ip reads it) is in one of the networks."""
        cdef uint8_t a[16]
        cdef bytes b = address.encode()
        cdef int family = parse_ip(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), a)
        if family == 0:
            return False
        return self.contains(a, family)


cdef int walk_client(bytes peer, bint trusted, NetSet nets, RequestHead head, uint8_t *a,
                     const char **text, Py_ssize_t *tlen) noexcept:
    """The client's address: the peer, or the X-Forwarded-For walk of the module docstring
    when the peer is a trusted proxy (`nets` not None) and there is a head. Returns 4 or 6
    with the address in `a` (16 bytes, IPv4 v4-mapped), or 0 with the address's text in
    `text`/`tlen` (pointing into `peer` or `head.raw`)."""
    cdef uint8_t left[16]
    cdef int fam, left_fam = 0
    cdef Py_ssize_t i, s, e, vs, ve, es, ee
    cdef const char *raw
    cdef const uint32_t *off
    if trusted and nets is not None and head is not None and head.n_headers:
        raw = PyBytes_AS_STRING(head.raw)
        i = head.n_headers - 1
        while i >= 0:
            off = head.offs + 4 * i
            if (head.flags[i] & HF_FORWARDED) and header_name_is(raw, off, "x-forwarded-for", 15):
                vs = off[2]
                ve = off[3]
                e = ve
                while e > vs:
                    s = e
                    while s > vs and raw[s - 1] != b',':
                        s -= 1
                    es = s
                    ee = e
                    while es < ee and is_ows(raw[es]):
                        es += 1
                    while ee > es and is_ows(raw[ee - 1]):
                        ee -= 1
                    e = s - 1
                    if ee == es:
                        continue        # an empty list element (RFC 9110 §5.6.1)
                    fam = parse_ip(raw + es, ee - es, a)
                    if fam == 0:
                        text[0] = raw + es
                        tlen[0] = ee - es
                        return 0
                    if not nets.contains(a, fam):
                        return fam
                    memcpy(left, a, 16)
                    left_fam = fam
            i -= 1
        if left_fam:
            memcpy(a, left, 16)
            return left_fam
    fam = parse_ip(PyBytes_AS_STRING(peer), PyBytes_GET_SIZE(peer), a)
    if fam == 0:
        text[0] = PyBytes_AS_STRING(peer)
        tlen[0] = PyBytes_GET_SIZE(peer)
    return fam


cdef Py_ssize_t format_ip(int fam, const uint8_t *a, char *out) noexcept nogil:
    """`a` (16 bytes as parse_ip writes them) as text into `out` (>= 40 bytes): IPv4 dotted
    (family 4), IPv6 in the RFC 5952 §4 compressed form (family 6). Returns the length."""
    cdef Py_ssize_t n = 0
    cdef int i, v, best = -1, best_len = 0, run = 0
    cdef unsigned int g
    cdef unsigned int groups[8]
    cdef const char *hexd = "0123456789abcdef"
    if fam == 4:
        for i in range(12, 16):
            v = a[i]
            if v >= 100:
                out[n] = <char>(48 + v // 100)
                n += 1
            if v >= 10:
                out[n] = <char>(48 + (v // 10) % 10)
                n += 1
            out[n] = <char>(48 + v % 10)
            n += 1
            if i < 15:
                out[n] = b'.'
                n += 1
        return n
    for i in range(8):
        groups[i] = (<unsigned int>a[2 * i] << 8) | a[2 * i + 1]
    for i in range(8):             # the longest run of zero groups, the first on a tie
        if groups[i] == 0:
            run += 1
            if run > best_len:
                best_len = run
                best = i - run + 1
        else:
            run = 0
    if best_len < 2:               # a single zero group is written, not compressed (§4.2.2)
        best = -1
    i = 0
    while i < 8:
        if i == best:
            out[n] = b':'
            out[n + 1] = b':'
            n += 2
            i += best_len
            continue
        if i and i != best + best_len:
            out[n] = b':'
            n += 1
        g = groups[i]
        if g >= 0x1000:
            out[n] = hexd[g >> 12]
            n += 1
        if g >= 0x100:
            out[n] = hexd[(g >> 8) & 15]
            n += 1
        if g >= 0x10:
            out[n] = hexd[(g >> 4) & 15]
            n += 1
        out[n] = hexd[g & 15]
        n += 1
        i += 1
    return n


cdef enum:
    NETSET_CACHE = 16               # EntryConfigs whose NetSet resolved_client_ip keeps

cdef dict _netsets = {}             # EntryConfig -> NetSet, for resolved_client_ip


def resolved_client_ip(ConnCore conn not None):
    """The client address of the request on `conn`, as text bytes (b"" when unknown): the
    peer, or behind a trusted proxy the X-Forwarded-For walk of the module docstring (the
    access log calls it for connections from trusted proxies)."""
    cdef ForwardInfo fwd = conn.fwd
    cdef EntryConfig cfg = conn.cfg
    cdef NetSet nets = None
    cdef uint8_t a[16]
    cdef char out[48]
    cdef const char *text = NULL
    cdef Py_ssize_t tlen = 0
    cdef int fam
    if fwd is None:
        return b""
    if fwd.trusted and cfg is not None:
        nets = _netsets.get(cfg)
        if nets is None:
            if len(_netsets) >= NETSET_CACHE:
                _netsets.clear()        # retired configs go; live ones come back on use
            nets = NetSet(cfg.trusted_nets)
            _netsets[cfg] = nets
    fam = walk_client(fwd.client_ip, fwd.trusted, nets, conn.head, a, &text, &tlen)
    if fam == 0:
        return PyBytes_FromStringAndSize(text, tlen)
    return PyBytes_FromStringAndSize(out, format_ip(fam, a, out))


def client_ip_for(bytes peer not None, bint trusted, trusted_nets, RequestHead head=None):
    """resolved_client_ip for a request from `peer` (address text) with `head`, `trusted`
    saying whether the peer is a trusted proxy of `trusted_nets` (tests, tools)."""
    cdef NetSet nets = NetSet(trusted_nets) if trusted else None
    cdef uint8_t a[16]
    cdef char out[48]
    cdef const char *text = NULL
    cdef Py_ssize_t tlen = 0
    cdef int fam = walk_client(peer, trusted, nets, head, a, &text, &tlen)
    if fam == 0:
        return PyBytes_FromStringAndSize(text, tlen)
    return PyBytes_FromStringAndSize(out, format_ip(fam, a, out))


# ---- keys ------------------------------------------------------------------------------------

cdef inline Py_ssize_t put_part(char *buf, Py_ssize_t cap, Py_ssize_t pos, int kind,
                                const char *value, Py_ssize_t n) noexcept nogil:
    """Append one encoded part when it fits; always return the position after it."""
    if n > MAX_PART_VALUE:
        n = MAX_PART_VALUE
    if pos + 4 + n <= cap:
        buf[pos] = <char>kind
        buf[pos + 1] = <char>((n >> 16) & 0xFF)
        buf[pos + 2] = <char>((n >> 8) & 0xFF)
        buf[pos + 3] = <char>(n & 0xFF)
        if n:
            memcpy(buf + pos + 4, value, n)
    return pos + 4 + n


cdef inline bint is_ows(char c) noexcept nogil:
    return c == b' ' or c == b'\t'


cdef class KeyBuilder:
    """Builds a limiter key from a request: `spec` is a sequence of (kind, argument) parts,
    kind one of const (bytes), route (bytes, the route name), client_ip (None), header
    (bytes, the name, any case), extra (int: the index into the `extras` given per request).
    `ipv6_prefix` is how many leading bits of an IPv6 client address are kept."""

    def __init__(self, spec, int ipv6_prefix=64):
        cdef int i, bits
        parts = tuple(spec)
        if not parts:
            raise ValueError("a key needs at least one part")
        if len(parts) > MAX_PARTS:
            raise ValueError(f"a key has at most {MAX_PARTS} parts, got {len(parts)}")
        if not 1 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 1..128, got {ipv6_prefix}")
        args = []
        self.needs_extras = False
        for i, (kind, arg) in enumerate(parts):
            code = _KINDS.get(kind)
            if code is None:
                raise ValueError(f"unknown key part kind {kind!r}")
            if code in (PK_CONST, PK_ROUTE, PK_HEADER):
                if not isinstance(arg, bytes):
                    raise TypeError(f"key part {kind} needs bytes, got {arg!r}")
                if code == PK_HEADER:
                    if not arg:
                        raise ValueError("a header part needs a name")
                    arg = arg.lower()
            elif code == PK_EXTRA:
                if not isinstance(arg, int) or arg < 0:
                    raise TypeError(f"key part extra needs an index >= 0, got {arg!r}")
                self.needs_extras = True
            else:
                arg = None
            self.kinds[i] = code
            args.append(arg)
        self.spec = parts
        self.args = tuple(args)
        for i in range(len(parts)):
            arg = self.args[i]
            if isinstance(arg, bytes):
                self.argp[i] = PyBytes_AS_STRING(arg)
                self.argn[i] = PyBytes_GET_SIZE(arg)
            else:
                self.argp[i] = NULL
                self.argn[i] = arg if isinstance(arg, int) else 0
        self.nparts = len(parts)
        self.ipv6_prefix = ipv6_prefix
        self.netsets = {}
        memset(self.v6mask, 0, 16)
        bits = ipv6_prefix
        for i in range(16):
            if bits >= 8:
                self.v6mask[i] = 0xFF
                bits -= 8
            elif bits > 0:
                self.v6mask[i] = <uint8_t>(0xFF << (8 - bits))
                bits = 0

    cdef NetSet nets_for(self, object cfg):
        nets = self.netsets.get(cfg)
        if nets is None:
            nets = NetSet(cfg.trusted_nets)
            self.netsets[cfg] = nets
        return <NetSet>nets

    cdef Py_ssize_t put_addr(self, char *buf, Py_ssize_t cap, Py_ssize_t pos, int fam,
                                    uint8_t *a, const char *text, Py_ssize_t tlen) noexcept:
        cdef int i
        if fam == 4:
            return put_part(buf, cap, pos, PK_ADDR, <const char *>a + 12, 4)
        if fam == 6:
            for i in range(16):
                a[i] &= self.v6mask[i]
            return put_part(buf, cap, pos, PK_ADDR, <const char *>a, 16)
        return put_part(buf, cap, pos, PK_ADDR_TEXT, text, tlen)

    cdef Py_ssize_t build(self, ConnCore conn, RequestHead head, tuple extras, char *buf,
                          Py_ssize_t cap, bint *absent) except -1:
        cdef ForwardInfo fwd = conn.fwd
        cdef NetSet nets = None
        if fwd.trusted and self.kinds_need_addr():
            nets = self.nets_for(conn.cfg)
        return self.build_from(fwd.client_ip, fwd.trusted, nets, head, extras, buf, cap,
                               absent)

    cdef bint kinds_need_addr(self) noexcept:
        cdef int i
        for i in range(self.nparts):
            if self.kinds[i] == PK_ADDR:
                return True
        return False

    cdef Py_ssize_t build_from(self, bytes peer, bint trusted, NetSet nets, RequestHead head,
                               tuple extras, char *buf, Py_ssize_t cap,
                               bint *absent) except -1:
        cdef Py_ssize_t pos = 0, idx
        cdef int i, kind, fam
        cdef uint8_t a[16]
        cdef bytes value
        cdef const char *raw
        cdef const uint32_t *off
        absent[0] = False
        for i in range(self.nparts):
            kind = self.kinds[i]
            if kind == PK_ADDR:
                pos = self.put_client(buf, cap, pos, peer, trusted, nets, head)
            elif kind == PK_HEADER:
                idx = head.find(self.argp[i], self.argn[i])
                if idx < 0:
                    absent[0] = True
                    pos = put_part(buf, cap, pos, PK_ABSENT, NULL, 0)
                else:
                    raw = PyBytes_AS_STRING(head.raw)
                    off = head.offs + 4 * idx
                    pos = put_part(buf, cap, pos, PK_HEADER, raw + off[2], off[3] - off[2])
            elif kind == PK_EXTRA:
                idx = self.argn[i]
                obj = extras[idx] if extras is not None and idx < len(extras) else None
                if obj is None:
                    absent[0] = True
                    pos = put_part(buf, cap, pos, PK_ABSENT, NULL, 0)
                else:
                    value = <bytes?>obj
                    pos = put_part(buf, cap, pos, PK_EXTRA, PyBytes_AS_STRING(value),
                                   PyBytes_GET_SIZE(value))
            else:
                pos = put_part(buf, cap, pos, kind, self.argp[i], self.argn[i])
        return pos

    cdef Py_ssize_t put_client(self, char *buf, Py_ssize_t cap, Py_ssize_t pos, bytes peer,
                               bint trusted, NetSet nets, RequestHead head) noexcept:
        """The client address part: the peer, or the X-Forwarded-For walk of the module
        docstring when the peer is a trusted proxy."""
        cdef uint8_t a[16]
        cdef const char *text = NULL
        cdef Py_ssize_t tlen = 0
        cdef int fam = walk_client(peer, trusted, nets, head, a, &text, &tlen)
        return self.put_addr(buf, cap, pos, fam, a, text, tlen)

    cdef tuple _key(self, bytes peer, bint trusted, NetSet nets, RequestHead head,
                    tuple extras, ConnCore conn):
        cdef char stack[KEY_STACK]
        cdef char *buf = stack
        cdef bint absent = False
        cdef Py_ssize_t n
        if conn is not None:
            n = self.build(conn, head, extras, stack, KEY_STACK, &absent)
        else:
            n = self.build_from(peer, trusted, nets, head, extras, stack, KEY_STACK, &absent)
        if n <= KEY_STACK:
            return PyBytes_FromStringAndSize(stack, n), absent
        buf = <char *>malloc(n)
        if buf == NULL:
            raise MemoryError()
        try:
            if conn is not None:
                self.build(conn, head, extras, buf, n, &absent)
            else:
                self.build_from(peer, trusted, nets, head, extras, buf, n, &absent)
            return PyBytes_FromStringAndSize(buf, n), absent
        finally:
            free(buf)

    def key(self, ConnCore conn not None, RequestHead head not None, tuple extras=()):
        """(key bytes, some part absent) for a request on `conn` (the Python path)."""
        return self._key(None, False, None, head, extras, conn)

    def key_for(self, bytes peer not None, bint trusted, trusted_nets,
                RequestHead head not None, tuple extras=()):
        """(key bytes, some part absent) for a request from `peer` (address text), with
        `trusted` saying whether the peer is a trusted proxy of `trusted_nets`."""
        nets = NetSet(trusted_nets)
        return self._key(peer, trusted, nets, head, extras, None)


def encode_part(int kind, bytes value not None):
    """One encoded key part (for tests and for keys built in Python)."""
    cdef char stack[KEY_STACK]
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    if n + 4 > KEY_STACK:
        return (bytes([kind]) + n.to_bytes(3, "big") + value)
    n = put_part(stack, KEY_STACK, 0, kind, PyBytes_AS_STRING(value), n)
    return PyBytes_FromStringAndSize(stack, n)


PART_KINDS = {
    "const": PK_CONST, "route": PK_ROUTE, "addr": PK_ADDR, "addr_text": PK_ADDR_TEXT,
    "header": PK_HEADER, "absent": PK_ABSENT, "extra": PK_EXTRA,
}


# ---- limits ----------------------------------------------------------------------------------

cdef class LimitSet:
    """The limits of one middleware: `limiters` (RateLimiter each), with a `cost` and a
    `dry_run` flag per limit. `dry_log(index, key, refusals)` is called for a dry-run refusal
    at most once per `dry_log_every` seconds per limit (refusals: how many since the last
    call); exceptions from it are swallowed (it only logs)."""

    def __init__(self, limiters, costs, dry_runs, dry_log=None, double dry_log_every=10.0,
                 tallies=None):
        cdef int i
        limiters = tuple(limiters)
        costs = tuple(costs)
        dry_runs = tuple(dry_runs)
        if not 1 <= len(limiters) <= MAX_LIMITS:
            raise ValueError(f"1 to {MAX_LIMITS} limits, got {len(limiters)}")
        if len(costs) != len(limiters) or len(dry_runs) != len(limiters):
            raise ValueError("one cost and one dry_run flag per limit")
        for i in range(len(limiters)):
            if not isinstance(limiters[i], RateLimiter):
                raise TypeError(f"limit {i} is not a RateLimiter")
            if costs[i] < 0 or costs[i] > 0x7FFFFFFF:
                raise ValueError(f"cost must be 0..2**31-1, got {costs[i]}")
            self.costs[i] = costs[i]
            self.dry[i] = bool(dry_runs[i])
            self._allowed[i] = 0
            self._denied[i] = 0
            self._dry_pending[i] = 0
            self._dry_log_at[i] = 0
        if tallies is not None:
            tallies = tuple(tallies)
            if len(tallies) != len(limiters):
                raise ValueError("one tally per limit")
            for i in range(len(limiters)):
                if not isinstance(tallies[i], RateLimiter):
                    raise TypeError(f"tally {i} is not a RateLimiter")
                self._amounts[i] = <long long>costs[i] * (<RateLimiter>limiters[i]).emission_us
        self.tallies = tallies
        self.down = False
        self.limiters = limiters
        self.n = len(limiters)
        self.dry_log = dry_log
        self.dry_log_every_us = <long long>(dry_log_every * 1e6)

    cdef int decide_c(self, const char *key, Py_ssize_t klen, long long now_us,
                      Decision *out) except -2:
        cdef int i, refused = -1
        cdef Decision d
        cdef bint have = False
        for i in range(self.n):
            (<RateLimiter>self.limiters[i]).decide_c(key, klen, now_us, self.costs[i], &d)
            if d.allowed:
                self._allowed[i] += 1
                if self.tallies is not None:
                    (<RateLimiter>self.tallies[i]).add_c(key, klen, self._amounts[i])
                if not self.dry[i] and (not have or d.remaining < out.remaining):
                    out[0] = d
                    have = True
            else:
                self._denied[i] += 1
                if not self.dry[i]:
                    out[0] = d
                    return i
                self._dry_pending[i] += 1
                if self.dry_log is not None and now_us >= self._dry_log_at[i]:
                    self._dry_log_at[i] = now_us + self.dry_log_every_us
                    self._log_dry(i, key, klen)
        if not have:
            out[0] = d
        return refused

    cdef void _log_dry(self, int i, const char *key, Py_ssize_t klen) noexcept:
        cdef unsigned long long count = self._dry_pending[i]
        self._dry_pending[i] = 0
        try:
            self.dry_log(i, PyBytes_FromStringAndSize(key, klen), count)
        except Exception:
            pass

    def decide(self, bytes key not None, now=None):
        """Decide every limit for `key` at `now` (seconds of the monotonic clock; None reads
        it). Returns (refused index or -1, remaining, reset_after_us, retry_after_us, limit)
        for the refusing limit, or the most restrictive admitting one."""
        cdef Decision d
        cdef long long now_us = monotonic_us() if now is None else <long long>(now * 1e6)
        cdef int i = self.decide_c(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), now_us, &d)
        return i, d.remaining, d.reset_after_us, d.retry_after_us, d.limit

    def stats(self):
        """Per limit: {"allowed": n, "denied": n} (dry-run limits: would-be refusals)."""
        return [{"allowed": self._allowed[i], "denied": self._denied[i]}
                for i in range(self.n)]

    def costs_and_dry_runs(self):
        return [(self.costs[i], bool(self.dry[i])) for i in range(self.n)]


# ---- in flight -------------------------------------------------------------------------------

cdef class InFlight:
    """At most `limit` requests in flight per key. acquire(conn, key) takes a slot for the
    exchange on `conn` (True) or refuses (False); release(conn) gives it back. A connection
    holds at most one slot of one InFlight: acquiring again while holding one admits."""

    def __init__(self, long long limit):
        if limit < 1:
            raise ValueError(f"in_flight must be >= 1, got {limit}")
        self.limit = limit
        self.counts = {}
        self.held = {}
        self.refused = 0

    cdef bint acquire_c(self, object conn, const char *key, Py_ssize_t klen) except -1:
        if conn in self.held:
            return True
        k = PyBytes_FromStringAndSize(key, klen)
        cdef long long c = self.counts.get(k, 0)
        if c >= self.limit:
            self.refused += 1
            return False
        self.counts[k] = c + 1
        self.held[conn] = k
        return True

    cdef void release_c(self, object conn):
        k = self.held.pop(conn, None)
        if k is None:
            return
        cdef long long c = self.counts.get(k, 1) - 1
        if c <= 0:
            self.counts.pop(k, None)
        else:
            self.counts[k] = c

    def acquire(self, conn, bytes key not None):
        return self.acquire_c(conn, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))

    def release(self, conn):
        self.release_c(conn)

    def in_flight(self, bytes key not None):
        """Requests of `key` in flight now."""
        return self.counts.get(key, 0)


# ---- the check -------------------------------------------------------------------------------

cdef class RateCheck(CoreCheck):
    """The C path of one rate_limit middleware on one route: build the key, take an
    in-flight slot, decide the limits. `reject(index, remaining, reset_after_us,
    retry_after_us, limit, key)` and `reject_busy(key)` build the refusal replies (Python,
    the rare path). With `skip_absent`, a request whose key has an absent part passes."""

    def __init__(self, KeyBuilder keys not None, LimitSet limits, InFlight inflight,
                 reject, reject_busy, bint skip_absent=False, fallback=None, str name=""):
        if keys.needs_extras:
            raise ValueError("a RateCheck key cannot use identity parts (extras)")
        if limits is None and inflight is None:
            raise ValueError("a RateCheck needs limits, in_flight, or both")
        self.keys = keys
        self.limits = limits
        self.inflight = inflight
        self.reject = reject
        self.reject_busy = reject_busy
        self.skip_absent = skip_absent
        self.fallback = fallback
        self.name = name

    cdef object check(self, ConnCore conn, RequestHead head):
        cdef char stack[KEY_STACK]
        cdef char *buf = stack
        cdef Py_ssize_t n
        cdef bint absent = False
        try:
            n = self.keys.build(conn, head, None, stack, KEY_STACK, &absent)
            if n > KEY_STACK:
                buf = <char *>malloc(n)
                if buf == NULL:
                    return None
                self.keys.build(conn, head, None, buf, n, &absent)
        except Exception:
            return None         # never fail a request on our account (logged by no one:
                                # only a MemoryError can get here)
        try:
            if absent and self.skip_absent:
                return None
            return self._decide(conn, buf, n)
        except Exception:
            # A bug in a reply builder must not take the connection down: admit, and say so.
            import logging
            logging.getLogger("fastgate.rate_limit").exception("rate limit check failed")
            return None
        finally:
            if buf != stack:
                free(buf)

    cdef object _decide(self, ConnCore conn, char *buf, Py_ssize_t n):
        cdef Decision d
        cdef int i
        if self.inflight is not None:
            # The slot first: it is given back when the exchange ends, however it ends
            # (a refusal below included), and a request refused here spends no rate.
            if not self.inflight.acquire_c(conn, buf, n):
                self.refused(conn, _BUSY_REASON)
                return self.reject_busy(PyBytes_FromStringAndSize(buf, n))
            conn.add_done(self)
        if self.limits is not None:
            if self.limits.down and self.fallback is not None:
                # The hybrid store is not synced (Redis down, or its sync task not started):
                # its Python path applies the outage policy (fail_open / fail_closed) and
                # tells the connection what it decided.
                return self.fallback(conn, PyBytes_FromStringAndSize(buf, n))
            i = self.limits.decide_c(buf, n, monotonic_us(), &d)
            if i >= 0:
                self.refused(conn, _LIMIT_REASONS[i])
                return self.reject(i, d.remaining, d.reset_after_us, d.retry_after_us,
                                   d.limit, PyBytes_FromStringAndSize(buf, n))
        if conn.rec.active and conn.rec.rate < RATE_ALLOWED:
            conn.rec.rate = RATE_ALLOWED
        return None

    cdef void refused(self, ConnCore conn, object reason):
        """The exchange's record: a rate-limit refusal, and its audit facts when it is the
        exchange's first refusal (as ConnCore.note_deny keeps the first)."""
        if not conn.rec.active:
            return
        conn.rec.rate = RATE_LIMITED
        if conn.rec.deny == DENY_NONE:
            conn.rec.deny = DENY_RATE_LIMITED
            conn.deny_source = self.name
            conn.deny_reason = reason

    cdef void complete(self, ConnCore conn):
        if self.inflight is not None:
            self.inflight.release_c(conn)
