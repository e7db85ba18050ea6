"""Attention over compacted spans without rebuilding K/V: the torch reference (the oracle).

Scores and values in coefficient space. For query head h (kv head j = h // g, g = Hq/Hkv)::

    q_proj[h]  = B_k[:, j*d:(j+1)*d] @ q_h                         (R_k numbers, once per step)
    s[h, t]    = scale * <C_k[t] * s_k[t], q_proj[h]>              (optionally soft-capped)
    p[h, t]    = softmax_t s[h, t]           lse[h] = logsumexp_t s[h, t]
    a[h]       = sum_t p[h, t] * C_v[t] * s_v[t]                   (R_v numbers)
    out[h]     = a[h] @ B_v[:, j*d:(j+1)*d]                        (d numbers)

Because the basis is shared by all kv heads, decode over a span is MQA with head size R and
all Hq query heads reading the same coefficient rows.

Pre-RoPE key space (``span.rope`` set): a key's rotation depends on its position, so the query
cannot be projected once; the scores rebuild each key and rotate it (:mod:`ap_vllm.core.rope`)::

    s[h, t]    = scale * <rot_{p_t}((C_k[t] * s_k[t]) @ B_k[:, j*d:(j+1)*d]), q_h>

(R_k * W extra multiply-adds per token; the Triton kernel does this tile by tile in registers,
never writing K). Values are unchanged.

Two-level (attention-aware) read: tokens whose importance is >= the span's threshold
(the top ``importance_fraction`` of the span) use all R_v value components, the others only
the first R_v // divisor (``low_rank``); with ``two_level_keys`` the same applies to keys.
The threshold is the ceil(fraction * n)-th largest importance among n tokens: all T tokens of
the span, or (``sample`` > 0 and T > sample) n = sample tokens of a stratified sample
(:func:`threshold_sample`: one token at an integer-hash offset in each of ``sample`` equal
strata), an estimate of the quantile whose share of full-rank tokens is off by about
sqrt(f (1 - f) / n) (1.4 % at f = 0.25, n = 1024), at the cost of one small sort per layer
instead of a sort of every span token.

Score selection (``score_threshold`` = tau, beyond the paper). The importance lags: it holds the
attention of earlier steps, so a token the current query needs for the first time (the next digit
of a number being copied) is read at low rank exactly when it matters. Keys are read at full rank,
so a decode step's scores are known before its values are read; with ``lse_ref`` the previous
step's log-normaliser (per query head, over all keys of the sequence)::

    p^[h, t] = exp(s[h, t] - lse_ref[h])        (this step's attention, normalised one token late)
    full[t]  = max_h p^[h, t] >= tau            (+inf for a head whose lse_ref is not finite)

A head without a previous lse (a row's first decode step, a slot whose tag does not match) counts
as attending to every token: the row reads everything at full rank (safe). The error bound: with
C_v[t] = C_v^lo[t] + C_v^hi[t] (components < R_v // divisor and the rest) and p[h, t] =
exp(s[h, t] - lse[h]) this step's probability, the output of head h (kv head j) changes by

    out_sel[h] - out_full[h] = - sum_{t not full} p[h, t] C_v^hi[t] B_v[:, j*d:(j+1)*d]
    || . ||  <=  sum_{t not full} p[h, t] e_t  <  tau * exp(lse_ref[h] - lse[h]) * sum_{t not full} e_t

e_t = ||C_v^hi[t] B_v[:, j*d:(j+1)*d]|| the token's value error; exp(lse_ref - lse) <= 1 when the
normaliser did not shrink since the previous step (one more key, a similar query). Each low-rank
token thus adds at most ~tau times its value error to every head, and the total is at most
(sum_{t not full} p[h, t]) max_t e_t <= max_t e_t. The maximum over heads (not the mean) is what
bounds every head: one copy head attending to a token is diluted Hq-fold by a mean. No importance
is kept in this mode (no EMA update).

Importance (EMA of the head-averaged attention probability, weight omega)::

    p_mean[t]     = mean_h exp(s[h, t] - lse_ref[h])
    importance[t] = (1 - omega) * importance[t] + omega * p_mean[t]

``lse_ref`` is the log-normaliser over *all* keys of the sequence (exact + every span).
The exact choice is the current step's lse (two passes); the fused kernel uses the previous
decode step's lse (one pass; the per-head normaliser lags one token). Both are available here.

Exact tokens and spans are combined by the log-sum-exp merge of
:func:`ap_vllm.core.dense.merge_partials` (flash-decoding style).

Sliding-window layers are never compacted: a window together with a compacted span is
rejected (ValueError). Soft-capping is honoured (applied to the low-rank scores).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ap_vllm.kernels.cache_abi import HASH_MASK, HASH_MUL_1, HASH_MUL_2, HASH_SEED_J, HASH_SEED_T

from .compaction import CompactedSpan
from .dense import dense_attention, merge_partials


def low_rank(rank: int, divisor: int) -> int:
    """Components read for a less important token: max(1, R // divisor)."""
    return max(1, rank // max(1, divisor))




def sample_hash(j: torch.Tensor, num_tokens) -> torch.Tensor:
    """h(j, T) in [0, 2^32), int64: x = (j A + T B) mod 2^32, then x ^= x >> 16; x = x M1 mod 2^32;
    x ^= x >> 15; x = x M2 mod 2^32; x ^= x >> 16 (A, B, M1, M2 odd constants < 2^31)."""
    x = (j.long() * HASH_SEED_J + num_tokens * HASH_SEED_T) & HASH_MASK
    x = x ^ (x >> 16)
    x = (x * HASH_MUL_1) & HASH_MASK
    x = x ^ (x >> 15)
    x = (x * HASH_MUL_2) & HASH_MASK
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=256)
def threshold_sample(num_tokens: int, sample: int) -> Optional[torch.Tensor]:
    """Token positions (int64, sorted, CPU) whose importance estimates the threshold of a span of
    ``num_tokens`` = T: None (every token) if ``sample`` = n is 0 or the span is no longer; else one
    position in each of n strata [lo_j, lo_{j+1}), lo_j = floor(j T / n) (widths w_j >= 1)::

        pos_j = lo_j + h(j, T) mod w_j            (h: :func:`sample_hash`)

    a pseudo-random offset fixed by (j, T): the same for every span of that length and every layer,
    no aliasing with image rows, and computable where the importance is read (the threshold kernel)."""
    if sample <= 0 or num_tokens <= sample:
        return None
    j = torch.arange(sample, dtype=torch.int64)
    lo = j * num_tokens // sample
    width = (j + 1) * num_tokens // sample - lo
    return lo + sample_hash(j, num_tokens) % width


def threshold_ranks(counts: Sequence[int], fraction: float) -> list[int]:
    """Per span of ``counts[s]`` tokens, the 0-based rank of its threshold token: ceil(fraction * T) - 1."""
    return [min(n, max(1, math.ceil(fraction * n))) - 1 for n in counts]


def thresholds_from_padded(importances: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Importance [S, T_max] (padding -inf) and ranks [S] (:func:`threshold_ranks`, on the same
    device) -> per span the importance of its ranks[s]-th most important token, float32 [S]."""
    top = importances.float().sort(dim=1, descending=True).values
    return top.gather(1, ranks.long().reshape(-1, 1)).reshape(-1)


def importance_thresholds(importances: Sequence[torch.Tensor], fraction: float, sample: int = 0) -> torch.Tensor:
    """Per span, the importance of its ceil(fraction * n)-th most important token among n (all its
    tokens, or its :func:`threshold_sample` when ``sample`` > 0): tokens >= it read full rank.
    float32 [S] on the spans' device, computed there (no host synchronisation).

    With ties (e.g. all-zero importance right after prefill) more than the fraction may pass,
    which only costs bytes, never accuracy.
    """
    if not importances:
        return torch.empty(0, dtype=torch.float32)
    dev = importances[0].device
    picked = []
    for x in importances:
        x = x.float().reshape(-1)
        pos = threshold_sample(x.numel(), sample)
        picked.append(x if pos is None else x[pos.to(dev)])
    padded = torch.nn.utils.rnn.pad_sequence(picked, batch_first=True, padding_value=float("-inf"))
    ranks = torch.tensor(threshold_ranks([x.numel() for x in picked], fraction)).to(dev, non_blocking=True)
    return thresholds_from_padded(padded, ranks)


def importance_threshold(importance: torch.Tensor, fraction: float) -> float:
    """:func:`importance_thresholds` of one span, as a Python float."""
    return float(importance_thresholds([importance], fraction)[0])


def full_rank_mask(importance: torch.Tensor, threshold: Optional[float | torch.Tensor]) -> torch.Tensor:
    """Tokens read at full rank: importance >= threshold (a float or 0-dim tensor; all if None)."""
    if threshold is None:
        return torch.ones_like(importance, dtype=torch.bool)
    return importance.float() >= threshold


def score_full_mask(scores: torch.Tensor, lse_ref: Optional[torch.Tensor], score_threshold: float) -> torch.Tensor:
    """Score selection: tokens whose values are read at full rank, bool [..., T].

    scores [..., Hq, T] (e.g. [Nq, Hq, T]), lse_ref [..., Hq] (the previous step's lse of each row; None =
    none)::

        full[t] = max_h p^[h, t] >= tau,   p^[h, t] = exp(s[h, t] - lse_ref[h]),  +inf where lse_ref[h] is not finite

    so a row without a (finite) normaliser reads every token at full rank."""
    if lse_ref is None:
        return torch.ones(scores.shape[:-2] + scores.shape[-1:], dtype=torch.bool, device=scores.device)
    ref = lse_ref.float().to(scores.device)[..., None]
    p_hat = torch.where(torch.isfinite(ref), torch.exp(scores.float() - ref), float("inf"))
    return p_hat.amax(-2) >= score_threshold


def _level_coeffs(c: torch.Tensor, full: torch.Tensor, rank_low: int) -> torch.Tensor:
    """Zero components >= rank_low of the rows not in ``full`` (what a masked read loads)."""
    keep = torch.ones_like(c, dtype=torch.bool)
    keep[:, rank_low:] = full[:, None]
    return c * keep


def span_scores(
    q: torch.Tensor, span: CompactedSpan, scale: float, softcap: Optional[float] = None,
    key_full: Optional[torch.Tensor] = None, key_rank_low: Optional[int] = None,
) -> torch.Tensor:
    """Scores s [Nq, Hq, T] (float32) of queries q [Nq, Hq, d] against a compacted span."""
    nq, hq, d = q.shape
    hkv = span.num_kv_heads
    g = hq // hkv
    ck = span.coeff_k_float()
    if key_full is not None and key_rank_low is not None:
        ck = _level_coeffs(ck, key_full, key_rank_low)
    if span.rope is not None:  # pre-RoPE: rebuild the keys and rotate them at their positions
        k = span.rope.rotate((ck @ span.basis_k.float()).reshape(-1, hkv, d), span.positions)
        s = torch.einsum("njgd,tjd->njgt", q.float().reshape(nq, hkv, g, d), k).reshape(nq, hq, -1) * scale
    else:
        bk = span.basis_k.float().reshape(span.key_rank, hkv, d)
        qp = torch.einsum("njgd,rjd->njgr", q.float().reshape(nq, hkv, g, d), bk).reshape(nq, hq, span.key_rank)
        s = torch.einsum("nhr,tr->nht", qp, ck) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def attend_compacted(
    q: torch.Tensor,
    span: CompactedSpan,
    scale: float,
    q_pos: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    causal: bool = True,
    window: Optional[int] = None,
    threshold: Optional[float] = None,
    low_rank_divisor: int = 4,
    two_level_keys: bool = False,
    return_scores: bool = False,
    score_threshold: Optional[float] = None,
    lse_ref: Optional[torch.Tensor] = None,
):
    """Attention of queries q [Nq, Hq, d] over a compacted span, in coefficient space.

    ``threshold``: tokens with importance >= threshold are read at full rank, the others at
    R // low_rank_divisor (values; keys too if ``two_level_keys``); None = all full rank.
    ``score_threshold`` (score selection, see the module docstring; ``threshold`` is then not read):
    query n reads the values of the tokens of :func:`score_full_mask` (its scores, ``lse_ref`` [Nq, Hq]
    or [Hq]; None = every token) at full rank, the others at R_v // low_rank_divisor; keys at full rank.
    Returns out [Nq, Hq, d] float32 and lse [Hq, Nq] (-inf and out = 0 where no token is
    visible), plus the scores [Nq, Hq, T] if ``return_scores``.
    """
    if window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    if score_threshold is not None and two_level_keys:
        raise ValueError("score selection reads keys at full rank: two_level_keys must be False")
    nq, hq, d = q.shape
    hkv, t = span.num_kv_heads, span.num_tokens
    g = hq // hkv
    full = full_rank_mask(span.importance, threshold if score_threshold is None else None)
    s = span_scores(q, span, scale, softcap,
                    key_full=full if two_level_keys else None,
                    key_rank_low=low_rank(span.key_rank, low_rank_divisor) if two_level_keys else None)
    if causal and q_pos is not None:
        allowed = span.positions[None, :] <= q_pos[:, None]  # [Nq, T]
        s = s.masked_fill(~allowed[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Nq, Hq]
    p = torch.nan_to_num(torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float32).min)), nan=0.0)
    rv_low = low_rank(span.value_rank, low_rank_divisor)
    if score_threshold is None:
        cv = _level_coeffs(span.coeff_v_float(), full, rv_low)
        a = torch.einsum("nht,tr->nhr", p, cv)
    else:  # per query: a = sum_t p C_v^lo[t] + sum_{t full} p C_v^hi[t]
        full_q = score_full_mask(s, None if lse_ref is None else lse_ref.float().expand(nq, hq), score_threshold)
        cv = span.coeff_v_float()
        lo = _level_coeffs(cv, torch.zeros(t, dtype=torch.bool, device=cv.device), rv_low)
        a = torch.einsum("nht,tr->nhr", p, lo) + torch.einsum("nht,tr->nhr", p * full_q[:, None, :], cv - lo)
    bv = span.basis_v.float().reshape(span.value_rank, hkv, d)
    out = torch.einsum("njgr,rjd->njgd", a.reshape(nq, hkv, g, -1), bv).reshape(nq, hq, d)
    if return_scores:
        return out, lse.T.contiguous(), s
    return out, lse.T.contiguous()


def update_importance(
    importance: torch.Tensor, scores: torch.Tensor, lse_ref: torch.Tensor, omega: float = 0.25
) -> torch.Tensor:
    """EMA update: imp = (1 - omega) imp + omega * mean_h exp(s[h, t] - lse_ref[h]).

    scores [Hq, T] (one decode query) or [Nq, Hq, T] (then the last query is used);
    lse_ref [Hq] the normaliser over all keys of the sequence. Returns the new importance.
    """
    if scores.dim() == 3:
        scores = scores[-1]
    p_mean = torch.exp(scores.float() - lse_ref.float()[:, None]).nan_to_num(nan=0.0).mean(0)
    return (1.0 - omega) * importance.float() + omega * p_mean


def decode_mixed(
    q: torch.Tensor,
    k_exact: torch.Tensor,
    v_exact: torch.Tensor,
    exact_pos: torch.Tensor,
    spans: Sequence[CompactedSpan],
    scale: float,
    q_pos: torch.Tensor,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    thresholds: Optional[Sequence[Optional[float]]] = None,
    low_rank_divisor: int = 4,
    two_level_keys: bool = False,
    importance_ema: Optional[float] = 0.25,
    lse_ref: Optional[torch.Tensor] = None,
    score_threshold: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: exact tokens (k_exact/v_exact [Ne, Hkv, d] at ``exact_pos``) plus
    compacted spans, merged with log-sum-exp. Returns out [Nq, Hq, d] fp32, lse [Hq, Nq].

    If ``importance_ema`` is not None, each span's ``importance`` is updated in place from
    the last query: normalised by ``lse_ref`` [Hq] if given (the fused kernel's one-pass
    mode, previous step's lse) else by this step's lse (exact).

    ``score_threshold``: score selection of the values of every span (``thresholds`` not read), normalised
    by ``lse_ref`` [Hq] (None = every token at full rank); no importance is kept then (``importance_ema``
    must be None).
    """
    if spans and window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    if score_threshold is not None and importance_ema is not None:
        raise ValueError("score selection keeps no importance: pass importance_ema=None")
    outs, lses, scores = [], [], []
    if k_exact.shape[0]:
        o, l = dense_attention(q, k_exact, v_exact, scale, q_pos, exact_pos, window=window, softcap=softcap)
        outs.append(o)
        lses.append(l)
    thresholds = list(thresholds) if thresholds is not None else [None] * len(spans)
    for span, thr in zip(spans, thresholds):
        o, l, s = attend_compacted(q, span, scale, q_pos, softcap, threshold=thr,
                                   low_rank_divisor=low_rank_divisor, two_level_keys=two_level_keys,
                                   return_scores=True, lse_ref=lse_ref,
                                   score_threshold=score_threshold)
        outs.append(o)
        lses.append(l)
        scores.append(s)
    if not outs:
        nq, hq, d = q.shape
        return torch.zeros(nq, hq, d), torch.full((hq, nq), float("-inf"))
    out, lse = merge_partials(outs, lses)
    if importance_ema is not None:
        ref = lse[:, -1] if lse_ref is None else lse_ref
        for span, s in zip(spans, scores):
            span.importance = update_importance(span.importance, s, ref, importance_ema)
    return out, lse


# --------------------------------------------------------------------------------------
# Byte and FLOP accounting
# --------------------------------------------------------------------------------------
@dataclass
class StepCost:
    """Bytes read and FLOPs of one decode step over one span, for one layer and sequence."""

    bytes_read: float
    flops: float


def decode_step_cost(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    key_rank: Optional[int] = None,
    value_rank: Optional[int] = None,
    dtype_bytes: int = 2,
    coefficient_bytes: Optional[int] = None,
    importance_fraction: Optional[float] = None,
    low_rank_divisor: int = 4,
    two_level_keys: bool = False,
    with_importance: bool = True,
    sector_bytes: int = 32,
    pre_rope: bool = False,
) -> StepCost:
    """Bytes read / FLOPs per decode step over a span of T tokens.

    * ``key_rank is None``: the exact KV (T * 2 * Hkv * d elements; 4 FLOPs per head per
      element pair: q.k and p*v).
    * compacted: bases ((R_k + R_v) * W), key coefficients, value coefficients at full rank
      for the top ``importance_fraction`` tokens and R_v // divisor for the rest (each row
      rounded up to whole ``sector_bytes`` sectors, as memory is read), per-token scales
      (FP8) and the importance (read + written, 8 bytes). ``importance_fraction=None``:
      every token at full rank. ``pre_rope``: keys are rebuilt (R_k * W multiply-adds per
      token) and rotated before the scores; same bytes.
    """
    t, w = num_tokens, num_kv_heads * head_size
    if key_rank is None:
        return StepCost(2.0 * t * w * dtype_bytes, 4.0 * t * num_q_heads * head_size)
    value_rank = key_rank if value_rank is None else value_rank
    cb = dtype_bytes if coefficient_bytes is None else coefficient_bytes

    def row_bytes(r: int) -> float:
        return math.ceil(r * cb / sector_bytes) * sector_bytes

    f = 1.0 if importance_fraction is None else importance_fraction
    rv_low, rk_low = low_rank(value_rank, low_rank_divisor), low_rank(key_rank, low_rank_divisor)
    rk_eff = f * key_rank + (1 - f) * rk_low if two_level_keys else key_rank
    rv_eff = f * value_rank + (1 - f) * rv_low
    kb = f * row_bytes(key_rank) + (1 - f) * row_bytes(rk_low) if two_level_keys else row_bytes(key_rank)
    vb = f * row_bytes(value_rank) + (1 - f) * row_bytes(rv_low)
    per_token = kb + vb + (8 if with_importance else 0) + (8 if coefficient_bytes == 1 else 0)
    basis = (key_rank + value_rank) * w * dtype_bytes
    if pre_rope:  # rebuild + rotate keys, score in head space; out projection once
        flops = 2.0 * num_q_heads * value_rank * head_size
        flops += t * (2.0 * rk_eff * w + 3.0 * w + 2.0 * num_q_heads * head_size + 2.0 * num_q_heads * rv_eff)
    else:
        flops = 2.0 * num_q_heads * (head_size * key_rank + value_rank * head_size)  # q_proj + out projection
        flops += 2.0 * t * num_q_heads * (rk_eff + rv_eff)
    return StepCost(t * per_token + basis, flops)


__all__ = [
    "attend_compacted", "span_scores", "update_importance", "decode_mixed", "importance_threshold",
    "importance_thresholds",
    "threshold_ranks",
    "threshold_sample",
    "sample_hash",
    "thresholds_from_padded",
    "full_rank_mask", "score_full_mask", "low_rank", "decode_step_cost", "StepCost",
]
