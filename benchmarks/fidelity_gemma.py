"""Text fidelity of AttentionPack on real weights: Gemma 3 270M, long prompts, compact_text.

One command (CPU, offline ``vllm.LLM``, fp32, eager)::

    python benchmarks/fidelity_gemma.py            # all configs, writes benchmarks/results/
    python benchmarks/fidelity_gemma.py --configs r64,r128 --max-tokens 16
    python benchmarks/fidelity_gemma.py --key-space      # post- vs pre-RoPE keys, same ranks
    python benchmarks/fidelity_gemma.py --score          # values selected by importance (EMA) vs by score
    python benchmarks/fidelity_gemma.py --score --match-reads   # + the EMA at each score run's full-rank share

Builds six long, non-repetitive prompts in code (1,500-2,000 tokens each, seeded RNG): two
invented-fact lists followed by a retrieval question, two passages followed by a "repeat the first
sentence" copy task, and two prose passages to continue. Runs them greedily (``--max-tokens``
tokens, top-``--logprobs`` logprobs) through the baseline and through AttentionPack with
``compact_text`` at several ranks, using the ``ap_vllm.eval`` harness functions, and reports per
config: mean / max next-token KL against the baseline, token agreement, first divergence, whether
each task's answer is still right, and how many prompt tokens / KV blocks the plan compacts.
Every AttentionPack run also counts the span tokens its decode steps read at full rank
(``ap_vllm.backend.read_counts``): ``value_reads.share`` and the value coefficients read per span
token and step, R_v * (share + (1 - share) / 4), so selection rules compare at equal bytes read.
``--match-reads`` adds, after each ``*_score`` run, the EMA at the same ranks with
``importance_fraction`` = that run's measured share (``*_ema_matched``): equal bytes stored and read.

Baseline: AttentionPack in exact mode (``enabled: false``), which matches vLLM's CPU backend token
for token (tests/test_e2e_gemma.py); it lets every run use ``--block-size 16`` (the CPU backend
needs multiples of 32, and at 32 a rank-192 span of ~1,400 tokens no longer fits in fewer blocks).

Gemma 3 270M has one KV head of size 256, so H*d = 256: a span compacted at rank R costs about
R/256 of its exact size plus the two bases. R = 256 never saves a block, so the planner leaves
such spans exact; the "r256" config is reported from the plan alone (identical to the baseline by
construction) unless ``--run-noop`` is given. Only the global-attention layers (5, 11, 17) are
compacted; the sliding-window layers stay exact.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from ap_vllm.backend.read_counts import READ_COUNTS_ENV, read_share  # noqa: E402
from ap_vllm.tools import eval as ap_eval  # noqa: E402
from benchmarks.common import RESULTS_DIR as RESULTS, write_json  # noqa: E402

# name -> (key_rank, value_rank, extra AttentionPack fields)
CONFIGS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "r32": (32, 32, {}),
    "r64": (64, 64, {}),
    "r128": (128, 128, {}),
    "r192": (192, 192, {}),
    "r256": (256, 256, {}),
    "k64_v256": (64, 256, {}),   # keys low-rank only
    "k256_v64": (256, 64, {}),   # values low-rank only
    "r128_full_read": (128, 128, {"importance_fraction": 1.0}),  # no two-level (R/4) read
    "k128_v256": (128, 256, {}),
    # the same with keys compacted before RoPE (key_space="pre_rope")
    "r64_pre": (64, 64, {"key_space": "pre_rope"}),
    "r128_pre": (128, 128, {"key_space": "pre_rope"}),
    "r192_pre": (192, 192, {"key_space": "pre_rope"}),
    "k64_v256_pre": (64, 256, {"key_space": "pre_rope"}),
    "k128_v256_pre": (128, 256, {"key_space": "pre_rope"}),
    # values selected by this step's attention (value_selection="score") instead of the importance EMA
    "r64_score": (64, 64, {"value_selection": "score"}),
    "r128_score": (128, 128, {"value_selection": "score"}),
    "r192_score": (192, 192, {"value_selection": "score"}),
    "r192_full_read": (192, 192, {"importance_fraction": 1.0}),
}
SCORE_CONFIGS = "r64,r64_score,r128,r128_score,r192,r192_score"
KEY_SPACE_CONFIGS = "k64_v256,k64_v256_pre,k128_v256,k128_v256_pre,r64,r64_pre,r128,r128_pre"
DEFAULT_CONFIGS = "r128,r192,r256,k256_v64,k64_v256,r64,r32,r128_full_read"  # most informative first
# text spans read two levels here (text_two_level) and the named configs select values by the EMA, as when
# they were first measured; the defaults (full-rank values for text) are "r*_full_read" / importance_fraction
# 1.0, and "*_score" rows select by this step's score (the default for visual spans)
BASE_AP = {"compact_text": True, "text_two_level": True, "value_selection": "ema"}

# ----------------------------------------------------------------------------- prompts
SYL = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "qui", "ne", "bra", "zo", "fi", "gal", "mor", "ti",
       "pe", "ush", "yan", "cor", "dra", "lu", "ve", "sin"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dakar", "Riga", "Accra", "Sofia", "Doha",
          "Minsk", "Tunis", "Baku", "Bern", "Rome", "Kyiv", "Cairo", "Seoul", "Havana", "Vienna", "Manila",
          "Santiago", "Toronto", "Madrid", "Athens", "Warsaw", "Dublin", "Prague", "Bogota"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden"]
THINGS = ["lantern", "violin", "compass", "teapot", "bicycle", "telescope", "clock", "kite", "drum", "mirror",
          "notebook", "umbrella", "saddle", "anchor", "ladder"]
JOBS = ["baker", "sailor", "painter", "miner", "weaver", "doctor", "farmer", "pilot", "potter", "teacher",
        "carpenter", "librarian", "chemist", "gardener", "tailor"]
FACT_TEMPLATES = [
    "{n} is a {job} who lives in {city}.",
    "The {colour} {thing} that belongs to {n} was bought in {city}.",
    "Every winter, {n} travels to {city} to work as a {job}.",
    "{n} keeps a {colour} {thing} on the kitchen table.",
    "According to the town records, {n} was born in {city}.",
    "Last spring {n}, the {job}, repaired an old {thing}.",
    "{n} prefers the colour {colour} and owns exactly {num} books.",
    "In the census, {n} listed {num} goats and one {thing}.",
]
SENT_SUBJ = ["The old ferryman", "A young cartographer", "The village council", "Her grandmother", "The stubborn mule",
             "A travelling merchant", "The lighthouse keeper", "Our neighbour", "The river", "A quiet student",
             "The night train", "The orchard", "A retired captain", "The bakery on the corner", "The museum guard"]
SENT_VERB = ["carried", "painted", "forgot", "measured", "sold", "repaired", "counted", "described", "hid",
             "borrowed", "followed", "planted", "discovered", "traded", "polished"]
SENT_OBJ = ["a basket of pears", "the broken bell", "seven letters", "the map of the valley", "a crate of lemons",
            "the brass key", "an unfinished song", "the northern road", "a jar of honey", "the last lantern",
            "a ledger full of numbers", "the wooden bridge", "two silver coins", "the faded flag", "a box of seeds"]
SENT_TAIL = ["before the storm arrived", "while the market was closing", "after a long argument",
             "under a pale moon", "without telling anyone", "as the bells rang noon", "for the third time that year",
             "near the abandoned mill", "despite the cold wind", "just before dawn", "on the eve of the festival",
             "beside the frozen lake", "with great patience", "in the middle of the harvest", "at the edge of town"]


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        n = "".join(rng.choice(SYL) for _ in range(rng.randint(2, 3))).capitalize()
        if n not in used:
            used.add(n)
            return n


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SENT_SUBJ)} {rng.choice(SENT_VERB)} {rng.choice(SENT_OBJ)} {rng.choice(SENT_TAIL)}."


def facts_prompt(seed: int, n_facts: int, ask_index: int) -> tuple[str, str]:
    """Invented facts (varied templates), then a question about the city of one person."""
    rng = random.Random(seed)
    used: set[str] = set()
    lines, target, answer = [], None, None
    for i in range(n_facts):
        n, city = _name(rng, used), rng.choice(CITIES)
        t = rng.choice(FACT_TEMPLATES) if i != ask_index else "{n} is a {job} who lives in {city}."
        lines.append(t.format(n=n, city=city, job=rng.choice(JOBS), colour=rng.choice(COLOURS),
                              thing=rng.choice(THINGS), num=rng.randint(3, 90)))
        if i == ask_index:
            target, answer = n, city
    text = "Facts about the people of the island:\n" + "\n".join(lines)
    return text + f"\n\nQuestion: In which city does {target} live?\nAnswer: {target} lives in", answer


def copy_prompt(seed: int, n_sentences: int) -> tuple[str, str]:
    rng = random.Random(seed)
    sents = [_sentence(rng) for _ in range(n_sentences)]
    paras = [" ".join(sents[i:i + 5]) for i in range(0, len(sents), 5)]
    text = "\n\n".join(paras)
    return text + "\n\nRepeat the first sentence of the text above.\nFirst sentence: ", sents[0]


def prose_prompt(seed: int, n_sentences: int) -> tuple[str, None]:
    rng = random.Random(seed)
    sents = [_sentence(rng) for _ in range(n_sentences)]
    body = " ".join(sents)
    return "Chapter One\n\n" + body + " Then", None


def build_tasks(tokenizer, lo: int = 1500, hi: int = 2000) -> list[dict[str, Any]]:
    """Six prompts, grown until they have lo..hi tokens."""
    def count(p: str) -> int:
        return len(tokenizer(p)["input_ids"])

    def grow(make, start: int) -> tuple[str, Optional[str], int]:
        n = start
        while True:
            p, a = make(n)
            c = count(p)
            if c >= lo:
                if c > hi:
                    raise RuntimeError(f"prompt grew past {hi} tokens ({c})")
                return p, a, c
            n += max(1, int(n * (lo * 1.15 / c - 1)) if c else 10)

    specs = [
        ("facts_late", "retrieval", lambda n: facts_prompt(11, n, ask_index=n - 12)),
        ("facts_early", "retrieval", lambda n: facts_prompt(23, n, ask_index=5)),
        ("copy_a", "copy", lambda n: copy_prompt(37, n)),
        ("copy_b", "copy", lambda n: copy_prompt(41, n)),
        ("prose_a", "continuation", lambda n: prose_prompt(53, n)),
        ("prose_b", "continuation", lambda n: prose_prompt(67, n)),
    ]
    tasks = []
    for name, kind, make in specs:
        p, a, c = grow(make, 40)
        tasks.append({"name": name, "kind": kind, "prompt": p, "answer": a, "prompt_tokens": c})
    return tasks


def answer_ok(task: dict[str, Any], text: str) -> Optional[bool]:
    if task["answer"] is None:
        return None
    want = task["answer"]
    if task["kind"] == "copy":  # the first 8 words, verbatim
        want = " ".join(want.split()[:8])
    return want.lower() in text.lower()


# ----------------------------------------------------------------------------- run
def plan_summary(ap: dict[str, Any], tasks, block_size: int, dims) -> list[dict[str, int]]:
    """What the planner compacts per prompt (the same plan the engine uses)."""
    import torch

    from ap_vllm.config import parse_config
    from ap_vllm.core.spans import KVGeometry, plan_spans

    cfg = parse_config(ap)
    geo = KVGeometry(block_size, dims.num_kv_heads, dims.head_size, torch.float32, dims.num_layers)
    out = []
    for t in tasks:
        n_prompt = t["prompt_tokens"]
        plans = plan_spans(cfg, geo, (), n_prompt)
        out.append({"tokens_compacted": sum(p.num_tokens for p in plans),
                    "blocks_freed": sum(p.num_freed_blocks for p in plans),
                    "blocks_exact": -(-n_prompt // block_size)})
    return out


def plot(report: dict[str, Any], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [(n, r) for n, r in report["runs"].items() if n != "baseline"]
    x = list(range(len(runs)))
    labels = [f"{n}\nK{r['key_rank']}/V{r['value_rank']}" for n, r in runs]
    floor = 1e-8
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(runs) + 4), 4.4), dpi=120)
    a1.plot(x, [r["token_agreement"] for _, r in runs], "o-", label="token agreement")
    a1.plot(x, [r["answers_right"] / max(1, r["answers_total"]) for _, r in runs], "s--", label="answers right")
    a1.set_ylim(-0.02, 1.08)
    a1.set_title("Greedy agreement / task answers")
    a2.plot(x, [max(r["kl_mean"], floor) for _, r in runs], "o-", color="tab:red", label="mean KL")
    a2.plot(x, [max(r["kl_max"], floor) for _, r in runs], "^:", color="tab:orange", label="max KL")
    a2.set_yscale("log")
    a2.set_title("KL(baseline || run), top-k renormalised (nats)")
    for ax in (a1, a2):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Gemma 3 270M, compact_text, {len(report['tasks'])} prompts of "
                 f"{min(t['prompt_tokens'] for t in report['tasks'])}-{max(t['prompt_tokens'] for t in report['tasks'])}"
                 f" tokens, {report['settings']['max_tokens']} greedy tokens, H*d=256", fontsize=9)
    return ap_eval.save_figure(fig, path)


def table(report: dict[str, Any]) -> str:
    names = [t["name"] for t in report["tasks"] if t["answer"] is not None]
    rows = [("config", "K/V", "cmp tok", "freed", "agree", "ident", "1st div (min)", "KL mean", "KL max",
             "answers " + ",".join(names), "full share", "s")]
    for n, r in report["runs"].items():
        ans = ",".join("-" if a is None else ("Y" if a else "n") for a in r["answers"] if a is not None or True)
        if n == "baseline":
            rows.append((n, "exact", "0", "0", "-", "-", "-", "-", "-", ans, "-", f"{r['seconds']:.0f}"))
            continue
        fd = "-" if r["first_divergence_min"] is None else f"{r['first_divergence_min']}"
        rows.append((n, f"{r['key_rank']}/{r['value_rank']}", str(r["tokens_compacted"]), str(r["blocks_freed"]),
                     f"{r['token_agreement']:.3f}", f"{r['exact_match_rate']:.2f}", fd, f"{r['kl_mean']:.2e}",
                     f"{r['kl_max']:.2e}", ans, f"{r['value_reads']['share']:.3f}" if r.get("value_reads") else "-",
                     f"{r['seconds']:.0f}" if r.get("seconds") else "plan"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(x) for c, x in zip(row, w)) for row in rows)


def write(report: dict[str, Any], out: Path, tag: str, t0: float) -> Optional[Path]:
    out.mkdir(parents=True, exist_ok=True)
    png = plot(report, out / f"{tag}.png") if len(report["runs"]) > 1 else None
    report["plot"] = str(png) if png else None
    report["total_seconds"] = time.perf_counter() - t0
    write_json(report, out / f"{tag}.json")
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--run-noop", action="store_true", help="also run configs whose plan compacts nothing")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--tag", default=None, help="result file name (default fidelity_gemma[_key_space|_score])")
    ap.add_argument("--score", action="store_true",
                    help=f"compare importance (EMA) and score selection of the values ({SCORE_CONFIGS})")
    ap.add_argument("--key-space", action="store_true",
                    help=f"compare post- and pre-RoPE keys at the same ranks ({KEY_SPACE_CONFIGS})")
    ap.add_argument("--match-reads", action="store_true",
                    help="after each *_score run, run the EMA with importance_fraction = its full-rank share")
    args = ap.parse_args(argv)
    if args.key_space:
        args.configs = KEY_SPACE_CONFIGS
    if args.score:
        args.configs = SCORE_CONFIGS
    args.tag = args.tag or ("fidelity_gemma_key_space" if args.key_space else
                            "fidelity_gemma_score" if args.score else "fidelity_gemma")

    from transformers import AutoTokenizer

    from ap_vllm.tools.testing.gemma_weights import prepare_gemma3_270m

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # 6 x 2,000 fp32 tokens need ~0.5 GiB
    model = str(prepare_gemma3_270m())
    dims = ap_eval.model_dims(model)
    tasks = build_tasks(AutoTokenizer.from_pretrained(model))
    items = [ap_eval.Item(None, prompt=t["prompt"]) for t in tasks]
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {','.join(CONFIGS)}")
    llm_kwargs = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True, "seed": 0,
                  "block_size": args.block_size}
    specs = [ap_eval.RunSpec("baseline", None, {**BASE_AP, "enabled": False})]
    plans = {}
    for n in names:
        k, v, extra = CONFIGS[n]
        cfg = {**BASE_AP, **extra, "enabled": True, "key_rank": k, "value_rank": v}
        plans[n] = plan_summary(cfg, tasks, args.block_size, dims)
        specs.append(ap_eval.RunSpec(n, None, cfg))
    report: dict[str, Any] = {
        "benchmark": "benchmarks/fidelity_gemma.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_dir": model, "model": {"num_layers": dims.num_layers, "num_kv_heads": dims.num_kv_heads,
                                      "head_size": dims.head_size, "kv_width": dims.width,
                                      "compacted_layers": "global-attention layers only (5, 11, 17)"},
        "settings": {"max_tokens": args.max_tokens, "logprobs": args.logprobs, "block_size": args.block_size,
                     "baseline": "AttentionPack exact mode (enabled=false)", "base_attentionpack": BASE_AP,
                     "llm_kwargs": llm_kwargs, "kl": "KL(baseline || run) over the baseline's top-k tokens, "
                     "renormalised; steps up to and including the first divergence"},
        "tasks": [{k: v for k, v in t.items()} for t in tasks],
        "runs": {},
    }
    base_gens = None
    t_all = time.perf_counter()
    counts_dir = Path(tempfile.mkdtemp(prefix="ap_read_counts_"))
    queue = list(specs)
    while queue:
        spec = queue.pop(0)
        plan = plans.get(spec.name)
        entry: dict[str, Any] = {"attentionpack": spec.attentionpack,
                                 "key_rank": (spec.attentionpack or {}).get("key_rank"),
                                 "value_rank": (spec.attentionpack or {}).get("value_rank")}
        if plan is not None:
            entry["plan"] = plan
            entry["tokens_compacted"] = sum(p["tokens_compacted"] for p in plan)
            entry["blocks_freed"] = sum(p["blocks_freed"] for p in plan)
            entry["blocks_exact"] = sum(p["blocks_exact"] for p in plan)
        if plan is not None and entry["tokens_compacted"] == 0 and not args.run_noop:
            # Nothing fits in fewer blocks: the engine leaves every span exact = the baseline.
            entry.update(ap_eval.compare(base_gens, base_gens, args.logprobs))
            entry["seconds"] = None
            entry["note"] = "no span compacts (compact form >= exact blocks): identical to the baseline; not run"
        else:
            print(f"[fidelity] {spec.name}: {spec.attentionpack}", file=sys.stderr, flush=True)
            prefix = str(counts_dir / spec.name)
            os.environ[READ_COUNTS_ENV] = prefix  # inherited by the engine process
            try:
                gens, secs = ap_eval.generate(model, spec, items, max_tokens=args.max_tokens,
                                              logprobs=args.logprobs, llm_kwargs=llm_kwargs)
            finally:
                del os.environ[READ_COUNTS_ENV]
            entry["seconds"] = secs
            reads = read_share(prefix) if spec.attentionpack.get("enabled") else None
            if reads is not None:
                rv = spec.attentionpack["value_rank"]
                reads["value_coefficients_per_token"] = rv * (reads["share"] + (1 - reads["share"]) / 4)
                entry["value_reads"] = reads
                if args.match_reads and spec.name.endswith("_score") and 0 < reads["share"] < 1:
                    name = spec.name[: -len("_score")] + "_ema_matched"
                    frac = round(reads["share"], 4)
                    cfg = {**spec.attentionpack, "value_selection": "ema", "importance_fraction": frac}
                    plans[name] = plan
                    queue.insert(0, ap_eval.RunSpec(name, None, cfg))
            if spec.name == "baseline":
                base_gens = gens
                entry["outputs"] = [g.text for g in gens]
            else:
                entry.update(ap_eval.compare(base_gens, gens, args.logprobs))
        texts = entry.get("outputs") or [it["text"] for it in entry["items"]]
        entry["answers"] = [answer_ok(t, x) for t, x in zip(tasks, texts)]
        graded = [a for a in entry["answers"] if a is not None]
        entry["answers_right"], entry["answers_total"] = sum(graded), len(graded)
        report["runs"][spec.name] = entry
        print(f"[fidelity] {spec.name}: done ({time.perf_counter() - t_all:.0f} s so far)", file=sys.stderr,
              flush=True)
        # Written after every run: a long sweep that is stopped early keeps what it measured.
        png = write(report, Path(args.out_dir), args.tag, t_all)
        print(table(report), file=sys.stderr, flush=True)
    out = Path(args.out_dir)
    print(table(report))
    print("\nbaseline outputs:")
    for t, x in zip(tasks, report["runs"]["baseline"]["outputs"]):
        print(f"  {t['name']} ({t['prompt_tokens']} tok, want {t['answer']!r}): {x!r}")
    print(f"\nresults: {out / (args.tag + '.json')}" + (f"\nplot:    {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
