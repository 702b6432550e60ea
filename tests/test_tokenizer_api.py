"""Tokenizer.encode_images / decode_to_images (files, PIL images, arrays) and the code examples in docstrings."""

from __future__ import annotations

import doctest
import inspect
import io
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_folder, make_tiny_checkpoint
from PIL import Image

import tokkit
from tokkit.data import to_uint8
from tokkit.encode import encode_dataset
from tokkit.errors import ConfigError, DataError
from tokkit.shards import open_shards


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint")


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> tokkit.Tokenizer:
    return tokkit.load(ckpt, device="cpu")


def _rgba(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    a[: size[1] // 2, :, 3] = 0  # half transparent: composited on white
    return Image.fromarray(a, "RGBA")


def _rotated_jpeg(size: tuple[int, int]) -> bytes:
    """A JPEG whose EXIF orientation (6: rotate 90 CW) must be applied."""
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Non-square PNGs (crop + resize happen), an RGBA PNG, a 16-bit gray PNG and an EXIF-rotated JPEG."""
    root = make_folder(tmp_path_factory.mktemp("imgs") / "data", n=6, size=(24, 18))
    _rgba((20, 30)).save(root / "a" / "rgba.png")
    Image.fromarray(np.arange(19 * 23, dtype=np.uint16).reshape(19, 23) * 100).save(root / "b" / "gray16.png")
    (root / "b" / "rotated.jpg").write_bytes(_rotated_jpeg((30, 20)))
    return root


def test_encode_images_on_files_equals_encode_dataset_shards(ckpt, tok, folder, tmp_path) -> None:
    encode_dataset(ckpt, folder, tmp_path / "shards", shard_size=4, batch_size=3, workers=0, device="cpu")
    ds = open_shards(tmp_path / "shards")
    assert len(ds) == 9  # every file, the RGBA, 16-bit and rotated ones too
    want = torch.stack([ds[i][0] for i in range(len(ds))])
    ids = tok.encode_images([folder / k for k in ds.keys], batch_size=4, device="cpu")
    assert ids.dtype == torch.int64 and ids.shape == (len(ds), *tok.index_shape) == want.shape
    assert torch.equal(ids, want)
    assert torch.equal(tok.encode_images(str(folder / ds.keys[2])), want[2:3])  # one path (str): a batch of one


def test_pil_images_and_arrays_give_the_ids_of_their_files(tok, folder) -> None:
    files = [folder / "a" / "000.png", folder / "a" / "rgba.png", folder / "b" / "rotated.jpg"]
    want = tok.encode_images(files, device="cpu")
    opened = [Image.open(f) for f in files]  # lazy, RGBA, EXIF-tagged: handled as for files
    assert torch.equal(tok.encode_images(opened, device="cpu"), want)
    assert torch.equal(tok.encode_images(np.asarray(Image.open(files[0])), device="cpu"), want[:1])
    batch = np.stack([np.asarray(Image.open(folder / "a" / f"00{i}.png")) for i in (0, 2, 4)])  # (3, H, W, 3)
    paths = [folder / "a" / f"00{i}.png" for i in (0, 2, 4)]
    assert torch.equal(tok.encode_images(batch, device="cpu"), tok.encode_images(paths, device="cpu"))
    gray = np.asarray(Image.open(files[0]).convert("L"))
    assert torch.equal(tok.encode_images(gray), tok.encode_images(gray[..., None]))  # (H, W) == (H, W, 1)
    assert tok.encode_images(iter(files)).shape == want.shape  # any iterable
    assert tok.encode_images([]).shape == (0, *tok.index_shape)


def test_unreadable_files_are_one_line_data_errors_naming_them(tok, folder, tmp_path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for bad in (tmp_path / "broken.png", tmp_path / "empty.jpg", tmp_path / "missing.png", tmp_path):
        with pytest.raises(DataError) as e:
            tok.encode_images([folder / "a" / "000.png", bad])
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 5), np.uint8), "shape"),
        (torch.zeros(1, 3, 16, 16), "tok.encode"),
        (3.5, "not float"),
        ([b"bytes"], "not bytes"),
    ],
)
def test_other_inputs_are_config_errors(tok, bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        tok.encode_images(bad)
    with pytest.raises(ConfigError, match="batch_size"):
        tok.encode_images([], batch_size=0)


def test_decode_to_images_is_decode_as_uint8_pil(tok, folder) -> None:
    ids = tok.encode_images(sorted((folder / "a").glob("*.png")), device="cpu")
    pics = tok.decode_to_images(ids, batch_size=2, device="cpu")
    assert len(pics) == len(ids)
    assert all(p.mode == "RGB" and p.size == (tok.resolution, tok.resolution) for p in pics)
    want = to_uint8(tok.decode(ids)).numpy()
    assert np.array_equal(np.stack([np.asarray(p) for p in pics]), want)
    assert np.array_equal(np.asarray(tok.decode_to_images(ids[1].numpy().astype(np.uint16))[0]), want[1])  # one grid
    assert np.array_equal(np.asarray(tok.decode_to_images(ids.to(torch.uint16))[-1]), want[-1])
    with pytest.raises(ConfigError, match="outside"):
        tok.decode_to_images(ids + tok.codebook_size)
    with pytest.raises(ConfigError, match="integer"):
        tok.decode_to_images(ids.float())
    with pytest.raises(ConfigError, match="shape"):
        tok.decode_to_images(ids[:, :4])


# ---- code examples in docstrings run (documentation runs) -----------------------------------------------------------


def code_examples(doc: str | None) -> list[str]:
    """The literal blocks (after a line ending in ``::``) and the ``>>>`` examples of a docstring, as source."""
    if not doc:
        return []
    lines = inspect.cleandoc(doc).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::"):
            indent = len(lines[i]) - len(lines[i].lstrip())
            body, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            if any(ln.strip() for ln in body):
                blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
        else:
            i += 1
    tests = doctest.DocTestParser().get_examples(inspect.cleandoc(doc))
    if tests:
        blocks.append("".join(t.source for t in tests))
    return [b for b in blocks if not b.lstrip().startswith(">>>")]


def _quantizer_classes() -> list[type]:
    import tokkit.quantizers as Q

    return [getattr(Q, name) for name in ("Quantizer", "VQ", "FSQ", "LFQ", "ResidualQuantizer", "CodebookUsage")]


@pytest.fixture
def example_files(ckpt, folder, tmp_path, monkeypatch) -> Path:
    """The files the examples name (a run folder, images, a shard set), in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    make_tiny_checkpoint(tmp_path / "runs" / "sample-fsq" / "checkpoint")
    for name in ("cat.jpg", "dog.png", "photo.jpg", "icon.png"):
        Image.open(folder / "a" / "000.png").save(name)
    encode_dataset(ckpt, folder, tmp_path / "shards", workers=0, device="cpu")
    return tmp_path


def test_code_example_parser_finds_blocks_and_doctests() -> None:
    doc = "Intro::\n\n    a = 1\n    b = a + 1\n\nText.\n\n>>> c = 2\n>>> c + 1\n3\n"
    assert code_examples(doc) == ["a = 1\nb = a + 1\n", "c = 2\nc + 1\n"]


def test_every_code_example_in_the_package_docstring_runs(example_files) -> None:
    blocks = code_examples(tokkit.__doc__)
    assert blocks and any("tokkit.FSQ(" in b for b in blocks)
    for block in blocks:
        exec(compile(block, "tokkit.__doc__", "exec"), {})  # noqa: S102 - our own docstring


def test_tokenizer_docstring_examples_run(example_files) -> None:
    tok = tokkit.load("runs/sample-fsq", device="cpu")
    uint8_images = np.random.default_rng(0).integers(0, 256, (2, tok.resolution, tok.resolution, 3), dtype=np.uint8)
    blocks = code_examples(tokkit.Tokenizer.__doc__)
    assert len(blocks) == 2
    for block in blocks:  # given: a loaded `tok`, `Image` from PIL, uint8 images of the tokenizer's size
        exec(compile(block, "Tokenizer.__doc__", "exec"), {"tok": tok, "Image": Image, "uint8_images": uint8_images})  # noqa: S102


@pytest.mark.parametrize("cls", _quantizer_classes(), ids=lambda c: c.__name__)
def test_quantizer_docstring_examples_run(cls) -> None:
    for block in code_examples(cls.__doc__):  # none today; any added later must run as written
        exec(compile(block, f"{cls.__name__}.__doc__", "exec"), {"torch": torch, "tokkit": tokkit})  # noqa: S102

