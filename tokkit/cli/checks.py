"""Checks of paths and values that run while the command line is parsed, before torch is imported.

A wrong path or value is reported in a fraction of a second instead of after the seconds torch takes to load. Each
check only looks at the file system or the text; the library checks everything again (and more) when it runs, with
the same messages, so that library callers are covered too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from tokkit.errors import CheckpointError, DataError, ShardError

# the formats tokkit.checkpoint, tokkit.data.open_source and tokkit.shards.read_manifest accept (messages as theirs)
_CONFIG, _WEIGHTS, _MANIFEST = "config.json", "model.safetensors", "manifest.json"
_DEVICE = re.compile(r"(auto|cpu|mps|meta|(cuda|xpu)(:\d+)?)")
VIEWS = ("none", "flip", "tencrop")  # tokkit.data.transforms.VIEWS (a test keeps the two equal)


def checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder holding ``checkpoint/``, exists (as ``resolve_checkpoint_dir`` checks)."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: pass a folder with {_WEIGHTS} and {_CONFIG} (e.g. runs/NAME)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder with {_WEIGHTS} and {_CONFIG}")
    return path


def data(spec: str) -> str:
    """An image source exists: ``sample``, a folder, a file, or ``FILE.npz:KEY`` (``tokkit.data.open_source``)."""
    text = spec
    if text == "sample" or any(c in text for c in "*?[{") or "://" in text or text.startswith("hf:"):  # patterns, URLs
        return spec
    if ".npz:" in text and not Path(text).exists():
        text = text.rsplit(":", 1)[0]
    path = Path(text).expanduser()
    if not path.exists():
        kinds = "an image folder, .zip, .txt list, .npy/.npz, .tar shards, .parquet or 'sample'"
        raise DataError(f"data not found: {path} (give {kinds})")
    return spec


def shard_path(path: Path) -> Path:
    """A shard set folder (or its manifest) exists (``tokkit.shards.read_manifest`` says what else is wrong)."""
    if not path.exists():
        hint = f"check it, or run tokkit encode --out {path}"
        raise ShardError(f"no shard set at {path}: the path does not exist ({hint})")
    return path


def out_folder(path: Path) -> Path:
    """An output folder is not an existing file."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a folder: choose another --out (or remove the file)")
    return path


# ---- option callbacks (a TokkitError becomes one `error:` line; BadParameter a one-line usage error) ----


def checkpoint_argument(value: Any) -> Any:
    if value is None:
        return value
    for p in value if isinstance(value, list | tuple) else [value]:
        checkpoint(Path(p))
    return value


def data_option(value: str | None) -> str | None:
    return value if value is None else data(value)


def shard_argument(value: Path | None) -> Path | None:
    return value if value is None else shard_path(value)


def out_option(value: Path | None) -> Path | None:
    return value if value is None else out_folder(value)


def device_option(value: str) -> str:
    if not _DEVICE.fullmatch(str(value)):
        raise typer.BadParameter(f"unknown device {value!r}: use auto, cpu, cuda or cuda:N")
    return value


def views_option(value: str) -> str:
    if value not in VIEWS:
        raise typer.BadParameter(f"unknown --views {value!r}: use one of {', '.join(VIEWS)}")
    return value
