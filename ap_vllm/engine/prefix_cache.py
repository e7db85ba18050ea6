"""Prefix caching with compacted spans: the hashes a request's KV blocks are cached and found under.

vLLM keys block ``j`` of a request by a chained hash, ``h_j = H(h_{j-1}, tokens_j, extra_j)`` (the
extra keys carry each image's multimodal hash and offset, LoRA, cache salt), and a hit on ``h_j``
means "the same KV as computing tokens ``[0, (j + 1) * bs)``". A compacted span breaks that in
two places: its blocks no longer hold exact KV, and every token after it was computed against
its compact form. So a request's blocks get *effective* hashes ``e_j`` (computed by
:class:`SpanAwareBlockHasher`, installed on the request by our scheduler), for span plans
``P = [start, end)`` with inner blocks ``[first, stop_inner = end // bs)``::

    e_j = H(e_{j-1}, tokens_j, extra_j)          j outside every span's inner blocks: vLLM's rule,
                                                 chained on the effective parent, so equal to vLLM's
                                                 own hash before the first span
    x_P = H(... H(e_{first-1}, tokens_first, extra_first) ..., tokens_{stop_inner-1}, ...)
                                                 vLLM's chain over the span's inner blocks
    k_P = H(x_P, tokens [stop_inner * bs, end), ("attentionpack", settings, start, end, kind), extra)
    e_j = SpanBlockHash(H(k_P, (), ("attentionpack-block", j - first)))     first <= j < stop_inner

``k_P`` covers the prefix, every span token (the multimodal hash through the extra keys), the span's
boundaries and every setting that shapes the compact form or the attention over it (``settings``:
:func:`settings_digest`). The inner hashes derive from ``k_P`` only, so the blocks that hold the
compact form (``[first, first + storage)``) are cached under them, the freed ones (the rest of the
inner blocks, the null block in the table) are never cached, and every block after the span chains
through ``k_P``: text computed after a compacted span is never taken for exact KV of the same tokens,
nor for text computed after a span compacted with other settings.

:class:`SpanBlockHash` marks the inner positions (``stored``: a compact-form block; else freed) and
the span's extent, so :meth:`~ap_vllm.engine.kv_manager.AttentionPackManager.find_longest_cache_hit`
puts the null block at freed positions and never ends a hit inside a span (:func:`allowed_hit_blocks`:
all of the span or none of it, edge blocks included).

Why tokens after a span are deterministic: the scheduler never lets a prompt chunk run past a span's
end (:func:`cap_at_span_end`), so text after a span is always computed against its compact form,
whatever the step budget or the batch, and a cached block equals a recomputed one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional, Sequence

from ap_vllm.config import AttentionPackConfig
from ap_vllm.core.spans import KVGeometry, SpanPlan


class SpanBlockHash(bytes):
    """The effective hash of a block position inside a compacted span (a ``bytes`` like vLLM's
    ``BlockHash``, with what a cache lookup needs to know about the position)."""

    stored: bool  # the block holds part of the compact form (else it is freed: the null block)
    first: int  # the span's first inner block
    end: int  # the span's end (tokens)
    stop: int  # ceil(end / bs): the shortest block-aligned hit that holds the whole span

    def __new__(cls, value: bytes, stored: bool, first: int, end: int, block_size: int) -> "SpanBlockHash":
        obj = super().__new__(cls, value)
        obj.stored, obj.first, obj.end, obj.stop = stored, first, end, -(-end // block_size)
        obj.block_size = block_size
        return obj

    def __reduce__(self):
        return SpanBlockHash, (bytes(self), self.stored, self.first, self.end, self.block_size)


def settings_digest(config: AttentionPackConfig, geometry: KVGeometry) -> str:
    """A digest of everything that shapes a compact form and the attention over it: every field of the
    AttentionPack section (ranks, key space, coefficient dtype, value selection, ...) and the pages' geometry
    (block size, KV heads, head size, model and cache dtypes). Two servers whose digests differ never share a
    compact block or a block computed after one (KV connectors, offloaded caches)."""
    fields = json.dumps(config.model_dump(mode="json"), sort_keys=True, default=str)
    geo = (geometry.block_size, geometry.num_kv_heads, geometry.head_size, str(geometry.dtype),
           geometry.num_layers, str(geometry.cache_dtype))
    return hashlib.sha256(f"{fields}|{geo}".encode()).hexdigest()[:32]


def shares_compact_spans(config: AttentionPackConfig) -> bool:
    """Whether compacted spans can be shared through the prefix cache. Not with ``value_selection: ema``:
    the importance EMA lives in the span's pages and every decode step of the request updates it, so two
    requests would write one span (compacted spans, and what follows them, are then not cached)."""
    return config.value_selection != "ema"


def allowed_hit_blocks(block_hashes: Sequence[bytes], num_blocks: int) -> int:
    """The longest cache hit of at most ``num_blocks`` blocks that ends outside every span: a hit that
    ends inside a span (or before its last edge block) is cut back to the span's first inner block, whose
    predecessors are exact KV (the span is then prefilled and compacted again, whole)."""
    if num_blocks <= 0:
        return 0
    # A hit of n blocks ends inside a span P exactly when first < n < stop, i.e. when its last block is
    # one of P's inner blocks and n < stop (a hit that includes the trailing edge block ends at stop).
    last = block_hashes[num_blocks - 1]
    if isinstance(last, SpanBlockHash) and num_blocks < last.stop:
        return last.first
    return num_blocks


def span_end_hit(block_hashes: Sequence[bytes], num_blocks: int, max_tokens: int) -> Optional[int]:
    """A hit whose ``num_blocks`` blocks are exactly the blocks up to a span's last inner block, for a span
    that ends inside the next block, can end at the span's end (tokens) instead of being cut back: every span
    token is then in the cache (the edge block's span tokens are never read again: the compact form replaces
    them), and the request computes the rest of that block itself, in a block of its own. Typical: the prompt
    ends in the block where the image ends, so that block is never full in any request. None otherwise."""
    if num_blocks <= 0:
        return None
    last = block_hashes[num_blocks - 1]
    if (isinstance(last, SpanBlockHash) and last.end % last.block_size and num_blocks == last.end // last.block_size
            and last.end <= max_tokens):
        return last.end
    return None


def cap_at_span_end(plans: Sequence[SpanPlan], num_computed_tokens: int, num_new_tokens: int) -> int:
    """Shorten a prompt chunk so it ends at the first span end it would run past: the span completes (and
    is compacted) in this step, and the tokens after it are computed in a later step, against its compact
    form, whatever the scheduler's token budget."""
    stop = num_computed_tokens + num_new_tokens
    for plan in plans:
        if num_computed_tokens < plan.end < stop:
            return plan.end - num_computed_tokens
    return num_new_tokens


class SpanAwareBlockHasher:
    """A request's block hasher (vLLM's ``Request._block_hasher`` contract: ``hasher(request)`` returns the
    hashes of the request's full blocks not hashed yet) that gives the effective hashes of the module
    docstring. ``plans``: the request's span plans (:func:`ap_vllm.core.spans.plan_spans`), fixed for its
    lifetime; ``hash_fn``: vLLM's caching hash function; ``settings``: :func:`settings_digest`."""

    def __init__(self, plans: Sequence[SpanPlan], block_size: int, hash_fn: Callable[[Any], bytes],
                 settings: str) -> None:
        self.plans = tuple(sorted(plans, key=lambda p: p.start))
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.settings = settings

    def _block(self, request: Any, parent: Optional[bytes], lo: int, hi: int, extra: Optional[tuple] = None) -> bytes:
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, hash_block_tokens

        keys, _ = generate_block_hash_extra_keys(request, lo, hi, 0)
        if extra is not None:
            keys = (keys or ()) + extra
        return hash_block_tokens(self.hash_fn, parent, request.all_token_ids[lo:hi], keys)

    def __call__(self, request: Any) -> list[bytes]:
        from vllm.v1.core.kv_cache_utils import hash_block_tokens

        bs = self.block_size
        done = request.block_hashes
        out: list[bytes] = []
        j, full = len(done), request.num_tokens // bs
        parent = done[-1] if done else None
        while j < full:
            plan = next((p for p in self.plans if p.first_block <= j < p.end // bs), None)
            if plan is None:
                parent = self._block(request, parent, j * bs, (j + 1) * bs)
                out.append(parent)
                j += 1
                continue
            # a span's inner blocks, all at once (every span token is a prompt token; j == first: the blocks
            # are hashed in order and a span's inner blocks in one go, so ``parent`` is block first - 1's)
            first, inner_stop = plan.first_block, plan.end // bs
            x = parent
            for b in range(first, inner_stop):
                x = self._block(request, x, b * bs, (b + 1) * bs)
            key = self._block(request, x, inner_stop * bs, plan.end,
                              (("attentionpack", self.settings, plan.start, plan.end, plan.kind),))
            for b in range(first, inner_stop):
                value = hash_block_tokens(self.hash_fn, key, (), (("attentionpack-block", b - first),))
                parent = SpanBlockHash(value, stored=b - first < plan.storage_blocks, first=first, end=plan.end,
                                       block_size=bs)
                out.append(parent)
            j = inner_stop
        return out
