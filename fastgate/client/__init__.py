"""The gateway's own outgoing HTTP/1.1 client (JWKS/OIDC fetches, forward auth, health checks)."""
