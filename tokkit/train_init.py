"""Start a run from a trained tokenizer (``tokkit train --init-from``), and freeze parts of it (``--freeze``).

The source is anything ``tokkit.load`` reads (a tokkit checkpoint or run folder; a peer checkpoint once converted
on the fly). Its ``TokenizerConfig`` is the new run's architecture and its weights the starting point; the run records
where they came from (``InitSource.record``: the source and the sha256 of its weights as a tokkit ``model.safetensors``
would hold them), so that a resumed run never reads the source again.

Freezing a part (``freeze``) turns off its gradients and keeps it in eval mode for the whole run, whatever
``model.train()`` is called with. In eval mode a quantizer changes nothing: VQ's EMA codebook, k-means init and
dead-code restarts (and its usage counts) only run in training mode, and LFQ's entropy warm-up counter only advances
there. So a frozen quantizer keeps every code, and ``encoder`` + ``quantizer`` frozen keep every token id of an image.
FSQ and LFQ have no codebook to learn: only their input/output projections (when ``dim`` differs from the code
width) are parameters, and without them freezing the quantizer changes nothing (``freeze`` says so in a note).
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokkit.config import TokenizerConfig, TrainConfig
from tokkit.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI checks --freeze before torch loads
    from torch import Tensor, nn

# each freezable part -> the Tokenizer modules it covers (those the model has)
PARTS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder", "quant_conv"),
    "quantizer": ("quantizer",),
    "decoder": ("post_quant_conv", "decoder"),
}


def parse_freeze(values: Iterable[str] | None) -> tuple[str, ...]:
    """``--freeze`` values (repeated and/or comma lists) -> the parts, in model order, without repeats.

    Raises:
        ConfigError: an unknown part, or every part (nothing left to train).
    """
    parts = {p.strip() for v in values or () for p in str(v).split(",") if p.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ConfigError(f"unknown --freeze {', '.join(unknown)}: give {', '.join(PARTS)} (repeat it or use commas)")
    if parts == set(PARTS):
        raise ConfigError("--freeze of encoder, quantizer and decoder leaves nothing to train: freeze fewer parts")
    return tuple(p for p in PARTS if p in parts)


@dataclass(frozen=True)
class InitSource:
    """A trained tokenizer to start from.

    Attributes:
        source: where it was read: the absolute path, or the ``hf:`` name.
        sha256: sha256 of its weights serialized as a tokkit ``model.safetensors`` (for a tokkit checkpoint: the
            ``weights_sha256`` in its config.json).
        config: its architecture.
        state: its weights (a ``Tokenizer`` state dict, on the CPU).
    """

    source: str
    sha256: str
    config: TokenizerConfig
    state: dict[str, Tensor]

    def record(self) -> dict[str, str]:
        """What run.json and the checkpoints record: ``{"source", "sha256"}``."""
        return {"source": self.source, "sha256": self.sha256}


def check_init_path(source: str | Path) -> str:
    """``source`` as text, after checking that a local one exists (torch-free: the CLI calls it first).

    Raises:
        CheckpointError: no such local file or folder.
    """
    text = str(source)
    if not text.startswith("hf:") and not Path(text).expanduser().exists():
        raise CheckpointError(f"--init-from {text}: no such file or folder (give a tokkit checkpoint or run folder, "
                              "or a peer checkpoint that tokkit convert reads)")
    return text


def read_init(source: str | Path) -> InitSource:
    """Load ``source`` with ``tokkit.load`` (on the CPU) as an ``InitSource``.

    Raises:
        CheckpointError: nothing loadable at ``source`` (one line naming it).
    """
    from safetensors.torch import save

    import tokkit
    from tokkit.checkpoint import FORMAT

    text = check_init_path(source)
    model = tokkit.load(Path(text).expanduser() if not text.startswith("hf:") else text, device="cpu")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    sha = hashlib.sha256(save(state, metadata={"format": FORMAT})).hexdigest()  # = a tokkit checkpoint's file
    where = text if text.startswith("hf:") else str(Path(text).expanduser().resolve())
    return InitSource(source=where, sha256=sha, config=model.config, state=state)


def check_init_config(config: TokenizerConfig, init: InitSource) -> None:
    """Refuse (one line) a tokenizer config that contradicts the init source's: the architecture is the source's."""
    if config == init.config:
        return
    mine, theirs = config.to_dict(), init.config.to_dict()
    diff = [f"{k}={theirs.get(k)!r}" for k in theirs if mine.get(k) != theirs.get(k)]
    raise ConfigError(f"--init-from {init.source} fixes the tokenizer config, but it was changed ({', '.join(diff)} "
                      "in the checkpoint): drop those --set tokenizer.* overrides")


def check_freeze(parts: Sequence[str], cfg: TrainConfig) -> None:
    """Refuse (one line) settings a frozen part cannot train with."""
    if "decoder" in parts and cfg.disc_weight > 0 and cfg.disc_adaptive:
        raise ConfigError("--freeze decoder leaves no decoder layer for the adaptive GAN weight: also pass --set "
                          "train.disc_adaptive=false (or train.disc_weight=0)")


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    from torch import nn

    return nn.Module.train(self, False)


def freeze(model: nn.Module, parts: Sequence[str]) -> list[str]:
    """Freeze ``parts`` of a ``Tokenizer`` in place: no gradients, and eval mode that ``train()`` cannot undo.

    The eval mode is pinned on the module instance (its ``train`` method), so it survives ``copy.deepcopy`` (the
    EMA copy), DDP and ``torch.compile``; the state dict keys do not change.

    Args:
        model: the tokenizer (before its optimizer is built: frozen parameters are left out of it).
        parts: names from ``PARTS``.

    Returns:
        Notes for the user (a part with nothing to freeze, ids that can still change); empty when there are none.
    """
    from torch import nn

    notes = []
    for part in parts:
        for name in PARTS[part]:
            module = getattr(model, name, None)
            if not isinstance(module, nn.Module):
                continue
            module.requires_grad_(False)
            module.train = types.MethodType(_stay_in_eval, module)  # type: ignore[method-assign]
            module.train(False)
    quantizer: Any = model.quantizer
    learned = any(True for _ in quantizer.parameters()) or any(
        b.numel() for n, b in quantizer.named_buffers() if n.split(".")[-1] in ("codebook", "embed_avg"))
    family = getattr(quantizer, "registry_name", "") or type(quantizer).__name__
    if "quantizer" in parts and not learned:
        notes.append(f"--freeze quantizer: the {family} quantizer has no codebook or projection to learn (its ids are "
                     "fixed by construction), so freezing it changes nothing")
    if "encoder" in parts and "quantizer" not in parts and learned:
        notes.append(f"--freeze encoder: the {family} quantizer still learns, so token ids can change; add --freeze "
                     "quantizer to keep them")
    return notes


def trainable(model: nn.Module) -> int:
    """Parameters left to train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["PARTS", "InitSource", "check_freeze", "check_init_config", "check_init_path", "freeze", "parse_freeze",
           "read_init", "trainable"]
