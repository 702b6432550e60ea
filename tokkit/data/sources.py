"""Image sources: one indexable view over a folder, a zip, a text list, a uint8 array or the built-in sample set.

A source lists its inputs up front (sorted keys, labels, class map) and reads one image on demand. Reading never
happens at construction, so opening a source of a million files costs a directory walk (or a zip's central
directory), and a source can be handed to DataLoader worker processes: a zip source reopens its file handle in each
process (after fork or spawn), and an array source memory-maps ``.npy`` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from tokkit.data.images import BadImage, array_to_image, decode_image
from tokkit.data.sample import sample_arrays, sample_digest
from tokkit.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
)


class ImageSource:
    """A sorted, labelled list of images that can be read one at a time.

    Attributes:
        keys: sorted relative paths (or zero-padded indices for arrays); ``keys[i]`` names input ``i``.
        labels: class index per input, -1 when unlabeled.
        class_to_idx: class name -> label.
        root: where the inputs come from (folder, file, or ``sample``).
        kind: ``folder``, ``zip``, ``list``, ``array`` or ``sample``.
    """

    kind = "base"

    def __init__(self, root: str, keys: list[str], labels: list[int], class_to_idx: dict[str, int]) -> None:
        self.root = root
        self.keys = keys
        self.labels = labels
        self.class_to_idx = class_to_idx

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, n={len(self)}, classes={len(self.class_to_idx)})"

    def read(self, i: int) -> Image.Image:
        """Input ``i`` as an upright 8-bit RGB image; ``BadImage`` (with the reason) when it cannot be read."""
        raise NotImplementedError

    def _fingerprint_items(self) -> list:
        return [[k, lab] for k, lab in zip(self.keys, self.labels, strict=True)]

    def fingerprint(self) -> str:
        """sha256 of the sorted input list (keys, labels and cheap per-file facts such as size); not of the root."""
        payload = json.dumps([self.kind, self._fingerprint_items()], separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


def _labels_from_paths(rel_paths: list[str]) -> tuple[list[int], dict[str, int]]:
    """Class subfolders -> labels (first path component, sorted names), only when every image is in one."""
    parts = [PurePosixPath(p).parts for p in rel_paths]
    if not parts or any(len(p) < 2 for p in parts):
        return [-1] * len(rel_paths), {}
    classes = sorted({p[0] for p in parts})
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return [class_to_idx[p[0]] for p in parts], class_to_idx


def _common_dir(names: list[str]) -> str:
    """The longest folder prefix (ending in '/') shared by every name, or ''."""
    if not names:
        return ""
    split = [n.split("/")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*split, strict=False):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return "/".join(common) + "/" if common else ""


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


class FolderSource(ImageSource):
    """Every image file under a folder, recursively; class subfolders -> labels."""

    kind = "folder"

    def __init__(self, folder: Path) -> None:
        folder = folder.resolve()
        rel: list[str] = []
        sizes: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for f in filenames:
                if _is_image_name(f):
                    full = os.path.join(dirpath, f)
                    key = Path(full).relative_to(folder).as_posix()
                    rel.append(key)
                    try:
                        sizes[key] = os.path.getsize(full)
                    except OSError:
                        sizes[key] = -1
        if not rel:
            raise DataError(f"no images found under {folder}: expected .jpg/.png/... files (class subfolders optional)")
        rel.sort()
        labels, class_to_idx = _labels_from_paths(rel)
        super().__init__(str(folder), rel, labels, class_to_idx)
        self._sizes = sizes

    def read(self, i: int) -> Image.Image:
        key = self.keys[i]
        try:
            data = Path(self.root, key).read_bytes()
        except OSError as e:
            raise BadImage(key, f"cannot read file: {e.strerror or e}") from None
        return decode_image(data, key)

    def _fingerprint_items(self) -> list:
        return [[k, lab, self._sizes.get(k, -1)] for k, lab in zip(self.keys, self.labels, strict=True)]


class ZipSource(ImageSource):
    """Images inside a .zip, read lazily; class subfolders (below the shared top folder) -> labels.

    One ``ZipFile`` handle per process: it is opened on first read and reopened when the process id changes
    (DataLoader workers after fork), and it is never pickled (workers started with spawn).
    """

    kind = "zip"

    def __init__(self, path: Path) -> None:
        path = path.resolve()
        try:
            with zipfile.ZipFile(path) as zf:
                infos = [zi for zi in zf.infolist() if not zi.is_dir() and _is_image_name(zi.filename)]
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"cannot open zip {path}: {e}; check the file is a complete .zip") from None
        infos = [zi for zi in infos if "__MACOSX/" not in zi.filename]
        if not infos:
            raise DataError(f"no images found in {path}: expected .jpg/.png/... members")
        infos.sort(key=lambda zi: zi.filename)
        names = [zi.filename for zi in infos]
        prefix = _common_dir(names)
        labels, class_to_idx = _labels_from_paths([n[len(prefix) :] for n in names])
        super().__init__(str(path), names, labels, class_to_idx)
        self._facts = {zi.filename: (zi.file_size, zi.CRC) for zi in infos}
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zf"], state["_pid"] = None, -1
        return state

    def _handle(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():
            self._zf = zipfile.ZipFile(self.root)  # the parent's handle shares a file offset: never reuse it
            self._pid = os.getpid()
        return self._zf

    def read(self, i: int) -> Image.Image:
        key = self.keys[i]
        try:
            data = self._handle().read(key)
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError, ValueError) as e:
            raise BadImage(key, f"cannot read zip member: {e}") from None
        return decode_image(data, key)

    def _fingerprint_items(self) -> list:
        return [[k, lab, *self._facts[k]] for k, lab in zip(self.keys, self.labels, strict=True)]


class ListSource(ImageSource):
    """Images named in a text file, one path per line (relative paths are relative to the list's folder).

    Blank lines and lines starting with ``#`` are ignored; inputs are sorted. A listed file that is missing is
    reported as a bad input when read, like any other unreadable file.
    """

    kind = "list"

    def __init__(self, path: Path) -> None:
        path = path.resolve()
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        entries = sorted({ln for ln in lines if ln and not ln.startswith("#")})
        if not entries:
            raise DataError(f"{path} lists no image paths: write one path per line")
        super().__init__(str(path), entries, [-1] * len(entries), {})
        self._base = path.parent

    def read(self, i: int) -> Image.Image:
        key = self.keys[i]
        p = Path(key) if os.path.isabs(key) else self._base / key
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BadImage(key, f"cannot read file: {e.strerror or e}") from None
        return decode_image(data, key)


class ArraySource(ImageSource):
    """A uint8 array of images (N, H, W, 3) (or grayscale (N, H, W)); keys are zero-padded indices."""

    kind = "array"

    def __init__(
        self, root: str, images: np.ndarray, labels: np.ndarray | None = None, class_names: list[str] | None = None
    ) -> None:
        bad_channels = images.ndim == 4 and images.shape[-1] not in (1, 3)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or bad_channels:
            raise DataError(
                f"{root}: expected a uint8 array (N, H, W, 3), got {images.dtype} {tuple(images.shape)}; "
                "convert with (x * 255).round().astype('uint8')"
            )
        n = len(images)
        if n == 0:
            raise DataError(f"{root}: the image array is empty")
        width = max(6, len(str(n - 1)))
        keys = [f"{i:0{width}d}" for i in range(n)]
        if labels is None:
            lab = [-1] * n
            class_to_idx: dict[str, int] = {}
        else:
            labels = np.asarray(labels).reshape(-1)
            if len(labels) != n:
                raise DataError(f"{root}: {len(labels)} labels for {n} images")
            lab = [int(v) for v in labels]
            if class_names is not None:
                class_to_idx = {str(c): i for i, c in enumerate(class_names)}
            else:
                class_to_idx = {str(v): v for v in sorted(set(lab)) if v >= 0}
        super().__init__(root, keys, lab, class_to_idx)
        self.images = images

    def read(self, i: int) -> Image.Image:
        return array_to_image(np.asarray(self.images[i]))

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(str(tuple(self.images.shape)).encode())
        for start in range(0, len(self.images), 4096):  # content, in slices (memory-mapped arrays stay lazy)
            h.update(np.ascontiguousarray(self.images[start : start + 4096]).tobytes())
        return h.hexdigest()


class SampleSource(ArraySource):
    """The built-in ``sample`` set (see ``tokkit.data.sample``)."""

    kind = "sample"

    def __init__(self) -> None:
        images, labels, names = sample_arrays()
        super().__init__("sample", images, labels, names)
        self._digest = sample_digest(images)
        counts: dict[int, int] = {}
        for i, lab in enumerate(self.labels):  # keys read "astronaut/000", "astronaut/001", ...
            self.keys[i] = f"{names[lab]}/{counts.setdefault(lab, 0):03d}"
            counts[lab] += 1

    def fingerprint(self) -> str:
        payload = json.dumps([self.kind, self._digest, len(self)])
        return hashlib.sha256(payload.encode()).hexdigest()


def _open_npz(path: Path, key: str | None) -> ArraySource:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    with z:
        names = list(z.files)
        if key is None:
            preferred = [k for k in ("images", "x", "data", "arr_0") if k in names]
            if preferred:
                key = preferred[0]
            else:
                cands = [k for k in names if z[k].dtype == np.uint8 and z[k].ndim == 4]
                if len(cands) != 1:
                    example = (cands or names)[0]
                    msg = f"{path} holds arrays {names}: name the images as FILE.npz:KEY (e.g. {path}:{example})"
                    raise DataError(msg)
                key = cands[0]
        if key not in names:
            raise DataError(f"{path} has no array {key!r}; it holds {names}")
        images = z[key]
        stem = key[: -len("images")] if key.endswith("images") else ""
        label_key = next((k for k in (f"{stem}labels", "labels", "y") if k in names and k != key), None)
        labels = z[label_key] if label_key else None
        class_names = [str(c) for c in z["class_names"]] if "class_names" in names else None
    root = f"{path}:{key}"
    return ArraySource(root, images, labels, class_names)


def open_source(spec: str | Path) -> ImageSource:
    """Open an image source.

    Args:
        spec: an image folder (recursive; class subfolders -> labels), a ``.zip`` of images (class subfolders inside
            -> labels), a ``.txt`` list of image paths, a ``.npy``/``.npz`` uint8 array (N, H, W, 3) (``FILE.npz:KEY``
            picks an array; labels from ``labels``/``y``/``<prefix>_labels``), or ``sample`` (the built-in set).

    Returns:
        An ``ImageSource``.

    Raises:
        DataError: missing path, unknown kind, or no images.
    """
    text = str(spec)
    if text == "sample":
        return SampleSource()
    npz_key = None
    if ".npz:" in text and not Path(text).exists():
        text, npz_key = text.rsplit(":", 1)
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {path} (give an image folder, .zip, .txt list, .npy/.npz or 'sample')")
    if path.is_dir():
        return FolderSource(path)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return ZipSource(path)
    if suffix == ".txt":
        return ListSource(path)
    if suffix == ".npy":
        try:
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        return ArraySource(str(path.resolve()), images)
    if suffix == ".npz":
        return _open_npz(path.resolve(), npz_key)
    raise DataError(f"cannot read {path} as data: give an image folder, .zip, .txt list, .npy/.npz or 'sample'")
