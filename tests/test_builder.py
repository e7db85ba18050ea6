"""The metadata builder's refusals and bookkeeping (no kernels run)."""

import pytest
import torch

pytest.importorskip("vllm")

from ap_vllm.tools.testing.backend_world import World, build, fake_vllm_config, make_builder  # noqa: E402

from ap_vllm.backend.metadata import AttentionPackMetadataBuilder  # noqa: E402


def test_ngram_verification_rows_are_other_rows_and_draft_models_are_refused():
    """With ngram drafts a verification row (the last token and 3 drafts, after a compacted span) is one of the
    other rows, its span read at full rank and nothing completing; a row without drafts stays a decode row. A
    draft model this backend does not plan (MTP) is refused when the builder is made (at start-up), naming it and
    what is allowed."""
    from types import SimpleNamespace

    from ap_vllm.engine.spec import AttentionPackSpec

    spec = AttentionPackSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    vc = fake_vllm_config({"key_rank": 8, "value_rank": 8}, 4, 2, 2)
    vc.speculative_config = SimpleNamespace(method="draft_model")
    with pytest.raises(ValueError, match="method 'draft_model' is not allowed.*allowed: 'ngram', 'eagle', 'eagle3', "
                                         "'mtp'"):
        AttentionPackMetadataBuilder(spec, ["model.layers.0.attn"], vc, torch.device("cpu"))
    vc.speculative_config = SimpleNamespace(method="ngram")
    AttentionPackMetadataBuilder(spec, ["model.layers.0.attn"], vc, torch.device("cpu"))
    builder = make_builder("torch", 4, 2, [1])
    world = World(4, 2)
    for rid in (0, 1):
        world.request(rid, (4, 126), 140)
    build(builder, *world.batch([(0, 140), (1, 140)])[3:])  # the prompts: their spans complete, then compacted
    md = build(builder, *world.batch([(0, 1), (1, 4)])[3:])
    assert md.decode.num_rows == 1 and md.decode.seq_lens.tolist() == [141]
    assert md.prefill.seq_lens.tolist() == [144] and md.prefill.max_query_len == 4 and md.prefill.q_slice == slice(1, 5)
    (step,) = [st for key, st in md.prefill.steps.items() if key is not None]
    assert len(step.spans) == 1 and step.spans[0].threshold is None and not step.completing


def test_an_eagle_drafters_layers_are_planned_by_the_drafters_builder():
    """An EAGLE drafter's layer (numbered after the model's 3) shares the model's KV-cache group: the runner's
    builder of that group lists it but plans (and compacts after) the model's layers only; the drafter's own
    builder plans its layer: the same spans completing and compacted, compacted at the end of the drafter's layer,
    decode rows at full rank whatever the configured selection (``value_selection: score`` here), and in passes
    after the first the device's sequence lengths, not the host's upper bounds."""
    model = make_builder("torch", 4, 2, [0, 1, 2, 3], value_selection="score")
    drafter = make_builder("torch", 4, 2, [3], value_selection="score")
    assert not model.drafter and drafter.drafter
    assert sorted(model.layer_keys) == [f"model.layers.{i}.self_attn.attn" for i in range(3)]
    assert list(drafter.layer_keys) == ["model.layers.3.self_attn.attn"]
    world = World(4, 2)
    world.request(0, (4, 126), 140)
    common, requests = world.batch([(0, 140)])[3:]
    for builder, last in ((model, 2), (drafter, 3)):
        builder.set_step_requests(requests)
        md = builder.build_for_drafting(common, 0) if builder.drafter else builder.build(0, common)
        assert md.compaction.last_layer == f"model.layers.{last}.self_attn.attn"
        (step,) = [st for key, st in md.prefill.steps.items() if key is not None]
        assert [(p.start, p.end) for _, p, _ in step.completing] == [(4, 130)]
    common, requests = world.batch([(0, 1)])[3:]
    common.seq_lens_cpu_upper_bound = common.seq_lens_cpu_upper_bound + 3  # (every draft assumed accepted)
    drafter.set_step_requests(requests)
    md = drafter.build_for_drafting(common, 1)
    assert md.value_selection == "full" and md.decode.seq_lens.tolist() == [141]
    (step,) = [st for key, st in md.decode.steps.items() if key is not None]
    assert step.has_spans and step.batched.num_spans == 1 and step.batched.query_pos.tolist() == [140]
    model.set_step_requests(requests)
    assert model.build(0, common).value_selection == "score"


def test_an_mtp_heads_layer_numbered_from_zero_is_the_drafters():
    """vLLM names an MTP head's layers ``mtp.layers.{i}`` (Qwen3.5), numbered from 0 beside the model's: they count
    after the model's layers, so the runner's builder of the shared group leaves the head's layer to the head's own
    builder, which plans it (and compacts after it) as a drafter's, at the model's last layer's ranks."""
    from ap_vllm.config import layer_index

    assert layer_index("mtp.layers.0.self_attn.attn", 4) == 4 and layer_index("mtp.layers.1.self_attn.attn", 4) == 5
    assert layer_index("language_model.model.layers.1.self_attn.attn", 4) == 1
    assert layer_index("model.layers.4.self_attn.attn", 4) == 4  # (an EAGLE head's: vLLM numbers it so itself)
    names = [f"language_model.model.layers.{i}.self_attn.attn" for i in (1, 3)] + ["mtp.layers.0.self_attn.attn"]
    vc = fake_vllm_config({"key_rank": [8, 8, 8, 4], "value_rank": 8}, 4, 2, 4)
    vc.compilation_config.static_forward_context.update({name: torch.nn.Module() for name in names})
    spec = make_builder("torch", 4, 2, [0]).kv_cache_spec
    model = AttentionPackMetadataBuilder(spec, names, vc, torch.device("cpu"))
    head = AttentionPackMetadataBuilder(spec, names[2:], vc, torch.device("cpu"))
    assert not model.drafter and sorted(model.layer_keys) == names[:2] and model._last_layer == names[1]
    assert head.drafter and list(head.layer_keys) == names[2:] and head._last_layer == names[2]
    assert head.layer_keys[names[2]] == model.layer_keys[names[1]]  # (ranks past the list: the last layer's)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_rows_are_planned_once_per_step(kernel):
    """Mixed batch: decode rows, a prefill chunk, a span completing; the builder says which is which and
    what each layout key compacts after this step."""
    builder = make_builder(kernel, 4, 2, [1])
    world = World(4, 2)
    world.request(1, (4, 126), 140)
    build(builder, *world.batch([(0, 20), (1, 120), (2, 5)])[3:])
    md = build(builder, *world.batch([(0, 1), (1, 10), (2, 1)])[3:])
    assert md.decode.num_rows == 2 and md.decode.q_idx.tolist() == [0, 11]
    assert md.prefill.q_slice == slice(1, 11) and md.prefill.seq_lens.tolist() == [130]
    (row, plan, layout), = md.prefill.steps[builder.layer_keys["model.layers.1.self_attn.attn"]].completing
    assert (plan.start, plan.end) == (4, 130) and layout.num_tokens == 126
    md = build(builder, *world.batch([(0, 1), (1, 1), (2, 1)])[3:])  # all decode: span 1 compacted
    assert md.prefill is None and md.decode.num_rows == 3
    step = md.decode.steps[builder.layer_keys["model.layers.1.self_attn.attn"]]
    assert step.has_spans
    if kernel == "torch":
        assert step.batched is not None and step.plan is None
    else:
        assert md.decode.static and int(step.num_spans) == 1 and step.plan.spans[0].seq == 1
        # the static plan's rows per block (from the configuration: what its captured launch may assume) are the
        # ones of the span it holds
        assert step.plan.rows_per_block == tuple(sorted(set(step.plan.spans[0].layout.coeff_rows_per_block)))


def test_text_spans_read_their_values_at_full_rank_unless_asked():
    """The two-level read applies to visual spans; text spans (compact_text) read every value component
    unless text_two_level (a threshold-less PagedSpan: its metadata row and the batched path read full rank)."""
    from ap_vllm.backend.metadata import _two_level
    from ap_vllm.config import parse_config

    cfg = parse_config({"compact_text": True})
    assert _two_level(cfg, "visual") == 0.0 and _two_level(cfg, "text") is None
    cfg = parse_config({"compact_text": True, "text_two_level": True})
    assert _two_level(cfg, "text") == 0.0
    cfg = parse_config({"compact_text": True, "text_two_level": True, "importance_fraction": 1.0})
    assert _two_level(cfg, "visual") is None and _two_level(cfg, "text") is None
    cfg = parse_config({"value_selection": "score", "importance_fraction": 1.0})
    assert _two_level(cfg, "visual") == 0.0 and _two_level(cfg, "text") is None


def test_a_model_may_clear_the_image_ranges_of_some_layers():
    """Gemma 4 (``use_bidirectional_attention: vision``) attends images both ways on its sliding layers only: its
    forward sets ``mm_prefix_range_tensor`` to None in the metadata of its global layers, as vLLM's backends name
    their image ranges. Ours is the prefill rows' reach: cleared, those layers attend causally. Anything but None is
    refused (the ranges come from the builder)."""
    builder = make_builder("torch", 4, 2, [1])
    world = World(4, 2)
    world.request(0, (10, 150), 170)
    world.items = {0: [(10, 159)]}
    md = build(builder, *world.batch([(0, 170)])[3:])
    assert md.mm_prefix_range_tensor is md.prefill.reach and md.prefill.reach is not None
    assert hasattr(md, "mm_prefix_range_tensor")  # (what the model looks for)
    with pytest.raises(ValueError, match="may only clear"):
        md.mm_prefix_range_tensor = torch.zeros(3)
    md.mm_prefix_range_tensor = None
    assert md.prefill.reach is None and md.mm_prefix_range_tensor is None
