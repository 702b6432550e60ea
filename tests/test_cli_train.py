"""`tokkit train` and `tokkit presets` through the typer app: wiring, outputs and one-line errors."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_train_sets
from typer.testing import CliRunner

from tokkit.cli.app import app

runner = CliRunner()

TINY = [*tiny_train_sets(), "--perceptual", "none", "--device", "cpu", "--quiet"]


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert needle in text, text
    assert len(text.splitlines()) <= 2, text  # rich may wrap one long line


def test_presets_lists_every_preset():
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("sample-fsq", "cifar10-f4-vq", "imagenet-f16-lfq", "tinyimagenet-f4-fsq"):
        assert name in result.output


def test_train_runs_and_overrides_apply(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--set",
            "train.recon_loss=l2",
            *TINY,
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "tokkit train" in result.output and "checkpoint" in result.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["train"]["steps"] == 3 and rec["train"]["lr"] == 1e-3 and rec["train"]["recon_loss"] == "l2"
    assert rec["tokenizer"]["base_channels"] == 8
    # --resume takes the run's own configs; more --steps extends it
    again = runner.invoke(app, ["train", "--out", str(out), "--steps", "4", "--resume", "--device", "cpu", "--quiet"])
    assert again.exit_code == 0, again.output
    assert "resumed at 3" in again.output


def test_missing_data_is_one_line(tmp_path):
    _one_line_error(
        runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *TINY]), "error:"
    )


def test_bad_preset_is_one_line(tmp_path):
    _one_line_error(runner.invoke(app, ["train", "--preset", "nope", "--out", str(tmp_path / "r")]), "unknown preset")


@pytest.mark.parametrize("override", ["tokenizer.nope=1", "train.lr=fast", "lr"])
def test_bad_override_is_one_line(tmp_path, override):
    _one_line_error(runner.invoke(app, ["train", "--set", override, "--out", str(tmp_path / "r")]), "error:")


def test_unreadable_checkpoint_for_resume_is_one_line(tmp_path):
    out = tmp_path / "run"
    _one_line_error(runner.invoke(app, ["train", "--out", str(out), "--resume"]), "nothing to resume")
    out.mkdir()
    (out / "run.json").write_text("{broken")
    _one_line_error(runner.invoke(app, ["train", "--out", str(out), "--resume"]), "unreadable")


def test_corrupt_train_state_for_resume_is_one_line(tmp_path):
    out = tmp_path / "run"
    ok = runner.invoke(app, ["train", "--out", str(out), "--steps", "1", "--batch-size", "2", *TINY])
    assert ok.exit_code == 0, ok.output
    (out / "train_state" / "state.pt").write_bytes(b"garbage")
    _one_line_error(
        runner.invoke(app, ["train", "--out", str(out), "--resume", "--steps", "2", "--device", "cpu", "--quiet"]),
        "cannot resume",
    )


def test_bad_perceptual_value(tmp_path):
    _one_line_error(runner.invoke(app, ["train", "--perceptual", "maybe", "--out", str(tmp_path / "r")]), "perceptual")
