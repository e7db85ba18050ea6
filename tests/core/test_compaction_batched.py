"""Batched device-side compaction (compact_spans / batched_randomized_svd): accuracy against the
Eckart-Young optimum, component order, padding and degenerate spans, independence from the rest of
the batch, agreement with compact_span, pre-RoPE spans, and the absence of host synchronisation."""

import ast
import inspect
import textwrap

import pytest
import torch

import ap_vllm.core.compaction as compaction
from ap_vllm.core.compaction import (CompactedSpan, batched_randomized_svd, cholesky_qr, compact_span,
                                     compact_spans, relative_error)
from ap_vllm.core.rope import RopeTable
from ap_vllm.core.synthetic import low_rank_kv

LENGTHS = (100, 300, 1000)
RANKS = (8, 16, 32, 64)


def _matrix(kind: str, t: int, w: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "low_rank_kv":  # fast decay (0.93^i) + noise floor
        return low_rank_kv(t, w // 64, 64, generator=gen).reshape(t, w)
    if kind == "slow_decay":  # 0.99^i: most energy far beyond the rank
        return low_rank_kv(t, w // 64, 64, decay=0.99, generator=gen).reshape(t, w)
    return torch.randn(t, w, generator=gen)  # Gaussian: flat Marchenko-Pastur spectrum


def _optimal_error(s: torch.Tensor, r: int) -> float:
    """Eckart-Young: the best rank-r Frobenius error from the singular values s."""
    return float(s[r:].double().square().sum().sqrt())


def _padded(xs: list[torch.Tensor]) -> torch.Tensor:
    tmax = max(x.shape[0] for x in xs)
    return torch.stack([torch.cat([x, x.new_zeros(tmax - x.shape[0], x.shape[1])]) for x in xs])


@pytest.mark.parametrize("kind", ["low_rank_kv", "slow_decay", "gaussian"])
@pytest.mark.parametrize("width", [256, 512])  # W = Hkv * d: 4 x 64 (= 2 x 128), 8 x 64
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_within_5_percent_of_optimal_at_every_rank_and_its_quarter(kind, width, dtype):
    """Spans of lengths 100, 300, 1000 in one batch: ||X - C B|| <= 1.05 x optimal at rank R, and the
    first R/4 components (the two-level read) <= 1.05 x the optimal rank-R/4 error."""
    xs = [_matrix(kind, t, width, seed=t + width).to(dtype).float() for t in LENGTHS]
    svals = [torch.linalg.svdvals(x.double()) for x in xs]
    worst = 0.0
    for rank in RANKS:
        c, b, s = batched_randomized_svd(_padded(xs).to(dtype), rank)
        assert c.shape == (3, 1000, rank) and b.shape == (3, rank, width) and s.shape == (3, rank)
        for i, x in enumerate(xs):
            t = x.shape[0]
            assert torch.all(c[i, t:] == 0), "padded rows must stay zero"
            assert torch.allclose(b[i] @ b[i].T, torch.eye(rank), atol=1e-4), "basis rows orthonormal"
            for r in (rank, rank // 4):
                err = float((x.double() - c[i, :t, :r].double() @ b[i, :r].double()).norm())
                ratio = err / max(_optimal_error(svals[i], r), 1e-6 * float(x.norm()))
                worst = max(worst, ratio)
                assert ratio <= 1.05, (kind, width, dtype, t, rank, r, ratio)
    assert worst <= 1.05


def test_components_ordered_by_decreasing_singular_value():
    """Subspace iteration + neighbour Jacobi order the components: on a spectrum with gaps
    (s_{j+1}/s_j = 0.93) the column norms of C are the leading singular values, in order, for
    every span of a batch of 8 (different sketch weights: the heavy-tailed starting angles occur)."""
    xs = [_matrix("low_rank_kv", t, 256, seed=t + i) for i, t in enumerate((100, 300, 1000, 1000, 500, 200, 700, 64))]
    for rank in (16, 64):
        _, _, s = batched_randomized_svd(_padded(xs), rank)
        for i, x in enumerate(xs):
            n = min(rank, x.shape[0])
            exact = torch.linalg.svdvals(x)[:n]
            assert torch.allclose(s[i, :n], exact, rtol=1e-2), (rank, i, ((s[i, :n] - exact) / exact).abs().max())
            assert torch.all(s[i, 1:n] <= s[i, :n - 1] * (1 + 1e-3))
    g = torch.randn(2, 400, 256, generator=torch.Generator().manual_seed(1))  # near-degenerate spectrum
    _, _, s = batched_randomized_svd(g, 64)
    assert torch.all(s[:, 1:] <= s[:, :-1] * 1.05), "order holds up to the mixing of near-equal values"
    assert torch.all(s[:, 16:] <= s[:, :1] * 0.9)


def test_short_zero_and_rank_deficient_spans_are_finite():
    """T < R, an all-zero span and an exactly rank-5 span next to a normal one: no NaN, missing
    components are zero rows/columns, present ones orthonormal, exact where the rank allows."""
    gen = torch.Generator().manual_seed(2)
    normal = _matrix("low_rank_kv", 200, 256, seed=3)
    short = torch.randn(3, 256, generator=gen)
    shortish = torch.randn(20, 256, generator=gen)
    zero = torch.zeros(50, 256)
    rank5 = torch.randn(80, 5, generator=gen) @ torch.randn(5, 256, generator=gen)
    xs = [normal, short, shortish, zero, rank5]
    c, b, s = batched_randomized_svd(_padded(xs), 32)
    for t in (c, b, s):
        assert torch.isfinite(t).all()
    for i, (x, present) in enumerate(zip(xs, (32, 3, 20, 0, 5))):
        t = x.shape[0]
        gram = b[i] @ b[i].T
        mask = torch.zeros(32)
        mask[:present] = 1
        assert torch.allclose(gram, torch.diag(mask), atol=1e-4), (i, gram.diagonal())
        assert torch.all(c[i, :, present:] == 0) and torch.all(b[i, present:] == 0)
        if i:  # rank <= 32: reconstructed exactly
            assert float((c[i, :t] @ b[i] - x).norm()) <= 1e-5 * float(x.norm()) + 1e-12
    # through compact_spans, with FP8 coefficients: still finite
    spans = compact_spans([x.reshape(-1, 4, 64) for x in xs], [x.reshape(-1, 4, 64) for x in xs], 32, 16,
                          coefficient_dtype="fp8_e4m3")
    for sp in spans:
        k, v = sp.reconstruct()
        assert torch.isfinite(k).all() and torch.isfinite(v).all() and torch.isfinite(sp.scale_k).all()
    assert torch.all(spans[3].reconstruct()[0] == 0)


def test_rank_above_width_pads_with_zero_components():
    x = torch.randn(1, 100, 64, generator=torch.Generator().manual_seed(4))
    c, b, _ = batched_randomized_svd(x, 80)
    assert c.shape == (1, 100, 80) and torch.all(b[0, 64:] == 0)
    assert relative_error(c[0] @ b[0], x[0]) < 1e-5


def test_span_result_does_not_depend_on_the_rest_of_the_batch():
    """Span i alone, or padded in a batch with other spans: the same factors up to float rounding
    (the sketch depends only on (W, k, seed); zero rows add nothing)."""
    xs = [_matrix("low_rank_kv", t, 256, seed=10 + t) for t in (150, 700, 60)]
    c_all, b_all, s_all = batched_randomized_svd(_padded(xs), 16)
    for i, x in enumerate(xs):
        c, b, s = batched_randomized_svd(x[None], 16)
        t = x.shape[0]
        assert torch.allclose(b[0], b_all[i], atol=1e-4), (b[0] - b_all[i]).abs().max()
        assert torch.allclose(c[0], c_all[i, :t], atol=1e-4 * float(c[0].abs().max()))
        assert torch.allclose(s[0], s_all[i], rtol=1e-5)
    # K and V in one stacked batch (equal ranks) or in two (unequal ranks): the same key factors
    ks = [x.reshape(-1, 4, 64) for x in xs]
    stacked = compact_spans(ks, ks, 16, 16)
    separate = compact_spans(ks, ks, 16, 8)
    for a, b in zip(stacked, separate):
        assert torch.allclose(a.basis_k, b.basis_k, atol=1e-4) and torch.allclose(a.coeff_k, b.coeff_k, atol=1e-3)


def test_deterministic_and_seeded():
    x = _matrix("low_rank_kv", 300, 256, seed=7)[None]
    a = batched_randomized_svd(x, 16, seed=5)
    b = batched_randomized_svd(x, 16, seed=5)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    c = batched_randomized_svd(x, 16, seed=6)
    assert torch.allclose(c[2], a[2], rtol=1e-2)  # another sketch, the same spectrum


def test_cholesky_qr_orthonormalises_in_nested_order():
    gen = torch.Generator().manual_seed(8)
    y = torch.randn(3, 500, 20, generator=gen) @ torch.diag(torch.logspace(0, -5, 20))  # cond 1e5
    q = cholesky_qr(y)
    assert torch.allclose(q.mT @ q, torch.eye(20).expand(3, 20, 20), atol=1e-5)
    # span of the first j columns preserved: q = y R^-1 with R upper triangular
    r = q.mT.double() @ y.double()
    assert torch.allclose(torch.tril(r, -1), torch.zeros_like(r), atol=1e-6 * float(r.abs().max()))
    assert torch.isfinite(cholesky_qr(torch.zeros(2, 10, 4))).all()


# ---- compact_spans: the CompactedSpan objects -------------------------------------------------
def _kv(ts, hkv=4, d=64, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ks = [low_rank_kv(t, hkv, d, generator=gen, dtype=dtype) for t in ts]
    vs = [low_rank_kv(t, hkv, d, generator=gen, dtype=dtype) for t in ts]
    return ks, vs


@pytest.mark.parametrize("coefficient_dtype", ["model", "fp8_e4m3"])
@pytest.mark.parametrize("ranks", [(32, 32), (32, 16)])
def test_compact_spans_equals_compact_span_per_span(coefficient_dtype, ranks):
    ks, vs = _kv((120, 333, 64))
    imp = [torch.rand(t, generator=torch.Generator().manual_seed(t)) for t in (120, 333, 64)]
    spans = compact_spans(ks, vs, *ranks, starts=[0, 500, 900], coefficient_dtype=coefficient_dtype,
                          importance=imp, seed=3)
    for sp, k, v, p, im in zip(spans, ks, vs, [0, 500, 900], imp):
        assert isinstance(sp, CompactedSpan) and sp.start == p and torch.equal(sp.importance, im)
        assert (sp.key_rank, sp.value_rank) == ranks and sp.num_tokens == k.shape[0]
        ref = compact_span(k, v, *ranks, start=p, coefficient_dtype=coefficient_dtype, seed=3)
        for got, want in zip(sp.reconstruct(), ref.reconstruct()):
            assert relative_error(got, want) < 1e-4
        assert sp.coeff_k.dtype == (torch.float8_e4m3fn if coefficient_dtype == "fp8_e4m3" else torch.float32)


@pytest.mark.parametrize("method", ["sketch", "gram"])
@pytest.mark.parametrize("ranks", [(16, 16), (16, 8)])
def test_one_seed_per_span_factorises_each_as_its_own_call(method, ranks):
    """Spans of several layers in one call, span i with its layer's seed: each span's factors are those of a
    call of its own with that seed (the backend batches a step's layers this way), and not those of another
    seed (a slowly decaying spectrum, where the sketch shows)."""
    gen = torch.Generator().manual_seed(4)
    ts = (90, 200, 140)
    ks = [low_rank_kv(t, 4, 64, decay=0.99, generator=gen) for t in ts]
    vs = [low_rank_kv(t, 4, 64, decay=0.99, generator=gen) for t in ts]
    seeds = [7, 8, 9]
    batch = compact_spans(ks, vs, *ranks, seed=seeds, method=method)
    for sp, k, v, sd in zip(batch, ks, vs, seeds):
        (own,) = compact_spans([k], [v], *ranks, seed=sd, method=method)
        (other,) = compact_spans([k], [v], *ranks, seed=sd + 10, method=method)
        for got, want, far in zip(sp.reconstruct(), own.reconstruct(), other.reconstruct()):
            assert relative_error(got, want) < 1e-4
            assert relative_error(far, want) > 1e-3  # (so the seeds really reached the sketches)
    with pytest.raises(ValueError, match="2 seeds for 3 spans"):
        compact_spans(ks, vs, *ranks, seed=[1, 2], method=method)


def test_compact_spans_accuracy_in_the_stored_bf16_form():
    ks, vs = _kv((100, 300, 1000), dtype=torch.bfloat16)
    spans = compact_spans(ks, vs, 32, 32)
    for sp, k, v in zip(spans, ks, vs):
        assert sp.basis_k.dtype == torch.bfloat16
        for got, x in zip(sp.reconstruct(), (k, v)):
            xf = x.float().reshape(x.shape[0], -1)
            opt = _optimal_error(torch.linalg.svdvals(xf), 32)
            err = float((got.reshape(xf.shape) - xf).norm())
            assert err <= 1.05 * opt + 2 ** -8 * float(xf.norm())  # + bf16 storage of C and B


def test_padded_input_with_lengths_ignores_rows_past_the_end():
    ks, vs = _kv((50, 130))
    kp = torch.randn(2, 130, 4, 64)  # garbage everywhere, then the spans written in
    vp = torch.randn(2, 130, 4, 64)
    for i, (k, v) in enumerate(zip(ks, vs)):
        kp[i, :k.shape[0]], vp[i, :v.shape[0]] = k, v
    a = compact_spans(kp, vp, 16, 16, lengths=[50, 130])
    b = compact_spans(ks, vs, 16, 16)
    for x, y in zip(a, b):
        assert x.num_tokens == y.num_tokens
        assert torch.allclose(x.basis_k, y.basis_k, atol=1e-5) and torch.allclose(x.coeff_v, y.coeff_v, atol=1e-4)
    with pytest.raises(ValueError):
        compact_spans(kp, vp, 16, 16, lengths=[50, 131])
    with pytest.raises(ValueError):
        compact_spans(ks, vs[:1], 16, 16)
    with pytest.raises(TypeError, match="host integers"):  # reading a device tensor would sync
        compact_spans(kp, vp, 16, 16, lengths=torch.tensor([50, 130]))


def test_energy_threshold_zeroes_components_and_keeps_the_layout_ranks():
    ks, vs = _kv((400, 200))
    spans = compact_spans(ks, vs, 64, 64, energy_threshold=0.99)
    for sp, k in zip(spans, ks):
        assert sp.key_rank == 64
        kept = int((sp.basis_k.abs().amax(1) > 0).sum())
        assert 1 <= kept < 64 and torch.all(sp.coeff_k[:, kept:] == 0) and torch.all(sp.basis_k[kept:] == 0)
        assert 1 - relative_error(sp.reconstruct()[0], k) ** 2 >= 0.99 - 1e-4
        s = torch.linalg.svdvals(k.reshape(k.shape[0], -1))
        assert float(s[: kept - 1].square().sum() / s.square().sum()) < 0.99  # the smallest such rank
        one = compact_span(k, k, 64, 64, energy_threshold=0.99)
        assert one.key_rank == kept  # the single-span API cuts to the rank


def test_pre_rope_spans_at_their_own_positions():
    """Each span rotated back at its own start: full rank rebuilds the rotated keys exactly; a span
    low-rank before RoPE is fitted at that rank."""
    hkv, d = 2, 64
    rope = RopeTable.from_base(d, 10000.0, max_positions=4096)
    gen = torch.Generator().manual_seed(9)
    starts, ts = [0, 1000, 3000], [90, 200, 40]
    pre = [(torch.randn(t, 8, generator=gen) @ torch.randn(8, hkv * d, generator=gen)).reshape(t, hkv, d) for t in ts]
    ks = [rope.rotate(p, torch.arange(s, s + t)) for p, s, t in zip(pre, starts, ts)]
    vs = [torch.randn(t, hkv, d, generator=gen) for t in ts]
    full = compact_spans(ks, vs, hkv * d, hkv * d, starts=starts, rope=rope)
    low = compact_spans(ks, vs, 8, 8, starts=starts, rope=rope)
    for f, lo, k, s in zip(full, low, ks, starts):
        assert f.rope is rope and f.start == s
        assert relative_error(f.reconstruct()[0], k) < 1e-5
        assert relative_error(lo.reconstruct()[0], k) < 1e-4
    with pytest.raises(ValueError, match="beyond the rotary table"):
        compact_spans(ks, vs, 8, 8, starts=[0, 1000, 4070], rope=rope)


# ---- no host synchronisation ------------------------------------------------------------------
_BATCHED = [compaction.compact_spans, compaction.batched_randomized_svd, compaction.cholesky_qr, compaction._padded,
            compaction._top_eigenvectors, compaction._neighbour_jacobi, compaction._cholesky_qr_fixed_shift,
            compaction.gram_svd, compaction.gram_orth_reference]
_FORBIDDEN_ATTRS = {"item", "cpu", "tolist", "numpy", "nonzero", "synchronize"}
_FORBIDDEN_LINALG = {"qr", "svd", "svdvals", "eig", "eigh", "eigvals", "eigvalsh", "cholesky", "inv", "solve",
                     "lstsq", "det", "slogdet", "matrix_rank", "pinv", "lu", "lu_factor", "ldl_factor"}


def test_batched_path_has_no_host_sync_calls():
    """AST scan: no .item()/.cpu()/.tolist()/.numpy()/.nonzero(), no int()/bool()/float() (which read a
    tensor on the host), no torch.linalg function that checks its info on the host, cholesky_ex
    without check_errors."""
    for fn in _BATCHED:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            where = f"{fn.__name__}: line {node.lineno}"
            if isinstance(f, ast.Name):
                assert f.id not in {"int", "bool", "float"}, where
            if isinstance(f, ast.Attribute):
                assert f.attr not in _FORBIDDEN_ATTRS, where
                if isinstance(f.value, ast.Attribute) and f.value.attr == "linalg":
                    assert f.attr not in _FORBIDDEN_LINALG, where
                    assert f.attr in {"cholesky_ex", "solve_triangular"}, where
                    assert not any(kw.arg == "check_errors" for kw in node.keywords), where
        # no Python branching on tensors either: every `if` tests host values (names/shapes/options)
        src = inspect.getsource(fn)
        assert "torch.nonzero" not in src and ".any()" not in src and ".all()" not in src, fn.__name__


def test_batched_path_reads_no_tensor_on_the_host(monkeypatch):
    """Runtime check on CPU: every Python-level way of reading a tensor value raises during a call
    (pre-RoPE, FP8, energy threshold, unequal K/V ranks, padded input)."""
    rope = RopeTable.from_base(64, 10000.0, max_positions=2048)
    ks, vs = _kv((70, 150), hkv=2)
    kp = torch.zeros(2, 150, 2, 64)
    kp[0, :70], kp[1] = ks[0], ks[1]
    compaction.gaussian_sketch(128, 24, 0, "cpu"), compaction.gaussian_sketch(128, 40, 1, "cpu")

    def boom(*a, **k):
        raise AssertionError("host read of a tensor")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for name in ("qr", "svd", "svdvals", "eigh", "cholesky"):
        monkeypatch.setattr(torch.linalg, name, boom)
    spans = compact_spans(kp, kp, 16, 32, lengths=[70, 150], starts=[5, 300], rope=rope, energy_threshold=0.999,
                          coefficient_dtype="fp8_e4m3", importance=[torch.zeros(70), None])
    spans += compact_spans(ks, vs, 16, 16, starts=[0, 100], rope=rope)
    spans += compact_spans(kp, kp, 16, 32, lengths=[70, 150], energy_threshold=0.999, method="gram",
                           coefficient_dtype="fp8_e4m3")
    spans += compact_spans(ks, vs, 16, 16, starts=[0, 100], rope=rope, method="gram")
    monkeypatch.undo()
    assert len(spans) == 8 and all(torch.isfinite(sp.coeff_k_float()).all() for sp in spans)
