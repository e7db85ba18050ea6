"""Model-level decode throughput: AttentionPack against exact paged KV at the same KV budget (GPU).

    python benchmarks/gpu_throughput.py                 # GPU: Qwen2.5-VL-7B's text decoder, 40 GiB of KV (~1 min)
    python benchmarks/gpu_throughput.py --smoke         # CPU: a tiny decoder under the Triton interpreter

The model is the text decoder of Qwen2.5-VL-7B (28 layers, hidden 3584, 28 q / 4 kv heads, d = 128, SwiGLU MLP
18944, vocabulary 152064) with bf16 random weights; both sides run the same GEMMs, norms and RoPE, and differ
only in the KV cache and the attention kernel of each layer:

* **exact**: every token's K/V in vLLM's paged layout, read by vLLM's own Triton kernel
  (``triton_unified_attention``, what vLLM's Triton backend runs; from the bundle) or, where vLLM does not
  import, by our exact paged decode kernel (the row says which);
* **attentionpack**: the image span of each request compacted (rank R in the paged layout of
  :mod:`ap_vllm.core.paged_layout`, its freed blocks not allocated), text tokens exact, read by
  :func:`ap_vllm.core.paged_decode.paged_mixed_decode` as the served path calls it (static launch, the
  previous step's lse as normaliser; values read at full rank by this step's scores, the default
  ``value_selection``, and every token at full rank, ``full``, side by side; ``--value-selection ema``: by
  importance, with the fused EMA update).

Workload: requests of 16 text tokens + a 4096-token image span + 48 text tokens, each decoding 256 tokens.
Each side holds as many requests as its KV budget fits, every block of a request's final length allocated
up front (what vLLM's admission needs), and decodes them together: one step (all layers, the lm_head and
the cache writes) is captured as a CUDA graph and replayed; the sequences sit at the middle of their 256
decode tokens and grow by one token per replay. Reported per side: requests resident, KV bytes per request,
step time, output tokens/s; and the prefill of one request through the model next to the compaction of
its span in every layer (``ap_vllm.core.compaction.compact_spans``: every layer's together in calls of at most
``COMPACTION_CALL_TOKENS`` span tokens, as the backend compacts a step's spans, and one call per layer).

The JSON goes to ``benchmarks/results/gpu_throughput_<device>.json`` (rewritten after every row).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
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

from ap_vllm.core.compaction import COMPACTION_CALL_TOKENS, CompactedSpan, compact_spans  # noqa: E402
from ap_vllm.core.lowrank_attention import importance_threshold  # noqa: E402
from ap_vllm.core.paged_decode import build_decode_plan, paged_mixed_decode  # noqa: E402
from ap_vllm.core.paged_layout import PagedSpan, SpanLayout, pack_span, storage_blocks  # noqa: E402
from ap_vllm.kernels.lowrank_decode import SpanLaunch  # noqa: E402
from benchmarks import decode_bench as db  # noqa: E402
from benchmarks.common import (RESULTS_DIR, ResultRows, guarded, kernel_split, step_split,  # noqa: E402
                               vllm_platform_for_the_bundle, write_json)

vllm_platform_for_the_bundle()  # (before vLLM is imported: vLLM's kernels are timed here)


@dataclass(frozen=True)
class Model:
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Workload:
    text_before: int
    span: int
    text_after: int
    decode: int
    page: int
    rank: int
    budget_bytes: int

    @property
    def prompt(self) -> int:
        return self.text_before + self.span + self.text_after

    @property
    def final_len(self) -> int:
        return self.prompt + self.decode


QWEN25_VL_7B = Model(28, 3584, 28, 4, 128, 18944, 152064)
TINY = Model(2, 128, 4, 2, 32, 256, 512)
FULL_LOAD = Workload(16, 4096, 48, 256, 16, 64, 40 << 30)
TINY_LOAD = Workload(16, 256, 16, 32, 16, 8, 2 << 20)


class Decoder:
    """The decoder's weights (random, bf16) and one decode step for B rows; ``attend(i, q, k, v)`` is the layer's
    attention (it writes this step's k, v into its cache and returns [B, Hq, d])."""

    def __init__(self, m: Model, dtype: torch.dtype, dev, max_positions: int):
        self.m, self.dtype, self.dev = m, dtype, dev
        g = torch.Generator(device=dev).manual_seed(0)

        def w(*shape):
            return torch.empty(*shape, dtype=dtype, device=dev).normal_(0.0, 0.02, generator=g)

        qkv = (m.q_heads + 2 * m.kv_heads) * m.head_size
        self.layers = [dict(ln1=torch.ones(m.hidden, dtype=dtype, device=dev), wqkv=w(m.hidden, qkv),
                            bqkv=w(qkv), wo=w(m.q_heads * m.head_size, m.hidden),
                            ln2=torch.ones(m.hidden, dtype=dtype, device=dev), wgu=w(m.hidden, 2 * m.intermediate),
                            wdown=w(m.intermediate, m.hidden)) for _ in range(m.layers)]
        self.norm = torch.ones(m.hidden, dtype=dtype, device=dev)
        self.lm_head = w(m.hidden, m.vocab)
        half = m.head_size // 2
        inv = 1.0 / (1e6 ** (torch.arange(half, device=dev, dtype=torch.float32) / half))
        ang = torch.arange(max_positions, device=dev, dtype=torch.float32)[:, None] * inv[None]
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Neox-style rotary embedding of x [N, H, d] at positions pos [N]."""
        c, s = self.cos[pos][:, None], self.sin[pos][:, None]
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """x [N, hidden] at positions pos [N] through every layer; returns the final hidden states."""
        m = self.m
        nq, nk = m.q_heads * m.head_size, m.kv_heads * m.head_size
        for i, lw in enumerate(self.layers):
            h = F.rms_norm(x, (m.hidden,), lw["ln1"], 1e-6)
            qkv = torch.addmm(lw["bqkv"], h, lw["wqkv"])
            q = self.rope(qkv[:, :nq].view(-1, m.q_heads, m.head_size), pos)
            k = self.rope(qkv[:, nq:nq + nk].view(-1, m.kv_heads, m.head_size), pos)
            v = qkv[:, nq + nk:].view(-1, m.kv_heads, m.head_size)
            o = attend(i, q, k, v)
            x = x + o.reshape(-1, nq).to(x.dtype) @ lw["wo"]
            h = F.rms_norm(x, (m.hidden,), lw["ln2"], 1e-6)
            gate, up = (h @ lw["wgu"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ lw["wdown"]
        return F.rms_norm(x, (m.hidden,), self.norm, 1e-6)

    def decode_step(self, x: torch.Tensor, seq_lens: torch.Tensor, attend) -> torch.Tensor:
        """One token per row: seq_lens grows by one, the new token sits at seq_lens - 1; returns the greedy ids."""
        seq_lens.add_(1)
        h = self.forward(x, (seq_lens - 1).long(), attend)
        return (h @ self.lm_head).argmax(-1)


def _write_kv(cache: torch.Tensor, bt: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              page: int) -> None:
    """k, v [N, Hkv, d] into the paged cache at positions pos [N] of rows 0..N-1 (no host sync)."""
    rows = torch.arange(pos.shape[0], device=pos.device)
    blk = bt[rows, pos // page].long()
    off = pos % page
    cache[blk, 0, off] = k.to(cache.dtype)
    cache[blk, 1, off] = v.to(cache.dtype)


# --------------------------------------------------------------------------------------
# the two sides' caches
# --------------------------------------------------------------------------------------
def exact_blocks(wl: Workload) -> int:
    return math.ceil(wl.final_len / wl.page)


def span_layout(m: Model, wl: Workload, dtype: torch.dtype) -> SpanLayout:
    return SpanLayout(wl.span, wl.rank, wl.rank, m.kv_heads, m.head_size, wl.page, dtype)


def ap_blocks(m: Model, wl: Workload, dtype: torch.dtype) -> tuple[int, list[int]]:
    """Blocks a request holds with its span compacted, and the logical blocks held (the others are freed)."""
    lay = span_layout(m, wl, dtype)
    first, count = storage_blocks(wl.text_before, wl.span, wl.page)
    if lay.num_blocks > count:
        raise ValueError(f"the compact form ({lay.num_blocks} blocks) does not fit the span's {count} blocks")
    held = [i for i in range(exact_blocks(wl)) if not (first + lay.num_blocks <= i < first + count)]
    return len(held), held


def block_bytes(m: Model, wl: Workload, dtype: torch.dtype) -> int:
    return 2 * wl.page * m.kv_heads * m.head_size * torch.empty((), dtype=dtype).element_size()


def resident(m: Model, wl: Workload, dtype: torch.dtype, blocks_per_request: int) -> int:
    """Requests whose blocks (all layers) fit the KV budget."""
    return wl.budget_bytes // (m.layers * blocks_per_request * block_bytes(m, wl, dtype))


def _block_table(bsz: int, held: list[int], nblk: int, dev) -> tuple[torch.Tensor, int]:
    """Rows of ``held`` logical blocks each, mapped to a random permutation of bsz * len(held) physical blocks
    (vLLM's allocations end up scattered); logical blocks not held point at block 0 (never read)."""
    total = bsz * len(held)
    perm = torch.randperm(total, device=dev, dtype=torch.int64).to(torch.int32)
    bt = torch.zeros(bsz, nblk, dtype=torch.int32, device=dev)
    bt[:, torch.tensor(held, device=dev)] = perm.view(bsz, len(held))
    return bt, total


class ExactSide:
    """Every token exact; attention by vLLM's unified_attention (``backend='vllm'``) or our exact kernel."""

    def __init__(self, m: Model, wl: Workload, dtype, dev, bsz: int, backend: str):
        self.m, self.wl, self.backend, self.dev = m, wl, backend, dev
        nblk = exact_blocks(wl)
        self.bt, total = _block_table(bsz, list(range(nblk)), nblk, dev)
        self.caches = [torch.empty(total, 2, wl.page, m.kv_heads, m.head_size, dtype=dtype, device=dev).normal_()
                       for _ in range(m.layers)]
        self.seq_lens = torch.full((bsz,), wl.prompt + wl.decode // 2, dtype=torch.int32, device=dev)
        self.scale = m.head_size ** -0.5
        self.plan = build_decode_plan([], bsz, device=dev)
        self.out = torch.empty(bsz, m.q_heads, m.head_size, dtype=dtype, device=dev)
        self.cu_q = torch.arange(bsz + 1, dtype=torch.int32, device=dev)
        if backend == "vllm":
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention
            self._unified = unified_attention

    def attend(self, i: int, q, k, v):
        cache = self.caches[i]
        _write_kv(cache, self.bt, (self.seq_lens - 1).long(), k, v, self.wl.page)
        if self.backend == "vllm":
            self._unified(q=q, k=cache[:, 0], v=cache[:, 1], out=self.out, cu_seqlens_q=self.cu_q, max_seqlen_q=1,
                          seqused_k=self.seq_lens, max_seqlen_k=self.wl.final_len, softmax_scale=self.scale,
                          causal=True, window_size=(-1, -1), block_table=self.bt, softcap=0, q_descale=None,
                          k_descale=None, v_descale=None)
            return self.out
        o, _ = paged_mixed_decode(q, cache, self.bt, self.seq_lens, self.plan, self.scale, kernel="triton",
                                  max_seq_len=self.wl.final_len)
        return o


class SpanSide:
    """Image spans compacted (their freed blocks never allocated), text exact; the served decode call."""

    def __init__(self, m: Model, wl: Workload, dtype, dev, bsz: int, launch: SpanLaunch, selection: str):
        self.m, self.wl, self.dev, self.launch, self.selection = m, wl, dev, launch, selection
        lay = span_layout(m, wl, dtype)
        nheld, held = ap_blocks(m, wl, dtype)
        nblk = exact_blocks(wl)
        self.bt, total = _block_table(bsz, held, nblk, dev)
        first, _ = storage_blocks(wl.text_before, wl.span, wl.page)
        # one compact form (random coefficients, orthonormal bases), packed into every request's storage blocks
        gen = torch.Generator(device="cpu").manual_seed(1)
        w = m.kv_heads * m.head_size
        bk, _ = torch.linalg.qr(torch.randn(w, wl.rank, generator=gen))
        bv, _ = torch.linalg.qr(torch.randn(w, wl.rank, generator=gen))
        imp = torch.rand(wl.span, generator=gen)
        cs = CompactedSpan((torch.randn(wl.span, wl.rank, generator=gen) / wl.rank ** 0.5).to(dtype),
                           (bk.T * w ** 0.5).to(dtype).contiguous(), torch.randn(wl.span, wl.rank,
                                                                                 generator=gen).to(dtype),
                           bv.T.to(dtype).contiguous(), m.kv_heads, m.head_size, start=wl.text_before, importance=imp)
        fields = ("coeff_k", "basis_k", "coeff_v", "basis_v", "num_kv_heads", "head_size", "start", "importance")
        cs = CompactedSpan(**{f: (v.to(dev) if isinstance(v, torch.Tensor) else v)
                              for f, v in ((f, getattr(cs, f)) for f in fields)})
        template = torch.zeros(lay.num_blocks, 2, wl.page, m.kv_heads, m.head_size, dtype=dtype, device=dev)
        pack_span(template, torch.arange(lay.num_blocks, device=dev), cs, lay, kernel=True)
        storage = self.bt[:, first:first + lay.num_blocks].long()  # [B, nb] physical blocks of the compact forms
        self.caches = []
        for _ in range(m.layers):
            c = torch.empty(total, 2, wl.page, m.kv_heads, m.head_size, dtype=dtype, device=dev).normal_()
            for r0 in range(0, bsz, 64):  # (in slices: the repeated template stays small)
                ids = storage[r0:r0 + 64].reshape(-1)
                c[ids] = template.repeat(ids.numel() // lay.num_blocks, 1, 1, 1, 1)
            self.caches.append(c)
        thr = None if selection == "full" else importance_threshold(imp, 0.25)  # ('full': no threshold)
        spans = [PagedSpan(seq=b, start=wl.text_before, layout=lay, threshold=thr) for b in range(bsz)]
        self.plan = build_decode_plan(spans, bsz, device=dev)
        self.num_spans = torch.tensor([bsz], dtype=torch.int32, device=dev)
        self.seq_lens = torch.full((bsz,), wl.prompt + wl.decode // 2, dtype=torch.int32, device=dev)
        self.scale = m.head_size ** -0.5
        self.workspace: dict = {}
        self.lse = [torch.full((bsz, m.q_heads), 8.0, device=dev) for _ in range(m.layers)]
        self.out = torch.empty(bsz, m.q_heads, m.head_size, dtype=torch.float32, device=dev)

    def attend(self, i: int, q, k, v):
        cache = self.caches[i]
        _write_kv(cache, self.bt, (self.seq_lens - 1).long(), k, v, self.wl.page)
        sel = {"ema": dict(importance_ema=0.25, lse_ref=self.lse[i]), "full": {},
               "score": dict(score_threshold=1 / 256, lse_ref=self.lse[i])}[self.selection]
        o, _ = paged_mixed_decode(q, cache, self.bt, self.seq_lens, self.plan, self.scale, kernel="triton",
                                  max_seq_len=self.wl.final_len, num_spans=self.num_spans,
                                  workspace=self.workspace, out=self.out, lse_out=self.lse[i], launch=self.launch,
                                  **sel)
        return o


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------
def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model: Decoder, side, bsz: int, steps: int, dev) -> float:
    """Seconds per decode step: CUDA-graph replay (GPU) or plain calls (CPU)."""
    x = torch.randn(bsz, model.m.hidden, device=dev).to(model.dtype) * 0.1
    step = lambda: model.decode_step(x, side.seq_lens, side.attend)  # noqa: E731
    start = side.seq_lens.clone()
    if dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps
    graph = db.capture_graph(step, warmup=2)
    side.seq_lens.copy_(start)
    graph.replay()  # (first replay off the clock)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(steps):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    del graph
    return a.elapsed_time(b) / 1e3 / steps


def run_side(kind: str, m: Model, wl: Workload, dtype, dev, model: Decoder, steps: int, launch: SpanLaunch,
             max_rows: int, selection: str = "score") -> dict:
    if kind == "attentionpack":
        per_req = ap_blocks(m, wl, dtype)[0]
    else:
        per_req = exact_blocks(wl)
    fit = resident(m, wl, dtype, per_req)
    bsz = min(fit, max_rows)
    if bsz < 1:
        return dict(side=kind, skipped=f"no request fits {wl.budget_bytes} bytes of KV")
    backend = ""
    if kind == "attentionpack":
        side = SpanSide(m, wl, dtype, dev, bsz, launch, selection)
        backend = {"score": "ap_vllm paged_mixed_decode (static launch, values selected by score: the served "
                            "default)",
                   "ema": "ap_vllm paged_mixed_decode (static launch, two-level read by importance, EMA update)",
                   "full": "ap_vllm paged_mixed_decode (static launch, every token at full rank: value_selection "
                           "full)"}[selection]
    else:
        backend = "vllm"
        try:
            if SMOKE:
                raise ImportError("a CPU build of vLLM turns its Triton kernels off")
            import vllm.v1.attention.ops.triton_unified_attention  # noqa: F401
        except Exception as e:
            backend = "ours"
            why = f"{type(e).__name__}: {e}"[:200]
        side = ExactSide(m, wl, dtype, dev, bsz, backend)
        backend = ("vLLM triton_unified_attention" if backend == "vllm" else
                   f"ap_vllm exact paged decode kernel (vLLM's kernel unavailable: {why})")
    _sync(dev)
    start = side.seq_lens.clone()
    t = time_steps(model, side, bsz, steps, dev)
    side.seq_lens.copy_(start)  # where the GPU time of a step goes (eager steps: the same kernels as the graph's)
    x = torch.randn(bsz, model.m.hidden, device=dev).to(model.dtype) * 0.1
    split = step_split(kernel_split(lambda: model.decode_step(x, side.seq_lens, side.attend), dev, 3))
    kv_per_req = m.layers * per_req * block_bytes(m, wl, dtype)
    del side
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return dict(side=kind, attention=backend, selection=selection if kind == "attentionpack" else None,
                requests_fit=fit, requests_resident=bsz,
                kv_bytes_per_request=kv_per_req, kv_bytes_resident=bsz * kv_per_req, step_ms=t * 1e3,
                output_tokens_per_s=bsz / t,
                span_launch=launch.overrides() if kind == "attentionpack" else None, step_gpu_split=split)


def _second_call_seconds(fn, dev) -> float:
    """Wall seconds of one call of ``fn`` after a first (compiles, allocator), as a served step runs it."""
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def time_prefill_and_compaction(m: Model, wl: Workload, dtype, dev, model: Decoder) -> dict:
    """One request's prompt through the model (exact prefill attention into a paged cache, as the backend runs a
    prompt's first chunk: K/V gathered from the pages, SDPA), then the compaction of its span in every layer:
    what admitting one image costs each side."""
    from ap_vllm.core.exact_rows import exact_rows_attention, sdpa_row_attention
    from ap_vllm.core.paged_layout import gather_span_kv

    n = wl.prompt
    nblk = math.ceil(n / wl.page)
    bt = torch.arange(nblk, dtype=torch.int32, device=dev)[None]
    caches = [torch.zeros(nblk, 2, wl.page, m.kv_heads, m.head_size, dtype=dtype, device=dev)
              for _ in range(m.layers)]
    pos = torch.arange(n, device=dev)

    def attend(i, q, k, v):
        caches[i][pos // wl.page, 0, pos % wl.page] = k
        caches[i][pos // wl.page, 1, pos % wl.page] = v
        out = torch.empty_like(q)
        exact_rows_attention(sdpa_row_attention, q, caches[i], bt, [0, n], [n], [0], m.head_size ** -0.5, None, out)
        return out

    x = torch.randn(n, m.hidden, device=dev).to(dtype) * 0.1
    t_prefill = _second_call_seconds(lambda: model.forward(x, pos, attend), dev)
    spans = [gather_span_kv(c, bt[0], wl.text_before, wl.text_before + wl.span) for c in caches]

    from ap_vllm.kernels.compaction import device_compaction

    opts = device_compaction()

    def compact():
        for k, v in spans:
            compact_spans([k.to(dtype)], [v.to(dtype)], wl.rank, wl.rank, **opts)

    t_per_layer = _second_call_seconds(compact, dev)
    # as the backend compacts a step's spans: every layer's together, in calls of at most COMPACTION_CALL_TOKENS
    per_call = max(1, COMPACTION_CALL_TOKENS // wl.span)

    def compact_batched():
        for i in range(0, len(spans), per_call):
            part = spans[i:i + per_call]
            compact_spans([k.to(dtype) for k, _ in part], [v.to(dtype) for _, v in part], wl.rank, wl.rank, **opts)

    t_compact = _second_call_seconds(compact_batched, dev)
    return dict(prompt_tokens=n, span_tokens=wl.span, rank=wl.rank, prefill_ms=t_prefill * 1e3,
                compaction_ms=t_compact * 1e3, compaction_per_layer_ms=t_compact * 1e3 / m.layers,
                compaction_over_prefill=t_compact / t_prefill, target=0.10, layers_per_call=per_call,
                one_layer_per_call_ms=t_per_layer * 1e3, one_layer_per_call_over_prefill=t_per_layer / t_prefill)


def measured_span_launch(path: Path, dev, selection: str) -> Optional[SpanLaunch]:
    """The fastest span launch configuration for ``selection`` in gpu_check's JSON for this device (its
    ``span_configs`` rows), or None when there is none."""
    import json

    if not path.is_file():
        return None
    from benchmarks.gpu_check import _on, best_span_launch

    rows = json.loads(path.read_text()).get("rows", [])
    if not any(r.get("section") == "span_configs" and r.get("selection") == selection for r in rows):
        return None
    return _on(dev, best_span_launch(rows, selection))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny decoder on the CPU (Triton interpreter)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/gpu_throughput_<device>.json)")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per side")
    ap.add_argument("--budget-gib", type=float, help="KV budget (default 40 GiB; smoke: 2 MiB)")
    ap.add_argument("--max-rows", type=int, default=4096, help="cap on the rows of one decode step")
    ap.add_argument("--value-selection", choices=("score", "ema", "full"), nargs="+", default=["score", "full"],
                    help="how the AttentionPack side picks the values read at full rank (score: the served default; "
                         "full: every token; one AttentionPack row each, side by side)")
    ap.add_argument("--span-opt", action="append", default=[],
                    help="span launch field (SpanLaunch) for the AttentionPack side, e.g. warps=8 (default: the "
                         "fastest of gpu_check's span_configs in its JSON of this device, when there is one)")
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if SMOKE else "cuda")
    m, wl = (TINY, TINY_LOAD) if SMOKE else (QWEN25_VL_7B, FULL_LOAD)
    if args.budget_gib:
        wl = Workload(**{**wl.__dict__, "budget_bytes": int(args.budget_gib * (1 << 30))})
    dtype = torch.float32 if SMOKE else torch.bfloat16
    opts = {}
    for o in args.span_opt:
        k, v = o.split("=")
        opts[k] = v.lower() == "true" if v.lower() in ("true", "false") else int(v)
    launch = SpanLaunch(**opts)
    steps = 2 if SMOKE else args.steps
    name = "smoke" if SMOKE else torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS_DIR / f"gpu_throughput_{name}.json"
    header = dict(device=name if not SMOKE else (platform.processor() or "cpu"), smoke=SMOKE, torch=torch.__version__,
                  triton=__import__("triton").__version__, model=m.__dict__, workload=wl.__dict__,
                  dtype=str(dtype).split(".")[-1], steps=steps)
    rows = ResultRows(out, header)
    t_start = time.time()
    model = Decoder(m, dtype, dev, wl.final_len + 8)
    e = guarded(rows, "decode", run_side, "exact", m, wl, dtype, dev, model, steps, launch, args.max_rows)
    for sel in dict.fromkeys(args.value_selection):
        a = guarded(rows, "decode", run_side, "attentionpack", m, wl, dtype, dev, model, steps, launch,
                    args.max_rows, sel)
        measured = None if args.span_opt else measured_span_launch(RESULTS_DIR / f"gpu_check_{name}.json", dev, sel)
        if measured is not None and measured != launch:  # the span launch gpu_check measured fastest here
            best = guarded(rows, "decode", run_side, "attentionpack", m, wl, dtype, dev, model, steps, measured,
                           args.max_rows, sel)
            if best.get("output_tokens_per_s", 0) > a.get("output_tokens_per_s", 0):
                a = best
        if "output_tokens_per_s" in e and "output_tokens_per_s" in a:
            guarded(rows, "summary", lambda a=a, sel=sel: dict(
                value_selection=sel, requests_ratio=a["requests_resident"] / e["requests_resident"],
                step_time_ratio=a["step_ms"] / e["step_ms"],
                throughput_ratio=a["output_tokens_per_s"] / e["output_tokens_per_s"], target=1.5, goal=3.0))
    guarded(rows, "admission", time_prefill_and_compaction, m, wl, dtype, dev, model)
    write_json(dict(header, complete=True, seconds=round(time.time() - t_start, 1), rows=list(rows)), out)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    bad = [r for r in rows if "error" in r]
    print(f"wrote {out} in {time.time() - t_start:.0f} s; {len(bad)} errors")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
