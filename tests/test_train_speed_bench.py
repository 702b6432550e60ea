"""benchmarks/train_speed.py runs end to end in its smallest form (so that it cannot rot)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_speed_quickest_mode_writes_its_table(tmp_path, capsys):
    tiny = ["tokenizer.resolution=16", "tokenizer.base_channels=8", "tokenizer.channel_mult=[1,2]",
            "train.batch_size=4", "train.eval_images=4", "train.warmup_steps=1"]
    args = ["--quick", "--steps", "2", "--train-steps", "6", "--out", str(tmp_path)]
    for item in tiny:
        args += ["--set", item]
    (row,) = _bench().main(args)
    assert row["preset"] == "sample-fsq" and row["device"] == "cpu" and not row["compile"]
    assert row["bare_eager"]["img_per_s"] > 0 and row["train"]["img_per_s"] > 0 and row["ratio"] > 0
    assert row["bare_eager"]["flops_per_step"] > 0 and row["tflops"] > 0
    table = capsys.readouterr().out
    assert "| sample-fsq | cpu | 4 |" in table
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").read_text().strip() == table.strip()
