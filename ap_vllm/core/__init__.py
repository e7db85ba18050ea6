"""Algorithm core (no vLLM): compaction, low-rank attention, paged layout, references.

Triton kernels live in :mod:`ap_vllm.kernels` and are imported lazily by
:func:`ap_vllm.core.paged_decode.paged_mixed_decode`.
"""

from .compaction import CompactedSpan, compact_span, compaction_memory_ratio, randomized_svd, rank_for_energy
from .dense import dense_attention, merge_partials
from .lowrank_attention import (attend_compacted, decode_mixed, decode_step_cost, importance_threshold,
                                update_importance)
from .paged_decode import DecodePlan, build_decode_plan, paged_decode_reference, paged_mixed_decode
from .paged_layout import PagedSpan, SpanLayout, fits, pack_span, span_layout_for, storage_blocks, unpack_span

__all__ = [
    "CompactedSpan", "compact_span", "compaction_memory_ratio", "randomized_svd", "rank_for_energy",
    "dense_attention", "merge_partials", "attend_compacted", "decode_mixed", "decode_step_cost",
    "importance_threshold", "update_importance", "DecodePlan", "build_decode_plan", "paged_decode_reference",
    "paged_mixed_decode", "PagedSpan", "SpanLayout", "fits", "pack_span", "span_layout_for", "storage_blocks",
    "unpack_span",
]
