"""kill -9 at any file operation of tokkit encode: the same command then resumes, removes the temporaries the
interrupted write left, and the result equals an uninterrupted run byte for byte (issue 8.3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_folder, make_tiny_checkpoint
from killpoints import first_op, run_tokkit
from typer.testing import CliRunner

from tokkit.cli.app import app
from tokkit.shards import temporaries

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
runner = CliRunner()


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kill")
    ckpt = make_tiny_checkpoint(root / "ck")
    data = make_folder(root / "data", n=8)

    def args(out: Path) -> list[str]:
        return ["encode", str(ckpt), str(data), "--out", str(out), "--shard-size", "4", "-j", "0", "--device", "cpu",
                "--quiet"]  # fmt: skip

    full = run_tokkit(args(root / "ref"), cwd=root, env={"OMP_NUM_THREADS": "1"})
    assert full.returncode == 0, full.stderr
    return {"root": root, "args": args, "ops": full.ops, "ref": tree_bytes(root / "ref")}


@pytest.mark.parametrize(
    "kind, contains, left",
    [
        ("open:w", ".plan.json.tmp", 0),  # out/ made, nothing in it
        ("fsync", ".plan.json.tmp", 1),  # out/ holds only .plan.json.tmp-*: used to be refused as not ours
        ("replace", "plan.json", 1),
        ("replace", "shard-000001.codes.npy", 1),  # shard 0 committed, shard 1 half-written
        ("replace", "shard-000001.done.json", 1),  # shard 1's files in place, its marker not
        ("replace", "manifest.json", 1),  # every shard committed, no manifest yet
    ],
)
def test_resume_after_kill(setup: dict, tmp_path: Path, kind: str, contains: str, left: int) -> None:
    ops = setup["ops"]
    at = first_op(ops, kind, contains) if kind != "fsync" else first_op(ops, "open:w", contains) + 1
    out = tmp_path / "out"
    killed = run_tokkit(setup["args"](out), kill_at=at, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert killed.killed, killed.stderr
    assert len(temporaries(out)) == left and not (out / "manifest.json").exists()
    r = runner.invoke(app, setup["args"](out))  # the same command, run again
    assert r.exit_code == 0, r.output
    assert not temporaries(out) and not list(out.rglob(".*.tmp-*"))
    assert tree_bytes(out) == setup["ref"]
