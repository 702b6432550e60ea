"""Image sources: one indexable view over a folder, a zip, a text list, a uint8 array, the built-in sample set, or
webdataset tars / parquet files (``tokkit.data.web_sources``).

A source lists its inputs up front (sorted keys, labels, class map) and reads one image on demand. Reading never
happens at construction, so opening a source of a million files costs a directory walk (or a zip's central
directory), and a source can be handed to DataLoader worker processes: a zip source reopens its file handle in each
process (after fork or spawn), and an array source memory-maps ``.npy`` files.

Every read is bounded (``tokkit.data.inputs``): regular files only, at most ``max_input_bytes`` bytes per input
(``$TOKKIT_MAX_INPUT_BYTES``, 256 MiB by default). A source's ``fingerprint`` changes whenever the bytes it would read
may have changed, so that a resume never mixes old tokens with new inputs: folders and lists record each file's size
and modification time (ns), zips each member's CRC-32 and size, arrays a hash of their bytes. The root is left out
(moving a dataset keeps its fingerprint); a copy that does not keep modification times (``cp`` without ``-p``) gets
a new one, which refuses a resume rather than risk a wrong one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from tokkit.data.arrays import check_layout, labels_to_ids, load_npz
from tokkit.data.images import BadImage, _first_line, array_to_image, decode_image
from tokkit.data.inputs import file_kind, read_bounded, read_regular_file, too_large, walk_files
from tokkit.data.inputs import max_input_bytes as resolve_max_input_bytes
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
        max_input_bytes: no input larger than this is read (see ``tokkit.data.inputs``).
        skipped: what was left out when listing (a second path to the same file, a link loop, an unreadable
            folder): name -> reason, for the caller to log.
        options: how the inputs are read, when the user chose it (``image_key``, ``label_key``, ``split``): part of
            the fingerprint, so that a resume with other options is refused.
    """

    kind = "base"

    def __init__(
        self,
        root: str,
        keys: list[str],
        labels: list[int],
        class_to_idx: dict[str, int],
        max_input_bytes: int | str | None = None,
    ) -> None:
        self.root = root
        self.keys = keys
        self.labels = labels
        self.class_to_idx = class_to_idx
        self.max_input_bytes = resolve_max_input_bytes(max_input_bytes)
        self.skipped: dict[str, str] = {}
        self.options: dict[str, str] = {}

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
        """sha256 of the sorted input list: keys, labels and per-input facts that change with the bytes, not the root.

        Folders and lists: each file's size and mtime (ns); zips: each member's CRC-32 and size; arrays: their bytes.
        """
        options = [self.options] if self.options else []  # none chosen: the fingerprint of earlier versions
        payload = json.dumps([self.kind, self._fingerprint_items(), *options], separators=(",", ":"))
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
    """Every image file under a folder, recursively; class subfolders -> labels.

    Links to folders are followed, but each folder is entered once and each file listed once (``walk_files``); a
    FIFO, socket or device named like an image is listed and reported as a bad input when read, never opened.
    """

    kind = "folder"

    def __init__(self, folder: Path, max_input_bytes: int | str | None = None) -> None:
        folder = folder.resolve()
        try:
            facts, skipped = walk_files(str(folder), _is_image_name)
        except OSError as e:
            raise DataError(f"cannot list {folder}: {e.strerror or e}") from None
        if not facts:
            raise DataError(f"no images found under {folder}: expected .jpg/.png/... files (class subfolders optional)")
        rel = sorted(facts)
        labels, class_to_idx = _labels_from_paths(rel)
        super().__init__(str(folder), rel, labels, class_to_idx, max_input_bytes)
        self._facts = facts
        self.skipped = skipped

    def read(self, i: int) -> Image.Image:
        key = self.keys[i]
        return decode_image(read_regular_file(os.path.join(self.root, key), key, self.max_input_bytes), key)

    def _fingerprint_items(self) -> list:
        return [[k, lab, *self._facts[k]] for k, lab in zip(self.keys, self.labels, strict=True)]


class ZipSource(ImageSource):
    """Images inside a .zip, read lazily; class subfolders (below the shared top folder) -> labels.

    One ``ZipFile`` handle per process: it is opened on first read and reopened when the process id changes
    (DataLoader workers after fork), and it is never pickled (workers started with spawn).
    """

    kind = "zip"

    def __init__(self, path: Path, max_input_bytes: int | str | None = None) -> None:
        path = path.resolve()
        try:
            with zipfile.ZipFile(path) as zf:
                infos = [zi for zi in zf.infolist() if not zi.is_dir() and _is_image_name(zi.filename)]
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"cannot open zip {path}: {e}; check the file is a complete .zip") from None
        infos = [zi for zi in infos if "__MACOSX/" not in zi.filename]
        if not infos:
            raise DataError(f"no images found in {path}: expected .jpg/.png/... members")
        by_name = {zi.filename: zi for zi in infos}  # a name stored twice is one input: the last copy (what reads get)
        names = sorted(by_name)
        infos = [by_name[n] for n in names]
        prefix = _common_dir(names)
        labels, class_to_idx = _labels_from_paths([n[len(prefix) :] for n in names])
        super().__init__(str(path), names, labels, class_to_idx, max_input_bytes)
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
        key, limit = self.keys[i], self.max_input_bytes
        try:
            zi = self._handle().getinfo(key)
            if zi.file_size > limit or zi.compress_size > limit:
                raise BadImage(key, too_large(max(zi.file_size, zi.compress_size), limit, "zip member"))
            with self._handle().open(zi) as f:  # inflated through a bounded reader: the sizes above may lie
                data = read_bounded(f, key, limit, "zip member")
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError, ValueError, zlib.error) as e:
            raise BadImage(key, f"cannot read zip member: {_first_line(e)}") from None
        return decode_image(data, key)

    def _fingerprint_items(self) -> list:
        return [[k, lab, *self._facts[k]] for k, lab in zip(self.keys, self.labels, strict=True)]


class ListSource(ImageSource):
    """Images named in a text file, one path per line (relative paths are relative to the list's folder).

    Blank lines and lines starting with ``#`` are ignored; inputs are sorted, and two lines naming the same path
    (``a.png``, ``./a.png``) are one input. A listed file that is missing (or not a regular file) is reported as a bad
    input when read, like any other unreadable file.
    """

    kind = "list"

    def __init__(self, path: Path, max_input_bytes: int | str | None = None) -> None:
        path = path.resolve()
        _require_regular(path)
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        self._base = path.parent
        first: dict[str, str] = {}  # normalized path -> the first (sorted) line naming it
        skipped: dict[str, str] = {}
        for entry in sorted({ln for ln in lines if ln and not ln.startswith("#")}):
            norm = os.path.normpath(self._path(entry))
            if norm in first:
                skipped[entry] = f"the same file as {first[norm]}"
            else:
                first[norm] = entry
        entries = sorted(first.values())
        if not entries:
            raise DataError(f"{path} lists no image paths: write one path per line")
        super().__init__(str(path), entries, [-1] * len(entries), {}, max_input_bytes)
        self.skipped = skipped
        self._facts = [_stat_facts(self._path(e)) for e in entries]

    def _path(self, key: str) -> str:
        return key if os.path.isabs(key) else os.path.join(self._base, key)

    def read(self, i: int) -> Image.Image:
        key = self.keys[i]
        return decode_image(read_regular_file(self._path(key), key, self.max_input_bytes), key)

    def _fingerprint_items(self) -> list:
        return [[k, lab, *f] for k, lab, f in zip(self.keys, self.labels, self._facts, strict=True)]


def _stat_facts(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file, (-1, -1) when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _require_regular(path: Path) -> None:
    """A data file must be a regular file: a FIFO would block, a device (``/dev/zero``) never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise DataError(f"{path} is a {file_kind(mode)}, not a regular file or folder: give a file or a folder")


class ArraySource(ImageSource):
    """A uint8 array of images (N, H, W, 3) (or grayscale (N, H, W) / (N, H, W, 1)); keys are zero-padded indices.

    Labels may be integers (-1 = unlabeled) or strings (see ``tokkit.data.arrays.labels_to_ids``). A layout that
    could be read two ways, such as (H, W, 3), is refused with the fix rather than guessed.
    """

    kind = "array"

    def __init__(
        self,
        root: str,
        images: np.ndarray,
        labels: np.ndarray | list | None = None,
        class_names: list[str] | None = None,
        max_input_bytes: int | str | None = None,
    ) -> None:
        limit = resolve_max_input_bytes(max_input_bytes)
        check_layout(root, images, limit)
        n = len(images)
        width = max(6, len(str(n - 1)))
        keys = [f"{i:0{width}d}" for i in range(n)]
        if labels is None:
            lab, class_to_idx = [-1] * n, {}
        else:
            lab, class_to_idx = labels_to_ids(root, labels, n, class_names)
        super().__init__(root, keys, lab, class_to_idx, limit)
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


_KINDS = (
    "an image folder, .zip, .txt list, .npy/.npz, webdataset .tar shards (local or a URL), .parquet files, an MDS "
    "folder, hf:ORG/NAME or 'sample'"
)
SOURCE_KINDS = ("auto", "hf", "mds")
# the kinds that read each option (any other kind refuses it rather than ignore it)
_KEYED = ("webdataset", "parquet", "mds", "hf")
_OPTION_KINDS = {"image_key": _KEYED, "label_key": _KEYED, "split": ("mds", "hf")}


def open_source(
    spec: str | Path,
    max_input_bytes: int | str | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    split: str | None = None,
    kind: str = "auto",
) -> ImageSource:
    """Open an image source.

    Args:
        spec: an image folder (recursive; class subfolders -> labels), a ``.zip`` of images (class subfolders inside
            -> labels), a ``.txt`` list of image paths, a ``.npy``/``.npz`` uint8 array (N, H, W, 3) (``FILE.npz:KEY``
            picks an array; labels from ``labels``/``y``/``<prefix>_labels``, integers or strings), webdataset
            ``.tar`` shards (one file, a glob ``shards/*.tar`` or a brace range ``data-{000000..000127}.tar``; also as
            an fsspec URL such as ``s3://bucket/data-{000000..000127}.tar``), ``.parquet`` files (one file, a folder
            holding ``*.parquet``, or a pattern), an MDS folder (holding ``index.json``, local or a URL), a Hugging
            Face dataset ``hf:ORG/NAME`` (or ``hf:FOLDER``), or ``sample`` (the built-in set). See
            ``tokkit.data.web_sources``, ``mds_source`` and ``hf_source``.
        max_input_bytes: the most bytes read for one input (a file, a zip member, an ``.npz`` array); default
            ``$TOKKIT_MAX_INPUT_BYTES`` or 256 MiB. A bigger input is a bad input (or, for an array, refused here).
        image_key: the image column (parquet, MDS, hf; default ``image``) or member extension (webdataset, e.g.
            ``jpg``; default the first image member).
        label_key: the label column (default ``label``) or member extension (webdataset; default ``cls``); absent ->
            unlabeled.
        split: hf: the split (default ``train``); MDS: a subfolder holding ``index.json``.
        kind: ``auto`` (from the spec), ``hf`` (``spec`` is a dataset name or folder for ``datasets``) or ``mds``.

    Returns:
        An ``ImageSource``.

    Raises:
        DataError: missing path, unknown kind, no images, a FIFO or device, an array in an ambiguous layout, or an
            option the kind does not read.
    """
    text = str(spec)
    if kind not in SOURCE_KINDS:
        raise DataError(f"unknown source kind {kind!r}: use one of {', '.join(SOURCE_KINDS)}")
    chosen = {k: v for k, v in (("image_key", image_key), ("label_key", label_key), ("split", split)) if v}
    source = _open(text, max_input_bytes, image_key, label_key, split, kind)
    unread = [k for k in chosen if source.kind not in _OPTION_KINDS[k]]
    if unread:
        flags = ", ".join("--" + k.replace("_", "-") for k in unread)
        kinds = ", ".join(sorted({x for k in unread for x in _OPTION_KINDS[k]}))
        hint = "; for a Hugging Face data folder pass --source-kind hf" if source.kind == "parquet" else ""
        raise DataError(f"{flags} does not apply to {source.kind} data ({text}): only to {kinds}{hint}")
    return source


def _open(
    text: str, max_input_bytes: int | str | None, image_key: str | None, label_key: str | None, split: str | None,
    kind: str,
) -> ImageSource:  # fmt: skip
    if kind == "hf" or text.startswith("hf:") and not Path(text).exists():
        from tokkit.data.hf_source import PREFIX, HFSource

        name = text[len(PREFIX) :] if text.startswith(PREFIX) else text
        return HFSource(name, split, image_key, label_key, max_input_bytes)
    from tokkit.data.mds_source import MDSSource, is_mds

    if kind == "mds" or is_mds(os.path.expanduser(text)) or split and is_mds(os.path.join(text, split)):
        return MDSSource(text, split, image_key, label_key, max_input_bytes)
    if text == "sample":
        return SampleSource()
    npz_key = None
    if ".npz:" in text and not Path(text).exists():
        text, npz_key = text.rsplit(":", 1)
    else:
        from tokkit.data.web_sources import open_sharded

        sharded = open_sharded(text, image_key, label_key, max_input_bytes)
        if sharded is not None:
            return sharded
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {path} (give {_KINDS})")
    _require_regular(path)
    if path.is_dir():
        try:
            return FolderSource(path, max_input_bytes)
        except DataError:
            from tokkit.data.web_sources import tar_folder

            tars = tar_folder(path, max_input_bytes, image_key, label_key)  # a folder holding only webdataset shards
            if tars is None:
                raise
            return tars
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return ZipSource(path, max_input_bytes)
    if suffix == ".txt":
        return ListSource(path, max_input_bytes)
    if suffix == ".npy":
        try:
            images = np.load(path, mmap_mode="r", allow_pickle=False)  # memory-mapped: never read whole
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"cannot read {path}: {_first_line(e)}") from None
        return ArraySource(str(path.resolve()), images, max_input_bytes=max_input_bytes)
    if suffix == ".npz":
        limit = resolve_max_input_bytes(max_input_bytes)
        root, images, labels, class_names = load_npz(path.resolve(), npz_key, limit)
        return ArraySource(root, images, labels, class_names, limit)
    raise DataError(f"cannot read {path} as data: give {_KINDS}")
