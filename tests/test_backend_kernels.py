"""The backend's decode rows on the Triton kernels against its torch path (CPU: Triton interpreter).

A paged world laid out as vLLM lays it out (token-major pages, scrambled block tables), spans
compacted by the backend itself, freed blocks poisoned with NaN; then a few steps of batches
mixing decode rows, a span completing on a one-token chunk, prefill chunks and plain decode.
``kernel="torch"`` and ``kernel="triton"`` must agree: outputs within 1e-4 (fp32), the span
importance in the pages within 1e-5. Both normalise a decode step's importance update by the
request's lse of its previous step (one kernel pass), which a last test checks.
"""


import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("triton")

from ap_vllm.tools.testing.backend_world import BS, D, World, build, layer, make_builder, make_impl, run_step  # noqa: E402

from ap_vllm.config import parse_config  # noqa: E402
from ap_vllm.core.paged_layout import read_importance  # noqa: E402

LAYER = layer(1)


def importances(world, pages, builder):
    key = builder.layer_keys[LAYER.layer_name]
    out = []
    for rid, plans in world.plans(builder).items():
        for p in plans:
            if world.lens.get(rid, 0) >= p.end:
                layout = builder.layout(key, p)
                ids = torch.tensor(world.tables[rid][p.first_block: p.first_block + layout.num_blocks])
                out.append(read_importance(world.kv_cache(pages).transpose(1, 2), ids, layout))
    return out


def step_both(impls, builders, world, pages, batch):
    """One step through each path: its own builder's metadata, its own pages; freed blocks poisoned after."""
    outs = []
    for impl, builder, pg in zip(impls, builders, pages):
        md = build(builder, *batch[3:])
        outs.append(run_step(impl, world, pg, batch, md))
    world.poison_freed(builders[0], *pages)  # whatever vLLM puts there next: must never be read
    return outs


@pytest.mark.parametrize("hq,hkv,window,softcap,cfg", [
    (4, 2, None, None, {"value_selection": "ema"}),  # the paper's selection (the default is score)
    (4, 4, None, 20.0, {"importance_fraction": 1.0}),
    (6, 2, None, None, {"two_level_keys": True, "importance_fraction": 0.5}),
    (4, 2, None, None, {"threshold_sample_tokens": 48}),  # thresholds from a sample of the 126/150-token spans
    (4, 2, 24, None, {}),  # sliding-window layer: exact tokens only, window in the kernel
    (4, 2, None, None, {"value_selection": "score", "score_threshold": 0.02}),  # no importance kept
    (4, 2, None, None, {"value_selection": "full"}),  # nothing selected nor kept; the kernel's full_rank launch
])
def test_triton_decode_rows_match_torch(hq, hkv, window, softcap, cfg):
    impls = [make_impl(k, hq, hkv, window, softcap, **cfg) for k in ("torch", "triton")]
    builders = [make_builder(k, hq, hkv, [0, 1, 2], window=window, **cfg) for k in ("torch", "triton")]
    world = World(hq, hkv)
    # r0: 170-token prompt with an image at [10, 160); r2: image at [4, 130), its prompt arrives in
    # chunks of 129, 1 (the span completes on a one-token step) and 10; r1, r3: text only.
    world.request(0, (10, 150), 170)
    world.request(2, (4, 126), 140)
    if window is None:
        assert all(len(ps) == 1 and ps[0].num_freed_blocks > 0 for r, ps in world.plans(builders[0]).items())
    steps = [[(0, 170), (1, 60), (2, 129)],
             [(0, 1), (1, 1), (2, 1), (3, 40)],
             [(0, 1), (1, 1), (2, 10), (3, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 1)],
             [(0, 1), (2, 1), (3, 1)]]
    pages = [world.pages, world.pages.clone()]
    for i, step in enumerate(steps):
        out_t, out_x = step_both(impls, builders, world, pages, world.batch(step))
        assert torch.isfinite(out_t).all() and torch.isfinite(out_x).all(), i
        torch.testing.assert_close(out_x, out_t, atol=1e-4, rtol=1e-4, msg=f"step {i}")
        if window is None:
            imp_t, imp_x = importances(world, pages[0], builders[0]), importances(world, pages[1], builders[1])
            for a, b in zip(imp_t, imp_x):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"importance, step {i}")
    if window is None and parse_config(cfg).value_selection in ("score", "full"):
        assert len(imp_t) == 2 and all(float(a.abs().sum()) == 0 for a in imp_t)  # spans read, importance not kept
    elif window is None:
        assert len(imp_t) == 2 and all(float(a.sum()) > 0 for a in imp_t)  # spans read and updated


def test_heads_of_512_on_the_kernels_match_torch():
    """Gemma 4's global heads (512 numbers): the merge takes them in two programs of 256 output columns
    (``MERGE_MAX_COLUMNS``), the exact prefill kernel in tiles of 16 rows; prefill, a span completing, decode rows
    over compacted spans and exact tokens equal the torch path."""
    hq, hkv, d = 4, 2, 512
    cfg = {"value_selection": "full"}
    impls = [make_impl(k, hq, hkv, None, None, head_size=d, **cfg) for k in ("torch", "triton")]
    builders = [make_builder(k, hq, hkv, [0, 1, 2], head_size=d, **cfg) for k in ("torch", "triton")]
    world = World(hq, hkv, head_size=d)
    world.request(0, (10, 150), 170)
    pages = [world.pages, world.pages.clone()]
    for i, step in enumerate([[(0, 170), (1, 40)], [(0, 1), (1, 1), (2, 20)], [(0, 1), (1, 1), (2, 1)]]):
        out_t, out_x = step_both(impls, builders, world, pages, world.batch(step))
        assert torch.isfinite(out_t).all(), i
        torch.testing.assert_close(out_x, out_t, atol=1e-4, rtol=1e-4, msg=f"step {i}")
    assert world.freed_blocks(builders[0])  # (the span was compacted and read in coefficient space)


def test_full_selection_launches_full_rank_with_no_lse(monkeypatch):
    """value_selection 'full': the decode launch says full_rank (the kernel then reads no importance to select),
    with no importance update, no score selection and no previous lse; the layer keeps no lse."""
    import ap_vllm.kernels.lowrank_decode as kernels

    calls = []
    real = kernels.paged_mixed_decode_triton

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "paged_mixed_decode_triton", spy)
    impl = make_impl("triton", 4, 2, None, None, value_selection="full")
    builder = make_builder("triton", 4, 2, [1], value_selection="full")
    world = World(4, 2)
    world.request(0, (10, 150), 170)
    run_step(impl, world, world.pages, b := world.batch([(0, 170)]), md := build(builder, *b[3:]))
    lse_buf, lse_tag = md.lse_buffers[LAYER.layer_name]
    run_step(impl, world, world.pages, b := world.batch([(0, 1)]), build(builder, *b[3:]))
    assert len(calls) == 1
    kw = calls[0]
    assert kw["full_rank"] is True and kw.get("importance_ema") is None and kw.get("score_threshold") is None
    assert kw.get("lse_ref") is None
    assert bool((lse_tag == -1).all()), "no lse kept"


def test_decode_rows_are_split_off():
    """Only rows with one query and no span completing are decode rows; the builder says which."""
    builder = make_builder("triton", 4, 2, [1])
    world = World(4, 2)
    world.request(1, (4, 126), 140)
    build(builder, *world.batch([(0, 20), (1, 129), (2, 5)])[3:])
    md = build(builder, *world.batch([(0, 1), (1, 1), (2, 3)])[3:])
    assert md.decode.num_rows == 1 and md.decode.q_idx is None  # row 0
    assert md.prefill.q_slice == slice(1, 5) and md.prefill.q_idx is None  # row 1 (span completing), row 2
    assert md.prefill.query_start_loc.tolist() == [0, 1, 4] and md.prefill.seq_lens.tolist() == [130, 8]
    assert len(md.prefill.steps[builder.layer_keys[LAYER.layer_name]].completing) == 1
    md = build(builder, *world.batch([(2, 2), (0, 1), (1, 1)])[3:])  # decode rows after a prefill row
    assert md.decode.num_rows == 2 and md.decode.q_idx.tolist() == [2, 3]
    assert md.decode.seq_lens.tolist() == [22, 131]


def test_decode_steps_run_the_kernels_once_with_the_previous_lse(monkeypatch):
    """A decode step's importance update is normalised by the request's lse of its previous step, read
    from the layer's slot buffer: one launch of the kernels per layer and step; a row whose entry is
    stale (its slot's tag does not match) gets +inf (adds nothing to its importance)."""
    import ap_vllm.kernels.lowrank_decode as kernels

    calls = []
    real = kernels.paged_mixed_decode_triton

    def counting(*args, **kwargs):
        calls.append(kwargs.get("lse_ref"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "paged_mixed_decode_triton", counting)
    impl = make_impl("triton", 4, 2, None, None)
    builder = make_builder("triton", 4, 2, [1])
    world = World(4, 2)
    world.request(0, (10, 150), 170)
    run_step(impl, world, world.pages, b := world.batch([(0, 170)]), md := build(builder, *b[3:]))  # + compaction
    lse_buf, lse_tag = md.lse_buffers[LAYER.layer_name]  # the builder's, the same every step
    prefill_lse = lse_buf[world.slots[0]].clone()
    assert torch.isfinite(prefill_lse).all()
    calls.clear()
    run_step(impl, world, world.pages, b := world.batch([(0, 1)]), build(builder, *b[3:]))
    assert len(calls) == 1
    torch.testing.assert_close(calls[0][0], prefill_lse)  # the prefill step's lse, one token earlier
    decode_lse = lse_buf[world.slots[0]].clone()
    run_step(impl, world, world.pages, b := world.batch([(0, 1)]), build(builder, *b[3:]))
    assert len(calls) == 2
    torch.testing.assert_close(calls[1][0], decode_lse)
    lse_tag.fill_(-1)  # e.g. the layer missed the last step: no normaliser, still one pass
    run_step(impl, world, world.pages, b := world.batch([(0, 1)]), build(builder, *b[3:]))
    assert len(calls) == 3 and torch.isinf(calls[2]).all()


def test_layers_share_what_the_builder_plans_per_step():
    """Every layer gets the same metadata in a step: the builder plans once per layout key (layers with
    equal ranks share one plan, per-layer ranks make another one), and each layer still matches its
    torch path."""
    cfg = {"key_rank": [8, 8, 6], "value_rank": [12, 12, 10]}
    ids = (1, 0, 2)
    impls = {(k, j): make_impl(k, 4, 2, None, None, **cfg) for k in ("torch", "triton") for j in ids}
    builders = {k: make_builder(k, 4, 2, list(ids), **cfg) for k in ("torch", "triton")}
    world = World(4, 2)
    world.request(0, (10, 150), 170)
    pages = {(k, j): world.pages.clone() for k in ("torch", "triton") for j in ids}
    for i, step in enumerate([[(0, 170), (1, 30)], [(0, 1), (1, 1)], [(0, 1), (1, 1)], [(1, 1), (0, 1)]]):
        batch = world.batch(step)
        mds = {k: build(b, *batch[3:]) for k, b in builders.items()}
        for j in ids:
            outs = {k: run_step(impls[k, j], world, pages[k, j], batch, mds[k], layer(j)) for k in mds}
            torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-4, rtol=1e-4, msg=f"step {i}, layer {j}")
        world.poison_freed(builders["torch"], *pages.values())
        if i > 0:  # decode steps: layers 1 and 0 share one plan, layer 2 (other ranks) has its own
            assert len(mds["triton"].decode.steps) == 2, mds["triton"].decode.steps.keys()
            keys = mds["triton"].layer_keys
            assert keys[layer(0).layer_name] == keys[layer(1).layer_name] != keys[layer(2).layer_name]


def test_first_chunks_take_sdpa(monkeypatch):
    """On the kernel path a step's fresh prefill rows (a prompt's first chunk) run through SDPA, one call per
    row, the builder listing them after the other rows (chunks with history, over compacted spans or not), which
    alone go to the exact kernel with the span instances; outputs and the kept lse match the torch path (1e-4),
    whatever order vLLM's batch has."""
    import ap_vllm.backend.attentionpack as ap

    sdpa_rows, kernel_rows = [], []
    real_prefill, real_sdpa = ap.paged_prefill, ap.sdpa_row_attention

    def sdpa(q, k, v, scale):
        sdpa_rows.append((q.shape[0], k.shape[0]))
        return real_sdpa(q, k, v, scale)

    def prefill(q, cache, bt, qsl, seq_lens, plan, *args, **kwargs):
        kernel_rows.append((qsl.tolist(), seq_lens.tolist(), plan is not None))
        return real_prefill(q, cache, bt, qsl, seq_lens, plan, *args, **kwargs)

    monkeypatch.setattr(ap, "sdpa_row_attention", sdpa)
    monkeypatch.setattr(ap, "paged_prefill", prefill)
    impls = [make_impl(k, 4, 2, None, None) for k in ("torch", "triton")]
    builders = [make_builder(k, 4, 2, [1]) for k in ("torch", "triton")]
    world = World(4, 2)
    world.request(0, (10, 150), 170)
    pages = [world.pages, world.pages.clone()]
    steps = [[(0, 170)],  # a first chunk only: no exact-kernel launch; its span is compacted after the step
             [(1, 60), (0, 20)],  # vLLM puts the first chunk first: the builder lists it after the span row
             [(0, 1), (2, 30), (1, 5)],  # a decode row, a first chunk, a second chunk of text
             [(1, 3), (0, 4)]]  # a chunk of text after 65 tokens, a chunk after a compacted span
    expect_sdpa = [[(170, 170)], [(60, 60)], [(30, 30)], []]
    expect_kernel = [[], [([0, 20], [190], True)], [([0, 5], [65], False)], [([0, 3, 7], [68, 195], True)]]
    for i, step in enumerate(steps):
        sdpa_rows.clear()
        kernel_rows.clear()
        out_t, out_x = step_both(impls, builders, world, pages, world.batch(step))
        assert sdpa_rows == expect_sdpa[i], (i, sdpa_rows)
        assert kernel_rows == expect_kernel[i], (i, kernel_rows)  # (the torch path launches neither)
        torch.testing.assert_close(out_x, out_t, atol=1e-4, rtol=1e-4, msg=f"step {i}")
    lse = [b.lse_buffers()[LAYER.layer_name][0][[world.slots[r] for r in (0, 1, 2)]] for b in builders]
    assert torch.isfinite(lse[0]).all()  # each request's last lse (row 2's: its first chunk's last query)
    torch.testing.assert_close(lse[1], lse[0], atol=1e-4, rtol=1e-4)


def test_items_attended_both_ways(monkeypatch):
    """vLLM's is_mm_prefix_lm models (``mm_req_doc_ranges``): a prompt's queries inside an image see the image's
    later tokens. The builder gives those rows ``reach`` and never lists them fresh (SDPA is causal); the kernel
    path equals the torch path, and each differs from the causal result exactly in the queries that see later
    keys (an image's last token, the decode rows after it and the text rows are the same)."""
    import ap_vllm.backend.attentionpack as ap

    sdpa_rows = []
    real_sdpa = ap.sdpa_row_attention

    def sdpa(q, k, v, scale):
        sdpa_rows.append(q.shape[0])
        return real_sdpa(q, k, v, scale)

    monkeypatch.setattr(ap, "sdpa_row_attention", sdpa)
    # r0: a 170-token prompt, image tokens [10, 160) (compacted after the step); r1: text; r2: a 40-token prompt
    # with an image at [5, 20] (too short to compact) arriving with the decode rows
    steps = [[(0, 170), (1, 60)], [(0, 1), (1, 1), (2, 40)], [(0, 1), (2, 1)]]
    sdpa_expected = {True: [[60], [], []], False: [[170, 60], [40], []]}
    changed_tokens = [range(10, 159), range(2 + 5, 2 + 20), range(0)]  # (token indices of the batch)
    outs = {}
    for both_ways in (True, False):
        impls = [make_impl(k, 4, 2, None, None) for k in ("torch", "triton")]
        builders = [make_builder(k, 4, 2, [1]) for k in ("torch", "triton")]
        world = World(4, 2)
        world.request(0, (10, 150), 170)
        if both_ways:
            world.items = {0: [(10, 159)], 2: [(5, 20)]}
        pages = [world.pages, world.pages.clone()]
        outs[both_ways] = []
        for i, step in enumerate(steps):
            sdpa_rows.clear()
            batch = world.batch(step)
            if both_ways and i == 0:  # (a builder of its own: the step's metadata, seen once)
                pre = build(make_builder("triton", 4, 2, [1]), *batch[3:]).prefill
                assert pre.num_fresh == 1 and pre.host_seq_lens == [170, 60]
                assert pre.reach.tolist() == list(range(10)) + [159] * 150 + list(range(160, 170)) + list(range(60))
            out_t, out_x = step_both(impls, builders, world, pages, batch)
            torch.testing.assert_close(out_x, out_t, atol=1e-4, rtol=1e-4, msg=f"step {i}")
            assert sdpa_rows == sdpa_expected[both_ways][i], (both_ways, i, sdpa_rows)
            outs[both_ways].append(out_t)
    for i, tokens in enumerate(changed_tokens):
        diff = (outs[True][i] - outs[False][i]).abs().amax(dim=(1, 2))
        changed = torch.zeros_like(diff, dtype=torch.bool)
        changed[list(tokens)] = True
        assert (diff[changed] > 1e-3).all() and (diff[~changed] < 1e-5).all(), (i, diff)
