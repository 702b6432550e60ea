"""Golden values per family at a fixed seed: three training forwards from seeded weights and inputs.

The numbers were computed once with this code (torch 2.14, CPU) and pinned; indices must match exactly, floats to a
relative 1e-4. A change here means the algorithm changed: check it was intended, then re-pin.
"""

from __future__ import annotations

import pytest
import torch

from tokkit.quantizers import build_quantizer

GOLDEN = {
    "vq-cosine-ema-kmeans-lowdim": (
        "vq",
        {"dim": 8, "codebook_size": 64, "codebook_dim": 4, "cosine": True, "kmeans_init": True, "kmeans_iters": 3,
         "dead_code_threshold": 0.5},
        {"indices": [6, 54, 5, 41, 6, 42, 24, 27, 14, 19], "codes_sum": 16.91089, "loss": 0.011835,
         "perplexity": 17.1651, "state_sum": 71.2635},
    ),
    "vq-loss-rotation-groups": (
        "vq",
        {"dim": 8, "codebook_size": 64, "ema": False, "rotation_trick": True, "groups": 2},
        {"indices": [37, 53, 27, 51, 48, 3, 22, 34, 36, 34], "codes_sum": 13.37166, "loss": 0.316794,
         "perplexity": 32.6071, "state_sum": 70.5901},
    ),
    "fsq": (
        "fsq",
        {"dim": 8, "levels": [8, 5, 5, 5]},
        {"indices": [259, 457, 291, 109, 257, 90, 701, 524, 468, 733], "codes_sum": 52.05713, "loss": 0.0,
         "perplexity": 26.9087, "state_sum": 0.7818},
    ),
    "lfq-grouped-entropy": (
        "lfq",
        {"dim": 8, "codebook_size": 2**10, "entropy_group_bits": 5},
        {"indices": [418, 339, 170, 934, 267, 139, 1008, 166, 308, 966], "codes_sum": 10.11934, "loss": -0.402658,
         "perplexity": 28.1, "state_sum": -3.2949},
    ),
    "lfq-spherical": (
        "lfq",
        {"dim": 8, "codebook_size": 2**10, "spherical": True},
        {"indices": [418, 339, 170, 934, 267, 139, 1008, 166, 308, 966], "codes_sum": 9.4628, "loss": -0.320759,
         "perplexity": 28.1, "state_sum": -3.2949},
    ),
    "residual-vq-fsq": (
        "residual",
        {"dim": 8, "stages": [{"name": "vq", "codebook_size": 32}, {"name": "fsq", "levels": [5, 5, 5]}]},
        {"indices": [26, 83, 20, 31, 4, 37, 27, 88, 18, 36], "codes_sum": 23.09565, "loss": 0.160117,
         "perplexity": 28.096, "state_sum": 43.6305},
    ),
}  # fmt: skip


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_values(key):
    name, kwargs, expected = GOLDEN[key]
    torch.manual_seed(0)
    q = build_quantizer(name, **kwargs).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        outs = [q(torch.randn(2, 8, 4, 4, generator=gen)) for _ in range(3)]
    out = outs[-1]
    state_sum = sum(float(v.double().sum()) for v in q.state_dict().values() if v.is_floating_point())
    assert out.indices.flatten()[:10].tolist() == expected["indices"]
    assert float(out.codes.double().sum()) == pytest.approx(expected["codes_sum"], rel=1e-4, abs=1e-4)
    assert float(out.loss) == pytest.approx(expected["loss"], rel=1e-4, abs=1e-5)
    assert float(out.stats["perplexity"]) == pytest.approx(expected["perplexity"], rel=1e-4)
    assert state_sum == pytest.approx(expected["state_sum"], rel=1e-4, abs=1e-3)
