"""Prefix caching with compaction inside a real ``vllm serve`` (vLLM's default: on).

One AttentionPack server, prefix caching on (the default). A multi-turn image chat answered from the cache
(the image's compact form and the text after it come from the earlier turns) must equal the same turn
computed without the cache (the same request again right after ``/reset_prefix_cache``), token for token
(greedy, fp32), and must not compact the image again. Under a small KV pool, 64 concurrent mixed requests
(repeated images, new images, text, cancellations, preemption) all finish and every block goes back to the
pool; the server then still answers as without the cache.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import VllmServer, image_data_url, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = 1024
BLOCK = 32
CFG = {"key_rank": 16, "value_rank": 16}
SMALL_POOL = 150  # blocks of 32 tokens: a few requests at once, so 64 of them preempt each other
# A long answer ends at about 21 blocks (its compact image ~6, its text and answer ~15): any 8 of the 24 long
# requests decoding together outgrow the pool, whatever the arrival order, so preemption always happens.
LONG = 480


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=IMAGE_TOKENS, num_layers=2,
                           num_kv_heads=2, num_heads=4, head_dim=64, hidden_size=64)

    def ours(*extra):
        return VllmServer(model, max_model_len=4096,
                          extra_args=["--attention-backend", "attentionpack", "--block-size", str(BLOCK),
                                      "--additional-config", json.dumps({"attentionpack": CFG}), *extra],
                          env={"VLLM_SERVER_DEV_MODE": "1"})

    # --mm-processor-cache-gb 0: vLLM's own multimodal input cache (API server / engine) can drift when the same
    # image arrives many times at once, and vLLM then answers one of them with a retryable HTTP 500 (its log:
    # "P0/P1 cache drift"); that is vLLM's, with any backend, and not what this test is about.
    with running({"cache": ours("--num-gpu-blocks-override", str(SMALL_POOL), "--max-num-seqs", "16",
                                "--mm-processor-cache-gb", "0")}) as servers:
        yield servers


def uncached(server, messages, max_tokens=12):
    """The same request computed without the cache: reset it first (vLLM's dev-mode endpoint; it refuses while
    blocks are held, so wait for the pool to drain)."""
    import urllib.request

    server.wait_kv_empty()
    with urllib.request.urlopen(urllib.request.Request(server.base_url + "/reset_prefix_cache", data=b"",
                                                       method="POST"), timeout=60) as r:
        assert json.loads(r.read())["success"] is True
    return ask(server, messages, max_tokens)


def image(seed):
    return {"type": "image_url", "image_url": {"url": image_data_url(width=64, height=48, seed=seed)}}


def ask(server, messages, max_tokens=12, **kw):
    r = server.client().chat.completions.create(model=server.model_name, messages=messages, max_tokens=max_tokens,
                                                temperature=0.0, logprobs=True, **kw)
    return [t.token for t in r.choices[0].logprobs.content], r.choices[0].message.content


def conversation(seed, turns):
    """A chat about one image: each turn's messages, the assistant's earlier answers filled in by ``answer``."""
    first = {"role": "user", "content": [image(seed), {"type": "text", "text": "What is in this picture?"}]}
    follow = ["And the colours?", "Anything else?"]
    return first, follow[:turns - 1]


def test_multi_turn_hits_the_compact_image_and_equals_no_cache(servers):
    cache = servers["cache"]
    assert "prefix caching is turned off" not in cache.log_text()
    for seed in (11, 12):
        first, follow = conversation(seed, 3)
        history = [first]
        for turn in range(3):
            hits = cache.metric("attentionpack:span_cache_hits_total")
            reused = cache.metric("attentionpack:span_cache_tokens_total")
            compacted = cache.metric("attentionpack:tokens_compacted_total")
            got, text = ask(cache, history)
            if turn > 0:  # the image came from the prefix cache: its prefill and compaction were skipped
                assert cache.wait_metric("attentionpack:span_cache_hits_total", hits + 1) == hits + 1
                assert cache.metric("attentionpack:tokens_compacted_total") == compacted
                # the span's tokens (the image's placeholder run, wrappers included)
                assert IMAGE_TOKENS <= cache.metric("attentionpack:span_cache_tokens_total") - reused \
                    <= IMAGE_TOKENS + 8
            want, _ = uncached(cache, history)
            assert got == want, f"seed {seed}, turn {turn + 1}"
            if turn < 2:
                history = history + [{"role": "assistant", "content": text}, {"role": "user", "content": follow[turn]}]
    assert cache.metric("vllm:prefix_cache_hits_total") > 0
    assert cache.wait_kv_empty() == 0.0


def test_mixed_concurrent_requests_with_repeats_preemption_and_cancellation(servers):
    cache = servers["cache"]
    client = cache.client(timeout=900)
    preempted = cache.metric("vllm:num_preemptions_total")

    def run(i):
        kind = i % 4
        long = kind == 1 or i % 8 == 0
        if kind == 0:  # one of four images, asked again and again (every other one: a long answer)
            content = [image(100 + i % 16 // 4), {"type": "text", "text": "Describe it."}]
        elif kind == 1:  # a new image, a long answer
            content = [image(200 + i), {"type": "text", "text": "Tell me everything."}]
        elif kind == 2:
            content = f"text only request {i % 3}"
        else:  # a repeated image, streamed and cancelled
            content = [image(100 + i % 8 // 4), {"type": "text", "text": "Stream it."}]
        messages = [{"role": "user", "content": content}]
        if kind == 3:
            s = client.chat.completions.create(model=cache.model_name, messages=messages, max_tokens=64,
                                               temperature=0.0, stream=True)
            for n, _ in enumerate(s):
                if n == 3:
                    s.response.close()
                    return "cancelled"
            return "done"
        r = client.chat.completions.create(model=cache.model_name, messages=messages, temperature=0.0,
                                           max_tokens=LONG if long else 8, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == (LONG if long else 8)
        return "done"

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    assert results.count("cancelled") == 16 and results.count("done") == 48
    assert cache.wait_metric("vllm:num_preemptions_total", preempted + 1) > preempted, \
        "the small pool was meant to force preemption"
    assert cache.metric("attentionpack:span_cache_hits_total") > 0
    assert cache.wait_kv_empty(timeout=120) == 0.0
    assert cache.metric("vllm:num_requests_running") == 0
    # after the churn (evictions, preempted requests resumed from their cached spans) answers are unchanged
    for seed in (100, 103):
        messages = [{"role": "user", "content": [image(seed), {"type": "text", "text": "Describe it."}]}]
        assert ask(cache, messages, max_tokens=16)[0] == uncached(cache, messages, max_tokens=16)[0]
