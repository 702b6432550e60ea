"""Hugging Face style ``.parquet`` files as an image source (pyarrow is imported only here, and only when used).

Given a file, a folder of ``*.parquet`` or a pattern (sorted; see ``tokkit.data.web_sources.open_sharded``), the
image column holds encoded bytes, either plain binary or the ``datasets`` struct ``{"bytes": ..., "path": ...}``; the
label column holds integers or names (absent -> -1). Keys read ``FILE/ROW``. A read loads one row group's image column
(two kept per process, reopened after fork, never pickled). Fingerprint: each file's size, mtime (ns) and row count,
and the image column's name.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokkit.data.arrays import labels_to_ids
from tokkit.data.images import BadImage, _first_line, decode_image
from tokkit.data.inputs import too_large
from tokkit.data.remote import filesystem, is_url, short_names, url_facts
from tokkit.data.sources import ImageSource, _require_regular, _stat_facts
from tokkit.errors import DataError


class ParquetSource(ImageSource):
    """Rows of ``.parquet`` files (Hugging Face ``datasets`` layout): an image column and an optional label column.

    Args:
        paths: the parquet files (sorted).
        root: the spec they came from.
        image_key: the image column: binary, or a struct with a ``bytes`` field.
        label_key: the label column (integers or names); absent -> unlabeled.
        max_input_bytes: the most bytes read for one image.
    """

    kind = "parquet"

    def __init__(
        self,
        paths: list[str],
        root: str,
        image_key: str = "image",
        label_key: str = "label",
        max_input_bytes: int | str | None = None,
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not paths:
            raise DataError(f"{root} names no .parquet files")
        remote = is_url(paths[0])
        names = short_names(paths)
        keys: list[str] = []
        labels: list[Any] = []
        groups: list[list[int]] = []  # per file: the first row of each row group, then the row count
        facts: list[list] = []
        for path, short in zip(paths, names, strict=True):
            if not remote:
                _require_regular(Path(path))
            try:
                pf = pq.ParquetFile(_open(path))
                schema = pf.schema_arrow
                if image_key not in schema.names:
                    raise DataError(
                        f"{path} has no column {image_key!r} (columns: {', '.join(schema.names)}); "
                        "name the image column with image_key (--image-key)"
                    )
                _check_image_type(path, image_key, schema.field(image_key).type, pa)
                meta = pf.metadata
                starts = [0]
                for g in range(meta.num_row_groups):
                    starts.append(starts[-1] + meta.row_group(g).num_rows)
                n = starts[-1]
                if label_key and label_key in schema.names:
                    col = pf.read(columns=[label_key]).column(0)
                    labels += [-1 if v is None else v for v in col.to_pylist()]
                else:
                    labels += [-1] * n
            except DataError:
                raise
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"cannot read parquet {path}: {_first_line(e)}") from None
            width = max(6, len(str(n - 1)))
            keys += [f"{short}/{r:0{width}d}" for r in range(n)]
            groups.append(starts)
            facts.append([short, *(url_facts(*filesystem(path)) if remote else _stat_facts(path)), n])
        if not keys:
            raise DataError(f"no rows found in {root}")
        ids, class_to_idx = _parquet_labels(root, labels)
        super().__init__(root, keys, ids, class_to_idx, max_input_bytes)
        self.paths = list(paths)
        self.image_key = image_key
        self.label_key = label_key
        self._groups = groups
        self._file_start = list(np.cumsum([0] + [g[-1] for g in groups]))
        self._facts = facts
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._files: dict[int, Any] = {}
        self._pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"], state["_files"], state["_pid"] = OrderedDict(), {}, -1
        return state

    def _column(self, f: int, g: int) -> Any:
        """The image column of row group ``g`` of file ``f`` (a pyarrow ChunkedArray; two cached per process)."""
        import pyarrow.parquet as pq

        if self._pid != os.getpid():
            self._cache, self._files, self._pid = OrderedDict(), {}, os.getpid()
        hit = self._cache.get((f, g))
        if hit is not None:
            self._cache.move_to_end((f, g))
            return hit
        pf = self._files.get(f)
        if pf is None:
            pf = self._files[f] = pq.ParquetFile(_open(self.paths[f]))
        values = pf.read_row_group(g, columns=[self.image_key]).column(0)  # arrow, not Python: one cell at a time
        self._cache[(f, g)] = values
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return values

    def read(self, i: int) -> Image.Image:
        import pyarrow as pa

        key = self.keys[i]
        f = bisect.bisect_right(self._file_start, i) - 1
        row = i - int(self._file_start[f])
        starts = self._groups[f]
        g = bisect.bisect_right(starts, row) - 1
        try:
            value = self._column(f, g)[row - starts[g]].as_py()
        except (OSError, pa.ArrowException, IndexError) as e:
            raise BadImage(key, f"cannot read parquet row: {_first_line(e)}") from None
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None:
                where = f" (only a path: {value.get('path')})" if value.get("path") else ""
                raise BadImage(key, f"the {self.image_key!r} cell holds no image bytes{where}")
        else:
            data = value
        if data is None:
            raise BadImage(key, f"the {self.image_key!r} cell is empty")
        if len(data) > self.max_input_bytes:
            raise BadImage(key, too_large(len(data), self.max_input_bytes, "parquet cell"))
        return decode_image(bytes(data), key)

    def _fingerprint_items(self) -> list:
        return [self.image_key, self._facts, [[k, lab] for k, lab in zip(self.keys, self.labels, strict=True)]]


def _open(path: str) -> Any:
    """A local path as is; an fsspec URL as a seekable file (pyarrow reads the footer and row groups by range)."""
    if not is_url(path):
        return path
    fs, p = filesystem(path)
    return fs.open(p, "rb")


def _check_image_type(path: str, key: str, typ: Any, pa: Any) -> None:
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    if any(t(typ) for t in binary):
        return
    if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        if any(t(typ.field("bytes").type) for t in binary):
            return
    raise DataError(
        f"{path}: column {key!r} is {typ}, not image bytes (binary, or a struct with a 'bytes' field as written by "
        "Hugging Face datasets); name the image column with image_key (--image-key)"
    )


def _parquet_labels(root: str, labels: list[Any]) -> tuple[list[int], dict[str, int]]:
    """Integer ids (-1 for a missing label) or class names (sorted, missing -> -1) -> ids and the class map."""
    names = sorted({v for v in labels if isinstance(v, str)})
    if not names:
        return labels_to_ids(root, np.asarray(labels), len(labels))
    if any(not isinstance(v, str) and v != -1 for v in labels):
        raise DataError(f"{root}: the label column mixes names and numbers; give one kind")
    class_to_idx = {c: i for i, c in enumerate(names)}
    return [class_to_idx[v] if isinstance(v, str) else -1 for v in labels], class_to_idx
