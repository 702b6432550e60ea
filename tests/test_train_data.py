"""A resumed run continues on its own data: reused without --data, other data refused unless --new-data (recorded)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import tiny_train_sets
from typer.testing import CliRunner

from tokkit.cli.app import app

runner = CliRunner()


def _images(path, n: int = 16, seed: int = 0):
    np.save(path, np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))
    return path


def _train(out, *extra: str, steps: int = 2):
    return runner.invoke(app, ["train", "--out", str(out), "--steps", str(steps), "--batch-size", "2",
                               *tiny_train_sets(), "--perceptual", "none", "--device", "cpu", "--quiet", *extra])


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert all(n in text for n in needles) and len(text.splitlines()) <= 2, text
    return text


def _record(out) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture
def photos_run(tmp_path):
    photos = _images(tmp_path.resolve() / "photos.npy")
    out = tmp_path / "run"
    assert _train(out, "--data", str(photos)).exit_code == 0
    return photos, out


def test_resume_without_data_continues_on_the_recorded_data(photos_run):
    photos, out = photos_run
    result = _train(out, "--resume", steps=3)
    assert result.exit_code == 0, result.output
    rec = _record(out)
    assert rec["data"] == str(photos) and rec["train"]["steps"] == 3  # not the built-in sample set
    assert [h["data"] for h in rec["data_history"]] == [str(photos)]


def test_resume_with_other_data_is_refused_then_allowed_with_new_data(photos_run, tmp_path):
    photos, out = photos_run
    other = _images(tmp_path / "other.npy", seed=1)
    before = (out / "run.json").read_text()
    _one_line_error(_train(out, "--resume", "--data", str(other), steps=3), str(photos), "--new-data")
    _one_line_error(_train(out, "--resume", "--data", "sample", steps=3), "--new-data")
    assert (out / "run.json").read_text() == before  # the record is not overwritten by a refused resume
    result = _train(out, "--resume", "--data", str(other), "--new-data", steps=3)
    assert result.exit_code == 0, result.output
    history = _record(out)["data_history"]
    assert [(h["step"], h["data"]) for h in history] == [(0, str(photos)), (2, str(other))]
    assert _train(out, "--resume", steps=4).exit_code == 0  # and now continues on the new data
    assert _record(out)["data"] == str(other) and len(_record(out)["data_history"]) == 2


def test_the_same_data_by_another_path_is_not_other_data(photos_run, tmp_path, monkeypatch):
    photos, out = photos_run
    monkeypatch.chdir(tmp_path)
    result = _train(out, "--resume", "--data", os.path.relpath(photos), steps=3)
    assert result.exit_code == 0, result.output
    assert _record(out)["data"] == str(photos)  # recorded as an absolute path: a resume from elsewhere finds it
    moved = photos.rename(photos.with_name("moved.npy"))  # a moved dataset: recognized by its fingerprint
    result = _train(out, "--resume", "--data", str(moved), steps=4)
    assert result.exit_code == 0, result.output
    assert _record(out)["data"] == str(moved)


def test_data_changed_in_place_needs_new_data(photos_run):
    photos, out = photos_run
    _images(photos, n=20)
    _one_line_error(_train(out, "--resume", steps=3), "changed", "--new-data")
    assert _train(out, "--resume", "--new-data", steps=3).exit_code == 0


def test_resume_keeps_the_recorded_eval_data(tmp_path):
    photos, held = _images(tmp_path.resolve() / "photos.npy"), _images(tmp_path.resolve() / "held.npy", n=6, seed=2)
    out = tmp_path / "run"
    assert _train(out, "--data", str(photos), "--eval-data", str(held)).exit_code == 0
    assert _train(out, "--resume", steps=3).exit_code == 0
    assert _record(out)["eval_data"] == str(held)
    _one_line_error(_train(out, "--resume", "--eval-data", str(photos), steps=3), "eval data", "--new-data")
