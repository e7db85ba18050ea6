"""Rows of longer queries (prefill, chunked prefill after a compacted span, speculative rows) over exact
pages + compacted spans: the Triton path (exact kernel + span instances + merge) against the torch
reference, and the reference against dense attention (CPU: Triton interpreter, small shapes)."""

import os

import torch

if not torch.cuda.is_available():  # must precede any import of triton / ap_vllm.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ap_vllm.core.dense import dense_attention  # noqa: E402
from ap_vllm.core.paged_decode import (build_prefill_plan, paged_prefill, paged_prefill_reference,  # noqa: E402
                                       prefill_rows_per_instance)
from ap_vllm.core.rope import RopeTable  # noqa: E402
from ap_vllm.core.synthetic import make_paged_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(qlens, dtype=torch.float32, cdt="model", hq=8, hkv=2, d=64, rope=None, rank=16, seed=0):
    # spans end before each sequence's first query of the step (compacted in an earlier step)
    lens = [300, 150, 460, 200]
    specs = [[(37, 200)], [], [(0, 150), (230, 190)], [(16, 160)]]
    pb = make_paged_batch(lens, specs, num_q_heads=hq, num_kv_heads=hkv, head_size=d, key_rank=rank,
                          value_rank=rank, dtype=dtype, coefficient_dtype=cdt, rope=rope, seed=seed, device=DEV)
    gen = torch.Generator().manual_seed(seed + 7)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=gen).to(dtype).to(DEV)
    return pb, q, qsl


def _run(pb, q, qsl, scale=0.125, softcap=None, rope=None, qpt=None, tol=1e-5):
    plan = build_prefill_plan(pb.spans, qsl, q.shape[1], device=DEV, qpt=qpt)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=DEV)
    common = dict(max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])), max_seq_len=int(pb.seq_lens.max()),
                  softcap=softcap, rope=rope)
    o1, l1 = paged_prefill(q, pb.kv_cache, pb.block_table, qsl_t, pb.seq_lens, plan, scale, kernel="torch", **common)
    o2, l2 = paged_prefill(q, pb.kv_cache, pb.block_table, qsl_t, pb.seq_lens, plan, scale, kernel="triton",
                           **common)
    assert torch.allclose(o2.cpu(), o1.cpu(), atol=tol, rtol=tol), (o2.cpu() - o1.cpu()).abs().max()
    fin = torch.isfinite(l1)
    assert torch.equal(fin, torch.isfinite(l2.cpu()))
    assert torch.allclose(l2.cpu()[fin], l1.cpu()[fin], atol=1e-4, rtol=1e-5)
    return plan, o2, l2


@pytest.mark.parametrize("dtype,cdt,softcap,hq,hkv,d", [
    (torch.float32, "model", None, 8, 2, 64),
    (torch.bfloat16, "model", 30.0, 4, 1, 128),
    (torch.float16, "fp8_e4m3", None, 6, 3, 64),
])
def test_prefill_matches_reference(dtype, cdt, softcap, hq, hkv, d):
    # chunk after a span, one decode-like row, a long chunk after two spans, speculative rows
    pb, q, qsl = _batch([40, 1, 33, 3], dtype=dtype, cdt=cdt, hq=hq, hkv=hkv, d=d)
    plan, _, _ = _run(pb, q, qsl, softcap=softcap, tol=1e-5 if dtype == torch.float32 else 3e-3)
    assert plan.num_inst > len(pb.spans)  # long chunks are read by several instances


def test_prefill_instances_of_any_size_agree():
    """One row per instance, a few, and the default: the same result (instances only regroup rows)."""
    pb, q, qsl = _batch([40, 0, 17, 5])
    outs = [_run(pb, q, qsl, qpt=k)[1].cpu() for k in (1, 4, None)]
    assert torch.allclose(outs[0], outs[1], atol=1e-6) and torch.allclose(outs[0], outs[2], atol=1e-6)
    assert prefill_rows_per_instance(28) == 2 and prefill_rows_per_instance(4) == 16


def test_prefill_pre_rope_matches_reference():
    rope = RopeTable.from_base(64, rotary_dim=48, max_positions=512, is_neox_style=False)
    pb, q, qsl = _batch([12, 2, 9, 1], hq=4, hkv=2, rope=rope, rank=8, seed=2)
    _run(pb, q, qsl, rope=rope)


def test_prefill_reference_equals_dense_at_full_rank():
    """Spans compacted at their exact rank: the prefill reference equals dense attention over the
    original K/V (so the kernels, which equal the reference, compute attention, not just themselves)."""
    gen = torch.Generator().manual_seed(4)
    from ap_vllm.core.compaction import compact_span
    from ap_vllm.core.paged_layout import PagedSpan, pack_span, paged_span_block_ids, span_layout_for

    L, hq, hkv, d, R, page, start, T, nq = 240, 4, 2, 64, 8, 16, 32, 160, 30
    k = (torch.randn(L, R, generator=gen) @ torch.randn(R, hkv * d, generator=gen)).view(L, hkv, d) / 4
    v = (torch.randn(L, R, generator=gen) @ torch.randn(R, hkv * d, generator=gen)).view(L, hkv, d) / 4
    nblk = -(-L // page)
    cache = torch.randn(nblk + 2, 2, page, hkv, d, generator=gen)
    bt = torch.randperm(nblk + 2, generator=gen)[:nblk].to(torch.int32)[None]
    pos = torch.arange(L)
    cache[bt[0, pos // page].long(), 0, pos % page] = k
    cache[bt[0, pos // page].long(), 1, pos % page] = v
    cs = compact_span(k[start: start + T], v[start: start + T], R, R, start=start)
    sp = PagedSpan(seq=0, start=start, layout=span_layout_for(cs, page))
    pack_span(cache, paged_span_block_ids(bt, sp), cs, sp.layout)
    q = torch.randn(nq, hq, d, generator=gen)
    od, ld = dense_attention(q, k, v, 0.125, torch.arange(L - nq, L), pos)
    o, lse = paged_prefill_reference(q, cache, bt, [0, nq], [L], [sp], 0.125)
    assert torch.allclose(o, od, atol=1e-4) and torch.allclose(lse, ld.T, atol=1e-4)
    plan = build_prefill_plan([sp], [0, nq], hq, device=DEV)
    o2, l2 = paged_prefill(q.to(DEV), cache.to(DEV), bt.to(DEV), torch.tensor([0, nq], dtype=torch.int32, device=DEV),
                           torch.tensor([L], dtype=torch.int32, device=DEV), plan, 0.125, max_query_len=nq,
                           max_seq_len=L, kernel="triton")
    assert torch.allclose(o2.cpu(), od, atol=1e-4) and torch.allclose(l2.cpu(), ld.T, atol=1e-4)


def test_prefill_refuses_a_span_overlapping_the_queries():
    pb, q, qsl = _batch([70, 1, 1, 1])  # sequence 0: 70 queries reach back into its span [37, 237)
    plan = build_prefill_plan(pb.spans, qsl, q.shape[1], device=DEV)
    with pytest.raises(ValueError, match="is not before its first query"):
        paged_prefill(q, pb.kv_cache, pb.block_table, torch.tensor(qsl, dtype=torch.int32, device=DEV),
                      pb.seq_lens, plan, 0.125, max_query_len=70, max_seq_len=460, kernel="torch")
    with pytest.raises(ValueError, match="full rank"):
        sp = pb.spans[0]
        sp.threshold = 0.5
        build_prefill_plan(pb.spans, qsl, q.shape[1])
