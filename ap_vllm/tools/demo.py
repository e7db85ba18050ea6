"""The README's demo: build a tiny VLM offline, serve it with AttentionPack, ask about an image.

    python -m ap_vllm.tools.demo [--image-tokens 256] [--keep-model DIR]

Everything runs on CPU in about a minute: the model has random weights (its answer is
gibberish by construction), the point is the real path: ``vllm serve MODEL
--attention-backend attentionpack`` answering an OpenAI chat request that carries an image.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ap_vllm.tools.testing.server import VllmServer, image_data_url
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-tokens", type=int, default=1024, help="visual tokens per image (a perfect square)")
    ap.add_argument("--keep-model", type=Path, default=None, help="build the model here and keep it")
    ap.add_argument("--attentionpack-config", default='{"key_rank": 16, "value_rank": 16}',
                    help="JSON for additional_config.attentionpack (the tiny model has H*d = 128: R = 16 stores 8x "
                         "fewer numbers per visual token)")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size (small blocks free more of a span)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ap_vllm_demo_") as tmp:
        model_dir = args.keep_model or Path(tmp) / "tiny-vlm"
        t0 = time.monotonic()
        build_tiny_vlm(model_dir, image_tokens=args.image_tokens)
        print(f"[demo] built a tiny Idefics3 VLM in {time.monotonic() - t0:.1f}s: {model_dir}")
        extra = ["--attention-backend", "attentionpack", "--block-size", str(args.block_size),
                 "--additional-config", json.dumps({"attentionpack": json.loads(args.attentionpack_config)})]
        print("[demo] starting: vllm serve", model_dir, " ".join(extra))
        with VllmServer(model_dir, extra_args=extra, executor="mp") as server:  # (as vllm serve runs on CPU)
            print(f"[demo] server healthy at {server.base_url} after {server.startup_seconds:.0f}s (pid {server.pid})")
            reply = server.client().chat.completions.create(
                model=server.model_name,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(width=96, height=64)}},
                    {"type": "text", "text": "What is in this picture?"},
                ]}],
                max_tokens=24, temperature=0.0,
            )
            usage = reply.usage
            print(f"[demo] prompt tokens: {usage.prompt_tokens} (incl. {args.image_tokens} image tokens), "
                  f"completion tokens: {usage.completion_tokens}")
            print(f"[demo] answer (random weights): {reply.choices[0].message.content!r}")
            time.sleep(1.0)  # the engine's stats reach /metrics with its next step
            shown = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in server.metrics().splitlines()
                     if line.startswith(("attentionpack:blocks_freed_total", "attentionpack:compaction_ratio"))}
            print("[demo] KV blocks returned to vLLM's pool by compaction: "
                  f"{shown.get('attentionpack:blocks_freed_total', 0):.0f} "
                  f"(span blocks / compact blocks: {shown.get('attentionpack:compaction_ratio', 0):.1f})")
        print("[demo] server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
