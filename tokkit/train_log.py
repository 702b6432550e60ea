"""The run's records: metrics.jsonl (one JSON object per logged step or evaluation) and TensorBoard events."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLog:
    """Appends records to ``metrics.jsonl`` and mirrors their numbers to TensorBoard (when installed); rank 0 only.

    Args:
        out: the run folder.
        enabled: False on the other ranks (nothing is written).
    """

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path, self.enabled = out / "metrics.jsonl", enabled
        self.tb = _tensorboard(out) if enabled else None

    def write(self, rec: dict[str, Any]) -> None:
        """One record: ``step``, ``eval`` (true for evaluations) and numbers."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            group = "eval" if rec.get("eval") else "train"
            for k, v in rec.items():
                if k not in ("step", "eval") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{group}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _tensorboard(out: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``out/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _step_of(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None  # a line cut short by a kill or a full disk
    return rec.get("step", 0) if isinstance(rec, dict) else None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (those the saved state has seen), atomically; drop any line cut short."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(errors="replace").splitlines() if (s := _step_of(ln)) is not None and s <= step]
    write_atomic(path, "".join(ln + "\n" for ln in keep))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["RunLog", "truncate_metrics", "write_atomic"]
