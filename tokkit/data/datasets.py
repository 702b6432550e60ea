"""``ImageDataset``: an ``ImageSource`` as a torch Dataset of fixed-size uint8 images that never dies on a bad file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tokkit.data.images import BadImage
from tokkit.data.sources import ImageSource
from tokkit.data.transforms import VIEWS, is_upscaled, make_views, random_crop_flip


class ImageDataset(Dataset):
    """Images of a source, resized to ``resolution``.

    Item ``i`` is ``dict(image=uint8 (3, r, r), label=int, index=i, upscaled=bool)``; with ``views`` other than
    ``none`` the image is (V, 3, r, r). An unreadable input gives ``dict(error=reason, index=i)`` instead, so a
    DataLoader with ``collate_fn=collate_skip_bad`` carries on past it.

    Args:
        source: where the images come from.
        resolution: output side in pixels.
        train: random crop + horizontal flip (``random_crop_flip``) instead of the pinned center crop.
        seed: augmentation seed; each draw also mixes in torch's RNG (seeded per DataLoader worker and epoch),
            so epochs differ while a seeded run repeats.
        views: encode views (``none``, ``flip``, ``tencrop``); ignored when ``train``.
        resize: ``(PIL image, side) -> (side, side, 3) uint8`` used instead of the pinned center crop (a bench
            protocol's, ``tokkit.protocols.RESIZES``); only with ``train=False`` and ``views="none"``.
    """

    def __init__(
        self,
        source: ImageSource,
        resolution: int,
        train: bool = False,
        seed: int = 0,
        views: str = "none",
        resize: Callable[[Any, int], np.ndarray] | None = None,
    ) -> None:
        if views not in VIEWS:
            from tokkit.errors import ConfigError

            raise ConfigError(f"unknown views {views!r}: use one of {', '.join(VIEWS)}")
        self.source = source
        self.resolution = int(resolution)
        self.train = train
        self.seed = seed
        self.views = views
        if resize is not None and (train or views != "none"):
            raise ValueError("ImageDataset: resize replaces the pinned center crop; it takes train=False, views='none'")
        self.resize = resize

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            img = self.source.read(i)
        except BadImage as e:
            return {"error": e.reason, "index": int(i)}
        upscaled = is_upscaled(img, self.resolution)
        if self.resize is not None:
            arr = self.resize(img, self.resolution)  # (r, r, 3)
            image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()  # -> (3, r, r)
        elif self.train:
            salt = int(torch.randint(0, 2**31 - 1, ()).item())
            rng = np.random.default_rng([self.seed, int(i), salt])
            arr = random_crop_flip(img, self.resolution, rng)
            image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (r, r, 3) -> (3, r, r)
        else:
            arr = make_views(img, self.resolution, self.views)  # (V, r, r, 3)
            image = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()  # -> (V, 3, r, r)
            if self.views == "none":
                image = image[0]
        return {"image": image, "label": int(self.source.labels[i]), "index": int(i), "upscaled": upscaled}


def collate_skip_bad(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good items of a batch and list the bad ones.

    Returns:
        ``dict(images=uint8 (B, 3, r, r) [or (B, V, 3, r, r)], labels=int64 (B,), indices=int64 (B,),
        errors=[(index, reason), ...], upscaled=int)``; B counts only the readable items (may be 0).
    """
    good = [b for b in batch if "error" not in b]
    errors = [(int(b["index"]), str(b["error"])) for b in batch if "error" in b]
    if good:
        images = torch.stack([b["image"] for b in good])
    else:
        images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    return {
        "images": images,
        "labels": torch.tensor([b["label"] for b in good], dtype=torch.int64),
        "indices": torch.tensor([b["index"] for b in good], dtype=torch.int64),
        "errors": errors,
        "upscaled": sum(bool(b.get("upscaled", False)) for b in good),
    }
