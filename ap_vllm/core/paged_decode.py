"""Decode step over vLLM's paged KV cache holding exact tokens and compacted spans.

One query per sequence (decode). For sequence b with ``seq_lens[b] = L`` the keys are the
positions [0, L): the exact ones (not inside any span of b) are read from the paged K/V, each
span of b in coefficient space (:mod:`ap_vllm.core.lowrank_attention`), and everything is
merged by log-sum-exp. Spans lie in the past (the query at position L - 1 sees all of them).

``paged_mixed_decode`` dispatches to the Triton kernels (:mod:`ap_vllm.kernels.lowrank_decode`)
or to :func:`paged_decode_reference` (torch, the oracle). Importance update
(``importance_ema`` = omega) happens in the same call; the normaliser of row b is ``lse_ref[b]``
[Hq] (the lse this function returned for that sequence at the previous decode step: one pass, the
normaliser lags one token) or, for a row without one (``lse_ref`` None, or a sequence of per-row
tensors holding None), this step's exact lse (the Triton path then runs a first pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from .dense import dense_attention, merge_partials
from .lowrank_attention import attend_compacted, update_importance
from .paged_layout import PagedSpan, pack_span, paged_span_block_ids, span_metadata, unpack_span
from .rope import RopeTable


@dataclass
class DecodePlan:
    """Device-side description of the batch's compacted spans (rebuild when spans or thresholds change)."""

    spans: list  # list[PagedSpan]
    meta: torch.Tensor  # int64 [S, len(META_FIELDS)]
    thresholds: torch.Tensor  # float32 [S]
    seq_spans: torch.Tensor  # int32 [B, max spans per seq], span ids, -1 = none
    max_span_tokens: int
    key_rank_max: int
    value_rank_max: int
    fp8: bool
    max_span_end: int = 0  # one past the last position any span covers


def build_decode_plan(spans: Sequence[PagedSpan], batch_size: int, device=None) -> DecodePlan:
    """Metadata tensors for the kernels from the list of spans of the batch."""
    spans = list(spans)
    fp8s = {sp.layout.fp8 for sp in spans}
    if len(fp8s) > 1:
        raise ValueError("all spans of one call must use the same coefficient dtype")
    per_seq: list[list[int]] = [[] for _ in range(batch_size)]
    for i, sp in enumerate(spans):
        if not (0 <= sp.seq < batch_size):
            raise ValueError(f"span {i} belongs to sequence {sp.seq}, outside the batch of {batch_size}")
        per_seq[sp.seq].append(i)
    width = max([1] + [len(x) for x in per_seq])
    seq_spans = torch.full((batch_size, width), -1, dtype=torch.int32)
    for b, ids in enumerate(per_seq):
        seq_spans[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    meta, thr = span_metadata(spans, device=device)
    return DecodePlan(
        spans=spans, meta=meta, thresholds=thr,
        seq_spans=seq_spans.to(device, non_blocking=True) if device is not None else seq_spans,
        max_span_tokens=max([1] + [sp.layout.num_tokens for sp in spans]),
        key_rank_max=max([1] + [sp.layout.key_rank for sp in spans]),
        value_rank_max=max([1] + [sp.layout.value_rank for sp in spans]),
        fp8=bool(fp8s and fp8s.pop()),
        max_span_end=max([0] + [sp.end for sp in spans]),
    )


LseRef = Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None]
"""Importance normaliser per row: a tensor [B, Hq], or per row a tensor [Hq] or None (this step's)."""


def _check_lse_ref(lse_ref: LseRef, batch_size: int) -> None:
    if lse_ref is not None and len(lse_ref) != batch_size:
        raise ValueError(f"lse_ref has {len(lse_ref)} rows for a batch of {batch_size}")


def _lse_ref_row(lse_ref: LseRef, b: int) -> Optional[torch.Tensor]:
    return None if lse_ref is None else lse_ref[b]


def _complete_lse_ref(lse_ref: LseRef, batch_size: int, exact_lse) -> torch.Tensor:
    """lse_ref as one tensor [B, Hq]: rows without a normaliser take ``exact_lse()`` (called once,
    only when some row lacks one)."""
    _check_lse_ref(lse_ref, batch_size)
    if isinstance(lse_ref, torch.Tensor):
        return lse_ref
    rows = [None] * batch_size if lse_ref is None else list(lse_ref)
    if any(r is None for r in rows):
        exact = exact_lse()
        rows = [exact[b] if r is None else r for b, r in enumerate(rows)]
    return torch.stack([r.float() for r in rows])


def gather_exact(kv_cache: torch.Tensor, block_table: torch.Tensor, b: int, pos: torch.Tensor):
    """K, V [n, Hkv, d] of sequence b at positions ``pos`` from the paged cache."""
    page = kv_cache.shape[2]
    blk = block_table[b, pos // page].long()
    off = pos % page
    return kv_cache[blk, 0, off], kv_cache[blk, 1, off]


def paged_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    spans: Sequence[PagedSpan],
    scale: float,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    lse_ref: LseRef = None,
    importance_ema: Optional[float] = None,
    rope: Optional[RopeTable] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch oracle of :func:`paged_mixed_decode`: q [B, Hq, d] -> out [B, Hq, d] fp32, lse [B, Hq].

    Updates the spans' importance in the cache when ``importance_ema`` is not None. ``rope``: the
    layer's rotary table when its spans hold pre-RoPE keys.
    """
    bsz, hq, d = q.shape
    _check_lse_ref(lse_ref, bsz)
    outs, lses = [], []
    for b in range(bsz):
        L = int(seq_lens[b])
        mine = [sp for sp in spans if sp.seq == b]
        if mine and window is not None:
            raise ValueError("sliding-window attention over a compacted span is not supported: "
                             "compaction is only applied to global-attention layers")
        pos = torch.arange(L, device=q.device)
        keep = torch.ones(L, dtype=torch.bool, device=q.device)
        for sp in mine:
            keep &= (pos < sp.start) | (pos >= sp.end)
        pos = pos[keep]
        qb = q[b: b + 1]
        qpos = torch.tensor([L - 1], device=q.device)
        parts_o, parts_l, scores, unpacked = [], [], [], []
        if pos.numel():
            k, v = gather_exact(kv_cache, block_table, b, pos)
            o, l = dense_attention(qb, k, v, scale, qpos, pos, window=window, softcap=softcap)
            parts_o.append(o)
            parts_l.append(l)
        for sp in mine:
            ids = paged_span_block_ids(block_table, sp)
            cs = unpack_span(kv_cache, ids, sp.layout, start=sp.start, rope=rope)
            o, l, s = attend_compacted(qb, cs, scale, qpos, softcap, threshold=sp.threshold,
                                       low_rank_divisor=sp.low_rank_divisor, two_level_keys=sp.two_level_keys,
                                       return_scores=True)
            parts_o.append(o)
            parts_l.append(l)
            scores.append(s)
            unpacked.append((sp, ids, cs))
        if parts_o:
            o, l = merge_partials(parts_o, parts_l)
        else:
            o, l = torch.zeros(1, hq, d), torch.full((hq, 1), float("-inf"))
        if importance_ema is not None:
            ref = _lse_ref_row(lse_ref, b)
            ref = l[:, 0] if ref is None else ref.float()
            for (sp, ids, cs), s in zip(unpacked, scores):
                cs.importance = update_importance(cs.importance, s, ref, importance_ema)
                pack_span(kv_cache, ids, cs, sp.layout, sections=["importance"])
        outs.append(o[0])
        lses.append(l[:, 0])
    return torch.stack(outs), torch.stack(lses)


def paged_mixed_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: DecodePlan,
    scale: float,
    *,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    lse_ref: LseRef = None,
    importance_ema: Optional[float] = None,
    max_seq_len: Optional[int] = None,
    kernel: Literal["auto", "torch", "triton"] = "auto",
    out: Optional[torch.Tensor] = None,
    rope: Optional[RopeTable] = None,
    **kernel_opts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [B, Hq, d] over exact pages + compacted spans of one layer.

    kv_cache [num_blocks, 2, block_size, Hkv, d], contiguous or any view whose blocks are dense byte
    ranges (:func:`ap_vllm.core.paged_layout.block_contiguous`); block_table [B, max_blocks] int32; seq_lens [B]
    (keys at positions < seq_lens[b]); ``plan`` from :func:`build_decode_plan`. Returns
    out [B, Hq, d] (float32, or written into ``out``) and lse [B, Hq] float32.
    ``kernel="auto"``: Triton on CUDA, torch elsewhere. ``rope``: the layer's rotary table when its
    spans hold pre-RoPE keys (key_space="pre_rope").
    """
    if kernel == "auto":
        kernel = "triton" if q.is_cuda else "torch"
    if plan.spans and window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    if kernel == "torch":
        o, l = paged_decode_reference(q, kv_cache, block_table, seq_lens, plan.spans, scale, softcap, window,
                                      lse_ref, importance_ema, rope)
        if out is not None:
            out.copy_(o)
            o = out
        return o, l
    if kernel != "triton":
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
    if rope is not None and plan.spans:  # host-side: the kernel gathers cos/sin rows unchecked
        end = plan.max_span_end
        if end > rope.max_positions:
            raise ValueError(f"a pre-RoPE span reaches position {end - 1}, beyond the rotary table "
                             f"({rope.max_positions} positions)")
    from ap_vllm.kernels.lowrank_decode import paged_mixed_decode_triton

    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    common = dict(max_seq_len=max_seq_len, max_span_tokens=plan.max_span_tokens, key_rank_max=plan.key_rank_max,
                  value_rank_max=plan.value_rank_max, fp8=plan.fp8, softcap=softcap, window=window, rope=rope,
                  **kernel_opts)
    args = (q, kv_cache, block_table, seq_lens, plan.meta, plan.thresholds, plan.seq_spans, scale)
    if importance_ema is not None and plan.spans:  # rows without a normaliser: this step's, a first pass
        lse_ref = _complete_lse_ref(lse_ref, q.shape[0], lambda: paged_mixed_decode_triton(*args, **common)[1])
    return paged_mixed_decode_triton(*args, lse_ref=lse_ref, importance_ema=importance_ema if plan.spans else None,
                                     out=out, **common)


__all__ = ["LseRef", "DecodePlan", "build_decode_plan", "paged_mixed_decode", "paged_decode_reference", "gather_exact"]
