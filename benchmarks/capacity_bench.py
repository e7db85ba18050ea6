"""Capacity benchmark: how many image requests run at once in a fixed KV-cache budget.

One command::

    python benchmarks/capacity_bench.py                      # 4096 and 1024 image tokens
    python benchmarks/capacity_bench.py --image-tokens 4096 --max-tokens 256 --num-requests 24
    python benchmarks/capacity_bench.py --quick              # 256 image tokens, 32 output tokens

For every image size it builds the tiny random-weight Idefics3 VLM
(:mod:`ap_vllm.tools.testing.tiny_vlm`: 2 layers, 2 KV heads, head dim 64, so H*d = 128) and starts two
``vllm serve`` servers on it with the SAME KV budget (``--num-gpu-blocks-override``):

* ``baseline``: vLLM's exact CPU backend (``--attention-backend CPU_ATTN``);
* ``attentionpack``: ``--attention-backend attentionpack`` with key_rank = value_rank = H*d/8
  (``--rank`` to change it).

vLLM's CPU_ATTN only accepts block sizes that are multiples of 32, so a ``--block-size 16`` baseline
does not start ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"). The baseline therefore
runs with the smallest block it accepts (32 by default, ``--baseline-block-size``) and the budget is
fixed in bytes: ``--num-gpu-blocks-override`` is N_base for the baseline and
N_base * baseline_block_size / block_size for AttentionPack, i.e. both pools hold the same number
of exact tokens (the bytes of a block are proportional to its token count). vLLM CPU honours
``--num-gpu-blocks-override`` (its log says "Overriding num_gpu_blocks=... with
num_gpu_blocks_override=..."; ``VLLM_CPU_KVCACHE_SPACE`` only has to be large enough).

N_base is chosen so that the baseline holds ``--baseline-fit`` (default 3.5) requests of full
length (prompt + ``--max-tokens``). Then ``--num-requests`` requests (each one image chat with a
different synthetic image, ``ignore_eos`` so that each generates exactly ``--max-tokens`` tokens)
are sent at once, and ``/metrics`` is polled every ``--metrics-interval`` seconds for vLLM's own
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``.
A sampled gauge can miss a short run (the API server answers ``/metrics`` late while busy), so
the mean number of requests running also comes from a count that misses nothing: the sum of
``vllm:request_inference_time_seconds`` (each request's first scheduling to last token, recorded
for every request) over the run's wall time, Little's law. It counts a preempted request while it
waits, so it is read next to the preemption count.
Reported per server: the most requests running at once, the time series summary, completed /
failed requests, preemptions, wall time, and whether KV usage is back at 0 once all requests are
done. Reported per image size: the ratio of the most requests running (attentionpack / baseline),
next to what block accounting predicts (:func:`ap_vllm.core.spans.plan_span`).

Admission. Both servers run with ``--no-enable-chunked-prefill`` and ``--max-num-batched-tokens``
= max(max_model_len, prompt + max_num_seqs): a request is admitted (counted in
``vllm:num_requests_running``) only together with its whole prompt, one prompt per step. With
vLLM's default chunked prefill, a step that has already spent its encoder budget on one image
still admits further requests with just the few text tokens before their image (the scheduler
cuts the chunk at the image start), so they count as running while holding one block: in a
3.5-request budget the CPU_ATTN baseline then showed 18 "running" requests and 15 preemptions,
which measures nothing about KV capacity. ``--chunked-prefill`` restores vLLM's default.

Long videos (``--chunk-tokens C``): both servers prefill in steps of C tokens (chunked prefill,
``--max-num-batched-tokens C``) and AttentionPack compacts each image in chunks of about C tokens
as they are prefilled (``chunk_tokens``), reporting to vLLM's full-sequence admission gate what a
request holds at most instead of its exact length (:func:`ap_vllm.core.spans.admission_blocks`).

Writes JSON (default ``benchmarks/results/capacity_<time>.json``) and prints a table.
Exit status 0 iff every request of every server completed and KV usage returned to 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from benchmarks import serve_bench as sb  # noqa: E402  (metric sampling, request and summary helpers)
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402

PREEMPTIONS = "vllm:num_preemptions"  # counter: exposed as vllm:num_preemptions_total
AP_BLOCKS_FREED = "attentionpack:blocks_freed"  # exposed as attentionpack:blocks_freed_total
# histogram of each finished request's time from first scheduled to last token (vLLM's own clock)
INFERENCE_TIME = "vllm:request_inference_time_seconds"
ITL = "vllm:inter_token_latency_seconds"  # histogram: time between two output tokens of a request


# ----------------------------------------------------------------------------- model and plan
@dataclass(frozen=True)
class ModelShape:
    num_layers: int = 2
    num_kv_heads: int = 2
    num_heads: int = 4
    head_dim: int = 64

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


def build_model(root: Path, image_tokens: int, shape: ModelShape) -> Path:
    from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm

    out = root / (f"tiny_vlm_{image_tokens}" if shape == ModelShape() else
                  f"tiny_vlm_{image_tokens}_kv{shape.num_kv_heads}x{shape.head_dim}")
    if not (out / "config.json").is_file():
        build_tiny_vlm(out, image_tokens=image_tokens, num_layers=shape.num_layers,
                       num_kv_heads=shape.num_kv_heads, num_heads=shape.num_heads, head_dim=shape.head_dim)
    return out


def prompt_geometry(model_dir: Path, image_tokens: int, prompt: str) -> tuple[int, int, int]:
    """(prompt tokens, image span start, image span length) of one request of the workload.

    The chat template writes one ``<image>``; the processor expands it to
    ``<fake_token_around_image> <global-img> <image> x image_tokens <fake_token_around_image>``,
    and vLLM's placeholder range covers that whole run.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": prompt}]}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    start = ids.index(image_id)
    return len(ids) - 1 + image_tokens + 3, start, image_tokens + 3


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def capacity_plan(*, prompt_tokens: int, span_start: int, span_len: int, max_tokens: int, shape: ModelShape,
                  rank: int, block_size: int, baseline_block_size: int, baseline_fit: float,
                  num_requests: int, blocks_override: Optional[int] = None, kv_cache_dtype: str = "auto",
                  model_dtype: str = "float32") -> dict[str, Any]:
    """KV budget of both servers and what block accounting predicts for them.

    The budget is fixed in bytes: ``baseline_fit`` full-length requests of the model-dtype cache. With
    ``kv_cache_dtype="fp8"`` a page element takes one byte instead of the model dtype's (4 for float32, 2 for
    bfloat16), so the same bytes hold that many times more blocks, and AttentionPack stores FP8 coefficients
    (``coefficient_dtype: auto``) with its bases in the model dtype.

    vLLM admits a waiting request when the free pool holds the blocks of its whole prompt (no
    reserve for the tokens it will generate) and preempts the newest running request when a
    decode step finds no free block. AttentionPack frees a span's blocks beyond its compact form
    right after the step that prefilled it, so a running request holds ``compact`` blocks plus
    those of its generated tokens, but a request being admitted still needs its exact prompt.
    """
    import torch

    from ap_vllm.config import AttentionPackConfig
    from ap_vllm.core.spans import KVGeometry, plan_span

    dtype = getattr(torch, model_dtype)
    fp8 = kv_cache_dtype != "auto"
    if kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: 'auto' or 'fp8'")
    per_byte = torch.empty((), dtype=dtype).element_size() if fp8 else 1  # blocks in the bytes of one
    seq = prompt_tokens + max_tokens
    # baseline, in baseline blocks
    b_prompt = cdiv(prompt_tokens, baseline_block_size)
    b_full = cdiv(seq, baseline_block_size)
    n_base = (blocks_override or math.ceil(baseline_fit * b_full) + 1) * per_byte  # + vLLM's null block
    usable_b = n_base - 1
    # steady state: k full-length requests fit; admission alone would take floor(usable / prompt)
    base_admit = usable_b // b_prompt
    base_steady = usable_b // b_full

    # attentionpack, same bytes
    n_ap = n_base * baseline_block_size // block_size
    usable_a = n_ap - 1
    cfg = AttentionPackConfig(key_rank=rank, value_rank=rank, coefficient_dtype="fp8_e4m3" if fp8 else "model")
    geo = KVGeometry(block_size, shape.num_kv_heads, shape.head_dim, dtype, shape.num_layers,
                     cache_dtype=torch.float8_e4m3fn if fp8 else None)
    plan = plan_span(cfg, geo, span_start, span_len, "visual")
    a_prompt = cdiv(prompt_tokens, block_size)
    freed = plan.num_freed_blocks if plan else 0
    a_compact = a_prompt - freed  # held once the span is compacted
    a_full = cdiv(seq, block_size) - freed  # held at the last generated token

    def ap_running(held: int) -> int:
        # the newest request is admitted with its exact prompt while the others hold `held`
        return 0 if usable_a < a_prompt else 1 + (usable_a - a_prompt) // held

    pred_ap_hi, pred_ap_lo = ap_running(a_compact), ap_running(a_full)
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "model_dtype": model_dtype,
        "prompt_tokens": prompt_tokens,
        "image_span": [span_start, span_len],
        "sequence_tokens": seq,
        "kv_budget_tokens": usable_b * baseline_block_size,
        "baseline": {
            "block_size": baseline_block_size, "num_gpu_blocks_override": n_base,
            "blocks_per_request_prompt": b_prompt, "blocks_per_request_full": b_full,
            "predicted_max_running": min(num_requests, base_admit), "predicted_steady_running": min(num_requests, base_steady),
        },
        "attentionpack": {
            "block_size": block_size, "num_gpu_blocks_override": n_ap, "rank": rank,
            "span_plan": None if plan is None else {**asdict(plan), "freed_blocks": plan.num_freed_blocks},
            "blocks_per_request_prompt_exact": a_prompt,
            "blocks_per_request_compacted": a_compact,
            "blocks_per_request_full": a_full,
            "predicted_max_running": [min(num_requests, pred_ap_lo), min(num_requests, pred_ap_hi)],
        },
        "predicted_ratio": [min(num_requests, pred_ap_lo) / max(1, min(num_requests, base_steady)),
                            min(num_requests, pred_ap_hi) / max(1, min(num_requests, base_steady))],
        "compaction_ratio_per_request": (b_full * baseline_block_size) / (a_full * block_size),
    }


# ----------------------------------------------------------------------------- one server run
async def _scrape(base_url: str) -> dict[str, Optional[float]]:
    import httpx

    names = (sb.KV_USAGE, sb.RUNNING, sb.WAITING, PREEMPTIONS + "_total", AP_BLOCKS_FREED + "_total",
             INFERENCE_TIME + "_sum", INFERENCE_TIME + "_count", ITL + "_sum", ITL + "_count")
    async with httpx.AsyncClient() as http:
        r = await http.get(base_url + "/metrics", timeout=10.0)
    vals = sb.parse_prometheus(r.text, names)
    return {
        "kv_cache_usage": max(vals[sb.KV_USAGE]) if vals[sb.KV_USAGE] else None,
        "running": sum(vals[sb.RUNNING]) if vals[sb.RUNNING] else None,
        "waiting": sum(vals[sb.WAITING]) if vals[sb.WAITING] else None,
        "preemptions": sum(vals[PREEMPTIONS + "_total"]) if vals[PREEMPTIONS + "_total"] else None,
        "ap_blocks_freed": sum(vals[AP_BLOCKS_FREED + "_total"]) if vals[AP_BLOCKS_FREED + "_total"] else None,
        "inference_s": sum(vals[INFERENCE_TIME + "_sum"]) if vals[INFERENCE_TIME + "_sum"] else None,
        "inference_requests": sum(vals[INFERENCE_TIME + "_count"]) if vals[INFERENCE_TIME + "_count"] else None,
        "itl_s": sum(vals[ITL + "_sum"]) if vals[ITL + "_sum"] else None,
        "itl_count": sum(vals[ITL + "_count"]) if vals[ITL + "_count"] else None,
    }


async def _settle(base_url: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll until nothing runs or waits and KV usage is 0 (or timeout); the last scrape."""
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    while True:
        try:
            last = await _scrape(base_url)
        except Exception as exc:  # a scrape may fail transiently
            last = {"error": repr(exc)[:200]}
        idle = last.get("running") == 0 and last.get("waiting") == 0 and last.get("kv_cache_usage") == 0
        if idle or time.perf_counter() - t0 > timeout:
            last["settle_s"] = time.perf_counter() - t0
            last["kv_usage_returned_to_zero"] = last.get("kv_cache_usage") == 0
            return last
        await asyncio.sleep(0.25)


def series_summary(samples: list[dict]) -> dict[str, Any]:
    """Summary of the /metrics time series: maxima, means, time-weighted mean of running."""
    ok = [s for s in samples if s.get("running") is not None]
    if not ok:
        return {"samples": len(samples), "errors": len(samples)}
    running = [s["running"] for s in ok]
    waiting = [s["waiting"] for s in ok if s.get("waiting") is not None]
    kv = [s["kv_cache_usage"] for s in ok if s.get("kv_cache_usage") is not None]
    rmax = max(running)
    t_max = next(s["t"] for s in ok if s["running"] == rmax)
    at_max = sum(1 for r in running if r == rmax) / len(running)
    busy = [s for s in ok if (s["running"] or 0) > 0]
    # a coarse series for the table: running at 10 evenly spaced instants of the run
    idx = [round(i * (len(ok) - 1) / 9) for i in range(10)] if len(ok) > 1 else [0]
    return {
        "samples": len(samples),
        "scrape_errors": len(samples) - len(ok),
        "running_max": rmax,
        "running_mean": statistics.fmean(running),
        "running_mean_while_busy": statistics.fmean([s["running"] for s in busy]) if busy else 0.0,
        "running_p50": sb.percentile(running, 50),
        "time_to_running_max_s": t_max,
        "fraction_of_samples_at_max": at_max,
        "waiting_max": max(waiting) if waiting else None,
        "kv_cache_usage_max": max(kv) if kv else None,
        "kv_cache_usage_mean": statistics.fmean(kv) if kv else None,
        "running_decile_series": [ok[i]["running"] for i in idx],
    }


def max_overlap(requests: list[dict]) -> int:
    """Most requests between their first streamed token and their last chunk, on the client's clock.

    All requests are sent at once, so [ttft, latency] share one clock. A cross-check of the sampled
    gauge that cannot miss short peaks (``--quick`` runs last about a second), not a substitute: a
    preempted request still counts (it has streamed tokens but is not running), and a request's
    last chunk can arrive after the next request's first token, so it can read above
    ``vllm:num_requests_running``; the request being prefilled is not counted.
    """
    events = []
    for r in requests:
        if r.get("ttft_s") is not None and r.get("latency_s") is not None:
            events += [(r["ttft_s"], 1), (r["latency_s"], -1)]
    best = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


def _running_mean_engine(before: dict, after: dict, wall_s: float, num_requests: int) -> Optional[float]:
    """Mean requests running over the run: sum of the run's request inference times / wall time.

    None unless vLLM counted every request of the run (``after`` settled once all finished)."""
    if after.get("inference_requests") is None or not wall_s:
        return None
    counted = after["inference_requests"] - (before.get("inference_requests") or 0)
    if counted != num_requests:
        return None
    return (after["inference_s"] - (before.get("inference_s") or 0.0)) / wall_s


def run_server(name: str, srv, wl, chats, interval: float, progress: bool) -> dict[str, Any]:
    async def go():
        before: dict[str, Any] = {}

        async def read_counters():  # after the warm-up (once idle): the run's counters start here
            before.update(await _settle(srv.base_url))

        summary = await sb.run_endpoint(name, srv.base_url, wl, chats, model=srv.model_name,
                                        metrics_interval=interval, progress=progress,
                                        after_warmup=read_counters)
        after = await _settle(srv.base_url)
        return before, summary, after

    t0 = time.perf_counter()
    before, s, after = asyncio.run(go())
    samples = s.pop("metric_samples")
    out = {
        "name": name,
        "command": srv.command(),
        "startup_s": srv.startup_seconds,
        "completed": s["completed"],
        "failed": s["failed"],
        "errors": s["errors"],
        "all_completed": s["failed"] == 0 and s["completed"] == wl.num_requests,
        "generated_tokens_per_request": sorted({r["output_tokens"] for r in s["requests"]}),
        "prompt_tokens_per_request": sorted({r["prompt_tokens"] for r in s["requests"]}),
        "wall_s": s["duration_s"],
        "wall_s_with_warmup": time.perf_counter() - t0,
        "output_token_throughput": s["output_token_throughput"],
        # vLLM's own inter-token latency over the run: the decode step time of the batch a request ran in
        "mean_inter_token_latency_ms": _delta_mean_ms(before, after, "itl_s", "itl_count"),
        "e2e_latency_ms": s["e2e_latency_ms"],
        "ttft_ms": s["ttft_ms"],
        "max_in_flight_client": s["max_concurrency"],
        "max_decoding_client": max_overlap(s["requests"]),
        "series": series_summary(samples),
        "preemptions": (after.get("preemptions") or 0) - (before.get("preemptions") or 0),
        "running_mean_engine": _running_mean_engine(before, after, s["duration_s"], wl.num_requests),
        "ap_blocks_freed": (None if after.get("ap_blocks_freed") is None
                            else after["ap_blocks_freed"] - (before.get("ap_blocks_freed") or 0)),
        "after": after,
        "kv_usage_returned_to_zero": bool(after.get("kv_usage_returned_to_zero")),
        "server_log_kv": _kv_log_lines(srv.log_text()),
        "metric_samples": samples,
    }
    return out


def _delta_mean_ms(before: dict, after: dict, total: str, count: str) -> Optional[float]:
    n = (after.get(count) or 0) - (before.get(count) or 0)
    return 1e3 * ((after.get(total) or 0) - (before.get(total) or 0)) / n if n > 0 else None


def _kv_log_lines(log: str) -> list[str]:
    keys = ("Overriding num_gpu_blocks", "KV cache size", "No common block size")
    return [line.split("] ", 1)[-1][:240] for line in log.splitlines() if any(k in line for k in keys)][:6]


# ----------------------------------------------------------------------------- one image size
def run_case(image_tokens: int, args, model_root: Path) -> dict[str, Any]:
    from ap_vllm.tools.testing.server import VllmServer

    shape = ModelShape(num_kv_heads=args.num_kv_heads, num_heads=2 * args.num_kv_heads, head_dim=args.head_dim)
    rank = args.rank or shape.kv_width // 8
    model_dir = build_model(model_root, image_tokens, shape)
    prompt_tokens, span_start, span_len = prompt_geometry(model_dir, image_tokens, args.prompt)
    plans = {dt: capacity_plan(prompt_tokens=prompt_tokens, span_start=span_start, span_len=span_len,
                               max_tokens=args.max_tokens, shape=shape, rank=rank, block_size=args.block_size,
                               baseline_block_size=args.baseline_block_size, baseline_fit=args.baseline_fit,
                               num_requests=args.num_requests, blocks_override=args.num_gpu_blocks_override,
                               kv_cache_dtype=dt, model_dtype=args.dtype)
             for dt in args.kv_cache_dtypes}
    plan = plans[args.kv_cache_dtypes[0]]
    seq = plan["sequence_tokens"]
    max_model_len = cdiv(seq + 16, 16) * 16
    # One whole prompt (plus every decode) per step, never two: see "Admission" in the module doc.
    batched = max(max_model_len, cdiv(prompt_tokens + args.max_num_seqs + 16, 16) * 16)
    if args.chunk_tokens:
        batched = args.chunk_tokens
    shared = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(batched)]
    if not (args.chunked_prefill or args.chunk_tokens):
        shared.append("--no-enable-chunked-prefill")
    ap_cfg = {"attentionpack": {"key_rank": rank, "value_rank": rank}}
    if args.chunk_tokens:
        ap_cfg["attentionpack"]["chunk_tokens"] = args.chunk_tokens
    specs, server_plans = [], {}
    for dt, pl in plans.items():  # per KV-cache dtype: CPU_ATTN and AttentionPack in the same bytes
        suffix, kv = ("", []) if dt == "auto" else (f"_{dt}", ["--kv-cache-dtype", dt])
        specs += [
            ("baseline" + suffix, ["--attention-backend", "CPU_ATTN", "--block-size", str(args.baseline_block_size),
                                   "--num-gpu-blocks-override", str(pl["baseline"]["num_gpu_blocks_override"])]
             + kv + shared),
            ("attentionpack" + suffix, ["--attention-backend", "attentionpack", "--additional-config",
                                        json.dumps(ap_cfg), "--block-size", str(args.block_size),
                                        "--num-gpu-blocks-override",
                                        str(pl["attentionpack"]["num_gpu_blocks_override"])] + kv + shared),
        ]
        for role in ("baseline", "attentionpack"):
            server_plans[role + suffix] = {**pl[role], "kv_cache_dtype": dt, "kv_budget_tokens": pl["kv_budget_tokens"]}
    wl = sb.Workload(num_requests=args.num_requests, concurrency=args.num_requests, max_tokens=args.max_tokens,
                     image_width=64, image_height=64, prompt=args.prompt, ignore_eos=True,
                     warmup_requests=args.warmup, seed=args.seed + image_tokens,
                     request_timeout=args.request_timeout)
    chats = wl.messages()
    _log(f"[capacity] {image_tokens} image tokens: prompt {prompt_tokens} + {args.max_tokens} generated tokens; "
         f"KV budget {plan['kv_budget_tokens']} tokens (baseline {plan['baseline']['num_gpu_blocks_override']} x "
         f"{args.baseline_block_size}, attentionpack {plan['attentionpack']['num_gpu_blocks_override']} x "
         f"{args.block_size}); rank {rank}; {args.num_requests} requests")

    servers = [VllmServer(model_dir, extra_args=extra, max_model_len=max_model_len,
                          kv_cache_space_gib=args.kv_cache_space_gib, startup_timeout=args.startup_timeout,
                          dtype=args.dtype)
               for _, extra in specs]
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        _start_all(servers, stack, parallel=not args.sequential_start)
        for (name, _), srv in zip(specs, servers):
            _log(f"[capacity] {image_tokens} tokens: {name} ({' '.join(srv.extra_args)})")
            results[name] = run_server(name, srv, wl, chats, args.metrics_interval, not args.no_progress)
            r = results[name]
            _log(f"[capacity]   max running {r['series'].get('running_max')} (sampled), mean running "
                 f"{_fmt(r['running_mean_engine'])} (request time / wall), completed {r['completed']}/"
                 f"{args.num_requests}, preemptions {r['preemptions']}, wall {r['wall_s']:.1f}s, "
                 f"KV usage after {r['after'].get('kv_cache_usage')}")
    first = "" if args.kv_cache_dtypes[0] == "auto" else f"_{args.kv_cache_dtypes[0]}"
    base = results["baseline" + first]["series"].get("running_max")
    ap = results["attentionpack" + first]["series"].get("running_max")
    ratio = ap / base if base else None
    b_mean, a_mean = (results[n + first]["running_mean_engine"] for n in ("baseline", "attentionpack"))
    # every server against every CPU_ATTN server: most running (sampled), mean running, output tokens/s
    head_to_head = {}
    for b_name in (n for n in results if n.startswith("baseline")):
        b = results[b_name]
        for name, r in results.items():
            if name == b_name:
                continue
            head_to_head[f"{name} / {b_name}"] = {
                "max_running": _ratio(r["series"].get("running_max"), b["series"].get("running_max")),
                "mean_running": _ratio(r["running_mean_engine"], b["running_mean_engine"]),
                "output_tokens_per_s": _ratio(r["output_token_throughput"], b["output_token_throughput"]),
            }
    return {
        "image_tokens": image_tokens,
        "model_dir": str(model_dir),
        "model": asdict(shape) | {"kv_width": shape.kv_width},
        "workload": {"num_requests": args.num_requests, "max_tokens": args.max_tokens, "prompt": args.prompt,
                     "ignore_eos": True, "warmup_requests": args.warmup, "max_model_len": max_model_len,
                     "max_num_batched_tokens": batched, "max_num_seqs": args.max_num_seqs},
        "plan": plan,
        "plans": plans,
        "server_plans": server_plans,
        "servers": results,
        "head_to_head": head_to_head,
        "max_running_ratio": ratio,
        "mean_running_ratio": a_mean / b_mean if a_mean is not None and b_mean else None,
        # both servers produce the same tokens: their output throughputs, side by side in one run
        "output_tokens_per_s_ratio": _ratio(results["attentionpack" + first]["output_token_throughput"],
                                            results["baseline" + first]["output_token_throughput"]),
        "target_ratio": args.target_ratio,
        "meets_target": ratio is not None and ratio >= args.target_ratio,
        "all_completed": all(r["all_completed"] for r in results.values()),
        "kv_usage_returned_to_zero": all(r["kv_usage_returned_to_zero"] for r in results.values()),
    }


def _start_all(servers, stack: contextlib.ExitStack, parallel: bool) -> None:
    """Start the servers (in parallel: startup is mostly waiting); they stop when ``stack`` closes."""
    if not parallel:
        for s in servers:
            stack.enter_context(s)
        return
    errors: list[BaseException] = [None] * len(servers)  # type: ignore[list-item]

    def start(i):
        try:
            servers[i].start()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors[i] = exc

    threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, err in zip(servers, errors):
        if err is None:
            stack.callback(s.stop)
    for err in errors:
        if err is not None:
            raise err


# ----------------------------------------------------------------------------- report
def _fmt(v) -> str:
    return sb._fmt(v)


def _ratio(a, b):
    return a / b if a is not None and b else None


def table(report: dict[str, Any]) -> str:
    cols = []
    for case in report["cases"]:
        for name in case["servers"]:
            cols.append((case, name))
    header = ["metric"] + [f"{c['image_tokens']} img / {n}" for c, n in cols]

    def plan_of(c, n):
        return c["server_plans"][n] if "server_plans" in c else c["plan"][n]

    rows = [
        ("block size x blocks", lambda c, n: f"{plan_of(c, n)['block_size']} x {plan_of(c, n)['num_gpu_blocks_override']}"),
        ("KV cache dtype", lambda c, n: plan_of(c, n).get("kv_cache_dtype", "auto")),
        ("KV budget (exact tokens)", lambda c, n: plan_of(c, n).get("kv_budget_tokens", c["plan"]["kv_budget_tokens"])),
        ("prompt + generated", lambda c, n: f"{c['plan']['prompt_tokens']} + {c['workload']['max_tokens']}"),
        ("blocks/request prompt", lambda c, n: plan_of(c, n).get("blocks_per_request_prompt",
                                                                plan_of(c, n).get("blocks_per_request_prompt_exact"))),
        ("blocks/request compacted", lambda c, n: plan_of(c, n).get("blocks_per_request_compacted")),
        ("blocks/request at end", lambda c, n: plan_of(c, n)["blocks_per_request_full"]),
        ("predicted max running", lambda c, n: _range(plan_of(c, n)["predicted_max_running"])),
        ("max running (server)", lambda c, n: c["servers"][n]["series"].get("running_max")),
        ("max decoding (client)", lambda c, n: c["servers"][n]["max_decoding_client"]),
        ("mean running while busy", lambda c, n: c["servers"][n]["series"].get("running_mean_while_busy")),
        ("mean running (req time/wall)", lambda c, n: c["servers"][n]["running_mean_engine"]),
        ("max waiting (server)", lambda c, n: c["servers"][n]["series"].get("waiting_max")),
        ("KV usage max (%)", lambda c, n: sb._pct(c["servers"][n]["series"].get("kv_cache_usage_max"))),
        ("preemptions", lambda c, n: c["servers"][n]["preemptions"]),
        ("AP blocks freed", lambda c, n: c["servers"][n]["ap_blocks_freed"]),
        ("completed / sent", lambda c, n: f"{c['servers'][n]['completed']} / {c['workload']['num_requests']}"),
        ("wall (s)", lambda c, n: c["servers"][n]["wall_s"]),
        ("output tokens/s", lambda c, n: c["servers"][n]["output_token_throughput"]),
        ("mean inter-token latency (ms)", lambda c, n: c["servers"][n].get("mean_inter_token_latency_ms")),
        ("KV usage after (%)", lambda c, n: sb._pct(c["servers"][n]["after"].get("kv_cache_usage"))),
    ]
    out = [header]
    for label, get in rows:
        out.append([label] + [_fmt(get(c, n)) for c, n in cols])
    widths = [max(len(r[i]) for r in out) for i in range(len(header))]
    lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))) for r in out]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for case in report["cases"]:
        pr = case["plan"]["predicted_ratio"]
        lines.append(f"{case['image_tokens']} image tokens: max running attentionpack / baseline = "
                     f"{_fmt(case['max_running_ratio'])}x, mean running "
                     f"{_fmt(case['mean_running_ratio'])}x (predicted {pr[0]:.2f}-{pr[1]:.2f}x, target >= "
                     f"{case['target_ratio']}x: {'met' if case['meets_target'] else 'NOT met'}); all completed: "
                     f"{case['all_completed']}; KV usage back to 0: {case['kv_usage_returned_to_zero']}")
        for pair, r in case.get("head_to_head", {}).items():
            if len(case["servers"]) > 2:
                lines.append(f"{case['image_tokens']} image tokens: {pair}: max running {_fmt(r['max_running'])}x, "
                             f"mean running {_fmt(r['mean_running'])}x, output tokens/s "
                             f"{_fmt(r['output_tokens_per_s'])}x")
        if case.get("output_tokens_per_s_ratio") is not None:
            lines.append(f"{case['image_tokens']} image tokens: output tokens/s attentionpack / baseline = "
                         f"{_fmt(case['output_tokens_per_s_ratio'])}x")
    return "\n".join(lines)


def _range(v):
    if isinstance(v, (list, tuple)):
        return str(v[0]) if v[0] == v[1] else f"{v[0]}-{v[1]}"
    return v


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="capacity_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-tokens", type=int, nargs="+", default=None,
                   help="image tokens per request, perfect squares (default: 4096 1024; --quick: 256)")
    p.add_argument("--num-requests", "-n", type=int, default=None, help="requests sent at once (default 24; quick 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 256; quick 32)")
    p.add_argument("--rank", type=int, default=None, help="key_rank = value_rank (default H*d/8: 16 for 2 x 64)")
    p.add_argument("--num-kv-heads", type=int, default=2, help="KV heads of the tiny VLM (query heads: twice)")
    p.add_argument("--head-dim", type=int, default=64, help="head size of the tiny VLM (H*d = heads x this)")
    p.add_argument("--block-size", type=int, default=16, help="AttentionPack server block size")
    p.add_argument("--baseline-block-size", type=int, default=32,
                   help="CPU_ATTN block size (vLLM CPU: a multiple of 32)")
    p.add_argument("--baseline-fit", type=float, default=None,
                   help="KV budget = this many full-length exact requests (default 3.5; quick 2.5)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="baseline blocks (N_base) instead of --baseline-fit; AttentionPack gets the same bytes")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], choices=["auto", "fp8"],
                   help="one CPU_ATTN + one AttentionPack server per KV-cache dtype, all in the same KV bytes "
                        "(fp8: --kv-cache-dtype fp8; AttentionPack then stores FP8 coefficients)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model dtype of every server (bfloat16: fp8 pages hold 2x the tokens, as on a GPU)")
    p.add_argument("--chunked-prefill", action="store_true",
                   help="keep vLLM's chunked prefill on (then num_requests_running also counts requests "
                        "admitted with only the text before their image; see the module doc)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="prefill in steps of this many tokens; AttentionPack compacts images in chunks of this size")
    p.add_argument("--target-ratio", type=float, default=4.0)
    p.add_argument("--prompt", default="Describe the image in detail.")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per server first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small run for tests: 256 image tokens, 8 requests, 32 tokens")
    p.add_argument("--model-root", help="where to build the tiny VLMs (default: a temporary directory)")
    p.add_argument("--kv-cache-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (only an upper bound)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--sequential-start", action="store_true", help="start the two servers one after the other")
    p.add_argument("--metrics-interval", type=float, default=None,
                   help="seconds between /metrics samples (default 0.25; quick 0.02: its runs last ~1 s)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/capacity_<time>.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve(args) -> argparse.Namespace:
    q = args.quick
    for name, full, quick in (("image_tokens", [4096, 1024], [256]), ("num_requests", 24, 8),
                              ("max_tokens", 256, 32), ("baseline_fit", 3.5, 2.5),
                              ("metrics_interval", 0.25, 0.02)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    for n in args.image_tokens:
        if math.isqrt(n) ** 2 != n:
            raise SystemExit(f"--image-tokens {n}: must be a perfect square")
    if args.baseline_block_size % args.block_size and args.block_size % args.baseline_block_size:
        raise SystemExit("--block-size and --baseline-block-size must divide one another (same KV bytes)")
    return args


def run(args) -> dict[str, Any]:
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = Path(args.model_root) if args.model_root else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="ap_capacity_")))
        root.mkdir(parents=True, exist_ok=True)
        cases = [run_case(n, args, root) for n in args.image_tokens]
    report = {
        "benchmark": "ap-vllm capacity-bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": vars(args),
        "total_s": time.perf_counter() - t0,
        "cases": cases,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"capacity_{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(report, out)
    report["path"] = str(out)
    print(table(report))
    print(f"\nresults: {out} ({report['total_s']:.0f} s)")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    report = run(args)
    ok = all(c["all_completed"] and c["kv_usage_returned_to_zero"] for c in report["cases"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
