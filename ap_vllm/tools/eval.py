"""Quality harness: AttentionPack at several ranks against vLLM's default backend, offline.

For a local model directory and a set of (image, question) items, runs greedy decoding through
``vllm.LLM`` once with vLLM's default attention backend (the baseline), once with AttentionPack in
exact mode (``enabled: false``) and once per rank R with ``key_rank = value_rank = R``, and reports
for each AttentionPack run, against the baseline:

* **token agreement**: generated tokens equal to the baseline's at the same position, over
  ``max(len(run), len(baseline))`` per item, summed over items (micro average); and the fraction
  of items whose whole output is identical;
* **first divergence**: the first position where the outputs differ (per item; None if identical);
* **mean per-step KL**: KL(baseline || run) of the next-token distributions restricted to the
  baseline's top-k tokens (``SamplingParams(logprobs=k)``, renormalised over those k tokens; a
  token missing from the run's top-k gets the run's smallest returned logprob, an upper bound).
  Only steps whose context is still identical count (up to and including the first divergence).

Writes JSON and a PNG plot (rank vs agreement and KL)::

    ap-vllm eval --model-dir /models/Qwen2.5-VL-7B-Instruct --data questions.jsonl \\
        --ranks 16,32,64,128 --max-tokens 64 --out-dir eval_results/

``--data``: a JSONL file of ``{"image": path, "question": str}`` (paths relative to the file) and/or
text-only ``{"prompt": str}`` items (completion-style: the prompt goes to the model as it is, no chat
template, for base models), or a folder: its ``questions.jsonl`` if present, otherwise every image
in it with the question from a ``<image stem>.txt`` beside it or ``--question``.

``--attentionpack-config JSON`` (alias ``--ap-config``): other AttentionPack fields for every
AttentionPack run, e.g. ``{"compact_text": true, "importance_fraction": 1.0}``. The harness sets
``enabled``, ``key_rank`` and ``value_rank`` itself. ``--exact-baseline`` makes the baseline
AttentionPack in exact mode (``enabled: false``) instead of vLLM's default backend (e.g. for a
``--block-size`` the default CPU backend does not support); the separate exact run is then dropped.

Engines are created and shut down one at a time (vLLM's engine runs in a separate process).
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import mimetypes
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_QUESTION = "Describe the image."


class EvalError(ValueError):
    """Invalid input to the harness (data, ranks, options)."""


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Item:
    image: Optional[str]  # absolute path; None for a text-only item
    question: str = ""
    prompt: Optional[str] = None  # text-only item: completion-style prompt (no chat template)

    @property
    def is_text(self) -> bool:
        return self.prompt is not None

    def describe(self) -> dict[str, Any]:
        return {"prompt": self.prompt} if self.is_text else {"image": self.image, "question": self.question}

    def messages(self) -> list[dict[str, Any]]:
        if self.is_text:
            raise EvalError("a text-only item has no chat messages (it is sent as a plain prompt)")
        mime = mimetypes.guess_type(self.image)[0] or "image/png"
        data = base64.b64encode(Path(self.image).read_bytes()).decode("ascii")
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
            {"type": "text", "text": self.question}]}]


def _read_jsonl(path: Path) -> list[Item]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and "prompt" in rec and "image" not in rec:
                if not isinstance(rec["prompt"], str) or not rec["prompt"]:
                    raise TypeError("prompt must be a non-empty string")
                items.append(Item(None, prompt=rec["prompt"]))
                continue
            image, question = rec["image"], rec["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EvalError(f"{path}:{n}: expected {{\"image\": path, \"question\": str}} or "
                            f"{{\"prompt\": str}}, got {line[:120]!r} ({exc})") from None
        img = Path(image)
        img = img if img.is_absolute() else path.parent / img
        if not img.is_file():
            raise EvalError(f"{path}:{n}: image {image!r} not found ({img})")
        items.append(Item(str(img.resolve()), str(question)))
    return items


def load_items(data: str | os.PathLike, question: str = DEFAULT_QUESTION, limit: Optional[int] = None) -> list[Item]:
    """Items from a JSONL file or a folder (see the module docstring)."""
    path = Path(data)
    if path.is_file():
        items = _read_jsonl(path)
    elif path.is_dir():
        if (path / "questions.jsonl").is_file():
            items = _read_jsonl(path / "questions.jsonl")
        else:
            items = []
            for img in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS):
                side = img.with_suffix(".txt")
                q = side.read_text().strip() if side.is_file() else question
                items.append(Item(str(img.resolve()), q))
    else:
        raise EvalError(f"--data {data}: no such file or folder")
    if not items:
        raise EvalError(f"--data {data}: no (image, question) items (or {{'prompt'}} items) found")
    return items[:limit] if limit else items


# ----------------------------------------------------------------------------- model / ranks
@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    num_kv_heads: int
    head_size: int

    @property
    def width(self) -> int:
        return self.num_kv_heads * self.head_size


def model_dims(model_dir: str | os.PathLike) -> ModelDims:
    """Layers, KV heads and head size of the language model, from config.json."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise EvalError(f"{model_dir}: no config.json (a local Hugging Face model directory is needed)")
    cfg = json.loads(cfg_path.read_text())
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(cfg.get(key), dict):
            cfg = {**cfg, **cfg[key]}
            break
    try:
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        layers = int(cfg["num_hidden_layers"])
    except KeyError as exc:
        raise EvalError(f"{cfg_path}: cannot read the language model's {exc.args[0]}") from None
    return ModelDims(layers, kv, head)


def parse_ranks(spec: str | Sequence[int] | None) -> list[int]:
    if spec is None or spec == "":
        return []
    if isinstance(spec, str):
        try:
            ranks = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise EvalError(f"--ranks {spec!r}: give comma-separated integers, e.g. 16,32,64") from None
    else:
        ranks = [int(r) for r in spec]
    return sorted(dict.fromkeys(ranks))


def validate_ranks(ranks: Sequence[int], dims: ModelDims, model: str = "this model") -> None:
    """Every rank must be in [1, num_kv_heads * head_size]."""
    bad = [r for r in ranks if not 1 <= r <= dims.width]
    if bad:
        raise EvalError(
            f"rank(s) {bad} not allowed for {model}: ranks must be in [1, {dims.width}] "
            f"(num_kv_heads*head_size = {dims.num_kv_heads}*{dims.head_size})")


@dataclass(frozen=True)
class RunSpec:
    name: str
    rank: Optional[int]  # None for baseline / exact
    attentionpack: Optional[dict[str, Any]]  # None = vLLM's default backend


def run_specs(ranks: Sequence[int], dims: ModelDims, extra: Optional[dict[str, Any]] = None,
              include_exact: bool = True, exact_baseline: bool = False) -> list[RunSpec]:
    """baseline, exact, then one run per rank; every AttentionPack config is validated here.

    ``exact_baseline``: the baseline is AttentionPack with ``enabled: false`` (no separate exact run).
    """
    from ap_vllm.config import parse_config

    validate_ranks(ranks, dims)
    extra = dict(extra or {})
    for k in ("key_rank", "value_rank", "enabled"):
        if k in extra:
            raise EvalError(f"--attentionpack-config must not set {k!r}: the harness sets it per run")
    if exact_baseline:
        specs = [RunSpec("baseline", None, {**extra, "enabled": False})]
    else:
        specs = [RunSpec("baseline", None, None)]
        if include_exact:
            specs.append(RunSpec("exact", None, {**extra, "enabled": False}))
    specs += [RunSpec(f"rank_{r}", r, {**extra, "enabled": True, "key_rank": r, "value_rank": r}) for r in ranks]
    for s in specs:
        if s.attentionpack is not None:
            parse_config(s.attentionpack).validate_for_model(dims.num_layers, dims.num_kv_heads, dims.head_size)
    return specs


# ----------------------------------------------------------------------------- generation
@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[dict[int, float]]  # per step: token id -> logprob (top-k + the chosen token)
    text: str


def generate(model_dir: str, spec: RunSpec, items: Sequence[Item], *, max_tokens: int, logprobs: int,
             llm_kwargs: dict[str, Any], baseline_backend: Optional[str] = None) -> tuple[list[Generation], float]:
    """One engine: create, generate greedily for all items, shut down. Returns outputs and seconds."""
    from vllm import LLM, SamplingParams

    from ap_vllm.plugin import register

    register()
    kwargs = dict(llm_kwargs)
    if spec.attentionpack is not None:
        kwargs["attention_config"] = {"backend": "attentionpack"}
        kwargs["additional_config"] = {"attentionpack": spec.attentionpack}
    elif baseline_backend:
        kwargs["attention_config"] = {"backend": baseline_backend}
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, **kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, seed=0)
        # Image items go through the chat template; text-only items are plain completions.
        chat_idx = [i for i, it in enumerate(items) if not it.is_text]
        text_idx = [i for i, it in enumerate(items) if it.is_text]
        outs: list[Any] = [None] * len(items)
        if chat_idx:
            for i, o in zip(chat_idx, llm.chat([items[i].messages() for i in chat_idx], params, use_tqdm=False)):
                outs[i] = o
        if text_idx:
            for i, o in zip(text_idx, llm.generate([items[i].prompt for i in text_idx], params, use_tqdm=False)):
                outs[i] = o
        gens = []
        for o in outs:
            c = o.outputs[0]
            steps = [{int(t): float(lp.logprob) for t, lp in d.items()} for d in (c.logprobs or [])]
            gens.append(Generation(list(c.token_ids), steps, c.text))
    finally:
        shutdown_llm(llm)
        del llm
        gc.collect()
    return gens, time.perf_counter() - t0


def shutdown_llm(llm) -> None:
    """Stop the engine process of a ``vllm.LLM`` (vLLM 0.32/0.33 have no ``LLM.shutdown``)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    for obj in (llm, engine, core):
        fn = getattr(obj, "shutdown", None)
        if callable(fn):
            try:
                fn()
            except Exception as exc:  # keep going: the next engine must still start
                print(f"[eval] engine shutdown: {exc!r}", file=sys.stderr)
            return


# ----------------------------------------------------------------------------- metrics
def step_kl(base: dict[int, float], run: dict[int, float], k: int) -> float:
    """KL(base || run) over the baseline's top-k tokens, both renormalised over that set."""
    top = sorted(base.items(), key=lambda kv: kv[1], reverse=True)[:k]
    if not top or not run:
        return float("nan")
    floor = min(run.values())
    p = [math.exp(lp) for _, lp in top]
    q = [math.exp(run.get(t, floor)) for t, _ in top]
    sp, sq = sum(p), sum(q)
    return max(0.0, sum((pi / sp) * (math.log(pi / sp) - math.log(qi / sq)) for pi, qi in zip(p, q) if pi > 0))


def compare(base: Sequence[Generation], run: Sequence[Generation], k: int) -> dict[str, Any]:
    """Agreement, first divergence and per-step KL of ``run`` against ``base`` (same items)."""
    matches = total = identical = 0
    first_div: list[Optional[int]] = []
    kls: list[float] = []
    per_item = []
    for b, r in zip(base, run, strict=True):
        n = min(len(b.token_ids), len(r.token_ids))
        same = [b.token_ids[i] == r.token_ids[i] for i in range(n)]
        m = sum(same)
        longest = max(len(b.token_ids), len(r.token_ids))
        div = next((i for i, s in enumerate(same) if not s), None)
        if div is None and len(b.token_ids) != len(r.token_ids):
            div = n
        item_kls = [step_kl(b.logprobs[i], r.logprobs[i], k)
                    for i in range(min(n if div is None else div + 1, len(b.logprobs), len(r.logprobs)))]
        item_kls = [x for x in item_kls if not math.isnan(x)]
        matches += m
        total += longest
        identical += div is None
        first_div.append(div)
        kls += item_kls
        per_item.append({"agreement": m / longest if longest else 1.0, "first_divergence": div,
                         "kl_mean": sum(item_kls) / len(item_kls) if item_kls else None,
                         "tokens": len(r.token_ids), "text": r.text})
    diverged = [d for d in first_div if d is not None]
    return {
        "token_agreement": matches / total if total else 1.0,
        "exact_match_rate": identical / len(per_item) if per_item else 1.0,
        "first_divergence": first_div,
        "first_divergence_mean": sum(diverged) / len(diverged) if diverged else None,
        "first_divergence_min": min(diverged) if diverged else None,
        "kl_mean": sum(kls) / len(kls) if kls else 0.0,
        "kl_max": max(kls) if kls else 0.0,
        "kl_steps": len(kls),
        "items": per_item,
    }


# ----------------------------------------------------------------------------- report

def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write a result as indented JSON (parent folders created); the benchmarks share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def save_figure(fig, path: Path) -> Path:
    """Lay out, save and close a matplotlib figure (parent folders created)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

def plot(report: dict[str, Any], path: Path) -> Optional[Path]:
    """Agreement and mean KL per run (exact, then ranks ascending). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[eval] matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    runs = [(n, r) for n, r in report["runs"].items() if n != "baseline"]
    width = report["model"]["kv_width"]
    labels = [("exact\n(enabled=false)" if r["rank"] is None else f"R={r['rank']}\n({width / r['rank']:.1f}x)")
              for _, r in runs]
    x = list(range(len(runs)))
    agree = [r["token_agreement"] for _, r in runs]
    exact_match = [r["exact_match_rate"] for _, r in runs]
    floor = 1e-10
    kl = [max(r["kl_mean"], floor) for _, r in runs]
    kl_max = [max(r["kl_max"], floor) for _, r in runs]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(runs) + 4), 4.2), dpi=120)
    ax1.plot(x, agree, "o-", color="tab:blue", label="token agreement")
    ax1.plot(x, exact_match, "s--", color="tab:green", label="identical outputs")
    for xi, a in zip(x, agree):
        ax1.annotate(f"{a:.3f}", (xi, a), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax1.set_ylim(-0.02, 1.1)
    ax1.set_ylabel("fraction (vs baseline)")
    ax1.set_title("Greedy agreement with the baseline")
    ax2.plot(x, kl, "o-", color="tab:red", label="mean per-step KL")
    ax2.plot(x, kl_max, "^:", color="tab:orange", label="max per-step KL")
    ax2.set_yscale("log")
    ax2.set_ylim(floor / 2, max(max(kl_max) * 5, 1e-3))
    ax2.set_ylabel(f"KL(baseline || run), top-{report['settings']['logprobs']} (nats)")
    ax2.set_title(f"Next-token KL (values < {floor:g} drawn at {floor:g})", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xlim(-0.5, len(x) - 0.5)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel("AttentionPack run (rank, H*d/R per-token ratio)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if ax is ax1 else "upper right")
    model = Path(report["model_dir"]).name
    fig.suptitle(f"AttentionPack quality vs rank: {model}, {report['settings']['num_items']} items, "
                 f"{report['settings']['max_tokens']} tokens, H*d={width}", fontsize=10)
    return save_figure(fig, path)


def summary_table(report: dict[str, Any]) -> str:
    rows = [("run", "rank", "agreement", "identical", "first div (mean/min)", "KL mean", "KL max", "time s")]
    for name, r in report["runs"].items():
        if name == "baseline":
            rows.append((name, "-", "-", "-", "-", "-", "-", f"{r['seconds']:.1f}"))
            continue
        fd = "-" if r["first_divergence_mean"] is None else f"{r['first_divergence_mean']:.1f}/{r['first_divergence_min']}"
        rows.append((name, str(r["rank"] or "-"), f"{r['token_agreement']:.4f}", f"{r['exact_match_rate']:.3f}", fd,
                     f"{r['kl_mean']:.3e}", f"{r['kl_max']:.3e}", f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def evaluate(model_dir: str, items: Sequence[Item], ranks: Sequence[int], *, out_dir: str | os.PathLike,
             max_tokens: int = 32, logprobs: int = 5, ap_config: Optional[dict[str, Any]] = None,
             include_exact: bool = True, baseline_backend: Optional[str] = None,
             llm_kwargs: Optional[dict[str, Any]] = None, tag: str = "eval",
             exact_baseline: bool = False) -> dict[str, Any]:
    """Run every configuration, compare against the baseline, write JSON + PNG; return the report."""
    if max_tokens < 1 or logprobs < 1:
        raise EvalError("--max-tokens and --logprobs must be >= 1")
    dims = model_dims(model_dir)
    validate_ranks(ranks, dims, model=str(model_dir))
    if exact_baseline and baseline_backend:
        raise EvalError("--exact-baseline and --baseline-backend exclude each other")
    specs = run_specs(ranks, dims, ap_config, include_exact, exact_baseline)  # validated before any engine starts
    llm_kwargs = dict(llm_kwargs or {})
    outputs: dict[str, list[Generation]] = {}
    report: dict[str, Any] = {
        "harness": "ap-vllm eval",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_dir": str(model_dir),
        "model": {"num_layers": dims.num_layers, "num_kv_heads": dims.num_kv_heads, "head_size": dims.head_size,
                  "kv_width": dims.width},
        "settings": {"max_tokens": max_tokens, "logprobs": logprobs, "num_items": len(items),
                     "ranks": list(ranks), "ap_config": ap_config or {}, "baseline_backend": baseline_backend,
                     "baseline": "attentionpack exact (enabled=false)" if exact_baseline else "vLLM default backend",
                     "llm_kwargs": {k: v for k, v in llm_kwargs.items() if isinstance(v, (str, int, float, bool))},
                     "kl": "KL(baseline || run) over the baseline's top-k tokens, renormalised; steps up to "
                           "and including the first divergence"},
        "items": [it.describe() for it in items],
        "runs": {},
    }
    for spec in specs:
        print(f"[eval] {spec.name}: {'vLLM default backend' if spec.attentionpack is None else spec.attentionpack}",
              file=sys.stderr, flush=True)
        gens, secs = generate(model_dir, spec, items, max_tokens=max_tokens, logprobs=logprobs,
                              llm_kwargs=llm_kwargs, baseline_backend=baseline_backend)
        outputs[spec.name] = gens
        entry: dict[str, Any] = {"rank": spec.rank, "attentionpack": spec.attentionpack, "seconds": secs}
        if spec.name == "baseline":
            entry["outputs"] = [{"tokens": len(g.token_ids), "text": g.text} for g in gens]
        else:
            entry.update(compare(outputs["baseline"], gens, logprobs))
        report["runs"][spec.name] = entry

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{tag}.json", out / f"{tag}.png"
    report["plot"] = str(png_path) if plot(report, png_path) else None
    write_json(report, json_path)
    report["json"] = str(json_path)
    print(summary_table(report))
    print(f"\nresults: {json_path}" + (f"\nplot:    {png_path}" if report["plot"] else ""))
    return report


# ----------------------------------------------------------------------------- CLI
def build_parser(prog: str = "python -m ap_vllm.tools.eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True,
                   help="JSONL of {image, question} and/or text-only {prompt} items, or a folder of images")
    p.add_argument("--ranks", default="", help="comma-separated ranks, one AttentionPack run each (e.g. 16,32,64)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact-mode (enabled=false) run")
    p.add_argument("--attentionpack-config", "--ap-config", dest="ap_config", default=None,
                   help="other AttentionPack fields as JSON for every AttentionPack run, e.g. "
                        "'{\"compact_text\": true, \"text_min_tokens\": 256}'")
    p.add_argument("--exact-baseline", action="store_true",
                   help="baseline = AttentionPack with enabled=false instead of vLLM's default backend")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="question for images without a .txt (folder mode)")
    p.add_argument("--limit", type=int, default=None, help="use the first N items")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--logprobs", "-k", type=int, default=5, help="top-k logprobs per step for the KL")
    p.add_argument("--baseline-backend", default=None, help="baseline attention backend (default: vLLM's default)")
    p.add_argument("--out-dir", default="eval_results")
    p.add_argument("--tag", default="eval", help="file name stem of the JSON and PNG")
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--max-model-len", type=int, default=8192)
    e.add_argument("--block-size", type=int, default=None, help="KV-cache block size (tokens)")
    e.add_argument("--no-enforce-eager", action="store_true", help="allow torch.compile / CUDA graphs")
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--cpu-kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE when unset (CPU)")
    e.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m ap_vllm.tools.eval") -> int:
    from ap_vllm.config import AttentionPackConfigError

    args = build_parser(prog).parse_args(argv)
    try:
        ranks = parse_ranks(args.ranks)
        ap_config = json.loads(args.ap_config) if args.ap_config else None
        if isinstance(ap_config, dict) and "attentionpack" in ap_config:
            ap_config = ap_config["attentionpack"]
        if ap_config is not None and not isinstance(ap_config, dict):
            raise EvalError(f"--attentionpack-config must be a JSON object, got {args.ap_config!r}")
        items = load_items(args.data, args.question, args.limit)
        validate_ranks(ranks, model_dims(args.model_dir), model=args.model_dir)
    except (EvalError, json.JSONDecodeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.cpu_kv_cache_gib))
    llm_kwargs: dict[str, Any] = {"dtype": args.dtype, "max_model_len": args.max_model_len,
                                  "enforce_eager": not args.no_enforce_eager, "seed": args.seed}
    if args.gpu_memory_utilization is not None:
        llm_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.block_size is not None:
        llm_kwargs["block_size"] = args.block_size
    try:
        evaluate(args.model_dir, items, ranks, out_dir=args.out_dir, max_tokens=args.max_tokens,
                 logprobs=args.logprobs, ap_config=ap_config, include_exact=not args.no_exact,
                 baseline_backend=args.baseline_backend, llm_kwargs=llm_kwargs, tag=args.tag,
                 exact_baseline=args.exact_baseline)
    except (EvalError, AttentionPackConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
