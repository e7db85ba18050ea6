"""Qwen3.5 (hybrid: Gated DeltaNet linear attention + gated softmax attention) in real ``vllm serve`` processes,
images and videos compacted in its softmax-attention layers.

Model: a tiny random-weight Qwen3.5 (:mod:`ap_vllm.tools.testing.tiny_qwen3_5`: 4 layers, linear / full
alternating, 4 kv heads x 64 = 256 numbers a token in the two attention layers, bfloat16) whose value projections
have rank 8: compaction with keys at R = 256 and values at R = 8 loses nothing but bfloat16 rounding and keeps 264
of the exact cache's 512 numbers a token. vLLM pages the linear layers' recurrent states in the same pool as the
KV, with attention blocks as large as a state (96 tokens here), and caches those states at block boundaries for
prefix caching. Greedy outputs must equal vLLM's CPU_ATTN token for token (both bfloat16: vLLM's CPU Gated DeltaNet
runs in bfloat16 only), alone and concurrent, up to ties: bfloat16 logits tie often (two tokens at one
log-probability), and the two servers' prompts run in different chunks (ours ends one at every image end), which
moves log-probabilities by up to 0.1 in bfloat16; so the greedy tokens must be equal up to the first position where
the two servers' choices are within ``TIE`` of each other in log-probability, with every log-probability before
it within ``TIE``, and at least half of all tokens compared. Every image frees blocks of the shared pool; an image
followed by more than a block of text is served again from the prefix cache in compact form (the linear layers'
state at the first block boundary after the image comes from the cache with it), and a multi-turn chat about an
image answers every turn as CPU_ATTN does.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import (base_and_ours, equal_up_to_a_tie, greedy_turn, image_content,  # noqa: E402
                                          running, sitecustomize_env, video_content)
from ap_vllm.tools.testing.tiny_qwen3_5 import build_tiny_qwen3_5  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not __import__("torch").cpu._is_avx512_bf16_supported(),
    reason="vLLM's CPU Gated DeltaNet (bfloat16) was run only on CPUs with AVX-512 BF16; this one has none")]

IMAGE_TOKENS = VIDEO_TOKENS = 2304
KV_HEADS, HEAD_DIM, VALUE_RANK = 4, 64, 8
# lossless (see above); every token read at full rank, so compact spans are shared through the prefix cache
LOSSLESS = {"key_rank": KV_HEADS * HEAD_DIM, "value_rank": VALUE_RANK, "value_selection": "full"}
# --block-size 32: vLLM makes the attention block the smallest multiple of it as large as a linear layer's state page
ARGS = ["--block-size", "32", "--max-num-batched-tokens", "4096",
        "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 1})]
BLOCK = 96
TIE = 0.15  # nats (see above)
MAX_TOKENS = 16


def turn(server, messages) -> tuple[str, list[tuple[str, float, dict]]]:
    """A greedy answer to a chat (:func:`~ap_vllm.tools.testing.server.greedy_turn`)."""
    return greedy_turn(server, messages, MAX_TOKENS)


def greedy(server, content) -> list[tuple[str, float, dict]]:
    """The tokens of a greedy answer to one user message, as :func:`turn` gives them."""
    return turn(server, [{"role": "user", "content": content}])[1]


def compared(base, ours) -> int:
    """The two greedy answers equal up to a tie (module docstring); the number of tokens compared."""
    return equal_up_to_a_tie(base, ours, TIE)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = build_tiny_qwen3_5(tmp_path_factory.mktemp("qwen3_5") / "tiny", image_tokens=IMAGE_TOKENS,
                               num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, value_rank=VALUE_RANK,
                               video_tokens=VIDEO_TOKENS)
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"),
                            "ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim()")
    with running(base_and_ours(model, max_model_len=2 * IMAGE_TOKENS + 1024, args=ARGS, attentionpack=LOSSLESS,
                               env=env, dtype="bfloat16")) as servers:
        yield servers


def test_images_and_videos_compacted_equal_cpu_attn(servers):
    base, ours = servers["base"], servers["ours"]
    freed = ours.metric("attentionpack:blocks_freed_total")
    contents = [image_content(1), image_content(2, size=(48, 64)), image_content(4, "Compare them.", n=2),
                video_content(1), "a text-only request"]
    assert sum(compared(greedy(base, c), greedy(ours, c)) for c in contents) >= len(contents) * MAX_TOKENS // 2
    assert f"with block size {BLOCK}," in ours.log_text()  # (the backend's start-up line)
    # four images and a video of 2100-2400 tokens (22-25 blocks), each compacted to 264 of 512 numbers a token plus
    # its bases, in its own first blocks: its plan frees at least 4 blocks wherever it starts (core.spans.plan_spans)
    spans = 5
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + spans * 4) >= freed + spans * 4
    assert ours.wait_kv_empty() == 0.0


def test_concurrent_requests_equal_cpu_attn_one_at_a_time(servers):
    base, ours = servers["base"], servers["ours"]
    contents = ([image_content(10 + i, size=(40 + 8 * i, 48)) for i in range(3)]
                + [video_content(20, frames=6), "a text-only request", image_content(1)])
    expect = [greedy(base, c) for c in contents]
    with cf.ThreadPoolExecutor(len(contents)) as pool:
        got = list(pool.map(lambda c: greedy(ours, c), contents))
    assert sum(compared(b, o) for b, o in zip(expect, got)) >= len(contents) * MAX_TOKENS // 2
    assert ours.wait_kv_empty() == 0.0


def test_image_and_following_text_served_again_from_the_prefix_cache(servers):
    """More than a block of text after the image: the first request's chunk after the image stops at the next
    block boundary, where vLLM caches the linear layers' state; the second request takes the compact image and
    that state from the cache."""
    base, ours = servers["base"], servers["ours"]
    question = "Here is a long question about the picture: " + " ".join(f"part {i}," for i in range(60))
    content = image_content(30, question)
    expect = greedy(base, content)
    hits = ours.metric("attentionpack:span_cache_hits_total")
    first, again = greedy(ours, content), greedy(ours, content)
    assert compared(expect, first) >= MAX_TOKENS // 2 and compared(expect, again) >= MAX_TOKENS // 2
    assert ours.wait_metric("attentionpack:span_cache_hits_total", hits + 1) == hits + 1


def test_multi_turn_chat_from_the_prefix_cache(servers):
    """A three-turn chat about one image, each turn's prompt the earlier turns with CPU_ATTN's answers (the same
    prompts on both servers): whatever the cache gives (the compact image, the linear layers' states at the block
    boundaries the earlier turns passed), every answer equals CPU_ATTN's up to ties."""
    base, ours = servers["base"], servers["ours"]
    history = [{"role": "user", "content": image_content(40, "What is in this picture?")}]
    total = 0
    for follow in ("And the colours? " * 12, "Anything else?", None):
        text, expect = turn(base, history)
        total += compared(expect, turn(ours, history)[1])
        if follow is not None:
            history += [{"role": "assistant", "content": text}, {"role": "user", "content": follow}]
    assert total >= 3 * MAX_TOKENS // 2
