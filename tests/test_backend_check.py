"""benchmarks/backend_check.py at tiny shapes on CPU (Triton interpreter): the checks a GPU machine runs on the
backend layer (``make gpu-check``) must hold here too. Its CUDA-graph check replays the captured step's
metadata after later steps were built; on CPU that replay is the captured closure called again, which is the
contract a graph relies on: everything a decode launch reads lives in buffers the builder rewrites in place."""

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("triton")

from benchmarks import backend_check as bc  # noqa: E402

DEV = torch.device("cpu")


@pytest.mark.parametrize("cfg", [{}, {"value_selection": "ema"},
                                 {"key_rank": [8, 6], "value_rank": [12, 10]}])  # two layout keys: two span buffers
def test_captured_decode_step_replays_later_batches(cfg):
    r = bc.check_cuda_graph(bc.Shapes(True), DEV, cfg)
    assert r["buffers_stayed"] and r["all_finite"], r
    assert len(r["step_errs"]) == 4 and r["max_abs_err"] <= r["tol"], r


def test_prefill_and_decode_steps_match_the_torch_path():
    r = bc.check_steps(bc.Shapes(True), DEV, {})
    assert r["spans_compacted"] == 2 and r["freed_blocks"] > 0 and r["all_finite"], r
    assert r["max_abs_err"] <= r["tol"], r


def test_host_time_rows_and_failures():
    r = bc.time_host(bc.Shapes(True), DEV, 2, 2, 128, 1, {})
    assert {"eager_host_ms", "graph_host_ms", "eager_step_ms", "graph_step_ms"} <= r.keys(), r
    assert bc.failed([dict(r, section="host_time")]) == []
    assert bc.failed([{"section": "steps", "max_abs_err": float("nan"), "tol": 1e-4}])  # NaN is a failure
