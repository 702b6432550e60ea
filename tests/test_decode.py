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
