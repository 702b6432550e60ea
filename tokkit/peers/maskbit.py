"""MaskBit (markweberdev/maskbit) tokenizers -> tokkit (``arch="magvit2"``, ``variant="maskbit"``).

The published ``.bin`` files are plain state dicts of ``modeling/conv_vqgan.py``'s ``ConvVQModel`` (loaded strictly
by the peer, one set of weights: no EMA copy, no discriminator): ``encoder.*`` / ``decoder.*``
(``modeling/modules/autoencoder.py``) and ``quantize.*``:

- MaskBit-Tokenizer (bit tokens): ``quantize.bits_to_indices`` / ``quantize.codebook`` (constant buffers, dropped).
  Channel ``i`` is bit ``i`` of the index, **least significant first**, codes ±1: tokkit's ``LFQ`` with
  ``bit_order="lsb"``. 10, 12, 14, 16 and 18 bits, f16 at 256 px.
- VQGAN+ and the MaskGIT tokenizer (``quantizer_type: lookup``): ``quantize.embedding.weight``, nearest code by
  euclidean distance: tokkit's ``VQ`` (``ema=False``). The MaskGIT tokenizer downsamples by average pooling
  (``sample_with_conv: False``).

Peer quirk kept exactly: in a residual block that changes width, the 1x1 ``nin_shortcut`` (out -> out channels) is
applied to the residual branch's *output*, not to the block's input (``shortcut="output"``).

The decoder exists in two orderings of ``decoder.up``: ``ConvDecoder`` (lowest resolution first, the released
MaskBit weights) and ``ConvDecoderLegacy`` (full resolution first); which one is read from where the upsampling convs
sit. Variant: ``maskbit_tokenizer_{bits}bit``, ``vqgan_plus_{bits}bit`` or ``maskgit_tokenizer`` (``extra`` may pass
``variant`` and ``resolution``, default 256).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError
from tokkit.peers import PeerFamily, complete_state, count_indexed, register_family
from tokkit.peers.open_magvit2 import rename_keys

NAME = "maskbit"
LICENSE = "Apache-2.0"
URL = "https://github.com/markweberdev/maskbit"

# training settings of the published configs (configs/tokenizer/*.yaml)
LFQ_KWARGS = {"entropy_weight": 0.02, "gamma": 1.0, "temperature": 0.01, "commitment_weight": 0.25}
VQ_KWARGS = {"ema": False, "commitment_weight": 0.25, "codebook_weight": 1.0}


def detect(state: Mapping[str, Tensor], extra: dict) -> bool:
    """MaskBit's layout: ``encoder.down.0.res_blocks`` / ``decoder.up.0.res_blocks`` and a ``quantize`` of its own."""
    return (
        "encoder.down.0.res_blocks.0.conv1.weight" in state
        and "decoder.up.0.res_blocks.0.conv1.weight" in state
        and ("quantize.bits_to_indices" in state or "quantize.embedding.weight" in state)
    )


def convert(state: Mapping[str, Tensor], extra: dict) -> tuple[TokenizerConfig, dict[str, Tensor], str]:
    """MaskBit ``ConvVQModel`` state dict -> (tokkit config, tokkit state dict, variant).

    Args:
        state: the checkpoint's tensors.
        extra: optional hints ``variant`` (name) and ``resolution`` (px, default 256).

    Returns:
        The config, the tensors and the variant name.
    """
    if not detect(state, extra):
        raise CheckpointError("not a MaskBit checkpoint (no encoder.down.0.res_blocks / quantize tensors)")
    model = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    base = int(model["encoder.conv_in.weight"].shape[0])
    token_size = int(model["encoder.conv_out.weight"].shape[0])
    levels = count_indexed(model, "encoder.down.{}.res_blocks.0.conv1.weight")
    blocks = count_indexed(model, "encoder.down.0.res_blocks.{}.conv1.weight")
    dec_blocks = count_indexed(model, "decoder.up.0.res_blocks.{}.conv1.weight")
    mult = [int(model[f"encoder.down.{i}.res_blocks.0.conv1.weight"].shape[0]) // base for i in range(levels)]
    with_conv = "encoder.down.0.down_conv.weight" in model
    legacy = "decoder.up.0.upsample_conv.weight" not in model  # legacy: up[0] is the full-resolution level
    top = levels - 1

    quantizer_state: dict[str, Tensor] = {}
    if "quantize.embedding.weight" in state:
        table = state["quantize.embedding.weight"].float().contiguous()  # (K, token_size)
        size = int(table.shape[0])
        quantizer, qkw = "vq", {"codebook_size": size, **VQ_KWARGS}
        quantizer_state["quantizer.codebook"] = table
        variant = f"vqgan_plus_{math.ceil(math.log2(size))}bit" if with_conv else "maskgit_tokenizer"
    else:
        quantizer, qkw = "lfq", {"codebook_size": 2**token_size, "bit_order": "lsb", **LFQ_KWARGS}
        variant = f"maskbit_tokenizer_{token_size}bit"
    config = TokenizerConfig(
        resolution=int(extra.get("resolution", 256)),
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=blocks,
        decoder_res_blocks=None if dec_blocks == blocks else dec_blocks,
        z_channels=token_size,
        arch="magvit2",
        arch_kwargs={"variant": "maskbit", **({} if with_conv else {"downsample": "avgpool"})},
        quantizer=quantizer,
        quantizer_kwargs=qkw,
    )

    def level(m: Any) -> int:  # the peer's decoder.up index -> tokkit's decoder level (lowest resolution first)
        return top - int(m[1]) if legacy else int(m[1])

    rules: list[tuple[str, Any]] = [
        (r"encoder\.down\.(\d+)\.res_blocks\.(\d+)\.nin_shortcut\.weight", r"encoder.levels.\1.\2.shortcut.weight"),
        (r"encoder\.down\.(\d+)\.res_blocks\.(\d+)\.(.+)", r"encoder.levels.\1.\2.\3"),
        (r"encoder\.down\.(\d+)\.down_conv\.(weight|bias)", lambda m: f"encoder.levels.{m[1]}.{blocks}.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid\.res_blocks\.(\d+)\.nin_shortcut\.(.+)", r"\1.mid.\2.shortcut.\3"),
        (r"(encoder|decoder)\.mid\.res_blocks\.(\d+)\.(.+)", r"\1.mid.\2.\3"),
        (r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)", r"\1.\2.\3"),
        (
            r"decoder\.up\.(\d+)\.res_blocks\.(\d+)\.nin_shortcut\.weight",
            lambda m: f"decoder.levels.{level(m)}.blocks.{m[2]}.shortcut.weight",
        ),
        (r"decoder\.up\.(\d+)\.res_blocks\.(\d+)\.(.+)", lambda m: f"decoder.levels.{level(m)}.blocks.{m[2]}.{m[3]}"),
        (r"decoder\.up\.(\d+)\.upsample_conv\.(.+)", lambda m: f"decoder.levels.{level(m)}.upsample.conv.{m[2]}"),
    ]
    converted = rename_keys(model, rules, NAME)
    converted.update(quantizer_state)
    variant = str(extra.get("variant", variant))
    return config, complete_state(config, converted, NAME), variant


register_family(PeerFamily(name=NAME, license=LICENSE, url=URL, detect=detect, convert=convert))

__all__ = ["convert", "detect"]
