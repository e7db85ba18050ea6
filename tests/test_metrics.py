"""AttentionPack metrics on vLLM's own ``/metrics`` of a real ``vllm serve``.

Two servers on a tiny Idefics3 VLM (1024 image tokens, 2 layers, 2 kv heads x 64, fp32, block 16 / 32):
compaction on (R = 16 for keys and values) and ``{"enabled": false}``. After two image chats the
counters of the first must match the span plans of the prompts the server actually saw
(``plan_span`` on the image placeholder run of ``prompt_token_ids``); the second (AttentionPack steps
aside, vLLM's own backend serves) exports none; vLLM's own metrics must still be there.

The first tests (no server) check the pieces: the ``SchedulerStats`` field survives vLLM's
engine-to-API-server serialization, the engine side reports deltas, the stat logger exports them.
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

import torch  # noqa: E402

from ap_vllm.config import parse_config  # noqa: E402
from ap_vllm.core.spans import KVGeometry, plan_span  # noqa: E402
from ap_vllm.tools.testing.server import VllmServer, image_data_url, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import FAKE, build_tiny_vlm  # noqa: E402

IMAGE_TOKENS, LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 1024, 2, 2, 64, 16
ON = {"key_rank": 16, "value_rank": 16}
OFF = {"enabled": False}
OURS = ("tokens_compacted_total", "blocks_freed_total", "bytes_saved", "compaction_ratio")
VLLM_OWN = ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
            "vllm:request_success_total")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=IMAGE_TOKENS, num_layers=LAYERS,
                          num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def servers(model):
    """Both servers, started side by side."""
    with running({name: VllmServer(model, extra_args=[
            "--attention-backend", "attentionpack", "--block-size", str(block),
            "--additional-config", json.dumps({"attentionpack": cfg})])
            for name, cfg, block in (("on", ON, BLOCK), ("off", OFF, 32))}  # (off: vLLM's CPU backend, blocks of 32)
    ) as servers:
        yield servers


def samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of ``name`` in Prometheus text."""
    return [(m.group(1) or "", float(m.group(2)))
            for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([-+0-9.einfa]+)$", text, re.M)]


def value(text: str, name: str) -> float:
    found = samples(text, name)
    assert found, f"{name} missing from /metrics"
    return sum(v for _, v in found)


def image_chat(server, seed: int) -> list[int]:
    """One greedy image chat; returns the prompt token ids the server used."""
    r = server.client().chat.completions.create(
        model=server.model_name, max_tokens=4, temperature=0.0, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(seed=seed)}},
            {"type": "text", "text": "Describe the image."}]}])
    ids = r.model_dump().get("prompt_token_ids")
    assert ids, "the server did not return prompt_token_ids"
    return ids


def expected(model, prompt_ids: list[int]) -> tuple[int, int, int, int]:
    """(tokens compacted, blocks freed, span blocks, compact blocks) of one single-image prompt."""
    from transformers import AutoTokenizer

    fake = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids(FAKE)
    where = [i for i, t in enumerate(prompt_ids) if t == fake]
    start, length = where[0], where[-1] + 1 - where[0]  # the placeholder run, wrappers included
    assert length == IMAGE_TOKENS + 3
    plan = plan_span(parse_config(ON), KVGeometry(BLOCK, KV_HEADS, HEAD_DIM, torch.float32, LAYERS),
                     start, length, "visual")
    assert plan is not None and plan.num_freed_blocks > 0
    return plan.num_tokens, plan.num_freed_blocks, plan.inner_blocks, plan.storage_blocks


def wait_for(server, name: str, target: float, timeout: float = 30.0) -> str:
    """/metrics text once ``name`` reached ``target`` (stats arrive with the engine's next step)."""
    end = time.monotonic() + timeout
    while True:
        text = server.metrics()
        if value(text, name) >= target or time.monotonic() > end:
            return text
        time.sleep(0.5)


@pytest.fixture
def plugin():
    from ap_vllm.plugin import register

    register()


def test_scheduler_stats_field_survives_serialization(plugin):
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from ap_vllm.selection import SCHEDULER_STATS_FIELD as STATS_FIELD

    assert getattr(SchedulerStats(), STATS_FIELD) is None
    stats = SchedulerStats(num_running_reqs=3)
    setattr(stats, STATS_FIELD, {"blocks_freed": 50.0})
    decoder = MsgpackDecoder(EngineCoreOutputs)
    out = decoder.decode(MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))).scheduler_stats
    assert getattr(out, STATS_FIELD) == {"blocks_freed": 50.0} and out.num_running_reqs == 3
    out = decoder.decode(MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=SchedulerStats()))).scheduler_stats
    assert getattr(out, STATS_FIELD) is None


def test_engine_side_reports_deltas(plugin):
    from ap_vllm.engine import metrics
    from ap_vllm.engine.scheduler import EngineState
    from ap_vllm.engine.spec import AttentionPackSpec

    spec = AttentionPackSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["l0", "l1"])])
    state = EngineState(block_bytes=metrics.block_bytes(kv_cache_config))
    assert state.block_bytes == spec.page_size_bytes * 2
    # on every worker: 2 tensor-parallel ranks x (this stage's 2 of the model's 6 layers)
    parallel = SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=3)
    model = SimpleNamespace(get_total_num_hidden_layers=lambda: 6, get_num_layers=lambda p: 2)
    assert metrics.block_bytes(kv_cache_config, SimpleNamespace(model_config=model, parallel_config=parallel)) == \
        spec.page_size_bytes * 2 * 2 * 3
    assert metrics.take_engine_stats(state) is None
    state.tokens_compacted, state.blocks_freed = 1023, 50
    state.span_blocks, state.compact_blocks = 63, 13
    assert metrics.take_engine_stats(state) == {
        "tokens_compacted": 1023.0, "blocks_freed": 50.0, "bytes_saved": 50.0 * spec.page_size_bytes * 2,
        "compaction_ratio": 63 / 13, "span_cache_queries": 0.0, "span_cache_hits": 0.0, "span_cache_tokens": 0.0}
    assert metrics.take_engine_stats(state) is None  # already reported
    # compact spans looked up in the prefix cache, found, and their tokens
    state.span_queries, state.span_hits, state.span_tokens_reused = 4, 3, 3000
    delta = metrics.take_engine_stats(state)
    assert (delta["span_cache_queries"], delta["span_cache_hits"], delta["span_cache_tokens"],
            delta["blocks_freed"]) == (4.0, 3.0, 3000.0, 0.0)
    state.span_tokens_reused += 1000  # one more hit's tokens alone: reported
    assert metrics.take_engine_stats(state)["span_cache_tokens"] == 1000.0
    state.tokens_compacted, state.blocks_freed = 2046, 100
    state.span_blocks, state.compact_blocks = 126, 26
    assert metrics.take_engine_stats(state)["blocks_freed"] == 50.0
    # another engine's state reports its own counts
    other = EngineState(block_bytes=state.block_bytes)
    other.tokens_compacted, other.blocks_freed = 10, 1
    assert metrics.take_engine_stats(other)["blocks_freed"] == 1.0


def test_stat_logger_exports_only_for_attentionpack(plugin):
    from prometheus_client import REGISTRY
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from ap_vllm.engine.metrics import AttentionPackStatLogger, _unregister_ours
    from ap_vllm.selection import SCHEDULER_STATS_FIELD as STATS_FIELD

    def config(backend):
        return SimpleNamespace(attention_config=SimpleNamespace(backend=backend),
                               model_config=SimpleNamespace(served_model_name="m"))

    def sample(name, engine):
        return REGISTRY.get_sample_value(f"attentionpack:{name}", {"model_name": "m", "engine": str(engine)})

    try:
        assert not AttentionPackStatLogger(config(None), [0]).enabled
        assert sample("blocks_freed_total", 0) is None
        logger = AttentionPackStatLogger(config(AttentionBackendEnum.CUSTOM), [0, 1])
        assert sample("blocks_freed_total", 0) == 0.0 and sample("compaction_ratio", 1) == 0.0
        stats = SimpleNamespace(**{STATS_FIELD: {"tokens_compacted": 1023.0, "blocks_freed": 50.0,
                                                 "bytes_saved": 4096.0, "compaction_ratio": 4.5}})
        logger.record(stats, None, engine_idx=1)
        logger.record(stats, None, engine_idx=1)
        logger.record(SimpleNamespace(**{STATS_FIELD: None}), None, engine_idx=1)
        logger.record(None, None, engine_idx=0)
        assert sample("tokens_compacted_total", 1) == 2046.0 and sample("blocks_freed_total", 1) == 100.0
        assert sample("bytes_saved", 1) == 8192.0 and sample("compaction_ratio", 1) == 4.5
        assert sample("blocks_freed_total", 0) == 0.0
        AttentionPackStatLogger(config(AttentionBackendEnum.CUSTOM), [0])  # a second engine in one process
        assert sample("blocks_freed_total", 1) is None and sample("blocks_freed_total", 0) == 0.0
    finally:
        _unregister_ours()


@pytest.mark.e2e
def test_counters_match_span_plans(servers, model):
    on = servers["on"]
    before = on.metrics()
    for name in OURS:  # registered at 0 before any request
        assert value(before, f"attentionpack:{name}") == 0.0
    plans = [expected(model, image_chat(on, seed)) for seed in (0, 1)]
    tokens, blocks, span_blocks, compact_blocks = (sum(p[i] for p in plans) for i in range(4))
    text = wait_for(on, "attentionpack:blocks_freed_total", blocks)

    assert value(text, "attentionpack:tokens_compacted_total") == tokens > 0
    assert value(text, "attentionpack:blocks_freed_total") == blocks > 0
    page_bytes = 2 * BLOCK * KV_HEADS * HEAD_DIM * 4  # K and V, fp32, one layer
    assert value(text, "attentionpack:bytes_saved") == blocks * page_bytes * LAYERS
    assert value(text, "attentionpack:compaction_ratio") == pytest.approx(span_blocks / compact_blocks)
    assert span_blocks / compact_blocks > 1
    # the same labels as vLLM's metrics
    labels = samples(text, "attentionpack:blocks_freed_total")[0][0]
    assert 'engine="0"' in labels and f'model_name="{on.model_name}"' in labels
    for name in VLLM_OWN:
        value(text, name)
    assert value(text, "vllm:request_success_total") >= 2
    assert "# TYPE attentionpack:blocks_freed_total counter" in text
    assert "# TYPE attentionpack:bytes_saved gauge" in text


@pytest.mark.e2e
def test_no_counters_with_compaction_disabled(servers):
    """Compaction off: AttentionPack steps aside (vLLM's own backend serves), so it exports nothing."""
    off = servers["off"]
    for seed in (0, 1):
        image_chat(off, seed)
    text = wait_for(off, "vllm:request_success_total", 2)
    assert value(text, "vllm:request_success_total") >= 2
    for name in OURS:
        assert not samples(text, f"attentionpack:{name}")
    for name in VLLM_OWN:
        value(text, name)
