"""`tokkit bench`: rFID, LPIPS, PSNR/SSIM and codebook usage of checkpoints, with results.json, report.md and PNGs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli import checks
from tokkit.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    MasterAddrOpt,
    MasterPortOpt,
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    NumImagesOpt,
    QuietOpt,
    RichReporter,
    WeightsDirOpt,
    WorkersOpt,
    cap_workers,
    err_console,
    handle_errors,
    launch,
    library_default,
)
from tokkit.cli.output import emit_json, emit_table

# tokkit.bench.METRICS and tokkit.metrics.LPIPS_NETS, here without loading torch (a test keeps them equal)
METRICS = ("rfid", "lpips", "psnr", "ssim", "usage")
LPIPS_NETS = ("alex", "vgg")
# tokkit.protocols.PROTOCOLS' names, here without loading torch (a test keeps them equal)
PROTOCOLS = ("tokkit", "llamagen", "maskbit", "open-magvit2", "titok")


def _protocol_option(value: str) -> str:
    if value not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {value!r}; choose one of: {', '.join(PROTOCOLS)}")
    return value


def _metrics_option(value: str) -> str:
    wanted = [m.strip() for m in value.split(",") if m.strip()]
    bad = sorted(set(wanted) - set(METRICS))
    if bad or not wanted:
        raise typer.BadParameter(f"unknown metrics {', '.join(bad) or '(none)'}; choose from: {', '.join(METRICS)}")
    return value


def _lpips_net_option(value: str) -> str:
    if value not in LPIPS_NETS:
        raise typer.BadParameter(f"unknown LPIPS net {value!r}; choose one of: {', '.join(LPIPS_NETS)}")
    return value


@handle_errors
def bench(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            callback=checks.checkpoint_argument,
            help="Checkpoint folders (or run folders holding checkpoint/); one row each.",
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data", "-d", callback=checks.data_option, help="Images: folder, .zip, .txt list, .npy/.npz or 'sample'."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", callback=checks.out_option, help="Folder for results.json, report.md and PNGs."),
    ] = Path(".bench_out"),
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            "-p",
            callback=_protocol_option,
            help="Evaluation protocol: " + ", ".join(PROTOCOLS) + " (resize/crop, resolution, reference; see README).",
        ),
    ] = "tokkit",
    ref_stats: Annotated[
        Path | None,
        typer.Option(
            "--ref-stats",
            help="FID reference statistics .npz: read when it exists (tokkit's, or mu/sigma from pytorch-fid / ADM / "
            "MaskBit), else written from the reference images.",
        ),
    ] = None,
    num_images: NumImagesOpt = None,
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics", "-m", callback=_metrics_option, help="Comma-separated subset of rfid,lpips,psnr,ssim,usage."
        ),
    ] = ",".join(METRICS),
    weights_dir: WeightsDirOpt = None,
    lpips_net: Annotated[
        str, typer.Option("--lpips-net", callback=_lpips_net_option, help="LPIPS backbone: alex or vgg.")
    ] = "alex",
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    nproc_per_node: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = None,
    master_port: MasterPortOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Benchmark tokenizer checkpoints on the same images under a written protocol.

    Offline without the InceptionV3 / AlexNet weights, rFID and LPIPS are reported as unavailable (with the file to
    put where) and the other metrics still run.
    """
    from tokkit.bench import bench as run_bench
    from tokkit.report import notes, summary_rows

    if nproc_per_node > 1 or (nnodes, node_rank, master_addr, master_port) != (1, 0, None, None):
        args = [
            "bench", *map(str, checkpoints), "--data", str(data), "--out", str(out), "--protocol", protocol,
            *(["--ref-stats", str(ref_stats)] if ref_stats is not None else []),
            *(["--num-images", str(num_images)] if num_images is not None else []), "--metrics", metrics,
            *(["--weights-dir", str(weights_dir)] if weights_dir is not None else []), "--lpips-net", lpips_net,
            "--device", device, *(["--batch-size", str(batch_size)] if batch_size else []),
            *(["--workers", str(workers)] if workers is not None else []), *(["--quiet"] if quiet else []),
            *(["--json"] if json_out else []),
        ]  # fmt: skip
        launch(args, nproc_per_node, nnodes, node_rank, master_addr, master_port)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 draws and prints
    reporter = _Reporter(enabled=main and not quiet)
    result = run_bench(
        checkpoints,
        data,
        out=out,
        protocol=protocol,
        ref_stats=ref_stats,
        num_images=num_images,
        batch_size=batch_size or library_default(run_bench, "batch_size"),
        metrics=[m.strip() for m in metrics.split(",") if m.strip()],
        weights_dir=weights_dir,
        lpips_net=lpips_net,
        device=device,
        workers=cap_workers(library_default(run_bench, "workers") if workers is None else workers),
        reporter=reporter,
    )
    if not main:
        return
    for line in notes(result):
        if line in reporter.said:  # already printed when it happened
            continue
        err_console.print(f"[yellow]note:[/] {line}", highlight=False, soft_wrap=True)
    if json_out:
        emit_json(result)
        return
    headers, rows = summary_rows(result)
    emit_table(f"tokkit bench: {result.results[0].protocol['num_images']} images", headers, rows, right_from=2)
    typer.echo(f"results: {result.files['results']}  report: {result.files['report']}")


class _Reporter(RichReporter):
    """Remembers the notes it printed, so the summary does not repeat them."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled=enabled)
        self.said: set[str] = set()

    def message(self, text: str) -> None:
        self.said.add(text)
        super().message(text)
