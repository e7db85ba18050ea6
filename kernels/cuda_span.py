"""The CUDA C++ span decode kernel (``csrc/span_decode.cu``): loading and launching it.

A second implementation of the span kernel ``_span_attn_kernel`` of
:mod:`ap_vllm.kernels.lowrank_decode` as a decode step launches it (``paged_mixed_decode_triton``:
one query row per span instance, post-RoPE spans): same inputs, same outputs (see the math at the
top of ``csrc/span_decode.cu``). :func:`span_decode_cuda` takes the arguments of that launch and
fills ``part_a`` / ``part_alse`` (and updates the importance in the cache) on the current CUDA
stream. It selects values by importance only: score selection (``value_selection: score``, the
``SCORE`` variant of the Triton kernel) is refused with ``kernel: cuda`` by the configuration and by
:func:`ap_vllm.kernels.lowrank_decode.span_partials`.

The extension is, in this order:

1. the module ``ap_vllm._span_decode_C``, when the package was built with it
   (``AP_VLLM_BUILD_CUDA=1``, see setup.py; the Docker image does this);
2. otherwise the sources (``csrc/`` of a checkout, ``ap_vllm/csrc`` of an installed package)
   compiled with ``torch.utils.cpp_extension.load`` for sm_80 and sm_90a (plus compute_80 PTX for
   newer GPUs), once per process; torch caches the build on disk across processes.

:func:`available` says whether the kernel runs here; :func:`unavailable_reason` why not (no CUDA
build of torch, no CUDA device, compute capability below 8.0, no nvcc, sources missing, the build
failed). :func:`runtime_problem` is the cheap part of that check (nothing is built), used by the
configuration to refuse ``kernel: "cuda"`` at start-up.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

# csrc/ next to kernels/ in a checkout; ap_vllm/csrc next to ap_vllm/kernels when installed
CSRC_DIR = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("span_decode.cu", "torch_binding.cpp")
HEADERS = ("span_decode.h",)
PREBUILT_MODULE = "ap_vllm._span_decode_C"
JIT_NAME = "ap_vllm_span_decode"
OP_NAMESPACE = "ap_vllm_csrc"
ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
              "-gencode=arch=compute_80,code=compute_80")

# coefficient storage codes of ap_span_decode_launch (csrc/span_decode.h)
COEFF_BF16, COEFF_FP16, COEFF_FP8_E4M3 = 0, 1, 2
_MODEL_COEFF = {torch.bfloat16: COEFF_BF16, torch.float16: COEFF_FP16}
NUM_META = 17

MAX_HQ_PAD = 64
BLOCK_TS = (16, 32, 64, 128)
MAX_KEY_RANK_PAD = 256


class CudaSpanUnavailable(RuntimeError):
    """The CUDA span kernel cannot run in this process; the message says why."""


_lock = threading.Lock()
_loaded: dict = {}  # "op": the torch op, or "error": why it could not be loaded


def source_paths() -> list[Path]:
    """The csrc files the extension is built from (those that exist)."""
    return [CSRC_DIR / name for name in SOURCES + HEADERS if (CSRC_DIR / name).is_file()]


def _prebuilt_origin() -> Optional[str]:
    try:
        spec = importlib.util.find_spec(PREBUILT_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _nvcc() -> Optional[str]:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def runtime_problem() -> Optional[str]:
    """Why the kernel cannot run here, from what is checkable without building (None: it should).

    Does not compile anything; a build that then fails is reported by :func:`unavailable_reason`.
    """
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the CUDA span kernel needs compute capability >= 8.0, the device has {major}.{minor}"
    if _prebuilt_origin() is not None:
        return None
    missing = [name for name in SOURCES + HEADERS if not (CSRC_DIR / name).is_file()]
    if missing:
        return (f"the package has no prebuilt extension ({PREBUILT_MODULE}) and its CUDA sources are missing "
                f"({', '.join(missing)} in {CSRC_DIR})")
    if _nvcc() is None:
        return (f"the package has no prebuilt extension ({PREBUILT_MODULE}: build it with AP_VLLM_BUILD_CUDA=1) "
                "and nvcc is not found (set CUDA_HOME or put nvcc on PATH) to compile csrc/span_decode.cu")
    return None


def _load_op():
    problem = runtime_problem()
    if problem is not None:
        raise CudaSpanUnavailable(f"the CUDA span kernel is not available: {problem}")
    origin = _prebuilt_origin()
    try:
        if origin is not None:
            torch.ops.load_library(origin)
        else:
            from torch.utils.cpp_extension import load

            load(name=JIT_NAME, sources=[str(CSRC_DIR / name) for name in SOURCES],
                 extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--threads=4", *ARCH_FLAGS],
                 extra_include_paths=[str(CSRC_DIR)], is_python_module=False, verbose=False)
    except Exception as exc:  # a compiler error, a missing toolkit piece, an ABI mismatch
        where = origin or f"{CSRC_DIR} (torch.utils.cpp_extension.load)"
        raise CudaSpanUnavailable(f"the CUDA span kernel is not available: building/loading {where} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return getattr(torch.ops, OP_NAMESPACE).span_decode


def _op():
    with _lock:
        if "op" not in _loaded and "error" not in _loaded:
            try:
                _loaded["op"] = _load_op()
            except CudaSpanUnavailable as exc:
                _loaded["error"] = exc
        if "error" in _loaded:
            raise CudaSpanUnavailable(str(_loaded["error"]))
        return _loaded["op"]


def unavailable_reason() -> Optional[str]:
    """None when the kernel runs here; else why not (loads / builds the extension once)."""
    try:
        _op()
    except CudaSpanUnavailable as exc:
        return str(exc)
    return None


def available() -> bool:
    """Whether :func:`span_decode_cuda` runs in this process (loads / builds the extension once)."""
    return unavailable_reason() is None


def check_config(*, hq: int, hq_pad: int, brk: int, brv: int, block_t: int) -> None:
    """Raise ValueError naming the parameter when the kernel has no instantiation for it."""
    if not 1 <= hq_pad <= MAX_HQ_PAD:
        raise ValueError(f"hq_pad={hq_pad}: the CUDA span kernel supports at most {MAX_HQ_PAD} (padded) query "
                         "heads; use the Triton kernel")
    if not 1 <= hq <= hq_pad:
        raise ValueError(f"hq={hq} must be in [1, hq_pad={hq_pad}]")
    if brk < 16 or brk > MAX_KEY_RANK_PAD or brk & (brk - 1):
        raise ValueError(f"brk={brk}: the padded key rank must be a power of two in [16, {MAX_KEY_RANK_PAD}]")
    if brv not in (16, 32, 64, 128) or (hq_pad > 32 and brv > 64):
        raise ValueError(f"brv={brv}: the padded value rank must be 16, 32, 64 or 128 (at most 64 with more "
                         "than 32 query heads)")
    if block_t not in BLOCK_TS:
        raise ValueError(f"block_t={block_t}: must be one of {BLOCK_TS}")


def span_decode_cuda(qp: torch.Tensor, cache_bytes: torch.Tensor, block_table: torch.Tensor, meta: torch.Tensor,
                     thresholds: torch.Tensor, lse_ref: Optional[torch.Tensor], part_a: torch.Tensor,
                     part_alse: torch.Tensor, *, tokens_per_split: int, scale: float, softcap: Optional[float],
                     omega: float, hq: int, hq_pad: int, brk: int, brv: int, fp8: bool, update: bool,
                     block_t: int = 64, dtype: Optional[torch.dtype] = None, inst: Optional[torch.Tensor] = None,
                     pre_rope: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The span launch of ``paged_mixed_decode_triton`` on the CUDA C++ kernel.

    qp [I, hq_pad, brk] float32 (each instance's query row projected into its span's key basis,
    from ``_span_qproj_kernel``), ``cache_bytes`` (:func:`ap_vllm.core.paged_layout.cache_bytes` of
    the layer's cache: [num_blocks, block_bytes] uint8), block_table [B, max_blocks] int32,
    meta [S, NUM_META] int64, thresholds [S] float32, lse_ref [rows, hq] float32 (read when
    ``update``), outputs part_a [I, splits, hq_pad, brv] and part_alse [I, splits, hq_pad] float32
    (rows h >= hq: a = 0, lse = -inf); grid (I, splits). ``inst`` int32 [I, 3] (span id, query row,
    rows <= 1: decode instances, ``decode_instances``); None: instance i is span i read by its
    sequence's row (I = S). ``softcap`` None or 0: off. ``dtype``: the cache's model dtype
    (bfloat16 / float16), needed unless ``fp8``. ``block_t``: tokens a thread block stages per step
    (16 per group of lanes; any ``tokens_per_split`` works). ``pre_rope``: spans holding pre-RoPE
    keys are refused (they need the Triton kernel). Returns (part_a, part_alse).
    """
    if pre_rope:
        raise ValueError("the CUDA span kernel reads post-RoPE spans only: spans compacted with "
                         "key_space='pre_rope' need kernel 'triton'")
    if fp8:
        coeff = COEFF_FP8_E4M3
    elif dtype in _MODEL_COEFF:
        coeff = _MODEL_COEFF[dtype]
    else:
        raise ValueError(f"dtype={dtype}: the CUDA span kernel reads bfloat16 or float16 coefficients (or FP8 "
                         "e4m3 with fp8=True); pass the cache's dtype")
    check_config(hq=hq, hq_pad=hq_pad, brk=brk, brv=brv, block_t=block_t)
    if update and lse_ref is None:
        raise ValueError("importance update needs lse_ref (the previous step's lse, [B, Hq])")
    op = _op()
    if tuple(qp.shape[1:]) != (hq_pad, brk) or part_a.dim() != 4 or tuple(part_a.shape[2:]) != (hq_pad, brv):
        raise ValueError(f"qp {tuple(qp.shape)} / part_a {tuple(part_a.shape)} do not match hq_pad={hq_pad}, "
                         f"brk={brk}, brv={brv}")
    if inst is None:
        inst = torch.empty(0, dtype=torch.int32, device=qp.device)
    lref = lse_ref.float().contiguous() if update else part_alse
    op(qp, cache_bytes, block_table, meta, inst, thresholds, lref, part_a, part_alse,
       int(tokens_per_split), float(scale), float(softcap or 0.0), float(omega), int(hq), coeff, bool(update),
       int(block_t))
    return part_a, part_alse


__all__ = ["span_decode_cuda", "available", "unavailable_reason", "runtime_problem", "check_config",
           "CudaSpanUnavailable", "source_paths", "CSRC_DIR"]
