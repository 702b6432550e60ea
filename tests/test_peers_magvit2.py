"""Open-MAGVIT2 -> tokkit: the LFQ index order, the magvit2 arch, and the converter against the peer's own code.

The peer is not on the package index: tests/peer_code/open_magvit2.py vendors its model code (Apache-2.0). Small
random-weight peers are converted and must give the same indices and reconstructions; the published configs are
built on the meta device to check that every published tensor has its place.
"""

from __future__ import annotations

import pytest
import torch
from peer_code import open_magvit2 as peer

from tokkit.config import TokenizerConfig
from tokkit.errors import CheckpointError, ConfigError
from tokkit.models import magvit2
from tokkit.models.tokenizer import Tokenizer
from tokkit.peers import detect_family, get_family
from tokkit.peers.open_magvit2 import convert, detect
from tokkit.quantizers.lfq import LFQ

TOL = 1e-5
SMALL = dict(ch=32, out_ch=3, in_channels=3, num_res_blocks=2, z_channels=10, ch_mult=[1, 2, 2], resolution=32)
# the published ddconfigs (configs/Open-MAGVIT2/gpu/*.yaml): (ddconfig, n_embed, expected variant, resolution)
PUBLISHED = {
    "imagenet_256_L": (dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, z_channels=18), 2**18, 256),
    "imagenet_128_L": (dict(ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=4, z_channels=18), 2**18, 128),
    "pretrain_256_16384": (dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, z_channels=14), 2**14, 256),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (norm gains and biases included) so that a mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _small_peer(seed: int = 0) -> peer.VQModel:
    torch.manual_seed(seed)
    model = peer.VQModel(SMALL, 2 ** SMALL["z_channels"], SMALL["z_channels"]).eval()
    _randomize(model, seed)
    with torch.no_grad():  # outputs in about [-1, 1], as a trained decoder's (float rounding scales with them)
        model.decoder.conv_out.weight.mul_(0.35)
        model.decoder.conv_out.bias.mul_(0.35)
    return model


def _images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- LFQ bit order ---------------------------------------------------------------------------------------------------


def test_lfq_lsb_order_matches_the_peers_index_and_codes() -> None:
    q = LFQ(dim=10, codebook_size=2**10, bit_order="lsb").eval()
    ref = peer.LFQ(dim=10, codebook_size=2**10)
    z = torch.randn(3, 10, 4, 5, generator=torch.Generator().manual_seed(0))
    z[0, :, 0, 0] = 0.0  # a zero channel is bit 0 / code -1 in both
    out = q(z)
    codes, idx = ref(z)
    assert torch.equal(out.indices.flatten(), idx.long())
    assert torch.equal(out.codes, codes)
    assert torch.equal(q.indices_to_codes(out.indices), ref.get_codebook_entry(idx.view(3, 20), (3, 4, 5, 10)))


def test_lfq_default_order_is_unchanged_and_bad_order_is_a_config_error() -> None:
    z = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    assert int(LFQ(dim=3, codebook_size=8)(z).indices) == 4  # channel 0 most significant
    assert int(LFQ(dim=3, codebook_size=8, bit_order="lsb")(z).indices) == 1
    counts = LFQ(dim=3, codebook_size=8, bit_order="lsb").usage_counts(torch.tensor([1, 1, 3]))
    assert counts["ones"].tolist() == [3, 1, 0]  # per channel, in channel order
    with pytest.raises(ConfigError, match="bit_order"):
        LFQ(dim=3, codebook_size=8, bit_order="big")


# ---- the arch's pieces -----------------------------------------------------------------------------------------------


def test_depth_to_space_and_adaptive_norm_match_the_peer() -> None:
    x = torch.randn(2, 64, 3, 5)
    assert torch.equal(magvit2.depth_to_space(x, 2), peer.depth_to_space(x, 2))
    assert not torch.equal(magvit2.depth_to_space(x, 2), torch.nn.functional.pixel_shuffle(x, 2))  # DCR, not CRD
    torch.manual_seed(0)
    ref = peer.AdaptiveGroupNorm(6, 64)
    mine = magvit2.AdaptiveGroupNorm(6, 64)
    mine.load_state_dict({k: v for k, v in ref.state_dict().items()})
    h, z = torch.randn(2, 64, 8, 8), torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(mine(h, z), ref(h, z), rtol=0, atol=1e-6)


def test_magvit2_arch_kwargs_are_validated() -> None:
    base = dict(resolution=32, base_channels=32, channel_mult=[1, 2], z_channels=4, arch="magvit2", quantizer="lfq")
    base["quantizer_kwargs"] = {"codebook_size": 16}
    TokenizerConfig(**base, arch_kwargs={"variant": "maskbit", "downsample": "avgpool"})
    with pytest.raises(ConfigError, match="variant"):
        TokenizerConfig(**base, arch_kwargs={"variant": "magvit3"})
    with pytest.raises(ConfigError, match="upsample"):
        TokenizerConfig(**base, arch_kwargs={"upsample": "bilinear"})
    with pytest.raises(ConfigError):
        TokenizerConfig(**base, attention=True)  # no attention in this arch


# ---- the converter ---------------------------------------------------------------------------------------------------


def test_small_random_peer_converts_to_the_same_indices_and_reconstructions(one_thread) -> None:
    model = _small_peer()
    cfg, state, variant = convert(model.state_dict(), {"resolution": 32})
    assert variant == "lfq10bit_f4" and cfg.arch == "magvit2" and cfg.quantizer_kwargs["bit_order"] == "lsb"
    tok = Tokenizer(cfg).eval()
    tok.load_state_dict(state, strict=True)
    x = _images()
    with torch.no_grad():
        codes, idx = model.encode(x)
        ids = tok.encode(x)  # (B, h, w)
        assert torch.equal(ids.flatten(), idx.long())
        assert ids.unique().numel() > 10  # a real spread of tokens, not one constant code
        # reconstruction from the tokens: the peer decodes its codebook entries, tokkit decodes its ids
        ref = model.decode(model.quantize.get_codebook_entry(idx.view(2, -1), (2, 8, 8, SMALL["z_channels"])))
        mine = tok.decoder(tok.quantizer.indices_to_codes(ids))
        assert (mine - ref).abs().max().item() <= TOL
        assert ref.abs().max().item() > 0.5  # not a vanishing output that any mapping would match
        torch.testing.assert_close(tok.decode(ids), ref.clamp(-1, 1), rtol=0, atol=TOL)
        # the training forward (straight-through codes) too
        rec, _ = tok(x)
        assert (rec - model.decode(codes)).abs().max().item() <= TOL


def test_ema_weights_are_preferred_when_present() -> None:
    model = _small_peer()
    sd = model.state_dict()
    ema = {"model_ema." + k.replace(".", ""): v + 1.0 for k, v in sd.items()}
    extra_keys = {"loss.discriminator.main.0.weight": torch.zeros(3), "model_ema.decay": torch.tensor(0.999)}
    state = {**sd, **ema, **extra_keys}
    _, converted, _ = convert(state, {"resolution": 32})
    torch.testing.assert_close(converted["encoder.conv_in.weight"], sd["encoder.conv_in.weight"] + 1.0)
    _, raw, _ = convert(state, {"resolution": 32, "ema": False})
    assert torch.equal(raw["encoder.conv_in.weight"], sd["encoder.conv_in.weight"])
    del state["model_ema.decoderconv_outweight"]
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):
        convert(state, {"resolution": 32})


def test_detect_and_bad_layouts() -> None:
    sd = _small_peer().state_dict()
    fam = get_family("open-magvit2")
    assert fam.license == "Apache-2.0" and "SEED-Voken" in fam.url
    assert detect(sd, {}) and detect_family(sd, {}) is fam  # the only family that claims this layout
    assert not detect({k: v for k, v in sd.items() if "adaptive" not in k}, {})
    with pytest.raises(CheckpointError, match="unknown tensor"):
        convert({**sd, "encoder.extra.weight": torch.zeros(1)}, {"resolution": 32})
    bad = dict(sd)
    bad["decoder.conv_in.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(CheckpointError, match="shape"):
        convert(bad, {"resolution": 32})


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_layout_is_fully_mapped(name: str) -> None:
    dd, n_embed, resolution = PUBLISHED[name]
    ddconfig = dict(dd, out_ch=3, in_channels=3, resolution=resolution)
    with torch.device("meta"):
        model = peer.VQModel(ddconfig, n_embed, dd["z_channels"])
    sd = model.state_dict()
    cfg, state, variant = convert(sd, {})  # every key mapped, every shape checked against Tokenizer(cfg)
    assert variant == name and cfg.resolution == resolution
    assert cfg.token_grid == (16, 16) and cfg.quantizer_kwargs["codebook_size"] == n_embed
    peer_params = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        tok = Tokenizer(cfg)
    assert sum(p.numel() for p in tok.parameters()) == peer_params
    assert sum(v.numel() for k, v in state.items() if k.startswith(("encoder.", "decoder."))) == peer_params


def test_converted_tokenizer_saves_and_reloads(tmp_path, one_thread) -> None:
    from tokkit.models.tokenizer import load

    cfg, state, _ = convert(_small_peer().state_dict(), {"resolution": 32})
    tok = Tokenizer(cfg).eval()
    tok.load_state_dict(state, strict=True)
    tok.save(tmp_path / "om2")
    again = load(tmp_path / "om2")
    assert again.config.arch == "magvit2" and again.config.quantizer_kwargs["bit_order"] == "lsb"
    x = _images()
    ids = tok.encode(x)
    assert torch.equal(again.encode(x), ids)
    assert torch.equal(again.decode(ids), tok.decode(ids))


def test_lightning_ckpt_converts_end_to_end_with_provenance(tmp_path, one_thread) -> None:
    from tokkit.models.tokenizer import load
    from tokkit.peers import convert_source

    model = _small_peer()
    sd = model.state_dict()
    ema = {"model_ema." + k.replace(".", ""): v for k, v in sd.items()}
    ckpt = tmp_path / "imagenet_32.ckpt"
    torch.save({"state_dict": {**sd, **ema, "loss.discriminator.main.0.weight": torch.zeros(2)}, "epoch": 3}, ckpt)
    result = convert_source(ckpt, out=tmp_path / "tok")
    assert result.provenance["peer"] == "open-magvit2" and result.provenance["license"] == "Apache-2.0"
    assert result.variant == "lfq10bit_f4"
    x = _images()
    with torch.no_grad():
        _, idx = model.encode(x)
    assert torch.equal(load(tmp_path / "tok").encode(x).flatten(), idx.long())


def test_float64_forward_agrees_to_rounding(one_thread) -> None:
    """In float64 the remaining float32 difference (F.silu vs the peer's x * sigmoid(x), op order) all but vanishes."""
    model = _small_peer().double()
    cfg, state, _ = convert(model.state_dict(), {"resolution": 32})
    tok = Tokenizer(cfg).eval().double()
    tok.load_state_dict(state, strict=True)
    x = _images().double()
    with torch.no_grad():
        codes, idx = model.encode(x)
        rec, out = tok(x)
        assert torch.equal(out.indices.flatten(), idx.long())
        assert (rec - model.decode(codes)).abs().max().item() <= 1e-12


def test_convert_cli_names_the_variant_and_takes_raw_weights(tmp_path, one_thread) -> None:
    """`--variant` names a release the shapes cannot tell (recorded for bench); `--raw-weights` skips the EMA copy."""
    import json

    from typer.testing import CliRunner

    from tokkit.cli.app import app

    sd = _small_peer().state_dict()
    ema = {"model_ema." + k.replace(".", ""): v + 1.0 for k, v in sd.items()}
    ckpt = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": {**sd, **ema}}, ckpt)
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(ckpt), "--out", str(tmp_path / "a"), "--variant", "pretrain_x", "-q"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["extra"]["provenance"]["variant"] == "pretrain_x" and meta["extra"]["provenance"]["variant_given"]
    res = runner.invoke(app, ["convert", str(ckpt), "--out", str(tmp_path / "b"), "--raw-weights", "-q"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "model.safetensors"))["encoder.conv_in.weight"]
    b = load_file(str(tmp_path / "b" / "model.safetensors"))["encoder.conv_in.weight"]
    torch.testing.assert_close(a, sd["encoder.conv_in.weight"] + 1.0)  # EMA by default
    assert torch.equal(b, sd["encoder.conv_in.weight"])
