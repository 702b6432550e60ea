"""tokkit.protocols: the registry, each resize against the peer's own transform, the published-numbers lookup."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from tokkit.errors import ConfigError
from tokkit.protocols import PROTOCOLS, PUBLISHED, RESIZES, find_published, get_protocol, published_rfid


def _photo(w: int = 600, h: int = 410, seed: int = 0) -> Image.Image:
    """A smooth random image larger than 2x the target (ADM's halving loop runs)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BILINEAR)


def test_the_registry_is_complete_and_frozen() -> None:
    assert list(PROTOCOLS) == ["tokkit", "llamagen", "maskbit", "open-magvit2", "titok"]
    for name, p in PROTOCOLS.items():
        assert p.name == name and p.resize in RESIZES and p.to_uint8 in ("round", "truncate")
        assert p.reference == "inputs" and "2015-12-05" in p.inception
        d = p.to_dict()
        json.dumps(d)  # recordable as it is
        assert d["resize_description"] and isinstance(d["deviations"], list)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROTOCOLS["llamagen"].resolution = 128  # type: ignore[misc]
    assert get_protocol("llamagen").resolution == 256 and get_protocol("tokkit").resolution is None
    assert get_protocol("maskbit").to_uint8 == "truncate" and get_protocol("titok").resize == "torchvision-bicubic"


def test_unknown_protocol_is_one_line() -> None:
    with pytest.raises(ConfigError, match="choose one of: tokkit, llamagen") as e:
        get_protocol("adm")
    assert "\n" not in str(e.value)


def test_the_cli_lists_the_same_protocols() -> None:
    from tokkit.cli import bench as cli_bench

    assert tuple(PROTOCOLS) == cli_bench.PROTOCOLS


def _adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion image_datasets.py center_crop_arr (also LlamaGen dataset/augmentation.py), verbatim logic."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("size", [(600, 410), (410, 600), (97, 131)])
def test_llamagen_resize_is_adms_center_crop(size: tuple[int, int]) -> None:
    img = _photo(*size)
    got = RESIZES["adm"](img, 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.array_equal(got, _adm_center_crop_arr(img, 64))
    if min(size) >= 128:  # the BOX halving makes it differ from tokkit's one-step bicubic
        assert not np.array_equal(got, RESIZES["tokkit"](img, 64))


@pytest.mark.parametrize(("name", "mode"), [("torchvision-bilinear", "BILINEAR"), ("torchvision-bicubic", "BICUBIC")])
def test_torchvision_resizes_equal_the_peers_eval_transform(name: str, mode: str) -> None:
    from torchvision import transforms

    interp = getattr(transforms.InterpolationMode, mode)
    peer = transforms.Compose([transforms.Resize(48, interpolation=interp, antialias=True), transforms.CenterCrop(48)])
    img = _photo(300, 205, seed=1)
    assert np.array_equal(RESIZES[name](img, 48), np.array(peer(img)))


def test_published_numbers_are_found_by_provenance() -> None:
    [p] = published_rfid("llamagen", "vq_ds16_c2i")
    assert (p.peer, p.rfid, p.resolution) == ("llamagen", 2.19, 256)
    assert find_published("llamagen", "vq-ds8-c2i")[0].rfid == 0.59  # separators ignored
    assert {p.rfid for p in find_published("taming", "taming-f16-1024")} == {7.94, 7.96}  # as a suffix
    assert [p.rfid for p in published_rfid("maskbit", "f16-1024")] == [7.96]
    assert find_published("taming", "f8-16384") == [] and find_published("diffusers", "maskgit-vqgan-f16-k8192") == []
    assert find_published("open-magvit2", "imagenet_256_L", resolution=128) == []
    assert find_published(None, "vq_ds16_c2i") == [] and find_published("llamagen", "") == []
    maskbit = {p.variant: p.rfid for p in PUBLISHED if p.peer == "maskbit" and p.variant.startswith("maskbit_")}
    assert maskbit == {f"maskbit_tokenizer_{b}bit": v for b, v in zip([10, 12, 14, 16, 18], [1.76, 1.52, 1.37, 1.29,
                                                                                               1.16], strict=True)}
    assert all(p.protocol is None or p.protocol in PROTOCOLS for p in PUBLISHED)


def test_published_variants_are_the_converters_names() -> None:
    """The variant names the converters write find their published rows (a renamed variant would lose its paper)."""
    import importlib

    names = {
        "tokkit.peers.open_magvit2": lambda m: [v for v, _ in m.VARIANTS.values()],
        "tokkit.peers.llamagen": lambda m: [m.variant_name(16, {"source": "vq_ds16_c2i.pt"}),
                                            m.variant_name(8, {"source": "x/vq_ds8_c2i.pt"})],
        "tokkit.peers.ibq": lambda m: list(m.VARIANTS.values()),
    }  # fmt: skip
    for module, variants in names.items():
        mod = importlib.import_module(module)
        for v in variants(mod):
            assert find_published(mod.NAME, v), (module, v)


def test_the_source_file_name_tells_same_shaped_checkpoints_apart() -> None:
    from tokkit.protocols import published_for

    base = {"peer": "open-magvit2", "variant": "imagenet_256_L"}  # both files convert to this inferred variant
    repo = "hf:TencentARC/Open-MAGVIT2-Tokenizer-262144-Pretrain"
    pre = published_for({**base, "source": f"{repo}/pretrain256_262144.ckpt"})
    assert [p.rfid for p in pre] == [1.67]
    main = published_for({**base, "source": "hf:TencentARC/Open-MAGVIT2-Tokenizer-256-resolution/imagenet_256_L.ckpt"})
    assert [p.rfid for p in main] == [1.17]
    assert [p.rfid for p in published_for({**base, "source": "/data/last.ckpt"})] == [1.17]  # no name: the variant
    assert published_for({**base, "source": "imagenet_256_L.ckpt"}, resolution=128) == []
    assert published_for(None) == [] and published_for({}) == []
    # a variant named with `tokkit convert --variant` wins over the file's name
    named = {**base, "variant": "pretrain_256_262144", "variant_given": True, "source": "imagenet_256_L.ckpt"}
    assert [p.rfid for p in published_for(named)] == [1.67]
