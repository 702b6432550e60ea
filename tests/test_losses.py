"""Losses: reconstruction, perceptual modes, hinge GAN, adaptive weight, LeCam, the PatchGAN."""

from __future__ import annotations

import pytest
import torch

from tokkit.errors import ConfigError, WeightsError
from tokkit.losses import (
    LeCam,
    adaptive_weight,
    build_perceptual,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from tokkit.models.discriminator import PatchDiscriminator
from tokkit.progress import RecordingReporter


def test_reconstruction_losses():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(a, b, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(a, b, "l2").item() == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        reconstruction_loss(a, b, "l3")


def test_hinge_losses():
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake).item() == 0.0  # both beyond the margin
    assert hinge_d_loss(-real, -fake).item() == pytest.approx(3.0)
    assert hinge_g_loss(fake).item() == pytest.approx(2.0)


def test_adaptive_weight_balances_gradients():
    w = torch.ones(3, requires_grad=True)
    nll = (w * 4).sum()
    g = (w * 2).sum()
    assert adaptive_weight(nll, g, w).item() == pytest.approx(2.0, rel=1e-3)
    (nll + g).backward()  # graph still usable afterwards
    assert torch.equal(w.grad, torch.full((3,), 6.0))


def test_lecam_updates_anchors_and_penalises():
    lecam = LeCam(decay=0.0)
    reg = lecam(torch.full((4,), 3.0), torch.full((4,), -3.0))
    assert lecam.ema_real.item() == 3.0 and lecam.ema_fake.item() == -3.0
    assert reg.item() == pytest.approx(72.0)  # relu(3 - -3)^2 + relu(3 - -3)^2
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}


@pytest.mark.parametrize("layers", [2, 3])
def test_patch_discriminator_shapes(layers):
    d = PatchDiscriminator(channels=8, num_layers=layers)
    out = d(torch.randn(2, 3, 32, 32))
    assert out.shape[:2] == (2, 1) and out.shape[-1] >= 1


def test_perceptual_none_and_bad_mode():
    assert build_perceptual("none") is None
    with pytest.raises(ConfigError):
        build_perceptual("maybe")


def test_perceptual_auto_without_weights_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    rep = RecordingReporter()
    assert build_perceptual("auto", weights_dir=tmp_path / "empty", reporter=rep) is None
    assert len(rep.messages) == 1 and "without the perceptual loss" in rep.messages[0]
    with pytest.raises(WeightsError) as e:
        build_perceptual("lpips", weights_dir=tmp_path / "empty")
    assert "\n" not in str(e.value)


@pytest.fixture
def placeholder_lpips_dir(tmp_path):
    metrics = pytest.importorskip("tokkit.metrics")
    if not hasattr(metrics, "make_placeholder_weights"):
        pytest.skip("tokkit.metrics.make_placeholder_weights not available")
    metrics.make_placeholder_weights("alexnet", tmp_path / "w")
    metrics.make_placeholder_weights("lpips-alex", tmp_path / "w")
    return tmp_path / "w"


def test_perceptual_lpips_with_local_weights(placeholder_lpips_dir):
    lp = build_perceptual("lpips", weights_dir=placeholder_lpips_dir)
    assert lp is not None
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)  # small images are upsampled first
    d = lp(x, torch.zeros(2, 3, 16, 16))
    assert d.shape == (2,)
    d.sum().backward()
    assert x.grad is not None and all(not p.requires_grad for p in lp.parameters())
