"""tokkit.stream_shards: a shard set at an fsspec URL (memory://, file://) as a resumable IterableDataset."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from helpers import make_folder, make_tiny_checkpoint
from torch.utils.data import DataLoader

import tokkit
from tokkit import open_shards
from tokkit.errors import ConfigError, ShardError

fsspec = pytest.importorskip("fsspec", reason="stream_shards reads through fsspec (tokkit[data])")
pytestmark = pytest.mark.usefixtures("one_thread")
N = 11


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 images in shards of 3 (4 shards), 16 px -> 8x8 tokens."""
    from tokkit.encode import encode_dataset

    tmp = tmp_path_factory.mktemp("set")
    ck = make_tiny_checkpoint(tmp / "ck")
    encode_dataset(ck, make_folder(tmp / "img", n=N), tmp / "shards", shard_size=3, workers=0, device="cpu")
    return tmp / "shards"


@pytest.fixture
def url(shard_set: Path) -> str:
    """The shard set copied to a fresh memory:// bucket."""
    fs = fsspec.filesystem("memory")
    root = f"/s-{uuid.uuid4().hex[:8]}"
    for p in shard_set.rglob("*"):
        if p.is_file():
            fs.pipe(f"{root}/{p.relative_to(shard_set).as_posix()}", p.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def _index(shard_set: Path) -> dict[bytes, int]:
    ds = open_shards(shard_set)
    table = {ds[i][0].numpy().tobytes(): i for i in range(len(ds))}
    assert len(table) == len(ds)  # random images: every item's tokens differ, so tokens name the item
    return table


def _ids(items, table: dict[bytes, int]) -> list[int]:
    return [table[t.numpy().tobytes()] for t, _ in items]


def test_in_order_equals_open_shards(url: str, shard_set: Path) -> None:
    ds = open_shards(shard_set)
    stream = tokkit.stream_shards(url, shuffle=False)
    got = list(stream)
    assert len(got) == N and len(stream) == N
    for i, (tokens, label) in enumerate(got):
        assert torch.equal(tokens, ds[i][0]) and label == ds[i][1] and tokens.dtype == torch.int64
    assert list(tokkit.stream_shards(f"file://{shard_set}", shuffle=False))[4][1] == ds[4][1]


def test_ranks_see_every_item_once_and_resume_with_another_world_size(url: str, shard_set: Path) -> None:
    table = _index(shard_set)
    ranks = [tokkit.stream_shards(url, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    full = [_ids(r, table) for r in ranks]
    assert sorted(full[0] + full[1]) == list(range(N)) and not set(full[0]) & set(full[1])
    order = ranks[0].sampler.order(1)
    assert sorted(order.tolist()) == list(range(N)) and order.tolist() != list(range(N))
    # stop after 2 items per rank (a lockstep step boundary), save rank 0's state, resume on 3 ranks
    seen = []
    for r in range(2):
        ranks[r].set_epoch(1)
        it = iter(ranks[r])
        seen += _ids([next(it), next(it)], table)
    state = ranks[0].state_dict()
    assert state["consumed"] == 4 and state["epoch"] == 1
    rest = []
    for r in range(3):
        s = tokkit.stream_shards(url, seed=3, rank=r, world_size=3)
        s.load_state_dict(state)
        s.set_epoch(1)
        rest += _ids(s, table)
    assert sorted(seen + rest) == list(range(N)) and len(seen + rest) == N


def test_dataloader_workers_deliver_this_ranks_order(shard_set: Path) -> None:
    table = _index(shard_set)
    url = f"file://{shard_set}"  # worker processes read the files themselves (no memory:// copy to inherit)
    ref = _ids(tokkit.stream_shards(url, seed=1, rank=1, world_size=2), table)
    ds = tokkit.stream_shards(url, seed=1, rank=1, world_size=2, batch_size=2)
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    got = [table[t.numpy().tobytes()] for b in batches for t in b[0]]
    assert got == ref  # the loader's batches are this rank's share, in order
    again = tokkit.stream_shards(url, seed=1, rank=1, world_size=2, batch_size=2)
    again.load_state_dict(ds.state_dict(taken=2 * 2))  # 2 batches were taken before the stop
    rest = [table[t.numpy().tobytes()] for b in DataLoader(again, batch_size=2, num_workers=2) for t in b[0]]
    assert got[:4] + rest == ref


def test_damage_and_foreign_state_are_refused(url: str, shard_set: Path) -> None:
    other = tokkit.stream_shards(url)
    state = other.state_dict()
    state["manifest_sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="another shard set"):
        other.load_state_dict(state)
    fs = fsspec.filesystem("memory")
    path = f"{url[len('memory://'):]}/shards/shard-000002.codes.npy"
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 1
    fs.pipe(path, bytes(data))
    with pytest.raises(ShardError, match="sha256 differs"):
        list(tokkit.stream_shards(url, shuffle=False))
    with pytest.raises(ShardError, match="no manifest.json"):
        tokkit.stream_shards(url + "/nope")


def test_views_all_fixed_and_a_seeded_random_choice(tmp_path: Path) -> None:
    from tokkit.encode import encode_dataset

    ck = make_tiny_checkpoint(tmp_path / "ck")
    encode_dataset(ck, make_folder(tmp_path / "img", n=4), tmp_path / "s", shard_size=2, workers=0, device="cpu",
                   views="flip")  # fmt: skip
    ref = open_shards(tmp_path / "s", view="all")
    url = f"file://{tmp_path / 's'}"
    every = list(tokkit.stream_shards(url, shuffle=False, view="all"))
    assert every[0][0].shape == (2, 8, 8) and all(torch.equal(t, ref[i][0]) for i, (t, _) in enumerate(every))
    second = list(tokkit.stream_shards(url, shuffle=False, view=1))
    assert all(torch.equal(t, ref[i][0][1]) for i, (t, _) in enumerate(second))
    a = [t for t, _ in tokkit.stream_shards(url, shuffle=False, seed=5)]
    b = [t for t, _ in tokkit.stream_shards(url, shuffle=False, seed=5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # resumable: the choice is seeded, not drawn
    assert all(any(torch.equal(x, ref[i][0][v]) for v in range(2)) for i, x in enumerate(a))
    with pytest.raises(ShardError, match="out of range"):
        tokkit.stream_shards(url, view=2)
