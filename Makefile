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

## The whole test suite (unit, kernels under the Triton interpreter, end-to-end servers), on TEST_WORKERS processes
## (pytest-xdist, each module whole on one; the modules that start vLLM servers all on one, one after the other;
## in the order tests/conftest.py gives). OpenMP threads that wait sleep (OMP_WAIT_POLICY=PASSIVE, inherited by the
## servers): the processes share the cores, and threads spinning while they wait (libgomp's default; vLLM's CPU
## workers also pin theirs to cores) took them from the others. On 2 cores beside the ahead-of-time compile test,
## passive against spinning: the prefix-cache stress test 32 s against 126-184 s, test_compaction_batched.py 11 s
## against 20 s. Alone, passive waits cost a little (that module 9.4 s against 6.5 s): single-module runs keep the
## default.
TEST_WORKERS ?= 2
test: venv
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -rs --durations=25 -n $(TEST_WORKERS) --dist loadfile \
	    --no-loadscope-reorder tests

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
	ncu --kernel-name regex:_span_attn_kernel --metrics dram__bytes_read.sum,gpu__time_duration.sum \
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

## On a GPU machine with torch + Triton only (no vLLM, no install), with .gpu_bundle/ carried (make gpu-bundle, here).
## Stages, most wanted first, each under its own time limit (seconds) so that one slow stage cannot take the others'
## time; every script writes its JSON to benchmarks/results/ after every row:
##  1. benchmarks/gpu_check.py: every kernel against its reference, the span launch sweep, decode against SDPA,
##     the kernel split of one decode call (gpu_check_<device>.json);
##  2. benchmarks/gpu_throughput.py: model-level decode throughput against exact KV at a 40 GiB budget, with the
##     fastest span launch stage 1 found;
##  3. benchmarks/gpu_check.py: prefill against SDPA, compaction, the CUDA C++ span launch (gpu_check_<device>_more.json);
##  4. benchmarks/backend_check.py: the backend layer (builder + impl, CUDA-graph capture + replay, host time);
##  5. where ncu is on PATH: DRAM bytes, occupancy and launch of the span kernel, full rank, the default launch and
##     the two chunked-block-table candidates (decode_bench.PROFILED_LAUNCHES; ncu_span_<device>.txt);
##  6. benchmarks/mla_reference.py: the same bytes read as MLA decode by vLLM's own Triton kernel, for reference.
## The CUDA C++ extension builds in the background from the start. GPU_STAGE_LIMITS: the six limits, adding up to
## 8 minutes (0 skips a stage; measured on an H200: stages 1-3 take 115, 25 and 50 s).
## Every script runs through $(PY) with the bundle's site on its path (ap_vllm.config needs pydantic: only the
## bundle brings it); without .gpu_bundle/ nothing runs.
## tests/test_gpu_check_imports.py runs this rule on a stand-in of that machine: every script must import there.
GPU_SITE ?= /tmp/ap_site
PY ?= python3
GPU_STAGE_LIMITS ?= 190 60 90 60 50 30
NCU_SPAN := ncu --kernel-name regex:_span_attn_kernel --launch-count 3 --section SpeedOfLight --section Occupancy \
	--section LaunchStats --section MemoryWorkloadAnalysis
gpu-check:
	@[ -d .gpu_bundle ] || { echo "gpu-check: no .gpu_bundle/ in $$(pwd): run 'make gpu-bundle' where vLLM is installed" \
	  "and carry .gpu_bundle with the checkout (its scripts import vLLM and pydantic, which only the bundle brings)"; exit 1; }
	$(PY) benchmarks/gpu_bundle.py --install $(GPU_SITE)
	@mkdir -p build benchmarks/results; export PYTHONPATH=$(GPU_SITE):.; rc=0; t0=$$(date +%s); \
	set -- $(GPU_STAGE_LIMITS) 0 0 0 0 0 0; l1=$$1; l2=$$2; l3=$$3; l4=$$4; l5=$$5; l6=$$6; \
	$(PY) benchmarks/gpu_check.py --prebuild-cuda > build/cuda_prebuild.log 2>&1 & \
	stage() { limit=$$1; shift; [ "$$limit" -gt 0 ] || { echo "== skipped (limit 0): $$*"; return; }; echo "== [$$(( $$(date +%s) - t0 )) s] (limit $$limit s) PYTHONPATH=$$PYTHONPATH $$*"; \
	  timeout $$limit "$$@" || { echo "gpu-check: '$$*' failed or ran past $$limit s"; rc=1; }; }; \
	stage $$l1 $(PY) benchmarks/gpu_check.py --only correctness span_configs decode profile; \
	stage $$l2 $(PY) benchmarks/gpu_throughput.py; \
	stage $$l3 $(PY) benchmarks/gpu_check.py --only prefill verify compaction cuda_span --tag more; \
	stage $$l4 $(PY) benchmarks/backend_check.py; \
	if command -v ncu > /dev/null; then \
	  dev=$$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' _); \
	  stage $$l5 $(NCU_SPAN) $(PY) benchmarks/decode_bench.py --ncu --batches 8 --spans 32768 \
	    > benchmarks/results/ncu_span_$$dev.txt; fi; \
	stage $$l6 $(PY) benchmarks/mla_reference.py; \
	wait; cat build/cuda_prebuild.log; echo "gpu-check: $$(( $$(date +%s) - t0 )) s"; exit $$rc
## .gpu_bundle/: vLLM's Python tree + the wheels its backend interface needs, for the GPU machine's Python 3.12.
gpu-bundle: venv
	$(BIN)/python benchmarks/gpu_bundle.py

## Ahead-of-time compile of every launched Triton kernel for sm_80 / sm_90 (no GPU needed): registers, spills,
## load widths (the CI runs the --quick subset through tests/test_aot_compile.py).
aot: venv
	$(BIN)/python benchmarks/aot_compile.py --arch 80 90 --json benchmarks/results/aot_compile.json

clean:
	rm -rf build dist *.egg-info .pytest_cache
