"""The run state: hashed on save and refused when corrupt, one commit for both folders, repaired after a kill."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import tiny_train_sets
from safetensors.torch import load_file
from typer.testing import CliRunner

from tokkit import runstate
from tokkit.checkpoint import read_checkpoint_meta
from tokkit.cli.app import app
from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError
from tokkit.models import Tokenizer

runner = CliRunner()
CFG = TokenizerConfig(resolution=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=4,
                      quantizer="fsq", quantizer_kwargs={"levels": [5, 5, 5]})


def _args(out, steps: int = 2) -> list[str]:
    return ["train", "--out", str(out), "--steps", str(steps), "--batch-size", "2", *tiny_train_sets(),
            "--perceptual", "none", "--device", "cpu", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run (one save), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("state") / "run"
    result = runner.invoke(app, _args(out))
    assert result.exit_code == 0, result.output
    return out


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _flip(path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.pt"])
def test_one_flipped_byte_in_train_state_is_refused_in_one_line(finished, tmp_path, name):
    run = _copy(finished, tmp_path)
    _flip(run / "train_state" / name, at=len((run / "train_state" / name).read_bytes()) // 2)
    result = runner.invoke(app, [*_args(run, steps=3), "--resume"])
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert f"{name} does not match the sha256" in text and len(text.splitlines()) <= 2, text
    assert json.loads((run / "train_state" / "manifest.json").read_text())["step"] == 2  # nothing was saved over it


def test_manifest_lists_every_file_with_its_sha256(finished):
    manifest = json.loads((finished / "train_state" / "manifest.json").read_text())
    files = sorted(p.name for p in (finished / "train_state").iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files == ["ema.safetensors", "model.safetensors", "state.pt"]
    from tokkit.checkpoint import sha256_file

    assert all(manifest["files"][f] == sha256_file(finished / "train_state" / f) for f in files)


def test_resume_rewrites_a_checkpoint_that_does_not_match_the_state(finished, tmp_path):
    """A finished run whose checkpoint/ is corrupt (or of another step) gets it rewritten from the verified state."""
    run = _copy(finished, tmp_path)
    _flip(run / "checkpoint" / "model.safetensors")
    result = runner.invoke(app, [*_args(run), "--resume"])
    assert result.exit_code == 0, result.output
    meta = read_checkpoint_meta(run)  # sha256 verified
    assert meta["extra"]["step"] == 2
    ckpt = load_file(str(run / "checkpoint" / "model.safetensors"))
    ema = load_file(str(run / "train_state" / "ema.safetensors"))
    assert all(torch.equal(ckpt[k], ema[k]) for k in ckpt)


# ---- the commit, piece by piece (in-process, no training) ------------------------------------------------------------


def _state(step: int) -> dict:
    torch.manual_seed(step)
    model = Tokenizer(CFG).state_dict()
    return {"step": step, "model": model, "ema": {k: v + step for k, v in model.items()}, "opt": {"lr": 0.1 * step}}


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no except/finally clean-up of tokkit's catches it."""


def _save_killed_at_replace(out, state, n: int, monkeypatch) -> None:
    """save_run_state, 'killed' just before its n-th os.replace."""
    real, count = os.replace, [0]

    def replace(a, b):
        count[0] += 1
        if count[0] == n:
            raise _Killed
        return real(a, b)

    monkeypatch.setattr(runstate.os, "replace", replace)
    with pytest.raises(_Killed):
        runstate.save_run_state(out, state, CFG)
    monkeypatch.setattr(runstate.os, "replace", real)


def _steps(out) -> tuple[int, int]:
    return runstate.load_run_state(out)["step"], read_checkpoint_meta(out)["extra"]["step"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_recover_finishes_a_committed_save_or_keeps_the_previous_one(tmp_path, monkeypatch, n):
    """os.replace number 1 commits (save.json); 2-5 swap the two folders; a kill at any of them loses nothing."""
    out = tmp_path / "run"
    out.mkdir()
    runstate.save_run_state(out, _state(1), CFG)
    _save_killed_at_replace(out, _state(2), n, monkeypatch)
    if n in (3, 5):  # killed inside a swap: the folder is missing until recover puts the new one in place
        assert not (out / ("train_state" if n == 3 else "checkpoint")).exists()
    notes = runstate.recover(out)
    assert _steps(out) == ((1, 1) if n == 1 else (2, 2))
    assert len(notes) == 1 and ("discarded" in notes[0] if n == 1 else "finished saving step 2" in notes[0])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "train_state"]
    state = runstate.load_run_state(out)
    assert torch.equal(state["ema"]["decoder.conv_out.bias"], _state(state["step"])["ema"]["decoder.conv_out.bias"])


def test_recover_puts_back_a_lone_old_copy_and_never_deletes_it(tmp_path):
    """checkpoint/ cut off mid-replace outside a commit (tokkit.save_checkpoint's swap): the old copy comes back."""
    out = tmp_path / "run"
    out.mkdir()
    runstate.save_run_state(out, _state(1), CFG)
    os.replace(out / "checkpoint", out / ".checkpoint.old-1234abcd")
    assert "put back checkpoint/" in runstate.recover(out)[0]
    assert _steps(out) == (1, 1)


def test_a_failed_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    runstate.save_run_state(out, _state(1), CFG)
    monkeypatch.setattr(runstate, "write_checkpoint_dir", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        runstate.save_run_state(out, _state(2), CFG)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "train_state"] and _steps(out) == (1, 1)


def test_unreadable_commit_record_is_refused_and_nothing_is_deleted(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    runstate.save_run_state(out, _state(1), CFG)
    _save_killed_at_replace(out, _state(2), 3, monkeypatch)  # committed, train_state/ moved aside
    (out / "save.json").write_text("{cut")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CheckpointError, match="save.json is unreadable"):
        runstate.recover(out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_state_without_manifest_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    runstate.save_run_state(out, _state(1), CFG)
    (out / "train_state" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        runstate.load_run_state(out)


def test_resume_without_any_save_trains_again_but_never_over_a_lone_checkpoint(finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "train_state")
    result = runner.invoke(app, [*_args(run), "--resume"])
    assert result.exit_code == 2 and "no train_state/" in result.stderr, result.output
    assert read_checkpoint_meta(run)["extra"]["step"] == 2  # untouched
    shutil.rmtree(run / "checkpoint")  # killed before its first save was committed: nothing to lose
    result = runner.invoke(app, [*_args(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert "has no save yet" in " ".join(result.stderr.split()) and runstate.load_run_state(run)["step"] == 2
