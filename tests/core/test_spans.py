"""Span planning: the rule that the scheduler (freeing blocks) and the backend share."""

import torch

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
