"""taming-transformers VQGAN (Esser et al., 2021) -> a tokkit ``Tokenizer``.

Source: https://github.com/CompVis/taming-transformers (MIT). A ``VQModel`` checkpoint (``.ckpt``, a Lightning file
whose ``state_dict`` the registry unwraps) holds ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
``quantize.embedding.weight`` and the loss's ``loss.*`` (LPIPS + discriminator, dropped). Its yaml's
``model.params`` (``ddconfig``, ``n_embed``, ``embed_dim``) is the side config; the architecture is read from the
weights' shapes and the yaml, when given, is checked against them (and gives the resolution).

Exact correspondence (see ``tokkit.models.autoencoder`` for tokkit's key layout):

- taming's encoder level i (``encoder.down.{i}``) and decoder level i (``decoder.up.{i}``, listed by resolution) are
  tokkit's ``encoder.levels.{i}`` and ``decoder.levels.{n-1-i}``; ``attn_resolutions`` become ``attn_levels`` (the
  levels at those resolutions); the decoder has ``num_res_blocks + 1`` blocks per level (``decoder_res_blocks``);
  the middle always holds attention (``attention=True``).
- ``AttnBlock``'s q, k, v 1x1 convs are concatenated into tokkit's fused ``qkv`` conv (same single-head attention
  with scale ``C ** -0.5``).
- ``VectorQuantizer`` (nearest code by l2 distance) is tokkit's ``vq`` with a loss-learned codebook (``ema=False``);
  taming's loss weights the commitment term by 1 and the codebook term by beta = 0.25, so ``commitment_weight=1``
  and ``codebook_weight=0.25`` keep fine-tuning faithful.

Axis legend: K codes, E code dim (``embed_dim``), Z latent channels, C block channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError, ConfigError
from tokkit.peers import PeerFamily, count_indexed, register_family, shape_dim
from tokkit.peers._vqgan_keys import KeyMover, check_group_norm_channels, vq_buffers

NAME = "taming"
LICENSE = "MIT"
URL = "https://github.com/CompVis/taming-transformers"
DEFAULT_RESOLUTION = 256  # ImageNet VQGANs (f16-1024, f16-16384) are trained at 256 px


def detect(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> bool:
    """A taming ``VQModel`` state dict: taming's module names and a ``VectorQuantizer`` codebook (no LitEma
    ``model_ema.*`` shadows: taming never has them; IBQ's checkpoints do, see ``tokkit.peers.ibq``)."""
    return all(
        k in state
        for k in ("quantize.embedding.weight", "encoder.mid.attn_1.q.weight", "encoder.down.0.block.0.conv1.weight")
    ) and not any(k.startswith("model_ema.") for k in state)


def _params(extra: Mapping[str, Any]) -> Mapping[str, Any]:
    """``model.params`` from the yaml (the whole yaml dict is accepted too)."""
    model = extra.get("model")
    if isinstance(model, Mapping):
        extra = model.get("params", {})
    if not isinstance(extra, Mapping) or not isinstance(extra.get("ddconfig", {}), Mapping):
        raise CheckpointError("taming side config must be the yaml's model.params (ddconfig, n_embed, embed_dim)")
    return extra


def architecture(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The VQGAN's architecture, read from the weights' shapes and checked against the yaml's ``model.params``.

    Returns:
        dict with ch, ch_mult, num_res_blocks, decoder_res_blocks, attn_levels, z_channels, embed_dim, n_embed,
        resolution.

    Raises:
        CheckpointError: weights that are not a supported taming VQGAN, or a yaml that does not describe them.
    """
    if not detect(state, extra):
        raise CheckpointError("not a taming VQGAN state dict (needs encoder.down.*, encoder.mid.attn_1, quantize.*)")
    params = _params(extra)
    n = count_indexed(state, "encoder.down.{}.block.0.conv1.weight")
    ch = shape_dim(state, "encoder.conv_in.weight", 0, NAME)
    chans = [shape_dim(state, f"encoder.down.{i}.block.0.conv2.weight", 0, NAME) for i in range(n)]
    if any(c % ch for c in chans):
        raise CheckpointError(f"taming encoder level channels {chans} are not multiples of conv_in's {ch}")
    k, e = (int(s) for s in state["quantize.embedding.weight"].shape)  # (K, E)
    z, z_out = shape_dim(state, "decoder.conv_in.weight", 1, NAME), shape_dim(state, "encoder.conv_out.weight", 0, NAME)
    if z_out != z:
        raise CheckpointError(
            f"taming encoder outputs {z_out} channels, the decoder takes {z}: double_z (a KL autoencoder) is no VQGAN"
        )
    attn = [i for i in range(n) if f"encoder.down.{i}.attn.0.q.weight" in state]
    dec_attn = [i for i in range(n) if f"decoder.up.{i}.attn.0.q.weight" in state]
    if attn != dec_attn:
        raise CheckpointError(f"taming encoder attention at levels {attn} but decoder at {dec_attn}: unsupported")
    ddconfig = params.get("ddconfig", {})
    arch = {
        "ch": ch,
        "ch_mult": [c // ch for c in chans],
        "num_res_blocks": count_indexed(state, "encoder.down.0.block.{}.conv1.weight"),
        "decoder_res_blocks": count_indexed(state, "decoder.up.0.block.{}.conv1.weight"),
        "attn_levels": attn,
        "z_channels": z,
        "embed_dim": e,
        "n_embed": k,
        "resolution": ddconfig.get("resolution", params.get("resolution", DEFAULT_RESOLUTION)),
    }
    if isinstance(arch["resolution"], bool) or not isinstance(arch["resolution"], int):
        raise CheckpointError(f"taming ddconfig.resolution must be an integer, got {arch['resolution']!r}")
    _check_yaml(arch, params, ddconfig)
    check_group_norm_channels(NAME, chans)
    return arch


def _check_yaml(arch: dict[str, Any], params: Mapping[str, Any], ddconfig: Mapping[str, Any]) -> None:
    """Every yaml value that is given must describe the weights."""
    if ddconfig.get("double_z", False):
        raise CheckpointError("taming ddconfig.double_z is true: a KL autoencoder, not a VQGAN")
    attn_res, n = ddconfig.get("attn_resolutions"), len(arch["ch_mult"])
    expect = {
        "ddconfig.ch": (ddconfig.get("ch"), arch["ch"]),
        "ddconfig.ch_mult": (None if "ch_mult" not in ddconfig else list(ddconfig["ch_mult"]), arch["ch_mult"]),
        "ddconfig.num_res_blocks": (ddconfig.get("num_res_blocks"), arch["num_res_blocks"]),
        "ddconfig.z_channels": (ddconfig.get("z_channels"), arch["z_channels"]),
        "ddconfig.attn_resolutions (as levels)": (
            None if attn_res is None else [i for i in range(n) if arch["resolution"] // 2**i in set(attn_res)],
            arch["attn_levels"],
        ),
        "n_embed": (params.get("n_embed"), arch["n_embed"]),
        "embed_dim": (params.get("embed_dim"), arch["embed_dim"]),
    }
    for name, (given, found) in expect.items():
        if given is not None and given != found:
            raise CheckpointError(f"taming yaml {name} = {given} but the weights have {found}: yaml of another model?")
    for side in ("in_channels", "out_ch"):
        if ddconfig.get(side, 3) != 3:
            raise CheckpointError(f"taming ddconfig.{side} = {ddconfig[side]}: tokkit tokenizers take RGB (3)")
    if arch["decoder_res_blocks"] != arch["num_res_blocks"] + 1:
        raise CheckpointError(
            f"taming decoder has {arch['decoder_res_blocks']} blocks per level, expected num_res_blocks + 1 = "
            f"{arch['num_res_blocks'] + 1}: not a taming VQGAN"
        )


def config_for(arch: Mapping[str, Any]) -> TokenizerConfig:
    """The tokkit ``TokenizerConfig`` of a taming VQGAN architecture (as ``architecture`` returns it)."""
    try:
        return TokenizerConfig(
            resolution=arch["resolution"],
            base_channels=arch["ch"],
            channel_mult=list(arch["ch_mult"]),
            num_res_blocks=arch["num_res_blocks"],
            attention=True,
            z_channels=arch["z_channels"],
            quantizer="vq",
            quantizer_kwargs={"codebook_size": arch["n_embed"], "ema": False, "commitment_weight": 1.0,
                              "codebook_weight": 0.25},
            attn_levels=list(arch["attn_levels"]),
            decoder_res_blocks=arch["decoder_res_blocks"],
            quant_conv=True,
            embed_dim=arch["embed_dim"],
        )
    except ConfigError as e:
        raise CheckpointError(f"taming checkpoint does not make a valid tokkit config: {e}") from None


def convert(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> tuple[TokenizerConfig, dict[str, Tensor], str]:
    """Convert a taming ``VQModel`` state dict.

    Args:
        state: the unwrapped state dict (tensors only; ``loss.*`` keys are dropped).
        extra: the yaml's ``model.params`` (or ``{}``: the architecture comes from the shapes, resolution 256).

    Returns:
        (config, tokkit state dict for ``Tokenizer(config).load_state_dict(strict=True)``, variant like
        ``f16-16384``).

    Raises:
        CheckpointError: one line naming what does not fit (unexpected keys, shapes, yaml values).
    """
    arch = architecture(state, extra)
    config = config_for(arch)
    n, r, rd = len(arch["ch_mult"]), arch["num_res_blocks"], arch["decoder_res_blocks"]
    m = KeyMover(state, NAME, drop=("loss.",))
    m.move("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        src = f"encoder.down.{i}"
        attn = [f"{src}.attn.{j}" for j in range(r)] if i in arch["attn_levels"] else []
        m.level([f"{src}.block.{j}" for j in range(r)], attn, f"{src}.downsample" if i < n - 1 else None,
                f"encoder.levels.{i}")
    for part in ("encoder", "decoder"):
        m.res_block(f"{part}.mid.block_1", f"{part}.mid.0")
        m.attn_block(f"{part}.mid.attn_1", f"{part}.mid.1")
        m.res_block(f"{part}.mid.block_2", f"{part}.mid.2")
        m.move(f"{part}.norm_out", f"{part}.norm_out.norm")
        m.move(f"{part}.conv_out", f"{part}.conv_out")
    m.move("decoder.conv_in", "decoder.conv_in")
    for k in range(n):  # tokkit's decoder levels run from the lowest resolution; taming's decoder.up is by resolution
        i = n - 1 - k
        src = f"decoder.up.{i}"
        attn = [f"{src}.attn.{j}" for j in range(rd)] if i in arch["attn_levels"] else []
        m.level([f"{src}.block.{j}" for j in range(rd)], attn, f"{src}.upsample" if i > 0 else None,
                f"decoder.levels.{k}")
    m.move("quant_conv", "quant_conv")
    m.move("post_quant_conv", "post_quant_conv")
    m.out["quantizer.codebook"] = m.take("quantize.embedding.weight")  # (K, E)
    variant = f"f{config.downsample_factor}-{arch['n_embed']}"
    return config, m.finish(config, vq_buffers(arch["n_embed"])), variant


FAMILY = PeerFamily(name=NAME, license=LICENSE, url=URL, detect=detect, convert=convert)
register_family(FAMILY)

__all__ = ["FAMILY", "architecture", "config_for", "convert", "detect"]
