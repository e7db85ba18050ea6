"""Build a tiny LLaVA-1.5 with random weights, offline, in seconds; serve it without torchvision.

The result is a normal Hugging Face model directory (config.json, model.safetensors, tokenizer, image processor,
chat template) that transformers and vLLM's real loader (CPU) load::

    python -m ap_vllm.tools.testing.tiny_llava /tmp/tiny-llava --key-rank 8 --value-rank 8

Architecture: ``LlavaForConditionalGeneration`` (``model_type="llava"``), as LLaVA-1.5: a CLIP ViT (336 x 336
pixels, patches of 14: 576 patch features, the CLS feature dropped, ``vision_feature_layer=-2``), a two-layer GELU
projector, and a Llama text model with 1-D RoPE and as many kv heads as q heads (multi-head attention, like
LLaVA-1.5-7B's 32 x 128). Defaults: hidden 128, 4 heads of 32 (CPU_ATTN needs head sizes >= 32), 2 layers; a
2-layer vision tower of width 32. Every image is resized and center-cropped to 336 x 336 (CLIP's preprocessing):
576 ``<image>`` tokens, whatever its size.

``key_rank`` / ``value_rank``: each text layer's key / value projection is made of that rank (Llama has no bias),
so the keys *before* RoPE and the values of any span have at most that rank: compaction with ``key_space:
pre_rope`` at those ranks loses nothing (the ``llava_1_5`` preset's key space), yet stores fewer numbers per token
than the exact cache. (After RoPE the keys are full rank.)

Without torchvision (this project's CPU venv) vLLM's ``llava.py`` cannot import: it imports ``pixtral.py``, which
imports a helper from transformers' torchvision Pixtral image processor. :func:`install_llava_shim` (in every
vLLM process, e.g. from a ``sitecustomize`` on ``PYTHONPATH``) serves that module from transformers' PIL one, whose
helper is the same. transformers falls back to ``CLIPImageProcessorPil`` by itself.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Optional

from ap_vllm.tools.testing.tiny_qwen2_5_vl import ENDOFTEXT, IM_END, IM_START, FromPil

IMAGE = "<image>"
SPECIAL = [ENDOFTEXT, IM_START, IM_END, IMAGE]
IMAGE_SIZE, PATCH = 336, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 576: the CLS feature is dropped ("default" feature selection)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}<image>\n"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava(out: Path, *, num_layers: int = 2, num_heads: int = 4, hidden_size: int = 128,
                     key_rank: Optional[int] = None, value_rank: Optional[int] = None, vocab_size: int = 1024,
                     seed: int = 0) -> Path:
    """Writes the model directory ``out`` (see the module docstring) and returns it. The head size is
    ``hidden_size // num_heads``."""
    import torch
    from transformers import (CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ap_vllm.tools.testing.tiny_gemma3_vlm import rename_vision_tower_keys
    from ap_vllm.tools.testing.tiny_qwen2_5_vl import chat_tokenizer, init_weights
    from ap_vllm.tools.testing.tiny_vlm import save_quietly

    for name, rank in (("key_rank", key_rank), ("value_rank", value_rank)):
        if rank is not None and not 1 <= rank <= hidden_size:
            raise ValueError(f"{name}={rank} is not allowed: 1 <= {name} <= hidden_size ({hidden_size}), or None")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast, ids = chat_tokenizer(vocab_size, SPECIAL, CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                       projection_dim=32, hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                num_key_value_heads=num_heads, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=ids[ENDOFTEXT],
                                eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT]),
        image_token_index=ids[IMAGE], image_seq_length=IMAGE_TOKENS, vision_feature_select_strategy="default",
        vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids[ENDOFTEXT], ids[IM_END], ids[ENDOFTEXT]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    init_weights(model, fast, set(ids.values()), seed=seed, vision="vision_tower",
                 low_rank={"self_attn.k_proj.weight": key_rank, "self_attn.v_proj.weight": value_rank})
    model.generation_config = GenerationConfig(bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                                               pad_token_id=ids[ENDOFTEXT])
    save_quietly(model.to(torch.float32), out)
    rename_vision_tower_keys(out / "model.safetensors")  # the Hub layout vLLM's loader reads
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                  "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=PATCH, vision_feature_select_strategy="default",
                   chat_template=CHAT_TEMPLATE, image_token=IMAGE, num_additional_image_tokens=1).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


# ---- loading without torchvision -------------------------------------------------------------
_TORCHVISION_PIXTRAL = "transformers.models.pixtral.image_processing_pixtral"
_PIL_PIXTRAL = "transformers.models.pixtral.image_processing_pil_pixtral"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TORCHVISION_PIXTRAL:
            return None
        return importlib.machinery.ModuleSpec(name, FromPil(_PIL_PIXTRAL, "PixtralImageProcessor"))


def install_llava_shim() -> bool:
    """Lets vLLM load LLaVA where torchvision is not installed (the project's CPU venv): see the module docstring.
    Lazy (an import hook: nothing is imported now), for every process that imports vLLM's model (call it from a
    ``sitecustomize``). Returns False, doing nothing, when torchvision is importable. Idempotent."""
    if importlib.util.find_spec("torchvision") is not None:
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--key-rank", type=int, default=None)
    ap.add_argument("--value-rank", type=int, default=None)
    a = ap.parse_args(argv)
    print(build_tiny_llava(a.out, key_rank=a.key_rank, value_rank=a.value_rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
