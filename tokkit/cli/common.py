"""Pieces every command shares: option aliases defined once, error handling, and the progress reporters.

Nothing here imports torch: a command checks its paths and values (``tokkit.cli.checks``) before it imports the
library, so that a mistake is reported at once.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tokkit.cli import checks
from tokkit.errors import TokkitError
from tokkit.progress import IntervalReporter, Reporter

console = Console()
err_console = Console(stderr=True)

# ---- option aliases: one definition each, the same name, short flag and default on every command that has it ----
DeviceOpt = Annotated[
    str, typer.Option("--device", callback=checks.device_option, help="auto, cpu, cuda or cuda:N (also mps, xpu).")
]
WeightsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights-dir",
        envvar="TOKKIT_WEIGHTS_DIR",
        help="Folder with pretrained metric/loss weights (InceptionV3, AlexNet, LPIPS); env TOKKIT_WEIGHTS_DIR.",
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", min=1, show_default=False, help="Images per batch [default: the library's]."),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", "-j", min=0, show_default=False,
        help="DataLoader worker processes [default: the library's; any value is capped at the CPU cores - 1].",
    ),
]  # fmt: skip
NumImagesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-images",
        "-n",
        min=1,
        show_default=False,
        help="Use N images [default: all]: decode the first N; bench N spread evenly over the set (always the same).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress (notes and the result still print).")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout (nothing else on stdout).")
]
NprocOpt = Annotated[
    int, typer.Option("--nproc-per-node", min=1, help="Processes on this node; >1 relaunches under torchrun.")
]
# more than one machine: every node runs the same command with its own --node-rank (torchrun's static rendezvous);
# checked in one line by ``launch`` (``tokkit.distributed.Nodes.check``), not by typer's range checks
NnodesOpt = Annotated[
    int, typer.Option("--nnodes", help="Machines in the run, each running this command; >1 relaunches under torchrun.")
]
NodeRankOpt = Annotated[
    int, typer.Option("--node-rank", help="This machine's index, 0 .. --nnodes - 1 (0 on the --master-addr machine).")
]
MasterAddrOpt = Annotated[
    str | None,
    typer.Option("--master-addr", help="Node 0's address, reachable from every node (needed with --nnodes > 1)."),
]
MasterPortOpt = Annotated[
    int | None,
    typer.Option(
        "--master-port", show_default=False,
        help="Free TCP port on node 0, the same on every node [default: 29500 with --nnodes > 1, else a free one].",
    ),
]  # fmt: skip
CheckpointArg = Annotated[
    Path,
    typer.Argument(
        callback=checks.checkpoint_argument, help="Checkpoint folder (model.safetensors + config.json) or run folder."
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # [x] is text
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn a ``TokkitError`` into one line on stderr and exit 2; Ctrl-C into exit 130. Bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TokkitError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            msg = "interrupted; finished work is kept: run the same command again (tokkit train: with --resume)"
            raise fail(msg, 130) from None

    return wrapper  # type: ignore[return-value]


def launch(
    args: list[str], nproc_per_node: int, nnodes: int, node_rank: int, master_addr: str | None, master_port: int | None
) -> None:
    """Check the launch options (one line each), then relaunch ``tokkit <args>`` under torchrun when more than one
    process is asked for (raising ``typer.Exit`` with its code); return to run in this process otherwise.

    Args:
        args: the command and its arguments, without the launch options.
        nproc_per_node, nnodes, node_rank, master_addr, master_port: the options of the same names.
    """
    from tokkit import distributed as tdist

    nodes = tdist.Nodes(nnodes, node_rank, master_addr, master_port).check()
    if nproc_per_node > 1 or nnodes > 1:
        raise typer.Exit(tdist.relaunch_under_torchrun(nproc_per_node, args, nodes=nodes))


def library_default(fn: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of library function ``fn`` (the CLI's defaults are the library's)."""
    return inspect.signature(fn).parameters[name].default


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def cap_workers(requested: int) -> int:
    """DataLoader workers at most the cores left to each local process, minus the one that runs the model.

    More workers than cores only slows loading down and makes PyTorch warn once per DataLoader.
    """
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(0, min(requested, usable_cores() // local - 1))


class RichReporter(Reporter):
    """A rich progress bar with live fields (loss, PSNR, img/s ...) in a terminal; plain lines every few seconds
    (``$TOKKIT_PROGRESS_INTERVAL``, see ``tokkit.progress.IntervalReporter``) when stderr is a file or a pipe.

    ``enabled=False`` (``--quiet``) hides progress; messages still print.
    """

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or err_console
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: Any = None
        self._t0 = 0.0
        self._plain: IntervalReporter | None = None
        if enabled and not self.console.is_terminal:
            self._plain = IntervalReporter(stream=self.console.file)

    def start(self, description: str, total: int | None) -> None:
        self.stop()
        if not self.enabled:
            return
        if self._plain is not None:
            self._plain.start(description, total)
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, info="")
        self._t0 = time.perf_counter()

    def advance(self, completed: int, **fields: float | int | str) -> None:
        if self._plain is not None:
            self._plain.advance(completed, **fields)
        if self._progress is None:
            return
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self._progress.update(self._task, completed=completed, info=info)

    def message(self, text: str) -> None:
        (self._progress.console if self._progress is not None else self.console).print(
            text, highlight=False, soft_wrap=True
        )

    def stop(self) -> None:
        if self._plain is not None:
            self._plain.stop()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fmt(v: float | int | str) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
