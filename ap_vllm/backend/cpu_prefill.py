"""vLLM's own CPU attention kernel for the first chunk of a prompt (CPU only).

A prompt's first chunk attends only to itself (causal, no prefix, no compacted span), so it needs no
log-sum-exp to merge with anything. There the CPU path (:func:`ap_vllm.core.prefill_torch.paged_prefill_torch`)
can run the kernel CPU_ATTN runs, which on a 4096-token image is about 1.5x faster than PyTorch's fused
CPU attention: the chunk's K/V are copied into a scratch cache in that kernel's layout
([blocks, Hkv, 2 * 32, d], block size 32) with ``cpu_attn_reshape_and_cache``, then one
``cpu_attention_with_kv_cache`` call serves every such row of the step (varlen, causal).

The outputs are CPU_ATTN's arithmetic on the same values, so exact mode stays token for token equal to
CPU_ATTN. Off where vLLM has no CPU build (``torch.ops._C.cpu_attention_with_kv_cache`` missing): the
torch path is used, as it is for soft-capped and windowed layers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ap_vllm.compat import cpu_attention_isa

BLOCK = 32  # the scratch cache's block size (CPU_ATTN's "vec" kernels need a multiple of 32)


class CpuFreshAttention:
    """``(q [N, Hq, d], k, v [N, Hkv, d], cu_seqlens, scale) -> out [N, Hq, d]``: causal varlen attention."""

    def __init__(self, isa: str) -> None:
        self.isa = isa

    @staticmethod
    def create(dtype: torch.dtype, head_size: int) -> Optional["CpuFreshAttention"]:
        """The kernel for this model's dtype and head size; None where vLLM's CPU build does not offer it."""
        try:
            from vllm import _custom_ops  # noqa: F401  (loads vLLM's compiled ops)
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            torch.ops._C.cpu_attention_with_kv_cache  # noqa: B018  (raises where the CPU build is absent)
        except (ImportError, AttributeError, RuntimeError):
            return None
        if dtype not in CPUAttentionBackend.supported_dtypes or head_size not in \
                CPUAttentionBackend.get_supported_head_sizes():
            return None
        try:
            isa = cpu_attention_isa(dtype, BLOCK, head_size)
        except NotImplementedError:
            return None
        return None if isa is None else CpuFreshAttention(isa)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Sequence[int],
                 scale: float) -> torch.Tensor:
        from vllm import _custom_ops as ops

        n, hq, d = q.shape
        hkv = k.shape[1]
        lens = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        blocks = [-(-L // BLOCK) for L in lens]
        first = [0]
        for nb in blocks[:-1]:
            first.append(first[-1] + nb)
        cache = torch.zeros(sum(blocks), hkv, 2 * BLOCK, d, dtype=q.dtype)  # (the kernel reads whole blocks)
        key_cache, value_cache = cache.chunk(2, dim=2)
        slots = torch.cat([f * BLOCK + torch.arange(L) for f, L in zip(first, lens)])
        ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), key_cache, value_cache, slots, self.isa)
        table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
        for i, (f, nb) in enumerate(zip(first, blocks)):
            table[i, :nb] = torch.arange(f, f + nb, dtype=torch.int32)
        qsl = torch.tensor(list(cu_seqlens), dtype=torch.int32)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(lens), num_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=seq_lens, dtype=q.dtype,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=False)
        out = torch.empty(n, hq, d, dtype=q.dtype)
        ops.cpu_attention_with_kv_cache(
            query=q.contiguous(), key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
            softcap=0.0, scheduler_metadata=meta, s_aux=None)
        return out


__all__ = ["CpuFreshAttention"]
