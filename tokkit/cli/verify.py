"""`tokkit verify SHARDS`: check a shard set completely (manifest, commit markers, files, contents); exit 1 on any
problem, naming the command that repairs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli.common import RichReporter, console, err_console, handle_errors


@handle_errors
def verify(shards: Annotated[Path, typer.Argument(help="Shard set folder (written by tokkit encode).")]) -> None:
    """Check manifest.json, every commit marker and every shard file (size, sha256, header, ids); names each problem."""
    from tokkit.shards import verify as verify_shards

    res = verify_shards(shards, reporter=RichReporter())
    for problem in res.problems:
        err_console.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if not res.ok:
        err_console.print(
            f"{len(res.problems)} problem(s) in {shards}; repair with: {res.repair}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {res.shards} shards, {res.files} files, {res.bytes} bytes match the manifest")
