"""Varlen paged exact attention kernel against dense attention (CPU: Triton interpreter on small shapes)."""

import ast
import inspect
import math
import os

import torch

if not torch.cuda.is_available():  # must precede any import of triton / ap_vllm.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import ap_vllm.kernels.exact_attention as exact_mod  # noqa: E402
from ap_vllm.core.dense import dense_attention  # noqa: E402
from ap_vllm.core.paged_layout import META, META_FIELDS  # noqa: E402
from ap_vllm.kernels.exact_attention import exact_attention_config, paged_exact_attention_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(seqs, hq, hkv, d, dtype=torch.float32, page=16, seed=0, token_major=False, spans=None):
    """Random paged cache for ``seqs`` = [(seq_len, qlen)]; ``spans[b]`` = [(start, T)] per sequence.

    Blocks are scattered by a random permutation; every token inside a span holds NaN (K) and a huge
    value (V), as a compacted span's pages hold packed data rather than keys.
    """
    gen = torch.Generator().manual_seed(seed)
    nblocks = [-(-L // page) for L, _ in seqs]
    total = sum(nblocks) + 2
    if token_major:  # vLLM's token-major pages: memory [nb, bs, Hkv, 2, d], viewed as [nb, 2, bs, Hkv, d]
        kv = torch.randn(total, page, hkv, 2, d, generator=gen).to(dtype).permute(0, 3, 1, 2, 4)
    else:
        kv = torch.randn(total, 2, page, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(total, generator=gen)
    bt = torch.zeros(len(seqs), max(nblocks) + 1, dtype=torch.int32)
    nxt = 0
    for b, nb in enumerate(nblocks):
        bt[b, :nb] = perm[nxt: nxt + nb].to(torch.int32)
        nxt += nb
    spans = spans or [[] for _ in seqs]
    rows, seq_spans = [], []
    for b, sp in enumerate(spans):
        ids = []
        for start, T in sp:
            ids.append(len(rows))
            row = [0] * len(META_FIELDS)
            row[META["seq"]], row[META["start"]], row[META["num_tokens"]] = b, start, T
            rows.append(row)
            for n in range(start, start + T):
                kv[bt[b, n // page].long(), 0, n % page] = float("nan")
                kv[bt[b, n // page].long(), 1, n % page] = 3e4 if dtype == torch.float16 else 1e30
        seq_spans.append(ids)
    qlens = [ql for _, ql in seqs]
    q = torch.randn(sum(qlens), hq, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    lens = torch.tensor([L for L, _ in seqs], dtype=torch.int32)
    max_spans = max(len(s) for s in seq_spans)
    if max_spans:
        sp_t = torch.full((len(seqs), max_spans + 1), -1, dtype=torch.int32)  # one -1 padding column
        for b, ids in enumerate(seq_spans):
            sp_t[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        meta = torch.tensor(rows, dtype=torch.int64)
    else:
        sp_t = meta = None
    return dict(q=q, kv=kv, bt=bt, qsl=qsl, lens=lens, seqs=seqs, spans=spans, page=page, seq_spans=sp_t, meta=meta)


def _reference(pb, scale, softcap=None, window=None, reach=None):
    """dense_attention per sequence over the keys outside its spans: out [Nq, Hq, d], lse [Nq, Hq]."""
    q, kv, bt, page = pb["q"], pb["kv"], pb["bt"], pb["page"]
    outs, lses = [], []
    for b, (L, ql) in enumerate(pb["seqs"]):
        excluded = torch.zeros(L, dtype=torch.bool)
        for start, T in pb["spans"][b]:
            excluded[start: start + T] = True
        n = torch.arange(L)[~excluded]
        k = kv[bt[b, n // page].long(), 0, n % page]
        v = kv[bt[b, n // page].long(), 1, n % page]
        qs = q[int(pb["qsl"][b]): int(pb["qsl"][b]) + ql]
        a = int(pb["qsl"][b])
        o, lse = dense_attention(qs, k, v, scale, torch.arange(L - ql, L), n, window=window, softcap=softcap,
                                 reach=None if reach is None else reach[a: a + ql].long())
        outs.append(o)
        lses.append(lse.t())
    return torch.cat(outs), torch.cat(lses)


def _run(pb, scale, **kw):
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    qlens = [ql for _, ql in pb["seqs"]]
    o, lse = paged_exact_attention_triton(
        dev(pb["q"]), dev(pb["kv"]), dev(pb["bt"]), dev(pb["qsl"]), dev(pb["lens"]), scale,
        max_query_len=max(qlens), max_seq_len=max(L for L, _ in pb["seqs"]), seq_spans=dev(pb["seq_spans"]),
        meta=dev(pb["meta"]), **kw)
    return o.cpu().float(), lse.cpu()


def _tol(dtype):
    # bf16/fp16: the probabilities enter the P @ V product in the cache dtype (8 / 11 significant bits)
    return {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]


def _check(pb, scale=0.125, tol=1e-5, softcap=None, window=None, **kw):
    o, lse = _run(pb, scale, softcap=softcap, window=window, **kw)
    o_ref, lse_ref = _reference(pb, scale, softcap=softcap, window=window)
    assert torch.isfinite(o).all()
    assert torch.allclose(o, o_ref, atol=tol, rtol=tol), (o - o_ref).abs().max()
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    fin = torch.isfinite(lse_ref)
    assert torch.allclose(lse[fin], lse_ref[fin], atol=max(tol, 1e-5), rtol=1e-5), (lse - lse_ref)[fin].abs().max()
    return o, lse


# prefill (45 of 45), chunked prefill (20 queries after 50 tokens), decode, 3 speculative, qlen 0
MIXED = [(40, 0), (37, 1), (53, 3), (45, 45), (70, 20)]


@pytest.mark.parametrize("dtype,hq,hkv,d", [
    (torch.float32, 8, 2, 64),
    (torch.bfloat16, 8, 2, 128),
    (torch.float16, 4, 4, 64),
    (torch.float32, 4, 4, 80),
])
def test_mixed_batch_matches_dense(dtype, hq, hkv, d):
    pb = _batch(MIXED, hq, hkv, d, dtype=dtype, seed=1)
    _check(pb, scale=1 / math.sqrt(d), tol=_tol(dtype))


@pytest.mark.parametrize("softcap,window", [(5.0, None), (None, 7), (20.0, 24)])
def test_softcap_and_window(softcap, window):
    pb = _batch(MIXED, 6, 2, 64, seed=2)
    _check(pb, scale=0.5, softcap=softcap, window=window)


@pytest.mark.parametrize("page,block_m,block_n", [(16, 16, 16), (16, 2, 32), (24, 4, 16), (32, 1, 64)])
def test_tilings_and_pages(page, block_m, block_n):
    # one block-table entry per tile (block_n divides the page) or one per key (it does not),
    # several query tiles per sequence (small block_m)
    pb = _batch(MIXED, 4, 2, 32, dtype=torch.float16, page=page, seed=3)
    cfg = exact_attention_config(4, 2, 32, page, max_query_len=45, max_seq_len=70, block_m=block_m,
                                 block_n=block_n, dtype=torch.float16)
    assert cfg["BLOCK_N"] == block_n and cfg["ONE_PAGE"] == (page % block_n == 0)
    _check(pb, tol=_tol(torch.float16), block_m=block_m, block_n=block_n, window=30)


def test_token_major_view_and_given_out():
    pb = _batch(MIXED, 8, 2, 64, dtype=torch.bfloat16, token_major=True, seed=4)
    assert not pb["kv"].is_contiguous()
    pb["q"] = pb["q"].float()  # float32 queries over a bf16 cache (values exact in bf16)
    out = torch.full((pb["q"].shape[0] + 2, 8, 64), 7.0, dtype=torch.bfloat16, device=DEV)
    nq = pb["q"].shape[0]
    o, _ = _run(pb, 0.125, out=out[:nq])
    assert o.dtype == torch.float32 and out.dtype == torch.bfloat16
    o_ref, _ = _reference(pb, 0.125)
    assert torch.allclose(out[:nq].cpu().float(), o_ref, atol=1e-2, rtol=1e-2)
    assert (out[nq:] == 7).all()  # rows past the batch untouched


SPANS = [  # (seq_len, qlen), spans (start, T)
    ((120, 1), [(16, 80)]),             # page-aligned: whole tiles inside, skipped
    ((100, 5), [(5, 23), (40, 13)]),    # unaligned, two spans, a tile shared by two gaps
    ((90, 30), [(10, 6), (16, 20)]),    # adjacent spans, chunked prefill after them
    ((64, 1), [(0, 64)]),               # every key excluded (the query's own key too)
    ((50, 3), [(0, 50)]),               # every key of 3 queries excluded
    ((40, 40), []),                     # no span (-1 padding only)
    ((30, 0), [(3, 9)]),                # no query
]


@pytest.mark.parametrize("dtype,window,block_n", [(torch.float32, None, 32), (torch.bfloat16, None, 16),
                                                  (torch.float32, 40, 32)])
def test_spans_excluded(dtype, window, block_n):
    pb = _batch([s for s, _ in SPANS], 8, 2, 64, dtype=dtype, spans=[sp for _, sp in SPANS], seed=5)
    o, lse = _check(pb, tol=_tol(dtype), window=window, block_n=block_n)
    qsl = pb["qsl"]
    for b in (3, 4):  # all keys excluded: out 0, lse -inf
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        assert (o[rows] == 0).all() and torch.isneginf(lse[rows]).all()


def test_empty_span_and_shared_ends():
    # a zero-length span and two spans ending at the same token (overlapping) count nothing twice
    pb = _batch([(80, 4), (60, 60)], 4, 1, 32, spans=[[(30, 0), (20, 10), (25, 5)], [(40, 0), (8, 8)]], seed=6)
    _check(pb, block_n=16)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_batches(data):
    nseq = data.draw(st.integers(1, 3))
    seqs, spans = [], []
    for _ in range(nseq):
        L = data.draw(st.integers(1, 80))
        ql = data.draw(st.integers(0, min(L, 20)))
        seqs.append((L, ql))
        sp, pos = [], 0
        for _ in range(data.draw(st.integers(0, 2))):
            start = data.draw(st.integers(pos, L))
            T = data.draw(st.integers(0, L - start))
            sp.append((start, T))
            pos = start + T
        spans.append(sp)
    hkv = data.draw(st.sampled_from([1, 2]))
    g = data.draw(st.sampled_from([1, 3, 4]))
    window = data.draw(st.one_of(st.none(), st.integers(1, 50)))
    softcap = data.draw(st.one_of(st.none(), st.just(10.0)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    pb = _batch(seqs, hkv * g, hkv, 32, dtype=dtype, spans=spans, seed=data.draw(st.integers(0, 99)))
    _check(pb, tol=_tol(dtype), scale=0.3, softcap=softcap, window=window,
           block_m=data.draw(st.sampled_from([1, 4, 16])), block_n=data.draw(st.sampled_from([16, 32])))


@pytest.mark.parametrize("tile", [dict(rows=64, block_n=64, num_stages=3), dict(rows=16, block_n=128, num_warps=8),
                                  dict(rows=64, block_n=64, num_stages=3, bt_ahead=True),
                                  dict(rows=16, block_n=16, bt_ahead=True)])
def test_tile_overrides_keep_the_result(tile):
    """Launch overrides (the prefill tuning rows of gpu_check) change the tiling, never the result: mixed
    batch with compacted spans excluded, against the dense reference; the interior tiles' block-table entries
    read a tile ahead (bt_ahead) over tiles of several pages and of one."""
    pb = _batch([s for s, _ in SPANS], 8, 2, 64, dtype=torch.bfloat16, spans=[sp for _, sp in SPANS], seed=6)
    cfg = exact_attention_config(8, 2, 64, 16, max_query_len=64, max_seq_len=128, tile=tile)
    assert (cfg["ROWS"], cfg["BLOCK_N"], cfg["BT_AHEAD"]) == (tile["rows"], tile["block_n"], "bt_ahead" in tile)
    assert cfg["ONE_PAGE"] == (tile["block_n"] == 16)
    _check(pb, tol=_tol(torch.bfloat16), tile=tile)
    with pytest.raises(ValueError, match="unknown tile options \\['block_m'\\]"):
        exact_attention_config(8, 2, 64, 16, max_query_len=64, max_seq_len=128, tile=dict(block_m=4))
    with pytest.raises(ValueError, match="tile rows 2 must be a power of two >= 4"):
        exact_attention_config(8, 2, 64, 16, max_query_len=64, max_seq_len=128, tile=dict(rows=2))


def test_config_tiles():
    # decode batches get a small M-tile; the M-tile rows are filled with whole queries x heads
    c = exact_attention_config(28, 4, 128, 16, max_query_len=1, max_seq_len=4096)
    assert (c["G"], c["ROWS"], c["BLOCK_Q"], c["BLOCK_N"], c["ONE_PAGE"]) == (7, 16, 2, 32, False)
    c = exact_attention_config(28, 4, 128, 16, max_query_len=2048, max_seq_len=4096, block_n=16)
    assert (c["ROWS"], c["BLOCK_Q"], c["ONE_PAGE"]) == (128, 18, True)
    c = exact_attention_config(8, 8, 80, 16, max_query_len=3, max_seq_len=5)
    assert (c["ROWS"], c["BLOCK_Q"], c["BLOCK_D"], c["BLOCK_N"]) == (16, 16, 128, 16)
    # caps: 64 x 256 rows for d=256, small tiles for exact float32 dots, whole query groups always
    c = exact_attention_config(8, 1, 256, 16, max_query_len=2048, max_seq_len=4096)
    assert (c["ROWS"], c["BLOCK_Q"], c["BLOCK_N"], c["num_warps"]) == (64, 8, 16, 8)
    c = exact_attention_config(28, 4, 128, 16, max_query_len=2048, max_seq_len=4096, dtype=torch.float32)
    assert (c["ROWS"], c["BLOCK_Q"], c["BLOCK_N"], c["num_warps"]) == (32, 4, 16, 4)
    c = exact_attention_config(64, 1, 64, 16, max_query_len=2048, max_seq_len=4096, dtype=torch.float32)
    assert (c["ROWS"], c["BLOCK_Q"]) == (64, 1)
    with pytest.raises(ValueError):
        exact_attention_config(8, 2, 64, 16, max_query_len=1, max_seq_len=1, dtype=torch.float8_e4m3fn)


def test_no_host_syncs():
    src = inspect.getsource(exact_mod)
    for bad in (".item(", ".cpu(", ".tolist(", ".numpy(", "synchronize("):
        assert bad not in src, bad
    # int() / bool() / float() only ever see host values (no tensor argument)
    fn = ast.parse(inspect.getsource(paged_exact_attention_triton))
    tensors = {"q", "kv_cache", "block_table", "query_start_loc", "seq_lens", "seq_spans", "meta", "out", "lse", "bt"}
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("int", "bool", "float"):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & tensors, ast.unparse(node)


def _reach(pb, ranges):
    """Each query's last key: its own position, or the end of the multimodal item it lies in (clamped)."""
    from ap_vllm.core.dense import mm_prefix_reach

    parts = []
    for b, (L, ql) in enumerate(pb["seqs"]):
        parts.append(mm_prefix_reach(torch.arange(L - ql, L, dtype=torch.int32), ranges.get(b, ()), L))
    return torch.cat(parts)


def _both_ways_reference(pb, ranges, scale, window=None):
    """float64 softmax over an explicit mask: a query sees key n when n <= p or both lie in one item
    [start, end] (inclusive), n < L, outside the compacted spans, and p - n < window."""
    q, kv, bt, page = pb["q"].double(), pb["kv"], pb["bt"], pb["page"]
    outs, lses = [], []
    for b, (L, ql) in enumerate(pb["seqs"]):
        excluded = torch.zeros(L, dtype=torch.bool)
        for start, T in pb["spans"][b]:
            excluded[start: start + T] = True
        n = torch.arange(L)[~excluded]
        p = torch.arange(L - ql, L)
        allowed = n[None, :] <= p[:, None]
        for s, e in ranges.get(b, ()):
            allowed |= ((p >= s) & (p <= e))[:, None] & ((n >= s) & (n <= e))[None, :]
        if window is not None:
            allowed &= (p[:, None] - n[None, :]) < window
        k = kv[bt[b, n // page].long(), 0, n % page].double()
        v = kv[bt[b, n // page].long(), 1, n % page].double()
        g = q.shape[1] // k.shape[1]
        qs = q[int(pb["qsl"][b]): int(pb["qsl"][b]) + ql]
        s_ = torch.einsum("ihd,nhd->hin", qs, k.repeat_interleave(g, 1)) * scale
        s_ = s_.masked_fill(~allowed[None], float("-inf"))
        lse = torch.logsumexp(s_, -1)
        o = torch.einsum("hin,nhd->ihd", torch.softmax(s_, -1).nan_to_num(0.0), v.repeat_interleave(g, 1))
        outs.append(o.float())
        lses.append(lse.t().float())
    return torch.cat(outs), torch.cat(lses)


# prompt with two items (one across query tiles), a chunk holding an item after a compacted span, an item that
# ends at the prompt's last token, a decode row after an item, and an item split across steps (clamped)
BOTH_WAYS = [(((70, 70), []), [(5, 20), (30, 62)]),
             (((100, 40), [(10, 20)]), [(66, 85)]),
             (((48, 48), []), [(40, 47)]),
             (((50, 1), []), [(10, 30)]),
             (((60, 20), []), [(50, 75)])]


@pytest.mark.parametrize("dtype,window,block_m,block_n", [(torch.float32, None, 16, 32), (torch.bfloat16, None, 4, 16),
                                                          (torch.float32, 40, 16, 16)])
def test_multimodal_items_attended_both_ways(dtype, window, block_m, block_n):
    """``reach``: a query inside an item sees the item's later tokens (vLLM's is_mm_prefix_lm models)."""
    pb = _batch([s for (s, _), _ in BOTH_WAYS], 8, 2, 64, dtype=dtype, spans=[sp for (_, sp), _ in BOTH_WAYS],
                seed=8)
    ranges = {b: r for b, (_, r) in enumerate(BOTH_WAYS)}
    reach = _reach(pb, ranges)
    assert (reach == torch.cat([torch.arange(L - ql, L) for L, ql in pb["seqs"]])).sum() < len(reach)
    o, lse = _run(pb, 0.125, window=window, block_m=block_m, block_n=block_n, reach=reach.to(DEV))
    o_ref, lse_ref = _both_ways_reference(pb, ranges, 0.125, window=window)
    tol = _tol(dtype)
    o_dense, _ = _reference(pb, 0.125, window=window, reach=reach)  # (the torch oracle's reach)
    assert torch.allclose(o_dense, o_ref, atol=1e-5, rtol=1e-5), (o_dense - o_ref).abs().max()
    assert torch.allclose(o, o_ref, atol=tol, rtol=tol), (o - o_ref).abs().max()
    assert torch.allclose(lse, lse_ref, atol=max(tol, 1e-5), rtol=1e-5), (lse - lse_ref).abs().max()
    causal, _ = _run(pb, 0.125, window=window, block_m=block_m, block_n=block_n)
    assert (causal - o_ref).abs().max() > 10 * tol  # (the items change the result: the test can tell)
    with pytest.raises(ValueError, match="reach must be int32"):
        _run(pb, 0.125, reach=reach.long().to(DEV))
