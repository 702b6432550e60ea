"""CLI wiring of encode / decode / verify / info, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_folder, make_tiny_checkpoint
from typer.testing import CliRunner

from tokkit.cli.app import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


def test_encode_verify_info_decode(ckpt: Path, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=6)
    out = tmp_path / "shards"
    r = runner.invoke(app, ["encode", str(ckpt), str(data), "--out", str(out), "--shard-size", "4", "-j", "0",
                            "--views", "flip", "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "images" in r.output and "2/2 committed" in r.output
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0 and "ok" in r.output
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "tokkit-shards/1" in r.output and "uint16" in r.output
    r = runner.invoke(app, ["info", str(ckpt)])
    assert r.exit_code == 0 and "codebook_size" in r.output and "1000" in r.output
    r = runner.invoke(app, ["decode", str(ckpt), str(out), "--out", str(tmp_path / "png"), "--limit", "2", "--grid",
                            "--view", "1", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "png" / "grid.png").is_file() and len(list((tmp_path / "png").glob("*.png"))) == 3

    (out / "shards" / "shard-000000.labels.npy").write_bytes(b"broken")
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 1 and "shard-000000.labels.npy" in r.output
    assert f"repair with: tokkit encode {ckpt} {data} --out {out} --shard-size 4 --views flip" in r.output


def test_info_flags_corrupt_checkpoint_weights(ckpt: Path, tmp_path: Path) -> None:
    import shutil

    broken = shutil.copytree(ckpt, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"garbage")
    r = runner.invoke(app, ["info", str(broken)])
    assert r.exit_code == 1 and "does not match the sha256" in r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["encode", "{ck}", "{tmp}/nothing", "--out", "{tmp}/o"], "data not found"),
        (["encode", "{tmp}/no-ckpt", "{tmp}", "--out", "{tmp}/o"], "no checkpoint"),
        (["encode", "{ck}", "sample", "--out", "{tmp}/o", "--views", "five"], "unknown --views"),
        (["verify", "{tmp}"], "not a tokkit shard set"),
        (["decode", "{ck}", "{tmp}", "--out", "{tmp}/o"], "not a tokkit shard set"),
        (["info", "{tmp}/missing"], "no checkpoint"),
        (["encode", "{ck}", "sample", "--out", "{tmp}/o", "--shard-size", "0"], "'--shard-size'"),
        (["encode", "{ck}", "sample", "--out", "{tmp}/o", "--max-errors", "-1"], "'--max-errors'"),
        (["encode", "{ck}", "sample", "--out", "{tmp}/afile"], "is a file"),
        (["encode", "{ck}", "sample", "--out", "{tmp}/afile/sub"], "cannot write"),
        (["decode", "{ck}", "{tmp}/ids.npy", "--out", "{tmp}/o", "--limit", "-1"], "'--limit'"),
        (["decode", "{ck}", "{tmp}/ids.npy", "--out", "{tmp}/o", "-n", "0"], "'--num-images' / '-n'"),
        (["decode", "{ck}", "{tmp}/ids.npy", "--out", "{tmp}/o", "--view", "-2"], "'--view'"),
        (["decode", "{ck}", "{tmp}/ids.npy", "--out", "{tmp}/afile"], "is a file"),
        (["decode", "{ck}", "{tmp}/ids.npy", "--out", "{tmp}/afile/sub"], "cannot write"),
        (["decode", "{ck}", "{tmp}/obj.npy", "--out", "{tmp}/o"], "pickled"),
        (["decode", "{ck}", "{tmp}/big.npy", "--out", "{tmp}/o"], "outside [0, 1000)"),
    ],
)
def test_one_line_errors(ckpt: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    import numpy as np

    (tmp_path / "afile").write_text("not a folder")
    np.save(tmp_path / "ids.npy", np.zeros((2, 8, 8), np.int64))
    np.save(tmp_path / "big.npy", np.full((2, 8, 8), 2**32 + 1, np.int64))
    np.save(tmp_path / "obj.npy", np.array([None, {"x": 1}], dtype=object), allow_pickle=True)
    cpu = ["--device", "cpu"] if args[0] in ("encode", "decode") else []
    argv = [a.format(ck=ckpt, tmp=tmp_path) for a in args] + cpu
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_encode_takes_a_brace_pattern_of_tar_shards(ckpt: Path, tmp_path: Path) -> None:
    """A webdataset shard pattern passes the CLI's path check and is expanded by the source (every sample encoded)."""
    import io
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for t in range(2):
        with tarfile.open(tmp_path / f"d-{t:03d}.tar", "w") as tf:
            for i in range(3):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(png, "PNG")
                for name, data in ((f"s{i}.png", png.getvalue()), (f"s{i}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "shards"
    spec = str(tmp_path / "d-{000..001}.tar")
    res = CliRunner().invoke(app, ["encode", str(ckpt), spec, "--out", str(out), "-j", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["complete"]
    missing = CliRunner().invoke(app, ["encode", str(ckpt), str(tmp_path / "d-{000..002}.tar"), "--out", str(out)])
    assert missing.exit_code != 0 and "Traceback" not in missing.output
