"""Contract tests over the registry: every registered quantizer gets these for free.

A new registered quantizer must add at least one small configuration to ``CASES`` (``test_every_registered_name``
fails otherwise).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tokkit.errors import ConfigError
from tokkit.quantizers import Quantizer, QuantizerOutput, build_quantizer, list_quantizers

DIM = 6
CASES: dict[str, list[dict]] = {
    "fsq": [
        {"levels": [8, 5, 5, 5]},
        {"codebook_size": 2**8},  # [8, 6, 5]: 3 channels, so projections 6 -> 3 -> 6
    ],
    "lfq": [
        {"codebook_size": 2**6},
        {"codebook_size": 2**5, "spherical": True, "entropy_warmup_steps": 4, "entropy_warmup_multiplier": 3.0},
    ],
    "vq": [
        {"codebook_size": 32, "ema": False},
        {"codebook_size": 32},  # EMA (default)
        {
            "codebook_size": 256,
            "codebook_dim": 2,
            "cosine": True,
            "groups": 2,
            "rotation_trick": True,
            "kmeans_init": True,
            "kmeans_iters": 2,
            "dead_code_threshold": 0.05,
        },
    ],
    "residual": [
        {"stages": [{"name": "vq", "codebook_size": 16, "ema": False}, {"name": "fsq", "levels": [5, 5, 5]}]},
        {"stages": [{"name": "lfq", "codebook_size": 2**4}]},
    ],
}
PARAMS = [
    pytest.param(name, kw, id=f"{name}-{i}") for name in list_quantizers() for i, kw in enumerate(CASES.get(name, []))
]
SHAPES = {"1d": (2, DIM, 7), "2d": (2, DIM, 3, 4), "3d": (1, DIM, 2, 3, 3)}


def make(name: str, kwargs: dict, seed: int = 0) -> Quantizer:
    torch.manual_seed(seed)
    return build_quantizer(name, dim=DIM, **copy.deepcopy(kwargs))


def expected_index_shape(q: Quantizer, x: torch.Tensor) -> tuple[int, ...]:
    lead = (x.shape[0], *x.shape[2:])
    return lead + ((q.num_groups,) if q.num_groups > 1 else ())


def test_every_registered_name_has_cases():
    missing = [n for n in list_quantizers() if not CASES.get(n)]
    assert not missing, f"add a small configuration to CASES for {missing}"


@pytest.mark.parametrize("name,kwargs", PARAMS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_shapes_dtypes_and_index_range(name, kwargs, shape):
    q = make(name, kwargs)
    x = torch.randn(shape)
    out = q(x)
    assert isinstance(out, QuantizerOutput)
    assert out.codes.shape == x.shape and out.codes.dtype == torch.float32
    assert out.indices.shape == expected_index_shape(q, x)
    assert out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert np.iinfo(q.index_dtype).max >= q.codebook_size - 1
    for key, value in out.stats.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad, key
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_attributes(name, kwargs):
    q = make(name, kwargs)
    assert q.dim == DIM and q.registry_name == name
    assert q.codebook_size >= 2 and q.num_groups >= 1
    assert q.bits_per_token > 0
    if name != "residual":
        assert q.bits_per_token == pytest.approx(math.log2(q.codebook_size) * q.num_groups)


@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_gradients_reach_input_and_parameters(name, kwargs):
    q = make(name, kwargs).train()
    x = torch.randn(2, DIM, 4, 4, requires_grad=True)
    out = q(x)
    weight = torch.randn_like(out.codes)
    ((out.codes * weight).sum() + out.loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {pname}"
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,kwargs", PARAMS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_indices_to_codes_equals_forward_codes(name, kwargs, shape):
    q = make(name, kwargs)
    q.train()
    q(torch.randn(shape))  # one training step first: k-means init, EMA and dead-code updates change the codebook
    q.eval()
    out = q(torch.randn(shape))
    codes = q.indices_to_codes(out.indices)
    assert codes.dtype == torch.float32
    assert torch.equal(codes, out.codes)


@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_bf16_autocast_gives_float32_indices(name, kwargs):
    q = make(name, kwargs).eval()
    x = torch.randn(2, DIM, 4, 4)
    ref = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = q(x)
    assert torch.equal(auto.indices, ref.indices)
    assert torch.equal(auto.codes, ref.codes)
    # bf16 input: the math still runs in float32 on the upcast values, and the codes come back as bf16
    xb = x.bfloat16()
    out_b, out_f = q(xb), q(xb.float())
    assert out_b.codes.dtype == torch.bfloat16
    assert torch.equal(out_b.indices, out_f.indices)
    assert torch.equal(out_b.codes, out_f.codes.bfloat16())


@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_seeded_determinism(name, kwargs):
    def run():
        q = make(name, kwargs, seed=123).train()
        torch.manual_seed(7)
        outs = [q(torch.randn(2, DIM, 4, 4)) for _ in range(2)]
        return outs, q.state_dict()

    (a, sa), (b, sb) = run(), run()
    for oa, ob in zip(a, b, strict=True):
        assert torch.equal(oa.indices, ob.indices)
        assert torch.equal(oa.codes, ob.codes)
        assert torch.equal(oa.loss, ob.loss)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_state_round_trip_through_safetensors(name, kwargs, tmp_path):
    q = make(name, kwargs, seed=1).train()
    for _ in range(2):
        q(torch.randn(2, DIM, 4, 4))  # moves EMA statistics, k-means flags, warm-up steps
    path = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(path))
    fresh = make(name, kwargs, seed=2)
    fresh.load_state_dict(load_file(str(path)))
    q.eval()
    fresh.eval()
    x = torch.randn(2, DIM, 4, 4)
    a, b = q(x), fresh(x)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(q.indices_to_codes(a.indices), fresh.indices_to_codes(a.indices))


@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_bad_input_is_a_config_error(name, kwargs):
    q = make(name, kwargs)
    with pytest.raises(ConfigError, match="channel-first"):
        q(torch.randn(2, DIM))
    with pytest.raises(ConfigError, match="channels"):
        q(torch.randn(2, DIM + 1, 4))
    with pytest.raises(ConfigError, match="floating-point"):
        q(torch.ones(2, DIM, 4, dtype=torch.int64))


def test_unknown_name_and_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown quantizer"):
        build_quantizer("nope", dim=4)
    with pytest.raises(ConfigError, match="bad arguments"):
        build_quantizer("fsq", dim=4, levels=[5, 5], not_an_arg=1)
