"""Output that reads anywhere: whole values when piped or narrow, --json, and progress lines in a log as work goes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_folder, make_tiny_checkpoint
from rich.console import Console
from typer.testing import CliRunner

from tokkit.cli import output
from tokkit.cli.app import app
from tokkit.progress import IntervalReporter

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
NARROW = {"COLUMNS": "80", "TOKKIT_OFFLINE": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "a-rather-long-checkpoint-name")


def test_presets_piped_at_80_columns_prints_whole_values() -> None:
    from tokkit.config import get_preset, list_presets

    res = runner.invoke(app, ["presets"], env=NARROW)
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout
    for name in list_presets():
        line = next(x for x in res.stdout.splitlines() if x.startswith(name))
        assert get_preset(name).description in line  # one line per preset, nothing wrapped or cut


def test_bench_piped_at_80_columns_prints_whole_numbers(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TOKKIT_WEIGHTS_DIR", raising=False)
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "bench"
    args = ["bench", str(ckpt), "--data", str(data), "--out", str(out), "-q", "--device", "cpu"]
    args += ["-m", "psnr,ssim,usage"]
    res = runner.invoke(app, args, env=NARROW)
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout and "a-rather-long-checkpoint-name" in res.stdout
    m = json.loads((out / "results.json").read_text())["results"][0]
    assert f"{m['metrics']['psnr']:.2f}" in res.stdout and f"{m['metrics']['ssim']:.4f}" in res.stdout
    assert f"{m['usage']['perplexity']:.1f}" in res.stdout

    res = runner.invoke(app, [*args, "--json"], env=NARROW)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # one JSON object, nothing else on stdout
    assert doc["format"] == "tokkit-bench/1" and doc["results"][0]["metrics"]["psnr"] == m["metrics"]["psnr"]


def test_narrow_terminal_gets_one_block_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=buf, force_terminal=True, width=40, color_system=None))
    headers = ["checkpoint", "quantizer", "rFID", "PSNR"]
    output.emit_table("t", headers, [["a-long-checkpoint-name-x", "lfq", "12.345678", "27.123456"]])
    text = buf.getvalue()
    assert "…" not in text and "PSNR: 27.123456" in text and "rFID: 12.345678" in text

    buf.truncate(0)
    monkeypatch.setattr(output, "console", Console(file=buf, force_terminal=True, width=200, color_system=None))
    output.emit_table("t", headers, [["a-long-checkpoint-name-x", "lfq", "12.345678", "27.123456"]])
    assert "│" in buf.getvalue() and "27.123456" in buf.getvalue()  # wide enough: a rich table


def test_json_on_encode_verify_info_decode(ckpt: Path, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=5)
    out = tmp_path / "shards"
    r = runner.invoke(app, ["encode", str(ckpt), str(data), "--out", str(out), "--shard-size", "4", "-j", "0",
                            "--device", "cpu", "-q", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 5
    r = runner.invoke(app, ["verify", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    r = runner.invoke(app, ["info", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "shard set"
    r = runner.invoke(app, ["info", str(ckpt), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["codebook_size"] == 1000
    r = runner.invoke(app, ["decode", str(ckpt), str(out), "--out", str(tmp_path / "png"), "-n", "2", "--device", "cpu",
                            "--json"])  # fmt: skip
    assert r.exit_code == 0 and json.loads(r.stdout)["count"] == 2
    r = runner.invoke(app, ["presets", "--json"])
    assert r.exit_code == 0 and "sample-fsq" in json.loads(r.stdout)["presets"]


def test_info_piped_is_key_value_lines(ckpt: Path) -> None:
    res = runner.invoke(app, ["info", str(ckpt)], env=NARROW)
    assert res.exit_code == 0 and "  codebook_size: 1000" in res.stdout and "…" not in res.stdout


def test_interval_reporter_writes_lines_while_work_goes_on() -> None:
    stream = io.StringIO()
    rep = IntervalReporter(stream=stream, interval=0)
    rep.start("encode", 4)
    for i in range(1, 4):
        rep.advance(i, loss=0.5)
        assert f"encode: {i}/4" in stream.getvalue()  # already written, before the phase ends
    rep.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "encode: started, 4 to do" and lines[-1].endswith("done") and len(lines) == 5

    quiet = io.StringIO()
    rep = IntervalReporter(stream=quiet, interval=3600)
    rep.start("encode", 4)
    for i in range(1, 5):
        rep.advance(i)
    rep.stop()
    assert len(quiet.getvalue().splitlines()) == 2  # started, done


def test_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKKIT_PROGRESS_INTERVAL", "2.5")
    assert IntervalReporter().interval == 2.5
    monkeypatch.setenv("TOKKIT_PROGRESS_INTERVAL", "soon")
    assert IntervalReporter().interval == 10.0


def test_encode_logs_progress_lines_when_stderr_is_not_a_terminal(ckpt: Path, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=6)
    args = ["encode", str(ckpt), str(data), "--out", str(tmp_path / "s"), "-b", "2", "-j", "0", "--device", "cpu"]
    res = runner.invoke(app, args, env={"TOKKIT_PROGRESS_INTERVAL": "0"})
    assert res.exit_code == 0, res.output
    progress = [x for x in res.stderr.splitlines() if x.startswith("encode") and "/6" in x]
    assert len(progress) >= 3, res.stderr  # one per batch, not only at the end
