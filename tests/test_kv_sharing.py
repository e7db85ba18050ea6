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



@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_fast_prefill_readers_see_the_spans_their_targets_compacted_earlier_in_the_step(kernel):
    """``--kv-sharing-fast-prefill`` (You Only Cache Once): vLLM gives the trailing layers that read others' KV
    caches a backend of their own, whose builder (vLLM's ``create_fast_prefill_custom_backend`` around ours) sees one
    query row per request, at its last position. The owners' builder then compacts a step's completing spans after
    its own last layer, before those readers run: a reader's row at a span's end (a prompt whose chunk ends where
    its image ends) must read the compact form. Lossless ranks: each reader row equals the target's output on the
    same query (which read the exact pages) within float32 round-off: every key and value lies in a space of the
    ranks' dimension."""
    from dataclasses import replace

    from vllm.v1.attention.backends.utils import create_fast_prefill_custom_backend

    from ap_vllm.backend.attentionpack import AttentionPackBackend
    from ap_vllm.tools.testing.backend_world import fake_vllm_config

    cfg = dict(key_rank=8, value_rank=12, value_selection="full")
    g = torch.Generator().manual_seed(0)
    bases = {rank: torch.linalg.qr(torch.randn(HKV * 32, rank, generator=g))[0] for rank in (8, 12)}

    def within(x, rank):  # (x projected onto a fixed space of dimension rank)
        flat = x.reshape(len(x), -1)
        return (flat @ bases[rank] @ bases[rank].T).reshape(x.shape)

    owners = make_builder(kernel, HQ, HKV, [0, 1], kv_sharing=SHARING, **cfg)
    fast = create_fast_prefill_custom_backend("FastPrefill", AttentionPackBackend).get_builder_cls()
    readers = fast(owners.kv_cache_spec, [layer(2).layer_name],
                   fake_vllm_config({"kernel": kernel, **cfg}, HQ, HKV, 3, kv_sharing=SHARING, fast_prefill=True),
                   owners.device)
    impls = [make_impl(kernel, HQ, HKV, None, None, **cfg) for _ in (0, 1)]
    reader = make_impl(kernel, HQ, HKV, None, None, kv_sharing_target=0, **cfg)
    world = World(HQ, HKV, seed=5)
    world.request(0, (10, 150), 200)  # its first chunk ends inside the image, its second where the image ends
    world.request(1, (4, 126), 130)  # the image ends the prompt: its last row is sampled right there
    pages = {j: world.pages.clone() for j in (0, 1)}
    compacted = 0
    for step in ([(0, 100), (1, 130)], [(0, 60), (1, 1)], [(0, 40), (1, 1)], [(0, 1), (1, 1)]):
        q, k, v, common, requests = world.batch(step)
        k, v = within(k, 8), within(v, 12)
        last = common.query_start_loc_cpu[1:] - 1  # (the rows whose logits are sampled)
        shortened = replace(common, logits_indices_padded=last.to(q.device), num_logits_indices=len(step),
                            max_logits_per_req=1)
        md = build(owners, common, requests)
        target_out = None
        for j, impl in enumerate(impls):
            kv = world.kv_cache(pages[j])
            impl.do_kv_cache_update(layer(j), k, v, kv, common.slot_mapping)
            out = torch.full_like(q, float("nan"))
            impl.forward(layer(j), q, k, v, kv, md, out)  # (layer 1, the owners' last, compacts the step's spans)
            target_out = out if j == 0 else target_out
        compacted += md.compaction is not None
        read = build(readers, shortened, requests)
        out = torch.full_like(q[last], float("nan"))
        reader.forward(layer(2), q[last], None, None, world.kv_cache(pages[0]), read, out)
        torch.testing.assert_close(out, target_out[last], rtol=1e-4, atol=1e-4)
        world.poison_freed(owners, *pages.values())
    assert compacted == 2  # (request 1's span in the first step, request 0's in the second)
