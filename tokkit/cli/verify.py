"""`tokkit verify SHARDS`: re-hash every shard file against the manifest; exit 1 on any mismatch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli.common import RichReporter, console, err_console, handle_errors


@handle_errors
def verify(shards: Annotated[Path, typer.Argument(help="Shard set folder (written by tokkit encode).")]) -> None:
    """Check every shard file's size and sha256 against manifest.json; names each mismatch."""
    from tokkit.shards import verify as verify_shards

    res = verify_shards(shards, reporter=RichReporter())
    for problem in res.problems:
        err_console.print(f"[bold red]mismatch:[/] {problem}", highlight=False, soft_wrap=True)
    if not res.ok:
        err_console.print(f"{len(res.problems)} problem(s) in {shards}: re-run tokkit encode (with --overwrite)")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {res.shards} shards, {res.files} files, {res.bytes} bytes match the manifest")
