"""Build a tiny Gemma 4 vision-language model with random weights, offline, in seconds.

The result is a normal Hugging Face model directory (config.json, model.safetensors, tokenizer, processor,
chat template) that transformers (``AutoProcessor``, ``Gemma4ForConditionalGeneration``) and vLLM's real loader
(CPU) load::

    python -m ap_vllm.tools.testing.tiny_gemma4_vlm /tmp/tiny-gemma4 --num-kv-shared-layers 2

    # vLLM (CPU), in-process engine; install_vllm_gemma4_shim() is needed without torchvision
    import os; os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from ap_vllm.tools.testing.tiny_gemma4_vlm import install_vllm_gemma4_shim
    install_vllm_gemma4_shim()
    from vllm import LLM
    llm = LLM(model="/tmp/tiny-gemma4", max_model_len=1024, enforce_eager=True, dtype="float32",
              block_size=32, limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=256 << 20)

(``vllm serve /tmp/tiny-gemma4`` works where torchvision is installed, or with the shim in every vLLM process:
a ``sitecustomize`` on ``PYTHONPATH`` that calls ``install_vllm_gemma4_shim(register_in_process=False)``, i.e.
``env=sitecustomize_env(dir, "ap_vllm.tools.testing.tiny_gemma4_vlm.install_vllm_gemma4_shim("
"register_in_process=False)")`` for :class:`~ap_vllm.tools.testing.server.VllmServer`. transformers'
``AutoProcessor`` needs it too: call it in the process first.)

Architecture: ``Gemma4ForConditionalGeneration`` (``model_type="gemma4"``, no audio tower, no MoE, no logit
soft-capping, untied ``lm_head``). Text model, defaults in brackets: hidden size ``hidden_size`` [64], MLP
``2 * hidden_size``, ``num_layers`` [6] layers, the last one full attention and ``sliding_per_full`` [1] sliding
layers before each full one (default ``S F S F S F``: layers 1, 3, 5 full; or pass ``layer_types``):

- sliding layers: ``num_heads`` [2] query heads and ``num_kv_heads`` [1] kv heads of ``head_dim`` [32], window
  ``sliding_window`` [512, transformers' Gemma 4 default; prompts shorter than it make sliding layers attend to
  everything],
  RoPE theta 1e4 on all dimensions;
- full layers: the same head counts with heads of ``global_head_dim`` [512] (``q_proj`` 64 -> 2 x 512, ``k_proj``
  64 -> 1 x 512), Gemma 4's proportional RoPE (the library's per-layer-type ``rope_parameters``): theta 1e6,
  ``partial_rotary_factor`` 0.25, i.e. 64 of the 256 dimension pairs rotate (frequencies ``theta**(-2i/512)``,
  i < 64), the other 384 dimensions are not rotated;
- every layer: attention scale 1 with per-head RMSNorms on q and k (learned weights) and on v (none), so the
  values of one kv head, ``v = W_v x / rms(W_v x)``, lie in the image of ``W_v``: a space of dimension
  ``<= hidden_size`` (64) among the ``global_head_dim`` (512) numbers a full layer stores per token and kv head;
- per-layer input embeddings (Gemma 4 E2B / E4B's PLE): ``per_layer_input_size`` [8] numbers per layer and token
  from a ``vocab_size x (num_layers * 8)`` table plus a projection of the input embedding, gated into the
  residual stream after each layer's MLP.

KV sharing (``num_kv_shared_layers`` = N, Gemma 4 E2B / E4B style): the last N layers have no k/v projections;
each reads the KV cache of the LAST non-shared layer of its own type (:func:`kv_sharing_sources`; vLLM gives it
``kv_sharing_target_layer_name`` and no KV cache of its own). The last layer is full, so N >= 1 always shares a
full-attention layer. Default layers with N = 2: layer 4 (sliding) reads layer 2, layer 5 (full) reads layer 3;
N = 3: 3 -> 1 and 5 -> 1 (full), 4 -> 2 (sliding). N must leave an earlier layer of every shared
layer's type (N <= 4 for the default six layers).

``attention_k_eq_v``: full layers have no ``v_proj``; their values are ``v_norm(k_proj x)`` (before ``k_norm`` and
RoPE). Only then may full layers have their own kv head count, ``num_global_kv_heads`` (transformers and vLLM
ignore it otherwise; passing a different one without ``attention_k_eq_v`` is refused).

``bidirectional``: None (default): image tokens attend causally, vLLM's ``model_config.is_mm_prefix_lm`` is
False. ``"vision"`` (``use_bidirectional_attention``): vLLM treats the model as a multimodal prefix-LM; in
transformers (with the processor's ``mm_token_type_ids``) the tokens of one image attend to each other both ways
on SLIDING layers only, within the window (Gemma 4 keeps full-attention layers causal; vLLM clears the image
ranges of full layers). vLLM's CPU attention backend (``CPU_ATTN``) ignores the image ranges: with ``"vision"`` it
equals transformers WITHOUT ``mm_token_type_ids`` (causal image attention).

Vision: a one-layer Gemma 4 vision encoder (hidden ``vision_hidden_size`` [32], 2 heads of 16, 2-D RoPE and a
learned 2-D position table), ``patch_size`` [4] pixel patches, ``pooling_kernel_size`` [2]: each 2 x 2 block of
patches (an 8 x 8 pixel square) is averaged into one soft token, which the multimodal embedder (RMSNorm, linear
32 -> 64) maps to the text model.

Tokens per image. ``image_tokens`` [280] is Gemma 4's per-image soft-token budget (``max_soft_tokens``, also
``vision_config.default_output_length``), one of 70, 140, 280, 560, 1120: the only values transformers' and vLLM's
Gemma 4 processors accept. Both resize an image, aspect ratio kept, to the largest grid of 8 x 8 pixel squares
within the budget, so an image of ``w x h`` pixels becomes (:func:`image_soft_tokens`)::

    rows = floor(sqrt(image_tokens * h / w)),  cols = floor(sqrt(image_tokens * w / h))
    soft tokens n = rows * cols  (<= image_tokens)

whatever its pixel size; it depends on the aspect ratio only. Square images: ``floor(sqrt(budget))**2`` = 64, 121,
256, 529, 1089 for the five budgets. Budget 280: 64 x 48 (and 640 x 480) -> 14 x 19 = 266, 72 x 48 -> 13 x 20 = 260,
96 x 80 -> 15 x 18 = 270; budget 1120: 64 x 48 -> 28 x 38 = 1064, 96 x 80 -> 30 x 36 = 1080. No setting of either
library's processor makes the count independent of the aspect ratio (the budgets are fixed, and so is the
rounding). The chat template writes one ``<|image|>`` per image; the processor (and vLLM) replace it by::

    <|image>  <|image|> x n  <image|>

i.e. ``n + 2`` prompt tokens per image (:func:`image_repl_token_count`), ONE contiguous run, no newlines around it.
vLLM's placeholder range of the image starts at ``<|image>``, is ``n + 2`` long and embeds its ``n`` middle
tokens. Per-layer embeddings of image positions: vLLM looks up token 0, transformers the pad token, so ``<pad>``
is token 0.

Weights: float32 by default, drawn from ``torch.Generator().manual_seed(seed)`` in a fixed order (independent of
transformers' own init). With scale 1 and normalised q and k, an attention logit is ``w_q * w_k`` times a sum of
``d`` products of unit-RMS numbers (std ``w_q * w_k * sqrt(d)``), so the ``q_norm`` / ``k_norm`` weights are drawn
around ``sqrt(attn_logit_std) / d**0.25`` (0.59 for d = 32, 0.30 for d = 512) for logits of std ~2; the other
RMSNorm weights around 1, token embeddings with std ``1/sqrt(hidden)`` (they are multiplied by
``sqrt(hidden)``), projections with std ``1/sqrt(fan_in)`` and ``lm_head`` with ``output_logit_std/sqrt(hidden)``
(output logits of std ~2-4): greedy outputs vary with the prompt and the image and have no float32 near-ties
(the smallest top-2 logit gap in the checked chats: 0.07; vLLM and transformers differ by ~1e-5). The
``lm_head`` rows of all special tokens and of unprintable or unused vocabulary slots are zero, so greedy decoding
never emits them: generation normally runs to ``max_tokens``.

The tokenizer is a byte-level BPE trained in-process on :data:`~ap_vllm.tools.testing.tiny_vlm.CORPUS` (nothing is
downloaded) with Gemma 4's special tokens (ids 0-12 in this order): ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``, the
turn markers ``<|turn>`` / ``<turn|>``, ``<|image>`` / ``<image|>`` (boi / eoi), ``<|image|>`` (image soft token),
``<|video|>``, ``<|audio>`` / ``<audio|>`` / ``<|audio|>``, and the named attributes ``Gemma4Processor`` reads
(``boi_token``, ``eoi_token``, ``image_token``, ``boa_token``, ``eoa_token``, ``audio_token``). config.json's
``boi_token_id``, ``eoi_token_id``, ``image_token_id``, ``video_token_id``, ``boa_token_id``, ``eoa_token_index``,
``audio_token_id`` are these ids; ``eos_token_id`` is ``[<eos>, <turn|>]``. Chat format::

    <bos><|turn>user\\n<|image|>Describe the image.<turn|>\\n<|turn>model\\n

(a system message is a ``system`` turn). The processor files are ``processor_config.json`` (image processor,
video processor and audio feature extractor nested, as transformers 5 writes them) and ``preprocessor_config.json``
(the image processor). Every run with the same arguments writes identical files.

Checked (float32): vLLM ``vllm serve --attention-backend CPU_ATTN`` (with the shim) gives, token for token, the
greedy tokens of transformers' ``generate`` for the same chats (one and two images of 64 x 48, 64 x 64, 96 x 80),
log-probabilities within 2e-5 and the same prompt lengths, for budgets 280 and 1120, with 2 and 3 KV-shared layers,
``attention_k_eq_v`` with 2 global kv heads and ``bidirectional="vision"`` (against transformers' causal image
attention; its bidirectional generation differs).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from ap_vllm.tools.testing.server import patch_on_import
from ap_vllm.tools.testing.tiny_vlm import fill_weights, printable_token_ids, save_quietly, train_bpe

__all__ = [
    "build_tiny_gemma4_vlm",
    "default_layer_types",
    "kv_sharing_sources",
    "image_soft_tokens",
    "image_repl_token_count",
    "SOFT_TOKEN_BUDGETS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "output_token_ids",
    "install_vllm_gemma4_shim",
    "report_fast_prefill_rows",
    "main",
]

PAD = "<pad>"
EOS = "<eos>"
BOS = "<bos>"
UNK = "<unk>"
TURN_START = "<|turn>"
TURN_END = "<turn|>"
BOI = "<|image>"
EOI = "<image|>"
IMAGE = "<|image|>"
VIDEO = "<|video|>"
BOA = "<|audio>"
EOA = "<audio|>"
AUDIO = "<|audio|>"
# The real Gemma 4 vocabulary's names. pad must be id 0: for the per-layer embeddings of image positions vLLM
# looks up token 0 and transformers the pad token.
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, TURN_START, TURN_END, BOI, EOI, IMAGE, VIDEO, BOA, EOA, AUDIO]

# Gemma 4's per-image soft-token budgets (``max_soft_tokens``): the only values its image processor accepts.
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)

# Gemma 4's chat format, simplified: plain-string and OpenAI-style list content; every "image" / "image_url"
# part becomes one <|image|>, which the processor (and vLLM) expand to <|image> <|image|> x n <image|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] | trim }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}{{ '<|video|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<turn|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)

SLIDING, FULL = "sliding_attention", "full_attention"


def _check_image_tokens(image_tokens: int) -> int:
    if not isinstance(image_tokens, int) or isinstance(image_tokens, bool) or image_tokens not in SOFT_TOKEN_BUDGETS:
        squares = ", ".join(f"{b} -> {math.isqrt(b) ** 2}" for b in SOFT_TOKEN_BUDGETS)
        raise ValueError(
            f"image_tokens={image_tokens!r} is not a Gemma 4 soft-token budget (max_soft_tokens): it must be one of "
            f"{SOFT_TOKEN_BUDGETS} (transformers' and vLLM's Gemma 4 processors accept no other). A square image "
            f"becomes floor(sqrt(budget))**2 soft tokens: {squares}")
    return image_tokens


def image_soft_tokens(width: int, height: int, image_tokens: int = 280, *, patch_size: int = 4,
                      pooling_kernel_size: int = 2) -> int:
    """Soft tokens of one ``width`` x ``height`` image (``<|image|>`` repeats between ``<|image>`` and ``<image|>``).

    Gemma 4 resizes an image, aspect ratio kept, to the largest grid of ``u x u`` pixel squares (``u = patch_size *
    pooling_kernel_size``: one square = one soft token) within the budget ``image_tokens``::

        rows = floor(sqrt(image_tokens * height / width)),  cols = floor(sqrt(image_tokens * width / height))
        soft tokens = rows * cols  (<= image_tokens)

    This is transformers' ``get_aspect_ratio_preserving_size`` (the count of its image processor); vLLM's
    ``Gemma4ProcessingInfo._compute_num_soft_tokens`` computes the same for any aspect ratio up to
    ``image_tokens : 1`` (beyond it the two round a side of zero squares differently).
    """
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    _check_image_tokens(image_tokens)
    h, w = get_aspect_ratio_preserving_size(height=height, width=width, patch_size=patch_size,
                                            max_patches=image_tokens * pooling_kernel_size ** 2,
                                            pooling_kernel_size=pooling_kernel_size)
    return (h // patch_size) * (w // patch_size) // pooling_kernel_size ** 2


def image_repl_token_count(width: int, height: int, image_tokens: int = 280, **kw) -> int:
    """Prompt tokens one image becomes: its soft tokens + ``<|image>`` + ``<image|>`` (the chat template's one
    ``<|image|>`` is replaced; no other text is added)."""
    return image_soft_tokens(width, height, image_tokens, **kw) + 2


def default_layer_types(num_layers: int, sliding_per_full: int = 1) -> list[str]:
    """``sliding_per_full`` sliding-window layers before each full-attention layer, counted back from the last
    layer (which Gemma 4 requires to be full): 6 layers and 1 give ``S F S F S F``, 6 and 2 give ``S S F S S F``
    (S: ``"sliding_attention"``, F: ``"full_attention"``)."""
    return [FULL if (num_layers - 1 - i) % (sliding_per_full + 1) == 0 else SLIDING for i in range(num_layers)]


def kv_sharing_sources(layer_types: Sequence[str], num_kv_shared_layers: int) -> dict[int, int]:
    """Shared layer -> the layer whose KV cache it reads (Gemma 4, transformers and vLLM alike): each of the last
    ``num_kv_shared_layers`` layers reads the LAST non-shared layer of its own type."""
    first = len(layer_types) - num_kv_shared_layers
    out = {}
    for i in range(first, len(layer_types)):
        same = [j for j in range(first) if layer_types[j] == layer_types[i]]
        if not same:
            raise ValueError(
                f"num_kv_shared_layers={num_kv_shared_layers}: shared layer {i} ({layer_types[i]}) has no earlier "
                f"non-shared {layer_types[i]} layer to read its KV cache from (layer_types={list(layer_types)})")
        out[i] = same[-1]
    return out


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on CORPUS with Gemma 4's special tokens, as a fast tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab_size, SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        # Named model-specific tokens (tokenizer.boi_token, .image_token_id, ...), saved as top-level keys of
        # tokenizer_config.json: Gemma4Processor reads boi/eoi/image and boa/eoa/audio (it refuses any input when
        # boa or eoa is missing) and adds <|video|> itself unless it is already there.
        boi_token=BOI, eoi_token=EOI, image_token=IMAGE, boa_token=BOA, eoa_token=EOA, audio_token=AUDIO,
        extra_special_tokens=[TURN_START, TURN_END, VIDEO],
        model_max_length=1 << 20,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.add_bos_token = True
    return fast


def output_token_ids(tokenizer) -> list[int]:
    """Ids the model may emit: printable, non-special tokens."""
    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return [i for i in printable_token_ids(tokenizer) if i not in special]


def _init_weights(model, tokenizer, *, seed: int, attn_logit_std: float, output_logit_std: float) -> None:
    """Overwrite every parameter and persistent buffer deterministically (independent of transformers' init).

    Gemma 4 specifics: RMSNorms multiply by ``weight`` (drawn around 1); attention has no ``1/sqrt(d)`` scaling,
    q and k are RMS-normalised per head, so ``q.k = w_q * w_k * (sum of d products of unit numbers)`` has std
    ``w_q * w_k * sqrt(d)``: ``q_norm`` / ``k_norm`` weights are drawn around ``sqrt(attn_logit_std) / d**0.25``
    (``d``: that layer's head size, 32 or 512) for attention logits of std ~``attn_logit_std``; token embeddings
    are multiplied by ``sqrt(hidden)`` (drawn with std ``1/sqrt(hidden)``), the per-layer embeddings by
    ``sqrt(per_layer_dim)`` (likewise). ``layer_scalar`` stays 1.
    """
    import torch

    per_layer_hidden = model.config.text_config.hidden_size_per_layer_input

    def value(name, shape, normal):
        fan_in = shape[-1] if len(shape) >= 2 else 1
        if name.endswith("layer_scalar"):
            return torch.ones(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            return math.sqrt(attn_logit_std) / shape[0] ** 0.25 + normal(0.02)
        if "norm" in name:
            return 1.0 + normal(0.05)
        if name.endswith("embed_tokens.weight"):
            return normal(1.0 / math.sqrt(shape[1]))
        if name.endswith("embed_tokens_per_layer.weight"):
            return normal(1.0 / math.sqrt(per_layer_hidden))
        if "position_embedding_table" in name:
            return normal(0.5)
        if name.startswith("lm_head"):
            return normal(output_logit_std / math.sqrt(fan_in))
        return normal(1.0 / math.sqrt(fan_in))  # q/k/v/o projections, MLPs, per-layer gates, vision tower, embedder

    fill_weights(model, value, seed=seed, output_ids=output_token_ids(tokenizer))


def build_tiny_gemma4_vlm(
    out_dir: Union[str, os.PathLike],
    *,
    image_tokens: int = 280,
    num_layers: int = 6,
    sliding_per_full: int = 1,
    layer_types: Optional[Sequence[str]] = None,
    sliding_window: int = 512,
    num_heads: int = 2,
    head_dim: int = 32,
    global_head_dim: int = 512,
    num_kv_heads: int = 1,
    num_global_kv_heads: Optional[int] = None,
    num_kv_shared_layers: int = 0,
    attention_k_eq_v: bool = False,
    bidirectional: Optional[str] = None,
    hidden_size: int = 64,
    intermediate_size: Optional[int] = None,
    per_layer_input_size: int = 8,
    vocab_size: int = 1024,
    max_position_embeddings: int = 16384,
    patch_size: int = 4,
    pooling_kernel_size: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    attn_logit_std: float = 2.0,
    output_logit_std: float = 4.0,
) -> Path:
    """Write a tiny random-weight Gemma 4 VLM to ``out_dir`` and return its path (details: the module docstring).

    ``image_tokens``: the per-image soft-token budget, one of :data:`SOFT_TOKEN_BUDGETS`; an image of ``w x h``
    pixels becomes :func:`image_soft_tokens` ``(w, h, image_tokens)`` soft tokens (256 for a square image and the
    default 280), :func:`image_repl_token_count` prompt tokens with ``<|image>`` / ``<image|>``.
    ``layer_types`` (default :func:`default_layer_types` ``(num_layers, sliding_per_full)``: ``S F S F S F``) must
    end with a full layer. Sliding layers have heads of ``head_dim``, full layers of ``global_head_dim``; both have
    ``num_heads`` query heads and ``num_kv_heads`` kv heads (full layers ``num_global_kv_heads`` if given, which
    needs ``attention_k_eq_v``). ``num_kv_shared_layers``: the last that many layers read the KV cache of an
    earlier layer (:func:`kv_sharing_sources`). ``bidirectional``: None or ``"vision"``. ``intermediate_size``
    defaults to ``2 * hidden_size``; ``per_layer_input_size`` is Gemma 4's ``hidden_size_per_layer_input``.
    ``vocab_size`` is the model's vocabulary (the trained tokenizer has at most that many tokens; the other rows
    are never produced). ``attn_logit_std`` / ``output_logit_std``: the spread of attention and output logits the
    weights are drawn for. Arguments out of range are refused with a ValueError naming the value.
    """
    import torch

    _check_image_tokens(image_tokens)
    for name, v in (("num_layers", num_layers), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("hidden_size", hidden_size), ("per_layer_input_size", per_layer_input_size),
                    ("patch_size", patch_size), ("pooling_kernel_size", pooling_kernel_size),
                    ("vision_hidden_size", vision_hidden_size), ("vision_layers", vision_layers),
                    ("sliding_window", sliding_window)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    for name, v in (("head_dim", head_dim), ("global_head_dim", global_head_dim)):
        if not isinstance(v, int) or v < 8 or v % 8:
            raise ValueError(f"{name}={v!r} must be a positive multiple of 8 (full layers rotate a quarter of "
                             "global_head_dim: an even number of dimensions)")
    if vision_hidden_size % 8:
        raise ValueError(f"vision_hidden_size={vision_hidden_size} must be a multiple of 8 (2 heads, each with a "
                         "2-D RoPE: an even number of dimension pairs per axis)")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if num_global_kv_heads is not None:
        if not attention_k_eq_v and num_global_kv_heads != num_kv_heads:
            raise ValueError(
                f"num_global_kv_heads={num_global_kv_heads} needs attention_k_eq_v=True: Gemma 4 (transformers and "
                f"vLLM) gives full-attention layers their own kv head count only with attention_k_eq_v; without it "
                f"they have num_kv_heads={num_kv_heads}")
        if num_global_kv_heads < 1 or num_heads % num_global_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_global_kv_heads={num_global_kv_heads}")
    if bidirectional not in (None, "vision"):
        raise ValueError(f"bidirectional={bidirectional!r} must be None (causal image attention) or 'vision' "
                         "(the tokens of one image attend to each other both ways, on sliding layers)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} must be float32, bfloat16 or float16")
    if layer_types is None:
        if sliding_per_full < 0:
            raise ValueError(f"sliding_per_full={sliding_per_full} must be >= 0")
        layer_types = default_layer_types(num_layers, sliding_per_full)
    layer_types = list(layer_types)
    if len(layer_types) != num_layers or any(t not in (SLIDING, FULL) for t in layer_types):
        raise ValueError(f"layer_types={layer_types} must be {num_layers} of {SLIDING!r} / {FULL!r}")
    if layer_types[-1] != FULL:
        raise ValueError(f"layer_types={layer_types}: the last layer must be {FULL!r} (Gemma 4 forces it)")
    if not isinstance(num_kv_shared_layers, int) or not 0 <= num_kv_shared_layers < num_layers:
        raise ValueError(f"num_kv_shared_layers={num_kv_shared_layers!r} must be in [0, num_layers={num_layers})")
    sources = kv_sharing_sources(layer_types, num_kv_shared_layers)
    if vocab_size < len(SPECIAL_TOKENS) + 300:
        raise ValueError(f"vocab_size={vocab_size} must be at least {len(SPECIAL_TOKENS) + 300}")
    if max_position_embeddings < 2 * image_tokens + 64:
        raise ValueError(f"max_position_embeddings={max_position_embeddings} must be >= 2 * image_tokens + 64")
    intermediate_size = intermediate_size or 2 * hidden_size

    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size)
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens > vocab_size={vocab_size}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids[PAD] == 0, ids

    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=num_global_kv_heads,
        attention_k_eq_v=attention_k_eq_v,
        num_kv_shared_layers=num_kv_shared_layers,
        layer_types=layer_types,
        sliding_window=sliding_window,
        use_bidirectional_attention=bidirectional,
        hidden_size_per_layer_input=per_layer_input_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        final_logit_softcapping=None,
        enable_moe_block=False,
        use_double_wide_mlp=False,
        tie_word_embeddings=False,
        pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS],
    )
    vision_config = dict(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=vision_hidden_size // 2,
        patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size,
        # a patch's x and y index each look up a row: an image is at most image_tokens squares wide
        position_embedding_size=image_tokens * pooling_kernel_size,
        default_output_length=image_tokens,  # vLLM's per-image budget (soft tokens, memory planning)
        rms_norm_eps=1e-6,
        standardize=False,
        use_clipped_linears=False,
    )
    config = Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=None,
        boi_token_id=ids[BOI], eoi_token_id=ids[EOI], image_token_id=ids[IMAGE], video_token_id=ids[VIDEO],
        boa_token_id=ids[BOA], eoa_token_index=ids[EOA], audio_token_id=ids[AUDIO],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids[BOS]
    config.eos_token_id = [ids[EOS], ids[TURN_END]]
    config.pad_token_id = ids[PAD]

    torch_dtype = getattr(torch, dtype)
    model = Gemma4ForConditionalGeneration(config)
    _init_weights(model, tokenizer, seed=seed, attn_logit_std=attn_logit_std, output_logit_std=output_logit_std)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[TURN_END]], pad_token_id=ids[PAD])
    save_quietly(model, out)

    _write_processor(out, tokenizer, image_tokens=image_tokens, patch_size=patch_size,
                     pooling_kernel_size=pooling_kernel_size)

    info = {
        "builder": "ap_vllm.tools.testing.tiny_gemma4_vlm",
        "architecture": "Gemma4ForConditionalGeneration",
        "image_tokens": image_tokens,
        "square_image_soft_tokens": math.isqrt(image_tokens) ** 2,
        "image_repl_layout": [BOI, f"{IMAGE} x soft tokens", EOI],
        "patch_size": patch_size,
        "pooling_kernel_size": pooling_kernel_size,
        "layer_types": layer_types,
        "sliding_window": sliding_window,
        "num_kv_shared_layers": num_kv_shared_layers,
        "kv_sharing_sources": {str(k): v for k, v in sources.items()},
        "attention_k_eq_v": attention_k_eq_v,
        "bidirectional": bidirectional,
        "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
        "num_global_kv_heads": num_global_kv_heads if attention_k_eq_v and num_global_kv_heads else num_kv_heads,
        "head_dim": head_dim, "global_head_dim": global_head_dim,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "per_layer_input_size": per_layer_input_size,
        "vision_hidden_size": vision_hidden_size, "vision_layers": vision_layers,
        "vocab_size": vocab_size, "tokenizer_size": len(tokenizer), "seed": seed, "dtype": dtype,
        "token_ids": {"bos": ids[BOS], "eos": ids[EOS], "pad": ids[PAD], "unk": ids[UNK],
                      "turn_start": ids[TURN_START], "turn_end": ids[TURN_END],
                      "boi": ids[BOI], "eoi": ids[EOI], "image": ids[IMAGE], "video": ids[VIDEO],
                      "boa": ids[BOA], "eoa": ids[EOA], "audio": ids[AUDIO]},
    }
    (out / "tiny_gemma4_vlm.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def _write_processor(out: Path, tokenizer, *, image_tokens: int, patch_size: int, pooling_kernel_size: int) -> None:
    """The tokenizer files, ``chat_template.jinja`` and ``processor_config.json`` (with the image processor, the
    audio feature extractor and the video processor Gemma4Processor always loads, nested as transformers 5 saves
    them), plus ``preprocessor_config.json`` (the image processor alone, for older readers)."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    image_processor = {
        "image_processor_type": "Gemma4ImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,  # pixels in [0, 1]; the vision tower maps them to [-1, 1]
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "patch_size": patch_size,
        "pooling_kernel_size": pooling_kernel_size,
        "max_soft_tokens": image_tokens,
    }
    video_processor = {
        "video_processor_type": "Gemma4VideoProcessor",
        "patch_size": patch_size,
        "pooling_kernel_size": pooling_kernel_size,
        "max_soft_tokens": 70,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "do_sample_frames": True,
        "num_frames": 32,
    }
    # (unused: no audio tower; the processor loads one anyway) its settings, less the arrays it derives from them
    feature_extractor = {k: v for k, v in Gemma4AudioFeatureExtractor().to_dict().items()
                         if isinstance(v, (bool, int, float, str)) and k != "processor_class"}
    processor = {
        "processor_class": "Gemma4Processor",
        "image_seq_length": image_tokens,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_processor": image_processor,
        "video_processor": video_processor,
        "feature_extractor": feature_extractor,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    (out / "preprocessor_config.json").write_text(
        json.dumps({**image_processor, "processor_class": "Gemma4Processor"}, indent=2, sort_keys=True) + "\n")


# ---- loading without torchvision -------------------------------------------------------------
_TV_IMAGE_MODULE = "transformers.models.gemma4.image_processing_gemma4"
_PIL_IMAGE_MODULE = "transformers.models.gemma4.image_processing_pil_gemma4"
_VIDEO_MODULE = "transformers.models.gemma4.video_processing_gemma4"


class _VideoStandIn:
    """Gemma4Processor's video processor where the real one cannot load (it needs torchvision): it holds the
    settings and refuses videos. vLLM does not use it (it runs video frames through the image processor)."""

    model_input_names = ["pixel_values_videos", "video_position_ids", "num_soft_tokens_per_video"]

    def preprocess(self, videos, **kwargs):
        raise NotImplementedError("videos need transformers' Gemma4VideoProcessor, which needs torchvision")

    __call__ = preprocess


_stand_in_class = None


def _video_stand_in() -> type:
    """``Gemma4VideoProcessor`` (the stand-in, one class per process), a ``VideoProcessorMixin`` as
    ``ProcessorMixin``'s argument check requires."""
    global _stand_in_class
    if _stand_in_class is None:
        import transformers
        from transformers.video_processing_utils import VideoProcessorMixin

        if not hasattr(transformers, "VideoProcessorMixin"):  # (exported only with torchvision; looked up by
            transformers.VideoProcessorMixin = VideoProcessorMixin  # ProcessorMixin's argument check)
        _stand_in_class = type("Gemma4VideoProcessor", (_VideoStandIn, VideoProcessorMixin),
                               {"__module__": __name__})
    return _stand_in_class


def _video_processor_dict(path) -> Optional[dict]:
    """The video processor's settings in the local model directory ``path`` (None if it has none)."""
    p = Path(path)
    f = p / "processor_config.json"
    if f.is_file():
        cfg = json.loads(f.read_text()).get("video_processor")
        if isinstance(cfg, dict):
            return cfg
    f = p / "video_preprocessor_config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _patch_auto_video_processor() -> None:
    """``AutoVideoProcessor.from_pretrained`` returns the stand-in where it fails to load ``Gemma4VideoProcessor``
    (ImportError: no torchvision). Idempotent; keeps any other wrapper (e.g. the Qwen-VL shim's) in the chain."""
    # (importlib: ``from transformers.models.auto import video_processing_auto`` gives a placeholder without
    # torchvision unless the module was imported before)
    module = importlib.import_module("transformers.models.auto.video_processing_auto")
    auto = module.AutoVideoProcessor
    original = auto.from_pretrained.__func__
    if getattr(original, "_gemma4_stand_in", False):
        return

    def from_pretrained(cls, path, *args, **kwargs):
        try:
            return original(cls, path, *args, **kwargs)
        except ImportError:
            cfg = _video_processor_dict(path) if os.path.isdir(str(path)) else None
            if not cfg or cfg.get("video_processor_type") != "Gemma4VideoProcessor":
                raise
            cfg = {k: v for k, v in cfg.items() if k != "video_processor_type"}
            return _video_stand_in()(**cfg)

    from_pretrained._gemma4_stand_in = True
    auto.from_pretrained = classmethod(from_pretrained)


class _FromPil(importlib.abc.Loader):
    """Serves transformers' torchvision Gemma 4 image-processor module from its PIL twin (same functions;
    ``Gemma4ImageProcessor`` is ``Gemma4ImageProcessorPil``), and puts the video-processor stand-in in place."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pil = importlib.import_module(_PIL_IMAGE_MODULE)
        module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        module.Gemma4ImageProcessor = pil.Gemma4ImageProcessorPil
        module.__doc__ = "torchvision-free stand-in installed by ap_vllm.tools.testing.tiny_gemma4_vlm"
        _patch_auto_video_processor()


class _VideoModule(importlib.abc.Loader):
    """Serves transformers' Gemma 4 video-processor module (it cannot even be defined without torchvision) with
    the stand-in class."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.Gemma4VideoProcessor = _video_stand_in()
        module.__doc__ = "torchvision-free stand-in installed by ap_vllm.tools.testing.tiny_gemma4_vlm"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == _TV_IMAGE_MODULE:
            return importlib.machinery.ModuleSpec(name, _FromPil())
        if name == _VIDEO_MODULE:
            return importlib.machinery.ModuleSpec(name, _VideoModule())
        return None


def install_vllm_gemma4_shim(*, register_in_process: bool = True) -> bool:
    """Let transformers' Gemma 4 processor and vLLM's Gemma 4 model load where torchvision is not installed (as in
    this project's venv).

    ``Gemma4Processor``'s module imports ``transformers.models.gemma4.image_processing_gemma4``, which imports
    torchvision (so do vLLM's ``gemma4_mm`` and ``AutoProcessor.from_pretrained`` on this model); and the
    processor always loads a video processor, ``Gemma4VideoProcessor``, which needs torchvision too. This
    installs an import hook (lazy: nothing is imported now) that serves the former from
    ``image_processing_pil_gemma4`` (``Gemma4ImageProcessor`` standing for ``Gemma4ImageProcessorPil``, the class
    the saved processor loads anyway) and makes ``AutoVideoProcessor`` return a stand-in video processor that
    refuses videos (vLLM never uses it: it runs video frames through the image processor).

    With ``register_in_process`` it also imports vLLM's class and registers it with ``ModelRegistry`` as a class
    object, so that vLLM inspects it in this process instead of in a ``python -m
    vllm.model_executor.models.registry`` subprocess (which would not have the hook): for an in-process engine
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). For ``vllm serve`` every process needs the hook before it imports
    ``gemma4_mm``: call ``install_vllm_gemma4_shim(register_in_process=False)`` from a ``sitecustomize``
    (:func:`ap_vllm.tools.testing.server.sitecustomize_env`). Returns False, doing nothing, when torchvision is
    importable; True once the hook is in place. Idempotent.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    if _TV_IMAGE_MODULE in sys.modules:  # (imported before the hook: the stand-in's patch is still needed)
        _patch_auto_video_processor()
    if register_in_process:
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

        ModelRegistry.register_model("Gemma4ForConditionalGeneration", Gemma4ForConditionalGeneration)
    return True


_ATTN_UTILS = "vllm.v1.attention.backends.utils"


def _report_rows(utils) -> None:
    shorten = utils.make_kv_sharing_fast_prefill_common_attn_metadata
    if getattr(shorten, "_reports_rows", False):
        return

    def reporting(common):
        out = shorten(common)
        if out is not common:
            print(f"kv-sharing fast prefill: {common.num_actual_tokens} -> {out.num_actual_tokens} rows",
                  file=sys.stderr, flush=True)
        return out

    reporting._reports_rows = True
    utils.make_kv_sharing_fast_prefill_common_attn_metadata = reporting


def report_fast_prefill_rows() -> None:
    """Log each step in which vLLM's KV-sharing fast prefill (``--kv-sharing-fast-prefill``, You Only Cache Once)
    runs the KV-sharing layers on fewer query rows than the step has: ``kv-sharing fast prefill: N -> M rows`` on
    stderr (the server's log). For a ``sitecustomize`` of a test server, next to :func:`install_vllm_gemma4_shim`:
    it shows that the shortened path really ran, which equal outputs alone cannot (it computes the same logits).
    Lazy, like the shim: it wraps vLLM's function when vLLM imports its module (importing vLLM from every process's
    ``sitecustomize`` made the server's first request 6x slower)."""
    patch_on_import(_ATTN_UTILS, _report_rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ap_vllm.tools.testing.tiny_gemma4_vlm",
        description="Write a tiny random-weight Gemma 4 VLM (offline) that vLLM and transformers can load.")
    p.add_argument("out_dir")
    p.add_argument("--image-tokens", type=int, default=280,
                   help=f"soft-token budget per image, one of {SOFT_TOKEN_BUDGETS} (a square image: "
                        "floor(sqrt(budget))**2 soft tokens)")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--sliding-per-full", type=int, default=1,
                   help="sliding-window layers before each full-attention layer (the last layer is full)")
    p.add_argument("--sliding-window", type=int, default=512)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32, help="head size of the sliding-window layers")
    p.add_argument("--global-head-dim", type=int, default=512, help="head size of the full-attention layers")
    p.add_argument("--num-kv-heads", type=int, default=1)
    p.add_argument("--num-global-kv-heads", type=int, default=None, help="full layers' kv heads (k_eq_v only)")
    p.add_argument("--num-kv-shared-layers", type=int, default=0)
    p.add_argument("--attention-k-eq-v", action="store_true")
    p.add_argument("--bidirectional", choices=["vision"], default=None)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build_tiny_gemma4_vlm(
        a.out_dir, image_tokens=a.image_tokens, num_layers=a.num_layers, sliding_per_full=a.sliding_per_full,
        sliding_window=a.sliding_window, num_heads=a.num_heads, head_dim=a.head_dim,
        global_head_dim=a.global_head_dim, num_kv_heads=a.num_kv_heads, num_global_kv_heads=a.num_global_kv_heads,
        num_kv_shared_layers=a.num_kv_shared_layers, attention_k_eq_v=a.attention_k_eq_v,
        bidirectional=a.bidirectional, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        vocab_size=a.vocab_size, seed=a.seed, dtype=a.dtype)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
