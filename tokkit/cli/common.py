"""Pieces every command shares: option aliases defined once, error handling, and the rich progress reporter."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tokkit.errors import TokkitError
from tokkit.progress import Reporter

console = Console()
err_console = Console(stderr=True)

# ---- option aliases (one definition, reused by every command) ----
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
WeightsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights-dir",
        envvar="TOKKIT_WEIGHTS_DIR",
        help="Folder with pretrained metric/loss weights (InceptionV3, AlexNet, LPIPS); env TOKKIT_WEIGHTS_DIR.",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help="DataLoader worker processes.")]
NprocOpt = Annotated[
    int, typer.Option("--nproc-per-node", min=1, help="Processes on this node; >1 relaunches under torchrun.")
]
CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint folder (model.safetensors + config.json).")]

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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


class RichReporter(Reporter):
    """A ``Reporter`` that draws a rich progress bar with live fields (loss, PSNR, img/s ...) and prints messages."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or err_console
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: Any = None
        self._t0 = 0.0

    def start(self, description: str, total: int | None) -> None:
        self.stop()
        if not self.enabled:
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
        if self._progress is None:
            return
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self._progress.update(self._task, completed=completed, info=info)

    def message(self, text: str) -> None:
        (self._progress.console if self._progress is not None else self.console).print(text, highlight=False)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fmt(v: float | int | str) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
