"""Host work of the backend's decode step, per layer (the kernels themselves stubbed out).

    python benchmarks/host_overhead_bench.py                  # B = 8, 32, 64; 28 layers per step
    python benchmarks/host_overhead_bench.py --batch 64 --layers 4

What the attention backend does around the Triton kernels in one decode step: find the decode
rows, describe the batch's compacted spans for the kernels (metadata, block ids), read the
spans' importance and compute the two-level thresholds, gather the previous step's lse. vLLM
builds one metadata object per step and hands it to every layer, so what the first layer builds
can serve the others. This benchmark times ``AttentionPackImpl.forward`` on a decode-only batch
(each request: 16 text tokens, a compacted image span of ``--span-tokens``, 64 text tokens) with
``paged_mixed_decode_triton`` replaced by a stub that returns zeros, over ``--layers`` layers and
``--steps`` steps, and reports milliseconds per step and per layer (first layer of a step and the
others), with the two-level read (thresholds from a sort of the spans' importance, one device op)
and without it (``--importance-fraction 1.0``: the host part alone). Run it where the kernels run (CUDA) for launch costs; on CPU it measures the same Python
and tensor bookkeeping, a lower bound. JSON under benchmarks/results/.
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
    from vllm.config import VllmConfig, set_current_vllm_config

    from ap_vllm.backend.attentionpack import AttentionPackImpl, AttentionPackMetadata
    from ap_vllm.core.spans import KVGeometry, plan_span

    extra = {"attentionpack": {"key_rank": 64, "value_rank": 64, "kernel": "triton",
                               "importance_fraction": importance_fraction}}
    with set_current_vllm_config(VllmConfig(additional_config=extra)):
        impls = [AttentionPackImpl(HQ, D, D ** -0.5, HKV, None, None, "auto") for _ in range(num_layers)]
    layers = [SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn") for i in range(num_layers)]
    geometry = KVGeometry(block_size, HKV, D, dtype, num_layers)
    plan = plan_span(impls[0].config, geometry, 16, span_tokens, "visual")
    if plan is None:
        raise SystemExit(f"a span of {span_tokens} tokens frees nothing at block size {block_size}")
    seq_len = 16 + span_tokens + 64
    blocks_per_seq = -(-(seq_len + 256) // block_size)
    num_blocks = batch * blocks_per_seq + 1
    # vLLM's token-major pages; random bytes (the stubbed kernels read nothing, thresholds sort them)
    pages = torch.randn(num_blocks, block_size, HKV, 2 * D, device=device).to(dtype)
    table = (1 + torch.randperm(num_blocks - 1, device=device)[: batch * blocks_per_seq]).view(batch, -1).int()

    def metadata(step: int):
        lens = [seq_len + step] * batch
        return AttentionPackMetadata(
            num_actual_tokens=batch, query_start_loc=list(range(batch + 1)), seq_lens=lens, block_table=table,
            slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device), spans=[[plan]] * batch,
            request_ids=[f"r{b}" for b in range(batch)])

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

    kernels.paged_mixed_decode_triton = stub
    query = torch.randn(batch, HQ, D, device=device).to(dtype)
    output = torch.empty_like(query)
    first, others, built = [], [], set()
    try:
        for step in range(steps + 2):  # two warm-up steps
            md = metadata(step)
            for li, (impl, layer) in enumerate(zip(impls, layers)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                impl.forward(layer, query, None, None, kv_cache, md, output)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if step >= 2:
                    (first if li == 0 else others).append(dt)
            built.add(len(md.kernel_steps))
    finally:
        kernels.paged_mixed_decode_triton = real
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    per_step = (sum(first) + sum(others)) / steps
    return {"batch": batch, "span_tokens": span_tokens, "layers": num_layers, "steps": steps,
            "importance_fraction": importance_fraction,
            "first_layer_ms": 1e3 * med(first), "other_layers_ms": 1e3 * med(others) if others else None,
            "per_step_ms": 1e3 * per_step, "per_layer_mean_ms": 1e3 * per_step / num_layers,
            "descriptions_built_per_step": sorted(built)}


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
        print(f"B={r['batch']:3d} T={args.span_tokens} importance fraction {r['importance_fraction']}: first layer "
              f"{r['first_layer_ms']:.2f} ms, other layers "
              f"{r['other_layers_ms'] or 0:.2f} ms, per step ({args.layers} layers) {r['per_step_ms']:.1f} ms",
              file=sys.stderr)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": 1, "cases": rows}
    out = args.out or RESULTS_DIR / f"host_overhead_{device.type}.json"
    write_json(report, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
