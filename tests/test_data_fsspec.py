"""fsspec URLs as inputs (webdataset tars, MDS folders), proven offline with fsspec's memory:// and file://."""

from __future__ import annotations

import importlib.util
import io
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from PIL import Image

from tokkit.data import ImageDataset, open_source
from tokkit.errors import DataError, ShardError

fsspec = pytest.importorskip("fsspec", reason="URLs are opened with fsspec (tokkit[data])")
pytestmark = pytest.mark.usefixtures("one_thread")
KW = {"shard_size": 4, "batch_size": 3, "workers": 0, "device": "cpu"}


def _img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (18, 20, 3), dtype=np.uint8))


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _samples(t: int, per: int = 3, bad: int | None = None) -> dict[str, bytes]:
    out = {}
    for j in range(per):
        seed = t * per + j
        out[f"s{seed:03d}.png"] = b"not a png" if seed == bad else _png(_img(seed))
        out[f"s{seed:03d}.cls"] = str(seed % 2).encode()
    return out


@pytest.fixture
def bucket() -> str:
    """A fresh memory:// bucket holding data-00000{0,1,2}.tar (3 samples each, sample 4 corrupt)."""
    fs = fsspec.filesystem("memory")
    root = f"/b-{uuid.uuid4().hex[:8]}"
    for t in range(3):
        fs.pipe(f"{root}/data-{t:06d}.tar", _tar(_samples(t, bad=4)))
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_memory_urls_braces_and_globs(bucket: str) -> None:
    src = open_source(f"{bucket}/data-{{000000..000002}}.tar")
    assert src.kind == "webdataset" and len(src) == 9 and src.keys[0] == "data-000000.tar/s000"
    assert src.labels == [i % 2 for i in range(9)] and src.paths[0] == f"{bucket}/data-000000.tar"
    assert open_source(f"{bucket}/*.tar").fingerprint() == src.fingerprint()
    assert np.array_equal(np.asarray(src.read(7)), np.asarray(_img(7)))
    item = ImageDataset(src, 16)[4]
    assert "error" in item and "s004" in src.keys[4]  # a bad sample is a logged bad input, not a crash
    with pytest.raises(DataError, match="data-000003.tar"):
        open_source(f"{bucket}/data-{{000000..000003}}.tar")
    with pytest.raises(DataError, match="no files match"):
        open_source(f"{bucket}/*.nothing.tar")
    with pytest.raises(DataError, match="--split does not apply to webdataset"):
        open_source(f"{bucket}/*.tar", split="train")


def test_file_urls_equal_local_paths(tmp_path: Path) -> None:
    for t in range(2):
        (tmp_path / f"d-{t}.tar").write_bytes(_tar(_samples(t)))
    url = open_source(f"file://{tmp_path}/d-{{0..1}}.tar")
    local = open_source(str(tmp_path / "d-{0..1}.tar"))
    assert url.keys == local.keys and url.labels == local.labels
    assert all(np.array_equal(np.asarray(url.read(i)), np.asarray(local.read(i))) for i in range(6))


def test_encode_from_urls_resumes_and_refuses_a_replaced_object(bucket: str, tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    spec = f"{bucket}/data-{{000000..000002}}.tar"
    res = encode_dataset(ckpt, spec, tmp_path / "out", **KW)
    assert res.complete and res.images == 8 and res.skipped == 1  # sample 4 logged in errors.jsonl
    assert "s004" in (tmp_path / "out" / "errors.jsonl").read_text()
    local = tmp_path / "local"
    local.mkdir()
    for t in range(3):
        (local / f"data-{t:06d}.tar").write_bytes(_tar(_samples(t, bad=4)))
    encode_dataset(ckpt, str(local / "*.tar"), tmp_path / "ref", **KW)
    a, b = open_shards(tmp_path / "out"), open_shards(tmp_path / "ref")
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(8))
    shards = tmp_path / "out" / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir() if not p.name.endswith("done.json")}
    sorted(shards.glob("*done.json"))[1].unlink()
    again = encode_dataset(ckpt, spec, tmp_path / "out", **KW)
    assert again.resumed == 2 and again.encoded == 3  # inputs 4..7, 4 unreadable (again logged)
    assert {p.name: p.read_bytes() for p in shards.iterdir() if not p.name.endswith("done.json")} == before
    fsspec.filesystem("memory").pipe(f"{bucket[len('memory://'):]}/data-000001.tar", _tar(_samples(1)))
    with pytest.raises(ShardError, match="inputs changed"):
        encode_dataset(ckpt, spec, tmp_path / "out", **KW)


def test_mds_folder_at_a_url(tmp_path: Path) -> None:
    streaming = pytest.importorskip("streaming", reason="the MDS folder is written by mosaicml-streaming")
    local = tmp_path / "mds"
    with streaming.MDSWriter(out=str(local), columns={"image": "png", "label": "int"}, size_limit=1500) as w:
        for i in range(5):
            w.write({"image": _img(i), "label": 7 - i})
    fs = fsspec.filesystem("memory")
    root = f"/mds-{uuid.uuid4().hex[:8]}"
    for f in local.iterdir():
        fs.pipe(f"{root}/{f.name}", f.read_bytes())
    src = open_source(f"memory://{root}")
    assert src.kind == "mds" and src.labels == open_source(local).labels and len(src) == 5
    assert np.array_equal(np.asarray(src.read(3)), np.asarray(_img(3)))
    fs.rm(root, recursive=True)


@pytest.mark.parametrize(("url", "package"), [("s3://bucket/d-{0..1}.tar", "s3fs"), ("gs://b/x.tar", "gcsfs")])
def test_missing_backend_is_one_line_naming_the_package(url: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the message cannot be provoked")
    with pytest.raises(DataError) as e:
        open_source(url)
    msg = str(e.value)
    assert f"pip install {package}" in msg and "\n" not in msg


def test_cli_accepts_urls(bucket: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tokkit.cli.app import app

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    args = ["encode", str(ckpt), f"{bucket}/*.tar", "--out", str(tmp_path / "o"), "--device", "cpu", "-q",
            "--workers", "0", "--shard-size", "4", "--label-key", "cls"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    from tokkit.shards import open_shards

    assert len(open_shards(tmp_path / "o")) == 8


def _parquet_bytes(seeds: list[int], bad: int | None = None) -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = [b"not a png" if s == bad else _png(_img(s)) for s in seeds]
    col = pa.array([{"bytes": b, "path": None} for b in images],
                   type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": col, "label": pa.array([s % 2 for s in seeds])}), buf, row_group_size=2)
    return buf.getvalue()


def test_parquet_files_at_urls_read_resume_and_refuse_a_replaced_object(tmp_path: Path) -> None:
    """Hugging Face style parquet files at an fsspec URL: the rows of the local files, resumable, changes refused."""
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    fs = fsspec.filesystem("memory")
    root = f"/pq-{uuid.uuid4().hex[:8]}"
    local = tmp_path / "local"
    local.mkdir()
    for t in range(2):
        blob = _parquet_bytes([3 * t + j for j in range(3)], bad=4)
        fs.pipe(f"{root}/train-{t:05d}.parquet", blob)
        (local / f"train-{t:05d}.parquet").write_bytes(blob)
    spec = f"memory://{root}/train-*.parquet"
    try:
        src, ref = open_source(spec), open_source(str(local))
        assert src.kind == "parquet" and src.keys == ref.keys and src.labels == ref.labels == [i % 2 for i in range(6)]
        assert np.array_equal(np.asarray(src.read(5)), np.asarray(_img(5)))
        assert "error" in ImageDataset(src, 16)[4]  # the corrupt cell is a logged bad input
        ckpt = make_tiny_checkpoint(tmp_path / "ck")
        res = encode_dataset(ckpt, spec, tmp_path / "out", **KW)
        assert res.complete and res.images == 5 and res.skipped == 1
        encode_dataset(ckpt, str(local), tmp_path / "ref", **KW)
        a, b = open_shards(tmp_path / "out"), open_shards(tmp_path / "ref")
        assert all(torch.equal(a[i][0], b[i][0]) for i in range(5))
        assert encode_dataset(ckpt, spec, tmp_path / "out", **KW).resumed == 2  # a rerun resumes
        fs.pipe(f"{root}/train-00001.parquet", _parquet_bytes([3, 4, 5, 6]))
        with pytest.raises(ShardError, match="inputs changed"):
            encode_dataset(ckpt, spec, tmp_path / "out", **KW)
        with pytest.raises(DataError, match="one kind"):
            fs.pipe(f"{root}/extra.tar", _tar(_samples(0)))
            open_source(f"memory://{root}/*")
    finally:
        fs.rm(root, recursive=True)
