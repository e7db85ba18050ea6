"""Compaction benchmark: the sketch method against the Gram method, side by side, on this machine.

    python benchmarks/compaction_bench.py            # CPU (torch steps) or GPU (Triton steps), JSON to results/
    python benchmarks/compaction_bench.py --smoke    # tiny shapes

Per case (span T tokens, Hkv kv heads, head size d, rank R: one layer's K and V, one batched call as the backend
makes it) and method:

* ``ms``: the best of ``--repeats`` timed calls (after one warm call), GPU calls synchronised;
* ``error_ratio_k`` / ``error_ratio_v``: ||X - C B|| / the optimal rank-R error (Eckart-Young), in the stored
  form (bf16 coefficients and bases), on keys with a bias (mean row 10x their spread) and on values;
* ``launches``: on a GPU, the kernels, copies and memsets of one call (torch.profiler).

``gram_over_sketch`` is the time ratio of the two methods measured in the same run. The data is
``ap_vllm.core.synthetic.low_rank_kv`` (0.93^i spectrum plus noise), the keys with a bias added.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS_DIR, device_launches, write_json  # noqa: E402

import torch  # noqa: E402

from ap_vllm.core.compaction import compact_spans  # noqa: E402
from ap_vllm.core.synthetic import low_rank_kv  # noqa: E402

CASES = [(4096, 4, 128, 64), (1024, 4, 128, 64), (1024, 2, 64, 32), (256, 2, 64, 16)]
SMOKE_CASES = [(128, 2, 64, 16)]


def _options(method: str, dev: torch.device) -> dict:
    if method == "sketch":
        return {}
    if dev.type == "cuda":  # the backend's GPU path: the Triton steps
        from ap_vllm.kernels.compaction import device_compaction

        return device_compaction()
    return dict(method="gram")  # CPU: the torch steps


def _error_ratio(x: torch.Tensor, rec: torch.Tensor, rank: int) -> float:
    xf = x.double().reshape(x.shape[0], -1)
    opt = float(torch.linalg.svdvals(xf.cpu())[rank:].square().sum().sqrt())
    return float((rec.double().reshape(xf.shape) - xf).norm()) / max(opt, 1e-12)


def run_case(t: int, hkv: int, d: int, rank: int, dev: torch.device, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(t + d)
    v = low_rank_kv(t, hkv, d, generator=gen)
    k = low_rank_kv(t, hkv, d, generator=gen)
    k = k + 10.0 * float(k.std()) * torch.randn(1, hkv, d, generator=gen)  # keys with a bias
    k, v = k.to(dev, torch.bfloat16), v.to(dev, torch.bfloat16)
    rows = []
    for method in ("sketch", "gram"):
        opts = _options(method, dev)

        def call():
            out = compact_spans([k], [v], rank, rank, **opts)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out

        (span,) = call()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        kr, vr = span.reconstruct()
        rows.append(dict(tokens=t, kv_heads=hkv, head_size=d, rank=rank, method=method, ms=min(times) * 1e3,
                         error_ratio_k=_error_ratio(k.float(), kr, rank),
                         error_ratio_v=_error_ratio(v.float(), vr, rank), launches=device_launches(call, dev)))
    rows[1]["gram_over_sketch"] = rows[1]["ms"] / rows[0]["ms"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/compaction_<device>.json)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in SMOKE_CASES if args.smoke else CASES:
        for r in run_case(*case, dev, 1 if args.smoke else args.repeats):
            print(r, flush=True)
            rows.append(r)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine()
    out = args.out or RESULTS_DIR / f"compaction_{'smoke_' if args.smoke else ''}{dev.type}.json"
    write_json(dict(benchmark="compaction_bench", device=name, torch=torch.__version__,
                    threads=torch.get_num_threads(), rows=rows), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
