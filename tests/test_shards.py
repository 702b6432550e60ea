"""tokkit.shards: plan, atomic writer + manifest, memory-mapped reader, verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tokkit.errors import ShardError
from tokkit.shards import (
    FORMAT,
    codes_dtype,
    open_shards,
    plan_shards,
    read_done,
    read_manifest,
    verify,
    write_manifest,
    write_shard,
)


def _write_set(out: Path, n: int = 10, shard_size: int = 4, views: int = 1, complete: bool = True) -> np.ndarray:
    """A hand-made shard set of ``n`` items with codes[i] = i (per view: i * 10 + v)."""
    specs = plan_shards(n, shard_size)
    shape = [views, 2, 3] if views > 1 else [2, 3]
    codes = np.zeros((n, *shape), np.uint16)
    for i in range(n):
        codes[i] = (i * 10 + np.arange(views).reshape(-1, 1, 1)) if views > 1 else i
    plan = {"format": FORMAT, "plan_id": "p", "views": {"name": "x", "count": views, "axis": views > 1},
            "codes_shape": shape, "dtype": "uint16", "shard_size": shard_size, "source": {"count": n},
            "tokenizer": {"codebook_size": 1000}}  # fmt: skip
    dones = []
    for s in specs:
        if not complete and s.id == len(specs) - 1:
            dones.append(None)
            continue
        rows = range(s.start, s.stop)
        keys = [{"key": f"img/{i:03d}.png", "index": i, "view": "x"} for i in rows]
        dones.append(write_shard(out, s, codes[s.start : s.stop], np.arange(s.start, s.stop) % 3, keys, plan="p"))
    write_manifest(out, plan, dones)
    return codes


def test_plan_is_independent_of_everything_but_count_and_size() -> None:
    specs = plan_shards(10, 4)
    assert [(s.id, s.start, s.stop) for s in specs] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert specs[2].name == "shard-000002" and plan_shards(0, 4) == []
    with pytest.raises(ShardError):
        plan_shards(3, 0)
    assert codes_dtype(65536) == np.uint16 and codes_dtype(65537) == np.uint32
    assert codes_dtype(2**32) == np.uint32 and codes_dtype(2**32 + 1) == np.int64


def test_writer_commit_marker_and_manifest(tmp_path: Path) -> None:
    _write_set(tmp_path)
    m = read_manifest(tmp_path)
    assert m["format"] == FORMAT and m["complete"] and m["count"] == 10 and m["num_shards"] == 3
    done = read_done(tmp_path, plan_shards(10, 4)[1], "p")
    assert done is not None and done["n"] == 4 and set(done["files"]) == {"codes", "labels", "keys"}
    assert read_done(tmp_path, plan_shards(10, 4)[1], "another-plan") is None
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind
    assert (tmp_path / "errors.jsonl").read_text() == ""


def test_reader_views_and_workers(tmp_path: Path) -> None:
    codes = _write_set(tmp_path, views=2)
    ds = open_shards(tmp_path, view=1)
    tokens, label = ds[5]
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 3) and int(tokens[0, 0]) == 51 and label == 5 % 3
    assert open_shards(tmp_path, view="all")[5][0].shape == (2, 2, 3)
    rnd = open_shards(tmp_path, view="random")
    seen = {int(rnd[3][0][0, 0]) for _ in range(30)}
    assert seen == {30, 31}
    loader = DataLoader(open_shards(tmp_path, view=0), batch_size=3, num_workers=2)
    got = torch.cat([b[0] for b in loader])
    assert torch.equal(got, torch.from_numpy(codes[:, 0].astype(np.int64)))
    assert ds.keys[5] == "img/005.png"
    with pytest.raises(ShardError):
        open_shards(tmp_path, view=2)


def test_incomplete_set_needs_opt_in(tmp_path: Path) -> None:
    _write_set(tmp_path, complete=False)
    with pytest.raises(ShardError, match="incomplete"):
        open_shards(tmp_path)
    assert len(open_shards(tmp_path, allow_incomplete=True)) == 8
    assert not verify(tmp_path).ok


def test_verify_catches_a_flipped_byte(tmp_path: Path) -> None:
    _write_set(tmp_path)
    assert verify(tmp_path).ok
    f = tmp_path / "shards" / "shard-000001.codes.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    res = verify(tmp_path)
    assert not res.ok and len(res.problems) == 1
    assert res.problems[0].startswith("shard-000001.codes.npy: sha256 mismatch")
    (tmp_path / "shards" / "shard-000002.keys.jsonl").unlink()
    assert "shard-000002.keys.jsonl: missing" in verify(tmp_path).problems


def test_not_a_shard_set(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not a tokkit shard set"):
        open_shards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ShardError, match="tokkit-shards/1"):
        read_manifest(tmp_path)


def test_missing_shard_path_is_named_itself(tmp_path):
    """A wrong path is reported as that path, not as its parent folder lacking a manifest."""
    missing = tmp_path / "no-such-set"
    with pytest.raises(ShardError, match=f"no shard set at {missing}: the path does not exist"):
        open_shards(missing)
