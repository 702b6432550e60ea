"""Open-MAGVIT2 (TencentARC/SEED-Voken) LFQ tokenizers -> tokkit (``arch="magvit2"``, ``quantizer="lfq"``).

The published ``.ckpt`` files are Lightning checkpoints of ``src/Open_MAGVIT2/models/lfqgan.py``'s ``VQModel``:
``encoder.*`` and ``decoder.*`` (``modules/diffusionmodules/improved_model.py``), no ``quantize.*`` tensors (the
LFQ's buffers are not persistent), ``loss.*`` (discriminator; dropped) and, when trained with ``use_ema``,
``model_ema.*``: the EMA shadow of every parameter, named with its dots removed (``model_ema.encoderconv_inweight``).
The peer evaluates with the EMA weights (``ema_scope``), so the converter **prefers the EMA weights** whenever the
checkpoint holds them (``extra={"ema": False}`` takes the raw ones).

LFQ: channel ``i`` is bit ``i`` of the index, **least significant first** (``index = sum_i [z_i > 0] 2^i``), codes
±1 (a zero channel is -1): tokkit's ``LFQ`` with ``bit_order="lsb"``.

Variants (inferred from shapes; ``extra={"variant": ..., "resolution": ...}`` overrides):

===================== ====== ====== ======= =====================================================
variant               levels  bits  px      published checkpoint
===================== ====== ====== ======= =====================================================
imagenet_256_L        5 (f16) 18    256     TencentARC/Open-MAGVIT2-Tokenizer-256-resolution
imagenet_128_L        4 (f8)  18    128     TencentARC/Open-MAGVIT2-Tokenizer-128-resolution
pretrain_256_16384    5 (f16) 14    256     TencentARC/Open-MAGVIT2-Tokenizer-16384-Pretrain
===================== ====== ====== ======= =====================================================

(``pretrain_256_262144`` has the same shapes as ``imagenet_256_L``: pass it as the ``variant`` hint.)

``rename_keys`` is shared with ``tokkit.peers.maskbit``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError
from tokkit.peers import PeerFamily, complete_state, count_indexed, register_family

NAME = "open-magvit2"
LICENSE = "Apache-2.0"
URL = "https://github.com/TencentARC/SEED-Voken"
EMA_PREFIX = "model_ema."

# (levels, bits) -> (variant, resolution)
VARIANTS: dict[tuple[int, int], tuple[str, int]] = {
    (5, 18): ("imagenet_256_L", 256),
    (4, 18): ("imagenet_128_L", 128),
    (5, 14): ("pretrain_256_16384", 256),
}
# LFQ training settings of the published configs (entropy weight = lossconfig.codebook_weight)
QUANTIZER_KWARGS = {"entropy_weight": 0.1, "gamma": 1.0, "temperature": 0.01, "commitment_weight": 0.25}


# ----------------------------------------------------------------------------------------------------------------------
# shared helpers (also used by tokkit.peers.maskbit)


def rename_keys(state: Mapping[str, Tensor], rules: Sequence[tuple[str, Any]], family: str) -> dict[str, Tensor]:
    """Map every key of ``state`` through the first matching ``(regex, replacement)`` rule.

    Args:
        state: the peer's model tensors (only ``encoder.``/``decoder.`` keys, already selected).
        rules: ``(pattern, repl)`` pairs for ``re.fullmatch``; ``repl`` is a format string or a callable on the match.
        family: peer name for the error message.

    Returns:
        The renamed tensors, floating ones as float32 and contiguous.

    Raises:
        CheckpointError: a key no rule maps (the checkpoint is not the layout this converter knows).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, repl in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = repl(m) if callable(repl) else m.expand(repl)
                out[new] = (value.float() if value.is_floating_point() else value).contiguous()
                break
        else:
            raise CheckpointError(f"{family} checkpoint has an unknown tensor {key!r}: not a layout tokkit converts")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Open-MAGVIT2


def _model_tensors(state: Mapping[str, Tensor], use_ema: bool) -> dict[str, Tensor]:
    """The encoder / decoder tensors under the peer's names, EMA shadows substituted when present and wanted."""
    model = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    if use_ema and has_ema:
        for key in model:
            shadow = state.get(EMA_PREFIX + key.replace(".", ""))
            if shadow is None:
                raise CheckpointError(f"open-magvit2 checkpoint has EMA weights but none for {key!r}; pass ema=False")
            model[key] = shadow
    return model


def detect(state: Mapping[str, Tensor], extra: dict) -> bool:
    """Open-MAGVIT2's layout: ``encoder.down.0.block.0`` blocks and the decoder's adaptive group norms."""
    return "encoder.down.0.block.0.conv1.weight" in state and "decoder.adaptive.0.gamma.weight" in state


def convert(state: Mapping[str, Tensor], extra: dict) -> tuple[TokenizerConfig, dict[str, Tensor], str]:
    """Open-MAGVIT2 ``VQModel`` state dict -> (tokkit config, tokkit state dict, variant).

    Args:
        state: the checkpoint's tensors (``state_dict`` already unwrapped).
        extra: optional hints: ``variant`` (name), ``resolution`` (px), ``ema`` (default True: EMA weights if any).

    Returns:
        The config (``arch="magvit2"``, ``variant="open-magvit2"``, LFQ with ``bit_order="lsb"``), the tensors and
        the variant name.
    """
    if not detect(state, extra):
        raise CheckpointError("not an Open-MAGVIT2 checkpoint (no encoder.down.0.block / decoder.adaptive tensors)")
    model = _model_tensors(state, bool(extra.get("ema", True)))
    base = int(model["encoder.conv_in.weight"].shape[0])
    bits = int(model["encoder.conv_out.weight"].shape[0])
    levels = count_indexed(model, "encoder.down.{}.block.0.conv1.weight")
    blocks = count_indexed(model, "encoder.down.0.block.{}.conv1.weight")
    mult = [int(model[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // base for i in range(levels)]
    variant, resolution = VARIANTS.get((levels, bits), (f"lfq{bits}bit_f{2 ** (levels - 1)}", 16 * 2 ** (levels - 1)))
    variant = str(extra.get("variant", variant))
    resolution = int(extra.get("resolution", resolution))
    config = TokenizerConfig(
        resolution=resolution,
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=blocks,
        z_channels=bits,
        arch="magvit2",
        arch_kwargs={"variant": "open-magvit2"},
        quantizer="lfq",
        quantizer_kwargs={"codebook_size": 2**bits, "bit_order": "lsb", **QUANTIZER_KWARGS},
    )
    top = levels - 1

    def level(m: Any) -> int:  # the peer lists decoder.up / adaptive by level (0 = full res); tokkit lowest first
        return top - int(m[1])

    rules: list[tuple[str, Any]] = [
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.weight", r"encoder.levels.\1.\2.shortcut.weight"),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", r"encoder.levels.\1.\2.\3"),
        (r"encoder\.down\.(\d+)\.downsample\.(weight|bias)", lambda m: f"encoder.levels.{m[1]}.{blocks}.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.(\d+)\.nin_shortcut\.(.+)", r"\1.mid.\2.shortcut.\3"),
        (r"(encoder|decoder)\.mid_block\.(\d+)\.(.+)", r"\1.mid.\2.\3"),
        (r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)", r"\1.\2.\3"),
        (r"decoder\.adaptive\.(\d+)\.(gamma|beta)\.(.+)", lambda m: f"decoder.levels.{level(m)}.norm.{m[2]}.{m[3]}"),
        (
            r"decoder\.up\.(\d+)\.block\.(\d+)\.nin_shortcut\.weight",
            lambda m: f"decoder.levels.{level(m)}.blocks.{m[2]}.shortcut.weight",
        ),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", lambda m: f"decoder.levels.{level(m)}.blocks.{m[2]}.{m[3]}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv1\.(.+)", lambda m: f"decoder.levels.{level(m)}.upsample.conv.{m[2]}"),
    ]
    converted = rename_keys(model, rules, NAME)
    return config, complete_state(config, converted, NAME), variant


register_family(PeerFamily(name=NAME, license=LICENSE, url=URL, detect=detect, convert=convert))

__all__ = ["convert", "detect", "rename_keys"]
