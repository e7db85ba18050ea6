"""Triton paged decode over exact pages + compacted spans (GQA, split-K, fused importance).

One decode query per sequence. Four launches, all reading vLLM's paged cache
``kv_cache[num_blocks, 2, block_size, Hkv, d]`` (contiguous, or any view whose blocks are dense
byte ranges, e.g. the backend's view of token-major pages) and spans in the layout of
:mod:`ap_vllm.core.paged_layout`:

1. ``_span_qproj_kernel``   q_proj[s, h, :] = B_k[:, j*d:(j+1)*d] @ q[seq(s), h]        (j = h // g)
2. ``_span_decode_kernel``  per (span, split): MQA over the span's tokens with head size R and
   all Hq query heads; partial a[h] = sum_t p[h,t] C_v[t], lse[h]; fused importance EMA.
   Pre-RoPE spans (``rope`` given, ``PRE_ROPE``): launch 1 is skipped; the kernel rebuilds each
   token tile's keys from C_k and B_k column chunk by column chunk, rotates them at the tokens'
   positions and scores them against the (block-diagonal) query heads in head space.
3. ``_exact_decode_kernel`` per (seq, kv head, split): GQA flash-decoding over the exact
   tokens (every token not inside a span), sliding window and soft-capping honoured.
4. ``_merge_kernel``        per (seq, kv head): log-sum-exp merge of all partials; span partials
   are merged in coefficient space first and projected once: out_span[h] = a[h] @ B_v[:, j*d:(j+1)*d].

The torch reference of the whole step is :func:`ap_vllm.core.paged_decode.paged_decode_reference`
(which relies on :func:`ap_vllm.core.lowrank_attention.decode_mixed`).
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from ap_vllm.core.paged_layout import block_contiguous, cache_bytes
from ap_vllm.core.rope import RopeTable

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
             torch.float8_e4m3fn: tl.float8e4nv}

# metadata columns (must match ap_vllm.core.paged_layout.META_FIELDS)
M_SEQ, M_START, M_T, M_RK, M_RV, M_RK_LOW, M_RV_LOW, M_SB = 0, 1, 2, 3, 4, 5, 6, 7
M_BK, M_BV, M_CK, M_CV, M_SK, M_SV, M_IMP, M_ROWK, M_ROWV = 8, 9, 10, 11, 12, 13, 14, 15, 16
NUM_META = 17
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _softcap(s, cap):
    # cap * tanh(s / cap), written with exp so it runs everywhere (saturates to +-cap)
    e = tl.exp(2.0 * s / cap)
    return cap * (1.0 - 2.0 / (e + 1.0))


@triton.jit
def _rows_addr(bt_row_ptr, first_block, rows, rows_per_block, row_bytes, block_bytes, mask):
    # byte address of row i of a section: phys(first_block + i // rpb) * BB + (i % rpb) * row_bytes
    blk = tl.load(bt_row_ptr + first_block + rows // rows_per_block, mask=mask, other=0).to(tl.int64)
    return blk * block_bytes + (rows % rows_per_block).to(tl.int64) * row_bytes


# --------------------------------------------------------------------------------------
# 1. query projection:  q_proj[s, h, r] = sum_i B_k[r, j*d + i] * q[seq, h, i]
#    torch: torch.einsum("gd,rd->gr", q[seq, j*g:(j+1)*g], B_k.view(R, Hkv, d)[:, j])
# --------------------------------------------------------------------------------------
@triton.jit
def _span_qproj_kernel(q_ptr, cache_ptr, bt_ptr, meta_ptr, qp_ptr,
                       stride_qb, stride_qh, stride_bt, block_bytes, w_bytes,
                       G: tl.constexpr, D: tl.constexpr, HQ_PAD: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       DTYPE: tl.constexpr, EB: tl.constexpr, NMETA: tl.constexpr):
    sid = tl.program_id(0)
    j = tl.program_id(1)
    meta = meta_ptr + sid * NMETA
    seq = tl.load(meta + M_SEQ)
    rk = tl.load(meta + M_RK)
    sb = tl.load(meta + M_SB)
    bk = tl.load(meta + M_BK)
    r = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    gg = tl.arange(0, BLOCK_G)
    rmask = r < rk
    dmask = dd < D
    addr = _rows_addr(bt_ptr + seq * stride_bt, sb + bk, r, block_bytes // w_bytes, w_bytes, block_bytes, rmask)
    bptr = (cache_ptr + addr[:, None] + (j * D + dd)[None, :] * EB).to(tl.pointer_type(DTYPE))
    b = tl.load(bptr, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [R, D]
    qmask = (gg < G)[:, None] & dmask[None, :]
    q = tl.load(q_ptr + seq * stride_qb + (j * G + gg)[:, None] * stride_qh + dd[None, :], mask=qmask,
                other=0.0).to(tl.float32)  # [G, D]
    qp = tl.dot(q, tl.trans(b), input_precision="ieee")  # [G, R]
    out = qp_ptr + sid * HQ_PAD * BLOCK_R + (j * G + gg)[:, None] * BLOCK_R + r[None, :]
    tl.store(out, qp, mask=(gg < G)[:, None] & (r[None, :] < BLOCK_R))


# --------------------------------------------------------------------------------------
# 2b. pre-RoPE key scores of one token tile (used by _span_decode_kernel when PRE_ROPE).
#     The keys were factorised before rotation: K[t] = rot_{p_t}(C_k[t] B_k), p_t = start + t,
#     so q cannot be projected once. For each chunk c of BLOCK_C of the W = Hkv*d key columns
#     (column c belongs to kv head j = c // d, head column i = c % d):
#       k[t, c]    = sum_r C_k[t, r] B_k[r, c]                      (rebuilt pre-RoPE key)
#       kp[t, c]   = sum_r C_k[t, r] B_k[r, j*d + partner[i]]       (its rotation partner)
#       rot[t, c]  = k[t, c] cos[t, c] + kp[t, c] ssin[t, c]
#                    cos  = cos_sin[p_t, freq[i]]                   (1 if freq[i] = -1: pass-through)
#                    ssin = sign[i] * cos_sin[p_t, rotary_dim/2 + freq[i]]   (0 if pass-through)
#       s[h, t]   += sum_c Qblk[h, c] rot[t, c]     Qblk[h, c] = q_h[i] if j == h // g else 0
#     (Qblk is block diagonal: one dot scores all Hq heads against their own kv head.)
#     C_k is unscaled (FP8: the caller multiplies s by s_k[t] afterwards; rotation is linear) and
#     already masked to Rk(t) components (two-level keys). Nothing of K is ever written.
#    torch: ap_vllm.core.lowrank_attention.span_scores (span.rope set); ap_vllm.core.rope.RopeTable
# --------------------------------------------------------------------------------------
@triton.jit
def _pre_rope_scores(ck, q_row, stride_qh, cache_ptr, b_addr, rk_full, pos, tmask,
                     cs_ptr, partner_ptr, freq_ptr, sign_ptr, rot_dim,
                     G: tl.constexpr, HQ: tl.constexpr, HQ_PAD: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_C: tl.constexpr,
                     DTYPE: tl.constexpr, EB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    hh = tl.arange(0, HQ_PAD)
    hmask = hh < HQ
    rk = tl.arange(0, BLOCK_RK)
    rmask = rk < rk_full
    if UPCAST:  # the CPU interpreter mis-computes bf16 dots
        ckd = ck.to(tl.float32)
    else:  # C_k (model dtype or e4m3) is exact in the basis dtype: native dot, float32 accumulation
        ckd = ck.to(DTYPE)
    cs_row = cs_ptr + pos.to(tl.int64) * rot_dim  # [BLOCK_T]
    half = rot_dim // 2
    s = tl.zeros([HQ_PAD, BLOCK_T], tl.float32)
    for c0 in range(0, W, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < W
        j = c // D
        i = c % D
        pc = j * D + tl.load(partner_ptr + i, mask=cmask, other=0)
        f = tl.load(freq_ptr + i, mask=cmask, other=-1)
        sg = tl.load(sign_ptr + i, mask=cmask, other=0.0)
        bmask = rmask[:, None] & cmask[None, :]
        b = tl.load((cache_ptr + b_addr[:, None] + c[None, :] * EB).to(tl.pointer_type(DTYPE)), mask=bmask,
                    other=0.0)  # [RK, C]
        bp = tl.load((cache_ptr + b_addr[:, None] + pc[None, :] * EB).to(tl.pointer_type(DTYPE)), mask=bmask,
                     other=0.0)  # [RK, C], partner columns
        if UPCAST:
            b = b.to(tl.float32)
            bp = bp.to(tl.float32)
        k = tl.dot(ckd, b, input_precision=PREC)  # [T, C]
        kp = tl.dot(ckd, bp, input_precision=PREC)
        fmask = tmask[:, None] & (cmask & (f >= 0))[None, :]
        fc = tl.maximum(f, 0)[None, :]
        cos = tl.load(cs_row[:, None] + fc, mask=fmask, other=1.0)
        ssin = tl.load(cs_row[:, None] + half + fc, mask=fmask, other=0.0) * sg[None, :]
        rot = k * cos + kp * ssin
        qmask = hmask[:, None] & cmask[None, :] & ((hh // G)[:, None] == j[None, :])
        qb = tl.load(q_row + hh[:, None] * stride_qh + i[None, :], mask=qmask, other=0.0).to(tl.float32)
        s += tl.dot(qb, tl.trans(rot), input_precision=PREC)  # [HQ_PAD, T]
    return s


# --------------------------------------------------------------------------------------
# 2. span decode, one (span, split) per program, all Hq heads (MQA with head size R):
#      full[t] = importance[t] >= threshold
#      s[h,t]  = scale * sk[t] * <C_k[t, :Rk(t)], q_proj[h]>     Rk(t) = Rk if full[t] or not two-level keys
#                (PRE_ROPE: scale * sk[t] * <rot_{p_t}(C_k[t, :Rk(t)] B_k)[j], q_h>, see 2b)
#      m, l, a[h] = online softmax of s over the split;   a[h] += p[h,t] * sv[t] * C_v[t, :Rv(t)]
#      importance[t] <- (1-omega) importance[t] + omega * mean_h exp(s[h,t] - lse_ref[h])
#    torch: ap_vllm.core.lowrank_attention.attend_compacted / update_importance
# --------------------------------------------------------------------------------------
@triton.jit
def _span_decode_kernel(qp_ptr, cache_ptr, bt_ptr, meta_ptr, thr_ptr, lse_ref_ptr, part_a_ptr, part_lse_ptr,
                        stride_bt, block_bytes, tokens_per_split, num_splits, scale, softcap, omega,
                        q_ptr, cs_ptr, partner_ptr, freq_ptr, sign_ptr, stride_qb, stride_qh, w_bytes, rot_dim,
                        HQ: tl.constexpr, HQ_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr,
                        CDTYPE: tl.constexpr, CB: tl.constexpr, FP8: tl.constexpr,
                        SOFTCAP: tl.constexpr, UPDATE: tl.constexpr, NMETA: tl.constexpr,
                        PRE_ROPE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                        BLOCK_C: tl.constexpr, DTYPE: tl.constexpr, EB: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr):
    sid = tl.program_id(0)
    split = tl.program_id(1)
    meta = meta_ptr + sid * NMETA
    seq = tl.load(meta + M_SEQ)
    T = tl.load(meta + M_T)
    rk_full = tl.load(meta + M_RK)
    rv_full = tl.load(meta + M_RV)
    rk_low = tl.load(meta + M_RK_LOW)
    rv_low = tl.load(meta + M_RV_LOW)
    sb = tl.load(meta + M_SB)
    blk_ck = sb + tl.load(meta + M_CK)
    blk_cv = sb + tl.load(meta + M_CV)
    blk_sk = sb + tl.load(meta + M_SK)
    blk_sv = sb + tl.load(meta + M_SV)
    blk_imp = sb + tl.load(meta + M_IMP)
    row_k = tl.load(meta + M_ROWK)
    row_v = tl.load(meta + M_ROWV)
    rpb_k = block_bytes // row_k
    rpb_v = block_bytes // row_v
    rpb_4 = block_bytes // 4
    thr = tl.load(thr_ptr + sid)
    bt_row = bt_ptr + seq * stride_bt

    hh = tl.arange(0, HQ_PAD)
    hmask = hh < HQ
    rk = tl.arange(0, BLOCK_RK)
    rv = tl.arange(0, BLOCK_RV)
    if PRE_ROPE:
        span_start = tl.load(meta + M_START)
        q_row = q_ptr + seq * stride_qb
        b_addr = _rows_addr(bt_row, sb + tl.load(meta + M_BK), rk, block_bytes // w_bytes, w_bytes, block_bytes,
                            rk < rk_full)  # [RK] byte address of the rows of B_k
    else:
        qp = tl.load(qp_ptr + sid * HQ_PAD * BLOCK_RK + hh[:, None] * BLOCK_RK + rk[None, :])  # [HQ_PAD, RK]
    if UPDATE:
        lse_ref = tl.load(lse_ref_ptr + seq * HQ + hh, mask=hmask, other=float("inf"))

    m = tl.full([HQ_PAD], float("-inf"), tl.float32)
    l = tl.zeros([HQ_PAD], tl.float32)
    acc = tl.zeros([HQ_PAD, BLOCK_RV], tl.float32)
    t_begin = split * tokens_per_split
    t_end = tl.minimum(T, t_begin + tokens_per_split)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < t_end
        iaddr = _rows_addr(bt_row, blk_imp, t, rpb_4, 4, block_bytes, tmask)
        iptr = (cache_ptr + iaddr).to(tl.pointer_type(tl.float32))
        imp = tl.load(iptr, mask=tmask, other=0.0)
        full = imp >= thr
        # keys: [BLOCK_T, RK] token-major rows, low-importance tokens read only the first rk_low
        kaddr = _rows_addr(bt_row, blk_ck, t, rpb_k, row_k, block_bytes, tmask)
        kcols = tl.where(full, rk_full, rk_low)
        kmask = tmask[:, None] & (rk[None, :] < kcols[:, None])
        ck = tl.load((cache_ptr + kaddr[:, None] + rk[None, :] * CB).to(tl.pointer_type(CDTYPE)),
                     mask=kmask, other=0.0)
        if PRE_ROPE:
            s = _pre_rope_scores(ck, q_row, stride_qh, cache_ptr, b_addr, rk_full, span_start + t, tmask,
                                 cs_ptr, partner_ptr, freq_ptr, sign_ptr, rot_dim,
                                 G, HQ, HQ_PAD, D, W, BLOCK_T, BLOCK_RK, BLOCK_C, DTYPE, EB, UPCAST, PREC)
        else:
            s = tl.dot(qp, tl.trans(ck.to(tl.float32)))  # [HQ_PAD, BLOCK_T]
        if FP8:
            sk = tl.load((cache_ptr + _rows_addr(bt_row, blk_sk, t, rpb_4, 4, block_bytes, tmask)
                          ).to(tl.pointer_type(tl.float32)), mask=tmask, other=0.0)
            s = s * sk[None, :]
        s = s * scale
        if SOFTCAP:
            s = _softcap(s, softcap)
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        # values: low-importance tokens read only the first rv_low components (whole sectors skipped)
        vaddr = _rows_addr(bt_row, blk_cv, t, rpb_v, row_v, block_bytes, tmask)
        vcols = tl.where(full, rv_full, rv_low)
        vmask = tmask[:, None] & (rv[None, :] < vcols[:, None])
        cv = tl.load((cache_ptr + vaddr[:, None] + rv[None, :] * CB).to(tl.pointer_type(CDTYPE)),
                     mask=vmask, other=0.0).to(tl.float32)
        pv = p
        if FP8:
            sv = tl.load((cache_ptr + _rows_addr(bt_row, blk_sv, t, rpb_4, 4, block_bytes, tmask)
                          ).to(tl.pointer_type(tl.float32)), mask=tmask, other=0.0)
            pv = p * sv[None, :]
        acc = acc * alpha[:, None] + tl.dot(pv, cv)
        m = m_new
        if UPDATE:
            pr = tl.where(hmask[:, None], tl.exp(s - lse_ref[:, None]), 0.0)
            p_mean = tl.sum(pr, 0) / HQ
            tl.store(iptr, (1.0 - omega) * imp + omega * p_mean, mask=tmask)

    l_safe = tl.where(l > 0, l, 1.0)
    lse = tl.where(l > 0, m + tl.log(l_safe), float("-inf"))
    a = tl.where(l[:, None] > 0, acc / l_safe[:, None], 0.0)
    base = sid * num_splits + split
    tl.store(part_lse_ptr + base * HQ_PAD + hh, lse)
    tl.store(part_a_ptr + base * HQ_PAD * BLOCK_RV + hh[:, None] * BLOCK_RV + rv[None, :], a)


# --------------------------------------------------------------------------------------
# 3. exact paged decode (flash-decoding split-K, GQA: the g query heads of kv head j together)
#      s[h, n] = scale * <q_h, K[n, j]> (soft-capped), over tokens n < seq_len not inside any span
#      (and seq_len - 1 - n < window); partial out[h] = softmax(s) @ V[:, j], lse[h]
#    torch: ap_vllm.core.dense.dense_attention
# --------------------------------------------------------------------------------------
@triton.jit
def _exact_decode_kernel(q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, seq_spans_ptr, meta_ptr, part_o_ptr, part_lse_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kkv, stride_kt, stride_kh, stride_bt,
                         tokens_per_split, num_splits, scale, softcap, window,
                         G: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                         MAX_SPANS: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                         NMETA: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    split = tl.program_id(2)
    L = tl.load(seq_lens_ptr + b)
    gg = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    gmask = gg < G
    dmask = dd < D
    q = tl.load(q_ptr + b * stride_qb + (j * G + gg)[:, None] * stride_qh + dd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n_begin = split * tokens_per_split
    n_end = tl.minimum(L, n_begin + tokens_per_split)
    for n0 in range(n_begin, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < n_end
        if WINDOW:
            valid = valid & ((L - 1 - n) < window)
        for i in tl.static_range(MAX_SPANS):
            sid = tl.load(seq_spans_ptr + b * MAX_SPANS + i)
            st = tl.load(meta_ptr + tl.maximum(sid, 0) * NMETA + M_START)
            ln = tl.load(meta_ptr + tl.maximum(sid, 0) * NMETA + M_T)
            ln = tl.where(sid >= 0, ln, 0)
            valid = valid & ((n < st) | (n >= st + ln))
        if tl.max(valid.to(tl.int32), 0) > 0:
            blk = tl.load(bt_ptr + b * stride_bt + n // PAGE, mask=valid, other=0).to(tl.int64)
            off = blk * stride_kb + (n % PAGE).to(tl.int64) * stride_kt + j * stride_kh
            kvmask = valid[:, None] & dmask[None, :]
            k = tl.load(kv_ptr + off[:, None] + dd[None, :], mask=kvmask, other=0.0)
            if UPCAST:  # the CPU interpreter mis-computes bf16 dots
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_N]
            if SOFTCAP:
                s = _softcap(s, softcap)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(kv_ptr + stride_kkv + off[:, None] + dd[None, :], mask=kvmask, other=0.0)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    lse = tl.where(l > 0, m + tl.log(l_safe), float("-inf"))
    o = tl.where(l[:, None] > 0, acc / l_safe[:, None], 0.0)
    base = b * num_splits + split
    heads = j * G + gg
    tl.store(part_lse_ptr + base * HQ + heads, lse, mask=gmask)
    tl.store(part_o_ptr + (base * HQ + heads)[:, None] * BLOCK_D + dd[None, :], o, mask=gmask[:, None])


# --------------------------------------------------------------------------------------
# 4. merge (per seq, kv head):  lse = logsumexp_i lse_i,  out = sum_i exp(lse_i - lse) out_i,
#    where a span's partials are first merged in coefficient space and projected once:
#    out_span[h] = a[h] @ B_v[:, j*d:(j+1)*d].      torch: ap_vllm.core.dense.merge_partials
# --------------------------------------------------------------------------------------
@triton.jit
def _merge_partial(m, l, acc, x, o):
    # one log-sum-exp merge step (running max m, normaliser l, unnormalised acc [rows, cols]) with a
    # partial of log-normaliser x and normalised output o:  acc <- acc e^(m - m') + o e^(x - m'),
    # l <- l e^(m - m') + e^(x - m'), m' = max(m, x)  (rows where both are -inf stay 0)
    m_new = tl.maximum(m, x)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    w = tl.exp(x - m_safe)
    return m_new, l * alpha + w, acc * alpha[:, None] + w[:, None] * o


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, part_a_ptr, part_alse_ptr, seq_spans_ptr, meta_ptr, cache_ptr,
                  bt_ptr, out_ptr, lse_out_ptr, stride_ob, stride_oh, stride_bt, block_bytes, w_bytes,
                  num_exact_splits, num_span_splits,
                  G: tl.constexpr, HQ: tl.constexpr, HQ_PAD: tl.constexpr, D: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RV: tl.constexpr,
                  MAX_SPANS: tl.constexpr, DTYPE: tl.constexpr, EB: tl.constexpr, NMETA: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    gg = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    rv = tl.arange(0, BLOCK_RV)
    gmask = gg < G
    dmask = dd < D
    heads = j * G + gg
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for sp in range(num_exact_splits):
        base = b * num_exact_splits + sp
        x = tl.load(part_lse_ptr + base * HQ + heads, mask=gmask, other=float("-inf"))
        o = tl.load(part_o_ptr + (base * HQ + heads)[:, None] * BLOCK_D + dd[None, :], mask=gmask[:, None],
                    other=0.0)
        m, l, acc = _merge_partial(m, l, acc, x, o)
    for i in tl.static_range(MAX_SPANS):
        sid = tl.load(seq_spans_ptr + b * MAX_SPANS + i)
        if sid >= 0:
            ma = tl.full([BLOCK_G], float("-inf"), tl.float32)
            la = tl.zeros([BLOCK_G], tl.float32)
            aa = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
            for sp in range(num_span_splits):
                base = sid * num_span_splits + sp
                x = tl.load(part_alse_ptr + base * HQ_PAD + heads, mask=gmask, other=float("-inf"))
                a = tl.load(part_a_ptr + (base * HQ_PAD + heads)[:, None] * BLOCK_RV + rv[None, :],
                            mask=gmask[:, None], other=0.0)
                ma, la, aa = _merge_partial(ma, la, aa, x, a)
            la_safe = tl.where(la > 0, la, 1.0)
            aa = tl.where(la[:, None] > 0, aa / la_safe[:, None], 0.0)
            meta = meta_ptr + sid * NMETA
            rvn = tl.load(meta + M_RV)
            sb = tl.load(meta + M_SB)
            bvb = tl.load(meta + M_BV)
            rmask = rv < rvn
            addr = _rows_addr(bt_ptr + b * stride_bt, sb + bvb, rv, block_bytes // w_bytes, w_bytes, block_bytes,
                              rmask)
            bptr = (cache_ptr + addr[:, None] + (j * D + dd)[None, :] * EB).to(tl.pointer_type(DTYPE))
            bv = tl.load(bptr, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            o = tl.dot(aa, bv, input_precision="ieee")  # [BLOCK_G, BLOCK_D]
            x = tl.where(la > 0, ma + tl.log(la_safe), float("-inf"))
            m, l, acc = _merge_partial(m, l, acc, x, o)
    l_safe = tl.where(l > 0, l, 1.0)
    out = tl.where(l[:, None] > 0, acc / l_safe[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & dmask[None, :])
    tl.store(lse_out_ptr + b * HQ + heads, tl.where(l > 0, m + tl.log(l_safe), float("-inf")), mask=gmask)


# --------------------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------------------
def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_ROPE_DEVICE = weakref.WeakKeyDictionary()  # RopeTable (hashed by identity) -> {device: its tensors}


def _rope_tensors(rope: RopeTable, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """cos_sin (float32 contiguous), partner, freq (int32), sign (float32) on ``dev``; cached per table."""
    per_dev = _ROPE_DEVICE.setdefault(rope, {})
    key = str(dev)
    if key not in per_dev:
        per_dev[key] = (rope.cos_sin.to(dev, torch.float32).contiguous(), rope.partner.to(dev, torch.int32),
                        rope.freq.to(dev, torch.int32), rope.sign.to(dev, torch.float32).contiguous())
    return per_dev[key]


def paged_mixed_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    meta: torch.Tensor,
    thresholds: torch.Tensor,
    seq_spans: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int,
    max_span_tokens: int,
    key_rank_max: int,
    value_rank_max: int,
    fp8: bool = False,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    lse_ref: Optional[torch.Tensor] = None,
    importance_ema: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    block_t: int = 64,
    block_n: int = 64,
    num_span_splits: Optional[int] = None,
    num_exact_splits: Optional[int] = None,
    rope: Optional[RopeTable] = None,
    block_c: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the four kernels; see :func:`ap_vllm.core.paged_decode.paged_mixed_decode` for the API.

    ``importance_ema`` not None: importance of every span is updated in place, normalised by
    ``lse_ref`` [B, Hq] (required then). Returns out [B, Hq, d] and lse [B, Hq] (float32).
    ``rope``: every span of the call holds pre-RoPE keys rotated with this table (one layer);
    ``block_c`` is then the width of the key column chunks rebuilt at a time.
    """
    bsz, hq, d = q.shape
    nblk, two, page, hkv, d2 = kv_cache.shape
    assert two == 2 and d2 == d and hq % hkv == 0
    g = hq // hkv
    dev = q.device
    num_spans = meta.shape[0]
    max_spans = seq_spans.shape[1] if seq_spans.numel() else 1
    if num_spans == 0:
        seq_spans = torch.full((bsz, 1), -1, dtype=torch.int32, device=dev)
        max_spans = 1
    if num_spans and window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    update = importance_ema is not None and num_spans > 0
    if update and lse_ref is None:
        raise ValueError("importance update needs lse_ref (the previous step's lse, [B, Hq])")
    if rope is not None:
        if rope.head_size != d:
            raise ValueError(f"rope table has head_size {rope.head_size}, the cache has head_size {d}")
        # device copies of the table, made once (also by a call without spans: a warm-up before graph capture)
        rope_tensors = _rope_tensors(rope, dev)
    pre_rope = rope is not None and num_spans > 0  # span positions vs the table: paged_mixed_decode checks
    q = q.contiguous()
    eb = kv_cache.element_size()
    block_bytes = 2 * page * hkv * d * eb
    w_bytes = hkv * d * eb
    # Spans are addressed in bytes from the cache's base: each block must be one dense byte range
    # (any dim order inside it); exact K/V are read through the strides, head_size innermost.
    if kv_cache.stride(-1) != 1 or not block_contiguous(kv_cache):
        raise ValueError(f"kv_cache (strides {kv_cache.stride()}) must keep each block in one dense byte range "
                         "with head_size innermost")
    kv_bytes = cache_bytes(kv_cache)
    bt = block_table.contiguous()
    block_g, block_d = _pow2(g), _pow2(d)
    hq_pad = _pow2(hq)
    brk, brv = _pow2(key_rank_max), _pow2(value_rank_max)
    target = _target_programs(dev)

    # 1 + 2: spans
    if num_spans:
        if pre_rope:  # scores in head space (2b): no query projection
            qp = torch.zeros(1, dtype=torch.float32, device=dev)
        else:
            qp = torch.zeros(num_spans, hq_pad, brk, dtype=torch.float32, device=dev)
            _span_qproj_kernel[(num_spans, hkv)](
                q, kv_bytes, bt, meta, qp, q.stride(0), q.stride(1), bt.stride(0), block_bytes, w_bytes,
                G=g, D=d, HQ_PAD=hq_pad, BLOCK_G=block_g, BLOCK_R=brk, BLOCK_D=block_d,
                DTYPE=_TL_DTYPE[kv_cache.dtype], EB=eb, NMETA=NUM_META)
        ss = num_span_splits or max(1, min(triton.cdiv(target, num_spans), triton.cdiv(max_span_tokens, block_t)))
        tps = triton.cdiv(triton.cdiv(max_span_tokens, ss), block_t) * block_t
        ss = triton.cdiv(max_span_tokens, tps)
        part_a = torch.empty(num_spans, ss, hq_pad, brv, dtype=torch.float32, device=dev)
        part_alse = torch.empty(num_spans, ss, hq_pad, dtype=torch.float32, device=dev)
        cdt = torch.float8_e4m3fn if fp8 else kv_cache.dtype
        lref = lse_ref.float().contiguous() if update else part_alse
        cos_sin, partner, freq, sign = rope_tensors if pre_rope else (qp, qp, qp, qp)  # (unused without rope)
        _span_decode_kernel[(num_spans, ss)](
            qp, kv_bytes, bt, meta, thresholds, lref, part_a, part_alse,
            bt.stride(0), block_bytes, tps, ss, float(scale), float(softcap or 1.0), float(importance_ema or 0.0),
            q, cos_sin, partner, freq, sign, q.stride(0), q.stride(1), w_bytes, rope.rotary_dim if pre_rope else 2,
            HQ=hq, HQ_PAD=hq_pad, BLOCK_T=block_t, BLOCK_RK=brk, BLOCK_RV=brv,
            CDTYPE=_TL_DTYPE[cdt], CB=1 if fp8 else eb, FP8=fp8, SOFTCAP=bool(softcap), UPDATE=update,
            NMETA=NUM_META, PRE_ROPE=pre_rope, G=g, D=d, W=hkv * d, BLOCK_C=min(_pow2(block_c), _pow2(hkv * d)),
            DTYPE=_TL_DTYPE[kv_cache.dtype], EB=eb, UPCAST=_INTERPRET,
            PREC="ieee" if kv_cache.dtype == torch.float32 else "tf32")
    else:
        ss = 1
        part_a = torch.zeros(1, dtype=torch.float32, device=dev)
        part_alse = torch.zeros(1, dtype=torch.float32, device=dev)

    # 3: exact tokens
    se = num_exact_splits or max(1, min(triton.cdiv(target, bsz * hkv), triton.cdiv(max_seq_len, block_n)))
    tpe = triton.cdiv(triton.cdiv(max(max_seq_len, 1), se), block_n) * block_n
    se = max(1, triton.cdiv(max_seq_len, tpe))
    part_o = torch.empty(bsz, se, hq, block_d, dtype=torch.float32, device=dev)
    part_lse = torch.empty(bsz, se, hq, dtype=torch.float32, device=dev)
    meta_arg = meta if num_spans else torch.zeros(1, NUM_META, dtype=torch.int64, device=dev)
    _exact_decode_kernel[(bsz, hkv, se)](
        q, kv_cache, bt, seq_lens, seq_spans, meta_arg, part_o, part_lse,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        bt.stride(0), tpe, se, float(scale), float(softcap or 1.0), int(window or 0),
        G=g, HQ=hq, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, PAGE=page, MAX_SPANS=max_spans,
        SOFTCAP=bool(softcap), WINDOW=window is not None, NMETA=NUM_META, UPCAST=_INTERPRET)

    # 4: merge
    if out is None:
        out = torch.empty(bsz, hq, d, dtype=torch.float32, device=dev)
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=dev)
    _merge_kernel[(bsz, hkv)](
        part_o, part_lse, part_a, part_alse, seq_spans, meta_arg, kv_bytes, bt, out, lse,
        out.stride(0), out.stride(1), bt.stride(0), block_bytes, w_bytes, se, ss,
        G=g, HQ=hq, HQ_PAD=hq_pad, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_RV=brv, MAX_SPANS=max_spans,
        DTYPE=_TL_DTYPE[kv_cache.dtype], EB=eb, NMETA=NUM_META)
    return out, lse


__all__ = ["paged_mixed_decode_triton"]
