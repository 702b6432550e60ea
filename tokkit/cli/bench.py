"""`tokkit bench`: rFID, LPIPS, PSNR/SSIM and codebook usage of checkpoints, with results.json, report.md and PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tokkit.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    RichReporter,
    WeightsDirOpt,
    WorkersOpt,
    console,
    err_console,
    handle_errors,
)


@handle_errors
def bench(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoint folders (or run folders holding checkpoint/); one row each.")
    ],
    data: Annotated[str, typer.Option("--data", "-d", help="Images: folder, .zip, .txt list, .npy/.npz or 'sample'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, report.md and PNGs.")] = Path(
        ".bench_out"
    ),
    num_images: Annotated[
        int | None, typer.Option("--num-images", "-n", min=1, help="Use the first N images (default: all).")
    ] = None,
    metrics: Annotated[
        str, typer.Option("--metrics", "-m", help="Comma-separated subset of rfid,lpips,psnr,ssim,usage.")
    ] = "rfid,lpips,psnr,ssim,usage",
    weights_dir: WeightsDirOpt = None,
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="LPIPS backbone: alex or vgg.")] = "alex",
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Benchmark tokenizer checkpoints on the same images under a written protocol.

    Offline without the InceptionV3 / AlexNet weights, rFID and LPIPS are reported as unavailable (with the file to
    put where) and the other metrics still run.
    """
    from tokkit.bench import bench as run_bench
    from tokkit.report import notes, summary_rows

    reporter = _Reporter(enabled=not quiet)
    result = run_bench(
        checkpoints,
        data,
        out=out,
        num_images=num_images,
        batch_size=batch_size,
        metrics=[m for m in metrics.split(",") if m.strip()],
        weights_dir=weights_dir,
        lpips_net=lpips_net,
        device=device,
        workers=workers,
        reporter=reporter,
    )
    headers, rows = summary_rows(result)
    table = Table(title=f"tokkit bench: {result.results[0].protocol['num_images']} images", show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in notes(result):
        if line in reporter.said:  # already printed when it happened
            continue
        err_console.print(f"[yellow]note:[/] {line}", highlight=False, soft_wrap=True)
    console.print(f"results: {result.files['results']}  report: {result.files['report']}", highlight=False)


class _Reporter(RichReporter):
    """Remembers the notes it printed, so the summary does not repeat them."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled=enabled)
        self.said: set[str] = set()

    def message(self, text: str) -> None:
        self.said.add(text)
        super().message(text)
