"""Every config field is range-checked at construction, ``from_dict`` and ``--set`` time, in one line naming it.

The tables below list bad values per field; they enumerate ``dataclasses.fields``, so a new field without a check
(and a bad value here) fails ``test_every_field_has_bad_values``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tokkit.cli.app import app
from tokkit.config import TokenizerConfig, TrainConfig, apply_overrides, check_compatible, get_preset
from tokkit.errors import ConfigError

TOKENIZER_BASE = {"resolution": 32, "channel_mult": [1, 2, 2], "z_channels": 3, "quantizer": "fsq",
                  "quantizer_kwargs": {"levels": [5, 5, 5]}}  # fmt: skip

BAD = {
    "tokenizer": {
        "resolution": [0, -32, 30, 32.5, "big"],  # 30: not divisible by the downsampling factor 4
        "in_channels": [1, 4, 0],
        "base_channels": [0, -8],
        "channel_mult": [[], [1, 0], [1, -2], [1.5], "1,2"],
        "num_res_blocks": [-1],
        "attention": ["yes", 1],
        "z_channels": [0, -3],
        "spatial_norm": ["no", 0],
        "quantizer": ["nope", "", 3],
        "quantizer_kwargs": [{"dim": 3}, {"levels": [1, 5, 5]}, {"levls": [5, 5, 5]}, {}, [5, 5, 5], "levels"],
        "arch": ["nope", "", 3, "VQGAN"],
        "arch_kwargs": [{"nope": 1}, {"z_channels": 8}, "x", [1], {"1x": 2}],
        "attn_levels": [[-1], [0, 0], [3], [1.5], "1", 1],  # [3]: only 3 levels (channel_mult [1, 2, 2])
        "decoder_res_blocks": [-1, 1.5, "x"],
        "quant_conv": ["yes", 1],
        "embed_dim": [0, -1, 7, "8"],  # 7: differs from z_channels 3 without quant_conv
    },
    "train": {
        "steps": [0, -5, 1.5, "many"],
        "batch_size": [0, -1],
        "lr": [0, -1e-3, math.nan, math.inf],
        "warmup_steps": [-1],
        "min_lr_ratio": [-0.1, 1.5],
        "weight_decay": [-1e-4, math.inf],
        "beta1": [1.0, -0.1],
        "beta2": [1.0, 2],
        "grad_clip": [-1, math.nan, math.inf],
        "ema_decay": [1.0, -0.5, 1.5],
        "seed": [-1, 2**32, 1.5],
        "recon_loss": ["l3", ""],
        "recon_weight": [-1, math.inf],
        "perceptual": ["yes", True],
        "perceptual_weight": [-0.1],
        "lpips_net": ["squeeze"],
        "quantizer_weight": [-1, math.nan],
        "disc_weight": [-0.1],
        "disc_start": [-1],
        "disc_adaptive": ["yes", 0],
        "disc_lr": [-1e-4],
        "disc_channels": [0],
        "disc_layers": [-1],
        "lecam_weight": [-1],
        "lecam_decay": [1.0, -0.1],
        "log_every": [0, -10],
        "eval_every": [-1],
        "checkpoint_every": [-1],
        "eval_images": [0, -1],
        "num_workers": [-2],
        "amp": ["fp16", "", None],
        "cpu_threads": [-1],
        "compile": ["yes", "", True],
        "grad_checkpointing": ["yes", 1],
    },
}
CLASSES = {"tokenizer": TokenizerConfig, "train": TrainConfig}
BASES = {"tokenizer": TOKENIZER_BASE, "train": {}}
CASES = [(s, f, v) for s, table in BAD.items() for f, values in table.items() for v in values]


@pytest.mark.parametrize("section", ["tokenizer", "train"])
def test_every_field_has_bad_values(section):
    assert set(BAD[section]) == {f.name for f in dataclasses.fields(CLASSES[section])}


def _one_line_naming(err: pytest.ExceptionInfo, section: str, field: str) -> None:
    msg = str(err.value)
    assert f"{section}.{field}" in msg and "\n" not in msg and len(msg) < 400, msg


@pytest.mark.parametrize(("section", "field", "value"), CASES, ids=[f"{s}.{f}={v!r}" for s, f, v in CASES])
def test_bad_value_is_refused_naming_the_field(section, field, value):
    cls = CLASSES[section]
    with pytest.raises(ConfigError) as e:
        cls.from_dict({**BASES[section], field: value})
    _one_line_naming(e, section, field)
    with pytest.raises(ConfigError) as e:
        cls(**{**BASES[section], field: value})
    _one_line_naming(e, section, field)
    cfgs = {"tokenizer": TokenizerConfig(**TOKENIZER_BASE), "train": TrainConfig()}
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfgs, [f"{section}.{field}={json.dumps(value)}"])
    _one_line_naming(e, section, field)


@pytest.mark.parametrize(
    ("section", "values"),
    [
        ("train", {"grad_clip": 0.0, "ema_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 1.0, "eval_every": 0,
                   "checkpoint_every": 0, "disc_layers": 0, "beta1": 0.0, "lecam_decay": 0.0, "cpu_threads": 0,
                   "num_workers": -1, "seed": 2**32 - 1, "lr": 1e30, "disc_lr": 0.0, "perceptual_weight": 0.0,
                   "eval_images": 1, "compile": "off", "grad_checkpointing": True}),
        ("train", {"recon_weight": 0.0, "perceptual": "lpips", "perceptual_weight": 1.0}),  # perceptual-only is fine
        ("train", {"warmup_steps": 500, "steps": 10}),  # a short smoke run of a preset keeps its warm-up
        ("tokenizer", {"num_res_blocks": 0, "channel_mult": [1], "resolution": 7, "z_channels": 5}),
        ("tokenizer", {"attn_levels": [2, 0], "decoder_res_blocks": 0, "embed_dim": 3, "arch": "vqgan"}),
        ("tokenizer", {"quant_conv": True, "embed_dim": 8, "quantizer": "vq", "spatial_norm": True,
                       "quantizer_kwargs": {"codebook_size": 16, "cosine": True}, "decoder_res_blocks": 3}),
        ("tokenizer", {"quantizer": "residual", "z_channels": 4,
                       "quantizer_kwargs": {"stages": [{"name": "fsq", "levels": [5, 5]}, {"name": "vq",
                                                                                           "codebook_size": 16}]}}),
    ],
)  # fmt: skip
def test_edge_values_inside_the_ranges_are_accepted(section, values):
    cfg = CLASSES[section](**{**BASES[section], **values})
    assert all(getattr(cfg, k) == v for k, v in values.items())


def test_messages_say_value_and_allowed_range():
    with pytest.raises(ConfigError, match=r"^train\.grad_clip must be >= 0 \(0 = no clipping\), got -1\.0$"):
        TrainConfig(grad_clip=-1)
    with pytest.raises(ConfigError, match=r"^train\.beta2 must be in \[0, 1\), got 1\.0$"):
        TrainConfig(beta2=1)
    with pytest.raises(ConfigError, match=r"^train\.amp must be one of auto, bf16, none, got 'fp16'$"):
        TrainConfig(amp="fp16")
    with pytest.raises(ConfigError, match=r"quantizer_kwargs \{\"levls\".*'fsq'.*unexpected keyword argument 'levls'"):
        TokenizerConfig(**{**TOKENIZER_BASE, "quantizer_kwargs": {"levls": [5, 5, 5]}})
    with pytest.raises(ConfigError, match="unknown quantizer 'nope'; choose one of: .*fsq.*lfq.*vq"):
        TokenizerConfig(**{**TOKENIZER_BASE, "quantizer": "nope"})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="train.recon_weight is 0 and the perceptual loss is off"):
        TrainConfig(recon_weight=0, perceptual="none")
    with pytest.raises(ConfigError, match="train.recon_weight is 0"):
        TrainConfig(recon_weight=0, perceptual_weight=0)
    # an LFQ codebook that is not a power of two; FSQ levels that contradict codebook_size
    with pytest.raises(ConfigError, match="tokenizer.quantizer_kwargs .* power of two"):
        TokenizerConfig(**{**TOKENIZER_BASE, "quantizer": "lfq", "quantizer_kwargs": {"codebook_size": 1000}})
    with pytest.raises(ConfigError, match="tokenizer.quantizer_kwargs"):
        TokenizerConfig(**{**TOKENIZER_BASE, "quantizer_kwargs": {"levels": [5, 5], "codebook_size": 99}})
    # the PatchGAN needs room at the tokenizer's resolution (only when the discriminator is on)
    p = get_preset("sample-fsq")
    cfgs = {"tokenizer": p.tokenizer, "train": p.train}
    with pytest.raises(ConfigError, match="train.disc_layers 4 is too deep for tokenizer.resolution 32"):
        apply_overrides(cfgs, ["train.disc_weight=0.1", "train.disc_layers=4"])
    apply_overrides(cfgs, ["train.disc_weight=0.1", "train.disc_layers=3"])
    apply_overrides(cfgs, ["train.disc_layers=4"])  # no discriminator: nothing to check
    check_compatible(TokenizerConfig(**TOKENIZER_BASE), TrainConfig(disc_weight=0.1, disc_layers=3))


def test_checking_the_quantizer_draws_no_random_numbers():
    """Building the quantizer to check its kwargs happens on the meta device and leaves the global RNG alone."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    TokenizerConfig(**{**TOKENIZER_BASE, "quantizer": "vq", "z_channels": 8, "quantizer_kwargs": {"codebook_size": 77}})
    assert torch.equal(torch.rand(4), expected)


def test_overrides_are_checked_as_a_whole():
    """A value is judged with the other overrides applied (the final config), not one override at a time."""
    p = get_preset("sample-fsq")
    out = apply_overrides(
        {"tokenizer": p.tokenizer, "train": p.train},
        ["tokenizer.resolution=24", "tokenizer.channel_mult=[1,2]", "tokenizer.quantizer=lfq",
         "tokenizer.quantizer_kwargs={\"codebook_size\": 16}"],
    )  # fmt: skip
    assert out["tokenizer"].token_grid == (12, 12)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.log_every=0", "train.log_every"),
        ("train.beta1=1", "train.beta1"),
        ("tokenizer.quantizer_kwargs.levels=[1,5]", "tokenizer.quantizer_kwargs"),
        ("tokenizer.in_channels=1", "tokenizer.in_channels"),
    ],
)
def test_cli_train_refuses_bad_set_before_any_work(tmp_path: Path, override, field):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--set", override, "--out", str(out), "--quiet"])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:") and field in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not out.exists()  # refused before the run folder, the data or the model
