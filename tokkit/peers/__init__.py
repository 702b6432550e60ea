"""Peer checkpoints (taming VQGAN, LlamaGen, diffusers VQModel, Open-MAGVIT2, MaskBit) as native tokkit tokenizers.

Each family lives in its own module (``tokkit.peers.taming`` ...) and registers a ``PeerFamily`` at import: a
``detect(state, extra)`` that recognises its key layout and a ``convert(state, extra)`` that returns the tokkit
config, the tokkit state dict (``Tokenizer(config).load_state_dict(strict=True)`` takes it) and the variant name.
``extra`` is the side config (taming's yaml ``model.params``, a diffusers ``config.json``, or {}) plus
``"source"``: the name the user gave, a hint for variants that only the file name tells (LlamaGen's ``_c2i``)::

    tok = tokkit.convert("hf:amused/amused-256/vqvae", out="peers/amused-256")   # converted + saved
    tok = tokkit.load("vqgan_imagenet_f16_16384/last.ckpt")                       # converted in memory

Reading (paths, ``hf:`` names, weights-only pickles, wrappers, yaml) is ``tokkit.peers.sources``. A converted
checkpoint is a normal tokkit folder (safetensors + config.json, no pickle) whose config.json records where it came
from under ``extra["provenance"]``: source, sha256, peer, variant, license, url, converted_by.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from tokkit.errors import CheckpointError, ConfigError, TokkitError

if TYPE_CHECKING:
    from tokkit.config import TokenizerConfig
    from tokkit.models.tokenizer import Tokenizer
    from tokkit.peers.sources import PeerSource
    from tokkit.progress import Reporter

# every family module; one not written yet is skipped (only its own absence, never an error inside it)
FAMILY_MODULES = (
    "tokkit.peers.taming",
    "tokkit.peers.llamagen",
    "tokkit.peers.diffusers",
    "tokkit.peers.open_magvit2",
    "tokkit.peers.maskbit",
    "tokkit.peers.ibq",
)


@dataclass(frozen=True)
class PeerFamily:
    """One peer codebase whose checkpoints tokkit converts.

    Attributes:
        name: "taming", "llamagen", "diffusers", "open-magvit2", "maskbit".
        license: the peer's license, e.g. "MIT".
        url: the peer's repository.
        detect: (state_dict, extra) -> whether the checkpoint is this family's.
        convert: (state_dict, extra) -> (tokkit config, tokkit state dict, variant name).
    """

    name: str
    license: str
    url: str
    detect: Callable[[Mapping[str, Tensor], dict], bool]
    convert: Callable[[Mapping[str, Tensor], dict], tuple[TokenizerConfig, dict[str, Tensor], str]]


_FAMILIES: dict[str, PeerFamily] = {}


def register_family(family: PeerFamily) -> None:
    """Register a peer family under ``family.name`` (a module calls this once, at import)."""
    old = _FAMILIES.get(family.name)
    if old is not None and old != family:
        raise ValueError(f"peer family {family.name!r} is already registered")
    _FAMILIES[family.name] = family


def _import_families() -> None:
    for module in FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # an import inside the module failed: a real error
                raise


def list_families() -> list[PeerFamily]:
    """Every registered family, in ``FAMILY_MODULES`` order."""
    _import_families()
    return list(_FAMILIES.values())


def get_family(name: str) -> PeerFamily:
    """The family called ``name``; ``ConfigError`` listing the known ones otherwise."""
    _import_families()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown peer family {name!r}: use one of {', '.join(_FAMILIES) or 'none installed'}")
    return _FAMILIES[name]


def detect_family(state: Mapping[str, Tensor], extra: dict, where: str = "the checkpoint") -> PeerFamily:
    """The one family whose ``detect`` accepts the checkpoint.

    Raises:
        CheckpointError: no family, or several (then ``--family`` decides).
    """
    found = [f for f in list_families() if f.detect(state, extra)]
    if len(found) == 1:
        return found[0]
    names = ", ".join(_FAMILIES)
    if not found:
        sample = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"{where}: no known peer layout ({len(state)} tensors, e.g. {sample}); tokkit converts {names} "
            "(a taming .ckpt needs its yaml beside it or --config)"
        )
    raise CheckpointError(f"{where} matches {', '.join(f.name for f in found)}: pass --family NAME")


def complete_state(config: TokenizerConfig, mapped: Mapping[str, Tensor], family: str) -> dict[str, Tensor]:
    """Check converted tensors against ``Tokenizer(config)`` (built on the meta device: no memory, no RNG draw) and
    add the quantizer's bookkeeping buffers the peer has no counterpart for (``cluster_size``, ``initialized`` ...),
    with the values a freshly built quantizer of this config holds.

    Args:
        config: the tokkit config the converter derived.
        mapped: the converted tensors under tokkit's names.
        family: the peer's name, for the error messages.

    Returns:
        A state dict, in the model's key order, that ``Tokenizer(config).load_state_dict(strict=True)`` accepts.

    Raises:
        CheckpointError: a tensor with no place in the model, a missing one outside the quantizer, or a wrong shape.
    """
    import torch

    from tokkit.models.tokenizer import Tokenizer, quantizer_from_config

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        reference = Tokenizer(config).state_dict()
    unknown = sorted(set(mapped) - set(reference))
    if unknown:
        raise CheckpointError(f"{family} checkpoint: tensors with no place in the tokkit model: {unknown[:3]}")
    out = dict(mapped)
    missing = [k for k in reference if k not in out]
    if any(k.startswith("quantizer.") for k in missing):
        with torch.random.fork_rng(devices=[]):
            fresh = {f"quantizer.{k}": v for k, v in quantizer_from_config(config).state_dict().items()}
    for key in missing:
        if not key.startswith("quantizer.") or key not in fresh:
            raise CheckpointError(f"{family} checkpoint lacks the tensor for tokkit's {key!r}")
        out[key] = fresh[key]
    for key, ref in reference.items():
        if tuple(out[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{family} checkpoint: {key!r} has shape {tuple(out[key].shape)}, expected {tuple(ref.shape)}"
            )
    return {k: out[k] for k in reference}


def count_indexed(state: Mapping[str, Tensor], pattern: str) -> int:
    """How many consecutive ``i = 0, 1, ...`` have ``pattern.format(i)`` in ``state`` (blocks, levels of a peer)."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def shape_dim(state: Mapping[str, Tensor], key: str, axis: int, family: str) -> int:
    """``state[key].shape[axis]``; a missing key is a ``CheckpointError`` naming it (an incomplete state dict)."""
    if key not in state:
        raise CheckpointError(f"{family} checkpoint lacks {key!r}: not a complete {family} state dict")
    return int(state[key].shape[axis])


@dataclass
class Conversion:
    """The result of ``convert_source``.

    Attributes:
        tokenizer: the converted ``Tokenizer``, in eval mode.
        family: the peer family.
        variant: the family's variant name (e.g. "vq_ds16_c2i", "movq").
        provenance: what config.json records under ``extra["provenance"]``.
        out: the checkpoint folder written, or None.
    """

    tokenizer: Tokenizer
    family: PeerFamily
    variant: str
    provenance: dict[str, Any]
    out: Path | None = None


def convert_source(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    *,
    family: str | None = None,
    overwrite: bool = False,
    resolution: int | None = None,
    variant: str | None = None,
    ema: bool = True,
    reporter: Reporter | None = None,
) -> Conversion:
    """Read a peer checkpoint, convert it to a tokkit ``Tokenizer`` and optionally save it.

    Args:
        source: local file / folder or ``hf:`` name (see ``tokkit.peers.sources``).
        out: write a tokkit checkpoint folder here (safetensors + config.json with provenance).
        config: taming's yaml, when it is not beside the ``.ckpt``.
        device: where the returned tokenizer lives.
        family: the family to use instead of detecting it.
        overwrite: replace an existing ``out`` (otherwise refused).
        resolution: the image side the tokenizer preprocesses to (``encode_images``, ``tokkit encode``), instead of the
            family's default (e.g. 512 for aMUSEd-512, whose config does not say); a multiple of the downsampling.
        variant: the variant name to record, for releases the shapes cannot tell apart (Open-MAGVIT2's
            ``pretrain_256_262144`` has ``imagenet_256_L``'s shapes); families that can check it refuse a contradiction.
        ema: use the EMA weights when the checkpoint holds them (Open-MAGVIT2, IBQ: what their authors evaluate);
            False takes the raw training weights.
        reporter: progress phases (read, convert, save).

    Returns:
        The ``Conversion``.

    Raises:
        CheckpointError: unreadable, refused or unknown checkpoints; weights that do not fit.
        OutputError: ``out`` exists and ``overwrite`` is False.
    """
    import tokkit
    from tokkit.checkpoint import save_checkpoint
    from tokkit.errors import OutputError
    from tokkit.models.tokenizer import Tokenizer
    from tokkit.peers.sources import read_source
    from tokkit.progress import Reporter
    from tokkit.runtime import resolve_device

    rep = reporter or Reporter()
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputError(f"{out} exists: choose another --out, or pass --force to replace it")
    rep.start("convert", 3 if out is not None else 2)
    src: PeerSource = read_source(source, config)
    rep.advance(1)
    extra = {"source": src.name, **src.extra}  # the name as given: a variant hint (LlamaGen's vq_ds16_c2i.pt)
    variant_hint = variant
    if variant:
        extra["variant"] = str(variant)
    if not ema:
        extra["ema"] = False
    fam = get_family(family) if family else detect_family(src.state, extra, src.name)
    try:
        tcfg, state, variant = fam.convert(src.state, extra)
    except TokkitError as e:
        raise CheckpointError(f"{src.name}: {fam.name} conversion: {e}") from None
    except (KeyError, ValueError, IndexError) as e:  # a layout the family recognised but cannot map
        raise CheckpointError(f"{src.name}: not a {fam.name} layout tokkit can map ({type(e).__name__}: {e})") from None
    if resolution is not None:
        tcfg = dataclasses.replace(tcfg, resolution=int(resolution))  # validated again: a ConfigError if it cannot be
    model = Tokenizer(tcfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:200]
        msg = f"converted {fam.name} weights do not fit the tokkit model: {first}"
        raise CheckpointError(f"{src.name}: {msg}") from None
    rep.advance(2)
    provenance = {
        "source": src.name,
        "sha256": src.sha256,
        "peer": fam.name,
        "variant": variant,
        "variant_given": bool(variant_hint),
        "license": fam.license,
        "url": fam.url,
        "converted_by": f"tokkit {tokkit.__version__}",
        "files": dict(src.files),
    }
    written = None
    if out is not None:
        written = save_checkpoint(model, out, extra={"provenance": provenance})
        rep.advance(3)
    rep.stop()
    model = model.to(resolve_device(device)).eval()
    return Conversion(model, fam, variant, provenance, written)


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    *,
    family: str | None = None,
    overwrite: bool = False,
) -> Tokenizer:
    """A peer checkpoint as a ``Tokenizer`` (also ``tokkit.convert``); ``out`` also saves it as a tokkit checkpoint.

    Args:
        source: local file / folder or ``hf:ORG/REPO/FILE`` (see ``convert_source``).
        out: checkpoint folder to write (refused if it exists, unless ``overwrite``).
        config: taming's yaml when it is not beside the ``.ckpt``.
        device: where the tokenizer lives.
        family: force a family instead of detecting it.
        overwrite: replace an existing ``out``.

    Returns:
        The tokenizer, in eval mode.
    """
    return convert_source(source, out, config, device, family=family, overwrite=overwrite).tokenizer


__all__ = [
    "FAMILY_MODULES",
    "Conversion",
    "PeerFamily",
    "complete_state",
    "count_indexed",
    "convert",
    "convert_source",
    "detect_family",
    "get_family",
    "list_families",
    "register_family",
    "shape_dim",
]
