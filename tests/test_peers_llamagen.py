"""LlamaGen VQ -> tokkit: numeric equivalence with LlamaGen's own model code, and the real-size key maps.

LlamaGen is not on the package index: its ``vq_model.py`` (MIT) is vendored unchanged in ``tests/peer_code``.
"""

from __future__ import annotations

import pytest
import torch
from peer_code import llamagen_vq as lg

from tokkit.errors import CheckpointError
from tokkit.models.tokenizer import Tokenizer
from tokkit.peers import llamagen


def _small_peer(seed: int = 0, codebook_size: int = 64) -> lg.VQModel:
    """LlamaGen's ``VQModel`` with a small encoder / decoder (ch 32, 3 levels, one res block) and random weights."""
    torch.manual_seed(seed)
    args = lg.ModelArgs(codebook_size=codebook_size, codebook_embed_dim=8, encoder_ch_mult=[1, 2, 2],
                        decoder_ch_mult=[1, 2, 2], z_channels=16)
    with torch.device("meta"):  # VQModel hard-codes ch=128, num_res_blocks=2: built for nothing, then replaced
        peer = lg.VQModel(args)
    peer.encoder = lg.Encoder(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16)
    peer.decoder = lg.Decoder(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16)
    peer.quantize = lg.VectorQuantizer(codebook_size, 8, 0.25, 0.0, True, True)
    peer.quant_conv, peer.post_quant_conv = torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 16, 1)
    peer.eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if ".norm" in name or "norm_out" in name:  # GroupNorm affine: random scale and shift
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif name != "quantize.embedding.weight":
                p.add_(torch.randn_like(p) * 0.02)
        # unit codes near the encoder's own (normalized) outputs, so many are used; stored unnormalized
        z = peer.quant_conv(peer.encoder(torch.rand(4, 3, 32, 32) * 2 - 1))  # (4, 8, 8, 8)
        rows = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
        pick = rows[torch.randperm(len(rows))[:codebook_size]] + 0.05 * torch.randn(codebook_size, 8)
        peer.quantize.embedding.weight.copy_(pick * (0.5 + torch.rand(codebook_size, 1)))
        # outputs at image scale (within [-1, 1], as a trained tokenizer's), so that the absolute tolerance of the
        # equivalence checks means what it says for images: the last conv scaled (random weights give up to ~3.6)
        probe = peer.decode(peer.encode(torch.rand(4, 3, 32, 32) * 2 - 1)[0])
        scale = 1.0 / probe.abs().max()
        peer.decoder.conv_out.weight.mul_(scale)
        peer.decoder.conv_out.bias.mul_(scale)
    return peer


def _converted(peer: torch.nn.Module, extra: dict | None = None) -> tuple[Tokenizer, str]:
    config, state, variant = llamagen.convert(dict(peer.state_dict()), extra or {"resolution": 32})
    tok = Tokenizer(config)
    tok.load_state_dict(state, strict=True)
    return tok.eval().to("cpu"), variant


def test_converted_llamagen_vq_matches_llamagen_numerically():
    peer = _small_peer()
    assert "quantize.codebook_used" in peer.state_dict()  # the usage buffer the converter drops
    assert llamagen.detect(peer.state_dict(), {})
    tok, variant = _converted(peer)
    assert variant == "vq_ds4"
    cfg = tok.config
    assert cfg.attn_levels == [2] and cfg.decoder_res_blocks == 2 and cfg.embed_dim == 8
    assert cfg.quantizer_kwargs["cosine"] is True

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        quant, _, (_, _, idx) = peer.encode(x)
        ids_peer = idx.view(4, 8, 8)
        rec_peer = peer.decode(quant)
        ids = tok.encode(x)
        rec, _ = tok(x)
        dec_peer = peer.decode_code(ids_peer.reshape(-1), shape=(4, 8, 8, 8))
    assert torch.equal(ids, ids_peer)
    assert len(ids.unique()) > 10
    assert (rec - rec_peer).abs().max().item() <= 1e-5
    assert (tok.decode(ids) - dec_peer.clamp(-1, 1)).abs().max().item() <= 1e-5
    assert rec_peer.std() > 0.05


def test_converted_llamagen_vq_is_the_same_function_in_float64():
    peer = _small_peer(seed=2)
    tok, _ = _converted(peer)
    tok, peer = tok.double(), peer.double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z_peer = peer.quant_conv(peer.encoder(x))
        assert (tok.latents(x) - z_peer).abs().max().item() <= 1e-12
        codes = torch.randn_like(z_peer)
        assert (tok.decode_codes(codes) - peer.decode(codes)).abs().max().item() <= 1e-12


def test_variant_hints_and_bad_state_dicts():
    peer = _small_peer()
    state = dict(peer.state_dict())
    assert llamagen.variant_name(16, {"source": "/ckpts/vq_ds16_t2i.pt"}) == "vq_ds16_t2i"
    assert llamagen.variant_name(8, {"variant": "vq_ds8_c2i"}) == "vq_ds8_c2i"
    assert llamagen.variant_name(8, {}) == "vq_ds8"
    with pytest.raises(CheckpointError, match="names ds16 but the weights are ds8"):
        llamagen.variant_name(8, {"variant": "vq_ds16_c2i"})
    extra = {**state, "discriminator.conv.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        llamagen.convert(extra, {"resolution": 32})
    assert "unexpected keys" in str(e.value) and "discriminator.conv.weight" in str(e.value)
    assert "\n" not in str(e.value)
    broken = dict(state)
    del broken["decoder.conv_blocks.0.attn.1.proj_out.bias"]
    with pytest.raises(CheckpointError, match="proj_out"):
        llamagen.convert(broken, {"resolution": 32})
    assert not llamagen.detect({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, {})


@pytest.mark.parametrize(("builder", "factor", "mult"), [("VQ_16", 16, [1, 1, 2, 2, 4]), ("VQ_8", 8, [1, 2, 2, 4])])
def test_real_size_layout_maps_every_key(builder, factor, mult):
    """The released vq_ds16 / vq_ds8 architectures (codebook 16384 x 8), built on the meta device: shapes only."""
    with torch.device("meta"):
        peer = getattr(lg, builder)(codebook_size=16384, codebook_embed_dim=8)
    config, converted, variant = llamagen.convert(dict(peer.state_dict()), {"variant": f"vq_ds{factor}_c2i"})
    assert variant == f"vq_ds{factor}_c2i"
    assert config.channel_mult == mult and config.attn_levels == [len(mult) - 1] and config.decoder_res_blocks == 3
    assert config.token_grid == (256 // factor, 256 // factor) and config.z_channels == 256 and config.embed_dim == 8
    with torch.device("meta"):
        tok = Tokenizer(config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert sum(p.numel() for p in tok.parameters()) == sum(p.numel() for p in peer.parameters())
