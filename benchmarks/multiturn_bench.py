"""Prefix caching with AttentionPack against vLLM's own CPU backend: multi-turn image chats, and how many
images each keeps hot in the same KV bytes.

One command::

    python benchmarks/multiturn_bench.py                  # 4096-token images, 8 conversations x 3 turns
    python benchmarks/multiturn_bench.py --quick          # 256-token images, 2 x 2, 6 images

It builds the tiny random-weight Idefics3 VLM (:mod:`ap_vllm.tools.testing.tiny_vlm`: 2 layers, 2 KV heads,
head dim 64) and starts, one after the other, ``vllm serve`` on it with the same block size (32) and the same
KV pool (``--num-gpu-blocks-override``, so the same KV bytes: AttentionPack pages exactly like full attention):

* ``attentionpack``: ``--attention-backend attentionpack`` (key_rank = value_rank = H*d/8), prefix caching on
  (vLLM's default);
* ``cpu_attn``: vLLM's exact CPU backend, prefix caching on;
* ``attentionpack_nocache``: AttentionPack with ``--no-enable-prefix-caching`` (what every turn cost before).

Two phases per server (the prefix cache is reset in between, ``/reset_prefix_cache``):

1. **Multi-turn.** ``--conversations`` chats, each about its own image, ``--turns`` turns each, one request at a
   time, streamed; every turn re-sends the whole conversation (as chat clients do). Reported: time to first
   token (TTFT) per turn (median, and each), the prompt tokens served from the cache (vLLM's
   ``cached_tokens``), and for AttentionPack the compact spans looked up and found in the cache
   (``attentionpack:span_cache_*``) and the image tokens compacted (a hit compacts nothing).
2. **Cache capacity.** ``--images`` distinct images, each asked once, then each asked again in reverse order,
   with a text-only request after every ask (other traffic). A second ask *hits* when vLLM reports every
   whole block up to the image's end as cached (``cached_tokens >= floor(image_end / 32) * 32``: vLLM caches
   whole blocks; AttentionPack's hit ends at the image's end). The pool holds ``--pool-requests`` exact requests; the number of second asks
   that hit is what each backend keeps hot in those bytes.

Writes JSON (default ``benchmarks/results/multiturn_<time>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from benchmarks.capacity_bench import ModelShape, build_model, cdiv, prompt_geometry  # noqa: E402
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402

BLOCK = 32
QUESTIONS = ["What is in this picture?", "And the colours?", "Anything else worth noting?", "Summarize.",
             "One more detail?"]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def reset_prefix_cache(base_url: str, attempts: int = 60) -> None:
    """vLLM's dev-mode reset; it refuses while blocks are still held (a request just finishing): retry."""
    for _ in range(attempts):
        req = urllib.request.Request(base_url + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            if json.loads(r.read()).get("success"):
                return
        time.sleep(0.5)
    raise RuntimeError(f"{base_url}: the prefix cache could not be reset")


def streamed_chat(server, messages, max_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat: TTFT, the answer, prompt and cached tokens."""
    t0 = time.perf_counter()
    stream = server.client(timeout=1800).chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    ttft, text, usage = None, [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    return {"ttft_ms": round(1000 * (ttft if ttft is not None else time.perf_counter() - t0), 1),
            "answer": "".join(text), "prompt_tokens": usage.prompt_tokens if usage else None,
            "cached_tokens": (details.cached_tokens or 0) if details is not None else None}


def image_part(seed: int, size: int) -> dict:
    from ap_vllm.tools.testing.server import image_data_url

    return {"type": "image_url", "image_url": {"url": image_data_url(width=size, height=size, seed=seed)}}


def multi_turn(server, conversations: int, turns: int, max_tokens: int) -> dict[str, Any]:
    before = server.metrics()
    rows = []
    for c in range(conversations):
        history: list[dict] = []
        for t in range(turns):
            content = [image_part(1000 + c, 64), {"type": "text", "text": QUESTIONS[0]}] if t == 0 else QUESTIONS[t]
            history.append({"role": "user", "content": content})
            r = streamed_chat(server, history, max_tokens)
            rows.append({"conversation": c, "turn": t + 1, **{k: r[k] for k in ("ttft_ms", "prompt_tokens",
                                                                                  "cached_tokens")}})
            history.append({"role": "assistant", "content": r["answer"]})
    time.sleep(1.5)  # the last step's stats reach /metrics with the engine's next report
    after = server.metrics()
    out: dict[str, Any] = {"requests": rows}
    for t in range(1, turns + 1):
        out[f"turn{t}_ttft_ms_median"] = statistics.median(r["ttft_ms"] for r in rows if r["turn"] == t)
    for name in ("attentionpack:span_cache_queries_total", "attentionpack:span_cache_hits_total",
                 "attentionpack:tokens_compacted_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total"):
        out[name.split(":")[1]] = _metric(after, name) - _metric(before, name)
    q = out["prefix_cache_queries_total"]
    out["vllm_token_hit_rate"] = round(out["prefix_cache_hits_total"] / q, 4) if q else None
    sq = out["span_cache_queries_total"]
    out["span_hit_rate"] = round(out["span_cache_hits_total"] / sq, 4) if sq else None
    return out


def capacity(server, images: int, image_end: int) -> dict[str, Any]:
    def ask(seed):
        messages = [{"role": "user", "content": [image_part(seed, 64), {"type": "text", "text": "Describe it."}]}]
        return streamed_chat(server, messages, 2)

    def other(i):
        streamed_chat(server, [{"role": "user", "content": f"other traffic {i}: a short text-only question"}], 2)

    for i in range(images):
        ask(5000 + i)
        other(i)
    second = []
    for i in reversed(range(images)):
        r = ask(5000 + i)
        second.append({"image": i, "cached_tokens": r["cached_tokens"], "ttft_ms": r["ttft_ms"],
                       "hit": (r["cached_tokens"] or 0) >= image_end // BLOCK * BLOCK})
        other(images + i)
    return {"images": images, "second_ask_hits": sum(r["hit"] for r in second), "second_asks": second}


def run(args) -> dict[str, Any]:
    from ap_vllm.tools.testing.server import VllmServer

    shape = ModelShape()
    model = build_model(Path(args.model_root), args.image_tokens, shape)
    prompt_tokens, span_start, span_len = prompt_geometry(model, args.image_tokens, QUESTIONS[0])
    longest = prompt_tokens + args.turns * (args.max_tokens + 16)
    max_model_len = longest + 64
    pool = max(cdiv(max_model_len, BLOCK) + 1, int(args.pool_requests * cdiv(prompt_tokens + 2, BLOCK)))
    rank = args.rank or shape.kv_width // 8
    common = ["--block-size", str(BLOCK), "--num-gpu-blocks-override", str(pool), "--enable-prompt-tokens-details",
              "--max-num-seqs", "8"]
    ap = ["--attention-backend", "attentionpack", "--additional-config",
          json.dumps({"attentionpack": {"key_rank": rank, "value_rank": rank}})]
    servers = {"attentionpack": ap + common, "cpu_attn": ["--attention-backend", "CPU_ATTN"] + common,
               "attentionpack_nocache": ap + common + ["--no-enable-prefix-caching"]}
    report: dict[str, Any] = {
        "benchmark": "multiturn", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "image_tokens": args.image_tokens,
        "prompt_tokens_turn1": prompt_tokens, "image_span": [span_start, span_start + span_len],
        "model": {"layers": shape.num_layers, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                  "dtype": "float32"},
        "rank": rank, "block_size": BLOCK, "pool_blocks": pool, "pool_exact_requests": args.pool_requests,
        "conversations": args.conversations, "turns": args.turns, "max_tokens": args.max_tokens,
        "servers": {}}
    for name in args.servers:
        srv = VllmServer(model, max_model_len=max_model_len, kv_cache_space_gib=args.kv_cache_space_gib,
                         extra_args=servers[name], env={"VLLM_SERVER_DEV_MODE": "1"})
        print(f"[multiturn] starting {name}", flush=True)
        with srv:
            entry: dict[str, Any] = {"args": servers[name], "startup_s": round(srv.startup_seconds, 1)}
            entry["multi_turn"] = multi_turn(srv, args.conversations, args.turns, args.max_tokens)
            if not name.endswith("nocache"):
                reset_prefix_cache(srv.base_url)
                entry["capacity"] = capacity(srv, args.images, span_start + span_len)
            report["servers"][name] = entry
        print(json.dumps({name: {k: v for k, v in entry["multi_turn"].items() if k != "requests"}}), flush=True)
    s = report["servers"]
    summary: dict[str, Any] = {}
    if "attentionpack" in s and "cpu_attn" in s:
        for t in range(2, args.turns + 1):
            a = s["attentionpack"]["multi_turn"][f"turn{t}_ttft_ms_median"]
            b = s["cpu_attn"]["multi_turn"][f"turn{t}_ttft_ms_median"]
            summary[f"turn{t}_ttft_ratio_vs_cpu_attn"] = round(a / b, 3)
        hits_ap, hits_base = (s[n]["capacity"]["second_ask_hits"] for n in ("attentionpack", "cpu_attn"))
        summary["second_ask_hits"] = {"attentionpack": hits_ap, "cpu_attn": hits_base}
        summary["second_ask_hits_ratio"] = round(hits_ap / hits_base, 2) if hits_base else None
    if "attentionpack_nocache" in s and "attentionpack" in s:
        for t in range(2, args.turns + 1):
            summary[f"turn{t}_ttft_ms_nocache"] = s["attentionpack_nocache"]["multi_turn"][f"turn{t}_ttft_ms_median"]
    report["summary"] = summary
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"multi-turn: {report['conversations']} conversations x {report['turns']} turns, "
             f"{report['image_tokens']}-token images; capacity: {report['pool_blocks']} blocks of {report['block_size']}"]
    turns = range(1, report["turns"] + 1)
    lines.append("server                 " + "".join(f"  turn{t} TTFT ms" for t in turns)
                 + "  span hits/queries  compacted tok  2nd-ask hits")
    for name, e in report["servers"].items():
        m = e["multi_turn"]
        cap = e.get("capacity")
        lines.append(f"{name:<23}" + "".join(f"  {m[f'turn{t}_ttft_ms_median']:>13.1f}" for t in turns)
                     + f"  {int(m['span_cache_hits_total']):>8}/{int(m['span_cache_queries_total']):<8}"
                     + f"  {int(m['tokens_compacted_total']):>13}"
                     + (f"  {cap['second_ask_hits']:>5}/{cap['images']}" if cap else "             -"))
    lines.append("summary: " + json.dumps(report.get("summary", {})))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16, help="answer length of every turn")
    p.add_argument("--images", type=int, default=24, help="distinct images of the capacity phase")
    p.add_argument("--pool-requests", type=float, default=4.5,
                   help="KV pool size, in exact one-image requests (the same blocks on every server)")
    p.add_argument("--rank", type=int, default=None, help="key/value rank (default H*d/8)")
    p.add_argument("--servers", nargs="+", default=["attentionpack", "cpu_attn", "attentionpack_nocache"],
                   choices=["attentionpack", "cpu_attn", "attentionpack_nocache"])
    p.add_argument("--kv-cache-space-gib", type=int, default=4)
    p.add_argument("--model-root", default=str(ROOT / "build" / "bench_models"))
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/multiturn_<time>.json)")
    p.add_argument("--quick", action="store_true", help="256-token images, 2 conversations x 2 turns, 6 images")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.image_tokens, args.conversations, args.turns, args.images = 256, 2, 2, 6
    report = run(args)
    path = Path(args.json) if args.json else RESULTS_DIR / f"multiturn_{time.strftime('%Y%m%d_%H%M%S')}.json"
    write_json(report, path)
    print(table(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
