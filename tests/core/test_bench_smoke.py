"""The benchmarks run end to end on small shapes (CPU, Triton interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_decode_bench_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_bench.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # B in {1, 2} x key space in {post_rope, pre_rope}; compaction per key space
    assert res["smoke"] and len(res["decode"]) == 4 and len(res["compaction"]) == 2
    assert {c["key_space"] for c in res["decode"]} == {"post_rope", "pre_rope"}
    for case in res["decode"]:
        assert case["ours_us"] > 0 and case["sdpa_us"] > 0 and case["exact_paged_us"] > 0 and case["thresholds_us"] > 0
        assert case["bytes_read"] < case["full_kv_bytes"]
        assert case["ours_full_rank_us"] > 0 and 0 < case["two_level_bytes_ratio"] <= 1
    post, pre = (next(c for c in res["decode"] if c["key_space"] == ks and c["batch"] == 2)
                 for ks in ("post_rope", "pre_rope"))
    assert pre["bytes_read"] == post["bytes_read"] and pre["span_flops"] > post["span_flops"]


def test_host_overhead_bench_smoke(tmp_path):
    """The host-work benchmark runs end to end: the builder's time per step and each layer's."""
    pytest.importorskip("vllm")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import host_overhead_bench as bench
    finally:
        sys.path.pop(0)
    import ap_vllm.kernels.lowrank_decode as kernels

    real = kernels.paged_mixed_decode_triton
    out = tmp_path / "host.json"
    assert bench.main(["--batch", "2", "4", "--layers", "3", "--steps", "2", "--span-tokens", "512",
                       "--out", str(out)]) == 0
    assert kernels.paged_mixed_decode_triton is real  # the stub is gone
    res = json.loads(out.read_text())
    assert [(c["batch"], c["importance_fraction"]) for c in res["cases"]] == [(2, 0.25), (4, 0.25), (2, 1.0), (4, 1.0)]
    for case in res["cases"]:
        assert case["build_ms"] > 0 and case["first_layer_ms"] > 0 and case["other_layers_ms"] > 0
        # a step is the builder plus every layer, in means and in medians (a median is not comparable with a mean)
        assert case["per_step_ms"] > case["build_mean_ms"] and case["per_layer_mean_ms"] > 0
        assert case["per_step_ms"] == pytest.approx(case["build_mean_ms"] + 3 * case["per_layer_mean_ms"])
        assert case["median_step_ms"] > case["build_ms"] + case["first_layer_ms"]


def test_decode_bench_profiler_mode_smoke():
    """``--ncu`` (what ``make ncu-decode`` and gpu-check's ncu stage profile) launches one full-rank read with each
    profiled launch: the default, bt_ahead and warp_split over chunks of block-table entries."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_bench.py"), "--ncu", "--smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = [line for line in proc.stdout.splitlines() if line.startswith("launched:")]
    assert launched == [f"launched: full rank read, {label}, B=2 T=256 R=16" for label in
                        ("default launch", "bt_ahead, bt_chunk=32, 3 stages", "warp_split, bt_chunk=32, 3 stages")]


def test_gpu_check_smoke(tmp_path):
    """make gpu-check's plumbing on the CPU: tiny shapes, every section, one JSON, no failed check."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = {r["section"] for r in res["rows"]}
    assert {"correctness", "decode", "prefill", "verify", "compaction"} <= sections
    assert not [r for r in res["rows"] if "error" in r]
    checks = [r for r in res["rows"] if r["section"] == "correctness"]
    assert len(checks) >= 7 and all(r.get("error_ratio", r.get("max_abs_err")) <= r["tol"] for r in checks)
    assert "correctness" in proc.stdout and "decode" in proc.stdout  # the printed table


def test_gpu_throughput_smoke(tmp_path):
    """The model-level benchmark's plumbing on the CPU: a tiny decoder, both sides decoding, the summary and the
    admission row (prefill + compaction of every layer); the compacted side holds more requests in the same
    budget, as the block arithmetic says."""
    out = tmp_path / "gpu_throughput.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--smoke", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["complete"] and not [r for r in res["rows"] if "error" in r]
    decode = [r for r in res["rows"] if r["section"] == "decode"]
    (exact,) = [r for r in decode if r["side"] == "exact"]
    # the served default (score) and value_selection 'full', side by side: each with its summary
    aps = {r["selection"]: r for r in decode if r["side"] == "attentionpack"}
    summaries = {r["value_selection"]: r for r in res["rows"] if r["section"] == "summary"}
    assert set(aps) == set(summaries) == {"score", "full"}
    for sel, ap in aps.items():
        assert ap["kv_bytes_per_request"] < exact["kv_bytes_per_request"]
        assert ap["requests_resident"] > exact["requests_resident"] >= 1
        assert ap["kv_bytes_resident"] <= res["workload"]["budget_bytes"] >= exact["kv_bytes_resident"]
        assert summaries[sel]["requests_ratio"] == ap["requests_resident"] / exact["requests_resident"]
    (adm,) = [r for r in res["rows"] if r["section"] == "admission"]
    assert adm["prefill_ms"] > 0 and adm["compaction_ms"] > 0


def test_compaction_bench_smoke(tmp_path):
    """The compaction benchmark runs both methods side by side and reports times, their ratio and accuracy."""
    out = tmp_path / "compaction.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compaction_bench.py"), "--smoke", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["sketch", "gram"]
    assert all(r["ms"] > 0 and 1.0 <= r["error_ratio_k"] <= 1.05 and 1.0 <= r["error_ratio_v"] <= 1.05 for r in rows)
    assert rows[1]["gram_over_sketch"] == rows[1]["ms"] / rows[0]["ms"]


def test_a_model_step_split_groups_attention_gemm_and_the_rest():
    """gpu_throughput's per-step GPU split (torch.profiler names as an H200 shows them): attention kernels, ours
    and vLLM's, apart from the matrix products and the rest; None where there is no profile (CPU)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import step_split

    split = {"_span_attn_kernel": dict(launches_per_call=28, us_per_call=900.0),
             "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT": dict(launches_per_call=112, us_per_call=1500.0),
             "kernel_unified_attention_3d": dict(launches_per_call=28, us_per_call=300.0),
             "_merge_kernel": dict(launches_per_call=28, us_per_call=100.0),
             "void at::native::vectorized_elementwise_kernel<4, ...>": dict(launches_per_call=60, us_per_call=50.0)}
    got = step_split(split)
    assert (got["attention_us"], got["gemm_us"], got["other_us"], got["launches"]) == (1300.0, 1500.0, 50.0, 256)
    assert list(got["slowest"]) == list(split)[:5]
    assert step_split(None) is None
