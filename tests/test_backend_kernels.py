"""The backend's decode rows on the Triton kernels against its torch path (CPU: Triton interpreter).

A paged world laid out as vLLM lays it out (token-major pages, scrambled block tables), spans
compacted by the backend itself, freed blocks poisoned with NaN; then a few steps of batches
mixing decode rows, a span completing on a one-token chunk, prefill chunks and plain decode.
``kernel="torch"`` and ``kernel="triton"`` must agree: outputs within 1e-4 (fp32), the span
importance in the pages within 1e-5. Both normalise a decode step's importance update by the
request's lse of its previous step (one kernel pass), which a last test checks.
"""

import os
import random
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():  # must precede any import of triton / ap_vllm.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("vllm")
pytest.importorskip("triton")

from ap_vllm.backend.attentionpack import AttentionPackImpl, AttentionPackMetadata  # noqa: E402
from ap_vllm.core.paged_layout import read_importance  # noqa: E402
from ap_vllm.core.spans import KVGeometry, plan_span, span_layout  # noqa: E402

LAYER = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
BS, D = 16, 32


def make_impl(kernel, hq, hkv, window, softcap, **cfg):
    from vllm.config import VllmConfig, set_current_vllm_config

    extra = {"attentionpack": {"key_rank": 8, "value_rank": 12, "kernel": kernel, **cfg}}
    with set_current_vllm_config(VllmConfig(additional_config=extra)):
        return AttentionPackImpl(hq, D, 0.15, hkv, None, window, "auto", logits_soft_cap=softcap)


class World:
    """Token-major pages ([blocks, block_size, Hkv, 2d] in memory, as vLLM allocates them for
    KVCacheLayout.LBNHC) seen through the backend's logical [blocks, Hkv, block_size, 2d] view."""

    def __init__(self, hq, hkv, num_blocks=80, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.hq, self.hkv = hq, hkv
        self.pages = torch.full((num_blocks, BS, hkv, 2 * D), float("nan"))
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables, self.lens, self.plans = {}, {}, {}

    def kv_cache(self, pages=None):
        return (self.pages if pages is None else pages).transpose(1, 2)

    def batch(self, step):
        """Random q/k/v for ``step`` = [(rid, new tokens)] plus the metadata vLLM would build."""
        qlens = [n for _, n in step]
        key = torch.randn(sum(qlens), self.hkv, D, generator=self.g)
        value = torch.randn(sum(qlens), self.hkv, D, generator=self.g)
        query = torch.randn(sum(qlens), self.hq, D, generator=self.g)
        slots = []
        for rid, n in step:
            table = self.tables.setdefault(rid, [])
            old = self.lens.get(rid, 0)
            while len(table) * BS < old + n:
                table.append(self.free.pop())
            slots += [table[p // BS] * BS + p % BS for p in range(old, old + n)]
            self.lens[rid] = old + n
        table = torch.zeros(len(step), max(len(self.tables[r]) for r, _ in step), dtype=torch.int32)
        for i, (rid, _) in enumerate(step):
            table[i, : len(self.tables[rid])] = torch.tensor(self.tables[rid])
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        meta = AttentionPackMetadata(num_actual_tokens=qsl[-1], query_start_loc=qsl,
                                     seq_lens=[self.lens[r] for r, _ in step], block_table=table,
                                     slot_mapping=torch.tensor(slots), spans=[self.plans.get(r, []) for r, _ in step],
                                     request_ids=[f"req-{r}" for r, _ in step])
        return query, key, value, meta

    def freed_blocks(self):
        """Physical blocks of every span compacted so far that vLLM would have returned to the pool."""
        out = []
        for rid, plans in self.plans.items():
            for p in plans:
                if self.lens.get(rid, 0) >= p.end:
                    lo, hi = p.freed_blocks
                    out += self.tables[rid][lo:hi]
        return out


def run_step(impl, world, pages, batch):
    query, key, value, meta = batch
    kv_cache = world.kv_cache(pages)
    impl.do_kv_cache_update(LAYER, key, value, kv_cache, meta.slot_mapping)
    output = torch.full_like(query, float("nan"))
    impl.forward(LAYER, query, key, value, kv_cache, meta, output)
    for b in world.freed_blocks():  # whatever vLLM puts there next: must never be read
        pages[b] = float("nan")
    return output


def importances(world, pages, impl):
    geometry = KVGeometry(BS, world.hkv, D, torch.float32, 1)
    out = []
    for rid, plans in world.plans.items():
        for p in plans:
            if world.lens.get(rid, 0) >= p.end:
                layout = span_layout(impl.config, geometry, p.num_tokens, 1, p.kind)
                ids = torch.tensor(world.tables[rid][p.first_block: p.first_block + layout.num_blocks])
                out.append(read_importance(world.kv_cache(pages).transpose(1, 2), ids, layout))
    return out


@pytest.mark.parametrize("hq,hkv,window,softcap,cfg", [
    (4, 2, None, None, {}),
    (4, 4, None, 20.0, {"importance_fraction": 1.0}),
    (6, 2, None, None, {"two_level_keys": True, "importance_fraction": 0.5}),
    (4, 2, None, None, {"threshold_sample_tokens": 48}),  # thresholds from a sample of the 126/150-token spans
    (4, 2, 24, None, {}),  # sliding-window layer: exact tokens only, window in the kernel
])
def test_triton_decode_rows_match_torch(hq, hkv, window, softcap, cfg):
    torch_impl = make_impl("torch", hq, hkv, window, softcap, **cfg)
    triton_impl = make_impl("triton", hq, hkv, window, softcap, **cfg)
    world = World(hq, hkv)
    geometry = KVGeometry(BS, hkv, D, torch.float32, 2)
    # r0: 170-token prompt with an image at [10, 160); r2: image at [4, 130), its prompt arrives in
    # chunks of 129, 1 (the span completes on a one-token step) and 10; r1, r3: text only.
    if window is None:  # sliding-window layers (their own KV group in vLLM) are never compacted
        world.plans = {0: [plan_span(torch_impl.config, geometry, 10, 150, "visual")],
                       2: [plan_span(torch_impl.config, geometry, 4, 126, "visual")]}
        assert all(p is not None and p.num_freed_blocks > 0 for ps in world.plans.values() for p in ps)
    steps = [[(0, 170), (1, 60), (2, 129)],
             [(0, 1), (1, 1), (2, 1), (3, 40)],
             [(0, 1), (1, 1), (2, 10), (3, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 1)],
             [(0, 1), (2, 1), (3, 1)]]
    pages_t, pages_x = world.pages, world.pages.clone()
    for i, step in enumerate(steps):
        batch = world.batch(step)
        out_t = run_step(torch_impl, world, pages_t, batch)
        out_x = run_step(triton_impl, world, pages_x, batch)
        assert torch.isfinite(out_t).all() and torch.isfinite(out_x).all(), i
        torch.testing.assert_close(out_x, out_t, atol=1e-4, rtol=1e-4, msg=f"step {i}")
        imp_t, imp_x = importances(world, pages_t, torch_impl), importances(world, pages_x, triton_impl)
        for a, b in zip(imp_t, imp_x):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"importance, step {i}")
    if window is None:
        assert len(imp_t) == 2 and all(float(a.sum()) > 0 for a in imp_t)  # spans read and updated


def test_decode_rows_are_split_off():
    """Only rows with one query and no span completing go to the kernels."""
    impl = make_impl("triton", 4, 2, None, None)
    world = World(4, 2)
    geometry = KVGeometry(BS, 2, D, torch.float32, 2)
    world.plans = {1: [plan_span(impl.config, geometry, 4, 126, "visual")]}
    world.batch([(0, 20), (1, 129), (2, 5)])
    query, key, value, meta = world.batch([(0, 1), (1, 1), (2, 3)])
    impl.do_kv_cache_update(LAYER, key, value, world.kv_cache(), meta.slot_mapping)
    output = torch.full_like(query, float("nan"))
    rest = impl._decode_with_kernels(LAYER, query, world.kv_cache(), meta, meta.spans, output)
    assert rest == [1, 2]
    assert torch.isfinite(output[0]).all() and torch.isnan(output[1:]).all()


def test_decode_steps_run_the_kernels_once_with_the_previous_lse(monkeypatch):
    """After a request's first decode step, the importance update is normalised by its previous
    step's lse: one launch of the kernels per layer and step, not two."""
    import ap_vllm.kernels.lowrank_decode as kernels

    calls = []
    real = kernels.paged_mixed_decode_triton

    def counting(*args, **kwargs):
        calls.append(kwargs.get("lse_ref"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "paged_mixed_decode_triton", counting)
    impl = make_impl("triton", 4, 2, None, None)
    world = World(4, 2)
    world.plans = {0: [plan_span(impl.config, KVGeometry(BS, 2, D, torch.float32, 2), 10, 150, "visual")]}
    run_step(impl, world, world.pages, world.batch([(0, 170)]))  # prefill + compaction (torch path)
    calls.clear()
    run_step(impl, world, world.pages, world.batch([(0, 1)]))
    assert len(calls) == 1 and calls[0] is not None  # the prefill step's lse, one token earlier
    ids, lens, prev, rows = impl._last_step_lse  # the batch this layer decoded last, its lse, row per id
    assert ids == ("req-0",) and lens == (171,) and rows == {"req-0": 0}
    run_step(impl, world, world.pages, world.batch([(0, 1)]))
    assert len(calls) == 2 and calls[1] is prev  # the same batch one token on: last step's lse as it is
    impl._last_lse.clear()  # e.g. the layer missed the last step: exact normaliser, two passes
    impl._last_step_lse = None
    run_step(impl, world, world.pages, world.batch([(0, 1)]))
    assert len(calls) == 4 and calls[2] is None and calls[3] is not None


def test_layers_share_what_the_first_builds_per_step():
    """Every layer gets the same metadata object in a step: the first layer with a given span
    layout builds the kernels' batch description, later ones with that layout reuse it (per-layer
    ranks make another one), and each layer still matches its torch path."""
    cfg = {"key_rank": [8, 8, 6], "value_rank": [12, 12, 10]}
    names = [SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn") for i in (1, 0, 2)]
    torch_impls = [make_impl("torch", 4, 2, None, None, **cfg) for _ in names]
    triton_impls = [make_impl("triton", 4, 2, None, None, **cfg) for _ in names]
    world = World(4, 2)
    geometry = KVGeometry(BS, 2, D, torch.float32, 3)
    world.plans = {0: [plan_span(torch_impls[0].config, geometry, 10, 150, "visual")]}
    pages = {(kind, j): world.pages.clone() for kind in ("t", "x") for j in range(len(names))}
    for i, step in enumerate([[(0, 170), (1, 30)], [(0, 1), (1, 1)], [(0, 1), (1, 1)], [(1, 1), (0, 1)]]):
        query, key, value, meta = world.batch(step)
        meta_t = AttentionPackMetadata(**{f: getattr(meta, f) for f in ("num_actual_tokens", "query_start_loc",
                                                                         "seq_lens", "block_table", "slot_mapping",
                                                                         "spans", "request_ids")})
        for j, layer in enumerate(names):
            outs = {}
            for kind, impl, md in (("t", torch_impls[j], meta_t), ("x", triton_impls[j], meta)):
                kv_cache = world.kv_cache(pages[kind, j])
                impl.do_kv_cache_update(layer, key, value, kv_cache, meta.slot_mapping)
                outs[kind] = torch.full_like(query, float("nan"))
                impl.forward(layer, query, key, value, kv_cache, md, outs[kind])
            torch.testing.assert_close(outs["x"], outs["t"], atol=1e-4, rtol=1e-4, msg=f"step {i}, layer {j}")
        for p in pages.values():
            for b in world.freed_blocks():
                p[b] = float("nan")
        if i > 0:  # decode steps: layers 1 and 0 share one description, layer 2 (other ranks) has its own
            assert len(meta.kernel_steps) == 2, meta.kernel_steps.keys()
            assert not meta_t.kernel_steps  # the torch path builds none
