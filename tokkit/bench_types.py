"""What ``tokkit bench`` returns: ``BenchResult`` (every checkpoint) and ``CheckpointResult`` (one checkpoint).

Its own module so that ``tokkit.bench`` (which measures) and ``tokkit.report`` (which writes the results down) both
depend on it and not on each other. ``BenchResult.to_dict()`` is the content of results.json (``tokkit-bench/1``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class CheckpointResult:
    """What ``bench`` measured for one checkpoint.

    Attributes:
        checkpoint: the checkpoint folder.
        name: short unique name used in tables and file names.
        tokenizer: quantizer, codebook size, resolution, token grid, bits per token, tokens per image, bits per pixel.
        metrics: rfid, lpips, psnr, ssim (means over images), psnr_std, ssim_std; None where unavailable.
        unavailable: metric -> the one-line reason it could not be computed.
        usage: codebook usage over the whole set (used, usage, perplexity, entropy_bits, total), plus the
            quantizer's own ``usage_report`` (e.g. ``bits``: per-bit balance, ``levels``: per-channel level usage).
        protocol: how the numbers were obtained (images, preprocessing, reference, rounding, weights, versions).
        files: plot name -> path of the PNG written (empty without ``out``).
        warnings: one-line cautions about how to read the numbers (e.g. measured on the checkpoint's training
            images); also in report.md's notes and sent to the reporter.
    """

    checkpoint: str
    name: str
    tokenizer: dict[str, Any]
    metrics: dict[str, float | None]
    unavailable: dict[str, str]
    usage: dict[str, Any]
    protocol: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # for the plots, never in results.json: a few inputs / reconstructions uint8 (N, r, r, 3) and the code
    # counts sorted from most to least frequent
    grid: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    code_counts: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (without the plot data)."""
        d = asdict(self)
        d.pop("grid")
        d.pop("code_counts")
        return d


@dataclass
class BenchResult:
    """All checkpoints' results, the shared environment record, and the files written."""

    results: list[CheckpointResult]
    environment: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the content of results.json)."""
        return {
            "format": "tokkit-bench/1",
            "environment": self.environment,
            "results": [r.to_dict() for r in self.results],
            "files": self.files,
        }


__all__ = ["BenchResult", "CheckpointResult"]
