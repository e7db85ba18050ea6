"""A video longer than the KV pool, in a real ``vllm serve`` (``pool_check: compacted``).

The tiny VLM takes 4096 image tokens per image (a stand-in for a long video); max_model_len is
4400 tokens = 275 blocks of 16, the pool only 150 blocks (2,400 tokens). vLLM's own start-up
check refuses that pool (it must hold one exact max_model_len request). With
``pool_check: compacted`` the check asks for a max_model_len video compacted chunk by chunk while
prefilled (512-token chunks and steps), which fits: the server starts, and a 4096-token image
chat completes although its exact KV (259 blocks) is far larger than the pool. A long text prompt
cannot be compacted and can never fit: it is refused with HTTP 400 naming what it needs and what
the pool holds, and the server keeps serving images.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from ap_vllm.tools.testing.server import ServerError, VllmServer, image_data_url  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS, MAX_LEN, BLOCK, POOL = 4096, 4400, 16, 150
CONFIG = {"key_rank": 16, "value_rank": 16, "chunk_tokens": 512}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=IMAGE_TOKENS, num_layers=2,
                          num_kv_heads=2, num_heads=4, head_dim=64)


def _server(model, pool_check):
    cfg = {"attentionpack": {**CONFIG, "pool_check": pool_check}}
    return VllmServer(model, max_model_len=MAX_LEN, extra_args=[
        "--attention-backend", "attentionpack", "--block-size", str(BLOCK), "--num-gpu-blocks-override", str(POOL),
        "--max-num-batched-tokens", "512", "--additional-config", json.dumps(cfg)])


def _image_chat(client, model_name, seed):
    return client.chat.completions.create(
        model=model_name, max_tokens=16, temperature=0.0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(seed=seed)}},
            {"type": "text", "text": "Describe the image."}]}])


def test_exact_pool_check_refuses_the_small_pool(model):
    with pytest.raises(ServerError, match=r"max seq len \(4400\)"):
        _server(model, "exact").start()


def test_video_longer_than_the_pool_is_served_and_long_text_refused(model):
    with _server(model, "compacted") as srv:
        client = srv.client()
        first = _image_chat(client, srv.model_name, 1)
        assert first.usage.prompt_tokens > IMAGE_TOKENS and first.usage.prompt_tokens // BLOCK > POOL
        assert first.usage.completion_tokens == 16 and first.choices[0].finish_reason == "length"
        freed = [float(line.split()[-1]) for line in srv.metrics().splitlines()
                 if line.startswith("attentionpack:blocks_freed_total")]
        assert freed and freed[0] > 0

        # ~3,000 text tokens: 189 blocks, all exact, more than the 149 usable blocks of the pool
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=srv.model_name, max_tokens=16,
                                           messages=[{"role": "user", "content": "the cat sat " * 600}])
        msg = str(err.value)
        assert "KV-cache blocks" in msg and "holds 149" in msg and "pool_check='compacted'" in msg, msg

        second = _image_chat(client, srv.model_name, 2)  # still serving
        assert second.usage.completion_tokens == 16
