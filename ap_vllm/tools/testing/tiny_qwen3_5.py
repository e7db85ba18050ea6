"""Build a tiny Qwen3.5 (hybrid: Gated DeltaNet + gated attention) VLM with random weights, offline, in seconds.

The result is a normal Hugging Face model directory that transformers and vLLM's real loader (CPU) load::

    python -m ap_vllm.tools.testing.tiny_qwen3_5 /tmp/tiny-qwen3.5 --image-tokens 2304

Architecture: ``Qwen3_5ForConditionalGeneration`` (``model_type="qwen3_5"``), natively multimodal with Qwen3-VL's
vision tower and processors (:mod:`ap_vllm.tools.testing.tiny_qwen3_vl`). Its text model is *hybrid*: most layers
are linear attention (Gated DeltaNet: a fixed-size recurrent state a request, no KV cache) and every
``full_attention_interval``-th layer is softmax attention with an output gate, RMS-normed queries and keys, and
interleaved M-RoPE on a ``partial_rotary_factor`` share of each head. Only those layers have a KV cache, and only
they run AttentionPack. Defaults: hidden 128, 4 layers (linear, full, linear, full), 4 q / 4 kv heads of 64
(H*d = 256 numbers a token), linear attention of one 128-dim key and value head (vLLM's CPU kernel takes 128-dim
heads only); bfloat16 weights (vLLM's CPU Gated DeltaNet runs in bfloat16 only).

vLLM pages the linear layers' states and the attention layers' KV in one pool, so it makes the attention block as
large as a state: 96 tokens here with ``--block-size 32`` (the smallest multiple of it that holds a state), several
hundred for the released models. A span frees memory only from a few blocks long (the backend logs the shortest span
that does), and vLLM caches the linear layers' states for prefix caching at block boundaries only.

``value_rank``: the attention layers' value projections have rank ``value_rank`` (as
:func:`ap_vllm.tools.testing.tiny_qwen2_5_vl.build_tiny_qwen2_5_vl`): compaction at keys ``H*d`` and values
``value_rank`` loses nothing but bfloat16 rounding.

Without torchvision: :func:`ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim` in every vLLM process, as
for Qwen3-VL.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ap_vllm.tools.testing.tiny_qwen2_5_vl import (CHAT_TEMPLATE, IMAGE_PAD, SPECIAL, VIDEO_PAD, VISION_END,
                                                   VISION_START, chat_tokenizer, check_shapes, write_model)
from ap_vllm.tools.testing.tiny_qwen2_5_vl import main as qwen_vl_main  # (the builders' command line)
from ap_vllm.tools.testing.tiny_qwen3_vl import vision_config, write_processors

LINEAR_HEAD_DIM = 128  # vLLM's CPU Gated DeltaNet kernel (chunk_gated_delta_rule_cpu) takes this size only


def build_tiny_qwen3_5(out: Path, *, image_tokens: int = 2304, num_layers: int = 4, full_attention_interval: int = 2,
                       num_heads: int = 4, num_kv_heads: int = 4, head_dim: int = 64, hidden_size: int = 128,
                       partial_rotary_factor: float = 0.25, value_rank: Optional[int] = None, vocab_size: int = 1024,
                       seed: int = 0, video_tokens: int = 2304) -> Path:
    """Writes the model directory ``out`` (see the module docstring) and returns it: layer ``i`` is softmax
    attention when ``(i + 1) % full_attention_interval == 0``, linear attention otherwise; ``image_tokens`` must be
    a perfect square; ``head_dim * partial_rotary_factor`` (the rotary dimensions) a multiple of 4."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    rotary = round(head_dim * partial_rotary_factor)
    check_shapes("head_dim * partial_rotary_factor", rotary, image_tokens=image_tokens)
    if not 1 <= full_attention_interval <= num_layers:
        raise ValueError(f"full_attention_interval={full_attention_interval} is not allowed: between 1 and "
                         f"num_layers={num_layers}, so that some layer is softmax attention")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast, ids = chat_tokenizer(vocab_size, SPECIAL, CHAT_TEMPLATE)
    pairs = rotary // 2  # rotary pairs, (time, row, column) interleaved as Qwen3.5's [11, 11, 10] of 32
    mrope = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    layer_types = ["full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                   for i in range(num_layers)]
    config = Qwen3_5Config(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, layer_types=layer_types, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, hidden_act="silu", partial_rotary_factor=partial_rotary_factor,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": mrope,
                                          "mrope_interleaved": True, "partial_rotary_factor": partial_rotary_factor},
                         linear_conv_kernel_dim=4, linear_key_head_dim=LINEAR_HEAD_DIM,
                         linear_value_head_dim=LINEAR_HEAD_DIM, linear_num_key_heads=1, linear_num_value_heads=1,
                         tie_word_embeddings=False),
        vision_config=vision_config(hidden_size),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False)
    write_model(Qwen3_5ForConditionalGeneration, config, out, fast, ids, seed=seed, value_rank=value_rank,
                dtype="bfloat16")
    write_processors(out, image_tokens, video_tokens)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    return qwen_vl_main(argv, build_tiny_qwen3_5, __doc__)


if __name__ == "__main__":
    sys.exit(main())
