"""TLS termination for entrypoints (`fastgate.tls.server`).

Importing this package is cheap; the server side (ssl contexts, SNI, certificate checks)
lives in `fastgate.tls.server` and is loaded by the runtime compiler and the worker.
"""
