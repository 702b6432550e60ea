"""diffusers ``VQModel`` -> tokkit: random-weight aMUSEd-style (MaskGIT VQGAN) and MoVQ models from diffusers' own code
give the same indices and reconstructions once converted (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the equivalence check builds diffusers' own VQModel (pip install diffusers)")
from diffusers import VQModel  # noqa: E402

from tokkit.errors import CheckpointError  # noqa: E402
from tokkit.peers import convert_source  # noqa: E402

SMALL = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=8, num_vq_embeddings=64, vq_embed_dim=8,
    norm_num_groups=32, sample_size=32,
)  # fmt: skip
CASES = {
    # aMUSEd's VQ-GAN (MaskGIT): plain blocks, no mid attention, the pipeline decodes ids (lookup_from_codebook)
    "amused": dict(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True,
    ),
    # group norms with attention at the low-resolution level and in the middle (diffusers' defaults)
    "attn": dict(
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
    ),
    # Kandinsky's MoVQ: spatial norms conditioned on the codes, attention as Kandinsky 2.2's movq
    "movq": dict(
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), norm_type="spatial",
    ),
}


def make_vqmodel(kind: str, seed: int = 0) -> VQModel:
    """A small random VQModel with every weight perturbed (norm gains and biases off their 1 / 0 init)."""
    torch.manual_seed(seed)
    model = VQModel(**SMALL, **CASES[kind]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.decoder.conv_out.weight.mul_(0.25)  # outputs in an image's range, as a trained model's
    return model


def saved(kind: str, tmp_path: Path) -> tuple[VQModel, Path]:
    model = make_vqmodel(kind)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("kind", list(CASES))
def test_same_indices_and_reconstructions(kind: str, tmp_path: Path) -> None:
    model, folder = saved(kind, tmp_path)
    res = convert_source(folder, device="cpu")
    tok = res.tokenizer
    assert res.family.name == "diffusers"
    assert res.variant == ("movq" if kind == "movq" else "maskgit-vqgan") + "-f2-k64"
    assert tok.config.spatial_norm == (kind == "movq") and tok.config.quant_conv and tok.config.decoder_res_blocks == 2
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        h = model.encode(x).latents  # (B, E, h, w), before quantization
        _, _, (_, _, ref_ids) = model.quantize(h)
        ref_recon = model(x).sample  # encode -> quantize -> post_quant_conv -> decoder
        # the pipelines' decode of ids: codebook lookup, no second quantization (aMUSEd: lookup_from_codebook)
        if model.config.lookup_from_codebook:
            ref_decoded = model.decode(ref_ids.view(2, 16, 16), force_not_quantize=True, shape=(2, 16, 16, 8)).sample
        else:
            ref_codes = model.quantize.get_codebook_entry(ref_ids, (2, 16, 16, 8))  # (B, E, h, w)
            ref_decoded = model.decode(ref_codes, force_not_quantize=True).sample

        ids = tok.encode(x)  # (B, h, w)
        recon, _ = tok(x)
        decoded = tok.decode(ids)
    assert ids.shape == (2, 16, 16)
    assert torch.equal(ids.flatten(), ref_ids.flatten())
    assert (tok.latents(x) - h).abs().max().item() <= 1e-5
    assert (recon - ref_recon).abs().max().item() <= 1e-5
    assert (decoded - ref_decoded.clamp(-1, 1)).abs().max().item() <= 1e-5
    assert ref_recon.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_pipeline_subfolder_and_bin_weights(tmp_path: Path) -> None:
    """A pipeline repo keeps the VQModel in vqvae/ (aMUSEd) or movq/ (Kandinsky); .bin weights are read weights-only."""
    model = make_vqmodel("movq")
    root = tmp_path / "kandinsky-like"
    model.save_pretrained(root / "movq", safe_serialization=False)
    assert (root / "movq" / "diffusion_pytorch_model.bin").is_file()
    res = convert_source(root, device="cpu")
    assert res.variant.startswith("movq") and res.provenance["files"].keys() == {"diffusion_pytorch_model.bin",
                                                                                 "config.json"}  # fmt: skip
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (res.tokenizer(x)[0] - model(x).sample).abs().max().item() <= 1e-5


def test_unmappable_architectures_are_one_line_errors(tmp_path: Path) -> None:
    model, folder = saved("amused", tmp_path)
    cfg = (folder / "config.json").read_text()
    (folder / "config.json").write_text(cfg.replace('"act_fn": "silu"', '"act_fn": "gelu"'))
    with pytest.raises(CheckpointError, match="act_fn 'gelu' is not supported") as e:
        convert_source(folder)
    assert "\n" not in str(e.value)
    # a tensor the config does not account for is not silently dropped
    from safetensors.torch import load_file, save_file

    w = folder / "diffusion_pytorch_model.safetensors"
    (folder / "config.json").write_text(cfg)
    state = load_file(str(w))
    state["encoder.extra_layer.weight"] = torch.zeros(3)
    save_file(state, str(w))
    with pytest.raises(CheckpointError, match="no place in tokkit's model, e.g. encoder.extra_layer.weight"):
        convert_source(folder)


# the published configs (diffusers' scripts/convert_amused.py and the Kandinsky 2.2 MOVQ_CONFIG), built on the meta
# device: the full-size key map and shapes are checked without allocating a weight
REAL = {
    "amused": (
        dict(block_out_channels=(128, 256, 256, 512, 768), down_block_types=("DownEncoderBlock2D",) * 5,
             up_block_types=("UpDecoderBlock2D",) * 5, latent_channels=64, layers_per_block=2, norm_num_groups=32,
             num_vq_embeddings=8192, sample_size=32, mid_block_add_attention=False, lookup_from_codebook=True),
        "maskgit-vqgan-f16-k8192", (16, 16),
    ),
    "kandinsky-2.2-movq": (
        dict(latent_channels=4, num_vq_embeddings=16384, block_out_channels=(128, 256, 256, 512), vq_embed_dim=4,
             down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",), layers_per_block=2,
             up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, norm_type="spatial"),
        "movq-f8-k16384", (32, 32),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL))
def test_published_configs_map_key_for_key(name: str) -> None:
    from tokkit.models.tokenizer import Tokenizer
    from tokkit.peers import get_family

    cfg, variant, grid = REAL[name]
    with torch.device("meta"):
        model = VQModel(**cfg)
        config, state, got = get_family("diffusers").convert(model.state_dict(), dict(model.config))
        expected = Tokenizer(config).state_dict()
    assert got == variant and config.token_grid == grid and config.resolution == 256
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    peer_params = sum(p.numel() for p in model.parameters())
    folded = sum(v.numel() for k, v in model.state_dict().items() if ".norm_layer." in k)  # SpatialNorm affines
    ours = sum(v.numel() for k, v in expected.items() if not k.startswith(("quantizer.cluster", "quantizer.init")))
    assert ours + folded == peer_params  # the same weights, nothing added or lost
    print(f"{name}: {peer_params / 1e6:.1f}M params")
