"""PatchGAN discriminator (pix2pix / VQGAN ``NLayerDiscriminator``): one real/fake logit per image patch.

GroupNorm instead of BatchNorm, so that it needs no synchronised statistics under DDP and behaves the same in a
single process and across ranks. Axis legend: B batch, C channels, H/W image size, h/w patch grid.
"""

from __future__ import annotations

from torch import Tensor, nn

from tokkit.models.layers import num_groups_for


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) -> patch logits (B, 1, h, w)."""

    def __init__(self, *, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        """Build the discriminator.

        Args:
            in_channels: image channels.
            channels: channels of the first layer; doubled per strided layer up to 8x.
            num_layers: stride-2 layers after the first (each halves H and W).
        """
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(num_groups_for(out), out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1, h, w) logits."""
        return self.net(x)


__all__ = ["PatchDiscriminator"]
