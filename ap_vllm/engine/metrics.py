"""AttentionPack's Prometheus metrics on vLLM's own ``/metrics`` endpoint.

============================================  =======  =============================================
``attentionpack:tokens_compacted_total``      counter  span tokens whose exact K/V were compacted
``attentionpack:blocks_freed_total``          counter  KV blocks returned to vLLM's pool
``attentionpack:bytes_saved``                 gauge    KV bytes returned to the pool since start
                                                       (``blocks_freed_total`` x bytes of one block
                                                       over all layers of its KV-cache group, on every
                                                       tensor-parallel rank and pipeline stage)
``attentionpack:compaction_ratio``            gauge    exact blocks / compact blocks, summed over
                                                       every span compacted so far (0 before any)
``attentionpack:span_cache_queries_total``    counter  compacted spans of requests admitted with
                                                       prefix caching on (first admission and each
                                                       resumption after a preemption)
``attentionpack:span_cache_hits_total``       counter  of those, spans whose compact form came from
                                                       the prefix cache (prefill and compaction skipped)
``attentionpack:span_cache_tokens_total``     counter  the span tokens of those hits
============================================  =======  =============================================

vLLM's own ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` count tokens as always; a hit on a
compacted span counts its tokens there too.

All carry vLLM's ``model_name`` and ``engine`` labels. They exist (at 0) whenever
``--attention-backend attentionpack`` is selected, compaction on or off.

How the numbers travel. The counts live in the engine-core process (the KV managers of
:mod:`ap_vllm.engine.kv_manager` free the blocks), while ``/metrics`` is served by the API-server
process. vLLM already ships a :class:`~vllm.v1.metrics.stats.SchedulerStats` from the one to the
other with every step's outputs, and hands it there to every stat logger. So:

* engine core: our scheduler's ``make_stats`` calls :func:`take_engine_stats` on its
  :class:`~ap_vllm.engine.scheduler.EngineState`, which puts what changed since the last call into
  the ``attentionpack`` field of that ``SchedulerStats`` (vLLM drains its own prefix-cache counters
  the same way). The field itself is declared on the dataclass by :mod:`ap_vllm.compat` in every
  process, so vLLM's msgpack (de)serializer carries it.
* API server: :class:`AttentionPackStatLogger`, a stat logger plugin (entry point group
  ``vllm.stat_logger_plugins``, which ``AsyncLLM`` loads for ``vllm serve``), adds the deltas to
  ``prometheus_client`` metrics in the registry vLLM's ``/metrics`` exposes. Deltas (not totals)
  keep the counters right when several API servers each receive part of the steps
  (``--api-server-count``: vLLM then uses prometheus multiprocess mode, which sums them).

Side effect of any stat logger plugin: vLLM keeps engine statistics on even with
``--disable-log-stats`` (its default logging logger stays off).
"""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import Counter, Gauge

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from ap_vllm.config import model_layers
from ap_vllm.engine.spec import AttentionPackSpec
from ap_vllm.selection import SCHEDULER_STATS_FIELD as STATS_FIELD
from ap_vllm.selection import is_selected

METRIC_PREFIX = "attentionpack:"


# ----------------------------------------------------------------------- engine-core side
def block_bytes(kv_cache_config: Any, vllm_config: Any = None) -> int:
    """KV bytes one freed block returns on all workers together: page size x layers of its KV-cache group.

    vLLM sizes KV-cache groups alike, so every compacted group gives the same number; the
    largest is taken should they differ. The scheduler's ``kv_cache_config`` is one worker's: one
    tensor-parallel rank's heads, the first pipeline stage's layers. Every tensor-parallel rank frees the same
    block of its own pages (x the TP size); the other stages are counted at the first stage's rate per model
    layer (exact when a stage's compacted layers are in proportion to its layers, as in a plain decoder).
    """
    sizes = [g.kv_cache_spec.page_size_bytes * len(g.layer_names)
             for g in getattr(kv_cache_config, "kv_cache_groups", ()) or ()
             if isinstance(g.kv_cache_spec, AttentionPackSpec)]
    size = max(sizes, default=0)
    if vllm_config is not None:
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        size = size * parallel.tensor_parallel_size * model_layers(model) // model.get_num_layers(parallel)
    return size


def take_engine_stats(state) -> Optional[dict[str, float]]:
    """What changed in ``state`` (the scheduler's :class:`~ap_vllm.engine.scheduler.EngineState`)
    since the last call, for the ``attentionpack`` field of ``SchedulerStats``; None when nothing did
    (the field then stays None and costs nothing on the wire). Records what it reported in ``state``."""
    delta_tokens = state.tokens_compacted - state.reported_tokens_compacted
    delta_blocks = state.blocks_freed - state.reported_blocks_freed
    delta_queries = state.span_queries - state.reported_span_queries
    delta_hits = state.span_hits - state.reported_span_hits
    delta_reused = state.span_tokens_reused - state.reported_span_tokens_reused
    if not delta_tokens and not delta_blocks and not delta_queries and not delta_hits and not delta_reused:
        return None
    out = {
        "tokens_compacted": float(delta_tokens),
        "blocks_freed": float(delta_blocks),
        "bytes_saved": float(delta_blocks * state.block_bytes),
        "compaction_ratio": state.span_blocks / state.compact_blocks if state.compact_blocks else 0.0,
        "span_cache_queries": float(delta_queries),
        "span_cache_hits": float(delta_hits),
        "span_cache_tokens": float(delta_reused),
    }
    state.reported_tokens_compacted, state.reported_blocks_freed = state.tokens_compacted, state.blocks_freed
    state.reported_span_queries, state.reported_span_hits = state.span_queries, state.span_hits
    state.reported_span_tokens_reused = state.span_tokens_reused
    return out


# ----------------------------------------------------------------------- API-server side
def _unregister_ours() -> None:
    """Drop our collectors from the default registry (a second engine in one process)."""
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(METRIC_PREFIX):
            REGISTRY.unregister(collector)


class AttentionPackStatLogger(AggregateStatLoggerBase):
    """vLLM stat logger plugin: exports the ``attentionpack`` field of each ``SchedulerStats``.

    Registers nothing unless AttentionPack is the selected attention backend.
    """

    def __init__(self, vllm_config: Any, engine_indexes: Optional[list[int]] = None) -> None:
        self.engine_indexes = list(engine_indexes or [0])
        self.enabled = is_selected(getattr(vllm_config.attention_config, "backend", None))
        if not self.enabled:
            return
        _unregister_ours()
        labelnames = ["model_name", "engine"]
        model_name = vllm_config.model_config.served_model_name

        def per_engine(metric):
            return {idx: metric.labels(model_name, str(idx)) for idx in self.engine_indexes}

        self.tokens_compacted = per_engine(Counter(
            name="attentionpack:tokens_compacted",
            documentation="Span tokens (visual, or old text with compact_text) whose exact K/V were compacted.",
            labelnames=labelnames))
        self.blocks_freed = per_engine(Counter(
            name="attentionpack:blocks_freed",
            documentation="KV-cache blocks returned to the pool after their span was compacted.",
            labelnames=labelnames))
        self.bytes_saved = per_engine(Gauge(
            name="attentionpack:bytes_saved",
            documentation="KV-cache bytes returned to the pool by compaction since start "
                          "(blocks freed x bytes per block over the layers of its KV-cache group).",
            multiprocess_mode="sum", labelnames=labelnames))
        self.compaction_ratio = per_engine(Gauge(
            name="attentionpack:compaction_ratio",
            documentation="Blocks of the exact spans / blocks of their compact form, over every span "
                          "compacted so far (0 before the first).",
            multiprocess_mode="mostrecent", labelnames=labelnames))
        self.span_cache_queries = per_engine(Counter(
            name="attentionpack:span_cache_queries",
            documentation="Compacted spans of requests admitted with prefix caching on (each admission, "
                          "resumptions after a preemption included).",
            labelnames=labelnames))
        self.span_cache_hits = per_engine(Counter(
            name="attentionpack:span_cache_hits",
            documentation="Compacted spans whose compact form came from the prefix cache (their prefill and "
                          "compaction were skipped).",
            labelnames=labelnames))
        self.span_cache_tokens = per_engine(Counter(
            name="attentionpack:span_cache_tokens",
            documentation="Span tokens of those hits (prefilled and compacted once, served from the cache).",
            labelnames=labelnames))

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        stats = getattr(scheduler_stats, STATS_FIELD, None) if self.enabled else None
        if not stats or engine_idx not in self.tokens_compacted:
            return
        self.tokens_compacted[engine_idx].inc(stats.get("tokens_compacted", 0.0))
        self.blocks_freed[engine_idx].inc(stats.get("blocks_freed", 0.0))
        self.bytes_saved[engine_idx].inc(stats.get("bytes_saved", 0.0))
        self.span_cache_queries[engine_idx].inc(stats.get("span_cache_queries", 0.0))
        self.span_cache_hits[engine_idx].inc(stats.get("span_cache_hits", 0.0))
        self.span_cache_tokens[engine_idx].inc(stats.get("span_cache_tokens", 0.0))
        if "compaction_ratio" in stats:
            self.compaction_ratio[engine_idx].set(stats["compaction_ratio"])

    def log_engine_initialized(self) -> None:
        pass
