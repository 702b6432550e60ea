"""bench --protocol / --ref-stats / several checkpoints: the protocol record, reference statistics files, the
resolution override, the rate-distortion outputs with published numbers, and two torchrun ranks against one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint
from typer.testing import CliRunner

from tokkit import metrics as M
from tokkit.bench import bench, run_plan, to_uint8
from tokkit.errors import ConfigError
from tokkit.protocols import PROTOCOLS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TOKKIT_WEIGHTS_DIR", raising=False)


def _with_provenance(ckpt: Path, peer: str, variant: str) -> Path:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.setdefault("extra", {})["provenance"] = {
        "source": f"hf:example/{variant}.pt", "sha256": "0" * 64, "peer": peer, "variant": variant,
        "license": "MIT", "url": "https://example.org", "converted_by": "tokkit test",
    }  # fmt: skip
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    vq = make_tiny_checkpoint(d / "vq16", resolution=32, quantizer="vq", quantizer_kwargs={"codebook_size": 16})
    return {
        "vq": _with_provenance(vq, "llamagen", "vq_ds16_c2i"),
        "fsq": make_tiny_checkpoint(d / "fsq", resolution=32, quantizer="fsq", quantizer_kwargs={"levels": [4, 4]}),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(10, 3, 6, 6, generator=g), size=(44, 36), mode="bilinear")
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return path


@pytest.fixture(scope="module")
def wdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("weights")
    M.make_placeholder_weights("inception", d)
    M.make_placeholder_weights("alexnet", d)
    return d


@pytest.fixture(scope="module")
def written(ckpts, images, wdir, tmp_path_factory) -> tuple[Path, float]:
    """One rFID run that writes --ref-stats (maskbit protocol: truncation, bilinear resize)."""
    stats = tmp_path_factory.mktemp("stats") / "ref.npz"
    res = bench([ckpts["fsq"]], images, protocol="maskbit", ref_stats=stats, num_images=6, batch_size=4,
                metrics=["rfid"], weights_dir=wdir, device="cpu")  # fmt: skip
    r = res.results[0]
    assert r.protocol["ref_stats_written"] == str(stats)
    return stats, r.metrics["rfid"]


# ---- the protocol record -----------------------------------------------------------------------------------------


def test_to_uint8_round_and_truncate() -> None:
    x = torch.arange(256, dtype=torch.uint8).float().div(255).view(1, 1, 16, 16)  # ToTensor's k / 255
    assert torch.equal(to_uint8(x, "round").flatten(), torch.arange(256, dtype=torch.uint8))
    t = to_uint8(x, "truncate").flatten().int()
    assert torch.equal(t, (x * 255).to(torch.uint8).flatten().int())  # MaskBit / TiTok: (x * 255).to(uint8)
    assert int((torch.arange(256) - t).max()) <= 1
    assert to_uint8(torch.tensor([0.5 / 255, 1.7 / 255]).view(1, 1, 1, 2), "truncate").flatten().tolist() == [0, 1]


def test_protocol_is_recorded_in_full_and_its_resolution_wins(ckpts, images, tmp_path) -> None:
    res = bench([ckpts["fsq"]], images, out=tmp_path, protocol="llamagen", num_images=3, batch_size=3,
                metrics=["psnr"], device="cpu")  # fmt: skip
    r = res.results[0]
    assert res.environment["protocol"] == PROTOCOLS["llamagen"].to_dict()
    assert r.protocol["name"] == "llamagen" and r.protocol["resolution"] == 256
    assert r.tokenizer["resolution"] == 256 and r.tokenizer["tokenizer_resolution"] == 32
    assert r.tokenizer["token_grid"] == [128, 128]  # f2: the protocol's 256 px give 128x128 tokens
    assert r.grid is not None and r.grid[0].shape == (3, 256, 256, 3)
    assert r.tokenizer["bits_per_pixel"] == pytest.approx(4 / 4)  # 4 bits per token, one token per 2x2 pixels
    assert any("protocol llamagen measures at 256 px" in w for w in r.warnings)
    report = (tmp_path / "report.md").read_text()
    assert "## Protocol `llamagen`" in report and "ADM center_crop_arr" in report
    assert "the paper uses 50000" in report and "the protocol's resolution wins" in report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["environment"]["protocol"]["name"] == "llamagen"
    assert saved["environment"]["protocol"]["deviations"] == list(PROTOCOLS["llamagen"].deviations)


def test_a_resolution_the_tokenizer_cannot_take_is_refused_in_one_line(ckpts) -> None:
    import dataclasses

    odd = dataclasses.replace(PROTOCOLS["llamagen"], name="odd", resolution=33)
    cfg = json.loads((ckpts["fsq"] / "config.json").read_text())["tokenizer"]
    assert run_plan(cfg, PROTOCOLS["tokkit"])["note"] is None
    with pytest.raises(ConfigError, match="33 px is not a multiple") as e:
        run_plan(cfg, odd, ckpts["fsq"])
    assert "\n" not in str(e.value)


# ---- --ref-stats -------------------------------------------------------------------------------------------------


def test_ref_stats_are_written_with_their_record_and_read_back(written, ckpts, images, wdir, monkeypatch) -> None:
    stats, rfid = written
    ref = M.read_ref_stats(stats)
    assert ref.num_images == 6 and ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048)
    assert torch.allclose(ref.sigma, ref.sigma.T)
    assert ref.meta["format"] == M.REF_STATS_FORMAT and ref.meta["protocol"] == "maskbit"
    assert ref.meta["resolution"] == 256 and ref.meta["to_uint8"] == "truncate"
    assert ref.meta["inception_sha256"] == M.sha256_file(wdir / M.WEIGHTS["inception"].filename)
    # the second run reads the file: no real image goes through Inception, and the number is the same
    real_updates = []
    orig = M._fid_class().update

    def spy(self, imgs, real):
        real_updates.append(real)
        return orig(self, imgs, real)

    monkeypatch.setattr(M._fid_class(), "update", spy)
    res = bench([ckpts["fsq"]], images, protocol="maskbit", ref_stats=stats, num_images=6, batch_size=4,
                metrics=["rfid"], weights_dir=wdir, device="cpu")  # fmt: skip
    r = res.results[0]
    assert real_updates and not any(real_updates)
    assert r.metrics["rfid"] == pytest.approx(rfid, rel=1e-6)
    assert "statistics read from" in r.protocol["reference"] and r.protocol["reference_external"] is False


def test_ref_stats_of_another_run_are_refused(written, ckpts, images, wdir) -> None:
    stats, _ = written
    for kwargs, what in [({"num_images": 5}, "--num-images"), ({"protocol": "titok", "num_images": 6}, "--protocol")]:
        with pytest.raises(ConfigError, match=f"computed with another {what}") as e:
            bench([ckpts["fsq"]], images, ref_stats=stats, metrics=["rfid"], weights_dir=wdir, device="cpu",
                  **{"protocol": "maskbit", **kwargs})  # fmt: skip
        assert "\n" not in str(e.value) and "delete it to recompute" in str(e.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a zip at all", "cannot be read as an .npz"),
        ({"mu": np.zeros(64), "sigma": np.eye(64)}, r"expected \(2048,\)"),
        ({"mean": np.zeros(2048)}, "no 'mu' and 'sigma'"),
        ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, "non-finite"),
    ],
)
def test_bad_ref_stats_are_one_line(tmp_path, content, match) -> None:
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    with pytest.raises(ConfigError, match=match) as e:
        M.read_ref_stats(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_foreign_mu_sigma_file_is_an_external_reference(written, ckpts, images, wdir, tmp_path) -> None:
    """pytorch-fid / ADM / MaskBit files hold only mu and sigma (no count): the same statistics without tokkit's
    record give the same rFID, recorded as an external reference."""
    stats, rfid = written
    ref = M.read_ref_stats(stats)
    np.savez(tmp_path / "train_stats.npz", mu=ref.mu.numpy(), sigma=ref.sigma.numpy())
    res = bench([ckpts["fsq"]], images, protocol="maskbit", ref_stats=tmp_path / "train_stats.npz", num_images=6,
                batch_size=4, metrics=["rfid"], weights_dir=wdir, device="cpu")  # fmt: skip
    r = res.results[0]
    assert r.protocol["reference_external"] is True and "external FID statistics" in r.protocol["reference"]
    assert r.metrics["rfid"] == pytest.approx(rfid, rel=1e-6)


def test_an_external_reference_gets_no_published_number() -> None:
    from tokkit.bench_types import CheckpointResult
    from tokkit.report import comparable_published

    tok = {"resolution": 256, "provenance": {"peer": "llamagen", "variant": "vq_ds16_c2i"}}
    r = CheckpointResult("c", "c", tok, {}, {}, {}, {"name": "llamagen", "reference_external": False})
    assert [p.rfid for p in comparable_published(r)] == [2.19]
    r.protocol["reference_external"] = True
    assert comparable_published(r) == []
    r.protocol = {"name": "llamagen"}
    r.tokenizer = {**tok, "resolution": 384}  # another resolution: not the paper's row
    assert comparable_published(r) == []


def test_ref_stats_are_not_written_without_rfid(ckpts, images, tmp_path) -> None:
    res = bench([ckpts["fsq"]], images, ref_stats=tmp_path / "r.npz", num_images=2, metrics=["psnr"], device="cpu")
    assert not (tmp_path / "r.npz").exists()
    assert any("was not written" in w for w in res.results[0].warnings)


def test_ref_stats_need_one_resolution(ckpts, images, tmp_path) -> None:
    other = make_tiny_checkpoint(tmp_path / "c16", resolution=16)
    with pytest.raises(ConfigError, match="holds one resolution"):
        bench([ckpts["fsq"], other], images, ref_stats=tmp_path / "r.npz", metrics=["psnr"], device="cpu")


# ---- several checkpoints: rate-distortion and published numbers ---------------------------------------------------


def test_several_checkpoints_give_a_rate_distortion_plot_and_table(ckpts, images, tmp_path) -> None:
    res = bench([ckpts["vq"], ckpts["fsq"]], images, out=tmp_path, protocol="llamagen", num_images=2, batch_size=2,
                metrics=["psnr", "usage"], device="cpu")  # fmt: skip
    png = Path(res.files["rate_distortion"])
    assert png.name == "rate_distortion.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "## Rate-distortion" in report and "![rate_distortion](rate_distortion.png)" in report
    table = report.split("## Rate-distortion")[1].split("\n\n")[1].splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert rows["vq16"][2] == "2.19" and rows["fsq"][2] == "-"  # the peer's number, where the protocol is its own
    assert float(rows["vq16"][0]) == pytest.approx(res.results[0].tokenizer["bits_per_pixel"], abs=1e-4)
    from tokkit.report import summary_rows

    headers, srows = summary_rows(res)
    assert headers[-1] == "paper rFID" and srows[0][-1] == "2.19"
    assert res.results[0].tokenizer["provenance"]["variant"] == "vq_ds16_c2i"


def test_published_numbers_of_another_protocol_are_only_a_note(ckpts, images, tmp_path) -> None:
    from tokkit.report import notes, summary_rows

    res = bench([ckpts["vq"]], images, protocol="tokkit", num_images=2, metrics=["psnr"], device="cpu")
    headers, _ = summary_rows(res)
    assert "paper rFID" not in headers
    assert any("published rFID 2.19" in n and "not comparable" in n for n in notes(res))


# ---- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_protocol_and_ref_stats_options(ckpts, images, tmp_path) -> None:
    from tokkit.cli.app import app

    runner = CliRunner()
    bad = runner.invoke(app, ["bench", str(ckpts["fsq"]), "--data", str(images), "--protocol", "adm"])
    assert bad.exit_code == 2 and "unknown protocol 'adm'" in bad.output
    (tmp_path / "bad.npz").write_bytes(b"junk")
    res = runner.invoke(app, ["bench", str(ckpts["fsq"]), "--data", str(images), "--out", str(tmp_path / "o"),
                              "--ref-stats", str(tmp_path / "bad.npz"), "--device", "cpu", "--num-images", "2"])
    assert res.exit_code != 0 and "cannot be read as an .npz" in res.output
    assert "Traceback" not in res.output
    ok = runner.invoke(app, ["bench", str(ckpts["fsq"]), "--data", str(images), "--out", str(tmp_path / "p"),
                             "--protocol", "titok", "--metrics", "psnr", "--device", "cpu", "--num-images", "2",
                             "--quiet"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "p" / "results.json").read_text())["environment"]["protocol"]["name"] == "titok"


# ---- torchrun ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(ckpts, images, wdir, tmp_path) -> None:
    """2 gloo CPU ranks vs 1 process on the same images: PSNR/SSIM/LPIPS/rFID within 1e-5, code counts identical."""
    kwargs = dict(protocol="tokkit", num_images=9, batch_size=2, weights_dir=wdir, device="cpu")
    one = bench([ckpts["vq"], ckpts["fsq"]], images, out=tmp_path / "one", **kwargs)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tokkit", "bench", str(ckpts["vq"]), str(ckpts["fsq"]), "--data", str(images),
           "--out", str(tmp_path / "two"), "--protocol", "tokkit", "--num-images", "9", "--batch-size", "2",
           "--weights-dir", str(wdir), "--device", "cpu", "--nproc-per-node", "2", "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["environment"]["processes"] == 2
    for a, b in zip(one.results, two["results"], strict=True):
        assert b["protocol"]["processes"] == 2 and b["protocol"]["num_images"] == a.protocol["num_images"] == 9
        for key in ("psnr", "psnr_std", "ssim", "lpips", "rfid"):
            assert a.metrics[key] is not None
            assert b["metrics"][key] == pytest.approx(a.metrics[key], rel=1e-5), key
        assert {k: b["usage"][k] for k in ("used", "total")} == {k: a.usage[k] for k in ("used", "total")}
        assert b["usage"]["entropy_bits"] == pytest.approx(a.usage["entropy_bits"], rel=1e-12)
    assert (tmp_path / "two" / "rate_distortion.png").is_file()
    assert (tmp_path / "two" / "vq16-recon.png").is_file()


def test_a_converted_peer_checkpoint_carries_its_provenance_into_bench(images, tmp_path) -> None:
    """tokkit convert writes extra['provenance']; bench reads peer + variant from it (a random tiny taming VQGAN)."""
    taming_model = pytest.importorskip("taming.modules.diffusionmodules.model", reason="needs taming-transformers")
    from tokkit.peers import convert_source

    dd = {"ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
          "in_channels": 3, "resolution": 32, "z_channels": 8, "double_z": False}  # fmt: skip
    torch.manual_seed(0)
    parts = {
        "encoder": taming_model.Encoder(**dd), "decoder": taming_model.Decoder(**dd),
        "quant_conv": torch.nn.Conv2d(8, 8, 1), "post_quant_conv": torch.nn.Conv2d(8, 8, 1),
    }  # fmt: skip
    state = {f"{n}.{k}": v for n, m in parts.items() for k, v in m.state_dict().items()}
    state["quantize.embedding.weight"] = torch.randn(32, 8)
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    convert_source(tmp_path / "last.ckpt", tmp_path / "converted", resolution=32)
    res = bench([tmp_path / "converted"], images, num_images=2, metrics=["psnr"], device="cpu")
    prov = res.results[0].tokenizer["provenance"]
    assert prov["peer"] == "taming" and prov["variant"] == "f2-32" and prov["license"]
