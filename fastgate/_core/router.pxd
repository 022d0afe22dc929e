# Route lookup: host map + path tables -> route target, without Python calls on the way.
#
# Everything is built once in Router.__init__ and never changes (a reload builds a new Router).
# Two open-addressing hash tables hold every key, each slot borrowing its key bytes from a
# Python bytes object that the Router keeps alive:
#   host table  tag 0 = exact host, tag 1 = wildcard suffix ("*.a.com" is stored as "a.com");
#               keys are hashed back to front so one backward walk over the request host
#               yields the hash of every label suffix. A slot's `start` is the bucket id.
#   path table  tag 2*bucket + 0 = exact path, 2*bucket + 1 = prefix; hashed front to back so
#               one forward walk over the request path yields the hash of every prefix.
#               A slot's [start, start + count) is a run of `members` (route indices), sorted
#               best first, so a scan stops at the first route that matches the method.
# A bucket is one host key (bucket 0 = routes without hosts); a route with n hosts sits in n
# buckets. The theory of operation and the ranking are at the top of router.pyx.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

ctypedef struct RouteSlot:
    uint64_t hash
    const char *key           # borrowed from a bytes object in Router._keys
    Py_ssize_t klen           # -1 marks an empty slot
    int32_t tag
    int32_t start
    int32_t count

ctypedef struct RouteBucket:
    int32_t host_rank         # 0 any host, 1 + len(suffix) wildcard, HOST_RANK_EXACT exact
    bint has_exact            # some exact-path route in this bucket
    Py_ssize_t max_prefix     # longest prefix key in bytes, -1 when none
    int32_t regex_start       # run of regex routes in `members`, best first
    int32_t regex_count

ctypedef struct RouteBest:
    int64_t priority
    int64_t path_rank
    int32_t host_rank
    int32_t index             # declaration index, -1 while nothing matched

cdef class Router:
    cdef tuple _specs                 # the RouteSpecs as given (len(router))
    cdef tuple _targets               # per route
    cdef tuple _fullmatch             # per route: bound Pattern.fullmatch (bytes) or None
    cdef tuple _method_sets           # per route: frozenset of method bytes (overflow check)
    cdef tuple _method_names          # distinct method bytes over all routes, bit = position
    cdef list _keys                   # bytes objects whose buffers the slots point into
    cdef Py_ssize_t _n
    cdef int64_t *_priority           # per route
    cdef int64_t *_path_rank          # per route: class << 32 | length
    cdef uint64_t *_method_mask       # per route: 0 = any method
    cdef int32_t *_members            # runs of route indices referenced by slots / buckets
    cdef RouteBucket *_buckets
    cdef Py_ssize_t _n_buckets
    cdef RouteSlot *_host_tab
    cdef uint64_t _host_mask
    cdef RouteSlot *_path_tab
    cdef uint64_t _path_mask
    cdef const char **_mname_ptr
    cdef Py_ssize_t *_mname_len
    cdef Py_ssize_t _n_mnames
    cdef bint _has_hosts              # some route names hosts (else skip host parsing)
    cdef bint _has_wild               # some route names a wildcard
    cdef uint8_t _wild_len[256]       # 1 at each wildcard suffix length present

    cdef int _method_ok(self, int32_t idx, uint64_t bit, bytes method) except -1
    cdef int _scan_run(self, const RouteSlot *s, int32_t host_rank, uint64_t bit,
                       bytes method, RouteBest *best) except -1
    cdef int _probe_runs(self, const int32_t *bl, Py_ssize_t nb, uint64_t h, const char *path,
                         Py_ssize_t plen, int kind, uint64_t bit, bytes method,
                         RouteBest *best) except -1
    cdef object _lookup(self, const char *host, Py_ssize_t hlen, const char *path,
                        Py_ssize_t plen, bytes method, object path_obj)

    # Returns the matching route's `target` or None. host may be NULL (absent); it may carry a
    # :port suffix and any case. path is the request path without the query.
    cdef object match_c(self, const char *host, Py_ssize_t hlen,
                        const char *path, Py_ssize_t plen, bytes method)
