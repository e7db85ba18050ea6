"""Rows of longer queries (prefill, chunked prefill) on the CPU: fused exact attention + compacted spans.

Row b has ``n`` queries at positions ``L - n .. L - 1`` (``L = seq_lens[b]``). Its keys are the exact
tokens of [0, L) outside the spans compacted in earlier steps (all of which end at or before ``L - n``)
plus those spans, read at full rank in coefficient space. With ``f = L - n``::

    prefix part   P = exact positions < f      every query sees every key           (not causal)
    chunk part    C = [f, L)                    query i sees keys f .. f + i         (causal, square)
    span parts    each compacted span           every query sees every token         (coefficient space)

The two exact parts run as fused attention with its log-sum-exp (PyTorch's CPU flash attention,
``O(n + L)`` memory instead of the ``n x L`` score matrix), the spans as
:func:`ap_vllm.core.lowrank_attention.attend_compacted`, and all parts are merged by log-sum-exp
(:func:`ap_vllm.core.dense.merge_partials`). Soft-capped or windowed rows take the dense path
(:func:`ap_vllm.core.dense.dense_attention`, the same semantics). The oracle is
:func:`ap_vllm.core.paged_decode.paged_prefill_reference`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .dense import dense_attention, merge_partials
from .lowrank_attention import attend_compacted
from .paged import KVScales
from .paged_decode import gather_exact
from .paged_layout import PagedSpan, paged_span_block_ids, unpack_span
from .rope import RopeTable


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """q [n, Hq, d], k/v [m, Hkv, d] -> out [n, Hq, d] float32, lse [Hq, n] (fused, with its lse)."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    dt = q.dtype if q.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    qh = q.to(dt).transpose(0, 1)[None]
    kh = k.to(dt).repeat_interleave(g, dim=1).transpose(0, 1)[None]
    vh = v.to(dt).repeat_interleave(g, dim=1).transpose(0, 1)[None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)[:2]
    return out[0].transpose(0, 1).float(), lse[0].float()


def paged_prefill_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        query_start_loc: Sequence[int], seq_lens: Sequence[int], spans: Sequence[PagedSpan],
                        scale: float, softcap: Optional[float] = None, window: Optional[int] = None,
                        rope: Optional[RopeTable] = None,
                        kv_scales: KVScales = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Nq, Hq, d] over ``kv_cache`` [blocks, 2, block_size, Hkv, d] (any block-dense view) for the rows of
    ``query_start_loc`` / ``seq_lens`` (host ints); ``spans``: compacted spans (``seq`` = row, full rank).
    ``kv_scales``: (k_scale, v_scale) of an FP8 cache (its tokens are dequantized as they are gathered).
    Returns out [Nq, Hq, d] float32 and lse [Nq, Hq]."""
    nq, hq, d = q.shape
    out = torch.zeros(nq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((nq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    per_row: dict[int, list[PagedSpan]] = {}
    for sp in spans:
        per_row.setdefault(sp.seq, []).append(sp)
    fused_ok = not softcap and window is None and q.device.type == "cpu"
    for b in range(len(seq_lens)):
        qs, qe, L = query_start_loc[b], query_start_loc[b + 1], seq_lens[b]
        n = qe - qs
        if n == 0:
            continue
        first = L - n
        mine = sorted(per_row.get(b, ()), key=lambda sp: sp.start)
        if mine and window is not None:
            raise ValueError("sliding-window attention over a compacted span is not supported: "
                             "compaction is only applied to global-attention layers")
        if any(sp.end > first for sp in mine):
            raise ValueError(f"row {b}: a compacted span reaches past its first query (position {first})")
        qb = q[qs:qe]
        q_pos = torch.arange(first, L, device=q.device)
        keep = torch.ones(L, dtype=torch.bool, device=q.device)
        for sp in mine:
            keep[sp.start: sp.end] = False
        pos = torch.arange(L, device=q.device)[keep]
        parts_o, parts_l = [], []
        if fused_ok:
            prefix = pos[pos < first]
            if prefix.numel():
                k, v = gather_exact(kv_cache, block_table, b, prefix, kv_scales)
                o, l = _fused(qb, k, v, scale, causal=False)
                parts_o.append(o)
                parts_l.append(l)
            k, v = gather_exact(kv_cache, block_table, b, q_pos, kv_scales)
            o, l = _fused(qb, k, v, scale, causal=True)
            parts_o.append(o)
            parts_l.append(l)
        else:
            k, v = gather_exact(kv_cache, block_table, b, pos, kv_scales)
            o, l = dense_attention(qb, k, v, scale, q_pos, pos, window=window, softcap=softcap)
            parts_o.append(o)
            parts_l.append(l)
        for sp in mine:
            cs = unpack_span(kv_cache, paged_span_block_ids(block_table, sp), sp.layout, start=sp.start, rope=rope)
            o, l = attend_compacted(qb, cs, scale, q_pos, softcap)
            parts_o.append(o)
            parts_l.append(l)
        o, l = merge_partials(parts_o, parts_l) if len(parts_o) > 1 else (parts_o[0], parts_l[0])
        out[qs:qe] = o
        lse[qs:qe] = l.T
    return out, lse


__all__ = ["paged_prefill_torch"]
