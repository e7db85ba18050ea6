"""Speculative decoding with Qwen3.5's own MTP head (``--speculative-config`` method ``mtp``) on the AttentionPack
backend, in real ``vllm serve`` processes.

vLLM builds the head's one attention layer as ``mtp.layers.0`` (numbered from 0, beside the model's layers) and puts
it in the KV-cache group of the model's full-attention layers: its pages sit in the same blocks, so its visual spans
are compacted in the step that completes them, at the end of the head's first pass, and freed with the model's.
The backend numbers it after the model's layers (``ap_vllm.config.layer_index``), so the head's own builder plans
and compacts it; before, the model's builder took it for a model layer and the head read its image's freed pages.

Model: the tiny Qwen3.5 of ``tests/test_e2e_qwen3_5.py`` (bfloat16; value projections of rank 8: compaction at keys
R = 256 and values R = 8 loses nothing but rounding) with an MTP head of random weights and rank-8 values
(:func:`~ap_vllm.tools.testing.tiny_qwen3_5.add_mtp_head`), two drafts a step. The reference is CPU_ATTN with the
same head, prefilling each prompt in the chunks AttentionPack does (one ends at the image's end: its
``--max-num-batched-tokens`` is that position, computed offline from the processor), with the two drafter
corrections of :mod:`ap_vllm.compat` (the next prompt token at a chunk's end, draft slots by token index), so both
servers run the same head on the same inputs. Compared:

* what the head's attention layer computes in every forward (:func:`~ap_vllm.tools.testing.tiny_qwen3_5.
  report_mtp_attention`: each query row's norm and first values; ``MTP_TOL``), over the exact image on CPU_ATTN and
  over its compact form here: the head's drafts depend on it, its accepted drafts would not show a wrong read
  (greedy speculative decoding returns the model's tokens whatever the drafts);
* the greedy tokens (up to bfloat16 ties, as in ``tests/test_e2e_qwen3_5.py``) and vLLM's spec-decode counters.

Prefix caching is off on both servers: vLLM 0.32 cannot run speculative decoding on a hybrid model with prefix
caching on CPU (its ``mamba_cache_mode=align`` copies states with Triton kernels, which vLLM's CPU build lacks: the
first request fails in ``preprocess_mamba``, with CPU_ATTN as here).
"""

from __future__ import annotations

import base64
import io
import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.server import (VllmServer, equal_up_to_a_tie, greedy_turn, image_content,  # noqa: E402
                                          running, sitecustomize_env)
from ap_vllm.tools.testing.tiny_qwen3_5 import MTP_ATTENTION, build_tiny_qwen3_5  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not __import__("torch").cpu._is_avx512_bf16_supported(),
    reason="vLLM's CPU Gated DeltaNet (bfloat16) was run only on CPUs with AVX-512 BF16; this one has none")]

IMAGE_TOKENS = 2304
KV_HEADS, HEAD_DIM, VALUE_RANK = 4, 64, 8
LOSSLESS = {"key_rank": KV_HEADS * HEAD_DIM, "value_rank": VALUE_RANK, "value_selection": "full"}
DRAFTS = 2
ARGS = ["--block-size", "32", "--no-enable-prefix-caching",
        "--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": DRAFTS})]
MAX_TOKENS = 16
SEEDS = (0, 1)  # images
TIE = 0.15  # nats: bfloat16 ties (tests/test_e2e_qwen3_5.py)
# the head's attention outputs (row norms 15-30), bfloat16 on both sides: a row's norm within 3 %, its first values
# within 1 % of the norm (measured: at most 1.2 % and 0.33 %; once the two servers' tokens part, 8-25 % and 10 %)
MTP_TOL = (0.03, 0.01)
SPEC = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
        "vllm:spec_decode_num_accepted_tokens_total")


def image_end(model_dir, content) -> int:
    """The position after the image's last placeholder token in the prompt of one user message ``content`` (one
    image, then text), from the model's own image processor and chat template (as vLLM's processor expands it)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from ap_vllm.tools.testing.tiny_qwen2_5_vl import IMAGE_PAD

    url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    processor = AutoImageProcessor.from_pretrained(model_dir)
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"]
    tokens = int(grid.prod()) // processor.merge_size ** 2
    tok = AutoTokenizer.from_pretrained(model_dir)
    parts = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
    ids = tok(tok.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                      tokenize=False))["input_ids"]
    return ids.index(tok.convert_tokens_to_ids(IMAGE_PAD)) + tokens


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = build_tiny_qwen3_5(tmp_path_factory.mktemp("qwen3_5_mtp") / "tiny", image_tokens=IMAGE_TOKENS,
                               num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, value_rank=VALUE_RANK, mtp_layers=1)
    shim = "ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim()"
    report = "ap_vllm.tools.testing.tiny_qwen3_5.report_mtp_attention()"
    env = sitecustomize_env(tmp_path_factory.mktemp("shim"), shim, report)
    base_env = sitecustomize_env(tmp_path_factory.mktemp("shim_base"), shim, report,
                                 "ap_vllm.compat.place_mrope_drafts_by_token_index(attentionpack_only=False)",
                                 "ap_vllm.compat.give_drafters_the_next_prompt_token(attentionpack_only=False)")
    chunk = image_end(model, image_content(0))
    servers = {"base": VllmServer(model, max_model_len=IMAGE_TOKENS + 512, env=base_env, dtype="bfloat16",
                                  extra_args=["--attention-backend", "CPU_ATTN", *ARGS,
                                              "--max-num-batched-tokens", str(chunk)]),
               "ours": VllmServer(model, max_model_len=IMAGE_TOKENS + 512, env=env, dtype="bfloat16", extra_args=[
                   "--attention-backend", "attentionpack", *ARGS, "--max-num-batched-tokens", "4096",
                   "--additional-config", json.dumps({"attentionpack": LOSSLESS})])}
    with running(servers) as started:
        yield started


def greedy(server, content) -> list[tuple[str, float, dict]]:
    """The tokens of a greedy answer to one user message (:func:`~ap_vllm.tools.testing.server.greedy_turn`)."""
    return greedy_turn(server, [{"role": "user", "content": content}], MAX_TOKENS)[1]


def compared(base, ours) -> int:
    """The two greedy answers equal up to a tie (module docstring); the number of tokens compared."""
    return equal_up_to_a_tie(base, ours, TIE)


def mtp_rows(log: str) -> list[list[tuple[float, list[float]]]]:
    """The head's attention outputs in (part of) a server's log: per forward, (norm, first values) of its last
    query rows."""
    forwards = []
    for line in log.splitlines():
        if MTP_ATTENTION in line:
            rows = line.split(MTP_ATTENTION, 1)[1].split()[1:]
            forwards.append([(float(r.split(":")[0]), [float(x) for x in r.split(":")[1].split(",")]) for r in rows])
    return forwards


def test_mtp_head_reads_the_compacted_image_as_cpu_attn_reads_the_exact_one(servers):
    base, ours = servers["base"], servers["ours"]
    freed = ours.metric("attentionpack:blocks_freed_total")
    spec = {name: (base.metric(name), ours.metric(name)) for name in SPEC}
    compared_forwards = 0
    for seed in SEEDS:
        content = image_content(seed)
        marks = len(base.log_text()), len(ours.log_text())
        expect, got = greedy(base, content), greedy(ours, content)
        n = compared(expect, got)
        assert n >= MAX_TOKENS // 2
        base_rows, our_rows = (mtp_rows(s.log_text()[m:]) for s, m in zip((base, ours), marks))
        # DRAFTS forwards a step (a pass over the step's rows, then DRAFTS - 1 over its drafts): the prompt's two
        # chunks, then a decode step a token; compared up to the step that takes the first token that parts (whose
        # drafts start from it), all of them when none does
        if n == len(expect) == len(got):
            assert len(base_rows) == len(our_rows), (seed, len(base_rows), len(our_rows))
        forwards = len(base_rows) if n == len(expect) else DRAFTS * 2 + DRAFTS * (n - 1)
        assert forwards >= DRAFTS * (MAX_TOKENS // 2 + 1), (seed, len(base_rows), len(our_rows), n)
        for i, (b, o) in enumerate(zip(base_rows[:forwards], our_rows[:forwards])):
            assert len(b) == len(o), (seed, i, len(b), len(o))
            for (nb, vb), (no, vo) in zip(b, o):
                assert abs(nb - no) <= MTP_TOL[0] * nb, (seed, i, nb, no)
                assert max(abs(x - y) for x, y in zip(vb, vo)) <= MTP_TOL[1] * nb, (seed, i, nb, vb, vo)
        compared_forwards += forwards
    assert compared_forwards >= len(SEEDS) * DRAFTS * (MAX_TOKENS // 2 + 1)
    # the head proposed as often on both servers, and had as many drafts accepted
    for name, (b0, o0) in spec.items():
        assert base.metric(name) - b0 == ours.metric(name) - o0, name
    assert ours.metric("vllm:spec_decode_num_drafts_total") - spec[SPEC[0]][1] > 0
    # each image (2304 tokens, 24 attention blocks of 96) compacted to 264 of 512 numbers a token: blocks freed,
    # every block back
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + len(SEEDS) * 4) >= freed + len(SEEDS) * 4
    assert "the mtp drafter's attention layers run on AttentionPack too" in ours.log_text()
    assert ours.wait_kv_empty() == 0.0


def test_concurrent_image_requests_with_mtp_drafts_equal_cpu_attn(servers):
    """Concurrent requests (other chunks than CPU_ATTN's, images and text in one batch): the greedy tokens still equal
    CPU_ATTN's one at a time, and every block comes back."""
    base, ours = servers["base"], servers["ours"]
    contents = [image_content(10 + i) for i in range(3)] + ["a text-only request"]
    expect = [greedy(base, c) for c in contents]
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(len(contents)) as pool:
        got = list(pool.map(lambda c: greedy(ours, c), contents))
    assert sum(compared(b, o) for b, o in zip(expect, got)) >= len(contents) * MAX_TOKENS // 2
    assert ours.wait_kv_empty() == 0.0
