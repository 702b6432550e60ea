"""How long the CLI takes to answer: help, version, and mistakes that should be reported before torch loads.

    python benchmarks/cli_latency.py [--repeat 5]

Each command runs in a fresh interpreter (as a user's shell would run it); the table shows the median and the best
wall time, the exit status, and the first line of stderr. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokkit-latency-"))
    cases = {
        "tokkit --help": ["--help"],
        "tokkit --version": ["--version"],
        "tokkit encode <wrong path>": ["encode", str(tmp / "nope"), "sample", "--out", str(tmp / "o")],
        "tokkit decode <wrong path>": ["decode", str(tmp / "nope"), str(tmp), "--out", str(tmp / "o")],
        "tokkit bench --metrics fid": ["bench", str(tmp), "--data", "sample", "--metrics", "fid"],
        "tokkit train --set train.grad_clip=-1": ["train", "--set", "train.grad_clip=-1", "--out", str(tmp / "r")],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    print(f"{'command':<40} {'median s':>9} {'best s':>7} {'exit':>5}  first line of stderr")
    for name, argv in cases.items():
        times, proc = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "tokkit", *argv], capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - t0)
        assert proc is not None
        first = (proc.stderr.strip().splitlines() or [""])[0][:70]
        print(f"{name:<40} {statistics.median(times):>9.2f} {min(times):>7.2f} {proc.returncode:>5}  {first}")


if __name__ == "__main__":
    main()
