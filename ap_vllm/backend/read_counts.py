"""A measurement of the two-level read: how many span tokens a decode step reads at full rank.

Set ``AP_VLLM_READ_COUNTS=<path prefix>`` in the environment of the engine process and every
AttentionPack layer counts, on the torch decode path (CPU, ``kernel: torch``), the span tokens whose
values it read at full rank and all span tokens it read, summed over decode steps and rows. After
each step the totals are written to ``<prefix>.<pid>.json`` as ``{layer: [full, total]}``.

With ``share = full / total`` the value bytes read per span token and step are
``R_v * (share + (1 - share) / low_rank_divisor)`` coefficient elements, so selection rules can be
compared at equal bytes read (``benchmarks/fidelity_gemma.py --score``), not only at equal bytes
stored. Off by default: writing the totals costs one host sync per compacted layer and step, which
the served path otherwise never has (tests/test_sync_lint.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

READ_COUNTS_ENV = "AP_VLLM_READ_COUNTS"


class ReadCounter:
    """Per-process totals, one float64 [2] device tensor per layer; written after every update."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(f"{prefix}.{os.getpid()}.json")
        self.counts: dict[str, torch.Tensor] = {}

    @staticmethod
    def from_env() -> Optional["ReadCounter"]:
        prefix = os.environ.get(READ_COUNTS_ENV)
        return ReadCounter(prefix) if prefix else None

    def buffer(self, layer: str, device: torch.device) -> torch.Tensor:
        if layer not in self.counts:
            self.counts[layer] = torch.zeros(2, dtype=torch.float64, device=device)
        return self.counts[layer]

    def write(self) -> None:
        """The totals so far, as JSON (a host sync: measurement only)."""
        data = {name: c.tolist() for name, c in self.counts.items()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)


def read_share(prefix: str) -> Optional[dict[str, float]]:
    """Sum the files of every process under ``prefix``: {"full", "total", "share"} (None: no file)."""
    full = total = 0.0
    files = sorted(Path(prefix).parent.glob(Path(prefix).name + ".*.json"))
    for f in files:
        for a, b in json.loads(f.read_text()).values():
            full += a
            total += b
    if not files:
        return None
    return {"full": full, "total": total, "share": full / total if total else float("nan")}


__all__ = ["READ_COUNTS_ENV", "ReadCounter", "read_share"]
