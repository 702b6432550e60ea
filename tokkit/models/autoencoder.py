"""The VQGAN / MaskBit convolutional autoencoder: ``Encoder`` and ``Decoder`` with explicit keyword arguments.

Level i works at ``base_channels * channel_mult[i]`` channels; every level but the last halves the resolution, so the
downsampling factor is ``2 ** (len(channel_mult) - 1)``. Each level's residual blocks are each followed by a
self-attention block at the levels in ``attn_levels`` (taming / diffusers / LlamaGen place attention by resolution).
The middle (lowest resolution) has two residual blocks with optional self-attention between them. The decoder mirrors
the encoder, with its own number of residual blocks per level (taming, diffusers and LlamaGen use
``num_res_blocks + 1``). With ``spatial_norm`` the decoder's norms are MoVQ spatially conditional norms driven by the
quantized codes it decodes (``cond``).

State-dict layout (what peer converters map to; ``n = len(channel_mult)``, ``R`` res blocks per level)::

    encoder.conv_in.{weight,bias}
    encoder.levels.{i}.{j}       level i = 0 (full resolution) .. n-1; j walks the level's blocks in order:
                                 R ResBlocks, each followed by an AttnBlock when i is in attn_levels, then a Downsample
                                 when i < n-1. Without attention ResBlock r is j = r; with it ResBlock r is j = 2r and
                                 its AttnBlock j = 2r+1; the Downsample is the last j (R, or 2R with attention).
    encoder.mid.{0,1[,2]}        ResBlock, [AttnBlock when ``attention``], ResBlock
    encoder.norm_out.norm.{weight,bias}, encoder.conv_out.{weight,bias}
    decoder.conv_in.{weight,bias}, decoder.mid.{0,1[,2]} as the encoder's
    decoder.levels.{k}           k = 0 is the LOWEST resolution (decoding order): it is level i = n-1-k. Same block
                                 order with the decoder's R (``decoder_res_blocks``), AttnBlocks when i is in
                                 attn_levels, and an Upsample last when k < n-1.
    decoder.norm_out.norm.*, decoder.conv_out.{weight,bias}

    ResBlock:   norm1.norm.*, conv1.{weight,bias} (3x3), norm2.norm.*, conv2.{weight,bias} (3x3),
                shortcut.{weight,bias} (1x1; only when in and out channels differ)
    AttnBlock:  norm.norm.*, qkv.{weight,bias} (1x1 conv, 3C outputs = cat[q, k, v]), proj.{weight,bias} (1x1)
    Downsample / Upsample: conv.{weight,bias} (3x3; stride 2 after a (0, 1, 0, 1) pad / after nearest 2x upsampling)
    Norm (``*.norm.*``): a GroupNorm (gcd(C, 32) groups, eps 1e-6, affine) -> ``.norm.{weight,bias}``; with
                spatial_norm a SpatialNorm -> ``.norm.scale.{weight,bias}``, ``.norm.shift.{weight,bias}`` (1x1 convs
                from the condition's channels; its GroupNorm has no affine: see ``layers.fold_norm_affine``)

The ``Tokenizer`` around them adds ``quant_conv.*`` / ``post_quant_conv.*`` (1x1 convs, with ``quant_conv``) and
``quantizer.*`` (the quantizer's own).

Axis legend: B batch, C image channels, H/W image size, Z latent channels, h/w token grid (H/f, W/f),
Cz condition (code) channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from tokkit.errors import ConfigError
from tokkit.models.layers import AttnBlock, Downsample, Norm, ResBlock, Upsample, run_blocks


def _level_blocks(in_ch: int, out_ch: int, num_blocks: int, attn: bool, cond: int | None) -> list[nn.Module]:
    """``num_blocks`` ResBlocks in_ch -> out_ch, each followed by an AttnBlock when ``attn``."""
    blocks: list[nn.Module] = []
    for _ in range(num_blocks):
        blocks.append(ResBlock(in_ch, out_ch, cond))
        in_ch = out_ch
        if attn:
            blocks.append(AttnBlock(out_ch, cond))
    return blocks


def _mid(ch: int, attention: bool, cond: int | None) -> nn.ModuleList:
    attn = [AttnBlock(ch, cond)] if attention else []
    return nn.ModuleList([ResBlock(ch, ch, cond), *attn, ResBlock(ch, ch, cond)])


def _check_levels(attn_levels: Sequence[int], n: int) -> list[int]:
    levels = [int(i) for i in attn_levels]
    if any(not 0 <= i < n for i in levels):
        raise ConfigError(f"attn_levels {levels} must lie in [0, {n}) (one per channel_mult level)")
    return levels


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
        attn_levels: Sequence[int] = (),
        z_channels: int = 4,
    ) -> None:
        """Build the encoder.

        Args:
            in_channels: image channels.
            base_channels: channels of level 0.
            channel_mult: channel multiplier per level; ``len - 1`` downsamplings.
            num_res_blocks: residual blocks per level.
            attention: self-attention in the middle block.
            attn_levels: levels (0 = full resolution) whose residual blocks are each followed by self-attention.
            z_channels: output latent channels.
        """
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        attn_at = _check_levels(attn_levels, len(chans))
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.levels = nn.ModuleList()
        ch = chans[0]
        for i, out_ch in enumerate(chans):
            blocks = _level_blocks(ch, out_ch, num_res_blocks, i in attn_at, None)
            ch = out_ch if num_res_blocks else ch
            if i < len(chans) - 1:
                blocks.append(Downsample(ch))
            self.levels.append(nn.ModuleList(blocks))
        self.mid = _mid(ch, attention, None)
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
        attn_levels: Sequence[int] = (),
        z_channels: int = 4,
        spatial_norm: bool = False,
        cond_channels: int | None = None,
    ) -> None:
        """Build the decoder (the encoder's mirror).

        Args:
            out_channels: image channels.
            base_channels: channels of level 0 (the full-resolution level).
            channel_mult: channel multiplier per level, listed from full resolution down (as the encoder's).
            num_res_blocks: residual blocks per decoder level.
            attention: self-attention in the middle block.
            attn_levels: levels (encoder numbering: 0 = full resolution) whose residual blocks are each followed by
                self-attention.
            z_channels: input latent channels.
            spatial_norm: MoVQ: every norm is modulated by the condition (the codes, resized to each level).
            cond_channels: channels of the condition (default ``z_channels``); only with ``spatial_norm``.
        """
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        attn_at = _check_levels(attn_levels, len(chans))
        cond = (cond_channels or z_channels) if spatial_norm else None
        ch = chans[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = _mid(ch, attention, cond)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(chans))):
            blocks = _level_blocks(ch, chans[i], num_res_blocks, i in attn_at, cond)
            ch = chans[i] if num_res_blocks else ch
            if i > 0:
                blocks.append(Upsample(ch))
            self.levels.append(nn.ModuleList(blocks))
        self.norm_out = Norm(ch, cond)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, Z, h, w) [, condition (B, Cz, h, w), default ``z``] -> (B, C, H, W)."""
        cond = (z if cond is None else cond) if self.norm_out.conditional else None
        h = self.conv_in(z)
        h = run_blocks(self.mid, h, cond)
        for blocks in self.levels:
            h = run_blocks(blocks, h, cond)
        return self.conv_out(F.silu(self.norm_out(h, cond)))


__all__ = ["Decoder", "Encoder"]
