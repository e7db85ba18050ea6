"""Qwen2.5-VL (multi-axis rotary positions, M-RoPE) in real ``vllm serve`` processes, images compacted.

Model: a tiny random-weight Qwen2.5-VL (:mod:`ap_vllm.tools.testing.tiny_qwen2_5_vl`: 2 kv heads x 32, so
H*d = 64) whose value projections have rank 8, so a span's values have rank <= 8 while its post-RoPE keys, rotated
by each image token's (time, row, column) position, are full rank. Compaction with keys at R = 64 = H*d and values
at R = 8 therefore loses nothing and still stores 72 of the exact cache's 128 numbers per token: every image
(about 1024 tokens; grids of several aspect ratios) frees blocks, and greedy outputs must equal vLLM's CPU_ATTN
token for token (fp32), alone and with concurrent requests. Videos (``video_url``: mp4 decoded by vLLM's OpenCV
loader; 256 tokens per two frames, positions along time, rows and columns) are compacted the same way. Without
torchvision (the CPU venv) both servers load the model through
:func:`~ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim` (a ``sitecustomize`` on their ``PYTHONPATH``;
its video processor is Qwen2-VL's preprocessing in numpy).
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import (base_and_ours, image_content, running,  # noqa: E402
                                          sitecustomize_env, video_content)
from ap_vllm.tools.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = 1024
VALUE_RANK = 8
LOSSLESS = {"key_rank": 64, "value_rank": VALUE_RANK, "importance_fraction": 1.0}
FRAME_TOKENS = 256  # a video's tokens per two frames
ARGS = ["--block-size", "32", "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 1})]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny", image_tokens=IMAGE_TOKENS,
                                  value_rank=VALUE_RANK, frame_tokens=FRAME_TOKENS)
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"),
                            "ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim()")
    with running(base_and_ours(model, max_model_len=2 * IMAGE_TOKENS + 512, args=ARGS, attentionpack=LOSSLESS,
                               env=env)) as servers:
        yield servers


CONTENTS = [image_content(1), image_content(2, size=(48, 64)), image_content(3, size=(64, 64)),
            image_content(4, "Compare them.", n=2), "a text-only request"]


def test_greedy_outputs_equal_cpu_attn_with_the_images_compacted(servers):
    base, ours = servers["base"], servers["ours"]
    freed = ours.metric("attentionpack:blocks_freed_total")
    for content in CONTENTS:
        assert ours.greedy_tokens(content) == base.greedy_tokens(content)
    # 5 images of about 1024 tokens, each freeing blocks (72 of 128 numbers a token kept: 8 to 10 blocks of 32 by
    # the span plan, at least 6 whatever the grid)
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + 5 * 6) >= freed + 5 * 6
    assert ours.wait_kv_empty() == 0.0


def test_concurrent_requests_equal_cpu_attn_one_at_a_time(servers):
    base, ours = servers["base"], servers["ours"]
    contents = [image_content(10 + i, size=(40 + 8 * i, 48)) for i in range(4)] + CONTENTS[3:]
    expect = [base.greedy_tokens(c) for c in contents]
    with cf.ThreadPoolExecutor(len(contents)) as pool:
        assert list(pool.map(ours.greedy_tokens, contents)) == expect
    assert ours.wait_kv_empty() == 0.0


def test_videos_compacted_equal_cpu_attn(servers):
    """A video of 8 frames of 64 x 48 (4 x 14 x 19 = 1064 tokens), alone and after an image; a video of 5 frames
    (the last one repeated to fill its temporal patch: 798 tokens) with a question."""
    base, ours = servers["base"], servers["ours"]
    freed = ours.metric("attentionpack:blocks_freed_total")
    contents = [video_content(1), video_content(2, "What happens after the image?", images=1),
                video_content(3, "What moves?", frames=5, size=(48, 64))]
    for content in contents:
        assert ours.greedy_tokens(content) == base.greedy_tokens(content)
    # 3 videos and 1 image, each span of 798 to 1064 tokens freeing at least 6 blocks of 32 (72 of 128 numbers)
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + 4 * 6) >= freed + 4 * 6
    assert ours.wait_kv_empty() == 0.0
