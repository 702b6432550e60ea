"""tokkit.bench: usage statistics against brute force, the protocol record, offline behaviour, outputs."""

from __future__ import annotations

import errno
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint

from tokkit import metrics as M
from tokkit.bench import GRID_IMAGES, TokenUsage, bench, subset_indices
from tokkit.errors import ConfigError, OutputError
from tokkit.progress import RecordingReporter


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TOKKIT_WEIGHTS_DIR", raising=False)


def _checkpoint(path: Path, quantizer: str, kwargs: dict) -> Path:
    return make_tiny_checkpoint(path, resolution=32, quantizer=quantizer, quantizer_kwargs=kwargs)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    return {
        "fsq": _checkpoint(d / "fsq" / "checkpoint", "fsq", {"levels": [4, 4, 4, 4]}),
        "lfq": _checkpoint(d / "lfq-run", "lfq", {"codebook_size": 16}),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 smooth 40x36 images (not square, not the tokenizer's size: resize + center crop happen)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(20, 3, 6, 6, generator=g), size=(40, 36), mode="bilinear")
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return path


@pytest.fixture(scope="module")
def wdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("weights")
    M.make_placeholder_weights("inception", d)
    M.make_placeholder_weights("alexnet", d)
    return d


# ---- usage statistics ------------------------------------------------------------------------------------------------


def _brute_entropy(counter: Counter) -> float:
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values())


def test_usage_matches_a_brute_force_count_lfq() -> None:
    from tokkit.quantizers import LFQ

    q = LFQ(dim=4, codebook_size=16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 12, (3, 4, 4), generator=g) for _ in range(3)]  # codes 12..15 never used
    batches.append(torch.full((2, 4, 4), 15))
    usage = TokenUsage(q)
    for b in batches:
        usage.update(b)
    out = usage.compute()
    flat = [int(v) for b in batches for v in b.flatten()]
    counter = Counter(flat)
    assert out["used"] == len(counter) == 13 and out["total"] == len(flat)
    assert out["usage"] == pytest.approx(13 / 16)
    assert out["entropy_bits"] == pytest.approx(_brute_entropy(counter))
    assert out["perplexity"] == pytest.approx(2 ** _brute_entropy(counter))
    ones = [sum((v >> (3 - k)) & 1 for v in flat) / len(flat) for k in range(4)]  # bit 0 = most significant
    assert out["bits"]["balance"] == pytest.approx(ones)
    assert out["bits"]["dead"] == []
    assert sorted(usage.codes.counts().tolist(), reverse=True) == sorted(counter.values(), reverse=True)


def test_dead_lfq_bit_is_reported() -> None:
    from tokkit.quantizers import LFQ

    usage = TokenUsage(LFQ(dim=3, codebook_size=8))
    usage.update(torch.tensor([0, 1, 2, 3, 1, 2]))  # the most significant bit is always 0
    assert usage.compute()["bits"]["dead"] == [0]


def test_usage_matches_a_brute_force_count_fsq() -> None:
    from tokkit.quantizers import FSQ

    levels = [3, 4, 5]
    q = FSQ(dim=3, levels=levels)
    idx = torch.randint(0, 60, (4, 5, 5), generator=torch.Generator().manual_seed(1))
    usage = TokenUsage(q)
    usage.update(idx)
    lv = usage.compute()["levels"]
    flat = [int(v) for v in idx.flatten()]
    for d, L in enumerate(levels):
        radix = math.prod(levels[:d])  # mixed radix, dimension 0 least significant
        digits = Counter((v // radix) % L for v in flat)
        assert lv["counts"][d] == [digits.get(k, 0) for k in range(L)]
        assert lv["used"][d] == len(digits)
        assert lv["entropy_bits"][d] == pytest.approx(_brute_entropy(digits))
    # the digits agree with the quantizer's own codes: level value = digit - L // 2, over half-width L // 2
    codes = q.indices_to_levels(idx.flatten())
    half = torch.tensor([L // 2 for L in levels])
    digits0 = torch.tensor([[(v // math.prod(levels[:d])) % L for d, L in enumerate(levels)] for v in flat])
    assert torch.allclose(codes, (digits0 - half).float() / half)


# ---- bench ---------------------------------------------------------------------------------------------------------


def test_bench_offline_without_weights_reports_them_unavailable(ckpts, images, tmp_path) -> None:
    rep = RecordingReporter()
    out = tmp_path / "out"
    result = bench(
        [ckpts["fsq"].parent, ckpts["lfq"]], images, out=out, num_images=12, batch_size=5, reporter=rep, device="cpu"
    )
    assert [r.name for r in result.results] == ["fsq", "lfq-run"]
    r = result.results[0]
    assert r.metrics["rfid"] is None and r.metrics["lpips"] is None
    assert "weights-inception-2015-12-05-6726825d.pth" in r.unavailable["rfid"]
    assert "alexnet-owt-7be5be79.pth" in r.unavailable["lpips"]
    assert all("\n" not in why for why in r.unavailable.values())
    assert len(rep.messages) == 2 and "--weights-dir" in rep.messages[0]
    for res in result.results:  # the other metrics still ran
        assert 0 < res.metrics["psnr"] < 60 and -1 <= res.metrics["ssim"] <= 1
        assert res.usage["total"] == 12 * 16 * 16
    # protocol, rates
    p = r.protocol
    assert p["num_images"] == 12 and p["resolution"] == 32 and "center crop" in p["preprocessing"]
    assert "uint8" in p["reconstruction"] and "same preprocessed" in p["reference"]
    assert r.tokenizer["tokens_per_image"] == 256 and r.tokenizer["bits_per_token"] == pytest.approx(8.0)
    assert r.tokenizer["bits_per_pixel"] == pytest.approx(8.0 * 256 / 32**2)
    assert result.environment["versions"]["torchmetrics"] and result.environment["device"] == "cpu"
    # outputs
    data = json.loads((out / "results.json").read_text())
    assert data["format"] == "tokkit-bench/1" and data["results"][1]["usage"]["bits"]["balance"]
    assert "weights-inception" in (out / "report.md").read_text()
    for name in ("fsq-recon.png", "fsq-levels.png", "lfq-run-recon.png", "lfq-run-bits.png", "code_frequency.png"):
        assert (out / name).stat().st_size > 1000
    assert rep.phases == [("bench fsq", 12), ("bench lfq-run", 12)]
    assert r.grid is not None and r.grid[0].shape[0] == GRID_IMAGES  # only a few images are kept


def test_bench_numbers_follow_the_protocol(ckpts, images) -> None:
    """PSNR / SSIM equal a by-hand run: center crop, decode(encode), rounded to uint8, per image, averaged."""
    from tokkit.checkpoint import load
    from tokkit.data import ImageDataset, open_source, to_float

    result = bench([ckpts["lfq"]], images, num_images=7, metrics=["psnr", "ssim"], batch_size=3, device="cpu")
    r = result.results[0]
    assert set(r.metrics) == {"psnr", "psnr_std", "ssim", "ssim_std"} and r.usage == {}
    ds = ImageDataset(open_source(images), 32)
    assert subset_indices(20, 7) == [0, 2, 5, 8, 11, 14, 17]
    x = torch.stack([ds[i]["image"] for i in subset_indices(20, 7)])  # (7, 3, 32, 32) uint8
    assert r.grid is not None and r.grid[0].shape == (7, 32, 32, 3)  # every image is kept: the exact check below
    assert np.array_equal(r.grid[0], x.permute(0, 2, 3, 1).numpy())
    # the metrics are the per-image means over exactly the uint8 reconstructions bench made (float64 sums)
    kept = torch.from_numpy(r.grid[1]).permute(0, 3, 1, 2)  # (7, 32, 32, 3) -> (7, 3, 32, 32) uint8
    a, b = x.float() / 255, kept.float() / 255
    assert r.metrics["psnr"] == pytest.approx(float(M.psnr(b, a).double().mean()), rel=1e-6)
    assert r.metrics["psnr_std"] == pytest.approx(float(M.psnr(b, a).double().std(correction=0)), rel=1e-4, abs=1e-6)
    assert r.metrics["ssim"] == pytest.approx(float(M.ssim(b, a).double().mean()), rel=1e-6)
    # and those reconstructions are decode(encode(x)) rounded to uint8: another batching (7 vs 3) or CPU may round
    # a few pixels the other way (float summation order), never by more than 1, which moves PSNR by << 0.05 dB
    model = load(ckpts["lfq"], device="cpu")
    with torch.no_grad():
        y = ((model.decode(model.encode(to_float(x))) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    diff = (kept.int() - y.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    assert r.metrics["psnr"] == pytest.approx(float(M.psnr(y.float() / 255, a).mean()), abs=0.05)


def test_bench_with_local_weights_runs_rfid_and_lpips(ckpts, images, wdir, tmp_path) -> None:
    result = bench(
        [ckpts["fsq"], ckpts["fsq"]],
        images,
        out=tmp_path,
        num_images=GRID_IMAGES + 2,
        batch_size=4,
        weights_dir=wdir,
        device="cpu",
    )
    first, second = result.results
    assert first.unavailable == {}
    assert first.metrics["rfid"] is not None and first.metrics["rfid"] > 0
    assert first.metrics["lpips"] is not None and first.metrics["lpips"] > 0
    # the second run reuses the reference statistics of the first: same checkpoint, same number
    assert second.metrics["rfid"] == pytest.approx(first.metrics["rfid"], rel=1e-6)
    assert second.name == "fsq-2"
    weights = {w["name"]: w for w in first.protocol["weights"]}
    assert set(weights) == {"inception", "alexnet", "lpips-alex"}
    assert weights["inception"]["sha256"] == M.sha256_file(wdir / "weights-inception-2015-12-05-6726825d.pth")
    assert weights["inception"]["official"] is False and weights["lpips-alex"]["official"] is True
    assert "not the official file" in (tmp_path / "report.md").read_text()


def test_bench_argument_errors(ckpts, images) -> None:
    with pytest.raises(ConfigError, match="unknown metrics"):
        bench([ckpts["fsq"]], images, metrics=["psnr", "fid"])
    with pytest.raises(ConfigError, match="num_images"):
        bench([ckpts["fsq"]], images, num_images=0)
    with pytest.raises(ConfigError, match="checkpoint"):
        bench([], images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_images": 0}, r"num_images \(--num-images\) must be an integer >= 1, got 0"),
        ({"num_images": 2.5}, "num_images"),
        ({"num_images": True}, "num_images"),
        ({"batch_size": 0}, r"batch_size \(--batch-size\) must be an integer >= 1, got 0"),
        ({"batch_size": "4"}, "batch_size"),
        ({"workers": -1}, r"workers \(--workers\) must be an integer >= 0, got -1"),
        ({"lpips_net": "squeeze"}, "unknown LPIPS net"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_bench_numbers_are_checked_before_any_work(ckpts, images, monkeypatch, kwargs, match) -> None:
    import tokkit.models.tokenizer

    def no_load(*a, **k):
        raise AssertionError("a checkpoint was loaded before the arguments were checked")

    monkeypatch.setattr(tokkit.models.tokenizer, "load", no_load)
    with pytest.raises(ConfigError, match=match) as e:
        bench([ckpts["fsq"]], images, **kwargs)
    assert "\n" not in str(e.value)


def test_metrics_may_be_one_comma_separated_string(ckpts, images) -> None:
    r = bench([ckpts["fsq"]], images, num_images=2, metrics="psnr, usage", device="cpu").results[0]
    assert set(r.metrics) == {"psnr", "psnr_std"} and r.usage["total"] == 2 * 16 * 16


# ---- the --out folder: checked up front, written atomically, results.json last ------------------------------------


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, where: str | Path, err: OSError) -> None:
    """Make ``os.<name>`` raise ``err`` for paths that contain ``where`` (every other call goes through)."""
    real = getattr(os, name)

    def fake(path, *args, **kwargs):
        target = args[0] if name == "replace" else path  # os.replace(src, dst): the destination decides
        if str(where) in str(target):
            raise err
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, name, fake)


def _no_checkpoint_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokkit.models.tokenizer

    def no_load(*a, **k):
        raise AssertionError("a checkpoint was loaded before --out was checked")

    monkeypatch.setattr(tokkit.models.tokenizer, "load", no_load)


def test_out_that_is_a_file_is_refused_up_front(ckpts, images, tmp_path, monkeypatch) -> None:
    out = tmp_path / "results"
    out.write_text("not a folder")
    _no_checkpoint_loads(monkeypatch)
    with pytest.raises(OutputError, match="is a file, not a folder: choose another --out") as e:
        bench([ckpts["fsq"]], images, out=out, device="cpu")
    assert "\n" not in str(e.value) and out.read_text() == "not a folder"
    with pytest.raises(OutputError, match="cannot create the --out folder"):  # a file in the way of a parent
        bench([ckpts["fsq"]], images, out=out / "sub", device="cpu")


@pytest.mark.parametrize(
    "err",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only file system")],
    ids=["read-only-folder", "read-only-filesystem"],
)
def test_unwritable_out_is_refused_up_front(ckpts, images, tmp_path, monkeypatch, err) -> None:
    out = tmp_path / "out"
    _fail_on(monkeypatch, "open", out, err)  # os.open of a new file in --out: what a read-only folder refuses
    _no_checkpoint_loads(monkeypatch)
    with pytest.raises(OutputError, match=f"is not writable \\({err.strerror}\\): choose another --out") as e:
        bench([ckpts["fsq"]], images, out=out, device="cpu")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def measured(ckpts, images):
    """One measured result (no files) that the output tests write again and again."""
    return bench([ckpts["fsq"], ckpts["lfq"]], images, num_images=4, metrics=["psnr", "usage"], device="cpu")


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp" in p.name or p.name.startswith(".tokkit-write-test"))


def test_outputs_written_atomically_results_json_last(measured, tmp_path, monkeypatch) -> None:
    from tokkit.report import write_outputs

    out = tmp_path / "out"
    order: list[str] = []
    real = os.replace

    def record(src, dst, *a, **k):
        order.append(Path(dst).name)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", record)
    write_outputs(measured, out)
    assert order[-1] == "results.json" and "report.md" in order and "fsq-levels.png" in order
    assert set(order) == {p.name for p in out.iterdir()}  # every file went through a rename
    assert _leftovers(out) == []
    assert json.loads((out / "results.json").read_text())["format"] == "tokkit-bench/1"


@pytest.mark.parametrize(
    ("where", "err"),
    [
        ("-levels.png", OSError(errno.ENOSPC, "No space left on device")),
        ("report.md", PermissionError(errno.EACCES, "Permission denied")),
        ("results.json", OSError(errno.EROFS, "Read-only file system")),
    ],
)
def test_a_failed_write_leaves_nothing_that_looks_complete(measured, tmp_path, monkeypatch, where, err) -> None:
    from tokkit.report import write_outputs

    out = tmp_path / "out"
    write_outputs(measured, out)  # an earlier, complete run in the same folder
    _fail_on(monkeypatch, "replace", where, err)
    with pytest.raises(OutputError, match=f"cannot write .*{where}: {err.strerror}; .*--out") as e:
        write_outputs(measured, out)
    assert "\n" not in str(e.value)
    assert not (out / "results.json").exists()  # the earlier results.json is gone: no complete-looking mix
    assert _leftovers(out) == []
    if err.errno == errno.ENOSPC:
        assert "free some space" in str(e.value)


def test_a_failed_write_at_the_end_of_bench_is_an_output_error(ckpts, images, tmp_path, monkeypatch) -> None:
    _fail_on(monkeypatch, "replace", "results.json", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OutputError, match="No space left on device; free some space"):
        bench([ckpts["fsq"]], images, out=tmp_path / "out", num_images=2, metrics=["psnr"], device="cpu")
    assert not (tmp_path / "out" / "results.json").exists() and _leftovers(tmp_path / "out") == []


@pytest.mark.cuda
def test_bench_on_cuda_runs_and_records_the_gpu(ckpts, images) -> None:
    """The GPU path (checked where CI has a GPU): same protocol, the device named, numbers close to the CPU's."""
    cpu = bench([ckpts["fsq"]], images, num_images=6, metrics=["psnr", "ssim", "usage"], device="cpu").results[0]
    res = bench([ckpts["fsq"]], images, num_images=6, metrics=["psnr", "ssim", "usage"], device="cuda")
    r = res.results[0]
    assert res.environment["device"].startswith("cuda")
    assert r.usage["total"] == cpu.usage["total"] and r.protocol["num_images"] == 6
    # TF32 convolutions may move a few tokens: loose bounds, the exact numbers are pinned on the CPU above
    assert r.metrics["psnr"] == pytest.approx(cpu.metrics["psnr"], abs=0.5)
    assert r.metrics["ssim"] == pytest.approx(cpu.metrics["ssim"], abs=0.05)


# ---- training images ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-step `tokkit train` run on a small folder: (run folder, its training data)."""
    from helpers import make_folder

    from tokkit.config import TokenizerConfig, TrainConfig
    from tokkit.train import train

    d = tmp_path_factory.mktemp("trained")
    data = make_folder(d / "data", n=10)
    tok = TokenizerConfig(resolution=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=4,
                          quantizer="fsq", quantizer_kwargs={"levels": [5, 5, 5]})  # fmt: skip
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=0, checkpoint_every=0, eval_images=2, perceptual="none",
                      cpu_threads=1)  # fmt: skip
    train(tok, cfg, data, d / "run", device="cpu")
    return d / "run", data


def test_bench_warns_when_measuring_the_training_images(trained_run, images, tmp_path) -> None:
    import shutil

    run, data = trained_run
    rep = RecordingReporter()
    result = bench([run, run / "checkpoint"], data, out=tmp_path / "out", metrics=["psnr"], reporter=rep, device="cpu")
    for r in result.results:  # the run folder and its checkpoint/ both find run.json
        assert len(r.warnings) == 1 and "trained on these images" in r.warnings[0] and "\n" not in r.warnings[0]
    line = result.results[0].warnings[0]
    assert line in rep.messages  # the CLI prints it as it happens
    assert f"> {line}" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]["warnings"] == [line]
    # the same images elsewhere (a moved copy keeps sizes and mtimes): recognized by the source fingerprint
    shutil.copytree(data, tmp_path / "moved")
    assert bench([run], tmp_path / "moved", metrics=["psnr"], device="cpu").results[0].warnings
    # other images: no warning
    assert bench([run], images, metrics=["psnr"], device="cpu").results[0].warnings == []


def test_bench_training_data_warning_reads_the_whole_data_history(ckpts, images, tmp_path) -> None:
    from tokkit.bench import training_data_warning
    from tokkit.data import open_source

    fp = open_source(images).fingerprint()
    run = tmp_path / "run"
    ckpt = run / "checkpoint"
    ckpt.mkdir(parents=True)
    rec = {"data": "/elsewhere/now", "data_fingerprint": "0" * 64, "data_history": [{"step": 0, "data": str(images)}]}
    (run / "run.json").write_text(json.dumps(rec))
    assert training_data_warning(ckpt, images, fp)  # trained on it before switching (data_history)
    rec["data_history"] = [{"step": 0, "data": "/old", "data_fingerprint": fp}]
    (run / "run.json").write_text(json.dumps(rec))
    assert training_data_warning(ckpt, images, fp)  # by fingerprint
    rec["data_history"] = []
    (run / "run.json").write_text(json.dumps(rec))
    assert training_data_warning(ckpt, images, fp) is None
    (run / "run.json").write_text("{not json")
    assert training_data_warning(ckpt, images, fp) is None  # unreadable: nothing to say, no error
    assert training_data_warning(ckpts["lfq"], images, fp) is None  # a checkpoint without a run
