"""Export a ``tokkit-shards/1`` set to the layouts that generator codebases read with their own loaders.

Items are numbered ``0 .. N-1`` in ``open_shards`` order (shards in order, rows in order). ``V`` is the number of
stored views (1 without a views axis), ``L = h * w`` the tokens per view (``prod(index_shape)``, row-major).

``llamagen`` (LlamaGen ``autoregressive/train/extract_codes_c2i.py`` / ``dataset/imagenet.py``; ``R`` = resolution)::

    OUT/imagenet{R}_codes/{i}.npy      (1, V, L) int64   - LlamaGen: train_c2i.py --code-path OUT --image-size R
    OUT/imagenet{R}_labels/{i}.npy     (1,) int64
    LlamaGen picks one random view only when the codes folder path contains "flip"
    (its imagenet_code_c2i_flip_ten_crop/ folders): export a set with views to such an --out.

``jsonl`` (TiTok / RAR pretokenized JSONL; ``cat OUT/tokens-*.jsonl > pretokenized.jsonl`` for one file)::

    OUT/tokens-{shard:06d}.jsonl       {"class_id": int, "tokens": [L ints]} per line; [[L ints] * V] with views

``webdataset`` (``webdataset.WebDataset("OUT/tokens-{000000..000123}.tar").decode()``)::

    OUT/tokens-{shard:06d}.tar         samples {i:09d}.tokens.npy ((*index_shape) or (V, *index_shape); int32, or
                                       int64 past 2^31 codes) and {i:09d}.cls (ASCII label)

``mds`` (mosaicml-streaming: ``streaming.StreamingDataset(local=OUT, remote=None)``; written with its ``MDSWriter``)::

    OUT/tokens-{shard:06d}/            one MDS folder per source shard (index.json + shard.NNNNN.mds)
    OUT/index.json                     their merged index (as ``streaming.base.util.merge_index`` writes it), last
                                       columns: key (str), label (int), tokens (ndarray:int32|int64:(V,) *index_shape)

``parquet`` (``pyarrow.parquet.read_table(OUT)``; ``datasets.load_dataset("parquet", data_files="OUT/*.parquet")``)::

    OUT/tokens-{shard:06d}.parquet     key (string: source path), label (int32), tokens (list<int32|int64>, V*L ids
                                       row-major); schema metadata b"tokkit" = JSON {"shape": [(V,) *index_shape], ...}

Every export also writes ``OUT/_export.json`` (format, source manifest sha256, counts): first with ``complete: false``,
last with ``complete: true``. Each output file is written to a temporary and renamed into place, so an interrupted
export resumes by skipping the files that exist; ``overwrite`` rewrites them all (and removes the files an export
of another set or format left in OUT). Labels are as stored (-1 = unlabeled). pyarrow (parquet) and webdataset (to
read the tars) and mosaicml-streaming (mds) are optional: ``pip install "tokkit[export]"``; each is imported only
for its format.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from tokkit.errors import ConfigError, ShardError
from tokkit.progress import Reporter
from tokkit.shards import (
    SHARD_DIR,
    atomic_output,
    atomic_write_bytes,
    canonical_json,
    check_ids,
    expected_facts,
    open_shards,
    read_json,
    shard_file_name,
    writing,
)

EXPORT_FORMAT = "tokkit-export/1"
EXPORT_JSON = "_export.json"  # "_": pyarrow and datasets skip it when reading OUT as a dataset
INSTALL_HINT = 'pip install "tokkit[export]"'

_EXPORTERS: dict[str, Callable[[_Block, Path, bool], tuple[int, int]]] = {}
_FINISHERS: dict[str, Callable[[list[_Block], Path], None]] = {}  # format -> what runs once every block is written


def register_exporter(name: str) -> Callable[[Callable[..., tuple[int, int]]], Callable[..., tuple[int, int]]]:
    """Register ``fn(block, out, overwrite) -> (files written, files skipped)`` as export format ``name``."""

    def deco(fn: Callable[..., tuple[int, int]]) -> Callable[..., tuple[int, int]]:
        _EXPORTERS[name] = fn
        return fn

    return deco


def list_formats() -> list[str]:
    """The export formats, in registration order."""
    return list(_EXPORTERS)


def require(module: str) -> Any:
    """Import an optional package, or a one-line ConfigError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module} is not installed: {INSTALL_HINT}") from None


@dataclass
class ExportResult:
    """What ``export_shards`` did: ``written`` output files (``skipped`` already there) for ``items`` images."""

    out: Path
    format: str
    items: int
    views: int
    tokens_per_view: int
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Block:
    """One source shard: items ``start .. start + n`` of the set, read on first use."""

    root: Path
    entry: dict[str, Any]
    start: int
    views_axis: bool
    limit: int
    resolution: int

    @property
    def id(self) -> int:
        return int(self.entry["id"])

    @property
    def n(self) -> int:
        return int(self.entry["n"])

    def _path(self, part: str) -> Path:
        return self.root / SHARD_DIR / shard_file_name(self.id, part)

    @cached_property
    def grid(self) -> np.ndarray:
        """(n, V, *index_shape) int64 ids, range-checked (V = 1 without a views axis)."""
        codes = np.load(self._path("codes"), allow_pickle=False)
        check_ids(codes, self.limit, shard_file_name(self.id, "codes"), f"run tokkit verify {self.root}")
        codes = codes.astype(np.int64)
        return codes if self.views_axis else codes[:, None]

    @property
    def codes(self) -> np.ndarray:
        """(n, V, L) int64: each view's ids flattened row-major."""
        return self.grid.reshape(self.n, self.grid.shape[1], -1)

    @cached_property
    def labels(self) -> np.ndarray:
        """(n,) int64 labels (-1 = unlabeled)."""
        return np.load(self._path("labels"), allow_pickle=False).astype(np.int64)

    @cached_property
    def keys(self) -> list[str]:
        """Source path of each item."""
        lines = [ln for ln in self._path("keys").read_text().splitlines() if ln]
        if len(lines) != self.n:
            raise ShardError(f"{shard_file_name(self.id, 'keys')}: {len(lines)} keys for {self.n} items")
        return [json.loads(line)["key"] for line in lines]

    def index_dtype(self) -> np.dtype:
        """int32 when every id fits, else int64."""
        return np.dtype(np.int32 if self.limit <= 2**31 else np.int64)


# ---------------------------------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _todo(path: Path, overwrite: bool) -> bool:
    return overwrite or not path.is_file()


_SHARD_OUTPUT = re.compile(r"^tokens-\d{6,}\.(jsonl|tar|parquet)$")
_MDS_DIR = re.compile(r"^tokens-\d{6,}$")
_MDS_TMP = re.compile(r"^\.tokens-\d{6,}\.tmp-[0-9a-f]{8}$")
_LLAMAGEN_DIR = re.compile(r"^imagenet\d+_(codes|labels)$")
_LLAMAGEN_FILE = re.compile(r"^\d+\.npy$")


def _outputs_of_any_export(out: Path) -> list[Path]:
    """Files in ``out`` named as some export writes them (``tokens-000000.tar``, ``imagenet256_codes/7.npy`` ...)."""
    found = [p for p in out.iterdir() if _SHARD_OUTPUT.match(p.name) and p.is_file()]
    found += [p for d in out.iterdir() if _MDS_DIR.match(d.name) and d.is_dir() for p in d.iterdir() if p.is_file()]
    found += [out / "index.json"] if _is_our_mds_index(out / "index.json") else []
    for d in out.iterdir():
        if _LLAMAGEN_DIR.match(d.name) and d.is_dir():
            found += [p for p in d.iterdir() if _LLAMAGEN_FILE.match(p.name) and p.is_file()]
    return found


def _is_our_mds_index(path: Path) -> bool:
    """``OUT/index.json`` as the mds export merges it (every shard in a ``tokens-NNNNNN/`` folder), not another's."""
    index = read_json(path)
    shards = index.get("shards") if isinstance(index, dict) else None
    return isinstance(shards, list) and all(
        isinstance(e, dict) and _MDS_DIR.match(str((e.get("raw_data") or {}).get("basename", "")).split("/")[0])
        for e in shards
    )


def _expected_outputs(out: Path, format: str, blocks: list[_Block]) -> set[Path]:
    """The files this export writes."""
    if format == "llamagen":
        r = blocks[0].resolution if blocks else 0
        n = sum(b.n for b in blocks)
        return {out / f"imagenet{r}_{part}" / f"{i}.npy" for part in ("codes", "labels") for i in range(n)}
    if format == "mds":
        folders = [out / f"tokens-{b.id:06d}" for b in blocks]
        return {out / "index.json"} | {p for d in folders if d.is_dir() for p in d.iterdir()}
    ext = {"jsonl": "jsonl", "webdataset": "tar", "parquet": "parquet"}[format]
    return {out / f"tokens-{b.id:06d}.{ext}" for b in blocks}


@register_exporter("llamagen")
def _llamagen(block: _Block, out: Path, overwrite: bool) -> tuple[int, int]:
    codes_dir, labels_dir = out / f"imagenet{block.resolution}_codes", out / f"imagenet{block.resolution}_labels"
    with writing(out):
        codes_dir.mkdir(parents=True, exist_ok=True)
        labels_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for row in range(block.n):
        i = block.start + row
        for path, array in (
            (labels_dir / f"{i}.npy", lambda r=row: block.labels[r : r + 1]),  # (1,)
            (codes_dir / f"{i}.npy", lambda r=row: block.codes[r : r + 1]),  # (1, V, L)
        ):
            if not _todo(path, overwrite):
                skipped += 1
                continue
            atomic_write_bytes(path, _npy_bytes(array()), fsync=False)  # one file per image: no fsync each
            written += 1
    return written, skipped


@register_exporter("jsonl")
def _jsonl(block: _Block, out: Path, overwrite: bool) -> tuple[int, int]:
    path = out / f"tokens-{block.id:06d}.jsonl"
    if not _todo(path, overwrite):
        return 0, 1
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        for row in range(block.n):
            views = block.codes[row].tolist()  # V lists of L ids
            tokens = views if block.views_axis else views[0]
            f.write(json.dumps({"class_id": int(block.labels[row]), "tokens": tokens}, separators=(",", ":")) + "\n")
    return 1, 0


@register_exporter("webdataset")
def _webdataset(block: _Block, out: Path, overwrite: bool) -> tuple[int, int]:
    path = out / f"tokens-{block.id:06d}.tar"
    if not _todo(path, overwrite):
        return 0, 1
    grid = block.grid.astype(block.index_dtype())  # (n, V, *index_shape)
    with atomic_output(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in range(block.n):
            key = f"{block.start + row:09d}"
            tokens = grid[row] if block.views_axis else grid[row, 0]
            for name, data in (("tokens.npy", _npy_bytes(tokens)), ("cls", str(int(block.labels[row])).encode())):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return 1, 0


@register_exporter("parquet")
def _parquet(block: _Block, out: Path, overwrite: bool) -> tuple[int, int]:
    pa, pq = require("pyarrow"), require("pyarrow.parquet")
    path = out / f"tokens-{block.id:06d}.parquet"
    if not _todo(path, overwrite):
        return 0, 1
    dtype = block.index_dtype()
    flat = block.codes.reshape(block.n, -1).astype(dtype)  # (n, V*L)
    width = flat.shape[1]
    values = pa.array(flat.reshape(-1), type=pa.from_numpy_dtype(dtype))
    offsets = pa.array(np.arange(0, (block.n + 1) * width, width, dtype=np.int32))
    shape = list(block.grid.shape[1:]) if block.views_axis else list(block.grid.shape[2:])
    meta = {"shape": shape, "views": int(block.grid.shape[1]) if block.views_axis else 0, "format": EXPORT_FORMAT}
    table = pa.table(
        {
            "key": pa.array(block.keys, type=pa.string()),
            "label": pa.array(block.labels.astype(np.int32), type=pa.int32()),
            "tokens": pa.ListArray.from_arrays(offsets, values),
        }
    ).replace_schema_metadata({"tokkit": json.dumps(meta)})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    return 1, 0


@register_exporter("mds")
def _mds(block: _Block, out: Path, overwrite: bool) -> tuple[int, int]:
    from tokkit.checkpoint import atomic_replace_dir

    folder = out / f"tokens-{block.id:06d}"
    if not overwrite and (folder / "index.json").is_file():
        return 0, 1
    writer_cls = require("streaming").MDSWriter
    grid = block.grid.astype(block.index_dtype())  # (n, V, *index_shape)
    tokens = grid if block.views_axis else grid[:, 0]  # (n, [V,] *index_shape)
    shape = ",".join(str(d) for d in tokens.shape[1:])
    columns = {"key": "str", "label": "int", "tokens": f"ndarray:{tokens.dtype.name}:{shape}"}
    tmp = out / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with writing(tmp), writer_cls(out=str(tmp), columns=columns, size_limit=1 << 27) as w:
            for row in range(block.n):
                w.write({"key": block.keys[row], "label": int(block.labels[row]), "tokens": tokens[row]})
        with writing(folder):
            atomic_replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1, 0


def _merge_mds_index(blocks: list[_Block], out: Path) -> None:
    """``OUT/index.json``: every block's shards, basenames prefixed with their folder (``merge_index``'s layout)."""
    shards = []
    for b in blocks:
        sub = f"tokens-{b.id:06d}"
        for entry in json.loads((out / sub / "index.json").read_text())["shards"]:
            for part in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if entry.get(part):
                    entry[part]["basename"] = f"{sub}/{entry[part]['basename']}"
            shards.append(entry)
    atomic_write_bytes(out / "index.json", json.dumps({"version": 2, "shards": shards}).encode())


_FINISHERS["mds"] = _merge_mds_index


# ---------------------------------------------------------------------------------------------------- driver


def export_shards(
    shards: str | Path,
    out: str | Path,
    format: str,
    *,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> ExportResult:
    """Export the shard set at ``shards`` to ``out`` in ``format`` (see the module docstring for each layout).

    Args:
        shards: a complete shard set folder (``tokkit encode --out``).
        out: the export folder (created; an interrupted export of the same set and format resumes).
        format: one of ``list_formats()``.
        overwrite: rewrite every output, and export over another set or format.
        reporter: progress sink.

    Returns:
        An ``ExportResult``.

    Raises:
        ConfigError: an unknown format, or a missing optional package (one line naming the install command).
        ShardError: an incomplete or inconsistent shard set, ``out`` holding another export (without
            ``overwrite``), or a failed write (one line; files already written are kept).
    """
    if format not in _EXPORTERS:
        raise ConfigError(f"unknown export format {format!r}: use one of {', '.join(list_formats())}")
    if format in ("parquet", "mds"):
        # before any work (webdataset tars are written with tarfile: no package needed)
        require("pyarrow.parquet" if format == "parquet" else "streaming")
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    ds = open_shards(shards, view="all")  # validates: complete, manifest and files agree
    manifest = ds.manifest
    root, out = Path(shards), Path(out)
    if root.is_file():
        root = root.parent
    views_axis = bool(manifest.get("views", {}).get("axis", False))
    index_shape = [int(x) for x in manifest["tokenizer"]["index_shape"]]
    header = {
        "format": EXPORT_FORMAT,
        "export": format,
        "source": str(root.resolve()),
        "source_manifest_sha256": manifest.get("manifest_sha256"),
        "count": len(ds),
        "views": ds.num_views if views_axis else 0,
        "index_shape": index_shape,
        "codebook_size": manifest["tokenizer"].get("codebook_size"),
        "class_to_idx": manifest.get("class_to_idx"),
    }
    if out.is_file():
        raise ShardError(f"{out} is a file, not a folder: choose another --out (or remove the file)")
    old = read_json(out / EXPORT_JSON)
    same = isinstance(old, dict) and all(old.get(k) == header[k] for k in ("export", "source_manifest_sha256"))
    if old is not None and not same and not overwrite:
        if not isinstance(old, dict):
            what = f"an unreadable {EXPORT_JSON}"
        elif old.get("source_manifest_sha256") != header["source_manifest_sha256"]:
            what = f"a {old.get('export')} export of another shard set ({EXPORT_JSON})"
        else:
            what = f"a {old.get('export')} export of this shard set ({EXPORT_JSON})"
        raise ShardError(f"{out} holds {what}: choose another --out, or pass --overwrite")
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / EXPORT_JSON, canonical_json({**header, "complete": False}).encode())

    tokens_per_view = int(np.prod(index_shape)) if index_shape else 1
    result = ExportResult(out, format, len(ds), ds.num_views if views_axis else 1, tokens_per_view)
    if format == "llamagen" and views_axis and "flip" not in str(out.resolve()):
        result.notes.append(
            f"LlamaGen samples one of the {ds.num_views} views only when the codes path contains 'flip' "
            "(e.g. --out .../imagenet_code_c2i_flip_ten_crop); elsewhere it reads every view as one sequence"
        )
    unlabeled = int((ds.labels < 0).sum())
    if unlabeled:
        result.notes.append(f"{unlabeled} of {len(ds)} images are unlabeled: exported with label -1")
    for note in result.notes:
        reporter.message(note)
    expect = expected_facts(manifest)
    resolution = int(manifest.get("preprocessing", {}).get("resolution", 0))
    blocks, start = [], 0
    for entry in manifest["shards"]:
        if entry["n"] > 0:
            blocks.append(_Block(root, entry, start, views_axis, int(expect["limit"]), resolution))
            start += int(entry["n"])
    if overwrite:  # what an earlier, other export left must not be read as part of this one
        keep = _expected_outputs(out, format, blocks)
        for p in _outputs_of_any_export(out):
            if p not in keep:
                with writing(p):
                    p.unlink()
    write = _EXPORTERS[format]
    reporter.start(f"export {format}", len(ds))
    done = 0
    try:
        for block in blocks:
            w, s = write(block, out, overwrite)
            result.written, result.skipped = result.written + w, result.skipped + s
            done += block.n
            reporter.advance(done, written=result.written, skipped=result.skipped)
    finally:
        reporter.stop()
    if format in _FINISHERS:
        _FINISHERS[format](blocks, out)
    for stale in [p for p in out.iterdir() if _MDS_TMP.match(p.name) and p.is_dir()]:  # a killed mds export's
        shutil.rmtree(stale, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    atomic_write_bytes(out / EXPORT_JSON, canonical_json({**header, "complete": True}).encode())
    return result
