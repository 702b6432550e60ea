"""The training loop: each quantizer learns, checkpoints load, evaluation artefacts, errors, divergence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tokkit
from tokkit.config import TokenizerConfig, TrainConfig
from tokkit.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from tokkit.progress import RecordingReporter
from tokkit.train import lr_at, train

QUANTIZERS = {
    "fsq": {"z_channels": 4, "quantizer_kwargs": {"levels": [5, 5, 5]}},
    "vq": {"z_channels": 8, "quantizer_kwargs": {"codebook_size": 64}},
    "lfq": {"z_channels": 6, "quantizer_kwargs": {"codebook_size": 64}},
}


def tiny_tok(quantizer: str = "fsq", **kw) -> TokenizerConfig:
    base = {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1}
    return TokenizerConfig(**{**base, "quantizer": quantizer, **QUANTIZERS[quantizer], **kw})


def tiny_train(**kw) -> TrainConfig:
    base = {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "log_every": 1, "eval_every": 15,
            "checkpoint_every": 15, "eval_images": 8, "perceptual": "none", "ema_decay": 0.9, "cpu_threads": 1}
    return TrainConfig(**{**base, **kw})


def losses(run) -> list[float]:
    return [r["rec_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("quantizer", ["fsq", "vq", "lfq"])
def test_tiny_model_learns_with_each_quantizer(tmp_path, quantizer):
    rep = RecordingReporter()
    res = train(tiny_tok(quantizer), tiny_train(), "sample", tmp_path / "run", device="cpu", reporter=rep)
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:5]), curve
    assert res.step == 30 and res.metrics["psnr"] > 10 and 0 < res.metrics["usage"] <= 1
    assert rep.phases and rep.last_completed == 30 and "img/s" in rep.last_fields
    # artefacts: a loadable checkpoint, grids, metrics with evaluations
    tok = tokkit.load(res.checkpoint)
    assert tok.config == tiny_tok(quantizer)
    assert [p.name for p in res.grids] == ["step-0000015.png", "step-0000030.png"]
    evals = [json.loads(ln) for ln in res.metrics_file.read_text().splitlines() if '"eval"' in ln]
    assert {"psnr", "ssim", "usage", "perplexity"} <= set(evals[-1])


def test_gan_lecam_and_perceptual_paths_run(tmp_path):
    metrics = pytest.importorskip("tokkit.metrics")
    metrics.make_placeholder_weights("alexnet", tmp_path / "w")
    metrics.make_placeholder_weights("lpips-alex", tmp_path / "w")
    cfg = tiny_train(steps=4, disc_weight=0.5, disc_start=2, lecam_weight=0.01, disc_channels=8, disc_layers=2,
                     perceptual="lpips", eval_every=0, checkpoint_every=0)
    res = train(tiny_tok(), cfg, "sample", tmp_path / "run", device="cpu", weights_dir=tmp_path / "w")
    assert res.perceptual
    recs = [json.loads(ln) for ln in res.metrics_file.read_text().splitlines()]
    assert "g_loss" not in recs[0] and {"g_loss", "g_weight", "d_loss", "lpips_loss"} <= set(recs[3])
    assert (tmp_path / "run" / "train_state" / "disc.safetensors").is_file()


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    rep = RecordingReporter()
    res = train(tiny_tok(), tiny_train(steps=6, eval_images=2, batch_size=4), folder, tmp_path / "run",
                device="cpu", reporter=rep)
    assert res.bad_images == 1 and res.step == 6
    assert any("bad.png" in m for m in rep.messages)


def test_missing_and_empty_data_are_data_errors(tmp_path):
    with pytest.raises(DataError):
        train(tiny_tok(), tiny_train(), tmp_path / "nope", tmp_path / "run", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        train(tiny_tok(), tiny_train(), tmp_path / "empty", tmp_path / "run", device="cpu")


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    train(tiny_tok(), tiny_train(steps=2, eval_every=0, checkpoint_every=0), "sample", tmp_path / "run", device="cpu")
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_tok(), tiny_train(steps=2), "sample", tmp_path / "run", device="cpu")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_tok(), tiny_train(steps=2), "sample", tmp_path / "other", resume=True, device="cpu")
    with pytest.raises(ConfigError, match="another tokenizer config"):
        train(tiny_tok(base_channels=16), tiny_train(steps=4), "sample", tmp_path / "run", resume=True, device="cpu")
    # resuming a finished run with more steps extends it
    res = train(tiny_tok(), tiny_train(steps=4, eval_every=0, checkpoint_every=0), "sample", tmp_path / "run",
                resume=True, device="cpu")
    assert res.resumed_from == 2 and res.step == 4


def test_nan_loss_names_step_and_last_checkpoint(tmp_path):
    cfg = tiny_train(steps=8, checkpoint_every=3, eval_every=0, lr=1e30, warmup_steps=1, grad_clip=0.0)
    with pytest.raises(TrainingDiverged) as e:
        train(tiny_tok(quantizer="vq"), cfg, "sample", tmp_path / "run", device="cpu")
    msg = str(e.value)
    assert "at step" in msg and "last good checkpoint" in msg and "\n" not in msg


def test_final_checkpoint_holds_ema_weights(tmp_path):
    from safetensors.torch import load_file

    train(tiny_tok(), tiny_train(steps=5, eval_every=0, checkpoint_every=0), "sample", tmp_path / "run", device="cpu")
    ckpt = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    ema = load_file(str(tmp_path / "run" / "train_state" / "ema.safetensors"))
    raw = load_file(str(tmp_path / "run" / "train_state" / "model.safetensors"))
    assert all(torch.equal(ckpt[k], ema[k]) for k in ckpt)
    assert any(not torch.equal(ckpt[k], raw[k]) for k in ckpt)
