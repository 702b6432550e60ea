"""LlamaGen VQ tokenizers (Sun et al., 2024) -> a tokkit ``Tokenizer``.

Source: https://github.com/FoundationVision/LlamaGen (MIT), ``tokenizer/tokenizer_image/vq_model.py``. The released
``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt`` and ``vq_ds16_t2i.pt`` hold ``{"model": state_dict}`` (the registry unwraps it);
there is no side config: the architecture is read from the weights' shapes.

Exact correspondence (see ``tokkit.models.autoencoder`` for tokkit's key layout):

- ``encoder.conv_blocks.{i}`` (``res`` ResnetBlocks, ``attn`` AttnBlocks after each of them on the last level,
  ``downsample``) is tokkit's ``encoder.levels.{i}``; ``decoder.conv_blocks.{k}`` (``num_res_blocks + 1`` blocks,
  attention on the first = lowest-resolution level, ``upsample``) is ``decoder.levels.{k}`` (both run from the lowest
  resolution); ``mid`` (ResnetBlock, AttnBlock, ResnetBlock) is ``mid.{0,1,2}``.
- q, k, v 1x1 convs are concatenated into tokkit's fused ``qkv``.
- ``quant_conv`` (z_channels -> codebook_embed_dim = 8) / ``post_quant_conv`` are tokkit's; the l2-normalized
  codebook (``codebook_l2_norm=True``: latents and codes normalized, nearest by distance between unit vectors) is
  tokkit's ``vq`` with ``cosine=True`` and a loss-learned codebook (normalized at lookup, as LlamaGen does); loss
  weights as LlamaGen's (codebook 1, commitment beta = 0.25). ``quantize.codebook_used`` (a training-time usage
  window) is dropped.

Axis legend: K codes, E code dim (``codebook_embed_dim``), Z latent channels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from torch import Tensor

from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError, ConfigError
from tokkit.peers import PeerFamily, count_indexed, register_family, shape_dim
from tokkit.peers._vqgan_keys import KeyMover, check_group_norm_channels, vq_buffers

NAME = "llamagen"
LICENSE = "MIT"
URL = "https://github.com/FoundationVision/LlamaGen"
DEFAULT_RESOLUTION = 256  # the c2i tokenizers' training and evaluation resolution
_VARIANT = re.compile(r"vq_ds(\d+)_(c2i|t2i)")


def detect(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> bool:
    """A LlamaGen ``VQModel`` state dict: its ``conv_blocks`` module names and a ``VectorQuantizer`` codebook."""
    return "quantize.embedding.weight" in state and "encoder.conv_blocks.0.res.0.conv1.weight" in state


def architecture(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The VQ model's architecture, read from the weights' shapes.

    Args:
        state: the unwrapped state dict.
        extra: optional hints: ``resolution`` (default 256), ``codebook_l2_norm`` (default true, as every release).

    Returns:
        dict with ch, ch_mult, num_res_blocks, decoder_res_blocks, attn_levels, z_channels, embed_dim,
        codebook_size, l2_norm, resolution.

    Raises:
        CheckpointError: not a supported LlamaGen VQ state dict.
    """
    if not detect(state, extra):
        raise CheckpointError("not a LlamaGen VQ state dict (needs encoder.conv_blocks.*, quantize.embedding.weight)")
    n = count_indexed(state, "encoder.conv_blocks.{}.res.0.conv1.weight")
    ch = shape_dim(state, "encoder.conv_in.weight", 0, NAME)
    chans = [shape_dim(state, f"encoder.conv_blocks.{i}.res.0.conv2.weight", 0, NAME) for i in range(n)]
    if any(c % ch for c in chans):
        raise CheckpointError(f"LlamaGen encoder level channels {chans} are not multiples of conv_in's {ch}")
    attn = [i for i in range(n) if f"encoder.conv_blocks.{i}.attn.0.q.weight" in state]
    dec_attn = sorted(n - 1 - k for k in range(n) if f"decoder.conv_blocks.{k}.attn.0.q.weight" in state)
    if attn != dec_attn:
        raise CheckpointError(f"LlamaGen encoder attention at levels {attn} but decoder at {dec_attn}: unsupported")
    k, e = (int(s) for s in state["quantize.embedding.weight"].shape)  # (K, E)
    z = shape_dim(state, "encoder.conv_out.weight", 0, NAME)
    check_group_norm_channels("LlamaGen", chans)
    l2, res = extra.get("codebook_l2_norm", True), extra.get("resolution", DEFAULT_RESOLUTION)
    if not isinstance(l2, bool) or isinstance(res, bool) or not isinstance(res, int):
        raise CheckpointError(
            f"LlamaGen hints: codebook_l2_norm must be true or false and resolution an integer, got {l2!r}, {res!r}"
        )
    return {
        "ch": ch,
        "ch_mult": [c // ch for c in chans],
        "num_res_blocks": count_indexed(state, "encoder.conv_blocks.0.res.{}.conv1.weight"),
        "decoder_res_blocks": count_indexed(state, "decoder.conv_blocks.0.res.{}.conv1.weight"),
        "attn_levels": attn,
        "z_channels": z,
        "embed_dim": e,
        "codebook_size": k,
        "l2_norm": l2,
        "resolution": res,
    }


def config_for(arch: Mapping[str, Any]) -> TokenizerConfig:
    """The tokkit ``TokenizerConfig`` of a LlamaGen VQ architecture (as ``architecture`` returns it)."""
    try:
        return TokenizerConfig(
            resolution=arch["resolution"],
            base_channels=arch["ch"],
            channel_mult=list(arch["ch_mult"]),
            num_res_blocks=arch["num_res_blocks"],
            attention=True,
            z_channels=arch["z_channels"],
            quantizer="vq",
            quantizer_kwargs={"codebook_size": arch["codebook_size"], "cosine": arch["l2_norm"], "ema": False,
                              "commitment_weight": 0.25, "codebook_weight": 1.0},
            attn_levels=list(arch["attn_levels"]),
            decoder_res_blocks=arch["decoder_res_blocks"],
            quant_conv=True,
            embed_dim=arch["embed_dim"],
        )
    except ConfigError as e:
        raise CheckpointError(f"LlamaGen checkpoint does not make a valid tokkit config: {e}") from None


def variant_name(factor: int, extra: Mapping[str, Any]) -> str:
    """``vq_ds{factor}`` plus ``_c2i`` / ``_t2i`` when ``extra`` names it (``variant``, or the ``source`` file name).

    The two ds16 releases have the same shapes, so only the name tells them apart.

    Raises:
        CheckpointError: a hint naming another downsampling factor than the weights'.
    """
    hint = extra.get("variant") or PurePath(str(extra.get("source", ""))).stem
    m = _VARIANT.search(str(hint))
    if m is None:
        return f"vq_ds{factor}"
    if int(m.group(1)) != factor:
        raise CheckpointError(f"LlamaGen variant {m.group(0)!r} names ds{m.group(1)} but the weights are ds{factor}")
    return m.group(0)


def convert(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> tuple[TokenizerConfig, dict[str, Tensor], str]:
    """Convert a LlamaGen ``VQModel`` state dict.

    Args:
        state: the unwrapped state dict (``checkpoint["model"]``; tensors only).
        extra: ``{}`` or hints: ``variant`` / ``source`` (``vq_ds16_c2i`` ...), ``resolution``, ``codebook_l2_norm``.

    Returns:
        (config, tokkit state dict for ``Tokenizer(config).load_state_dict(strict=True)``, variant like
        ``vq_ds16_c2i``).

    Raises:
        CheckpointError: one line naming what does not fit (unexpected keys, shapes, hints).
    """
    arch = architecture(state, extra)
    config = config_for(arch)
    n, r, rd = len(arch["ch_mult"]), arch["num_res_blocks"], arch["decoder_res_blocks"]
    m = KeyMover(state, NAME, drop=("quantize.codebook_used",))
    for part, blocks, resample in (("encoder", r, "downsample"), ("decoder", rd, "upsample")):
        m.move(f"{part}.conv_in", f"{part}.conv_in")
        m.res_block(f"{part}.mid.0", f"{part}.mid.0")
        m.attn_block(f"{part}.mid.1", f"{part}.mid.1")
        m.res_block(f"{part}.mid.2", f"{part}.mid.2")
        for k in range(n):  # encoder: k = level; decoder: k = 0 is the lowest resolution, in both peers
            src = f"{part}.conv_blocks.{k}"
            level = k if part == "encoder" else n - 1 - k
            attn = [f"{src}.attn.{j}" for j in range(blocks)] if level in arch["attn_levels"] else []
            m.level([f"{src}.res.{j}" for j in range(blocks)], attn, f"{src}.{resample}" if k < n - 1 else None,
                    f"{part}.levels.{k}")
        m.move(f"{part}.norm_out", f"{part}.norm_out.norm")
        m.move(f"{part}.conv_out", f"{part}.conv_out")
    m.move("quant_conv", "quant_conv")
    m.move("post_quant_conv", "post_quant_conv")
    m.out["quantizer.codebook"] = m.take("quantize.embedding.weight")  # (K, E), normalized at lookup
    variant = variant_name(config.downsample_factor, extra)
    return config, m.finish(config, vq_buffers(arch["codebook_size"])), variant


FAMILY = PeerFamily(name=NAME, license=LICENSE, url=URL, detect=detect, convert=convert)
register_family(FAMILY)

__all__ = ["FAMILY", "architecture", "config_for", "convert", "detect", "variant_name"]
