"""Speculative decoding (``--speculative-config`` method ``ngram``) on the AttentionPack backend, in real
``vllm serve`` processes.

A verification row holds the request's last token and up to k drafts looked up in its own tokens; the builder
gives it the path of every multi-query row (exact keys plus the compacted spans at full rank), and the slots of
rejected drafts are written again by the next step. Model and full-rank configuration as in
``tests/test_e2e_compaction.py``: compaction loses nothing there, so greedy outputs must equal CPU_ATTN's
(run with the same drafts) token for token, and the same drafts must be proposed and accepted (vLLM's
spec-decode counters equal). The full-rank server has a small KV budget (requests preempted with drafts in
flight) and 512-token steps (image prompt chunks beside verification rows). A lossy server (the default value
selection, which keeps each request's lse between steps) serves mixed concurrent load with drafts and returns
every block.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import VllmServer, image_content, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

KV_HEADS, HEAD_DIM, HIDDEN = 4, 64, 32
BLOCK = 32
FULL = {"key_rank": KV_HEADS * HEAD_DIM, "value_rank": HIDDEN, "importance_fraction": 1.0}
LOSSY = {"key_rank": KV_HEADS * HEAD_DIM // 8, "value_rank": KV_HEADS * HEAD_DIM // 8}
SPEC = ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                                            "prompt_lookup_max": 4})]
MAX_LEN = 2400
REPEAT = "say it again and again, say it again and again"  # (text the model's outputs repeat: drafts found)
TOKENS = 48
DRAFTS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=1024, num_layers=2,
                           num_kv_heads=KV_HEADS, num_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN)

    def ours(cfg, *extra):
        return VllmServer(model, max_model_len=MAX_LEN, extra_args=[
            "--attention-backend", "attentionpack", "--block-size", str(BLOCK), *SPEC,
            "--additional-config", json.dumps({"attentionpack": cfg}), *extra])

    with running({
        "base": VllmServer(model, max_model_len=MAX_LEN, extra_args=["--attention-backend", "CPU_ATTN",
                                                                     "--block-size", str(BLOCK), *SPEC]),
        "full": ours(FULL, "--num-gpu-blocks-override", "80", "--max-num-batched-tokens", "512"),
        "lossy": ours(LOSSY, "--max-num-seqs", "32"),
    }) as servers:
        yield servers


def counters(server) -> tuple[float, ...]:
    return tuple(server.metric(name) for name in DRAFTS)


def test_greedy_outputs_and_drafts_equal_cpu_attn(servers):
    base, full = servers["base"], servers["full"]
    before = {name: counters(servers[name]) for name in ("base", "full")}
    freed = full.metric("attentionpack:blocks_freed_total")
    for content in [image_content(seed, REPEAT) for seed in range(4)] + [image_content(7, REPEAT, n=2)]:
        assert full.greedy_tokens(content, TOKENS) == base.greedy_tokens(content, TOKENS)
    # the same drafts proposed and accepted on both (stats reach /metrics with the engine's next step)
    want = [b - a for a, b in zip(before["base"], counters(base))]
    assert want[0] > 0 and want[1] > 0, "no draft was proposed or accepted: the prompts were meant to repeat"
    got = [full.wait_metric(name, a + w) - a for name, a, w in zip(DRAFTS, before["full"], want)]
    assert got == want
    assert full.wait_metric("attentionpack:blocks_freed_total", freed + 1) > freed  # the spans were compacted


def test_preemption_with_drafts_in_flight(servers):
    """Two long requests outgrow the 80-block budget: vLLM preempts one (its drafts dropped, its span compacted
    again when it is recomputed); outputs equal CPU_ATTN's one at a time."""
    base, full = servers["base"], servers["full"]
    contents = [image_content(20 + i, REPEAT) for i in range(2)]
    # (each request holds 27 blocks once its span is compacted (24 of them the span's), then one more per 32 tokens:
    # two outgrow 80 blocks past 416 tokens each; a third would wait for an exact prefill's 33 free blocks)
    long = {"max_tokens": 512, "extra_body": {"ignore_eos": True}}
    expect = [base.greedy_tokens(c, **long) for c in contents]
    preempted, accepted = full.metric("vllm:num_preemptions_total"), full.metric(DRAFTS[1])
    with cf.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda c: full.greedy_tokens(c, **long), contents))
    assert full.metric("vllm:num_preemptions_total") > preempted, "the KV budget was meant to force preemption"
    assert got == expect
    assert full.wait_metric(DRAFTS[1], accepted + 1) > accepted
    assert full.wait_kv_empty() == 0.0


def test_seeded_sampling_with_drafts_is_served(servers):
    """Seeded random sampling with drafts, each image prompt prefilled over three steps (the chunked prompt's
    draws undone by ``ap_vllm.compat.rewind_cpu_generators``, then rejection sampling of drafts with the same
    generator). vLLM's ngram verification is not reproducible under a seed on CPU (CPU_ATTN's own samples differ
    between two runs of one request), so this checks that every sample is served whole and the engine lives on
    (CPU_ATTN with chunked prompts dies here: "CPU Generator does not use offset"), not the samples."""
    base, full = servers["base"], servers["full"]
    for seed in (1, 2):
        r = full.client().chat.completions.create(
            model=full.model_name, messages=[{"role": "user", "content": image_content(40 + seed, REPEAT)}],
            max_tokens=32, temperature=0.7, seed=seed, n=2, extra_body={"ignore_eos": True})
        assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 64
    assert full.greedy_tokens(image_content(5, REPEAT), TOKENS) == base.greedy_tokens(image_content(5, REPEAT), TOKENS)


def test_mixed_concurrent_requests_with_drafts_then_every_block_is_free(servers):
    lossy = servers["lossy"]
    client = lossy.client(timeout=900)
    accepted = lossy.metric(DRAFTS[1])

    def run(i):
        kind = i % 4
        content = (image_content(i, REPEAT, size=(32 + 16 * (i % 5), 40)) if kind == 0
                   else image_content(i, REPEAT, n=2) if kind == 1 else f"text only, text only, text only {i}"
                   if kind == 2 else image_content(i, REPEAT, size=(96, 96)))
        if kind != 3:
            r = client.chat.completions.create(model=lossy.model_name, messages=[{"role": "user", "content": content}],
                                               max_tokens=24 + i % 9, temperature=0.0)
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24 + i % 9
            return "done"
        return lossy.stream_then_cancel(content, 6, client=client)  # cancelled mid-stream

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(run, range(24)))
    assert results.count("cancelled") == 6 and results.count("done") == 18
    assert lossy.wait_metric(DRAFTS[1], accepted + 1) > accepted
    assert lossy.wait_kv_empty(timeout=120) == 0.0
    assert lossy.metric("vllm:num_requests_running") == 0
    assert lossy.greedy_tokens(image_content(3), max_tokens=4)  # still serving
