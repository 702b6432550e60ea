"""Every registered quantizer compiles as one graph (``torch.compile(fullgraph=True)``), in training and eval mode, and
gives what eager mode gives: no host syncs or data-dependent Python branches in the hot path (issue 9).

``backend="aot_eager"`` traces forward and backward through dynamo and AOTAutograd (buffer mutations functionalized)
without inductor's C++ build, so these tests stay a few seconds each; a graph break makes ``fullgraph=True`` raise.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tokkit.quantizers import build_quantizer, list_quantizers

# name -> (registered quantizer, dim, kwargs); every registered name appears at least once
CASES: dict[str, tuple[str, int, dict]] = {
    "vq-l2-ema": ("vq", 8, {"codebook_size": 1024}),
    "vq-cosine-ema-dead": ("vq", 8, {"codebook_size": 256, "cosine": True, "decay": 0.1, "dead_code_threshold": 0.5}),
    "vq-loss-rotation-groups-kmeans-lowdim": (
        "vq",
        8,
        {
            "codebook_size": 64,
            "ema": False,
            "rotation_trick": True,
            "groups": 2,
            "codebook_dim": 3,
            "kmeans_init": True,
            "kmeans_iters": 2,
            "dead_code_threshold": 0.5,
            "decay": 0.1,
        },
    ),  # fmt: skip
    "fsq": ("fsq", 4, {"levels": [8, 5, 5, 5]}),
    "fsq-projected": ("fsq", 8, {"codebook_size": 2**10}),
    "lfq-warmup": ("lfq", 10, {"codebook_size": 2**10, "entropy_warmup_steps": 3, "entropy_warmup_multiplier": 4.0}),
    "lfq-2^18-spherical": ("lfq", 18, {"codebook_size": 2**18, "spherical": True, "entropy_group_bits": 9}),
    "residual": (
        "residual",
        6,
        {
            "stages": [
                {"name": "vq", "codebook_size": 32},
                {"name": "fsq", "levels": [5, 5, 5]},
                {"name": "lfq", "codebook_size": 2**6},
            ]
        },
    ),  # fmt: skip
}


def test_every_registered_quantizer_has_a_compile_case():
    assert set(list_quantizers()) <= {name for name, _, _ in CASES.values()}


def _make(key: str) -> tuple[torch.nn.Module, int]:
    name, dim, kwargs = CASES[key]
    torch.manual_seed(0)
    q = build_quantizer(name, dim=dim, **copy.deepcopy(kwargs))
    q.train()
    q(torch.randn(2, dim, 4, 4))  # eager warm-up step: runs k-means where enabled (a one-time eager path)
    return q, dim


def _step(q: torch.nn.Module, x: torch.Tensor, seed: int, train: bool):
    x = x.clone().requires_grad_(train)
    torch.manual_seed(seed)  # dead-code restarts draw random rows: the same draw in both runs
    out = q(x)
    grad = None
    if train:
        (out.codes.square().mean() + out.loss).backward()
        grad = x.grad
    return out, grad


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("key", list(CASES))
def test_compiles_without_graph_breaks_and_matches_eager(key, train):
    torch._dynamo.reset()
    eager, dim = _make(key)
    eager.train(train)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(2, dim, 4, 4, generator=gen)
        if step == 2:
            x[0, :, 1, 1] = float("nan")  # a diverging batch takes the same (masked) path, no extra branch
        out_e, grad_e = _step(eager, x, step, train)
        out_c, grad_c = _step(compiled, x, step, train)
        assert torch.equal(out_c.indices, out_e.indices), (key, step)
        torch.testing.assert_close(out_c.codes, out_e.codes, equal_nan=True)
        torch.testing.assert_close(out_c.loss, out_e.loss, equal_nan=True)
        assert out_c.stats.keys() == out_e.stats.keys()
        for k, v in out_e.stats.items():
            torch.testing.assert_close(out_c.stats[k], v, equal_nan=True, msg=k)
        if train:
            # traced backward may reorder float sums; LFQ's temperature 0.01 makes its logits 400 z, so allow that
            torch.testing.assert_close(grad_c, grad_e, equal_nan=True, rtol=1e-3, atol=1e-4)
    for k, v in eager.state_dict().items():  # EMA codebooks, usage, dead-code restarts, LFQ step: the same updates
        torch.testing.assert_close(twin.state_dict()[k], v, msg=k)


def test_kmeans_init_under_compile_is_a_one_time_eager_step():
    """Not yet initialized: the first compiled training step runs k-means eagerly (one break), then one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = build_quantizer("vq", dim=4, codebook_size=16, kmeans_init=True, kmeans_iters=2).train()
    twin = copy.deepcopy(q)
    compiled = torch.compile(twin, backend="aot_eager")
    x = torch.randn(2, 4, 8, 8)
    for step in range(2):
        torch.manual_seed(step)
        ref = q(x)
        torch.manual_seed(step)
        got = compiled(x)
        assert torch.equal(got.indices, ref.indices)
    assert bool(twin.initialized) and not twin._needs_kmeans
    torch.testing.assert_close(twin.codebook, q.codebook)


def test_needs_kmeans_follows_the_loaded_state():
    q = build_quantizer("vq", dim=4, codebook_size=16, kmeans_init=True)
    assert q._needs_kmeans
    done = build_quantizer("vq", dim=4, codebook_size=16, kmeans_init=True)
    done.initialized.fill_(True)
    q.load_state_dict(done.state_dict())
    assert not q._needs_kmeans  # a resumed run does not re-initialise its codebook
    done.initialized.fill_(False)
    q.load_state_dict(done.state_dict())
    assert q._needs_kmeans


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("k, chunk", [(16, 1), (1024, 5000), (1024, None), (300, 7000)])
def test_fused_search_path_matches_brute_force(cosine, k, chunk):
    """The accelerator / compiled search (plain addmm + argmax chunks), exercised on CPU through torch.compile."""
    from tokkit.quantizers.vq import nearest_code

    torch._dynamo.reset()
    torch.manual_seed(k)
    z, table = torch.randn(50, 8), torch.randn(k, 8)
    if cosine:
        z, table = torch.nn.functional.normalize(z, dim=-1), torch.nn.functional.normalize(table, dim=-1)
        expected = (z @ table.t()).argmax(1)
    else:
        expected = torch.cdist(z.double(), table.double()).argmin(1)
    search = torch.compile(nearest_code, fullgraph=True, backend="eager")
    assert torch.equal(search(z, table, cosine, chunk), expected)
    tie = torch.zeros(512, 2)
    tie[[7, 300, 511]] = torch.tensor([1.0, 0.0])
    assert search(torch.tensor([[1.0, 0.0]]), tie, cosine, chunk).item() == 7  # ties go to the lowest index
