"""DDP training with two CPU processes (gloo) under torchrun, and resuming it with the same world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_train_sets

import tokkit
from tokkit.distributed import DistInfo, init_distributed, is_main, torchrun_command

REPO = Path(__file__).resolve().parents[1]


def test_single_process_defaults():
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, info.device) and not info.distributed and info.is_main
    assert is_main()


def test_torchrun_command_shape():
    cmd = torchrun_command(2, ["train", "--steps", "3"], port=12345)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node" in cmd
    assert cmd[-4:] == ["tokkit", "train", "--steps", "3"] and "12345" in cmd


def _tokkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tokkit", *args], env=env, capture_output=True, text=True, timeout=300)


SETS = tiny_train_sets("train.log_every=1", "train.warmup_steps=1", checkpoint_every=2)


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_resume(tmp_path):
    out = tmp_path / "run"
    common = [
        "train",
        "--data",
        "sample",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--perceptual",
        "none",
        "--quiet",
        "--nproc-per-node",
        "2",
        *SETS,
    ]
    first = _tokkit(*common, "--steps", "3")
    assert first.returncode == 0, first.stdout[-1500:] + first.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' not in ln]
    assert steps == [1, 2, 3]  # one writer (rank 0), no duplicated lines
    assert tokkit.load(out).config.resolution == 16
    # resume with the same world size extends the run
    second = _tokkit(*common, "--steps", "5", "--resume")
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-3000:]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval" not in r] == [1, 2, 3, 4, 5]
    # a different world size is refused in one line
    third = _tokkit("train", "--out", str(out), "--device", "cpu", "--steps", "6", "--resume", "--quiet")
    assert third.returncode == 2 and "same number" in third.stderr
