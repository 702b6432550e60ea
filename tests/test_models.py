"""Encoder / Decoder / Tokenizer shapes, options and the encode/decode contract."""

from __future__ import annotations

import pytest
import torch

from tokkit.config import TokenizerConfig
from tokkit.errors import ConfigError
from tokkit.models import Decoder, Encoder, Tokenizer
from tokkit.quantizers import list_quantizers

TINY = {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1}
QUANTIZERS = {
    "fsq": {"z_channels": 4, "quantizer_kwargs": {"levels": [5, 5, 5]}},
    "vq": {"z_channels": 8, "quantizer_kwargs": {"codebook_size": 64}},
    "lfq": {"z_channels": 6, "quantizer_kwargs": {"codebook_size": 64}},
}


def tiny_config(quantizer: str = "fsq", **kw) -> TokenizerConfig:
    return TokenizerConfig(**{**TINY, "quantizer": quantizer, **QUANTIZERS[quantizer], **kw})


def _registered(name: str) -> bool:
    try:
        Tokenizer(tiny_config(name))
    except (NotImplementedError, TypeError, ConfigError, AttributeError):
        return False
    return name in list_quantizers()


@pytest.mark.parametrize("factor_levels", [3, 4, 5])  # f4, f8, f16
def test_encoder_decoder_shapes(factor_levels):
    mult = [1] * factor_levels
    f = 2 ** (factor_levels - 1)
    enc = Encoder(base_channels=8, channel_mult=mult, num_res_blocks=1, attention=True, z_channels=5)
    dec = Decoder(base_channels=8, channel_mult=mult, num_res_blocks=1, attention=True, z_channels=5, spatial_norm=True)
    x = torch.randn(2, 3, 32, 32)
    z = enc(x)
    assert z.shape == (2, 5, 32 // f, 32 // f)
    assert dec(z).shape == x.shape


def test_spatial_norm_uses_the_codes():
    dec = Decoder(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=4, spatial_norm=True)
    names = [n for n, _ in dec.named_modules() if n.endswith("norm.scale")]
    assert names, "spatial norm should add scale convs"


@pytest.mark.parametrize("name", ["fsq", "vq", "lfq"])
def test_tokenizer_contract(name):
    if not _registered(name):
        pytest.skip(f"quantizer {name!r} not available yet")
    torch.manual_seed(0)
    tok = Tokenizer(tiny_config(name, attention=True)).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = tok.encode(x)
    assert ids.dtype == torch.int64
    assert tuple(ids.shape[1:]) == tok.index_shape == (8, 8)
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.codebook_size
    out = tok.decode(ids)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        rec, q = tok(x)
    torch.testing.assert_close(out, rec.clamp(-1, 1), atol=1e-5, rtol=0)
    assert tok.token_grid == (8, 8) and tok.resolution == 16
    assert tok.bits_per_token > 0 and tok.index_dtype.itemsize >= 1


def test_forward_backward_reaches_encoder():
    tok = Tokenizer(tiny_config("fsq")).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, q = tok(x)
    ((rec - x).abs().mean() + q.loss).backward()
    assert tok.encoder.conv_in.weight.grad is not None
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


def test_bad_inputs_are_config_errors():
    tok = Tokenizer(tiny_config("fsq")).eval()
    with pytest.raises(ConfigError, match="to_float"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="expected images"):
        tok.encode(torch.zeros(1, 16, 16))
    with pytest.raises(ConfigError):
        Tokenizer(tiny_config("fsq", quantizer_kwargs={"levels": [5, 5], "dim": 3}))
    with pytest.raises(ConfigError, match="unknown quantizer"):
        Tokenizer(TokenizerConfig(**{**TINY, **QUANTIZERS["fsq"], "quantizer": "nope"}))


def test_from_config_accepts_dict():
    cfg = tiny_config("fsq")
    tok = Tokenizer.from_config(cfg.to_dict())
    assert tok.config == cfg


# ---- generalized autoencoder: attention levels, decoder blocks, quant_conv, embed_dim, arch dispatch ---------------


def test_attention_follows_each_res_block_at_attn_levels():
    from tokkit.models.layers import AttnBlock, Downsample, ResBlock, Upsample

    enc = Encoder(base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=2, attn_levels=[1], z_channels=4)
    dec = Decoder(base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=3, attn_levels=[1], z_channels=4)
    kinds = lambda blocks: [type(b) for b in blocks]  # noqa: E731
    assert kinds(enc.levels[0]) == [ResBlock, ResBlock, Downsample]
    assert kinds(enc.levels[1]) == [ResBlock, AttnBlock, ResBlock, AttnBlock, Downsample]
    assert kinds(enc.levels[2]) == [ResBlock, ResBlock]
    # decoder.levels[k] is level n-1-k: level 1 is k = 1; 3 res blocks per level, upsample last but at full resolution
    assert kinds(dec.levels[0]) == [ResBlock] * 3 + [Upsample]
    assert kinds(dec.levels[1]) == [ResBlock, AttnBlock] * 3 + [Upsample]
    assert kinds(dec.levels[2]) == [ResBlock] * 3
    # the documented key layout (autoencoder.py's docstring)
    keys = set(enc.state_dict()) | {f"decoder.{k}" for k in dec.state_dict()}
    assert {"levels.1.1.qkv.weight", "levels.1.3.proj.bias", "levels.1.4.conv.weight", "levels.0.2.conv.weight"} <= keys
    assert {"decoder.levels.1.5.qkv.weight", "decoder.levels.1.6.conv.weight"} <= keys
    assert "decoder.levels.0.0.norm1.norm.weight" in keys
    x = torch.randn(2, 3, 16, 16)
    assert dec(enc(x)).shape == x.shape


def test_old_config_keeps_its_state_dict_keys():
    """A config.json written before the new fields loads with the same modules (no quant_conv, same level layout)."""
    old = {**TINY, **QUANTIZERS["vq"], "quantizer": "vq", "attention": True}
    tok = Tokenizer(TokenizerConfig.from_dict(old))
    keys = list(tok.state_dict())
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in keys)
    assert tok.quant_conv is None and tok.post_quant_conv is None
    assert "encoder.levels.0.1.conv.weight" in keys and "decoder.levels.0.1.conv.weight" in keys  # R=1, then resample
    assert "encoder.mid.1.qkv.weight" in keys and "decoder.mid.2.conv2.weight" in keys
    assert TokenizerConfig.from_dict(old).to_dict()["arch"] == "vqgan"


def test_quant_conv_embed_dim_and_spatial_norm_condition():
    torch.manual_seed(0)
    cfg = tiny_config("vq", z_channels=8, quant_conv=True, embed_dim=3, spatial_norm=True, decoder_res_blocks=2,
                      attn_levels=[1], attention=True, quantizer_kwargs={"codebook_size": 32, "cosine": True})
    tok = Tokenizer(cfg).eval()
    assert tok.quant_conv.weight.shape == (3, 8, 1, 1) and tok.post_quant_conv.weight.shape == (8, 3, 1, 1)
    assert tok.quantizer.dim == 3
    # every spatial norm reads the 3-channel codes, not the 8-channel decoder input
    scales = [m for n, m in tok.decoder.named_modules() if n.endswith("norm.scale")]
    assert scales and all(m.in_channels == 3 for m in scales)
    for m in scales:  # make the condition matter (the init is a plain GroupNorm)
        torch.nn.init.normal_(m.weight, std=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = tok.encode(x)
    codes = tok.quantizer.indices_to_codes(ids)  # (B, 3, h, w)
    manual = tok.decoder(tok.post_quant_conv(codes), codes).clamp(-1, 1)
    torch.testing.assert_close(tok.decode(ids), manual)
    with pytest.raises(RuntimeError):  # the 8-channel decoder input is not a valid condition
        tok.decoder(tok.post_quant_conv(codes))
    recon, q = tok(x)
    torch.testing.assert_close(recon.clamp(-1, 1), tok.decode(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.indices, ids)


def test_fold_norm_affine_matches_an_affine_group_norm():
    from tokkit.models.layers import SpatialNorm, fold_norm_affine

    torch.manual_seed(0)
    c, cz = 32, 5
    gn = torch.nn.GroupNorm(32, c, eps=1e-6, affine=True)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    conv_y, conv_b = torch.nn.Conv2d(cz, c, 1), torch.nn.Conv2d(cz, c, 1)
    f, zq = torch.randn(2, c, 8, 8), torch.randn(2, cz, 4, 4)
    zq_up = torch.nn.functional.interpolate(zq, size=(8, 8), mode="nearest")
    want = gn(f) * conv_y(zq_up) + conv_b(zq_up)  # diffusers' SpatialNorm
    ours = SpatialNorm(c, cz)
    w = fold_norm_affine(gn.weight, gn.bias, conv_y.weight, conv_y.bias, conv_b.weight, conv_b.bias)
    with torch.no_grad():
        for p, v in zip([ours.scale.weight, ours.scale.bias, ours.shift.weight, ours.shift.bias], w, strict=True):
            p.copy_(v)
    torch.testing.assert_close(ours(f, zq), want, atol=1e-5, rtol=1e-5)


def _fake_arch(monkeypatch, with_attn_levels: bool):
    """Register a stand-in arch module under "magvit2" whose Encoder / Decoder take fewer keywords."""
    import sys
    import types

    import tokkit.models.autoencoder as ae
    from tokkit.models import tokenizer as tk

    class Enc(ae.Encoder):
        def __init__(self, *, in_channels, base_channels, channel_mult, num_res_blocks, z_channels, width=1, **kw):
            super().__init__(in_channels=in_channels, base_channels=base_channels * width, channel_mult=channel_mult,
                             num_res_blocks=num_res_blocks, z_channels=z_channels, **kw)

    class Dec(ae.Decoder):
        def __init__(self, *, out_channels, base_channels, channel_mult, num_res_blocks, z_channels, depth=0):
            super().__init__(out_channels=out_channels, base_channels=base_channels, channel_mult=channel_mult,
                             num_res_blocks=num_res_blocks + depth, z_channels=z_channels)

    if not with_attn_levels:  # no **kw: attn_levels / attention must stay at their defaults
        def init(self, *, in_channels, base_channels, channel_mult, num_res_blocks, z_channels, width=1):
            ae.Encoder.__init__(self, in_channels=in_channels, base_channels=base_channels * width,
                                channel_mult=channel_mult, num_res_blocks=num_res_blocks, z_channels=z_channels)
        Enc.__init__ = init
    mod = types.ModuleType("tokkit_fake_arch")
    mod.Encoder, mod.Decoder = Enc, Dec
    monkeypatch.setitem(sys.modules, "tokkit_fake_arch", mod)
    monkeypatch.setitem(tk.ARCHS, "magvit2", "tokkit_fake_arch")


def test_arch_dispatch_builds_the_arch_with_its_kwargs(monkeypatch):
    _fake_arch(monkeypatch, with_attn_levels=False)
    tok = Tokenizer(tiny_config("fsq", arch="magvit2", arch_kwargs={"width": 2, "depth": 1}))
    assert type(tok.encoder).__name__ == "Enc" and tok.encoder.conv_in.out_channels == 16  # width reached the encoder
    assert len(tok.decoder.levels[0]) == 3  # depth reached the decoder: 2 res blocks + upsample
    with pytest.raises(ConfigError, match="tokenizer.arch_kwargs nope"):
        tiny_config("fsq", arch="magvit2", arch_kwargs={"nope": 1})
    with pytest.raises(ConfigError, match="takes no 'attn_levels'"):
        tiny_config("fsq", arch="magvit2", attn_levels=[0])


def test_missing_arch_module_is_a_config_error(monkeypatch):
    from tokkit.models import tokenizer as tk

    monkeypatch.setitem(tk.ARCHS, "magvit2", "tokkit.models._no_such_arch")
    with pytest.raises(ConfigError, match="tokenizer.arch 'magvit2' needs the module"):
        tiny_config("fsq", arch="magvit2")


def test_generalized_tokenizer_saves_and_loads(tmp_path):
    from tokkit.models.tokenizer import load

    torch.manual_seed(0)
    cfg = tiny_config("vq", quant_conv=True, embed_dim=4, attn_levels=[0], decoder_res_blocks=2, attention=True,
                      quantizer_kwargs={"codebook_size": 32, "cosine": True, "ema": False})
    tok = Tokenizer(cfg).eval()
    back = load(tok.save(tmp_path / "ckpt"), device="cpu")
    assert back.config == cfg
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(back.decode(back.encode(x)), tok.decode(tok.encode(x)))
