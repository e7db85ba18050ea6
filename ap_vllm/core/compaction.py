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

The randomized SVD (Halko, Martinsson, Tropp 2011) draws a Gaussian sketch
Omega (W x (R+p)) from a seeded CPU generator (so the result does not depend on the device),
forms Y = X Omega, runs ``power_iters`` subspace iterations Y <- X (X^T Q) with QR
re-orthonormalisation, and takes the exact SVD of the small matrix Q^T X.
Signs are fixed so that each basis row's largest-magnitude entry is positive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

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
# FP8 coefficients with a per-token scale
# --------------------------------------------------------------------------------------
def quantize_fp8(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) FP8 e4m3 quantisation: c[t] ~= q[t].float() * scale[t].

    scale[t] = max_r |c[t, r]| / 448 (1 for all-zero rows); returned as float32.
    """
    cf = c.float()
    amax = cf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (cf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(c: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 coefficients from stored ones (model dtype, or FP8 with per-token scale)."""
    cf = c.float()
    return cf if scale is None else cf * scale.float()[:, None]


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


def _factor(
    x: torch.Tensor, max_rank: int, energy_threshold: Optional[float], oversample: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = x.shape[0]
    xf = x.reshape(t, -1).float()
    u, s, vt = randomized_svd(xf, max_rank, oversample, power_iters, seed)
    r = min(max_rank, s.numel())
    if energy_threshold is not None:
        r = rank_for_energy(s, energy_threshold, r, total_energy=float((xf * xf).sum()))
    return u[:, :r] * s[:r], vt[:r], s


def compact_span(
    k: torch.Tensor,
    v: torch.Tensor,
    key_rank: int,
    value_rank: int,
    *,
    energy_threshold: Optional[float] = None,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
    coefficient_dtype: Literal["model", "fp8_e4m3"] = "model",
    start: int = 0,
    importance: Optional[torch.Tensor] = None,
    rope: Optional[RopeTable] = None,
) -> CompactedSpan:
    """Compact one layer's K, V [T, Hkv, d] of a span into a :class:`CompactedSpan`.

    ``key_rank``/``value_rank`` are the ranks (maximum ranks when ``energy_threshold`` is
    set: then the smallest rank keeping that fraction of ||X||_F^2 is used). Coefficients and
    bases are stored in the dtype of ``k``/``v`` (computation in float32), or the coefficients
    in FP8 e4m3 with a per-token float32 scale. ``rope``: ``k`` is rotated at positions
    ``start..start+T-1``; its pre-RoPE form is compacted (key_space="pre_rope").
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [T, Hkv, d], got {tuple(k.shape)} and {tuple(v.shape)}")
    t, hkv, d = k.shape
    dtype = k.dtype
    if rope is not None:
        k = rope.rotate(k, torch.arange(start, start + t, device=k.device), inverse=True)
    ck, bk, sk = _factor(k, key_rank, energy_threshold, oversample, power_iters, seed)
    cv, bv, sv = _factor(v, value_rank, energy_threshold, oversample, power_iters, seed + 1)
    scale_k = scale_v = None
    if coefficient_dtype == "fp8_e4m3":
        ck, scale_k = quantize_fp8(ck)
        cv, scale_v = quantize_fp8(cv)
    elif coefficient_dtype == "model":
        ck, cv = ck.to(dtype), cv.to(dtype)
    else:
        raise ValueError(f"coefficient_dtype must be 'model' or 'fp8_e4m3', got {coefficient_dtype!r}")
    imp = importance.float().clone() if importance is not None else None
    return CompactedSpan(
        coeff_k=ck.contiguous(), basis_k=bk.to(dtype).contiguous(), coeff_v=cv.contiguous(),
        basis_v=bv.to(dtype).contiguous(), num_kv_heads=hkv, head_size=d, start=start,
        scale_k=scale_k, scale_v=scale_v, importance=imp, singular_values_k=sk, singular_values_v=sv, rope=rope,
    )


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
    "CompactedSpan", "compact_span", "randomized_svd", "rank_for_energy", "quantize_fp8", "dequantize",
    "compaction_memory_ratio", "relative_error", "FP8_DTYPE",
]
