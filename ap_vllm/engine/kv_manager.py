"""Which blocks of a request go back to vLLM's pool once its spans are compacted (engine-core process).

:class:`AttentionPackManager` (paired with :class:`~ap_vllm.engine.spec.AttentionPackSpec` in
vLLM's KV-cache-spec registry) frees, per request, the blocks of each span past its compact form
as soon as the step that compacted it has been processed (``processed_computed_tokens >= span
end``). Like vLLM's sliding-window managers it replaces them with the null block, so the block
table stays positional; the freed blocks are ordinary free blocks of the pool, so vLLM's own KV
usage and admission see the saving. vLLM admits a request only when its whole sequence fits
(``scheduler_reserve_full_isl``); the manager reports instead what the request holds at most while
its spans (chunks of a long video) are compacted on the way
(:func:`ap_vllm.core.spans.admission_blocks`), plus what the compacting prefills already in flight
still need, so a pool that could not hold one more exact video admits it without taking blocks
another prefill counts on.

Prefix caching (vLLM's rules: LRU over free blocks, reference counts). The request's block hashes are
the effective hashes of :mod:`ap_vllm.engine.prefix_cache`. :meth:`AttentionPackManager.cache_blocks`
caches a span's compact-form blocks only once the step that compacts it is scheduled, never its freed
blocks, and nothing from a span on when spans are not shared (``value_selection: ema``);
:meth:`AttentionPackManager.find_longest_cache_hit` walks the hashes like vLLM's full-attention
manager, with the null block at freed positions, and never ends a hit inside a span.

A manager sees only request ids and token counts. Each request's span candidates, the
configuration and the counters live in the scheduler's :class:`~ap_vllm.engine.scheduler.EngineState`,
which the scheduler hands to its managers (:meth:`AttentionPackManager.attach`); a manager without
it frees nothing.

:func:`check_request_fits` is the API server's side of ``pool_check: compacted``.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

from vllm.logger import init_logger
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from ap_vllm import compat
from ap_vllm.config import AttentionPackConfig
from ap_vllm.core.spans import SpanPlan, admission_blocks, lifetime_blocks
from ap_vllm.engine.prefix_cache import SpanBlockHash, allowed_hit_blocks, shares_compact_spans, span_end_hit
from ap_vllm.engine.spec import AttentionPackSpec, kv_geometry, request_candidates, step_lag_tokens

logger = init_logger("vllm.attentionpack")


def request_blocks_needed(vllm_config: Any, config: AttentionPackConfig, mm_features, num_prompt_tokens: int,
                          max_tokens: int) -> tuple[int, int]:
    """(most blocks the request holds at any time with compaction, blocks of its exact KV)."""
    bs = vllm_config.cache_config.block_size
    plans = request_candidates(mm_features, num_prompt_tokens).plans(config, kv_geometry(vllm_config, bs))
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


class AttentionPackManager(FullAttentionManager):
    """Frees the blocks of compacted spans, and caches and finds them (see the module docstring)."""

    # Hits land on whole blocks: a hash unit inside a block could end a hit inside a span.
    supports_fine_grained_hash_lookup = False

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.state = None  # the scheduler's EngineState (ap_vllm.engine.scheduler), see attach()
        self._plans: dict[str, list[SpanPlan]] = {}
        self._compacting: set[str] = set()  # requests with spans still prefilling (see _in_flight_reserve)
        self._admitted: set[str] = set()  # requests holding blocks (their spans counted as prefix-cache queries)

    def attach(self, state) -> None:
        """Use the scheduler's :class:`~ap_vllm.engine.scheduler.EngineState` (its requests' spans, the
        configuration, the counters)."""
        self.state = state

    def plans_for(self, request_id: str) -> list[SpanPlan]:
        """The request's span plans in this group's geometry (the rule the backend uses), once per admission."""
        plans = self._plans.get(request_id)
        if plans is None:
            state = self.state
            spans = state.requests.get(request_id) if state is not None else None
            if spans is None or state.config is None:
                return []
            plans = self._plans[request_id] = spans.plans(state.config, self.kv_cache_spec.geometry(state.num_layers, state.model_dtype))
            if plans:
                self._compacting.add(request_id)
        return plans

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks, total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False, prefill_end: int = 0) -> int:
        reserve = 0
        if apply_admission_cap:  # the full-sequence admission gate: what the request holds at most
            plans = self.plans_for(request_id)
            if plans:
                row = self.req_to_blocks.get(request_id, ())
                num_tokens = min(num_tokens, self._peak_blocks(request_id, num_tokens, new_computed_blocks)
                                 * self.block_size)
                if not row:  # a new request: also leave what compacting prefills in flight still need
                    reserve = self._in_flight_reserve(request_id)
        return reserve + super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens,
            num_tokens_main_model, apply_admission_cap=apply_admission_cap, prefill_end=prefill_end)

    def _peak_blocks(self, request_id: str, num_tokens: int, hit: Sequence = ()) -> int:
        """Logical blocks the request holds at most; ``hit``: prefix-cache blocks it is about to take
        (the null block where a cached span's blocks were freed)."""
        row = list(self.req_to_blocks.get(request_id, ())) + list(hit)
        null = compat.null_block(self)
        return admission_blocks(self.plans_for(request_id), num_tokens, self.block_size,
                                self.state.step_lag_tokens, held_blocks=len(row),
                                freed_blocks=sum(b is null for b in row))

    def _in_flight_reserve(self, request_id: str) -> int:
        """Blocks the other requests with compacting spans still need to finish their prefill. Their
        admission counted on blocks their spans free later; a new request admitted against today's
        free blocks would take them (vLLM's gate reserves nothing for prefills in flight, which for
        exact requests matters less: their full length was free when they were admitted)."""
        total = 0
        for rid in self._compacting:
            spans, row = self.state.requests.get(rid), self.req_to_blocks.get(rid)
            if rid == request_id or spans is None or not row:
                continue
            total += max(0, self._peak_blocks(rid, spans.num_prompt_tokens) - len(row))
        return total

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: Optional[int] = None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        blocks = self.req_to_blocks.get(request_id)
        if not blocks or self.state is None:
            return
        state, plans = self.state, self.plans_for(request_id)
        spans = state.requests.get(request_id)
        if spans is None or processed_computed_tokens >= spans.num_prompt_tokens:
            self._compacting.discard(request_id)  # prefill done: nothing more to reserve for it
        null = compat.null_block(self)
        for plan in plans:
            lo, hi = plan.freed_blocks
            if plan.end <= processed_computed_tokens and hi <= len(blocks) and blocks[hi - 1] != null:
                compat.remove_blocks_in_range(self, request_id, lo, hi)
                state.tokens_compacted += plan.num_tokens
                state.blocks_freed += hi - lo
                state.span_blocks += plan.inner_blocks
                state.compact_blocks += plan.storage_blocks
                logger.debug("AttentionPack: request %s: %s span [%d, %d) compacted, %d blocks freed",
                             request_id, plan.kind, plan.start, plan.end, hi - lo)

    # ------------------------------------------------------------------ prefix caching
    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length: int, kv_cache_group_ids: list[int], block_pool,
                               kv_cache_spec, drop_eagle_block: bool, alignment_tokens: int,
                               dcp_world_size: int = 1, pcp_world_size: int = 1):
        """vLLM's full-attention walk over the effective hashes: the longest run of cached blocks from the
        start, the null block at the freed positions of a cached span, then cut back so the hit never ends
        inside a span (:func:`~ap_vllm.engine.prefix_cache.allowed_hit_blocks`)."""
        bs = kv_cache_spec.block_size
        computed: tuple[list, ...] = tuple([] for _ in kv_cache_group_ids)
        null = block_pool.null_block
        for block_hash in itertools.islice(block_hashes, max_length // bs):
            if isinstance(block_hash, SpanBlockHash) and not block_hash.stored:
                for blocks in computed:
                    blocks.append(null)
                continue
            cached = block_pool.get_cached_block(block_hash, kv_cache_group_ids)
            if not cached:
                break
            for blocks, block in zip(computed, cached):
                blocks.append(block)
        walked = hit = len(computed[0])
        if drop_eagle_block and hit > 0:
            hit -= 1
        hit = allowed_hit_blocks(block_hashes, hit)
        hit -= hit % max(1, alignment_tokens // bs)  # alignment_tokens is a multiple of the block size here
        hit = allowed_hit_blocks(block_hashes, hit)
        tokens = hit * bs
        end = None if drop_eagle_block else span_end_hit(block_hashes, walked, max_length)
        if end is not None and end > tokens:  # the whole span, up to its end inside the next block
            hit, tokens = walked, end
        for blocks in computed:
            del blocks[hit:]
        return computed, tokens

    def _has_partial_local_hit(self, new_computed_blocks, num_local_computed_tokens: int) -> bool:
        """vLLM copies the shared tail block of a hit that ends inside a block (copy on write). Ours end inside a
        block only at a span's end (:func:`~ap_vllm.engine.prefix_cache.span_end_hit`), and then the hit holds no
        part of that block: the request writes the rest of it into a block of its own."""
        return False

    def cache_blocks(self, request, num_tokens: int, retention_interval: Optional[int] = None, *,
                     replay_boundaries: Sequence[int] = ()) -> None:
        """vLLM's caching of full blocks, except: a span's blocks (and everything after it) only once the step
        that completes the span has run (``request.num_computed_tokens``: tokens whose KV was final before this
        step). Until then they hold its exact KV, not the compact form the hashes name: in the completing step
        itself the compaction runs after that step's attention, so a request admitted in the same step on such
        a hit would read exact KV as coefficients (vLLM's exact blocks can be hit in the step that writes them,
        since each layer writes before it attends). Never the freed positions; nothing from the first span on
        when spans are not shared."""
        if not self.kv_cache_spec.prefix_cacheable:
            return
        rid = request.request_id
        plans = self.plans_for(rid)
        if not plans:
            return super().cache_blocks(request, num_tokens, retention_interval, replay_boundaries=replay_boundaries)
        bs, state = self.block_size, self.state
        shared = state is None or state.config is None or shares_compact_spans(state.config)
        limit, final = num_tokens, min(num_tokens, request.num_computed_tokens)
        for plan in plans:
            if plan.end > final or not shared:
                limit = min(limit, plan.first_block * bs)
                break
        num_cached = self.num_cached_block.get(rid, 0)
        num_full = min(limit // bs, len(request.block_hashes))
        if num_cached >= num_full:
            return
        freed = {b for p in plans for b in range(*p.freed_blocks)}
        self.block_pool.cache_full_blocks(
            request=request, blocks=self.req_to_blocks[rid], num_cached_blocks=num_cached,
            num_full_blocks=num_full, block_size=bs, kv_cache_group_id=self.kv_cache_group_id,
            block_mask=[b not in freed for b in range(num_cached, num_full)])
        self.num_cached_block[rid] = num_full

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks, num_local_computed_tokens: int,
                                  num_external_computed_tokens: int) -> None:
        """vLLM's (called for a hit only), and the compact-span hit counters: a span whose compact form came
        from the cache is a hit."""
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        self._count_queries(request_id)
        state = self.state
        if self.enable_caching and state is not None:
            hits = [p for p in self.plans_for(request_id) if p.end <= num_local_computed_tokens]
            state.span_hits += len(hits)
            state.span_tokens_reused += sum(p.num_tokens for p in hits)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        self._count_queries(request_id)
        return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def _count_queries(self, request_id: str) -> None:
        """Every span of a request admitted with prefix caching on is a query (first admission, and each
        resumption after a preemption: both look the prefix cache up)."""
        if request_id in self._admitted:
            return
        self._admitted.add(request_id)
        if self.enable_caching and self.state is not None:
            self.state.span_queries += len(self.plans_for(request_id))

    def pop_blocks_for_free(self, request_id: str):
        self._plans.pop(request_id, None)
        self._compacting.discard(request_id)
        self._admitted.discard(request_id)
        return super().pop_blocks_for_free(request_id)


def register_kv_cache_spec() -> None:
    """Pair the spec with its manager in vLLM's registry (vLLM's own specs first)."""
    compat.ensure_builtin_kv_cache_specs()
    KVCacheSpecRegistry.register(AttentionPackSpec, AttentionPackManager, uniform_type_base_spec=FullAttentionSpec)
