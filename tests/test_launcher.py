"""The `--nproc-per-node` launcher: the GPU count is checked before relaunching, and ranks die with their launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_checkpoint, tiny_train_sets
from typer.testing import CliRunner

from tokkit import distributed as tdist
from tokkit.cli.app import app
from tokkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one visible CUDA GPU, on which nothing may be launched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def no_launch(*args, **kwargs):
        raise AssertionError(f"launched {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", no_launch)


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"], ids=["auto", "gpu", "gpu0"])  # id "cuda" = marker
def test_too_few_gpus_is_refused_before_relaunching(one_gpu, device):
    with pytest.raises(ConfigError, match="lower --nproc-per-node to 1") as e:
        tdist.relaunch_under_torchrun(2, ["train", "--device", device, "--out", "x"])
    assert "needs 2 GPUs, but 1 visible" in str(e.value) and "\n" not in str(e.value)


def test_gpu_check_passes_where_it_should(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tdist.check_gpus_for(4, "auto")  # auto without CUDA: every rank on the CPU
    tdist.check_gpus_for(4, "cpu")
    with pytest.raises(ConfigError, match="0 visible"):
        tdist.check_gpus_for(2, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    tdist.check_gpus_for(2, "auto")
    tdist.check_gpus_for(1, "cuda")


@pytest.mark.parametrize("command", ["train", "encode"])
def test_cli_prints_one_line_and_launches_nothing(one_gpu, tmp_path, command):
    make_tiny_checkpoint(tmp_path / "ckpt")  # a real checkpoint: the CLI checks paths before the GPU count
    args = {"train": ["train", "--out", str(tmp_path / "run")],
            "encode": ["encode", str(tmp_path / "ckpt"), "sample", "--out", str(tmp_path / "shards")]}[command]
    result = CliRunner().invoke(app, [*args, "--nproc-per-node", "2"])
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert "lower --nproc-per-node" in text and len(text.splitlines()) <= 2, text
    assert "Traceback" not in result.output


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_die_with_a_killed_launcher(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tokkit", "train", "--out", str(out), "--steps", "100000", "--batch-size", "2",
         *tiny_train_sets("train.log_every=1", "train.cpu_threads=1"), "--perceptual", "none", "--device", "cpu",
         "--quiet", "--nproc-per-node", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    family: list[int] = []
    try:
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # both ranks are in the loop
            assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the ranks never started training"
            time.sleep(0.2)
        family = _children(launcher.pid)
        assert len(family) >= 3, family  # torchrun and its two ranks
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 10
        while any(map(_running, family)) and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in family if _running(p)], "ranks outlived their launcher"
    finally:
        for pid in family:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        launcher.stderr.close()


@pytest.mark.slow
def test_a_rank_error_is_its_one_line_without_torchrun_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tokkit", "train", "--out", str(tmp_path / "none"), "--resume", "--device", "cpu",
         "--quiet", "--nproc-per-node", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("error: nothing to resume") for ln in lines), done.stderr[-3000:]


@pytest.mark.parametrize("command", ["train", "encode"])
def test_launch_options_reach_torchrun_and_not_the_ranks(monkeypatch, tmp_path, command):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    seen = {}

    def fake(nproc, args, device=None, nodes=None):
        seen.update(nproc=nproc, args=list(args), nodes=nodes)
        return 0

    monkeypatch.setattr(tdist, "relaunch_under_torchrun", fake)
    args = {"train": ["train", "--out", str(tmp_path / "run"), "--init-from", str(ckpt), "--freeze", "quantizer"],
            "encode": ["encode", str(ckpt), "sample", "--out", str(tmp_path / "shards")]}[command]
    launch = ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "2345"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", *launch])
    assert result.exit_code == 0, result.output
    assert seen["nproc"] == 1 and seen["nodes"] == tdist.Nodes(2, 1, "10.1.2.3", 2345)
    assert not {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--nproc-per-node"} & set(seen["args"])
    assert seen["args"][0] == command and "--device" in seen["args"]
    if command == "train":  # the fine-tune options travel to every rank
        assert seen["args"][seen["args"].index("--init-from") + 1] == str(ckpt)
        assert seen["args"][seen["args"].index("--freeze") + 1] == "quantizer"
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()
