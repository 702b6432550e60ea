"""Nothing trusted blindly: open_shards (cheaply) and verify (fully) catch any disagreement between manifest.json,
the commit markers and the files, and no manifest name reaches outside the shard folder (issues 12.3, 12.4)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_shards import _write_set
from typer.testing import CliRunner

from tokkit.cli.app import app
from tokkit.errors import ShardError
from tokkit.shards import canonical_json, manifest_sha256, open_shards, remove_temporaries, verify


def _edit_manifest(root: Path, edit, rehash: bool) -> None:
    """Apply ``edit`` to the manifest; ``rehash``: also re-sign it and every file record, as a careful forger would."""
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    if rehash:
        for s in m["shards"]:
            for rec in s["files"].values():
                f = root / "shards" / Path(rec["name"]).name
                if f.is_file():
                    rec["bytes"], rec["sha256"] = f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()
        m["manifest_sha256"] = manifest_sha256(m)
    (root / "manifest.json").write_text(canonical_json(m))


def _shard0(m: dict) -> dict:
    return m["shards"][0]


@pytest.mark.parametrize("rehash", [False, True], ids=["edited", "edited-and-resigned"])
def test_one_digit_in_the_manifest_is_caught(tmp_path: Path, rehash: bool) -> None:
    """Shard 0 "n": 8 -> 7 used to drop an item and pair later tokens with other images' labels; verify said ok."""
    _write_set(tmp_path, n=16, shard_size=8)
    assert verify(tmp_path).ok and len(open_shards(tmp_path)) == 16

    def edit(m: dict) -> None:
        _shard0(m)["n"] = 7
        m["count"] = 15 if rehash else m["count"]

    _edit_manifest(tmp_path, edit, rehash)
    with pytest.raises(ShardError, match="run tokkit verify") as info:
        open_shards(tmp_path)
    assert "\n" not in str(info.value)
    r = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 1 and "run tokkit verify" in r.output
    res = verify(tmp_path)
    assert not res.ok and res.repair.endswith("--repair")
    if not rehash:
        assert "manifest_sha256 does not match" in res.problems[0]
    assert any("n=7 and errors=0 do not add up to its 8 inputs" in p for p in res.problems)


@pytest.mark.parametrize("name", ["../../outside.codes.npy", "/tmp/outside.codes.npy", "shard-000001.codes.npy"])
def test_file_names_never_leave_the_shard_folder(tmp_path: Path, name: str) -> None:
    root = tmp_path / "set"
    _write_set(root, n=16, shard_size=8)
    np.save(tmp_path / "outside.codes.npy", np.zeros((8, 2, 3), np.uint16))  # what a crafted set would map

    def edit(m: dict) -> None:
        _shard0(m)["files"]["codes"]["name"] = name

    _edit_manifest(root, edit, rehash=True)
    with pytest.raises(ShardError, match="is not 'shard-000000.codes.npy'"):
        open_shards(root)
    res = verify(root)
    assert any("refused" in p for p in res.problems) and res.files == 0  # nothing followed


def test_npy_header_must_match_the_manifest(tmp_path: Path) -> None:
    _write_set(tmp_path, n=16, shard_size=8)
    f = tmp_path / "shards" / "shard-000001.codes.npy"
    np.save(f, np.load(f).astype(np.int64))  # same values, another dtype: sizes re-signed below
    _edit_manifest(tmp_path, lambda m: None, rehash=True)
    with pytest.raises(ShardError, match=r"holds int64 \(8, 2, 3\), the manifest says uint16 \(8, 2, 3\)"):
        open_shards(tmp_path)
    problems = verify(tmp_path).problems
    assert any("holds int64" in p for p in problems) and any("done.json and the manifest differ" in p for p in problems)


def test_keys_ids_and_labels_are_checked(tmp_path: Path) -> None:
    _write_set(tmp_path, n=16, shard_size=8)
    keys = tmp_path / "shards" / "shard-000000.keys.jsonl"
    keys.write_text("".join(keys.read_text().splitlines(keepends=True)[:-1]))  # one key lost
    codes = tmp_path / "shards" / "shard-000001.codes.npy"
    arr = np.load(codes)
    arr[3, 0, 0] = 5000  # outside the set's 1000-code codebook
    np.save(codes, arr)
    _edit_manifest(tmp_path, lambda m: None, rehash=True)
    ds = open_shards(tmp_path)  # the cheap checks cannot see these two ...
    with pytest.raises(ShardError, match="7 keys for 8 items"):
        ds.keys  # noqa: B018
    with pytest.raises(ShardError, match=r"outside \[0, 1000\)"):
        ds[8 + 3]
    assert ds[8 + 2][0].max() < 1000
    problems = verify(tmp_path).problems  # ... verify sees both
    assert any("7 keys for 8 items" in p for p in problems)
    assert any("shard-000001.codes.npy: id 5000 outside [0, 1000)" in p for p in problems)


def test_markers_errors_and_plan_are_cross_checked(tmp_path: Path) -> None:
    _write_set(tmp_path, n=16, shard_size=8)
    done = tmp_path / "shards" / "shard-000001.done.json"
    d = json.loads(done.read_text())
    d["upscaled"] = 3
    done.write_text(canonical_json(d))
    (tmp_path / "errors.jsonl").write_text("")
    _edit_manifest(tmp_path, lambda m: m.update(errors=1, shards=[{**m["shards"][0], "errors": 1}, m["shards"][1]]),
                   rehash=True)  # fmt: skip
    problems = verify(tmp_path).problems
    assert any("n=8 and errors=1 do not add up" in p for p in problems)
    _write_set(tmp_path, n=16, shard_size=8)
    done.write_text(canonical_json(d))
    problems = verify(tmp_path).problems
    assert problems == ["shard-000001.done.json and the manifest differ in upscaled"]
    (tmp_path / "plan.json").write_text(json.dumps({"plan_id": "another"}))
    assert "plan.json and manifest.json name different plans" in verify(tmp_path).problems


def test_only_our_temporaries_are_removed(tmp_path: Path) -> None:
    _write_set(tmp_path)
    ours = [tmp_path / ".plan.json.tmp-0a1b2c3d", tmp_path / ".manifest.json.tmp-deadbeef",
            tmp_path / "shards" / ".shard-000001.codes.npy.tmp-12345678"]  # fmt: skip
    others = [tmp_path / ".thesis.tex.tmp-12345678", tmp_path / ".plan.json.tmp-XYZ",
              tmp_path / "plan.json.tmp-12345678", tmp_path / "shards" / ".notes.txt.tmp-12345678"]  # fmt: skip
    for p in ours + others:
        p.write_text("x")
    complete = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p not in ours + others)
    assert remove_temporaries(tmp_path) == 3
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    assert complete == sorted(p for p in tmp_path.rglob("*") if p.is_file() and p not in others)
