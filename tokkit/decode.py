"""``decode_tokens``: token ids (a shard set or a ``.npy``) -> PNG images (and a grid), the library side of
``tokkit decode``.

Every input gets its own output file: a shard item is named after its source key (``a/img.bmp`` ->
``a__img.bmp.png``; a key that already ends in ``.png`` keeps its name), a ``.npy`` row after its index
(``000003.png``); a name taken already (case-insensitively, ``grid.png`` included) gets ``-1``, ``-2`` ... Each PNG
is written to a temporary and renamed, so a file that exists is complete; temporaries of these names left by an
interrupted run are removed.
"""

from __future__ import annotations

import hashlib
import io
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokkit.data.transforms import make_grid, to_uint8
from tokkit.errors import ConfigError, ShardError
from tokkit.progress import Reporter, resolve
from tokkit.shards import atomic_write_bytes, check_ids, open_shards, read_manifest, temporaries_of, writing

GRID = "grid.png"
_MAX_NAME = 200  # bytes; file systems allow 255


@dataclass
class DecodeResult:
    """What ``decode_tokens`` wrote: ``files`` (one PNG per decoded item) and ``grid`` (or None).

    ``count`` equals ``len(files)``: every item has its own file.
    """

    out: Path
    count: int
    files: list[Path] = field(default_factory=list)
    grid: Path | None = None


def load_indices(
    tokens: str | Path, limit: int | None = None, view: int = 0, codebook_size: int | None = None
) -> tuple[np.ndarray, list[str], dict]:
    """Token ids from a shard set folder or a ``.npy`` file.

    Args:
        tokens: a shard set folder (or its manifest.json) or a ``.npy`` of integer ids (N, h, w[, G]).
        limit: read only the first ``limit`` items.
        view: which stored view (shard sets with a views axis).
        codebook_size: when given, every id must lie in [0, codebook_size) (checked before any cast).

    Returns:
        ids int64 (N, *index_shape), a source key per item (``.npy``: the zero-padded row index), and the manifest
        (empty for ``.npy``).

    Raises:
        ConfigError: a ``.npy`` that is not a plain integer array (pickled objects, floats, unreadable).
        ShardError: not a shard set, a damaged one, or ids outside the codebook.
    """
    path = Path(tokens)
    limit_ids = None if codebook_size is None else int(codebook_size)
    if path.is_dir():
        ds = open_shards(path, view=view, allow_incomplete=True)
        n = len(ds) if limit is None else min(limit, len(ds))
        ids = np.stack([ds[i][0].numpy() for i in range(n)]) if n else np.zeros((0,), np.int64)
        if limit_ids is not None:
            check_ids(ids, limit_ids, f"token ids in {path}")
        return ids, list(ds.keys[:n]), ds.manifest
    if path.suffix.lower() == ".npy" and path.is_file():
        arr = _load_npy(path)
        n = len(arr) if limit is None else min(limit, len(arr))
        head = np.asarray(arr[:n])
        if limit_ids is not None:
            check_ids(head, limit_ids, f"token ids in {path.name}")
        return head.astype(np.int64), [f"{i:06d}" for i in range(n)], {}
    if path.name == "manifest.json":
        return load_indices(path.parent, limit, view, codebook_size)
    read_manifest(path)  # raises the one-line "not a shard set" error
    raise ShardError(f"cannot read tokens from {path}")


def _load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` of integer ids, memory-mapped; never unpickled."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e) or "object" in str(e).lower():
            reason = "it holds Python objects (pickled), which tokkit never loads"
        else:
            reason = f"it is not a valid .npy ({e})"
        raise ConfigError(
            f"cannot read {path}: {reason}; save the ids with np.save(path, ids.astype(np.int64))"
        ) from None
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{path} holds {arr.dtype}; token ids must be integers (N, h, w)")
    if arr.ndim < 2:
        raise ConfigError(f"{path} holds an array of shape {arr.shape}; token ids are (N, h, w[, G])")
    return arr


def output_names(keys: list[str]) -> list[str]:
    """One distinct PNG file name per key, deterministic, in order (see the module docstring)."""
    natural = [_png_name(k) for k in keys]
    taken = {GRID} | {n.lower() for n in natural}
    used = {GRID}
    names = []
    for name in natural:
        if name.lower() in used:
            stem, k = name[: -len(".png")], 1
            while f"{stem}-{k}.png".lower() in taken:
                k += 1
            name = f"{stem}-{k}.png"
            taken.add(name.lower())
        used.add(name.lower())
        names.append(name)
    return names


def _png_name(key: str) -> str:
    flat = key.replace("\\", "/").strip("/").replace("/", "__") or "item"
    name = flat if flat.lower().endswith(".png") else f"{flat}.png"
    if len(name.encode()) > _MAX_NAME:  # deep paths: keep the start, make it unique with a hash of the key
        name = f"{flat[:120]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.png"
    return name


def _is_count(value: object, low: int) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= low  # type: ignore[call-overload]
    except TypeError:
        return False


def _check_options(out: Path, limit: int | None, view: int, batch_size: int) -> None:
    for flag, value, low in (("--limit", limit, 0), ("--view", view, 0), ("--batch-size", batch_size, 1)):
        if value is None and flag == "--limit":
            continue
        if not _is_count(value, low):
            raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder")


def decode_tokens(
    checkpoint: str | Path,
    tokens: str | Path,
    out: str | Path,
    *,
    limit: int | None = None,
    grid: bool = False,
    view: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> DecodeResult:
    """Decode token ids into PNG files ``out/<name>.png`` (and ``out/grid.png``).

    Args:
        checkpoint: the tokenizer checkpoint that produced the tokens.
        tokens: a shard set folder (from ``tokkit encode``) or a ``.npy`` of ids (N, h, w[, G]).
        out: output folder.
        limit: decode only the first ``limit`` items.
        grid: also write ``grid.png`` with every decoded image.
        view: which stored view to decode (shards with ``--views``).
        batch_size: ids per decoder pass.
        device: ``auto``, ``cpu``, ``cuda``...
        reporter: progress sink.

    Raises:
        ConfigError: an option out of range or an ``--out`` that is a file (before any heavy work); a ``.npy`` that
            is not a plain integer array.
        ShardError: tokens that do not fit the tokenizer (grid or codebook), an unreadable shard set, or an output
            that cannot be written (no space, read-only): files already written are complete.
    """
    from tokkit.models.tokenizer import load_with_meta
    from tokkit.runtime import resolve_device

    out = Path(out)
    _check_options(out, limit, view, batch_size)
    rep = resolve(reporter)
    dev = resolve_device(device)
    model, meta = load_with_meta(checkpoint, device=dev)  # verifies the weights' sha256 once
    ids, keys, manifest = load_indices(tokens, limit, view, codebook_size=model.codebook_size)
    expect = tuple(model.index_shape)
    if len(ids) and tuple(ids.shape[1:]) != expect:
        raise ShardError(f"tokens of shape {tuple(ids.shape[1:])} do not fit this tokenizer's {expect} grid")
    sha = manifest.get("tokenizer", {}).get("checkpoint_sha256")
    if sha and sha != meta["weights_sha256"]:
        rep.message("note: the shards were encoded with another checkpoint (weights sha256 differs)")
    names = output_names(keys)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for stale in temporaries_of(out, set(names + [GRID]).__contains__):  # left by kill -9: only our names
            stale.unlink()
    result = DecodeResult(out, 0)
    tiles = []
    rep.start("decode", len(ids))
    with torch.inference_mode():
        for a in range(0, len(ids), batch_size):
            batch = torch.from_numpy(ids[a : a + batch_size]).to(dev)
            images = to_uint8(model.decode(batch)).cpu().numpy()  # (B, H, W, 3)
            for k, img in enumerate(images):
                result.files.append(_save_png(img, out / names[a + k]))
            if grid:
                tiles.append(images)
            rep.advance(min(a + batch_size, len(ids)))
    rep.stop()
    result.count = len(result.files)
    if grid and tiles:
        result.grid = _save_png(make_grid(np.concatenate(tiles)), out / GRID)
    return result


def _save_png(image: np.ndarray, path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), fsync=False)  # a PNG that exists is complete
    return path


__all__ = ["DecodeResult", "decode_tokens", "load_indices", "make_grid", "output_names"]
