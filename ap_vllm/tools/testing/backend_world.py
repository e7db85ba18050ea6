"""A paged world laid out as vLLM lays it out, driven through the backend's real metadata builder.

Used by the backend tests (CPU) and by ``benchmarks/backend_check.py`` (the same layer on CUDA).
Token-major pages ([blocks, block_size, Hkv, 2d] in memory, as vLLM allocates them for
KVCacheLayout.LBNHC) seen through the backend's logical [blocks, Hkv, block_size, 2d] view, scrambled
block tables, and per step the :class:`CommonAttentionMetadata` vLLM's runner would hand the builder,
with the requests' span candidates and slots as the runner hook hands them
(:class:`ap_vllm.backend.channel.StepRequests`).
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ap_vllm.backend.attentionpack import AttentionPackImpl
from ap_vllm.backend.channel import StepRequests
from ap_vllm.backend.metadata import AttentionPackMetadataBuilder
from ap_vllm.engine.spec import AttentionPackSpec, RequestSpans

BS, D = 16, 32


def layer(i: int) -> SimpleNamespace:
    return SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn")


def fake_vllm_config(cfg: dict, hq: int, hkv: int, num_layers: int, max_num_seqs: int = 8, head_size: int = D,
                     max_model_len: int = 1024, kv_sharing: Optional[dict] = None, fast_prefill: bool = False):
    """What the builder reads of a VllmConfig (the model config's counts, the scheduler's batch size, the
    attention layers that read another layer's KV cache: ``kv_sharing`` {layer index: target layer index}, and
    whether vLLM runs them on the sampled rows only, ``fast_prefill``: ``--kv-sharing-fast-prefill``)."""
    model = SimpleNamespace(get_total_num_hidden_layers=lambda: num_layers, get_num_kv_heads=lambda p: hkv,
                            get_total_num_kv_heads=lambda: hkv,
                            get_head_size=lambda: head_size, get_num_attention_heads=lambda p: hq, model="world", max_model_len=max_model_len,
                            hf_text_config=SimpleNamespace(sliding_window=None))
    layers = {layer(i).layer_name: torch.nn.Module() for i in range(num_layers)}
    for i, target in (kv_sharing or {}).items():
        layers[layer(i).layer_name].kv_sharing_target_layer_name = layer(target).layer_name
    return SimpleNamespace(additional_config={"attentionpack": cfg}, model_config=model,
                           parallel_config=SimpleNamespace(decode_context_parallel_size=1),
                           scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs), speculative_config=None,
                           compilation_config=SimpleNamespace(static_forward_context=layers),
                           cache_config=SimpleNamespace(kv_sharing_fast_prefill=fast_prefill))


def make_impl(kernel: str, hq: int, hkv: int, window: Optional[int], softcap: Optional[float], head_size: int = D,
              kv_sharing_target: Optional[int] = None, **cfg):
    from vllm.config import VllmConfig, set_current_vllm_config

    extra = {"attentionpack": {"key_rank": 8, "value_rank": 12, "kernel": kernel, **cfg}}
    target = None if kv_sharing_target is None else layer(kv_sharing_target).layer_name
    with set_current_vllm_config(VllmConfig(additional_config=extra)):
        return AttentionPackImpl(hq, head_size, 0.15 * (D / head_size) ** 0.5, hkv, None, window, "auto",
                                 logits_soft_cap=softcap, kv_sharing_target_layer_name=target)


def make_builder(kernel: str, hq: int, hkv: int, layer_ids, window: Optional[int] = None, num_layers: int = 3,
                 max_num_seqs: int = 8, head_size: int = D, dtype: torch.dtype = torch.float32, device="cpu",
                 max_model_len: int = 1024, kv_sharing: Optional[dict] = None, **cfg) -> AttentionPackMetadataBuilder:
    cfg = {"key_rank": 8, "value_rank": 12, "kernel": kernel, **cfg}
    if window is None:
        spec = AttentionPackSpec(block_size=BS, num_kv_heads=hkv, head_size=head_size, dtype=dtype)
    else:  # sliding-window layers: their own KV-cache group, never compacted
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=hkv, head_size=head_size, dtype=dtype,
                                 sliding_window=window)
    vc = fake_vllm_config(cfg, hq, hkv, num_layers, max_num_seqs, head_size, max_model_len, kv_sharing)
    return AttentionPackMetadataBuilder(spec, [layer(i).layer_name for i in layer_ids], vc, torch.device(device))


class World:
    """Requests, their block tables and lengths, and the pages (NaN where nothing was written) on ``device``;
    q/k/v are drawn on the host (one generator whatever the device) and moved there, or drawn on the device
    (``draw_on_device``: large worlds)."""

    def __init__(self, hq: int, hkv: int, num_blocks: int = 80, seed: int = 0, head_size: int = D,
                 dtype: torch.dtype = torch.float32, device="cpu", draw_on_device: bool = False):
        self.g = torch.Generator(device=device if draw_on_device else "cpu").manual_seed(seed)
        self.hq, self.hkv, self.d, self.dtype, self.device = hq, hkv, head_size, dtype, torch.device(device)
        self.pages = torch.full((num_blocks, BS, hkv, 2 * head_size), float("nan"), dtype=dtype, device=device)
        self.free = list(range(1, num_blocks))  # block 0: vLLM's null block
        random.Random(seed).shuffle(self.free)
        self.tables, self.lens = {}, {}
        self.requests: dict[int, RequestSpans] = {}  # span candidates (image ranges, prompt length)
        self.slots: dict[int, int] = {}
        # multimodal items attended both ways (vLLM's is_mm_prefix_lm), inclusive (start, end) per request
        self.items: dict[int, list[tuple[int, int]]] = {}

    def kv_cache(self, pages=None):
        return (self.pages if pages is None else pages).transpose(1, 2)

    def request(self, rid: int, image: Optional[tuple[int, int]], prompt: int) -> None:
        self.requests[rid] = RequestSpans(() if image is None else (image,), prompt)

    def batch(self, step, pad_to: Optional[int] = None):
        """Random q/k/v for ``step`` = [(rid, new tokens)] plus what vLLM's runner hands the builder:
        (query, key, value, CommonAttentionMetadata, StepRequests)."""
        qlens = [n for _, n in step]
        dev, dt = self.device, self.dtype
        draw = dict(generator=self.g, device=self.g.device)
        key = torch.randn(sum(qlens), self.hkv, self.d, **draw).to(dev, dt)
        value = torch.randn(sum(qlens), self.hkv, self.d, **draw).to(dev, dt)
        query = torch.randn(sum(qlens), self.hq, self.d, **draw).to(dev, dt)
        slots = []
        for rid, n in step:
            table = self.tables.setdefault(rid, [])
            old = self.lens.get(rid, 0)
            while len(table) * BS < old + n:
                table.append(self.free.pop())
            slots += [table[p // BS] * BS + p % BS for p in range(old, old + n)]
            self.lens[rid] = old + n
        rows = pad_to or len(step)
        table = torch.zeros(rows, max(len(self.tables[r]) for r, _ in step), dtype=torch.int32)
        for i, (rid, _) in enumerate(step):
            table[i, : len(self.tables[rid])] = torch.tensor(self.tables[rid])
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        seq = [self.lens[r] for r, _ in step]
        qsl_t, seq_t = torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl_t.to(dev), query_start_loc_cpu=qsl_t, seq_lens=seq_t.to(dev), num_reqs=len(step),
            num_actual_tokens=qsl[-1], max_query_len=max(qlens), max_seq_len=max(seq),
            block_table_tensor=table.to(dev), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            seq_lens_cpu_upper_bound=seq_t,
            mm_req_doc_ranges={i: self.items[r] for i, (r, _) in enumerate(step) if r in self.items} or None)
        for rid, _ in step:
            self.requests.setdefault(rid, RequestSpans((), self.lens[rid]))
            self.slots.setdefault(rid, len(self.slots))
        requests = StepRequests(tuple(f"req-{r}" for r, _ in step), tuple(self.requests[r] for r, _ in step),
                                np.array([self.slots[r] for r, _ in step], dtype=np.int64),
                                np.ones(len(step), dtype=np.int64))
        return query, key, value, common, requests

    def plans(self, builder: AttentionPackMetadataBuilder) -> dict:
        if builder.geometry is None:  # nothing compacted in this group
            return {}
        return {rid: builder._plans(req) for rid, req in self.requests.items()}

    def freed_blocks(self, builder: AttentionPackMetadataBuilder) -> list[int]:
        """Physical blocks of every span compacted so far that vLLM would have returned to the pool."""
        out = []
        for rid, plans in self.plans(builder).items():
            for p in plans:
                if self.lens.get(rid, 0) >= p.end:
                    lo, hi = p.freed_blocks
                    out += self.tables[rid][lo:hi]
        return out

    def poison_freed(self, builder: AttentionPackMetadataBuilder, *pages: torch.Tensor) -> None:
        """NaN into every freed block of ``pages``: whatever vLLM puts there next must never be read."""
        freed = self.freed_blocks(builder)
        if freed:
            ids = torch.tensor(freed, device=self.device)
            for pg in pages:
                pg.index_fill_(0, ids, float("nan"))


class StaticDecode:
    """vLLM's persistent inputs of a captured decode batch of ``rows`` rows (query, key, value, block table, slot
    mapping, query starts, lengths; one output per layer): :meth:`load` copies one step's decode batch into them
    and returns the padded CommonAttentionMetadata as vLLM's runner builds it for a full CUDA graph (padding
    rows: no query token, length 0, slot -1)."""

    def __init__(self, world: World, rows: int, max_blocks: int, num_layers: int = 1) -> None:
        dev, dt = world.device, world.dtype
        self.rows = rows
        self.query = torch.zeros(rows, world.hq, world.d, dtype=dt, device=dev)
        self.key = torch.zeros(rows, world.hkv, world.d, dtype=dt, device=dev)
        self.value = torch.zeros_like(self.key)
        self.outputs = [torch.zeros_like(self.query) for _ in range(num_layers)]
        self.block_table = torch.zeros(rows, max_blocks, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.zeros(rows + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=dev)

    def load(self, batch) -> CommonAttentionMetadata:
        query, key, value, common, _ = batch
        n, rows = common.num_reqs, self.rows
        if common.max_query_len != 1 or n > rows:
            raise ValueError(f"a static decode batch has at most {rows} rows of one query, got {n} rows with up "
                             f"to {common.max_query_len} queries")
        for buf, src in ((self.query, query), (self.key, key), (self.value, value)):
            buf[n:].zero_()
            buf[:n].copy_(src)
        self.block_table.zero_()
        self.block_table[:n, : common.block_table_tensor.shape[1]].copy_(common.block_table_tensor)
        self.slot_mapping.fill_(-1)
        self.slot_mapping[:n].copy_(common.slot_mapping)
        qsl = torch.tensor([min(i, n) for i in range(rows + 1)], dtype=torch.int32)
        seq = torch.tensor(common.seq_lens_cpu_upper_bound.tolist() + [0] * (rows - n), dtype=torch.int32)
        self.query_start_loc.copy_(qsl)
        self.seq_lens.copy_(seq)
        return type(common)(query_start_loc=self.query_start_loc, query_start_loc_cpu=qsl, seq_lens=self.seq_lens,
                            num_reqs=rows, num_actual_tokens=rows, max_query_len=1, max_seq_len=int(seq.max()),
                            block_table_tensor=self.block_table, slot_mapping=self.slot_mapping,
                            seq_lens_cpu_upper_bound=seq)

    def step(self, impls, layers, kv_caches, md) -> None:
        """One decode step of every layer on the persistent inputs (what a captured graph holds)."""
        for impl, lyr, kv, out in zip(impls, layers, kv_caches, self.outputs):
            impl.do_kv_cache_update(lyr, self.key, self.value, kv, self.slot_mapping)
            impl.forward(lyr, self.query, None, None, kv, md, out)
        for impl in impls[:1]:  # (the step's queued compactions, were its last layer not among these)
            impl.finish_step(md)


def build(builder: AttentionPackMetadataBuilder, common, requests):
    builder.set_step_requests(requests)
    try:
        return builder.build(0, common)
    finally:
        builder.set_step_requests(None)


def run_step(impl, world: World, pages, batch, md, lyr=None):
    """Cache write + forward of one layer, then poison what vLLM would have freed."""
    query, key, value, common, _ = batch
    lyr = lyr or layer(1)
    kv_cache = world.kv_cache(pages)
    impl.do_kv_cache_update(lyr, key, value, kv_cache, common.slot_mapping)
    output = torch.full_like(query, float("nan"))  # every row must be written
    impl.forward(lyr, query, key, value, kv_cache, md, output)
    impl.finish_step(md)  # the rest of the step: its last layer compacts what the step queued
    return output
