"""Image arrays (``.npy`` / ``.npz``): which layouts are read, how labels become class ids, reading ``.npz`` safely.

Layouts: ``(N, H, W, 3)`` RGB, ``(N, H, W, 1)`` or ``(N, H, W)`` grayscale, uint8. An ambiguous or foreign layout is
refused in one line that says how to save it, never guessed: ``(H, W, 3)`` could be one image or H grayscale images
of W x 3 pixels; ``(N, 3, H, W)`` is channel-first; ``(N, H, W, 4)`` has alpha.

Labels: integers (``-1`` = unlabeled), integral floats, or strings. String labels become class ids by their position
in ``class_names`` when the file has one, else by sorted order of the distinct strings; either way the map is the
source's ``class_to_idx`` (recorded in the shard manifest).

A ``.npz`` is a zip whose arrays numpy inflates in full, so each array's size is read from its ``.npy`` header first
and an array over the byte cap is refused before a byte of it is inflated (a ``.npy`` is memory-mapped instead).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from tokkit.data.images import MAX_PIXELS
from tokkit.data.inputs import MAX_INPUT_BYTES_ENV
from tokkit.errors import DataError

_INT32 = np.iinfo(np.int32)


def check_layout(root: str, images: np.ndarray, limit: int) -> None:
    """Refuse anything but uint8 (N, H, W, 3) / (N, H, W, 1) / (N, H, W), in one line that says what to do."""
    shape = tuple(int(s) for s in images.shape)
    if images.dtype != np.uint8:
        raise DataError(
            f"{root}: expected a uint8 array (N, H, W, 3), got {images.dtype} {shape}; "
            "convert with (x * 255).round().astype('uint8')"
        )
    nd = len(shape)
    if nd == 2:
        raise DataError(f"{root}: {shape} is one grayscale image; save images as (N, H, W) or (N, H, W, 3): x[None]")
    if nd == 3 and shape[-1] in (1, 3, 4):
        h, w, c = shape
        raise DataError(
            f"{root}: {shape} is ambiguous (one {h}x{w} image with {c} channels, or {h} grayscale images of {w}x{c} "
            "pixels); save images as (N, H, W, 3) (one image: x[None]), grayscale as (N, H, W, 1)"
        )
    if nd == 4 and shape[-1] not in (1, 3):
        if shape[1] in (1, 3):
            raise DataError(f"{root}: {shape} looks channel-first (N, C, H, W); save x.transpose(0, 2, 3, 1)")
        if shape[-1] == 4:
            raise DataError(f"{root}: {shape} has an alpha channel; save the RGB part x[..., :3] (or composite it)")
        raise DataError(f"{root}: expected (N, H, W, 3) or (N, H, W, 1) images, got {shape}")
    if nd not in (3, 4):
        raise DataError(f"{root}: expected a uint8 array (N, H, W, 3), got {nd} dimensions {shape}")
    if shape[0] == 0:
        raise DataError(f"{root}: the image array is empty")
    h, w = shape[1], shape[2]
    if h * w > MAX_PIXELS:
        raise DataError(f"{root}: images of {w}x{h} = {w * h} pixels exceed the decompression-bomb limit {MAX_PIXELS}")
    per_image = int(np.prod(shape[1:])) * images.itemsize
    if per_image > limit:
        raise DataError(
            f"{root}: one image is {per_image} bytes > the input limit {limit}; raise it with {MAX_INPUT_BYTES_ENV}"
        )


def labels_to_ids(
    root: str, labels: np.ndarray | list, n: int, class_names: list[str] | None = None
) -> tuple[list[int], dict[str, int]]:
    """Labels -> (class ids with -1 for unlabeled, class name -> id).

    Integer (or integral float) labels are ids already; their names are ``class_names`` when given, else the ids as
    strings. String labels map through ``class_names`` when given, else through their sorted distinct values.

    Raises:
        DataError: a count that differs from ``n``, fractional or out-of-range numbers, unknown names, other dtypes.
    """
    arr = np.asarray(labels)
    if arr.dtype == object:  # e.g. a Python list of mixed values handed to ArraySource directly
        kinds = {type(v) for v in arr.reshape(-1).tolist()}
        if kinds <= {str}:
            arr = arr.astype(str)
        elif kinds <= {int, bool}:
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{root}: labels hold {sorted(k.__name__ for k in kinds)}; give integers or strings")
    arr = arr.reshape(-1)
    if len(arr) != n:
        raise DataError(f"{root}: {len(arr)} labels for {n} images")
    if arr.dtype.kind in "US":
        names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.tolist()]
        if class_names is not None:
            class_to_idx = {str(c): i for i, c in enumerate(class_names)}
            unknown = sorted(set(names) - set(class_to_idx))
            if unknown:
                raise DataError(f"{root}: labels {unknown[:3]} are not in class_names; fix the labels or class_names")
        else:
            class_to_idx = {c: i for i, c in enumerate(sorted(set(names)))}
        return [class_to_idx[v] for v in names], class_to_idx
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise DataError(f"{root}: labels are fractional floats ({arr.dtype}); give integer class ids or names")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise DataError(f"{root}: labels of dtype {arr.dtype} are not read; give integer class ids or strings")
    ids = arr.astype(np.int64)
    if len(ids) and (ids.min() < -1 or ids.max() > _INT32.max):
        lo, hi = int(ids.min()), int(ids.max())
        raise DataError(f"{root}: labels must be class ids in [0, 2^31) or -1 for unlabeled, got {lo}..{hi}")
    lab = [int(v) for v in ids]
    if class_names is not None:
        return lab, {str(c): i for i, c in enumerate(class_names)}
    return lab, {str(v): v for v in sorted(set(lab)) if v >= 0}


def load_npz(path: Path, key: str | None, limit: int) -> tuple[str, np.ndarray, np.ndarray | None, list[str] | None]:
    """``(root, images, labels or None, class_names or None)`` from a ``.npz``, every array checked against ``limit``.

    The images are ``key``, else the first of ``images``/``x``/``data``/``arr_0``, else the only uint8 4-D array;
    labels are ``<prefix>labels`` (for ``<prefix>images``), ``labels`` or ``y``; class names are ``class_names``.
    """
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"cannot read {path} as .npz: it holds one array; name it .npy")
    with z:
        names = list(z.files)
        headers = {k: _header(z, k) for k in names}  # name -> (shape, dtype), or None if not a readable .npy
        if key is None:
            preferred = [k for k in ("images", "x", "data", "arr_0") if k in names]
            if preferred:
                key = preferred[0]
            else:
                cands = [k for k, h in headers.items() if h and h[1] == np.uint8 and len(h[0]) == 4]
                if len(cands) != 1:
                    example = (cands or names or ["images"])[0]
                    msg = f"{path} holds arrays {names}: name the images as FILE.npz:KEY (e.g. {path}:{example})"
                    raise DataError(msg)
                key = cands[0]
        if key not in names:
            raise DataError(f"{path} has no array {key!r}; it holds {names}")
        stem = key[: -len("images")] if key.endswith("images") else ""
        label_key = next((k for k in (f"{stem}labels", "labels", "y") if k in names and k != key), None)
        images = _member(z, path, key, headers[key], limit)
        labels = _member(z, path, label_key, headers[label_key], limit) if label_key else None
        class_names = None
        if "class_names" in names:
            class_names = [str(c) for c in _member(z, path, "class_names", headers["class_names"], limit).tolist()]
    return f"{path}:{key}", images, labels, class_names


def _header(z: np.lib.npyio.NpzFile, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and dtype an ``.npz`` member declares, read from its ``.npy`` header without inflating the data."""
    member = name + ".npy" if name + ".npy" in z.zip.namelist() else name
    try:
        with z.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError):
        return None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _member(z, path: Path, name: str, header: tuple | None, limit: int) -> np.ndarray:
    """One array of an ``.npz``, refused (one line) when it holds objects or inflates past ``limit`` bytes."""
    if header is None:
        raise DataError(f"{path}:{name} is not a readable .npy array (unknown header); save it with np.savez")
    shape, dtype = header
    if dtype.hasobject:
        raise DataError(
            f"{path}:{name} holds Python objects, which are not loaded (pickle); save strings as np.array(x, dtype=str)"
        )
    size = math.prod(shape) * dtype.itemsize
    if size > limit:
        raise DataError(
            f"{path}:{name} inflates to {size} bytes > the input limit {limit}: save it as .npy (memory-mapped, "
            f"never inflated) or raise {MAX_INPUT_BYTES_ENV}"
        )
    try:
        return z[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
        raise DataError(f"cannot read {path}:{name}: {e}") from None
