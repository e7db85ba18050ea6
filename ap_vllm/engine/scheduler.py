"""The scheduler compaction runs with (``--scheduler-cls``, set by :mod:`ap_vllm.compat` when
compaction is on), and the engine state it owns.

KV managers see only request ids and token counts; the scheduler sees each request. So the
scheduler owns one :class:`EngineState` (engine-core process): the configuration, each request's
image/video placeholder ranges and prompt length (recorded when the request is added, dropped
when vLLM frees it), the compaction counters its managers add to, and what the metrics already
reported. It hands that state to every :class:`~ap_vllm.engine.kv_manager.AttentionPackManager`
of its KV cache manager once vLLM built them. Two schedulers (two engines in one process) share
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from ap_vllm import compat
from ap_vllm.config import AttentionPackConfig, config_from_vllm
from ap_vllm.engine.kv_manager import AttentionPackManager
from ap_vllm.engine.metrics import block_bytes, take_engine_stats
from ap_vllm.engine.spec import RequestSpans, request_candidates, step_lag_tokens
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
    # metrics (ap_vllm.engine.metrics.take_engine_stats)
    block_bytes: int = 0  # KV bytes one freed block returns
    reported_tokens_compacted: int = 0
    reported_blocks_freed: int = 0

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> "EngineState":
        return cls(config=config_from_vllm(vllm_config),
                   num_layers=vllm_config.model_config.get_num_layers(vllm_config.parallel_config),
                   model_dtype=vllm_config.model_config.dtype,
                   step_lag_tokens=step_lag_tokens(vllm_config.scheduler_config))


class AttentionPackSchedulerMixin(compat.RequestFreedHook):
    """Owns the engine state and keeps each request's span candidates in it."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        self.attentionpack_state = EngineState.from_vllm(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        self.attentionpack_state.block_bytes = block_bytes(self.kv_cache_config)
        for manager in compat.kv_cache_managers(self.kv_cache_manager):
            if isinstance(manager, AttentionPackManager):
                manager.attach(self.attentionpack_state)

    def add_request(self, request) -> None:
        spans = request_candidates(request.mm_features, request.num_prompt_tokens)
        self.attentionpack_state.requests[request.request_id] = spans
        super().add_request(request)

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
