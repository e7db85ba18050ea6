"""vLLM 0.32's per-token-head KV formats, applied offline (quantize -> dequantize) to what the attention
backend writes into the KV cache (AttentionPack's, or vLLM's CPU backend, which serves AttentionPack's exact
mode). For benchmarks only: nothing in the served runtime imports this module, and :func:`offline_kv_quant`
restores the patched methods on exit.

The formats follow vLLM 0.32's writers (``vllm/v1/attention/ops/triton_reshape_and_cache_flash.py``,
``_reshape_cache_per_token_head``, and ``vllm/v1/attention/ops/int4_per_token_head.py``,
``_reshape_cache_int4_kernel`` / ``single_rht``); the arithmetic is in float32 as there:

``int8_per_token_head``
    One float32 scale per (token, KV head), for K and V separately: ``scale = max(absmax / 127, 1e-6)``,
    symmetric (no zero point); ``q = trunc(clamp(x / scale +- 0.5, -128, 127))`` (round half away from
    zero, then the int8 store truncates). Read back as ``q * scale``. Bytes per token and head:
    ``d + 4`` for K and again for V.

``int4_per_token_head``
    First a randomized Hadamard transform per head (``single_rht``: random +-1 signs, then the
    unnormalised Walsh-Hadamard transform over the largest power-of-two divisor ``b`` of d; its
    result is cast back to the model dtype). Then asymmetric 4-bit per (token, head):
    ``scale = max((max - min) / 15, 1e-6)``, ``zp = clamp(round(-min / scale), 0, 15)``,
    ``q = clamp(round(x / scale + zp), 0, 15)`` (round half away from zero), two values per byte.
    The 4-bit zero point is stored in the low 4 mantissa bits of the float32 scale, so the reader
    uses the scale with those bits cleared: ``(q - zp) * (scale & ~0xF)``. vLLM rotates the query
    and un-rotates the output instead of the keys/values; attention is linear in V and the
    transform is orthogonal up to ``b``, so dequantising K and V back (``D H y / b``) gives the same
    attention up to rounding. Bytes per token and head: ``d / 2 + 4`` for K and again for V.

The dequantised values are written to the cache in the model dtype (vLLM's readers keep them in
float32): one extra rounding to the model dtype, far below the quantisation step.

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps vLLM's engine core in this process, so the patch reaches
the backend; it must be set before the first engine starts (vLLM caches its environment after that),
and :func:`offline_kv_quant` refuses to run without it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Literal

import torch

FORMATS = ("int8_per_token_head", "int4_per_token_head")
Scope = Literal["all", "global"]


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """vLLM's ``where(x >= 0, x + 0.5, x - 0.5)`` followed by a truncating integer conversion."""
    return torch.trunc(torch.where(x >= 0, x + 0.5, x - 0.5))


def int8_per_token_head(x: torch.Tensor) -> torch.Tensor:
    """Quantize -> dequantize ``x[..., d]`` (one scale per row), in float32; returns float32."""
    xf = x.float()
    scale = torch.clamp_min(xf.abs().amax(dim=-1, keepdim=True) / 127.0, 1e-6)
    q = xf * (1.0 / scale)
    # vLLM clamps after the +-0.5 shift, then the int8 store truncates toward zero
    q = torch.trunc(torch.clamp(torch.where(q >= 0, q + 0.5, q - 0.5), -128.0, 127.0))
    return q * scale


def _rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    from vllm.v1.attention.ops.int4_per_token_head import single_rht

    return single_rht(x, inverse=inverse)


def rht_norm(d: int) -> int:
    """``b``: the largest power-of-two divisor of d (the transform's H @ H.T = b * I)."""
    return d & -d


def int4_per_token_head(x: torch.Tensor) -> torch.Tensor:
    """Quantize -> dequantize ``x[..., d]`` in vLLM's INT4 format; returns float32 in x's (unrotated) basis."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"int4_per_token_head needs an even head size, got {d}")
    rot = _rht(x.float()).to(x.dtype).float()  # vLLM: single_rht(key.float()).to(key.dtype)
    mn = rot.amin(dim=-1, keepdim=True)
    mx = rot.amax(dim=-1, keepdim=True)
    scale = torch.clamp_min((mx - mn) / 15.0, 1e-6)
    zp = torch.clamp(_round_half_away(-mn / scale), 0.0, 15.0)
    q = torch.clamp(_round_half_away(rot * (1.0 / scale) + zp), 0.0, 15.0)
    # the reader's scale: the zero point lives in the low 4 mantissa bits, masked off
    read_scale = (scale.contiguous().view(torch.int32) & -16).view(torch.float32)
    deq_rot = (q - zp) * read_scale
    return _rht(deq_rot, inverse=True) / rht_norm(d)


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8_per_token_head": int8_per_token_head,
    "int4_per_token_head": int4_per_token_head,
}


def bytes_per_token_head(fmt: str, head_size: int) -> int:
    """Stored bytes of one token's K *and* V for one KV head (values + float32 scales)."""
    if fmt == "int8_per_token_head":
        return 2 * (head_size + 4)
    if fmt == "int4_per_token_head":
        return 2 * (head_size // 2 + 4)
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


def quant_dequant(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """``x[tokens, heads, d]`` through the format and back, in x's dtype."""
    return QUANTIZERS[fmt](x).to(x.dtype)


@contextlib.contextmanager
def offline_kv_quant(fmt: str, scope: Scope = "all") -> Iterator[None]:
    """While active, every K/V written into the cache goes through ``fmt`` (quantize -> dequantize).
    ``scope``: "all" layers (what vLLM's ``--kv-cache-dtype`` does) or only the "global" (full-attention)
    layers, the ones AttentionPack compacts. Run AttentionPack in exact mode (``enabled: false``, where vLLM's
    own CPU backend serves: its impl is patched as well as AttentionPack's) and the engine in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    if fmt not in QUANTIZERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if scope not in ("all", "global"):
        raise ValueError(f"scope must be 'all' or 'global', got {scope!r}")
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError("offline_kv_quant patches the backend in this process: set "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM starts (vLLM caches its environment "
                           "once an engine is up, so it cannot be switched per run)")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from ap_vllm.backend.attentionpack import AttentionPackImpl

    impls = [AttentionPackImpl]
    try:  # vLLM's CPU backend (what serves with compaction off on CPU)
        impls.append(AttentionBackendEnum.CPU_ATTN.get_class().get_impl_cls())
    except ImportError:  # a vLLM build without it
        pass
    originals = {impl: impl.do_kv_cache_update for impl in impls}

    def patched(original):
        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            if scope == "all" or self.sliding_window in (None, -1):  # (CPU_ATTN: -1 = no window)
                shape = (key.shape[0], self.num_kv_heads, self.head_size)
                key = quant_dequant(fmt, key.reshape(shape)).reshape(key.shape)
                value = quant_dequant(fmt, value.reshape(shape)).reshape(value.shape)
            return original(self, layer, key, value, kv_cache, slot_mapping)

        return do_kv_cache_update

    for impl, original in originals.items():
        impl.do_kv_cache_update = patched(original)
    try:
        yield
    finally:
        for impl, original in originals.items():
            impl.do_kv_cache_update = original
