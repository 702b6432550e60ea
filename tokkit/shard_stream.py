"""``stream_shards(url)``: a token shard set at any fsspec URL as a resumable, rank- and worker-aware IterableDataset.

Where ``open_shards`` memory-maps a local set, ``stream_shards`` reads one shard file at a time through fsspec
(``s3://``, ``gs://``, ``hf://``, ``https://``, ``file://``, a local path ...), checks it against the manifest's
sha256 and range-checks its ids, and keeps two shards per process. It yields ``(tokens int64, label)`` as
``ShardDataset`` does: tokens (*index_shape), or (V, *index_shape) with ``view="all"``.

Order: an epoch's global order is the same on every rank: the shards in a seeded permutation, each shard's rows in a
seeded permutation (``shuffle=False``: item order), so that a process reads each shard once per epoch instead of
seeking across the set. Ranks take positions round-robin from it exactly as ``ShardSampler`` does (it is the same
code), so that every item is seen exactly once per epoch across ranks, and ``state_dict`` / ``load_state_dict``
resume mid-epoch, also with another number of ranks (the lockstep rule of ``tokkit.sampler`` applies).

DataLoader workers: worker ``k`` of ``K`` takes this rank's positions in blocks of ``batch_size``, block ``b`` going
to worker ``b % K``. A DataLoader built with the same ``batch_size`` collects batches from its workers in that same
round-robin order, so that its ``t``-th batch is this rank's ``t``-th block: the batches a loop has taken are a prefix
of this rank's share, and ``state_dict(taken=batches_done * batch_size)`` is exact with any number of workers. The
dataset copy in each worker does its own counting: pass ``taken`` whenever ``num_workers > 0``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tokkit.errors import ConfigError, DataError, ShardError
from tokkit.sampler import ShardSampler
from tokkit.shards import FORMAT, MANIFEST, SHARD_DIR, check_manifest, expected_facts, shard_file_name


class _ShardMajorSampler(ShardSampler):
    """``ShardSampler`` whose shuffled order keeps each shard's rows together (shards and rows each permuted)."""

    def __init__(self, sizes: list[int], **kwargs: Any) -> None:
        super().__init__(int(sum(sizes)), **kwargs)
        self._starts = np.cumsum([0, *sizes])[:-1]
        self._sizes = list(sizes)

    def order(self, epoch: int | None = None) -> np.ndarray:
        e = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return np.arange(self.length, dtype=np.int64)
        rng = np.random.default_rng([self.seed, e])
        parts = [self._starts[k] + rng.permutation(self._sizes[k]) for k in rng.permutation(len(self._sizes))]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class StreamingShards(IterableDataset):
    """The items of a shard set at ``url``, streamed shard by shard (see the module docstring).

    Args:
        url: the shard set folder, as an fsspec URL or a local path.
        view: ``random`` (a view chosen per item, seeded by ``(seed, epoch, item)``), an index, or ``all``.
        shuffle: shuffle shards and rows each epoch (seeded by ``(seed, epoch)``).
        seed: the order seed, the same on every rank.
        batch_size: the DataLoader's batch size (blocks handed to workers); 1 when iterating by hand.
        rank: this rank; default ``torch.distributed``'s when initialized, else 0.
        world_size: number of ranks; default ``torch.distributed``'s when initialized, else 1.
        drop_last: skip the last incomplete round so that ranks get equal counts.

    Raises:
        ShardError: no manifest at ``url``, not a complete ``tokkit-shards/1`` set, or an inconsistent manifest.
        DataError: a missing fsspec backend (one line naming the package).
    """

    def __init__(
        self,
        url: str,
        *,
        view: str | int = "random",
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        from tokkit.data.remote import filesystem

        super().__init__()
        self.url = str(url).rstrip("/")
        self._fs, self._root = filesystem(self.url)
        try:
            raw = self._fs.cat_file(posixpath.join(self._root, MANIFEST))
        except (OSError, ValueError) as e:
            raise ShardError(f"no {MANIFEST} at {self.url} ({type(e).__name__}): not a tokkit shard set") from None
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise ShardError(f"{self.url}/{MANIFEST} is not JSON: not a tokkit shard set") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ShardError(f"{self.url}/{MANIFEST} is not a {FORMAT} manifest")
        if not manifest.get("complete"):
            raise ShardError(f"{self.url} is incomplete: finish it with the same tokkit encode")
        problems = check_manifest(manifest)
        if problems:
            raise ShardError(f"{self.url}: {problems[0]}; run tokkit verify on a local copy")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.manifest = manifest
        self.num_views = int(manifest.get("views", {}).get("count", 1))
        if isinstance(view, int) and not 0 <= view < self.num_views:
            raise ShardError(f"view {view} out of range: {self.url} stores {self.num_views} view(s)")
        if not isinstance(view, int) and view not in ("random", "all"):
            raise ShardError(f"view must be 'random', 'all' or an index, got {view!r}")
        self.view, self.batch_size = view, batch_size
        self._axis = bool(manifest.get("views", {}).get("axis", False))
        self._limit = int(expected_facts(manifest)["limit"])
        self._shards = [s for s in manifest["shards"] if s["n"] > 0]
        self._starts = np.cumsum([0] + [int(s["n"]) for s in self._shards])
        self.sampler = _ShardMajorSampler([int(s["n"]) for s in self._shards], shuffle=shuffle, seed=seed,
                                          rank=rank, world_size=world_size, drop_last=drop_last)  # fmt: skip
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        """This rank's items in the next pass."""
        return len(self.sampler)

    # ------------------------------------------------------------------------------------------ reading

    def _file(self, shard: dict[str, Any], part: str) -> bytes:
        name = shard_file_name(int(shard["id"]), part)
        try:
            data = self._fs.cat_file(posixpath.join(self._root, SHARD_DIR, name))
        except (OSError, ValueError) as e:
            raise ShardError(f"cannot read {self.url}/{SHARD_DIR}/{name}: {type(e).__name__}: {e}") from None
        want = shard.get("files", {}).get(part, {}).get("sha256")
        if want and hashlib.sha256(data).hexdigest() != want:
            raise ShardError(f"{self.url}/{SHARD_DIR}/{name}: sha256 differs from the manifest (damaged or replaced)")
        return data

    def _shard(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, labels) of non-empty shard ``j`` (two kept per process)."""
        hit = self._cache.get(j)
        if hit is not None:
            self._cache.move_to_end(j)
            return hit
        s = self._shards[j]
        codes = np.load(io.BytesIO(self._file(s, "codes")), allow_pickle=False)
        labels = np.load(io.BytesIO(self._file(s, "labels")), allow_pickle=False)
        if len(codes) != s["n"] or len(labels) != s["n"]:
            raise ShardError(f"{self.url}: shard {s['id']} holds {len(codes)} rows, the manifest says {s['n']}")
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= self._limit):
            raise ShardError(f"{self.url}: shard {s['id']} holds a token id outside [0, {self._limit})")
        self._cache[j] = (codes, labels)
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return codes, labels

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        """Item ``i`` of the set (global numbering, as ``open_shards``): ``(tokens int64, label)``."""
        j = int(np.searchsorted(self._starts, i, side="right") - 1)
        codes, labels = self._shard(j)
        row = i - int(self._starts[j])
        tokens = codes[row]
        if self._axis and self.view != "all":
            if self.view == "random":
                v = int(np.random.default_rng([self.sampler.seed, self.sampler.epoch, int(i)]).integers(self.num_views))
            else:
                v = int(self.view)
            tokens = tokens[v]
        return torch.from_numpy(np.array(tokens, dtype=np.int64)), int(labels[row])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, i in enumerate(self.sampler):  # j: position in this rank's share; block j // B -> worker
            if (j // self.batch_size) % workers == worker:
                yield self.item(i)

    # ------------------------------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (call before iterating; see ``ShardSampler.set_epoch``)."""
        self.sampler.set_epoch(epoch)

    def state_dict(self, taken: int | None = None) -> dict[str, Any]:
        """``ShardSampler``'s state plus the manifest's sha256 (a state is refused by another shard set).

        Args:
            taken: items this rank's loop has taken this pass; required with DataLoader workers.
        """
        sampler = self.sampler
        if taken is not None and sampler._pass_start is None:  # the pass ran in DataLoader workers, from the start
            sampler._pass_start = sampler._start
        return {**sampler.state_dict(taken), "manifest_sha256": self.manifest.get("manifest_sha256")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (possibly written with another number of ranks).

        Raises:
            ConfigError: a state of another shard set, length, seed or shuffle setting.
        """
        mine = self.manifest.get("manifest_sha256")
        if state.get("manifest_sha256", mine) != mine:
            raise ConfigError(f"stream state was saved for another shard set (manifest sha256 differs from {self.url})")
        self.sampler.load_state_dict(state)


def stream_shards(url: str, **kwargs: Any) -> StreamingShards:
    """A shard set at an fsspec URL (or a local path) as a resumable IterableDataset; see ``StreamingShards``.

    Example::

        ds = tokkit.stream_shards("s3://bucket/shards", batch_size=64, seed=0)
        loader = DataLoader(ds, batch_size=64, num_workers=4)
        ds.load_state_dict(saved)                       # resume mid-epoch (any number of ranks)
        for step, (tokens, labels) in enumerate(loader):
            ...
            saved = ds.state_dict(taken=(step + 1) * 64)
    """
    try:
        return StreamingShards(url, **kwargs)
    except TypeError as e:
        raise DataError(f"stream_shards: {e}") from None


__all__ = ["StreamingShards", "stream_shards"]
