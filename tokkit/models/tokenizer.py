"""``Tokenizer`` = Encoder + any registered quantizer + Decoder.

Axis legend: B batch, H/W image size, h/w token grid, G index groups (grouped / residual quantizers), Z latent channels.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tokkit.config import TokenizerConfig
from tokkit.errors import ConfigError
from tokkit.models.autoencoder import Decoder, Encoder
from tokkit.quantizers.base import Quantizer, QuantizerOutput, build_quantizer


def encoder_kwargs(config: TokenizerConfig) -> dict[str, Any]:
    """The ``Encoder`` keyword arguments described by ``config``."""
    return {
        "in_channels": config.in_channels,
        "base_channels": config.base_channels,
        "channel_mult": list(config.channel_mult),
        "num_res_blocks": config.num_res_blocks,
        "attention": config.attention,
        "z_channels": config.z_channels,
    }


def decoder_kwargs(config: TokenizerConfig) -> dict[str, Any]:
    """The ``Decoder`` keyword arguments described by ``config``."""
    kw = encoder_kwargs(config)
    kw["out_channels"] = kw.pop("in_channels")
    kw["spatial_norm"] = config.spatial_norm
    return kw


def quantizer_from_config(config: TokenizerConfig) -> Quantizer:
    """Build the registered quantizer ``config.quantizer`` with ``dim=config.z_channels`` and its kwargs."""
    importlib.import_module("tokkit.quantizers")  # registers every family
    kwargs = dict(config.quantizer_kwargs)
    if "dim" in kwargs:
        raise ConfigError("tokenizer.quantizer_kwargs must not set 'dim': it is tokenizer.z_channels")
    return build_quantizer(config.quantizer, dim=config.z_channels, **kwargs)


class Tokenizer(nn.Module):
    """A discrete image tokenizer: images <-> integer token grids.

    Images are float tensors (B, 3, H, W) in [-1, 1]. For uint8 images use the helpers in ``tokkit.data``:
    ``to_float(uint8 (B, H, W, 3)) -> float (B, 3, H, W) in [-1, 1]`` before ``encode``, and
    ``to_uint8(float (B, 3, H, W)) -> uint8 (B, H, W, 3)`` after ``decode``::

        from tokkit.data import to_float, to_uint8
        ids = tok.encode(to_float(uint8_images))        # (B, h, w) int64
        out = to_uint8(tok.decode(ids))                  # (B, H, W, 3) uint8

    ``decode(encode(x))`` equals ``forward(x)[0].clamp(-1, 1)`` in eval mode (up to float rounding of the
    straight-through estimator).
    """

    def __init__(self, config: TokenizerConfig) -> None:
        """Build encoder, quantizer and decoder from ``config`` (weights randomly initialised)."""
        super().__init__()
        if isinstance(config, dict):
            config = TokenizerConfig.from_dict(config)
        self.config = config
        self.encoder = Encoder(**encoder_kwargs(config))
        self.quantizer = quantizer_from_config(config)
        self.decoder = Decoder(**decoder_kwargs(config))

    @classmethod
    def from_config(cls, config: TokenizerConfig | dict[str, Any]) -> Tokenizer:
        """Same as ``Tokenizer(config)``; also takes the dict form (``config.json``'s ``tokenizer``)."""
        if not isinstance(config, TokenizerConfig):
            config = TokenizerConfig.from_dict(config)
        return cls(config)

    # ---- properties ----------------------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        """Image side the tokenizer was built for."""
        return self.config.resolution

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) tokens per image at ``resolution``."""
        return self.config.token_grid

    @property
    def codebook_size(self) -> int:
        """Number of distinct token ids (per group)."""
        return int(self.quantizer.codebook_size)

    @property
    def bits_per_token(self) -> float:
        """Bits carried by one token position (all groups)."""
        return float(self.quantizer.bits_per_token)

    @property
    def index_dtype(self) -> np.dtype:
        """Smallest numpy dtype that holds every index."""
        return self.quantizer.index_dtype

    @property
    def index_shape(self) -> tuple[int, ...]:
        """Shape of one image's indices: (h, w), or (h, w, G) for grouped / residual quantizers."""
        g = int(getattr(self.quantizer, "num_groups", 1))
        return (*self.token_grid, g) if g > 1 else tuple(self.token_grid)

    # ---- the three operations ------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Reconstruct: (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W), unclamped; QuantizerOutput)."""
        z = self.encoder(images)  # (B, Z, h, w)
        q = self.quantizer(z)
        return self.decoder(q.codes), q

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float in [-1, 1] -> int64 token ids (B, h, w) or (B, h, w, G)."""
        self._check_images(images)
        was_training = self.quantizer.training
        self.quantizer.eval()  # never update codebook statistics (EMA, dead codes) while tokenizing
        try:
            return self.quantizer(self.encoder(images)).indices
        finally:
            self.quantizer.train(was_training)

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """int token ids (B, h, w[, G]) -> float images (B, 3, H, W) clamped to [-1, 1]."""
        if indices.is_floating_point():
            raise ConfigError(f"decode expects integer token ids, got {indices.dtype}")
        codes = self.quantizer.indices_to_codes(indices.long())  # (B, Z, h, w) float32
        param = next(self.decoder.parameters())
        return self.decoder(codes.to(param.dtype)).clamp(-1.0, 1.0)

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint folder (model.safetensors + config.json); see ``tokkit.checkpoint``."""
        from tokkit.checkpoint import save_checkpoint

        return save_checkpoint(self, path)

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"expected images (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ConfigError(
                f"expected float images in [-1, 1], got {images.dtype}: convert uint8 with tokkit.data.to_float"
            )


__all__ = ["Tokenizer", "decoder_kwargs", "encoder_kwargs", "quantizer_from_config"]
