"""Checkpoint folders: ``model.safetensors`` + ``config.json``; written atomically, loaded without pickle.

``config.json``::

    {"format": "tokkit-checkpoint/1", "tokkit_version": "0.1.0", "tokenizer": {...TokenizerConfig...},
     "weights_sha256": "...", "extra": {...optional, e.g. the training step...}}

A run folder (``runs/<name>/``) holds its checkpoint in ``checkpoint/``; ``load_checkpoint`` and
``read_checkpoint_meta`` accept either the checkpoint folder or the run folder.

This module knows the folder format and no model: ``save_checkpoint`` takes any module with a ``.config``, and
``load_checkpoint`` takes the function that builds the model. ``tokkit.models.tokenizer`` builds on it
(``Tokenizer.save``, ``load``, ``load_with_meta``); it never imports the tokenizer, except to keep
``tokkit.checkpoint.load`` / ``load_with_meta`` working for code that imports them from here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokkit.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from tokkit.config import TokenizerConfig

FORMAT = "tokkit-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (files created, renamed, removed) durable; a no-op where folders cannot be synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows, where a folder cannot be opened
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


def write_durable(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (a full disk raises here, not later); ``fsync=False`` skips
    the sync where a file that exists is complete enough (one small file per image)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary ``.NAME.tmp-XXXXXXXX`` beside ``path`` to write; renamed onto ``path`` when the block succeeds,
    removed when it fails (``path`` is then untouched). Errors propagate as they are."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with suppress(OSError):
            if tmp.exists():  # only after a failure: os.replace consumed it otherwise
                tmp.unlink()


def atomic_replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing an old ``dest`` (never leaves ``dest`` half-written)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint_dir(
    folder: str | Path, state: dict[str, torch.Tensor], config: Any, extra: dict[str, Any] | None = None
) -> Path:
    """Create the checkpoint folder ``folder`` (which must not exist) from a state dict, every file fsynced.

    Args:
        folder: the new folder.
        state: the ``Tokenizer`` state dict.
        config: its ``TokenizerConfig``.
        extra: optional JSON-able notes stored under ``"extra"`` in config.json (e.g. the training step).

    Returns:
        The folder.
    """
    from safetensors.torch import save

    import tokkit

    folder = Path(folder)
    folder.mkdir()
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, metadata={"format": FORMAT})
    write_durable(folder / WEIGHTS, blob)
    meta = {
        "format": FORMAT,
        "tokkit_version": tokkit.__version__,
        "tokenizer": config.to_dict(),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    if extra:
        meta["extra"] = extra
    write_durable(folder / CONFIG, (json.dumps(meta, indent=2) + "\n").encode())
    fsync_dir(folder)
    return folder


def save_checkpoint(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a ``Tokenizer``) as a checkpoint folder, atomically (tmp folder + rename).

    Args:
        model: a ``Tokenizer`` (needs ``.config``, a ``TokenizerConfig``).
        path: the checkpoint folder to create or replace.
        extra: optional JSON-able notes stored under ``"extra"`` in config.json (e.g. the training step).

    Returns:
        The checkpoint folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_checkpoint_dir(tmp, model.state_dict(), model.config, extra)
        atomic_replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint folder for ``path``: the folder itself, or ``path/checkpoint`` for a run folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: pass a folder with {WEIGHTS} and {CONFIG} (e.g. runs/NAME)")
    if p.is_dir() and not (p / CONFIG).exists() and (p / "checkpoint" / CONFIG).exists():
        return p / "checkpoint"
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; a checkpoint is a folder with {WEIGHTS} and {CONFIG}")
    return p


def read_checkpoint_meta(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and validate a checkpoint's ``config.json``.

    Args:
        path: checkpoint folder (or a run folder holding ``checkpoint/``).
        verify: also check the weights file's sha256 against the recorded one.

    Returns:
        The ``config.json`` content.

    Raises:
        CheckpointError: missing folder or files, unreadable JSON, not a tokkit checkpoint, bad config, sha mismatch.
    """
    d = resolve_checkpoint_dir(path)
    cfg_path, weights = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file():
        raise CheckpointError(f"{d} has no {CONFIG}: not a tokkit checkpoint folder (expected {WEIGHTS} + {CONFIG})")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is unreadable or not JSON ({e}); re-save the checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{cfg_path} is not a {FORMAT} config (format: {found!r})")
    if not isinstance(meta.get("tokenizer"), dict) or not isinstance(meta.get("weights_sha256"), str):
        raise CheckpointError(f"{cfg_path} lacks the 'tokenizer' config or 'weights_sha256'; the checkpoint is corrupt")
    from tokkit.config import TokenizerConfig

    try:
        TokenizerConfig.from_dict(meta["tokenizer"])
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path} has a bad tokenizer config: {e}") from None
    if not weights.is_file():
        raise CheckpointError(f"{d} has no {WEIGHTS}; the checkpoint is incomplete")
    if verify and sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in {CONFIG}: the weights are corrupt or replaced")
    return meta


def load_checkpoint(
    path: str | Path, build: Callable[[TokenizerConfig], nn.Module], device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model from a checkpoint folder's config and load its weights into it, in eval mode.

    This module knows the folder format, not the model: ``tokkit.models.tokenizer.load`` passes ``Tokenizer``.

    Args:
        path: checkpoint folder, or a run folder holding ``checkpoint/``.
        build: makes the (randomly initialised) model from the ``TokenizerConfig`` in config.json.
        device: where to put the model.

    Returns:
        The model and the validated ``config.json`` content (so callers need not read and hash it again).

    Raises:
        CheckpointError: see ``read_checkpoint_meta``; also weights that do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tokkit.config import TokenizerConfig
    from tokkit.runtime import resolve_device

    d = resolve_checkpoint_dir(path)
    meta = read_checkpoint_meta(d)
    model = build(TokenizerConfig.from_dict(meta["tokenizer"]))
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{d / WEIGHTS} is not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{d / WEIGHTS} does not fit its config.json: {first}") from None
    return model.to(resolve_device(device)).eval(), meta


# ``load`` and ``load_with_meta`` build a ``Tokenizer``, so they live in ``tokkit.models.tokenizer`` (which imports
# this module); these names stay here for the code that imports them from ``tokkit.checkpoint``.
_MOVED = {"load", "load_with_meta"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from tokkit.models import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "atomic_replace_dir",
    "fsync_dir",
    "load_checkpoint",
    "read_checkpoint_meta",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "sha256_file",
    "write_checkpoint_dir",
    "atomic_path",
    "write_durable",
]
