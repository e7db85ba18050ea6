"""Triton kernels against the torch reference (CPU: Triton interpreter on small shapes)."""

import os

import torch

if not torch.cuda.is_available():  # must precede any import of triton / ap_vllm.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from ap_vllm.core.compaction import compact_span  # noqa: E402
from ap_vllm.core.dense import dense_attention  # noqa: E402
from ap_vllm.core.paged_decode import build_decode_plan, paged_decode_reference, paged_mixed_decode  # noqa: E402
from ap_vllm.core.paged_layout import (  # noqa: E402
    PagedSpan, block_contiguous, cache_bytes, fits, pack_span, paged_span_block_ids, span_layout_for, unpack_span)
from ap_vllm.core.rope import RopeTable  # noqa: E402
from ap_vllm.core.synthetic import low_rank_kv, make_paged_batch  # noqa: E402
from ap_vllm.kernels.lowrank_decode import SpanLaunch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 3e-3


def _importances(pb, cache):
    return [unpack_span(cache, paged_span_block_ids(pb.block_table, sp), sp.layout).importance for sp in pb.spans]


def _check(pb, nb, scale=0.125, softcap=None, window=None, lse_ref=None, ema=0.25, dtype=torch.float32, rope=None,
           **kernel_opts):
    plan = build_decode_plan(pb.spans, nb, device=DEV)
    ref_cache = pb.kv_cache.clone()
    o1, l1 = paged_mixed_decode(pb.q, ref_cache, pb.block_table, pb.seq_lens, plan, scale, softcap=softcap,
                                window=window, lse_ref=lse_ref, importance_ema=ema, kernel="torch", rope=rope)
    o2, l2 = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, scale, softcap=softcap,
                                window=window, lse_ref=lse_ref, importance_ema=ema, kernel="triton", rope=rope,
                                **kernel_opts)
    tol = _tol(dtype)
    assert torch.allclose(o2.cpu(), o1.cpu(), atol=tol, rtol=tol), (o2.cpu() - o1.cpu()).abs().max()
    assert torch.allclose(l2.cpu(), l1.cpu(), atol=1e-4, rtol=1e-5), (l2.cpu() - l1.cpu()).abs().max()
    for a, b in zip(_importances(pb, ref_cache), _importances(pb, pb.kv_cache)):
        assert torch.allclose(a.cpu(), b.cpu(), atol=1e-6, rtol=1e-4)
    return o2, l2


@pytest.mark.parametrize("cdt", ["model", "fp8_e4m3"])
def test_pack_kernel_matches_reference(cdt):
    gen = torch.Generator().manual_seed(0)
    k = low_rank_kv(300, 2, 64, generator=gen).bfloat16()
    v = low_rank_kv(300, 2, 64, generator=gen).bfloat16()
    sp = compact_span(k, v, 24, 40, coefficient_dtype=cdt, importance=torch.rand(300, generator=gen))
    lay = span_layout_for(sp, 16)
    c1 = torch.randn(30, 2, 16, 2, 64, generator=gen).bfloat16()
    c2 = c1.clone().to(DEV)
    ids = torch.randperm(30, generator=gen)[: lay.num_blocks]
    pack_span(c1, ids, sp, lay)
    dsp = type(sp)(**{f: (getattr(sp, f).to(DEV) if isinstance(getattr(sp, f), torch.Tensor) else getattr(sp, f))
                      for f in sp.__dataclass_fields__})
    pack_span(c2, ids.to(DEV), dsp, lay, kernel=True)
    assert torch.equal(c1.view(torch.uint8), c2.cpu().view(torch.uint8))


CASES = [  # dtype, coefficients, softcap, two-level keys, Hq, Hkv, d
    (torch.float32, "model", None, False, 8, 2, 64),
    (torch.bfloat16, "model", None, False, 28, 4, 128),
    (torch.float16, "fp8_e4m3", 30.0, True, 6, 3, 64),
    (torch.bfloat16, "fp8_e4m3", None, False, 4, 1, 128),
]
# launch options no served path takes yet (make gpu-check times them): the served model's geometry, and FP8
# coefficients with soft-capping and two-level keys
OPTION_CASES = CASES[1:3]


@pytest.mark.parametrize("dtype,cdt,softcap,tlk,hq,hkv,d", CASES)
def test_mixed_decode_matches_reference(dtype, cdt, softcap, tlk, hq, hkv, d):
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=hq,
                          num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=24, importance_fraction=0.25,
                          dtype=dtype, coefficient_dtype=cdt, two_level_keys=tlk, device=DEV)
    # one-pass mode (normaliser from a previous step), then exact mode (lse_ref=None)
    lse_ref = torch.randn(3, hq, device=DEV) + 5.0
    _check(pb, 3, softcap=softcap, lse_ref=lse_ref, dtype=dtype)
    _check(pb, 3, softcap=softcap, dtype=dtype)


@pytest.mark.parametrize("static", [False, True])
def test_exact_tokens_between_spans_listed_in_any_order(static):
    """The exact kernel splits only a row's exact tokens (positions mapped around its spans, listed in any
    order): three spans with text before, between and after them, a row without spans; the spans of each row
    listed backwards give the same output, equal to the torch reference (dynamic and static launch)."""
    import dataclasses

    pb = make_paged_batch([700, 90, 520], [[(5, 130), (160, 200), (400, 150)], [], [(0, 100), (300, 200)]],
                          num_q_heads=4, num_kv_heads=2, head_size=64, key_rank=16, value_rank=16, device=DEV)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    want, want_lse = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125,
                                        kernel="torch")
    backwards = plan.seq_spans.clone()
    for b in range(3):
        n = int((backwards[b] >= 0).sum())
        backwards[b, :n] = backwards[b, :n].flip(0)
    assert not torch.equal(backwards, plan.seq_spans)
    kw = {}
    if static:  # the CUDA-graph launch: splits and caps from shapes, each row cutting its own exact tokens
        kw = dict(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                  num_span_splits=3, num_exact_splits=4, max_seq_len=4096)
    for seq_spans in (plan.seq_spans, backwards):
        got, lse = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens,
                                      dataclasses.replace(plan, seq_spans=seq_spans), 0.125, kernel="triton", **kw)
        assert torch.allclose(got.float().cpu(), want.float().cpu(), atol=1e-4, rtol=1e-4)
        assert torch.allclose(lse.cpu(), want_lse.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype,cdt,softcap,tlk,hq,hkv,d,page", [CASES[0] + (4,), CASES[1] + (16,),
                                                                   CASES[2] + (16,)])
def test_span_launch_knobs_keep_the_result(dtype, cdt, softcap, tlk, hq, hkv, d, page, static):
    """The span launch's tuning knobs (q_proj held in registers, per-row block-table loads, pipelining stages,
    tile sizes) change how the kernel reads, never what it computes: output, lse and importance update equal
    the torch reference (two-level read, FP8 coefficients, soft cap; pages of 4 tokens: 42 value rows per
    block, so 32-token tiles straddle two blocks of a section)."""
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=hq,
                          num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=24, importance_fraction=0.25,
                          dtype=dtype, coefficient_dtype=cdt, two_level_keys=tlk, device=DEV, page=page)
    lse_ref = torch.randn(3, hq, device=DEV) + 5.0
    kw = {}
    if static:
        plan = build_decode_plan(pb.spans, 3, device=DEV)
        kw = dict(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                  num_span_splits=3, num_programs=4, max_seq_len=4096)
    assert SpanLaunch().overrides() == {} and SpanLaunch(warps=4, hold_q=True).overrides() == {"warps": 4,
                                                                                               "hold_q": True}
    # the default (q held, scalar block-table reads, 64-token tiles), the first default's reads (q re-read each
    # tile) on tiles straddling blocks, the second's per-row block-table loads, and mixed knobs
    default = SpanLaunch().resolved(decode_post_rope=True)
    assert (default.warps, default.block_t, default.stages, default.hold_q, default.bt_vec, default.maxnreg) == \
        (4, 64, 2, True, False, 0)
    assert SpanLaunch(block_t=16).resolved(decode_post_rope=True, tight=True).block_t == 16  # (given: kept)
    other = SpanLaunch(warps=16).resolved(decode_post_rope=False)
    assert (other.warps, other.stages, other.hold_q, other.bt_vec) == (16, 1, False, False)
    for launch in (SpanLaunch(), SpanLaunch(hold_q=False, bt_vec=False, block_t=16, warps=16, stages=1),
                   SpanLaunch(hold_q=False, block_t=32), SpanLaunch(bt_vec=True),
                   SpanLaunch(bt_vec=False, block_t=32, warps=4, stages=3, split_target=7)):
        _check(pb, 3, softcap=softcap, lse_ref=lse_ref, dtype=dtype, launch=launch, **kw)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype,cdt,softcap,tlk,hq,hkv,d", CASES)
def test_full_rank_plan_reads_without_selecting(dtype, cdt, softcap, tlk, hq, hkv, d, static):
    """Spans without a threshold (value_selection 'full'): the plan says full_rank and the span kernel reads
    every token at full rank without loading the importance to decide it; the same output, lse and (with the
    update) importance as the launch that decides it per token from thresholds of -inf, and as the torch
    reference (dynamic and static launch; two-level keys and FP8 coefficients included)."""
    import dataclasses

    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=hq,
                          num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=24, dtype=dtype,
                          coefficient_dtype=cdt, two_level_keys=tlk, device=DEV)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    assert plan.full_rank and torch.isinf(plan.thresholds).all()
    kw = {}
    if static:
        kw = dict(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                  num_span_splits=3, num_programs=4, max_seq_len=4096)
    lse_ref = torch.randn(3, hq, device=DEV) + 5.0
    for ema in (None, 0.25):
        outs = []
        for p in (plan, dataclasses.replace(plan, full_rank=False)):
            cache = pb.kv_cache.clone()
            o, lse = paged_mixed_decode(pb.q, cache, pb.block_table, pb.seq_lens, p, 0.125, softcap=softcap,
                                        lse_ref=lse_ref, importance_ema=ema, kernel="triton", **kw)
            outs.append((o.cpu(), lse.cpu(), [x.cpu() for x in _importances(pb, cache)]))
        (o1, l1, i1), (o2, l2, i2) = outs
        torch.testing.assert_close(o1, o2, atol=1e-6, rtol=1e-6)  # (the same arithmetic: equal on CPU)
        torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)
        for a, b in zip(i1, i2):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
        _check(pb, 3, softcap=softcap, lse_ref=lse_ref, ema=ema, dtype=dtype, **kw)


def _full_rank_launches(monkeypatch, constexpr, dtype, cdt, softcap, tlk, hq, hkv, d, static):
    """A full-rank batch (no thresholds: plan.full_rank) of three rows, 3 splits (static: 4 programs), and
    ``call(launch, ema=None)`` decoding it on a fresh copy of its cache; ``flags`` collects the value of
    ``constexpr`` each span-kernel launch is compiled with. Returns (flags, call, (batch, lse_ref, kernel kw))."""
    import ap_vllm.kernels.lowrank_decode as ld

    flags = []
    cls = type(ld._span_attn_kernel)
    orig = cls.run

    def run(self, *args, **kwargs):
        if getattr(self, "fn", self).__name__ == "_span_attn_kernel":
            flags.append(tuple(kwargs[c] for c in constexpr) if isinstance(constexpr, tuple) else kwargs[constexpr])
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=hq,
                          num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=24, dtype=dtype,
                          coefficient_dtype=cdt, two_level_keys=tlk, device=DEV)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    assert plan.full_rank
    kw = dict(num_span_splits=3)
    if static:
        kw.update(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                  num_programs=4, max_seq_len=4096)
    lse_ref = torch.randn(3, hq, device=DEV) + 5.0

    def call(launch, ema=None):
        cache = pb.kv_cache.clone()
        return paged_mixed_decode(pb.q, cache, pb.block_table, pb.seq_lens, plan, 0.125, softcap=softcap,
                                  lse_ref=lse_ref, importance_ema=ema, kernel="triton", launch=launch, **kw)

    return flags, call, (pb, lse_ref, kw)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype,cdt,softcap,tlk,hq,hkv,d", OPTION_CASES)
def test_prefetching_full_rank_launch_computes_the_same(dtype, cdt, softcap, tlk, hq, hkv, d, static, monkeypatch):
    """SpanLaunch(prefetch=True): a full-rank decode launch issues tile i + 1's loads before computing tile i.
    Its output and lse equal the default launch's (the same arithmetic, 1e-6) on tiles inside a block, tiles
    straddling two blocks and per-row block-table reads, FP8 coefficients and scales included, dynamic and
    static (splits of several tiles, the last one partial); the kernel is compiled with PREFETCH there, and
    not with the importance update (which reads what it loads). Tiles read from one block (BT_ONE) take the loop
    whose block-table reads run one tile ahead of the row loads (_carried_full_rank): every case but float32
    coefficients (170 value rows a block) has some."""
    import ap_vllm.kernels.lowrank_decode as ld

    flags, call, (pb, _, _) = _full_rank_launches(monkeypatch, ("PREFETCH", "BT"), dtype, cdt, softcap, tlk, hq, hkv,
                                                  d, static)
    rows_per_block = build_decode_plan(pb.spans, 3).rows_per_block
    seen = set()
    for tile, bt_vec in ((16, False), (32, False), (32, True)):  # (pages of 16 tokens: 32-token tiles straddle)
        flags.clear()
        o1, l1 = call(SpanLaunch(block_t=tile, bt_vec=bt_vec))
        o2, l2 = call(SpanLaunch(block_t=tile, bt_vec=bt_vec, prefetch=True, stages=1))
        bt = ld._bt_mode(bt_vec, rows_per_block, tile, pb.spans[0].layout.block_bytes // 4)
        assert flags == [(False, bt), (True, bt)]
        seen.add(bt)
        torch.testing.assert_close(o2.cpu(), o1.cpu(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(l2.cpu(), l1.cpu(), atol=1e-6, rtol=1e-6)
    assert (ld.BT_ONE.value in seen) == (dtype != torch.float32) and ld.BT_ROW.value in seen
    flags.clear()
    call(SpanLaunch(prefetch=True, stages=1), ema=0.25)
    assert [f for f, _ in flags] == [False]


@pytest.mark.parametrize("cdt", ["model", "fp8_e4m3"])
def test_block_table_read_a_tile_ahead(cdt, monkeypatch):
    """The full-rank loops over one-block tiles whose block-table reads run ahead of the row loads
    (_carried_full_rank): ``bt_ahead`` (tile i's rows from bases read in iteration i - 1; with ``bt_chunk`` the
    blocks of 2 or 64 tiles read at once before a run over them: many chunks a split, or one) and ``prefetch`` (tile
    i + 2's blocks read while tile i + 1's rows are issued); and warp_split with ``bt_chunk`` (2e-5: its warps sum
    in another order). Over spans of several blocks per split (FP8: 256 rows a
    block; model bf16: 512 key rows), splits that start and end inside blocks, dynamic and static launches: the
    output and lse equal the default launch's (1e-6) and the torch reference's. bt_ahead with prefetch or
    warp_split, and a bt_chunk that is no power of two or comes without bt_ahead, are refused by name."""
    import ap_vllm.kernels.lowrank_decode as ld

    pb = make_paged_batch([1400, 40, 1300], [[(5, 1300)], [], [(0, 600), (610, 650)]], num_q_heads=8,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24, dtype=torch.bfloat16,
                          coefficient_dtype=cdt, device=DEV)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    assert plan.full_rank and min(plan.rows_per_block) <= 512
    seen = []
    orig = type(ld._span_attn_kernel).run

    def run(self, *args, **kwargs):
        if getattr(self, "fn", self).__name__ == "_span_attn_kernel":
            seen.append((kwargs["PREFETCH"], kwargs["AHEAD"], kwargs["BT"], kwargs["WSPLIT"]))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(type(ld._span_attn_kernel), "run", run)
    ref = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125, kernel="torch")
    launches = (SpanLaunch(block_t=32), SpanLaunch(block_t=32, prefetch=True, stages=1),
                SpanLaunch(block_t=32, bt_ahead=True), SpanLaunch(block_t=32, bt_ahead=True, stages=3),
                SpanLaunch(block_t=32, bt_ahead=True, stages=3, bt_chunk=2),
                SpanLaunch(block_t=32, bt_ahead=True, stages=3, bt_chunk=64))
    # warp_split over chunks of block-table entries (its own summation order: compared at 2e-5)
    wsplits = (SpanLaunch(block_t=32, warps=2, warp_split=True, stages=3, bt_chunk=2),
               SpanLaunch(block_t=32, warps=2, warp_split=True, stages=3, bt_chunk=64))
    one = ld.BT_ONE.value
    for static in (False, True):  # (3 splits of about 430 tokens: 14 tiles, so 7 chunks of 2 or one of 64)
        kw = dict(num_span_splits=3)
        if static:
            kw.update(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                      num_programs=4, max_seq_len=4096)
        seen.clear()
        outs = [paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125,
                                   kernel="triton", launch=launch, **kw) for launch in launches + wsplits]
        assert seen == [(False, 0, one, 1), (True, 0, one, 1), (False, 1, one, 1), (False, 1, one, 1),
                        (False, 2, one, 1), (False, 64, one, 1), (False, 2, one, 2), (False, 64, one, 2)]
        for i, (o, lse) in enumerate(outs[1:], 1):
            tol = 1e-6 if i < len(launches) else 2e-5
            torch.testing.assert_close(o.cpu(), outs[0][0].cpu(), atol=tol, rtol=tol)
            torch.testing.assert_close(lse.cpu(), outs[0][1].cpu(), atol=tol, rtol=tol)
            torch.testing.assert_close(o.cpu(), ref[0].cpu(), atol=3e-3, rtol=3e-3)
    for other in (dict(prefetch=True, stages=1), dict(warp_split=True)):
        with pytest.raises(ValueError, match="bt_ahead=True.*choose one"):
            paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125, kernel="triton",
                               launch=SpanLaunch(block_t=32, bt_ahead=True, **other))
    for bad in (SpanLaunch(block_t=32, bt_ahead=True, bt_chunk=3), SpanLaunch(block_t=32, bt_chunk=4),
                SpanLaunch(block_t=32, warps=2, warp_split=True, bt_chunk=128)):
        with pytest.raises(ValueError, match=f"bt_chunk={bad.bt_chunk}.*power of two from 2 to 64"):
            paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125, kernel="triton",
                               launch=bad)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype,cdt,softcap,tlk,hq,hkv,d", OPTION_CASES)
def test_warp_split_full_rank_launch_computes_the_same(dtype, cdt, softcap, tlk, hq, hkv, d, static, monkeypatch):
    """SpanLaunch(warp_split=True): a full-rank decode launch whose warps each take their own tokens of a tile
    (batched dots, one running max / sum / accumulator a warp, merged once a split). Its output and lse equal the
    default launch's (the same products, summed in another order: 2e-5) and the torch reference's, on tiles
    inside a block and straddling two, 2 and 4 warps, FP8 coefficients and scales, soft-capping, dynamic and
    static (splits of several tiles, the last one partial: a warp whose tokens are all past the split); the
    kernel is compiled with WSPLIT = warps there, and not with the importance update (which needs the 2-D loop);
    with prefetch, or with tiles that leave a warp fewer than 16 tokens, it is refused by name."""
    flags, call, (pb, lse_ref, kw) = _full_rank_launches(monkeypatch, "WSPLIT", dtype, cdt, softcap, tlk, hq, hkv,
                                                         d, static)

    # (float32: value rows of 96 bytes, 170 a block, so 32- and 64-token tiles straddle two blocks)
    for tile, warps in ((32, 2), (64, 4), (64, 2)):
        flags.clear()
        o1, l1 = call(SpanLaunch(block_t=tile, warps=warps))
        o2, l2 = call(SpanLaunch(block_t=tile, warps=warps, warp_split=True))
        assert flags == [1, warps]
        torch.testing.assert_close(o2.cpu(), o1.cpu(), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(l2.cpu(), l1.cpu(), atol=2e-5, rtol=2e-5)
    _check(pb, 3, softcap=softcap, lse_ref=lse_ref, ema=None, dtype=dtype,
           launch=SpanLaunch(block_t=32, warps=2, warp_split=True), **kw)
    flags.clear()
    call(SpanLaunch(block_t=32, warps=2, warp_split=True), ema=0.25)
    assert flags == [1]
    with pytest.raises(ValueError, match="warp_split and prefetch"):
        call(SpanLaunch(warp_split=True, prefetch=True, stages=1))
    with pytest.raises(ValueError, match="fewer than 16 tokens a warp"):
        call(SpanLaunch(block_t=32, warps=4, warp_split=True))


@pytest.mark.parametrize("cdt,ema,static", [("model", None, False), ("model", 0.25, True), ("fp8_e4m3", None, True)])
def test_one_block_tiles(cdt, ema, static, monkeypatch):
    """A plan whose coefficient sections hold a multiple of the token tile per block (plan.rows_per_block) reads
    each tile and section from one block (BT_ONE: one block-table entry, no per-row select); the same output, lse
    and importance as the two-block read of the same batch (a plan that does not say, 1e-6) and as the torch
    reference. A tile that does not divide them reads two blocks. A plan that claimed it falsely (tiles straddling)
    would read other rows: that output differs, so the one-block read is the one the first comparison ran."""
    import dataclasses

    import ap_vllm.kernels.lowrank_decode as ld

    modes = []
    cls = type(ld._span_attn_kernel)
    orig = cls.run

    def run(self, *args, **kwargs):
        if getattr(self, "fn", self).__name__ == "_span_attn_kernel":
            modes.append(int(kwargs["BT"]))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    # bfloat16, d = 64, 2 kv heads, pages of 16: blocks of 8 KiB; key rows of 16 components (32 bytes: 256 a block),
    # value rows of 24 (two sectors: 128 a block)
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=8,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24, dtype=torch.bfloat16,
                          coefficient_dtype=cdt, importance_fraction=None if ema is None else 0.25, device=DEV)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    assert plan.rows_per_block == ((128, 256) if cdt == "model" else (256,))  # (FP8: rows of one sector)
    kw = dict(num_span_splits=3)
    if static:
        kw.update(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                  num_programs=4, max_seq_len=4096)
    lse_ref = torch.randn(3, 8, device=DEV) + 5.0

    def call(p, tile, kernel="triton", batch=pb):
        cache = batch.kv_cache.clone()
        o, lse = paged_mixed_decode(batch.q, cache, batch.block_table, batch.seq_lens, p, 0.125, lse_ref=lse_ref,
                                    importance_ema=ema, kernel=kernel, launch=SpanLaunch(block_t=tile), **kw)
        return o, lse, _importances(batch, cache)

    ref = call(plan, 32, kernel="torch")
    for tile in (32, 64):
        modes.clear()
        one = call(plan, tile)
        two = call(dataclasses.replace(plan, rows_per_block=()), tile)
        assert modes == [ld.BT_ONE.value, ld.BT_PAIR.value]
        for a, b in zip(one[:2], two[:2]):
            torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-6, rtol=1e-6)
        for a, b in zip(one[2], two[2]):
            torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(one[0].cpu(), ref[0].cpu(), atol=3e-3, rtol=3e-3)
    if cdt != "model":
        return
    # value rows of 40 components padded to three sectors: 85 a block, so 32-token tiles straddle two blocks
    pb2 = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=8,
                           num_kv_heads=2, head_size=64, key_rank=16, value_rank=40, dtype=torch.bfloat16,
                           importance_fraction=None if ema is None else 0.25, device=DEV)
    plan2 = build_decode_plan(pb2.spans, 3, device=DEV)
    assert plan2.rows_per_block == (85, 256)
    modes.clear()
    ref2 = call(plan2, 32, kernel="torch", batch=pb2)
    two = call(plan2, 32, batch=pb2)
    torch.testing.assert_close(two[0].cpu(), ref2[0].cpu(), atol=3e-3, rtol=3e-3)
    lied = call(dataclasses.replace(plan2, rows_per_block=(256,)), 32, batch=pb2)  # (a false claim)
    assert modes == [ld.BT_PAIR.value, ld.BT_ONE.value]
    # rows of the wrong block (whatever the pool holds there, NaN included): the output is not the reference's
    assert not torch.allclose(lied[0].cpu().float(), ref2[0].cpu().float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_programmatic_dependent_launch(static, monkeypatch):
    """SpanLaunch(pdl=True): the span kernel and the merge launched as programmatic dependents of the launch before
    them. Where griddepcontrol does not exist (the interpreter, GPUs before sm_90) it is refused by name before
    anything is launched. On sm_90 and later: the output and lse equal the default launch's (the same arithmetic,
    1e-6), rows of two spans, of none, dynamic and static, and the static call captured in a CUDA graph and
    replayed (the dependent launches as graph edges) gives them too."""
    import ap_vllm.kernels.lowrank_decode as ld

    flags, call, (pb, lse_ref, kw) = _full_rank_launches(monkeypatch, "GDC", torch.bfloat16, "model", None, False,
                                                         8, 2, 64, static)
    if not ld.pdl_supported():
        with pytest.raises(ValueError, match=r"SpanLaunch\(pdl=True\) needs a CUDA GPU of sm_90 or later"):
            call(SpanLaunch(pdl=True))
        assert flags == []
        return
    o1, l1 = call(SpanLaunch())
    o2, l2 = call(SpanLaunch(pdl=True))
    assert flags == [False, True]
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-6)
    if static:
        cache = pb.kv_cache.clone()
        plan = build_decode_plan(pb.spans, 3, device=DEV)
        fn = lambda: paged_mixed_decode(pb.q, cache, pb.block_table, pb.seq_lens, plan, 0.125,  # noqa: E731
                                        kernel="triton", launch=SpanLaunch(pdl=True), **kw)
        fn()  # (compiled before the capture)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o3, l3 = fn()
        for _ in range(3):
            o3.zero_()
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(o3, o1, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(l3, l1, atol=1e-6, rtol=1e-6)


def test_per_row_normaliser_missing_rows_take_this_steps_lse():
    """lse_ref given per row, None for a sequence without a previous step: that row's importance is
    normalised by this step's exact lse, the others by theirs (kernels == oracle == explicit)."""
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=8,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24, importance_fraction=0.25,
                          device=DEV)
    prev = torch.randn(3, 8, device=DEV) + 5.0
    rows = [prev[0], None, None]
    start = pb.kv_cache.clone()
    _, lse = _check(pb, 3, lse_ref=rows)
    # the same update with the missing rows filled in by hand from this step's exact lse
    explicit = torch.stack([prev[0], lse[1].to(DEV), lse[2].to(DEV)])
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    paged_mixed_decode(pb.q, start, pb.block_table, pb.seq_lens, plan, 0.125, lse_ref=explicit, importance_ema=0.25,
                       kernel="torch")
    for a, b in zip(_importances(pb, start), _importances(pb, pb.kv_cache)):
        assert torch.allclose(a.cpu(), b.cpu(), atol=1e-6, rtol=1e-4)
    # and the third row's update really depends on the normaliser (a wrong one gives other importances)
    other = pb.kv_cache.clone()
    paged_mixed_decode(pb.q, other, pb.block_table, pb.seq_lens, plan, 0.125, lse_ref=prev, importance_ema=0.25,
                       kernel="torch")
    assert not torch.allclose(_importances(pb, other)[-1].cpu(), _importances(pb, start)[-1].cpu())
    for kernel in ("torch", "triton"):
        with pytest.raises(ValueError, match="lse_ref has 2 rows for a batch of 3"):
            paged_mixed_decode(pb.q, other, pb.block_table, pb.seq_lens, plan, 0.125, lse_ref=rows[:2],
                               importance_ema=0.25, kernel=kernel)


def test_exact_only_window_softcap():
    pb = make_paged_batch([200, 77, 130], [[], [], []], num_q_heads=4, num_kv_heads=2, head_size=64, device=DEV)
    _check(pb, 3, softcap=10.0, window=50)
    _check(pb, 3)


def test_span_only_sequence_and_splits():
    """A sequence made only of a span; many splits (most of them empty for the shorter span)."""
    pb = make_paged_batch([256, 400], [[(0, 256)], [(100, 290)]], num_q_heads=4, num_kv_heads=2, head_size=64,
                          key_rank=16, value_rank=16, device=DEV)
    plan = build_decode_plan(pb.spans, 2, device=DEV)
    ref = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125, kernel="torch")
    got = paged_mixed_decode(pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, 0.125, kernel="triton",
                             num_span_splits=5, num_exact_splits=3, launch=SpanLaunch(block_t=16), block_n=16)
    assert torch.allclose(got[0].cpu(), ref[0].cpu(), atol=1e-5)
    assert torch.allclose(got[1].cpu(), ref[1].cpu(), atol=1e-5)


def _merge_case(static: bool):
    """Three rows (one span, none, two), 5 span and 3 exact splits (static: 4 programs): (batch, plan, kernel
    keywords, the torch reference's output and lse)."""
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=8,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24, device=DEV)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    kw = dict(num_span_splits=5, num_exact_splits=3, block_n=16)
    if static:
        kw.update(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                  num_programs=4, max_seq_len=4096)
    ref = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125,
                             kernel="torch")
    return pb, plan, kw, ref


@pytest.mark.parametrize("static", [False, True])
def test_merge_with_a_large_value_basis(static):
    """d = 256 and R = 128 (Qwen3.5's softmax layers at the qwen3_vl preset's rank), 4 q heads a kv head: the merge
    pads the group to 4 rows, not 16 (its 16-row static launch spilled on sm_90), and still equals the torch
    reference (1e-5)."""
    from ap_vllm.kernels.lowrank_decode import merge_group_rows

    assert merge_group_rows(4, 4, 128, 256) == 4 and merge_group_rows(4, 4, 128, 128) == 16
    assert merge_group_rows(7, 7, 64, 128) == 16 and merge_group_rows(7, 2, 128, 256) == 2
    pb = make_paged_batch([700, 640], [[(37, 600)], [(10, 620)]], num_q_heads=4, num_kv_heads=1, head_size=256,
                          key_rank=128, value_rank=128, device=DEV)
    plan = build_decode_plan(pb.spans, 2, device=DEV)
    kw = dict(num_span_splits=3, num_exact_splits=2, block_n=16)
    if static:
        kw.update(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                  num_programs=4, max_seq_len=4096)
    ref_o, ref_l = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.0625,
                                      kernel="torch")
    o, lse = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.0625,
                                kernel="triton", launch=SpanLaunch(block_t=16), **kw)
    torch.testing.assert_close(o.cpu(), ref_o.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_l.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_merge_reads_partials_by_chunks(static):
    """The merge reads CH split partials per load and merges each chunk in one log-sum-exp step: for every chunk
    size (1: one partial after the other; 2 and 4: chunks with a remainder over 5 span and 3 exact splits; the
    default) the same output and lse (1e-6), equal to the torch reference; empty splits (-inf) included."""
    from ap_vllm.kernels.lowrank_decode import merge_chunks

    pb, plan, kw, (ref_o, ref_l) = _merge_case(static)
    outs = [paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125, kernel="triton",
                               launch=SpanLaunch(block_t=16, merge_splits=ch), **kw) for ch in (1, 2, 4, None)]
    for o, lse in outs:
        torch.testing.assert_close(o.cpu(), outs[0][0].cpu(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse.cpu(), outs[0][1].cpu(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(o.cpu(), ref_o.cpu(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.cpu(), ref_l.cpu(), atol=1e-5, rtol=1e-5)
    # chunk sizes: at most the splits (a power of two) and MERGE_CHUNK_ELEMS partial elements a load
    assert merge_chunks(9, 33, 16, 128, 64) == (4, 8) and merge_chunks(9, 33, 8, 128, 64) == (8, 16)
    assert merge_chunks(2, 5, 8, 128, 64) == (2, 8)
    assert merge_chunks(9, 33, 8, 128, 64, merge_splits=4) == (4, 4)
    with pytest.raises(ValueError, match="merge_splits must be a power of two >= 1, got 3"):
        merge_chunks(9, 33, 8, 128, 64, merge_splits=3)


@pytest.mark.parametrize("static", [False, True])
def test_merge_programs_by_head_groups(static):
    """``SpanLaunch.merge_heads``: the merge's programs take part of a kv head's q heads (G = 4 here): 1, 2, 3 (a
    last program with one live head of three) and more than G (every head) give the default merge's output and
    lse (1e-6) and the torch reference's; with one partial a load too. 0 is refused by name."""
    pb, plan, kw, (ref_o, ref_l) = _merge_case(static)

    def call(**launch):
        return paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125,
                                  kernel="triton", launch=SpanLaunch(block_t=16, **launch), **kw)

    base = call()
    for launch in (dict(merge_heads=1), dict(merge_heads=2), dict(merge_heads=3), dict(merge_heads=16),
                   dict(merge_heads=1, merge_splits=1)):
        o, lse = call(**launch)
        torch.testing.assert_close(o.cpu(), base[0].cpu(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse.cpu(), base[1].cpu(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(o.cpu(), ref_o.cpu(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.cpu(), ref_l.cpu(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merge_heads must be >= 1 .*got 0"):
        call(merge_heads=0)


@pytest.mark.parametrize("static", [False, True])
def test_query_projection_in_the_exact_launch(static, monkeypatch):
    """Decode over post-RoPE spans: the exact kernel's last split of each (row, kv head) makes the query
    projection of the row's spans (QPROJ), and the call launches three kernels; the same output and lse as
    with the projection's own launch (1e-6): rows of two spans, of none, and a last split that also has exact
    tokens (one exact split). Pre-RoPE spans (scores in head space) project nothing."""
    import ap_vllm.kernels.lowrank_decode as ld

    names = []
    cls = type(ld._span_attn_kernel)
    orig = cls.run

    def run(self, *args, **kwargs):
        names.append((getattr(self, "fn", self).__name__, kwargs.get("QPROJ")))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=8,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24, device=DEV)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    ref = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125, kernel="torch")
    for exact_splits in (1, 3):
        kw = dict(num_span_splits=3, num_exact_splits=exact_splits, block_n=16)
        if static:
            kw.update(num_spans=torch.tensor([plan.meta.shape[0]], dtype=torch.int32, device=DEV), workspace={},
                      num_programs=4, max_seq_len=4096)
        outs = []
        for fold in (None, False):
            names.clear()
            outs.append(paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125,
                                           kernel="triton", launch=SpanLaunch(block_t=16, qproj_in_exact=fold), **kw))
            assert names == ([("_exact_decode_kernel", True), ("_span_attn_kernel", None), ("_merge_kernel", None)]
                             if fold is None else
                             [("_exact_decode_kernel", False), ("_span_qproj_kernel", None),
                              ("_span_attn_kernel", None), ("_merge_kernel", None)]), names
        for o, lse in outs:
            torch.testing.assert_close(o.cpu(), outs[1][0].cpu(), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(lse.cpu(), outs[1][1].cpu(), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(o.cpu(), ref[0].cpu(), atol=1e-5, rtol=1e-5)
    rope = RopeTable.from_base(64, max_positions=512, is_neox_style=True)
    pr = make_paged_batch([300, 420], [[(37, 200)], [(0, 150), (230, 190)]], num_q_heads=8, num_kv_heads=2,
                          head_size=64, key_rank=16, value_rank=24, rope=rope, device=DEV)
    names.clear()
    paged_mixed_decode(pr.q, pr.kv_cache, pr.block_table, pr.seq_lens, build_decode_plan(pr.spans, 2, device=DEV),
                       0.125, kernel="triton", rope=rope)
    assert [n for n, _ in names] == ["_exact_decode_kernel", "_span_attn_kernel", "_merge_kernel"]
    assert names[0][1] is False


def _token_major_view(pb):
    """The batch's cache as the backend sees vLLM's pages: token-major [blocks, page, Hkv, 2d] memory,
    viewed as [blocks, 2, page, Hkv, d] (strided); exact tokens copied by element, span blocks by byte."""
    nb, _, page, hkv, d = pb.kv_cache.shape
    pages = torch.full((nb, page, hkv, 2 * d), float("nan"), dtype=pb.kv_cache.dtype, device=pb.kv_cache.device)
    view = pages.view(nb, page, hkv, 2, d).permute(0, 3, 1, 2, 4)
    assert not view.is_contiguous() and block_contiguous(view)
    view.copy_(pb.kv_cache)
    for sp in pb.spans:
        ids = paged_span_block_ids(pb.block_table, sp)
        cache_bytes(view)[ids] = cache_bytes(pb.kv_cache)[ids]
    return pages, view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_major_strided_cache(dtype):
    """Reference and kernels read the strided view of token-major pages like the contiguous cache."""
    pb = make_paged_batch([300, 150, 260], [[(37, 200)], [], [(0, 200)]], num_q_heads=4, num_kv_heads=2,
                          head_size=64, key_rank=16, value_rank=24, importance_fraction=0.25, dtype=dtype, device=DEV)
    pages, view = _token_major_view(pb)
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    ref_cache = pb.kv_cache.clone()
    ref_view = pages.clone().view(view.shape[0], view.shape[2], view.shape[3], 2, -1).permute(0, 3, 1, 2, 4)
    o0, l0 = paged_mixed_decode(pb.q, ref_cache, pb.block_table, pb.seq_lens, plan, 0.125, importance_ema=0.25,
                                kernel="torch")
    o1, l1 = paged_mixed_decode(pb.q, ref_view, pb.block_table, pb.seq_lens, plan, 0.125, importance_ema=0.25,
                                kernel="torch")
    o2, l2 = paged_mixed_decode(pb.q, view, pb.block_table, pb.seq_lens, plan, 0.125, importance_ema=0.25,
                                kernel="triton")
    assert torch.equal(o1, o0) and torch.equal(l1, l0)
    tol = _tol(dtype)
    assert torch.allclose(o2.cpu(), o0.cpu(), atol=tol, rtol=tol)
    assert torch.allclose(l2.cpu(), l0.cpu(), atol=1e-4, rtol=1e-5)
    for a, b, c in zip(_importances(pb, ref_cache), _importances(pb, ref_view), _importances(pb, view)):
        assert torch.equal(a, b)
        assert torch.allclose(c.cpu(), a.cpu(), atol=1e-6, rtol=1e-4)
        assert not torch.equal(a, torch.zeros_like(a))  # updated in place


def test_cache_view_must_keep_blocks_dense():
    split = torch.zeros(2, 5, 16, 2, 64).transpose(0, 1)  # K and V of a block in two far-apart ranges
    assert not block_contiguous(split)
    with pytest.raises(ValueError, match="dense byte range"):
        cache_bytes(split)
    pb = make_paged_batch([40], [[]], num_q_heads=2, num_kv_heads=2, head_size=64, device=DEV)
    plan = build_decode_plan([], 1, device=DEV)
    bad = torch.zeros(2, *pb.kv_cache.shape[:1], *pb.kv_cache.shape[2:], device=DEV).transpose(0, 1)
    with pytest.raises(ValueError, match="dense byte range"):
        paged_mixed_decode(pb.q, bad, pb.block_table, pb.seq_lens, plan, 0.125, kernel="triton")


@settings(max_examples=6, deadline=None)
@given(data=st.data(), hkv=st.integers(1, 4), g=st.integers(1, 4), d=st.sampled_from([64, 128]),
       seed=st.integers(0, 100))
def test_property_random_batches(data, hkv, g, d, seed):
    nb = data.draw(st.integers(1, 3))
    lens, specs = [], []
    for _ in range(nb):
        L = data.draw(st.integers(20, 400))
        where = data.draw(st.sampled_from(["none", "start", "middle", "end"]))
        n = data.draw(st.integers(190, 260)) if L >= 260 else 0
        if where == "none" or n == 0:
            specs.append([])
        else:
            start = {"start": 0, "middle": (L - n) // 2, "end": L - n}[where]
            specs.append([(start, n)])
        lens.append(L)
    pb = make_paged_batch(lens, specs, num_q_heads=hkv * g, num_kv_heads=hkv, head_size=d, key_rank=16,
                          value_rank=16, importance_fraction=0.25, seed=seed, device=DEV)
    _check(pb, nb)


# pre-RoPE spans: dtype, coefficients, neox style, rotary_dim (None = d), two-level keys, softcap, Hq, Hkv, d,
# key column chunk (block_c; 128 over d=64 puts two kv heads in one chunk, 32 over d=80 straddles them)
ROPE_CASES = [
    (torch.float32, "model", True, None, False, None, 4, 1, 64, 32),
    (torch.float32, "fp8_e4m3", False, 32, True, None, 8, 2, 64, 128),
    (torch.bfloat16, "model", False, None, True, 30.0, 2, 2, 64, 32),
    (torch.bfloat16, "fp8_e4m3", True, 64, False, None, 4, 1, 128, 32),
    (torch.bfloat16, "model", True, 96, True, None, 4, 1, 128, 64),
    (torch.float16, "fp8_e4m3", False, 48, False, None, 4, 2, 80, 32),
]


@pytest.mark.parametrize("dtype,cdt,neox,rot,tlk,softcap,hq,hkv,d,bc", ROPE_CASES)
def test_pre_rope_decode_matches_reference(dtype, cdt, neox, rot, tlk, softcap, hq, hkv, d, bc):
    rope = RopeTable.from_base(d, rotary_dim=rot, max_positions=512, is_neox_style=neox)
    pb = make_paged_batch([170, 60, 200], [[(16, 128)], [], [(40, 150)]], num_q_heads=hq, num_kv_heads=hkv,
                          head_size=d, key_rank=8, value_rank=8, importance_fraction=0.25, dtype=dtype,
                          coefficient_dtype=cdt, two_level_keys=tlk, rope=rope, seed=1, device=DEV)
    lse_ref = torch.randn(3, hq, device=DEV) + 5.0
    _check(pb, 3, softcap=softcap, lse_ref=lse_ref, dtype=dtype, rope=rope, launch=SpanLaunch(block_c=bc))


def test_pre_rope_exact_normaliser_and_splits():
    """lse_ref=None (two passes), many small splits and tiles, a sequence made only of a span."""
    rope = RopeTable.from_base(64, max_positions=256, is_neox_style=False)
    pb = make_paged_batch([128, 190], [[(0, 128)], [(32, 150)]], num_q_heads=4, num_kv_heads=2, head_size=64,
                          key_rank=8, value_rank=8, importance_fraction=0.5, rope=rope, device=DEV)
    _check(pb, 2, rope=rope, num_span_splits=3, launch=SpanLaunch(block_t=16))


@pytest.mark.parametrize("neox", [True, False])
def test_pre_rope_full_rank_matches_dense(neox):
    """Pre-RoPE keys of exact rank R, compacted at rank R: reference and kernels equal dense attention
    over the rotated keys (what a backend caches); the same factors read as post-RoPE keys do not."""
    gen = torch.Generator().manual_seed(3)
    L, hq, hkv, d, R, page, start, T = 200, 4, 2, 64, 8, 16, 32, 160
    rope = RopeTable.from_base(d, rotary_dim=48, max_positions=256, is_neox_style=neox)
    pos = torch.arange(L)

    def rank_r():
        return (torch.randn(L, R, generator=gen) @ torch.randn(R, hkv * d, generator=gen) / R ** 0.5).view(L, hkv, d)

    k, v = rope.rotate(rank_r(), pos), rank_r()
    nblk = -(-L // page)
    cache = torch.randn(nblk + 3, 2, page, hkv, d, generator=gen)
    bt = torch.randperm(nblk + 3, generator=gen)[:nblk].to(torch.int32)[None]
    cache[bt[0, pos // page].long(), 0, pos % page] = k
    cache[bt[0, pos // page].long(), 1, pos % page] = v
    cs = compact_span(k[start: start + T], v[start: start + T], R, R, start=start, rope=rope)
    sp = PagedSpan(seq=0, start=start, layout=span_layout_for(cs, page))
    assert fits(sp.layout, start)
    pack_span(cache, paged_span_block_ids(bt, sp), cs, sp.layout)
    q = torch.randn(1, hq, d, generator=gen)
    od, ld = dense_attention(q, k, v, 0.125, torch.tensor([L - 1]), pos)
    seq_lens = torch.tensor([L], dtype=torch.int32)
    o, lse = paged_decode_reference(q, cache, bt, seq_lens, [sp], 0.125, rope=rope)
    assert torch.allclose(o, od, atol=1e-4) and torch.allclose(lse, ld[:, 0][None], atol=1e-4)
    plan = build_decode_plan([sp], 1, device=DEV)
    o2, l2 = paged_mixed_decode(q.to(DEV), cache.to(DEV), bt.to(DEV), seq_lens.to(DEV), plan, 0.125,
                                kernel="triton", rope=rope)
    assert torch.allclose(o2.cpu(), od, atol=1e-4) and torch.allclose(l2.cpu(), ld[:, 0][None], atol=1e-4)
    o3, _ = paged_decode_reference(q, cache, bt, seq_lens, [sp], 0.125)  # table left out: wrong keys
    assert (o3 - od).abs().max() > 1e-2
    # and the rotated keys themselves are not of rank R: a post-RoPE compaction at rank R is lossy
    kr, _ = compact_span(k[start: start + T], v[start: start + T], R, R, start=start).reconstruct()
    assert (kr - k[start: start + T]).norm() > 0.1 * k[start: start + T].norm()


def test_pre_rope_rejects_mismatched_table():
    rope = RopeTable.from_base(64, max_positions=256)
    pb = make_paged_batch([170], [[(16, 128)]], num_q_heads=2, num_kv_heads=1, head_size=64, key_rank=8,
                          value_rank=8, rope=rope, device=DEV)
    plan = build_decode_plan(pb.spans, 1, device=DEV)
    args = (pb.q, pb.kv_cache, pb.block_table, pb.seq_lens, plan, 0.125)
    with pytest.raises(ValueError, match="position 143, beyond the rotary table"):
        paged_mixed_decode(*args, kernel="triton", rope=RopeTable.from_base(64, max_positions=100))
    with pytest.raises(ValueError, match="head_size"):
        paged_mixed_decode(*args, kernel="triton", rope=RopeTable.from_base(32))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cdt", ["model", "fp8_e4m3"])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_gpu_full_shape(cdt, key_space):
    """Qwen2.5-VL-7B-like: 28 q heads, 4 kv heads, d=128, R=64, 4K-token spans, page 16."""
    rope = RopeTable.from_base(128, 1e6, max_positions=8192).to(DEV) if key_space == "pre_rope" else None
    pb = make_paged_batch([4400, 6000], [[(100, 4096)], [(1000, 4096)]], num_q_heads=28, num_kv_heads=4,
                          head_size=128, key_rank=64, value_rank=64, importance_fraction=0.25,
                          dtype=torch.bfloat16, coefficient_dtype=cdt, device=DEV, rope=rope)
    _check(pb, 2, dtype=torch.bfloat16, lse_ref=torch.full((2, 28), 8.0, device=DEV), rope=rope)


def test_thresholds_as_device_tensors_read_like_floats():
    """Two-level thresholds computed on the device (no host read) give the float thresholds' result."""
    from ap_vllm.core.lowrank_attention import importance_thresholds

    pb = make_paged_batch([300, 220], [[(20, 200)], [(16, 150)]], num_q_heads=4, num_kv_heads=2, head_size=64,
                          key_rank=16, value_rank=16, importance_fraction=0.25, device=DEV, seed=3)
    thr = importance_thresholds(_importances(pb, pb.kv_cache), 0.25)
    assert [float(t) for t in thr] == [sp.threshold for sp in pb.spans]
    as_floats = build_decode_plan(pb.spans, 2, device=DEV)
    for sp, t in zip(pb.spans, thr):
        sp.threshold = t
    as_tensors = build_decode_plan(pb.spans, 2, device=DEV)
    assert torch.equal(as_tensors.thresholds.cpu(), as_floats.thresholds.cpu())
    assert torch.equal(as_tensors.meta.cpu(), as_floats.meta.cpu())
    for kernel in ("torch", "triton"):
        outs = [paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens, plan, 0.125,
                                   importance_ema=0.25, kernel=kernel)[0] for plan in (as_floats, as_tensors)]
        assert torch.equal(outs[0].cpu(), outs[1].cpu())
    # and the two-level read really applies: all-full-rank differs
    for sp in pb.spans:
        sp.threshold = None
    full = paged_mixed_decode(pb.q, pb.kv_cache.clone(), pb.block_table, pb.seq_lens,
                              build_decode_plan(pb.spans, 2, device=DEV), 0.125, kernel="torch")[0]
    assert not torch.allclose(full.cpu(), outs[1].cpu(), atol=1e-4)


@pytest.mark.parametrize("dtype,block_size", [(torch.float32, 16), (torch.bfloat16, 32)])
def test_importance_index_reads_every_spans_importance_at_once(dtype, block_size):
    """The batched importance read (one gather for all spans, any layer with these layouts) gives
    each span's importance section, padded with -inf, and the same thresholds as span by span."""
    from ap_vllm.core.lowrank_attention import (importance_thresholds, threshold_ranks, threshold_sample,
                                                thresholds_from_padded)
    from ap_vllm.core.paged_layout import importance_index, read_importances

    pb = make_paged_batch([300, 150, 700], [[(37, 200)], [], [(0, 160), (230, 410)]], num_q_heads=4,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24, importance_fraction=0.25,
                          dtype=dtype, page=block_size, device=DEV, seed=5)
    index, valid, counts = importance_index(pb.spans, pb.block_table)
    got = read_importances(pb.kv_cache, index, valid)
    want = _importances(pb, pb.kv_cache)
    assert got.shape == (3, 410) and counts == [200, 160, 410]
    for row, imp in zip(got, want):
        n = imp.numel()
        assert torch.equal(row[:n].cpu(), imp.cpu()) and bool((row[n:] == float("-inf")).all())
    assert len({float(x.std()) for x in want}) == 3  # distinct random importances, not one span read thrice
    ranks = torch.tensor(threshold_ranks(counts, 0.25), device=DEV)
    assert torch.equal(thresholds_from_padded(got, ranks).cpu(), importance_thresholds(want, 0.25).cpu())

    # sampled thresholds (spans longer than the sample): the same tokens on both paths
    index, valid, counts = importance_index(pb.spans, pb.block_table, sample=180)
    got = read_importances(pb.kv_cache, index, valid)
    assert counts == [180, 160, 180] and got.shape == (3, 180)
    for row, imp, n in zip(got, want, counts):
        pos = threshold_sample(imp.numel(), 180)
        expect = imp if pos is None else imp[pos.to(imp.device)]
        assert torch.equal(row[:n].cpu(), expect.cpu())
    ranks = torch.tensor(threshold_ranks(counts, 0.25), device=DEV)
    assert torch.equal(thresholds_from_padded(got, ranks).cpu(), importance_thresholds(want, 0.25, 180).cpu())


def test_fp8_coefficients_decoded_in_kernel_match_native(monkeypatch):
    """GPUs without native e4m3 (sm_80): the span kernel reads FP8 coefficients as bytes and decodes them
    itself (_e4m3_to_f32); the result equals the reference (and so the native conversion)."""
    import ap_vllm.kernels.lowrank_decode as ld

    monkeypatch.setattr(ld, "fp8_native", lambda: False)
    pb = make_paged_batch([300, 150], [[(37, 200)], [(16, 128)]], num_q_heads=4, num_kv_heads=2, head_size=64,
                          key_rank=16, value_rank=24, importance_fraction=0.25, dtype=torch.bfloat16,
                          coefficient_dtype="fp8_e4m3", two_level_keys=True, device=DEV, seed=9)
    _check(pb, 2, dtype=torch.bfloat16, lse_ref=torch.full((2, 4), 6.0, device=DEV))
    codes = torch.arange(256, dtype=torch.uint8)  # every e4m3 code but the two NaNs: the decoder's formula
    ok = (codes & 0x7F) != 0x7F
    want = codes[ok].view(torch.float8_e4m3fn).float()
    b = codes[ok].int()
    e, m = (b >> 3) & 15, (b & 7).float()
    v = torch.where(e == 0, m * 2.0 ** -9, (8 + m) * torch.exp2((e - 10).float()))
    assert torch.equal(torch.where(b & 128 != 0, -v, v), want)
