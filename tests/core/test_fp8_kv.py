"""FP8 KV cache (float8 e4m3 pages with per-layer k/v scales): writer, readers and kernels.

References: dense attention over the dequantized K/V (what vLLM's own FP8 backends compute), and the torch
oracle of each kernel on the same FP8 cache. The FP8 pages are checked byte for byte against an independent
quantizer (``x / scale`` rounded to e4m3, saturating at 448).
"""

import os

import torch

if not torch.cuda.is_available():  # must precede any import of triton / ap_vllm.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ap_vllm.core.batched_decode import build_batched_decode_plan, paged_decode_batched  # noqa: E402
from ap_vllm.core.dense import dense_attention  # noqa: E402
from ap_vllm.core.paged import (KV_FP8_DTYPE, gather_tokens, kv_dequantize, kv_quantize, split_kv_cache,  # noqa: E402
                                write_slots)
from ap_vllm.core.paged_decode import (build_decode_plan, build_prefill_plan, paged_mixed_decode,  # noqa: E402
                                       paged_prefill)
from ap_vllm.core.paged_layout import SpanLayout, cache_bytes, paged_span_block_ids, unpack_span  # noqa: E402
from ap_vllm.core.prefill_torch import paged_prefill_torch  # noqa: E402
from ap_vllm.core.synthetic import make_paged_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCALES = (0.0625, 0.125)  # k_scale, v_scale: stored = x / scale, so unit-variance K/V use e4m3's range


def _independent_e4m3(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Round x / scale to the nearest e4m3 value (ties to even), saturating at +-448: by enumeration."""
    grid = torch.arange(256, dtype=torch.uint8).view(KV_FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()  # 253 finite values (+-0 merged)
    y = (x.float() / scale).clamp(-448.0, 448.0).reshape(-1, 1)
    dist = (y - grid[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    cand = torch.where(dist == best, grid[None, :], float("nan"))
    # a tie: the value whose e4m3 mantissa is even
    bits = grid.to(KV_FP8_DTYPE).view(torch.uint8).to(torch.int64)
    even = (bits & 1) == 0
    pick = torch.where((dist == best) & even[None, :], grid[None, :], float("nan"))
    out = torch.where(torch.isnan(pick).all(1, keepdim=True), cand.nan_to_num(0.0).sum(1, keepdim=True),
                      pick.nan_to_num(0.0).sum(1, keepdim=True))
    return out.reshape(x.shape)


def test_quantizer_is_round_to_nearest_even_saturating():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=gen) * 30
    x[:4] = torch.tensor([1000.0, -1000.0, 448.0, 0.0])
    got = kv_quantize(x, KV_FP8_DTYPE, 0.5).float()
    assert torch.equal(got, _independent_e4m3(x, 0.5))
    assert got[0] == 448.0 and got[1] == -448.0  # saturates instead of overflowing to NaN
    assert torch.equal(kv_dequantize(kv_quantize(x, KV_FP8_DTYPE, 0.5), 0.5), got * 0.5)
    assert kv_quantize(x, torch.bfloat16).dtype == torch.bfloat16  # other caches: a cast
    assert kv_dequantize(x, 3.0) is x


def test_toward_zero_rounding_keeps_the_largest_magnitude_not_above_x():
    """CPU_ATTN's rounding (vLLM's CPU writer drops the extra mantissa bits): checked by enumeration."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(3000, generator=gen) * s for s in (0.004, 1.0, 30.0, 1000.0)])
    got = kv_quantize(x, KV_FP8_DTYPE, 0.5, toward_zero=True).float()
    grid = torch.arange(256, dtype=torch.uint8).view(KV_FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    y = (x / 0.5).clamp(-448.0, 448.0)
    below = torch.where(grid[None, :] <= y.abs()[:, None], grid[None, :], -1.0).amax(1)
    assert torch.equal(got, torch.sign(y) * below)
    assert torch.equal(got.abs() <= y.abs(), torch.ones_like(got, dtype=torch.bool))


def test_write_slots_stores_fp8_pages_and_skips_padding():
    gen = torch.Generator().manual_seed(1)
    nb, h, bs, d = 6, 2, 16, 32
    kv = kv_quantize(torch.randn(nb, h, bs, 2 * d, generator=gen), KV_FP8_DTYPE)
    before = kv.clone()
    k_cache, v_cache = split_kv_cache(kv, d)
    key, value = torch.randn(5, h, d, generator=gen), torch.randn(5, h, d, generator=gen)
    slots = torch.tensor([3, -1, 17, 40, -1])
    write_slots(k_cache, v_cache, key, value, slots, SCALES)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, bs)
        assert torch.equal(kv[blk, :, off, :d].float(), _independent_e4m3(key[i], SCALES[0]))
        assert torch.equal(kv[blk, :, off, d:].float(), _independent_e4m3(value[i], SCALES[1]))
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[[3, 17, 40]] = True
    untouched = ~written.reshape(nb, bs)
    assert torch.equal(kv.view(torch.uint8).permute(0, 2, 1, 3)[untouched],
                       before.view(torch.uint8).permute(0, 2, 1, 3)[untouched])
    # a reader gets x8 * scale back
    row = torch.arange(nb, dtype=torch.int32)
    got = gather_tokens(k_cache, row, 17, 18, SCALES[0])
    assert got.dtype == torch.float32
    assert torch.equal(got[0], _independent_e4m3(key[2], SCALES[0]) * SCALES[0])


def test_layout_of_a_span_in_fp8_pages_uses_one_byte_per_page_element():
    lay = SpanLayout(300, 24, 16, 2, 64, 16, torch.bfloat16, fp8=True, cache_dtype=KV_FP8_DTYPE)
    kv = torch.zeros(4, 2, 16, 2, 64, dtype=KV_FP8_DTYPE)
    assert lay.block_bytes == cache_bytes(kv).shape[1] == 2 * 16 * 2 * 64
    # bases stay in the model dtype: a basis row (W * 2 bytes) takes two tokens' worth of an FP8 page
    assert lay.sections["basis_k"].row_bytes == 128 * 2
    assert lay.sections["basis_k"].rows_per_block == lay.block_bytes // 256
    bf16 = SpanLayout(300, 24, 16, 2, 64, 16, torch.bfloat16, fp8=True)
    assert lay.num_blocks > bf16.num_blocks  # the same bytes in half-size pages


def _dense_rows(pb, scale):
    outs = []
    for b, L in enumerate(pb.seq_lens.tolist()):
        pos = torch.arange(L)
        o, _ = dense_attention(pb.q[b: b + 1].cpu().float(), pb.keys[b].float(), pb.values[b].float(), scale,
                               torch.tensor([L - 1]), pos)
        outs.append(o[0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_fp8_pages_equals_dense_attention_of_the_dequantized_kv(dtype):
    """Exact tokens only: the batched CPU path and the oracle against dense attention over x8 * scale; and the
    FP8 cache stays within e4m3's error of attention over the unquantized K/V."""
    pb = make_paged_batch([37, 80, 5], [[], [], []], 4, 2, 32, page=16, dtype=dtype, kv_scales=SCALES, seed=3)
    assert pb.kv_cache.dtype == KV_FP8_DTYPE
    scale = 32 ** -0.5
    want = _dense_rows(pb, scale)
    plan = build_batched_decode_plan([], pb.block_table, pb.seq_lens.tolist(), block_size=16)
    got, _ = paged_decode_batched(pb.q, pb.kv_cache, plan, scale, kv_scales=SCALES)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    ref, _ = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, build_decode_plan([], 3), scale,
                                kernel="torch", kv_scales=SCALES)
    assert torch.allclose(ref, want, atol=2e-5, rtol=1e-4)
    # without the scales the numbers would be 8-16x off: the scales are applied
    wrong, _ = paged_decode_batched(pb.q, pb.kv_cache, plan, scale)
    assert (wrong - want).abs().max() > 0.1


def test_fp8_pages_with_compacted_spans_batched_equals_oracle():
    """Spans packed into FP8 pages (bases in the model dtype, FP8 coefficients), exact tokens in FP8, the
    two-level read and the importance update: batched torch path == oracle."""
    pb = make_paged_batch([340, 400], [[(20, 300)], [(16, 340)]], 4, 2, 64, page=16, key_rank=24, value_rank=16,
                          dtype=torch.bfloat16, coefficient_dtype="fp8_e4m3", importance_fraction=0.25,
                          kv_scales=SCALES, seed=5)
    scale = 64 ** -0.5
    ref_cache = pb.kv_cache.clone()
    o1, l1 = paged_mixed_decode(pb.q, ref_cache, pb.block_table, pb.seq_lens, build_decode_plan(pb.spans, 2), scale,
                                kernel="torch", kv_scales=SCALES, importance_ema=0.25)
    plan = build_batched_decode_plan(pb.spans, pb.block_table, pb.seq_lens.tolist())
    thr = torch.stack([torch.as_tensor(sp.threshold, dtype=torch.float32) for sp in pb.spans])
    o2, l2 = paged_decode_batched(pb.q, pb.kv_cache, plan, scale, thresholds=thr, kv_scales=SCALES,
                                  importance_ema=0.25)
    assert torch.allclose(o2, o1, atol=1e-5, rtol=1e-4), (o2 - o1).abs().max()
    assert torch.allclose(l2, l1, atol=1e-5)
    for sp in pb.spans:  # the importance update wrote the same numbers into the FP8 pages
        ids = paged_span_block_ids(pb.block_table, sp)
        a = unpack_span(ref_cache, ids, sp.layout).importance
        b = unpack_span(pb.kv_cache, ids, sp.layout).importance
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4) and a.abs().sum() > 0


def test_prefill_over_fp8_pages_fused_cpu_path_equals_oracle():
    pb = make_paged_batch([340, 70], [[(16, 300)], []], 4, 2, 64, page=16, key_rank=32, value_rank=32,
                          dtype=torch.bfloat16, kv_scales=SCALES, seed=7)
    scale = 64 ** -0.5
    q = torch.randn(9, 4, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    qsl, lens = [0, 5, 9], [340, 70]
    want, wl = paged_prefill(q, pb.kv_cache, pb.block_table, torch.tensor(qsl), torch.tensor(lens),
                             build_prefill_plan(pb.spans, qsl, 4), scale, max_query_len=5, max_seq_len=340,
                             kernel="torch", kv_scales=SCALES)
    got, gl = paged_prefill_torch(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, scale, kv_scales=SCALES)
    assert torch.allclose(got, want, atol=1e-2, rtol=1e-2), (got - want).abs().max()  # bf16 fused attention
    assert torch.allclose(gl, wl, atol=1e-2)
    # row 1 has no span: dense attention over its dequantized keys, causal
    pos = torch.arange(70)
    o, _ = dense_attention(q[5:9].float(), pb.keys[1].float(), pb.values[1].float(), scale, torch.arange(66, 70), pos)
    assert torch.allclose(got[5:9], o, atol=1e-2, rtol=1e-2)  # (bf16 fused attention against float32)


@pytest.mark.parametrize("static", [False, True])
def test_triton_decode_over_fp8_pages_equals_oracle(static):
    pb = make_paged_batch([340, 61], [[(20, 300)], []], 4, 2, 64, page=16, key_rank=24, value_rank=16,
                          dtype=torch.bfloat16, coefficient_dtype="fp8_e4m3", importance_fraction=0.25,
                          kv_scales=SCALES, seed=11, device=DEV)
    scale = 64 ** -0.5
    plan = build_decode_plan(pb.spans, 2, device=DEV)
    ref_cache = pb.kv_cache.clone()
    o1, l1 = paged_mixed_decode(pb.q, ref_cache, pb.block_table, pb.seq_lens, plan, scale, kernel="torch",
                                kv_scales=SCALES, importance_ema=0.25, lse_ref=None)
    opts = {}
    if static:
        opts = dict(num_spans=torch.tensor([len(pb.spans)], dtype=torch.int32, device=DEV), max_seq_len=512)
    o2, l2 = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, scale, kernel="triton",
                                kv_scales=SCALES, importance_ema=0.25, lse_ref=None, **opts)
    assert torch.allclose(o2.cpu(), o1.cpu(), atol=3e-3, rtol=3e-3), (o2.cpu() - o1.cpu()).abs().max()
    assert torch.allclose(l2.cpu(), l1.cpu(), atol=1e-3)


def test_triton_prefill_over_fp8_pages_equals_oracle():
    pb = make_paged_batch([340, 70], [[(16, 300)], []], 4, 2, 64, page=16, key_rank=32, value_rank=32,
                          dtype=torch.bfloat16, kv_scales=SCALES, seed=13, device=DEV)
    scale = 64 ** -0.5
    q = torch.randn(9, 4, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEV)
    qsl, lens = [0, 5, 9], [340, 70]
    args = (q, pb.kv_cache, pb.block_table, torch.tensor(qsl, dtype=torch.int32, device=DEV),
            torch.tensor(lens, dtype=torch.int32, device=DEV))
    for spans in (pb.spans, []):  # with a span (exact kernel + span instances) and exact only
        plan = build_prefill_plan(spans, qsl, 4, device=DEV) if spans else None
        o1, l1 = paged_prefill(*args, plan, scale, max_query_len=5, max_seq_len=340, kernel="torch",
                               kv_scales=SCALES)
        o2, l2 = paged_prefill(*args, plan, scale, max_query_len=5, max_seq_len=340, kernel="triton",
                               kv_scales=SCALES)
        keep = slice(0, 9) if spans else slice(5, 9)  # (without the span, row 0's span pages are not keys)
        assert torch.allclose(o2.cpu()[keep], o1.cpu()[keep], atol=1e-2, rtol=1e-2), \
            (o2.cpu()[keep] - o1.cpu()[keep]).abs().max()
