"""Drop a tokkit quantizer into a model of your own.

A tiny convolutional autoencoder (yours, not tokkit's) gets a discrete bottleneck from ``tokkit.quantizers``; it trains
for a few steps on synthetic images and reports codebook usage. Any registered quantizer fits the same slot, because
every one takes channel-first latents and returns the same ``QuantizerOutput``.

    python examples/quantizer_in_your_model.py                 # FSQ, VQ and LFQ in turn
    python examples/quantizer_in_your_model.py --quantizer vq  # one of them
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from tokkit.quantizers import CodebookUsage, build_quantizer

# a quantizer per family, all 2^10 codes, all built by registered name from JSON-friendly kwargs
QUANTIZERS = {
    "fsq": {"name": "fsq", "levels": [8, 5, 5, 5]},
    "vq": {"name": "vq", "codebook_size": 1024, "codebook_dim": 8, "cosine": True, "kmeans_init": True,
           "dead_code_threshold": 0.5},
    "lfq": {"name": "lfq", "codebook_size": 1024},
}  # fmt: skip


class TinyAutoencoder(nn.Module):
    """Your model: 32x32 images -> an 8x8 grid of latents -> quantizer -> back to images."""

    def __init__(self, quantizer: dict, latent_dim: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, latent_dim, 4, stride=2, padding=1),
        )  # fmt: skip
        kwargs = dict(quantizer)
        self.quantizer = build_quantizer(kwargs.pop("name"), dim=latent_dim, **kwargs)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 32, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1),
        )  # fmt: skip

    def forward(self, images: torch.Tensor):
        out = self.quantizer(self.encoder(images))  # (B, 16, 8, 8) -> QuantizerOutput
        return self.decoder(out.codes), out


def synthetic_images(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour blobs in [-1, 1], (B, 3, 32, 32)."""
    low = torch.rand(batch, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False)


def train(family: str, steps: int = 40, batch: int = 16, seed: int = 0) -> dict:
    """Train the tiny model with one quantizer family; return the final loss and the codebook usage."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyAutoencoder(QUANTIZERS[family])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        images = synthetic_images(batch, gen)
        recon, out = model(images)
        loss = F.mse_loss(recon, images) + out.loss  # the quantizer's auxiliary loss is already weighted
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    usage = CodebookUsage(model.quantizer.codebook_size)
    with torch.no_grad():
        for _ in range(8):
            usage.update(model(synthetic_images(batch, gen))[1].indices)
    return {"recon_mse": F.mse_loss(recon, images).item(), "codebook_size": usage.codebook_size, **usage.compute()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantizer", choices=sorted(QUANTIZERS), action="append")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for family in args.quantizer or list(QUANTIZERS):
        r = train(family, steps=args.steps)
        print(
            f"{family}: recon mse {r['recon_mse']:.4f} | codebook usage {r['used']}/{r['codebook_size']} codes "
            f"({r['usage']:.1%}), perplexity {r['perplexity']:.1f}, entropy {r['entropy_bits']:.2f} bits"
        )


if __name__ == "__main__":
    main()
