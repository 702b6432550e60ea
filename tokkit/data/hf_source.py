"""Hugging Face datasets as an image source: ``hf:ORG/NAME`` (hub name), or ``hf:FOLDER`` (a ``save_to_disk`` folder,
or a local folder of parquet / arrow / image files that ``datasets.load_dataset`` reads).

Loaded with ``datasets`` (imported only here), never streamed: the split is materialized as memory-mapped arrow
files (from the local cache when offline, ``HF_DATASETS_OFFLINE=1``), so that inputs are indexed up front and read
in any order, as encode's shard plan, resume and ``shard_id % world_size`` assignment need. A name that is neither
cached nor reachable is one line.

The image column (``image_key``, default ``image``) is read undecoded (``datasets.Image(decode=False)``: its bytes,
or the file its ``path`` names) and decoded by tokkit, bounded like every input. The label column (``label_key``,
default ``label``; absent -> unlabeled) may be a ``ClassLabel`` (its names become the class map), integers or names.
Keys read ``SPLIT/ROW``. Fingerprint: the dataset's own fingerprint, its arrow files (names, sizes, mtimes), row
count, and the name, split and columns, so that a resume with another split or column is refused.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from tokkit.data.arrays import labels_to_ids
from tokkit.data.images import BadImage, _first_line, decode_image
from tokkit.data.inputs import read_regular_file, too_large
from tokkit.data.sources import ImageSource, _stat_facts
from tokkit.errors import DataError

PREFIX = "hf:"
INSTALL = "pip install datasets"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"Hugging Face datasets need the datasets package: {INSTALL}") from None
    return datasets


def load_split(name: str, split: str) -> Any:
    """The ``datasets.Dataset`` of ``split`` of ``name`` (hub name, ``save_to_disk`` folder or local data folder).

    Raises:
        DataError: unknown split, or a name that is neither cached nor reachable (one line).
    """
    datasets = _datasets()
    local = os.path.isdir(os.path.expanduser(name))
    path = os.path.abspath(os.path.expanduser(name)) if local else name
    try:
        if local and any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{name} has no split {split!r} (splits: {', '.join(ds)}); choose one with --split")
                ds = ds[split]
            return ds
        return datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (offline, not found, bad split): one line each
        reason = _first_line(e)
        if "split" in reason.lower() or isinstance(e, (KeyError, ValueError)) and split in reason:
            raise DataError(f"{name}: {reason}; choose the split with --split") from None
        raise DataError(
            f"cannot load Hugging Face dataset {name!r} (split {split!r}): {reason}; check the name, or load it once "
            "online so that it is cached (HF_DATASETS_OFFLINE=1 reads the cache only)"
        ) from None


class HFSource(ImageSource):
    """The rows of one split of a Hugging Face dataset.

    Args:
        name: a hub name (``ORG/NAME``) or a local folder (``save_to_disk`` output or data files).
        split: the split (default ``train``).
        image_key: the image column (``datasets.Image``, a ``{"bytes", "path"}`` struct, or binary).
        label_key: the label column (``ClassLabel``, integers or names); absent -> unlabeled.
        max_input_bytes: the most bytes read for one image.
        dataset: an already loaded ``datasets.Dataset`` (then ``name`` only names it).
    """

    kind = "hf"

    def __init__(
        self,
        name: str,
        split: str | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
        max_input_bytes: int | str | None = None,
        dataset: Any = None,
    ) -> None:
        datasets = _datasets()
        split = split or "train"
        ds = dataset if dataset is not None else load_split(name, split)
        columns = list(ds.column_names)
        image_key = image_key or "image"
        if image_key not in columns:
            raise DataError(f"{name}: no column {image_key!r} (columns: {', '.join(columns)}); use --image-key")
        feature = ds.features[image_key]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(image_key, datasets.Image(decode=False))  # {"bytes", "path"}: tokkit decodes
        elif not _is_bytes_feature(feature):
            raise DataError(f"{name}: column {image_key!r} is {feature}, not images: use --image-key")
        chosen_label = label_key
        label_key = label_key or "label"
        if label_key in columns:
            raw = ds.data.column(label_key).to_pylist()
            lab_feature = ds.features[label_key]
            if isinstance(lab_feature, datasets.ClassLabel):
                ids = [-1 if v is None else int(v) for v in raw]
                class_to_idx = {n: i for i, n in enumerate(lab_feature.names)}
            else:
                ids, class_to_idx = _ids(name, raw)
        elif chosen_label:
            raise DataError(f"{name}: no column {label_key!r} (columns: {', '.join(columns)}); use --label-key")
        else:
            ids, class_to_idx = [-1] * len(ds), {}
        n = len(ds)
        if n == 0:
            raise DataError(f"{name}: split {split!r} has no rows")
        width = max(6, len(str(n - 1)))
        keys = [f"{split}/{r:0{width}d}" for r in range(n)]
        super().__init__(f"{PREFIX}{name}", keys, ids, class_to_idx, max_input_bytes)
        self.options = {"image_key": image_key, "label_key": label_key, "split": split}
        self.dataset = ds
        self._column = None
        files = [f["filename"] for f in getattr(ds, "cache_files", []) or []]
        self._facts = [getattr(ds, "_fingerprint", ""), n, [[os.path.basename(f), *_stat_facts(f)] for f in files]]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_column"] = None
        return state

    def read(self, i: int) -> Image.Image:
        key = self.keys[i]
        if self._column is None:
            self._column = self.dataset.data.column(self.options["image_key"])  # arrow, memory-mapped
        try:
            value = self._column[i].as_py()
        except (OSError, IndexError, ValueError) as e:
            raise BadImage(key, f"cannot read row: {_first_line(e)}") from None
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is None and isinstance(value, dict) and value.get("path"):
            data = read_regular_file(value["path"], key, self.max_input_bytes)  # an image kept as a file path
        if data is None:
            raise BadImage(key, f"the {self.options['image_key']!r} cell is empty")
        if len(data) > self.max_input_bytes:
            raise BadImage(key, too_large(len(data), self.max_input_bytes, "dataset cell"))
        return decode_image(bytes(data), key)

    def _fingerprint_items(self) -> list:
        return [self._facts, [[k, lab] for k, lab in zip(self.keys, self.labels, strict=True)]]


def _is_bytes_feature(feature: Any) -> bool:
    """Binary, or a ``{"bytes": binary, ...}`` struct (an image column written without the Image feature)."""
    if isinstance(feature, dict):
        return "bytes" in feature and _is_bytes_feature(feature["bytes"])
    return getattr(feature, "dtype", None) in ("binary", "large_binary")


def _ids(name: str, raw: list[Any]) -> tuple[list[int], dict[str, int]]:
    names = sorted({v for v in raw if isinstance(v, str)})
    if not names:
        return labels_to_ids(name, np.asarray([-1 if v is None else v for v in raw]), len(raw))
    if any(v is not None and not isinstance(v, str) for v in raw):
        raise DataError(f"{name}: the label column mixes names and numbers; give one kind")
    class_to_idx = {c: i for i, c in enumerate(names)}
    return [-1 if v is None else class_to_idx[v] for v in raw], class_to_idx
