"""Serving benchmark: the same image-chat workload against AttentionPack and a baseline endpoint.

Against running OpenAI-compatible servers (e.g. two `vllm serve` instances)::

    python benchmarks/serve_bench.py \\
        --endpoint attentionpack=http://localhost:8000 --endpoint baseline=http://localhost:8001 \\
        --num-requests 256 --concurrency 64 --max-tokens 128 --image-size 448x448

Or let it start the two servers itself from a local model directory, one after the other
(AttentionPack first, then the baseline: ``--attention-backend CPU_ATTN`` on CPU, vLLM's default
backend on GPU)::

    python benchmarks/serve_bench.py --model-dir /models/Qwen2.5-VL-7B-Instruct \\
        --ap-config '{"key_rank": 64, "value_rank": 64}' --num-requests 128 --concurrency 32

Every request is one streamed chat completion with one synthetic image (a different image per
request, so prefix caching does not share them) and a text question; ``ignore_eos`` makes every
request produce exactly ``--max-tokens`` tokens. Measured per endpoint: requests/s and output
tokens/s over the whole run, TTFT, inter-token latency (gaps between streamed tokens) and time per
output token percentiles, the most requests in flight on the client, and, sampled from
``/metrics`` during the run, ``vllm:kv_cache_usage_perc`` and ``vllm:num_requests_running`` /
``vllm:num_requests_waiting``. Prints a side-by-side table and writes JSON
(default ``benchmarks/results/serve_bench-<time>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout root, for `benchmarks.*` and `ap_vllm`
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402

# Gauges sampled from /metrics (names as in vllm/v1/metrics/loggers.py, vLLM 0.32/0.33).
KV_USAGE = "vllm:kv_cache_usage_perc"  # fraction 0..1 despite the name
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
PERCENTILES = (50, 90, 99)


# ----------------------------------------------------------------------------- workload
@dataclass
class Workload:
    num_requests: int = 32
    concurrency: int = 8
    max_tokens: int = 64
    image_width: int = 448
    image_height: int = 448
    images_per_request: int = 1
    prompt: str = "Describe the image in detail."
    ignore_eos: bool = True
    temperature: float = 0.0
    warmup_requests: int = 1
    seed: int = 0
    request_timeout: float = 600.0

    def messages(self) -> list[list[dict[str, Any]]]:
        """One chat (list of messages) per request; image i of request r has seed (seed, r, i)."""
        from ap_vllm.tools.testing.server import image_data_url

        chats = []
        for r in range(self.num_requests + self.warmup_requests):
            parts = [{"type": "image_url", "image_url": {"url": image_data_url(
                width=self.image_width, height=self.image_height,
                seed=self.seed * 1_000_003 + r * 101 + i)}} for i in range(self.images_per_request)]
            parts.append({"type": "text", "text": self.prompt})
            chats.append([{"role": "user", "content": parts}])
        return chats


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: Optional[float] = None
    itls: list[float] = field(default_factory=list)  # gaps between streamed token chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: Optional[str] = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ----------------------------------------------------------------------------- /metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str, names: Sequence[str]) -> dict[str, list[float]]:
    """Values of the wanted series (one per label set, e.g. per engine) from Prometheus text."""
    out: dict[str, list[float]] = {n: [] for n in names}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m and m.group(1) in out:
            try:
                out[m.group(1)].append(float(m.group(3)))
            except ValueError:
                pass
    return out


async def sample_metrics(http, base_url: str, interval: float, samples: list[dict], stop: asyncio.Event):
    """Poll GET /metrics until ``stop`` is set; append {t, kv_cache_usage, running, waiting}."""
    t0 = time.perf_counter()
    while True:
        try:
            r = await http.get(base_url + "/metrics", timeout=10.0)
            vals = parse_prometheus(r.text, (KV_USAGE, RUNNING, WAITING))
            samples.append({
                "t": time.perf_counter() - t0,
                "kv_cache_usage": max(vals[KV_USAGE]) if vals[KV_USAGE] else None,
                "running": sum(vals[RUNNING]) if vals[RUNNING] else None,
                "waiting": sum(vals[WAITING]) if vals[WAITING] else None,
            })
        except Exception as exc:  # keep sampling; a scrape may fail under load
            samples.append({"t": time.perf_counter() - t0, "error": repr(exc)[:200]})
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except asyncio.TimeoutError:
            pass


# ----------------------------------------------------------------------------- client
async def one_request(client, model: str, messages, wl: Workload) -> RequestResult:
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    last = None
    chunks = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=wl.max_tokens, temperature=wl.temperature,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": wl.ignore_eos, "min_tokens": wl.max_tokens if wl.ignore_eos else 0},
            timeout=wl.request_timeout)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens or 0
                res.prompt_tokens = chunk.usage.prompt_tokens or 0
            if chunk.choices and (chunk.choices[0].delta.content or "") != "":
                chunks += 1
                if last is None:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
        res.end = time.perf_counter()
        if res.output_tokens == 0:
            res.output_tokens = chunks
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no tokens streamed"
    except Exception as exc:
        res.end = time.perf_counter()
        res.error = f"{type(exc).__name__}: {exc}"[:500]
    return res


async def discover_model(http, base_url: str) -> str:
    r = await http.get(base_url + "/v1/models", timeout=30.0)
    r.raise_for_status()
    data = r.json()["data"]
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return data[0]["id"]


async def run_endpoint(name: str, base_url: str, wl: Workload, chats, model: Optional[str] = None,
                       metrics_interval: float = 0.5, progress: bool = True,
                       after_warmup=None) -> dict[str, Any]:
    """Run the workload against one endpoint; return its summary (and raw samples).

    ``after_warmup``: an async callable awaited once the warm-up requests are done, before the
    measured ones are sent (e.g. to read counters that should not include the warm-up)."""
    import httpx
    import openai

    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    limits = httpx.Limits(max_connections=wl.concurrency + 8, max_keepalive_connections=wl.concurrency + 8)
    async with httpx.AsyncClient(limits=limits) as http:
        model = model or await discover_model(http, base_url)
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                    max_retries=0, http_client=httpx.AsyncClient(limits=limits, timeout=None))
        try:
            for i in range(wl.warmup_requests):  # not measured: first-request costs (compilation, caches)
                w = await one_request(client, model, chats[wl.num_requests + i], wl)
                if not w.ok:
                    raise RuntimeError(f"{name}: warm-up request failed: {w.error}")
            if after_warmup is not None:
                await after_warmup()

            sem = asyncio.Semaphore(wl.concurrency)
            in_flight = 0
            max_in_flight = 0
            samples: list[dict] = []
            stop = asyncio.Event()
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=wl.num_requests, desc=f"{name:>14}", unit="req", file=sys.stderr,
                           dynamic_ncols=True)

            async def worker(messages):
                nonlocal in_flight, max_in_flight
                async with sem:
                    in_flight += 1
                    max_in_flight = max(max_in_flight, in_flight)
                    try:
                        return await one_request(client, model, messages, wl)
                    finally:
                        in_flight -= 1
                        if bar is not None:
                            bar.update(1)

            sampler = asyncio.create_task(sample_metrics(http, base_url, metrics_interval, samples, stop))
            t0 = time.perf_counter()
            results = await asyncio.gather(*(worker(m) for m in chats[: wl.num_requests]))
            duration = time.perf_counter() - t0
            stop.set()
            await sampler
            if bar is not None:
                bar.close()
        finally:
            await client.close()
    return summarize(name, base_url, model, wl, results, duration, max_in_flight, samples)


# ----------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], p: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def dist(values: Sequence[float], scale: float = 1000.0) -> dict[str, Optional[float]]:
    """mean and percentiles, in milliseconds by default."""
    vals = [v * scale for v in values]
    out = {"mean": statistics.fmean(vals) if vals else None}
    out.update({f"p{p}": percentile(vals, p) for p in PERCENTILES})
    out["max"] = max(vals) if vals else None
    return out


def summarize(name, base_url, model, wl: Workload, results: list[RequestResult], duration: float,
              max_in_flight: int, samples: list[dict]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    kv = [s["kv_cache_usage"] for s in samples if s.get("kv_cache_usage") is not None]
    running = [s["running"] for s in samples if s.get("running") is not None]
    waiting = [s["waiting"] for s in samples if s.get("waiting") is not None]
    return {
        "name": name,
        "base_url": base_url,
        "model": model,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_token_throughput": out_tokens / duration if duration > 0 else None,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "mean_prompt_tokens": statistics.fmean([r.prompt_tokens for r in ok]) if ok else None,
        "ttft_ms": dist([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": dist([x for r in ok for x in r.itls]),
        "tpot_ms": dist([r.tpot for r in ok if r.tpot is not None]),
        "e2e_latency_ms": dist([r.latency for r in ok]),
        "max_concurrency": max_in_flight,
        "server": {
            "samples": len(samples),
            "kv_cache_usage_max": max(kv) if kv else None,
            "kv_cache_usage_mean": statistics.fmean(kv) if kv else None,
            "num_requests_running_max": max(running) if running else None,
            "num_requests_running_mean": statistics.fmean(running) if running else None,
            "num_requests_waiting_max": max(waiting) if waiting else None,
        },
        "metric_samples": samples,
        "requests": [{"ok": r.ok, "ttft_s": r.ttft, "latency_s": r.latency, "output_tokens": r.output_tokens,
                      "prompt_tokens": r.prompt_tokens, "error": r.error} for r in results],
    }


TABLE_ROWS = [
    ("completed / failed", lambda s: f"{s['completed']} / {s['failed']}", None),
    ("duration (s)", lambda s: s["duration_s"], None),
    ("requests/s", lambda s: s["request_throughput"], "higher"),
    ("output tokens/s", lambda s: s["output_token_throughput"], "higher"),
    ("mean prompt tokens", lambda s: s["mean_prompt_tokens"], None),
    ("TTFT mean (ms)", lambda s: s["ttft_ms"]["mean"], "lower"),
    ("TTFT p50 (ms)", lambda s: s["ttft_ms"]["p50"], "lower"),
    ("TTFT p99 (ms)", lambda s: s["ttft_ms"]["p99"], "lower"),
    ("ITL mean (ms)", lambda s: s["itl_ms"]["mean"], "lower"),
    ("ITL p50 (ms)", lambda s: s["itl_ms"]["p50"], "lower"),
    ("ITL p99 (ms)", lambda s: s["itl_ms"]["p99"], "lower"),
    ("TPOT mean (ms)", lambda s: s["tpot_ms"]["mean"], "lower"),
    ("max concurrency (client)", lambda s: s["max_concurrency"], None),
    ("max running (server)", lambda s: s["server"]["num_requests_running_max"], None),
    ("max waiting (server)", lambda s: s["server"]["num_requests_waiting_max"], None),
    ("KV usage max (%)", lambda s: _pct(s["server"]["kv_cache_usage_max"]), None),
    ("KV usage mean (%)", lambda s: _pct(s["server"]["kv_cache_usage_mean"]), None),
]


def _pct(x):
    return None if x is None else 100.0 * x


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return f"{int(v)}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"


def table(summaries: list[dict[str, Any]]) -> str:
    """Side-by-side table; with two endpoints a ratio column (first / second)."""
    names = [s["name"] for s in summaries]
    header = ["metric", *names] + (["ratio"] if len(summaries) == 2 else [])
    rows = [header]
    for label, get, _ in TABLE_ROWS:
        vals = [get(s) for s in summaries]
        row = [label, *(_fmt(v) for v in vals)]
        if len(summaries) == 2:
            a, b = vals
            ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b not in (0, None)
            row.append(f"{a / b:.3f}x" if ok else "")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- orchestration
def parse_endpoint(spec: str) -> tuple[str, str]:
    name, sep, url = spec.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"--endpoint wants NAME=http://host:port, got {spec!r}")
    return name, url


def parse_size(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:[xX](\d+))?", spec)
    if not m:
        raise argparse.ArgumentTypeError(f"--image-size wants W or WxH, got {spec!r}")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def default_baseline_backend() -> Optional[str]:
    """CPU_ATTN on a CPU-only machine; on GPU vLLM's own default (no flag)."""
    try:
        import torch

        return None if torch.cuda.is_available() else "CPU_ATTN"
    except ImportError:
        return "CPU_ATTN"


def server_specs(args) -> list[tuple[str, list[str]]]:
    ap_extra = ["--attention-backend", "attentionpack"]
    if args.ap_config:
        cfg = json.loads(args.ap_config)
        if "attentionpack" not in cfg:
            cfg = {"attentionpack": cfg}
        ap_extra += ["--additional-config", json.dumps(cfg)]
    base = args.baseline_backend if args.baseline_backend != "auto" else default_baseline_backend()
    base_extra = ["--attention-backend", base] if base and base.lower() != "default" else []
    shared = list(args.server_arg or [])
    return [("attentionpack", ap_extra + shared), ("baseline", base_extra + shared)]


async def _run_all(endpoints, wl, chats, model, interval, progress):
    out = []
    for name, url in endpoints:
        out.append(await run_endpoint(name, url, wl, chats, model=model, metrics_interval=interval,
                                      progress=progress))
    return out


def run(args) -> dict[str, Any]:
    wl = Workload(num_requests=args.num_requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                  image_width=args.image_size[0], image_height=args.image_size[1],
                  images_per_request=args.images_per_request, prompt=args.prompt,
                  ignore_eos=not args.no_ignore_eos, warmup_requests=args.warmup, seed=args.seed,
                  request_timeout=args.request_timeout)
    chats = wl.messages()
    progress = not args.no_progress
    summaries: list[dict[str, Any]] = []
    servers_info = []
    if args.model_dir:
        from ap_vllm.tools.testing.server import VllmServer

        for name, extra in server_specs(args):
            kw = dict(extra_args=extra, max_model_len=args.max_model_len,
                      dtype=None if args.dtype == "auto" else args.dtype,
                      kv_cache_space_gib=args.kv_cache_space_gib, enforce_eager=not args.no_enforce_eager,
                      startup_timeout=args.startup_timeout)
            print(f"[serve-bench] starting {name}: vllm serve {args.model_dir} {' '.join(extra)}", file=sys.stderr)
            with VllmServer(args.model_dir, **kw) as srv:
                servers_info.append({"name": name, "command": srv.command(), "startup_s": srv.startup_seconds})
                summaries += asyncio.run(_run_all([(name, srv.base_url)], wl, chats, args.model,
                                                  args.metrics_interval, progress))
    else:
        if not args.endpoint:
            raise SystemExit("give --endpoint NAME=URL (one or two) or --model-dir")
        summaries = asyncio.run(_run_all(args.endpoint, wl, chats, args.model, args.metrics_interval, progress))

    report = {
        "benchmark": "ap-vllm serve-bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "workload": asdict(wl),
        "servers": servers_info,
        "endpoints": {s["name"]: s for s in summaries},
        "order": [s["name"] for s in summaries],
    }
    if len(summaries) == 2:
        a, b = summaries
        def ratio(x, y):
            return x / y if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None
        report["comparison"] = {
            "of": f"{a['name']} / {b['name']}",
            "request_throughput": ratio(a["request_throughput"], b["request_throughput"]),
            "output_token_throughput": ratio(a["output_token_throughput"], b["output_token_throughput"]),
            "ttft_p50": ratio(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
            "itl_p50": ratio(a["itl_ms"]["p50"], b["itl_ms"]["p50"]),
            "kv_cache_usage_max": ratio(a["server"]["kv_cache_usage_max"], b["server"]["kv_cache_usage_max"]),
        }
    out = Path(args.out) if args.out else RESULTS_DIR / f"serve_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(report, out)
    report["path"] = str(out)
    print(table(summaries))
    print(f"\nresults: {out}")
    return report


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="serve_bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    tgt = p.add_argument_group("targets (either --endpoint ... or --model-dir)")
    tgt.add_argument("--endpoint", action="append", type=parse_endpoint, metavar="NAME=URL",
                     help="an OpenAI-compatible server (base URL, with or without /v1); repeat for two. "
                          "The ratio column is first / second.")
    tgt.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    tgt.add_argument("--model-dir", help="start `vllm serve` on this model twice (AttentionPack, then baseline)")
    tgt.add_argument("--ap-config", help="AttentionPack fields as JSON, e.g. '{\"key_rank\": 64}' (--model-dir)")
    tgt.add_argument("--baseline-backend", default="auto",
                     help="baseline --attention-backend (--model-dir); auto = CPU_ATTN on CPU, vLLM's default "
                          "on GPU; 'default' = no flag")
    tgt.add_argument("--server-arg", action="append", metavar="ARG",
                     help="extra `vllm serve` argument for both servers (repeat; use --server-arg=--flag)")
    tgt.add_argument("--max-model-len", type=int, default=8192)
    tgt.add_argument("--dtype", default="auto")
    tgt.add_argument("--kv-cache-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (CPU servers)")
    tgt.add_argument("--no-enforce-eager", action="store_true", help="let the servers compile (slower start)")
    tgt.add_argument("--startup-timeout", type=float, default=600.0)
    wl = p.add_argument_group("workload")
    wl.add_argument("--num-requests", "-n", type=int, default=32)
    wl.add_argument("--concurrency", "-c", type=int, default=8, help="requests in flight at most")
    wl.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    wl.add_argument("--image-size", type=parse_size, default=(448, 448), metavar="WxH")
    wl.add_argument("--images-per-request", type=int, default=1)
    wl.add_argument("--prompt", default="Describe the image in detail.")
    wl.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    wl.add_argument("--warmup", type=int, default=1, help="unmeasured requests per endpoint first")
    wl.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    wl.add_argument("--request-timeout", type=float, default=600.0)
    o = p.add_argument_group("output")
    o.add_argument("--out", help="JSON path (default benchmarks/results/serve_bench-<time>.json)")
    o.add_argument("--metrics-interval", type=float, default=0.5, help="seconds between /metrics samples")
    o.add_argument("--no-progress", action="store_true")
    return p


def validate(args) -> None:
    for name in ("num_requests", "concurrency", "max_tokens", "images_per_request"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.endpoint and args.model_dir:
        raise SystemExit("give either --endpoint or --model-dir, not both")
    if args.endpoint and len(args.endpoint) > 2:
        raise SystemExit("at most two --endpoint")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    report = run(args)
    failed = sum(s["failed"] for s in report["endpoints"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
