"""benchmarks/capacity_bench.py: block accounting, and one quick end-to-end run.

The e2e test starts two real `vllm serve` processes on a tiny CPU VLM (256 image tokens) with the
same KV budget, CPU_ATTN and AttentionPack, sends 8 image requests at once to each and checks that
AttentionPack runs strictly more of them concurrently (vLLM's own `vllm:num_requests_running`),
that every request completes and that KV usage returns to 0.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "capacity_bench.py"


def _load():
    name = "ap_vllm_capacity_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_capacity_plan_same_bytes_and_prediction():
    pytest.importorskip("vllm")
    plan = bench.capacity_plan(prompt_tokens=4127, span_start=5, span_len=4099, max_tokens=256,
                               shape=bench.ModelShape(), rank=16, block_size=16, baseline_block_size=32,
                               baseline_fit=3.5, num_requests=24)
    b, a = plan["baseline"], plan["attentionpack"]
    # same KV bytes: blocks x block size equal
    assert b["num_gpu_blocks_override"] * 32 == a["num_gpu_blocks_override"] * 16
    assert b["predicted_max_running"] == 3
    lo, hi = a["predicted_max_running"]
    assert 3 < lo <= hi
    assert a["blocks_per_request_compacted"] < a["blocks_per_request_prompt_exact"]


def test_max_overlap():
    reqs = [{"ttft_s": 0.1, "latency_s": 1.0}, {"ttft_s": 0.2, "latency_s": 0.5},
            {"ttft_s": 0.5, "latency_s": 0.9}, {"ttft_s": None, "latency_s": 0.1}]
    assert bench.max_overlap(reqs) == 2  # the one ending at 0.5 leaves before the one starting at 0.5


@pytest.mark.e2e
def test_quick_capacity_run(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "capacity.json"
    # (128 generated tokens, not --quick's 32: decoding outlasts the next request's prefill even when another
    # process takes the CPU, so the mean of requests running measures the pool, not the machine's load)
    rc = bench.main(["--quick", "--max-tokens", "128", "--model-root", str(tmp_path / "models"), "--out", str(out),
                     "--no-progress"])
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    base, ap = case["servers"]["baseline"], case["servers"]["attentionpack"]
    for s in (base, ap):
        assert s["all_completed"], s["errors"]
        assert s["completed"] == case["workload"]["num_requests"]
        assert s["generated_tokens_per_request"] == [case["workload"]["max_tokens"]]
        assert s["kv_usage_returned_to_zero"], s["after"]
    assert ap["ap_blocks_freed"] and ap["ap_blocks_freed"] > 0
    # mean requests running from vLLM's per-request inference time (misses nothing, unlike the sampled
    # gauge): higher with compaction, and on the baseline never above what its pool admits at once plus the requests
    # it preempted (vLLM counts a preempted request's wait to resume as inference time: its first scheduling to its
    # last token; the baseline's requests outgrow the pool, 9 blocks admitted and 13 at the end, so it preempts)
    b_mean, a_mean = base["running_mean_engine"], ap["running_mean_engine"]
    assert b_mean is not None and a_mean is not None, (base, ap)
    assert b_mean <= case["plan"]["baseline"]["predicted_max_running"] + base["preemptions"] + 0.05, \
        (b_mean, base["preemptions"])
    assert a_mean > b_mean, (b_mean, a_mean)
    assert ap["series"]["running_max"] <= case["plan"]["attentionpack"]["predicted_max_running"][1], ap["series"]
    assert rc == 0


@pytest.mark.e2e
def test_chunked_images_admitted_beyond_the_exact_budget(tmp_path):
    """Images prefilled in 256-token steps and compacted chunk by chunk (``chunk_tokens``): a pool
    holding 1.5 exact requests decodes one request at a time on CPU_ATTN (vLLM admits a request
    only when its whole sequence fits), several at once on AttentionPack (the admission reserve is
    what the request holds at most while its chunks compact)."""
    pytest.importorskip("vllm")
    out = tmp_path / "capacity.json"
    rc = bench.main(["--image-tokens", "1024", "--chunk-tokens", "256", "--baseline-fit", "1.5", "--num-requests", "6",
                     "--max-tokens", "16", "--warmup", "0", "--model-root", str(tmp_path / "models"), "--out", str(out),
                     "--no-progress"])
    (case,) = json.loads(out.read_text())["cases"]
    base, ap = case["servers"]["baseline"], case["servers"]["attentionpack"]
    for s in (base, ap):
        assert s["all_completed"] and s["kv_usage_returned_to_zero"], (s["errors"], s["after"])
    # vLLM's own running count: two exact requests never fit the pool, two compacting ones do; the
    # mean from vLLM's per-request inference time misses nothing (the sampled gauge can)
    assert base["series"]["running_max"] <= 1, base["series"]
    assert base["running_mean_engine"] <= 1.05, base["running_mean_engine"]
    assert ap["running_mean_engine"] > 1.3, ap["running_mean_engine"]
    assert ap["ap_blocks_freed"] > 0
    assert rc == 0
