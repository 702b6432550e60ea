"""tokkit export: each layout read back by its consumer's own reader matches open_shards, token for token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_folder, make_tiny_checkpoint
from typer.testing import CliRunner

from tokkit import open_shards
from tokkit.cli.app import app
from tokkit.errors import ConfigError, ShardError
from tokkit.export import export_shards, list_formats
from tokkit.progress import RecordingReporter

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["none", "flip"])
def shard_set(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 labelled images in shards of 3, 3 and 1 (16 px -> 8x8 tokens), without and with a views axis."""
    from tokkit.encode import encode_dataset

    tmp = tmp_path_factory.mktemp(f"set-{request.param}")
    ck = make_tiny_checkpoint(tmp / "ck")
    data = make_folder(tmp / "img", n=7)
    encode_dataset(ck, data, tmp / "shards", shard_size=3, workers=0, device="cpu", views=request.param)
    return tmp / "shards"


def expected(path: Path) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Every item as open_shards gives it: tokens (*index_shape) or (V, *index_shape) int64, label, source key."""
    ds = open_shards(path, view="all")
    items = [ds[i] for i in range(len(ds))]
    return [t.numpy() for t, _ in items], [lab for _, lab in items], ds.keys


def read_llamagen(out: Path, resolution: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """LlamaGen's dataset/imagenet.py conventions: {code_path}/imagenet{R}_codes/{i}.npy and _labels/{i}.npy."""
    feature_dir, label_dir = out / f"imagenet{resolution}_codes", out / f"imagenet{resolution}_labels"
    assert sorted(os.listdir(feature_dir)) == sorted(f"{i}.npy" for i in range(n))
    return [np.load(feature_dir / f"{i}.npy") for i in range(n)], [np.load(label_dir / f"{i}.npy") for i in range(n)]


def test_llamagen(shard_set: Path, tmp_path: Path) -> None:
    tokens, labels, _ = expected(shard_set)
    res = export_shards(shard_set, tmp_path / "out", "llamagen")
    assert (res.items, res.written, res.skipped) == (7, 14, 0)
    codes, labs = read_llamagen(tmp_path / "out", 16, 7)
    for t, lab, c, y in zip(tokens, labels, codes, labs, strict=True):
        views = t.reshape(-1, 64)  # (V, h*w)
        assert c.dtype == np.int64 and c.shape == (1, len(views), 64)  # (1, aug_views, h*w) as extract_codes_c2i
        assert y.dtype == np.int64 and y.shape == (1,) and int(y[0]) == lab
        np.testing.assert_array_equal(c[0], views)


def test_jsonl(shard_set: Path, tmp_path: Path) -> None:
    tokens, labels, _ = expected(shard_set)
    export_shards(shard_set, tmp_path / "out", "jsonl")
    files = sorted((tmp_path / "out").glob("tokens-*.jsonl"))
    assert [f.name for f in files] == [f"tokens-{i:06d}.jsonl" for i in range(3)]
    entries = [json.loads(line) for f in files for line in f.read_text().splitlines()]  # as TiTok/RAR read them
    assert len(entries) == 7
    for t, lab, e in zip(tokens, labels, entries, strict=True):
        assert e["class_id"] == lab
        flat = t.reshape(-1, 64) if t.ndim == 3 else t.reshape(64)  # views: a list of flat lists
        assert e["tokens"] == flat.tolist()


def test_webdataset(shard_set: Path, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    tokens, labels, _ = expected(shard_set)
    export_shards(shard_set, tmp_path / "out", "webdataset")
    urls = [str(tmp_path / "out" / f"tokens-{i:06d}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    for t, lab, s in zip(tokens, labels, samples, strict=True):
        assert s["cls"] == lab and s["tokens.npy"].dtype == np.int32
        np.testing.assert_array_equal(s["tokens.npy"], t)


def test_parquet(shard_set: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    tokens, labels, keys = expected(shard_set)
    export_shards(shard_set, tmp_path / "out", "parquet")
    table = pq.read_table(tmp_path / "out", columns=["key", "label", "tokens"])
    meta = json.loads(pq.read_schema(tmp_path / "out" / "tokens-000000.parquet").metadata[b"tokkit"])
    assert meta["shape"] == list(tokens[0].shape)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == keys and [r["label"] for r in rows] == labels
    for t, r in zip(tokens, rows, strict=True):
        np.testing.assert_array_equal(np.asarray(r["tokens"]).reshape(meta["shape"]), t)
    try:
        import datasets  # noqa: F401  (only when it happens to be installed)
    except ImportError:
        return
    hf = datasets.load_dataset(  # data_files: datasets 5 reads every file of a data_dir, _export.json too
        "parquet", data_files=str(tmp_path / "out" / "tokens-*.parquet"), split="train", cache_dir=str(tmp_path / "c")
    )
    assert hf["label"] == labels


def test_mds(shard_set: Path, tmp_path: Path) -> None:
    streaming = pytest.importorskip("streaming", reason="mds export writes with mosaicml-streaming (tokkit[export])")
    tokens, labels, keys = expected(shard_set)
    res = export_shards(shard_set, tmp_path / "out", "mds")
    assert (res.written, res.skipped) == (3, 0)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["raw_data"]["basename"] for s in index["shards"]] == [f"tokens-{i:06d}/shard.00000.mds" for i in range(3)]
    streaming.base.util.clean_stale_shared_memory()
    ds = streaming.StreamingDataset(local=str(tmp_path / "out"), remote=None, shuffle=False, batch_size=1)
    assert len(ds) == 7
    rows = [ds[i] for i in range(7)]
    assert [r["key"] for r in rows] == keys and [r["label"] for r in rows] == labels
    for t, r in zip(tokens, rows, strict=True):
        assert r["tokens"].dtype == np.int32
        np.testing.assert_array_equal(r["tokens"], t)
    one = streaming.base.format.reader_from_json(str(tmp_path / "out"), None, index["shards"][1])
    np.testing.assert_array_equal(one.get_item(0)["tokens"], tokens[3])  # the reader alone, shard by shard


def test_overwrite_removes_an_mds_export_and_keeps_foreign_files(shard_set: Path, tmp_path: Path) -> None:
    pytest.importorskip("streaming", reason="mds export writes with mosaicml-streaming (tokkit[export])")
    out = tmp_path / "out"
    export_shards(shard_set, out, "mds")
    export_shards(shard_set, out, "jsonl", overwrite=True)
    assert not (out / "index.json").exists() and not list(out.glob("tokens-*/*"))
    foreign = tmp_path / "o2"
    foreign.mkdir()
    (foreign / "index.json").write_text('{"version": 2, "shards": [{"raw_data": {"basename": "mine.mds"}}]}')
    export_shards(shard_set, foreign, "jsonl", overwrite=True)
    assert (foreign / "index.json").is_file()


@pytest.mark.parametrize("fmt", ["llamagen", "webdataset", "mds"])
def test_resume_rewrites_only_missing_files(shard_set: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    export_shards(shard_set, out, fmt)
    if fmt == "mds":
        pytest.importorskip("streaming", reason="mds export writes with mosaicml-streaming (tokkit[export])")
    victim = out / {"llamagen": "imagenet16_codes/4.npy", "webdataset": "tokens-000001.tar",
                    "mds": "tokens-000001/shard.00000.mds"}[fmt]  # fmt: skip
    before = victim.read_bytes()
    victim.unlink()
    if fmt == "mds":  # a folder is complete when its index.json is there: a killed write leaves none
        (out / "tokens-000001" / "index.json").unlink()
        (out / ".tokens-000001.tmp-0123abcd").mkdir()
    else:
        (out / f".{victim.name}.tmp-0123abcd").write_bytes(b"half")  # what a kill -9 leaves: never read
    rep = RecordingReporter()
    res = export_shards(shard_set, out, fmt, reporter=rep)
    assert res.written == 1 and res.skipped == (13 if fmt == "llamagen" else 2)
    assert victim.read_bytes() == before and rep.last_completed == 7
    assert not (out / ".tokens-000001.tmp-0123abcd").exists()
    assert export_shards(shard_set, out, fmt, overwrite=True).written == res.written + res.skipped
    assert json.loads((out / "_export.json").read_text())["complete"] is True


def test_refuses_another_export_and_a_broken_set(shard_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_shards(shard_set, out, "jsonl")
    with pytest.raises(ShardError, match="jsonl export of this shard set"):
        export_shards(shard_set, out, "webdataset")
    (out / "tokens-000009.tar").write_bytes(b"from an export of a longer set")
    export_shards(shard_set, out, "webdataset", overwrite=True)  # removes what the others left, nothing else
    assert sorted(p.name for p in out.iterdir()) == ["_export.json"] + [f"tokens-{i:06d}.tar" for i in range(3)]
    broken = shutil.copytree(shard_set, tmp_path / "broken")
    (broken / "shards" / "shard-000001.codes.npy").unlink()
    with pytest.raises(ShardError, match="shard-000001"):
        export_shards(broken, tmp_path / "o2", "jsonl")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(ConfigError, match="unknown export format"):
        export_shards(shard_set, tmp_path / "o3", "msd")


def test_cli(shard_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokkit.cli import export as cli_export

    assert tuple(list_formats()) == cli_export.FORMATS
    r = runner.invoke(app, ["export", str(shard_set), "--format", "jsonl", "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    assert "7 (64 tokens" in r.stdout
    r = runner.invoke(app, ["export", str(shard_set), "-f", "jsonl", "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 3
    for args, needle in [
        (["export", str(tmp_path / "nope"), "-f", "jsonl", "-o", str(tmp_path / "x")], "no shard set at"),
        (["export", str(shard_set), "-f", "msd", "-o", str(tmp_path / "x")], "unknown --format 'msd'"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    r = runner.invoke(app, ["export", str(shard_set), "-f", "parquet", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and 'pip install "tokkit[export]"' in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_mistakes_are_reported_before_torch_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys, json\nfrom tokkit.cli import main\n"
        f"sys.argv = ['tokkit', 'export', {str(tmp_path / 'nope')!r}, '-f', 'jsonl', '-o', {str(tmp_path)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 2, "torch": False}, proc.stderr
