"""The tiny VLM builder and the vllm serve harness."""

import json
import os
import subprocess
import sys
import time

import pytest

from ap_vllm.tools.testing.tiny_vlm import (
    CHAT_TEMPLATE, build_tiny_vlm, image_repl_token_count, printable_token_ids)


def _processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def _image_prompt(processor, text="Describe the image."):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_builder_writes_loadable_dir_quickly(tmp_path):
    t0 = time.monotonic()
    out = build_tiny_vlm(tmp_path / "m", image_tokens=256, num_layers=3, num_heads=8,
                         num_kv_heads=2, head_dim=128, seed=3)
    assert time.monotonic() - t0 < 60
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "chat_template.jinja", "tiny_vlm.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert cfg["dtype"] == "float32"
    tc = cfg["text_config"]
    assert (tc["num_hidden_layers"], tc["num_attention_heads"], tc["num_key_value_heads"],
            tc["head_dim"], tc["hidden_size"]) == (3, 8, 2, 128, 1024)
    vc = cfg["vision_config"]
    assert (vc["image_size"] // vc["patch_size"]) ** 2 // cfg["scale_factor"] ** 2 == 256
    info = json.loads((out / "tiny_vlm.json").read_text())
    assert info["image_tokens"] == 256 and info["image_repl_tokens"] == 259


def test_default_config_and_weights(tiny_vlm_dir):
    from safetensors import safe_open

    cfg = json.loads((tiny_vlm_dir / "config.json").read_text())
    tc = cfg["text_config"]
    assert (tc["num_hidden_layers"], tc["num_attention_heads"], tc["num_key_value_heads"],
            tc["head_dim"]) == (2, 4, 2, 64)
    with safe_open(str(tiny_vlm_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype.is_floating_point
        assert str(f.get_tensor("lm_head.weight").dtype) == "torch.float32"
    assert "model.text_model.layers.1.self_attn.k_proj.weight" in names
    assert "model.vision_model.embeddings.patch_embedding.weight" in names
    assert "model.connector.modality_projection.proj.weight" in names


def test_lora_adapter_covers_the_text_attention(tiny_vlm_dir, tmp_path):
    """The adapter writer: A and B for every text layer's attention projections (none of the vision tower's), the
    shapes of the weights they adapt, PEFT's names; bad input named."""
    from safetensors import safe_open

    from ap_vllm.tools.testing.lora import write_lora_adapter

    out = write_lora_adapter(tiny_vlm_dir, tmp_path / "a", rank=4, seed=1)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["target_modules"]) == ("LORA", 4, ["k_proj", "o_proj", "q_proj", "v_proj"])
    with safe_open(str(tiny_vlm_dir / "model.safetensors"), "pt") as m, \
            safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert len(names) == 2 * 4 * 2  # layers x projections x (A, B)
        for layer in (0, 1):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                prefix = f"model.text_model.layers.{layer}.self_attn.{proj}"
                n_out, n_in = m.get_tensor(prefix + ".weight").shape
                assert f.get_tensor(f"base_model.model.{prefix}.lora_A.weight").shape == (4, n_in)
                assert f.get_tensor(f"base_model.model.{prefix}.lora_B.weight").shape == (n_out, 4)
    with pytest.raises(ValueError, match="rank=0"):
        write_lora_adapter(tiny_vlm_dir, tmp_path / "b", rank=0)
    with pytest.raises(ValueError, match=r"modules=\['qkv'\]"):
        write_lora_adapter(tiny_vlm_dir, tmp_path / "c", modules=["qkv"])


def test_tokenizer_round_trip(tiny_vlm_dir):
    tok = _processor(tiny_vlm_dir).tokenizer
    for text in ("Hello world, what is in the picture?", "A red square\non blue.\t42 ümlaut 日本"):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    assert tok("hi").input_ids[0] == tok.bos_token_id
    for special in ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1, special
    assert tok.chat_template == CHAT_TEMPLATE
    assert len(printable_token_ids(tok)) > 200


@pytest.mark.parametrize("size", [(64, 64), (300, 120), (17, 250)])
def test_processor_expands_one_image_to_one_run(tiny_vlm_dir, size):
    from PIL import Image

    proc = _processor(tiny_vlm_dir)
    tok = proc.tokenizer
    prompt = _image_prompt(proc)
    assert prompt.count("<image>") == 1
    out = proc(text=prompt, images=[Image.new("RGB", size, (200, 30, 30))], add_special_tokens=False)
    ids = out["input_ids"][0]
    image_id = tok.convert_tokens_to_ids("<image>")
    fake_id = tok.convert_tokens_to_ids("<fake_token_around_image>")
    glob_id = tok.convert_tokens_to_ids("<global-img>")
    pos = [i for i, t in enumerate(ids) if t == image_id]
    assert len(pos) == 64 and pos == list(range(pos[0], pos[0] + 64))  # one contiguous run
    assert ids[pos[0] - 2: pos[0]] == [fake_id, glob_id] and ids[pos[-1] + 1] == fake_id
    text_only = tok(prompt, add_special_tokens=False).input_ids
    assert len(ids) == len(text_only) - 1 + image_repl_token_count(64)
    assert tuple(out["pixel_values"].shape[-2:]) == (32, 32)


def test_image_tokens_must_be_square(tmp_path):
    with pytest.raises(ValueError, match="perfect square"):
        build_tiny_vlm(tmp_path, image_tokens=2048)
    assert image_repl_token_count(4096) == 4099


def test_build_is_deterministic(tmp_path):
    a = build_tiny_vlm(tmp_path / "a", seed=7)
    b = build_tiny_vlm(tmp_path / "b", seed=7)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cli(tmp_path):
    from ap_vllm.tools.testing.tiny_vlm import main

    assert main([str(tmp_path / "cli"), "--image-tokens", "16", "--num-layers", "1"]) == 0
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 1
    assert json.loads((tmp_path / "cli" / "processor_config.json").read_text())["image_seq_len"] == 16


@pytest.mark.e2e
def test_serve_image_chat_default_backend(tiny_vlm_dir):
    from ap_vllm.tools.testing.server import VllmServer, image_data_url, live_processes

    proc = _processor(tiny_vlm_dir)
    expected_prompt_tokens = (len(proc.tokenizer(_image_prompt(proc), add_special_tokens=False).input_ids)
                              - 1 + image_repl_token_count(64))
    cache = tiny_vlm_dir.parent / "modelinfos"  # (this test's own: it starts empty)
    server = VllmServer(tiny_vlm_dir, max_model_len=2048, startup_timeout=420, modelinfo_cache=cache)
    with server:
        # the default executor: the model in the engine core's process (no worker process of its own), and vLLM's
        # inspection of the model class written to the shared cache
        log = server.log_text()
        assert "(EngineCore pid=" in log and "Starting to load model" in log and "(Worker pid=" not in log
        assert [p.name for p in cache.iterdir()] == ["vllm-model_executor-models-idefics3-"
                                                      "Idefics3ForConditionalGeneration.json"]
        client = server.client()
        answers = []
        for seed in (1, 2):
            r = client.chat.completions.create(
                model=server.model_name, max_tokens=12, temperature=0.0,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(seed=seed)}},
                    {"type": "text", "text": "Describe the image."}]}])
            choice = r.choices[0]
            assert choice.finish_reason in ("length", "stop")
            assert isinstance(choice.message.content, str) and choice.message.content
            assert r.usage.prompt_tokens == expected_prompt_tokens
            answers.append(choice.message.content)
        assert answers[0] != answers[1]  # the image reaches the model
        assert "vllm:prompt_tokens" in server.metrics()
        pgid, tmpdir = server.pid, server.tmpdir
        assert live_processes(pgid)
    assert live_processes(pgid) == []
    assert not os.path.exists(tmpdir) and len(list(cache.iterdir())) == 1  # (the shared cache is kept)


def test_server_executor_is_checked(tmp_path):
    from ap_vllm.tools.testing.server import VllmServer

    with pytest.raises(ValueError, match=r"executor='threads'.*\('uni', 'mp'\)"):
        VllmServer(tmp_path, executor="threads")


_STAND_IN_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_server_picks_another_port_when_its_port_is_taken(tmp_path, monkeypatch):
    """A picked port taken by another process before the server binds it (the server then exits with
    "Address already in use") is replaced by a fresh pick, up to three tries; a port the caller named is not."""
    import socket

    from ap_vllm.tools.testing import server as server_mod

    class StandIn(server_mod.VllmServer):
        def command(self):
            return [sys.executable, "-c", _STAND_IN_SERVER, str(self.port)]

    low, _ = server_mod._ephemeral_range()
    picks = [server_mod.free_port() for _ in range(20)]
    assert all(p < low for p in picks), picks  # below the kernel's ephemeral range
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        fresh = iter([busy, server_mod.free_port()])
        monkeypatch.setattr(server_mod, "free_port", lambda host: next(fresh))
        with StandIn(tmp_path, startup_timeout=60) as srv:
            assert srv.port != busy
        monkeypatch.setattr(server_mod, "free_port", lambda host: busy)
        with pytest.raises(server_mod.ServerError, match="Address already in use"):
            StandIn(tmp_path, startup_timeout=60).start()  # three tries, all taken
        with pytest.raises(server_mod.ServerError, match="Address already in use"):
            StandIn(tmp_path, port=busy, startup_timeout=60).start()


def test_qwen_video_stand_in_is_qwen2_vl_preprocessing():
    """The numpy video processor of the Qwen2.5-VL shim (torchvision-free): a video of two equal frames is, row for
    row, what transformers' Qwen2-VL image processor makes of that frame (it repeats an image over the temporal
    patch); an odd frame count is padded with the last frame; the patch count vLLM asks for matches; options it
    does not implement are refused by name."""
    import numpy as np
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ap_vllm.tools.testing.server import synthetic_image
    from ap_vllm.tools.testing.tiny_qwen2_5_vl import _VideoProcessor

    px = (28 * 8) ** 2
    images = Qwen2VLImageProcessorPil(min_pixels=px, max_pixels=px, patch_size=14, temporal_patch_size=2,
                                      merge_size=2)
    videos = _VideoProcessor(px, px)
    frames = [np.asarray(synthetic_image(64, 48, seed)) for seed in range(3)]
    img = images(images=[synthetic_image(64, 48, 0)])
    vid = videos(videos=[np.stack(frames[:1] * 2)], return_metadata=True)
    assert vid["video_grid_thw"].tolist() == img["image_grid_thw"].tolist() == [[1, 14, 20]]
    assert torch.equal(vid["pixel_values_videos"], torch.as_tensor(img["pixel_values"]))
    assert vid["video_metadata"][0].total_num_frames == 2
    odd = videos(videos=[np.stack(frames)])["pixel_values_videos"].view(2, 280, 3, 2, 14 * 14)
    padded = videos(videos=[np.stack(frames + frames[-1:])])["pixel_values_videos"].view(2, 280, 3, 2, 14 * 14)
    assert torch.equal(odd, padded) and torch.equal(odd[1, :, :, 0], odd[1, :, :, 1])
    assert not torch.equal(odd[0, :, :, 0], odd[0, :, :, 1])
    assert videos.get_num_of_video_patches(3, 48, 64) == 2 * 280
    raw = videos(videos=[np.stack(frames[:2])], do_rescale=False, do_normalize=False)["pixel_values_videos"]
    assert torch.allclose(((raw / 255 - torch.tensor(videos.MEAN).repeat_interleave(2 * 14 * 14))
                           / torch.tensor(videos.STD).repeat_interleave(2 * 14 * 14)), odd[0].reshape(280, -1),
                          atol=1e-5)
    with pytest.raises(ValueError, match="do_sample_frames"):
        videos(videos=[np.stack(frames)], do_sample_frames=True)
    with pytest.raises(ValueError, match="fps"):
        videos(videos=[np.stack(frames)], fps=2)


def test_qwen3_video_stand_in_is_qwen3_vl_preprocessing():
    """The Qwen3-VL stand-in: two equal frames are, row for row, what transformers' Qwen2-VL image processor makes
    of that frame at Qwen3-VL's patch, mean and std and at the size Qwen3-VL's clip-wide ``smart_resize`` gives; the
    frames it samples and the patch count it reports are transformers' own ``Qwen3VLVideoProcessor`` methods'
    (called on the stand-in: the class itself needs torchvision); vLLM's ``isinstance`` against the name it imports
    holds once the shim is in place."""
    import numpy as np
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
    from transformers.video_utils import VideoMetadata

    from ap_vllm.tools.testing.server import synthetic_image
    from ap_vllm.tools.testing.tiny_qwen2_5_vl import _stand_in

    clip = 2 * 224 * 320  # two frames of 7 x 10 squares of 32 pixels
    videos = _stand_in("Qwen3VLVideoProcessor")(clip, clip, patch_size=16)
    assert smart_resize(2, 224, 320, temporal_factor=2, factor=32, min_pixels=clip, max_pixels=clip) == (224, 320)
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 224 * 320, "longest_edge": 224 * 320}, patch_size=16,
                                      temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    frame = np.asarray(synthetic_image(320, 224, 0))  # (Qwen2-VL's image smart_resize rounds other sizes otherwise)
    vid = videos(videos=[np.stack([frame, frame])])
    img = images(images=[synthetic_image(320, 224, 0)])
    assert vid["video_grid_thw"].tolist() == img["image_grid_thw"].tolist() == [[1, 14, 20]]
    assert torch.equal(vid["pixel_values_videos"], torch.as_tensor(img["pixel_values"]))
    for frames, fps, num_frames in ((8, 2.0, None), (30, 7.5, None), (3, 1.0, None), (40, 10.0, 6)):
        meta = VideoMetadata(total_num_frames=frames, fps=fps)
        assert (videos.sample_frames(meta, num_frames=num_frames).tolist()
                == Qwen3VLVideoProcessor.sample_frames(videos, meta, num_frames=num_frames).tolist())
        assert (videos.get_num_of_video_patches(frames, 48, 64)
                == Qwen3VLVideoProcessor.get_num_of_video_patches(videos, frames, 48, 64))
    movie = np.stack([np.asarray(synthetic_image(64, 48, s)) for s in range(8)])
    meta = [{"total_num_frames": 8, "fps": 4.0, "frames_indices": list(range(8))}]
    sampled = videos(videos=[movie], video_metadata=meta, do_sample_frames=True, return_metadata=True)
    assert sampled["video_metadata"][0].frames_indices == [0, 2, 5, 7]  # 2 s at 2 fps: 4 frames, evenly spaced
    assert torch.equal(sampled["pixel_values_videos"], videos(videos=[movie[[0, 2, 5, 7]]])["pixel_values_videos"])
    with pytest.raises(ValueError, match="cap_pixels_per_frame"):
        videos(videos=[movie], cap_pixels_per_frame=True)
    check = ("from ap_vllm.tools.testing import tiny_qwen2_5_vl as q; assert q.install_qwen2_vl_shim(); "
             "from transformers.models.qwen3_vl import Qwen3VLVideoProcessor as P; "
             "assert P is q._stand_in('Qwen3VLVideoProcessor'), P")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_tiny_qwen3_5_is_hybrid_and_checks_its_shapes(tmp_path):
    """The tiny Qwen3.5: softmax attention every second layer, the rest linear attention with the 128-dim heads
    vLLM's CPU kernel takes, bfloat16, Qwen3-VL's processors; bad shapes named."""
    from ap_vllm.tools.testing.tiny_qwen3_5 import LINEAR_HEAD_DIM, build_tiny_qwen3_5

    out = build_tiny_qwen3_5(tmp_path / "m", image_tokens=256, num_layers=4)
    cfg = json.loads((out / "config.json").read_text())
    text = cfg["text_config"]
    assert (cfg["architectures"], cfg["dtype"]) == (["Qwen3_5ForConditionalGeneration"], "bfloat16")
    assert text["layer_types"] == ["linear_attention", "full_attention"] * 2
    assert text["linear_key_head_dim"] == text["linear_value_head_dim"] == LINEAR_HEAD_DIM
    rope = text["rope_parameters"]
    assert 2 * sum(rope["mrope_section"]) == text["head_dim"] * rope["partial_rotary_factor"]
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    with pytest.raises(ValueError, match="image_tokens=200"):
        build_tiny_qwen3_5(tmp_path / "a", image_tokens=200)
    with pytest.raises(ValueError, match="full_attention_interval=5"):
        build_tiny_qwen3_5(tmp_path / "b", num_layers=4, full_attention_interval=5)
    with pytest.raises(ValueError, match=r"head_dim \* partial_rotary_factor = 6"):
        build_tiny_qwen3_5(tmp_path / "c", head_dim=24)
