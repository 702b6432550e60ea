"""Token shards (``tokkit-shards/1``): the plan, the atomic writer, the manifest, the reader and ``verify``.

Layout of a shard set (see DESIGN.md, "Token shards")::

    OUT/plan.json                       what is being encoded (written first; a resume must match it)
    OUT/manifest.json                   written last (tmp + os.replace); complete=true only when all shards are
    OUT/shards/shard-000123.codes.npy   (n, *index_shape) or (n, V, *index_shape); uint16 / uint32 / int64
    OUT/shards/shard-000123.labels.npy  (n,) int32, -1 = unlabeled
    OUT/shards/shard-000123.keys.jsonl  one line per image: source key (relative path), source index, view
    OUT/shards/shard-000123.done.json   commit marker: n, bytes + sha256 of each file, the shard's bad inputs
    OUT/errors.jsonl                    inputs that could not be read, with the reason (every shard, in order)

Shard ``s`` covers inputs ``[s * shard_size, (s + 1) * shard_size)`` of the sorted input list, whatever the number of
workers or ranks, so a resume skips committed shards and may run with another process count.

Nothing is trusted blindly: the manifest carries its own sha256; ``check_manifest`` (cheap, no file reads) and
``check_shard`` (file sizes and ``.npy`` headers; with ``full`` also sha256, key counts and id ranges) cross-check the
manifest, the commit markers and the files. ``open_shards`` runs the cheap checks, ``verify`` all of them, and
``tokkit encode --repair`` re-encodes exactly the shards that fail.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tokkit.checkpoint import atomic_path, sha256_file, write_durable
from tokkit.errors import ShardError

FORMAT = "tokkit-shards/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
ERRORS = "errors.jsonl"
SHARD_DIR = "shards"
DONE = ".done.json"
PARTS = ("codes", "labels", "keys")
_SUFFIX = {"codes": ".codes.npy", "labels": ".labels.npy", "keys": ".keys.jsonl"}
# our temporaries: ``.NAME.tmp-XXXXXXXX`` beside NAME (see ``atomic_write_bytes``)
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{8}$")
_SHARD_FILE = re.compile(r"^shard-\d{6,}\.(codes\.npy|labels\.npy|keys\.jsonl|done\.json)$")


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
    """The stored dtype that holds every id in [0, codebook_size): uint16 up to 2^16 codes, uint32 up to 2^32, else
    int64 (sets written before 2^32-code tokenizers existed may hold int32; they stay readable)."""
    if codebook_size <= 2**16:
        return np.dtype(np.uint16)
    if codebook_size <= 2**32:
        return np.dtype(np.uint32)
    return np.dtype(np.int64)


def id_limit(dtype: np.dtype, codebook_size: int | None = None) -> int:
    """One past the largest id that ``dtype`` holds (and that the codebook has, when given)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ShardError(f"token ids must be stored as integers, not {dtype}")
    top = int(np.iinfo(dtype).max) + 1
    return top if codebook_size is None else min(top, int(codebook_size))


def check_ids(ids: np.ndarray, limit: int, what: str = "token ids", hint: str = "") -> None:
    """ShardError (one line) unless every id of ``ids`` lies in ``[0, limit)``."""
    if ids.dtype.kind not in "iu":
        raise ShardError(f"{what} must be integers, not {ids.dtype}")
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limit:
        hint = hint or "these tokens are from another tokenizer, or corrupt"
        raise ShardError(f"{what}: id {lo if lo < 0 else hi} outside [0, {limit}): {hint}")


def as_codes(ids: np.ndarray, dtype: np.dtype, codebook_size: int | None = None) -> np.ndarray:
    """Token ids cast to a shard set's ``dtype``, refusing (never wrapping) any id the dtype or codebook cannot hold."""
    hint = f"refused rather than wrapped in {np.dtype(dtype)} (the quantizer broke its index contract: a bug)"
    check_ids(ids, id_limit(dtype, codebook_size), "token ids", hint)
    return ids.astype(dtype, copy=False)


def canonical_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, 2-space indent, trailing newline): equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def plan_id(plan: dict[str, Any]) -> str:
    """sha256 of a plan's canonical JSON (without its own ``plan_id``)."""
    body = {k: v for k, v in plan.items() if k != "plan_id"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- writer


def write_failure(e: OSError, path: Path | str) -> str:
    """One line for a failed write: what failed, why, and what to do (no space, read-only, a file in the way ...)."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        todo = "free some space"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = "make the folder writable or choose another --out"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        todo = "a file is in the way of a folder there: choose another --out"
    else:
        todo = "check the folder"
    return f"cannot write {path}: {e.strerror or e}; {todo}, then run the same command again (finished work is kept)"


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a one-line ``ShardError`` (see ``write_failure``)."""
    try:
        yield
    except OSError as e:
        raise ShardError(write_failure(e, path)) from None


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """``checkpoint.atomic_path`` whose failed write (no space, read-only ...) is a one-line ``ShardError``."""
    with writing(path), atomic_path(path) as tmp:
        yield tmp


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary ``.NAME.tmp-XXXXXXXX`` in the same folder and ``os.replace``.

    A failed write (no space, read-only ...) removes its temporary and raises a one-line ``ShardError``; ``path`` is
    then untouched. A temporary left by ``kill -9`` is removed by ``remove_temporaries`` on the next run.
    """
    with atomic_output(path) as tmp:
        write_durable(tmp, data, fsync)


def temporaries_of(folder: str | Path, ours: Callable[[str], bool]) -> list[Path]:
    """Files ``.NAME.tmp-XXXXXXXX`` in ``folder`` (an interrupted ``atomic_write_bytes``) whose NAME is ``ours``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and ours(m.group("name")) and p.is_file() and not p.is_symlink():
            found.append(p)
    return sorted(found)


def temporaries(out: str | Path) -> list[Path]:
    """Temporaries of ours left in a shard set by an interrupted write (``.plan.json.tmp-1a2b3c4d`` ...).

    Only our names match: ``.NAME.tmp-XXXXXXXX`` where NAME is plan.json, manifest.json or errors.jsonl in ``out``,
    or a shard file (``shard-NNNNNN.codes.npy`` ...) in ``out/shards``; never a complete file.
    """
    out = Path(out)
    top = temporaries_of(out, lambda name: name in (PLAN, MANIFEST, ERRORS))
    return top + temporaries_of(out / SHARD_DIR, lambda name: bool(_SHARD_FILE.match(name)))


def remove_temporaries(out: str | Path) -> int:
    """Remove ``temporaries(out)``; returns how many were removed."""
    found = temporaries(out)
    for p in found:
        with writing(p):
            p.unlink(missing_ok=True)
    return len(found)


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
    codebook_size: int | None = None,
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
        codebook_size: when given, every id must lie in [0, codebook_size).

    Returns:
        The commit marker's content.

    Raises:
        ShardError: counts that differ, ids the dtype or codebook cannot hold, or a failed write (one line).
    """
    if not (len(codes) == len(labels) == len(keys)):
        raise ShardError(f"{spec.name}: {len(codes)} codes, {len(labels)} labels and {len(keys)} keys differ")
    check_ids(codes, id_limit(codes.dtype, codebook_size), f"{spec.name} codes")
    folder = Path(out) / SHARD_DIR
    with writing(folder):
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
    atomic_write_bytes(folder / f"{spec.name}{DONE}", canonical_json(done).encode())
    return done


def read_done(out: str | Path, spec: ShardSpec, plan: str | None = None) -> dict[str, Any] | None:
    """A shard's commit marker, or None when the shard is not committed (or was committed for another plan)."""
    path = Path(out) / SHARD_DIR / f"{spec.name}{DONE}"
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
    shards = [entry_of(d) for d in committed]
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
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    atomic_write_bytes(out / MANIFEST, canonical_json(manifest).encode())
    return manifest


def entry_of(done: dict[str, Any]) -> dict[str, Any]:
    """A commit marker -> the shard's entry in the manifest."""
    keep = {"id": done["shard"], "start": done["start"], "stop": done["stop"], "n": done["n"]}
    return {**keep, "errors": len(done.get("errors", [])), "upscaled": done.get("upscaled", 0), "files": done["files"]}


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- checks


def shard_file_name(shard_id: int, part: str) -> str:
    """The only name a shard file may have: ``shard-000123.codes.npy`` (parts: codes, labels, keys)."""
    return shard_name(shard_id) + _SUFFIX[part]


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a ``.npy`` header, without reading the data; ValueError when it is not a ``.npy``."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), np.dtype(dtype)


def expected_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """What every shard of a set must agree with: dtype, codes shape, id limit, number of classes (or None)."""
    dtype = np.dtype(facts["dtype"])
    size = (facts.get("tokenizer") or {}).get("codebook_size")
    classes = facts.get("class_to_idx")
    return {
        "dtype": dtype,
        "codes_shape": tuple(int(x) for x in facts["codes_shape"]),
        "limit": id_limit(dtype, int(size) if size is not None else None),
        "classes": len(classes) if classes else None,
    }


def check_manifest(manifest: dict[str, Any]) -> list[str]:
    """Cheap consistency checks of a manifest, without reading any shard file.

    Its own sha256; every shard file name has the one allowed form (so that no name reaches outside the shard
    folder); shard ids increase; each shard's range is ``[id * shard_size, ...)``, contiguous, and holds ``n``
    items plus its unreadable inputs; the totals (count, errors, committed shards) add up.

    Returns:
        One line per problem (empty when consistent).
    """
    problems = []
    own = manifest.get("manifest_sha256")
    if own is not None and own != manifest_sha256(manifest):
        problems.append("manifest.json was changed after it was written (its manifest_sha256 does not match)")
    try:
        problems += _manifest_facts_problems(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        problems.append(f"manifest.json is malformed ({type(e).__name__}: {e})")
    return problems


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _manifest_facts_problems(m: dict[str, Any]) -> list[str]:
    out: list[str] = []
    expect = expected_facts(m)
    if any(d < 1 for d in expect["codes_shape"]):
        out.append(f"codes_shape {list(expect['codes_shape'])} is not a shape")
    num, size = int(m["num_shards"]), m.get("shard_size")
    count = (m.get("source") or {}).get("count")
    if size is not None and count is not None and num != -(-int(count) // int(size)):
        out.append(f"num_shards {num} does not fit {count} inputs in shards of {size}")
    last = -1
    for e in m["shards"]:
        sid = e["id"]
        if not _is_int(sid) or not last < sid < num:
            out.append(f"shard id {sid!r} out of order or outside [0, {num})")
            continue
        last = sid
        for part in PARTS:
            rec, want = e["files"][part], shard_file_name(sid, part)
            if rec["name"] != want:
                out.append(f"shard {sid}: file name {rec['name']!r} is not {want!r} (refused: it must stay in shards/)")
            if not _is_int(rec["bytes"]) or rec["bytes"] < 0 or not re.fullmatch(r"[0-9a-f]{64}", str(rec["sha256"])):
                out.append(f"{want}: bad size or sha256 in the manifest")
        start, stop, n, errors = e["start"], e["stop"], e["n"], e["errors"]
        if size is not None:
            end = min(sid * size + size, int(count)) if count is not None else stop
            if (start, stop) != (sid * size, end) or not start < stop <= start + size:
                out.append(f"shard {sid}: range [{start}, {stop}) is not [{sid * size}, {end})")
        if not (_is_int(n) and _is_int(errors) and n >= 0 and errors >= 0 and n + errors == stop - start):
            out.append(f"shard {sid}: n={n} and errors={errors} do not add up to its {stop - start} inputs")
    shards = m["shards"]
    if m["committed_shards"] != len(shards) or (m["complete"] and len(shards) != num):
        out.append(f"{len(shards)} shards listed, but committed_shards={m['committed_shards']} of {num}")
    for key, part in (("count", "n"), ("errors", "errors"), ("upscaled", "upscaled")):
        total = sum(e.get(part, 0) for e in shards)
        if m.get(key, total) != total:
            out.append(f"{key}={m.get(key)} but the shards add up to {total}")
    return out


def check_shard(root: str | Path, entry: dict[str, Any], expect: dict[str, Any], full: bool = False) -> list[str]:
    """Cross-check one committed shard's files with its entry (a manifest entry, or ``entry_of(marker)``).

    Cheap: every file exists with the recorded size, and the ``.npy`` headers say ``(n, *codes_shape)`` in the set's
    dtype and ``(n,)`` int32 labels. ``full`` adds the sha256 of every file, the number of keys, and the range of
    every id (``[0, codebook_size)``) and label (``[-1, classes)``). Paths come from the shard id, never from a
    recorded name.

    Returns:
        One line per problem (empty when the shard is intact).
    """
    folder = Path(root) / SHARD_DIR
    sid, n = int(entry["id"]), int(entry["n"])
    problems = []
    for part in PARTS:
        name = shard_file_name(sid, part)
        rec, f = entry["files"][part], folder / name
        if not f.is_file():
            problems.append(f"{name}: missing")
            continue
        size = f.stat().st_size
        if size != rec["bytes"]:
            problems.append(f"{name}: size {size} != {rec['bytes']} recorded")
            continue
        if full and sha256_file(f) != rec["sha256"]:
            problems.append(f"{name}: sha256 mismatch (the file changed after it was written)")
            continue
        problems += _check_content(f, part, n, expect, full)
    return problems


def _check_content(f: Path, part: str, n: int, expect: dict[str, Any], full: bool) -> list[str]:
    if part == "keys":
        lines = f.read_bytes().count(b"\n") if full else n
        return [] if lines == n else [f"{f.name}: {lines} keys for {n} items"]
    try:
        shape, dtype = npy_header(f)
    except (OSError, ValueError) as e:
        return [f"{f.name}: not a readable .npy ({e})"]
    want = ((n, *expect["codes_shape"]), expect["dtype"]) if part == "codes" else ((n,), np.dtype(np.int32))
    if (shape, dtype) != want:
        return [f"{f.name}: holds {dtype} {shape}, the manifest says {want[1]} {want[0]}"]
    if not full or n == 0:
        return []
    arr = np.load(f, mmap_mode="r", allow_pickle=False)
    lo, hi = int(arr.min()), int(arr.max())
    top = expect["limit"] if part == "codes" else (expect["classes"] or 2**31)
    bottom = 0 if part == "codes" else -1
    if lo < bottom or hi >= top:
        what = "id" if part == "codes" else "label"
        return [f"{f.name}: {what} {lo if lo < bottom else hi} outside [{bottom}, {top})"]
    return []


def repair_command(root: str | Path, facts: dict[str, Any]) -> str:
    """The ``tokkit encode ... --repair`` command that re-encodes exactly the broken shards of the set at ``root``.

    Built from what the manifest (or plan.json) records of the last run: checkpoint, data, shard size, views,
    batch size, workers, device and error budget, so that the repaired shards equal an intact run byte for byte.
    """
    try:
        run, src = facts.get("run") or {}, facts.get("source") or {}
        args = ["tokkit", "encode", str(run.get("checkpoint") or "CHECKPOINT"), str(src.get("root") or "DATA")]
        args += ["--out", str(root)]
        views = (facts.get("views") or {}).get("name")
        for flag, value in (("--shard-size", facts.get("shard_size")), ("--views", views if views != "none" else None),
                            ("--batch-size", run.get("batch_size")), ("--workers", run.get("workers")),
                            ("--device", run.get("device")), ("--decode", run.get("decode")),
                            ("--max-errors", run.get("max_errors"))):  # fmt: skip
            if value is not None:
                args += [flag, str(value)]
        for key, value in (src.get("options") or {}).items():  # --image-key, --label-key, --split
            args += ["--" + key.replace("_", "-"), str(value)]
    except (AttributeError, TypeError):
        args = ["tokkit", "encode", "CHECKPOINT", "DATA", "--out", str(root)]
    return shlex.join([*args, "--repair"])


# ---------------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A shard set's manifest (``path`` is the folder or its ``manifest.json``); ShardError when absent or not ours."""
    p = Path(path)
    if not p.exists():
        raise ShardError(f"no shard set at {p}: the path does not exist (check it, or run tokkit encode --out {p})")
    mpath = p / MANIFEST if p.is_dir() else p
    if not mpath.is_file():
        ours = (mpath.parent / PLAN).exists() or (mpath.parent / SHARD_DIR).is_dir()
        hint = " (the encode is unfinished or lost its manifest: run the same tokkit encode again)" if ours else ""
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
    lazily in each process (safe with DataLoader workers, fork or spawn). Opening runs the cheap checks
    (``check_manifest``, and ``check_shard`` on every shard: sizes and ``.npy`` headers); each item's ids are
    range-checked as they are read.

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
        problems = check_manifest(self.manifest)
        self._expect = expected_facts(self.manifest) if not problems else {}
        for s in self.manifest["shards"] if not problems else []:
            problems += check_shard(self.root, s, self._expect)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ShardError(f"{self.root}: {problems[0]}{more}; run tokkit verify {self.root}")
        self.num_views = int(self.manifest.get("views", {}).get("count", 1))
        if isinstance(view, int) and not 0 <= view < self.num_views:
            raise ShardError(f"view {view} out of range: {self.root} stores {self.num_views} view(s)")
        if not isinstance(view, int) and view not in ("random", "all"):
            raise ShardError(f"view must be 'random', 'all' or an index, got {view!r}")
        self.view = view
        self.seed = seed
        self._shards = [s for s in self.manifest["shards"] if s["n"] > 0]
        self._offsets = np.cumsum([0] + [s["n"] for s in self._shards])
        self.labels = np.concatenate(
            [np.load(self._path(s, "labels"), allow_pickle=False) for s in self._shards] or [np.zeros(0, np.int32)]
        )
        self._codes: dict[int, np.ndarray] = {}
        self._pid = -1
        self._keys: list[str] | None = None

    def _path(self, shard: dict[str, Any], part: str) -> Path:
        return self.root / SHARD_DIR / shard_file_name(shard["id"], part)

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
            self._codes[j] = np.load(self._path(self._shards[j], "codes"), mmap_mode="r", allow_pickle=False)
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
        ids = np.array(codes, dtype=np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self._expect["limit"]):
            name = shard_file_name(self._shards[j]["id"], "codes")
            raise ShardError(f"{name} row {row}: a token id outside [0, {self._expect['limit']}); run tokkit verify")
        return torch.from_numpy(ids), int(self.labels[i])

    @property
    def keys(self) -> list[str]:
        """Source key of every item, in order."""
        if self._keys is None:
            keys: list[str] = []
            for s in self._shards:
                lines = [ln for ln in self._path(s, "keys").read_text().splitlines() if ln]
                if len(lines) != s["n"]:
                    name = shard_file_name(s["id"], "keys")
                    raise ShardError(f"{name}: {len(lines)} keys for {s['n']} items; run tokkit verify {self.root}")
                keys += [json.loads(line)["key"] for line in lines]
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

    Raises:
        ShardError: not a shard set, incomplete (without ``allow_incomplete``), or the manifest, the files and their
            ``.npy`` headers disagree (tampered or damaged: ``tokkit verify`` names every problem).
    """
    return ShardDataset(path, view=view, seed=seed, allow_incomplete=allow_incomplete)


# ---------------------------------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    """Outcome of ``verify``: ``problems`` names every mismatch (empty when the set is intact).

    ``repair`` is the command that fixes what ``problems`` lists (``tokkit encode ... --repair``).
    """

    path: Path
    shards: int = 0
    files: int = 0
    bytes: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)
    repair: str = ""

    @property
    def ok(self) -> bool:
        """True when every file matches and the set is complete."""
        return not self.problems and self.complete


def verify(path: str | Path, reporter: Any = None) -> VerifyResult:
    """Check a shard set completely: the manifest against itself, its commit markers, every file and its content.

    The manifest's own sha256 and facts (``check_manifest``); each listed shard's ``done.json`` against its manifest
    entry and the plan id; each file's size, sha256, ``.npy`` header, key count and id / label ranges
    (``check_shard(full=True)``); ``errors.jsonl`` against the error count; ``plan.json`` against the plan id.

    Args:
        path: the shard set folder.
        reporter: optional ``tokkit.progress.Reporter``.

    Returns:
        A ``VerifyResult``; each problem is one line naming the file or fact; ``repair`` is the command that fixes them.

    Raises:
        ShardError: ``path`` is not a shard set (neither manifest.json nor plan.json).
    """
    from tokkit.progress import resolve

    rep = resolve(reporter)
    root = Path(path)
    try:
        manifest = read_manifest(root)
    except ShardError as e:
        plan = read_json(root / PLAN)
        if not isinstance(plan, dict):
            raise
        return VerifyResult(root, problems=[str(e)], repair=repair_command(root, plan))
    res = VerifyResult(root, complete=bool(manifest.get("complete")), repair=repair_command(root, manifest))
    if not res.complete:
        res.problems.append(
            f"incomplete: {manifest.get('committed_shards')} of {manifest.get('num_shards')} shards committed"
        )
    res.problems += check_manifest(manifest)
    if len(res.problems) > int(not res.complete):
        return res  # the manifest itself cannot be trusted: do not follow it to the files
    expect = expected_facts(manifest)
    rep.start("verify", len(manifest["shards"]))
    for k, s in enumerate(manifest["shards"]):
        done = read_json(root / SHARD_DIR / f"{shard_name(s['id'])}{DONE}")
        if not isinstance(done, dict):
            res.problems.append(f"{shard_name(s['id'])}{DONE}: missing or unreadable (the shard is not committed)")
        else:
            try:
                differ = [k for k, v in entry_of(done).items() if s.get(k) != v]
            except (KeyError, TypeError):
                differ = ["(malformed)"]
            differ += ["plan_id"] if done.get("plan_id") != manifest.get("plan_id") else []
            if differ:
                res.problems.append(f"{shard_name(s['id'])}{DONE} and the manifest differ in {', '.join(differ)}")
        res.problems += check_shard(root, s, expect, full=True)
        for part in PARTS:
            f = root / SHARD_DIR / shard_file_name(s["id"], part)
            if f.is_file():
                res.files += 1
                res.bytes += f.stat().st_size
        res.shards += 1
        rep.advance(k + 1)
    rep.stop()
    try:
        logged = (root / ERRORS).read_bytes().count(b"\n")
    except OSError:
        logged = None
    if logged is not None and logged < manifest.get("errors", 0):
        res.problems.append(f"{ERRORS}: {logged} lines for {manifest.get('errors')} unreadable inputs")
    plan = read_json(root / PLAN)
    if isinstance(plan, dict) and plan.get("plan_id") != manifest.get("plan_id"):
        res.problems.append(f"{PLAN} and {MANIFEST} name different plans")
    return res


def describe(path: str | Path) -> dict[str, Any]:
    """A summary of a shard set for ``tokkit info``: manifest facts plus bytes on disk.

    ``problems`` lists what the cheap manifest checks found (``check_manifest``; files are not read).
    """
    root = Path(path)
    m = read_manifest(root)
    problems = check_manifest(m)
    try:
        total = sum(int(rec["bytes"]) for s in m["shards"] for rec in s["files"].values())
    except (KeyError, TypeError, ValueError, AttributeError):
        total = None
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
        "problems": problems,
    }


__all__ = [
    "FORMAT",
    "as_codes",
    "check_manifest",
    "check_shard",
    "remove_temporaries",
    "temporaries",
    "temporaries_of",
    "repair_command",
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
