"""``encode_dataset``: an image dataset -> checksummed, resumable token shards (the library side of ``tokkit encode``).

The pipeline, so that reading, decoding, resizing, writing and hashing hide behind inference:

- DataLoader workers read and decode images in parallel (``ImageDataset``; JPEGs at a reduced DCT scale by default,
  or left for a batched nvjpeg decode on the GPU: ``tokkit.data.jpeg``) and hand uint8 batches over (pinned on
  GPU); unreadable inputs come back as errors, never as exceptions;
- the main thread runs ``tokenizer.encode`` (``eval()`` + ``inference_mode``, bf16 autocast on GPU);
- a background thread serializes, hashes and atomically writes each finished shard and its commit marker.

Batches never straddle shards, so a shard's batches (and its bytes) are the same in a fresh run, a resumed run, or a
run with another number of processes. Shard ``s`` goes to rank ``s % world_size``.

A rerun first removes the temporaries an interrupted write left (``.NAME.tmp-XXXXXXXX``), then re-checks every committed
shard against its commit marker (sizes and ``.npy`` headers; with ``repair`` also sha256, key counts and id ranges)
and re-encodes exactly the shards that fail, so that the result equals an intact run byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from tokkit.data import ImageDataset, ImageSource, collate_skip_bad, open_source
from tokkit.data.images import BACKGROUND
from tokkit.data.jpeg import (
    DECODE_MODES,
    DeferredJpegDataset,
    ReducedDataset,
    collate_deferred,
    decode_record,
    finish_batch,
    resolve_decode,
)
from tokkit.data.transforms import TENCROP_SCALE, VIEWS
from tokkit.distributed import owns_process_group
from tokkit.errors import ConfigError, DataError, ShardError
from tokkit.progress import Reporter, resolve
from tokkit.shards import (
    DONE,
    ERRORS,
    FORMAT,
    MANIFEST,
    PLAN,
    SHARD_DIR,
    ShardSpec,
    as_codes,
    atomic_write_bytes,
    canonical_json,
    check_shard,
    codes_dtype,
    entry_of,
    expected_facts,
    plan_id,
    plan_shards,
    read_done,
    read_json,
    remove_temporaries,
    temporaries,
    write_manifest,
    write_shard,
    writing,
)

DEFAULT_MAX_ERRORS = 0.01


@dataclass
class EncodeResult:
    """What ``encode_dataset`` did.

    Attributes:
        out: the shard set folder.
        images: images in the shard set (all committed shards).
        encoded: images encoded by this call (this rank).
        shards: committed shards / planned shards.
        resumed: shards that were already committed and skipped.
        skipped: unreadable inputs in the set (listed in errors.jsonl).
        upscaled: images smaller than the resolution (upscaled).
        seconds: wall time of this call.
        images_per_second: ``encoded / seconds`` over the encoding loop.
        complete: the manifest says complete.
        repaired: committed shards that failed their check (damaged or missing files) and were encoded again.
    """

    out: Path
    images: int
    encoded: int
    shards: tuple[int, int]
    resumed: int
    skipped: int
    upscaled: int
    seconds: float
    images_per_second: float
    complete: bool
    repaired: int = 0


def check_options(
    shard_size: int, batch_size: int, workers: int, views: str, max_errors: float | int | None, decode: str = "auto"
) -> None:
    """Range-check the numeric options up front (before any heavy work); ConfigError in one line."""
    if views not in VIEWS:
        raise ConfigError(f"unknown --views {views!r}: use one of {', '.join(VIEWS)}")
    if decode not in DECODE_MODES:
        raise ConfigError(f"unknown --decode {decode!r}: use one of {', '.join(DECODE_MODES)}")
    for flag, value, low in (
        ("--shard-size", shard_size, 1),
        ("--batch-size", batch_size, 1),
        ("--workers", workers, 0),
    ):
        if not _is_count(value, low):
            raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")
    if max_errors is not None and not (isinstance(max_errors, int | float) and math.isfinite(max_errors)):
        raise ConfigError(f"--max-errors must be a finite number >= 0, got {max_errors!r}")
    if max_errors is not None and max_errors < 0:
        raise ConfigError(f"--max-errors must be >= 0, got {max_errors}")


def _is_count(value: Any, low: int) -> bool:
    """An integer (Python or numpy, not bool) of at least ``low``."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= low
    except TypeError:
        return False


def error_budget(count: int, max_errors: float | int | None, strict: bool) -> int:
    """How many unreadable inputs are tolerated: 0 when strict; a fraction (< 1) of ``count`` rounded up; or a count."""
    if strict:
        return 0
    if max_errors is None:
        max_errors = DEFAULT_MAX_ERRORS
    if max_errors < 0:
        raise ConfigError(f"--max-errors must be >= 0, got {max_errors}")
    if max_errors < 1:
        return math.ceil(max_errors * count)
    return int(max_errors)


def build_plan(
    meta: dict[str, Any],
    tokenizer: Any,
    source: ImageSource,
    views: str,
    shard_size: int,
    run: dict[str, Any] | None = None,
    decode: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The identity of an encode: tokenizer, preprocessing (with the JPEG decoder, ``decode``), views, dtype,
    source list and shard size. ``decode`` None: a plan of before ``--decode`` (full decode, nothing recorded).

    ``run`` (checkpoint path, batch size, workers, device type, error budget) is recorded beside it, outside the
    identity, so that ``tokkit verify`` can name the exact command that repairs the set.
    """
    n_views = VIEWS[views]
    index_shape = list(tokenizer.index_shape)
    plan = {
        "format": FORMAT,
        "tokenizer": {
            "config": meta["tokenizer"],
            "checkpoint_sha256": meta["weights_sha256"],
            "codebook_size": int(tokenizer.codebook_size),
            "token_grid": list(tokenizer.token_grid),
            "index_shape": index_shape,
            "bits_per_token": float(tokenizer.bits_per_token),
        },
        "preprocessing": {
            "resolution": int(tokenizer.resolution),
            "crop": "resize shorter side to resolution (bicubic, antialiased) + center crop",
            "normalization": "uint8 RGB -> float x / 127.5 - 1 in [-1, 1]",
            "color": f"EXIF orientation applied; alpha composited on RGB{BACKGROUND}; 16-bit scaled to 8-bit",
            "views": views,
            "tencrop_scale": TENCROP_SCALE if views == "tencrop" else None,
            **({"decode": decode} if decode is not None else {}),
        },
        "views": {"name": views, "count": n_views, "axis": n_views > 1},
        "dtype": codes_dtype(int(tokenizer.codebook_size)).name,
        "codes_shape": ([n_views] if n_views > 1 else []) + index_shape,
        "class_to_idx": dict(source.class_to_idx),
        "source": {"root": source.root, "kind": source.kind, "count": len(source), "sha256": source.fingerprint(),
                   **({"options": dict(source.options)} if source.options else {})},
        "shard_size": int(shard_size),
        **({"run": run} if run else {}),
    }
    plan["plan_id"] = plan_id(_identity(plan))
    return plan


def _identity(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan without the things that may change between runs without changing the shards (source root, run)."""
    ident = dict(plan)
    ident["source"] = {k: v for k, v in plan["source"].items() if k != "root"}
    ident.pop("plan_id", None)
    ident.pop("run", None)
    return ident


def _diff_reason(old: dict[str, Any], new: dict[str, Any]) -> str:
    old_opts, new_opts = old.get("source", {}).get("options", {}), new["source"].get("options", {})
    if old_opts != new_opts:
        return f"the source options changed ({old_opts or 'defaults'} -> {new_opts or 'defaults'})"
    if old.get("source", {}).get("sha256") != new["source"]["sha256"]:
        n_old, n_new = old.get("source", {}).get("count"), new["source"]["count"]
        if n_old != n_new:
            return f"the inputs changed ({n_old} -> {n_new} inputs)"
        return f"the inputs changed ({n_new} inputs, but files were renamed, replaced or modified: size/mtime/content)"
    if old.get("tokenizer", {}).get("checkpoint_sha256") != new["tokenizer"]["checkpoint_sha256"]:
        return "the tokenizer checkpoint changed"
    keys = [k for k in ("preprocessing", "views", "dtype", "shard_size") if old.get(k) != new.get(k)]
    return f"the settings changed ({', '.join(keys) or 'plan'})"


def _keep_legacy_dtype(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """A set begun with the old int32 dtype (codebooks of 2^16 to 2^31 codes) resumes in int32, which holds them."""
    old = read_json(out / PLAN)
    if not isinstance(old, dict) or old.get("dtype") != "int32" or plan["dtype"] == "int32":
        return plan
    if plan["tokenizer"]["codebook_size"] > 2**31:
        return plan
    legacy = {**plan, "dtype": "int32"}
    legacy["plan_id"] = plan_id(_identity(legacy))
    return legacy if legacy["plan_id"] == old.get("plan_id") else plan


def _legacy_decode(out: Path, requested: str) -> bool:
    """True when ``out`` holds a plan written before ``--decode`` existed (full decode, not recorded) and the request
    (``auto`` or ``full``) lets it resume as such."""
    old = read_json(out / PLAN)
    return (
        requested in ("auto", "full")
        and isinstance(old, dict)
        and isinstance(old.get("preprocessing"), dict)
        and "decode" not in old["preprocessing"]
    )


def prepare_out(out: Path, plan: dict[str, Any], overwrite: bool) -> str | None:
    """Create ``out`` with ``plan.json``, accept a resume of the same plan, or return why it is refused.

    Temporaries of ours left by an interrupted write are removed first (only in a folder that is ours or holds
    nothing else), so that a folder left by ``kill -9`` while ``plan.json`` was written is simply resumed. A lost or
    unreadable ``plan.json`` is rewritten when the commit markers name this very plan.
    """
    plan_path = out / PLAN
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file: choose a folder"
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        ours = {p.name for p in temporaries(out) if p.parent == out}
        if entries & {PLAN, MANIFEST, SHARD_DIR} or entries <= ours:
            remove_temporaries(out)
    old = read_json(plan_path)
    if isinstance(old, dict) and old.get("plan_id") == plan["plan_id"]:
        return None
    if out.is_dir() and any(out.iterdir()):
        if isinstance(old, dict):
            if not overwrite:
                reason = _diff_reason(old, plan)
                return f"{out} holds shards of another plan: {reason}; pass --overwrite or another --out"
        elif not (out / MANIFEST).exists() and not (out / SHARD_DIR).exists() and not plan_path.exists():
            return f"--out {out} exists and is not a tokkit shard set: choose a new or empty folder"
        elif _markers_match(out, plan):
            atomic_write_bytes(plan_path, canonical_json(plan).encode())
            return None
        elif not overwrite:
            return f"{out} holds shards without a readable plan.json: pass --overwrite or another --out"
        _clean(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan_path, canonical_json(plan).encode())
    return None


def _markers_match(out: Path, plan: dict[str, Any]) -> bool:
    """True when ``out/shards`` holds commit markers and every readable one belongs to ``plan``."""
    markers = [read_json(p) for p in (out / SHARD_DIR).glob(f"*{DONE}")]
    ids = [d.get("plan_id") for d in markers if isinstance(d, dict) and d.get("plan_id") is not None]
    return bool(ids) and all(i == plan["plan_id"] for i in ids)


def _clean(out: Path) -> None:
    with writing(out):
        for name in (PLAN, MANIFEST, ERRORS):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SHARD_DIR, ignore_errors=True)


def check_committed(out: Path, plan: dict[str, Any], specs: list[ShardSpec], full: bool) -> list[int]:
    """Ids of the committed shards whose files fail ``check_shard`` (``full``: also sha256, keys, id ranges)."""
    expect = expected_facts(plan)
    bad = []
    for s in specs:
        done = read_done(out, s, plan["plan_id"])
        if done is None:
            continue
        try:
            entry = entry_of(done)
            problems = check_shard(out, entry, expect, full)
            if entry["n"] + entry["errors"] != s.stop - s.start:
                problems.append("counts")
        except (KeyError, TypeError, ValueError):
            problems = ["malformed commit marker"]
        if problems:
            bad.append(s.id)
    return bad


def _uncommit(out: Path, specs: list[ShardSpec], bad: list[int], plan: dict[str, Any]) -> None:
    """Forget the commit of the ``bad`` shards (they are encoded again), the manifest first if it lists any pending
    shard, so that an interrupted repair never leaves a manifest that vouches for a shard being rewritten."""
    manifest = read_json(out / MANIFEST)
    entries = manifest.get("shards", []) if isinstance(manifest, dict) else []
    listed = {e.get("id") for e in entries if isinstance(e, dict)}
    pending = set(bad) | {s.id for s in specs if read_done(out, s, plan["plan_id"]) is None}
    with writing(out):
        if (out / MANIFEST).exists() and (pending & listed or not isinstance(manifest, dict)):
            (out / MANIFEST).unlink()
        for sid in bad:
            (out / SHARD_DIR / f"{specs[sid].name}{DONE}").unlink(missing_ok=True)


def _batches(specs: list[ShardSpec], batch_size: int) -> tuple[list[list[int]], list[tuple[ShardSpec, bool]]]:
    """Index batches that never straddle shards, and for each its shard and whether it closes the shard."""
    batches, meta = [], []
    for s in specs:
        starts = list(range(s.start, s.stop, batch_size))
        for k, a in enumerate(starts):
            batches.append(list(range(a, min(a + batch_size, s.stop))))
            meta.append((s, k == len(starts) - 1))
    return batches, meta


class _ShardBuffer:
    """Rows of the shard being assembled."""

    def __init__(self) -> None:
        self.codes: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.indices: list[int] = []
        self.errors: list[dict[str, Any]] = []
        self.upscaled = 0


@owns_process_group
def encode_dataset(
    checkpoint: str | Path,
    data: str | Path | ImageSource,
    out: str | Path,
    *,
    shard_size: int = 10000,
    batch_size: int = 64,
    workers: int = 2,
    views: str = "none",
    device: str = "auto",
    max_errors: float | int | None = DEFAULT_MAX_ERRORS,
    strict: bool = False,
    overwrite: bool = False,
    repair: bool = False,
    decode: str = "auto",
    reporter: Reporter | None = None,
    source_options: dict[str, Any] | None = None,
) -> EncodeResult:
    """Encode every image of ``data`` with the tokenizer at ``checkpoint`` into token shards under ``out``.

    Args:
        checkpoint: tokenizer checkpoint folder.
        data: image folder, zip, txt list, npy/npz, ``sample``, or an ``ImageSource``.
        out: shard set folder (created; resumed when it holds the same plan).
        shard_size: inputs per shard (the last one shorter).
        batch_size: images per forward pass (per view set).
        workers: DataLoader worker processes decoding images.
        views: ``none``, ``flip`` (2 views) or ``tencrop`` (10), stored as a views axis.
        device: ``auto``, ``cpu``, ``cuda``...; under torchrun each rank takes its local GPU.
        max_errors: unreadable inputs tolerated: a fraction of the inputs (< 1) or a count (>= 1).
        strict: tolerate no unreadable input.
        overwrite: replace a shard set of another plan (input list, tokenizer or settings changed).
        repair: re-hash every committed shard (not only its sizes and headers) and re-encode those that fail.
        decode: JPEG decoding (``tokkit.data.jpeg``): ``auto`` (libjpeg DCT scaling down to 2x the resolution;
            ``full`` for a set begun before this option), ``full``, ``reduced`` (DCT scaling down to the resolution)
            or ``gpu`` (nvjpeg on the CUDA device, Pillow-exact resize there). Recorded in the plan: resuming with
            another is refused.
        reporter: progress sink.
        source_options: keyword arguments of ``open_source`` for ``data`` (``image_key``, ``label_key``, ``split``,
            ``kind``); the chosen ones are recorded in the plan, so that a resume with others is refused.

    Returns:
        An ``EncodeResult`` (on every rank; rank 0 writes the manifest).

    Raises:
        ConfigError: an option out of range (checked before any heavy work).
        ShardError: ``out`` holds another plan (without ``overwrite``), or a write failed (no space, read-only ...):
            committed shards are kept and the same call resumes.
        DataError: too many unreadable inputs (committed shards are kept), or unreadable ``data``.
        CheckpointError: bad checkpoint.
    """
    from tokkit import distributed as tdist
    from tokkit.models.tokenizer import load_with_meta

    t0 = time.perf_counter()
    rep = resolve(reporter)
    check_options(shard_size, batch_size, workers, views, max_errors, decode)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file: choose a folder")
    info = tdist.init_distributed(device)
    rank, world, dev = info.rank, info.world_size, info.device
    mode = "full" if _legacy_decode(out, decode) else resolve_decode(decode, dev)
    model, meta = load_with_meta(checkpoint, device=dev)  # verifies the weights' sha256 once
    source = data if isinstance(data, ImageSource) else open_source(data, **(source_options or {}))
    budget_option = 0.0 if strict else float(DEFAULT_MAX_ERRORS if max_errors is None else max_errors)
    run = {"checkpoint": str(Path(checkpoint).resolve()), "batch_size": batch_size, "workers": workers,
           "device": dev.type, "max_errors": budget_option, "decode": decode}  # fmt: skip
    record = None if mode == "full" and _legacy_decode(out, decode) else decode_record(mode)
    plan = _keep_legacy_dtype(out, build_plan(meta, model, source, views, shard_size, run, record))
    specs = plan_shards(len(source), shard_size)
    budget = error_budget(len(source), max_errors, strict)

    refusal, repaired = None, []
    if rank == 0:
        try:
            refusal = prepare_out(out, plan, overwrite)
            if refusal is None:
                repaired = check_committed(out, plan, specs, full=repair)
                _uncommit(out, specs, repaired, plan)
        except ShardError as e:  # a failed write: every rank must hear of it
            refusal = str(e)
    refusal, repaired = tdist.broadcast_object((refusal, repaired))
    if refusal:
        raise ShardError(str(refusal))
    tdist.barrier()
    dones = [read_done(out, s, plan["plan_id"]) for s in specs]
    resumed = sum(d is not None for d in dones)
    pending = [s for s in specs if dones[s.id] is None and s.id % world == rank]
    prior_errors = sum(len(d["errors"]) for d in dones if d is not None)

    dtype = np.dtype(plan["dtype"])
    n_views = plan["views"]["count"]
    if mode in ("reduced", "auto"):
        dataset = ReducedDataset(source, model.resolution, views=views, margin=2 if mode == "auto" else 1)
    else:
        dataset = (DeferredJpegDataset if mode == "gpu" else ImageDataset)(source, model.resolution, views=views)
    batches, batch_meta = _batches(pending, batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_deferred if mode == "gpu" else collate_skip_bad,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    total_inputs = sum(s.stop - s.start for s in pending)
    rep.start(f"encode {len(pending)} shards" + (f" (rank {rank}/{world})" if world > 1 else ""), total_inputs)

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokkit-shard-writer")
    futures: list[Future] = []
    buf = _ShardBuffer()
    new_errors = encoded = done_inputs = 0
    t_loop = time.perf_counter()
    try:
        with torch.inference_mode():
            for (spec, closes), batch in zip(batch_meta, loader, strict=True):
                if mode == "gpu":  # (B[, V], 3, r, r) uint8 on the device: nvjpeg + resize there
                    batch = finish_batch(batch, model.resolution, views, dev, source.keys)
                images = batch["images"]
                if len(images):
                    x = images.to(dev, non_blocking=True)
                    x = x.reshape(-1, *x.shape[-3:])  # (B[, V], 3, r, r) -> (B*V, 3, r, r)
                    x = x.float().div_(127.5).sub_(1.0)
                    with autocast:
                        ids = model.encode(x)  # (B*V, *index_shape)
                    ids = ids.reshape(len(images), *plan["codes_shape"])  # -> (B[, V], *index_shape)
                    buf.codes.append(as_codes(ids.to("cpu").numpy(), dtype, plan["tokenizer"]["codebook_size"]))
                    buf.labels.append(batch["labels"].numpy())
                    buf.indices += batch["indices"].tolist()
                    encoded += len(images)
                buf.upscaled += int(batch["upscaled"])
                for idx, reason in batch["errors"]:
                    buf.errors.append({"index": idx, "key": source.keys[idx], "reason": reason})
                    new_errors += 1
                if prior_errors + new_errors > budget:
                    raise _TooManyErrors()
                done_inputs += len(batch["images"]) + len(batch["errors"])
                if closes:
                    futures.append(writer.submit(_commit, out, spec, buf, source, views, dtype, plan, n_views))
                    buf = _ShardBuffer()
                    _raise_failed(futures)
                elapsed = time.perf_counter() - t_loop
                rep.advance(done_inputs, **{"img/s": done_inputs / max(elapsed, 1e-9), "skipped": new_errors})
    except _TooManyErrors:
        _drain(writer, futures)
        rep.stop()
        extra = list(buf.errors)
        if rank == 0:
            _final_manifest(out, plan, specs, extra_errors=extra)
        raise DataError(
            f"{prior_errors + new_errors} unreadable inputs exceed the limit of {budget} "
            f"({'--strict' if strict else f'--max-errors {max_errors}'}); see {out / ERRORS}; committed shards are "
            "kept: fix or remove the files, or raise --max-errors, and run again"
        ) from None
    except BaseException:
        _drain(writer, futures)  # finished shards stay committed; the one in progress is redone on resume
        rep.stop()
        raise
    _drain(writer, futures)
    loop_s = time.perf_counter() - t_loop
    rep.stop()

    tdist.barrier()
    manifest = _final_manifest(out, plan, specs) if rank == 0 else None
    manifest = tdist.broadcast_object(manifest)
    if manifest["errors"] > budget:
        raise DataError(
            f"{manifest['errors']} unreadable inputs exceed the limit of {budget}; see {out / ERRORS}; committed "
            "shards are kept: fix or remove the files, or raise --max-errors, and run again"
        )
    return EncodeResult(
        out=out,
        images=int(manifest["count"]),
        encoded=encoded,
        shards=(int(manifest["committed_shards"]), int(manifest["num_shards"])),
        resumed=resumed,
        skipped=int(manifest["errors"]),
        upscaled=int(manifest["upscaled"]),
        seconds=time.perf_counter() - t0,
        images_per_second=encoded / max(loop_s, 1e-9),
        complete=bool(manifest["complete"]),
        repaired=len(repaired),
    )


class _TooManyErrors(Exception):
    pass


def _commit(
    out: Path, spec: ShardSpec, buf: _ShardBuffer, source: ImageSource, views: str, dtype: np.dtype, plan, n_views
) -> dict[str, Any]:
    """Background thread: assemble and write one shard (serialize, hash, atomic rename, commit marker)."""
    shape = tuple(plan["codes_shape"])
    codes = np.concatenate(buf.codes) if buf.codes else np.zeros((0, *shape), dtype)
    labels = np.concatenate(buf.labels).astype(np.int32) if buf.labels else np.zeros(0, np.int32)
    keys = [{"key": source.keys[i], "index": i, "view": views} for i in buf.indices]
    size = plan["tokenizer"]["codebook_size"]
    return write_shard(out, spec, codes, labels, keys, buf.errors, buf.upscaled, plan["plan_id"], size)


def _raise_failed(futures: list[Future]) -> None:
    for f in futures:
        if f.done() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


def _drain(writer: ThreadPoolExecutor, futures: list[Future]) -> None:
    writer.shutdown(wait=True)
    _raise_failed(futures)


def _final_manifest(
    out: Path, plan: dict[str, Any], specs: list[ShardSpec], extra_errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    dones = [read_done(out, s, plan["plan_id"]) for s in specs]
    manifest = write_manifest(out, plan, dones)
    if extra_errors:  # errors of the shard that stopped the run, so that the user sees them all
        with writing(out / ERRORS), open(out / ERRORS, "a") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in extra_errors)
    return manifest


__all__ = ["EncodeResult", "build_plan", "check_committed", "check_options", "encode_dataset", "error_budget"]
