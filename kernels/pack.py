"""Triton writer of a compacted span into the paged KV cache.

Layout: :mod:`ap_vllm.core.paged_layout`, whose ``pack_span(..., kernel=True)`` calls :func:`write_sections`
(its torch path is the reference).

Math: a pure scatter. For a section with rows x_i (``src_row_bytes`` meaningful bytes each), byte c of
row i goes to

    row-major:       dst[phys(section_block + i // rpb) * BB + (i % rpb) * row_bytes + c]
    sector-planar:   dst[phys(section_block + i // rpb) * BB + (c // 32) * rpb * 32 + (i % rpb) * 32 + c % 32]

(x_i[c] for c < src_row_bytes, 0 for the padding up to row_bytes), with phys(n) = block_ids[n].
Coefficients are quantised (FP8) or cast before the scatter, so every section is copied bytewise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ap_vllm.kernels.cache_abi import cache_bytes


@triton.jit
def _write_rows_kernel(dst_ptr, block_ids_ptr, src_ptr, num_rows, src_row_bytes, src_stride,
                       section_block, row_bytes, rows_per_block, block_bytes,
                       BLOCK_ROWS: tl.constexpr, BLOCK_B: tl.constexpr, PLANAR: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < num_rows
    blk = tl.load(block_ids_ptr + section_block + rows // rows_per_block, mask=rmask, other=0).to(tl.int64)
    if PLANAR:  # 32-byte sector c // 32 of every row of a block together
        dst = blk * block_bytes + (rows % rows_per_block).to(tl.int64) * 32
        col = (cols // 32).to(tl.int64) * rows_per_block * 32 + cols % 32
    else:
        dst = blk * block_bytes + (rows % rows_per_block).to(tl.int64) * row_bytes
        col = cols.to(tl.int64)
    src_mask = rmask[:, None] & (cols[None, :] < src_row_bytes)
    x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * src_stride + cols[None, :], mask=src_mask, other=0)
    tl.store(dst_ptr + dst[:, None] + col[None, :], x, mask=rmask[:, None] & (cols[None, :] < row_bytes))


def write_rows(kv_bytes: torch.Tensor, block_ids: torch.Tensor, src_bytes: torch.Tensor, section, block_bytes: int,
               block_rows: int | None = None, block_b: int | None = None) -> None:
    """Scatter the byte rows ``src_bytes`` [num_rows, src_row_bytes] into one section (tiles of about 8 KiB:
    128-byte column chunks of wide rows, more rows when they are narrow, e.g. 4-byte importance rows)."""
    n, nb = src_bytes.shape
    if n == 0:
        return
    block_b = block_b or min(128, max(16, triton.next_power_of_2(section.row_bytes)))
    block_rows = block_rows or max(64, 8192 // block_b)
    grid = (triton.cdiv(n, block_rows), triton.cdiv(section.row_bytes, block_b))
    _write_rows_kernel[grid](kv_bytes, block_ids, src_bytes, n, nb, src_bytes.stride(0), section.block,
                             section.row_bytes, section.rows_per_block, block_bytes,
                             BLOCK_ROWS=block_rows, BLOCK_B=block_b, PLANAR=section.planar)


def write_sections(kv_cache: torch.Tensor, block_ids: torch.Tensor, tensors: dict, sections: dict,
                   block_bytes: int) -> None:
    """Write each tensor of ``tensors`` (section name -> rows [num_rows, ...]) into its section of
    ``sections`` (name -> the layout's ``Section``: block, row bytes, rows per block, planar) in the physical
    blocks ``block_ids`` of ``kv_cache`` (any block-dense view), one launch per section."""
    kv_bytes = cache_bytes(kv_cache)
    block_ids = torch.as_tensor(block_ids, device=kv_cache.device).to(torch.int64).contiguous()
    for name, src in tensors.items():
        src = src.contiguous()
        if src.dim() == 1:
            src = src[:, None]
        rows = src.view(torch.uint8).reshape(src.shape[0], -1)
        write_rows(kv_bytes, block_ids, rows, sections[name], block_bytes)


__all__ = ["write_sections", "write_rows"]
