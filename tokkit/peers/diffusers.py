"""diffusers ``VQModel`` folders -> tokkit: aMUSEd's MaskGIT VQGAN and Kandinsky's MoVQ (spatial norm).

A ``VQModel`` is ``encoder -> quant_conv -> quantize -> post_quant_conv -> decoder``, the decoder of a MoVQ
(``norm_type="spatial"``) conditioned on the quantized codes before ``post_quant_conv``. tokkit's autoencoder holds
each piece (``quant_conv=True``, ``embed_dim``, ``decoder_res_blocks = layers_per_block + 1``, ``attn_levels`` from the
``Attn*Block2D`` types, mid-block attention, ``spatial_norm``); the key map (diffusers -> tokkit)::

    encoder.down_blocks.{i}.resnets.{j}        -> encoder.levels.{i}.{j | 2j with attention}
    encoder.down_blocks.{i}.attentions.{j}     -> encoder.levels.{i}.{2j+1}
    encoder.down_blocks.{i}.downsamplers.0     -> encoder.levels.{i}.{last}
    {encoder,decoder}.mid_block.resnets.0 / attentions.0 / resnets.1 -> .mid.0 / .mid.1 / .mid.{1|2}
    decoder.up_blocks.{k}.{resnets,attentions,upsamplers} -> decoder.levels.{k}.* (k = 0 lowest resolution, as ours)
    conv_norm_out -> norm_out.norm; quantize.embedding.weight -> quantizer.codebook; quant_conv, post_quant_conv
    ResnetBlock2D: norm1, conv1, norm2, conv2, conv_shortcut -> norm1.norm, conv1, norm2.norm, conv2, shortcut
    Attention: group_norm | spatial_norm, to_q/to_k/to_v (Linear) -> norm.norm, qkv (1x1 conv, cat[q, k, v]);
               to_out.0 -> proj (also the older query/key/value/proj_attn names)
    SpatialNorm: norm_layer (affine GroupNorm), conv_y, conv_b -> scale, shift (the affine folded in exactly,
               ``tokkit.models.layers.fold_norm_affine``)

``scaling_factor`` only scales latents for a diffusion model, ``force_upcast`` asks for float32 under fp16 pipelines and
``lookup_from_codebook`` is the pipelines' ``decode(ids)``: none changes the tokenizer's function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tokkit.config import TokenizerConfig
from tokkit.errors import ConfigError
from tokkit.models.layers import fold_norm_affine
from tokkit.peers import PeerFamily, complete_state, register_family

# VQModel.__init__ defaults: a saved config.json omits nothing today, but older ones may
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "norm_type": "group",
    "mid_block_add_attention": True,
}
DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def detect(state: Mapping[str, Tensor], extra: dict) -> bool:
    """A diffusers ``VQModel``: its quantizer and block names, and a config.json naming it (or looking like it)."""
    if extra.get("_class_name", "VQModel") != "VQModel" or "block_out_channels" not in extra:
        return False
    keys = ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_in.weight")
    return all(k in state for k in keys)


def tokkit_config(cfg: dict[str, Any]) -> tuple[TokenizerConfig, str]:
    """The ``TokenizerConfig`` of a ``VQModel`` config and the variant name (``maskgit-vqgan-f16-k8192``, ``movq-...``).

    Raises:
        ConfigError: what tokkit's autoencoder does not express (another activation, norm groups, block types).
    """
    c = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "vq_embed_dim"}}
    chans = [int(x) for x in c["block_out_channels"]]
    if c["act_fn"] != "silu":
        raise ConfigError(f"act_fn {c['act_fn']!r} is not supported (tokkit's autoencoder uses silu)")
    if int(c["norm_num_groups"]) != 32 or any(ch % 32 for ch in chans):
        raise ConfigError(f"norm_num_groups {c['norm_num_groups']} with channels {chans}: tokkit uses 32 groups")
    if int(c["in_channels"]) != int(c["out_channels"]):
        raise ConfigError(f"in_channels {c['in_channels']} != out_channels {c['out_channels']}")
    if c["norm_type"] not in ("group", "spatial"):
        raise ConfigError(f"norm_type {c['norm_type']!r} is not supported (group or spatial)")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    unknown = [t for t in down if t not in DOWN_TYPES] + [t for t in up if t not in UP_TYPES]
    if unknown or len(down) != len(chans) or len(up) != len(chans):
        raise ConfigError(f"block types {down} / {up} are not VQModel encoder/decoder blocks tokkit maps")
    attn_levels = [i for i, t in enumerate(down) if DOWN_TYPES[t]]
    if attn_levels != sorted(len(up) - 1 - k for k, t in enumerate(up) if UP_TYPES[t]):
        raise ConfigError(f"attention at different levels in encoder {down} and decoder {up}")
    base = math.gcd(*chans)
    factor = 2 ** (len(chans) - 1)
    sample = int(c["sample_size"])
    # VQModel's sample_size is often the latent side (aMUSEd: 32): take it as pixels only when it is plausibly so
    resolution = sample if sample % factor == 0 and sample // factor >= 8 else max(256, 8 * factor)
    spatial = c["norm_type"] == "spatial"
    k = int(c["num_vq_embeddings"])
    config = TokenizerConfig(
        resolution=resolution,
        in_channels=int(c["in_channels"]),
        base_channels=base,
        channel_mult=[ch // base for ch in chans],
        num_res_blocks=int(c["layers_per_block"]),
        decoder_res_blocks=int(c["layers_per_block"]) + 1,
        attention=bool(c["mid_block_add_attention"]),
        attn_levels=attn_levels,
        z_channels=int(c["latent_channels"]),
        spatial_norm=spatial,
        quant_conv=True,
        embed_dim=None if c["vq_embed_dim"] is None else int(c["vq_embed_dim"]),
        quantizer="vq",
        quantizer_kwargs={"codebook_size": k, "ema": False},
    )
    return config, f"{'movq' if spatial else 'maskgit-vqgan'}-f{factor}-k{k}"


class _Mapper:
    """Moves tensors from the diffusers state dict to tokkit names, remembering which source keys it used."""

    def __init__(self, src: Mapping[str, Tensor]) -> None:
        self.src = src
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}

    def take(self, key: str) -> Tensor:
        self.used.add(key)
        return self.src[key]

    def has(self, key: str) -> bool:
        return key in self.src

    def param(self, s: str, t: str) -> None:
        """``s.weight`` / ``s.bias`` -> ``t.weight`` / ``t.bias``."""
        for leaf in ("weight", "bias"):
            self.out[f"{t}.{leaf}"] = self.take(f"{s}.{leaf}")

    def norm(self, s: str, t: str, spatial: bool) -> None:
        """A GroupNorm (``s``) or a SpatialNorm (``s.norm_layer``, ``s.conv_y``, ``s.conv_b``) -> tokkit ``t.norm``."""
        if not spatial:
            self.param(s, f"{t}.norm")
            return
        args = [self.take(f"{s}.{p}") for p in ("norm_layer.weight", "norm_layer.bias", "conv_y.weight",
                                                "conv_y.bias", "conv_b.weight", "conv_b.bias")]  # fmt: skip
        sw, sb, tw, tb = fold_norm_affine(*(a.float() for a in args))
        self.out.update({f"{t}.norm.scale.weight": sw, f"{t}.norm.scale.bias": sb,
                         f"{t}.norm.shift.weight": tw, f"{t}.norm.shift.bias": tb})  # fmt: skip

    def resnet(self, s: str, t: str, spatial: bool) -> None:
        self.norm(f"{s}.norm1", f"{t}.norm1", spatial)
        self.param(f"{s}.conv1", f"{t}.conv1")
        self.norm(f"{s}.norm2", f"{t}.norm2", spatial)
        self.param(f"{s}.conv2", f"{t}.conv2")
        if self.has(f"{s}.conv_shortcut.weight"):
            self.param(f"{s}.conv_shortcut", f"{t}.shortcut")

    def attention(self, s: str, t: str, spatial: bool) -> None:
        """Single-head attention: three Linear (C, C) -> one 1x1 conv (3C, C, 1, 1); to_out.0 -> proj."""
        self.norm(f"{s}.spatial_norm" if spatial else f"{s}.group_norm", f"{t}.norm", spatial)
        old = self.has(f"{s}.query.weight")  # diffusers' pre-0.14 attention names
        q, k, v, o = ("query", "key", "value", "proj_attn") if old else ("to_q", "to_k", "to_v", "to_out.0")
        for leaf in ("weight", "bias"):
            parts = [self.take(f"{s}.{n}.{leaf}") for n in (q, k, v)]
            w = torch.cat(parts)  # (3C, C) or (3C,)
            self.out[f"{t}.qkv.{leaf}"] = w[..., None, None] if leaf == "weight" else w  # (3C, C, 1, 1)
            p = self.take(f"{s}.{o}.{leaf}")
            self.out[f"{t}.proj.{leaf}"] = p[..., None, None] if leaf == "weight" else p  # (C, C, 1, 1)

    def mid(self, s: str, t: str, attention: bool, spatial: bool) -> None:
        self.resnet(f"{s}.resnets.0", f"{t}.0", spatial)
        if attention:
            self.attention(f"{s}.attentions.0", f"{t}.1", spatial)
        self.resnet(f"{s}.resnets.1", f"{t}.{2 if attention else 1}", spatial)

    def level(self, s: str, t: str, blocks: int, attn: bool, sampler: str | None, spatial: bool) -> None:
        """One down/up block: ``blocks`` resnets (each followed by its attention), then the resampler."""
        j = 0
        for r in range(blocks):
            self.resnet(f"{s}.resnets.{r}", f"{t}.{j}", spatial)
            j += 1
            if attn:
                self.attention(f"{s}.attentions.{r}", f"{t}.{j}", spatial)
                j += 1
        if sampler is not None:
            self.param(f"{s}.{sampler}.0.conv", f"{t}.{j}.conv")


def convert(state: Mapping[str, Tensor], extra: dict) -> tuple[TokenizerConfig, dict[str, Tensor], str]:
    """A ``VQModel`` state dict + its config.json -> (tokkit config, tokkit state dict, variant).

    Raises:
        ConfigError: an architecture tokkit does not express, or source keys left unmapped.
        KeyError: a key the config promises is missing.
    """
    config, variant = tokkit_config(extra)
    spatial, attn = config.spatial_norm, set(config.attn_levels)
    n = len(config.channel_mult)
    m = _Mapper(state)
    m.param("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        sampler = "downsamplers" if i < n - 1 else None
        m.level(f"encoder.down_blocks.{i}", f"encoder.levels.{i}", config.num_res_blocks, i in attn, sampler, False)
    m.mid("encoder.mid_block", "encoder.mid", config.attention, False)
    m.param("encoder.conv_norm_out", "encoder.norm_out.norm")
    m.param("encoder.conv_out", "encoder.conv_out")
    m.param("quant_conv", "quant_conv")
    m.out["quantizer.codebook"] = m.take("quantize.embedding.weight")
    m.param("post_quant_conv", "post_quant_conv")
    m.param("decoder.conv_in", "decoder.conv_in")
    m.mid("decoder.mid_block", "decoder.mid", config.attention, spatial)
    blocks = int(config.decoder_res_blocks or config.num_res_blocks)
    for k in range(n):
        sampler = "upsamplers" if k < n - 1 else None
        m.level(f"decoder.up_blocks.{k}", f"decoder.levels.{k}", blocks, n - 1 - k in attn, sampler, spatial)
    m.norm("decoder.conv_norm_out", "decoder.norm_out", spatial)
    m.param("decoder.conv_out", "decoder.conv_out")
    left = sorted(set(state) - m.used)
    if left:
        raise ConfigError(f"{len(left)} diffusers tensors have no place in tokkit's model, e.g. {left[0]}")
    return config, complete_state(config, m.out, "diffusers"), variant


register_family(
    PeerFamily(
        name="diffusers",
        license="Apache-2.0 (code); weights per model card",
        url="https://github.com/huggingface/diffusers",
        detect=detect,
        convert=convert,
    )
)
