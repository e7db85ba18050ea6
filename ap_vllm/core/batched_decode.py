"""Batched torch decode over the paged cache: one path per layer for all decode rows of a step.

Same result as :func:`ap_vllm.core.paged_decode.paged_decode_reference` (the oracle), computed
with tensor ops over the whole batch instead of a Python loop over rows and spans.

Per step (host, :func:`build_batched_decode_plan`). Row b (query at position L_b - 1, keys
[0, L_b)) owns spans [a_k, e_k); its exact positions are

    X_b = { p in [lo_b, L_b) : p outside every span of b },   lo_b = max(0, L_b - window) or 0

listed in increasing order as a padded index [B, E_max] (E_max = max_b |X_b|) of cache token
rows (physical block, offset in block) plus a validity mask. Exact slot j of b is at

    p_b(j) = lo_b + j + sum_k len_k [j >= c_k],   c_k = a_k - lo_b - sum_{k' < k} len_k'

(the spans of b merged, clipped to [lo_b, L_b) and sorted). Spans are grouped by layout
(identical :class:`SpanLayout`: same T, R_k, R_v, dtype, fp8; and the same low ranks
max(1, R // divisor)): a group of S_g spans has, per section, the physical block ids [S_g, n]
and, per span, its batch row and its index in the spans' order.

Per layer (:func:`paged_decode_batched`), q [B, Hq, d], kv head j = h // g, g = Hq / Hkv:

* exact part, one gather of K, V [B, E_max, Hkv, d]::

      s[b, h, e]   = scale * <q[b, h], K[b, e, j]>     (soft-capped; -inf where e is padding
                                                          or outside the window)
      lse_x[b, h]  = logsumexp_e s[b, h, e]       o_x[b, h] = sum_e softmax_e(s)[e] V[b, e, j]

* span part, per layout group, the sections' bytes gathered by block ids and viewed as
  B_k [S, R_k, W], B_v [S, R_v, W], C_k [S, T, R_k], C_v [S, T, R_v] (times the per-token
  scales when fp8) and the importance I [S, T]. Two-level read with thresholds tau[s]
  (full[s, t] = I[s, t] >= tau[s]; all full when no thresholds)::

      C_v[s, t, r] = 0   for r >= max(1, R_v // div_s) and not full[s, t]
      C_k[s, t, r] = 0   likewise with R_k, for spans with two_level_keys

      post-RoPE:  s[s, h, t] = <C_k[s, t], B_k[s, :, j] (scale q[row_s, h])>
      pre-RoPE:   s[s, h, t] = <rot_{a_s + t}(C_k[s, t] B_k[s, :, j]), scale q[row_s, h]>
      (soft-capped; -inf for a token after the row's query)
      m[s, h]     = max_t s[s, h, t]       e[s, h, t] = exp(s[s, h, t] - m[s, h])
      z[s, h]     = sum_t e[s, h, t]       lse[s, h]  = m[s, h] + log z[s, h]
      o[s, h]     = ((sum_t e[s, h, t] C_v[s, t]) / z[s, h]) B_v[s, :, j]

  Score selection instead (``score_threshold`` = tau; keys at full rank, every span two-level): the
  scores s above come first, then, with ref = ``lse_ref`` (+inf where not finite or not given)::

      full[s, t]  = max_h exp(s[s, h, t] - ref[row_s, h]) >= tau      (every t if ref[row_s] is +inf)
      C_v[s, t, r] = 0   for r >= max(1, R_v // div_s) and not full[s, t]

  (no importance is read or updated).

* merge of all partials P (exact rows and spans) by row, scatter-style::

      M[b]   = max_{i: row_i = b} lse_i          w_i = exp(lse_i - M[row_i])
      lse[b] = M[b] + log sum_{i: row_i = b} w_i
      out[b] = sum_{i: row_i = b} exp(lse_i - lse[b]) o_i

  (a row without keys: out 0, lse -inf).

* importance (``importance_ema`` = omega), written back into the importance section bytes::

      I[s, t] <- (1 - omega) I[s, t] + omega * mean_h exp(s[s, h, t] - ref[row_s, h])
               = (1 - omega) I[s, t] + omega * sum_h e[s, h, t] exp(m[s, h] - ref[row_s, h]) / Hq

  with ref = ``lse_ref`` (a +inf entry zeroes the contribution) or this step's merged lse.

The per-layer call is tensor ops only (a loop over the few layout groups), with no host
synchronisation; big gathers are row gathers (``index_select``) of whole cache blocks or token
rows. Sliding-window attention over a compacted span is rejected (ValueError), as in the
reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from .lowrank_attention import low_rank
from .paged import KVScales, gather_rows, kv_dequantize, scatter_rows
from .paged_decode import _check_rope_reach
from .paged_layout import PagedSpan, SpanLayout, cache_bytes, section_rows
from .rope import RopeTable

_WINDOW_WITH_SPANS = ("sliding-window attention over a compacted span is not supported: "
                      "compaction is only applied to global-attention layers")


@dataclass
class SpanGroup:
    """The spans of one step sharing a :class:`SpanLayout` and low ranks (tensors on the cache's device)."""

    layout: SpanLayout
    key_rank_low: int  # key components every token reads (R_k unless two_level_keys)
    value_rank_low: int  # value components every token reads
    index: torch.Tensor  # int64 [S_g]: position of each span in the plan's spans order
    rows: torch.Tensor  # int64 [S_g]: batch row of each span
    section_blocks: dict  # section name -> int64 [S_g, n] physical block ids
    positions: torch.Tensor  # int64 [S_g, T]: absolute position of each token
    visible: Optional[torch.Tensor]  # bool [S_g, T]: tokens up to the row's query; None = all

    @property
    def num_spans(self) -> int:
        return self.index.shape[0]


@dataclass
class BatchedDecodePlan:
    """Everything :func:`paged_decode_batched` needs for one step, on the cache's device.

    Built once per step by :func:`build_batched_decode_plan`; reused by every layer whose spans
    have the same layouts (thresholds come per layer).
    """

    batch_size: int
    num_spans: int
    window: Optional[int]
    block_size: Optional[int]  # page size of the cache (from the spans' layouts or given)
    block_table: torch.Tensor  # [B, max_blocks] (the step's)
    query_pos: torch.Tensor  # int64 [B]: seq_lens - 1
    exact_pos: torch.Tensor  # int64 [B, E_max]: positions of the exact slots (0 where padding)
    exact_valid: torch.Tensor  # bool [B, E_max]
    exact_block: Optional[torch.Tensor]  # int64 [B, E_max]: physical block of each slot (0 where padding)
    exact_offset: Optional[torch.Tensor]  # int64 [B, E_max]: token row inside the block
    groups: list  # list[SpanGroup]
    merge_rows: torch.Tensor  # int64 [P]: batch row of each partial (exact rows first, then spans by group)
    max_span_end: int  # one past the last position any span covers
    intervals: list = field(default_factory=list)  # per row: (start, end) of its spans (host)

    @property
    def exact_width(self) -> int:
        return self.exact_pos.shape[1]


def _merged_intervals(intervals: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Union of [a, e) intervals clipped to [lo, hi), sorted, non-empty."""
    out: list[list[int]] = []
    for a, e in sorted((max(a, lo), min(e, hi)) for a, e in intervals):
        if e <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([a, e])
    return [(a, e) for a, e in out]


def _exact_slots(block_table: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical block and offset [B, E] of the exact slots (block 0, offset 0 where padding)."""
    logical = (pos // block_size).clamp_max(max(0, block_table.shape[1] - 1))
    blk = block_table.long().gather(1, logical) if pos.shape[1] else logical
    return torch.where(valid, blk, 0), pos % block_size


def build_batched_decode_plan(spans: Sequence[PagedSpan], block_table: torch.Tensor, seq_lens: Sequence[int],
                              *, window: Optional[int] = None, block_size: Optional[int] = None) -> BatchedDecodePlan:
    """Host work once per step.

    ``spans``: the batch's compacted spans (``PagedSpan.seq`` = batch row; ``threshold`` None: every
    component of the span is read, as in its kernel metadata row; otherwise its value is ignored, thresholds
    come per layer). ``block_table`` [B, max_blocks] int32 (device tensor,
    rows = decode rows); ``seq_lens``: host ints, one per row (the query of row b is at position
    seq_lens[b] - 1 and sees keys [0, seq_lens[b])). ``window``: exact slots restricted to the
    last ``window`` positions (no spans allowed then). ``block_size``: the cache's page size,
    taken from the spans' layouts when omitted (without spans it is then read from the cache at
    each call).
    """
    spans = list(spans)
    seq_lens = [int(x) for x in seq_lens]
    bsz = len(seq_lens)
    dev = block_table.device
    if block_table.shape[0] != bsz:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for {bsz} sequence lengths")
    if spans and window is not None:
        raise ValueError(_WINDOW_WITH_SPANS)
    sizes = {sp.layout.block_size for sp in spans} | ({block_size} if block_size is not None else set())
    if len(sizes) > 1:
        raise ValueError(f"spans and block_size disagree on the page size: {sorted(sizes)}")
    block_size = sizes.pop() if sizes else None
    per_row: list[list[tuple[int, int]]] = [[] for _ in range(bsz)]
    for i, sp in enumerate(spans):
        if not (0 <= sp.seq < bsz):
            raise ValueError(f"span {i} belongs to sequence {sp.seq}, outside the batch of {bsz}")
        per_row[sp.seq].append((sp.start, sp.end))

    merged, pos, valid, query_pos, exact_block, exact_offset = _exact_layout(per_row, seq_lens, window, block_table,
                                                                            block_size)

    # spans grouped by layout and low ranks
    by_key: dict[tuple, list[int]] = {}
    for i, sp in enumerate(spans):
        lay = sp.layout
        # (a span with threshold None reads all its components, as its kernel metadata row says)
        two = sp.threshold is not None
        rk_low = low_rank(lay.key_rank, sp.low_rank_divisor) if sp.two_level_keys and two else lay.key_rank
        rv_low = low_rank(lay.value_rank, sp.low_rank_divisor) if two else lay.value_rank
        by_key.setdefault((lay, rk_low, rv_low), []).append(i)
    table = block_table.long()
    groups = []
    for (lay, rk_low, rv_low), ids in by_key.items():
        mine = [spans[i] for i in ids]
        info = torch.tensor([[i, sp.seq, sp.start, sp.storage_block, seq_lens[sp.seq]] for i, sp in zip(ids, mine)],
                            dtype=torch.int64)
        index, rows, start, storage, lens = info.to(dev, non_blocking=True).unbind(1)
        logical = storage[:, None] + torch.arange(lay.num_blocks, device=dev)[None, :]
        blocks = table[rows[:, None], logical]  # [S_g, layout.num_blocks]
        sec_blocks = {name: blocks[:, sec.block: sec.block + sec.num_blocks].contiguous()
                      for name, sec in lay.sections.items()}
        positions = start[:, None] + torch.arange(lay.num_tokens, device=dev)[None, :]
        visible = positions < lens[:, None] if any(sp.end > seq_lens[sp.seq] for sp in mine) else None
        groups.append(SpanGroup(layout=lay, key_rank_low=rk_low, value_rank_low=rv_low, index=index, rows=rows,
                                section_blocks=sec_blocks, positions=positions, visible=visible))

    parts = ([torch.arange(bsz, device=dev)] if pos.shape[1] else []) + [g.rows for g in groups]
    merge_rows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=dev)
    return BatchedDecodePlan(
        batch_size=bsz, num_spans=len(spans), window=window, block_size=block_size, block_table=block_table,
        query_pos=query_pos, exact_pos=pos, exact_valid=valid, exact_block=exact_block, exact_offset=exact_offset,
        groups=groups, merge_rows=merge_rows, max_span_end=max([0] + [sp.end for sp in spans]), intervals=per_row)


def advance_batched_decode_plan(plan: BatchedDecodePlan, block_table: torch.Tensor,
                                seq_lens: Sequence[int]) -> BatchedDecodePlan:
    """The plan of the next decode step of the same rows and spans (new lengths, the block table of the step):
    only the exact slots are rebuilt; the span groups are reused (a compacted span's blocks never move while
    its request runs, and every span of a decode row lies before its query)."""
    seq_lens = [int(x) for x in seq_lens]
    if len(seq_lens) != plan.batch_size or any(e > L for b, L in enumerate(seq_lens) for _, e in plan.intervals[b]):
        raise ValueError("advance_batched_decode_plan: not the next step of the same decode rows")
    _, pos, valid, query_pos, exact_block, exact_offset = _exact_layout(plan.intervals, seq_lens, plan.window,
                                                                        block_table, plan.block_size)
    merge_rows = plan.merge_rows
    if (pos.shape[1] > 0) != (plan.exact_width > 0):  # the exact part appears or disappears
        dev = block_table.device
        parts = ([torch.arange(plan.batch_size, device=dev)] if pos.shape[1] else []) + [g.rows for g in plan.groups]
        merge_rows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=dev)
    return replace(plan, block_table=block_table, query_pos=query_pos, exact_pos=pos, exact_valid=valid,
                   exact_block=exact_block, exact_offset=exact_offset, merge_rows=merge_rows)


def _exact_layout(per_row: list, seq_lens: list[int], window: Optional[int], block_table: torch.Tensor,
                  block_size: Optional[int]):
    """Exact slots of each row: positions [lo_b, L_b) outside its spans, padded to the widest row."""
    bsz = len(seq_lens)
    dev = block_table.device
    # exact slots: p_b(j) = lo_b + j + sum_k len_k [j >= c_k]
    lo = [max(0, L - window) if window is not None else 0 for L in seq_lens]
    merged = [_merged_intervals(per_row[b], lo[b], seq_lens[b]) for b in range(bsz)]
    counts = [seq_lens[b] - lo[b] - sum(e - a for a, e in merged[b]) for b in range(bsz)]
    width = max([0] + counts)
    kmax = max([0] + [len(m) for m in merged])
    cut = torch.full((bsz, kmax), width, dtype=torch.int64)
    length = torch.zeros(bsz, kmax, dtype=torch.int64)
    for b, m in enumerate(merged):
        skipped = 0
        for k, (a, e) in enumerate(m):
            cut[b, k] = a - lo[b] - skipped
            length[b, k] = e - a
            skipped += e - a
    host = torch.tensor([[lo[b], counts[b], seq_lens[b] - 1] for b in range(bsz)], dtype=torch.int64)
    lo_t, count_t, query_pos = host.reshape(bsz, 3).to(dev, non_blocking=True).unbind(1)
    cut, length = cut.to(dev, non_blocking=True), length.to(dev, non_blocking=True)
    j = torch.arange(width, device=dev)[None, :]
    valid = j < count_t[:, None]
    pos = lo_t[:, None] + j
    for k in range(kmax):
        pos = pos + length[:, k: k + 1] * (j >= cut[:, k: k + 1])
    pos = torch.where(valid, pos, 0)
    exact_block = exact_offset = None
    if block_size is not None:
        exact_block, exact_offset = _exact_slots(block_table, pos, valid, block_size)

    return merged, pos, valid, query_pos, exact_block, exact_offset


# --------------------------------------------------------------------------------------
# per-layer call
# --------------------------------------------------------------------------------------
def _gather_tokens(kv_cache: torch.Tensor, blk: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [B, E, Hkv, d] of the token rows (blk, off) [B, E]: a row gather (index_select)
    where the view's strides allow it, an element gather otherwise."""
    nb, _, bs, hkv, d = kv_cache.shape
    st = kv_cache.stride()
    shp = (*blk.shape, hkv, d)
    hd = hkv * d
    if st[4] == 1 and st[3] == d and all(x % hd == 0 for x in st[:3]):
        # K and V rows of H*d elements each (the contiguous [nb, 2, bs, H, d] cache)
        rows = kv_cache.as_strided((nb * st[0] // hd, hd), (hd, 1))
        k_row = (blk * (st[0] // hd) + off * (st[2] // hd)).reshape(-1)
        kv = gather_rows(rows, torch.cat([k_row, k_row + st[1] // hd])).view(2, *shp)
        return kv[0], kv[1]
    if st[4] == 1 and st[1] == d and st[3] == 2 * d and st[2] == 2 * hd and st[0] == bs * st[2]:
        # token-major pages [nb, bs, H, 2d]: one row of 2*H*d elements per token
        rows = kv_cache.as_strided((nb * bs, 2 * hd), (2 * hd, 1))
        kv = gather_rows(rows, (blk * bs + off).reshape(-1)).view(*blk.shape, hkv, 2, d)
        return kv[..., 0, :], kv[..., 1, :]
    kv = kv_cache[blk, :, off]  # [B, E, 2, H, d]
    return kv[:, :, 0], kv[:, :, 1]


def _exact_part(q4: torch.Tensor, kv_cache: torch.Tensor, plan: BatchedDecodePlan, scale: float,
                softcap: Optional[float], window: Optional[int],
                kv_scales: KVScales = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, Hq, d], lse [B, Hq] over every row's exact slots (an FP8 cache's dequantized with ``kv_scales``)."""
    bsz, hkv, g, d = q4.shape
    blk, off = plan.exact_block, plan.exact_offset
    if blk is None or plan.block_size != kv_cache.shape[2]:
        blk, off = _exact_slots(plan.block_table, plan.exact_pos, plan.exact_valid, kv_cache.shape[2])
    k, v = _gather_tokens(kv_cache, blk, off)
    ks, vs = kv_scales or (1.0, 1.0)
    k, v = kv_dequantize(k, ks), kv_dequantize(v, vs)
    s = torch.einsum("bjgd,bejd->bjge", q4 * scale, k.float())  # [B, Hkv, g, E]
    if softcap:
        s = s.div_(softcap).tanh_().mul_(softcap)
    allowed = plan.exact_valid
    if window is not None:
        allowed = allowed & ((plan.query_pos[:, None] - plan.exact_pos) < window)
    s = s.masked_fill_(~allowed[:, None, None, :], float("-inf"))
    _, e, lse, zinv = _exp_parts(s)
    v = torch.where(plan.exact_valid[:, :, None, None], v.float(), 0.0)  # padding may hold any bytes
    o = torch.einsum("bjge,bejd->bjgd", e, v) * zinv[..., None]
    return o.reshape(bsz, hkv * g, d), lse.reshape(bsz, hkv * g)


def _exp_parts(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over the last dim of the scores: m = max (0 where all are -inf), e = exp(s - m) (in place
    of s), lse = m + log sum e (-inf where no key), and 1 / sum e (1 where no key: e = 0 there,
    so the partial output is 0; the sum is >= 1 otherwise)."""
    m = s.amax(-1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = s.sub_(m[..., None]).exp_()
    z = e.sum(-1)
    return m, e, m + torch.log(z), 1.0 / torch.where(z > 0, z, 1.0)


def _read_section(blocks: torch.Tensor, group: SpanGroup, name: str) -> torch.Tensor:
    """Section ``name`` of every span of the group as bytes [S_g, rows, src_row_bytes] (one row gather of
    the section's bytes of each block, as wide elements: :func:`gather_rows`)."""
    sec = group.layout.sections[name]
    ids = group.section_blocks[name]
    raw = gather_rows(blocks[:, : sec.rows_per_block * sec.row_bytes], ids.reshape(-1))
    raw = raw.reshape(ids.shape[0], ids.shape[1], -1)
    return section_rows(sec, raw)[:, : sec.num_rows, : sec.src_row_bytes]


def _section(blocks: torch.Tensor, group: SpanGroup, name: str, dtype: torch.dtype) -> torch.Tensor:
    raw = _read_section(blocks, group, name)
    size = torch.empty((), dtype=dtype).element_size()
    if raw.stride(1) % size == 0:  # rows padded to whole elements: a view of the gathered bytes
        return raw.view(dtype)  # [S_g, rows, cols]
    return raw.contiguous().view(dtype)


def paged_decode_batched(q: torch.Tensor, kv_cache: torch.Tensor, plan: BatchedDecodePlan, scale: float, *,
                         softcap: Optional[float] = None, window: Optional[int] = None,
                         thresholds: Optional[torch.Tensor] = None, lse_ref: Optional[torch.Tensor] = None,
                         importance_ema: Optional[float] = None, rope: Optional[RopeTable] = None,
                         kv_scales: KVScales = None, score_threshold: Optional[float] = None,
                         read_counts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [B, Hq, d] over one layer's exact pages and compacted spans.

    kv_cache [num_blocks, 2, block_size, Hkv, d], contiguous or any view whose blocks are dense
    byte ranges; ``plan`` from :func:`build_batched_decode_plan`. ``thresholds`` float32 [S] in
    the plan's spans order (importance >= threshold reads full rank; None = all full rank).
    ``lse_ref`` float32 [B, Hq]: importance normaliser (+inf rows contribute 0; None = this
    step's lse). ``importance_ema``: omega of the importance update (None = no update).
    ``rope``: the layer's rotary table when its spans hold pre-RoPE keys. ``kv_scales``: (k_scale, v_scale)
    of an FP8 cache (:mod:`ap_vllm.core.paged`). ``score_threshold``: score
    selection of every span's values (module docstring; ``thresholds`` and ``importance_ema`` must be None,
    ``lse_ref`` None or a +inf row: full rank). ``read_counts``: float64 [2] on q's device, a
    measurement: adds (span tokens whose values this call reads at full rank, all span tokens it reads),
    over every decode row and visible token, in place and without a host sync (the bytes a selection
    rule reads per step: value bytes per token = R_v * (share + (1 - share) / divisor)).
    Returns out [B, Hq, d] float32 and lse [B, Hq] float32.
    """
    bsz, hq, d = q.shape
    hkv = kv_cache.shape[3]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if bsz != plan.batch_size:
        raise ValueError(f"q has {bsz} rows for a plan of {plan.batch_size}")
    if plan.num_spans and window is not None:
        raise ValueError(_WINDOW_WITH_SPANS)
    if plan.window is not None and window != plan.window:
        raise ValueError(f"the plan was built for window {plan.window}, the call asks for {window}")
    if thresholds is not None and thresholds.shape[0] != plan.num_spans:
        raise ValueError(f"{thresholds.shape[0]} thresholds for {plan.num_spans} spans")
    if lse_ref is not None and lse_ref.shape[0] != bsz:
        raise ValueError(f"lse_ref has {lse_ref.shape[0]} rows for a batch of {bsz}")
    score = score_threshold is not None
    if score and (thresholds is not None or importance_ema is not None):
        raise ValueError("score selection reads no thresholds and keeps no importance: pass thresholds=None "
                         "and importance_ema=None")
    if score and any(grp.key_rank_low < grp.layout.key_rank for grp in plan.groups):
        raise ValueError("score selection reads keys at full rank: spans must not use two_level_keys")
    if rope is not None and plan.num_spans:
        _check_rope_reach(rope, plan.max_span_end)
        rope = rope.to(q.device)
    g = hq // hkv
    q4 = q.float().reshape(bsz, hkv, g, d)
    outs, lses = [], []
    if plan.exact_width:
        o, l = _exact_part(q4, kv_cache, plan, scale, softcap, window, kv_scales)
        outs.append(o)
        lses.append(l)

    blocks = cache_bytes(kv_cache) if plan.groups else None
    kept = []  # per group: what the importance update needs
    for grp in plan.groups:
        lay = grp.layout
        if lay.block_bytes != blocks.shape[1] or lay.num_kv_heads != hkv or lay.head_size != d:
            raise ValueError(f"span layout {lay} does not match the cache ({tuple(kv_cache.shape)}, "
                             f"{kv_cache.dtype})")
        n, t, rk, rv = grp.num_spans, lay.num_tokens, lay.key_rank, lay.value_rank
        bk = _section(blocks, grp, "basis_k", lay.dtype).float()  # [S, R_k, W]
        bv = _section(blocks, grp, "basis_v", lay.dtype).float()
        ck = _section(blocks, grp, "coeff_k", lay.coeff_dtype).float()  # [S, T, R_k], our own copy
        cv = _section(blocks, grp, "coeff_v", lay.coeff_dtype).float()
        if lay.fp8:
            ck = ck * _section(blocks, grp, "scale_k", torch.float32)
            cv = cv * _section(blocks, grp, "scale_v", torch.float32)
        imp_sec = lay.sections["importance"]
        imp_bytes = blocks[:, : imp_sec.rows_per_block * imp_sec.row_bytes]  # its bytes in each block
        imp_blocks = gather_rows(imp_bytes, grp.section_blocks["importance"].reshape(-1))  # [S * n, bytes]
        imp = imp_blocks.view(torch.float32).reshape(n, -1)[:, :t]  # [S, T]
        full = None  # [S, T, 1] 1.0 where the values are read at full rank (None: every token)
        if thresholds is not None:
            full = (imp >= thresholds[grp.index].float()[:, None]).float()[:, :, None]  # [S, T, 1]
            if grp.key_rank_low < rk:
                ck[:, :, grp.key_rank_low:] *= full
            if grp.value_rank_low < rv:
                cv[:, :, grp.value_rank_low:] *= full
        qs = q4[grp.rows] * scale  # [S, Hkv, g, d]
        if rope is not None:  # rebuild the keys and rotate them at their positions
            k = rope.rotate(torch.bmm(ck, bk).reshape(n * t, hkv, d), grp.positions.reshape(-1), checked=False)
            s = torch.einsum("sjgd,stjd->sjgt", qs, k.reshape(n, t, hkv, d)).reshape(n, hq, t)
        else:
            qp = torch.einsum("sjgd,srjd->sjgr", qs, bk.reshape(n, rk, hkv, d)).reshape(n, hq, rk)
            s = torch.bmm(qp, ck.transpose(1, 2))  # [S, Hq, T]
        if softcap:
            s = s.div_(softcap).tanh_().mul_(softcap)
        if grp.visible is not None:
            s = s.masked_fill_(~grp.visible[:, None, :], float("-inf"))
        if score and grp.value_rank_low < rv and lse_ref is not None:  # (no lse_ref: every token full rank)
            ref = lse_ref.float()[grp.rows][:, :, None]  # [S, Hq, 1]
            p_hat = torch.where(torch.isfinite(ref), torch.exp(s - ref), float("inf"))
            full = (p_hat.amax(1) >= score_threshold).float()[:, :, None]  # [S, T, 1]
            cv[:, :, grp.value_rank_low:] *= full
        if read_counts is not None:
            _count_reads(read_counts, full if grp.value_rank_low < rv else None, grp.visible, n, t)
        m, e, l, zinv = _exp_parts(s)
        a = torch.bmm(e, cv) * zinv[..., None]  # [S, Hq, R_v]
        o = torch.einsum("sjgr,srjd->sjgd", a.reshape(n, hkv, g, rv), bv.reshape(n, rv, hkv, d))
        outs.append(o.reshape(n, hq, d))
        lses.append(l)
        kept.append((grp, e, m, imp, imp_blocks, imp_bytes))

    if not outs:
        out = torch.zeros(bsz, hq, d, dtype=torch.float32, device=q.device)
        lse = torch.full((bsz, hq), float("-inf"), dtype=torch.float32, device=q.device)
    elif not plan.groups:  # exact rows only: one partial per row
        out, lse = outs[0], lses[0]
    else:
        out, lse = _merge_by_row(torch.cat(outs), torch.cat(lses), plan.merge_rows, bsz)

    if importance_ema is not None:
        ref = lse if lse_ref is None else lse_ref.float()
        for grp, e, m, imp, imp_blocks, imp_bytes in kept:
            factor = torch.exp(m - ref[grp.rows]).nan_to_num_(nan=0.0) / hq  # [S, Hq]
            p_mean = torch.bmm(factor[:, None, :], e)[:, 0]  # [S, T] = mean_h exp(s - ref)
            imp.copy_((1.0 - importance_ema) * imp + importance_ema * p_mean)  # into the gathered blocks
            scatter_rows(imp_bytes, grp.section_blocks["importance"].reshape(-1), imp_blocks)
    return out, lse


def _count_reads(counts: torch.Tensor, full: Optional[torch.Tensor], visible: Optional[torch.Tensor],
                 n: int, t: int) -> None:
    """counts[0] += tokens read at full rank, counts[1] += tokens read (visible ones), on the device (a count
    known on the host goes in as a scalar argument: no host-to-device copy)."""
    if visible is None:
        counts[1] += float(n * t)
        counts[0] += float(n * t) if full is None else full[:, :, 0].to(counts.dtype).sum()
        return
    vis = visible.to(counts.dtype)
    hits = vis if full is None else full[:, :, 0].to(counts.dtype) * vis
    counts += torch.stack((hits.sum(), vis.sum()))


def _merge_by_row(o: torch.Tensor, l: torch.Tensor, rows: torch.Tensor,
                  bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of partials o [P, Hq, d], l [P, Hq] into their rows [P] -> [B, Hq, d], [B, Hq]."""
    hq = l.shape[1]
    m = torch.full((bsz, hq), float("-inf"), dtype=torch.float32, device=l.device)
    m = m.scatter_reduce(0, rows[:, None].expand(-1, hq), l, reduce="amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    w = torch.exp(l - m[rows])  # 0 for a partial without keys
    total = torch.zeros(bsz, hq, dtype=torch.float32, device=l.device).index_add_(0, rows, w)
    lse = m + torch.log(total)  # -inf for a row without keys
    w = w / torch.where(total > 0, total, 1.0)[rows]
    out = torch.zeros(bsz, hq, o.shape[2], dtype=torch.float32, device=o.device).index_add_(0, rows, w[..., None] * o)
    return out, lse


__all__ = ["BatchedDecodePlan", "SpanGroup", "build_batched_decode_plan", "paged_decode_batched"]
