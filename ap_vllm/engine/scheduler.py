"""The scheduler compaction runs with (``--scheduler-cls``, set by :mod:`ap_vllm.engine.policy` when
compaction is on), and the engine state it owns.

KV managers see only request ids and token counts; the scheduler sees each request. So the
scheduler owns one :class:`EngineState` (engine-core process): the configuration, each request's
image/video placeholder ranges and prompt length (recorded when the request is added, dropped
when vLLM frees it), the compaction counters its managers add to, and what the metrics already
reported. It hands that state to every :class:`~ap_vllm.engine.kv_manager.AttentionPackManager`
of its KV cache manager once vLLM built them. Two schedulers (two engines in one process) share
nothing.

Two scheduling rules of its own:

* a prompt chunk never runs past a span's end (:func:`ap_vllm.engine.prefix_cache.cap_at_span_end`):
  the span is compacted in the step that completes it, and the text after it is always computed
  against its compact form, whatever the token budget or the batch;
* with prefix caching on, each request hashes its blocks with
  :class:`~ap_vllm.engine.prefix_cache.SpanAwareBlockHasher` (compact forms and what follows them
  under their own hashes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from ap_vllm import compat
from ap_vllm.config import AttentionPackConfig, config_from_vllm, model_layers
from ap_vllm.engine.kv_manager import AttentionPackManager
from ap_vllm.engine.metrics import block_bytes, take_engine_stats
from ap_vllm.engine.prefix_cache import SpanAwareBlockHasher, cap_at_span_end, settings_digest
from ap_vllm.engine.spec import RequestSpans, request_candidates, step_lag_tokens
from ap_vllm.core.spans import SpanPlan
from ap_vllm.selection import SCHEDULER_STATS_FIELD


@dataclass
class EngineState:
    """AttentionPack's state in one engine core, owned by its scheduler."""

    config: Optional[AttentionPackConfig] = None
    num_layers: int = 1
    model_dtype: Any = None  # torch dtype of the model (the bases of compacted spans)
    step_lag_tokens: int = 1 << 30  # tokens a step allocates past the last processed one (see admission_blocks)
    requests: dict[str, RequestSpans] = field(default_factory=dict)
    # what the KV managers compacted and freed, since start
    tokens_compacted: int = 0
    blocks_freed: int = 0
    span_blocks: int = 0  # blocks wholly inside the compacted spans (their exact form)
    compact_blocks: int = 0  # blocks of their compact form
    # prefix caching of compacted spans (AttentionPackManager.add_local_computed_blocks)
    span_queries: int = 0  # spans of requests admitted with prefix caching on
    span_hits: int = 0  # of those, spans whose compact form came from the cache
    span_tokens_reused: int = 0  # their tokens (prefill and compaction skipped)
    # metrics (ap_vllm.engine.metrics.take_engine_stats)
    block_bytes: int = 0  # KV bytes one freed block returns
    reported_tokens_compacted: int = 0
    reported_blocks_freed: int = 0
    reported_span_queries: int = 0
    reported_span_hits: int = 0
    reported_span_tokens_reused: int = 0

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> "EngineState":
        return cls(config=config_from_vllm(vllm_config),
                   num_layers=model_layers(vllm_config.model_config),
                   model_dtype=vllm_config.model_config.dtype,
                   step_lag_tokens=step_lag_tokens(vllm_config.scheduler_config))


class AttentionPackSchedulerMixin(compat.RequestFreedHook, compat.PromptChunkHook):
    """Owns the engine state and keeps each request's span candidates in it."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        self.attentionpack_state = EngineState.from_vllm(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        state = self.attentionpack_state
        state.block_bytes = block_bytes(self.kv_cache_config, vllm_config)
        ours = [m for m in compat.kv_cache_managers(self.kv_cache_manager) if isinstance(m, AttentionPackManager)]
        for manager in ours:
            manager.attach(state)
        # The first AttentionPack group plans the spans the scheduler's own rules use (chunk ends, block hashes).
        self._attentionpack_planner = ours[0] if ours and state.config is not None else None
        self._attentionpack_hashing = None  # (block size, hash function, settings digest) with prefix caching on
        if self._attentionpack_planner is not None and state.config.enabled and self.kv_cache_manager.enable_caching:
            self._attentionpack_hashing = self._span_hashing(vllm_config, self._attentionpack_planner)
            compat.keep_mm_data_for_resumption()  # (hit images can need their encoder again after a preemption)

    def _span_hashing(self, vllm_config, planner: AttentionPackManager):
        from vllm.utils.hashing import get_hash_fn_by_name

        state, block_size = self.attentionpack_state, planner.block_size
        hash_block_size = getattr(self, "hash_block_size", block_size)
        if hash_block_size != block_size:
            raise ValueError(
                f"AttentionPack compaction with prefix caching needs prefix-cache hashes per KV block (block size "
                f"{block_size}), but this model's KV-cache groups hash every {hash_block_size} tokens (set "
                f"--prefix-match-unit {block_size}, or turn prefix caching off with --no-enable-prefix-caching)")
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        geometry = planner.kv_cache_spec.geometry(state.num_layers, state.model_dtype)
        return block_size, hash_fn, settings_digest(state.config, geometry)

    def _request_plans(self, request_id: str) -> list[SpanPlan]:
        planner = self._attentionpack_planner
        return planner.plans_for(request_id) if planner is not None else []

    def add_request(self, request) -> None:
        state = self.attentionpack_state
        spans = request_candidates(request.mm_features, request.num_prompt_tokens)
        state.requests[request.request_id] = spans
        if self._attentionpack_hashing is not None:
            plans = self._request_plans(request.request_id)
            if plans:
                block_size, hash_fn, digest = self._attentionpack_hashing
                compat.rehash_request_blocks(request, SpanAwareBlockHasher(plans, block_size, hash_fn, digest))
        super().add_request(request)

    def cap_prompt_chunk(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        plans = self._request_plans(request.request_id)
        return cap_at_span_end(plans, num_computed_tokens, num_new_tokens) if plans else num_new_tokens

    def on_request_freed(self, request) -> None:
        self.attentionpack_state.requests.pop(request.request_id, None)

    def make_stats(self, *args, **kwargs):
        # Metrics: what compaction freed since the last stats travel to the API server with
        # vLLM's SchedulerStats (ap_vllm.engine.metrics).
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            setattr(stats, SCHEDULER_STATS_FIELD, take_engine_stats(self.attentionpack_state))
        return stats


class AttentionPackScheduler(AttentionPackSchedulerMixin, Scheduler):
    pass


class AsyncAttentionPackScheduler(AttentionPackSchedulerMixin, AsyncScheduler):
    pass
