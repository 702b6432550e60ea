"""A save is one commit: kill `tokkit train` just before each file operation of its final save, resume it with the same
command, and get checkpoint/ and train_state/ at the final step, equal to an uninterrupted run (tests/killpoints.py).

A kill just before an ``fsync`` leaves exactly the files that a kill just before the next operation leaves (an fsync
changes what survives a power cut, not what a process started after a kill sees), so those kill points are covered by
the next one and are not run twice: every other operation of the save is a kill point.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_train_sets
from killpoints import first_op, op_indices, run_tokkit
from safetensors.torch import load_file
from typer.testing import CliRunner

from tokkit.cli.app import app

STEPS = 4


def _args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--batch-size", "2",
            *tiny_train_sets("train.cpu_threads=1", checkpoint_every=2), "--perceptual", "none", "--device", "cpu",
            "--quiet"]  # fmt: skip


def _saved(run: Path) -> dict[str, object]:
    """Everything a save leaves: the tensors of both folders, their steps, and what else lies in the run folder."""
    names = ("model.safetensors", "ema.safetensors")
    state = {f"train_state/{f}": load_file(str(run / "train_state" / f)) for f in names}
    manifest = json.loads((run / "train_state" / "manifest.json").read_text())
    meta = json.loads((run / "checkpoint" / "config.json").read_text())
    return {
        **state,
        "checkpoint": load_file(str(run / "checkpoint" / "model.safetensors")),
        "steps": (manifest["step"], meta["extra"]["step"], torch.load(run / "train_state" / "state.pt")["step"]),
        "entries": sorted(p.name for p in run.iterdir()),
    }


def _assert_same(a: dict[str, object], b: dict[str, object], what: str) -> None:
    assert a["steps"] == b["steps"] == (STEPS,) * 3, what
    assert a["entries"] == b["entries"], what  # no temporary folder, old copy or commit record is left behind
    for key in a:
        if key not in ("steps", "entries"):
            assert a[key].keys() == b[key].keys(), what
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"{what}: {key} differs"


def _env(root: Path) -> dict[str, str]:
    # torch probes for (and creates) its inductor cache folder at start-up unless this is set, and an in-process run
    # sets it in os.environ: fixed here, every child performs the same file operations
    return {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and the file operations it performed."""
    root = tmp_path_factory.mktemp("kill")
    data = root / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    full = run_tokkit(_args(data, root / "ref"), log=root / "ref.jsonl", env=_env(root))
    assert full.returncode == 0, full.stderr[-3000:]
    return root, data, full.ops, _saved(root / "ref")


def _kill_then_resume(root: Path, data: Path, ops: list[str], ks: list[int]) -> dict[int, dict[str, object]]:
    """For each kill point k: a fresh run killed just before operation k, then resumed in this process."""

    def kill(k: int) -> None:
        killed = run_tokkit(_args(data, root / f"k{k}"), kill_at=k, log=root / f"k{k}.jsonl", env=_env(root))
        assert killed.killed, f"not killed at {ops[k - 1]}: {killed.stderr[-2000:]}"
        kinds = [op.split(" ")[0] for op in killed.ops]
        assert kinds == [op.split(" ")[0] for op in ops[:k]], "other operations:\n" + "\n".join(killed.ops)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(kill, ks))
    runner, out = CliRunner(), {}
    for k in ks:
        resumed = runner.invoke(app, [*_args(data, root / f"k{k}"), "--resume"])
        assert resumed.exit_code == 0, f"resume after a kill at {ops[k - 1]}: {resumed.output[-2000:]}"
        out[k] = _saved(root / f"k{k}")
    return out


@pytest.mark.slow
def test_every_kill_point_of_the_final_save_resumes_to_the_uninterrupted_run(reference):
    root, data, ops, ref = reference
    saves = op_indices(ops, "mkdir", ".train_state.tmp-")
    assert len(saves) == 2  # checkpoint_every=2 of 4 steps: the final save replaces a previous one
    final = [k for k in range(saves[-1], len(ops) + 1) if not ops[k - 1].startswith("fsync")]  # to the run's last op
    assert not ops[-1].startswith("fsync")  # so each skipped fsync is followed by a kill point
    kinds = {ops[k - 1].split(" ")[0] for k in final}
    assert {"mkdir", "open:w", "replace", "unlink", "rmtree", "rmdir"} <= kinds
    assert op_indices(ops, "replace", "-> " + str(root / "ref" / "save.json"))[-1] in final  # the commit point
    for k, got in _kill_then_resume(root, data, ops, final).items():
        _assert_same(got, ref, f"killed before op {k} ({ops[k - 1]})")


@pytest.mark.slow
def test_a_kill_in_the_first_save_resumes_too(reference):
    """Killed before its first save is committed, a run has nothing to continue from: --resume trains it again."""
    root, data, ops, ref = reference
    first_commit = first_op(ops, "replace", "-> " + str(root / "ref" / "save.json"))
    first_swap = first_commit + 2  # after the commit record's fsync: the first rename into train_state/
    assert "-> " + str(root / "ref" / "train_state") in ops[first_swap - 1]
    for k, got in _kill_then_resume(root, data, ops, [first_commit, first_swap]).items():
        _assert_same(got, ref, f"killed before op {k} ({ops[k - 1]})")
