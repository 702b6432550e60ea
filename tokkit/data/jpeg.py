"""How ``tokkit encode`` decodes JPEGs: full, at a reduced DCT scale, or in batches on the GPU (``--decode``).

- ``full``: libjpeg (through Pillow) decodes every pixel; then the pinned resize + center crop.
- ``reduced``: libjpeg's DCT scaling decodes a JPEG at 1/2, 1/4 or 1/8 of its size, the smallest whose shorter side
  is still >= the target side (the resolution; ``tencrop``: resolution * 8/7), so a source below 2x the target is
  decoded in full. The crop box is the full image's divided by the scale (the same region of the scene), then the
  same pinned bicubic antialiased resize. About 2x faster for a 500x375 photo to 32 px (entropy decoding remains).
- ``auto`` (the default): ``reduced`` keeping a 2x margin (the decoded shorter side stays >= 2x the target), so the
  pinned antialiased resize still does the last 2x or more. Measured on 100 ImageNet photos at 32 px: crops at
  50 dB median PSNR from ``full`` and ~90% equal tokens (random tokenizers), against 41 dB and ~72-77% for
  ``reduced``; 2.1x (``auto``) and 2.4x (``reduced``) the decode speed of ``full``. A shard set begun before
  ``--decode`` existed resumes with ``full``.
- ``gpu``: DataLoader workers read the files and leave baseline RGB / gray JPEGs undecoded; the main process
  decodes each batch with nvjpeg (``torchvision.io.decode_jpeg(device="cuda")``), applies the EXIF orientation and
  resizes + crops on the GPU with ``resize_box``, which reproduces Pillow's bicubic antialiased resampling exactly
  (same coefficients, same 22-bit fixed-point rounding, computed exactly in float64). Other files (PNG, CMYK or
  progressive-unfriendly JPEGs nvjpeg refuses, corrupt files) take the CPU path; unreadable ones are logged.
  Pixels differ from ``full`` only by nvjpeg's IDCT / chroma upsampling against libjpeg-turbo's.

The plan of a shard set records the decoder, its version and the scale policy (``decode_record``), so resuming with
another ``--decode`` or another decoder version is refused rather than mixing pixels of two decoders.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tokkit.data.datasets import ImageDataset
from tokkit.data.images import JPEG_BYTES_INFO, BadImage, decode_image, keep_jpeg, reduced_decode
from tokkit.data.sources import ImageSource
from tokkit.data.transforms import TENCROP_SCALE, center_box, is_upscaled, make_views
from tokkit.errors import ConfigError

DECODE_MODES = ("auto", "full", "reduced", "gpu")
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images (Resample.c)


def resolve_decode(mode: str, device: torch.device) -> str:
    """Check ``--decode`` against the device: ``gpu`` without CUDA is refused in one line."""
    if mode not in DECODE_MODES:
        raise ConfigError(f"unknown --decode {mode!r}: use one of {', '.join(DECODE_MODES)}")
    if mode == "gpu" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ConfigError(f"--decode gpu needs a CUDA device (running on {device.type}): use --decode reduced or full")
    return mode


def reduce_target(resolution: int, views: str, margin: int = 1) -> int:
    """The shorter side a JPEG may be reduced to: ``margin`` x the resolution (or the ten-crop's larger resize)."""
    side = math.ceil(resolution * TENCROP_SCALE) if views == "tencrop" else int(resolution)
    return side * margin


def decode_record(mode: str) -> dict[str, str]:
    """What the plan records about decoding (part of its identity): decoder, version and scale policy."""
    from PIL import features

    pil = f"Pillow {Image.__version__} (libjpeg-turbo {features.version('libjpeg_turbo') or 'unknown'})"
    if mode == "full":
        return {"mode": "full", "decoder": pil, "scale": "full size"}
    if mode in ("reduced", "auto"):
        side = "the target side" if mode == "reduced" else "2x the target side"
        return {"mode": mode, "decoder": pil, "scale": "JPEG: largest libjpeg DCT scale (1/2, 1/4, 1/8) whose "
                f"shorter side >= {side}; crop box = full image's / scale"}  # fmt: skip
    if mode == "gpu":
        import torchvision

        return {"mode": "gpu", "decoder": f"torchvision {torchvision.__version__} nvjpeg (CUDA {torch.version.cuda}); "
                f"other files: {pil}", "scale": "full size; Pillow-exact bicubic resize on the device"}  # fmt: skip
    raise ConfigError(f"unknown --decode {mode!r}: use one of {', '.join(DECODE_MODES)}")


class ReducedDataset(ImageDataset):
    """``ImageDataset`` whose JPEGs decode at a reduced DCT scale (``reduced_decode``); other files as before.

    Args:
        source: where the images come from.
        resolution: output side in pixels.
        views: encode views.
        margin: the decoded shorter side stays >= ``margin`` x the target (``auto``: 2, ``reduced``: 1).
    """

    def __init__(self, source: ImageSource, resolution: int, views: str = "none", margin: int = 1) -> None:
        super().__init__(source, resolution, views=views)
        self.target = reduce_target(resolution, views, margin)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with reduced_decode(self.target):
            return super().__getitem__(i)


class DeferredJpegDataset(ImageDataset):
    """Items for ``--decode gpu``: a JPEG nvjpeg can take comes back undecoded, ``dict(jpeg=uint8 (n_bytes,),
    orientation=EXIF tag, label, index, upscaled)``; any other file is decoded here as ``ImageDataset`` does."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            with keep_jpeg():
                img = self.source.read(i)
        except BadImage as e:
            return {"error": e.reason, "index": int(i)}
        label = int(self.source.labels[i])
        data = img.info.get(JPEG_BYTES_INFO)
        if data is not None and not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # truncated: the CPU decoder says so
            try:
                img = decode_image(data, self.source.keys[i])
            except BadImage as e:
                return {"error": e.reason, "index": int(i)}
            data = None
        if data is not None:
            orientation = _orientation(img)
            w, h = img.size if orientation < 5 else img.size[::-1]
            jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return {"jpeg": jpeg, "orientation": orientation, "label": label, "index": int(i),
                    "upscaled": min(w, h) < self.resolution}  # fmt: skip
        return {"image": _views_tensor(img, self.resolution, self.views), "label": label, "index": int(i),
                "upscaled": is_upscaled(img, self.resolution)}  # fmt: skip


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 when absent or unreadable)."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF leaves the image as stored (as decode_image does)
        return 1
    return value if 1 <= value <= 8 else 1


def _views_tensor(img: Image.Image, resolution: int, views: str) -> Tensor:
    """The CPU path: uint8 (3, r, r) for ``none``, (V, 3, r, r) otherwise."""
    arr = make_views(img, resolution, views)  # (V, r, r, 3)
    image = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()  # -> (V, 3, r, r)
    return image[0] if views == "none" else image


def collate_deferred(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_skip_bad`` for ``DeferredJpegDataset``: decoded items stacked in ``images``; undecoded JPEGs in
    ``jpegs`` (a list of items), to finish with ``finish_batch`` in the main process."""
    from tokkit.data.datasets import collate_skip_bad

    jpegs = [b for b in batch if "jpeg" in b]
    out = collate_skip_bad([b for b in batch if "jpeg" not in b])
    out["jpegs"] = jpegs
    out["upscaled"] += sum(bool(b["upscaled"]) for b in jpegs)
    return out


def finish_batch(batch: dict[str, Any], resolution: int, views: str, device: torch.device, keys: list[str]) -> dict:
    """Decode a ``collate_deferred`` batch's JPEGs on ``device`` and merge them with its decoded images, in index
    order. A JPEG the device decoder refuses is decoded on the CPU; one that is unreadable there too joins
    ``errors``. Returns a ``collate_skip_bad`` batch (``images`` on ``device``) plus ``fallback``: the JPEGs that
    the device decoder refused."""
    jpegs = batch.pop("jpegs", [])
    if not jpegs:
        return {**batch, "fallback": 0}
    rows: list[tuple[int, int, Tensor]] = [
        (int(i), int(lab), img.to(device, non_blocking=True))
        for i, lab, img in zip(batch["indices"].tolist(), batch["labels"].tolist(), batch["images"], strict=True)
    ]
    errors = list(batch["errors"])
    decoded = _device_decode([j["jpeg"] for j in jpegs], device)
    done = device_views([(img, j["orientation"]) for img, j in zip(decoded, jpegs, strict=True) if img is not None],
                        resolution, views)  # fmt: skip
    done_iter = iter(done)
    for j, img in zip(jpegs, decoded, strict=True):
        if img is not None:
            view = next(done_iter)
        else:  # nvjpeg refused it: the CPU decoder decides (and names the reason when it cannot read it either)
            key = keys[j["index"]]
            try:
                view = _views_tensor(decode_image(j["jpeg"].numpy().tobytes(), key), resolution, views).to(device)
            except BadImage as e:
                errors.append((int(j["index"]), e.reason))
                continue
        rows.append((int(j["index"]), int(j["label"]), view))
    rows.sort(key=lambda r: r[0])
    shape = (0, 3, 0, 0) if views == "none" else (0, 0, 3, 0, 0)
    images = torch.stack([r[2] for r in rows]) if rows else torch.empty(shape, dtype=torch.uint8, device=device)
    return {**batch, "images": images, "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64),
            "indices": torch.tensor([r[0] for r in rows], dtype=torch.int64), "errors": sorted(errors),
            "fallback": sum(img is None for img in decoded)}  # fmt: skip


def _device_decode(datas: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """nvjpeg: encoded JPEG bytes -> uint8 (3, H, W) on ``device``, batched; None where the decoder refuses one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec (still there)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole batch: retry one at a time
            out: list[Tensor | None] = []
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


# ---- orientation and Pillow-exact resampling, on any device -------------------------------------------------------
def orient(img: Tensor, orientation: int) -> Tensor:
    """Apply an EXIF orientation (1-8) to (C, H, W), as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return img.flip(-1)  # mirror
    if orientation == 3:
        return img.flip(-2, -1)  # rotate 180
    if orientation == 4:
        return img.flip(-2)  # flip top-bottom
    if orientation == 5:
        return img.transpose(-2, -1)  # transpose
    if orientation == 6:
        return img.transpose(-2, -1).flip(-1)  # rotate 90 clockwise (PIL ROTATE_270)
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)  # transverse
    if orientation == 8:
        return img.transpose(-2, -1).flip(-2)  # rotate 90 counter-clockwise (PIL ROTATE_90)
    return img


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), evaluated in the same order as Resample.c."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def resample_weights(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, int, int]:
    """Pillow's bicubic antialiased coefficients for one axis, as its fixed-point integers.

    Args:
        in_size: input pixels along the axis.
        in0, in1: the box along the axis (continuous coordinates).
        out_size: output pixels.

    Returns:
        (weights, first, last): float64 (out_size, last - first) integer-valued weights in units of 2^-22 over input
        pixels ``first:last``.
    """
    scale = float(np.float32(in1) - np.float32(in0)) / out_size  # the box arrives as C floats, subtracted as such
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = in0 + (np.arange(out_size) + 0.5) * scale  # (out,)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(ksize)
    k = _bicubic(((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))  # (out, ksize)
    k = np.where(j[None, :] < xmax[:, None], k, 0.0)
    ww = np.add.accumulate(k, axis=1)[:, -1:]  # sequential sum, as the C loop
    k = np.where(ww != 0.0, k / np.where(ww != 0.0, ww, 1.0), k)
    fixed = np.where(k < 0, np.trunc(-0.5 + k * (1 << _PRECISION_BITS)), np.trunc(0.5 + k * (1 << _PRECISION_BITS)))
    first, last = int(xmin.min()), int((xmin + xmax).max())
    dense = np.zeros((out_size, last - first), np.float64)
    cols = xmin[:, None] + j[None, :] - first  # (out, ksize)
    valid = j[None, :] < xmax[:, None]
    rows = np.broadcast_to(np.arange(out_size)[:, None], cols.shape)
    dense[rows[valid], cols[valid]] = fixed[valid]
    return dense, first, last


def _round_fixed(x: Tensor) -> Tensor:
    """A fixed-point sum (units of 2^-22) -> 8-bit values, rounded and clipped as Pillow's clip8."""
    half = float(1 << (_PRECISION_BITS - 1))
    return torch.floor((x + half) / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def resize_box(images: Tensor, box: tuple[float, float, float, float], size: tuple[int, int]) -> Tensor:
    """``PIL.Image.resize(size, BICUBIC, box)`` for uint8 images on any device, equal to Pillow's pixel for pixel.

    Horizontal pass then vertical pass, each rounded to 8 bits, as Pillow does; the integer weights and sums are
    exact in float64.

    Args:
        images: uint8 (..., C, H, W).
        box: (left, top, right, bottom) in input pixel coordinates.
        size: (width, height) of the output.

    Returns:
        uint8 (..., C, height, width).
    """
    h, w = images.shape[-2:]
    out_w, out_h = size
    dev = images.device
    left, top, right, bottom = (float(np.float32(v)) for v in box)  # Resample.c takes the box as C floats
    need_x = out_w != w or left != 0 or right != out_w
    need_y = out_h != h or top != 0 or bottom != out_h
    # Pillow >= 10.1: a height reduced more than twice as much as the width is resampled first
    x_first = not (h - out_h > 0 and h - out_h > (w - out_w) * 2)
    x = images.to(torch.float64)
    if need_y:
        wy, y0, y1 = resample_weights(h, top, bottom, out_h)
        wy_t = torch.from_numpy(wy).to(dev)
    if need_x:
        wx, x0, x1 = resample_weights(w, left, right, out_w)
        wx_t = torch.from_numpy(wx).to(dev).T
    if x_first:
        if need_x:
            rows = slice(y0, y1) if need_y else slice(None)
            x = _round_fixed(x[..., rows, x0:x1] @ wx_t)  # (..., C, rows, W') @ (W', out_w)
            if need_y:
                x = _round_fixed(wy_t @ x)  # (out_h, rows) @ (..., C, rows, out_w)
        elif need_y:
            x = _round_fixed(wy_t @ x[..., y0:y1, :])
    else:
        if need_y:
            x = _round_fixed(wy_t @ x[..., y0:y1, :])  # (out_h, rows) @ (..., C, rows, W)
        if need_x:
            x = _round_fixed(x[..., x0:x1] @ wx_t)
    return x.to(torch.uint8)


def device_views(items: list[tuple[Tensor, int]], resolution: int, views: str) -> list[Tensor]:
    """The pinned encode views of decoded images on their device: ``make_views`` with ``resize_box``.

    Args:
        items: (uint8 (3, H, W) as stored, EXIF orientation) per image.
        resolution: output side.
        views: ``none``, ``flip`` or ``tencrop``.

    Returns:
        Per image, uint8 (3, r, r) for ``none``, (V, 3, r, r) otherwise. Images of one size are resized together.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    upright = [orient(img, o) for img, o in items]
    for n, img in enumerate(upright):
        groups.setdefault(tuple(img.shape[-2:]), []).append(n)
    out: list[Tensor | None] = [None] * len(items)
    r = resolution
    for (h, w), members in groups.items():
        batch = torch.stack([upright[n] for n in members])  # (n, 3, H, W)
        if views == "tencrop":
            scale = r * TENCROP_SCALE / min(w, h)
            big_w, big_h = max(r, round(w * scale)), max(r, round(h * scale))
            big = resize_box(batch, (0.0, 0.0, float(w), float(h)), (big_w, big_h))  # (n, 3, big_h, big_w)
            cy, cx = (big_h - r) // 2, (big_w - r) // 2
            corners = [(cy, cx), (0, 0), (0, big_w - r), (big_h - r, 0), (big_h - r, big_w - r)]
            five = [big[..., y : y + r, x : x + r] for y, x in corners]
            views_t = torch.stack(five + [c.flip(-1) for c in five], dim=1)  # (n, 10, 3, r, r)
        else:
            s = min(w, h)
            left, top = (w - s) / 2.0, (h - s) / 2.0
            center = resize_box(batch, (left, top, left + s, top + s), (r, r))  # (n, 3, r, r)
            views_t = center if views == "none" else torch.stack([center, center.flip(-1)], dim=1)  # (n, 2, 3, r, r)
        for n, v in zip(members, views_t, strict=True):
            out[n] = v
    return out  # type: ignore[return-value]


__all__ = [
    "DECODE_MODES",
    "DeferredJpegDataset",
    "ReducedDataset",
    "center_box",
    "collate_deferred",
    "decode_record",
    "device_views",
    "finish_batch",
    "orient",
    "reduce_target",
    "resample_weights",
    "resize_box",
    "resolve_decode",
]
