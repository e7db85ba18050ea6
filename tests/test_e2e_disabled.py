"""End to end: with compaction off (``{"attentionpack": {"enabled": false}}``), serving with
``--attention-backend attentionpack`` is vLLM's own CPU backend (CPU_ATTN), bit for bit.

Per configuration (head size 64 in fp32, head size 128 in bf16), two real servers on the same tiny VLM
(3 layers, 64-token images, default block size): CPU_ATTN and AttentionPack with compaction off. Each
gets the same 6 greedy image chats, one at a time and then 4 at a time (one server per configuration
serves both concurrency levels; the prompts are shorter than a block, so the second round gets no
prefix-cache hits). One at a time, every step's batch is the same on both servers: tokens and
log-probabilities must be equal bit for bit. Four at a time, which requests share a step depends on
timing: the tokens must equal CPU_ATTN's one-at-a-time tokens (CPU_ATTN's own do not depend on the
concurrency).
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

OFF = json.dumps({"attentionpack": {"enabled": False}})
CHATS, MAX_TOKENS = 6, 12


@pytest.fixture(scope="module", params=[(64, "float32"), (128, "bfloat16")], ids=lambda p: f"head{p[0]}-{p[1]}")
def servers(request, tmp_path_factory):
    head_dim, dtype = request.param
    model = build_tiny_vlm(tmp_path_factory.mktemp(f"vlm{head_dim}") / "tiny", image_tokens=64, num_layers=3,
                           num_kv_heads=2, num_heads=4, head_dim=head_dim)
    with running({
        "cpu_attn": VllmServer(model, dtype=dtype, max_model_len=1024, extra_args=["--attention-backend", "CPU_ATTN"]),
        "off": VllmServer(model, dtype=dtype, max_model_len=1024,
                          extra_args=["--attention-backend", "attentionpack", "--additional-config", OFF]),
    }) as servers:
        yield servers


def _chat(server, seed: int) -> list[tuple[str, float]]:
    content = [{"type": "image_url", "image_url": {"url": image_data_url(width=64, height=48, seed=seed)}},
               {"type": "text", "text": ["Describe the image.", "What is in it?", "Name the colours."][seed % 3]}]
    r = server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS,
        temperature=0.0, logprobs=True)
    return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]


def _chats(server, concurrency: int) -> list[list[tuple[str, float]]]:
    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda seed: _chat(server, seed), range(CHATS)))


def _tokens(outputs):
    return [[token for token, _ in chat] for chat in outputs]


def test_disabled_plugin_is_cpu_attn_bit_for_bit(servers):
    base, off = servers["cpu_attn"], servers["off"]
    got = {(name, c): _chats(server, c) for c in (1, 4) for name, server in (("cpu_attn", base), ("off", off))}
    ref = got["cpu_attn", 1]
    report = {f"{name}@{c}": {"tokens": sum(a == b for a, b in zip(_tokens(outs), _tokens(ref))),
                              "logprobs": sum(a == b for a, b in zip(outs, ref))}
              for (name, c), outs in got.items()}  # chats equal to CPU_ATTN's one at a time, of CHATS
    assert all(len(chat) == MAX_TOKENS for outs in got.values() for chat in outs)
    assert got["off", 1] == ref, f"enabled: false is not CPU_ATTN bit for bit, one request at a time: {report}"
    assert _tokens(got["cpu_attn", 4]) == _tokens(ref), f"CPU_ATTN's tokens depend on the concurrency: {report}"
    assert _tokens(got["off", 4]) == _tokens(ref), f"enabled: false changes tokens at concurrency 4: {report}"


def test_disabled_plugin_steps_aside(servers):
    log = servers["off"].log_text()
    assert "AttentionPack compaction is off (enabled: false)" in log and "Using AttentionPack backend" not in log
