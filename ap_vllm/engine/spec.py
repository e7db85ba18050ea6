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

import torch
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ap_vllm.config import AttentionPackConfig, compacted_kv_shape, config_from_vllm, model_layers
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


def _page_dtype(cache_dtype: torch.dtype, model_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The element type of the pages when it is not the model dtype (None otherwise)."""
    if cache_dtype == model_dtype:
        return None
    if cache_dtype in (torch.uint8, torch.float8_e4m3fn):
        return torch.float8_e4m3fn
    raise ValueError(f"AttentionPack pages in {cache_dtype} are not supported (model dtype {model_dtype}; "
                     "allowed KV caches: the model dtype or fp8 e4m3)")


def kv_geometry(vllm_config: Any, block_size: int) -> KVGeometry:
    """The geometry of the compacted layers from vLLM's configuration (``--kv-cache-dtype`` included): what
    :meth:`AttentionPackSpec.geometry` gives for the spec vLLM builds from the same configuration."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    cache = kv_cache_dtype_str_to_dtype(getattr(vllm_config.cache_config, "cache_dtype", "auto"), model)
    heads, _, head_size = compacted_kv_shape(model, parallel)
    return KVGeometry(block_size, heads, head_size, model.dtype, model_layers(model),
                      cache_dtype=_page_dtype(cache, model.dtype))


class AttentionPackSpec(FullAttentionSpec):
    """Full-attention layers whose visual spans are compacted (pages like full attention)."""

    def geometry(self, num_layers: int, model_dtype: Optional[torch.dtype] = None) -> KVGeometry:
        """What span plans depend on (the same for the scheduler, the builders and the start-up check).
        Bases are stored in the model dtype; the pages in the spec's dtype (1 byte for an FP8 KV cache,
        which vLLM allocates as uint8). ``model_dtype`` None: the spec's own (a model-dtype cache)."""
        model_dtype = model_dtype or self.dtype
        return KVGeometry(self.block_size, self.num_kv_heads, self.head_size, model_dtype, num_layers,
                          cache_dtype=_page_dtype(self.dtype, model_dtype))

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        """What vLLM's start-up check asks of the pool for one layer. ``pool_check: compacted``: a
        request of max_model_len tokens made of one long video, compacted chunk by chunk while it is
        prefilled, at its peak; otherwise (and by default) vLLM's rule, max_model_len exact tokens."""
        config = config_from_vllm(vllm_config)
        if config.pool_check != "compacted":
            return super().max_memory_usage_bytes(vllm_config)
        model, n = vllm_config.model_config, vllm_config.model_config.max_model_len
        plans = plan_spans(config, self.geometry(model_layers(model), model.dtype),
                           [(0, n)], n)
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
