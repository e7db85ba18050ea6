"""Pre-RoPE key space: the rotation against vLLM's own, compaction and attention against dense."""

import pytest
import torch

from ap_vllm.core.compaction import compact_span, pad_ranks, relative_error
from ap_vllm.core.dense import dense_attention
from ap_vllm.core.lowrank_attention import attend_compacted, decode_step_cost
from ap_vllm.core.rope import RopeTable


def _vllm_rotary(**kw):
    """vLLM's own RotaryEmbedding (a CustomOp: built inside a vLLM config context)."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        return RotaryEmbedding(**kw)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotation_equals_vllm_rotary_embedding(neox, rotary_dim):
    from ap_vllm.core.rope import rope_from_vllm

    m = _vllm_rotary(head_size=64, rotary_dim=rotary_dim, max_position_embeddings=4096, base=10000.0,
                     is_neox_style=neox, dtype=torch.float32)
    rope = rope_from_vllm(m)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=gen)
    pos = torch.tensor([0, 1, 5, 100, 999, 2047, 4095])
    _, k = type(m).forward_static(pos, x.reshape(7, -1).clone(), x.reshape(7, -1).clone(), 64, rotary_dim,
                                  m.cos_sin_cache, neox)
    assert torch.allclose(rope.rotate(x, pos), k.reshape(7, 3, 64), atol=1e-6)
    back = rope.rotate(k.reshape(7, 3, 64), pos, inverse=True)
    assert torch.allclose(back, x, atol=1e-5)
    if rotary_dim < 64:  # pass-through columns untouched
        assert torch.equal(rope.rotate(x, pos)[..., rotary_dim:], x[..., rotary_dim:])


def test_from_base_equals_vllm_table():
    m = _vllm_rotary(head_size=128, rotary_dim=128, max_position_embeddings=512, base=1e6, is_neox_style=True,
                     dtype=torch.float32)
    assert torch.allclose(RopeTable.from_base(128, 1e6, max_positions=512).cos_sin, m.cos_sin_cache, atol=1e-6)


def test_rotary_with_its_own_forward_is_refused():
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from ap_vllm.core.rope import rope_from_vllm

    class MultiAxisRope(RotaryEmbedding):
        def forward_native(self, positions, query, key=None):  # a different rotation
            return query, key

    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        m = MultiAxisRope(64, 64, 128, 10000.0, True, torch.float32)
    with pytest.raises(ValueError, match=r"MultiAxisRope.*post_rope"):
        rope_from_vllm(m)


def test_positions_beyond_the_table_are_refused():
    rope = RopeTable.from_base(64, max_positions=100)
    with pytest.raises(ValueError, match="position 100 .*100 positions"):
        rope.rotate(torch.zeros(1, 1, 64), torch.tensor([100]))
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeTable(torch.zeros(10, 66), 64)


def _rotated_low_rank_keys(t, hkv, d, rank, start, rope, noise=0.01, seed=0):
    """Keys that are low-rank *before* RoPE (as W_k h of a low-dimensional h), then rotated."""
    gen = torch.Generator().manual_seed(seed)
    pre = (torch.randn(t, rank, generator=gen) @ torch.randn(rank, hkv * d, generator=gen)).reshape(t, hkv, d)
    pre = pre / pre.std() + noise * torch.randn(t, hkv, d, generator=gen)
    return rope.rotate(pre, torch.arange(start, start + t)), torch.randn(t, hkv, d, generator=gen)


@pytest.mark.parametrize("neox", [True, False])
def test_pre_rope_full_rank_reproduces_dense_attention(neox):
    """R_k = H*d in pre-RoPE space loses nothing: equal to dense attention on the rotated keys."""
    t, hkv, d, start = 150, 2, 64, 37
    rope = RopeTable.from_base(d, 10000.0, max_positions=1024, is_neox_style=neox)
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(t, hkv, d, generator=gen), torch.randn(t, hkv, d, generator=gen)
    q = torch.randn(3, 8, d, generator=gen)
    q_pos = torch.tensor([start + 10, start + t + 1, start + t + 5])  # one query sees only part of the span
    ref_o, ref_l = dense_attention(q, k, v, 0.125, q_pos, torch.arange(start, start + t), softcap=30.0)
    span = compact_span(k, v, hkv * d, hkv * d, start=start, rope=rope)
    o, lse = attend_compacted(q, span, 0.125, q_pos, softcap=30.0)
    assert torch.allclose(o, ref_o, atol=2e-5), (o - ref_o).abs().max()
    assert torch.allclose(lse, ref_l, atol=2e-5)
    k_back, _ = span.reconstruct()  # the stored factors rebuild the rotated keys
    assert relative_error(k_back, k) < 1e-5


def test_pre_rope_bf16_full_rank_within_bf16_tolerance():
    t, hkv, d = 128, 4, 32
    rope = RopeTable.from_base(d, 10000.0, max_positions=512)
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(t, hkv, d, generator=gen).bfloat16(), torch.randn(t, hkv, d, generator=gen).bfloat16()
    q = torch.randn(1, 8, d, generator=gen).bfloat16()
    ref, _ = dense_attention(q.float(), k.float(), v.float(), d ** -0.5, torch.tensor([t]), torch.arange(t))
    out, _ = attend_compacted(q, compact_span(k, v, hkv * d, hkv * d, rope=rope), d ** -0.5, torch.tensor([t]))
    assert relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("coefficient_dtype", ["model", "fp8_e4m3"])
def test_pre_rope_fits_keys_that_are_low_rank_before_rope(coefficient_dtype):
    """Keys of rank 16 before RoPE: post-RoPE compaction at R=16 is poor, pre-RoPE near exact."""
    t, hkv, d, r, start = 512, 2, 64, 16, 40
    rope = RopeTable.from_base(d, 10000.0, max_positions=2048)
    k, v = _rotated_low_rank_keys(t, hkv, d, r, start, rope)
    q = torch.randn(4, 4, d, generator=torch.Generator().manual_seed(3)) * 2
    q_pos = torch.full((4,), start + t + 3)
    ref, _ = dense_attention(q, k, v, d ** -0.5, q_pos, torch.arange(start, start + t))
    errs = {}
    for space, rp in (("post", None), ("pre", rope)):
        span = compact_span(k, v, r, hkv * d, start=start, rope=rp, coefficient_dtype=coefficient_dtype)
        errs[space] = relative_error(attend_compacted(q, span, d ** -0.5, q_pos)[0], ref)
    tol = 0.02 if coefficient_dtype == "model" else 0.1  # e4m3 keeps 3 mantissa bits per coefficient
    assert errs["pre"] < tol, errs
    assert errs["post"] > 5 * errs["pre"], errs


def test_pre_rope_two_level_keys_and_padding():
    """Two-level keys act on pre-RoPE coefficients: low-importance tokens read the first R/4;
    zero-padded ranks change nothing."""
    t, hkv, d, start = 96, 1, 64, 0
    rope = RopeTable.from_base(d, 10000.0, max_positions=256)
    k, v = _rotated_low_rank_keys(t, hkv, d, 32, start, rope, noise=0.0)
    span = compact_span(k, v, 32, 32, rope=rope, importance=torch.linspace(0, 1, t))
    q = torch.randn(1, 2, d, generator=torch.Generator().manual_seed(4))
    full, _ = attend_compacted(q, span, 0.125)
    same, _ = attend_compacted(q, pad_ranks(span, 48, 40), 0.125)
    assert torch.allclose(full, same, atol=1e-5)
    two, _ = attend_compacted(q, span, 0.125, threshold=0.75, two_level_keys=True, low_rank_divisor=4)
    # reference: rebuild keys with coefficients >= 8 zeroed for tokens below the threshold
    ck = span.coeff_k_float().clone()
    ck[span.importance < 0.75, 8:] = 0
    kk = rope.rotate((ck @ span.basis_k.float()).reshape(t, hkv, d), span.positions)
    cv = span.coeff_v_float().clone()
    cv[span.importance < 0.75, 8:] = 0
    vv = (cv @ span.basis_v.float()).reshape(t, hkv, d)
    ref, _ = dense_attention(q, kk, vv, 0.125, torch.tensor([t]), torch.arange(t))
    assert torch.allclose(two, ref, atol=1e-5)
    assert not torch.allclose(two, full, atol=1e-3)


def test_pre_rope_cost_same_bytes_more_flops():
    post = decode_step_cost(32768, 28, 4, 128, key_rank=64, value_rank=64, importance_fraction=0.25)
    pre = decode_step_cost(32768, 28, 4, 128, key_rank=64, value_rank=64, importance_fraction=0.25, pre_rope=True)
    assert pre.bytes_read == post.bytes_read
    # rebuilding keys: ~2*R_k*W per token on top of scores in head space
    assert pre.flops > 2 * 32768 * 64 * 512 > post.flops


# ---- scaled rotary tables (YaRN mscale: cos and sin both multiplied by m) --------------------
def _yarn_rotary(head_size=64, original=512, factor=4.0, neox=True):
    """vLLM's YaRN rotary embedding (cos/sin table scaled by mscale = 0.1 ln(factor) + 1)."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
              "rope_theta": 10000.0}
    with set_current_vllm_config(VllmConfig()):
        return get_rope(head_size, original, neox, params, torch.float32)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_inverse_rotation_is_exact_for_a_scaled_table(neox, rotary_dim):
    """rot(rot^-1(x)) == x == rot^-1(rot(x)) when cos^2 + sin^2 = m^2 != 1 (per position, even varying)."""
    plain = RopeTable.from_base(64, 10000.0, rotary_dim=rotary_dim, max_positions=300, is_neox_style=neox)
    m = torch.linspace(0.5, 1.7, 300)[:, None]  # a different scale at every position
    rope = RopeTable(plain.cos_sin * m, 64, neox)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 64, generator=gen)
    pos = torch.randint(0, 300, (40,), generator=gen)
    assert torch.allclose(rope.rotate(rope.rotate(x, pos, inverse=True), pos), x, atol=1e-5)
    assert torch.allclose(rope.rotate(rope.rotate(x, pos), pos, inverse=True), x, atol=1e-5)
    # rotated columns: the plain rotation times m, the inverse divides by m; pass-through columns untouched
    r, mp = rotary_dim, m[pos][:, :, None]
    assert torch.allclose(rope.rotate(x, pos)[..., :r], plain.rotate(x, pos)[..., :r] * mp, atol=1e-5)
    assert torch.allclose(rope.rotate(x, pos, inverse=True)[..., :r],
                          plain.rotate(x, pos, inverse=True)[..., :r] / mp, atol=1e-5)
    assert torch.equal(rope.rotate(x, pos, inverse=True)[..., r:], x[..., r:])


@pytest.mark.parametrize("neox", [True, False])
def test_yarn_pre_rope_full_rank_rebuilds_keys_and_scores(neox):
    """vLLM YaRN table (mscale ~ 1.14): keys compacted pre-RoPE at full rank rebuild the input keys,
    and span scores (rotate-after-rebuild) equal the dense scores."""
    from ap_vllm.core.lowrank_attention import span_scores
    from ap_vllm.core.rope import rope_from_vllm

    m = _yarn_rotary(neox=neox)
    rope = rope_from_vllm(m)
    mscale2 = (rope.cos_sin[:, :32].square() + rope.cos_sin[:, 32:].square()).mean()
    assert float(mscale2) > 1.2  # a scaled table: the unit-circle inverse would be off by m^2
    t, hkv, d, start = 120, 2, 64, 1500
    gen = torch.Generator().manual_seed(5)
    pre = torch.randn(t, hkv, d, generator=gen)
    pos = torch.arange(start, start + t)
    # keys rotated by vLLM itself, as the backend receives them
    _, k = type(m).forward_static(pos, pre.reshape(t, -1).clone(), pre.reshape(t, -1).clone(), d, d,
                                  m.cos_sin_cache, neox)
    k = k.reshape(t, hkv, d)
    assert torch.allclose(rope.rotate(pre, pos), k, atol=1e-5)
    assert torch.allclose(rope.rotate(k, pos, inverse=True), pre, atol=1e-5)
    v = torch.randn(t, hkv, d, generator=gen)
    span = compact_span(k, v, hkv * d, hkv * d, start=start, rope=rope)
    k_back, _ = span.reconstruct()
    assert relative_error(k_back, k) < 1e-5
    q = torch.randn(2, 4, d, generator=gen)
    dense = torch.einsum("nhd,thd->nht", q, k.repeat_interleave(2, dim=1)) * 0.125
    assert torch.allclose(span_scores(q, span, 0.125), dense, atol=1e-4, rtol=1e-5)
    q_pos = torch.tensor([start + t + 2, start + 60])
    ref_o, ref_l = dense_attention(q, k, v, 0.125, q_pos, pos)
    o, lse = attend_compacted(q, span, 0.125, q_pos)
    assert torch.allclose(o, ref_o, atol=2e-5) and torch.allclose(lse, ref_l, atol=2e-5)


def test_yarn_pre_rope_low_rank_keys_fit():
    """Keys low-rank before a scaled rotation: pre-RoPE compaction at that rank is near exact."""
    from ap_vllm.core.rope import rope_from_vllm

    rope = rope_from_vllm(_yarn_rotary())
    t, hkv, d, r, start = 256, 2, 64, 16, 700
    k, v = _rotated_low_rank_keys(t, hkv, d, r, start, rope, noise=0.0)
    span = compact_span(k, v, r, 8, start=start, rope=rope)
    assert relative_error(span.reconstruct()[0], k) < 1e-4
