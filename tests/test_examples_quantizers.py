"""examples/quantizer_in_your_model.py runs and reports codebook usage (documentation runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quantizer_in_your_model_example_runs():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quantizer_in_your_model.py"), "--steps", "12"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    for family in ("fsq", "vq", "lfq"):
        line = next((ln for ln in lines if ln.startswith(f"{family}:")), None)
        assert line is not None, proc.stdout
        assert "codebook usage" in line and "perplexity" in line
