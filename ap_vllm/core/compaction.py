"""Low-rank compaction of one layer's keys and values over a span of tokens.

For a span of T tokens, keys (and, separately, values) of all kv heads are concatenated::

    X = [x_t,0 | x_t,1 | ... | x_t,Hkv-1]_t          X in R^{T x W},  W = Hkv * d

and factorised with a truncated (randomized) SVD::

    X ~= U_R S_R V_R^T = C B,     C = U_R S_R  (T x R),   B = V_R^T  (R x W)

The singular values live in the coefficients ``C`` so the basis rows are orthonormal
(B B^T = I) and components are ordered by decreasing singular value: the first R' < R
columns of C with the first R' rows of B are the best rank-R' approximation, which is what
the two-level read (less important tokens read the first R/divisor components) relies on.

Attention never rebuilds X: a query of head h (kv head j = h // g) is projected once,
``q_proj = B[:, j*d:(j+1)*d] @ q_h`` (R numbers), and a score is ``<C[t], q_proj>``
(see :mod:`ap_vllm.core.lowrank_attention`).

Pre-RoPE keys (``rope`` given): the keys handed in are rotated (as the backend sees them);
they are first rotated back to their positions' frame, ``X_k = rot^-1(K)``, and factorised
there; a read rebuilds ``rot(C_k B_k)`` (see :mod:`ap_vllm.core.rope`).

Three implementations of the truncated SVD:

* :func:`compact_spans` / :func:`batched_randomized_svd` (what :func:`compact_span` uses, and the
  CPU backend): all spans completing in a step, zero-padded to one [S, T_max, W] batch, factorised
  on their own device with batched matrix products only, no host synchronisation (no ``.item()``,
  no ``torch.linalg.qr/svd/eigh``, whose CUDA versions read an error code on the host). See
  :func:`batched_randomized_svd` for the algorithm.
* :func:`compact_spans` (``method="gram"``) / :func:`gram_svd` (the GPU backend): the same batch by
  subspace iteration on each span's centred Gram matrix, in float32 and a fixed, small number of
  launches (its two steps are the Triton kernels of ``kernels/compaction.py``, with torch oracles
  here: :func:`gram_orth_reference`, :func:`gram_finish_reference`).
* :func:`randomized_svd`: one matrix, the textbook form with Householder QR and an exact SVD of
  the small projected matrix (reference and diagnostics).

Signs are fixed so that each basis row's largest-magnitude entry is positive.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

import torch

from .rope import RopeTable

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


# --------------------------------------------------------------------------------------
# Randomized SVD and rank selection
# --------------------------------------------------------------------------------------
def randomized_svd(
    x: torch.Tensor,
    rank: int,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD ``x ~= U diag(S) Vt`` of a T x W matrix, computed in float32.

    Returns U [T, k], S [k], Vt [k, W] with k = min(rank + oversample, T, W) components in
    decreasing order of S (callers keep the first ``rank``; the extra ones are only good for
    estimating the spectrum). When the sketch would cover the full rank the exact SVD is used.
    Deterministic for a given ``seed`` (the sketch is drawn on the CPU).
    """
    if x.dim() != 2:
        raise ValueError(f"randomized_svd expects a 2-D matrix, got shape {tuple(x.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    xf = x.float()
    t, w = xf.shape
    full = min(t, w)
    k = min(rank + oversample, full)
    if k >= full:
        u, s, vt = torch.linalg.svd(xf, full_matrices=False)
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        omega = torch.randn(w, k, generator=gen, dtype=torch.float32).to(xf.device)
        q, _ = torch.linalg.qr(xf @ omega)
        for _ in range(power_iters):
            z, _ = torch.linalg.qr(xf.T @ q)
            q, _ = torch.linalg.qr(xf @ z)
        ub, s, vt = torch.linalg.svd(q.T @ xf, full_matrices=False)
        u = q @ ub
    # deterministic signs: the largest-magnitude entry of each basis row is positive
    idx = vt.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(vt, 1, idx)).squeeze(1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, vt * sign[:, None]


def rank_for_energy(
    singular_values: torch.Tensor,
    threshold: float,
    max_rank: int,
    total_energy: Optional[float] = None,
) -> int:
    """Smallest R with sum_{i<R} s_i^2 >= threshold * total_energy, capped by ``max_rank``.

    ``total_energy`` defaults to sum(s^2); pass ||X||_F^2 when ``singular_values`` come from a
    truncated sketch (otherwise the energy fraction would be overestimated).
    """
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
    e = singular_values.double() ** 2
    total = float(e.sum()) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    hit = torch.nonzero(cum >= threshold - 1e-12)
    r = int(hit[0]) + 1 if hit.numel() else len(e)
    return max(1, min(r, max_rank))


# --------------------------------------------------------------------------------------
# Batched randomized SVD on the device, without host synchronisation
# --------------------------------------------------------------------------------------
# Every linear-algebra step below is a (batched) matrix product, ``torch.linalg.cholesky_ex``
# (no error check) or ``torch.linalg.solve_triangular`` (no error code at all). Nothing reads a
# device value on the host, so a call only enqueues kernels.
_SHIFT = 1e-11  # CholeskyQR diagonal shift, relative to trace(G) (G in float64)
_TINY = 1e-30  # absolute floor of the shift: an all-zero block stays finite (and zero)
_JACOBI_SWEEPS = 2  # odd-even neighbour Jacobi sweeps after the orthogonal iteration
_SKETCHES: dict = {}
_MAX_SKETCHES = 64


def gaussian_sketch(width: int, cols: int, seed: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Gaussian test matrix Omega [width, cols] of ``seed``, cached on ``device``.

    Drawn from a seeded CPU generator (the same numbers on every device) and copied to the
    device once per (width, cols, seed, device, dtype); later calls return the cached tensor, so
    a compaction step enqueues no host-to-device copy. The cache is per process and small (the
    few shapes of a model's layers); it is cleared when it would exceed 64 entries.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (int(width), int(cols), int(seed), dev, dtype)
    omega = _SKETCHES.get(key)
    if omega is None:
        if len(_SKETCHES) >= _MAX_SKETCHES:
            _SKETCHES.clear()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        omega = torch.randn(int(width), int(cols), generator=gen, dtype=torch.float32).to(device=dev, dtype=dtype)
        _SKETCHES[key] = omega
    return omega


def span_sketches(width: int, cols: int, seeds: Sequence[int], device) -> torch.Tensor:
    """[len(seeds), width, cols]: the sketch of ``seeds[i]`` (:func:`gaussian_sketch`) for matrix i of a batch,
    cached like it (one device tensor per seed sequence, so a step enqueues no copy; one seed for all: a
    broadcast view)."""
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) == 1:
        return gaussian_sketch(width, cols, seeds[0], device).expand(len(seeds), width, cols)
    first = gaussian_sketch(width, cols, seeds[0], device)
    key = ("stack", int(width), int(cols), seeds, first.device)
    stack = _SKETCHES.get(key)
    if stack is None:
        stack = torch.stack([gaussian_sketch(width, cols, s, device) for s in seeds])
        if len(_SKETCHES) >= _MAX_SKETCHES:
            _SKETCHES.clear()
        _SKETCHES[key] = stack
    return stack


def cholesky_qr(y: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Orthonormal columns spanning those of ``y`` [..., m, n], in nested (Gram-Schmidt) order.

    Shifted CholeskyQR (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020); the n x n Gram
    matrix and its factor in float64, the tall product in ``y``'s dtype::

        G = Y^T Y + s I,   s = 1e-11 trace(G) + 1e-30,   L L^T = G (cholesky_ex),   Y <- Y L^-T

    Y L^-T = Y R^-1 with R = L^T upper triangular, so column j of the result is a combination
    of columns 0..j of Y: the spans of leading columns are preserved, as Gram-Schmidt does.
    One pass leaves an orthogonality error of about eps * cond(Y)^2 (Gram in float64) plus
    eps(y.dtype) * cond(Y) (the product); the shift keeps the Cholesky factorisation defined for
    rank-deficient Y (zero-padded spans, T < n) and bounds cond(Q) after the first pass by about
    1/sqrt(1e-11), so a second pass ("CholeskyQR2") restores orthonormality to the rounding of
    ``y``'s dtype. Directions of Y whose squared singular value is below ~1e-11 trace(G) are
    damped towards zero instead of normalised: such columns come out as (near-)zero vectors,
    never as NaN. L^-T is formed explicitly (a small triangular solve) and applied as a matrix
    product, which is faster than a tall triangular solve on both CPU and GPU.
    """
    n = y.shape[-1]
    eye = torch.eye(n, dtype=torch.float64, device=y.device)
    q = y
    for _ in range(passes):
        qd = q.double()
        g = qd.mT @ qd
        tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)
        l, _ = torch.linalg.cholesky_ex(g + (_SHIFT * tr + _TINY)[..., None, None] * eye)
        l_inv_t = torch.linalg.solve_triangular(l, eye, upper=False).mT  # L^-T, upper triangular
        q = q @ l_inv_t.to(q.dtype)
    return q


def _cholesky_qr_fixed_shift(y: torch.Tensor, shift_eye: torch.Tensor) -> torch.Tensor:
    """One CholeskyQR pass of a float64 batch y [N, m, n] with a fixed shift (``shift_eye`` = s I):
    y L^-T, L L^T = y^T y + s I. Three calls (baddbmm, cholesky_ex, triangular solve): the inner
    loop of :func:`_top_eigenvectors`, where the scale of y is known (trace(y^T y) <= 1)."""
    l, _ = torch.linalg.cholesky_ex(torch.baddbmm(shift_eye, y.mT, y))
    return torch.linalg.solve_triangular(l.mT, y, upper=True, left=False)


def _neighbour_jacobi(h: torch.Tensor, v: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Odd-even Jacobi on neighbouring columns: ``v`` [N, k, n] with h = v^T M v [N, n, n] nearly
    diagonal; returns v J where J is a product of 2 x 2 rotations of columns (j, j+1).

    A round rotates the disjoint pairs (j, j+1), j = offset, offset + 2, ..., by the angle
    theta = atan2(2 h_{j,j+1}, h_jj - h_{j+1,j+1}) / 2, which diagonalises each 2 x 2 block and
    puts its larger eigenvalue first (theta = pi/2 swaps two columns in the wrong order); a sweep
    is the even round then the odd round. Orthogonal iteration leaves eigenvectors mixed mostly
    with their neighbours in the spectrum (the mixing of j and l decays like
    (lambda_l / lambda_j)^iters), and a bad start leaves two neighbours nearly swapped; a few
    sweeps fix both. Rotations are orthogonal, so v stays orthonormal.
    """
    n_batch, _, n = h.shape
    for _ in range(sweeps):
        for offset in (0, 1):
            pairs = (n - offset) // 2
            if pairs == 0:
                continue
            d = h.diagonal(dim1=-2, dim2=-1)
            a = d[:, offset:offset + 2 * pairs:2]
            c = d[:, offset + 1:offset + 2 * pairs:2]
            b = h.diagonal(offset=1, dim1=-2, dim2=-1)[:, offset:offset + 2 * pairs:2]
            theta = 0.5 * torch.atan2(2 * b, a - c)
            cs, sn = torch.cos(theta), torch.sin(theta)
            one = h.new_ones(n_batch, 1)
            zero = h.new_zeros(n_batch, 1)
            head, tail = n - offset - 2 * pairs, offset
            diag = torch.cat([one.expand(-1, tail), torch.stack([cs, cs], -1).reshape(n_batch, -1),
                              one.expand(-1, head)], -1)
            sub = torch.cat([zero.expand(-1, tail), torch.stack([sn, zero.expand(-1, pairs)], -1).reshape(n_batch, -1),
                             zero.expand(-1, head)], -1)[:, : n - 1]  # J[j+1, j] = sin at the pairs' j
            j = torch.diag_embed(diag) + torch.diag_embed(sub, offset=-1) - torch.diag_embed(sub, offset=1)
            h = j.mT @ h @ j
            v = v @ j
    return v


def _top_eigenvectors(m: torch.Tensor, r: int, iters: int) -> torch.Tensor:
    """Leading r eigenvectors [..., k, r] of symmetric PSD m [..., k, k] (float64), in decreasing
    order of eigenvalue, by orthogonal iteration on the Cholesky factor and a Jacobi polish.

    M is scaled to trace 1 and factorised, L L^T = M + s I (s = 1e-11, cholesky_ex). Starting
    from V = I_k, each iteration is V <- orth(L orth(L^T V)) = orth(M V) with the two factors
    orthonormalised separately (one CholeskyQR pass each, shift s): a pass sees
    cond(L^T V) <= sqrt(lambda_1 / lambda_k), where orth(M V) directly would see lambda_1 / lambda_k
    and, after the squaring inside CholeskyQR, lose eigen-directions below
    lambda_j / lambda_1 ~ 1e-5.5 (as would repeated squaring M <- M^2, which pushes small
    eigenvalues below rounding). Column j converges to eigenvector j like
    (lambda_{j+1} / lambda_j)^iters times the tangent of its starting angle (nested columns:
    Gram-Schmidt order); that tangent is heavy-tailed (a ratio of Gaussian weights in the sketch),
    so a few neighbouring pairs can stay mixed or swapped. :func:`_neighbour_jacobi` on
    V^T M V then diagonalises and orders neighbouring pairs; near-equal eigenvalues may stay mixed,
    which changes the energy captured by any prefix of columns very little.
    """
    lead, k = m.shape[:-2], m.shape[-1]
    m3 = m.reshape(-1, k, k)
    tr = m3.diagonal(dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(k, dtype=torch.float64, device=m.device)
    l, _ = torch.linalg.cholesky_ex(m3 / (tr + _TINY)[:, None, None] + _SHIFT * eye)  # trace(L L^T) <= 1 + k s
    shift_r = (_SHIFT * eye)[None]
    v = eye.expand(m3.shape[0], k, k)
    for _ in range(iters):
        z = _cholesky_qr_fixed_shift(torch.bmm(l.mT, v), shift_r)
        v = _cholesky_qr_fixed_shift(torch.bmm(l, z), shift_r)
    v = _neighbour_jacobi(v.mT @ m3 @ v, v, _JACOBI_SWEEPS)
    return v[..., :r].reshape(*lead, k, r)


def batched_randomized_svd(
    x: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    refine_iters: int = 16,
    seed: int = 0,
    sketch: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD X_i ~= C_i B_i of a batch x [..., T, W], on x's device, without host sync.

    Returns coefficients C [..., T, R], basis B [..., R, W] (float32, rows orthonormal or zero)
    and s [..., R] = column norms of C (the singular values of the approximation). Components
    are ordered by decreasing singular value, so C[..., :r] B[..., :r, :] is a near-optimal
    rank-r approximation for every r <= R; the sign of each basis row makes its largest-magnitude
    entry positive. Shorter spans are zero-padded rows: zero rows change neither the row space
    nor the singular values. Components a span does not have (T < R, rank-deficient, all zero)
    come out as zero columns / rows (as :func:`pad_ranks` stores them). R = min(rank, W);
    with ``rank`` > W the trailing components are zero.

    Algorithm (each matrix X = x_i in float32, k = min(R + oversample, W)):

    1. Range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4): Omega [W, k] Gaussian
       (:func:`gaussian_sketch`, or ``sketch`` broadcastable to [..., W, k]),
       Q = orth(X Omega); ``power_iters`` times: Q = orth(X orth(X^T Q)). orth is
       :func:`cholesky_qr` (CholeskyQR2). With q power iterations the sketch sees the spectrum
       sigma^(2q+1), so the rank-R error is within a small factor of the Eckart-Young optimum
       sqrt(sum_{j>=R} sigma_j^2) even for slowly decaying spectra.
    2. Projection B = Q^T X [k, W]: X ~= Q B, and the SVD of X restricted to range(Q) is that of
       B. M = B B^T [k, k] (float64) has eigenvalues sigma_j(B)^2; take its Cholesky factor
       L L^T = M (shifted, cholesky_ex).
    3. Eigenvectors of M by orthogonal (subspace) iteration, started from I_k:
       ``refine_iters`` times V = orth(L orth(L^T V)), i.e. V <- orth(M V) with the two half-steps
       orthonormalised separately, so each CholeskyQR sees cond(L^T V) <= sigma_1/sigma_k instead
       of its square. Nested-column orthonormalisation makes column j converge to eigenvector j
       at the rate (sigma_{j+1}/sigma_j)^(2 n): columns come out ordered by decreasing eigenvalue.
       Then two odd-even sweeps of 2 x 2 Jacobi rotations of neighbouring columns on V^T M V fix
       the pairs that a bad start left mixed or swapped (see :func:`_top_eigenvectors`). Where
       consecutive singular values are close the columns may stay mixed, which costs almost
       nothing in Frobenius error (the mixed components carry nearly the same energy).
       Repeated squaring M <- M^2 would widen the gaps faster but pushes the small
       eigen-directions below float rounding (sigma_R/sigma_1 = 1e-2 is already lost in M^4 in
       float64), and CholeskyQR of M^p V squares cond again; it is not used. The first R
       columns are kept.
    4. basis = rows of V^T B orthonormalised (CholeskyQR2 on (V^T B)^T, which keeps their order;
       rows with near-zero energy come out as zero rows), signs fixed without host branching
       (argmax / gather / sign), and C = x basis^T computed from the input itself, so C B is the
       orthogonal projection of each x_i onto the basis rows.

    Cost per matrix: (2 power_iters + 3) T W k multiply-adds for the products with X (float32),
    O(T k^2) float64 for the tall CholeskyQRs, O(refine_iters k^3) float64 for step 3. Kernel
    launches do not depend on the number of matrices in the batch.
    """
    if x.dim() < 2:
        raise ValueError(f"batched_randomized_svd expects [..., T, W], got shape {tuple(x.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    *_, t, w = x.shape
    r = min(rank, w)
    k = min(r + oversample, w)
    xf = x.float()  # no normalisation needed: the CholeskyQR shifts are relative to traces
    omega = gaussian_sketch(w, k, seed, x.device) if sketch is None else sketch.to(device=x.device,
                                                                                    dtype=torch.float32)
    if omega.shape[-2:] != (w, k):
        raise ValueError(f"sketch must be [..., {w}, {k}], got {tuple(omega.shape)}")
    # 1. range finder with power iterations
    # (one CholeskyQR pass keeps an iterate well conditioned, which is all the next product
    # needs; the basis that B is projected on gets two)
    q = cholesky_qr(xf @ omega, passes=1 if power_iters else 2)  # [..., T, k]
    for i in range(power_iters):
        q = cholesky_qr(xf @ cholesky_qr(xf.mT @ q, passes=1), passes=2 if i == power_iters - 1 else 1)
    # 2. projection, 3. top-R eigenvectors of B B^T
    b = (q.mT @ xf).double()  # [..., k, W]
    v = _top_eigenvectors(b @ b.mT, r, refine_iters)  # [..., k, r]
    # 4. ordered orthonormal basis, zero rows for absent components, signs, coefficients
    basis = cholesky_qr((v.mT @ b).mT).mT  # [..., r, W] float64
    present = basis.square().sum(-1, keepdim=True) > 0.5
    basis = torch.where(present, basis, torch.zeros_like(basis)).float()
    idx = basis.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(basis, -1, idx))
    basis = basis * torch.where(sign == 0, torch.ones_like(sign), sign)
    coeff = xf @ basis.mT  # [..., T, r]
    if r < rank:  # more components asked for than the width has: zero ones
        coeff = torch.cat([coeff, coeff.new_zeros(*coeff.shape[:-1], rank - r)], -1)
        basis = torch.cat([basis, basis.new_zeros(*basis.shape[:-2], rank - r, w)], -2)
    return coeff, basis, coeff.square().sum(-2).sqrt()


# --------------------------------------------------------------------------------------
# Gram-space subspace iteration: float32, a handful of launches (the device path)
# --------------------------------------------------------------------------------------
# The most span tokens one compaction call of the backend takes (a step's spans of every layer are split into
# calls of at most this many). Transient bytes a token (W = kv heads x head size, model dtype 2 bytes): the
# padded batch of K and V (4 W), one float32 copy of both, centred in place (8 W), the candidates, Gram matrices
# and results; measured on CPU at W = 512 (28 spans of 1024 tokens): 11.0 KB a token (17.5 KB when a centred
# copy was kept beside the uncentred one and the cap was 65,536), so ~1.3 GB at this cap, which takes a
# 4096-token image's spans of 28 layers in one call.
COMPACTION_CALL_TOKENS = 28 * 4096
GRAM_SHIFT_FIRST = 1e-5  # the shifts of the Gram path's CholeskyQR passes (as kernels/compaction.py)
GRAM_SHIFT = 1e-7
GRAM_PASSES = 3  # CholeskyQR passes of the last step (measured: 2 at the end leave 2e-2)
GRAM_INNER_PASSES = 2  # CholeskyQR passes of the other steps (1 missed 5 % of Eckart-Young by far: 1.68x)
GRAM_ABSENT = 1e-10  # a component with less than this fraction of the candidates' energy is absent (zeroed)


def gram_orth_reference(y: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, count: torch.Tensor, g: torch.Tensor,
                        passes: int = GRAM_PASSES) -> torch.Tensor:
    """One step of :func:`gram_svd` after the product y = G_c z: deflate, then orthonormalise (torch oracle of
    ``kernels/compaction.py``, whose docstring has the math). ``y`` [N, W, R], ``z`` [N, W, R] or [W, R],
    ``mu`` [N, W] (mean row), ``count`` [N] (tokens), ``g`` = G_c [N, W, W]. Returns [N, W, R + 1] float32:
    orthonormal columns in nested order, then the deflated direction (zero when not deflated)."""
    y, z, mu, count, g = y.float(), z.float(), mu.float(), count.float(), g.float()
    r = y.shape[-1]
    musq = mu.square().sum(-1)
    tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)
    deflate = (count * musq >= tr) & (musq > 0)
    m = torch.where(deflate[:, None], mu * musq.clamp_min(1e-30).rsqrt()[:, None], torch.zeros_like(mu))
    u = torch.where(deflate[:, None], torch.zeros_like(mu), mu * count.sqrt()[:, None])
    y = y + u[:, :, None] * (u[:, None, :] @ z) - m[:, :, None] * (m[:, None, :] @ y)
    eye = torch.eye(r, dtype=torch.float32, device=y.device)
    for p in range(passes):
        s = y.mT @ y
        eps = GRAM_SHIFT_FIRST if p == 0 else GRAM_SHIFT
        s = s + (eps * s.diagonal(dim1=-2, dim2=-1).sum(-1) + _TINY)[:, None, None] * eye
        l, _ = torch.linalg.cholesky_ex(s)
        y = torch.linalg.solve_triangular(l.mT, y, upper=True, left=False)
    return torch.cat([y, m[:, :, None]], -1)


def gram_svd(
    x: torch.Tensor,
    rank: int,
    *,
    iters: int = 4,
    seed: int = 0,
    sketch: Optional[torch.Tensor] = None,
    lengths: Optional[Sequence[int]] = None,
    orth=None,
    finish=None,
    products=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD X_i ~= C_i B_i of a batch x [N, T, W] (rows past ``lengths[i]`` zero) by subspace
    iteration on the centred Gram matrix, in float32 with a fixed, small number of launches and no host sync.
    Same results as :func:`batched_randomized_svd`: C [N, T, R], B [N, R, W] (rows orthonormal or zero,
    ordered by decreasing energy, signs fixed), s [N, R] (column norms of C).

    Algorithm, per matrix (mu: mean row over its c tokens, X_c = X - 1 mu^T, G_c = X_c^T X_c):

    1. Z_0 = Omega [W, R] (:func:`gaussian_sketch`), ``iters`` times Z <- orth(G Z), with G = X^T X applied as
       G_c Z + c mu (mu^T Z): one batched product and one :func:`gram_orth_reference` step (or ``orth``, the
       Triton kernel of ``kernels/compaction.py``; two CholeskyQR passes per step, three in the last, which
       leaves the basis orthonormal to float32 rounding). After ``iters`` steps the columns span the dominant
       subspace of G^iters Omega, in nested (Gram-Schmidt) order.
    2. When the mean dominates (c ||mu||^2 >= trace(G_c): keys with a large bias), G's condition number would
       exceed float32 (lambda_1 / lambda_R of G is (sigma_1 / sigma_R)^2); the iteration then runs on
       P G_c P, P = I - m m^T, m = mu / ||mu||, whose spectrum is that of the centred keys, and m is kept as a
       candidate direction (X P = X_c P, so nothing is approximated).
    3. Candidates [Z | m] (R + 1 orthonormal columns), coefficients X [Z | m], energies = column norms^2; the R
       most energetic, in decreasing order, are kept; components with less than 1e-10 of the energy are
       absent (zero), as are a non-deflated m's. Signs: each basis row's largest-magnitude entry positive.

    ``iters`` = ``power_iters`` + 2 sees G^4 for the default 2, the spectrum to the same power as the sketch
    path's range finder (sigma^5) and its final product; measured within 5% of Eckart-Young at R and R/4 on
    the test spectra (tests/core/test_compaction_gram.py). Launches with the kernels: 3 (mean, centring,
    Gram) + 2 per iteration + 1 (coefficients) + 1 (``finish``), independent of N.

    ``products`` (:class:`GramProductsReference`, or the kernels' ``GramProducts``, the device path): G_c and
    the finish from X in its own dtype, no float32 copy of it: the candidates' energies are
    z^T G_c z + c (mu^T z)^2 and the coefficients one product X B^T of the chosen basis.
    """
    coeff, _, basis, s = _gram_factor(x, rank, iters, seed, sketch, lengths, orth, finish, products=products)
    return coeff, basis, s


def _gram_factor(x, rank, iters, seed, sketch, lengths, orth, finish, owned=False, products=None, **finish_opts):
    """:func:`gram_svd`'s work; ``finish_opts`` (energy_threshold, coefficient_dtype, dtype) go to the finish.
    ``owned``: x is a float32 copy of the caller's own, centred in place (no second [N, T, W] float32 copy; the
    candidates' coefficients are then X_c [Z | m] + 1 mu^T [Z | m], the same product). ``products``
    (:class:`GramProductsReference` or the kernels' ``GramProducts``): the Gram matrix and the finish taken
    from x in its own dtype (rows past ``lengths`` must be zero), in place of the float32 copy, the products
    and ``finish``."""
    if x.dim() != 3:
        raise ValueError(f"gram_svd expects [N, T, W], got shape {tuple(x.shape)}")
    if rank < 1 or iters < 1:
        raise ValueError(f"rank and iters must be >= 1, got {rank}, {iters}")
    n, t, w = x.shape
    r = min(rank, w)
    if orth is None or r > getattr(orth, "max_rank", r):  # (a kernel says up to which rank it runs)
        orth = gram_orth_reference
    if products is not None:
        if finish is not None or owned:
            raise ValueError("gram_svd: products replace the float32 copy and the finish: give products, or "
                             "finish / owned, not both")
        if lengths is None or min(lengths) == t:
            count = torch.full((n,), t, dtype=torch.float32, device=x.device)
        else:
            rows = torch.arange(t, device=x.device)
            count = torch.stack([rows < c for c in lengths]).float().sum(-1)  # host ints only
        mu = x.sum(-2, dtype=torch.float32) / count[:, None]  # (rows past a length are zero)
        g = products.gram(x, mu, count)
    else:
        g, mu, count, xc = _centred_gram(x, lengths, owned)
    z = gaussian_sketch(w, r, seed, x.device) if sketch is None else sketch.to(device=x.device, dtype=torch.float32)
    if z.shape[-2:] != (w, r):
        raise ValueError(f"sketch must be [..., {w}, {r}], got {tuple(z.shape)}")
    zb = None
    for i in range(iters):  # two CholeskyQR passes keep an iterate orthonormal enough; the last gets three
        zb = orth(g @ z, z, mu, count, g, GRAM_PASSES if i == iters - 1 else GRAM_INNER_PASSES)
        z = zb[..., :r]
    if products is not None:
        return products.finish(x, zb, g @ zb, g, mu, count, rank, absent=GRAM_ABSENT, **finish_opts)
    cand = xc @ zb  # [N, T, R + 1]: X_c [Z | m]; the finish adds 1 mu^T [Z | m] (centred=True)
    return (finish or gram_finish_reference)(cand, zb, g, mu, count, rank, absent=GRAM_ABSENT, centred=True,
                                             **finish_opts)


def _centred_gram(x, lengths, owned):
    """(G_c, mu, count, X_c) from a float32 copy of x (or x itself, ``owned``), centred in place."""
    n, t, _ = x.shape
    xf = x.float()
    in_place = owned or xf.data_ptr() != x.data_ptr()  # (a float32 copy made here is ours too)
    if lengths is None or min(lengths) == t:
        mu = xf.mean(-2)
        xc = xf.sub_(mu[:, None, :]) if in_place else xf - mu[:, None, :]
        count = torch.full((n,), t, dtype=torch.float32, device=x.device)
    else:
        rows = torch.arange(t, device=x.device)
        keep = torch.stack([rows < c for c in lengths]).float()  # host ints only
        count = keep.sum(-1)
        mu = xf.sum(-2) / count[:, None]
        xc = (xf.sub_(mu[:, None, :]) if in_place else xf - mu[:, None, :]).mul_(keep[:, :, None])
    return xc.mT @ xc, mu, count, xc


def gram_finish_reference(cand: torch.Tensor, zb: torch.Tensor, g: torch.Tensor, mu: torch.Tensor,
                          count: torch.Tensor, rank: int, *, energy_threshold: Optional[float] = None,
                          coefficient_dtype: Literal["model", "fp8_e4m3"] = "model",
                          dtype: torch.dtype = torch.float32, absent: float = GRAM_ABSENT, centred: bool = False):
    """The end of :func:`gram_svd` (torch oracle of ``kernels/compaction.py``'s finishing launch): from the
    candidates' coefficients ``cand`` = X [Z | m] [N, T, R + 1] and directions ``zb`` [N, W, R + 1], keep the
    R = min(rank, W) most energetic (energy e_j = ||cand[:, j]||^2, stable descending order), zero those with
    e_j <= ``absent`` sum(e), fix signs (each basis row's largest-magnitude entry positive), with
    ``energy_threshold`` zero component j when sum_{l<j} e_l >= threshold ||X||^2 (||X||^2 = trace(G_c) +
    c ||mu||^2; the first component is always kept), and store: coefficients in ``dtype`` or FP8 e4m3 with a
    per-token scale (:func:`quantize_fp8`), basis rows in ``dtype``. Components beyond W are zero.

    ``centred``: ``cand`` holds X_c [Z | m] (X_c = X - 1 mu^T on each matrix's first ``count`` rows, zero past
    them) and the candidates are cand + 1 mu^T [Z | m] on those rows: the caller centres its only float32 copy
    of X in place.

    Returns coeff [N, T, rank], scale [N, T] float32 or None, basis [N, rank, W], s [N, rank] float32."""
    t = cand.shape[1]
    if centred:
        rows = (torch.arange(t, device=cand.device)[None, :] < count[:, None]).float()  # [N, T]
        cand = cand + rows[:, :, None] * (mu.float()[:, None, :] @ zb)
    e = cand.square().sum(-2)
    order, mult, basis, s = _gram_select(e, zb, g, mu, count, rank, energy_threshold, absent)
    coeff = torch.take_along_dim(cand, order[:, None, :], -1) * mult[:, None, :]
    return _stored(coeff, basis, s, rank, coefficient_dtype, dtype)


def _gram_select(e, zb, g, mu, count, rank, energy_threshold, absent):
    """The finish's choice from the candidates' energies e [N, R + 1]: the R = min(rank, W) most energetic in
    stable descending order (``order`` [N, R]); ``mult`` [N, R]: each one's sign (its direction's
    largest-magnitude entry, the first of equal ones, made positive), 0 where absent or past the energy
    threshold; the basis [N, R, W] (directions times ``mult``) and s [N, R] (sqrt of the energies times |mult|)."""
    r = min(rank, zb.shape[1])
    order = torch.argsort(e, dim=-1, descending=True, stable=True)[..., :r]
    present = torch.take_along_dim(e, order, -1)
    keep = present > absent * e.sum(-1, keepdim=True)
    if energy_threshold is not None:
        total = g.diagonal(dim1=-2, dim2=-1).sum(-1) + count * mu.square().sum(-1)
        prior = torch.cumsum(present, -1) - present
        first = torch.arange(r, device=e.device) == 0
        keep = keep & ((prior < (energy_threshold - 1e-12) * total[:, None]) | first)
    dirs = torch.take_along_dim(zb, order[:, None, :], -1).mT  # [N, R, W]
    sign = torch.sign(torch.gather(dirs, -1, dirs.abs().argmax(dim=-1, keepdim=True)))[..., 0]
    mult = torch.where(sign == 0, torch.ones_like(sign), sign) * keep
    return order, mult, dirs * mult[:, :, None], present.clamp_min(0).sqrt() * keep


def _stored(coeff, basis, s, rank, coefficient_dtype, dtype):
    """Pads R = min(rank, W) components to ``rank`` and stores: coefficients in ``dtype`` or FP8 e4m3 with a
    per-token scale (:func:`quantize_fp8`), basis rows in ``dtype``. Returns (coeff, scale or None, basis, s)."""
    n, t, r = coeff.shape
    w = basis.shape[-1]
    if r < rank:
        coeff = torch.cat([coeff, coeff.new_zeros(n, t, rank - r)], -1)
        basis = torch.cat([basis, basis.new_zeros(n, rank - r, w)], -2)
        s = torch.cat([s, s.new_zeros(n, rank - r)], -1)
    scale = None
    if coefficient_dtype == "fp8_e4m3":
        coeff, scale = quantize_fp8(coeff)
    else:
        coeff = coeff.to(dtype)
    return coeff, scale, basis.to(dtype), s


class GramProductsReference:
    """Torch oracle of ``kernels/compaction.py``'s :class:`GramProducts`: the Gram path's products taken from X
    in its own dtype (the caller keeps no float32 copy of X).

    * :meth:`gram`: G_c = X_c^T X_c, X_c = X - 1 mu^T on each matrix's first c rows (0 past them);
    * :meth:`finish`: the candidates' energies from G_c, no pass over the tokens,
      ``e_j = ||X z_j||^2 = z_j^T G_c z_j + c (mu^T z_j)^2`` (1^T X_c = 0), the selection of
      :func:`gram_finish_reference`, then the coefficients as one product C = X B^T (B: the kept, signed
      directions in float32) on the c rows, stored as that finish stores them."""

    @staticmethod
    def _rows(x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return (torch.arange(x.shape[1], device=x.device)[None, :] < count[:, None]).float()  # [N, T]

    def gram(self, x: torch.Tensor, mu: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        xc = (x.float() - mu.float()[:, None, :]) * self._rows(x, count)[:, :, None]
        return xc.mT @ xc

    def finish(self, x: torch.Tensor, zb: torch.Tensor, gzb: torch.Tensor, g: torch.Tensor, mu: torch.Tensor,
               count: torch.Tensor, rank: int, *, energy_threshold: Optional[float] = None,
               coefficient_dtype: Literal["model", "fp8_e4m3"] = "model", dtype: torch.dtype = torch.float32,
               absent: float = GRAM_ABSENT):
        zb = zb.float()
        e = (zb * gzb.float()).sum(-2).clamp_min(0) + count[:, None] * (mu.float()[:, None, :] @ zb)[:, 0].square()
        _, mult, basis, s = _gram_select(e, zb, g, mu, count, rank, energy_threshold, absent)
        coeff = self.project(x.float() * self._rows(x, count)[:, :, None], basis)
        return _stored(coeff, basis, s, rank, coefficient_dtype, dtype)

    def project(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """The coefficients X B^T (x [N, T, W] float32, zero past each matrix's rows; basis [N, R, W])."""
        return x @ basis.mT


# --------------------------------------------------------------------------------------
# FP8 coefficients with a per-token scale
# --------------------------------------------------------------------------------------
def quantize_fp8(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) FP8 e4m3 quantisation: c[t] ~= q[t].float() * scale[t] (``c`` [..., T, R]).

    scale[t] = max_r |c[t, r]| / 448 (1 for all-zero rows); returned as float32.
    """
    cf = c.float()
    amax = cf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (cf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(c: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 coefficients from stored ones (model dtype, or FP8 with per-token scale)."""
    cf = c.float()
    return cf if scale is None else cf * scale.float()[..., None]


# --------------------------------------------------------------------------------------
# The compacted span
# --------------------------------------------------------------------------------------
@dataclass
class CompactedSpan:
    """K and V of one layer over tokens [start, start + T), stored as coefficients x basis.

    Math (W = num_kv_heads * head_size, kv head j occupies columns j*d:(j+1)*d)::

        K[t, j, :] ~= (C_k[t] * s_k[t]) @ B_k[:, j*d:(j+1)*d]      C_k: T x R_k, B_k: R_k x W
        V[t, j, :] ~= (C_v[t] * s_v[t]) @ B_v[:, j*d:(j+1)*d]      C_v: T x R_v, B_v: R_v x W

    with s = 1 unless the coefficients are FP8 (then s is the per-token scale). With ``rope``
    (pre-RoPE key space) the key factors hold un-rotated keys: K[t] = rot_{start+t}(C_k[t] B_k).
    Rows of B are orthonormal and ordered by decreasing singular value.
    ``importance[t]`` is the EMA of the head-averaged attention probability of token t,
    used to pick which tokens are read at full rank (:mod:`ap_vllm.core.lowrank_attention`).
    """

    coeff_k: torch.Tensor  # [T, R_k] model dtype or float8_e4m3fn
    basis_k: torch.Tensor  # [R_k, W] model dtype
    coeff_v: torch.Tensor  # [T, R_v]
    basis_v: torch.Tensor  # [R_v, W]
    num_kv_heads: int
    head_size: int
    start: int = 0  # absolute position of the first token
    scale_k: Optional[torch.Tensor] = None  # [T] float32 (FP8 only)
    scale_v: Optional[torch.Tensor] = None
    importance: torch.Tensor = field(default=None)  # [T] float32
    singular_values_k: Optional[torch.Tensor] = None  # diagnostics (sketch spectrum)
    singular_values_v: Optional[torch.Tensor] = None
    rope: Optional[RopeTable] = None  # set: keys are factorised before RoPE (key_space="pre_rope")

    def __post_init__(self) -> None:
        if self.importance is None:
            self.importance = torch.zeros(self.num_tokens, dtype=torch.float32, device=self.coeff_k.device)

    # shapes
    @property
    def num_tokens(self) -> int:
        return self.coeff_k.shape[0]

    @property
    def key_rank(self) -> int:
        return self.coeff_k.shape[1]

    @property
    def value_rank(self) -> int:
        return self.coeff_v.shape[1]

    @property
    def width(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.num_tokens, device=self.coeff_k.device)

    # float32 views
    def coeff_k_float(self) -> torch.Tensor:
        return dequantize(self.coeff_k, self.scale_k)

    def coeff_v_float(self) -> torch.Tensor:
        return dequantize(self.coeff_v, self.scale_v)

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [T, Hkv, d] in float32 (tests and diagnostics only; attention never does this)."""
        shp = (self.num_tokens, self.num_kv_heads, self.head_size)
        k = (self.coeff_k_float() @ self.basis_k.float()).reshape(shp)
        v = (self.coeff_v_float() @ self.basis_v.float()).reshape(shp)
        if self.rope is not None:
            k = self.rope.rotate(k, self.positions)
        return k, v

    # memory accounting
    def nbytes(self) -> int:
        """Bytes of the compact form: coefficients + bases + per-token extras (scales, importance)."""
        n = sum(t.numel() * t.element_size() for t in (self.coeff_k, self.coeff_v, self.basis_k, self.basis_v))
        for extra in (self.scale_k, self.scale_v, self.importance):
            if extra is not None:
                n += extra.numel() * extra.element_size()
        return n

    def full_nbytes(self) -> int:
        """Bytes of the exact K and V of the span in the model dtype."""
        return 2 * self.num_tokens * self.width * self.basis_k.element_size()

    def memory_ratio(self) -> float:
        """full bytes / (coefficient bytes + basis bytes + per-token extras)."""
        return self.full_nbytes() / self.nbytes()


Spans = Union[Sequence[torch.Tensor], torch.Tensor]


def _host_ints(values: Sequence, what: str) -> list[int]:
    """Python ints from host integers; a tensor is refused (reading it would sync the device)."""
    out = []
    for n in values:
        if isinstance(n, torch.Tensor) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{what} must be host integers (not tensors), got {type(n).__name__}")
        out.append(int(n))
    return out


def _padded(x: Spans, lengths: Optional[Sequence[int]], what: str,
            out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[int]]:
    """[S, T_max, Hkv, d] with rows past each span's length zero, and the lengths (host ints). ``out``: where S
    spans of one length are stacked, when its shape and dtype fit (else a new tensor, as without it)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"padded {what} must be [S, T_max, Hkv, d], got {tuple(x.shape)}")
        s, tmax = x.shape[:2]
        lens = [tmax] * s if lengths is None else _host_ints(lengths, "lengths")
        if len(lens) != s or any(not (0 < n <= tmax) for n in lens):
            raise ValueError(f"lengths {lens} do not fit {what} of shape {tuple(x.shape)}")
        if min(lens) < tmax:  # rows past a span's end may hold anything: zero them (no in-place write)
            rows = torch.arange(tmax, device=x.device)
            keep = torch.stack([rows < n for n in lens])  # host ints only: no host-to-device copy
            x = x * keep[:, :, None, None].to(x.dtype)
        return x, lens
    spans = list(x)
    if not spans or any(t.dim() != 3 or t.shape[1:] != spans[0].shape[1:] or t.shape[0] < 1 for t in spans):
        raise ValueError(f"{what} must be non-empty [T_i, Hkv, d] tensors of one Hkv, d: "
                         f"{[tuple(t.shape) for t in spans]}")
    if lengths is not None and _host_ints(lengths, "lengths") != [t.shape[0] for t in spans]:
        raise ValueError(f"lengths {list(lengths)} differ from the spans' lengths")
    lens = [t.shape[0] for t in spans]
    if min(lens) == max(lens):  # one launch
        if out is not None and out.shape == (len(spans), *spans[0].shape) and out.dtype == spans[0].dtype:
            return torch.stack(spans, out=out), lens
        return torch.stack(spans), lens
    return torch.nn.utils.rnn.pad_sequence(spans, batch_first=True), lens


def compact_spans(
    keys: Spans,
    values: Spans,
    key_rank: int,
    value_rank: int,
    *,
    lengths: Optional[Sequence[int]] = None,
    starts: Optional[Sequence[int]] = None,
    energy_threshold: Optional[float] = None,
    oversample: int = 8,
    power_iters: int = 2,
    refine_iters: int = 16,
    seed: Union[int, Sequence[int]] = 0,
    coefficient_dtype: Literal["model", "fp8_e4m3"] = "model",
    importance: Optional[Sequence[Optional[torch.Tensor]]] = None,
    rope: Optional[RopeTable] = None,
    method: Literal["sketch", "gram"] = "sketch",
    orth=None,
    finish=None,
    products=None,
) -> list[CompactedSpan]:
    """Compact S spans of one layer at once: one batched factorisation for all their K (and V).

    ``keys``/``values``: S tensors [T_i, Hkv, d] (lengths may differ), or padded [S, T_max, Hkv, d]
    with ``lengths`` (host ints; rows past a length are ignored). All spans share ``key_rank`` and
    ``value_rank`` (group spans by rank before calling). ``starts[i]``: absolute position of span
    i's first token (default 0), used with ``rope`` (pre-RoPE keys: each span is rotated back at
    its own positions before factorising, see :mod:`ap_vllm.core.rope`).

    Math: X_i (zero-padded to T_max rows) ~= C_i B_i by :func:`batched_randomized_svd` over the
    S spans; keys use the sketch of ``seed``, values that of ``seed + 1`` (as :func:`compact_span`), or with S
    seeds, span i those of ``seed[i]`` and ``seed[i] + 1`` (spans of several layers in one call, each with its
    layer's seed, factorised exactly as one call per layer would); with equal ranks K and V are one batch of 2S
    matrices. Every span gets exactly
    ``key_rank``/``value_rank`` components; those a span does not have (T_i < R, rank-deficient)
    are zero columns/rows, as :func:`pad_ranks` would store them. ``energy_threshold`` e: component
    j of span i is kept iff sum_{l<j} s_l^2 < e ||X_i||_F^2 (the smallest rank keeping that fraction,
    as :func:`rank_for_energy`), the others are zeroed, not cut, so the ranks stay those of the layout.

    ``method``: ``"sketch"`` (:func:`batched_randomized_svd`, float64 small factorisations: the CPU path) or
    ``"gram"`` (:func:`gram_svd`, float32, under 20 launches per call: the device path, with ``orth`` and
    ``finish`` its Triton launches, or ``products`` (see :func:`gram_svd`: no float32 copy of the spans),
    ``power_iters + 2`` iterations; ``oversample`` and ``refine_iters`` do not apply).

    Results: span i's factors depend only on span i (and the seed), not on the other spans of
    the batch nor on T_max (zero rows add nothing), up to float summation order. Everything runs
    on the input's device with no host synchronisation (the only host values used are shapes,
    ``lengths`` and ``starts``); the returned spans are views into batched tensors.
    Coefficients are stored in the model dtype or FP8 e4m3 with a per-token scale
    (:func:`quantize_fp8`), bases in the dtype of the keys.
    """
    kv_out = None  # (products of equal ranks, post-RoPE: K and V stacked into one batch directly, no concatenation)
    if method == "gram" and products is not None and key_rank == value_rank and rope is None and \
            not isinstance(keys, torch.Tensor) and not isinstance(values, torch.Tensor):
        keys, values = list(keys), list(values)
        if keys and len(keys) == len(values) and all(
                isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape == keys[0].shape and t.dtype == keys[0].dtype
                and t.device == keys[0].device for t in keys + values):
            kv_out = torch.empty(2 * len(keys), *keys[0].shape, dtype=keys[0].dtype, device=keys[0].device)
    kp, lens = _padded(keys, lengths, "keys", None if kv_out is None else kv_out[:len(keys)])
    vp, vlens = _padded(values, lengths, "values", None if kv_out is None else kv_out[len(keys):])
    if kp.shape != vp.shape or lens != vlens:
        raise ValueError(f"keys and values differ: {tuple(kp.shape)} {lens} vs {tuple(vp.shape)} {vlens}")
    if coefficient_dtype not in ("model", "fp8_e4m3"):
        raise ValueError(f"coefficient_dtype must be 'model' or 'fp8_e4m3', got {coefficient_dtype!r}")
    if energy_threshold is not None and not (0.0 < energy_threshold <= 1.0):
        raise ValueError(f"energy threshold must be in (0, 1], got {energy_threshold}")
    n, tmax, hkv, d = kp.shape
    w, dtype, dev = hkv * d, kp.dtype, kp.device
    starts = [0] * n if starts is None else _host_ints(starts, "starts")
    if len(starts) != n:
        raise ValueError(f"{len(starts)} starts for {n} spans")
    seeds = _host_ints([seed] * n if isinstance(seed, numbers.Integral) else seed, "seed")
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} spans (give one int, or one seed per span)")
    value_seeds = [s + 1 for s in seeds]
    if importance is not None and len(importance) != n:
        raise ValueError(f"{len(importance)} importance vectors for {n} spans")

    if rope is not None:
        end = max(p + t for p, t in zip(starts, lens))
        if end > rope.max_positions:
            raise ValueError(f"position {end - 1} is beyond the rotary table ({rope.max_positions} positions)")
        pos = torch.stack([torch.arange(p, p + tmax, device=dev) for p in starts]).clamp_max(rope.max_positions - 1)
        kx = rope.to(dev).rotate(kp.reshape(n * tmax, hkv, d), pos.reshape(-1), inverse=True, checked=False)
    else:
        kx = kp
    kx, vx = kx.reshape(n, tmax, w), vp.reshape(n, tmax, w)

    if method not in ("sketch", "gram"):
        raise ValueError(f"method must be 'sketch' or 'gram', got {method!r}")
    if method != "gram" and (orth is not None or finish is not None or products is not None):
        raise ValueError(f"orth, finish and products are options of method 'gram', not {method!r}")
    if method == "gram":  # coefficients and bases come out stored (dtype / FP8, threshold applied)
        padded = None if min(lens) == tmax else lens

        def gram(x, rank, sds, lengths=padded, owned=False):
            sketch = span_sketches(w, min(rank, w), sds, dev)
            return _gram_factor(x, rank, power_iters + 2, sds[0], sketch, lengths, orth, finish, owned=owned,
                                products=products, energy_threshold=energy_threshold,
                                coefficient_dtype=coefficient_dtype, dtype=dtype)

        if key_rank == value_rank:  # one batch of 2S matrices, each with its own sketch
            if products is None:  # (one float32 copy, centred in place)
                kv = torch.cat([kx, vx], out=torch.empty(2 * n, tmax, w, dtype=torch.float32, device=dev))
            elif kv_out is not None and kp.data_ptr() == kv_out.data_ptr() and \
                    vp.data_ptr() == kv_out[n:].data_ptr():  # (stacked there already)
                kv = kv_out.view(2 * n, tmax, w)
            else:  # (products read the spans in their own dtype)
                kv = torch.cat([kx, vx])
            c, sc, b, sv = gram(kv, key_rank, seeds + value_seeds, None if padded is None else lens + lens,
                                owned=products is None)
            del kv
            (ck, cv), (bk, bv), (sk, sv) = c.split(n), b.split(n), sv.split(n)
            scale_k, scale_v = (None, None) if sc is None else sc.split(n)
        else:
            ck, scale_k, bk, sk = gram(kx, key_rank, seeds)
            cv, scale_v, bv, sv = gram(vx, value_rank, value_seeds)
    else:
        opts = dict(oversample=oversample, power_iters=power_iters, refine_iters=refine_iters)
        kx, vx = kx.float(), vx.float()
        def cols(rank):
            return min(min(rank, w) + oversample, w)

        if key_rank == value_rank:  # one batch of 2S matrices, each with its own sketch
            sketch = span_sketches(w, cols(key_rank), seeds + value_seeds, dev).unflatten(0, (2, n))
            c, b, sv = batched_randomized_svd(torch.stack([kx, vx]), key_rank, sketch=sketch, **opts)
            (ck, cv), (bk, bv), (sk, sv) = c.unbind(0), b.unbind(0), sv.unbind(0)
        else:
            ck, bk, sk = batched_randomized_svd(kx, key_rank, sketch=span_sketches(w, cols(key_rank), seeds, dev),
                                                **opts)
            cv, bv, sv = batched_randomized_svd(vx, value_rank,
                                                sketch=span_sketches(w, cols(value_rank), value_seeds, dev), **opts)

        if energy_threshold is not None:
            def keep(c, bs, s, x):
                e = s.double().square()
                total = x.double().square().sum(dim=(-2, -1))
                prior = torch.cumsum(e, -1) - e  # energy of the components before j
                kept = prior < (energy_threshold - 1e-12) * total[:, None]
                kept[:, 0] = True
                return c * kept[:, None, :], bs * kept[:, :, None], s * kept
            ck, bk, sk = keep(ck, bk, sk, kx)
            cv, bv, sv = keep(cv, bv, sv, vx)

        scale_k = scale_v = None
        if coefficient_dtype == "fp8_e4m3":
            ck, scale_k = quantize_fp8(ck)
            cv, scale_v = quantize_fp8(cv)
        else:
            ck, cv = ck.to(dtype), cv.to(dtype)
        bk, bv = bk.to(dtype), bv.to(dtype)
    out = []
    for i, (t, p) in enumerate(zip(lens, starts)):
        imp = importance[i] if importance is not None else None
        out.append(CompactedSpan(
            coeff_k=ck[i, :t], basis_k=bk[i], coeff_v=cv[i, :t], basis_v=bv[i], num_kv_heads=hkv, head_size=d,
            start=p, scale_k=None if scale_k is None else scale_k[i, :t],
            scale_v=None if scale_v is None else scale_v[i, :t],
            importance=None if imp is None else imp.float().clone(),
            singular_values_k=sk[i], singular_values_v=sv[i], rope=rope))
    return out


def compact_span(
    k: torch.Tensor,
    v: torch.Tensor,
    key_rank: int,
    value_rank: int,
    *,
    energy_threshold: Optional[float] = None,
    oversample: int = 8,
    power_iters: int = 2,
    refine_iters: int = 16,
    seed: int = 0,
    coefficient_dtype: Literal["model", "fp8_e4m3"] = "model",
    start: int = 0,
    importance: Optional[torch.Tensor] = None,
    rope: Optional[RopeTable] = None,
) -> CompactedSpan:
    """Compact one layer's K, V [T, Hkv, d] of a span into a :class:`CompactedSpan`.

    :func:`compact_spans` with one span, then cut to the ranks the span has:
    min(rank, T, Hkv*d), and with ``energy_threshold`` the smallest rank keeping that fraction of
    ||X||_F^2 (reading that rank is a host sync: batched callers use :func:`compact_spans`, which
    zeroes the dropped components instead). Coefficients and bases are stored in the dtype of
    ``k``/``v`` (computation in float32), or the coefficients in FP8 e4m3 with a per-token float32
    scale. ``rope``: ``k`` is rotated at positions ``start..start+T-1``; its pre-RoPE form is
    compacted (key_space="pre_rope").
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [T, Hkv, d], got {tuple(k.shape)} and {tuple(v.shape)}")
    t, hkv, d = k.shape
    (sp,) = compact_spans(
        [k], [v], key_rank, value_rank, starts=[start], energy_threshold=energy_threshold, oversample=oversample,
        power_iters=power_iters, refine_iters=refine_iters, seed=seed, coefficient_dtype=coefficient_dtype,
        importance=None if importance is None else [importance], rope=rope)
    rk, rv = min(key_rank, t, hkv * d), min(value_rank, t, hkv * d)
    if energy_threshold is not None:
        rk = min(rk, int(torch.count_nonzero(sp.basis_k.abs().amax(1)).clamp_min(1)))
        rv = min(rv, int(torch.count_nonzero(sp.basis_v.abs().amax(1)).clamp_min(1)))
    return CompactedSpan(
        coeff_k=sp.coeff_k[:, :rk].contiguous(), basis_k=sp.basis_k[:rk].contiguous(),
        coeff_v=sp.coeff_v[:, :rv].contiguous(), basis_v=sp.basis_v[:rv].contiguous(), num_kv_heads=hkv,
        head_size=d, start=start, scale_k=sp.scale_k, scale_v=sp.scale_v, importance=sp.importance,
        singular_values_k=sp.singular_values_k[:rk], singular_values_v=sp.singular_values_v[:rv], rope=rope)


def pad_ranks(span: CompactedSpan, key_rank: int, value_rank: int) -> CompactedSpan:
    """``span`` with zero components appended up to the given ranks (a rank picked by the energy
    threshold, stored in a layout sized for the maximum rank). Attention is unchanged: a zero
    coefficient column times a zero basis row adds nothing."""
    def pad(c: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        extra = r - c.shape[1]
        if extra <= 0:
            return c, b
        return (torch.cat([c, c.new_zeros(c.shape[0], extra)], 1), torch.cat([b, b.new_zeros(extra, b.shape[1])], 0))

    ck, bk = pad(span.coeff_k, span.basis_k, key_rank)
    cv, bv = pad(span.coeff_v, span.basis_v, value_rank)
    if ck is span.coeff_k and cv is span.coeff_v:
        return span
    return CompactedSpan(coeff_k=ck, basis_k=bk, coeff_v=cv, basis_v=bv, num_kv_heads=span.num_kv_heads,
                         head_size=span.head_size, start=span.start, scale_k=span.scale_k, scale_v=span.scale_v,
                         importance=span.importance, rope=span.rope)


def compaction_memory_ratio(
    num_tokens: int, key_rank: int, value_rank: int, num_kv_heads: int, head_size: int,
    dtype_bytes: int = 2, coefficient_dtype: Literal["model", "fp8_e4m3"] = "model",
    with_importance: bool = True,
) -> float:
    """full bytes / compact bytes for a span, without building it (same count as nbytes())."""
    w = num_kv_heads * head_size
    cb = 1 if coefficient_dtype == "fp8_e4m3" else dtype_bytes
    compact = num_tokens * (key_rank + value_rank) * cb + (key_rank + value_rank) * w * dtype_bytes
    compact += num_tokens * 4 * (int(with_importance) + (2 if coefficient_dtype == "fp8_e4m3" else 0))
    return 2 * num_tokens * w * dtype_bytes / compact


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F in float64."""
    a, e = approx.double(), exact.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


__all__ = [
    "CompactedSpan", "compact_span", "compact_spans", "batched_randomized_svd", "cholesky_qr", "gaussian_sketch",
    "gram_svd", "gram_orth_reference", "GramProductsReference",
    "randomized_svd", "rank_for_energy", "quantize_fp8", "dequantize",
    "compaction_memory_ratio", "relative_error", "FP8_DTYPE",
]
