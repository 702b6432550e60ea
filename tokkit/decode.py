"""``decode_tokens``: token ids (a shard set or a ``.npy``) -> PNG images (and a grid), the library side of
``tokkit decode``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokkit.data.transforms import make_grid, to_uint8
from tokkit.errors import ConfigError, ShardError
from tokkit.progress import Reporter, resolve
from tokkit.shards import open_shards, read_manifest


@dataclass
class DecodeResult:
    """What ``decode_tokens`` wrote: ``files`` (one PNG per decoded item) and ``grid`` (or None)."""

    out: Path
    count: int
    files: list[Path] = field(default_factory=list)
    grid: Path | None = None


def load_indices(tokens: str | Path, limit: int | None = None, view: int = 0) -> tuple[np.ndarray, list[str], dict]:
    """Token ids from a shard set folder or a ``.npy`` file.

    Returns:
        ids int64 (N, *index_shape), a name per item, and the manifest (empty for ``.npy``).
    """
    path = Path(tokens)
    if path.is_dir():
        ds = open_shards(path, view=view, allow_incomplete=True)
        n = len(ds) if limit is None else min(limit, len(ds))
        ids = np.stack([ds[i][0].numpy() for i in range(n)]) if n else np.zeros((0,), np.int64)
        names = [_safe_name(k) for k in ds.keys[:n]]
        return ids, names, ds.manifest
    if path.suffix.lower() == ".npy" and path.is_file():
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"{path} holds {arr.dtype}; token ids must be integers (N, h, w)")
        n = len(arr) if limit is None else min(limit, len(arr))
        return np.array(arr[:n], dtype=np.int64), [f"{i:06d}" for i in range(n)], {}
    if path.name == "manifest.json":
        return load_indices(path.parent, limit, view)
    read_manifest(path)  # raises the one-line "not a shard set" error
    raise ShardError(f"cannot read tokens from {path}")


def _safe_name(key: str) -> str:
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return stem.replace("/", "__").replace("\\", "__")


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
        ShardError: tokens that do not fit the tokenizer (grid or codebook), or an unreadable shard set.
    """
    from tokkit.checkpoint import load_with_meta
    from tokkit.runtime import resolve_device

    rep = resolve(reporter)
    dev = resolve_device(device)
    model, meta = load_with_meta(checkpoint, device=dev)  # verifies the weights' sha256 once
    ids, names, manifest = load_indices(tokens, limit, view)
    expect = tuple(model.index_shape)
    if len(ids) and tuple(ids.shape[1:]) != expect:
        raise ShardError(f"tokens of shape {tuple(ids.shape[1:])} do not fit this tokenizer's {expect} grid")
    if len(ids) and (ids.min() < 0 or ids.max() >= model.codebook_size):
        raise ShardError(f"token ids outside [0, {model.codebook_size}): these tokens are from another tokenizer")
    sha = manifest.get("tokenizer", {}).get("checkpoint_sha256")
    if sha and sha != meta["weights_sha256"]:
        rep.message("note: the shards were encoded with another checkpoint (weights sha256 differs)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DecodeResult(out, len(ids))
    tiles = []
    rep.start("decode", len(ids))
    with torch.inference_mode():
        for a in range(0, len(ids), batch_size):
            batch = torch.from_numpy(ids[a : a + batch_size]).to(dev)
            images = to_uint8(model.decode(batch)).cpu().numpy()  # (B, H, W, 3)
            for k, img in enumerate(images):
                f = out / f"{names[a + k]}.png"
                Image.fromarray(img).save(f)
                result.files.append(f)
            if grid:
                tiles.append(images)
            rep.advance(min(a + batch_size, len(ids)))
    rep.stop()
    if grid and tiles:
        result.grid = out / "grid.png"
        Image.fromarray(make_grid(np.concatenate(tiles))).save(result.grid)
    return result


__all__ = ["DecodeResult", "decode_tokens", "load_indices", "make_grid"]
