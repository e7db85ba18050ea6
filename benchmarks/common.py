"""What the benchmarks share: the checkout's paths and the JSON writer.

Every benchmark runs as ``python benchmarks/X.py`` from a checkout and starts with::

    ROOT = Path(__file__).resolve().parents[1]
    if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
        sys.path.insert(0, str(ROOT))
    from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402

so benchmarks import each other as ``benchmarks.X`` (one module object, whoever imports it first) and
``ap_vllm`` comes from the checkout even where it is not installed (``make gpu-check``: torch and
Triton only). This module imports nothing beyond the standard library (torch only inside the helpers that
time GPU work).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def vllm_platform_for_the_bundle() -> None:
    """Where vLLM is the bundle's Python tree without compiled ops (``gpu_bundle.py``), run it on its CPU platform
    (``VLLM_TARGET_DEVICE=cpu``): its CUDA platform would load the ops it lacks, while its Triton kernels run on
    CUDA tensors either way. Call before vLLM is first imported; an installed vLLM (compiled ops) is left alone."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):  # no vLLM to find (or a finder that refuses it): nothing to set
        return
    if spec is not None and spec.origin is not None and not any(Path(spec.origin).parent.glob("_C*.so")):
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def device_launches(fn: Callable[[], Any], dev) -> Optional[int]:
    """Kernels, copies and memsets one call of ``fn`` puts on the GPU (torch.profiler, after a warm call); None
    off CUDA."""
    if dev.type != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write a result as indented JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


class ResultRows(list):
    """The rows of a result, rewritten to ``path`` (with ``header`` and ``complete: false``) after every row: a run
    cut short by a time limit keeps what it measured. The caller writes the whole result at the end."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        super().__init__()
        self.path, self.header = Path(path), header

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        write_json({**self.header, "complete": False, "rows": list(self)}, self.path)


def guarded(rows: list, section: str, fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` as one row of ``section`` (with its seconds), appended to ``rows`` and printed; an exception
    becomes the row's ``error`` (one failing check must not hide the others)."""
    t0 = time.time()
    try:
        r = fn(*args)
    except Exception as e:
        traceback.print_exc()
        r = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
    r = dict(section=section, seconds=round(time.time() - t0, 2), **r)
    rows.append(r)
    print(json.dumps(r, default=str), flush=True)
    return r


def kernel_split(fn, dev, calls: int = 5) -> Optional[dict]:
    """{kernel name: launches and GPU us per call of ``fn``} (torch.profiler, after 3 warm calls), slowest first;
    None off CUDA."""
    if dev.type != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:80], [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return {n: dict(launches_per_call=c / calls, us_per_call=t / calls) for n, (c, t) in
            sorted(kernels.items(), key=lambda kv_: -kv_[1][1])}


ATTENTION_KERNELS = ("_span_", "_exact_decode", "_merge_kernel", "_exact_attention", "unified_attention",
                     "reshape_and_cache", "_thresholds")


def step_split(split: Optional[dict]) -> Optional[dict]:
    """A :func:`kernel_split` of a model step grouped: GPU us per step in attention kernels (ours and vLLM's), in
    matrix products (cuBLAS / CUTLASS), in the rest, and the eight slowest kernels."""
    if split is None:
        return None
    groups = {"attention_us": 0.0, "gemm_us": 0.0, "other_us": 0.0}
    for name, k in split.items():
        low = name.lower()
        if any(a in name for a in ATTENTION_KERNELS):
            groups["attention_us"] += k["us_per_call"]
        elif any(g in low for g in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
            groups["gemm_us"] += k["us_per_call"]
        else:
            groups["other_us"] += k["us_per_call"]
    return dict(groups, launches=sum(k["launches_per_call"] for k in split.values()),
                slowest={n: round(k["us_per_call"], 1) for n, k in list(split.items())[:8]})
