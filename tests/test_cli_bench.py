"""`tokkit bench` wiring: exit codes, the table, the one-line notes, and the files it writes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_checkpoint
from typer.testing import CliRunner

from tokkit.cli.app import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TOKKIT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LFQ checkpoint and 10 random 32x32 images."""
    d = tmp_path_factory.mktemp("cli")
    ckpt = make_tiny_checkpoint(d / "tiny-lfq", resolution=32, quantizer="lfq", quantizer_kwargs={"codebook_size": 16})
    data = d / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    return ckpt, data


def test_offline_run_writes_everything_and_exits_0(setup, tmp_path) -> None:
    ckpt, data = setup
    out = tmp_path / "out"
    args = ["bench", str(ckpt), "--data", str(data), "--out", str(out), "-b", "4", "-q", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "tiny-lfq" in res.stdout and "n/a" in res.stdout and "PSNR" in res.stdout
    assert "rFID unavailable" in res.stderr and "weights-inception-2015-12-05-6726825d.pth" in res.stderr
    assert "LPIPS unavailable" in res.stderr
    for name in ("results.json", "report.md", "tiny-lfq-recon.png", "tiny-lfq-bits.png", "code_frequency.png"):
        assert (out / name).is_file(), name
    data_json = json.loads((out / "results.json").read_text())
    r = data_json["results"][0]
    assert r["protocol"]["num_images"] == 10 and r["metrics"]["psnr"] > 0 and r["metrics"]["rfid"] is None
    assert data_json["environment"]["device"] == "cpu"


def test_metrics_subset_and_weights_dir_from_env(setup, tmp_path, monkeypatch) -> None:
    from tokkit.metrics import make_placeholder_weights

    ckpt, data = setup
    make_placeholder_weights("alexnet", tmp_path / "w")
    monkeypatch.setenv("TOKKIT_WEIGHTS_DIR", str(tmp_path / "w"))
    out = tmp_path / "out"
    args = ["bench", str(ckpt), "--data", str(data), "--out", str(out), "--metrics", "lpips,psnr", "-n", "4", "-q"]
    args += ["--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())["results"][0]
    assert set(r["metrics"]) == {"lpips", "psnr", "psnr_std"} and r["metrics"]["lpips"] > 0
    assert r["protocol"]["num_images"] == 4 and r["usage"] == {}
    assert "not the official file" in res.stderr  # placeholder weights are flagged
    assert not (out / "tiny-lfq-bits.png").exists()  # no usage asked, no usage plot


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metrics", "psnr,fid"], "unknown metrics fid"),
        (["--lpips-net", "squeeze"], "unknown LPIPS net"),
        (["--device", "tpu"], "unknown device"),
        (["--num-images", "0"], "'--num-images' / '-n'"),
        (["--num-images", "many"], "'--num-images' / '-n'"),
        (["--batch-size", "0"], "'--batch-size' / '-b'"),
        (["--workers", "-1"], "'--workers' / '-j'"),
        (["--wat"], "No such option: --wat"),
    ],
)
def test_bad_options_exit_2_with_one_line(setup, tmp_path, extra, message) -> None:
    ckpt, data = setup
    res = runner.invoke(app, ["bench", str(ckpt), "--data", str(data), "--out", str(tmp_path), "-q", *extra])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_out_that_is_a_file_exits_2_with_one_line(setup, tmp_path) -> None:
    ckpt, data = setup
    out = tmp_path / "out.json"
    out.write_text("{}")
    res = runner.invoke(app, ["bench", str(ckpt), "--data", str(data), "--out", str(out), "-q", "--device", "cpu"])
    assert res.exit_code == 2 and res.stderr.startswith("error:") and "is a file, not a folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert out.read_text() == "{}"


@pytest.mark.parametrize(
    ("call", "where", "err", "message"),
    [
        ("open", "out", PermissionError(errno.EACCES, "Permission denied"), "is not writable (Permission denied)"),
        ("open", "out", OSError(errno.EROFS, "Read-only file system"), "is not writable (Read-only file system)"),
        ("replace", "recon.png", OSError(errno.ENOSPC, "No space left on device"), "free some space"),
        ("replace", "results.json", OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    ],
    ids=["permission", "read-only", "disk-full-png", "read-only-at-the-end"],
)
def test_unwritable_out_exits_2_with_one_line(setup, tmp_path, monkeypatch, call, where, err, message) -> None:
    """Tests run as root, where chmod blocks nothing: the OS errors are injected where tokkit meets them."""
    ckpt, data = setup
    out = tmp_path / "out"
    real = getattr(os, call)
    needle = str(out) if where == "out" else where

    def fake(path, *args, **kwargs):
        if needle in str(args[0] if call == "replace" else path):
            raise err
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, call, fake)
    args = ["bench", str(ckpt), "--data", str(data), "--out", str(out), "-q", "--device", "cpu", "-m", "psnr,usage"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:") and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (out / "results.json").exists()


def test_missing_checkpoint_and_data_exit_2(setup, tmp_path) -> None:
    ckpt, data = setup
    res = runner.invoke(app, ["bench", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no checkpoint" in res.stderr
    res = runner.invoke(app, ["bench", str(ckpt), "--data", str(tmp_path / "none.npy"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.startswith("error:")
    assert "Traceback" not in res.output


def test_help_lists_the_options() -> None:
    res = runner.invoke(app, ["bench", "--help"])
    assert res.exit_code == 0
    for opt in ("--data", "--out", "--num-images", "--metrics", "--weights-dir", "--lpips-net", "--device"):
        assert opt in res.stdout


def test_an_unsafe_torch_is_refused_before_any_command(setup, tmp_path, monkeypatch) -> None:
    import torch

    import tokkit.checkpoint

    def no_read(*a, **k):
        raise AssertionError("a checkpoint was read under a torch that is too old")

    ckpt, data = setup
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    monkeypatch.setattr(tokkit.checkpoint, "read_checkpoint_meta", no_read)
    res = runner.invoke(app, ["bench", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2 and res.stderr.startswith("error: torch 2.5.1 is too old"), res.output
    assert "pip install -U 'torch>=2.10'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert runner.invoke(app, ["--help"]).exit_code == 0  # help still shows
