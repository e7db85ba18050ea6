"""Host work of the backend's decode step, per layer (the kernels themselves stubbed out).

    python benchmarks/host_overhead_bench.py                  # B = 8, 32, 64; 28 layers per step
    python benchmarks/host_overhead_bench.py --batch 64 --layers 4

What the attention backend does on the host around the kernels in one decode step: the metadata
builder's work, once per step (decode rows, span metadata for the kernels, reused while the decode
batch is the same requests; lengths and lse slot tags into persistent buffers), then per layer
``AttentionPackImpl.forward``: the two-level thresholds (device ops), the previous step's lse from the
layer's slot buffer, the kernel launches (stubbed: ``paged_mixed_decode_triton`` and the thresholds
kernel return zeros), the output and lse writes. Decode-only batch, each request: 16 text tokens, a compacted image span of
``--span-tokens``, 64 text tokens; ``--layers`` layers, ``--steps`` steps. Reports the builder's
milliseconds per step, the first and the other layers' milliseconds, and the total per step, with the
two-level read and without it (``--importance-fraction 1.0``). Run it where the kernels run (CUDA) for
launch costs; on CPU the device ops run on the host too (an upper bound of the Python part).
JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402

HQ, HKV, D = 28, 4, 128


def make_world(batch: int, span_tokens: int, block_size: int, device, dtype, num_layers: int,
               importance_fraction: float = 0.25):
    """Impls and the builder of one KV-cache group of ``num_layers`` compacted layers, a cache with one
    compacted image span per request, and the per-step CommonAttentionMetadata vLLM's runner would pass."""
    import numpy as np
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from ap_vllm.backend.attentionpack import AttentionPackImpl
    from ap_vllm.backend.channel import StepRequests
    from ap_vllm.backend.metadata import AttentionPackMetadataBuilder
    from ap_vllm.engine.spec import AttentionPackSpec, RequestSpans

    cfg = {"key_rank": 64, "value_rank": 64, "kernel": "triton", "importance_fraction": importance_fraction}
    with set_current_vllm_config(VllmConfig(additional_config={"attentionpack": cfg})):
        impls = [AttentionPackImpl(HQ, D, D ** -0.5, HKV, None, None, "auto") for _ in range(num_layers)]
    layers = [SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn") for i in range(num_layers)]
    seq_len_cap = 16 + span_tokens + 64 + 1024  # max_model_len
    model = SimpleNamespace(get_total_num_hidden_layers=lambda: num_layers, get_num_kv_heads=lambda p: HKV,
                            get_total_num_kv_heads=lambda: HKV,
                            get_head_size=lambda: D, get_num_attention_heads=lambda p: HQ, model="bench", max_model_len=seq_len_cap,
                            hf_text_config=SimpleNamespace(sliding_window=None))
    vllm_config = SimpleNamespace(additional_config={"attentionpack": cfg}, model_config=model,
                                  parallel_config=SimpleNamespace(decode_context_parallel_size=1),
                                  scheduler_config=SimpleNamespace(max_num_seqs=max(batch, 8)), speculative_config=None,
                                  compilation_config=SimpleNamespace(static_forward_context={}))  # (no KV sharing)
    spec = AttentionPackSpec(block_size=block_size, num_kv_heads=HKV, head_size=D, dtype=dtype)
    builder = AttentionPackMetadataBuilder(spec, [lyr.layer_name for lyr in layers], vllm_config, device)
    request = RequestSpans(((16, span_tokens),), 16 + span_tokens + 64)
    if not builder._plans(request):
        raise SystemExit(f"a span of {span_tokens} tokens frees nothing at block size {block_size}")
    seq_len = request.num_prompt_tokens
    blocks_per_seq = -(-(seq_len + 256) // block_size)
    num_blocks = batch * blocks_per_seq + 1
    # vLLM's token-major pages; random bytes (the stubbed kernels read nothing, thresholds read importances)
    pages = torch.randn(num_blocks, block_size, HKV, 2 * D, device=device).to(dtype)
    table = (1 + torch.randperm(num_blocks - 1, device=device)[: batch * blocks_per_seq]).view(batch, -1).int()
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    requests = StepRequests(tuple(f"r{b}" for b in range(batch)), (request,) * batch,
                            np.arange(batch, dtype=np.int64), np.ones(batch, dtype=np.int64))

    def metadata(step: int):
        """One decode step: the builder's host work (what vLLM runs once per step and KV-cache group)."""
        lens = torch.full((batch,), seq_len + 1 + step, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=lens.to(device), num_reqs=batch,
            num_actual_tokens=batch, max_query_len=1, max_seq_len=int(lens.max()), block_table_tensor=table,
            slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device), seq_lens_cpu_upper_bound=lens)
        builder.set_step_requests(requests)
        try:
            return builder.build(0, common)
        finally:
            builder.set_step_requests(None)

    return impls, layers, pages.transpose(1, 2), metadata


def run(batch: int, span_tokens: int, num_layers: int, steps: int, block_size: int, device, dtype,
        importance_fraction: float = 0.25) -> dict:
    import ap_vllm.kernels.lowrank_decode as kernels

    impls, layers, kv_cache, metadata = make_world(batch, span_tokens, block_size, device, dtype, num_layers,
                                                   importance_fraction)
    real = kernels.paged_mixed_decode_triton

    def stub(q, *args, out=None, **kwargs):
        o = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if out is None else out
        return o, torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)

    import ap_vllm.kernels.thresholds as thresholds_kernel

    real_thr = thresholds_kernel.span_thresholds_triton

    def stub_thr(cache, block_table, meta, num_spans, fraction, sample=0, *, out=None, **kwargs):
        return torch.zeros(meta.shape[0], dtype=torch.float32, device=meta.device) if out is None else out

    kernels.paged_mixed_decode_triton = stub
    thresholds_kernel.span_thresholds_triton = stub_thr
    query = torch.randn(batch, HQ, D, device=device).to(dtype)
    output = torch.empty_like(query)
    build, first, others = [], [], []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        for step in range(steps + 2):  # two warm-up steps
            sync()
            t0 = time.perf_counter()
            md = metadata(step)
            sync()
            t_build = time.perf_counter() - t0
            if step >= 2:
                build.append(t_build)
            for li, (impl, layer) in enumerate(zip(impls, layers)):
                sync()
                t0 = time.perf_counter()
                impl.forward(layer, query, None, None, kv_cache, md, output)
                sync()
                dt = time.perf_counter() - t0
                if step >= 2:
                    (first if li == 0 else others).append(dt)
            impls[0].finish_step(md)  # (a step whose spans complete: compacted by its last layer already)
    finally:
        kernels.paged_mixed_decode_triton = real
        thresholds_kernel.span_thresholds_triton = real_thr
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    per_step = (sum(build) + sum(first) + sum(others)) / steps  # means: comparable with each other only
    layers_mean = (sum(first) + sum(others)) / steps
    return {"batch": batch, "span_tokens": span_tokens, "layers": num_layers, "steps": steps,
            "importance_fraction": importance_fraction, "build_ms": 1e3 * med(build),
            "first_layer_ms": 1e3 * med(first), "other_layers_ms": 1e3 * med(others) if others else None,
            "per_step_ms": 1e3 * per_step, "build_mean_ms": 1e3 * sum(build) / steps,
            "per_layer_mean_ms": 1e3 * layers_mean / num_layers,
            # medians: the builder once + the first layer + the others (robust to a noisy machine)
            "median_step_ms": 1e3 * (med(build) + med(first) + (num_layers - 1) * (med(others) or 0.0)),
            # a decode step replayed from a CUDA graph runs no per-layer Python: the builder's work is what remains
            "graph_step_host_ms": 1e3 * med(build)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="host_overhead_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--span-tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--importance-fraction", type=float, nargs="+", default=[0.25, 1.0],
                   help="1.0: every token full rank, no thresholds (the host part alone; default both)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/host_overhead_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is single-threaded Python; keep CPU tensor ops comparable
    rows = []
    try:
        for frac in args.importance_fraction:
            for b in args.batch:
                rows.append(run(b, args.span_tokens, args.layers, args.steps, args.block_size, device, dtype, frac))
    finally:
        torch.set_num_threads(threads)
    for r in rows:
        print(f"B={r['batch']:3d} T={args.span_tokens} importance fraction {r['importance_fraction']}: build "
              f"{r['build_ms']:.2f} ms, first layer "
              f"{r['first_layer_ms']:.2f} ms, other layers "
              f"{r['other_layers_ms'] or 0:.2f} ms, per step ({args.layers} layers, medians) {r['median_step_ms']:.1f} ms "
              f"(mean {r['per_step_ms']:.1f}); replayed from a CUDA graph: {r['graph_step_host_ms']:.2f} ms",
              file=sys.stderr)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": 1, "cases": rows}
    out = args.out or RESULTS_DIR / f"host_overhead_{device.type}.json"
    write_json(report, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
