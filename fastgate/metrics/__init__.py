"""Metrics: per-worker shards (fastgate/_core/stats.pyx), summed by the supervisor.

- `slots`: the supervisor's private directory of slot files, one per worker slot.
- `copier`: in each worker, copies Python-side tallies (rate-limit decisions, auth failures,
  TLS handshakes) into the worker's slot once a second, off the request path.
- `collector`: the supervisor's prometheus-client collector behind the admin `/metrics`.

Metric names and labels are a fixed contract (docs/observability.md).
"""
