"""The built-in ``sample`` image set: deterministic crops of the photographs bundled inside scikit-image.

Nothing is downloaded: the files are read straight from ``skimage/data`` (the copies shipped in the wheel, not
through ``skimage.data``'s pooch fetcher). Each photograph is one class; every crop is a random square (side 30% to
100% of the shorter side, seeded) resized to ``SAMPLE_SIZE`` pixels, half of them mirrored. Grayscale photographs are
replicated to RGB.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from tokkit.errors import DataError

# bundled photographs (file name in skimage/data -> class name); textures and natural scenes, no synthetic charts
PHOTOS = {
    "astronaut.png": "astronaut",
    "brick.png": "brick",
    "camera.png": "camera",
    "chelsea.png": "chelsea",
    "coffee.png": "coffee",
    "coins.png": "coins",
    "grass.png": "grass",
    "gravel.png": "gravel",
    "hubble_deep_field.jpg": "hubble",
    "ihc.png": "ihc",
    "moon.png": "moon",
    "motorcycle_left.png": "motorcycle",
    "retina.jpg": "retina",
    "rocket.jpg": "rocket",
}
CROPS_PER_PHOTO = 32
SAMPLE_SIZE = 64
SEED = 0


def skimage_data_dir() -> Path:
    """The folder of photographs shipped inside the installed scikit-image."""
    try:
        import skimage
    except ImportError as e:  # pragma: no cover - scikit-image is a dependency
        raise DataError("the 'sample' data set needs scikit-image: pip install scikit-image") from e
    return Path(skimage.__file__).parent / "data"


@functools.lru_cache(maxsize=2)
def sample_arrays(
    size: int = SAMPLE_SIZE, per_photo: int = CROPS_PER_PHOTO
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Build (once per process) the sample set.

    Returns:
        images uint8 (N, size, size, 3), labels int64 (N,), class names (index = label).
    """
    folder = skimage_data_dir()
    rng = np.random.default_rng(SEED)
    images, labels, names = [], [], []
    for label, (fname, cname) in enumerate(PHOTOS.items()):
        path = folder / fname
        if not path.is_file():
            raise DataError(f"scikit-image's bundled photo {path} is missing: reinstall scikit-image")
        with Image.open(path) as im:
            photo = im.convert("RGB")
        w, h = photo.size
        s_min = min(w, h)
        for _ in range(per_photo):
            side = int(rng.integers(int(0.3 * s_min), s_min + 1))
            left = int(rng.integers(0, w - side + 1))
            top = int(rng.integers(0, h - side + 1))
            crop = photo.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
            arr = np.asarray(crop, dtype=np.uint8)
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
            images.append(np.ascontiguousarray(arr))
            labels.append(label)
        names.append(cname)
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def sample_digest(images: np.ndarray) -> str:
    """sha256 of the sample pixels (the sample set's identity in fingerprints and manifests)."""
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
