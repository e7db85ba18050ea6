"""Triton exact attention over vLLM's paged cache, any query length (varlen flash attention).

Every sequence b of the batch brings ``qlen_b = query_start_loc[b+1] - query_start_loc[b]``
queries (0, 1 for decode, a few for speculative rows, many for (chunked) prefill), packed in
``q[Nq_total, Hq, d]``, and has ``L_b = seq_lens[b]`` tokens in the paged cache
``kv_cache[num_blocks, 2, block_size, Hkv, d]`` (K at ``[:, 0]``, V at ``[:, 1]``; any strides,
head_size innermost), this step's queries included. Query i of sequence b sits at
``p_i = L_b - qlen_b + i``; with g = Hq / Hkv, head h reads kv head j = h // g::

    allowed(i, n) = n <= r_i                                  (causal: r_i = p_i)
                    and p_i - n < window                      (sliding window, if any)
                    and n not in [start_s, start_s + T_s)     for every compacted span s of b
    s[i, h, n]    = scale * <q[i, h], K[n, j]>                (soft-capped: cap * tanh(s / cap))
    lse[i, h]     = log sum_{n allowed} exp(s[i, h, n])       (-inf if no key is allowed)
    out[i, h]     = sum_{n allowed} exp(s[i, h, n] - lse[i, h]) V[n, j]      (0 if none)

``r_i`` (``reach``, optional) is the last key query i sees: p_i, or for a query inside a multimodal item
whose tokens attend to each other both ways (vLLM's ``is_mm_prefix_lm``) the item's last token
(:func:`ap_vllm.core.dense.mm_prefix_reach`; non-decreasing in i, so a query tile's keys end at its last
query's reach and its first query's reach bounds the tiles every query sees whole).

A compacted span's pages hold its packed low-rank data, not keys: key tiles lying wholly inside
a span are never visited, tiles straddling a span boundary are masked.

FP8 KV cache (``KV_FP8``): the pages hold float8 e4m3; a tile is read as ``K = float(K8) * k_scale``,
``V = float(V8) * v_scale`` (:func:`ap_vllm.core.paged.kv_dequantize`) and the dots run in the
queries' dtype.

torch: :func:`ap_vllm.core.dense.dense_attention` per sequence over the gathered keys.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ap_vllm.kernels.cache_abi import META

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the softmax runs in base 2
LN2 = tl.constexpr(0.6931471805599453)
_M_START = tl.constexpr(META["start"])  # span metadata columns
_M_T = tl.constexpr(META["num_tokens"])


@triton.jit
def exp2_fast(x, FTZ: tl.constexpr):
    """2^x. FTZ (compiled for a GPU): one ``ex2.approx.ftz`` (results below 2^-126 flush to 0); tl.exp2 compiles
    to ``ex2.approx.f32``, which ptxas wraps in a denormal-range fix-up (a compare and two multiplies an element,
    sm_90). The interpreter (FTZ False) runs tl.exp2."""
    if FTZ:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _softcap(s, cap):
    # cap * tanh(s / cap) = cap - 2 cap / (e^(2 s / cap) + 1): one exp2 and one fast division per
    # element (saturates to +-cap)
    e = tl.exp2(s * (2.0 * LOG2E / cap))
    return cap - tl.fdiv(2.0 * cap, e + 1.0)


# --------------------------------------------------------------------------------------
# one key tile n in [n0, n0 + BLOCK_N), restricted to the key range [lo, hi), folded into the
# running base-2 softmax state of the M-tile (rows r = one (query, head) pair each):
#      x[r, n]  = log2(e) * s[r, n]                      (-inf where not allowed(r, n) or n outside [lo, hi))
#      m'       = max(m, max_n x[r, n]),   alpha = 2^(m - m'),   p[r, n] = 2^(x[r, n] - m')
#      l       <- alpha l + sum_n p[r, n],   acc <- alpha acc + p @ V[n0:n0+BLOCK_N, j]
#    torch: ap_vllm.core.dense.dense_attention (one chunk of its softmax)
# --------------------------------------------------------------------------------------
@triton.jit
def _attend_tile(m, l, acc, q, kv_ptr, bt_row, n0, lo, hi, pos, reach, dd, dmask,
                 stride_kb, stride_kkv, stride_kt, scale, softcap, window, k_scale, v_scale,
                 BLOCK_N: tl.constexpr, PAGE: tl.constexpr, ONE_PAGE: tl.constexpr,
                 SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 KV_FP8: tl.constexpr, MASK: tl.constexpr, blk_given=None, GIVEN: tl.constexpr = False):
    # MASK False: an interior tile (lo <= n0, n0 + BLOCK_N <= hi, every key at or before the tile's first query's
    # reach, no window): every key of it is allowed for every row, so nothing is masked (loads, scores).
    # GIVEN: the tile's block-table entries come as blk_given (_tile_blocks, read a tile ahead)
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = (n >= lo) & (n < hi)
    if GIVEN:
        blk = blk_given
    elif MASK and not ONE_PAGE:
        blk = _tile_blocks(bt_row, n0, n, nmask, PAGE, ONE_PAGE)
    else:  # (one page: the tile's one entry; an interior tile: every key's)
        blk = _tile_blocks(bt_row, n0, n, None, PAGE, ONE_PAGE)
    off = blk.to(tl.int64) * stride_kb + (n % PAGE) * stride_kt  # (in-block offsets fit in int32)
    if MASK:
        kvmask = nmask[:, None] & dmask[None, :]
    else:
        kvmask = dmask[None, :]
    k = tl.load(kv_ptr + off[:, None] + dd[None, :], mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if KV_FP8:
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
    if UPCAST:  # the CPU interpreter mis-computes bf16 dots
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # [ROWS, BLOCK_N], float32
    if SOFTCAP:
        x = _softcap(qk * scale, softcap) * LOG2E
    else:
        x = qk * (scale * LOG2E)
    if MASK:
        allowed = nmask[None, :] & (n[None, :] <= reach[:, None])
        if WINDOW:
            allowed = allowed & ((pos[:, None] - n[None, :]) < window)
        x = tl.where(allowed, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = exp2_fast(m - m_safe, not UPCAST)
    p = exp2_fast(x - m_safe[:, None], not UPCAST)
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(kv_ptr + stride_kkv + off[:, None] + dd[None, :], mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if KV_FP8:
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l, acc


@triton.jit
def _tile_blocks(bt_row, n0, n, live, PAGE: tl.constexpr, ONE_PAGE: tl.constexpr):
    # the block-table entries of key tile n0 (keys n): one (ONE_PAGE: the tile lies in one page), else one a key;
    # 0 where live (a scalar for ONE_PAGE, else [BLOCK_N]; None: everywhere read) is false (nothing read)
    if ONE_PAGE:
        at = bt_row + n0 // PAGE
    else:
        at = bt_row + n // PAGE
    if live is None:
        return tl.load(at)
    else:
        return tl.load(at, mask=live, other=0)


@triton.jit
def _ahead_live(n0, z, BLOCK_N: tl.constexpr, ONE_PAGE: tl.constexpr):
    # which of key tile n0's block-table entries _tile_blocks reads: those before z (the interior's end)
    if ONE_PAGE:
        return n0 < z
    else:
        return n0 + tl.arange(0, BLOCK_N) < z


@triton.jit
def _attend_range(m, l, acc, q, kv_ptr, bt_row, lo, hi, r_first, pos, reach, dd, dmask, stride_kb,
                  stride_kkv, stride_kt, scale, softcap, window, k_scale, v_scale,
                  BLOCK_N: tl.constexpr, PAGE: tl.constexpr, ONE_PAGE: tl.constexpr,
                  SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  KV_FP8: tl.constexpr, BT_AHEAD: tl.constexpr = False):
    # keys [lo, hi) tile by tile: the partial first tile (lo not on a tile), then the interior tiles
    # [a, z) = [ceil(lo / BLOCK_N), floor(min(hi, r_first + 1) / BLOCK_N)) * BLOCK_N, which every row sees whole
    # (r_first: the reach of the tile's first query; no window) and are read unmasked, then the rest up to hi (the
    # causal diagonal and the end of the range), masked. BT_AHEAD: the interior loop reads tile i + 1's block-table
    # entries in iteration i, so its K / V rows are a direct load to Triton's pipeliner (two tile buffers and
    # copies in flight through the compute; reading them in the iteration gives the entries a stage of their own
    # and one K / V buffer)
    n_start = (lo // BLOCK_N) * BLOCK_N
    if WINDOW:
        a = n_start
        z = n_start
    else:
        a = tl.cdiv(lo, BLOCK_N) * BLOCK_N
        z = tl.maximum((tl.minimum(hi, r_first + 1) // BLOCK_N) * BLOCK_N, a)
    for n0 in range(n_start, tl.minimum(a, hi), BLOCK_N):
        m, l, acc = _attend_tile(m, l, acc, q, kv_ptr, bt_row, n0, lo, hi, pos, reach, dd, dmask, stride_kb, stride_kkv,
                                 stride_kt, scale, softcap, window, k_scale, v_scale, BLOCK_N, PAGE, ONE_PAGE,
                                 SOFTCAP, WINDOW, UPCAST, PREC, KV_FP8, True)
    if BT_AHEAD:  # (the tile's entries: 0 past the interior's end z, nothing read)
        blk = _tile_blocks(bt_row, a, a + tl.arange(0, BLOCK_N), _ahead_live(a, z, BLOCK_N, ONE_PAGE), PAGE, ONE_PAGE)
        for n0 in range(a, z, BLOCK_N):
            m, l, acc = _attend_tile(m, l, acc, q, kv_ptr, bt_row, n0, lo, hi, pos, reach, dd, dmask, stride_kb,
                                     stride_kkv, stride_kt, scale, softcap, window, k_scale, v_scale, BLOCK_N, PAGE,
                                     ONE_PAGE, SOFTCAP, WINDOW, UPCAST, PREC, KV_FP8, False, blk, True)
            blk = _tile_blocks(bt_row, n0 + BLOCK_N, n0 + BLOCK_N + tl.arange(0, BLOCK_N),
                               _ahead_live(n0 + BLOCK_N, z, BLOCK_N, ONE_PAGE), PAGE, ONE_PAGE)
    else:
        for n0 in range(a, z, BLOCK_N):
            m, l, acc = _attend_tile(m, l, acc, q, kv_ptr, bt_row, n0, lo, hi, pos, reach, dd, dmask, stride_kb,
                                     stride_kkv, stride_kt, scale, softcap, window, k_scale, v_scale, BLOCK_N, PAGE,
                                     ONE_PAGE, SOFTCAP, WINDOW, UPCAST, PREC, KV_FP8, False)
    for n0 in range(tl.maximum(z, a), hi, BLOCK_N):
        m, l, acc = _attend_tile(m, l, acc, q, kv_ptr, bt_row, n0, lo, hi, pos, reach, dd, dmask, stride_kb, stride_kkv,
                                 stride_kt, scale, softcap, window, k_scale, v_scale, BLOCK_N, PAGE, ONE_PAGE,
                                 SOFTCAP, WINDOW, UPCAST, PREC, KV_FP8, True)
    return m, l, acc


# --------------------------------------------------------------------------------------
# varlen paged attention, one program per (sequence b, query tile t, kv head j). The M-tile holds
# BLOCK_Q queries x the g query heads of kv head j: row r is query i = t*BLOCK_Q + r // g, head
# h = j*g + r % g, at position p_i = L_b - qlen_b + i. Keys visited: [n_lo, n_hi) with
#      n_hi = r_last + 1                    (causal limit of the tile's last query: p_last without reach)
#      n_lo = max(0, p_first - window + 1)  (0 without a window)
# minus the compacted spans of b: [n_lo, n_hi) \ U_s [start_s, end_s) is a union of gaps, each
# starting at n_lo or at a span end e (not inside another span) and ending at the nearest span
# start >= it (or n_hi); each gap is walked tile by tile with its own key mask, so a tile shared
# by two gaps contributes each gap's keys once. Then
#      lse[i, h] = ln 2 * (m + log2 l),   out[i, h] = acc / l      (0 and -inf when l = 0)
#    torch: ap_vllm.core.dense.dense_attention
# --------------------------------------------------------------------------------------
@triton.jit
def _exact_attention_kernel(q_ptr, kv_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, spans_ptr, meta_ptr, out_ptr, lse_ptr,
                            reach_ptr,
                            stride_qt, stride_qh, stride_kb, stride_kkv, stride_kt, stride_kh, stride_bt,
                            stride_sp, stride_meta, stride_ot, stride_oh, num_q_tiles, scale, softcap, window,
                            k_scale, v_scale,
                            G: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                            PAGE: tl.constexpr, ONE_PAGE: tl.constexpr, MAX_SPANS: tl.constexpr,
                            SPAN_PAD: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                            UPCAST: tl.constexpr, PREC: tl.constexpr, KV_FP8: tl.constexpr,
                            BT_AHEAD: tl.constexpr, MM: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.program_id(1)
    b = pid // num_q_tiles
    t = pid % num_q_tiles
    q_start = tl.load(qsl_ptr + b)
    qlen = tl.load(qsl_ptr + b + 1) - q_start
    q0 = t * BLOCK_Q
    if q0 >= qlen:
        return
    ctx = tl.load(seq_lens_ptr + b) - qlen  # tokens before this step's queries

    r = tl.arange(0, ROWS)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    qi = q0 + r // G
    head = j * G + r % G
    rmask = (r < BLOCK_Q * G) & (qi < qlen)
    pos = ctx + qi
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if not KV_FP8:  # (an FP8 cache is dequantized into the queries' dtype)
        q = q.to(kv_ptr.dtype.element_ty)

    if MM:  # (reach non-decreasing: the tile's last query's is its largest, its first query's its smallest)
        reach = tl.load(reach_ptr + tok, mask=rmask, other=0)
        r_first = tl.load(reach_ptr + q_start + q0)
        n_hi = tl.max(tl.where(rmask, reach, 0), 0) + 1
    else:
        reach = pos
        r_first = ctx + q0
        n_hi = ctx + tl.minimum(q0 + BLOCK_Q, qlen)  # = p_last + 1
    if WINDOW:
        n_lo = tl.maximum(ctx + q0 - window + 1, 0)
    else:
        n_lo = ctx * 0
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    kv_head = kv_ptr + j.to(tl.int64) * stride_kh

    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    if MAX_SPANS > 0:
        # gaps between the spans: candidate starts c[0] = n_lo, c[1 + i] = end of span i
        ii = tl.arange(0, SPAN_PAD)
        is_span = (ii >= 1) & (ii <= MAX_SPANS)
        sid = tl.load(spans_ptr + b * stride_sp + ii - 1, mask=is_span, other=-1)
        has = sid >= 0
        mrow = meta_ptr + tl.maximum(sid, 0).to(tl.int64) * stride_meta
        st = tl.load(mrow + _M_START, mask=has, other=0).to(tl.int32)
        en = st + tl.load(mrow + _M_T, mask=has, other=0).to(tl.int32)
        has = has & (en > st)
        cand = tl.where(ii == 0, n_lo, en)
        ok = ((ii == 0) | (has & (en > n_lo))) & (cand < n_hi)
        inside = (st[None, :] <= cand[:, None]) & (cand[:, None] < en[None, :]) & has[None, :]
        ok = ok & (tl.max(inside.to(tl.int32), 1) == 0)
        dup = (cand[None, :] == cand[:, None]) & (ii[None, :] < ii[:, None]) & ok[None, :]
        ok = ok & (tl.max(dup.to(tl.int32), 1) == 0)
        nxt = tl.where(has[None, :] & (st[None, :] >= cand[:, None]), st[None, :], n_hi)
        gend = tl.where(ok, tl.minimum(tl.min(nxt, 1), n_hi), cand)
        for k in range(0, SPAN_PAD):
            g0 = tl.sum(tl.where(ii == k, cand, 0), 0)
            g1 = tl.sum(tl.where(ii == k, gend, 0), 0)
            m, l, acc = _attend_range(m, l, acc, q, kv_head, bt_row, g0, g1, r_first, pos, reach, dd, dmask, stride_kb,
                                      stride_kkv, stride_kt, scale, softcap, window, k_scale, v_scale, BLOCK_N, PAGE,
                                      ONE_PAGE, SOFTCAP, WINDOW, UPCAST, PREC, KV_FP8, BT_AHEAD)
    else:
        m, l, acc = _attend_range(m, l, acc, q, kv_head, bt_row, n_lo, n_hi, r_first, pos, reach, dd, dmask, stride_kb,
                                  stride_kkv, stride_kt, scale, softcap, window, k_scale, v_scale, BLOCK_N, PAGE,
                                  ONE_PAGE, SOFTCAP, WINDOW, UPCAST, PREC, KV_FP8, BT_AHEAD)

    l_safe = tl.where(l > 0, l, 1.0)
    lse = tl.where(l > 0, (m + tl.log2(l_safe)) * LN2, float("-inf"))
    o = acc * tl.where(l > 0, 1.0 / l_safe, 0.0)[:, None]
    # output rows addressed afresh from the start of the batch row (not kept live across the key loop)
    tok = (tl.load(qsl_ptr + b) + qi).to(tl.int64)
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dd[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + tok * HQ + head, lse, mask=rmask)


# --------------------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------------------
def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


# The launch of long prefills, from ``make gpu-check``'s prefill rows on an H200 (Qwen2.5-VL-7B shapes, bf16,
# benchmarks/results/gpu_check_NVIDIA_H200_more.json): 64 rows (9 queries x 7 heads) over 64-key tiles, 4 warps,
# 3 stages ran a 4K / 16K causal prefill in 449 / 6172 us, the rule below (128 rows, 32-key tiles, 8 warps,
# 2 stages) in 627 / 8285 us; SDPA (cuDNN) 235 / 3335 us. sm_90 and later only (on sm_80 it spills).
LONG_PREFILL_TILE = dict(rows=64, block_n=64, num_warps=4, num_stages=3)


def compiles_for_sm(arch: int) -> bool:
    """Whether the kernels compile for CUDA sm_``arch`` or later (True in the interpreter and on other backends):
    what a launch may choose by architecture (LONG_PREFILL_TILE spills 8-64 bytes at 255 registers on sm_80 with
    Triton 3.6, none on sm_90; float8 e4m3 converts natively from sm_89)."""
    if _INTERPRET:
        return True
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return target.backend != "cuda" or int(target.arch) >= arch


def exact_attention_config(num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int, *,
                           max_query_len: int, max_seq_len: int, block_m: int = 16, block_n: int = 32,
                           dtype: torch.dtype = torch.bfloat16, tile: Optional[dict] = None) -> dict:
    """Tile sizes and launch options of :func:`paged_exact_attention_triton` (host ints only).

    With g = Hq / Hkv and D = pow2(head_size):
        ROWS    = max(pow2(g), min(max(16, pow2(min(block_m, pow2(max_query_len)) * g)), ROWS_CAP))
        BLOCK_Q = ROWS // g queries of g heads each fill the M-tile
        BLOCK_N = max(16, min(pow2(block_n), pow2(max_seq_len), N_CAP)) keys per tile (one
                  block-table entry per tile when BLOCK_N divides the block size)
    ROWS_CAP = 16384 / D (8192 / D from D = 512) and N_CAP = 4096 / D for 16-bit caches (tensor-core dots); 32
    and 16 for a float32 cache (exact float32 dots). Sized so that sm_80 / sm_90 builds keep every tile in
    registers. 8 warps when ROWS * D >= 16384 or D >= 512, else 4.

    Long prefills (max_query_len * g >= 128) over 16-bit caches with head size <= 128 and the default block_n
    take :data:`LONG_PREFILL_TILE` instead on sm_90 and later (measured on an H200, see its comment).

    ``tile`` (tuning, e.g. ``benchmarks/gpu_check.py``'s prefill rows): ``rows``, ``block_n``, ``num_warps``,
    ``num_stages`` taken as given (powers of two, rows >= pow2(g); no caps), the rest derived as above;
    ``bt_ahead``: the interior key tiles' block-table entries read a tile ahead (see ``_attend_range``).
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"kv cache dtype {dtype} is not supported (bfloat16, float16, float32)")
    g = num_q_heads // num_kv_heads
    block_d = _pow2(head_size, 16)
    # (heads of 512, Gemma 4's global layers: 16 rows; 32 spilled 16 bytes on sm_90)
    rows_cap, n_cap = (32, 16) if dtype == torch.float32 else ((16384 if block_d <= 256 else 8192) // block_d,
                                                               4096 // block_d)
    rows = _pow2(min(_pow2(block_m), _pow2(max_query_len)) * g, 16)
    rows = max(_pow2(g), min(rows, max(16, rows_cap)))
    if (not tile and dtype != torch.float32 and block_d <= 128 and block_n == 32
            and max_query_len * g >= 128 and _pow2(g) <= LONG_PREFILL_TILE["rows"] and compiles_for_sm(90)):
        tile = LONG_PREFILL_TILE
    block_n = max(16, min(_pow2(block_n), _pow2(max_seq_len), n_cap))
    warps, stages = (8 if rows * block_d >= 16384 or block_d >= 512 else 4), 2
    if tile:
        unknown = set(tile) - {"rows", "block_n", "num_warps", "num_stages", "bt_ahead"}
        if unknown:
            raise ValueError(f"unknown tile options {sorted(unknown)} (allowed: rows, block_n, num_warps, num_stages, "
                             "bt_ahead)")
        rows = int(tile.get("rows", rows))
        block_n = int(tile.get("block_n", block_n))
        if rows != _pow2(rows) or rows < _pow2(g) or block_n != _pow2(block_n, 16):
            raise ValueError(f"tile rows {rows} must be a power of two >= {_pow2(g)} and block_n {block_n} one >= 16")
        warps, stages = int(tile.get("num_warps", warps)), int(tile.get("num_stages", stages))
    return dict(G=g, BLOCK_Q=rows // g, ROWS=rows, BLOCK_D=block_d, BLOCK_N=block_n,
                ONE_PAGE=block_size % block_n == 0, BT_AHEAD=bool((tile or {}).get("bt_ahead", False)),
                num_warps=warps, num_stages=stages)


def paged_exact_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    seq_spans: Optional[torch.Tensor] = None,
    meta: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    block_m: int = 16,
    block_n: int = 32,
    kv_scales: Optional[tuple[float, float]] = None,
    tile: Optional[dict] = None,
    reach: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every query of a varlen batch over the paged cache (see the module docstring).

    Args:
        q: [Nq_total, Hq, d] queries of all sequences, packed (any float dtype).
        kv_cache: [num_blocks, 2, block_size, Hkv, d]; any strides with head_size innermost.
        block_table: [B, max_blocks] int32. query_start_loc: [B+1] int32 cumulative query counts.
        seq_lens: [B] int32 tokens of each sequence, this step's queries included.
        max_query_len, max_seq_len: host upper bounds of qlen_b and L_b (grid and tile sizes only).
        softcap: logit soft-capping value. window: sliding-window length.
        seq_spans: [B, MAX_SPANS] int32 span ids of each sequence (-1 padding) and ``meta``
            [S, NUM_META] int64 (:func:`ap_vllm.core.paged_layout.span_metadata`): keys inside
            ``[start, start + num_tokens)`` of a sequence's spans are excluded.
        out: [Nq_total, Hq, d] written in place if given (head_size innermost).
        block_m: queries per M-tile (before filling the tile's rows), block_n: keys per tile.
        kv_scales: (k_scale, v_scale) of a float8 e4m3 cache (1.0 each if None).
        tile: launch overrides (:func:`exact_attention_config`).
        reach: [Nq_total] int32, the last key position of each query (None: its own position, causal).
    Returns:
        out (float32 unless given) and lse [Nq_total, Hq] float32. Rows of queries with no allowed
        key get 0 and -inf; rows past ``query_start_loc[B]`` are not written.
    """
    ntok, hq, d = q.shape
    nblk, two, page, hkv, d2 = kv_cache.shape
    if two != 2 or d2 != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not match kv_cache {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache (strides {kv_cache.stride()}) must keep head_size innermost")
    if (seq_spans is None) != (meta is None):
        raise ValueError("seq_spans and meta go together")
    if reach is not None and (reach.shape != (ntok,) or reach.dtype != torch.int32 or reach.device != q.device):
        raise ValueError(f"reach must be int32 [{ntok}] on {q.device}, got {reach.dtype} {tuple(reach.shape)} "
                         f"on {reach.device}")
    bsz = seq_lens.shape[0]
    dev = q.device
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(ntok, hq, d, dtype=torch.float32, device=dev)
    elif out.shape != (ntok, hq, d) or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} (strides {out.stride()}) must be [Nq_total, Hq, d], d innermost")
    lse = torch.empty(ntok, hq, dtype=torch.float32, device=dev)
    if bsz == 0 or ntok == 0 or max_query_len <= 0:
        return out, lse
    bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    kv_fp8 = kv_cache.dtype == torch.float8_e4m3fn
    compute = q.dtype if kv_fp8 else kv_cache.dtype  # the dots' dtype
    if kv_fp8 and compute not in (torch.bfloat16, torch.float16, torch.float32):
        compute = torch.float32
    ks, vs = kv_scales or (1.0, 1.0)
    cfg = exact_attention_config(hq, hkv, d, page, max_query_len=max_query_len, max_seq_len=max_seq_len,
                                 block_m=block_m, block_n=block_n, dtype=compute, tile=tile)
    max_spans = 0 if seq_spans is None else seq_spans.shape[1]
    if max_spans:
        if seq_spans.stride(-1) != 1:
            seq_spans = seq_spans.contiguous()
        sp_arg, meta_arg, sp_stride, meta_stride = seq_spans, meta, seq_spans.stride(0), meta.stride(0)
    else:
        sp_arg, meta_arg, sp_stride, meta_stride = seq_lens, seq_lens, 0, 0
    num_q_tiles = triton.cdiv(max_query_len, cfg["BLOCK_Q"])
    _exact_attention_kernel[(bsz * num_q_tiles, hkv)](
        q, kv_cache, bt, query_start_loc, seq_lens, sp_arg, meta_arg, out, lse,
        seq_lens if reach is None else reach,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        bt.stride(0), sp_stride, meta_stride, out.stride(0), out.stride(1), num_q_tiles,
        float(scale), float(softcap or 1.0), int(window or 0), float(ks), float(vs),
        G=cfg["G"], HQ=hq, D=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_Q=cfg["BLOCK_Q"], ROWS=cfg["ROWS"],
        BLOCK_N=cfg["BLOCK_N"], PAGE=page, ONE_PAGE=cfg["ONE_PAGE"], MAX_SPANS=max_spans,
        SPAN_PAD=_pow2(max_spans + 1), SOFTCAP=bool(softcap), WINDOW=window is not None, UPCAST=_INTERPRET,
        PREC="ieee" if compute == torch.float32 else "tf32", KV_FP8=kv_fp8, BT_AHEAD=cfg["BT_AHEAD"],
        MM=reach is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


__all__ = ["exact_attention_config", "paged_exact_attention_triton"]
