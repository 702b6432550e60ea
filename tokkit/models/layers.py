"""Small building blocks of the autoencoder: norms, residual block, attention, down/upsampling.

Axis legend: B batch, C channels, H/W spatial, Cz channels of the conditioning codes (MoVQ spatial norm).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` that is <= ``max_groups``."""
    return math.gcd(channels, max_groups)


class SpatialNorm(nn.Module):
    """MoVQ spatially conditional normalization: ``GroupNorm(f) * scale(zq) + shift(zq)``, zq resized to f.

    The GroupNorm has no affine parameters: an affine one (diffusers' ``SpatialNorm.norm_layer``) folds exactly into
    ``scale`` and ``shift`` with ``fold_norm_affine``.
    """

    def __init__(self, channels: int, cond_channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups_for(channels), channels, eps=1e-6, affine=False)
        self.scale = nn.Conv2d(cond_channels, channels, 1)
        self.shift = nn.Conv2d(cond_channels, channels, 1)
        # start as a plain GroupNorm with unit gain
        nn.init.zeros_(self.scale.weight)
        nn.init.ones_(self.scale.bias)
        nn.init.zeros_(self.shift.weight)
        nn.init.zeros_(self.shift.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x (B, C, H, W), cond (B, Cz, h, w) -> (B, C, H, W)."""
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="nearest")
        return self.norm(x) * self.scale(cond) + self.shift(cond)


def fold_norm_affine(
    gamma: Tensor, beta: Tensor, scale_w: Tensor, scale_b: Tensor, shift_w: Tensor, shift_b: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold an affine GroupNorm ``(gamma, beta)`` into a ``SpatialNorm``'s 1x1 convs.

    ``(n * gamma + beta) * (Ws zq + bs) + (Wt zq + bt)``
    ``= n * (gamma Ws zq + gamma bs) + ((Wt + beta Ws) zq + bt + beta bs)`` with ``n`` the plain GroupNorm output:
    the same function up to float rounding.

    Args:
        gamma: (C,) GroupNorm weight.
        beta: (C,) GroupNorm bias.
        scale_w: (C, Cz, 1, 1) weight of the conv giving the scale (diffusers' ``conv_y``).
        scale_b: (C,) its bias.
        shift_w: (C, Cz, 1, 1) weight of the conv giving the shift (diffusers' ``conv_b``).
        shift_b: (C,) its bias.

    Returns:
        (scale.weight, scale.bias, shift.weight, shift.bias) for ``SpatialNorm``.
    """
    g, b = gamma.reshape(-1, 1, 1, 1), beta.reshape(-1, 1, 1, 1)  # (C, 1, 1, 1)
    return g * scale_w, gamma * scale_b, shift_w + b * scale_w, shift_b + beta * scale_b


class Norm(nn.Module):
    """GroupNorm, or ``SpatialNorm`` when ``cond_channels`` is given; ``forward(x, cond=None)`` either way."""

    def __init__(self, channels: int, cond_channels: int | None = None) -> None:
        super().__init__()
        if cond_channels:
            self.norm: nn.Module = SpatialNorm(channels, cond_channels)
        else:
            self.norm = nn.GroupNorm(num_groups_for(channels), channels, eps=1e-6)
        self.conditional = bool(cond_channels)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.norm(x, cond) if self.conditional else self.norm(x)


class ResBlock(nn.Module):
    """Pre-activation residual block: (norm, SiLU, conv3x3) x 2, 1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, cond_channels: int | None = None) -> None:
        super().__init__()
        self.norm1 = Norm(in_channels, cond_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Norm(out_channels, cond_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, Cin, H, W) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x, cond)))
        h = self.conv2(F.silu(self.norm2(h, cond)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, cond_channels: int | None = None) -> None:
        super().__init__()
        self.norm = Norm(channels, cond_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x, cond)).chunk(3, dim=1)  # 3 x (B, C, H, W)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (q, k, v))  # (B, 1, H*W, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (VQGAN's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_blocks(blocks: nn.ModuleList, x: Tensor, cond: Tensor | None = None) -> Tensor:
    """Apply a list of blocks in order; blocks that take a condition (ResBlock, AttnBlock) get ``cond``."""
    for block in blocks:
        x = block(x, cond) if isinstance(block, (ResBlock, AttnBlock)) else block(x)
    return x


__all__ = [
    "AttnBlock",
    "Downsample",
    "Norm",
    "ResBlock",
    "SpatialNorm",
    "Upsample",
    "fold_norm_affine",
    "num_groups_for",
    "run_blocks",
]
