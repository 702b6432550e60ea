"""tokkit.encode: round trip, bad inputs, error budget, plan refusal, resume after SIGKILL, two processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_folder, make_tiny_checkpoint
from PIL import Image

from tokkit.errors import ConfigError, DataError, ShardError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- helpers shared by the shard / decode / CLI tests


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a shard set (relative path -> bytes), without plan.json's absolute source root."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


# ---------------------------------------------------------------- tests


def test_round_trip_matches_reconstruction(ckpt: Path, tmp_path: Path) -> None:
    from tokkit.checkpoint import load
    from tokkit.data import center_crop_resize, open_source, to_float, to_uint8
    from tokkit.decode import decode_tokens
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    data = make_folder(tmp_path / "data", n=10, size=(24, 20))
    # CPU numerics: on a GPU (bf16 autocast) a batch of 3 and a single image may differ in a token
    res = encode_dataset(ckpt, data, tmp_path / "out", shard_size=4, batch_size=3, workers=0, device="cpu")
    assert res.complete and res.images == 10 and res.shards == (3, 3) and res.skipped == 0
    ds = open_shards(tmp_path / "out")
    assert len(ds) == 10 and ds[0][0].dtype == torch.int64 and ds[0][0].shape == (8, 8)
    assert [ds[i][1] for i in range(10)] == [0] * 5 + [1] * 5  # labels from class folders a, b (sorted keys)
    dec = decode_tokens(ckpt, tmp_path / "out", tmp_path / "png", grid=True, limit=6, device="cpu")
    assert len(dec.files) == 6 and dec.grid is not None and dec.grid.is_file()

    model = load(ckpt)
    src = open_source(data)
    x = to_float(np.stack([center_crop_resize(src.read(i), 16) for i in range(6)]))
    with torch.inference_mode():
        ref = to_uint8(model(x)[0].clamp(-1, 1)).numpy().astype(int)
        assert torch.equal(torch.stack([ds[i][0] for i in range(6)]), model.encode(x))
    got = np.stack([np.asarray(Image.open(f)) for f in dec.files]).astype(int)
    assert np.abs(got - ref).max() <= 1  # same images as the tokenizer's own reconstruction (rounding aside)


def test_bad_inputs_skipped_and_logged(ckpt: Path, tmp_path: Path) -> None:
    from test_data import bad_files, odd_files

    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards

    data = make_folder(tmp_path / "data", n=4, bad={**bad_files(), **odd_files()})
    res = encode_dataset(
        ckpt, data, tmp_path / "out", shard_size=5, batch_size=4, workers=2, max_errors=10, device="cpu"
    )
    assert res.skipped == len(bad_files()) and res.images == 4 + len(odd_files())
    assert res.upscaled == 1 + 0  # small.png only (the 20x18 pngs are above 16 px)
    import json

    lines = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert {Path(e["key"]).name for e in lines} == set(bad_files()) and all(e["reason"] for e in lines)
    assert len(open_shards(tmp_path / "out")) == res.images


def test_error_budget_and_strict(ckpt: Path, tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset, error_budget

    assert error_budget(1000, 0.01, False) == 10 and error_budget(50, 0.01, False) == 1
    assert error_budget(50, 3, False) == 3 and error_budget(50, 0.5, True) == 0
    data = make_folder(tmp_path / "data", n=6, bad={"zero.jpg": b"", "text.png": b"hello"})
    with pytest.raises(DataError) as info:
        encode_dataset(ckpt, data, tmp_path / "out", shard_size=4, batch_size=2, workers=0, strict=True, device="cpu")
    assert "\n" not in str(info.value) and "errors.jsonl" in str(info.value)
    assert (tmp_path / "out" / "errors.jsonl").read_text()
    res = encode_dataset(
        ckpt, data, tmp_path / "out", shard_size=4, batch_size=2, workers=0, max_errors=2, device="cpu"
    )
    assert res.complete and res.skipped == 2


def test_changed_plan_is_refused(ckpt: Path, tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset

    data = make_folder(tmp_path / "data", n=4)
    kw = {"shard_size": 4, "batch_size": 4, "workers": 0, "device": "cpu"}
    encode_dataset(ckpt, data, tmp_path / "out", **kw)
    again = encode_dataset(ckpt, data, tmp_path / "out", **kw)
    assert again.resumed == 1 and again.encoded == 0 and again.complete
    Image.new("RGB", (20, 20)).save(data / "b" / "zzz.png")
    with pytest.raises(ShardError, match="inputs changed") as info:
        encode_dataset(ckpt, data, tmp_path / "out", **kw)
    assert "\n" not in str(info.value) and "--overwrite" in str(info.value)
    (data / "b" / "zzz.png").unlink()
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ShardError, match="tokenizer"):
        encode_dataset(other, data, tmp_path / "out", **kw)
    res = encode_dataset(other, data, tmp_path / "out", overwrite=True, **kw)
    assert res.complete and res.images == 4
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "thesis.tex").write_text("x")
    with pytest.raises(ShardError, match="not a tokkit shard set"):
        encode_dataset(ckpt, data, tmp_path / "junk", overwrite=True, **kw)


_KILLABLE = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from tokkit.encode import encode_dataset
    from tokkit.progress import Reporter

    class Slow(Reporter):  # slows the run down so that the test can kill it mid-way
        def advance(self, completed, **fields):
            time.sleep(0.15)

    encode_dataset(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=6, batch_size=3, workers=0, max_errors=5,
                   device="cpu", reporter=Slow())
    """
)


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(ckpt: Path, tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset

    data = make_folder(tmp_path / "data", n=40, bad={"zero.jpg": b""})
    kw = {"shard_size": 6, "batch_size": 3, "workers": 0, "max_errors": 5, "device": "cpu"}
    ref = encode_dataset(ckpt, data, tmp_path / "ref", **kw)
    assert ref.complete and ref.shards == (7, 7)

    out = tmp_path / "killed"
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(data), str(out)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "shards" / "shard-000001.done.json").exists():
        assert proc.poll() is None, "the encode subprocess ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = sorted(p.name for p in (out / "shards").glob("*.done.json"))
    assert 2 <= len(committed) < 7 and not (out / "manifest.json").exists()

    res = encode_dataset(ckpt, data, out, **kw)
    assert res.complete and res.resumed == len(committed)
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_two_processes_equal_one(ckpt: Path, tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset

    data = make_folder(tmp_path / "data", n=20)
    # two ranks on the CPU (gloo), even where a GPU is visible: two ranks must not share one GPU
    one = encode_dataset(ckpt, data, tmp_path / "one", shard_size=4, batch_size=2, workers=0, device="cpu")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tokkit", "encode", str(ckpt), str(data), "--out", str(tmp_path / "two"),
           "--shard-size", "4", "--batch-size", "2", "--workers", "0", "--nproc-per-node", "2", "--device", "cpu",
           "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert one.complete and tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_ids_above_2_31_survive_a_2_32_code_lfq(tmp_path: Path) -> None:
    """LFQ / BSQ with 2^32 codes: ids up to 2^32 - 1 are stored as uint32, never wrapped negative (issue 8.1)."""
    from tokkit.checkpoint import load
    from tokkit.data import center_crop_resize, open_source, to_float
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards, read_manifest, verify

    ckpt = make_tiny_checkpoint(tmp_path / "lfq", quantizer="lfq", quantizer_kwargs={"codebook_size": 2**32})
    data = make_folder(tmp_path / "data", n=4)
    res = encode_dataset(ckpt, data, tmp_path / "out", shard_size=4, batch_size=4, workers=0, device="cpu")
    assert res.complete and read_manifest(tmp_path / "out")["dtype"] == "uint32"
    ds = open_shards(tmp_path / "out")
    got = torch.stack([ds[i][0] for i in range(4)])
    src = open_source(data)
    x = to_float(np.stack([center_crop_resize(src.read(i), 16) for i in range(4)]))
    with torch.inference_mode():
        ref = load(ckpt).encode(x)
    assert ref.max() >= 2**31  # the ids that int32 used to wrap negative
    assert got.min() >= 0 and torch.equal(got, ref)
    assert verify(tmp_path / "out").ok


def test_ids_the_dtype_cannot_hold_are_refused(tmp_path: Path) -> None:
    from tokkit.shards import as_codes, plan_shards, write_shard

    ids = np.array([[0, 2**32 - 1]], np.int64)
    assert as_codes(ids, np.dtype(np.uint32), 2**32).dtype == np.uint32
    with pytest.raises(ShardError, match="outside"):
        as_codes(ids, np.dtype(np.int32))  # the old dtype: 2^32 - 1 would wrap to -1
    with pytest.raises(ShardError, match="outside"):
        as_codes(np.array([-1]), np.dtype(np.uint16))
    with pytest.raises(ShardError, match="outside"):
        as_codes(np.array([1000]), np.dtype(np.uint16), codebook_size=1000)
    spec = plan_shards(1, 1)[0]
    with pytest.raises(ShardError, match="outside"):  # an id of another codebook never reaches disk
        write_shard(tmp_path, spec, np.array([[7]], np.uint16), np.zeros(1), [{"key": "k"}], codebook_size=5)
    assert not (tmp_path / "shards" / "shard-000000.done.json").exists()


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"shard_size": 0}, "--shard-size"),
        ({"batch_size": 0}, "--batch-size"),
        ({"workers": -1}, "--workers"),
        ({"max_errors": -1}, "--max-errors"),
        ({"max_errors": float("inf")}, "--max-errors"),
        ({"views": "five"}, "--views"),
    ],
)
def test_options_are_range_checked_before_any_work(tmp_path: Path, kw: dict, needle: str) -> None:
    from tokkit.encode import encode_dataset

    with pytest.raises(ConfigError, match=needle) as info:  # a missing checkpoint would be the next error
        encode_dataset(tmp_path / "no-checkpoint", tmp_path / "no-data", tmp_path / "out", **kw)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_int32_sets_of_earlier_versions_stay_readable_and_resumable(ckpt: Path, tmp_path: Path) -> None:
    """A set begun with the old int32 dtype (65,537 to 2^31 codes) resumes in int32 instead of being refused."""
    from tokkit.encode import encode_dataset
    from tokkit.shards import open_shards, read_manifest, verify

    big = make_tiny_checkpoint(tmp_path / "vq", quantizer="vq", quantizer_kwargs={"codebook_size": 70000})
    data = make_folder(tmp_path / "data", n=6)
    kw = {"shard_size": 4, "batch_size": 4, "workers": 0, "device": "cpu"}
    ref = encode_dataset(big, data, tmp_path / "ref", **kw)
    assert ref.complete and read_manifest(tmp_path / "ref")["dtype"] == "uint32"
    # an interrupted int32 encode of an earlier version: its plan says int32, shard 0 is committed in int32
    import tokkit.encode as enc

    real = enc.codes_dtype
    enc.codes_dtype = lambda size: np.dtype(np.int32)
    try:
        encode_dataset(big, data, tmp_path / "old", **kw)
    finally:
        enc.codes_dtype = real
    (tmp_path / "old" / "shards" / "shard-000001.done.json").unlink()
    (tmp_path / "old" / "manifest.json").unlink()
    res = encode_dataset(big, data, tmp_path / "old", **kw)
    assert res.complete and res.resumed == 1 and read_manifest(tmp_path / "old")["dtype"] == "int32"
    assert verify(tmp_path / "old").ok
    old, new = open_shards(tmp_path / "old"), open_shards(tmp_path / "ref")
    assert all(torch.equal(old[i][0], new[i][0]) for i in range(6))
