"""LoRA adapters (``--enable-lora --lora-modules``) with images compacted, in real ``vllm serve`` processes.

Model: the tiny Idefics3 VLM of ``test_e2e_compaction`` (4 kv heads x 64 = 256 numbers a token, hidden size 32) and
two random adapters on every text layer's q / k / v / o projections
(:func:`~ap_vllm.tools.testing.lora.write_lora_adapter`). An adapter changes the keys and values themselves, and a
value stays a linear map of the 32-dim hidden state, so compaction with keys at R = 256 and values at R = 32 loses
nothing under either adapter, and frees blocks (288 of 512 numbers a token). Greedy outputs must equal vLLM's
CPU_ATTN with the same adapter token for token (fp32), for the base model and each adapter, one at a time, and
for both adapters in one batch; and an image's compact form, cached under one adapter, must never serve another (vLLM puts
the adapter in every block's hash, and a compact span's hash chains through them), while the same adapter asking
again takes it from the cache.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from ap_vllm.tools.testing.lora import write_lora_adapter  # noqa: E402
from ap_vllm.tools.testing.server import base_and_ours, image_content, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

KV_HEADS, HEAD_DIM, HIDDEN = 4, 64, 32
# lossless (see above); every token read at full rank, so compact spans are shared through the prefix cache
LOSSLESS = {"key_rank": KV_HEADS * HEAD_DIM, "value_rank": HIDDEN, "value_selection": "full"}
ADAPTERS = ("a", "b")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = build_tiny_vlm(root / "tiny", image_tokens=1024, num_layers=2, num_kv_heads=KV_HEADS,
                           num_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN)
    modules = [f"{name}={write_lora_adapter(model, root / name, rank=8, seed=seed)}"
               for seed, name in enumerate(ADAPTERS, 1)]
    args = ["--block-size", "32", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
            "--lora-modules", *modules]
    with running(base_and_ours(model, max_model_len=2048, args=args, attentionpack=LOSSLESS)) as servers:
        yield servers


def test_base_and_adapters_equal_cpu_attn_alone_and_mixed(servers):
    base, ours = servers["base"], servers["ours"]
    names = [None, *ADAPTERS]  # None: the base model
    freed = ours.metric("attentionpack:blocks_freed_total")
    expect = {name: base.greedy_tokens(image_content(1), model=name) for name in names}
    assert len({tuple(t) for t in expect.values()}) == 3, expect  # each adapter changes the answer
    for name in names:
        assert ours.greedy_tokens(image_content(1), model=name) == expect[name], name
    # one batch of both adapters: new images, and the first image again under each. Not the base model in a batch
    # with adapters: vLLM 0.32's CPU LoRA ops index the adapters' weights with the row's slot, and a row without an
    # adapter (slot -1) then gets the last slot's adapter, with CPU_ATTN too (vllm/lora/ops/torch_ops/lora_ops.py)
    jobs = [(image_content(10 + i), ADAPTERS[i % 2]) for i in range(6)] + [(image_content(1), n) for n in ADAPTERS]
    want = [base.greedy_tokens(c, model=n) for c, n in jobs]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(lambda job: ours.greedy_tokens(job[0], model=job[1]), jobs)) == want
    # 9 spans compacted (the repeats of the first image come from the cache), each of 1027 tokens after a short
    # text prefix freeing the 5 blocks of 32 its plan frees (288 of 512 numbers a token, bases and edge blocks kept)
    assert ours.wait_metric("attentionpack:blocks_freed_total", freed + 9 * 5) == freed + 9 * 5
    assert ours.wait_kv_empty() == 0.0


def test_compact_image_cached_per_adapter(servers):
    """The same image under adapter a, then b, then a: only the third is a span cache hit, and b's answer is b's."""
    base, ours = servers["base"], servers["ours"]
    content = image_content(30, "What is in this picture?")
    expect = [base.greedy_tokens(content, model=n) for n in ("a", "b", "a")]
    hits = ours.metric("attentionpack:span_cache_hits_total")
    queries = ours.metric("attentionpack:span_cache_queries_total")
    assert [ours.greedy_tokens(content, model=n) for n in ("a", "b", "a")] == expect
    assert ours.wait_metric("attentionpack:span_cache_queries_total", queries + 3) == queries + 3
    assert ours.metric("attentionpack:span_cache_hits_total") == hits + 1
