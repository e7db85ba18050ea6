"""Paged layout of a compacted span and the torch paged decode reference."""

import pytest
import torch

from ap_vllm.core.compaction import compact_span
from ap_vllm.core.dense import dense_attention
from ap_vllm.core.lowrank_attention import decode_mixed
from ap_vllm.core.paged_decode import build_decode_plan, paged_mixed_decode
from ap_vllm.core.paged_layout import (SpanLayout, fits, pack_span, paged_span_block_ids, span_layout_for,
                                       storage_blocks, unpack_span)
from ap_vllm.core.synthetic import low_rank_kv, make_paged_batch


def test_storage_blocks():
    assert storage_blocks(0, 64, 16) == (0, 4)
    assert storage_blocks(5, 64, 16) == (1, 3)  # edge blocks shared with text are left alone
    assert storage_blocks(16, 15, 16) == (1, 0)


@pytest.mark.parametrize("fp8", [False, True])
def test_layout_sections_aligned(fp8):
    lay = SpanLayout(1000, 37, 64, 4, 128, 16, torch.bfloat16, fp8=fp8)
    secs = lay.sections
    assert secs["coeff_k"].row_bytes % 32 == 0 and secs["coeff_v"].row_bytes % 32 == 0
    assert secs["coeff_v"].row_bytes == (64 if fp8 else 128)
    assert ("scale_k" in secs) == fp8
    blocks = [s.block for s in secs.values()]
    assert blocks == sorted(blocks) and lay.num_blocks == sum(s.num_blocks for s in secs.values())
    assert lay.paged_memory_ratio() > 4


@pytest.mark.parametrize("cdt", ["model", "fp8_e4m3"])
def test_pack_unpack_roundtrip(cdt):
    gen = torch.Generator().manual_seed(0)
    k = low_rank_kv(333, 2, 64, generator=gen).bfloat16()
    v = low_rank_kv(333, 2, 64, generator=gen).bfloat16()
    sp = compact_span(k, v, 24, 20, coefficient_dtype=cdt, start=0, importance=torch.rand(333, generator=gen))
    lay = span_layout_for(sp, 16)
    assert fits(lay, 0)
    cache = torch.zeros(40, 2, 16, 2, 64, dtype=torch.bfloat16)
    ids = torch.randperm(40, generator=gen)[: lay.num_blocks]
    pack_span(cache, ids, sp, lay)
    back = unpack_span(cache, ids, lay)
    for name in ("coeff_k", "coeff_v", "basis_k", "basis_v", "importance", "scale_k", "scale_v"):
        a, b = getattr(sp, name), getattr(back, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[ids] = False
    assert torch.count_nonzero(cache[untouched]) == 0


@pytest.mark.parametrize("cdt", ["model", "fp8_e4m3"])
def test_coefficients_are_sector_planar(cdt):
    """Byte positions written out by hand: sector p of coefficient row i sits at p * rpb * 32 + (i % rpb) * 32 of
    the section's block i // rpb, so the first sectors (the first R/4 components, what a low-importance token
    reads) of a block's tokens are one dense byte range; bases and importance stay row-major."""
    gen = torch.Generator().manual_seed(1)
    k = low_rank_kv(300, 2, 64, generator=gen).bfloat16()
    sp = compact_span(k, k, 64, 64, coefficient_dtype=cdt, importance=torch.rand(300, generator=gen))
    lay = span_layout_for(sp, 16)
    cache = torch.zeros(64, 2, 16, 2, 64, dtype=torch.bfloat16)
    ids = torch.randperm(64, generator=gen)[: lay.num_blocks]
    pack_span(cache, ids, sp, lay)
    raw = cache.view(64, -1).view(torch.uint8)
    for name in ("coeff_k", "coeff_v"):
        sec = lay.sections[name]
        rows = getattr(sp, name).contiguous().view(torch.uint8).reshape(300, -1)  # [T, R * cb]
        nsec = sec.row_bytes // 32
        assert sec.planar and nsec == rows.shape[1] // 32 and nsec >= 2
        for i in (0, 1, sec.rows_per_block - 1, sec.rows_per_block, 299):
            blk = raw[ids[sec.block + i // sec.rows_per_block]]
            for p in range(nsec):
                at = p * sec.rows_per_block * 32 + (i % sec.rows_per_block) * 32
                assert torch.equal(blk[at: at + 32], rows[i, p * 32: (p + 1) * 32]), (name, i, p)
        # plane 0 of the first block: the first sectors of its rpb tokens, back to back
        first = raw[ids[sec.block]][: sec.rows_per_block * 32].reshape(sec.rows_per_block, 32)
        assert torch.equal(first, rows[: sec.rows_per_block, :32])
    imp = lay.sections["importance"]
    assert not imp.planar and not lay.sections["basis_k"].planar
    got = raw[ids[imp.block]][: 4 * 5].view(torch.float32)
    assert torch.equal(got, sp.importance[:5].float())


def test_paged_reference_matches_unpaged():
    """Spans at start/middle/end, T not a multiple of the page, one sequence without spans:
    reading the paged cache gives exactly decode_mixed over the same compacted spans."""
    pb = make_paged_batch([330, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=8,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24)
    plan = build_decode_plan(pb.spans, 3)
    o, l = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, 0.125, kernel="torch")
    for b, L in enumerate(pb.seq_lens.tolist()):
        mine = [cs for sp, cs in zip(pb.spans, pb.compacted) if sp.seq == b]
        pos = torch.arange(L)
        ex = torch.ones(L, dtype=torch.bool)
        for cs in mine:
            ex &= (pos < cs.start) | (pos >= cs.start + cs.num_tokens)
        ro, rl = decode_mixed(pb.q[b:b + 1], pb.keys[b][ex], pb.values[b][ex], pos[ex], mine, 0.125,
                              torch.tensor([L - 1]), importance_ema=None)
        assert torch.allclose(o[b], ro[0], atol=1e-5), b
        assert torch.allclose(l[b], rl[:, 0], atol=1e-5), b
        if not mine:
            do, _ = dense_attention(pb.q[b:b + 1], pb.keys[b], pb.values[b], 0.125, torch.tensor([L - 1]), pos)
            assert torch.allclose(o[b], do[0], atol=1e-5)


def test_window_rejected_with_spans():
    pb = make_paged_batch([300], [[(20, 200)]], num_q_heads=2, num_kv_heads=1, head_size=64)
    plan = build_decode_plan(pb.spans, 1)
    with pytest.raises(ValueError, match="sliding-window"):
        paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, 0.1, window=64, kernel="torch")
