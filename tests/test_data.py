"""tokkit.data: sources, robust decoding, preprocessing, ImageDataset + collate_skip_bad."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokkit.data import (
    BadImage,
    ImageDataset,
    center_crop_resize,
    collate_skip_bad,
    decode_image,
    make_views,
    open_source,
    random_crop_flip,
    to_float,
    to_uint8,
)
from tokkit.errors import DataError

# ---------------------------------------------------------------- generators for every odd input a dataset holds


def _png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims width*height pixels (PIL refuses it before decoding a pixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 48, h: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def bad_files() -> dict[str, bytes]:
    """name -> bytes of inputs that must be skipped with a reason."""
    jpeg = _encode(Image.fromarray(_gradient()), "JPEG", quality=90)
    return {
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20,
        "notimage.jpg": b"this is a text file, not a picture\n" * 4,
        "bomb.png": _png_bomb(),
    }


def odd_files() -> dict[str, bytes]:
    """name -> bytes of readable inputs in unusual modes (converted to RGB)."""
    rgb = Image.fromarray(_gradient())
    gray16 = Image.fromarray(np.full((40, 48), 65535, dtype=np.uint16))  # mode I;16, white
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red -> white background
    pal = Image.new("P", (48, 40), 0)
    pal.putpalette([10, 20, 30] * 256)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return {
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "gray16.png": _encode(gray16, "PNG"),
        "int32.tif": _encode(Image.fromarray(np.full((40, 48), 65535, dtype=np.int32)), "TIFF"),
        "palette_t.png": _encode(pal, "PNG", transparency=0),
        "gray.png": _encode(rgb.convert("L"), "PNG"),
        "la.png": _encode(rgb.convert("LA"), "PNG"),
        "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "exif.jpg": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "small.png": _encode(Image.fromarray(_gradient(8, 6)), "PNG"),
    }


def make_image_folder(root: Path, n_per_class: int = 3, size: tuple[int, int] = (40, 36)) -> Path:
    """root/{cat,dog}/NNN.png gradient images (different per file)."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{j:03d}.png")
    return root


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_inputs_raise_badimage_with_reason(name: str) -> None:
    with pytest.raises(BadImage) as info:
        decode_image(bad_files()[name], name)
    assert info.value.key == name and info.value.reason
    assert isinstance(info.value, DataError)
    expected = {"zero": "empty", "truncated": "truncated", "corrupt": "image", "notimage": "not an image"}
    expected["bomb"] = "bomb"
    assert expected[name.split(".")[0]] in info.value.reason


def test_odd_modes_become_rgb() -> None:
    files = odd_files()
    out = {k: decode_image(v, k) for k, v in files.items()}
    assert all(im.mode == "RGB" for im in out.values())
    assert np.asarray(out["gray16.png"]).min() == 255  # 16-bit white stays white, not clipped garbage
    assert np.asarray(out["int32.tif"]).min() == 255
    assert (np.asarray(out["rgba.png"]) == 255).all()  # transparent -> white background
    assert (np.asarray(out["palette_t.png"]) == 255).all()  # transparent palette index -> white
    assert out["exif.jpg"].size == (40, 48)  # EXIF orientation 6 applied: 48x40 stored, shown upright as 40x48
    cmyk = np.asarray(out["cmyk.jpg"]).astype(int)
    assert np.abs(cmyk - _gradient()).mean() < 12


def test_bomb_limit_is_configurable() -> None:
    data = _encode(Image.fromarray(_gradient()), "PNG")
    with pytest.raises(BadImage, match="bomb"):
        decode_image(data, "x.png", max_pixels=100)


# ---------------------------------------------------------------- sources


def test_folder_source_labels_and_reads(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data")
    (tmp_path / "data" / "cat" / "notes.txt").write_text("ignored")
    src = open_source(tmp_path / "data")
    assert len(src) == 6 and src.keys == sorted(src.keys) and src.keys[0] == "cat/000.png"
    assert src.labels == [0, 0, 0, 1, 1, 1] and src.class_to_idx == {"cat": 0, "dog": 1}
    assert src.read(4).mode == "RGB" and src.read(4).size == (40, 36)
    fp = src.fingerprint()
    assert fp == open_source(tmp_path / "data").fingerprint()
    Image.new("RGB", (5, 5)).save(tmp_path / "data" / "dog" / "new.png")
    assert open_source(tmp_path / "data").fingerprint() != fp


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    src = open_source(tmp_path)
    assert src.labels == [-1] and src.class_to_idx == {}


def test_zip_source_strips_top_folder_and_survives_workers(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "test")
    zpath = tmp_path / "d.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, f"test/{p.relative_to(folder).as_posix()}")
        zf.writestr("test/index.csv", "file,label\n")
    src = open_source(zpath)
    assert src.keys[0] == "test/cat/000.png" and src.class_to_idx == {"cat": 0, "dog": 1}
    direct = [np.asarray(src.read(i)) for i in range(len(src))]
    ds = ImageDataset(src, 16)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    got = torch.cat([b["images"] for b in loader])
    assert got.shape == (6, 3, 16, 16)
    ref = torch.stack([torch.from_numpy(center_crop_resize(Image.fromarray(a), 16)).permute(2, 0, 1) for a in direct])
    assert torch.equal(got, ref)


def test_list_and_array_sources(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs")
    lst = tmp_path / "list.txt"
    lst.write_text("# my list\nimgs/dog/001.png\n\nimgs/cat/000.png\nimgs/missing.png\n")
    src = open_source(lst)
    assert src.keys == ["imgs/cat/000.png", "imgs/dog/001.png", "imgs/missing.png"] and src.labels == [-1] * 3
    assert src.read(0).size == (40, 36)
    with pytest.raises(BadImage, match="cannot read"):
        src.read(2)

    arr = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "b.npz", images=arr, labels=np.arange(5) % 2)
    np.savez(tmp_path / "c.npz", train_images=arr, train_labels=np.arange(5), test_images=arr[:2])
    a = open_source(tmp_path / "a.npy")
    assert len(a) == 5 and a.labels == [-1] * 5 and np.array_equal(np.asarray(a.read(3)), arr[3])
    b = open_source(tmp_path / "b.npz")
    assert b.labels == [0, 1, 0, 1, 0] and b.class_to_idx == {"0": 0, "1": 1}
    assert a.fingerprint() == open_source(tmp_path / "a.npy").fingerprint() != b.fingerprint()
    with pytest.raises(DataError, match="FILE.npz:KEY"):
        open_source(tmp_path / "c.npz")
    c = open_source(f"{tmp_path / 'c.npz'}:train_images")
    assert c.labels == [0, 1, 2, 3, 4]


def test_sample_source_is_bundled_and_deterministic() -> None:
    src = open_source("sample")
    assert len(src) >= 256 and len(src.class_to_idx) >= 10
    assert src.keys == sorted(src.keys) and src.keys[0] == "astronaut/000"
    assert src.read(0).size == (64, 64)
    assert src.fingerprint() == open_source("sample").fingerprint()


@pytest.mark.parametrize("spec", ["nowhere/at/all", "empty_dir", "x.csv"])
def test_open_source_errors_are_one_line(tmp_path: Path, spec: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError) as info:
        open_source(tmp_path / spec)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- transforms and dataset


def test_pixel_conversions_round_trip() -> None:
    x = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    f = to_float(x)
    assert f.shape == (2, 3, 5, 6) and f.min() >= -1 and f.max() <= 1
    assert torch.equal(to_uint8(f), x)
    assert torch.equal(to_float(x.permute(0, 3, 1, 2)), f)  # channel-first uint8 (collate output) too
    assert torch.equal(to_float(x.numpy()), f)


def test_crops_and_views() -> None:
    img = Image.fromarray(_gradient(60, 30))
    c = center_crop_resize(img, 16)
    assert c.shape == (16, 16, 3) and c.dtype == np.uint8
    r = random_crop_flip(img, 16, np.random.default_rng(0))
    assert r.shape == (16, 16, 3)
    assert np.array_equal(r, random_crop_flip(img, 16, np.random.default_rng(0)))
    assert make_views(img, 16, "none").shape == (1, 16, 16, 3)
    flip = make_views(img, 16, "flip")
    assert np.array_equal(flip[1], flip[0][:, ::-1])
    ten = make_views(img, 16, "tencrop")
    assert ten.shape == (10, 16, 16, 3) and np.array_equal(ten[5], ten[0][:, ::-1])


def test_dataset_skips_bad_and_counts_upscaled(tmp_path: Path) -> None:
    for name, data in {**bad_files(), **odd_files()}.items():
        (tmp_path / name).write_bytes(data)
    src = open_source(tmp_path)
    ds = ImageDataset(src, 16)
    batch = collate_skip_bad([ds[i] for i in range(len(ds))])
    bad = {src.keys[i] for i, _ in batch["errors"]}
    assert bad == set(bad_files())
    assert batch["images"].shape == (len(odd_files()), 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert batch["upscaled"] == 1  # small.png (8x6) only
    empty = collate_skip_bad([{"error": "x", "index": 0}])
    assert empty["images"].shape[0] == 0 and empty["errors"] == [(0, "x")]


def test_train_dataset_augments() -> None:
    src = open_source("sample")
    ds = ImageDataset(src, 32, train=True, seed=1)
    torch.manual_seed(0)
    a = ds[0]["image"]
    torch.manual_seed(0)
    assert torch.equal(a, ds[0]["image"]) and a.shape == (3, 32, 32)
    views = ImageDataset(src, 32, views="flip")[0]["image"]
    assert views.shape == (2, 3, 32, 32)
