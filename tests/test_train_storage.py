"""A full disk, a read-only folder, an --out that is a file: one line each, nothing half-written, and --resume goes on.

Tests run as root, for whom chmod does not make a folder read-only, so the errors are injected at a chosen write.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os

import pytest
import torch
from helpers import tiny_train_sets
from safetensors.torch import load_file
from typer.testing import CliRunner

from tokkit.cli.app import app

runner = CliRunner()


def _args(out) -> list[str]:
    return ["train", "--out", str(out), "--steps", "4", "--batch-size", "2",
            *tiny_train_sets("train.cpu_threads=1", checkpoint_every=2), "--perceptual", "none", "--device", "cpu",
            "--quiet"]  # fmt: skip


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert all(n in text for n in needles) and len(text.splitlines()) <= 2, text
    return text


def _fail_write(monkeypatch, match: str, nth: int, error: OSError) -> None:
    """The ``nth`` open-for-write of a path containing ``match`` creates the file empty, then fails with ``error``."""
    real, seen = builtins.open, [0]

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and match in os.fspath(file):
            seen[0] += 1
            if seen[0] == nth:
                real(file, mode, *args, **kwargs).close()
                error.filename = os.fspath(file)
                raise error
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_text goes through io.open


def _weights(run) -> dict[str, dict[str, torch.Tensor]]:
    return {sub: load_file(str(run / sub)) for sub in
            ("checkpoint/model.safetensors", "train_state/model.safetensors", "train_state/ema.safetensors")}


def _steps(run) -> tuple[int, int]:
    manifest = json.loads((run / "train_state" / "manifest.json").read_text())
    return manifest["step"], json.loads((run / "checkpoint" / "config.json").read_text())["extra"]["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = runner.invoke(app, _args(out))
    assert result.exit_code == 0, result.output
    return _weights(out)


@pytest.mark.parametrize(
    ("match", "nth"),
    [(".train_state.tmp-", 6), (".checkpoint.tmp-", 3), (".save.json.tmp-", 2), ("metrics.jsonl", 2),
     ("/grids/.step-", 1)],
    ids=["train_state", "checkpoint", "commit-record", "metrics", "grid"],
)
def test_full_disk_is_one_line_keeps_the_last_save_and_resume_finishes(reference, tmp_path, monkeypatch, match, nth):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_write(m, match, nth, OSError(errno.ENOSPC, "No space left on device"))
        result = runner.invoke(app, _args(out))
    _one_line_error(result, "no space left", "--resume", "step 2")
    assert [p.name for p in out.rglob(".*")] == []  # nothing half-written left
    assert _steps(out) == (2, 2)  # the previous save, whole
    resumed = runner.invoke(app, [*_args(out), "--resume"])  # space freed: the same command with --resume
    assert resumed.exit_code == 0, resumed.output
    assert _steps(out) == (4, 4)
    got = _weights(out)
    for sub, tensors in reference.items():
        assert all(torch.equal(tensors[k], got[sub][k]) for k in tensors), sub


@pytest.mark.parametrize(
    "error", [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only file system")],
    ids=["permission", "read-only"],
)
def test_unwritable_out_is_one_line(tmp_path, monkeypatch, error):
    out = tmp_path / "run"
    _fail_write(monkeypatch, str(out), 1, error)
    _one_line_error(runner.invoke(app, _args(out)), "cannot write to", "--out")


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line_error(runner.invoke(app, _args(tmp_path / "file")), "is a file", "--out")
    _one_line_error(runner.invoke(app, _args(tmp_path / "file" / "run")), "--out")
    assert (tmp_path / "file").read_text() == "x"
