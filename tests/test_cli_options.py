"""One set of options across commands, library defaults, capped workers, and a CLI that answers before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import tokkit
from tokkit.cli import checks, common
from tokkit.cli.app import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

# option -> (its flags, its default, the commands that must have it)
SHARED = {
    "workers": (["--workers", "-j"], None, {"train", "encode", "bench"}),
    "batch_size": (["--batch-size", "-b"], None, {"train", "encode", "decode", "bench"}),
    "num_images": (["--num-images", "-n"], None, {"decode", "bench"}),
    "quiet": (["--quiet", "-q"], False, {"train", "encode", "decode", "verify", "bench", "export", "convert"}),
    "json_out": (
        ["--json"], False, {"train", "encode", "decode", "verify", "info", "bench", "presets", "export", "convert"}
    ),
    "device": (["--device"], "auto", {"train", "encode", "decode", "bench"}),
}


def test_shared_options_have_one_name_short_flag_and_default_everywhere() -> None:
    group = get_command(app)
    for name, (flags, default, commands) in SHARED.items():
        have = set()
        for cmd_name, cmd in group.commands.items():  # type: ignore[attr-defined]
            params = {p.name: p for p in cmd.params}
            if name in params:
                have.add(cmd_name)
                assert sorted(params[name].opts) == sorted(flags), (cmd_name, name, params[name].opts)
                assert params[name].default == default, (cmd_name, name)
        assert have == commands, name


def test_cli_copies_of_library_choices_match_the_library() -> None:
    from tokkit.bench import METRICS
    from tokkit.cli import bench
    from tokkit.data.transforms import VIEWS
    from tokkit.metrics import LPIPS_NETS

    assert tuple(VIEWS) == checks.VIEWS
    assert tuple(METRICS) == bench.METRICS
    assert tuple(LPIPS_NETS) == bench.LPIPS_NETS


def test_workers_are_capped_at_the_cores_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [common.cap_workers(n) for n in (0, 1, 4)] == [0, 1, 1]
    monkeypatch.setattr(common, "usable_cores", lambda: 16)
    assert common.cap_workers(4) == 4 and common.cap_workers(64) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: the cores are shared by the local processes
    assert common.cap_workers(8) == 3


def test_encode_default_workers_is_the_library_default_capped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tokkit.encode
    from tokkit.errors import DataError

    seen: dict = {}

    def fake(checkpoint, data, out, *, workers=2, batch_size=64, **kwargs):
        seen.update(workers=workers, batch_size=batch_size)
        raise DataError("stop here")

    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(tokkit.encode, "encode_dataset", fake)
    monkeypatch.setattr(common, "usable_cores", lambda: 2)
    args = ["encode", str(tmp_path / "ck"), "sample", "--out", str(tmp_path / "o"), "-q"]
    assert runner.invoke(app, args).exit_code == 2
    assert seen == {"workers": 1, "batch_size": 64}
    assert runner.invoke(app, [*args, "-j", "0", "-b", "3"]).exit_code == 2
    assert seen == {"workers": 0, "batch_size": 3}


def test_train_workers_sets_num_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tokkit.train
    from tokkit.errors import DataError

    seen: list[int] = []

    def fake(tokenizer_cfg, train_cfg, **kwargs):
        seen.append(train_cfg.num_workers)
        raise DataError("stop here")

    monkeypatch.setattr(tokkit.train, "train", fake)
    monkeypatch.setattr(common, "usable_cores", lambda: 8)
    base = ["train", "--out", str(tmp_path / "r"), "-q"]
    for extra in (["-j", "3"], ["--set", "train.num_workers=2"], ["--workers", "32"]):
        assert runner.invoke(app, [*base, *extra]).exit_code == 2
    assert seen == [3, 2, 7]


def test_decode_keeps_limit_as_a_hidden_alias() -> None:
    res = runner.invoke(app, ["decode", "--help"], env={"COLUMNS": "200"})
    assert "--num-images" in res.stdout and "--limit" not in res.stdout


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith(f"tokkit {tokkit.__version__} (torch ")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["encode", "{tmp}/nope", "sample", "--out", "{tmp}/o"],
        ["encode", "{tmp}", "{tmp}/nothing", "--out", "{tmp}/o"],
        ["encode", "{tmp}", "sample", "--out", "{tmp}/o", "--views", "five"],
        ["decode", "{tmp}/nope", "{tmp}", "--out", "{tmp}/o"],
        ["decode", "{tmp}", "{tmp}/nope.npy", "--out", "{tmp}/o"],
        ["verify", "{tmp}/nope"],
        ["info", "{tmp}/nope"],
        ["convert", "{tmp}/nope.ckpt", "--out", "{tmp}/o"],
        ["convert", "{tmp}", "--out", "{tmp}"],
        ["bench", "{tmp}/nope", "--data", "sample"],
        ["bench", "{tmp}", "--data", "sample", "--metrics", "fid"],
        ["train", "--set", "train.grad_clip=-1", "--out", "{tmp}/r"],
        ["train", "--data", "{tmp}/nope", "--out", "{tmp}/r"],
        ["train", "--device", "tpu"],
    ],
)
def test_mistakes_are_reported_before_torch_is_imported(argv: list[str], tmp_path: Path) -> None:
    """A fresh interpreter: parsing and failing on a wrong path or value leaves torch unimported (fast answers)."""
    args = [a.format(tmp=tmp_path) for a in argv]
    code = (
        "import sys, json\n"
        "from tokkit.cli import main\n"
        f"sys.argv = ['tokkit', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False, proc.stderr
    if argv[0].startswith("--"):
        assert out["code"] in (0, None)
    else:
        assert out["code"] == 2 and proc.stderr.startswith("error:") and len(proc.stderr.splitlines()) == 1, proc.stderr
