"""Reference: the span read as MLA decode through vLLM's own Triton decode kernel (GPU, with the bundle).

    PYTHONPATH=<site with vLLM>:. python benchmarks/mla_reference.py            # GPU
    python benchmarks/mla_reference.py --smoke                                  # CPU, Triton interpreter

A compacted span is a latent cache: one row of 2R coefficients per token, shared by every query head. Written
as MLA (vLLM's ``decode_attention_fwd`` with ``is_mla=True``, ``vllm/v1/attention/ops/triton_decode_attention.py``)::

    latent row t = [C_v[t] (R) | C_k[t] (R)],   q = [0 (R) | q_proj (R)],   out = softmax(scale q . row) . C_v

it reads the same bytes per token as the span kernel (no two-level read, no text tokens, no projections). Timed
by CUDA-graph replay at Qwen2.5-VL-7B's shapes (28 q heads, R = 64, bf16), best of 8-64 KV splits, next to SDPA
over the full exact KV (4 kv heads, d = 128): what a bandwidth-grade Triton kernel of vLLM's reaches on these
bytes. JSON: ``benchmarks/results/mla_reference_<device>.json``.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, ResultRows, guarded, vllm_platform_for_the_bundle, write_json  # noqa: E402
from benchmarks.decode_bench import timeit_graph  # noqa: E402

vllm_platform_for_the_bundle()


def _decode_attention():
    if SMOKE:  # a CPU build of vLLM hands out a Triton placeholder: give its module the real one (interpreter)
        import types

        import triton
        import triton.language as tl

        shim = types.ModuleType("vllm.triton_utils")
        shim.triton, shim.tl, shim.HAS_TRITON = triton, tl, True
        sys.modules["vllm.triton_utils"] = shim
    from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

    return decode_attention_fwd


def _time(fn, dev) -> float:
    """Microseconds per call: CUDA-graph replay on a GPU, plain calls on the CPU."""
    return timeit_graph(fn, dev, iters=2 if SMOKE else 20) * 1e6


def case(bsz: int, tokens: int, dev, hq: int, hkv: int, d: int, rank: int, page: int, dtype) -> dict:
    decode_attention_fwd = _decode_attention()
    npages = tokens // page
    lat = torch.randn(bsz * npages * page, 1, 2 * rank, device=dev).to(dtype)
    table = torch.randperm(bsz * npages, device=dev).to(torch.int32).view(bsz, npages)
    qp = torch.randn(bsz, hq, rank, device=dev).to(dtype)
    q = torch.cat([torch.zeros_like(qp), qp], -1).contiguous()
    lens = torch.full((bsz,), tokens, dtype=torch.int32, device=dev)
    one = torch.ones((), dtype=torch.float32, device=dev)
    scale = rank ** -0.5
    best = None
    for splits in ((4,) if SMOKE else (8, 16, 32, 64)):
        o = torch.empty(bsz, hq, rank, device=dev, dtype=dtype)
        lse = torch.empty(bsz, hq, device=dev, dtype=torch.float32)
        logits = torch.empty(bsz, hq, splits, rank + 1, device=dev, dtype=torch.float32)

        def run(o=o, lse=lse, logits=logits, splits=splits):
            decode_attention_fwd(q, lat, lat[..., :rank], o, lse, table, lens, logits, splits, scale, page,
                                 k_scale=one, v_scale=one, is_mla=True)
            return o

        us = _time(run, dev)
        if best is None or us < best[0]:
            best = (us, splits, run)
    # the kernel's output against softmax(q . C_k) C_v for the first sequence
    rows = (table[0].long()[:, None] * page + torch.arange(page, device=dev)).reshape(-1)
    c = lat[rows, 0].float()
    ref = torch.softmax(scale * qp[0].float() @ c[:, rank:].T, -1) @ c[:, :rank]
    err = float((best[2]()[0].float() - ref).abs().max())
    del lat
    k = torch.randn(bsz, hkv, tokens, d, device=dev).to(dtype)
    v = torch.randn_like(k)
    qq = torch.randn(bsz, hq, 1, d, device=dev).to(dtype)
    sdpa = _time(lambda: F.scaled_dot_product_attention(qq, k, v, enable_gqa=True), dev)
    nbytes = bsz * tokens * 2 * rank * torch.empty((), dtype=dtype).element_size()
    return dict(batch=bsz, span_tokens=tokens, rank=rank, mla_us=best[0], splits=best[1],
                mla_GBps=nbytes / best[0] / 1e3, sdpa_us=sdpa, mla_speedup_vs_sdpa=sdpa / best[0], max_abs_err=err,
                tol=2e-2 if dtype != torch.float32 else 1e-4)


def main() -> int:
    dev = torch.device("cpu" if SMOKE or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not SMOKE:
        raise SystemExit("needs a CUDA device (or --smoke)")
    shapes = (4, 2, 64, 16, 16, torch.float32) if SMOKE else (28, 4, 128, 64, 16, torch.bfloat16)
    cases = [(2, 256)] if SMOKE else [(1, 32768), (8, 32768), (32, 32768), (32, 8192)]
    name = "smoke" if SMOKE else torch.cuda.get_device_name().replace(" ", "_")
    out = RESULTS_DIR / f"mla_reference_{name}.json"
    header = dict(device=name if not SMOKE else (platform.processor() or "cpu"), torch=torch.__version__,
                  kernel="vllm decode_attention_fwd (is_mla=True)")
    rows = ResultRows(out, header)
    for bsz, tokens in cases:
        guarded(rows, "mla", case, bsz, tokens, dev, *shapes)
    write_json(dict(header, complete=True, rows=list(rows)), out)
    bad = [r for r in rows if "error" in r or r.get("max_abs_err", 0) > r.get("tol", 1)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
