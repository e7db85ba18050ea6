"""Compaction inside a real ``vllm serve``: exactness at full rank, freed blocks, stress, bad input.

Model: a tiny Idefics3 VLM whose text layers have 4 kv heads x 64 = 256 numbers per token and a
hidden size of 32, so the visual span's values have rank <= 32 (no RoPE on values) while its
post-RoPE keys are full rank. "Full rank" compaction therefore keeps keys at R = 256 = H*d and
values at R = 32: no information is lost, and greedy outputs must equal vLLM's CPU_ATTN token for
token (fp32). This still frees blocks (the compact form is smaller than the span), so it runs
the whole path: plan, compaction, block freeing, coefficient-space attention, LSE merge.
The full-rank server also has a small KV budget, so concurrent requests get preempted and
recomputed, and 512-token steps, so every image is prefilled in several chunks (a span is
compacted in the step its last token arrives); outputs must be unchanged.

Pre-RoPE keys: the model's keys are W_k applied to a 32-dim hidden state, so *before* RoPE they
have rank <= 32 = H*d/8, while after RoPE they are full rank. A server with
``key_space="pre_rope"`` and R_k = R_v = 32 (8x fewer numbers per token) must therefore also
equal CPU_ATTN token for token: this checks that un-rotation at compaction and rotation at every
read use exactly the model's rotary table and positions. That server also cuts each image into
~210-token chunks (``chunk_tokens: 256``), each compacted and freed as soon as it is prefilled, so later
image tokens attend to compacted earlier chunks: still lossless here, so still token for token.

A further server compacts at R = H*d/8 (lossy, post-RoPE keys): 64 mixed concurrent requests (1 or 2 images of
several sizes, text-only, streaming, cancelled mid-stream) must all finish or cancel cleanly and
every block must return to the pool afterwards (vLLM's own KV-usage metric back to 0).
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from ap_vllm.core.spans import KVGeometry, plan_spans  # noqa: E402
from ap_vllm.config import parse_config  # noqa: E402
from ap_vllm.tools.testing.server import VllmServer, image_content, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = 1024
KV_HEADS, HEAD_DIM, HIDDEN = 4, 64, 32
WIDTH = KV_HEADS * HEAD_DIM
BLOCK = 32  # CPU_ATTN needs multiples of 32; the same block size on every server
FULL = {"key_rank": WIDTH, "value_rank": HIDDEN, "importance_fraction": 1.0}
LOSSY = {"key_rank": WIDTH // 8, "value_rank": WIDTH // 8}
PRE_ROPE = {"key_rank": HIDDEN, "value_rank": HIDDEN, "key_space": "pre_rope", "importance_fraction": 1.0,
            "chunk_tokens": 256}  # each image: 5 chunks, compacted one by one while it is prefilled
MAX_LEN = 2400  # two images + text + output
SMALL_BUDGET = 80  # blocks: ~2 requests at their prefill peak (~34 blocks each)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=IMAGE_TOKENS, num_layers=2,
                          num_kv_heads=KV_HEADS, num_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN)


def _ours(model, cfg, *extra, executor="uni"):
    return VllmServer(model, max_model_len=MAX_LEN, executor=executor,
                      extra_args=["--attention-backend", "attentionpack", "--block-size", str(BLOCK),
                                         "--additional-config", json.dumps({"attentionpack": cfg}), *extra])


@pytest.fixture(scope="module")
def servers(model):
    """baseline (CPU_ATTN), full-rank AttentionPack on a small KV budget, lossy AttentionPack."""
    with running({
        "base": VllmServer(model, max_model_len=MAX_LEN, extra_args=["--attention-backend", "CPU_ATTN", "--block-size",
                                                                     str(BLOCK)]),
        # 512-token steps: each 1027-token image is prefilled over three steps (chunked mm input); the model in a
        # worker process of its own, as vllm serve runs it on CPU (the other servers of the suite: in the engine
        # core's process, as on one GPU; VllmServer's executor)
        "full": _ours(model, FULL, "--num-gpu-blocks-override", str(SMALL_BUDGET), "--max-num-batched-tokens", "512",
                      executor="mp"),
        "lossy": _ours(model, LOSSY, "--max-num-seqs", "64"),
        "pre_rope": _ours(model, PRE_ROPE, "--max-num-batched-tokens", "512"),
    }) as servers:
        yield servers


def expected_freed_blocks(cfg, span_start, span_len) -> int:
    plans = plan_spans(parse_config(cfg), KVGeometry(BLOCK, KV_HEADS, HEAD_DIM, __import__("torch").float32, 2),
                       [(span_start, span_len)], span_start + span_len)
    assert plans and len(plans) == (-(-span_len // cfg["chunk_tokens"]) if "chunk_tokens" in cfg else 1)
    return sum(p.num_freed_blocks for p in plans)


def assert_same_tokens_as_cpu_attn(server, base, seeds, two_images_seed):
    """Single-image chats (16 tokens) and one two-image chat: greedy tokens equal CPU_ATTN's."""
    for seed in seeds:
        assert server.greedy_tokens(image_content(seed)) == base.greedy_tokens(image_content(seed))
    two = image_content(two_images_seed, "Compare them.", n=2)
    assert server.greedy_tokens(two, max_tokens=12) == base.greedy_tokens(two, max_tokens=12)


def test_full_rank_compaction_matches_cpu_attn(servers):
    base, full = servers["base"], servers["full"]
    assert_same_tokens_as_cpu_attn(full, base, seeds=(0, 1), two_images_seed=5)
    text = "a text-only request stays exact and unchanged"
    assert full.greedy_tokens(text, max_tokens=12) == base.greedy_tokens(text, max_tokens=12)
    assert full.wait_kv_empty() == 0.0
    # the two single-image chats and the two-image chat were compacted (not left exact)
    assert full.wait_metric("attentionpack:tokens_compacted_total", 4 * IMAGE_TOKENS) >= 4 * IMAGE_TOKENS


def test_pre_rope_keys_at_their_true_rank_match_cpu_attn(servers):
    """R_k = 32 holds the pre-RoPE keys exactly (not the post-RoPE ones): token for token equal."""
    base, pre = servers["base"], servers["pre_rope"]
    assert_same_tokens_as_cpu_attn(pre, base, seeds=(0, 3), two_images_seed=7)
    assert pre.wait_metric("attentionpack:tokens_compacted_total", 4 * IMAGE_TOKENS) >= 4 * IMAGE_TOKENS
    assert "rotary tables attached to 2 layers" in pre.log_text()


def test_seeded_sampling_matches_cpu_attn(servers):
    """A seeded request samples with its own CPU generator. The full-rank server prefills each image prompt in
    three chunks (512-token steps, the last ending at the span's end) and drops the token drawn after each of
    the first two; vLLM rewinds a generator by its offset, which CPU generators lack (the engine core died
    with "CPU Generator does not use offset"). Restored to its state before the draw, the generator gives the
    tokens CPU_ATTN samples with the prompt in one step: equal at temperature 1, two samples each."""
    base, full = servers["base"], servers["full"]

    def sample(server, content, seed):
        r = server.client().chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": content}], max_tokens=12,
            temperature=1.0, seed=seed, n=2)
        return sorted(c.message.content for c in r.choices)

    for seed in (1, 2):
        got = sample(full, image_content(30 + seed), seed)
        assert got == sample(base, image_content(30 + seed), seed), seed
        assert got == sample(full, image_content(30 + seed), seed)  # (and again: the same)


def test_full_rank_compaction_under_preemption(servers):
    """Two admitted requests outgrow the 80-block budget while decoding: vLLM preempts one and
    recomputes it (its span is compacted again from scratch); outputs must not change."""
    base, full = servers["base"], servers["full"]
    contents = [image_content(20 + i) for i in range(3)]
    long = {"max_tokens": 600, "extra_body": {"ignore_eos": True}}
    expect = [base.greedy_tokens(c, **long) for c in contents]
    before = full.metric("vllm:num_preemptions_total")
    with cf.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda c: full.greedy_tokens(c, **long), contents))
    assert full.metric("vllm:num_preemptions_total") > before, "the KV budget was meant to force preemption"
    assert got == expect
    assert full.wait_kv_empty() == 0.0


def placeholder_span(model, server, content) -> tuple[int, int]:
    """(start, length) of the image placeholder run (wrappers included) the server used."""
    from transformers import AutoTokenizer

    r = server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}], max_tokens=2, temperature=0.0,
        extra_body={"return_token_ids": True})
    ids = r.model_dump()["prompt_token_ids"]
    fake = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids("<fake_token_around_image>")
    where = [i for i, t in enumerate(ids) if t == fake]
    return where[0], where[-1] + 1 - where[0]


@pytest.mark.parametrize("which, cfg", [("full", FULL), ("lossy", LOSSY), ("pre_rope", PRE_ROPE)])
def test_each_image_frees_the_planned_blocks(servers, model, which, cfg):
    """The scheduler returns exactly the blocks the span plan says to vLLM's pool."""
    server = servers[which]
    before = server.metric("attentionpack:blocks_freed_total")
    start, length = placeholder_span(model, server, image_content(9))
    freed = expected_freed_blocks(cfg, start, length)
    assert freed > 0
    after = server.wait_metric("attentionpack:blocks_freed_total", before + freed)
    assert after - before == freed
    assert server.wait_kv_empty() == 0.0


def test_64_mixed_concurrent_requests_then_every_block_is_free(servers):
    lossy = servers["lossy"]
    client = lossy.client(timeout=900)

    def run(i):
        kind = i % 4
        if kind == 0:
            content = image_content(i, size=(32 + 16 * (i % 5), 40))
        elif kind == 1:
            content = image_content(i, "two pictures", n=2)
        elif kind == 2:
            content = f"text only request {i}"
        else:
            content = image_content(i, "stream and stop", size=(96, 96))
        stream = kind == 3 or i % 5 == 0
        if not stream:
            r = client.chat.completions.create(model=lossy.model_name, messages=[{"role": "user", "content": content}],
                                               max_tokens=8 + i % 9, temperature=0.0)
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 + i % 9
            return "done"
        return lossy.stream_then_cancel(content, 4 if kind == 3 else None, client=client)  # kind 3: cancelled

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    assert results.count("cancelled") == 16 and results.count("done") == 48
    assert lossy.wait_kv_empty(timeout=120) == 0.0
    assert lossy.metric("vllm:num_requests_running") == 0
    assert lossy.greedy_tokens(image_content(3), max_tokens=4)  # still serving


@pytest.mark.parametrize("case", ["empty_content_list", "max_tokens_zero", "broken_image", "too_many_images"])
def test_bad_input_gets_the_same_client_error_as_without_the_plugin(servers, case):
    base, lossy = servers["base"], servers["lossy"]

    def status(server):
        client = server.client()
        kw = {"model": server.model_name, "max_tokens": 4}
        msgs = [{"role": "user", "content": image_content(1)}]
        if case == "empty_content_list":
            msgs = [{"role": "user", "content": []}]
        elif case == "max_tokens_zero":
            kw["max_tokens"] = 0
        elif case == "broken_image":
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        elif case == "too_many_images":  # more than vLLM's per-prompt image limit / the model length
            msgs = [{"role": "user", "content": image_content(2, n=12)}]
        try:
            client.chat.completions.create(messages=msgs, **kw)
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    got, expect = status(lossy), status(base)
    assert got == expect
    assert lossy.greedy_tokens(image_content(4), max_tokens=4)  # still serving
