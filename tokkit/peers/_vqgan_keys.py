"""Key mapping shared by the VQGAN-style converters (taming, LlamaGen): their blocks onto ``tokkit.models.autoencoder``.

Both peers use taming's blocks: ``ResnetBlock`` (norm1, conv1, norm2, conv2, nin_shortcut), ``AttnBlock`` (norm, q, k,
v, proj_out as 1x1 convs), ``Downsample`` / ``Upsample`` (conv), GroupNorm(32, eps 1e-6, affine). ``KeyMover`` moves a
peer state dict's tensors to tokkit's names (the layout is documented in ``tokkit.models.autoencoder``), and
``finish`` refuses peer keys left over and checks the result with ``tokkit.peers.complete_state``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError


def _listing(keys: Iterable[str], most: int = 3) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


class KeyMover:
    """Pops tensors from a peer state dict and stores them under tokkit's key names.

    Args:
        state: the peer's state dict (tensors only).
        family: the peer's name, for error messages.
        drop: key prefixes to discard (discriminator, loss, usage buffers).
    """

    def __init__(self, state: Mapping[str, Tensor], family: str, drop: tuple[str, ...] = ()) -> None:
        self.family = family
        self.left: dict[str, Tensor] = {k: v for k, v in state.items() if not k.startswith(drop)}
        self.out: dict[str, Tensor] = {}

    def has(self, key: str) -> bool:
        """Whether ``key`` is still unconverted in the peer state dict."""
        return key in self.left

    def take(self, key: str) -> Tensor:
        """Pop one tensor; a missing key is a ``CheckpointError``."""
        if key not in self.left:
            raise CheckpointError(f"{self.family} checkpoint lacks {key!r}: not a complete {self.family} state dict")
        return self.left.pop(key)

    def move(self, src: str, dst: str) -> None:
        """Move ``src.weight`` and ``src.bias`` (a conv or an affine norm; both required) to ``dst.*``."""
        self.out[f"{dst}.weight"] = self.take(f"{src}.weight")
        self.out[f"{dst}.bias"] = self.take(f"{src}.bias")

    def res_block(self, src: str, dst: str) -> None:
        """taming ``ResnetBlock`` -> tokkit ``ResBlock``."""
        for a, b in (("norm1", "norm1.norm"), ("conv1", "conv1"), ("norm2", "norm2.norm"), ("conv2", "conv2")):
            self.move(f"{src}.{a}", f"{dst}.{b}")
        if self.has(f"{src}.conv_shortcut.weight"):
            raise CheckpointError(
                f"{self.family} checkpoint uses a 3x3 conv shortcut ({src}.conv_shortcut): tokkit's ResBlock has a "
                "1x1 one"
            )
        if self.has(f"{src}.nin_shortcut.weight"):
            self.move(f"{src}.nin_shortcut", f"{dst}.shortcut")

    def attn_block(self, src: str, dst: str) -> None:
        """taming ``AttnBlock`` (separate q, k, v) -> tokkit ``AttnBlock`` (one fused qkv conv)."""
        self.move(f"{src}.norm", f"{dst}.norm.norm")
        self.out[f"{dst}.qkv.weight"] = torch.cat([self.take(f"{src}.{n}.weight") for n in "qkv"])  # (3C, C, 1, 1)
        self.out[f"{dst}.qkv.bias"] = torch.cat([self.take(f"{src}.{n}.bias") for n in "qkv"])  # (3C,)
        self.move(f"{src}.proj_out", f"{dst}.proj")

    def level(self, res: list[str], attn: list[str], resample: str | None, dst: str) -> None:
        """One level: ResnetBlocks ``res`` each followed by AttnBlock ``attn[r]`` (when any), then the resampler."""
        j = 0
        for r, src in enumerate(res):
            self.res_block(src, f"{dst}.{j}")
            j += 1
            if attn:
                self.attn_block(attn[r], f"{dst}.{j}")
                j += 1
        if resample is not None:
            self.move(f"{resample}.conv", f"{dst}.{j}.conv")

    def finish(self, config: TokenizerConfig, extra: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The converted state dict, checked against ``Tokenizer(config)`` by ``tokkit.peers.complete_state``.

        Args:
            config: the tokkit config the weights are for.
            extra: tensors that have no peer counterpart (the quantizer's usage buffers), added as they are.

        Raises:
            CheckpointError: a peer key nothing maps (one line naming them), a missing tokkit key or a shape mismatch.
        """
        from tokkit.peers import complete_state

        if self.left:
            raise CheckpointError(
                f"unexpected keys in the {self.family} state dict: {_listing(self.left)}: not a {self.family} "
                "checkpoint of a supported layout (or a modified one)"
            )
        out = complete_state(config, {**self.out, **(extra or {})}, self.family)
        return {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}


def vq_buffers(codebook_size: int) -> dict[str, Tensor]:
    """The VQ quantizer's usage buffers for a converted (already trained) codebook."""
    return {"quantizer.cluster_size": torch.ones(codebook_size), "quantizer.initialized": torch.tensor(True)}


def check_group_norm_channels(family: str, channels: Iterable[int]) -> None:
    """The peers use GroupNorm(32); tokkit uses gcd(C, 32) groups, the same only when every C is a multiple of 32."""
    odd = sorted({c for c in channels if c % 32})
    if odd:
        raise CheckpointError(
            f"{family} checkpoint has layers of {', '.join(map(str, odd))} channels, not multiples of 32: its "
            "GroupNorm(32) layers have no exact tokkit equivalent"
        )


__all__ = ["KeyMover", "check_group_norm_channels", "vq_buffers"]
