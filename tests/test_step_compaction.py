"""The spans completing in a step are queued by every layer and compacted once, at the end of the step's last
layer, all layers' spans in one batched call (``AttentionPackImpl.finish_step``): the same compact forms as
compacting each layer on its own, and a step whose last layer never ran is refused at the next build (its freed
blocks would be reused with the spans still exact)."""

import pytest
import torch

import ap_vllm.backend.attentionpack as ap
from ap_vllm.tools.testing.backend_world import World, build, layer, make_builder, make_impl

HQ, HKV = 4, 2
IDS = (0, 1, 2)


def _setup():
    world = World(HQ, HKV)
    world.request(0, (10, 150), 170)  # two images completing in the first step
    world.request(1, (4, 126), 130)
    impls = [make_impl("torch", HQ, HKV, None, None) for _ in IDS]
    return world, impls, world.batch([(0, 170), (1, 130)])


def _forward(impl, world, pages, batch, md, j):
    q, k, v, common, _ = batch
    kv = world.kv_cache(pages)
    impl.do_kv_cache_update(layer(j), k, v, kv, common.slot_mapping)
    impl.forward(layer(j), q, k, v, kv, md, torch.full_like(q, float("nan")))


@pytest.fixture
def calls(compaction_calls):
    return compaction_calls  # (conftest: the spans of each compact_spans call)


def test_every_layer_in_one_call_at_the_last_layer(calls):
    world, impls, batch = _setup()
    builder = make_builder("torch", HQ, HKV, list(IDS))
    md = build(builder, *batch[3:])
    assert md.compaction is not None and md.compaction.last_layer == layer(2).layer_name
    batched = [world.pages.clone() for _ in IDS]
    after_forward = {}
    for j in IDS:
        _forward(impls[j], world, batched[j], batch, md, j)
        if j < IDS[-1]:  # queued: nothing compacted yet
            assert calls == [] and len(md.compaction.jobs) == j + 1
            after_forward[j] = batched[j].clone()
    assert calls == [2 * len(IDS)] and md.compaction.jobs == []  # 2 spans x 3 layers, one call
    for j, pages in after_forward.items():  # the earlier layers' compact forms were written at the end
        assert not torch.equal(batched[j].nan_to_num(), pages.nan_to_num())
    impls[0].finish_step(md)  # idempotent
    assert calls == [2 * len(IDS)]

    # the same step with each layer compacted on its own (finish_step after every layer): equal compact forms
    world2, impls2, batch2 = _setup()
    md2 = build(make_builder("torch", HQ, HKV, list(IDS)), *batch2[3:])
    alone = [world2.pages.clone() for _ in IDS]
    for j in IDS:
        _forward(impls2[j], world2, alone[j], batch2, md2, j)
        impls2[j].finish_step(md2)
    assert calls[1:] == [2, 2, 2]
    for j in IDS:
        torch.testing.assert_close(batched[j], alone[j], atol=1e-5, rtol=1e-5, equal_nan=True)
        assert not torch.equal(batched[j].nan_to_num(), world.pages.nan_to_num())  # the step wrote the pages


def test_calls_are_capped_in_span_tokens(calls, monkeypatch):
    # (the backend's name of the core constant) spans of 140 and 122 tokens: two spans a call
    monkeypatch.setattr(ap, "COMPACTION_CALL_TOKENS", 300)
    world, impls, batch = _setup()
    md = build(make_builder("torch", HQ, HKV, list(IDS)), *batch[3:])
    for j in IDS:
        _forward(impls[j], world, world.pages.clone(), batch, md, j)
    assert calls == [2, 2, 2] and md.compaction.jobs == []


def test_a_step_whose_last_layer_never_ran_is_refused_at_the_next_build(calls):
    world, impls, batch = _setup()
    builder = make_builder("torch", HQ, HKV, list(IDS))
    md = build(builder, *batch[3:])
    for j in IDS[:-1]:
        _forward(impls[j], world, world.pages.clone(), batch, md, j)
    assert calls == [] and len(md.compaction.jobs) == 2
    with pytest.raises(RuntimeError, match="never compacted.*model.layers.2"):
        build(builder, *world.batch([(0, 1), (1, 1)])[3:])
