"""AttentionPackManager on vLLM's real block pool: blocks freed as spans compact, and what the
full-sequence admission gate is told (a request's peak, plus what compacting prefills in flight
still need); the scheduler's engine state, one per scheduler, handed to its managers."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

BS = 16


@pytest.fixture(scope="module")
def plugin_registered():
    from ap_vllm.plugin import register

    register()


@pytest.fixture
def state():
    from ap_vllm.config import AttentionPackConfig
    from ap_vllm.engine.scheduler import EngineState

    return EngineState(config=AttentionPackConfig(key_rank=8, value_rank=8, chunk_tokens=256), num_layers=2,
                       step_lag_tokens=256)


@pytest.fixture
def manager(state):
    from vllm.v1.core.block_pool import BlockPool

    from ap_vllm.engine.kv_manager import AttentionPackManager
    from ap_vllm.engine.spec import AttentionPackSpec

    spec = AttentionPackSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32)
    pool = BlockPool(num_gpu_blocks=400, enable_caching=False, hash_block_size=BS)
    m = AttentionPackManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                             scheduler_block_size=BS)
    m.attach(state)
    return m


def _add(m, rid, visual, prompt):
    from ap_vllm.engine.spec import RequestSpans

    m.state.requests[rid] = RequestSpans(tuple(visual), prompt)


def _admission(m, rid, num_tokens):
    return m.get_num_blocks_to_allocate(rid, num_tokens, [], 0, 0, num_tokens, apply_admission_cap=True)


def _prefill(m, rid, upto):
    """Allocate slots up to ``upto`` tokens and mark them processed (spans ending there compact)."""
    m.allocate_new_blocks(rid, upto, upto)
    m.remove_skipped_blocks(rid, upto, m.state.requests[rid].num_prompt_tokens)


def _freed(m, rid):
    from ap_vllm import compat

    null = compat.null_block(m)
    return sum(b is null for b in m.req_to_blocks[rid])


def test_chunks_free_blocks_and_the_gate_reserves_prefills_in_flight(manager, state):
    m = manager
    prompt = 16 + 1024 + 32  # text, a 1024-token image (4 chunks of 256), text
    _add(m, "a", [(16, 1024)], prompt)
    exact = -(-prompt // BS)
    peak = _admission(m, "a", prompt)
    assert 0 < peak < exact  # the gate sees what the request holds at most, not its whole length
    assert _admission(m, "b", prompt) == exact  # b unknown (no spans recorded): exact, and nothing in flight

    _prefill(m, "a", 16 + 256)  # first chunk prefilled: it compacts, its inner blocks go back
    row = m.req_to_blocks["a"]
    assert state.blocks_freed > 0
    assert _freed(m, "a") == state.blocks_freed
    assert m.block_pool.get_num_free_blocks() == 400 - 1 - (len(row) - state.blocks_freed)

    # a new request's gate also leaves what a's prefill still needs (its peak minus its row so far)
    _add(m, "b", [(16, 1024)], prompt)
    in_flight = m._peak_blocks("a", prompt) - len(row)
    assert in_flight > 0
    assert _admission(m, "b", prompt) == peak + in_flight
    # ... but not for a's own continuation (a is not new)
    assert _admission(m, "a", prompt) == m._peak_blocks("a", prompt) - len(row)

    _prefill(m, "a", prompt)  # prefill done: every chunk compacted, nothing more to reserve for a
    assert "a" not in m._compacting
    assert _admission(m, "b", prompt) == peak
    freed_a = _freed(m, "a")
    assert freed_a == state.blocks_freed and freed_a > exact // 2
    assert state.tokens_compacted > 0 and state.span_blocks > state.compact_blocks > 0

    m.free("a")  # finished: everything back, and no state left behind
    assert m.block_pool.get_num_free_blocks() == 400 - 1
    assert "a" not in m._plans and "a" not in m._compacting


def test_requests_without_spans_are_plain_full_attention(manager):
    m = manager
    _add(m, "t", [], 300)
    assert _admission(m, "t", 300) == -(-300 // BS)
    _prefill(m, "t", 300)
    assert not _freed(m, "t")
    assert not m._compacting


def test_a_manager_without_engine_state_frees_nothing(manager, state):
    from vllm.v1.core.block_pool import BlockPool

    from ap_vllm.engine.kv_manager import AttentionPackManager

    prompt = 16 + 1024 + 32
    _add(manager, "a", [(16, 1024)], prompt)  # recorded in the state, which this manager is not given
    m = AttentionPackManager(manager.kv_cache_spec, block_pool=BlockPool(num_gpu_blocks=400, enable_caching=False,
                                                                         hash_block_size=BS),
                             enable_caching=False, kv_cache_group_id=0, scheduler_block_size=BS)
    assert m.state is None
    assert _admission(m, "a", prompt) == -(-prompt // BS)
    m.allocate_new_blocks("a", prompt, prompt)
    m.remove_skipped_blocks("a", prompt, prompt)
    assert not _freed(m, "a") and state.blocks_freed == 0


class _SchedulerBase:
    """What AttentionPack's scheduler mixin builds on in vLLM's Scheduler, with vLLM's real KV cache manager."""

    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        from vllm.v1.core.kv_cache_manager import KVCacheManager

        self.kv_cache_config = kv_cache_config
        self.kv_cache_manager = KVCacheManager(kv_cache_config, max_model_len=4096, scheduler_block_size=BS,
                                               hash_block_size=BS, enable_caching=False)
        self.freed = []

    def add_request(self, request) -> None:
        pass

    def _free_request(self, request, delay_free_blocks: bool = False):
        self.freed.append(request.request_id)
        return None, None

    def make_stats(self):
        return SimpleNamespace(attentionpack=None)


def _vllm_config(section, num_layers=2):
    model = SimpleNamespace(max_model_len=4096, dtype=torch.float32, model="m", uses_mrope=False,
                            hf_text_config=SimpleNamespace(sliding_window=None),
                            get_total_num_hidden_layers=lambda: num_layers, get_num_layers=lambda p: num_layers,
                            get_num_kv_heads=lambda p: 2, get_total_num_kv_heads=lambda: 2, get_head_size=lambda: 64)
    return SimpleNamespace(additional_config={"attentionpack": section}, model_config=model,
                           parallel_config=SimpleNamespace(data_parallel_size=1, decode_context_parallel_size=1,
                                                           tensor_parallel_size=1),
                           scheduler_config=SimpleNamespace(max_num_batched_tokens=256, async_scheduling=False),
                           cache_config=SimpleNamespace(block_size=BS))


def _kv_cache_config(num_layers=2):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from ap_vllm.engine.spec import AttentionPackSpec

    spec = AttentionPackSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32)
    return KVCacheConfig(num_blocks=400, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec([f"l{i}" for i in range(num_layers)], spec)])


def _request(rid, visual, prompt):
    feature = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=visual[0], length=visual[1]))
    return SimpleNamespace(request_id=rid, mm_features=[feature], num_prompt_tokens=prompt)


def test_engine_state_belongs_to_one_scheduler(plugin_registered):
    """Each scheduler owns one EngineState and hands it to the AttentionPack managers of its own KV
    cache manager: two schedulers (two engines in one process) do not share requests or counts."""
    from ap_vllm import compat
    from ap_vllm.engine.kv_manager import AttentionPackManager
    from ap_vllm.engine.scheduler import AttentionPackSchedulerMixin
    from ap_vllm.selection import SCHEDULER_STATS_FIELD

    class Scheduler(AttentionPackSchedulerMixin, _SchedulerBase):
        pass

    section = {"key_rank": 8, "value_rank": 8, "chunk_tokens": 256}
    one, two = (Scheduler(_vllm_config(section), _kv_cache_config()) for _ in range(2))
    assert one.attentionpack_state is not two.attentionpack_state
    assert one.attentionpack_state.config.chunk_tokens == 256 and one.attentionpack_state.num_layers == 2
    managers = {}
    for name, s in (("one", one), ("two", two)):
        (m,) = compat.kv_cache_managers(s.kv_cache_manager)
        assert isinstance(m, AttentionPackManager) and m.state is s.attentionpack_state
        managers[name] = m

    prompt = 16 + 1024 + 32
    one.add_request(_request("a", (16, 1024), prompt))
    assert "a" in one.attentionpack_state.requests and "a" not in two.attentionpack_state.requests
    _prefill(managers["one"], "a", 16 + 256)
    freed = one.attentionpack_state.blocks_freed
    assert freed > 0 and two.attentionpack_state.blocks_freed == 0
    stats = one.make_stats()
    assert getattr(stats, SCHEDULER_STATS_FIELD)["blocks_freed"] == float(freed)
    assert getattr(two.make_stats(), SCHEDULER_STATS_FIELD) is None
    assert one.attentionpack_state.block_bytes == managers["one"].kv_cache_spec.page_size_bytes * 2

    one._free_request(_request("a", (16, 1024), prompt))  # vLLM frees the finished request
    assert one.freed == ["a"] and "a" not in one.attentionpack_state.requests


def test_start_up_check_asks_for_the_compacted_peak_only_when_told():
    """vLLM's start-up check asks each layer's spec for the memory of the longest request: by
    default max_model_len exact tokens; with pool_check 'compacted' a max_model_len video at its
    compacted peak (and that peak bounds what any such request holds)."""
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from ap_vllm.engine.kv_manager import request_blocks_needed
    from ap_vllm.engine.spec import AttentionPackSpec

    spec = AttentionPackSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32)

    def vllm_config(section):
        model = SimpleNamespace(max_model_len=4400, dtype=torch.float32, model="m", uses_mrope=False,
                                hf_text_config=SimpleNamespace(sliding_window=None), get_total_num_hidden_layers=lambda: 2,
                                get_num_kv_heads=lambda p: 2, get_total_num_kv_heads=lambda: 2, get_head_size=lambda: 64)
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
