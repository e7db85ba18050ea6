"""Cross-layer KV sharing (vLLM's ``kv_sharing_target_layer_name``: Gemma 3n, Gemma 4 E2B / E4B): a layer that reads
another layer's KV cache has no pages of its own; vLLM adds it to its target's KV-cache group and skips its cache
write. Its spans are the target's: laid out and compacted at the target's ranks, by the target alone (compacting
them twice would factorise the compact form as if it were exact KV), and with ``value_selection: ema`` their
importance is updated by the target alone. So the pages must end up as if the sharing layer did not exist, and
(selections that read no importance) a sharing layer given the target's query returns the target's output
exactly."""

import pytest
import torch

pytest.importorskip("vllm")

from ap_vllm.config import AttentionPackConfigError  # noqa: E402
from ap_vllm.tools.testing.backend_world import World, build, layer, make_builder, make_impl  # noqa: E402

HQ, HKV = 4, 2
SHARING = {2: 0}  # layer 2 reads layer 0's pages


@pytest.fixture
def calls(compaction_calls):
    return compaction_calls  # (conftest: the spans of each compact_spans call)


def test_a_sharing_layer_takes_its_targets_ranks_and_a_different_entry_is_refused():
    builder = make_builder("torch", HQ, HKV, [0, 1, 2], key_rank=[8, 6, 8], kv_sharing=SHARING)
    keys = builder.layer_keys
    assert keys[layer(2).layer_name] == keys[layer(0).layer_name] != keys[layer(1).layer_name]
    assert builder._last_layer == layer(2).layer_name  # it runs last: the step's compaction waits for its read
    with pytest.raises(AttentionPackConfigError, match=r"attentionpack.key_rank: layer 2 .* layer 0.* \(6\).*\(8\)"):
        make_builder("torch", HQ, HKV, [0, 1, 2], key_rank=[8, 8, 6], kv_sharing=SHARING)
    # without sharing the same list is a layer's own business
    assert make_builder("torch", HQ, HKV, [0, 1, 2], key_rank=[8, 8, 6]).layer_keys[layer(2).layer_name][0] == 6


def _run(world, impls, layers, pages, steps, builder, outputs):
    """Each step: the cache write of the layers with pages of their own, every layer's forward on its pages."""
    for step in steps:
        q, k, v, common, requests = batch = world.batch(step)
        md = build(builder, common, requests)
        outs = []
        for impl, j in zip(impls, layers):
            kv = world.kv_cache(pages[SHARING.get(j, j)])
            if impl.owns_pages:  # (vLLM skips a sharing layer's cache write)
                impl.do_kv_cache_update(layer(j), k, v, kv, common.slot_mapping)
            out = torch.full_like(q, float("nan"))
            impl.forward(layer(j), q, k, v, kv, md, out)
            outs.append(out)
        impls[0].finish_step(md)
        outputs.append(outs)
        world.poison_freed(builder, *pages.values())
        del batch


@pytest.mark.parametrize("selection", ["ema", "score", "full"])
def test_a_sharing_layer_reads_its_targets_spans_and_never_compacts_or_updates_them(calls, selection):
    cfg = dict(value_selection=selection, importance_fraction=0.5)
    steps = [[(0, 170), (1, 130)], [(0, 1), (1, 1)], [(0, 1), (1, 1)], [(0, 1), (1, 3)]]

    def world_and_pages():
        world = World(HQ, HKV, seed=3)
        world.request(0, (10, 150), 170)
        world.request(1, (4, 126), 130)
        return world, {j: world.pages.clone() for j in (0, 1)}

    world, pages = world_and_pages()
    impls = [make_impl("torch", HQ, HKV, None, None, **cfg) for _ in (0, 1)]
    impls.append(make_impl("torch", HQ, HKV, None, None, kv_sharing_target=0, **cfg))
    shared: list = []
    _run(world, impls, [0, 1, 2], pages, steps, make_builder("torch", HQ, HKV, [0, 1, 2], kv_sharing=SHARING, **cfg),
         shared)
    assert calls == [2 * 2]  # the two spans of layers 0 and 1, once: layer 2 queued nothing

    alone_world, alone_pages = world_and_pages()
    alone: list = []
    _run(alone_world, [make_impl("torch", HQ, HKV, None, None, **cfg) for _ in (0, 1)], [0, 1], alone_pages, steps,
         make_builder("torch", HQ, HKV, [0, 1], **cfg), alone)
    for j in (0, 1):  # compact forms and (ema) importances as without the sharing layer
        torch.testing.assert_close(pages[j], alone_pages[j], rtol=0, atol=0, equal_nan=True)
    for step, (with_sharing, without) in enumerate(zip(shared, alone)):
        assert not with_sharing[2].isnan().any()
        torch.testing.assert_close(with_sharing[0], without[0], rtol=0, atol=0)
        if selection != "ema":  # (ema: it reads the importance as the target's read has just updated it)
            torch.testing.assert_close(with_sharing[2], with_sharing[0], rtol=0, atol=0)  # the target's output
        if step:  # (layer 1 holds the same exact KV, compacted with another sketch seed: another output)
            assert not torch.equal(with_sharing[1], with_sharing[0]), step

