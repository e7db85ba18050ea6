"""What compaction asks of vLLM's configuration: decided once at start-up, right after vLLM built it.

:func:`ap_vllm.compat.check_engine_config` (the touch that sees the finished ``VllmConfig`` in the API-server
process) calls these two, which :func:`ap_vllm.plugin.register` hands to it:

* :func:`before_build`, before vLLM builds its config: the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``; the
  runner channel, :func:`ap_vllm.compat.open_runner_step_channel`, exists for V1 only, and vLLM reads the variable
  while it builds the config);
* :func:`configure`, on the built config: what compaction cannot serve is refused with the option that asks for it
  and what to do instead, and what it needs is set, each with one log line.

Refused (each measured wrong before, or not planned by the backend):

* a KV connector (``--kv-transfer-config``, also set by ``--kv-offloading-size``): it saves and loads blocks as
  exact KV, while a compacted span sits in compact form in fewer blocks (measured: vLLM's ExampleConnector
  answered a repeated image request with other tokens);
* vLLM's hybrid KV-cache manager off for a model with sliding-window or chunked local layers beside full ones
  (measured: the engine died on its first image request, the sliding window planned over the full layers' pages);
* another ``--scheduler-cls``; decode context parallelism with prefix caching.

Set: our scheduler class (:mod:`ap_vllm.engine.scheduler`); each multimodal item in one prefill step for models
whose items attend both ways (``disable_chunked_mm_input``, as vLLM's CUDA platform does for them); the drafter's
attention backend for draft models whose layers share the model's blocks (:data:`ap_vllm.config.
DRAFT_MODEL_METHODS`).
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

from ap_vllm.config import DRAFT_MODEL_METHODS, config_from_vllm
from ap_vllm.selection import ASYNC_SCHEDULER_CLS, SCHEDULER_CLS

logger = init_logger("vllm.attentionpack")

_DISABLE = '--additional-config \'{"attentionpack": {"enabled": false}}\''


def before_build() -> None:
    """Compaction on, before vLLM builds its config: the V1 model runner."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") not in ("0", "false", "False"):
        logger.info("AttentionPack compaction: using the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0).")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def mixes_local_and_full_attention(model: Any) -> bool:
    """Whether the model has sliding-window or chunked local attention layers beside full-attention ones: its
    ``layer_types`` when the config lists them, else a chunk size or a sliding window in use."""
    text = getattr(model, "hf_text_config", None)
    types = getattr(text, "layer_types", None)
    if types:
        return bool({"sliding_attention", "chunked_attention"} & set(types)) and "full_attention" in types
    return (getattr(model, "attention_chunk_size", None) is not None
            or (getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)))


def configure(vllm_config: Any) -> None:
    """Compaction on, on vLLM's built config: refuses what it cannot serve (``ValueError`` naming the option),
    sets what it needs (module docstring)."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is not None:
        raise ValueError(
            f"--kv-transfer-config (KV connector {getattr(transfer, 'kv_connector', None)!r}; also set by "
            "--kv-offloading-size) cannot be combined with AttentionPack compaction: a connector saves and loads a "
            "request's blocks as exact KV, while compaction keeps an image's span in compact form in fewer blocks, "
            f"so KV loaded back would be read wrongly. Serve without the connector, or disable compaction with "
            f"{_DISABLE}")
    sched = vllm_config.scheduler_config
    model = getattr(vllm_config, "model_config", None)
    if mixes_local_and_full_attention(model) and getattr(sched, "disable_hybrid_kv_cache_manager", False):
        raise ValueError(
            "AttentionPack compaction needs vLLM's hybrid KV-cache manager for a model with sliding-window or "
            "chunked local attention layers (its full-attention layers get a KV-cache group of their own, the one "
            "compacted), but it is off (--disable-hybrid-kv-cache-manager true, or turned off by vLLM for this "
            "configuration: chunked local attention without VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE=1, "
            f"a KV connector). Serve with it on, or disable compaction with {_DISABLE}")
    ours = ASYNC_SCHEDULER_CLS if sched.async_scheduling else SCHEDULER_CLS
    if sched.scheduler_cls not in (None, ours):
        raise ValueError(f"--scheduler-cls {sched.scheduler_cls} cannot be combined with AttentionPack compaction "
                         f"(it needs its own scheduler); disable compaction with {_DISABLE} or drop --scheduler-cls")
    sched.scheduler_cls = ours
    if (getattr(model, "is_mm_prefix_lm", False) and getattr(sched, "is_multimodal_model", False)
            and not sched.disable_chunked_mm_input):
        # a multimodal item attended both ways is prefilled in one step, so each of its queries finds every key of
        # the item in the cache
        logger.info("AttentionPack: the model's multimodal items attend to each other both ways: each is "
                    "prefilled in one step (disable_chunked_mm_input).")
        sched.disable_chunked_mm_input = True
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and spec.method in DRAFT_MODEL_METHODS and spec.attention_backend is None:
        # vLLM picks a drafter's backend on its own (its default here), but the drafter's layers share the model's
        # blocks, whose spans are compacted: they must read them as this backend does
        logger.info("AttentionPack: the %s drafter's attention layers run on AttentionPack too (their visual spans "
                    "are compacted with the model's).", spec.method)
        spec.attention_backend = vllm_config.attention_config.backend
    if vllm_config.cache_config.enable_prefix_caching:
        if vllm_config.parallel_config.decode_context_parallel_size > 1:
            raise ValueError("AttentionPack compaction with prefix caching does not support decode context "
                             f"parallelism (got --decode-context-parallel-size "
                             f"{vllm_config.parallel_config.decode_context_parallel_size}); pass "
                             "--no-enable-prefix-caching or drop the option")
        if config_from_vllm(vllm_config).value_selection == "ema":
            logger.info("AttentionPack: prefix caching stops at the first compacted span of each request "
                        "(value_selection 'ema' keeps per-request importance in the span's pages).")
