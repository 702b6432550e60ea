"""`tokkit train`: train a tokenizer from a preset, with any config field overridable from the shell."""

from __future__ import annotations

import dataclasses
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
    QuietOpt,
    RichReporter,
    WeightsDirOpt,
    WorkersOpt,
    cap_workers,
    handle_errors,
    launch,
)
from tokkit.cli.output import emit_facts, emit_json


@handle_errors
def train(
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Named preset (see `tokkit presets`); default sample-fsq.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            callback=checks.data_option,
            help="Image folder, .zip, .txt list, .npy/.npz uint8 array, or 'sample' (the default; with --resume: the "
            "run's own data).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", callback=checks.out_option, help="Run folder; default runs/<preset>."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Training steps (overrides the preset).")] = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Peak learning rate.")] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out exactly where its last save left it, on its own data (a save that a kill "
            "interrupted is finished first).",
        ),
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override any config field: tokenizer.base_channels=32, train.lr=2e-4 ..."),
    ] = None,
    perceptual: Annotated[
        str | None,
        typer.Option("--perceptual", help="auto (LPIPS if its weights can be had), lpips (required) or none."),
    ] = None,
    weights_dir: WeightsDirOpt = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            callback=checks.data_option,
            help="Separate images for the held-out batch (default: from --data).",
        ),
    ] = None,
    new_data: Annotated[
        bool, typer.Option("--new-data", help="With --resume: switch to other --data / --eval-data (kept in run.json).")
    ] = False,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Start from this trained tokenizer (checkpoint or run folder, or a peer checkpoint tokkit convert "
            "reads): its architecture and weights; --preset then gives the training knobs only.",
        ),
    ] = None,
    freeze: Annotated[
        list[str] | None,
        typer.Option(
            "--freeze",
            help="With --init-from: keep encoder (+quant_conv), quantizer and/or decoder (+post_quant_conv) fixed; "
            "repeat or use commas. quantizer keeps token ids compatible; encoder,quantizer keeps them identical.",
        ),
    ] = None,
    nproc_per_node: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = None,
    master_port: MasterPortOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a tokenizer; leaves runs/<name>/ with checkpoint/, metrics.jsonl and reconstruction grids.

    -j/--workers sets train.num_workers (default: the preset's), capped at the CPU cores - 1 per process.
    More than one machine: run the same command on each with --nnodes N --node-rank R --master-addr HOST (the run
    folder and the data on a file system every node sees).
    """
    from tokkit.config import DEFAULT_PRESET, TrainConfig, apply_overrides
    from tokkit.errors import ConfigError
    from tokkit.train_init import check_init_path, parse_freeze

    name = preset or DEFAULT_PRESET
    out = out or Path("runs") / name
    if perceptual is not None and perceptual not in ("auto", "lpips", "none"):
        raise ConfigError(f"--perceptual must be auto, lpips or none, got {perceptual!r}")
    sets = list(overrides or [])
    for field, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr), ("perceptual", perceptual),
                         ("num_workers", workers)):  # fmt: skip
        if value is not None:
            sets.append(f"train.{field}={value}")
    # the train section is checked alone first: it needs no torch (the tokenizer section builds a quantizer)
    apply_overrides({"train": TrainConfig()}, [s for s in sets if s.startswith("train.")])
    frozen = parse_freeze(freeze)
    if init_from is not None and not resume:  # a resume never reads it (it may be gone): run.json has its record
        check_init_path(init_from)
    if frozen and init_from is None and not resume:
        raise ConfigError("--freeze needs --init-from CHECKPOINT: a part frozen at its random start never learns")

    from tokkit.config import get_preset
    from tokkit.train import read_run_config
    from tokkit.train import train as run_training
    from tokkit.train_init import read_init

    if nproc_per_node > 1 or (nnodes, node_rank, master_addr, master_port) != (1, 0, None, None):
        args = ["train", "--preset", name, "--out", str(out), "--device", device]
        for flag, value in (("--data", data), ("--steps", steps), ("--batch-size", batch_size), ("--lr", lr),
                            ("--perceptual", perceptual), ("--weights-dir", weights_dir), ("--eval-data", eval_data),
                            ("--workers", workers), ("--init-from", init_from)):  # fmt: skip
            if value is not None:
                args += [flag, str(value)]
        for item in overrides or []:
            args += ["--set", item]
        args += ["--freeze", ",".join(frozen)] if frozen else []
        for flag, on in (("--resume", resume), ("--new-data", new_data), ("--quiet", quiet), ("--json", json_out)):
            args += [flag] if on else []
        launch(args, nproc_per_node, nnodes, node_rank, master_addr, master_port)

    init = None
    if resume:  # the run's own configs; explicit flags below may still change training knobs (e.g. more --steps)
        tok_cfg, train_cfg, _ = read_run_config(out)
    else:
        chosen = get_preset(name)
        tok_cfg, train_cfg = chosen.tokenizer, chosen.train
        if init_from is not None:  # the architecture is the checkpoint's; --set tokenizer.* may only repeat it
            init = read_init(init_from)
            tok_cfg = init.config
    cfgs = apply_overrides({"tokenizer": tok_cfg, "train": train_cfg}, sets)
    capped = cap_workers(cfgs["train"].num_workers)
    if capped != cfgs["train"].num_workers:
        cfgs["train"] = dataclasses.replace(cfgs["train"], num_workers=capped)

    main = int(os.environ.get("RANK", "0")) == 0
    result = run_training(
        cfgs["tokenizer"], cfgs["train"], data=data, out_dir=out, resume=resume, device=device,
        reporter=RichReporter(enabled=main and not quiet), weights_dir=weights_dir, eval_data=eval_data,
        new_data=new_data, init_from=init if init is not None else init_from, freeze=frozen,
    )  # fmt: skip
    if not main:
        return
    if json_out:
        emit_json(result)
        return
    m = result.metrics
    rows = [
        ("checkpoint", f"{result.checkpoint}  (tokkit.load({str(result.checkpoint)!r}))"),
        ("data", result.data),
        *([("started from", f"{result.init_from['source']} (frozen: {', '.join(result.freeze) or 'nothing'})")]
          if result.init_from else []),
        ("steps", f"{result.step}" + (f" (resumed at {result.resumed_from})" if result.resumed_from else "")),
    ]
    if m:
        rows.append(("held-out PSNR / SSIM", f"{m['psnr']:.2f} dB / {m['ssim']:.3f}"))
        rows.append(("codebook usage", f"{m['usage']:.1%} (perplexity {m['perplexity']:.0f})"))
    rows.append(("speed", f"{result.images_per_second:.1f} img/s, {result.seconds:.0f} s"))
    rows.append(("perceptual loss", "LPIPS" if result.perceptual else "off"))
    if result.bad_images:
        rows.append(("skipped", f"{result.bad_images} unreadable images"))
    rows.append(("logs", f"{result.metrics_file}, {result.out_dir / 'grids'}/"))
    emit_facts(f"tokkit train -> {result.out_dir}", rows)
