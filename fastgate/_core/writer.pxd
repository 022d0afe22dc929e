# Head writers: one C pass from a parsed head to the bytes sent on the next hop.

from fastgate._core.httphead cimport RequestHead, ResponseHead

cdef class ForwardInfo:
    # Per client connection, computed once at accept: who is on the other end.
    cdef readonly bytes client_ip      # textual address of the peer
    cdef readonly bytes proto          # b"http" or b"https"
    cdef readonly bint trusted         # the peer is a trusted proxy: keep its X-Forwarded-*
    cdef readonly bint forwarded_header  # also emit RFC 7239 Forwarded

# Upstream request head: request line (origin-form, HTTP/1.1 or HTTP/1.0 for a 1.0 client),
# end-to-end headers as sent, hop-by-hop and Connection-named ones dropped, untrusted
# X-Forwarded-*/Forwarded dropped, then X-Forwarded-For/-Proto/-Host, optional Forwarded,
# X-Request-ID (exactly one: `request_id`, which is the client's when it was kept; client
# X-Request-ID lines are never copied), Connection/Upgrade for an upgrade, `extra`.
# Headers named in `strip` (lowercase bytes) are dropped: the middlewares own those names.
cdef bytes build_request_head(RequestHead h, ForwardInfo fi, bytes request_id,
                              bint id_from_client, bytes extra, tuple strip=*)

# Client response head: status line as sent, hop-by-hop headers dropped (kept for a 101
# upgrade), `Connection: close` when `close`, `Connection: keep-alive` for an HTTP/1.0 client
# kept alive; `tail` bytes (the start of the body) appended so head and a small body leave in
# one write. Headers named in `strip` (lowercase) are dropped and `extra` lines added: what the
# route's middlewares set on responses (security headers).
cdef bytes build_response_head(ResponseHead h, bint close, bint keep_alive_10, bint upgrade,
                               const char *tail, Py_ssize_t tail_len, bytes extra=*,
                               tuple strip=*)

# A gateway-generated reply: short JSON {"error": ..., "request_id": ...}.
cdef bytes build_error_reply(int status, str message, bytes request_id, bint close,
                             bint head_only)

# The request id to keep from the client, or None when absent or not a safe token.
cdef bytes client_request_id(RequestHead h)
