# fastgate developer tasks.

PYTHON ?= python3

# Benchmarks (benchmarks/README.md). Override e.g. `make bench BENCH_TARGETS=origin,nginx,haproxy`
# or pass more flags with `BENCH_ARGS="--sizes small,16k,1m"`.
BENCH_TARGETS ?= origin,nginx,haproxy,fastgate,fastgate-rl-local
BENCH_ARGS ?=
BENCH = $(PYTHON) benchmarks/run.py --targets $(BENCH_TARGETS)

.PHONY: help build test lint bench bench-quick bench-ratelimit bench-tls bench-routes pycalls reference soak conn-scale dist fuzz

.DEFAULT_GOAL := help

help:
	@echo "make build       rebuild the Cython extensions in place (FASTGATE_DEBUG=1 for linetrace)"
	@echo "make test        run the test suite (as CI does, without the installs)"
	@echo "make lint        ruff check + format check"
	@echo "make bench       benchmarks vs nginx and HAProxy (a few minutes; needs nginx haproxy wrk)"
	@echo "make bench-quick one short round, to check the benchmark setup"
	@echo "make bench-ratelimit  plain fastgate vs local, hybrid and redis rate limits"
	@echo "make bench-tls   TLS termination vs nginx, keep-alive and a new connection per request"
	@echo "make bench-routes  1,000 vs 10 routes, and round robin over 4 servers vs 1"
	@echo "make pycalls     Python calls per proxied request"
	@echo "make reference   regenerate docs/reference.md from the schema"
	@echo "make soak        10-minute soak with mixed traffic: RSS flat? p99 per 10 s (nginx, redis-server)"
	@echo "make conn-scale  memory per idle keep-alive connection, 10,000 on one worker"
	@echo "make dist        one-file executable dist/fastgate (shiv zipapp; needs shiv and a C compiler)"
	@echo "make fuzz        atheris fuzzing of the HTTP parsers and the router (SECONDS=600)"

build:
	$(PYTHON) setup.py build_ext --inplace

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check fastgate tests benchmarks tools
	ruff format --check fastgate tests benchmarks tools
	$(PYTHON) tools/gen_config_reference.py --check

pycalls:
	PYTHONPATH=. $(PYTHON) benchmarks/pycalls.py

# Default set: 3 interleaved rounds of 5 s runs, 12 B and 16 KiB, 50 and 200 connections.
bench:
	$(BENCH) $(BENCH_ARGS)

# Smoke check of the suite and the targets: 1 round of 2 s runs.
bench-quick:
	$(BENCH) --rounds 1 --duration 2 --warmup 1 $(BENCH_ARGS)

# Rate-limit overhead: plain fastgate vs the local, hybrid and redis stores (never tripping).
bench-ratelimit:
	$(PYTHON) benchmarks/run.py --targets fastgate,fastgate-rl-local,fastgate-rl-hybrid,fastgate-rl-redis --sizes small $(BENCH_ARGS)

# TLS termination: nginx and fastgate, plain and with TLS (the same certificate), 12 B body,
# 50 connections, keep-alive and Connection: close (a new TLS handshake per request): ~3 min.
bench-tls:
	$(PYTHON) benchmarks/run.py --targets nginx,fastgate,nginx-tls,fastgate-tls --sizes small --connections 50 --handshake keep-alive,close $(BENCH_ARGS)

# Route-table size and upstream count (issue 7): the 1,000-route table must cost <= 5% of the
# 10-route one; round robin over 4 nginx origins vs 1. 5 rounds, 12 B and 16 KiB: ~6 min.
bench-routes:
	$(PYTHON) benchmarks/run.py --rounds 5 --targets fastgate,fastgate-routes10,fastgate-routes1000 --sizes small $(BENCH_ARGS)
	$(PYTHON) benchmarks/run.py --rounds 5 --targets fastgate,fastgate-rr1,fastgate-rr4 --sizes small,16k $(BENCH_ARGS)

# docs/reference.md is generated from the schema (a unit test fails when it is stale).
reference:
	$(PYTHON) tools/gen_config_reference.py

# Soak (issue 8): mixed traffic through 2 workers; is RSS flat after warm-up? Default 10 minutes.
SOAK_MINUTES ?= 10
SOAK_ARGS ?=
soak:
	$(PYTHON) benchmarks/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Memory per idle keep-alive connection: 1,000 / 5,000 / 10,000 connections on one worker (~1 min).
conn-scale:
	$(PYTHON) benchmarks/conn_scale.py $(SOAK_ARGS)

# One self-contained executable (docs/distribution.md): needs shiv and a C compiler.
dist:
	$(PYTHON) tools/build_dist.py --out dist/fastgate

# atheris fuzzing (tests/fuzz/README.md): heads and chunked bodies vs llhttp, the router vs its
# oracle. CI runs a 20-second pass (tests/unit/test_fuzz_harness.py).
SECONDS ?= 600
fuzz:
	$(PYTHON) tests/fuzz/run_fuzz.py --seconds $(SECONDS) --target all
