SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint format demo bench bench-methods bench-fidelity bench-quality bench-sft-quality bench-sft-quality-10m bench-accounting bench-ddp bench-bf16 bench-init gpu-check gpu-check-8b gpu-quick nanogpt-cpu nanogpt-compare nanogpt-seeds clean

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]" -e galore-torch
	$(PY) -m pip check

test: $(PY)
	$(PY) -m pytest -q

test-fast: $(PY)
	$(PY) -m pytest -q -m "not slow"

lint: $(PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(PY)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(PY)
	$(PY) -m scripts.demo

bench: $(PY)
	$(PY) -m benchmarks.optimizer_step --json results/optimizer_step.json | tee results/optimizer_step.md

bench-methods: $(PY)
	$(PY) -m benchmarks.compare_methods --results-dir results

bench-fidelity: $(PY)
	$(PY) -m benchmarks.momentum_fidelity --results-dir results

bench-quality: $(PY)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.quality_sweep --results-dir results

bench-sft-quality: $(PY)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.sft_quality --results-dir results

# The scale check on the 10 M base: every variant (resumable: finished runs are skipped); MoFaSGD's embeddings/head
# at AdamW lr 1e-2 (the best side lr on the 1 M base), and one variant again at 1e-3 (the full grid's side lr).
bench-sft-quality-10m: $(PY)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.sft_quality --base 10m --mfsgd-adamw-lr 0.01 \
		--out outputs/sft_quality_10m --results-dir results/sft_quality_10m
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.sft_quality --base 10m --variants mofasgd_inv_gradient_r32_fp32 \
		--mfsgd-adamw-lr 0.001 --out outputs/sft_quality_10m --results-dir results/sft_quality_10m/adamw_side_lr_0.001

bench-accounting: $(PY)
	$(PY) -m benchmarks.llama_memory_accounting --out results/llama_memory_accounting --fsdp2-gpus 8

bench-bf16: $(PY)
	$(PY) -m benchmarks.bf16_updates --results-dir results

bench-init: $(PY)
	$(PY) -m benchmarks.init_svd --results-dir results

gpu-check: $(PY)
	$(PY) -m scripts.gpu_check --results-dir results

# LLaMA-3.1-8B's decoder, random weights, 8 k tokens a step (one >= 80 GB GPU; builds a 15 GB model first)
# torch-only GPU checks for a lent device machine (its system python3 has torch and Triton, no LLaMA-Factory): the
# compiled rounding kernels on CUDA, the bf16 layer step with each rounding kernel and its host syncs, the CUDA-graph
# capture of the capturable step. Writes gpu_quick.log under $(GPU_OUT) (default outputs/).
GPU_OUT ?= outputs
gpu-quick:
	mkdir -p $(GPU_OUT)
	{ set -x; \
	PYTHONPATH=src:. python3 -m pytest -q -p no:cacheprovider tests/test_fused_rounding.py -k cuda; \
	for kernel in eager compiled; do \
	PYTHONPATH=src:. python3 -m benchmarks.layer_step --device cuda --dtype bfloat16 --rounding-kernel $$kernel \
	--count-syncs --capturable; done; \
	PYTHONPATH=src:. python3 -m benchmarks.layer_step --device cuda --ops --capturable; \
	PYTHONPATH=src:. python3 -m benchmarks.capture_check --device cuda; \
	} 2>&1 | tee $(GPU_OUT)/gpu_quick.log

gpu-check-8b: $(PY)
	$(PY) -m scripts.gpu_check --size 8b --steps 8 --results-dir results

bench-ddp: $(PY)
	$(PY) -m benchmarks.ddp_communication | tee results/ddp_communication.md

nanogpt-cpu: $(PY)
	$(PY) -m scripts.nanogpt.run --optimizer mfsgd --config-path scripts/nanogpt/cpu.yaml

nanogpt-compare: $(PY)
	$(PY) -m scripts.nanogpt.compare --config-path scripts/nanogpt/cpu.yaml

nanogpt-seeds: $(PY)
	$(PY) -m scripts.nanogpt.seeds --config-path scripts/nanogpt/cpu.yaml --steps 200 --warmup 80 \
		--config '{"train": {"batch_tokens": 2048, "val_tokens": 32768}}' --results-dir results

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache outputs
