"""LLaVA-1.5 (CLIP ViT, multi-head attention, 1-D RoPE) in real ``vllm serve`` processes, images compacted with the
``llava_1_5`` preset's pre-RoPE keys.

Model: a tiny random-weight LLaVA-1.5 (:mod:`ap_vllm.tools.testing.tiny_llava`: 4 heads x 32, so H*d = 128; 576
image tokens a 336 x 336 image, as LLaVA-1.5) whose key and value projections have rank 8, so a span's keys before
RoPE and its values have rank <= 8. The preset's ``key_space: pre_rope`` at ranks 8 and 8, every value read at
full rank (``value_selection: full``), therefore loses nothing while it stores 16 of the exact cache's 256 numbers
a token: greedy outputs must equal vLLM's CPU_ATTN token for token (fp32), alone and concurrent, and each image
frees most of its blocks. Without torchvision (the CPU venv) both servers load the model through
:func:`~ap_vllm.tools.testing.tiny_llava.install_llava_shim` (a ``sitecustomize`` on their ``PYTHONPATH``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import base_and_ours, image_content, running, sitecustomize_env  # noqa: E402
from ap_vllm.tools.testing.tiny_llava import IMAGE_TOKENS, build_tiny_llava  # noqa: E402

pytestmark = pytest.mark.e2e

RANK = 8
LOSSLESS = {"preset": "llava_1_5", "key_rank": RANK, "value_rank": RANK, "value_selection": "full"}
BLOCK = 32
ARGS = ["--block-size", str(BLOCK), "--limit-mm-per-prompt", json.dumps({"image": 2})]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny", key_rank=RANK, value_rank=RANK)
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"), "ap_vllm.tools.testing.tiny_llava.install_llava_shim()")
    with running(base_and_ours(model, max_model_len=2 * IMAGE_TOKENS + 512, args=ARGS, attentionpack=LOSSLESS,
                               env=env)) as servers:
        yield servers


def test_greedy_outputs_equal_cpu_attn_with_the_images_compacted(servers):
    base, ours = servers["base"], servers["ours"]
    freed = ours.metric("attentionpack:blocks_freed_total")
    contents = [image_content(1), image_content(2, size=(48, 64)), image_content(3, "Compare them.", n=2),
                "a text-only request"]
    for content in contents:
        assert ours.greedy_tokens(content) == base.greedy_tokens(content)
    # 4 images of 576 tokens (18 blocks of 32 exact; 16 of 256 numbers a token kept), each freeing at least 12
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + 4 * 12) >= freed + 4 * 12
    assert ours.wait_kv_empty() == 0.0


def test_concurrent_requests_equal_cpu_attn_one_at_a_time(servers):
    base, ours = servers["base"], servers["ours"]
    contents = [image_content(10 + i, size=(40 + 8 * i, 48)) for i in range(3)] + [image_content(20, n=2)]
    expect = [base.greedy_tokens(c) for c in contents]
    with cf.ThreadPoolExecutor(len(contents)) as pool:
        assert list(pool.map(ours.greedy_tokens, contents)) == expect
    assert ours.wait_kv_empty() == 0.0
