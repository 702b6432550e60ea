"""examples/maskgit_on_tokens.py runs end to end at a tiny size (documentation runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "maskgit_on_tokens.py"


@pytest.mark.slow
def test_maskgit_example_tiny(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("maskgit_on_tokens", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = module.main(["--work-dir", str(tmp_path), "--tok-steps", "3", "--limit", "64", "--steps", "4",
                            "--batch-size", "16", "--dim", "32", "--depth", "1", "--heads", "2", "--samples", "4",
                            "--sample-steps", "3"])  # fmt: skip
    finally:
        torch.set_num_threads(old)
    assert grid.is_file() and Image.open(grid).size[0] > 32
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 4
