# Targets read top to bottom: set up once, then demo / test / lint / bench.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help setup demo test test-fast lint format bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create .venv with torch/fbgemm/torchrec and dlrm_cache (DLRM_DEVICE=cpu|cuda to force)
	scripts/setup.sh

demo:  ## the main job on the built-in default: dlrm-train on synthetic Criteo data (CPU)
	$(VENV)/bin/dlrm-train

test:  ## the whole test suite (CPU; gpu tests skip without CUDA)
	$(PY) -m pytest -q

test-fast:  ## the tests not marked slow
	$(PY) -m pytest -q -m "not slow"

lint:  ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench:  ## the CPU benchmarks whose figures go in docs/benchmarks.md
	$(PY) scripts/bench_synth.py
	$(PY) scripts/bench_preprocess.py
	$(PY) scripts/bench_cache_hitrate.py
	$(PY) scripts/bench_cache_step.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_sharded.py
