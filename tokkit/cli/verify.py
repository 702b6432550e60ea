"""`tokkit verify SHARDS`: check a shard set completely (manifest, commit markers, files, contents); exit 1 on any
problem, naming the command that repairs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli import checks
from tokkit.cli.common import JsonOpt, QuietOpt, RichReporter, console, err_console, handle_errors
from tokkit.cli.output import emit_json


@handle_errors
def verify(
    shards: Annotated[
        Path, typer.Argument(callback=checks.shard_argument, help="Shard set folder (written by tokkit encode).")
    ],
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Check manifest.json, every commit marker and every shard file (size, sha256, header, ids); names each problem."""
    from tokkit.shards import verify as verify_shards

    res = verify_shards(shards, reporter=RichReporter(enabled=not quiet))
    if json_out:
        emit_json({"ok": res.ok, **{k: v for k, v in vars(res).items()}})
    else:
        for problem in res.problems:
            err_console.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if not res.ok:
        err_console.print(
            f"{len(res.problems)} problem(s) in {shards}; repair with: {res.repair}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1)
    if not json_out:
        console.print(
            f"[green]ok[/]: {res.shards} shards, {res.files} files, {res.bytes} bytes match the manifest",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
