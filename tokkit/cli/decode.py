"""`tokkit decode CHECKPOINT TOKENS --out DIR`: token shards (or a .npy of ids) -> PNG images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli.common import BatchSizeOpt, CheckpointArg, DeviceOpt, RichReporter, console, handle_errors


@handle_errors
def decode(
    checkpoint: CheckpointArg,
    tokens: Annotated[Path, typer.Argument(help="Shard set folder (tokkit encode) or a .npy of token ids.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files (one per item).")],
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="Decode only the first N.")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png with every decoded image.")] = False,
    view: Annotated[int, typer.Option("--view", help="Which stored view to decode.")] = 0,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = "auto",
) -> None:
    """Decode token ids back into images: one PNG per item, named after its source key (ranges checked up front)."""
    from tokkit.decode import decode_tokens

    res = decode_tokens(
        checkpoint, tokens, out, limit=limit, grid=grid, view=view, batch_size=batch_size, device=device,
        reporter=RichReporter(),
    )  # fmt: skip
    console.print(f"decoded {res.count} images -> {res.out}" + (f" (grid: {res.grid})" if res.grid else ""))
