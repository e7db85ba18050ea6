"""Gemma 4 end to end: a tiny Gemma 4 VLM in ``vllm serve --attention-backend attentionpack`` against vLLM's own CPU
backend (``CPU_ATTN``), greedy tokens equal token for token with the images compacted.

What Gemma 4 brings (``ap_vllm.tools.testing.tiny_gemma4_vlm``, E2B / E4B layout):

- two layer shapes: sliding-window layers of 32-number heads and global layers of 512-number heads (vLLM's
  whole-model head size is the largest, 512; the spans are planned and their ranks bounded by the global layers'
  own shape, ``ap_vllm.config.compacted_kv_shape``), in two KV-cache groups; only the global group is compacted;
- cross-layer KV sharing: the last two layers have no KV cache and read layer 2's (sliding) and layer 3's
  (global) pages. Layer 5 reads layer 3's compact spans at layer 3's ranks and never compacts them itself
  (``tests/test_kv_sharing.py`` checks the bytes);
- sliding layers whose window (512) is shorter than an image (1064 soft tokens at the 1120 budget for 64 x 48),
  proportional partial RoPE on the global layers, value RMS norms, per-layer input embeddings;
- images attended both ways on the sliding layers only (``use_bidirectional_attention: vision``), compared with
  transformers (vLLM's CPU backend attends causally there).

Lossless ranks: a global layer's keys are its one kv head's ``k_norm(W_k x)`` (a space of dimension <= hidden =
64) with 128 of the 512 dimensions rotated, so every key of a span lies in a space of dimension <= 64 + 128 = 192;
its values ``v_norm(W_v x)`` in one of dimension <= 64. R_k = 192 and R_v = 64 therefore lose nothing (float32
round-off only: log-probabilities within 1e-3 of CPU_ATTN's), while a token's 1024 exact numbers become 256, so
each image frees blocks.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import (  # noqa: E402
    VllmServer, image_content, running, sitecustomize_env, video_content)
from ap_vllm.tools.testing.tiny_gemma4_vlm import build_tiny_gemma4_vlm, image_soft_tokens  # noqa: E402

pytestmark = pytest.mark.e2e

BUDGET = 1120
IMAGE_TOKENS = image_soft_tokens(64, 48, BUDGET)  # (1064: the default image of image_content)
LOSSLESS = {"key_rank": 192, "value_rank": 64, "value_selection": "full"}
TOKENS = 12


SHIM = "ap_vllm.tools.testing.tiny_gemma4_vlm.install_vllm_gemma4_shim(register_in_process=False)"
REPORT = "ap_vllm.tools.testing.tiny_gemma4_vlm.report_fast_prefill_rows()"


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    """Images attended both ways on the sliding layers (``use_bidirectional_attention: vision``), images of about
    1070 tokens, longer than the 128-token window; the 31B layout's global layers (``attention_k_eq_v``: values
    from the key projection, and fewer KV heads than the sliding layers: 1 of 512 against 2 of 32, where vLLM's
    whole-model shape is the largest of each, 2 x 512)."""
    return build_tiny_gemma4_vlm(tmp_path_factory.mktemp("gemma4") / "vision", image_tokens=BUDGET,
                                 num_kv_shared_layers=2, bidirectional="vision", sliding_window=128,
                                 attention_k_eq_v=True, num_kv_heads=2, num_global_kv_heads=1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, vision_model):
    model = build_tiny_gemma4_vlm(tmp_path_factory.mktemp("gemma4") / "tiny", image_tokens=BUDGET,
                                  num_kv_shared_layers=2)
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"), SHIM)
    reporting = sitecustomize_env(tmp_path_factory.mktemp("shim"), SHIM, REPORT)

    def server(backend, *extra, model=model, env=env):
        return VllmServer(model, max_model_len=2 * BUDGET + 256, env=env,
                          extra_args=["--attention-backend", backend, "--block-size", "32", "--limit-mm-per-prompt",
                                      json.dumps({"image": 2, "video": {"count": 1, "num_frames": 16}}), *extra])

    lossless = ("--additional-config", json.dumps({"attentionpack": LOSSLESS}))
    with running({"base": server("CPU_ATTN"), "ours": server("attentionpack", *lossless),
                  "fast": server("attentionpack", *lossless, "--kv-sharing-fast-prefill", env=reporting),
                  "vision": server("attentionpack", *lossless, model=vision_model)}) as servers:
        yield servers


def tokens_and_logprobs(server, content):
    r = server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}], max_tokens=TOKENS,
        temperature=0.0, logprobs=True)
    return [t.token for t in r.choices[0].logprobs.content], [t.logprob for t in r.choices[0].logprobs.content]


def test_greedy_outputs_equal_cpu_attn_with_the_images_compacted(servers):
    base, ours = servers["base"], servers["ours"]
    compacted = ours.metric("attentionpack:tokens_compacted_total")
    freed = ours.metric("attentionpack:blocks_freed_total")
    contents = [image_content(0), image_content(1, "What is in this picture?", size=(64, 64)),
                image_content(2, "Which of the two images is brighter?", n=2)]
    images = 4
    for content in contents:
        got, got_lp = tokens_and_logprobs(ours, content)
        want, want_lp = tokens_and_logprobs(base, content)
        assert got == want
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-3, (got_lp, want_lp)
    # every image's span in the two global layers that own pages (layer 5 reads layer 3's), once each
    assert ours.wait_metric("attentionpack:tokens_compacted_total", compacted + images * 1000) >= \
        compacted + images * 1000
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + images * 10) >= freed + images * 10
    log = ours.log_text()
    assert "AttentionPack backend active" in log
    assert ours.wait_kv_empty() == 0.0


def test_concurrent_requests_equal_each_alone(servers):
    ours = servers["ours"]
    contents = [image_content(10 + i, size=(56 + 8 * i, 48)) for i in range(3)] + ["a text-only request"]
    alone = [ours.greedy_tokens(c, TOKENS) for c in contents]
    with cf.ThreadPoolExecutor(len(contents)) as pool:
        assert list(pool.map(lambda c: ours.greedy_tokens(c, TOKENS), contents)) == alone
    assert ours.wait_kv_empty() == 0.0


def test_videos_equal_cpu_attn_with_their_frames_compacted(servers):
    """A ``video_url`` on Gemma 4: vLLM runs its frames through the image processor at 70 soft tokens a frame and
    places them as ``mm:ss <|image> <|video|> x n <image|>`` per frame; the span compacted is the whole placeholder
    run, the timestamps included (lossless ranks as for images)."""
    base, ours = servers["base"], servers["ours"]
    for content in (video_content(0), video_content(1, "What happens in the video?", frames=12, images=1)):
        compacted = ours.metric("attentionpack:tokens_compacted_total")
        got, got_lp = tokens_and_logprobs(ours, content)
        want, want_lp = tokens_and_logprobs(base, content)
        assert got == want
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-3, (got_lp, want_lp)
        frames = sum(p["type"] == "video_url" for p in content) * (8 if len(content) == 2 else 12)
        assert ours.wait_metric("attentionpack:tokens_compacted_total", compacted + frames * 50) >= \
            compacted + frames * 50
    assert ours.wait_kv_empty() == 0.0


def test_kv_sharing_fast_prefill_equals_cpu_attn(servers):
    """``--kv-sharing-fast-prefill`` (You Only Cache Once): in a step with prompt rows, vLLM runs the layers that
    read other layers' KV caches (the last two) only on the rows whose logits are sampled, through a subclass of
    the backend's metadata builder fed a shortened ``CommonAttentionMetadata`` (one query row per request, at its
    last position). Those rows read the global sharing target's pages, compact or not yet compacted (the image's
    own step: compaction runs at the step's end). Equal to CPU_ATTN (without the flag: the same logits) token for
    token, log-probabilities within 1e-3, alone and concurrent, with the images compacted, and the server's log
    shows the shortened steps really ran."""
    base, fast = servers["base"], servers["fast"]
    contents = [image_content(0), image_content(1, "What is in this picture?", size=(64, 64)),
                image_content(2, "Which of the two images is brighter?", n=2), "a text-only request"]
    alone = []
    for content in contents:
        got, got_lp = tokens_and_logprobs(fast, content)
        want, want_lp = tokens_and_logprobs(base, content)
        assert got == want
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-3, (got_lp, want_lp)
        alone.append(got)
    with cf.ThreadPoolExecutor(len(contents)) as pool:
        assert list(pool.map(lambda c: tokens_and_logprobs(fast, c)[0], contents)) == alone
    assert fast.wait_metric("attentionpack:tokens_compacted_total", 4 * 2 * 1000) >= 4 * 2 * 1000
    shortened = [tuple(map(int, m)) for m in re.findall(r"kv-sharing fast prefill: (\d+) -> (\d+) rows",
                                                            fast.log_text())]
    assert any(rows > IMAGE_TOKENS and kept == 1 for rows, kept in shortened), shortened
    assert fast.wait_kv_empty() == 0.0


def test_images_attended_both_ways_on_sliding_layers_equal_transformers(servers, vision_model):
    """``use_bidirectional_attention: vision``: transformers lets the tokens of one image see each other on the
    sliding layers, within the window (``(causal or same image) and kv > q - window``), and keeps the global layers
    causal. vLLM hands every layer the image ranges and Gemma 4's forward clears them in the global layers'
    metadata (``AttentionPackMetadata.mm_prefix_range_tensor``). Equal to transformers' greedy tokens with
    ``mm_token_type_ids``, log-probabilities within 1e-3; transformers without them (causal images, what vLLM's CPU
    backend computes) differs."""
    import base64
    import io

    import torch
    from PIL import Image
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    from ap_vllm.config import parse_config
    from ap_vllm.core.spans import KVGeometry, plan_spans
    from ap_vllm.tools.testing.server import image_data_url
    from ap_vllm.tools.testing.tiny_gemma4_vlm import install_vllm_gemma4_shim

    install_vllm_gemma4_shim(register_in_process=False)
    processor = AutoProcessor.from_pretrained(str(vision_model))
    hf = Gemma4ForConditionalGeneration.from_pretrained(str(vision_model), dtype=torch.float32).eval()
    vision = servers["vision"]
    told_apart = False
    for seeds, text in (((0,), "Describe the image."), ((1, 2), "Which of the two images is brighter?")):
        freed = vision.metric("attentionpack:blocks_freed_total")
        urls = [image_data_url(width=64 + 8 * i, height=48, seed=s) for i, s in enumerate(seeds)]
        images = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in urls]
        messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=images, return_tensors="pt", add_special_tokens=False)
        want, want_lp = {}, {}
        for both_ways in (True, False):
            given = dict(inputs) if both_ways else {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
            with torch.no_grad():
                out = hf.generate(**given, max_new_tokens=TOKENS, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
            want[both_ways] = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            want_lp[both_ways] = [float(torch.log_softmax(lg[0].float(), -1)[t])
                                  for lg, t in zip(out.logits, want[both_ways])]
        r = vision.client().chat.completions.create(
            model=vision.model_name, max_tokens=TOKENS, temperature=0.0, logprobs=True,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
                       + [{"type": "text", "text": text}]}],
            extra_body={"return_tokens_as_token_ids": True})
        got = [int(t.token.split(":")[1]) for t in r.choices[0].logprobs.content]
        got_lp = [t.logprob for t in r.choices[0].logprobs.content]
        assert got == want[True], (seeds, got, want)
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp[True])) < 1e-3, (seeds, got_lp, want_lp[True])
        told_apart |= want[False] != want[True]
        if len(seeds) == 1:  # the scheduler freed the blocks of the global layers' plan (1 KV head of 512)
            ids = inputs["input_ids"][0].tolist()
            start, length = ids.index(hf.config.boi_token_id), image_soft_tokens(64, 48, BUDGET) + 2

            def planned(kv_heads):
                geometry = KVGeometry(32, kv_heads, 512, torch.float32, hf.config.text_config.num_hidden_layers)
                return sum(p.num_freed_blocks for p in plan_spans(parse_config(LOSSLESS), geometry,
                                                                  [(start, length)], len(ids)))

            # (planned by vLLM's whole-model shape, 2 x 512, more blocks would go back to the pool than the compact
            # form leaves free: blocks it still holds, handed to other requests)
            assert 0 < planned(1) < planned(2)
            assert vision.wait_metric("attentionpack:blocks_freed_total", freed + planned(1)) == freed + planned(1)
    assert told_apart
    assert vision.wait_metric("attentionpack:tokens_compacted_total", 3 * 1000) >= 3 * 1000
