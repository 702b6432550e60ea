"""A run folder's saved state: ``train_state/`` and ``checkpoint/`` written as one commit, verified when read back.

``TrainState`` is what a run is at a step (models, optimizers, schedulers, EMA, step, data position, RNG); its
``state_dict`` / ``load_state_dict`` pair turns it into one dict and back, both from the one list ``TrainState.PARTS``,
so what is saved and what is restored cannot drift apart. ``save_run_state`` and ``load_run_state`` are the one pair
that writes and reads that dict (the ``model`` / ``ema`` / ``disc`` weights as safetensors, the rest as ``state.pt``).
A save is one commit, in this order (rank 0 only)::

    1. .train_state.tmp-ID/   model/ema/disc.safetensors, state.pt, manifest.json (sha256 of every file); fsynced
    2. .checkpoint.tmp-ID/    model.safetensors + config.json (the EMA weights, ``tokkit.load``-able); fsynced
    3. save.json              the commit record (tmp file + fsync + rename): the step and the folders to swap
    4. swap                   train_state/ -> .train_state.old-ID/, .train_state.tmp-ID/ -> train_state/; the same
                              for checkpoint/
    5. clean-up               save.json removed, then the .old-ID folders deleted

A kill before step 3 leaves the previous pair in place (the temporary folders are an unfinished save, discarded by
``recover``); a kill after it is finished by ``recover`` (steps 4-5 again, each skipped when already done). So both
folders always reflect the same step, and an old copy is deleted only once the new one is in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tokkit.checkpoint import fsync_dir, read_checkpoint_meta, write_checkpoint_dir, write_durable
from tokkit.errors import CheckpointError
from tokkit.runtime import check_torch_version

STATE, CKPT, COMMIT = "train_state", "checkpoint", "save.json"
STATE_FORMAT, COMMIT_FORMAT = "tokkit-train-state/1", "tokkit-save/1"
MANIFEST = "manifest.json"
WEIGHT_KEYS = ("model", "ema", "disc")  # state[key] (a state dict) <-> train_state/<key>.safetensors


@dataclass
class TrainState:
    """A run at a step: what ``--resume`` restores, and nothing else.

    Attributes:
        model: the tokenizer being trained (never a compiled or DDP wrapper: its state dict keys are the plain ones).
        opt, sched: its AdamW and learning-rate schedule.
        usage_counts: (K,) int64 code counts since the last evaluation (all ranks add theirs at evaluation).
        ema, disc, d_opt, d_sched, lecam: the EMA copy, discriminator, its optimizer and schedule, LeCam anchors (None
            when off).
        step: optimizer steps done.
        consumed: batches this rank has drawn (its data position).
        bad: indices of unreadable training images seen so far.
    """

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    usage_counts: Tensor
    ema: nn.Module | None = None
    disc: nn.Module | None = None
    d_opt: torch.optim.Optimizer | None = None
    d_sched: Any = None
    lecam: nn.Module | None = None
    step: int = 0
    consumed: int = 0
    bad: set[int] = field(default_factory=set)

    PARTS = ("model", "ema", "disc", "opt", "sched", "d_opt", "d_sched", "lecam")  # objects with a state dict

    def state_dict(self, gather: Callable[[Any], list[Any]] = lambda x: [x]) -> dict[str, Any]:
        """One dict (what ``save_run_state`` writes); ``gather`` collects a per-rank value from every rank."""
        consumed = gather(self.consumed)
        state = {"step": self.step, "consumed": consumed, "rng": gather(rng_state()), "bad": sorted(self.bad),
                 "usage_counts": self.usage_counts.cpu(), "world_size": len(consumed)}
        for key in self.PARTS:
            part = getattr(self, key)
            state[key] = None if part is None else part.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], rank: int, where: Path) -> None:
        """The inverse of ``state_dict`` on rank ``rank`` (RNG and data position are per rank).

        Raises:
            CheckpointError: a state this run cannot use (other parts, other shapes), naming ``where``.
        """
        try:
            for key in self.PARTS:
                part = getattr(self, key)
                if part is not None:
                    if state.get(key) is None:
                        raise KeyError(f"{key} missing")
                    if isinstance(part, nn.Module):
                        part.load_state_dict(state[key], strict=True)
                    else:
                        part.load_state_dict(state[key])
            self.step, self.consumed, self.bad = int(state["step"]), int(state["consumed"][rank]), set(state["bad"])
            self.usage_counts = state["usage_counts"].to(self.usage_counts.device)
            set_rng_state(state["rng"][rank])
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot resume from {where} ({type(e).__name__}: {first}): start a new run without "
                                  "--resume") from None


def rng_state() -> dict[str, Any]:
    """This process's RNG streams (torch, CUDA, numpy, python), as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """The inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], *state["numpy_gauss"]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_run_state(out: str | Path, state: dict[str, Any], config: Any, extra: dict[str, Any] | None = None) -> None:
    """Save the run state into ``out`` as one commit (see the module docstring); call on rank 0 only.

    Args:
        out: the run folder.
        state: the run state; ``state["step"]`` is its step; ``state["model"]`` (and ``"ema"``, ``"disc"`` when
            present) are state dicts; every other entry must load with ``torch.load(weights_only=True)``.
        config: the ``TokenizerConfig`` of ``state["model"]``, for the checkpoint (EMA weights when present).
        extra: JSON-able notes for the checkpoint's config.json ``extra``, beside the step (e.g. ``init_from``).

    Raises:
        OSError: the disk is full or the folder not writable; the unfinished save is removed first, and the previous
            save stays the run's state.
    """
    from safetensors.torch import save

    out = Path(out)
    tag = uuid.uuid4().hex[:8]
    tmp_state, tmp_ckpt = out / f".{STATE}.tmp-{tag}", out / f".{CKPT}.tmp-{tag}"
    step = int(state["step"])
    committed = False
    try:
        tmp_state.mkdir()
        files = {}
        for key in WEIGHT_KEYS:
            if state.get(key) is not None:
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in state[key].items()}
                files[f"{key}.safetensors"] = save(tensors)
        buf = io.BytesIO()
        torch.save({k: v for k, v in state.items() if k not in WEIGHT_KEYS}, buf)
        files["state.pt"] = buf.getvalue()
        for name, blob in files.items():
            write_durable(tmp_state / name, blob)
        manifest = {"format": STATE_FORMAT, "step": step,
                    "files": {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}}
        write_durable(tmp_state / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        fsync_dir(tmp_state)
        write_checkpoint_dir(tmp_ckpt, state["ema"] if state.get("ema") is not None else state["model"], config,
                             extra={"step": step, **(extra or {})})
        fsync_dir(out)
        record = {"format": COMMIT_FORMAT, "step": step, "swap": [
            {"new": tmp_state.name, "dest": STATE, "old": f".{STATE}.old-{tag}"},
            {"new": tmp_ckpt.name, "dest": CKPT, "old": f".{CKPT}.old-{tag}"},
        ]}  # fmt: skip
        tmp_record = out / f".{COMMIT}.tmp-{tag}"
        write_durable(tmp_record, (json.dumps(record, indent=2) + "\n").encode())
        os.replace(tmp_record, out / COMMIT)
        committed = True
        fsync_dir(out)
        _roll_forward(out, record)
    except OSError:
        if not committed:  # an unfinished save is worth nothing: leave no half-written folder behind
            for p in (tmp_state, tmp_ckpt, out / f".{COMMIT}.tmp-{tag}"):
                _remove(p)
        raise


def _roll_forward(out: Path, record: dict[str, Any]) -> None:
    """Finish a committed save: swap each new folder into place (skipping what is done), then drop the old ones."""
    for item in record["swap"]:
        new, dest, old = out / item["new"], out / item["dest"], out / item["old"]
        if new.is_dir():
            if dest.exists():
                os.replace(dest, old)
            os.replace(new, dest)
        elif not dest.is_dir():
            raise CheckpointError(
                f"{out} is damaged: the save of step {record.get('step')} lost both {item['new']} and {item['dest']}/ "
                "(moved or deleted by hand?); restore them or start a new run (another --out)"
            )
    fsync_dir(out)
    (out / COMMIT).unlink()
    for item in record["swap"]:
        _remove(out / item["old"])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


def recover(out: str | Path) -> list[str]:
    """Bring a run folder to its last committed save after a kill; call on rank 0 before reading anything.

    A commit record (``save.json``) means a save was committed but maybe not swapped into place: it is finished
    (rolled forward). Without one, temporary folders are an unfinished save and are removed (rolled back to the previous
    save, which is in place). A lone ``.NAME.old-ID`` where ``NAME/`` is missing (a swap cut outside a commit) is put
    back. Nothing is removed that is the only complete copy of a committed save.

    Returns:
        One line per repair made (for the user), empty when the folder was clean.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    notes = []
    commit = out / COMMIT
    if commit.is_file():
        try:
            record = json.loads(commit.read_text())
            assert record["format"] == COMMIT_FORMAT and len(record["swap"]) == 2
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(
                f"{commit} is unreadable, so the last save cannot be finished safely: move it away to fall back to the "
                f"previous save, then resume"
            ) from None
        _roll_forward(out, record)
        notes.append(f"finished saving step {record['step']} (the previous run was stopped while saving it)")
    unfinished = False
    for name in (STATE, CKPT):
        dest = out / name
        olds = sorted(out.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if not dest.exists() and olds:
            os.replace(olds.pop(), dest)
            notes.append(f"put back {name}/ (the previous run was stopped while replacing it)")
        tmps = list(out.glob(f".{name}.tmp-*"))
        unfinished = unfinished or bool(tmps)
        for p in olds + tmps:
            _remove(p)
    if unfinished:
        notes.append("discarded an unfinished save (the previous run was stopped before committing it)")
    for p in out.glob(f".{COMMIT}.tmp-*"):
        _remove(p)
    if notes:
        fsync_dir(out)
    return notes


def has_run_state(out: str | Path) -> bool:
    """True when ``out`` holds a saved run state (``train_state/``), verified or not."""
    return (Path(out) / STATE / MANIFEST).is_file() or (Path(out) / STATE / "state.pt").is_file()


def load_run_state(out: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read back what ``save_run_state`` wrote, after checking the sha256 of every file against the manifest.

    Returns:
        The run state dict (``model`` / ``ema`` / ``disc`` as state dicts, the rest as saved).

    Raises:
        CheckpointError: a missing manifest or file, a sha256 mismatch, or a file that does not load.
    """
    from safetensors.torch import load

    folder = Path(out) / STATE
    fix = "restore the run folder from a copy, or start a new run (another --out)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        assert manifest["format"] == STATE_FORMAT and isinstance(files, dict) and "state.pt" in files
    except FileNotFoundError:
        raise CheckpointError(f"cannot resume from {folder}: it has no {MANIFEST} to verify it by; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"cannot resume from {folder}: {MANIFEST} is unreadable; {fix}") from None
    blobs = {}
    for name, sha in files.items():
        try:
            blobs[name] = (folder / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot resume from {folder}: {name} is missing or unreadable ({e.strerror}); "
                                  f"{fix}") from None
        if hashlib.sha256(blobs[name]).hexdigest() != sha:
            raise CheckpointError(f"cannot resume from {folder}: {name} does not match the sha256 in {MANIFEST} "
                                  f"(corrupt or replaced); {fix}")
    check_torch_version()  # weights_only is only safe from torch 2.10 on
    try:
        state = torch.load(io.BytesIO(blobs.pop("state.pt")), map_location=map_location, weights_only=True)
        for name, blob in blobs.items():
            key = name.removesuffix(".safetensors")
            if key in WEIGHT_KEYS:
                state[key] = load(blob)
    except Exception as e:  # a file that hashes right but does not load: written by another tokkit
        raise CheckpointError(f"cannot resume from {folder} ({type(e).__name__}): {fix}") from None
    if int(state.get("step", -1)) != int(manifest.get("step", -2)):
        raise CheckpointError(f"cannot resume from {folder}: state.pt and {MANIFEST} disagree on the step; {fix}")
    return state


def checkpoint_matches(out: str | Path, step: int) -> bool:
    """True when ``out/checkpoint`` is intact (sha256 checked) and was saved at ``step``."""
    try:
        meta = read_checkpoint_meta(Path(out) / CKPT)
    except CheckpointError:
        return False
    return (meta.get("extra") or {}).get("step") == step


__all__ = ["TrainState", "checkpoint_matches", "has_run_state", "load_run_state", "recover", "rng_state",
           "save_run_state", "set_rng_state"]
