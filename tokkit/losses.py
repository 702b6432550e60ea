"""Training losses: reconstruction, LPIPS perceptual, hinge adversarial with the VQGAN adaptive weight, LeCam.

All images are float (B, 3, H, W) in [-1, 1]. The quantizer's auxiliary loss comes ready-weighted in
``QuantizerOutput.loss``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokkit.distributed import all_reduce_mean_
from tokkit.errors import ConfigError, WeightsError
from tokkit.progress import Reporter, resolve


def reconstruction_loss(reconstruction: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error, a scalar."""
    if kind == "l1":
        return (reconstruction - target).abs().mean()
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    raise ConfigError(f"unknown reconstruction loss {kind!r}: use l1 or l2")


def build_perceptual(
    mode: str,
    net: str = "alex",
    weights_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
) -> nn.Module | None:
    """The LPIPS distance for training, or None.

    Args:
        mode: ``auto`` (LPIPS when its weights can be had; otherwise say so once through ``reporter`` and return
            None), ``lpips`` (required: a ``WeightsError`` when unavailable) or ``none``.
        net: LPIPS backbone, ``alex`` or ``vgg``.
        weights_dir: folder with the weights (else ``$TOKKIT_WEIGHTS_DIR``, the caches, the download).
        device: where the module lives.
        reporter: receives the one-line notice in ``auto`` mode.

    Returns:
        A frozen module mapping two image batches to (B,) distances, or None.
    """
    if mode == "none":
        return None
    if mode not in ("auto", "lpips"):
        raise ConfigError(f"unknown perceptual mode {mode!r}: use auto, lpips or none")
    from tokkit.metrics import load_lpips

    try:
        return PerceptualLoss(load_lpips(net, weights_dir=weights_dir, device=device))
    except WeightsError as e:
        if mode == "lpips":
            raise WeightsError(f"--perceptual lpips needs the LPIPS weights: {e}") from None
        resolve(reporter).message(
            f"LPIPS weights not available ({e}); training without the perceptual loss (--perceptual none to silence)"
        )
        return None


class PerceptualLoss(nn.Module):
    """An LPIPS distance that first upsamples images smaller than ``min_size`` (AlexNet needs >= ~32 px)."""

    def __init__(self, distance: nn.Module, min_size: int = 64) -> None:
        super().__init__()
        self.distance = distance
        self.min_size = min_size

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """(B, 3, H, W) x 2 in [-1, 1] -> (B,) distances."""
        if min(a.shape[-2:]) < self.min_size:
            scale = self.min_size / min(a.shape[-2:])
            a, b = (F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False) for t in (a, b))
        return self.distance(a, b)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: ``mean(relu(1 - real)) + mean(relu(1 + fake))``, halved."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator (tokenizer) adversarial loss: ``-mean(fake logits)``."""
    return -fake_logits.mean()


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive generator weight ``||dL_rec/dW|| / (||dL_adv/dW|| + 1e-4)`` at the decoder's last layer.

    Both gradients are taken w.r.t. ``last_layer`` only (``retain_graph``), so the caller's backward still works.
    Returns a detached scalar in [0, max_weight].
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al., 2021): keeps discriminator logits near EMA anchors of the other side.

    ``reg = mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)``; the anchors are buffers
    (averaged over ranks), so they are saved and restored with the training state.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Update the anchors with this batch's mean logits and return the regulariser (a scalar)."""
        with torch.no_grad():
            means = all_reduce_mean_(torch.stack([real_logits.float().mean(), fake_logits.float().mean()]))
            self.ema_real.mul_(self.decay).add_(means[0], alpha=1 - self.decay)
            self.ema_fake.mul_(self.decay).add_(means[1], alpha=1 - self.decay)
        return (F.relu(real_logits - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake_logits).pow(2).mean())


__all__ = [
    "LeCam",
    "PerceptualLoss",
    "adaptive_weight",
    "build_perceptual",
    "hinge_d_loss",
    "hinge_g_loss",
    "reconstruction_loss",
]
