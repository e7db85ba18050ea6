"""What the engine and the backend agree on: the KV-cache spec of compacted layers and each
request's span candidates.

* :class:`AttentionPackSpec` is the KV-cache spec of the layers that hold compacted spans (the
  backend's ``customize_spec`` turns their ``FullAttentionSpec`` into it when compaction is on);
  it pages exactly like full attention. vLLM's KV-cache-spec registry pairs it with
  :class:`ap_vllm.engine.kv_manager.AttentionPackManager`.
* :func:`request_candidates` turns a request's multimodal features into span candidates
  (:class:`RequestSpans`); the scheduler and the worker use the same function, so both sides plan
  identical spans (:mod:`ap_vllm.core.spans`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ap_vllm.config import AttentionPackConfig, config_from_vllm
from ap_vllm.core.spans import KVGeometry, SpanPlan, lifetime_blocks, plan_spans

logger = init_logger("vllm.attentionpack")  # under "vllm" so vLLM's log handlers print it


def visual_ranges(mm_features: Optional[Sequence[Any]]) -> list[tuple[int, int]]:
    """(offset, length) of every image/video placeholder of a request."""
    out = []
    for feature in mm_features or ():
        if getattr(feature, "modality", None) == "audio":
            continue
        pos = feature.mm_position
        out.append((int(pos.offset), int(pos.length)))
    return out


@dataclass(frozen=True)
class RequestSpans:
    """What both sides need to plan a request's spans."""

    visual: tuple[tuple[int, int], ...]
    num_prompt_tokens: int

    def plans(self, config: AttentionPackConfig, geometry: KVGeometry) -> list[SpanPlan]:
        return plan_spans(config, geometry, self.visual, self.num_prompt_tokens)


def request_candidates(mm_features, num_prompt_tokens: int) -> RequestSpans:
    return RequestSpans(tuple(visual_ranges(mm_features)), int(num_prompt_tokens))


def step_lag_tokens(scheduler_config: Any) -> int:
    """Tokens a step allocates past the last processed one (see :func:`ap_vllm.core.spans.admission_blocks`):
    one step of max_num_batched_tokens; with async scheduling the scheduler runs one more step ahead."""
    return scheduler_config.max_num_batched_tokens * (2 if scheduler_config.async_scheduling else 1)


class AttentionPackSpec(FullAttentionSpec):
    """Full-attention layers whose visual spans are compacted (pages like full attention)."""

    def geometry(self, num_layers: int) -> KVGeometry:
        """What span plans depend on (the same for the scheduler, the builders and the start-up check)."""
        return KVGeometry(self.block_size, self.num_kv_heads, self.head_size, self.dtype, num_layers)

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        """What vLLM's start-up check asks of the pool for one layer. ``pool_check: compacted``: a
        request of max_model_len tokens made of one long video, compacted chunk by chunk while it is
        prefilled, at its peak; otherwise (and by default) vLLM's rule, max_model_len exact tokens."""
        config = config_from_vllm(vllm_config)
        if config.pool_check != "compacted":
            return super().max_memory_usage_bytes(vllm_config)
        model, n = vllm_config.model_config, vllm_config.model_config.max_model_len
        plans = plan_spans(config, self.geometry(model.get_num_layers(vllm_config.parallel_config)), [(0, n)], n)
        peak = lifetime_blocks(plans, n, n, self.block_size, step_lag_tokens(vllm_config.scheduler_config))
        return peak * self.page_size_bytes

    @classmethod
    def merge(cls, specs):
        """One KV-cache group's spec. If the group also holds layers that are not compacted (e.g.
        sliding-window layers kept in the full-attention group when vLLM's hybrid KV-cache manager
        is off), freeing span blocks would take K/V those layers still read: the group then pages
        as plain full attention and nothing is freed."""
        if all(type(spec) is cls for spec in specs):
            return super().merge(specs)
        logger.warning_once("AttentionPack compaction is off for a KV-cache group that mixes compacted and "
                            "other layers (is the hybrid KV-cache manager disabled?); its blocks stay exact.")
        return FullAttentionSpec.merge(specs)
