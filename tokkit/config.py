"""Flat config dataclasses, named presets, JSON round trip and ``field=value`` overrides.

A ``TokenizerConfig`` describes the model (it travels with the weights in ``config.json``); a ``TrainConfig`` holds
every training knob. A ``Preset`` pairs the two under a name (``tokkit presets`` lists them). Layers never read a
config: ``tokkit.models.tokenizer`` turns a ``TokenizerConfig`` into explicit keyword arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
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
        num_res_blocks: residual blocks per level (encoder, and decoder unless ``decoder_res_blocks``).
        attention: self-attention blocks in the middle (lowest resolution) of encoder and decoder.
        z_channels: latent channels of the encoder's output and the decoder's input.
        spatial_norm: MoVQ spatially conditional normalization: decoder norms modulated by the quantized codes (before
            ``post_quant_conv``, ``embed_dim`` channels).
        quantizer: registered quantizer name (``tokkit.quantizers.list_quantizers()``).
        quantizer_kwargs: extra keyword arguments of the quantizer (``dim`` is ``embed_dim``).
        arch: the autoencoder family: ``vqgan`` (``tokkit.models.autoencoder``) or ``magvit2``
            (``tokkit.models.magvit2``).
        arch_kwargs: extra keyword arguments of the arch's Encoder and Decoder.
        attn_levels: levels (0 = full resolution, in encoder order) whose residual blocks are each followed by
            self-attention, in the encoder and in the decoder level of the same resolution.
        decoder_res_blocks: residual blocks per decoder level (None = ``num_res_blocks``).
        quant_conv: 1x1 convolutions ``z_channels -> embed_dim`` before the quantizer and back after it.
        embed_dim: the quantizer's ``dim`` (None = ``z_channels``); differs from ``z_channels`` only with
            ``quant_conv``.
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
    arch: str = "vqgan"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    attn_levels: list[int] = field(default_factory=list)
    decoder_res_blocks: int | None = None
    quant_conv: bool = False
    embed_dim: int | None = None

    def __post_init__(self) -> None:
        _validate(self, "tokenizer", _TOKENIZER_RULES)
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"tokenizer.resolution {self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1)): use a multiple of {self.downsample_factor} "
                "or fewer channel_mult levels"
            )
        levels = len(self.channel_mult)
        if any(i >= levels for i in self.attn_levels):
            raise ConfigError(
                f"tokenizer.attn_levels {_show(self.attn_levels)} must be level numbers in [0, {levels}) "
                f"(one level per channel_mult entry, 0 = full resolution)"
            )
        if not self.quant_conv and self.embed_dim is not None and self.embed_dim != self.z_channels:
            raise ConfigError(
                f"tokenizer.embed_dim {self.embed_dim} differs from z_channels {self.z_channels} without quant_conv: "
                "set tokenizer.quant_conv=true (1x1 convs between them) or leave embed_dim unset"
            )
        _check_quantizer(self.quantizer, self.quantizer_kwargs, self.quantizer_dim)
        if self.arch != "vqgan" or self.arch_kwargs:
            _check_arch(self)

    @property
    def quantizer_dim(self) -> int:
        """Channels the quantizer sees: ``embed_dim``, else ``z_channels``."""
        return self.z_channels if self.embed_dim is None else self.embed_dim

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
        num_workers: DataLoader workers; -1 = auto: ``min(8, cores per process - 1)`` on CUDA, 0 on the CPU (where the
            workers would take cores from the step).
        amp: ``auto`` (bf16 autocast on CUDA, off on CPU), ``bf16`` or ``none``.
        compile: ``torch.compile`` the tokenizer (and discriminator) for the step: ``auto`` (on CUDA only), ``on`` or
            ``off``. The first step then takes the compile time (shown in the progress output).
        grad_checkpointing: recompute each residual / attention block's activations in backward instead of keeping
            them (less memory, about a third more compute).
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
    num_workers: int = -1
    amp: str = "auto"
    cpu_threads: int = 0
    compile: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _validate(self, "train", _TRAIN_RULES)
        if self.recon_weight == 0 and (self.perceptual == "none" or self.perceptual_weight == 0):
            raise ConfigError(
                "train.recon_weight is 0 and the perceptual loss is off: nothing would teach the decoder to "
                "reconstruct; set train.recon_weight > 0 (or a perceptual loss with train.perceptual_weight > 0)"
            )

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
                  "eval_images": 32, "ema_decay": 0.999, "log_every": 50}
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
    out = {name: _from_dict(type(cfgs[name]), d, name) for name, d in data.items()}
    if isinstance(out.get("tokenizer"), TokenizerConfig) and isinstance(out.get("train"), TrainConfig):
        check_compatible(out["tokenizer"], out["train"])
    return out


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


def _check_types(cfg: Any, section: str) -> None:
    """Re-run coercion on a directly constructed dataclass so that ``TrainConfig(lr="x")`` fails early."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        object.__setattr__(cfg, f.name, _coerce(getattr(cfg, f.name), hints[f.name], f"{section}.{f.name}"))


# ----------------------------------------------------------------------------------------------------------------------
# range checks: one rule per field, run at construction (so also by from_dict and apply_overrides)


@dataclass(frozen=True)
class _Rule:
    """A value check and the words for what it allows (``>= 1``, ``in [0, 1)``, ``one of l1, l2``)."""

    ok: Callable[[Any], bool]
    allowed: str


def _at_least(lo: float, note: str = "") -> _Rule:
    return _Rule(lambda v: math.isfinite(v) and v >= lo, f">= {lo}" + (f" ({note})" if note else ""))


def _above(lo: float, note: str = "") -> _Rule:
    return _Rule(lambda v: math.isfinite(v) and v > lo, f"> {lo}" + (f" ({note})" if note else ""))


def _unit(closed: bool = False, note: str = "") -> _Rule:
    """[0, 1), or [0, 1] when ``closed``."""
    if closed:
        return _Rule(lambda v: 0 <= v <= 1, "in [0, 1]" + (f" ({note})" if note else ""))
    return _Rule(lambda v: 0 <= v < 1, "in [0, 1)" + (f" ({note})" if note else ""))


def _optional(rule: _Rule, none_means: str) -> _Rule:
    """``rule``, or None."""
    return _Rule(lambda v: v is None or rule.ok(v), f"{rule.allowed} or null ({none_means})")


def _one_of(*allowed: str) -> _Rule:
    return _Rule(lambda v: v in allowed, f"one of {', '.join(allowed)}")


_ANY_BOOL = _Rule(lambda v: isinstance(v, bool), "true or false")
_SEED_MAX = 2**32 - 1  # the data order mixes the seed into 64-bit generator seeds

_TOKENIZER_RULES: dict[str, _Rule] = {
    "resolution": _at_least(1),
    # the data pipeline decodes every image to RGB, and the discriminator takes 3 channels
    "in_channels": _Rule(lambda v: v == 3, "3 (RGB; every image is decoded to RGB)"),
    "base_channels": _at_least(1),
    "channel_mult": _Rule(lambda v: len(v) >= 1 and all(m >= 1 for m in v), "a non-empty list of integers >= 1"),
    "num_res_blocks": _at_least(0),
    "attention": _ANY_BOOL,
    "z_channels": _at_least(1),
    "spatial_norm": _ANY_BOOL,
    "quantizer": _Rule(lambda v: bool(v), "a registered quantizer name"),  # the registry is asked after the ranges
    "quantizer_kwargs": _Rule(lambda v: "dim" not in v, "a dict without 'dim' (dim is tokenizer.embed_dim)"),
    "arch": _one_of("vqgan", "magvit2"),  # the module of each: tokkit.models.tokenizer.ARCHS
    "arch_kwargs": _Rule(lambda v: all(isinstance(k, str) and k.isidentifier() for k in v),
                         "a dict of keyword arguments of the arch's Encoder and Decoder"),
    "attn_levels": _Rule(lambda v: all(i >= 0 for i in v) and len(set(v)) == len(v),
                         "a list of distinct level numbers >= 0 (0 = full resolution)"),
    "decoder_res_blocks": _optional(_at_least(0), "None = num_res_blocks"),
    "quant_conv": _ANY_BOOL,
    "embed_dim": _optional(_at_least(1), "None = z_channels"),
}

_TRAIN_RULES: dict[str, _Rule] = {
    "steps": _at_least(1),
    "batch_size": _at_least(1),
    "lr": _above(0),
    "warmup_steps": _at_least(0, "0 = no warm-up"),
    "min_lr_ratio": _unit(closed=True),
    "weight_decay": _at_least(0),
    "beta1": _unit(),
    "beta2": _unit(),
    "grad_clip": _at_least(0, "0 = no clipping"),
    "ema_decay": _unit(note="0 = no EMA"),
    "seed": _Rule(lambda v: 0 <= v <= _SEED_MAX, f"in [0, {_SEED_MAX}]"),
    "recon_loss": _one_of("l1", "l2"),
    "recon_weight": _at_least(0),
    "perceptual": _one_of("auto", "lpips", "none"),
    "perceptual_weight": _at_least(0),
    "lpips_net": _one_of("alex", "vgg"),
    "quantizer_weight": _at_least(0),
    "disc_weight": _at_least(0, "0 = no discriminator"),
    "disc_start": _at_least(0),
    "disc_adaptive": _ANY_BOOL,
    "disc_lr": _at_least(0, "0 = same as lr"),
    "disc_channels": _at_least(1),
    "disc_layers": _at_least(0),
    "lecam_weight": _at_least(0, "0 = off"),
    "lecam_decay": _unit(),
    "log_every": _at_least(1),
    "eval_every": _at_least(0, "0 = only at the end"),
    "checkpoint_every": _at_least(0, "0 = only at the end"),
    "eval_images": _at_least(1),  # the held-out batch is evaluated (PSNR, grid) at least at the end
    "num_workers": _at_least(-1, "-1 = auto"),
    "amp": _one_of("auto", "bf16", "none"),
    "cpu_threads": _at_least(0, "0 = torch's default"),
    "compile": _one_of("auto", "on", "off"),
    "grad_checkpointing": _ANY_BOOL,
}


def _validate(cfg: Any, section: str, rules: Mapping[str, _Rule]) -> None:
    """Types first (with coercion), then every field's range; the first bad field is a one-line ``ConfigError``."""
    _check_types(cfg, section)
    for f in dataclasses.fields(cfg):
        if f.name not in rules:  # a bug: every field needs a range check
            raise TypeError(f"{type(cfg).__name__}.{f.name} has no range check in tokkit.config")
        value, rule = getattr(cfg, f.name), rules[f.name]
        if not rule.ok(value):
            raise ConfigError(f"{section}.{f.name} must be {rule.allowed}, got {_show(value)}")


def _show(value: Any) -> str:
    """A value as the user wrote it (JSON where it can be), cut to one short line."""
    try:
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else repr(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_quantizer(name: str, kwargs: Mapping[str, Any], z_channels: int) -> None:
    """Build the quantizer once (on the meta device: no memory, no RNG draw) so that bad kwargs fail now."""
    try:
        key = json.dumps(kwargs, sort_keys=True)
    except (TypeError, ValueError):  # not JSON (a quantizer object inside the kwargs): no cache
        _build_quantizer_check(name, z_channels, dict(kwargs))
        return
    _cached_quantizer_check(name, z_channels, key)


@functools.lru_cache(maxsize=256)
def _cached_quantizer_check(name: str, z_channels: int, key: str) -> None:
    _build_quantizer_check(name, z_channels, json.loads(key))


def _build_quantizer_check(name: str, z_channels: int, kwargs: dict[str, Any]) -> None:
    import torch

    from tokkit.quantizers import list_quantizers
    from tokkit.quantizers.base import get_quantizer_class

    if name not in list_quantizers():
        raise ConfigError(
            f"tokenizer.quantizer: unknown quantizer {name!r}; choose one of: {', '.join(list_quantizers())}"
        )
    cls = get_quantizer_class(name)
    try:
        try:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                cls(dim=z_channels, **kwargs)
        except (NotImplementedError, RuntimeError):  # an op without a meta kernel (a user's quantizer): on the CPU
            with torch.random.fork_rng(devices=[]):
                cls(dim=z_channels, **kwargs)
    except Exception as e:  # anything the quantizer refuses to be built with is a config mistake
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"tokenizer.quantizer_kwargs {_show(kwargs)} are not accepted by quantizer "
            f"{name!r} (dim = tokenizer.embed_dim, else z_channels, = {z_channels}): {first}"
        ) from None


def _check_arch(cfg: TokenizerConfig) -> None:
    """Build the arch's Encoder and Decoder once on the meta device, so that a missing module or bad kwargs fail now."""
    try:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
    except (TypeError, ValueError):
        raise ConfigError(f"tokenizer.arch_kwargs {_show(cfg.arch_kwargs)} must hold JSON values") from None
    import torch

    from tokkit.models.tokenizer import ARCHS, arch_modules, decoder_kwargs, encoder_kwargs

    key += ARCHS.get(cfg.arch, "")
    if key in _ARCH_CHECKED:
        return

    encoder_cls, decoder_cls = arch_modules(cfg.arch)
    enc_kw, dec_kw = encoder_kwargs(cfg), decoder_kwargs(cfg)  # ConfigError for keywords the arch does not take
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            encoder_cls(**enc_kw)
            decoder_cls(**dec_kw)
    except Exception as e:  # anything the arch refuses to be built with is a config mistake
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"tokenizer.arch_kwargs {_show(cfg.arch_kwargs)} are not accepted by arch {cfg.arch!r}: {first}"
        ) from None
    if len(_ARCH_CHECKED) < 256:
        _ARCH_CHECKED.add(key)


_ARCH_CHECKED: set[str] = set()  # configs (as sorted JSON) whose arch was built once


def check_compatible(tokenizer: TokenizerConfig, train: TrainConfig) -> None:
    """Checks that need both configs: the PatchGAN must leave at least one logit at the tokenizer's resolution.

    Raises:
        ConfigError: one line naming the fields and what to change.
    """
    if train.disc_weight <= 0:
        return
    side = tokenizer.resolution // 2 ** max(train.disc_layers, 1)  # stride-2 layers (the first one always)
    side -= 2 if train.disc_layers >= 1 else 1  # the two stride-1 4x4 convolutions (one without hidden layers)
    if side < 1:
        raise ConfigError(
            f"train.disc_layers {train.disc_layers} is too deep for tokenizer.resolution {tokenizer.resolution}: "
            "the discriminator would shrink the image to nothing; lower train.disc_layers or set train.disc_weight=0"
        )
