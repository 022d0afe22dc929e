"""Rate-limit stores and helpers behind the `rate_limit` middleware (DESIGN.md §6).

- `options`: the middleware's options (pure Python: `fastgate check` explains them anywhere)
- `keys`: limiter keys from the options, identity values, log-safe text
- `local`: the per-worker store over fastgate._core.ratelimit (and the fail_open fallback)
- `redis`: the Lua GCRA script (Redis TIME as the clock) and the `redis` store
- `hybrid`: local decisions synced with Redis every `sync_interval`
- `replies`: 429/503 replies with RateLimit-Policy/RateLimit or X-RateLimit-* headers
- `clients`: one RedisClient per `providers.redis` entry per process

See docs/rate-limiting.md.
"""
