"""The AttentionPack attention backend for vLLM: Backend + MetadataBuilder + Impl.

Selected with ``--attention-backend attentionpack`` (an alias of vLLM's ``CUSTOM`` slot, see
:mod:`ap_vllm.plugin`). K/V live in vLLM's paged cache (layout in :mod:`ap_vllm.core.paged`);
attention for prefill, chunked prefill, mixed prefill/decode batches and decode is computed
per request, with grouped-query attention, sliding windows and logit soft-capping.

Compaction (global-attention layers, ``enabled``): the spans of a request are planned by
:mod:`ap_vllm.core.spans` (the same plan the scheduler uses to free blocks). In the step in
which a span's last token enters the cache, each layer attends with the exact K/V, then
compacts the span (:func:`ap_vllm.core.compaction.compact_spans`) and writes the compact form
into the span's own first blocks (:mod:`ap_vllm.core.paged_layout`). Later steps read exact
tokens outside compacted spans plus every compacted span in coefficient space, merged by
log-sum-exp, and update the span's importance in its pages
(:func:`ap_vllm.core.lowrank_attention.decode_mixed`).

Importance (two-level read): thresholds are computed on the device each step
(:func:`ap_vllm.core.lowrank_attention.importance_thresholds`); a decode step's importance update
is normalised by the same request's lse of the previous step, kept per layer (one kernel pass;
the first decode step after a prefill normalises exactly, in two passes).

Kernels (``kernel``: "auto" = Triton on CUDA): per layer, the decode rows of a batch (one query, no
span completing) run in one call of the decode kernels
(:func:`ap_vllm.core.paged_decode.paged_mixed_decode`); every other row (prefill, chunked prefill,
speculative rows, a span completing) in one call of the prefill kernels
(:func:`ap_vllm.core.paged_decode.paged_prefill`: exact keys in tiles, compacted spans at full rank,
O(tokens) memory); the spans completing in the step are then compacted together on the device
(:func:`ap_vllm.core.compaction.compact_spans`) and packed by the Triton writer. Without kernels
(CPU default), the per-request torch path above.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Optional

import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from ap_vllm.backend.kv_manager import AttentionPackSpec, RequestSpans
from ap_vllm.config import AttentionPackConfig, config_from_vllm
from ap_vllm.core.compaction import compact_spans
from ap_vllm.core.dense import dense_attention
from ap_vllm.core.lowrank_attention import (decode_mixed, importance_thresholds, threshold_ranks,
                                            thresholds_from_padded)
from ap_vllm.core.paged import gather_tokens, split_kv_cache, write_slots
from ap_vllm.core.paged_decode import (DecodePlan, PrefillPlan, build_decode_plan, build_prefill_plan,
                                       paged_mixed_decode, paged_prefill)
from ap_vllm.core.paged_layout import PagedSpan, importance_index, pack_span, read_importances, unpack_span
from ap_vllm.core.rope import RopeTable, rope_from_vllm
from ap_vllm.core.spans import KVGeometry, SpanPlan, min_freeing_span, span_layout

logger = init_logger("vllm.attentionpack")  # under "vllm" so vLLM's log handlers print it

SUPPORTED_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256]
SUPPORTED_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


class AttentionPackBackend(AttentionBackend):
    """Paged attention whose visual-token spans can be stored as low-rank factors."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = SUPPORTED_DTYPES
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # vLLM looks the backend up by this name in AttentionBackendEnum; "attentionpack" is
        # an alias of the CUSTOM member, so that is the name it must report.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["AttentionPackImpl"]:
        return AttentionPackImpl

    @staticmethod
    def get_builder_cls() -> type["AttentionPackMetadataBuilder"]:
        return AttentionPackMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return SUPPORTED_HEAD_SIZES

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Token-major blocks, one contiguous byte range per block and layer: a compacted span
        # is written as raw bytes over its blocks (ap_vllm.core.paged_layout).
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Global-attention layers get the spec whose KV manager frees compacted blocks."""
        # vLLM asks for specs outside its config context: use the config the layers were built with.
        if (type(spec) is FullAttentionSpec and spec.sliding_window is None and _MODEL_CONFIG is not None
                and _MODEL_CONFIG.enabled):
            return AttentionPackSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__})
        return spec


# The AttentionPack config of this process's model, recorded when its attention layers are built.
_MODEL_CONFIG: Optional[AttentionPackConfig] = None

# Span candidates of the requests of the batch being built, in batch order; published by the
# model runner hook in ap_vllm._vllm_patches (worker process), None outside a real step.
CURRENT_BATCH: Optional[list[RequestSpans]] = None
CURRENT_REQUEST_IDS: Optional[list[str]] = None  # the same requests' ids


@dataclass
class AttentionPackMetadata:
    """Per-step batch layout, built once and shared by every layer of the group.

    Request ``i`` owns query tokens ``query_start_loc[i]:query_start_loc[i+1]`` of the batch;
    it has ``seq_lens[i]`` tokens in the cache after this step, so its queries sit at positions
    ``seq_lens[i] - query_len .. seq_lens[i] - 1``.
    """

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, -1 = padding
    causal: bool = True
    spans: Optional[list[list[SpanPlan]]] = None  # per request: spans compacted or compacting
    request_ids: Optional[list[str]] = None  # per request (None outside a real step)
    # what the first layer of the step built for the kernels, by span-layout key (see _kernel_step)
    kernel_steps: dict = field(default_factory=dict, repr=False)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class _KernelStep:
    """One step's decode rows as the Triton kernels take them (shared by the layers whose spans
    have the same layouts)."""

    rows: list[int]  # metadata rows decoded by the kernels (one query, no span completing)
    rest: list[int]  # rows left to the torch path
    request_ids: Optional[tuple[str, ...]]  # of ``rows``
    seq_lens_host: tuple[int, ...]
    q_idx: Optional[torch.Tensor]  # query row of each decode row; None = the first len(rows) rows
    seq_lens: torch.Tensor  # int32 [len(rows)]
    max_seq_len: int
    table: torch.Tensor  # block-table rows of ``rows``
    plan: DecodePlan  # its thresholds are replaced per layer when ``importance`` is set
    importance: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # index, mask, threshold ranks


@dataclass
class _PrefillStep:
    """One step's longer-query rows as the prefill kernels take them (shared like :class:`_KernelStep`)."""

    q_slice: slice  # their query tokens, when contiguous in the batch
    q_idx: Optional[torch.Tensor]  # else the token indices
    table: torch.Tensor
    query_start_loc: torch.Tensor  # int32 [rows + 1], over the rows' own tokens
    seq_lens: torch.Tensor  # int32 [rows]
    max_query_len: int
    max_seq_len: int
    plan: Optional[PrefillPlan]  # spans compacted in earlier steps (None: none)
    completing: list  # (metadata row, SpanPlan) of spans whose last token arrives in this step
    last_rows: torch.Tensor  # each row's last query among the rows' tokens


class AttentionPackMetadataBuilder(AttentionMetadataBuilder[AttentionPackMetadata]):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.config = config_from_vllm(vllm_config)
        self.geometry = None
        self._plan_cache: dict[RequestSpans, list[SpanPlan]] = {}
        if isinstance(kv_cache_spec, AttentionPackSpec):
            self.geometry = kv_cache_spec.geometry(vllm_config.model_config.get_num_layers(
                vllm_config.parallel_config))
            kinds = ("visual", "text") if self.config.compact_text else ("visual",)
            shortest = {kind: min_freeing_span(self.config, self.geometry, kind) for kind in kinds}
            logger.info_once(
                "AttentionPack compaction: with block size %d, the shortest %s that frees memory: %s tokens; "
                "shorter spans stay exact (smaller --block-size or ranks free more).", self.geometry.block_size,
                " / ".join(f"{k} span" for k in kinds), " / ".join(str(v or "none") for v in shortest.values()))

    def _plans(self, request: RequestSpans) -> list[SpanPlan]:
        plans = self._plan_cache.get(request)
        if plans is None:
            if len(self._plan_cache) > 4096:
                self._plan_cache.clear()
            plans = self._plan_cache[request] = request.plans(self.config, self.geometry)
        return plans

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> AttentionPackMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise NotImplementedError("AttentionPack supports causal decoder attention only")
        num_reqs = m.num_reqs
        spans = None
        batch = CURRENT_BATCH
        if self.geometry is not None and batch is not None:
            spans = [self._plans(batch[i]) if i < len(batch) else [] for i in range(num_reqs)]
        return AttentionPackMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: num_reqs + 1].tolist(),
            seq_lens=m.seq_lens[:num_reqs].cpu().tolist(),
            block_table=m.block_table_tensor[:num_reqs],
            slot_mapping=m.slot_mapping[: m.num_actual_tokens],
            spans=spans,
            request_ids=CURRENT_REQUEST_IDS[:num_reqs] if spans is not None and CURRENT_REQUEST_IDS else None,
        )


class AttentionPackImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: Optional[list[float]],
        sliding_window: Optional[int],
        kv_cache_dtype: str,
        logits_soft_cap: Optional[float] = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: Optional[str] = None,
        sinks: Optional[torch.Tensor] = None,
    ) -> None:
        from vllm.config import get_current_vllm_config

        if alibi_slopes is not None:
            raise NotImplementedError("AttentionPack does not support ALiBi slopes")
        if sinks is not None:
            raise NotImplementedError("AttentionPack does not support attention sink logits")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"AttentionPack supports decoder attention only, got {attn_type}")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(
                f"AttentionPack stores KV in the model dtype: --kv-cache-dtype {kv_cache_dtype} is not "
                "supported (allowed: auto)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type

        global _MODEL_CONFIG
        self.config: AttentionPackConfig = config_from_vllm(get_current_vllm_config())
        _MODEL_CONFIG = self.config
        self._layer_idx: Optional[int] = None
        self.rope: Optional[RopeTable] = None  # set by attach_rotary_tables (key_space="pre_rope")
        self._geometry: Optional[KVGeometry] = None  # of this layer's cache, set on the first forward
        self._layouts: dict = {}
        self._layout_key: Optional[tuple] = None  # layers with equal keys lay out their spans alike
        # per request: (sequence length, this layer's lse [Hq] of its last query) of its last step: the
        # normaliser of the next decode step's importance update (one kernel pass instead of two; the
        # normaliser lags one token, see ap_vllm.core.lowrank_attention.update_importance)
        self._last_lse: dict[str, tuple[int, torch.Tensor]] = {}
        # the same for the batch this layer last decoded with the kernels:
        # (request ids, seq lens, lse [B, Hq], row of each request id)
        self._last_step_lse: Optional[tuple[tuple[str, ...], tuple[int, ...], torch.Tensor, dict[str, int]]] = None
        logger.info_once("AttentionPack backend active: %s", str(self.config.model_dump(exclude_defaults=True)))

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Optional[AttentionPackMetadata],
        output: torch.Tensor,
        output_scale: Optional[torch.Tensor] = None,
        output_block_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("AttentionPack does not support fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        qsl, seq_lens = attn_metadata.query_start_loc, attn_metadata.seq_lens
        spans = attn_metadata.spans if self.sliding_window is None else None
        if spans is not None and self._geometry is None:  # what this layer's span layouts depend on
            self._geometry = KVGeometry(kv_cache.shape[2], self.num_kv_heads, self.head_size, kv_cache.dtype, 1)
            idx = self._layer_index(layer)
            self._layout_key = (self._geometry, *(self.config.rank_for_layer(w, idx, text)
                                                  for w in ("key", "value") for text in (False, True)))
        rows: list[int] = list(range(attn_metadata.num_reqs))
        if self.config.use_triton(query.device):
            rows = self._decode_with_kernels(layer, query, kv_cache, attn_metadata, spans, output)
            if rows:
                self._prefill_with_kernels(layer, query, kv_cache, attn_metadata, spans, output, rows)
            return output
        for i in rows:
            q_start, q_end, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
            if q_end == q_start:
                continue
            first_q_pos = seq_len - (q_end - q_start)
            row = attn_metadata.block_table[i]
            q_pos = torch.arange(first_q_pos, seq_len, device=query.device)
            plans = spans[i] if spans is not None else ()
            if plans:
                out = self._attend_with_spans(layer, query[q_start:q_end], q_pos, kv_cache, row, plans, attn_metadata, i)
            else:
                kv_start = 0
                if self.sliding_window is not None:
                    kv_start = max(0, first_q_pos - self.sliding_window + 1)
                out, _ = dense_attention(
                    query[q_start:q_end], gather_tokens(key_cache, row, kv_start, seq_len),
                    gather_tokens(value_cache, row, kv_start, seq_len), self.scale, q_pos=q_pos,
                    k_pos=torch.arange(kv_start, seq_len, device=query.device),
                    window=self.sliding_window, softcap=self.logits_soft_cap,
                )
            output[q_start:q_end] = out.to(output.dtype)
        return output

    # ---- compacted spans --------------------------------------------------------------
    def _layer_index(self, layer: AttentionLayer) -> int:
        if self._layer_idx is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer_idx = extract_layer_index(layer.layer_name)
        return self._layer_idx

    def _layout(self, plan: SpanPlan):
        """The compact form of one of this layer's spans (cached: the same few shapes recur)."""
        key = (plan.num_tokens, plan.kind)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 4096:
                self._layouts.clear()
            layout = self._layouts[key] = span_layout(self.config, self._geometry, plan.num_tokens,
                                                      self._layer_idx, plan.kind)
        return layout

    def _compaction_rope(self, layer: AttentionLayer) -> Optional[RopeTable]:
        """The rotary table spans of this layer are compacted with (None: post-RoPE keys)."""
        if self.config.key_space != "pre_rope":
            return None
        if self.rope is None:
            raise RuntimeError(f"key_space='pre_rope': layer {layer.layer_name} has no rotary table attached "
                               "(ap_vllm.backend.attentionpack.attach_rotary_tables runs after model loading)")
        return self.rope

    def _decode_with_kernels(self, layer: AttentionLayer, query: torch.Tensor, kv_cache: torch.Tensor,
                             md: AttentionPackMetadata, spans: Optional[list[list[SpanPlan]]],
                             output: torch.Tensor) -> list[int]:
        """Attention of the batch's decode rows (one query, no span completing in this step) in one
        call of the Triton decode kernels (:func:`ap_vllm.core.paged_decode.paged_mixed_decode`):
        exact tokens outside compacted spans + compacted spans in coefficient space, importance
        updated in the pages. Returns the rows left to the torch path (longer queries, or a span's
        last token arriving: those compact after attending)."""
        cfg = self.config
        step = self._kernel_step(md, spans, query.device)
        if not step.rows:
            return step.rest
        nb, hkv, bs, _ = kv_cache.shape
        # vLLM's pages are token-major ([blocks, block_size, H, 2d] in memory): the kernels' view
        # [blocks, 2 (K, V), block_size, H, d] of the same bytes, each block one dense range.
        cache = kv_cache.transpose(1, 2).view(nb, bs, hkv, 2, self.head_size).permute(0, 3, 1, 2, 4)
        plan = step.plan
        if step.importance is not None:  # two-level read: this layer's thresholds, computed on the device
            index, valid, ranks = step.importance
            plan = replace(plan, thresholds=thresholds_from_padded(read_importances(cache, index, valid), ranks))
        q = query[: len(step.rows)] if step.q_idx is None else query[step.q_idx]
        out, lse = paged_mixed_decode(
            q, cache, step.table, step.seq_lens, plan, self.scale, softcap=self.logits_soft_cap,
            window=self.sliding_window, max_seq_len=step.max_seq_len, kernel="triton",
            rope=self._compaction_rope(layer), lse_ref=self._previous_lse_rows(step) if plan.spans else None,
            importance_ema=cfg.importance_ema, **({"span_kernel": "cuda"} if cfg.kernel == "cuda" else {}))
        if step.q_idx is None:
            output[: len(step.rows)] = out.to(output.dtype)
        else:
            output[step.q_idx] = out.to(output.dtype)
        if step.request_ids is not None:
            self._last_step_lse = (step.request_ids, step.seq_lens_host, lse,
                                   {rid: b for b, rid in enumerate(step.request_ids)})
        return step.rest

    def _kernel_step(self, md: AttentionPackMetadata, spans: Optional[list[list[SpanPlan]]], device) -> "_KernelStep":
        """The step's decode rows as the kernels take them. Built by the first layer of the step and
        reused by every later layer whose spans have the same layouts (vLLM hands all layers one
        metadata object per step), so the per-layer host work does not grow with the batch."""
        key = None if spans is None else self._layout_key
        hit = md.kernel_steps.get(key)
        if hit is not None:
            return hit
        cfg = self.config
        qsl, seq_lens = md.query_start_loc, md.seq_lens
        rows, rest = [], []
        for i in range(md.num_reqs):
            n, plans = qsl[i + 1] - qsl[i], (spans[i] if spans is not None else ())
            if n == 1 and not any(p.end == seq_lens[i] for p in plans):
                rows.append(i)
            elif n > 0:
                rest.append(i)
        compacted = []
        for b, i in enumerate(rows):
            for p in (spans[i] if spans is not None else ()):
                if p.end < seq_lens[i]:  # compacted in an earlier step
                    compacted.append(PagedSpan(b, p.start, self._layout(p), p.first_block,
                                               0.0 if cfg.importance_fraction < 1.0 else None,
                                               cfg.low_rank_divisor, cfg.two_level_keys))
        in_order = rows == list(range(len(rows))) and all(qsl[i] == i for i in rows)
        lens = [seq_lens[i] for i in rows]
        table = md.block_table if len(rows) == md.num_reqs else md.block_table[rows]
        importance = None
        if compacted and cfg.importance_fraction < 1.0:
            index, valid, counts = importance_index(compacted, table, cfg.threshold_sample_tokens)
            ranks = torch.tensor(threshold_ranks(counts, cfg.importance_fraction))
            importance = (index, valid, ranks.to(device, non_blocking=True))
        step = md.kernel_steps[key] = _KernelStep(
            rows=rows, rest=rest,
            request_ids=tuple(md.request_ids[i] for i in rows) if md.request_ids is not None else None,
            seq_lens_host=tuple(lens),
            q_idx=None if in_order else torch.tensor([qsl[i] for i in rows]).to(device, non_blocking=True),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(device, non_blocking=True),
            max_seq_len=max(lens, default=1), table=table,
            plan=build_decode_plan(compacted, len(rows), device=device), importance=importance)
        return step

    def _previous_lse_rows(self, step: "_KernelStep") -> list[Optional[torch.Tensor]] | torch.Tensor:
        """Per decode row, its lse of the step that ended one token earlier (None: not seen). When the
        batch is the one this layer decoded last step, one token on, that step's lse as it is."""
        last = self._last_step_lse
        if step.request_ids is None:
            return [None] * len(step.rows)
        if (last is not None and last[0] == step.request_ids
                and all(a + 1 == b for a, b in zip(last[1], step.seq_lens_host))):
            return last[2]
        return [self._previous_lse(rid, n) for rid, n in zip(step.request_ids, step.seq_lens_host)]

    def _previous_lse(self, request_id: Optional[str], seq_len: int) -> Optional[torch.Tensor]:
        """A request's lse [Hq] from the step that ended one token before ``seq_len``, if this layer saw it."""
        if request_id is None:
            return None
        last = self._last_step_lse
        if last is not None:
            b = last[3].get(request_id)
            if b is not None and last[1][b] == seq_len - 1:
                return last[2][b]
        hit = self._last_lse.get(request_id)
        return hit[1] if hit is not None and hit[0] == seq_len - 1 else None

    def _remember_lse(self, request_id: Optional[str], seq_len: int, lse: torch.Tensor) -> None:
        if request_id is not None:
            if len(self._last_lse) > 4096:  # finished requests' entries: drop them now and then
                self._last_lse.clear()
            self._last_lse[request_id] = (seq_len, lse)

    def _attend_with_spans(self, layer: AttentionLayer, q: torch.Tensor, q_pos: torch.Tensor,
                           kv_cache: torch.Tensor, row: torch.Tensor, plans: list[SpanPlan],
                           md: AttentionPackMetadata, i: int) -> torch.Tensor:
        """One request whose plans include spans: exact tokens + compacted spans, then compact
        the spans whose last token arrived in this step."""
        cfg = self.config
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        pages = kv_cache.transpose(1, 2)  # [blocks, block_size, heads, 2d]: contiguous per block (LBNHC)
        self._layer_index(layer)  # (the span layouts below depend on it)
        rope = self._compaction_rope(layer)
        first_q, seq_len = int(q_pos[0]), int(q_pos[-1]) + 1
        compacted = [p for p in plans if p.end <= first_q]
        completing = [p for p in plans if first_q < p.end <= seq_len]

        # exact tokens: everything outside compacted spans
        ranges, cursor = [], 0
        for p in compacted:
            ranges.append((cursor, p.start))
            cursor = p.end
        ranges.append((cursor, seq_len))
        ranges = [(a, b) for a, b in ranges if b > a]
        k = torch.cat([gather_tokens(key_cache, row, a, b) for a, b in ranges])
        v = torch.cat([gather_tokens(value_cache, row, a, b) for a, b in ranges])
        k_pos = torch.cat([torch.arange(a, b, device=q.device) for a, b in ranges])

        spans, where = [], []
        for p in compacted:
            layout = self._layout(p)
            ids = row[p.first_block: p.first_block + layout.num_blocks]
            spans.append(unpack_span(pages, ids, layout, start=p.start, rope=rope))
            where.append((ids, layout))
        # A decode row (one query, no span completing) reads spans two-level and updates their importance,
        # normalised by the previous step's lse, as the decode kernels do; other rows (prefill, chunked
        # prefill, speculative rows, a span completing) read them at full rank without updating, as the
        # prefill kernels do.
        decode_row = q.shape[0] == 1 and not completing
        thresholds = (list(importance_thresholds([sp.importance for sp in spans], cfg.importance_fraction,
                                                 cfg.threshold_sample_tokens))
                      if decode_row and spans and cfg.importance_fraction < 1.0 else None)
        rid = md.request_ids[i] if md.request_ids is not None else None
        lse_ref = self._previous_lse(rid, md.seq_lens[i]) if decode_row else None
        out, lse = decode_mixed(q, k, v, k_pos, spans, self.scale, q_pos, softcap=self.logits_soft_cap,
                                thresholds=thresholds, low_rank_divisor=cfg.low_rank_divisor,
                                two_level_keys=cfg.two_level_keys,
                                importance_ema=cfg.importance_ema if decode_row else None, lse_ref=lse_ref)
        self._remember_lse(rid, md.seq_lens[i], lse[:, -1])
        if decode_row:
            for span, (ids, layout) in zip(spans, where):
                pack_span(pages, ids, span, layout, sections=["importance"])

        # attention above used their exact K/V; from now on the compact form
        self._compact_completing(layer, kv_cache, [(row, p) for p in completing], kernels=False)
        return out

    def _compact_completing(self, layer: AttentionLayer, kv_cache: torch.Tensor,
                            completing: list[tuple[torch.Tensor, SpanPlan]], kernels: bool) -> None:
        """Compact the spans whose last token entered the cache in this step and write their compact form
        into their own first blocks: one batched device factorisation per rank group
        (:func:`ap_vllm.core.compaction.compact_spans`, no host sync), packed by the Triton writer
        (``kernels``) or the torch one. ``completing``: (block-table row, plan) pairs."""
        if not completing:
            return
        cfg = self.config
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        nb, hkv, bs, _ = kv_cache.shape
        if kernels:
            from ap_vllm.kernels.pack import pack_span_triton

            cache = kv_cache.transpose(1, 2).view(nb, bs, hkv, 2, self.head_size).permute(0, 3, 1, 2, 4)
        else:
            cache = kv_cache.transpose(1, 2)  # [blocks, block_size, heads, 2d]: contiguous per block (LBNHC)
        layer_idx = self._layer_index(layer)
        rope = self._compaction_rope(layer)
        groups: dict[tuple[int, int], list] = {}
        for row, p in completing:
            layout = self._layout(p)
            groups.setdefault((layout.key_rank, layout.value_rank), []).append((row, p, layout))
        for (rk, rv), items in groups.items():
            compacted = compact_spans(
                [gather_tokens(key_cache, row, p.start, p.end) for row, p, _ in items],
                [gather_tokens(value_cache, row, p.start, p.end) for row, p, _ in items],
                rk, rv, starts=[p.start for _, p, _ in items], energy_threshold=cfg.energy_threshold,
                oversample=cfg.svd_oversample, power_iters=cfg.svd_power_iters, seed=cfg.seed + layer_idx,
                coefficient_dtype=cfg.coefficient_dtype, rope=rope,
                importance=[torch.zeros(p.num_tokens, device=kv_cache.device) for _, p, _ in items])
            for (row, p, layout), span in zip(items, compacted):
                ids = row[p.first_block: p.first_block + layout.num_blocks]
                if kernels:
                    pack_span_triton(cache, ids, span, layout)
                else:
                    pack_span(cache, ids, span, layout)

    def _prefill_with_kernels(self, layer: AttentionLayer, query: torch.Tensor, kv_cache: torch.Tensor,
                              md: AttentionPackMetadata, spans: Optional[list[list[SpanPlan]]],
                              output: torch.Tensor, rows: list[int]) -> None:
        """The rows the decode call left (longer queries: prefill, chunked prefill, speculative rows; or a
        span completing) in one call of the prefill kernels (:func:`ap_vllm.core.paged_decode.paged_prefill`:
        exact keys outside compacted spans, those spans at full rank, O(tokens) memory), then the spans whose
        last token arrived are compacted together (:meth:`_compact_completing`)."""
        step = self._prefill_step(md, spans, rows, query.device)
        nb, hkv, bs, _ = kv_cache.shape
        cache = kv_cache.transpose(1, 2).view(nb, bs, hkv, 2, self.head_size).permute(0, 3, 1, 2, 4)
        q = query[step.q_slice] if step.q_idx is None else query[step.q_idx]
        out, lse = paged_prefill(q, cache, step.table, step.query_start_loc, step.seq_lens, step.plan, self.scale,
                               max_query_len=step.max_query_len, max_seq_len=step.max_seq_len,
                               softcap=self.logits_soft_cap, window=self.sliding_window, kernel="triton",
                               rope=self._compaction_rope(layer) if step.plan is not None else None)
        if step.q_idx is None:
            output[step.q_slice] = out.to(output.dtype)
        else:
            output[step.q_idx] = out.to(output.dtype)
        if md.request_ids is not None and spans is not None:  # the next decode step's importance normaliser
            last = lse[step.last_rows]
            for k, i in enumerate(rows):
                self._remember_lse(md.request_ids[i], md.seq_lens[i], last[k])
        self._compact_completing(layer, kv_cache, [(md.block_table[i], p) for i, p in step.completing],
                                 kernels=True)

    def _prefill_step(self, md: AttentionPackMetadata, spans: Optional[list[list[SpanPlan]]], rows: list[int],
                      device) -> "_PrefillStep":
        """The step's longer-query rows as the prefill kernels take them; built by the first layer of the step
        with these span layouts and reused by the others (as :meth:`_kernel_step`)."""
        key = ("prefill", None if spans is None else self._layout_key)
        hit = md.kernel_steps.get(key)
        if hit is not None:
            return hit
        qsl, seq_lens = md.query_start_loc, md.seq_lens
        sub_qsl, compacted, completing, q_rows = [0], [], [], []
        for b, i in enumerate(rows):
            n = qsl[i + 1] - qsl[i]
            first_q = seq_lens[i] - n
            sub_qsl.append(sub_qsl[-1] + n)
            q_rows.append((qsl[i], qsl[i + 1]))
            for p in (spans[i] if spans is not None else ()):
                if p.end <= first_q:  # compacted in an earlier step
                    compacted.append(PagedSpan(b, p.start, self._layout(p), p.first_block))
                elif p.end <= seq_lens[i]:  # its last token arrives now: exact this step, compacted after
                    completing.append((i, p))
        contiguous = all(a[1] == b[0] for a, b in zip(q_rows, q_rows[1:]))
        q_idx = None
        if not contiguous:
            q_idx = torch.cat([torch.arange(a, b) for a, b in q_rows]).to(device, non_blocking=True)
        table = md.block_table if len(rows) == md.num_reqs else md.block_table[rows]
        step = md.kernel_steps[key] = _PrefillStep(
            q_slice=slice(q_rows[0][0], q_rows[-1][1]), q_idx=q_idx, table=table,
            query_start_loc=torch.tensor(sub_qsl, dtype=torch.int32).to(device, non_blocking=True),
            seq_lens=torch.tensor([seq_lens[i] for i in rows], dtype=torch.int32).to(device, non_blocking=True),
            max_query_len=max(b - a for a, b in zip(sub_qsl, sub_qsl[1:])),
            max_seq_len=max(seq_lens[i] for i in rows),
            plan=build_prefill_plan(compacted, sub_qsl, self.num_heads, device=device) if compacted else None,
            completing=completing,
            last_rows=torch.tensor([b - 1 for b in sub_qsl[1:]]).to(device, non_blocking=True))
        return step

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        write_slots(key_cache, value_cache, key, value, slot_mapping)


def attach_rotary_tables(model: torch.nn.Module, config: AttentionPackConfig) -> int:
    """Give every compacted (global-attention) AttentionPack layer of ``model`` its rotary table,
    for ``key_space="pre_rope"``. The table is the ``rotary_emb`` of the attention layer's parent
    module (vLLM's model files: ``self.rotary_emb`` next to ``self.attn``); layers sharing one
    rotary module share one table. Raises ValueError naming the layer when a compacted layer has no
    rotary embedding next to it, or one whose rotation is not plain 1-D RoPE. Returns the number of
    layers given a table."""
    if not (config.enabled and config.key_space == "pre_rope"):
        return 0
    tables: dict[int, RopeTable] = {}
    attached, compacted = set(), []
    for module in model.modules():
        impl = getattr(module, "impl", None)
        if isinstance(impl, AttentionPackImpl) and impl.sliding_window is None:
            compacted.append(module.layer_name)
        rotary = getattr(module, "rotary_emb", None)
        if rotary is None:
            continue
        for child in module.children():
            impl = getattr(child, "impl", None)
            if isinstance(impl, AttentionPackImpl) and impl.sliding_window is None:
                if id(rotary) not in tables:
                    tables[id(rotary)] = rope_from_vllm(rotary)
                impl.rope = tables[id(rotary)]
                attached.add(child.layer_name)
    missing = [name for name in compacted if name not in attached]
    if missing:
        raise ValueError(f"attentionpack.key_space='pre_rope' is not allowed for this model: no rotary embedding "
                         f"found next to layer(s) {', '.join(missing[:3])} (a 'rotary_emb' beside the attention "
                         "layer); use key_space='post_rope'")
    logger.info("AttentionPack key_space=pre_rope: rotary tables attached to %d layers (%d distinct).",
                len(attached), len(tables))
    return len(attached)
