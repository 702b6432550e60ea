"""tokkit.data.jpeg and ``encode --decode``: reduced-scale JPEG decode (tokens and pixels against a full decode),
the plan's decoder record and resume refusal, the GPU path's Pillow-exact resize and EXIF orientation (checked on
the CPU), its batching and CPU fallback (run on the CPU through torchvision's CPU decoder), and the CUDA runs."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from PIL import Image, ImageOps

from tokkit.data import open_source
from tokkit.data.images import DCT_SCALE_INFO, decode_image, reduced_decode
from tokkit.data.jpeg import (
    DeferredJpegDataset,
    collate_deferred,
    finish_batch,
    orient,
    resize_box,
)
from tokkit.data.transforms import center_crop_resize, make_views, to_float
from tokkit.errors import ConfigError, ShardError

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet_samples" / "imagenet_sample_400.zip"
pytestmark = pytest.mark.usefixtures("one_thread")


def photo_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random RGB image (low-frequency noise upsampled bicubically + a little grain): JPEG-friendly."""
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(big + rng.integers(-6, 7, big.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, orientation: int = 1, quality: int = 90) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    exif = img.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


def photo_folder(root: Path, n: int = 6, size: tuple[int, int] = (160, 120)) -> Path:
    """root/{a,b}/NNN.jpg photo-like JPEGs (one EXIF-rotated), a PNG, and a truncated JPEG."""
    rng = np.random.default_rng(3)
    for i in range(n):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        data = jpeg_bytes(photo_like(rng, *size), orientation=6 if i == 1 else 1)
        (root / "ab"[i % 2] / f"{i:03d}.jpg").write_bytes(data)
    Image.fromarray(photo_like(rng, 90, 70)).save(root / "a" / "png.png")
    (root / "b" / "truncated.jpg").write_bytes(jpeg_bytes(photo_like(rng, *size))[:900])
    return root


def real_photos(n: int) -> list[bytes]:
    if not PHOTOS.is_file():
        pytest.skip(f"{PHOTOS} not found: the shared ImageNet sample photos are needed for this comparison")
    with zipfile.ZipFile(PHOTOS) as zf:
        names = sorted(m for m in zf.namelist() if m.lower().endswith((".jpeg", ".jpg")))[:n]
        return [zf.read(m) for m in names]


def all_codes(out: Path) -> np.ndarray:
    """Every item's tokens of a shard set, in order (first view)."""
    from tokkit.shards import open_shards

    ds = open_shards(out, view=0)
    return np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 (N, ...) arrays; identical images count 100 dB."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.where(mse == 0, 100.0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)))


# ---------------------------------------------------------------- reduced-scale decode


def test_draft_picks_the_smallest_scale_above_the_target_and_keeps_the_scene() -> None:
    rng = np.random.default_rng(0)
    arr = photo_like(rng, 512, 384)
    data = jpeg_bytes(arr)
    with reduced_decode(40):  # 384 / 8 = 48 >= 40
        img = decode_image(data)
    assert img.size == (64, 48) and img.info[DCT_SCALE_INFO] == (8, 512, 384)
    with reduced_decode(100):  # 1/2 -> 192 >= 100, 1/4 -> 96 < 100
        assert decode_image(data).size == (256, 192)
    with reduced_decode(200):  # below 2x the target: full decode, nothing recorded
        img = decode_image(data)
    assert img.size == (512, 384) and DCT_SCALE_INFO not in img.info
    with reduced_decode(40):  # EXIF-rotated: the recorded full size is upright too
        img = decode_image(jpeg_bytes(arr, orientation=6))
    assert img.size == (48, 64) and img.info[DCT_SCALE_INFO] == (8, 384, 512)
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    with reduced_decode(40):  # not a JPEG: decoded in full
        assert decode_image(png.getvalue()).size == (512, 384)
    # the crop is the same region: the reduced crop is close to the full one (an off-center box would not be)
    full = center_crop_resize(decode_image(data), 32)
    with reduced_decode(64):
        red = center_crop_resize(decode_image(data), 32)
    assert psnr(full[None], red[None])[0] > 35


def test_reduced_decode_tokens_and_pixels_against_full_decode_on_real_photos(tmp_path: Path) -> None:
    """Measured on these 48 photos (2026-11-25, a random f2 FSQ tokenizer at 32 px): auto 0.90 of tokens equal,
    crops at 50 dB median PSNR; reduced 0.75 and 41 dB. Thresholds sit a little below."""
    from tokkit.models.tokenizer import load

    datas = real_photos(48)
    model = load(make_tiny_checkpoint(tmp_path / "ck", resolution=32), device="cpu")
    full = np.stack([center_crop_resize(decode_image(d), 32) for d in datas])  # (N, 32, 32, 3)
    with torch.inference_mode():
        ids_full = model.encode(to_float(full))
    report = {}
    for mode, margin, min_agree, min_psnr in (("auto", 2, 0.85, 45.0), ("reduced", 1, 0.65, 37.0)):
        with reduced_decode(32 * margin):
            crops = np.stack([center_crop_resize(decode_image(d), 32) for d in datas])
        with torch.inference_mode():
            agree = (model.encode(to_float(crops)) == ids_full).float().mean().item()
        p = float(np.median(psnr(full, crops)))
        report[mode] = (agree, p)
        assert agree >= min_agree, (mode, agree)
        assert p >= min_psnr, (mode, p)
        assert not np.array_equal(crops, full)  # really decoded at another scale
    print(f"reduced vs full decode, 48 photos at 32 px: token agreement / median PSNR {report}")


# ---------------------------------------------------------------- encode: record, resume, legacy


def test_decode_is_recorded_and_a_change_is_refused(tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    data = photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    res = encode_dataset(ckpt, data, out, shard_size=4, batch_size=3, workers=0, device="cpu")
    assert res.skipped == 1  # the truncated JPEG
    record = json.loads((out / "plan.json").read_text())["preprocessing"]["decode"]
    assert record["mode"] == "auto" and "Pillow" in record["decoder"] and "2x the target" in record["scale"]
    again = encode_dataset(ckpt, data, out, shard_size=4, batch_size=3, workers=0, device="cpu", decode="auto")
    assert again.resumed == again.shards[1]
    with pytest.raises(ShardError, match="preprocessing"):
        encode_dataset(ckpt, data, out, shard_size=4, batch_size=3, workers=0, device="cpu", decode="full")
    with pytest.raises(ConfigError, match="--decode gpu needs a CUDA device"):
        encode_dataset(ckpt, data, tmp_path / "g", shard_size=4, workers=0, device="cpu", decode="gpu")
    with pytest.raises(ConfigError, match="unknown --decode"):
        encode_dataset(ckpt, data, tmp_path / "g", shard_size=4, workers=0, device="cpu", decode="fast")


def test_sets_begun_before_decode_existed_resume_as_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tokkit.encode as enc

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    data = photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    with monkeypatch.context() as m:  # what an earlier version wrote: no decode record, full decode
        m.setattr(enc, "decode_record", lambda mode: None)
        m.setattr(enc, "ReducedDataset", lambda source, r, views, margin: enc.ImageDataset(source, r, views=views))
        first = enc.encode_dataset(ckpt, data, out, shard_size=4, batch_size=3, workers=0, device="cpu")
    assert "decode" not in json.loads((out / "plan.json").read_text())["preprocessing"]
    (out / "manifest.json").unlink()
    later = enc.encode_dataset(ckpt, data, out, shard_size=4, batch_size=3, workers=0, device="cpu")  # auto
    assert later.resumed == first.shards[1] and later.complete
    with pytest.raises(ShardError, match="another plan"):
        enc.encode_dataset(ckpt, data, out, shard_size=4, batch_size=3, workers=0, device="cpu", decode="reduced")


# ---------------------------------------------------------------- the GPU path's parts, on the CPU


def test_resize_box_equals_pillow_pixel_for_pixel() -> None:
    rng = np.random.default_rng(0)
    for w, h, ow, oh in [(335, 500, 64, 64), (500, 335, 32, 32), (300, 600, 100, 300), (31, 200, 64, 64),
                         (20, 30, 64, 64), (64, 48, 64, 48)]:  # fmt: skip
        img = Image.fromarray(photo_like(rng, w, h))
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H, W)
        s = min(w, h)
        for box in [(0, 0, w, h), ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2), (1.3, 2.7, w - 0.6, h - 3.1)]:
            ref = np.asarray(img.resize((ow, oh), Image.Resampling.BICUBIC, box=box))
            got = resize_box(t, box, (ow, oh)).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(got, ref, err_msg=f"{w}x{h} -> {ow}x{oh} box {box}")
    batch = torch.stack([t, t.flip(-1)])  # (2, 3, H, W): a batch resizes like its members
    one = resize_box(t.flip(-1), (0, 0, 64, 48), (16, 16))
    np.testing.assert_array_equal(resize_box(batch, (0, 0, 64, 48), (16, 16))[1], one)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_equals_exif_transpose(orientation: int) -> None:
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("views", ["none", "flip", "tencrop"])
def test_deferred_batches_decode_merge_in_order_and_fall_back(tmp_path: Path, views: str) -> None:
    """The --decode gpu pipeline on the CPU: torchvision's CPU decoder stands in for nvjpeg."""
    source = open_source(photo_folder(tmp_path / "photos"))
    ds = DeferredJpegDataset(source, 32, views=views)
    items = [ds[i] for i in range(len(source))]
    kinds = {source.keys[i]: ("jpeg" if "jpeg" in it else "error" if "error" in it else "image") for i, it in
             enumerate(items)}  # fmt: skip
    assert kinds["a/png.png"] == "image" and kinds["b/truncated.jpg"] == "error" and kinds["a/000.jpg"] == "jpeg"
    corrupt = dict(items[0])  # valid header and end marker, garbage inside: nvjpeg refuses it, then PIL names it
    corrupt["jpeg"] = torch.cat([items[0]["jpeg"][:300], torch.zeros(200, dtype=torch.uint8), items[0]["jpeg"][-2:]])
    batch = finish_batch(collate_deferred([corrupt, *items[1:]]), 32, views, torch.device("cpu"), source.keys)
    good = [i for i, it in enumerate(items) if "error" not in it and i != 0]
    assert batch["indices"].tolist() == good
    assert [e[0] for e in batch["errors"]] == sorted([0, source.keys.index("b/truncated.jpg")])
    assert batch["fallback"] == 1  # the corrupt one: refused by the "device" decoder, then named by PIL
    want = tuple([len(good), 3, 32, 32] if views == "none" else [len(good), 2 if views == "flip" else 10, 3, 32, 32])
    assert tuple(batch["images"].shape) == want and batch["images"].dtype == torch.uint8
    for row, i in enumerate(good):  # every image equals the CPU path's (same libjpeg-turbo, Pillow-exact resize)
        ref = make_views(decode_image((Path(source.root) / source.keys[i]).read_bytes()), 32, views)  # (V, r, r, 3)
        got = batch["images"][row].reshape(-1, 3, 32, 32).permute(0, 2, 3, 1).numpy()
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1, source.keys[i]
    assert batch["upscaled"] == 0


def test_gpu_mode_wiring_runs_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_dataset's --decode gpu loop, with the device check lifted: shards equal a full decode's tokens."""
    import tokkit.encode as enc

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    data = photo_folder(tmp_path / "photos")
    full = enc.encode_dataset(ckpt, data, tmp_path / "full", shard_size=4, batch_size=3, workers=0, device="cpu",
                              decode="full")  # fmt: skip
    monkeypatch.setattr(enc, "resolve_decode", lambda mode, dev: mode)
    gpu = enc.encode_dataset(ckpt, data, tmp_path / "gpu", shard_size=4, batch_size=3, workers=1, device="cpu",
                             decode="gpu")  # fmt: skip
    assert (gpu.images, gpu.skipped) == (full.images, full.skipped) == (7, 1)
    assert np.mean(all_codes(tmp_path / "full") == all_codes(tmp_path / "gpu")) >= 0.95
    assert json.loads((tmp_path / "gpu" / "plan.json").read_text())["preprocessing"]["decode"]["mode"] == "gpu"


# ---------------------------------------------------------------- on a CUDA GPU


@pytest.mark.cuda
def test_gpu_decode_matches_the_cpu_path_on_real_photos(tmp_path: Path) -> None:
    """nvjpeg against libjpeg-turbo on real photos, through the same Pillow-exact resize: the crops differ only by
    the decoders' IDCT / chroma upsampling (a few levels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    datas = real_photos(32)
    items = [{"jpeg": torch.frombuffer(bytearray(d), dtype=torch.uint8), "orientation": 1, "label": 0, "index": i,
              "upscaled": False} for i, d in enumerate(datas)]  # fmt: skip
    batch = finish_batch(collate_deferred(items), 64, "none", torch.device("cuda"), [f"p{i}" for i in range(32)])
    assert batch["images"].device.type == "cuda" and not batch["errors"] and batch["fallback"] == 0
    ref = np.stack([center_crop_resize(decode_image(d), 64) for d in datas])
    got = batch["images"].permute(0, 2, 3, 1).cpu().numpy()
    p = psnr(ref, got)
    print(f"nvjpeg vs libjpeg crops at 64 px: median PSNR {np.median(p):.1f} dB, min {p.min():.1f}")
    assert np.median(p) >= 35


@pytest.mark.cuda
def test_gpu_encode_end_to_end_with_bad_files(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tokkit.encode import encode_dataset

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    data = photo_folder(tmp_path / "photos")
    gpu = encode_dataset(ckpt, data, tmp_path / "gpu", shard_size=4, batch_size=3, workers=1, device="cuda",
                         decode="gpu")  # fmt: skip
    full = encode_dataset(ckpt, data, tmp_path / "full", shard_size=4, batch_size=3, workers=1, device="cuda",
                          decode="full")  # fmt: skip
    assert (gpu.images, gpu.skipped) == (full.images, full.skipped) == (7, 1)
    errors = (tmp_path / "gpu" / "errors.jsonl").read_text()
    assert "truncated.jpg" in errors
    assert np.mean(all_codes(tmp_path / "full") == all_codes(tmp_path / "gpu")) >= 0.5  # nvjpeg: a few levels off


def test_encode_images_reads_jpegs_as_tokkit_encode_does(tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset
    from tokkit.models.tokenizer import load

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    data = photo_folder(tmp_path / "photos", size=(320, 240))  # 240 >= 4x16: auto decodes at 1/2, reduced at 1/8
    tok = load(ckpt, device="cpu")
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.name != "truncated.jpg")
    for mode in ("auto", "reduced", "full"):
        encode_dataset(ckpt, data, tmp_path / mode, shard_size=4, batch_size=3, workers=0, device="cpu", decode=mode)
        ids = tok.encode_images([str(f) for f in files], decode=mode).numpy()
        np.testing.assert_array_equal(ids, all_codes(tmp_path / mode), err_msg=mode)
    with pytest.raises(ConfigError, match="decode must be one of"):
        tok.encode_images([str(files[0])], decode="gpu")
