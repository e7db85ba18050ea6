# AttentionPack for vLLM: developer commands. Each target sets up what it needs (idempotent).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ap-vllm-env

.PHONY: venv demo test test-fast docs bench-smoke bench-decode bench-host ncu-decode csrc-check gpu-check gpu-bundle aot clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py .ci/setup-env
	bash .ci/setup-env $(VENV)
	touch $(STAMP)

## Build a tiny VLM offline, serve it with --attention-backend attentionpack, ask about an image.
demo: venv
	$(BIN)/python -m ap_vllm.tools.demo

## The whole test suite (unit, kernels under the Triton interpreter, end-to-end servers).
test: venv
	$(BIN)/python -m pytest -q -rs --durations=25 tests

## Tests without vLLM servers.
test-fast: venv
	$(BIN)/python -m pytest -q -rs -m "not e2e and not real_weights" tests

## docs/configuration.md from the fields of ap_vllm/config.py and the presets in configs/ (a test keeps them equal).
docs: venv
	$(BIN)/python -m ap_vllm.config --out docs/configuration.md

## Decode-attention benchmark: tiny shapes on CPU (Triton interpreter) / full shapes on a GPU.
bench-smoke: venv
	$(BIN)/python benchmarks/decode_bench.py --smoke
bench-decode: venv
	$(BIN)/python benchmarks/decode_bench.py --key-space both
## DRAM bytes of the span kernel, two-level vs full-rank read (Nsight Compute on a GPU).
ncu-decode: venv
	ncu --kernel-name regex:_span_decode_kernel --metrics dram__bytes_read.sum,gpu__time_duration.sum \
	    $(BIN)/python benchmarks/decode_bench.py --ncu --batches 8 --spans 32768
## Host work of the backend around the decode kernels, per layer and step (kernels stubbed).
bench-host: venv
	$(BIN)/python benchmarks/host_overhead_bench.py

## Compile the CUDA C++ span kernel (csrc/) for sm_80 and sm_90a with nvcc (no torch needed): registers and
## spills per instantiation; fails on a compile error or any register spill.
CSRC_ARCHS ?= sm_80 sm_90a
csrc-check:
	@command -v nvcc >/dev/null || { echo "csrc-check: nvcc is not on PATH"; exit 1; }
	@mkdir -p build/csrc
	@set -e; for arch in $(CSRC_ARCHS); do \
	  log=build/csrc/ptxas_$$arch.log; \
	  echo "== nvcc -arch=$$arch csrc/span_decode.cu"; \
	  nvcc -std=c++17 -O3 -arch=$$arch -cubin -Xptxas -v -o build/csrc/span_decode_$$arch.cubin \
	    csrc/span_decode.cu > $$log 2>&1 || { cat $$log; exit 1; }; \
	  sed -nE -e "s/.*Compiling entry function '.*span_decode_kernelI[0-9]+([A-Za-z0-9_]+)Li([0-9]+)ELi([0-9]+)E.*/\1 HL=\2 BRV=\3/p" \
	    -e "s/.* ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads.*/  spill stores \1 loads \2/p" \
	    -e "s/.*Used ([0-9]+) registers.*/  registers \1/p" $$log | paste - - - ; \
	  if grep -qE "[1-9][0-9]* bytes spill (stores|loads)" $$log; then echo "csrc-check: register spills on $$arch"; exit 1; fi; \
	done; echo "csrc-check: OK ($(CSRC_ARCHS), no spills)"

## On a GPU machine with torch + Triton only (no vLLM, no install): with .gpu_bundle/ carried (make gpu-bundle,
## here), first the backend layer itself (builder + impl, prefill/decode steps, CUDA-graph capture + replay, host
## time per step; benchmarks/backend_check.py), then every kernel against its reference at full shapes and the
## decode / prefill / compaction timings and the span / prefill launch sweeps (benchmarks/gpu_check.py), then the
## model-level decode throughput against exact KV at a 40 GiB budget, with the fastest span launch gpu_check found
## (benchmarks/gpu_throughput.py). JSON in benchmarks/results/ (rewritten after every row); the whole check is
## meant to fit 8 minutes on an H200 (not yet timed there with the sweeps and the throughput run). Every script runs through $(PY) with the bundle's site on its path
## (ap_vllm.config needs pydantic: only the bundle brings it); without .gpu_bundle/ nothing runs.
## tests/test_gpu_check_imports.py runs this rule on a stand-in of that machine: every script must import there.
GPU_SITE ?= /tmp/ap_site
PY ?= python3
GPU_CHECK_SCRIPTS := benchmarks/backend_check.py benchmarks/gpu_check.py benchmarks/gpu_throughput.py
gpu-check:
	@[ -d .gpu_bundle ] || { echo "gpu-check: no .gpu_bundle/ in $$(pwd): run 'make gpu-bundle' where vLLM is installed" \
	  "and carry .gpu_bundle with the checkout (its scripts import vLLM and pydantic, which only the bundle brings)"; exit 1; }
	$(PY) benchmarks/gpu_bundle.py --install $(GPU_SITE)
	@rc=0; for script in $(GPU_CHECK_SCRIPTS); do \
	  echo "== PYTHONPATH=$(GPU_SITE):. $(PY) $$script"; \
	  PYTHONPATH=$(GPU_SITE):. $(PY) $$script || rc=1; \
	done; exit $$rc
## .gpu_bundle/: vLLM's Python tree + the wheels its backend interface needs, for the GPU machine's Python 3.12.
gpu-bundle: venv
	$(BIN)/python benchmarks/gpu_bundle.py

## Ahead-of-time compile of every launched Triton kernel for sm_80 / sm_90 (no GPU needed): registers, spills,
## load widths (the CI runs the --quick subset through tests/test_aot_compile.py).
aot: venv
	$(BIN)/python benchmarks/aot_compile.py --arch 80 90 --json benchmarks/results/aot_compile.json

clean:
	rm -rf build dist *.egg-info .pytest_cache
