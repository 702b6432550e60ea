"""Token shards (``tokkit-shards/1``): the plan, the atomic writer, the manifest, the reader and ``verify``.

Layout of a shard set (see DESIGN.md, "Token shards")::

    OUT/plan.json                       what is being encoded (written first; a resume must match it)
    OUT/manifest.json                   written last (tmp + os.replace); complete=true only when all shards are
    OUT/shards/shard-000123.codes.npy   (n, *index_shape) or (n, V, *index_shape); uint16 / int32
    OUT/shards/shard-000123.labels.npy  (n,) int32, -1 = unlabeled
    OUT/shards/shard-000123.keys.jsonl  one line per image: source key (relative path), source index, view
    OUT/shards/shard-000123.done.json   commit marker: n, bytes + sha256 of each file, the shard's bad inputs
    OUT/errors.jsonl                    inputs that could not be read, with the reason (every shard, in order)

Shard ``s`` covers inputs ``[s * shard_size, (s + 1) * shard_size)`` of the sorted input list, whatever the number of
workers or ranks, so a resume skips committed shards and may run with another process count.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tokkit.checkpoint import sha256_file
from tokkit.errors import ShardError

FORMAT = "tokkit-shards/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
ERRORS = "errors.jsonl"
SHARD_DIR = "shards"
PARTS = ("codes", "labels", "keys")
_SUFFIX = {"codes": ".codes.npy", "labels": ".labels.npy", "keys": ".keys.jsonl"}


# ---------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``id`` covers sorted inputs ``start`` (inclusive) to ``stop`` (exclusive)."""

    id: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """File-name stem, e.g. ``shard-000123``."""
        return shard_name(self.id)


def shard_name(shard_id: int) -> str:
    """``shard-000123``."""
    return f"shard-{shard_id:06d}"


def plan_shards(count: int, shard_size: int) -> list[ShardSpec]:
    """Cut ``count`` sorted inputs into consecutive shards of ``shard_size`` (the last one shorter)."""
    if shard_size < 1:
        raise ShardError(f"shard size must be >= 1, got {shard_size}")
    return [ShardSpec(i, a, min(a + shard_size, count)) for i, a in enumerate(range(0, count, shard_size))]


def codes_dtype(codebook_size: int) -> np.dtype:
    """uint16 when every id fits (codebook_size <= 65536), else int32."""
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def canonical_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, 2-space indent, trailing newline): equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def plan_id(plan: dict[str, Any]) -> str:
    """sha256 of a plan's canonical JSON (without its own ``plan_id``)."""
    body = {k: v for k, v in plan.items() if k != "plan_id"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- writer


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_shard(
    out: str | Path,
    spec: ShardSpec,
    codes: np.ndarray,
    labels: np.ndarray,
    keys: list[dict[str, Any]],
    errors: list[dict[str, Any]] | None = None,
    upscaled: int = 0,
    plan: str = "",
) -> dict[str, Any]:
    """Write one shard's three files atomically, then its ``done.json`` commit marker (last).

    Args:
        out: the shard set folder.
        spec: which shard.
        codes: (n, ...) token ids, already in the set's dtype.
        labels: (n,) labels.
        keys: one record per image (``key``, ``index``, ``view``).
        errors: the shard's unreadable inputs (``key``, ``index``, ``reason``).
        upscaled: how many of its images were smaller than the resolution.
        plan: the plan id the shard belongs to.

    Returns:
        The commit marker's content.
    """
    if not (len(codes) == len(labels) == len(keys)):
        raise ShardError(f"{spec.name}: {len(codes)} codes, {len(labels)} labels and {len(keys)} keys differ")
    folder = Path(out) / SHARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {
        "codes": _npy_bytes(codes),
        "labels": _npy_bytes(np.asarray(labels, dtype=np.int32)),
        "keys": "".join(json.dumps(k, sort_keys=True) + "\n" for k in keys).encode(),
    }
    files = {}
    for part, data in blobs.items():
        name = spec.name + _SUFFIX[part]
        atomic_write_bytes(folder / name, data)
        files[part] = {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    done = {
        "shard": spec.id,
        "start": spec.start,
        "stop": spec.stop,
        "n": len(codes),
        "files": files,
        "errors": list(errors or []),
        "upscaled": int(upscaled),
        "plan_id": plan,
    }
    atomic_write_bytes(folder / f"{spec.name}.done.json", canonical_json(done).encode())
    return done


def read_done(out: str | Path, spec: ShardSpec, plan: str | None = None) -> dict[str, Any] | None:
    """A shard's commit marker, or None when the shard is not committed (or was committed for another plan)."""
    path = Path(out) / SHARD_DIR / f"{spec.name}.done.json"
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("shard") != spec.id or (plan is not None and done.get("plan_id") != plan):
        return None
    if (done.get("start"), done.get("stop")) != (spec.start, spec.stop):
        return None
    return done


def write_manifest(out: str | Path, plan: dict[str, Any], dones: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Write ``errors.jsonl`` and then ``manifest.json`` (tmp + os.replace) from the plan and the commit markers.

    ``dones[i]`` is shard ``i``'s marker, or None when it is not committed; ``complete`` is true only when all are.
    """
    out = Path(out)
    committed = [d for d in dones if d is not None]
    errors = [e for d in committed for e in d.get("errors", [])]
    atomic_write_bytes(out / ERRORS, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    shards = [
        {"id": d["shard"], "start": d["start"], "stop": d["stop"], "n": d["n"], "errors": len(d.get("errors", [])),
         "upscaled": d.get("upscaled", 0), "files": d["files"]}
        for d in committed
    ]  # fmt: skip
    manifest = {
        **{k: v for k, v in plan.items() if k not in ("format",)},
        "format": FORMAT,
        "complete": len(committed) == len(dones),
        "num_shards": len(dones),
        "committed_shards": len(committed),
        "count": sum(d["n"] for d in committed),
        "errors": len(errors),
        "upscaled": sum(d.get("upscaled", 0) for d in committed),
        "shards": shards,
    }
    atomic_write_bytes(out / MANIFEST, canonical_json(manifest).encode())
    return manifest


# ---------------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A shard set's manifest (``path`` is the folder or its ``manifest.json``); ShardError when absent or not ours."""
    p = Path(path)
    mpath = p / MANIFEST if p.is_dir() else p
    if not mpath.is_file():
        hint = " (the encode is unfinished: run the same tokkit encode again)" if (mpath.parent / PLAN).exists() else ""
        raise ShardError(f"no {MANIFEST} in {mpath.parent}: not a tokkit shard set{hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{mpath} is unreadable ({e}); re-run tokkit encode") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ShardError(f"{mpath} is not a {FORMAT} manifest (format: {found!r})")
    return manifest


class ShardDataset(Dataset):
    """A map-style Dataset over memory-mapped shards: item ``i`` -> ``(tokens int64 tensor, label int)``.

    ``tokens`` is (*index_shape), e.g. (h, w); with ``view="all"`` it is (V, *index_shape). Arrays are memory-mapped
    lazily in each process (safe with DataLoader workers, fork or spawn).

    Attributes:
        manifest: the shard set's manifest.
        num_views: views stored per image (1, 2 or 10).
        labels: (N,) int32 labels of every item (read at open; small).
        keys: source key of every item (read on first use).
    """

    def __init__(self, path: str | Path, view: str | int = "random", seed: int = 0, allow_incomplete: bool = False):
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        if not self.manifest.get("complete") and not allow_incomplete:
            raise ShardError(f"{self.root} is incomplete: run the same tokkit encode again to finish it")
        self.num_views = int(self.manifest.get("views", {}).get("count", 1))
        if isinstance(view, int) and not 0 <= view < self.num_views:
            raise ShardError(f"view {view} out of range: {self.root} stores {self.num_views} view(s)")
        if not isinstance(view, int) and view not in ("random", "all"):
            raise ShardError(f"view must be 'random', 'all' or an index, got {view!r}")
        self.view = view
        self.seed = seed
        self._shards = [s for s in self.manifest["shards"] if s["n"] > 0]
        for s in self._shards:
            for part in ("codes", "labels"):
                f = self.root / SHARD_DIR / s["files"][part]["name"]
                if not f.is_file() or f.stat().st_size != s["files"][part]["bytes"]:
                    raise ShardError(f"{f.name} is missing or has the wrong size: run tokkit verify {self.root}")
        self._offsets = np.cumsum([0] + [s["n"] for s in self._shards])
        self.labels = np.concatenate(
            [np.load(self.root / SHARD_DIR / s["files"]["labels"]["name"]) for s in self._shards]
            or [np.zeros(0, np.int32)]
        )
        self._codes: dict[int, np.ndarray] = {}
        self._pid = -1
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_codes"], state["_pid"] = {}, -1
        return state

    def _array(self, j: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._codes, self._pid = {}, os.getpid()
        if j not in self._codes:
            self._codes[j] = np.load(self.root / SHARD_DIR / self._shards[j]["files"]["codes"]["name"], mmap_mode="r")
        return self._codes[j]

    def locate(self, i: int) -> tuple[int, int]:
        """Item ``i`` -> (position among non-empty shards, row in that shard)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        j = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return j, int(i - self._offsets[j])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j, row = self.locate(int(i))
        codes = self._array(j)[row]
        if self.manifest.get("views", {}).get("axis", False):
            if self.view == "random":
                salt = int(torch.randint(0, 2**62, ()).item())  # torch RNG: seeded per worker and epoch
                v = int(np.random.default_rng([self.seed, int(i), salt]).integers(self.num_views))
                codes = codes[v]
            elif isinstance(self.view, int):
                codes = codes[self.view]
        tokens = torch.from_numpy(np.array(codes, dtype=np.int64))
        return tokens, int(self.labels[i])

    @property
    def keys(self) -> list[str]:
        """Source key of every item, in order."""
        if self._keys is None:
            keys: list[str] = []
            for s in self._shards:
                text = (self.root / SHARD_DIR / s["files"]["keys"]["name"]).read_text()
                keys += [json.loads(line)["key"] for line in text.splitlines() if line]
            self._keys = keys
        return self._keys


def open_shards(
    path: str | Path, view: str | int = "random", seed: int = 0, allow_incomplete: bool = False
) -> ShardDataset:
    """Open a shard set written by ``tokkit encode`` as a torch Dataset of ``(tokens int64, label)``.

    Args:
        path: the shard set folder.
        view: which stored view to return: ``random`` (a fresh choice per access), an index, or ``all``.
        seed: mixed into the random view choice.
        allow_incomplete: read the committed shards of an unfinished encode.
    """
    return ShardDataset(path, view=view, seed=seed, allow_incomplete=allow_incomplete)


# ---------------------------------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    """Outcome of ``verify``: ``problems`` names every mismatch (empty when the set is intact)."""

    path: Path
    shards: int = 0
    files: int = 0
    bytes: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every file matches and the set is complete."""
        return not self.problems and self.complete


def verify(path: str | Path, reporter: Any = None) -> VerifyResult:
    """Re-hash every shard file against the manifest.

    Args:
        path: the shard set folder.
        reporter: optional ``tokkit.progress.Reporter``.

    Returns:
        A ``VerifyResult``; each problem is one line naming the file (missing, size or sha256 mismatch).
    """
    from tokkit.progress import resolve

    rep = resolve(reporter)
    root = Path(path)
    manifest = read_manifest(root)
    res = VerifyResult(root, complete=bool(manifest.get("complete")))
    if not res.complete:
        res.problems.append(
            f"incomplete: {manifest.get('committed_shards')} of {manifest.get('num_shards')} shards committed"
        )
    rep.start("verify", len(manifest["shards"]))
    for k, s in enumerate(manifest["shards"]):
        for part in PARTS:
            rec = s["files"][part]
            f = root / SHARD_DIR / rec["name"]
            if not f.is_file():
                res.problems.append(f"{rec['name']}: missing")
                continue
            size = f.stat().st_size
            res.files += 1
            res.bytes += size
            if size != rec["bytes"]:
                res.problems.append(f"{rec['name']}: size {size} != {rec['bytes']} in the manifest")
            elif sha256_file(f) != rec["sha256"]:
                res.problems.append(f"{rec['name']}: sha256 mismatch (the file changed after it was written)")
        res.shards += 1
        rep.advance(k + 1)
    rep.stop()
    return res


def describe(path: str | Path) -> dict[str, Any]:
    """A summary of a shard set for ``tokkit info``: manifest facts plus bytes on disk."""
    root = Path(path)
    m = read_manifest(root)
    total = sum(rec["bytes"] for s in m["shards"] for rec in s["files"].values())
    return {
        "path": str(root),
        "format": m["format"],
        "complete": m.get("complete"),
        "images": m.get("count"),
        "shards": f"{m.get('committed_shards')}/{m.get('num_shards')}",
        "shard_size": m.get("shard_size"),
        "skipped": m.get("errors"),
        "upscaled": m.get("upscaled"),
        "dtype": m.get("dtype"),
        "codes_shape": m.get("codes_shape"),
        "views": m.get("views"),
        "classes": len(m.get("class_to_idx") or {}),
        "bytes": total,
        "tokenizer": m.get("tokenizer"),
        "preprocessing": m.get("preprocessing"),
        "source": m.get("source"),
    }


__all__ = [
    "FORMAT",
    "ShardDataset",
    "ShardSpec",
    "VerifyResult",
    "codes_dtype",
    "describe",
    "open_shards",
    "plan_shards",
    "read_done",
    "read_manifest",
    "verify",
    "write_manifest",
    "write_shard",
]
