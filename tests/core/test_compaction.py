"""Randomized SVD, rank selection, FP8 coefficients and memory accounting."""

import math

import pytest
import torch

from ap_vllm.core.compaction import (CompactedSpan, compact_span, compaction_memory_ratio, quantize_fp8,
                                     randomized_svd, rank_for_energy, relative_error)
from ap_vllm.core.synthetic import low_rank_kv


def _kv(t=300, h=2, d=64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return low_rank_kv(t, h, d, generator=g, **kw), low_rank_kv(t, h, d, generator=g, **kw)


def test_randomized_svd_matches_exact_svd():
    k, _ = _kv()
    x = k.reshape(k.shape[0], -1)
    u, s, vt = randomized_svd(x, 16, oversample=8, power_iters=2, seed=3)
    s_exact = torch.linalg.svdvals(x)
    assert torch.allclose(s[:16], s_exact[:16], rtol=1e-3)
    assert torch.all(s[1:] <= s[:-1] + 1e-6), "components must be ordered by decreasing singular value"
    assert torch.allclose(vt @ vt.T, torch.eye(vt.shape[0]), atol=1e-5), "basis rows must be orthonormal"
    best = s_exact[16:].square().sum().sqrt() / s_exact.square().sum().sqrt()
    approx = relative_error((u[:, :16] * s[:16]) @ vt[:16], x)
    assert approx <= float(best) * 1.01 + 1e-6


def test_randomized_svd_deterministic_and_seeded():
    k, _ = _kv()
    x = k.reshape(k.shape[0], -1)
    a = randomized_svd(x, 8, seed=5)
    b = randomized_svd(x, 8, seed=5)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert rank_for_energy(s, 0.6, 4) == 1
    assert rank_for_energy(s, 0.9, 4) == 2
    assert rank_for_energy(s, 0.95, 4) == 3
    assert rank_for_energy(s, 1.0, 4) == 4
    assert rank_for_energy(s, 1.0, 2) == 2  # capped
    assert rank_for_energy(s, 0.9, 4, total_energy=100.0) == 4  # sketch did not reach it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_rank_reconstructs(dtype):
    k, v = _kv(t=100, h=2, d=32)
    sp = compact_span(k.to(dtype), v.to(dtype), 64, 64)
    assert sp.coeff_k.dtype == dtype and sp.basis_v.dtype == dtype
    rk, rv = sp.reconstruct()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(rk, k.to(dtype).float()) < tol
    assert relative_error(rv, v.to(dtype).float()) < tol


def test_error_decreases_with_rank_and_energy_threshold():
    k, v = _kv(t=400, h=2, d=64)
    errs = [relative_error(compact_span(k, v, r, r).reconstruct()[0], k) for r in (4, 8, 16, 32, 64)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    sp = compact_span(k, v, 128, 128, energy_threshold=0.99)
    assert sp.key_rank < 128
    x = k.reshape(400, -1)
    kept = 1 - relative_error(sp.reconstruct()[0], k) ** 2
    assert kept >= 0.99 - 1e-4
    s = torch.linalg.svdvals(x)
    assert (s[: sp.key_rank - 1].square().sum() / s.square().sum()) < 0.99  # smallest such rank


def test_fp8_coefficients():
    k, v = _kv(t=200, h=2, d=64)
    c = torch.randn(50, 16) * torch.logspace(-3, 2, 50)[:, None]
    q, scale = quantize_fp8(c)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (50,)
    assert relative_error(q.float() * scale[:, None], c) < 2 ** -4
    sp = compact_span(k, v, 32, 32, coefficient_dtype="fp8_e4m3")
    ref = compact_span(k, v, 32, 32)
    assert relative_error(sp.coeff_k_float(), ref.coeff_k_float()) < 2 ** -4
    assert sp.memory_ratio() > ref.memory_ratio()


def test_memory_ratio_accounting():
    k, v = _kv(t=256, h=4, d=64)
    for cdt in ("model", "fp8_e4m3"):
        sp = compact_span(k.bfloat16(), v.bfloat16(), 32, 16, coefficient_dtype=cdt)
        full = 2 * 256 * 256 * 2
        cb = 1 if cdt == "fp8_e4m3" else 2
        compact = 256 * 48 * cb + 48 * 256 * 2 + 256 * 4 * (1 + (2 if cb == 1 else 0))
        assert sp.nbytes() == compact
        assert math.isclose(sp.memory_ratio(), full / compact)
        assert math.isclose(compaction_memory_ratio(256, 32, 16, 4, 64, 2, cdt), sp.memory_ratio())


def test_rejects_bad_input():
    k, v = _kv(t=50)
    with pytest.raises(ValueError):
        compact_span(k, v[:10], 8, 8)
    with pytest.raises(ValueError):
        compact_span(k, v, 8, 8, coefficient_dtype="int4")
    assert isinstance(compact_span(k, v, 8, 8, start=7), CompactedSpan)
