"""One command for a GPU machine with only torch + Triton (no vLLM): every kernel against its torch
reference at full shapes, then decode / prefill / compaction timings against torch SDPA and the copy
bandwidth. Writes one JSON to benchmarks/results/ and prints a table.

    python benchmarks/gpu_check.py                          # GPU: full shapes (about 5 minutes on an H100/H200)
    python benchmarks/gpu_check.py --smoke                  # CPU: tiny shapes under the Triton interpreter

It needs torch, Triton and ap_vllm's runtime dependencies (pydantic, PyYAML: ``ap_vllm.config``), not vLLM; on a
machine with torch + Triton only, ``make gpu-check`` puts the bundle's site (``benchmarks/gpu_bundle.py``) on its
path (``tests/test_gpu_check_imports.py`` checks that it imports there).

Sections (each row of the JSON names its section):

* ``correctness``: max abs error and tolerance of each kernel against its torch reference at
  Qwen2.5-VL-7B shapes (28 q heads, 4 kv heads, d=128, bf16, 4K-token spans): the decode step
  (post/pre-RoPE, model/FP8 coefficients, two-level read + importance update), prefill rows over
  compacted spans (chunked prefill, speculative rows), the exact kernel against SDPA, the batched device
  compaction against the optimal truncated SVD (Eckart-Young error ratio), the CUDA C++ span kernel
  against the Triton one (when it builds);
* ``decode``: B in {1, 8, 32}, T in {8K, 32K} at R=64, R in {32, 128} at B=8, T=32K (+ FP8 coefficients):
  our step vs SDPA over the full bf16 KV, achieved TB/s on the bytes read vs a device copy,
  two-level time ratio vs its byte ratio, the served path's threshold cost;
* ``prefill``: the exact kernel's tilings vs SDPA (flash) at T = 4K and 16K, each checked against SDPA's
  output; the backend's call for a row with no compacted span (gather from the pages + SDPA, with and without
  its last lse; a first chunk and a chunk of T/8 queries after 7T/8 keys) against the exact kernel on it;
  vLLM's ``triton_unified_attention`` where it imports (the bundle);
* ``verify``: a speculative-decoding verification step (B in {8, 32} rows of 1 + 3 queries, T = 32K): the
  multi-query path the backend runs against the same rows as one-query decode rows, a one-query decode step
  and SDPA over the full exact KV;
* ``compaction``: batched device compaction of one layer's span vs that prefill;
* ``span_configs`` (run before ``decode``, whose rows then use the fastest): the span launch's
  configurations (warps, token tile, pipelining stages, q_proj held, block-table loads, register cap,
  programs) timed side by side by CUDA-graph replay, each checked against the default's output;
* ``profile``: the kernels of one decode call (torch.profiler): GPU time per kernel, launches per call (B = 8 with
  each selection's fastest launch, and B = 1 with the fastest full-rank one);
* ``cuda_span``: the CUDA C++ span launch vs the Triton one (and its output against the Triton one's).

``--only`` / ``--skip`` choose sections (``make gpu-check`` runs them in stages, each under a time limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

SMOKE = "--smoke" in sys.argv or not __import__("torch").cuda.is_available()
if SMOKE:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from ap_vllm.core.paged_decode import (build_decode_plan, build_prefill_plan, paged_mixed_decode,  # noqa: E402
                                       paged_prefill)
from ap_vllm.core.rope import RopeTable  # noqa: E402
from ap_vllm.core.synthetic import make_paged_batch  # noqa: E402
from ap_vllm.kernels.exact_attention import LONG_PREFILL_TILE  # noqa: E402
from ap_vllm.kernels.lowrank_decode import SpanLaunch, pdl_supported  # noqa: E402
from benchmarks import decode_bench as db  # noqa: E402  (build_case, run_case, timeit, copy_bandwidth)
from benchmarks.common import (RESULTS_DIR, ResultRows, guarded, kernel_split,  # noqa: E402
                               vllm_platform_for_the_bundle, write_json)

vllm_platform_for_the_bundle()  # (before vLLM is imported: vLLM's kernels are timed here)


def _err(a, b) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


WARMUP = 0 if SMOKE else 3  # calls before timing; the smoke run times nothing real: every timed call runs once


class Shapes:
    def __init__(self, smoke: bool):
        if smoke:
            self.hq, self.hkv, self.d, self.span, self.rank, self.page = 4, 2, 64, 192, 16, 16
            self.dtype = torch.float32
        else:
            self.hq, self.hkv, self.d, self.span, self.rank, self.page = 28, 4, 128, 4096, 64, 16
            self.dtype = torch.bfloat16
        self.tol = 1e-4 if self.dtype == torch.float32 else 2e-2


# --------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------
def check_decode(sh: Shapes, dev, cdt: str, key_space: str, full: bool = False) -> dict:
    """Decode against the torch reference: the two-level read with the importance update, or (``full``) every
    token at full rank as value_selection 'full' reads it (the plan's full_rank launch, no update)."""
    lens = [sh.span + 300, sh.span + 1900]
    rope = RopeTable.from_base(sh.d, 1e6, max_positions=max(lens) + 16).to(dev) if key_space == "pre_rope" else None
    pb = make_paged_batch(lens, [[(100, sh.span)], [(1000, sh.span)]], num_q_heads=sh.hq, num_kv_heads=sh.hkv,
                          head_size=sh.d, key_rank=sh.rank, value_rank=sh.rank,
                          importance_fraction=None if full else 0.25, dtype=sh.dtype, coefficient_dtype=cdt,
                          device=str(dev), rope=rope)
    plan = build_decode_plan(pb.spans, 2, device=dev)
    assert plan.full_rank == full
    sel = {} if full else dict(lse_ref=torch.full((2, sh.hq), 8.0, device=dev), importance_ema=0.25)
    ref_cache = pb.kv_cache.clone()
    o1, l1 = paged_mixed_decode(pb.q, ref_cache, pb.block_table, pb.seq_lens, plan, 0.088, kernel="torch", rope=rope,
                                **sel)
    o2, l2 = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, 0.088, kernel="triton",
                                rope=rope, max_seq_len=max(lens), **sel)
    return dict(check=f"decode {cdt} {key_space}{' full rank' if full else ''}", max_abs_err=_err(o2, o1),
                lse_err=_err(l2, l1), tol=sh.tol)


def check_prefill(sh: Shapes, dev) -> dict:
    lens = [sh.span + 400, sh.span + 200, sh.span + 40]
    pb = make_paged_batch(lens, [[(16, sh.span)], [(64, sh.span)], []], num_q_heads=sh.hq, num_kv_heads=sh.hkv,
                          head_size=sh.d, key_rank=sh.rank, value_rank=sh.rank, dtype=sh.dtype, device=str(dev))
    qlens = [256 if not SMOKE else 40, 3, sh.span + 40]  # chunk after a span, speculative rows, full prefill
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], sh.hq, sh.d, device=dev).to(sh.dtype)
    plan = build_prefill_plan(pb.spans, qsl, sh.hq, device=dev)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
    kw = dict(max_query_len=max(qlens), max_seq_len=max(lens))
    o1, l1 = paged_prefill(q, pb.kv_cache, pb.block_table, qsl_t, pb.seq_lens, plan, 0.088, kernel="torch", **kw)
    o2, l2 = paged_prefill(q, pb.kv_cache, pb.block_table, qsl_t, pb.seq_lens, plan, 0.088, kernel="triton", **kw)
    return dict(check="prefill rows over spans", max_abs_err=_err(o2, o1), lse_err=_err(l2, l1), tol=sh.tol)


def check_exact_vs_sdpa(sh: Shapes, dev, T: int) -> dict:
    from ap_vllm.kernels.exact_attention import paged_exact_attention_triton

    q, kv, bt, qsl, sl = _prefill_case(sh, dev, T)
    out, _ = paged_exact_attention_triton(q, kv, bt, qsl, sl, sh.d ** -0.5, max_query_len=T, max_seq_len=T)
    ref = _sdpa_prefill(q, kv, sh, T)
    return dict(check=f"exact kernel vs SDPA, T={T}", max_abs_err=_err(out, ref), tol=sh.tol)


# the compaction methods compared: the backend's GPU path (the Gram matrix and the coefficients taken from the
# bf16 spans on tensor cores, GramProducts, TF32), the former one (a float32 copy of the spans, cuBLAS float32
# products, the finish over the candidates' coefficients: 2.5 of its 7.5 ms for 28 layers were the Gram product
# on FFMA, 1.3 the copy and centring), the CPU's;
# timed also: the products in 3xTF32 and float32 FMA, the Gram on 128 x 128 tiles (8 warps), the step's products
# in float32 FMA (3xTF32 by default: the same error, its step 1.55 against 2.24 ms), the step on 4 warps (its R x R Cholesky factor and inverse are R sequential steps of
# tile reductions: 2.2 ms of a 3.4 ms call on an H200), the former finish over 128 token rows at a time (0.39 ms
# over 32), that step as torch calls (cuBLAS / cuSOLVER batched Cholesky and triangular solve, no host sync)
# with the former finish, and all in torch
COMPACTION_METHODS = ("gram", "gram-copy", "sketch")
COMPACTION_TIMED = COMPACTION_METHODS + ("gram-ptf32x3", "gram-pieee", "gram-g128", "gram-sieee", "gram-w4",
                                         "gram-copy-f128", "gram-torchstep", "gram-torch")


def _compaction_opts(method: str) -> dict:
    """compact_spans' options for a method name: ``gram`` and its variants, parts after ``gram-``: ``copy`` (the
    former path), ``p<precision>`` (the products'), ``g<N>`` (the Gram tile), ``s<precision>`` (the step's),
    ``w<N>`` (the step's warps), ``f<N>`` (the former finish's token rows)."""
    from ap_vllm.kernels.compaction import device_compaction, gram_finish_triton

    if method == "sketch":
        return {}
    if method == "gram-torchstep":
        return dict(method="gram", orth=None, finish=gram_finish_triton)
    if method == "gram-torch":
        return dict(method="gram", orth=None, finish=None)
    parts = method.split("-")[1:]

    def num(prefix):
        return next((int(p[1:]) for p in parts if p[0] == prefix and p[1:].isdigit()), None)

    products = None if "copy" in parts else next((p[1:] for p in parts if p[0] == "p"), "tf32")
    step = next((p[1:] for p in parts if p[0] == "s"), "tf32x3")
    return device_compaction(step, orth_warps=num("w"), finish_rows=num("f"), products=products,
                             gram_block_w=num("g") or 64)


def _decaying_keys(t: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """[t, w] float32 on the CPU with a spectrum decaying from 1 to 1e-3, as keys of real models have (Gaussian
    rows scaled per column, then rotated): the optimal rank-R error is well defined."""
    u = torch.randn(t, w, generator=gen)
    return (u * torch.logspace(0, -3, w)) @ torch.linalg.qr(torch.randn(w, w, generator=gen))[0]


def _error_ratio(x: torch.Tensor, span, rank: int) -> float:
    """||X - the span's keys|| over the optimal rank-``rank`` error of X (x [T, Hkv, d], its keys compacted)."""
    xf = x.float().reshape(x.shape[0], -1)
    kr, _ = span.reconstruct()
    err = float((kr.float().reshape(xf.shape) - xf).norm())
    opt = float(torch.linalg.svdvals(xf.cpu())[rank:].pow(2).sum().sqrt())
    return err / max(opt, 1e-12)


def check_compaction(sh: Shapes, dev, method: str = "gram") -> dict:
    from ap_vllm.core.compaction import compact_spans

    gen = torch.Generator(device="cpu").manual_seed(0)
    w = sh.hkv * sh.d
    xs = [_decaying_keys(t, w, gen).view(t, sh.hkv, sh.d).to(dev) for t in (sh.span, sh.span // 2, sh.span // 3)]
    spans = compact_spans(xs, xs, sh.rank, sh.rank, **_compaction_opts(method))
    worst = max(_error_ratio(x, sp, sh.rank) for x, sp in zip(xs, spans))
    return dict(check=f"compaction ({method}) vs optimal SVD (R={sh.rank})", error_ratio=worst, tol=1.05,
                max_abs_err=worst - 1.0)


def check_compaction_products(sh: Shapes, dev) -> dict:
    """The served case of the products (bf16 spans, keys with a mean 30x their spread: the mean's coefficient is
    large, where a TF32 product's 2^-11 relative error would show): the default path's error against the
    optimal one, over the former float32-copy path's on the same spans (both store bf16 coefficients, whose
    rounding is part of both errors): at most 2 % more."""
    from ap_vllm.core.compaction import compact_spans

    gen = torch.Generator(device="cpu").manual_seed(2)
    w = sh.hkv * sh.d
    xs = []
    for t in (sh.span, sh.span // 3):
        x = _decaying_keys(t, w, gen)
        xs.append((x + 30.0 * float(x.std()) * torch.randn(w, generator=gen)).view(t, sh.hkv, sh.d).to(dev)
                  .to(sh.dtype))
    ratios = {}
    for method in ("gram", "gram-copy"):
        spans = compact_spans(xs, xs, sh.rank, sh.rank, **_compaction_opts(method))
        ratios[method] = max(_error_ratio(x, sp, sh.rank) for x, sp in zip(xs, spans))
    rel = ratios["gram"] / ratios["gram-copy"]
    return dict(check=f"compaction products (bf16, biased keys) vs the float32-copy path (R={sh.rank})",
                error_ratio=rel, tol=1.02, max_abs_err=rel - 1.0, optimal_ratio_products=ratios["gram"],
                optimal_ratio_copy=ratios["gram-copy"])


def check_cuda_span(sh: Shapes, dev) -> dict:
    from ap_vllm.kernels import cuda_span

    problem = cuda_span.runtime_problem()
    if problem is not None:
        return dict(check="CUDA C++ span kernel vs Triton", skipped=problem)
    lens = [sh.span + 300, sh.span + 1900]
    pb = make_paged_batch(lens, [[(100, sh.span)], [(1000, sh.span)]], num_q_heads=sh.hq, num_kv_heads=sh.hkv,
                          head_size=sh.d, key_rank=sh.rank, value_rank=sh.rank, importance_fraction=0.25,
                          dtype=sh.dtype, device=str(dev))
    plan = build_decode_plan(pb.spans, 2, device=dev)
    lse_ref = torch.full((2, sh.hq), 8.0, device=dev)
    kw = dict(lse_ref=lse_ref, importance_ema=0.25, kernel="triton", max_seq_len=max(lens))
    c1, c2 = pb.kv_cache.clone(), pb.kv_cache.clone()
    o1, _ = paged_mixed_decode(pb.q, c1, pb.block_table, pb.seq_lens, plan, 0.088, **kw)
    t0 = time.time()
    o2, _ = paged_mixed_decode(pb.q, c2, pb.block_table, pb.seq_lens, plan, 0.088, span_kernel="cuda", **kw)
    return dict(check="CUDA C++ span kernel vs Triton", max_abs_err=_err(o2, o1), tol=sh.tol,
                importance_err=_err(c1.float(), c2.float()), first_call_s=time.time() - t0)


# --------------------------------------------------------------------------------------
# timings
# --------------------------------------------------------------------------------------
def _prefill_case(sh: Shapes, dev, T: int):
    nblk = -(-T // sh.page)
    kv = torch.randn(nblk, 2, sh.page, sh.hkv, sh.d, device=dev).to(sh.dtype)
    bt = torch.arange(nblk, dtype=torch.int32, device=dev)[None]
    q = torch.randn(T, sh.hq, sh.d, device=dev).to(sh.dtype)
    qsl = torch.tensor([0, T], dtype=torch.int32, device=dev)
    sl = torch.tensor([T], dtype=torch.int32, device=dev)
    return q, kv, bt, qsl, sl


def _sdpa_prefill(q, kv, sh: Shapes, T: int):
    k = kv[:, 0].reshape(-1, sh.hkv, sh.d)[:T].permute(1, 0, 2)[None]
    v = kv[:, 1].reshape(-1, sh.hkv, sh.d)[:T].permute(1, 0, 2)[None]
    o = F.scaled_dot_product_attention(q.permute(1, 0, 2)[None], k, v, is_causal=True, scale=sh.d ** -0.5,
                                       enable_gqa=True)
    return o[0].permute(1, 0, 2)


# The exact kernel's launch for long prefills, side by side: the shipped tiling first (LONG_PREFILL_TILE), then
# the same with the interior key tiles' block-table entries read a tile ahead (bt_ahead: two K / V buffers with
# copies in flight through the compute, where the shipped loop drains them at each tile: PTX cp.async.wait_group 2
# against 0), then the rule's former tile and flash-attention shapes (64-256 query x head rows, 64-128-key tiles,
# 2-3 stages).
PREFILL_TILES = [
    None,
    dict(LONG_PREFILL_TILE, bt_ahead=True),
    dict(rows=128, block_n=64, num_warps=8, num_stages=3, bt_ahead=True),
    dict(rows=128, block_n=32, num_warps=8, num_stages=2),  # the rule's tile below LONG_PREFILL_TILE
    dict(rows=128, block_n=64, num_warps=8, num_stages=2),
    dict(rows=128, block_n=64, num_warps=8, num_stages=3),
    dict(rows=64, block_n=64, num_warps=4, num_stages=4),
    dict(rows=64, block_n=128, num_warps=4, num_stages=2),
    dict(rows=128, block_n=128, num_warps=8, num_stages=2),
]


def _time_sdpa_prefill(q, kv, sh: Shapes, T: int, dev, iters: int) -> float:
    """Seconds of SDPA's causal prefill (cuDNN / flash) over the same K/V made contiguous, by CUDA-graph replay."""
    k = kv[:, 0].reshape(-1, sh.hkv, sh.d)[:T].permute(1, 0, 2)[None].contiguous()
    v = kv[:, 1].reshape(-1, sh.hkv, sh.d)[:T].permute(1, 0, 2)[None].contiguous()
    qs = q.permute(1, 0, 2)[None].contiguous()
    return db.timeit_graph(lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True), dev,
                           iters, warmup=WARMUP)


def time_prefill(sh: Shapes, dev, T: int, iters: int, tile=None) -> dict:
    """Causal prefill of T tokens (one sequence, paged cache): the exact kernel with ``tile`` vs SDPA (cuDNN /
    flash over contiguous K/V), both by CUDA-graph replay; the output against SDPA's."""
    from ap_vllm.kernels.exact_attention import paged_exact_attention_triton

    q, kv, bt, qsl, sl = _prefill_case(sh, dev, T)
    run = lambda: paged_exact_attention_triton(q, kv, bt, qsl, sl, sh.d ** -0.5, max_query_len=T,  # noqa: E731
                                               max_seq_len=T, tile=tile)
    err = _err(run()[0], _sdpa_prefill(q, kv, sh, T))
    ours = db.timeit_graph(run, dev, iters, warmup=WARMUP)
    sdpa = _time_sdpa_prefill(q, kv, sh, T, dev, iters)
    return dict(tokens=T, tile=tile or "default", ours_us=ours * 1e6, sdpa_us=sdpa * 1e6, ours_over_sdpa=ours / sdpa,
                target=1.5, max_abs_err_vs_sdpa=err, tol=sh.tol)


def time_sdpa_rows(sh: Shapes, dev, T: int, n: int, iters: int, keep_lse: bool) -> dict:
    """The backend's call for a prefill row with no compacted span (:mod:`ap_vllm.core.exact_rows`): n queries
    at the end of T keys (n = T: a prompt's first chunk; n < T: a later chunk, causal to the bottom right), its
    K/V gathered from the paged cache, SDPA, the output written (with ``keep_lse`` its last query's lse too, as
    score / EMA selection keep it). Against the exact Triton kernel on the same row (what such rows ran before)
    and, for n = T, SDPA alone over contiguous K/V; all by CUDA-graph replay; output checked against the kernel's."""
    from ap_vllm.core.exact_rows import exact_rows_attention, sdpa_row_attention
    from ap_vllm.kernels.exact_attention import paged_exact_attention_triton

    q, kv, bt, _, sl = _prefill_case(sh, dev, T)
    q = q[T - n:].contiguous()
    qsl = torch.tensor([0, n], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    lse = torch.empty(n, sh.hq, device=dev) if keep_lse else None

    def run():
        exact_rows_attention(sdpa_row_attention, q, kv, bt, [0, n], [T], [0], sh.d ** -0.5, None, out, lse)
        return out

    kernel = lambda: paged_exact_attention_triton(q, kv, bt, qsl, sl, sh.d ** -0.5, max_query_len=n,  # noqa: E731
                                                  max_seq_len=T)
    err = _err(run(), kernel()[0])
    t = db.timeit_graph(run, dev, iters, warmup=WARMUP)
    t_kernel = db.timeit_graph(kernel, dev, iters, warmup=WARMUP)
    row = dict(tokens=T, queries=n, tile="served SDPA row: gather + SDPA" + (" + last lse" if keep_lse else ""),
               ours_us=t * 1e6, exact_kernel_us=t_kernel * 1e6, kernel_over_sdpa_row=t_kernel / t,
               max_abs_err_vs_kernel=err, tol=sh.tol)
    if n == T:
        sdpa = _time_sdpa_prefill(q, kv, sh, T, dev, iters)
        row.update(sdpa_us=sdpa * 1e6, ours_over_sdpa=t / sdpa, target=1.5)
    return row


def time_verify(sh: Shapes, dev, bsz: int, T: int, drafts: int, iters: int) -> dict:
    """A speculative-decoding verification step: ``bsz`` rows of ``n = 1 + drafts`` queries at the end of a sequence
    holding a compacted T-token span (R = sh.rank) and text. What the backend runs for them (the multi-query path:
    exact kernel + span instances at full rank, one read of each span per ``QPT`` query rows) against the same rows
    as ``n * bsz`` one-query rows of the decode call (each its own length ``L - n + 1 + j``, full-rank plan: the
    spec-as-decode alternative, every span read n times by a bandwidth-bound kernel), a decode step of one query
    per row (what a step without drafts costs), and SDPA over the full exact KV with n queries per row (each over
    all L keys: the causal mask among the last n keys changes nothing measurable). All by CUDA-graph replay; the
    two paths' outputs against each other (both read the spans at full rank)."""
    q1, kv, bt, seq_lens, spans, L = db.build_case(bsz, T, sh.rank, sh.hq, sh.hkv, sh.d, sh.page, sh.dtype, dev)
    n, scale = 1 + drafts, sh.d ** -0.5
    full = [dataclasses.replace(sp, threshold=None) for sp in spans]
    q = torch.randn(bsz * n, sh.hq, sh.d, device=dev).to(sh.dtype)
    qsl = list(range(0, bsz * n + 1, n))
    plan = build_prefill_plan(full, qsl, sh.hq, device=dev)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
    verify = lambda: paged_prefill(q, kv, bt, qsl_t, seq_lens, plan, scale, max_query_len=n,  # noqa: E731
                                   max_seq_len=L, kernel="triton")
    rows_bt = bt.repeat_interleave(n, 0)
    rows_len = (seq_lens.repeat_interleave(n) - n + 1 + torch.arange(n, device=dev).repeat(bsz)).to(torch.int32)
    rows_plan = build_decode_plan([dataclasses.replace(sp, seq=sp.seq * n + j) for sp in full for j in range(n)],
                                  bsz * n, device=dev)
    as_decode = lambda: paged_mixed_decode(q, kv, rows_bt, rows_len, rows_plan, scale, kernel="triton",  # noqa: E731
                                           max_seq_len=L)
    one_plan = build_decode_plan(full, bsz, device=dev)
    one = lambda: paged_mixed_decode(q1, kv, bt, seq_lens, one_plan, scale, kernel="triton",  # noqa: E731
                                     max_seq_len=L)
    err = _err(verify()[0], as_decode()[0])
    t_verify, t_rows, t_one = (db.timeit_graph(f, dev, iters, warmup=WARMUP) for f in (verify, as_decode, one))
    del kv
    k = torch.randn(bsz, sh.hkv, L, sh.d, device=dev, dtype=sh.dtype)
    v = torch.randn_like(k)
    qs = q.reshape(bsz, n, sh.hq, sh.d).transpose(1, 2)
    sdpa = db.timeit_graph(lambda: F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True), dev, iters,
                           warmup=WARMUP)
    return dict(batch=bsz, span_tokens=T, seq_len=L, rank=sh.rank, queries_per_row=n, verify_us=t_verify * 1e6,
                as_decode_rows_us=t_rows * 1e6, decode_one_query_us=t_one * 1e6, sdpa_us=sdpa * 1e6,
                verify_over_decode_step=t_verify / t_one, as_decode_over_verify=t_rows / t_verify,
                speedup_vs_sdpa=sdpa / t_verify, max_abs_err_vs_as_decode=err, tol=sh.tol)


def time_vllm_prefill(sh: Shapes, dev, T: int, iters: int) -> dict:
    """vLLM's own Triton varlen kernel (``triton_unified_attention``, in the bundle) on the same paged prefill, for
    reference: a candidate for the exact path where vLLM is installed."""
    if SMOKE:
        return dict(tokens=T, skipped="a CPU build of vLLM turns its Triton kernels off")
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as e:  # (no vLLM on this machine's path)
        return dict(tokens=T, skipped=f"vLLM's unified_attention does not import: {type(e).__name__}: {e}"[:300])
    q, kv, bt, qsl, sl = _prefill_case(sh, dev, T)
    out = torch.empty_like(q)

    def run():
        unified_attention(q=q, k=kv[:, 0], v=kv[:, 1], out=out, cu_seqlens_q=qsl, max_seqlen_q=T, seqused_k=sl,
                          max_seqlen_k=T, softmax_scale=sh.d ** -0.5, causal=True, window_size=(-1, -1),
                          block_table=bt, softcap=0, q_descale=None, k_descale=None, v_descale=None)
        return out

    err = _err(run(), _sdpa_prefill(q, kv, sh, T))
    t = db.timeit_graph(run, dev, iters, warmup=WARMUP)
    sdpa = _time_sdpa_prefill(q, kv, sh, T, dev, iters)
    return dict(tokens=T, tile="vllm unified_attention", ours_us=t * 1e6, sdpa_us=sdpa * 1e6,
                ours_over_sdpa=t / sdpa, target=1.5, max_abs_err_vs_sdpa=err, tol=sh.tol)


def _host_sync(fn, dev) -> Optional[str]:
    """What makes one call of ``fn`` wait for the GPU (torch.cuda.set_sync_debug_mode("error")), or None."""
    if dev.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def time_compaction(sh: Shapes, dev, T: int, prefill_us: float, iters: int, method: str = "gram",
                    layers: int = 1) -> dict:
    """Compaction of one layer's span (K and V, rank R, one batched call as the backend makes it) by ``method``
    (``gram``: the kernel path's; ``sketch``: the float64 one, for comparison): time, GPU launches per call,
    host syncs, against the layer's prefill attention and the 0.25 ms target. ``layers`` > 1: the spans of that
    many layers in one call (what batching the compaction over a step's layers would cost), ``compact_us`` per
    layer."""
    from ap_vllm.core.compaction import compact_spans

    gen = torch.Generator(device="cpu").manual_seed(1)
    k = _decaying_keys(T, sh.hkv * sh.d, gen).view(T, sh.hkv, sh.d).to(dev).to(sh.dtype)
    v = torch.randn_like(k)
    opts = _compaction_opts(method)
    fn = lambda: compact_spans([k] * layers, [v] * layers, sh.rank, sh.rank, **opts)  # noqa: E731
    t = db.timeit(fn, dev, iters, warmup=WARMUP) / layers
    ratio = _error_ratio(k, fn()[-1], sh.rank)
    split = kernel_split(fn, dev, 3)  # (its launch count is the call's: one profile for both)
    launches = None if split is None else round(sum(e["launches_per_call"] for e in split.values()))
    return dict(method=method, tokens=T, rank=sh.rank, layers_per_call=layers, compact_us=t * 1e6,
                prefill_us=prefill_us,
                compact_over_prefill=t * 1e6 / prefill_us, target=0.05, target_us=250.0,
                error_ratio=ratio, error_tol=1.05, launches=launches, host_sync=_host_sync(fn, dev), kernels=split)


def time_cuda_span(sh: Shapes, dev, iters: int) -> dict:
    from ap_vllm.kernels import cuda_span

    problem = cuda_span.runtime_problem()
    if problem is not None:
        return dict(skipped=problem)
    bsz, T = 8, 32768 if not SMOKE else 256
    q, kv, bt, seq_lens, spans, L = db.build_case(bsz, T, sh.rank, sh.hq, sh.hkv, sh.d, sh.page, sh.dtype, dev)
    plan = build_decode_plan(spans, bsz, device=dev)
    lse_ref = torch.full((bsz, sh.hq), 10.0, device=dev)
    kw = dict(kernel="triton", lse_ref=lse_ref, importance_ema=0.25, max_seq_len=L)
    tri_fn = lambda: paged_mixed_decode(q, kv, bt, seq_lens, plan, 0.088, **kw)  # noqa: E731
    cud_fn = lambda: paged_mixed_decode(q, kv, bt, seq_lens, plan, 0.088, span_kernel="cuda", **kw)  # noqa: E731
    # kernel time by CUDA-graph replay (host-launched calls measured the host work of the call: ~1 ms either way)
    try:
        tri, cud, timer = (db.timeit_graph(tri_fn, dev, iters, warmup=WARMUP),
                           db.timeit_graph(cud_fn, dev, iters, warmup=WARMUP), "graph replay")
    except RuntimeError as e:  # (a launch that cannot be captured: host-launched calls, said in the row)
        tri, cud = db.timeit(tri_fn, dev, iters, warmup=WARMUP), db.timeit(cud_fn, dev, iters, warmup=WARMUP)
        timer = f"host launch ({str(e).splitlines()[0][:120]})"
    return dict(batch=bsz, span_tokens=T, rank=sh.rank, timer=timer, triton_us=tri * 1e6, cuda_us=cud * 1e6,
                faster="cuda" if cud < tri else "triton")


def selection_call(plan, selection: str, lse_ref: torch.Tensor) -> tuple:
    """(plan, keyword arguments of paged_mixed_decode) of a value selection: 'ema' (the two-level read by the
    spans' thresholds, with the importance update), 'score' (by this step's scores) or 'full' (value_selection
    'full': every token at full rank, nothing read to decide it, no update)."""
    if selection == "full":
        return dataclasses.replace(plan, full_rank=True), {}
    if selection == "ema":
        return plan, dict(lse_ref=lse_ref, importance_ema=0.25)
    return plan, dict(lse_ref=lse_ref, score_threshold=1 / 256)


def profile_decode(sh: Shapes, dev, launch: SpanLaunch, selection: str, batch: int = 8) -> dict:
    """The kernels of one decode call at B=``batch``, T=32K, R=64 (torch.profiler, CUDA time per kernel name,
    averaged over 5 calls): which part of the step the time goes to (q projection, span, exact text tokens,
    merge)."""
    bsz, T = (min(batch, 2), 256) if SMOKE else (batch, 32768)
    q, kv, bt, seq_lens, spans, L = db.build_case(bsz, T, sh.rank, sh.hq, sh.hkv, sh.d, sh.page, sh.dtype, dev)
    plan, kw = selection_call(build_decode_plan(spans, bsz, device=dev), selection,
                              torch.full((bsz, sh.hq), 10.0, device=dev))
    kw.update(kernel="triton", max_seq_len=L, launch=launch)
    fn = lambda: paged_mixed_decode(q, kv, bt, seq_lens, plan, 0.088, **kw)  # noqa: E731
    if dev.type != "cuda":
        fn()
        return dict(batch=bsz, span_tokens=T, selection=selection, skipped="torch.profiler's CUDA times need a GPU")
    split = kernel_split(fn, dev)
    return dict(batch=bsz, span_tokens=T, rank=sh.rank, selection=selection, opts=launch.overrides(),
                gpu_us_per_call=sum(v["us_per_call"] for v in split.values()),
                launches_per_call=sum(v["launches_per_call"] for v in split.values()), kernels=split)


def prebuild_cuda() -> int:
    """Build (or load from torch's extension cache) the CUDA C++ span kernel and exit: ``make gpu-check`` starts it
    in the background so that the build overlaps the Triton timings."""
    from ap_vllm.kernels import cuda_span

    t0 = time.time()
    ok = cuda_span.available()
    print(f"gpu_check --prebuild-cuda: {'built' if ok else cuda_span.unavailable_reason()} in {time.time() - t0:.0f} s")
    return 0


# The span launch's configurations timed side by side (post-RoPE decode, the bandwidth-bound case, B=8): the
# shipped default first (4 warps over 128-token tiles, two stages, q_proj held, scalar block-table entries, no
# register cap), the first default (16 warps over 16-token tiles, one stage, 128 registers: 1.7 % of DRAM
# bandwidth on an H200), the second (64-token tiles, one block-table entry per row), then tiles, stages, warps,
# more programs (split_target in multiples of the SM count; the default aims at 2) and one-tile splits. Compiled
# for sm_90 with Triton 3.6 (benchmarks/aot_compile.py --opt ...), each loads coefficient rows with 16-byte vectors
# and spills nothing at R=64; register caps below 255 make the static launch spill, so none is swept.
SPAN_CONFIGS = [
    SpanLaunch(),
    SpanLaunch(warps=16, block_t=16, stages=1, hold_q=False, bt_vec=False, maxnreg=128),
    SpanLaunch(block_t=64, bt_vec=True),
    SpanLaunch(block_t=64),
    SpanLaunch(stages=3),
    SpanLaunch(warps=8),
    SpanLaunch(hold_q=False),
    SpanLaunch(split_target=4),
    SpanLaunch(split_tokens=1),
]
# one sequence (B=1, T=32K): splits of at least 512 tokens by default (64 splits), the merge reading one partial
# after the other (merge_splits=1, how it read them up to the chunked merge), splits of one tile (split_tokens=1:
# 264 splits, which the chunked merge reads 32 a load), 256 and 1024 tokens
SPAN_CONFIGS_B1 = [SpanLaunch(), SpanLaunch(merge_splits=1), SpanLaunch(split_tokens=1), SpanLaunch(split_tokens=256),
                   SpanLaunch(split_tokens=1024)]
SPAN_CONFIGS_B1_FULL = [SpanLaunch(), SpanLaunch(bt_ahead=True, stages=3), SpanLaunch(pdl=True),
                        SpanLaunch(bt_ahead=True, stages=3, bt_chunk=32),
                        SpanLaunch(warp_split=True, stages=3, bt_chunk=32),
                        SpanLaunch(bt_ahead=True, stages=3, pdl=True, split_tokens=256, merge_heads=1),
                        SpanLaunch(pdl=True, split_tokens=256),
                        SpanLaunch(split_tokens=256), SpanLaunch(pdl=True, split_tokens=1), SpanLaunch(merge_heads=1),
                        SpanLaunch(pdl=True, split_tokens=256, merge_heads=1),
                        SpanLaunch(pdl=True, split_tokens=1, merge_heads=1)]
# value_selection 'full' (every token at full rank, nothing read to decide or update), the GPU default, in order of
# promise (the stage's time limit may cut the list):
# * bt_ahead: the block-table reads a tile ahead of the row loads, so the pipeliner double-buffers the tiles at 3
#   stages (PTX cp.async.wait_group 2 in the loop: tile i + 1's copies in flight while tile i is computed). The 2-D
#   loop's copies hang on a block-table load of the same iteration: one tile buffer at any stage count (the third
#   stage goes to that load), every wait drains them (wait_group 0). With bt_chunk=32 the block-table entries of
#   32 tiles are read before a run over them, so the loop reads no block table (one tile ahead, tile i + 2's read
#   sits between tile i's compute and tile i + 2's copies; 185 against 128 registers, sm_90). warp_split with
#   bt_chunk=32 at 3 stages: both fixes at once, two tile buffers (wait_group 2) and 2 barriers a tile instead of 9
#   (no shared-memory row max, sum or p relayout; 252 registers, no spills). Also over 64-token tiles, at 2
#   stages, with 3 programs a SM, and with PDL and the merge over 2 heads;
# * pdl (sm_90 and later): the span kernel and the merge start while the launch before them finishes and wait for
#   it only where they read its output;
# * merge_heads: the merge's programs over 1 or 2 of a kv head's q heads (B = 8: 224 / 128 programs instead of 32,
#   a row's 64 span partials in one load instead of four); the merge one partial after the other (as before the
#   chunked merge);
# * warp_split: each warp its own tokens of a tile (no shared-memory reduction a tile; 2 programs of 4 warps a SM),
#   also as 2 warps over 64-token tiles; 3 programs a SM; the query projection in its own launch (as before it
#   moved into the exact kernel); one-tile splits; the register prefetch (with its block-table reads a tile ahead
#   over one-block tiles); 3 stages of the 2-D loop (8 bytes of spills with Triton 3.6; its 64-token and
#   split_target variants were dropped for the rows above: the 2-D loop keeps one tile buffer at any stage count).
# At B = 1 (SPAN_CONFIGS_B1_FULL), where the call is latency-bound: those with the default splits (512 tokens) and
# shorter ones (256; one tile: 256 splits, which the chunked merge reads 16 a load)
SPAN_CONFIGS_FULL = [SpanLaunch(),  # (the most promising first: the stage's time limit may cut the list)
                     SpanLaunch(bt_ahead=True, stages=3), SpanLaunch(bt_ahead=True, stages=3, bt_chunk=32),
                     SpanLaunch(warp_split=True, stages=3, bt_chunk=32),
                     SpanLaunch(bt_ahead=True, stages=3, block_t=64),
                     SpanLaunch(bt_ahead=True), SpanLaunch(bt_ahead=True, stages=3, split_target=3),
                     SpanLaunch(bt_ahead=True, stages=3, pdl=True, merge_heads=2),
                     SpanLaunch(pdl=True), SpanLaunch(merge_heads=2), SpanLaunch(merge_heads=1),
                     SpanLaunch(merge_splits=1), SpanLaunch(warp_split=True),
                     SpanLaunch(warp_split=True, block_t=64, warps=2), SpanLaunch(split_target=3),
                     SpanLaunch(qproj_in_exact=False),
                     SpanLaunch(split_tokens=1),
                     SpanLaunch(block_t=64, stages=1, prefetch=True),
                     SpanLaunch(block_t=64, stages=1, prefetch=True, split_target=3), SpanLaunch(stages=3),
                     SpanLaunch(block_t=64)]


def _here(cfgs: list) -> list:
    """The configurations this device runs (programmatic dependent launch: sm_90 and later)."""
    return [c for c in cfgs if not c.pdl or pdl_supported()]


def _on(dev, launch: SpanLaunch) -> SpanLaunch:
    """``launch`` for this device: its ``split_target`` is given in multiples of the SM count."""
    if launch.split_target is None:
        return launch
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
    return dataclasses.replace(launch, split_target=launch.split_target * sms)


def time_span_config(sh: Shapes, dev, iters: int, launch: SpanLaunch, case: dict, selection: str = "ema",
                     batch: int = 8, two_block: bool = False) -> dict:
    """One span launch configuration at B=``batch``, T=32K, R=64, timed by CUDA-graph replay; its output against
    the default configuration's (``case`` holds both inputs). ``selection``: the two-level read with the importance
    update ("ema"), or by this step's scores ("score", the served default: keys at full rank, no importance).
    ``two_block``: a plan that does not say its rows per block, so every tile is read as if it could straddle two
    blocks (two block-table reads and a per-row select), as before plans said them."""
    if "q" not in case:
        bsz, T = (min(batch, 2), 256) if SMOKE else (batch, 32768)
        q, kv, bt, seq_lens, spans, L = db.build_case(bsz, T, sh.rank, sh.hq, sh.hkv, sh.d, sh.page, sh.dtype, dev)
        case.update(q=q, kv=kv, bt=bt, seq_lens=seq_lens, L=L, bsz=bsz, T=T, plan=build_decode_plan(spans, bsz,
                                                                                                      device=dev),
                    lse_ref=torch.full((bsz, sh.hq), 10.0, device=dev))
    c = case
    plan, kw = selection_call(dataclasses.replace(c["plan"], rows_per_block=()) if two_block else c["plan"], selection,
                              c["lse_ref"])
    kw.update(kernel="triton", max_seq_len=c["L"], launch=_on(dev, launch))
    # (the output from the untouched cache: the timed replays below update its importance in place)
    out, _ = paged_mixed_decode(c["q"], c["kv"].clone(), c["bt"], c["seq_lens"], plan, 0.088, **kw)
    work = c["kv"].clone()
    if "ref_" + selection not in c:
        c["ref_" + selection] = out
    t = db.timeit_graph(lambda: paged_mixed_decode(c["q"], work, c["bt"], c["seq_lens"], plan, 0.088, **kw),
                        dev, iters, warmup=WARMUP)
    return dict(batch=c["bsz"], span_tokens=c["T"], rank=sh.rank, selection=selection, opts=launch.overrides(),
                **({"two_block": True} if two_block else {}),
                us=t * 1e6, max_abs_err_vs_default=_err(out, c["ref_" + selection]), tol=sh.tol)


def best_span_launch(rows: list, selection: str = "ema", batch: int = 8) -> SpanLaunch:
    """The fastest configuration of the span_configs rows of ``selection`` at B = ``batch`` (8 or 1) whose output
    matched the default's (split_target still in multiples of the SM count: :func:`_on` makes it a program
    count)."""
    ok = [r for r in rows if r["section"] == "span_configs" and "us" in r and r.get("selection", "ema") == selection
          and r["max_abs_err_vs_default"] <= r["tol"] and (r.get("batch") == 1) == (batch == 1)
          and not r.get("two_block")]
    return SpanLaunch(**min(ok, key=lambda r: r["us"])["opts"]) if ok else SpanLaunch()


def table(rows: list) -> str:
    out = []
    for r in rows:
        sec = r["section"]
        if "error" in r or "skipped" in r:
            out.append(f"{sec:12} {r.get('check', '')} {'ERROR ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
        elif sec == "correctness":
            ok = r.get("error_ratio", r["max_abs_err"]) <= r["tol"]
            out.append(f"{sec:12} {r['check']:44} err {r.get('error_ratio', r['max_abs_err']):.3g} "
                       f"(tol {r['tol']:g}) {'ok' if ok else 'FAIL'}")
        elif sec == "decode":
            out.append(f"{sec:12} B={r['batch']:<3} T={r['span_tokens']:<6} R={r['rank']:<4} fp8={int(r['fp8'])} "
                       f"ours {r['ours_us']:9.1f} us  sdpa {r['sdpa_us']:9.1f} us  x{r['speedup_vs_sdpa']:5.2f}  "
                       f"{r['achieved_GBps'] / 1e3:5.2f} TB/s ({100 * r['fraction_of_copy_bw']:4.1f}% of copy)  "
                       f"2-level time/bytes {r['two_level_time_ratio']:.2f}/{r['two_level_bytes_ratio']:.2f}  "
                       f"full {r['full_selection_us']:7.1f} us x{r['speedup_vs_sdpa_full_selection']:5.2f}")
        elif sec == "prefill" and "exact_kernel_us" in r:
            vs = (f"sdpa {r['sdpa_us']:9.1f} us  ratio {r['ours_over_sdpa']:.2f}" if "sdpa_us" in r else
                  f"queries {r['queries']}")
            out.append(f"{sec:12} T={r['tokens']:<6} ours {r['ours_us']:9.1f} us  {vs}  exact kernel "
                       f"{r['exact_kernel_us']:9.1f} us (x{r['kernel_over_sdpa_row']:.2f})  "
                       f"err {r['max_abs_err_vs_kernel']:.2g}  {r['tile']}")
        elif sec == "prefill":
            out.append(f"{sec:12} T={r['tokens']:<6} ours {r['ours_us']:9.1f} us  sdpa {r['sdpa_us']:9.1f} us  "
                       f"ratio {r['ours_over_sdpa']:.2f} (target <= {r['target']})  err {r['max_abs_err_vs_sdpa']:.2g}"
                       f"  {r['tile']}")
        elif sec == "compaction":
            out.append(f"{sec:12} T={r['tokens']:<6} R={r['rank']} x{r.get('layers_per_call', 1):<2} "
                       f"{r['compact_us']:9.1f} us = "
                       f"{100 * r['compact_over_prefill']:.1f}% of prefill (target <= {100 * r['target']:.0f}%, "
                       f"<= {r['target_us']:.0f} us)  launches {r['launches']}  host sync: {r['host_sync'] or 'none'}  "
                       f"{r['method']} err x{r['error_ratio']:.3f}")
        elif sec == "span_configs":
            opts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["opts"].items()) or "default"
            opts += " (two-block read)" if r.get("two_block") else ""
            out.append(f"{sec:12} B={r['batch']:<2} {r.get('selection', 'ema'):5} {r['us']:9.1f} us  err "
                       f"{r['max_abs_err_vs_default']:.2g}  {opts}")
        elif sec == "profile":
            top = ", ".join(f"{n.split('(')[0][:28]} {v['us_per_call']:.1f}" for n, v in list(r["kernels"].items())[:5])
            out.append(f"{sec:12} {r['selection']:5} {r['gpu_us_per_call']:9.1f} us GPU in "
                       f"{r['launches_per_call']:.0f} launches: {top}")
        elif sec == "verify":
            out.append(f"{sec:12} B={r['batch']:<3} T={r['span_tokens']:<6} n={r['queries_per_row']} verify "
                       f"{r['verify_us']:9.1f} us (x{r['verify_over_decode_step']:.2f} a one-query step, "
                       f"x{r['speedup_vs_sdpa']:.2f} vs sdpa {r['sdpa_us']:.1f} us)  as decode rows "
                       f"{r['as_decode_rows_us']:9.1f} us  err {r['max_abs_err_vs_as_decode']:.2g}")
        elif sec == "cuda_span":
            out.append(f"{sec:12} B={r['batch']} T={r['span_tokens']} triton {r['triton_us']:.1f} us  cuda "
                       f"{r['cuda_us']:.1f} us -> {r['faster']}")
    return "\n".join(out)


SECTIONS = ("correctness", "span_configs", "decode", "profile", "prefill", "verify", "compaction", "cuda_span")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/gpu_check_<device>.json)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, metavar="SECTION",
                    help=f"sections to skip ({', '.join(SECTIONS)})")
    ap.add_argument("--only", nargs="*", choices=SECTIONS, metavar="SECTION", help="run only these sections")
    ap.add_argument("--tag", help="JSON name suffix: gpu_check_<device>_<tag>.json (a run of other sections)")
    ap.add_argument("--prebuild-cuda", action="store_true", help="build the CUDA C++ span kernel, nothing else")
    args = ap.parse_args(argv)
    if args.prebuild_cuda:
        return prebuild_cuda()
    dev = torch.device("cpu" if SMOKE else "cuda")
    sh = Shapes(SMOKE)
    iters = 1 if SMOKE else args.iters
    slow_iters = 1 if SMOKE else max(3, iters // 4)  # prefill, verify, compaction: fewer samples
    t_start = time.time()
    name = "smoke" if SMOKE else torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS_DIR / f"gpu_check_{name}{'_' + args.tag if args.tag else ''}.json"
    header = dict(device=name if not SMOKE else (platform.processor() or "cpu"), smoke=SMOKE, torch=torch.__version__,
                  triton=__import__("triton").__version__)
    rows = ResultRows(out, header)
    sk = set(args.skip) | (set(SECTIONS) - set(args.only) if args.only is not None else set())
    if "correctness" not in sk:
        for cdt in ("model", "fp8_e4m3"):
            for ks in ("post_rope", "pre_rope"):
                guarded(rows, "correctness", check_decode, sh, dev, cdt, ks)
            guarded(rows, "correctness", check_decode, sh, dev, cdt, "post_rope", True)
        guarded(rows, "correctness", check_prefill, sh, dev)
        guarded(rows, "correctness", check_exact_vs_sdpa, sh, dev, 256 if SMOKE else 4096)
        for method in COMPACTION_METHODS:
            guarded(rows, "correctness", check_compaction, sh, dev, method)
        guarded(rows, "correctness", check_compaction_products, sh, dev)
    cbw = db.copy_bandwidth(dev, 1 << 20 if SMOKE else 1 << 30)
    launch = SpanLaunch()
    if "span_configs" not in sk:  # first: the decode rows below use the fastest configuration
        case: dict = {}
        for cfg in SPAN_CONFIGS[:2] if SMOKE else SPAN_CONFIGS:
            guarded(rows, "span_configs", time_span_config, sh, dev, iters, cfg, case)
        # the served default selects values by score: the default, 128-token tiles and the four fastest above
        ranked = sorted((r for r in rows if r["section"] == "span_configs" and "us" in r and r["opts"]),
                        key=lambda r: r["us"])
        # (score selection's default tile is 64 tokens: 128 spills with Triton 3.9; timed here too)
        score_cfgs = [SpanLaunch(), SpanLaunch(block_t=128)]
        for r in ranked[:1 if SMOKE else 4]:
            if SpanLaunch(**r["opts"]) not in score_cfgs:
                score_cfgs.append(SpanLaunch(**r["opts"]))
        for cfg in score_cfgs:
            guarded(rows, "span_configs", time_span_config, sh, dev, iters, cfg, case, "score")
        for i, cfg in enumerate(_here(SPAN_CONFIGS_FULL)[:2] if SMOKE else _here(SPAN_CONFIGS_FULL)):
            guarded(rows, "span_configs", time_span_config, sh, dev, iters, cfg, case, "full")
            if i == 0:  # the default with every tile read as if it could straddle two blocks (before plans said)
                guarded(rows, "span_configs", time_span_config, sh, dev, iters, cfg, case, "full", 8, True)
        del case
        case1: dict = {}
        for cfg in SPAN_CONFIGS_B1[:1] if SMOKE else SPAN_CONFIGS_B1:
            guarded(rows, "span_configs", time_span_config, sh, dev, iters, cfg, case1, "score", 1)
        for cfg in _here(SPAN_CONFIGS_B1_FULL)[:1] if SMOKE else _here(SPAN_CONFIGS_B1_FULL):
            guarded(rows, "span_configs", time_span_config, sh, dev, iters, cfg, case1, "full", 1)
        del case1
        launch = _on(dev, best_span_launch(rows))
    if "decode" not in sk:
        dargs = argparse.Namespace(q_heads=sh.hq, kv_heads=sh.hkv, head_size=sh.d, page=sh.page,
                                   dtype=str(sh.dtype).split(".")[-1], fp8=False, iters=iters, warmup=WARMUP,
                                   graph=True,
                                   launch=launch)
        # R=64 at every batch and length (the targets' cases), other ranks at B=8, T=32K: 8 rows (+ FP8), so
        # the whole check keeps within its 8 minutes
        grid = [(b, t, 64) for t in (8192, 32768) for b in (1, 8, 32)] + [(8, 32768, 32), (8, 32768, 128)]
        if SMOKE:
            grid = [(1, 256, 16), (2, 256, 16)]
        # (value_selection 'full', the GPU default, with the fastest full-rank launch at its batch: B = 1's own)
        full8, full1 = (_on(dev, best_span_launch(rows, "full", b)) for b in (8, 1))
        for b, t, r in grid:
            guarded(rows, "decode", db.run_case, b, t, r, replace_ns(dargs, launch_full=full1 if b == 1 else full8),
                    dev, cbw)
        # (warp_split with FP8 coefficients: 64-token tiles, SpanLaunch.resolved)
        fp8_args = replace_ns(dargs, fp8=True, launch_full=full8)
        guarded(rows, "decode", db.run_case, *((2, 256, 16) if SMOKE else (8, 32768, 64)), fp8_args, dev, cbw)
    if "profile" not in sk:
        for selection in ("ema", "score", "full"):
            guarded(rows, "profile", profile_decode, sh, dev, _on(dev, best_span_launch(rows, selection)), selection)
        # one sequence (the 2x target's case): its fastest full-rank launch, where the time of a latency-bound call
        # goes
        guarded(rows, "profile", profile_decode, sh, dev, _on(dev, best_span_launch(rows, "full", 1)), "full", 1)
    prefill_us = {}
    if "prefill" not in sk:
        for T in ((128,) if SMOKE else (4096, 16384)):
            for tile in PREFILL_TILES[:2] if SMOKE else PREFILL_TILES:
                r = guarded(rows, "prefill", time_prefill, sh, dev, T, slow_iters, tile)
                prefill_us[T] = min(prefill_us.get(T) or float("inf"), r.get("ours_us") or r.get("sdpa_us") or
                                    float("inf"))
            for n, keep_lse in ((T, False), (T, True), (T // 8, False)):
                guarded(rows, "prefill", time_sdpa_rows, sh, dev, T, n, slow_iters, keep_lse)
            guarded(rows, "prefill", time_vllm_prefill, sh, dev, T, slow_iters)
    if "verify" not in sk:  # speculative decoding: verification rows of 1 + 3 drafts (ngram's usual k)
        for b in ((2,) if SMOKE else (8, 32)):
            guarded(rows, "verify", time_verify, sh, dev, b, sh.span if SMOKE else 32768, 3, slow_iters)
    if "compaction" not in sk:
        for T in ((128,) if SMOKE else (4096, 16384)):
            if prefill_us.get(T):
                # the kernel path's variants, the float64 one, the step's warps (the smoke run: the served method;
                # the interpreter takes ~25 s a variant, and the correctness section ran the others)
                for method in COMPACTION_TIMED[:1] if SMOKE else COMPACTION_TIMED:
                    guarded(rows, "compaction", time_compaction, sh, dev, T, prefill_us[T], slow_iters,
                            method)
                if T == min(prefill_us):  # the spans of a whole model's layers (Qwen2.5-VL-7B: 28) in one call
                    for method in ("gram",) if SMOKE else ("gram", "gram-copy", "gram-torchstep"):
                        guarded(rows, "compaction", time_compaction, sh, dev, T, prefill_us[T], 1 if SMOKE else 3,
                                method, 2 if SMOKE else 28)
    if "cuda_span" not in sk and not SMOKE:
        guarded(rows, "correctness", check_cuda_span, sh, dev)
        guarded(rows, "cuda_span", time_cuda_span, sh, dev, iters)
    result = dict(header, complete=True, seconds=round(time.time() - t_start, 1), copy_GBps=cbw / 1e9, rows=list(rows))
    write_json(result, out)
    print("\n" + table(rows))
    failed = [r for r in rows if "error" in r or (r["section"] == "correctness" and "tol" in r
                                                   and r.get("error_ratio", r.get("max_abs_err", 0)) > r["tol"])
              or r.get("max_abs_err_vs_default", 0) > r.get("tol", float("inf"))
              or r.get("max_abs_err_vs_sdpa", 0) > r.get("tol", float("inf"))
              or r.get("max_abs_err_vs_kernel", 0) > r.get("tol", float("inf"))
              or r.get("max_abs_err_vs_as_decode", 0) > r.get("tol", float("inf"))
              or r.get("error_ratio", 0) > r.get("error_tol", float("inf"))]
    print(f"\nwrote {out} in {time.time() - t_start:.0f} s; {len(failed)} failed checks")
    return 1 if failed else 0


def replace_ns(ns: argparse.Namespace, **kw) -> argparse.Namespace:
    d = vars(ns).copy()
    d.update(kw)
    return argparse.Namespace(**d)


if __name__ == "__main__":
    sys.exit(main())
