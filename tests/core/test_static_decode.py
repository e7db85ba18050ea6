"""The static (CUDA-graph) decode launch: equal to the dynamic one, blind to padding, and launch-invariant.

A captured CUDA graph replays the kernels with the grids and scalar arguments of the capture, reading
whatever its tensors hold at replay. So a static call must launch exactly the same kernels with the same
grids, scalars and tensors (shape, dtype, storage) for any batch content of the same tensors, and give the
dynamic call's result for that content. Runs on the Triton interpreter without a GPU."""

import math
import os
import sys

import torch

if not torch.cuda.is_available():  # must precede any import of triton / ap_vllm.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ap_vllm.core.lowrank_attention import importance_thresholds, threshold_sample  # noqa: E402
from ap_vllm.core.paged_decode import DecodePlan, build_decode_plan, paged_mixed_decode  # noqa: E402
from ap_vllm.core.paged_layout import (META, META_FIELDS, cache_bytes, paged_span_block_ids,  # noqa: E402
                                       read_importance)
from ap_vllm.kernels.lowrank_decode import SpanLaunch  # noqa: E402
from ap_vllm.core.rope import RopeTable  # noqa: E402
from ap_vllm.core.synthetic import make_paged_batch  # noqa: E402
from ap_vllm.kernels import lowrank_decode as ld  # noqa: E402
from ap_vllm.kernels.thresholds import span_thresholds_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 0.125
HUGE = 2 ** 40  # token count of a padding row: any read of it would run (and index) far out of range


class StaticBatch:
    """The persistent tensors of one padded batch size (what a captured graph holds): ``load`` writes a
    batch's content into them in place; rows past the batch are padding (seq_len 0, zero block-table
    row), metadata rows past its spans are poison (huge token count, NaN thresholds), and cache blocks
    no sequence owns are NaN."""

    def __init__(self, rows, span_cap, span_width, num_blocks, max_blocks, hq, hkv, d, page, dtype):
        z = dict(device=DEV)
        self.q = torch.zeros(rows, hq, d, dtype=dtype, **z)
        self.cache = torch.zeros(num_blocks, 2, page, hkv, d, dtype=dtype, **z)
        self.block_table = torch.zeros(rows, max_blocks, dtype=torch.int32, **z)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, **z)
        self.meta = torch.zeros(span_cap, len(META_FIELDS), dtype=torch.int64, **z)
        self.thresholds = torch.zeros(span_cap, dtype=torch.float32, **z)
        self.seq_spans = torch.full((rows, span_width), -1, dtype=torch.int32, **z)
        self.num_spans = torch.zeros(1, dtype=torch.int32, **z)
        self.lse_ref = torch.zeros(rows, hq, dtype=torch.float32, **z)
        self.out = torch.zeros(rows, hq, d, dtype=torch.float32, **z)
        self.lse = torch.zeros(rows, hq, dtype=torch.float32, **z)
        self.workspace: dict = {}

    def load(self, pb, lse_ref=None):
        b, nb = pb.q.shape[0], pb.kv_cache.shape[0]
        plan = build_decode_plan(pb.spans, b, device=DEV)
        s = len(pb.spans)
        self.q.zero_()[:b] = pb.q
        self.cache.fill_(float("nan"))
        self.cache[:nb] = pb.kv_cache
        self.block_table.zero_()[:b, : pb.block_table.shape[1]] = pb.block_table
        self.seq_lens.zero_()[:b] = pb.seq_lens
        if s:  # padding rows: the first span's row with a huge token count
            self.meta.copy_(plan.meta[:1].expand_as(self.meta))
        self.meta[s:, META["num_tokens"]] = HUGE
        self.meta[:s] = plan.meta
        self.thresholds.fill_(float("nan"))[:s] = plan.thresholds
        self.seq_spans.fill_(-1)[:b, : plan.seq_spans.shape[1]] = plan.seq_spans
        self.num_spans.fill_(s)
        self.lse_ref.fill_(float("nan"))
        if lse_ref is not None:
            self.lse_ref[:b] = lse_ref
        return plan

    def plan(self, max_span_tokens, key_rank, value_rank, fp8):
        return DecodePlan(spans=[], meta=self.meta, thresholds=self.thresholds, seq_spans=self.seq_spans,
                          max_span_tokens=max_span_tokens, key_rank_max=key_rank, value_rank_max=value_rank, fp8=fp8)


def _importance(cache, pb):
    return [read_importance(cache, paged_span_block_ids(pb.block_table, sp), sp.layout) for sp in pb.spans]


def _close(a, b, tol):
    assert torch.allclose(a.cpu(), b.cpu(), atol=tol, rtol=tol), (a.cpu() - b.cpu()).abs().max()


def _dynamic(pb, cache, lse_ref, ema, rope, softcap):
    plan = build_decode_plan(pb.spans, pb.q.shape[0], device=DEV)
    return paged_mixed_decode(pb.q, cache, pb.block_table, pb.seq_lens, plan, SCALE, softcap=softcap, lse_ref=lse_ref,
                              importance_ema=ema, kernel="triton", rope=rope)


def _assert_static_equals_dynamic(sb, pb, got, ref_cache, ref, tol):
    b = pb.q.shape[0]
    o, lse = got
    _close(o[:b], ref[0], tol)
    _close(lse[:b], ref[1], 1e-4)
    assert torch.equal(o[b:].cpu(), torch.zeros_like(o[b:]).cpu())  # padding rows: out 0, lse -inf
    assert bool((lse[b:] == float("-inf")).all())
    for x, y in zip(_importance(sb.cache, pb), _importance(ref_cache, pb)):
        assert torch.allclose(x.cpu(), y.cpu(), atol=1e-6, rtol=1e-6, equal_nan=True)  # (NaN: never written)
    # nothing else of the cache was written (the poisoned blocks stay NaN, exact pages stay as they were)
    nb = ref_cache.shape[0]
    assert bool(sb.cache[nb:].isnan().all())
    imp_blocks = torch.cat([paged_span_block_ids(pb.block_table, sp)[sp.layout.sections["importance"].block:]
                            for sp in pb.spans]) if pb.spans else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(nb, dtype=torch.bool)
    keep[imp_blocks.cpu()] = False
    assert torch.equal(sb.cache[:nb][keep.to(DEV)].cpu().view(torch.uint8),
                       ref_cache[keep.to(DEV)].cpu().view(torch.uint8))


# dtype, coefficients, two-level (importance fraction), two-level keys, pre-RoPE, softcap, lse_ref mode
CASES = [
    (torch.float32, "model", 0.25, False, False, None, "given"),
    (torch.bfloat16, "fp8_e4m3", 0.25, True, False, 30.0, "given"),
    (torch.float32, "model", None, False, True, None, "given"),
    (torch.float16, "fp8_e4m3", 0.25, False, True, None, "this step"),
    (torch.bfloat16, "model", 0.25, False, False, None, "no update"),
]


@pytest.mark.parametrize("dtype,cdt,frac,tlk,pre_rope,softcap,mode", CASES)
def test_static_equals_dynamic_on_a_padded_batch(dtype, cdt, frac, tlk, pre_rope, softcap, mode):
    """Rows with 0, 1 and 2 spans plus two padding rows, span capacity 5 > 3 spans (poisoned rows),
    caps far above the batch: outputs, lse and importance writes of the dynamic launch."""
    hq, hkv, d = 4, 2, 64
    rope = RopeTable.from_base(d, max_positions=512, is_neox_style=False) if pre_rope else None
    pb = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], num_q_heads=hq,
                          num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=24, importance_fraction=frac,
                          dtype=dtype, coefficient_dtype=cdt, two_level_keys=tlk, rope=rope, seed=2, device=DEV)
    sb = StaticBatch(5, 5, 3, pb.kv_cache.shape[0] + 4, pb.block_table.shape[1] + 2, hq, hkv, d, 16, dtype)
    lse_ref = torch.randn(3, hq, device=DEV) + 5.0 if mode == "given" else None
    sb.load(pb, lse_ref)
    ema = None if mode == "no update" else 0.25
    ref_cache = pb.kv_cache.clone()
    ref = _dynamic(pb, ref_cache, lse_ref, ema, rope, softcap)
    got = paged_mixed_decode(sb.q, sb.cache, sb.block_table, sb.seq_lens,
                             sb.plan(4096, 16, 24, cdt != "model"), SCALE, softcap=softcap,
                             lse_ref=sb.lse_ref if mode == "given" else None, importance_ema=ema, kernel="triton",
                             rope=rope, num_spans=sb.num_spans, max_seq_len=2048, out=sb.out, lse_out=sb.lse,
                             workspace=sb.workspace)
    assert got[0] is sb.out and got[1] is sb.lse
    _assert_static_equals_dynamic(sb, pb, got, ref_cache, ref, 1e-5 if dtype == torch.float32 else 3e-3)


def test_static_splits_follow_each_spans_length():
    """Tokens per split come from each span's own T: a short span under a long cap still uses all its
    splits (every partial of the 160-token span is non-empty), the exact tokens of each row likewise;
    results equal the dynamic launch for any split count and program count."""
    pb = make_paged_batch([180, 400], [[(16, 160)], [(100, 290)]], num_q_heads=4, num_kv_heads=2, head_size=64,
                          key_rank=16, value_rank=16, importance_fraction=0.25, seed=4, device=DEV)
    sb = StaticBatch(3, 3, 1, pb.kv_cache.shape[0], pb.block_table.shape[1], 4, 2, 64, 16, torch.float32)
    sb.load(pb, torch.full((2, 4), 6.0, device=DEV))
    ref_cache = pb.kv_cache.clone()
    ref = _dynamic(pb, ref_cache, torch.full((2, 4), 6.0, device=DEV), 0.25, None, None)
    calls = []
    real = ld.span_partials

    def spy(*a, **k):
        calls.append(real(*a, **k))
        return calls[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ld, "span_partials", spy)
        for splits, programs in ((5, 1), (3, 7)):
            sb.load(pb, torch.full((2, 4), 6.0, device=DEV))
            got = paged_mixed_decode(sb.q, sb.cache, sb.block_table, sb.seq_lens, sb.plan(32768, 16, 16, False),
                                     SCALE, lse_ref=sb.lse_ref, importance_ema=0.25, kernel="triton",
                                     num_spans=sb.num_spans, max_seq_len=32768, num_span_splits=splits,
                                     num_exact_splits=4, num_programs=programs, launch=SpanLaunch(block_t=16), block_n=16,
                                     workspace=sb.workspace)
            _assert_static_equals_dynamic(sb, pb, got, ref_cache, ref, 1e-5)
    part_a, part_alse, ss = calls[0]
    assert ss == 5 and part_alse.shape[:2] == (3, 5)
    assert bool(torch.isfinite(part_alse[:2]).any(-1).all())  # each split of both spans saw tokens


def test_dynamic_launch_takes_padding_rows():
    """The dynamic launch also gives a row of seq_len 0 out 0 and lse -inf (its merge reads no exact split)."""
    pb = make_paged_batch([120, 200], [[], [(16, 150)]], num_q_heads=4, num_kv_heads=2, head_size=64, key_rank=16,
                          value_rank=16, device=DEV)
    q = torch.cat([pb.q, torch.randn(1, 4, 64, device=DEV)])
    bt = torch.cat([pb.block_table, torch.zeros_like(pb.block_table[:1])])
    seq_lens = torch.cat([pb.seq_lens, torch.zeros_like(pb.seq_lens[:1])])
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    o, lse = paged_mixed_decode(q, pb.kv_cache.clone(), bt, seq_lens, plan, SCALE, kernel="triton", max_seq_len=200)
    ref = paged_mixed_decode(q, pb.kv_cache.clone(), bt, seq_lens, plan, SCALE, kernel="torch")
    _close(o, ref[0], 1e-5)
    assert torch.equal(o[2].cpu(), torch.zeros(4, 64)) and bool((lse[2] == float("-inf")).all())


# --------------------------------------------------------------------------------------
# two-level thresholds on the device
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,page", [(torch.float32, 16), (torch.bfloat16, 32)])
def test_threshold_kernel_equals_importance_thresholds(dtype, page):
    """Every span's threshold bit for bit (all tokens, samples held in registers, and spans read tile by
    tile), ties (an all-zero span), fractions at the edges; -inf for padding rows."""
    pb = make_paged_batch([300, 150, 700], [[(37, 200)], [], [(0, 160), (230, 410)]], num_q_heads=4,
                          num_kv_heads=2, head_size=64, key_rank=16, value_rank=24, importance_fraction=0.25,
                          dtype=dtype, page=page, device=DEV, seed=5)
    sp0 = pb.spans[1]  # ties: an all-zero importance (as right after prefill)
    flat = cache_bytes(pb.kv_cache).view(-1).view(torch.float32)
    sec = sp0.layout.sections["importance"]
    blk = int(pb.block_table[sp0.seq, sp0.storage_block + sec.block])
    flat[blk * (sp0.layout.block_bytes // 4): blk * (sp0.layout.block_bytes // 4) + sp0.layout.num_tokens] = 0.0
    plan = build_decode_plan(pb.spans, 3, device=DEV)
    meta = torch.cat([plan.meta, plan.meta[:2]])
    meta[3:, META["num_tokens"]] = HUGE
    num_spans = torch.tensor([3], dtype=torch.int32, device=DEV)
    imps = _importance(pb.kv_cache, pb)
    assert float(imps[1].abs().max()) == 0.0
    for frac in (0.01, 0.25, 0.3, 1.0):
        for sample, block in ((0, 1024), (0, 64), (180, 1024), (7, 1024)):
            got = span_thresholds_triton(pb.kv_cache, pb.block_table, meta, num_spans, frac, sample, block=block,
                                         num_programs=2)
            want = importance_thresholds(imps, frac, sample)
            assert torch.equal(got[:3].cpu(), want.cpu()), (frac, sample, got, want)
            assert bool((got[3:] == float("-inf")).all())


def test_threshold_kernel_reads_the_sampled_positions():
    """Importance = token position: each sampled threshold is the position of the k-th largest sampled
    token, so the kernel's positions are the closed-form sample (threshold_sample) itself."""
    pb = make_paged_batch([700], [[(230, 410)]], num_q_heads=2, num_kv_heads=2, head_size=64, key_rank=16,
                          value_rank=16, importance_fraction=0.25, device=DEV)
    sp = pb.spans[0]
    flat = cache_bytes(pb.kv_cache).view(-1).view(torch.float32)
    rpb = sp.layout.block_bytes // 4
    sec = sp.layout.sections["importance"]
    for t in range(0, sp.layout.num_tokens, rpb):
        blk = int(pb.block_table[0, sp.storage_block + sec.block + t // rpb])
        n = min(rpb, sp.layout.num_tokens - t)
        flat[blk * rpb: blk * rpb + n] = torch.arange(t, t + n, dtype=torch.float32)
    plan = build_decode_plan(pb.spans, 1, device=DEV)
    pos = threshold_sample(sp.layout.num_tokens, 64)
    assert pos is not None and pos.numel() == 64
    for frac in (1 / 64, 0.25, 0.5, 1.0):
        got = span_thresholds_triton(pb.kv_cache, pb.block_table, plan.meta,
                                     torch.tensor([1], dtype=torch.int32, device=DEV), frac, 64)
        k = min(64, max(1, math.ceil(frac * 64)))
        assert float(got[0]) == float(pos.sort(descending=True).values[k - 1])


# --------------------------------------------------------------------------------------
# launch invariance (what makes the replay of a captured CUDA graph correct)
# --------------------------------------------------------------------------------------
def _describe(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, tuple(x.stride()), x.data_ptr())
    if isinstance(x, (bool, int, float, str, type(None))):
        return x
    return repr(x)


@pytest.fixture
def no_host_reads(monkeypatch):
    """While on, a tensor read on the host (item, tolist, cpu, numpy, bool/int/float/index conversion) from
    this project's code raises: on a GPU each would wait for the device, and none may run inside a graph."""
    ours = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), d) + os.sep
                 for d in ("ap_vllm", "kernels"))
    state = {"on": False}

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if state["on"] and caller.startswith(ours):
                raise AssertionError(f"Tensor.{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    return state


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch: (kernel, grid, every positional argument, every keyword argument), tensors by
    shape, dtype, strides and storage address."""
    log = []
    cls = type(ld._span_attn_kernel)
    orig = cls.run

    def run(self, *args, grid, warmup, **kwargs):
        assert not callable(grid)
        log.append((getattr(self, "fn", self).__name__, tuple(grid), tuple(_describe(a) for a in args),
                    tuple(sorted((k, _describe(v)) for k, v in kwargs.items()))))
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return log


def test_static_step_launches_do_not_depend_on_the_batch(launches, no_host_reads):
    """A decode step (thresholds on the device, then the decode launch with the importance update) on batch
    A, then on batch B written into the same tensors (other rows, lengths, span counts and thresholds):
    the same launches, argument for argument, and no host read of a tensor; B's results equal the dynamic
    launch on B. The dynamic launches of A and B differ (their grids follow the data)."""
    hq, hkv, d, page = 4, 2, 64, 16
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=16, importance_fraction=0.25,
              device=DEV)
    batch_a = make_paged_batch([300, 150, 420], [[(37, 200)], [], [(0, 150), (230, 190)]], seed=1, **kw)
    batch_b = make_paged_batch([390, 77, 260, 200], [[(16, 160), (200, 180)], [], [(20, 230)], [(0, 190)]], seed=2,
                               **kw)
    nb = max(batch_a.kv_cache.shape[0], batch_b.kv_cache.shape[0]) + 2
    mb = max(batch_a.block_table.shape[1], batch_b.block_table.shape[1])
    sb = StaticBatch(6, 5, 2, nb, mb, hq, hkv, d, page, torch.float32)
    plan = sb.plan(8192, 16, 16, False)

    def step():
        span_thresholds_triton(sb.cache, sb.block_table, sb.meta, sb.num_spans, 0.25, 0, out=sb.thresholds)
        paged_mixed_decode(sb.q, sb.cache, sb.block_table, sb.seq_lens, plan, SCALE, lse_ref=sb.lse_ref,
                           importance_ema=0.25, kernel="triton", num_spans=sb.num_spans, max_seq_len=4096,
                           out=sb.out, lse_out=sb.lse, workspace=sb.workspace)

    records = []
    for pb in (batch_a, batch_b):
        lse_ref = torch.randn(pb.q.shape[0], hq, device=DEV) + 5.0
        sb.load(pb, lse_ref)
        sb.thresholds.fill_(float("nan"))
        ref_cache = sb.cache[: pb.kv_cache.shape[0]].clone()
        ref = _dynamic(pb, ref_cache, lse_ref, 0.25, None, None)
        records.append(("dynamic", list(launches)))
        launches.clear()
        no_host_reads["on"] = True
        step()
        no_host_reads["on"] = False
        records.append(("static", list(launches)))
        launches.clear()
        s = len(pb.spans)
        assert torch.equal(sb.thresholds[:s].cpu(), torch.tensor([sp.threshold for sp in pb.spans]))
        assert bool((sb.thresholds[s:] == float("-inf")).all())
        _assert_static_equals_dynamic(sb, pb, (sb.out, sb.lse), ref_cache, ref, 1e-5)
    (_, dyn_a), (_, stat_a), (_, dyn_b), (_, stat_b) = records
    assert [r[0] for r in stat_a] == ["_span_thresholds_kernel", "_exact_decode_kernel", "_span_attn_kernel",
                                      "_merge_kernel"]  # (the exact kernel makes the query projection)
    for ra, rb in zip(stat_a, stat_b):
        assert ra == rb, (ra[0], [(i, x, y) for i, (x, y) in enumerate(zip(ra[2], rb[2])) if x != y])
    assert stat_a == stat_b
    assert dyn_a != dyn_b and [r[1] for r in dyn_a] != [r[1] for r in dyn_b]


# dtype, coefficients, pre-RoPE, softcap
SCORE_CASES = [
    (torch.float32, "model", False, None),
    (torch.bfloat16, "fp8_e4m3", False, 30.0),
    (torch.float32, "model", True, None),
]


@pytest.mark.parametrize("dtype,cdt,pre_rope,softcap", SCORE_CASES)
def test_static_score_selection_equals_dynamic_and_is_launch_invariant(dtype, cdt, pre_rope, softcap, launches,
                                                                       no_host_reads):
    """Score selection (value_selection: score) in the static launch: batches A and B written into the same
    tensors launch the same kernels argument for argument (no thresholds kernel, no importance update), read
    nothing on the host, and give the dynamic launch's outputs and lse; nothing of the cache is written (the
    importance sections hold NaN, never read). A row without a previous lse (+inf) reads full rank."""
    hq, hkv, d, page, tau = 4, 2, 32 if pre_rope else 64, 16, 1 / 256  # (pre-RoPE: the interpreter is slow)
    rope = RopeTable.from_base(d, max_positions=512, is_neox_style=False) if pre_rope else None
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_size=d, key_rank=16, value_rank=32, importance_fraction=0.25,
              dtype=dtype, coefficient_dtype=cdt, rope=rope, device=DEV)
    batches = [make_paged_batch([260, 90], [[(37, 200)], []], seed=1, **kw),
               make_paged_batch([200, 60, 250], [[(16, 160)], [], [(20, 220)]], seed=2, **kw)]
    for pb in batches:  # importance never read nor written by score selection
        for sp in pb.spans:
            ids = paged_span_block_ids(pb.block_table, sp)
            cache_bytes(pb.kv_cache)[ids[sp.layout.sections["importance"].block:]] = 255  # NaN float32 bytes
    nb = max(pb.kv_cache.shape[0] for pb in batches) + 2
    mb = max(pb.block_table.shape[1] for pb in batches)
    sb = StaticBatch(4, 3, 1, nb, mb, hq, hkv, d, page, dtype)
    plan = sb.plan(8192, 16, 32, cdt != "model")
    stat = []
    for pb in batches:
        b = pb.q.shape[0]
        lse_ref = torch.randn(b, hq, device=DEV) + 7.0
        lse_ref[0] = float("inf")
        sb.load(pb, lse_ref)
        ref_cache = sb.cache[: pb.kv_cache.shape[0]].clone()
        dplan = build_decode_plan(pb.spans, b, device=DEV)
        ref = paged_mixed_decode(pb.q, ref_cache, pb.block_table, pb.seq_lens, dplan, SCALE, softcap=softcap,
                                 lse_ref=lse_ref, kernel="triton", rope=rope, score_threshold=tau)
        launches.clear()
        no_host_reads["on"] = True
        got = paged_mixed_decode(sb.q, sb.cache, sb.block_table, sb.seq_lens, plan, SCALE, softcap=softcap,
                                 lse_ref=sb.lse_ref, kernel="triton", rope=rope, num_spans=sb.num_spans,
                                 max_seq_len=1024, out=sb.out, lse_out=sb.lse, workspace=sb.workspace,
                                 score_threshold=tau)
        no_host_reads["on"] = False
        stat.append(list(launches))
        _assert_static_equals_dynamic(sb, pb, got, ref_cache, ref, 1e-6)
    names = [r[0] for r in stat[0]]
    assert "_span_thresholds_kernel" not in names and "_span_attn_kernel" in names
    assert stat[0] == stat[1]
