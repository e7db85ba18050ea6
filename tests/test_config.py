"""Configuration: every bad value is refused with a message naming the field and what is allowed."""

import pytest

from ap_vllm.config import AttentionPackConfig, AttentionPackConfigError, parse_config


def test_defaults_and_preset_override():
    cfg = parse_config(None)
    assert cfg == AttentionPackConfig()
    cfg = parse_config({"preset": "qwen2_5_vl", "value_rank": 96})
    assert cfg.key_rank == 64 and cfg.value_rank == 96
    assert parse_config({"preset": "exact"}).enabled is False


@pytest.mark.parametrize(
    "raw, must_name",
    [
        ({"key_rank": 0}, ["key_rank", ">= 1"]),
        ({"value_rank": [8, -1]}, ["value_rank", ">= 1"]),
        ({"value_rank": []}, ["value_rank", "empty"]),
        ({"key_rank": "big"}, ["key_rank"]),
        ({"importance_fraction": 0.0}, ["importance_fraction", "(0, 1]"]),
        ({"importance_fraction": 1.5}, ["importance_fraction", "(0, 1]"]),
        ({"importance_ema": -0.1}, ["importance_ema", "(0, 1]"]),
        ({"energy_threshold": 2}, ["energy_threshold", "(0, 1]"]),
        ({"low_rank_divisor": 0}, ["low_rank_divisor", ">= 1"]),
        ({"threshold_sample_tokens": -1}, ["threshold_sample_tokens", ">= 0"]),
        ({"min_span_tokens": 0}, ["min_span_tokens", ">= 1"]),
        ({"chunk_tokens": 32}, ["chunk_tokens", "min_span_tokens (64)", "null"]),
        ({"enabled": "maybe"}, ["enabled"]),
        ({"key_space": "pre-rope"}, ["key_space", "post_rope", "pre_rope"]),
        ({"kernel": "gpu"}, ["kernel", "auto", "torch", "triton", "cuda"]),
        ({"value_selection": "attention"}, ["value_selection", "ema", "score", "full"]),
        ({"score_threshold": 0.0}, ["score_threshold", "(0, 1]"]),
        ({"score_threshold": 1.5}, ["score_threshold", "(0, 1]"]),
        ({"value_selection": "score", "two_level_keys": True}, ["value_selection", "two_level_keys=true"]),
        ({"value_selection": "score", "kernel": "cuda"}, ["kernel", "value_selection='score'", "triton"]),
        ({"value_selection": "full", "two_level_keys": True}, ["value_selection", "'full'", "two_level_keys=true"]),
        ({"value_selection": "full", "kernel": "cuda"}, ["kernel", "value_selection='full'", "triton"]),
        ({"ranks": 8}, ["ranks", "unknown field", "key_rank"]),
        ({"preset": "no_such_model"}, ["preset", "no_such_model", "qwen2_5_vl"]),
        ({"preset": 3}, ["preset"]),
    ],
)
def test_bad_values_are_refused_with_the_field_named(raw, must_name):
    with pytest.raises(AttentionPackConfigError) as err:
        parse_config(raw)
    for text in must_name:
        assert text in str(err.value), (text, str(err.value))


def test_section_must_be_a_mapping():
    with pytest.raises(AttentionPackConfigError, match="must be a mapping"):
        parse_config([1, 2])


def test_ranks_checked_against_the_model():
    cfg = parse_config({"key_rank": 128, "value_rank": [16, 512]})
    cfg.validate_for_model(num_layers=2, num_kv_heads=4, head_size=128)  # H*d = 512: fine
    with pytest.raises(AttentionPackConfigError, match=r"key_rank=128 .*\[1, 64\]"):
        cfg.validate_for_model(num_layers=2, num_kv_heads=1, head_size=64)
    with pytest.raises(AttentionPackConfigError, match=r"value_rank.*one rank per attention layer \(3\)"):
        cfg.validate_for_model(num_layers=3, num_kv_heads=4, head_size=128)
    assert cfg.rank_for_layer("value", 1) == 512 and cfg.rank_for_layer("key", 1) == 128


def _vllm_config(section, uses_mrope):
    from types import SimpleNamespace

    model = SimpleNamespace(model="some/vlm", uses_mrope=uses_mrope, get_total_num_hidden_layers=lambda: 2,
                            get_num_kv_heads=lambda p: 4, get_total_num_kv_heads=lambda: 4, get_head_size=lambda: 128)
    return SimpleNamespace(additional_config={"attentionpack": section}, model_config=model, parallel_config=None)


def test_pre_rope_key_space_refused_for_multi_axis_rope():
    from ap_vllm.config import config_from_vllm

    assert config_from_vllm(_vllm_config({"key_space": "pre_rope"}, uses_mrope=False)).key_space == "pre_rope"
    with pytest.raises(AttentionPackConfigError, match=r"key_space='pre_rope'.*some/vlm.*M-RoPE.*post_rope"):
        config_from_vllm(_vllm_config({"key_space": "pre_rope"}, uses_mrope=True))
    # post-RoPE (the default) works for M-RoPE models, and so does a disabled compaction
    assert config_from_vllm(_vllm_config({}, uses_mrope=True)).key_space == "post_rope"
    config_from_vllm(_vllm_config({"key_space": "pre_rope", "enabled": False}, uses_mrope=True))


def test_compacted_pool_check_refused_where_it_cannot_hold():
    from types import SimpleNamespace

    from ap_vllm.config import config_from_vllm

    vc = _vllm_config({"pool_check": "compacted"}, uses_mrope=False)
    vc.model_config.hf_text_config = SimpleNamespace(sliding_window=None)
    assert config_from_vllm(vc).pool_check == "compacted"
    vc.model_config.hf_text_config = SimpleNamespace(sliding_window=512)
    with pytest.raises(AttentionPackConfigError, match=r"pool_check='compacted'.*some/vlm has sliding-window"):
        config_from_vllm(vc)
    vc.model_config.hf_text_config = SimpleNamespace(sliding_window=None)
    vc.model_config.is_hybrid = True  # (vLLM's ModelConfig.is_hybrid: linear-attention layers, e.g. Qwen3.5)
    with pytest.raises(AttentionPackConfigError, match=r"pool_check='compacted'.*some/vlm has linear-attention"):
        config_from_vllm(vc)
    with pytest.raises(AttentionPackConfigError, match=r"pool_check='compacted'.*compaction is off"):
        config_from_vllm(_vllm_config({"pool_check": "compacted", "enabled": False}, uses_mrope=False))
    with pytest.raises(AttentionPackConfigError, match="pool_check"):
        parse_config({"pool_check": "lenient"})


def test_text_ranks_fall_back_to_visual_ranks():
    cfg = parse_config({"key_rank": 32, "text_value_rank": 200})
    assert cfg.rank_for_layer("key", 0, text=True) == 32
    assert cfg.rank_for_layer("value", 0, text=True) == 200


def test_preset_file_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("attentionpack:\n  key_rank: 40\n")
    assert parse_config({"preset": str(p)}).key_rank == 40
    p.write_text("attentionpack:\n  key_rnk: 40\n")
    with pytest.raises(AttentionPackConfigError, match="key_rnk: unknown field"):
        parse_config({"preset": str(p)})


def test_kernel_choice(monkeypatch):
    import torch

    assert parse_config({"kernel": "torch"}).use_triton(torch.device("cuda")) is False
    assert parse_config(None).use_triton(torch.device("cuda")) is True  # auto: Triton on CUDA
    assert parse_config(None).use_triton(torch.device("cpu")) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    cfg = parse_config({"kernel": "triton"})
    assert cfg.use_triton(torch.device("cpu")) is True


def test_triton_kernel_refused_without_cuda_or_interpreter(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs the Triton kernels")
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(AttentionPackConfigError) as err:
        parse_config({"kernel": "triton"})
    for text in ("attentionpack.kernel", "TRITON_INTERPRET=1", "CUDA"):
        assert text in str(err.value), (text, str(err.value))


@pytest.mark.parametrize("cache_dtype, asked, stored", [
    ("auto", None, "model"), ("fp8", None, "fp8_e4m3"), ("fp8_e4m3", None, "fp8_e4m3"),
    ("fp8", "model", "model"), ("auto", "fp8_e4m3", "fp8_e4m3")])
def test_coefficient_dtype_auto_follows_the_kv_cache_dtype(cache_dtype, asked, stored):
    """'auto' (the default) stores FP8 coefficients on an FP8 KV cache, the model dtype otherwise; an explicit
    choice is kept. Every process resolves it from the same vLLM configuration."""
    from types import SimpleNamespace

    from ap_vllm.config import config_from_vllm

    section = {} if asked is None else {"coefficient_dtype": asked}
    vc = _vllm_config(section, uses_mrope=False)
    vc.cache_config = SimpleNamespace(cache_dtype=cache_dtype)
    assert config_from_vllm(vc).coefficient_dtype == stored
    assert parse_config(section).coefficient_dtype == (asked or "auto")


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e5m2", "int8_per_token_head", "turboquant_k8v4", "nvfp4"])
def test_kv_cache_dtypes_attentionpack_cannot_store_are_refused_with_what_is_allowed(kv_cache_dtype):
    pytest.importorskip("vllm")
    from ap_vllm.backend.attentionpack import AttentionPackBackend, AttentionPackImpl

    assert not AttentionPackBackend.supports_kv_cache_dtype(kv_cache_dtype)
    assert AttentionPackBackend.supports_kv_cache_dtype("fp8") and AttentionPackBackend.supports_kv_cache_dtype("auto")
    with pytest.raises(NotImplementedError, match=rf"{kv_cache_dtype}.*allowed: auto, fp8, fp8_e4m3"):
        AttentionPackImpl(4, 64, 0.125, 2, None, None, kv_cache_dtype)


def test_value_selection_auto_is_full_where_triton_runs_on_cuda(monkeypatch):
    """On a CUDA device with the Triton kernels, 'auto' reads every token at full rank (the two-level read did not
    pay there); an EMA setting still means 'ema', and the torch kernel keeps score selection."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_config(None).value_selection == "full"
    assert parse_config({"preset": "qwen2_5_vl"}).value_selection == "full"
    assert parse_config({"importance_fraction": 0.5}).value_selection == "ema"
    assert parse_config({"kernel": "torch"}).value_selection == "score"
    assert parse_config({"value_selection": "score"}).value_selection == "score"  # (asked for: kept)


def test_value_selection_auto_is_score_unless_a_setting_asks_for_the_ema():
    """(without a CUDA device, as here)"""
    cfg = parse_config(None)
    assert cfg.value_selection == "score" and cfg.score_threshold == 1.0 / 256
    cfg = parse_config({"value_selection": "score", "score_threshold": 0.01})
    assert cfg.value_selection == "score" and cfg.score_threshold == 0.01
    for ema in ({"importance_fraction": 1.0}, {"importance_ema": 0.5}, {"threshold_sample_tokens": 0},
                {"two_level_keys": True}, {"value_selection": "ema"}):
        assert parse_config(ema).value_selection == "ema", ema
    assert parse_config({"two_level_keys": False}).value_selection == "score"
    # the preset for a 7B VLM follows the default
    assert parse_config({"preset": "qwen2_5_vl"}).value_selection == "score"


def _real_vllm_config(tmp_path, section, tp=1, pp=1, rank=0, kv_heads=4, layers=4):
    """A real vLLM VllmConfig (ModelConfig read from a config.json, ParallelConfig with the given sizes)."""
    import json

    pytest.importorskip("vllm")
    from vllm.config import ModelConfig, ParallelConfig, VllmConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 8, "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "head_dim": 64,
        "vocab_size": 256, "max_position_embeddings": 1024, "torch_dtype": "float32"}))
    model = ModelConfig(model=str(tmp_path), tokenizer=str(tmp_path), skip_tokenizer_init=True, dtype="float32")
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, rank=rank)
    return VllmConfig(model_config=model, parallel_config=parallel, additional_config={"attentionpack": section})


def test_ranks_are_the_models_and_each_tensor_parallel_worker_keeps_its_heads_share(tmp_path):
    """Ranks count components of the model's T x (H*d) matrix (4 KV heads x 64 here), whatever the parallel
    layout: a worker holding h of the H heads keeps ceil(R * h / H), so bytes per token do not depend on tp."""
    from ap_vllm.config import config_from_vllm
    from ap_vllm.core.spans import plan_span
    from ap_vllm.engine.spec import kv_geometry

    section = {"key_rank": [8, 16, 32, 63], "value_rank": 64, "text_value_rank": 3}
    one = config_from_vllm(_real_vllm_config(tmp_path, section))
    assert (one.key_rank, one.value_rank, one.text_value_rank) == ([8, 16, 32, 63], 64, 3)
    two = config_from_vllm(_real_vllm_config(tmp_path, section, tp=2))
    assert (two.key_rank, two.value_rank, two.text_value_rank) == ([4, 8, 16, 32], 32, 2)  # rounded up
    eight = config_from_vllm(_real_vllm_config(tmp_path, section, tp=8))  # 1 head each (vLLM replicates them)
    assert (eight.key_rank, eight.value_rank, eight.text_value_rank) == ([2, 4, 8, 16], 16, 1)
    # the same rank is checked against the model's width at every tp, not a worker's
    assert config_from_vllm(_real_vllm_config(tmp_path, {"key_rank": 256}, tp=2)).key_rank == 128
    with pytest.raises(AttentionPackConfigError, match=r"key_rank=257.*\[1, 256\].*4\*64"):
        config_from_vllm(_real_vllm_config(tmp_path, {"key_rank": 257}, tp=2))
    # the share of blocks a span frees is the same at tp 1 and 2 (each worker's pages hold half the heads;
    # a worker's bases are a quarter of the model's, so tp frees at most a few blocks more)
    freed = []
    for tp, cfg in ((1, one), (2, two)):
        geometry = kv_geometry(_real_vllm_config(tmp_path, section, tp=tp), 16)
        assert geometry.num_kv_heads == 4 // tp
        freed.append(plan_span(cfg, geometry, 0, 4096, "visual").num_freed_blocks)
    assert freed[0] <= freed[1] <= freed[0] + 4, freed


def test_per_layer_ranks_count_every_pipeline_stage(tmp_path):
    """With pipeline parallelism a worker runs some layers, but layer indices, rank lists and span plans
    (one block table for all stages) are the model's."""
    from ap_vllm.config import config_from_vllm
    from ap_vllm.engine.spec import kv_geometry

    section = {"key_rank": [8, 16, 32, 64]}
    vllm_config = _real_vllm_config(tmp_path, section, pp=2, rank=1)
    assert vllm_config.model_config.get_num_layers(vllm_config.parallel_config) == 2  # this stage's
    assert config_from_vllm(vllm_config).key_rank == [8, 16, 32, 64]
    assert kv_geometry(vllm_config, 16).num_layers == 4
    with pytest.raises(AttentionPackConfigError, match=r"key_rank: a per-layer list must have one rank per .*\(4\), got 2"):
        config_from_vllm(_real_vllm_config(tmp_path, {"key_rank": [8, 16]}, pp=2))


def test_speculative_decoding_ngram_and_eagle_without_async_scheduling(tmp_path):
    """ngram drafts are served (vLLM's real SpeculativeConfig), and EAGLE heads and Qwen3.5's MTP head paged like the
    model; other draft models and MTP heads, EAGLE heads with other pages, backend or parallel drafting, and async
    scheduling (host lengths are upper bounds then) are refused at start-up, naming the value and what is
    allowed."""
    from types import SimpleNamespace

    from vllm.config import SpeculativeConfig

    from ap_vllm.config import check_speculative, config_from_vllm

    vc = _real_vllm_config(tmp_path, {})
    vc.speculative_config = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=2,
                                              prompt_lookup_max=4, target_model_config=vc.model_config,
                                              target_parallel_config=vc.parallel_config)
    vc.scheduler_config.async_scheduling = False
    assert config_from_vllm(vc).enabled
    for method in ("draft_model", "suffix"):
        fake = SimpleNamespace(additional_config={}, model_config=None,
                               speculative_config=SimpleNamespace(method=method))
        with pytest.raises(AttentionPackConfigError,
                           match=rf"method '{method}' is not allowed.*allowed: 'ngram', 'eagle', 'eagle3', 'mtp'"):
            config_from_vllm(fake)
    # EAGLE heads: their layers share the model's blocks, so they must page like the model's and run on this backend
    model = SimpleNamespace(get_num_kv_heads=lambda p: 2, get_head_size=lambda: 32, model="target")
    for draft, extra, error in [
            ((2, 32), {}, None), ((2, 32), {"attention_backend": SimpleNamespace(name="CUSTOM")}, None),
            ((4, 32), {}, r"'drafter': its attention layers have 4 KV heads of size 32; allowed .* the model's 2 KV "
                          r"heads of size 32"),
            ((2, 64), {}, r"2 KV heads of size 64; allowed"),
            ((2, 32), {"attention_backend": SimpleNamespace(name="FLASH_ATTN")},
             r"attention_backend 'FLASH_ATTN' is not allowed .* allowed: unset or 'attentionpack'"),
            ((2, 32), {"parallel_drafting": True}, r"parallel_drafting=true is not allowed .* allowed: false")]:
        drafter = SimpleNamespace(get_num_kv_heads=lambda p, h=draft[0]: h, get_head_size=lambda d=draft[1]: d,
                                  model="drafter")
        fake = SimpleNamespace(additional_config={}, model_config=model, parallel_config=None, speculative_config=
                               SimpleNamespace(method="eagle3", draft_model_config=drafter, **extra))
        if error is None:
            check_speculative(fake)
        else:
            with pytest.raises(AttentionPackConfigError, match=error):
                check_speculative(fake)
    # MTP heads: Qwen3.5's (its layer paged like the model's full-attention layers); others refused, naming them
    for mtp_type, error in (("qwen3_5_mtp", None),
                            ("gemma4_mtp", r"MTP head 'gemma4_mtp' is not allowed .* allowed: 'qwen3_5_mtp'"),
                            ("deepseek_mtp", "'deepseek_mtp'")):
        head = SimpleNamespace(get_num_kv_heads=lambda p: 2, get_head_size=lambda: 32, model="target",
                               hf_config=SimpleNamespace(model_type=mtp_type))
        fake = SimpleNamespace(additional_config={}, model_config=model, parallel_config=None,
                               speculative_config=SimpleNamespace(method="mtp", draft_model_config=head))
        if error is None:
            check_speculative(fake)
        else:
            with pytest.raises(AttentionPackConfigError, match=error):
                check_speculative(fake)
    vc.scheduler_config.async_scheduling = True
    with pytest.raises(AttentionPackConfigError, match=r"--async-scheduling with --speculative-config"):
        config_from_vllm(vc)
    vc.speculative_config = None  # (async scheduling alone is served)
    assert config_from_vllm(vc).enabled


def test_ranks_are_bounded_by_the_global_layers_shape_where_layers_differ():
    """Gemma 4: sliding layers of 4 KV heads x 256, global layers of 2 x 512. vLLM's whole-model values are the
    largest of each (4 x 512); the spans live in the global layers' pages, so their shape bounds the ranks and
    lays out the plans (the scheduler's and the builders' alike: ``kv_geometry``)."""
    from types import SimpleNamespace

    from ap_vllm.config import compacted_kv_shape, config_from_vllm
    from ap_vllm.engine.spec import kv_geometry

    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    shapes = {"sliding_attention": (4, 256), "full_attention": (2, 512)}

    class Arch:
        per_layer_overrides = [{}] * len(types)

        def __init__(self, layer_shapes):
            self.layer_shapes = layer_shapes

        def __getitem__(self, i):
            heads, size = self.layer_shapes[i]
            return SimpleNamespace(total_num_kv_heads=heads, head_size=size)

    def vllm_config(section, layer_shapes, tp=1):
        model = SimpleNamespace(
            model="some/gemma4", get_total_num_hidden_layers=lambda: len(types), get_total_num_kv_heads=lambda: 4,
            get_head_size=lambda: 512, get_num_kv_heads=lambda p, arch_config=None: max(
                1, (arch_config.total_num_kv_heads if arch_config else 4) // p.tensor_parallel_size),
            model_arch_config=Arch(layer_shapes), hf_text_config=SimpleNamespace(layer_types=types, sliding_window=8),
            dtype="bfloat16")
        return SimpleNamespace(additional_config={"attentionpack": section}, model_config=model,
                               parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                               cache_config=SimpleNamespace(cache_dtype="auto"))

    gemma4 = [shapes[t] for t in types]
    vc = vllm_config({"key_rank": 1024, "value_rank": 64}, gemma4)
    assert compacted_kv_shape(vc.model_config, vc.parallel_config) == (2, 2, 512)
    assert config_from_vllm(vc).key_rank == 1024
    geometry = kv_geometry(vc, 16)
    assert (geometry.num_kv_heads, geometry.head_size) == (2, 512)
    with pytest.raises(AttentionPackConfigError, match=r"key_rank=1025 .*\[1, 1024\].*2\*512"):
        config_from_vllm(vllm_config({"key_rank": 1025}, gemma4))
    # tensor parallel 2: one global KV head a worker, half of each rank
    vc2 = vllm_config({"key_rank": 1024, "value_rank": 64}, gemma4, tp=2)
    assert compacted_kv_shape(vc2.model_config, vc2.parallel_config) == (1, 2, 512)
    assert config_from_vllm(vc2).value_rank == 32
    with pytest.raises(AttentionPackConfigError, match=r"some/gemma4: its global-attention layers have different"):
        config_from_vllm(vllm_config({}, [(4, 256), (2, 512), (4, 256), (1, 512)]))
