"""MaskBit -> tokkit: bit-token (LFQ) and VQGAN+ / MaskGIT (VQ) tokenizers against the peer's own code.

The peer is not on the package index: tests/peer_code/maskbit.py vendors its model code (Apache-2.0). Small
random-weight peers are converted and must give the same indices and reconstructions; the published configs are
built on the meta device to check that every published tensor has its place.
"""

from __future__ import annotations

import pytest
import torch
from peer_code import maskbit as peer

from tokkit.errors import CheckpointError
from tokkit.models.tokenizer import Tokenizer
from tokkit.peers import detect_family, get_family
from tokkit.peers.maskbit import convert, detect

TOL = 1e-5
# configs/tokenizer/*.yaml: hidden 128, channel_mult [1,1,2,2,4], 2 res blocks, sample_with_conv; LFQ token_size = bits
PUBLISHED_BITS = [10, 12, 14, 16, 18]


def _config(**overrides) -> peer.Config:
    kw = dict(
        num_channels=3,
        hidden_channels=32,
        channel_mult=[1, 2, 2],
        num_resolutions=3,
        num_res_blocks=2,
        token_size=10,
        codebook_size=256,
        sample_with_conv=True,
        quantizer_type="lookup-free",
    )
    kw.update(overrides)
    return peer.Config(**kw)


def _small_peer(config: peer.Config, legacy: bool = False, seed: int = 0) -> peer.ConvVQModel:
    torch.manual_seed(seed)
    model = peer.ConvVQModel(config, legacy=legacy).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter off its init (norm gains and biases included)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _check_equivalent(model: peer.ConvVQModel, expected_variant: str) -> Tokenizer:
    cfg, state, variant = convert(model.state_dict(), {"resolution": 32})
    assert variant == expected_variant and cfg.arch == "magvit2"
    tok = Tokenizer(cfg).eval()
    tok.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        codes, result = model.encode(x)
        idx = result["min_encoding_indices"]  # (B, h, w)
        ids = tok.encode(x)
        assert torch.equal(ids, idx.long())
        assert ids.unique().numel() > 4  # a spread of tokens, not one constant code
        # reconstruction from the tokens: the peer decodes its codebook entries, tokkit decodes its ids
        ref = model.decode(model.quantize.get_codebook_entry(idx).permute(0, 3, 1, 2))
        mine = tok.decoder(tok.quantizer.indices_to_codes(ids))
        assert (mine - ref).abs().max().item() <= TOL
        assert ref.abs().max().item() > 0.1
        torch.testing.assert_close(tok.decode(ids), ref.clamp(-1, 1), rtol=0, atol=TOL)
        rec, _ = tok(x)  # the training forward (straight-through codes)
        torch.testing.assert_close(rec, model.decode(codes), rtol=1e-5, atol=TOL)
    return tok


@pytest.mark.parametrize("legacy", [False, True], ids=["decoder", "legacy-decoder"])
def test_bit_tokenizer_converts_to_the_same_indices_and_reconstructions(legacy: bool, one_thread) -> None:
    tok = _check_equivalent(_small_peer(_config(), legacy=legacy), "maskbit_tokenizer_10bit")
    assert tok.config.quantizer == "lfq" and tok.config.quantizer_kwargs["bit_order"] == "lsb"


def test_vqgan_plus_and_maskgit_tokenizers_convert(one_thread) -> None:
    _check_equivalent(_small_peer(_config(quantizer_type="lookup", token_size=8)), "vqgan_plus_8bit")
    avgpool = _config(quantizer_type="lookup", token_size=8, codebook_size=64, sample_with_conv=False)
    tok = _check_equivalent(_small_peer(avgpool, legacy=True), "maskgit_tokenizer")
    assert tok.config.arch_kwargs == {"variant": "maskbit", "downsample": "avgpool"}


def test_decoder_with_its_own_block_count(one_thread) -> None:
    tok = _check_equivalent(_small_peer(_config(num_res_blocks_decoder=3)), "maskbit_tokenizer_10bit")
    assert tok.config.num_res_blocks == 2 and tok.config.decoder_res_blocks == 3


def test_detect_and_bad_layouts() -> None:
    sd = _small_peer(_config()).state_dict()
    fam = get_family("maskbit")
    assert fam.license == "Apache-2.0" and "maskbit" in fam.url
    assert detect(sd, {}) and detect_family(sd, {}) is fam  # the only family that claims this layout
    assert not get_family("open-magvit2").detect(sd, {})
    assert not detect({k: v for k, v in sd.items() if not k.startswith("quantize.")}, {})
    with pytest.raises(CheckpointError, match="unknown tensor"):
        convert({**sd, "decoder.up.0.attn.weight": torch.zeros(1)}, {"resolution": 32})


@pytest.mark.parametrize("bits", PUBLISHED_BITS)
def test_published_bit_tokenizer_layout_is_fully_mapped(bits: int) -> None:
    cfg_peer = _config(hidden_channels=128, channel_mult=[1, 1, 2, 2, 4], num_resolutions=5, token_size=bits)
    with torch.device("meta"):
        model = peer.ConvVQModel(cfg_peer)
    sd = model.state_dict()
    assert {"quantize.bits_to_indices", "quantize.codebook"} <= set(sd)  # constant buffers, dropped by convert
    cfg, state, variant = convert(sd, {})  # every key mapped, every shape checked against Tokenizer(cfg)
    assert variant == f"maskbit_tokenizer_{bits}bit" and cfg.resolution == 256 and cfg.token_grid == (16, 16)
    assert cfg.quantizer_kwargs["codebook_size"] == 2**bits
    peer_params = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        tok = Tokenizer(cfg)
    assert sum(p.numel() for p in tok.parameters()) == peer_params
    assert sum(v.numel() for k, v in state.items() if k.startswith(("encoder.", "decoder."))) == peer_params


def test_published_vqgan_plus_layout_is_fully_mapped() -> None:
    cfg_peer = _config(
        hidden_channels=128,
        channel_mult=[1, 1, 2, 2, 4],
        num_resolutions=5,
        token_size=64,
        codebook_size=4096,
        quantizer_type="lookup",
    )
    with torch.device("meta"):
        model = peer.ConvVQModel(cfg_peer)
    cfg, state, variant = convert(model.state_dict(), {})
    assert variant == "vqgan_plus_12bit" and tuple(state["quantizer.codebook"].shape) == (4096, 64)
    with torch.device("meta"):
        tok = Tokenizer(cfg)
    assert sum(p.numel() for p in tok.parameters()) == sum(p.numel() for p in model.parameters())


def test_published_bin_converts_end_to_end_with_provenance(tmp_path, one_thread) -> None:
    from tokkit.models.tokenizer import load
    from tokkit.peers import convert_source

    model = _small_peer(_config())
    path = tmp_path / "maskbit_tokenizer_10bit.bin"
    torch.save(model.state_dict(), path)
    result = convert_source(path, out=tmp_path / "tok")
    assert result.provenance["peer"] == "maskbit" and result.variant == "maskbit_tokenizer_10bit"
    tok = load(tmp_path / "tok")
    assert tok.resolution == 256  # MaskBit's published resolution (no hint given)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1  # fully convolutional: 32 px
    with torch.no_grad():
        _, r = model.encode(x)
        ids = tok.quantizer(tok.encoder(x)).indices
    assert torch.equal(ids, r["min_encoding_indices"].long())


def test_float64_forward_agrees_to_rounding(one_thread) -> None:
    """Bit tokens in float64 (tokkit's VQ searches its codebook in float32, so VQGAN+ stays a float32 check)."""
    model = _small_peer(_config(token_size=8)).double()
    cfg, state, _ = convert(model.state_dict(), {"resolution": 32})
    tok = Tokenizer(cfg).eval().double()
    tok.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        codes, result = model.encode(x)
        rec, out = tok(x)
        assert torch.equal(out.indices, result["min_encoding_indices"].long())
        assert (rec - model.decode(codes)).abs().max().item() <= 1e-12
