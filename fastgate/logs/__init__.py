"""The access log, the audit stream and span records: the Python side (docs/logging.md).

Lines are formatted in C at the end of each exchange (fastgate/_core/accesslog.pyx) into a
per-worker batch buffer per stream; this package owns everything around it:

- `runtime`: builds the streams, their writers and the AccessLog from the config, counts
  lines and drops into the metric slot, reopens and closes on signals, reloads and drains.
- `writer`: LogWriter, a stream's destination (stdout, stderr or a file) and its C writer
  thread: whole lines only, never the event loop.
- `events`: audit events raised by Python code (TLS client-certificate failures).
- `otlp` (when present): the span exporter, started with `otlp.start(stream, settings)`.

Importing this package imports nothing else: fastgate.tls.server uses `events` early.
"""
