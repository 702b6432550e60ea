"""A resumable, rank-aware sampler for map-style datasets (``tokkit.open_shards``): every sample once per epoch.

The epoch's **global order** is a permutation of ``range(N)`` seeded by ``(seed, epoch)`` (the identity without
``shuffle``); it does not depend on the number of ranks. The state is one number per epoch, ``consumed``: the global
position in that order up to which samples have been handed out across all ranks. Rank ``r`` of ``W`` takes positions
``consumed + r, consumed + r + W, ...``, so one pass of all ranks takes every remaining position exactly once, and a
job that resumes from ``consumed`` with another ``W`` continues the same global order on the next sample.

Tail: without ``drop_last`` nothing is padded or repeated; when ``N - consumed`` is not a multiple of ``W`` the last
round is incomplete and ranks ``>= (N - consumed) % W`` get one sample fewer (DDP needs equal step counts: use
``drop_last`` or a ``DataLoader(drop_last=True)`` batch size that divides the shares). With ``drop_last`` that
incomplete round (fewer than ``W`` samples) is skipped this epoch, so every rank gets the same count.

Lockstep: a rank knows only its own progress, so ``state_dict`` computes ``consumed = start + taken * W`` from the
``taken`` samples this rank has drawn since the pass began. That is the global position when every rank has taken
the same number, i.e. at a step boundary of a lockstep (DDP) loop; save the state of rank 0 there (in the last,
uneven round rank 0's value is the right one). A ``DataLoader`` with ``num_workers > 0`` draws indices ahead of the
loop (prefetch), so pass ``taken`` (e.g. ``batches_done * batch_size``) instead of relying on the sampler's count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from tokkit.errors import ConfigError

STATE_KEYS = ("epoch", "consumed", "seed", "shuffle", "length")


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Indices of one rank's share of each epoch, resumable mid-epoch with any number of ranks.

    Use it as ``DataLoader(ds, sampler=sampler, ...)`` (no ``shuffle=``); call ``set_epoch(e)`` before each epoch;
    save ``state_dict()`` with the training state and give it to ``load_state_dict`` on resume. See the module
    docstring for the order, the tail and the lockstep rule.

    Args:
        dataset_or_len: the dataset (anything with ``len``) or its length ``N``.
        shuffle: a fresh permutation per epoch (seeded by ``(seed, epoch)``); otherwise ``0 .. N-1``.
        seed: the permutation seed, the same on every rank.
        rank: this rank; default ``torch.distributed``'s when initialized, else 0.
        world_size: number of ranks; default ``torch.distributed``'s when initialized, else 1.
        drop_last: skip the last incomplete round (fewer than ``world_size`` samples) so ranks get equal counts.

    Raises:
        ConfigError: a negative length, ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """

    def __init__(
        self,
        dataset_or_len: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ):
        super().__init__()
        n = dataset_or_len if isinstance(dataset_or_len, int) else len(dataset_or_len)
        if n < 0:
            raise ConfigError(f"dataset length must be >= 0, got {n}")
        d_rank, d_world = _dist_rank_world()
        world = d_world if world_size is None else int(world_size)
        rk = d_rank if rank is None else int(rank)
        if world < 1 or not 0 <= rk < world:
            raise ConfigError(f"need 0 <= rank < world_size, got rank {rk} of world_size {world}")
        self.length, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = rk, world, bool(drop_last)
        self.epoch = 0
        self._start = 0  # where the next pass begins (set by load_state_dict, reset by a new epoch or a full pass)
        self._pass_start: int | None = None  # start of the pass in progress (None: no pass began since the reset)
        self._taken = 0  # samples this rank's pass has yielded
        self._done = False  # the pass in progress ran to its end

    # ------------------------------------------------------------------------------------------ order

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The global order of ``epoch`` (default the current one): (N,) int64, the same on every rank."""
        e = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return np.arange(self.length, dtype=np.int64)
        return np.random.default_rng([self.seed, e]).permutation(self.length).astype(np.int64)

    def _end(self, start: int) -> int:
        """The global position where a pass from ``start`` stops (N, or the last complete round with drop_last)."""
        if not self.drop_last:
            return self.length
        return start + (self.length - start) // self.world_size * self.world_size

    def __len__(self) -> int:
        """This rank's number of samples in the next pass."""
        return len(range(self._start + self.rank, self._end(self._start), self.world_size))

    def __iter__(self) -> Iterator[int]:
        start = self._start
        self._pass_start, self._taken, self._done = start, 0, False
        order = self.order() if self.shuffle else None
        for p in range(start + self.rank, self._end(start), self.world_size):
            self._taken += 1
            yield int(order[p]) if order is not None else p
        self._done, self._start = True, 0  # a second pass over the same epoch is a full one, as with torch samplers

    # ------------------------------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its permutation); a new epoch starts at position 0, the current one keeps its position.

        So ``load_state_dict(state)`` followed by ``set_epoch(state["epoch"])`` resumes mid-epoch.
        """
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self._start, self._pass_start, self._taken, self._done = epoch, 0, None, 0, False

    def consumed(self, taken: int | None = None) -> int:
        """The global position reached (see the module docstring): ``start + taken * world_size``, at most N.

        Args:
            taken: samples this rank's loop has taken since the pass began; default the sampler's own count (exact
                with ``num_workers=0``). A pass that ran to its end, or a ``drop_last`` pass whose complete rounds are
                all taken, counts as the whole epoch (N).
        """
        if self._pass_start is None:
            return self._start
        if taken is None and self._done:
            return self.length
        k = self._taken if taken is None else int(taken)
        if k < 0:
            raise ConfigError(f"taken must be >= 0, got {k}")
        pos = self._pass_start + k * self.world_size
        return self.length if pos >= self._end(self._pass_start) else pos

    def state_dict(self, taken: int | None = None) -> dict[str, Any]:
        """``{"epoch", "consumed", "seed", "shuffle", "length"}``: plain ints and a bool (JSON / ``torch.save`` safe).

        Args:
            taken: see ``consumed``; pass it with ``num_workers > 0`` (the loader draws indices ahead).
        """
        return {
            "epoch": self.epoch,
            "consumed": self.consumed(taken),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "length": self.length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``, possibly written with another number of ranks).

        Raises:
            ConfigError: the state is malformed or was written for another dataset length, seed or shuffle setting.
        """
        try:
            got = {k: state[k] for k in STATE_KEYS}
            epoch, consumed = int(got["epoch"]), int(got["consumed"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a ShardSampler state (needs {', '.join(STATE_KEYS)}): {e!r}") from None
        mine = {"length": self.length, "seed": self.seed, "shuffle": self.shuffle}
        differ = [f"{k} {got[k]!r} (this sampler: {v!r})" for k, v in mine.items() if got[k] != v]
        if differ:
            raise ConfigError(f"sampler state was saved for another dataset or order: {'; '.join(differ)}")
        if not 0 <= consumed <= self.length:
            raise ConfigError(f"sampler state: consumed {consumed} outside [0, {self.length}]")
        self.epoch, self._start, self._pass_start, self._taken, self._done = epoch, consumed, None, 0, False


__all__ = ["ShardSampler"]
