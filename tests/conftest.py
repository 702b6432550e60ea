"""Fixtures shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# the shared, read-only assets live beside the checkout: <repo>/../shared/assets (CI clones with shared/ beside it)
SHARED_ASSETS = Path(os.environ.get("TOKKIT_SHARED_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))

# the machine has 2 cores and several test processes may share it; keep intra-op threads bounded and results stable
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def shared_assets() -> Path:
    """Path to ../shared/assets; skips the test (with the reason) when the folder is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {SHARED_ASSETS} (set TOKKIT_SHARED_ASSETS, or clone beside shared/)")
    return SHARED_ASSETS


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and identically across processes) on one intra-op thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` need a visible CUDA GPU; without one they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
