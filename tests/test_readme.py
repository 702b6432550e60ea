"""The README runs as written (STYLE: documentation runs).

Python blocks: the snippets refer to the quickstart's outputs (``runs/sample-fsq``, ``shards/sample``); the fixture
makes small stand-ins for them in a temporary working directory instead of training for minutes, then every
```python block of README.md is executed, in order, in one namespace per block.

Shell blocks: every ```bash block is a step of one walk-through that a new user pastes, in order, into a shell at the
root of a fresh clone. The test runs them in that order in one temporary folder (a stand-in for the clone: ``python
benchmarks/...`` reads this checkout's scripts), scaled down by ``SCALE`` below so that the whole walk-through takes
seconds: every command is the README's, only sizes change (and the benchmarks run fewer rows and cases). ``tokkit ...``
runs in this process through the typer app (the console script's parsing, without a Python start-up per command),
``python benchmarks/...`` in a subprocess. A block is not run when its first line is one of the ``NOT_RUN`` comments
(an install step, examples on data a new user does not have: ``photos/``, ``imagenet/``, or the test suite itself); it
is reported as skipped with that line. A block that reads ``../shared/`` (the CIFAR-10 archives, or a benchmark that
loads them: ``NEEDS_ASSETS``) runs when the shared assets are present and is skipped with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import SHARED_ASSETS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)

# first lines that mark a shell block as not part of the runnable walk-through (shown to the reader as well)
NOT_RUN = ("# install", "# example", "# tests")
# a block holding one of these needs ../shared/assets
NEEDS_ASSETS = ("../shared/", "benchmarks/cifar10.py", "benchmarks/encode.py")

# an 8-channel model evaluated on 4 images at the end; tokkit train also trains it at 16 px with no LPIPS
TINY_SETS = "--set tokenizer.base_channels=8 --set train.eval_images=4 --set train.eval_every=0"
TINY_SPEED = f"--set tokenizer.resolution=16 --set tokenizer.channel_mult=[1,2] {TINY_SETS}"
TINY_TRAIN = f"--perceptual none --set tokenizer.resolution=16 --set tokenizer.channel_mult=[1,2] {TINY_SETS}"

# applied to every command line, in order, before it runs: the README's commands at test size
SCALE: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^nice -n \d+ ", ""),  # priority only
    # step budgets shrink 300x (at least 2), so a resume to 1200 steps still goes past the first run's 600 -> 2
    (r"--steps (\d+)", lambda m: f"--steps {max(2, int(m[1]) // 300)}"),
    # a new run (not a resume: that keeps the run's own config) trains the tiny model, 2 steps unless told otherwise
    (r"^tokkit train\b(?!.*--resume)", f"tokkit train --steps 2 {TINY_TRAIN}"),
    (r"--num-images \d+", "--num-images 16"),  # tokkit bench
    (r"--eval-images \d+", "--eval-images 20"),  # benchmarks/cifar10.py (20: two images of each class)
    (r"^tokkit bench\b", "tokkit bench --batch-size 8"),
    # two rows of the five; --out: the script's default is the checkout's .bench_out, not the current folder's
    (r"^(python benchmarks/cifar10\.py.*)$", rf"\1 --rows tokkit-fsq bare-ae {TINY_SETS} --out .bench_out"),
    # CIFAR only: the 256 px ImageNet model takes ~1 s per photo on a CPU, even at test size
    (r"^(python benchmarks/encode\.py.*)--which both", r"\1--which cifar"),
    (r"^(python benchmarks/encode\.py.*) --limit \d+", r"\1"),
    (r"--synthetic \d+", "--synthetic 8"),  # benchmarks/encode.py: generated JPEGs
    (r"^(python benchmarks/encode\.py.*)$", r"\1 --limit 4 --batch-size 2"),
    (r"^(python benchmarks/quantizers\.py.*)$", r"\1 --quick --cases fsq --min-time 0.05 --rounds 1"),
    # train_speed --quick: 2 timed steps and 6 training steps of the tiny model
    (r"^(python benchmarks/train_speed\.py.*)$", rf"\1 --steps 2 --train-steps 6 {TINY_SPEED}"),
    (r"\.\./shared/", f"{SHARED_ASSETS.parent}/"),
    # the same walk-through on every CI machine: a visible GPU would otherwise turn on cuda and train.compile
    (r"^(tokkit (?:train|encode|decode|bench)\b.*)$", r"\1 --device cpu"),
]


def scaled(command: str) -> str:
    """One README command line at test size (``SCALE``)."""
    for pattern, repl in SCALE:
        command = re.sub(pattern, repl, command)
    return command


def commands(block: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments and blank lines dropped."""
    lines = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.join(argv) for argv in lines if argv]


def test_readme_has_python_snippets() -> None:
    assert len(BLOCKS) >= 3, "README lost its Python examples"


def test_readme_shell_blocks_are_all_bash() -> None:
    """Every shell block is a ```bash block, so that the walk-through test sees it (```sh, ```shell would hide it)."""
    fences = re.findall(r"^```(.*)$", README, flags=re.M)
    openings, closings = fences[0::2], fences[1::2]
    assert set(closings) == {""} and set(openings) <= {"bash", "python", "text"}, sorted(set(openings))
    assert len(SHELL_BLOCKS) >= 8, "README lost its shell walk-through"


def test_scaled_commands_are_the_readme_commands() -> None:
    """The substitutions only shrink sizes: the command and its subcommand stay the README's."""
    assert scaled("tokkit train").startswith("tokkit train --steps 2 ")
    resume = scaled("tokkit train --out runs/x --resume --steps 1200")
    assert resume == "tokkit train --out runs/x --resume --steps 4 --device cpu"
    bench = scaled("python benchmarks/encode.py --which both --limit 3000 --repeats 2")
    assert bench == "python benchmarks/encode.py --which cifar --repeats 2 --limit 4 --batch-size 2"


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


@pytest.fixture(scope="module")
def clone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the walk-through runs in, shared by every shell block (later blocks use what earlier ones made)."""
    return tmp_path_factory.mktemp("clone")


def run_command(command: str, cwd: Path) -> None:
    """Run one (scaled) README command as a user's shell would, failing the test with its output."""
    argv = shlex.split(command)
    if argv[0] == "tokkit":
        from typer.testing import CliRunner

        from tokkit.cli.app import app

        threads = torch.get_num_threads()  # training sets its own thread count; give the rest of the suite its own back
        try:
            result = CliRunner().invoke(app, argv[1:], env={"COLUMNS": "200", "TOKKIT_OFFLINE": "1"})
        finally:
            torch.set_num_threads(threads)
        assert result.exit_code == 0, f"$ {command}\n{result.output}\n{result.exception!r}"
    elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
        proc = subprocess.run(
            [sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=cwd, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"$ {command}\n{proc.stdout}\n{proc.stderr}"
    else:
        pytest.fail(f"README shell command this test cannot run: {command!r}; mark its block {NOT_RUN} or teach it")


@pytest.mark.parametrize("index", range(len(SHELL_BLOCKS)))
def test_readme_shell_block_runs(
    index: int, clone_dir: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    block = SHELL_BLOCKS[index]
    first = block.splitlines()[0]
    if first.startswith(NOT_RUN):
        pytest.skip(f"README shell block {index} is not part of the walk-through: {first}")
    if any(needle in block for needle in NEEDS_ASSETS):
        request.getfixturevalue("shared_assets")  # skips with the reason when ../shared/assets is absent
    monkeypatch.chdir(clone_dir)
    monkeypatch.setenv("TOKKIT_OFFLINE", "1")
    for command in commands(block):
        run_command(scaled(command), clone_dir)
