"""IBQ -> tokkit: the VQ ``metric="dot"`` search, and the converter against IBQ's own code.

IBQ is not on the package index: tests/peer_code/ibq.py vendors its model code (Apache-2.0), including LitEma so the
state dicts carry the published ``model_ema.*`` names. Small random-weight peers are converted and must give the
same indices and reconstructions; the published configs are built on the meta device to check that every published
tensor has its place.
"""

from __future__ import annotations

import pytest
import torch
from peer_code import ibq as peer

from tokkit.errors import CheckpointError, ConfigError
from tokkit.models.tokenizer import Tokenizer
from tokkit.peers import detect_family, get_family
from tokkit.peers.ibq import convert, detect
from tokkit.quantizers.vq import VQ

TOL = 1e-5
# 3 levels, attention at 8 px (level 2), 4 encoder blocks per level as IBQ's published configs have
SMALL = {"ch": 32, "out_ch": 3, "ch_mult": [1, 2, 2], "num_res_blocks": 4, "attn_resolutions": [8], "dropout": 0.0,
         "in_channels": 3, "resolution": 32, "z_channels": 16, "double_z": False}  # fmt: skip
N_EMBED, EMBED_DIM = 256, 8
# the published ddconfig (configs/IBQ/gpu/imagenet_ibqgan_*.yaml, pretrain_ibqgan_*.yaml): only n_embed differs
PUBLISHED_DD = {"ch": 128, "out_ch": 3, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 4, "attn_resolutions": [16],
                "dropout": 0.0, "in_channels": 3, "resolution": 256, "z_channels": 256, "double_z": False}  # fmt: skip
PUBLISHED = {"imagenet_256_16384": 2**14, "imagenet_256_262144": 2**18}


def _small_peer(seed: int = 0, use_ema: bool = True) -> peer.IBQModel:
    """A random IBQ whose norms, attention and codebook are all off their trivial init (EMA shadows = the weights)."""
    torch.manual_seed(seed)
    model = peer.IBQModel(SMALL, N_EMBED, EMBED_DIM).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name or "norm_out" in name:  # GroupNorm affine: random scale and shift
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif name != "quantize.embedding.weight":
                p.add_(torch.randn_like(p) * 0.02)
        model.decoder.conv_out.weight.mul_(0.5)  # outputs of order 1, as a trained decoder's
    if use_ema:
        model.use_ema = True
        model.model_ema = peer.LitEma(model)
    return model


def _images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _tokkit(model: peer.IBQModel, **extra) -> Tokenizer:
    cfg, state, _ = convert(model.state_dict(), {"resolution": 32, **extra})
    tok = Tokenizer(cfg).eval()
    tok.load_state_dict(state, strict=True)
    return tok


# ---- VQ metric -------------------------------------------------------------------------------------------------------


def test_dot_metric_picks_the_largest_raw_dot_product_and_returns_the_row() -> None:
    q = VQ(dim=2, codebook_size=3, metric="dot", ema=False).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.9, 0.1]]))
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    out = q(z)
    assert int(out.indices) == 1  # dot picks the long code; l2 would pick 0, cosine 0 as well
    assert torch.equal(out.codes.flatten(), torch.tensor([3.0, 0.0]))  # the raw row, not normalized
    l2 = VQ(dim=2, codebook_size=3, ema=False).eval()
    cos = VQ(dim=2, codebook_size=3, cosine=True, ema=False).eval()
    for other in (l2, cos):
        other.load_state_dict(q.state_dict())
        assert int(other(z).indices) == 0
    assert torch.equal(q.indices_to_codes(out.indices), out.codes)


def test_metric_option_validation_defaults_and_repr() -> None:
    assert VQ(dim=4, codebook_size=8).metric == "l2"
    assert VQ(dim=4, codebook_size=8, cosine=True).metric == "cosine"
    assert VQ(dim=4, codebook_size=8, metric="cosine").cosine
    assert "metric=dot" in repr(VQ(dim=4, codebook_size=8, metric="dot"))
    with pytest.raises(ConfigError, match="metric"):
        VQ(dim=4, codebook_size=8, metric="manhattan")
    with pytest.raises(ConfigError, match="contradicts"):
        VQ(dim=4, codebook_size=8, cosine=True, metric="dot")


def test_dot_metric_matches_the_peers_quantizer_on_random_latents() -> None:
    torch.manual_seed(0)
    ref = peer.IndexPropagationQuantize(512, 16)
    q = VQ(dim=16, codebook_size=512, metric="dot", ema=False).eval()
    with torch.no_grad():
        ref.embedding.weight.normal_()
        q.codebook.copy_(ref.embedding.weight)
    z = torch.randn(3, 16, 5, 7) * 2
    with torch.no_grad():
        codes, _, (_, _, idx) = ref(z)
        out = q(z)
    assert torch.equal(out.indices.flatten(), idx)
    assert out.indices.unique().numel() > 30
    assert (out.codes - codes).abs().max().item() <= 1e-6


def test_dot_metric_trains_its_codebook_by_loss() -> None:
    q = VQ(dim=8, codebook_size=32, metric="dot", ema=False).train()
    out = q(torch.randn(4, 8, 3, 3, requires_grad=True))
    out.loss.backward()
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0


# ---- the converter ---------------------------------------------------------------------------------------------------


def test_small_random_peer_converts_to_the_same_indices_and_reconstructions(one_thread) -> None:
    model = _small_peer()
    cfg, state, variant = convert(model.state_dict(), {"resolution": 32})
    assert cfg.quantizer_kwargs["metric"] == "dot" and cfg.quant_conv and cfg.attn_levels == [2]
    assert cfg.decoder_res_blocks == 5 and variant == "f4-256"
    tok = Tokenizer(cfg).eval()
    tok.load_state_dict(state, strict=True)
    x = _images()
    with torch.no_grad():
        quant, _, (_, _, idx) = model.encode(x)
        ids = tok.encode(x)  # (B, h, w)
        assert ids.shape == (2, 8, 8)
        assert torch.equal(ids.flatten(), idx)
        assert ids.unique().numel() > 10  # a real spread of tokens, not one constant code
        ref = model.decode(model.quantize.get_codebook_entry(idx, (2, 8, 8, EMBED_DIM)))
        mine = tok.decode(ids)
        assert ref.abs().max().item() > 0.5  # not a vanishing output any mapping would match
        assert (mine - ref.clamp(-1, 1)).abs().max().item() <= TOL
        rec, _ = tok(x)  # the training forward (straight-through codes) against the peer's forward
        assert (rec - model.decode(quant)).abs().max().item() <= TOL


def test_ema_weights_are_preferred_when_present() -> None:
    model = _small_peer()
    with torch.no_grad():
        for name, buf in model.model_ema.named_buffers():
            if buf.is_floating_point() and name != "decay":
                buf.add_(1.0)
    sd = model.state_dict()
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)  # dropped
    _, converted, _ = convert(sd, {"resolution": 32})
    torch.testing.assert_close(converted["encoder.conv_in.weight"], sd["encoder.conv_in.weight"] + 1.0)
    torch.testing.assert_close(converted["quantizer.codebook"], sd["quantize.embedding.weight"] + 1.0)
    torch.testing.assert_close(converted["quant_conv.weight"], sd["quant_conv.weight"] + 1.0)
    _, raw, _ = convert(sd, {"resolution": 32, "ema": False})
    assert torch.equal(raw["encoder.conv_in.weight"], sd["encoder.conv_in.weight"])
    del sd["model_ema.decoderconv_outweight"]
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):
        convert(sd, {"resolution": 32})


def test_detect_claims_ibq_alone_and_leaves_taming_alone() -> None:
    sd = _small_peer().state_dict()
    fam = get_family("ibq")
    assert fam.license == "Apache-2.0" and "SEED-Voken" in fam.url
    assert detect(sd, {}) and detect_family(sd, {}) is fam  # taming's detect steps aside for model_ema checkpoints
    plain = _small_peer(use_ema=False).state_dict()
    assert not detect(plain, {})
    assert detect_family(plain, {}).name == "taming"  # without EMA it is taming's layout: --family ibq decides
    two_blocks = {k: v for k, v in sd.items() if ".block.2." not in k and ".block.3." not in k}
    assert not detect(two_blocks, {})  # not IBQ's 4 blocks per level (e.g. an LDM VQ with EMA)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        convert({**sd, "head.extra.weight": torch.zeros(1)}, {"resolution": 32})
    with pytest.raises(CheckpointError, match="unexpected keys"):
        convert({**sd, "encoder.extra.weight": torch.zeros(1)}, {"resolution": 32, "ema": False})
    with pytest.raises(CheckpointError, match="not an IBQ"):
        convert({"model_ema.decay": torch.tensor(0.999)}, {})


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_layout_is_fully_mapped(name: str) -> None:
    n_embed = PUBLISHED[name]
    with torch.device("meta"):
        model = peer.IBQModel(PUBLISHED_DD, n_embed, 256, use_ema=True)
    sd = model.state_dict()
    assert detect(sd, {})
    cfg, state, variant = convert(sd, {})  # every key mapped, every shape checked against Tokenizer(cfg)
    assert variant == name and cfg.resolution == 256 and cfg.token_grid == (16, 16)
    assert cfg.attn_levels == [4] and cfg.quantizer_kwargs == {"codebook_size": n_embed, "metric": "dot", "ema": False,
                                                               "commitment_weight": 1.0, "codebook_weight": 0.25}
    peer_params = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        tok = Tokenizer(cfg)
    assert sum(p.numel() for p in tok.parameters()) == peer_params
    assert sum(v.numel() for k, v in state.items() if not k.startswith(("quantizer.cluster", "quantizer.init"))) \
        == peer_params


def test_ckpt_converts_end_to_end_with_provenance(tmp_path, one_thread) -> None:
    from tokkit.models.tokenizer import load
    from tokkit.peers import convert_source

    model = _small_peer()
    sd = model.state_dict()
    ckpt = tmp_path / "imagenet256_256.ckpt"
    torch.save({"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.zeros(2)}, "epoch": 3}, ckpt)
    result = convert_source(ckpt, out=tmp_path / "tok")
    assert result.provenance["peer"] == "ibq" and result.provenance["license"] == "Apache-2.0"
    x = _images()
    with torch.no_grad():
        _, _, (_, _, idx) = model.encode(x)
    again = load(tmp_path / "tok")
    assert again.config.quantizer_kwargs["metric"] == "dot"
    assert torch.equal(again.encode(x).flatten(), idx)


def test_float64_encoder_and_decoder_agree_to_rounding(one_thread) -> None:
    """The float32 differences above are rounding alone (silu vs x * sigmoid(x), fused qkv): 1e-12 in float64."""
    model = _small_peer().double()
    tok = _tokkit(model).double()
    x = _images().double()
    with torch.no_grad():
        z_peer = model.quant_conv(model.encoder(x))
        assert (tok.latents(x) - z_peer).abs().max().item() <= 1e-12
        codes = torch.randn_like(z_peer)
        assert (tok.decode_codes(codes) - model.decode(codes)).abs().max().item() <= 1e-12
