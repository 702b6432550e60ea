"""Reconstruction metrics (rFID, LPIPS, PSNR, SSIM) and the offline, hash-checked resolution of their weights.

Pretrained weights are found, in this order:

1. the folder given as ``weights_dir`` (``--weights-dir``) or the environment variable ``TOKKIT_WEIGHTS_DIR``;
2. the libraries' own caches: torch hub's ``checkpoints/`` folder (``$TORCH_HOME/hub/checkpoints``) and, for the
   small LPIPS linear layers, the copy the ``lpips`` package ships;
3. the normal download into torch hub's cache (skipped when ``TOKKIT_OFFLINE=1``; offline it fails and is reported).

Every file is sha256-checked against the official hash before it is loaded. A folder may vouch for files of its own
(fine-tuned or test weights) with a ``weights.json`` manifest, ``{"<file name>": "<sha256>", ...}``: the files it
lists are checked against the manifest's hash instead, and are recorded as ``official: false`` in every result.
``make_placeholder_weights`` writes such files (right keys, random values) for offline tests and smoke runs.

Axis legend: B batch, H/W image height/width.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tokkit.checkpoint import sha256_file as checkpoint_sha256_file
from tokkit.errors import ConfigError, WeightsError
from tokkit.runtime import TORCH_MIN, check_torch_version  # noqa: F401  (re-exported: tokkit.metrics.check_torch_version)

MANIFEST = "weights.json"
_LPIPS_RAW = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1"


@dataclass(frozen=True)
class WeightsSpec:
    """One pretrained file tokkit knows: its official name, hash, size, source and purpose."""

    name: str
    filename: str
    sha256: str
    size: int
    url: str
    purpose: str


WEIGHTS: dict[str, WeightsSpec] = {
    s.name: s
    for s in [
        WeightsSpec(
            "inception",
            "weights-inception-2015-12-05-6726825d.pth",
            "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
            95_628_359,
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
            "InceptionV3 for rFID (torch-fidelity)",
        ),
        WeightsSpec(
            "alexnet",
            "alexnet-owt-7be5be79.pth",
            "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
            244_408_911,
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            "AlexNet backbone for LPIPS (torchvision)",
        ),
        WeightsSpec(
            "vgg16",
            "vgg16-397923af.pth",
            "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
            553_433_881,
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            "VGG16 backbone for LPIPS (torchvision)",
        ),
        WeightsSpec(
            "lpips-alex",
            "alex.pth",
            "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
            6_009,
            f"{_LPIPS_RAW}/alex.pth",
            "LPIPS v0.1 linear layers on AlexNet",
        ),
        WeightsSpec(
            "lpips-vgg",
            "vgg.pth",
            "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
            7_289,
            f"{_LPIPS_RAW}/vgg.pth",
            "LPIPS v0.1 linear layers on VGG16",
        ),
    ]
}

LPIPS_NETS = {"alex": ("alexnet", "lpips-alex"), "vgg": ("vgg16", "lpips-vgg")}


# ----------------------------------------------------------------------------------------------------------------------
# weights resolution


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (cached per path, size and modification time)."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return checkpoint_sha256_file(path)  # size and mtime only key the cache


def _spec(name: str) -> WeightsSpec:
    if name not in WEIGHTS:
        raise ConfigError(f"unknown weights {name!r}; choose one of: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def _weights_dir(weights_dir: str | Path | None) -> Path | None:
    d = weights_dir if weights_dir is not None else os.environ.get("TOKKIT_WEIGHTS_DIR") or None
    return Path(d).expanduser() if d is not None else None


def _manifest_hash(folder: Path, filename: str) -> str | None:
    """The sha256 a folder's ``weights.json`` vouches for ``filename``, if any."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{manifest} is not valid JSON ({e}): fix it or delete it") from None
    value = entries.get(filename) if isinstance(entries, dict) else None
    return str(value).lower() if value is not None else None


def _library_candidates(spec: WeightsSpec) -> list[Path]:
    """Where the libraries keep their own copy: torch hub's checkpoints, and the lpips package for its heads."""
    found = [Path(torch.hub.get_dir()) / "checkpoints" / spec.filename]
    if spec.name.startswith("lpips-"):
        import importlib.util

        pkg = importlib.util.find_spec("lpips")
        if pkg is not None and pkg.origin is not None:
            found.append(Path(pkg.origin).parent / "weights" / "v0.1" / spec.filename)
    return found


def _checked(spec: WeightsSpec, path: Path, expected: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"{path} has sha256 {actual[:12]}..., expected {expected[:12]}... ({spec.purpose}): "
            f"replace it with the file from {spec.url}"
        )
    return path


def resolve_weights(name: str, weights_dir: str | Path | None = None, *, download: bool | None = None) -> Path:
    """Find a pretrained file by name, sha256-checked; download it into torch hub's cache as a last resort.

    Args:
        name: one of ``WEIGHTS``: "inception", "alexnet", "vgg16", "lpips-alex", "lpips-vgg".
        weights_dir: folder searched first; defaults to ``$TOKKIT_WEIGHTS_DIR``. Its ``weights.json`` manifest, if
            any, may vouch for non-official files (see the module docstring).
        download: try the normal download when the file is nowhere local; default: unless ``TOKKIT_OFFLINE=1``.

    Returns:
        The path of a file whose sha256 matches.

    Raises:
        WeightsError: the file is missing and cannot be downloaded, or a file found fails its hash check.
    """
    spec = _spec(name)
    folder = _weights_dir(weights_dir)
    if folder is not None:
        vouched = _manifest_hash(folder, spec.filename)
        if (folder / spec.filename).is_file():
            return _checked(spec, folder / spec.filename, vouched or spec.sha256)
    for path in _library_candidates(spec):
        if path.is_file():
            return _checked(spec, path, spec.sha256)
    if download is None:
        download = os.environ.get("TOKKIT_OFFLINE", "").lower() not in ("1", "true", "yes")
    target = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    where = f"put it in --weights-dir / TOKKIT_WEIGHTS_DIR or {target.parent}"
    if download:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.sha256, progress=False)
            return _checked(spec, target, spec.sha256)
        except WeightsError:
            raise
        except Exception as e:  # offline, proxy, disk full ...: all mean "not available here"
            raise WeightsError(
                f"{spec.filename} ({spec.purpose}) not found and its download failed ({type(e).__name__}): {where}"
            ) from None
    raise WeightsError(f"{spec.filename} ({spec.purpose}) not found (offline): {where}")


def weights_record(name: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """What a result should say about a weights file: file name, sha256, and whether it is the official one."""
    path = resolve_weights(name, weights_dir)
    digest = sha256_file(path)
    return {"name": name, "file": path.name, "sha256": digest, "official": digest == WEIGHTS[name].sha256}


# ----------------------------------------------------------------------------------------------------------------------
# LPIPS


class LPIPSDistance(nn.Module):
    """LPIPS v0.1 distance: frozen, eval mode; ``forward(a, b)`` on float (B, 3, H, W) in [-1, 1] -> (B,)."""

    def __init__(self, model: nn.Module, net: str, weights: list[dict[str, Any]]) -> None:
        super().__init__()
        self.model = model
        self.net = net
        self.weights = weights
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSDistance:
        """Always stays in eval mode (no dropout, frozen statistics)."""
        return super().train(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """(B, 3, H, W), (B, 3, H, W) in [-1, 1] -> (B,) distances; gradients flow to the inputs."""
        return self.model(a, b).reshape(a.shape[0])  # (B, 1, 1, 1) -> (B,)


def _load_state(path: Path) -> dict[str, Tensor]:
    check_torch_version()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} cannot be read as a torch state dict ({type(e).__name__}): replace it") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} is not a state dict: replace it")
    return state


def load_lpips(
    net: str = "alex", weights_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The LPIPS distance with its ImageNet backbone and linear layers loaded from local, hash-checked files.

    Args:
        net: "alex" (default) or "vgg".
        weights_dir: folder with ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` (and optionally the lpips
            ``alex.pth`` / ``vgg.pth``); defaults to ``$TOKKIT_WEIGHTS_DIR``, then the library caches.
        device: where the module lives.

    Returns:
        An ``LPIPSDistance``: frozen, eval mode; float (B, 3, H, W) in [-1, 1] pairs -> (B,) distances.

    Raises:
        WeightsError: a file is missing offline, fails its hash check, or has the wrong keys.
    """
    if net not in LPIPS_NETS:
        raise ConfigError(f"unknown LPIPS net {net!r}; choose one of: {', '.join(LPIPS_NETS)}")
    backbone_name, lin_name = LPIPS_NETS[net]
    backbone_path = resolve_weights(backbone_name, weights_dir)
    lin_path = resolve_weights(lin_name, weights_dir)
    import lpips

    with warnings.catch_warnings():  # torchvision's deprecated `pretrained=` inside lpips
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    # torchvision's `features.{i}.{p}` -> lpips's `slice{s}.{i}.{p}` (the slices keep torchvision's module indices)
    slot = {idx: f"{sname}.{idx}" for sname, sl in model.net.named_children() for idx, _ in sl.named_children()}
    backbone = _load_state(backbone_path)
    feats = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
    target = model.net.state_dict()
    mapped = {f"{slot[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in feats.items() if k.split(".")[0] in slot}
    if set(mapped) != set(target) or any(mapped[k].shape != target[k].shape for k in target):
        raise WeightsError(
            f"{backbone_path} does not hold torchvision {backbone_name} weights (keys differ): replace it"
        )
    model.net.load_state_dict(mapped)
    lins = _load_state(lin_path)
    lin_target = {k: v for k, v in model.state_dict().items() if k.startswith("lin") and not k.startswith("lins.")}
    if set(lins) != set(lin_target) or any(lins[k].shape != lin_target[k].shape for k in lins):
        raise WeightsError(f"{lin_path} does not hold LPIPS {net} linear layers (keys differ): replace it")
    model.load_state_dict(lins, strict=False)  # lin0..4 (lins.* are the same modules)
    records = [weights_record(backbone_name, weights_dir), weights_record(lin_name, weights_dir)]
    return LPIPSDistance(model, net, records).to(device)


# ----------------------------------------------------------------------------------------------------------------------
# rFID


def frechet_distance(
    mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, eig1: tuple[Tensor, Tensor] | None = None
) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of the symmetric
    ``sigma1^(1/2) sigma2 sigma1^(1/2)`` (the same eigenvalues as ``sigma1 sigma2``). With ``sigma1 = V E V^T``
    restricted to its r nonzero eigenvalues, those are the eigenvalues of the r x r matrix
    ``E^(1/2) V^T sigma2 V E^(1/2)``: one symmetric eigendecomposition of ``sigma1`` (reusable through ``eig1``)
    and a small one. It equals torchmetrics' general ``eigvals(sigma1 @ sigma2)`` formula, but stays fast and stable
    when the covariances are rank-deficient (fewer images than features), where the general solver can take minutes
    on a 2048 x 2048 matrix.

    Args:
        mu1, sigma1, mu2, sigma2: means (F,) and covariances (F, F).
        eig1: ``torch.linalg.eigh(sigma1)`` if already known.
    """
    s1, s2 = sigma1.double(), sigma2.double()
    evals, evecs = eig1 if eig1 is not None else torch.linalg.eigh(s1)
    keep = evals > evals.max().clamp_min(0) * 1e-12  # the numerically nonzero part of sigma1 (r of F)
    half = evecs[:, keep] * evals[keep].sqrt()  # (F, r): V E^(1/2)
    inner = half.T @ s2 @ half  # (r, r), symmetric PSD
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1.double() - mu2.double()).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


@lru_cache(maxsize=1)
def _fid_class() -> type:
    from torchmetrics.image.fid import FrechetInceptionDistance

    class FID(FrechetInceptionDistance):
        """torchmetrics' FID with the running sums it keeps, a rank-deficiency-safe ``compute``, and the reference
        covariance's eigendecomposition reused while the reference statistics stay the same."""

        _eig_key: tuple | None = None
        _eig: tuple[Tensor, Tensor] | None = None

        def compute(self) -> Tensor:
            n_r, n_f = int(self.real_features_num_samples), int(self.fake_features_num_samples)
            if n_r < 2 or n_f < 2:
                raise ConfigError("rFID needs at least 2 real and 2 reconstructed images")
            stats = []
            for total, cov_sum, n in (
                (self.real_features_sum, self.real_features_cov_sum, n_r),
                (self.fake_features_sum, self.fake_features_cov_sum, n_f),
            ):
                mean = (total / n).unsqueeze(0)  # (1, F)
                stats += [mean.squeeze(0), (cov_sum - n * mean.T @ mean) / (n - 1)]  # (F,), (F, F)
            key = (n_r, float(self.real_features_sum.sum()), float(self.real_features_cov_sum.sum()))
            if key != self._eig_key:
                self._eig_key, self._eig = key, torch.linalg.eigh(stats[1])
            return torch.tensor(frechet_distance(*stats, eig1=self._eig), dtype=torch.float64)

    return FID


def load_fid(weights_dir: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """torchmetrics' ``FrechetInceptionDistance`` (2048 features, torch-fidelity's InceptionV3) from a local file.

    Inputs to ``update(images, real=...)`` are uint8 (B, 3, H, W); they are resized to 299 with torch-fidelity's
    TF1-compatible bilinear resize (``antialias=False``), the resize the original FID code uses. Features are
    accumulated as running sums, so memory does not grow with the number of images. ``compute`` uses
    ``frechet_distance``.

    Raises:
        WeightsError: the InceptionV3 file is missing offline or fails its hash check.
    """
    path = resolve_weights("inception", weights_dir)
    _load_state(path)  # proves the file is a plain tensor dict before torch-fidelity unpickles it
    fid = _fid_class()(feature=2048, normalize=False, feature_extractor_weights_path=str(path), antialias=False)
    fid.weights = [weights_record("inception", weights_dir)]
    return fid.to(device)


# ----------------------------------------------------------------------------------------------------------------------
# PSNR / SSIM


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ConfigError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, float (B, C, H, W) in [0, 1], data range 1 -> (B,); inf if equal."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B, C*H*W) -> (B,)
    return (10 * torch.log10(1.0 / mse)).float()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per image (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1), (B, C, H, W) in [0, 1] -> (B,).

    The mean over channels and the valid (unpadded) window positions, as Wang et al.'s reference code and
    scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``. (torchmetrics 1.9
    averages over a reflect-padded image instead, which moves small images' scores by ~1e-3.) Computed in float64.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < 11:
        raise ConfigError(f"SSIM needs images of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    c = x.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64, device=x.device) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    stack = torch.cat([x, y, x * x, y * y, x * y])  # (5B, C, H, W)
    stack = nn.functional.conv2d(stack, g.view(1, 1, 11, 1).expand(c, 1, 11, 1), groups=c)  # valid along H
    stack = nn.functional.conv2d(stack, g.view(1, 1, 1, 11).expand(c, 1, 1, 11), groups=c)  # (5B, C, H-10, W-10)
    mx, my, xx, yy, xy = stack.chunk(5)
    sxx, syy, sxy = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()  # (B, C, h, w) -> (B,)


# ----------------------------------------------------------------------------------------------------------------------
# placeholder weights for tests and offline smoke runs


def _inception_state(seed: int) -> dict[str, Tensor]:
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class StructureOnly(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the layers only, no weights
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        model = StructureOnly("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.manual_seed(seed)
    for m in model.modules():  # activations keep their scale through 40+ layers, so features are informative
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _torchvision_state(name: str, seed: int) -> dict[str, Tensor]:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.alexnet() if name == "alexnet" else torchvision.models.vgg16()
    return {k: v for k, v in model.state_dict().items() if k.startswith("features.")}  # all LPIPS reads


def _lpips_lin_state(net: str, seed: int) -> dict[str, Tensor]:
    import lpips

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    return {k: v.abs() for k, v in model.state_dict().items() if k.startswith("lin") and not k.startswith("lins.")}


def make_placeholder_weights(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a file with the right keys and random values under the official name, and vouch for it in
    ``folder/weights.json``.

    For tests and offline smoke runs only: metrics computed with it are meaningless, and every result records it as
    ``official: false``. The AlexNet / VGG16 files hold only the ``features.*`` layers (all LPIPS reads).

    Returns:
        The path written.
    """
    spec = _spec(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "inception":
        state = _inception_state(seed)
    elif name in ("alexnet", "vgg16"):
        state = _torchvision_state(name, seed)
    else:
        state = _lpips_lin_state(name.removeprefix("lpips-"), seed)
    path = folder / spec.filename
    torch.save(state, path)
    manifest = folder / MANIFEST
    entries = json.loads(manifest.read_text()) if manifest.is_file() else {}
    entries[spec.filename] = sha256_file(path)
    manifest.write_text(json.dumps(entries, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# reference statistics files (--ref-stats)

REF_STATS_FORMAT = "tokkit-ref-stats/1"
FID_FEATURES = 2048


@dataclass
class RefStats:
    """FID reference statistics: mean (F,) and covariance (F, F) of the Inception features, float64.

    Attributes:
        mu: feature mean (F,).
        sigma: feature covariance (F, F), the unbiased (n - 1) estimate.
        num_images: images they were computed from (None when a foreign file does not say).
        meta: what a tokkit-written file records (format, protocol, resolution, data fingerprint, weights ...);
            empty for a foreign file (pytorch-fid / torch-fidelity / ADM / MaskBit ``.npz``).
    """

    mu: Tensor
    sigma: Tensor
    num_images: int | None
    meta: dict[str, Any]

    def fid_state(self) -> dict[str, Tensor]:
        """The running sums torchmetrics' FID keeps for its real images, equivalent to (mu, sigma).

        With n images, ``sum = n mu`` and ``cov_sum = (n - 1) sigma + n mu mu^T``, which its ``compute`` turns back
        into exactly (mu, sigma); a foreign file's unknown n is taken as 2 (any n gives the same mu and sigma).
        """
        n = self.num_images if self.num_images and self.num_images >= 2 else 2
        mu = self.mu.double()
        return {
            "real_features_sum": mu * n,
            "real_features_cov_sum": self.sigma.double() * (n - 1) + n * torch.outer(mu, mu),
            "real_features_num_samples": torch.tensor(n, dtype=torch.long),
        }

    @staticmethod
    def from_fid_state(state: dict[str, Tensor], meta: dict[str, Any]) -> RefStats:
        """(mu, sigma) of torchmetrics' real-image running sums."""
        n = int(state["real_features_num_samples"])
        mu = state["real_features_sum"].double().cpu() / n
        sigma = (state["real_features_cov_sum"].double().cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return RefStats(mu, sigma, n, meta)


def read_ref_stats(path: str | Path) -> RefStats:
    """Read FID reference statistics from an ``.npz``: tokkit's own, or a foreign one with ``mu`` and ``sigma``.

    pytorch-fid (``--save-stats``), torch-fidelity's cache, ADM's reference batches
    (``VIRTUAL_imagenet256_labeled.npz``;
    their ``mu_s`` / ``sigma_s`` are the spatial sFID features and are not used) and MaskBit's
    ``train_imagenet256_stats.npz`` all store the 2048 pool3 features' ``mu`` (F,) and ``sigma`` (F, F).

    Raises:
        ConfigError: unreadable, not an npz, no ``mu`` / ``sigma``, wrong shapes or non-finite values (one line).
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                found = ", ".join(sorted(keys)) or "none"
                raise ConfigError(
                    f"--ref-stats {p} has no 'mu' and 'sigma' arrays (found: {found}): give an .npz of FID statistics "
                    "(pytorch-fid / ADM / MaskBit) or a path where tokkit may write one"
                )
            mu, sigma = np.asarray(z["mu"]), np.asarray(z["sigma"])
            meta = json.loads(str(z["meta"])) if "meta" in keys else {}
    except ConfigError:
        raise
    except Exception as e:  # zip / pickle / json errors: a corrupt or foreign file
        raise ConfigError(
            f"--ref-stats {p} cannot be read as an .npz ({type(e).__name__}): delete it to recompute, or give "
            "another file"
        ) from None
    if mu.shape != (FID_FEATURES,) or sigma.shape != (FID_FEATURES, FID_FEATURES):
        raise ConfigError(
            f"--ref-stats {p} holds mu {mu.shape} and sigma {sigma.shape}, expected ({FID_FEATURES},) and "
            f"({FID_FEATURES}, {FID_FEATURES}) (2048 Inception pool3 features): give statistics of those features"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"--ref-stats {p} holds non-finite values: delete it to recompute, or give another file")
    n = meta.get("num_images") if isinstance(meta, dict) else None
    return RefStats(
        torch.from_numpy(mu.astype(np.float64)),
        torch.from_numpy(sigma.astype(np.float64)),
        int(n) if isinstance(n, int) else None,
        meta if isinstance(meta, dict) else {},
    )


def write_ref_stats(path: str | Path, stats: RefStats) -> Path:
    """Write ``stats`` to ``path`` (.npz: ``mu``, ``sigma`` float64 and a JSON ``meta``) atomically.

    The file is also readable by pytorch-fid / ADM-style tools (they read ``mu`` and ``sigma``).

    Raises:
        OutputError: the file could not be written (one line).
    """
    from tokkit.checkpoint import atomic_path
    from tokkit.errors import OutputError

    p = Path(path)
    meta = {"format": REF_STATS_FORMAT, "num_images": stats.num_images, **stats.meta}
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                mu=stats.mu.double().cpu().numpy(),
                sigma=stats.sigma.double().cpu().numpy(),
                meta=np.array(json.dumps(meta, sort_keys=True)),
            )
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise OutputError(f"cannot write --ref-stats {p}: {reason}; choose another path") from None
    return p
