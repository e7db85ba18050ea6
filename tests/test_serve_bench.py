"""benchmarks/serve_bench.py: statistics and parsing helpers, and one end-to-end run.

The e2e test starts two real `vllm serve` processes on the tiny CPU VLM (AttentionPack, then
CPU_ATTN) through ``python benchmarks/serve_bench.py --model-dir`` (its ``main``) and checks the JSON it writes.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks import serve_bench as bench


METRICS_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:kv_cache_usage_perc_other 9
vllm:time_to_first_token_seconds_bucket{le="0.001"} 0.0
"""


def test_parse_prometheus():
    vals = bench.parse_prometheus(METRICS_TEXT, (bench.KV_USAGE, bench.RUNNING, bench.WAITING))
    assert vals[bench.RUNNING] == [3.0, 2.0]
    assert vals[bench.KV_USAGE] == [0.25, 0.5]
    assert vals[bench.WAITING] == [1.0]


def test_metric_names_exist_in_vllm():
    """The gauges the benchmark samples are the ones vLLM publishes."""
    loggers = pytest.importorskip("vllm.v1.metrics.loggers")
    src = open(loggers.__file__).read()
    for name in (bench.KV_USAGE, bench.RUNNING, bench.WAITING):
        assert f'"{name}"' in src, name


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 3.0, 10.0, 7.5]
    for p in (0, 50, 90, 99, 100):
        assert math.isclose(bench.percentile(xs, p), float(np.percentile(xs, p)))
    assert bench.percentile([], 50) is None
    d = bench.dist([0.001, 0.003])
    assert math.isclose(d["mean"], 2.0) and math.isclose(d["p50"], 2.0) and math.isclose(d["max"], 3.0)


def test_summary_and_table():
    R = bench.RequestResult
    results = [R(ok=True, start=0.0, end=1.0, ttft=0.2, itls=[0.1] * 8, output_tokens=9, prompt_tokens=70),
               R(ok=True, start=0.5, end=1.5, ttft=0.4, itls=[0.075] * 8, output_tokens=9, prompt_tokens=70),
               R(ok=False, start=0.0, end=0.1, error="boom")]
    samples = [{"t": 0.0, "kv_cache_usage": 0.1, "running": 2.0, "waiting": 0.0},
               {"t": 0.5, "error": "timeout"}]
    s = bench.summarize("ap", "http://x", "m", bench.Workload(), results, 2.0, 2, samples)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["boom"]
    assert math.isclose(s["request_throughput"], 1.0) and math.isclose(s["output_token_throughput"], 9.0)
    assert math.isclose(s["ttft_ms"]["mean"], 300.0)
    assert math.isclose(s["tpot_ms"]["mean"], (0.8 / 8 + 0.6 / 8) / 2 * 1000)
    assert s["server"]["num_requests_running_max"] == 2.0 and s["server"]["kv_cache_usage_max"] == 0.1
    t = bench.table([s, dict(s, name="base")])
    assert "ratio" in t.splitlines()[0] and "1.000x" in t


def test_argument_parsing():
    p = bench.build_parser()
    a = p.parse_args(["--endpoint", "ap=http://h:1", "--endpoint", "base=http://h:2/v1", "--image-size", "320x240"])
    assert a.endpoint == [("ap", "http://h:1"), ("base", "http://h:2/v1")] and a.image_size == (320, 240)
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_endpoint("http://no-name")
    a = p.parse_args(["--model-dir", "d", "--ap-config", '{"key_rank": 8}', "--baseline-backend", "CPU_ATTN",
                      "--server-arg=--max-num-seqs=4"])
    (ap_name, ap_args), (b_name, b_args) = bench.server_specs(a)
    assert ap_args[:2] == ["--attention-backend", "attentionpack"]
    assert json.loads(ap_args[3]) == {"attentionpack": {"key_rank": 8}}
    assert b_args == ["--attention-backend", "CPU_ATTN", "--max-num-seqs=4"] and ap_args[-1] == "--max-num-seqs=4"


@pytest.mark.e2e
def test_serve_bench_end_to_end(tmp_path):
    """Two real servers on the tiny VLM, 4 requests x 8 tokens each; the JSON has sane numbers."""
    pytest.importorskip("vllm")
    from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm

    model = build_tiny_vlm(tmp_path / "tiny", image_tokens=64, num_layers=2)
    out = tmp_path / "bench.json"
    rc = bench.main(["--model-dir", str(model), "--num-requests", "4", "--concurrency", "2",
               "--max-tokens", "8", "--image-size", "64", "--max-model-len", "2048",
               "--metrics-interval", "0.02", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["order"] == ["attentionpack", "baseline"]
    assert "--attention-backend" in report["servers"][1]["command"]
    for name, s in report["endpoints"].items():
        assert s["completed"] == 4 and s["failed"] == 0, (name, s["errors"])
        assert s["total_output_tokens"] == 4 * 8  # ignore_eos: exactly max_tokens each
        assert s["mean_prompt_tokens"] > 64  # the image alone is 64 + 3 tokens
        assert s["request_throughput"] > 0 and s["output_token_throughput"] > s["request_throughput"]
        assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] <= s["e2e_latency_ms"]["max"]
        assert s["itl_ms"]["p50"] is not None and s["itl_ms"]["p50"] > 0
        assert 1 <= s["max_concurrency"] <= 2
        srv = s["server"]
        assert srv["samples"] >= 1
        assert srv["kv_cache_usage_max"] is not None and 0.0 <= srv["kv_cache_usage_max"] <= 1.0
        assert srv["num_requests_running_max"] is not None and 0 <= srv["num_requests_running_max"] <= 2
    cmp = report["comparison"]
    assert cmp["of"] == "attentionpack / baseline" and cmp["output_token_throughput"] > 0
