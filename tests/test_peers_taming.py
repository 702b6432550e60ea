"""taming-transformers VQGAN -> tokkit: numeric equivalence with taming's own modules, and the real-size key map.

taming's ``Encoder`` / ``Decoder`` / ``VectorQuantizer`` come from the ``taming-transformers`` package (plain torch
modules); its ``VQModel`` (Lightning) is not imported: the test assembles the same pipeline and the same state-dict
key names (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*, quantize.embedding.weight).
"""

from __future__ import annotations

import pytest
import torch

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model", reason="needs taming-transformers")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize", reason="needs taming-transformers")

from tokkit.errors import CheckpointError  # noqa: E402
from tokkit.models.tokenizer import Tokenizer  # noqa: E402
from tokkit.peers import taming  # noqa: E402

SMALL = {"ch": 32, "out_ch": 3, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
         "in_channels": 3, "resolution": 32, "z_channels": 16, "double_z": False}  # fmt: skip


class TamingVQ(torch.nn.Module):
    """taming's ``VQModel`` minus Lightning and the loss: same submodule names, same encode / decode path."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.encoder = taming_model.Encoder(**ddconfig)
        self.decoder = taming_model.Decoder(**ddconfig)
        self.quantize = taming_quantize.VectorQuantizer(n_embed, embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        quant, _, (_, _, idx) = self.quantize(self.quant_conv(self.encoder(x)))
        b, _, h, w = quant.shape
        return quant, idx.view(b, h, w)

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, idx):
        b, h, w = idx.shape
        quant = self.quantize.get_codebook_entry(idx.reshape(-1), (b, h, w, self.quantize.e_dim))  # (B, E, h, w)
        return self.decode(quant)


def _small_peer(seed: int = 0, n_embed: int = 64, embed_dim: int = 8) -> tuple[TamingVQ, dict]:
    """A random taming VQGAN whose norms, attention and codebook are all far from their trivial init."""
    torch.manual_seed(seed)
    peer = TamingVQ(SMALL, n_embed, embed_dim).eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if ".norm" in name or "norm_out" in name:  # GroupNorm affine: random scale and shift
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif name != "quantize.embedding.weight":
                p.add_(torch.randn_like(p) * 0.02)  # on top of the default (fan-in scaled) init
        # codes drawn from the encoder's own outputs, so that many codes are used (taming inits them near 0)
        z = peer.quant_conv(peer.encoder(torch.rand(4, 3, 32, 32) * 2 - 1))  # (4, E, 8, 8)
        rows = z.permute(0, 2, 3, 1).reshape(-1, embed_dim)
        peer.quantize.embedding.weight.copy_(rows[torch.randperm(len(rows))[:n_embed]] + 0.01 * torch.randn(n_embed, 1))
        # outputs at image scale (within [-1, 1], as a trained tokenizer's), so that the absolute tolerance of the
        # equivalence checks means what it says for images: the last conv scaled (random weights give up to ~3.6)
        probe = peer.decode(peer.encode(torch.rand(4, 3, 32, 32) * 2 - 1)[0])
        scale = 1.0 / probe.abs().max()
        peer.decoder.conv_out.weight.mul_(scale)
        peer.decoder.conv_out.bias.mul_(scale)
    params = {"ddconfig": dict(SMALL), "n_embed": n_embed, "embed_dim": embed_dim, "lossconfig": {"target": "x"}}
    return peer, params


def _state(peer: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(peer.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # a VQModel .ckpt carries its loss too
    state["loss.logvar"] = torch.zeros(())
    return state


def test_converted_taming_vqgan_matches_taming_numerically():
    peer, params = _small_peer()
    state = _state(peer)
    assert taming.detect(state, params)
    config, converted, variant = taming.convert(state, params)
    assert variant == "f4-64"
    assert config.attn_levels == [1] and config.decoder_res_blocks == 2 and config.embed_dim == 8
    tok = Tokenizer(config)
    tok.load_state_dict(converted, strict=True)
    tok = tok.eval().to("cpu")

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        quant, ids_peer = peer.encode(x)
        rec_peer = peer.decode(quant)
        ids = tok.encode(x)
        rec, _ = tok(x)
        dec_peer = peer.decode_code(ids_peer)
    assert torch.equal(ids, ids_peer)
    assert len(ids.unique()) > 10  # the check covers many codes, not one
    assert (rec - rec_peer).abs().max().item() <= 1e-5
    assert (tok.decode(ids) - dec_peer.clamp(-1, 1)).abs().max().item() <= 1e-5
    assert rec_peer.std() > 0.05  # the reconstructions are not a constant


def test_converted_taming_vqgan_is_the_same_function_in_float64():
    """float32 differences above come from rounding alone (silu vs x * sigmoid(x), fused qkv, SDPA): in float64 the
    encoder and decoder agree to 1e-12."""
    peer, params = _small_peer(seed=3)
    config, converted, _ = taming.convert(_state(peer), params)
    tok = Tokenizer(config)
    tok.load_state_dict(converted, strict=True)
    tok, peer = tok.eval().double(), peer.double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z_peer = peer.quant_conv(peer.encoder(x))
        assert (tok.latents(x) - z_peer).abs().max().item() <= 1e-12
        codes = torch.randn_like(z_peer)
        assert (tok.decode_codes(codes) - peer.decode(codes)).abs().max().item() <= 1e-12


def test_convert_infers_the_architecture_without_the_yaml():
    peer, params = _small_peer(seed=1)
    config, converted, _ = taming.convert(_state(peer), {"resolution": 32})
    config_yaml, converted_yaml, _ = taming.convert(_state(peer), params)
    assert config == config_yaml
    assert converted.keys() == converted_yaml.keys()


def test_unexpected_and_inconsistent_state_dicts_are_refused_in_one_line():
    peer, params = _small_peer()
    state = _state(peer)
    state["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(32, 512)
    with pytest.raises(CheckpointError) as e:
        taming.convert(state, params)
    msg = str(e.value)
    assert "unexpected keys" in msg and "encoder.down.0.block.0.temb_proj.weight" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="ddconfig.ch_mult"):
        taming.convert(_state(peer), {**params, "ddconfig": {**SMALL, "ch_mult": [1, 2, 4]}})
    with pytest.raises(CheckpointError, match="n_embed"):
        taming.convert(_state(peer), {**params, "n_embed": 128})
    broken = _state(peer)
    del broken["decoder.up.0.block.1.conv2.weight"]
    with pytest.raises(CheckpointError, match="decoder.up.0.block.1.conv2.weight"):
        taming.convert(broken, params)
    assert not taming.detect({"encoder.conv_in.weight": torch.zeros(1)}, {})


F16 = {"ch": 128, "out_ch": 3, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
       "dropout": 0.0, "in_channels": 3, "resolution": 256, "z_channels": 256, "double_z": False}  # fmt: skip


@pytest.mark.parametrize("n_embed", [1024, 16384])
def test_real_size_f16_layout_maps_every_key(n_embed):
    """taming's ImageNet f16 VQGANs (vqgan_imagenet_f16_1024 / _16384 yaml), built on the meta device: shapes only."""
    with torch.device("meta"):
        peer = TamingVQ(F16, n_embed, 256)
    state = dict(peer.state_dict())
    params = {"ddconfig": dict(F16), "n_embed": n_embed, "embed_dim": 256}
    config, converted, variant = taming.convert(state, params)
    assert variant == f"f16-{n_embed}"
    assert config.attn_levels == [4] and config.token_grid == (16, 16) and config.decoder_res_blocks == 3
    with torch.device("meta"):
        tok = Tokenizer(config)
    expected = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    n_peer = sum(p.numel() for p in peer.parameters())
    n_tok = sum(p.numel() for p in tok.parameters())
    assert n_tok == n_peer  # every weight has one counterpart (the quantizer's buffers are not parameters)


def test_train_init_from_a_taming_ckpt_keeps_its_codebook(tmp_path):
    """`tokkit train --init-from last.ckpt` (a peer file, its yaml beside it) fine-tunes the converted model; with
    `--freeze quantizer` the codebook is the peer's, so its token ids keep their meaning."""
    import json

    import numpy as np
    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from tokkit.cli.app import app

    peer, params = _small_peer()
    ckpt = tmp_path / "peer" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": _state(peer), "epoch": 1}, ckpt)
    (tmp_path / "peer" / "last.yaml").write_text(yaml.safe_dump({"model": {"params": params}}))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", "--init-from", str(ckpt), "--freeze", "quantizer", "--data", str(tmp_path / "images.npy"),
        "--out", str(out), "--steps", "2", "--batch-size", "4", "--device", "cpu", "--quiet", "--perceptual", "none",
        "--set", "train.eval_images=4", "--set", "train.eval_every=0", "--set", "train.disc_weight=0",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    weights = load_file(str(out / "checkpoint" / "model.safetensors"))
    codebook = next(v for k, v in weights.items() if k.startswith("quantizer.") and v.shape == (64, 8))
    assert torch.equal(codebook, peer.quantize.embedding.weight.detach())  # the peer's codes, byte for byte
    encoder_key = "encoder.conv_in.weight"
    assert not torch.equal(weights[encoder_key], peer.encoder.conv_in.weight.detach())  # the rest was trained
    rec = json.loads((out / "run.json").read_text())
    assert rec["init_from"]["source"] == str(ckpt.resolve()) and rec["freeze"] == ["quantizer"]
