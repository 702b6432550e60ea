"""Checkpoint folders: round trip, atomic replace, and one-line errors for bad folders."""

from __future__ import annotations

import json

import pytest
import torch

import tokkit
from tokkit.checkpoint import load, read_checkpoint_meta, save_checkpoint
from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError
from tokkit.models import Tokenizer

CFG = TokenizerConfig(resolution=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=4,
                      quantizer="fsq", quantizer_kwargs={"levels": [5, 5, 5]}, spatial_norm=True)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(CFG).eval()
    path = save_checkpoint(tok, tmp_path / "ckpt")
    return tok, path


def test_round_trip_gives_identical_outputs(saved):
    tok, path = saved
    again = tokkit.load(path)
    assert not again.training and again.config == CFG
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = tok.encode(x)
    assert torch.equal(again.encode(x), ids)
    assert torch.equal(again.decode(ids), tok.decode(ids))
    for (k, a), (k2, b) in zip(tok.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_folder_layout_and_meta(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    meta = read_checkpoint_meta(path)
    assert meta["format"] == "tokkit-checkpoint/1" and meta["tokenizer"] == CFG.to_dict()
    assert meta["tokkit_version"] == tokkit.__version__ and len(meta["weights_sha256"]) == 64
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no tmp leftovers


def test_save_replaces_existing_and_method(saved, tmp_path):
    tok, path = saved
    tok.save(path)
    assert read_checkpoint_meta(path)
    # a run folder holding checkpoint/ loads too
    tok.save(tmp_path / "run" / "checkpoint")
    assert load(tmp_path / "run").config == CFG


def _one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load(path)
    assert "\n" not in str(e.value)


def test_missing_folder(tmp_path):
    _one_line_error(tmp_path / "nope", "no checkpoint")


def test_missing_config(tmp_path):
    (tmp_path / "x").mkdir()
    _one_line_error(tmp_path / "x", "no config.json")


def test_corrupt_json(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    _one_line_error(path, "not JSON")


def test_wrong_format(saved):
    _, path = saved
    (path / "config.json").write_text(json.dumps({"format": "other"}))
    _one_line_error(path, "not a tokkit-checkpoint/1")


def test_sha_mismatch(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    _one_line_error(path, "sha256")


def test_weights_not_fitting_config(saved):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["tokenizer"]["base_channels"] = 16
    (path / "config.json").write_text(json.dumps(meta))
    _one_line_error(path, "does not fit")
