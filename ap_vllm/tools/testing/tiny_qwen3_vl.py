"""Build a tiny Qwen3-VL with random weights, offline, in seconds; serve it without torchvision.

The result is a normal Hugging Face model directory that transformers and vLLM's real loader (CPU) load::

    python -m ap_vllm.tools.testing.tiny_qwen3_vl /tmp/tiny-qwen3 --image-tokens 1024

Architecture: ``Qwen3VLForConditionalGeneration`` (``model_type="qwen3_vl"``): a Qwen3 text model (RMS-normed
queries and keys) with interleaved multi-axis rotary positions (M-RoPE: the (time, row, column) sections of
``mrope_section`` interleaved over the rotary pairs), and Qwen3-VL's ViT (16-pixel patches, learned position
embeddings, a 2x2 patch merger) whose *deepstack* mergers add features of its early layers to the first text
layers' hidden states at the visual tokens. Defaults: hidden 128, 4 q / 2 kv heads of 32 (CPU_ATTN needs head sizes
>= 32), 2 layers; a 2-layer vision tower of width 32, deepstack from its first layer.

Tokens per image: every image is resized to an area of ``(32 * sqrt(image_tokens))**2`` pixels (aspect ratio kept,
sides multiples of 32), each 32x32 square one token after the merger; ``<|vision_start|><|image_pad|>...
<|vision_end|>`` per image, as Qwen2.5-VL.

Videos: Qwen3-VL's video processor bounds the pixels of the whole clip (frames x height x width), here to
``video_tokens`` tokens' worth (``2 * 32 * 32`` pixels a token: two frames of a 32x32 square), so a video of any
length comes to about ``video_tokens`` tokens. Unlike Qwen2.5-VL, Qwen3-VL writes each two-frame step as its own run,
after a plain-text timestamp: ``<0.5 seconds><|vision_start|><|video_pad|>...
<|vision_end|><1.5 seconds><|vision_start|>...``; vLLM's placeholder of the video is that whole run (its embedding
positions the ``<|video_pad|>`` tokens only).

``value_rank``: as :func:`ap_vllm.tools.testing.tiny_qwen2_5_vl.build_tiny_qwen2_5_vl` (values of rank
``value_rank``, keys full rank: compaction at ``H*d`` / ``value_rank`` loses nothing).

Without torchvision vLLM cannot load the model: :func:`ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim`
(in every vLLM process, from a ``sitecustomize``) is needed; it stands in Qwen3-VL's video processor too.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from ap_vllm.tools.testing.tiny_qwen2_5_vl import (CHAT_TEMPLATE, ENDOFTEXT, IM_END, IMAGE_PAD, SPECIAL, VIDEO_PAD,
                                                   VISION_END, VISION_START, chat_tokenizer, check_shapes,
                                                   write_model)
from ap_vllm.tools.testing.tiny_qwen2_5_vl import main as qwen_vl_main  # (the builders' command line)

PATCH, MERGE = 16, 2
MEAN = STD = (0.5, 0.5, 0.5)  # Qwen3-VL's processors: IMAGENET_STANDARD_MEAN / _STD


def build_tiny_qwen3_vl(out: Path, *, image_tokens: int = 1024, num_layers: int = 2, num_heads: int = 4,
                        num_kv_heads: int = 2, hidden_size: int = 128, value_rank: Optional[int] = None,
                        vocab_size: int = 1024, seed: int = 0, video_tokens: int = 1024) -> Path:
    """Writes the model directory ``out`` (see the module docstring) and returns it. The head size is
    ``hidden_size // num_heads``; ``image_tokens`` must be a perfect square."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = hidden_size // num_heads
    check_shapes("hidden_size // num_heads", head_dim, image_tokens=image_tokens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast, ids = chat_tokenizer(vocab_size, SPECIAL, CHAT_TEMPLATE)
    pairs = head_dim // 2  # rotary pairs, (time, row, column) as Qwen3-VL's [24, 20, 20] of 64
    mrope = [pairs - 2 * (5 * pairs // 16), 5 * pairs // 16, 5 * pairs // 16]
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=head_dim, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope,
                                          "mrope_interleaved": True},
                         tie_word_embeddings=False, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                         pad_token_id=ids[ENDOFTEXT]),
        vision_config=vision_config(hidden_size, deepstack_visual_indexes=[0]),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False)
    write_model(Qwen3VLForConditionalGeneration, config, out, fast, ids, seed=seed, value_rank=value_rank)
    write_processors(out, image_tokens, video_tokens)
    return out


def vision_config(hidden_size: int, **extra) -> dict:
    """The tiny Qwen3-VL vision tower (Qwen3.5's too): 2 layers of width 32, 16-pixel patches, 2x2 merger into the
    text model's ``hidden_size``; ``extra``: more fields (Qwen3-VL's deepstack layers)."""
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3,
                num_position_embeddings=256, hidden_act="gelu_pytorch_tanh", **extra)


def write_processors(out: Path, image_tokens: int, video_tokens: int) -> None:
    """Qwen3-VL's image, video and processor configurations (Qwen3.5 uses them as they are): ``image_tokens`` an
    image, a clip bounded to ``video_tokens`` tokens (see the module docstring)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = (PATCH * MERGE * math.isqrt(image_tokens)) ** 2
    Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=PATCH,
                             temporal_patch_size=2, merge_size=MERGE, image_mean=list(MEAN),
                             image_std=list(STD)).save_pretrained(out)
    clip = video_tokens * 2 * (PATCH * MERGE) ** 2
    (out / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": clip, "longest_edge": clip},
        "patch_size": PATCH, "temporal_patch_size": 2, "merge_size": MERGE, "do_sample_frames": False,
        "image_mean": list(MEAN), "image_std": list(STD)}) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    return qwen_vl_main(argv, build_tiny_qwen3_vl, __doc__)


if __name__ == "__main__":
    sys.exit(main())
