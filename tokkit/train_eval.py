"""Evaluation on the held-out batch: PSNR, SSIM, L1, codebook usage and perplexity, and the reconstruction grid.

``evaluate`` only reads: the caller decides when the training usage counts start again (``TrainState.usage_counts``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tokkit.distributed import all_reduce_sum_
from tokkit.quantizers.base import entropy_bits
from tokkit.train_step import USAGE_LIMIT


@torch.no_grad()
def evaluate(net: nn.Module, eval_x: Tensor, usage_counts: Tensor, amp: bool) -> tuple[dict[str, float], Tensor]:
    """Reconstruct the held-out batch with ``net`` (in eval mode, restored after) and measure it.

    Args:
        net: the tokenizer to evaluate (the EMA copy when there is one).
        eval_x: (B, 3, H, W) held-out images in [-1, 1].
        usage_counts: (K,) training code counts since the last evaluation on this rank (summed over ranks here).
        amp: bf16 autocast.

    Returns:
        (metrics, reconstructions (B, 3, H, W) float in [-1, 1]).
    """
    from tokkit.metrics import psnr, ssim

    K = net.codebook_size
    was_training = net.training
    net.eval()
    with torch.autocast(eval_x.device.type, dtype=torch.bfloat16, enabled=amp):
        rec, q = net(eval_x)
    net.train(was_training)
    rec = rec.float().clamp(-1, 1)
    a, b = (eval_x + 1) / 2, (rec + 1) / 2
    counts = usage_counts.clone()
    all_reduce_sum_(counts)
    counts = counts.cpu()
    eval_ids = q.indices.reshape(-1)
    metrics = {
        "psnr": float(psnr(a, b).mean()),
        "ssim": float(ssim(a, b).mean()) if min(a.shape[-2:]) >= 11 else float("nan"),
        "l1": float((rec - eval_x).abs().mean()),
        "usage": float((counts > 0).sum()) / K if K <= USAGE_LIMIT else float("nan"),
        "perplexity": 2.0 ** entropy_bits(counts) if K <= USAGE_LIMIT else float("nan"),
        "eval_usage": float(eval_ids.unique().numel()) / K,
    }
    return metrics, rec


def save_grid(originals: Tensor, reconstructions: Tensor, path: Path, columns: int = 8, min_side: int = 64) -> Path:
    """Write a PNG: rows of originals, each followed by the row of their reconstructions (floats in [-1, 1])."""
    from PIL import Image

    from tokkit.data import make_grid, to_uint8

    a, b = to_uint8(originals.float().cpu()).numpy(), to_uint8(reconstructions.float().cpu()).numpy()  # (B, H, W, 3)
    n = a.shape[0]
    cols = min(columns, n)
    tiles = []
    for start in range(0, n, cols):
        for src in (a, b):
            chunk = src[start : start + cols]
            tiles += [chunk, np.zeros((cols - chunk.shape[0], *chunk.shape[1:]), np.uint8)]  # a short last row: black
    img = Image.fromarray(make_grid(np.concatenate(tiles), ncol=cols, pad=0))
    scale = max(1, math.ceil(min_side / originals.shape[-1]))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format="PNG")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written PNG behind
        raise
    return path


__all__ = ["evaluate", "save_grid"]
