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
