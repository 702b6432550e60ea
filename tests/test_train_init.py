"""`tokkit train --init-from CHECKPOINT --freeze ...`: fine-tunes that keep token ids compatible (or identical)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from killpoints import op_indices, run_tokkit
from safetensors.torch import load_file
from typer.testing import CliRunner

import tokkit
from tokkit.cli.app import app
from tokkit.config import TokenizerConfig, TrainConfig
from tokkit.errors import CheckpointError, ConfigError
from tokkit.progress import Reporter
from tokkit.train import train
from tokkit.train_init import freeze, parse_freeze, read_init

PALETTE = np.array([[r, g, b] for r in (30, 220) for g in (30, 220) for b in (30, 220)], np.uint8)  # 8 colours


def _blocks(n: int, cell: int, seed: int) -> np.ndarray:
    """(n, 16, 16, 3) uint8 images of cell x cell squares of the 8 palette colours."""
    grid = np.random.default_rng(seed).integers(0, len(PALETTE), (n, 16 // cell, 16 // cell))
    return PALETTE[grid.repeat(cell, 1).repeat(cell, 2)]


def _cfg(steps: int, **kw) -> TrainConfig:
    base = dict(steps=steps, batch_size=8, lr=2e-3, warmup_steps=5, log_every=5, eval_every=0, checkpoint_every=0,
                eval_images=4, perceptual="none", ema_decay=0.9, cpu_threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


class Notes(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A VQ tokenizer trained on 2x2-block images (data A), and a folder of 4x4-block images (data B, other data)."""
    root = tmp_path_factory.mktemp("init")
    np.save(root / "a.npy", _blocks(64, 2, seed=0))
    np.save(root / "b.npy", _blocks(64, 4, seed=1))
    tok = TokenizerConfig(resolution=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=8,
                          quantizer="vq",
                          quantizer_kwargs={"codebook_size": 16, "kmeans_init": True, "dead_code_threshold": 1.0})
    train(tok, _cfg(60), str(root / "a.npy"), root / "base", device="cpu")
    return root, root / "base", root / "b.npy"


def _images(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 16, 16) in [-1, 1]


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def test_frozen_codebook_fine_tune_keeps_ids_decodable_by_the_original(base):
    root, src, data_b = base
    notes = Notes()
    result = train(None, _cfg(30), str(data_b), root / "ft-q", device="cpu", init_from=src, freeze=["quantizer"],
                   reporter=notes)  # fmt: skip
    assert result.step == 30 and not notes.lines
    a = load_file(str(src / "checkpoint" / "model.safetensors"))
    b = load_file(str(result.checkpoint / "model.safetensors"))
    for key in ("quantizer.codebook", "quantizer.embed_avg", "quantizer.cluster_size"):
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key  # byte for byte
    assert not torch.equal(a["encoder.conv_in.weight"], b["encoder.conv_in.weight"])  # the rest did train
    assert not torch.equal(a["decoder.conv_out.weight"], b["decoder.conv_out.weight"])

    x = _images(data_b)
    original, tuned = tokkit.load(src), tokkit.load(result.checkpoint)
    with torch.no_grad():
        ids = tuned.encode(x)
        cross = _mse(original.decode(ids), x)  # the new ids through the ORIGINAL decoder
        own = _mse(original.decode(original.encode(x)), x)  # the original model on the same images
        shuffled = _mse(original.decode(ids.roll(1, 0)), x)  # another image's ids: what "not sensible" looks like
    assert cross < 1.2 * own, (cross, own)
    assert cross < 0.8 * shuffled, (cross, shuffled)

    # recorded: where it started (path + the sha256 of its weights) and what was frozen, in run.json and checkpoint
    sha = json.loads((src / "checkpoint" / "config.json").read_text())["weights_sha256"]
    rec = json.loads((root / "ft-q" / "run.json").read_text())
    assert rec["init_from"] == {"source": str(src.resolve()), "sha256": sha} and rec["freeze"] == ["quantizer"]
    assert result.init_from == rec["init_from"] and result.freeze == ["quantizer"]
    extra = json.loads((result.checkpoint / "config.json").read_text())["extra"]
    assert extra["init_from"]["sha256"] == sha and extra["freeze"] == ["quantizer"]


def test_encoder_and_codebook_frozen_give_identical_ids(base):
    root, src, data_b = base
    result = train(None, _cfg(6), str(data_b), root / "ft-eq", device="cpu", init_from=src,
                   freeze=["encoder,quantizer"])  # fmt: skip
    original, tuned = tokkit.load(src), tokkit.load(result.checkpoint)
    x = _images(data_b)
    with torch.no_grad():
        assert torch.equal(original.encode(x), tuned.encode(x))
    assert not torch.equal(original.decoder.conv_out.weight, tuned.decoder.conv_out.weight)


def test_fsq_encoder_frozen_alone_gives_identical_ids(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "fsq")  # FSQ [8,5,5,5] on z_channels=4: no projection, nothing to learn
    data = tmp_path / "b.npy"
    np.save(data, _blocks(16, 4, seed=2))
    notes = Notes()
    result = train(None, _cfg(3, batch_size=4), str(data), tmp_path / "ft", device="cpu", init_from=src,
                   freeze=["encoder", "quantizer"], reporter=notes)  # fmt: skip
    assert any("has no codebook or projection to learn" in n for n in notes.lines), notes.lines
    x = _images(data)
    with torch.no_grad():
        assert torch.equal(tokkit.load(src).encode(x), tokkit.load(result.checkpoint).encode(x))


def test_freeze_survives_train_mode_and_deepcopy(base):
    _, src, _ = base
    model = tokkit.load(src)
    notes = freeze(model, ["encoder"])
    assert any("token ids can change" in n for n in notes)  # a learned codebook without --freeze quantizer
    model.train()
    ema = copy.deepcopy(model)
    ema.train()
    for m in (model, ema):
        assert not m.encoder.training and m.decoder.training and m.quantizer.training
        assert not any(p.requires_grad for p in m.encoder.parameters())
    assert read_init(src).sha256 == json.loads((src / "checkpoint" / "config.json").read_text())["weights_sha256"]


def test_parse_freeze():
    assert parse_freeze(["decoder", " encoder,decoder"]) == ("encoder", "decoder")  # model order, no repeats
    assert parse_freeze(None) == ()
    with pytest.raises(ConfigError, match="unknown --freeze codebook"):
        parse_freeze(["codebook"])
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        parse_freeze(["encoder,quantizer,decoder"])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--init-from", "{root}/missing"], "--init-from {root}/missing: no such file or folder"),
        (["--init-from", "{src}", "--freeze", "codebook"], "unknown --freeze codebook"),
        (["--freeze", "quantizer"], "--freeze needs --init-from"),
        (["--init-from", "{src}", "--set", "tokenizer.z_channels=4"], "fixes the tokenizer config"),
        (["--init-from", "{src}", "--freeze", "decoder", "--set", "train.disc_weight=0.1", "--set",
          "train.disc_layers=1"], "adaptive GAN weight"),
    ],
    ids=["missing", "bad-freeze", "freeze-alone", "contradicting-set", "decoder-gan"],
)
def test_cli_refuses_in_one_line(base, tmp_path, extra, needle):
    root, src, data_b = base
    fill = {"root": str(root), "src": str(src)}
    args = ["train", "--data", str(data_b), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
            "--perceptual", "none", *[a.format(**fill) for a in extra]]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle.format(**fill) in lines[0], result.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_cli_fine_tune_repeating_the_same_tokenizer_settings_is_fine(base, tmp_path):
    _, src, data_b = base
    result = CliRunner().invoke(app, [
        "train", "--init-from", str(src), "--freeze", "quantizer", "--data", str(data_b), "--out", str(tmp_path / "r"),
        "--steps", "2", "--batch-size", "4", "--device", "cpu", "--quiet", "--perceptual", "none",
        "--set", "tokenizer.z_channels=8", "--set", "train.eval_images=4", "--set", "train.eval_every=0", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 2
    assert tokkit.load(tmp_path / "r").config == tokkit.load(src).config


@pytest.mark.slow
def test_resume_after_a_kill_never_reads_the_source_again(base, tmp_path):
    root, src, data_b = base
    source = tmp_path / "source"
    shutil.copytree(src / "checkpoint", source)
    sets = ["train.eval_images=4", "train.eval_every=0", "train.checkpoint_every=2", "train.cpu_threads=1",
            "train.warmup_steps=1"]

    def args(out: Path) -> list[str]:
        return ["train", "--init-from", str(source), "--freeze", "quantizer", "--data", str(data_b), "--out", str(out),
                "--steps", "4", "--batch-size", "4", "--device", "cpu", "--quiet", "--perceptual", "none",
                *[a for s in sets for a in ("--set", s)]]  # fmt: skip

    env = {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    full = run_tokkit(args(tmp_path / "straight"), env=env, log=tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr[-3000:]
    commits = op_indices(full.ops, "replace", "save.json")
    assert len(commits) == 2  # the saves at steps 2 and 4
    killed = run_tokkit(args(tmp_path / "killed"), kill_at=commits[1], env=env, log=tmp_path / "killed.jsonl")
    assert killed.killed
    shutil.move(source, tmp_path / "moved")  # the source is gone: resuming must not need it
    resumed = CliRunner().invoke(app, [*args(tmp_path / "killed"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    original = load_file(str(src / "checkpoint" / "model.safetensors"))
    assert torch.equal(b["quantizer.codebook"], original["quantizer.codebook"])
    rec = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert rec["init_from"]["source"] == str(source.resolve()) and rec["freeze"] == ["quantizer"]
    # resuming with another --freeze is refused in one line
    other = CliRunner().invoke(app, [*args(tmp_path / "killed"), "--resume", "--freeze", "encoder"])
    assert other.exit_code == 2 and "drop --freeze" in other.stderr


def test_resume_before_the_first_save_reads_the_source_again_and_checks_it(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src")
    data = tmp_path / "b.npy"
    np.save(data, _blocks(16, 4, seed=3))
    out = tmp_path / "run"
    train(None, _cfg(2, batch_size=4), str(data), out, device="cpu", init_from=src, freeze=["encoder"])
    shutil.rmtree(out / "train_state")
    shutil.rmtree(out / "checkpoint")  # as if killed before its first save: only run.json is left
    again = train(None, _cfg(2, batch_size=4), None, out, resume=True, device="cpu")
    assert again.step == 2 and again.freeze == ["encoder"] and again.init_from["source"] == str(src.resolve())
    shutil.rmtree(out / "train_state")
    shutil.rmtree(out / "checkpoint")
    make_tiny_checkpoint(src, seed=1)  # the source changed since the run started
    with pytest.raises(CheckpointError, match="changed since the run started"):
        train(None, _cfg(2, batch_size=4), None, out, resume=True, device="cpu")
