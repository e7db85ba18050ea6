"""Exact rows: prefill rows whose context holds no compacted span, through a flash kernel.

Row b has ``n`` queries at positions ``L - n .. L - 1`` (``L = seq_lens[b]``). When none of its spans is
compacted yet (a prompt's first chunk, a later chunk before its image completes, a text prompt after a
prefix-cache hit), every key of [0, L) is exact and its attention is plain causal attention, aligned to
the bottom right::

    out_i = softmax_{j <= L - n + i} (scale * q_i . k_j) v_j,     i in [0, n), j in [0, L)

Nothing is merged with it (no span partial), so it needs no log-sum-exp and any fast causal kernel serves
it: :func:`sdpa_row_attention`, PyTorch's ``scaled_dot_product_attention`` (on CUDA its flash kernel, grouped
heads read without being repeated; bottom-right causal by ``causal_lower_right`` when ``n < L``).

:func:`exact_rows_attention` gathers each row's K/V [0, L) from the paged cache (an FP8 cache dequantized, as
every other path reads it), runs the kernel row by row, writes the outputs in the output's dtype and, when
asked, the lse of each row's last query (the next decode step's importance normaliser), computed directly:
lse = logsumexp_t(scale * q_last . k_t) (:func:`last_query_lse`). Its other queries' lse is NaN.

The backend (:mod:`ap_vllm.backend.attentionpack`) routes a prompt's first chunk here (n = L: plain causal
SDPA, the path measured on an H200); rows with history keep the exact Triton kernel until SDPA's bottom-right
path (``causal_lower_right`` with grouped heads) is measured on a GPU (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .paged import KVScales
from .paged_decode import gather_exact
from .paged_layout import block_contiguous, gather_span_kv

# (q [n, Hq, d], k, v [L, Hkv, d] with n <= L, scale) -> out [n, Hq, d]: causal, aligned to the bottom right
RowAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:data:`RowAttention` by ``torch.nn.functional.scaled_dot_product_attention`` (``enable_gqa``). On an
    H200 at 28 q / 4 kv heads, d = 128, bf16, one causal 4K / 16K-token row: 265 / 2978 µs, against 449 /
    6172 µs for the exact Triton kernel. Its flash kernel takes half precision; the backend calls this
    for float16 / bfloat16 queries on CUDA (float32 with grouped heads would fall back to the math kernel,
    whose n x L scores do not fit long rows)."""
    n, L = q.shape[0], k.shape[0]
    if n > L:
        raise ValueError(f"a row has more queries ({n}) than keys ({L})")
    mask = None
    if n < L:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, L)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, is_causal=mask is None, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def last_query_lse(q_last: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """lse [Hq] of one query q_last [Hq, d] over every key k [L, Hkv, d] (grouped heads: q head h reads kv head
    h // (Hq / Hkv)), in float32."""
    hq, hkv = q_last.shape[0], k.shape[1]
    s = torch.einsum("jgd,tjd->jgt", q_last.float().reshape(hkv, hq // hkv, -1), k.float()) * scale
    return torch.logsumexp(s.reshape(hq, -1), dim=-1)


def gather_row_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, b: int, L: int,
                  kv_scales: KVScales) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [L, Hkv, d] of row b's positions [0, L) from ``kv_cache`` [blocks, 2, block_size, Hkv, d] (vLLM's
    block-dense pages: one gather of whole blocks, K and V together; other views token by token; an FP8 cache
    dequantized with ``kv_scales``)."""
    if block_contiguous(kv_cache):
        return gather_span_kv(kv_cache, block_table[b], 0, L, kv_scales)
    return gather_exact(kv_cache, block_table, b, torch.arange(L, device=kv_cache.device), kv_scales)


def exact_rows_attention(attend: RowAttention, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         query_start_loc: Sequence[int], seq_lens: Sequence[int], rows: Sequence[int], scale: float,
                         kv_scales: KVScales, out: torch.Tensor, lse: Optional[torch.Tensor] = None) -> None:
    """Rows ``rows`` of a varlen batch, none with a compacted span: q [Nq, Hq, d] (every row's queries;
    ``query_start_loc`` / ``seq_lens`` host ints), K/V from ``kv_cache`` [blocks, 2, block_size, Hkv, d] by
    ``block_table``. Writes the rows' outputs into ``out`` [Nq, Hq, d] (any float dtype) and, with ``lse``
    [Nq, Hq], each row's last-query lse (NaN at its other queries). One ``attend`` call per row."""
    for b in rows:
        a, e, L = query_start_loc[b], query_start_loc[b + 1], seq_lens[b]
        if e == a:
            continue
        k, v = (x.to(q.dtype) for x in gather_row_kv(kv_cache, block_table, b, L, kv_scales))
        out[a:e] = attend(q[a:e], k, v, scale)
        if lse is not None:
            lse[a: e - 1] = float("nan")
            lse[e - 1] = last_query_lse(q[e - 1], k, scale)


__all__ = ["RowAttention", "exact_rows_attention", "gather_row_kv", "last_query_lse", "sdpa_row_attention"]
