"""AttentionPackManager on vLLM's real block pool: blocks freed as spans compact, and what the
full-sequence admission gate is told (a request's peak, plus what compacting prefills in flight
still need)."""

import pytest
import torch

pytest.importorskip("vllm")

BS = 16


@pytest.fixture
def manager(monkeypatch):
    from vllm.v1.core.block_pool import BlockPool

    from ap_vllm.backend.kv_manager import REQUEST_SPANS, AttentionPackManager, AttentionPackSpec
    from ap_vllm.config import AttentionPackConfig

    monkeypatch.setattr(REQUEST_SPANS, "config", AttentionPackConfig(key_rank=8, value_rank=8, chunk_tokens=256))
    monkeypatch.setattr(REQUEST_SPANS, "num_layers", 2)
    monkeypatch.setattr(REQUEST_SPANS, "step_lag_tokens", 256)
    monkeypatch.setattr(REQUEST_SPANS, "requests", {})
    for name in ("tokens_compacted", "blocks_freed", "span_blocks", "compact_blocks"):
        monkeypatch.setattr(REQUEST_SPANS, name, 0)
    spec = AttentionPackSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32)
    pool = BlockPool(num_gpu_blocks=400, enable_caching=False, hash_block_size=BS)
    return AttentionPackManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                scheduler_block_size=BS)


def _add(rid, visual, prompt):
    from ap_vllm.backend.kv_manager import REQUEST_SPANS, RequestSpans

    REQUEST_SPANS.requests[rid] = RequestSpans(tuple(visual), prompt)


def _admission(m, rid, num_tokens):
    return m.get_num_blocks_to_allocate(rid, num_tokens, [], 0, 0, num_tokens, apply_admission_cap=True)


def _prefill(m, rid, upto):
    """Allocate slots up to ``upto`` tokens and mark them processed (spans ending there compact)."""
    m.allocate_new_blocks(rid, upto, upto)
    m.remove_skipped_blocks(rid, upto, _prompt(rid))


def _prompt(rid):
    from ap_vllm.backend.kv_manager import REQUEST_SPANS

    return REQUEST_SPANS.requests[rid].num_prompt_tokens


def test_chunks_free_blocks_and_the_gate_reserves_prefills_in_flight(manager):
    from ap_vllm.backend.kv_manager import REQUEST_SPANS

    m = manager
    prompt = 16 + 1024 + 32  # text, a 1024-token image (4 chunks of 256), text
    _add("a", [(16, 1024)], prompt)
    exact = -(-prompt // BS)
    peak = _admission(m, "a", prompt)
    assert 0 < peak < exact  # the gate sees what the request holds at most, not its whole length
    assert _admission(m, "b", prompt) == exact  # b unknown (no spans recorded): exact, and nothing in flight

    _prefill(m, "a", 16 + 256)  # first chunk prefilled: it compacts, its inner blocks go back
    row = m.req_to_blocks["a"]
    assert REQUEST_SPANS.blocks_freed > 0
    assert sum(b is m._null_block for b in row) == REQUEST_SPANS.blocks_freed
    assert m.block_pool.get_num_free_blocks() == 400 - 1 - (len(row) - REQUEST_SPANS.blocks_freed)

    # a new request's gate also leaves what a's prefill still needs (its peak minus its row so far)
    _add("b", [(16, 1024)], prompt)
    in_flight = m._peak_blocks("a", prompt) - len(row)
    assert in_flight > 0
    assert _admission(m, "b", prompt) == peak + in_flight
    # ... but not for a's own continuation (a is not new)
    assert _admission(m, "a", prompt) == m._peak_blocks("a", prompt) - len(row)

    _prefill(m, "a", prompt)  # prefill done: every chunk compacted, nothing more to reserve for a
    assert "a" not in m._compacting
    assert _admission(m, "b", prompt) == peak
    freed_a = sum(b is m._null_block for b in m.req_to_blocks["a"])
    assert freed_a == REQUEST_SPANS.blocks_freed and freed_a > exact // 2

    m.free("a")  # finished: everything back, and no state left behind
    assert m.block_pool.get_num_free_blocks() == 400 - 1
    assert "a" not in m._plans and "a" not in m._compacting


def test_requests_without_spans_are_plain_full_attention(manager):
    m = manager
    _add("t", [], 300)
    assert _admission(m, "t", 300) == -(-300 // BS)
    _prefill(m, "t", 300)
    assert not any(b is m._null_block for b in m.req_to_blocks["t"])
    assert not m._compacting


def test_start_up_check_asks_for_the_compacted_peak_only_when_told():
    """vLLM's start-up check asks each layer's spec for the memory of the longest request: by
    default max_model_len exact tokens; with pool_check 'compacted' a max_model_len video at its
    compacted peak (and that peak bounds what any such request holds)."""
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from ap_vllm.backend.kv_manager import AttentionPackSpec, request_blocks_needed

    spec = AttentionPackSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32)

    def vllm_config(section):
        model = SimpleNamespace(max_model_len=4400, dtype=torch.float32, model="m", uses_mrope=False,
                                hf_text_config=SimpleNamespace(sliding_window=None), get_num_layers=lambda p: 2,
                                get_num_kv_heads=lambda p: 2, get_head_size=lambda: 64)
        return SimpleNamespace(additional_config={"attentionpack": section}, model_config=model,
                               parallel_config=SimpleNamespace(data_parallel_size=1, decode_context_parallel_size=1),
                               scheduler_config=SimpleNamespace(max_num_batched_tokens=512, async_scheduling=True),
                               cache_config=SimpleNamespace(block_size=BS))

    ranks = {"key_rank": 16, "value_rank": 16, "chunk_tokens": 512}
    exact = FullAttentionSpec.max_memory_usage_bytes(spec, vllm_config(ranks))
    assert spec.max_memory_usage_bytes(vllm_config(ranks)) == exact == 275 * spec.page_size_bytes
    compacted = spec.max_memory_usage_bytes(vllm_config({**ranks, "pool_check": "compacted"}))
    assert compacted % spec.page_size_bytes == 0 and compacted < exact / 2
    # a 4096-token image request of that length needs no more than the video the check sized the pool for
    feature = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=20, length=4096))
    need, exact_blocks = request_blocks_needed(vllm_config({**ranks, "pool_check": "compacted"}),
                                               parse(ranks), [feature], 4127, 16)
    assert need <= compacted // spec.page_size_bytes < exact_blocks == 259
    # text is not compacted: its need is its exact size
    need, exact_blocks = request_blocks_needed(vllm_config(ranks), parse(ranks), [], 3000, 16)
    assert need == exact_blocks == 189


def parse(section):
    from ap_vllm.config import parse_config

    return parse_config(section)
