"""Residual quantization: N quantizers of any family, each quantizing what the previous ones left (SoundStream RVQ,
RQ-VAE, residual FSQ / LFQ)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokkit.errors import ConfigError
from tokkit.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    batch_usage_stats,
    get_quantizer_class,
    register_quantizer,
)


def _build_stage(dim: int, spec: Quantizer | Mapping[str, Any], i: int) -> Quantizer:
    """A stage from a ``Quantizer`` module or a ``{"name": ..., **kwargs}`` mapping (``dim`` filled in)."""
    if isinstance(spec, Quantizer):
        stage = spec
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"residual stage {i} needs a quantizer 'name', e.g. {{'name': 'fsq', 'levels': [5, 5]}}")
        if kwargs.setdefault("dim", dim) != dim:
            raise ConfigError(f"residual stage {i} has dim={kwargs['dim']}; every stage takes the residual's dim={dim}")
        if name == "residual":
            raise ConfigError(f"residual stage {i} cannot itself be a residual quantizer")
        try:
            stage = get_quantizer_class(name)(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad arguments for residual stage {i} ({name!r}): {e}") from None
    else:
        raise ConfigError(f"residual stage {i} must be a dict with a 'name' or a Quantizer, got {type(spec).__name__}")
    if stage.dim != dim:
        raise ConfigError(f"residual stage {i} has dim={stage.dim}; every stage takes the residual's dim={dim}")
    if stage.num_groups != 1:
        raise ConfigError(f"residual stage {i} has {stage.num_groups} index groups; stages must have one")
    return stage


@register_quantizer("residual")
class ResidualQuantizer(Quantizer):
    """Stack of quantizers on the residual: stage ``i`` quantizes ``x - sum(codes of stages < i)``.

    The codes are the sum of the stages' codes (each stage keeps its own gradient estimator); the loss is the sum of
    the stages' losses; indices gain a last axis of size N (one per stage; none for a single stage).
    ``codebook_size`` is the largest stage's K (every index is below it) and ``bits_per_token`` sums the stages' bits.

    Args:
        dim: input channels D (every stage gets the same D).
        stages: per stage a ``{"name": <registered quantizer>, **kwargs}`` mapping (JSON-friendly, for configs) or a
            ``Quantizer`` module.
    """

    def __init__(self, dim: int, stages: Sequence[Quantizer | Mapping[str, Any]]) -> None:
        super().__init__()
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence) or len(stages) == 0:
            raise ConfigError("residual quantizer needs a non-empty list of stages, e.g. [{'name': 'vq', ...}, ...]")
        self.dim = int(dim)
        self.stages = nn.ModuleList(_build_stage(self.dim, s, i) for i, s in enumerate(stages))
        self.codebook_size = max(s.codebook_size for s in self.stages)
        self.num_groups = len(self.stages)

    @property
    def bits_per_token(self) -> float:
        """Sum of the stages' bits per token."""
        return float(sum(math.log2(s.codebook_size) for s in self.stages))

    def quantize(self, x: Tensor) -> QuantizerOutput:
        """x: (B, D, *S) float32 -> codes (B, D, *S), indices (B, *S, N), summed loss, per-stage stats."""
        residual = x
        codes: Tensor | None = None
        loss = x.new_zeros(())
        indices, stats = [], {}
        for i, stage in enumerate(self.stages):
            out = stage(residual)
            residual = residual - out.codes.detach()
            codes = out.codes if codes is None else codes + out.codes
            loss = loss + out.loss
            indices.append(out.indices)
            stats.update({f"stage{i}/{k}": v for k, v in out.stats.items()})
        index_stack = torch.stack(indices, -1)  # N x (B, *S) -> (B, *S, N)
        stats.update(batch_usage_stats(index_stack, self.codebook_size))
        if self.num_groups == 1:
            index_stack = index_stack.squeeze(-1)  # one stage: (B, *S), like any ungrouped quantizer
        return QuantizerOutput(codes=codes, indices=index_stack, loss=loss, stats=stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, *S, N) int ((B, *S) for one stage) -> (B, D, *S) float32: the sum of the stages' codes."""
        if self.num_groups == 1:
            indices = indices.unsqueeze(-1)  # (B, *S) -> (B, *S, 1)
        if indices.shape[-1] != len(self.stages) or indices.dim() < 2:
            raise ConfigError(f"expected indices (B, *S, {len(self.stages)}), got shape {tuple(indices.shape)}")
        codes: Tensor | None = None
        for i, stage in enumerate(self.stages):
            c = stage.indices_to_codes(indices[..., i])
            codes = c if codes is None else codes + c
        return codes
