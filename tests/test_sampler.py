"""tokkit.sampler: one epoch covers every index once across ranks; mid-epoch resume with another number of ranks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import tokkit
from tokkit.errors import ConfigError
from tokkit.sampler import ShardSampler


def _ranks(n: int, world: int, **kw) -> list[ShardSampler]:
    """One sampler per simulated rank (no processes: rank and world size are explicit)."""
    return [ShardSampler(n, rank=r, world_size=world, **kw) for r in range(world)]


def _interleave(per_rank: list[list[int]]) -> list[int]:
    """Rank r's j-th sample sits at global position r + j * W: rebuild the global sequence."""
    out: list[int] = []
    for j in range(max(map(len, per_rank), default=0)):
        out += [s[j] for s in per_rank if j < len(s)]
    return out


def _take(it, k: int) -> list[int]:
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 10, 11])
def test_one_epoch_covers_every_index_once_across_ranks(n: int, world: int) -> None:
    ranks = _ranks(n, world, seed=3)
    per_rank = [list(s) for s in ranks]
    assert sorted(i for s in per_rank for i in s) == list(range(n))
    assert [len(s) for s in ranks] == [len(x) for x in per_rank]  # __len__ matches the pass (before it ran)
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1  # no padding: ranks differ by at most one
    assert _interleave(per_rank) == ranks[0].order().tolist()  # the global order does not depend on W


@pytest.mark.parametrize("world", [2, 3])
def test_drop_last_gives_equal_counts_and_skips_only_the_incomplete_round(world: int) -> None:
    per_rank = [list(s) for s in _ranks(11, world, drop_last=True)]
    assert len({len(s) for s in per_rank}) == 1
    seen = [i for s in per_rank for i in s]
    assert len(seen) == len(set(seen)) == 11 // world * world


def test_no_shuffle_is_the_identity_order() -> None:
    assert _interleave([list(s) for s in _ranks(7, 2, shuffle=False)]) == list(range(7))


@pytest.mark.parametrize(("before", "after"), [(2, 3), (2, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_mid_epoch_with_another_world_size(before: int, after: int, drop_last: bool) -> None:
    n, steps = 23, 4
    first = _ranks(n, before, seed=7, drop_last=drop_last)
    for s in first:
        s.set_epoch(5)
    its = [iter(s) for s in first]
    taken = [_take(it, steps) for it in its]  # lockstep: every rank took `steps` samples
    states = [s.state_dict() for s in first]
    assert all(st == states[0] for st in states)  # ranks agree at a step boundary
    assert states[0] == {"epoch": 5, "consumed": steps * before, "seed": 7, "shuffle": True, "length": n}
    state = json.loads(json.dumps(states[0]))  # plain JSON types

    second = _ranks(n, after, seed=7, drop_last=drop_last)
    for s in second:
        s.load_state_dict(state)
        s.set_epoch(5)  # the loop's usual call keeps the loaded position of the same epoch
    rest = [list(s) for s in second]
    seen = [i for t in taken for i in t] + [i for r in rest for i in r]
    assert len(seen) == len(set(seen))  # nothing twice
    if not drop_last:
        assert sorted(seen) == list(range(n))  # every sample exactly once
    order = ShardSampler(n, seed=7).order(5).tolist()
    assert _interleave(taken) == order[: steps * before]
    assert _interleave(rest) == order[steps * before : steps * before + len(_interleave(rest))]  # same order
    for s in second:  # a finished pass reports the whole epoch
        assert s.state_dict()["consumed"] == n


def test_epochs_differ_and_seed_epoch_repeat() -> None:
    a, b = ShardSampler(50, seed=1), ShardSampler(50, seed=1)
    a.set_epoch(0)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    b.set_epoch(1)
    assert list(b) == e1
    assert list(ShardSampler(50, seed=2)) != e0
    assert list(a) == e1  # a second pass over an epoch without set_epoch is a full pass, not an empty one


def test_set_epoch_to_a_new_epoch_resets_the_position() -> None:
    s = ShardSampler(10, seed=0)
    s.load_state_dict({"epoch": 2, "consumed": 6, "seed": 0, "shuffle": True, "length": 10})
    assert len(s) == 4
    s.set_epoch(3)
    assert len(s) == 10 and s.state_dict()["consumed"] == 0


def test_state_before_any_pass_and_after_load() -> None:
    s = ShardSampler(10, rank=1, world_size=2)
    assert s.state_dict()["consumed"] == 0
    s.load_state_dict({**s.state_dict(), "consumed": 4})
    assert s.state_dict()["consumed"] == 4 and len(s) == 3  # positions 5, 7, 9


def test_dataloader_workers0_counts_exactly_and_resumes() -> None:
    n, bs, steps = 30, 4, 3
    data = list(range(100, 100 + n))
    first = _ranks(n, 2, seed=11)
    batches = []
    for s in first:
        it = iter(DataLoader(data, batch_size=bs, sampler=s, num_workers=0))
        batches += [b.tolist() for b in _take(it, steps)]
    state = first[0].state_dict()
    assert state["consumed"] == steps * bs * 2 == first[1].state_dict()["consumed"]
    second = _ranks(n, 3, seed=11)
    rest = []
    for s in second:
        s.load_state_dict(state)
        rest += [v for b in DataLoader(data, batch_size=bs, sampler=s) for v in b.tolist()]
    seen = [v for b in batches for v in b] + rest
    assert sorted(seen) == data


def test_dataloader_with_workers_uses_the_loops_count() -> None:
    """Workers prefetch: the sampler has drawn more than the loop took; ``taken`` gives the loop's position."""
    n, bs = 40, 2
    s = ShardSampler(n, seed=0, rank=0, world_size=1)
    loader = DataLoader(list(range(n)), batch_size=bs, sampler=s, num_workers=1, prefetch_factor=4)
    it = iter(loader)
    got = [v for b in _take(it, 3) for v in b.tolist()]
    assert s.state_dict()["consumed"] >= 3 * bs  # drawn ahead (exact value depends on timing)
    state = s.state_dict(taken=3 * bs)
    del it
    assert state["consumed"] == 3 * bs
    r = ShardSampler(n, seed=0)
    r.load_state_dict(state)
    assert sorted(got + list(r)) == list(range(n))


def test_with_open_shards(tmp_path: Path) -> None:
    from helpers import make_folder, make_tiny_checkpoint

    from tokkit.encode import encode_dataset

    ck = make_tiny_checkpoint(tmp_path / "ck")
    encode_dataset(ck, make_folder(tmp_path / "data", n=10), tmp_path / "sh", shard_size=4, workers=0, device="cpu")
    ds = tokkit.open_shards(tmp_path / "sh")
    assert len(ds) == 10
    samplers = [tokkit.ShardSampler(ds, rank=r, world_size=2, seed=0) for r in range(2)]
    loaders = [iter(DataLoader(ds, batch_size=2, sampler=s)) for s in samplers]
    first = [next(it) for it in loaders]  # one lockstep step on each rank
    state = samplers[0].state_dict()
    assert state["consumed"] == 4 and state["length"] == 10
    assert first[0][0].shape == (2, 8, 8) and first[0][0].dtype == torch.int64
    resumed = tokkit.ShardSampler(ds, seed=0)  # one rank now
    resumed.load_state_dict(state)
    seen = samplers[0].order()[:4].tolist() + list(resumed)
    assert sorted(seen) == list(range(10))
    resumed.load_state_dict(state)  # the pass above ran to its end: the next one would be the full epoch
    tokens = torch.cat([b[0] for b in first] + [b[0] for b in DataLoader(ds, batch_size=3, sampler=resumed)])
    order = samplers[0].order().tolist()
    expect = torch.stack([ds[order[p]][0] for p in [0, 2, 1, 3, *range(4, 10)]])
    assert torch.equal(tokens, expect)  # rank 0: positions 0, 2; rank 1: 1, 3; then 4..9 in the global order


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"length": 11}, "length 11"),
        ({"seed": 1}, "seed 1"),
        ({"shuffle": False}, "shuffle False"),
        ({"consumed": 11}, "outside"),
        ({"consumed": -1}, "outside"),
        ({"epoch": "x"}, "not a ShardSampler state"),
    ],
)
def test_bad_state_is_refused_in_one_line(change: dict, match: str) -> None:
    s = ShardSampler(10, seed=0)
    with pytest.raises(ConfigError, match=match) as e:
        s.load_state_dict({**s.state_dict(), **change})
    assert "\n" not in str(e.value)


def test_missing_key_and_bad_rank_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs epoch, consumed"):
        ShardSampler(10).load_state_dict({"epoch": 0})
    with pytest.raises(ConfigError, match="rank 2 of world_size 2"):
        ShardSampler(10, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="taken"):
        s = ShardSampler(10)
        iter(s).__next__()
        s.state_dict(taken=-1)


def test_defaults_without_torch_distributed() -> None:
    s = ShardSampler(np.arange(5))
    assert (s.rank, s.world_size) == (0, 1) and len(s) == 5 and Counter(s) == Counter(range(5))


def test_rank_and_world_default_to_torch_distributed() -> None:
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # CPU, in-process
    try:
        s = ShardSampler(6, seed=0)
        assert (s.rank, s.world_size) == (0, 1) and len(s) == 6
        assert ShardSampler(6, rank=1, world_size=2).rank == 1  # explicit values win
    finally:
        dist.destroy_process_group()
