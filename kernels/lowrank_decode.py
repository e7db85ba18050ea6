"""Triton attention over vLLM's paged cache holding exact pages + compacted spans (GQA, split-K).

Queries are *rows*: one per sequence in a decode step, or every query token of a prefill /
chunked-prefill / speculative step. Four kernels (three launches for decode rows over post-RoPE spans, whose
exact kernel makes the query projection), all reading vLLM's paged cache
``kv_cache[num_blocks, 2, block_size, Hkv, d]`` (contiguous, or any view whose blocks are dense
byte ranges, e.g. the backend's view of token-major pages) and spans in the layout of
:mod:`ap_vllm.core.paged_layout`:

1. ``_span_qproj_kernel``  per (span instance, kv head j): q_proj[i, h, :] = B_k[:, j*d:(j+1)*d] @ q[i, h]
   for the instance's query rows i and the heads h of kv head j. Decode rows (``SpanLaunch.qproj_in_exact``):
   made by the last split of ``_exact_decode_kernel`` for (row, kv head j), which then runs first; that split
   is idle past a VLM row's few text tokens, so the projection costs no launch of its own.
2. ``_span_attn_kernel``   per (span instance, split): MQA over the span's tokens with head size R for
   ``QPT`` query rows x all Hq heads (decode: one row, the fused importance EMA, the two-level read);
   partial a[i, h] = sum_t p[i, h, t] C_v[t], lse[i, h].
   Pre-RoPE spans (``rope`` given, ``PRE_ROPE``): launch 1 is skipped; the kernel rebuilds each
   token tile's keys from C_k and B_k column chunk by column chunk, rotates them at the tokens'
   positions and scores them against the (block-diagonal) query heads in head space.
3. exact tokens: ``_exact_decode_kernel`` per (row, kv head, split) for decode rows (GQA
   flash-decoding over every token not inside a span, sliding window and soft-cap honoured), or
   :func:`ap_vllm.kernels.exact_attention.paged_exact_attention_triton` for rows of longer queries.
4. ``_merge_kernel``       per (row, kv head): log-sum-exp merge of all partials; span partials
   are merged in coefficient space first and projected once: out_span[h] = a[h] @ B_v[:, j*d:(j+1)*d].
   Partials are read ``CH`` splits a load (:func:`merge_chunks`), not one after the other.

The token loop's softmax runs in base 2 (scores times log2 e, one ``ex2.approx.ftz`` an element), and a
full-rank read (``FULL``; keys under ``SCORE``) applies no per-component mask: the sector-masked load is
already exact (zero padding to the sector, 0 for masked tokens). Both cut what one token tile costs to issue,
the bound of this kernel at 2-3 CTAs of 4 warps an SM (``benchmarks/aot_compile.py`` counts the loop's SASS).

Static launch (CUDA graphs; ``num_spans`` given to :func:`paged_mixed_decode_triton`): every grid and
scalar argument depends on tensor shapes and per-batch-size host ints only. Launches 1-2 run a fixed
number of programs looping over the work items (span s < num_spans[0], split k) read on the device,
each span cutting its own T tokens into the splits; launch 3 has a grid from the ``max_seq_len`` cap and
each row cuts its own seq_len into the splits (splits past it exit at once); launch 4 reads only the
splits that exist. Rows of seq_len 0 (padding) get out 0, lse -inf.

A *span instance* is (span, first query row, number of rows <= QPT): a decode row reads each of its
spans as one instance; a prefill chunk of n queries after a compacted span reads it as
ceil(n / QPT) instances, so the span's coefficients are read once per QPT queries, never per token.

Loads are typed: the cache is passed as three views of the same bytes (model dtype for the bases,
coefficient dtype, float32 for scales and importance), offsets are in elements. Coefficient rows are
sector-planar inside a block (32-byte sector p of a block's rows together, see
:mod:`ap_vllm.core.paged_layout`): a row loads with 16-byte vector loads (offsets counted in sectors, a
load mask of whole sectors), and a low-importance token that reads only its first sector(s) reads only
the first plane(s), whose sectors of consecutive tokens share cache lines: the skipped components are
whole lines never fetched. A token tile (``BLOCK_T`` rows, at most the rows of one block) touches at most
two blocks of a section: the block table is read twice per tile and section (or once per row,
``SpanLaunch.bt_vec``, a load the software pipeliner issues a tile ahead), and once when the plan's rows per
block are multiples of the tile (tiles start at multiples of it: no tile straddles; ``BT_ONE``).

The torch reference of the whole decode step is :func:`ap_vllm.core.paged_decode.paged_decode_reference`
(which relies on :func:`ap_vllm.core.lowrank_attention.decode_mixed`); of a prefill step,
:func:`ap_vllm.core.paged_decode.paged_prefill_reference`.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

from ap_vllm.kernels.cache_abi import META, META_FIELDS, SECTOR_BYTES, block_contiguous, cache_bytes
from ap_vllm.kernels.exact_attention import LN2, LOG2E, compiles_for_sm, exp2_fast, paged_exact_attention_triton

# ``rope`` arguments: a rotary table (ap_vllm.core.rope.RopeTable), read by its tensors cos_sin, partner, freq,
# sign and its rotary_dim; the kernel layer imports nothing of the core.
RopeTable = Any

# how a token tile's rows find their blocks (the span kernel's BT): two scalar block-table reads and a per-row select
# (a tile of at most one block's rows touches at most two blocks), one read a row, or one read (no tile straddles)
BT_PAIR = tl.constexpr(0)
BT_ROW = tl.constexpr(1)
BT_ONE = tl.constexpr(2)

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
             torch.float8_e4m3fn: tl.float8e4nv}

# metadata columns (ap_vllm.core.paged_layout.META): constexpr, so jit code may read them
M_SEQ = tl.constexpr(META["seq"])
M_START = tl.constexpr(META["start"])
M_T = tl.constexpr(META["num_tokens"])
M_RK = tl.constexpr(META["key_rank"])
M_RV = tl.constexpr(META["value_rank"])
M_RK_LOW = tl.constexpr(META["key_rank_low"])
M_RV_LOW = tl.constexpr(META["value_rank_low"])
M_SB = tl.constexpr(META["storage_block"])
M_BK = tl.constexpr(META["blk_basis_k"])
M_BV = tl.constexpr(META["blk_basis_v"])
M_CK = tl.constexpr(META["blk_coeff_k"])
M_CV = tl.constexpr(META["blk_coeff_v"])
M_SK = tl.constexpr(META["blk_scale_k"])
M_SV = tl.constexpr(META["blk_scale_v"])
M_IMP = tl.constexpr(META["blk_importance"])
M_ROWK = tl.constexpr(META["row_coeff_k"])
M_ROWV = tl.constexpr(META["row_coeff_v"])
NUM_META = len(META_FIELDS)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# register cap of the exact decode kernel's static launch: 128 keeps four CTAs of 4 warps per SM; left uncapped,
# ptxas took up to 255 for extra unrolling; checked spill-free for every launched configuration by
# benchmarks/aot_compile.py
_MAXNREG = {} if _INTERPRET else {"maxnreg": 128}
# the merge: one program per (row, kv head), few enough to need no second CTA per SM; its chunks of partials
# spilled 1.4-2 KB under a cap of 128
_MERGE_REGS = {} if _INTERPRET else {"maxnreg": 255}


@triton.jit
def _softcap(s, cap):
    # cap * tanh(s / cap), written with exp so it runs everywhere (saturates to +-cap)
    e = tl.exp(2.0 * s / cap)
    return cap * (1.0 - 2.0 / (e + 1.0))


@triton.jit
def _base2_scores(s, tmask, scale, softcap, SOFTCAP: tl.constexpr):
    # scores [ROWS, BLOCK_T] scaled (soft-capped), in base 2, -inf past the split: one multiply-add an element
    bias = tl.where(tmask, 0.0, float("-inf"))
    if SOFTCAP:
        return _softcap(s * scale, softcap) * LOG2E + bias[None, :]
    else:
        return s * (scale * LOG2E) + bias[None, :]


@triton.jit
def _softmax_step(m, l, s, UPCAST: tl.constexpr):
    # one online-softmax step over a tile's base-2 scores s [ROWS, BLOCK_T]: the new running max, the normaliser,
    # p = 2^(s - m_new) and the factor alpha = 2^(m - m_new) the accumulator is rescaled by (rows all -inf stay 0)
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = exp2_fast(m - m_safe, not UPCAST)
    p = exp2_fast(s - m_safe[:, None], not UPCAST)
    return m_new, l * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def _e4m3_to_f32(x):
    # float8 e4m3fn bits (uint8) -> float32, for GPUs without native e4m3 (sm < 89):
    #   e = bits 6..3, m = bits 2..0:  v = (8 + m) 2^(e - 10)  (e > 0),  m 2^-9  (e = 0; subnormal)
    #   (e4m3fn has no infinities; 0x7f / 0xff are NaN, which quantize_fp8 never writes)
    b = x.to(tl.int32)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    v = tl.where(e == 0, m * 0.001953125, (8.0 + m) * tl.exp2((e - 10).to(tl.float32)))
    return tl.where((b & 128) != 0, -v, v)


@triton.jit
def _tile_rows(base, bt_row, first_block, b0, live, t_last, t, rpb, SCALE: tl.constexpr, bb_units, BT: tl.constexpr):
    # pointers to rows t (a tile t0 .. t_last, at most rpb rows, in logical blocks b0 and b0 + 1 of a section that
    # starts at logical block first_block, rpb rows per block; live = the tile is inside the split) of a section
    # whose rows are SCALE elements apart in a block of bb_units * SCALE elements:
    #   row(t) = base + (phys(first_block + b) * bb_units + (t - b * rpb)) * SCALE,   b = b0 + (t >= bound)
    # b0 = t0 // rpb (the caller's one unsigned 32-bit division a tile and section), bound = (b0 + 1) * rpb. Two
    # scalar block-table reads give the two blocks' 64-bit offsets (minus their first row), a row selects one and
    # adds its index (no per-row division). Counting in units of SCALE elements lets the compiler prove every row
    # starts on a SCALE multiple (16-byte vector loads). (Selecting between two pointers instead cost Triton 3.9
    # that proof: 2-byte loads.)
    # BT_ONE (the host proved that no tile straddles two blocks: tiles start at multiples of the tile, and every
    # section's rows per block are a multiple of it): block b0 only, one read and no select.
    p0 = tl.load(bt_row + first_block + b0, mask=live, other=0)
    if BT == BT_ONE:
        off = _block_base(p0, b0, rpb, bb_units) + t
    else:
        bound = (b0 + 1) * rpb
        p1 = tl.load(bt_row + first_block + b0 + 1, mask=live & (t_last >= bound), other=0)
        second = t >= bound
        off = tl.where(second, _block_base(p1, b0 + 1, rpb, bb_units), _block_base(p0, b0, rpb, bb_units)) + t
    return base + off * SCALE


@triton.jit
def _block_base(p, b, rpb, units):
    # where logical block b (rpb rows, in physical block p of `units` row units) puts row 0 of the section, so that
    # row t of the block is at base + t:  base = p * units - b * rpb  (64-bit)
    return p.to(tl.int64) * units - b * rpb


@triton.jit
def _udiv(a, b):
    # a // b for int32 a >= 0, b > 0, unsigned (a signed division's sign handling is a dozen instructions more)
    return (tl.cast(a, tl.uint32) // tl.cast(b, tl.uint32)).to(tl.int32)


@triton.jit
def _pdl_trigger(GDC: tl.constexpr):
    # programmatic dependent launch (sm_90+, SpanLaunch.pdl): the next launch of the call may start its programs
    # (each then waits in _pdl_wait before it reads what this launch writes); no effect without the launch attribute
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_wait(GDC: tl.constexpr):
    # blocks until the launch before this one has completed and its writes are visible (griddepcontrol.wait;
    # returns at once when it already has, or when this launch was not a dependent one)
    if GDC:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _tile_offsets_vec(bt_row, first_block, t, tmask, rpb, row_elems, bb_elems):
    # the offsets of _tile_rows from one block-table entry per row (a vector load, mostly L1 hits):
    #   off(t) = phys(first_block + t // rpb) * bb_elems + (t % rpb) * row_elems
    # a load whose address is an ordinary tensor expression of the loop index, which the software pipeliner
    # can issue one or more tiles ahead (num_stages >= 2), with the coefficient loads that depend on it
    blk = tl.load(bt_row + first_block + t // rpb, mask=tmask, other=0).to(tl.int64)
    return blk * bb_elems + ((t % rpb) * row_elems).to(tl.int64)


@triton.jit
def rows_offsets(bt_row, first_block, rows, rows_per_block, row_elems, bb_elems, mask):
    # element offsets of rows of a short section (bases: R rows): one block-table read per row
    blk = tl.load(bt_row + first_block + rows // rows_per_block, mask=mask, other=0).to(tl.int64)
    return blk * bb_elems + (rows % rows_per_block).to(tl.int64) * row_elems


# --------------------------------------------------------------------------------------
# 1. query projection of a span instance (rows i = q0 .. q0 + n - 1 of q, heads h of kv head j):
#      q_proj[inst, i * HQ_PAD + h, r] = sum_c B_k[r, j*d + c] * q[i, h, c]
#    torch: torch.einsum("ngd,rd->ngr", q[i0:i1, j*g:(j+1)*g], B_k.view(R, Hkv, d)[:, j])
# --------------------------------------------------------------------------------------
@triton.jit
def _span_qproj_item(ins, j, q_ptr, cw_ptr, bt_ptr, meta_ptr, inst_ptr, qp_ptr, stride_qb, stride_qh, stride_bt, bb_w,
                     G: tl.constexpr, D: tl.constexpr, W: tl.constexpr, HQ_PAD: tl.constexpr,
                     QPT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     NMETA: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    sid = tl.load(inst_ptr + ins * 3)
    q0 = tl.load(inst_ptr + ins * 3 + 1)
    nq = tl.load(inst_ptr + ins * 3 + 2)
    meta = meta_ptr + sid * NMETA
    seq = tl.load(meta + M_SEQ)
    rk = tl.load(meta + M_RK)
    sb = tl.load(meta + M_SB)
    bk = tl.load(meta + M_BK)
    r = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, QPT * BLOCK_G)
    qi = rows // BLOCK_G
    gg = rows % BLOCK_G
    rmask = r < rk
    dmask = dd < D
    boff = rows_offsets(bt_ptr + seq * stride_bt, sb + bk, r, bb_w // W, W, bb_w, rmask)
    b = tl.load(cw_ptr + boff[:, None] + (j * D + dd)[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    vrow = (gg < G) & (qi < nq)
    q = tl.load(q_ptr + (q0 + qi).to(tl.int64)[:, None] * stride_qb + (j * G + gg)[:, None] * stride_qh
                + dd[None, :], mask=vrow[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter mis-computes bf16 dots
        qp = tl.dot(q.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision=PREC)  # [QPT * BLOCK_G, R]
    else:  # q and B_k in the model dtype: exact products, float32 accumulation
        qp = tl.dot(q.to(b.dtype), tl.trans(b), input_precision=PREC)
    out = qp_ptr + ins * (QPT * HQ_PAD * BLOCK_R) + (qi * HQ_PAD + j * G + gg)[:, None] * BLOCK_R + r[None, :]
    tl.store(out, qp, mask=(gg < G)[:, None] & (r[None, :] < BLOCK_R))


@triton.jit
def _span_qproj_kernel(q_ptr, cw_ptr, bt_ptr, meta_ptr, inst_ptr, qp_ptr, num_spans_ptr,
                       stride_qb, stride_qh, stride_bt, bb_w,
                       G: tl.constexpr, D: tl.constexpr, W: tl.constexpr, HQ_PAD: tl.constexpr,
                       QPT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       NMETA: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, STATIC: tl.constexpr,
                       GDC: tl.constexpr):
    # dynamic: one program per (instance, kv head);  STATIC: a fixed grid (P, Hkv), program p takes the
    # instances p, p + P, ... < num_spans[0] (decode instances: instance i is span i)
    _pdl_trigger(GDC)
    j = tl.program_id(1)
    if STATIC:
        for ins in range(tl.program_id(0), tl.load(num_spans_ptr), tl.num_programs(0)):
            _span_qproj_item(ins, j, q_ptr, cw_ptr, bt_ptr, meta_ptr, inst_ptr, qp_ptr, stride_qb, stride_qh,
                             stride_bt, bb_w, G, D, W, HQ_PAD, QPT, BLOCK_G, BLOCK_R, BLOCK_D, NMETA, PREC, UPCAST)
    else:
        _span_qproj_item(tl.program_id(0), j, q_ptr, cw_ptr, bt_ptr, meta_ptr, inst_ptr, qp_ptr, stride_qb,
                         stride_qh, stride_bt, bb_w, G, D, W, HQ_PAD, QPT, BLOCK_G, BLOCK_R, BLOCK_D, NMETA, PREC,
                         UPCAST)


# --------------------------------------------------------------------------------------
# 2b. pre-RoPE key scores of one token tile (used by _span_attn_kernel when PRE_ROPE).
#     The keys were factorised before rotation: K[t] = rot_{p_t}(C_k[t] B_k), p_t = start + t,
#     so q cannot be projected once. For each chunk c of BLOCK_C head columns i (cos/sin of a
#     (token, frequency) are read once per tile and chunk, for all kv heads j):
#       k_j[t, i]  = sum_r C_k[t, r] B_k[r, j*d + i]                 (rebuilt pre-RoPE key)
#       kp_j[t, i] = sum_r C_k[t, r] B_k[r, j*d + partner[i]]        (its rotation partner)
#       rot_j[t, i] = k_j[t, i] cos[t, i] + kp_j[t, i] ssin[t, i]
#                    cos  = cos_sin[p_t, freq[i]]                    (1 if freq[i] = -1: pass-through)
#                    ssin = sign[i] * cos_sin[p_t, rotary_dim/2 + freq[i]]   (0 if pass-through)
#       s[row, t]  += sum_i Qblk_j[row, i] rot_j[t, i]   Qblk_j[row, i] = q_row[h(row), i] if h(row) // g == j else 0
#     (Qblk is block diagonal: one dot scores all rows against their own kv head.)
#     C_k is unscaled (FP8: the caller multiplies s by s_k[t] afterwards; rotation is linear) and
#     already masked to Rk(t) components (two-level keys). Nothing of K is ever written.
#    torch: ap_vllm.core.lowrank_attention.span_scores (span.rope set); ap_vllm.core.rope.RopeTable
# --------------------------------------------------------------------------------------
@triton.jit
def _pre_rope_scores(ckd, q_ptr, q_off, q_head, q_valid, stride_qh, cw_ptr, b_off, rmask, pos, tmask,
                     cs_ptr, partner_ptr, freq_ptr, sign_ptr, rot_dim,
                     G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    cs_row = cs_ptr + pos.to(tl.int64) * rot_dim  # [BLOCK_T]
    half = rot_dim // 2
    s = tl.zeros([ROWS, BLOCK_T], tl.float32)
    for c0 in range(0, D, BLOCK_C):
        i = c0 + tl.arange(0, BLOCK_C)
        imask = i < D
        pi = tl.load(partner_ptr + i, mask=imask, other=0)
        f = tl.load(freq_ptr + i, mask=imask, other=-1)
        sg = tl.load(sign_ptr + i, mask=imask, other=0.0)
        fmask = tmask[:, None] & (imask & (f >= 0))[None, :]
        fc = tl.maximum(f, 0)[None, :]
        cos = tl.load(cs_row[:, None] + fc, mask=fmask, other=1.0)  # [T, C], once for all kv heads
        ssin = tl.load(cs_row[:, None] + half + fc, mask=fmask, other=0.0) * sg[None, :]
        bmask = rmask[:, None] & imask[None, :]
        for j in range(HKV):
            b = tl.load(cw_ptr + b_off[:, None] + (j * D + i)[None, :], mask=bmask, other=0.0)  # [RK, C]
            bp = tl.load(cw_ptr + b_off[:, None] + (j * D + pi)[None, :], mask=bmask, other=0.0)
            if UPCAST:  # the CPU interpreter mis-computes bf16 dots
                b = b.to(tl.float32)
                bp = bp.to(tl.float32)
            k = tl.dot(ckd, b, input_precision=PREC)  # [T, C]
            kp = tl.dot(ckd, bp, input_precision=PREC)
            rot = k * cos + kp * ssin
            qm = (q_valid & (q_head // G == j))[:, None] & imask[None, :]
            qb = tl.load(q_ptr + q_off[:, None] + q_head[:, None] * stride_qh + i[None, :], mask=qm,
                         other=0.0).to(tl.float32)  # [ROWS, C]
            s += tl.dot(qb, tl.trans(rot), input_precision=PREC)  # [ROWS, T]
    return s


# --------------------------------------------------------------------------------------
# 2. span attention, one (span instance, split) per program; rows = QPT queries x HQ_PAD heads
#    (MQA with head size R):
#      full[t] = importance[t] >= threshold                               (prefill: threshold -inf)
#      s[row,t] = scale * sk[t] * <C_k[t, :Rk(t)], q_proj[row]>     Rk(t) = Rk if full[t] or not two-level keys
#                 (PRE_ROPE: scale * sk[t] * <rot_{p_t}(C_k[t, :Rk(t)] B_k)[j], q_row>, see 2b)
#      m, l, a[row] = online softmax of s over the split;   a[row] += p[row,t] * sv[t] * C_v[t, :Rv(t)]
#      importance[t] <- (1-omega) importance[t] + omega * mean_h exp(s[h,t] - lse_ref[h])   (decode only)
#    SCORE (score selection, decode only; no importance read or written, keys at full rank):
#      full[t] = max_h exp(s[h,t] - lse_ref[h]) >= score_thr     (every t of a row whose lse_ref is not < +inf)
#    FULL (every span of the call reads every token at full rank: thresholds -inf, or value_selection 'full'):
#      full[t] = 1 without reading anything, so every load of the token loop has addresses and masks from the
#      block table alone (importance read only for the update)
#    torch: ap_vllm.core.lowrank_attention.attend_compacted / update_importance / score_full_mask
# --------------------------------------------------------------------------------------
@triton.jit
def _coeff_rows(cc_ptr, bt_row, blk, b0, live, t_last, t, tmask, rpb, bb_c, col, comp, ncols, SEC: tl.constexpr,
                BT: tl.constexpr):
    # a tile's rows of one sector-planar coefficient section (raw, as stored), components < ncols[t] in whole
    # sectors (the rest of the row is never fetched). Component c of token t is at
    #   phys(block of t) * bb_c + (c // SEC) * rpb * SEC + (t % rpb) * SEC + c % SEC      (col = the c part)
    # (the token part counted in sectors, times SEC: the compiler then knows every row starts on a sector
    # and loads it with 16-byte vectors; a tl.multiple_of hint does not survive to the load's layout)
    if BT == BT_ROW:
        rows = cc_ptr + _tile_offsets_vec(bt_row, blk, t, tmask, rpb, 1, bb_c // SEC) * SEC
    else:
        rows = _tile_rows(cc_ptr, bt_row, blk, b0, live, t_last, t, rpb, SEC, bb_c // SEC, BT)
    return _sector_load(rows, tmask, col, comp, ncols, SEC)


@triton.jit
def _sector_load(rows, tmask, col, comp, ncols, SEC: tl.constexpr):
    # rows [T] pointers to sector-planar coefficient rows: components < ncols[t] in whole sectors
    nsec = (ncols + SEC - 1) // SEC
    return tl.load(rows[:, None] + col[None, :], mask=tmask[:, None] & ((comp // SEC)[None, :] < nsec[:, None]),
                   other=0.0)


@triton.jit
def _scale_ptrs(cf_ptr, bt_row, blk, b0, live, t_last, t, tmask, bb_f, BT: tl.constexpr):
    # pointers to a tile's per-token float32 entries of one section (FP8 scales, importance)
    if BT == BT_ROW:
        return cf_ptr + _tile_offsets_vec(bt_row, blk, t, tmask, bb_f, 1, bb_f)
    else:
        return _tile_rows(cf_ptr, bt_row, blk, b0, live, t_last, t, bb_f, 1, bb_f, BT)


@triton.jit
def _full_rank_tile(t0, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_c, bb_f, kcol, vcol, rk, rv,
                    rk_full, rv_full, cc_ptr, cf_ptr, BLOCK_T: tl.constexpr, SEC: tl.constexpr, FP8: tl.constexpr,
                    BT: tl.constexpr):
    # PREFETCH: the raw coefficient tiles (and FP8 scales) of tokens t0 .. t0 + BLOCK_T - 1 < t_end at full rank,
    # loads issued and nothing computed from them (a use would wait for them here). A tile past the split
    # (t0 >= t_end) reads nothing: every row is masked, and so are its block-table reads.
    kb = _udiv(t0, rpb_k)  # the tile's first block in the key, value and float32 sections
    vb = _udiv(t0, rpb_v)
    fb = _udiv(t0, bb_f)
    t = t0 + tl.arange(0, BLOCK_T)
    tmask = t < t_end
    live = t0 < t_end
    t_last = tl.minimum(t0 + BLOCK_T, t_end) - 1
    ck = _coeff_rows(cc_ptr, bt_row, blk_ck, kb, live, t_last, t, tmask, rpb_k, bb_c, kcol, rk,
                     tl.where(tmask, rk_full, 0), SEC, BT)
    cv = _coeff_rows(cc_ptr, bt_row, blk_cv, vb, live, t_last, t, tmask, rpb_v, bb_c, vcol, rv,
                     tl.where(tmask, rv_full, 0), SEC, BT)
    if FP8:
        sk = tl.load(_scale_ptrs(cf_ptr, bt_row, blk_sk, fb, live, t_last, t, tmask, bb_f, BT), mask=tmask,
                     other=0.0)
        sv = tl.load(_scale_ptrs(cf_ptr, bt_row, blk_sv, fb, live, t_last, t, tmask, bb_f, BT), mask=tmask,
                     other=0.0)
    else:
        sk = tl.zeros([BLOCK_T], dtype=tl.float32)
        sv = sk
    return ck, cv, sk, sv


@triton.jit
def _tile_bases_of(pk, pv, psk, psv, t0, rpb_k, rpb_v, bb_c, bb_f, SEC: tl.constexpr, FP8: tl.constexpr):
    # BT_ONE (no tile straddles two blocks): where token tile t0 starts in the key and value sections (and the FP8
    # scales'), from the physical blocks pk, pv (psk, psv) that hold it, as _tile_rows' row base (_block_base):
    # row(t) = cc + (base + t) * SEC for
    #   base = phys(first_block + b0) * bb_c / SEC - b0 * rpb,   b0 = t0 // rpb
    # (scales: in float32 elements, rpb = bb_f).
    ok = _block_base(pk, _udiv(t0, rpb_k), rpb_k, bb_c // SEC)
    ov = _block_base(pv, _udiv(t0, rpb_v), rpb_v, bb_c // SEC)
    if FP8:
        fb = _udiv(t0, bb_f)
        osk = _block_base(psk, fb, bb_f, bb_f)
        osv = _block_base(psv, fb, bb_f, bb_f)
    else:
        osk = ok
        osv = ov
    return ok, ov, osk, osv


@triton.jit
def _tile_bases(t0, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_c, bb_f, SEC: tl.constexpr,
                FP8: tl.constexpr):
    # _tile_bases_of token tile t0, its blocks read from the block table (one read a section). A tile past the
    # split gets base 0 and reads nothing (masked).
    pk, pv, psk, psv = _chunk_blocks(t0, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_f, FP8)
    return _tile_bases_of(pk, pv, psk, psv, t0, rpb_k, rpb_v, bb_c, bb_f, SEC, FP8)


@triton.jit
def _chunk_start(c0, t_end, ii, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_f, BLOCK_T: tl.constexpr,
                 FP8: tl.constexpr):
    # a run of token tiles c0, c0 + BLOCK_T, ... (ii = arange(CHUNK)): its end c_end (t_end at the split's last run)
    # and the blocks of its tiles, read by one vector load a section (_chunk_blocks)
    c_end = tl.minimum(c0 + ii.shape[0] * BLOCK_T, t_end)
    pk, pv, psk, psv = _chunk_blocks(c0 + ii * BLOCK_T, c_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v,
                                     bb_f, FP8)
    return c_end, pk, pv, psk, psv


@triton.jit
def _chunk_tile_bases(t0, c0, ii, pk, pv, psk, psv, rpb_k, rpb_v, bb_c, bb_f, BLOCK_T: tl.constexpr,
                      SEC: tl.constexpr, FP8: tl.constexpr):
    # _tile_bases_of token tile t0 of the run from c0, its blocks taken from the run's vectors of them
    # (_chunk_start) at the tile's place ii == (t0 - c0) / BLOCK_T: a select and a sum in registers, no memory access
    sel = ii == (t0 - c0) // BLOCK_T
    return _tile_bases_of(tl.sum(tl.where(sel, pk, 0), axis=0), tl.sum(tl.where(sel, pv, 0), axis=0),
                          tl.sum(tl.where(sel, psk, 0), axis=0), tl.sum(tl.where(sel, psv, 0), axis=0), t0, rpb_k,
                          rpb_v, bb_c, bb_f, SEC, FP8)


@triton.jit
def _chunk_blocks(t0, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_f, FP8: tl.constexpr):
    # the physical blocks holding token tiles t0 (a scalar, or a vector of tiles) of the key and value sections
    # (and the FP8 scales'); 0 for a tile past t_end (nothing read)
    live = t0 < t_end
    pk = tl.load(bt_row + blk_ck + _udiv(t0, rpb_k), mask=live, other=0)
    pv = tl.load(bt_row + blk_cv + _udiv(t0, rpb_v), mask=live, other=0)
    if FP8:
        psk = tl.load(bt_row + blk_sk + _udiv(t0, bb_f), mask=live, other=0)
        psv = tl.load(bt_row + blk_sv + _udiv(t0, bb_f), mask=live, other=0)
    else:
        psk = pk
        psv = pv
    return pk, pv, psk, psv


@triton.jit
def _tile_at(t0, t_end, ok, ov, osk, osv, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr, cf_ptr,
             BLOCK_T: tl.constexpr, SEC: tl.constexpr, FP8: tl.constexpr):
    # the raw coefficient rows (and FP8 scales) of token tile t0 at full rank, from the tile's bases (_tile_bases)
    t = t0 + tl.arange(0, BLOCK_T)
    tmask = t < t_end
    ck = _sector_load(cc_ptr + (ok + t) * SEC, tmask, kcol, rk, tl.where(tmask, rk_full, 0), SEC)
    cv = _sector_load(cc_ptr + (ov + t) * SEC, tmask, vcol, rv, tl.where(tmask, rv_full, 0), SEC)
    if FP8:
        sk = tl.load(cf_ptr + osk + t, mask=tmask, other=0.0)
        sv = tl.load(cf_ptr + osv + t, mask=tmask, other=0.0)
    else:
        sk = tl.zeros([BLOCK_T], dtype=tl.float32)
        sv = sk
    return ck, cv, sk, sv


@triton.jit
def _full_rank_step(m, l, acc, q_held, ck, cv, sk, sv, tmask, scale, softcap, FP8: tl.constexpr,
                    FP8_SOFT: tl.constexpr, SOFTCAP: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    # one token tile of the full-rank read (raw rows ck, cv [BLOCK_T, R], FP8 scales sk, sv [BLOCK_T]) folded into
    # the running max m, sum l and accumulator acc [ROWS, RV]: s = q_held ck^T (times sk), p = 2^(s2 - m_new),
    # acc = acc alpha + (p sv) cv (scores in base 2, _base2_scores)
    if FP8_SOFT:
        ck = _e4m3_to_f32(ck)
    ck = ck.to(tl.float32) if UPCAST else ck.to(DTYPE)
    s = tl.dot(q_held, tl.trans(ck))  # [ROWS, BLOCK_T]
    if FP8:
        s = s * sk[None, :]
    m_new, l, p, alpha = _softmax_step(m, l, _base2_scores(s, tmask, scale, softcap, SOFTCAP), UPCAST)
    if FP8_SOFT:
        cv = _e4m3_to_f32(cv)
    cv = cv.to(tl.float32) if UPCAST else cv.to(DTYPE)
    if FP8:
        p = p * sv[None, :]
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, cv)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DTYPE), cv)
    return m_new, l, acc


@triton.jit
def _carried_full_rank(t_begin, t_end, q_held, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_c, bb_f, kcol,
                       vcol, rk, rv, rk_full, rv_full, cc_ptr, cf_ptr, scale, softcap, ROWS: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_RV: tl.constexpr, SEC: tl.constexpr, FP8: tl.constexpr,
                       FP8_SOFT: tl.constexpr, SOFTCAP: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                       PREFETCH: tl.constexpr, CHUNK: tl.constexpr):
    # Full-rank read of a split (no update, no selection, post-RoPE, BT_ONE) whose block-table reads run a tile
    # ahead of the row loads, so no row load's address waits on a load of the same iteration (the 2-D loop reads
    # a tile's block, then its rows: two memory latencies a tile, the first one exposed).
    #  * SpanLaunch(bt_ahead=True): tile i's rows come from bases read in iteration i - 1, so to Triton's software
    #    pipeliner they are a direct load: with 3 stages it keeps two tile buffers and tile i + 1's copies stay in
    #    flight while tile i is computed (the 2-D loop gets one buffer at any stage count: its rows hang on a load
    #    of the loop, which takes a stage of its own, so it waits for every copy at the top of each tile).
    #  * PREFETCH (SpanLaunch.prefetch, one stage): tile i + 1's rows are loaded into registers before tile i is
    #    computed, from bases read one iteration earlier, and tile i + 2's block-table reads are issued with them.
    #  * CHUNK > 1 (SpanLaunch.bt_chunk, with bt_ahead): the block-table entries of CHUNK tiles read by one vector
    #    load before a pipelined run over those tiles, each tile's entry taken from registers (a select and a sum,
    #    no memory access): the run's loop holds no block-table read at all (one tile ahead, the read of tile
    #    i + 2's entries is issued after tile i's compute, and its latency comes before tile i + 2's copies).
    # Returns m, l, acc as the 2-D loop leaves them ([ROWS], [ROWS], [ROWS, RV]; scores in base 2).
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_RV], tl.float32)
    if CHUNK > 1:
        ii = tl.arange(0, CHUNK)
        for c0 in range(t_begin, t_end, CHUNK * BLOCK_T):
            c_end, pk, pv, psk, psv = _chunk_start(c0, t_end, ii, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v,
                                                   bb_f, BLOCK_T, FP8)
            for t0 in range(c0, c_end, BLOCK_T):
                ok, ov, osk, osv = _chunk_tile_bases(t0, c0, ii, pk, pv, psk, psv, rpb_k, rpb_v, bb_c, bb_f, BLOCK_T,
                                                     SEC, FP8)
                ck, cv, sk, sv = _tile_at(t0, c_end, ok, ov, osk, osv, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr,
                                          cf_ptr, BLOCK_T, SEC, FP8)
                tmask = t0 + tl.arange(0, BLOCK_T) < c_end
                m, l, acc = _full_rank_step(m, l, acc, q_held, ck, cv, sk, sv, tmask, scale, softcap, FP8, FP8_SOFT,
                                            SOFTCAP, DTYPE, UPCAST)
        return m, l, acc
    ok, ov, osk, osv = _tile_bases(t_begin, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_c, bb_f,
                                   SEC, FP8)
    if PREFETCH:
        nk, nv, nsk, nsv = _tile_at(t_begin, t_end, ok, ov, osk, osv, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr,
                                    cf_ptr, BLOCK_T, SEC, FP8)
        ok, ov, osk, osv = _tile_bases(t_begin + BLOCK_T, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k,
                                       rpb_v, bb_c, bb_f, SEC, FP8)
    for t0 in range(t_begin, t_end, BLOCK_T):
        tmask = t0 + tl.arange(0, BLOCK_T) < t_end
        t_next = t0 + BLOCK_T
        if PREFETCH:
            ck, cv, sk, sv = nk, nv, nsk, nsv
            nk, nv, nsk, nsv = _tile_at(t_next, t_end, ok, ov, osk, osv, kcol, vcol, rk, rv, rk_full, rv_full,
                                        cc_ptr, cf_ptr, BLOCK_T, SEC, FP8)
            ok, ov, osk, osv = _tile_bases(t_next + BLOCK_T, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k,
                                           rpb_v, bb_c, bb_f, SEC, FP8)
        else:
            ck, cv, sk, sv = _tile_at(t0, t_end, ok, ov, osk, osv, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr,
                                      cf_ptr, BLOCK_T, SEC, FP8)
            ok, ov, osk, osv = _tile_bases(t_next, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_c,
                                           bb_f, SEC, FP8)
        m, l, acc = _full_rank_step(m, l, acc, q_held, ck, cv, sk, sv, tmask, scale, softcap, FP8, FP8_SOFT, SOFTCAP,
                                    DTYPE, UPCAST)
    return m, l, acc


@triton.jit
def _wsplit_rows(cc_ptr, bt_row, blk, b0, t_last, t, tmask, rpb, bb_c, col, sec_ok, SEC: tl.constexpr,
                 FP8_SOFT: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr):
    # the [W, TW, R] coefficient rows of a warp-split tile (t [W, TW]) of one section, whole sectors sec_ok [R] at
    # full rank, in the dot's dtype
    return _wsplit_load(_tile_rows(cc_ptr, bt_row, blk, b0, True, t_last, t, rpb, SEC, bb_c // SEC, BT), tmask, col,
                        sec_ok, FP8_SOFT, DTYPE, UPCAST)


@triton.jit
def _wsplit_load(rows, tmask, col, sec_ok, FP8_SOFT: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    # the [W, TW, R] coefficient rows at pointers rows [W, TW], whole sectors sec_ok [R], in the dot's dtype
    c = tl.load(rows[:, :, None] + col[None, None, :], mask=tmask[:, :, None] & sec_ok[None, None, :], other=0.0)
    if FP8_SOFT:
        c = _e4m3_to_f32(c)
    return c.to(tl.float32) if UPCAST else c.to(DTYPE)


@triton.jit
def _wsplit_full_rank(t_begin, t_end, q_held, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v, bb_c, bb_f, kcol,
                      vcol, rk, rv, rk_full, rv_full, cc_ptr, cf_ptr, scale, softcap, ROWS: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_RV: tl.constexpr, W: tl.constexpr, SEC: tl.constexpr,
                      FP8: tl.constexpr, FP8_SOFT: tl.constexpr, SOFTCAP: tl.constexpr, DTYPE: tl.constexpr,
                      UPCAST: tl.constexpr, BT: tl.constexpr, CHUNK: tl.constexpr):
    # Full-rank read of a split (no update, no selection, post-RoPE) with the tile's tokens split between the W
    # warps: warp w takes tokens t0 + w TW .. t0 + (w + 1) TW - 1 (TW = BLOCK_T / W) of every tile and keeps its own
    # running max m_w, sum l_w and accumulator A_w [ROWS, RV] (batched dots: Triton puts the warps on the batch
    # axis of a 3-D dot), so a tile's row max and row sum never leave the warp, and p is the second dot's operand
    # in the registers where the first dot left it. With the tile's tokens spread over the warps of a 2-D dot
    # (its rows, the query heads, are fewer than its tokens), each tile cost a shared-memory round trip and
    # barriers for the row max and the row sum, and a relayout of p through shared memory. The warps' states are
    # merged once, after the split:
    #   m = max_w m_w,  l = sum_w 2^(m_w - m) l_w,  A = sum_w 2^(m_w - m) A_w       (scores in base 2)
    # CHUNK > 1 (SpanLaunch.bt_chunk, tiles read from one block: BT_ONE): the block-table entries of CHUNK tiles
    # read by one vector load before a run over them (_carried_full_rank's chunks), so no row load of the run hangs
    # on a block-table read of its own iteration and the pipeliner keeps two tile buffers (with it, one: every copy
    # waited for at the top of each tile).
    # Returns m, l, acc as the 2-D loop leaves them ([ROWS], [ROWS], [ROWS, RV]).
    TW: tl.constexpr = BLOCK_T // W
    q3 = tl.broadcast_to(q_held[None, :, :], (W, ROWS, q_held.shape[1]))  # every warp holds q (its operand A)
    ksec = (rk // SEC) < (rk_full + SEC - 1) // SEC  # the sectors of a key / value row (the rest is not read)
    vsec = (rv // SEC) < (rv_full + SEC - 1) // SEC
    m3 = tl.full([W, ROWS], float("-inf"), tl.float32)
    l3 = tl.zeros([W, ROWS], tl.float32)
    acc3 = tl.zeros([W, ROWS, BLOCK_RV], tl.float32)
    tw = tl.arange(0, W)[:, None] * TW + tl.arange(0, TW)[None, :]  # [W, TW]
    if CHUNK > 1 and BT == BT_ONE:
        ii = tl.arange(0, CHUNK)
        for c0 in range(t_begin, t_end, CHUNK * BLOCK_T):
            c_end, pk, pv, psk, psv = _chunk_start(c0, t_end, ii, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v,
                                                   bb_f, BLOCK_T, FP8)
            for t0 in range(c0, c_end, BLOCK_T):
                ok, ov, osk, osv = _chunk_tile_bases(t0, c0, ii, pk, pv, psk, psv, rpb_k, rpb_v, bb_c, bb_f, BLOCK_T,
                                                     SEC, FP8)
                t = t0 + tw
                tmask = t < c_end
                ck = _wsplit_load(cc_ptr + (ok + t) * SEC, tmask, kcol, ksec, FP8_SOFT, DTYPE, UPCAST)
                cv = _wsplit_load(cc_ptr + (ov + t) * SEC, tmask, vcol, vsec, FP8_SOFT, DTYPE, UPCAST)
                if FP8:
                    sk = tl.load(cf_ptr + osk + t, mask=tmask, other=0.0)
                    sv = tl.load(cf_ptr + osv + t, mask=tmask, other=0.0)
                else:
                    sk = tl.zeros([W, TW], tl.float32)
                    sv = sk
                m3, l3, acc3 = _wsplit_step(m3, l3, acc3, q3, ck, cv, sk, sv, tmask, scale, softcap, FP8, SOFTCAP,
                                            DTYPE, UPCAST)
    else:
        for t0 in range(t_begin, t_end, BLOCK_T):
            kb = _udiv(t0, rpb_k)
            vb = _udiv(t0, rpb_v)
            fb = _udiv(t0, bb_f)
            t = t0 + tw
            tmask = t < t_end
            t_last = tl.minimum(t0 + BLOCK_T, t_end) - 1
            ck = _wsplit_rows(cc_ptr, bt_row, blk_ck, kb, t_last, t, tmask, rpb_k, bb_c, kcol, ksec, SEC, FP8_SOFT,
                              DTYPE, UPCAST, BT)
            cv = _wsplit_rows(cc_ptr, bt_row, blk_cv, vb, t_last, t, tmask, rpb_v, bb_c, vcol, vsec, SEC, FP8_SOFT,
                              DTYPE, UPCAST, BT)
            if FP8:
                sk = tl.load(_scale_ptrs(cf_ptr, bt_row, blk_sk, fb, True, t_last, t, tmask, bb_f, BT), mask=tmask,
                             other=0.0)
                sv = tl.load(_scale_ptrs(cf_ptr, bt_row, blk_sv, fb, True, t_last, t, tmask, bb_f, BT), mask=tmask,
                             other=0.0)
            else:
                sk = tl.zeros([W, TW], tl.float32)
                sv = sk
            m3, l3, acc3 = _wsplit_step(m3, l3, acc3, q3, ck, cv, sk, sv, tmask, scale, softcap, FP8, SOFTCAP, DTYPE,
                                        UPCAST)
    m = tl.max(m3, 0)
    a3 = exp2_fast(m3 - tl.where(m == float("-inf"), 0.0, m)[None, :], not UPCAST)
    return m, tl.sum(l3 * a3, 0), tl.sum(acc3 * a3[:, :, None], 0)


@triton.jit
def _wsplit_step(m3, l3, acc3, q3, ck, cv, sk, sv, tmask, scale, softcap, FP8: tl.constexpr, SOFTCAP: tl.constexpr,
                 DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    # one warp-split tile (rows ck, cv [W, TW, R] in the dot's dtype, FP8 scales sk, sv [W, TW]) folded into each
    # warp's running max m3, sum l3 [W, ROWS] and accumulator acc3 [W, ROWS, RV] (scores in base 2)
    s = tl.dot(q3, tl.permute(ck, (0, 2, 1)))  # [W, ROWS, TW]
    # scale (FP8: times the token's key scale), base 2, and -inf past the split: one multiply-add an element
    bias = tl.where(tmask, 0.0, float("-inf"))
    if FP8:
        s = s * sk[:, None, :]
    if SOFTCAP:
        s = _softcap(s * scale, softcap) * LOG2E + bias[:, None, :]
    else:
        s = s * (scale * LOG2E) + bias[:, None, :]
    m_new = tl.maximum(m3, tl.max(s, 2))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = exp2_fast(m3 - m_safe, not UPCAST)
    p = exp2_fast(s - m_safe[:, :, None], not UPCAST)
    l3 = l3 * alpha + tl.sum(p, 2)
    if FP8:
        p = p * sv[:, None, :]
    if UPCAST:
        acc3 = acc3 * alpha[:, :, None] + tl.dot(p, cv)
    else:
        acc3 = acc3 * alpha[:, :, None] + tl.dot(p.to(DTYPE), cv)
    return m_new, l3, acc3


@triton.jit
def _span_attn_item(ins, split, work, tokens_per_split, qp_ptr, cw_ptr, cc_ptr, cf_ptr, bt_ptr, meta_ptr, inst_ptr,
                    thr_ptr, lse_ref_ptr, part_a_ptr, part_lse_ptr, stride_bt, bb_w, bb_c, bb_f, num_splits, scale,
                    softcap, omega, score_thr, q_ptr, cs_ptr, partner_ptr, freq_ptr, sign_ptr, stride_qb, stride_qh,
                    rot_dim, HQ: tl.constexpr, HQ_PAD: tl.constexpr, QPT: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, CB: tl.constexpr, FP8: tl.constexpr,
                    SOFTCAP: tl.constexpr, UPDATE: tl.constexpr, NMETA: tl.constexpr,
                    PRE_ROPE: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                    BLOCK_C: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    FP8_SOFT: tl.constexpr, SCORE: tl.constexpr, HOLD_Q: tl.constexpr, BT: tl.constexpr,
                    FULL: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr, WSPLIT: tl.constexpr,
                    GDC: tl.constexpr):
    # HOLD_Q: q_proj [ROWS, RK] loaded once into registers (in the dot's operand dtype) instead of re-read each
    # tile; BT: how a tile's rows find their blocks: two scalar block-table reads and a select a row (BT_PAIR), one
    # read (BT_ONE: no tile straddles two blocks), or one read a row (BT_ROW, _tile_offsets_vec);
    # PREFETCH (FULL, no update, no score, post-RoPE): tile i + 1's loads are issued into registers before tile
    # i is computed (_full_rank_tile), so one tile is always in flight (launched with one stage: no shared-
    # memory pipeline, whose two stages wait for every copy at the top of each tile)
    SEC: tl.constexpr = 32 // CB  # coefficient elements per 32-byte sector
    ROWS: tl.constexpr = QPT * HQ_PAD
    sid = tl.load(inst_ptr + ins * 3)
    q0 = tl.load(inst_ptr + ins * 3 + 1)
    nq = tl.load(inst_ptr + ins * 3 + 2)
    meta = meta_ptr + sid * NMETA
    # (meta is int64; every field fits 32 bits: the token loop's block arithmetic in int32, no 64-bit division)
    seq = tl.load(meta + M_SEQ)
    T = tl.load(meta + M_T).to(tl.int32)
    rk_full = tl.load(meta + M_RK).to(tl.int32)
    rv_full = tl.load(meta + M_RV).to(tl.int32)
    rk_low = tl.load(meta + M_RK_LOW).to(tl.int32)
    rv_low = tl.load(meta + M_RV_LOW).to(tl.int32)
    sb = tl.load(meta + M_SB).to(tl.int32)
    blk_ck = sb + tl.load(meta + M_CK).to(tl.int32)
    blk_cv = sb + tl.load(meta + M_CV).to(tl.int32)
    blk_imp = sb + tl.load(meta + M_IMP).to(tl.int32)
    row_k = (tl.load(meta + M_ROWK) // CB).to(tl.int32)  # elements per coefficient row (a sector multiple)
    row_v = (tl.load(meta + M_ROWV) // CB).to(tl.int32)
    rpb_k = bb_c // row_k
    rpb_v = bb_c // row_v
    thr = tl.load(thr_ptr + sid)
    bt_row = bt_ptr + seq * stride_bt

    rr = tl.arange(0, ROWS)
    qi = rr // HQ_PAD
    hh = rr % HQ_PAD
    rvalid = (hh < HQ) & (qi < nq)
    rk = tl.arange(0, BLOCK_RK)
    rv = tl.arange(0, BLOCK_RV)
    # column offsets of the components in a block's sector planes (plane c // SEC, element c % SEC)
    # (int32: a block holds fewer than 2^31 elements)
    kcol = (rk // SEC) * (rpb_k * SEC) + rk % SEC
    vcol = (rv // SEC) * (rpb_v * SEC) + rv % SEC
    if PRE_ROPE:
        span_start = tl.load(meta + M_START)
        q_off = (q0 + qi).to(tl.int64) * stride_qb
        b_off = rows_offsets(bt_row, sb + tl.load(meta + M_BK), rk, bb_w // (HKV * D), HKV * D, bb_w,
                              rk < rk_full)  # [RK] element offsets of the rows of B_k
    else:
        _pdl_wait(GDC)  # (q_proj: written by the launch before this one)
        # q_proj [ROWS, RK]: re-read (from L1) each tile, or HOLD_Q: held (with many warps, each would hold it all)
        qp_ptrs = qp_ptr + ins * (ROWS * BLOCK_RK) + rr[:, None] * BLOCK_RK + rk[None, :]
        if HOLD_Q:
            if UPCAST:
                q_held = tl.load(qp_ptrs)
            else:  # rounded to the model dtype, as exact attention rounds q
                q_held = tl.load(qp_ptrs).to(DTYPE)
    # scores in base 2 (s2 = s * log2 e: p = 2^(s2 - m2), one ex2 an element; lse = (m2 + log2 l) ln 2)
    if UPDATE or SCORE:
        lse_ref = tl.load(lse_ref_ptr + q0 * HQ + hh, mask=rvalid, other=float("inf")) * LOG2E

    t_begin = split * tokens_per_split
    t_end = tl.minimum(T, t_begin + tokens_per_split)
    blk_sk = sb + tl.load(meta + M_SK).to(tl.int32)  # (FP8 scales)
    blk_sv = sb + tl.load(meta + M_SV).to(tl.int32)
    if WSPLIT > 1:  # (full rank, post-RoPE, no update or selection, q held)
        m, l, acc = _wsplit_full_rank(t_begin, t_end, q_held, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v,
                                      bb_c, bb_f, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr, cf_ptr, scale, softcap,
                                      ROWS, BLOCK_T, BLOCK_RV, WSPLIT, SEC, FP8, FP8_SOFT, SOFTCAP, DTYPE, UPCAST,
                                      BT, AHEAD)
    elif (PREFETCH or AHEAD) and BT == BT_ONE and HOLD_Q:  # (full rank, post-RoPE, no update or selection)
        m, l, acc = _carried_full_rank(t_begin, t_end, q_held, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v,
                                       bb_c, bb_f, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr, cf_ptr, scale,
                                       softcap, ROWS, BLOCK_T, BLOCK_RV, SEC, FP8, FP8_SOFT, SOFTCAP, DTYPE, UPCAST,
                                       PREFETCH, AHEAD)
    else:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_RV], tl.float32)
        if PREFETCH:
            nk, nv, nsk, nsv = _full_rank_tile(t_begin, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k, rpb_v,
                                               bb_c, bb_f, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr, cf_ptr,
                                               BLOCK_T, SEC, FP8, BT)
        for t0 in range(t_begin, t_end, BLOCK_T):
            # the tile's first block in the key, value and float32 sections (a tile touches at most two: BLOCK_T
            # <= rpb). Carried from tile to tile instead, the blocks cost fewer instructions but more registers
            # (8-48 bytes of spills in three variants with Triton 3.6 or 3.9)
            kb = _udiv(t0, rpb_k)
            vb = _udiv(t0, rpb_v)
            fb = _udiv(t0, bb_f)
            t = t0 + tl.arange(0, BLOCK_T)
            tmask = t < t_end
            t_last = tl.minimum(t0 + BLOCK_T, t_end) - 1
            t_next = t0 + BLOCK_T
            if PREFETCH:  # this tile's loads were issued one tile ago; issue the next one's now
                ck, cv_raw, sk, sv = nk, nv, nsk, nsv
                nk, nv, nsk, nsv = _full_rank_tile(t_next, t_end, bt_row, blk_ck, blk_cv, blk_sk, blk_sv, rpb_k,
                                                   rpb_v, bb_c, bb_f, kcol, vcol, rk, rv, rk_full, rv_full, cc_ptr,
                                                   cf_ptr, BLOCK_T, SEC, FP8, BT)
            if UPDATE or not (SCORE or FULL):
                iptr = _scale_ptrs(cf_ptr, bt_row, blk_imp, fb, True, t_last, t, tmask, bb_f, BT)
                imp = tl.load(iptr, mask=tmask, other=0.0)
            if SCORE or FULL:  # keys at full rank (SCORE: the values' selection follows from this step's scores)
                kcols = tl.where(tmask, rk_full, 0)
            else:
                full = imp >= thr
                kcols = tl.where(full, rk_full, rk_low)
            # keys: a low-importance token reads only its first rk_low components (the load covers whole sectors,
            # i.e. the first planes of the sector-planar rows; the components past rk_low are zeroed in registers)
            if not PREFETCH:
                ck = _coeff_rows(cc_ptr, bt_row, blk_ck, kb, True, t_last, t, tmask, rpb_k, bb_c, kcol, rk, kcols, SEC,
                                 BT)
            if FP8_SOFT:
                ck = _e4m3_to_f32(ck)
            # (full-rank keys, SCORE or FULL: the load is already exact, no per-component mask: a valid token's
            # sectors hold its components and the writer's zero padding, a masked token's are 0 (other=0); a mask
            # applied in registers cost a shared-memory round trip and ~350 compare / select / permute instructions
            # per 128-token tile and warp, sm_90)
            ck = ck.to(tl.float32) if UPCAST else ck.to(DTYPE)  # (C_k, model dtype or e4m3, is exact in DTYPE)
            if not (SCORE or FULL):
                ck = tl.where(rk[None, :] < kcols[:, None], ck, 0.0)  # [BLOCK_T, RK]
            if PRE_ROPE:
                s = _pre_rope_scores(ck, q_ptr, q_off, hh, rvalid, stride_qh, cw_ptr, b_off, rk < rk_full,
                                     span_start + t, tmask, cs_ptr, partner_ptr, freq_ptr, sign_ptr, rot_dim,
                                     G, HKV, D, ROWS, BLOCK_T, BLOCK_C, UPCAST, PREC)
            elif HOLD_Q:
                s = tl.dot(q_held, tl.trans(ck))  # [ROWS, BLOCK_T]
            elif UPCAST:
                s = tl.dot(tl.load(qp_ptrs), tl.trans(ck))  # [ROWS, BLOCK_T]
            else:  # q_proj rounded to the model dtype, as exact attention rounds q; C_k is exact there
                s = tl.dot(tl.load(qp_ptrs).to(DTYPE), tl.trans(ck))
            if FP8:
                if not PREFETCH:
                    sk = tl.load(_scale_ptrs(cf_ptr, bt_row, blk_sk, fb, True, t_last, t, tmask, bb_f, BT),
                                 mask=tmask, other=0.0)
                s = s * sk[None, :]
            s = _base2_scores(s, tmask, scale, softcap, SOFTCAP)
            if UPDATE:  # decode (QPT = 1): rows are the heads; done first so that s dies before the value read
                pr = tl.where(rvalid[:, None], exp2_fast(s - lse_ref[:, None], not UPCAST), 0.0)
                p_mean = tl.sum(pr, 0) / HQ
                tl.store(iptr, (1.0 - omega) * imp + omega * p_mean, mask=tmask)
            if SCORE:  # decode (QPT = 1): full[t] = max_h exp(s[h,t] - lse_ref[h]) >= score_thr (+inf: no lse_ref)
                ph = tl.where(lse_ref[:, None] < float("inf"), exp2_fast(s - lse_ref[:, None], not UPCAST),
                              float("inf"))
                full = tl.max(tl.where(rvalid[:, None], ph, 0.0), 0) >= score_thr
            m_new, l, p, alpha = _softmax_step(m, l, s, UPCAST)
            # values: low-importance tokens read only the first rv_low components (later planes skipped)
            if FULL:  # every token at full rank: no load of the loop waits on loaded data
                vcols = tl.where(tmask, rv_full, 0)
            else:
                vcols = tl.where(full, rv_full, rv_low)
            if PREFETCH:
                cv = cv_raw
            else:
                cv = _coeff_rows(cc_ptr, bt_row, blk_cv, vb, True, t_last, t, tmask, rpb_v, bb_c, vcol, rv, vcols, SEC,
                                 BT)
            if FP8_SOFT:
                cv = _e4m3_to_f32(cv)
            cv = cv.to(tl.float32) if UPCAST else cv.to(DTYPE)
            if not FULL:  # (full rank: exact as loaded, see the keys)
                cv = tl.where(rv[None, :] < vcols[:, None], cv, 0.0)
            pv = p
            if FP8:
                if not PREFETCH:
                    sv = tl.load(_scale_ptrs(cf_ptr, bt_row, blk_sv, fb, True, t_last, t, tmask, bb_f, BT),
                                 mask=tmask, other=0.0)
                pv = p * sv[None, :]
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(pv, cv)
            else:  # p and C_v in the model dtype (C_v is exact there, e4m3 included), float32 accumulation
                acc = acc * alpha[:, None] + tl.dot(pv.to(DTYPE), cv)
            m = m_new

    l_safe = tl.where(l > 0, l, 1.0)
    lse = tl.where(l > 0, (m + tl.log2(l_safe)) * LN2, float("-inf"))
    a = tl.where(l[:, None] > 0, acc / l_safe[:, None], 0.0)
    base = work.to(tl.int64) * ROWS  # work = ins * num_splits + split
    tl.store(part_lse_ptr + base + rr, lse)
    tl.store(part_a_ptr + (base + rr)[:, None] * BLOCK_RV + rv[None, :], a)


@triton.jit(noinline=True)
def _span_attn_work_item(w, qp_ptr, cw_ptr, cc_ptr, cf_ptr, bt_ptr, meta_ptr, inst_ptr, thr_ptr,
                         lse_ref_ptr, part_a_ptr, part_lse_ptr, stride_bt, bb_w, bb_c, bb_f, num_splits, scale, softcap,
                         omega, score_thr, q_ptr, cs_ptr, partner_ptr, freq_ptr, sign_ptr, stride_qb, stride_qh,
                         rot_dim,
                         HQ: tl.constexpr, HQ_PAD: tl.constexpr, QPT: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, CB: tl.constexpr, FP8: tl.constexpr,
                         SOFTCAP: tl.constexpr, UPDATE: tl.constexpr, NMETA: tl.constexpr,
                         PRE_ROPE: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                         BLOCK_C: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                         FP8_SOFT: tl.constexpr, SCORE: tl.constexpr, HOLD_Q: tl.constexpr,
                         BT: tl.constexpr, FULL: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr,
                         WSPLIT: tl.constexpr, GDC: tl.constexpr):
    # work item w = (instance w // num_splits, split w % num_splits) of the static launch, in a function of its
    # own (not inlined; post-RoPE spans under the register cap) that returns the program's next item: the
    # persistent loop around it keeps nothing live across the call, so the item runs in the dynamic launch's
    # registers (no spills under the cap). The three typed views of the cache start at the same byte: one
    # pointer is held instead of three.
    cc_ptr = cw_ptr.to(cc_ptr.dtype, bitcast=True)
    cf_ptr = cw_ptr.to(cf_ptr.dtype, bitcast=True)
    bb_f = bb_c * CB // 4  # float32 elements per block (from the coefficient elements: one register less)
    ins = w // num_splits
    t_i = tl.load(meta_ptr + tl.load(inst_ptr + ins * 3).to(tl.int64) * NMETA + M_T).to(tl.int32)
    tps = tl.cdiv(tl.cdiv(t_i, num_splits), BLOCK_T) * BLOCK_T
    _span_attn_item(ins, w - ins * num_splits, w, tps, qp_ptr, cw_ptr, cc_ptr, cf_ptr, bt_ptr, meta_ptr, inst_ptr,
                    thr_ptr, lse_ref_ptr, part_a_ptr, part_lse_ptr, stride_bt, bb_w, bb_c, bb_f, num_splits, scale,
                    softcap, omega, score_thr, q_ptr, cs_ptr, partner_ptr, freq_ptr, sign_ptr, stride_qb, stride_qh,
                    rot_dim, HQ, HQ_PAD, QPT, BLOCK_T, BLOCK_RK, BLOCK_RV, CB, FP8, SOFTCAP, UPDATE, NMETA, PRE_ROPE, G,
                    HKV, D, BLOCK_C, DTYPE, UPCAST, PREC, FP8_SOFT, SCORE, HOLD_Q, BT, FULL, PREFETCH, AHEAD, WSPLIT,
                    GDC)
    return w + tl.num_programs(0)


# pre-RoPE spans (compute-bound, no register cap): the same work item inlined into the loop
_span_attn_work_item_inlined = triton.jit(_span_attn_work_item.fn)


@triton.jit
def _span_attn_kernel(qp_ptr, cw_ptr, cc_ptr, cf_ptr, bt_ptr, meta_ptr, inst_ptr, thr_ptr, lse_ref_ptr,
                      part_a_ptr, part_lse_ptr, num_spans_ptr,
                      stride_bt, bb_w, bb_c, bb_f, tokens_per_split, num_splits, scale, softcap, omega, score_thr,
                      q_ptr, cs_ptr, partner_ptr, freq_ptr, sign_ptr, stride_qb, stride_qh, rot_dim,
                      HQ: tl.constexpr, HQ_PAD: tl.constexpr, QPT: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, CB: tl.constexpr, FP8: tl.constexpr,
                      SOFTCAP: tl.constexpr, UPDATE: tl.constexpr, NMETA: tl.constexpr,
                      PRE_ROPE: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                      BLOCK_C: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      FP8_SOFT: tl.constexpr, SCORE: tl.constexpr, HOLD_Q: tl.constexpr, BT: tl.constexpr,
                      FULL: tl.constexpr, STATIC: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr,
                      WSPLIT: tl.constexpr, GDC: tl.constexpr):
    # dynamic: one program per (instance, split), tokens_per_split from the longest span of the call.
    # STATIC (a launch that depends on shapes only): a fixed grid of P programs; program p takes the work
    # items w = p, p + P, ... < num_spans[0] * num_splits, w = (instance i, split k), and each instance cuts
    # its own T tokens into num_splits ranges:  tps_i = ceil(ceil(T_i / num_splits) / BLOCK_T) * BLOCK_T
    # (splits starting at or past T_i write an empty partial: lse -inf, a 0).
    # GDC (SpanLaunch.pdl): launched as a dependent of the exact kernel, which makes q_proj; a post-RoPE item waits
    # for it before reading q_proj (_span_attn_item), and every program waits before it exits, so this launch
    # completes after the exact kernel (the merge, a dependent of this one, reads the exact partials too).
    _pdl_trigger(GDC)
    if STATIC:
        w = tl.program_id(0)
        while w < tl.load(num_spans_ptr) * num_splits:
            if PRE_ROPE:
                w = _span_attn_work_item_inlined(
                    w, qp_ptr, cw_ptr, cc_ptr, cf_ptr, bt_ptr, meta_ptr, inst_ptr, thr_ptr, lse_ref_ptr, part_a_ptr,
                    part_lse_ptr, stride_bt, bb_w, bb_c, bb_f, num_splits, scale, softcap, omega, score_thr, q_ptr,
                    cs_ptr, partner_ptr, freq_ptr, sign_ptr, stride_qb, stride_qh, rot_dim, HQ, HQ_PAD, QPT, BLOCK_T,
                    BLOCK_RK, BLOCK_RV, CB, FP8, SOFTCAP, UPDATE, NMETA, PRE_ROPE, G, HKV, D, BLOCK_C, DTYPE, UPCAST,
                    PREC, FP8_SOFT, SCORE, HOLD_Q, BT, FULL, PREFETCH, AHEAD, WSPLIT, GDC)
            else:
                w = _span_attn_work_item(
                    w, qp_ptr, cw_ptr, cc_ptr, cf_ptr, bt_ptr, meta_ptr, inst_ptr, thr_ptr, lse_ref_ptr, part_a_ptr,
                    part_lse_ptr, stride_bt, bb_w, bb_c, bb_f, num_splits, scale, softcap, omega, score_thr, q_ptr,
                    cs_ptr, partner_ptr, freq_ptr, sign_ptr, stride_qb, stride_qh, rot_dim, HQ, HQ_PAD, QPT, BLOCK_T,
                    BLOCK_RK, BLOCK_RV, CB, FP8, SOFTCAP, UPDATE, NMETA, PRE_ROPE, G, HKV, D, BLOCK_C, DTYPE, UPCAST,
                    PREC, FP8_SOFT, SCORE, HOLD_Q, BT, FULL, PREFETCH, AHEAD, WSPLIT, GDC)
    else:
        _span_attn_item(tl.program_id(0), tl.program_id(1), tl.program_id(0) * num_splits + tl.program_id(1),
                        tokens_per_split, qp_ptr, cw_ptr, cc_ptr, cf_ptr, bt_ptr,
                        meta_ptr, inst_ptr, thr_ptr, lse_ref_ptr, part_a_ptr, part_lse_ptr, stride_bt, bb_w, bb_c,
                        bb_f, num_splits, scale, softcap, omega, score_thr, q_ptr, cs_ptr, partner_ptr, freq_ptr,
                        sign_ptr,
                        stride_qb, stride_qh, rot_dim, HQ, HQ_PAD, QPT, BLOCK_T, BLOCK_RK, BLOCK_RV, CB, FP8,
                        SOFTCAP, UPDATE, NMETA, PRE_ROPE, G, HKV, D, BLOCK_C, DTYPE, UPCAST, PREC, FP8_SOFT, SCORE,
                        HOLD_Q, BT, FULL, PREFETCH, AHEAD, WSPLIT, GDC)
    _pdl_wait(GDC)


# --------------------------------------------------------------------------------------
# 3. exact paged decode (flash-decoding split-K, GQA: the g query heads of kv head j together)
#      s[h, n] = scale * <q_h, K[n, j]> (soft-capped), over tokens n < seq_len not inside any span
#      (and seq_len - 1 - n < window); partial out[h] = softmax(s) @ V[:, j], lse[h]
#    The splits cut the row's E exact tokens (_exact_tokens: a long span's positions are never visited, not
#    even to be masked): split k of row b covers exact tokens [k tps_b, (k + 1) tps_b) (_exact_split_tokens
#    of E), at positions n(e). The merge reads splits k < ceil(E / tps_b) only; in the static launch
#    (PER_ROW) a split starting at or past E exits at once and writes nothing, so a row of seq_len 0 (a
#    padding row) has no partial at all (the dynamic launch writes empty partials there: lse -inf).
#    torch: ap_vllm.core.dense.dense_attention
# --------------------------------------------------------------------------------------
@triton.jit
def _exact_tokens(row_spans_ptr, inst_ptr, meta_ptr, L, MAX_SPANS: tl.constexpr, SPANS_PAD: tl.constexpr,
                  NMETA: tl.constexpr):
    # The exact tokens of a row of L tokens: every position not inside one of its spans (row_spans: MAX_SPANS
    # instance ids, -1 = none; span id = inst[id, 0]). Returns their number E = L - sum_i len_i and, per span i,
    # (est_i, len_i): est_i = start_i - sum_{i': start_i' < start_i} len_i' is the number of exact tokens before
    # span i, so exact token e (0 <= e < E, in position order) sits at
    #     n(e) = e + sum_{i: e >= est_i} len_i              (spans in any order, disjoint)
    # and a split of the exact tokens never visits a span's positions.
    i = tl.arange(0, SPANS_PAD)
    ins = tl.load(row_spans_ptr + i, mask=i < MAX_SPANS, other=-1)
    sid = tl.load(inst_ptr + tl.maximum(ins, 0) * 3, mask=ins >= 0, other=0).to(tl.int64)
    st = tl.load(meta_ptr + sid * NMETA + M_START, mask=ins >= 0, other=0).to(tl.int32)
    ln = tl.load(meta_ptr + sid * NMETA + M_T, mask=ins >= 0, other=0).to(tl.int32)
    before = tl.sum(tl.where(st[None, :] < st[:, None], ln[None, :], 0), 1)
    est = tl.where(ins >= 0, st - before, 1 << 30)
    return tl.maximum(L - tl.sum(ln, 0), 0), est, ln


@triton.jit
def _exact_positions(e, est, ln):
    # positions n(e) of exact tokens e [BLOCK_N] (see _exact_tokens)
    return e + tl.sum(tl.where(e[:, None] >= est[None, :], ln[None, :], 0), 1)


@triton.jit
def _exact_split_tokens(L, tokens_per_split, num_splits, BLOCK_N: tl.constexpr, PER_ROW: tl.constexpr):
    # tokens per split of a row of L tokens: the launch's (from max_seq_len), or PER_ROW (static launch)
    #   tps_b = ceil(ceil(L / num_splits) / BLOCK_N) * BLOCK_N   (every row uses all its splits)
    if PER_ROW:
        return tl.maximum(tl.cdiv(tl.cdiv(L, num_splits), BLOCK_N), 1) * BLOCK_N
    else:
        return tokens_per_split


@triton.jit
def _exact_decode_kernel(q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, seq_spans_ptr, inst_ptr, meta_ptr, part_o_ptr,
                         part_lse_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kkv, stride_kt, stride_kh, stride_bt,
                         tokens_per_split, num_splits, scale, softcap, window, k_scale, v_scale,
                         cw_ptr, qp_ptr, bb_w,
                         G: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                         MAX_SPANS: tl.constexpr, SPANS_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
                         WINDOW: tl.constexpr, NMETA: tl.constexpr, UPCAST: tl.constexpr, PER_ROW: tl.constexpr,
                         KV_FP8: tl.constexpr, QPROJ: tl.constexpr, HQ_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                         PREC: tl.constexpr, GDC: tl.constexpr):
    _pdl_trigger(GDC)  # (the span kernel's programs start now; they wait for this launch before reading q_proj)
    b = tl.program_id(0)
    j = tl.program_id(1)
    split = tl.program_id(2)
    if QPROJ:  # launch 1 folded in: the last split (of a VLM row: past its few text tokens, otherwise idle)
        if split == num_splits - 1:  # projects q of kv head j for each span instance of row b (decode: span i)
            for i in tl.static_range(MAX_SPANS):
                ins = tl.load(seq_spans_ptr + b * MAX_SPANS + i)
                if ins >= 0:
                    _span_qproj_item(ins, j, q_ptr, cw_ptr, bt_ptr, meta_ptr, inst_ptr, qp_ptr, stride_qb,
                                     stride_qh, stride_bt, bb_w, G, D, HQ // G * D, HQ_PAD, 1, BLOCK_G, BLOCK_R,
                                     BLOCK_D, NMETA, PREC, UPCAST)
    L = tl.load(seq_lens_ptr + b)
    E, est, ln = _exact_tokens(seq_spans_ptr + b * MAX_SPANS, inst_ptr, meta_ptr, L, MAX_SPANS, SPANS_PAD, NMETA)
    if PER_ROW:  # (static launch) no token of the row in this split: nothing to write
        tokens_per_split = _exact_split_tokens(E, tokens_per_split, num_splits, BLOCK_N, PER_ROW)
        if split * tokens_per_split >= E:
            return
    gg = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    gmask = gg < G
    dmask = dd < D
    q = tl.load(q_ptr + b * stride_qb + (j * G + gg)[:, None] * stride_qh + dd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    e_begin = split * tokens_per_split
    e_end = tl.minimum(E, e_begin + tokens_per_split)
    for e0 in range(e_begin, e_end, BLOCK_N):
        e = e0 + tl.arange(0, BLOCK_N)
        valid = e < e_end
        n = _exact_positions(e, est, ln)
        if WINDOW:  # (sliding-window layers hold no spans: n = e)
            valid = valid & ((L - 1 - n) < window)
        if tl.max(valid.to(tl.int32), 0) > 0:
            blk = tl.load(bt_ptr + b * stride_bt + n // PAGE, mask=valid, other=0).to(tl.int64)
            off = blk * stride_kb + (n % PAGE).to(tl.int64) * stride_kt + j * stride_kh
            kvmask = valid[:, None] & dmask[None, :]
            k = tl.load(kv_ptr + off[:, None] + dd[None, :], mask=kvmask, other=0.0)
            if not KV_FP8:  # V's load issued with K's (FP8 pages: after the scores; held early it spilled)
                v = tl.load(kv_ptr + stride_kkv + off[:, None] + dd[None, :], mask=kvmask, other=0.0)
            if KV_FP8:  # float8 e4m3 pages: K = float(K8) * k_scale, in the queries' dtype
                k = (k.to(tl.float32) * k_scale).to(q.dtype)
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
            if KV_FP8:
                v = tl.load(kv_ptr + stride_kkv + off[:, None] + dd[None, :], mask=kvmask, other=0.0)
                v = (v.to(tl.float32) * v_scale).to(q.dtype)
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
# 4. merge (per row, kv head):  lse = logsumexp_i lse_i,  out = sum_i exp(lse_i - lse) out_i,
#    where a span's partials are first merged in coefficient space and projected once:
#    out_span[h] = a[h] @ B_v[:, j*d:(j+1)*d].      torch: ap_vllm.core.dense.merge_partials
#    Partials are read CH splits at a time ([CH, G, cols] in one load, merged by one log-sum-exp step over
#    the chunk), so a row's 33-64 partials are a few loads in flight, not a chain of one load per split.
# --------------------------------------------------------------------------------------
@triton.jit
def _merge_chunk(m, l, acc, x, o):
    # one log-sum-exp merge step of a running (max m [G], normaliser l [G], unnormalised acc [G, cols]) with a
    # chunk of CH partials of log-normalisers x [CH, G] and normalised outputs o [CH, G, cols]:
    #   m' = max(m, max_c x_c),  l <- l e^(m - m') + sum_c e^(x_c - m'),
    #   acc <- acc e^(m - m') + sum_c e^(x_c - m') o_c          (-inf partials weigh 0; all -inf: stays 0)
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    w = tl.exp(x - m_safe[None, :])
    return m_new, l * alpha + tl.sum(w, 0), acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)


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
def _merge_span_basis(ins, inst_ptr, meta_ptr, cw_ptr, bt_ptr, stride_bt, bb_w, b, j, rv, dd, dmask,
                      W: tl.constexpr, D: tl.constexpr, NMETA: tl.constexpr):
    # a row's span slot holding instance ins (-1: none): the row's index among the instance's rows, and the span's
    # value basis columns of kv head j, B_v[:, j*d:(j+1)*d] as float32 [BLOCK_RV, BLOCK_D] (0 for an empty slot)
    live = ins >= 0
    insc = tl.maximum(ins, 0)
    sid = tl.load(inst_ptr + insc * 3, mask=live, other=0)
    local = b - tl.load(inst_ptr + insc * 3 + 1, mask=live, other=0)
    meta = meta_ptr + sid * NMETA
    seq = tl.load(meta + M_SEQ, mask=live, other=0)
    rvn = tl.load(meta + M_RV, mask=live, other=0)
    sb = tl.load(meta + M_SB, mask=live, other=0)
    bvb = tl.load(meta + M_BV, mask=live, other=0)
    rmask = rv < rvn
    boff = rows_offsets(bt_ptr + seq * stride_bt, sb + bvb, rv, bb_w // W, W, bb_w, rmask)
    bv = tl.load(cw_ptr + boff[:, None] + (j * D + dd)[None, :], mask=rmask[:, None] & dmask[None, :],
                 other=0.0).to(tl.float32)
    return local, bv


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, part_a_ptr, part_alse_ptr, row_inst_ptr, inst_ptr, meta_ptr, cw_ptr,
                  bt_ptr, out_ptr, lse_out_ptr, stride_po_row, stride_po_split, stride_po_head,
                  stride_pl_row, stride_pl_split, stride_ob, stride_oh, stride_bt, bb_w,
                  num_exact_splits, num_span_splits, seq_lens_ptr, exact_tokens_per_split,
                  G: tl.constexpr, HQ: tl.constexpr, HQ_PAD: tl.constexpr, QPT: tl.constexpr, D: tl.constexpr,
                  W: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RV: tl.constexpr,
                  MAX_SPANS: tl.constexpr, SPANS_PAD: tl.constexpr, NMETA: tl.constexpr, PREC: tl.constexpr,
                  EXACT_BY_LEN: tl.constexpr, BLOCK_N: tl.constexpr, PER_ROW: tl.constexpr,
                  CH_E: tl.constexpr, CH_S: tl.constexpr, GDC: tl.constexpr, G_PROG: tl.constexpr,
                  D_SPLIT: tl.constexpr):
    # G_PROG (SpanLaunch.merge_heads): the q heads of kv head j a program merges, heads k*G_PROG ... of the group
    # (program_id 2 = k * D_SPLIT + c); the merge is separable by head, so fewer heads a program mean fewer bytes a
    # chunk and more splits a load (a row's 64 span partials in one load at 1-2 heads, R = 64), at a value-basis
    # read a program. It is separable by output column too: m and l come from the log-sum-exps alone, and program
    # c of D_SPLIT writes columns [c * BLOCK_D, (c + 1) * BLOCK_D) (heads of 512: two programs of 256 columns, whose
    # value-basis tile [BLOCK_RV, BLOCK_D] float32 fits in registers); program 0 writes the lse.
    # EXACT_BY_LEN (decode): row b has exact partials k < ceil(E / tps_b) only (_exact_decode_kernel);
    # otherwise all num_exact_splits are read. CH_E / CH_S: exact / span partials read per chunk.
    # GDC (SpanLaunch.pdl): launched as a dependent of the span kernel; what comes before _pdl_wait reads only
    # the step's metadata and the cache's bases (the first span's value basis, a chain of four dependent loads,
    # is in flight while the span kernel finishes), the partials after it.
    b = tl.program_id(0)
    j = tl.program_id(1)
    hk = tl.program_id(2) // D_SPLIT
    dc = tl.program_id(2) % D_SPLIT
    if EXACT_BY_LEN:  # the row's exact tokens, as _exact_decode_kernel cut them
        E, _est, _ln = _exact_tokens(row_inst_ptr + b * MAX_SPANS, inst_ptr, meta_ptr, tl.load(seq_lens_ptr + b),
                                     MAX_SPANS, SPANS_PAD, NMETA)
        num_exact_splits = tl.minimum(
            tl.cdiv(E, _exact_split_tokens(E, exact_tokens_per_split, num_exact_splits, BLOCK_N, PER_ROW)),
            num_exact_splits)
    gg = tl.arange(0, BLOCK_G)
    dd = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    rv = tl.arange(0, BLOCK_RV)
    ce = tl.arange(0, CH_E)
    cs = tl.arange(0, CH_S)
    gl = hk * G_PROG + gg  # the heads' places in kv head j's group
    gmask = (gg < G_PROG) & (gl < G)
    dmask = dd < D
    heads = j * G + gl
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if GDC:
        ins0 = tl.load(row_inst_ptr + b * MAX_SPANS)
        local0, bv0 = _merge_span_basis(ins0, inst_ptr, meta_ptr, cw_ptr, bt_ptr, stride_bt, bb_w, b, j, rv, dd, dmask,
                                        W, D, NMETA)
        _pdl_wait(GDC)
    for sp0 in range(0, num_exact_splits, CH_E):
        sp = sp0 + ce
        xm = (sp < num_exact_splits)[:, None] & gmask[None, :]
        x = tl.load(part_lse_ptr + b * stride_pl_row + sp[:, None] * stride_pl_split + heads[None, :], mask=xm,
                    other=float("-inf"))
        o = tl.load(part_o_ptr + b * stride_po_row + sp[:, None, None] * stride_po_split
                    + heads[None, :, None] * stride_po_head + dd[None, None, :],
                    mask=xm[:, :, None] & dmask[None, None, :], other=0.0)
        m, l, acc = _merge_chunk(m, l, acc, x, o)
    for i in tl.static_range(MAX_SPANS):
        if GDC and i == 0:  # (loaded before the wait)
            ins = ins0
        else:
            ins = tl.load(row_inst_ptr + b * MAX_SPANS + i)
        if ins >= 0:  # (an empty slot issues nothing more)
            if GDC and i == 0:
                local, bv = local0, bv0
            else:
                # the value basis first: its loads (meta -> block table -> rows) are in flight while partials merge
                local, bv = _merge_span_basis(ins, inst_ptr, meta_ptr, cw_ptr, bt_ptr, stride_bt, bb_w, b, j, rv, dd,
                                              dmask, W, D, NMETA)
            ma = tl.full([BLOCK_G], float("-inf"), tl.float32)
            la = tl.zeros([BLOCK_G], tl.float32)
            aa = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
            for sp0 in range(0, num_span_splits, CH_S):
                sp = sp0 + cs
                base = (ins * num_span_splits + sp).to(tl.int64) * (QPT * HQ_PAD) + local * HQ_PAD  # [CH_S]
                xm = (sp < num_span_splits)[:, None] & gmask[None, :]
                x = tl.load(part_alse_ptr + base[:, None] + heads[None, :], mask=xm, other=float("-inf"))
                a = tl.load(part_a_ptr + (base[:, None, None] + heads[None, :, None]) * BLOCK_RV + rv[None, None, :],
                            mask=xm[:, :, None], other=0.0)
                ma, la, aa = _merge_chunk(ma, la, aa, x, a)
            la_safe = tl.where(la > 0, la, 1.0)
            aa = tl.where(la[:, None] > 0, aa / la_safe[:, None], 0.0)
            o = tl.dot(aa, bv, input_precision=PREC)  # [BLOCK_G, BLOCK_D]
            x = tl.where(la > 0, ma + tl.log(la_safe), float("-inf"))
            m, l, acc = _merge_partial(m, l, acc, x, o)
    l_safe = tl.where(l > 0, l, 1.0)
    out = tl.where(l[:, None] > 0, acc / l_safe[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & dmask[None, :])
    if dc == 0:  # (every column program has the same lse: the first writes it)
        tl.store(lse_out_ptr + b * HQ + heads, tl.where(l > 0, m + tl.log(l_safe), float("-inf")), mask=gmask)


# --------------------------------------------------------------------------------------
# host wrappers (no host syncs: every size below is a Python int the caller already has)
# --------------------------------------------------------------------------------------
def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _pdl_launch(pdl: bool) -> dict:
    # the launch option of a programmatic dependent launch (only when set: the default launch compiles as before)
    return {"launch_pdl": True} if pdl else {}


def fp8_native() -> bool:
    """Whether the GPU the kernels compile for converts float8 e4m3 natively (sm >= 89); on Ampere the span
    kernel reads FP8 coefficients as bytes and decodes them (``_e4m3_to_f32``)."""
    return compiles_for_sm(89)


def _bt_mode(bt_vec: bool, rows_per_block: Sequence[int], block_t: int, bb_f: int) -> int:
    """The span kernel's BT: one block-table read a row (``bt_vec``), else one a tile and section when no tile can
    straddle two blocks (tiles start at multiples of ``block_t``: so do the splits), else two and a select a row."""
    if bt_vec:
        return BT_ROW.value
    one = bool(rows_per_block) and all(r % block_t == 0 for r in rows_per_block) and bb_f % block_t == 0
    return BT_ONE.value if one else BT_PAIR.value


def pdl_supported() -> bool:
    """Whether the kernels compile for a GPU with programmatic dependent launch (CUDA sm_90 or later: the
    ``griddepcontrol`` instructions); never under the interpreter."""
    if _INTERPRET:
        return False
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return target.backend == "cuda" and int(target.arch) >= 90


def _check_pdl(launch: "SpanLaunch") -> bool:
    if launch.pdl and not pdl_supported():
        raise ValueError("SpanLaunch(pdl=True) needs a CUDA GPU of sm_90 or later (programmatic dependent launch, "
                         "griddepcontrol); these kernels run "
                         + ("under the Triton interpreter" if _INTERPRET else "for another target")
                         + ": use pdl=False")
    return bool(launch.pdl)


def _dot_dtype(model_dtype: torch.dtype, fp8: bool, pre_rope: bool) -> torch.dtype:
    """Operand dtype of the span kernel's dots: the model dtype, but float16 for FP8 (e4m3) coefficients of a
    bfloat16 model read natively over post-RoPE spans: e4m3 converts to f16 in one instruction per pair
    (``F2FP.F16.E4M3.UNPACK_B``) and is exact there, while the bf16 operands took a float32 detour (sm_90, Triton
    3.6, full-rank static 128-token tile: 1512 -> 1303 SASS instructions); f16 has 3 more mantissa bits than bf16
    for q_proj and p, and |q_proj| <= |q| (an orthonormal projection), far inside its range. Pre-RoPE spans
    rebuild keys against the model-dtype basis."""
    if fp8 and not pre_rope and model_dtype == torch.bfloat16 and fp8_native():
        return torch.float16
    return model_dtype


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_ROPE_DEVICE = weakref.WeakKeyDictionary()  # rotary table (hashed by identity) -> {device: its tensors}


def _rope_tensors(rope: RopeTable, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """cos_sin (float32 contiguous), partner, freq (int32), sign (float32) on ``dev``; cached per table."""
    per_dev = _ROPE_DEVICE.setdefault(rope, {})
    key = str(dev)
    if key not in per_dev:
        per_dev[key] = (rope.cos_sin.to(dev, torch.float32).contiguous(), rope.partner.to(dev, torch.int32),
                        rope.freq.to(dev, torch.int32), rope.sign.to(dev, torch.float32).contiguous())
    return per_dev[key]


class CacheViews:
    """The layer's cache as the kernels address it: strided K/V for exact tokens, and three typed flat
    views of the same bytes (model dtype: bases; coefficient dtype; float32: scales, importance).
    ``dtype``: the model dtype of the bases, needed when the pages are float8 e4m3 (FP8 KV cache); else
    the cache's own dtype."""

    def __init__(self, kv_cache: torch.Tensor, fp8: bool, dtype: Optional[torch.dtype] = None):
        nblk, two, page, hkv, d = kv_cache.shape
        if two != 2:
            raise ValueError(f"kv_cache must be [num_blocks, 2, block_size, Hkv, d], got {tuple(kv_cache.shape)}")
        # Spans are addressed from the cache's base: each block must be one dense byte range (any dim order
        # inside it); exact K/V are read through the strides, head_size innermost.
        if kv_cache.stride(-1) != 1 or not block_contiguous(kv_cache):
            raise ValueError(f"kv_cache (strides {kv_cache.stride()}) must keep each block in one dense byte range "
                             "with head_size innermost")
        self.kv, self.page, self.hkv, self.d = kv_cache, page, hkv, d
        self.kv_fp8 = kv_cache.dtype == torch.float8_e4m3fn
        if self.kv_fp8 and dtype is None:
            raise ValueError("a float8 e4m3 cache needs the model dtype of the span bases (dtype=...)")
        self.dtype = dtype if self.kv_fp8 else kv_cache.dtype
        self.eb = torch.empty((), dtype=self.dtype).element_size()
        self.cb = 1 if fp8 else self.eb
        self.block_bytes = 2 * page * hkv * d * kv_cache.element_size()
        raw = cache_bytes(kv_cache).view(-1)
        self.w = raw.view(self.dtype)
        self.c = (raw.view(torch.float8_e4m3fn) if fp8_native() else raw) if fp8 else self.w
        self.f = raw.view(torch.float32)
        self.bb_w, self.bb_c, self.bb_f = self.block_bytes // self.eb, self.block_bytes // self.cb, self.block_bytes // 4

    def block_t(self, want: int, key_rank_max: int, value_rank_max: int) -> int:
        """Largest power of two <= want such that a token tile never spans more than two blocks of a section."""
        row = max(-(-key_rank_max * self.cb // SECTOR_BYTES), -(-value_rank_max * self.cb // SECTOR_BYTES), 1)
        rpb = self.block_bytes // (row * SECTOR_BYTES)
        return max(16, min(_pow2_floor(want), _pow2_floor(rpb)))


def scratch(workspace: Optional[dict], name: str, shape: tuple, dtype: torch.dtype, device,
            fill: Optional[float] = None) -> torch.Tensor:
    """A buffer of one call: new, or taken from ``workspace`` (a dict kept by the caller across calls; a
    missing or differently shaped entry is made once), so that every call hands the kernels the same
    storage, as the replay of a captured CUDA graph does. ``fill``: value of a new buffer (read-only ones)."""
    t = None if workspace is None else workspace.get(name)
    if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != torch.device(device):
        t = torch.empty(shape, dtype=dtype, device=device) if fill is None else \
            torch.full(shape, fill, dtype=dtype, device=device)
        if workspace is not None:
            workspace[name] = t
    return t


def static_programs(device: torch.device, num_programs: Optional[int] = None) -> int:
    """Programs of a static (persistent) launch: ``num_programs``, else twice the SM count on CUDA, 4 under the
    interpreter or on other devices."""
    return int(num_programs) if num_programs else _target_programs(device)


@dataclass(frozen=True)
class SpanLaunch:
    """How a call launches the span kernel (launch 2) and aims its splits: tuning only, every value computes
    the same result (``tests/core/test_triton_kernels.py``). None: the default of the case.

    Defaults: decode rows over post-RoPE spans (the bandwidth-bound case) take the FlashDecoding / MLA-decode
    shape: 4 warps over 128-token tiles (64 with score selection, see :meth:`resolved`), two pipeline stages,
    q_proj held in registers, a tile's block-table entries read as scalars, no register cap (4 warps of at most
    255 registers: 2-3 programs per SM), splits of at least 512 tokens. Measured side by side on an H200 (B=8,
    T=32K, R=64 bf16, importance / score selection, ``make gpu-check``,
    ``benchmarks/results/gpu_check_NVIDIA_H200.json``): 80 / 91 us per call (score selection with 128-token
    tiles: 87 us); 64-token tiles 100 us, with one block-table entry per row 124 us; 3 stages 97 us; 8 warps
    113 us; the first default (16 warps over 16-token tiles, one stage, 128 registers) 525 us, 1.7% of DRAM
    bandwidth. Splits of at least 512 tokens (fewer partials for the merge to read one after the other): B=1,
    T=32K 63 us against 94 us with one-tile splits (1024: 76 us, 2048: 117 us), B=8 unchanged. Compiled for
    sm_80/sm_90 (``benchmarks/aot_compile.py``) every variant loads coefficient rows with 16-byte vectors, copies
    the next tile asynchronously and spills nothing. Pre-RoPE spans (keys rebuilt: compute-bound) and prefill
    instances: 8 warps over 16-token tiles, one stage, no cap. The interpreter takes 64-token tiles (it
    runs one tile per Python step). ``make gpu-check`` times the alternatives side by side
    (``benchmarks/gpu_check.py``, ``span_configs``).

    Those timings predate three changes measured only by compiling (sm_90, Triton 3.6): the chunked merge
    (``merge_splits``), the query projection inside the exact kernel (``qproj_in_exact``), and a token loop
    without the per-component mask and with a one-instruction exp2 (the full-rank 128-token tile: 1575 -> 804
    SASS instructions, 209 -> 163 registers; then 757 and 128 with an int32 token index); ``make gpu-check`` times
    each against its predecessor, ``warp_split`` against the 2-D loop, and ``pdl`` (programmatic dependent launch)
    against launches that wait for each other's end. Read off the compiled code since: the default 2-D loop never
    overlapped a tile's copies with the compute (one tile buffer, ``cp.async.wait_group 0`` at the top of each
    tile: its rows hang on a block-table read of the same iteration); ``bt_ahead`` with 3 stages keeps two buffers
    and the next tile's copies in flight (``wait_group 2``), timed first by ``make gpu-check``; ``bt_chunk`` reads
    the block-table entries of a run of tiles before it, so no block-table read is left in the loop, and gives
    ``warp_split`` (one tile buffer on its own) two buffers as well."""

    block_t: Optional[int] = None  # token tile (a power of two; capped so a tile touches at most two blocks)
    warps: Optional[int] = None
    stages: Optional[int] = None  # software pipelining of the token loop
    hold_q: Optional[bool] = None  # q_proj loaded once into registers in the dot's dtype (post-RoPE), not per tile
    bt_vec: Optional[bool] = None  # one block-table entry per row (a tensor load), not the tile's scalar entries
    maxnreg: Optional[int] = None  # register cap of post-RoPE decode (0: none)
    block_c: int = 32  # pre-RoPE: head columns rebuilt at a time
    split_target: Optional[int] = None  # programs the splits of a decode call aim at (None: 2 x SMs)
    split_tokens: Optional[int] = None  # at least this many span tokens per split (None: one tile)
    # full-rank decode (value_selection 'full', post-RoPE): the next tile's loads issued into registers before
    # this tile is computed (launch it with stages=1); other calls ignore it
    prefetch: bool = False
    # full-rank decode (as prefetch; not with it): each warp takes its own tokens of a tile with its own running max,
    # sum and accumulator (batched dots), merged across the warps once per split: no shared-memory round trip or
    # barrier per tile for the row max and sum, no relayout of p (the 2-D dot spreads a tile's tokens over the warps)
    warp_split: bool = False
    # full-rank decode (as prefetch; not with it nor warp_split), over tiles read from one block (the plan's rows per
    # block allow it; otherwise the 2-D loop): the block-table reads a tile ahead of the row loads, so Triton's
    # pipeliner sees a direct load; with stages=3 two tile buffers, tile i + 1's copies in flight while tile i is
    # computed (the 2-D loop waits for every copy at the top of each tile at any stage count)
    bt_ahead: bool = False
    # with bt_ahead or warp_split, over tiles read from one block: the block-table entries of this many token tiles
    # (a power of two, 2-64) read by one vector load before a pipelined run over them, so the run's loop reads no
    # block table (0: bt_ahead reads one tile ahead, carried, and its read of tile i + 2's entries sits between tile
    # i's compute and tile i + 2's copies; warp_split reads a tile's entries in its own iteration, so its rows hang
    # on that read and the pipeliner keeps one tile buffer)
    bt_chunk: int = 0
    # the merge (launch 4) reads this many split partials per load (a power of two; None: merge_chunks' default,
    # 8 span / 4 exact partials at G <= 16, R = 64, d = 128; 1: one partial after the other)
    merge_splits: Optional[int] = None
    # the merge's q heads a program (None: every head of a kv head, G; fewer: G / merge_heads times the programs,
    # each reading its heads' partials only, so a load holds more splits: at R = 64, 16 span partials at 8 heads
    # (Qwen2.5-VL's G = 7), 64 at 2, so a row's 64 splits of a 32K-token span in one load; each program reads its kv
    # head's value basis)
    merge_heads: Optional[int] = None
    # decode over post-RoPE spans: the query projection (launch 1) made by the exact kernel's last split of each
    # (row, kv head), idle past a VLM row's few text tokens (None: yes; False: its own launch)
    qproj_in_exact: Optional[bool] = None
    # decode calls on sm_90 and later: programmatic dependent launch. The span kernel and the merge are launched
    # as dependents of the launch before them (griddepcontrol): their programs start while it finishes, and wait
    # for it only where they read what it wrote (q_proj; the partials). The first span value basis of the merge is
    # loaded before its wait. Prefill calls launch as before.
    pdl: bool = False

    def resolved(self, decode_post_rope: bool, tight: bool = False, score: bool = False,
                 fp8_warp_split: bool = False) -> "SpanLaunch":
        """Every field set: this launch's values, the case's defaults for those left None (block_t on the GPU;
        the interpreter's tile is 64 and it has no registers). ``tight``: a decode case whose 64-token tiles
        spill at 255 registers with Triton 3.6 (R > 64; FP8 coefficients at R <= 32): 32-token tiles there.
        ``score``: values selected by this step's scores, whose 128-token tiles spill 40-160 bytes with Triton 3.9
        (none with 3.6, where they ran 4% faster than 64 on an H200): 64-token tiles. ``fp8_warp_split``: the
        full-rank read of FP8 coefficients with each warp's own tokens (``warp_split``), whose 128-token tiles
        spill 52 / 68 bytes at 255 registers on sm_90 with Triton 3.6 / 3.9 (``benchmarks/aot_compile.py``):
        64-token tiles. The interpreter keeps one-tile splits (the tests' short spans still take several splits)."""
        if decode_post_rope:
            tile = 64 if _INTERPRET else 32 if tight else 64 if score or fp8_warp_split else 128
            d = dict(block_t=tile, warps=4, stages=2, hold_q=True, bt_vec=False, maxnreg=0,
                     split_tokens=None if _INTERPRET else 512)
        else:
            d = dict(block_t=64 if _INTERPRET else 16, warps=8, stages=1, hold_q=False, bt_vec=False, maxnreg=0)
        return replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})

    def overrides(self) -> dict:
        """The fields that differ from the defaults (what a benchmark row records)."""
        default = SpanLaunch()
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) != getattr(default, f)}


def span_partials(q: torch.Tensor, cache: CacheViews, bt: torch.Tensor, meta: torch.Tensor, thresholds: torch.Tensor,
                  inst: torch.Tensor, num_inst: int, qpt: int, scale: float, *, max_span_tokens: int,
                  key_rank_max: int, value_rank_max: int, fp8: bool, softcap: Optional[float] = None,
                  lse_ref: Optional[torch.Tensor] = None, importance_ema: Optional[float] = None,
                  rope: Optional[RopeTable] = None, num_span_splits: Optional[int] = None,
                  launch: SpanLaunch = SpanLaunch(), span_kernel: str = "triton",
                  num_spans: Optional[torch.Tensor] = None, num_programs: Optional[int] = None,
                  workspace: Optional[dict] = None, score_threshold: Optional[float] = None,
                  full_rank: bool = False, qp: Optional[torch.Tensor] = None, pdl: bool = False,
                  rows_per_block: Sequence[int] = ()):
    """Launches 1 + 2 over ``num_inst`` span instances (``inst`` int32 [num_inst, 3]: span id, first query
    row, rows). Returns part_a [I, splits, qpt * HQ_PAD, BRV], part_alse [I, splits, qpt * HQ_PAD], splits.
    ``qp``: the query projection [I, qpt * HQ_PAD, BRK] float32 already made (post-RoPE; the decode call's exact
    kernel makes it, :func:`paged_mixed_decode_triton`): launch 1 is skipped.

    ``num_spans`` (int32 device tensor [1], decode instances only): the static launch. ``num_inst`` is then
    the capacity S_cap (instances i < num_spans[0] are read, the rest never), splits per instance
    ``min(ceil(target / B), ceil(max_span_tokens / BLOCK_T))`` (B = q.shape[0]; ``max_span_tokens`` a cap),
    each instance's tokens per split computed on the device from its own T, and both launches run
    :func:`static_programs` programs looping over the work; buffers come from ``workspace``.

    ``score_threshold`` (decode instances, Triton kernel): score selection of the values, normalised by
    ``lse_ref`` [B, Hq] (required; +inf rows read every token at full rank); no importance is read.
    ``full_rank``: every span of the call reads every token at full rank (its threshold -inf: prefill
    instances, value_selection 'full'): the kernel then reads no importance to decide it (with the update it
    still reads and writes it), so no load of its token loop waits on loaded data.
    ``launch``: tile, warps, stages, register cap, ... (:class:`SpanLaunch`). ``pdl``: launch 2 as a programmatic
    dependent of the launch before it (the caller checked :func:`pdl_supported`), launch 1 signalling it.
    ``rows_per_block``: rows per block of the coefficient sections of every span the call may read
    (``DecodePlan.rows_per_block``); when each is a multiple of the token tile (and so are the float32 sections'),
    no tile straddles two blocks and the kernel reads one block-table entry a tile and section (``BT_ONE``)."""
    hq, d = q.shape[1], q.shape[2]
    hkv = cache.hkv
    g = hq // hkv
    dev = q.device
    hq_pad = _pow2(hq, 1)
    rows = qpt * hq_pad
    brk, brv = _pow2(key_rank_max), _pow2(value_rank_max)
    update = importance_ema is not None
    static = num_spans is not None
    score = score_threshold is not None
    if update and qpt != 1:
        raise ValueError("the importance update runs for decode rows only (one query per instance)")
    if score and (qpt != 1 or span_kernel != "triton" or lse_ref is None or update):
        raise ValueError("score selection reads decode instances with the Triton kernel, needs lse_ref and keeps "
                         "no importance (importance_ema None)")
    if score and full_rank:
        raise ValueError("score selection reads values at two levels: not with full_rank")
    if static and (qpt != 1 or span_kernel != "triton"):
        raise ValueError("the static span launch reads decode instances with the Triton kernel only")
    pre_rope = rope is not None
    # Decode over post-RoPE spans is a bandwidth kernel (SpanLaunch.resolved: 4 warps over 128-token tiles, two
    # stages: the next tile's rows are in flight while this one is scored); pre-RoPE spans rebuild keys
    # (compute-bound) and prefill instances (QPT rows) read each span once per QPT queries: 8 warps, no cap.
    # (the full-rank read with nothing read to decide or update: prefetch and warp_split apply to it only; warp_split
    # needs q held, which resolved() gives decode rows over post-RoPE spans unless hold_q says otherwise)
    plain_full = bool(full_rank and not update and not score and not pre_rope)
    hold_q = launch.hold_q if launch.hold_q is not None else qpt == 1 and not pre_rope
    wsplit = bool(launch.warp_split and plain_full and hold_q)
    launch = launch.resolved(qpt == 1 and not pre_rope, tight=max(brk, brv) > 64 or (fp8 and brk <= 32), score=score,
                             fp8_warp_split=fp8 and wsplit)
    bt_ = cache.block_t(launch.block_t, key_rank_max, value_rank_max)
    prec = "ieee" if cache.dtype == torch.float32 else "tf32"
    programs = static_programs(dev, num_programs)
    ws = workspace if static else None
    nsp = num_spans if static else thresholds  # (pointer unused by the dynamic launch)
    if pre_rope:  # scores in head space (2b): no query projection
        qp = scratch(ws, "qp_unused", (1,), torch.float32, dev, fill=0.0)
        cos_sin, partner, freq, sign = _rope_tensors(rope, dev)
    elif qp is not None:
        assert tuple(qp.shape) == (num_inst, rows, brk) and qp.dtype == torch.float32, (qp.shape, qp.dtype)
        cos_sin = partner = freq = sign = qp  # (unused without rope)
    else:
        qp = scratch(ws, "qp", (num_inst, rows, brk), torch.float32, dev)
        _span_qproj_kernel[(min(programs, num_inst), hkv) if static else (num_inst, hkv)](
            q, cache.w, bt, meta, inst, qp, nsp, q.stride(0), q.stride(1), bt.stride(0), cache.bb_w,
            G=g, D=d, W=hkv * d, HQ_PAD=hq_pad, QPT=qpt, BLOCK_G=_pow2(g, 1), BLOCK_R=brk, BLOCK_D=_pow2(d),
            NMETA=NUM_META, PREC=prec, UPCAST=_INTERPRET, STATIC=static, GDC=pdl,
            num_warps=8 if brk * _pow2(d) >= 16384 else 4, num_stages=1)  # (static: no copies in flight)
        cos_sin = partner = freq = sign = qp  # (unused without rope)
    target = launch.split_target or _target_programs(dev)
    per_split = max(bt_, launch.split_tokens or 0)  # (fewer, longer splits: fewer partials for the merge)
    if static:  # splits from shapes only; tokens per split of each instance on the device
        ss = num_span_splits or max(1, min(triton.cdiv(target, max(q.shape[0], 1)),
                                           triton.cdiv(max_span_tokens, per_split)))
        tps = 0
    else:
        ss = num_span_splits or max(1, min(triton.cdiv(target, max(num_inst, 1)),
                                           triton.cdiv(max_span_tokens, per_split)))
        tps = triton.cdiv(triton.cdiv(max_span_tokens, ss), bt_) * bt_
        ss = triton.cdiv(max_span_tokens, tps)
    part_a = scratch(ws, "part_a", (num_inst, ss, rows, brv), torch.float32, dev)
    part_alse = scratch(ws, "part_alse", (num_inst, ss, rows), torch.float32, dev)
    lref = lse_ref.float().contiguous() if update or score else part_alse
    if span_kernel == "cuda":  # the CUDA C++ implementation of launch 2 (decode instances, post-RoPE)
        from ap_vllm.kernels.cuda_span import span_decode_cuda

        if qpt != 1:
            raise ValueError("the CUDA span kernel reads decode instances (one query row) only")
        span_decode_cuda(qp, cache_bytes(cache.kv), bt, meta, thresholds, lse_ref if update else None, part_a,
                         part_alse, tokens_per_split=tps, scale=scale, softcap=softcap, omega=float(importance_ema or 0),
                         hq=hq, hq_pad=hq_pad, brk=brk, brv=brv, fp8=fp8, update=update, dtype=cache.dtype,
                         inst=inst, pre_rope=pre_rope)
        return part_a, part_alse, ss
    if wsplit and fp8 and not fp8_native():
        raise ValueError("SpanLaunch(warp_split=True) with FP8 coefficients needs native e4m3 (sm_89 or later): "
                         "decoding them in software spills (255 registers and 256 bytes on sm_80)")
    if wsplit and launch.bt_vec:
        raise ValueError("SpanLaunch: warp_split reads a tile's block-table entries as scalars; not with bt_vec")
    if launch.warp_split and launch.prefetch:
        raise ValueError("SpanLaunch: warp_split and prefetch are two ways of the full-rank read; choose one")
    if launch.bt_chunk and (not (launch.bt_ahead or launch.warp_split) or launch.bt_chunk not in (2, 4, 8, 16, 32, 64)):
        raise ValueError(f"SpanLaunch(bt_chunk={launch.bt_chunk!r}): the block-table entries of that many tiles "
                         "at once, a way of bt_ahead=True or warp_split=True, is a power of two from 2 to 64 (0: one "
                         "tile ahead with bt_ahead, in the tile's own iteration with warp_split)")
    if launch.bt_ahead and (launch.prefetch or launch.warp_split):
        raise ValueError("SpanLaunch(bt_ahead=True) is the pipelined full-rank read; prefetch (which reads the "
                         "block table a tile ahead too) and warp_split are other ways of it: choose one")
    if wsplit and (bt_ // launch.warps < 16 or bt_ % launch.warps):
        raise ValueError(f"SpanLaunch(warp_split=True): a tile of {bt_} tokens over {launch.warps} warps leaves "
                         "fewer than 16 tokens a warp (the dot's smallest side); use a larger block_t or fewer warps")
    if _INTERPRET:
        regs = {}
    elif pre_rope or qpt > 1:  # no register cap, said explicitly (left to itself ptxas aims at 128 registers for
        regs = {"maxnreg": 255}  # occupancy and spills: 56 bytes for pre-RoPE R=32 with Triton 3.6)
    else:
        regs = {"maxnreg": int(launch.maxnreg)} if launch.maxnreg else {}
    _span_attn_kernel[(min(programs, num_inst * ss),) if static else (num_inst, ss)](
        qp, cache.w, cache.c, cache.f, bt, meta, inst, thresholds, lref, part_a, part_alse, nsp,
        bt.stride(0), cache.bb_w, cache.bb_c, cache.bb_f, tps, ss, float(scale), float(softcap or 1.0),
        float(importance_ema or 0.0), float(score_threshold or 1.0),
        q, cos_sin, partner, freq, sign, q.stride(0), q.stride(1), rope.rotary_dim if pre_rope else 2,
        HQ=hq, HQ_PAD=hq_pad, QPT=qpt, BLOCK_T=bt_, BLOCK_RK=brk, BLOCK_RV=brv, CB=cache.cb, FP8=fp8,
        SOFTCAP=bool(softcap), UPDATE=update, NMETA=NUM_META, PRE_ROPE=pre_rope, G=g, HKV=hkv, D=d,
        BLOCK_C=min(_pow2(launch.block_c), _pow2(d)), DTYPE=_TL_DTYPE[_dot_dtype(cache.dtype, fp8, pre_rope)],
        UPCAST=_INTERPRET, PREC=prec,
        FP8_SOFT=fp8 and not fp8_native(), SCORE=score, HOLD_Q=launch.hold_q and not pre_rope,
        BT=_bt_mode(launch.bt_vec, rows_per_block, bt_, cache.bb_f), FULL=bool(full_rank), STATIC=static,
        PREFETCH=bool(launch.prefetch and plain_full),
        AHEAD=(launch.bt_chunk or 1) if launch.bt_ahead and plain_full else launch.bt_chunk if wsplit else 0,
        WSPLIT=launch.warps if wsplit else 1, GDC=pdl, num_warps=launch.warps,
        num_stages=launch.stages, **regs, **_pdl_launch(pdl))
    return part_a, part_alse, ss


# partial elements one merge load reads at most ([CH, G, cols] float32: 32 registers a thread over 8 warps; 16384
# spilled 24-208 bytes at R = 128 and d = 256 in the static launch)
MERGE_CHUNK_ELEMS = 8192
# output columns of one merge program: heads of 512 (Gemma 4's global layers) are merged by two programs of 256
# columns; one program of 512 held a [128, 512] float32 value basis and spilled 1168 bytes (static, sm_90)
MERGE_MAX_COLUMNS = 256
# value-basis elements (R x d, padded) of a merge program whose group of q heads pads to 16 rows (as measured); with a
# larger basis the group pads to a power of two from 1 (R = 128 and d = 256, Qwen3.5's softmax layers at the qwen3_vl
# preset's rank, 4 heads a group: the static launch's merge spilled 428 bytes at 255 registers padded to 16, none at
# 244 padded to 4, sm_90, Triton 3.6; 16 warps took 232 registers, more than an SM has for them)
MERGE_BASIS_ELEMS_PAD16 = 16384


def merge_group_rows(g: int, g_prog: int, block_rv: int, block_d: int) -> int:
    """Rows of a merge program's tiles for ``g_prog`` of a kv head's ``g`` q heads: the whole group pads to 16
    (to a power of two from 1 when its value basis, ``block_rv x block_d``, passes :data:`MERGE_BASIS_ELEMS_PAD16`),
    a part of it to a power of two from 1 (``tl.dot`` takes M >= 1 on NVIDIA)."""
    whole = g_prog == g and block_rv * block_d <= MERGE_BASIS_ELEMS_PAD16
    return _pow2(g) if whole else _pow2(g_prog, 1)


def merge_chunks(exact_splits: int, span_splits: int, block_g: int, block_d: int, block_rv: int,
                 merge_splits: Optional[int] = None) -> tuple[int, int]:
    """Splits the merge reads per load, (exact, span): ``merge_splits`` (a power of two; 1 is the merge one
    partial after the other), else as many as :data:`MERGE_CHUNK_ELEMS` allows; never more than the splits
    rounded up to a power of two."""
    if merge_splits is not None and (merge_splits < 1 or merge_splits & (merge_splits - 1)):
        raise ValueError(f"merge_splits must be a power of two >= 1, got {merge_splits}")

    def one(n: int, cols: int) -> int:
        cap = merge_splits or _pow2_floor(max(1, MERGE_CHUNK_ELEMS // (block_g * cols)))
        return max(1, min(_pow2(n, 1), cap))

    return one(exact_splits, block_d), one(span_splits, block_rv)


def merge_partials_triton(cache: CacheViews, bt: torch.Tensor, meta: torch.Tensor, inst: torch.Tensor,
                          row_inst: torch.Tensor, part_o: torch.Tensor, part_lse: torch.Tensor,
                          part_a: torch.Tensor, part_alse: torch.Tensor, num_span_splits: int, qpt: int,
                          out: torch.Tensor, hq: int, value_rank_max: int, *, seq_lens: Optional[torch.Tensor] = None,
                          exact_tokens_per_split: int = 0, block_n: int = 16, per_row: bool = False,
                          lse_out: Optional[torch.Tensor] = None, merge_splits: Optional[int] = None,
                          merge_heads: Optional[int] = None, pdl: bool = False) -> torch.Tensor:
    """Launch 4: part_o [rows, splits, Hq, >= d] and part_lse [rows, splits, Hq] (any row/split strides)
    merged with each row's span instances (``row_inst`` [rows, MAX] int32, -1 padded). Returns lse [rows, Hq]
    (``lse_out`` if given). ``seq_lens`` (decode partials of :func:`_exact_decode_kernel`): row b reads its
    splits k < ceil(E_b / tps_b) only, E_b its exact tokens (seq_lens[b] less its spans' tokens),
    tps_b = ``exact_tokens_per_split`` or, ``per_row``, from E_b and ``block_n``. ``merge_splits``: partials
    read per load (a power of two; None: :func:`merge_chunks`). ``merge_heads``: q heads a program merges (None:
    every head of its kv head; at most that many are used). ``pdl``: a programmatic dependent launch of the
    launch before it (the caller checked :func:`pdl_supported`)."""
    nrows = part_o.shape[0]
    hkv, d = cache.hkv, cache.d
    g = hq // hkv
    lse = torch.empty(nrows, hq, dtype=torch.float32, device=out.device) if lse_out is None else lse_out
    if nrows == 0:
        return lse
    assert part_o.stride(-1) == 1 and part_lse.stride(-1) == 1
    assert lse.shape == (nrows, hq) and lse.dtype == torch.float32 and lse.is_contiguous()
    if merge_heads is not None and merge_heads < 1:
        raise ValueError(f"merge_heads must be >= 1 (q heads a merge program takes), got {merge_heads}")
    g_prog = min(merge_heads or g, g)
    d_split = max(1, _pow2(d) // MERGE_MAX_COLUMNS)  # (output columns a program: at most MERGE_MAX_COLUMNS)
    block_d = _pow2(d) // d_split
    block_g = merge_group_rows(g, g_prog, _pow2(value_rank_max), block_d)
    ch_e, ch_s = merge_chunks(part_o.shape[1], num_span_splits, block_g, block_d, _pow2(value_rank_max),
                              merge_splits)
    _merge_kernel[(nrows, hkv, triton.cdiv(g, g_prog) * d_split)](
        part_o, part_lse, part_a, part_alse, row_inst, inst, meta, cache.w, bt, out, lse,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), bt.stride(0), cache.bb_w, part_o.shape[1], num_span_splits,
        part_lse if seq_lens is None else seq_lens, int(exact_tokens_per_split),
        G=g, HQ=hq, HQ_PAD=_pow2(hq, 1), QPT=qpt, D=d, W=hkv * d, BLOCK_G=block_g, BLOCK_D=block_d,
        BLOCK_RV=_pow2(value_rank_max), MAX_SPANS=row_inst.shape[1], SPANS_PAD=_pow2(row_inst.shape[1], 1),
        NMETA=NUM_META,
        PREC="ieee" if cache.dtype == torch.float32 else "tf32", EXACT_BY_LEN=seq_lens is not None,
        BLOCK_N=block_n, PER_ROW=per_row, CH_E=ch_e, CH_S=ch_s, GDC=pdl, G_PROG=g_prog, D_SPLIT=d_split,
        num_warps=8, **_MERGE_REGS,
        **_pdl_launch(pdl))
    return lse


def decode_instances(meta: torch.Tensor) -> torch.Tensor:
    """Span instances of a decode step: span s read once by its sequence's single query row."""
    s = meta.shape[0]
    ar = torch.arange(s, dtype=torch.int32, device=meta.device)
    return torch.stack([ar, meta[:, META["seq"]].to(torch.int32), torch.ones_like(ar)], dim=1).contiguous()


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
    launch: SpanLaunch = SpanLaunch(),
    block_n: Optional[int] = None,
    num_span_splits: Optional[int] = None,
    num_exact_splits: Optional[int] = None,
    rope: Optional[RopeTable] = None,
    inst: Optional[torch.Tensor] = None,
    span_kernel: str = "triton",
    num_spans: Optional[torch.Tensor] = None,
    num_programs: Optional[int] = None,
    workspace: Optional[dict] = None,
    lse_out: Optional[torch.Tensor] = None,
    kv_scales: Optional[tuple[float, float]] = None,
    score_threshold: Optional[float] = None,
    full_rank: bool = False,
    rows_per_block: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the four kernels for one query per row; see :func:`ap_vllm.core.paged_decode.paged_mixed_decode`.
    ``launch``: how the span kernel is launched and the splits aimed (:class:`SpanLaunch`).

    ``importance_ema`` not None: importance of every span is updated in place, normalised by
    ``lse_ref`` [B, Hq] (required then). Returns out [B, Hq, d] and lse [B, Hq] (float32; written into
    ``out`` / ``lse_out`` when given). ``rope``: every span of the call holds pre-RoPE keys rotated with
    this table (one layer); ``launch.block_c`` is then the width of the head-column chunks rebuilt at a time.
    ``inst``: the decode instances (:func:`decode_instances`), if the caller keeps them per step.
    ``score_threshold``: score selection of the values (``lse_ref`` [B, Hq] required, +inf rows: full rank;
    ``importance_ema`` None; ``thresholds`` not read). ``full_rank``: every span reads every token at full
    rank (its threshold -inf; the caller knows it from the spans, the kernel then does not read ``thresholds``
    nor, without the update, the importance; not with ``score_threshold``). ``rows_per_block``: as
    :func:`span_partials` (``DecodePlan.rows_per_block``).

    Static launch (``num_spans``, an int32 device tensor [1]): every grid and scalar argument depends on
    shapes and host ints fixed per padded batch only, never on the step's data, so a captured CUDA graph
    replays it for any content of the same tensors. ``meta`` / ``thresholds`` hold S_cap >= num_spans[0]
    rows (rows past it are never read); ``seq_spans`` lists span ids < num_spans[0] only;
    ``max_seq_len`` and ``max_span_tokens`` are caps (e.g. the model's maximum length). Spans: a fixed
    grid of :func:`static_programs` programs (``num_programs``) loops over (span, split) up to
    num_spans[0] * splits, splits per span fixed by B and ``max_span_tokens``, tokens per split from each
    span's own T. Exact tokens: grid (B, Hkv, splits from ``max_seq_len``), row b cutting its own
    seq_lens[b] tokens into the splits; a split past the row's end exits at once, and a row of
    seq_len 0 (padding) gets out 0, lse -inf and writes nothing else. ``workspace``: a dict kept across
    calls holding the scratch buffers (:func:`scratch`).
    """
    bsz, hq, d = q.shape
    nblk, two, page, hkv, d2 = kv_cache.shape
    assert two == 2 and d2 == d and hq % hkv == 0
    g = hq // hkv
    dev = q.device
    static = num_spans is not None
    span_rows = meta.shape[0]  # spans (dynamic) or span capacity S_cap (static)
    if static:
        if num_spans.numel() != 1 or num_spans.dtype not in (torch.int32, torch.int64) or num_spans.device != dev:
            raise ValueError("num_spans must be an integer tensor [1] on the queries' device")
        if span_kernel != "triton":
            raise ValueError("the static launch runs the Triton span kernel")
        if thresholds.shape[0] < span_rows:
            raise ValueError(f"{thresholds.shape[0]} thresholds for a span capacity of {span_rows}")
    ws = workspace if static else None
    max_spans = seq_spans.shape[1] if seq_spans.numel() else 1
    if span_rows == 0:
        seq_spans = scratch(ws, "seq_spans_none", (bsz, 1), torch.int32, dev, fill=-1)
        max_spans = 1
    if span_rows and window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    update = importance_ema is not None and span_rows > 0
    if update and lse_ref is None:
        raise ValueError("importance update needs lse_ref (the previous step's lse, [B, Hq])")
    score = score_threshold is not None and span_rows > 0
    if score and (lse_ref is None or importance_ema is not None):
        raise ValueError("score selection needs lse_ref (the previous step's lse, [B, Hq]; +inf rows read full "
                         "rank) and keeps no importance (importance_ema None)")
    if rope is not None:
        if rope.head_size != d:
            raise ValueError(f"rope table has head_size {rope.head_size}, the cache has head_size {d}")
        _rope_tensors(rope, dev)  # device copies made once (also without spans: a warm-up before graph capture)
    q = q.contiguous()
    cache = CacheViews(kv_cache, fp8, q.dtype)
    ks, vs = kv_scales or (1.0, 1.0)
    bt = block_table.contiguous()
    block_g, block_d = _pow2(g), _pow2(d)
    target = launch.split_target or _target_programs(dev)
    pdl = _check_pdl(launch)

    if span_rows:
        if inst is None:
            inst = decode_instances(meta)
            if static and ws is not None:  # the same storage every call
                inst = scratch(ws, "inst", tuple(inst.shape), torch.int32, dev).copy_(inst)
    else:
        inst = scratch(ws, "inst_none", (1, 3), torch.int32, dev, fill=0)
    # launch 1 (the query projection) folded into the exact launch, which then runs first: post-RoPE spans
    qproj = bool(span_rows) and rope is None and launch.qproj_in_exact is not False
    hq_pad, brk = _pow2(hq, 1), _pow2(key_rank_max)
    qp = scratch(ws, "qp", (span_rows, hq_pad, brk), torch.float32, dev) if qproj else None

    # 3: exact tokens (key tiles of 8K elements: 64 keys at d=128, 32 at d=256); splits from max_seq_len;
    # static: each row cuts its own seq_len into them (on the device)
    block_n = block_n or max(16, min(64, 8192 // block_d))
    se = num_exact_splits or max(1, min(triton.cdiv(target, bsz * hkv), triton.cdiv(max_seq_len, block_n)))
    if static:
        tpe = 0
    else:
        tpe = triton.cdiv(triton.cdiv(max(max_seq_len, 1), se), block_n) * block_n
        se = max(1, triton.cdiv(max_seq_len, tpe))
    part_o = scratch(ws, "part_o", (bsz, se, hq, block_d), torch.float32, dev)
    part_lse = scratch(ws, "part_lse", (bsz, se, hq), torch.float32, dev)
    meta_arg = meta if span_rows else scratch(ws, "meta_none", (1, NUM_META), torch.int64, dev, fill=0)
    _exact_decode_kernel[(bsz, hkv, se)](
        q, kv_cache, bt, seq_lens, seq_spans, inst, meta_arg, part_o, part_lse,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        bt.stride(0), tpe, se, float(scale), float(softcap or 1.0), int(window or 0), float(ks), float(vs),
        cache.w, part_lse if qp is None else qp, cache.bb_w, G=g, HQ=hq, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, PAGE=page, MAX_SPANS=max_spans,
        SPANS_PAD=_pow2(max_spans, 1), SOFTCAP=bool(softcap), WINDOW=window is not None, NMETA=NUM_META,
        UPCAST=_INTERPRET, PER_ROW=static, KV_FP8=cache.kv_fp8, QPROJ=qproj, HQ_PAD=hq_pad, BLOCK_R=brk,
        PREC="ieee" if cache.dtype == torch.float32 else "tf32", GDC=pdl,
        num_warps=8 if block_d >= 256 else 4, **(_MAXNREG if static and block_d <= 256 else {}))

    # 1 + 2: spans
    if span_rows:
        part_a, part_alse, ss = span_partials(
            q, cache, bt, meta, thresholds, inst, span_rows, 1, scale, max_span_tokens=max_span_tokens,
            key_rank_max=key_rank_max, value_rank_max=value_rank_max, fp8=fp8, softcap=softcap,
            lse_ref=lse_ref if update or score else None, importance_ema=importance_ema if update else None,
            score_threshold=score_threshold if score else None, rope=rope, num_span_splits=num_span_splits,
            launch=launch, span_kernel=span_kernel, num_spans=num_spans, num_programs=num_programs, workspace=ws,
            full_rank=full_rank, qp=qp, pdl=pdl, rows_per_block=rows_per_block)
    else:
        ss = 1
        part_a = part_alse = scratch(ws, "part_none", (1,), torch.float32, dev, fill=0.0)

    # 4: merge
    if out is None:
        out = torch.empty(bsz, hq, d, dtype=torch.float32, device=dev)
    lse = merge_partials_triton(cache, bt, meta_arg, inst, seq_spans, part_o, part_lse, part_a, part_alse, ss, 1,
                                out, hq, value_rank_max, seq_lens=seq_lens, exact_tokens_per_split=tpe,
                                block_n=block_n, per_row=static, lse_out=lse_out, merge_splits=launch.merge_splits,
                                merge_heads=launch.merge_heads, pdl=pdl)
    return out, lse


def paged_prefill_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    plan,
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    rope: Optional[RopeTable] = None,
    block_m: int = 16,
    block_n: int = 32,
    launch: SpanLaunch = SpanLaunch(),
    kv_scales: Optional[tuple[float, float]] = None,
    reach: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of any query length: the exact kernel over every key outside the compacted spans, the
    spans by instances (launches 1-2, full rank), merged per row (launch 4). ``plan``: a
    :class:`ap_vllm.core.paged_decode.PrefillPlan` or None. ``reach``: the last key position of each query
    (the exact kernel's; compacted spans precede every query). Returns out [Nq, Hq, d], lse [Nq, Hq]."""
    nq, hq, d = q.shape
    spans = plan is not None and len(plan.spans) > 0
    if not spans:
        return paged_exact_attention_triton(q, kv_cache, block_table, query_start_loc, seq_lens, scale,
                                            max_query_len=max_query_len, max_seq_len=max_seq_len, softcap=softcap,
                                            window=window, out=out, block_m=block_m, block_n=block_n,
                                            kv_scales=kv_scales, reach=reach)
    if window is not None:
        raise ValueError("sliding-window attention over a compacted span is not supported: "
                         "compaction is only applied to global-attention layers")
    if rope is not None and rope.head_size != d:
        raise ValueError(f"rope table has head_size {rope.head_size}, the cache has head_size {d}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    cache = CacheViews(kv_cache, plan.fp8, q.dtype)
    bt = block_table.contiguous()
    part_o, part_lse = paged_exact_attention_triton(
        q, kv_cache, bt, query_start_loc, seq_lens, scale, max_query_len=max_query_len, max_seq_len=max_seq_len,
        softcap=softcap, seq_spans=plan.seq_spans, meta=plan.meta, block_m=block_m, block_n=block_n,
        kv_scales=kv_scales, reach=reach)
    part_a, part_alse, ss = span_partials(
        q, cache, bt, plan.meta, plan.thresholds, plan.inst, plan.num_inst, plan.qpt, scale,
        max_span_tokens=plan.max_span_tokens, key_rank_max=plan.key_rank_max, value_rank_max=plan.value_rank_max,
        fp8=plan.fp8, softcap=softcap, rope=rope, launch=launch, full_rank=True,  # (prefill reads every token)
        rows_per_block=plan.rows_per_block)
    if out is None:
        out = torch.empty(nq, hq, d, dtype=torch.float32, device=q.device)
    lse = merge_partials_triton(cache, bt, plan.meta, plan.inst, plan.row_inst, part_o.unsqueeze(1),
                                part_lse.unsqueeze(1), part_a, part_alse, ss, plan.qpt, out, hq, plan.value_rank_max,
                                merge_splits=launch.merge_splits, merge_heads=launch.merge_heads)
    return out, lse


__all__ = ["SpanLaunch", "paged_mixed_decode_triton", "paged_prefill_triton", "span_partials", "merge_partials_triton",
           "merge_chunks", "decode_instances", "scratch", "static_programs", "CacheViews", "rows_offsets"]
