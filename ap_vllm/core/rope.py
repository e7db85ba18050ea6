"""Rotary position embedding (RoPE) of keys: the one rotation formula, forwards and backwards.

Keys reach the attention backend already rotated. With ``key_space="pre_rope"`` a span's keys
are un-rotated before compaction (pre-RoPE keys of neighbouring tokens are far more alike, so a
low rank fits them better), and every read rotates the rebuilt keys again at their positions.

Rotation of one head vector x (head size d, the first ``r = rotary_dim`` columns rotate, the
rest pass through), position p, frequencies theta_i (i < r/2) from the model's cos/sin table::

    x'[c] = x[c] * cos(p theta_f(c)) + sign(c) * x[partner(c)] * sin(p theta_f(c))     (c < r)
    x'[c] = x[c]                                                                       (c >= r)

* neox style (halves):      pairs (i, i + r/2),  f = i,  sign = -1 on i, +1 on i + r/2
* GPT-J style (interleaved): pairs (2i, 2i + 1), f = i,  sign = -1 on 2i, +1 on 2i + 1

Scaled tables (YaRN multiplies cos and sin by ``mscale`` m, so ``cos^2 + sin^2 = m^2``): the
forward map of a pair is ``m * [[c, -s], [s, c]]`` (c, s the unit-circle values). Its inverse is
``[[c', s'], [-s', c']] / (c'^2 + s'^2)`` with c' = m c, s' = m s the stored entries, i.e. the
sign-flipped rotation divided by the squared modulus of the table entry, per position and
frequency. :meth:`RopeTable.rotate` with ``inverse=True`` computes exactly that, so
``rotate(rotate(x, p, inverse=True), p) == x`` for any table whose entries are not both zero
(a plain table has ``c'^2 + s'^2 = 1`` and the division is a no-op up to rounding).

The inverse rotation (p -> -p) flips ``sign`` (and divides by the modulus). The Triton kernel
uses the same three column maps (``partner``, ``freq``, ``sign``): it rebuilds a key tile twice,
once with the basis columns in ``partner`` order, and combines them with the cos/sin rows of the
tile's positions (forward rotation only, so it is exact for scaled tables too).

Positions are the tokens' indices in the sequence (1-D RoPE). Multi-axis rotary embeddings
(M-RoPE of Qwen2-VL and relatives) are refused where the model is read
(:func:`rope_from_vllm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class RopeTable:
    """One layer's rotary embedding as the cached keys were rotated with it.

    ``cos_sin`` [max_positions, rotary_dim]: cos(p theta_i) in the first rotary_dim/2 columns,
    sin(p theta_i) in the rest (vLLM's ``cos_sin_cache`` layout).
    """

    cos_sin: torch.Tensor
    head_size: int
    is_neox_style: bool = True
    partner: torch.Tensor = field(init=False, repr=False)  # int64 [d]
    freq: torch.Tensor = field(init=False, repr=False)  # int64 [d], -1 = pass-through column
    sign: torch.Tensor = field(init=False, repr=False)  # float32 [d]: -1, +1 or 0 (pass-through)

    def __post_init__(self) -> None:
        r = self.rotary_dim
        if r % 2 or not (0 < r <= self.head_size):
            raise ValueError(f"rotary_dim must be even and in (0, head_size={self.head_size}], got {r}")
        d, half = self.head_size, r // 2
        c = torch.arange(d, device=self.cos_sin.device)
        if self.is_neox_style:
            first = c < half
            partner = torch.where(first, c + half, c - half)
            freq = torch.where(first, c, c - half)
        else:
            first = c % 2 == 0
            partner = torch.where(first, c + 1, c - 1)
            freq = c // 2
        sign = torch.where(first, -1.0, 1.0)
        rotated = c < r
        object.__setattr__(self, "cos_sin", self.cos_sin.float())
        object.__setattr__(self, "partner", torch.where(rotated, partner, c))
        object.__setattr__(self, "freq", torch.where(rotated, freq, -1))
        object.__setattr__(self, "sign", torch.where(rotated, sign, 0.0))

    @property
    def rotary_dim(self) -> int:
        return self.cos_sin.shape[1]

    @property
    def max_positions(self) -> int:
        return self.cos_sin.shape[0]

    @classmethod
    def from_base(cls, head_size: int, base: float = 10000.0, rotary_dim: int | None = None,
                  max_positions: int = 8192, is_neox_style: bool = True) -> "RopeTable":
        """Plain RoPE: theta_i = base ** (-2i / rotary_dim) (what vLLM's ``RotaryEmbedding`` builds)."""
        r = rotary_dim or head_size
        inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
        ang = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        return cls(torch.cat([ang.cos(), ang.sin()], dim=-1), head_size, is_neox_style)

    def column_tables(self, positions: torch.Tensor, checked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, d] and sign * sin [T, d] (float32) of each column at ``positions`` [T].

        ``checked=False`` skips the bounds check of ``positions`` (which reads the largest
        position on the host, a device sync on CUDA); the caller guarantees they are in the table.
        """
        pos = positions.long().to(self.cos_sin.device)
        if checked and pos.numel() and int(pos.max()) >= self.max_positions:
            raise ValueError(f"position {int(pos.max())} is beyond the rotary table ({self.max_positions} positions)")
        half = self.rotary_dim // 2
        f = self.freq.to(pos.device).clamp_min(0)
        rows = self.cos_sin[pos]  # [T, r]
        rotated = (self.freq >= 0).to(pos.device)
        cos = torch.where(rotated, rows[:, f], 1.0)
        sin = torch.where(rotated, rows[:, half + f], 0.0) * self.sign.to(pos.device)
        return cos, sin

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False,
               checked: bool = True) -> torch.Tensor:
        """x [T, H, d] rotated to ``positions`` [T] (``inverse``: rotated back), in float32.

        Forward: ``x cos + sign sin x[partner]``. Inverse: ``(x cos - sign sin x[partner]) /
        (cos^2 + sin^2)``, the exact inverse also for scaled tables (YaRN ``mscale``).
        ``checked``: see :meth:`column_tables`.
        """
        if x.shape[-1] != self.head_size:
            raise ValueError(f"expected head size {self.head_size}, got {x.shape[-1]}")
        cos, sin = self.column_tables(positions, checked)
        cos, sin = cos.to(x.device)[:, None, :], sin.to(x.device)[:, None, :]
        xf = x.float()
        partner = xf[..., self.partner.to(x.device)]
        if not inverse:
            return xf * cos + sin * partner
        # modulus^2 of the pair's table entry: the same for both columns of a pair (1 when unscaled)
        return (xf * cos - sin * partner) / (cos * cos + sin * sin)

    def to(self, device) -> "RopeTable":
        if self.cos_sin.device == torch.device(device):
            return self
        return RopeTable(self.cos_sin.to(device), self.head_size, self.is_neox_style)


def rope_from_vllm(module) -> RopeTable:
    """The :class:`RopeTable` of a vLLM rotary embedding module (``layer.rotary_emb``).

    Accepts vLLM's ``RotaryEmbedding`` and the subclasses that only change how the cos/sin table
    is computed (linear, NTK, YaRN, Llama-3 scaling); anything with its own forward (M-RoPE,
    long-RoPE switching tables, Fourier RoPE, ...) raises ValueError naming the class.
    """
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    cls = type(module)
    same_math = (isinstance(module, RotaryEmbedding)
                 and all(getattr(cls, m) is getattr(RotaryEmbedding, m)
                         for m in ("forward_static", "forward_native", "forward_cuda", "forward_cpu")))
    if not same_math or getattr(module, "cos_sin_cache", None) is None:
        raise ValueError(
            f"key_space='pre_rope' needs a plain 1-D rotary embedding; this model's layers use "
            f"{cls.__module__}.{cls.__name__}, which rotates differently (allowed: vLLM RotaryEmbedding "
            "and its cos/sin-table variants). Use key_space='post_rope'.")
    return RopeTable(module.cos_sin_cache.detach(), int(module.head_size), bool(module.is_neox_style))


__all__ = ["RopeTable", "rope_from_vllm"]
