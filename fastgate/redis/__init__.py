"""fastgate's small asyncio Redis client (RESP2), made for the distributed rate limiter.

    from fastgate.redis import RedisClient, Script, hash_tag

    client = RedisClient("127.0.0.1", 6379, password=..., command_timeout=0.05)
    if client.available:                       # False while Redis is down: decide locally
        tat = await client.eval_script(GCRA, [hash_tag(identity) + b":tat"], [now, period])

- `execute(*args)` returns a future at once; everything issued in one event-loop turn goes out
  in one write (auto-pipelining), and `stats()["writes"]` counts those round trips.
- Errors: RedisReplyError (the server said `-ERR ...`) and RedisUnavailable (no answer: down,
  backing off, timed out, connection lost, handshake refused), both RedisError.
- Reconnects in the background with jittered exponential backoff; fails fast meanwhile.
- Sentinel discovery with `sentinel=SentinelConfig(...)`; TLS with `ssl=SSLContext`.
- Cluster: no cluster client, but `hash_tag(identity)` prefixes keys so that one script's keys
  share a slot (see `fastgate.redis.resp`).
- Not supported: pub/sub, MONITOR, blocking commands longer than `command_timeout`, RESP3.
"""

from fastgate.redis.client import RedisClient, backoff_delay
from fastgate.redis.errors import RedisError, RedisReplyError, RedisUnavailable
from fastgate.redis.resp import Script, encode_command, hash_tag, key_slot
from fastgate.redis.sentinel import SentinelConfig

__all__ = [
    "RedisClient",
    "RedisError",
    "RedisReplyError",
    "RedisUnavailable",
    "Script",
    "SentinelConfig",
    "backoff_delay",
    "encode_command",
    "hash_tag",
    "key_slot",
]
