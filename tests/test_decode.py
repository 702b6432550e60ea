"""tokkit.decode: ids (.npy or shards) -> PNGs; mismatched tokens are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from PIL import Image

from tokkit.data import make_grid
from tokkit.decode import decode_tokens
from tokkit.errors import ShardError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


def test_decode_npy_matches_tokenizer_decode(ckpt: Path, tmp_path: Path) -> None:
    from tokkit.checkpoint import load
    from tokkit.data import to_uint8

    ids = np.random.default_rng(0).integers(0, 1000, (5, 8, 8)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    res = decode_tokens(ckpt, tmp_path / "ids.npy", tmp_path / "out", grid=True, limit=3, device="cpu")
    assert res.count == 3 and [f.name for f in res.files] == ["000000.png", "000001.png", "000002.png"]
    with torch.inference_mode():
        ref = to_uint8(load(ckpt).decode(torch.from_numpy(ids[:3]))).numpy()
    assert np.array_equal(np.stack([np.asarray(Image.open(f)) for f in res.files]), ref)
    assert Image.open(res.grid).size == (2 * 18 + 2, 2 * 18 + 2)


def test_decode_refuses_foreign_tokens(ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "grid.npy", np.zeros((2, 4, 4), np.int64))
    with pytest.raises(ShardError, match="grid"):
        decode_tokens(ckpt, tmp_path / "grid.npy", tmp_path / "o", device="cpu")
    np.save(tmp_path / "big.npy", np.full((2, 8, 8), 5000, np.int64))
    with pytest.raises(ShardError, match="another tokenizer"):
        decode_tokens(ckpt, tmp_path / "big.npy", tmp_path / "o", device="cpu")


def test_make_grid_layout() -> None:
    g = make_grid(np.zeros((5, 4, 4, 3), np.uint8), pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3)


def test_every_input_gets_its_own_file(ckpt: Path, tmp_path: Path) -> None:
    """img.bmp, img.webp and img.png used to become one img.png: 6 reported, 3 written (issue 12.9)."""
    from tokkit.encode import encode_dataset

    rng = np.random.default_rng(0)
    for sub in ("a", "b"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        for ext in ("bmp", "webp", "png"):
            img = Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8))
            img.save(tmp_path / "data" / sub / f"img.{ext}", **({"lossless": True} if ext == "webp" else {}))
    Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / "a" / "grid.png")
    encode_dataset(ckpt, tmp_path / "data", tmp_path / "shards", shard_size=4, workers=0, device="cpu")
    res = decode_tokens(ckpt, tmp_path / "shards", tmp_path / "png", grid=True, device="cpu")
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert res.count == len(res.files) == 7 == len(set(res.files)) and all(f.is_file() for f in res.files)
    assert written == sorted([f.name for f in res.files] + ["grid.png"])
    assert {f.name for f in res.files} == {
        "a__grid.png", "a__img.bmp.png", "a__img.png", "a__img.webp.png", "b__img.bmp.png", "b__img.png",
        "b__img.webp.png",
    }  # fmt: skip


def test_output_names_are_distinct_and_deterministic() -> None:
    from tokkit.decode import output_names

    keys = ["x/img.png", "x__img.png", "X/IMG.PNG", "grid.png", "grid", "000", "x/img.png-1"]
    names = output_names(keys)
    assert names == output_names(keys) and len({n.lower() for n in names} | {"grid.png"}) == len(keys) + 1
    assert names[:2] == ["x__img.png", "x__img-1.png"] and names[3] == "grid-1.png" and names[5] == "000.png"
    assert all(len(n.encode()) <= 200 for n in output_names(["d/" * 300 + "deep.jpg"]))


def test_ids_outside_the_codebook_or_dtype_are_refused(ckpt: Path, tmp_path: Path) -> None:
    for name, ids in {
        "neg.npy": np.full((1, 8, 8), -1, np.int32),
        "u64.npy": np.full((1, 8, 8), 2**63 + 5, np.uint64),  # wraps negative in int64
        "u32.npy": np.full((1, 8, 8), 2**32 - 1, np.uint32),
    }.items():
        np.save(tmp_path / name, ids)
        with pytest.raises(ShardError, match=r"outside \[0, 1000\)") as info:
            decode_tokens(ckpt, tmp_path / name, tmp_path / "o", device="cpu")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_pickled_or_float_npy_is_one_line(ckpt: Path, tmp_path: Path) -> None:
    from tokkit.errors import ConfigError

    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="pickled") as info:
        decode_tokens(ckpt, tmp_path / "obj.npy", tmp_path / "o", device="cpu")
    assert "\n" not in str(info.value)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ConfigError, match="not a valid .npy"):
        decode_tokens(ckpt, tmp_path / "junk.npy", tmp_path / "o", device="cpu")
    np.save(tmp_path / "f.npy", np.zeros((1, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="integers"):
        decode_tokens(ckpt, tmp_path / "f.npy", tmp_path / "o", device="cpu")


@pytest.mark.parametrize(
    "kw, needle", [({"limit": -1}, "--limit"), ({"view": -1}, "--view"), ({"batch_size": 0}, "--batch-size")]
)
def test_decode_options_are_range_checked_first(tmp_path: Path, kw: dict, needle: str) -> None:
    from tokkit.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):  # before the (missing) checkpoint is even looked at
        decode_tokens(tmp_path / "no-checkpoint", tmp_path / "ids.npy", tmp_path / "o", **kw)
