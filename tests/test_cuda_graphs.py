"""CUDA-graph support of the backend, checked on CPU.

vLLM captures a full graph of a uniform single-token decode step per padded batch size and replays it for
later steps of that size: no Python runs at replay, the kernels read the persistent buffers as they are
now. So (1) the builder declares the support (kernel path), (2) its buffers keep their addresses across
steps of different batch sizes and hold each step's values, (3) every launch of a static decode step
depends only on those buffers' shapes and on host values fixed per padded size: the launches of two steps
with different contents are identical, argument for argument, and the second step's outputs are right, and
(4) a step whose one-token prompt chunk completes a span runs eagerly (it must compact in that step).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("triton")

from ap_vllm.tools.testing.backend_world import (StaticDecode, World, build, fake_vllm_config, layer,  # noqa: E402
                                                 make_builder, make_impl, run_step)
from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402

from ap_vllm.backend.metadata import AttentionPackMetadataBuilder  # noqa: E402


@pytest.mark.parametrize("kernel,expect", [("auto", AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE),
                                           ("triton", AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE),
                                           ("torch", AttentionCGSupport.NEVER)])
def test_declared_support(kernel, expect):
    vc = fake_vllm_config({"key_rank": 8, "value_rank": 8, "kernel": kernel}, 4, 2, 2)
    assert AttentionPackMetadataBuilder.get_cudagraph_support(vc, None) is expect


def test_buffers_stay_put_across_batch_sizes():
    """Static decode metadata lives in the same tensors whatever the batch size; each build writes its
    values there (padding rows: length 0, scratch lse slot)."""
    builder = make_builder("triton", 4, 2, [1], max_num_seqs=8)
    world = World(4, 2)
    world.request(0, (10, 150), 170)
    world.request(2, (4, 126), 140)
    build(builder, *world.batch([(0, 170), (1, 30), (2, 140), (3, 20), (4, 9)])[3:])
    key = builder.layer_keys[layer(1).layer_name]
    seen = {}
    for step in ([(0, 1), (1, 1)], [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)], [(2, 1), (4, 1), (0, 1)]):
        batch = world.batch(step)
        md = build(builder, *batch[3:])
        dec = md.decode
        assert dec.static and dec.num_rows == len(step) and md.prefill is None
        ptrs = {"seq_lens": dec.seq_lens.data_ptr(), "slot": dec.lse.slot.data_ptr(),
                "expect": dec.lse.expect.data_ptr(), "meta": dec.steps[key].plan.meta.data_ptr(),
                "num_spans": dec.steps[key].num_spans.data_ptr(),
                "seq_spans": dec.steps[key].plan.seq_spans.data_ptr()}
        for name, ptr in ptrs.items():
            assert seen.setdefault(name, ptr) == ptr, name
        assert dec.seq_lens.tolist() == [world.lens[r] for r, _ in step]
        assert dec.lse.slot.tolist() == [world.slots[r] for r, _ in step]
        with_spans = sum(r in (0, 2) for r, _ in step)
        assert int(dec.steps[key].num_spans) == with_spans
        assert dec.steps[key].plan.meta.shape[0] == builder._static[key].cap  # fixed capacity
        lse = md.lse_buffers[layer(1).layer_name]
        assert all(seen.setdefault(("lse", i), t.data_ptr()) == t.data_ptr() for i, t in enumerate(lse))
    # a padded batch (vLLM pads a graph's batch with zero-length rows): every row a decode row, padding length 0
    query, key_, value, common, requests = world.batch([(0, 1), (1, 1)])
    # vLLM: padding rows have no query token in query_start_loc, but the padded batch has a query row each
    qsl = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)
    seq = torch.tensor(common.seq_lens.tolist() + [7, 7], dtype=torch.int32)  # stale host values in padding
    table = torch.cat([common.block_table_tensor, torch.zeros(2, common.block_table_tensor.shape[1],
                                                              dtype=torch.int32)])
    padded = type(common)(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=4,
                          num_actual_tokens=4, max_query_len=1, max_seq_len=int(seq.max()), block_table_tensor=table,
                          slot_mapping=common.slot_mapping, seq_lens_cpu_upper_bound=seq)
    md = build(builder, padded, requests)
    assert md.decode.num_rows == 4 and md.decode.seq_lens.tolist()[2:] == [0, 0]
    assert md.decode.lse.slot.tolist()[2:] == [builder.capacity] * 2
    # the rows' queries and block table are vLLM's own persistent tensors (a gathered copy would be kept by a
    # captured graph and be stale at replay)
    assert md.decode.q_idx is None and md.decode.block_table.data_ptr() == table.data_ptr()


def test_one_token_chunk_completing_a_span_runs_eagerly():
    from ap_vllm.backend.channel import needs_eager_step

    builder = make_builder("triton", 4, 2, [1])
    mm = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=4, length=126))
    requests = {"a": SimpleNamespace(mm_features=[mm], num_prompt_tokens=140),
                "b": SimpleNamespace(mm_features=[], num_prompt_tokens=20)}
    group = SimpleNamespace(metadata_builders=[builder])
    runner = SimpleNamespace(requests=requests, attn_groups=[[group]],
                             input_batch=SimpleNamespace(req_ids=["a", "b"], num_computed_tokens_cpu=np.array([0, 25])),
                             vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=8)))
    end = builder._plans(builder_candidates(requests["a"]))[0].end
    for computed, scheduled, expect in ((end - 1, [1, 1], True),  # the span's last token alone: eager
                                        (end - 2, [1, 1], False),  # one token short of it
                                        (end - 1, [2, 1], False),  # not a uniform decode batch anyway
                                        (end + 5, [1, 1], False)):  # decoding past it
        runner.input_batch.num_computed_tokens_cpu = np.array([computed, 25])
        assert needs_eager_step(runner, 2, np.array(scheduled)) is expect, (computed, scheduled)


def builder_candidates(state):
    from ap_vllm.engine.spec import request_candidates

    return request_candidates(state.mm_features, state.num_prompt_tokens)


def _describe(x, persistent):
    """A launch argument as a captured graph holds it: tensors by shape, dtype, strides and, for storage
    that outlives the step (cache, block table, the builder's buffers, q/out), the address; temporaries made
    inside the step are the graph's own memory under capture, so only their shapes must match."""
    if isinstance(x, torch.Tensor):
        ptr = x.data_ptr()
        return ("tensor", tuple(x.shape), x.dtype, tuple(x.stride()), ptr if ptr in persistent else "temporary")
    if isinstance(x, (bool, int, float, str, type(None))):
        return x
    return repr(x)


@pytest.mark.parametrize("cfg", [{"threshold_sample_tokens": 48}, {"value_selection": "full"}])
def test_decode_steps_launch_the_same_kernels_whatever_the_batch(monkeypatch, cfg):
    """Two padded decode steps of 6 rows with different requests, lengths and span counts: every Triton
    launch of the layer's forward is the same, argument for argument (what a captured graph replays), and
    the second step's outputs equal the torch path's on its real rows. Importance selection launches the
    thresholds kernel first; value_selection 'full' does not, and its span kernel is the full-rank one."""
    import ap_vllm.kernels.lowrank_decode as ld

    log = []
    cls = type(ld._span_attn_kernel)
    orig = cls.run
    persistent: set = set()

    def run(self, *args, grid, warmup, **kwargs):
        log.append((getattr(self, "fn", self).__name__, tuple(grid), tuple(_describe(a, persistent) for a in args),
                    tuple(sorted((k, _describe(v, persistent)) for k, v in kwargs.items()))))
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    hq, hkv, rows = 4, 2, 6
    impls = {k: make_impl(k, hq, hkv, None, None, **cfg) for k in ("torch", "triton")}
    builders = {k: make_builder(k, hq, hkv, [1], max_num_seqs=8, **cfg) for k in ("torch", "triton")}
    world = World(hq, hkv, num_blocks=120)
    world.request(0, (10, 150), 170)
    world.request(2, (4, 126), 140)
    world.request(3, (20, 100), 130)
    pages = {k: world.pages.clone() for k in impls}
    for step in ([(0, 170), (1, 30)], [(2, 140), (3, 130)]):  # prefills (eager), spans compacted
        batch = world.batch(step)
        for k in impls:
            run_step(impls[k], world, pages[k], batch, build(builders[k], *batch[3:]))
    static = StaticDecode(world, rows, max_blocks=40)  # vLLM's persistent inputs of the padded batch
    records = []
    for step in ([(0, 1), (1, 1), (2, 1), (3, 1)], [(3, 1), (1, 1)]):
        batch = world.batch(step)
        n = len(step)
        md = build(builders["triton"], static.load(batch), batch[4])
        assert md.decode.static and md.decode.num_rows == rows
        dec, key_ = md.decode, builders["triton"].layer_keys[layer(1).layer_name]
        st = dec.steps[key_]
        persistent.clear()
        persistent.update(t.data_ptr() for t in (static.query, static.outputs[0], static.block_table, static.key,
                                                 static.value, static.slot_mapping, dec.seq_lens, dec.lse.slot,
                                                 dec.lse.expect, st.plan.meta, st.plan.seq_spans, st.num_spans,
                                                 pages["triton"], *md.lse_buffers[layer(1).layer_name]))
        log.clear()
        static.step([impls["triton"]], [layer(1)], [world.kv_cache(pages["triton"])], md)
        records.append(list(log))
        ref = run_step(impls["torch"], world, pages["torch"], batch, build(builders["torch"], *batch[3:]))
        out = static.outputs[0]
        torch.testing.assert_close(out[:n], ref, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(out[n:]).all(), out[n:]  # padding rows: finite (their output is dropped)
    a, b = records
    full = cfg.get("value_selection") == "full"
    assert [r[0] for r in a] == ["_span_thresholds_kernel"] * (not full) + [
        "_exact_decode_kernel", "_span_attn_kernel", "_merge_kernel"], [r[0] for r in a]
    span_kw = dict(next(r for r in a if r[0] == "_span_attn_kernel")[3])
    assert span_kw["FULL"] == full and span_kw["UPDATE"] == (not full) and span_kw["SCORE"] is False
    for ra, rb in zip(a, b):
        assert ra == rb, (ra[0], [(i, x, y) for i, (x, y) in enumerate(zip(ra[2], rb[2])) if x != y])


@pytest.mark.parametrize("cfg", [{"value_selection": "full"}, {"value_selection": "score"}])
def test_a_static_decode_step_launches_only_its_triton_kernels(cfg):
    """A layer's forward in a static decode step launches its Triton kernels and, with 'full' (the GPU default), no
    torch kernel: the span metadata and the decode instances come from the builder's persistent buffers (an op
    that launches a kernel, e.g. building the instances from meta each call, would add a launch per layer and
    step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import ap_vllm.kernels.lowrank_decode as ld

    free = {"view", "_unsafe_view", "empty", "slice", "select", "detach", "transpose", "permute", "unsqueeze",
            "as_strided", "alias", "expand", "t", "lift_fresh"}  # (no kernel: views and allocations)

    class Launches(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not getattr(ld, "_in_kernel", False) and func.__name__.split(".")[0] not in free:
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    impl = make_impl("triton", 4, 2, None, None, **cfg)
    builder = make_builder("triton", 4, 2, [1], max_num_seqs=8, **cfg)
    world = World(4, 2, num_blocks=120)
    world.request(0, (10, 150), 170)
    pages = world.pages
    batch = world.batch([(0, 170), (1, 30)])
    run_step(impl, world, pages, batch, build(builder, *batch[3:]))
    static = StaticDecode(world, 4, max_blocks=40)
    batch = world.batch([(0, 1), (1, 1)])
    md = build(builder, static.load(batch), batch[4])
    kv = world.kv_cache(pages)
    impl.forward(layer(1), static.query, None, None, kv, md, static.outputs[0])  # (kernels compiled)
    cls = type(ld._span_attn_kernel)
    orig = cls.run
    names = []

    def run(self, *args, **kwargs):  # the interpreter's own torch ops inside a kernel are not launches
        names.append(getattr(self, "fn", self).__name__)
        ld._in_kernel = True
        try:
            return orig(self, *args, **kwargs)
        finally:
            ld._in_kernel = False

    cls.run = run
    try:
        with Launches() as mode:
            impl.forward(layer(1), static.query, None, None, kv, md, static.outputs[0])
    finally:
        cls.run = orig
    assert names == ["_exact_decode_kernel", "_span_attn_kernel", "_merge_kernel"], names
    # score selection reads the previous step's lse from the layer's slot buffer and keeps this step's there
    # (ap_vllm.backend.channel): 4 + 2 small launches; 'full' keeps none
    lse_channel = ["index_select", "eq", "index_select", "scalar_tensor", "where", "index_copy_", "index_copy_"]
    assert [op.split(".")[0] for op in mode.ops] == (lse_channel if cfg["value_selection"] == "score" else []), \
        mode.ops
