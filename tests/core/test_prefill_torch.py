"""The CPU prefill path (fused exact attention in two parts + spans at full rank) against the torch
reference ``paged_prefill_reference`` (which scores every key of every row densely)."""

import pytest
import torch

from ap_vllm.core.paged_decode import paged_prefill_reference
from ap_vllm.core.prefill_torch import paged_prefill_torch
from ap_vllm.core.rope import RopeTable
from ap_vllm.core.synthetic import make_paged_batch


def _batch(qlens, dtype=torch.float32, cdt="model", hq=8, hkv=2, d=64, rope=None, lens=(300, 150, 460, 200)):
    specs = [[(37, 200)], [], [(0, 150), (230, 190)], [(16, 160)]]
    pb = make_paged_batch(list(lens), specs, num_q_heads=hq, num_kv_heads=hkv, head_size=d, key_rank=16,
                          value_rank=16, dtype=dtype, coefficient_dtype=cdt, rope=rope, seed=3)
    gen = torch.Generator().manual_seed(11)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    return pb, torch.randn(qsl[-1], hq, d, generator=gen).to(dtype), qsl


@pytest.mark.parametrize("dtype,cdt,softcap,window,hq,hkv,pre_rope,tol", [
    (torch.float32, "model", None, None, 8, 2, False, 1e-5),
    (torch.float32, "model", None, None, 4, 4, True, 1e-5),  # MHA, pre-RoPE spans
    (torch.bfloat16, "model", None, None, 4, 1, False, 2e-2),  # fused attention in bf16
    (torch.float32, "fp8_e4m3", 30.0, None, 6, 3, False, 1e-5),  # soft-cap: the dense path
])
def test_matches_reference(dtype, cdt, softcap, window, hq, hkv, pre_rope, tol):
    rope = RopeTable.from_base(64, rotary_dim=48, max_positions=1024, is_neox_style=False) if pre_rope else None
    pb, q, qsl = _batch([40, 1, 33, 3], dtype=dtype, cdt=cdt, hq=hq, hkv=hkv, rope=rope)
    lens = pb.seq_lens.tolist()
    o_ref, l_ref = paged_prefill_reference(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, 0.125, softcap,
                                           window, rope)
    o, l = paged_prefill_torch(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, 0.125, softcap, window, rope)
    torch.testing.assert_close(o, o_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(l, l_ref.float(), atol=tol, rtol=tol)


def test_whole_prompt_and_window_rows():
    """A whole prompt (no history: the chunk part is the whole causal square) and, on a sliding-window
    layer (no spans there), the dense path with the window."""
    pb, q, qsl = _batch([300, 150], lens=(300, 150, 460, 200))
    qsl = qsl + [qsl[-1], qsl[-1]]  # rows 2 and 3 have no query in this step
    lens = pb.seq_lens.tolist()
    for window, spans in ((None, []), (48, [])):
        o_ref, l_ref = paged_prefill_reference(q, pb.kv_cache, pb.block_table, qsl, lens, spans, 0.125, None, window)
        o, l = paged_prefill_torch(q, pb.kv_cache, pb.block_table, qsl, lens, spans, 0.125, None, window)
        torch.testing.assert_close(o, o_ref.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l, l_ref.float(), atol=1e-5, rtol=1e-5)


def test_multimodal_items_attended_both_ways():
    """``reach`` (vLLM's is_mm_prefix_lm models): rows whose chunk holds an item take the dense path with it (also
    rows that would be fresh: the causal fresh-row call must not see them) and equal the oracle with it."""
    from ap_vllm.core.dense import mm_prefix_reach

    pb, q, qsl = _batch([40, 1, 33, 3])
    lens = pb.seq_lens.tolist()
    items = {0: [(270, 290)], 2: [(435, 450), (455, 470)], 3: [(190, 199)]}
    reach = torch.cat([mm_prefix_reach(torch.arange(L - (qsl[b + 1] - qsl[b]), L), items.get(b, ()), L)
                       for b, L in enumerate(lens)])
    o_ref, l_ref = paged_prefill_reference(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, 0.125, reach=reach)
    o, l = paged_prefill_torch(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, 0.125, reach=reach)
    torch.testing.assert_close(o, o_ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l, l_ref.float(), atol=1e-5, rtol=1e-5)
    causal, _ = paged_prefill_reference(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, 0.125)
    assert (causal - o_ref).abs().max() > 1e-2

    def fresh_attention(q, k, v, cu, scale):  # (causal: wrong for a row with an item)
        raise AssertionError("a row with an item attended both ways went to the causal fresh-row call")

    pb, q, qsl = _batch([300, 150], lens=(300, 150, 460, 200))
    qsl, lens, items = qsl + [qsl[-1], qsl[-1]], pb.seq_lens.tolist(), {0: [(10, 200)], 1: [(149, 149), (5, 60)]}
    reach = torch.cat([mm_prefix_reach(torch.arange(L - (qsl[b + 1] - qsl[b]), L), items.get(b, ()), L)
                       for b, L in enumerate(lens)])
    o_ref, l_ref = paged_prefill_reference(q, pb.kv_cache, pb.block_table, qsl, lens, [], 0.125, reach=reach)
    o, l = paged_prefill_torch(q, pb.kv_cache, pb.block_table, qsl, lens, [], 0.125, reach=reach,
                               fresh_attention=fresh_attention)
    torch.testing.assert_close(o, o_ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l, l_ref.float(), atol=1e-5, rtol=1e-5)
