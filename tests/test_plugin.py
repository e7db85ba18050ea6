"""Plugin registration and backend selection, in-process (no server)."""

import pytest
import torch

pytest.importorskip("vllm")

from ap_vllm.plugin import BACKEND_PATH, is_selected, register  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()
    register()  # idempotent


def selector(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", **kw):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=None,
                                   **kw)


def test_name_is_an_alias_of_custom():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    assert E["ATTENTIONPACK"] is E.CUSTOM
    assert E.CUSTOM.get_path() == BACKEND_PATH
    assert is_selected(E.CUSTOM) and not is_selected(E.CPU_ATTN) and not is_selected(None)


def test_cpu_platform_honours_the_selection_only_when_asked():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    assert CpuPlatform.get_attn_backend_cls(E.CUSTOM, selector()) == BACKEND_PATH
    cpu_default = E.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, selector()) == cpu_default
    assert CpuPlatform.get_attn_backend_cls(E.CPU_ATTN, selector()) == cpu_default


@pytest.mark.parametrize("kw, named", [({"head_size": 72}, "head_size=72"),
                                       ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype=fp8_e5m2"),
                                       ({"dtype": torch.int8}, "dtype=torch.int8")])
def test_unsupported_model_fails_with_the_value_and_what_is_allowed(kw, named):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    with pytest.raises(ValueError) as err:
        CpuPlatform.get_attn_backend_cls(E.CUSTOM, selector(**kw))
    msg = str(err.value)
    assert "attentionpack is not valid for this model" in msg and named in msg and "supported:" in msg


def test_models_with_multimodal_items_attended_both_ways_are_accepted():
    """vLLM's is_mm_prefix_lm models (Gemma 3 VLMs, ...): vLLM refuses backends without supports_mm_prefix."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    assert CpuPlatform.get_attn_backend_cls(E.CUSTOM, selector(use_mm_prefix=True)) == BACKEND_PATH


def test_compaction_spec_is_registered_with_its_manager():
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from ap_vllm.engine.kv_manager import AttentionPackManager
    from ap_vllm.engine.spec import AttentionPackSpec

    spec = AttentionPackSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    assert KVCacheSpecRegistry.get_manager_class(spec) is AttentionPackManager


def test_group_mixing_compacted_and_sliding_layers_frees_nothing():
    from dataclasses import replace

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from ap_vllm.engine.spec import AttentionPackSpec

    packed = AttentionPackSpec(block_size=16, num_kv_heads=1, head_size=256, dtype=torch.float32)
    assert type(AttentionPackSpec.merge([packed, packed])) is AttentionPackSpec
    sliding = replace(FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=256, dtype=torch.float32),
                      sliding_window=512)
    merged = AttentionPackSpec.merge([packed, sliding])
    assert type(merged) is FullAttentionSpec and merged.sliding_window == 512


def test_hooks_call_back_into_the_backend_and_the_engine():
    """register() hands compat the backend's runner channel, rotary attach and the engine's pool check."""
    import inspect

    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from ap_vllm.backend import attentionpack, channel
    from ap_vllm.engine import kv_manager

    step = inspect.getclosurevars(GPUModelRunner._build_attention_metadata).nonlocals
    assert step["begin_step"] is channel.begin_step and step["end_step"] is channel.end_step
    assert inspect.getclosurevars(Worker.load_model).nonlocals["attach_rotary_tables"] is \
        attentionpack.attach_rotary_tables
    assert inspect.getclosurevars(InputProcessor.process_inputs).nonlocals["check_request_fits"] is \
        kv_manager.check_request_fits


@pytest.mark.parametrize("how", ["attention_backend", "attention_config"])
def test_compaction_off_steps_aside_and_still_checks_the_section(tiny_vlm_dir, how, monkeypatch):
    """``enabled: false``: the config is built as if no backend had been named (vLLM picks its own, CPU_ATTN
    on CPU: tests/test_e2e_disabled.py), the caller's arguments are left as they were, and the AttentionPack
    section is still checked (against the model too)."""
    from vllm.config import AttentionConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    from ap_vllm.config import AttentionPackConfigError
    from ap_vllm.selection import ASYNC_SCHEDULER_CLS, SCHEDULER_CLS

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # (what compaction on sets: restored afterwards)

    def args(section):
        selection = ({"attention_backend": "attentionpack"} if how == "attention_backend"
                     else {"attention_config": AttentionConfig(backend=E.CUSTOM)})
        return EngineArgs(model=str(tiny_vlm_dir), max_model_len=512, enforce_eager=True, **selection,
                          additional_config={"attentionpack": section})

    off = args({"enabled": False})
    vllm_config = off.create_engine_config()
    assert vllm_config.attention_config.backend is None
    assert vllm_config.scheduler_config.scheduler_cls not in (SCHEDULER_CLS, ASYNC_SCHEDULER_CLS)
    assert (off.attention_backend, getattr(off.attention_config, "backend", None)) == (
        ("attentionpack", None) if how == "attention_backend" else (None, E.CUSTOM))
    with pytest.raises(AttentionPackConfigError, match="colour"):
        args({"enabled": False, "colour": 1}).create_engine_config()
    with pytest.raises(AttentionPackConfigError, match="pool_check"):
        args({"enabled": False, "pool_check": "compacted"}).create_engine_config()
    assert args({}).create_engine_config().attention_config.backend is E.CUSTOM  # compaction on: ours
