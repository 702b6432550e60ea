"""tokkit.metrics: hash-checked offline weights, LPIPS and rFID from local files, PSNR / SSIM golden values."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokkit import metrics as M
from tokkit.errors import ConfigError, TokkitError, WeightsError


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No download, an empty torch hub cache, no ambient TOKKIT_WEIGHTS_DIR."""
    monkeypatch.setenv("TOKKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TOKKIT_WEIGHTS_DIR", raising=False)


@pytest.fixture(scope="module")
def wdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Placeholder InceptionV3 + AlexNet + VGG16 files (right keys, random values), vouched for in weights.json."""
    d = tmp_path_factory.mktemp("weights")
    for name in ("inception", "alexnet", "vgg16"):
        M.make_placeholder_weights(name, d)
    return d


@pytest.fixture(scope="module")
def fid(wdir: Path):
    """One InceptionV3 for the module (it is slow on a CPU)."""
    return M.load_fid(wdir)


def _images(n: int, side: int, seed: int) -> torch.Tensor:
    """Smooth-ish uint8 images (B, 3, side, side): blurred noise, so that added noise changes the features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side // 4, side // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


# ---- weights resolution ----------------------------------------------------------------------------------------------


def test_missing_weights_offline_is_one_line_naming_file_and_place(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as e:
        M.resolve_weights("inception", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "--weights-dir" in msg and "offline" in msg
    with pytest.raises(WeightsError, match="alexnet-owt-7be5be79.pth"):
        M.resolve_weights("alexnet")


def test_unknown_weights_name() -> None:
    with pytest.raises(ConfigError, match="inception"):
        M.resolve_weights("resnet")


def test_lpips_heads_come_from_the_lpips_package_with_the_official_hash() -> None:
    path = M.resolve_weights("lpips-alex")
    assert path.name == "alex.pth" and M.sha256_file(path) == M.WEIGHTS["lpips-alex"].sha256
    assert M.weights_record("lpips-vgg")["official"] is True


def test_shared_assets_lpips_heads_match_official_hashes(shared_assets: Path) -> None:
    folder = shared_assets / "lpips" / "weights" / "v0.1"
    assert M.resolve_weights("lpips-alex", folder) == folder / "alex.pth"
    assert M.resolve_weights("lpips-vgg", folder) == folder / "vgg.pth"


def test_weights_dir_from_environment(monkeypatch: pytest.MonkeyPatch, wdir: Path) -> None:
    monkeypatch.setenv("TOKKIT_WEIGHTS_DIR", str(wdir))
    assert M.resolve_weights("alexnet") == wdir / "alexnet-owt-7be5be79.pth"


def test_file_with_a_wrong_hash_is_refused(tmp_path: Path) -> None:
    # an official name without a manifest entry must carry the official hash
    (tmp_path / "alex.pth").write_bytes(b"not the lpips file")
    with pytest.raises(WeightsError, match="sha256") as e:
        M.resolve_weights("lpips-alex", tmp_path)
    assert "\n" not in str(e.value)


def test_corrupt_vouched_file_is_refused_by_its_hash(tmp_path: Path, wdir: Path) -> None:
    d = tmp_path / "w"
    d.mkdir()
    shutil.copy(wdir / "alexnet-owt-7be5be79.pth", d)
    shutil.copy(wdir / M.MANIFEST, d)
    assert M.resolve_weights("alexnet", d) == d / "alexnet-owt-7be5be79.pth"
    with open(d / "alexnet-owt-7be5be79.pth", "r+b") as f:  # flip one byte in the middle
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="alexnet-owt-7be5be79.pth has sha256"):
        M.resolve_weights("alexnet", d)
    with pytest.raises(WeightsError, match="sha256"):
        M.load_lpips("alex", d)


def test_manifest_vouches_for_a_non_official_file(tmp_path: Path) -> None:
    path = M.make_placeholder_weights("lpips-alex", tmp_path)
    manifest = json.loads((tmp_path / M.MANIFEST).read_text())
    assert manifest == {"alex.pth": M.sha256_file(path)}
    assert M.resolve_weights("lpips-alex", tmp_path) == path
    rec = M.weights_record("lpips-alex", tmp_path)
    assert rec["official"] is False and rec["sha256"] == manifest["alex.pth"]


def test_bad_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "alex.pth").write_bytes(b"x")
    (tmp_path / M.MANIFEST).write_text("{not json")
    with pytest.raises(WeightsError, match="weights.json"):
        M.resolve_weights("lpips-alex", tmp_path)


# ---- LPIPS ---------------------------------------------------------------------------------------------------------


def test_lpips_end_to_end_from_local_files(wdir: Path) -> None:
    lp = M.load_lpips("alex", wdir)
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    x = _images(3, 32, 0).float() / 127.5 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.allclose(lp(x, x), torch.zeros(3), atol=1e-6)
    d = lp(x, y)
    assert d.shape == (3,) and bool((d > 0).all())
    # the backbone weights really come from the file: its first conv equals the file's features.0
    state = torch.load(wdir / "alexnet-owt-7be5be79.pth", weights_only=True)
    assert torch.equal(lp.model.net.slice1[0].weight, state["features.0.weight"])
    # usable as a training loss: gradients reach the input, eval mode survives .train()
    y.requires_grad_(True)
    lp.train()
    lp(x, y).sum().backward()
    assert not lp.training and y.grad is not None and y.grad.abs().sum() > 0
    names = [w["name"] for w in lp.weights]
    assert names == ["alexnet", "lpips-alex"] and lp.weights[0]["official"] is False


def test_lpips_vgg(wdir: Path) -> None:
    lp = M.load_lpips("vgg", wdir)
    x = _images(2, 16, 1).float() / 127.5 - 1
    assert lp(x, x.flip(-1)).shape == (2,)
    assert lp.weights[1]["name"] == "lpips-vgg" and lp.weights[1]["official"] is True


def test_lpips_missing_backbone_offline(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="alexnet-owt-7be5be79.pth"):
        M.load_lpips("alex", tmp_path)
    with pytest.raises(ConfigError, match="alex"):
        M.load_lpips("squeeze")


def test_lpips_file_with_wrong_keys_is_refused(tmp_path: Path) -> None:
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "alexnet-owt-7be5be79.pth")
    (tmp_path / M.MANIFEST).write_text(
        json.dumps({"alexnet-owt-7be5be79.pth": M.sha256_file(tmp_path / "alexnet-owt-7be5be79.pth")})
    )
    with pytest.raises(WeightsError, match="keys differ"):
        M.load_lpips("alex", tmp_path)


# ---- rFID ----------------------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(fid) -> None:
    x = _images(6, 32, 2)
    fid.reset()
    fid.update(x, real=True)
    fid.reset_real_features = False  # keep the reference features across the noise levels
    values = []
    try:
        for sigma in (0.0, 12.0, 40.0):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * sigma
            fid.reset()
            fid.update((x.float() + noise).round().clamp(0, 255).to(torch.uint8), real=False)
            values.append(float(fid.compute()))
    finally:
        fid.reset_real_features = True
    assert abs(values[0]) < 1e-3
    assert values[0] < values[1] < values[2]
    assert fid.weights[0]["file"] == "weights-inception-2015-12-05-6726825d.pth"


def test_frechet_distance_matches_the_general_formula() -> None:
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    for n in (100, 6):  # full-rank and rank-deficient (fewer samples than the 16 features) covariances
        a = torch.randn(n, 16, generator=g, dtype=torch.float64)
        b = torch.randn(n, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
        args = (a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
        assert M.frechet_distance(*args) == pytest.approx(float(_compute_fid(*args)), rel=1e-6)
        assert M.frechet_distance(args[0], args[1], args[0], args[1]) == pytest.approx(0.0, abs=1e-9)


def test_fid_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights-inception"):
        M.load_fid(tmp_path)


# ---- PSNR / SSIM ---------------------------------------------------------------------------------------------------


def test_psnr_hand_computed() -> None:
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.1)
    b[1, :, :4] = 0.0  # half the pixels off by 0.1: mse 0.005
    assert torch.allclose(M.psnr(a, b), torch.tensor([20.0, 10 * math.log10(1 / 0.005)]), atol=1e-5)
    assert torch.isinf(M.psnr(a, a)).all()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 5, 7, generator=g), torch.rand(4, 3, 5, 7, generator=g)
    ref = [10 * np.log10(1 / np.mean((x[i].double().numpy() - y[i].double().numpy()) ** 2)) for i in range(4)]
    assert np.allclose(M.psnr(x, y).numpy(), ref, atol=1e-4)


def _ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.: 11x11 Gaussian (sigma 1.5) window over every valid position, mean over channels."""
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(k, k) / k.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    out = []
    for ch in range(x.shape[0]):
        vals = []
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                p, q = x[ch, i : i + 11, j : j + 11], y[ch, i : i + 11, j : j + 11]
                mp, mq = (w * p).sum(), (w * q).sum()
                vp, vq, cov = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2, (w * p * q).sum() - mp * mq
                vals.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
        out.append(np.mean(vals))
    return float(np.mean(out))


def test_ssim_matches_hand_computation_and_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 16, 14, generator=g)
    b = (a + 0.15 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    got = M.ssim(a, b).numpy()
    for i in range(2):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        assert got[i] == pytest.approx(_ssim_by_hand(x, y), abs=1e-5)
        sk = structural_similarity(
            x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0
        )
        assert got[i] == pytest.approx(sk, abs=1e-5)
    assert torch.allclose(M.ssim(a, a), torch.ones(2))


def test_ssim_psnr_input_checks() -> None:
    with pytest.raises(ConfigError, match="11x11"):
        M.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="shape"):
        M.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


# ---- torch floor -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.4.0", "2.5.1", "2.9.1", "2.9.1+cu128", "1.13.1"])
def test_torch_with_unsafe_weights_only_load_is_refused(version: str) -> None:
    with pytest.raises(TokkitError, match=rf"torch {re.escape(version)} is too old.*CVE-2025-32434.*torch>=2\.10") as e:
        M.check_torch_version(version)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("version", ["2.10.0", "2.10.0a0+git1234", "2.14.1+cu130", "3.0.0", str(torch.__version__)])
def test_safe_torch_versions_pass(version: str) -> None:
    M.check_torch_version(version)


def test_weights_are_not_unpickled_by_an_old_torch(wdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran under a torch that is too old")

    monkeypatch.setattr(torch, "__version__", "2.5.1")
    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(TokkitError, match="too old"):
        M.load_lpips("alex", wdir)
    with pytest.raises(TokkitError, match="too old"):
        M.load_fid(wdir)
