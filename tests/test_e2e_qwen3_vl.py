"""Qwen3-VL (interleaved M-RoPE, deepstack visual features, timestamped video frames) in real ``vllm serve``
processes, images and videos compacted.

Model: a tiny random-weight Qwen3-VL (:mod:`ap_vllm.tools.testing.tiny_qwen3_vl`: 2 kv heads x 32, H*d = 64) whose
value projections have rank 8: compaction with keys at R = 64 = H*d and values at R = 8 loses nothing and keeps 72
of the exact cache's 128 numbers a token, so every image and video frees blocks and greedy outputs must equal vLLM's
CPU_ATTN token for token (fp32), alone, concurrent and from the prefix cache (images and videos asked again come
from it in their compact form). What Qwen3-VL adds over Qwen2.5-VL: the rotary sections
interleaved over the pairs, the deepstack mergers adding vision-tower features to the first text layers' hidden
states at the visual tokens, and videos written as one run per two frames after a plain-text timestamp
(``<0.5 seconds><|vision_start|><|video_pad|>...<|vision_end|><1.5 seconds>...``): vLLM's placeholder, and so the
compacted span, is that whole run, timestamps included. Without torchvision both servers load the model through
:func:`~ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import (base_and_ours, image_content, running,  # noqa: E402
                                          sitecustomize_env, video_content)
from ap_vllm.tools.testing.tiny_qwen3_vl import build_tiny_qwen3_vl  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = VIDEO_TOKENS = 1024
VALUE_RANK = 8
# every token read at full rank (value_selection "full"): lossless, and, with no importance EMA written into the
# pages, compact spans are shared through the prefix cache
LOSSLESS = {"key_rank": 64, "value_rank": VALUE_RANK, "value_selection": "full"}
ARGS = ["--block-size", "32", "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 1})]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3") / "tiny", image_tokens=IMAGE_TOKENS,
                               value_rank=VALUE_RANK, video_tokens=VIDEO_TOKENS)


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"),
                            "ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim()")
    with running(base_and_ours(model, max_model_len=2 * IMAGE_TOKENS + 512, args=ARGS, attentionpack=LOSSLESS,
                               env=env)) as servers:
        yield servers


def test_images_and_videos_compacted_equal_cpu_attn(servers, model):
    """One and two images of several aspect ratios; a video of 8 frames (4 timestamped runs), after an image, and
    of 5 frames (the last repeated to fill its temporal patch: 3 runs)."""
    from ap_vllm.tools.testing.tiny_qwen2_5_vl import _stand_in

    base, ours = servers["base"], servers["ours"]
    freed = ours.metric("attentionpack:blocks_freed_total")
    contents = [image_content(1), image_content(2, size=(48, 64)), image_content(4, "Compare them.", n=2),
                video_content(1), video_content(2, "What happens after the image?", images=1),
                video_content(3, "What moves?", frames=5, size=(48, 64))]
    for content in contents:
        assert ours.greedy_tokens(content) == base.greedy_tokens(content)
    # 5 images and 3 videos, spans of about 1024 tokens, each freeing at least 6 blocks of 32 (72 of 128 numbers)
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + 8 * 6) >= freed + 8 * 6
    assert ours.wait_kv_empty() == 0.0

    # the 8-frame video's prompt holds its 4 runs' pads, their wrappers and a timestamp before each
    def prompt_tokens(content):
        return ours.client().chat.completions.create(
            model=ours.model_name, messages=[{"role": "user", "content": content}], max_tokens=1).usage.prompt_tokens

    pads = _stand_in("Qwen3VLVideoProcessor").from_model_dir(model).get_num_of_video_patches(8, 48, 64) // 4
    extra = prompt_tokens(video_content(1)) - prompt_tokens("Describe the video.") - pads
    assert 4 * (2 + 3) <= extra <= 4 * (2 + 12) + 2, extra  # (a timestamp, "<0.5 seconds>": 3 to 12 tokens)


def test_concurrent_requests_equal_cpu_attn_one_at_a_time(servers):
    """New images and a new 6-frame video, with the two images and the 8-frame video of the test above again:
    those three spans come from the prefix cache in their compact form."""
    base, ours = servers["base"], servers["ours"]
    contents = ([image_content(10 + i, size=(40 + 8 * i, 48)) for i in range(3)]
                + [video_content(20, frames=6), image_content(4, "Compare them.", n=2), video_content(1),
                   "a text-only request"])
    expect = [base.greedy_tokens(c) for c in contents]
    hits = ours.metric("attentionpack:span_cache_hits_total")
    with cf.ThreadPoolExecutor(len(contents)) as pool:
        assert list(pool.map(ours.greedy_tokens, contents)) == expect
    assert ours.wait_metric("attentionpack:span_cache_hits_total", hits + 3) >= hits + 3
    assert ours.wait_kv_empty() == 0.0
