"""Build a tiny Qwen2.5-VL with random weights, offline, in seconds; serve it without torchvision.

The result is a normal Hugging Face model directory (config.json, model.safetensors, tokenizer, image processor,
chat template) that transformers and vLLM's real loader (CPU) load::

    python -m ap_vllm.tools.testing.tiny_qwen2_5_vl /tmp/tiny-qwen --image-tokens 1024

Architecture: ``Qwen2_5_VLForConditionalGeneration`` (``model_type="qwen2_5_vl"``): a Qwen2 text model with
multi-axis rotary positions (M-RoPE: an image token's position is its (time, row, column), ``mrope_section``
splitting the rotary pairs between the three) and Qwen2.5-VL's windowed ViT with its 2x2 patch merger. Defaults:
hidden 128, 4 q / 2 kv heads of 32 (CPU_ATTN needs head sizes >= 32), 2 layers; a 2-layer vision tower of width 32.

Tokens per image: the image processor resizes every image to an area of ``(28 * sqrt(image_tokens))**2`` pixels
(``min_pixels = max_pixels``, aspect ratio kept, sides multiples of 28), so each 28x28 pixel square becomes one
token after the merger: ``image_tokens`` tokens for a square image, about as many for others (the grid follows
the aspect ratio). The chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image; the
processor repeats ``<|image_pad|>`` once per token.

``value_rank``: each layer's value projection is made of rank ``value_rank`` (and no bias), so the values of any
span have rank ``<= value_rank`` while the post-RoPE keys are full rank: compaction with keys at ``H*d`` and values
at ``value_rank`` loses nothing, yet stores fewer numbers per token than the exact cache.

Without torchvision (this project's CPU venv: no torchvision wheel matches its torch) vLLM cannot load the model:
:func:`install_qwen2_vl_shim` (in every vLLM process, e.g. from a ``sitecustomize`` on ``PYTHONPATH``) is needed,
and ``--limit-mm-per-prompt '{"video": 0}'`` (the video processor is a stub that refuses videos).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Optional

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
PATCH, MERGE = 14, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_5_vl(out: Path, *, image_tokens: int = 1024, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, hidden_size: int = 128, value_rank: Optional[int] = None,
                          vocab_size: int = 1024, seed: int = 0) -> Path:
    """Writes the model directory ``out`` (see the module docstring) and returns it. The head size is
    ``hidden_size // num_heads``; ``image_tokens`` must be a perfect square."""
    import torch
    from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ap_vllm.tools.testing.tiny_vlm import save_quietly, train_bpe

    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError(f"image_tokens={image_tokens} is not allowed: it must be a perfect square (256, 1024, ...)")
    head_dim = hidden_size // num_heads
    if head_dim % 4:
        raise ValueError(f"hidden_size // num_heads = {head_dim} is not allowed: M-RoPE needs a multiple of 4")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size, SPECIAL), eos_token=IM_END, pad_token=ENDOFTEXT,
        additional_special_tokens=SPECIAL[1:], model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL}
    pairs = head_dim // 2  # rotary pairs, split between (time, row, column) as Qwen2.5-VL's [16, 24, 24] of 64
    mrope = [pairs // 4, (pairs - pairs // 4) // 2, pairs - pairs // 4 - (pairs - pairs // 4) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                         rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=1e6,
                         tie_word_embeddings=False, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                         pad_token_id=ids[ENDOFTEXT], use_sliding_window=False, max_window_layers=num_layers),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], in_channels=3, tokens_per_second=2, hidden_act="silu"),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids[ENDOFTEXT], ids[IM_END], ids[ENDOFTEXT]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            elif p.dim() >= 2:
                fan_in = int(torch.tensor(p.shape[1:]).prod())
                std = 1.0 if "embed_tokens" in name else (4.0 if name.startswith("lm_head") else 1.0) / fan_in ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                if value_rank is not None and name.endswith("self_attn.v_proj.weight") and "visual" not in name:
                    u, s, vh = torch.linalg.svd(p, full_matrices=False)  # keep its top value_rank directions
                    p.copy_(u[:, :value_rank] @ torch.diag(s[:value_rank]) @ vh[:value_rank])
        # greedy decoding emits printable, non-special tokens only (the others get a zero output row)
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        for i in range(len(fast)):
            text = fast.decode([i])
            keep[i] = i not in ids.values() and bool(text) and "\ufffd" not in text and text.isprintable()
        model.lm_head.weight[~keep] = 0
    model.generation_config = GenerationConfig(bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                                               pad_token_id=ids[ENDOFTEXT])
    save_quietly(model.to(torch.float32), out)
    fast.save_pretrained(out)
    pixels = (PATCH * MERGE * side) ** 2
    Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=PATCH, temporal_patch_size=2,
                             merge_size=MERGE).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


# ---- loading without torchvision -------------------------------------------------------------
_TORCHVISION_PROCESSOR = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_PROCESSOR = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
_AUTO_VIDEO = "transformers.models.auto.video_processing_auto"


def _stub_video_processors(module) -> None:
    """``AutoVideoProcessor.from_pretrained`` returns a stub that refuses videos where the real one needs
    torchvision (``ProcessorMixin`` always loads one; every transformers video processor needs torchvision)."""
    auto = module.AutoVideoProcessor
    original = auto.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        try:
            return original(cls, *args, **kwargs)
        except ImportError as e:
            import transformers
            from transformers.video_processing_utils import VideoProcessorMixin

            why = str(e).strip().splitlines()[0]
            if not hasattr(transformers, "VideoProcessorMixin"):  # (exported only with torchvision; checked by
                transformers.VideoProcessorMixin = VideoProcessorMixin  # ProcessorMixin's argument check)

            class NoVideoProcessor(VideoProcessorMixin):
                merge_size, patch_size, temporal_patch_size = MERGE, PATCH, 2

                def preprocess(self, videos, **kw):
                    raise ValueError(f"video input is not served here: {why}")

            return NoVideoProcessor()

    auto.from_pretrained = classmethod(from_pretrained)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner=None, patch=None):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec) if self.inner else None

    def exec_module(self, module):
        if self.inner is None:  # the torchvision image processor's module, served from the PIL one
            pil = importlib.import_module(_PIL_PROCESSOR)
            module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
            module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
            return
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == _TORCHVISION_PROCESSOR:
            return importlib.machinery.ModuleSpec(name, _Loader())
        if name == _AUTO_VIDEO:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, _stub_video_processors)
            return spec
        return None


def install_qwen2_vl_shim() -> bool:
    """Lets vLLM load Qwen2-VL / Qwen2.5-VL where torchvision is not installed (the project's CPU venv).

    Two imports need torchvision, no computation does: vLLM's ``qwen2_vl.py`` imports ``smart_resize`` from
    transformers' torchvision image processor module (served here from the PIL module, whose ``smart_resize`` is
    the same and whose ``Qwen2VLImageProcessorPil`` stands for ``Qwen2VLImageProcessor``), and the processor
    always loads a video processor (a stub that refuses videos, so serve with ``--limit-mm-per-prompt
    '{"video": 0}'``). Lazy (an import hook: nothing is imported now), for every process that imports vLLM's model
    (call it from a ``sitecustomize``). Returns False, doing nothing, when torchvision is importable. Idempotent."""
    if importlib.util.find_spec("torchvision") is not None:
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--value-rank", type=int, default=None)
    a = ap.parse_args(argv)
    print(build_tiny_qwen2_5_vl(a.out, image_tokens=a.image_tokens, value_rank=a.value_rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
