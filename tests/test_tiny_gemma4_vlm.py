"""The tiny Gemma 4 VLM builder: config, weights, tokenizer, processor (transformers and vLLM), determinism and
argument checks. No server: the builder's models are served in the end-to-end tests."""

import json

import pytest

from ap_vllm.tools.testing.server import synthetic_image
from ap_vllm.tools.testing.tiny_gemma4_vlm import (
    CHAT_TEMPLATE, SOFT_TOKEN_BUDGETS, SPECIAL_TOKENS, build_tiny_gemma4_vlm, default_layer_types,
    image_repl_token_count, image_soft_tokens, install_vllm_gemma4_shim, kv_sharing_sources, main)

S, F = "sliding_attention", "full_attention"
SIZES = [(64, 48), (64, 64), (96, 80), (72, 48), (48, 64), (640, 480), (100, 70), (17, 300), (1, 1)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The default build with the last two layers sharing KV caches."""
    return build_tiny_gemma4_vlm(tmp_path_factory.mktemp("gemma4") / "tiny", num_kv_shared_layers=2)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """k_eq_v full layers with 2 kv heads, three shared layers, two sliding layers per full one, images both ways."""
    return build_tiny_gemma4_vlm(tmp_path_factory.mktemp("gemma4") / "variant", image_tokens=1120, sliding_per_full=2,
                                 num_kv_shared_layers=3, attention_k_eq_v=True, num_heads=2, num_global_kv_heads=2,
                                 bidirectional="vision", sliding_window=128, seed=1)


@pytest.fixture(scope="module")
def processor(model):
    install_vllm_gemma4_shim(register_in_process=False)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model))


def _tensors(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _chat(processor, n_images=1, text="Describe the image."):
    messages = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _image_runs(ids, image_id):
    """(start, length) of each maximal run of ``image_id`` in ``ids``."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_layers_heads_and_kv_sharing(model):
    from transformers import Gemma4ForConditionalGeneration

    cfg = json.loads((model / "config.json").read_text())
    tc, vc = cfg["text_config"], cfg["vision_config"]
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"] and cfg["audio_config"] is None
    assert tc["layer_types"] == [S, F, S, F, S, F] == default_layer_types(6)
    assert (tc["head_dim"], tc["num_attention_heads"], tc["num_key_value_heads"], tc["hidden_size"]) == (32, 2, 1, 64)
    assert tc["per_layer_config"] == {str(i): {"head_dim": 512} for i in (1, 3, 5)}
    assert tc["num_kv_shared_layers"] == 2 and tc["attention_k_eq_v"] is False and tc["enable_moe_block"] is False
    assert tc["use_bidirectional_attention"] is None and tc["hidden_size_per_layer_input"] == 8
    assert tc["rope_parameters"] == {
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    assert (vc["default_output_length"], vc["patch_size"], vc["pooling_kernel_size"]) == (280, 4, 2)

    shapes = _tensors(model)
    attn = "model.language_model.layers.{}.self_attn.{}.weight"
    for i in (0, 2):  # sliding: 2 x 32 query, 1 x 32 key / value numbers
        assert (shapes[attn.format(i, "q_proj")], shapes[attn.format(i, "k_proj")],
                shapes[attn.format(i, "v_proj")]) == ((64, 64), (32, 64), (32, 64))
    for i in (1, 3):  # full: heads of 512
        assert (shapes[attn.format(i, "q_proj")], shapes[attn.format(i, "k_proj")],
                shapes[attn.format(i, "v_proj")], shapes[attn.format(i, "o_proj")]) == (
                    (1024, 64), (512, 64), (512, 64), (64, 1024))
    for i in (4, 5):  # shared: a query projection and no keys or values of their own
        assert attn.format(i, "q_proj") in shapes
        assert not any(attn.format(i, p) in shapes for p in ("k_proj", "v_proj", "k_norm"))
    assert shapes["model.language_model.embed_tokens_per_layer.weight"] == (1024, 6 * 8)
    assert not any("audio" in k for k in shapes)

    assert kv_sharing_sources(tc["layer_types"], 2) == {4: 2, 5: 3}
    info = json.loads((model / "tiny_gemma4_vlm.json").read_text())
    assert info["kv_sharing_sources"] == {"4": 2, "5": 3}
    hf = Gemma4ForConditionalGeneration.from_pretrained(str(model))
    layers = [layer.self_attn for layer in hf.model.language_model.layers]
    assert [a.head_dim for a in layers] == [32, 512] * 3
    assert [a.is_kv_shared_layer for a in layers] == [False] * 4 + [True] * 2
    assert [a.store_full_length_kv for a in layers] == [False, False, True, True, False, False]  # 4 <- 2, 5 <- 3


def test_k_eq_v_global_kv_heads_and_bidirectional(variant):
    cfg = json.loads((variant / "config.json").read_text())
    tc = cfg["text_config"]
    assert tc["layer_types"] == [S, S, F, S, S, F]
    assert tc["per_layer_config"] == {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in (2, 5)}
    assert tc["attention_k_eq_v"] is True and tc["use_bidirectional_attention"] == "vision"
    assert kv_sharing_sources(tc["layer_types"], 3) == {3: 1, 4: 1, 5: 2}  # the full layer 5 reads layer 2
    shapes = _tensors(variant)
    attn = "model.language_model.layers.{}.self_attn.{}.weight"
    assert shapes[attn.format(2, "k_proj")] == (2 * 512, 64)
    assert attn.format(2, "v_proj") not in shapes  # k_eq_v: values from k_proj
    assert shapes[attn.format(1, "v_proj")] == (32, 64)
    assert cfg["vision_config"]["default_output_length"] == 1120


def test_tokenizer_round_trip_special_ids_and_chat(model, processor):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert (tok.boi_token, tok.eoi_token, tok.image_token, tok.boa_token, tok.eoa_token, tok.audio_token) == (
        "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>")
    cfg = json.loads((model / "config.json").read_text())
    named = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
             "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>",
             "audio_token_id": "<|audio|>"}
    assert {k: cfg[k] for k in named} == {k: tok.convert_tokens_to_ids(t) for k, t in named.items()}
    assert cfg["eos_token_id"] == [1, tok.convert_tokens_to_ids("<turn|>")]
    assert json.loads((model / "generation_config.json").read_text())["eos_token_id"] == cfg["eos_token_id"]
    assert (processor.image_token_id, processor.video_token_id) == (cfg["image_token_id"], cfg["video_token_id"])
    assert len(tok) == len(processor.tokenizer) <= 1024  # (the processor added no <|video|>: it was there)

    for text in ("Describe the image in one sentence.", "Zebra 42 naïve ☃, tabs\tand\nnewlines  "):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok("hi")["input_ids"][0] == 2  # <bos>

    assert processor.chat_template == tok.chat_template == CHAT_TEMPLATE
    assert _chat(processor) == "<bos><|turn>user\n<|image|>Describe the image.<turn|>\n<|turn>model\n"
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": "x"}}, {"type": "image"}, {"type": "text", "text": " Q? "}]}]
    assert processor.apply_chat_template(two, add_generation_prompt=False, tokenize=False) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"
        "<|turn>user\n<|image|><|image|>Q?<turn|>\n")


def test_processor_makes_one_run_of_soft_tokens_per_image(processor):
    for w, h in SIZES:
        n = image_soft_tokens(w, h)
        inputs = processor(text=_chat(processor), images=[synthetic_image(w, h, seed=w)], return_tensors="pt",
                           add_special_tokens=False)
        ids = inputs["input_ids"][0].tolist()
        (start, length), = _image_runs(ids, processor.image_token_id)
        assert length == n, (w, h)
        boi, eoi = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image>", "<image|>"))
        assert (ids[start - 1], ids[start + n], ids.count(boi), ids.count(eoi)) == (boi, eoi, 1, 1)
        assert len(ids) == len(processor.tokenizer(_chat(processor), add_special_tokens=False)["input_ids"]) - 1 + \
            image_repl_token_count(w, h)
        assert tuple(inputs["pixel_values"].shape) == (1, 280 * 4, 4 * 4 * 3)
        assert int((inputs["image_position_ids"][0] >= 0).all(-1).sum()) == 4 * n  # 2 x 2 patches a soft token
    assert image_soft_tokens(64, 64) == 256 and image_soft_tokens(64, 48) == 14 * 19 == 266
    assert [image_soft_tokens(500, 500, b) for b in SOFT_TOKEN_BUDGETS] == [64, 121, 256, 529, 1089]

    inputs = processor(text=_chat(processor, 2), images=[synthetic_image(64, 48, 1), synthetic_image(96, 80, 2)],
                       add_special_tokens=False)
    runs = _image_runs(inputs["input_ids"][0], processor.image_token_id)
    assert [length for _, length in runs] == [266, 270]


def test_vllm_processing_and_prefix_lm(model, variant, processor):
    """vLLM's own Gemma 4 multimodal processor (no engine): one placeholder range of n + 2 tokens per image,
    the prompt transformers' processor makes, its soft-token arithmetic, and is_mm_prefix_lm per build."""
    install_vllm_gemma4_shim(register_in_process=True)
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    config = ModelConfig(model=str(model), dtype="float32", max_model_len=4096, limit_mm_per_prompt={"image": 2})
    assert config.is_mm_prefix_lm is False
    vllm_processor = MULTIMODAL_REGISTRY.create_processor(config)
    tok = vllm_processor.info.get_tokenizer()
    prompt = _chat(processor, 2)
    for sizes in [((64, 48), (96, 80)), ((64, 64), (17, 300))]:
        images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        out = vllm_processor.apply(ProcessorInputs(tok.encode(prompt, add_special_tokens=False),
                                                   vllm_processor.info.parse_mm_data({"image": images})),
                                   TimingContext(enabled=False))
        ref = processor(text=prompt, images=images, add_special_tokens=False)["input_ids"][0]
        assert out["prompt_token_ids"] == list(ref)
        ranges = out["mm_placeholders"]["image"]
        runs = _image_runs(ref, processor.image_token_id)
        assert [(r.offset, r.length, r.get_num_embeds()) for r in ranges] == [
            (start - 1, image_repl_token_count(w, h), image_soft_tokens(w, h))
            for (start, _), (w, h) in zip(runs, sizes)]
    info = vllm_processor.info
    grid = [(w, h) for w in (1, 7, 48, 64, 96, 100, 333, 640, 1000) for h in (1, 9, 48, 64, 70, 80, 480, 777)
            if max(w / h, h / w) <= 280]  # (the documented range: aspect ratios up to image_tokens : 1)
    assert [info._compute_num_soft_tokens(w, h) for w, h in grid] == [image_soft_tokens(w, h) for w, h in grid]

    assert ModelConfig(model=str(variant), dtype="float32", max_model_len=4096).is_mm_prefix_lm is True


def test_transformers_greedy_output_varies_with_image_and_prompt(model, processor):
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from ap_vllm.tools.testing.tiny_gemma4_vlm import output_token_ids

    hf = Gemma4ForConditionalGeneration.from_pretrained(str(model), dtype=torch.float32).eval()
    allowed = set(output_token_ids(processor.tokenizer))
    outs = {}
    for seed, text in [(0, "Describe the image."), (1, "Describe the image."), (0, "What is in this picture?")]:
        inputs = processor(text=_chat(processor, text=text), images=[synthetic_image(64, 48, seed)],
                           return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(ids) == 6 and set(ids) <= allowed  # never a special token, never stops early
        for logits in out.logits:
            top2 = torch.topk(logits[0].float(), 2).values
            assert float(top2[0] - top2[1]) > 1e-3  # no float32 near-tie
            assert float(logits[0].std()) > 1.0
        outs[seed, text] = ids
    assert len(set(map(tuple, outs.values()))) == 3


def test_same_arguments_write_identical_files(tmp_path):
    a = build_tiny_gemma4_vlm(tmp_path / "a", num_layers=4, num_kv_shared_layers=2, seed=5)
    b = build_tiny_gemma4_vlm(tmp_path / "b", num_layers=4, num_kv_shared_layers=2, seed=5)
    c = main([str(tmp_path / "c"), "--num-layers", "4", "--num-kv-shared-layers", "2", "--seed", "6"])
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in (tmp_path / "c").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "processor_config.json", "preprocessor_config.json", "generation_config.json"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert c == 0
    assert (a / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("kwargs, message", [
    ({"image_tokens": 256}, r"image_tokens=256 is not a Gemma 4 soft-token budget.*280 -> 256"),
    ({"image_tokens": 1024}, r"image_tokens=1024 .* one of \(70, 140, 280, 560, 1120\)"),
    ({"num_kv_shared_layers": 6}, r"num_kv_shared_layers=6 must be in \[0, num_layers=6\)"),
    ({"num_kv_shared_layers": 5}, r"num_kv_shared_layers=5: shared layer 1 \(full_attention\) has no earlier"),
    ({"layer_types": [F, S]}, r"layer_types=.*must be 6 of"),
    ({"num_layers": 2, "layer_types": [F, S]}, r"the last layer must be 'full_attention'"),
    ({"num_global_kv_heads": 2}, r"num_global_kv_heads=2 needs attention_k_eq_v=True"),
    ({"bidirectional": "all"}, r"bidirectional='all' must be None"),
    ({"head_dim": 30}, r"head_dim=30 must be a positive multiple of 8"),
    ({"global_head_dim": 0}, r"global_head_dim=0 must be a positive multiple of 8"),
    ({"num_heads": 3, "num_kv_heads": 2}, r"num_heads=3 must be a multiple of num_kv_heads=2"),
    ({"hidden_size": 0}, r"hidden_size=0 must be a positive integer"),
    ({"vision_hidden_size": 20}, r"vision_hidden_size=20 must be a multiple of 8"),
    ({"dtype": "int8"}, r"dtype='int8'"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_gemma4_vlm(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_video_processor_stand_in_refuses_videos(processor):
    if not install_vllm_gemma4_shim(register_in_process=False):
        pytest.skip("torchvision is installed: the real video processor is used")
    assert type(processor.video_processor).__name__ == "Gemma4VideoProcessor"
    assert processor.video_processor.max_soft_tokens == 70
    with pytest.raises(NotImplementedError, match="torchvision"):
        processor.video_processor([synthetic_image(8, 8, 0)])
