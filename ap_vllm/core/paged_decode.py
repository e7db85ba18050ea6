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

Score selection (``score_threshold`` = tau, :mod:`ap_vllm.core.lowrank_attention`): the values of a
two-level span (``PagedSpan.threshold`` not None) are read at full rank for the tokens with
max_h exp(s[h, t] - lse_ref[b, h]) >= tau; a row without a normaliser (None, or not finite) reads
every token at full rank. No importance is read or updated (``importance_ema`` must be None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from .dense import dense_attention, merge_partials
from .lowrank_attention import attend_compacted, update_importance
from .paged import KVScales, kv_dequantize
from .paged_layout import (PagedSpan, coeff_rows_per_block, pack_span, paged_span_block_ids, span_metadata,
                           unpack_span)
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
    full_rank: bool = False  # every span reads every token at full rank (no threshold): no selection to make
    # the decode instances, int32 [S, 3] = (span id, its row, 1), made with the plan on the host (the kernels
    # would otherwise build them from ``meta``, four small launches per layer and step); None: built per call
    inst: Optional[torch.Tensor] = None
    # rows per block of the coefficient sections of every span the plan holds (a static plan: of every layout its
    # layer's configuration makes); the kernels read a token tile from one block when each is a multiple of the
    # tile. Empty: not known (tiles may straddle two blocks).
    rows_per_block: tuple = ()


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
    inst = torch.tensor([(i, sp.seq, 1) for i, sp in enumerate(spans)], dtype=torch.int32).reshape(len(spans), 3)
    return DecodePlan(
        spans=spans, meta=meta, thresholds=thr,
        seq_spans=seq_spans.to(device, non_blocking=True) if device is not None else seq_spans,
        max_span_tokens=max([1] + [sp.layout.num_tokens for sp in spans]),
        key_rank_max=max([1] + [sp.layout.key_rank for sp in spans]),
        value_rank_max=max([1] + [sp.layout.value_rank for sp in spans]),
        fp8=bool(fp8s and fp8s.pop()),
        max_span_end=max([0] + [sp.end for sp in spans]),
        full_rank=bool(spans) and all(sp.threshold is None for sp in spans),
        inst=inst.to(device, non_blocking=True) if device is not None else inst,
        rows_per_block=coeff_rows_per_block([sp.layout for sp in spans]),
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


def _check_score(score_threshold: Optional[float], importance_ema: Optional[float], spans=()) -> None:
    if score_threshold is None:
        return
    if importance_ema is not None:
        raise ValueError("score selection keeps no importance: pass importance_ema=None")
    if not (0.0 < score_threshold <= 1.0):
        raise ValueError(f"score_threshold {score_threshold} is outside (0, 1]")
    if any(sp.two_level_keys for sp in spans):
        raise ValueError("score selection reads keys at full rank: spans must not use two_level_keys")


def _score_lse_ref(lse_ref: LseRef, batch_size: int, num_heads: int, device) -> torch.Tensor:
    """lse_ref as one tensor [B, Hq] for score selection: rows without a normaliser +inf (full rank)."""
    _check_lse_ref(lse_ref, batch_size)
    if isinstance(lse_ref, torch.Tensor):
        return lse_ref
    rows = [None] * batch_size if lse_ref is None else list(lse_ref)
    inf = torch.full((num_heads,), float("inf"), device=device)
    return torch.stack([inf if r is None else r.float().to(device) for r in rows]).reshape(batch_size, num_heads)


def _check_rope_reach(rope: RopeTable, end: int) -> None:
    """The kernels gather cos/sin rows unchecked: every pre-RoPE span must end inside the table."""
    if end > rope.max_positions:
        raise ValueError(f"a pre-RoPE span reaches position {end - 1}, beyond the rotary table "
                         f"({rope.max_positions} positions)")


def gather_exact(kv_cache: torch.Tensor, block_table: torch.Tensor, b: int, pos: torch.Tensor,
                 kv_scales: KVScales = None):
    """K, V [n, Hkv, d] of sequence b at positions ``pos`` from the paged cache (an FP8 cache's dequantized
    with ``kv_scales``, float32)."""
    page = kv_cache.shape[2]
    blk = block_table[b, pos // page].long()
    off = pos % page
    ks, vs = kv_scales or (1.0, 1.0)
    return kv_dequantize(kv_cache[blk, 0, off], ks), kv_dequantize(kv_cache[blk, 1, off], vs)


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
    kv_scales: KVScales = None,
    score_threshold: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch oracle of :func:`paged_mixed_decode`: q [B, Hq, d] -> out [B, Hq, d] fp32, lse [B, Hq].

    Updates the spans' importance in the cache when ``importance_ema`` is not None. ``rope``: the
    layer's rotary table when its spans hold pre-RoPE keys. ``score_threshold``: score selection
    (module docstring).
    """
    bsz, hq, d = q.shape
    _check_lse_ref(lse_ref, bsz)
    _check_score(score_threshold, importance_ema, spans)
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
            k, v = gather_exact(kv_cache, block_table, b, pos, kv_scales)
            o, l = dense_attention(qb, k, v, scale, qpos, pos, window=window, softcap=softcap)
            parts_o.append(o)
            parts_l.append(l)
        for sp in mine:
            ids = paged_span_block_ids(block_table, sp)
            cs = unpack_span(kv_cache, ids, sp.layout, start=sp.start, rope=rope)
            score = score_threshold is not None and sp.threshold is not None
            o, l, s = attend_compacted(qb, cs, scale, qpos, softcap, threshold=sp.threshold,
                                       low_rank_divisor=sp.low_rank_divisor, two_level_keys=sp.two_level_keys,
                                       return_scores=True, score_threshold=score_threshold if score else None,
                                       lse_ref=_lse_ref_row(lse_ref, b) if score else None)
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
    num_spans: Optional[torch.Tensor] = None,
    kv_scales: KVScales = None,
    score_threshold: Optional[float] = None,
    **kernel_opts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [B, Hq, d] over exact pages + compacted spans of one layer.

    kv_cache [num_blocks, 2, block_size, Hkv, d], contiguous or any view whose blocks are dense byte
    ranges (:func:`ap_vllm.core.paged_layout.block_contiguous`); block_table [B, max_blocks] int32; seq_lens [B]
    (keys at positions < seq_lens[b]); ``plan`` from :func:`build_decode_plan`. Returns
    out [B, Hq, d] (float32, or written into ``out``) and lse [B, Hq] float32.
    ``kernel="auto"``: Triton on CUDA, torch elsewhere. ``rope``: the layer's rotary table when its
    spans hold pre-RoPE keys (key_space="pre_rope"). ``kv_scales``: (k_scale, v_scale) of an FP8 cache
    (float8 e4m3 pages, :mod:`ap_vllm.core.paged`); the bases then have ``q``'s dtype (the model's).

    ``num_spans`` (int32 device tensor [1]): the static launch for CUDA graphs
    (:func:`ap_vllm.kernels.lowrank_decode.paged_mixed_decode_triton`): ``plan.meta`` / ``plan.thresholds``
    hold S_cap >= num_spans[0] rows, ``plan.seq_spans`` only ids below num_spans[0], ``plan.max_span_tokens``,
    ``plan.key_rank_max`` / ``plan.value_rank_max`` and ``max_seq_len`` (required) are caps; rows of
    seq_len 0 are padding (out 0, lse -inf). The torch path reads ``plan.spans`` and ignores it.

    ``score_threshold``: score selection (module docstring) instead of the thresholds; ``lse_ref`` rows
    that are None read every token at full rank (no first pass); ``importance_ema`` must be None.
    ``plan.full_rank`` (every span without a threshold: value_selection 'full', or no two-level read): the
    kernels select nothing (no importance read to decide, no score selection: it would pick full rank anyway).
    """
    if kernel == "auto":
        kernel = "triton" if q.is_cuda else "torch"
    static = num_spans is not None
    has_spans = bool(plan.spans) or (static and plan.meta.shape[0] > 0)
    _check_score(score_threshold, importance_ema, plan.spans)
    if has_spans and window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    if kernel == "torch":
        o, l = paged_decode_reference(q, kv_cache, block_table, seq_lens, plan.spans, scale, softcap, window,
                                      lse_ref, importance_ema, rope, kv_scales=kv_scales,
                                      score_threshold=score_threshold)
        if out is not None:
            out.copy_(o)
            o = out
        return o, l
    if kernel != "triton":
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
    if rope is not None and has_spans and plan.max_span_end:  # host-side: the kernel gathers cos/sin rows unchecked
        _check_rope_reach(rope, plan.max_span_end)
    from ap_vllm.kernels.lowrank_decode import paged_mixed_decode_triton, scratch

    if max_seq_len is None:
        if static:
            raise ValueError("the static launch needs max_seq_len (a fixed cap, e.g. the model's maximum length)")
        max_seq_len = int(seq_lens.max())
    lse_out = kernel_opts.pop("lse_out", None)
    full = plan.full_rank and has_spans
    common = dict(max_seq_len=max_seq_len, max_span_tokens=plan.max_span_tokens, key_rank_max=plan.key_rank_max,
                  value_rank_max=plan.value_rank_max, fp8=plan.fp8, softcap=softcap, window=window, rope=rope,
                  num_spans=num_spans, kv_scales=kv_scales, full_rank=full, rows_per_block=plan.rows_per_block,
                  **kernel_opts)
    if plan.inst is not None and plan.inst.shape[0] == plan.meta.shape[0]:
        common.setdefault("inst", plan.inst)
    args = (q, kv_cache, block_table, seq_lens, plan.meta, plan.thresholds, plan.seq_spans, scale)
    if importance_ema is not None and has_spans:  # rows without a normaliser: this step's, a first pass
        ws = kernel_opts.get("workspace") if static else None
        bsz, hq, d = q.shape

        def first_pass():
            return paged_mixed_decode_triton(
                *args, out=scratch(ws, "first_out", (bsz, hq, d), torch.float32, q.device) if ws is not None else None,
                lse_out=scratch(ws, "first_lse", (bsz, hq), torch.float32, q.device) if ws is not None else None,
                **common)[1]

        lse_ref = _complete_lse_ref(lse_ref, bsz, first_pass)
    score = score_threshold is not None and has_spans and not full
    if score:  # rows without a normaliser: +inf (every token at full rank)
        lse_ref = _score_lse_ref(lse_ref, q.shape[0], q.shape[1], q.device)
    return paged_mixed_decode_triton(*args, lse_ref=lse_ref, importance_ema=importance_ema if has_spans else None,
                                     out=out, lse_out=lse_out, score_threshold=score_threshold if score else None,
                                     **common)


# --------------------------------------------------------------------------------------
# rows of longer queries (prefill, chunked prefill, speculative rows)
# --------------------------------------------------------------------------------------
@dataclass
class PrefillPlan:
    """Host-built description of a step's longer-query rows over compacted spans (once per step).

    Query rows are the packed tokens of all sequences (``query_start_loc``). Every span of sequence b
    lies before b's first query of the step (compacted in an earlier step) and is read at full rank by
    *instances* of at most ``qpt`` consecutive query rows: ``inst`` int32 [I, 3] = (span id, first row,
    rows); ``row_inst`` int32 [Nq, MAX] lists the instances each row merges (-1 padded).
    """

    spans: list  # list[PagedSpan], threshold None (prefill reads spans at full rank)
    meta: torch.Tensor  # int64 [S, len(META_FIELDS)]
    thresholds: torch.Tensor  # float32 [S], all -inf
    seq_spans: torch.Tensor  # int32 [B, max spans per seq]
    inst: torch.Tensor  # int32 [I, 3]
    row_inst: torch.Tensor  # int32 [Nq, max spans per seq]
    qpt: int
    max_span_tokens: int
    key_rank_max: int
    value_rank_max: int
    fp8: bool
    rows_per_block: tuple = ()  # (as DecodePlan.rows_per_block)

    @property
    def num_inst(self) -> int:
        return self.inst.shape[0]


def prefill_rows_per_instance(num_q_heads: int, rows: int = 64) -> int:
    """Query rows read together by one span instance: ``rows`` (query x head) rows per program."""
    hq_pad = 1 << max(0, (num_q_heads - 1).bit_length())
    return max(1, rows // hq_pad)


def build_prefill_plan(spans: Sequence[PagedSpan], query_start_loc: Sequence[int], num_q_heads: int,
                       device=None, qpt: Optional[int] = None) -> PrefillPlan:
    """Metadata of :func:`paged_prefill` from host values only (``query_start_loc`` as a list of ints)."""
    spans = list(spans)
    bsz = len(query_start_loc) - 1
    base = build_decode_plan(spans, bsz, device=None)  # meta and per-sequence span ids (host)
    for sp in spans:
        if sp.threshold is not None:
            raise ValueError("prefill rows read spans at full rank: PagedSpan.threshold must be None")
    qpt = qpt or prefill_rows_per_instance(num_q_heads)
    if qpt & (qpt - 1):
        raise ValueError(f"rows per span instance must be a power of two, got {qpt}")
    nq = query_start_loc[-1]
    width = base.seq_spans.shape[1]
    inst, row_inst = [], torch.full((nq, width), -1, dtype=torch.int32)
    for b in range(bsz):
        qs, qe = query_start_loc[b], query_start_loc[b + 1]
        for slot, sid in enumerate(int(x) for x in base.seq_spans[b] if x >= 0):
            for r0 in range(qs, qe, qpt):
                row_inst[r0: min(qe, r0 + qpt), slot] = len(inst)
                inst.append((sid, r0, min(qpt, qe - r0)))
    inst_t = torch.tensor(inst, dtype=torch.int32).reshape(len(inst), 3)

    def dev(x):
        return x.to(device, non_blocking=True) if device is not None else x

    return PrefillPlan(spans=spans, meta=dev(base.meta), thresholds=dev(torch.full((len(spans),), float("-inf"))),
                       seq_spans=dev(base.seq_spans), inst=dev(inst_t), row_inst=dev(row_inst), qpt=qpt,
                       max_span_tokens=base.max_span_tokens, key_rank_max=base.key_rank_max,
                       value_rank_max=base.value_rank_max, fp8=base.fp8, rows_per_block=base.rows_per_block)


def paged_prefill_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    spans: Sequence[PagedSpan],
    scale: float,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    rope: Optional[RopeTable] = None,
    kv_scales: KVScales = None,
    reach: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch oracle of :func:`paged_prefill`: q [Nq, Hq, d] -> out [Nq, Hq, d] fp32, lse [Nq, Hq].

    Query i of sequence b is at position ``seq_lens[b] - qlen_b + i``; keys outside b's spans are
    read exact (causal, window), every span of b in coefficient space at full rank. ``reach`` [Nq]: the last
    key position of each query (None: its own; :func:`ap_vllm.core.dense.mm_prefix_reach`)."""
    nq, hq, d = q.shape
    outs = torch.zeros(nq, hq, d)
    lses = torch.full((nq, hq), float("-inf"))
    for b in range(len(seq_lens)):
        qs, qe, L = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if qe == qs:
            continue
        q_pos = torch.arange(L - (qe - qs), L, device=q.device)
        mine = [sp for sp in spans if sp.seq == b]
        if mine and window is not None:
            raise ValueError("sliding-window attention over a compacted span is not supported: "
                             "compaction is only applied to global-attention layers")
        for sp in mine:
            if sp.end > int(q_pos[0]):
                raise ValueError(f"span [{sp.start}, {sp.end}) of sequence {b} is not before its first query "
                                 f"(position {int(q_pos[0])})")
        pos = torch.arange(L, device=q.device)
        keep = torch.ones(L, dtype=torch.bool, device=q.device)
        for sp in mine:
            keep &= (pos < sp.start) | (pos >= sp.end)
        pos = pos[keep]
        parts_o, parts_l = [], []
        if pos.numel():
            k, v = gather_exact(kv_cache, block_table, b, pos, kv_scales)
            o, l = dense_attention(q[qs:qe], k, v, scale, q_pos, pos, window=window, softcap=softcap,
                                   reach=None if reach is None else reach[qs:qe].to(q_pos))
            parts_o.append(o)
            parts_l.append(l)
        for sp in mine:
            cs = unpack_span(kv_cache, paged_span_block_ids(block_table, sp), sp.layout, start=sp.start, rope=rope)
            o, l = attend_compacted(q[qs:qe], cs, scale, q_pos, softcap)
            parts_o.append(o)
            parts_l.append(l)
        if parts_o:
            o, l = merge_partials(parts_o, parts_l)
            outs[qs:qe] = o.cpu()
            lses[qs:qe] = l.T.cpu()
    return outs.to(q.device), lses.to(q.device)


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: Optional[PrefillPlan],
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    kernel: Literal["auto", "torch", "triton"] = "auto",
    out: Optional[torch.Tensor] = None,
    rope: Optional[RopeTable] = None,
    kv_scales: KVScales = None,
    reach: Optional[torch.Tensor] = None,
    **kernel_opts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row of a varlen batch (any query lengths) over exact pages + compacted spans.

    q [Nq, Hq, d]; ``query_start_loc`` [B+1] and ``seq_lens`` [B] int32 (device tensors for the kernels;
    the torch path reads them on the host); ``plan`` from :func:`build_prefill_plan` (None: no spans).
    Memory is O(tokens): exact keys in tiles (:mod:`ap_vllm.kernels.exact_attention`), spans in
    coefficient space by instances of ``plan.qpt`` rows. ``reach`` [Nq] int32: the last key position of each
    query (None: causal; multimodal items attended both ways: :func:`ap_vllm.core.dense.mm_prefix_reach`).
    Returns out [Nq, Hq, d] (float32, or written into ``out``) and lse [Nq, Hq] float32.
    """
    if kernel == "auto":
        kernel = "triton" if q.is_cuda else "torch"
    spans = plan.spans if plan is not None else []
    if spans and window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    if kernel == "torch":
        o, l = paged_prefill_reference(q, kv_cache, block_table, query_start_loc.tolist(), seq_lens.tolist(),
                                       spans, scale, softcap, window, rope, kv_scales, reach)
        if out is not None:
            out.copy_(o)
            o = out
        return o, l
    if kernel != "triton":
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
    if rope is not None and spans:
        _check_rope_reach(rope, max(sp.end for sp in spans))
    from ap_vllm.kernels.lowrank_decode import paged_prefill_triton

    return paged_prefill_triton(q, kv_cache, block_table, query_start_loc, seq_lens, plan, scale,
                                max_query_len=max_query_len, max_seq_len=max_seq_len, softcap=softcap,
                                window=window, out=out, rope=rope, kv_scales=kv_scales, reach=reach,
                                **kernel_opts)


__all__ = ["LseRef", "DecodePlan", "build_decode_plan", "paged_mixed_decode", "paged_decode_reference", "gather_exact",
           "PrefillPlan", "build_prefill_plan", "paged_prefill", "paged_prefill_reference", "prefill_rows_per_instance"]
