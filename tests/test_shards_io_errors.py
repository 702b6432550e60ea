"""A full disk, a read-only folder, an --out in the way: one line, nothing half-written looks complete, and the same
command resumes once the cause is gone (issue 12.7). Failures are simulated deterministically: the file writer
raises the OSError at its N-th call (tests run as root, which ignores chmod)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from helpers import make_folder, make_tiny_checkpoint
from PIL import Image
from typer.testing import CliRunner

import tokkit.shards
from tokkit.cli.app import app
from tokkit.errors import ShardError
from tokkit.shards import open_shards, temporaries

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
KW = {"shard_size": 4, "batch_size": 4, "workers": 0, "device": "cpu"}


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tokkit.encode import encode_dataset

    root = tmp_path_factory.mktemp("io")
    ckpt = make_tiny_checkpoint(root / "ck")
    data = make_folder(root / "data", n=10)
    encode_dataset(ckpt, data, root / "ref", **KW)
    return {"ckpt": ckpt, "data": data, "ref": tree_bytes(root / "ref")}


def fail_at(monkeypatch: pytest.MonkeyPatch, n: int, code: int = errno.ENOSPC) -> list[str]:
    """Make the n-th file write (1-based) and every later one fail with ``code``; returns the names written."""
    real, seen = tokkit.shards.write_durable, []

    def write(path: Path, data: bytes, fsync: bool) -> None:
        seen.append(path.name)
        if len(seen) >= n:
            raise OSError(code, __import__("os").strerror(code), str(path))
        real(path, data, fsync)

    monkeypatch.setattr(tokkit.shards, "write_durable", write)
    return seen


# writes of a fresh encode of 10 inputs in shards of 4: plan.json, 3 x (codes, labels, keys, done), errors, manifest
@pytest.mark.parametrize(
    "n", [1, 3, 6, 13, 14, 15, 16], ids=["plan", "s0-labels", "s1-codes", "s2-done", "errors", "manifest", "none"]
)
def test_full_disk_during_encode(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    from tokkit.encode import encode_dataset

    out = tmp_path / "out"
    seen = fail_at(monkeypatch, n)
    if n == 16:  # one past the last write: nothing fails (checks the count above)
        assert encode_dataset(setup["ckpt"], setup["data"], out, **KW).complete and len(seen) == 15
        return
    with pytest.raises(ShardError, match="No space left on device; free some space, then run the same command") as e:
        encode_dataset(setup["ckpt"], setup["data"], out, **KW)
    assert "\n" not in str(e.value)
    assert not temporaries(out) and not (out / "manifest.json").exists()  # nothing looks complete
    monkeypatch.undo()  # space freed
    res = encode_dataset(setup["ckpt"], setup["data"], out, **KW)
    assert res.complete and res.resumed == {1: 0, 3: 0, 6: 1, 13: 2, 14: 3, 15: 3}[n]
    assert tree_bytes(out) == setup["ref"]


def test_full_disk_is_one_line_on_the_cli(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_at(monkeypatch, 6)
    argv = ["encode", str(setup["ckpt"]), str(setup["data"]), "--out", str(tmp_path / "o"), "--shard-size", "4",
            "-j", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    r = runner.invoke(app, argv)
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "No space left on device" in r.output


def test_an_interrupted_repair_leaves_no_manifest(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokkit.encode import encode_dataset

    out = tmp_path / "out"
    encode_dataset(setup["ckpt"], setup["data"], out, **KW)
    f = out / "shards" / "shard-000001.codes.npy"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    fail_at(monkeypatch, 2)  # the repaired shard's labels
    with pytest.raises(ShardError, match="No space left"):
        encode_dataset(setup["ckpt"], setup["data"], out, repair=True, **KW)
    with pytest.raises(ShardError, match="run the same tokkit encode again"):
        open_shards(out)  # the old manifest vouched for the damaged shard: it is gone
    monkeypatch.undo()
    assert encode_dataset(setup["ckpt"], setup["data"], out, repair=True, **KW).repaired == 0  # uncommitted already
    assert tree_bytes(out) == setup["ref"]


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "Read-only file system; make the folder writable"),
                                          (errno.ENOSPC, "No space left on device; free some space")])  # fmt: skip
def test_decode_to_a_read_only_or_full_folder(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, needle: str
) -> None:
    from tokkit.decode import decode_tokens

    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 1000, (5, 8, 8)))
    out = tmp_path / "png"
    fail_at(monkeypatch, 3, code)
    with pytest.raises(ShardError, match=needle) as e:
        decode_tokens(setup["ckpt"], ids, out, batch_size=2, device="cpu")
    assert "\n" not in str(e.value)
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["000000.png", "000001.png"]  # complete files only, no temporaries
    assert all(Image.open(p).size == (16, 16) for p in written)
    r = runner.invoke(app, ["decode", str(setup["ckpt"]), str(ids), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 2 and "Traceback" not in r.output and needle.split(";")[0] in r.output
    monkeypatch.undo()
    (out / ".000004.png.tmp-0a1b2c3d").write_bytes(b"half")  # what kill -9 leaves
    (out / ".notes.txt.tmp-0a1b2c3d").write_bytes(b"not ours")
    res = decode_tokens(setup["ckpt"], ids, out, device="cpu")  # the same command, once writable again
    assert res.count == len(res.files) == 5
    assert sorted(out.iterdir()) == sorted([*res.files, out / ".notes.txt.tmp-0a1b2c3d"])
