"""Kill -9 a tiny run after its first checkpoint, resume it, and get bit-identical weights to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch
from tokkit.config import TokenizerConfig, TrainConfig
from tokkit.train import train
out, resume = sys.argv[1], sys.argv[2] == "1"
tok = TokenizerConfig(resolution=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=8,
                      quantizer="vq", quantizer_kwargs={"codebook_size": 32})
cfg = TrainConfig(steps=60, batch_size=8, lr=2e-3, warmup_steps=5, log_every=5, eval_every=20, checkpoint_every=8,
                  eval_images=4, perceptual="none", ema_decay=0.9, cpu_threads=1)
train(tok, cfg, "sample", out, resume=resume, device="cpu")
"""


def _run(out: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), "1" if resume else "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(run / sub)) for name, sub in
            [("ckpt", "checkpoint/model.safetensors"), ("raw", "train_state/model.safetensors"),
             ("ema", "train_state/ema.safetensors")]}


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path / "straight", resume=False)
    killed = _run(tmp_path / "killed", resume=False)
    state = tmp_path / "killed" / "train_state" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = torch.load(state, weights_only=True)["step"]
    assert stopped_at < 60
    resumed = _run(tmp_path / "killed", resume=True)
    for p in (straight, resumed):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for kind in a:
        assert a[kind].keys() == b[kind].keys()
        for k in a[kind]:
            assert torch.equal(a[kind][k], b[kind][k]), f"{kind}:{k} differs after resuming from step {stopped_at}"
    # the metrics log is continuous too: same evaluations at the same steps
    def evals(run):
        return [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]

    assert evals(tmp_path / "straight") == evals(tmp_path / "killed")
