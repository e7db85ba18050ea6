"""Two-level thresholds of every span of a layer on the device, with a launch that depends on shapes only.

Span s < num_spans[0] (metadata row s of :mod:`ap_vllm.core.paged_layout`: T, seq, storage_block,
blk_importance) has importance x_0 .. x_{n-1} of n tokens: all its T tokens (``sample`` = 0 or
T <= sample), else the stratified sample of n = ``sample`` tokens (integer hash h, the same bits as
:func:`ap_vllm.core.lowrank_attention.threshold_sample`)::

    pos_j = lo_j + h(j, T) mod w_j,   lo_j = floor(j T / n),  w_j = lo_{j+1} - lo_j

Its threshold is the importance of the k-th most important of them, k = min(n, max(1, ceil(f n)))
(f = ``fraction``, ceil(f n) in float64 as the host computes it)::

    tau_s = max { v : #{i : x_i >= v} >= k }

found by bisection on the bits: u(x) = key(x) + 2^31 in [0, 2^32) with
key(x) = bits(x) ^ ((bits(x) >> 31) & 0x7fffffff) (int32 order = float order, any sign), then from the
top bit b = 31 down to 0::

    ans <- ans + 2^b   if  #{i : u(x_i) >= ans + 2^b} >= k

(32 counting passes over the n values; the answer is u of an element, so tau_s equals it bit for bit).
Rows s >= num_spans[0] (padding) get -inf. The grid is fixed (programs loop over the S_cap rows), the
scalar arguments are fixed per layer, so a captured CUDA graph replays it for any spans of the same
tensors. The importance is read from the pages with the span kernel's address math (block-table row
``seq``, section block ``storage_block + blk_importance``, float32 rows of the block).

torch oracle: :func:`ap_vllm.core.lowrank_attention.importance_thresholds`.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from ap_vllm.kernels.cache_abi import HASH_MUL_1, HASH_MUL_2, HASH_SEED_J, HASH_SEED_T
from ap_vllm.kernels.lowrank_decode import (M_IMP, M_SB, M_SEQ, M_T, NUM_META, CacheViews, rows_offsets,
                                            static_programs)

_HJ = tl.constexpr(HASH_SEED_J)
_HT = tl.constexpr(HASH_SEED_T)
_H1 = tl.constexpr(HASH_MUL_1)
_H2 = tl.constexpr(HASH_MUL_2)
RESIDENT_MAX = 2048  # a sample of at most this many tokens is held in registers for the 32 passes


@triton.jit
def _lo32(x):
    # x mod 2^32 of a non-negative int64 (no constant >= 2^31 in the code)
    return x - ((x >> 32) << 32)


@triton.jit
def _sample_positions(j, T, n):
    # pos_j = lo_j + h(j, T) mod w_j (int64; torch: ap_vllm.core.lowrank_attention.threshold_sample)
    lo = j * T // n
    w = (j + 1) * T // n - lo
    x = _lo32(j * _HJ + T * _HT)
    x = x ^ (x >> 16)
    x = _lo32(x * _H1)
    x = x ^ (x >> 15)
    x = _lo32(x * _H2)
    x = x ^ (x >> 16)
    return lo + x % tl.maximum(w, 1)


@triton.jit
def _order_key(imp):
    # float32 -> u in [0, 2^32) (int64), u(a) < u(b) iff a < b
    bits = imp.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key.to(tl.int64) + 2147483647 + 1


@triton.jit
def _span_tokens(bt_row, blk_imp, cf_ptr, bb_f, T, n, j, SAMPLED: tl.constexpr):
    # u of entries j (< n) of the span: token j, or its sampled position when n < T
    valid = j < n
    pos = j.to(tl.int64)
    if SAMPLED:  # (n = T: pos_j = j)
        pos = _sample_positions(pos, T.to(tl.int64), n.to(tl.int64))
    off = rows_offsets(bt_row, blk_imp, pos, bb_f, 1, bb_f, valid)
    imp = tl.load(cf_ptr + off, mask=valid, other=0.0)
    return _order_key(imp), valid


@triton.jit
def _span_thresholds_kernel(cf_ptr, bt_ptr, meta_ptr, num_spans_ptr, out_ptr, num_rows, stride_bt, bb_f,
                            fraction_bits, sample,
                            NMETA: tl.constexpr, BLOCK: tl.constexpr, SAMPLED: tl.constexpr,
                            RESIDENT: tl.constexpr):
    n_spans = tl.minimum(tl.load(num_spans_ptr), num_rows)
    frac = fraction_bits.to(tl.int64).to(tl.float64, bitcast=True)
    jj = tl.arange(0, BLOCK)
    for s in range(tl.program_id(0), num_rows, tl.num_programs(0)):  # padding rows
        tl.store(out_ptr + s, float("-inf"), mask=s >= n_spans)
    for s in range(tl.program_id(0), n_spans, tl.num_programs(0)):
        meta = meta_ptr + s * NMETA
        T = tl.load(meta + M_T)
        bt_row = bt_ptr + tl.load(meta + M_SEQ) * stride_bt
        blk_imp = tl.load(meta + M_SB) + tl.load(meta + M_IMP)
        n = T
        if SAMPLED:
            n = tl.minimum(T, sample)
        k = tl.math.ceil(frac * n.to(tl.float64)).to(tl.int64)
        k = tl.minimum(tl.maximum(k, 1), n)
        ans = tl.zeros([], tl.int64)
        if RESIDENT:  # n <= BLOCK: the n values stay in registers for the 32 passes
            u, valid = _span_tokens(bt_row, blk_imp, cf_ptr, bb_f, T, n, jj, SAMPLED)
            for i in range(32):
                cand = ans + (tl.full([], 1, tl.int64) << (31 - i))
                cnt = tl.sum(((u >= cand) & valid).to(tl.int32), 0)
                ans = tl.where(cnt >= k, cand, ans)
        else:  # tiles of BLOCK values re-read (from L2) each pass
            for i in range(32):
                cand = ans + (tl.full([], 1, tl.int64) << (31 - i))
                cnt = tl.zeros([], tl.int64)
                for t0 in range(0, n, BLOCK):
                    u, valid = _span_tokens(bt_row, blk_imp, cf_ptr, bb_f, T, n, t0 + jj, SAMPLED)
                    cnt += tl.sum(((u >= cand) & valid).to(tl.int32), 0)
                ans = tl.where(cnt >= k, cand, ans)
        key = (ans - 2147483647 - 1).to(tl.int32)
        tl.store(out_ptr + s, (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True))


def span_thresholds_triton(kv_cache: torch.Tensor, block_table: torch.Tensor, meta: torch.Tensor,
                           num_spans: torch.Tensor, fraction: float, sample: int = 0, *,
                           out: Optional[torch.Tensor] = None, num_programs: Optional[int] = None,
                           block: int = 512) -> torch.Tensor:
    """float32 [S_cap] thresholds of the spans of ``meta`` (int64 [S_cap, len(META_FIELDS)]) in a layer's
    cache ``kv_cache`` [num_blocks, 2, block_size, Hkv, d] (any view with dense blocks): row s < num_spans[0]
    (int32 device tensor [1]) the importance of the ceil(fraction n)-th most important of its n tokens
    (all T, or ``sample`` of them when 0 < sample < T), -inf past it. Written into ``out`` if given.
    ``block``: values per tile of a span read tile by tile (every token, or a sample over
    ``RESIDENT_MAX``); at most 8 values per thread (4 warps per 1024: more run out of predicate registers,
    which ptxas then spills). No host synchronisation; the launch depends on shapes, ``fraction`` and
    ``sample`` only (programs: :func:`ap_vllm.kernels.lowrank_decode.static_programs`)."""
    s_cap = meta.shape[0]
    dev = meta.device
    out = torch.empty(s_cap, dtype=torch.float32, device=dev) if out is None else out
    if out.shape != (s_cap,) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [{s_cap}]")
    if s_cap == 0:
        return out
    if num_spans.numel() != 1 or num_spans.device != dev:
        raise ValueError("num_spans must be an integer tensor [1] on the metadata's device")
    if not 0.0 <= fraction <= 1.0 or sample < 0:
        raise ValueError(f"fraction must lie in [0, 1] and sample be >= 0, got {fraction}, {sample}")
    cache = CacheViews(kv_cache, False, torch.float32)  # (float32 views only: any page dtype)
    bt = block_table.contiguous()
    sampled = sample > 0
    resident = sampled and triton.next_power_of_2(sample) <= RESIDENT_MAX
    blk = max(16, triton.next_power_of_2(sample)) if resident else max(16, triton.next_power_of_2(block))
    fraction_bits = struct.unpack("<q", struct.pack("<d", float(fraction)))[0]
    _span_thresholds_kernel[(min(static_programs(dev, num_programs), s_cap),)](
        cache.f, bt, meta, num_spans, out, s_cap, bt.stride(0), cache.bb_f, fraction_bits, int(sample),
        NMETA=NUM_META, BLOCK=blk, SAMPLED=sampled, RESIDENT=resident, num_warps=max(4, min(16, blk // 256)))
    return out


__all__ = ["span_thresholds_triton", "RESIDENT_MAX"]
