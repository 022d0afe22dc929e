"""The access log, the audit stream and span records: the Python side (docs/logging.md).

Lines are formatted in C at the end of each exchange (fastgate/_core/accesslog.pyx) into a
per-worker batch buffer per stream; this package owns everything around it:

- `runtime`: builds the streams and the AccessLog from the config, hands full buffers to
  the writers, counts lines and drops into the metric slot, reopens and closes on signals,
  reloads and drains.
- `writer`: BatchWriter, one thread per destination (stdout, stderr or a file), whole lines
  only, never blocking the event loop.
- `events`: audit events raised by Python code (TLS client-certificate failures).
- `otlp` (when present): the span exporter, started with `otlp.start(stream, settings)`.

Importing this package imports nothing else: fastgate.tls.server uses `events` early.
"""
