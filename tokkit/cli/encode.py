"""`tokkit encode CHECKPOINT DATA --out DIR`: an image dataset -> checksummed, resumable token shards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli import checks
from tokkit.cli.common import (
    BatchSizeOpt,
    CheckpointArg,
    DeviceOpt,
    JsonOpt,
    MasterAddrOpt,
    MasterPortOpt,
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    QuietOpt,
    RichReporter,
    WorkersOpt,
    cap_workers,
    handle_errors,
    launch,
    library_default,
)
from tokkit.cli.output import emit_facts, emit_json


@handle_errors
def encode(
    checkpoint: CheckpointArg,
    data: Annotated[
        str,
        typer.Argument(
            callback=checks.data_option,
            help="Image folder, .zip, .txt list, .npy/.npz array, .tar shards (or s3://... URLs), .parquet, MDS "
            "folder, hf:ORG/NAME, or 'sample'.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", callback=checks.out_option, help="Shard set folder (resumed when it holds the same plan)."
        ),
    ],
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Inputs per shard.")] = 10000,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    views: Annotated[
        str,
        typer.Option(
            "--views",
            callback=checks.views_option,
            help="none, flip (2 views) or tencrop (10 views), stored as a views axis.",
        ),
    ] = "none",
    device: DeviceOpt = "auto",
    max_errors: Annotated[
        float,
        typer.Option("--max-errors", min=0.0, help="Unreadable inputs tolerated: a fraction (< 1) or a count (>= 1)."),
    ] = 0.01,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable input.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace shards of another plan (changed inputs or tokenizer).")
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair", help="Re-hash every committed shard and re-encode those that fail (see tokkit verify)."
        ),
    ] = False,
    decode: Annotated[
        str,
        typer.Option(
            "--decode",
            help="JPEG decoding: auto (libjpeg DCT scaling down to 2x the resolution), full, reduced (DCT scaling "
            "down to the resolution: fastest) or gpu (nvjpeg on the CUDA device). Recorded in the plan.",
        ),
    ] = "auto",
    nproc_per_node: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = None,
    master_port: MasterPortOpt = None,
    image_key: Annotated[
        str | None, typer.Option("--image-key", help="Image column (parquet/MDS/hf) or tar member extension.")
    ] = None,
    label_key: Annotated[
        str | None, typer.Option("--label-key", help="Label column (parquet/MDS/hf) or tar member extension.")
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="hf: split (default train); MDS: subfolder.")] = None,
    source_kind: Annotated[
        str, typer.Option("--source-kind", help="auto, hf (DATA is a datasets name/folder) or mds.")
    ] = "auto",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Encode every image of DATA into token shards under --out (resume: run the same command again).

    A rerun re-checks committed shards (sizes, headers) and re-encodes any that fail; --repair also re-hashes them.
    """
    from tokkit.encode import encode_dataset

    options = {"image_key": image_key, "label_key": label_key, "split": split, "kind": source_kind}
    source_options = {k: v for k, v in options.items() if v and v != "auto"}
    source_flags = {"--" + k.replace("_", "-").replace("kind", "source-kind"): v for k, v in source_options.items()}
    if nproc_per_node > 1 or (nnodes, node_rank, master_addr, master_port) != (1, 0, None, None):
        args = [
            "encode", str(checkpoint), str(data), "--out", str(out), "--shard-size", str(shard_size),
            *(["--batch-size", str(batch_size)] if batch_size else []),
            *(["--workers", str(workers)] if workers is not None else []), "--views", views, "--device", device,
            "--max-errors", repr(max_errors), *(["--strict"] if strict else []),
            *(["--overwrite"] if overwrite else []), *(["--repair"] if repair else []), *(["--quiet"] if quiet else []),
            "--decode", decode,
            *(["--json"] if json_out else []), *[a for f, v in source_flags.items() for a in (f, v)],
        ]  # fmt: skip
        launch(args, nproc_per_node, nnodes, node_rank, master_addr, master_port)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 draws and prints
    result = encode_dataset(
        checkpoint, data, out, shard_size=shard_size,
        batch_size=batch_size or library_default(encode_dataset, "batch_size"),
        workers=cap_workers(library_default(encode_dataset, "workers") if workers is None else workers), views=views,
        device=device, max_errors=max_errors, strict=strict, overwrite=overwrite, repair=repair, decode=decode,
        reporter=RichReporter(enabled=main and not quiet), source_options=source_options,
    )  # fmt: skip
    if not main:
        return
    if json_out:
        emit_json(result)
        return
    repaired = f", {result.repaired} re-encoded after failing their check" if result.repaired else ""
    emit_facts(f"tokkit encode -> {result.out}", [
        ("images", f"{result.images}"),
        ("shards", f"{result.shards[0]}/{result.shards[1]} committed ({result.resumed} resumed{repaired})"),
        ("skipped", f"{result.skipped} unreadable (errors.jsonl)"),
        ("upscaled", f"{result.upscaled} smaller than the resolution"),
        ("time", f"{result.seconds:.1f} s ({result.images_per_second:.1f} img/s this run)"),
        ("complete", "yes" if result.complete else "no"),
    ])  # fmt: skip
