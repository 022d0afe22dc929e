# The ip_filter middleware's C half: a CoreCheck that admits or refuses a request by its
# client address (allow and deny lists of networks). Read the rules at the top of ipfilter.pyx.

from libc.stdint cimport uint8_t

from fastgate._core.conn cimport ConnCore, CoreCheck
from fastgate._core.httphead cimport RequestHead
from fastgate._core.ratecheck cimport NetSet

cdef enum IpVerdict:
    IP_PASS = 0
    IP_DENIED = 1             # the address is in a deny network
    IP_NOT_ALLOWED = 2        # an allow list is set and the address is in none of it

cdef class IpCheck(CoreCheck):
    cdef readonly NetSet allow          # empty: every address not denied passes
    cdef readonly NetSet deny
    cdef readonly object reply          # the refusal (a LocalReply), built once
    cdef readonly str name              # the middleware's name: the audit line's deny source
    cdef readonly unsigned long long denied       # refusals by the deny list (C path)
    cdef readonly unsigned long long not_allowed  # refusals by the allow list (C path)
    cdef dict netsets                   # EntryConfig -> NetSet of its trusted proxies
    cdef int verdict(self, int fam, const uint8_t *a) noexcept
    cdef NetSet nets_for(self, object cfg)
