# AttentionPack for vLLM: developer commands. Each target sets up what it needs (idempotent).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ap-vllm-env

.PHONY: venv demo test test-fast bench-smoke bench-decode bench-host ncu-decode clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py .ci/setup-env
	bash .ci/setup-env $(VENV)
	touch $(STAMP)

## Build a tiny VLM offline, serve it with --attention-backend attentionpack, ask about an image.
demo: venv
	$(BIN)/python -m ap_vllm.demo

## The whole test suite (unit, kernels under the Triton interpreter, end-to-end servers).
test: venv
	$(BIN)/python -m pytest -q -rs tests

## Tests without vLLM servers.
test-fast: venv
	$(BIN)/python -m pytest -q -rs -m "not e2e and not real_weights" tests

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

clean:
	rm -rf build dist *.egg-info .pytest_cache
