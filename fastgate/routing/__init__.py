"""Choosing upstream servers beyond the balancer's pick: active health checks (health.py)."""
