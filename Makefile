# vllm-e3: `make serve` and `make test` each do all set-up first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
# The server runs float32, compiled (vLLM's default mode), with no flags: the
# prepared model's config.json declares float32 (vllm_e3/prepare.py) and patch
# 6 keeps it under --dtype auto on CPU. vLLM 0.32.0 CPU's compiled bf16 graph
# decodes wrong tokens ("What is the capital of France?" -> "L'Étoile, la
# Marseillaise, ..."), and float32 is faster there. SERVE_FLAGS adds flags:
# SERVE_FLAGS=--enforce-eager runs eager.
SERVE_FLAGS ?=
# vLLM plugins the server loads: e3 (the model, scheduler, worker) and e3_http
# (GET /v1/e3/requests/{id}: per-response exit statistics), which vLLM loads
# only when VLLM_PLUGINS names it.
SERVE_PLUGINS ?= e3,e3_http
# KV cache for CPU engines, GiB (vLLM claims most of the RAM otherwise).
export VLLM_CPU_KVCACHE_SPACE ?= 4
export VLLM_TARGET_DEVICE := cpu

.PHONY: setup prepare serve test test-fast bench soak ramps clean

setup:
	@bash scripts/setup.sh

prepare: setup
	@$(BIN)/vllm-e3 prepare > /dev/null

serve: prepare
	@MODEL=$$($(BIN)/vllm-e3 prepare --quiet | tail -n 1); \
	echo "serving $$MODEL on http://$(HOST):$(PORT) with --model-impl e3"; \
	exec env VLLM_PLUGINS=$(SERVE_PLUGINS) $(BIN)/vllm serve "$$MODEL" --model-impl e3 --host $(HOST) --port $(PORT) \
	  --served-model-name smollm2-135m-instruct $(SERVE_FLAGS) $(ARGS)

# Every test, and the 25 slowest of the run. CI calls this (.ci/run).
test: prepare
	@$(BIN)/python -m pytest -q --import-mode=importlib --durations=25 tests $(PYTEST_ARGS)

# The inner loop: every test that starts no engine (kernels under the Triton
# interpreter, config, simulation, tools on literal data), a few minutes.
test-fast: prepare
	@$(BIN)/python -m pytest -q --import-mode=importlib -m "not slow" --durations=10 tests $(PYTEST_ARGS)

bench: prepare
	@$(BIN)/python benchmarks/bench_policies.py $(ARGS)

# The hardening soak: 3,000 mixed requests against a policy-e3 server with the
# shipped ramps (~30 min on 2 cores; not part of `make test`).
soak: prepare
	@$(BIN)/python benchmarks/soak.py --requests 3000 $(ARGS)

# The embedded default's ramps and calibration, committed in $(RAMPS_OUT), are
# made by exactly these two commands (each records its command line in what it
# writes: ramps.safetensors metadata, train_report.json, calibration.json).
# Corpora and captured states are cached under $$VLLM_E3_HOME/cache, so a
# rerun resumes. `vllm-e3 prepare` (make serve) installs the result into the
# model's e3/ folder.
RAMPS_OUT := artifacts/smollm2-135m/e3
ramps: setup
	@$(BIN)/vllm-e3 prepare --no-e3 > /dev/null
	@MODEL=$$($(BIN)/vllm-e3 prepare --no-e3 --quiet | tail -n 1); set -e; \
	$(BIN)/vllm-e3 train "$$MODEL" --out $(RAMPS_OUT); \
	$(BIN)/vllm-e3 calibrate "$$MODEL" --out $(RAMPS_OUT) --target-agreement 0.99

clean:
	rm -rf $(VENV) build *.egg-info
