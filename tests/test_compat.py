"""ap_vllm.compat: the version gate of vLLM internals, and the hooks it installs, in-process."""

import importlib
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from ap_vllm import compat  # noqa: E402
from ap_vllm.engine import policy  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    from ap_vllm.plugin import register

    register()


@pytest.fixture
def records():
    """Records of vLLM's "vllm.attentionpack" logger (vLLM's loggers do not propagate to the root)."""
    logger = logging.getLogger("vllm.attentionpack")
    found: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = found.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield found
    logger.removeHandler(handler)
    logger.setLevel(level)


def _resolve(target: str):
    """The object a dotted ``module.Class.attr`` target names (None when a part is not a static attribute)."""
    parts = target.split(" ")[0].split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name, None)
        return obj
    return None


def test_release_series():
    assert compat.release_series("0.32.0+cpu") == "0.32"
    assert compat.release_series("0.33.1.dev12+g1234") == "0.33"
    assert compat.release_series("v1.0") == "1.0"
    assert compat.release_series("dev") == "dev"


def test_every_touch_is_verified_on_the_installed_vllm():
    import vllm

    assert compat.release_series(vllm.__version__) == "0.32"
    assert compat.unverified_touches() == []
    names = [t.name for t in compat.TOUCHES]
    assert len(names) == len(set(names))
    assert compat.unverified_touches("0.33.0") == []  # read against the 0.33.0 wheel's sources
    assert compat.unverified_touches("0.34.0") == list(compat.TOUCHES)  # 0.34 is not claimed


@pytest.mark.parametrize("name", ["backend_name_alias", "builtin_kv_cache_specs", "cpu_backend_selection",
                                  "engine_config_check", "runner_step_channel", "rotary_tables_after_load",
                                  "request_pool_check", "remove_blocks_in_range", "request_freed"])
def test_class_level_targets_exist_on_the_installed_vllm(name):
    touch = next(t for t in compat.TOUCHES if t.name == name)
    assert _resolve(touch.target) is not None, touch.target


def test_an_unverified_vllm_is_logged_with_every_touch(monkeypatch, records):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    touches = compat.warn_unverified()
    assert touches == list(compat.TOUCHES)
    (record,) = [r for r in records if r.levelno == logging.WARNING]
    msg = record.getMessage()
    assert "vLLM 0.34.0" in msg and "checked on: 0.32, 0.33" in msg
    for touch in compat.TOUCHES:
        assert f"{touch.name} ({touch.target})" in msg
    compat.warn_unverified()  # once per process
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1


def test_apply_on_an_unverified_vllm_logs_and_keeps_the_touches(monkeypatch, records):
    import vllm
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    monkeypatch.setattr(vllm, "__version__", "0.34.2")
    noop = lambda *a: None  # noqa: E731
    compat.apply(attach_rotary_tables=noop, check_request_fits=noop, begin_step=noop, end_step=noop,
                 before_build=noop, configure=noop)
    assert any("vLLM 0.34.2" in r.getMessage() for r in records)
    assert compat._ours(CpuPlatform.get_attn_backend_cls) and compat._ours(GPUModelRunner._build_attention_metadata)
    # applied once: the wrap wraps vLLM's own method, not an earlier wrap
    assert not compat._ours(CpuPlatform.get_attn_backend_cls.__func__.__wrapped__)


def test_verified_vllm_logs_nothing(records):
    assert compat.warn_unverified() == []
    assert not [r for r in records if r.levelno >= logging.WARNING]


def test_a_missing_internal_names_its_touch():
    with pytest.raises(compat.IncompatibleVllmError,
                       match=r"_null_block is gone \(touch 'null_block', checked on vLLM 0.32, 0.33\)"):
        compat.null_block(SimpleNamespace())
    with pytest.raises(compat.IncompatibleVllmError, match="touch 'kv_cache_managers'"):
        compat.kv_cache_managers(SimpleNamespace(coordinator=SimpleNamespace()))


def test_runner_step_channel_brackets_the_builders(monkeypatch):
    """begin_step(runner, num_reqs) before vLLM builds the step's attention metadata, end_step(runner)
    after, also when building fails; nothing when AttentionPack is not selected."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    calls = []

    def original(self, num_tokens, num_reqs, max_query_len, **kwargs):
        calls.append(("build", num_reqs))
        if kwargs.get("fail"):
            raise RuntimeError("build failed")
        return "metadata"

    monkeypatch.setattr(GPUModelRunner, "_build_attention_metadata", original)
    compat.open_runner_step_channel(lambda runner, n: calls.append(("begin", runner.name, n)),
                                    lambda runner: calls.append(("end", runner.name)))

    def runner(backend):
        return SimpleNamespace(name="r", vllm_config=SimpleNamespace(attention_config=SimpleNamespace(backend=backend)))

    assert GPUModelRunner._build_attention_metadata(runner(E.CUSTOM), 10, 3, 5) == "metadata"
    assert calls == [("begin", "r", 3), ("build", 3), ("end", "r")]
    calls.clear()
    assert GPUModelRunner._build_attention_metadata(runner(E.CUSTOM), num_tokens=4, num_reqs=2,
                                                    max_query_len=1) == "metadata"
    assert calls == [("begin", "r", 2), ("build", 2), ("end", "r")]
    calls.clear()
    with pytest.raises(RuntimeError, match="build failed"):
        GPUModelRunner._build_attention_metadata(runner(E.CUSTOM), 10, 3, 5, fail=True)
    assert calls == [("begin", "r", 3), ("build", 3), ("end", "r")]
    calls.clear()
    GPUModelRunner._build_attention_metadata(runner(E.CPU_ATTN), 10, 3, 5)
    assert calls == [("build", 3)]


def test_runner_accessors():
    requests = {"a": SimpleNamespace(mm_features=["f"], num_prompt_tokens=7), "b": None}
    runner = SimpleNamespace(requests=requests, input_batch=SimpleNamespace(req_ids=["a", "b", "c"],
                                                                            num_computed_tokens_cpu=[5, 0, 9]),
                             attn_groups=[[SimpleNamespace(metadata_builders=[1, 2])],
                                          [SimpleNamespace(metadata_builders=[3])]],
                             vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=8)))
    assert compat.runner_batch(runner, 2) == (["a", "b"], requests)
    assert compat.runner_batch(runner, 4) == (None, requests)
    assert compat.runner_batch(runner, 0) == (None, requests)
    assert compat.runner_num_computed_tokens(runner, 2) == [5, 0]
    assert compat.request_features(requests["a"]) == (["f"], 7)
    assert compat.runner_metadata_builders(runner) == [1, 2, 3]
    assert compat.runner_max_num_seqs(runner) == 8


def test_compaction_sets_our_scheduler_and_keeps_prefix_caching(records):
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from ap_vllm.selection import ASYNC_SCHEDULER_CLS, SCHEDULER_CLS

    def vllm_config(async_scheduling, scheduler_cls=None, dcp=1, section=None):
        return SimpleNamespace(
            scheduler_config=SimpleNamespace(async_scheduling=async_scheduling, scheduler_cls=scheduler_cls),
            cache_config=SimpleNamespace(enable_prefix_caching=True),
            parallel_config=SimpleNamespace(decode_context_parallel_size=dcp),
            additional_config={"attentionpack": section or {}})

    for async_scheduling, path, base in ((False, SCHEDULER_CLS, Scheduler),
                                         (True, ASYNC_SCHEDULER_CLS, AsyncScheduler)):
        vc = vllm_config(async_scheduling)
        policy.configure(vc)
        assert vc.scheduler_config.scheduler_cls == path and vc.cache_config.enable_prefix_caching
        assert issubclass(resolve_obj_by_qualname(path), base)
    policy.configure(vllm_config(False, section={"value_selection": "ema"}))
    assert any("prefix caching stops at the first compacted span" in r.getMessage() for r in records)
    with pytest.raises(ValueError, match="decode context parallelism .*--decode-context-parallel-size 2"):
        policy.configure(vllm_config(False, dcp=2))
    with pytest.raises(ValueError, match="--scheduler-cls my.Scheduler cannot be combined"):
        policy.configure(vllm_config(False, "my.Scheduler"))
    # KV connectors move blocks as exact KV: refused, whatever sets them (--kv-offloading-size too)
    from vllm.config import KVTransferConfig

    for connector in ("ExampleConnector", "OffloadingConnector"):
        vc = vllm_config(False)
        vc.kv_transfer_config = KVTransferConfig(kv_connector=connector, kv_role="kv_both")
        with pytest.raises(ValueError, match=rf"--kv-transfer-config \(KV connector '{connector}'.*enabled"):
            policy.configure(vc)
    # sliding-window or chunked local layers need the hybrid KV-cache manager (the full layers' own group)
    mixed, full, sliding = (["sliding_attention", "full_attention"], ["full_attention"] * 2, ["sliding_attention"] * 2)
    for text, chunk, disabled, refused in (
            (dict(layer_types=mixed, sliding_window=512), None, True, True),
            (dict(layer_types=mixed, sliding_window=512), None, False, False),
            (dict(layer_types=full, sliding_window=None), None, True, False),
            (dict(layer_types=sliding, sliding_window=512), None, True, False),  # (nothing compacted there)
            (dict(sliding_window=4096), None, True, True),  # (no layer types: a window in use)
            (dict(sliding_window=4096, use_sliding_window=False), None, True, False),
            (dict(), 256, True, True)):  # (chunked local attention)
        vc = vllm_config(False)
        vc.model_config = SimpleNamespace(hf_text_config=SimpleNamespace(**text), attention_chunk_size=chunk)
        vc.scheduler_config.disable_hybrid_kv_cache_manager = disabled
        vc.cache_config.enable_prefix_caching = False
        if refused:
            with pytest.raises(ValueError, match="needs vLLM's hybrid KV-cache manager .*--disable-hybrid-kv-cache"):
                policy.configure(vc)
        else:
            policy.configure(vc)
    # a model whose multimodal items attend to each other both ways: each item prefilled in one step
    for prefix_lm, multimodal in ((True, True), (True, False), (False, True)):
        vc = vllm_config(False)
        vc.model_config = SimpleNamespace(is_mm_prefix_lm=prefix_lm)
        vc.cache_config.enable_prefix_caching = False
        vc.scheduler_config.is_multimodal_model = multimodal
        vc.scheduler_config.disable_chunked_mm_input = False
        policy.configure(vc)
        assert vc.scheduler_config.disable_chunked_mm_input == (prefix_lm and multimodal)


def test_hit_images_keep_their_tensors_for_a_rescheduled_encoder(monkeypatch):
    """vLLM drops the tensors of an image a new request's prefix-cache hit covers from what its workers receive;
    after a preemption the image's encoder can be scheduled again and the worker would fail ("Encoder cache
    miss"). With the touch, NewRequestData keeps them (and the touch is applied once)."""
    import vllm.v1.core.sched.output as sched_output
    from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange

    monkeypatch.setattr(sched_output, "strip_covered_mm_data", sched_output.strip_covered_mm_data)
    image = MultiModalFeatureSpec(data=MultiModalKwargsItem({}), modality="image", identifier="h",
                                  mm_position=PlaceholderRange(offset=2, length=10))
    assert sched_output.strip_covered_mm_data([image], 20)[0].data is None  # vLLM's: covered by a 20-token hit
    compat.keep_mm_data_for_resumption()
    patched = sched_output.strip_covered_mm_data
    assert compat._ours(patched) and sched_output.strip_covered_mm_data([image], 20)[0].data is not None
    compat.keep_mm_data_for_resumption()
    assert sched_output.strip_covered_mm_data is patched


def test_a_drafters_next_prompt_token_and_draft_slots():
    """The two corrections of an EAGLE head's inputs: a partial prefill's row gets the token after its chunk (not the
    prompt's last one), other rows keep theirs; a draft token's slot is its token index through the block table
    (vLLM 0.32 took the temporal M-RoPE coordinate), -1 past max_model_len."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    prompt = list(range(100, 140))
    requests = [SimpleNamespace(get_token_id=lambda i, p=prompt: p[i]) for _ in range(3)]
    next_ids = torch.tensor([139, 7, 139], dtype=torch.int32)  # (rows 0 and 2: vLLM's backup, the last token)
    compat.next_prompt_tokens(next_ids, requests, np.array([True, False, True]), np.array([12, 40, 33]))
    assert next_ids.tolist() == [112, 7, 133]
    table = torch.tensor([[5, 9, 7, 0], [3, 4, 6, 8]], dtype=torch.int32)  # blocks of 16
    slots = compat.draft_slots(torch.tensor([37, 64]), table, 16, 60)
    assert slots.tolist() == [7 * 16 + 4, -1]  # token 36: table entry 2 (block 7), row 4; token 63 >= 60
    assert compat.draft_slots(torch.tensor([17]), table[:1], 16, 60).tolist() == [9 * 16 + 0]
