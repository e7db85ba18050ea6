"""Exact (dense) attention: the reference every other attention path is checked against.

For one sequence, queries at absolute positions ``q_pos`` attend to keys at positions
``k_pos`` (grouped-query attention: query head h reads kv head h // (Hq / Hkv))::

    s[h, i, j] = scale * <q[i, h], k[j, h // g]>          (optionally soft-capped:
                                                            s = cap * tanh(s / cap))
    allowed(i, j) = k_pos[j] <= reach[i]                   (causal: reach = q_pos)
                    and q_pos[i] - k_pos[j] < window        (sliding window, if any)
    out[i, h]     = sum_j softmax_j(s[h, i, :])[j] * v[j, h // g]
    lse[h, i]     = log sum_j exp(s[h, i, j])               (over allowed j)

``reach[i]`` is the last key position query i sees: its own position (causal), or, for a query inside a
multimodal item whose tokens attend to each other both ways (vLLM's ``is_mm_prefix_lm`` models, e.g. Gemma 3:
:func:`mm_prefix_reach`), the item's last token.

The log-sum-exp lets partial results over disjoint key sets be merged exactly
(:func:`merge_partials`), which is how exact tokens and compacted spans are combined.
Computation is in float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    causal: bool = True,
    reach: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one sequence.

    Args:
        q: [Nq, Hq, d] queries. k, v: [Nk, Hkv, d] keys and values (Hq % Hkv == 0).
        q_pos: [Nq] int positions of the queries; k_pos: [Nk] int positions of the keys.
        window: sliding-window length (a query sees keys with q_pos - k_pos < window).
        softcap: logit soft-capping value, if the model uses it.
        reach: [Nq] the last key position each query sees (None: ``q_pos``, causal).
    Returns:
        out [Nq, Hq, d] (float32) and lse [Hq, Nq] (float32; -inf where no key is allowed,
        in which case out is 0).
    """
    nq, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    g = hq // hkv
    qf = q.float().reshape(nq, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, g, Nq, d]
    kf = k.float().permute(1, 2, 0)  # [Hkv, d, Nk]
    vf = v.float().permute(1, 0, 2)  # [Hkv, Nk, d]
    s = torch.matmul(qf, kf.unsqueeze(1)) * scale  # [Hkv, g, Nq, Nk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(nq, k.shape[0], dtype=torch.bool, device=q.device)
    if causal:
        allowed &= k_pos[None, :] <= (q_pos if reach is None else reach)[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, g, Nq]
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.matmul(p, vf.unsqueeze(1))  # [Hkv, g, Nq, d]
    out = out.permute(2, 0, 1, 3).reshape(nq, hq, d)
    return out, lse.reshape(hq, nq)


def mm_prefix_reach(positions: torch.Tensor, ranges, seq_len: int) -> torch.Tensor:
    """The last key position each query sees when the tokens of a multimodal item attend to each other both
    ways (vLLM's ``is_mm_prefix_lm``): ``positions`` [n] of the queries (ascending), ``ranges`` the request's
    items as inclusive ``(start, end)`` positions (``CommonAttentionMetadata.mm_req_doc_ranges``)::

        reach(p) = min(end, seq_len - 1)   if start <= p <= end for an item (start, end)
                   p                       otherwise (causal)

    Keys past ``seq_len - 1`` are not in the cache yet (an item split across steps; vLLM's scheduler keeps an
    item in one step for these models). ``reach`` is non-decreasing in p, and >= p."""
    reach = positions.clone()
    for start, end in ranges:
        inside = (positions >= int(start)) & (positions <= int(end))
        reach = torch.where(inside, torch.clamp(torch.full_like(positions, int(end)), max=seq_len - 1), reach)
    return reach


def merge_partials(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention results over disjoint key sets (flash-decoding's combine step).

    Each ``outs[i]`` is [Nq, Hq, d] normalised over its own keys and ``lses[i]`` is [Hq, Nq].
    Result: out = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i lse_i.
    """
    lse_all = torch.stack(lses)  # [P, Hq, Nq]
    lse = torch.logsumexp(lse_all, dim=0)
    w = torch.exp(lse_all - lse.clamp_min(torch.finfo(torch.float32).min))
    w = torch.nan_to_num(w, nan=0.0)  # parts with no allowed key weigh 0
    out = sum(w_i.transpose(0, 1).unsqueeze(-1) * o_i.float() for w_i, o_i in zip(w, outs))
    return out, lse
