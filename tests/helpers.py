"""Builders shared by several test modules (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def make_tiny_checkpoint(
    path: Path,
    seed: int = 0,
    resolution: int = 16,
    quantizer: str = "fsq",
    quantizer_kwargs: dict[str, Any] | None = None,
) -> Path:
    """A randomly initialised tiny tokenizer (base_channels 8, f2: 16 px -> 8x8 tokens) saved as a checkpoint."""
    from tokkit.checkpoint import save_checkpoint
    from tokkit.config import TokenizerConfig
    from tokkit.models.tokenizer import Tokenizer

    kwargs = {"levels": [8, 5, 5, 5]} if quantizer_kwargs is None else quantizer_kwargs
    torch.manual_seed(seed)
    cfg = TokenizerConfig(
        resolution=resolution, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=4,
        quantizer=quantizer, quantizer_kwargs=kwargs,
    )  # fmt: skip
    return save_checkpoint(Tokenizer(cfg), path)


def make_folder(root: Path, n: int = 24, size: tuple[int, int] = (20, 18), bad: dict[str, bytes] | None = None) -> Path:
    """root/{a,b}/NNN.png random images (+ extra files given as name -> bytes under root/a)."""
    rng = np.random.default_rng(1)
    for i in range(n):
        cls = "ab"[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    for name, data in (bad or {}).items():
        (root / "a" / name).write_bytes(data)
    return root


def tiny_train_sets(*extra: str, checkpoint_every: int = 0) -> list[str]:
    """``--set`` arguments that make any preset a tiny, fast `tokkit train` run (16 px, 8 base channels)."""
    sets = [
        "tokenizer.resolution=16",
        "tokenizer.base_channels=8",
        "tokenizer.channel_mult=[1,2]",
        "train.eval_images=4",
        "train.eval_every=0",
        f"train.checkpoint_every={checkpoint_every}",
        *extra,
    ]
    return [a for kv in sets for a in ("--set", kv)]
