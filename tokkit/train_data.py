"""Training data: a deterministic, resumable batch order, seeded augmentation, the held-out batch, the loader.

The order is a seeded permutation per epoch split across ranks (``BatchPlan``); an item's random crop/flip is seeded by
(seed, epoch, index) (``SeededItems``), so a resumed run sees exactly the batches an uninterrupted one would, whatever
the number of DataLoader workers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tokkit.data import ImageDataset, ImageSource, collate_skip_bad, open_source, to_float
from tokkit.errors import ConfigError, DataError

MAX_AUTO_WORKERS = 8


class SeededItems(Dataset):
    """Item ``(epoch, i)`` = ``ImageDataset[i]`` with its random crop/flip drawn from a seed of (seed, epoch, i)."""

    def __init__(self, dataset: ImageDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 7_919 + i) % (2**63))
            return self.dataset[i]


class BatchPlan:
    """Batches of (epoch, index) keys for one rank: a seeded permutation per epoch, split across ranks."""

    def __init__(self, indices: list[int], batch_size: int, rank: int, world: int, seed: int) -> None:
        self.indices, self.batch_size, self.rank, self.world, self.seed = indices, batch_size, rank, world, seed
        per_rank = max(len(indices), batch_size * world) // world
        self.batches_per_epoch = max(1, per_rank // batch_size)

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 7_777 + epoch)
        order = [self.indices[j] for j in torch.randperm(len(self.indices), generator=g).tolist()]
        need = self.batches_per_epoch * self.batch_size * self.world
        order = (order * math.ceil(need / len(order)))[:need]  # tiny datasets: repeat
        mine = order[self.rank :: self.world]
        return [[(epoch, i) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]
                for b in range(self.batches_per_epoch)]

    def from_position(self, consumed: int):
        """Every batch from the ``consumed``-th on, forever."""
        epoch, offset = divmod(consumed, self.batches_per_epoch)
        while True:
            yield from self.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


def split_held_out(source: ImageSource, eval_images: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): the held-out images leave the training set when the set is large enough."""
    n = len(source)
    g = torch.Generator().manual_seed(seed + 12_345)
    perm = torch.randperm(n, generator=g).tolist()
    held = sorted(perm[: min(eval_images, n)])
    if n >= 4 * eval_images:
        held_set = set(held)
        return [i for i in range(n) if i not in held_set], held
    return list(range(n)), held


def load_eval_batch(source: ImageSource, indices: list[int], resolution: int) -> Tensor:
    ds = ImageDataset(source, resolution, train=False)
    batch = collate_skip_bad([ds[i] for i in indices])
    if batch["images"].shape[0] == 0:
        raise DataError(f"none of the {len(indices)} held-out images of {source.root} could be read")
    return to_float(batch["images"])  # (B, 3, r, r) in [-1, 1]


def data_spec(data: str | Path) -> str:
    """``data`` as recorded in run.json: ``sample``, or an absolute path (``FILE.npz:KEY`` keeps its key)."""
    text = str(data)
    if text == "sample":
        return text
    if ".npz:" in text and not Path(text).exists():
        path, key = text.rsplit(":", 1)
        return f"{Path(path).expanduser().resolve()}:{key}"
    return str(Path(text).expanduser().resolve())


def check_data(
    kind: str, given: str | Path | None, recorded: str | None, fingerprint: str | None, new_data: bool
) -> tuple[str | None, ImageSource | None]:
    """The data a resumed run continues on, and its source: the recorded one unless another is given (and allowed)."""
    flag = "--data" if kind == "data" else "--eval-data"
    recorded = None if recorded is None else data_spec(recorded)  # records before absolute paths: from this folder
    if given is None:
        if recorded is None:
            return None, None
        try:
            source = open_source(recorded)
        except DataError as e:
            raise DataError(f"{e}; this run's {kind} is gone: pass {flag} with where it is now") from None
        if fingerprint and source.fingerprint() != fingerprint and not new_data:
            raise ConfigError(f"this run's {kind} {recorded} changed since it was recorded (other files): "
                              "pass --new-data to continue on it as it is now")
        return recorded, source
    spec, source = data_spec(given), open_source(given)
    same = spec == recorded or (fingerprint is not None and source.fingerprint() == fingerprint)
    if not same and not new_data:
        was = recorded if recorded is not None else "images held out of --data"
        raise ConfigError(f"this run was trained on {kind} {was}, not {spec}: leave out {flag} to continue on the "
                          "same, or pass --new-data to switch")
    return spec, source


def resolve_workers(num_workers: int, device: torch.device) -> int:
    """``train.num_workers`` as a count: -1 (auto) is ``min(8, cores per process - 1)`` on CUDA and 0 on the CPU.

    On the CPU the step and the workers share the cores; the sample presets (32 px, one thread) measured no faster
    with workers, so auto keeps decoding in the training process there.
    """
    if num_workers >= 0:
        return num_workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


def make_loader(
    items: SeededItems, plan: BatchPlan, consumed: int, num_workers: int, device: torch.device
) -> DataLoader:
    """The training batches from the ``consumed``-th on: workers kept alive and prefetching, pinned memory on CUDA."""
    workers = resolve_workers(num_workers, device)
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(items, batch_sampler=plan.from_position(consumed), collate_fn=collate_skip_bad,
                      num_workers=workers, pin_memory=device.type == "cuda", **extra)


def to_device(images: Tensor, device: torch.device) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1] on ``device``; the bytes cross (asynchronously)."""
    return to_float(images.to(device, non_blocking=True))


__all__ = ["BatchPlan", "SeededItems", "check_data", "data_spec", "load_eval_batch", "make_loader", "resolve_workers",
           "split_held_out", "to_device"]
