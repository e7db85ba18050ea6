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
(:func:`ap_vllm.core.dense.dense_attention`, the same semantics), and so do rows whose chunk holds a
multimodal item attended both ways (``reach``: :func:`ap_vllm.core.dense.mm_prefix_reach`). The oracle is
:func:`ap_vllm.core.paged_decode.paged_prefill_reference`.

A caller may bring a faster causal attention for *fresh* rows (the whole sequence is this chunk: no
prefix, no span; on the CPU the backend passes vLLM's own CPU attention kernel,
:mod:`ap_vllm.backend.cpu_prefill`): ``fresh_attention(q, k, v, cu_seqlens, scale) -> out``, one call
for all such rows. It returns no log-sum-exp, which nothing merges there; the lse of a fresh row's
last query (the next decode step's importance normaliser) is computed directly,
lse = logsumexp_t(scale * q_last . k_t), and the lse of its other queries is left NaN.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .dense import dense_attention, merge_partials
from .exact_rows import gather_row_kv, last_query_lse
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


FreshAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[int], float], torch.Tensor]


def _fresh_rows(attend: FreshAttention, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                query_start_loc: Sequence[int], seq_lens: Sequence[int], rows: Sequence[int], scale: float,
                kv_scales: KVScales, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Rows whose whole sequence is this chunk: one causal call for all of them, lse at each last query."""
    ks, vs, qs, cu = [], [], [], [0]
    for b in rows:
        a, L = query_start_loc[b], seq_lens[b]
        k, v = gather_row_kv(kv_cache, block_table, b, L, kv_scales)
        ks.append(k)
        vs.append(v)
        qs.append(q[a: a + L])
        cu.append(cu[-1] + L)
    qf, kf, vf = torch.cat(qs), torch.cat(ks).to(q.dtype), torch.cat(vs).to(q.dtype)
    o = attend(qf, kf, vf, cu, scale)
    for i, b in enumerate(rows):
        a, L = query_start_loc[b], seq_lens[b]
        out[a: a + L] = o[cu[i]: cu[i + 1]].float()
        lse[a: a + L - 1] = float("nan")
        lse[a + L - 1] = last_query_lse(q[a + L - 1], kf[cu[i]: cu[i + 1]], scale)


def paged_prefill_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        query_start_loc: Sequence[int], seq_lens: Sequence[int], spans: Sequence[PagedSpan],
                        scale: float, softcap: Optional[float] = None, window: Optional[int] = None,
                        rope: Optional[RopeTable] = None, kv_scales: KVScales = None,
                        fresh_attention: Optional[FreshAttention] = None,
                        reach: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Nq, Hq, d] over ``kv_cache`` [blocks, 2, block_size, Hkv, d] (any block-dense view) for the rows of
    ``query_start_loc`` / ``seq_lens`` (host ints); ``spans``: compacted spans (``seq`` = row, full rank).
    ``kv_scales``: (k_scale, v_scale) of an FP8 cache (its tokens are dequantized as they are gathered).
    ``fresh_attention``: rows whose sequence is all this chunk run through it (module docstring; their lse
    is given at their last query only, NaN elsewhere). ``reach`` [Nq]: the last key position of each query
    (None: its own, causal).
    Returns out [Nq, Hq, d] float32 and lse [Nq, Hq]."""
    nq, hq, d = q.shape
    out = torch.zeros(nq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((nq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    per_row: dict[int, list[PagedSpan]] = {}
    for sp in spans:
        per_row.setdefault(sp.seq, []).append(sp)
    fused_ok = not softcap and window is None and q.device.type == "cpu"
    both_ways = set()  # rows whose chunk holds queries that see later keys (causal calls cannot serve them)
    if reach is not None:
        for b in range(len(seq_lens)):
            qs, qe = query_start_loc[b], query_start_loc[b + 1]
            if qe > qs and bool((reach[qs:qe].cpu() != torch.arange(seq_lens[b] - (qe - qs), seq_lens[b])).any()):
                both_ways.add(b)
    fresh = []
    if fresh_attention is not None and fused_ok:
        fresh = [b for b in range(len(seq_lens)) if b not in per_row and b not in both_ways
                 and query_start_loc[b + 1] - query_start_loc[b] == seq_lens[b] > 0]
        if fresh:
            _fresh_rows(fresh_attention, q, kv_cache, block_table, query_start_loc, seq_lens, fresh, scale,
                        kv_scales, out, lse)
    for b in range(len(seq_lens)):
        qs, qe, L = query_start_loc[b], query_start_loc[b + 1], seq_lens[b]
        n = qe - qs
        if n == 0 or b in fresh:
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
        if fused_ok and b not in both_ways:
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
            o, l = dense_attention(qb, k, v, scale, q_pos, pos, window=window, softcap=softcap,
                                   reach=None if b not in both_ways else reach[qs:qe].to(q_pos))
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


__all__ = ["FreshAttention", "paged_prefill_torch"]
