"""Triton step of the Gram-space compaction: deflate, then orthonormalise, one launch per step.

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
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

SHIFT_FIRST = 1e-5
SHIFT = 1e-7
TINY = 1e-30
MAX_RANK = 64  # above: the torch step (cuBLAS / cuSOLVER launches, still no host sync); 128 spills
WARPS_FOR_RANK = {16: 4, 32: 4, 64: 16}  # padded rank -> warps (no spills on sm_80 / sm_90)


@triton.jit
def _cholesky_inverse(S, R, BLOCK_R: tl.constexpr):
    """L^-1 of the Cholesky factor of the symmetric positive definite S [BLOCK_R, BLOCK_R] (first R rows and
    columns; the rest zero): right-looking Cholesky, then forward substitution on the identity."""
    idx = tl.arange(0, BLOCK_R)
    rows = idx[:, None]
    cols = idx[None, :]
    a = S
    lo = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    for j in range(0, R):
        colj = tl.sum(tl.where(cols == j, a, 0.0), axis=1)  # a[:, j]
        ajj = tl.sum(tl.where(idx == j, colj, 0.0), axis=0)
        lj = tl.where(idx >= j, colj / tl.sqrt(tl.maximum(ajj, 1e-30)), 0.0)
        lo = tl.where(cols == j, lj[:, None], lo)
        a = a - lj[:, None] * lj[None, :]
    inv = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    for i in range(0, R):
        li = tl.sum(tl.where(rows == i, lo, 0.0), axis=0)  # row i of L, indexed by column k
        lii = tl.sum(tl.where(idx == i, li, 0.0), axis=0)
        acc = tl.sum(li[:, None] * inv, axis=0)  # sum_k L[i, k] inv[k, :] (rows >= i of inv are still 0)
        rowi = (tl.where(idx == i, 1.0, 0.0) - acc) / lii
        inv = tl.where(rows == i, rowi[None, :], inv)
    return inv


@triton.jit
def _gram_orth_kernel(y_ptr, z_ptr, mu_ptr, cnt_ptr, g_ptr, out_ptr, W, R,
                      s_yn, s_yw, s_zn, s_zw, s_mn, s_gn, s_gw, s_on, s_ow,
                      SHIFT_FIRST: tl.constexpr, SHIFT: tl.constexpr, TINY: tl.constexpr, PASSES: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
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
            s += tl.dot(tl.trans(yc), yc, input_precision="ieee")
        trace = tl.sum(tl.sum(tl.where(eye, s, 0.0), axis=1), axis=0)
        eps = SHIFT_FIRST if p == 0 else SHIFT
        s = s + tl.where(eye, eps * trace + TINY, 0.0)
        inv_t = tl.trans(_cholesky_inverse(s, R, BLOCK_R))  # L^-T
        tl.debug_barrier()
        for w0 in range(0, W, BLOCK_W):
            m2 = ((w0 + ww) < W)[:, None] & rmask[None, :]
            yc = tl.load(out_ptr + n * s_on + (w0 + ww)[:, None] * s_ow + rr[None, :], mask=m2, other=0.0)
            yc = tl.dot(yc, inv_t, input_precision="ieee")
            tl.store(out_ptr + n * s_on + (w0 + ww)[:, None] * s_ow + rr[None, :], yc, mask=m2)
        tl.debug_barrier()


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(x) - 1).bit_length())


def gram_orth_triton(y: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, count: torch.Tensor, g: torch.Tensor,
                     passes: int = 3, block_w: int = 32, num_warps: Optional[int] = None) -> torch.Tensor:
    """The kernel's launch: same arguments and result as :func:`ap_vllm.core.compaction.gram_orth_reference`.

    ``y`` = G_c z [N, W, R], ``z`` [N, W, R] or [W, R] (the sketch, shared), ``mu`` [N, W], ``count`` [N],
    ``g`` = G_c [N, W, W], all float32 on one device. Returns [N, W, R + 1]: the orthonormalised columns and,
    last, the deflated direction m (zero when the mean is not deflated)."""
    n, w, r = y.shape
    if r > MAX_RANK:  # the R x R tiles would spill: the same step in torch
        from ap_vllm.core.compaction import gram_orth_reference

        return gram_orth_reference(y, z, mu, count, g, passes)
    if g.shape != (n, w, w) or mu.shape != (n, w) or count.shape != (n,):
        raise ValueError(f"gram_orth_triton: shapes y {tuple(y.shape)}, mu {tuple(mu.shape)}, "
                         f"count {tuple(count.shape)}, g {tuple(g.shape)} do not fit")
    y = y.float().contiguous()
    z = z.float().contiguous()
    mu = mu.float().contiguous()
    count = count.float().contiguous()
    g = g.float().contiguous()
    out = torch.empty(n, w, r + 1, dtype=torch.float32, device=y.device)
    s_zn = 0 if z.dim() == 2 else z.stride(0)
    block_r = _pow2(r)
    if num_warps is None:  # the R x R tiles of the factorisation spread over enough threads not to spill
        num_warps = WARPS_FOR_RANK[block_r]
    _gram_orth_kernel[(n,)](
        y, z, mu, count, g, out, w, r,
        y.stride(0), y.stride(1), s_zn, z.stride(-2), mu.stride(0), g.stride(0), g.stride(1),
        out.stride(0), out.stride(1),
        SHIFT_FIRST=SHIFT_FIRST, SHIFT=SHIFT, TINY=TINY, PASSES=int(passes),
        BLOCK_W=int(block_w), BLOCK_R=block_r, num_warps=num_warps)
    return out


def device_compaction() -> dict:
    """The keyword arguments of :func:`ap_vllm.core.compaction.compact_spans` for the kernel path: the Gram
    method with this kernel as its orthonormalisation step (what the backend and the GPU benchmarks use)."""
    return dict(method="gram", orth=gram_orth_triton)
