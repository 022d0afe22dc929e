# fastgate developer tasks.

PYTHON ?= python3

# Benchmarks (benchmarks/README.md). Override e.g. `make bench BENCH_TARGETS=origin,nginx,haproxy`
# or pass more flags with `BENCH_ARGS="--sizes small,16k,1m"`.
BENCH_TARGETS ?= origin,nginx,haproxy,fastgate
BENCH_ARGS ?=
BENCH = $(PYTHON) benchmarks/run.py --targets $(BENCH_TARGETS)

.PHONY: bench bench-quick

# Default set: 3 interleaved rounds of 5 s runs, 12 B and 16 KiB, 50 and 200 connections.
bench:
	$(BENCH) $(BENCH_ARGS)

# Smoke check of the suite and the targets: 1 round of 2 s runs.
bench-quick:
	$(BENCH) --rounds 1 --duration 2 --warmup 1 $(BENCH_ARGS)
