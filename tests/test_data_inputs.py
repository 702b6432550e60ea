"""tokkit.data against bad inputs: changed data on resume, FIFOs / devices / link loops, array layouts and labels,
and oversized inputs (decompression bombs by bytes).

Every test that could hang on a regression runs under a deadline (``signal.alarm``) or in a child process with a
wall-clock timeout and an address-space cap, so that a regression fails instead of hanging CI or eating memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import make_folder, make_tiny_checkpoint
from PIL import Image

from tokkit.data import BadImage, ImageDataset, collate_skip_bad, max_input_bytes, open_source
from tokkit.errors import ConfigError, DataError, ShardError

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, FIFOs, /dev/zero)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


@contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in this thread after ``seconds`` (interrupts a blocking open of a FIFO too)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_child(code: str, timeout: float = 180, extra_memory: int = 1536 * MiB) -> dict:
    """Run ``code`` in a child (tokkit and torch imported) that may use ``extra_memory`` more address space than after
    its imports, for at most ``timeout`` seconds; the code prints one JSON line, returned as a dict."""
    prelude = textwrap.dedent(
        f"""
        import json, os, resource, sys
        import torch
        import tokkit.data, tokkit.encode
        torch.set_num_threads(1)
        vm = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + {extra_memory}, resource.getrlimit(resource.RLIMIT_AS)[1]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
            env=env, cwd=REPO,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish within {timeout} s (a hang)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bmp_folder(root: Path, seed: int, n: int = 6) -> Path:
    """root/{a,b}/NNN.bmp random 12x10 images: a BMP's size depends on its dimensions only, never on its pixels."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i:03d}.bmp")
    return root


def encode(ckpt: Path, data, out: Path, **kw):
    from tokkit.encode import encode_dataset

    kw = {"shard_size": 4, "batch_size": 4, "workers": 0, "device": "cpu", **kw}
    return encode_dataset(ckpt, data, out, **kw)


def sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*.bmp"))}


def assert_refused(excinfo: pytest.ExceptionInfo) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg and "changed" in msg and "--overwrite" in msg, msg


# ---------------------------------------------------------------- 8.2: a resume only over the same bytes


def test_resume_refused_when_images_are_regenerated_in_place(ckpt: Path, tmp_path: Path) -> None:
    data = bmp_folder(tmp_path / "data", seed=0)
    before = sizes(data)
    first = encode(ckpt, data, tmp_path / "out")
    assert first.complete and first.images == 6
    bmp_folder(data, seed=1)  # same names, same sizes, new pixels
    assert sizes(data) == before
    with pytest.raises(ShardError) as info:
        encode(ckpt, data, tmp_path / "out")
    assert_refused(info)


def test_resume_refused_for_another_folder_with_the_same_names_and_sizes(ckpt: Path, tmp_path: Path) -> None:
    a = bmp_folder(tmp_path / "a", seed=0)
    encode(ckpt, a, tmp_path / "out")
    b = bmp_folder(tmp_path / "b", seed=1)
    assert sizes(a) == sizes(b)
    with pytest.raises(ShardError) as info:
        encode(ckpt, b, tmp_path / "out")
    assert_refused(info)


def test_resume_refused_when_listed_files_change(ckpt: Path, tmp_path: Path) -> None:
    data = bmp_folder(tmp_path / "imgs", seed=0)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"imgs/{k}\n" for k in sizes(data)))
    encode(ckpt, lst, tmp_path / "out")
    bmp_folder(data, seed=1)
    with pytest.raises(ShardError) as info:
        encode(ckpt, lst, tmp_path / "out")
    assert_refused(info)


@pytest.mark.parametrize("kind", ["folder", "list", "zip"])
def test_identical_rerun_resumes(ckpt: Path, tmp_path: Path, kind: str) -> None:
    data = bmp_folder(tmp_path / "imgs", seed=0)
    spec: Path = data
    if kind == "list":
        spec = tmp_path / "list.txt"
        spec.write_text("".join(f"imgs/{k}\n" for k in sizes(data)))
    elif kind == "zip":
        spec = tmp_path / "d.zip"
        with zipfile.ZipFile(spec, "w") as zf:
            for k in sizes(data):
                zf.write(data / k, k)
    first = encode(ckpt, spec, tmp_path / "out")
    again = encode(ckpt, spec, tmp_path / "out")
    assert again.resumed == again.shards[1] == first.shards[1] == 2 and again.encoded == 0 and again.complete


def test_fingerprint_follows_bytes_not_root(tmp_path: Path) -> None:
    data = bmp_folder(tmp_path / "data", seed=0)
    fp = open_source(data).fingerprint()
    moved = data.rename(tmp_path / "moved")  # moving a dataset keeps its fingerprint
    assert open_source(moved).fingerprint() == fp
    st = (moved / "a" / "000.bmp").stat()
    os.utime(moved / "a" / "000.bmp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: maybe new bytes
    assert open_source(moved).fingerprint() != fp

    zips = []
    for seed in (0, 1):  # same names and sizes, other bytes: the members' CRC-32 tells them apart
        folder = bmp_folder(tmp_path / f"z{seed}", seed=seed)
        zips.append(tmp_path / f"z{seed}.zip")
        with zipfile.ZipFile(zips[-1], "w") as zf:
            for k in sizes(folder):
                zf.write(folder / k, k)
    assert open_source(zips[0]).fingerprint() != open_source(zips[1]).fingerprint()


# ---------------------------------------------------------------- 8.4: regular files only, each file once


@linux_only
def test_fifo_is_a_bad_input_not_a_hang(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=4)
    os.mkfifo(data / "a" / "x.png")
    with deadline(60):
        src = open_source(data)
        assert "a/x.png" in src.keys
        with pytest.raises(BadImage, match="FIFO"):
            src.read(src.keys.index("a/x.png"))
        batch = collate_skip_bad([ImageDataset(src, 16)[i] for i in range(len(src))])
    assert len(batch["images"]) == 4 and len(batch["errors"]) == 1 and "regular file" in batch["errors"][0][1]


@linux_only
@pytest.mark.parametrize("name", ["list.txt", "d.npy", "d.zip"])
def test_fifo_as_the_data_path_is_refused(tmp_path: Path, name: str) -> None:
    os.mkfifo(tmp_path / name)
    with deadline(60), pytest.raises(DataError) as info:
        open_source(tmp_path / name)
    assert "FIFO" in str(info.value) and "\n" not in str(info.value)


@linux_only
def test_fifo_device_and_two_link_loops_do_not_hang_encode(ckpt: Path, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=6)
    os.mkfifo(data / "a" / "x.png")
    os.symlink("/dev/zero", data / "b" / "zero.png")
    os.symlink("..", data / "a" / "up")  # a/up -> data: a loop
    os.symlink("../b", data / "a" / "to_b")  # a/to_b -> b and b/to_a -> a: a second loop
    os.symlink("../a", data / "b" / "to_a")
    out = tmp_path / "out"
    got = run_child(
        f"""
        res = tokkit.encode.encode_dataset({str(ckpt)!r}, {str(data)!r}, {str(out)!r}, shard_size=4, batch_size=4,
                                           workers=0, device="cpu", max_errors=2)
        src = tokkit.data.open_source({str(data)!r})
        print(json.dumps(dict(images=res.images, skipped=res.skipped, keys=src.keys, left_out=src.skipped)))
        """
    )
    assert got["images"] == 6 and got["skipped"] == 2 and len(got["keys"]) == 8
    assert set(got["left_out"]) == {"a/up/", "a/to_b/", "b/to_a/"}
    reasons = {e["key"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert "FIFO" in reasons["a/x.png"] and "device" in reasons["b/zero.png"]


def test_link_loop_lists_each_image_once(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=4)
    os.symlink("..", data / "a" / "loop")
    with deadline(120):
        src = open_source(data)
    assert src.keys == ["a/000.png", "a/002.png", "b/001.png", "b/003.png"]
    assert "loop" in src.skipped["a/loop/"]


def test_links_to_files_and_folders(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=4)
    outside = make_folder(tmp_path / "elsewhere", n=2)
    os.symlink(outside / "a", data / "c")  # a class folder kept elsewhere: followed, labelled c
    os.symlink("../a/000.png", data / "b" / "again.png")  # a second name for a file listed already
    os.symlink(data / "b", data / "zz")  # a second name for a folder listed already
    with deadline(120):
        src = open_source(data)
    assert src.keys == ["a/000.png", "a/002.png", "b/001.png", "b/003.png", "c/000.png"]
    assert src.class_to_idx == {"a": 0, "b": 1, "c": 2} and src.labels[-1] == 2
    assert src.skipped == {"b/again.png": "the same file as a/000.png", "zz/": src.skipped["zz/"]}
    assert np.array_equal(np.asarray(src.read(4)), np.asarray(Image.open(outside / "a" / "000.png").convert("RGB")))


def test_list_names_each_file_once(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", n=2)
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/a/000.png\n./imgs/a/000.png\nimgs/b/../a/000.png\nimgs/b/001.png\n")
    src = open_source(lst)
    assert src.keys == ["./imgs/a/000.png", "imgs/b/001.png"] and len(src.skipped) == 2


# ---------------------------------------------------------------- 8.7: array layouts and labels


@pytest.mark.parametrize(
    ("shape", "hint"),
    [((32, 40, 3), "x[None]"), ((32, 40, 1), "x[None]"), ((5, 3, 8, 8), "transpose"), ((5, 8, 8, 4), "alpha"),
     ((8, 8), "x[None]")],
)  # fmt: skip
def test_ambiguous_array_layouts_are_refused(tmp_path: Path, shape: tuple, hint: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros(shape, np.uint8))
    with pytest.raises(DataError) as info:
        open_source(tmp_path / "x.npy")
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_grayscale_arrays_still_read(tmp_path: Path) -> None:
    np.save(tmp_path / "g.npy", np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7))
    np.save(tmp_path / "g1.npy", np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7, 1))
    for name in ("g.npy", "g1.npy"):
        src = open_source(tmp_path / name)
        assert len(src) == 5 and src.read(1).size == (7, 6)


def test_npz_string_labels_become_class_ids(tmp_path: Path) -> None:
    images = np.zeros((5, 8, 8, 3), np.uint8)
    names = np.array(["dog", "cat", "dog", "bird", "cat"])
    np.savez(tmp_path / "s.npz", images=images, labels=names)
    src = open_source(tmp_path / "s.npz")
    assert src.class_to_idx == {"bird": 0, "cat": 1, "dog": 2} and src.labels == [2, 1, 2, 0, 1]
    np.savez(tmp_path / "n.npz", images=images, labels=names, class_names=np.array(["dog", "cat", "bird"]))
    src = open_source(tmp_path / "n.npz")
    assert src.class_to_idx == {"dog": 0, "cat": 1, "bird": 2} and src.labels == [0, 1, 0, 2, 1]
    np.savez(tmp_path / "u.npz", images=images, labels=names, class_names=np.array(["dog", "cat"]))
    with pytest.raises(DataError, match="not in class_names"):
        open_source(tmp_path / "u.npz")


@pytest.mark.parametrize(
    ("labels", "match"),
    [(np.array(["a", 1, None], dtype=object), "objects"), (np.array([0.5, 1, 2]), "fractional"),
     (np.array([0, 1]), "2 labels for 3 images"), (np.array([0, -7, 1]), "-1 for unlabeled")],
)  # fmt: skip
def test_bad_npz_labels_are_refused_in_one_line(tmp_path: Path, labels: np.ndarray, match: str) -> None:
    np.savez(tmp_path / "l.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=labels)
    with pytest.raises(DataError, match=match) as info:
        open_source(tmp_path / "l.npz")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- 12.6: a byte cap on every input


def test_max_input_bytes_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TOKKIT_MAX_INPUT_BYTES", raising=False)
    assert max_input_bytes() == 256 * MiB
    monkeypatch.setenv("TOKKIT_MAX_INPUT_BYTES", "4M")
    assert max_input_bytes() == 4 * MiB and max_input_bytes(1000) == 1000 and max_input_bytes("2GiB") == 2**31
    make_folder(tmp_path / "d", n=2)
    assert open_source(tmp_path / "d").max_input_bytes == 4 * MiB
    assert open_source(tmp_path / "d", max_input_bytes=123).max_input_bytes == 123
    monkeypatch.setenv("TOKKIT_MAX_INPUT_BYTES", "lots")
    with pytest.raises(ConfigError, match="TOKKIT_MAX_INPUT_BYTES") as info:
        open_source(tmp_path / "d")
    assert "\n" not in str(info.value)


def zeros_zip(path: Path, member: str, size: int, extra: dict[str, bytes] | None = None) -> Path:
    """A zip whose ``member`` inflates to ``size`` zero bytes (it is ~1000x smaller), written 1 MiB at a time."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
        with zf.open(member, "w") as f:
            for _ in range(size // MiB):
                f.write(bytes(MiB))
    return path


def peak_bytes(fn) -> int:
    """Peak Python/numpy memory allocated while ``fn()`` runs (it may raise)."""
    tracemalloc.start()
    try:
        fn()
    except Exception:  # noqa: BLE001 - the caller checks the outcome separately
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("kind", ["zip", "folder", "list"])
def test_oversized_input_is_a_bad_input_read_no_further_than_the_cap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    monkeypatch.setenv("TOKKIT_MAX_INPUT_BYTES", str(4 * MiB))
    Image.new("RGB", (9, 7), (10, 20, 30)).save(tmp_path / "g.png")
    good = (tmp_path / "g.png").read_bytes()
    if kind == "zip":
        spec = zeros_zip(tmp_path / "d.zip", "bomb.png", 64 * MiB, {"good.png": good})
    else:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "good.png").write_bytes(good)
        with open(tmp_path / "d" / "bomb.png", "wb") as f:
            f.truncate(64 * MiB)  # sparse: 64 MiB of zeros that take no disk
        spec = tmp_path / "d"
        if kind == "list":
            spec = tmp_path / "list.txt"
            spec.write_text("d/bomb.png\nd/good.png\n")
    src = open_source(spec)
    bomb = next(i for i, k in enumerate(src.keys) if k.endswith("bomb.png"))
    with pytest.raises(BadImage) as info:
        src.read(bomb)
    assert "too large" in info.value.reason and "TOKKIT_MAX_INPUT_BYTES" in info.value.reason
    assert peak_bytes(lambda: src.read(bomb)) < 8 * MiB  # refused before (not after) reading 64 MiB
    assert src.read(1 - bomb).size == (9, 7)


def test_zip_member_that_lies_about_its_size_is_read_no_further(tmp_path: Path) -> None:
    path = zeros_zip(tmp_path / "d.zip", "bomb.png", 64 * MiB)
    raw = bytearray(path.read_bytes())
    cd = raw.index(b"PK\x01\x02")  # central directory entry: uncompressed size at offset 24
    raw[cd + 24 : cd + 28] = (1000).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    src = open_source(path, max_input_bytes=4 * MiB)
    with pytest.raises(BadImage, match="cannot read zip member"):
        src.read(0)
    assert peak_bytes(lambda: src.read(0)) < 8 * MiB


def test_npz_array_over_the_cap_is_refused_before_inflating(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("images.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (64, 1024, 1024)})
        for _ in range(64):
            f.write(bytes(MiB))
    monkeypatch.setenv("TOKKIT_MAX_INPUT_BYTES", str(4 * MiB))
    with pytest.raises(DataError) as info:
        open_source(path)
    assert ".npy" in str(info.value) and "TOKKIT_MAX_INPUT_BYTES" in str(info.value) and "\n" not in str(info.value)
    assert peak_bytes(lambda: open_source(path)) < 8 * MiB


def test_encode_logs_an_oversized_zip_member(monkeypatch: pytest.MonkeyPatch, ckpt: Path, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs", n=5)
    extra = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}
    spec = zeros_zip(tmp_path / "d.zip", "a/bomb.png", 64 * MiB, extra)
    monkeypatch.setenv("TOKKIT_MAX_INPUT_BYTES", str(4 * MiB))
    res = encode(ckpt, spec, tmp_path / "out", max_errors=1)
    assert res.complete and res.images == 5 and res.skipped == 1
    (err,) = map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())
    assert err["key"] == "a/bomb.png" and "too large" in err["reason"]


@linux_only
def test_link_to_dev_zero_is_a_bad_input_not_a_memory_blowup(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=2)
    os.symlink("/dev/zero", data / "a" / "zero.png")
    got = run_child(
        f"""
        src = tokkit.data.open_source({str(data)!r})
        try:
            src.read(src.keys.index("a/zero.png"))
            reason = None
        except tokkit.data.BadImage as e:
            reason = e.reason
        print(json.dumps(dict(reason=reason)))
        """,
        timeout=120,
        extra_memory=512 * MiB,
    )
    assert "not a regular file" in got["reason"]
