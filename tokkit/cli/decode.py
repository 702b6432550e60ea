"""`tokkit decode CHECKPOINT TOKENS --out DIR`: token shards (or a .npy of ids) -> PNG images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli import checks
from tokkit.cli.common import (
    BatchSizeOpt,
    CheckpointArg,
    DeviceOpt,
    JsonOpt,
    NumImagesOpt,
    QuietOpt,
    RichReporter,
    handle_errors,
    library_default,
)
from tokkit.cli.output import emit_json


@handle_errors
def decode(
    checkpoint: CheckpointArg,
    tokens: Annotated[
        Path,
        typer.Argument(callback=checks.shard_argument, help="Shard set folder (tokkit encode) or a .npy of token ids."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", callback=checks.out_option, help="Folder for the PNG files (one per item).")
    ],
    num_images: NumImagesOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, hidden=True)] = None,  # the old spelling
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png with every decoded image.")] = False,
    view: Annotated[int, typer.Option("--view", min=0, help="Which stored view to decode.")] = 0,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Decode token ids back into images: one PNG per item, named after its source key (ranges checked up front)."""
    from tokkit.decode import decode_tokens

    res = decode_tokens(
        checkpoint, tokens, out, limit=num_images if num_images is not None else limit, grid=grid, view=view,
        batch_size=batch_size or library_default(decode_tokens, "batch_size"), device=device,
        reporter=RichReporter(enabled=not quiet),
    )  # fmt: skip
    if json_out:
        emit_json({"out": res.out, "count": res.count, "grid": res.grid, "files": res.files})
        return
    typer.echo(f"decoded {res.count} images -> {res.out}" + (f" (grid: {res.grid})" if res.grid else ""))
