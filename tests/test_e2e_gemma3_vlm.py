"""Images attended both ways, end to end: a tiny Gemma 3 VLM in ``vllm serve --attention-backend attentionpack``
against transformers' own forward of the same checkpoint.

Gemma 3 VLMs are vLLM ``is_mm_prefix_lm`` models: during prefill the tokens of one image attend to each other in
both directions (transformers: the processor's ``token_type_ids``), text stays causal. The reference is
transformers' greedy generation with that attention (float32, CPU); the same generation with causal image
attention is computed too, to show that the comparison can tell the two apart.

Model (``ap_vllm.tools.testing.tiny_gemma3_vlm``): layers alternate sliding window / global, 4 kv heads x 64 =
256 numbers per token and a hidden size of 32, so an image's values have rank <= 32 while its post-RoPE keys are
full rank. Compaction at R_k = 256, R_v = 32 therefore loses nothing (as in ``test_e2e_compaction``) and still
frees blocks: the global layer's image spans are compacted after their prefill and decode reads them in
coefficient space, so greedy tokens must equal transformers' token for token.

This environment has no torchvision, which transformers' Gemma 3 image-processor module imports (vLLM imports it
for a type annotation): every server process gets ``install_vllm_gemma3_shim`` through a ``sitecustomize`` on
its ``PYTHONPATH``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from ap_vllm.tools.testing.server import VllmServer, image_data_url, sitecustomize_env  # noqa: E402
from ap_vllm.tools.testing.tiny_gemma3_vlm import build_tiny_gemma3_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = 1024
KV_HEADS, HEAD_DIM, HIDDEN = 4, 64, 32
LOSSLESS = {"key_rank": KV_HEADS * HEAD_DIM, "value_rank": HIDDEN, "value_selection": "full"}
MAX_TOKENS = 8
PROMPTS = [  # (image seeds, text)
    ((0,), "What is in this image?"),
    ((1, 2), "Which of the two images is brighter?"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_gemma3_vlm(tmp_path_factory.mktemp("gemma3") / "tiny", image_tokens=IMAGE_TOKENS,
                                 num_layers=2, num_heads=KV_HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                 hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"),
                            "ap_vllm.tools.testing.tiny_gemma3_vlm.install_vllm_gemma3_shim(register_in_process=False)")
    with VllmServer(model, max_model_len=2 * IMAGE_TOKENS + 128, env=env,
                    extra_args=["--attention-backend", "attentionpack", "--block-size", "32",
                                "--limit-mm-per-prompt", json.dumps({"image": 2}),
                                "--additional-config", json.dumps({"attentionpack": LOSSLESS})]) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model):
    """Greedy generation by transformers: (token ids, their log-probabilities) for a prompt, with image
    attention both ways (the model's own) or causal."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model)
    hf = Gemma3ForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()

    def generate(images, text, both_ways=True):
        messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=list(images), return_tensors="pt", add_special_tokens=False)
        if not both_ways:
            inputs.pop("token_type_ids")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        lps = [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, ids)]
        return ids, lps

    return generate


def image(seed):
    """The PIL image a data URL of ``image_data_url`` decodes to (what the server's processor receives)."""
    from PIL import Image

    url = image_data_url(width=96, height=80, seed=seed)
    return url, Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def served(server, urls, text):
    r = server.client().chat.completions.create(
        model=server.model_name, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
                   + [{"type": "text", "text": text}]}],
        extra_body={"return_tokens_as_token_ids": True})
    content = r.choices[0].logprobs.content
    return [int(t.token.split(":")[1]) for t in content], [t.logprob for t in content]


def compacted(server) -> float:
    text = server.metrics()
    return sum(float(v) for v in re.findall(r"^attentionpack:tokens_compacted_total\S* (\S+)$", text, re.M))


def test_images_attended_both_ways_equal_transformers(server, reference):
    told_apart = False
    for seeds, text in PROMPTS:
        urls, images = zip(*(image(s) for s in seeds))
        ids, lps = served(server, urls, text)
        ref_ids, ref_lps = reference(images, text)
        causal_ids, causal_lps = reference(images, text, both_ways=False)
        assert ids == ref_ids
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4, (seeds, lps, ref_lps)
        told_apart |= causal_ids != ref_ids or max(abs(a - b) for a, b in zip(causal_lps, ref_lps)) > 0.05
    assert told_apart  # (causal image attention gives other tokens or log-probabilities here)
    end = time.monotonic() + 30  # (stats reach /metrics with the engine's next step)
    while compacted(server) < 3 * IMAGE_TOKENS and time.monotonic() < end:
        time.sleep(0.5)
    assert compacted(server) >= 3 * IMAGE_TOKENS  # every image's span, compacted after its prefill
    log = server.log_text()
    assert "each is prefilled in one step (disable_chunked_mm_input)" in log
