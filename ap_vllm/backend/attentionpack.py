"""The AttentionPack attention backend for vLLM: Backend + MetadataBuilder + Impl.

Selected with ``--attention-backend attentionpack`` (an alias of vLLM's ``CUSTOM`` slot, see
:mod:`ap_vllm.plugin`). K/V live in vLLM's paged cache (layout in :mod:`ap_vllm.core.paged`);
attention for prefill, chunked prefill, mixed prefill/decode batches and decode is computed
per request by the exact reference (:func:`ap_vllm.core.dense.dense_attention`), with
grouped-query attention, sliding windows and logit soft-capping.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from vllm.v1.kv_cache_interface import AttentionSpec

from ap_vllm.config import AttentionPackConfig, config_from_vllm
from ap_vllm.core.dense import dense_attention
from ap_vllm.core.paged import gather_tokens, split_kv_cache, write_slots

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

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


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
        return AttentionPackMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: num_reqs + 1].tolist(),
            seq_lens=m.seq_lens[:num_reqs].cpu().tolist(),
            block_table=m.block_table_tensor[:num_reqs],
            slot_mapping=m.slot_mapping[: m.num_actual_tokens],
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

        self.config: AttentionPackConfig = config_from_vllm(get_current_vllm_config())
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
        for i in range(attn_metadata.num_reqs):
            q_start, q_end, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
            if q_end == q_start:
                continue
            first_q_pos = seq_len - (q_end - q_start)
            kv_start = 0
            if self.sliding_window is not None:
                kv_start = max(0, first_q_pos - self.sliding_window + 1)
            row = attn_metadata.block_table[i]
            k = gather_tokens(key_cache, row, kv_start, seq_len)
            v = gather_tokens(value_cache, row, kv_start, seq_len)
            device = query.device
            out, _ = dense_attention(
                query[q_start:q_end], k, v, self.scale,
                q_pos=torch.arange(first_q_pos, seq_len, device=device),
                k_pos=torch.arange(kv_start, seq_len, device=device),
                window=self.sliding_window, softcap=self.logits_soft_cap,
            )
            output[q_start:q_end] = out.to(output.dtype)
        return output

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
