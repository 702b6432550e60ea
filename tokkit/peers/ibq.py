"""IBQ (Index Backpropagation Quantization, TencentARC/SEED-Voken ``src/IBQ``) -> a tokkit ``Tokenizer``.

Source: https://github.com/TencentARC/SEED-Voken (Apache-2.0); paper: Shi et al., 2024, arXiv:2412.02692. The
published ``.ckpt`` files (``TencentARC/IBQ-Tokenizer-{1024,8192,16384,262144}``) are Lightning checkpoints of
``src/IBQ/models/ibqgan.py``'s ``IBQ``: taming's VQGAN network (``modules/diffusionmodules/model.py``: ``encoder.*``,
``decoder.*`` with attention at 16 px, ``quant_conv``, ``post_quant_conv``), the codebook
``quantize.embedding.weight`` (K, E), the loss's ``loss.*`` (LPIPS + discriminator, dropped) and, trained with
``use_ema`` as every published config is, ``model_ema.*``: LitEma's shadow of every parameter, its dots removed
(``model_ema.encoderconv_inweight``, ``model_ema.quantizeembeddingweight``). The peer evaluates inside
``ema_scope()``, so the converter **prefers the EMA weights** (codebook included); ``extra={"ema": False}`` takes the
raw ones.

Quantizer (``IndexPropagationQuantize``): ``logits = z . e_k`` over the codebook with no normalisation and no scale
(its ``cosine_similarity`` flag is stored but never read), ``index = argmax softmax(logits) = argmax logits`` (up to
exact float ties), and the output code is the codebook row itself (``one_hot @ E``; the soft part only carries the
gradient): tokkit's ``vq`` with ``metric="dot"`` and a loss-learned codebook. Its training loss weighs
``mse(z, sg[e])`` by 1 and ``mse(e, sg[z])`` by beta = 0.25, kept as ``commitment_weight=1`` /
``codebook_weight=0.25``; tokkit trains with the straight-through estimator, not IBQ's softmax index backpropagation
(nor its entropy loss).

The network mapping is taming's (``tokkit.peers.taming``): 5 levels ``ch_mult=[1, 1, 2, 2, 4]``, 4 residual blocks per
encoder level (5 per decoder level), attention at level 4 (16 px), z = E = 256; 256 px images give 16x16 tokens.

Detection: taming's key layout plus LitEma's ``model_ema.*`` tensors and IBQ's 4 blocks per encoder level (taming's
own published VQGANs have 2 and no EMA). Any other IBQ-shaped checkpoint converts with ``--family ibq``. IBQ's
own yaml (Lightning CLI ``model.init_args``) is not needed: the architecture comes from the shapes.

Axis legend: K codes, E code dim (``embed_dim``), Z latent channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError
from tokkit.peers import PeerFamily, register_family
from tokkit.peers import taming as _taming

NAME = "ibq"
LICENSE = "Apache-2.0"
URL = "https://github.com/TencentARC/SEED-Voken"
EMA_PREFIX = "model_ema."
MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
IBQ_BLOCKS = 4  # residual blocks per encoder level in every published IBQ config
# codebook size -> variant name of the published ImageNet 256 px tokenizers (the pretrain ones share the shapes:
# pass extra={"variant": "pretrain_256_262144"} to name them)
VARIANTS = {1024: "imagenet_256_1024", 8192: "imagenet_256_8192", 16384: "imagenet_256_16384",
            262144: "imagenet_256_262144"}  # fmt: skip
RESOLUTION = 256


def is_ibq_layout(state: Mapping[str, Tensor]) -> bool:
    """taming's VQGAN keys + LitEma shadows + 4 encoder blocks per level: the published IBQ checkpoints."""
    if not any(k.startswith(EMA_PREFIX) for k in state):
        return False
    if f"encoder.down.0.block.{IBQ_BLOCKS - 1}.conv1.weight" not in state:
        return False
    if f"encoder.down.0.block.{IBQ_BLOCKS}.conv1.weight" in state:
        return False
    return _taming.detect({k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}, {})


def detect(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> bool:
    """An IBQ ``.ckpt`` state dict (see ``is_ibq_layout``)."""
    return is_ibq_layout(state)


def model_tensors(state: Mapping[str, Tensor], use_ema: bool = True) -> dict[str, Tensor]:
    """The tokenizer's tensors under the peer's names, EMA shadows substituted when present and wanted.

    Args:
        state: the checkpoint's tensors.
        use_ema: take ``model_ema.*`` shadows for every parameter that has one.

    Returns:
        Every key but ``model_ema.*`` (``loss.*`` is left for the taming mapper to drop; anything unknown makes it
        fail).

    Raises:
        CheckpointError: EMA tensors present but one of the tokenizer's parameters lacks its shadow.
    """
    model = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    if use_ema and any(k.startswith(EMA_PREFIX) for k in state):
        for key in [k for k in model if k.startswith(MODEL_PREFIXES)]:
            shadow = state.get(EMA_PREFIX + key.replace(".", ""))
            if shadow is None:
                raise CheckpointError(f"IBQ checkpoint has EMA weights but none for {key!r}: pass ema=False")
            model[key] = shadow
    return model


def convert(state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> tuple[TokenizerConfig, dict[str, Tensor], str]:
    """IBQ state dict -> (tokkit config, tokkit state dict, variant).

    Args:
        state: the checkpoint's tensors (``state_dict`` already unwrapped).
        extra: optional hints: ``variant`` (name), ``resolution`` (px, default 256), ``ema`` (default True: the
            EMA weights when the checkpoint holds them).

    Returns:
        The config (taming's VQGAN layout, ``vq`` with ``metric="dot"``), the tensors (for
        ``Tokenizer(config).load_state_dict(strict=True)``) and the variant name (``imagenet_256_16384`` ...).

    Raises:
        CheckpointError: not taming's key layout, a missing EMA shadow, unknown tensors or shapes that do not fit.
    """
    model = model_tensors(state, bool(extra.get("ema", True)))
    if not _taming.detect(model, {}):
        raise CheckpointError("not an IBQ checkpoint (needs taming's encoder.down.*, encoder.mid.attn_1, quantize.*)")
    resolution = int(extra.get("resolution", RESOLUTION))
    config, converted, _ = _taming.convert(model, {"ddconfig": {"resolution": resolution}})
    k = int(config.quantizer_kwargs["codebook_size"])
    config = dataclasses.replace(
        config,
        quantizer_kwargs={"codebook_size": k, "metric": "dot", "ema": False, "commitment_weight": 1.0,
                          "codebook_weight": 0.25},  # fmt: skip
    )
    variant = str(extra.get("variant", VARIANTS.get(k, f"f{config.downsample_factor}-{k}")))
    return config, converted, variant


FAMILY = PeerFamily(name=NAME, license=LICENSE, url=URL, detect=detect, convert=convert)
register_family(FAMILY)

__all__ = ["FAMILY", "convert", "detect", "is_ibq_layout", "model_tensors"]
