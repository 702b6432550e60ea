"""`tokkit export SHARDS --format FORMAT --out DIR`: write a shard set in a layout another codebase reads directly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli import checks
from tokkit.cli.common import JsonOpt, QuietOpt, RichReporter, handle_errors
from tokkit.cli.output import emit_facts, emit_json

# tokkit.export.list_formats() (a test keeps the two equal; this copy answers before torch is imported)
FORMATS = ("llamagen", "jsonl", "webdataset", "parquet", "mds")


def format_option(value: str) -> str:
    if value not in FORMATS:
        raise typer.BadParameter(f"unknown --format {value!r}: use one of {', '.join(FORMATS)}")
    return value


@handle_errors
def export(
    shards: Annotated[
        Path, typer.Argument(callback=checks.shard_argument, help="Shard set folder (written by tokkit encode).")
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            callback=format_option,
            help="llamagen (N.npy codes + labels), jsonl (TiTok/RAR), webdataset (.tar), parquet or mds (streaming).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", callback=checks.out_option, help="Export folder (an interrupted export resumes)."),
    ],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rewrite every output, also over another set's or format's export.")
    ] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export SHARDS to --out in --format, each file written atomically (resume: run the same command again)."""
    from tokkit.export import export_shards

    result = export_shards(shards, out, format, overwrite=overwrite, reporter=RichReporter(enabled=not quiet))
    if json_out:
        emit_json(result)
        return
    views = f", {result.views} views" if result.views > 1 else ""
    emit_facts(f"tokkit export {format} -> {result.out}", [
        ("images", f"{result.items} ({result.tokens_per_view} tokens{views})"),
        ("files", f"{result.written} written, {result.skipped} already there"),
        ("time", f"{result.seconds:.1f} s"),
    ])  # fmt: skip
