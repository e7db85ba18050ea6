"""Write a tiny 1-layer EAGLE / EAGLE-3 drafter checkpoint for a tiny target model, offline.

    write_eagle_drafter(target_dir, out, method="eagle" | "eagle3", mimic=True)

Serve with ``--speculative-config '{"method": "<method>", "model": "<out>", "num_speculative_tokens": 3}'``.

What vLLM (0.32) loads:

* ``config.json``: a plain Llama config (``model_type="llama"``), 1 layer, the target text model's hidden size,
  heads, kv heads, head_dim, vocab, rope theta (1-D RoPE: the proposer passes ``positions[0]`` of an M-RoPE target
  to a non-M-RoPE drafter). vLLM wraps it in ``EAGLEConfig``, which turns ``LlamaForCausalLM`` into
  ``EagleLlamaForCausalLM`` (method eagle, ``llama_eagle.py``) or ``Eagle3LlamaForCausalLM`` (eagle3,
  ``llama_eagle3.py``). The drafter's decoder layer is built with prefix ``model.layers.<target layers + i>``, so
  its attention layer is ``model.layers.<N>.self_attn.attn`` (N = the target text model's layer count); its module
  index (and checkpoint name) is ``layers.0``.
* ``model.safetensors`` names (the loaders prepend ``model.`` to everything but ``lm_head``):

  eagle : ``fc.weight [H, 2H]`` (input ``cat(embed(next token), target final hidden)``),
          ``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.post_attention_layernorm.weight``,
          ``layers.0.mlp.{gate,up,down}_proj.weight``. No ``input_layernorm`` for layer 0 (it is an Identity), no
          final norm (the output goes straight to lm_head), no ``lm_head`` (EagleLlamaForCausalLM has none: it is
          always the target's; the proposer takes ``get_language_model().lm_head``), ``embed_tokens`` optional
          (absent or equal: the target's ``get_language_model().model.embed_tokens`` is shared).
  eagle3: ``fc.weight [H, k*H_target]`` (input: ``k`` aux hidden states of the target, ids in
          ``eagle_aux_hidden_state_layer_ids``: 0 = input embeddings, i = output of layer i-1),
          ``layers.0.self_attn.{q,k,v}_proj.weight`` with ``2H`` input columns (``cat(input_layernorm(embed),
          hidden_norm(fc out))``), ``o_proj``, ``layers.0.{input_layernorm,hidden_norm,post_attention_layernorm}``,
          ``layers.0.mlp.*``, ``norm.weight``; ``lm_head.weight`` / ``embed_tokens.weight`` optional (absent, or
          equal to the target's: the target's is shared).

``mimic=True`` (default): instead of random weights, a hand-built one-layer *induction head* (prompt lookup with
n=1, inside the drafter's own KV cache): the draft for the token after x is the token that followed x's latest
earlier occurrence in the request. Tiny random targets fall into loops, so these drafts are often accepted
(tiny Qwen2.5-VL, 6 image prompts x 32 greedy tokens, k=3: eagle3 91/309 draft tokens accepted, eagle 86/321).
eagle3 reads x_p from the target's aux hidden state 0 (its input embeddings); eagle fits a linear map from the
target's final hidden state to x_p (it loads the target with transformers and runs it on random text, a few
seconds). Needs hidden_size >= 32. ``mimic=False``: random weights (and a random own lm_head for eagle3).

CLI: ``python drafter.py TARGET_DIR OUT eagle|eagle3 [random]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

__all__ = ["write_eagle_drafter"]


def _target_text_config(target_dir: Path) -> tuple[dict, dict]:
    cfg = json.loads((target_dir / "config.json").read_text())
    return cfg, cfg.get("text_config") or cfg


def _load_target_weights(target_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(target_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return weights


def _text_prefix(weights: dict) -> tuple[str, str]:
    """(prefix of the text model's ``layers``/``embed_tokens``/``norm``, name of the output head)."""
    for name in weights:
        if name.endswith("embed_tokens.weight") and "vision" not in name:
            prefix = name[: -len("embed_tokens.weight")]
            break
    else:
        raise ValueError("no embed_tokens in the target checkpoint")
    head = "lm_head.weight" if "lm_head.weight" in weights else prefix + "embed_tokens.weight"
    return prefix, head


def write_eagle_drafter(target_dir, out, method: str = "eagle3", *, mimic: bool = True, seed: int = 0,
                        intermediate_size: Optional[int] = None, value_rank: Optional[int] = None) -> Path:
    """Writes a 1-layer drafter checkpoint for the target model directory ``target_dir`` to ``out``; returns ``out``.
    ``method``: "eagle" (EagleLlamaForCausalLM) or "eagle3" (Eagle3LlamaForCausalLM). fp32 unless the target is
    stored in bf16/fp16. ``value_rank`` (mimic only): the value projection's rank is at most this (the value code
    uses that many dimensions), so a span's values in the drafter's layer have at most that rank."""
    import torch
    from safetensors.torch import save_file

    if method not in ("eagle", "eagle3"):
        raise ValueError(f"method={method!r}: 'eagle' or 'eagle3'")
    target_dir, out = Path(target_dir), Path(out)
    full, text = _target_text_config(target_dir)
    dtype_name = text.get("dtype") or text.get("torch_dtype") or full.get("dtype") or full.get("torch_dtype") \
        or "float32"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name, torch.float32)
    H = text["hidden_size"]
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads", heads)
    hd = text.get("head_dim") or H // heads
    n_target = text["num_hidden_layers"]
    inter = intermediate_size or text.get("intermediate_size", 2 * H)
    rope = dict(text.get("rope_parameters") or {})
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    eps = text.get("rms_norm_eps", 1e-6)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": H, "intermediate_size": inter, "num_hidden_layers": 1,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": text["vocab_size"], "draft_vocab_size": text["vocab_size"],
        "max_position_embeddings": text.get("max_position_embeddings", 32768),
        "rms_norm_eps": eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
        "tie_word_embeddings": False, "dtype": dtype_name,
        "bos_token_id": text.get("bos_token_id", full.get("bos_token_id")),
        "eos_token_id": text.get("eos_token_id", full.get("eos_token_id")),
        "pad_token_id": text.get("pad_token_id", full.get("pad_token_id")),
    }
    if mimic:
        theta = 1e38  # (float32's range: vLLM computes theta ** (2i/d) in float32)
        cfg.update({"rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta})
        if method == "eagle3":
            cfg["norm_before_residual"] = True
    if method == "eagle3":
        aux = [0, n_target // 2, n_target]  # ids: 0 = embeddings, i = after layer i-1 (distinct for n_target >= 2)
        cfg.update({"target_hidden_size": H, "eagle_aux_hidden_state_layer_ids": aux,
                    "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True}})

    target = _load_target_weights(target_dir)
    prefix, head = _text_prefix(target)
    target = {k: v.float() for k, v in target.items()}
    g = torch.Generator().manual_seed(seed)
    if method == "eagle":
        w = _eagle_weights(target, prefix, head, H, heads, kv, hd, inter, g, mimic, cfg["rope_theta"],
                           cfg["max_position_embeddings"], target_dir, value_rank=value_rank)
    else:
        w = _eagle3_weights(target, prefix, head, H, heads, kv, hd, inter, g, mimic, aux, cfg["rope_theta"],
                            cfg["max_position_embeddings"], value_rank=value_rank)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.to(dtype).contiguous() for k, v in w.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def _rand(g, *shape, std=None):
    import torch

    fan_in = shape[-1]
    return torch.randn(shape, generator=g) * (std if std is not None else fan_in ** -0.5)


def _final_hidden_samples(target_dir: Path, n_seq: int = 8, seq_len: int = 256, seed: int = 0):
    """(token ids [N], the target's final (normed) hidden states [N, H]) on random text: what an EAGLE-1 drafter
    gets from the target."""
    import torch
    import transformers

    cfg = json.loads((target_dir / "config.json").read_text())
    model = getattr(transformers, cfg["architectures"][0]).from_pretrained(str(target_dir), dtype=torch.float32).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(8, vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (transformers: after the norm)
    return ids.reshape(-1), hidden.reshape(-1, hidden.shape[-1]).float()


def _eagle_weights(t, prefix, head, H, heads, kv, hd, inter, g, mimic, theta, max_len, target_dir, eps=1e-3,
                   value_rank=None):
    """EAGLE-1. ``mimic``: a one-layer induction head (prompt lookup, n=1) over the drafter's own KV cache.

    Drafter position p gets ``fc(cat(embed_d(x_{p+1}), h_p))`` (h_p: the target's final hidden state at p, which
    mostly encodes x_p). The residual stream (no input norm in EAGLE-1's layer) carries, scaled by ``eps`` so it
    barely reaches the logits: a query code of x_{p+1} (the drafter's own embed_tokens), a key code of x_p (a least
    squares fit from h_p, on random text through the target in transformers) and a value code of x_{p+1}; q/k/v
    scale them back up (rope_theta 1e38: the code dims do not turn). The value code of token y is the first
    ``kv*vd`` dims of the target's (unit) lm_head row, o_proj puts it there: the attention output, which looks up
    the token that followed the query token's earlier occurrence, goes straight to the target's (shared) lm_head."""
    import torch

    w = {}
    if not mimic:
        w["fc.weight"] = _rand(g, H, 2 * H)
        w["layers.0.self_attn.q_proj.weight"] = _rand(g, heads * hd, H)
        w["layers.0.self_attn.k_proj.weight"] = _rand(g, kv * hd, H)
        w["layers.0.self_attn.v_proj.weight"] = _rand(g, kv * hd, H)
        w["layers.0.self_attn.o_proj.weight"] = _rand(g, H, heads * hd)
        w["layers.0.post_attention_layernorm.weight"] = torch.ones(H)
        w["layers.0.mlp.gate_proj.weight"] = _rand(g, inter, H)
        w["layers.0.mlp.up_proj.weight"] = _rand(g, inter, H)
        w["layers.0.mlp.down_proj.weight"] = _rand(g, H, inter)
        return w
    pairs = _static_rope_pairs(hd, theta, max_len)
    slots = [d for i in pairs for d in (i, i + hd // 2)]
    m = min(len(slots), H // 4)  # code dims (read by every head): query code at [0, m), key code at [m, 2m)
    vd = min(hd, H - 2 * m)  # value dims per kv head used, at [2m, 2m + ku*vd)
    ku = min(kv, (H - 2 * m) // vd)  # kv heads used (the others' q/k/v/o stay 0)
    if value_rank:
        vd = max(1, min(vd, value_rank // ku))
    if m < 4 or vd < 4:
        raise ValueError(f"mimic: hidden_size {H} too small (m={m}, vd={vd})")
    group = heads // kv
    qk, vo = m, 2 * m
    vocab = t[head].shape[0]
    # codes: a random projection of the target's embeddings (a linear function of them, so that a linear map
    # of the final hidden state, which mostly holds embed(x_p), finds them)
    emb_t = t[prefix + "embed_tokens.weight"]
    proj = torch.linalg.qr(torch.randn(emb_t.shape[1], m, generator=g))[0]
    codes = emb_t @ proj
    codes = codes / codes.norm(dim=1, keepdim=True).clamp_min(1e-6) * m ** 0.5  # unit-rms codes
    ids, hidden = _final_hidden_samples(Path(target_dir))
    fit = torch.linalg.lstsq(hidden, codes[ids]).solution.T  # [m, H]: h_p -> code of x_p
    lm = t[head]
    unit = lm / lm.norm(dim=1, keepdim=True).clamp_min(1e-6)
    emb = torch.zeros(vocab, H)
    emb[:, :qk] = codes
    emb[:, vo: vo + ku * vd] = unit[:, : ku * vd]
    w["embed_tokens.weight"] = emb
    fc = torch.zeros(H, 2 * H)
    fc[:qk, :qk] = torch.eye(qk) * eps
    fc[vo: vo + ku * vd, vo: vo + ku * vd] = torch.eye(ku * vd) * eps
    fc[qk: qk + m, H:] = fit * eps
    w["fc.weight"] = fc
    beta = (70 * hd ** 0.5 / m) ** 0.5  # a match scores about 70
    q = torch.zeros(heads * hd, H)
    k = torch.zeros(kv * hd, H)
    v = torch.zeros(kv * hd, H)
    o = torch.zeros(H, heads * hd)
    for j in range(ku):
        for s in range(m):
            k[j * hd + slots[s], qk + s] = beta / eps
            for h in range(j * group, (j + 1) * group):
                q[h * hd + slots[s], s] = beta / eps
        for r in range(vd):
            v[j * hd + r, vo + j * vd + r] = 1.0 / eps
            o[j * vd + r, j * group * hd + r] = 1.0
    w["layers.0.self_attn.q_proj.weight"] = q
    w["layers.0.self_attn.k_proj.weight"] = k
    w["layers.0.self_attn.v_proj.weight"] = v
    w["layers.0.self_attn.o_proj.weight"] = o
    w["layers.0.post_attention_layernorm.weight"] = torch.ones(H)
    w["layers.0.mlp.gate_proj.weight"] = _rand(g, inter, H)
    w["layers.0.mlp.up_proj.weight"] = _rand(g, inter, H)
    w["layers.0.mlp.down_proj.weight"] = torch.zeros(H, inter)
    return w


def _static_rope_pairs(hd: int, theta: float, max_len: int) -> list[int]:
    """Rotary pairs (NeoX layout: dims i and i + hd/2) that turn by < 0.1 rad over ``max_len`` positions."""
    return [i for i in range(hd // 2) if max_len * theta ** (-2 * i / hd) < 0.1]


def _eagle3_weights(t, prefix, head, H, heads, kv, hd, inter, g, mimic, aux, theta, max_len, value_rank=None):
    """EAGLE-3. ``mimic``: a one-layer induction head (prompt lookup, n=1) over the drafter's own KV cache.

    Drafter position p holds token x_{p+1} (its input) and the target's aux hidden states at p, whose first one is
    the target's input embedding of x_p. So: ``fc`` copies embed(x_p)[:H/2] into residual dims H/2..H;
    ``hidden_norm`` (weights 0 on dims :H/2, ``norm_before_residual``) passes only those dims on, as the residual and
    as the hidden half of the qkv input; keys = embed(x_p) (from that half), queries = embed(x_{t+1}) (the embedding
    half, the target's embed_tokens, shared), values = embed(x_{p+1})[:kv*hd], all on rotary pairs that do not turn
    (rope_theta 1e38), scaled so the softmax is nearly one-hot: the query token's earlier occurrence p returns the
    token that followed it. o_proj puts the value in dims :H/2 (the residual has none there), the drafter's own
    lm_head reads those dims (rows: the target's embeddings, unit length; 0 where the target's lm_head row is 0)."""
    import torch

    w = {}
    n_aux = len(aux)
    half = H // 2
    if not mimic:
        w["fc.weight"] = _rand(g, H, n_aux * H)
        w["norm.weight"] = torch.ones(H)
        w["layers.0.self_attn.o_proj.weight"] = _rand(g, H, heads * hd)
        w["layers.0.mlp.down_proj.weight"] = _rand(g, H, inter)
        w["lm_head.weight"] = _rand(g, t[head].shape[0], H, std=4 * H ** -0.5)
        w["layers.0.self_attn.q_proj.weight"] = _rand(g, heads * hd, 2 * H)
        w["layers.0.self_attn.k_proj.weight"] = _rand(g, kv * hd, 2 * H)
        w["layers.0.self_attn.v_proj.weight"] = _rand(g, kv * hd, 2 * H)
        for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            w[f"layers.0.{n}.weight"] = torch.ones(H)
        w["layers.0.mlp.gate_proj.weight"] = _rand(g, inter, H)
        w["layers.0.mlp.up_proj.weight"] = _rand(g, inter, H)
        return w
    pairs = _static_rope_pairs(hd, theta, max_len)
    slots = [d for i in pairs for d in (i, i + hd // 2)]  # head dims that RoPE leaves (nearly) alone
    ku = max(1, min(kv, half // 16))  # kv heads used (the others' q/k/v/o stay 0)
    m = min(len(slots), half // ku)  # match dims per kv head used
    if m < 8:
        raise ValueError(f"mimic: only {m} static rotary dims per kv head")
    vd = min(hd, half // ku)  # value dims per kv head used
    if value_rank:
        vd = max(1, min(vd, value_rank // ku))
    group = heads // kv
    beta = (50 * hd ** 0.5 / m) ** 0.5  # match score ~ beta^2 * m * 1.4 / sqrt(hd): about 70 (x 0.5 .. 1.5)
    fc = torch.zeros(H, n_aux * H)
    fc[half:, :half] = torch.eye(half)  # aux 0 (target input embeddings at p), first half -> dims H/2..H
    w["fc.weight"] = fc
    hn = torch.zeros(H)
    hn[half:] = 1
    w["layers.0.hidden_norm.weight"] = hn
    w["layers.0.input_layernorm.weight"] = torch.ones(H)
    w["layers.0.post_attention_layernorm.weight"] = torch.ones(H)
    w["norm.weight"] = torch.ones(H)
    q = torch.zeros(heads * hd, 2 * H)
    k = torch.zeros(kv * hd, 2 * H)
    v = torch.zeros(kv * hd, 2 * H)
    o = torch.zeros(H, heads * hd)
    for j in range(ku):
        for s in range(m):
            e = j * m + s  # embedding dim matched by kv head j, slot s
            k[j * hd + slots[s], H + half + e] = beta
            for h in range(j * group, (j + 1) * group):
                q[h * hd + slots[s], e] = beta
        for r in range(vd):
            v[j * hd + r, j * vd + r] = 1.0
            o[j * vd + r, j * group * hd + r] = 1.0  # the group's first q head
    w["layers.0.self_attn.q_proj.weight"] = q
    w["layers.0.self_attn.k_proj.weight"] = k
    w["layers.0.self_attn.v_proj.weight"] = v
    w["layers.0.self_attn.o_proj.weight"] = o
    w["layers.0.mlp.gate_proj.weight"] = _rand(g, inter, H)
    w["layers.0.mlp.up_proj.weight"] = _rand(g, inter, H)
    w["layers.0.mlp.down_proj.weight"] = torch.zeros(H, inter)
    emb = t[prefix + "embed_tokens.weight"][:, : ku * vd]
    lm = torch.zeros(emb.shape[0], H)
    lm[:, : ku * vd] = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-6)
    # ties: a token seen twice before, followed by a and by b, gives the value (e_a + e_b) / 2 and equal logits for a
    # and b (unit rows); rows off unit length by about 5% break them by far more than rounding does
    lm[:, : ku * vd] += torch.randn(lm.shape[0], ku * vd, generator=g) * (0.05 / (ku * vd) ** 0.5)
    lm[t[head].abs().sum(1) == 0] = 0  # tokens the target never emits
    w["lm_head.weight"] = lm
    return w


if __name__ == "__main__":
    print(write_eagle_drafter(sys.argv[1], sys.argv[2], sys.argv[3], mimic=(sys.argv[4:] != ["random"])))
