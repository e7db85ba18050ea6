"""Build a tiny Idefics3 vision-language model with random weights, offline, in seconds.

The result is a normal Hugging Face model directory (config.json, model.safetensors,
tokenizer, processor, chat template) that vLLM's real loader serves on CPU::

    python -m ap_vllm.tools.testing.tiny_vlm /tmp/tiny --image-tokens 1024 --num-layers 2
    vllm serve /tmp/tiny --enforce-eager --max-model-len 4096

Architecture: ``Idefics3ForConditionalGeneration`` (Llama text model, SigLIP-style vision
tower of one 32-wide layer). Image splitting is off, so every image becomes exactly ONE
contiguous run of ``image_tokens`` ``<image>`` placeholders, wrapped as::

    <fake_token_around_image> <global-img> <image> x image_tokens <fake_token_around_image>

i.e. ``image_tokens + 3`` prompt tokens per image (each wrapper is a single token).

Token count formula (Idefics3): ``image_seq_len = (image_size // patch_size) ** 2 / scale_factor ** 2``.
Here ``scale_factor = 1`` and ``image_size = sqrt(image_tokens) * patch_size``, so
``image_tokens`` must be a perfect square (64, 256, 1024, 2304, 4096, ...): Idefics3's pixel
shuffle works on a square grid of patches, so a non-square count cannot be one contiguous run.

Weights: float32 by default, drawn from ``torch.Generator().manual_seed(seed)`` in a fixed
order, scaled so that attention logits and output logits have a clear spread (greedy outputs
vary with the prompt and the image and have no fp32 near-ties). The output-embedding rows of
all special tokens (and of unused vocabulary slots) are zero, so greedy decoding never emits
them: generation normally runs to ``max_tokens`` (finish_reason "length").

The tokenizer is a byte-level BPE trained in-process on :data:`CORPUS`, so nothing is
downloaded. Every run with the same arguments writes identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "build_tiny_vlm",
    "image_repl_token_count",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "CORPUS",
    "printable_token_ids",
    "train_bpe",
    "save_quietly",
    "main",
]

BOS = "<|begin_of_text|>"
EOS = "<end_of_utterance>"
PAD = "<pad>"
UNK = "<unk>"
IMAGE = "<image>"
FAKE = "<fake_token_around_image>"
GLOBAL_IMG = "<global-img>"
# <row_i_col_j> are only used with image splitting (off here) but the processor looks them up.
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE, FAKE, GLOBAL_IMG, *ROW_COL]

# Accepts both plain-string and OpenAI-style list content; images become one <image>
# that the processor (and vLLM) expand to the wrapped run of image_tokens placeholders.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}"
    "{{ ' ' + message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}"
    "{% elif part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<image>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CORPUS = """\
The small model looks at a picture and describes what it sees in a few short words.
A red square sits on a blue background, next to a green circle and a yellow triangle.
What is in this image? There is a cat on the mat, a dog in the garden, and a bird in the tree.
Describe the image in detail. The photo shows a city street at night with bright lights and cars.
How many apples are on the table? I count three apples, two bananas and one orange.
The quick brown fox jumps over the lazy dog while the sun sets behind the hills.
User: Can you read the text in the picture? Assistant: The sign says open every day from nine to five.
Colors: red, orange, yellow, green, blue, indigo, violet, black, white, gray, brown, pink, purple.
Shapes: square, circle, triangle, rectangle, line, dot, star, arrow, grid, stripe, pattern.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand.
0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048 4096
A chart shows the price of bread rising from two dollars in the first year to three in the last.
The left half of the image is dark, the right half is light, and a thin line divides them.
In the top corner there is a small logo; in the bottom corner there is a date written in white.
People walk along the river, a boat passes under the bridge, and the water reflects the sky.
Question: which object is closest to the camera? Answer: the wooden chair in front of the window.
The kitchen has a white table, four chairs, a lamp, a bowl of fruit and a plant by the door.
Weather today: cloudy in the morning, sunny in the afternoon, light rain in the evening.
She opened the book, read the first page, and smiled at the drawing of a house by the sea.
Mountains rise behind the village; snow covers the peaks and pine trees cover the slopes.
The table lists names, ages and cities: Anna, 31, Paris; Ben, 27, Oslo; Chen, 45, Lima.
An old map marks roads in black, rivers in blue, forests in green and towns with red dots.
Please answer briefly. Yes. No. Maybe. I am not sure. It looks like a drawing of a face.
The screenshot shows a web page with a search box, a list of results and a button labelled next.
"""


def _check_image_tokens(image_tokens: int) -> int:
    side = math.isqrt(image_tokens)
    if image_tokens < 1 or side * side != image_tokens:
        lo, hi = max(side, 1) ** 2, (side + 1) ** 2
        raise ValueError(
            f"image_tokens={image_tokens} must be a perfect square (Idefics3 maps a square grid of "
            f"patches to tokens); nearest allowed values: {lo}, {hi}")
    return side


def image_repl_token_count(image_tokens: int) -> int:
    """Prompt tokens one image expands to: the placeholders plus 3 wrapper tokens."""
    _check_image_tokens(image_tokens)
    return image_tokens + 3


def train_bpe(vocab_size: int, special_tokens):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on CORPUS, ``special_tokens`` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def save_quietly(model, out: Path) -> None:
    """``model.save_pretrained(out)`` with transformers' warnings silenced (it diffs the config against a default
    one, whose token ids trigger spurious warnings)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on CORPUS, wrapped as a transformers fast tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab_size, SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[IMAGE, FAKE, GLOBAL_IMG, *ROW_COL],
        model_max_length=1 << 20,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.add_bos_token = True
    return fast


def fill_weights(model, value, *, seed: int, output_ids: list[int]) -> None:
    """Overwrite every parameter and buffer of ``model.state_dict()`` deterministically (independent of
    transformers' own init), in sorted name order from one generator seeded with ``seed``.

    ``value(name, shape, normal)`` gives an entry's new value; ``normal(std)`` draws a tensor of that shape from
    the generator (the per-model rule decides which entries draw). Greedy decoding only emits ``output_ids``:
    every other row of ``lm_head`` is zero (logit exactly 0 while emitted tokens have logits of std about the
    rule's output spread).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    with torch.no_grad():
        for name in sorted(sd):
            p = sd[name]

            def normal(std: float, shape=p.shape):
                return torch.randn(shape, generator=g, dtype=torch.float32) * std

            p.copy_(value(name, p.shape, normal).to(p.dtype))
        lm = model.lm_head.weight
        keep = torch.zeros(lm.shape[0], dtype=torch.bool)
        keep[output_ids] = True
        lm[~keep] = 0.0


def fan_in(shape) -> int:
    """A weight's inputs: columns of a matrix, the product of the trailing sizes of a convolution, 1 for a vector."""
    return shape[1] if len(shape) == 2 else (math.prod(shape[1:]) if len(shape) > 2 else 1)


def _init_weights(model, tokenizer, *, seed: int, attn_logit_std: float, output_logit_std: float) -> None:
    """Unit-RMS activations: projections with std ``1/sqrt(fan_in)``, q/k projections scaled so that attention
    logits have std ~``attn_logit_std``, ``lm_head`` with ``output_logit_std/sqrt(hidden)``."""
    import torch

    def value(name, shape, normal):
        if name.endswith("bias"):
            return torch.zeros(shape)
        if "norm" in name:  # RMSNorm / LayerNorm weights
            return torch.ones(shape) + normal(0.05)
        if "embed_tokens" in name or "position_embedding" in name:
            return normal(1.0)
        if name.startswith("lm_head"):
            return normal(output_logit_std / math.sqrt(fan_in(shape)))
        if name.endswith(("q_proj.weight", "k_proj.weight")) and "text_model" in name:
            # unit-RMS input -> q, k entries with std a; q.k/sqrt(d) then has std a^2
            return normal(math.sqrt(attn_logit_std) / math.sqrt(fan_in(shape)))
        return normal(1.0 / math.sqrt(fan_in(shape)))  # v/o projections, MLPs, vision tower, connector, patch conv

    fill_weights(model, value, seed=seed, output_ids=printable_token_ids(tokenizer))


def printable_token_ids(tokenizer) -> list[int]:
    """Ids of non-special tokens that decode, alone, to printable text (what the model may emit)."""
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text and "\ufffd" not in text and text.isprintable():
            out.append(i)
    return out


def build_tiny_vlm(
    out_dir: Union[str, os.PathLike],
    *,
    image_tokens: int = 64,
    num_layers: int = 2,
    num_kv_heads: int = 2,
    num_heads: int = 4,
    head_dim: int = 64,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 16384,
    patch_size: int = 4,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    attn_logit_std: float = 2.0,
    output_logit_std: float = 4.0,
) -> Path:
    """Write a tiny random-weight Idefics3 model to ``out_dir`` and return its path.

    ``image_tokens``: ``<image>`` placeholders per image (a perfect square; one image = one run,
    ``image_tokens + 3`` prompt tokens with wrappers). ``hidden_size`` defaults to
    ``num_heads * head_dim``; ``intermediate_size`` to ``2 * hidden_size``. ``vocab_size`` is the
    model's vocabulary (the trained tokenizer has at most that many tokens; extra rows are never
    produced). Images of any size are resized to ``sqrt(image_tokens) * patch_size`` pixels square.
    """
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil
    from transformers import Idefics3Processor, GenerationConfig

    side = _check_image_tokens(image_tokens)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    hidden_size = hidden_size or num_heads * head_dim
    intermediate_size = intermediate_size or 2 * hidden_size
    image_size = side * patch_size
    if max_position_embeddings < image_tokens + 64:
        raise ValueError("max_position_embeddings must exceed image_tokens + 64")
    if vocab_size < len(SPECIAL_TOKENS) + 300:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 300}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, IMAGE)}

    text_config = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
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
    )
    config = Idefics3Config(
        text_config=text_config,
        vision_config=vision_config,
        scale_factor=1,
        image_token_id=ids[IMAGE],
        tie_word_embeddings=False,
        pad_token_id=ids[PAD],
    )
    config.bos_token_id = ids[BOS]
    config.eos_token_id = ids[EOS]

    torch_dtype = getattr(torch, dtype)
    model = Idefics3ForConditionalGeneration(config)
    _init_weights(model, tokenizer, seed=seed, attn_logit_std=attn_logit_std,
                  output_logit_std=output_logit_std)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    save_quietly(model, out)  # (a default Idefics3Config's Llama defaults: a spurious pad_token_id warning)

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_tokens,
        chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    info = {
        "builder": "ap_vllm.tools.testing.tiny_vlm",
        "image_tokens": image_tokens,
        "image_repl_tokens": image_tokens + 3,
        "image_size": image_size,
        "patch_size": patch_size,
        "scale_factor": 1,
        "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
        "head_dim": head_dim, "hidden_size": hidden_size, "vocab_size": vocab_size,
        "tokenizer_size": len(tokenizer), "seed": seed, "dtype": dtype,
        "token_ids": {"bos": ids[BOS], "eos": ids[EOS], "pad": ids[PAD], "image": ids[IMAGE],
                      "fake_token_around_image": tokenizer.convert_tokens_to_ids(FAKE),
                      "global_img": tokenizer.convert_tokens_to_ids(GLOBAL_IMG)},
    }
    (out / "tiny_vlm.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ap_vllm.tools.testing.tiny_vlm",
        description="Write a tiny random-weight Idefics3 VLM (offline) that vLLM can serve on CPU.")
    p.add_argument("out_dir")
    p.add_argument("--image-tokens", type=int, default=64, help="<image> tokens per image (perfect square)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--max-position-embeddings", type=int, default=16384)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build_tiny_vlm(
        a.out_dir, image_tokens=a.image_tokens, num_layers=a.num_layers, num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size, vocab_size=a.vocab_size,
        max_position_embeddings=a.max_position_embeddings, patch_size=a.patch_size, seed=a.seed,
        dtype=a.dtype)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
