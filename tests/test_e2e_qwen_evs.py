"""Qwen2.5-VL with EVS video pruning (``--video-pruning-rate``) in real ``vllm serve`` processes, images and videos
compacted.

EVS drops about half of a video's tokens before the language model, and vLLM then recomputes the prompt's M-RoPE
positions in each step that carries media. Compaction ends a prefill chunk at every image and video end, where
vLLM 0.32-0.33 misplace the next item's positions (vllm-project/vllm#48833);
:func:`ap_vllm.compat.correct_evs_positions_between_items` keeps them right, so greedy outputs must equal vLLM's
CPU_ATTN token for token, for a video alone and after one or two images. CPU_ATTN prefills each prompt in one step
(a token budget of 8192): with vLLM's CPU default of 2048 the two-image prompt's chunk ends between items and its
own outputs differ. The model, the lossless ranks and the torchvision stand-ins are those of
``test_e2e_qwen2_5_vl``. vLLM 0.32's CPU runner never turns pruning on (its GPU runner does):
:func:`~ap_vllm.tools.testing.tiny_qwen2_5_vl.install_cpu_video_pruning` does, in both servers.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import base_and_ours, running, sitecustomize_env, video_content  # noqa: E402
from ap_vllm.tools.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = 1024
LOSSLESS = {"key_rank": 64, "value_rank": 8, "importance_fraction": 1.0}
RATE = 0.5
ARGS = ["--block-size", "32", "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 1}),
        "--video-pruning-rate", str(RATE),
        "--max-num-batched-tokens", "8192"]  # CPU_ATTN prefills each prompt in one step (right positions)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny", image_tokens=IMAGE_TOKENS,
                                  value_rank=LOSSLESS["value_rank"], frame_tokens=256)
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"),
                            "ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim()",
                            "ap_vllm.tools.testing.tiny_qwen2_5_vl.install_cpu_video_pruning()")
    with running(base_and_ours(model, max_model_len=3 * IMAGE_TOKENS, args=ARGS, attentionpack=LOSSLESS,
                               env=env)) as servers:
        yield servers


def _prompt_tokens(server, content) -> int:
    r = server.client().chat.completions.create(model=server.model_name, max_tokens=1, temperature=0.0,
                                                messages=[{"role": "user", "content": content}])
    return r.usage.prompt_tokens


def test_pruned_videos_equal_cpu_attn_after_images(servers):
    """A video of 8 frames (4 x 14 x 19 = 1064 tokens before pruning, half after), alone, after
    an image and after two (a prefill chunk ends after each image). (A video before an image is not served by
    vLLM 0.32 with EVS whatever the backend: its first M-RoPE positions fail, vllm-project/vllm#27859.)"""
    base, ours = servers["base"], servers["ours"]
    freed = ours.metric("attentionpack:blocks_freed_total")
    contents = [video_content(1), video_content(2, "What happens after the image?", images=1),
                video_content(3, "Compare the images with the video.", size=(48, 48), images=2)]
    expect = [base.greedy_tokens(content) for content in contents]
    assert [ours.greedy_tokens(content) for content in contents] == expect
    assert ours.greedy_tokens(contents[1]) == expect[1]  # again, its prefix in vLLM's prefix cache
    # 3 pruned videos (532 tokens) and 3 images (about 800 to 1100), each span freeing blocks of 32
    # (72 of 128 numbers kept): at least 3 a video and 5 an image
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + 3 * 3 + 3 * 5) >= freed + 3 * 3 + 3 * 5
    assert ours.wait_kv_empty() == 0.0


def test_videos_are_pruned(servers):
    """The served prompts hold EVS's retained count of video tokens (vLLM's ``compute_retained_tokens_count``), for
    both servers: pruning is on in the path the outputs above were compared on."""
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    for server in servers.values():
        text = _prompt_tokens(server, "Describe the video.")
        for frames in (8, 12):  # 14 x 19 merged tokens a temporal patch of two frames; plus vision start and end
            kept = _prompt_tokens(server, video_content(5, frames=frames)) - text - 2
            assert kept == compute_retained_tokens_count(14 * 19, frames // 2, RATE) < frames // 2 * 14 * 19
