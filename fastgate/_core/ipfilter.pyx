# cython: language_level=3, boundscheck=False, wraparound=False
#
# Rules
# -----
# The ip_filter middleware (fastgate/middleware/ip_filter.py) runs here as a CoreCheck when it
# leads a route's chain, so an admitted request costs no Python call.
#
# Client address: exactly the one the access log writes (ratecheck.resolved_client_ip): the
# peer, or, when the peer is a trusted proxy of the entrypoint (forwarded.trusted_ips), the
# X-Forwarded-For walk of ratecheck.pyx (ratecheck.walk_client, the one implementation). An
# IPv4-mapped IPv6 address is IPv4; a network matches only addresses of its own family (as
# `ipaddress` judges `in`: ::/0 does not cover IPv4). Text that is no address (a Unix socket
# peer, an X-Forwarded-For element a trusted proxy wrote that does not parse) matches no
# network.
#
# Decision: an address in a deny network is refused ("client address denied"), whatever the
# allow list says (deny wins); else, when the allow list is not empty, an address in none of
# its networks is refused ("client address not allowed"); else the request passes. So an
# unparseable address passes a deny-only filter and is refused by any allow list.
#
# A refusal: the reply built once by the middleware (the same object every time), and on the
# exchange record, when it is the exchange's first refusal, rec.deny = DENY_IP with
# deny_source (the middleware's name) and deny_reason (a phrase made once at import), plain C
# stores as ratecheck.RateCheck does.
#
# Bounds: per request one walk of X-Forwarded-For (only behind a trusted proxy) and one pass
# over each list's networks. Memory: the two NetSets, and one NetSet per entrypoint config
# seen, the cache emptied when it reaches NETSET_CACHE entries (reloads cannot grow it).

"""The ip_filter middleware's check in C: allow and deny lists of networks."""

from libc.stdint cimport uint8_t

from fastgate._core.conn cimport ConnCore, CoreCheck
from fastgate._core.httphead cimport RequestHead
from fastgate._core.ratecheck cimport NetSet, walk_client
from fastgate._core.stats cimport DENY_IP, DENY_NONE
from fastgate._core.writer cimport ForwardInfo

cdef enum:
    NETSET_CACHE = 16

PASS = IP_PASS
DENIED = IP_DENIED
NOT_ALLOWED = IP_NOT_ALLOWED
DENIED_REASON = "client address denied"
NOT_ALLOWED_REASON = "client address not allowed"
REASONS = {IP_DENIED: DENIED_REASON, IP_NOT_ALLOWED: NOT_ALLOWED_REASON}
cdef str _DENIED_REASON = DENIED_REASON
cdef str _NOT_ALLOWED_REASON = NOT_ALLOWED_REASON


cdef class IpCheck(CoreCheck):
    """The C path of one ip_filter middleware: `allow` and `deny` are NetSets (`allow` empty:
    no allow list), `reply` the refusal returned as is, `name` the audit source."""

    def __init__(self, NetSet allow not None, NetSet deny not None, reply, str name=""):
        if len(allow) == 0 and len(deny) == 0:
            raise ValueError("an IpCheck needs an allow or a deny list")
        self.allow = allow
        self.deny = deny
        self.reply = reply
        self.name = name
        self.netsets = {}
        self.denied = 0
        self.not_allowed = 0

    cdef int verdict(self, int fam, const uint8_t *a) noexcept:
        if fam == 0:
            return IP_NOT_ALLOWED if self.allow.n else IP_PASS
        if self.deny.contains(a, fam):
            return IP_DENIED
        if self.allow.n and not self.allow.contains(a, fam):
            return IP_NOT_ALLOWED
        return IP_PASS

    def decide(self, ConnCore conn not None):
        """check() for the Python path (ip_filter later in a route's chain): the same
        decision, counts and deny note; the reply or None."""
        return self.check(conn, conn.head)

    cdef NetSet nets_for(self, object cfg):
        nets = self.netsets.get(cfg)
        if nets is None:
            if len(self.netsets) >= NETSET_CACHE:
                self.netsets.clear()        # retired configs go; live ones come back on use
            nets = NetSet(cfg.trusted_nets)
            self.netsets[cfg] = nets
        return <NetSet>nets

    cdef object check(self, ConnCore conn, RequestHead head):
        cdef ForwardInfo fwd = conn.fwd
        cdef NetSet nets = None
        cdef uint8_t a[16]
        cdef const char *text = NULL
        cdef Py_ssize_t tlen = 0
        cdef int fam = 0, v
        if fwd is not None:
            if fwd.trusted and conn.cfg is not None:
                try:
                    nets = self.nets_for(conn.cfg)
                except Exception:
                    nets = None     # only a MemoryError: judge the peer itself
            fam = walk_client(fwd.client_ip, fwd.trusted, nets, head, a, &text, &tlen)
        v = self.verdict(fam, a)
        if v == IP_PASS:
            return None
        if v == IP_DENIED:
            self.denied += 1
        else:
            self.not_allowed += 1
        if conn.rec.active and conn.rec.deny == DENY_NONE:
            conn.rec.deny = DENY_IP
            conn.deny_source = self.name
            conn.deny_reason = _DENIED_REASON if v == IP_DENIED else _NOT_ALLOWED_REASON
        return self.reply
