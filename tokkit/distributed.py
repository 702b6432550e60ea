"""torch.distributed helpers: init from torchrun's environment, rank queries, and the ``--nproc-per-node`` relaunch.

Without torchrun's variables everything runs single-process (rank 0 of 1) and every helper is a no-op.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tokkit.errors import ConfigError
from tokkit.runtime import resolve_device

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on this node), on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes files)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) is present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device: str | torch.device | None = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialize torch.distributed from torchrun's environment (gloo on CPU, nccl on CUDA), or stay single-process.

    Args:
        device: ``auto``, ``cpu``, ``cuda``; under torchrun on CUDA each rank takes ``cuda:LOCAL_RANK``.
        timeout_s: collective timeout.

    Returns:
        This process's ``DistInfo``. Calling it again when already initialized returns the same info.
    """
    dev = resolve_device(device)
    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(0, 1, 0, dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ConfigError(f"local rank {local} has no GPU ({n} visible): lower --nproc-per-node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local, dev)


def get_rank() -> int:
    """This process's rank (0 single-process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 single-process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 or single-process."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every rank (identity single-process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Destroy the process group if one was initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def owns_process_group(fn: F) -> F:
    """Decorator: when the call initializes torch.distributed itself, tear the group down before returning.

    On success every rank first waits at a barrier, so that no rank exits (closing its gloo/nccl connections) while
    another is still inside a collective; a rank that exits early can otherwise make its peer abort (SIGABRT).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        owns = not (dist.is_available() and dist.is_initialized())
        finished = False
        try:
            result = fn(*args, **kwargs)
            finished = True
            return result
        finally:
            if owns and dist.is_available() and dist.is_initialized():
                if finished:
                    barrier()
                cleanup()

    return wrapper  # type: ignore[return-value]


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc_per_node: int, module_args: Sequence[str], port: int | None = None) -> list[str]:
    """The ``python -m torch.distributed.run ... -m tokkit <module_args>`` command line for one node."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(int(nproc_per_node)),
        "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()),
        "-m", "tokkit", *module_args,
    ]  # fmt: skip


def relaunch_under_torchrun(nproc_per_node: int, module_args: Sequence[str]) -> int:
    """Run ``tokkit <module_args>`` as ``nproc_per_node`` processes under torchrun on this node; returns the exit code.

    The caller must strip ``--nproc-per-node`` from ``module_args`` (or the children would relaunch again).
    """
    if launched_by_torchrun():
        raise ConfigError("already running under torchrun: drop --nproc-per-node (torchrun sets the process count)")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc_per_node))))
    return subprocess.call(torchrun_command(nproc_per_node, module_args), env=env)


__all__ = [
    "DistInfo",
    "barrier",
    "broadcast_object",
    "cleanup",
    "free_port",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main",
    "launched_by_torchrun",
    "relaunch_under_torchrun",
    "torchrun_command",
]
