"""``--kv-cache-dtype fp8`` with AttentionPack inside a real ``vllm serve`` (CPU), against vLLM's CPU_ATTN.

Model: the tiny Idefics3 VLM of ``test_e2e_compaction.py`` (4 kv heads x 64, hidden size 32, 1024 image tokens,
fp32). Servers, all with block size 32:

* ``cpu_fp8``: vLLM's CPU_ATTN with an FP8 cache, the reference;
* ``cpu``: CPU_ATTN with the model-dtype cache (measures how far FP8 itself moves the outputs);
* ``exact``: AttentionPack with compaction off on an FP8 cache: greedy tokens must equal ``cpu_fp8``'s token
  for token (the same e4m3 pages, the same scales);
* ``packed``: AttentionPack compacting each image at the model's true rank (pre-RoPE keys and values have rank
  <= 32) over the FP8 pages, with FP8 coefficients (``coefficient_dtype: auto`` on an FP8 cache). What it
  loses is quantization only, so its first-token log-probabilities must stay within the error that FP8 pages
  already bring (``cpu_fp8`` against ``cpu``), and its spans must really be compacted and freed.

(Cache dtypes AttentionPack cannot store are refused at start-up: ``tests/test_config.py``.)
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")
torch = pytest.importorskip("torch")

from ap_vllm.tools.testing.server import VllmServer, image_content, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
                                 reason="vLLM's CPU FP8 KV cache (the reference) needs x86 AVX-512 or AMX")]

IMAGE_TOKENS = 1024
KV_HEADS, HEAD_DIM, HIDDEN = 4, 64, 32
BLOCK = 32
MAX_LEN = 2400  # two images + text + output
PACKED = {"key_rank": HIDDEN, "value_rank": HIDDEN, "key_space": "pre_rope", "importance_fraction": 1.0}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=IMAGE_TOKENS, num_layers=2,
                          num_kv_heads=KV_HEADS, num_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN)


def _server(model, backend, *extra, cfg=None):
    args = ["--attention-backend", backend, "--block-size", str(BLOCK), *extra]
    if cfg is not None:
        args += ["--additional-config", json.dumps({"attentionpack": cfg})]
    return VllmServer(model, max_model_len=MAX_LEN, extra_args=args)


@pytest.fixture(scope="module")
def servers(model):
    fp8 = ("--kv-cache-dtype", "fp8")
    with running({
        "cpu_fp8": _server(model, "CPU_ATTN", *fp8),
        "cpu": _server(model, "CPU_ATTN"),
        "exact": _server(model, "attentionpack", *fp8, cfg={"enabled": False}),
        "packed": _server(model, "attentionpack", *fp8, cfg=PACKED),
    }) as servers:
        yield servers


def _chat(server, content, max_tokens=16, top=0):
    r = server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0.0, logprobs=True, **({"top_logprobs": top} if top else {}))
    return r.choices[0].logprobs.content


def test_exact_mode_on_fp8_pages_equals_cpu_attn_fp8(servers):
    ref, ours = servers["cpu_fp8"], servers["exact"]
    for content in (image_content(0), image_content(1), image_content(5, "Compare them.", n=2),
                    "a text-only request over FP8 pages"):
        assert [t.token for t in _chat(ours, content)] == [t.token for t in _chat(ref, content)]


def _steps(server, content, n=6) -> list[tuple[str, dict[str, float]]]:
    """Greedy tokens and the top-20 log-probabilities of each step."""
    return [(c.token, {t.token: t.logprob for t in c.top_logprobs})
            for c in _chat(server, content, max_tokens=n, top=20)]


def test_compaction_over_fp8_pages_stays_within_the_fp8_error(servers):
    """Decode steps (they read the compacted span; a prefill step attends to the exact span before compacting
    it) of the three servers, at every position where all three generated the same tokens so far: the
    model-dtype cache's top-5 tokens as each FP8 server scores them."""
    before = servers["packed"].metric("attentionpack:tokens_compacted_total")
    worst_fp8 = worst_packed = 0.0
    compared = 0
    for seed in (0, 1, 2):
        content = image_content(seed)
        exact, fp8, packed = (_steps(servers[n], content) for n in ("cpu", "cpu_fp8", "packed"))
        for i in range(1, len(exact)):
            if not ([t for t, _ in exact[:i]] == [t for t, _ in fp8[:i]] == [t for t, _ in packed[:i]]):
                break
            top = sorted(exact[i][1].items(), key=lambda kv: -kv[1])[:5]
            for tok, lp in top:
                worst_fp8 = max(worst_fp8, abs(fp8[i][1].get(tok, -30.0) - lp))
                worst_packed = max(worst_packed, abs(packed[i][1].get(tok, -30.0) - lp))
            compared += 1
    assert compared >= 3, compared  # decode steps with a common history
    assert worst_fp8 > 0.0  # the FP8 pages do move the outputs of this model
    assert worst_packed <= 3.0 * worst_fp8 + 0.02, (worst_packed, worst_fp8)
    # the spans were compacted (not left exact) and their blocks freed (the counters are published with a lag)
    want = before + 3 * (IMAGE_TOKENS - 64)
    assert servers["packed"].wait_metric("attentionpack:tokens_compacted_total", want, timeout=60) >= want
    assert servers["packed"].metric("attentionpack:blocks_freed_total") > 0

