"""Robust image decoding: bytes in, an RGB ``PIL.Image`` out, or ``BadImage`` with a one-line reason.

Every unusual file a real dataset holds is handled here, once:

- zero-byte, truncated or corrupt files and non-images -> ``BadImage`` naming the reason;
- decompression bombs (more than ``MAX_PIXELS`` pixels) -> ``BadImage`` before any pixel is decoded (inputs over
  the byte cap never get here: sources read with the bounds of ``tokkit.data.inputs``);
- EXIF orientation is applied, so a photo taken sideways comes out upright;
- CMYK, 16/32-bit (``I;16``, ``I``, ``F``), palette, grayscale (``1``, ``L``, ``LA``) and alpha (``RGBA``, ``PA``)
  images become 8-bit RGB. Transparent pixels are composited on **white** (the usual choice for product photos,
  icons and scanned documents, and what a browser shows on its default page).

Inside ``reduced_decode(target)`` a JPEG is decoded at a reduced scale (libjpeg's DCT scaling, 1/2, 1/4 or 1/8: the
smallest image whose shorter side is still >= ``target``); the image then carries ``info[DCT_SCALE_INFO] = (scale,
full_width, full_height)`` so that ``center_crop_resize`` crops the same region of the scene as a full decode.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from contextvars import ContextVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tokkit.errors import DataError

# Images above this many pixels are refused as decompression bombs (PIL's own default is 89,478,485).
MAX_PIXELS = 89_478_485
# Alpha is composited on this background.
BACKGROUND = (255, 255, 255)
# key of ``Image.info`` holding (DCT scale, full upright width, full upright height) of a reduced-scale decode
DCT_SCALE_INFO = "tokkit_dct_scale"
# key of ``Image.info`` holding the undecoded bytes of a JPEG left for the GPU (``keep_jpeg``)
JPEG_BYTES_INFO = "tokkit_jpeg_bytes"
# the shorter side a JPEG may be reduced to by DCT scaling (None: full decode); set by ``reduced_decode``
_REDUCE_TO: ContextVar[int | None] = ContextVar("tokkit_reduce_to", default=None)
_KEEP_JPEG: ContextVar[bool] = ContextVar("tokkit_keep_jpeg", default=False)


@contextlib.contextmanager
def reduced_decode(target: int | None) -> Iterator[None]:
    """Within the block, ``decode_image`` decodes JPEGs at the smallest DCT scale (1, 1/2, 1/4, 1/8) whose shorter
    side is still >= ``target`` pixels (None: full decode). Per thread / task (a ``ContextVar``)."""
    token = _REDUCE_TO.set(None if target is None else int(target))
    try:
        yield
    finally:
        _REDUCE_TO.reset(token)


class BadImage(DataError):
    """One input that cannot be turned into an RGB image; ``key`` names it and ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self):  # keep (key, reason) across DataLoader worker processes
        return (BadImage, (self.key, self.reason))


@contextlib.contextmanager
def keep_jpeg() -> Iterator[None]:
    """Within the block, ``decode_image`` leaves baseline RGB / gray JPEGs undecoded: it returns the opened (header
    only) image with the file's bytes in ``info[JPEG_BYTES_INFO]``, for a batched GPU decode. Other files decode."""
    token = _KEEP_JPEG.set(True)
    try:
        yield
    finally:
        _KEEP_JPEG.reset(token)


def decode_image(data: bytes, key: str = "<bytes>", max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB image.

    Args:
        data: the file's bytes (JPEG, PNG, WebP, BMP, TIFF, GIF ... anything PIL reads).
        key: the name used in error messages.
        max_pixels: refuse images with more pixels than this (default ``MAX_PIXELS``).

    Returns:
        A loaded ``PIL.Image`` in mode ``RGB``.

    Raises:
        BadImage: empty, truncated, corrupt, non-image or oversized input.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if len(data) == 0:
        raise BadImage(key, "empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently gray
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limit:
                raise BadImage(key, f"decompression bomb refused: {w}x{h} = {w * h} pixels > {limit}")
            if _KEEP_JPEG.get() and img.format == "JPEG" and img.mode in ("RGB", "L") and len(img.tile) == 1:
                img.info[JPEG_BYTES_INFO] = data
                return img
            scale = _draft(img, _REDUCE_TO.get())
            img.load()
            reduced = img.size
            img = _upright(img)
            if scale > 1:  # full size in the upright frame (the orientation may have swapped the axes)
                full = (w, h) if img.size == reduced else (h, w)
                img.info[DCT_SCALE_INFO] = (scale, *full)
            return _to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(key, f"decompression bomb refused: {_first_line(e)}") from None
    except UnidentifiedImageError:
        raise BadImage(key, "not an image (unrecognized format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError) as e:
        text = _first_line(e)
        kind = "truncated" if "truncat" in text.lower() else "corrupt"
        raise BadImage(key, f"{kind} image: {text}") from None
    except MemoryError:
        raise BadImage(key, "image too large to decode in memory") from None


def _draft(img: Image.Image, target: int | None) -> int:
    """Ask libjpeg for the smallest DCT scale whose shorter side is >= ``target``; the scale taken (1 = full)."""
    if target is None or img.format != "JPEG" or min(img.size) < 2 * target:
        return 1
    w = img.size[0]
    drafted = img.draft(img.mode, (target, target))  # scale: the largest of 8, 4, 2, 1 with w // scale >= target
    if drafted is None:  # not a plain single-tile JPEG: full decode
        return 1
    return round(w / drafted[1][2])  # the box is (0, 0, w / scale, h / scale)


def array_to_image(array: np.ndarray) -> Image.Image:
    """A uint8 (H, W, 3) / (H, W, 1) / (H, W) array as an RGB image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    img = Image.fromarray(np.ascontiguousarray(array))
    return img if img.mode == "RGB" else img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a readable image unreadable
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, scaling high bit depths and compositing transparency on ``BACKGROUND``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8_gray(np.asarray(img), mode)).convert("RGB")
    if mode == "P" and "transparency" in img.info or mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB")


def _to_uint8_gray(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer or float grayscale (H, W) -> uint8, keeping the full range of the source depth."""
    a = a.astype(np.float64)
    if mode == "F":
        scale = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(a) / scale * 255.0, 0, 255).round().astype(np.uint8)
    top = float(a.max()) if a.size else 0.0
    if mode.startswith("I;16") or 255 < top <= 65535:
        return np.clip(a / 257.0, 0, 255).round().astype(np.uint8)  # 65535 -> 255
    if top <= 255:
        return np.clip(a, 0, 255).astype(np.uint8)
    return np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
