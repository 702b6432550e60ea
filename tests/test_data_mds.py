"""tokkit.data.mds_source: MDS folders written by mosaicml-streaming's own MDSWriter, read by tokkit's reader."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from tokkit.data import ImageDataset, collate_skip_bad, open_source
from tokkit.errors import DataError, ShardError

pytestmark = pytest.mark.usefixtures("one_thread")
KW = {"shard_size": 4, "batch_size": 3, "workers": 0, "device": "cpu"}


def _img(seed: int, size: tuple[int, int] = (20, 18)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _write_mds(out: Path, n: int, columns: dict[str, str] | None = None, compression: str | None = None,
               size_limit: int = 1500, sample=None) -> Path:  # fmt: skip
    """n samples (image = PNG of seed i, label = i % 3) in several small shards, with streaming's MDSWriter."""
    streaming = pytest.importorskip("streaming", reason="MDS is written by mosaicml-streaming (tokkit[data])")
    columns = columns or {"image": "png", "label": "int"}
    with streaming.MDSWriter(out=str(out), columns=columns, compression=compression, size_limit=size_limit) as w:
        for i in range(n):
            w.write(sample(i) if sample else {"image": _img(i), "label": i % 3})
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "ck")


def test_reads_what_mdswriter_wrote(tmp_path: Path) -> None:
    root = _write_mds(tmp_path / "mds", 7)
    src = open_source(root)
    index = json.loads((root / "index.json").read_text())
    assert src.kind == "mds" and len(src) == 7 and len(index["shards"]) > 1  # several shards, read in index order
    assert src.keys[0] == "shard.00000.mds/000000" and src.labels == [i % 3 for i in range(7)]
    assert src.class_to_idx == {"0": 0, "1": 1, "2": 2}
    for i in range(7):
        assert np.array_equal(np.asarray(src.read(i)), np.asarray(_img(i)))
    again = pickle.loads(pickle.dumps(src))
    loader = DataLoader(ImageDataset(again, 16), batch_size=7, num_workers=1, collate_fn=collate_skip_bad)
    assert next(iter(loader))["images"].shape == (7, 3, 16, 16)


@pytest.mark.parametrize("encoding", ["jpeg", "pil", "ndarray:uint8", "bytes"])
def test_image_encodings_and_label_kinds(tmp_path: Path, encoding: str) -> None:
    names = ["cat", "dog"]

    def sample(i: int) -> dict:
        img = _img(i)
        value = {"pil": img, "jpeg": img, "ndarray:uint8": np.asarray(img), "bytes": _png(img)}[encoding]
        return {"x": value, "y": names[i % 2], "extra": f"caption {i}"}

    root = _write_mds(tmp_path / "m", 4, {"extra": "str", "x": encoding, "y": "str"}, sample=sample)
    src = open_source(root, image_key="x", label_key="y")
    assert src.labels == [0, 1, 0, 1] and src.class_to_idx == {"cat": 0, "dog": 1}
    want = _img(3)
    if encoding == "jpeg":  # lossy: what streaming's JPEG encoding (PIL, default quality) gives back
        buf = io.BytesIO()
        want.save(buf, "JPEG")
        want = Image.open(buf).convert("RGB")
    assert np.array_equal(np.asarray(src.read(3)), np.asarray(want))
    if encoding in ("jpeg", "pil"):  # the one column of an image encoding is picked; no "label" column: unlabeled
        assert open_source(root).labels == [-1] * 4
    else:  # bytes or arrays could be anything: named, not guessed
        with pytest.raises(DataError, match="no column 'image'.*--image-key"):
            open_source(root)
    with pytest.raises(DataError, match="no column 'nope'.*--image-key"):
        open_source(root, image_key="nope")
    with pytest.raises(DataError, match="not an image"):
        open_source(root, image_key="extra")


def test_bad_samples_missing_shard_and_compression(tmp_path: Path) -> None:
    def sample(i: int) -> dict:
        return {"image": b"not an image" if i == 2 else _png(_img(i)), "label": i}

    root = _write_mds(tmp_path / "m", 6, {"image": "bytes", "label": "int"}, sample=sample)
    ds = ImageDataset(open_source(root), 16)
    assert "error" in ds[2] and "image" in ds[1]
    first = json.loads((root / "index.json").read_text())["shards"][0]["raw_data"]["basename"]
    (root / first).unlink()
    src = open_source(root)
    assert first in src.skipped and "missing" in ImageDataset(src, 16)[0]["error"]
    zroot = _write_mds(tmp_path / "z", 5, compression="zstd")
    for f in zroot.glob("*.mds"):  # streaming keeps only the .mds.zstd files remotely
        f.unlink()
    zsrc = open_source(zroot)
    assert zsrc.labels == [i % 3 for i in range(5)]
    assert np.array_equal(np.asarray(zsrc.read(4)), np.asarray(_img(4)))


def test_split_and_options_that_do_not_apply(tmp_path: Path) -> None:
    _write_mds(tmp_path / "d" / "val", 3)
    src = open_source(tmp_path / "d", split="val")
    assert len(src) == 3 and src.options == {"image_key": "image", "label_key": "label", "split": "val"}
    with pytest.raises(DataError, match="no index.json"):
        open_source(tmp_path / "d", kind="mds", split="train")
    (tmp_path / "f").mkdir()
    _img(0).save(tmp_path / "f" / "a.png")
    with pytest.raises(DataError, match="--split does not apply to folder"):
        open_source(tmp_path / "f", split="val")


def test_encode_matches_folder_resumes_and_refuses_changes(tmp_path: Path, ckpt: Path) -> None:
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    cols = {"image": "png", "label": "int", "other": "int"}
    root = _write_mds(tmp_path / "mds", 9, cols, sample=lambda i: {"image": _img(i), "label": i % 3, "other": i % 2})
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(9):
        _img(i).save(folder / f"{i:03d}.png")
    res = encode_dataset(ckpt, root, tmp_path / "out", **KW)
    encode_dataset(ckpt, folder, tmp_path / "ref", **KW)
    a, b = open_shards(tmp_path / "out"), open_shards(tmp_path / "ref")
    assert res.complete and res.images == 9 and all(torch.equal(a[i][0], b[i][0]) for i in range(9))
    assert [a[i][1] for i in range(9)] == [i % 3 for i in range(9)]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "mds" and manifest["source"]["options"]["image_key"] == "image"
    from tokkit.shards import repair_command  # what tokkit verify prints reopens the source the same way

    assert "--image-key image --label-key label" in repair_command(tmp_path / "out", manifest)

    # byte-identical resume: drop the last shard's commit, run again, compare bytes
    shard_dir = tmp_path / "out" / "shards"
    before = {p.name: p.read_bytes() for p in shard_dir.iterdir() if not p.name.endswith("done.json")}
    last = sorted(shard_dir.glob("*done.json"))[-1]
    last.unlink()
    again = encode_dataset(ckpt, root, tmp_path / "out", **KW)
    assert again.resumed == 2 and again.encoded == 1
    assert {p.name: p.read_bytes() for p in shard_dir.iterdir() if not p.name.endswith("done.json")} == before

    with pytest.raises(ShardError, match="source options changed"):
        encode_dataset(ckpt, root, tmp_path / "out", **KW, source_options={"label_key": "other"})
    _write_mds(tmp_path / "mds2", 9, cols, sample=lambda i: {"image": _img(i + (i == 4)), "label": i % 3, "other": 0})
    for f in (tmp_path / "mds2").iterdir():  # one changed image, same count, same names
        (root / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ShardError, match="inputs changed"):
        encode_dataset(ckpt, root, tmp_path / "out", **KW)


def test_cli_options_reach_the_source(tmp_path: Path, ckpt: Path) -> None:
    from tokkit.cli.app import app

    root = _write_mds(tmp_path / "m", 3, {"pic": "png", "cls": "int"},
                      sample=lambda i: {"pic": _img(i), "cls": 5 + i})  # fmt: skip
    runner = CliRunner()
    args = ["encode", str(ckpt), str(root), "--out", str(tmp_path / "o"), "--device", "cpu", "--workers", "0", "-q"]
    r = runner.invoke(app, args)  # 'pic' is the one image column (picked); no 'label' column: unlabeled
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--label-key", "cls"])  # the same --out with other options: refused, one line
    assert r.exit_code != 0 and "source options changed" in r.output and len(r.output.strip().splitlines()) <= 2
    args[4] = str(tmp_path / "o2")
    r = runner.invoke(app, [*args, "--image-key", "pic", "--label-key", "cls", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "o2" / "plan.json").read_text())
    assert plan["source"]["options"] == {"image_key": "pic", "label_key": "cls"}
    from tokkit.shards import open_shards

    assert [open_shards(tmp_path / "o2")[i][1] for i in range(3)] == [5, 6, 7]
    r = runner.invoke(app, [*args, "--image-key", "nope"])
    assert r.exit_code != 0 and "no column 'nope'" in r.output and len(r.output.strip().splitlines()) <= 2


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path, ckpt: Path) -> None:
    """shard_id % world_size over an MDS source: --nproc-per-node 2 (gloo, CPU) writes the same bytes as one process,
    the source options travelling through the torchrun relaunch."""
    import os
    import subprocess
    import sys

    from tokkit.encode import encode_dataset

    root = _write_mds(tmp_path / "m", 10, {"pic": "png", "cls": "int"},
                      sample=lambda i: {"pic": _img(i), "cls": i % 4})  # fmt: skip
    opts = {"image_key": "pic", "label_key": "cls"}
    encode_dataset(ckpt, root, tmp_path / "one", shard_size=3, batch_size=2, workers=0, device="cpu",
                   source_options=opts)  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tokkit", "encode", str(ckpt), str(root), "--out", str(tmp_path / "two"),
           "--shard-size", "3", "--batch-size", "2", "--workers", "0", "--nproc-per-node", "2", "--device", "cpu",
           "--image-key", "pic", "--label-key", "cls", "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]

    def tree(out: Path) -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    assert tree(tmp_path / "two") == tree(tmp_path / "one")
