"""The README's Python snippets run as written (STYLE: documentation runs).

The snippets refer to the quickstart's outputs (``runs/sample-fsq``, ``shards/sample``); the fixture makes small
stand-ins for them in a temporary working directory instead of training for minutes, then every ```python block of
README.md is executed, in order, in one namespace per block.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_python_snippets() -> None:
    assert len(BLOCKS) >= 3, "README lost its Python examples"


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding what the quickstart leaves: a sample-fsq run and its shards (small stand-ins)."""
    from tokkit.checkpoint import save_checkpoint
    from tokkit.config import get_preset
    from tokkit.encode import encode_dataset
    from tokkit.models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("sample-fsq").tokenizer, base_channels=8)  # the preset, thinner
    save_checkpoint(Tokenizer(cfg), root / "runs" / "sample-fsq" / "checkpoint")
    encode_dataset(root / "runs" / "sample-fsq", "sample", root / "shards" / "sample", workers=0, device="cpu")
    return root


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, quickstart_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(quickstart_dir)
    monkeypatch.setenv("TOKKIT_OFFLINE", "1")
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})  # raises on any broken snippet
