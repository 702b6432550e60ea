"""Named evaluation protocols for ``tokkit bench --protocol NAME`` and the peers' published rFIDs.

A ``Protocol`` states everything that moves an rFID: the images (set, count), the resize + crop and its
interpolation, the resolution, how reconstructions (and inputs) become uint8, the FID reference and the Inception
network. Each peer protocol is read from the peer's own evaluation script (named in ``source``); where tokkit does
something the peer does not, ``deviations`` says so, and every result records the protocol in full.

The FID network is the same everywhere: torch-fidelity's ``inception-v3-compat`` with the 2015-12-05 TF Inception
weights (``weights-inception-2015-12-05-6726825d.pth``, the file pytorch-fid ships as
``pt_inception-2015-12-05-6726825d.pth`` and ADM's TF evaluator runs as ``classify_image_graph_def.pb``), 2048 pool3
features. PSNR / SSIM / LPIPS are tokkit's in every protocol (``tokkit.metrics``); only rFID follows the peer.

    from tokkit.protocols import get_protocol, published_rfid
    get_protocol("llamagen").resolution          # 256
    published_rfid("llamagen", "vq_ds16_c2i")    # [Published(... rfid=2.19 ...)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from tokkit.errors import ConfigError

INCEPTION = (
    "torch-fidelity inception-v3-compat, 2015-12-05 TF Inception weights (= pytorch-fid pt_inception-2015-12-05 = "
    "ADM's TF graph), 2048 pool3 features, TF1-compatible bilinear resize to 299"
)


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol, recorded in full in results.json and report.md.

    Attributes:
        name: what ``--protocol`` takes.
        description: one line.
        resolution: side in pixels the images are measured at; None = the tokenizer's own. When it differs from the
            tokenizer's, the protocol wins (fully convolutional tokenizers run at any multiple of their
            downsampling factor) and the report says so.
        resize: the resize + crop, a key of ``RESIZES``.
        dataset: the image set the paper measures on (tokkit measures whatever ``--data`` holds; the report notes it).
        num_images: images the paper uses (None = all); ``--num-images`` still wins, and the report notes it.
        to_uint8: how [0, 1] floats become uint8 before rFID: "round" (round(255 x)) or "truncate" ((255 x).to(uint8)
            in float32, as ``ToTensor`` images times 255 are floored by MaskBit / TiTok; applied to the inputs too).
        reference: "inputs" (the same preprocessed images) or "stats" (fixed statistics from ``--ref-stats``).
        inception: the FID network.
        source: the peer's evaluation code this protocol is read from.
        deviations: where tokkit's measurement differs from the peer's code, one line each.
    """

    name: str
    description: str
    resolution: int | None
    resize: str
    dataset: str
    num_images: int | None
    to_uint8: str
    reference: str
    inception: str
    source: str
    deviations: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = asdict(self)
        d["deviations"] = list(self.deviations)
        d["resize_description"] = RESIZE_DESCRIPTIONS[self.resize]
        return d


# ----------------------------------------------------------------------------------------------------------------------
# resizes: PIL RGB image -> uint8 (r, r, 3)


def _tokkit_resize(img: Image.Image, r: int) -> np.ndarray:
    from tokkit.data.transforms import center_crop_resize

    return center_crop_resize(img, r)


def _adm_center_crop(img: Image.Image, r: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` (guided-diffusion image_datasets.py; LlamaGen dataset/augmentation.py)."""
    while min(*img.size) >= 2 * r:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = r / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(img.convert("RGB"), dtype=np.uint8)
    y, x = (arr.shape[0] - r) // 2, (arr.shape[1] - r) // 2
    return np.ascontiguousarray(arr[y : y + r, x : x + r])


def _torchvision(interpolation: str) -> Callable[[Image.Image, int], np.ndarray]:
    def resize(img: Image.Image, r: int) -> np.ndarray:
        """torchvision ``Resize(r, interpolation, antialias=True)`` + ``CenterCrop(r)`` on a PIL image."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
        out = TF.center_crop(TF.resize(img.convert("RGB"), r, interpolation=mode, antialias=True), [r, r])
        return np.array(out, dtype=np.uint8)

    return resize


RESIZES: dict[str, Callable[[Image.Image, int], np.ndarray]] = {
    "tokkit": _tokkit_resize,
    "adm": _adm_center_crop,
    "torchvision-bilinear": _torchvision("bilinear"),
    "torchvision-bicubic": _torchvision("bicubic"),
}
RESIZE_DESCRIPTIONS = {
    "tokkit": "resize shorter side (PIL bicubic, antialiased) + center crop, as one box resize of the centered square",
    "adm": "ADM center_crop_arr: halve with PIL BOX while the shorter side >= 2r, PIL bicubic resize of the shorter "
    "side to r (sizes rounded), center crop r x r (offsets floored)",
    "torchvision-bilinear": "torchvision Resize(r, bilinear, antialias) of the shorter side + CenterCrop(r)",
    "torchvision-bicubic": "torchvision Resize(r, bicubic, antialias) of the shorter side + CenterCrop(r)",
}


# ----------------------------------------------------------------------------------------------------------------------
# the protocols

_OWN_METRICS = "PSNR/SSIM/LPIPS are tokkit's (tokkit.metrics), not the peer's implementation"

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            name="tokkit",
            description="tokkit's default: the tokenizer's resolution, reference = the same inputs",
            resolution=None,
            resize="tokkit",
            dataset="whatever --data holds",
            num_images=None,
            to_uint8="round",
            reference="inputs",
            inception=INCEPTION,
            source="tokkit.bench",
        ),
        Protocol(
            name="llamagen",
            description="LlamaGen (Sun et al. 2024): ImageNet val 50k at 256, ADM center crop, reference = same inputs",
            resolution=256,
            resize="adm",
            dataset="ImageNet-1k validation",
            num_images=50000,
            to_uint8="round",
            reference="inputs",
            inception=INCEPTION,
            source="github.com/FoundationVision/LlamaGen tokenizer/tokenizer_image/reconstruction_vq_ddp.py (recon "
            "npz), tokenizer/validation/val_ddp.py (reference npz), evaluations/c2i/evaluator.py (ADM TF FID)",
            deviations=(
                "LlamaGen writes uint8 as (127.5 x + 128).clamp(0, 255) truncated (round half up); tokkit rounds "
                "half to even: only exact .5 ties differ",
                "ADM's TF evaluator resizes to 299 inside the TF graph; tokkit uses torch-fidelity's TF1-compatible "
                "bilinear resize of the same network",
                _OWN_METRICS,
            ),
        ),
        Protocol(
            name="maskbit",
            description="MaskBit (Weber et al. 2024): ImageNet val 50k at 256, bilinear resize + center crop, "
            "uint8 by truncation, reference = same inputs",
            resolution=256,
            resize="torchvision-bilinear",
            dataset="ImageNet-1k validation",
            num_images=50000,
            to_uint8="truncate",
            reference="inputs",
            inception=INCEPTION,
            source="github.com/markweberdev/maskbit scripts/eval_tokenizer.py + evaluator/evaluator.py "
            "(TokenizerEvaluator: real and reconstructed val images, (x * 255).to(uint8)); data/webdataset_reader.py "
            "eval_transform (Resize + CenterCrop, interpolation 'bilinear' in configs/tokenizer/*.yaml)",
            deviations=(
                "MaskBit's metrics/stats/train_imagenet256_stats.npz (ImageNet train statistics) is the reference of "
                "its generation FID (evaluator.Evaluator, eval_maskbit.py), not of its rFID; pass it with --ref-stats "
                "to measure against it (the report then records the external reference)",
                _OWN_METRICS,
            ),
        ),
        Protocol(
            name="open-magvit2",
            description="Open-MAGVIT2 (Luo et al. 2024): ImageNet val 50k at the tokenizer's resolution (256 or "
            "128), bilinear resize + center crop, reference = same inputs",
            resolution=None,
            resize="torchvision-bilinear",
            dataset="ImageNet-1k validation",
            num_images=50000,
            to_uint8="round",
            reference="inputs",
            inception=INCEPTION,
            source="github.com/TencentARC/SEED-Voken evaluation_image.py (pytorch-fid InceptionV3, np.cov of val "
            "inputs vs reconstructions); src/Open_MAGVIT2/data/base.py ImagePaths (T.Resize(size) + CenterCrop)",
            deviations=(
                "Open-MAGVIT2 feeds float [0, 1] images (no uint8 rounding) to pytorch-fid's InceptionV3, which "
                "resizes with F.interpolate(bilinear, align_corners=False) and scales 2x - 1; tokkit feeds rounded "
                "uint8 to torch-fidelity's TF1-compatible resize and (x - 128) / 128 (same weights)",
                _OWN_METRICS,
            ),
        ),
        Protocol(
            name="titok",
            description="TiTok (Yu et al. 2024, 1d-tokenizer): ImageNet val 50k at 256, bicubic resize + center "
            "crop, uint8 by truncation, reference = same inputs",
            resolution=256,
            resize="torchvision-bicubic",
            dataset="ImageNet-1k validation",
            num_images=50000,
            to_uint8="truncate",
            reference="inputs",
            inception=INCEPTION,
            source="github.com/bytedance/1d-tokenizer evaluator/evaluator.py (VQGANEvaluator, (x * 255).to(uint8) "
            "of real and reconstructed images), data/webdataset_reader.py eval_transform (Resize(crop_size, bicubic, "
            "antialias) + CenterCrop), utils/train_utils.py eval_reconstruction (clamp to [0, 1])",
            deviations=(_OWN_METRICS,),
        ),
    ]
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; a one-line ``ConfigError`` naming the choices otherwise."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# ----------------------------------------------------------------------------------------------------------------------
# published numbers


@dataclass(frozen=True)
class Published:
    """An rFID a peer published for one of its checkpoints.

    Attributes:
        peer: the converter family that writes ``extra["provenance"]["peer"]`` ("taming", "llamagen", "diffusers",
            "open-magvit2", "maskbit"), or the paper's name where tokkit has no converter ("titok").
        variant: the checkpoint, as the converter's ``variant`` (matched case-insensitively with ``-``/``_``/``.``
            ignored, also as a suffix: "vq_ds16_c2i" matches "llamagen-vq_ds16_c2i").
        rfid: the published number.
        resolution: image side it was measured at.
        protocol: the tokkit protocol that reproduces the measurement, or None when none does (the paper's own
            pipeline): such a number is shown as not comparable.
        where: where it is published.
    """

    peer: str
    variant: str
    rfid: float
    resolution: int
    protocol: str | None
    where: str


PUBLISHED: tuple[Published, ...] = (
    # taming: variant "f{factor}-{n_embed}" (tokkit.peers.taming)
    Published("taming", "f16-1024", 7.94, 256, None, "taming-transformers README (reconstruction FID, ImageNet val)"),
    Published("taming", "f16-16384", 4.98, 256, None, "taming-transformers README (reconstruction FID, ImageNet val)"),
    Published("taming", "f16-1024", 7.96, 256, "maskbit",
              "MaskBit README, Taming-VQGAN (10 bits) re-measured with eval_tokenizer.py"),
    # LlamaGen: "vq_ds16_c2i" / "vq_ds8_c2i" when the source file names it (tokkit.peers.llamagen)
    Published("llamagen", "vq_ds16_c2i", 2.19, 256, "llamagen", "LlamaGen README / paper Table 2 (16x16 tokens)"),
    Published("llamagen", "vq_ds8_c2i", 0.59, 256, "llamagen", "LlamaGen README (32x32 tokens)"),
    # MaskGIT's ImageNet VQGAN (1024 codes, f16) as a diffusers VQModel ("maskgit-vqgan-f16-k1024") or MaskBit's port
    Published("diffusers", "maskgit-vqgan-f16-k1024", 2.28, 256, None, "MaskGIT paper (its own TF pipeline)"),
    Published("diffusers", "maskgit-vqgan-f16-k1024", 1.96, 256, "maskbit",
              "MaskBit README, MaskGIT-Tokenizer (10 bits) re-measured with eval_tokenizer.py"),
    Published("maskbit", "maskgit_tokenizer", 2.28, 256, None, "MaskGIT paper (its own TF pipeline)"),
    Published("maskbit", "maskgit_tokenizer", 1.96, 256, "maskbit", "MaskBit README, MaskGIT-Tokenizer (10 bits)"),
    # Open-MAGVIT2: tokkit.peers.open_magvit2 variants
    Published("open-magvit2", "imagenet_256_L", 1.17, 256, "open-magvit2", "Open-MAGVIT2 docs, IN256_Large"),
    Published("open-magvit2", "imagenet_128_L", 1.18, 128, "open-magvit2", "Open-MAGVIT2 docs, IN128_Large"),
    Published("open-magvit2", "pretrain_256_262144", 1.67, 256, "open-magvit2",
              "Open-MAGVIT2 docs, Pretrain_256_262144, rFID(In1k)"),
    Published("open-magvit2", "pretrain_256_16384", 2.55, 256, "open-magvit2",
              "Open-MAGVIT2 docs, Pretrain_256_16384, rFID(In1k)"),
    # MaskBit: tokkit.peers.maskbit variants
    Published("maskbit", "maskbit_tokenizer_10bit", 1.76, 256, "maskbit", "MaskBit README"),
    Published("maskbit", "maskbit_tokenizer_12bit", 1.52, 256, "maskbit", "MaskBit README"),
    Published("maskbit", "maskbit_tokenizer_14bit", 1.37, 256, "maskbit", "MaskBit README"),
    Published("maskbit", "maskbit_tokenizer_16bit", 1.29, 256, "maskbit", "MaskBit README"),
    Published("maskbit", "maskbit_tokenizer_18bit", 1.16, 256, "maskbit", "MaskBit README (17 bits live)"),
    Published("maskbit", "vqgan_plus_10bit", 1.67, 256, "maskbit", "MaskBit README, VQGAN+ (10 bits, from the paper)"),
    Published("maskbit", "vqgan_plus_12bit", 1.39, 256, "maskbit", "MaskBit README, VQGAN+ (12 bits)"),
    # IBQ (SEED-Voken, evaluated with Open-MAGVIT2's evaluation_image.py): tokkit.peers.ibq variants
    Published("ibq", "imagenet_256_1024", 2.24, 256, "open-magvit2", "IBQ README / paper (1024 codes)"),
    Published("ibq", "imagenet_256_8192", 1.87, 256, "open-magvit2", "IBQ README / paper (8192 codes)"),
    Published("ibq", "imagenet_256_16384", 1.37, 256, "open-magvit2", "IBQ README / paper (16384 codes)"),
    Published("ibq", "imagenet_256_262144", 1.00, 256, "open-magvit2", "IBQ README / paper (262144 codes)"),
    # TiTok (no tokkit converter: 1D tokenizers): listed for the titok protocol's reference rows
    Published("titok", "tokenizer_titok_l32_imagenet", 2.21, 256, "titok", "TiTok README"),
    Published("titok", "tokenizer_titok_b64_imagenet", 1.70, 256, "titok", "TiTok README"),
    Published("titok", "tokenizer_titok_s128_imagenet", 1.71, 256, "titok", "TiTok README"),
)  # fmt: skip


def _norm(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


def find_published(peer: str | None, variant: str | None, resolution: int | None = None) -> list[Published]:
    """The published rFIDs of a checkpoint (every protocol), by the peer and variant its provenance records."""
    if not peer or not variant:
        return []
    v = _norm(variant)
    return [
        p
        for p in PUBLISHED
        if _norm(p.peer) == _norm(peer)
        and (v == _norm(p.variant) or v.endswith(_norm(p.variant)))
        and (resolution is None or p.resolution == resolution)
    ]


def published_for(provenance: dict[str, Any] | None, resolution: int | None = None) -> list[Published]:
    """The published rFIDs of a converted checkpoint, from its ``extra["provenance"]``.

    The source file's name is tried before the converter's ``variant``: checkpoints with the same shapes get the
    same inferred variant (Open-MAGVIT2's ``pretrain256_262144.ckpt`` and ``imagenet_256_L.ckpt``), while the file
    name tells them apart. A variant the user named (``tokkit convert --variant``, ``variant_given``) comes first.
    """
    if not provenance:
        return []
    peer = provenance.get("peer")
    source = str(provenance.get("source") or "")
    stem = source.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    keys = (stem, provenance.get("variant"))
    if provenance.get("variant_given"):  # named by the user (tokkit convert --variant): that wins over the file name
        keys = keys[::-1]
    for key in keys:
        found = find_published(peer, key, resolution) if key else []
        if found or (key and find_published(peer, key)):
            return found
    return []


def published_rfid(protocol: str, variant: str, peer: str | None = None, resolution: int | None = None) -> list[
    Published
]:
    """The published rFIDs measured under ``protocol`` for ``variant`` (any peer unless given)."""
    peers = {p.peer for p in PUBLISHED} if peer is None else {peer}
    return [p for name in sorted(peers) for p in find_published(name, variant, resolution) if p.protocol == protocol]


__all__ = [
    "INCEPTION",
    "PROTOCOLS",
    "PUBLISHED",
    "RESIZES",
    "Protocol",
    "Published",
    "find_published",
    "published_for",
    "get_protocol",
    "published_rfid",
]
