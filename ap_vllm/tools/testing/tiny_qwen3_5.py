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

``mtp_layers``: the model's own MTP head too (vLLM's ``Qwen3_5MTP``, served with ``--speculative-config
'{"method": "mtp", ...}'``): ``mtp_layers`` full-attention decoder layers with random weights
(:func:`add_mtp_head`).

Without torchvision: :func:`ap_vllm.tools.testing.tiny_qwen2_5_vl.install_qwen2_vl_shim` in every vLLM process, as
for Qwen3-VL. :func:`report_mtp_attention` logs what the MTP head's attention layer computes (for the tests).
"""

from __future__ import annotations

import json
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
                       seed: int = 0, video_tokens: int = 2304, mtp_layers: int = 0) -> Path:
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
    if mtp_layers:
        add_mtp_head(out, mtp_layers, seed=seed + 1, value_rank=value_rank)
    return out


def add_mtp_head(model_dir: Path, num_layers: int = 1, *, seed: int = 1, std: float = 0.09,
                 value_rank: Optional[int] = None) -> list[str]:
    """Adds an MTP head with random weights to the tiny Qwen3.5 in ``model_dir`` (its single ``model.safetensors``
    rewritten, ``text_config.mtp_num_hidden_layers`` set); returns the names of the tensors added.

    What vLLM's ``Qwen3_5MTP`` loads (``embed_tokens`` and ``lm_head`` are the model's): ``mtp.fc.weight``
    [H, 2H] (input ``cat(norm(embed(next token)), norm(hidden))``), ``mtp.pre_fc_norm_{embedding,hidden}.weight``,
    ``mtp.norm.weight``, and per layer ``mtp.layers.{i}.*`` with the names of the model's full-attention layers
    (``q_proj`` holds the query and the output gate: 2 x heads x head_dim rows). Norms as the model's (the value of
    its final norm), projections N(0, std^2): large enough that the head's attention moves its drafts; value
    projections of rank ``value_rank`` (as the model's), so the same lossless value rank holds in its layers."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg["text_config"]
    hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    hd, inter = text["head_dim"], text["intermediate_size"]
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("mtp.")}
        metadata = f.metadata() or {"format": "pt"}
    (final_norm,) = [v for k, v in tensors.items() if k.endswith("language_model.norm.weight")]
    dtype = final_norm.dtype
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n):
        return torch.full((n,), float(final_norm.float().mean())).to(dtype)

    head = {"mtp.fc.weight": rand(hidden, 2 * hidden), "mtp.pre_fc_norm_embedding.weight": norm(hidden),
            "mtp.pre_fc_norm_hidden.weight": norm(hidden), "mtp.norm.weight": norm(hidden)}
    for i in range(num_layers):
        v = rand(kv * hd, hidden)
        if value_rank is not None:
            a, b = torch.randn(kv * hd, value_rank, generator=g), torch.randn(value_rank, hidden, generator=g)
            v = (a @ b * (std / value_rank ** 0.5)).to(dtype)
        p = f"mtp.layers.{i}."
        head.update({p + "self_attn.q_proj.weight": rand(2 * heads * hd, hidden),
                     p + "self_attn.k_proj.weight": rand(kv * hd, hidden), p + "self_attn.v_proj.weight": v,
                     p + "self_attn.o_proj.weight": rand(hidden, heads * hd),
                     p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd),
                     p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                     p + "mlp.down_proj.weight": rand(hidden, inter),
                     p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden)})
    save_file({**tensors, **head}, str(model_dir / "model.safetensors"), metadata=metadata)
    text["mtp_num_hidden_layers"] = num_layers
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return sorted(head)


MTP_ATTENTION = "mtp attention:"
MTP_ROWS = 8  # the last query rows of a forward reported (a prompt chunk's last, next to its image's end)


def _hook_mtp_attention(runner_module) -> None:
    runner = runner_module.GPUModelRunner
    initialize = runner.initialize_kv_cache
    if getattr(initialize, "_reports_mtp", False):
        return

    def log_rows(module, args, out):
        o = (out[0] if isinstance(out, tuple) else out).float()
        rows = [f"{r.norm().item():.4f}:" + ",".join(f"{x:.4f}" for x in r[:4].tolist()) for r in o[-MTP_ROWS:]]
        sys.stderr.write(f"{MTP_ATTENTION} {module.layer_name} {' '.join(rows)}\n")
        sys.stderr.flush()

    def initialize_kv_cache(self, *args, **kwargs):
        result = initialize(self, *args, **kwargs)
        for name, layer in self.vllm_config.compilation_config.static_forward_context.items():
            if name.startswith("mtp.") and hasattr(layer, "layer_name"):
                layer.register_forward_hook(log_rows)
        return result

    initialize_kv_cache._reports_mtp = True
    runner.initialize_kv_cache = initialize_kv_cache


def report_mtp_attention() -> None:
    """Log, for every forward of an MTP head's attention layer, the output of each of its last :data:`MTP_ROWS` query
    rows (its norm and first four values): ``mtp attention: <layer> norm:v0,v1,v2,v3 ...`` on stderr (the server's
    log), to compare what the head reads from its KV cache on two servers. For a ``sitecustomize`` of a test server
    (``--enforce-eager``); lazy: it wraps vLLM's model runner when vLLM imports it."""
    from ap_vllm.tools.testing.server import patch_on_import

    patch_on_import("vllm.v1.worker.gpu_model_runner", _hook_mtp_attention)


def main(argv: Optional[list[str]] = None) -> int:
    return qwen_vl_main(argv, build_tiny_qwen3_5, __doc__)


if __name__ == "__main__":
    sys.exit(main())
