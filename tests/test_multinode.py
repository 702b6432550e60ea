"""More than one machine: `--nnodes/--node-rank/--master-addr/--master-port` for encode and train.

Two "nodes" run as two launchers on this machine (one process each, gloo on the CPU), joined by torchrun's static
rendezvous on 127.0.0.1, exactly as two machines would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_checkpoint, tiny_train_sets
from typer.testing import CliRunner

import tokkit
from tokkit.cli.app import app
from tokkit.distributed import Nodes, free_port, torchrun_command
from tokkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# imported at start-up by every python process whose PYTHONPATH holds its folder: in a rank (LOCAL_RANK set), log
# each shard write as "RANK SHARD" to $TOKKIT_TEST_WRITES
SITECUSTOMIZE = """
import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("TOKKIT_TEST_WRITES"):
    import tokkit.encode as _enc
    _real = _enc.write_shard
    def _logged(out, spec, *args, **kwargs):
        with open(os.environ["TOKKIT_TEST_WRITES"], "a") as f:
            f.write(f"{os.environ['RANK']} {spec.id}\\n")
        return _real(out, spec, *args, **kwargs)
    _enc.write_shard = _logged
"""


def test_torchrun_command_carries_the_nodes():
    cmd = torchrun_command(2, ["encode", "x"], nodes=Nodes(3, 1, "10.0.0.1", 1234))
    i = cmd.index("--nnodes")
    assert cmd[i : i + 8] == ["--nnodes", "3", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "1234"]
    assert cmd[-3:] == ["tokkit", "encode", "x"] and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    many = torchrun_command(1, ["train"], nodes=Nodes(2, 0, "host"))
    assert many[many.index("--master-port") + 1] == "29500"  # torchrun's default: the same on every node
    one = torchrun_command(2, ["train"], port=4321)
    assert one[one.index("--nnodes") + 1] == "1" and one[one.index("--master-port") + 1] == "4321"


@pytest.mark.parametrize(
    ("nodes", "needle"),
    [
        (Nodes(0), "--nnodes must be >= 1"),
        (Nodes(2, 2, "h"), "--node-rank 2 is out of range for --nnodes 2"),
        (Nodes(2, -1, "h"), "--node-rank -1 is out of range"),
        (Nodes(2, 0, None), "--nnodes 2 needs --master-addr"),
        (Nodes(2, 0, "h", 70000), "--master-port 70000 is not a TCP port"),
        (Nodes(1, 0, "h", 0), "--master-port 0 is not a TCP port"),
        (Nodes(2, 0, " "), "--master-addr is empty"),
    ],
)
def test_bad_launch_options_are_one_line(nodes, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        nodes.check()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["train", "encode"])
@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2 is out of range"),
        (["--nnodes", "2"], "needs --master-addr"),
        (["--master-port", "99999"], "is not a TCP port"),
    ],
)
def test_cli_refuses_bad_launch_options_in_one_line(tmp_path, command, opts, needle):
    args = {"train": ["train", "--out", str(tmp_path / "run"), "--device", "cpu"],
            "encode": ["encode", str(make_tiny_checkpoint(tmp_path / "ckpt")), "sample", "--out", str(tmp_path / "s"),
                       "--device", "cpu"]}[command]  # fmt: skip
    result = CliRunner().invoke(app, [*args, *opts])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _two_nodes(args: list[str], env: dict[str, str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run ``tokkit ARGS`` as node 0 and node 1 of a 2-node run (one process each) at the same time."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tokkit", *args, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", str(port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


@pytest.mark.slow
def test_two_nodes_encode_equals_one_process(tmp_path):
    from tokkit.encode import encode_dataset

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    common = ["--shard-size", "8", "--batch-size", "4", "--workers", "0"]
    single = encode_dataset(ckpt, str(data), tmp_path / "single", shard_size=8, batch_size=4, workers=0, device="cpu")
    assert single.complete and single.shards == (5, 5)

    writes = tmp_path / "writes.txt"
    nodes = _two_nodes(["encode", str(ckpt), str(data), "--out", str(tmp_path / "multi"), *common, "--device", "cpu",
                        "--json"], _env(tmp_path, TOKKIT_TEST_WRITES=str(writes)))  # fmt: skip
    for rank, p in enumerate(nodes):
        assert p.returncode == 0, f"node {rank}: {p.stderr[-3000:]}"
    result = json.loads(nodes[0].stdout)  # global rank 0 prints; node 1 prints nothing on stdout
    assert nodes[1].stdout.strip() == ""
    assert result["complete"] and result["shards"] == [5, 5] and result["encoded"] == 24  # shards 0, 2, 4 of 8 images
    # every shard written once, by rank shard % 2
    lines = sorted(writes.read_text().split("\n")[:-1], key=lambda ln: int(ln.split()[1]))
    assert lines == [f"{s % 2} {s}" for s in range(5)]
    # the same shard files, byte for byte, and the same per-shard checksums in the manifest
    a, b = tmp_path / "single" / "shards", tmp_path / "multi" / "shards"
    names = sorted(p.name for p in a.iterdir() if not p.name.endswith(".done.json"))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.endswith(".done.json")) and len(names) == 15
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("single", "multi"))
    assert ma["shards"] == mb["shards"] and mb["complete"]
    ds = tokkit.open_shards(tmp_path / "multi")
    assert len(ds) == 40


@pytest.mark.slow
def test_two_nodes_train_two_steps(tmp_path):
    out, data = tmp_path / "run", tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    args = ["train", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--device", "cpu",
            "--perceptual", "none", "--quiet", *tiny_train_sets("train.log_every=1", "train.cpu_threads=1")]
    nodes = _two_nodes(args, _env(tmp_path))
    for rank, p in enumerate(nodes):
        assert p.returncode == 0, f"node {rank}: {p.stderr[-3000:]}"
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' not in ln]
    assert steps == [1, 2]  # one writer
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint", "train_state"))) == [
        "checkpoint", "train_state"]  # one checkpoint, no temporary or old copy left
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["extra"]["step"] == 2
    assert tokkit.load(out).config.resolution == 16
