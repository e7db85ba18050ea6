"""Quality at equal bytes per token: AttentionPack vs KV-cache quantisation, Gemma 3 270M, CPU.

One command (CPU, offline ``vllm.LLM``, bfloat16, eager, block size 32; 23 runs of 1.5-4 min on 2 cores)::

    python benchmarks/quality_gemma.py                       # every row, writes benchmarks/results/
    python benchmarks/quality_gemma.py --plan-only           # the ranks and bytes only (no model runs)
    python benchmarks/quality_gemma.py --rows exact,cpu_attn_fp8,ap4x --max-tokens 16

The prompts, answers and metrics are those of ``benchmarks/fidelity_gemma.py`` (six prompts of
1,500-2,000 tokens; ``build_tasks``, ``answer_ok``; ``ap_vllm.tools.eval``'s ``generate`` /
``compare``). Every row runs the same greedy decoding and is compared with the **exact** row
(AttentionPack with ``enabled: false``, the model's bf16 KV): mean / max next-token KL over the top-5
logprobs, token agreement, answers right. The rows (``ROWS``: one line each):

* ``exact``: the reference. ``cpu_attn``: vLLM's own CPU backend (CPU_ATTN, ``kv_cache_dtype
  auto``), which should agree with ``exact`` token for token. ``cpu_attn_fp8``: CPU_ATTN with
  ``kv_cache_dtype="fp8"`` (e4m3, one scale per tensor), served.
* ``int8_offline`` / ``int4_offline``: vLLM 0.32's ``int8_per_token_head`` / ``int4_per_token_head``
  formats (CPU_ATTN does not serve them), applied offline by
  :mod:`ap_vllm.tools.testing.kv_quant` (quantise -> dequantise every K/V the exact backend writes):
  ``_all`` = every layer (what ``--kv-cache-dtype`` does), ``_global`` = only the three
  global-attention layers (the layers AttentionPack compacts).
* ``ap<N>x...``: AttentionPack (``compact_text``) with ``key_rank = value_rank = R``, R solved per row
  so that the stored bytes per span token reach N-fold compression of the exact bf16 KV (the largest
  R whose bytes are <= exact / N; where no rank gets there, the largest R among those of the fewest
  bytes: one 32-byte sector per coefficient row, R = 32 / coefficient bytes). Suffixes: ``_pre`` keys compacted before RoPE,
  ``_fp8`` FP8 coefficients, ``_full`` no two-level read (``importance_fraction: 1.0``), ``_div2``
  ``low_rank_divisor: 2``. Rows that resolve to the same configuration run once.

Bytes per span token (per compacted layer, K and V together; model dtype bytes eb = 2, W = Hkv*d =
256, block size bs = 32, one block BB = 2*bs*W*eb bytes). The span tokens are the text-span
candidates of the plan (``ap_vllm.core.spans``: prompt tokens after the 4 sink tokens and before
the 128 newest), the same tokens for every row. Exact: E = 2*W*eb = 1,024 B. For AttentionPack,
summed over the spans s of all prompts (each span's plan from ``plan_spans``, its layout from
``ap_vllm.core.paged_layout.SpanLayout``)::

    bytes / span token = sum_s [ storage_blocks_s * BB + (T_s - inner_blocks_s * bs) * E ] / sum_s T_s

i.e. the blocks the compact form occupies (bases (R_k + R_v) * W * eb amortised over the span,
coefficient rows padded to 32-byte sectors, FP8 per-token scales 2 * 4 B, importance 4 B, and every
partly used block counted whole) plus the span tokens that stay exact in the span's edge blocks
(shared with exact text). A span whose compact form would not free a block stays exact (E per token).
``--kv-cache-dtype fp8``: W * 1 * 2 = 512 B (per-tensor scales: none per token).
``int8_per_token_head``: 2 * Hkv * (d + 4) = 520 B; ``int4_per_token_head``: 2 * Hkv * (d/2 + 4) =
264 B (values + float32 scales; the 4-bit zero point lives in the scale). Ratio = E / bytes.

Bytes read per step differ from bytes stored: a decode step reads a span's values at full rank for
the ``importance_fraction`` f most important tokens and at R_v // ``low_rank_divisor`` for the rest,
so the value bytes read per span token and step are ``cb * (f * R_v + (1 - f) * (R_v // divisor))``
(cb = coefficient bytes; keys are read at full rank). The JSON also has the sector-granular total
(keys, values, scales, importance, bases amortised over the span). Each AttentionPack run also counts
the share of span tokens its decode steps actually read at full rank (``ap_vllm.backend.read_counts``):
the table's "V read" is then ``cb * (share * R_v + (1 - share) * R_v // divisor)`` with that share
(the EMA's share sits near f; score selection's follows the attention).

The ``exact`` row (AttentionPack in exact mode) is the baseline so that every row uses the same
block size; ``cpu_attn`` checks that it equals vLLM's own backend. Only the global-attention layers
(5, 11, 17 of 18) are compacted; the sliding-window layers (window 512) stay exact in bf16.
VLLM_ENABLE_V1_MULTIPROCESSING=0 (set here) keeps vLLM's engine in this process so the offline
quantiser can patch it; the JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from ap_vllm.backend.read_counts import READ_COUNTS_ENV, read_share  # noqa: E402
from ap_vllm.config import parse_config  # noqa: E402
from ap_vllm.tools import eval as ap_eval  # noqa: E402
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402

TARGETS = (2, 4, 8, 16)
BASE_AP = {"compact_text": True, "text_two_level": True,  # the two-level read on text spans where a row asks for it
           "value_selection": "ema"}  # (selected by the EMA, as when the table was measured)
BLOCK_SIZE = 32  # CPU_ATTN needs a multiple of 32; every row uses the same
DTYPE = "bfloat16"
SECTOR = 32
FP8_DTYPE = "fp8_e4m3"
LONGER_SPANS = (4096, 16384, 65536)  # the same ranks' ratio on one span of this many tokens (JSON only)


@dataclass(frozen=True)
class Row:
    """One line of the table. ``method``: exact | cpu_attn | offline | attentionpack."""

    name: str
    method: str
    label: str
    target: Optional[int] = None  # attentionpack: compression target of the stored bytes (rank solved)
    ap: dict[str, Any] = field(default_factory=dict)  # attentionpack: fields besides the ranks
    kv_cache_dtype: str = "auto"  # cpu_attn
    quant: Optional[str] = None  # offline: a format of ap_vllm.tools.testing.kv_quant
    scope: str = "all"  # offline: "all" layers or the "global" ones


_TAGS = {("key_space", "pre_rope"): "_pre", ("coefficient_dtype", FP8_DTYPE): "_fp8",
         ("importance_fraction", 1.0): "_full", ("low_rank_divisor", 2): "_div2", ("value_selection", "score"): "_score"}


def AP(target: int, **fields: Any) -> Row:
    """An AttentionPack row at ``target``-fold compression; ``fields``: other AttentionPack fields."""
    name = f"ap{target}x" + "".join(_TAGS.get((k, v), f"_{k}-{v}") for k, v in fields.items())
    parts = ["pre-RoPE" if fields.get("key_space") == "pre_rope" else "post-RoPE",
             "fp8 coeff" if fields.get("coefficient_dtype") == FP8_DTYPE else "bf16 coeff"]
    f, div = fields.get("importance_fraction", 0.25), fields.get("low_rank_divisor", 4)
    if fields.get("value_selection") == "score":
        parts.append(f"two-level by this step's score >= 1/256, R/{div}")
    else:
        parts.append("full-rank read" if f >= 1.0 else f"two-level {f:g}, R/{div}")
    parts += [f"{k}={v}" for k, v in fields.items()
              if k not in ("key_space", "coefficient_dtype", "importance_fraction", "low_rank_divisor",
                           "value_selection")]
    return Row(name, "attentionpack", "AttentionPack " + ", ".join(parts), target=target, ap=dict(fields))


# ----------------------------------------------------------------------------- the rows (one line each)
ROWS: list[Row] = [
    Row("exact", "exact", "exact bf16 (AttentionPack enabled=false)"),
    Row("cpu_attn", "cpu_attn", "vLLM CPU_ATTN, kv auto (bf16)"),
    Row("cpu_attn_fp8", "cpu_attn", "vLLM CPU_ATTN, kv fp8 e4m3 (served)", kv_cache_dtype="fp8"),
    Row("int8_offline_all", "offline", "int8_per_token_head, all layers (offline)", quant="int8_per_token_head"),
    Row("int4_offline_all", "offline", "int4_per_token_head, all layers (offline)", quant="int4_per_token_head"),
    Row("int4_offline_global", "offline", "int4_per_token_head, global layers (offline)",
        quant="int4_per_token_head", scope="global"),
    # AttentionPack at equal stored bytes: post-RoPE keys, bf16 / FP8 coefficients, default two-level read
    *[AP(t) for t in TARGETS],
    *[AP(t, coefficient_dtype=FP8_DTYPE) for t in TARGETS],
    # pre-RoPE keys
    *[AP(t, key_space="pre_rope") for t in TARGETS],
    *[AP(t, key_space="pre_rope", coefficient_dtype=FP8_DTYPE) for t in TARGETS],
    # the two-level read: without it (every token at full rank), and with R/2 for the less important tokens
    *[AP(t, importance_fraction=1.0) for t in TARGETS],
    *[AP(t, low_rank_divisor=2) for t in TARGETS],
    Row("int8_offline_global", "offline", "int8_per_token_head, global layers (offline)",
        quant="int8_per_token_head", scope="global"),
]

# Value selection by this step's attention (values read at full rank for the tokens this step attends
# to, instead of by the EMA importance; the default for visual spans, value_selection "auto")
VALUE_SELECTION_ROWS: list[Row] = [
    *[AP(t, value_selection="score") for t in TARGETS],
    *[AP(t, value_selection="score", coefficient_dtype=FP8_DTYPE) for t in TARGETS],
]

ALL_ROWS: list[Row] = ROWS + VALUE_SELECTION_ROWS

# Run these first (a sweep stopped early keeps the most informative rows); the rest follow in table order.
RUN_FIRST = ("exact", "cpu_attn", "cpu_attn_fp8", "int8_offline_all", "int4_offline_all", "ap2x", "ap4x", "ap8x",
             "ap4x_fp8", "ap4x_pre", "ap4x_full", "ap4x_div2", "int4_offline_global", "ap2x_fp8", "ap8x_pre",
             "ap2x_pre")


# ----------------------------------------------------------------------------- bytes per token
@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_kv_heads: int
    head_size: int
    elem_bytes: int = 2  # model dtype (bf16)
    block_size: int = BLOCK_SIZE

    @property
    def width(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def exact_bytes(self) -> int:
        """E: one token's K and V in one layer, model dtype."""
        return 2 * self.width * self.elem_bytes

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.exact_bytes


def _torch_dtype(elem_bytes: int):
    import torch

    return {2: torch.bfloat16, 4: torch.float32}[elem_bytes]


def span_candidates(cfg, geo: Geometry, n_prompt: int) -> list[tuple[int, int]]:
    """(start, tokens) of every span candidate of a prompt, after the sink tokens: the span tokens."""
    from ap_vllm.core.spans import candidate_spans, split_span

    out = []
    for s, length, _ in candidate_spans(cfg, (), n_prompt):
        for a, n in split_span(s, length, cfg.chunk_tokens, geo.block_size):
            start = max(a, cfg.sink_tokens)
            if a + n - start > 0:
                out.append((start, a + n - start))
    return out


def ap_bytes(ap: dict[str, Any], rank: int, prompt_tokens: Sequence[int], geo: Geometry) -> dict[str, Any]:
    """Stored bytes per span token of AttentionPack at ``key_rank = value_rank = rank`` over the prompts,
    from the plan of each prompt (see the module docstring), with its components."""
    from ap_vllm.config import parse_config
    from ap_vllm.core.spans import KVGeometry, plan_spans, span_layout

    cfg = parse_config({**BASE_AP, **ap, "enabled": True, "key_rank": rank, "value_rank": rank})
    kgeo = KVGeometry(geo.block_size, geo.num_kv_heads, geo.head_size, _torch_dtype(geo.elem_bytes), geo.num_layers)
    E, BB, bs = geo.exact_bytes, geo.block_bytes, geo.block_size
    parts = dict(basis=0, coefficients=0, sector_padding=0, scales=0, importance=0, block_rounding=0,
                 edge_exact=0, not_compacted=0)
    tokens = compacted = storage = freed = num_spans = 0
    for n in prompt_tokens:
        span_tokens = sum(t for _, t in span_candidates(cfg, geo, n))
        plans = plan_spans(cfg, kgeo, (), n)
        tokens += span_tokens
        parts["not_compacted"] += (span_tokens - sum(p.num_tokens for p in plans)) * E
        for p in plans:
            lay = span_layout(cfg, kgeo, p.num_tokens, 0, "text")
            sec = lay.sections
            parts["basis"] += sum(sec[k].num_rows * sec[k].src_row_bytes for k in ("basis_k", "basis_v"))
            parts["coefficients"] += sum(sec[k].num_rows * sec[k].src_row_bytes for k in ("coeff_k", "coeff_v"))
            parts["sector_padding"] += sum(s.num_rows * (s.row_bytes - s.src_row_bytes) for s in sec.values())
            parts["scales"] += sum(sec[k].num_rows * sec[k].row_bytes for k in ("scale_k", "scale_v") if k in sec)
            parts["importance"] += sec["importance"].num_rows * sec["importance"].row_bytes
            parts["block_rounding"] += p.storage_blocks * BB - sum(s.num_rows * s.row_bytes for s in sec.values())
            parts["edge_exact"] += (p.num_tokens - p.inner_blocks * bs) * E
            compacted += p.num_tokens
            storage += p.storage_blocks
            freed += p.num_freed_blocks
            num_spans += 1
    total = sum(parts.values())
    fp8 = cfg.coefficient_dtype == FP8_DTYPE
    cb = 1 if fp8 else geo.elem_bytes
    f, div = cfg.importance_fraction, cfg.low_rank_divisor
    low = rank // div
    v_read = cb * (f * rank + (1 - f) * low) if f < 1.0 else cb * rank
    rk_read = -(-rank * cb // SECTOR) * SECTOR  # keys at full rank (two_level_keys off)
    v_sectors = (-(-rank * cb // SECTOR) * SECTOR) if f >= 1.0 else (
        f * -(-rank * cb // SECTOR) * SECTOR + (1 - f) * -(-low * cb // SECTOR) * SECTOR)
    basis_read = 2 * rank * geo.width * geo.elem_bytes * num_spans  # each span's bases, once per step
    read_total = (compacted * (rk_read + v_sectors + (8 if fp8 else 0) + 4) + basis_read
                  + parts["edge_exact"] + parts["not_compacted"]) / tokens if tokens else 0.0
    return {
        "rank": rank, "span_tokens": tokens, "tokens_compacted": compacted, "storage_blocks": storage,
        "blocks_freed": freed, "bytes_total": total, "bytes_per_token": total / tokens if tokens else float("nan"),
        "ratio": E * tokens / total if total else float("nan"),
        "components_per_token": {k: v / tokens if tokens else 0.0 for k, v in parts.items()},
        "value_read_bytes_per_token_step": v_read,
        "read_bytes_per_token_step": read_total,
    }


def solve_rank(ap: dict[str, Any], target: float, prompt_tokens: Sequence[int], geo: Geometry) -> dict[str, Any]:
    """The largest rank whose stored bytes per span token are <= exact / target (``reachable``). Where no
    rank gets there: the largest rank among those of the fewest bytes (block rounding makes the bytes a
    step function of the rank, e.g. every R <= 16 costs the same in bf16: one 32-byte sector per
    coefficient row, one block per basis)."""
    budget = geo.exact_bytes / target
    table: list[dict[str, Any]] = []
    for r in range(1, geo.width + 1):
        b = ap_bytes(ap, r, prompt_tokens, geo)
        if b["tokens_compacted"] != b["span_tokens"]:
            break  # a span stays exact from here on (its form no longer frees a block)
        if table and b["bytes_per_token"] > 1.5 * max(budget, table[0]["bytes_per_token"]):
            break  # the bytes grow with the rank: nothing larger is a candidate
        table.append(b)
    fits = [b for b in table if b["bytes_per_token"] <= budget]
    if fits:
        return {**max(fits, key=lambda b: b["rank"]), "target": target, "reachable": True}
    least = min(b["bytes_per_token"] for b in table)
    best = max((b for b in table if b["bytes_per_token"] == least), key=lambda b: b["rank"])
    return {**best, "target": target, "reachable": False}


def fixed_bytes(row: Row, geo: Geometry) -> dict[str, Any]:
    """Stored and value-read bytes per token (per layer, K and V) of the non-AttentionPack rows."""
    from ap_vllm.tools.testing.kv_quant import bytes_per_token_head

    if row.method == "offline":
        b = geo.num_kv_heads * bytes_per_token_head(row.quant, geo.head_size)
    elif row.method == "cpu_attn" and row.kv_cache_dtype.startswith("fp8"):
        b = 2 * geo.width  # one byte per element; per-tensor scales
    else:
        b = geo.exact_bytes
    return {"bytes_per_token": b, "ratio": geo.exact_bytes / b, "value_read_bytes_per_token_step": b / 2,
            "read_bytes_per_token_step": b}


def resolve(rows: Sequence[Row], prompt_tokens: Sequence[int], geo: Geometry) -> dict[str, dict[str, Any]]:
    """Per row: its bytes, and for AttentionPack rows the solved rank and the AttentionPack config."""
    out: dict[str, dict[str, Any]] = {}
    seen: dict[tuple, str] = {}
    for row in rows:
        if row.method != "attentionpack":
            out[row.name] = fixed_bytes(row, geo)
            continue
        bytes_ = solve_rank(row.ap, row.target, prompt_tokens, geo)
        cfg = {**BASE_AP, **row.ap, "enabled": True, "key_rank": bytes_["rank"], "value_rank": bytes_["rank"]}
        key = tuple(sorted(cfg.items()))
        longer = {n: ap_bytes(row.ap, bytes_["rank"], [n + cfg.get("text_recent_window", 128)], geo)
                  for n in LONGER_SPANS}
        out[row.name] = {**bytes_, "attentionpack": cfg, "same_as": seen.get(key),
                         "ratio_at_longer_spans": {str(n): round(b["ratio"], 3) for n, b in longer.items()}}
        seen.setdefault(key, row.name)
    return out


# ----------------------------------------------------------------------------- running
def run_row(model: str, row: Row, items, *, max_tokens: int, logprobs: int, llm_kwargs: dict[str, Any],
            ap_cfg: Optional[dict[str, Any]]):
    kwargs = dict(llm_kwargs)
    backend = None
    ctx: Any = contextlib.nullcontext()
    if row.method == "exact":
        spec = ap_eval.RunSpec(row.name, None, {**BASE_AP, "enabled": False})
    elif row.method == "cpu_attn":
        spec, backend = ap_eval.RunSpec(row.name, None, None), "CPU_ATTN"
        kwargs["kv_cache_dtype"] = row.kv_cache_dtype
    elif row.method == "offline":
        from ap_vllm.tools.testing.kv_quant import offline_kv_quant

        spec = ap_eval.RunSpec(row.name, None, {**BASE_AP, "enabled": False})
        ctx = offline_kv_quant(row.quant, row.scope)
    else:
        spec = ap_eval.RunSpec(row.name, ap_cfg["key_rank"], ap_cfg)
    with ctx:
        return ap_eval.generate(model, spec, items, max_tokens=max_tokens, logprobs=logprobs, llm_kwargs=kwargs,
                                baseline_backend=backend)


def _f(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(report: dict[str, Any]) -> str:
    """The markdown table of the runs so far (and the planned rows not yet run)."""
    head = ("row", "method", "K/V rank", "stored B / span tok", "vs exact bf16", "V read B / tok / step",
            "KL mean", "KL max", "token agree", "answers")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["rows"].items():
        rank = "-" if r.get("rank") is None else f"{r['rank']}/{r['rank']}"
        tgt = ""
        if r.get("target") is not None:
            tgt = f" (target {r['target']}x{'' if r['reachable'] else ', not reachable'})"
        run = report["runs"].get(name) or report["runs"].get(r.get("same_as") or "")
        if name == "exact" and run:
            q = ("0", "0", "1.000", f"{run['answers_right']}/{run['answers_total']}")
        elif run and "kl_mean" in run:
            q = (f"{run['kl_mean']:.2e}", f"{run['kl_max']:.2e}", f"{run['token_agreement']:.3f}",
                 f"{run['answers_right']}/{run['answers_total']}")
        else:
            q = ("not run",) * 4
        v_read = _f(r["value_read_bytes_per_token_step"], ".1f")
        if run and run.get("value_reads"):  # measured share (the planned figure assumes importance_fraction)
            v_read = _f(run["value_reads"]["value_read_bytes_per_token_step"], ".1f") + \
                f" (share {run['value_reads']['share']:.3f})"
        lines.append("| " + " | ".join((name, r["label"] + tgt, rank, _f(r["bytes_per_token"], ".1f"),
                                         _f(r["ratio"], ".2f") + "x", v_read, *q)) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="all", help=f"comma-separated row names or 'all': {','.join(r.name for r in ALL_ROWS)}")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--plan-only", action="store_true", help="print the ranks and bytes; run no model")
    ap.add_argument("--out", default=str(RESULTS_DIR / "quality_gemma.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in --out whose configuration is unchanged; run the others")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the offline quantiser patches the engine in-process
    from transformers import AutoTokenizer

    from ap_vllm.tools.testing.gemma_weights import prepare_gemma3_270m
    from benchmarks.fidelity_gemma import answer_ok, build_tasks

    model = str(prepare_gemma3_270m())
    dims = ap_eval.model_dims(model)
    geo = Geometry(dims.num_layers, dims.num_kv_heads, dims.head_size)
    tasks = build_tasks(AutoTokenizer.from_pretrained(model))
    prompt_tokens = [t["prompt_tokens"] for t in tasks]
    by_name = {r.name: r for r in ALL_ROWS}
    names = [r.name for r in ALL_ROWS] if args.rows == "all" else [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {','.join(by_name)}")
    if "exact" not in names:
        names.insert(0, "exact")  # the reference of every comparison
    rows = [by_name[n] for n in names]
    resolved = resolve(rows, prompt_tokens, geo)
    # max_num_seqs 8 (>= the 6 prompts: the same schedule as vLLM's default 256) keeps the sampler's buffers small
    llm_kwargs = {"dtype": DTYPE, "max_model_len": 4096, "enforce_eager": True, "seed": 0, "block_size": BLOCK_SIZE,
                  "max_num_seqs": 8}
    out = Path(args.out)
    report: dict[str, Any] = {
        "benchmark": "benchmarks/quality_gemma.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_dir": model,
        "model": {"num_layers": dims.num_layers, "num_kv_heads": dims.num_kv_heads, "head_size": dims.head_size,
                  "kv_width": dims.width, "compacted_layers": "global-attention layers only (5, 11, 17)"},
        "settings": {"max_tokens": args.max_tokens, "logprobs": args.logprobs, "block_size": BLOCK_SIZE,
                     "dtype": DTYPE, "llm_kwargs": llm_kwargs, "base_attentionpack": BASE_AP,
                     "reference": "exact: AttentionPack exact mode (enabled=false), bf16 KV",
                     "bytes": "per span token and compacted layer, K and V, all overheads (module docstring)",
                     "exact_bytes_per_token": geo.exact_bytes,
                     "kl": "KL(exact || row) over exact's top-k tokens, renormalised; steps up to and including "
                           "the first divergence"},
        "tasks": tasks,
        "rows": {r.name: {"label": r.label, "method": r.method, "target": r.target,
                          **{k: v for k, v in resolved[r.name].items()}} for r in rows},
        "runs": {},
    }
    print(table(report), file=sys.stderr, flush=True)
    if args.plan_only:
        return 0
    items = [ap_eval.Item(None, prompt=t["prompt"]) for t in tasks]
    base = None
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        keys = ("max_tokens", "logprobs", "block_size", "dtype", "base_attentionpack")  # max_num_seqs >= 6: same schedule
        same = (all(old.get("settings", {}).get(k) == report["settings"][k] for k in keys)
                and old.get("tasks") == report["tasks"])
        for name, entry in (old.get("runs") or {}).items() if same else ():
            if name in report["rows"] and "error" not in entry and all(
                    old["rows"].get(name, {}).get(k) == report["rows"][name].get(k)
                    for k in ("attentionpack", "rank", "bytes_per_token")):
                report["runs"][name] = {**entry, "resumed": True,
                                        "llm_kwargs": entry.get("llm_kwargs", old["settings"].get("llm_kwargs"))}
        if "generations" not in report["runs"].get("exact", {}):
            report["runs"] = {}  # no reference to compare new runs with: start over
        else:
            base = [ap_eval.Generation(g["token_ids"], [{int(t): lp for t, lp in st.items()} for st in g["logprobs"]],
                                       g["text"]) for g in report["runs"]["exact"]["generations"]]
        print(f"[quality] resumed: {', '.join(report['runs']) or 'nothing'}", file=sys.stderr, flush=True)
    order = [n for n in RUN_FIRST if n in names] + [n for n in names if n not in RUN_FIRST]
    counts_dir = Path(tempfile.mkdtemp(prefix="ap_read_counts_"))
    t_all = time.perf_counter()
    for row in (by_name[n] for n in order):
        res = resolved[row.name]
        if row.name in report["runs"]:
            continue
        if res.get("same_as"):
            print(f"[quality] {row.name}: same configuration as {res['same_as']}", file=sys.stderr, flush=True)
            continue
        print(f"[quality] {row.name}: {row.label} {res.get('attentionpack', '')}", file=sys.stderr, flush=True)
        counts = str(counts_dir / row.name)
        if row.method == "attentionpack":  # count the tokens its decode steps read at full rank
            os.environ[READ_COUNTS_ENV] = counts
        try:
            gens, secs = run_row(model, row, items, max_tokens=args.max_tokens, logprobs=args.logprobs,
                                 llm_kwargs=llm_kwargs, ap_cfg=res.get("attentionpack"))
        except Exception as exc:  # keep the sweep going; the row says why it is missing
            print(f"[quality] {row.name} failed: {exc!r}", file=sys.stderr, flush=True)
            report["runs"][row.name] = {"error": repr(exc)}
            write_json(report, out)
            continue
        finally:
            os.environ.pop(READ_COUNTS_ENV, None)
        entry: dict[str, Any] = {"seconds": secs, "llm_kwargs": llm_kwargs}
        reads = read_share(counts) if row.method == "attentionpack" else None
        if reads is not None:  # measured: value bytes read per span token and step at the measured share
            cfg = parse_config(res["attentionpack"])
            cb = 1 if cfg.coefficient_dtype == FP8_DTYPE else geo.elem_bytes
            rank, low = res["rank"], res["rank"] // cfg.low_rank_divisor
            reads["value_read_bytes_per_token_step"] = cb * (reads["share"] * rank + (1 - reads["share"]) * low)
            entry["value_reads"] = reads
        if row.name == "exact":
            base = gens
            entry["outputs"] = [g.text for g in gens]
            entry["generations"] = [{"token_ids": g.token_ids, "logprobs": g.logprobs, "text": g.text} for g in gens]
            texts = entry["outputs"]
        else:
            entry.update(ap_eval.compare(base, gens, args.logprobs))
            texts = [it["text"] for it in entry["items"]]
        entry["answers"] = [answer_ok(t, x) for t, x in zip(tasks, texts)]
        graded = [a for a in entry["answers"] if a is not None]
        entry["answers_right"], entry["answers_total"] = sum(graded), len(graded)
        report["runs"][row.name] = entry
        report["total_seconds"] = time.perf_counter() - t_all
        report["table_markdown"] = table(report)
        write_json(report, out)  # after every run: a stopped sweep keeps what it measured
        print(f"[quality] {row.name}: {secs:.0f} s ({report['total_seconds']:.0f} s so far)", file=sys.stderr,
              flush=True)
    print(table(report))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
