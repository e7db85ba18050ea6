"""Span planning: the rule that the scheduler (freeing blocks) and the backend share."""

import torch
from hypothesis import given, settings, strategies as st

from ap_vllm.config import parse_config
from ap_vllm.core.paged_layout import SpanLayout
from ap_vllm.core.spans import KVGeometry, candidate_spans, plan_span, plan_spans

GEO = KVGeometry(block_size=16, num_kv_heads=4, head_size=128, dtype=torch.bfloat16, num_layers=3)


def test_plan_blocks_follow_the_layout():
    cfg = parse_config({"key_rank": 64, "value_rank": 64})
    plan = plan_span(cfg, GEO, start=21, length=4096, kind="visual")
    assert (plan.start, plan.end, plan.first_block) == (21, 21 + 4096, 2)  # ceil(21 / 16)
    assert plan.inner_blocks == (21 + 4096) // 16 - 2
    layout = SpanLayout(4096, 64, 64, 4, 128, 16, torch.bfloat16)
    assert plan.storage_blocks == layout.num_blocks
    lo, hi = plan.freed_blocks
    assert (lo, hi) == (2 + layout.num_blocks, 2 + plan.inner_blocks) and plan.num_freed_blocks == hi - lo
    # 8x fewer numbers per token: the compact form takes about 1/8 of the span's blocks, plus the bases
    assert plan.inner_blocks / plan.storage_blocks > 6


def test_per_layer_ranks_size_storage_by_the_largest_layer():
    small = plan_span(parse_config({"key_rank": 32, "value_rank": 32}), GEO, 0 + 16, 2048, "visual")
    mixed = plan_span(parse_config({"key_rank": [32, 128, 32], "value_rank": 32}), GEO, 16, 2048, "visual")
    assert mixed.storage_blocks > small.storage_blocks


def test_sinks_short_spans_and_spans_that_free_nothing_stay_exact():
    cfg = parse_config({"key_rank": 64, "value_rank": 64, "sink_tokens": 8, "min_span_tokens": 64})
    plan = plan_span(cfg, GEO, start=0, length=1000, kind="visual")
    assert plan.start == 8 and plan.num_tokens == 992  # attention sinks stay exact
    assert plan_span(cfg, GEO, 100, 63, "visual") is None  # too short
    full = parse_config({"key_rank": 512, "value_rank": 512})
    assert plan_span(full, GEO, 100, 4096, "visual") is None  # full rank frees nothing
    assert plan_span(parse_config({"enabled": False}), GEO, 100, 4096, "visual") is None


def test_text_candidates_fill_gaps_between_images_and_spare_the_recent_window():
    cfg = parse_config({"compact_text": True, "text_min_tokens": 500, "text_recent_window": 100})
    cands = candidate_spans(cfg, [(200, 300)], num_prompt_tokens=1200)
    assert cands == [(0, 200, "text"), (200, 300, "visual"), (500, 600, "text")]  # text ends at 1200 - 100
    assert candidate_spans(cfg, [(200, 300)], num_prompt_tokens=400) == [(200, 300, "visual")]  # short prompt
    off = parse_config({})
    assert candidate_spans(off, [(10, 50)], 5000) == [(10, 50, "visual")]


def test_overlapping_placeholder_ranges_give_disjoint_spans():
    """Gemma 3's processor gives two adjacent images' placeholders one shared token (their "\\n\\n" wrappers,
    merged by its tokenizer): each token is compacted in one span only."""
    off = parse_config({})
    assert candidate_spans(off, [(1032, 1028), (5, 1028)], 2083) == [(5, 1028, "visual"), (1033, 1027, "visual")]
    assert candidate_spans(off, [(0, 100), (10, 50), (90, 20)], 500) == [(0, 100, "visual"), (100, 10, "visual")]
    cfg = parse_config({"key_rank": 64, "value_rank": 64})
    plans = plan_spans(cfg, GEO, [(5, 1028), (1032, 1028)], num_prompt_tokens=2083)
    assert len(plans) == 2 and plans[0].end <= plans[1].start
    text = parse_config({"compact_text": True, "text_min_tokens": 64, "text_recent_window": 0})
    assert candidate_spans(text, [(10, 50), (40, 30)], 200) == [(0, 10, "text"), (10, 50, "visual"),
                                                                (60, 10, "visual"), (70, 130, "text")]


def test_text_spans_use_their_own_ranks():
    cfg = parse_config({"compact_text": True, "text_min_tokens": 64, "text_recent_window": 0, "key_rank": 16,
                        "value_rank": 16, "text_key_rank": 256, "text_value_rank": 256})
    plans = plan_spans(cfg, GEO, [(1024, 2048)], num_prompt_tokens=4096)
    kinds = {p.kind: p for p in plans}
    assert set(kinds) == {"text", "visual"}
    per_token = {k: p.storage_blocks / p.num_tokens for k, p in kinds.items()}
    assert per_token["text"] > per_token["visual"] * 4


def test_min_freeing_span_is_the_threshold_of_the_plan():
    from ap_vllm.core.spans import min_freeing_span

    cfg = parse_config({"key_rank": 64, "value_rank": 64})
    n = min_freeing_span(cfg, GEO)
    start = 16  # first block boundary after the sinks
    assert plan_span(cfg, GEO, start, n, "visual") is not None
    assert plan_span(cfg, GEO, start, n - 1, "visual") is None
    big_blocks = KVGeometry(128, 4, 128, torch.bfloat16, 3)
    assert min_freeing_span(cfg, big_blocks) > n  # larger blocks need longer spans
    assert min_freeing_span(parse_config({"key_rank": 512, "value_rank": 512}), GEO) is None


def test_long_spans_are_cut_into_block_aligned_chunks():
    from ap_vllm.core.spans import split_span

    for start, length, chunk, bs in [(21, 65536, 8192, 16), (100, 1000, 256, 32), (0, 4097, 4096, 16),
                                     (7, 300, 64, 16)]:
        pieces = split_span(start, length, chunk, bs)
        assert pieces[0][0] == start and sum(n for _, n in pieces) == length
        assert all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:]))  # contiguous, in order
        assert all(a % bs == 0 for a, _ in pieces[1:])  # inner cuts on block boundaries
        assert len(pieces) == -(-length // chunk) and max(n for _, n in pieces) <= chunk + bs
    assert split_span(5, 8192, 8192, 16) == [(5, 8192)] and split_span(5, 10 ** 6, None, 16) == [(5, 10 ** 6)]


def test_a_long_video_plans_one_span_per_chunk():
    cfg = parse_config({"key_rank": 64, "value_rank": 64, "chunk_tokens": 4096})
    plans = plan_spans(cfg, GEO, [(30, 32768)], num_prompt_tokens=32900)
    assert len(plans) == 8 and plans[0].start == 30 and plans[-1].end == 30 + 32768
    assert all(p.end == q.start for p, q in zip(plans, plans[1:]))
    # no block is shared by two chunks, so the inner blocks of all chunks tile the span's inner blocks
    whole = plan_span(cfg, GEO, 30, 32768, "visual")
    assert sum(p.inner_blocks for p in plans) == whole.inner_blocks
    # each chunk carries its own bases: a little less freed than one span, still ~6x per chunk
    freed = sum(p.num_freed_blocks for p in plans)
    assert 0.9 * whole.num_freed_blocks < freed < whole.num_freed_blocks
    assert parse_config({"key_rank": 64, "value_rank": 64, "chunk_tokens": None}).chunk_tokens is None
    assert len(plan_spans(parse_config({"chunk_tokens": None}), GEO, [(30, 32768)], 32900)) == 1


def _simulated_peak(plans, num_tokens, bs, steps, lag_steps):
    """Blocks a request really holds at most when prefilled in ``steps`` (token counts), its spans'
    blocks freed once the step computing their end has been processed (``lag_steps`` steps later
    the scheduler sees it: 1 = synchronous, 2 = async scheduling)."""
    ends, x, peak = [0], 0, 0
    for n in steps:
        x = min(num_tokens, x + n)
        ends.append(x)
        processed = ends[max(0, len(ends) - 1 - lag_steps)]
        freed = sum(p.num_freed_blocks for p in plans if p.end <= processed)
        peak = max(peak, -(-x // bs) - freed)
        if x == num_tokens:
            break
    return peak


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_admission_reserve_covers_the_real_peak(data):
    """admission_blocks >= the most a request holds, for any step sizes <= the step budget."""
    from ap_vllm.core.spans import admission_blocks

    bs = data.draw(st.sampled_from([16, 32]))
    video = data.draw(st.integers(600, 12000))
    start = data.draw(st.integers(0, 200))
    tail = data.draw(st.integers(1, 300))
    chunk = data.draw(st.sampled_from([256, 512, 2048, None]))
    budget = data.draw(st.sampled_from([128, 512, 2048, 8192]))
    lag_steps = data.draw(st.sampled_from([1, 2]))
    cfg = parse_config({"key_rank": 64, "value_rank": 64, "chunk_tokens": chunk})
    n = start + video + tail
    plans = plan_spans(cfg, GEO, [(start, video)], n)
    reserve = admission_blocks(plans, n, bs if bs == GEO.block_size else GEO.block_size, budget * lag_steps)
    steps = data.draw(st.lists(st.integers(1, budget), min_size=-(-n // budget) * 4, max_size=-(-n // budget) * 4))
    steps += [budget] * (-(-n // budget))
    assert reserve >= _simulated_peak(plans, n, GEO.block_size, steps, lag_steps)
    assert reserve <= -(-n // GEO.block_size)


def test_admission_reserve_of_a_chunked_video_is_a_fraction_of_its_exact_size():
    from ap_vllm.core.spans import admission_blocks

    cfg = parse_config({"key_rank": 64, "value_rank": 64, "chunk_tokens": 4096})
    n = 64 + 65536 + 64
    plans = plan_spans(cfg, GEO, [(64, 65536)], n)
    exact = -(-n // 16)
    reserve = admission_blocks(plans, n, 16, lag_tokens=2048)
    real = _simulated_peak(plans, n, 16, [2048] * 40, lag_steps=1)
    assert real <= reserve <= real + 2048 // 16  # within one step of the peak of full-size steps
    assert reserve < exact / 4  # ~one chunk + one step exact, the rest compact
    # without chunks the whole span is exact at its last step: nothing to save at admission
    whole = plan_spans(parse_config({"key_rank": 64, "value_rank": 64, "chunk_tokens": None}), GEO, [(64, 65536)], n)
    assert admission_blocks(whole, n, 16, lag_tokens=2048) == exact
    # a running request: blocks already in its row (some freed) are accounted for
    mid = admission_blocks(plans, n, 16, 2048, held_blocks=2000, freed_blocks=1500)
    assert 2000 <= mid <= exact


def test_lifetime_blocks_is_the_larger_of_prefill_peak_and_last_token():
    import torch

    from ap_vllm.config import AttentionPackConfig
    from ap_vllm.core.spans import KVGeometry, admission_blocks, lifetime_blocks, plan_spans

    cfg = AttentionPackConfig(key_rank=16, value_rank=16, chunk_tokens=512)
    geo = KVGeometry(16, 2, 64, torch.float32, 2)
    plans = plan_spans(cfg, geo, [(20, 4096)], 4127)
    freed = sum(p.num_freed_blocks for p in plans)
    prefill = admission_blocks(plans, 4127, 16, 512)
    # short answer: the prefill peak (chunks in flight) dominates
    assert lifetime_blocks(plans, 4127, 4127 + 16, 16, 512) == prefill > -(-4143 // 16) - freed
    # long answer: the last token does
    assert lifetime_blocks(plans, 4127, 4127 + 4000, 16, 512) == -(-8127 // 16) - freed > prefill
    # never more than the exact KV, and no spans: exactly the exact KV
    assert lifetime_blocks(plans, 4127, 4143, 16, 512) < -(-4143 // 16)
    assert lifetime_blocks([], 3000, 3016, 16, 512) == -(-3016 // 16)
