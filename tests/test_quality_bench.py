"""The bytes-per-token accounting of benchmarks/quality_gemma.py and the offline KV quantisers
(no model, no vLLM engine)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import quality_gemma as q
from ap_vllm.tools.testing import kv_quant

GEO = q.Geometry(num_layers=18, num_kv_heads=1, head_size=256)  # Gemma 3 270M, bf16, block 32
E, BB, BS = 1024, 32 * 1024, 32


def _blocks(rows: int, row_bytes: int) -> int:
    return math.ceil(rows / (BB // row_bytes))


@pytest.mark.parametrize("fp8,rank", [(False, 16), (False, 32), (False, 80), (True, 32), (True, 128)])
def test_bytes_by_hand(fp8, rank):
    """One 1,700-token prompt: span [4, 1572) (4 sinks, 128 recent tokens exact) = 1,568 tokens, whole
    blocks 1..49 inside it; each section of the compact form starts at a block boundary."""
    ap = {"coefficient_dtype": "fp8_e4m3"} if fp8 else {}
    b = q.ap_bytes(ap, rank, [1700], GEO)
    T, inner = 1568, 48
    cb = 1 if fp8 else 2
    row = -(-rank * cb // 32) * 32
    storage = 2 * _blocks(rank, 256 * 2) + 2 * _blocks(T, row) + (2 * _blocks(T, 4) if fp8 else 0) + _blocks(T, 4)
    assert b["span_tokens"] == b["tokens_compacted"] == T
    assert b["storage_blocks"] == storage
    assert b["blocks_freed"] == inner - storage
    assert b["bytes_total"] == storage * BB + (T - inner * BS) * E
    assert b["bytes_per_token"] == pytest.approx((storage * BB + (T - inner * BS) * E) / T)
    assert b["ratio"] == pytest.approx(E / b["bytes_per_token"])
    parts = b["components_per_token"]
    assert parts["basis"] * T == pytest.approx(2 * rank * 256 * 2)
    assert parts["coefficients"] == pytest.approx(2 * rank * cb)
    assert parts["scales"] == (8 if fp8 else 0) and parts["importance"] == 4
    assert sum(parts.values()) == pytest.approx(b["bytes_per_token"])


@pytest.mark.parametrize("ap,rank", [({}, 32), ({"coefficient_dtype": "fp8_e4m3"}, 64), ({}, 200)])
def test_bytes_agree_with_the_blocks_a_request_holds(ap, rank):
    """Span bytes + every other prompt token exact (and the last block's unused slots) = the blocks the
    request holds once its spans are compacted (its blocks less the plans' freed blocks, what the KV
    manager returns to the pool), for prompts of several lengths."""
    from ap_vllm.config import parse_config
    from ap_vllm.core.spans import KVGeometry, plan_spans

    cfg = parse_config({**q.BASE_AP, **ap, "enabled": True, "key_rank": rank, "value_rank": rank})
    kgeo = KVGeometry(BS, 1, 256, torch.bfloat16, 18)
    for n in (300, 700, 1637, 1721, 3000):
        b = q.ap_bytes(ap, rank, [n], GEO)
        plans = plan_spans(cfg, kgeo, (), n)
        held = -(-n // BS) - sum(p.num_freed_blocks for p in plans)
        slots = -(-n // BS) * BS
        assert b["bytes_total"] + (slots - b["span_tokens"]) * E == held * BB, n
        if not plans:  # short prompt or a form that frees nothing: every span token stays exact
            assert b["bytes_total"] == b["span_tokens"] * E


def test_solve_rank_is_the_largest_within_budget():
    prompts = [1700]
    r = q.solve_rank({}, 4, prompts, GEO)
    assert r["reachable"] and r["bytes_per_token"] <= E / 4
    assert q.ap_bytes({}, r["rank"] + 1, prompts, GEO)["bytes_per_token"] > E / 4
    low = q.solve_rank({}, 16, prompts, GEO)  # out of reach at this span length
    assert not low["reachable"] and low["rank"] == 16  # every R <= 16: one sector per coefficient row
    assert q.ap_bytes({}, 17, prompts, GEO)["bytes_per_token"] > low["bytes_per_token"]


def test_fixed_rows_bytes():
    rows = {r.name: r for r in q.ROWS}
    assert q.fixed_bytes(rows["exact"], GEO)["bytes_per_token"] == 1024
    assert q.fixed_bytes(rows["cpu_attn_fp8"], GEO)["bytes_per_token"] == 512
    assert q.fixed_bytes(rows["int8_offline_all"], GEO)["bytes_per_token"] == 2 * (256 + 4)
    assert q.fixed_bytes(rows["int4_offline_all"], GEO)["bytes_per_token"] == 2 * (128 + 4)


def test_row_names_unique_and_one_line_rows():
    names = [r.name for r in q.ALL_ROWS]
    assert len(names) == len(set(names))
    row = q.AP(4, coefficient_dtype="fp8_e4m3", key_space="pre_rope")
    assert row.name == "ap4x_fp8_pre" and row.ap == {"coefficient_dtype": "fp8_e4m3", "key_space": "pre_rope"}


def test_int8_per_token_head():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 256) * torch.rand(64, 2, 1) * 5
    y = kv_quant.int8_per_token_head(x)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert ((y - x).abs() <= scale / 2 + 1e-6).all()
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-5)  # the absmax is on the grid
    assert torch.equal(kv_quant.int8_per_token_head(torch.zeros(3, 1, 8)), torch.zeros(3, 1, 8))


def test_int4_per_token_head():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 256)
    y = kv_quant.int4_per_token_head(x)
    rot = kv_quant._rht(x)  # vLLM's transform, norm sqrt(b)
    b = kv_quant.rht_norm(256)
    assert b == 256 and torch.allclose(kv_quant._rht(rot, inverse=True) / b, x, atol=1e-4)
    step = (rot.amax(-1) - rot.amin(-1)) / 15
    err_rot = kv_quant._rht(y) - rot  # the error in the rotated (quantised) basis: half a step at most
    assert (err_rot.abs() <= step[..., None] / 2 * 1.001 + 1e-5).all()
    rel = (y - x).norm() / x.norm()
    assert 0.05 < rel < 0.15  # 16 levels over ~5.6 sigma of a Gaussianised row
