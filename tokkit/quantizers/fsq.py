"""Finite Scalar Quantization (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the ``d = len(levels)`` latent channels is bounded and rounded to one of ``levels[i]`` integer values; the
token index is the mixed-radix number formed by the per-channel digits (channel 0 is the least significant digit).
There is no codebook to learn and no auxiliary loss.

Bounding. For a channel with ``L`` levels the bounded value is ``tanh(z + shift) * h - offset`` with
``h = (L - 1)(1 + eps) / 2``, ``offset = 0.5`` for even ``L`` (0 for odd) and ``shift = atanh(offset / h)``, so that
``z = 0`` maps to 0 and rounding reaches exactly the ``L`` integers ``-(L // 2) .. (L - 1) // 2``. (The published
reference code computed ``shift`` with ``tan`` instead of ``atanh``; the slip moves the zero point for even levels.)
Codes are the rounded values divided by ``L // 2``, so they lie in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokkit.errors import ConfigError
from tokkit.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, entropy_bits, register_quantizer

# the paper's recommended levels per target codebook size (Table 1 of Mentzer et al.)
FSQ_LEVELS: dict[int, list[int]] = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
}


def levels_for(codebook_size: int) -> list[int]:
    """The paper's levels for a codebook size of 2^8, 2^10, 2^12, 2^14 or 2^16.

    Raises:
        ConfigError: for any other size (pass ``levels`` explicitly then).
    """
    if codebook_size not in FSQ_LEVELS:
        sizes = ", ".join(f"2^{int(math.log2(k))}" for k in FSQ_LEVELS)
        raise ConfigError(f"no FSQ levels for codebook_size={codebook_size}; use one of {sizes} or pass levels=[...]")
    return list(FSQ_LEVELS[codebook_size])


def _to_channels_last(x: Tensor) -> Tensor:
    """(B, D, *S) -> (B, *S, D)."""
    return x.movedim(1, -1)


def _to_channels_first(x: Tensor) -> Tensor:
    """(B, *S, D) -> (B, D, *S)."""
    return x.movedim(-1, 1)


@register_quantizer("fsq")
class FSQ(Quantizer):
    """Finite Scalar Quantization.

    Args:
        dim: input channels D. When D differs from ``len(levels)``, linear projections map D -> d and back.
        levels: number of levels per quantized channel (each >= 2).
        codebook_size: alternative to ``levels``: one of the sizes in ``FSQ_LEVELS`` (resolved by ``levels_for``;
            the table's levels give approximately that many codes, e.g. 2^16 -> 64000, and ``self.codebook_size``
            is always the exact product of the levels).
        eps: widens the bounding range slightly so the outermost levels are reached.
    """

    def __init__(
        self,
        dim: int,
        levels: Sequence[int] | None = None,
        codebook_size: int | None = None,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        if levels is None and codebook_size is None:
            raise ConfigError("FSQ needs levels=[...] or codebook_size=...")
        if levels is None:
            levels = levels_for(int(codebook_size))
        elif (
            codebook_size is not None
            and int(codebook_size) != math.prod(levels)
            and (int(codebook_size) not in FSQ_LEVELS or levels_for(int(codebook_size)) != list(levels))
        ):
            raise ConfigError(f"FSQ levels {list(levels)} do not give codebook_size={codebook_size}; pass only one")
        levels = [int(v) for v in levels]
        if not levels:
            raise ConfigError("FSQ levels must not be empty; e.g. levels=[8, 5, 5, 5]")
        if any(v < 2 for v in levels):
            raise ConfigError(f"every FSQ level must be >= 2, got {levels}")
        size = math.prod(levels)
        if size > 2**62:
            raise ConfigError(f"FSQ levels {levels} give {size} codes; at most 2^62 fit an int64 index")
        if dim < 1:
            raise ConfigError(f"FSQ dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.levels = levels
        self.codebook_size = size
        self.num_groups = 1
        self.eps = float(eps)
        d = len(levels)
        self.codebook_dim = d

        # derived buffers computed on the CPU even under a meta-device context (where configs are checked): arithmetic
        # on meta tensors goes through torch's decompositions, which import torch._dynamo (~1 s of every start-up)
        lv = torch.tensor(levels, dtype=torch.int64, device="cpu")
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64, device="cpu"), lv[:-1]]), 0)
        half_l = (lv.double() - 1) * (1 + self.eps) / 2
        offset = (lv % 2 == 0).double() * 0.5
        # non-persistent: derived from `levels`, so checkpoints only hold learnable state
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("_digit_offset", lv // 2, persistent=False)

        self.project_in: nn.Module = nn.Linear(dim, d) if dim != d else nn.Identity()
        self.project_out: nn.Module = nn.Linear(d, dim) if dim != d else nn.Identity()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, levels={self.levels}, codebook_size={self.codebook_size}"

    # -- pieces --------------------------------------------------------------------------------------------------------

    def bound(self, z: Tensor) -> Tensor:
        """(..., d) -> (..., d) values whose rounding reaches exactly the integers -(L // 2) .. (L - 1) // 2."""
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def indices_to_levels(self, indices: Tensor) -> Tensor:
        """(...,) int -> (..., d) float32 normalized codes in [-1, 1] (before the output projection)."""
        idx = indices.long().unsqueeze(-1)
        digits = torch.div(idx, self._basis, rounding_mode="floor") % self._levels  # (..., d) int64
        return (digits - self._digit_offset).float() / self._half_width

    @staticmethod
    def _per_channel(buf: Tensor, ndim: int) -> Tensor:
        """(d,) -> (1, d, 1, ...) broadcasting over channel-first (B, d, *S)."""
        return buf.view(1, -1, *([1] * (ndim - 2)))

    def _project_in(self, x: Tensor) -> Tensor:
        """(B, D, *S) -> (B, d, *S); the math then stays channel-first (no layout copies without projections)."""
        if isinstance(self.project_in, nn.Identity):
            return x
        return _to_channels_first(self.project_in(_to_channels_last(x)))

    def _project_out(self, codes: Tensor) -> Tensor:
        """(B, d, *S) -> (B, D, *S), one code path for ``quantize`` and ``indices_to_codes``."""
        if isinstance(self.project_out, nn.Identity):
            return codes
        return _to_channels_first(self.project_out(_to_channels_last(codes).contiguous()))

    # -- contract ------------------------------------------------------------------------------------------------------

    def quantize(self, x: Tensor) -> QuantizerOutput:
        """x: (B, D, *S) float32 -> codes (B, D, *S), indices (B, *S), zero loss, usage stats."""
        z = self._project_in(x)  # (B, d, *S)
        nd = z.dim()
        bounded = torch.tanh(z + self._per_channel(self._shift, nd)) * self._per_channel(self._half_l, nd)
        bounded = bounded - self._per_channel(self._offset, nd)
        rounded = bounded.detach().round()
        # straight-through with an exact forward value: (b - b.detach()) is exactly 0
        codes = (rounded + (bounded - bounded.detach())) / self._per_channel(self._half_width, nd)  # in [-1, 1]
        # a NaN latent (a diverging run) takes the middle digit so that its index stays valid; its code stays NaN
        safe = rounded.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        digits = safe.long() + self._per_channel(self._digit_offset, nd)  # (B, d, *S) in [0, L), exact
        indices = (digits * self._per_channel(self._basis, nd)).sum(1)  # mixed radix: (B, d, *S) -> (B, *S)
        stats = batch_usage_stats(indices, self.codebook_size)
        return QuantizerOutput(codes=self._project_out(codes), indices=indices, loss=x.new_zeros(()), stats=stats)

    def _digit_counts(self, indices: Tensor) -> Tensor:
        """(...,) int indices -> (d, max(levels)) int64: how often each channel takes each digit (level)."""
        d, top = self.codebook_dim, int(max(self.levels))
        digits = torch.div(indices.long().reshape(-1, 1), self._basis, rounding_mode="floor") % self._levels  # (N, d)
        slots = (digits + torch.arange(d, device=digits.device) * top).flatten()  # channel c -> [c*top, (c+1)*top)
        return torch.bincount(slots, minlength=d * top).view(d, top)  # (d, top)

    def level_usage(self, indices: Tensor) -> Tensor:
        """(...,) int indices -> (d,) fraction of each channel's levels they use.

        Not part of ``forward``'s stats (it would cost as much as the quantization itself); call it on the indices of
        an evaluation run.
        """
        return (self._digit_counts(indices) > 0).sum(1).float() / self._levels.float()

    def usage_counts(self, indices: Tensor) -> dict[str, Tensor]:
        """``{"levels": (d, max(levels))}``: how often each channel takes each level, on the CPU."""
        return {"levels": self._digit_counts(indices).cpu()}

    def usage_report(self, counts: dict[str, Tensor]) -> dict[str, Any]:
        """``{"levels": ...}``: per channel its levels, the levels used, their entropy (of at most log2 L bits) and
        the count of each level."""
        rows = [counts["levels"][d, :L].numpy() for d, L in enumerate(self.levels)]
        return {
            "levels": {
                "levels": list(self.levels),
                "used": [int((r > 0).sum()) for r in rows],
                "entropy_bits": [entropy_bits(r) for r in rows],
                "max_entropy_bits": [math.log2(L) for L in self.levels],
                "counts": [r.tolist() for r in rows],
            }
        }

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, *S) int -> (B, D, *S) float32, equal to ``forward``'s codes."""
        if indices.is_floating_point():
            raise ConfigError(f"FSQ indices must be an integer tensor, got {indices.dtype}")
        nd = indices.dim() + 1
        idx = indices.long().unsqueeze(1)  # (B, *S) -> (B, 1, *S)
        digits = torch.div(idx, self._per_channel(self._basis, nd), rounding_mode="floor")
        digits = digits % self._per_channel(self._levels, nd)  # (B, d, *S)
        codes = (digits - self._per_channel(self._digit_offset, nd)).float() / self._per_channel(self._half_width, nd)
        return self._project_out(codes)
