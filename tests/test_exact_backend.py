"""The exact paged path of the backend against dense attention on unpaged K/V.

Covers prefill, chunked prefill, decode and mixed batches, GQA, sliding windows, soft-capping,
block tables in scrambled order and padding slots. Tolerance: fp32 everywhere, 1e-5 absolute.
"""

import math
import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from ap_vllm.tools.testing.backend_world import fake_vllm_config  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from ap_vllm.backend.attentionpack import AttentionPackImpl  # noqa: E402
from ap_vllm.backend.metadata import AttentionPackMetadataBuilder  # noqa: E402
from ap_vllm.core.dense import dense_attention, merge_partials  # noqa: E402


@pytest.fixture(autouse=True)
def vllm_config_context():
    """The backend reads its configuration from the current VllmConfig, as inside vLLM."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


def naive_attention(q, k, v, scale, q_pos, k_pos, window=None, softcap=None):
    """Loop-per-head softmax attention: an independent oracle for dense_attention."""
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[:, h // (hq // hkv)].double(), v[:, h // (hq // hkv)].double()
        for i in range(q.shape[0]):
            s = (kh @ q[i, h].double()) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            ok = k_pos <= q_pos[i]
            if window is not None:
                ok &= (q_pos[i] - k_pos) < window
            s[~ok] = -math.inf
            out[i, h] = torch.softmax(s, 0) @ vh
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 30.0)])
def test_dense_attention_matches_naive(window, softcap):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 16, generator=g) for n, h in ((5, 4), (23, 2), (23, 2)))
    q_pos, k_pos = torch.arange(18, 23), torch.arange(23)
    out, lse = dense_attention(q, k, v, 0.25, q_pos, k_pos, window=window, softcap=softcap)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, 0.25, q_pos, k_pos, window, softcap),
                               atol=1e-5, rtol=1e-5)
    assert lse.shape == (4, 5) and torch.isfinite(lse).all()


def test_merge_partials_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    qp, kp = torch.arange(37, 40), torch.arange(40)
    full, lse_full = dense_attention(q, k, v, 0.3, qp, kp)
    parts = [dense_attention(q, k[a:b], v[a:b], 0.3, qp, kp[a:b]) for a, b in ((0, 11), (11, 30), (30, 40))]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_full, atol=1e-5, rtol=1e-5)


class PagedWorld:
    """A paged KV cache filled the way vLLM fills it, plus the unpaged truth."""

    def __init__(self, num_blocks, block_size, hkv, d, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.block_size, self.hkv, self.d = block_size, hkv, d
        # vLLM's logical per-layer view: [blocks, kv heads, block_size, 2*d]
        self.kv_cache = torch.full((num_blocks, hkv, block_size, 2 * d), float("nan"))
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)  # block tables in scrambled order
        self.tables, self.keys, self.values = {}, {}, {}

    def extend(self, rid, n):
        """New tokens for request rid: returns (k, v, slots) as vLLM would pass them."""
        k, v = torch.randn(n, self.hkv, self.d, generator=self.g), torch.randn(n, self.hkv, self.d, generator=self.g)
        old = self.keys.get(rid, torch.empty(0, self.hkv, self.d))
        table = self.tables.setdefault(rid, [])
        while len(table) * self.block_size < old.shape[0] + n:
            table.append(self.free.pop())
        pos = torch.arange(old.shape[0], old.shape[0] + n)
        slots = torch.tensor([table[p // self.block_size] * self.block_size + p % self.block_size for p in pos.tolist()])
        self.keys[rid] = torch.cat([old, k])
        self.values[rid] = torch.cat([self.values.get(rid, torch.empty(0, self.hkv, self.d)), v])
        return k, v, slots


@pytest.mark.parametrize("hq,hkv,window,softcap", [(4, 4, None, None), (8, 2, None, None), (6, 1, 5, None),
                                                    (4, 2, None, 20.0)])
def test_mixed_batch_matches_dense(hq, hkv, window, softcap):
    d, bs = 16, 16
    world = PagedWorld(num_blocks=64, block_size=bs, hkv=hkv, d=d)
    impl = AttentionPackImpl(hq, d, 0.2, hkv, None, window, "auto", logits_soft_cap=softcap)
    # history: request 0 fully prefilled (37 tokens), request 1 half prefilled (20 of 50)
    for rid, n in ((0, 37), (1, 20)):
        k, v, slots = world.extend(rid, n)
        impl.do_kv_cache_update(None, k, v, world.kv_cache, slots)
    # this step: r0 decodes 1 token, r1 prefills its next chunk of 30, r2 prefills 3 tokens (new)
    step = [(0, 1), (1, 30), (2, 3)]
    ks, vs, sl = zip(*(world.extend(rid, n) for rid, n in step))
    pad = 2  # padded batch: two padding tokens with slot -1
    key = torch.cat([*ks, torch.zeros(pad, hkv, d)])
    value = torch.cat([*vs, torch.zeros(pad, hkv, d)])
    slots = torch.cat([*sl, torch.full((pad,), -1)])
    impl.do_kv_cache_update(None, key, value, world.kv_cache, slots)
    qlens = [n for _, n in step]
    query = torch.randn(sum(qlens) + pad, hq, d, generator=world.g)
    width = max(len(t) for t in world.tables.values())
    table = torch.zeros(3, width, dtype=torch.int32)
    for rid, t in world.tables.items():
        table[rid, : len(t)] = torch.tensor(t)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    seq = torch.tensor([world.keys[r].shape[0] for r, _ in step], dtype=torch.int32)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=hkv, head_size=d, dtype=torch.float32, sliding_window=window)
    builder = AttentionPackMetadataBuilder(spec, ["model.layers.0.attn"], fake_vllm_config({"enabled": False, "key_rank": 4, "value_rank": 4}, hq, hkv, 1, head_size=d),
                                           torch.device("cpu"))
    meta = builder.build(0, CommonAttentionMetadata(
        query_start_loc=qsl_t, query_start_loc_cpu=qsl_t, seq_lens=seq, num_reqs=3, num_actual_tokens=qsl[-1],
        max_query_len=max(qlens), max_seq_len=int(seq.max()), block_table_tensor=table, slot_mapping=slots,
        seq_lens_cpu_upper_bound=seq))
    output = torch.full((query.shape[0], hq, d), float("nan"))
    impl.forward(SimpleNamespace(layer_name="model.layers.0.attn"), query, key, value, world.kv_cache, meta, output)
    for i, (rid, n) in enumerate(step):
        total = world.keys[rid].shape[0]
        expect = naive_attention(query[qsl[i]: qsl[i + 1]], world.keys[rid], world.values[rid], 0.2,
                                 torch.arange(total - n, total), torch.arange(total), window, softcap)
        torch.testing.assert_close(output[qsl[i]: qsl[i + 1]].double(), expect, atol=1e-5, rtol=1e-5)


def test_unsupported_features_are_refused():
    with pytest.raises(NotImplementedError, match="kv-cache-dtype fp8_e5m2 is not supported"):
        AttentionPackImpl(4, 64, 0.1, 4, None, None, "fp8_e5m2")
    with pytest.raises(NotImplementedError, match="ALiBi"):
        AttentionPackImpl(4, 64, 0.1, 4, [0.1] * 4, None, "auto")
