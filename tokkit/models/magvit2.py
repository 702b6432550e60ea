"""The MAGVIT-v2-style convolutional autoencoder of Open-MAGVIT2 and MaskBit: ``Encoder`` and ``Decoder``.

Compared with the VQGAN autoencoder (``tokkit.models.autoencoder``) it has no attention, bias-free 3x3 convolutions
in the residual blocks, a 1x1 ``conv_out`` in the encoder, ``num_res_blocks`` residual blocks in the middle, and
residual blocks at a level's *input* width followed by the resampling. The two peers differ in four places, each a
keyword argument (``TokenizerConfig.arch_kwargs``; ``variant`` picks a preset, any switch given overrides it;
the encoder takes ``downsample``, the decoder ``upsample`` and ``adaptive_norm``, both ``shortcut``):

=================  =========================================  =============================================
keyword            Open-MAGVIT2 (``"open-magvit2"`` preset)   MaskBit (``"maskbit"`` preset)
=================  =========================================  =============================================
``downsample``     ``"conv_sym"``: 3x3 stride 2, padding 1    ``"conv_same"``: 3x3 stride 2, TF ``SAME``
                                                              padding (right/bottom); ``"avgpool"`` without
                                                              ``sample_with_conv``
``upsample``       ``"depth_to_space"``: 3x3 conv to 4C then  ``"nearest_conv"``: nearest x2 then 3x3 conv
                   depth-to-space (DCR order)
``shortcut``       ``"input"``: 1x1 conv of the block input   ``"output"``: 1x1 conv (out -> out) of the
                                                              residual branch's output, as MaskBit's code does
``adaptive_norm``  ``True``: an adaptive GroupNorm before     ``False``
                   each decoder level, driven by the mean and
                   std of the decoded codes
=================  =========================================  =============================================

State-dict layout (the converters in ``tokkit.peers`` map the peers' keys onto it; L = ``len(channel_mult)``)::

    encoder.conv_in.weight                                   3x3, no bias
    encoder.levels.{i}.{j}.{norm1,conv1,norm2,conv2,shortcut}   i = 0..L-1 (full resolution first), j < num_res_blocks
    encoder.levels.{i}.{num_res_blocks}.conv.{weight,bias}   downsampling of level i < L-1 (none for "avgpool")
    encoder.mid.{j}.*                                        j < num_res_blocks
    encoder.norm_out, encoder.conv_out                       conv_out is 1x1 with bias
    decoder.conv_in.{weight,bias}
    decoder.mid.{j}.*
    decoder.levels.{k}.*                                     k = 0..L-1, k = 0 the lowest resolution (level L-1-k):
        .norm.{gamma,beta}.{weight,bias}                     adaptive_norm only
        .blocks.{j}.*                                        j < num_res_blocks
        .upsample.conv.{weight,bias}                         every k < L-1
    decoder.norm_out, decoder.conv_out

Residual blocks: ``norm1, conv1, norm2, conv2`` and ``shortcut`` (a bias-free 1x1 conv, only when the width changes).

Axis legend: B batch, C image channels, H/W image size, Z latent channels, h/w token grid (H/f, W/f).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from tokkit.errors import ConfigError
from tokkit.models.layers import num_groups_for

PRESETS: dict[str, dict[str, Any]] = {
    "open-magvit2": {
        "downsample": "conv_sym",
        "upsample": "depth_to_space",
        "shortcut": "input",
        "adaptive_norm": True,
    },
    "maskbit": {"downsample": "conv_same", "upsample": "nearest_conv", "shortcut": "output", "adaptive_norm": False},
}
_CHOICES = {
    "downsample": ("conv_sym", "conv_same", "avgpool"),
    "upsample": ("depth_to_space", "nearest_conv"),
    "shortcut": ("input", "output"),
}


def resolve_arch(variant: str, **given: Any) -> dict[str, Any]:
    """``variant``'s preset with every switch given (not None) in ``given`` overriding it.

    Returns:
        ``{"downsample", "upsample", "shortcut", "adaptive_norm"}``, validated (``ConfigError`` naming the choices).
    """
    if variant not in PRESETS:
        raise ConfigError(f"tokenizer.arch_kwargs.variant must be one of {', '.join(PRESETS)}, got {variant!r}")
    arch = dict(PRESETS[variant])
    arch.update({k: v for k, v in given.items() if v is not None})
    for key, choices in _CHOICES.items():
        if arch[key] not in choices:
            raise ConfigError(f"tokenizer.arch_kwargs.{key} must be one of {', '.join(choices)}, got {arch[key]!r}")
    arch["adaptive_norm"] = bool(arch["adaptive_norm"])
    return arch


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when ``channels`` is not a multiple of 32), eps 1e-6."""
    return nn.GroupNorm(num_groups_for(channels), channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    """(GroupNorm, SiLU, bias-free conv3x3) x 2 plus a shortcut; a bias-free 1x1 shortcut conv when widths differ.

    ``shortcut="input"``: ``out = h + conv1x1(x)``; ``shortcut="output"`` (MaskBit): ``out = h + conv1x1(h)``; with
    equal widths ``out = h + x`` either way.
    """

    def __init__(self, in_channels: int, out_channels: int, shortcut: str = "input") -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.from_output = shortcut == "output" and in_channels != out_channels
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(out_channels if self.from_output else in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.shortcut(h if self.from_output else x)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (symmetric or TF ``SAME`` padding) or 2x2 average pooling."""

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode != "avgpool":  # (the peers' downsampling convs have a bias)
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1 if mode == "conv_sym" else 0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2) (H, W even)."""
        if self.mode == "avgpool":
            return F.avg_pool2d(x, 2, 2)
        if self.mode == "conv_same":
            x = F.pad(x, (0, 1, 0, 1))  # TF SAME for an even side: 0 before, 1 after
        return self.conv(x)


def depth_to_space(x: Tensor, block: int = 2) -> Tensor:
    """Depth-to-space in DCR order (TF's default; not ``pixel_shuffle``'s CRD): (B, s*s*C, h, w) -> (B, C, s*h, s*w).

    Input channel ``(i * s + j) * C + c`` lands at output channel ``c``, row offset ``i``, column offset ``j``.
    """
    b, c, h, w = x.shape
    c_out = c // (block * block)
    x = x.view(b, block, block, c_out, h, w)  # (B, s, s, C, h, w)
    x = x.permute(0, 3, 4, 1, 5, 2)  # (B, C, h, s, w, s)
    return x.reshape(b, c_out, h * block, w * block)


class Upsample(nn.Module):
    """Double H and W: a 3x3 conv to 4C then depth-to-space, or nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        out = 4 * channels if mode == "depth_to_space" else channels
        self.conv = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        if self.mode == "depth_to_space":
            return depth_to_space(self.conv(x), 2)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AdaptiveGroupNorm(nn.Module):
    """Open-MAGVIT2's adaptive GroupNorm: ``GN(x) * gamma(std(z)) + beta(mean(z))``, statistics over z's h*w.

    ``std`` is ``sqrt(var + eps)`` with the unbiased variance (``Tensor.var``'s default), as the peer computes it.
    """

    def __init__(self, z_channels: int, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = group_norm(channels, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """x (B, C, H, W), z (B, Z, h, w) -> (B, C, H, W)."""
        flat = z.flatten(2)  # (B, Z, h*w)
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())[..., None, None]  # (B, C, 1, 1)
        shift = self.beta(flat.mean(dim=-1))[..., None, None]  # (B, C, 1, 1)
        return self.norm(x) * scale + shift


class Encoder(nn.Module):
    """Images (B, C, H, W) -> latents (B, Z, h, w)."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 4,
        z_channels: int = 18,
        variant: str = "open-magvit2",
        downsample: str | None = None,
        shortcut: str | None = None,
    ) -> None:
        """Build the encoder.

        Args:
            in_channels: image channels.
            base_channels: channels of level 0.
            channel_mult: channel multiplier per level; ``len - 1`` downsamplings.
            num_res_blocks: residual blocks per level and in the middle.
            z_channels: output latent channels.
            variant: preset of the switches below, ``"open-magvit2"`` or ``"maskbit"``.
            downsample: ``"conv_sym"``, ``"conv_same"`` or ``"avgpool"`` (None: the preset's).
            shortcut: ``"input"`` or ``"output"`` (None: the preset's).
        """
        super().__init__()
        arch = resolve_arch(variant, downsample=downsample, shortcut=shortcut)
        chans = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.levels = nn.ModuleList()
        ch = chans[0]
        for i, out_ch in enumerate(chans):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, arch["shortcut"]))
                ch = out_ch
            if i < len(chans) - 1:
                blocks.append(Downsample(ch, arch["downsample"]))
            self.levels.append(nn.ModuleList(blocks))
        self.mid = nn.ModuleList(ResBlock(ch, ch, arch["shortcut"]) for _ in range(num_res_blocks))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, Z, h, w)."""
        h = self.conv_in(x)
        for blocks in self.levels:
            for block in blocks:
                h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DecoderLevel(nn.Module):
    """One decoder resolution: optional adaptive norm, residual blocks, optional upsampling."""

    def __init__(
        self, in_ch: int, out_ch: int, num_blocks: int, z_channels: int, arch: dict[str, Any], upsample: bool
    ) -> None:
        super().__init__()
        self.norm = AdaptiveGroupNorm(z_channels, in_ch) if arch["adaptive_norm"] else None
        blocks = []
        for _ in range(num_blocks):
            blocks.append(ResBlock(in_ch, out_ch, arch["shortcut"]))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.upsample = Upsample(out_ch, arch["upsample"]) if upsample else None

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        """h (B, Cin, H, W), z (B, Z, h, w) the decoded codes -> (B, Cout, H or 2H, W or 2W)."""
        if self.norm is not None:
            h = self.norm(h, z)
        for block in self.blocks:
            h = block(h)
        return self.upsample(h) if self.upsample is not None else h


class Decoder(nn.Module):
    """Quantized codes (B, Z, h, w) -> images (B, C, H, W) (unclamped)."""

    def __init__(
        self,
        *,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 4,
        z_channels: int = 18,
        variant: str = "open-magvit2",
        upsample: str | None = None,
        shortcut: str | None = None,
        adaptive_norm: bool | None = None,
    ) -> None:
        """Build the decoder (the encoder's mirror).

        Args:
            out_channels: image channels.
            base_channels: channels of level 0 (the full-resolution level).
            channel_mult: channel multiplier per level, listed from full resolution down (as the encoder's).
            num_res_blocks: residual blocks per level and in the middle.
            z_channels: input latent channels.
            variant: preset of the switches below, ``"open-magvit2"`` or ``"maskbit"``.
            upsample: ``"depth_to_space"`` or ``"nearest_conv"`` (None: the preset's).
            shortcut: ``"input"`` or ``"output"`` (None: the preset's).
            adaptive_norm: an adaptive GroupNorm before each level (None: the preset's).
        """
        super().__init__()
        arch = resolve_arch(variant, upsample=upsample, shortcut=shortcut, adaptive_norm=adaptive_norm)
        chans = [base_channels * m for m in channel_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = nn.ModuleList(ResBlock(ch, ch, arch["shortcut"]) for _ in range(num_res_blocks))
        self.levels = nn.ModuleList()
        for i in reversed(range(len(chans))):
            self.levels.append(DecoderLevel(ch, chans[i], num_res_blocks, z_channels, arch, upsample=i > 0))
            ch = chans[i]
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """(B, Z, h, w) -> (B, C, H, W); the adaptive norms read the statistics of ``z`` itself (Open-MAGVIT2)."""
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.levels:
            h = level(h, z)
        return self.conv_out(F.silu(self.norm_out(h)))


__all__ = ["PRESETS", "AdaptiveGroupNorm", "Decoder", "Encoder", "ResBlock", "depth_to_space", "resolve_arch"]
