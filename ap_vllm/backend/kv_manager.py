"""Scheduler side: which blocks of a request go back to vLLM's pool once its spans are compacted.

* :class:`AttentionPackSpec` is the KV-cache spec of the layers that hold compacted spans (the
  backend's ``customize_spec`` turns their ``FullAttentionSpec`` into it when compaction is on);
  it pages exactly like full attention.
* :class:`AttentionPackManager` (paired with the spec in vLLM's KV-cache-spec registry) frees,
  per request, the blocks of each span past its compact form as soon as the step that
  compacted it has been processed (``processed_computed_tokens >= span end``). Like vLLM's
  sliding-window managers it replaces them with the null block, so the block table stays
  positional; the freed blocks are ordinary free blocks of the pool, so vLLM's own KV usage and
  admission see the saving. vLLM admits a request only when its whole sequence fits
  (``scheduler_reserve_full_isl``); the manager reports instead what the request holds at most
  while its spans (chunks of a long video) are compacted on the way
  (:func:`ap_vllm.core.spans.admission_blocks`), plus what the compacting prefills already in
  flight still need, so a pool that could not hold one more exact video admits it without
  taking blocks another prefill counts on.
* :class:`AttentionPackSchedulerMixin` gives the managers what they cannot see: each request's
  image/video placeholder ranges and prompt length (the :data:`REQUEST_SPANS` registry, filled
  when a request is added, dropped when it is freed). Both live in the engine-core process.
* :func:`request_candidates` turns a request's multimodal features into span candidates; the
  worker side uses the same function, so both sides plan identical spans (:mod:`ap_vllm.core.spans`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from ap_vllm.config import AttentionPackConfig, config_from_vllm
from ap_vllm.core.spans import KVGeometry, SpanPlan, admission_blocks, lifetime_blocks, plan_spans

logger = init_logger("vllm.attentionpack")


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


class _EngineState:
    """Engine-core process state shared by the scheduler and the KV managers."""

    config: Optional[AttentionPackConfig] = None
    num_layers: int = 1
    step_lag_tokens: int = 1 << 30  # tokens a step allocates past the last processed one (see admission_blocks)
    requests: dict[str, RequestSpans] = {}
    tokens_compacted: int = 0
    blocks_freed: int = 0
    span_blocks: int = 0  # blocks wholly inside the compacted spans (their exact form)
    compact_blocks: int = 0  # blocks of their compact form


REQUEST_SPANS = _EngineState


def step_lag_tokens(scheduler_config: Any) -> int:
    """Tokens a step allocates past the last processed one (see :func:`admission_blocks`): one step of
    max_num_batched_tokens; with async scheduling the scheduler runs one more step ahead."""
    return scheduler_config.max_num_batched_tokens * (2 if scheduler_config.async_scheduling else 1)


def _geometry(vllm_config: Any, block_size: int) -> KVGeometry:
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return KVGeometry(block_size, model.get_num_kv_heads(parallel), model.get_head_size(), model.dtype,
                      model.get_num_layers(parallel))


def request_blocks_needed(vllm_config: Any, config: AttentionPackConfig, mm_features, num_prompt_tokens: int,
                          max_tokens: int) -> tuple[int, int]:
    """(most blocks the request holds at any time with compaction, blocks of its exact KV)."""
    bs = vllm_config.cache_config.block_size
    plans = request_candidates(mm_features, num_prompt_tokens).plans(config, _geometry(vllm_config, bs))
    total = num_prompt_tokens + max_tokens
    need = lifetime_blocks(plans, num_prompt_tokens, total, bs, step_lag_tokens(vllm_config.scheduler_config))
    return need, -(-total // bs)


def check_request_fits(vllm_config: Any, config: AttentionPackConfig, request: Any) -> None:
    """With ``pool_check: compacted`` (API server, on arrival): refuse a request that could never fit
    the KV pool, even compacted, instead of letting it wait forever at the head of vLLM's queue.
    Raises vLLM's validation error (HTTP 400) naming what it needs and what the pool holds."""
    from vllm.exceptions import VLLMValidationError

    pool = vllm_config.cache_config.num_gpu_blocks  # set from the engines' report once they are up
    if not pool or request.sampling_params is None:
        return
    pool = pool // max(1, vllm_config.parallel_config.data_parallel_size) - 1  # per engine; the null block
    need, exact = request_blocks_needed(vllm_config, config, request.mm_features, len(request.prompt_token_ids or ()),
                                        request.sampling_params.max_tokens or 0)
    if need > pool:
        bs = vllm_config.cache_config.block_size
        raise VLLMValidationError(
            f"This request needs {need} KV-cache blocks of {bs} tokens at its peak with AttentionPack compaction "
            f"({exact} exact), but the KV pool holds {pool} (attentionpack.pool_check='compacted'). Send fewer "
            "prompt tokens (text is not compacted), lower max_tokens, or give the server more KV-cache memory.",
            parameter="max_tokens")


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


class AttentionPackManager(FullAttentionManager):
    """Frees the blocks of compacted spans (see the module docstring)."""

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._plans: dict[str, list[SpanPlan]] = {}
        self._compacting: set[str] = set()  # requests with spans still prefilling (see _in_flight_reserve)

    def _plans_for(self, request_id: str) -> list[SpanPlan]:
        plans = self._plans.get(request_id)
        if plans is None:
            spans, config = REQUEST_SPANS.requests.get(request_id), REQUEST_SPANS.config
            if spans is None or config is None:
                return []
            plans = self._plans[request_id] = spans.plans(config, self.kv_cache_spec.geometry(REQUEST_SPANS.num_layers))
            if plans:
                self._compacting.add(request_id)
        return plans

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks, total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False, prefill_end: int = 0) -> int:
        reserve = 0
        if apply_admission_cap:  # the full-sequence admission gate: what the request holds at most
            plans = self._plans_for(request_id)
            if plans:
                row = self.req_to_blocks.get(request_id, ())
                num_tokens = min(num_tokens, self._peak_blocks(request_id, num_tokens) * self.block_size)
                if not row:  # a new request: also leave what compacting prefills in flight still need
                    reserve = self._in_flight_reserve(request_id)
        return reserve + super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens,
            num_tokens_main_model, apply_admission_cap=apply_admission_cap, prefill_end=prefill_end)

    def _peak_blocks(self, request_id: str, num_tokens: int) -> int:
        row = self.req_to_blocks.get(request_id, ())
        return admission_blocks(self._plans_for(request_id), num_tokens, self.block_size,
                                REQUEST_SPANS.step_lag_tokens, held_blocks=len(row),
                                freed_blocks=sum(b is self._null_block for b in row))

    def _in_flight_reserve(self, request_id: str) -> int:
        """Blocks the other requests with compacting spans still need to finish their prefill. Their
        admission counted on blocks their spans free later; a new request admitted against today's
        free blocks would take them (vLLM's gate reserves nothing for prefills in flight, which for
        exact requests matters less: their full length was free when they were admitted)."""
        total = 0
        for rid in self._compacting:
            spans, row = REQUEST_SPANS.requests.get(rid), self.req_to_blocks.get(rid)
            if rid == request_id or spans is None or not row:
                continue
            total += max(0, self._peak_blocks(rid, spans.num_prompt_tokens) - len(row))
        return total

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: Optional[int] = None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        plans = self._plans_for(request_id)
        spans = REQUEST_SPANS.requests.get(request_id)
        if spans is None or processed_computed_tokens >= spans.num_prompt_tokens:
            self._compacting.discard(request_id)  # prefill done: nothing more to reserve for it
        for plan in plans:
            lo, hi = plan.freed_blocks
            if plan.end <= processed_computed_tokens and hi <= len(blocks) and blocks[hi - 1] != self._null_block:
                self._remove_blocks_in_range(request_id, lo, hi)
                REQUEST_SPANS.tokens_compacted += plan.num_tokens
                REQUEST_SPANS.blocks_freed += hi - lo
                REQUEST_SPANS.span_blocks += plan.inner_blocks
                REQUEST_SPANS.compact_blocks += plan.storage_blocks
                logger.debug("AttentionPack: request %s: %s span [%d, %d) compacted, %d blocks freed",
                             request_id, plan.kind, plan.start, plan.end, hi - lo)

    def pop_blocks_for_free(self, request_id: str):
        self._plans.pop(request_id, None)
        self._compacting.discard(request_id)
        return super().pop_blocks_for_free(request_id)


def register_kv_cache_spec() -> None:
    """Pair the spec with its manager in vLLM's registry (built-ins first, see VLLM-FACTS)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(AttentionPackSpec, AttentionPackManager, uniform_type_base_spec=FullAttentionSpec)


class AttentionPackSchedulerMixin:
    """Records each request's span candidates for the KV managers (engine-core process)."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        REQUEST_SPANS.config = config_from_vllm(vllm_config)
        REQUEST_SPANS.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        REQUEST_SPANS.step_lag_tokens = step_lag_tokens(vllm_config.scheduler_config)
        super().__init__(vllm_config, *args, **kwargs)

    def add_request(self, request) -> None:
        REQUEST_SPANS.requests[request.request_id] = request_candidates(request.mm_features, request.num_prompt_tokens)
        super().add_request(request)

    def _free_request(self, request, *args, **kwargs):
        try:
            return super()._free_request(request, *args, **kwargs)
        finally:
            REQUEST_SPANS.requests.pop(request.request_id, None)

    def make_stats(self, *args, **kwargs):
        # Metrics: what compaction freed since the last stats travel to the API server with
        # vLLM's SchedulerStats (ap_vllm.backend.metrics).
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            from ap_vllm.backend.metrics import STATS_FIELD, take_engine_stats

            setattr(stats, STATS_FIELD, take_engine_stats(self))
        return stats


class AttentionPackScheduler(AttentionPackSchedulerMixin, Scheduler):
    pass


class AsyncAttentionPackScheduler(AttentionPackSchedulerMixin, AsyncScheduler):
    pass
