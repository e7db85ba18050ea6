"""Where a compacted span lives in vLLM's paged KV cache (the one definition of the layout).

vLLM keeps, per layer, ``kv_cache[num_blocks, 2, block_size, Hkv, d]`` (K at [:, 0], V at
[:, 1]) in the model dtype; a sequence owns the blocks listed in its row of the block table.
One block therefore holds ``BB = 2 * block_size * Hkv * d * elem_bytes`` bytes. Only that is
assumed: a strided view in that shape whose blocks are dense byte ranges (the backend's view of
vLLM's token-major ``[num_blocks, block_size, Hkv, 2d]`` pages) addresses the same bytes.

A span of tokens [start, start + T) of sequence s is stored *inside its own blocks*: the
blocks wholly inside the span, i.e. logical block indices

    first = ceil(start / block_size),   last = floor((start + T) / block_size)  (exclusive)

of the sequence's block-table row (the edge blocks may be shared with exact text tokens and
are left untouched; the exact K/V of span tokens in them are simply never read). The compact
form is written from logical block ``first`` on (``storage_block``), as a byte array split into
sections, each section starting at a block boundary (relative block numbers below)::

    section   rows       row bytes                      content
    basis_k   R_k        W * eb                          B_k, model dtype, rows orthonormal
    basis_v   R_v        W * eb                          B_v
    coeff_k   T          roundup(R_k * cb, 32)           C_k token-major (model dtype or e4m3)
    coeff_v   T          roundup(R_v * cb, 32)           C_v token-major
    scale_k   T          4                               float32 per-token scale (FP8 only)
    scale_v   T          4                               (FP8 only)
    importance T         4                               float32 EMA importance

(W = Hkv * d, eb = model dtype bytes, cb = coefficient bytes.) With an FP8 KV cache the pages hold one
byte per element (``BB = 2 * block_size * Hkv * d``) and the bases stay in the model dtype: a basis row
then takes two or four tokens' worth of page bytes, which the layout accounts for like any other row.
Row i of a section lies in relative block ``section_block + i // rpb`` with ``rpb = BB // row_bytes``
rows per block, so no row straddles two blocks. Inside the block:

* basis, scale and importance rows are row-major: row i at byte ``(i % rpb) * row_bytes``;
* coefficient rows are padded to whole 32-byte sectors and stored *sector-planar*: sector p of row i
  (its components ``[p * 32 / cb, (p + 1) * 32 / cb)``) at byte ``p * rpb * 32 + (i % rpb) * 32``.
  Components are ordered by decreasing singular value, so a low-importance token that reads only its
  first R // divisor components reads only plane 0 (1 sector per token for R = 64 bf16 and R = 128 FP8),
  and the plane-0 sectors of consecutive tokens share cache lines: the skipped components are whole
  cache lines that are never fetched, not just sectors of lines that are (a 128-byte line holds four
  tokens' first sectors; a row-major line would hold one token's four).

Padding bytes are zero. The span fits if ``layout.num_blocks <= last - first``; otherwise it must stay
exact. The blocks after the compact form can be freed.

:func:`pack_span` / :func:`unpack_span` are the torch reference of this layout
(:mod:`ap_vllm.kernels.pack` is the Triton writer, :mod:`ap_vllm.kernels.lowrank_decode` the reader).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ap_vllm.kernels.cache_abi import META, META_FIELDS, SECTOR_BYTES, block_contiguous, cache_bytes

from .compaction import FP8_DTYPE, CompactedSpan
from .lowrank_attention import low_rank
from .paged import gather_rows, kv_dequantize
from .rope import RopeTable



def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class Section:
    block: int  # first block, relative to the span's storage_block
    row_bytes: int
    rows_per_block: int
    num_rows: int
    src_row_bytes: int  # meaningful bytes per row (the rest is zero padding)
    planar: bool = False  # sector-planar inside each block (coefficients; see the module docstring)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_rows / self.rows_per_block) if self.num_rows else 0


@dataclass(frozen=True)
class SpanLayout:
    """Byte layout of one compacted span in the paged cache (see the module docstring)."""

    num_tokens: int
    key_rank: int
    value_rank: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype  # model dtype (of the bases; and of the KV cache unless cache_dtype says otherwise)
    fp8: bool = False  # coefficients in float8_e4m3fn with per-token scales
    cache_dtype: Optional[torch.dtype] = None  # element type of the pages (None: dtype; an FP8 KV cache: 1 byte)
    sections: dict = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        w, eb = self.width, self.elem_bytes
        cb = 1 if self.fp8 else eb
        bb = self.block_bytes
        spec = [("basis_k", self.key_rank, w * eb, w * eb), ("basis_v", self.value_rank, w * eb, w * eb),
                ("coeff_k", self.num_tokens, _roundup(self.key_rank * cb, SECTOR_BYTES), self.key_rank * cb),
                ("coeff_v", self.num_tokens, _roundup(self.value_rank * cb, SECTOR_BYTES), self.value_rank * cb)]
        if self.fp8:
            spec += [("scale_k", self.num_tokens, 4, 4), ("scale_v", self.num_tokens, 4, 4)]
        spec += [("importance", self.num_tokens, 4, 4)]
        secs, blk = {}, 0
        for name, rows, rb, src in spec:
            if rb > bb:
                raise ValueError(f"a {name} row ({rb} bytes) does not fit in a block ({bb} bytes)")
            s = Section(blk, rb, bb // rb, rows, src, planar=name.startswith("coeff_"))
            secs[name] = s
            blk += s.num_blocks
        object.__setattr__(self, "sections", secs)

    @property
    def width(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def coeff_dtype(self) -> torch.dtype:
        return FP8_DTYPE if self.fp8 else self.dtype

    @property
    def cache_elem_bytes(self) -> int:
        return self.elem_bytes if self.cache_dtype is None else torch.empty((), dtype=self.cache_dtype).element_size()

    @property
    def block_bytes(self) -> int:
        return 2 * self.block_size * self.width * self.cache_elem_bytes

    @property
    def num_blocks(self) -> int:
        """Blocks the compact form occupies."""
        return sum(s.num_blocks for s in self.sections.values())

    @property
    def coeff_rows_per_block(self) -> tuple[int, int]:
        """Rows per block of the key and value coefficient sections (what a token tile of the kernels reads)."""
        return self.sections["coeff_k"].rows_per_block, self.sections["coeff_v"].rows_per_block

    def paged_memory_ratio(self) -> float:
        """Blocks of the exact span / blocks of the compact form (what the paged cache saves)."""
        return math.ceil(self.num_tokens / self.block_size) / self.num_blocks


def coeff_rows_per_block(layouts: Sequence[SpanLayout]) -> tuple:
    """The distinct rows per block of the coefficient sections of ``layouts``, sorted: what a plan tells the span
    kernel (one block-table read a token tile when every value is a multiple of the tile)."""
    return tuple(sorted({r for lay in layouts for r in lay.coeff_rows_per_block}))


def span_layout_for(span: CompactedSpan, block_size: int, cache_dtype: Optional[torch.dtype] = None) -> SpanLayout:
    return SpanLayout(span.num_tokens, span.key_rank, span.value_rank, span.num_kv_heads, span.head_size,
                      block_size, span.basis_k.dtype, fp8=span.scale_k is not None, cache_dtype=cache_dtype)


def storage_blocks(start: int, num_tokens: int, block_size: int) -> tuple[int, int]:
    """(first logical block wholly inside the span, number of such blocks)."""
    first = -(-start // block_size)
    last = (start + num_tokens) // block_size
    return first, max(0, last - first)


def fits(layout: SpanLayout, start: int) -> bool:
    """Whether the compact form fits into the span's own whole blocks."""
    return layout.num_blocks <= storage_blocks(start, layout.num_tokens, layout.block_size)[1]


@dataclass
class PagedSpan:
    """A compacted span as the decode kernel sees it: where it is and how to read it."""

    seq: int  # row of the batch (block table / seq_lens / queries)
    start: int  # absolute position of its first token
    layout: SpanLayout
    storage_block: Optional[int] = None  # logical block in the seq's block-table row (default: first whole block)
    threshold: Optional[float | torch.Tensor] = None  # importance threshold of the full-rank read (None = all
    # full rank); a 0-dim device tensor keeps it on the device
    low_rank_divisor: int = 4
    two_level_keys: bool = False

    def __post_init__(self) -> None:
        if self.storage_block is None:
            self.storage_block = storage_blocks(self.start, self.layout.num_tokens, self.layout.block_size)[0]

    @property
    def end(self) -> int:
        return self.start + self.layout.num_tokens

    def metadata_row(self) -> list[int]:
        lay, s = self.layout, self.layout.sections
        sk = s.get("scale_k", s["importance"])
        sv = s.get("scale_v", s["importance"])
        div = self.low_rank_divisor
        return [self.seq, self.start, lay.num_tokens, lay.key_rank, lay.value_rank,
                low_rank(lay.key_rank, div) if self.two_level_keys else lay.key_rank,
                low_rank(lay.value_rank, div) if self.threshold is not None else lay.value_rank,
                self.storage_block, s["basis_k"].block, s["basis_v"].block, s["coeff_k"].block,
                s["coeff_v"].block, sk.block, sv.block, s["importance"].block,
                s["coeff_k"].row_bytes, s["coeff_v"].row_bytes]


def span_metadata(spans: Sequence[PagedSpan], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 metadata [S, len(META_FIELDS)] and float32 thresholds [S] (-inf = all full rank).

    Built on the host and copied without waiting for the device; thresholds given as device
    tensors (:func:`ap_vllm.core.lowrank_attention.importance_thresholds`) stay on the device.
    """
    meta = torch.tensor([sp.metadata_row() for sp in spans], dtype=torch.int64).reshape(len(spans), len(META_FIELDS))
    meta = meta.to(device, non_blocking=True) if device is not None else meta
    if any(isinstance(sp.threshold, torch.Tensor) for sp in spans):
        thr = torch.stack([torch.as_tensor(float("-inf") if sp.threshold is None else sp.threshold,
                                           dtype=torch.float32, device=device).reshape(()) for sp in spans])
    else:
        thr = torch.tensor([float("-inf") if sp.threshold is None else sp.threshold for sp in spans],
                           dtype=torch.float32)
        thr = thr.to(device, non_blocking=True) if device is not None else thr
    return meta, thr


# --------------------------------------------------------------------------------------
# torch reference pack / unpack
# --------------------------------------------------------------------------------------
def gather_span_kv(kv_cache: torch.Tensor, block_table_row: torch.Tensor, start: int, end: int,
                   kv_scales=None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[end - start, Hkv, d]`` of one request's positions [start, end) from ``kv_cache``
    ([blocks, 2, block_size, Hkv, d], any block-dense view): the blocks are gathered once, K and V together,
    as wide rows (:func:`gather_rows`), then read with the view's own strides inside each block. An FP8
    cache's tokens come dequantized with ``kv_scales`` (float32), as :func:`ap_vllm.core.paged.gather_tokens`."""
    nb, _, bs, hkv, d = kv_cache.shape
    first, last = start // bs, -(-end // bs)
    ids = block_table_row[first:last].long()
    raw = gather_rows(cache_bytes(kv_cache), ids)  # [n, block bytes]
    blocks = raw.view(kv_cache.dtype).as_strided((ids.shape[0], 2, bs, hkv, d), kv_cache.stride())
    lo = start - first * bs
    k = blocks[:, 0].reshape(-1, hkv, d)[lo: lo + end - start]
    v = blocks[:, 1].reshape(-1, hkv, d)[lo: lo + end - start]
    ks, vs = kv_scales or (1.0, 1.0)
    return kv_dequantize(k, ks), kv_dequantize(v, vs)


def _section_block_ids(sec: Section, block_ids: torch.Tensor) -> torch.Tensor:
    return block_ids[sec.block: sec.block + sec.num_blocks].long()


def section_rows(sec: Section, images: torch.Tensor) -> torch.Tensor:
    """The bytes of a section's blocks (uint8 [..., n, rows_per_block * row_bytes], n of its blocks) as its
    rows, uint8 [..., n * rows_per_block, row_bytes] (undoing the sector planes of a coefficient section)."""
    rpb, rb = sec.rows_per_block, sec.row_bytes
    lead = images.shape[:-1]
    if sec.planar:
        images = images.reshape(*lead, rb // SECTOR_BYTES, rpb, SECTOR_BYTES).transpose(-3, -2)
    return images.reshape(*lead[:-1], lead[-1] * rpb, rb)


def _write_section(blocks: torch.Tensor, block_ids: torch.Tensor, sec: Section, rows: torch.Tensor) -> None:
    """Write a section's rows (uint8 [num_rows, row_bytes]) into ``blocks`` ([num_blocks, BB] uint8),
    whole blocks at a time; the bytes past the last row (of each plane) are left as they are."""
    ids = _section_block_ids(sec, block_ids)
    rpb, rb = sec.rows_per_block, sec.row_bytes
    full, rem = divmod(sec.num_rows, rpb)
    if full:
        img = rows[: full * rpb].reshape(full, rpb, rb)
        if sec.planar:
            img = img.view(full, rpb, rb // SECTOR_BYTES, SECTOR_BYTES).transpose(1, 2)
        blocks[ids[:full], : rpb * rb] = img.reshape(full, rpb * rb)
    if rem and sec.planar:
        last = rows[full * rpb:].reshape(rem, rb // SECTOR_BYTES, SECTOR_BYTES)
        for p in range(rb // SECTOR_BYTES):
            blocks[ids[full], p * rpb * SECTOR_BYTES: (p * rpb + rem) * SECTOR_BYTES] = last[:, p].reshape(-1)
    elif rem:
        blocks[ids[full], : rem * rb] = rows[full * rpb:].reshape(-1)


def _read_section(blocks: torch.Tensor, block_ids: torch.Tensor, layout: SpanLayout, name: str,
                  dtype: torch.dtype, cols: int) -> torch.Tensor:
    """A section's rows [num_rows, cols] of ``dtype`` from ``blocks`` ([num_blocks, BB] uint8)."""
    sec = layout.sections[name]
    raw = blocks[_section_block_ids(sec, block_ids), : sec.rows_per_block * sec.row_bytes]
    raw = section_rows(sec, raw)[: sec.num_rows, : sec.src_row_bytes]
    return raw.contiguous().view(dtype).reshape(sec.num_rows, cols)


def _as_row_bytes(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    if x.dim() == 1:
        x = x[:, None]
    return x.view(torch.uint8).reshape(x.shape[0], -1)


def section_tensors(span: CompactedSpan) -> dict[str, torch.Tensor]:
    d = {"basis_k": span.basis_k, "basis_v": span.basis_v, "coeff_k": span.coeff_k, "coeff_v": span.coeff_v,
         "importance": span.importance.float()}
    if span.scale_k is not None:
        d["scale_k"], d["scale_v"] = span.scale_k.float(), span.scale_v.float()
    return d


def pack_span(kv_cache: torch.Tensor, block_ids: torch.Tensor, span: CompactedSpan, layout: SpanLayout,
              sections: Optional[Sequence[str]] = None, kernel: bool = False) -> None:
    """Write ``span`` into the physical blocks ``block_ids`` (>= layout.num_blocks of them, in order).

    ``sections``: only these sections (e.g. ``["importance"]``); default all. ``kernel``: with the Triton
    writer (:func:`ap_vllm.kernels.pack.write_sections`, one launch per section, the same bytes), else torch.
    """
    if len(block_ids) < layout.num_blocks:
        raise ValueError(f"the compact span needs {layout.num_blocks} blocks, got {len(block_ids)}")
    tensors = {name: src for name, src in section_tensors(span).items() if sections is None or name in sections}
    if kernel:
        from ap_vllm.kernels.pack import write_sections

        write_sections(kv_cache, block_ids, tensors, layout.sections, layout.block_bytes)
        return
    blocks = cache_bytes(kv_cache)
    block_ids = torch.as_tensor(block_ids, device=kv_cache.device)
    for name, src in tensors.items():
        sec = layout.sections[name]
        rows = _as_row_bytes(src)
        if rows.shape[1] < sec.row_bytes:  # zero padding to whole sectors
            padded = torch.zeros(sec.num_rows, sec.row_bytes, dtype=torch.uint8, device=kv_cache.device)
            padded[:, : rows.shape[1]] = rows
            rows = padded
        _write_section(blocks, block_ids, sec, rows)


def read_importance(kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: SpanLayout) -> torch.Tensor:
    """Only the importance section of a compacted span (float32 [T])."""
    block_ids = torch.as_tensor(block_ids, device=kv_cache.device)
    return _read_section(cache_bytes(kv_cache), block_ids, layout, "importance", torch.float32, 1).reshape(-1)


def importance_index(spans: Sequence[PagedSpan], block_table: torch.Tensor,
                     sample: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Where the importance of the tokens that set each span's threshold lies (every token, or its
    :func:`ap_vllm.core.lowrank_attention.threshold_sample` when ``sample`` > 0), for many layers
    and one batch at once.

    Returns int64 indices [S, N] into a layer's cache seen as float32 elements
    (``cache_bytes(kv_cache).view(-1).view(torch.float32)``; the same for every layer whose spans
    have these layouts), the mask [S, N] of real entries (0 and False past a span's count) and
    the count of each span (host ints, for :func:`ap_vllm.core.lowrank_attention.threshold_ranks`).
    ``block_table`` [B, max_blocks] holds the rows the spans' ``seq`` index. Built with a few
    device ops, whatever the number of spans; read with :func:`read_importances`.
    """
    from .lowrank_attention import threshold_sample

    dev = block_table.device
    if not spans:
        return (torch.zeros(0, 1, dtype=torch.int64, device=dev), torch.zeros(0, 1, dtype=torch.bool, device=dev),
                [])
    secs = [sp.layout.sections["importance"] for sp in spans]
    samples = [threshold_sample(sp.layout.num_tokens, sample) for sp in spans]
    counts = [sp.layout.num_tokens if pos is None else pos.numel() for sp, pos in zip(spans, samples)]
    host = torch.tensor([[sp.seq, sp.storage_block + sec.block, sec.rows_per_block, n, sp.layout.block_bytes // 4]
                         for sp, sec, n in zip(spans, secs, counts)], dtype=torch.int64)
    seq, base, rpb, count, elems = host.to(dev, non_blocking=True).unbind(1)
    width = max(counts)
    j = torch.arange(width, device=dev)[None, :]
    valid = j < count[:, None]
    if any(pos is not None for pos in samples):  # token positions of each entry
        pos = torch.nn.utils.rnn.pad_sequence([torch.arange(n) if p is None else p for p, n in zip(samples, counts)],
                                              batch_first=True).to(dev, non_blocking=True)
    else:
        pos = torch.where(valid, j, 0)
    logical = base[:, None] + pos // rpb[:, None]
    blocks = block_table.long()[seq[:, None], logical]
    index = torch.where(valid, blocks * elems[:, None] + pos % rpb[:, None], 0)
    return index, valid, counts


def read_importances(kv_cache: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The importance of every span token at ``index`` (:func:`importance_index`): float32
    [S, T_max], -inf past a span's end."""
    flat = cache_bytes(kv_cache).reshape(-1).view(torch.float32)
    return flat[index].masked_fill(~valid, float("-inf"))


def unpack_span(kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: SpanLayout, start: int = 0,
                rope: Optional[RopeTable] = None) -> CompactedSpan:
    """Read a compacted span back from the paged cache (inverse of :func:`pack_span`); ``rope``:
    its keys were compacted before RoPE (the layer's rotary table)."""
    blocks = cache_bytes(kv_cache)
    block_ids = torch.as_tensor(block_ids, device=kv_cache.device)
    w = layout.width
    rd = lambda name, dt, cols: _read_section(blocks, block_ids, layout, name, dt, cols)  # noqa: E731
    span = CompactedSpan(
        coeff_k=rd("coeff_k", layout.coeff_dtype, layout.key_rank), basis_k=rd("basis_k", layout.dtype, w),
        coeff_v=rd("coeff_v", layout.coeff_dtype, layout.value_rank), basis_v=rd("basis_v", layout.dtype, w),
        num_kv_heads=layout.num_kv_heads, head_size=layout.head_size, start=start,
        importance=rd("importance", torch.float32, 1).reshape(-1), rope=rope)
    if layout.fp8:
        span.scale_k = rd("scale_k", torch.float32, 1).reshape(-1)
        span.scale_v = rd("scale_v", torch.float32, 1).reshape(-1)
    return span


def paged_span_block_ids(block_table: torch.Tensor, span: PagedSpan) -> torch.Tensor:
    """Physical block ids holding a span's compact form."""
    return block_table[span.seq, span.storage_block: span.storage_block + span.layout.num_blocks].long()


__all__ = [
    "SpanLayout", "Section", "PagedSpan", "section_rows", "span_layout_for", "storage_blocks", "fits", "span_metadata",
    "pack_span", "unpack_span", "gather_span_kv", "read_importance", "importance_index", "read_importances", "cache_bytes", "block_contiguous", "paged_span_block_ids",
    "META", "META_FIELDS", "SECTOR_BYTES",
]
