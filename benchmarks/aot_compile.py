"""Ahead-of-time compile of every Triton kernel the backend launches, for real GPU targets, on any machine.

The Triton interpreter (``TRITON_INTERPRET=1``, what CPU tests use) runs kernels as Python and does not
enforce the jit rules (plain module-level ints, dtype mismatches, shapes ``tl.dot`` refuses) nor tell
anything about registers. This script runs the real host wrappers (``paged_mixed_decode_triton``,
``paged_exact_attention_triton``, ``pack_span(kernel=True)``) on CPU tensors of representative shapes with
every launch turned into a compile-only warm-up for a chosen GPU target (``GPUTarget("cuda", 80|90, 32)``):
the kernels, constexprs and argument specialisations (16-byte alignment, divisibility) are exactly
those a launch on that GPU would compile. Triton ships ``ptxas``, so the PTX is assembled to a cubin too;
``ptxas -v`` reports registers and spill bytes, and the PTX shows the width of every global load.

    python benchmarks/aot_compile.py --arch 80 90 [--json benchmarks/results/aot_compile.json]

Exit status 1 on any compile error, on spills in any kernel, or on a kernel of a decode step whose registers
leave fewer than ``--min-warps`` warps resident per SM (pre-RoPE span kernels rebuild keys, are compute-bound
and run uncapped, as do the span instances of prefill rows: only spills count there).
Must run without ``TRITON_INTERPRET`` (it is refused).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

# kernels whose registers and spills are gated (the bandwidth-bound decode path)
KERNEL_OPTS: dict = {}  # --opt name=value: the decode call's span launch (SpanLaunch fields: block_t, warps, ...)
EXACT_TILE: dict = {}  # --opt tile_<name>=value: the exact kernel's launch overrides (rows, block_n, num_warps, ...)
LOOP_KERNELS = ("_span_attn_kernel", "_exact_attention_kernel")  # token loops whose SASS is counted
DECODE_KERNELS = ("_span_attn_kernel", "_exact_decode_kernel", "_span_qproj_kernel", "_merge_kernel",
                  "_span_thresholds_kernel")


@dataclass
class Compiled:
    kernel: str
    arch: int
    config: str
    constexprs: dict
    num_warps: int
    num_stages: int
    regs: int = -1
    spill_bytes: int = -1
    loads: dict = field(default_factory=dict)  # PTX global load width (bits) -> count
    loop_instr: int = -1  # SASS instructions of the kernel's longest loop body (one token tile of the span kernel)
    loops: list = field(default_factory=list)  # every loop body's instructions, longest first (token-loop kernels)
    error: str = ""
    known: str = ""  # why its spills are tolerated (KNOWN_SPILLS), if they are
    gdc: dict = field(default_factory=dict)  # PTX griddepcontrol instructions (programmatic dependent launch)
    # the most asynchronous-copy groups a cp.async.wait_group leaves in flight (0: every wait drains the copies, so a
    # pipelined loop computes a tile only after all its copies landed and none of the next tile's are in flight)
    async_depth: int = 0


class _AotDriver:
    """A stand-in for Triton's active driver: reports a GPU target, never launches."""

    def __init__(self, real, arch: int):
        self._real = real
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return f"aot-sm{self.arch}"

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):  # anything else (benchmarker, utils): the real driver's, if any
        if self._real is None:
            raise AttributeError(f"compile-only driver has no {name!r}")
        return getattr(self._real, name)


@contextlib.contextmanager
def compile_only(arch: int, sink: list, config: str):
    """Every ``kernel[grid](...)`` inside compiles for sm_<arch> (warm-up) and is appended to ``sink``."""
    orig_run = JITFunction.run
    real = _driver._active  # None on a machine without a GPU driver: nothing else is needed then

    def run(self, *args, grid, warmup, **kwargs):
        try:
            k = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # a compile error: recorded, the wrapper goes on with its other launches
            sink.append((self, None, config, f"{type(e).__name__}: {e}"))
            return None
        sink.append((self, k, config, ""))
        return k

    _driver.set_active(_AotDriver(real, arch))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = orig_run
        _driver._active = real


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CPASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*"
                      r"(0x[0-9a-fA-F]+|\d+)")  # copy size in bytes (decimal or hex)
_LD = re.compile(r"\bld\.global(?:\.[a-z_]+)*?(?:\.(v[248]))?\.([a-z]+)(\d+)\b")


def ptx_loads(ptx: str) -> dict:
    """Width in bits of each global load in the PTX (vector width x element bits) -> count."""
    out: dict = {}
    for m in _LD.finditer(ptx):
        vec = int(m.group(1)[1:]) if m.group(1) else 1
        bits = vec * int(m.group(3))
        out[bits] = out.get(bits, 0) + 1
    for m in _CPASYNC.finditer(ptx):  # asynchronous copies to shared memory (software pipelining): bytes -> bits
        bits = 8 * int(m.group(1), 0)
        out[bits] = out.get(bits, 0) + 1
    return dict(sorted(out.items()))


_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRA = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")
_SASS_INSTR = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def ptx_async_depth(ptx: str) -> int:
    """The largest N of the PTX's ``cp.async.wait_group N`` (0 if none): copies left in flight through a wait."""
    return max([0] + [int(n) for n in re.findall(r"\bcp\.async\.wait_group\s+(\d+)", ptx)])


def ptx_gdc(ptx: str) -> dict:
    """The griddepcontrol instructions of a kernel's PTX: {"wait": n, "launch_dependents": n}."""
    return {op: len(re.findall(rf"\bgriddepcontrol\.{op}\b", ptx)) for op in ("wait", "launch_dependents")}


def sass_loops(sass: str) -> list[tuple[int, dict]]:
    """The loop bodies in ``sass`` (nvdisasm text: a backward branch to a label), longest first: (instructions,
    opcode -> count). A kernel whose CTAs issue few warps is bound by what one tile costs to issue: a token
    loop's count is the per-tile work the device cannot hide."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _SASS_LABEL.match(line))}
    loops = []
    for i, line in enumerate(lines):
        m = _SASS_BRA.search(line)
        if m and labels.get(m.group(1), i) < i:
            ops: dict = {}
            for body in lines[labels[m.group(1)]: i + 1]:
                if (o := _SASS_INSTR.match(body)):
                    ops[o.group(1)] = ops.get(o.group(1), 0) + 1
            loops.append((sum(ops.values()), ops))
    return sorted(loops, key=lambda x: -x[0])


def sass_of(cubin: bytes, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = Path(get_ptxas(arch).path).with_name("nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        r = subprocess.run([str(nvdisasm), "-c", str(f)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nvdisasm failed: {r.stderr[-1000:]}")
    return r.stdout


def ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    regs = max((int(x) for x in _PTXAS_REGS.findall(log)), default=-1)
    spills = sum(int(a) + int(b) for a, b in _PTXAS_SPILL.findall(log))
    return regs, spills


# --------------------------------------------------------------------------------------
# the configurations the backend launches
# --------------------------------------------------------------------------------------
# (name, Hq, Hkv, d): the attention geometries of the presets and the tests' models
MODELS = [("qwen2.5-vl-7b", 28, 4, 128), ("llava-1.5-7b", 32, 32, 128), ("gemma3", 4, 1, 256),
          ("tiny", 8, 2, 64), ("qwen3-vl-8b", 32, 8, 128), ("qwen3.5", 16, 4, 256)]
# M-RoPE models at their presets' rank (qwen3_vl's R = 128), bfloat16, post-RoPE keys only (pre_rope is refused there)
MROPE_AT_128 = ("qwen3-vl-8b", "qwen3.5")


def decode_configs(full: bool):
    """(label, kwargs for synthetic batch + kernel) of every decode launch variant."""
    cfgs = []
    for name, hq, hkv, d in MODELS if full else MODELS[:1]:
        ranks = [(32, 32), (64, 64), (128, 128)] if name == "qwen2.5-vl-7b" and full else [(64, 64)]
        if name == "llava-1.5-7b":
            ranks = [(64, 64)]
        if name in MROPE_AT_128:
            ranks = [(128, 128)]
        for rk, rv in ranks:
            for dtype in (torch.bfloat16, torch.float16) if full and name not in MROPE_AT_128 else (torch.bfloat16,):
                for cdt in ("model", "fp8_e4m3"):
                    for pre_rope in (False, True):
                        if pre_rope and (cdt != "model" or dtype != torch.bfloat16 or name in MROPE_AT_128):
                            continue
                        for update, score, fr in ((False, False, False), (True, False, False), (False, True, False),
                                                  (False, False, True)):
                            # (score selection and full rank: the quick subset compiles their dynamic launch for
                            # post-RoPE model coefficients only, their static launch for all)
                            cfgs.append((f"{name} R={rk}/{rv} {str(dtype)[6:]} {cdt}{' pre-rope' if pre_rope else ''}"
                                         f"{' +importance' if update else ''}{' +score' if score else ''}"
                                         f"{' +full' if fr else ''}",
                                         dict(hq=hq, hkv=hkv, d=d, rk=rk, rv=rv, dtype=dtype, cdt=cdt,
                                              pre_rope=pre_rope, update=update, score=score, full=fr, softcap=None,
                                              static_only=(score or fr) and not full and (pre_rope or cdt != "model"))))
        if name == MODELS[0][0]:  # full rank with the next tile's loads issued before this one's compute
            for cdt in ("model", "fp8_e4m3"):
                cfgs.append((f"{name} R=64/64 bfloat16 {cdt} +full +prefetch",
                             dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16, cdt=cdt, pre_rope=False,
                                  update=False, score=False, full=True, softcap=None, static_only=True,
                                  launch=dict(block_t=64, stages=1, prefetch=True))))
            # full rank with each warp's own tokens of a tile (batched dots), the tile left to SpanLaunch.resolved:
            # FP8 over 64-token tiles (128 spill 52 / 68 bytes on sm_90 with Triton 3.6 / 3.9: 255 registers)
            # (bt_chunk=32 at 3 stages: the block-table entries of 32 tiles read before a run over them, two tile
            # buffers)
            for cdt in ("model", "fp8_e4m3"):
                for chunk in (0, 32):
                    cfgs.append((f"{name} R=64/64 bfloat16 {cdt} +full +warp-split"
                                 + (f" +bt-chunk={chunk}" if chunk else ""),
                                 dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16, cdt=cdt,
                                      pre_rope=False, update=False, score=False, full=True, softcap=None,
                                      static_only=True, launch=dict(warp_split=True, bt_chunk=chunk,
                                                                    stages=3 if chunk else None))))
            # a plan that does not say its rows per block (tiles may straddle two blocks: two block-table reads and a
            # per-row select, as at ranks whose rows per block are no multiple of the tile)
            for cdt in ("model", "fp8_e4m3"):
                cfgs.append((f"{name} R=64/64 bfloat16 {cdt} +full +two-block",
                             dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16, cdt=cdt, pre_rope=False,
                                  update=False, score=False, full=True, softcap=None, static_only=True,
                                  two_block=True)))
            # programmatic dependent launch (sm_90 and later): the span kernel and the merge wait for the launch
            # before them (griddepcontrol), the exact kernel signals its dependent
            cfgs.append((f"{name} R=64/64 bfloat16 model +full +pdl",
                         dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16, cdt="model", pre_rope=False,
                              update=False, score=False, full=True, softcap=None, static_only=True,
                              launch=dict(pdl=True))))
            # the full-rank read over one-block tiles with the block-table reads a tile ahead (two tile buffers at
            # three stages), or 32 tiles' at once before a run of them (no block-table read in the run's loop), model
            # and FP8 coefficients
            for cdt in ("model", "fp8_e4m3"):
                for chunk in (0, 32):
                    label = f"{name} R=64/64 bfloat16 {cdt} +full +bt-ahead" + (f" +bt-chunk={chunk}" if chunk else "")
                    cfgs.append((label,
                                 dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16, cdt=cdt, pre_rope=False,
                                      update=False, score=False, full=True, softcap=None, static_only=True,
                                      launch=dict(bt_ahead=True, stages=3, bt_chunk=chunk))))
            # the merge over groups of a kv head's q heads (more programs, a row's span partials in one load)
            for heads in (1, 2):
                cfgs.append((f"{name} R=64/64 bfloat16 model +full +merge-heads={heads}",
                             dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16, cdt="model",
                                  pre_rope=False, update=False, score=False, full=True, softcap=None,
                                  static_only=True, launch=dict(merge_heads=heads))))
        if name == MODELS[0][0]:  # an FP8 KV cache (float8 e4m3 exact pages; sm >= 89 only, as vLLM's writer)
            for update in (False, True):
                cfgs.append((f"{name} R=64/64 bfloat16 fp8_e4m3 kv-fp8{' +importance' if update else ''}",
                             dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16, cdt="fp8_e4m3",
                                  pre_rope=False, update=update, score=False, softcap=None, kv_fp8=True)))
        if name == "gemma3":  # soft-capped / sliding-window layers (exact kernel variants)
            cfgs.append((f"{name} softcap", dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16,
                                                   cdt="model", pre_rope=False, update=True, softcap=30.0)))
            cfgs.append((f"{name} window", dict(hq=hq, hkv=hkv, d=d, rk=64, rv=64, dtype=torch.bfloat16,
                                                  cdt="model", pre_rope=False, update=False, softcap=None,
                                                  window=512)))
    # Gemma 4's global layers (heads of 512; E4B's 8 q / 2 kv heads) at full rank, the GPU default
    cfgs.append(("gemma4-global R=64/64 bfloat16 model +full", dict(
        hq=8, hkv=2, d=512, rk=64, rv=64, dtype=torch.bfloat16, cdt="model", pre_rope=False, update=False,
        score=False, full=True, softcap=None)))
    return cfgs


def static_variant(cfgs, full: bool):
    """The static (CUDA-graph) launch of decode configurations: every one of the full matrix; in the quick
    subset those with the importance update (the fused two-level read, the most registers), score selection or
    full rank (value_selection 'full')."""
    return [(f"{lbl} static", dict(c, static=True)) for lbl, c in cfgs
            if full or c["update"] or c.get("score") or c.get("full")]


def run_decode(c: dict) -> None:
    """A decode step; ``static``: the launch of a padded batch (4 rows, 2 of them padding, span capacity 4,
    one span; caps of 32K tokens; 8 splits, 264 programs) as a captured CUDA graph replays it."""
    from ap_vllm.core.paged_decode import DecodePlan, build_decode_plan, paged_mixed_decode
    from ap_vllm.core.paged_layout import META_FIELDS
    from ap_vllm.core.rope import RopeTable
    from ap_vllm.core.synthetic import make_paged_batch
    from ap_vllm.kernels.lowrank_decode import SpanLaunch

    window = c.get("window")
    spans = [[], []] if window else [[(16, 320)], []]
    rope = RopeTable.from_base(c["d"], max_positions=1024) if c["pre_rope"] else None
    kv_scales = (0.5, 0.25) if c.get("kv_fp8") else None
    pb = make_paged_batch([400, 200], spans, num_q_heads=c["hq"], num_kv_heads=c["hkv"], head_size=c["d"],
                          key_rank=c["rk"], value_rank=c["rv"],
                          importance_fraction=None if c.get("full") else 0.25, dtype=c["dtype"],
                          coefficient_dtype=c["cdt"], page=16, rope=rope, kv_scales=kv_scales)
    plan = build_decode_plan(pb.spans, 2)
    q, bt, seq_lens, bsz, kw = pb.q, pb.block_table, pb.seq_lens, 2, {}
    if c.get("static"):
        bsz, cap = 4, 0 if window else 4  # (sliding-window layers are never compacted: no span capacity)
        q = torch.cat([pb.q, torch.zeros_like(pb.q)])
        bt = torch.cat([pb.block_table, torch.zeros_like(pb.block_table)])
        seq_lens = torch.cat([pb.seq_lens, torch.zeros_like(pb.seq_lens)])
        meta = torch.zeros(cap, len(META_FIELDS), dtype=torch.int64)
        meta[: plan.meta.shape[0]] = plan.meta
        thr = torch.full((cap,), float("-inf"))
        thr[: plan.meta.shape[0]] = plan.thresholds
        seq_spans = torch.full((bsz, 2), -1, dtype=torch.int32)
        seq_spans[:2, : plan.seq_spans.shape[1]] = plan.seq_spans
        plan = DecodePlan(spans=[], meta=meta, thresholds=thr, seq_spans=seq_spans, max_span_tokens=32768,
                          key_rank_max=plan.key_rank_max, value_rank_max=plan.value_rank_max, fp8=plan.fp8,
                          full_rank=plan.full_rank, rows_per_block=() if c.get("two_block") else plan.rows_per_block)
        # a GPU's split counts and programs (this CPU-only run would otherwise take 1 split, which Triton
        # specialises as a constant)
        kw = dict(num_spans=torch.tensor([len(pb.spans)], dtype=torch.int32), workspace={}, num_span_splits=8,
                  num_exact_splits=8, num_programs=264)
    lse_ref = torch.zeros(bsz, c["hq"]) if c["update"] or c.get("score") else None
    paged_mixed_decode(q, pb.kv_cache, bt, seq_lens, plan, 0.1, softcap=c["softcap"],
                       window=window, lse_ref=lse_ref, importance_ema=0.25 if c["update"] else None,
                       score_threshold=1 / 256 if c.get("score") else None,
                       max_seq_len=32768 if c.get("static") else 400, kernel="triton", rope=rope,
                       kv_scales=kv_scales, launch=SpanLaunch(**{**c.get("launch", {}), **KERNEL_OPTS}), **kw)


def run_thresholds(sample: int) -> None:
    """The two-level thresholds of a layer's spans (static launch): a sample held in registers, or every token
    of a span read tile by tile (``sample`` = 0)."""
    from ap_vllm.core.paged_decode import build_decode_plan
    from ap_vllm.core.synthetic import make_paged_batch
    from ap_vllm.kernels.thresholds import span_thresholds_triton

    pb = make_paged_batch([400, 200], [[(16, 320)], []], num_q_heads=28, num_kv_heads=4, head_size=128,
                          key_rank=64, value_rank=64, importance_fraction=0.25, dtype=torch.bfloat16, page=16)
    plan = build_decode_plan(pb.spans, 2)
    span_thresholds_triton(pb.kv_cache, pb.block_table, plan.meta, torch.tensor([1], dtype=torch.int32), 0.25,
                           sample)


def run_prefill(c: dict) -> None:
    """Rows of longer queries over compacted spans: exact kernel, span instances of QPT rows, merge."""
    from ap_vllm.core.paged_decode import build_prefill_plan, paged_prefill
    from ap_vllm.core.rope import RopeTable
    from ap_vllm.core.synthetic import make_paged_batch

    rope = RopeTable.from_base(c["d"], max_positions=1024) if c["pre_rope"] else None
    kv_scales = (0.5, 0.25) if c.get("kv_fp8") else None
    pb = make_paged_batch([400, 200], [[(16, 320)], []], num_q_heads=c["hq"], num_kv_heads=c["hkv"],
                          head_size=c["d"], key_rank=c["rk"], value_rank=c["rv"], dtype=c["dtype"],
                          coefficient_dtype=c["cdt"], page=16, rope=rope, kv_scales=kv_scales)
    qsl = [0, 40, 240]
    plan = build_prefill_plan(pb.spans, qsl, c["hq"])
    q = torch.zeros(240, c["hq"], c["d"], dtype=c["dtype"])
    paged_prefill(q, pb.kv_cache, pb.block_table, torch.tensor(qsl, dtype=torch.int32), pb.seq_lens, plan, 0.1,
                  max_query_len=200, max_seq_len=400, softcap=c["softcap"], kernel="triton", rope=rope,
                  kv_scales=kv_scales)


def run_pack(dtype, cdt) -> None:
    from ap_vllm.core.compaction import compact_span
    from ap_vllm.core.paged_layout import span_layout_for
    from ap_vllm.core.synthetic import low_rank_kv
    from ap_vllm.core.paged_layout import pack_span

    k = low_rank_kv(300, 4, 128).to(dtype)
    sp = compact_span(k, k, 64, 64, coefficient_dtype=cdt, importance=torch.rand(300))
    lay = span_layout_for(sp, 16)
    cache = torch.zeros(64, 2, 16, 4, 128, dtype=dtype)
    pack_span(cache, torch.arange(lay.num_blocks), sp, lay, kernel=True)


def run_gram_orth(w: int, r: int) -> None:
    """The Gram compaction's step (kernels/compaction.py) for a layer width W = Hkv * d and rank R: the
    intermediate steps (2 CholeskyQR passes) and the last (3)."""
    from ap_vllm.kernels.compaction import gram_orth_triton

    g = torch.eye(w).expand(2, w, w).contiguous()
    z = torch.randn(w, r)
    for precision in ("tf32x3", "ieee"):  # (the device default, and float32 FMA)
        for passes in (2, 3):
            gram_orth_triton(g @ z, z, torch.zeros(2, w), torch.full((2,), 100.0), g, passes, precision=precision)


def run_gram_finish(w: int, r: int, cdt: str, threshold) -> None:
    """The Gram compaction's finishing launch (kernels/compaction.py), as compact_spans calls it (centred) and
    on uncentred candidates."""
    from ap_vllm.kernels.compaction import gram_finish_triton

    cand, zb = torch.randn(2, 300, r + 1), torch.randn(2, w, r + 1)
    for centred in (True, False):
        gram_finish_triton(cand, zb, torch.eye(w).expand(2, w, w).contiguous(), torch.zeros(2, w),
                           torch.full((2,), 300.0), r, energy_threshold=threshold, coefficient_dtype=cdt,
                           dtype=torch.bfloat16, centred=centred)


def run_gram_products(w: int, r: int, dtype: torch.dtype, cdt: str, threshold, precision: str = "tf32") -> None:
    """The Gram compaction's products from X in its own dtype (kernels/compaction.py GramProducts): the centred
    Gram matrix, the decision from it and the coefficients X B^T."""
    from ap_vllm.kernels.compaction import GramProducts

    p = GramProducts(precision)
    x = torch.randn(2, 300, w).to(dtype)
    mu, cnt = torch.zeros(2, w), torch.full((2,), 300.0)
    g = p.gram(x, mu, cnt)
    zb = torch.randn(2, w, r + 1)
    p.finish(x, zb, zb, g, mu, cnt, r, energy_threshold=threshold,
             coefficient_dtype=cdt, dtype=torch.bfloat16)


def run_exact(c: dict) -> bool:
    """The exact attention kernel for any query length (prefill, chunked prefill, mixed batches)."""
    try:
        from ap_vllm.kernels.exact_attention import paged_exact_attention_triton
    except ImportError:
        return False
    hq, hkv, d, dtype = c["hq"], c["hkv"], c["d"], c["dtype"]
    nb, bs = 64, 16
    cache = torch.zeros(nb, 2, bs, hkv, d, dtype=torch.float8_e4m3fn if c.get("kv_fp8") else dtype)
    bt = torch.arange(nb, dtype=torch.int32).view(2, 32)
    qsl = torch.tensor([0, 100, 101], dtype=torch.int32)
    seq_lens = torch.tensor([300, 200], dtype=torch.int32)
    q = torch.zeros(101, hq, d, dtype=dtype)
    kw = {}
    if c.get("spans"):
        from ap_vllm.core.paged_layout import META_FIELDS
        meta = torch.zeros(1, len(META_FIELDS), dtype=torch.int64)
        kw = dict(seq_spans=torch.tensor([[0], [-1]], dtype=torch.int32), meta=meta)
    if c.get("reach"):  # an image attended both ways (is_mm_prefix_lm models): each query's last key
        kw["reach"] = torch.cat([torch.arange(200, 300), torch.tensor([199])]).to(torch.int32)
    paged_exact_attention_triton(q, cache, bt, qsl, seq_lens, 0.1, max_query_len=100, max_seq_len=300,
                                 softcap=c.get("softcap"), window=c.get("window"),
                                 kv_scales=(0.5, 0.25) if c.get("kv_fp8") else None,
                                 tile=EXACT_TILE or c.get("tile"), **kw)
    return True


def exact_configs(full: bool):
    from ap_vllm.kernels.exact_attention import LONG_PREFILL_TILE

    cfgs = []
    for name, hq, hkv, d in MODELS if full else MODELS[:1]:
        for dtype in (torch.bfloat16, torch.float16) if full else (torch.bfloat16,):
            cfgs.append((f"{name} {str(dtype)[6:]}", dict(hq=hq, hkv=hkv, d=d, dtype=dtype)))
        cfgs.append((f"{name} spans", dict(hq=hq, hkv=hkv, d=d, dtype=torch.bfloat16, spans=True)))
        if name == MODELS[0][0]:
            cfgs.append((f"{name} bfloat16 kv-fp8", dict(hq=hq, hkv=hkv, d=d, dtype=torch.bfloat16, kv_fp8=True)))
            # the long-prefill tile with the interior tiles' block-table entries read a tile ahead (two K / V
            # buffers with copies in flight through the compute)
            cfgs.append((f"{name} bfloat16 +bt-ahead", dict(hq=hq, hkv=hkv, d=d, dtype=torch.bfloat16,
                                                            tile=dict(LONG_PREFILL_TILE, bt_ahead=True))))
            # queries inside an image see its later tokens (reach), after a compacted span
            cfgs.append((f"{name} spans +reach", dict(hq=hq, hkv=hkv, d=d, dtype=torch.bfloat16, spans=True,
                                                      reach=True)))
    cfgs.append(("gemma3 softcap+window", dict(hq=4, hkv=1, d=256, dtype=torch.bfloat16, softcap=30.0,
                                              window=512)))
    # a Gemma 3 VLM's sliding-window layers (8 q / 4 kv heads, d = 256) over an image attended both ways
    cfgs.append(("gemma3-vlm window +reach", dict(hq=8, hkv=4, d=256, dtype=torch.bfloat16, window=1024, reach=True)))
    # Gemma 4's global layers (8 q / 2 kv heads of 512), after a compacted span
    cfgs.append(("gemma4-global spans", dict(hq=8, hkv=2, d=512, dtype=torch.bfloat16, spans=True)))
    return cfgs


def _arg_name(jit, key) -> str:
    """A compiled kernel's constant is keyed by its argument's index path (a tuple) or name: the name."""
    i = key[0] if isinstance(key, tuple) else key
    return jit.arg_names[i] if isinstance(i, int) and i < len(jit.arg_names) else str(i)


# Launch options no served path takes yet (SpanLaunch fields and the exact kernel's tile option that ``make
# gpu-check`` times against the defaults on the device): their labels' marks. ``--experiments-arch`` compiles them for
# those targets only (CI: the device's Triton and sm_90, where they are measured; every other target compiles what
# the backend launches).
# (the two-block read is no option: tiles straddle two blocks at ranks whose rows per block are no multiple of the
# tile, so it compiles everywhere)
EXPERIMENTS = ("+prefetch", "+warp-split", "+bt-ahead", "+merge-heads", "+pdl")


def is_experiment(label: str) -> bool:
    return any(mark in label for mark in EXPERIMENTS)


def compile_all(archs, full: bool = True, only: str | None = None, experiments_archs=None) -> list[Compiled]:
    """``experiments_archs``: the targets the :data:`EXPERIMENTS` launches compile for (None: every target)."""
    jobs = [(f"decode {lbl}", lambda c=c: run_decode(c)) for lbl, c in decode_configs(full)
            if not c.get("static_only")]
    jobs += [(f"decode {lbl}", lambda c=c: run_decode(c)) for lbl, c in static_variant(decode_configs(full), full)]
    jobs += [(f"thresholds sample={n}", lambda n=n: run_thresholds(n)) for n in ((256, 1024, 2048, 4096, 0) if full
                                                                                 else (1024, 0))]
    jobs += [(f"exact {lbl}", lambda c=c: run_exact(c)) for lbl, c in exact_configs(full)]
    jobs += [(f"prefill {lbl}", lambda c=c: run_prefill(c)) for lbl, c in decode_configs(full)
             if "+importance" not in lbl and "+score" not in lbl and "+full" not in lbl and "window" not in lbl]
    jobs += [(f"pack {str(dt)[6:]} {cdt}", lambda dt=dt, cdt=cdt: run_pack(dt, cdt))
             for dt in (torch.bfloat16, torch.float16) for cdt in ("model", "fp8_e4m3")]
    jobs += [(f"compaction W={w} R={r}", lambda w=w, r=r: run_gram_orth(w, r))
             for w, r in ((512, 64), (1024, 64), (256, 24))]
    jobs += [(f"compaction finish W={w} R={r} {cdt}{' +threshold' if th else ''}",
              lambda w=w, r=r, cdt=cdt, th=th: run_gram_finish(w, r, cdt, th))
             for w, r, cdt, th in ((512, 64, "model", None), (512, 64, "fp8_e4m3", 0.99), (256, 24, "model", None),
                                 (512, 96, "model", None))]
    jobs += [(f"compaction products W={w} R={r} {str(dt)[6:]} {cdt}{' +threshold' if th else ''} {prec}",
              lambda w=w, r=r, dt=dt, cdt=cdt, th=th, prec=prec: run_gram_products(w, r, dt, cdt, th, prec))
             for w, r, dt, cdt, th, prec in ((512, 64, torch.bfloat16, "model", None, "tf32"),
                                             (512, 64, torch.bfloat16, "fp8_e4m3", 0.99, "tf32"),
                                             (512, 64, torch.float32, "model", None, "tf32"))
             + (((1024, 64, torch.bfloat16, "model", None, "tf32"), (256, 24, torch.float16, "model", None, "tf32"),
                 (512, 64, torch.bfloat16, "model", None, "tf32x3"), (512, 64, torch.bfloat16, "model", None, "ieee"))
                if full else ())]
    if only:
        jobs = [j for j in jobs if only in j[0]]
    results: list[Compiled] = []
    seen = set()
    for arch in archs:
        for label, fn in jobs:
            if experiments_archs is not None and arch not in experiments_archs and is_experiment(label):
                continue
            if "kv-fp8" in label and arch < 89:  # FP8 pages need native e4m3 (AttentionPack refuses them below)
                continue
            if "fp8_e4m3 +full +warp-split" in label and arch < 89:  # (refused there: software e4m3 spills)
                continue
            if "+pdl" in label and arch < 90:  # (griddepcontrol: sm_90 and later; refused below)
                continue
            if label.startswith("exact") and "+bt-ahead" in label and arch < 90:  # (the long-prefill tile is sm_90's)
                continue
            sink: list = []
            with compile_only(arch, sink, label):
                try:
                    fn()
                except Exception as e:  # host-side failure of the wrapper itself
                    results.append(Compiled("<wrapper>", arch, label, {}, 0, 0, error=f"{type(e).__name__}: {e}"))
                    continue
            for jit, k, cfg, err in sink:
                name = jit.fn.__name__
                if k is None:
                    results.append(Compiled(name, arch, cfg, {}, 0, 0, error=err))
                    continue
                key = (arch, name, k.hash if hasattr(k, "hash") else id(k))
                if key in seen:
                    continue
                seen.add(key)
                consts = {_arg_name(jit, kk): (str(v) if not isinstance(v, (int, float, bool)) else v)
                          for kk, v in getattr(k.src, "constants", {}).items()} if hasattr(k, "src") else {}
                r = Compiled(name, arch, cfg, consts, k.metadata.num_warps, k.metadata.num_stages)
                try:
                    r.regs, r.spill_bytes = ptxas_stats(k.asm["ptx"], arch)
                    r.loads = ptx_loads(k.asm["ptx"])
                    r.gdc = ptx_gdc(k.asm["ptx"])
                    r.async_depth = ptx_async_depth(k.asm["ptx"])
                    if name in LOOP_KERNELS:
                        r.loops = [n for n, _ in sass_loops(sass_of(k.asm["cubin"], arch))]
                        r.loop_instr = r.loops[0] if r.loops else 0
                except Exception as e:
                    r.error = f"{type(e).__name__}: {e}"
                results.append(r)
    return results


# Known register spills, reported but not failing: (kernel, arch, text in the config label, Triton version
# prefix) -> why.
KNOWN_SPILLS = {
    ("_exact_attention_kernel", 80, "tiny", "3.6"):
        "sm_80, the tests' tiny model (d = 64) with spans: the masked and unmasked key loops spill 24 bytes at the "
        "cap of 128 registers",
    ("_exact_attention_kernel", 80, "tiny", "3.9"):
        "sm_80, the tests' tiny model (d = 64) with spans: the masked and unmasked key loops spill 16 bytes at the "
        "cap of 128 registers",
    ("_span_attn_kernel", 80, "model +importance static", "3.9"):
        "sm_80 with Triton 3.9 only, the two-level read with the importance update in the static launch (not the "
        "GPU default, which reads at full rank): 12-16 bytes at 255 registers, coming and going with unrelated "
        "changes of the tile's address arithmetic",
    ("_exact_attention_kernel", 90, "llava-1.5-7b", "3.6"):
        "Triton 3.6 only, MHA (one query head per kv head) with spans: ptxas spills 24 bytes at 80 registers",
    ("_exact_attention_kernel", 80, "qwen3-vl-8b", "3.9"):
        "sm_80 with Triton 3.9 only (3.6 and sm_90: none), Qwen3-VL-8B's 4 q heads a kv head with spans: 16 bytes "
        "at 168 registers",
}


def _known(r: "Compiled") -> str:
    return next((why for (k, a, cfg, ver), why in KNOWN_SPILLS.items()
                 if k == r.kernel and a == r.arch and cfg in r.config and triton.__version__.startswith(ver)), "")


def resident_warps(regs: int, num_warps: int) -> int:
    """Warps of one kernel resident per SM from its registers alone (65536 per SM, allocated per warp in units
    of 256: 8 per thread)."""
    per_warp = -(-max(regs, 1) // 8) * 8 * 32
    return (65536 // (per_warp * num_warps)) * num_warps


def failures(results: list[Compiled], min_warps: int) -> list[str]:
    bad = []
    for r in results:
        if not r.error and (why := _known(r)):
            r.known = why
            print(f"known: sm_{r.arch} {r.kernel} [{r.config}]: {r.regs} registers, {r.spill_bytes} spill bytes: "
                  f"{why}")
            continue
        if r.error:
            bad.append(f"sm_{r.arch} {r.kernel} [{r.config}]: {r.error.splitlines()[0][:300]}")
        elif r.spill_bytes > 0 or (r.kernel in DECODE_KERNELS and resident_warps(r.regs, r.num_warps) < min_warps
                                   and "pre-rope" not in r.config and not r.config.startswith("prefill")):
            bad.append(f"sm_{r.arch} {r.kernel} [{r.config}]: {r.regs} registers x {r.num_warps} warps "
                       f"({resident_warps(r.regs, r.num_warps)} warps resident per SM, at least {min_warps}), "
                       f"{r.spill_bytes} spill bytes (none allowed)")
    return bad


def table(results: list[Compiled]) -> str:
    rows = [f"{'arch':6} {'kernel':26} {'regs':>4} {'spill':>5} {'warps':>5} {'loop':>5}  "
            f"{'global loads (bits: count)':34} config"]
    for r in results:
        loads = " ".join(f"{b}:{n}" for b, n in r.loads.items())
        loop = str(r.loop_instr) if r.loop_instr >= 0 else ""
        rows.append(f"sm_{r.arch:<3} {r.kernel:26} {r.regs:>4} {r.spill_bytes:>5} {r.num_warps:>5} {loop:>5}  {loads:34} "
                    f"{r.config}{'  ERROR ' + r.error.splitlines()[0][:120] if r.error else ''}")
    return "\n".join(rows)


def _compile_targets(archs, full: bool, only, opts: dict, experiments_archs=None) -> list[Compiled]:
    """compile_all with the --opt overrides applied (in this process: a worker of --jobs sets its own)."""
    EXACT_TILE.update({k[5:]: v for k, v in opts.items() if k.startswith("tile_")})
    KERNEL_OPTS.update({k: v for k, v in opts.items() if not k.startswith("tile_")})
    return compile_all(archs, full=full, only=only, experiments_archs=experiments_archs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--quick", action="store_true", help="one model geometry and dtype (the CI subset per arch)")
    ap.add_argument("--only", help="only jobs whose label contains this text")
    ap.add_argument("--min-warps", type=int, default=8,
                    help="warps of a decode kernel resident per SM from its registers, at least (latency hiding)")
    ap.add_argument("--experiments-arch", type=int, nargs="*", default=None,
                    help="targets the launch options no served path takes yet compile for (default: every --arch; "
                         "none given: no target)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--opt", action="append", default=[],
                    help="span launch field, e.g. block_t=64 (SpanLaunch); tile_<name>=v: the exact kernel's, "
                         "e.g. tile_rows=128")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes compiling side by side, one target each (default: one per target, at most the "
                         "CPU count; ptxas is single-threaded)")
    a = ap.parse_args(argv)
    opts = {k: int(v) for k, v in (o.split("=") for o in a.opt)}
    t0 = time.time()
    jobs = max(1, min(a.jobs or os.cpu_count() or 1, len(a.arch)))
    if jobs == 1:
        res = _compile_targets(a.arch, not a.quick, a.only, opts, a.experiments_arch)
    else:  # one target a process (the results are deduplicated per target, so nothing is compiled twice)
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_compile_targets, [[arch] for arch in a.arch], [not a.quick] * len(a.arch),
                                  [a.only] * len(a.arch), [opts] * len(a.arch),
                                  [a.experiments_arch] * len(a.arch)))
        res = [r for part in parts for r in part]
    print(table(res))
    bad = failures(res, a.min_warps)
    print(f"\n{len(res)} kernels compiled for sm_{'/sm_'.join(map(str, a.arch))} with Triton {triton.__version__} "
          f"in {time.time() - t0:.0f} s; {len(bad)} failures")
    for b in bad:
        print("FAIL", b)
    if a.json:
        from benchmarks.common import write_json

        write_json({"triton": triton.__version__, "torch": torch.__version__, "min_resident_warps": a.min_warps,
                    "experiments_archs": a.experiments_arch, "experiment_marks": EXPERIMENTS,
                    "kernels": [r.__dict__ for r in res], "failures": bad}, a.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
