"""First chunks of prompts through vLLM's own CPU attention kernel (``ap_vllm.backend.cpu_prefill``) inside
the CPU prefill path, against the torch reference: outputs within 1e-5 (float32) / 2e-2 (bf16), the lse of
each fresh row's last query within 1e-5, NaN at its other queries; rows with history or spans unchanged."""

import pytest
import torch

from ap_vllm.backend.cpu_prefill import CpuFreshAttention
from ap_vllm.core.paged_decode import paged_prefill_reference
from ap_vllm.core.prefill_torch import paged_prefill_torch
from ap_vllm.core.synthetic import make_paged_batch


@pytest.mark.parametrize("dtype,hq,hkv,d,tol", [(torch.float32, 8, 2, 64, 1e-5), (torch.float32, 4, 4, 128, 1e-5),
                                               (torch.bfloat16, 4, 1, 64, 2e-2)])
def test_fresh_rows_match_the_reference(dtype, hq, hkv, d, tol):
    fresh = CpuFreshAttention.create(dtype, d)
    assert fresh is not None  # this vLLM is a CPU build
    lens = [300, 150, 460, 77]
    specs = [[], [(16, 100)], [], []]  # row 1 has a compacted span (and history): not fresh
    pb = make_paged_batch(lens, specs, num_q_heads=hq, num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=16,
                          dtype=dtype, seed=5)
    qlens = [300, 20, 460, 30]  # rows 0 and 2: whole prompts; row 3: a second chunk (47 tokens of history)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    o_ref, l_ref = paged_prefill_reference(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, 0.125)
    calls = []

    def counted(*args):
        calls.append([int(x) for x in args[3]])
        return fresh(*args)

    o, l = paged_prefill_torch(q, pb.kv_cache, pb.block_table, qsl, lens, pb.spans, 0.125, fresh_attention=counted)
    assert calls == [[0, 300, 760]]  # one call for both fresh rows
    torch.testing.assert_close(o, o_ref.float(), atol=tol, rtol=tol)
    last = torch.tensor([qsl[b + 1] - 1 for b in range(4)])
    torch.testing.assert_close(l[last], l_ref.float()[last], atol=1e-5 if dtype == torch.float32 else 2e-2,
                               rtol=1e-5)
    fresh_other = torch.cat([torch.arange(0, 299), torch.arange(320, 779)])
    assert torch.isnan(l[fresh_other]).all()
    torch.testing.assert_close(l[300:320], l_ref.float()[300:320], atol=tol, rtol=tol)  # the span row: every query
    torch.testing.assert_close(l[780:], l_ref.float()[780:], atol=tol, rtol=tol)


def test_not_offered_where_the_kernel_cannot_run():
    assert CpuFreshAttention.create(torch.float32, 72) is None  # a head size CPU_ATTN does not list
