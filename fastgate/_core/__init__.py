"""The compiled hot path: HTTP parsing, body framing, routing and the connection relay."""
