"""Synthetic K/V and paged batches for tests and benchmarks.

``low_rank_kv``: T x Hkv x d matrices whose concatenated-heads matrix has singular values
``scale * decay**i`` (a decaying spectrum, as measured on visual tokens) plus Gaussian noise.
``make_paged_batch``: a vLLM-style paged cache with random block placement, some sequences
carrying compacted spans packed into their own blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .compaction import CompactedSpan, compact_span
from .lowrank_attention import importance_threshold
from .paged import KV_FP8_DTYPE, kv_dequantize, kv_quantize
from .paged_layout import PagedSpan, fits, pack_span, paged_span_block_ids, span_layout_for
from .rope import RopeTable


def low_rank_kv(num_tokens: int, num_kv_heads: int, head_size: int, decay: float = 0.93, noise: float = 0.01,
                generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, Hkv, d]: X = sqrt(T W) U diag(s / ||s||) V^T + noise * N(0, 1), s_i = decay**i.

    Entries have about unit variance; the best rank-R approximation leaves a relative
    Frobenius error of about sqrt(decay**(2R)) (+ the noise floor).
    """
    t, w = num_tokens, num_kv_heads * head_size
    r = min(t, w)
    u, _ = torch.linalg.qr(torch.randn(t, r, generator=generator))
    vt, _ = torch.linalg.qr(torch.randn(w, r, generator=generator))
    s = decay ** torch.arange(r, dtype=torch.float32)
    s = s / s.norm() * (t * w) ** 0.5
    x = (u * s) @ vt.T + noise * torch.randn(t, w, generator=generator)
    return x.reshape(t, num_kv_heads, head_size).to(dtype)


@dataclass
class PagedBatch:
    q: torch.Tensor  # [B, Hq, d]
    kv_cache: torch.Tensor  # [num_blocks, 2, page, Hkv, d]
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    spans: list  # list[PagedSpan]
    keys: list  # exact K per sequence [L, Hkv, d] (before compaction)
    values: list
    compacted: list = field(default_factory=list)  # CompactedSpan per span (as packed)


def make_paged_batch(
    seq_lens: Sequence[int],
    span_specs: Sequence[Sequence[tuple[int, int]]],
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    page: int = 16,
    key_rank: int = 16,
    value_rank: int = 16,
    dtype: torch.dtype = torch.float32,
    coefficient_dtype: str = "model",
    importance_fraction: Optional[float] = None,
    low_rank_divisor: int = 4,
    two_level_keys: bool = False,
    seed: int = 0,
    device: str = "cpu",
    noise: float = 0.01,
    rope: Optional[RopeTable] = None,
    kv_scales: Optional[tuple[float, float]] = None,
) -> PagedBatch:
    """Build a paged batch; ``span_specs[b]`` lists (start, T) spans of sequence b.

    With ``importance_fraction`` set, spans get random importance and the matching threshold
    (two-level read); otherwise all tokens are read at full rank. With ``rope`` the low-rank keys
    are the pre-RoPE keys: the cache (and ``keys``) hold them rotated at their positions, as a
    backend sees them, and every span is compacted with ``rope`` (key_space="pre_rope").
    ``kv_scales`` (k_scale, v_scale): an FP8 KV cache (float8 e4m3 pages, :mod:`ap_vllm.core.paged`);
    ``keys`` / ``values`` then hold what a reader dequantizes (in ``dtype``, the model dtype of the
    queries and of the span bases), and spans are compacted from those, as the backend does.
    """
    gen = torch.Generator().manual_seed(seed)
    bsz = len(seq_lens)
    nblocks_per = [-(-L // page) for L in seq_lens]
    total = sum(nblocks_per) + 3
    perm = torch.randperm(total, generator=gen)
    kv_cache = torch.randn(total, 2, page, num_kv_heads, head_size, generator=gen).to(dtype)
    if kv_scales is not None:
        kv_cache = kv_quantize(kv_cache, KV_FP8_DTYPE)
    max_blocks = max(nblocks_per) + 1
    block_table = torch.zeros(bsz, max_blocks, dtype=torch.int32)
    keys, values, spans, compacted = [], [], [], []
    nxt = 0
    for b, L in enumerate(seq_lens):
        ids = perm[nxt: nxt + nblocks_per[b]]
        nxt += nblocks_per[b]
        block_table[b, : len(ids)] = ids.to(torch.int32)
        k = low_rank_kv(L, num_kv_heads, head_size, generator=gen, noise=noise)
        v = low_rank_kv(L, num_kv_heads, head_size, generator=gen, noise=noise).to(dtype)
        pos = torch.arange(L)
        k = (k if rope is None else rope.rotate(k, pos)).to(dtype)
        if kv_scales is not None:  # what the pages hold, and what a reader gets back
            k8, v8 = kv_quantize(k, KV_FP8_DTYPE, kv_scales[0]), kv_quantize(v, KV_FP8_DTYPE, kv_scales[1])
            k, v = kv_dequantize(k8, kv_scales[0]).to(dtype), kv_dequantize(v8, kv_scales[1]).to(dtype)
        blk = block_table[b, pos // page].long()
        kv_cache[blk, 0, pos % page] = k if kv_scales is None else k8
        kv_cache[blk, 1, pos % page] = v if kv_scales is None else v8
        keys.append(k)
        values.append(v)
        for start, t in span_specs[b]:
            imp = None
            if importance_fraction is not None:
                imp = torch.rand(t, generator=gen) * 0.01
            cs = compact_span(k[start: start + t], v[start: start + t], key_rank, value_rank,
                              coefficient_dtype=coefficient_dtype, start=start, importance=imp, seed=seed, rope=rope)
            layout = span_layout_for(cs, page, cache_dtype=None if kv_scales is None else KV_FP8_DTYPE)
            if not fits(layout, start):
                raise ValueError(f"span ({start}, {t}) is too short for its compact form ({layout.num_blocks} blocks)")
            thr = importance_threshold(cs.importance, importance_fraction) if importance_fraction else None
            sp = PagedSpan(seq=b, start=start, layout=layout, threshold=thr, low_rank_divisor=low_rank_divisor,
                           two_level_keys=two_level_keys)
            pack_span(kv_cache, paged_span_block_ids(block_table, sp), cs, layout)
            spans.append(sp)
            compacted.append(cs)
    q = torch.randn(bsz, num_q_heads, head_size, generator=gen).to(dtype)
    dev = torch.device(device)
    return PagedBatch(q.to(dev), kv_cache.to(dev), block_table.to(dev), torch.tensor(seq_lens, dtype=torch.int32,
                      device=dev), spans, keys, values, compacted)


__all__ = ["low_rank_kv", "make_paged_batch", "PagedBatch", "CompactedSpan"]
