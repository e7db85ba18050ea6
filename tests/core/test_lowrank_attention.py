"""Attention in coefficient space against the exact dense reference."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ap_vllm.core.compaction import compact_span, relative_error
from ap_vllm.core.dense import dense_attention
from ap_vllm.core.lowrank_attention import (attend_compacted, decode_mixed, decode_step_cost, importance_threshold,
                                            low_rank, update_importance)
from ap_vllm.core.synthetic import low_rank_kv


def _case(t, hkv, g, d, seed=0, nq=1):
    gen = torch.Generator().manual_seed(seed)
    k = low_rank_kv(t, hkv, d, generator=gen)
    v = low_rank_kv(t, hkv, d, generator=gen)
    q = torch.randn(nq, hkv * g, d, generator=gen)
    return q, k, v


def test_full_rank_equals_dense():
    q, k, v = _case(200, 2, 4, 64, nq=3)
    sp = compact_span(k, v, 128, 128)
    qpos = torch.tensor([50, 150, 250])  # causal masking inside the span too
    o, l = attend_compacted(q, sp, 0.125, qpos)
    ro, rl = dense_attention(q, k, v, 0.125, qpos, torch.arange(200))
    assert torch.allclose(o, ro, atol=1e-4, rtol=1e-4)
    assert torch.allclose(l, rl, atol=1e-4)


# measured on this synthetic (T=1024, Hkv=4, d=128, decay 0.93, 28 query heads, fp32 storage);
# each bound is ~1.5x the measured error
ERROR_BOUNDS = {8: 1.0, 16: 0.65, 32: 0.2, 64: 0.03, 128: 0.02}


def test_error_decreases_with_rank_within_bounds():
    q, k, v = _case(1024, 4, 7, 128, nq=4)
    qpos = torch.full((4,), 1024)
    ro, rl = dense_attention(q, k, v, 128 ** -0.5, qpos, torch.arange(1024))
    errs = []
    for r, bound in ERROR_BOUNDS.items():
        sp = compact_span(k, v, r, r)
        o, l = attend_compacted(q, sp, 128 ** -0.5, qpos)
        e = relative_error(o, ro)
        assert e < bound, (r, e)
        errs.append(e)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


@settings(max_examples=25, deadline=None)
@given(t=st.integers(20, 300), hkv=st.integers(1, 8), g=st.integers(1, 8), d=st.sampled_from([64, 128, 256]),
       where=st.sampled_from(["start", "middle", "end"]), softcap=st.sampled_from([None, 20.0]),
       seed=st.integers(0, 10))
def test_mixed_decode_full_rank_matches_dense(t, hkv, g, d, where, softcap, seed):
    """Exact text + one compacted span (at full rank) + text == dense attention over everything."""
    q, k, v = _case(t, hkv, g, d, seed)
    w = hkv * d
    n = max(4, t // 3)
    start = {"start": 0, "middle": (t - n) // 2, "end": t - n}[where]
    sp = compact_span(k[start:start + n], v[start:start + n], min(n, w), min(n, w), start=start)
    pos = torch.arange(t)
    ex = (pos < start) | (pos >= start + n)
    qpos = torch.tensor([t])
    scale = d ** -0.5
    o, l = decode_mixed(q, k[ex], v[ex], pos[ex], [sp], scale, qpos, softcap=softcap, importance_ema=None)
    ro, rl = dense_attention(q, k, v, scale, qpos, pos, softcap=softcap)
    assert torch.allclose(o, ro, atol=2e-4, rtol=1e-3), (o - ro).abs().max()
    assert torch.allclose(l, rl, atol=2e-4)


def test_two_level_read():
    q, k, v = _case(256, 2, 4, 64)
    sp = compact_span(k, v, 32, 32)
    qpos = torch.tensor([300])
    full, _ = attend_compacted(q, sp, 0.125, qpos)
    sp.importance = torch.rand(256, generator=torch.Generator().manual_seed(1))
    thr = importance_threshold(sp.importance, 0.25)
    assert int((sp.importance >= thr).sum()) == 64
    # equals attention with the low-importance value rows truncated to R/4 components
    o, _ = attend_compacted(q, sp, 0.125, qpos, threshold=thr, low_rank_divisor=4)
    cv = sp.coeff_v.clone()
    cv[sp.importance < thr, low_rank(32, 4):] = 0
    trunc = type(sp)(sp.coeff_k, sp.basis_k, cv, sp.basis_v, 2, 64)
    o2, _ = attend_compacted(q, trunc, 0.125, qpos)
    assert torch.allclose(o, o2, atol=1e-5)
    # a threshold every token passes (fraction 1) is the full read
    o3, _ = attend_compacted(q, sp, 0.125, qpos, threshold=importance_threshold(sp.importance, 1.0))
    assert torch.allclose(o3, full, atol=1e-6)
    # keys too
    o4, _ = attend_compacted(q, sp, 0.125, qpos, threshold=thr, two_level_keys=True)
    assert not torch.allclose(o4, o, atol=1e-6)


def test_attention_aware_importance_beats_random():
    """Full rank for the most attended tokens is more accurate than for random ones."""
    q, k, v = _case(512, 2, 4, 64, seed=3)
    qpos = torch.tensor([600])
    ro, _ = dense_attention(q, k, v, 0.125, qpos, torch.arange(512))
    sp = compact_span(k, v, 32, 32)
    _, lse, s = attend_compacted(q, sp, 0.125, qpos, return_scores=True)
    sp.importance = update_importance(torch.zeros(512), s, lse[:, 0], omega=1.0)
    e_att = relative_error(attend_compacted(q, sp, 0.125, qpos, threshold=importance_threshold(sp.importance, 0.25))[0], ro)
    sp.importance = torch.rand(512, generator=torch.Generator().manual_seed(0))
    e_rand = relative_error(attend_compacted(q, sp, 0.125, qpos, threshold=importance_threshold(sp.importance, 0.25))[0], ro)
    assert e_att < e_rand


def test_importance_update_is_ema_of_mean_probability():
    q, k, v = _case(120, 2, 3, 64)
    t0, n = 30, 60
    sp = compact_span(k[t0:t0 + n], v[t0:t0 + n], n, n, start=t0)
    sp.importance = torch.rand(n)
    old = sp.importance.clone()
    pos = torch.arange(120)
    ex = (pos < t0) | (pos >= t0 + n)
    qpos = torch.tensor([120])
    decode_mixed(q, k[ex], v[ex], pos[ex], [sp], 0.125, qpos, importance_ema=0.25)
    # dense probabilities over all keys, head-averaged
    kf = k.repeat_interleave(3, dim=1)  # [T, Hq, d]
    s = torch.einsum("hd,thd->ht", q[0], kf) * 0.125
    p = torch.softmax(s, dim=-1)[:, t0:t0 + n].mean(0)
    assert torch.allclose(sp.importance, 0.75 * old + 0.25 * p, atol=1e-6)


def test_window_with_span_rejected():
    q, k, v = _case(100, 1, 1, 64)
    sp = compact_span(k, v, 8, 8)
    with pytest.raises(ValueError, match="sliding-window"):
        attend_compacted(q, sp, 0.1, window=10)
    with pytest.raises(ValueError, match="sliding-window"):
        decode_mixed(q, k[:0], v[:0], torch.arange(0), [sp], 0.1, torch.tensor([100]), window=16)


def test_decode_step_cost():
    exact = decode_step_cost(32768, 28, 4, 128)
    assert exact.bytes_read == 2 * 32768 * 512 * 2
    full = decode_step_cost(32768, 28, 4, 128, 64, 64)
    two = decode_step_cost(32768, 28, 4, 128, 64, 64, importance_fraction=0.25, low_rank_divisor=4)
    # per token: 128 B keys + 128 B values + 8 B importance at full rank; values 0.25*128 + 0.75*32 = 56 B two-level
    assert full.bytes_read == 32768 * (128 + 128 + 8) + 128 * 512 * 2
    assert two.bytes_read == 32768 * (128 + 56 + 8) + 128 * 512 * 2
    assert two.flops < full.flops < exact.flops
    fp8 = decode_step_cost(32768, 28, 4, 128, 64, 64, coefficient_bytes=1, importance_fraction=0.25)
    assert fp8.bytes_read < two.bytes_read
    assert exact.bytes_read / two.bytes_read > 5
    assert math.isfinite(fp8.flops)


def test_batched_thresholds_equal_per_span_top_k():
    from ap_vllm.core.lowrank_attention import importance_thresholds

    gen = torch.Generator().manual_seed(5)
    imps = [torch.rand(t, generator=gen) for t in (1, 7, 64, 300)] + [torch.zeros(10)]
    for frac in (0.01, 0.25, 0.5, 1.0):
        got = importance_thresholds(imps, frac)
        for x, g in zip(imps, got):
            n = min(x.numel(), max(1, math.ceil(frac * x.numel())))
            assert float(g) == float(torch.topk(x, n).values[-1])
            assert int((x >= g).sum()) >= n  # at least the fraction reads full rank (more only on ties)
    assert importance_thresholds([], 0.25).numel() == 0


def test_threshold_sample_is_stratified_and_fixed_per_length():
    from ap_vllm.core.lowrank_attention import threshold_sample

    assert threshold_sample(1000, 0) is None and threshold_sample(1000, 1000) is None  # every token
    pos = threshold_sample(32768, 1024)
    assert pos.numel() == 1024 and torch.equal(pos, threshold_sample(32768, 1024))  # same for every layer
    assert torch.equal(pos // 32, torch.arange(1024))  # exactly one token per stratum of 32
    assert len(set((pos % 32).tolist())) > 16  # offsets vary (no aliasing with image rows)
    other = threshold_sample(5000, 1024)
    assert int(other.max()) < 5000 and bool((other[1:] >= other[:-1]).all())


def test_sampled_threshold_keeps_the_fraction_approximately():
    """On a long span the sampled threshold sends about the fraction to full rank: within 4 standard
    errors (sqrt(f (1 - f) / n)) of it, for smooth and for image-like striped importance; spans no
    longer than the sample get the exact threshold."""
    from ap_vllm.core.lowrank_attention import importance_thresholds

    gen = torch.Generator().manual_seed(7)
    t, n = 32768, 1024
    smooth = torch.rand(t, generator=gen) ** 3
    striped = (torch.arange(t) % 64 < 8).float() + 0.01 * torch.rand(t, generator=gen)  # 12.5% bright columns
    for frac in (0.1, 0.25, 0.5):
        for imp in (smooth, striped):
            thr = importance_thresholds([imp], frac, sample=n)[0]
            share = float((imp >= thr).float().mean())
            assert abs(share - frac) < 4 * math.sqrt(frac * (1 - frac) / n), (frac, share)
    short = torch.rand(700, generator=gen)
    assert torch.equal(importance_thresholds([short], 0.25, sample=n), importance_thresholds([short], 0.25))
