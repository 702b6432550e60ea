"""Family tests: FSQ bounding and table, LFQ entropy against brute force and bit helpers, VQ features, residual
stacking, usage statistics against brute-force counts."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokkit.errors import ConfigError
from tokkit.quantizers import (
    FSQ,
    LFQ,
    VQ,
    CodebookUsage,
    ResidualQuantizer,
    bits_to_indices,
    build_quantizer,
    indices_to_bits,
    levels_for,
    split_indices,
)
from tokkit.quantizers.base import batch_usage_stats, entropy_bits
from tokkit.quantizers.lfq import group_sizes, lfq_entropies, merge_indices
from tokkit.quantizers.vq import nearest_code, rotation_trick

# ----------------------------------------------------------------------------------------------------------------------
# FSQ


@pytest.mark.parametrize(
    "size,levels",
    [(2**8, [8, 6, 5]), (2**10, [8, 5, 5, 5]), (2**12, [7, 5, 5, 5, 5]), (2**14, [8, 8, 8, 6, 5]),
     (2**16, [8, 8, 8, 5, 5, 5])],
)  # fmt: skip
def test_fsq_levels_table(size, levels):
    assert levels_for(size) == levels
    q = FSQ(dim=4, codebook_size=size)
    assert q.levels == levels and q.codebook_size == math.prod(levels)
    assert abs(math.log2(q.codebook_size) - math.log2(size)) < 0.1  # the table is approximately 2^n codes


def test_fsq_levels_for_unknown_size():
    with pytest.raises(ConfigError, match="no FSQ levels"):
        levels_for(1000)


@pytest.mark.parametrize("levels", list(range(2, 17)))
def test_fsq_every_level_reachable_and_zero_centered(levels):
    q = FSQ(dim=1, levels=[levels])
    z = torch.linspace(-12, 12, 20001).view(1, 1, -1)  # (B, D, T)
    out = q(z)
    half = levels // 2
    expected = torch.arange(-half, levels - half) / half  # -(L//2) .. (L-1)//2, normalized
    assert torch.equal(out.codes.unique(), expected)
    assert torch.equal(out.indices.unique(), torch.arange(levels))
    assert q(torch.zeros(1, 1, 1)).codes.item() == 0.0  # the atanh shift keeps 0 at 0 for even levels too
    assert torch.equal(q.indices_to_codes(out.indices), out.codes)
    assert q.level_usage(out.indices).item() == 1.0


@pytest.mark.parametrize("levels", [[3, 4, 2], [8, 6, 5], [2, 2, 2, 2]])
def test_fsq_mixed_radix_is_a_bijection(levels):
    q = FSQ(dim=len(levels), levels=levels)
    k = q.codebook_size
    all_idx = torch.arange(k)
    codes = q.indices_to_levels(all_idx)  # (K, d)
    assert codes.unique(dim=0).shape[0] == k
    # latents whose bounded value is exactly each code: invert tanh(z + shift) * h - offset
    z = torch.atanh((codes * q._half_width + q._offset) / q._half_l) - q._shift  # (K, d)
    out = q(z.t().unsqueeze(0))  # (1, d, K)
    assert torch.equal(out.indices[0], all_idx)
    # digit of channel 0 is the least significant
    digits = [(int(i) // math.prod(levels[:c])) % levels[c] for i in all_idx for c in range(len(levels))]
    expected = (torch.tensor(digits).view(k, -1) - torch.tensor([lv // 2 for lv in levels])).float()
    assert torch.equal(codes * q._half_width, expected)


def test_fsq_projection_zero_loss_and_gradient():
    q = FSQ(dim=16, levels=[8, 5, 5, 5])
    assert isinstance(q.project_in, torch.nn.Linear) and q.project_in.out_features == 4
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    out = q(x)
    assert out.loss.item() == 0.0
    out.codes.sum().backward()
    assert x.grad.abs().sum() > 0
    usage = q.level_usage(torch.tensor([0, 1, 2 + 8 * 3]))  # digits (0,0,0,0), (1,0,0,0), (2,3,0,0)
    torch.testing.assert_close(usage, torch.tensor([3 / 8, 2 / 5, 1 / 5, 1 / 5]))


def test_fsq_bad_arguments():
    with pytest.raises(ConfigError, match="empty"):
        FSQ(dim=4, levels=[])
    with pytest.raises(ConfigError, match=">= 2"):
        FSQ(dim=4, levels=[5, 1])
    with pytest.raises(ConfigError, match="levels"):
        FSQ(dim=4)
    with pytest.raises(ConfigError, match="codebook_size"):
        FSQ(dim=4, levels=[5, 5], codebook_size=64)


# ----------------------------------------------------------------------------------------------------------------------
# LFQ


def brute_force_entropies(z: torch.Tensor, scale: float, temperature: float, groups: list[int]):
    """Per-sample entropy, joint codebook entropy and grouped codebook entropy over all 2^K codes (float64)."""
    k = z.shape[1]
    bits = torch.tensor(list(itertools.product([0, 1], repeat=k)), dtype=torch.float64)  # (2^K, K), bit 0 is MSB
    codes = (bits * 2 - 1) * scale
    probs = torch.softmax(2 * z.double() @ codes.t() / temperature, dim=-1)  # (N, 2^K)
    per_sample = -(torch.special.xlogy(probs, probs)).sum(-1).mean()
    avg = probs.mean(0)
    joint = -(torch.special.xlogy(avg, avg)).sum()
    grouped, start = 0.0, 0
    for g in groups:
        weights = 2 ** torch.arange(g - 1, -1, -1)
        gid = (bits[:, start : start + g].long() * weights).sum(-1)  # each code's index inside the group
        marginal = torch.zeros(2**g, dtype=torch.float64).index_add_(0, gid, avg)
        grouped = grouped - torch.special.xlogy(marginal, marginal).sum()
        start += g
    return per_sample, joint, grouped


@pytest.mark.parametrize("bits", [1, 4, 7, 10])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_lfq_entropy_matches_brute_force(bits, temperature):
    torch.manual_seed(bits)
    z = torch.randn(64, bits, dtype=torch.float64) * 0.2
    ps_bf, joint_bf, _ = brute_force_entropies(z, 1.0, temperature, [bits])
    per_sample, codebook = lfq_entropies(z * 4 / temperature, [bits])  # one group: exact
    torch.testing.assert_close(per_sample, ps_bf, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(codebook, joint_bf, rtol=1e-9, atol=1e-9)


def test_lfq_grouped_codebook_entropy_is_sum_of_group_marginals_and_an_upper_bound():
    torch.manual_seed(0)
    z = torch.randn(128, 8, dtype=torch.float64) * 0.3
    z[:, 4] = z[:, 0]  # correlated bits across groups: the grouped value is then strictly above the joint one
    groups = group_sizes(8, 3)
    assert groups == [3, 3, 2]
    _, joint_bf, grouped_bf = brute_force_entropies(z, 1.0, 0.5, groups)
    _, grouped = lfq_entropies(z * 4 / 0.5, groups)
    torch.testing.assert_close(grouped, grouped_bf, rtol=1e-9, atol=1e-9)
    assert grouped > joint_bf + 1e-3


@pytest.mark.parametrize("spherical", [False, True])
def test_lfq_module_entropy_stats_and_loss(spherical):
    torch.manual_seed(0)
    bits, t = 6, 0.05
    q = LFQ(dim=bits, codebook_size=2**bits, temperature=t, spherical=spherical, entropy_weight=0.1, gamma=1.0)
    x = torch.randn(4, bits, 3, 3)
    out = q(x)
    z = x.movedim(1, -1).reshape(-1, bits)  # (N, bits)
    if spherical:
        z = F.normalize(z, dim=-1)
    ps_bf, joint_bf, _ = brute_force_entropies(z, q.scale, t, [bits])
    torch.testing.assert_close(out.stats["per_sample_entropy"].double(), ps_bf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.stats["codebook_entropy"].double(), joint_bf, rtol=1e-4, atol=1e-5)
    codes = torch.where(z > 0, q.scale, -q.scale)
    expected = 0.1 * (ps_bf - joint_bf) + 0.25 * F.mse_loss(z, codes).double()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-5)
    if spherical:
        torch.testing.assert_close(out.codes.norm(dim=1), torch.ones(4, 3, 3))


def test_lfq_index_is_msb_first_and_stats():
    q = LFQ(dim=4, codebook_size=16)
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, 2.0]]).t().unsqueeze(0)  # (1, 4, 2): bits 1011, 0001
    out = q(x)
    assert out.indices.tolist() == [[0b1011, 0b0001]]
    assert out.stats["bit_balance"].tolist() == [0.5, 0.0, 0.5, 1.0]
    assert out.stats["dead_bits"].item() == 2.0
    torch.testing.assert_close(q.indices_to_codes(out.indices), torch.sign(x))


def test_lfq_bit_balance_brute_force():
    torch.manual_seed(3)
    q = LFQ(dim=5, codebook_size=32)
    x = torch.randn(3, 5, 4, 4)
    out = q(x)
    expected = (x > 0).float().mean(dim=(0, 2, 3))
    torch.testing.assert_close(out.stats["bit_balance"], expected)


def test_lfq_entropy_warmup_multiplier():
    q = LFQ(dim=4, codebook_size=16, entropy_warmup_steps=4, entropy_warmup_multiplier=5.0)
    seen = []
    for _ in range(6):
        seen.append(q.entropy_multiplier())
        q(torch.randn(1, 4, 2))
    assert seen == [5.0, 4.0, 3.0, 2.0, 1.0, 1.0]
    q.eval()
    q(torch.randn(1, 4, 2))
    assert int(q.step) == 6  # eval forwards do not advance the warm-up


def test_lfq_large_codebooks_never_materialize():
    q = LFQ(dim=32, codebook_size=2**32)
    assert q.group_bits == [8, 8, 8, 8] and q.index_dtype == np.dtype(np.int64)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    out = q(x)
    assert int(out.indices.max()) < 2**32
    (out.codes.sum() + out.loss).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(q.indices_to_codes(out.indices), out.codes)


def test_bits_helpers_round_trip():
    idx = torch.tensor([0, 1, 5, 2**18 - 1, 123456])
    bits = indices_to_bits(idx, 18)
    assert bits.shape == (5, 18) and bits.dtype == torch.int64
    assert bits[2].tolist() == [0] * 15 + [1, 0, 1]  # MSB first
    assert torch.equal(bits_to_indices(bits), idx)
    assert torch.equal(bits_to_indices(bits.bool()), idx)
    groups = split_indices(idx, [9, 9])
    assert groups.shape == (5, 2)
    assert groups[4].tolist() == [123456 >> 9, 123456 & 511]
    assert torch.equal(merge_indices(groups, [9, 9]), idx)
    assert torch.equal(split_indices(idx, [6, 6, 6])[..., 1], (idx >> 6) & 63)


def test_lfq_bad_arguments():
    with pytest.raises(ConfigError, match="power of two"):
        LFQ(dim=4, codebook_size=1000)
    with pytest.raises(ConfigError, match="int64"):
        LFQ(dim=4, codebook_size=2**63)
    with pytest.raises(ConfigError, match="temperature"):
        LFQ(dim=4, codebook_size=16, temperature=0)
    with pytest.raises(ConfigError, match="splits"):
        split_indices(torch.tensor([1]), [])
    with pytest.raises(ConfigError, match="integer"):
        indices_to_bits(torch.tensor([1.0]), 4)


# ----------------------------------------------------------------------------------------------------------------------
# VQ


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("k", [16, 300, 1024])
@pytest.mark.parametrize("chunk", [1, 5000, None])
def test_vq_chunked_search_matches_brute_force(cosine, k, chunk):
    torch.manual_seed(k)
    z, table = torch.randn(500, 8), torch.randn(k, 8)
    if cosine:
        z, table = F.normalize(z, dim=-1), F.normalize(table, dim=-1)
        expected = (z @ table.t()).argmax(1)
    else:
        expected = torch.cdist(z.double(), table.double()).argmin(1)
    assert torch.equal(nearest_code(z, table, cosine, chunk), expected)


def test_vq_search_memory_stays_bounded():
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    q = VQ(dim=8, codebook_size=4096, cosine=True, search_chunk=2**14)
    x = torch.randn(2, 8, 32, 32)  # N = 2048 tokens: a full score matrix would be 2048 x 4096 floats = 32 MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        q(x)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= 2**20, f"an op allocated {largest} bytes"


def test_vq_search_ties_go_to_the_lowest_index():
    table = torch.zeros(512, 2)
    table[[7, 300, 511]] = torch.tensor([1.0, 0.0])
    assert nearest_code(torch.tensor([[1.0, 0.0]]), table, cosine=True).item() == 7
    assert nearest_code(torch.tensor([[1.0, 0.0]]), table, cosine=False).item() == 7


def test_vq_low_dim_lookup_projection():
    q = VQ(dim=32, codebook_size=16384, codebook_dim=8, cosine=True)
    assert q.codebook.shape == (16384, 8)
    assert q.project_in.in_features == 32 and q.project_in.out_features == 8
    out = q(torch.randn(2, 32, 4, 4))
    assert out.codes.shape == (2, 32, 4, 4) and int(out.indices.max()) < 16384
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(16384))


def test_vq_ema_update_matches_formula():
    torch.manual_seed(0)
    q = VQ(dim=2, codebook_size=4, decay=0.9, eps=1e-5)
    table0 = q.codebook.clone()
    x = torch.randn(1, 2, 10)
    out = q(x)
    z = x[0].t()  # (N, 2)
    idx = torch.cdist(z, table0).argmin(1)
    assert torch.equal(out.indices[0], idx)
    counts = torch.bincount(idx, minlength=4).float()
    sums = torch.zeros(4, 2).index_add_(0, idx, z)
    cluster = 0.9 * torch.ones(4) + 0.1 * counts
    embed_avg = 0.9 * table0 + 0.1 * sums
    n = cluster.sum()
    smoothed = (cluster + 1e-5) / (n + 4 * 1e-5) * n
    torch.testing.assert_close(q.cluster_size, cluster)
    torch.testing.assert_close(q.codebook, embed_avg / smoothed[:, None])
    q.eval()
    before = q.codebook.clone()
    q(x)
    assert torch.equal(q.codebook, before)  # eval forwards never update


def test_vq_kmeans_init_finds_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    z = centers.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 2)
    q = VQ(dim=2, codebook_size=4, kmeans_init=True, kmeans_iters=10)
    assert not bool(q.initialized)
    q(z.t().unsqueeze(0))
    assert bool(q.initialized)
    dist = torch.cdist(centers, q.codebook)
    assert dist.min(1).values.max() < 0.2  # every center has a code next to it


def _rows_matched(codes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(K, d), (N, d) -> (K,) index of the row of ``z`` that code k equals bit for bit, or -1 (exact, no distances)."""
    same = (codes[:, None, :] == z[None, :, :]).all(-1)  # (K, N)
    return torch.where(same.any(1), same.int().argmax(1), -1)


def test_vq_dead_code_restart_from_current_outputs():
    torch.manual_seed(0)
    q = VQ(dim=3, codebook_size=16, decay=0.1, dead_code_threshold=0.5)  # one unused step makes a code dead
    x = torch.randn(1, 3, 32)
    out = q(x)
    z = x[0].t()  # (N, 3)
    used = torch.zeros(16, dtype=torch.bool)
    used[out.indices.unique()] = True
    assert 0 < int((~used).sum()) <= z.shape[0]  # fewer dead codes than rows: every one is restarted this step
    assert out.stats["dead_codes"] == 0
    rows = _rows_matched(q.codebook, z)
    # the restarted codes are exactly the unused ones, each a copy of a current encoder output
    assert torch.equal(rows >= 0, ~used)
    assert rows[~used].unique().numel() == int((~used).sum())  # distinct rows
    assert torch.all(q.cluster_size[~used] == 0.5) and torch.all(q.cluster_size[used] >= 0.9)
    assert torch.equal(q.embed_avg[~used], q.codebook[~used] * 0.5)


def test_vq_dead_code_restart_draws_distinct_rows():
    """Without replacement: duplicate codes would tie exactly and leave the winner to the hardware's rounding."""
    torch.manual_seed(0)
    q = VQ(dim=3, codebook_size=64, decay=0.1, dead_code_threshold=0.5)
    gen = torch.Generator().manual_seed(1)
    ever_restarted = torch.zeros(64, dtype=torch.bool)
    ever_used = torch.zeros(64, dtype=torch.bool)
    dead_at_start = None
    for step in range(10):
        x = torch.randn(1, 3, 8, generator=gen)  # 8 rows, many more dead codes
        out = q(x)
        rows = _rows_matched(q.codebook, x[0].t())
        restarted = rows >= 0
        # one code per row, each row used once: 8 distinct codes from 8 distinct rows
        assert int(restarted.sum()) == 8, step
        assert sorted(rows[restarted].tolist()) == list(range(8)), step
        assert torch.all(q.cluster_size[restarted] == 0.5)
        if dead_at_start is None:
            dead_at_start = ~restarted & (q.cluster_size < 0.5)
            assert out.stats["dead_codes"] == int(dead_at_start.sum()) > 8
        else:
            ever_used[out.indices.unique()] = True
        ever_restarted |= restarted
    # the least used dead codes go first, so every code dead after the first step was restarted (or came back to use)
    assert torch.all((ever_restarted | ever_used)[dead_at_start])
    assert int(ever_restarted[dead_at_start].sum()) > 16
    assert len({tuple(r) for r in q.codebook.tolist()}) == 64  # no duplicate codes


def test_vq_loss_learned_codebook_gets_gradient():
    q = VQ(dim=4, codebook_size=8, ema=False, commitment_weight=0.25, codebook_weight=1.0)
    assert isinstance(q.codebook, torch.nn.Parameter)
    x = torch.randn(2, 4, 5)
    out = q(x)
    z = x.movedim(1, -1).reshape(-1, 4)
    codes = q.codebook[out.indices.reshape(-1)].detach()
    torch.testing.assert_close(out.loss, 1.25 * F.mse_loss(z, codes))
    out.loss.backward()
    assert q.codebook.grad[out.indices.unique()].abs().sum() > 0


def test_rotation_trick_value_and_jacobian():
    torch.manual_seed(0)
    e = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 5, dtype=torch.float64)
    out = rotation_trick(e, q)
    assert torch.equal(out, q)
    jac = torch.autograd.functional.jacobian(lambda v: rotation_trick(v, q), e).reshape(5, 5)
    scale = q.norm() / e.detach().norm()
    rot = jac / scale
    torch.testing.assert_close(rot @ rot.t(), torch.eye(5, dtype=torch.float64))  # orthogonal
    torch.testing.assert_close(jac @ e.detach()[0], q[0])  # maps e onto q
    assert torch.linalg.det(rot) > 0  # a rotation, not a reflection


def test_vq_rotation_trick_changes_gradients_not_values():
    torch.manual_seed(0)
    st = VQ(dim=4, codebook_size=16)
    rot = VQ(dim=4, codebook_size=16, rotation_trick=True)
    rot.load_state_dict(st.state_dict())
    x = torch.randn(2, 4, 6)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    os_, or_ = st.eval()(xs), rot.eval()(xr)
    assert torch.equal(os_.codes, or_.codes)
    g = torch.randn_like(x)
    (os_.codes * g).sum().backward()
    (or_.codes * g).sum().backward()
    assert not torch.allclose(xs.grad, xr.grad)


def test_vq_groups_share_one_codebook():
    torch.manual_seed(0)
    q = VQ(dim=8, codebook_size=32, groups=4).eval()
    assert q.num_groups == 4 and q.codebook.shape == (32, 2)
    x = torch.randn(2, 8, 3, 3)
    out = q(x)
    assert out.indices.shape == (2, 3, 3, 4)
    heads = x.movedim(1, -1).reshape(2, 3, 3, 4, 2)  # (B, H, W, G, D/G)
    expected = torch.cdist(heads.reshape(-1, 2), q.codebook).argmin(1).view(2, 3, 3, 4)
    assert torch.equal(out.indices, expected)
    assert q.bits_per_token == 4 * 5


def test_vq_bad_arguments():
    with pytest.raises(ConfigError, match="divide"):
        VQ(dim=6, codebook_size=8, groups=4)
    with pytest.raises(ConfigError, match="codebook_size"):
        VQ(dim=6, codebook_size=0)
    with pytest.raises(ConfigError, match="decay"):
        VQ(dim=6, codebook_size=8, decay=1.5)
    with pytest.raises(ConfigError, match="G"):
        VQ(dim=6, codebook_size=8, groups=2).indices_to_codes(torch.zeros(1, 3, 3, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------------------
# residual


def test_residual_stacks_stages_on_the_residual():
    torch.manual_seed(0)
    stages = [{"name": "vq", "codebook_size": 64, "ema": False}, {"name": "fsq", "levels": [5] * 4}]
    stages = json.loads(json.dumps(stages))  # configs carry the stages as JSON
    q = build_quantizer("residual", dim=4, stages=stages).eval()
    assert isinstance(q, ResidualQuantizer) and q.num_groups == 2
    assert q.codebook_size == 625 and q.bits_per_token == pytest.approx(6 + math.log2(625))
    x = torch.randn(2, 4, 3, 3)
    out = q(x)
    assert out.indices.shape == (2, 3, 3, 2)
    first = q.stages[0](x)
    second = q.stages[1](x - first.codes)
    assert torch.equal(out.indices[..., 0], first.indices) and torch.equal(out.indices[..., 1], second.indices)
    assert torch.equal(out.codes, first.codes + second.codes)
    assert torch.equal(q.indices_to_codes(out.indices), out.codes)
    assert set(out.stats) >= {"stage0/perplexity", "stage1/batch_usage", "perplexity"}


def test_residual_accepts_modules_and_rejects_bad_stages():
    q = ResidualQuantizer(dim=4, stages=[VQ(dim=4, codebook_size=8), LFQ(dim=4, codebook_size=16)])
    assert q(torch.randn(1, 4, 5)).indices.shape == (1, 5, 2)
    with pytest.raises(ConfigError, match="non-empty"):
        ResidualQuantizer(dim=4, stages=[])
    with pytest.raises(ConfigError, match="dim"):
        ResidualQuantizer(dim=4, stages=[VQ(dim=3, codebook_size=8)])
    with pytest.raises(ConfigError, match="groups"):
        ResidualQuantizer(dim=4, stages=[{"name": "vq", "codebook_size": 8, "groups": 2}])
    with pytest.raises(ConfigError, match="name"):
        ResidualQuantizer(dim=4, stages=[{"codebook_size": 8}])
    with pytest.raises(ConfigError, match="unknown quantizer"):
        ResidualQuantizer(dim=4, stages=[{"name": "nope"}])
    with pytest.raises(ConfigError, match="bad arguments"):
        ResidualQuantizer(dim=4, stages=[{"name": "vq", "bogus": 1, "codebook_size": 8}])


# ----------------------------------------------------------------------------------------------------------------------
# usage statistics


def brute_force_usage(idx: np.ndarray, k: int) -> dict:
    counts = np.array([(idx == c).sum() for c in range(k)])
    p = counts[counts > 0] / idx.size
    ent = float(-(p * np.log2(p)).sum())
    return {"used": int((counts > 0).sum()), "usage": (counts > 0).sum() / k, "perplexity": 2**ent, "entropy": ent}


def test_codebook_usage_matches_brute_force():
    rng = np.random.default_rng(0)
    k = 50
    usage = CodebookUsage(k)
    batches = [rng.integers(0, 30, size=(4, 3, 3)) for _ in range(5)] + [torch.tensor([[49, 49]])]
    for b in batches:
        usage.update(b)
    all_idx = np.concatenate([np.asarray(b).reshape(-1) for b in batches])
    bf = brute_force_usage(all_idx, k)
    got = usage.compute()
    assert got["used"] == bf["used"] and got["total"] == all_idx.size
    assert got["usage"] == pytest.approx(bf["usage"])
    assert got["entropy_bits"] == pytest.approx(bf["entropy"])
    assert got["perplexity"] == pytest.approx(bf["perplexity"])
    assert usage.counts()[0] == np.bincount(all_idx).max()
    # the sparse counter (K beyond the dense limit) agrees
    sparse = CodebookUsage(2**32)
    for b in batches:
        sparse.update(b)
    assert sparse.compute()["entropy_bits"] == pytest.approx(bf["entropy"])
    assert entropy_bits(np.bincount(all_idx)) == pytest.approx(bf["entropy"])
    with pytest.raises(ValueError):
        usage.update(torch.tensor([k]))


@pytest.mark.parametrize("k", [50, 2**20])  # dense count and sort paths
def test_batch_usage_stats_matches_brute_force(k):
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 50, size=(8, 8))
    stats = batch_usage_stats(torch.from_numpy(idx), k)
    bf = brute_force_usage(idx.reshape(-1), 50)
    assert stats["perplexity"].item() == pytest.approx(bf["perplexity"], rel=1e-5)
    assert stats["batch_usage"].item() == pytest.approx(bf["used"] / k)
