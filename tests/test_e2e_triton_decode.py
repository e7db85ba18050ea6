"""A real ``vllm serve`` whose decode rows run the Triton kernels gives the torch path's tokens.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1 in the server's
environment). Tiny Idefics3 VLM, 256 image tokens, ranks 32/32 (lossy but deterministic): both
servers compact the same spans the same way, so greedy tokens must be equal. Both key spaces:
post-RoPE keys (scores in coefficient space) and pre-RoPE keys (rebuilt and rotated per tile).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")
pytest.importorskip("triton")

from ap_vllm.tools.testing.server import VllmServer, image_data_url, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

RANKS = {"key_rank": 32, "value_rank": 32}


def _server(model, kernel, key_space):
    cfg = json.dumps({"attentionpack": {**RANKS, "kernel": kernel, "key_space": key_space}})
    return VllmServer(model, max_model_len=1024, env={"TRITON_INTERPRET": "1"},
                      extra_args=["--attention-backend", "attentionpack", "--block-size", "32",
                                  "--additional-config", cfg])


def _chat(server, seed):
    content = [{"type": "image_url", "image_url": {"url": image_data_url(width=64, height=48, seed=seed)}},
               {"type": "text", "text": "Describe the image."}]
    r = server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0.0,
        logprobs=True)
    return [t.token for t in r.choices[0].logprobs.content]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=256, num_kv_heads=4, num_heads=4,
                          head_dim=64, hidden_size=32)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_triton_decode_matches_torch_decode(model, key_space):
    with running({"torch": _server(model, "torch", key_space),
                  "triton": _server(model, "triton", key_space)}) as servers:
        for seed in (0, 1):
            expect = _chat(servers["torch"], seed)
            assert len(expect) == 8
            assert _chat(servers["triton"], seed) == expect
