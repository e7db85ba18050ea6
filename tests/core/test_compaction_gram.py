"""The Gram-space compaction (the GPU path: compact_spans(method="gram"), gram_svd, kernels/compaction.py):
accuracy against the Eckart-Young optimum at every rank and its quarter, keys with a dominant mean (the case
float32 Gram iteration cannot resolve without deflation), the Triton step against its torch oracle
(interpreter on CPU), float32 only, a fixed number of steps and ops whatever the number of spans."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ap_vllm.core.compaction import compact_spans, gram_finish_reference, gram_orth_reference, gram_svd
from ap_vllm.core.synthetic import low_rank_kv

LENGTHS = (100, 300, 1000)
RANKS = (8, 16, 32, 64)


def _matrix(kind: str, t: int, w: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":  # flat Marchenko-Pastur spectrum
        return torch.randn(t, w, generator=gen)
    x = low_rank_kv(t, w // 64, 64, decay=0.99 if kind == "slow_decay" else 0.93, generator=gen).reshape(t, w)
    if kind == "biased_keys":  # a mean row 100x the spread (keys with a bias): sigma_1 / sigma_64 ~ 7000
        x = x + 100.0 * float(x.std()) * torch.randn(w, generator=gen)
    return x


def _padded(xs):
    tmax = max(x.shape[0] for x in xs)
    return torch.stack([torch.cat([x, x.new_zeros(tmax - x.shape[0], x.shape[1])]) for x in xs])


@pytest.mark.parametrize("kind,width,products", [(k, w, None) for w in (256, 512) for k in (
    "low_rank_kv", "slow_decay", "gaussian", "biased_keys")] + [("low_rank_kv", 256, "kernels"), ("biased_keys", 256,
                                                                                                   "kernels")])
def test_error_within_5_percent_of_optimal_at_every_rank_and_its_quarter(kind, width, products):
    """bf16 spans of 100, 300 and 1000 tokens in one padded batch: ||X - C B|| <= 1.05 x the optimal rank-R error
    and the first R/4 components <= 1.05 x the optimal rank-R/4 error; basis rows orthonormal, padded rows 0.
    ``kernels``: the products taken from the bf16 spans by the Triton kernels (the device default)."""
    xs = [_matrix(kind, t, width, seed=t + width).to(torch.bfloat16).float() for t in LENGTHS]
    svals = [torch.linalg.svdvals(x.double()) for x in xs]
    x_in = _padded(xs)
    if products:
        products = pytest.importorskip("ap_vllm.kernels.compaction").GramProducts()
        x_in = x_in.to(torch.bfloat16)  # (exact: the spans are bf16 values)
    for rank in RANKS:
        c, b, s = gram_svd(x_in, rank, lengths=list(LENGTHS), products=products)
        assert c.shape == (3, 1000, rank) and b.shape == (3, rank, width) and s.shape == (3, rank)
        assert c.dtype == b.dtype == torch.float32
        for i, x in enumerate(xs):
            t = x.shape[0]
            assert torch.all(c[i, t:] == 0)
            torch.testing.assert_close(b[i] @ b[i].T, torch.eye(rank), atol=1e-4, rtol=0)
            assert torch.all(s[i, 1:] <= s[i, :-1]), "components ordered by decreasing energy"
            for r in (rank, rank // 4):
                err = float((x.double() - c[i, :t, :r].double() @ b[i, :r].double()).norm())
                opt = max(float(svals[i][r:].square().sum().sqrt()), 1e-6 * float(x.norm()))
                assert err / opt <= 1.05, (kind, width, t, rank, r, err / opt)


def test_short_zero_and_rank_deficient_spans():
    """T < R, an all-zero span and a rank-5 span: exact reconstructions, absent components zero, all finite."""
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(3, 60, 128)
    x[0, :40] = torch.randn(40, 128, generator=gen)
    x[2] = torch.randn(60, 5, generator=gen) @ torch.randn(5, 128, generator=gen)
    c, b, s = gram_svd(x, 64, lengths=[40, 60, 60])
    assert torch.isfinite(c).all() and torch.isfinite(b).all()
    rec = c @ b
    for i in (0, 2):
        assert float((rec[i] - x[i]).norm() / x[i].norm()) < 1e-4, i
    assert int((s[0] > 0).sum()) == 40 and int((s[1] > 0).sum()) == 0 and int((s[2] > 0).sum()) == 5
    absent = s == 0
    assert torch.all(b[absent] == 0) and torch.all(c.transpose(1, 2)[absent] == 0)


def test_compact_spans_gram_matches_the_sketch_method_in_quality():
    """compact_spans(method="gram") stores spans of the same shape and dtypes as the sketch method; in the stored
    form (bf16 or FP8 coefficients) its error is within 5% of the sketch method's and of the optimum (plus the
    storage rounding), for K and V each with their own sketch."""
    gen = torch.Generator().manual_seed(5)
    ks = [low_rank_kv(t, 4, 64, generator=gen).to(torch.bfloat16) for t in (90, 200)]
    vs = [low_rank_kv(t, 4, 64, decay=0.97, generator=gen).to(torch.bfloat16) for t in (90, 200)]
    for cdt in ("model", "fp8_e4m3"):
        sk = compact_spans(ks, vs, 32, 32, coefficient_dtype=cdt)
        gr = compact_spans(ks, vs, 32, 32, coefficient_dtype=cdt, method="gram")
        for a, g, k, v in zip(sk, gr, ks, vs):
            assert (g.coeff_k.dtype, g.basis_k.dtype, g.coeff_k.shape) == (a.coeff_k.dtype, a.basis_k.dtype,
                                                                             a.coeff_k.shape)
            for (ra, rg), x in zip(zip(a.reconstruct(), g.reconstruct()), (k, v)):
                xf = x.float().reshape(x.shape[0], -1)
                ea, eg = float((ra - x.float()).norm()), float((rg - x.float()).norm())
                opt = float(torch.linalg.svdvals(xf.double())[32:].square().sum().sqrt())
                rounding = (2 ** -8 if cdt == "model" else 2 ** -4) * float(xf.norm())
                assert eg <= 1.05 * ea + 1e-3 * float(xf.norm()), (cdt, ea, eg)
                assert eg <= 1.05 * opt + rounding, (cdt, opt, eg)
    with pytest.raises(ValueError, match="method"):
        compact_spans(ks, vs, 32, 32, method="svd")


# ---- the Triton step against its oracle -------------------------------------------------------------------
@pytest.mark.parametrize("n,t,w,r,bias,shared", [
    (3, 200, 128, 16, 0.0, False),
    (2, 300, 96, 24, 10.0, True),  # W not a multiple of the chunk, R not a power of two, deflated mean
    (2, 400, 256, 64, 0.0, True),
])
def test_triton_step_matches_the_reference(n, t, w, r, bias, shared):
    triton_compaction = pytest.importorskip("ap_vllm.kernels.compaction")
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(n, t, w, generator=gen) * torch.rand(w, generator=gen) * 3 + bias * torch.randn(n, 1, w,
                                                                                                 generator=gen)
    mu = x.mean(-2)
    xc = x - mu[:, None]
    g = xc.mT @ xc
    count = torch.full((n,), float(t))
    z = torch.randn(w, r, generator=gen) if shared else torch.randn(n, w, r, generator=gen)
    got = triton_compaction.gram_orth_triton(g @ z, z, mu, count, g)
    want = gram_orth_reference(g @ z, z, mu, count, g)
    assert got.shape == want.shape == (n, w, r + 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    q = got[..., :r]
    torch.testing.assert_close(q.mT @ q, torch.eye(r).expand(n, r, r), atol=2e-5, rtol=0)
    if bias:  # the deflated direction is the unit mean, orthogonal to the columns
        torch.testing.assert_close(got[..., r], mu / mu.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
        assert float((q.mT @ got[..., r:]).abs().max()) < 1e-5
    else:
        assert torch.all(got[..., r] == 0)


def test_triton_step_in_the_whole_factorisation():
    triton_compaction = pytest.importorskip("ap_vllm.kernels.compaction")
    x = _padded([_matrix("biased_keys", t, 128, seed=t) for t in (150, 90)])
    c1, b1, s1 = gram_svd(x, 16, lengths=[150, 90], orth=triton_compaction.gram_orth_triton)
    c2, b2, s2 = gram_svd(x, 16, lengths=[150, 90])
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=0)
    torch.testing.assert_close(b1, b2, atol=1e-4, rtol=0)
    torch.testing.assert_close(c1 @ b1, c2 @ b2, atol=1e-3 * float(x.abs().max()), rtol=0)


@pytest.mark.parametrize("opts", [dict(), dict(coefficient_dtype="fp8_e4m3"), dict(energy_threshold=0.9),
                                  dict(key_rank=16, value_rank=40), dict(key_rank=24, value_rank=24, width=16)])
def test_triton_finish_matches_the_reference(opts):
    """The finishing launch (order, absent components, signs, threshold, stored dtypes) against its oracle: the
    same spans to one rounding of the stored dtype, FP8 codes and scales equal."""
    triton_compaction = pytest.importorskip("ap_vllm.kernels.compaction")
    gen = torch.Generator().manual_seed(0)
    kr, vr, width = opts.pop("key_rank", 32), opts.pop("value_rank", 32), opts.pop("width", 128)
    ks = [low_rank_kv(t, width // 64 or 1, min(64, width), generator=gen).to(torch.bfloat16) for t in (90, 150)]
    vs = [low_rank_kv(t, width // 64 or 1, min(64, width), decay=0.97, generator=gen).to(torch.bfloat16)
          for t in (90, 150)]
    got = compact_spans(ks, vs, kr, vr, method="gram", finish=triton_compaction.gram_finish_triton, **opts)
    want = compact_spans(ks, vs, kr, vr, method="gram", **opts)
    for a, b in zip(got, want):
        for f in ("coeff_k", "coeff_v", "basis_k", "basis_v", "singular_values_k", "singular_values_v", "scale_k",
                  "scale_v"):
            x, y = getattr(a, f), getattr(b, f)
            if y is None:
                assert x is None, f
                continue
            assert x.dtype == y.dtype and x.shape == y.shape, f
            torch.testing.assert_close(x.float(), y.float(), rtol=2 ** -7, atol=1e-6, msg=f)
    if "energy_threshold" in opts:
        assert any(float(sp.singular_values_k[-1]) == 0 for sp in want), "the threshold dropped components"


# ---- what a call costs --------------------------------------------------------------------------------------
_ALIASES = {"aten._unsafe_view", "aten.alias", "aten.lift_fresh", "aten.empty"}  # no kernel behind them


class _Ops(TorchDispatchMode):
    """Counts the non-view aten ops (each a kernel launch on a GPU) outside the orthonormalisation steps, and
    the dtypes they produce."""

    def __init__(self):
        super().__init__()
        self.ops, self.dtypes, self.paused = collections.Counter(), set(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and not func.is_view and str(func.overloadpacket) not in _ALIASES:
            self.ops[str(func.overloadpacket)] += 1
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.dtypes.add(o.dtype)
        return out


def test_fixed_steps_float32_only_and_ops_independent_of_the_span_count(monkeypatch):
    """A call runs power_iters + 2 orthonormalisation steps (one launch each on a GPU), produces no float64
    tensor, and the factorisation's other ops do not grow with the number of spans in the batch."""
    import ap_vllm.core.compaction as compaction

    counts = []
    for n in (1, 4):
        k = torch.randn(n, 300, 4, 64).to(torch.bfloat16)
        compact_spans(k, k, 32, 32, method="gram")  # sketch matrices cached
        steps = []
        mode = _Ops()
        mode.paused = True

        def counted(fn, on):
            def run(*args, **kwargs):
                before, mode.paused = mode.paused, not on
                try:
                    return fn(*args, **kwargs)
                finally:
                    mode.paused = before
            return run

        def orth(*args):
            steps.append(1)
            return counted(gram_orth_reference, False)(*args)

        monkeypatch.setattr(compaction, "gram_svd", counted(gram_svd, True))
        with mode:
            compact_spans(k, k, 32, 32, method="gram", orth=orth, power_iters=2)
        monkeypatch.undo()
        assert len(steps) == 4
        assert torch.float64 not in mode.dtypes, mode.dtypes
        counts.append(sum(mode.ops.values()))
    assert counts[0] == counts[1], counts


class _Uncounted:
    """A Triton kernel whose launches run with the counting mode paused (the CPU interpreter copies tensors)."""

    def __init__(self, kernel, mode_of, launches=None):
        self.kernel, self.mode_of, self.launches = kernel, mode_of, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.launches is not None:
                self.launches.append(self.kernel.fn.__name__)
            mode = self.mode_of()
            before, mode.paused = mode.paused, True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                mode.paused = before
        return launch


@pytest.mark.parametrize("path", ["oracles", "kernels", "products"])
def test_a_call_is_at_most_20_launches(path, monkeypatch):
    """One layer's compaction of one span (K and V, R = 64, as the backend calls it) is at most 20 launches on a
    GPU: the aten ops that launch a kernel (not views, aliases or allocations), plus one per Triton launch
    (``oracles``: the torch references of the step and finish stand in for one launch each). With the kernels,
    the iterate is read in place (no copy per iteration); FP8 coefficients add one cast. ``products``: the
    device default (GramProducts: the Gram matrix and the finish's two launches from the bf16 spans)."""
    current = []
    triton_launches = []
    if path in ("kernels", "products"):
        triton_compaction = pytest.importorskip("ap_vllm.kernels.compaction")
        orth_fn, finish_fn = triton_compaction.gram_orth_triton, triton_compaction.gram_finish_triton
        for name in ("_gram_orth_kernel", "_gram_finish_kernel", "_gram_centred_kernel", "_gram_decide_kernel",
                     "_gram_project_kernel"):
            monkeypatch.setattr(triton_compaction, name,
                                _Uncounted(getattr(triton_compaction, name), lambda: current[-1], triton_launches))
    else:
        orth_fn, finish_fn = gram_orth_reference, gram_finish_reference
    k = torch.randn(500, 4, 128).to(torch.bfloat16)
    imp = [torch.zeros(500)]
    for cdt in ("model", "fp8_e4m3"):
        mode = _Ops()
        current.append(mode)
        launches = []

        def one_launch(fn, name):
            def run(*args, **kwargs):
                launches.append(name)
                before, mode.paused = mode.paused, path == "oracles"
                try:
                    return fn(*args, **kwargs)
                finally:
                    mode.paused = before
            return run

        opts = dict(method="gram", orth=one_launch(orth_fn, "orth"), finish=one_launch(finish_fn, "finish"),
                    coefficient_dtype=cdt, importance=imp)
        if path == "products":
            opts.update(finish=None, products=triton_compaction.GramProducts())
        compact_spans([k], [k], 64, 64, method="gram")  # sketches cached
        triton_launches.clear()
        with mode:
            compact_spans([k], [k], 64, 64, **opts)
        assert launches.count("orth") == 4 and launches.count("finish") == (path != "products")
        if path == "products":  # (the step's launches are counted by its wrapper)
            assert sorted(set(triton_launches)) == ["_gram_centred_kernel", "_gram_decide_kernel",
                                                    "_gram_orth_kernel", "_gram_project_kernel"]
            total = sum(mode.ops.values()) + len(launches) + len(triton_launches) - triton_launches.count(
                "_gram_orth_kernel")
        else:
            total = sum(mode.ops.values()) + len(launches)
        assert total <= 20, (cdt, total, sorted(mode.ops.items()), triton_launches)


def test_ranks_above_the_step_kernel_run_its_torch_step():
    """The Triton step refuses R > 64 (its tiles would spill); with the device options compact_spans then runs
    the torch step for that rank group and the result equals the all-torch path's (to bf16 rounding)."""
    triton_compaction = pytest.importorskip("ap_vllm.kernels.compaction")
    x = torch.randn(2, 150, 128)
    with pytest.raises(ValueError, match="above 64"):
        triton_compaction.gram_orth_triton(x.mT @ x @ torch.randn(2, 128, 96), torch.randn(128, 96), x.mean(-2),
                                           torch.full((2,), 150.0), x.mT @ x)
    k = [low_rank_kv(150, 2, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)]
    got = compact_spans(k, k, 96, 96, **triton_compaction.device_compaction(products=None))
    want = compact_spans(k, k, 96, 96, method="gram")
    torch.testing.assert_close(got[0].basis_k.float(), want[0].basis_k.float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(got[0].coeff_v.float(), want[0].coeff_v.float(), rtol=2 ** -7, atol=1e-6)
    # the default device path (products from the bf16 spans: a Gram matrix summed in another order): the same
    # components to bf16 rounding where they are determined (singular value above 1 % of the first; past
    # that, of this rank-64 span's 96, directions are noise), and the same reconstruction
    got = compact_spans(k, k, 96, 96, **triton_compaction.device_compaction())
    s = want[0].singular_values_k
    well = s > 1e-2 * s[0]
    assert 40 <= int(well.sum()) < 96
    torch.testing.assert_close(got[0].singular_values_k, s, rtol=1e-3, atol=1e-3 * float(s[0]))
    torch.testing.assert_close(got[0].basis_k.float()[well], want[0].basis_k.float()[well], rtol=2 ** -7,
                               atol=2 ** -8)
    rebuilt = [sp.coeff_v.float() @ sp.basis_v.float() for sp in (got[0], want[0])]
    assert float((rebuilt[0] - rebuilt[1]).norm() / rebuilt[1].norm()) < 1e-2


@pytest.mark.parametrize("finish_name", ["reference", "triton"])
def test_centred_candidates_finish_as_the_uncentred_ones(finish_name):
    """The finish given X_c [Z | m] with ``centred`` (the mean's part added on each matrix's first c rows, none on
    its padding) stores what it stores given X [Z | m]: compact_spans then keeps a single float32 copy of X."""
    if finish_name == "triton":
        finish = pytest.importorskip("ap_vllm.kernels.compaction").gram_finish_triton
    else:
        finish = gram_finish_reference
    gen = torch.Generator().manual_seed(3)
    lengths = [150, 90]
    x = _padded([_matrix("biased_keys", t, 64, seed=t) for t in lengths])
    zb = torch.linalg.qr(torch.randn(2, 64, 17, generator=gen))[0]
    keep = (torch.arange(150)[None, :] < torch.tensor(lengths)[:, None]).float()
    count = keep.sum(-1)
    mu = x.sum(-2) / count[:, None]
    xc = (x - mu[:, None, :]) * keep[:, :, None]
    g = xc.mT @ xc
    for opts in (dict(), dict(coefficient_dtype="fp8_e4m3", energy_threshold=0.9)):
        want = finish(x @ zb, zb, g, mu, count, 16, **opts)
        got = finish(xc @ zb, zb, g, mu, count, 16, centred=True, **opts)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4 * float(b.float().abs().max()))
        assert float(want[0].float()[1, 90:].abs().max()) == 0  # (padding rows stay zero)


# ---- the products from X in its own dtype (GramProducts: the device path's default) ------------------------
def _products(name):
    if name == "reference":
        from ap_vllm.core.compaction import GramProductsReference

        return GramProductsReference()
    return pytest.importorskip("ap_vllm.kernels.compaction").GramProducts(name)


@pytest.mark.parametrize("name", ["reference", "tf32", "ieee"])
@pytest.mark.parametrize("opts", [dict(), dict(coefficient_dtype="fp8_e4m3"), dict(energy_threshold=0.9),
                                  dict(key_rank=16, value_rank=40), dict(key_rank=24, value_rank=24, width=16)])
def test_products_store_what_the_float32_copy_path_stores(name, opts):
    """The Gram matrix and the finish taken from the bf16 spans (no float32 copy; energies z^T G_c z +
    c (mu^T z)^2, coefficients X B^T) against the float32-copy path: the same spans to one rounding of the
    stored dtype (FP8: codes one e4m3 step apart at most), keys with a dominant mean included. The Triton
    kernels run under the interpreter here (float32 products; TF32 is emulated below)."""
    gen = torch.Generator().manual_seed(0)
    kr, vr, width = opts.pop("key_rank", 32), opts.pop("value_rank", 32), opts.pop("width", 128)
    ks = [low_rank_kv(t, width // 64 or 1, min(64, width), generator=gen) for t in (90, 150)]
    ks[0] = ks[0] + 30.0 * float(ks[0].std()) * torch.randn(ks[0].shape[1:], generator=gen)  # a biased span
    ks = [k.to(torch.bfloat16) for k in ks]
    vs = [low_rank_kv(t, width // 64 or 1, min(64, width), decay=0.97, generator=gen).to(torch.bfloat16)
          for t in (90, 150)]
    got = compact_spans(ks, vs, kr, vr, method="gram", products=_products(name), **opts)
    want = compact_spans(ks, vs, kr, vr, method="gram", **opts)
    for a, b in zip(got, want):
        for f in ("coeff_k", "coeff_v", "basis_k", "basis_v", "singular_values_k", "singular_values_v", "scale_k",
                  "scale_v"):
            x, y = getattr(a, f), getattr(b, f)
            if y is None:
                assert x is None, f
                continue
            assert x.dtype == y.dtype and x.shape == y.shape, f
            if x.dtype == torch.float8_e4m3fn:  # codes: one e4m3 step (1/8 relative) apart at most
                torch.testing.assert_close(x.float(), y.float(), rtol=2 ** -3, atol=2 ** -6, msg=f)
            else:
                torch.testing.assert_close(x.float(), y.float(), rtol=2 ** -7, atol=1e-5 * float(y.float().abs().max()),
                                           msg=f)
    if "energy_threshold" in opts:
        assert any(float(sp.singular_values_k[-1]) == 0 for sp in got), "the threshold dropped components"


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """What a TF32 multiply reads of float32 values: the top 19 bits (10 mantissa bits; the rest dropped)."""
    return (x.float().contiguous().view(torch.int32) & -8192).view(torch.float32)


def _tf32_products(split: bool):
    """GramProductsReference with the operands of each product cut to TF32, as the kernels' ``"tf32"`` runs them:
    the Gram matrix from TF32 centred values; the coefficients from the exact split basis (B_hi + B_lo, both
    TF32) or, ``split=False``, from a single TF32 basis."""
    from ap_vllm.core.compaction import GramProductsReference

    class Tf32(GramProductsReference):
        def gram(self, x, mu, count):
            xc = _tf32((x.float() - mu[:, None, :]) * self._rows(x, count)[:, :, None])
            return xc.mT @ xc

        def project(self, x, basis):
            hi = _tf32(basis)
            return _tf32(x) @ hi.mT + (_tf32(x) @ _tf32(basis - hi).mT if split else 0.0)

    return Tf32()


def test_tf32_products_keep_eckart_young_and_why_the_basis_is_split():
    """The ``"tf32"`` products, emulated (bf16 X is exact in TF32): within 5 % of Eckart-Young at R and R/4 on keys
    with a mean 100x their spread, as float32 products are. A single TF32 product for the coefficients (the
    basis cut to 10 mantissa bits, error 2^-11 |X| |B|, large for the mean's coefficient) misses that bound:
    hence the split basis."""
    xs = [_matrix("biased_keys", t, 256, seed=t + 256).to(torch.bfloat16).float() for t in LENGTHS]
    svals = [torch.linalg.svdvals(x.double()) for x in xs]

    def worst(products):
        c, b, _ = gram_svd(_padded(xs), 64, lengths=list(LENGTHS), products=products)
        out = 0.0
        for i, x in enumerate(xs):
            t = x.shape[0]
            for r in (64, 16):
                err = float((x.double() - c[i, :t, :r].double() @ b[i, :r].double()).norm())
                out = max(out, err / float(svals[i][r:].square().sum().sqrt()))
        return out

    assert worst(_tf32_products(split=True)) <= 1.05
    assert worst(_tf32_products(split=False)) > 1.05
