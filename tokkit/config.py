"""Flat config dataclasses, named presets, JSON round trip and ``field=value`` overrides.

A ``TokenizerConfig`` describes the model (it travels with the weights in ``config.json``); a ``TrainConfig`` holds
every training knob. A ``Preset`` pairs the two under a name (``tokkit presets`` lists them). Layers never read a
config: ``tokkit.models.tokenizer`` turns a ``TokenizerConfig`` into explicit keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokkit.errors import ConfigError


@dataclass
class TokenizerConfig:
    """The tokenizer's architecture: conv autoencoder + a registered quantizer.

    Attributes:
        resolution: square image side in pixels the tokenizer is trained for.
        in_channels: image channels (3 for RGB).
        base_channels: channels of the first encoder level; level i has ``base_channels * channel_mult[i]``.
        channel_mult: one multiplier per level; ``len(channel_mult) - 1`` downsamplings by 2.
        num_res_blocks: residual blocks per level (encoder and decoder).
        attention: self-attention blocks in the middle (lowest resolution) of encoder and decoder.
        z_channels: latent channels fed to the quantizer (its ``dim``).
        spatial_norm: MoVQ spatially conditional normalization: decoder norms modulated by the quantized codes.
        quantizer: registered quantizer name (``tokkit.quantizers.list_quantizers()``).
        quantizer_kwargs: extra keyword arguments of the quantizer (``dim`` is ``z_channels``).
    """

    resolution: int = 32
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention: bool = False
    z_channels: int = 4
    spatial_norm: bool = False
    quantizer: str = "fsq"
    quantizer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.channel_mult:
            raise ConfigError("tokenizer.channel_mult must have at least one level, e.g. [1, 2, 2]")
        if any(m < 1 for m in self.channel_mult) or self.base_channels < 1 or self.z_channels < 1:
            raise ConfigError("tokenizer.base_channels, z_channels and channel_mult entries must be positive")
        if self.num_res_blocks < 0:
            raise ConfigError("tokenizer.num_res_blocks must be >= 0")
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"tokenizer.resolution {self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side: ``2 ** (len(channel_mult) - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) tokens per image at ``resolution``."""
        side = self.resolution // self.downsample_factor
        return (side, side)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenizerConfig:
        """Inverse of ``to_dict``; an unknown field or a wrong type is a ``ConfigError``."""
        return _from_dict(cls, d, "tokenizer")


@dataclass
class TrainConfig:
    """Every training knob (optimizer, schedule, losses, discriminator, logging cadence).

    Attributes:
        steps: optimizer steps in total.
        batch_size: images per step per process.
        lr: peak AdamW learning rate (after warm-up; cosine decay to ``lr * min_lr_ratio``).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay (applied to conv/linear weights only).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: clip the global gradient norm to this (0 = off).
        ema_decay: EMA decay of the weights (warmed up as ``min(decay, (1 + t) / (10 + t))``); 0 = off.
        seed: seed of weights, data order, augmentation.
        recon_loss: ``l1`` or ``l2``.
        recon_weight: weight of the reconstruction loss.
        perceptual: ``auto`` (LPIPS when its weights can be had), ``lpips`` (required) or ``none``.
        perceptual_weight: weight of the LPIPS loss.
        lpips_net: LPIPS backbone, ``alex`` or ``vgg``.
        quantizer_weight: multiplier of the quantizer's auxiliary loss (already weighted inside the quantizer).
        disc_weight: weight of the generator's adversarial loss; 0 disables the discriminator.
        disc_start: step at which the discriminator starts (loss and training).
        disc_adaptive: scale the adversarial loss by the VQGAN adaptive weight (else the fixed ``disc_weight``).
        disc_lr: discriminator learning rate (0 = same as ``lr``).
        disc_channels: first-layer channels of the PatchGAN.
        disc_layers: strided layers of the PatchGAN.
        lecam_weight: LeCam regularisation weight (0 = off).
        lecam_decay: EMA decay of LeCam's logit anchors.
        log_every: steps between training-loss log lines (metrics.jsonl and progress).
        eval_every: steps between held-out evaluations (PSNR, SSIM, usage, PNG grid); 0 = only at the end.
        checkpoint_every: steps between checkpoints (+ train state); 0 = only at the end.
        eval_images: held-out images used for evaluation.
        num_workers: DataLoader workers.
        amp: ``auto`` (bf16 autocast on CUDA, off on CPU), ``bf16`` or ``none``.
        cpu_threads: torch intra-op threads when training on the CPU (0 = torch's default). One thread per process
            is immune to oversubscription on a shared machine and gives the same bits everywhere.
    """

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    recon_loss: str = "l1"
    recon_weight: float = 1.0
    perceptual: str = "auto"
    perceptual_weight: float = 0.1
    lpips_net: str = "alex"
    quantizer_weight: float = 1.0
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_adaptive: bool = True
    disc_lr: float = 0.0
    disc_channels: int = 64
    disc_layers: int = 3
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    eval_images: int = 16
    num_workers: int = 0
    amp: str = "auto"
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        choices = {"recon_loss": ("l1", "l2"), "perceptual": ("auto", "lpips", "none"), "amp": ("auto", "bf16", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("train.steps and train.batch_size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; an unknown field or a wrong type is a ``ConfigError``."""
        return _from_dict(cls, d, "train")


@dataclass
class Preset:
    """A named pair of configs."""

    name: str
    description: str
    tokenizer: TokenizerConfig
    train: TrainConfig


# ----------------------------------------------------------------------------------------------------------------------
# presets

# ~1024 codes per token for every family, so the three compare at equal bits per token (10 bits)
_VQ_1024 = {"quantizer": "vq", "z_channels": 16, "quantizer_kwargs": {
    "codebook_size": 1024, "codebook_dim": 8, "kmeans_init": True, "dead_code_threshold": 0.5}}
_FSQ_1000 = {"quantizer": "fsq", "z_channels": 4, "quantizer_kwargs": {"levels": [8, 5, 5, 5]}}
_LFQ_1024 = {"quantizer": "lfq", "z_channels": 10, "quantizer_kwargs": {"codebook_size": 1024}}
# MaskBit / Open-MAGVIT2 scale: 2^12 VQ codes, FSQ 4375 ~ 2^12, 2^12 LFQ bits
_VQ_BIG = {"quantizer": "vq", "z_channels": 32, "quantizer_kwargs": {
    "codebook_size": 4096, "codebook_dim": 8, "kmeans_init": True, "dead_code_threshold": 0.5}}
_FSQ_BIG = {"quantizer": "fsq", "z_channels": 5, "quantizer_kwargs": {"levels": [7, 5, 5, 5, 5]}}
_LFQ_BIG = {"quantizer": "lfq", "z_channels": 12, "quantizer_kwargs": {"codebook_size": 4096}}

_FAMILIES = {"vq": (_VQ_1024, _VQ_BIG), "fsq": (_FSQ_1000, _FSQ_BIG), "lfq": (_LFQ_1024, _LFQ_BIG)}


def _build_presets() -> dict[str, Preset]:
    out: dict[str, Preset] = {}
    sample_ae = {"resolution": 32, "base_channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 1}
    sample_train = {"steps": 600, "batch_size": 16, "lr": 2e-3, "warmup_steps": 30, "eval_every": 150,
                    "checkpoint_every": 150, "log_every": 10, "ema_decay": 0.99, "cpu_threads": 1}
    cifar_ae = {"resolution": 32, "base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1}
    cifar_train = {"steps": 2000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 50, "eval_every": 250,
                   "checkpoint_every": 250, "ema_decay": 0.99}
    tin_ae = {"resolution": 64, "base_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": 2}
    tin_train = {"steps": 20000, "batch_size": 64, "lr": 4e-4, "warmup_steps": 500, "eval_every": 1000,
                 "checkpoint_every": 1000, "ema_decay": 0.999}
    inet_ae = {"resolution": 256, "base_channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
               "attention": False}
    inet_train = {"steps": 300000, "batch_size": 32, "lr": 1e-4, "warmup_steps": 5000, "min_lr_ratio": 0.1,
                  "weight_decay": 1e-4, "beta1": 0.9, "beta2": 0.999, "perceptual_weight": 0.1,
                  "disc_weight": 0.1, "disc_start": 20000, "disc_adaptive": True, "disc_lr": 1e-4,
                  "disc_channels": 128, "lecam_weight": 0.001, "eval_every": 5000, "checkpoint_every": 5000,
                  "eval_images": 32, "num_workers": 8, "ema_decay": 0.999, "log_every": 50}
    kinds = {  # preset prefix -> (description, autoencoder, training, which quantizer size of _FAMILIES)
        "sample": ("quickstart: built-in sample photos, minutes on a CPU", sample_ae, sample_train, 0),
        "cifar10-f4": ("CIFAR-10; the three families at equal bits/token", cifar_ae, cifar_train, 0),
        "tinyimagenet-f4": ("Tiny ImageNet; the ImageNet-256 f16 token grid", tin_ae, tin_train, 0),
        "imagenet-f16": ("ImageNet; MaskBit/Open-MAGVIT2-sized AE + GAN (GPUs)", inet_ae, inet_train, 1),
    }
    for fam, sizes in _FAMILIES.items():
        for prefix, (description, ae, train, which) in kinds.items():
            name = f"{prefix}-{fam}"
            out[name] = Preset(name, description, TokenizerConfig(**ae, **_copy(sizes[which])), TrainConfig(**train))
    return out


def _copy(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


DEFAULT_PRESET = "sample-fsq"


def list_presets() -> list[str]:
    """Preset names, default first then sorted."""
    names = sorted(_build_presets())
    names.remove(DEFAULT_PRESET)
    return [DEFAULT_PRESET, *names]


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset; unknown name -> ``ConfigError`` listing the choices."""
    presets = _build_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())} (see `tokkit presets`)")
    return presets[name]


# ----------------------------------------------------------------------------------------------------------------------
# overrides


def apply_overrides(cfgs: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to a dict of config dataclasses; returns new, validated configs.

    ``cfgs`` maps a section name to a dataclass, e.g. ``{"tokenizer": TokenizerConfig(), "train": TrainConfig()}``.
    Values are parsed as JSON when they can be (``32``, ``2e-4``, ``true``, ``[1,2,2]``, ``{"a":1}``) and as a
    plain string otherwise. The section may be left out when the field name is unique (``lr=1e-4``). A key into
    a dict field goes after it: ``tokenizer.quantizer_kwargs.codebook_size=512``.

    Raises:
        ConfigError: malformed override, unknown section or field, or a value of the wrong type.
    """
    data = {name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: write section.field=value, e.g. train.lr=2e-4")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not parts or any(not p for p in parts):
            raise ConfigError(f"bad override {item!r}: write section.field=value, e.g. train.lr=2e-4")
        if parts[0] not in data:
            owners = [s for s, d in data.items() if parts[0] in d]
            if len(owners) != 1:
                fields = ", ".join(f"{s}.{f}" for s, d in data.items() for f in d)
                raise ConfigError(f"unknown config field {key!r}; fields are: {fields}")
            parts = [owners[0], *parts]
        section, fname, *sub = parts
        if fname not in data[section]:
            raise ConfigError(f"unknown field {fname!r} in {section}; fields are: {', '.join(data[section])}")
        value = _parse_value(raw)
        if sub:
            target = data[section][fname]
            if not isinstance(target, dict):
                raise ConfigError(f"{section}.{fname} is not a dict; cannot set {key!r}")
            for p in sub[:-1]:
                target = target.setdefault(p, {})
            target[sub[-1]] = value
        else:
            data[section][fname] = value
    return {name: _from_dict(type(cfgs[name]), d, name) for name, d in data.items()}


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        low = raw.lower()
        if low in ("true", "false"):
            return low == "true"
        return raw


# ----------------------------------------------------------------------------------------------------------------------
# typed construction


def _from_dict(cls: type, d: Mapping[str, Any], section: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{section} config must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)} in {section} config; fields are: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list like [1,2,2], got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, f"{name}[]") if item is not Any else v for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f'{name} must be a JSON object like {{"a": 1}}, got {value!r}')
        return dict(value)
    return value


def _check_types(cfg: Any) -> None:
    """Re-run coercion on a directly constructed dataclass so that ``TrainConfig(lr="x")`` fails early."""
    hints = typing.get_type_hints(type(cfg))
    section = "tokenizer" if isinstance(cfg, TokenizerConfig) else "train"
    for f in dataclasses.fields(cfg):
        object.__setattr__(cfg, f.name, _coerce(getattr(cfg, f.name), hints[f.name], f"{section}.{f.name}"))
