"""``ap-vllm`` command line: thin wrappers around the project's tools.

    ap-vllm eval --model-dir DIR --data questions.jsonl --ranks 16,32,64
    ap-vllm eval --model-dir DIR --data prompts.jsonl --ranks 64,128 \
        --attentionpack-config '{"compact_text": true}'      # {"prompt": ...} lines: text-only
    ap-vllm tiny-vlm OUT_DIR --image-tokens 1024

The serving benchmark is ``python benchmarks/serve_bench.py`` of a source checkout (the benchmarks are not
part of the wheel, and nothing installed imports them).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_eval(argv: Sequence[str]) -> int:
    from ap_vllm.tools import eval as ap_eval

    return ap_eval.main(list(argv), prog="ap-vllm eval")


def _cmd_tiny_vlm(argv: Sequence[str]) -> int:
    from ap_vllm.tools.testing import tiny_vlm

    return tiny_vlm.main(list(argv))


COMMANDS = {
    "eval": (_cmd_eval, "quality vs rank: AttentionPack against vLLM's default backend (offline, greedy)"),
    "tiny-vlm": (_cmd_tiny_vlm, "write a tiny random-weight VLM for offline tests"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="ap-vllm", description="AttentionPack for vLLM: tools. `ap-vllm COMMAND --help` for details.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<12} {h}" for k, (_, h) in COMMANDS.items()))
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    # Everything after the command goes to it untouched (its own --help included).
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    rc = COMMANDS[args.command][0](argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
