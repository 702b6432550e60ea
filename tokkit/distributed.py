"""torch.distributed helpers: init from torchrun's environment, rank queries, and the ``--nproc-per-node`` relaunch.

Without torchrun's variables everything runs single-process (rank 0 of 1) and every helper is a no-op. More than one
machine: every node runs the same command with its own ``Nodes`` (``--nnodes N --node-rank R --master-addr HOST
--master-port PORT``), relaunched under torchrun's static rendezvous at node 0; the run folder (or shard set) and the
data must be at the same path on a file system that every node sees.

The relaunch is a chain ``tokkit`` (the launcher) -> torchrun -> ranks, and the chain dies as one: torchrun gets
SIGKILL when the launcher dies (Linux ``PR_SET_PDEATHSIG``), and each rank watches its parent and kills itself when
torchrun is gone (``watch_launcher``), so that ``kill -9`` of the launcher leaves no rank running.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
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
    if launched_by_torchrun():
        watch_launcher()
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


# ----------------------------------------------------------------------------------------------------------------------
# tensor collectives: no-ops in a single process (the quantizers' EMA codebooks, k-means, entropy averages use them)


def dist_ready() -> bool:
    """True when torch.distributed is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op single-process); returns ``t``."""
    if dist_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op single-process); returns ``t``."""
    if dist_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src`` (no-op single-process); returns ``t``."""
    if dist_ready():
        dist.broadcast(t, src=src)
    return t


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
                # objects of the finished run that still hold the group (a DDP reducer caught in a reference cycle)
                # are freed now, while the group is torn down in order, not at interpreter exit, where a gloo thread
                # destroyed unjoined aborts the rank ("terminate called without an active exception")
                gc.collect()
                cleanup()

    return wrapper  # type: ignore[return-value]


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DEFAULT_MASTER_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class Nodes:
    """This machine's place in a multi-machine run: torchrun's static rendezvous (``--nnodes`` ... ``--master-port``).

    Every node runs the same command with its own ``node_rank``; node 0 hosts the rendezvous at
    ``master_addr:master_port``. Global ranks are ``node_rank * nproc_per_node + local_rank``.

    Attributes:
        nnodes: machines in the run.
        node_rank: this machine's index in ``0 .. nnodes - 1``.
        master_addr: node 0's address, reachable from every node (required when ``nnodes > 1``; default 127.0.0.1).
        master_port: a free TCP port on node 0, the same on every node (default: 29500 with several nodes, a free
            local port with one).
    """

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def check(self) -> Nodes:
        """Return self, or raise ``ConfigError`` (one line saying what to pass) for values torchrun cannot use."""
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is out of range for --nnodes {self.nnodes}: give 0 .. "
                              f"{self.nnodes - 1} (0 on the machine at --master-addr)")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ConfigError(f"--master-port {self.master_port} is not a TCP port: give 1 .. 65535 (the same on "
                              "every node)")
        if self.master_addr is not None and not self.master_addr.strip():
            raise ConfigError("--master-addr is empty: give node 0's host name or IP address")
        if self.nnodes > 1 and self.master_addr is None:
            raise ConfigError(f"--nnodes {self.nnodes} needs --master-addr HOST: node 0's address, reachable from "
                              f"every node (and the same --master-port on each, default {DEFAULT_MASTER_PORT})")
        return self

    def torchrun_args(self, port: int | None = None) -> list[str]:
        """torchrun's ``--nnodes .. --master-port`` arguments; ``port``: the local default for one node."""
        default = DEFAULT_MASTER_PORT if self.nnodes > 1 else (port or free_port())
        return ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                "--master-addr", self.master_addr or "127.0.0.1", "--master-port", str(self.master_port or default)]


def torchrun_command(nproc_per_node: int, module_args: Sequence[str], port: int | None = None,
                     nodes: Nodes | None = None) -> list[str]:
    """The ``python -m torch.distributed.run ... -m tokkit <module_args>`` command line for this node.

    Args:
        nproc_per_node: processes on this node.
        module_args: the ``tokkit`` command and its arguments (without the launch options).
        port: the rendezvous port on one node (default: a free one); ``nodes.master_port`` wins.
        nodes: the multi-machine placement (default: one node).
    """
    return [
        sys.executable, "-m", "torch.distributed.run",
        *(nodes or Nodes()).torchrun_args(port), "--nproc-per-node", str(int(nproc_per_node)),
        "-m", "tokkit", *module_args,
    ]  # fmt: skip


_LAUNCHER_ENV = "TOKKIT_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1
_watching: list[int] = []


def _die_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux only; else None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # this process died before prctl took effect

    return preexec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def watch_launcher(interval_s: float = 0.5) -> None:
    """In a rank started by torchrun: kill this process (SIGKILL) as soon as torchrun or the tokkit launcher is gone.

    Without it, ``kill -9`` of the launcher (or of torchrun) leaves the ranks running, each holding its memory and GPU.
    The run state is saved as one commit, so dying at any moment loses nothing that ``--resume`` cannot redo.
    Idempotent; a no-op outside torchrun.
    """
    if not launched_by_torchrun() or _watching:
        return
    parent = os.getppid()
    launcher = int(os.environ.get(_LAUNCHER_ENV, "0") or 0)
    _watching.append(parent)

    def gone() -> bool:
        return os.getppid() != parent or (launcher > 0 and not _alive(launcher))

    def watch() -> None:
        while not gone():
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGKILL)

    if gone():
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="tokkit-launcher-watch", daemon=True).start()


def check_gpus_for(nproc_per_node: int, device: str | torch.device | None = "auto") -> None:
    """Refuse, in one line, ``nproc_per_node`` CUDA processes on a node with fewer visible GPUs (before launching)."""
    text = str(device or "auto")
    if text == "cpu" or text.startswith("cpu:") or nproc_per_node <= 1:
        return
    if text == "auto" and not torch.cuda.is_available():
        return  # auto on a machine without CUDA: every rank runs on the CPU
    if not text.startswith(("cuda", "auto")):
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < nproc_per_node:
        raise ConfigError(
            f"--nproc-per-node {nproc_per_node} needs {nproc_per_node} GPUs, but {n} visible: "
            f"lower --nproc-per-node to {max(n, 1)}, or pass --device cpu"
        )


def _option(args: Sequence[str], flag: str) -> str | None:
    args = list(args)
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _torchrun_quietly(argv: Sequence[str]) -> int:
    """torchrun (``torch.distributed.run``) without its report of failed ranks; returns the exit code.

    Each rank prints its own error (one line for a ``TokkitError``, a traceback for a bug), so torchrun's screens of
    ``ChildFailedError`` traceback and logs after it only bury that line. A rank killed by a signal printed nothing:
    that gets one line here.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(list(argv)))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        sig = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else "a signal"
        print(f"error: rank {rank} was killed by {sig} (out of memory?); run the same command with --resume to "
              "continue from the last save", file=sys.stderr)
        return 1
    except SignalException as e:  # Ctrl-C or kill: torchrun has stopped the ranks
        return 128 + int(e.sigval)
    return 0


def relaunch_under_torchrun(nproc_per_node: int, module_args: Sequence[str], device: str | None = None,
                            nodes: Nodes | None = None) -> int:
    """Run ``tokkit <module_args>`` as ``nproc_per_node`` processes under torchrun on this node; returns the exit code.

    The caller must strip the launch options (``--nproc-per-node``, ``--nnodes`` ...) from ``module_args`` (or the
    children would relaunch again). The GPU count is checked first (``device``, default: the ``--device`` in
    ``module_args``), torchrun and its ranks die with this process (see ``watch_launcher``), and a failed rank's own
    error is all that is printed. ``nodes``: this machine's place in a multi-machine run (default: one node).
    """
    if launched_by_torchrun():
        raise ConfigError("already running under torchrun: drop --nproc-per-node / --nnodes (torchrun sets the "
                          "process count)")
    nodes = (nodes or Nodes()).check()
    check_gpus_for(nproc_per_node, device or _option(module_args, "--device") or "auto")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc_per_node))))
    env[_LAUNCHER_ENV] = str(os.getpid())
    torchrun = torchrun_command(nproc_per_node, module_args, nodes=nodes)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    quiet = "import sys; from tokkit.distributed import _torchrun_quietly as t; sys.exit(t(sys.argv[1:]))"
    with subprocess.Popen([sys.executable, "-c", quiet, *torchrun[3:]], env=env,
                          preexec_fn=_die_with_this_process()) as proc:  # fmt: skip
        try:
            return proc.wait()
        except BaseException:  # Ctrl-C reached torchrun too (same process group): give it time to stop its ranks
            try:
                proc.wait(timeout=30)
            except BaseException:
                proc.kill()
            raise


__all__ = [
    "DEFAULT_MASTER_PORT",
    "DistInfo",
    "Nodes",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "barrier",
    "broadcast_",
    "broadcast_object",
    "check_gpus_for",
    "cleanup",
    "dist_ready",
    "free_port",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main",
    "launched_by_torchrun",
    "relaunch_under_torchrun",
    "torchrun_command",
    "watch_launcher",
]
