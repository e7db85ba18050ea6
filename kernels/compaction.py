"""Triton launches of the Gram-space compaction: each step (deflate, orthonormalise) and the finish.

:func:`ap_vllm.core.compaction.gram_svd` iterates ``Z <- orth(G Z)`` on the centred Gram matrix of each span;
this kernel is its ``orth``, the same math as :func:`ap_vllm.core.compaction.gram_orth_reference` (the torch
oracle). For matrix n (one program each), with Y = G_c Z [W, R] (a cuBLAS product), the previous iterate Z,
the span's mean key mu [W], its token count c and G_c (for its trace)::

    f = [c ||mu||^2 >= trace(G_c)]            the mean direction dominates: deflate it
    m = f mu / ||mu||,   u = (1 - f) sqrt(c) mu
    Y <- Y + u (u^T Z) - m (m^T Y)            (X^T X) Z = (G_c + u u^T) Z, or P G_c Z with P = I - m m^T
    PASSES times:  S = Y^T Y,  L L^T = S + (eps_p trace(S) + tiny) I,  Y <- Y L^-T
    out[:, :R] = Y,   out[:, R] = m

eps_0 = 1e-5 (shifted CholeskyQR: the factorisation exists whatever cond(Y)), then 1e-7: the later passes
restore orthonormality to float32 rounding. L^-T keeps column j a combination of columns 0..j (nested
order, as Gram-Schmidt). Everything is float32: the Cholesky factor and its inverse are formed in registers
(R sequential steps on an R x R tile), the products with Y are ``tl.dot`` in IEEE float32 over chunks of
BLOCK_W rows of W, so registers do not grow with W. No host synchronisation; one launch for all matrices.

The finish (:func:`gram_finish_triton`, oracle :func:`ap_vllm.core.compaction.gram_finish_reference`), one
program per matrix, from the candidates' coefficients X [Z | m] (or, ``centred``, X_c [Z | m], to which it adds
1 mu^T [Z | m] on the matrix's c rows: the caller then needs no uncentred copy of X) and directions [Z | m]::

    e_j = ||X [Z | m]_j||^2,   pos_j = #{l : e_l > e_j or (e_l = e_j and l < j)}   (stable descending order)
    keep_j = pos_j < R  and  e_j > absent sum(e)  [and  sum_{pos_l < pos_j} e_l < threshold ||X||^2 or pos_j = 0]
    sign_j = sign of the largest-magnitude entry of direction j (the first of equal ones)
    basis[pos_j] = keep_j sign_j direction_j,   coeff[:, pos_j] = keep_j sign_j X direction_j,   s[pos_j] = sqrt(e_j)

with FP8 coefficients scaled per token (amax / 448) before the cast. Nothing of ``ap_vllm.core`` is imported
here: the kernels are the bottom layer.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SHIFT_FIRST = 1e-5
SHIFT = 1e-7
TINY = 1e-30
MAX_RANK = 64  # above: the torch step (cuBLAS / cuSOLVER launches, still no host sync); 128 spills
# padded rank -> (warps, register cap) of the step, spill-free on sm_80 / sm_90 with Triton 3.6 and 3.9 (the AOT
# test); at 64, Triton 3.6 lets ptxas stop at 128 registers and spill, so the cap is raised (one program per
# matrix: occupancy does not matter), which at 32 would make ptxas unroll into spills instead
LAUNCH_FOR_RANK = {16: (4, None), 32: (4, None), 64: (8, 255)}


@triton.jit
def _cholesky_inverse(S, R, BLOCK_R: tl.constexpr):
    """L^-1 of the Cholesky factor of the symmetric positive definite S [BLOCK_R, BLOCK_R] (first R rows and
    columns; the rest zero), in one register tile: right-looking Cholesky with column j of L stored in place
    (later updates touch columns > j only), then forward substitution on the identity with row i of L^-1
    stored over row i of L once it is read (later rows need rows < i of L^-1 and their own row of L)."""
    idx = tl.arange(0, BLOCK_R)
    rows = idx[:, None]
    cols = idx[None, :]
    a = S
    for j in range(0, R):
        colj = tl.sum(tl.where(cols == j, a, 0.0), axis=1)  # a[:, j]
        ajj = tl.sum(tl.where(idx == j, colj, 0.0), axis=0)
        lj = tl.where(idx >= j, colj / tl.sqrt(tl.maximum(ajj, 1e-30)), 0.0)
        a = tl.where(cols == j, lj[:, None], a - lj[:, None] * lj[None, :])
    for i in range(0, R):
        li = tl.sum(tl.where(rows == i, a, 0.0), axis=0)  # row i of L, indexed by column k
        lii = tl.sum(tl.where(idx == i, li, 0.0), axis=0)
        acc = tl.sum(tl.where(rows < i, li[:, None] * a, 0.0), axis=0)  # sum_{k<i} L[i, k] inv[k, :]
        rowi = (tl.where(idx == i, 1.0, 0.0) - acc) / lii
        a = tl.where(rows == i, rowi[None, :], a)
    return tl.where(rows < R, a, 0.0)


@triton.jit
def _gram_orth_kernel(y_ptr, z_ptr, mu_ptr, cnt_ptr, g_ptr, out_ptr, W, R,
                      s_yn, s_yw, s_zn, s_zw, s_mn, s_gn, s_gw, s_on, s_ow,
                      SHIFT_FIRST: tl.constexpr, SHIFT: tl.constexpr, TINY: tl.constexpr, PASSES: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    ww = tl.arange(0, BLOCK_W)
    rmask = rr < R
    # the mean direction: dominant (deflate it) or not (add its rank-one term back)
    musq = 0.0
    tr = 0.0
    for w0 in range(0, W, BLOCK_W):
        wm = (w0 + ww) < W
        mu = tl.load(mu_ptr + n * s_mn + w0 + ww, mask=wm, other=0.0)
        gd = tl.load(g_ptr + n * s_gn + (w0 + ww) * (s_gw + 1), mask=wm, other=0.0)
        musq += tl.sum(mu * mu, axis=0)
        tr += tl.sum(gd, axis=0)
    cnt = tl.load(cnt_ptr + n)
    deflate = (cnt * musq >= tr) & (musq > 0.0)
    m_scale = tl.where(deflate, 1.0 / tl.sqrt(tl.maximum(musq, 1e-30)), 0.0)
    u_scale = tl.where(deflate, 0.0, tl.sqrt(cnt))
    a = tl.zeros([BLOCK_R], dtype=tl.float32)  # u^T Z
    b = tl.zeros([BLOCK_R], dtype=tl.float32)  # m^T Y
    for w0 in range(0, W, BLOCK_W):
        wm = (w0 + ww) < W
        m2 = wm[:, None] & rmask[None, :]
        mu = tl.load(mu_ptr + n * s_mn + w0 + ww, mask=wm, other=0.0)
        zc = tl.load(z_ptr + n * s_zn + (w0 + ww)[:, None] * s_zw + rr[None, :], mask=m2, other=0.0)
        yc = tl.load(y_ptr + n * s_yn + (w0 + ww)[:, None] * s_yw + rr[None, :], mask=m2, other=0.0)
        a += tl.sum((mu * u_scale)[:, None] * zc, axis=0)
        b += tl.sum((mu * m_scale)[:, None] * yc, axis=0)
    for w0 in range(0, W, BLOCK_W):
        wm = (w0 + ww) < W
        m2 = wm[:, None] & rmask[None, :]
        mu = tl.load(mu_ptr + n * s_mn + w0 + ww, mask=wm, other=0.0)
        yc = tl.load(y_ptr + n * s_yn + (w0 + ww)[:, None] * s_yw + rr[None, :], mask=m2, other=0.0)
        yc = yc + (mu * u_scale)[:, None] * a[None, :] - (mu * m_scale)[:, None] * b[None, :]
        tl.store(out_ptr + n * s_on + (w0 + ww)[:, None] * s_ow + rr[None, :], yc, mask=m2)
        tl.store(out_ptr + n * s_on + (w0 + ww) * s_ow + R, mu * m_scale, mask=wm)
    tl.debug_barrier()
    eye = (rr[:, None] == rr[None, :]) & rmask[:, None]
    for p in tl.static_range(PASSES):
        s = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            m2 = ((w0 + ww) < W)[:, None] & rmask[None, :]
            yc = tl.load(out_ptr + n * s_on + (w0 + ww)[:, None] * s_ow + rr[None, :], mask=m2, other=0.0)
            s += tl.dot(tl.trans(yc), yc, input_precision=PRECISION)
        trace = tl.sum(tl.sum(tl.where(eye, s, 0.0), axis=1), axis=0)
        eps = SHIFT_FIRST if p == 0 else SHIFT
        s = s + tl.where(eye, eps * trace + TINY, 0.0)
        inv_t = tl.trans(_cholesky_inverse(s, R, BLOCK_R))  # L^-T
        tl.debug_barrier()
        for w0 in range(0, W, BLOCK_W):
            m2 = ((w0 + ww) < W)[:, None] & rmask[None, :]
            yc = tl.load(out_ptr + n * s_on + (w0 + ww)[:, None] * s_ow + rr[None, :], mask=m2, other=0.0)
            yc = tl.dot(yc, inv_t, input_precision=PRECISION)
            tl.store(out_ptr + n * s_on + (w0 + ww)[:, None] * s_ow + rr[None, :], yc, mask=m2)
        tl.debug_barrier()


@triton.jit
def _gram_select(e, n, jj, jm, R1, R, W, cnt, zb_ptr, g_ptr, mu_ptr, e_ptr, b_out_ptr, b32_ptr, sv_ptr, THRESH,
                 s_zn, s_zw, s_gn, s_gw, s_mn, s_bn, s_br, s_vn,
                 ABSENT: tl.constexpr, HAS_THRESH: tl.constexpr, STORE32: tl.constexpr, BLOCK_W: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    # from the candidates' energies e [BLOCK_R] (first R1 valid): order, absent components, threshold, signs;
    # stores the basis rows (model dtype, and STORE32: float32 at b32_ptr, same strides) and singular values at
    # their positions. Returns (pos, slot, mult): candidate j goes to position pos_j when slot_j, times mult_j
    # (its sign, 0 when not kept).
    ww = tl.arange(0, BLOCK_W)
    total_c = tl.sum(e, axis=0)
    # position of candidate j in the stable descending order (the candidates l ranked before it) and the energy
    # ranked before it, against chunks of the energies read back (no [R+1, R+1] tile in registers)
    tl.store(e_ptr + n * BLOCK_R + jj, e, mask=jm)
    tl.debug_barrier()
    ll = tl.arange(0, 16)
    pos = tl.zeros([BLOCK_R], dtype=tl.int32)
    prior = tl.zeros([BLOCK_R], dtype=tl.float32)
    for l0 in range(0, R1, 16):
        lm = (l0 + ll) < R1
        el = tl.load(e_ptr + n * BLOCK_R + l0 + ll, mask=lm, other=0.0)
        before = ((el[None, :] > e[:, None]) | ((el[None, :] == e[:, None]) & ((l0 + ll)[None, :] < jj[:, None])))
        before = before & lm[None, :]
        pos += tl.sum(before.to(tl.int32), axis=1)
        prior += tl.sum(tl.where(before, el[None, :], 0.0), axis=1)
    slot = jm & (pos < R)
    keep = slot & (e > ABSENT * total_c)
    if HAS_THRESH:  # the energy threshold against ||X||^2 = trace(G_c) + c ||mu||^2
        total_x = 0.0
        for w0 in range(0, W, BLOCK_W):
            wm = (w0 + ww) < W
            mu = tl.load(mu_ptr + n * s_mn + w0 + ww, mask=wm, other=0.0)
            gd = tl.load(g_ptr + n * s_gn + (w0 + ww) * (s_gw + 1), mask=wm, other=0.0)
            total_x += tl.sum(gd, axis=0) + cnt * tl.sum(mu * mu, axis=0)
        keep = keep & ((prior < (THRESH - 1e-12) * total_x) | (pos == 0))
    # signs: each direction's largest-magnitude entry (the first of equal ones) made positive
    best_abs = tl.full([BLOCK_R], -1.0, dtype=tl.float32)
    best_val = tl.zeros([BLOCK_R], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        m2 = ((w0 + ww) < W)[:, None] & jm[None, :]
        zc = tl.load(zb_ptr + n * s_zn + (w0 + ww)[:, None] * s_zw + jj[None, :], mask=m2, other=0.0)
        a = tl.where(m2, tl.abs(zc), -1.0)
        cur = tl.max(a, axis=0)
        arg = tl.argmax(a, axis=0)
        val = tl.sum(tl.where(ww[:, None] == arg[None, :], zc, 0.0), axis=0)
        better = cur > best_abs
        best_abs = tl.where(better, cur, best_abs)
        best_val = tl.where(better, val, best_val)
    mult = tl.where(keep, tl.where(best_val < 0.0, -1.0, 1.0), 0.0)
    # basis rows and singular values at their positions
    for w0 in range(0, W, BLOCK_W):
        wm = (w0 + ww) < W
        zc = tl.load(zb_ptr + n * s_zn + (w0 + ww)[:, None] * s_zw + jj[None, :], mask=wm[:, None] & jm[None, :],
                     other=0.0)
        row = n * s_bn + pos[None, :] * s_br + (w0 + ww)[:, None]
        tl.store(b_out_ptr + row, zc * mult[None, :], mask=wm[:, None] & slot[None, :])
        if STORE32:
            tl.store(b32_ptr + row, zc * mult[None, :], mask=wm[:, None] & slot[None, :])
    tl.store(sv_ptr + n * s_vn + pos, tl.sqrt(tl.maximum(e, 0.0)) * tl.where(keep, 1.0, 0.0), mask=slot)
    return pos, slot, mult


@triton.jit
def _gram_finish_kernel(cand_ptr, zb_ptr, g_ptr, mu_ptr, cnt_ptr, c_out_ptr, scale_ptr, b_out_ptr, sv_ptr, e_ptr,
                        T, W, R1, R, THRESH,
                        s_cn, s_ct, s_zn, s_zw, s_gn, s_gw, s_mn, s_on, s_ot, s_sn, s_bn, s_br, s_vn,
                        ABSENT: tl.constexpr, HAS_THRESH: tl.constexpr, FP8: tl.constexpr, CENTRED: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, BLOCK_R)
    jm = jj < R1
    tt = tl.arange(0, BLOCK_T)
    ww = tl.arange(0, BLOCK_W)
    # CENTRED: cand holds X_c [Z | m]; the candidates are that + 1 mu^T [Z | m] on the matrix's first c rows
    mz = tl.zeros([BLOCK_R], dtype=tl.float32)
    cnt = tl.load(cnt_ptr + n)
    if CENTRED:
        for w0 in range(0, W, BLOCK_W):
            wm = (w0 + ww) < W
            mu_w = tl.load(mu_ptr + n * s_mn + w0 + ww, mask=wm, other=0.0)
            zc = tl.load(zb_ptr + n * s_zn + (w0 + ww)[:, None] * s_zw + jj[None, :], mask=wm[:, None] & jm[None, :],
                         other=0.0)
            mz += tl.sum(mu_w[:, None] * zc, axis=0)
    # energies of the candidates
    e = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        m2 = ((t0 + tt) < T)[:, None] & jm[None, :]
        c = tl.load(cand_ptr + n * s_cn + (t0 + tt)[:, None] * s_ct + jj[None, :], mask=m2, other=0.0)
        if CENTRED:
            c += tl.where(((t0 + tt).to(tl.float32) < cnt)[:, None] & jm[None, :], mz[None, :], 0.0)
        e += tl.sum(c * c, axis=0)
    pos, slot, mult = _gram_select(e, n, jj, jm, R1, R, W, cnt, zb_ptr, g_ptr, mu_ptr, e_ptr, b_out_ptr, b_out_ptr,
                                   sv_ptr, THRESH, s_zn, s_zw, s_gn, s_gw, s_mn, s_bn, s_br, s_vn, ABSENT, HAS_THRESH,
                                   False, BLOCK_W, BLOCK_R)
    # coefficients at their positions
    for t0 in range(0, T, BLOCK_T):
        tm = (t0 + tt) < T
        c = tl.load(cand_ptr + n * s_cn + (t0 + tt)[:, None] * s_ct + jj[None, :], mask=tm[:, None] & jm[None, :],
                    other=0.0)
        if CENTRED:
            c += tl.where(((t0 + tt).to(tl.float32) < cnt)[:, None] & jm[None, :], mz[None, :], 0.0)
        c = c * mult[None, :]
        if FP8:  # per-token scale, as ap_vllm.core.compaction.quantize_fp8 (the cast to e4m3 follows)
            amax = tl.max(tl.abs(c), axis=1)
            sc = tl.where(amax > 0.0, amax / 448.0, 1.0)
            c = tl.minimum(tl.maximum(c / sc[:, None], -448.0), 448.0)
            tl.store(scale_ptr + n * s_sn + t0 + tt, sc, mask=tm)
        tl.store(c_out_ptr + n * s_on + (t0 + tt)[:, None] * s_ot + pos[None, :], c,
                 mask=tm[:, None] & slot[None, :])


# --------------------------------------------------------------------------------------
# The fused products (GramProducts): the Gram matrix and the coefficients straight from X in its own dtype
# --------------------------------------------------------------------------------------
@triton.jit
def _gram_centred_kernel(x_ptr, mu_ptr, cnt_ptr, g_ptr, W, s_xn, s_xt, s_mn, s_gn, s_gw,
                         PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    # program (n, bi, bj), bi <= bj: the tile G_c[I, J] (I, J the bi-th / bj-th BLOCK_W columns) of matrix n,
    #   G_c[I, J] = sum_{t < c} (x_t,I - mu_I)^T (x_t,J - mu_J)
    # over its c rows, X read in its own dtype and centred in registers (float32); written to [I, J] and [J, I]
    n = tl.program_id(0).to(tl.int64)
    bi = tl.program_id(1)
    bj = tl.program_id(2)
    if bj >= bi:
        ii = bi * BLOCK_W + tl.arange(0, BLOCK_W)
        jj = bj * BLOCK_W + tl.arange(0, BLOCK_W)
        mi = ii < W
        mj = jj < W
        mu_i = tl.load(mu_ptr + n * s_mn + ii, mask=mi, other=0.0)
        mu_j = tl.load(mu_ptr + n * s_mn + jj, mask=mj, other=0.0)
        cnt = tl.load(cnt_ptr + n)
        rows = cnt.to(tl.int32)
        tt = tl.arange(0, BLOCK_T)
        acc = tl.zeros([BLOCK_W, BLOCK_W], dtype=tl.float32)
        for t0 in range(0, rows, BLOCK_T):
            tm = (t0 + tt) < rows
            a = tl.load(x_ptr + n * s_xn + (t0 + tt)[None, :] * s_xt + ii[:, None], mask=mi[:, None] & tm[None, :],
                        other=0.0).to(tl.float32)  # X^T tile [BLOCK_W, BLOCK_T]
            b = tl.load(x_ptr + n * s_xn + (t0 + tt)[:, None] * s_xt + jj[None, :], mask=tm[:, None] & mj[None, :],
                        other=0.0).to(tl.float32)
            a = tl.where(mi[:, None] & tm[None, :], a - mu_i[:, None], 0.0)
            b = tl.where(tm[:, None] & mj[None, :], b - mu_j[None, :], 0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(g_ptr + n * s_gn + ii[:, None] * s_gw + jj[None, :], acc, mask=mi[:, None] & mj[None, :])
        if bj > bi:
            tl.store(g_ptr + n * s_gn + jj[None, :] * s_gw + ii[:, None], acc, mask=mi[:, None] & mj[None, :])


@triton.jit
def _gram_decide_kernel(zb_ptr, y_ptr, g_ptr, mu_ptr, cnt_ptr, b_out_ptr, b32_ptr, sv_ptr, e_ptr, W, R1, R, THRESH,
                        s_zn, s_zw, s_yn, s_yw, s_gn, s_gw, s_mn, s_bn, s_br, s_vn,
                        ABSENT: tl.constexpr, HAS_THRESH: tl.constexpr, BLOCK_W: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    # one program per matrix: the candidates' energies from the Gram matrix, no pass over the tokens,
    #   e_j = ||X z_j||^2 = z_j^T G_c z_j + c (mu^T z_j)^2     (1^T X_c = 0 on the c rows),  y = G_c [Z | m]
    # then the selection of the finish (_gram_select), the basis also in float32 for the coefficients' product
    n = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, BLOCK_R)
    jm = jj < R1
    ww = tl.arange(0, BLOCK_W)
    cnt = tl.load(cnt_ptr + n)
    e = tl.zeros([BLOCK_R], dtype=tl.float32)
    mz = tl.zeros([BLOCK_R], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        wm = (w0 + ww) < W
        m2 = wm[:, None] & jm[None, :]
        mu_w = tl.load(mu_ptr + n * s_mn + w0 + ww, mask=wm, other=0.0)
        zc = tl.load(zb_ptr + n * s_zn + (w0 + ww)[:, None] * s_zw + jj[None, :], mask=m2, other=0.0)
        yc = tl.load(y_ptr + n * s_yn + (w0 + ww)[:, None] * s_yw + jj[None, :], mask=m2, other=0.0)
        e += tl.sum(zc * yc, axis=0)
        mz += tl.sum(mu_w[:, None] * zc, axis=0)
    e = tl.maximum(e, 0.0) + cnt * mz * mz
    _gram_select(e, n, jj, jm, R1, R, W, cnt, zb_ptr, g_ptr, mu_ptr, e_ptr, b_out_ptr, b32_ptr, sv_ptr, THRESH,
                 s_zn, s_zw, s_gn, s_gw, s_mn, s_bn, s_br, s_vn, ABSENT, HAS_THRESH, True, BLOCK_W, BLOCK_R)


@triton.jit
def _gram_project_kernel(x_ptr, b_ptr, cnt_ptr, c_out_ptr, scale_ptr, T, W, R,
                         s_xn, s_xt, s_bn, s_br, s_on, s_ot, s_sn,
                         FP8: tl.constexpr, PRECISION: tl.constexpr, SPLIT_B: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    # program (n, k): coefficients C[t] = X[t] B^T of rows t in [k BLOCK_T, (k + 1) BLOCK_T) of matrix n (its
    # first c rows; 0 past them), X in its own dtype, B the selected, signed float32 basis [R, W]; FP8: scaled
    # per token as the finish does (the cast to e4m3 follows).
    # SPLIT_B (TF32 products of a bf16 / fp16 X, which TF32 holds exactly): B = B_hi + B_lo, B_hi its top 19
    # bits (what a TF32 multiply reads), B_lo = B - B_hi exact in float32; X B_hi + X B_lo is then X B to about
    # 2^-20 relative. A single TF32 product would err by 2^-11 |X| |B|, which for keys with a large mean (the
    # mean's coefficient is large) is above the optimal low-rank error.
    n = tl.program_id(0).to(tl.int64)
    tt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rr = tl.arange(0, BLOCK_R)
    ww = tl.arange(0, BLOCK_W)
    cnt = tl.load(cnt_ptr + n)
    tm = (tt < T) & (tt.to(tl.float32) < cnt)
    rm = rr < R
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        wm = (w0 + ww) < W
        a = tl.load(x_ptr + n * s_xn + tt[:, None].to(tl.int64) * s_xt + (w0 + ww)[None, :],
                    mask=tm[:, None] & wm[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + n * s_bn + rr[None, :] * s_br + (w0 + ww)[:, None], mask=wm[:, None] & rm[None, :],
                    other=0.0)  # B^T chunk [BLOCK_W, BLOCK_R]
        if SPLIT_B:
            b_hi = (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            acc = tl.dot(a, b_hi, acc, input_precision=PRECISION)
            acc = tl.dot(a, b - b_hi, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if FP8:
        amax = tl.max(tl.abs(acc), axis=1)
        sc = tl.where(amax > 0.0, amax / 448.0, 1.0)
        acc = tl.minimum(tl.maximum(acc / sc[:, None], -448.0), 448.0)
        tl.store(scale_ptr + n * s_sn + tt, sc, mask=tt < T)
    tl.store(c_out_ptr + n * s_on + tt[:, None].to(tl.int64) * s_ot + rr[None, :], acc,
             mask=(tt < T)[:, None] & rm[None, :])


def gram_finish_triton(cand: torch.Tensor, zb: torch.Tensor, g: torch.Tensor, mu: torch.Tensor,
                       count: torch.Tensor, rank: int, *, energy_threshold: Optional[float] = None,
                       coefficient_dtype: str = "model", dtype: torch.dtype = torch.float32, absent: float = 1e-10,
                       centred: bool = False, block_t: int = 32, block_w: int = 32, num_warps: Optional[int] = None):
    """The finishing launch of the Gram compaction: same arguments and results as
    :func:`ap_vllm.core.compaction.gram_finish_reference` (order, absent components, signs, energy threshold,
    stored dtypes; FP8 coefficients are scaled here and cast to e4m3 by one copy; ``centred``: ``cand`` holds
    X_c [Z | m], the mean's part 1 mu^T [Z | m] is added here, on each matrix's first ``count`` rows)."""
    n, t, r1 = cand.shape
    w = zb.shape[1]
    r = min(rank, w)
    if zb.shape != (n, w, r1) or r1 != r + 1:
        raise ValueError(f"gram_finish_triton: candidates {tuple(cand.shape)} and directions {tuple(zb.shape)} "
                         f"do not fit rank {rank}")
    fp8 = coefficient_dtype == "fp8_e4m3"
    alloc = torch.zeros if r < rank else torch.empty  # components beyond the width stay zero
    coeff = alloc(n, t, rank, dtype=torch.float32 if fp8 else dtype, device=cand.device)
    basis = alloc(n, rank, w, dtype=dtype, device=cand.device)
    sv = alloc(n, rank, dtype=torch.float32, device=cand.device)
    scale = torch.empty(n, t, dtype=torch.float32, device=cand.device) if fp8 else sv
    cand, zb, g, mu, count = (a.float() if a.stride(-1) == 1 else a.float().contiguous()
                              for a in (cand, zb, g, mu, count))
    block_r = _pow2(r1)
    energies = torch.empty(n, block_r, dtype=torch.float32, device=cand.device)  # the kernel's scratch
    _gram_finish_kernel[(n,)](
        cand, zb, g, mu, count, coeff, scale, basis, sv, energies, t, w, r1, r,
        0.0 if energy_threshold is None else float(energy_threshold),
        cand.stride(0), cand.stride(1), zb.stride(0), zb.stride(1), g.stride(0), g.stride(1), mu.stride(0),
        coeff.stride(0), coeff.stride(1), scale.stride(0), basis.stride(0), basis.stride(1), sv.stride(0),
        ABSENT=float(absent), HAS_THRESH=energy_threshold is not None, FP8=fp8, CENTRED=bool(centred),
        BLOCK_T=block_t, BLOCK_W=block_w, BLOCK_R=block_r, num_warps=num_warps or 4)
    if fp8:
        return coeff.to(torch.float8_e4m3fn), scale, basis, sv
    return coeff, None, basis, sv


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(x) - 1).bit_length())


def gram_orth_triton(y: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, count: torch.Tensor, g: torch.Tensor,
                     passes: int = 3, block_w: int = 32, num_warps: Optional[int] = None,
                     precision: str = "ieee") -> torch.Tensor:
    """The kernel's launch: same arguments and result as :func:`ap_vllm.core.compaction.gram_orth_reference`.

    ``y`` = G_c z [N, W, R], ``z`` [N, W, R] or [W, R] (the sketch, shared), ``mu`` [N, W], ``count`` [N],
    ``g`` = G_c [N, W, W], all float32 on one device. Returns [N, W, R + 1]: the orthonormalised columns and,
    last, the deflated direction m (zero when the mean is not deflated). ``precision``: the products' Triton
    ``input_precision``, ``"ieee"`` (float32 FMA, the default) or ``"tf32x3"`` (tensor cores, about 2^-21
    relative; ``make gpu-check`` times and checks both)."""
    if precision not in ("ieee", "tf32x3"):
        raise ValueError(f"gram_orth_triton: precision must be 'ieee' or 'tf32x3', got {precision!r}")
    n, w, r = y.shape
    if r > MAX_RANK:
        raise ValueError(f"gram_orth_triton: rank {r} is above {MAX_RANK} (its R x R tiles would spill); "
                         "compact_spans runs the torch step there")
    if g.shape != (n, w, w) or mu.shape != (n, w) or count.shape != (n,):
        raise ValueError(f"gram_orth_triton: shapes y {tuple(y.shape)}, mu {tuple(mu.shape)}, "
                         f"count {tuple(count.shape)}, g {tuple(g.shape)} do not fit")
    # (the iterate z is a view of the previous result: rows strided, no copy as long as columns are unit-stride)
    y, z, mu, count, g = (a.float() if a.stride(-1) == 1 else a.float().contiguous() for a in (y, z, mu, count, g))
    out = torch.empty(n, w, r + 1, dtype=torch.float32, device=y.device)
    s_zn = 0 if z.dim() == 2 else z.stride(0)
    block_r = _pow2(r)
    warps, maxnreg = LAUNCH_FOR_RANK[block_r]
    launch = {} if _INTERPRET or maxnreg is None else {"maxnreg": maxnreg}
    _gram_orth_kernel[(n,)](
        y, z, mu, count, g, out, w, r,
        y.stride(0), y.stride(1), s_zn, z.stride(-2), mu.stride(0), g.stride(0), g.stride(1),
        out.stride(0), out.stride(1),
        SHIFT_FIRST=SHIFT_FIRST, SHIFT=SHIFT, TINY=TINY, PASSES=int(passes), PRECISION=precision,
        BLOCK_W=int(block_w), BLOCK_R=block_r, num_warps=num_warps or warps, **launch)
    return out


PRODUCT_PRECISIONS = ("tf32", "tf32x3", "ieee")


class GramProducts:
    """The Gram path's products taken straight from X in its own (model) dtype, no float32 copy of X: the
    centred Gram matrix (:func:`gram`, one launch on tensor cores) and the finish (:func:`finish`: the candidates'
    energies from the Gram matrix, the selection, then the coefficients as one product X B^T, two launches).
    Oracle: :class:`ap_vllm.core.compaction.GramProductsReference` (same arguments, same results).

    ``precision``: the Triton ``input_precision`` of both products: ``"tf32"``, ``"tf32x3"`` (about float32)
    or ``"ieee"`` (float32 FMA, as cuBLAS's float32 products that these replace). With ``"tf32"`` the Gram
    matrix reads the centred values with 10 mantissa bits (an error far below what the rank-R cut drops:
    tests/core/test_compaction_gram.py emulates it), and the coefficients, whose error adds to the
    approximation's directly, are two TF32 products of an exact split of the basis (exact for a bf16 / fp16 X;
    a float32 X takes 3xTF32). ``block_w``: the Gram tile (``block_w`` x ``block_w`` columns); ``block_t``:
    token rows per step of the Gram and per program of the coefficients."""

    def __init__(self, precision: str = "tf32", block_w: int = 64, block_t: int = 32, num_warps: int = 4):
        if precision not in PRODUCT_PRECISIONS:
            raise ValueError(f"GramProducts: precision must be one of {PRODUCT_PRECISIONS}, got {precision!r}")
        for name, v in (("block_w", block_w), ("block_t", block_t)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"GramProducts: {name} must be a power of two >= 16, got {v}")
        self.precision, self.block_w, self.block_t, self.num_warps = precision, block_w, block_t, num_warps

    @staticmethod
    def _unit_stride(a: torch.Tensor) -> torch.Tensor:
        return a if a.stride(-1) == 1 else a.contiguous()

    def gram(self, x: torch.Tensor, mu: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """G_c [N, W, W] float32 of x [N, T, W] (any float dtype) over each matrix's first ``count`` rows, centred
        by ``mu`` [N, W] float32 (``count`` [N] float32)."""
        n, _, w = x.shape
        x, mu, count = self._unit_stride(x), self._unit_stride(mu.float()), count.float()
        g = torch.empty(n, w, w, dtype=torch.float32, device=x.device)
        bw = min(self.block_w, _pow2(w))
        nb = triton.cdiv(w, bw)
        _gram_centred_kernel[(n, nb, nb)](x, mu, count, g, w, x.stride(0), x.stride(1), mu.stride(0), g.stride(0),
                                          g.stride(1), PRECISION=self.precision, BLOCK_T=self.block_t, BLOCK_W=bw,
                                          num_warps=self.num_warps)
        return g

    def finish(self, x: torch.Tensor, zb: torch.Tensor, gzb: torch.Tensor, g: torch.Tensor, mu: torch.Tensor,
               count: torch.Tensor, rank: int, *, energy_threshold: Optional[float] = None,
               coefficient_dtype: str = "model", dtype: torch.dtype = torch.float32, absent: float = 1e-10):
        """Directions ``zb`` = [Z | m] [N, W, R + 1] and ``gzb`` = G_c zb -> (coeff [N, T, rank], scale [N, T] or
        None, basis [N, rank, W], s [N, rank]), as :func:`gram_finish_triton` from the candidates X zb."""
        n, t, w = x.shape
        r1 = zb.shape[-1]
        r = min(rank, w)
        if zb.shape != (n, w, r1) or gzb.shape != zb.shape or r1 != r + 1:
            raise ValueError(f"GramProducts.finish: x {tuple(x.shape)}, directions {tuple(zb.shape)} and G_c times "
                             f"them {tuple(gzb.shape)} do not fit rank {rank}")
        fp8 = coefficient_dtype == "fp8_e4m3"
        dev = x.device
        # (the decision writes every one of the R positions, a dropped component as zeros; components beyond the
        # width stay zero)
        alloc = torch.zeros if r < rank else torch.empty
        coeff = alloc(n, t, rank, dtype=torch.float32 if fp8 else dtype, device=dev)
        basis = alloc(n, rank, w, dtype=dtype, device=dev)
        basis32 = alloc(n, rank, w, dtype=torch.float32, device=dev)  # (the same strides as basis)
        sv = alloc(n, rank, dtype=torch.float32, device=dev)
        scale = torch.empty(n, t, dtype=torch.float32, device=dev) if fp8 else sv
        zb, gzb, g, mu, count = (self._unit_stride(a.float()) for a in (zb, gzb, g, mu, count))
        x = self._unit_stride(x)
        block_r = _pow2(r1)
        energies = torch.empty(n, block_r, dtype=torch.float32, device=dev)  # the decision's scratch
        _gram_decide_kernel[(n,)](
            zb, gzb, g, mu, count, basis, basis32, sv, energies, w, r1, r,
            0.0 if energy_threshold is None else float(energy_threshold),
            zb.stride(0), zb.stride(1), gzb.stride(0), gzb.stride(1), g.stride(0), g.stride(1), mu.stride(0),
            basis.stride(0), basis.stride(1), sv.stride(0),
            ABSENT=float(absent), HAS_THRESH=energy_threshold is not None, BLOCK_W=32, BLOCK_R=block_r, num_warps=4)
        # (TF32 holds a 16-bit X exactly: the basis is split in two TF32 parts; a float32 X takes 3xTF32)
        split = self.precision == "tf32" and x.dtype in (torch.bfloat16, torch.float16)
        prec = "tf32x3" if self.precision == "tf32" and not split else self.precision
        _gram_project_kernel[(n, triton.cdiv(t, self.block_t))](
            x, basis32, count, coeff, scale, t, w, r,
            x.stride(0), x.stride(1), basis32.stride(0), basis32.stride(1), coeff.stride(0), coeff.stride(1),
            scale.stride(0), FP8=fp8, PRECISION=prec, SPLIT_B=split, BLOCK_T=self.block_t,
            BLOCK_W=min(32, _pow2(w)), BLOCK_R=_pow2(r), num_warps=self.num_warps)  # (64: float32 X spilled)
        if fp8:
            return coeff.to(torch.float8_e4m3fn), scale, basis, sv
        return coeff, None, basis, sv


def device_compaction(precision: str = "tf32x3", orth_warps: Optional[int] = None,
                      finish_rows: Optional[int] = None, products: Optional[str] = "tf32",
                      gram_block_w: int = 64) -> dict:
    """The keyword arguments of :func:`ap_vllm.core.compaction.compact_spans` for the kernel path: the Gram
    method with this module's launches (what the backend and the GPU benchmarks use; ``precision`` of the
    step's products, see :func:`gram_orth_triton`: 3xTF32 by default, measured on an H200 with the same error
    as float32 FMA (1.01486 x Eckart-Young both) and the step 1.55 against 2.24 ms a call). ``products``: the precision of :class:`GramProducts` (the
    Gram matrix and the coefficients taken from X in its own dtype, on tensor cores), or None for the former
    path (X copied to float32 and centred there, cuBLAS float32 products, :func:`gram_finish_triton` over the
    candidates' coefficients). Tuning only: ``orth_warps``, the step's warps (default :data:`LAUNCH_FOR_RANK`);
    ``finish_rows``, the token rows the former finish reads at a time (default 32, 4 warps; 128 and more on 8
    warps); ``gram_block_w``, the Gram tile. The step carries ``max_rank``: above it compact_spans runs its
    torch step."""
    orth = functools.partial(gram_orth_triton, precision=precision, num_warps=orth_warps)
    orth.max_rank = MAX_RANK
    if products is not None:
        if finish_rows:
            raise ValueError("device_compaction: finish_rows tunes the former finish (products=None), not "
                             f"GramProducts (products={products!r})")
        return dict(method="gram", orth=orth, products=GramProducts(products, block_w=gram_block_w,
                                                                    num_warps=8 if gram_block_w >= 128 else 4))
    finish = gram_finish_triton if not finish_rows else functools.partial(
        gram_finish_triton, block_t=int(finish_rows), num_warps=8 if finish_rows >= 128 else 4)
    return dict(method="gram", orth=orth, finish=finish)
