"""Which tokens of a sequence are compacted, and which of its blocks that frees.

The one rule shared by the scheduler (which frees blocks) and the attention backend (which
compacts and reads spans): both call :func:`plan_span` with the same inputs and so agree on
every block without talking to each other.

A candidate span is a run ``[start, start + length)`` of prompt tokens: an image/video
placeholder range, or (with ``compact_text``) a stretch of an old text prompt. It becomes a
:class:`SpanPlan` when, after moving its start past the attention-sink tokens, it is at least
``min_span_tokens`` long and its compact form (see :mod:`ap_vllm.core.paged_layout`) needs fewer
blocks than the whole blocks inside the span. Then::

    first = ceil(start / block_size)          first block wholly inside the span
    inner = floor(end / block_size) - first   blocks wholly inside the span
    blocks [first, first + storage)           hold the compact form (all layers of a group)
    blocks [first + storage, first + inner)   are returned to the pool once the span is compacted

The edge blocks (shared with text tokens) stay; the exact K/V of span tokens in them are never
read again. ``storage`` is the largest compact form over the layers (ranks may differ per layer).

Candidates longer than ``chunk_tokens`` (long videos) are first cut into chunks at block
boundaries (:func:`split_span`); each chunk is planned, compacted and freed on its own, so the
request's exact working set during prefill is about one chunk plus one scheduler step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from ap_vllm.config import AttentionPackConfig
from ap_vllm.core.paged_layout import SpanLayout

SpanKind = Literal["visual", "text"]


@dataclass(frozen=True)
class KVGeometry:
    """What the compact form's size depends on, for one KV-cache group."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype  # model dtype (bases; the pages too unless cache_dtype is set)
    num_layers: int  # model layers (for per-layer rank lists)
    cache_dtype: Optional[torch.dtype] = None  # element type of the pages when it differs (FP8 KV cache)


@dataclass(frozen=True)
class SpanPlan:
    start: int
    num_tokens: int
    kind: SpanKind
    first_block: int
    storage_blocks: int
    inner_blocks: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def freed_blocks(self) -> tuple[int, int]:
        """Logical block range [lo, hi) returned to the pool after compaction."""
        return self.first_block + self.storage_blocks, self.first_block + self.inner_blocks

    @property
    def num_freed_blocks(self) -> int:
        lo, hi = self.freed_blocks
        return hi - lo


def span_layout(config: AttentionPackConfig, geometry: KVGeometry, num_tokens: int, layer: int,
                kind: SpanKind) -> SpanLayout:
    """The compact form of one layer's span."""
    text = kind == "text"
    return SpanLayout(num_tokens, config.rank_for_layer("key", layer, text), config.rank_for_layer("value", layer, text),
                      geometry.num_kv_heads, geometry.head_size, geometry.block_size, geometry.dtype,
                      fp8=config.coefficient_dtype == "fp8_e4m3", cache_dtype=geometry.cache_dtype)


def plan_span(config: AttentionPackConfig, geometry: KVGeometry, start: int, length: int,
              kind: SpanKind) -> Optional[SpanPlan]:
    """The plan for one candidate span, or None if it stays exact."""
    end = start + length
    start = max(start, config.sink_tokens)
    t = end - start
    if not config.enabled or t < config.min_span_tokens:
        return None
    bs = geometry.block_size
    first = -(-start // bs)
    inner = end // bs - first
    storage = max(span_layout(config, geometry, t, layer, kind).num_blocks for layer in range(geometry.num_layers))
    if storage >= inner:
        return None  # nothing to free
    return SpanPlan(start, t, kind, first, storage, inner)


def candidate_spans(config: AttentionPackConfig, visual: Sequence[tuple[int, int]],
                    num_prompt_tokens: int) -> list[tuple[int, int, SpanKind]]:
    """(start, length, kind) candidates: the visual ranges, plus old text with ``compact_text``.

    Visual ranges may overlap: a processor that merges the text around adjacent items (Gemma 3 writes
    ``"\n\n"`` after an image and before the next, and its tokenizer makes them one ``"\n\n\n\n"``
    token) gives both items' placeholder ranges that token. Each token belongs to one span: a range
    starts at the end of the ranges before it (and is dropped if nothing is left). Text candidates are
    the parts of ``[0, num_prompt_tokens - text_recent_window)`` outside visual ranges, for prompts of
    at least ``text_min_tokens`` tokens.
    """
    out: list[tuple[int, int, SpanKind]] = []
    covered = 0
    for s, n in sorted(visual):
        start, end = max(s, covered), s + n
        if end > start:
            out.append((start, end - start, "visual"))
        covered = max(covered, end)
    if config.compact_text and num_prompt_tokens >= config.text_min_tokens:
        limit = num_prompt_tokens - config.text_recent_window
        cursor = 0
        for s, n in sorted(visual) + [(limit, 0)]:
            if min(s, limit) > cursor:
                out.append((cursor, min(s, limit) - cursor, "text"))
            cursor = max(cursor, s + n)
            if cursor >= limit:
                break
    return sorted(out)


def split_span(start: int, length: int, chunk_tokens: Optional[int], block_size: int) -> list[tuple[int, int]]:
    """[start, start + length) cut into ceil(length / chunk_tokens) pieces of near-equal length whose
    inner boundaries are multiples of ``block_size`` (no block is shared by two chunks); each piece
    has at most chunk_tokens + block_size tokens. ``chunk_tokens=None``: the whole span."""
    if chunk_tokens is None or length <= chunk_tokens:
        return [(start, length)]
    end = start + length
    pieces = -(-length // chunk_tokens)
    cuts = [start]
    for i in range(1, pieces):
        cut = round((start + i * length / pieces) / block_size) * block_size
        if cuts[-1] < cut < end:
            cuts.append(cut)
    cuts.append(end)
    return [(a, b - a) for a, b in zip(cuts, cuts[1:])]


def plan_spans(config: AttentionPackConfig, geometry: KVGeometry, visual: Sequence[tuple[int, int]],
               num_prompt_tokens: int) -> list[SpanPlan]:
    """Every span (chunk) of a request that will be compacted, in position order."""
    plans = (plan_span(config, geometry, a, n, kind)
             for s, length, kind in candidate_spans(config, visual, num_prompt_tokens)
             for a, n in split_span(s, length, config.chunk_tokens, geometry.block_size))
    return [p for p in plans if p is not None]


def admission_blocks(plans: Sequence[SpanPlan], num_tokens: int, block_size: int, lag_tokens: int,
                     held_blocks: int = 0, freed_blocks: int = 0) -> int:
    """Blocks to reserve for a request whose spans are compacted while it is prefilled.

    vLLM admits a request only if its whole sequence fits (``scheduler_reserve_full_isl``); with
    compaction the request never holds that much. Once a scheduler step is processed, every span
    ending at or before the processed position has been compacted and its freed blocks returned,
    and a step allocates at most ``lag_tokens`` beyond the processed position (one step of
    ``max_num_batched_tokens``, two with async scheduling). So while tokens up to x are allocated,
    the request holds at most::

        need(x) = ceil(x / block_size) - freed(x - lag)      freed(y) = blocks freed by spans ending <= y

    The maximum over x <= ``num_tokens`` is at x = num_tokens or just before a span's blocks are
    certainly back (x = end + lag - 1). Result in vLLM's terms: logical blocks of the block-table
    row (the ``held_blocks`` already in it count, ``freed_blocks`` of them already returned), i.e.
    ``result - held_blocks`` new blocks cover the rest of the prefill; never more than
    ceil(num_tokens / block_size).
    """
    exact = -(-num_tokens // block_size)
    ends = sorted((p.end, p.num_freed_blocks) for p in plans)

    def freed_by(y: int) -> int:
        return max(freed_blocks, sum(n for end, n in ends if end <= y))

    points = [num_tokens] + [end + lag_tokens - 1 for end, _ in ends if end + lag_tokens - 1 < num_tokens]
    peak = max(-(-x // block_size) - freed_by(x - lag_tokens) + freed_blocks for x in points)
    return min(exact, max(held_blocks, peak))


def lifetime_blocks(plans: Sequence[SpanPlan], num_prompt_tokens: int, num_tokens: int, block_size: int,
                    lag_tokens: int) -> int:
    """The most blocks a request of ``num_prompt_tokens`` + generated tokens up to ``num_tokens`` in
    all ever holds: while its prompt is prefilled and its spans compact (:func:`admission_blocks`),
    or at its last token (every span compacted; decoding only adds blocks)."""
    prefill = admission_blocks(plans, num_prompt_tokens, block_size, lag_tokens)
    final = -(-num_tokens // block_size) - sum(p.num_freed_blocks for p in plans)
    return max(prefill, final)


def min_freeing_span(config: AttentionPackConfig, geometry: KVGeometry, kind: SpanKind = "visual",
                     limit: int = 1 << 20) -> Optional[int]:
    """The shortest span (starting right after the sinks, block-aligned) that frees a block, or
    None if none up to ``limit`` tokens does (e.g. ranks so high the compact form never fits)."""
    start = -(-max(config.sink_tokens, 1) // geometry.block_size) * geometry.block_size
    lo, hi = 1, limit
    if plan_span(config, geometry, start, hi, kind) is None:
        return None
    while lo < hi:  # the compact form grows more slowly than the span: freeing is monotone in length
        mid = (lo + hi) // 2
        if plan_span(config, geometry, start, mid, kind) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo
