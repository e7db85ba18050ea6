"""Score selection of the values (``value_selection: score``): the rule, the lag it removes, its error bound,
and every path that implements it (torch oracle, batched torch path, Triton dynamic launch) against the oracle.

Rule: full[t] = max_h exp(s[h, t] - lse_ref[h]) >= tau (every token where lse_ref is not finite); keys at
full rank; values of the other tokens at R_v // divisor components; no importance read or written."""

import os

import torch

if not torch.cuda.is_available():  # must precede any import of triton / ap_vllm.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ap_vllm.core.batched_decode import build_batched_decode_plan, paged_decode_batched  # noqa: E402
from ap_vllm.core.compaction import compact_span  # noqa: E402
from ap_vllm.core.lowrank_attention import (attend_compacted, decode_mixed, importance_threshold,  # noqa: E402
                                            low_rank, score_full_mask, update_importance)
from ap_vllm.core.paged_decode import build_decode_plan, paged_mixed_decode  # noqa: E402
from ap_vllm.core.paged_layout import PagedSpan, cache_bytes, pack_span, paged_span_block_ids, unpack_span  # noqa: E402
from ap_vllm.core.rope import RopeTable  # noqa: E402
from ap_vllm.core.synthetic import low_rank_kv, make_paged_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 0.125


def test_mask_is_the_max_over_heads_and_falls_back_to_full_rank():
    s = torch.tensor([[[-1.0, -10.0, -8.0, float("-inf")],
                       [-10.0, -2.0, -8.0, float("-inf")]]])  # [Nq=1, Hq=2, T=4] (-inf: a masked token)
    ref = torch.zeros(1, 2)
    assert score_full_mask(s, ref, 0.01).tolist() == [[True, True, False, False]]  # one head suffices
    tau = float(torch.exp(torch.tensor(-8.0)))
    assert score_full_mask(s, ref, tau).tolist() == [[True, True, True, False]]  # >= tau
    for bad in (float("inf"), float("nan"), float("-inf")):  # no (finite) normaliser in one head: all full
        assert score_full_mask(s, torch.tensor([[0.0, bad]]), 0.5).all()
    assert score_full_mask(s, None, 0.5).all()


def _span(t=128, hkv=1, d=64, rk=32, rv=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = low_rank_kv(t, hkv, d, generator=gen)
    v = low_rank_kv(t, hkv, d, generator=gen, decay=0.97)  # much of a value lies past R_v / 4 components
    return k, v, compact_span(k, v, rk, rv)


def test_score_reads_a_token_that_just_drew_attention_at_full_rank():
    """The lag case: the importance EMA was built by earlier steps that attended token A; this step's query
    (one copy head) attends token B for the first time. EMA selection reads B at R_v / 4 (its importance is
    the lowest), score selection at full rank; the output of the copy head follows."""
    t, hkv, g, d = 512, 1, 4, 64  # (other heads attend about uniformly: 1 / 512 < tau)
    k, v, sp = _span(t, hkv, d)
    a_tok, b_tok = 140, 390
    gen = torch.Generator().manual_seed(1)
    q_prev = 0.05 * torch.randn(1, hkv * g, d, generator=gen)
    q_prev[0, 0] = 100.0 * k[a_tok, 0] / k[a_tok, 0].norm() ** 2  # earlier steps: head 0 copies from A
    sp.importance = torch.rand(t, generator=gen) * 1e-3
    for _ in range(4):
        _, lse, s = attend_compacted(q_prev, sp, SCALE, return_scores=True)
        sp.importance = update_importance(sp.importance, s, lse[:, -1], 0.25)
    q = 0.05 * torch.randn(1, hkv * g, d, generator=gen)
    q[0, 0] = 100.0 * k[b_tok, 0] / k[b_tok, 0].norm() ** 2  # this step: head 0 copies from B (score 12.5)
    _, lse_prev = attend_compacted(q_prev, sp, SCALE)  # the previous step's normaliser
    thr = importance_threshold(sp.importance, 0.25)
    assert sp.importance[a_tok] >= thr > sp.importance[b_tok]  # EMA: A full rank, B not

    o_full, lse_now, s = attend_compacted(q, sp, SCALE, return_scores=True)
    o_ema, _ = attend_compacted(q, sp, SCALE, threshold=thr)
    o_score, _ = attend_compacted(q, sp, SCALE, threshold=thr, score_threshold=1 / 256, lse_ref=lse_prev[:, 0])
    full = score_full_mask(s, lse_prev.T, 1 / 256)[0]
    p_b = torch.softmax(s[0, 0], -1)[b_tok]
    assert full[b_tok] and p_b > 0.5  # B dominates head 0 this step and is read at full rank
    err_ema = (o_ema[0, 0] - o_full[0, 0]).norm() / o_full[0, 0].norm()
    err_score = (o_score[0, 0] - o_full[0, 0]).norm() / o_full[0, 0].norm()
    # measured: p_B 0.60, EMA error 0.71, score error 0.0076 with 3.5 % of the tokens at full rank
    assert err_ema > 0.3 and err_score < 0.02, (err_ema, err_score)
    assert full.float().mean() < 0.1, full.float().mean()  # still a two-level read: most tokens at low rank


@pytest.mark.parametrize("shift", [0.0, -0.3, 0.3])  # lse_ref = this step's lse + shift (a lagging normaliser)
def test_selection_and_output_error_obey_the_bound(shift):
    """Every token read at low rank has p^ < tau in every head, every other token p^ >= tau in some head; per
    head ||out_sel - out_full|| <= sum_{t low} p[h, t] e_t[h] < tau exp(lse_ref[h] - lse[h]) sum_{t low} e_t[h]
    (e_t[h] = ||C_v^hi[t] B_v[:, head h's columns]||), to float32 rounding (1e-5 relative)."""
    t, hkv, g, d, tau = 256, 2, 3, 32, 1 / 128
    k, v, sp = _span(t, hkv, d, rk=48, rv=48, seed=3)
    q = torch.randn(2, hkv * g, d, generator=torch.Generator().manual_seed(4))
    qpos = torch.tensor([t + 5, 200])  # the second query sees the first 201 tokens only
    o_full, lse, s = attend_compacted(q, sp, SCALE, qpos, return_scores=True)
    lse_ref = lse.T + shift  # [Nq, Hq]
    o_sel, _ = attend_compacted(q, sp, SCALE, qpos, score_threshold=tau, lse_ref=lse_ref)
    full = score_full_mask(s, lse_ref, tau)  # [Nq, T]
    p_hat = torch.exp(s - lse_ref[..., None])  # [Nq, Hq, T]
    assert bool((p_hat.amax(1)[~full] < tau).all()) and bool((p_hat.amax(1)[full] >= tau).all())
    cv = sp.coeff_v_float()
    hi = cv.clone()
    hi[:, : low_rank(48, 4)] = 0
    bv = sp.basis_v.float().reshape(48, hkv, d)
    e = torch.einsum("tr,rjd->tjd", hi, bv).norm(dim=-1).repeat_interleave(g, 1)  # [T, Hq]
    p = torch.exp(s - lse.T[..., None])
    low = (~full).float()[:, None, :]
    err = (o_sel - o_full).norm(dim=-1)  # [Nq, Hq]
    first = (p * low * e.T[None]).sum(-1)
    second = tau * torch.exp(lse_ref - lse.T) * (low * e.T[None]).sum(-1)
    assert bool((err <= first * (1 + 1e-5) + 1e-6).all()), (err, first)
    assert bool((first <= second * (1 + 1e-5)).all()), (first, second)
    assert 0.05 < full.float().mean() < 0.95  # a real two-level read on this synthetic
    # no normaliser (a row's first decode step): every token at full rank, the full-rank output exactly
    o_none, _ = attend_compacted(q, sp, SCALE, qpos, score_threshold=tau,
                                 lse_ref=torch.full_like(lse_ref, float("inf")))
    assert torch.equal(o_none, o_full)


def test_decode_mixed_reads_spans_by_score_and_keeps_no_importance():
    k, v, sp = _span(160, 2, 32, rk=24, rv=24, seed=5)
    imp = sp.importance.clone()
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(6))
    ke, ve = low_rank_kv(20, 2, 32), low_rank_kv(20, 2, 32)
    args = (q, ke, ve, torch.arange(160, 180), [sp], SCALE, torch.tensor([179]))
    o_full, lse = decode_mixed(*args, importance_ema=None)
    o_sel, lse_sel = decode_mixed(*args, thresholds=[0.0], importance_ema=None, lse_ref=lse[:, 0],
                                  score_threshold=1 / 64)
    torch.testing.assert_close(lse_sel, lse)  # keys at full rank: the normaliser is the full-rank one
    assert not torch.allclose(o_sel, o_full, atol=1e-4)
    assert torch.equal(sp.importance, imp)
    with pytest.raises(ValueError, match="importance_ema=None"):
        decode_mixed(*args, score_threshold=1 / 64)
    with pytest.raises(ValueError, match="full rank"):
        attend_compacted(q, sp, SCALE, two_level_keys=True, score_threshold=1 / 64)


# --------------------------------------------------------------------------------------
# the paths of a decode step against the oracle (paged_decode_reference)
# --------------------------------------------------------------------------------------
def _poison_importance(pb, cache):
    """NaN importance in every span: score selection must neither read nor write it."""
    for sp in pb.spans:
        ids = paged_span_block_ids(pb.block_table, sp)
        cs = unpack_span(cache, ids, sp.layout, start=sp.start)
        cs.importance = torch.full_like(cs.importance, float("nan"))
        pack_span(cache, ids, cs, sp.layout, sections=["importance"])


def _lse_ref(pb, rope=None):
    """A previous step's lse per row: the full-rank lse of this step's query, shifted per head (+-0.2),
    row 1 without one (+inf)."""
    full = [PagedSpan(sp.seq, sp.start, sp.layout) for sp in pb.spans]
    _, lse = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens,
                                build_decode_plan(full, pb.q.shape[0]), SCALE, kernel="torch", rope=rope)
    lse = lse.float().cpu() + 0.2 * torch.randn(lse.shape, generator=torch.Generator().manual_seed(7))
    lse[1] = float("inf")
    return lse.to(DEV)


CASES = [  # dtype, coefficients, pre-RoPE, softcap, Hq, Hkv, d
    (torch.float32, "model", False, None, 8, 2, 64),
    (torch.float32, "fp8_e4m3", False, 30.0, 6, 3, 32),
    (torch.float32, "model", True, None, 4, 2, 64),
]


@pytest.mark.parametrize("dtype,cdt,pre_rope,softcap,hq,hkv,d", CASES)
def test_triton_dynamic_launch_matches_the_oracle(dtype, cdt, pre_rope, softcap, hq, hkv, d):
    """Outputs within 1e-5 (float32), lse within 1e-4; no byte of the cache written; row 1 (no lse_ref) and a
    call without lse_ref equal the full-rank read."""
    rope = RopeTable.from_base(d, max_positions=512, is_neox_style=False) if pre_rope else None
    pb = make_paged_batch([300, 250, 420], [[(37, 200)], [(16, 200)], [(0, 150), (230, 190)]], num_q_heads=hq,
                          num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=32, importance_fraction=0.25,
                          dtype=dtype, coefficient_dtype=cdt, rope=rope, seed=2, device=DEV)
    lse_ref = _lse_ref(pb, rope)
    _poison_importance(pb, pb.kv_cache)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    before = cache_bytes(pb.kv_cache).clone()
    kw = dict(softcap=softcap, lse_ref=lse_ref, rope=rope, score_threshold=1 / 256)
    o1, l1 = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, SCALE, kernel="torch", **kw)
    o2, l2 = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, SCALE, kernel="triton", **kw)
    torch.testing.assert_close(o2.cpu(), o1.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2.cpu(), l1.cpu(), atol=1e-4, rtol=1e-5)
    assert torch.equal(cache_bytes(pb.kv_cache), before)
    full_plan = build_decode_plan([PagedSpan(sp.seq, sp.start, sp.layout) for sp in pb.spans], 3, device=DEV)
    o_full, _ = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, full_plan, SCALE,
                                   kernel="torch", softcap=softcap, rope=rope)
    torch.testing.assert_close(o2[1].cpu(), o_full[1].cpu(), atol=1e-5, rtol=1e-5)
    assert (o1[0] - o_full[0]).abs().max() > 1e-4 and (o1[2] - o_full[2]).abs().max() > 1e-4  # two-level
    o3, _ = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, SCALE, kernel="triton",
                               softcap=softcap, rope=rope, score_threshold=1 / 256)
    torch.testing.assert_close(o3.cpu(), o_full.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_batched_torch_path_matches_the_oracle(fp8):
    pb = make_paged_batch([300, 250, 420], [[(37, 200)], [(16, 200)], [(0, 150), (230, 190)]], num_q_heads=4,
                          num_kv_heads=2, head_size=32, key_rank=16, value_rank=32, importance_fraction=0.25,
                          coefficient_dtype="fp8_e4m3" if fp8 else "model", seed=3)
    lse_ref = _lse_ref(pb).cpu()
    _poison_importance(pb, pb.kv_cache)
    plan = build_decode_plan(pb.spans, 3)
    before = cache_bytes(pb.kv_cache).clone()
    o1, l1 = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, SCALE, kernel="torch",
                                lse_ref=lse_ref, score_threshold=1 / 256)
    bplan = build_batched_decode_plan(pb.spans, pb.block_table, pb.seq_lens.tolist())
    o2, l2 = paged_decode_batched(pb.q, pb.kv_cache, bplan, SCALE, lse_ref=lse_ref, score_threshold=1 / 256)
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache_bytes(pb.kv_cache), before)
    with pytest.raises(ValueError, match="importance_ema=None"):
        paged_decode_batched(pb.q, pb.kv_cache, bplan, SCALE, lse_ref=lse_ref, score_threshold=1 / 256,
                             importance_ema=0.25)


def test_score_selection_is_refused_where_it_cannot_run():
    pb = make_paged_batch([300], [[(37, 200)]], num_q_heads=4, num_kv_heads=2, head_size=32, key_rank=16,
                          value_rank=16, importance_fraction=0.25, two_level_keys=True, device=DEV)
    plan = build_decode_plan(pb.spans, 1, device=DEV)
    with pytest.raises(ValueError, match="two_level_keys"):
        paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, SCALE, score_threshold=0.01)
    with pytest.raises(ValueError, match="importance_ema=None"):
        paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, SCALE, score_threshold=0.01,
                           importance_ema=0.25)


def test_read_counts_are_the_span_tokens_read_at_full_rank():
    """``read_counts`` (the measurement behind equal-bytes-read comparisons) adds, per call, the span tokens
    whose values were read at full rank and all span tokens read: the score mask of each row's own scores
    (every token of the row without lse_ref), and importance >= threshold in EMA mode."""
    pb = make_paged_batch([300, 250, 420], [[(37, 200)], [(16, 200)], [(0, 150), (230, 190)]], num_q_heads=4,
                          num_kv_heads=2, head_size=32, key_rank=16, value_rank=32, importance_fraction=0.25, seed=3)
    lse_ref = _lse_ref(pb).cpu()
    tau = 1 / 256
    spans = [unpack_span(pb.kv_cache, paged_span_block_ids(pb.block_table, sp), sp.layout, start=sp.start)
             for sp in pb.spans]
    want_full = 0
    for sp, cs in zip(pb.spans, spans):
        _, _, s = attend_compacted(pb.q[sp.seq][None], cs, SCALE, return_scores=True)
        want_full += int(score_full_mask(s, lse_ref[sp.seq][None], tau).sum())
    total = sum(sp.layout.num_tokens for sp in pb.spans)
    assert total == 740 and 200 < want_full < total  # row 1's 200 tokens all at full rank, the others not all
    bplan = build_batched_decode_plan(pb.spans, pb.block_table, pb.seq_lens.tolist())
    counts = torch.zeros(2, dtype=torch.float64)
    for _ in range(2):  # accumulates
        paged_decode_batched(pb.q, pb.kv_cache, bplan, SCALE, lse_ref=lse_ref, score_threshold=tau,
                             read_counts=counts)
    assert counts.tolist() == [2 * want_full, 2 * total]

    thr = torch.tensor([float(importance_threshold(cs.importance, 0.25)) for cs in spans])
    want_ema = sum(int((cs.importance >= t).sum()) for cs, t in zip(spans, thr))
    counts.zero_()
    paged_decode_batched(pb.q, pb.kv_cache, bplan, SCALE, thresholds=thr, read_counts=counts)
    assert counts.tolist() == [want_ema, total] and 0.2 < want_ema / total < 0.35
    counts.zero_()
    paged_decode_batched(pb.q, pb.kv_cache, bplan, SCALE, read_counts=counts)  # no thresholds: all full rank
    assert counts.tolist() == [total, total]
