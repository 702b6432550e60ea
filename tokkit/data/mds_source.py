"""MDS folders (mosaicml-streaming's ``MDSWriter`` layout) as an image source, read by a small reader of our own.

An MDS folder holds ``index.json`` (``{"version": 2, "shards": [...]}``) and the shard files it lists. A shard file is
``uint32 n``, ``n + 1`` uint32 sample offsets, a JSON header, then the samples; a sample is one uint32 size per
variable-size column, then each column's bytes in column order (``streaming.base.format.mds``). Reading needs no
``streaming`` import (it takes seconds); only a compressed shard (``zip_data`` and no raw file) is inflated with
``streaming.base.compression`` (then held in memory, one shard per process).

Planning: shards in ``index.json`` order, samples in shard order; keys read ``SHARD/ROW``. Labels are read up front
(a few bytes per sample: local files with ``pread``, remote ones (fsspec URLs) fetched once per shard). A shard file
that is missing or cut short is kept in the plan, its samples reported as bad inputs when read. Fingerprint: the
sha256 of ``index.json`` (which lists each shard's size and hashes) and each shard file's size and mtime (or, remote,
version), so a changed input is refused on resume.

Columns: the image column holds ``jpeg``, ``png`` or ``bytes`` (encoded image bytes), ``pil`` (raw pixels) or a
uint8 ``ndarray`` (H, W, 3); the label column an integer encoding (``int``, ``int8`` ... ``uint64``, ``str_int``) or
``str`` names (sorted -> ids). ``image_key`` None picks ``image``, else the one column with an image encoding;
``label_key`` None picks ``label`` when present (else unlabeled).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any

import numpy as np
from PIL import Image

from tokkit.data.images import BadImage, _first_line, _to_rgb, array_to_image, decode_image
from tokkit.data.inputs import read_regular_file, too_large
from tokkit.data.remote import filesystem, is_url, read_range, url_facts
from tokkit.data.sources import ImageSource, _stat_facts
from tokkit.errors import DataError

INDEX = "index.json"
IMAGE_ENCODINGS = ("jpeg", "png", "bytes", "pil", "ndarray")
_SCALARS = {f"{s}int{b}": np.dtype(f"{s}int{b}") for s in ("", "u") for b in (8, 16, 32, 64)}
LABEL_ENCODINGS = ("int", "str_int", "str", *_SCALARS)


def is_mds(path: str) -> bool:
    """Whether ``path`` (a local folder or a URL) holds an MDS ``index.json``."""
    if is_url(path):
        try:
            fs, p = filesystem(path)
            return fs.isfile(posixpath.join(p, INDEX))
        except (DataError, OSError, ValueError):
            return False
    return os.path.isfile(os.path.join(path, INDEX))


class _Shard:
    """One shard of the index: its columns, file and sample count."""

    def __init__(self, base: str, entry: dict[str, Any], where: str) -> None:
        if entry.get("format") != "mds":
            raise DataError(f"{where}: shard format {entry.get('format')!r}: only MDS shards are read (format 'mds')")
        try:
            self.names = [str(n) for n in entry["column_names"]]
            self.encodings = [str(e) for e in entry["column_encodings"]]
            self.sizes = [None if s is None else int(s) for s in entry["column_sizes"]]
            self.samples = int(entry["samples"])
            self.basename = str(entry["raw_data"]["basename"])
            zip_data = entry.get("zip_data") or {}
            self.zip_basename = zip_data.get("basename")
            self.compression = entry.get("compression")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: a shard entry lacks {e}: not an MDS index.json (version 2)") from None
        self.base = base

    def column(self, key: str) -> int:
        return self.names.index(key)


class MDSSource(ImageSource):
    """The samples of an MDS folder (local or an fsspec URL), indexed up front and read by seeking to one sample.

    Args:
        root: the folder holding ``index.json`` (or ``SPLIT/index.json`` with ``split``).
        split: a subfolder of ``root`` (streaming's ``split``).
        image_key: the image column (see the module docstring for the default).
        label_key: the label column; None = ``label`` when present.
        max_input_bytes: the most bytes read for one sample.
    """

    kind = "mds"

    def __init__(
        self,
        root: str,
        split: str | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
        max_input_bytes: int | str | None = None,
    ) -> None:
        remote = is_url(root)
        base = root.rstrip("/") if remote else os.path.abspath(os.path.expanduser(root))
        if split:
            base = posixpath.join(base, split) if remote else os.path.join(base, split)
        self._remote = remote
        self._base = base
        self._fds: dict[str, int] = {}
        self._inflated: tuple[str, bytes] | None = None  # (shard, its bytes): a compressed or a remote shard
        self._pid = os.getpid()
        where = f" (no split {split}?)" if split else ""
        raw_index = self._read_whole(INDEX, f"{base}: no {INDEX}: not an MDS folder{where}")
        try:
            index = json.loads(raw_index)
            entries = index["shards"]
            assert isinstance(entries, list) and int(index.get("version", 2)) == 2
        except (ValueError, KeyError, TypeError, AssertionError):
            raise DataError(f"{self._join(INDEX)} is not an MDS index (needs version 2 and a 'shards' list)") from None
        shards = [_Shard(base, e, self._join(INDEX)) for e in entries if isinstance(e, dict)]
        if not shards or sum(s.samples for s in shards) == 0:
            raise DataError(f"{self._join(INDEX)} lists no samples")
        image_key = image_key or _default_image_column(shards[0], self._join(INDEX))
        for s in shards:
            _check_columns(s, image_key, label_key, self._join(INDEX))
        label_key = label_key or ("label" if "label" in shards[0].names else None)

        keys: list[str] = []
        raw_labels: list[Any] = []
        facts: list[list] = []
        notes: dict[str, str] = {}
        width = max(6, len(str(max(s.samples for s in shards) - 1)))
        for s in shards:
            fact, problem = self._shard_facts(s)
            facts.append([s.basename, *fact])
            keys += [f"{s.basename}/{r:0{width}d}" for r in range(s.samples)]
            if problem:
                notes[s.basename] = problem
                raw_labels += [-1] * s.samples
                continue
            raw_labels += self._labels(s, label_key, notes) if label_key else [-1] * s.samples
        ids, class_to_idx = _label_ids(self._join(INDEX), raw_labels)
        super().__init__(root, keys, ids, class_to_idx, max_input_bytes)
        self.skipped = notes
        self.options = {k: v for k, v in (("image_key", image_key), ("label_key", label_key), ("split", split)) if v}
        self._shards = shards
        self._starts = np.cumsum([0] + [s.samples for s in shards])
        self._image_col = [s.column(image_key) for s in shards]
        self._index_sha = hashlib.sha256(raw_index).hexdigest()
        self._facts = facts

    # ------------------------------------------------------------------------------------------ bytes

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"], state["_inflated"], state["_pid"] = {}, None, -1
        return state

    def _join(self, name: str) -> str:
        return posixpath.join(self._base, name) if self._remote else os.path.join(self._base, name)

    def _read_whole(self, name: str, missing: str) -> bytes:
        path = self._join(name)
        try:
            if self._remote:
                fs, p = filesystem(path)
                return fs.cat_file(p)
            return read_regular_file(path, name, 2**31)
        except (FileNotFoundError, BadImage):
            raise DataError(missing) from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None

    def _shard_facts(self, s: _Shard) -> tuple[list, str | None]:
        """(facts that change with the file, why its samples cannot be read or None)."""
        for name in (s.basename, s.zip_basename):
            if not name:
                continue
            path = self._join(name)
            if self._remote:
                fs, p = filesystem(path)
                if fs.isfile(p):
                    return [name, *url_facts(fs, p)], None
            elif os.path.isfile(path):
                return [name, *_stat_facts(path)], None
        return ["missing"], f"shard file {s.basename} is missing: its {s.samples} samples read as bad inputs"

    def _range(self, s: _Shard, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a shard's uncompressed data."""
        if self._pid != os.getpid():  # after fork: the parent's descriptors are not ours
            self._fds, self._inflated, self._pid = {}, None, os.getpid()
        if self._inflated is not None and self._inflated[0] == s.basename:
            return self._inflated[1][offset : offset + size]
        raw = self._join(s.basename)
        if self._remote:
            fs, p = filesystem(raw)
            if fs.isfile(p) or not s.zip_basename:
                return read_range(fs, p, offset, size)
        elif os.path.isfile(raw) or not s.zip_basename:
            fd = self._fds.get(raw)
            if fd is None:
                fd = self._fds[raw] = os.open(raw, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            return os.pread(fd, size, offset)
        self._inflated = (s.basename, _inflate(s, self._read_whole(s.zip_basename, f"{s.zip_basename} missing")))
        return self._inflated[1][offset : offset + size]

    def _span(self, s: _Shard, row: int) -> tuple[int, int]:
        """(begin, end) of sample ``row`` in the shard file."""
        pair = self._range(s, 4 + 4 * row, 8)
        if len(pair) != 8:
            raise OSError(f"shard {s.basename} is cut short in its offset table")
        begin, end = (int(x) for x in np.frombuffer(pair, np.uint32))
        if end < begin:
            raise OSError(f"shard {s.basename}: sample {row} has a negative size")
        return begin, end

    def _column(self, s: _Shard, row: int, col: int, limit: int) -> bytes:
        """The bytes of column ``col`` of sample ``row`` (at most ``limit`` bytes, else BadImage-worthy OSError)."""
        begin, end = self._span(s, row)
        n_var = sum(size is None for size in s.sizes)
        head = self._range(s, begin, 4 * n_var)
        if len(head) != 4 * n_var:
            raise OSError(f"shard {s.basename} is cut short")
        var = iter(int(x) for x in np.frombuffer(head, np.uint32))
        sizes = [next(var) if size is None else size for size in s.sizes]
        offset = begin + 4 * n_var + sum(sizes[:col])
        if offset + sizes[col] > end:
            raise OSError(f"sample {row} of {s.basename}: column sizes exceed the sample")
        if sizes[col] > limit:
            raise _TooLarge(sizes[col])
        data = self._range(s, offset, sizes[col])
        if len(data) != sizes[col]:
            raise OSError(f"shard {s.basename} is cut short ({len(data)} of {sizes[col]} bytes)")
        return data

    def _labels(self, s: _Shard, label_key: str, notes: dict[str, str]) -> list[Any]:
        col, enc = s.column(label_key), s.encodings[s.column(label_key)]
        out: list[Any] = []
        if self._remote:  # one request for the whole shard, not two per sample
            self._inflated = (s.basename, self._remote_shard(s))
        for row in range(s.samples):
            try:
                out.append(_decode_label(enc, self._column(s, row, col, 2**16)))
            except (OSError, ValueError, _TooLarge) as e:
                notes[f"{s.basename}/{row}"] = f"label unreadable ({_first_line(e)}): read as unlabeled"
                out.append(-1)
        self._inflated = None
        return out

    def _remote_shard(self, s: _Shard) -> bytes:
        fs, p = filesystem(self._join(s.basename))
        if fs.isfile(p):
            return fs.cat_file(p)
        return _inflate(s, self._read_whole(s.zip_basename, f"{s.zip_basename} missing"))

    # ------------------------------------------------------------------------------------------ read

    def read(self, i: int) -> Image.Image:
        key = self.keys[i]
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        s, row = self._shards[k], i - int(self._starts[k])
        if s.basename in self.skipped:
            raise BadImage(key, self.skipped[s.basename])
        col = self._image_col[k]
        try:
            data = self._column(s, row, col, self.max_input_bytes)
        except _TooLarge as e:
            raise BadImage(key, too_large(e.size, self.max_input_bytes, "MDS sample column")) from None
        except (OSError, ValueError, DataError) as e:
            raise BadImage(key, f"cannot read MDS sample: {getattr(e, 'strerror', None) or _first_line(e)}") from None
        return _decode_image_column(s.encodings[col], data, key)

    def _fingerprint_items(self) -> list:
        return [self._index_sha, self._facts, [[k, lab] for k, lab in zip(self.keys, self.labels, strict=True)]]


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def _inflate(s: _Shard, data: bytes) -> bytes:
    try:
        from streaming.base.compression import decompress
    except ImportError:
        raise DataError(f"{s.zip_basename} is compressed: pip install mosaicml-streaming to read it") from None
    return decompress(str(s.compression), data)


def _default_image_column(s: _Shard, where: str) -> str:
    if "image" in s.names:
        return "image"
    images = [n for n, e in zip(s.names, s.encodings, strict=True) if e.split(":")[0] in ("jpeg", "png", "pil")]
    if len(images) == 1:
        return images[0]
    raise DataError(f"{where}: no column 'image' (columns: {', '.join(s.names)}); name it with --image-key")


def _check_columns(s: _Shard, image_key: str, label_key: str | None, where: str) -> None:
    if image_key not in s.names:
        raise DataError(f"{where}: no column {image_key!r} (columns: {', '.join(s.names)}); name it with --image-key")
    enc = s.encodings[s.column(image_key)].split(":")[0]
    if enc not in IMAGE_ENCODINGS:
        raise DataError(
            f"{where}: column {image_key!r} is {enc!r}, not an image ({', '.join(IMAGE_ENCODINGS)}); use --image-key"
        )
    if label_key is None:
        return
    if label_key not in s.names:
        raise DataError(f"{where}: no column {label_key!r} (columns: {', '.join(s.names)}); name it with --label-key")
    enc = s.encodings[s.column(label_key)]
    if enc not in LABEL_ENCODINGS:
        raise DataError(f"{where}: label column {label_key!r} is {enc!r}: use an integer or str column (--label-key)")


def _decode_label(enc: str, data: bytes) -> Any:
    if enc == "int":
        return int(np.frombuffer(data, np.int64)[0])
    if enc in _SCALARS:
        return int(np.frombuffer(data, _SCALARS[enc])[0])
    text = data.decode("utf-8")
    return int(text) if enc == "str_int" else text


def _label_ids(where: str, labels: list[Any]) -> tuple[list[int], dict[str, int]]:
    from tokkit.data.parquet_source import _parquet_labels  # integers or names -> ids, one rule for both

    return _parquet_labels(where, labels)


def _decode_image_column(enc: str, data: bytes, key: str) -> Image.Image:
    base = enc.split(":")[0]
    if base in ("jpeg", "png", "bytes"):
        return decode_image(data, key)
    try:
        if base == "pil":  # [width u32][height u32][mode size u32][mode][raw pixels]
            w, h, m = (int(x) for x in np.frombuffer(data[:12], np.uint32))
            return _to_rgb(Image.frombytes(data[12 : 12 + m].decode(), (w, h), data[12 + m :]))
        return array_to_image(_ndarray(enc, data))
    except BadImage:
        raise
    except (ValueError, TypeError, IndexError, OSError) as e:
        raise BadImage(key, f"cannot decode {base} column: {_first_line(e)}") from None


def _ndarray(enc: str, data: bytes) -> np.ndarray:
    """streaming's ``ndarray[:dtype[:shape]]`` encoding (dtype / shape in the header when not in the encoding)."""
    dtypes = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
              34: "float32", 64: "uint64", 65: "int64", 66: "float64"}  # fmt: skip
    parts = enc.split(":")
    i = 0
    dtype = parts[1] if len(parts) > 1 and parts[1] else None
    if dtype is None:
        dtype, i = dtypes[data[0]], 1
    if len(parts) > 2:
        shape = tuple(int(x) for x in parts[2].split(","))
    else:
        ndim, code = data[i] >> 2, data[i] % 4
        sdt = ("uint8", "uint16", "uint32", "uint64")[code]
        shape = tuple(int(x) for x in np.frombuffer(data[i + 1 : i + 1 + ndim * 2**code], sdt))
        i += 1 + ndim * 2**code
    if dtype != "uint8":
        raise ValueError(f"ndarray of {dtype}: only uint8 images are read")
    return np.frombuffer(data[i:], np.uint8).reshape(shape)
