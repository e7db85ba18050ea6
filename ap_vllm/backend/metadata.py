"""Per-step plan of the AttentionPack backend: the metadata builder does all host work once per step.

vLLM calls :meth:`AttentionPackMetadataBuilder.build` once per step and KV-cache group and hands the
result to every layer of the group; the impl's ``forward`` then only writes the cache and launches
kernels (:mod:`ap_vllm.backend.attentionpack`). The builder

* splits the batch into decode rows (one query, no span completing in this step) and the other rows
  (prefill, chunked prefill, a span completing, a speculative-decoding verification row: the last token and
  its ``k`` drafts). It asks vLLM to put decode rows first
  (``reorder_batch_threshold = 1``), so decode queries are usually the batch's first rows. Among the other
  rows the fresh ones (a prompt's first chunk: no history, no span, :mod:`ap_vllm.core.exact_rows`) come last,
  so the others are a prefix of the same buffers (the kernel path runs the fresh rows through SDPA);
* takes host lengths from what vLLM already has on the host (``query_start_loc_cpu``,
  ``seq_lens_cpu_upper_bound``: exact unless drafts are scheduled asynchronously, which
  :func:`ap_vllm.config.check_speculative` refuses); no device-to-host copy;
* plans each request's spans with :mod:`ap_vllm.core.spans` (the rule the scheduler frees blocks by),
  from the request candidates the runner hook hands it (:mod:`ap_vllm.backend.channel`);
* per *layout key* (the ranks of a layer: layers with equal keys lay their spans out alike) builds the
  decode plan (span metadata, importance index, threshold ranks; reused across steps while the decode
  batch is the same requests in the same order), the prefill plan and the list of spans to compact;
* writes per-row lengths and lse slots into persistent device buffers, filled from (pinned) host
  buffers with one copy each.

Span rule, per row with ``n`` queries ending at ``L = seq_len``: a span with ``end <= L - n`` is
compacted (read in coefficient space); ``L - n < end <= L`` completes in this step (attended
exactly, compacted after the attention); later spans are not in the cache yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Optional

import numpy as np
import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec

from ap_vllm.backend.channel import StepRequests, slot_capacity
from ap_vllm.config import (AttentionPackConfig, AttentionPackConfigError, config_from_vllm, layer_index,
                            model_layers)
from ap_vllm.core.batched_decode import BatchedDecodePlan, advance_batched_decode_plan, build_batched_decode_plan
from ap_vllm.core.dense import mm_prefix_reach
from ap_vllm.core.lowrank_attention import threshold_ranks
from ap_vllm.core.paged_decode import DecodePlan, PrefillPlan, build_decode_plan, build_prefill_plan
from ap_vllm.core.paged_layout import PagedSpan, SpanLayout, coeff_rows_per_block, importance_index
from ap_vllm.core.spans import KVGeometry, SpanPlan, min_freeing_span, span_layout
from ap_vllm.engine.spec import AttentionPackSpec, RequestSpans

logger = init_logger("vllm.attentionpack")

LayoutKey = tuple[int, int, int, int]
"""A layer's (key rank, value rank) for visual spans and for text spans."""
_KEY_FIELDS = ("key_rank", "value_rank", "text_key_rank", "text_value_rank")  # (the fields behind a LayoutKey)

_SLOT_SHIFT = 32


def _two_level(cfg: AttentionPackConfig, kind: str = "visual") -> Optional[float]:
    """``PagedSpan.threshold`` of a decode span: 0.0 (a placeholder: the two-level read is on, the layer's
    thresholds replace it) or None (all full rank). Score selection (``value_selection: score``) always reads
    two levels; importance selection unless ``importance_fraction`` is 1; ``full`` never. Text spans read at
    full rank unless ``text_two_level``."""
    if (kind == "text" and not cfg.text_two_level) or cfg.value_selection == "full":
        return None
    return 0.0 if cfg.value_selection == "score" or cfg.importance_fraction < 1.0 else None


def _reads_full_rank(cfg: AttentionPackConfig) -> bool:
    """Every span kind this configuration compacts reads every token at full rank: the static plan's
    ``full_rank``, fixed by the configuration (not by the spans a step holds) so that a captured CUDA graph's
    span launch is the one every later step needs."""
    return _two_level(cfg, "visual") is None and (not cfg.compact_text or _two_level(cfg, "text") is None)


@dataclass
class LseSlots:
    """Where the rows' last-query lse lives in a layer's slot buffer, and the tags that make it valid."""

    slot: torch.Tensor  # int64 [rows], scratch row (= capacity) for requests without a slot
    expect: torch.Tensor  # int64 [rows]: tag of the previous step's entry (generation << 32 | seq_len - 1)
    store: torch.Tensor  # int64 [rows]: tag written with this step's lse
    capacity: int


@dataclass
class DecodeStep:
    """One layout key's view of the step's decode rows (shared by the layers with that key)."""

    plan: Optional[DecodePlan]  # the kernels' span metadata (thresholds replaced per layer with the two-level
    # read); None on the torch path
    has_spans: bool
    importance: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # index, mask, threshold ranks
    batched: Optional[BatchedDecodePlan]  # the torch path's plan (None on the kernel path)
    num_spans: Optional[torch.Tensor] = None  # static launch: int32 [1], the real span count of plan.meta


@dataclass
class Decode:
    """The step's decode rows (one query each, no span completing)."""

    num_rows: int
    q_idx: Optional[torch.Tensor]  # query token of each row; None = tokens [0, num_rows)
    block_table: torch.Tensor  # [rows, max_blocks]
    seq_lens: torch.Tensor  # int32 [rows] (a view of a persistent buffer)
    max_seq_len: int
    lse: LseSlots
    steps: dict  # layout key (None: no spans) -> DecodeStep
    static: bool = False  # launches depend on buffer shapes only (CUDA-graph safe), see _StaticSpans


@dataclass
class PrefillStep:
    plan: Optional[PrefillPlan]  # the kernels' plan of the spans compacted in earlier steps (None: none / torch)
    spans: list  # those spans (PagedSpan, seq = prefill row)
    completing: list  # (block-table row tensor, SpanPlan, SpanLayout): compacted after this step's attention


@dataclass
class Prefill:
    """The step's other rows (longer queries, or a span completing)."""

    q_slice: slice  # their query tokens, when contiguous in the batch
    q_idx: Optional[torch.Tensor]  # else the token indices
    block_table: torch.Tensor
    query_start_loc: torch.Tensor  # int32 [rows + 1], over the rows' own tokens
    seq_lens: torch.Tensor  # int32 [rows]
    max_query_len: int
    max_seq_len: int
    last_rows: torch.Tensor  # each row's last query among the rows' tokens
    lse: LseSlots
    steps: dict  # layout key (None: no spans) -> PrefillStep
    host_query_start_loc: list  # the same on the host (the torch path)
    host_seq_lens: list
    # the last ``num_fresh`` rows are fresh (query length = sequence length: a prompt's first chunk), the others
    # come first; the bounds of those (the exact kernel's launch when the fresh rows go to SDPA). Rows with
    # history but no compacted span could go to SDPA too (ap_vllm.core.exact_rows: causal to the bottom right);
    # they stay on the exact kernel until that SDPA path is measured on a GPU (gpu_check's served SDPA rows).
    num_fresh: int = 0
    rest_max_query_len: int = 0
    rest_max_seq_len: int = 0
    # int32 [the rows' tokens]: the last key position of each query, where some query of a row sees later keys
    # (a multimodal item attended both ways: vLLM's is_mm_prefix_lm, CommonAttentionMetadata.mm_req_doc_ranges;
    # such rows are never fresh); None: every query causal
    reach: Optional[torch.Tensor] = None


@dataclass
class StepCompaction:
    """The spans completing in this step, queued by every layer and compacted together at the end of the
    step's last layer (``last_layer``; a runner that drives only some layers, a test, calls
    ``AttentionPackImpl.finish_step``): one batched factorisation for all layers instead of one per layer (on an
    H200 the Gram method's launches are latency-bound: one layer's 4K-token span takes 3.1 ms alone, 0.27 ms
    per layer with 28 layers in one call). ``jobs``: one per layer that queued spans (host objects, no data)."""

    last_layer: str
    jobs: list = field(default_factory=list)


@dataclass
class AttentionPackMetadata:
    """What every layer of a KV-cache group needs in one step (built once by the builder)."""

    num_actual_tokens: int
    num_reqs: int
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, -1 = padding
    decode: Optional[Decode]
    prefill: Optional[Prefill]
    layer_keys: dict = field(default_factory=dict)  # layer name -> layout key (layers whose spans are planned)
    lse_buffers: dict = field(default_factory=dict)  # layer name -> (lse [capacity + 1, Hq], tag [capacity + 1])
    compaction: Optional[StepCompaction] = None  # spans completing in this step (None: none, or compact at once)
    value_selection: Optional[str] = None  # how decode rows read spans (None: the layer's configuration)

    @property
    def mm_prefix_range_tensor(self) -> Optional[torch.Tensor]:
        """The prefill queries' reach (``Prefill.reach``) under the name vLLM's backends give their multimodal
        prefix ranges. A model that attends images both ways in some layers only clears it in the metadata of
        the others before its forward: Gemma 4 (``use_bidirectional_attention: vision``) sets it to None for its
        global layers, which attend causally (``gemma4_mm._clear_mm_prefix_for_full_attn_layers``)."""
        return None if self.prefill is None else self.prefill.reach

    @mm_prefix_range_tensor.setter
    def mm_prefix_range_tensor(self, value: Optional[torch.Tensor]) -> None:
        if value is not None:
            raise ValueError("the multimodal prefix ranges come from the builder; a model may only clear them")
        if self.prefill is not None:
            self.prefill.reach = None


class _StaticSpans:
    """Persistent span metadata of one layout key for static decode launches (CUDA graphs).

    ``meta`` [S_cap, META] int64 and ``seq_spans`` [rows_cap, W] int32 (-1 = none) are filled from pinned
    host copies; ``num_spans`` [1] int32 says how many meta rows are real. Capacities are bounds, fixed at
    start-up: rows_cap = max_num_seqs, W = the most spans a request can hold (max_model_len / the shortest
    span that frees a block), S_cap = rows_cap * W. Rows past ``num_spans`` are zeroed (no tokens)."""

    def __init__(self, rows: int, width: int, device, pin: bool, rows_per_block: tuple = ()) -> None:
        from ap_vllm.core.paged_layout import META_FIELDS

        self.rows, self.width, self.cap = rows, width, rows * width
        self.rows_per_block = rows_per_block  # (DecodePlan.rows_per_block of every plan made from these buffers)
        self.meta_host = torch.zeros(self.cap, len(META_FIELDS), dtype=torch.int64, pin_memory=pin)
        self.seq_host = torch.full((rows, width), -1, dtype=torch.int32, pin_memory=pin)
        self.n_host = torch.zeros(1, dtype=torch.int32, pin_memory=pin)
        self.meta = torch.zeros_like(self.meta_host, device=device)
        self.seq_spans = torch.full((rows, width), -1, dtype=torch.int32, device=device)
        self.num_spans = torch.zeros(1, dtype=torch.int32, device=device)
        self.thresholds = torch.full((self.cap,), float("-inf"), device=device)
        # the decode instances (span s, its row, 1), as the kernels would build them from meta each call
        self.inst_host = torch.stack([torch.arange(self.cap, dtype=torch.int32),
                                      torch.zeros(self.cap, dtype=torch.int32),
                                      torch.ones(self.cap, dtype=torch.int32)], 1)
        if pin:
            self.inst_host = self.inst_host.pin_memory()
        self.inst = self.inst_host.to(device)
        self.filled = 0  # meta rows written last time (cleared on the next fill)

    def fill(self, spans: list, num_rows: int) -> None:
        from ap_vllm.core.paged_layout import span_metadata

        n = len(spans)
        if n > self.cap or num_rows > self.rows:
            raise RuntimeError(f"AttentionPack: {n} spans over {num_rows} decode rows exceed the static capacity "
                               f"({self.cap} spans, {self.rows} rows)")
        self.meta_host[: max(n, self.filled)].zero_()
        self.inst_host[: max(n, self.filled), 1] = 0
        if n:
            self.meta_host[:n] = span_metadata(spans)[0]
            self.inst_host[:n, 1] = torch.tensor([sp.seq for sp in spans], dtype=torch.int32)
        self.filled = n
        self.seq_host.fill_(-1)
        per_row: dict[int, int] = {}
        for i, sp in enumerate(spans):
            j = per_row.get(sp.seq, 0)
            if j >= self.width:
                raise RuntimeError(f"AttentionPack: a request holds more than {self.width} spans (static capacity)")
            self.seq_host[sp.seq, j] = i
            per_row[sp.seq] = j + 1
        self.n_host[0] = n
        self.meta.copy_(self.meta_host, non_blocking=True)
        self.seq_spans.copy_(self.seq_host, non_blocking=True)
        self.num_spans.copy_(self.n_host, non_blocking=True)
        self.inst.copy_(self.inst_host, non_blocking=True)


def kv_sharing_targets(vllm_config: VllmConfig, layer_names: list[str]) -> dict[str, str]:
    """The layers of ``layer_names`` that read another layer's KV cache (vLLM's cross-layer KV sharing: Gemma 3n,
    Gemma 4 E2B / E4B), each with the layer whose pages it reads. vLLM gives such a layer no cache of its own and
    adds it to its target's KV-cache group, so the group's builder hands it the same metadata."""
    from vllm.config import get_layers_from_vllm_config

    layers = get_layers_from_vllm_config(vllm_config, torch.nn.Module, layer_names)
    return {name: target for name, layer in layers.items()
            if (target := getattr(layer, "kv_sharing_target_layer_name", None))}


class AttentionPackMetadataBuilder(AttentionMetadataBuilder[AttentionPackMetadata]):
    """Plans each step (see the module docstring).

    CUDA graphs: uniform single-token decode batches are captured whole on the kernel path. Their launches
    are static: all rows are decode rows in batch order (padding rows: length 0), span metadata sits in
    persistent buffers sized by start-up bounds (:class:`_StaticSpans`), exact keys are split for
    max_model_len, and every compacted layer launches the span kernels, the thresholds and the importance
    update whatever the step holds (empty spans do nothing), so a graph captured on a dummy batch replays any
    decode batch of its size. With ``value_selection: score`` there are no thresholds and no importance
    update (fixed by the configuration, so the captured launches are still the same every step); the span
    kernel selects values from the step's scores and the previous step's lse, read from the slot buffers.
    With ``full`` nothing is selected: no thresholds, no importance, no lse kept.
    A one-token prompt chunk that completes a span must compact it in that step: the runner hook runs such a
    step eagerly (:func:`ap_vllm.backend.channel.needs_eager_step`)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        config = config_from_vllm(vllm_config)
        if config.kernel in ("torch", "cuda"):  # the torch path is CPU only; the CUDA C++ span launch is dynamic
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # (speculative decoding: ngram, EAGLE and MTP drafters, without async scheduling; config_from_vllm refuses the
        # rest)
        self.config: AttentionPackConfig = config_from_vllm(vllm_config)
        model = getattr(vllm_config, "model_config", None)
        num_layers = model_layers(model) if model is not None else 1
        # A drafter's builder (an EAGLE or MTP head: its layers numbered after the model's, config.layer_index): its
        # spans are compacted with the model's, and its rows read them at full rank. Its passes after the first are
        # decode rows whose host lengths are upper bounds (every draft assumed accepted): nothing is selected by a
        # previous lse there.
        # The model runner's builder of that group lists the drafter's layers too, but its metadata never reaches
        # them (the proposer builds its own): each builder plans, and compacts after, its own side's layers only.
        index = {name: layer_index(name, num_layers) for name in layer_names}
        self.drafter = bool(layer_names) and all(i >= num_layers for i in index.values())
        planned = [n for n in layer_names if (index[n] >= num_layers) == self.drafter]
        if self.drafter:
            self.config = self.config.model_copy(update={"value_selection": "full"})
        self._draft_index = 0
        self._init_reorder_batch_threshold(1)
        self.use_kernels = self.config.use_triton(torch.device(device))
        self.block_size = kv_cache_spec.block_size
        self.window = getattr(kv_cache_spec, "sliding_window", None)
        self.geometry: Optional[KVGeometry] = None
        self.layer_keys: dict[str, LayoutKey] = {}
        self._key_layer: dict[LayoutKey, int] = {}
        self._last_layer = ""  # the layer that runs last in a step (highest index): it compacts the step's spans
        self._compaction: Optional[StepCompaction] = None  # the last step's, checked at the next build
        self.reads_compacted_spans = False  # (set below for the readers of vLLM's KV-sharing fast prefill)
        if isinstance(kv_cache_spec, AttentionPackSpec) and self.config.enabled:
            self.geometry = kv_cache_spec.geometry(num_layers, getattr(model, "dtype", None) or kv_cache_spec.dtype)
            # A layer sharing another's KV cache reads its target's pages, laid out and compacted at the target's
            # ranks (the target compacts them; the sharing layer never does): it takes the target's layout key.
            sharing = kv_sharing_targets(vllm_config, planned)
            # vLLM's KV-sharing fast prefill gives the trailing layers that read others' KV caches a builder of their
            # own (a subclass of this one, fed one query row per request): every layer that owns those pages runs
            # before them, so a span completing in a step is already compact when they read it
            cache_config = getattr(vllm_config, "cache_config", None)
            self.reads_compacted_spans = (bool(getattr(cache_config, "kv_sharing_fast_prefill", False))
                                          and bool(planned) and all(name in sharing for name in planned))
            for name in planned:
                idx = index[name]
                key = self._layer_key(idx)
                target = sharing.get(name)
                if target is not None:
                    t = layer_index(target, num_layers)
                    own, key = key, self._layer_key(t)
                    for field_name, mine, theirs in zip(_KEY_FIELDS, own, key):
                        if mine != theirs:
                            raise AttentionPackConfigError(
                                f"attentionpack.{field_name}: layer {idx} ({name}) reads the KV cache of layer {t}, "
                                f"whose spans are compacted at that layer's ranks; its own entry ({mine}) cannot "
                                f"apply. Give it the same rank as layer {t} ({theirs})")
                self.layer_keys[name] = key
                self._key_layer.setdefault(key, idx)
                if not self._last_layer or idx > index[self._last_layer]:
                    self._last_layer = name
            kinds = ("visual", "text") if self.config.compact_text else ("visual",)
            shortest = {kind: min_freeing_span(self.config, self.geometry, kind) for kind in kinds}
            logger.info_once(
                "AttentionPack compaction: with block size %d, the shortest %s that frees memory: %s tokens; "
                "shorter spans stay exact (smaller --block-size or ranks free more).", self.geometry.block_size,
                " / ".join(f"{k} span" for k in kinds), " / ".join(str(v or "none") for v in shortest.values()))
        sched = getattr(vllm_config, "scheduler_config", None)
        self.capacity = slot_capacity(getattr(sched, "max_num_seqs", 256) or 256)
        self._step: Optional[StepRequests] = None
        self._plans_cache: dict[RequestSpans, list[SpanPlan]] = {}
        self._layouts: dict[tuple, SpanLayout] = {}
        self._decode_cache: tuple = (None, None)  # (batch key, {layout key: DecodeStep}) of the last decode batch
        self._epoch: dict[str, int] = {}  # per request: bumped by every non-decode row (its blocks may change)
        self._compacted: dict[str, int] = {}  # (reads_compacted_spans) per request: its spans read compact
        self._rows = 0
        self.max_num_seqs = max(8, getattr(sched, "max_num_seqs", 8) or 8)
        self._alloc(self.max_num_seqs)
        self.max_model_len = getattr(model, "max_model_len", None) or 1 << 16
        self.num_q_heads = model.get_num_attention_heads(vllm_config.parallel_config) if model is not None else None
        self._static: dict = {}
        # static decode launches (CUDA-graph safe): the Triton kernels; the CUDA C++ span launch is dynamic
        self.graph_safe = self.use_kernels and self.config.kernel != "cuda"
        if self.graph_safe and self.geometry is not None:
            shortest = [n for n in (min_freeing_span(self.config, self.geometry, k) for k in ("visual", "text")) if n]
            width = max(1, min(1024, -(-self.max_model_len // max(min(shortest, default=self.max_model_len),
                                                                 self.config.min_span_tokens))))
            self._static = {key: _StaticSpans(self.max_num_seqs, width, self.device, self._pin,
                                              self._rows_per_block(key)) for key in self._key_layer}
        self._lse_buffers: dict = {}

    def _layer_key(self, index: int) -> LayoutKey:
        """The layout key of the layer ``index``: its (key, value) ranks for visual and for text spans."""
        return tuple(self.config.rank_for_layer(w, index, text) for text in (False, True) for w in ("key", "value"))

    # ---- persistent buffers --------------------------------------------------------------
    def _alloc(self, rows: int) -> None:
        """Host (pinned on CUDA) and device buffers for ``rows`` rows: int32 lengths, int64 lse slot tags."""
        pin = self._pin = torch.device(self.device).type == "cuda"
        self._rows = rows
        self._i32_host = torch.zeros(3, rows + 1, dtype=torch.int32, pin_memory=pin)
        self._i64_host = torch.zeros(6, rows, dtype=torch.int64, pin_memory=pin)
        self._i32 = torch.zeros(3, rows + 1, dtype=torch.int32, device=self.device)
        self._i64 = torch.zeros(6, rows, dtype=torch.int64, device=self.device)

    def set_step_requests(self, step: Optional[StepRequests]) -> None:
        """The channel's hand-over (:mod:`ap_vllm.backend.channel`)."""
        self._step = step

    # ---- planning helpers ----------------------------------------------------------------
    def _plans(self, request: RequestSpans) -> list[SpanPlan]:
        plans = self._plans_cache.get(request)
        if plans is None:
            if len(self._plans_cache) > 4096:
                self._plans_cache.clear()
            plans = self._plans_cache[request] = request.plans(self.config, self.geometry)
        return plans

    def layout(self, key: LayoutKey, plan: SpanPlan) -> SpanLayout:
        """The compact form of a span in the layers with layout key ``key``."""
        k = (key, plan.num_tokens, plan.kind)
        lay = self._layouts.get(k)
        if lay is None:
            if len(self._layouts) > 4096:
                self._layouts.clear()
            lay = self._layouts[k] = span_layout(self.config, self.geometry, plan.num_tokens, self._key_layer[key],
                                                 plan.kind)
        return lay

    def _rows_per_block(self, key: LayoutKey) -> tuple:
        """Rows per block of the coefficient sections of every span kind the layers of ``key`` compact (a static
        plan's ``rows_per_block``: what any later step's spans there can hold)."""
        kinds = ("visual", "text") if self.config.compact_text else ("visual",)
        return coeff_rows_per_block([span_layout(self.config, self.geometry, 1, self._key_layer[key], kind)
                                     for kind in kinds])

    def _lse_slots(self, row: int, tags: np.ndarray, seq: np.ndarray, rows: np.ndarray) -> LseSlots:
        """Slot tags of ``rows`` into the int64 buffers ``row``..``row + 2``; one copy for all three."""
        n = len(rows)
        step = self._step
        slot, gen = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
        if step is not None:  # rows past the step's requests are padding: no slot
            known = rows < len(step.slots)
            slot[known], gen[known] = step.slots[rows[known]], step.generations[rows[known]]
        has = (slot >= 0) & (seq[rows] > 0)
        tags[row, :n] = np.where(has, slot, self.capacity)
        tags[row + 1, :n] = np.where(has, (gen << _SLOT_SHIFT) | (seq[rows] - 1), -1)
        tags[row + 2, :n] = np.where(has, (gen << _SLOT_SHIFT) | seq[rows], -2)
        dev = self._i64
        return LseSlots(dev[row, :n], dev[row + 1, :n], dev[row + 2, :n], self.capacity)

    # ---- build -----------------------------------------------------------------------------
    @staticmethod
    def _reach_of_rows(rows, seq, qlen, ranges) -> dict:
        """Row -> the last key of each of its queries (:func:`mm_prefix_reach`), for the rows with a query that
        sees later keys (inside a multimodal item attended both ways, before its end)."""
        out = {}
        for i in rows:
            mine = ranges.get(int(i), ())
            if mine:
                L, n = int(seq[i]), int(qlen[i])
                pos = torch.arange(L - n, L, dtype=torch.int32)
                reach = mm_prefix_reach(pos, mine, L)
                if bool((reach != pos).any()):
                    out[int(i)] = reach
                if any(int(e) > L - 1 and int(s) < L for s, e in mine):  # (vLLM keeps such an item in one step)
                    logger.warning_once("A multimodal item attended both ways was split across steps: its queries "
                                        "see its tokens up to the last one in the cache only.")
        return out

    def _reach(self, rows, sub_qsl, seq, qlen, reach_of: dict) -> torch.Tensor:
        """``Prefill.reach`` of the prefill rows (their order: ``rows``, token offsets ``sub_qsl``)."""
        reach = torch.empty(sub_qsl[-1], dtype=torch.int32)
        for k, i in enumerate(rows):
            L, n = int(seq[i]), int(qlen[i])
            r = reach_of.get(int(i))
            reach[sub_qsl[k]: sub_qsl[k + 1]] = torch.arange(L - n, L, dtype=torch.int32) if r is None else r
        return reach.to(self.device, non_blocking=True)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AttentionPackMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise NotImplementedError("AttentionPack supports causal decoder attention only")
        if self._compaction is not None and self._compaction.jobs:  # (its blocks may be reused from now on)
            raise RuntimeError(f"spans queued for compaction in the previous step were never compacted: its last "
                               f"layer ({self._compaction.last_layer}) did not run, and no finish_step was called")
        self._compaction = None
        num_reqs = m.num_reqs
        if num_reqs > self._rows:
            self._alloc(max(num_reqs, 2 * self._rows))
        qsl = m.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        seq_host = m.seq_lens_cpu_upper_bound
        if seq_host is None or (self._draft_index and m.seq_lens.device.type == "cpu"):
            # (runners that do not fill it, and a drafter's later passes, where it is an upper bound; free on CPU)
            seq_host = m.seq_lens[:num_reqs].to("cpu")
        seq = seq_host[:num_reqs].numpy().astype(np.int64)
        qlen = qsl[1:] - qsl[:-1]
        # a span is compact for a row when it ends before the row's last key (compacted in an earlier step), or
        # (reads_compacted_spans) at it: compacted in this step, by layers that ran before these
        compact_before = seq + 1 if self.reads_compacted_spans else seq
        step = self._step
        known = min(num_reqs, len(step.request_ids)) if step is not None else 0  # rows past it: padding
        spans: Optional[list[list[SpanPlan]]] = None
        if self.geometry is not None and step is not None:
            spans = [self._plans(step.candidates[i]) if i < known else [] for i in range(num_reqs)]

        completing = np.zeros(num_reqs, dtype=bool)
        # (a drafter's passes after the first hold draft queries only: its first pass compacted what completed; a
        # partial prefill's row there may stand at a span's end, and must not compact it again over its compact form)
        if spans is not None and not self._draft_index and not self.reads_compacted_spans:
            for i in np.flatnonzero(qlen == 1):
                completing[i] = any(p.end == seq[i] for p in spans[i])  # compacted right after attending
        # Static decode (kernel path, CUDA-graph safe): a batch of decode rows only; every row is a decode row,
        # in batch order, padding rows (no query) with length 0.
        static = (self.graph_safe
                  and (num_reqs == 0 or qlen.max() <= 1) and not completing.any()
                  and m.num_actual_tokens >= num_reqs)  # (a padded graph batch has a query row per request)
        if static:
            seq = np.where(qlen > 0, seq, 0)
            is_decode = np.ones(num_reqs, dtype=bool)
        else:
            is_decode = (qlen == 1) & ~completing
        dec_rows = np.flatnonzero(is_decode)
        pre_rows = np.flatnonzero(~is_decode & (qlen > 0))
        reach_of = self._reach_of_rows(pre_rows, seq, qlen, getattr(m, "mm_req_doc_ranges", None) or {})
        # a prompt's first chunk (ap_vllm.core.exact_rows, causal calls): listed last
        fresh = (qlen[pre_rows] == seq[pre_rows]) & ~np.isin(pre_rows, list(reach_of))
        if fresh.any() and not fresh.all():
            pre_rows = np.concatenate([pre_rows[~fresh], pre_rows[fresh]])
        num_fresh = int(fresh.sum())
        rest = pre_rows[: len(pre_rows) - num_fresh]
        if step is not None:
            for i in pre_rows:
                if i < known:
                    rid = step.request_ids[i]
                    self._epoch[rid] = self._epoch.get(rid, 0) + 1
            if self.reads_compacted_spans and spans is not None:
                # (every row here is one query long, a prompt chunk's too: a span compacted since the last step
                # changes the row's plan although no prefill row says so)
                for i in range(known):
                    rid, n = step.request_ids[i], sum(p.end < compact_before[i] for p in spans[i])
                    if self._compacted.get(rid, 0) != n:
                        self._compacted[rid] = n
                        self._epoch[rid] = self._epoch.get(rid, 0) + 1
            if len(self._epoch) > 4 * self.capacity:
                live = set(step.request_ids)
                self._epoch = {r: e for r, e in self._epoch.items() if r in live}
                self._compacted = {r: n for r, n in self._compacted.items() if r in live}

        host32, host64 = self._i32_host, self._i64_host
        decode = prefill = None
        n_dec, n_pre = len(dec_rows), len(pre_rows)
        if n_dec:
            host32[0, :n_dec] = torch.from_numpy(seq[dec_rows].astype(np.int32))
        if n_pre:
            sub = np.zeros(n_pre + 1, dtype=np.int64)
            np.cumsum(qlen[pre_rows], out=sub[1:])
            host32[1, : n_pre + 1] = torch.from_numpy(sub.astype(np.int32))
            host32[2, :n_pre] = torch.from_numpy(seq[pre_rows].astype(np.int32))
        tags = host64.numpy()
        dec_lse = self._lse_slots(0, tags, seq, dec_rows) if n_dec else None
        pre_lse = self._lse_slots(3, tags, seq, pre_rows) if n_pre else None
        self._i32.copy_(host32, non_blocking=True)
        self._i64.copy_(host64, non_blocking=True)
        table = m.block_table_tensor

        if n_dec:
            # static: rows [0, num_reqs) in batch order, query tokens [0, num_reqs) (a padding row's token is
            # padding too), so q and the block table are views of vLLM's persistent buffers, never copies
            # a captured graph would keep
            in_order = static or bool(dec_rows[-1] == n_dec - 1 and qsl[n_dec] == n_dec)
            dec_table = table[:n_dec] if in_order else table[torch.from_numpy(dec_rows).to(table.device)]
            if self._draft_index and m.seq_lens.device.type != "cpu":  # (host lengths: upper bounds, see above)
                self._i32[0, :n_dec].copy_(m.seq_lens[:n_dec] if in_order else
                                           m.seq_lens[torch.from_numpy(dec_rows).to(m.seq_lens.device)])
            q_idx = None if in_order else torch.from_numpy(qsl[dec_rows]).to(self.device, non_blocking=True)
            decode = Decode(num_rows=n_dec, q_idx=q_idx, block_table=dec_table, seq_lens=self._i32[0, :n_dec],
                            max_seq_len=self.max_model_len if static else int(seq[dec_rows].max()), lse=dec_lse,
                            steps=(self._static_steps(dec_rows, spans, compact_before, dec_table, step, known)
                                   if static else
                                   self._decode_steps(dec_rows, spans, seq, compact_before, dec_table, step)),
                            static=static)
        if n_pre:
            q_rows = [(int(qsl[i]), int(qsl[i + 1])) for i in pre_rows]
            contiguous = all(a[1] == b[0] for a, b in zip(q_rows, q_rows[1:]))
            q_idx = None
            if not contiguous:
                q_idx = torch.cat([torch.arange(a, b) for a, b in q_rows]).to(self.device, non_blocking=True)
            in_order = n_pre == num_reqs and bool((pre_rows == np.arange(n_pre)).all())
            pre_table = table if in_order else table[torch.from_numpy(pre_rows).to(table.device)]
            sub_qsl = [0]
            for a, b in q_rows:
                sub_qsl.append(sub_qsl[-1] + b - a)
            prefill = Prefill(
                q_slice=slice(q_rows[0][0], q_rows[-1][1]), q_idx=q_idx, block_table=pre_table,
                query_start_loc=self._i32[1, : n_pre + 1], seq_lens=self._i32[2, :n_pre],
                max_query_len=int(qlen[pre_rows].max()), max_seq_len=int(seq[pre_rows].max()),
                last_rows=torch.tensor(sub_qsl[1:]).sub_(1).to(self.device, non_blocking=True), lse=pre_lse,
                steps=self._prefill_steps(pre_rows, spans, seq, qlen, sub_qsl, table),
                host_query_start_loc=sub_qsl, host_seq_lens=seq[pre_rows].tolist(), num_fresh=num_fresh,
                rest_max_query_len=int(qlen[rest].max(initial=0)), rest_max_seq_len=int(seq[rest].max(initial=0)),
                reach=self._reach(pre_rows, sub_qsl, seq, qlen, reach_of) if reach_of else None)
        compaction = None
        if prefill is not None and any(st.completing for st in prefill.steps.values()):
            compaction = self._compaction = StepCompaction(last_layer=self._last_layer)
        return AttentionPackMetadata(num_actual_tokens=m.num_actual_tokens, num_reqs=num_reqs,
                                     slot_mapping=m.slot_mapping[: m.num_actual_tokens], decode=decode,
                                     prefill=prefill, layer_keys=self.layer_keys, lse_buffers=self.lse_buffers(),
                                     compaction=compaction, value_selection=self.config.value_selection)

    def build_for_drafting(self, common_attn_metadata: CommonAttentionMetadata,
                           draft_index: int) -> AttentionPackMetadata:
        """A drafter's pass (EAGLE, MTP): pass 0 holds the step's rows as the model's (its spans completing there are
        compacted at the end of the drafter's last layer); passes 1.. hold one draft query a request, whose
        sequence lengths vLLM keeps exact on the device only (the host's assume every draft accepted): on CPU they
        are read from there, on a GPU copied on the device into the decode lengths."""
        self._draft_index = draft_index
        try:
            return self.build(0, common_attn_metadata, fast_build=True)
        finally:
            self._draft_index = 0

    def lse_buffers(self) -> dict:
        """Per compacted layer, its lse of each request's last query by slot (+ a scratch row) and the tag
        that makes an entry valid (:mod:`ap_vllm.backend.channel`). Allocated once, before any CUDA graph is
        captured (the builder is built with the KV cache), so captured steps read and write the same memory."""
        if not self._lse_buffers and self.layer_keys and self.num_q_heads:
            for name in self.layer_keys:
                self._lse_buffers[name] = (
                    torch.full((self.capacity + 1, self.num_q_heads), float("inf"), device=self.device),
                    torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=self.device))
        return self._lse_buffers

    def _static_steps(self, rows: np.ndarray, spans, compact_before: np.ndarray, table: torch.Tensor,
                      step: Optional[StepRequests], known: int) -> dict:
        """Static decode plans (see the class docstring): per layout key, the decode rows' compacted spans in
        the persistent :class:`_StaticSpans` buffers, rewritten only when the decode batch changes."""
        cfg = self.config
        if not self._static:  # nothing compacted in this group: exact keys only
            return {None: DecodeStep(plan=build_decode_plan([], len(rows), device=self.device), has_spans=False,
                                     importance=None, batched=None)}
        batch_key = (len(rows),) + tuple(
            (step.request_ids[i], self._epoch.get(step.request_ids[i], 0)) if step is not None and i < known
            else None for i in rows)
        if self._decode_cache[0] == batch_key:
            return self._decode_cache[1]
        out = {}
        for key, buf in self._static.items():
            compacted = []
            if spans is not None:
                for b, i in enumerate(rows):
                    for p in spans[i]:
                        if p.end < compact_before[i]:
                            compacted.append(PagedSpan(b, p.start, self.layout(key, p), p.first_block,
                                                       _two_level(cfg, p.kind), cfg.low_rank_divisor, cfg.two_level_keys))
            buf.fill(compacted, len(rows))
            ranks = [self.config.rank_for_layer(w, self._key_layer[key], t) for w in ("key", "value")
                     for t in (False, True)]
            plan = DecodePlan(spans=compacted, meta=buf.meta, thresholds=buf.thresholds,
                              seq_spans=buf.seq_spans[: len(rows)], max_span_tokens=self.max_model_len,
                              key_rank_max=max(ranks[0], ranks[1]), value_rank_max=max(ranks[2], ranks[3]),
                              fp8=cfg.coefficient_dtype == "fp8_e4m3",
                              max_span_end=max([sp.end for sp in compacted], default=0),
                              full_rank=_reads_full_rank(cfg), inst=buf.inst,
                              rows_per_block=buf.rows_per_block)
            out[key] = DecodeStep(plan=plan, has_spans=True, importance=None, batched=None, num_spans=buf.num_spans)
        self._decode_cache = (batch_key, out)
        return out

    def _decode_steps(self, rows: np.ndarray, spans, seq: np.ndarray, compact_before: np.ndarray,
                      table: torch.Tensor, step: Optional[StepRequests]) -> dict:
        """Per layout key, the decode rows' compacted spans as the kernels (or the batched torch path) take
        them. Span metadata does not change while the decode batch is the same requests in the same order (a
        span's blocks never move while its request runs), so the kernel plans are reused across such steps."""
        cfg = self.config
        keys = list(self._key_layer) if spans is not None else [None]
        batch_key = None
        if step is not None and spans is not None:
            batch_key = ("dynamic",) + tuple((step.request_ids[i], self._epoch.get(step.request_ids[i], 0))
                                             for i in rows)
            if self._decode_cache[0] == batch_key:  # the same decode rows one token on
                cached = self._decode_cache[1]
                if self.use_kernels:
                    return cached
                lens = seq[rows].tolist()
                out = {key: replace(st, batched=advance_batched_decode_plan(st.batched, table, lens))
                       for key, st in cached.items()}
                self._decode_cache = (batch_key, out)
                return out
        out = {}
        for key in keys:
            compacted = []
            if key is not None:
                for b, i in enumerate(rows):
                    for p in spans[i]:
                        if p.end < compact_before[i]:  # compacted in an earlier step (or: reads_compacted_spans)
                            compacted.append(PagedSpan(b, p.start, self.layout(key, p), p.first_block,
                                                       _two_level(cfg, p.kind), cfg.low_rank_divisor, cfg.two_level_keys))
            importance = None
            if compacted and cfg.value_selection == "ema" and cfg.importance_fraction < 1.0:
                index, valid, counts = importance_index(compacted, table, cfg.threshold_sample_tokens)
                ranks = torch.tensor(threshold_ranks(counts, cfg.importance_fraction))
                importance = (index, valid, ranks.to(self.device, non_blocking=True))
            batched = None
            if not self.use_kernels:
                batched = build_batched_decode_plan(compacted, table, seq[rows].tolist(), window=self.window)
            plan = build_decode_plan(compacted, len(rows), device=self.device) if self.use_kernels else None
            out[key] = DecodeStep(plan=plan, has_spans=bool(compacted), importance=importance, batched=batched)
        if batch_key is not None:
            self._decode_cache = (batch_key, out)
        return out

    def _prefill_steps(self, rows: np.ndarray, spans, seq: np.ndarray, qlen: np.ndarray, sub_qsl: list[int],
                       table: torch.Tensor) -> dict:
        keys = list(self._key_layer) if spans is not None else [None]
        out = {}
        hq = self.vllm_config.model_config.get_num_attention_heads(self.vllm_config.parallel_config) \
            if getattr(self.vllm_config, "model_config", None) is not None else None
        for key in keys:
            compacted, completing = [], []
            if key is not None:
                for b, i in enumerate(rows):
                    first_q = seq[i] - qlen[i]
                    for p in spans[i]:
                        if p.end <= first_q:
                            compacted.append(PagedSpan(b, p.start, self.layout(key, p), p.first_block))
                        elif p.end <= seq[i]:
                            completing.append((table[i], p, self.layout(key, p)))
            plan = None
            if compacted and self.use_kernels:
                plan = build_prefill_plan(compacted, sub_qsl, hq or 1, device=self.device)
            out[key] = PrefillStep(plan=plan, spans=compacted, completing=completing)
        return out
