"""Speculative decoding with an EAGLE-3 drafter (``--speculative-config`` method ``eagle3``) on the AttentionPack
backend, in real ``vllm serve`` processes.

The drafter's one attention layer shares the model's KV-cache group: its pages sit in the same blocks, so its
visual spans are compacted with the model's layers in the step that completes them (at the end of the drafter's
first pass) and freed with them; its rows read them at full rank. Model: the tiny Qwen2.5-VL of
``tests/test_e2e_qwen2_5_vl.py`` (2 kv heads x 32; value projections of rank 8) with a drafter from
:func:`~ap_vllm.tools.testing.eagle.write_eagle_drafter` (a one-layer prompt-lookup head, so drafts are accepted;
its value projection of rank 8 too). Keys at R = 64 = H*d and values at R = 8 lose nothing in either model, so
greedy outputs must equal CPU_ATTN's (with the same head) token for token, and the head must propose, and get
accepted, the same drafts: vLLM's spec-decode counters, per draft position too, equal. Two vLLM 0.32 defects are
corrected here when AttentionPack serves (:mod:`ap_vllm.compat`), and the CPU_ATTN server gets the second
correction too (through its ``sitecustomize``), so that both run the same head:
``place_mrope_drafts_by_token_index`` (on an M-RoPE model vLLM writes a draft's KV to the slot of its temporal
rotary coordinate, inside the image: there it overwrote the head's compact form, and a two-image prompt got no
draft accepted against 15 of 18 on CPU_ATTN) and ``give_drafters_the_next_prompt_token`` (the head's input at the
end of a prompt chunk that compaction ends at an image; CPU_ATTN prefills these prompts in one chunk). A lossy
server (low ranks) serves concurrent image requests with drafts, frees span blocks and returns every block.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.eagle import write_eagle_drafter  # noqa: E402
from ap_vllm.tools.testing.server import (VllmServer, image_content, running,  # noqa: E402
                                          sitecustomize_env)
from ap_vllm.tools.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = 1024
VALUE_RANK = 8
# (full: every token at full rank, and compact spans shared through the prefix cache, which the EMA's per-request
# importance in the pages rules out)
LOSSLESS = {"key_rank": 64, "value_rank": VALUE_RANK, "value_selection": "full"}
LOSSY = {"key_rank": 16, "value_rank": 8}
TOKENS = 32
DRAFTS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
          "vllm:spec_decode_num_accepted_tokens_total")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle")
    model = build_tiny_qwen2_5_vl(root / "tiny", image_tokens=IMAGE_TOKENS, value_rank=VALUE_RANK)
    drafter = write_eagle_drafter(model, root / "eagle3", "eagle3", value_rank=VALUE_RANK)
    shim = "ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim()"
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"), shim)
    base_env = sitecustomize_env(tmp_path_factory.mktemp("shim_base"), shim,
                                 "ap_vllm.compat.place_mrope_drafts_by_token_index(attentionpack_only=False)")
    args = ["--block-size", "32", "--speculative-config",
            json.dumps({"method": "eagle3", "model": str(drafter), "num_speculative_tokens": 3})]

    def server(backend, cfg=None, *extra):
        more = ["--additional-config", json.dumps({"attentionpack": cfg})] if cfg is not None else []
        return VllmServer(model, max_model_len=2 * IMAGE_TOKENS + 512, env=base_env if cfg is None else env,
                          extra_args=["--attention-backend", backend, *args, *more, *extra])

    with running({"base": server("CPU_ATTN"), "ours": server("attentionpack", LOSSLESS),
                  "lossy": server("attentionpack", LOSSY, "--max-num-seqs", "8")}) as servers:
        yield servers


def counters(server) -> tuple[float, ...]:
    per_pos = sorted(line for line in server.metrics().splitlines()
                     if line.startswith("vllm:spec_decode_num_accepted_tokens_per_pos"))
    return tuple(server.metric(name) for name in DRAFTS) + tuple(float(line.split()[-1]) for line in per_pos)


def test_greedy_outputs_and_drafts_equal_cpu_attn(servers):
    base, ours = servers["base"], servers["ours"]
    before = {name: counters(servers[name]) for name in ("base", "ours")}
    freed = ours.metric("attentionpack:blocks_freed_total")
    contents = [image_content(seed) for seed in range(3)] + [image_content(5, "Compare them.", n=2)]
    for content in contents:
        assert ours.greedy_tokens(content, TOKENS) == base.greedy_tokens(content, TOKENS)
    want = [b - a for a, b in zip(before["base"], counters(base))]
    assert want[0] > 0 and want[2] > 0, "no draft was proposed or accepted: the drafter was meant to find some"
    ours.wait_metric(DRAFTS[0], before["ours"][0] + want[0])  # (stats reach /metrics with the engine's next step)
    assert [b - a for a, b in zip(before["ours"], counters(ours))] == want
    # 5 images of about 1024 tokens, each freeing blocks in every layer's pages, the drafter's included
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + 5 * 6) >= freed + 5 * 6
    assert ours.wait_kv_empty() == 0.0


def test_second_turn_reads_the_image_from_the_prefix_cache_with_drafts(servers):
    """With a drafter vLLM drops a cache hit's last block (the head's KV at its last token was written from the next
    token of the request that cached it), then cut back to the image's end; the hit still holds the image's compact
    form (the model's and the head's) when the first turn's text follows it for more than two blocks. The second turn is a span
    cache hit, nothing is compacted again, and it equals CPU_ATTN with the same head token for token."""
    base, ours = servers["base"], servers["ours"]
    question = ("What is in this picture? Describe every object, its colour, its size and where it is, then say "
                "which part of the picture is the brightest and which the darkest, and why. ") * 2
    first = {"role": "user", "content": image_content(40, question)}

    def ask(server, messages):
        r = server.client().chat.completions.create(model=server.model_name, messages=messages, max_tokens=TOKENS,
                                                    temperature=0.0, logprobs=True)
        return [t.token for t in r.choices[0].logprobs.content], r.choices[0].message.content

    compacted = ours.metric("attentionpack:tokens_compacted_total")
    got, text = ask(ours, [first])
    assert got == ask(base, [first])[0]
    second = [first, {"role": "assistant", "content": text},
              {"role": "user", "content": "And what are its colours, from left to right, and how bright is each?"}]
    hits = ours.metric("attentionpack:span_cache_hits_total")
    compacted = ours.wait_metric("attentionpack:tokens_compacted_total", compacted + IMAGE_TOKENS)
    assert ask(ours, second)[0] == ask(base, second)[0]
    assert ours.wait_metric("attentionpack:span_cache_hits_total", hits + 1) == hits + 1
    assert ours.metric("attentionpack:tokens_compacted_total") == compacted
    assert ours.wait_kv_empty() == 0.0


def test_lossy_ranks_serve_concurrent_requests_with_drafts(servers):
    """At the default-like lossy ranks the drafter's and the model's spans are approximations: outputs are the
    model's own greedy tokens over its compacted spans (drafts only change how many come per step), so each request
    alone and the same requests concurrent give the same tokens; every block comes back."""
    lossy = servers["lossy"]
    freed = lossy.metric("attentionpack:blocks_freed_total")
    drafts = lossy.metric(DRAFTS[0])
    contents = [image_content(20 + i, size=(40 + 8 * i, 48)) for i in range(4)] + ["a text-only request"]
    alone = [lossy.greedy_tokens(c, TOKENS) for c in contents]
    with cf.ThreadPoolExecutor(len(contents)) as pool:
        assert list(pool.map(lambda c: lossy.greedy_tokens(c, TOKENS), contents)) == alone
    assert lossy.wait_metric(DRAFTS[0], drafts + 1) > drafts
    assert lossy.wait_metric("attentionpack:blocks_freed_total", freed + 8 * 6) >= freed + 8 * 6
    assert lossy.wait_kv_empty() == 0.0
