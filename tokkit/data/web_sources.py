"""Sharded sources: webdataset ``.tar`` shards (local, or fsspec URLs) and Hugging Face style ``.parquet`` files.

Both are planned up front like every other source: the shard list is expanded (brace ranges such as
``data-{000000..000127}.tar``, alternatives ``{train,val}``, then globs) and sorted, every sample is indexed, and a
read seeks straight to one sample. Nothing is streamed, so encode's shard plan, resume and ``shard_id % world_size``
assignment hold as they do for a folder.

- **webdataset tars** (uncompressed ``.tar``, read with the stdlib ``tarfile``): members are grouped into samples by
  key (the member path up to the first dot of its base name); a sample's image is its member with an image extension
  (``jpg``, ``png``, ``webp`` ...), its label the integer in a ``cls`` / ``class`` / ``label`` member (else -1). A
  sample without an image is listed and reported as a bad input when read. Keys read ``TAR/SAMPLEKEY``.
  Fingerprint: each tar's size, mtime (ns) and member list (names, sizes).
- **parquet** (a file, a folder of ``*.parquet``, or a pattern): see ``tokkit.data.parquet_source``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokkit.data.arrays import labels_to_ids
from tokkit.data.images import BadImage, _first_line, decode_image
from tokkit.data.inputs import too_large
from tokkit.data.remote import expand_urls, filesystem, is_url, read_range, short_names, url_facts
from tokkit.data.sources import IMAGE_EXTENSIONS, ImageSource, _require_regular, _stat_facts
from tokkit.errors import DataError

MAX_BRACE_EXPANSION = 1_000_000
LABEL_EXTENSIONS = ("cls", "class", "label")
_IMAGE_EXTS = tuple(e[1:] for e in sorted(IMAGE_EXTENSIONS, key=lambda e: (e not in (".jpg", ".jpeg", ".png"), e)))
_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a-{00..02}.tar`` -> ``a-00.tar a-01.tar a-02.tar``; ``{x,y}`` -> alternatives.

    Ranges keep the zero padding of their bounds and may count down; groups may nest. A group that is neither a
    range nor holds a comma (``{x}``) stays as written.

    Raises:
        DataError: a pattern that expands to more than ``MAX_BRACE_EXPANSION`` names.
    """
    out: list[str] = []
    todo = [pattern]
    while todo:
        text = todo.pop()
        for m in _GROUP.finditer(text):
            body = m.group(1)
            rng = _RANGE.fullmatch(body)
            if rng:
                a, b = rng.group(1), rng.group(2)
                lo, hi = int(a), int(b)
                width = max(len(a), len(b)) if a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0") else 0
                step = 1 if hi >= lo else -1
                if abs(hi - lo) + 1 > MAX_BRACE_EXPANSION:
                    raise DataError(f"{pattern}: the range {{{body}}} names more than {MAX_BRACE_EXPANSION} shards")
                parts = [f"{v:0{width}d}" for v in range(lo, hi + step, step)]
            elif "," in body:
                parts = body.split(",")
            else:
                continue
            todo.extend(text[: m.start()] + p + text[m.end() :] for p in reversed(parts))
            break
        else:
            out.append(text)
        if len(out) + len(todo) > MAX_BRACE_EXPANSION:
            raise DataError(f"{pattern} expands to more than {MAX_BRACE_EXPANSION} names")
    return list(dict.fromkeys(out))


def is_pattern(text: str) -> bool:
    """Whether ``text`` holds brace groups or glob characters (and so names a shard list rather than one path)."""
    return bool(_GROUP.search(text)) or glob.has_magic(text)


def expand_shards(spec: str) -> list[str]:
    """The sorted, absolute paths a shard spec names: braces expanded first, then globs (``shards/*.tar``).

    Raises:
        DataError: a named shard that does not exist (a brace range with a gap), or a glob matching nothing.
    """
    paths: list[str] = []
    for name in expand_braces(os.path.expanduser(spec)):
        if glob.has_magic(name):
            hits = glob.glob(name)
            if not hits:
                raise DataError(f"no files match {name}" + (f" (from {spec})" if name != spec else ""))
            paths += hits
        elif os.path.exists(name):
            paths.append(name)
        else:
            raise DataError(f"data not found: {name}" + (f" (named by {spec})" if name != spec else ""))
    return sorted({os.path.abspath(p) for p in paths})


def _split_member(name: str) -> tuple[str, str] | None:
    """webdataset's rule: ``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``); None for a name without an extension."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext


def _pick_image(exts: dict[str, Any]) -> str | None:
    """The image member of a sample: an image extension in preference order, else a ``*.png``-style compound one."""
    for e in _IMAGE_EXTS:
        for ext in exts:
            if ext.lower() == e:
                return ext
    compound = sorted(x for x in exts if "." in x and x.rsplit(".", 1)[1].lower() in _IMAGE_EXTS)
    return compound[0] if compound else None


class _Handles:
    """Read-only file descriptors, opened on first use in each process and never pickled."""

    def __init__(self) -> None:
        self.pid = -1
        self.fds: dict[str, int] = {}

    def __getstate__(self) -> dict:
        return {"pid": -1, "fds": {}}

    def get(self, path: str) -> int:
        if self.pid != os.getpid():  # after fork: the parent's descriptors are not ours to reuse or close
            self.fds, self.pid = {}, os.getpid()
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def __del__(self) -> None:
        if self.pid == os.getpid():
            for fd in self.fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        chunks, got = [], 0
        while got < size:
            b = os.pread(fd, size - got, offset + got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)
    os.lseek(fd, offset, os.SEEK_SET)  # no pread (Windows): handles are per process, reads are not threaded
    return os.read(fd, size)


class TarSource(ImageSource):
    """Samples of webdataset ``.tar`` shards, indexed up front and read by seeking to one member.

    Args:
        paths: the tar files (sorted; see ``expand_shards``): local paths, or fsspec URLs (``s3://b/d-0.tar``; read
            with ranged requests, see ``tokkit.data.remote``).
        root: the spec they came from (recorded in the manifest).
        max_input_bytes: the most bytes read for one image member.
        image_key: the image member's extension (``jpg``, ``seg.png``); None = the first image extension found.
        label_key: the label member's extension (``cls``); None = ``cls``, ``class`` or ``label``.
    """

    kind = "webdataset"

    def __init__(
        self,
        paths: list[str],
        root: str,
        max_input_bytes: int | str | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
    ) -> None:
        if not paths:
            raise DataError(f"{root} names no .tar shards")
        remote = is_url(paths[0])
        names = short_names(paths)
        keys: list[str] = []
        labels: list[int] = []
        locs: list[tuple[int, int, int, str] | None] = []  # (tar index, data offset, size, member) of each image
        tar_facts: list[list] = []
        notes: dict[str, str] = {}
        label_exts = (label_key,) if label_key else LABEL_EXTENSIONS
        for t, (path, short) in enumerate(zip(paths, names, strict=True)):
            if remote:
                fs, fpath = filesystem(path)
                facts = url_facts(fs, fpath)
                opener = lambda fs=fs, fpath=fpath: fs.open(fpath, "rb")  # noqa: E731
            else:
                _require_regular(Path(path))
                facts = list(_stat_facts(path))
                opener = lambda path=path: open(path, "rb")  # noqa: E731
            samples, digest, stopped = self._index(path, opener)
            if stopped:
                notes[short] = stopped
            tar_facts.append([short, *facts, digest])
            with opener() as f:
                for skey in sorted(samples):
                    exts = samples[skey]
                    key = f"{short}/{skey}"
                    ext = _pick_image(exts) if image_key is None else (image_key if image_key in exts else None)
                    locs.append(None if ext is None else (t, exts[ext][0], exts[ext][1], f"{skey}.{ext}"))
                    labels.append(self._label(f, key, exts, notes, label_exts))
                    keys.append(key)
        if not keys:
            raise DataError(f"no samples found in {root}: expected webdataset .tar shards (KEY.jpg, KEY.cls ...)")
        ids, class_to_idx = labels_to_ids(root, np.asarray(labels, dtype=np.int64), len(labels))
        super().__init__(root, keys, ids, class_to_idx, max_input_bytes)
        self.paths = list(paths)
        self.skipped = notes
        self.options = {k: v for k, v in (("image_key", image_key), ("label_key", label_key)) if v}
        self._image_key = image_key
        self._remote = remote
        self._locs = locs
        self._tar_facts = tar_facts
        self._handles = _Handles()

    @staticmethod
    def _index(path: str, opener: Any) -> tuple[dict[str, dict[str, tuple[int, int]]], str, str | None]:
        """sample key -> {extension: (data offset, size)}, the sha256 of the member list (names, sizes), and why the
        listing stopped early (a tar cut short: the members before the cut are kept, the cut one reads as bad)."""
        h = hashlib.sha256()
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        stopped = None
        try:
            f = opener()
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read tar {path}: {_first_line(e)}") from None
        with f:
            try:
                tf = tarfile.open(fileobj=f, mode="r:")  # "r:": uncompressed only, so that members can be seeked to
            except (tarfile.TarError, OSError, EOFError) as e:
                hint = "compressed tars (.tar.gz) are not read: decompress them" if path.endswith("gz") else ""
                hint = hint or "check the file is a complete, uncompressed .tar"
                raise DataError(f"cannot read tar {path}: {_first_line(e)}; {hint}") from None
            with tf:
                while True:
                    try:
                        ti = tf.next()
                    except (tarfile.TarError, OSError, EOFError) as e:
                        stopped = f"tar listing stopped after {len(tf.members)} members: {_first_line(e)} (truncated?)"
                        break
                    if ti is None:
                        break
                    h.update(f"{ti.name}\0{ti.size}\0{ti.type!r}\n".encode())
                    if not ti.isreg() or ti.issparse():
                        continue
                    name = ti.name[2:] if ti.name.startswith("./") else ti.name  # ``tar cf x.tar .``: ./KEY.jpg
                    split = _split_member(name)
                    if split is not None:  # a name stored twice is one member: the last copy, as tar extracts it
                        samples.setdefault(split[0], {})[split[1]] = (ti.offset_data, ti.size)
        return samples, h.hexdigest(), stopped

    @staticmethod
    def _label(
        f, key: str, exts: dict[str, tuple[int, int]], bad: dict[str, str], label_exts: tuple[str, ...]
    ) -> int:
        for ext in label_exts:
            if ext in exts:
                offset, size = exts[ext]
                f.seek(offset)
                text = f.read(min(size, 64)).decode("ascii", "replace").strip()
                try:
                    value = int(text)
                except ValueError:
                    bad[key] = f"label member .{ext} holds {text[:20]!r}, not an integer: read as unlabeled"
                    return -1
                if not -1 <= value < 2**31:
                    bad[key] = f"label member .{ext} holds {value}: read as unlabeled"
                    return -1
                return value
        return -1

    def _read_member(self, t: int, offset: int, size: int) -> bytes:
        if self._remote:
            fs, fpath = filesystem(self.paths[t])
            return read_range(fs, fpath, offset, size)
        return _pread(self._handles.get(self.paths[t]), size, offset)

    def read(self, i: int) -> Image.Image:
        key, loc = self.keys[i], self._locs[i]
        if loc is None:
            want = f"KEY.{self._image_key}" if self._image_key else "KEY.jpg, KEY.png, KEY.webp ..."
            raise BadImage(key, f"sample has no image member (expected {want})")
        t, offset, size, member = loc
        if size > self.max_input_bytes:
            raise BadImage(key, too_large(size, self.max_input_bytes, "tar member"))
        try:
            data = self._read_member(t, offset, size)
        except (OSError, ValueError, DataError) as e:
            raise BadImage(key, f"cannot read tar member {member}: {getattr(e, 'strerror', None) or e}") from None
        if len(data) != size:
            raise BadImage(key, f"tar member {member} is cut short ({len(data)} of {size} bytes): the tar is truncated")
        return decode_image(data, key)

    def _fingerprint_items(self) -> list:
        return [self._tar_facts, [[k, lab] for k, lab in zip(self.keys, self.labels, strict=True)]]


def open_sharded(
    text: str,
    image_key: str | None = None,
    label_key: str | None = None,
    max_input_bytes: int | str | None = None,
) -> ImageSource | None:
    """A ``TarSource`` or ``ParquetSource`` (``tokkit.data.parquet_source``) for ``text`` (a pattern, a ``.tar``, a
    ``.parquet``, or a folder holding ``*.parquet`` files; tars and parquet files also as fsspec URLs), or None when
    ``text`` names none of these (a folder of ``*.tar`` files and no images is opened by ``open_source`` through
    ``tar_folder``, once its walk finds no image).

    Raises:
        DataError: a pattern with missing shards, matching nothing, or mixing tars and parquet files; a URL that is
            not a tar; a missing fsspec backend (one line naming the package).
    """
    if is_url(text):
        urls = expand_urls(expand_braces(text))
        suffixes = {_suffix(u) for u in urls}
        if suffixes == {".parquet"}:
            return _parquet(urls, text, (image_key or "image", label_key or "label"), max_input_bytes)
        if suffixes != {".tar"}:
            kinds = sorted(suffixes)
            raise DataError(
                f"{text} names {len(urls)} objects of kinds {kinds}: URLs are read as .tar shards or .parquet files "
                "(one kind)"
            )
        return TarSource(urls, text, max_input_bytes, image_key, label_key)
    path = os.path.expanduser(text)
    pq_keys = (image_key or "image", label_key or "label")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
        if not files:
            return None
        return _parquet(files, os.path.abspath(path), pq_keys, max_input_bytes)
    if os.path.exists(path):
        paths = [os.path.abspath(path)]
    elif is_pattern(path):
        paths = expand_shards(path)
    else:
        return None
    suffixes = {_suffix(p) for p in paths}
    root = os.path.abspath(path)
    if suffixes == {".tar"}:
        return TarSource(paths, root, max_input_bytes, image_key, label_key)
    if suffixes == {".parquet"}:
        return _parquet(paths, root, pq_keys, max_input_bytes)
    if len(paths) > 1 or suffixes & {".tar", ".parquet", ".tar.gz", ".tgz"}:
        if suffixes & {".tar.gz", ".tgz"}:
            raise DataError(f"{text}: compressed tars are not read (no seeking): decompress them to .tar")
        raise DataError(f"{text} names {len(paths)} files of kinds {sorted(suffixes)}: give only .tar or .parquet")
    return None


def _parquet(paths: list[str], root: str, keys: tuple[str, str], max_input_bytes: int | str | None) -> ImageSource:
    from tokkit.data.parquet_source import ParquetSource  # pyarrow is imported only for parquet

    source = ParquetSource(paths, root, keys[0], keys[1], max_input_bytes)
    source.options = {k: v for k, v, d in (("image_key", keys[0], "image"), ("label_key", keys[1], "label")) if v != d}
    return source


def tar_folder(
    path: str | os.PathLike,
    max_input_bytes: int | str | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
) -> TarSource | None:
    """The ``*.tar`` files directly inside a folder (that holds no images) as a ``TarSource``, or None."""
    files = sorted(glob.glob(os.path.join(glob.escape(str(path)), "*.tar")))
    if not files:
        return None
    return TarSource([os.path.abspath(f) for f in files], os.path.abspath(path), max_input_bytes, image_key, label_key)


def _suffix(path: str) -> str:
    low = path.lower()
    for s in (".tar.gz", ".tgz"):
        if low.endswith(s):
            return s
    return os.path.splitext(low)[1]
