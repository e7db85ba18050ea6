"""Tensor parallelism in a real ``vllm serve --tensor-parallel-size 2``: each worker compacts its own KV heads.

Under tensor parallelism a worker holds ``h = H / tp`` of the model's ``H`` KV heads and compacts its own
``T x (h*d)`` slice of a span; ranks are stated for the model (``T x (H*d)``) and each worker keeps
``ceil(R * h / H)`` of them (:meth:`ap_vllm.config.AttentionPackConfig.for_kv_heads`), so a configuration
frees the same share of KV memory at every tensor-parallel size.

Model: the tiny Idefics3 VLM with 8 kv heads x 64 and a hidden size of 32, so each worker holds 4 heads = 256
numbers per token whose values and pre-RoPE keys have rank <= 32 (they are linear maps of a 32-dim hidden
state). Model ranks of 64 (32 per worker) with ``key_space: pre_rope`` therefore lose nothing, and still free
blocks (32 + 32 numbers per token instead of 2 x 256): greedy outputs must equal vLLM's CPU_ATTN at the same
tensor-parallel size token for token (fp32), and each image must free exactly the blocks that the plan of one
worker's geometry gives (all workers share the scheduler's block table).

vLLM's CPU workers need their cores named when there is one NUMA node (``VLLM_CPU_OMP_THREADS_BIND``): one
core each.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import torch  # noqa: E402

from ap_vllm.config import parse_config  # noqa: E402
from ap_vllm.core.spans import KVGeometry, plan_spans  # noqa: E402
from ap_vllm.tools.testing.server import VllmServer, image_data_url, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

TP = 2
IMAGE_TOKENS = 256
KV_HEADS, HEAD_DIM, HIDDEN, LAYERS = 8, 64, 32, 2
BLOCK = 32  # CPU_ATTN needs multiples of 32
# model ranks: 32 per worker (4 of the 8 heads), the pre-RoPE keys' and the values' true rank
LOSSLESS = {"key_rank": 2 * HIDDEN, "value_rank": 2 * HIDDEN, "key_space": "pre_rope", "importance_fraction": 1.0}
MAX_LEN = 2 * IMAGE_TOKENS + 256


def _cores() -> str:
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[i % len(cores)]) for i in range(TP))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=IMAGE_TOKENS, num_layers=LAYERS,
                          num_kv_heads=KV_HEADS, num_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN)


def _server(model, *args):
    return VllmServer(model, max_model_len=MAX_LEN, executor="mp", kv_cache_space_gib=1,
                      env={"VLLM_CPU_OMP_THREADS_BIND": _cores()},
                      extra_args=["--tensor-parallel-size", str(TP), "--block-size", str(BLOCK), *args])


@pytest.fixture(scope="module")
def servers(model):
    with running({
        "base": _server(model, "--attention-backend", "CPU_ATTN"),
        "ours": _server(model, "--attention-backend", "attentionpack", "--max-num-seqs", "8",
                        "--additional-config", json.dumps({"attentionpack": LOSSLESS})),
    }) as servers:
        yield servers


def chat(server, content, max_tokens=16):
    r = server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0.0, logprobs=True, extra_body={"return_token_ids": True})
    return [t.token for t in r.choices[0].logprobs.content], r.model_dump()["prompt_token_ids"]


def image(seed, text="Describe the image."):
    return [{"type": "image_url", "image_url": {"url": image_data_url(seed=seed)}}, {"type": "text", "text": text}]


def test_each_worker_compacts_its_heads_and_outputs_equal_cpu_attn(servers, model):
    from transformers import AutoTokenizer

    base, ours = servers["base"], servers["ours"]
    fake = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids("<fake_token_around_image>")
    # one worker's geometry (4 of the 8 heads) and its share of the model's ranks (32 of 64)
    worker = parse_config(LOSSLESS).for_kv_heads(KV_HEADS // TP, KV_HEADS)
    assert (worker.key_rank, worker.value_rank) == (HIDDEN, HIDDEN)
    geometry = KVGeometry(BLOCK, KV_HEADS // TP, HEAD_DIM, torch.float32, LAYERS)
    freed = 0
    for seed in range(3):
        got, prompt = chat(ours, image(seed))
        assert got == chat(base, image(seed))[0], seed
        where = [i for i, t in enumerate(prompt) if t == fake]  # the placeholder run, wrappers included
        plans = plan_spans(worker, geometry, [(where[0], where[-1] + 1 - where[0])], len(prompt))
        assert len(plans) == 1 and plans[0].num_freed_blocks > 0
        freed += plans[0].num_freed_blocks
    text = "a text-only request stays exact"
    assert chat(ours, text)[0] == chat(base, text)[0]
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed) == freed
    # bytes on both workers: a block of one worker's pages (K and V of its 4 heads, fp32) in every layer, twice
    page = BLOCK * 2 * (KV_HEADS // TP) * HEAD_DIM * 4
    assert ours.metric("attentionpack:bytes_saved") == freed * page * LAYERS * TP
    assert "ranks of this worker's 4 of the model's 8 KV heads" in ours.log_text()


def test_concurrent_requests_finish_and_free_every_block(servers):
    ours = servers["ours"]
    with cf.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda s: chat(ours, image(10 + s) if s < 3 else "hello", max_tokens=24)[0], range(4)))
    assert all(len(o) > 0 for o in outs)
    assert ours.wait_kv_empty() == 0.0
