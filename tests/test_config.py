"""Config dataclasses, presets, JSON round trip and overrides."""

from __future__ import annotations

import json

import pytest

from tokkit.config import TokenizerConfig, TrainConfig, apply_overrides, get_preset, list_presets
from tokkit.errors import ConfigError


def test_presets_listed_default_first():
    names = list_presets()
    assert names[0] == "sample-fsq"
    for fam in ("vq", "fsq", "lfq"):
        for stem in ("sample", "cifar10-f4", "imagenet-f16", "tinyimagenet-f4"):
            assert f"{stem}-{fam}" in names


@pytest.mark.parametrize(
    ("name", "resolution", "grid"),
    [("cifar10-f4-vq", 32, (8, 8)), ("imagenet-f16-lfq", 256, (16, 16)), ("tinyimagenet-f4-fsq", 64, (16, 16))],
)
def test_preset_geometry(name, resolution, grid):
    p = get_preset(name)
    assert p.tokenizer.resolution == resolution
    assert p.tokenizer.token_grid == grid


def test_imagenet_preset_is_maskbit_sized():
    t = get_preset("imagenet-f16-fsq").tokenizer
    assert (t.base_channels, t.channel_mult, t.num_res_blocks) == (128, [1, 1, 2, 2, 4], 2)
    assert t.downsample_factor == 16


def test_get_preset_returns_fresh_copies():
    a = get_preset("sample-fsq")
    a.tokenizer.quantizer_kwargs["levels"] = [2]
    assert get_preset("sample-fsq").tokenizer.quantizer_kwargs["levels"] == [8, 5, 5, 5]


def test_unknown_preset_is_config_error():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")


def test_json_round_trip():
    cfg = get_preset("cifar10-f4-vq").tokenizer
    again = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    tr = get_preset("cifar10-f4-vq").train
    assert TrainConfig.from_dict(json.loads(json.dumps(tr.to_dict()))) == tr


def test_from_dict_rejects_unknown_field_and_bad_type():
    with pytest.raises(ConfigError, match="unknown field"):
        TokenizerConfig.from_dict({"resolution": 32, "wat": 1})
    with pytest.raises(ConfigError, match="integer"):
        TokenizerConfig.from_dict({"resolution": "big"})
    with pytest.raises(ConfigError, match="divisible"):
        TokenizerConfig(resolution=30, channel_mult=[1, 2, 2])


def test_overrides_parse_types_and_nested_keys():
    p = get_preset("sample-fsq")
    out = apply_overrides(
        {"tokenizer": p.tokenizer, "train": p.train},
        [
            "tokenizer.base_channels=16",
            "train.lr=2e-4",
            "attention=true",  # section inferred: the field name is unique
            "tokenizer.channel_mult=[1,2]",
            "tokenizer.quantizer_kwargs.levels=[5,5,5]",
            "train.recon_loss=l2",
        ],
    )
    t, tr = out["tokenizer"], out["train"]
    assert t.base_channels == 16 and t.attention is True and t.channel_mult == [1, 2]
    assert t.quantizer_kwargs == {"levels": [5, 5, 5]}
    assert tr.lr == 2e-4 and tr.recon_loss == "l2"
    assert p.tokenizer.base_channels == 16  # the input is untouched


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("tokenizer.nope=1", "unknown field"),
        ("nope=1", "unknown config field"),
        ("train.lr=fast", "must be a number"),
        ("train.steps=1.5", "integer"),
        ("train.recon_loss=l3", "one of"),
        ("novalue", "section.field=value"),
        ("tokenizer.base_channels.x=1", "not a dict"),
    ],
)
def test_bad_overrides_are_one_line_config_errors(override, match):
    p = get_preset("sample-fsq")
    with pytest.raises(ConfigError, match=match) as e:
        apply_overrides({"tokenizer": p.tokenizer, "train": p.train}, [override])
    assert "\n" not in str(e.value)
