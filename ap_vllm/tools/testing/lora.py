"""Write a random LoRA adapter for a model directory, offline, in the PEFT format vLLM's ``--lora-modules`` loads.

::

    python -m ap_vllm.tools.testing.lora /tmp/tiny-vlm /tmp/adapter-a --rank 8 --seed 1

For every weight ``<prefix>.<module>.weight`` of shape ``(out, in)`` in the model's safetensors whose module name is
one of ``modules`` (default: the attention projections ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), the
adapter holds ``A`` (``rank x in``, entries ``N(0, 1 / in)``) and ``B`` (``out x rank``, entries
``N(0, scale^2 / rank)``), saved as ``base_model.model.<prefix>.<module>.lora_{A,B}.weight`` with
``lora_alpha = rank``, so the layer computes ``W x + B A x``: a change of about ``scale`` times a unit input's
norm per output, enough to change a random model's greedy tokens. ``layers_only`` keeps the modules whose name
holds ``.layers.`` and not ``vision`` (the text decoder's, not the vision tower's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence, Union

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_lora_adapter(model_dir: Union[str, Path], out: Union[str, Path], *, rank: int = 8, seed: int = 0,
                       scale: float = 0.5, modules: Sequence[str] = ATTENTION_MODULES) -> Path:
    """Write the adapter described in the module docstring to ``out`` and return it. Raises ``ValueError`` when
    ``rank`` is not positive or when no weight of ``model_dir`` matches ``modules``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if rank < 1:
        raise ValueError(f"rank={rank}: a LoRA rank is a positive integer")
    model_dir, out = Path(model_dir), Path(out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in sorted(f.keys()):
                prefix, _, leaf = name.rpartition(".")
                module = prefix.rpartition(".")[2]
                if leaf != "weight" or module not in modules or ".layers." not in name or "vision" in name:
                    continue
                n_out, n_in = f.get_slice(name).get_shape()
                key = f"base_model.model.{prefix}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * scale / rank ** 0.5
    if not tensors:
        raise ValueError(f"modules={list(modules)}: no text-layer weight of {model_dir} has one of these names")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": sorted(set(modules)), "base_model_name_or_path": str(model_dir)}, indent=1))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--modules", nargs="+", default=list(ATTENTION_MODULES))
    a = p.parse_args(argv)
    print(write_lora_adapter(a.model_dir, a.out, rank=a.rank, seed=a.seed, scale=a.scale, modules=a.modules))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
