"""Pinned preprocessing: pixel-range conversion, center crop + resize, training augmentation and encode views.

Pixels travel as uint8 until the last moment (4x less to copy between DataLoader workers and the model) and become
float in [-1, 1] only on the way into the tokenizer (``to_float``). Resizing is bicubic with antialiasing (PIL).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tokkit.data.images import DCT_SCALE_INFO
from tokkit.errors import ConfigError

# name -> number of views stored per image by `tokkit encode --views`
VIEWS = {"none": 1, "flip": 2, "tencrop": 10}
# tencrop: the shorter side is resized to resolution * TENCROP_SCALE, then 4 corners + center, each also flipped
TENCROP_SCALE = 8 / 7  # 256/224, the usual ten-crop margin


def to_float(images: Tensor | np.ndarray) -> Tensor:
    """uint8 images -> float32 in [-1, 1], channel-first.

    Args:
        images: uint8 (B, H, W, 3) channels-last (arrays, decoded images) or (B, 3, H, W) channels-first
            (``collate_skip_bad``'s ``images``). Channels-last wins when both readings are possible.

    Returns:
        (B, 3, H, W) float32 tensor in [-1, 1].
    """
    x = torch.as_tensor(images)
    if x.ndim < 3:
        raise ConfigError(f"to_float expects (B, H, W, 3) or (B, 3, H, W) images, got shape {tuple(x.shape)}")
    if x.shape[-1] == 3:
        x = x.movedim(-1, -3)  # (B, H, W, 3) -> (B, 3, H, W)
    elif x.shape[-3] != 3:
        raise ConfigError(f"to_float expects 3 color channels, got shape {tuple(x.shape)}")
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) (clamped, rounded)."""
    x = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)
    return x.movedim(-3, -1).contiguous()  # (B, 3, H, W) -> (B, H, W, 3)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 image of the N tiles on a white background."""
    n, h, w, _ = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    return grid


def center_crop_resize(img: Image.Image, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (bicubic, antialiased) and take the center square.

    Done as one PIL resize of the centered square box, which equals resize-then-crop in continuous coordinates
    and never materializes the large intermediate image. A JPEG decoded at a reduced DCT scale (``reduced_decode``)
    is cropped at the box of the full image divided by the scale: the same region of the scene.

    Returns:
        uint8 (resolution, resolution, 3).
    """
    out = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=center_box(img))
    return np.array(out.convert("RGB"), dtype=np.uint8)


def full_size(img: Image.Image) -> tuple[int, int, int]:
    """(DCT scale, width, height) of the full image: ``img`` may be a reduced-scale JPEG decode (scale > 1)."""
    return img.info.get(DCT_SCALE_INFO) or (1, *img.size)


def center_box(img: Image.Image) -> tuple[float, float, float, float]:
    """The centered square (left, top, right, bottom) of the full image, in ``img``'s pixel coordinates."""
    scale, w, h = full_size(img)
    s = min(w, h)
    left, top = (w - s) / 2.0, (h - s) / 2.0
    return left / scale, top / scale, (left + s) / scale, (top + s) / scale


def random_crop_flip(img: Image.Image, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Training augmentation: resize the shorter side to ``resolution``, random square crop, random h-flip.

    Returns:
        uint8 (resolution, resolution, 3).
    """
    w, h = img.size
    s = min(w, h)
    left = float(rng.integers(0, w - s + 1)) if w > s else 0.0
    top = float(rng.integers(0, h - s + 1)) if h > s else 0.0
    out = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s))
    arr = np.array(out.convert("RGB"), dtype=np.uint8)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def make_views(img: Image.Image, resolution: int, views: str = "none") -> np.ndarray:
    """The pinned encode views of one image.

    Args:
        img: an RGB image.
        resolution: output side.
        views: ``none`` (center crop), ``flip`` (center crop, mirrored center crop) or ``tencrop`` (the shorter side
            resized to ``resolution * 8/7``; center, top-left, top-right, bottom-left, bottom-right, then the same
            five mirrored).

    Returns:
        uint8 (V, resolution, resolution, 3).
    """
    if views not in VIEWS:
        raise ConfigError(f"unknown views {views!r}: use one of {', '.join(VIEWS)}")
    if views != "tencrop":
        center = center_crop_resize(img, resolution)
        if views == "none":
            return center[None]
        return np.stack([center, center[:, ::-1]])
    dct, w, h = full_size(img)
    scale = resolution * TENCROP_SCALE / min(w, h)
    big_w, big_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    box = (0.0, 0.0, w / dct, h / dct)  # the whole image (a reduced decode may hold a partial last block)
    big = np.asarray(img.convert("RGB").resize((big_w, big_h), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)
    r = resolution
    cy, cx = (big_h - r) // 2, (big_w - r) // 2
    corners = [(cy, cx), (0, 0), (0, big_w - r), (big_h - r, 0), (big_h - r, big_w - r)]
    five = [big[y : y + r, x : x + r] for y, x in corners]
    return np.stack(five + [c[:, ::-1] for c in five])


def is_upscaled(img: Image.Image, resolution: int) -> bool:
    """True when the image's shorter side is below ``resolution`` (it will be upscaled)."""
    return min(full_size(img)[1:]) < resolution
