"""Wide row moves (gather_rows / scatter_rows), the token-row KV writer and the one-gather span read: the
same bytes as the element-wise paths they replace (write_slots, gather_tokens, index_select)."""

import pytest
import torch

from ap_vllm.core.paged import (KV_FP8_DTYPE, gather_rows, gather_tokens, scatter_rows, split_kv_cache, wide_rows,
                                write_slots, write_token_rows)
from ap_vllm.core.paged_layout import gather_span_kv


def _bytes(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("cols,dtype,wide", [(4096, torch.uint8, torch.complex128), (1000, torch.uint8, torch.int64),
                                             (6, torch.bfloat16, torch.int32), (47, torch.uint8, torch.uint8)])
def test_row_gather_and_scatter_move_the_same_bytes(cols, dtype, wide):
    x = torch.randint(0, 255, (64, 4160), dtype=torch.uint8).view(dtype)[:, :cols]
    assert wide_rows(x).dtype == wide
    ids = torch.tensor([7, 3, 63, 0, 3])
    g = gather_rows(x, ids)
    assert g.dtype == x.dtype and g.shape == (5, cols) and torch.equal(_bytes(g), _bytes(x.index_select(0, ids)))
    y, z = x.clone(), x.clone()
    src = torch.randint(0, 255, (4, cols * x.element_size()), dtype=torch.uint8).view(dtype)
    scatter_rows(y, ids[:4], src)
    z.index_copy_(0, ids[:4], src)
    assert torch.equal(_bytes(y), _bytes(z))


@pytest.mark.parametrize("dtype,fp8", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_token_row_writer_stores_the_bytes_of_write_slots(dtype, fp8):
    nb, bs, hkv, d = 12, 16, 2, 32
    gen = torch.Generator().manual_seed(0)
    cdt = KV_FP8_DTYPE if fp8 else dtype
    pages = (torch.randn(nb, bs, hkv, 2 * d, generator=gen) * 3).to(cdt)
    key = torch.randn(9, hkv, d, generator=gen).to(dtype) * 40
    value = torch.randn(9, hkv, d, generator=gen).to(dtype) * 40
    slots = torch.tensor([17, -1, 5, 190, -1, 40, 41, 100, 3])
    scales = (0.5, 0.25) if fp8 else None
    for sl in (slots, torch.full((4,), -1)):  # a padding-only batch writes nothing
        a, b = pages.clone(), pages.clone()
        write_token_rows(a, key, value, sl, scales, toward_zero=True)
        kc, vc = split_kv_cache(b.transpose(1, 2), d)  # the [nb, H, bs, 2d] view vLLM hands the backend
        write_slots(kc, vc, key, value, sl, scales, toward_zero=True)
        assert torch.equal(_bytes(a), _bytes(b))
        assert torch.equal(_bytes(a), _bytes(pages)) == (sl.max() < 0)  # written unless padding only


def test_token_row_writer_changes_only_the_written_slots():
    pages = torch.zeros(4, 16, 1, 8)
    write_token_rows(pages, torch.ones(3, 1, 4), 2 * torch.ones(3, 1, 4), torch.tensor([5, -1, 33]))
    rows = pages.view(64, 8)
    written = (rows != 0).any(1).nonzero().flatten().tolist()
    assert written == [5, 33] and rows[5].tolist() == [1.0] * 4 + [2.0] * 4


@pytest.mark.parametrize("token_major", [False, True])
def test_span_gather_equals_gather_tokens(token_major):
    nb, bs, hkv, d = 40, 16, 2, 32
    gen = torch.Generator().manual_seed(1)
    if token_major:
        pages = torch.randn(nb, bs, hkv, 2 * d, generator=gen)
        cache = pages.view(nb, bs, hkv, 2, d).permute(0, 3, 1, 2, 4)
    else:
        cache = torch.randn(nb, 2, bs, hkv, d, generator=gen)
    row = torch.randperm(nb - 1, generator=gen)[:30] + 1
    for start, end in ((0, 16), (5, 300), (37, 38), (16, 480)):
        k, v = gather_span_kv(cache, row, start, end)
        assert torch.equal(k, gather_tokens(cache[:, 0].permute(0, 2, 1, 3), row, start, end))
        assert torch.equal(v, gather_tokens(cache[:, 1].permute(0, 2, 1, 3), row, start, end))
