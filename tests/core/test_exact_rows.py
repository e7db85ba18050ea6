"""Prefill rows with no compacted span in their context through SDPA (:mod:`ap_vllm.core.exact_rows`) against the
torch reference ``paged_prefill_reference``: whole prompts (causal, square) and later chunks / prefix-cache hits
(causal aligned to the bottom right), grouped and plain heads, float32 (1e-5) and bf16 (2e-2), an FP8 cache
(dequantized as gathered, 1e-5). Outputs are written in the output's dtype; the lse of each row's last query
matches, its other queries' lse is NaN, and rows not asked for are left as they were."""

import pytest
import torch

from ap_vllm.core.exact_rows import exact_rows_attention, last_query_lse, sdpa_row_attention
from ap_vllm.core.paged_decode import paged_prefill_reference
from ap_vllm.core.synthetic import make_paged_batch


@pytest.mark.parametrize("dtype,hq,hkv,d,fp8,tol", [(torch.float32, 8, 2, 64, False, 1e-5),
                                                    (torch.float32, 4, 4, 32, False, 1e-5),
                                                    (torch.bfloat16, 6, 1, 64, False, 2e-2),
                                                    (torch.float32, 4, 2, 32, True, 1e-5)])
def test_exact_rows_match_the_reference(dtype, hq, hkv, d, fp8, tol):
    lens = [300, 150, 77, 460]
    specs = [[], [(16, 100)], [], []]  # row 1: a compacted span (not an exact row)
    pb = make_paged_batch(lens, specs, num_q_heads=hq, num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=16,
                          dtype=dtype, seed=5)
    cache, scales = pb.kv_cache, None
    if fp8:  # the same values through an FP8 cache and its scales
        scales = (0.05, 0.04)
        cache = torch.cat([(pb.kv_cache[:, :1] / scales[0]), (pb.kv_cache[:, 1:] / scales[1])], 1).to(
            torch.float8_e4m3fn)
        ref_cache = torch.cat([cache[:, :1].float() * scales[0], cache[:, 1:].float() * scales[1]], 1)
    else:
        ref_cache = pb.kv_cache
    qlens = [300, 20, 30, 460]  # rows 0 and 3: whole prompts; row 2: a second chunk after 47 tokens
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    o_ref, l_ref = paged_prefill_reference(q, ref_cache, pb.block_table, qsl, lens, [], 0.125)
    out = torch.full_like(q, 7.0)  # the layer output's dtype
    lse = torch.full((qsl[-1], hq), 7.0)
    rows = [0, 2, 3]
    exact_rows_attention(sdpa_row_attention, q, cache, pb.block_table, qsl, lens, rows, 0.125, scales, out, lse)
    mine = torch.cat([torch.arange(0, 300), torch.arange(320, 810)])
    others = torch.arange(300, 320)
    torch.testing.assert_close(out[mine].float(), o_ref[mine].float(), atol=tol, rtol=tol)
    assert bool((out[others] == 7.0).all()) and bool((lse[others] == 7.0).all())
    last = torch.tensor([299, 349, 809])
    torch.testing.assert_close(lse[last], l_ref.float()[last], atol=tol, rtol=tol)
    assert torch.isnan(lse[torch.cat([torch.arange(0, 299), torch.arange(320, 349), torch.arange(350, 809)])]).all()
    out2 = torch.zeros_like(q)
    exact_rows_attention(sdpa_row_attention, q, cache, pb.block_table, qsl, lens, rows, 0.125, scales, out2)
    assert torch.equal(out2[mine], out[mine])  # (no lse asked: the same outputs)


def test_bottom_right_alignment_and_lse():
    """n queries at the end of L keys see keys up to their own position; the lse helper is logsumexp."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    o = sdpa_row_attention(q, k, v, 0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for i in range(3):
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i], kk[: 8 + i]) * 0.5, -1)
        torch.testing.assert_close(o[i], torch.einsum("ht,thd->hd", p, vv[: 8 + i]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last_query_lse(q[2], k, 0.5),
                               torch.logsumexp(torch.einsum("hd,thd->ht", q[2], kk) * 0.5, -1))
    with pytest.raises(ValueError, match="more queries"):
        sdpa_row_attention(k.repeat_interleave(2, 1), q[:, :2], q[:, :2], 0.5)
