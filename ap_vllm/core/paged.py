"""vLLM's paged KV cache, as this backend sees it (torch reference ops).

One layer's cache is the tensor vLLM hands to the backend, logically
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``: for block ``b``, head ``h`` and
in-block offset ``o``, ``[..., :head_size]`` is the key and ``[..., head_size:]`` the value
of the token stored in slot ``b * block_size + o``. A request's token at position ``p``
lives in block ``block_table[p // block_size]`` at offset ``p % block_size``.
"""

from __future__ import annotations

import torch


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[num_blocks, num_kv_heads, block_size, head_size]`` of one layer."""
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


def write_slots(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new tokens: ``key``/``value`` [N, H, d] go to the slots in ``slot_mapping`` [N].

    Slots < 0 mark padding tokens and are skipped.
    """
    n = slot_mapping.shape[0]
    key, value = key[:n], value[:n]
    if n == 0:
        return
    # No host synchronisation: a padding token (slot < 0) repeats the write of the batch's first real token
    # (same slot, same value: no conflicting duplicate); with no real token every write puts back what is there.
    valid = slot_mapping >= 0
    src = torch.where(valid, torch.arange(n, device=slot_mapping.device), valid.to(torch.int8).argmax())
    slots = slot_mapping[src]
    real = (slots >= 0)[:, None, None]
    block_size = key_cache.shape[2]
    blocks = torch.div(slots.clamp_min(0), block_size, rounding_mode="floor")
    offsets = slots.clamp_min(0) - blocks * block_size
    key_cache[blocks, :, offsets] = torch.where(real, key[src].to(key_cache.dtype), key_cache[blocks, :, offsets])
    value_cache[blocks, :, offsets] = torch.where(real, value[src].to(value_cache.dtype),
                                                  value_cache[blocks, :, offsets])


def gather_tokens(
    cache: torch.Tensor, block_table_row: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """Tokens at positions [start, end) of one request: ``[end - start, H, d]``."""
    block_size = cache.shape[2]
    first, last = start // block_size, (end + block_size - 1) // block_size
    blocks = block_table_row[first:last].long()
    tokens = cache[blocks].permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])
    lo = start - first * block_size
    return tokens[lo : lo + (end - start)]
