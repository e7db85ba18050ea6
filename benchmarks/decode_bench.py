"""Decode-attention benchmark: compacted spans vs full KV (one layer).

    python benchmarks/decode_bench.py                 # GPU, Qwen2.5-VL-7B-like shapes
    python benchmarks/decode_bench.py --smoke         # tiny shapes, CPU + Triton interpreter

Per case (batch B, span T tokens, rank R), one attention layer with 28 query heads, 4 kv heads,
d = 128, each sequence = 16 text tokens + a compacted span of T tokens + 64 text tokens:

* ``ours_us``: paged_mixed_decode (Triton: exact pages + compacted span, two-level read,
  fused importance update), one decode query per sequence; ``thresholds_us``: what the served
  path adds per layer for the two-level read (the spans' sampled importance gathered from the
  pages and the thresholds from one small sort), ``speedup_vs_sdpa_with_thresholds`` counts it;
* ``ours_full_rank_us``: the same read with every token at full rank; ``two_level_time_ratio``
  (two-level / full rank) next to ``two_level_bytes_ratio`` (the bytes the cost model says each
  reads) shows whether the sectors the two-level read skips are really not fetched (for DRAM
  bytes counted by the profiler: ``make ncu-decode``);
* ``sdpa_us``: torch SDPA over the equivalent full bf16 K/V (contiguous, GQA);
* ``exact_paged_us``: our exact paged Triton kernel over the full paged K/V;
* ``bytes_read``: bytes one step of ours reads (decode_step_cost + exact tokens), achieved
  bandwidth and its fraction of the measured device copy bandwidth;
* ``compact_ms`` vs ``prefill_attn_ms``: compaction (randomized SVD of K and V) of one
  sequence's span for one layer vs causal prefill attention over the same span.

``--key-space pre_rope`` (or ``both``) also times spans whose keys are stored before RoPE (keys
rebuilt and rotated tile by tile in the kernel; same bytes, more FLOPs); each row names its
``key_space``.

Results go to benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

if "--smoke" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from ap_vllm.config import AttentionPackConfig  # noqa: E402
from ap_vllm.core.compaction import CompactedSpan, compact_span  # noqa: E402
from ap_vllm.core.lowrank_attention import (decode_step_cost, importance_threshold, threshold_ranks,  # noqa: E402
                                            thresholds_from_padded)
from ap_vllm.core.paged_decode import build_decode_plan, paged_mixed_decode  # noqa: E402
from ap_vllm.core.paged_layout import (PagedSpan, SpanLayout, importance_index, pack_span,  # noqa: E402
                                      read_importances, storage_blocks)
from ap_vllm.core.rope import RopeTable  # noqa: E402
from ap_vllm.kernels.lowrank_decode import SpanLaunch  # noqa: E402
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402

TEXT_BEFORE, TEXT_AFTER = 16, 64


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, iters=20, warmup=3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def capture_graph(fn, warmup=3) -> "torch.cuda.CUDAGraph":
    """``fn`` captured as a CUDA graph, after ``warmup`` calls on a side stream (compiles, allocator) that run it
    for real; the capture itself does not."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def timeit_graph(fn, dev, iters=20, warmup=3, replays=10) -> float:
    """Median seconds per call of ``fn`` captured once as a CUDA graph and replayed ``replays`` times back to back
    per sample: kernel time without the host's launch time (what a served step, itself replayed as a graph,
    pays). Off CUDA: :func:`timeit`."""
    if dev.type != "cuda":
        return timeit(fn, dev, iters, warmup)
    graph = capture_graph(fn, warmup)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / replays)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(dev, nbytes: int) -> float:
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), dev, iters=10)
    return 2 * x.numel() * 2 / t  # read + write


def build_case(bsz, span, rank, hq, hkv, d, page, dtype, dev, fp8=False, seed=0):
    """Paged cache holding B sequences of text + compacted span + text (random coefficients)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    L = TEXT_BEFORE + span + TEXT_AFTER
    nblk = -(-L // page)
    layout = SpanLayout(span, rank, rank, hkv, d, page, dtype, fp8=fp8)
    first, count = storage_blocks(TEXT_BEFORE, span, page)
    assert layout.num_blocks <= count
    # blocks actually held: everything except the span blocks after the compact form
    held = [i for i in range(nblk) if not (first + layout.num_blocks <= i < first + count)]
    total = bsz * len(held)
    kv_cache = torch.randn(total, 2, page, hkv, d, generator=gen).to(dtype).to(dev)
    perm = torch.randperm(total, generator=gen)
    bt = torch.zeros(bsz, nblk, dtype=torch.int32)
    for b in range(bsz):
        bt[b, held] = perm[b * len(held):(b + 1) * len(held)].to(torch.int32)
    bt = bt.to(dev)
    spans = []
    w = hkv * d
    for b in range(bsz):
        ck = torch.randn(span, rank, device=dev) / rank ** 0.5
        cv = torch.randn(span, rank, device=dev)
        bk, _ = torch.linalg.qr(torch.randn(w, rank, device=dev))
        bv, _ = torch.linalg.qr(torch.randn(w, rank, device=dev))
        imp = torch.rand(span, device=dev)
        cs = CompactedSpan(ck.to(dtype), (bk.T * w ** 0.5).to(dtype).contiguous(), cv.to(dtype),
                           bv.T.to(dtype).contiguous(), hkv, d, start=TEXT_BEFORE, importance=imp)
        if fp8:
            from ap_vllm.core.compaction import quantize_fp8
            cs.coeff_k, cs.scale_k = quantize_fp8(ck)
            cs.coeff_v, cs.scale_v = quantize_fp8(cv)
        sp = PagedSpan(seq=b, start=TEXT_BEFORE, layout=layout, threshold=importance_threshold(imp, 0.25))
        pack_span(kv_cache, bt[b, sp.storage_block: sp.storage_block + layout.num_blocks], cs, layout, kernel=True)
        spans.append(sp)
    q = torch.randn(bsz, hq, d, generator=gen).to(dtype).to(dev)
    seq_lens = torch.full((bsz,), L, dtype=torch.int32, device=dev)
    return q, kv_cache, bt, seq_lens, spans, L


def rope_table(d, max_positions, dev):
    """Llama-style RoPE (theta 10000, neox halves) for the pre-RoPE cases."""
    return RopeTable.from_base(d, 10000.0, max_positions=max_positions).to(dev)


def run_case(bsz, span, rank, args, dev, cbw, key_space="post_rope"):
    hq, hkv, d, page, dtype = args.q_heads, args.kv_heads, args.head_size, args.page, getattr(torch, args.dtype)
    q, kv_cache, bt, seq_lens, spans, L = build_case(bsz, span, rank, hq, hkv, d, page, dtype, dev, fp8=args.fp8)
    plan = build_decode_plan(spans, bsz, device=dev)
    scale = d ** -0.5
    lse_ref = torch.full((bsz, hq), 10.0, device=dev)
    rope = rope_table(d, L + 1, dev) if key_space == "pre_rope" else None
    # the span launch's knobs (gpu_check's span_configs pick them by measurement); timer: graph replay
    # (kernel time) or host-launched calls
    launch = getattr(args, "launch", None) if key_space == "post_rope" else None
    # value_selection 'full' (the GPU default) timed with its own fastest launch where gpu_check found one
    launch_full = (getattr(args, "launch_full", None) or launch) if key_space == "post_rope" else None
    timer = timeit_graph if getattr(args, "graph", False) else timeit
    warm = getattr(args, "warmup", 3)  # calls before timing (gpu_check's CPU smoke run: 0)
    opts = dict(kernel="triton", lse_ref=lse_ref, importance_ema=0.25, max_seq_len=L, rope=rope)
    if launch is not None:
        opts["launch"] = launch
    ours = timer(lambda: paged_mixed_decode(q, kv_cache, bt, seq_lens, plan, scale, **opts), dev, args.iters, warm)
    # the same read with every token at full rank: do the sectors the two-level read skips save time?
    full_plan = build_decode_plan([replace(sp, threshold=None) for sp in spans], bsz, device=dev)
    ours_full = timer(lambda: paged_mixed_decode(q, kv_cache, bt, seq_lens, full_plan, scale, **opts), dev,
                      args.iters, warm)
    # value_selection 'full' as served: that read with nothing selected nor updated (no importance traffic)
    sel_opts = {k: v for k, v in opts.items() if k not in ("lse_ref", "importance_ema")}
    if launch_full is not None:
        sel_opts["launch"] = launch_full
    ours_full_sel = timer(lambda: paged_mixed_decode(q, kv_cache, bt, seq_lens, full_plan, scale, **sel_opts), dev,
                          args.iters, warm)
    # what the served path adds per layer and step for the two-level read: the spans' importance
    # gathered from the pages and the thresholds from one sort (ap_vllm.backend.attentionpack)
    index, valid, counts = importance_index(spans, bt, AttentionPackConfig().threshold_sample_tokens)
    ranks = torch.tensor(threshold_ranks(counts, 0.25), device=dev)
    thr = timer(lambda: thresholds_from_padded(read_importances(kv_cache, index, valid), ranks), dev, args.iters, warm)
    del kv_cache
    # full KV: SDPA (contiguous) and our exact paged kernel
    k = torch.randn(bsz, hkv, L, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    qs = q[:, :, None, :]
    sdpa = timer(lambda: F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True), dev, args.iters, warm)
    nblk = -(-L // page)
    full_cache = k.new_empty(bsz * nblk, 2, page, hkv, d).normal_()
    del k, v
    full_bt = torch.arange(bsz * nblk, dtype=torch.int32, device=dev).reshape(bsz, nblk)
    empty = build_decode_plan([], bsz, device=dev)
    exact = timer(lambda: paged_mixed_decode(q, full_cache, full_bt, seq_lens, empty, scale, kernel="triton",
                                             max_seq_len=L), dev, args.iters, warm)
    del full_cache
    eb = torch.empty((), dtype=dtype).element_size()
    cost = decode_step_cost(span, hq, hkv, d, rank, rank, eb, 1 if args.fp8 else None, importance_fraction=0.25,
                            pre_rope=rope is not None)
    full_cost = decode_step_cost(span, hq, hkv, d, rank, rank, eb, 1 if args.fp8 else None,
                                 pre_rope=rope is not None)
    sel_cost = decode_step_cost(span, hq, hkv, d, rank, rank, eb, 1 if args.fp8 else None, with_importance=False,
                                pre_rope=rope is not None)  # (value_selection 'full': no importance read)
    exact_part = (L - span) * 2 * hkv * d * eb
    nbytes = bsz * (cost.bytes_read + exact_part)
    full_bytes = bsz * L * 2 * hkv * d * eb
    return dict(batch=bsz, span_tokens=span, seq_len=L, rank=rank, fp8=args.fp8, key_space=key_space,
                timer="graph replay" if timer is timeit_graph and dev.type == "cuda" else "host launch",
                launch=None if launch is None else launch.overrides(),
                launch_full=None if launch_full is None else launch_full.overrides(),
                span_flops=bsz * cost.flops, ours_us=ours * 1e6, thresholds_us=thr * 1e6,
                speedup_vs_sdpa_with_thresholds=sdpa / (ours + thr), sdpa_us=sdpa * 1e6, exact_paged_us=exact * 1e6,
                speedup_vs_sdpa=sdpa / ours, ours_full_rank_us=ours_full * 1e6,
                full_selection_us=ours_full_sel * 1e6, speedup_vs_sdpa_full_selection=sdpa / ours_full_sel,
                full_selection_fraction_of_copy_bw=bsz * (sel_cost.bytes_read + exact_part) / ours_full_sel / cbw,
                two_level_time_ratio=ours / ours_full,
                two_level_bytes_ratio=(cost.bytes_read + exact_part) / (full_cost.bytes_read + exact_part),
                speedup_vs_exact_paged=exact / ours, bytes_read=nbytes, full_kv_bytes=full_bytes,
                achieved_GBps=nbytes / ours / 1e9, copy_GBps=cbw / 1e9, fraction_of_copy_bw=nbytes / ours / cbw,
                sdpa_fraction_of_copy_bw=full_bytes / sdpa / cbw)


# the full-rank launches a profiler sees (profile_once): the default, then the candidates that keep two tile buffers in
# flight (the block-table entries of 32 tiles read before a run over them), with the 2-D loop and with warp_split
PROFILED_LAUNCHES = (("default launch", SpanLaunch()),
                     ("bt_ahead, bt_chunk=32, 3 stages", SpanLaunch(bt_ahead=True, bt_chunk=32, stages=3)),
                     ("warp_split, bt_chunk=32, 3 stages", SpanLaunch(warp_split=True, bt_chunk=32, stages=3)))


def profile_once(args) -> None:
    """For a profiler: the span kernel of a full-rank read (value_selection 'full', the GPU default), one launch of
    each of :data:`PROFILED_LAUNCHES`."""
    if args.smoke:  # the same calls at tiny shapes on the CPU (Triton interpreter), to check the path
        args.batches, args.spans, args.rank, args.q_heads, args.kv_heads, args.head_size = [2], [256], 16, 4, 2, 64
    elif not torch.cuda.is_available():
        raise SystemExit("--ncu needs a CUDA device (or --smoke)")
    dev = torch.device("cpu" if args.smoke else "cuda")
    bsz, span = args.batches[0], args.spans[0]
    q, kv_cache, bt, seq_lens, spans, L = build_case(bsz, span, args.rank, args.q_heads, args.kv_heads,
                                                     args.head_size, args.page, getattr(torch, args.dtype), dev,
                                                     fp8=args.fp8)
    # (the full-rank read as value_selection 'full' serves it: nothing selected, no importance update)
    plan = build_decode_plan([replace(sp, threshold=None) for sp in spans], bsz, device=dev)
    assert plan.full_rank
    for label, launch in PROFILED_LAUNCHES:
        _sync(dev)
        paged_mixed_decode(q, kv_cache, bt, seq_lens, plan, args.head_size ** -0.5, kernel="triton",
                           max_seq_len=L, launch=launch)
        _sync(dev)
        print(f"launched: full rank read, {label}, B={bsz} T={span} R={args.rank}", flush=True)
    eb = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    c = decode_step_cost(span, args.q_heads, args.kv_heads, args.head_size, args.rank, args.rank, eb,
                         1 if args.fp8 else None, with_importance=False)  # (value_selection 'full')
    print(f"cost model, full rank: {bsz * c.bytes_read / 2**20:.2f} MiB of span reads")


def compaction_case(span, rank, args, dev, key_space="post_rope"):
    hq, hkv, d, dtype = args.q_heads, args.kv_heads, args.head_size, getattr(torch, args.dtype)
    k = torch.randn(span, hkv, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    rope = rope_table(d, span + 1, dev) if key_space == "pre_rope" else None
    t_c = timeit(lambda: compact_span(k, v, rank, rank, oversample=8, power_iters=2, rope=rope), dev,
                 iters=max(3, args.iters // 4))
    qf = torch.randn(1, hq, span, d, device=dev, dtype=dtype)
    kf = k.permute(1, 0, 2)[None]
    vf = v.permute(1, 0, 2)[None]
    t_p = timeit(lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True), dev,
                 iters=max(3, args.iters // 4))
    return dict(span_tokens=span, rank=rank, key_space=key_space, compact_ms=t_c * 1e3, prefill_attn_ms=t_p * 1e3,
                compact_over_prefill=t_c / t_p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with the Triton interpreter")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--spans", type=int, nargs="*", default=[4096, 16384, 32768, 65536])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--q-heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fp8", action="store_true", help="FP8 e4m3 coefficients")
    ap.add_argument("--key-space", choices=["post_rope", "pre_rope", "both"], default="post_rope",
                    help="keys stored after RoPE (coefficient-space scores) or before (rebuilt + rotated)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-kv-gib", type=float, default=20.0, help="skip cases whose full KV exceeds this")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<device>.json)")
    ap.add_argument("--ncu", action="store_true",
                    help="one full-rank call with each of PROFILED_LAUNCHES, nothing else (run under Nsight "
                         "Compute: make ncu-decode); first case of --batches / --spans")
    args = ap.parse_args(argv)
    if args.ncu:
        return profile_once(args)
    if args.smoke:
        args.batches, args.spans, args.rank = [1, 2], [256], 16
        args.q_heads, args.kv_heads, args.head_size, args.iters = 4, 2, 64, 2
        args.key_space = "both"
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA device (use --smoke on CPU)")
        dev = torch.device("cuda")
    name = "smoke" if args.smoke else "decode_" + torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
    cbw = copy_bandwidth(dev, 1 << 20 if args.smoke else 1 << 30)
    cases, comp = [], []
    spaces = ["post_rope", "pre_rope"] if args.key_space == "both" else [args.key_space]
    eb = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    for span in args.spans:
        for bsz in args.batches:
            full = bsz * (span + TEXT_BEFORE + TEXT_AFTER) * 2 * args.kv_heads * args.head_size * eb
            if full > args.max_kv_gib * 2 ** 30:
                print(f"skip B={bsz} T={span}: full KV {full / 2**30:.1f} GiB")
                continue
            for ks in spaces:
                r = run_case(bsz, span, args.rank, args, dev, cbw, ks)
                print(json.dumps(r))
                cases.append(r)
        for ks in spaces:
            c = compaction_case(span, args.rank, args, dev, ks)
            print(json.dumps(c))
            comp.append(c)
    result = dict(device=str(torch.cuda.get_device_name()) if dev.type == "cuda" else platform.processor() or "cpu",
                  smoke=args.smoke, torch=torch.__version__, shapes=dict(q_heads=args.q_heads, kv_heads=args.kv_heads,
                  head_size=args.head_size, page=args.page, dtype=args.dtype, rank=args.rank, fp8=args.fp8,
                  key_space=args.key_space),
                  copy_GBps=cbw / 1e9, decode=cases, compaction=comp,
                  targets=dict(speedup_vs_sdpa_at_B8_T32K=5.0, fraction_of_copy_bw=0.7, compact_over_prefill=0.1))
    write_json(result, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
