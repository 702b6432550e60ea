"""``tokkit.load``: a tokkit checkpoint (or run folder) as it is; any peer checkpoint converted in memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokkit.models.tokenizer import Tokenizer


def is_tokkit_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``tokkit.load`` reads ``path`` as a tokkit checkpoint (or run folder): any folder that is not a
    diffusers model folder (``tokkit.checkpoint`` then says what is wrong with a broken one)."""
    from tokkit.peers.sources import diffusers_folder

    p = Path(path)
    return p.is_dir() and diffusers_folder(p) is None


def load(
    source: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    config: str | os.PathLike[str] | None = None,
    family: str | None = None,
) -> Tokenizer:
    """Load a tokenizer, in eval mode (also ``tokkit.load``).

    Args:
        source: a tokkit checkpoint folder, a run folder holding ``checkpoint/``, or a peer checkpoint: a local
            ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file, a diffusers ``VQModel`` folder, or
            ``hf:ORG/REPO/FILE`` (converted in memory by ``tokkit.peers.convert``; nothing is written).
        device: where to put the model.
        config: taming's yaml for a peer ``.ckpt`` whose yaml is not beside it.
        family: force a peer family instead of detecting it.

    Raises:
        CheckpointError: see ``tokkit.checkpoint.read_checkpoint_meta`` and ``tokkit.peers.convert``.
    """
    text = os.fspath(source)
    if not text.startswith("hf:") and is_tokkit_checkpoint(text):
        from tokkit.models.tokenizer import load as load_tokkit

        return load_tokkit(text, device)
    from tokkit.peers import convert

    return convert(source, config=config, device=str(device), family=family)


__all__ = ["is_tokkit_checkpoint", "load"]
