"""vLLM's paged KV cache, as this backend sees it (torch reference ops).

One layer's cache is the tensor vLLM hands to the backend, logically
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``: for block ``b``, head ``h`` and
in-block offset ``o``, ``[..., :head_size]`` is the key and ``[..., head_size:]`` the value
of the token stored in slot ``b * block_size + o``. A request's token at position ``p``
lives in block ``block_table[p // block_size]`` at offset ``p % block_size``.

FP8 KV cache (``--kv-cache-dtype fp8``): the pages hold float8 e4m3 numbers and the layer has one
scale per K and per V (vLLM's ``layer._k_scale_float`` / ``_v_scale_float``, 1.0 unless the checkpoint
or ``--calculate-kv-scales`` sets them), exactly as vLLM's own backends store them::

    stored = e4m3(clamp(x / scale, -448, 448))        read = float(stored) * scale

saturating at the largest finite e4m3 value. The rounding is the one of the device's own vLLM writer:
to nearest even on CUDA (``reshape_and_cache_flash``), toward zero on CPU (CPU_ATTN's
``cpu_attn_reshape_and_cache`` drops the extra mantissa bits), so that a request's pages hold the same
bytes as with vLLM's own backend there. :func:`kv_quantize` / :func:`kv_dequantize` are the two
directions; every reader of exact tokens dequantizes what it gathers.
"""

from __future__ import annotations

from typing import Optional

import torch

from .compaction import FP8_DTYPE as KV_FP8_DTYPE  # the e4m3 of FP8 coefficients, one definition

FP8_E4M3_MAX = 448.0

KVScales = Optional[tuple[float, float]]  # (k_scale, v_scale) of an FP8 cache; None: the model dtype


def kv_quantize(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, toward_zero: bool = False) -> torch.Tensor:
    """``x`` as the cache stores it: cast to ``dtype``, or for FP8 scaled, saturated and rounded to e4m3 (to
    nearest even; ``toward_zero``: the largest e4m3 magnitude not above ``|x / scale|``, as CPU_ATTN)."""
    if dtype != KV_FP8_DTYPE:
        return x.to(dtype)
    y = (x.float() / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = y.to(KV_FP8_DTYPE)
    if not toward_zero:
        return q
    # e4m3 codes are ordered by magnitude within a sign: one code down where rounding went up
    code = q.view(torch.uint8).to(torch.int16)
    mag = code & 0x7F
    up = (q.float().abs() > y.abs()) & (mag > 0)
    return ((code & 0x80) | torch.where(up, mag - 1, mag)).to(torch.uint8).view(KV_FP8_DTYPE)


def kv_dequantize(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Tokens read from the cache in a computable dtype: FP8 -> float32 times ``scale``; others unchanged."""
    if x.dtype != KV_FP8_DTYPE:
        return x
    return x.float() * scale


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[num_blocks, num_kv_heads, block_size, head_size]`` of one layer."""
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


_WIDE = ((16, torch.complex128), (8, torch.int64), (4, torch.int32), (2, torch.int16))


def wide_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of a 2-D view (last dim dense) as the widest element (16, 8, 4 or 2 bytes) that divides
    its row length, row stride and offset in bytes; the view itself when none does (or it is 1-D).

    A row gather or scatter (``index_select``, ``index_copy_``) costs per element on the CPU: a cache
    block read as 16-byte elements instead of bytes moves about 10x faster. The bytes are the same, so
    ``wide_rows(x).index_select(0, ids).view(x.dtype)`` equals ``x.index_select(0, ids)``.
    """
    if rows.dim() != 2 or rows.stride(1) != 1:
        return rows
    item = rows.element_size()
    nbytes, stride, offset = rows.shape[1] * item, rows.stride(0) * item, rows.storage_offset() * item
    for width, dt in _WIDE:
        if width > item and nbytes % width == 0 and stride % width == 0 and offset % width == 0:
            return rows.view(torch.uint8).view(dt) if item != 1 else rows.view(dt)
    return rows


def gather_rows(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``rows.index_select(0, ids)`` (a new, contiguous tensor) through :func:`wide_rows`."""
    wide = wide_rows(rows)
    out = wide.index_select(0, ids)
    return out if wide is rows else out.view(torch.uint8).view(rows.dtype)


def scatter_rows(rows: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
    """``rows.index_copy_(0, ids, src)`` through :func:`wide_rows` (``src`` contiguous, rows' dtype)."""
    wide = wide_rows(rows)
    if wide is rows:
        rows.index_copy_(0, ids, src)
    else:
        wide.index_copy_(0, ids, src.contiguous().view(torch.uint8).view(wide.dtype))


def _padding_to_first_real(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, slots, real) for a write without host synchronisation: a padding token (slot < 0) repeats the
    write of the batch's first real token (same slot, same value: no conflicting duplicate); with no real
    token every write puts back what is there (``real`` False). ``slots`` clamped to >= 0."""
    n = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    src = torch.where(valid, torch.arange(n, device=slot_mapping.device), valid.to(torch.int8).argmax())
    slots = slot_mapping[src]
    return src, slots.clamp_min(0), slots >= 0


def write_token_rows(pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                     kv_scales: KVScales = None, toward_zero: bool = False) -> None:
    """:func:`write_slots` for token-major pages ``[num_blocks, block_size, Hkv, 2d]`` (contiguous; vLLM's
    layout, K then V of each head): each new token is one row of the pages, so the write is one row gather
    (the rows a padding-only batch puts back) and one row scatter, as wide elements (:func:`scatter_rows`).
    The bytes written are those of :func:`write_slots`."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    nb, bs, hkv, d2 = pages.shape
    rows = pages.view(nb * bs, hkv * d2)
    src, slots, real = _padding_to_first_real(slot_mapping)
    real = real[:, None]
    ks, vs = kv_scales or (1.0, 1.0)
    new = torch.cat([kv_quantize(key[:n][src], pages.dtype, ks, toward_zero),
                     kv_quantize(value[:n][src], pages.dtype, vs, toward_zero)], dim=-1).reshape(n, -1)
    byte = pages.dtype == KV_FP8_DTYPE  # (torch.where has no float8 kernel: move the bytes)
    old = gather_rows(rows, slots)
    new = torch.where(real, new.view(torch.uint8), old.view(torch.uint8)) if byte else torch.where(real, new, old)
    scatter_rows(rows, slots, new.view(pages.dtype) if byte else new)


def write_slots(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: KVScales = None,
    toward_zero: bool = False,
) -> None:
    """Store new tokens: ``key``/``value`` [N, H, d] go to the slots in ``slot_mapping`` [N].

    Slots < 0 mark padding tokens and are skipped. An FP8 cache stores them quantized with ``kv_scales``
    (:func:`kv_quantize`; ``toward_zero``: CPU_ATTN's rounding).
    """
    n = slot_mapping.shape[0]
    key, value = key[:n], value[:n]
    if n == 0:
        return
    src, slots, real = _padding_to_first_real(slot_mapping)  # (no host synchronisation)
    real = real[:, None, None]
    block_size = key_cache.shape[2]
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - blocks * block_size
    ks, vs = kv_scales or (1.0, 1.0)
    for cache, new, sc in ((key_cache, key, ks), (value_cache, value, vs)):
        new = kv_quantize(new[src], cache.dtype, sc, toward_zero)
        if cache.dtype == KV_FP8_DTYPE:  # (torch.where has no float8 kernel: move the bytes)
            cache, new = cache.view(torch.uint8), new.view(torch.uint8)
        cache[blocks, :, offsets] = torch.where(real, new, cache[blocks, :, offsets])


def gather_tokens(
    cache: torch.Tensor, block_table_row: torch.Tensor, start: int, end: int, scale: float = 1.0
) -> torch.Tensor:
    """Tokens at positions [start, end) of one request: ``[end - start, H, d]`` (an FP8 cache's dequantized
    with ``scale``, float32)."""
    block_size = cache.shape[2]
    first, last = start // block_size, (end + block_size - 1) // block_size
    blocks = block_table_row[first:last].long()
    tokens = cache[blocks].permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])
    lo = start - first * block_size
    return kv_dequantize(tokens[lo : lo + (end - start)], scale)
