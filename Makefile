# vllm-e3: `make serve` and `make test` each do all set-up first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
# KV cache for CPU engines, GiB (vLLM claims most of the RAM otherwise).
export VLLM_CPU_KVCACHE_SPACE ?= 4
export VLLM_TARGET_DEVICE := cpu

.PHONY: setup prepare serve test test-fast bench ramps clean

setup:
	@bash scripts/setup.sh

prepare: setup
	@$(BIN)/vllm-e3 prepare > /dev/null

serve: prepare
	@MODEL=$$($(BIN)/vllm-e3 prepare --quiet | tail -n 1); \
	echo "serving $$MODEL on http://$(HOST):$(PORT) with --model-impl e3"; \
	exec $(BIN)/vllm serve "$$MODEL" --model-impl e3 --host $(HOST) --port $(PORT) \
	  --served-model-name smollm2-135m-instruct $(ARGS)

test: prepare
	@$(BIN)/python -m pytest -q --import-mode=importlib tests $(PYTEST_ARGS)

bench: prepare
	@$(BIN)/python benchmarks/bench_policies.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
