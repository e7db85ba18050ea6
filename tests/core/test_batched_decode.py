"""Batched torch decode over the paged cache against the per-row reference (paged_decode_reference)."""

import time
from dataclasses import dataclass

import pytest
import torch

from ap_vllm.core.batched_decode import build_batched_decode_plan, paged_decode_batched
from ap_vllm.core.compaction import CompactedSpan, quantize_fp8
from ap_vllm.core.lowrank_attention import importance_thresholds
from ap_vllm.core.paged_decode import paged_decode_reference
from ap_vllm.core.paged_layout import (PagedSpan, block_contiguous, cache_bytes, fits, pack_span,
                                       paged_span_block_ids, read_importance, span_layout_for)
from ap_vllm.core.rope import RopeTable

SCALE = 0.125


@dataclass
class World:
    q: torch.Tensor
    cache: torch.Tensor  # [nb, 2, page, Hkv, d], contiguous or the token-major strided view
    block_table: torch.Tensor
    seq_lens: list
    spans: list


def _random_span(t, rk, rv, hkv, d, dtype, fp8, start, gen, rope):
    w = hkv * d

    def basis(r):
        return torch.linalg.qr(torch.randn(w, r, generator=gen))[0].T.contiguous().to(dtype)

    def coeff(r):
        return torch.randn(t, r, generator=gen) * (w / r) ** 0.5 * torch.linspace(1.0, 0.3, r)

    ck, cv = coeff(rk), coeff(rv)
    sk = sv = None
    if fp8:
        (ck, sk), (cv, sv) = quantize_fp8(ck), quantize_fp8(cv)
    else:
        ck, cv = ck.to(dtype), cv.to(dtype)
    return CompactedSpan(coeff_k=ck, basis_k=basis(rk), coeff_v=cv, basis_v=basis(rv), num_kv_heads=hkv,
                         head_size=d, start=start, scale_k=sk, scale_v=sv,
                         importance=torch.rand(t, generator=gen) * 0.01, rope=rope)


def make_world(seq_lens, specs, hq=8, hkv=2, d=32, page=16, dtype=torch.float32, fp8=False, rope=None,
               token_major=False, seed=0):
    """Paged cache with shuffled physical blocks; ``specs[b]``: spans of row b as (start, T, R_k, R_v)
    or (start, T, R_k, R_v, divisor, two_level_keys). Physical block 0 and the spare blocks are NaN,
    so a read of padding that is not masked shows."""
    gen = torch.Generator().manual_seed(seed)
    need = [max([L] + [s[0] + s[1] for s in sp]) for L, sp in zip(seq_lens, specs)]
    per_row = [-(-n // page) for n in need]
    total = sum(per_row) + 4
    perm = torch.randperm(total - 1, generator=gen) + 1  # block 0 is never owned
    cache = torch.randn(total, 2, page, hkv, d, generator=gen).to(dtype)
    table = torch.zeros(len(seq_lens), max(per_row) + 1, dtype=torch.int32)
    spans, nxt = [], 0
    for b, n in enumerate(per_row):
        table[b, :n] = perm[nxt: nxt + n].to(torch.int32)
        nxt += n
    unused = torch.ones(total, dtype=torch.bool)
    unused[table[table > 0].long()] = False
    cache[unused] = float("nan")
    for b, row in enumerate(specs):
        for spec in row:
            start, t, rk, rv = spec[:4]
            div, tlk = spec[4:] if len(spec) > 4 else (4, False)
            cs = _random_span(t, rk, rv, hkv, d, dtype, fp8, start, gen, rope)
            lay = span_layout_for(cs, page)
            assert fits(lay, start), spec
            sp = PagedSpan(seq=b, start=start, layout=lay, low_rank_divisor=div, two_level_keys=tlk)
            pack_span(cache, paged_span_block_ids(table, sp), cs, lay)
            spans.append(sp)
    if token_major:  # vLLM's token-major pages [nb, page, Hkv, 2d] seen as [nb, 2, page, Hkv, d]
        pages = torch.full((total, page, hkv, 2 * d), float("nan"), dtype=dtype)
        view = pages.view(total, page, hkv, 2, d).permute(0, 3, 1, 2, 4)
        assert not view.is_contiguous() and block_contiguous(view)
        view.copy_(cache)
        owned = ~unused
        cache_bytes(view)[owned] = cache_bytes(cache)[owned]  # span bytes byte for byte
        cache = view
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(dtype)
    return World(q, cache, table, list(seq_lens), spans)


def _clone_cache(cache):
    """A copy of the cache with the same memory layout (the whole storage, the same view on it)."""
    return torch.empty(0, dtype=cache.dtype).set_(cache.untyped_storage().clone(), cache.storage_offset(),
                                                  cache.size(), cache.stride())


def _storage_bytes(cache):
    return torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())


def _importances(world, cache):
    return [read_importance(cache, paged_span_block_ids(world.block_table, sp), sp.layout) for sp in world.spans]


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-4


def check(world, *, thresholds=None, softcap=None, window=None, lse_ref=None, ema=0.25, rope=None, plan_window=None,
          dtype=torch.float32):
    """Batched == reference: out, lse, the importance written, and no other byte of the cache changed."""
    for sp, thr in zip(world.spans, [None] * len(world.spans) if thresholds is None else thresholds):
        sp.threshold = None if thr is None else float(thr)
    ref_cache, cache = _clone_cache(world.cache), _clone_cache(world.cache)
    o_ref, l_ref = paged_decode_reference(world.q, ref_cache, world.block_table, torch.tensor(world.seq_lens),
                                          world.spans, SCALE, softcap, window, lse_ref, ema, rope)
    plan = build_batched_decode_plan(world.spans, world.block_table, world.seq_lens,
                                     window=window if plan_window is None else plan_window)
    o, l = paged_decode_batched(world.q, cache, plan, SCALE, softcap=softcap, window=window, thresholds=thresholds,
                                lse_ref=lse_ref, importance_ema=ema, rope=rope)
    assert o.dtype == torch.float32 and l.dtype == torch.float32 and o.shape == o_ref.shape and l.shape == l_ref.shape
    tol = _tol(dtype)
    assert torch.allclose(o, o_ref, atol=tol, rtol=tol), (o - o_ref).abs().max()
    assert torch.equal(torch.isinf(l), torch.isinf(l_ref))
    assert torch.allclose(l, l_ref, atol=1e-5, rtol=1e-5), (l - l_ref).nan_to_num().abs().max()
    got, want = _importances(world, cache), _importances(world, ref_cache)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5), (a - b).abs().max()
    if ema is not None and world.spans:
        assert any(not torch.equal(a, c) for a, c in zip(got, _importances(world, world.cache)))
    for sp, imp in zip(world.spans, want):  # the rest of the cache: byte for byte
        _write_importance(cache, paged_span_block_ids(world.block_table, sp), sp, imp)
    assert torch.equal(_storage_bytes(cache), _storage_bytes(ref_cache))
    return o, l


def _write_importance(cache, ids, sp, imp):
    cs = CompactedSpan(coeff_k=torch.zeros(sp.layout.num_tokens, 1), basis_k=torch.zeros(1, 1), coeff_v=torch.zeros(
        sp.layout.num_tokens, 1), basis_v=torch.zeros(1, 1), num_kv_heads=1, head_size=1, importance=imp)
    pack_span(cache, ids, cs, sp.layout, sections=["importance"])


# rows: no span, one span, two spans of other layouts, a span sharing a layout with another row's, an empty row
MIXED_LENS = [150, 330, 700, 250, 0, 90]
MIXED_SPECS = [[], [(37, 200, 16, 24)], [(0, 160, 8, 8, 2, True), (230, 410, 16, 24)], [(20, 200, 16, 24)], [], []]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("token_major", [False, True])
def test_mixed_batch_matches_reference(dtype, fp8, token_major):
    w = make_world(MIXED_LENS, MIXED_SPECS, dtype=dtype, fp8=fp8, token_major=token_major)
    assert len({sp.layout for sp in w.spans}) == 3  # one group of two spans
    thr = importance_thresholds(_importances(w, w.cache), 0.25)
    check(w, thresholds=thr, dtype=dtype)  # lse_ref None: this step's lse
    check(w, thresholds=thr, lse_ref=torch.randn(6, 8) + 5.0, dtype=dtype)
    inf_rows = torch.randn(6, 8) + 5.0
    inf_rows[[1, 3]] = float("inf")  # those rows' spans only decay
    check(w, thresholds=thr, lse_ref=inf_rows, dtype=dtype)
    check(w, thresholds=None, ema=None, dtype=dtype)


def test_plan_shape_and_groups():
    w = make_world(MIXED_LENS, MIXED_SPECS)
    plan = build_batched_decode_plan(w.spans, w.block_table, w.seq_lens)
    assert plan.exact_width == max(L - sum(s[1] for s in sp) for L, sp in zip(MIXED_LENS, MIXED_SPECS))
    assert plan.exact_valid.sum(1).tolist() == [150, 130, 130, 50, 0, 90]
    assert [g.num_spans for g in plan.groups] == [2, 1, 1]
    assert plan.groups[0].index.tolist() == [0, 3] and plan.groups[0].rows.tolist() == [1, 3]
    # exact positions: increasing, outside the spans, block/offset from the table
    pos, valid = plan.exact_pos[2], plan.exact_valid[2]
    p = pos[valid]
    assert torch.equal(p, torch.cat([torch.arange(160, 230), torch.arange(640, 700)]))
    assert torch.equal(plan.exact_block[2][valid], w.block_table[2, p // 16].long())
    assert torch.equal(plan.exact_offset[2][valid], p % 16)
    for g in plan.groups:
        for name, ids in g.section_blocks.items():
            assert ids.shape == (g.num_spans, g.layout.sections[name].num_blocks)


def test_explicit_thresholds_and_two_level_keys():
    specs = [[(16, 300, 16, 16, 4, True)], [(0, 256, 16, 16, 2, False)], [(40, 200, 16, 16, 4, True)]]
    w = make_world([330, 300, 250], specs, hq=4, hkv=1, d=64)
    imps = _importances(w, w.cache)
    mid = torch.stack([x.median() for x in imps])
    check(w, thresholds=mid)
    check(w, thresholds=torch.tensor([float("inf"), float("-inf"), float("inf")]))  # all low / all full / all low
    o_full, _ = check(w, thresholds=None)
    o_low, _ = check(w, thresholds=torch.full((3,), float("inf")))
    assert not torch.allclose(o_full, o_low, atol=1e-3)  # the two-level read really applies


@pytest.mark.parametrize("neox,rot,dtype,fp8", [(True, None, torch.float32, False), (False, 16, torch.float32, True),
                                                 (True, 24, torch.bfloat16, False)])
def test_pre_rope_spans(neox, rot, dtype, fp8):
    rope = RopeTable.from_base(32, rotary_dim=rot, max_positions=1024, is_neox_style=neox)
    w = make_world(MIXED_LENS, MIXED_SPECS, dtype=dtype, fp8=fp8, rope=rope, seed=2)
    thr = importance_thresholds(_importances(w, w.cache), 0.25)
    check(w, thresholds=thr, rope=rope, lse_ref=torch.randn(6, 8) + 4.0, dtype=dtype)
    check(w, thresholds=None, rope=rope, dtype=dtype)
    o_post, _ = paged_decode_batched(w.q, _clone_cache(w.cache),
                                     build_batched_decode_plan(w.spans, w.block_table, w.seq_lens), SCALE)
    o_pre, _ = check(w, rope=rope, ema=None, dtype=dtype)
    assert not torch.allclose(o_post, o_pre, atol=1e-3)  # the table matters
    plan = build_batched_decode_plan(w.spans, w.block_table, w.seq_lens)
    with pytest.raises(ValueError, match="beyond the rotary table"):
        paged_decode_batched(w.q, w.cache, plan, SCALE, rope=RopeTable.from_base(32, max_positions=500))


@pytest.mark.parametrize("token_major", [False, True])
def test_softcap_gqa(token_major):
    w = make_world([300, 400, 64], [[(20, 256, 8, 16)], [(100, 290, 16, 8)], []], hq=12, hkv=3, d=32,
                   token_major=token_major, seed=4)
    check(w, softcap=2.0, thresholds=importance_thresholds(_importances(w, w.cache), 0.5))


@pytest.mark.parametrize("token_major", [False, True])
def test_window_rows_without_spans(token_major):
    w = make_world([200, 77, 130, 0, 40], [[]] * 5, hq=4, hkv=2, d=32, token_major=token_major, seed=5)
    check(w, window=50, softcap=10.0, ema=None)
    check(w, window=50, plan_window=None, ema=None)  # plan over all positions, the window masked per call
    plan = build_batched_decode_plan(w.spans, w.block_table, w.seq_lens, window=50)
    assert plan.exact_width == 50
    check(w, window=None, ema=None)
    with pytest.raises(ValueError, match="built for window 50"):
        paged_decode_batched(w.q, w.cache, plan, SCALE, window=None)


def test_window_with_span_rejected():
    w = make_world([300, 100], [[(20, 200, 8, 8)], []], hq=2, hkv=1, d=64)
    with pytest.raises(ValueError, match="sliding-window"):
        build_batched_decode_plan(w.spans, w.block_table, w.seq_lens, window=64)
    plan = build_batched_decode_plan(w.spans, w.block_table, w.seq_lens)
    with pytest.raises(ValueError, match="sliding-window"):
        paged_decode_batched(w.q, w.cache, plan, SCALE, window=64)


def test_span_reaching_past_the_query_and_span_only_rows():
    """A row made only of a span; a span whose last tokens lie after the row's query (masked)."""
    w = make_world([256, 300, 120], [[(0, 256, 8, 8)], [(100, 256, 8, 8)], []], hq=4, hkv=2, d=32, seed=6)
    plan = build_batched_decode_plan(w.spans, w.block_table, w.seq_lens)
    assert plan.groups[0].visible is not None and int(plan.exact_valid[0].sum()) == 0
    check(w, thresholds=importance_thresholds(_importances(w, w.cache), 0.25))


def test_no_spans_no_keys():
    w = make_world([0, 0], [[], []], hq=2, hkv=1, d=32)
    plan = build_batched_decode_plan([], w.block_table, [0, 0])
    o, l = paged_decode_batched(w.q, w.cache, plan, SCALE)
    assert torch.equal(o, torch.zeros(2, 2, 32)) and bool(torch.isneginf(l).all())


def test_block_size_without_spans_read_from_the_cache():
    w = make_world([100, 60], [[], []], hq=2, hkv=1, d=32, seed=7)
    plan = build_batched_decode_plan([], w.block_table, w.seq_lens)
    assert plan.exact_block is None
    check(w, ema=None)
    given = build_batched_decode_plan([], w.block_table, w.seq_lens, block_size=16)
    assert torch.equal(paged_decode_batched(w.q, w.cache, given, SCALE)[0],
                       paged_decode_batched(w.q, w.cache, plan, SCALE)[0])


def test_exact_rows_of_a_view_with_padded_heads():
    """A cache view whose token rows are not dense (head size padded in memory): exact rows are still
    read right (element gather)."""
    w = make_world([100, 37, 64], [[], [], []], hq=4, hkv=2, d=32, seed=9)
    nb, _, page, hkv, d = w.cache.shape
    padded = torch.full((nb, 2, page, hkv, d + 8), float("nan"))[..., :d]
    padded.copy_(w.cache)
    w.cache = padded
    check(w, ema=None, softcap=3.0)


def test_layer_call_never_reads_the_device(monkeypatch):
    """The per-layer call only enqueues tensor ops: no .item(), .tolist(), int/float/bool of a tensor, .cpu()."""
    rope = RopeTable.from_base(32, max_positions=1024)
    w = make_world(MIXED_LENS, MIXED_SPECS, fp8=True, rope=rope, token_major=True)
    plan = build_batched_decode_plan(w.spans, w.block_table, w.seq_lens)
    thr = importance_thresholds(_importances(w, w.cache), 0.25)

    def refuse(*a, **k):
        raise AssertionError("host read of a tensor")

    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    paged_decode_batched(w.q, w.cache, plan, SCALE, thresholds=thr, importance_ema=0.25, rope=rope, softcap=5.0)
    paged_decode_batched(w.q, w.cache, plan, SCALE, thresholds=thr, importance_ema=0.25, rope=rope,
                         lse_ref=torch.zeros(6, 8))


def _timed(fn, reps=3):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def test_batch_of_32_long_spans():
    """32 rows, each one 1024-token span and some exact tokens: equality, and the time of one call
    against the reference loop (printed)."""
    lens = [1024 + 40 + 3 * b for b in range(32)]
    specs = [[(16 + (b % 3) * 16, 1024, 16, 16)] for b in range(32)]
    w = make_world(lens, specs, hq=8, hkv=2, d=64, seed=8)
    assert len({sp.layout for sp in w.spans}) == 1
    thr = importance_thresholds(_importances(w, w.cache), 0.25)
    check(w, thresholds=thr)
    for sp, t in zip(w.spans, thr):
        sp.threshold = float(t)
    seq_lens = torch.tensor(lens)
    plan = build_batched_decode_plan(w.spans, w.block_table, lens)
    t_new = _timed(lambda: paged_decode_batched(w.q, w.cache, plan, SCALE, thresholds=thr, importance_ema=0.25))
    t_ref = _timed(lambda: paged_decode_reference(w.q, w.cache, w.block_table, seq_lens, w.spans, SCALE,
                                                  importance_ema=0.25), reps=1)
    t_plan = _timed(lambda: build_batched_decode_plan(w.spans, w.block_table, lens))
    print(f"\nB=32, 1024-token spans: batched {t_new * 1e3:.1f} ms/call (plan {t_plan * 1e3:.1f} ms/step), "
          f"reference {t_ref * 1e3:.1f} ms/call")


def test_a_span_without_a_threshold_reads_every_component():
    """Text spans (two-level read off by default) come with PagedSpan.threshold None: the batched path reads
    all their components whatever the layer's thresholds say, as their kernel metadata row does."""
    from dataclasses import replace as dc_replace

    specs = [[(16, 300, 16, 16, 4, False)], [(40, 200, 16, 16, 4, False)]]
    w = make_world([330, 250], specs, hq=4, hkv=1, d=64)
    w.spans[:] = [dc_replace(sp, threshold=0.0) for sp in w.spans]  # the two-level read on (layer thresholds)
    plan_full = build_batched_decode_plan(w.spans, w.block_table, w.seq_lens)
    o_full, _ = paged_decode_batched(w.q, _clone_cache(w.cache), plan_full, SCALE)
    low = torch.full((2,), float("inf"))  # would read every token at R/4
    o_low, _ = paged_decode_batched(w.q, _clone_cache(w.cache), plan_full, SCALE, thresholds=low)
    assert not torch.allclose(o_full, o_low, atol=1e-3)
    text = [dc_replace(sp, threshold=None) if i == 1 else sp for i, sp in enumerate(w.spans)]
    o_mixed, _ = paged_decode_batched(w.q, _clone_cache(w.cache),
                                      build_batched_decode_plan(text, w.block_table, w.seq_lens), SCALE,
                                      thresholds=low)
    rows_of = [sp.seq for sp in w.spans]
    assert torch.allclose(o_mixed[rows_of[1]], o_full[rows_of[1]], atol=1e-5)  # the threshold-less span: full
    assert torch.allclose(o_mixed[rows_of[0]], o_low[rows_of[0]], atol=1e-5)  # the other: two-level
