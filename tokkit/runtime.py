"""Small runtime helpers shared by the entry points: device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from tokkit.errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA if available else CPU; otherwise the named device, checked to exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible: use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
