"""The FP8 pages AttentionPack writes on CPU hold the bytes vLLM's own CPU backend (CPU_ATTN) writes.

CPU_ATTN's writer (``cpu_attn_reshape_and_cache``) is called on the same tokens; its value pages are
token-major like ours, so their bytes must be equal (its key pages are stored transposed for its ISA, so keys
are compared as the multiset of each head's bytes).
"""

import pytest
import torch

pytest.importorskip("vllm")

from ap_vllm.core.paged import KV_FP8_DTYPE, kv_quantize, split_kv_cache, write_slots  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
                                reason="vLLM's CPU FP8 KV cache needs x86 AVX-512 or AMX")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.037])
def test_fp8_pages_equal_cpu_attn_bytes(dtype, scale):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    nb, h, bs, d, n = 3, 2, 32, 64, 40
    gen = torch.Generator().manual_seed(0)
    key = (torch.randn(n, h, d, generator=gen) * 20).to(dtype)
    value = (torch.randn(n, h, d, generator=gen) * 3).to(dtype)
    slots = torch.randperm(nb * bs, generator=gen)[:n]
    theirs = torch.zeros(nb, h, 2 * bs, d, dtype=torch.uint8)
    kc, vc = theirs.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, _get_attn_isa(dtype, bs, d, "fp8"), k_scale=scale,
                                   v_scale=scale, kv_cache_dtype="fp8")
    ours = torch.zeros(nb, h, bs, 2 * d, dtype=KV_FP8_DTYPE)
    k_cache, v_cache = split_kv_cache(ours, d)
    write_slots(k_cache, v_cache, key, value, slots, (scale, scale), toward_zero=True)
    ours_v = ours[..., d:].view(torch.uint8)
    assert torch.equal(ours_v, vc)
    for b in range(nb):
        for j in range(h):
            assert torch.equal(ours[b, j, :, :d].view(torch.uint8).reshape(-1).sort().values,
                               kc[b, j].reshape(-1).sort().values)
    # and round to nearest would not have matched: the rounding mode is what makes the bytes equal
    nearest = kv_quantize(value, KV_FP8_DTYPE, scale).view(torch.uint8)
    blk, off = slots // bs, slots % bs
    assert not torch.equal(nearest, vc[blk, :, off])
