"""What the kernels assume about vLLM's paged cache and the compact form in it: the one contract between the
layout (:mod:`ap_vllm.core.paged_layout`, which defines and documents it) and the kernels that read and write
it. The kernel layer is the bottom of the package: this module imports nothing of ``ap_vllm.core``; the core
imports it.

* ``SECTOR_BYTES``: coefficient rows are padded to, and stored sector-planar in units of, 32-byte sectors;
* ``META_FIELDS`` / ``META``: the columns of the per-span int64 metadata the kernels read;
* :func:`block_contiguous` / :func:`cache_bytes`: a layer's cache as one byte row per block;
* ``HASH_*``: the integer hash of the sampled importance thresholds (32-bit values held in int64; every
  product < 2^63, so torch int64 (:func:`ap_vllm.core.lowrank_attention.sample_hash`) and the Triton kernel
  (:mod:`ap_vllm.kernels.thresholds`) compute the same bits).
"""

from __future__ import annotations

import torch

SECTOR_BYTES = 32

# Columns of the per-span int64 metadata tensor the decode kernel reads (see span_metadata).
META_FIELDS = ("seq", "start", "num_tokens", "key_rank", "value_rank", "key_rank_low", "value_rank_low",
               "storage_block", "blk_basis_k", "blk_basis_v", "blk_coeff_k", "blk_coeff_v", "blk_scale_k",
               "blk_scale_v", "blk_importance", "row_coeff_k", "row_coeff_v")
META = {name: i for i, name in enumerate(META_FIELDS)}

HASH_MASK = 0xFFFFFFFF
HASH_SEED_J, HASH_SEED_T, HASH_MUL_1, HASH_MUL_2 = 0x27D4EB2F, 0x165667B1, 0x7FEB352D, 0x2C1B3C6D


def block_contiguous(kv_cache: torch.Tensor) -> bool:
    """Whether every block of ``kv_cache`` (dim 0) is one dense byte range, blocks back to back.

    True for the contiguous ``[num_blocks, 2, block_size, Hkv, d]`` tensor and for strided views
    of it such as the one over vLLM's token-major cache (``KVCacheLayout.LBNHC``)::

        kv_cache.transpose(1, 2).view(nb, bs, H, 2, d).permute(0, 3, 1, 2, 4)
    """
    per_block = kv_cache[0].numel() if kv_cache.shape[0] else 0
    if kv_cache.shape[0] > 1 and kv_cache.stride(0) != per_block:
        return False
    expect = 1  # the inner dims, sorted by stride, must tile the block densely
    for stride, size in sorted((kv_cache.stride(i), kv_cache.shape[i]) for i in range(1, kv_cache.dim())
                               if kv_cache.shape[i] > 1):
        if stride != expect:
            return False
        expect *= size
    return True


def cache_bytes(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, BB] uint8 view of a layer's KV cache (shares memory).

    Accepts any view whose blocks are dense byte ranges (:func:`block_contiguous`); the bytes of
    block ``b`` are then the same whatever the view's dim order.
    """
    if not block_contiguous(kv_cache):
        raise ValueError(f"kv_cache view (shape {tuple(kv_cache.shape)}, strides {kv_cache.stride()}) does not "
                         "keep each block in one dense byte range")
    per_block = kv_cache[0].numel() if kv_cache.shape[0] else 0
    dense = kv_cache.as_strided((kv_cache.shape[0], per_block), (per_block, 1))
    return dense.view(torch.uint8)


__all__ = ["SECTOR_BYTES", "META_FIELDS", "META", "HASH_MASK", "HASH_SEED_J", "HASH_SEED_T", "HASH_MUL_1",
           "HASH_MUL_2", "block_contiguous", "cache_bytes"]
