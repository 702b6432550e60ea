"""Small runtime helpers shared by the entry points: device choice and seeding."""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from tokkit.errors import ConfigError, TokkitError

if TYPE_CHECKING:  # torch and numpy are imported where used: the CLI checks the torch version without loading torch
    import torch

# torch.load(weights_only=True) is how tokkit reads anything saved with torch.save (metric weights here, train_state/
# on --resume). Published advisories show it bypassable for code execution up to torch 2.5.1 (CVE-2025-32434) and
# memory-unsafe on crafted inputs up to 2.9.1, so older torch is refused (pyproject.toml asks for the same floor).
TORCH_MIN = (2, 10)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA if available else CPU; otherwise the named device, checked to exist."""
    import torch

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
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_torch_version(version: str | None = None) -> None:
    """Refuse a torch whose ``torch.load(weights_only=True)`` is unsafe on untrusted files (see ``TORCH_MIN``).

    Args:
        version: the version string to judge; default ``torch.__version__`` when torch is loaded, else the installed
            distribution's version (``importlib.metadata``), so that the check does not load torch.

    Raises:
        TokkitError: one line naming the installed version and the upgrade command.
    """
    if version is None:
        version = _torch_version()
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m[1]), int(m[2])) < TORCH_MIN:
        floor = ".".join(map(str, TORCH_MIN))
        raise TokkitError(
            f"torch {version} is too old for tokkit: its torch.load(weights_only=True) can run code or corrupt memory "
            f"from a crafted file (CVE-2025-32434 and later advisories); upgrade: pip install -U 'torch>={floor}'"
        )


def _torch_version() -> str:
    import sys

    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("torch")
    except PackageNotFoundError:  # a source build without metadata: ask torch itself
        import torch

        return str(torch.__version__)
