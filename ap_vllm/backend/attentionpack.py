"""The AttentionPack attention backend for vLLM: Backend (capabilities) + Impl (writes the cache, launches).

Selected with ``--attention-backend attentionpack`` (an alias of vLLM's ``CUSTOM`` slot, see
:mod:`ap_vllm.plugin`). K/V live in vLLM's paged cache (layout in :mod:`ap_vllm.core.paged`). The metadata
builder (:mod:`ap_vllm.backend.metadata`) plans each step once: decode rows, the other rows, per layout key
the compacted spans, the spans completing and the lse slots. ``forward`` does no host work that depends on
the batch: no device-to-host copy, no per-request Python (``tests/test_sync_lint.py`` enforces it):

1. decode rows (one query, no span completing): exact tokens outside compacted spans + every compacted span
   in coefficient space, merged by log-sum-exp, importance updated in the pages. Kernels
   (:func:`ap_vllm.core.paged_decode.paged_mixed_decode`, Triton; ``kernel: cuda`` for the CUDA C++ span
   launch) or, without kernels (CPU), the batched torch path
   (:func:`ap_vllm.core.batched_decode.paged_decode_batched`): one path per layer for all decode rows;
2. every other row (prefill, chunked prefill, a span completing): exact keys outside compacted spans and
   those spans at full rank (:func:`ap_vllm.core.paged_decode.paged_prefill`, O(tokens) memory on the kernel
   path);
3. the spans whose last token arrived in this step are queued by each layer and compacted together at the end
   of the step's last layer, every layer's in one batch (:func:`ap_vllm.core.compaction.compact_spans`: on a
   GPU the float32 Gram method with its Triton step, a fixed handful of launches whatever the batch; on the
   CPU the float64 sketch method), and packed into their own first blocks.

Importance (two-level read): thresholds are computed on the device per layer
(:func:`ap_vllm.core.lowrank_attention.thresholds_from_padded`). A decode step's importance update is
normalised by the request's lse of its previous step, which each layer keeps in a device buffer indexed by
the request's slot (:mod:`ap_vllm.backend.channel`); a row without one (its first step after a preemption,
say) adds nothing this step: its importance decays uniformly, which keeps its ranking.

Score selection (``value_selection: score``): no thresholds and no importance update; the span kernel
reads a token's values at full rank when max_h exp(s[h, t] - lse_ref[h]) >= ``score_threshold``, with the
same previous-step lse (+inf for a row without one: that row reads every token at full rank).

Full rank (``value_selection: full``): every token's keys and values at full rank; no thresholds, no
importance, no lse kept, and the span kernel's loads wait on no loaded data (its plans say ``full_rank``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Optional

import torch

from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionType,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from ap_vllm.backend.cpu_prefill import CpuFreshAttention
from ap_vllm.backend.metadata import AttentionPackMetadata, AttentionPackMetadataBuilder, LseSlots
from ap_vllm.backend.read_counts import ReadCounter
from ap_vllm.config import AttentionPackConfig, config_from_vllm, layer_index, model_layers
from ap_vllm.core.batched_decode import paged_decode_batched
from ap_vllm.core.compaction import COMPACTION_CALL_TOKENS, compact_spans
from ap_vllm.core.exact_rows import exact_rows_attention, sdpa_row_attention
from ap_vllm.core.lowrank_attention import thresholds_from_padded
from ap_vllm.core.paged import split_kv_cache, write_slots, write_token_rows
from ap_vllm.core.paged_decode import paged_mixed_decode, paged_prefill
from ap_vllm.core.paged_layout import gather_span_kv, pack_span, read_importances
from ap_vllm.core.prefill_torch import paged_prefill_torch
from ap_vllm.core.rope import RopeTable, rope_from_vllm
from ap_vllm.engine.spec import AttentionPackSpec

logger = init_logger("vllm.attentionpack")  # under "vllm" so vLLM's log handlers print it

SUPPORTED_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # (512: Gemma 4 global layers)
SUPPORTED_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# --kv-cache-dtype values: the model dtype, or float8 e4m3 pages with vLLM's per-layer k/v scales
SUPPORTED_KV_CACHE_DTYPES = ["auto", "fp8", "fp8_e4m3"]


class AttentionPackBackend(AttentionBackend):
    """Paged attention whose visual-token spans can be stored as low-rank factors."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = SUPPORTED_DTYPES
    supported_kv_cache_dtypes: ClassVar[list] = SUPPORTED_KV_CACHE_DTYPES

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
    def supports_mm_prefix(cls) -> bool:
        """The tokens of a multimodal item attend to each other both ways during prefill (vLLM's
        ``is_mm_prefix_lm`` models: Gemma 3 VLMs, ...): the builder gives each prefill query its last key
        (``Prefill.reach``) from ``CommonAttentionMetadata.mm_req_doc_ranges``."""
        return True

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Token-major blocks, one contiguous byte range per block and layer: a compacted span
        # is written as raw bytes over its blocks (ap_vllm.core.paged_layout).
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Global-attention layers get the spec whose KV manager frees compacted blocks. It pages exactly
        like full attention; with compaction off (or without AttentionPack's scheduler) its manager frees
        nothing, so the spec does not depend on the configuration (vLLM asks for it outside its config
        context)."""
        if type(spec) is FullAttentionSpec and spec.sliding_window is None:
            return AttentionPackSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__})
        return spec


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
        if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
            raise NotImplementedError(
                f"--kv-cache-dtype {kv_cache_dtype} is not supported by AttentionPack (allowed: "
                f"{', '.join(SUPPORTED_KV_CACHE_DTYPES)}; fp8 = float8 e4m3 pages)")
        self.fp8_cache = kv_cache_dtype != "auto"
        if self.fp8_cache and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
            raise NotImplementedError(
                f"--kv-cache-dtype {kv_cache_dtype} with AttentionPack needs a GPU with native float8 "
                f"(compute capability >= 8.9), this one has {torch.cuda.get_device_capability()}; use auto")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # a layer that reads another layer's KV cache (Gemma 3n / 4) owns no pages: their compaction and
        # importance updates are the target layer's
        self.owns_pages = kv_sharing_target_layer_name is None
        self.attn_type = attn_type
        vllm_config = get_current_vllm_config()
        self.config: AttentionPackConfig = config_from_vllm(vllm_config)
        self.rope: Optional[RopeTable] = None  # set by attach_rotary_tables (key_space="pre_rope")
        # this layer's lse of each request's last query, by slot (+ one scratch row), and its tag
        # (ap_vllm.backend.channel): the next decode step's importance normaliser
        self._lse: Optional[torch.Tensor] = None
        self._lse_tag: Optional[torch.Tensor] = None
        self._one: Optional[torch.Tensor] = None
        self._fresh: Optional[CpuFreshAttention] = None  # vLLM's CPU kernel for first chunks (cpu_prefill.py)
        self._fresh_checked = False
        self._read_counter = ReadCounter.from_env()  # a measurement, off by default (read_counts.py)
        if self._read_counter is not None and torch.cuda.is_available() and self.config.kernel != "torch":
            logger.warning_once("AP_VLLM_READ_COUNTS counts the torch decode path only; with kernel=%s on "
                                "CUDA nothing is counted (set kernel: torch to measure)", self.config.kernel)
        model = getattr(vllm_config, "model_config", None)
        self.num_layers = model_layers(model) if model is not None else 1
        total_heads = model.get_total_num_kv_heads() if model is not None else num_kv_heads
        share = (f" (ranks of this worker's {num_kv_heads} of the model's {total_heads} KV heads)"
                 if num_kv_heads < total_heads else "")
        logger.info_once("AttentionPack backend active: %s%s", str(self.config.model_dump(exclude_defaults=True)),
                         share)

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
        md = attn_metadata
        if md is None:  # profiling / warm-up run
            return output
        # layout key of this layer's spans (None: nothing compacted in this layer)
        key = md.layer_keys.get(layer.layer_name) if self.sliding_window is None else None
        kv_cache = self._typed(kv_cache)
        nb, hkv, bs, _ = kv_cache.shape
        # vLLM's pages are token-major ([blocks, block_size, H, 2d] in memory): the kernels' view
        # [blocks, 2 (K, V), block_size, H, d] of the same bytes, each block one dense range.
        cache = kv_cache.transpose(1, 2).view(nb, bs, hkv, 2, self.head_size).permute(0, 3, 1, 2, 4)
        kernels = self.config.use_triton(query.device)
        if md.decode is not None:
            self._decode(layer, query, cache, md, key, output, kernels)
        if md.prefill is not None:
            self._prefill(layer, query, cache, kv_cache, md, key, output, kernels)
        if md.compaction is not None and layer.layer_name == md.compaction.last_layer:
            self.finish_step(md)
        return output

    def finish_step(self, md: AttentionPackMetadata) -> None:
        """Compact the spans every layer queued in this step (3.), in one batched factorisation per rank group.
        The step's last layer calls it at the end of its forward; a runner that drives only some layers of a
        step (a test, a benchmark) calls it after them. Idempotent."""
        if md is not None and md.compaction is not None and md.compaction.jobs:
            jobs, md.compaction.jobs = md.compaction.jobs, []
            self._compact(jobs)

    def _typed(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """vLLM allocates an FP8 cache as uint8: its float8 e4m3 view (the model dtype's cache as it is)."""
        return kv_cache.view(torch.float8_e4m3fn) if self.fp8_cache and kv_cache.dtype == torch.uint8 else kv_cache

    @staticmethod
    def _kv_scales(layer) -> tuple[float, float]:
        """vLLM's per-layer k/v scales of an FP8 cache (1.0 unless the checkpoint or --calculate-kv-scales
        sets them; read as Python floats, as vLLM's own CPU backend does)."""
        return getattr(layer, "_k_scale_float", 1.0), getattr(layer, "_v_scale_float", 1.0)

    # ---- the lse slot buffers -----------------------------------------------------------
    def _lse_buffers(self, layer: AttentionLayer, md: AttentionPackMetadata, slots: LseSlots,
                     device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's lse of each request's last query by slot, and the tags (the builder's, allocated
        before any CUDA graph is captured; a layer without them, e.g. in a test, allocates its own)."""
        bufs = md.lse_buffers.get(layer.layer_name)
        if bufs is not None:
            return bufs
        if self._lse is None or self._lse.shape[0] != slots.capacity + 1:
            self._lse = torch.full((slots.capacity + 1, self.num_heads), float("inf"), device=device)
            self._lse_tag = torch.full((slots.capacity + 1,), -1, dtype=torch.int64, device=device)
        return self._lse, self._lse_tag

    def _previous_lse(self, layer, md, slots: LseSlots, device) -> torch.Tensor:
        """[rows, Hq]: each row's lse of the step one token earlier, +inf where this layer has none."""
        lse, tag = self._lse_buffers(layer, md, slots, device)
        hit = tag.index_select(0, slots.slot) == slots.expect
        return torch.where(hit[:, None], lse.index_select(0, slots.slot), float("inf"))

    def selection(self, md: AttentionPackMetadata) -> str:
        """How this step's decode rows read spans: the builder's say (an EAGLE or MTP head's layers: ``full``), else
        this layer's configuration."""
        return md.value_selection or self.config.value_selection

    def keeps_lse(self, md: AttentionPackMetadata) -> bool:
        """Whether a layer's last lse of each request is kept for the next step: the normaliser of the EMA
        update and of score selection (``value_selection: full`` selects nothing and keeps none)."""
        return self.selection(md) != "full"

    def _remember_lse(self, layer, md, slots: LseSlots, lse: torch.Tensor) -> None:
        if not self.keeps_lse(md):
            return
        buf, tag = self._lse_buffers(layer, md, slots, lse.device)
        buf.index_copy_(0, slots.slot, lse.float())
        tag.index_copy_(0, slots.slot, slots.store)

    # ---- the three phases -----------------------------------------------------------------
    def _compaction_rope(self, layer: AttentionLayer) -> Optional[RopeTable]:
        """The rotary table spans of this layer are compacted with (None: post-RoPE keys)."""
        if self.config.key_space != "pre_rope":
            return None
        if self.rope is None:
            raise RuntimeError(f"key_space='pre_rope': layer {layer.layer_name} has no rotary table attached "
                               "(ap_vllm.backend.attentionpack.attach_rotary_tables runs after model loading)")
        return self.rope

    def _decode(self, layer: AttentionLayer, query: torch.Tensor, cache: torch.Tensor, md: AttentionPackMetadata,
                key, output: torch.Tensor, kernels: bool) -> None:
        """Decode rows: one call for all of them (see the module docstring, 1.)."""
        cfg, dec = self.config, md.decode
        step = dec.steps.get(key) or dec.steps[None]
        q = query[: dec.num_rows] if dec.q_idx is None else query.index_select(0, dec.q_idx)
        rope = self._compaction_rope(layer) if step.has_spans else None
        thresholds = None
        selection = self.selection(md)
        score = selection == "score"  # values selected by this step's scores: no importance kept
        by_ema = selection == "ema"  # ('full': every token at full rank, nothing selected nor kept)
        if step.importance is not None:  # two-level read: this layer's thresholds, computed on the device
            index, valid, ranks = step.importance
            thresholds = thresholds_from_padded(read_importances(cache, index, valid), ranks)
        elif step.num_spans is not None and by_ema and cfg.importance_fraction < 1.0:  # static: threshold kernel
            from ap_vllm.kernels.thresholds import span_thresholds_triton

            thresholds = span_thresholds_triton(cache, dec.block_table, step.plan.meta, step.num_spans,
                                                cfg.importance_fraction, cfg.threshold_sample_tokens)
        keep = step.has_spans and self.keeps_lse(md)
        lse_ref = self._previous_lse(layer, md, dec.lse, query.device) if keep else None
        kv_scales = self._kv_scales(layer) if self.fp8_cache else None
        ema = cfg.importance_ema if by_ema and self.owns_pages else None
        score_threshold = cfg.score_threshold if score and step.has_spans else None
        if kernels:
            plan = step.plan if thresholds is None else replace(step.plan, thresholds=thresholds)
            opts = {"span_kernel": "cuda"} if cfg.kernel == "cuda" else {}
            if step.num_spans is not None:
                opts["num_spans"] = step.num_spans
            if dec.q_idx is None:  # the merge writes the rows' output in its dtype: no float32 copy, no cast
                opts["out"] = output[: dec.num_rows].view(dec.num_rows, self.num_heads, self.head_size)
            out, lse = paged_mixed_decode(
                q, cache, dec.block_table, dec.seq_lens, plan, self.scale, softcap=self.logits_soft_cap,
                window=self.sliding_window, max_seq_len=dec.max_seq_len, kernel="triton", rope=rope,
                lse_ref=lse_ref, importance_ema=ema, score_threshold=score_threshold, kv_scales=kv_scales, **opts)
        else:
            counter = self._read_counter if step.has_spans else None
            out, lse = paged_decode_batched(
                q, cache, step.batched, self.scale, softcap=self.logits_soft_cap, window=self.sliding_window,
                thresholds=thresholds, lse_ref=lse_ref, importance_ema=ema if step.has_spans else None,
                rope=rope, score_threshold=score_threshold, kv_scales=kv_scales,
                read_counts=None if counter is None else counter.buffer(layer.layer_name, q.device))
            if counter is not None:
                counter.write()
        if dec.q_idx is not None:
            output.index_copy_(0, dec.q_idx, out.to(output.dtype))
        elif out.data_ptr() != output.data_ptr():  # (the kernels wrote it in place)
            output[: dec.num_rows] = out.to(output.dtype)
        if key is not None:
            self._remember_lse(layer, md, dec.lse, lse)

    def _prefill(self, layer: AttentionLayer, query: torch.Tensor, cache: torch.Tensor, kv_cache: torch.Tensor,
                 md: AttentionPackMetadata, key, output: torch.Tensor, kernels: bool) -> None:
        """The other rows in one call (2.), then the spans completing in this step are compacted (3.)."""
        pre = md.prefill
        step = pre.steps.get(key) or pre.steps[None]
        q = query[pre.q_slice] if pre.q_idx is None else query.index_select(0, pre.q_idx)
        rope = self._compaction_rope(layer) if step.spans else None
        kv_scales = self._kv_scales(layer) if self.fp8_cache else None
        if kernels and pre.num_fresh and self._sdpa_rows(q):
            out, lse = self._prefill_split(q, cache, pre, step, rope, kv_scales,
                                           output[pre.q_slice] if pre.q_idx is None else None,
                                           keep_lse=key is not None and self.keeps_lse(md))
        elif kernels:
            out, lse = paged_prefill(q, cache, pre.block_table, pre.query_start_loc, pre.seq_lens, step.plan,
                                     self.scale, max_query_len=pre.max_query_len, max_seq_len=pre.max_seq_len,
                                     softcap=self.logits_soft_cap, window=self.sliding_window, kernel="triton",
                                     rope=rope, kv_scales=kv_scales, reach=pre.reach)
        else:  # CPU: fused attention per row (host lengths from the builder; no device to wait for)
            out, lse = paged_prefill_torch(q, cache, pre.block_table, pre.host_query_start_loc, pre.host_seq_lens,
                                           step.spans, self.scale, self.logits_soft_cap, self.sliding_window, rope,
                                           kv_scales, fresh_attention=self._fresh_attention(q), reach=pre.reach)
        if pre.q_idx is not None:
            output.index_copy_(0, pre.q_idx, out.to(output.dtype))
        elif out.data_ptr() != output[pre.q_slice].data_ptr():  # (else written in place)
            output[pre.q_slice] = out.to(output.dtype)
        if key is not None:  # the next decode step's importance normaliser
            if lse is not None:
                self._remember_lse(layer, md, pre.lse, lse.index_select(0, pre.last_rows))
            if step.completing and self.owns_pages:  # compacted at the end of the step (finish_step)
                job = self._compaction_job(layer, cache, step.completing, kernels, q.dtype)
                if md.compaction is None:  # (metadata made without the builder: at once)
                    self._compact([job])
                else:
                    md.compaction.jobs.append(job)

    def _sdpa_rows(self, q: torch.Tensor) -> bool:
        """Whether this layer's fresh prefill rows run through SDPA (:mod:`ap_vllm.core.exact_rows`): no soft-cap,
        no window (SDPA has neither), and half precision on CUDA (its flash kernel's)."""
        return (self.logits_soft_cap is None and self.sliding_window is None
                and (q.dtype in (torch.float16, torch.bfloat16) or not q.is_cuda))

    def _prefill_split(self, q: torch.Tensor, cache: torch.Tensor, pre, step, rope, kv_scales,
                       out: Optional[torch.Tensor], keep_lse: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kernel path's rows when some are fresh (a prompt's first chunk; the builder lists those last): the
        others through the exact kernel and the span instances (a prefix of every buffer), the fresh ones through
        SDPA, one call per row (:mod:`ap_vllm.core.exact_rows`: PyTorch's flash kernel on CUDA, 1.7-2.1x faster
        than the exact Triton kernel on an H200). Writes ``out`` [Nq, Hq, d] (the layer output's
        rows; None: a new tensor in q's dtype) and returns it with, when ``keep_lse``, lse [Nq, Hq] (valid at
        each row's last query)."""
        n = len(pre.host_seq_lens)
        first = n - pre.num_fresh
        qsl = pre.host_query_start_loc
        if out is None:
            out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if keep_lse else None
        if first:
            t = qsl[first]
            _, l = paged_prefill(q[:t], cache, pre.block_table[:first], pre.query_start_loc[: first + 1],
                                 pre.seq_lens[:first], step.plan, self.scale,
                                 max_query_len=pre.rest_max_query_len, max_seq_len=pre.rest_max_seq_len,
                                 kernel="triton", out=out[:t], rope=rope, kv_scales=kv_scales,
                                 reach=None if pre.reach is None else pre.reach[:t])
            if lse is not None:
                lse[:t] = l
        exact_rows_attention(sdpa_row_attention, q, cache, pre.block_table, qsl, pre.host_seq_lens,
                             range(first, n), self.scale, kv_scales, out, lse)
        return out, lse

    def _fresh_attention(self, q: torch.Tensor) -> Optional[CpuFreshAttention]:
        """vLLM's CPU attention kernel for first chunks, where this vLLM has one (looked up once)."""
        if not self._fresh_checked and q.device.type == "cpu":
            self._fresh_checked = True
            self._fresh = CpuFreshAttention.create(q.dtype, self.head_size)
        return self._fresh if q.device.type == "cpu" else None

    def _compaction_job(self, layer: AttentionLayer, cache: torch.Tensor, completing: list, kernels: bool,
                        dtype: torch.dtype) -> dict:
        """What compacting this layer's completing spans needs (no data is read yet): its cache view, the
        (block-table row, plan, layout) triples, its sketch seed (the configured seed + the layer index, as
        when each layer compacted its own), FP8 scales, rotary table and the model dtype."""
        return dict(layer=layer.layer_name, seed=self.config.seed + layer_index(layer.layer_name, self.num_layers),
                    cache=cache, items=completing, kernels=kernels, dtype=dtype,
                    scales=self._kv_scales(layer) if self.fp8_cache else None, rope=self._compaction_rope(layer))

    def _compact(self, jobs: list) -> None:
        """Compact the queued spans of ``jobs`` (one per layer) and write each compact form into its span's own
        first blocks: spans of every layer with equal ranks and rotary table form one batch, factorised together
        (:func:`ap_vllm.core.compaction.compact_spans`, no host sync; on a GPU the float32 Gram method with its
        Triton step, whose launches do not grow with the batch) in calls of at most
        :data:`COMPACTION_CALL_TOKENS` span tokens (the transient copies grow with them: about 22 W bytes a
        token), and packed by the Triton writer (``kernels``) or the torch one. Bases in the model dtype; an FP8
        cache's tokens are dequantized first. The exact tokens are read here, so this runs within the step that
        wrote them (blocks the step frees are reused afterwards)."""
        cfg = self.config
        groups: dict[tuple, list] = {}
        for job in jobs:
            for row, p, layout in job["items"]:
                key = (layout.key_rank, layout.value_rank, id(job["rope"]), job["dtype"])
                groups.setdefault(key, []).append((job, row, p, layout))
        for (rk, rv, _, dtype), items in groups.items():
            device_path = {}
            if items[0][0]["cache"].device.type == "cuda":  # the Gram method: few launches, no host sync
                from ap_vllm.kernels.compaction import device_compaction

                device_path = device_compaction()
            start = 0
            while start < len(items):  # calls of at most COMPACTION_CALL_TOKENS span tokens (at least one span)
                end, tokens = start, 0
                while end < len(items) and (end == start or tokens + items[end][2].num_tokens
                                            <= COMPACTION_CALL_TOKENS):
                    tokens += items[end][2].num_tokens
                    end += 1
                chunk, start = items[start:end], end
                kv = [gather_span_kv(job["cache"], row, p.start, p.end, job["scales"]) for job, row, p, _ in chunk]
                compacted = compact_spans(
                    [k.to(dtype) for k, _ in kv], [v.to(dtype) for _, v in kv], rk, rv,
                    starts=[p.start for _, _, p, _ in chunk], energy_threshold=cfg.energy_threshold,
                    oversample=cfg.svd_oversample, power_iters=cfg.svd_power_iters,
                    seed=[job["seed"] for job, _, _, _ in chunk],
                    coefficient_dtype=cfg.coefficient_dtype, rope=chunk[0][0]["rope"],
                    **device_path)  # (each span's importance starts at zero)
                for (job, row, p, layout), span in zip(chunk, compacted):
                    pack_span(job["cache"], row[p.first_block: p.first_block + layout.num_blocks], span, layout,
                              kernel=job["kernels"])

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """New tokens into the cache, padding slots (-1) skipped on the device (no sync): vLLM's Triton
        ``reshape_and_cache_flash`` on CUDA, the torch writer elsewhere; an FP8 cache stores them quantized
        with the layer's k/v scales, as vLLM's own backends do."""
        if kv_cache.is_cuda:
            from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash

            pages = kv_cache.transpose(1, 2)  # [blocks, block_size, H, 2d]
            k_scale, v_scale = getattr(layer, "_k_scale", None), getattr(layer, "_v_scale", None)
            if k_scale is None or v_scale is None:  # (unquantized cache: the scales are not read)
                if self._one is None or self._one.device != kv_cache.device:
                    self._one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
                k_scale = v_scale = self._one
            triton_reshape_and_cache_flash(key, value, pages[..., : self.head_size], pages[..., self.head_size:],
                                           slot_mapping, self.kv_cache_dtype, k_scale, v_scale)
        else:
            # (FP8 rounded toward zero, as CPU_ATTN stores it: the same bytes as vLLM's own CPU backend)
            typed = self._typed(kv_cache)
            scales = self._kv_scales(layer) if self.fp8_cache else None
            pages = typed.transpose(1, 2)  # vLLM's token-major pages [blocks, block_size, H, 2d]
            if pages.is_contiguous():
                write_token_rows(pages, key, value, slot_mapping, scales, toward_zero=True)
            else:
                key_cache, value_cache = split_kv_cache(typed, self.head_size)
                write_slots(key_cache, value_cache, key, value, slot_mapping, scales, toward_zero=True)


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
