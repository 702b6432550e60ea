"""The VQGAN / MaskBit convolutional autoencoder: ``Encoder`` and ``Decoder`` with explicit keyword arguments.

Level i works at ``base_channels * channel_mult[i]`` channels; every level but the last halves the resolution, so the
downsampling factor is ``2 ** (len(channel_mult) - 1)``. The middle (lowest resolution) has two residual blocks
with optional self-attention between them. With ``spatial_norm`` the decoder's norms are MoVQ spatially conditional
norms driven by the quantized codes it decodes.

Axis legend: B batch, C image channels, H/W image size, Z latent channels, h/w token grid (H/f, W/f).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tokkit.models.layers import AttnBlock, Downsample, Norm, ResBlock, Upsample, run_blocks


class Encoder(nn.Module):
    """Images (B, C, H, W) -> latents (B, Z, h, w)."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention: bool = False,
        z_channels: int = 4,
    ) -> None:
        """Build the encoder.

        Args:
            in_channels: image channels.
            base_channels: channels of level 0.
            channel_mult: channel multiplier per level; ``len - 1`` downsamplings.
            num_res_blocks: residual blocks per level.
            attention: self-attention in the middle block.
            z_channels: output latent channels.
        """
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.levels = nn.ModuleList()
        ch = chans[0]
        for i, out_ch in enumerate(chans):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch))
                ch = out_ch
            if i < len(chans) - 1:
                blocks.append(Downsample(ch))
            self.levels.append(nn.ModuleList(blocks))
        mid: list[nn.Module] = [ResBlock(ch, ch)]
        if attention:
            mid.append(AttnBlock(ch))
        mid.append(ResBlock(ch, ch))
        self.mid = nn.ModuleList(mid)
        self.norm_out = Norm(ch)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, Z, h, w)."""
        h = self.conv_in(x)
        for blocks in self.levels:
            h = run_blocks(blocks, h)
        h = run_blocks(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents or quantized codes (B, Z, h, w) -> images (B, C, H, W) (unclamped)."""

    def __init__(
        self,
        *,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention: bool = False,
        z_channels: int = 4,
        spatial_norm: bool = False,
    ) -> None:
        """Build the decoder (the encoder's mirror).

        Args:
            out_channels: image channels.
            base_channels: channels of level 0 (the full-resolution level).
            channel_mult: channel multiplier per level, listed from full resolution down (as the encoder's).
            num_res_blocks: residual blocks per level.
            attention: self-attention in the middle block.
            z_channels: input latent channels.
            spatial_norm: MoVQ: every norm is modulated by the input codes (resized to each level).
        """
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        cond = z_channels if spatial_norm else None
        ch = chans[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        mid: list[nn.Module] = [ResBlock(ch, ch, cond)]
        if attention:
            mid.append(AttnBlock(ch, cond))
        mid.append(ResBlock(ch, ch, cond))
        self.mid = nn.ModuleList(mid)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(chans))):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, chans[i], cond))
                ch = chans[i]
            if i > 0:
                blocks.append(Upsample(ch))
            self.levels.append(nn.ModuleList(blocks))
        self.norm_out = Norm(ch, cond)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """(B, Z, h, w) -> (B, C, H, W)."""
        cond = z if self.norm_out.conditional else None
        h = self.conv_in(z)
        h = run_blocks(self.mid, h, cond)
        for blocks in self.levels:
            h = run_blocks(blocks, h, cond)
        return self.conv_out(F.silu(self.norm_out(h, cond)))


__all__ = ["Decoder", "Encoder"]
