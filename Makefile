# Two entry points for a fresh machine: `make quickstart` and `make test`.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0

.PHONY: venv quickstart test bench
venv:
	bash scripts/setup_env.sh

quickstart: venv
	.venv/bin/llmkd quickstart

test: venv
	.venv/bin/python -m pytest -q tests

bench: venv
	.venv/bin/python benchmarks/loss_memory.py
	.venv/bin/python benchmarks/generation.py
