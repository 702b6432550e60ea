"""tokkit.data.hf_source: Hugging Face datasets by name, proven offline (save_to_disk folders, a local parquet folder
loaded through datasets' own builder and cache, and a name that is neither cached nor reachable)."""

from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from PIL import Image
from torch.utils.data import DataLoader

from tokkit.data import ImageDataset, collate_skip_bad, open_source
from tokkit.errors import DataError, ShardError

datasets = pytest.importorskip("datasets", reason="Hugging Face datasets are read with datasets (tokkit[data])")
pytestmark = pytest.mark.usefixtures("one_thread")
KW = {"shard_size": 4, "batch_size": 3, "workers": 0, "device": "cpu"}
NAMES = ["cat", "dog", "emu"]


def _img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (18, 20, 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _dataset(n: int, offset: int = 0, bad: int | None = None):
    images = [{"bytes": b"junk" if i == bad else _png(_img(offset + i)), "path": None} for i in range(n)]
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=NAMES),
                                  "coarse": datasets.Value("string")})  # fmt: skip
    cols = {"img": images, "fine": [i % 3 for i in range(n)], "coarse": ["b" if i % 2 else "a" for i in range(n)]}
    return datasets.Dataset.from_dict(cols, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict (train: 9 rows, row 5 corrupt; test: 4 rows) saved with save_to_disk."""
    root = tmp_path_factory.mktemp("hf") / "ds"
    datasets.DatasetDict({"train": _dataset(9, bad=5), "test": _dataset(4, offset=100)}).save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "ck")


def test_save_to_disk_splits_columns_and_class_labels(saved: Path) -> None:
    src = open_source(f"hf:{saved}", image_key="img", label_key="fine")
    assert src.kind == "hf" and len(src) == 9 and src.keys[0] == "train/000000"
    assert src.labels == [i % 3 for i in range(9)] and src.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    assert np.array_equal(np.asarray(src.read(4)), np.asarray(_img(4)))
    test = open_source(f"hf:{saved}", image_key="img", label_key="coarse", split="test")
    assert test.keys[0] == "test/000000" and test.labels == [0, 1, 0, 1] and test.class_to_idx == {"a": 0, "b": 1}
    assert np.array_equal(np.asarray(test.read(0)), np.asarray(_img(100)))
    fine = open_source(f"hf:{saved}", image_key="img", label_key="fine", split="test")
    assert test.fingerprint() != fine.fingerprint()
    loader = DataLoader(ImageDataset(pickle.loads(pickle.dumps(src)), 16), batch_size=9, num_workers=1,
                        collate_fn=collate_skip_bad)  # fmt: skip
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 16, 16) and [i for i, _ in batch["errors"]] == [5]
    for kwargs, needle in [({"split": "val"}, "no split 'val'"), ({"image_key": "image"}, "no column 'image'"),
                           ({"image_key": "coarse"}, "not images"), ({"label_key": "nope"}, "no column 'nope'")]:
        with pytest.raises(DataError, match=needle) as e:
            open_source(f"hf:{saved}", **{"image_key": "img", **kwargs})
        assert "\n" not in str(e.value)


def test_local_parquet_folder_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for f in range(2):
        imgs = pa.array([{"bytes": _png(_img(3 * f + i)), "path": None} for i in range(3)], type=struct)
        pq.write_table(pa.table({"image": imgs, "label": [3 * f + i for i in range(3)]}),
                       folder / f"train-0000{f}-of-00002.parquet")  # fmt: skip
    src = open_source(tmp_path / "pq", kind="hf")  # a folder for datasets' parquet builder, as a hub repo holds it
    assert src.kind == "hf" and len(src) == 6 and src.labels == list(range(6))
    assert np.array_equal(np.asarray(src.read(5)), np.asarray(_img(5)))
    assert any((tmp_path / "cache").iterdir())  # went through datasets' cache, as a hub dataset does


def test_unknown_name_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'tokkit-no-such/dataset'") as e:
        open_source("hf:tokkit-no-such/dataset")
    assert "\n" not in str(e.value) and "cached" in str(e.value) and time.perf_counter() - t0 < 30


def test_encode_resumes_and_refuses_another_split_or_column(saved: Path, ckpt: Path, tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    opts = {"image_key": "img", "label_key": "fine"}
    res = encode_dataset(ckpt, f"hf:{saved}", tmp_path / "out", **KW, source_options=opts)
    assert res.complete and res.images == 8 and res.skipped == 1
    folder = tmp_path / "f"
    folder.mkdir()
    for i in [i for i in range(9) if i != 5]:
        _img(i).save(folder / f"{i:03d}.png")
    encode_dataset(ckpt, folder, tmp_path / "ref", **KW)
    a, b = open_shards(tmp_path / "out"), open_shards(tmp_path / "ref")
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(8))
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["source"]["options"] == {"image_key": "img", "label_key": "fine", "split": "train"}
    shards = tmp_path / "out" / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir() if not p.name.endswith("done.json")}
    sorted(shards.glob("*done.json"))[0].unlink()
    again = encode_dataset(ckpt, f"hf:{saved}", tmp_path / "out", **KW, source_options=opts)
    assert again.resumed == 2 and again.encoded == 4
    assert {p.name: p.read_bytes() for p in shards.iterdir() if not p.name.endswith("done.json")} == before
    for change in ({"label_key": "coarse"}, {"split": "test"}):
        with pytest.raises(ShardError, match="source options changed"):
            encode_dataset(ckpt, f"hf:{saved}", tmp_path / "out", **KW, source_options={**opts, **change})


def test_cli_source_kind_hf(saved: Path, ckpt: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tokkit.cli.app import app
    from tokkit.shards import open_shards

    args = ["encode", str(ckpt), str(saved), "--source-kind", "hf", "--split", "test", "--image-key", "img",
            "--label-key", "coarse", "--out", str(tmp_path / "o"), "--device", "cpu", "--workers", "0",
            "-q"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    ds = open_shards(tmp_path / "o")
    assert len(ds) == 4 and [ds[i][1] for i in range(4)] == [0, 1, 0, 1]
    assert ds.manifest["class_to_idx"] == {"a": 0, "b": 1}
