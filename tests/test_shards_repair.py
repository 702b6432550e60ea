"""Repair: what tokkit verify reports, the command it names fixes, re-encoding exactly the shards that fail; the
result equals an intact run byte for byte (issue 12.5)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers import make_folder, make_tiny_checkpoint
from typer.testing import CliRunner

from tokkit.cli.app import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("repair")
    ckpt = make_tiny_checkpoint(root / "ck")
    data = make_folder(root / "data", n=12, bad={"zero.jpg": b""})

    def args(out: Path) -> list[str]:
        return ["encode", str(ckpt), str(data), "--out", str(out), "--shard-size", "4", "-j", "0", "--device", "cpu",
                "--max-errors", "2", "--quiet"]  # fmt: skip

    r = runner.invoke(app, args(root / "ref"))
    assert r.exit_code == 0, r.output
    return {"args": args, "ref": tree_bytes(root / "ref")}


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    """Shard file -> (inode, mtime): a file that was written again has another."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").iterdir()}


def _rewritten(before: dict, after: dict) -> set[str]:
    return {name for name in after if before.get(name) != after[name]}


def _encode(setup: dict, out: Path) -> str:
    r = runner.invoke(app, setup["args"](out))
    assert r.exit_code == 0, r.output
    return r.output


def _verify_and_repair(out: Path) -> str:
    """Run tokkit verify, check that it fails, run the command it names; returns that run's output."""
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 1, r.output
    cmd = r.output.split("repair with: ", 1)[1].strip()
    argv = shlex.split(cmd)
    assert argv[:2] == ["tokkit", "encode"] and argv[-1] == "--repair"
    fixed = runner.invoke(app, argv[1:])
    assert fixed.exit_code == 0, fixed.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    return fixed.output


def test_a_flipped_byte_is_found_and_repaired(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _encode(setup, out)
    f = out / "shards" / "shard-000001.codes.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # same size, same header: only a re-hash sees it
    f.write_bytes(bytes(data))
    _encode(setup, out)  # a plain rerun trusts sizes and headers ...
    assert f.read_bytes() == bytes(data)
    before = _stamps(out)
    _verify_and_repair(out)  # ... verify's command re-hashes and re-encodes that one shard
    assert {n.split(".")[0] for n in _rewritten(before, _stamps(out))} == {"shard-000001"}
    assert tree_bytes(out) == setup["ref"]


@pytest.mark.parametrize(
    "damage",
    ["delete-labels", "truncate-codes", "garbage-marker", "manifest-n", "no-manifest-no-plan", "keys-line"],
)
def test_damage_is_repaired_byte_for_byte(setup: dict, tmp_path: Path, damage: str) -> None:
    out = tmp_path / "out"
    _encode(setup, out)
    shards = out / "shards"
    if damage == "delete-labels":
        (shards / "shard-000002.labels.npy").unlink()
    elif damage == "truncate-codes":
        (shards / "shard-000000.codes.npy").write_bytes((shards / "shard-000000.codes.npy").read_bytes()[:-5])
    elif damage == "garbage-marker":
        (shards / "shard-000001.done.json").write_text("{")
    elif damage == "manifest-n":
        m = json.loads((out / "manifest.json").read_text())
        m["shards"][0]["n"] -= 1
        (out / "manifest.json").write_text(json.dumps(m))
    elif damage == "no-manifest-no-plan":  # nothing names the command: verify says to run encode again
        (out / "manifest.json").unlink()
        (out / "plan.json").unlink()
        r = runner.invoke(app, ["verify", str(out)])
        assert r.exit_code == 2 and "run the same tokkit encode again" in r.output
        before = _stamps(out)
        _encode(setup, out)  # the markers name this very plan: plan.json is rewritten, no shard encoded again
        assert not _rewritten(before, _stamps(out))
        assert tree_bytes(out) == setup["ref"]
        return
    elif damage == "keys-line":
        keys = shards / "shard-000002.keys.jsonl"
        keys.write_text(keys.read_text().replace('"index": 8', '"index": 9'))  # same size, other content
    _verify_and_repair(out)
    assert tree_bytes(out) == setup["ref"]


def test_cheap_check_on_a_plain_rerun(setup: dict, tmp_path: Path) -> None:
    """A deleted or truncated shard file is re-encoded by the same command, without --repair."""
    out = tmp_path / "out"
    _encode(setup, out)
    (out / "shards" / "shard-000000.keys.jsonl").unlink()
    (out / "shards" / "shard-000002.codes.npy").write_bytes(b"")
    before = _stamps(out)
    _encode(setup, out)
    assert {n.split(".")[0] for n in _rewritten(before, _stamps(out))} == {"shard-000000", "shard-000002"}
    assert tree_bytes(out) == setup["ref"]
