"""tokkit.data.web_sources: webdataset tar shards and parquet files behind the ImageSource contract."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from PIL import Image
from torch.utils.data import DataLoader

from tokkit.data import ImageDataset, collate_skip_bad, open_source
from tokkit.data.web_sources import expand_braces
from tokkit.errors import DataError, ShardError


def _img(seed: int, size: tuple[int, int] = (20, 18)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _shards(root: Path, n_tars: int = 3, per: int = 3) -> list[Path]:
    """root/data-00000N.tar: per samples each, PNG (even) or lossless-ish PNG for odd, label = seed % 2."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for t in range(n_tars):
        members = {}
        for j in range(per):
            seed = t * per + j
            members[f"s{seed:03d}.png"] = _bytes(_img(seed))
            members[f"s{seed:03d}.cls"] = str(seed % 2).encode()
        out.append(_write_tar(root / f"data-{t:06d}.tar", members))
    return out


def _folder_twin(root: Path, n: int) -> Path:
    """The same images as ``_shards`` as a flat folder (sorted keys in the same order)."""
    root.mkdir(parents=True, exist_ok=True)
    for seed in range(n):
        _img(seed).save(root / f"s{seed:03d}.png")
    return root


# ---------------------------------------------------------------- patterns


def test_expand_braces() -> None:
    assert expand_braces("d-{000..002}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]
    assert expand_braces("x{y}.tar") == ["x{y}.tar"]
    assert expand_braces("{a,b{1,2}}") == ["a", "b1", "b2"]
    with pytest.raises(DataError, match="more than"):
        expand_braces("{0..99999999}")


def test_tar_brace_glob_and_single(tmp_path: Path) -> None:
    _shards(tmp_path / "w", n_tars=4, per=2)
    brace = open_source(str(tmp_path / "w" / "data-{000000..000003}.tar"))
    globbed = open_source(str(tmp_path / "w" / "*.tar"))
    assert brace.kind == "webdataset" and len(brace) == 8
    assert brace.keys == globbed.keys and brace.keys[0] == "data-000000.tar/s000"
    assert brace.fingerprint() == globbed.fingerprint()
    assert brace.labels == [0, 1] * 4 and brace.class_to_idx == {"0": 0, "1": 1}
    single = open_source(tmp_path / "w" / "data-000001.tar")
    assert single.keys == ["data-000001.tar/s002", "data-000001.tar/s003"]
    assert np.array_equal(np.asarray(single.read(0)), np.asarray(_img(2)))
    with pytest.raises(DataError, match="data-000004.tar"):  # a gap in a range is refused, never skipped
        open_source(str(tmp_path / "w" / "data-{000000..000004}.tar"))
    with pytest.raises(DataError, match="no files match"):
        open_source(str(tmp_path / "w" / "*.nothing.tar"))


def test_tar_bad_samples_and_workers(tmp_path: Path) -> None:
    jpeg = _bytes(_img(7), "JPEG")
    tar = _write_tar(
        tmp_path / "mixed.tar",
        {
            "a/good.jpg": jpeg,
            "a/good.cls": b"3\n",
            "a/broken.png": b"not a png",
            "a/nolabel.seg.png": _bytes(_img(8)),
            "a/textonly.txt": b"caption",
            "a/textonly.cls": b"1",
            "a/badlabel.png": _bytes(_img(9)),
            "a/badlabel.cls": b"cat",
            "a/huge.png": _bytes(_img(10)),
            "a/huge.cls": b"99999999999999999999",
        },
    )
    src = open_source(tar)
    assert src.keys == ["mixed.tar/a/badlabel", "mixed.tar/a/broken", "mixed.tar/a/good", "mixed.tar/a/huge",
                        "mixed.tar/a/nolabel", "mixed.tar/a/textonly"]  # fmt: skip
    assert src.labels == [-1, -1, 3, -1, -1, 1] and {"mixed.tar/a/badlabel", "mixed.tar/a/huge"} <= set(src.skipped)
    ds = ImageDataset(pickle.loads(pickle.dumps(src)), resolution=16)
    loader = DataLoader(ds, batch_size=6, num_workers=1, collate_fn=collate_skip_bad)
    batch = next(iter(loader))
    assert batch["indices"].tolist() == [0, 2, 3, 4] and batch["images"].shape == (4, 3, 16, 16)
    errors = dict(batch["errors"])
    assert set(errors) == {1, 5} and "no image member" in errors[5]
    small = open_source(tar, max_input_bytes=64)
    assert "too large" in ds.__class__(small, 16)[2]["error"]


def test_tar_encode_matches_folder_and_resume_refused(tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    tars = _shards(tmp_path / "w", n_tars=3, per=3)
    folder = _folder_twin(tmp_path / "f", 9)
    kw = {"shard_size": 4, "batch_size": 3, "workers": 0, "device": "cpu"}
    spec = str(tmp_path / "w" / "data-{000000..000002}.tar")
    res = encode_dataset(ckpt, spec, tmp_path / "out", **kw)
    ref = encode_dataset(ckpt, folder, tmp_path / "ref", **kw)
    assert res.complete and res.images == 9 and ref.images == 9
    a, b = open_shards(tmp_path / "out"), open_shards(tmp_path / "ref")
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(9))
    assert [a[i][1] for i in range(9)] == [i % 2 for i in range(9)]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "webdataset"
    again = encode_dataset(ckpt, spec, tmp_path / "out", **kw)
    assert again.resumed == 3 and again.encoded == 0
    _write_tar(tars[1], {"s003.png": _bytes(_img(30)), "s003.cls": b"1", "s004.png": _bytes(_img(4)),
                         "s005.png": _bytes(_img(5))})  # fmt: skip
    with pytest.raises(ShardError, match="inputs changed"):
        encode_dataset(ckpt, spec, tmp_path / "out", **kw)


def test_tar_truncated_folder_and_compressed(tmp_path: Path) -> None:
    members = {f"./s{i}.png": _bytes(_img(i, (30, 30))) for i in range(3)}  # ``tar cf x.tar .`` style names
    (tmp_path / "w").mkdir()
    full = _write_tar(tmp_path / "w" / "full.tar", members)
    data = full.read_bytes()
    cut = tmp_path / "w" / "cut.tar"
    cut.write_bytes(data[: data.index(members["./s2.png"]) + 50])  # the last image cut in the middle
    src = open_source(tmp_path / "w")  # a folder holding only tars
    assert src.kind == "webdataset" and src.keys[:3] == ["cut.tar/s0", "cut.tar/s1", "cut.tar/s2"]
    assert "truncated" in src.skipped["cut.tar"] and len(src) == 6
    item = ImageDataset(src, 16)[2]
    assert "cut short" in item["error"] and "image" in ImageDataset(src, 16)[1]
    (tmp_path / "z.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="decompress"):
        open_source(tmp_path / "z.tar.gz")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="empty.tar"):
        open_source(tmp_path / "empty.tar")


def test_tar_touched_changes_fingerprint(tmp_path: Path) -> None:
    tars = _shards(tmp_path / "w", n_tars=2, per=2)
    before = open_source(str(tmp_path / "w" / "*.tar")).fingerprint()
    st = os.stat(tars[0])
    os.utime(tars[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_source(str(tmp_path / "w" / "*.tar")).fingerprint() != before


# ---------------------------------------------------------------- parquet


def _parquet(path: Path, images: list, labels: list | None, struct: bool, row_group_size: int = 2) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    if struct:
        col = pa.array([None if b is None else {"bytes": b, "path": None} for b in images],
                       type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    else:
        col = pa.array(images, type=pa.binary())
    cols = {"image": col, **({"label": pa.array(labels)} if labels is not None else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_reads_struct_and_binary(tmp_path: Path, struct: bool) -> None:
    pytest.importorskip("pyarrow")
    imgs = [_bytes(_img(i)) for i in range(5)]
    _parquet(tmp_path / "d" / "train-00000.parquet", imgs[:3], [0, 1, 0], struct)
    _parquet(tmp_path / "d" / "train-00001.parquet", [*imgs[3:], b"junk", None], [1, 0, 1, None], struct)
    src = open_source(tmp_path / "d")
    assert src.kind == "parquet" and len(src) == 7
    assert src.keys[3] == "train-00001.parquet/000000" and src.labels == [0, 1, 0, 1, 0, 1, -1]
    assert open_source(str(tmp_path / "d" / "train-*.parquet")).fingerprint() == src.fingerprint()
    ds = ImageDataset(pickle.loads(pickle.dumps(src)), resolution=16)
    loader = DataLoader(ds, batch_size=7, num_workers=1, collate_fn=collate_skip_bad)
    batch = next(iter(loader))
    assert batch["indices"].tolist() == [0, 1, 2, 3, 4] and {i for i, _ in batch["errors"]} == {5, 6}
    assert np.array_equal(np.asarray(src.read(4)), np.asarray(_img(4)))
    one = open_source(tmp_path / "d" / "train-00000.parquet", label_key="nope")
    assert len(one) == 3 and one.labels == [-1] * 3
    with pytest.raises(DataError, match="--image-key"):
        open_source(tmp_path / "d", image_key="img")


def test_parquet_string_labels_and_encode(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    imgs = [_bytes(_img(i)) for i in range(9)]
    path = _parquet(tmp_path / "p" / "a.parquet", imgs, ["b", "a"] * 4 + ["b"], struct=True, row_group_size=4)
    src = open_source(path)
    assert src.class_to_idx == {"a": 0, "b": 1} and src.labels[:2] == [1, 0]
    kw = {"shard_size": 4, "batch_size": 3, "workers": 0, "device": "cpu"}
    res = encode_dataset(ckpt, path, tmp_path / "out", **kw)
    encode_dataset(ckpt, _folder_twin(tmp_path / "f", 9), tmp_path / "ref", **kw)
    a, b = open_shards(tmp_path / "out"), open_shards(tmp_path / "ref")
    assert res.images == 9 and all(torch.equal(a[i][0], b[i][0]) for i in range(9))
    _parquet(path, imgs[:8], ["a"] * 8, struct=True)
    with pytest.raises(ShardError, match="inputs changed"):
        encode_dataset(ckpt, path, tmp_path / "out", **kw)


def test_tar_written_by_webdataset(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    path = tmp_path / "wds-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(3):
            sink.write({"__key__": f"sample{i:04d}", "png": _bytes(_img(i)), "cls": str(i).encode()})
    src = open_source(str(tmp_path / "wds-{000000..000000}.tar"))
    assert src.keys == [f"wds-000000.tar/sample{i:04d}" for i in range(3)] and src.labels == [0, 1, 2]
    assert np.array_equal(np.asarray(src.read(2)), np.asarray(_img(2)))


def test_tars_need_no_pyarrow(tmp_path: Path) -> None:
    import subprocess
    import sys

    _shards(tmp_path / "w", n_tars=1, per=2)
    code = (
        "import sys; from tokkit.data import open_source; "
        f"s = open_source({str(tmp_path / 'w' / '*.tar')!r}); s.read(0); assert 'pyarrow' not in sys.modules"
    )
    repo = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
