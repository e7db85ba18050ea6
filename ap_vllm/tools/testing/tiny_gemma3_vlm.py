"""Build a tiny Gemma 3 vision-language model with random weights, offline, in seconds.

The result is a normal Hugging Face model directory (config.json, model.safetensors,
tokenizer, processor, chat template) that both transformers and vLLM's real loader (CPU)
can load::

    python -m ap_vllm.tools.testing.tiny_gemma3_vlm /tmp/tiny-gemma3 --image-tokens 64

    # vLLM (CPU), in-process engine; install_vllm_gemma3_shim() is needed without torchvision
    import os; os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from ap_vllm.tools.testing.tiny_gemma3_vlm import install_vllm_gemma3_shim
    install_vllm_gemma3_shim()
    from vllm import LLM
    llm = LLM(model="/tmp/tiny-gemma3", max_model_len=1024, enforce_eager=True, dtype="float32",
              block_size=32, limit_mm_per_prompt={"image": 2}, kv_cache_memory_bytes=256 << 20)

(``vllm serve /tmp/tiny-gemma3`` works where torchvision is installed, or with the shim in every
vLLM process: a ``sitecustomize`` on ``PYTHONPATH`` that calls :func:`install_vllm_gemma3_shim`, as
``tests/test_e2e_gemma3_vlm.py`` does.)

Architecture: ``Gemma3ForConditionalGeneration`` (``model_type="gemma3"``): a Gemma 3 text model
whose layers alternate ``sliding_attention`` / ``full_attention`` (layer 0 sliding, layer 1 full,
...), a one-layer SigLIP vision tower (no pooling head) and Gemma 3's projector, which average-pools
the square SigLIP patch grid down to ``sqrt(image_tokens)`` x ``sqrt(image_tokens)`` soft tokens.
vLLM treats ``gemma3`` as a multimodal prefix-LM (``model_config.is_mm_prefix_lm``): the image
soft tokens of one image attend to each other bidirectionally (transformers does the same when
the processor's ``token_type_ids`` are passed). vLLM's CPU attention backend (``CPU_ATTN``) does
not implement that: it attends causally, so vLLM CPU outputs equal transformers' outputs for the
same inputs WITHOUT ``token_type_ids`` (causal image attention), not the bidirectional ones.
AttentionPack implements it (``docs/design.md``, "Images attended both ways").

The SigLIP tower is stored as ``vision_tower.vision_model.*`` (the layout of real Gemma 3
checkpoints), which vLLM 0.32 requires and transformers accepts.

Tokens per image (transformers ``Gemma3MultiModalProjector`` and vLLM ``gemma3_mm``)::

    patches_per_side = image_size // patch_size
    tokens_per_side  = sqrt(mm_tokens_per_image)
    kernel           = patches_per_side // tokens_per_side      (avg-pool kernel = stride)
    soft tokens      = tokens_per_side ** 2 = mm_tokens_per_image

Here ``image_size = sqrt(image_tokens) * pool_kernel * patch_size`` (defaults: patch 4, kernel 2,
so 64 image tokens = 64x64 px, 16x16 patches), hence ``image_tokens`` must be a perfect square
(64, 256, 1024, ...). Pan-and-scan is off, so every image, whatever its size, is resized to
``image_size`` square and becomes exactly ONE contiguous run of soft tokens. The processor
(and vLLM) replace each ``<start_of_image>`` in the prompt text by::

    "\\n\\n" <start_of_image> <image_soft_token> x image_tokens <end_of_image> "\\n\\n"

i.e. ``image_tokens + 4`` prompt tokens per image (``"\\n\\n"`` is one token). Like the real
Gemma tokenizer, runs of 1-4 newlines are single tokens, so a newline right before or after the
image merges with the wrapper (in the chat template ``"user\\n"`` + ``"\\n\\n"`` becomes ONE
``"\\n\\n\\n"`` token: an image at the start of a user turn costs ``image_tokens + 3`` new tokens
beyond the turn's own ``"\\n"``). vLLM re-merges the newlines exactly like the tokenizer does.

Sliding window: ``sliding_window`` defaults to ``max(512, 2 * image_tokens)``. It must be at
least ``image_tokens``: vLLM drops the bidirectional image range of any image longer than the
sliding window (it then attends causally), and transformers clamps the bidirectional block to
the window on sliding layers. Prompts shorter than the window make sliding layers behave like
global ones; pass a smaller window to exercise sliding attention.

Weights: float32 by default, drawn from ``torch.Generator().manual_seed(seed)`` in a fixed order
(independent of transformers' own init), scaled so attention logits (through Gemma 3's q/k
RMSNorms) and output logits have a clear spread: greedy outputs vary with the prompt and the
image and have no fp32 near-ties. Gemma RMSNorms scale by ``1 + weight``, so their weights are
drawn around 0 (around ``sqrt(attn_logit_std) - 1`` for ``q_norm`` / ``k_norm``). The output
embedding (``lm_head``, untied) rows of all special tokens, the newline tokens and unused
vocabulary slots are zero, so greedy decoding never emits them: generation normally runs to
``max_tokens`` (finish_reason "length").

The tokenizer is a byte-level BPE trained in-process on :data:`~ap_vllm.tools.testing.tiny_vlm.CORPUS`
(nothing is downloaded) with Gemma 3's special tokens (``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``,
``<start_of_turn>``, ``<end_of_turn>``, ``<start_of_image>``, ``<end_of_image>``,
``<image_soft_token>``) and the named attributes ``Gemma3Processor`` needs (``boi_token``,
``eoi_token``, ``image_token``), plus ``"\\n"`` .. ``"\\n\\n\\n\\n"`` as single tokens (vLLM's
Gemma 3 processor looks them up by their literal text). Every run with the same arguments writes
identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Union

from ap_vllm.tools.testing.tiny_vlm import fan_in, fill_weights, printable_token_ids, save_quietly, train_bpe

__all__ = [
    "build_tiny_gemma3_vlm",
    "image_repl_token_count",
    "default_sliding_window",
    "SPECIAL_TOKENS",
    "NEWLINE_TOKENS",
    "CHAT_TEMPLATE",
    "output_token_ids",
    "install_vllm_gemma3_shim",
    "main",
]

PAD = "<pad>"
EOS = "<eos>"
BOS = "<bos>"
UNK = "<unk>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
BOI = "<start_of_image>"
EOI = "<end_of_image>"
IMAGE_SOFT = "<image_soft_token>"
# Same relative order as the real Gemma 3 vocabulary (pad=0, eos=1, bos=2, unk=3).
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT]
# vLLM's Gemma3MultiModalProcessor does vocab["\n"], vocab["\n\n"], vocab["\n\n\n"],
# vocab["\n\n\n\n"] and merges newline runs around each image: they must be single tokens
# whose vocabulary keys are the literal text (a byte-level BPE would spell "\n" as "Ċ").
NEWLINE_TOKENS = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]

# Gemma 3's chat template, simplified: accepts plain-string and OpenAI-style list content;
# "image" / "image_url" parts become one <start_of_image> that the processor (and vLLM) expand.
# A leading system message is folded into the first user turn, as Gemma 3 does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% else %}"
    "{% set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}"
    "{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] | trim }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _check_image_tokens(image_tokens: int) -> int:
    side = math.isqrt(max(image_tokens, 0))
    if image_tokens < 1 or side * side != image_tokens:
        lo, hi = max(side, 1) ** 2, (side + 1) ** 2
        raise ValueError(
            f"image_tokens={image_tokens} must be a perfect square (Gemma 3 average-pools a square "
            f"patch grid to sqrt(mm_tokens_per_image) tokens a side); nearest allowed values: {lo}, {hi}")
    return side


def image_repl_token_count(image_tokens: int) -> int:
    """Prompt tokens one image expands to on its own: soft tokens + boi + eoi + 2 x "\\n\\n"."""
    _check_image_tokens(image_tokens)
    return image_tokens + 4


def default_sliding_window(image_tokens: int) -> int:
    """The default sliding window: ``max(512, 2 * image_tokens)`` (always >= image_tokens)."""
    return max(512, 2 * image_tokens)


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on CORPUS with Gemma 3's special tokens, as a fast tokenizer."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab_size - len(NEWLINE_TOKENS), SPECIAL_TOKENS)
    # Plain (non-special) added tokens: matched before the byte-level pre-tokenizer, longest
    # first, so "\n\n\n" is one token and "\n" x 5 is ["\n\n\n\n", "\n"]; decode gives the text.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in NEWLINE_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        # Named model-specific tokens (any "*_token" kwarg): tokenizer.boi_token / .eoi_token /
        # .image_token (+ *_id), saved as top-level keys of tokenizer_config.json, as
        # Gemma3Processor and vLLM's Gemma 3 processor expect.
        boi_token=BOI, eoi_token=EOI, image_token=IMAGE_SOFT,
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
        model_max_length=1 << 20,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.add_bos_token = True
    return fast


def output_token_ids(tokenizer) -> list[int]:
    """Ids the model may emit: printable, non-special tokens (no newline or wrapper tokens)."""
    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + NEWLINE_TOKENS}
    return [i for i in printable_token_ids(tokenizer) if i not in special]


def _init_weights(model, tokenizer, *, seed: int, attn_logit_std: float, output_logit_std: float) -> None:
    """Overwrite every parameter deterministically (independent of transformers' own init).

    Same scheme as tiny_vlm's ``_init_weights``, adapted to Gemma 3: Gemma RMSNorms multiply by
    ``1 + weight`` (weights drawn around 0; ``q_norm``/``k_norm`` around ``sqrt(attn_logit_std)-1``
    so that with ``query_pre_attn_scalar = head_dim`` the attention logits have std
    ~``attn_logit_std``), token embeddings are multiplied by ``sqrt(hidden_size)`` (drawn with std
    ``1/sqrt(hidden_size)``), and the projector weight is ``[vision_hidden, text_hidden]``.
    """
    import torch

    text_hidden = model.config.text_config.hidden_size
    qk_scale = math.sqrt(attn_logit_std) - 1.0

    def value(name, shape, normal):
        is_text = "language_model" in name
        if name.endswith("bias"):
            return torch.zeros(shape)
        if name.endswith(("q_norm.weight", "k_norm.weight")) and is_text:
            return qk_scale + normal(0.05)
        if "norm" in name and (is_text or "multi_modal_projector" in name):
            return normal(0.05)  # Gemma RMSNorm: scale = 1 + weight
        if "norm" in name:  # SigLIP LayerNorms: scale = weight
            return torch.ones(shape) + normal(0.05)
        if "embed_tokens" in name:
            return normal(1.0 / math.sqrt(text_hidden))
        if "position_embedding" in name:
            return normal(0.5)
        if name.startswith("lm_head"):
            return normal(output_logit_std / math.sqrt(fan_in(shape)))
        if name.endswith("mm_input_projection_weight"):
            return normal(1.0 / math.sqrt(shape[0]))
        return normal(1.0 / math.sqrt(fan_in(shape)))  # q/k/v/o projections, MLPs, vision tower, patch conv

    fill_weights(model, value, seed=seed, output_ids=output_token_ids(tokenizer))


def rename_vision_tower_keys(path: Path) -> None:
    """Store the vision tower (SigLIP, CLIP) as ``vision_tower.vision_model.*``, like real Gemma 3 and LLaVA-1.5
    checkpoints.

    transformers 5.x saves it as ``vision_tower.embeddings.*`` / ``vision_tower.encoder.*``
    (it drops the vision model's ``vision_model`` prefix), which vLLM 0.32's Gemma 3 and LLaVA loaders
    reject ("There is no module or parameter named 'vision_tower.embeddings'"). transformers
    still loads the renamed file: its checkpoint conversion strips the prefix again.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        renamed[k] = v
    save_file(renamed, str(path), metadata=metadata)


def build_tiny_gemma3_vlm(
    out_dir: Union[str, os.PathLike],
    *,
    image_tokens: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    vocab_size: int = 1024,
    sliding_window: Optional[int] = None,
    max_position_embeddings: int = 16384,
    patch_size: int = 4,
    pool_kernel: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    attn_logit_std: float = 2.0,
    output_logit_std: float = 4.0,
) -> Path:
    """Write a tiny random-weight Gemma 3 VLM to ``out_dir`` and return its path.

    ``image_tokens``: ``mm_tokens_per_image`` soft tokens per image (a perfect square; one image =
    one run, ``image_tokens + 4`` prompt tokens with wrappers). Layers alternate sliding / full
    attention starting with sliding. ``sliding_window`` defaults to
    :func:`default_sliding_window` (``max(512, 2 * image_tokens)``) and must be >= image_tokens.
    ``hidden_size`` defaults to ``num_heads * head_dim``; ``intermediate_size`` to
    ``2 * hidden_size``. ``vocab_size`` is the model's vocabulary (the trained tokenizer has at
    most that many tokens; extra rows are never produced). Images of any size are resized to
    ``sqrt(image_tokens) * pool_kernel * patch_size`` pixels square.
    """
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, GenerationConfig)

    side = _check_image_tokens(image_tokens)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if pool_kernel < 1 or patch_size < 1:
        raise ValueError("patch_size and pool_kernel must be >= 1")
    if sliding_window is None:
        sliding_window = default_sliding_window(image_tokens)
    if sliding_window < image_tokens:
        raise ValueError(
            f"sliding_window={sliding_window} must be >= image_tokens={image_tokens}: vLLM drops the "
            "bidirectional attention range of images longer than the sliding window")
    hidden_size = hidden_size or num_heads * head_dim
    intermediate_size = intermediate_size or 2 * hidden_size
    patches_per_side = side * pool_kernel
    image_size = patches_per_side * patch_size
    if max_position_embeddings < image_tokens + 64:
        raise ValueError("max_position_embeddings must exceed image_tokens + 64")
    if vocab_size < len(SPECIAL_TOKENS) + len(NEWLINE_TOKENS) + 300:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + len(NEWLINE_TOKENS) + 300}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size)
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens > vocab_size={vocab_size}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + NEWLINE_TOKENS}

    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        sliding_window=sliding_window,
        layer_types=layer_types,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=False,
        pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS],
    )
    vision_config = dict(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=image_tokens,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[IMAGE_SOFT],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids[BOS]
    config.eos_token_id = [ids[EOS], ids[END_OF_TURN]]
    config.pad_token_id = ids[PAD]

    torch_dtype = getattr(torch, dtype)
    model = Gemma3ForConditionalGeneration(config)
    _init_weights(model, tokenizer, seed=seed, attn_logit_std=attn_logit_std,
                  output_logit_std=output_logit_std)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[END_OF_TURN]], pad_token_id=ids[PAD])
    save_quietly(model, out)
    rename_vision_tower_keys(out / "model.safetensors")

    image_processor = Gemma3ImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        # Pan-and-scan off; the numbers are still needed: vLLM sizes its dummy (profiling)
        # image as image_size * pan_and_scan_max_num_crops.
        do_pan_and_scan=False,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_tokens,
        chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    info = {
        "builder": "ap_vllm.tools.testing.tiny_gemma3_vlm",
        "architecture": "Gemma3ForConditionalGeneration",
        "image_tokens": image_tokens,
        "image_repl_tokens": image_repl_token_count(image_tokens),
        "image_repl_layout": ["\\n\\n", BOI, f"{IMAGE_SOFT} x {image_tokens}", EOI, "\\n\\n"],
        "image_size": image_size,
        "patch_size": patch_size,
        "pool_kernel": pool_kernel,
        "patches_per_image": patches_per_side * patches_per_side,
        "sliding_window": sliding_window,
        "layer_types": layer_types,
        "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
        "head_dim": head_dim, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "vision_hidden_size": vision_hidden_size, "vision_layers": vision_layers,
        "vocab_size": vocab_size, "tokenizer_size": len(tokenizer), "seed": seed, "dtype": dtype,
        "token_ids": {"bos": ids[BOS], "eos": ids[EOS], "pad": ids[PAD], "unk": ids[UNK],
                      "start_of_turn": ids[START_OF_TURN], "end_of_turn": ids[END_OF_TURN],
                      "boi": ids[BOI], "eoi": ids[EOI], "image": ids[IMAGE_SOFT],
                      "newlines": [ids[t] for t in NEWLINE_TOKENS]},
    }
    (out / "tiny_gemma3_vlm.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


_TV_GEMMA3_MODULE = "transformers.models.gemma3.image_processing_gemma3"


def install_vllm_gemma3_shim(*, register_in_process: bool = True) -> bool:
    """Let vLLM load Gemma 3 when torchvision is not installed (as in this project's venv).

    vLLM's ``gemma3_mm`` does ``from transformers.models.gemma3.image_processing_gemma3 import
    Gemma3ImageProcessor`` (for a type annotation only), and that transformers module imports
    torchvision; without torchvision vLLM fails with "Model architectures
    ['Gemma3ForConditionalGeneration'] failed to be inspected". This puts a stand-in for that
    module in ``sys.modules`` whose ``Gemma3ImageProcessor`` is ``Gemma3ImageProcessorPil`` (the
    class the saved processor loads anyway). With ``register_in_process`` it also imports vLLM's
    class and registers it with ``ModelRegistry`` as a class object, so vLLM inspects it in this
    process instead of in its ``python -m vllm.model_executor.models.registry`` subprocess (which
    would not have the stand-in).

    The stand-in lives in THIS process only, and vLLM's CPU platform always spawns its workers:
    use it with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine and model in this process). For
    ``vllm serve`` or a multi-process engine, every process needs the stand-in before it imports
    ``gemma3_mm``, i.e. a vLLM general plugin would call ``install_vllm_gemma3_shim(
    register_in_process=False)`` (or install torchvision). Returns False, doing nothing, when
    torchvision is importable; True once the stand-in is in place. Idempotent.
    """
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is not None:
        return False
    if _TV_GEMMA3_MODULE not in sys.modules:
        from transformers.models.gemma3 import image_processing_pil_gemma3 as pil

        mod = types.ModuleType(_TV_GEMMA3_MODULE)
        mod.__doc__ = "torchvision-free stand-in installed by ap_vllm.tools.testing.tiny_gemma3_vlm"
        mod.Gemma3ImageProcessor = pil.Gemma3ImageProcessorPil
        mod.Gemma3ImageProcessorKwargs = pil.Gemma3ImageProcessorKwargs
        mod.__all__ = ["Gemma3ImageProcessor"]
        sys.modules[_TV_GEMMA3_MODULE] = mod
    if register_in_process:
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration

        ModelRegistry.register_model("Gemma3ForConditionalGeneration", Gemma3ForConditionalGeneration)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ap_vllm.tools.testing.tiny_gemma3_vlm",
        description="Write a tiny random-weight Gemma 3 VLM (offline) that vLLM and transformers can load.")
    p.add_argument("out_dir")
    p.add_argument("--image-tokens", type=int, default=64, help="soft tokens per image (perfect square)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--sliding-window", type=int, default=None,
                   help="default max(512, 2 * image_tokens); must be >= image_tokens")
    p.add_argument("--max-position-embeddings", type=int, default=16384)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--pool-kernel", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build_tiny_gemma3_vlm(
        a.out_dir, image_tokens=a.image_tokens, num_layers=a.num_layers, num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size, vocab_size=a.vocab_size,
        sliding_window=a.sliding_window, max_position_embeddings=a.max_position_embeddings,
        patch_size=a.patch_size, pool_kernel=a.pool_kernel, seed=a.seed, dtype=a.dtype)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
