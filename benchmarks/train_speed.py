"""Training speed: `tokkit train` against the bare step of the same model with the same losses, per preset.

For each preset, in one run:

- the bare step: ``tokkit.train_step.TrainStep`` (forward, the preset's losses, backward, AdamW, EMA, usage counts) on
  one batch already on the device, timed over ``--steps`` steps after warm-up; eager, and compiled (``torch.compile``)
  where compilation is on (CUDA by default; ``--compile on`` for the CPU);
- `tokkit train` (``tokkit.train.train`` on the sample images, or ``--data``): the steady-state images/s, the median
  of its logged windows after the first (data loading, host syncs and logging included, evaluation and saves not);
- their ratio (train / the bare step with the same compile setting), the peak GPU memory of each, and the achieved
  TFLOP/s of the bare step (FLOPs of one step counted by ``torch.utils.flop_counter``, forward + backward).

Prints a markdown table and writes ``results.json`` into ``--out``.

    python benchmarks/train_speed.py                                  # every cifar10/tinyimagenet/imagenet fsq preset
    python benchmarks/train_speed.py --quick                          # a smoke run on the CPU (a few minutes)
    python benchmarks/train_speed.py --presets sample-fsq --device cpu --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tokkit.config import apply_overrides, get_preset
from tokkit.train import train

DEFAULT_PRESETS = ["cifar10-f4-fsq", "tinyimagenet-f4-fsq", "imagenet-f16-fsq"]
QUICK = {"presets": ["sample-fsq"], "steps": 12, "device": "cpu"}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def bare_step(tok_cfg, train_cfg, dev: torch.device, steps: int, compiled: bool) -> dict[str, Any]:
    """Images/s of ``TrainStep`` on one resident batch; also its FLOPs per step and peak memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from tokkit.losses import build_perceptual
    from tokkit.train import _build_state
    from tokkit.train_step import TrainStep, checkpoint_blocks

    st, _ = _build_state(tok_cfg, train_cfg, dev)
    if train_cfg.grad_checkpointing:
        checkpoint_blocks(st.model)
    perceptual = build_perceptual(train_cfg.perceptual, train_cfg.lpips_net, None, dev)
    net = torch.compile(st.model) if compiled else st.model
    disc = (torch.compile(st.disc) if compiled else st.disc) if st.disc is not None else None
    amp = train_cfg.amp == "bf16" or (train_cfg.amp == "auto" and dev.type == "cuda")
    step = TrainStep(st, train_cfg, net, disc, perceptual, amp, distributed=False)
    g = torch.Generator().manual_seed(0)
    r = tok_cfg.resolution
    x = (torch.rand(train_cfg.batch_size, 3, r, r, generator=g) * 2 - 1).to(dev)
    st.step = max(st.step, train_cfg.disc_start)  # the discriminator on, as in the steady state of a GAN preset
    t0 = time.perf_counter()
    step(x)  # warm-up: k-means init, allocator, compilation
    _sync(dev)
    warm_s = time.perf_counter() - t0
    step(x)
    flops = None
    if not compiled:
        with FlopCounterMode(display=False) as counter:
            step(x)
        flops = counter.get_total_flops()
    _peak_reset(dev)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    _sync(dev)
    seconds = time.perf_counter() - t0
    return {"img_per_s": steps * train_cfg.batch_size / seconds, "flops_per_step": flops,
            "steps_per_s": steps / seconds, "peak_gib": _peak_gib(dev), "first_step_s": warm_s}


def train_run(tok_cfg, train_cfg, dev: torch.device, steps: int, data: str, out: Path) -> dict[str, Any]:
    """Steady-state images/s of `tokkit train` (the median of its logged windows after the first)."""
    log_every = max(1, steps // 6)
    cfg = apply_overrides({"train": train_cfg}, [f"train.steps={steps + log_every}", f"train.log_every={log_every}",
                                                 "train.eval_every=0", "train.checkpoint_every=0"])["train"]
    _peak_reset(dev)
    t0 = time.perf_counter()
    res = train(tok_cfg, cfg, data, out, device=dev.type)
    wall = time.perf_counter() - t0
    windows = [r["img_per_s"] for r in map(json.loads, res.metrics_file.read_text().splitlines())
               if "img_per_s" in r]
    steady = windows[1:] or windows
    return {"img_per_s": statistics.median(steady), "windows": windows, "peak_gib": _peak_gib(dev), "wall_s": wall}


def measure(preset: str, args: argparse.Namespace, dev: torch.device, work: Path) -> dict[str, Any]:
    p = get_preset(preset)
    sets = list(args.set or [])
    if args.perceptual:
        sets.append(f"train.perceptual={args.perceptual}")
    if args.compile:
        sets.append(f"train.compile={args.compile}")
    cfgs = apply_overrides({"tokenizer": p.tokenizer, "train": p.train}, sets)
    tok_cfg, train_cfg = cfgs["tokenizer"], cfgs["train"]
    from tokkit.train_step import use_compile

    compiled = use_compile(train_cfg.compile, dev)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and train_cfg.cpu_threads:
        torch.set_num_threads(train_cfg.cpu_threads)  # the bare step on as many threads as the run gets
    try:
        eager = bare_step(tok_cfg, train_cfg, dev, args.steps, compiled=False)
        comp = bare_step(tok_cfg, train_cfg, dev, args.steps, compiled=True) if compiled else None
    finally:
        torch.set_num_threads(threads)
    run = train_run(tok_cfg, train_cfg, dev, args.train_steps or 4 * args.steps, args.data, work / preset)
    ref = comp or eager
    tflops = None if eager["flops_per_step"] is None else eager["flops_per_step"] * ref["steps_per_s"] / 1e12
    return {"preset": preset, "device": str(dev), "batch_size": train_cfg.batch_size,
            "resolution": tok_cfg.resolution, "compile": compiled, "perceptual": train_cfg.perceptual,
            "bare_eager": eager, "bare_compiled": comp, "train": run,
            "ratio": run["img_per_s"] / ref["img_per_s"], "tflops": tflops}


def markdown(rows: list[dict[str, Any]]) -> str:
    def gib(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["| preset | device | batch | bare eager img/s | bare compiled img/s (compile s) | tokkit train img/s "
             "| train / bare | peak GiB bare / train | TFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["bare_compiled"]
        comp = "-" if c is None else f"{c['img_per_s']:.1f} ({c['first_step_s']:.0f})"
        peak = (r["bare_compiled"] or r["bare_eager"])["peak_gib"]
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.3f}"
        lines.append(f"| {r['preset']} | {r['device']} | {r['batch_size']} | {r['bare_eager']['img_per_s']:.1f} | "
                     f"{comp} | {r['train']['img_per_s']:.1f} | {r['ratio']:.2f} | {gib(peak)} / "
                     f"{gib(r['train']['peak_gib'])} | {tf} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=None, help="comma-separated preset names")
    ap.add_argument("--device", default=None, help="auto, cpu or cuda")
    ap.add_argument("--steps", type=int, default=None, help="timed bare steps (default 30; --quick: 12)")
    ap.add_argument("--train-steps", type=int, default=None, help="`tokkit train` steps (default 4 x --steps)")
    ap.add_argument("--data", default="sample", help="training images for `tokkit train`")
    ap.add_argument("--perceptual", default="none", help="auto, lpips or none (the same for both; default none)")
    ap.add_argument("--compile", default=None, help="train.compile: auto (CUDA only), on, off")
    ap.add_argument("--set", "-s", action="append", help="config override for every preset, e.g. train.batch_size=8")
    ap.add_argument("--quick", action="store_true", help="a CPU smoke run of a few minutes (sample-fsq)")
    ap.add_argument("--out", default=None, help="folder for results.json (default: a temporary folder)")
    args = ap.parse_args(argv)
    quick = QUICK if args.quick else {"presets": DEFAULT_PRESETS, "steps": 30, "device": "auto"}
    presets = args.presets.split(",") if args.presets else quick["presets"]
    args.steps = args.steps or quick["steps"]
    dev = _device(args.device or quick["device"])
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        rows = [measure(p, args, dev, Path(tmp)) for p in presets]
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "results.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
