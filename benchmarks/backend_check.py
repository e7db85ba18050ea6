"""The backend layer itself on CUDA: vLLM's metadata builder and AttentionPack's impl through prefill and
decode steps, a CUDA-graph capture and replay of a padded decode step, and the host time of a decode step.

    PYTHONPATH=. python benchmarks/backend_check.py           # a GPU: full shapes, real graphs
    python benchmarks/backend_check.py --smoke                 # CPU: tiny shapes under the Triton interpreter

It needs vLLM's Python sources (no compiled ops: the cache write is vLLM's Triton kernel); on a GPU
machine without vLLM, ``make gpu-check`` installs them from the bundle ``make gpu-bundle`` builds
(``benchmarks/gpu_bundle.py``). vLLM's platform there is its CPU build's; the backend sees only CUDA
tensors, as in a served step. The world is the tests' (:mod:`ap_vllm.tools.testing.backend_world`):
vLLM's token-major pages, scrambled block tables, freed blocks poisoned with NaN, and per step the
``CommonAttentionMetadata`` vLLM's runner would hand the builder. Sections (each JSON row names its own):

* ``steps``: prefill (a span compacted on a one-token chunk, chunked prefill, text rows) and decode steps
  through builder + impl on the kernel path against the same layer on the torch path, same device, same
  inputs (fp32: 1e-4; bf16: 2e-2, as ``gpu_check.py``);
* ``cuda_graph``: a padded decode batch of vLLM's persistent inputs; one eager step (compiles the kernels),
  then every layer's cache write + forward captured in one ``torch.cuda.CUDAGraph``, replayed for later
  steps of other requests, lengths and span counts after ``build`` wrote their metadata into the builder's
  persistent buffers; each replay against the torch path (on CPU, ``--smoke``: the captured closure is
  called again, which checks the same buffer contract without a graph);
* ``host_time``: B = 64 decode rows, 28 layers, 1K-token compacted spans: per step the builder, the
  layers' launches and the whole step, eager against graph replay (host time = until the last launch
  returns; step = after a device sync). Target: host time at most 1 ms with the graph.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv or not torch.cuda.is_available()
if SMOKE:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, ResultRows, guarded, vllm_platform_for_the_bundle, write_json  # noqa: E402


vllm_platform_for_the_bundle()  # (before vLLM is imported)


class Shapes:
    def __init__(self, smoke: bool):
        if smoke:
            self.hq, self.hkv, self.d, self.dtype, self.tol = 4, 2, 32, torch.float32, 1e-4
            self.images = ((10, 150), (4, 126), (20, 100))  # (offset, tokens) of requests 0, 2, 3
            self.ranks = {"key_rank": 8, "value_rank": 12}
        else:  # Qwen2.5-VL-7B's attention: 28 q heads, 4 kv heads, d = 128, bf16
            self.hq, self.hkv, self.d, self.dtype, self.tol = 28, 4, 128, torch.bfloat16, 2e-2
            self.images = ((16, 1024), (40, 700), (8, 520))
            self.ranks = {"key_rank": 64, "value_rank": 64}

    def world(self, device, num_blocks: int, **kw):
        from ap_vllm.tools.testing.backend_world import World

        return World(self.hq, self.hkv, num_blocks=num_blocks, head_size=self.d, dtype=self.dtype, device=device, **kw)


def _pair(sh: Shapes, device, layer_ids, cfg: dict, max_num_seqs: int = 8, max_model_len: int = 4096):
    """(impls, builders) of the kernel path and the torch path, one impl per layer."""
    from ap_vllm.tools.testing.backend_world import make_builder, make_impl

    cfg = {**sh.ranks, **cfg}
    impls = {k: [make_impl(k, sh.hq, sh.hkv, None, None, head_size=sh.d, **cfg) for _ in layer_ids]
             for k in ("triton", "torch")}
    builders = {k: make_builder(k, sh.hq, sh.hkv, list(layer_ids), num_layers=max(layer_ids) + 1,
                                max_num_seqs=max_num_seqs, head_size=sh.d, dtype=sh.dtype, device=device,
                                max_model_len=max_model_len, **cfg) for k in ("triton", "torch")}
    return impls, builders


def _run(impls, world, pages, layers, batch, md) -> list:
    from ap_vllm.tools.testing.backend_world import run_step

    return [run_step(impl, world, pg, batch, md, lyr) for impl, pg, lyr in zip(impls, pages, layers)]


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


IMAGE_REQUESTS = (0, 2, 3)  # requests 1 (and 4, ...) are text only


def _prompt(sh: Shapes, world, i: int) -> int:
    """Request IMAGE_REQUESTS[i]: its image, 20 text tokens after it; returns the prompt length."""
    off, n = sh.images[i]
    world.request(IMAGE_REQUESTS[i], (off, n), off + n + 20)
    return off + n + 20


def check_steps(sh: Shapes, dev, cfg: dict) -> dict:
    """Prefill and decode steps, kernel path against torch path (see the module docstring)."""
    from ap_vllm.tools.testing.backend_world import build, layer

    ids = (0, 1)
    impls, builders = _pair(sh, dev, ids, cfg)
    layers = [layer(i) for i in ids]
    w = sh.world(dev, 8 + 2 * sum(off + n + 64 for off, n in sh.images) // 16)
    p0, p2 = _prompt(sh, w, 0), _prompt(sh, w, 1)
    end2 = sh.images[1][0] + sh.images[1][1]  # request 2's span completes on a one-token chunk
    steps = [[(0, p0), (1, 60), (2, end2 - 1)],
             [(0, 1), (1, 1), (2, 1), (3, 40)],
             [(0, 1), (1, 1), (2, p2 - end2), (3, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 1)],
             [(0, 1), (2, 1), (3, 1)]]
    pages = {k: [w.pages.clone() for _ in ids] for k in impls}
    errs, finite = [], True
    for step in steps:
        batch = w.batch(step)
        outs = {k: _run(impls[k], w, pages[k], layers, batch, build(builders[k], *batch[3:])) for k in impls}
        w.poison_freed(builders["torch"], *pages["triton"], *pages["torch"])
        finite &= all(bool(torch.isfinite(o).all()) for k in outs for o in outs[k])
        errs.append(max(_err(a, b) for a, b in zip(outs["triton"], outs["torch"])))
    compacted = sum(len(ps) for ps in w.plans(builders["torch"]).values())
    return dict(check=f"prefill + decode steps {cfg or 'defaults'}", steps=len(steps), spans_compacted=compacted,
                freed_blocks=len(w.freed_blocks(builders["torch"])), all_finite=finite, step_errs=errs,
                max_abs_err=max(errs) if finite else float("inf"), tol=sh.tol)


class _Graph:
    """One decode step of every layer, captured (CUDA) or kept as a closure (CPU: called again on replay).

    As vLLM does, the step runs eagerly once on the capture stream first (:meth:`warm`: compiles the kernels,
    allocates what is allocated lazily), then is captured on that stream and replayed on the current one."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.fn, self.graph = None, None

    def _on_stream(self, run) -> None:
        if not self.cuda:
            run()
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            run()
        torch.cuda.current_stream().wait_stream(self.stream)

    def warm(self, fn) -> None:
        self._on_stream(fn)

    def capture(self, fn) -> None:
        self.fn = fn
        if self.cuda:
            self.graph = torch.cuda.CUDAGraph()

            def run():
                with torch.cuda.graph(self.graph, stream=self.stream):
                    fn()

            self._on_stream(run)

    def replay(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


def _decode_world(sh: Shapes, dev, cfg: dict, layer_ids, rows: int):
    """Four requests (three with an image) prefilled and compacted eagerly, both paths."""
    from ap_vllm.tools.testing.backend_world import build, layer

    impls, builders = _pair(sh, dev, layer_ids, cfg, max_num_seqs=rows)
    layers = [layer(i) for i in layer_ids]
    w = sh.world(dev, 16 + 2 * sum(off + n + 64 for off, n in sh.images) // 16 + 64)
    prompts = [_prompt(sh, w, i) for i in range(3)]
    pages = {k: [w.pages.clone() for _ in layer_ids] for k in impls}
    for step in ([(0, prompts[0]), (1, 30)], [(2, prompts[1]), (3, prompts[2])]):
        batch = w.batch(step)
        for k in impls:
            _run(impls[k], w, pages[k], layers, batch, build(builders[k], *batch[3:]))
        w.poison_freed(builders["torch"], *pages["triton"], *pages["torch"])
    return impls, builders, layers, w, pages


def check_cuda_graph(sh: Shapes, dev, cfg: dict) -> dict:
    """Capture one padded decode step, replay it for other batches (see the module docstring)."""
    from ap_vllm.tools.testing.backend_world import StaticDecode, build

    rows, ids = 8, (0, 1)
    impls, builders, layers, w, pages = _decode_world(sh, dev, cfg, ids, rows)
    static = StaticDecode(w, rows, max_blocks=max(len(t) for t in w.tables.values()) + 8, num_layers=len(ids))
    kv = [w.kv_cache(pg) for pg in pages["triton"]]
    steps = [[(0, 1), (1, 1), (2, 1), (3, 1)],  # eager, then captured
             [(3, 1), (1, 1), (0, 1)],  # replayed: other rows, span counts, lengths
             [(2, 1), (0, 1), (1, 1), (3, 1)],
             [(1, 1)]]  # text only: no span in the batch
    graph, errs, finite, addresses = None, [], True, set()
    for i, step in enumerate(steps):
        batch = w.batch(step)
        md = build(builders["triton"], static.load(batch), batch[4])
        if not (md.decode.static and md.prefill is None):
            raise RuntimeError(f"step {i} is not a static decode step")
        addresses.add(tuple(t.data_ptr() for t in (md.decode.seq_lens, md.decode.lse.slot)))
        if graph is None:  # eager (compiles every kernel), then captured
            graph = _Graph(dev)
            graph.warm(lambda: static.step(impls["triton"], layers, kv, md))
            graph.capture(lambda md=md: static.step(impls["triton"], layers, kv, md))
        else:
            graph.replay()
        ref = _run(impls["torch"], w, pages["torch"], layers, batch, build(builders["torch"], *batch[3:]))
        n = len(step)
        finite &= all(bool(torch.isfinite(o).all()) for o in static.outputs)
        errs.append(max(_err(o[:n], r) for o, r in zip(static.outputs, ref)))
    return dict(check=f"CUDA graph: capture + {len(steps) - 1} replays {cfg or 'defaults'}",
                captured=graph.graph is not None, rows=rows, layers=len(ids), step_errs=errs,
                buffers_stayed=len(addresses) == 1, all_finite=finite,
                max_abs_err=max(errs) if finite and len(addresses) == 1 else float("inf"), tol=sh.tol)


def time_host(sh: Shapes, dev, batch: int, num_layers: int, span_tokens: int, steps: int, cfg: dict) -> dict:
    """Decode step times at ``batch`` rows and ``num_layers`` layers, eager against graph replay."""
    from ap_vllm.tools.testing.backend_world import StaticDecode, build, layer, make_builder, make_impl

    cfg = {**sh.ranks, **cfg}
    prompt = 16 + span_tokens + 48
    ids = list(range(num_layers))
    impls = [make_impl("triton", sh.hq, sh.hkv, None, None, head_size=sh.d, **cfg) for _ in ids]
    builder = make_builder("triton", sh.hq, sh.hkv, ids, num_layers=num_layers, max_num_seqs=batch, head_size=sh.d,
                           dtype=sh.dtype, device=dev, max_model_len=prompt + 2 * steps + 64, **cfg)
    layers = [layer(i) for i in ids]
    blocks = -(-(prompt + 2 * steps + 16) // 16)
    w = sh.world(dev, batch * blocks + 1, draw_on_device=True)
    pages = [w.pages] + [w.pages.clone() for _ in ids[1:]]
    kv = [w.kv_cache(pg) for pg in pages]
    for r in range(batch):
        w.request(r, (16, span_tokens), prompt)
    chunk = max(1, 8192 // prompt)
    for lo in range(0, batch, chunk):  # prefill, spans compacted
        b = w.batch([(r, prompt) for r in range(lo, min(batch, lo + chunk))])
        md = build(builder, *b[3:])
        for impl, lyr, k in zip(impls, layers, kv):
            impl.do_kv_cache_update(lyr, b[1], b[2], k, b[3].slot_mapping)
            impl.forward(lyr, b[0], None, None, k, md, torch.empty_like(b[0]))
        impls[0].finish_step(md)  # (done by the step's last layer already; a no-op then)
    static = StaticDecode(w, batch, max_blocks=blocks, num_layers=num_layers)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rec = {"eager": [], "graph": []}
    graph = None
    for i in range(2 * steps + 2):
        mode = "eager" if i <= steps else "graph"
        b = w.batch([(r, 1) for r in range(batch)])
        common = static.load(b)
        sync()
        t0 = time.perf_counter()
        md = build(builder, common, b[4])
        t1 = time.perf_counter()
        if mode == "eager":
            static.step(impls, layers, kv, md)
        elif graph is None:  # the first graph step: warm + capture (not timed)
            graph = _Graph(dev)
            graph.warm(lambda: static.step(impls, layers, kv, md))
            graph.capture(lambda md=md: static.step(impls, layers, kv, md))
            sync()
            continue
        else:
            graph.replay()
        t2 = time.perf_counter()
        sync()
        t3 = time.perf_counter()
        if i > 0:  # the first eager step compiles
            rec[mode].append((t1 - t0, t2 - t1, t3 - t0))
    out = dict(batch=batch, layers=num_layers, span_tokens=span_tokens, steps=steps, config=cfg)
    for mode, r in rec.items():
        if r:
            med = [sorted(x[j] for x in r)[len(r) // 2] * 1e3 for j in range(3)]
            out[f"{mode}_build_ms"], out[f"{mode}_launch_ms"], out[f"{mode}_step_ms"] = med
            out[f"{mode}_host_ms"] = med[0] + med[1]
    out["target_host_ms"] = 1.0
    return out


def failed(rows: list) -> list:
    return [r for r in rows if "error" in r or ("tol" in r and not r["max_abs_err"] <= r["tol"])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/backend_check_<device>.json)")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip")
    args = ap.parse_args(argv)
    import triton
    import vllm  # (a clear ImportError first: see the module docstring)
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    dev = torch.device("cpu" if SMOKE else "cuda")
    if not SMOKE and not HAS_TRITON:  # the cache write on CUDA is vLLM's Triton kernel
        print("backend_check: vLLM turned its Triton kernels off (see benchmarks/gpu_bundle.py)", flush=True)
    sh = Shapes(SMOKE)
    name = "smoke" if SMOKE else torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS_DIR / f"backend_check_{name}.json"
    header = dict(device=name, smoke=SMOKE, torch=torch.__version__, triton=triton.__version__, vllm=vllm.__version__,
                  vllm_platform=type(current_platform).__name__, vllm_has_triton=HAS_TRITON,
                  vllm_target_device=os.environ.get("VLLM_TARGET_DEVICE"))
    rows = ResultRows(out, header)
    t_start = time.time()
    configs = ({}, {"value_selection": "ema"})
    if "steps" not in args.skip:
        for cfg in configs:
            guarded(rows, "steps", check_steps, sh, dev, cfg)
    if "cuda_graph" not in args.skip:
        for cfg in configs:
            guarded(rows, "cuda_graph", check_cuda_graph, sh, dev, cfg)
    if "host_time" not in args.skip:
        shape = (4, 2, 128, 2) if SMOKE else (64, 28, 1024, 20)
        for cfg in configs:
            guarded(rows, "host_time", time_host, sh, dev, *shape, cfg)
    result = dict(header, complete=True, seconds=round(time.time() - t_start, 1), rows=list(rows))
    write_json(result, out)
    bad = failed(rows)
    for r in rows:
        if r["section"] == "host_time" and "error" not in r:
            print(f"host_time B={r['batch']} L={r['layers']} {r['config'].get('value_selection', 'auto')}: "
                  + "  ".join(f"{m}: host {r[m + '_host_ms']:.2f} ms, step {r[m + '_step_ms']:.2f} ms"
                              for m in ("eager", "graph") if m + "_host_ms" in r))
    print(f"\nwrote {out} in {time.time() - t_start:.0f} s; {len(bad)} failed checks")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
