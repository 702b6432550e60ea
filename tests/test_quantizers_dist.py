"""Two CPU processes (gloo): k-means initialisation, EMA statistics, dead-code restarts and LFQ entropy averages are
shared, so both ranks hold identical codebooks although each rank sees different data."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokkit.quantizers import LFQ, VQ
from tokkit.quantizers.lfq import lfq_entropies

WORLD = 2
CENTERS = torch.tensor([[4.0, 0.0], [-4.0, 0.0]])  # rank r's data lies around CENTERS[r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_data(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    pts = CENTERS[rank] + 0.1 * torch.randn(48, 2, generator=g)  # (N, 2)
    return pts.t().reshape(1, 2, 6, 8)  # (1, D=2, 6, 8)


def _lfq_data(rank: int) -> torch.Tensor:
    return torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(50 + rank)) + rank


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        result = {}
        for key, kwargs in {
            "ema": {"ema": True, "dead_code_threshold": 0.5},
            "loss": {"ema": False},
            "cosine": {"ema": True, "cosine": True, "dead_code_threshold": 0.9},
        }.items():
            torch.manual_seed(0)  # same initial weights (as DDP would broadcast them)
            q = VQ(dim=2, codebook_size=2, kmeans_init=True, kmeans_iters=5, **kwargs)
            torch.manual_seed(100 + rank)  # different random streams per rank: restarts must still agree
            with torch.no_grad():
                q(_rank_data(rank, 0))
                result[f"{key}/after_kmeans"] = q.codebook.detach().clone()
                for step in range(1, 4):
                    q(_rank_data(rank, step))
            result[f"{key}/state"] = {k: v.detach().clone() for k, v in q.state_dict().items()}
        torch.manual_seed(0)
        lfq = LFQ(dim=6, codebook_size=2**6, temperature=0.5)
        out = lfq(_lfq_data(rank))
        result["lfq/codebook_entropy"] = out.stats["codebook_entropy"]
        result["lfq/per_sample_entropy"] = out.stats["per_sample_entropy"]
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_hold_identical_codebooks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for key in ("ema", "loss", "cosine"):
        for name, value in r0[f"{key}/state"].items():
            assert torch.equal(value, r1[f"{key}/state"][name]), f"{key}: {name} differs between ranks"
        assert torch.equal(r0[f"{key}/after_kmeans"], r1[f"{key}/after_kmeans"])
    # k-means saw both ranks' data: one code per rank's cluster, although every seed came from rank 0
    init = r0["ema/after_kmeans"]
    dist_to_centers = torch.cdist(CENTERS, init)
    assert dist_to_centers.min(1).values.max() < 0.5, init

    # LFQ: the codebook entropy uses the batch-mean probabilities averaged over ranks = the full batch's entropy
    torch.manual_seed(0)
    lfq = LFQ(dim=6, codebook_size=2**6, temperature=0.5)
    z = torch.cat([_lfq_data(r) for r in range(WORLD)]).movedim(1, -1).reshape(-1, 6)  # (N, bits)
    _, full = lfq_entropies(z * 4 / 0.5, lfq.group_bits, distributed=False)
    torch.testing.assert_close(r0["lfq/codebook_entropy"], full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1["lfq/codebook_entropy"], full, rtol=1e-5, atol=1e-6)
    assert not torch.equal(r0["lfq/per_sample_entropy"], r1["lfq/per_sample_entropy"])  # local terms stay local
